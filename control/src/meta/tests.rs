//! In-process tests of the metadata group: real openraft and redb in temp dirs, the in-memory
//! router as network. Conditions are awaited through openraft metrics, never fixed sleeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tempfile::TempDir;

use super::testing::MemRouter;
use super::*;

const CLUSTER: &str = "test-cluster";
const WAIT: Duration = Duration::from_secs(5);

struct Cluster {
    router: Arc<MemRouter>,
    dirs: BTreeMap<NodeId, TempDir>,
    nodes: BTreeMap<NodeId, MetaNode>,
}

fn addr(id: NodeId) -> String {
    format!("10.0.0.{id}:7000")
}

fn config(id: NodeId, dir: &TempDir) -> MetaConfig {
    let mut c = MetaConfig::new(id, addr(id), dir.path(), CLUSTER);
    c.write_timeout_ms = 1000;
    c
}

impl Cluster {
    async fn start(ids: &[NodeId]) -> Self {
        let mut cluster = Self {
            router: MemRouter::new(),
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        for &id in ids {
            cluster.dirs.insert(id, TempDir::new().unwrap());
            cluster.launch(id).await;
        }
        cluster
    }

    async fn launch(&mut self, id: NodeId) {
        self.launch_with(id, true).await;
    }

    /// Starts node `id`, electing or not ([`MetaConfig::elect`]).
    async fn launch_with(&mut self, id: NodeId, elect: bool) {
        let mut cfg = config(id, &self.dirs[&id]);
        cfg.elect = elect;
        let node = MetaNode::start(cfg, self.router.transport(id))
            .await
            .unwrap();
        self.router.register(id, node.raft().clone());
        self.nodes.insert(id, node);
    }

    async fn bootstrap(&self, on: NodeId) {
        let members = self
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.master_node()))
            .collect();
        assert!(self.nodes[&on].bootstrap(members).await.unwrap());
    }

    /// Waits until every running node agrees on one leader, and returns it.
    async fn leader(&self) -> NodeId {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses: Vec<_> = self.nodes.values().map(|n| n.status()).collect();
            let leaders: Vec<_> = statuses
                .iter()
                .filter(|s| s.role == ServerState::Leader)
                .map(|s| s.id)
                .collect();
            if leaders.len() == 1 && statuses.iter().all(|s| s.leader == Some(leaders[0])) {
                return leaders[0];
            }
            assert!(Instant::now() < deadline, "no agreed leader: {statuses:?}");
            // Wake on the next metrics change of any node (bounded, not a fixed sleep).
            let first = self.nodes.values().next().unwrap();
            let _ = first
                .raft()
                .wait(Some(Duration::from_millis(50)))
                .metrics(|_| false, "metrics change")
                .await;
        }
    }

    async fn kill(&mut self, id: NodeId) {
        self.router.disconnect(id);
        let node = self.nodes.remove(&id).unwrap();
        node.shutdown().await.unwrap();
        self.router.remove(id);
        drop(node);
    }

    async fn wait_applied(&self, index: u64) {
        for node in self.nodes.values() {
            node.raft()
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), "applied")
                .await
                .unwrap();
        }
    }
}

fn submit(n: u64) -> Command {
    Command::SubmitJob {
        job_type: "pipeline".into(),
        spec: format!("name = \"job{n}\"\n"),
        at_ms: 1_000 + n,
    }
}

fn job_id(r: CommandResponse) -> JobId {
    match r {
        CommandResponse::JobSubmitted { id } => id,
        other => panic!("unexpected {other:?}"),
    }
}

/// Three pristine nodes, bootstrapped on one, elect exactly one leader that all agree on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_three_nodes_elect_one_leader() {
    let c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let status = c.nodes[&leader].status();
    assert_eq!(status.voters.len(), 3);
    let leaders = c
        .nodes
        .values()
        .filter(|n| n.status().role == ServerState::Leader)
        .count();
    assert_eq!(leaders, 1);
    // A second bootstrap (e.g. on restart) is a no-op.
    let members = c
        .nodes
        .iter()
        .map(|(id, n)| (*id, n.master_node()))
        .collect();
    assert!(!c.nodes[&2].bootstrap(members).await.unwrap());
}

/// A follower refuses writes with the leader's id and address; a write through the leader is
/// applied on all three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_follower_forwards_and_leader_write_replicates() {
    let c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let f = &c.nodes[&follower];
    let err = f.write(f.request(submit(1))).await.unwrap_err();
    assert_eq!(
        err,
        MetaError::ForwardToLeader {
            leader_id: Some(leader),
            leader_addr: Some(addr(leader)),
        }
    );
    assert!(err.is_retryable());
    let err = f.read_linearizable(|s| s.jobs.len()).await.unwrap_err();
    assert!(matches!(err, MetaError::ForwardToLeader { leader_id: Some(l), .. } if l == leader));

    let l = &c.nodes[&leader];
    let (applied, resp) = l.write_indexed(l.request(submit(1))).await.unwrap();
    let id = job_id(resp);
    c.wait_applied(applied).await;
    for node in c.nodes.values() {
        let job = node.read_local(|s| s.job(id).cloned()).unwrap();
        assert_eq!(job.spec, "name = \"job1\"\n");
    }
    assert_eq!(l.read_linearizable(|s| s.jobs.len()).await.unwrap(), 1);
}

/// Killing the leader: a new leader within 2 s, no committed write lost, ids keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_leader_failover_keeps_committed_writes() {
    let mut c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let old = c.leader().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let l = &c.nodes[&old];
        ids.push(job_id(l.write(l.request(submit(n))).await.unwrap()));
    }
    let killed_at = Instant::now();
    c.kill(old).await;
    let new = c.leader().await;
    let failover = killed_at.elapsed();
    assert_ne!(new, old);
    assert!(
        failover < Duration::from_secs(2),
        "failover took {failover:?}"
    );
    let l = &c.nodes[&new];
    let jobs = l
        .read_linearizable(|s| s.jobs.keys().copied().collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(jobs, ids);
    let next = job_id(l.write(l.request(submit(9))).await.unwrap());
    assert!(next > *ids.last().unwrap());
}

/// With two of three nodes down the leader cannot commit: the write fails with NoQuorum within
/// the configured write timeout (plus slack), and the error is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_no_quorum_write_fails_in_bounded_time() {
    let mut c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let others: Vec<_> = c.nodes.keys().copied().filter(|id| *id != leader).collect();
    for id in others {
        c.kill(id).await;
    }
    let l = &c.nodes[&leader];
    let started = Instant::now();
    let err = l.write(l.request(submit(1))).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, MetaError::NoQuorum(_)), "{err}");
    assert!(err.is_retryable());
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// All nodes restart from their data dirs: no re-bootstrap, state and id counters recovered,
/// and a retried request is still deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_restart_recovers_state_and_counters() {
    let mut c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let l = &c.nodes[&leader];
    // One external client's requests, in order (a node's own requests each get a fresh
    // client id instead; see t09).
    let client = |seq, command| MetaRequest {
        id: RequestId { client: 42, seq },
        command,
    };
    let first = client(1, submit(1));
    l.write(first.clone()).await.unwrap();
    let second = job_id(l.write(client(2, submit(2))).await.unwrap());
    let last = client(
        3,
        Command::RegisterExecutor {
            addr: "10.1.0.1:9000".into(),
            name: "e1".into(),
            slots: 8,
            at_ms: 5,
        },
    );
    let (applied, reg) = l.write_indexed(last.clone()).await.unwrap();
    c.wait_applied(applied).await;
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
    for id in [1, 2, 3] {
        c.launch(id).await;
        c.router.reconnect(id);
    }
    let leader = c.leader().await;
    let l = &c.nodes[&leader];
    // Not pristine: bootstrap is refused as a no-op.
    let members = c
        .nodes
        .iter()
        .map(|(id, n)| (*id, n.master_node()))
        .collect();
    assert!(!l.bootstrap(members).await.unwrap());
    let (jobs, execs) = l
        .read_linearizable(|s| (s.jobs.len(), s.executors.len()))
        .await
        .unwrap();
    assert_eq!((jobs, execs), (2, 1));
    // Retrying the client's last request returns its original response and applies nothing;
    // an older one is refused.
    assert_eq!(l.write(last).await.unwrap(), reg);
    assert!(matches!(
        l.write(first).await.unwrap(),
        CommandResponse::Rejected(Rejection::StaleRequest {
            seq: 1,
            last: 3,
            ..
        })
    ));
    let counts = l
        .read_linearizable(|s| (s.jobs.len(), s.executors.len()))
        .await
        .unwrap();
    assert_eq!(counts, (2, 1));
    // Counters continue where they stopped.
    let third = job_id(l.write(l.request(submit(3))).await.unwrap());
    assert_eq!(third.0, second.0 + 1);
    let CommandResponse::ExecutorRegistered { id: e1, .. } = reg else {
        panic!("unexpected {reg:?}");
    };
    let again = l
        .write(l.request(Command::RegisterExecutor {
            addr: "10.1.0.2:9000".into(),
            name: "e2".into(),
            slots: 8,
            at_ms: 6,
        }))
        .await
        .unwrap();
    assert!(matches!(again, CommandResponse::ExecutorRegistered { id, .. } if id > e1));
}

/// A fourth node joins as a learner (catching up, via snapshot if needed), then becomes a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_fourth_node_joins_as_learner_then_voter() {
    let mut c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    for n in 0..3 {
        let l = &c.nodes[&leader];
        l.write(l.request(submit(n))).await.unwrap();
    }
    // Force a snapshot so the learner's catch-up may use it.
    c.nodes[&leader].raft().trigger().snapshot().await.unwrap();
    c.dirs.insert(4, TempDir::new().unwrap());
    c.launch(4).await;
    let l = &c.nodes[&leader];
    let n4 = c.nodes[&4].master_node();
    l.add_learner(4, n4.clone(), WAIT).await.unwrap();
    assert!(l.status().learners.contains(&4));
    assert!(!l.is_settled_voter(4));
    // A retried join adds no second membership entry (which would restart the learner's
    // replication, and a snapshot on its way with it).
    let membership_at = |l: &MetaNode| {
        l.raft()
            .metrics()
            .borrow()
            .membership_config
            .log_id()
            .map(|id| id.index)
    };
    let before = membership_at(l);
    l.add_learner(4, n4.clone(), WAIT).await.unwrap();
    assert_eq!(membership_at(l), before);
    let member = |l: &MetaNode| {
        l.raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&4)
            .cloned()
    };
    // The same learner (same incarnation) asking from another address, restarted there:
    // its entry is updated in place, still a learner of the same incarnation.
    let moved = MasterNode {
        addr: "10.0.0.44:7000".into(),
        ..n4.clone()
    };
    l.add_learner(4, moved.clone(), WAIT).await.unwrap();
    assert_eq!(member(l), Some(moved.clone()));
    assert!(l.status().learners.contains(&4));
    assert!(
        membership_at(l) > before,
        "one membership entry for the update"
    );
    // A learner of another data-dir incarnation (its data dir was lost) is replaced ...
    let replaced = n4.clone().with_incarnation(n4.incarnation.wrapping_add(1));
    l.add_learner(4, replaced.clone(), WAIT).await.unwrap();
    assert_eq!(member(l), Some(replaced.clone()));
    l.promote_voter(4).await.unwrap();
    // ... but a voter's place is not taken by another incarnation.
    let other = replaced
        .clone()
        .with_incarnation(replaced.incarnation.wrapping_add(1));
    let refused = l.add_learner(4, other, WAIT).await.unwrap_err();
    assert!(matches!(refused, MetaError::Membership(_)), "{refused}");
    assert_eq!(member(l), Some(replaced.clone()));
    let status = l.status();
    assert!(status.voters.contains(&4), "{status:?}");
    assert!(l.is_settled_voter(4));
    assert_eq!(status.voters.len(), 4);
    // A voter restarted at another address: its entry is updated, a voter still.
    let readdressed = MasterNode {
        addr: "10.0.0.45:7000".into(),
        ..replaced.clone()
    };
    l.update_member(4, readdressed.clone()).await.unwrap();
    assert_eq!(member(l), Some(readdressed.clone()));
    assert!(l.is_settled_voter(4));
    let unchanged = membership_at(l);
    l.update_member(4, readdressed.clone()).await.unwrap();
    assert_eq!(membership_at(l), unchanged, "no entry when nothing changed");
    // A later start describing it the same way (a restart in place) is recorded, once.
    let restarted = readdressed.clone().with_start(readdressed.start + 1);
    l.update_member(4, restarted.clone()).await.unwrap();
    assert_eq!(member(l), Some(restarted.clone()));
    assert!(membership_at(l) > unchanged);
    // Recorded once applied here, which may come a moment after the commit.
    let index = membership_at(l);
    l.raft()
        .wait(Some(WAIT))
        .applied_index_at_least(index, "the update applied")
        .await
        .unwrap();
    assert!(l.has_recorded(4, &restarted) && l.has_recorded(4, &readdressed));
    assert!(!l.has_recorded(4, &restarted.clone().with_start(restarted.start + 1)));
    let unchanged = membership_at(l);
    l.update_member(4, restarted.clone()).await.unwrap();
    l.update_member(4, readdressed.clone()).await.unwrap_err();
    assert_eq!(membership_at(l), unchanged);
    // A later start moved it again; a request of the earlier start, retried on its behalf
    // since, does not move it back, as an update or as a join.
    let moved_again = MasterNode {
        addr: "10.0.0.46:7000".into(),
        ..readdressed.clone().with_start(readdressed.start + 2)
    };
    let readdressed = restarted;
    l.update_member(4, moved_again.clone()).await.unwrap();
    assert_eq!(member(l), Some(moved_again.clone()));
    let stale = l.update_member(4, readdressed.clone()).await.unwrap_err();
    assert!(
        matches!(&stale, MetaError::Membership(m) if m.contains("start")),
        "{stale}"
    );
    let stale = l.add_learner(4, readdressed, WAIT).await.unwrap_err();
    assert!(matches!(stale, MetaError::Membership(_)), "{stale}");
    assert_eq!(member(l), Some(moved_again));
    let (applied, _) = l.write_indexed(l.request(submit(7))).await.unwrap();
    c.nodes[&4]
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(Some(applied), "node 4 applied")
        .await
        .unwrap();
    assert_eq!(c.nodes[&4].read_local(|s| s.jobs.len()), 4);
}

/// Opening a data dir written for another cluster fails with a clear, fatal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_data_dir_of_another_cluster_is_refused() {
    let dir = TempDir::new().unwrap();
    let router = MemRouter::new();
    let node = MetaNode::start(config(1, &dir), router.transport(1))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    drop(node);
    let mut other = config(1, &dir);
    other.cluster_id = "other-cluster".into();
    let err = MetaNode::start(other, router.transport(1))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, MetaError::ClusterMismatch { found, expected, .. }
            if found == CLUSTER && expected == "other-cluster"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("belongs to cluster"), "{err}");
}

/// A snapshot installed on a lagging follower replaces its state machine durably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08_lagging_follower_catches_up_and_restarts_with_state() {
    let mut c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let lagger = *c.nodes.keys().find(|id| **id != leader).unwrap();
    c.router.disconnect(lagger);
    let mut applied = 0;
    for n in 0..5 {
        let l = &c.nodes[&leader];
        applied = l.write_indexed(l.request(submit(n))).await.unwrap().0;
    }
    let l = &c.nodes[&leader];
    l.raft().trigger().snapshot().await.unwrap();
    l.raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot built",
        )
        .await
        .unwrap();
    l.raft().trigger().purge_log(applied).await.unwrap();
    c.router.reconnect(lagger);
    c.wait_applied(applied).await;
    assert_eq!(c.nodes[&lagger].read_local(|s| s.jobs.len()), 5);
    c.kill(lagger).await;
    c.launch(lagger).await;
    c.router.reconnect(lagger);
    assert_eq!(c.nodes[&lagger].read_local(|s| s.jobs.len()), 5);
}

/// A follower that fell behind catches up even when the entries it misses do not fit in one
/// request: the transport refuses the oversized batch and openraft sends smaller ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_a_batch_too_large_for_the_transport_is_split() {
    let c = Cluster::start(&[1, 2, 3]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let lagger = *c.nodes.keys().find(|id| **id != leader).unwrap();
    c.router.disconnect(lagger);
    let mut applied = 0;
    for n in 0..40 {
        let l = &c.nodes[&leader];
        let big = Command::SubmitJob {
            job_type: "pipeline".into(),
            spec: format!("# {n}\n{}", "x".repeat(2000)),
            at_ms: n,
        };
        applied = l.write_indexed(l.request(big)).await.unwrap().0;
    }
    // About four of these entries fit in one request.
    c.router.limit_request_bytes(Some(10_000));
    c.router.reconnect(lagger);
    c.wait_applied(applied).await;
    assert_eq!(c.nodes[&lagger].read_local(|s| s.jobs.len()), 40);
}

/// Writes a node creates are independent: a master creates requests in one order and they
/// may reach the log in another (registrations, leader steps and checkpoint commits run
/// concurrently). None may be refused as an out-of-order retry of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_requests_of_one_node_apply_in_any_order() {
    let mut c = Cluster::start(&[1]).await;
    c.bootstrap(1).await;
    let leader = c.leader().await;
    let node = Arc::new(c.nodes.remove(&leader).unwrap());
    let requests: Vec<_> = (0..16)
        .map(|i| {
            node.request(Command::RegisterExecutor {
                addr: format!("10.2.0.{i}:9000"),
                name: format!("e{i}"),
                slots: 1,
                at_ms: 1,
            })
        })
        .collect();
    // The later half first, one by one; then the earlier half concurrently.
    let (early, late) = requests.split_at(8);
    for request in late.iter().rev() {
        let response = node.write(request.clone()).await.unwrap();
        assert!(
            matches!(response, CommandResponse::ExecutorRegistered { .. }),
            "{response:?}"
        );
    }
    let writes: Vec<_> = early
        .iter()
        .cloned()
        .map(|request| {
            let node = node.clone();
            tokio::spawn(async move { node.write(request).await })
        })
        .collect();
    for write in writes {
        let response = write.await.unwrap().unwrap();
        assert!(
            matches!(response, CommandResponse::ExecutorRegistered { .. }),
            "{response:?}"
        );
    }
    assert_eq!(node.read_local(|s| s.executors.len()), 16);
}

/// A node that does not elect never campaigns, not even cut off from the leader, yet votes for
/// another; once allowed, it campaigns like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11_a_node_that_does_not_elect_still_votes() {
    let mut c = Cluster {
        router: MemRouter::new(),
        dirs: BTreeMap::new(),
        nodes: BTreeMap::new(),
    };
    for id in [1, 2, 3] {
        c.dirs.insert(id, TempDir::new().unwrap());
        c.launch_with(id, id != 3).await;
    }
    c.bootstrap(1).await;
    let first = c.leader().await;
    assert_ne!(first, 3);
    // The leader goes: the other electing node wins with node 3's vote.
    c.kill(first).await;
    let second = c.leader().await;
    assert_eq!(second, if first == 1 { 2 } else { 1 });
    // Cut off, node 3 keeps its term for many election timeouts (at most 300 ms each).
    let n3 = &c.nodes[&3];
    let term = n3.status().term;
    c.router.disconnect(3);
    let campaigned = n3
        .raft()
        .wait(Some(Duration::from_millis(1500)))
        .metrics(|m| m.vote.leader_id().term > term, "node 3 campaigns")
        .await;
    assert!(campaigned.is_err(), "{:?}", n3.status());
    assert_ne!(n3.status().role, ServerState::Candidate);
    // Allowed to elect, it campaigns (and, alone, stays a candidate).
    n3.set_electing(true);
    n3.raft()
        .wait(Some(WAIT))
        .metrics(|m| m.vote.leader_id().term > term, "node 3 campaigns")
        .await
        .unwrap();
}
