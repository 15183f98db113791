//! `microcosm certs init` run as a real process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use microcosm_transport::{Identity, Role};

fn microcosm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_microcosm"))
}

#[test]
fn certs_init_creates_a_loadable_identity_per_role() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = microcosm()
        .args(["certs", "init", "--dir"])
        .arg(&certs)
        .args(["--san", "10.1.2.3,node1.example"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for role in Role::ALL {
        assert_eq!(Identity::load(&certs, role).unwrap().role(), role);
    }
    // The CA's key is named, with what it allows.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&certs.join("ca.key").display().to_string())
            && stdout.contains("can issue certificates of any role"),
        "{stdout}"
    );
}

#[test]
fn certs_init_refuses_to_overwrite_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        microcosm()
            .args(["certs", "init", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    assert!(run().status.success());
    let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let second = run();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already holds a cluster CA"), "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
}
