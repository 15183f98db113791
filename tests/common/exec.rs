//! `microcosm executor` child processes for process-level tests.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::{Cluster, free_udp_addr};

/// A `microcosm executor` child, killed when dropped.
pub struct Executor {
    /// Its data-plane address.
    pub addr: SocketAddr,
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Executor {
    /// Starts an executor of `cluster`'s masters.
    pub fn start(cluster: &Cluster, name: &str, slots: u32) -> Self {
        Self::start_with(cluster, name, slots, &[])
    }

    /// [`Executor::start`] with more command-line arguments.
    pub fn start_with(cluster: &Cluster, name: &str, slots: u32, extra: &[&str]) -> Self {
        let addr = free_udp_addr();
        let masters = cluster
            .nodes
            .values()
            .map(|n| n.addr.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let log = cluster.dir.path().join(format!("{name}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut args: Vec<OsString> = vec![
            "executor".into(),
            "--listen-addr".into(),
            addr.to_string().into(),
            "--masters".into(),
            masters.into(),
            "--certs-dir".into(),
            cluster.certs.clone().into(),
            "--name".into(),
            name.into(),
            "--slots".into(),
            slots.to_string().into(),
            "--workers".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let child = Command::new(super::bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self {
            addr,
            child: Some(child),
            log,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILLs and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its exit status, once it exited (reaped then).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Sends `kill -<sig>`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process must be continued before it can die.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.pid().to_string())
                .status();
        }
        self.kill();
    }
}
