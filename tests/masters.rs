//! The HA masters run as real `microcosm master` processes on loopback (issue 4).
//!
//! Each test starts its own masters on free UDP ports in a temporary directory and drives
//! them through the `microcosm` CLI (`cluster status`, `submit-job`, `job list`): bootstrap
//! and leader election, writes through a follower, leader failover after SIGKILL, loss of
//! quorum, a master joining a running cluster, a full restart from the data dirs, refused bad
//! configurations, and the example configs in `config/`. Timings (failover, rejoin) and polls
//! while masters are down use the harness's in-process status probe, which asks one master
//! only; `cluster status` waits up to 3 s for every unreachable member.
//!
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Cluster, ClusterOptions, Node, cli_with_timeout, free_udp_addr, init_certs, wait_until,
};
use microcosm_control::master::MasterConfig;

/// Deadline for a new cluster to elect a leader everybody agrees on.
const ELECTION: Duration = Duration::from_secs(15);
/// Deadline for a committed write to show up on every master.
const REPLICATION: Duration = Duration::from_secs(10);
/// A leader killed with SIGKILL must be replaced within this long.
const FAILOVER_BOUND: Duration = Duration::from_secs(2);
/// A master restarted at once must be back in an agreed cluster within this long.
const REJOIN_BOUND: Duration = Duration::from_secs(3);
/// A write without quorum must fail within this long (the CLI's patience is 6 s).
const NO_QUORUM_BOUND: Duration = Duration::from_secs(15);

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// A master other than `leader` among `ids`.
fn follower_of(leader: u64, ids: &[u64]) -> u64 {
    *ids.iter().find(|id| **id != leader).expect("a follower")
}

#[test]
fn t01_three_masters_elect_one_leader_and_accept_writes_through_a_follower() {
    let mut c = Cluster::bootstrap(3);
    c.wait_for_leader(&[1, 2, 3], ELECTION);

    // `cluster status`, asked of each master on its own, shows the same three reachable voters:
    // one leader and two followers.
    let result = wait_until(
        "every master shows 1 leader + 2 followers",
        ELECTION,
        || {
            let mut agreed = None;
            for id in [1, 2, 3] {
                let s = c.status(&[c.addr(id)])?;
                let leader = s.single_leader()?;
                let mut ids: Vec<u64> = s.masters.iter().map(|m| m.id).collect();
                ids.sort_unstable();
                let roles_ok = s.masters.iter().all(|m| {
                    let want = if m.id == leader { "leader" } else { "follower" };
                    m.voter && m.reachable && m.role.as_deref() == Some(want)
                });
                if ids != [1, 2, 3] || !roles_ok || agreed.is_some_and(|l| l != leader) {
                    return Err(format!(
                        "master {id} shows {s} (others saw leader {agreed:?})"
                    ));
                }
                agreed = Some(leader);
            }
            Ok(agreed.unwrap())
        },
    );
    let leader = c.unwrap_or_dump(result);

    // A write sent only to a follower is forwarded to the leader and committed.
    let follower = follower_of(leader, &[1, 2, 3]);
    let job = c.submit_job_ok(&[c.addr(follower)]);

    // Every master lists it (followers apply it shortly after the commit).
    for id in [1, 2, 3] {
        let listed = c.wait_for_jobs_on(id, &[job], REPLICATION);
        assert_eq!(listed, [job], "master {id} lists {listed:?}");
    }
}

#[test]
fn t02_a_killed_leader_is_replaced_within_two_seconds_without_losing_writes() {
    let mut c = Cluster::bootstrap(3);
    let old = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let before = c.submit_job_ok(&[c.addr(old)]);
    for id in [1, 2, 3] {
        c.wait_for_jobs_on(id, &[before], REPLICATION);
    }
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
    let via: Vec<_> = survivors.iter().map(|id| c.addr(*id)).collect();

    // Measured from just before SIGKILL to the first moment both survivors, asked directly,
    // agree on a new leader. (`cluster status` cannot time this: it waits up to its 3 s connect
    // timeout for the dead master before it prints anything.)
    let killed_at = Instant::now();
    c.kill(old);
    let result = wait_until("the survivors agree on a new leader", ELECTION, || match c
        .agreed_leader(&survivors)
    {
        Ok(l) if l != old => Ok(l),
        Ok(l) => Err(format!("survivors still follow the dead master {l}")),
        Err(e) => Err(e),
    });
    let failover = killed_at.elapsed();
    let new = c.unwrap_or_dump(result);
    eprintln!("failover: master {old} SIGKILLed, master {new} leads after {failover:?}");
    assert!(
        failover < FAILOVER_BOUND,
        "new leader {new} agreed {failover:?} after the leader {old} was killed (bound {FAILOVER_BOUND:?}){}",
        c.logs(30)
    );

    // `cluster status` through the survivors shows the new leader and the dead master as
    // unreachable.
    let result = wait_until("`cluster status` shows the new leader", ELECTION, || {
        let s = c.status(&via)?;
        let dead_unreachable = s.master(old).is_some_and(|m| !m.reachable);
        if s.single_leader()? == new && dead_unreachable {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
    c.unwrap_or_dump(result);

    // The write committed before the crash survived it, on both survivors.
    for id in &survivors {
        c.wait_for_jobs_on(*id, &[before], REPLICATION);
    }
    // A new write through a survivor succeeds and is replicated to the other survivor.
    let after = c.submit_job_ok(&via);
    assert!(after > before, "job id {after} not above {before}");
    for id in &survivors {
        c.wait_for_jobs_on(*id, &[before, after], REPLICATION);
    }
}

/// Submits through `via`, which cannot reach a quorum: the command must fail, with a message,
/// within a bounded time. Returns its stderr.
fn submit_without_quorum(c: &Cluster, via: &[std::net::SocketAddr]) -> String {
    let out = c.submit_job_with_timeout(via, Duration::from_secs(30));
    assert!(
        !out.timed_out(),
        "submit-job hung without quorum: {out}{}",
        c.logs(20)
    );
    assert!(!out.success(), "submit-job succeeded without quorum: {out}");
    assert!(
        out.elapsed < NO_QUORUM_BOUND,
        "submit-job took {:?} to fail without quorum (bound {NO_QUORUM_BOUND:?}): {out}",
        out.elapsed
    );
    assert!(
        out.stderr.contains("error:") && out.stdout.trim().is_empty(),
        "submit-job without quorum should fail with an error message and print no job id: {out}"
    );
    eprintln!(
        "no-quorum submit-job failed after {:?}: {}",
        out.elapsed,
        out.stderr.trim()
    );
    out.stderr
}

#[test]
fn t03_without_quorum_a_follower_refuses_writes_until_a_master_returns() {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let before = c.submit_job_ok(&[c.addr(leader)]);

    // The leader and one follower die; the remaining follower finds no leader.
    let survivor = follower_of(leader, &[1, 2, 3]);
    let third = 6 - leader - survivor;
    c.kill(leader);
    c.kill(third);
    submit_without_quorum(&c, &[c.addr(survivor)]);
    // Reads of the applied state still work on the survivor, and say they may be stale.
    let listed = c.unwrap_or_dump(c.job_ids(&[c.addr(survivor)]));
    assert!(listed.contains(&before), "survivor lists {listed:?}");
    let out = c.client(&["job", "list"], &[c.addr(survivor)]);
    assert!(out.success(), "{out}");
    assert!(
        out.stderr.contains("warning: no leader"),
        "a read without quorum does not say so: {out}"
    );
    // And so does the JSON output, for scripts.
    let out = c.client(&["job", "list", "--output", "json"], &[c.addr(survivor)]);
    let jobs = c.unwrap_or_dump(out.json());
    let first = &jobs.as_array().expect("a list of jobs")[0];
    assert!(
        first["stale"]
            .as_str()
            .is_some_and(|w| w.contains("no leader")),
        "{jobs}"
    );

    // The old leader comes back from its data dir (same flags, so it must not re-bootstrap):
    // quorum again, writes work.
    c.restart(leader);
    let pair = [survivor, leader];
    c.wait_for_leader(&pair, ELECTION);
    let via: Vec<_> = pair.iter().map(|id| c.addr(*id)).collect();
    let after = c.submit_job_ok(&via);
    assert!(after > before, "job id {after} not above {before}");
    for id in pair {
        c.wait_for_jobs_on(id, &[before, after], REPLICATION);
    }
}

#[test]
fn t03c_without_quorum_a_lone_leader_refuses_writes_until_a_master_returns() {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let before = c.submit_job_ok(&[c.addr(leader)]);

    // Both followers die; the leader is alone and cannot commit.
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    for id in &followers {
        c.kill(*id);
    }
    submit_without_quorum(&c, &[c.addr(leader)]);

    // One follower returns from its data dir: quorum again, writes work on both.
    c.restart(followers[0]);
    let pair = [leader, followers[0]];
    c.wait_for_leader(&pair, ELECTION);
    let via: Vec<_> = pair.iter().map(|id| c.addr(*id)).collect();
    let after = c.submit_job_ok(&via);
    assert!(after > before, "job id {after} not above {before}");
    for id in pair {
        c.wait_for_jobs_on(id, &[before, after], REPLICATION);
    }
}

#[test]
fn t03b_a_write_without_quorum_is_reported_as_no_quorum() {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let follower = follower_of(leader, &[1, 2, 3]);
    // The leader stays, alone: it answers every write with "no quorum" after its write timeout.
    for id in [1, 2, 3] {
        if id != leader {
            c.kill(id);
        }
    }
    let stderr = submit_without_quorum(&c, &[c.addr(leader)]);
    assert!(
        stderr.to_lowercase().contains("no quorum"),
        "the leader answered \"no quorum\" but the CLI says: {stderr}"
    );
    assert!(
        !stderr.contains("unreachable"),
        "a reachable master is reported as unreachable: {stderr}"
    );
    // Same through the remaining follower, after the leader is gone too.
    c.restart(follower);
    c.wait_for_leader(&[leader, follower], ELECTION);
    c.kill(leader);
    let stderr = submit_without_quorum(&c, &[c.addr(follower)]);
    assert!(stderr.to_lowercase().contains("no quorum"), "{stderr}");
}

#[test]
fn t04_a_fourth_master_joins_a_running_cluster_as_a_voter() {
    let mut c = Cluster::bootstrap(3);
    c.wait_for_leader(&[1, 2, 3], ELECTION);
    let job = c.submit_job_ok(&[c.addr(1)]);

    c.join(4);
    let all = [1, 2, 3, 4];
    let result = wait_until("master 4 is a reachable voter", ELECTION, || {
        c.assert_running(&all);
        let s = c.status(&[c.addr(1)])?;
        let ids: Vec<u64> = s.masters.iter().map(|m| m.id).collect();
        let four = s
            .master(4)
            .ok_or_else(|| format!("master 4 not listed: {s}"))?;
        if ids.len() == 4 && four.voter && four.reachable && s.masters.iter().all(|m| m.voter) {
            Ok(s)
        } else {
            Err(format!("{s}"))
        }
    });
    c.unwrap_or_dump(result);
    let leader = c.wait_for_leader_cli(&all, ELECTION);
    // The new master asked on its own sees the same four voters.
    let s = c.unwrap_or_dump(c.status(&[c.addr(4)]));
    assert_eq!(s.leader, Some(leader), "{s}");
    assert_eq!(s.masters.len(), 4, "{s}");
    assert!(s.masters.iter().all(|m| m.voter), "{s}");

    // It caught up with the state written before it joined, and receives new writes.
    c.wait_for_jobs_on(4, &[job], REPLICATION);
    let after = c.submit_job_ok(&[c.addr(4)]);
    for id in all {
        c.wait_for_jobs_on(id, &[job, after], REPLICATION);
    }
}

/// A voter whose data dir was lost may not come back under its id: with an empty log it
/// could help elect a leader that lacks committed entries. Its join is refused at once,
/// naming the way out, and the cluster goes on.
#[test]
fn t04b_a_voter_whose_data_dir_was_lost_cannot_join_again_under_its_id() {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let lost = if leader == 3 { 2 } else { 3 };
    let addr = c.addr(lost);
    // Once the cluster has its data dir on record, which a master of a new one is refused.
    let r = wait_until("the master's data dir is on record", ELECTION, || {
        let log = c.node(lost).log_text();
        if log.contains("the cluster has this master's address and data dir on record") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    c.unwrap_or_dump(r);
    c.lose(lost);
    // At its old address, where the leader still sends it entries as a voter.
    let via = common::join_addrs(&c.running_addrs());
    c.spawn_master(lost, addr, &["--join".into(), via]);
    let r = wait_until("the rejoining master exits", ELECTION, || {
        c.node(lost)
            .exit_status()
            .ok_or_else(|| "still running".to_string())
    });
    let status = c.unwrap_or_dump(r);
    assert!(!status.success(), "{status:?}");
    let log = c.node(lost).log_text();
    assert!(
        log.contains(&format!(
            "master {lost} is already a voter of this cluster with another data dir"
        )) && log.contains("must join under a new node-id"),
        "{log}"
    );
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != lost).collect();
    c.wait_for_leader(&survivors, ELECTION);
    c.submit_job_ok(&[c.addr(leader)]);
}

/// A master whose timing settings differ from the cluster's is refused at its join, naming
/// the setting: executors keep one leader's heartbeat interval until the next answers, and
/// the TTL's margin over a partitioned leader holds only if every master agrees.
#[test]
fn t04c_a_master_with_other_timing_settings_cannot_join() {
    let mut c = Cluster::bootstrap(1);
    c.wait_for_leader(&[1], ELECTION);
    let via = common::join_addrs(&c.running_addrs());
    let addr = common::free_udp_addr();
    c.spawn_master(
        2,
        addr,
        &[
            "--join".into(),
            via,
            "--executor-ttl-ms".into(),
            "3000".into(),
        ],
    );
    let r = wait_until("the joining master exits", ELECTION * 3, || {
        c.node(2)
            .exit_status()
            .ok_or_else(|| "still running".to_string())
    });
    let status = c.unwrap_or_dump(r);
    assert!(!status.success(), "{status:?}");
    let log = c.node(2).log_text();
    assert!(
        log.contains("master 2 has other timing settings than the cluster")
            && log.contains("executor-ttl-ms 3000 (the cluster's: 1500)"),
        "{log}"
    );
    let s = c.unwrap_or_dump(c.status(&[c.addr(1)]));
    assert_eq!(s.masters.len(), 1, "{s}");
}

/// Masters bootstrapped together with other timing settings all start (which one's settings
/// are wrong is not clear), but one whose settings differ from the leader's says so in its
/// log, naming the setting and both values; the others, whatever they asked of it, do not.
#[test]
fn t04f_masters_bootstrapped_with_other_timing_settings_are_told() {
    let mut c = Cluster::empty(ClusterOptions::default());
    let addrs: Vec<(u64, std::net::SocketAddr)> = (1..=3).map(|id| (id, free_udp_addr())).collect();
    let members = addrs
        .iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    // Masters 1 and 2 first: they elect one of them and record each other; master 3, with
    // another executor TTL, comes later with a log too short to lead.
    for (id, addr) in &addrs[..2] {
        c.spawn_master(*id, *addr, &["--initial-members".into(), members.clone()]);
    }
    c.wait_for_leader(&[1, 2], ELECTION);
    let (id, addr) = addrs[2];
    c.spawn_master(
        id,
        addr,
        &[
            "--initial-members".into(),
            members.clone(),
            "--executor-ttl-ms".into(),
            "3000".into(),
        ],
    );
    let r = wait_until("master 3 says its settings differ", ELECTION, || {
        c.assert_running(&[1, 2, 3]);
        let log = c.node(3).log_text();
        if log.contains("master 3 has other timing settings than the cluster")
            && log.contains("executor-ttl-ms 3000 (the cluster's: 1500)")
        {
            Ok(())
        } else {
            Err("nothing yet".to_string())
        }
    });
    c.unwrap_or_dump(r);
    for id in [1, 2] {
        let log = c.node(id).log_text();
        assert!(!log.contains("other timing settings"), "master {id}: {log}");
    }
    // Master 3 stays a member: writes go through it.
    c.submit_job_ok(&[c.addr(3)]);
}

/// A master restarted from its data dir at another address asks to have its entry updated:
/// the others reach it there, it gets the writes it missed and new ones, and it serves
/// clients as before.
#[test]
fn t04d_a_master_restarted_at_another_address_is_reached_there() {
    restarted_at_another_address(false);
}

/// The same for the leader: restarted, it is a leader of the old term until the others'
/// newer term deposes it, and what it appended as that leader is not taken as recorded.
#[test]
fn t04e_a_leader_restarted_at_another_address_is_reached_there() {
    restarted_at_another_address(true);
}

fn restarted_at_another_address(leader_moves: bool) {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let moved = match (leader_moves, leader) {
        (true, l) => l,
        (false, 3) => 2,
        (false, _) => 3,
    };
    let before = c.submit_job_ok(&[c.addr(leader)]);
    c.wait_for_jobs_on(moved, &[before], REPLICATION);
    c.kill(moved);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != moved).collect();
    let now_leading = c.wait_for_leader(&others, ELECTION);
    let missed = c.submit_job_ok(&[c.addr(now_leading)]);
    // From its data dir (no bootstrap, no join), at a new port.
    c.nodes.remove(&moved);
    let new_addr = common::free_udp_addr();
    c.spawn_master(moved, new_addr, &[]);
    let r = wait_until(
        "every master lists the moved one at its new address, reachable, a voter",
        ELECTION,
        || {
            c.assert_running(&[1, 2, 3]);
            for id in [1, 2, 3] {
                let s = c.status(&[c.addr(id)])?;
                let m = s
                    .master(moved)
                    .ok_or_else(|| format!("master {moved} not listed: {s}"))?;
                if m.addr != new_addr.to_string() || !m.reachable || !m.voter {
                    return Err(format!("as master {id} sees it: {s}"));
                }
            }
            Ok(())
        },
    );
    c.unwrap_or_dump(r);
    c.wait_for_jobs_on(moved, &[before, missed], REPLICATION);
    let after = c.submit_job_ok(&[c.addr(moved)]);
    for id in [1, 2, 3] {
        c.wait_for_jobs_on(id, &[before, missed, after], REPLICATION);
    }
}

#[test]
fn t05_all_masters_restart_from_their_data_dirs_with_state_and_id_counters() {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let via = [c.addr(leader)];
    let jobs = vec![c.submit_job_ok(&via), c.submit_job_ok(&via)];
    for id in [1, 2, 3] {
        c.wait_for_jobs_on(id, &jobs, REPLICATION);
    }

    for id in [1, 2, 3] {
        c.kill(id);
    }
    for id in [1, 2, 3] {
        c.restart(id);
    }
    c.wait_for_leader_cli(&[1, 2, 3], ELECTION);

    // Same jobs, same ids, on every master.
    for id in [1, 2, 3] {
        let listed = c.wait_for_jobs_on(id, &jobs, REPLICATION);
        assert_eq!(listed, jobs, "master {id} after restart");
    }
    // The id counter was recovered: a new job gets an id above every earlier one.
    let all: Vec<_> = [1, 2, 3].iter().map(|id| c.addr(*id)).collect();
    let next = c.submit_job_ok(&all);
    let max = jobs.iter().copied().max().unwrap();
    assert!(next > max, "job id {next} after restart is not above {max}");
    for id in [1, 2, 3] {
        c.wait_for_jobs_on(id, &[jobs[0], jobs[1], next], REPLICATION);
    }
    // Nobody re-bootstrapped: the logs say every master restarted from its data dir.
    for id in [1, 2, 3] {
        let log = c.node(id).log_text();
        assert!(
            log.contains("restarted from data dir"),
            "master {id} did not report a restart from its data dir:\n{}",
            common::tail(&log, 30)
        );
    }
}

/// Runs `microcosm master <args>` that must refuse to start: returns its stderr.
fn refused(args: &[std::ffi::OsString]) -> String {
    let mut all = vec![std::ffi::OsString::from("master")];
    all.extend(args.iter().cloned());
    let out = cli_with_timeout(all, Duration::from_secs(15));
    assert!(
        !out.timed_out(),
        "master with a bad config kept running: {out}"
    );
    assert!(!out.success(), "master with a bad config exited 0: {out}");
    out.stderr
}

#[test]
fn t06_bad_configs_are_refused_at_start_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    init_certs(&certs);
    let addr = free_udp_addr();
    let good = format!(
        "node-id = 1\nlisten-addr = \"{addr}\"\ndata-dir = \"{}\"\ncerts-dir = \"{}\"\n\
         initial-members = [\"1={addr}\"]\n",
        dir.path().join("data").display(),
        certs.display()
    );
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    // Unknown key in the file.
    let bogus = write("bogus.toml", &format!("{good}bogus = 1\n"));
    let err = refused(&["--config".into(), bogus.into()]);
    assert!(
        err.contains("bogus"),
        "stderr does not name the unknown key: {err}"
    );

    // Election timeout not above the heartbeat (default min 150 ms, heartbeat 200 ms).
    let base = write("good.toml", &good);
    let err = refused(&[
        "--config".into(),
        base.clone().into(),
        "--heartbeat-ms".into(),
        "200".into(),
    ]);
    assert!(
        err.contains("election-timeout-min-ms"),
        "stderr does not name election-timeout-min-ms: {err}"
    );

    // An executor heartbeat (from its flag) too long for the executor TTL (1.5 s).
    let err = refused(&[
        "--config".into(),
        base.clone().into(),
        "--executor-heartbeat-ms".into(),
        "1000".into(),
    ]);
    // The validation names both keys; an unknown flag would be refused naming only one.
    assert!(
        err.contains("executor-ttl-ms") && err.contains("executor-heartbeat-ms"),
        "stderr does not name executor-ttl-ms and executor-heartbeat-ms: {err}"
    );

    // An executor TTL that a leader cut off from the other masters could outlast: it
    // serves executors up to 3 x 300 ms after the others last heard from it, and they elect
    // a new one no sooner than 150 ms after that.
    let err = refused(&[
        "--config".into(),
        base.clone().into(),
        "--executor-ttl-ms".into(),
        "700".into(),
        "--executor-heartbeat-ms".into(),
        "200".into(),
    ]);
    assert!(
        err.contains("executor-ttl-ms (700)") && err.contains("election-timeout-max-ms"),
        "stderr does not name executor-ttl-ms and the election timeouts: {err}"
    );

    // A write timeout of zero, named as the config key.
    let err = refused(&[
        "--config".into(),
        base.clone().into(),
        "--write-timeout-ms".into(),
        "0".into(),
    ]);
    assert!(
        err.contains("write-timeout-ms must be > 0"),
        "stderr does not name write-timeout-ms: {err}"
    );

    // A data dir that cannot be created (its parent is a regular file; root or not).
    let file = write("not-a-dir", "x");
    let err = refused(&[
        "--config".into(),
        base.into(),
        "--data-dir".into(),
        file.join("data").into(),
    ]);
    assert!(
        err.contains("data-dir"),
        "stderr does not name data-dir: {err}"
    );

    // Control: the base config itself is valid, so each refusal above was about its one bad
    // value.
    let control = MasterConfig::from_toml(&good).unwrap();
    control.validate().unwrap();
}

#[test]
fn t07_example_configs_parse_and_validate() {
    let mut seen = Vec::new();
    for name in [
        "master-single.toml",
        "master-1.toml",
        "master-2.toml",
        "master-3.toml",
        "master-4-join.toml",
    ] {
        let path = config_dir().join(name);
        let c = MasterConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        seen.push((name, c));
    }
    let trio = [
        "127.0.0.1:7101".to_string(),
        "127.0.0.1:7102".into(),
        "127.0.0.1:7103".into(),
    ];
    for (name, c) in &seen {
        match *name {
            "master-single.toml" => {
                assert_eq!(c.node_id, 1);
                assert_eq!(c.listen_addr.to_string(), "127.0.0.1:7101");
                assert_eq!(c.data_dir, Path::new("./data/master-1"));
                assert_eq!(c.certs_dir, Path::new("./certs"));
                assert_eq!(c.initial_members, ["1=127.0.0.1:7101"]);
            }
            "master-4-join.toml" => {
                assert_eq!(c.node_id, 4);
                assert_eq!(c.listen_addr.to_string(), "127.0.0.1:7104");
                assert!(c.initial_members.is_empty());
                assert_eq!(c.join, trio);
            }
            _ => {
                let members: Vec<String> = (1..=3)
                    .zip(&trio)
                    .map(|(id, a)| format!("{id}={a}"))
                    .collect();
                assert_eq!(c.initial_members, members, "{name}");
                assert_eq!(
                    c.listen_addr.to_string(),
                    trio[c.node_id as usize - 1],
                    "{name}"
                );
                assert_eq!(name.to_string(), format!("master-{}.toml", c.node_id));
                assert!(c.join.is_empty(), "{name}");
            }
        }
    }
}

#[test]
fn t08_the_single_master_example_starts_and_leads_with_flag_overrides() {
    let mut c = Cluster::empty(ClusterOptions::default());
    let addr = free_udp_addr();
    let data = c.data_dir(1);
    let args = vec![
        "--config".into(),
        config_dir().join("master-single.toml").into(),
        "--listen-addr".into(),
        addr.to_string().into(),
        "--initial-members".into(),
        format!("1={addr}").into(),
        "--data-dir".into(),
        data.clone().into(),
        "--certs-dir".into(),
        c.certs.clone().into(),
    ];
    let log = c.dir.path().join("master-1.log");
    c.nodes
        .insert(1, Node::spawn(1, addr, data.clone(), args, log));
    let leader = c.wait_for_leader_cli(&[1], ELECTION);
    assert_eq!(leader, 1);
    let s = c.unwrap_or_dump(c.status(&[addr]));
    // The name comes from the file, the address from the flag.
    assert_eq!(s.raw["masters"][0]["name"], "master-1", "{s}");
    assert_eq!(s.master(1).unwrap().addr, addr.to_string(), "{s}");
    let job = c.submit_job_ok(&[addr]);
    c.wait_for_jobs_on(1, &[job], REPLICATION);
    assert!(data.is_dir(), "the data dir from the flag was not used");
}

#[test]
fn t06b_a_config_error_points_into_the_users_file() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_udp_addr();
    let path = dir.path().join("master-bogus.toml");
    let text = format!(
        "node-id = 1\nlisten-addr = \"{addr}\"\ndata-dir = \"{}\"\ncerts-dir = \"{}\"\n\
         initial-members = [\"1={addr}\"]\nbogus = 1\n",
        dir.path().join("data").display(),
        dir.path().join("certs").display()
    );
    std::fs::write(&path, text).unwrap();
    let err = refused(&["--config".into(), path.into()]);
    assert!(err.contains("bogus"), "{err}");
    assert!(
        err.contains("master-bogus.toml"),
        "the error does not name the file: {err}"
    );
    if let Some(at) = err.find("line ") {
        assert!(
            err[at..].starts_with("line 6"),
            "`bogus` is on line 6 of the file, the error says: {err}"
        );
    }
}

#[test]
fn t09_overriding_listen_addr_alone_is_refused_or_advertised() {
    let mut c = Cluster::empty(ClusterOptions::default());
    let addr = free_udp_addr();
    let data = c.data_dir(1);
    // Only the listen address is overridden: master-single.toml still lists 1=127.0.0.1:7101.
    let args = vec![
        "--config".into(),
        config_dir().join("master-single.toml").into(),
        "--listen-addr".into(),
        addr.to_string().into(),
        "--data-dir".into(),
        data.clone().into(),
        "--certs-dir".into(),
        c.certs.clone().into(),
    ];
    let log = c.dir.path().join("master-1.log");
    c.nodes.insert(1, Node::spawn(1, addr, data, args, log));
    // Either it refuses to start, naming the mismatch, or the cluster advertises the address
    // it actually listens on (so that `cluster status` finds a reachable leader).
    let result = wait_until(
        "refused, or a reachable leader at the listen address",
        Duration::from_secs(8),
        || {
            let node = c.nodes.get_mut(&1).unwrap();
            if let Some(status) = node.exit_status() {
                let log = node.log_text();
                return if !status.success() && log.contains("initial-members") {
                    Ok(())
                } else {
                    Err(format!(
                        "exited with {status} without naming initial-members"
                    ))
                };
            }
            let s = c.status(&[addr])?;
            match s.master(1) {
                Some(m) if m.reachable && m.addr == addr.to_string() && s.leader == Some(1) => {
                    Ok(())
                }
                _ => Err(format!("{s}")),
            }
        },
    );
    c.unwrap_or_dump(result);
}

#[test]
fn t10_a_leader_restarted_at_once_is_back_promptly_and_writes_work_everywhere() {
    let mut c = Cluster::bootstrap(3);
    let old = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let before = c.submit_job_ok(&[c.addr(old)]);
    for id in [1, 2, 3] {
        c.wait_for_jobs_on(id, &[before], REPLICATION);
    }

    // SIGKILL the leader and start it again right away from its data dir, on the same address.
    let restarted_at = Instant::now();
    c.restart(old);
    let result = wait_until("all three masters agree on a leader", ELECTION, || {
        c.assert_running(&[1, 2, 3]);
        c.agreed_leader(&[1, 2, 3])
    });
    let agreed = restarted_at.elapsed();
    let leader = c.unwrap_or_dump(result);
    eprintln!("restart: master {old} restarted, all agree on {leader} after {agreed:?}");

    // Writes through every master, one at a time, are accepted promptly.
    let mut jobs = vec![before];
    for id in [1, 2, 3] {
        let start = Instant::now();
        jobs.push(c.submit_job_ok(&[c.addr(id)]));
        let took = start.elapsed();
        eprintln!("restart: write through master {id} took {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "a write through master {id} took {took:?} after master {old} restarted (leader {leader}){}",
            c.logs(30)
        );
    }
    assert!(
        agreed < REJOIN_BOUND,
        "masters agreed on leader {leader} only {agreed:?} after master {old} restarted (bound {REJOIN_BOUND:?})"
    );
    for id in [1, 2, 3] {
        c.wait_for_jobs_on(id, &jobs, REPLICATION);
    }
}

#[test]
fn t11_a_follower_restarted_at_once_catches_up_promptly() {
    let mut c = Cluster::bootstrap(3);
    let leader = c.wait_for_leader(&[1, 2, 3], ELECTION);
    let follower = follower_of(leader, &[1, 2, 3]);
    let before = c.submit_job_ok(&[c.addr(leader)]);
    c.wait_for_jobs_on(follower, &[before], REPLICATION);

    // SIGKILL a follower and start it again right away; then write through the leader.
    let restarted_at = Instant::now();
    c.restart(follower);
    let after = c.submit_job_ok(&[c.addr(leader)]);
    // The restarted follower receives the new write (the leader replicates to it again) and
    // knows the leader.
    let result = wait_until("the restarted follower has the new job", ELECTION, || {
        c.assert_running(&[1, 2, 3]);
        let listed = c.job_ids(&[c.addr(follower)])?;
        let leader_now = c.agreed_leader(&[1, 2, 3])?;
        if listed.contains(&after) {
            Ok(leader_now)
        } else {
            Err(format!("master {follower} lists {listed:?}"))
        }
    });
    let took = restarted_at.elapsed();
    let leader_now = c.unwrap_or_dump(result);
    eprintln!("restart: follower {follower} caught up after {took:?} (leader {leader_now})");
    assert!(
        took < REJOIN_BOUND,
        "the restarted follower {follower} caught up only {took:?} after its restart (bound {REJOIN_BOUND:?})"
    );
}

#[test]
fn t12_a_single_master_killed_right_after_a_write_restarts_with_it() {
    // A metadata apply is made durable by the next durable write of the log, not by its own
    // fsync: a master killed right after a write comes back with the entry in its log and
    // applies it again once it leads.
    let mut c = Cluster::bootstrap(1);
    c.wait_for_leader(&[1], ELECTION);
    let via = [c.addr(1)];
    let jobs = vec![c.submit_job_ok(&via), c.submit_job_ok(&via)];
    c.restart(1);
    c.wait_for_leader_cli(&[1], ELECTION);
    let listed = c.wait_for_jobs_on(1, &jobs, REPLICATION);
    assert_eq!(listed, jobs, "jobs after the restart");
    let next = c.submit_job_ok(&via);
    assert!(
        next > jobs[1],
        "job id {next} after the restart is not above {}",
        jobs[1]
    );
}
