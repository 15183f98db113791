//! The master process: a raft member serving the control-plane API over QUIC.
//!
//! Any master accepts client and raft calls. Writes on a follower are forwarded to the leader
//! (during an election they wait briefly and retry); reads are answered from the local applied
//! state. Executors' heartbeats and checkpoint reports are served by the leader only (while
//! it has a recent quorum); other masters refuse them, and the executor tries the next one.
//! Masters start either by bootstrapping a new cluster from an initial member list or by
//! joining a running one (learner first, then voter). A master restarted from its data dir
//! rejoins with its state and never bootstraps again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use microcosm_transport::{
    Endpoint, ErrorCode, Identity, Peer, RemoteError, Role, Router, RpcError, TransportConfig,
    WeakEndpoint,
};
use openraft::ServerState;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::checkpoint::{CheckpointTracker, JobView};
use crate::job::JobState;
use crate::leader::{JobCatalog, Reports, heartbeat_assignments, next_commands};
use crate::liveness::{LivenessConfig, LivenessTracker};
use crate::meta::state::MAX_CHECKPOINT_BYTES;
use crate::meta::{
    Command, CommandResponse, JobId, MasterNode, MetaConfig, MetaError, MetaNode, MetaRequest,
    MetaState, NodeId, RaftEnvelope, RaftRpc, RaftRpcResponse, RaftTransport, Rejection, RequestId,
    TransportFailure, handle_raft_rpc,
};
use crate::proto::{
    Blob, ControlJob, ExecutorInfo, ForwardWrite, GetJob, GetNodeStatus, JobAction, JobInfo,
    JobList, JobRef, JobTransitionInfo, JoinCluster, ListJobs, MemberInfo, NodeStatus, Nothing,
    RaftMessage, SubmitJob,
};
use crate::proto::{
    CheckpointInfo, CheckpointReports, DeregisterExecutor, DeregisterRequest, Heartbeat,
    HeartbeatReply, HeartbeatRequest, RegisterExecutor, RegisterRequest, Registered,
    ReportCheckpoints, ReportsTaken,
};

/// Errors starting or configuring a master.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The configuration file could not be read.
    #[error("cannot read config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid; the message names the key.
    #[error("invalid master config: {0}")]
    Config(String),
    /// The data dir cannot be used.
    #[error("data-dir {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] microcosm_transport::TlsError),
    /// The endpoint could not be created.
    #[error(transparent)]
    Endpoint(#[from] microcosm_transport::EndpointError),
    /// The metadata layer failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Joining the cluster failed.
    #[error("cannot join the cluster via {addrs}: {reason}")]
    Join {
        /// The addresses tried.
        addrs: String,
        /// The last error.
        reason: String,
    },
}

/// A master's configuration (TOML, kebab-case keys; unknown keys are rejected).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MasterConfig {
    /// Raft id of this master; unique in the cluster and stable for its data dir.
    pub node_id: u64,
    /// Human-readable name (default `master-<node-id>`).
    #[serde(default)]
    pub name: Option<String>,
    /// UDP address to listen on; also the address advertised to peers.
    pub listen_addr: SocketAddr,
    /// Directory for the metadata store.
    pub data_dir: PathBuf,
    /// Directory with the cluster CA and the master certificate (`microcosm certs init`).
    pub certs_dir: PathBuf,
    /// Cluster id; a data dir of another cluster is refused.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Members of a new cluster as `id=ip:port` (bootstrap). Must include this master.
    #[serde(default)]
    pub initial_members: Vec<String>,
    /// Addresses of running masters to join (instead of `initial-members`).
    #[serde(default)]
    pub join: Vec<String>,
    /// Raft heartbeat interval (ms).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Lower bound of the election timeout (ms).
    #[serde(default = "default_election_min")]
    pub election_timeout_min_ms: u64,
    /// Upper bound of the election timeout (ms).
    #[serde(default = "default_election_max")]
    pub election_timeout_max_ms: u64,
    /// How long a write may wait for a quorum before failing with "no quorum" (ms).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// Heartbeat interval executors are told to keep (ms).
    #[serde(default = "default_executor_heartbeat")]
    pub executor_heartbeat_ms: u64,
    /// An executor silent for this long is declared lost (ms); at least two heartbeats, and
    /// more than `3 × election-timeout-max-ms − election-timeout-min-ms` (how long a leader
    /// cut off from the other masters may still serve executors).
    #[serde(default = "default_executor_ttl")]
    pub executor_ttl_ms: u64,
}

fn default_executor_heartbeat() -> u64 {
    millis(LivenessConfig::default().heartbeat_interval)
}
fn default_executor_ttl() -> u64 {
    millis(LivenessConfig::default().ttl)
}

fn default_cluster_id() -> String {
    "microcosm".into()
}
fn default_heartbeat() -> u64 {
    50
}
fn default_election_min() -> u64 {
    150
}
fn default_election_max() -> u64 {
    300
}
fn default_write_timeout() -> u64 {
    2000
}

/// Parses `id=ip:port`.
pub fn parse_member(s: &str) -> Result<(NodeId, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("initial-members entry {s:?} is not of the form id=host:port"))?;
    let id = id
        .trim()
        .parse::<NodeId>()
        .map_err(|e| format!("initial-members entry {s:?}: bad id: {e}"))?;
    let addr = addr
        .trim()
        .parse::<SocketAddr>()
        .map_err(|e| format!("initial-members entry {s:?}: bad address: {e}"))?;
    Ok((id, addr))
}

impl MasterConfig {
    /// Reads and parses a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, MasterError> {
        let text = std::fs::read_to_string(path).map_err(|source| MasterError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses a TOML config.
    pub fn from_toml(text: &str) -> Result<Self, MasterError> {
        toml::from_str(text).map_err(|e| MasterError::Config(crate::toml_error_line(&e, text)))
    }

    /// Checks values that parsing cannot.
    pub fn validate(&self) -> Result<(), MasterError> {
        let bad = |m: String| Err(MasterError::Config(m));
        if self.listen_addr.ip().is_unspecified() {
            // The address is also what the master tells the other masters and clients.
            return bad(format!(
                "listen-addr {} is not an address other masters, executors and clients can \
                 reach; give this host's own address (e.g. its LAN IP, or 127.0.0.1 for a \
                 local cluster)",
                self.listen_addr
            ));
        }
        if self.heartbeat_ms == 0 {
            return bad("heartbeat-ms must be > 0".into());
        }
        if self.election_timeout_min_ms <= self.heartbeat_ms {
            return bad(format!(
                "election-timeout-min-ms ({}) must be greater than heartbeat-ms ({})",
                self.election_timeout_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return bad(format!(
                "election-timeout-max-ms ({}) must be greater than election-timeout-min-ms ({})",
                self.election_timeout_max_ms, self.election_timeout_min_ms
            ));
        }
        if self.write_timeout_ms == 0 {
            return bad("write-timeout-ms must be > 0".into());
        }
        // A leader cut off from the other masters serves executors for up to 3 election
        // timeouts after it last heard from a quorum (`leader_standing`); the others elect a
        // new leader at the earliest one minimum election timeout after that, which grants
        // every executor a TTL. An executor must not be declared lost, and its tasks placed
        // elsewhere, while the old leader may still tell it to run them.
        let served_after_partition = (self.election_timeout_max_ms.saturating_mul(3))
            .saturating_sub(self.election_timeout_min_ms);
        if self.executor_ttl_ms <= served_after_partition {
            return bad(format!(
                "executor-ttl-ms ({}) must be greater than 3 x election-timeout-max-ms - \
                 election-timeout-min-ms ({served_after_partition}): a leader cut off from the \
                 other masters serves executors that long after they last heard from it",
                self.executor_ttl_ms
            ));
        }
        if !self.initial_members.is_empty() && !self.join.is_empty() {
            return bad(
                "set either initial-members (new cluster) or join (running cluster), not both"
                    .into(),
            );
        }
        let members = self.members().map_err(MasterError::Config)?;
        if !members.is_empty() {
            match members.get(&self.node_id) {
                None => {
                    return bad(format!(
                        "initial-members does not include this master (node-id {})",
                        self.node_id
                    ));
                }
                Some(own) if *own != self.listen_addr => {
                    return bad(format!(
                        "initial-members gives node {} the address {own}, but listen-addr is {}",
                        self.node_id, self.listen_addr
                    ));
                }
                Some(_) => {}
            }
        }
        self.liveness().validate().map_err(|e| {
            MasterError::Config(format!("executor-ttl-ms / executor-heartbeat-ms: {e}"))
        })?;
        for j in &self.join {
            j.parse::<SocketAddr>()
                .map_err(|e| MasterError::Config(format!("join address {j:?}: {e}")))?;
        }
        Ok(())
    }

    fn members(&self) -> Result<BTreeMap<NodeId, SocketAddr>, String> {
        let mut out = BTreeMap::new();
        for m in &self.initial_members {
            let (id, addr) = parse_member(m)?;
            if out.insert(id, addr).is_some() {
                return Err(format!("initial-members names node {id} twice"));
            }
        }
        Ok(out)
    }

    /// The timing settings every master of the cluster must share.
    pub fn timing(&self) -> crate::proto::MasterTiming {
        crate::proto::MasterTiming {
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            election_timeout_max_ms: self.election_timeout_max_ms,
            executor_heartbeat_ms: self.executor_heartbeat_ms,
            executor_ttl_ms: self.executor_ttl_ms,
        }
    }

    /// The executor liveness settings.
    pub fn liveness(&self) -> LivenessConfig {
        LivenessConfig {
            heartbeat_interval: Duration::from_millis(self.executor_heartbeat_ms),
            ttl: Duration::from_millis(self.executor_ttl_ms),
        }
    }

    /// The name, defaulted.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("master-{}", self.node_id))
    }
}

/// Makes sure the data dir exists and is writable.
fn check_data_dir(path: &Path) -> Result<(), MasterError> {
    let err = |reason: String| MasterError::DataDir {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create: {e}")))?;
    let probe = path.join(".write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| err(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Unix time in milliseconds: metadata timestamps for humans, and the leader's clock for the
/// restart budget's window ([`crate::leader::RESTART_WINDOW_MS`]); never used for liveness.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Raft over the QUIC RPC layer. Holds the endpoint weakly: the endpoint's router holds the
/// raft node, which holds this.
struct QuicRaft {
    endpoint: WeakEndpoint,
}

impl RaftTransport for QuicRaft {
    async fn call(
        &self,
        target: NodeId,
        node: &MasterNode,
        req: RaftRpc,
        timeout: Duration,
    ) -> Result<RaftRpcResponse, TransportFailure> {
        let unreachable = |reason: String| TransportFailure::Unreachable { target, reason };
        let network = |reason: String| TransportFailure::Network { target, reason };
        let addr = &node.addr;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| unreachable(format!("bad address {addr:?}: {e}")))?;
        let endpoint = self
            .endpoint
            .upgrade()
            .ok_or_else(|| unreachable("this master's endpoint is closed".into()))?;
        let envelope = RaftEnvelope {
            to: target,
            incarnation: node.incarnation,
            rpc: req,
        };
        let bytes = postcard::to_stdvec(&envelope).map_err(|e| network(e.to_string()))?;
        // The frame limit applies to the archived request: a little more than the blob.
        let limit = endpoint.config().max_frame_bytes as usize;
        if bytes.len() + 1024 > limit {
            return Err(TransportFailure::TooLarge {
                target,
                reason: format!("{} bytes, the frame limit is {limit} bytes", bytes.len()),
            });
        }
        match endpoint
            .call_timeout::<RaftMessage>(addr, &Blob { bytes }, timeout)
            .await
        {
            Ok(blob) => postcard::from_bytes(&blob.bytes)
                .map_err(|e| network(format!("bad raft response: {e}"))),
            Err(e @ RpcError::Unreachable { .. }) => Err(unreachable(e.to_string())),
            Err(e) => Err(network(e.to_string())),
        }
    }
}

struct Shared {
    node: OnceLock<Arc<MetaNode>>,
    /// Weak: the endpoint's router holds this.
    endpoint: OnceLock<WeakEndpoint>,
    catalog: Arc<dyn JobCatalog>,
    reports: Mutex<Reports>,
    liveness: Mutex<LivenessTracker>,
    liveness_config: LivenessConfig,
    /// This master's timing settings; a master joining with others is refused.
    timing: crate::proto::MasterTiming,
    checkpoints: Mutex<CheckpointTracker>,
    /// Wakes the leader loop before its sleep ends (a heartbeat brought changed task
    /// reports).
    step_now: tokio::sync::Notify,
    /// Set while a master started with `join` has not been accepted as a voter of its data
    /// dir's incarnation: it casts no votes meanwhile (see `join_on_leader`). A restarted
    /// master clears it once its stored membership shows it a voter, or once recorded.
    joining: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The cluster accepted this master (or it needs no join): it may vote.
    fn joined(&self) {
        self.joining
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

fn unavailable(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorCode::Unavailable, msg)
}

impl Shared {
    fn node(&self) -> Result<&Arc<MetaNode>, RemoteError> {
        self.node
            .get()
            .ok_or_else(|| unavailable("master is starting"))
    }

    /// Applies `request` through the leader: locally if this master leads, otherwise
    /// forwarded; waits through elections until `deadline`.
    async fn propose(
        &self,
        request: MetaRequest,
        timeout: Duration,
    ) -> Result<CommandResponse, RemoteError> {
        let node = self.node()?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last;
        loop {
            match node.write(request.clone()).await {
                Ok(resp) => return Ok(resp),
                Err(MetaError::ForwardToLeader {
                    leader_addr: Some(addr),
                    ..
                }) => match self.forward(&addr, &request, deadline).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) if e.is_retryable() => last = e.to_string(),
                    Err(e) => {
                        return Err(e
                            .remote()
                            .cloned()
                            .unwrap_or_else(|| unavailable(e.to_string())));
                    }
                },
                Err(e @ MetaError::ForwardToLeader { .. }) => last = e.to_string(),
                Err(e @ MetaError::NoQuorum(_)) => {
                    return Err(unavailable(format!(
                        "{e} (the write may still be applied once a quorum returns)"
                    )));
                }
                Err(e) if e.is_retryable() => last = e.to_string(),
                Err(e) => return Err(RemoteError::new(ErrorCode::Internal, e.to_string())),
            }
            if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(unavailable(format!(
                    "no quorum: write not accepted in time ({last}); it may still be applied once a quorum returns"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn forward(
        &self,
        addr: &str,
        request: &MetaRequest,
        deadline: tokio::time::Instant,
    ) -> Result<CommandResponse, RpcError> {
        let endpoint = self
            .endpoint
            .get()
            .and_then(WeakEndpoint::upgrade)
            .ok_or_else(|| RpcError::Remote(unavailable("this master is starting or stopping")))?;
        let addr: SocketAddr = addr.parse().map_err(|e| {
            RpcError::Remote(RemoteError::new(
                ErrorCode::Internal,
                format!(
                    "the leader's address {addr:?} in the membership is not a socket address: {e}"
                ),
            ))
        })?;
        let bytes = postcard::to_stdvec(request).map_err(|e| RpcError::Encode(e.to_string()))?;
        // Short attempts: a connection to a leader that just restarted looks alive until a call
        // on it times out (which drops it); the retry then dials the new process. Retries are
        // safe because the request id deduplicates.
        let timeout = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(FORWARD_ATTEMPT);
        let blob = endpoint
            .call_timeout::<ForwardWrite>(addr, &Blob { bytes }, timeout)
            .await?;
        postcard::from_bytes(&blob.bytes).map_err(|e| {
            RpcError::Remote(RemoteError::new(
                ErrorCode::Internal,
                format!("the leader's answer to a forwarded write cannot be decoded: {e}"),
            ))
        })
    }

    fn status(&self) -> Result<NodeStatus, RemoteError> {
        let node = self.node()?;
        let s = node.status();
        let cfg = node.config();
        let membership = node.raft().metrics().borrow().membership_config.clone();
        let members = membership
            .nodes()
            .map(|(id, n)| MemberInfo {
                id: *id,
                addr: n.addr.clone(),
                name: n.name.clone(),
                voter: s.voters.contains(id),
            })
            .collect();
        let executors = node.read_local(|st| {
            let used = crate::leader::used_slots(st, None);
            st.executors
                .values()
                .map(|e| ExecutorInfo {
                    id: e.id.0,
                    addr: e.addr.clone(),
                    name: e.name.clone(),
                    state: format!("{:?}", e.state).to_lowercase(),
                    slots: e.slots,
                    used: u32::try_from(used.get(&e.id).copied().unwrap_or(0)).unwrap_or(u32::MAX),
                    incarnation: e.incarnation,
                    lost_reason: e
                        .lost
                        .as_ref()
                        .map(|(why, _)| why.clone())
                        .unwrap_or_default(),
                })
                .collect()
        });
        Ok(NodeStatus {
            id: cfg.node_id,
            name: cfg.name.clone(),
            addr: cfg.addr.clone(),
            role: role_name(s.role).into(),
            term: s.term,
            last_applied: s.last_applied,
            leader_id: s.leader,
            members,
            executors,
        })
    }

    fn job_info(&self, id: u64) -> Result<JobInfo, RemoteError> {
        let mut info = self.node()?.read_local(|st| {
            st.jobs
                .get(&JobId(id))
                .map(|j| job_info(st, j))
                .ok_or_else(|| {
                    RemoteError::new(ErrorCode::NotFound, format!("unknown job id {id}"))
                })
        })?;
        info.stale = self.staleness();
        Ok(info)
    }

    /// Why a read from this master may be stale, if it may be: reads are answered from the
    /// local applied state, which is current only while a leader holds a quorum.
    fn staleness(&self) -> Option<String> {
        let node = self.node.get()?;
        let m = node.raft().metrics().borrow().clone();
        let patience = 3 * node.config().election_max_ms;
        match (m.current_leader, m.state) {
            (None, _) => Some(
                "no leader: the masters have no quorum or are electing one; this answer may be stale"
                    .into(),
            ),
            (Some(_), ServerState::Leader)
                if m.millis_since_quorum_ack.is_none_or(|ms| ms > patience) =>
            {
                Some(format!(
                    "this master leads but has not heard from a quorum for over {patience} ms; this answer may be stale"
                ))
            }
            _ => None,
        }
    }
}

/// A job in brief, as [`ListJobs`] lists it: without its spec and history (up to 64 KiB and
/// 256 entries each), so that the list of a long-lived cluster still fits in a frame.
fn job_summary(st: &MetaState, j: &crate::meta::state::JobRecord) -> JobInfo {
    let mut info = job_info(st, j);
    info.spec = String::new();
    info.history = Vec::new();
    info
}

fn job_info(st: &MetaState, j: &crate::meta::state::JobRecord) -> JobInfo {
    job_info_at(st, j, unix_ms())
}

/// [`job_info`] as of `now_ms` (which counts the restarts within the budget's window).
fn job_info_at(st: &MetaState, j: &crate::meta::state::JobRecord, now_ms: u64) -> JobInfo {
    JobInfo {
        id: j.id.0,
        job_type: j.job_type.clone(),
        state: j.state.to_string(),
        reason: j
            .history
            .last()
            .map(|h| h.reason.clone())
            .unwrap_or_default(),
        epoch: j.epoch,
        tasks: j.tasks.len() as u32,
        history: j
            .history
            .iter()
            .map(|h| JobTransitionInfo {
                state: h.state.to_string(),
                reason: h.reason.clone(),
                at_ms: h.at_ms,
            })
            .collect(),
        spec: j.spec.clone(),
        stale: None,
        checkpoint: st.checkpoint(j.id).map(|c| CheckpointInfo {
            id: c.checkpoint_id,
            epoch: c.epoch,
            at_ms: c.at_ms,
        }),
        restored_from: j.restored_from,
        restarts: j.restarts,
        recent_restarts: u32::try_from(crate::leader::restarts_in_window(j, now_ms))
            .unwrap_or(u32::MAX),
    }
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn response_error(resp: CommandResponse) -> RemoteError {
    match resp {
        CommandResponse::Rejected(r) => {
            RemoteError::new(ErrorCode::FailedPrecondition, r.to_string())
        }
        other => RemoteError::new(
            ErrorCode::Internal,
            format!("unexpected response {other:?}"),
        ),
    }
}

/// Longest single attempt to forward a write to the leader.
const FORWARD_ATTEMPT: Duration = Duration::from_millis(600);

/// How long a client-facing write may wait for a leader.
const WRITE_PATIENCE: Duration = Duration::from_millis(2500);

fn router(shared: Arc<Shared>) -> Router {
    let s1 = shared.clone();
    let s2 = shared.clone();
    let s3 = shared.clone();
    let s4 = shared.clone();
    let s5 = shared.clone();
    let s6 = shared.clone();
    let s7 = shared.clone();
    let s8 = shared.clone();
    let s9 = shared.clone();
    let s10 = shared.clone();
    let s11 = shared.clone();
    Router::new()
        .route::<RaftMessage, _, _>(move |_peer: Peer, blob: Blob| {
            let shared = s1.clone();
            async move {
                let node = shared.node()?;
                let envelope: RaftEnvelope = postcard::from_bytes(&blob.bytes).map_err(|e| {
                    RemoteError::new(ErrorCode::BadRequest, format!("bad raft message: {e}"))
                })?;
                if let Some(why) = envelope.misaddressed(node.config().node_id, node.incarnation())
                {
                    warn!(reason = %why, "refusing a raft message");
                    return Err(RemoteError::new(ErrorCode::InvalidArgument, why));
                }
                let rpc = envelope.rpc;
                if matches!(rpc, RaftRpc::Vote(_))
                    && shared.joining.load(std::sync::atomic::Ordering::Acquire)
                {
                    // Until the cluster accepted this master's data dir, it may be one that
                    // replaced a lost one: its empty log must not help elect anyone.
                    return Err(unavailable("joining the cluster: casting no votes yet"));
                }
                let resp = handle_raft_rpc(node.raft(), rpc).await;
                let bytes = postcard::to_stdvec(&resp)
                    .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?;
                Ok(Blob { bytes })
            }
        })
        .route::<ForwardWrite, _, _>(move |_peer, blob: Blob| {
            let shared = s2.clone();
            async move {
                let node = shared.node()?;
                let req: MetaRequest = postcard::from_bytes(&blob.bytes).map_err(|e| {
                    RemoteError::new(ErrorCode::BadRequest, format!("bad forwarded write: {e}"))
                })?;
                // The forwarder retries; one hop only, so a stale hint cannot loop.
                let resp = node
                    .write(req)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                let bytes = postcard::to_stdvec(&resp)
                    .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?;
                Ok(Blob { bytes })
            }
        })
        .route::<JoinCluster, _, _>(move |_peer, req: JoinRequest| {
            let shared = s3.clone();
            async move { join_on_leader(&shared, req).await }
        })
        .route::<GetNodeStatus, _, _>(move |_peer, _: Nothing| {
            let shared = s4.clone();
            async move { shared.status() }
        })
        .route::<SubmitJob, _, _>(move |_peer, req: crate::proto::SubmitJobRequest| {
            let shared = s5.clone();
            async move {
                crate::meta::state::check_submission(&req.job_type, &req.spec)
                    .map_err(|r| RemoteError::new(ErrorCode::InvalidArgument, r.to_string()))?;
                shared
                    .catalog
                    .validate(&req.job_type, &req.spec)
                    .map_err(|m| RemoteError::new(ErrorCode::InvalidArgument, m))?;
                let request = MetaRequest {
                    id: RequestId {
                        client: crate::meta::state::external_client(req.client_id),
                        seq: req.seq,
                    },
                    command: Command::SubmitJob {
                        job_type: req.job_type,
                        spec: req.spec,
                        at_ms: unix_ms(),
                    },
                };
                match shared.propose(request, WRITE_PATIENCE).await? {
                    // The leader's loop wakes when it applies the submission, through
                    // whichever master it came.
                    CommandResponse::JobSubmitted { id } => Ok(JobRef { id: id.0 }),
                    other => Err(response_error(other)),
                }
            }
        })
        .route::<ListJobs, _, _>(move |_peer, _: Nothing| {
            let shared = s6.clone();
            async move {
                let jobs = shared
                    .node()?
                    .read_local(|st| st.jobs.values().map(|j| job_summary(st, j)).collect());
                Ok(JobList {
                    jobs,
                    stale: shared.staleness(),
                })
            }
        })
        .route::<GetJob, _, _>(move |_peer, r: JobRef| {
            let shared = s7.clone();
            async move { shared.job_info(r.id) }
        })
        .route::<ControlJob, _, _>(move |_peer, req: crate::proto::JobControlRequest| {
            let shared = s8.clone();
            async move { control_job(&shared, req).await }
        })
        .route::<RegisterExecutor, _, _>(move |_peer, req: RegisterRequest| {
            let shared = s9.clone();
            async move { register_executor(&shared, req).await }
        })
        .route::<Heartbeat, _, _>(move |_peer, req: HeartbeatRequest| {
            let shared = s10.clone();
            async move { heartbeat(&shared, req) }
        })
        .route::<ReportCheckpoints, _, _>(move |_peer, req: CheckpointReports| {
            let shared = s11.clone();
            async move { report_checkpoints(&shared, req).await }
        })
        .route::<DeregisterExecutor, _, _>(move |_peer, req: DeregisterRequest| {
            let shared = shared.clone();
            async move { deregister_executor(&shared, req).await }
        })
}

/// An executor that shuts down leaves: it is declared lost now (if it is the registered
/// incarnation and alive), which moves its tasks as a loss does, without a restart.
async fn deregister_executor(
    shared: &Shared,
    req: DeregisterRequest,
) -> Result<Nothing, RemoteError> {
    let node = shared.node()?;
    let id = crate::meta::ExecutorId(req.executor_id);
    let current = node.read_local(|st| {
        st.executor(id).is_some_and(|e| {
            e.state == crate::meta::ExecutorState::Alive && e.incarnation == req.incarnation
        })
    });
    if !current {
        return Ok(Nothing::default());
    }
    let request = node.request(Command::ExecutorLost {
        id,
        reason: "shut down: it left the cluster".into(),
        at_ms: unix_ms(),
    });
    match shared.propose(request, WRITE_PATIENCE).await? {
        CommandResponse::ExecutorLost { .. } | CommandResponse::Rejected(_) => {
            info!(executor = req.executor_id, "executor left the cluster");
            if shared.is_leader() {
                lock(&shared.liveness).remove(req.executor_id);
                shared.step_now.notify_one();
            }
            Ok(Nothing::default())
        }
        other => Err(response_error(other)),
    }
}

/// Feeds executors' checkpoint reports to the tracker and commits what completes.
async fn report_checkpoints(
    shared: &Shared,
    req: CheckpointReports,
) -> Result<ReportsTaken, RemoteError> {
    let node = shared.node()?;
    let term = shared.serving_leader()?;
    // The batch's jobs as the tracker needs them, read in one go before the tracker is
    // locked (the leader loop takes the two locks the other way round).
    let jobs: BTreeSet<u64> = req.reports.iter().map(|r| r.job).collect();
    let views: HashMap<u64, JobView> = node.read_local(|st| {
        jobs.iter()
            .filter_map(|&id| {
                let job = st.jobs.get(&JobId(id))?;
                (!job.state.is_terminal()).then(|| {
                    let view = JobView {
                        epoch: job.epoch,
                        tasks: job.tasks.len() as u32,
                        committed: st.checkpoint(job.id).map(|c| c.checkpoint_id),
                    };
                    (id, view)
                })
            })
            .collect()
    });
    let (newest, refused) =
        lock(&shared.checkpoints).report_batch(req.reports, term, |job| views.get(&job).copied());
    for e in refused {
        // Reports of a replaced attempt arrive while it is being stopped: expected.
        debug!(executor = req.executor_id, error = %e, "checkpoint report ignored");
    }
    for done in newest.into_values() {
        // A job's tasks never change once allocated (a second allocation is refused).
        let tasks = node.read_local(|st| {
            st.jobs
                .get(&JobId(done.job))
                .map(|j| j.tasks.clone())
                .unwrap_or_default()
        });
        let bytes: usize = done.states.iter().map(|(_, s)| s.len()).sum();
        if bytes > MAX_CHECKPOINT_BYTES {
            warn!(
                job = done.job,
                checkpoint = done.checkpoint,
                bytes,
                limit = MAX_CHECKPOINT_BYTES,
                "checkpoint not committed: its task state is larger than the masters keep"
            );
            continue;
        }
        let states = done
            .states
            .into_iter()
            .filter_map(|(index, state)| tasks.get(index as usize).map(|t| (*t, state)))
            .collect();
        let command = Command::CommitCheckpoint {
            job: JobId(done.job),
            epoch: done.epoch,
            checkpoint_id: done.checkpoint,
            states,
            at_ms: unix_ms(),
        };
        match node.write(node.request(command)).await {
            Ok(CommandResponse::CheckpointCommitted) => {
                debug!(
                    job = done.job,
                    checkpoint = done.checkpoint,
                    "checkpoint committed"
                );
            }
            Ok(other) => {
                debug!(job = done.job, checkpoint = done.checkpoint, response = ?other, "checkpoint not committed");
            }
            Err(e) => {
                warn!(job = done.job, checkpoint = done.checkpoint, error = %e, "checkpoint not committed");
            }
        }
    }
    Ok(ReportsTaken { term })
}

/// How often a pause, resume or cancel is planned again when the job changed state between
/// the read and the write (a leader step or another user's request got there first).
const CONTROL_ATTEMPTS: u32 = 5;

async fn control_job(
    shared: &Shared,
    req: crate::proto::JobControlRequest,
) -> Result<JobInfo, RemoteError> {
    let event = match req.action {
        JobAction::Cancel => crate::job::JobEvent::CancelRequested,
        JobAction::Pause => crate::job::JobEvent::PauseRequested,
        JobAction::Resume => crate::job::JobEvent::ResumeRequested,
    };
    let node = shared.node()?;
    let mut last_change = None;
    for attempt in 0..CONTROL_ATTEMPTS {
        if attempt > 0 {
            // Let this replica apply what changed the job before planning again.
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
        }
        let current = shared.job_info(req.id)?;
        let state = node
            .read_local(|st| st.jobs.get(&JobId(req.id)).map(|j| j.state))
            .ok_or_else(|| {
                RemoteError::new(ErrorCode::NotFound, format!("unknown job id {}", req.id))
            })?;
        // Asking for the state a job is already in is not an error.
        match (req.action, state) {
            (JobAction::Pause, JobState::Paused)
            | (JobAction::Resume, JobState::Running)
            | (JobAction::Cancel, JobState::Cancelling | JobState::Cancelled) => {
                return Ok(current);
            }
            _ => {}
        }
        let transition = crate::job::next(state, &event).map_err(|e| {
            RemoteError::new(
                ErrorCode::FailedPrecondition,
                format!("job {}: {e}", req.id),
            )
        })?;
        let command = Command::SetJobState {
            job: JobId(req.id),
            from: state,
            state: transition.to,
            reason: transition.reason,
            cause: transition.cause,
            at_ms: unix_ms(),
        };
        // The first attempt carries the client's id, so that the client's own retry of a
        // lost answer is deduplicated; a new plan after a refusal is a new write.
        let request = if attempt == 0 {
            MetaRequest {
                id: RequestId {
                    client: crate::meta::state::external_client(req.client_id),
                    seq: req.seq,
                },
                command,
            }
        } else {
            node.request(command)
        };
        match shared.propose(request, WRITE_PATIENCE).await? {
            CommandResponse::JobStateSet => return shared.job_info(req.id),
            CommandResponse::Rejected(r @ Rejection::StateChanged { .. }) => {
                debug!(job = req.id, refused = %r, "job changed state meanwhile; planning again");
                last_change = Some(r);
            }
            other => return Err(response_error(other)),
        }
    }
    Err(RemoteError::new(
        ErrorCode::Unavailable,
        format!(
            "job {} kept changing state; try again ({})",
            req.id,
            last_change.map_or_else(String::new, |r| r.to_string())
        ),
    ))
}

use crate::proto::JoinRequest;

/// The refusal of a join under the id of a voter from another data dir.
fn refused_join(id: u64) -> RemoteError {
    RemoteError::new(
        ErrorCode::InvalidArgument,
        format!(
            "master {id} is already a voter of this cluster with another data dir; a master whose data dir was lost must join under a new node-id"
        ),
    )
}

/// How long the leader works on one join request. The joining master asks again while it has
/// not joined (see [`join`]); a learner already added is not added again, so its catch-up goes
/// on across requests.
const JOIN_PATIENCE: Duration = Duration::from_secs(10);

async fn join_on_leader(shared: &Shared, req: JoinRequest) -> Result<Nothing, RemoteError> {
    let node = shared.node()?;
    // The leader's settings are the cluster's: another master forwards the request unchecked
    // (it may be the one whose settings are off).
    let differences = if node.role() == openraft::ServerState::Leader {
        shared.timing.differences(&req.timing)
    } else {
        Vec::new()
    };
    if !differences.is_empty() {
        return Err(RemoteError::new(
            ErrorCode::InvalidArgument,
            format!(
                "master {} has other timing settings than the cluster: {}; every master of a \
                 cluster runs the same heartbeat-ms, election-timeout-min-ms, \
                 election-timeout-max-ms, executor-heartbeat-ms and executor-ttl-ms",
                req.node_id,
                differences.join(", ")
            ),
        ));
    }
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let master = MasterNode::new(req.addr.clone(), req.name.clone())
        .with_incarnation(req.incarnation)
        .with_start(req.start);
    let (known, voter) = node.member(req.node_id);
    if let Some(known) = known
        && known.incarnation != req.incarnation
        && voter
        // A master named in the bootstrap has no incarnation on record (0) until it states
        // its own, from its data dir.
        && !(known.incarnation == 0 && req.has_log)
    {
        // The voter's data dir was lost and it came back under its id: with an empty log
        // it could help elect a leader that lacks committed entries. (A learner's is
        // replaced: see `MetaNode::add_learner`.)
        return Err(refused_join(req.node_id));
    }
    loop {
        let result = async {
            if node.is_settled_voter(req.node_id) {
                // A voter asking again: restarted at another address, or stating the
                // incarnation its bootstrap did not record.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                return tokio::time::timeout(left, node.update_member(req.node_id, master.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(MetaError::NoQuorum("member update timed out".into()))
                    });
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            node.add_learner(req.node_id, master.clone(), left).await?;
            // Also completes a change left joint by a promotion that timed out.
            node.promote_voter(req.node_id).await
        }
        .await;
        match result {
            Ok(()) => {
                info!(node = req.node_id, addr = %req.addr, "master joined as voter");
                return Ok(Nothing::default());
            }
            Err(MetaError::ForwardToLeader {
                leader_addr: Some(addr),
                ..
            }) => {
                let endpoint = shared
                    .endpoint
                    .get()
                    .and_then(WeakEndpoint::upgrade)
                    .ok_or_else(|| unavailable("starting or stopping"))?;
                let addr: SocketAddr = addr.parse().map_err(|e| {
                    RemoteError::new(ErrorCode::Internal, format!("bad leader address: {e}"))
                })?;
                let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
                return endpoint
                    .call_timeout::<JoinCluster>(addr, &req, timeout)
                    .await
                    .map_err(|e| {
                        e.remote()
                            .cloned()
                            .unwrap_or_else(|| unavailable(e.to_string()))
                    });
            }
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(MetaError::Membership(m)) => {
                return Err(RemoteError::new(ErrorCode::InvalidArgument, m));
            }
            Err(e) => return Err(unavailable(e.to_string())),
        }
    }
}

/// A running master.
pub struct MasterServer {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    leader_loop: tokio::task::JoinHandle<()>,
    /// Asks the cluster to record this master as it is now, for a restarted or bootstrapped
    /// master (see [`rejoin_until_recorded`]).
    rejoin: Option<tokio::task::JoinHandle<()>>,
}

impl MasterServer {
    /// Starts a master: opens (or creates) its store, serves the API, and bootstraps or joins
    /// the cluster if the store is new.
    pub async fn start(
        config: MasterConfig,
        catalog: Arc<dyn JobCatalog>,
    ) -> Result<Self, MasterError> {
        config.validate()?;
        check_data_dir(&config.data_dir)?;
        let identity = Identity::load(&config.certs_dir, Role::Master)?;
        let liveness_config = config.liveness();
        let liveness = LivenessTracker::new(liveness_config)
            .map_err(|e| MasterError::Config(e.to_string()))?;
        let shared = Arc::new(Shared {
            node: OnceLock::new(),
            endpoint: OnceLock::new(),
            catalog,
            reports: Mutex::new(Reports::new()),
            liveness: Mutex::new(liveness),
            liveness_config,
            timing: config.timing(),
            checkpoints: Mutex::new(CheckpointTracker::new()),
            step_now: tokio::sync::Notify::new(),
            joining: std::sync::atomic::AtomicBool::new(!config.join.is_empty()),
        });
        let endpoint = Endpoint::bind(
            config.listen_addr,
            &identity,
            TransportConfig::default(),
            router(shared.clone()),
        )?;
        let _ = shared.endpoint.set(endpoint.downgrade());
        let mut rejoin = None;
        let started = async {
            let addr = endpoint.local_addr().to_string();
            let mut meta = MetaConfig::new(
                config.node_id,
                addr.clone(),
                &config.data_dir,
                &config.cluster_id,
            );
            meta.name = config.name();
            meta.heartbeat_ms = config.heartbeat_ms;
            meta.election_min_ms = config.election_timeout_min_ms;
            meta.election_max_ms = config.election_timeout_max_ms;
            meta.write_timeout_ms = config.write_timeout_ms;
            // Elections start once this master knows it is reachable where the others look
            // for it (below, or in `rejoin_until_recorded`).
            meta.elect = false;
            let node = Arc::new(
                MetaNode::start(
                    meta,
                    Arc::new(QuicRaft {
                        endpoint: endpoint.downgrade(),
                    }),
                )
                .await?,
            );
            let _ = shared.node.set(node.clone());
            // Whether to ask the cluster to record this master's address and data dir.
            let mut record = false;
            let initialized = node
                .raft()
                .is_initialized()
                .await
                .map_err(|e| MasterError::Meta(MetaError::Stopped(e.to_string())))?;
            if initialized {
                info!(
                    node = config.node_id,
                    "restarted from data dir; rejoining the cluster"
                );
                // A join that failed part-way (the learner was added and got entries, then
                // the join timed out) leaves a data dir that is no longer new; a voter may
                // have come back at another address, or not have stated its incarnation.
                // The task finds out which, once the stored membership is loaded.
                record = true;
            } else if !config.initial_members.is_empty() {
                let members = config
                    .members()
                    .map_err(MasterError::Config)?
                    .into_iter()
                    .map(|(id, a)| {
                        let name = if id == config.node_id {
                            config.name()
                        } else {
                            format!("master-{id}")
                        };
                        // Incarnation 0 (unknown) for every member, this one too: every
                        // master writes this first entry itself, and the same log id must
                        // hold the same entry everywhere.
                        (id, MasterNode::new(a.to_string(), name))
                    })
                    .collect();
                shared.joined();
                node.set_electing(true);
                node.bootstrap(members).await?;
                info!(node = config.node_id, "bootstrapped a new cluster");
                // The bootstrap entry knows no master's incarnation: state this one's, so
                // that a master coming back under this id must show the same data dir.
                record = true;
            } else if !config.join.is_empty() {
                let via: Vec<SocketAddr> =
                    config.join.iter().filter_map(|a| a.parse().ok()).collect();
                join(&endpoint, &config, &addr, &node, &via, JOIN_DEADLINE).await?;
                node.set_electing(true);
                shared.joined();
            } else {
                return Err(MasterError::Config(
                    "a new data dir needs initial-members (new cluster) or join (running cluster)"
                        .into(),
                ));
            }
            if record {
                rejoin = Some(tokio::spawn(rejoin_until_recorded(
                    endpoint.downgrade(),
                    Arc::downgrade(&node),
                    Arc::downgrade(&shared),
                    config.clone(),
                    addr.clone(),
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = started {
            if let Some(rejoin) = &rejoin {
                rejoin.abort();
            }
            // Leave nothing running: the router holds `shared`, which holds the endpoint, so
            // dropping them would close neither the endpoint nor the raft node and its store.
            if let Some(node) = shared.node.get()
                && let Err(e) = node.shutdown().await
            {
                warn!(error = %e, "raft shutdown after a failed start");
            }
            endpoint.close();
            return Err(e);
        }
        let leader_loop = tokio::spawn(leader_loop(shared.clone()));
        Ok(Self {
            shared,
            endpoint,
            leader_loop,
            rejoin,
        })
    }

    /// The address the master serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// This master's status.
    pub fn status(&self) -> Option<NodeStatus> {
        self.shared.status().ok()
    }

    /// Stops serving and shuts the raft node down.
    pub async fn shutdown(self) {
        self.leader_loop.abort();
        if let Some(rejoin) = &self.rejoin {
            rejoin.abort();
        }
        if let Some(node) = self.shared.node.get()
            && let Err(e) = node.shutdown().await
        {
            warn!(error = %e, "raft shutdown");
        }
        self.endpoint.close();
    }
}

/// How long a restarted master waits for its stored membership to show in the raft metrics.
const MEMBERSHIP_LOAD_WAIT: Duration = Duration::from_secs(10);

/// How long a restarted master waits between two rounds of asking to be recorded.
const REJOIN_PAUSE: Duration = Duration::from_secs(5);

/// How long one such round asks: longer than a leader takes to answer one request
/// ([`JOIN_PATIENCE`]), so that a round without an answer means no leader answered.
const REJOIN_ROUND: Duration = Duration::from_secs(15);

/// Whether the committed membership has master `node` as a settled voter of its own address,
/// name and data-dir incarnation, recorded by this start or a later one.
fn recorded(node: &MetaNode) -> bool {
    node.has_recorded(node.status().id, &node.master_node())
}

/// Where to ask to join: the `join` addresses and the other members' (this master's view).
fn join_via(config: &MasterConfig, node: &MetaNode) -> Vec<SocketAddr> {
    let mut via: Vec<SocketAddr> = config.join.iter().filter_map(|a| a.parse().ok()).collect();
    let m = node.raft().metrics().borrow().membership_config.clone();
    for (id, member) in m.membership().nodes() {
        if *id != config.node_id
            && let Ok(a) = member.addr.parse::<SocketAddr>()
            && !via.contains(&a)
        {
            via.push(a);
        }
    }
    via
}

/// Asks the cluster to record this restarted (or bootstrapped) master as a voter of its own
/// address, name, data-dir incarnation and start until it is one, or the master stops (its
/// endpoint or raft node gone): a master restarted as a learner (its join stopped part-way),
/// one restarted at another address, whose entry still names the old one, one restarted in
/// place (its start, so that no request of an earlier start can move it), and one named in
/// the bootstrap, whose incarnation no one knew then. Asks through `config.join` and the
/// other members; as the leader, updates its entry itself.
///
/// Turns on this master's elections (off from its start) at once unless its entry names
/// another address; then once its entry is updated, once a round of asking went unanswered
/// (no leader to unseat, and the others may need this master for a quorum), or once it is
/// refused. A voter with its log votes from the start.
async fn rejoin_until_recorded(
    endpoint: WeakEndpoint,
    node: std::sync::Weak<MetaNode>,
    shared: std::sync::Weak<Shared>,
    config: MasterConfig,
    addr: String,
) {
    let joined = || {
        if let Some(shared) = shared.upgrade() {
            shared.joined();
        }
    };
    // Right after a start the metrics may not show the stored membership yet.
    if let Some(meta) = node.upgrade() {
        let id = config.node_id;
        let _ = meta
            .raft()
            .wait(Some(MEMBERSHIP_LOAD_WAIT))
            .metrics(
                |m| m.membership_config.membership().get_node(&id).is_some(),
                "the stored membership is loaded",
            )
            .await;
        if meta.is_settled_voter(id) {
            // Its log is its own: its votes count as before.
            joined();
        }
        match meta.member(id).0 {
            Some(entry) if entry.addr != meta.config().addr => info!(
                node = id,
                recorded = %entry.addr,
                "restarted at another address than the cluster has on record: no elections \
                 until the cluster records this one"
            ),
            _ => meta.set_electing(true),
        }
    }
    let mut asked = false;
    loop {
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        let meta = match node.upgrade() {
            Some(meta) if recorded(&meta) => {
                meta.set_electing(true);
                joined();
                info!(
                    node = config.node_id,
                    "the cluster has this master's address and data dir on record"
                );
                return;
            }
            Some(meta) => meta,
            None => return,
        };
        if !asked {
            asked = true;
            info!(
                node = config.node_id,
                voter = meta.is_settled_voter(config.node_id),
                "asking the cluster to record this master's address and data dir"
            );
        }
        // A leader restored from its stored vote at its start may be deposed already: what it
        // fails to write says nothing about whether a leader elsewhere answers.
        let leading = meta.role() == openraft::ServerState::Leader;
        let answer = if leading {
            meta.update_member(config.node_id, meta.master_node())
                .await
                .map_err(|e| JoinFailure::Unanswered(MasterError::Meta(e)))
        } else {
            let via = join_via(&config, &meta);
            join(&endpoint, &config, &addr, &meta, &via, REJOIN_ROUND).await
        };
        let pause = match answer {
            Ok(()) => {
                // Done once the change is applied here: wait for it, then look again.
                meta.wait_recorded(config.node_id, &meta.master_node(), REJOIN_PAUSE)
                    .await;
                Duration::ZERO
            }
            Err(JoinFailure::Refused(e)) => {
                // Nothing to wait for: it goes on as the member it was.
                meta.set_electing(true);
                joined();
                warn!(error = %e, "the cluster refused this master's membership entry");
                return;
            }
            Err(JoinFailure::Unanswered(e)) => {
                if !leading {
                    meta.set_electing(true);
                }
                warn!(error = %e, "membership entry not updated yet; asking again");
                REJOIN_PAUSE
            }
        };
        drop(meta);
        drop(endpoint);
        tokio::time::sleep(pause).await;
    }
}

/// Why [`join`] did not make this master a voter.
enum JoinFailure {
    /// The cluster refused it; asking again would not change that.
    Refused(MasterError),
    /// No master said yes within the join's time.
    Unanswered(MasterError),
}

impl From<JoinFailure> for MasterError {
    fn from(f: JoinFailure) -> MasterError {
        match f {
            JoinFailure::Refused(e) | JoinFailure::Unanswered(e) => e,
        }
    }
}

/// How long a master keeps asking to join.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);

/// How long one join request may take under write timeout `write_timeout`: longer than the
/// leader works on one ([`JOIN_PATIENCE`], plus the two writes it may have started by then),
/// so that a request is not asked again while the leader still works on it.
fn join_call_timeout(write_timeout: Duration) -> Duration {
    JOIN_PATIENCE + write_timeout.saturating_mul(2) + Duration::from_secs(2)
}

/// Asks the masters at `via` to make this master (raft node `node`) a voter (or to record its
/// entry anew), naming its data dir's incarnation and start, for at most `patience`. The
/// cluster's refusal ends it at once, as does every address answering as no master of this
/// cluster would.
async fn join(
    endpoint: &Endpoint,
    config: &MasterConfig,
    addr: &str,
    node: &MetaNode,
    via: &[SocketAddr],
    patience: Duration,
) -> Result<(), JoinFailure> {
    let addrs = via;
    let deadline = tokio::time::Instant::now() + patience;
    let has_log = node.raft().is_initialized().await.unwrap_or(false);
    let req = JoinRequest {
        node_id: config.node_id,
        addr: addr.to_string(),
        name: config.name(),
        incarnation: node.incarnation(),
        start: node.master_node().start,
        timing: config.timing(),
        has_log,
    };
    let failed = |reason: String| MasterError::Join {
        addrs: addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(","),
        reason,
    };
    if addrs.is_empty() {
        return Err(JoinFailure::Unanswered(failed("no master to ask".into())));
    }
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        // Addresses that answered as no master of this cluster would (another process
        // there now, e.g. at a moved master's old address) this round.
        let mut not_masters = 0;
        for a in addrs {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let timeout = join_call_timeout(Duration::from_millis(config.write_timeout_ms))
                .min(left.max(Duration::from_secs(1)));
            match endpoint
                .call_timeout::<JoinCluster>(*a, &req, timeout)
                .await
            {
                Ok(_) => {
                    info!(node = config.node_id, via = %a, "joined the cluster");
                    return Ok(());
                }
                // The cluster's answer: asking again cannot change it.
                Err(e) if e.remote().is_some_and(|r| r.is(ErrorCode::InvalidArgument)) => {
                    return Err(JoinFailure::Refused(failed(e.to_string())));
                }
                Err(e) if !e.is_retryable() => {
                    warn!(via = %a, error = %e, "not a master of this cluster; asking the others");
                    not_masters += 1;
                    last = format!("{a}: {e}");
                }
                Err(e) => {
                    warn!(via = %a, error = %e, "join attempt failed");
                    last = format!("{a}: {e}");
                }
            }
        }
        if not_masters == addrs.len() {
            return Err(JoinFailure::Refused(failed(last)));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(JoinFailure::Unanswered(failed(last)))
}

impl Shared {
    fn masters(&self) -> Vec<String> {
        self.node
            .get()
            .map(|n| {
                n.raft()
                    .metrics()
                    .borrow()
                    .membership_config
                    .nodes()
                    .map(|(_, m)| m.addr.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn is_leader(&self) -> bool {
        self.node
            .get()
            .is_some_and(|n| n.role() == ServerState::Leader)
    }

    /// The leader's term if this master may act as the leader towards executors (answer
    /// heartbeats with assignments, take checkpoint reports); otherwise why not
    /// ([`leader_standing`]).
    fn serving_leader(&self) -> Result<u64, RemoteError> {
        let node = self.node()?;
        let patience = 3 * node.config().election_max_ms;
        let m = node.raft().metrics();
        let m = m.borrow();
        leader_standing(
            m.state,
            m.current_term,
            m.last_applied.map(|l| l.leader_id.term),
            m.millis_since_quorum_ack,
            patience,
        )
        .map(|()| m.current_term)
        .map_err(unavailable)
    }
}

/// Whether a master in raft role `role` may act as the leader towards executors: it must lead,
/// have applied an entry of its own term `term` (the blank entry a new leader appends), so that
/// its state holds everything committed before it, and have heard from a quorum within
/// `patience_ms`. A leader cut off from the other masters is not deposed by raft until it hears
/// of a newer term; without the last rule it would go on answering the executors it can still
/// reach, with assignments the real leader has since moved elsewhere.
fn leader_standing(
    role: ServerState,
    term: u64,
    last_applied_term: Option<u64>,
    millis_since_quorum_ack: Option<u64>,
    patience_ms: u64,
) -> Result<(), String> {
    if role != ServerState::Leader {
        return Err("not the leader; this goes to the leader".into());
    }
    if last_applied_term != Some(term) {
        return Err(format!(
            "elected leader for term {term} but has not applied the term's first entry yet; try again shortly"
        ));
    }
    match millis_since_quorum_ack {
        Some(ms) if ms <= patience_ms => Ok(()),
        _ => Err(format!(
            "this master leads but has not heard from a quorum of masters for over {patience_ms} ms; try another master"
        )),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps and trackers: still consistent if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn register_executor(
    shared: &Shared,
    req: RegisterRequest,
) -> Result<Registered, RemoteError> {
    if req.slots == 0 {
        return Err(RemoteError::new(
            ErrorCode::InvalidArgument,
            "slots must be at least 1",
        ));
    }
    let node = shared.node()?;
    let request = node.request(Command::RegisterExecutor {
        addr: req.addr.clone(),
        name: req.name.clone(),
        slots: req.slots,
        at_ms: unix_ms(),
    });
    match shared.propose(request, WRITE_PATIENCE).await? {
        CommandResponse::ExecutorRegistered {
            id, incarnation, ..
        } => {
            info!(executor = id.0, addr = %req.addr, incarnation, "executor registered");
            if shared.is_leader() {
                lock(&shared.liveness).register(id.0, std::time::Instant::now());
            }
            Ok(Registered {
                executor_id: id.0,
                incarnation,
                heartbeat_ms: millis(shared.liveness_config.heartbeat_interval),
                ttl_ms: millis(shared.liveness_config.ttl),
                masters: shared.masters(),
            })
        }
        other => Err(response_error(other)),
    }
}

fn heartbeat(shared: &Shared, req: HeartbeatRequest) -> Result<HeartbeatReply, RemoteError> {
    let node = shared.node()?;
    let leader_term = shared.serving_leader()?;
    let id = req.executor_id;
    let known = node.read_local(|st| {
        st.executor(crate::meta::ExecutorId(id))
            .map(|e| (e.state == crate::meta::ExecutorState::Alive, e.incarnation))
    });
    let heartbeat_ms = millis(shared.liveness_config.heartbeat_interval);
    let ttl_ms = millis(shared.liveness_config.ttl);
    let reregister = |reason: String| HeartbeatReply {
        reregister: Some(reason),
        assignments: None,
        assignments_digest: 0,
        masters: shared.masters(),
        heartbeat_ms,
        ttl_ms,
        leader_term,
    };
    match known {
        None => return Ok(reregister(format!("unknown executor {id}"))),
        Some((false, _)) => return Ok(reregister(format!("executor {id} was declared lost"))),
        Some((true, incarnation)) if incarnation != req.incarnation => {
            return Ok(reregister(format!(
                "executor {id} incarnation {} is stale (current {incarnation})",
                req.incarnation
            )));
        }
        Some(_) => {}
    }
    {
        let mut live = lock(&shared.liveness);
        let now = std::time::Instant::now();
        if !live.heartbeat(id, now) {
            live.register(id, now);
        }
    }
    let (assignments, assignments_digest) =
        node.read_local(|st| heartbeat_assignments(st, id, req.assignments_digest));
    let report = crate::leader::ExecutorReport {
        tasks: req.tasks,
        running: req.assignments_digest,
        given: assignments_digest,
    };
    let reports_changed = {
        let mut reports = lock(&shared.reports);
        let changed = reports.get(&id) != Some(&report);
        reports.insert(id, report);
        changed
    };
    if reports_changed {
        // A task started, finished or failed, or the executor caught up with its assignments:
        // the leader loop may have a step to take.
        shared.step_now.notify_one();
    }
    Ok(HeartbeatReply {
        reregister: None,
        assignments,
        assignments_digest,
        masters: shared.masters(),
        heartbeat_ms,
        ttl_ms,
        leader_term,
    })
}

/// How often a follower whose replica has a job that is not terminal checks whether it took
/// over (so that it steps running jobs at once), and how soon a leader tries again when a
/// step was not applied.
const LEADER_TICK: Duration = Duration::from_millis(100);

/// The longest the loop sleeps otherwise: on a follower of an idle cluster, and on the leader
/// when nothing woke it earlier. (At [`LEADER_TICK`] an idle loop was ~10 of an idle
/// master's ~50 wake-ups per second.)
const IDLE_LEADER_TICK: Duration = Duration::from_millis(500);

/// What one turn of [`leader_loop`] found: how long the loop may sleep after it depends on it
/// ([`next_turn_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The metadata node is not started yet.
    Starting,
    /// Not the leader; `active`: the replica has a job that is not terminal.
    Follower { active: bool },
    /// The leader. `retry`: a step was not applied; `next_expiry`: how long until the
    /// earliest tracked executor's heartbeat deadline (`None`: none tracked).
    Leader {
        retry: bool,
        next_expiry: Option<Duration>,
    },
}

/// How long the loop sleeps after `turn` unless woken earlier. The leader is woken by what
/// can move a job: a change of the applied metadata (a job submitted through any master, a
/// placement, a state change, a checkpoint, an executor registering) and task reports that
/// changed in a heartbeat. Otherwise it sleeps until the next executor
/// could expire, so a lost executor is declared lost when its TTL runs out, and at most
/// [`IDLE_LEADER_TICK`].
fn next_turn_in(turn: Turn) -> Duration {
    match turn {
        Turn::Starting | Turn::Follower { active: true } => LEADER_TICK,
        Turn::Follower { active: false } => IDLE_LEADER_TICK,
        Turn::Leader { retry: true, .. } => LEADER_TICK,
        Turn::Leader {
            retry: false,
            next_expiry,
        } => next_expiry.map_or(IDLE_LEADER_TICK, |d| d.min(IDLE_LEADER_TICK)),
    }
}

/// Expire silent executors and step every job on the leader; watch for a takeover on
/// followers. Each turn is followed by a sleep of [`next_turn_in`], cut short by the
/// wake-ups it names.
async fn leader_loop(shared: Arc<Shared>) {
    let mut memory = LeaderMemory::default();
    let mut applied: Option<tokio::sync::watch::Receiver<u64>> = None;
    let mut sleep_for = LEADER_TICK;
    loop {
        if applied.is_none() {
            applied = shared.node.get().map(|n| n.applied_changes());
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep_for) => {}
            _ = shared.step_now.notified() => {}
            Some(()) = state_changed(&mut applied) => {}
        }
        sleep_for = next_turn_in(leader_turn(&shared, &mut memory).await);
    }
}

/// Completes when the applied metadata changed; `None` at once if it cannot tell (no node
/// yet, or the node stopped).
async fn state_changed(applied: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    applied.as_mut()?.changed().await.ok()
}

/// What the leader loop remembers between turns.
#[derive(Debug, Default)]
struct LeaderMemory {
    /// The raft term this master led in at its last turn (`None`: it was not leading).
    term: Option<u64>,
    /// It led at its last turn without serving executors (no quorum): the next turn that
    /// serves them starts with grace, as a new term does.
    suspended: bool,
    /// Executors found expired whose loss is not applied yet: declared again on every turn
    /// until it is (a failed write is retried), and never given a new TTL meanwhile.
    lost: BTreeSet<u64>,
}

/// The liveness part of a leader's turn in raft term `term`. `alive`: the executors the
/// metadata holds alive; `standing`: whether this master serves executors now
/// ([`leader_standing`]). While it does not (newly elected, or out of touch with its quorum),
/// it refuses their
/// heartbeats, so it finds no executor lost either; the first standing turn after that, like
/// the first turn of a term, gives every executor one full TTL of grace (this master cannot
/// know when they last reported). Returns the executors to declare lost and whether this
/// master led in an older term at its last turn (it lost and won the leadership between two
/// turns).
fn track_liveness(
    memory: &mut LeaderMemory,
    live: &mut LivenessTracker,
    term: u64,
    standing: bool,
    alive: &[u64],
    now: std::time::Instant,
) -> (Vec<u64>, bool) {
    let regained = memory.term.is_some_and(|t| t != term);
    if !standing {
        memory.term = Some(term);
        memory.suspended = true;
        memory.lost.clear();
        return (Vec::new(), regained);
    }
    if memory.term != Some(term) || memory.suspended {
        memory.suspended = false;
        for id in alive {
            live.register(*id, now);
        }
        live.on_leadership_acquired(now);
        memory.lost.clear();
        memory.term = Some(term);
        info!(term, "leading: tracking {} executors", alive.len());
    }
    // A loss once applied leaves the executor out of `alive`.
    memory.lost.retain(|id| alive.contains(id));
    for id in alive {
        if !live.contains(*id) && !memory.lost.contains(id) {
            live.register(*id, now);
        }
    }
    for id in live.expired(now) {
        if alive.contains(&id) && memory.lost.insert(id) {
            warn!(executor = id, "executor lost: no heartbeat within the TTL");
        }
    }
    (memory.lost.iter().copied().collect(), regained)
}

/// How long a leader turn waits for its own log to apply before it plans.
const PLAN_APPLY_WAIT: Duration = Duration::from_millis(500);

/// One turn of [`leader_loop`].
async fn leader_turn(shared: &Shared, memory: &mut LeaderMemory) -> Turn {
    let Some(node) = shared.node.get() else {
        return Turn::Starting;
    };
    if !shared.is_leader() {
        if memory.term.is_some() {
            lock(&shared.reports).clear();
            lock(&shared.checkpoints).clear();
        }
        *memory = LeaderMemory::default();
        let active = node.read_local(|st| st.jobs.values().any(|j| !j.state.is_terminal()));
        return Turn::Follower { active };
    }
    let term = node.raft().metrics().borrow().current_term;
    let now = std::time::Instant::now();
    let alive: Vec<u64> = node.read_local(|st| {
        st.executors
            .values()
            .filter(|e| e.state == crate::meta::ExecutorState::Alive)
            .map(|e| e.id.0)
            .collect()
    });
    let standing = shared.serving_leader();
    let (expired, regained) = {
        let mut live = lock(&shared.liveness);
        track_liveness(memory, &mut live, term, standing.is_ok(), &alive, now)
    };
    if regained {
        // Lost and won the leadership again between two turns: what executors reported to
        // this master before belongs to an older term. (The checkpoint tracker tells terms
        // apart itself: clearing it here could drop reports already taken in this term.)
        lock(&shared.reports).clear();
    }
    if let Err(why) = standing {
        // Newly elected (the state may lack entries the last leader committed) or without a
        // quorum: steps planned now could be wrong, or commit later from a stale plan.
        debug!(reason = %why.message, "leader loop waits for its quorum");
        return Turn::Leader {
            retry: true,
            next_expiry: None,
        };
    }
    for id in &expired {
        lock(&shared.reports).remove(id);
    }
    // Nor do reports of executors lost otherwise (superseded by a new registration).
    node.read_local(|st| {
        lock(&shared.reports).retain(|id, _| {
            st.executor(crate::meta::ExecutorId(*id))
                .is_some_and(|e| e.state == crate::meta::ExecutorState::Alive)
        });
    });
    // Checkpoints of jobs that ended will never be committed.
    node.read_local(|st| {
        lock(&shared.checkpoints).retain(|job| {
            st.jobs
                .get(&JobId(job))
                .is_some_and(|j| !j.state.is_terminal())
        });
    });
    // Plan from the whole log: a write of an earlier turn that timed out may still be in it,
    // and would apply after steps planned without it (a placement onto slots it already
    // took). Committed by now, or the turn is retried.
    let last_log = node.raft().metrics().borrow().last_log_index;
    if let Err(e) = node
        .raft()
        .wait(Some(PLAN_APPLY_WAIT))
        .applied_index_at_least(last_log, "the leader's own log is applied")
        .await
    {
        debug!(error = %e, "leader loop waits for its log to apply");
        return Turn::Leader {
            retry: true,
            next_expiry: None,
        };
    }
    let commands = {
        let reports = lock(&shared.reports).clone();
        node.read_local(|st| {
            next_commands(st, &reports, &expired, shared.catalog.as_ref(), unix_ms())
        })
    };
    let mut retry = false;
    for command in commands {
        let request = node.request(command);
        match node.write(request).await {
            Ok(CommandResponse::Rejected(r)) => {
                // Planned against a state that moved on (another step or a user got there
                // first): the next turn plans from the new state. A refusal wakes no one
                // (the applied-change count does not move), so this cannot spin.
                info!(refused = %r, "leader step refused");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "leader step not applied");
                retry = true;
                break;
            }
        }
    }
    let next_expiry = lock(&shared.liveness)
        .next_deadline()
        .map(|d| d.saturating_duration_since(std::time::Instant::now()));
    Turn::Leader { retry, next_expiry }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node-id = 1
listen-addr = "127.0.0.1:7101"
data-dir = "data/m1"
certs-dir = "certs"
initial-members = ["1=127.0.0.1:7101", "2=127.0.0.1:7102"]
"#;

    struct NoJobs;
    impl JobCatalog for NoJobs {
        fn validate(&self, _: &str, _: &str) -> Result<(), String> {
            Err("no job types".into())
        }
        fn plan(&self, _: &str, _: &str) -> Result<microcosm_engine::JobGraph, String> {
            Err("no job types".into())
        }
    }

    /// A state holding one submitted job of spec `spec`.
    fn one_job(spec: String) -> MetaState {
        let mut st = MetaState::default();
        st.apply(&crate::meta::MetaRequest {
            id: crate::meta::RequestId { client: 1, seq: 1 },
            command: Command::SubmitJob {
                job_type: "demo".into(),
                spec,
                at_ms: 1,
            },
        });
        st
    }

    /// The job list leaves out what can be large (specs, histories); `GetJob` keeps it.
    #[test]
    fn the_job_list_leaves_specs_and_histories_out() {
        let st = one_job("x".repeat(60_000));
        let job = st.jobs.values().next().expect("the job was submitted");
        let brief = job_summary(&st, job);
        assert!(brief.spec.is_empty() && brief.history.is_empty());
        assert_eq!(
            (brief.state.as_str(), brief.reason.as_str()),
            ("Pending", "submitted")
        );
        let full = job_info(&st, job);
        assert_eq!((full.spec.len(), full.history.len()), (60_000, 1));
    }

    /// A job's status counts its restarts in all and within the budget's window.
    #[test]
    fn a_jobs_status_counts_its_restarts_in_all_and_lately() {
        let st = one_job(String::new());
        let mut job = st
            .jobs
            .values()
            .next()
            .expect("the job was submitted")
            .clone();
        let window = crate::leader::RESTART_WINDOW_MS;
        job.restarts = 7;
        job.recent_restarts_ms = vec![1_000, 2_000 + window, 3_000 + window];
        let info = job_info_at(&st, &job, 2_500 + window);
        assert_eq!((info.restarts, info.recent_restarts), (7, 2));
        let later = job_info_at(&st, &job, 10_000 + 2 * window);
        assert_eq!((later.restarts, later.recent_restarts), (7, 0));
    }

    /// A master that fails to start leaves nothing behind: the same address and data dir
    /// start a master right after.
    #[tokio::test]
    async fn a_failed_start_frees_the_address_and_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        microcosm_transport::tls::init_cluster_certs(&certs, "test", &[]).unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .port();
        let config = |members: &str| {
            let text = format!(
                "node-id = 1\nlisten-addr = \"127.0.0.1:{port}\"\ndata-dir = {:?}\n\
                 certs-dir = {:?}\n{members}",
                dir.path().join("data"),
                certs,
            );
            MasterConfig::from_toml(&text).unwrap()
        };
        // A new data dir with neither initial-members nor join.
        let err = MasterServer::start(config(""), Arc::new(NoJobs))
            .await
            .err()
            .expect("a new data dir without members is refused");
        assert!(err.to_string().contains("initial-members"), "{err}");
        // The socket goes once the endpoint's tasks have seen the close.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} still bound after a failed start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let members = format!("initial-members = [\"1=127.0.0.1:{port}\"]\n");
        let server = MasterServer::start(config(&members), Arc::new(NoJobs))
            .await
            .expect("the address and the store are free again");
        server.shutdown().await;
    }

    /// A TTL of 1.5 s, an empty tracker and leader memory, and a start time.
    fn liveness_at_start() -> (Duration, LivenessTracker, LeaderMemory, std::time::Instant) {
        let ttl = Duration::from_millis(1500);
        let live = LivenessTracker::new(LivenessConfig {
            heartbeat_interval: Duration::from_millis(250),
            ttl,
        })
        .unwrap();
        (
            ttl,
            live,
            LeaderMemory::default(),
            std::time::Instant::now(),
        )
    }

    #[test]
    fn an_executor_found_lost_is_declared_until_the_loss_applies_and_gets_no_new_ttl() {
        let (ttl, mut live, mut memory, t0) = liveness_at_start();
        // First turn of term 4: both executors get a TTL of grace.
        assert_eq!(
            track_liveness(&mut memory, &mut live, 4, true, &[1, 2], t0),
            (vec![], false)
        );
        live.heartbeat(2, t0 + ttl);
        let late = t0 + ttl + Duration::from_millis(1);
        assert_eq!(
            track_liveness(&mut memory, &mut live, 4, true, &[1, 2], late),
            (vec![1], false)
        );
        // The write of the loss failed: executor 1 is still alive in the metadata. It is
        // declared again, not given a fresh TTL.
        let later = late + Duration::from_millis(100);
        assert_eq!(
            track_liveness(&mut memory, &mut live, 4, true, &[1, 2], later),
            (vec![1], false)
        );
        assert!(!live.contains(1));
        // Applied: executor 1 is no longer alive, and nothing is declared.
        assert_eq!(
            track_liveness(&mut memory, &mut live, 4, true, &[2], later),
            (vec![], false)
        );
        // Leading again in a later term (without a turn as follower between): everyone gets
        // grace again, and the caller learns that its reports are from an older term.
        let much_later = later + 3 * ttl;
        assert_eq!(
            track_liveness(&mut memory, &mut live, 6, true, &[2], much_later),
            (vec![], true)
        );
        assert!(live.deadline(2).is_some_and(|d| d > much_later));
    }

    #[test]
    fn no_executor_is_found_lost_while_the_leader_has_no_quorum() {
        let (ttl, mut live, mut memory, t0) = liveness_at_start();
        track_liveness(&mut memory, &mut live, 2, true, &[1, 2], t0);
        // The quorum is gone for longer than a TTL: heartbeats are refused, nobody is lost.
        for ms in [500, 1000, 2000, 4000] {
            let at = t0 + Duration::from_millis(ms);
            assert_eq!(
                track_liveness(&mut memory, &mut live, 2, false, &[1, 2], at),
                (vec![], false)
            );
        }
        // Back in the same term: every executor gets a full TTL from now.
        let back = t0 + Duration::from_millis(4100);
        assert_eq!(
            track_liveness(&mut memory, &mut live, 2, true, &[1, 2], back),
            (vec![], false)
        );
        assert!(live.deadline(1).is_some_and(|d| d >= back + ttl));
        // And is found lost one TTL later if it stays silent.
        live.heartbeat(2, back + ttl);
        assert_eq!(
            track_liveness(&mut memory, &mut live, 2, true, &[1, 2], back + ttl),
            (vec![1], false)
        );
        // Suspended again, then leading in a later term: the older term's reports must go.
        let later = back + 2 * ttl;
        track_liveness(&mut memory, &mut live, 2, false, &[1, 2], later);
        assert_eq!(
            track_liveness(&mut memory, &mut live, 5, true, &[1, 2], later),
            (vec![], true)
        );
    }

    #[test]
    fn only_a_current_leader_with_a_recent_quorum_serves_executors() {
        let leader = ServerState::Leader;
        assert_eq!(leader_standing(leader, 3, Some(3), Some(40), 900), Ok(()));
        assert_eq!(leader_standing(leader, 3, Some(3), Some(900), 900), Ok(()));
        // Followers and candidates never do.
        for role in [
            ServerState::Follower,
            ServerState::Candidate,
            ServerState::Learner,
        ] {
            let e = leader_standing(role, 3, Some(3), Some(0), 900).unwrap_err();
            assert!(e.contains("not the leader"), "{e}");
        }
        // Elected, but its state may still lack entries committed under the previous leader.
        for applied in [None, Some(2)] {
            let e = leader_standing(leader, 3, applied, Some(0), 900).unwrap_err();
            assert!(e.contains("term 3"), "{e}");
        }
        // Cut off from the other masters: the real leader may have moved the work elsewhere.
        for ack in [None, Some(901), Some(u64::MAX)] {
            let e = leader_standing(leader, 3, Some(3), ack, 900).unwrap_err();
            assert!(e.contains("quorum"), "{e}");
        }
    }

    #[test]
    fn the_leader_loop_sleeps_until_an_executor_could_expire_or_a_follower_must_watch() {
        let ms = Duration::from_millis;
        // A leader wakes when the earliest executor deadline passes, at most IDLE_LEADER_TICK.
        let leader = |next_expiry| Turn::Leader {
            retry: false,
            next_expiry,
        };
        assert_eq!(next_turn_in(leader(Some(ms(120)))), ms(120));
        assert_eq!(next_turn_in(leader(Some(Duration::ZERO))), Duration::ZERO);
        assert_eq!(next_turn_in(leader(Some(ms(1500)))), IDLE_LEADER_TICK);
        assert_eq!(next_turn_in(leader(None)), IDLE_LEADER_TICK);
        // A step that was not applied is tried again soon.
        let retry = Turn::Leader {
            retry: true,
            next_expiry: Some(ms(1500)),
        };
        assert_eq!(next_turn_in(retry), LEADER_TICK);
        // A follower with running jobs watches for a takeover; an idle one barely.
        assert_eq!(next_turn_in(Turn::Follower { active: true }), LEADER_TICK);
        assert_eq!(
            next_turn_in(Turn::Follower { active: false }),
            IDLE_LEADER_TICK
        );
        assert_eq!(next_turn_in(Turn::Starting), LEADER_TICK);
        assert!(IDLE_LEADER_TICK > LEADER_TICK);
    }

    #[test]
    fn parses_with_defaults() {
        let c = MasterConfig::from_toml(BASE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_ms, 50);
        assert_eq!(c.name(), "master-1");
    }

    #[test]
    fn a_listen_address_nobody_can_dial_is_refused() {
        let text = BASE
            .replace(
                "listen-addr = \"127.0.0.1:7101\"",
                "listen-addr = \"0.0.0.0:7101\"",
            )
            .replace("1=127.0.0.1:7101", "1=0.0.0.0:7101");
        let c = MasterConfig::from_toml(&text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("listen-addr 0.0.0.0:7101"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = MasterConfig::from_toml(&format!("{BASE}\nbogus-key = 3\n")).unwrap_err();
        assert!(err.to_string().contains("bogus-key"), "{err}");
    }

    #[test]
    fn election_timeout_below_heartbeat_is_refused() {
        let c = MasterConfig::from_toml(&format!("{BASE}\nheartbeat-ms = 200\n")).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("election-timeout-min-ms") && err.contains("heartbeat-ms"),
            "{err}"
        );
    }

    #[test]
    fn members_must_include_self_and_exclude_join() {
        let c =
            MasterConfig::from_toml(&BASE.replace("1=127.0.0.1:7101", "3=127.0.0.1:7103")).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("does not include")
        );
        let c = MasterConfig::from_toml(&format!("{BASE}\njoin = [\"127.0.0.1:7000\"]\n")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("not both"));
        assert!(parse_member("x").is_err());
        assert!(parse_member("1=nope").is_err());
    }
}
