//! Executors, scheduling, failover and the job lifecycle, with real `microcosm` processes.
//!
//! Each test starts masters (via the shared harness) and executors on free loopback ports,
//! runs the `sleep` job type (N tasks that wait and finish) and asserts what `job status` and
//! `cluster status` report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::exec::Executor;
use common::jobs::{executors, job, wait_for_executors, wait_state};
use common::{Cluster, wait_until};

fn write_spec(cluster: &Cluster, name: &str, text: &str) -> String {
    let p = cluster.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn submit_sleep(cluster: &Cluster, via: &[SocketAddr], tasks: u32, ms: u64) -> u64 {
    let spec = write_spec(
        cluster,
        &format!("sleep-{tasks}-{ms}.toml"),
        &format!("tasks = {tasks}\nduration-ms = {ms}\n"),
    );
    let out = cluster.client(&["submit-job", "--type", "sleep", "--config", &spec], via);
    let id = out
        .ok_stdout()
        .and_then(|s| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}")));
    cluster.unwrap_or_dump(id)
}

#[test]
fn t01_job_waits_pending_until_executors_register() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let id = submit_sleep(&cluster, &via, 4, 60_000);
    let j = wait_state(&cluster, &via, id, "Pending", Duration::from_secs(5));
    let reason = j["reason"].as_str().unwrap_or_default().to_string();
    let r = wait_until(
        "a Pending reason naming the missing executors",
        Duration::from_secs(5),
        || {
            let j = job(&cluster, &via, id)?;
            let reason = j["reason"].as_str().unwrap_or_default();
            if reason.contains("no executors") {
                Ok(())
            } else {
                Err(j.to_string())
            }
        },
    );
    cluster.unwrap_or_dump(r);
    let _a = Executor::start(&cluster, "exec-a", 2);
    let _b = Executor::start(&cluster, "exec-b", 2);
    let j = wait_state(&cluster, &via, id, "Running", Duration::from_secs(10));
    assert_eq!(j["tasks"], 4, "{j} (reason before: {reason})");
    let execs = executors(&cluster, &via).unwrap();
    let used: u64 = execs.iter().map(|e| e["used"].as_u64().unwrap()).sum();
    assert_eq!(used, 4, "{execs:?}");
}

/// The executor at `addr` among `cluster status`'s `execs`.
fn at(execs: &[serde_json::Value], addr: SocketAddr) -> &serde_json::Value {
    execs
        .iter()
        .find(|e| e["addr"] == addr.to_string())
        .unwrap_or_else(|| panic!("no executor at {addr}: {execs:?}"))
}

/// One master, executors `exec-a` and `exec-b` of 8 slots each, and a 4-task sleep job
/// running on them: (cluster, a, b, the master's address, job, its epoch).
fn sleep_job_on_two_executors() -> (Cluster, Executor, Executor, [SocketAddr; 1], u64, u64) {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let a = Executor::start(&cluster, "exec-a", 8);
    let b = Executor::start(&cluster, "exec-b", 8);
    wait_for_executors(&cluster, &via, 2);
    let id = submit_sleep(&cluster, &via, 4, 120_000);
    let before = wait_state(&cluster, &via, id, "Running", Duration::from_secs(10));
    let epoch = before["epoch"].as_u64().unwrap();
    (cluster, a, b, via, id, epoch)
}

#[test]
fn t02_killed_executor_tasks_move_within_ttl_plus_one_second() {
    let (cluster, mut a, b, via, id, epoch) = sleep_job_on_two_executors();
    // Kill whichever executor runs tasks (the scheduler spreads, so both do).
    let killed_at = Instant::now();
    a.kill();
    let r = wait_until(
        "the job runs again on the survivor under a new epoch",
        Duration::from_secs(10),
        || {
            let j = job(&cluster, &via, id)?;
            if j["state"] == "Running" && j["epoch"].as_u64().unwrap_or(0) > epoch {
                Ok(())
            } else {
                Err(j.to_string())
            }
        },
    );
    cluster.unwrap_or_dump(r);
    let took = killed_at.elapsed();
    // TTL 1.5 s + 1 s.
    assert!(took < Duration::from_millis(2500), "recovery took {took:?}");
    let execs = executors(&cluster, &via).unwrap();
    let survivor = at(&execs, b.addr);
    assert_eq!(survivor["used"], 4, "{execs:?}");
    let lost = at(&execs, a.addr);
    assert_eq!(lost["state"], "lost", "{execs:?}");
    assert_eq!(
        lost["lost_reason"], "heartbeats stopped for longer than the TTL",
        "{execs:?}"
    );
    let history = job(&cluster, &via, id).unwrap()["history"].to_string();
    assert!(history.contains("Recovering"), "{history}");
}

/// An executor stopped with SIGTERM leaves the cluster on its way out: its tasks move at once,
/// and the failures its stopping tasks cause on the other executor do not count as restarts.
#[test]
fn t02b_an_executor_that_shuts_down_leaves_and_its_tasks_move_without_a_restart() {
    let (cluster, mut a, b, via, id, epoch) = sleep_job_on_two_executors();
    a.signal("TERM");
    let r = wait_until("exec-a exits", Duration::from_secs(10), || {
        a.exit_status().ok_or_else(|| "still running".to_string())
    });
    let status = cluster.unwrap_or_dump(r);
    assert!(status.success(), "{status:?}\n{}", a.log_text());
    assert!(
        a.log_text().contains("left the cluster"),
        "{}",
        a.log_text()
    );
    let r = wait_until(
        "the job runs again on the survivor under a new epoch",
        Duration::from_secs(10),
        || {
            let j = job(&cluster, &via, id)?;
            if j["state"] == "Running" && j["epoch"].as_u64().unwrap_or(0) > epoch {
                Ok(j)
            } else {
                Err(j.to_string())
            }
        },
    );
    let j = cluster.unwrap_or_dump(r);
    let execs = executors(&cluster, &via).unwrap();
    let left = at(&execs, a.addr);
    assert_eq!(left["state"], "lost", "{execs:?}");
    assert_eq!(
        left["lost_reason"], "shut down: it left the cluster",
        "{execs:?}"
    );
    let survivor = at(&execs, b.addr);
    assert_eq!(survivor["used"], 4, "{execs:?}");
    let history = j["history"].to_string();
    assert!(
        history.contains("lost; placing its tasks again"),
        "{history}"
    );
    assert!(
        !history.contains("restarting the job"),
        "a shutdown counted as a restart: {history}"
    );
    assert_eq!(
        (j["restarts"].as_u64(), j["recent_restarts"].as_u64()),
        (Some(0), Some(0)),
        "{j}"
    );
}

#[test]
fn t03_leader_loss_restarts_no_task() {
    let mut cluster = Cluster::bootstrap(3);
    let leader = cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(10));
    let all: Vec<SocketAddr> = (1..=3).map(|i| cluster.addr(i)).collect();
    let _a = Executor::start(&cluster, "exec-a", 8);
    let _b = Executor::start(&cluster, "exec-b", 8);
    wait_for_executors(&cluster, &all, 2);
    let id = submit_sleep(&cluster, &all, 4, 120_000);
    let before = wait_state(&cluster, &all, id, "Running", Duration::from_secs(10));
    cluster.kill(leader);
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    cluster.wait_for_leader(&survivors, Duration::from_secs(10));
    let via: Vec<SocketAddr> = survivors.iter().map(|i| cluster.addr(*i)).collect();
    // Give the new leader more than a TTL to (wrongly) declare anything lost.
    std::thread::sleep(Duration::from_millis(2500));
    let after = wait_state(&cluster, &via, id, "Running", Duration::from_secs(5));
    assert_eq!(
        after["epoch"], before["epoch"],
        "tasks were restarted: {after}"
    );
    let execs = executors(&cluster, &via).unwrap();
    assert!(execs.iter().all(|e| e["state"] == "alive"), "{execs:?}");
}

#[test]
fn t04_paused_executor_is_fenced_and_reregisters() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let a = Executor::start(&cluster, "exec-a", 8);
    let _b = Executor::start(&cluster, "exec-b", 8);
    wait_for_executors(&cluster, &via, 2);
    let id = submit_sleep(&cluster, &via, 4, 120_000);
    let before = wait_state(&cluster, &via, id, "Running", Duration::from_secs(10));
    let epoch = before["epoch"].as_u64().unwrap();
    a.signal("STOP");
    let r = wait_until(
        "the stopped executor is lost and its tasks moved",
        Duration::from_secs(10),
        || {
            let j = job(&cluster, &via, id)?;
            let execs = executors(&cluster, &via)?;
            let stopped_lost = execs
                .iter()
                .any(|e| e["addr"] == a.addr.to_string() && e["state"] == "lost");
            if stopped_lost && j["state"] == "Running" && j["epoch"].as_u64().unwrap_or(0) > epoch {
                Ok(())
            } else {
                Err(format!("{j} {execs:?}"))
            }
        },
    );
    cluster.unwrap_or_dump(r);
    a.signal("CONT");
    let r = wait_until(
        "the woken executor registers as a new incarnation",
        Duration::from_secs(10),
        || {
            let execs = executors(&cluster, &via)?;
            execs
                .iter()
                .find(|e| {
                    e["addr"] == a.addr.to_string()
                        && e["state"] == "alive"
                        && e["incarnation"] == 2
                })
                .map(|_| ())
                .ok_or_else(|| format!("{execs:?}"))
        },
    );
    cluster.unwrap_or_dump(r);
    let log = a.log_text();
    assert!(
        log.contains("registering again"),
        "the stale executor was not told to re-register:\n{log}"
    );
    // The job was not disturbed by the zombie.
    let j = wait_state(&cluster, &via, id, "Running", Duration::from_secs(5));
    assert!(j["epoch"].as_u64().unwrap() > epoch);
}

#[test]
fn t05_pause_resume_cancel_and_capacity_is_released() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let _a = Executor::start(&cluster, "exec-a", 4);
    let id = submit_sleep(&cluster, &via, 4, 120_000);
    wait_state(&cluster, &via, id, "Running", Duration::from_secs(10));
    let second = submit_sleep(&cluster, &via, 2, 1_000);
    wait_state(&cluster, &via, second, "Pending", Duration::from_secs(5));
    for (cmd, state) in [("pause", "Paused"), ("resume", "Running")] {
        let out = cluster.client(&["job", cmd, &id.to_string()], &via);
        assert!(out.success(), "{out}");
        wait_state(&cluster, &via, id, state, Duration::from_secs(5));
    }
    let out = cluster.client(&["job", "resume", &id.to_string()], &via);
    assert!(
        out.success(),
        "resuming a running job is not an error: {out}"
    );
    let out = cluster.client(&["job", "cancel", &id.to_string()], &via);
    assert!(out.success(), "{out}");
    wait_state(&cluster, &via, id, "Cancelled", Duration::from_secs(5));
    // The freed slots let the waiting job run to its end.
    wait_state(&cluster, &via, second, "Finished", Duration::from_secs(15));
    let execs = executors(&cluster, &via).unwrap();
    assert_eq!(execs[0]["used"], 0, "{execs:?}");
    let out = cluster.client(&["job", "pause", &id.to_string()], &via);
    assert!(!out.success());
    assert!(out.stderr.contains("Cancelled"), "{out}");
}

#[test]
fn t06_bad_job_specs_are_refused_and_change_nothing() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let cases = [
        ("demo", "table-num = 0\n", "table-num"),
        ("demo", "binlog-num = -2\n", "binlog-num"),
        ("demo", "rcd-cnt = \"many\"\n", "rcd-cnt"),
        ("demo", "tables = 3\n", "tables"),
        ("sleep", "tasks = 0\nduration-ms = 5\n", "tasks"),
        ("nosuch", "", "unknown job type"),
    ];
    for (i, (ty, text, expect)) in cases.iter().enumerate() {
        let spec = write_spec(&cluster, &format!("bad-{i}.toml"), text);
        let out = cluster.client(&["submit-job", "--type", ty, "--config", &spec], &via);
        assert!(!out.success(), "{ty} spec {text:?} was accepted: {out}");
        assert!(
            out.stderr.contains(expect),
            "{ty} spec {text:?}: expected {expect:?} in {out}"
        );
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "not a one-line error: {out}"
        );
    }
    let out = cluster.client(&["job", "status", "999"], &via);
    assert!(
        !out.success() && out.stderr.contains("unknown job id 999"),
        "{out}"
    );
    assert_eq!(cluster.job_ids(&via).unwrap(), Vec::<u64>::new());
}

#[test]
fn t07_an_executor_whose_address_is_taken_exits_with_an_error_naming_it() {
    let cluster = Cluster::bootstrap(1);
    // Hold the UDP port the executor is told to use.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = common::cli_with_timeout(
        [
            "executor".to_string(),
            "--listen-addr".into(),
            addr.to_string(),
            "--masters".into(),
            cluster.addr(1).to_string(),
            "--certs-dir".into(),
            cluster.certs.to_string_lossy().into_owned(),
        ],
        Duration::from_secs(15),
    );
    assert!(!out.timed_out(), "the executor kept running: {out}");
    assert!(!out.success(), "the executor exited 0: {out}");
    assert!(
        out.stderr.contains(&addr.to_string()) && !out.stderr.contains("panicked"),
        "expected a clean error naming {addr}: {out}"
    );
    drop(taken);
}

#[test]
fn t08_an_executor_heartbeats_at_the_interval_the_leader_gives_it() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    // Its own settings would have it heartbeat every 4 s; the masters declare an executor
    // lost after 1.5 s without one (their default TTL).
    let a = Executor::start_with(
        &cluster,
        "exec-a",
        2,
        &["--heartbeat-ms", "4000", "--ttl-ms", "12000"],
    );
    let r = wait_until(
        "the executor to register",
        Duration::from_secs(10),
        || match executors(&cluster, &via)?.as_slice() {
            [e] if e["state"] == "alive" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    cluster.unwrap_or_dump(r);
    let watch_until = std::time::Instant::now() + Duration::from_millis(4500);
    while std::time::Instant::now() < watch_until {
        let execs = executors(&cluster, &via).unwrap();
        assert!(
            execs.iter().all(|e| e["state"] == "alive"),
            "the executor was declared lost: {execs:?}\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = a.log_text();
    assert!(
        log.contains("using the leader's heartbeat interval and TTL"),
        "{log}"
    );
}

/// Replaces the value after `flag` in master `id`'s flags (used by its next restart).
fn set_master_flag(cluster: &mut Cluster, id: u64, flag: &str, value: &str) {
    let args = &mut cluster.node(id).args;
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("master {id} has no {flag}"));
    args[at + 1] = value.into();
}

#[test]
fn t09_an_executor_takes_a_new_leaders_heartbeat_interval_without_being_lost() {
    let mut cluster = Cluster::empty(Default::default());
    let addr = common::free_udp_addr();
    let flags = [
        "--initial-members",
        &format!("1={addr}"),
        "--executor-heartbeat-ms",
        "1000",
        "--executor-ttl-ms",
        "20000",
    ]
    .map(String::from);
    cluster.spawn_master(1, addr, &flags);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [addr];
    // The executor's own settings are the defaults (250 ms / 1.5 s); the leader has it
    // heartbeat every 1 s, and every 2 s while it runs nothing.
    let a = Executor::start(&cluster, "exec-a", 2);
    let alive = |cluster: &Cluster| match executors(cluster, &via)?.as_slice() {
        [e] if e["state"] == "alive" => Ok(e["incarnation"].clone()),
        other => Err(format!("{other:?}")),
    };
    let r = wait_until("the executor to register", Duration::from_secs(10), || {
        alive(&cluster)
    });
    let first = cluster.unwrap_or_dump(r);
    // The master comes back as a leader that declares an executor lost after 1.5 s. It is
    // down for longer than the executor's heartbeat interval, so a heartbeat is retrying
    // when it returns and is answered at once. An executor that kept its 2 s interval after
    // that answer would be declared lost.
    cluster.kill(1);
    std::thread::sleep(Duration::from_millis(2500));
    set_master_flag(&mut cluster, 1, "--executor-heartbeat-ms", "250");
    set_master_flag(&mut cluster, 1, "--executor-ttl-ms", "1500");
    cluster.restart(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        match alive(&cluster) {
            Ok(incarnation) => assert_eq!(
                incarnation,
                first,
                "the executor registered again\n{}",
                a.log_text()
            ),
            Err(e) => panic!(
                "the executor was declared lost: {e}\n{}\n{}",
                a.log_text(),
                cluster.node(1).log_tail(40)
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = a.log_text();
    assert!(
        log.contains("the leader expects another heartbeat interval and TTL"),
        "{log}"
    );
}

#[test]
fn t10_a_leader_cut_off_from_the_other_masters_stops_serving_executors() {
    let mut cluster = Cluster::bootstrap(3);
    let leader = cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(10));
    let all: Vec<SocketAddr> = (1..=3).map(|i| cluster.addr(i)).collect();
    let a = Executor::start(&cluster, "exec-a", 8);
    wait_for_executors(&cluster, &all, 1);
    let id = submit_sleep(&cluster, &all, 2, 120_000);
    let before = wait_state(&cluster, &all, id, "Running", Duration::from_secs(10));
    // Freeze both followers: the leader still runs and the executor still reaches it, but
    // it no longer hears from a quorum. It must stop answering heartbeats (the others could
    // have elected a leader that moved the work).
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    for f in &followers {
        cluster.node(*f).signal("STOP");
    }
    let r = wait_until(
        "the executor is told the leader lost its quorum",
        Duration::from_secs(10),
        || {
            let log = a.log_text();
            if log.contains("has not heard from a quorum") {
                Ok(())
            } else {
                Err(common::tail(&log, 10))
            }
        },
    );
    if r.is_ok() {
        // Stay cut off for longer than the executor TTL: the leader, which refuses the
        // heartbeats, must not count the executor lost for their absence either.
        std::thread::sleep(Duration::from_millis(2000));
    }
    for f in &followers {
        cluster.node(*f).signal("CONT");
    }
    cluster.unwrap_or_dump(r);
    // Once the masters are back, the job carries on where it was, on the same executor.
    cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(10));
    let r = wait_until(
        "the executor is alive again and the job still runs",
        Duration::from_secs(10),
        || {
            let j = job(&cluster, &all, id)?;
            let execs = executors(&cluster, &all)?;
            let alive = execs.iter().any(|e| e["state"] == "alive");
            if alive && j["state"] == "Running" {
                Ok((j, execs))
            } else {
                Err(format!("{j} {execs:?}"))
            }
        },
    );
    let (after, execs) = cluster.unwrap_or_dump(r);
    assert_eq!(
        after["epoch"], before["epoch"],
        "the job was restarted: {after}"
    );
    assert!(
        execs
            .iter()
            .all(|e| e["state"] == "alive" && e["incarnation"] == 1),
        "the executor was declared lost: {execs:?}"
    );
}
