//! Faults during a running demo job: the output must still hold every record exactly once
//! with the barrier intact (the verifier passes), whatever dies and whenever. Where a
//! checkpoint had completed before the fault, the restarted attempt must resume from it
//! (not from scratch), and a leader change must not stop checkpoints from completing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::exec::Executor;
use common::jobs::{job, wait_state};
use common::{Cluster, wait_until};

/// 4 tables x 20,000 records at 20,000 records/s: about four seconds of work, with a
/// checkpoint every 200 ms (rather than the default 1 s) so that most faults find one to
/// resume from.
fn spec(cluster: &Cluster) -> (String, String) {
    let sink = cluster.dir.path().join("sink");
    let text = format!(
        "flow-id = \"rec\"\ntable-num = 4\nbinlog-num = 2\nrcd-cnt = 20000\nddl-freq = 500\nrate = 20000\ncheckpoint-interval-ms = 200\nsink-dir = \"{}\"\n",
        sink.display()
    );
    let path = cluster.dir.path().join("rec.toml");
    std::fs::write(&path, text).unwrap();
    (
        path.to_string_lossy().into_owned(),
        sink.join("rec").to_string_lossy().into_owned(),
    )
}

/// Executors that run tasks now, by data-plane address.
fn busy(cluster: &Cluster, via: &[SocketAddr]) -> Vec<String> {
    let executors = cluster.unwrap_or_dump(common::jobs::executors(cluster, via));
    executors
        .iter()
        .filter(|e| e["state"] == "alive" && e["used"].as_u64().unwrap_or(0) > 0)
        .map(|e| e["addr"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A small deterministic generator for the fault schedule.
fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    }
}

fn kill_random_executor(seed: u64) {
    let mut rand = lcg(seed);
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let mut executors: Vec<Executor> = (0..3)
        .map(|i| Executor::start(&cluster, &format!("exec-{i}"), 64))
        .collect();
    common::jobs::wait_for_executors(&cluster, &via, 3);
    let (spec, out) = spec(&cluster);
    let id = common::jobs::submit(&cluster, &via, &spec, &[]);
    wait_state(&cluster, &via, id, "Running", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(100 + rand() % 2500));
    let busy = busy(&cluster, &via);
    let candidates: Vec<usize> = (0..executors.len())
        .filter(|i| busy.contains(&executors[*i].addr.to_string()))
        .collect();
    // The job runs about 4 s and the kill comes at most 2.6 s in: someone is busy.
    assert!(!candidates.is_empty(), "no executor runs tasks: {busy:?}");
    let before = job(&cluster, &via, id).unwrap();
    let committed_before_kill = before["checkpoint"]["id"].as_u64();
    let victim = candidates[(rand() as usize) % candidates.len()];
    executors[victim].kill();
    let j = wait_state(&cluster, &via, id, "Finished", Duration::from_secs(60));
    assert!(
        j["epoch"].as_u64().unwrap() > 1,
        "killing a busy executor restarted nothing: {j}"
    );
    eprintln!(
        "checkpoint before the kill: {committed_before_kill:?}; final epoch {}, resumed from {}",
        j["epoch"], j["restored_from"]
    );
    if let Some(committed) = committed_before_kill
        && j["epoch"].as_u64().unwrap() > 1
    {
        let resumed = j["restored_from"].as_u64();
        assert!(
            resumed.is_some_and(|r| r >= committed),
            "checkpoint {committed} was committed before the kill, yet the new attempt resumed from {resumed:?}: {j}"
        );
    }
    common::jobs::verify_demo(&spec, &out, 80000);
}

#[test]
fn kill_random_executor_seed_1() {
    kill_random_executor(1);
}

#[test]
fn kill_random_executor_seed_2() {
    kill_random_executor(2);
}

#[test]
fn kill_random_executor_seed_3() {
    kill_random_executor(3);
}

#[test]
fn kill_leader_master_mid_job() {
    let mut cluster = Cluster::bootstrap(3);
    let leader = cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(10));
    let all: Vec<SocketAddr> = (1..=3).map(|i| cluster.addr(i)).collect();
    let _a = Executor::start(&cluster, "exec-a", 64);
    let _b = Executor::start(&cluster, "exec-b", 64);
    common::jobs::wait_for_executors(&cluster, &all, 2);
    let (spec, out) = spec(&cluster);
    let id = common::jobs::submit(&cluster, &all, &spec, &[]);
    let before = wait_state(&cluster, &all, id, "Running", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(800));
    let committed = job(&cluster, &all, id).unwrap()["checkpoint"]["id"]
        .as_u64()
        .unwrap_or(0);
    cluster.kill(leader);
    let via: Vec<SocketAddr> = (1..=3)
        .filter(|i| *i != leader)
        .map(|i| cluster.addr(i))
        .collect();
    // Checkpoints keep completing under the new leader while the job runs.
    let r = wait_until(
        "a checkpoint completes under the new leader",
        Duration::from_secs(20),
        || {
            let j = job(&cluster, &via, id)?;
            match j["checkpoint"]["id"].as_u64() {
                Some(c) if c > committed => Ok(()),
                _ if j["state"] == "Finished" => Err(format!("finished first: {j}")),
                _ => Err(j.to_string()),
            }
        },
    );
    cluster.unwrap_or_dump(r);
    let j = wait_state(&cluster, &via, id, "Finished", Duration::from_secs(60));
    assert_eq!(
        j["epoch"], before["epoch"],
        "the leader change restarted the job: {j}"
    );
    common::jobs::verify_demo(&spec, &out, 80000);
}

#[test]
fn paused_executor_is_replaced_and_its_stale_output_is_fenced() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let executors: Vec<Executor> = (0..3)
        .map(|i| Executor::start(&cluster, &format!("exec-{i}"), 64))
        .collect();
    common::jobs::wait_for_executors(&cluster, &via, 3);
    let (spec, out) = spec(&cluster);
    let id = common::jobs::submit(&cluster, &via, &spec, &[]);
    let before = wait_state(&cluster, &via, id, "Running", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(700));
    let busy = busy(&cluster, &via);
    // Pause the first executor that runs tasks.
    let victim = executors
        .iter()
        .find(|e| busy.contains(&e.addr.to_string()))
        .expect("a busy executor");
    victim.signal("STOP");
    let r = wait_until(
        "the job recovers without the paused executor",
        Duration::from_secs(20),
        || {
            let j = job(&cluster, &via, id)?;
            if j["epoch"].as_u64().unwrap_or(0) > before["epoch"].as_u64().unwrap_or(0) {
                Ok(())
            } else {
                Err(j.to_string())
            }
        },
    );
    cluster.unwrap_or_dump(r);
    std::thread::sleep(Duration::from_millis(500));
    victim.signal("CONT");
    wait_state(&cluster, &via, id, "Finished", Duration::from_secs(60));
    // Let the woken executor act on whatever it still had before checking the files.
    std::thread::sleep(Duration::from_millis(1000));
    common::jobs::verify_demo(&spec, &out, 80000);
}

#[test]
fn rolling_restart_of_every_master_mid_job() {
    let mut cluster = Cluster::bootstrap(3);
    cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(10));
    let all: Vec<SocketAddr> = (1..=3).map(|i| cluster.addr(i)).collect();
    let _a = Executor::start(&cluster, "exec-a", 64);
    let _b = Executor::start(&cluster, "exec-b", 64);
    common::jobs::wait_for_executors(&cluster, &all, 2);
    let (spec, out) = spec(&cluster);
    let id = common::jobs::submit(&cluster, &all, &spec, &[]);
    wait_state(&cluster, &all, id, "Running", Duration::from_secs(20));
    for m in 1..=3 {
        cluster.restart(m);
        cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(15));
    }
    wait_state(&cluster, &all, id, "Finished", Duration::from_secs(60));
    common::jobs::verify_demo(&spec, &out, 80000);
}

/// Full speed on two cores (rate 0, every record crossing QUIC): the executors are busy but
/// their heartbeats still arrive, so nobody is declared lost and the job never restarts.
#[test]
fn full_load_is_not_mistaken_for_a_lost_executor() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let _a = Executor::start(&cluster, "exec-a", 64);
    let _b = Executor::start(&cluster, "exec-b", 64);
    common::jobs::wait_for_executors(&cluster, &via, 2);
    let sink = cluster.dir.path().join("sink");
    let spec = cluster.dir.path().join("full.toml");
    std::fs::write(
        &spec,
        format!(
            "flow-id = \"full\"\ntable-num = 10\nbinlog-num = 4\nrcd-cnt = 30000\nddl-freq = 1000\nrate = 0\nsink-dir = \"{}\"\n",
            sink.display()
        ),
    )
    .unwrap();
    let spec = spec.to_string_lossy().into_owned();
    let id = common::jobs::submit(&cluster, &via, &spec, &[]);
    let j = wait_state(&cluster, &via, id, "Finished", Duration::from_secs(90));
    assert_eq!(
        j["epoch"], 1,
        "an executor was declared lost under load: {j}"
    );
    common::jobs::verify_demo(&spec, &sink.join("full").to_string_lossy(), 300_000);
}

/// The same job file submitted twice while the first job runs: both write to the same
/// `<sink-dir>/<flow-id>`. The newer job takes the files over and its output verifies; the
/// older one's sinks are refused, so it fails instead of mixing its lines in.
#[test]
fn the_same_job_submitted_twice_leaves_the_newer_jobs_output_whole() {
    let mut cluster = Cluster::bootstrap(1);
    cluster.wait_for_leader(&[1], Duration::from_secs(10));
    let via = [cluster.addr(1)];
    let _executors: Vec<Executor> = (0..2)
        .map(|i| Executor::start(&cluster, &format!("exec-{i}"), 64))
        .collect();
    common::jobs::wait_for_executors(&cluster, &via, 2);
    let (spec, out) = spec(&cluster);
    let first = common::jobs::submit(&cluster, &via, &spec, &[]);
    wait_state(&cluster, &via, first, "Running", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let second = common::jobs::submit(&cluster, &via, &spec, &[]);
    let done = wait_state(&cluster, &via, second, "Finished", Duration::from_secs(60));
    let failed = wait_state(&cluster, &via, first, "Failed", Duration::from_secs(60));
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("job {second}")),
        "the older job failed for another reason: {failed}"
    );
    eprintln!("job {second}: {done}\njob {first}: {reason}");
    common::jobs::verify_demo(&spec, &out, 80000);
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Job `id` once a checkpoint later than `slot` completed (asking `via`).
fn checkpoint_after(
    cluster: &Cluster,
    id: u64,
    what: &str,
    via: &[SocketAddr],
    slot: u64,
) -> serde_json::Value {
    let r = wait_until(what, Duration::from_secs(20), || {
        let j = job(cluster, via, id)?;
        match j["checkpoint"]["id"].as_u64() {
            Some(c) if c > slot => Ok(j),
            _ => Err(j.to_string()),
        }
    });
    cluster.unwrap_or_dump(r)
}

/// A task that finished stands in every later checkpoint of its attempt with its last state,
/// which it reports once. A new leader must get that report too, or no checkpoint of the
/// attempt completes after the leader change.
#[test]
fn checkpoints_complete_under_a_new_leader_after_a_task_finished() {
    let mut cluster = Cluster::bootstrap(3);
    let leader = cluster.wait_for_leader(&[1, 2, 3], Duration::from_secs(10));
    let all: Vec<SocketAddr> = (1..=3).map(|i| cluster.addr(i)).collect();
    let _a = Executor::start(&cluster, "exec-a", 8);
    common::jobs::wait_for_executors(&cluster, &all, 1);
    // Task 0 sleeps 200 ms, task 1 a minute; a checkpoint every 100 ms of Unix time, its id
    // being the number of 100 ms since the epoch.
    let spec = cluster.dir.path().join("sleep.toml");
    std::fs::write(
        &spec,
        "tasks = 2\nduration-ms = 200\nstagger-ms = 60000\ncheckpoint-interval-ms = 100\n",
    )
    .unwrap();
    let spec = spec.to_string_lossy().into_owned();
    let id = common::jobs::submit(&cluster, &all, &spec, &["--type", "sleep"]);
    wait_state(&cluster, &all, id, "Running", Duration::from_secs(20));
    // A checkpoint taken a second after the job ran: task 0 had finished by then.
    checkpoint_after(
        &cluster,
        id,
        "a checkpoint completes after task 0 finished",
        &all,
        (unix_ms() + 1000) / 100,
    );
    cluster.kill(leader);
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    cluster.wait_for_leader(&survivors, Duration::from_secs(10));
    let via: Vec<SocketAddr> = survivors.iter().map(|i| cluster.addr(*i)).collect();
    // A checkpoint taken after the new leader was elected: the old one committed none of
    // them, so the new one did, with task 0's last report sent to it again.
    let j = checkpoint_after(
        &cluster,
        id,
        "a checkpoint completes under the new leader",
        &via,
        unix_ms() / 100,
    );
    assert_eq!(j["state"], "Running", "{j}");
    assert_eq!(j["epoch"], 1, "the leader change restarted the job: {j}");
}
