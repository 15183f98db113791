//! The control plane's RPC surface: services, methods and their messages.
//!
//! Messages are rkyv archives validated on receipt. Raft traffic and forwarded metadata writes
//! travel as opaque postcard blobs ([`Blob`]) because openraft's types are serde types.

use microcosm_transport::{Method, Role, Service};

/// Methods served by masters.
pub struct MasterApi;
impl Service for MasterApi {
    const NAME: &'static str = "master";
    const SERVED_BY: Role = Role::Master;
}

/// An opaque payload (postcard-encoded serde value).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// The encoded bytes.
    pub bytes: Vec<u8>,
}

/// A request that carries no arguments.
#[derive(
    rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub struct Nothing {
    /// Reserved; keeps the archive non-empty.
    pub reserved: u32,
}

/// A master joining a running cluster.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// The new master's raft id.
    pub node_id: u64,
    /// Its RPC address.
    pub addr: String,
    /// Its name.
    pub name: String,
    /// Its data dir's incarnation, drawn when the data dir was created. A master of an id
    /// the cluster knows under another incarnation lost its data dir (its votes and log
    /// entries, which the others counted on) and may not take that member's place.
    pub incarnation: u64,
    /// Which start of that data dir sends this: a request of an earlier start than the one
    /// recorded (sent before a restart, retried since) is refused.
    pub start: u64,
    /// Its timing settings, which must be the cluster's (see [`MasterTiming`]).
    pub timing: MasterTiming,
    /// It restarted from its data dir, log and all (not a new data dir): it may record its
    /// incarnation in a member entry that has none yet (a master named in the bootstrap),
    /// and its new address in its own entry.
    pub has_log: bool,
}

/// The timing settings every master of a cluster must share: executors keep the heartbeat
/// interval one leader gave them until the next one answers, and the executor TTL is only
/// safe against a partitioned leader's `3 × election-timeout-max-ms` if every master agrees
/// on both. All in milliseconds.
#[derive(
    rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub struct MasterTiming {
    /// `heartbeat-ms` (raft).
    pub heartbeat_ms: u64,
    /// `election-timeout-min-ms`.
    pub election_timeout_min_ms: u64,
    /// `election-timeout-max-ms`.
    pub election_timeout_max_ms: u64,
    /// `executor-heartbeat-ms`.
    pub executor_heartbeat_ms: u64,
    /// `executor-ttl-ms`.
    pub executor_ttl_ms: u64,
}

impl MasterTiming {
    /// The settings in which `other` differs from these, as `key: ours vs theirs`.
    pub fn differences(&self, other: &MasterTiming) -> Vec<String> {
        [
            ("heartbeat-ms", self.heartbeat_ms, other.heartbeat_ms),
            (
                "election-timeout-min-ms",
                self.election_timeout_min_ms,
                other.election_timeout_min_ms,
            ),
            (
                "election-timeout-max-ms",
                self.election_timeout_max_ms,
                other.election_timeout_max_ms,
            ),
            (
                "executor-heartbeat-ms",
                self.executor_heartbeat_ms,
                other.executor_heartbeat_ms,
            ),
            (
                "executor-ttl-ms",
                self.executor_ttl_ms,
                other.executor_ttl_ms,
            ),
        ]
        .into_iter()
        .filter(|(_, ours, theirs)| ours != theirs)
        .map(|(key, ours, theirs)| format!("{key} {theirs} (the cluster's: {ours})"))
        .collect()
    }
}

/// One member of the masters' raft group.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Raft id.
    pub id: u64,
    /// RPC address.
    pub addr: String,
    /// Name.
    pub name: String,
    /// Voter (true) or learner (false).
    pub voter: bool,
}

/// One executor as the metadata knows it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ExecutorInfo {
    /// Executor id.
    pub id: u64,
    /// RPC address.
    pub addr: String,
    /// Name.
    pub name: String,
    /// "alive" or "lost".
    pub state: String,
    /// Slots offered.
    pub slots: u32,
    /// Slots used by the tasks placed there (each counts its cost) of live jobs; a job whose
    /// last placement found no capacity runs nowhere and holds none.
    pub used: u32,
    /// Registration count at this address.
    pub incarnation: u64,
    /// Why it was lost (e.g. its heartbeats stopped, or it shut down); empty while alive.
    pub lost_reason: String,
}

/// A master's own view of itself and the cluster.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Raft id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// RPC address.
    pub addr: String,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Index of the last applied log entry.
    pub last_applied: Option<u64>,
    /// The leader this master knows of.
    pub leader_id: Option<u64>,
    /// Members of the raft group.
    pub members: Vec<MemberInfo>,
    /// Executors known to the metadata (as applied on this master).
    pub executors: Vec<ExecutorInfo>,
}

/// A user submits a job.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SubmitJobRequest {
    /// Job type (e.g. "demo").
    pub job_type: String,
    /// The job specification (TOML).
    pub spec: String,
    /// Caller's id for deduplication of retries.
    pub client_id: u64,
    /// Caller's request sequence number; a retry reuses it.
    pub seq: u64,
}

/// A job id.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRef {
    /// The job id.
    pub id: u64,
}

/// What a user can ask of a job.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Stop the job for good.
    Cancel,
    /// Suspend the job's tasks.
    Pause,
    /// Resume a paused job.
    Resume,
}

/// A job action request.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobControlRequest {
    /// The job.
    pub id: u64,
    /// What to do.
    pub action: JobAction,
    /// Caller's id for deduplication of retries.
    pub client_id: u64,
    /// Caller's request sequence number.
    pub seq: u64,
}

/// A state change in a job's history.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JobTransitionInfo {
    /// New state.
    pub state: String,
    /// Why.
    pub reason: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// A job as users see it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Job id.
    pub id: u64,
    /// Job type.
    pub job_type: String,
    /// Current state.
    pub state: String,
    /// Reason of the last transition.
    pub reason: String,
    /// Placement epoch.
    pub epoch: u64,
    /// Number of tasks.
    pub tasks: u32,
    /// State changes, oldest first.
    pub history: Vec<JobTransitionInfo>,
    /// The job specification.
    pub spec: String,
    /// Set when the answering master cannot confirm it is up to date (no leader, no quorum).
    pub stale: Option<String>,
    /// The latest committed checkpoint: id, epoch that took it, commit time (Unix ms).
    pub checkpoint: Option<CheckpointInfo>,
    /// The checkpoint the current epoch resumed from (`None`: it started from scratch).
    pub restored_from: Option<u64>,
    /// How many times the job was restarted after a task failed, in all.
    pub restarts: u32,
    /// How many of those came within the restart budget's window before the answer
    /// ([`crate::leader::RESTART_WINDOW_MS`]): at [`crate::leader::MAX_RESTARTS`], the next
    /// failure within it fails the job.
    pub recent_restarts: u32,
}

/// A committed checkpoint, as `job status` shows it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Checkpoint id.
    pub id: u64,
    /// Epoch of the attempt that took it.
    pub epoch: u64,
    /// When it was committed (Unix ms).
    pub at_ms: u64,
}

/// A list of jobs.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JobList {
    /// Jobs by id.
    pub jobs: Vec<JobInfo>,
    /// Set when the answering master cannot confirm it is up to date (no leader, no quorum):
    /// the answer may be stale, and this says why.
    pub stale: Option<String>,
}

const MASTERS: &[Role] = &[Role::Master];
const ANYONE: &[Role] = &[Role::Master, Role::Executor, Role::Client];
const USERS: &[Role] = &[Role::Client, Role::Master];

macro_rules! method {
    ($(#[$doc:meta])* $name:ident, $service:ty, $id:expr, $callers:expr, $req:ty => $resp:ty) => {
        $(#[$doc])*
        pub struct $name;
        impl Method for $name {
            type Service = $service;
            const ID: u32 = $id;
            const NAME: &'static str = stringify!($name);
            const CALLERS: &'static [Role] = $callers;
            type Request = $req;
            type Response = $resp;
        }
    };
}

method!(
    /// Raft traffic between masters (append entries, vote, snapshot).
    RaftMessage, MasterApi, 10, MASTERS, Blob => Blob
);
method!(
    /// A follower forwards a metadata write to the leader.
    ForwardWrite, MasterApi, 11, MASTERS, Blob => Blob
);
method!(
    /// A new master asks the leader to add it as a learner and then a voter.
    JoinCluster, MasterApi, 12, MASTERS, JoinRequest => Nothing
);
method!(
    /// A master's own status and its view of the cluster.
    GetNodeStatus, MasterApi, 13, ANYONE, Nothing => NodeStatus
);
method!(
    /// Submit a job; answers its id.
    SubmitJob, MasterApi, 20, USERS, SubmitJobRequest => JobRef
);
method!(
    /// List all jobs, in brief: each without its spec and history ([`GetJob`] has them).
    ListJobs, MasterApi, 21, USERS, Nothing => JobList
);
method!(
    /// One job in detail.
    GetJob, MasterApi, 22, USERS, JobRef => JobInfo
);
method!(
    /// Cancel, pause or resume a job.
    ControlJob, MasterApi, 23, USERS, JobControlRequest => JobInfo
);

/// Methods served by executors on their data-plane address, besides the data streams:
/// status for operators. Masters hand out work in heartbeat replies, so a leader change never
/// needs to reach executors.
pub struct ExecutorApi;
impl Service for ExecutorApi {
    const NAME: &'static str = "executor";
    const SERVED_BY: Role = Role::Executor;
}

method!(
    /// An executor's own status: its data-plane connections.
    GetExecutorStatus, ExecutorApi, 30, USERS, Nothing => ExecutorStatus
);

/// What [`GetExecutorStatus`] answers.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ExecutorStatus {
    /// The executor's name.
    pub name: String,
    /// Its open data-plane connections (to peer executors, and the caller's own).
    pub connections: Vec<DataConnection>,
    /// Per engine worker, in worker order: nanoseconds its thread has spent asleep waiting
    /// for work since the executor started (empty until the engine has started). With the
    /// kernel's counts for the thread (time on a CPU, time waiting for one) it accounts for
    /// the thread's wall time; the rest is time its vCPU was held outside any thread.
    pub workers_asleep_ns: Vec<u64>,
}

/// One open connection of an executor's data-plane endpoint: the wire form of
/// [`microcosm_transport::ConnectionStats`]. Counters run from the connection's start.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DataConnection {
    /// The peer's address.
    pub peer: String,
    /// The role the peer's certificate names ("executor", "client", "master").
    pub role: String,
    /// True if this executor dialed it (it sends data streams over it), false if the peer did.
    pub dialed: bool,
    /// Smoothed round-trip time (µs).
    pub rtt_us: u64,
    /// Congestion window (bytes).
    pub cwnd: u64,
    /// Times the congestion controller backed off.
    pub congestion_events: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// QUIC packets sent.
    pub sent_packets: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
}

impl From<&microcosm_transport::ConnectionStats> for DataConnection {
    fn from(s: &microcosm_transport::ConnectionStats) -> Self {
        Self {
            peer: s.peer.addr.to_string(),
            role: s.peer.role.to_string(),
            dialed: s.dialed,
            rtt_us: u64::try_from(s.rtt.as_micros()).unwrap_or(u64::MAX),
            cwnd: s.cwnd,
            congestion_events: s.congestion_events,
            lost_packets: s.lost_packets,
            sent_packets: s.sent_packets,
            datagrams_sent: s.datagrams_sent,
            datagrams_received: s.datagrams_received,
        }
    }
}

/// An executor announces itself.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    /// Its data-plane address (ip:port), reachable by peer executors.
    pub addr: String,
    /// Its name.
    pub name: String,
    /// Task slots offered.
    pub slots: u32,
}

/// An executor that shuts down leaves the cluster.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeregisterRequest {
    /// The executor's id.
    pub executor_id: u64,
    /// Its incarnation, as registered: a request that does not match the executor's record
    /// is ignored.
    pub incarnation: u64,
}

/// The masters' answer to a registration.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The executor's id.
    pub executor_id: u64,
    /// Registration count at its address.
    pub incarnation: u64,
    /// Heartbeat interval the leader expects (ms); the executor heartbeats at this interval.
    pub heartbeat_ms: u64,
    /// Time without a heartbeat after which the leader declares the executor lost (ms).
    pub ttl_ms: u64,
    /// Master addresses, for failover.
    pub masters: Vec<String>,
}

/// State of a task as its executor reports it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRunState {
    /// Started, not finished.
    Running,
    /// Suspended by a pause.
    Paused,
    /// Completed its work.
    Finished,
    /// Failed (its error is in the report's message).
    Failed,
}

/// One task in a heartbeat.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskReport {
    /// The job.
    pub job: u64,
    /// The attempt's epoch.
    pub epoch: u64,
    /// Task index in the job graph.
    pub index: u32,
    /// Its state.
    pub state: TaskRunState,
    /// Error message of a failed task.
    pub message: String,
}

/// A periodic heartbeat with the state of every task on the executor.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRequest {
    /// The executor's id.
    pub executor_id: u64,
    /// Its incarnation.
    pub incarnation: u64,
    /// Every task it runs or ran for a still-assigned job.
    pub tasks: Vec<TaskReport>,
    /// [`HeartbeatReply::assignments_digest`] of the assignments it runs, from the last reply
    /// that carried them; `None` until one did (after registering, or once it stopped
    /// everything). A leader that finds the same digest leaves the assignments out.
    pub assignments_digest: Option<u64>,
}

/// Where one task of a job runs.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskLocation {
    /// Task index in the job graph.
    pub index: u32,
    /// Id of the executor running it.
    pub executor: u64,
    /// That executor's data-plane address.
    pub addr: String,
}

/// One job attempt an executor must run its share of.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assignment {
    /// The job.
    pub job: u64,
    /// The attempt's epoch; a newer epoch replaces every task of an older one.
    pub epoch: u64,
    /// Job type.
    pub job_type: String,
    /// Job specification.
    pub spec: String,
    /// Where every task of the job runs.
    pub locations: Vec<TaskLocation>,
    /// Whether the job is paused.
    pub paused: bool,
    /// The checkpoint this epoch resumes from (`None`: from scratch).
    pub restore_from: Option<u64>,
    /// That checkpoint's task states, when the masters still hold it. An executor refuses
    /// to start an attempt whose `restore_from` is set without them.
    pub restore: Option<RestoreState>,
}

/// Every task's state of one checkpoint.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct RestoreState {
    /// Checkpoint id.
    pub checkpoint: u64,
    /// State blobs by task index.
    pub states: Vec<(u32, Vec<u8>)>,
}

/// One task's part of a checkpoint, reported by its executor.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The job.
    pub job: u64,
    /// The attempt's epoch.
    pub epoch: u64,
    /// Task index in the job graph.
    pub index: u32,
    /// Checkpoint id.
    pub checkpoint: u64,
    /// The task finished: this state also stands for every later checkpoint.
    pub last: bool,
    /// The task's state (opaque).
    pub state: Vec<u8>,
}

/// Checkpoint reports of one executor.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReports {
    /// The reporting executor.
    pub executor_id: u64,
    /// The reports, in the order the tasks took them.
    pub reports: Vec<CheckpointReport>,
}

/// The leader's answer to a heartbeat.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Set when the executor is unknown or was declared lost: it must stop every task and
    /// register again. The text says why.
    pub reregister: Option<String>,
    /// The job attempts with tasks on this executor; run exactly these. `None` when they are
    /// unchanged since the digest the heartbeat carried (the executor keeps running what it
    /// runs), and in a reply that asks it to register again.
    pub assignments: Option<Vec<Assignment>>,
    /// Digest of the assignments this executor has now ([`crate::leader::assignments_digest`]);
    /// the executor sends it back with its next heartbeats.
    pub assignments_digest: u64,
    /// Master addresses, for failover.
    pub masters: Vec<String>,
    /// Heartbeat interval this leader expects (ms), as in [`Registered`]: a leader elected
    /// since the registration may expect another one than the leader that registered it.
    pub heartbeat_ms: u64,
    /// Time without a heartbeat after which this leader declares the executor lost (ms).
    pub ttl_ms: u64,
    /// The leader's raft term. A leader keeps finished tasks' last checkpoint reports only in
    /// memory, so an executor sends them again to the leader of every new term (see
    /// [`ReportsTaken`]).
    pub leader_term: u64,
}

/// The leader's answer to [`CheckpointReports`]: the reports were taken by the leader of
/// `term`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReportsTaken {
    /// The raft term of the leader that took the reports.
    pub term: u64,
}

const EXECUTORS: &[Role] = &[Role::Executor];

method!(
    /// An executor registers and receives its id.
    RegisterExecutor, MasterApi, 30, EXECUTORS, RegisterRequest => Registered
);
method!(
    /// An executor's heartbeat; answered by the leader only.
    Heartbeat, MasterApi, 31, EXECUTORS, HeartbeatRequest => HeartbeatReply
);
method!(
    /// Tasks' checkpoint snapshots; the leader commits a checkpoint once every task of the
    /// attempt reported it. Answered by the leader only.
    ReportCheckpoints, MasterApi, 32, EXECUTORS, CheckpointReports => ReportsTaken
);
method!(
    /// An executor that shuts down leaves the cluster: it is marked lost at once, so that its
    /// tasks move to other executors now rather than after its TTL, and without the failures
    /// its stopping tasks cause elsewhere counting as the job's restarts.
    DeregisterExecutor, MasterApi, 33, EXECUTORS, DeregisterRequest => Nothing
);

/// Header of a data stream between executors.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// The job.
    pub job: u64,
    /// The sender's epoch; streams of an older epoch are refused.
    pub epoch: u64,
    /// The edge of the job graph.
    pub edge: u32,
    /// The consuming partition.
    pub partition: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_differences_name_each_setting_with_both_values() {
        let cluster = MasterTiming {
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            executor_heartbeat_ms: 250,
            executor_ttl_ms: 1500,
        };
        assert!(cluster.differences(&cluster).is_empty());
        let joining = MasterTiming {
            election_timeout_max_ms: 600,
            executor_ttl_ms: 3000,
            ..cluster
        };
        assert_eq!(
            cluster.differences(&joining),
            [
                "election-timeout-max-ms 600 (the cluster's: 300)",
                "executor-ttl-ms 3000 (the cluster's: 1500)"
            ]
        );
    }
}
