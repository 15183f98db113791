//! The demo pipeline end to end with real processes: the prototype's own test, records
//! crossing QUIC between two executors, cancellation, and `microcosm demo` itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::exec::Executor;
use common::jobs::wait_state;
use common::{Cluster, cli, cli_with_timeout, wait_until};

fn demo_spec(cluster: &Cluster, flow: &str, extra: &str) -> (String, String) {
    let sink = cluster.dir.path().join("sink");
    let text = format!(
        "flow-id = \"{flow}\"\ntable-num = 10\nbinlog-num = 3\nrcd-cnt = 10000\nddl-freq = 100\nrate = 0\nsink-dir = \"{}\"\n{extra}",
        sink.display()
    );
    let path = cluster.dir.path().join(format!("{flow}.toml"));
    std::fs::write(&path, &text).unwrap();
    (
        path.to_string_lossy().into_owned(),
        sink.join(flow).to_string_lossy().into_owned(),
    )
}

/// The prototype's own test: 1 master, 1 executor, T=10, S=3, 10,000 records per table, a DDL
/// every 100; then a second job is cancelled while running.
#[test]
fn prototype_job_on_one_executor_then_cancel() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let _e = Executor::start(&cluster, "exec-1", 64);
    let (spec, out_dir) = demo_spec(&cluster, "proto", "");
    let id = common::jobs::submit(&cluster, &via, &spec, &[]);
    wait_state(&cluster, &via, id, "Finished", Duration::from_secs(90));
    common::jobs::verify_demo(&spec, &out_dir, 100000);

    // A paced job that runs long enough to be cancelled mid-way.
    let (slow, _) = demo_spec(&cluster, "slow", "").clone();
    let text = std::fs::read_to_string(&slow)
        .unwrap()
        .replace("rate = 0", "rate = 2000");
    std::fs::write(&slow, text).unwrap();
    let second = common::jobs::submit(&cluster, &via, &slow, &[]);
    wait_state(&cluster, &via, second, "Running", Duration::from_secs(20));
    let out = cluster.client(&["job", "cancel", &second.to_string()], &via);
    assert!(out.success(), "{out}");
    wait_state(&cluster, &via, second, "Cancelled", Duration::from_secs(10));
    let status = cluster
        .client(&["cluster", "status", "--output", "json"], &via)
        .json()
        .unwrap();
    assert_eq!(
        status["executors"][0]["used"], 0,
        "capacity not released: {status}"
    );
}

/// Two executors: binlogs and receivers are placed apart, so every record crosses QUIC.
#[test]
fn records_cross_quic_between_two_executors() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let _a = Executor::start(&cluster, "exec-a", 64);
    let _b = Executor::start(&cluster, "exec-b", 64);
    common::jobs::wait_for_executors(&cluster, &via, 2);
    let (spec, out_dir) = demo_spec(&cluster, "split", "rate = 50000\n".trim_start());
    // The paced rate keeps the job running long enough to observe its placement.
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replacen("rate = 0\n", "", 1);
    std::fs::write(&spec, text).unwrap();
    let id = common::jobs::submit(&cluster, &via, &spec, &[]);
    let r = wait_until("tasks on both executors", Duration::from_secs(20), || {
        let s = cluster
            .client(&["cluster", "status", "--output", "json"], &via)
            .json()?;
        let used: Vec<u64> = s["executors"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .map(|e| e["used"].as_u64().unwrap_or(0))
            .collect();
        // Group 1 (10 producers + 3 binlogs) on one, group 2 (3 x receive, syncer, sink) on the other.
        let mut sorted = used.clone();
        sorted.sort();
        if sorted == vec![9, 13] {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    cluster.unwrap_or_dump(r);
    wait_state(&cluster, &via, id, "Finished", Duration::from_secs(90));
    common::jobs::verify_demo(&spec, &out_dir, 100000);

    // Both executors report the data connection between them: the binlogs' side dialed it
    // and sent the records over it, the receivers' side accepted it.
    let status = cluster
        .client(
            &["cluster", "status", "--connections", "--output", "json"],
            &via,
        )
        .json()
        .unwrap();
    let mut dialed = Vec::new();
    let mut accepted = Vec::new();
    for e in status["executors"].as_array().unwrap() {
        for c in e["connections"].as_array().expect("connections listed") {
            if c["role"] == "executor" {
                let side = if c["dialed"] == true {
                    &mut dialed
                } else {
                    &mut accepted
                };
                side.push((e["addr"].clone(), c.clone()));
            }
        }
    }
    assert_eq!((dialed.len(), accepted.len()), (1, 1), "{status}");
    let ((sender, out), (receiver, inc)) = (&dialed[0], &accepted[0]);
    assert_eq!(&out["peer"], receiver, "{status}");
    assert_eq!(&inc["peer"], sender, "{status}");
    let sent = out["datagrams_sent"].as_u64().unwrap();
    assert!(sent > 100, "100,000 records in {sent} datagrams: {status}");
    assert!(
        inc["datagrams_received"].as_u64().unwrap() >= sent / 2,
        "{status}"
    );
    assert!(out["rtt_us"].as_u64().unwrap() > 0, "{status}");
}

/// `microcosm demo` as a newcomer runs it (small job so it stays fast).
#[test]
fn demo_command_runs_verifies_and_cleans_up() {
    let out = cli_with_timeout(
        [
            "demo",
            "--table-num",
            "4",
            "--binlog-num",
            "2",
            "--rcd-cnt",
            "5000",
            "--ddl-freq",
            "500",
            "--rate",
            "0",
        ],
        Duration::from_secs(120),
    );
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("verification PASSED"), "{out}");
    assert!(
        out.stdout
            .contains("data rows         20000 (expected 20000)"),
        "{out}"
    );
    let dir = out
        .stdout
        .lines()
        .find_map(|l| l.split("cluster dir ").nth(1))
        .expect("the demo names its cluster dir");
    assert!(
        !std::path::Path::new(dir.trim()).exists(),
        "cluster dir {dir} left behind"
    );
}

#[test]
fn demo_refuses_an_executor_heartbeat_the_ttl_cannot_hold_and_names_it() {
    let out = cli_with_timeout(
        [
            "demo",
            "--executor-heartbeat-ms",
            "1000",
            "--rcd-cnt",
            "100",
        ],
        Duration::from_secs(20),
    );
    assert!(!out.timed_out() && !out.success(), "{out}");
    assert!(
        out.stderr
            .contains("--executor-heartbeat-ms 1000: must be 1 to 750"),
        "{out}"
    );
}

/// An executor that cannot start (its config is refused) ends the demo at once with that
/// executor's own error, and the cluster directory with its logs is kept.
#[test]
fn demo_stops_when_a_node_exits_naming_it_and_keeping_the_logs() {
    let out = cli_with_timeout(
        ["demo", "--executor-workers", "0", "--rcd-cnt", "100"],
        Duration::from_secs(60),
    );
    assert!(!out.timed_out() && !out.success(), "{out}");
    // Both executors fail the same check; whichever exited first is named.
    assert!(
        (out.stderr.contains("executor-1 exited") || out.stderr.contains("executor-2 exited"))
            && out
                .stderr
                .contains("workers must be between 1 and 1024, got 0"),
        "{out}"
    );
    let kept = out
        .stderr
        .split("cluster logs kept in ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .expect("the error names the kept directory");
    let kept = std::path::Path::new(kept.trim());
    assert!(kept.join("executor-1.log").exists(), "{out}");
    assert!(kept.join("executor-2.log").exists(), "{out}");
    std::fs::remove_dir_all(kept).unwrap();
}

/// `microcosm verify` tells output that failed verification (exit status 3) from an error
/// (1) and from a usage error (2), so a script can tell a bad run from a bad invocation.
#[test]
fn verify_exit_status_tells_failed_output_from_errors() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "flow-id = \"x\"\ntable-num = 2\nbinlog-num = 2\nrcd-cnt = 10\nddl-freq = 0\n",
    )
    .unwrap();
    let job = job.to_string_lossy().into_owned();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty = empty.to_string_lossy().into_owned();
    let absent = dir.path().join("absent").to_string_lossy().into_owned();

    let failed = cli(["verify", "--dir", &empty, "--job", &job]);
    assert_eq!(failed.status.and_then(|s| s.code()), Some(3), "{failed}");
    assert!(failed.stderr.contains("verification FAILED"), "{failed}");

    let error = cli(["verify", "--dir", &absent, "--job", &job]);
    assert_eq!(error.status.and_then(|s| s.code()), Some(1), "{error}");
    assert!(error.stderr.contains("absent"), "{error}");

    let usage = cli(["verify", "--dir", &empty]);
    assert_eq!(usage.status.and_then(|s| s.code()), Some(2), "{usage}");
}

/// `microcosm demo` of a small pipeline: 2 tables, 1 stream.
const SMALL_DEMO: [&str; 5] = ["demo", "--table-num", "2", "--binlog-num", "1"];

/// A job that does not finish within `--timeout` ends the demo with exit status 3 (the job
/// did not finish), naming the timeout and keeping the cluster directory.
#[test]
fn a_demo_that_times_out_exits_3_and_keeps_its_directory() {
    let args = [
        &SMALL_DEMO[..],
        &["--rcd-cnt", "100000", "--rate", "100", "--timeout", "3s"],
    ]
    .concat();
    let out = cli_with_timeout(args, Duration::from_secs(60));
    assert_eq!(out.status.and_then(|s| s.code()), Some(3), "{out}");
    assert!(out.stdout.contains("did not finish within 3s"), "{out}");
    let kept = out
        .stdout
        .split("cluster logs kept in ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the demo names the kept directory");
    let kept = std::path::Path::new(kept.trim());
    assert!(kept.join("master-1.log").exists(), "{out}");
    std::fs::remove_dir_all(kept).unwrap();
}

/// A fault asked for but not yet due when the job ended is reported as not injected.
#[test]
fn a_kill_not_due_before_the_job_ended_is_reported_as_not_done() {
    let args = [
        &SMALL_DEMO[..],
        &[
            "--rcd-cnt",
            "2000",
            "--rate",
            "0",
            "--kill-executor-after",
            "60m",
        ],
    ]
    .concat();
    let out = cli_with_timeout(args, Duration::from_secs(60));
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains(
            "no executor was killed: the job ended before --kill-executor-after (3600s) was due"
        ),
        "{out}"
    );
}

/// A `microcosm demo` of a long job (2 tables, 1 stream, 1,000 records/s), followed until it
/// submitted its job: the process and its cluster directory.
fn demo_until_submitted(extra: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut demo = Command::new(common::bin())
        .args(SMALL_DEMO)
        .args(["--rcd-cnt", "1000000", "--rate", "1000"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut dir = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the demo submits its job");
        if let Some(d) = line.split("cluster dir ").nth(1) {
            dir = Some(d.trim().to_string());
        }
        if line.contains("submitted job") {
            break;
        }
    }
    (demo, dir.expect("the demo names its cluster dir"))
}

/// Waits (at most 30 s) for `demo` to exit; its status and standard error.
fn demo_exit(mut demo: std::process::Child) -> (std::process::ExitStatus, String) {
    let since = std::time::Instant::now();
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        if since.elapsed() > Duration::from_secs(30) {
            let _ = demo.kill();
            panic!("the demo went on for 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut demo.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

fn send_signal(pid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A node that dies while the job runs ends the demo at once, naming it, with its logs kept:
/// not at the timeout.
#[test]
fn a_node_dying_mid_job_ends_the_demo_at_once() {
    let (demo, dir) = demo_until_submitted(&[]);
    // The demo's master: the process whose command line names this cluster's certificates
    // and the `master` subcommand.
    let certs = format!("{dir}/certs");
    let master = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.get(1) == Some(&&b"master"[..]) && args.contains(&certs.as_bytes())
            })
        })
        .expect("the demo's master is running");
    send_signal(master, "-9");
    let (status, stderr) = demo_exit(demo);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("master-1 exited"), "{stderr}");
    assert!(stderr.contains("cluster logs kept in"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM shuts the demo's cluster down and removes its directory; with `--keep` the
/// directory stays.
#[test]
fn sigterm_shuts_the_demo_down_cleanly() {
    for keep in [false, true] {
        let (demo, dir) = demo_until_submitted(if keep { &["--keep"] } else { &[] });
        send_signal(demo.id(), "-TERM");
        let (status, stderr) = demo_exit(demo);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert_eq!(std::path::Path::new(&dir).exists(), keep, "{dir}");
        if keep {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
