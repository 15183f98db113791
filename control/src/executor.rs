//! The executor process: registers with the masters, heartbeats, and runs its share of every
//! job attempt the leader assigns to it on the engine.
//!
//! Work arrives in heartbeat replies (a pull model): each reply lists the job attempts with
//! tasks here, and the executor reconciles what it runs against that list — launching new
//! attempts, cancelling attempts that disappeared or were replaced by a newer epoch, pausing
//! and resuming. A leader change therefore restarts nothing: the new leader hands out the same
//! assignments. Each heartbeat carries the digest of the assignments the executor runs, and a
//! reply leaves them out while they are unchanged, so a steady job costs a heartbeat no
//! assignment encoding, decoding or reconciling. An executor told it is unknown or lost (for
//! example after a long pause) stops every task at once and registers again as a new
//! incarnation.
//!
//! An executor that has run no job attempt for a TTL heartbeats half as often
//! ([`HeartbeatSchedule`]): an idle cluster's cost is mostly these round trips and the
//! wake-ups each one causes on both ends. A data stream that arrives for an attempt not
//! running here yet makes it heartbeat at once: the executor that sends it already runs its
//! part of a new attempt, which this one learns of from the heartbeat's answer.
//!
//! Tasks that take part in checkpoints hand their snapshots to the attempt's
//! [`SnapshotSink`]; a background task sends them, batched, to the leader
//! ([`ReportCheckpoints`]), which commits a checkpoint once every task reported it. Of a
//! task's reports not sent yet only the newest is kept ([`ReportQueue`]), so the queue stays
//! bounded while the masters cannot be reached. A finished task's last report is held while its attempt runs and sent again to the leader of
//! each new term ([`FinalReports`]). An attempt that resumes from a checkpoint gets every
//! task's state in its assignment.
//!
//! An executor has two QUIC endpoints. The data endpoint (the executor's address, where
//! other executors open data streams) runs on engine worker 0's thread through a
//! [`DataPlaneReactor`], so batches move between tasks and connections without a thread
//! hand-off. The control endpoint (registration, heartbeats, checkpoint reports) runs on the
//! caller's tokio runtime, so a busy engine never delays a heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microcosm_engine::{
    Engine, EngineConfig, JobGraph, RestorePoint, SnapshotSink, SpinMode, TaskHandle, TaskSnapshot,
    TaskState, WorkerHandle,
};
use microcosm_transport::{
    Endpoint, ErrorCode, Identity, Peer, RemoteError, Role, Router, TransportConfig, WeakEndpoint,
};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::client::MasterClient;
use crate::exchange::{InboundRegistry, QuicExchange};
use crate::finals::{Answer, FinalReports};
use crate::proto::{
    Assignment, CheckpointReport, CheckpointReports, DataConnection, DeregisterExecutor,
    DeregisterRequest, ExecutorStatus, GetExecutorStatus, Heartbeat, HeartbeatRequest, Nothing,
    RegisterExecutor, RegisterRequest, Registered, ReportCheckpoints, TaskReport, TaskRunState,
};
use crate::reactor::DataPlaneReactor;
use crate::report_queue::ReportQueue;

/// Errors starting an executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
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
    #[error("invalid executor config: {0}")]
    Config(String),
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] microcosm_transport::TlsError),
    /// The endpoint could not be created.
    #[error(transparent)]
    Endpoint(#[from] microcosm_transport::EndpointError),
    /// The engine could not start.
    #[error("engine: {0}")]
    Engine(String),
    /// No master accepted the registration.
    #[error("cannot register with the masters at {addrs}: {reason}")]
    Register {
        /// Addresses tried.
        addrs: String,
        /// The last error.
        reason: String,
    },
}

/// An executor's configuration (TOML, kebab-case keys; unknown keys are rejected).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExecutorConfig {
    /// UDP address for the data plane (peer executors connect here).
    pub listen_addr: SocketAddr,
    /// Master addresses (any subset; the others are learned).
    pub masters: Vec<String>,
    /// Directory with the cluster CA and the executor certificate.
    pub certs_dir: PathBuf,
    /// Human-readable name (default `executor@<listen-addr>`).
    #[serde(default)]
    pub name: Option<String>,
    /// Task slots offered.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Engine worker threads (default: available cores).
    #[serde(default)]
    pub workers: Option<usize>,
    /// How long (µs) an idle engine worker keeps polling for work (worker 0: turning the data
    /// plane's network reactor) before it sleeps, and how early it wakes for a timer (see
    /// `EngineConfig::spin`; 0 = sleep at once). Trades CPU while records flow for latency;
    /// an idle executor sleeps either way. At most 10,000.
    #[serde(default = "default_spin_us")]
    pub spin_us: u64,
    /// When a worker spins: `adaptive` (default) only while work keeps arriving within
    /// `spin-us`, so a trickle of records costs no spinning; `always` after every piece of
    /// work.
    #[serde(default, deserialize_with = "spin_mode_from_str")]
    pub spin_mode: SpinMode,
    /// Heartbeat interval (ms) while the executor runs tasks; once it has run none for
    /// `ttl-ms` it heartbeats half as often, but at least three times per `ttl-ms` (see
    /// [`HeartbeatSchedule`]). The current leader's interval, from its answers to the
    /// registration and to every heartbeat, takes precedence (see [`heartbeat_timing`]); this
    /// one applies only where they give none.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Time without a successful heartbeat after which the executor warns that it is probably
    /// considered lost (ms); at least two heartbeats. Like `heartbeat-ms`, overridden by the
    /// leader's `executor-ttl-ms` from its answers.
    #[serde(default = "default_ttl")]
    pub ttl_ms: u64,
}

/// When an executor heartbeats: every `interval` while it runs a job attempt or ran one
/// within the last TTL, every [`HeartbeatSchedule::idle_interval`] otherwise.
///
/// A heartbeat is a round trip with the leader that wakes both ends a few times; an idle
/// cluster spends most of its CPU on them. While an executor runs nothing, a later heartbeat
/// only delays when it learns of new work, so it heartbeats half as often there, but never
/// less than three times per TTL, so a lost or late heartbeat still does not get it declared
/// lost. It keeps the short interval for a TTL after its last attempt ended: a job that is
/// being recovered is typically cancelled here and reassigned a moment later, and that
/// reassignment should not wait for a slow heartbeat. Takes instants and returns instants;
/// the heartbeat loop does the sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatSchedule {
    interval: Duration,
    idle_interval: Duration,
    ttl: Duration,
    /// When the executor was last seen running an attempt.
    last_running: Option<Instant>,
}

impl HeartbeatSchedule {
    /// The schedule for heartbeat `interval` and executor TTL `ttl`.
    pub fn new(interval: Duration, ttl: Duration) -> Self {
        let idle_interval = (interval * 2).min(ttl / 3).max(interval);
        Self {
            interval,
            idle_interval,
            ttl,
            last_running: None,
        }
    }

    /// The same schedule for another interval and TTL (a new leader's), keeping when the
    /// executor last ran an attempt.
    pub fn retimed(self, interval: Duration, ttl: Duration) -> Self {
        Self {
            last_running: self.last_running,
            ..Self::new(interval, ttl)
        }
    }

    /// The interval while the executor runs (or recently ran) a job attempt.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The TTL the schedule was made for.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The interval once it has run none for a TTL: twice `interval`, at most a third of the
    /// TTL, never below `interval`.
    pub fn idle_interval(&self) -> Duration {
        self.idle_interval
    }

    /// When the heartbeat after the one due at `previous` is due, seen at `now`, with
    /// `running` telling whether the executor runs any job attempt now: one period after
    /// `previous`, or one period after `now` if that has already passed (a slow round trip
    /// does not cause a burst of heartbeats).
    pub fn next(&mut self, previous: Instant, now: Instant, running: bool) -> Instant {
        if running {
            self.last_running = Some(now);
        }
        let quiet = self
            .last_running
            .is_none_or(|at| now.saturating_duration_since(at) >= self.ttl);
        let period = if quiet {
            self.idle_interval
        } else {
            self.interval
        };
        let next = previous + period;
        if next > now { next } else { now + period }
    }
}

fn default_slots() -> u32 {
    64
}
fn default_spin_us() -> u64 {
    DEFAULT_SPIN_US
}

/// Default of `spin-us`.
pub const DEFAULT_SPIN_US: u64 = 200;

/// Largest `spin-us` accepted.
pub const MAX_SPIN_US: u64 = 10_000;

/// Most engine workers (`workers`) an executor accepts: each is a thread, and a task loop
/// per core is the design, so more than this is a typo rather than a machine.
pub const MAX_WORKERS: usize = 1024;

fn spin_mode_from_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SpinMode, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn default_heartbeat() -> u64 {
    250
}
fn default_ttl() -> u64 {
    1500
}

impl ExecutorConfig {
    /// Reads and parses a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ExecutorError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExecutorError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses a TOML config.
    pub fn from_toml(text: &str) -> Result<Self, ExecutorError> {
        toml::from_str(text).map_err(|e| ExecutorError::Config(crate::toml_error_line(&e, text)))
    }

    /// Checks values that parsing cannot.
    pub fn validate(&self) -> Result<(), ExecutorError> {
        let bad = |m: String| Err(ExecutorError::Config(m));
        if self.listen_addr.ip().is_unspecified() {
            // The address is also what the executor tells masters and peers to dial.
            return bad(format!(
                "listen-addr {} is not an address masters and peer executors can reach; give \
                 this host's own address (e.g. its LAN IP, or 127.0.0.1 for a local cluster)",
                self.listen_addr
            ));
        }
        if self.slots == 0 {
            return bad("slots must be at least 1".into());
        }
        if let Some(w) = self.workers
            && !(1..=MAX_WORKERS).contains(&w)
        {
            return bad(format!(
                "workers must be between 1 and {MAX_WORKERS}, got {w}"
            ));
        }
        if self.spin_us > MAX_SPIN_US {
            return bad(format!(
                "spin-us must be at most {MAX_SPIN_US}, got {}",
                self.spin_us
            ));
        }
        if self.heartbeat_ms == 0 {
            return bad("heartbeat-ms must be > 0".into());
        }
        if self.ttl_ms < 2 * self.heartbeat_ms {
            return bad(format!(
                "ttl-ms ({}) must be at least two heartbeats (2 × heartbeat-ms = {})",
                self.ttl_ms,
                2 * self.heartbeat_ms
            ));
        }
        if self.masters.is_empty() {
            return bad("masters must list at least one master address".into());
        }
        for m in &self.masters {
            m.parse::<SocketAddr>()
                .map_err(|e| ExecutorError::Config(format!("masters entry {m:?}: {e}")))?;
        }
        Ok(())
    }
}

/// What an executor needs to know about job types: their plans, and how to start tasks.
pub trait JobLauncher: Send + Sync + 'static {
    /// The task graph of a job (the same function the masters plan with).
    fn plan(&self, job_type: &str, spec: &str) -> Result<JobGraph, String>;
    /// Starts the tasks `local` of one attempt on `engine`, wiring remote edges through
    /// `exchange`. Returns each started task with its index.
    fn launch(&self, launch: Launch<'_>) -> Result<Vec<(u32, TaskHandle)>, String>;
}

/// One attempt to start on this executor.
pub struct Launch<'a> {
    /// The job.
    pub job: u64,
    /// The attempt's epoch.
    pub epoch: u64,
    /// Job type.
    pub job_type: &'a str,
    /// Job spec.
    pub spec: &'a str,
    /// The job's graph.
    pub graph: &'a JobGraph,
    /// Indices of the tasks to run here.
    pub local: &'a [u32],
    /// The engine to spawn them on.
    pub engine: &'a Engine,
    /// The exchange for remote edges of this attempt.
    pub exchange: &'a QuicExchange,
    /// The checkpoint the attempt resumes from (`None`: from scratch).
    pub restore: Option<&'a RestorePoint>,
    /// Where the attempt's tasks hand their checkpoint snapshots (sent on to the leader).
    pub snapshots: &'a Arc<dyn SnapshotSink>,
}

/// Snapshots of one attempt's tasks, queued for the reporting task.
struct AttemptSnapshots {
    job: u64,
    epoch: u64,
    queue: Arc<ReportQueue>,
    /// Where a finished task's last report is also held (see [`FinalReports`]).
    finals: Arc<Mutex<FinalReports>>,
}

impl SnapshotSink for AttemptSnapshots {
    fn snapshot(&self, s: TaskSnapshot) {
        let report = CheckpointReport {
            job: self.job,
            epoch: self.epoch,
            index: s.task,
            checkpoint: s.checkpoint,
            last: s.last,
            state: s.state,
        };
        if report.last {
            // Held before it is queued, so that its answer finds it.
            lock(&self.finals).hold(&report);
        }
        self.queue.push(report);
    }
}

/// The heartbeat interval and TTL an executor keeps: the current leader's, from its answer to
/// the registration and then from every heartbeat reply (`leader_heartbeat_ms`,
/// `leader_ttl_ms`), since the leader is the one that declares a silent executor lost; the
/// executor's own `heartbeat-ms` and `ttl-ms` only where the answer has none (zero).
pub fn heartbeat_timing(
    config: &ExecutorConfig,
    leader_heartbeat_ms: u64,
    leader_ttl_ms: u64,
) -> (Duration, Duration) {
    let pick = |leader: u64, own: u64| if leader > 0 { leader } else { own };
    (
        Duration::from_millis(pick(leader_heartbeat_ms, config.heartbeat_ms)),
        Duration::from_millis(pick(leader_ttl_ms, config.ttl_ms)),
    )
}

/// The masters client's timeouts for heartbeat `interval` and TTL `ttl`: a heartbeat may try
/// every master (a dead leader first) but must not outlast half a TTL (its patience), and
/// each attempt is short (half an interval, at least 100 ms) so that a dead master costs
/// little. Returns (patience, attempt timeout).
pub fn heartbeat_call_timeouts(interval: Duration, ttl: Duration) -> (Duration, Duration) {
    (ttl / 2, (interval / 2).max(Duration::from_millis(100)))
}

/// What [`reconcile_plan`] decided: the attempts to stop (and whether the job is gone from
/// this executor altogether), and the assignments to run (launching those not running).
#[derive(Debug, PartialEq)]
struct ReconcilePlan<'a> {
    stop: Vec<(u64, bool)>,
    keep: Vec<&'a Assignment>,
}

/// Compares the running attempts (job → epoch) with a leader's assignments. An assignment of
/// a newer epoch replaces the running attempt; one of an *older* epoch is ignored and the
/// running attempt kept: it comes from a master whose state lags (a leader cut off from the
/// other masters answers for a while from what it had applied), and obeying it would tear
/// down the current attempt for one the data plane already refuses. A job without an
/// assignment is stopped and forgotten (an attempt stopped here is never launched here
/// again). Of two assignments of one job, the newer epoch counts.
fn reconcile_plan<'a>(
    running: &HashMap<u64, u64>,
    assignments: &'a [Assignment],
) -> ReconcilePlan<'a> {
    let mut wanted: HashMap<u64, &Assignment> = HashMap::new();
    for a in assignments {
        let newest = wanted.entry(a.job).or_insert(a);
        if a.epoch > newest.epoch {
            *newest = a;
        }
    }
    let mut stop: Vec<(u64, bool)> = running
        .iter()
        .filter_map(|(job, epoch)| match wanted.get(job) {
            Some(a) if a.epoch > *epoch => Some((*job, false)),
            Some(_) => None,
            None => Some((*job, true)),
        })
        .collect();
    stop.sort_unstable();
    let mut keep: Vec<&Assignment> = wanted
        .into_values()
        .filter(|a| running.get(&a.job).is_none_or(|epoch| a.epoch >= *epoch))
        .collect();
    keep.sort_unstable_by_key(|a| a.job);
    ReconcilePlan { stop, keep }
}

/// What attempt `a` starts from: its checkpoint's states (`None`: from scratch), or why it
/// cannot start here. `retired`: the attempt was stopped on this executor before. It never
/// runs here again: a master that answered from older state (a leader cut off from the
/// others) may have had it stopped, and a second run would write its sinks' files alongside
/// what the first one left. Failing it makes the leader restart the job under a new epoch.
fn launch_restore(a: &Assignment, retired: bool) -> Result<Option<RestorePoint>, String> {
    if retired {
        return Err(format!(
            "attempt {} of job {} was stopped on this executor and cannot run on it again",
            a.epoch, a.job
        ));
    }
    match (a.restore_from, &a.restore) {
        (None, _) => Ok(None),
        (Some(id), Some(r)) if r.checkpoint == id => Ok(Some(RestorePoint {
            checkpoint: id,
            states: r.states.iter().cloned().collect(),
        })),
        (Some(id), _) => Err(format!(
            "checkpoint {id} to resume from is no longer held by the masters"
        )),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The shortest time between two heartbeats when data streams for an attempt not running
/// here ask for an early one ([`InboundRegistry::stream_for_unknown_attempt`]).
const EARLY_HEARTBEAT_GAP: Duration = Duration::from_millis(20);

/// Most reports sent in one call.
const REPORT_BATCH: usize = 1024;

/// How long the reporter waits after a checkpoint's first report for the rest before it
/// calls the leader. A checkpoint's reports come from every task of the attempt within a
/// fraction of a millisecond (the barrier passing through them); without the wait each one
/// woke the control runtime and made its own round trip, up to fourteen per checkpoint on one
/// executor, every wake taking a core from a busy engine worker. Queuing a report while the
/// reporter waits wakes nothing. The cost is this much delay before a checkpoint commits.
pub const REPORT_LINGER: Duration = Duration::from_millis(2);

/// How long a shutting-down executor tries to tell the masters it leaves.
const DEREGISTER_PATIENCE: Duration = Duration::from_secs(2);

/// Tells the masters that executor `id` (`incarnation`) leaves the cluster; on failure its
/// tasks move once its TTL passes, as for a crash.
async fn deregister(client: &MasterClient, id: u64, incarnation: u64) {
    let req = DeregisterRequest {
        executor_id: id,
        incarnation,
    };
    match client
        .call_with::<DeregisterExecutor>(&req, DEREGISTER_PATIENCE, DEREGISTER_PATIENCE / 2)
        .await
    {
        Ok(_) => info!(executor = id, "left the cluster"),
        Err(e) => warn!(
            executor = id,
            error = %e,
            "could not tell the masters this executor leaves; its tasks move once its TTL passes"
        ),
    }
}

/// The masters client's timeouts for checkpoint reports under heartbeat TTL `ttl`: the leader
/// answers a report that completes a checkpoint only once the commit is replicated (a
/// follower's fsync included), so an attempt may take half a TTL, and a batch is retried for
/// a whole TTL before it is dropped. Returns (patience, attempt timeout).
pub fn report_call_timeouts(ttl: Duration) -> (Duration, Duration) {
    (ttl, (ttl / 2).max(Duration::from_millis(100)))
}

/// Sends queued checkpoint reports to the leader, batched ([`REPORT_LINGER`]), until
/// aborted. A batch that cannot be delivered is dropped: its checkpoint never completes
/// and a later one does. Finished tasks' last reports among them are held in `finals` and
/// queued again by the heartbeat loop (see [`FinalReports`]); the answers go there.
async fn report_checkpoints(
    client: Arc<MasterClient>,
    executor: Arc<std::sync::atomic::AtomicU64>,
    queue: Arc<ReportQueue>,
    ttl: Duration,
    finals: Arc<Mutex<FinalReports>>,
) {
    let (patience, attempt) = report_call_timeouts(ttl);
    // While reports go undelivered: how many newer ones had replaced queued ones then.
    let mut undelivered_since: Option<u64> = None;
    loop {
        let reports = queue.next_batch(REPORT_LINGER, REPORT_BATCH).await;
        let req = CheckpointReports {
            executor_id: executor.load(std::sync::atomic::Ordering::Relaxed),
            reports,
        };
        let answer = match client
            .call_with::<ReportCheckpoints>(&req, patience, attempt)
            .await
        {
            Ok(taken) => {
                if let Some(before) = undelivered_since.take() {
                    info!(
                        superseded = queue.superseded().saturating_sub(before),
                        "checkpoint reports delivered again; queued reports replaced by newer \
                         checkpoints meanwhile are counted in superseded"
                    );
                }
                Answer::Taken(taken.term)
            }
            Err(e) => {
                undelivered_since.get_or_insert_with(|| queue.superseded());
                warn!(error = %e, reports = req.reports.len(), "checkpoint reports not delivered; a later checkpoint will complete instead");
                if e.is_retryable() {
                    Answer::Retry
                } else {
                    Answer::GiveUp
                }
            }
        };
        if req.reports.iter().any(|r| r.last) {
            lock(&finals).answered(&req.reports, answer);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded bookkeeping stays consistent if a holder panicked.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Attempt {
    epoch: u64,
    tasks: Vec<(u32, TaskHandle)>,
    /// Set when the attempt could not be launched: reported as failed tasks.
    launch_error: Option<(Vec<u32>, String)>,
    paused: bool,
}

/// How long a stopping executor waits for its data connections to close cleanly.
const DATA_CLOSE_PATIENCE: Duration = Duration::from_millis(200);

/// A running executor.
pub struct ExecutorServer {
    endpoint: Endpoint,
    control: Endpoint,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    config: ExecutorConfig,
    /// The data-plane endpoint (its address is the executor's address).
    endpoint: Endpoint,
    /// The runtime the data plane runs on (engine worker 0's thread).
    data_runtime: tokio::runtime::Handle,
    engine: Engine,
    registry: InboundRegistry,
    launcher: Arc<dyn JobLauncher>,
    attempts: BTreeMap<u64, Attempt>,
    /// Digest of the assignments `attempts` were last reconciled with (see
    /// [`HeartbeatRequest::assignments_digest`]); `None` after stopping everything.
    assignments_digest: Option<u64>,
    /// Checkpoint reports for the reporter to send (at most one per task).
    reports: Arc<ReportQueue>,
    /// Last reports of the running attempts' finished tasks, for each new leader.
    finals: Arc<Mutex<FinalReports>>,
    executor_id: Arc<std::sync::atomic::AtomicU64>,
}

impl ExecutorServer {
    /// Starts an executor: serves the data plane, registers, and heartbeats until stopped.
    pub async fn start(
        config: ExecutorConfig,
        launcher: Arc<dyn JobLauncher>,
    ) -> Result<Self, ExecutorError> {
        config.validate()?;
        let identity = Identity::load(&config.certs_dir, Role::Executor)?;
        // The data plane lives on engine worker 0's thread (see `reactor`): its endpoint is
        // bound inside the reactor's runtime, so its connections are driven there.
        let reactor = DataPlaneReactor::new().map_err(|e| ExecutorError::Engine(e.to_string()))?;
        let data_runtime = reactor.handle();
        let registry = InboundRegistry::default();
        let status_endpoint = Arc::new(std::sync::OnceLock::new());
        let status_workers = Arc::new(std::sync::OnceLock::new());
        let router = status_route(
            registry.router(),
            config.name.clone(),
            status_endpoint.clone(),
            status_workers.clone(),
        );
        let endpoint = {
            let _guard = data_runtime.enter();
            Endpoint::bind(
                config.listen_addr,
                &identity,
                TransportConfig::data_plane(),
                router,
            )?
        };
        // The cell is new and set only here, so this cannot fail.
        let _ = status_endpoint.set(endpoint.downgrade());
        // Control traffic (registration, heartbeats, checkpoint reports) has its own endpoint
        // on the caller's runtime, so it never waits for the engine thread.
        let control = Endpoint::bind(
            SocketAddr::new(config.listen_addr.ip(), 0),
            &identity,
            TransportConfig::default(),
            Router::new(),
        )?;
        let mut engine_config = EngineConfig::default();
        if let Some(w) = config.workers {
            engine_config.workers = w;
        }
        engine_config.spin = Duration::from_micros(config.spin_us);
        engine_config.spin_mode = config.spin_mode;
        let engine = Engine::start_with_reactor(engine_config, Box::new(reactor))
            .map_err(|e| ExecutorError::Engine(e.to_string()))?;
        // The cell is new and set only here, so this cannot fail.
        let _ = status_workers.set(
            (0..engine.worker_count())
                .filter_map(|i| engine.worker(i).cloned())
                .collect(),
        );
        {
            // The engine's event channel is unbounded and kept open by the engine itself:
            // drained here so it does not grow. A failure's reason is read from the task's
            // handle (`TaskHandle::failure`), which has it as soon as the state says Failed;
            // the worker logs each failure.
            let events = engine.events();
            std::thread::Builder::new()
                .name("microcosm-task-events".into())
                .spawn(move || while events.recv().is_ok() {})
                .map_err(|e| ExecutorError::Engine(e.to_string()))?;
        }
        let masters: Vec<SocketAddr> = config
            .masters
            .iter()
            .filter_map(|m| m.parse().ok())
            .collect();
        let client = MasterClient::new(control.clone(), masters);
        let mut state = State {
            config,
            endpoint: endpoint.clone(),
            data_runtime,
            engine,
            registry,
            launcher,
            attempts: BTreeMap::new(),
            assignments_digest: None,
            reports: Arc::default(),
            finals: Arc::default(),
            executor_id: Arc::default(),
        };
        let registered = register(&client, &state).await?;
        state
            .executor_id
            .store(registered.executor_id, std::sync::atomic::Ordering::Relaxed);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            state.run(client, &registered, stop_rx).await;
            // Close the data plane while the engine thread still drives its connections, so
            // peers hear of it now rather than after their idle timeout; the engine (and the
            // data plane's runtime with it) stops when `state` drops.
            state.stop_all();
            state.endpoint.close();
            if !state.endpoint.wait_closed(DATA_CLOSE_PATIENCE).await {
                debug!("data connections not closed cleanly before shutdown");
            }
        });
        Ok(Self {
            endpoint,
            control,
            stop,
            task,
        })
    }

    /// The data-plane address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Stops heartbeating and every task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.endpoint.close();
        self.control.close();
    }
}

/// The executor's name: the configured one, or one made of its data-plane address.
fn executor_name(configured: Option<&str>, addr: SocketAddr) -> String {
    configured.map_or_else(|| format!("executor@{addr}"), str::to_owned)
}

/// Adds [`GetExecutorStatus`] to the data plane's `router`, answered from the endpoint that
/// `endpoint` is set to once bound and the engine workers `workers` is set to once started.
fn status_route(
    router: Router,
    name: Option<String>,
    endpoint: Arc<std::sync::OnceLock<WeakEndpoint>>,
    workers: Arc<std::sync::OnceLock<Vec<WorkerHandle>>>,
) -> Router {
    router.route::<GetExecutorStatus, _, _>(move |_peer: Peer, _: Nothing| {
        let endpoint = endpoint.get().and_then(WeakEndpoint::upgrade);
        let name = name.clone();
        let workers_asleep_ns = workers.get().map_or_else(Vec::new, |workers| {
            workers
                .iter()
                .map(|w| u64::try_from(w.asleep().as_nanos()).unwrap_or(u64::MAX))
                .collect()
        });
        async move {
            let endpoint = endpoint.ok_or_else(|| {
                RemoteError::new(
                    ErrorCode::Unavailable,
                    "the executor is starting or stopping",
                )
            })?;
            Ok(ExecutorStatus {
                name: executor_name(name.as_deref(), endpoint.local_addr()),
                connections: endpoint
                    .connection_stats()
                    .iter()
                    .map(DataConnection::from)
                    .collect(),
                workers_asleep_ns,
            })
        }
    })
}

/// How long one registration call keeps trying the masters, and how long one attempt may
/// take. Registration is a raft write (possibly forwarded to the leader), so it gets the
/// client's default timeouts, not the heartbeats' shorter ones the client may have been set
/// to: an attempt that timed out while its write still committed would register a new
/// incarnation the executor never learns of, again and again.
const REGISTER_CALL: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(3));

async fn register(client: &MasterClient, state: &State) -> Result<Registered, ExecutorError> {
    let req = RegisterRequest {
        addr: state.endpoint.local_addr().to_string(),
        name: executor_name(state.config.name.as_deref(), state.endpoint.local_addr()),
        slots: state.config.slots,
    };
    register_with(client, &req, &state.config.masters.join(",")).await
}

async fn register_with(
    client: &MasterClient,
    req: &RegisterRequest,
    masters: &str,
) -> Result<Registered, ExecutorError> {
    let (patience, attempt) = REGISTER_CALL;
    let mut last = String::new();
    for _ in 0..20 {
        match client
            .call_with::<RegisterExecutor>(req, patience, attempt)
            .await
        {
            Ok(r) => {
                info!(
                    id = r.executor_id,
                    incarnation = r.incarnation,
                    "registered with the masters"
                );
                let members: Vec<SocketAddr> =
                    r.masters.iter().filter_map(|m| m.parse().ok()).collect();
                client.set_members(&members);
                return Ok(r);
            }
            Err(e) if e.is_retryable() => {
                warn!(error = %e, "registration failed; retrying");
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                last = e.to_string();
                break;
            }
        }
    }
    Err(ExecutorError::Register {
        addrs: masters.to_owned(),
        reason: last,
    })
}

impl State {
    async fn run(
        &mut self,
        client: MasterClient,
        registered: &Registered,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let (mut id, mut incarnation) = (registered.executor_id, registered.incarnation);
        let (interval, ttl) =
            heartbeat_timing(&self.config, registered.heartbeat_ms, registered.ttl_ms);
        if (interval, ttl) != self.configured_timing() {
            info!(
                heartbeat_ms = millis(interval),
                ttl_ms = millis(ttl),
                configured_heartbeat_ms = self.config.heartbeat_ms,
                configured_ttl_ms = self.config.ttl_ms,
                "using the leader's heartbeat interval and TTL"
            );
        }
        let (patience, attempt) = heartbeat_call_timeouts(interval, ttl);
        let client = Arc::new(client.with_timeouts(patience, attempt));
        let reporter = tokio::spawn(report_checkpoints(
            client.clone(),
            self.executor_id.clone(),
            self.reports.clone(),
            ttl,
            self.finals.clone(),
        ));
        let mut schedule = HeartbeatSchedule::new(interval, ttl);
        let mut due: Option<Instant> = None;
        let mut last_ok = tokio::time::Instant::now();
        let mut last_sent = tokio::time::Instant::now();
        loop {
            // tokio's clock, so that a test with paused time drives the schedule.
            let now = tokio::time::Instant::now().into_std();
            let next = due.map_or(now, |previous| {
                schedule.next(previous, now, !self.attempts.is_empty())
            });
            due = Some(next);
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {}
                _ = self.registry.stream_for_unknown_attempt() => {
                    // Early, but not more often than every EARLY_HEARTBEAT_GAP (streams of
                    // an attempt that never comes here arrive until they are refused).
                    tokio::select! {
                        _ = tokio::time::sleep_until(last_sent + EARLY_HEARTBEAT_GAP) => {}
                        _ = stop.changed() => break,
                    }
                    // The schedule goes on from now.
                    due = Some(tokio::time::Instant::now().into_std());
                }
                _ = stop.changed() => break,
            }
            let req = HeartbeatRequest {
                executor_id: id,
                incarnation,
                tasks: self.reports(),
                assignments_digest: self.assignments_digest,
            };
            let sent = std::time::Instant::now();
            last_sent = tokio::time::Instant::now();
            match client.call::<Heartbeat>(&req).await {
                Ok(reply) => {
                    last_ok = tokio::time::Instant::now();
                    // The leader's member list: a master that left is no longer tried.
                    let members: Vec<SocketAddr> = reply
                        .masters
                        .iter()
                        .filter_map(|m| m.parse().ok())
                        .collect();
                    client.set_members(&members);
                    // A leader elected since the registration may expect another interval.
                    self.adopt_timing(&mut schedule, &client, reply.heartbeat_ms, reply.ttl_ms);
                    if let Some(reason) = reply.reregister {
                        warn!(executor = id, %reason, "masters do not know this executor; stopping every task and registering again");
                        self.stop_all();
                        let again = tokio::select! {
                            r = register(&client, self) => r,
                            // Registration retries for up to ~2 min; a stop must not wait.
                            _ = stop.changed() => break,
                        };
                        match again {
                            Ok(again) => {
                                (id, incarnation) = (again.executor_id, again.incarnation);
                                self.adopt_timing(
                                    &mut schedule,
                                    &client,
                                    again.heartbeat_ms,
                                    again.ttl_ms,
                                );
                                self.executor_id
                                    .store(id, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => warn!(error = %e, "re-registration failed; will retry"),
                        }
                        continue;
                    }
                    // `None`: the same assignments as last time, nothing to reconcile.
                    if let Some(assignments) = &reply.assignments {
                        self.reconcile(assignments);
                        self.assignments_digest = Some(reply.assignments_digest);
                    }
                    // What runs here now is what the masters want: data streams for any
                    // other attempt that arrived a TTL or more before this heartbeat are
                    // refused.
                    self.registry.confirm_assignments(
                        sent,
                        schedule.ttl(),
                        self.attempts.iter().map(|(job, a)| (*job, a.epoch)),
                    );
                    self.resend_finals(reply.leader_term);
                }
                Err(e) => {
                    if last_ok.elapsed() > schedule.ttl() {
                        warn!(error = %e, "no heartbeat accepted for longer than the TTL; tasks keep running until a master answers");
                    }
                }
            }
        }
        // Leave before the tasks stop: their peers' failures are then of a replaced attempt
        // and do not count as the job's restarts, and the tasks move now, not after a TTL.
        deregister(&client, id, incarnation).await;
        self.stop_all();
        reporter.abort();
    }

    /// The executor's own heartbeat interval and TTL.
    fn configured_timing(&self) -> (Duration, Duration) {
        heartbeat_timing(&self.config, 0, 0)
    }

    /// Switches the heartbeat `schedule` and the masters `client`'s timeouts to the timing a
    /// leader's answer gives (see [`heartbeat_timing`]), if it differs from the current one.
    fn adopt_timing(
        &self,
        schedule: &mut HeartbeatSchedule,
        client: &MasterClient,
        leader_heartbeat_ms: u64,
        leader_ttl_ms: u64,
    ) {
        let (interval, ttl) = heartbeat_timing(&self.config, leader_heartbeat_ms, leader_ttl_ms);
        if (interval, ttl) == (schedule.interval(), schedule.ttl()) {
            return;
        }
        info!(
            heartbeat_ms = millis(interval),
            ttl_ms = millis(ttl),
            previous_heartbeat_ms = millis(schedule.interval()),
            previous_ttl_ms = millis(schedule.ttl()),
            "the leader expects another heartbeat interval and TTL; using them"
        );
        *schedule = schedule.retimed(interval, ttl);
        let (patience, attempt) = heartbeat_call_timeouts(interval, ttl);
        client.set_timeouts(patience, attempt);
    }

    fn reports(&self) -> Vec<TaskReport> {
        let mut out = Vec::new();
        for (job, attempt) in &self.attempts {
            if let Some((indices, message)) = &attempt.launch_error {
                out.extend(indices.iter().map(|&index| TaskReport {
                    job: *job,
                    epoch: attempt.epoch,
                    index,
                    state: TaskRunState::Failed,
                    message: message.clone(),
                }));
                continue;
            }
            for (index, handle) in &attempt.tasks {
                let state = match handle.state() {
                    TaskState::Starting | TaskState::Running | TaskState::Finishing => {
                        TaskRunState::Running
                    }
                    TaskState::Paused => TaskRunState::Paused,
                    TaskState::Finished => TaskRunState::Finished,
                    TaskState::Failed => TaskRunState::Failed,
                    TaskState::Cancelled => continue,
                };
                let message = if state == TaskRunState::Failed {
                    handle.failure().unwrap_or("task failed").to_string()
                } else {
                    String::new()
                };
                out.push(TaskReport {
                    job: *job,
                    epoch: attempt.epoch,
                    index: *index,
                    state,
                    message: format!("{}: {message}", handle.name())
                        .trim_end_matches(": ")
                        .to_string(),
                });
            }
        }
        out
    }

    /// Queues again the finished tasks' last reports that the leader of `term` lacks.
    fn resend_finals(&self, term: u64) {
        let due = lock(&self.finals).due(term);
        if due.is_empty() {
            return;
        }
        debug!(
            term,
            reports = due.len(),
            "sending finished tasks' last checkpoint reports to the leader"
        );
        for report in due {
            self.reports.push(report);
        }
    }

    fn stop_attempt(&mut self, job: u64) {
        if let Some(attempt) = self.attempts.remove(&job) {
            lock(&self.finals).close(job, attempt.epoch);
            for (_, handle) in &attempt.tasks {
                handle.cancel();
            }
            self.registry.retire(job, attempt.epoch);
            info!(job, epoch = attempt.epoch, "stopped job attempt");
        }
    }

    fn stop_all(&mut self) {
        self.assignments_digest = None;
        let jobs: Vec<u64> = self.attempts.keys().copied().collect();
        for job in jobs {
            self.stop_attempt(job);
            self.registry.forget_job(job);
        }
    }

    fn reconcile(&mut self, assignments: &[Assignment]) {
        let running: HashMap<u64, u64> = self
            .attempts
            .iter()
            .map(|(job, a)| (*job, a.epoch))
            .collect();
        let plan = reconcile_plan(&running, assignments);
        for (job, forget) in plan.stop {
            self.stop_attempt(job);
            if forget {
                self.registry.forget_job(job);
            }
        }
        for a in plan.keep {
            if !self.attempts.contains_key(&a.job) {
                self.launch(a);
            }
            if let Some(attempt) = self.attempts.get_mut(&a.job)
                && attempt.paused != a.paused
            {
                for (_, h) in &attempt.tasks {
                    if a.paused {
                        h.pause();
                    } else {
                        h.resume();
                    }
                }
                attempt.paused = a.paused;
            }
        }
    }

    fn launch(&mut self, a: &Assignment) {
        let me = self.endpoint.local_addr().to_string();
        let local: Vec<u32> = a
            .locations
            .iter()
            .filter(|l| l.addr == me)
            .map(|l| l.index)
            .collect();
        let restore = launch_restore(a, self.registry.is_retired(a.job, a.epoch));
        lock(&self.finals).open(a.job, a.epoch);
        let snapshots: Arc<dyn SnapshotSink> = Arc::new(AttemptSnapshots {
            job: a.job,
            epoch: a.epoch,
            queue: self.reports.clone(),
            finals: self.finals.clone(),
        });
        if let Ok(Some(point)) = &restore {
            info!(
                job = a.job,
                epoch = a.epoch,
                checkpoint = point.checkpoint,
                "resuming from checkpoint"
            );
        }
        let result = restore.and_then(|restore| {
            let graph = self.launcher.plan(&a.job_type, &a.spec)?;
            let by_index: HashMap<u32, &str> = a
                .locations
                .iter()
                .map(|l| (l.index, l.addr.as_str()))
                .collect();
            let mut routes = HashMap::new();
            for e in &graph.edges {
                let (Some(from), Some(to)) = (by_index.get(&e.from), by_index.get(&e.to)) else {
                    return Err(format!("edge {} has an unplaced end", e.id));
                };
                if *from == me && *to != me {
                    let addr: SocketAddr = to
                        .parse()
                        .map_err(|err| format!("bad executor address {to:?}: {err}"))?;
                    routes.insert(e.id, addr);
                }
            }
            let exchange = QuicExchange::new(
                a.job,
                a.epoch,
                self.endpoint.clone(),
                self.data_runtime.clone(),
                routes,
                self.registry.clone(),
            );
            self.launcher.launch(Launch {
                job: a.job,
                epoch: a.epoch,
                job_type: &a.job_type,
                spec: &a.spec,
                graph: &graph,
                local: &local,
                engine: &self.engine,
                exchange: &exchange,
                restore: restore.as_ref(),
                snapshots: &snapshots,
            })
        });
        let attempt = match result {
            Ok(tasks) => {
                self.registry.launched(a.job, a.epoch);
                info!(
                    job = a.job,
                    epoch = a.epoch,
                    tasks = tasks.len(),
                    "started job attempt"
                );
                Attempt {
                    epoch: a.epoch,
                    tasks,
                    launch_error: None,
                    paused: false,
                }
            }
            Err(e) => {
                warn!(job = a.job, epoch = a.epoch, error = %e, "cannot start job attempt");
                Attempt {
                    epoch: a.epoch,
                    tasks: Vec::new(),
                    launch_error: Some((local, e)),
                    paused: false,
                }
            }
        };
        self.attempts.insert(a.job, attempt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen-addr = "127.0.0.1:7201"
masters = ["127.0.0.1:7101"]
certs-dir = "certs"
"#;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Registration keeps its own timeouts when the client was set to the heartbeats'
    /// short ones: a master whose write takes longer than a heartbeat attempt (200 ms
    /// against 125 ms here) still registers the executor.
    #[tokio::test]
    async fn registration_outlasts_the_heartbeats_short_attempts() {
        let dir = tempfile::tempdir().unwrap();
        microcosm_transport::tls::init_cluster_certs(dir.path(), "test", &[]).unwrap();
        let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = calls.clone();
        let master = Endpoint::bind(
            localhost,
            &Identity::load(dir.path(), Role::Master).unwrap(),
            TransportConfig::default(),
            Router::new().route::<RegisterExecutor, _, _>(move |_peer, _req: RegisterRequest| {
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    tokio::time::sleep(ms(200)).await;
                    Ok(Registered {
                        executor_id: 7,
                        incarnation: u64::from(n) + 1,
                        heartbeat_ms: 250,
                        ttl_ms: 1500,
                        masters: Vec::new(),
                    })
                }
            }),
        )
        .unwrap();
        let own = Endpoint::bind(
            localhost,
            &Identity::load(dir.path(), Role::Executor).unwrap(),
            TransportConfig::default(),
            Router::new(),
        )
        .unwrap();
        let (patience, attempt) = heartbeat_call_timeouts(ms(250), ms(1500));
        assert!(
            attempt < ms(200),
            "the test needs attempts shorter than the write"
        );
        let client =
            MasterClient::new(own, vec![master.local_addr()]).with_timeouts(patience, attempt);
        let req = RegisterRequest {
            addr: "127.0.0.1:1".into(),
            name: "e".into(),
            slots: 1,
        };
        let registered = register_with(&client, &req, "m").await.unwrap();
        assert_eq!(registered.executor_id, 7);
        // One write: no attempt timed out while its registration went on.
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(registered.incarnation, 1);
    }

    fn assignment(job: u64, epoch: u64) -> Assignment {
        Assignment {
            job,
            epoch,
            job_type: "demo".into(),
            spec: String::new(),
            locations: Vec::new(),
            paused: false,
            restore_from: None,
            restore: None,
        }
    }

    #[test]
    fn an_assignment_of_an_older_epoch_never_replaces_the_running_attempt() {
        // Job 1 runs at epoch 5, job 2 at epoch 3, job 3 at epoch 1.
        let running: HashMap<u64, u64> = [(1, 5), (2, 3), (3, 1)].into_iter().collect();
        let assignments = [
            assignment(1, 4), // from a lagging leader: ignored
            assignment(2, 4), // newer: replaces epoch 3
            assignment(4, 1), // new job: launched
        ];
        let plan = reconcile_plan(&running, &assignments);
        // Job 2's attempt stops for its successor; job 3 is no longer assigned here at all.
        assert_eq!(plan.stop, vec![(2, false), (3, true)]);
        let keep: Vec<(u64, u64)> = plan.keep.iter().map(|a| (a.job, a.epoch)).collect();
        assert_eq!(keep, vec![(2, 4), (4, 1)]);
        // The same epoch keeps the attempt (and is where pause and resume apply).
        let same = [assignment(1, 5)];
        let plan = reconcile_plan(&running, &same);
        assert_eq!(plan.stop, vec![(2, true), (3, true)]);
        assert_eq!(plan.keep.len(), 1);
        // One job assigned twice (a malformed reply): the newer epoch counts, in any order.
        for twice in [
            [assignment(2, 4), assignment(2, 6)],
            [assignment(2, 6), assignment(2, 4)],
        ] {
            let plan = reconcile_plan(&running, &twice);
            let keep: Vec<(u64, u64)> = plan.keep.iter().map(|a| (a.job, a.epoch)).collect();
            assert_eq!(keep, vec![(2, 6)]);
            assert!(plan.stop.contains(&(2, false)));
        }
    }

    #[test]
    fn an_idle_executor_heartbeats_half_as_often_but_three_times_per_ttl() {
        let s = HeartbeatSchedule::new(ms(250), ms(1500));
        assert_eq!((s.interval(), s.idle_interval()), (ms(250), ms(500)));
        // The TTL caps the idle interval at a third of it ...
        assert_eq!(
            HeartbeatSchedule::new(ms(250), ms(900)).idle_interval(),
            ms(300)
        );
        // ... but never below the busy interval (the smallest TTL config allows: two beats).
        assert_eq!(
            HeartbeatSchedule::new(ms(250), ms(500)).idle_interval(),
            ms(250)
        );

        let t0 = Instant::now();
        // Never ran anything: idle at once.
        let mut fresh = s;
        assert_eq!(fresh.next(t0, t0 + ms(2), false), t0 + ms(500));
        // Running: the short interval, and due times stay on the schedule while round trips
        // are short ...
        let mut busy = s;
        let mut due = t0;
        for _ in 0..4 {
            due = busy.next(due, due + ms(3), true);
        }
        assert_eq!(due, t0 + ms(1000));
        // ... and a round trip longer than the period delays the next one by a full period.
        assert_eq!(busy.next(due, due + ms(400), true), due + ms(650));
        // Its attempt ended (a job being recovered): still 250 ms for a TTL ...
        let ended = t0 + ms(1400);
        assert_eq!(busy.next(ended, ended + ms(1), false), ended + ms(250));
        let late = ended + ms(1399);
        assert_eq!(busy.next(late, late, false), late + ms(250));
        // ... then idle.
        let later = t0 + ms(1400 + 1500);
        assert_eq!(busy.next(later, later, false), later + ms(500));
        // Idle and a slow round trip: one idle period after it.
        assert_eq!(fresh.next(t0, t0 + ms(700), false), t0 + ms(1200));
    }

    #[test]
    fn an_attempt_starts_from_its_checkpoint_unless_stopped_here_before_or_its_states_are_gone() {
        let mut a = Assignment {
            job: 4,
            epoch: 2,
            job_type: "t".into(),
            spec: String::new(),
            locations: Vec::new(),
            paused: false,
            restore_from: None,
            restore: None,
        };
        assert_eq!(launch_restore(&a, false), Ok(None));
        a.restore_from = Some(9);
        a.restore = Some(crate::proto::RestoreState {
            checkpoint: 9,
            states: vec![(0, vec![1]), (3, vec![2])],
        });
        let point = launch_restore(&a, false).unwrap().unwrap();
        assert_eq!(point.checkpoint, 9);
        assert_eq!(point.states[&3], vec![2]);
        let e = launch_restore(&a, true).unwrap_err();
        assert!(
            e.contains("attempt 2 of job 4 was stopped on this executor"),
            "{e}"
        );
        a.restore.as_mut().unwrap().checkpoint = 8;
        let e = launch_restore(&a, false).unwrap_err();
        assert!(
            e.contains("checkpoint 9 to resume from is no longer held"),
            "{e}"
        );
    }

    #[test]
    fn parses_with_defaults() {
        let c = ExecutorConfig::from_toml(BASE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.slots, 64);
        assert_eq!((c.heartbeat_ms, c.ttl_ms), (250, 1500));
        assert_eq!(
            (c.spin_us, c.spin_mode),
            (DEFAULT_SPIN_US, SpinMode::Adaptive)
        );
    }

    #[test]
    fn a_listen_address_nobody_can_dial_is_refused() {
        for addr in ["0.0.0.0:7201", "[::]:7201"] {
            let text = BASE.replace("127.0.0.1:7201", addr);
            let c = ExecutorConfig::from_toml(&text).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("listen-addr {}", c.listen_addr)),
                "{err}"
            );
        }
    }

    #[test]
    fn the_leaders_heartbeat_interval_and_ttl_win_over_the_executors_own() {
        let c = ExecutorConfig::from_toml(&format!("{BASE}heartbeat-ms = 5000\nttl-ms = 15000\n"))
            .unwrap();
        let ms = Duration::from_millis;
        assert_eq!(heartbeat_timing(&c, 250, 1500), (ms(250), ms(1500)));
        // A leader that sends no figures leaves the executor's own.
        assert_eq!(heartbeat_timing(&c, 0, 0), (ms(5000), ms(15000)));
        assert_eq!(heartbeat_timing(&c, 100, 0), (ms(100), ms(15000)));
        // Heartbeats give up within half a TTL, each attempt within half an interval.
        assert_eq!(
            heartbeat_call_timeouts(ms(250), ms(1500)),
            (ms(750), ms(125))
        );
        assert_eq!(
            heartbeat_call_timeouts(ms(50), ms(1500)),
            (ms(750), ms(100))
        );
    }

    #[test]
    fn a_retimed_schedule_keeps_when_the_executor_last_ran_an_attempt() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut s = HeartbeatSchedule::new(ms(1000), ms(6000));
        assert_eq!(s.next(t0, t0, true), t0 + ms(1000));
        // A new leader's shorter interval: the executor ran an attempt 1 s ago, so it keeps
        // the running interval rather than starting out idle.
        let mut s = s.retimed(ms(100), ms(600));
        assert_eq!((s.interval(), s.ttl()), (ms(100), ms(600)));
        let t1 = t0 + ms(300);
        assert_eq!(s.next(t1, t1, false), t1 + ms(100));
        let t2 = t0 + ms(700);
        assert_eq!(s.next(t2, t2, false), t2 + s.idle_interval());
    }

    #[test]
    fn spin_mode_is_read_by_name_and_a_wrong_one_is_named() {
        let c = ExecutorConfig::from_toml(&format!("{BASE}spin-mode = \"always\"\n")).unwrap();
        assert_eq!(c.spin_mode, SpinMode::Always);
        let err = ExecutorConfig::from_toml(&format!("{BASE}spin-mode = \"often\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("often") && err.contains("adaptive"), "{err}");
    }

    #[test]
    fn ttl_below_two_heartbeats_is_refused() {
        let c = ExecutorConfig::from_toml(&format!("{BASE}ttl-ms = 400\n")).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("ttl-ms") && err.contains("heartbeat-ms"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_masters_are_named() {
        let err = ExecutorConfig::from_toml(&format!("{BASE}slot = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot"), "{err}");
        let c = ExecutorConfig::from_toml(&BASE.replace("127.0.0.1:7101", "nowhere")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("masters"));
    }
}
