//! [`MetaNode`]: one master's member of the metadata raft group.
//!
//! It opens the redb store, starts `openraft::Raft` over a [`RaftTransport`], and exposes what
//! the master needs: bootstrap of a pristine cluster, writes (with a timeout mapped to
//! [`MetaError::NoQuorum`] and a leader hint on [`MetaError::ForwardToLeader`]), linearizable and
//! local reads of the [`MetaState`], learner → voter membership changes, status, and a split-vote
//! watchdog (openraft 0.9 draws its election timeout once per process, so two candidates can tie
//! forever; see [`SplitVoteWatchdog`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::task::JoinHandle;

use super::network::{NetworkFactory, RaftTransport};
use super::state::{Command, CommandResponse, MetaRequest, MetaState, RequestId};
use super::store::open_store;
use super::{MasterNode, MetaError, NodeId, Raft};

/// Longest [`MetaNode::shutdown`] waits for the store file to be released.
pub const FILE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Configuration of one master's metadata node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaConfig {
    /// This master's raft id (stable for the life of `data_dir`).
    pub node_id: NodeId,
    /// This master's RPC address, advertised to the others.
    pub addr: String,
    /// Human-readable name.
    pub name: String,
    /// Directory holding `meta.redb`.
    pub data_dir: PathBuf,
    /// The cluster this master belongs to; a data dir of another cluster is refused.
    pub cluster_id: String,
    /// Leader heartbeat period (ms); a follower's append + fsync must fit in it.
    pub heartbeat_ms: u64,
    /// Lower bound of the election timeout (ms); must exceed `heartbeat_ms`.
    pub election_min_ms: u64,
    /// Upper bound of the election timeout (ms); must exceed `election_min_ms`.
    pub election_max_ms: u64,
    /// Timeout per snapshot chunk (ms).
    pub install_snapshot_timeout_ms: u64,
    /// How long a write, read barrier or membership change may wait for a quorum (ms).
    pub write_timeout_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_every: u64,
    /// Whether this node starts elections when it hears no leader from the start (see
    /// [`MetaNode::set_electing`]). Masters start without and turn them on once they are
    /// reachable where the others look for them: a master restarted at another address must
    /// not depose, with its climbing term, the leader that is to record its address.
    pub elect: bool,
}

impl MetaConfig {
    /// A configuration with the recommended LAN defaults (50 / 150 / 300 ms, 2 s write timeout).
    pub fn new(
        node_id: NodeId,
        addr: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        cluster_id: impl Into<String>,
    ) -> Self {
        Self {
            node_id,
            addr: addr.into(),
            name: format!("master-{node_id}"),
            data_dir: data_dir.into(),
            cluster_id: cluster_id.into(),
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
            install_snapshot_timeout_ms: 2000,
            write_timeout_ms: 2000,
            snapshot_every: 5000,
            elect: true,
        }
    }

    /// Rejects impossible values; messages name the offending keys.
    pub fn validate(&self) -> Result<(), MetaError> {
        let bad = |m: String| Err(MetaError::InvalidConfig(m));
        if self.cluster_id.is_empty() {
            return bad("cluster_id must not be empty".into());
        }
        if self.addr.is_empty() {
            return bad("addr must not be empty".into());
        }
        if self.heartbeat_ms == 0 {
            return bad("heartbeat_ms must be > 0".into());
        }
        if self.election_min_ms <= self.heartbeat_ms {
            return bad(format!(
                "election_min_ms ({}) must be greater than heartbeat_ms ({})",
                self.election_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_min_ms >= self.election_max_ms {
            return bad(format!(
                "election_min_ms ({}) must be less than election_max_ms ({})",
                self.election_min_ms, self.election_max_ms
            ));
        }
        if self.write_timeout_ms == 0 {
            return bad("write_timeout_ms must be > 0".into());
        }
        if self.install_snapshot_timeout_ms == 0 {
            return bad("install_snapshot_timeout_ms must be > 0".into());
        }
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be > 0".into());
        }
        Ok(())
    }

    fn raft_config(&self) -> Result<openraft::Config, MetaError> {
        let config = openraft::Config {
            cluster_name: self.cluster_id.clone(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            enable_elect: self.elect,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| MetaError::InvalidConfig(e.to_string()))
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// A snapshot of a node's raft status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaStatus {
    /// This node.
    pub id: NodeId,
    /// Leader, follower, candidate, learner or shutdown.
    pub role: ServerState,
    /// Current term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub last_applied: Option<u64>,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Voters of the effective membership.
    pub voters: BTreeSet<NodeId>,
    /// Learners of the effective membership.
    pub learners: BTreeSet<NodeId>,
}

/// Pure decision core of the split-vote watchdog: fires when a voter has seen no leader for
/// longer than `threshold` (3 × `election_max` in [`MetaNode`]); after firing it waits another
/// full threshold.
#[derive(Debug, Clone)]
pub struct SplitVoteWatchdog {
    threshold: Duration,
    leaderless_since: Option<Instant>,
}

impl SplitVoteWatchdog {
    /// A watchdog that fires after `threshold` without a leader.
    pub fn new(threshold: Duration) -> Self {
        Self {
            threshold,
            leaderless_since: None,
        }
    }

    /// Feeds one observation; returns whether to trigger an election now.
    pub fn observe(&mut self, now: Instant, leader_known: bool, is_voter: bool) -> bool {
        if leader_known || !is_voter {
            self.leaderless_since = None;
            return false;
        }
        let since = *self.leaderless_since.get_or_insert(now);
        if now.saturating_duration_since(since) > self.threshold {
            self.leaderless_since = Some(now);
            return true;
        }
        false
    }
}

/// One master's member of the metadata raft group.
pub struct MetaNode {
    raft: Raft,
    config: MetaConfig,
    state: Arc<RwLock<MetaState>>,
    applied: tokio::sync::watch::Receiver<u64>,
    watchdog: JoinHandle<()>,
    /// The data dir's incarnation ([`MasterNode::incarnation`]).
    incarnation: u64,
    /// Which start of the data dir this is ([`MasterNode::start`]).
    start: u64,
    /// Whether this node starts elections (openraft's own flag cannot be read back; the
    /// watchdog reads this one).
    electing: Arc<AtomicBool>,
    /// Held across reading a member's entry and changing it, so that no other change of this
    /// node's comes between.
    membership_change: tokio::sync::Mutex<()>,
    /// Our handle on the store file: dropped last, on shutdown, so the close is complete when
    /// shutdown returns.
    file: std::sync::Mutex<Option<Arc<redb::Database>>>,
}

impl MetaNode {
    /// Opens the store in `config.data_dir` and starts the raft node. A pristine node starts as
    /// a learner with no membership: call [`MetaNode::bootstrap`] on one node of a new cluster,
    /// or have the leader add it with [`MetaNode::add_learner`]. A restarted node needs nothing
    /// else.
    pub async fn start<T: RaftTransport>(
        config: MetaConfig,
        transport: Arc<T>,
    ) -> Result<Self, MetaError> {
        config.validate()?;
        let raft_config = Arc::new(config.raft_config()?);
        let dir = config.data_dir.clone();
        let cluster = config.cluster_id.clone();
        let store = tokio::task::spawn_blocking(move || open_store(&dir, &cluster))
            .await
            .map_err(|e| MetaError::Storage {
                context: "open store".into(),
                message: e.to_string(),
            })??;
        let state = store.state.clone();
        let applied = store.applied.clone();
        let incarnation = store.incarnation;
        let start = store.start;
        let electing = Arc::new(AtomicBool::new(config.elect));
        let file = std::sync::Mutex::new(Some(store.file.clone()));
        let raft = Raft::new(
            config.node_id,
            raft_config,
            NetworkFactory::new(transport),
            store.log,
            store.state_machine,
        )
        .await
        .map_err(|e| MetaError::Stopped(e.to_string()))?;
        let watchdog = tokio::spawn(run_watchdog(
            raft.clone(),
            electing.clone(),
            config.node_id,
            Duration::from_millis(config.election_max_ms),
        ));
        tracing::info!(node = config.node_id, addr = %config.addr, cluster = %config.cluster_id,
            "meta node started");
        Ok(Self {
            raft,
            config,
            state,
            applied,
            watchdog,
            incarnation,
            start,
            electing,
            membership_change: tokio::sync::Mutex::new(()),
            file,
        })
    }

    /// A receiver whose `changed()` completes once this node's applied state (what
    /// [`MetaNode::read_local`] reads) changed since the receiver last looked.
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The underlying openraft instance (for [`super::handle_raft_rpc`] and metrics).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Lets this node start elections when it hears no leader, or stops it from doing so.
    /// A node that does not elect still votes and follows a leader.
    pub fn set_electing(&self, elect: bool) {
        self.electing.store(elect, Ordering::Relaxed);
        self.raft.runtime_config().elect(elect);
    }

    /// This node's configuration.
    pub fn config(&self) -> &MetaConfig {
        &self.config
    }

    /// This node's description as a raft member.
    pub fn master_node(&self) -> MasterNode {
        MasterNode::new(self.config.addr.clone(), self.config.name.clone())
            .with_incarnation(self.incarnation)
            .with_start(self.start)
    }

    /// This data dir's incarnation ([`MasterNode::incarnation`]).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Creates a new cluster with `members` as voters, only if this node's store is pristine.
    /// Returns `Ok(false)` without effect if it was already initialized (e.g. a restart).
    pub async fn bootstrap(
        &self,
        members: BTreeMap<NodeId, MasterNode>,
    ) -> Result<bool, MetaError> {
        if self.raft.is_initialized().await.map_err(stopped)? {
            return Ok(false);
        }
        match self.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(node = self.config.node_id, "meta cluster bootstrapped");
                Ok(true)
            }
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(MetaError::Bootstrap(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(stopped(e)),
        }
    }

    /// A new request id for a write from this node (retries must reuse the id).
    pub fn next_request_id(&self) -> RequestId {
        // One fresh client id per request, not one per node with rising sequence numbers:
        // this node proposes many writes concurrently (registrations, the leader's steps,
        // checkpoint commits) and they may apply in any order, while the dedup table refuses a
        // client's request older than its last applied one. A retry reuses the whole request,
        // so it is still recognised.
        RequestId {
            client: rand::random::<u64>() | crate::meta::state::INTERNAL_CLIENT,
            seq: 1,
        }
    }

    /// Wraps `command` with a new request id.
    pub fn request(&self, command: Command) -> MetaRequest {
        MetaRequest {
            id: self.next_request_id(),
            command,
        }
    }

    /// Replicates and applies `request`; returns its response once applied on this (leader) node.
    ///
    /// Fails with [`MetaError::ForwardToLeader`] on a non-leader and [`MetaError::NoQuorum`] if
    /// not committed within `write_timeout_ms` (it may still commit: retry with the same id).
    pub async fn write(&self, request: MetaRequest) -> Result<CommandResponse, MetaError> {
        self.write_indexed(request)
            .await
            .map(|(_, response)| response)
    }

    /// Like [`MetaNode::write`], also returning the log index the request was applied at (to
    /// wait for it elsewhere, e.g. with `raft().wait(..).applied_index_at_least(..)`).
    pub async fn write_indexed(
        &self,
        request: MetaRequest,
    ) -> Result<(u64, CommandResponse), MetaError> {
        let timeout = self.config.write_timeout();
        match tokio::time::timeout(timeout, self.raft.client_write(request)).await {
            Err(_) => Err(MetaError::NoQuorum(format!(
                "write not committed within {} ms",
                timeout.as_millis()
            ))),
            Ok(Ok(resp)) => Ok((resp.log_id.index, resp.data)),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    /// Confirms leadership with a quorum, waits until the local state machine is up to date, and
    /// reads it with `f`.
    pub async fn read_linearizable<R>(
        &self,
        f: impl FnOnce(&MetaState) -> R,
    ) -> Result<R, MetaError> {
        let timeout = self.config.write_timeout();
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Err(_) => Err(MetaError::NoQuorum(format!(
                "leadership not confirmed within {} ms",
                timeout.as_millis()
            ))),
            Ok(Ok(_)) => Ok(self.read_local(f)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(fwd)))) => {
                Err(self.forward(&fwd))
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                Err(MetaError::NoQuorum(q.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(stopped(e)),
        }
    }

    /// Reads this node's applied state with `f` (possibly stale on a follower).
    pub fn read_local<R>(&self, f: impl FnOnce(&MetaState) -> R) -> R {
        // A poisoned lock only means a reader panicked; the state itself is consistent.
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// On the leader: adds `id` as a learner, unless it is one already (with the same
    /// address and name), then waits (at most `patience`) until it has caught up with the
    /// leader's log as it is now. Adding it again would propose another membership entry,
    /// which restarts every replication stream, and with it a snapshot still on its way to
    /// the learner: a join retried while a large snapshot is sent would never finish.
    ///
    /// A member of the same data-dir incarnation known under another address or name is
    /// updated. A learner of another incarnation (its data dir was lost) is removed and added
    /// anew; a voter of another incarnation is refused ([`MetaError::Membership`]): with an
    /// empty log it could help elect a leader that lacks committed entries. A description
    /// from an earlier start than the recorded one is refused too (see
    /// [`MetaNode::update_member`]).
    pub async fn add_learner(
        &self,
        id: NodeId,
        node: MasterNode,
        patience: Duration,
    ) -> Result<(), MetaError> {
        let one = self.membership_change.lock().await;
        let (known, voter) = self.member(id);
        if let Some(k) = &known
            && node.older_than(k)
        {
            return Err(stale_member(id, &node, k));
        }
        if let Some(k) = &known
            && k.incarnation != node.incarnation
            && voter
        {
            return Err(MetaError::Membership(format!(
                "master {id} is already a voter of this cluster with another data dir; a master whose data dir was lost must join under a new node-id"
            )));
        }
        if !known
            .as_ref()
            .is_some_and(|k| k.same_as(&node) && k.start >= node.start)
        {
            let timeout = self.config.write_timeout();
            let set = |node: MasterNode| {
                ChangeMembers::SetNodes(std::collections::BTreeMap::from([(id, node)]))
            };
            let change = async {
                match known {
                    // Known under another address or name: adding would keep the old one.
                    Some(k) if k.incarnation == node.incarnation => {
                        self.raft.change_membership(set(node), true).await?;
                    }
                    // A learner whose data dir was lost: added anew, so that the leader
                    // forgets how far it had replicated to it.
                    Some(_) => {
                        self.raft
                            .change_membership(
                                ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                                true,
                            )
                            .await?;
                        self.raft.add_learner(id, node, false).await?;
                    }
                    None => {
                        self.raft.add_learner(id, node, false).await?;
                    }
                }
                Ok(())
            };
            match tokio::time::timeout(timeout, change).await {
                Err(_) => {
                    return Err(MetaError::NoQuorum(format!(
                        "learner {id} not added within {} ms",
                        timeout.as_millis()
                    )));
                }
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.write_error(e)),
            }
        }
        drop(one);
        let target = self.raft.metrics().borrow().last_log_index;
        let caught_up = self
            .raft
            .wait(Some(patience))
            .metrics(
                move |m| {
                    let Some(replication) = &m.replication else {
                        // Not the leader any more: nothing to wait for here.
                        return true;
                    };
                    let matched = replication.get(&id).copied().flatten().map(|l| l.index);
                    matched >= target
                },
                "learner caught up",
            )
            .await;
        match caught_up {
            Ok(m) if m.replication.is_none() => {
                let leader = m.current_leader;
                let node =
                    leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
                let fwd = match (leader, node) {
                    (Some(l), Some(n)) => ForwardToLeader::new(l, n),
                    _ => ForwardToLeader::empty(),
                };
                Err(self.forward(&fwd))
            }
            Ok(_) => Ok(()),
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(MetaError::NoQuorum(format!(
                "learner {id} has not caught up with the log within {} ms",
                patience.as_millis()
            ))),
            Err(e) => Err(MetaError::Stopped(e.to_string())),
        }
    }

    /// What the current membership knows of `id`: its description, and whether it votes in
    /// any of its configurations (both, in a joint one).
    pub fn member(&self, id: NodeId) -> (Option<MasterNode>, bool) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let voter = membership
            .get_joint_config()
            .iter()
            .any(|config| config.contains(&id));
        (membership.get_node(&id).cloned(), voter)
    }

    /// Whether `id` is a voter of the current membership, and that membership is not a joint
    /// one (a change that stopped half-way leaves both the old and the new voter sets).
    pub fn is_settled_voter(&self, id: NodeId) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        membership.get_joint_config().len() == 1 && membership.voter_ids().any(|v| v == id)
    }

    /// On the leader: records `node` as member `id`'s address, name and incarnation where
    /// they differ from its entry (a master restarted at another address, or the incarnation
    /// of a master named in the bootstrap, which no one knew then: 0), and its start where it
    /// is later (a master restarted in place), so that no request of an earlier start can
    /// move it later. The caller checks that `node` may take the entry.
    ///
    /// A description from an earlier start of the master than the one that wrote its entry
    /// is refused ([`MetaError::Membership`]): it was sent before a restart and retried since.
    pub async fn update_member(&self, id: NodeId, node: MasterNode) -> Result<(), MetaError> {
        let _one = self.membership_change.lock().await;
        match self.member(id).0 {
            Some(known) if node.older_than(&known) => Err(stale_member(id, &node, &known)),
            Some(known) if known.same_as(&node) && known.start >= node.start => Ok(()),
            _ => {
                self.change_membership(ChangeMembers::SetNodes(std::collections::BTreeMap::from([
                    (id, node),
                ])))
                .await
            }
        }
    }

    /// Whether the membership this node has applied (committed, not only appended: an entry
    /// appended by a leader that lost its office may be undone) has `id` as a settled voter
    /// described as `node`, by `node`'s start or a later one.
    pub fn has_recorded(&self, id: NodeId, node: &MasterNode) -> bool {
        records(&self.raft.metrics().borrow(), id, node)
    }

    /// Waits (at most `patience`) until [`MetaNode::has_recorded`] holds; says whether it
    /// does.
    pub async fn wait_recorded(&self, id: NodeId, node: &MasterNode, patience: Duration) -> bool {
        self.raft
            .wait(Some(patience))
            .metrics(|m| records(m, id, node), "the member's entry is recorded")
            .await
            .is_ok()
    }

    /// On the leader: turns learner `id` into a voter (joint consensus).
    pub async fn promote_voter(&self, id: NodeId) -> Result<(), MetaError> {
        let _one = self.membership_change.lock().await;
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await
    }

    /// On the leader: removes voter `id` (it stays a learner until removed as a node).
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), MetaError> {
        let _one = self.membership_change.lock().await;
        self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, MasterNode>,
    ) -> Result<(), MetaError> {
        let timeout = self.config.write_timeout();
        match tokio::time::timeout(timeout, self.raft.change_membership(change, false)).await {
            Err(_) => Err(MetaError::NoQuorum(format!(
                "membership change not committed within {} ms",
                timeout.as_millis()
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    /// This node's current raft role. Cheaper than [`MetaNode::status`], which copies the
    /// membership: every heartbeat and checkpoint report asks it.
    pub fn role(&self) -> ServerState {
        self.raft.metrics().borrow().state
    }

    /// This node's current raft status.
    pub fn status(&self) -> MetaStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        MetaStatus {
            id: m.id,
            role: m.state,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            leader: m.current_leader,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Stops the watchdog and the raft node, then waits (at most [`FILE_RELEASE_TIMEOUT`]) until
    /// openraft's background tasks have dropped their store handles, so that the data dir can be
    /// reopened in this process.
    pub async fn shutdown(&self) -> Result<(), MetaError> {
        self.watchdog.abort();
        self.raft
            .shutdown()
            .await
            .map_err(|e| MetaError::Stopped(e.to_string()))?;
        // Poisoning cannot leave the Option inconsistent.
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(file) = file else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + FILE_RELEASE_TIMEOUT;
        while Arc::strong_count(&file) > 1 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    node = self.config.node_id,
                    "meta store still in use after shutdown"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Dropping the last handle closes the file (a final commit): do it off the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(file)).await;
        Ok(())
    }

    fn forward(&self, fwd: &ForwardToLeader<NodeId, MasterNode>) -> MetaError {
        let addr = fwd
            .leader_node
            .as_ref()
            .map(|n| n.addr.clone())
            .or_else(|| {
                let id = fwd.leader_id?;
                let m = self.raft.metrics().borrow().membership_config.clone();
                m.membership().get_node(&id).map(|n| n.addr.clone())
            });
        MetaError::ForwardToLeader {
            leader_id: fwd.leader_id,
            leader_addr: addr,
        }
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, MasterNode>>) -> MetaError {
        use openraft::error::ChangeMembershipError;
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(fwd)) => self.forward(&fwd),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(p),
            )) => MetaError::MembershipInProgress(p.to_string()),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                MetaError::Membership(c.to_string())
            }
            RaftError::Fatal(f) => stopped(f),
        }
    }
}

impl Drop for MetaNode {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

/// [`MetaNode::has_recorded`] on one metrics snapshot.
fn records(m: &openraft::RaftMetrics<NodeId, MasterNode>, id: NodeId, node: &MasterNode) -> bool {
    let applied = m.membership_config.log_id().map(|l| l.index) <= m.last_applied.map(|l| l.index);
    let membership = m.membership_config.membership();
    applied
        && membership.get_joint_config().len() == 1
        && membership.voter_ids().any(|v| v == id)
        && membership
            .get_node(&id)
            .is_some_and(|k| k.same_as(node) && k.start >= node.start)
}

/// The refusal of `node`, an earlier start's description of master `id` than `known`.
fn stale_member(id: NodeId, node: &MasterNode, known: &MasterNode) -> MetaError {
    MetaError::Membership(format!(
        "master {id} was described by its start {} at {}; start {} of it is already recorded at {}",
        node.start, node.addr, known.start, known.addr
    ))
}

fn stopped(e: openraft::error::Fatal<NodeId>) -> MetaError {
    MetaError::Stopped(e.to_string())
}

/// The async shell of [`SplitVoteWatchdog`]: samples metrics every `election_max / 2`, and when
/// told to, waits a random jitter in `[0, election_max)` and triggers an election if still
/// leaderless.
async fn run_watchdog(raft: Raft, electing: Arc<AtomicBool>, id: NodeId, election_max: Duration) {
    let mut core = SplitVoteWatchdog::new(election_max * 3);
    let mut tick = tokio::time::interval(election_max / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let observe = |raft: &Raft| {
        let m = raft.metrics().borrow().clone();
        let is_voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id);
        (m.current_leader.is_some(), is_voter, m.state)
    };
    loop {
        tick.tick().await;
        let (leader_known, is_voter, state) = observe(&raft);
        if state == ServerState::Shutdown {
            return;
        }
        if !core.observe(Instant::now(), leader_known, is_voter) {
            continue;
        }
        let max_ms = u64::try_from(election_max.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let jitter = Duration::from_millis(rand::random::<u64>() % max_ms);
        tokio::time::sleep(jitter).await;
        let (leader_known, is_voter, _) = observe(&raft);
        if !leader_known && is_voter && electing.load(Ordering::Relaxed) {
            tracing::warn!(
                node = id,
                "no leader for > 3 x election_max: triggering an election"
            );
            if raft.trigger().elect().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_keys() {
        let ok = MetaConfig::new(1, "127.0.0.1:1", "/tmp/x", "c");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.election_min_ms = 50;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("election_min_ms") && e.contains("heartbeat_ms"),
            "{e}"
        );
        let mut c = ok.clone();
        c.election_max_ms = 150;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("election_min_ms") && e.contains("election_max_ms"),
            "{e}"
        );
        let mut c = ok.clone();
        c.cluster_id.clear();
        assert!(c.validate().unwrap_err().to_string().contains("cluster_id"));
        let mut c = ok;
        c.write_timeout_ms = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("write_timeout_ms")
        );
    }

    #[test]
    fn watchdog_fires_only_after_threshold_without_leader() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = SplitVoteWatchdog::new(ms(900));
        assert!(!w.observe(t0, false, true));
        assert!(!w.observe(t0 + ms(800), false, true));
        assert!(w.observe(t0 + ms(901), false, true));
        // After firing it waits a full threshold again.
        assert!(!w.observe(t0 + ms(1500), false, true));
        assert!(w.observe(t0 + ms(1802), false, true));
        // A leader resets it.
        assert!(!w.observe(t0 + ms(1900), true, true));
        assert!(!w.observe(t0 + ms(2000), false, true));
        assert!(!w.observe(t0 + ms(2800), false, true));
        assert!(w.observe(t0 + ms(2901), false, true));
        // Learners never campaign.
        let mut w = SplitVoteWatchdog::new(ms(900));
        assert!(!w.observe(t0, false, false));
        assert!(!w.observe(t0 + ms(5000), false, false));
    }

    #[test]
    fn errors_say_whether_to_retry() {
        let fwd = MetaError::ForwardToLeader {
            leader_id: Some(2),
            leader_addr: Some("10.0.0.2:7000".into()),
        };
        assert!(fwd.is_retryable());
        assert_eq!(fwd.to_string(), "not leader (leader is 2 at 10.0.0.2:7000)");
        assert!(MetaError::NoQuorum("x".into()).is_retryable());
        assert!(
            MetaError::NoQuorum("x".into())
                .to_string()
                .starts_with("no quorum: ")
        );
        let mismatch = MetaError::ClusterMismatch {
            dir: "/d".into(),
            found: "a".into(),
            expected: "b".into(),
        };
        assert!(!mismatch.is_retryable());
        assert!(
            mismatch
                .to_string()
                .contains("belongs to cluster \"a\", not \"b\"")
        );
    }
}
