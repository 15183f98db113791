//! The metadata model and its deterministic state machine.
//!
//! [`MetaState::apply`] is a pure function of the current state and one [`MetaRequest`]: no
//! clocks, no randomness, no I/O. Any time a command needs is carried inside it (`at_ms`, set by
//! the proposer), so every master that applies the same log reaches the same state. Id counters
//! live in the state, so ids never repeat across restarts and leader changes. Every request
//! carries a [`RequestId`]; a retried request with an already-applied id returns the original
//! response and changes nothing (bounded dedup table, see [`MAX_DEDUP_CLIENTS`]).
//!
//! Errors caused by the request (unknown ids, stale epochs, …) are returned as
//! [`CommandResponse::Rejected`], never as panics: they are part of the replicated outcome.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::job::{Cause, JobState};

/// Most clients whose last request id (and response) is remembered for deduplication, of each
/// kind (users' clients, and the masters' own one-shot writes, [`INTERNAL_CLIENT`]); when more
/// clients of a kind write, the one of that kind that wrote least recently is forgotten. The
/// masters' own writes (a leader step, a checkpoint commit: several a second) thus never push
/// a user's submission out of the table while the user may still retry it.
pub const MAX_DEDUP_CLIENTS: usize = 1024;
/// The client-id bit that marks the masters' own writes. A user's client id never has it
/// ([`external_client`]).
pub const INTERNAL_CLIENT: u64 = 1 << 63;

/// A user's client id as the dedup table keys it: without [`INTERNAL_CLIENT`].
pub fn external_client(id: u64) -> u64 {
    id & !INTERNAL_CLIENT
}
/// Most task ids one [`Command::AllocateTaskIds`] may ask for.
pub const MAX_TASKS_PER_ALLOCATION: u32 = 100_000;
/// Largest job spec accepted, in bytes: the metadata keeps it for the job's life and every
/// heartbeat reply to an executor of the job carries it.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Longest job type name accepted, in bytes.
pub const MAX_JOB_TYPE_BYTES: usize = 256;
/// Most bytes of task state one checkpoint may hold, all tasks together: every master keeps
/// each job's latest checkpoint and sends it to the executors of a restarted attempt.
pub const MAX_CHECKPOINT_BYTES: usize = 1 << 20;
/// Most history entries kept per job (older ones are dropped first).
pub const MAX_JOB_HISTORY: usize = 256;
/// How many restart times a job record keeps ([`JobRecord::recent_restarts_ms`]).
pub const MAX_RECENT_RESTARTS: usize = 16;
/// Most ended jobs (Finished, Failed, Cancelled) kept: a submission that would keep more
/// forgets the oldest ended jobs, with their tasks and checkpoints.
pub const MAX_ENDED_JOBS: usize = 1000;
/// Most lost executor records kept: a registration that would keep more forgets the oldest
/// lost ones (never the latest record of an address, which carries its incarnation count).
pub const MAX_LOST_EXECUTORS: usize = 1000;

/// Checks a job submission's sizes ([`MAX_JOB_TYPE_BYTES`], [`MAX_SPEC_BYTES`]); masters check
/// before proposing and the state machine again when applying.
pub fn check_submission(job_type: &str, spec: &str) -> Result<(), Rejection> {
    if job_type.len() > MAX_JOB_TYPE_BYTES {
        return Err(Rejection::InvalidArgument(format!(
            "job type is {} bytes long; at most {MAX_JOB_TYPE_BYTES}",
            job_type.len()
        )));
    }
    if spec.len() > MAX_SPEC_BYTES {
        return Err(Rejection::InvalidArgument(format!(
            "job spec is {} bytes; at most {MAX_SPEC_BYTES}",
            spec.len()
        )));
    }
    Ok(())
}

/// Checks the task costs of a job's plan as [`Command::AllocateTaskIds`] takes them: 1 to
/// [`MAX_TASKS_PER_ALLOCATION`] tasks, each of cost 1 or more. Returns the task count.
pub fn check_task_costs(costs: &[u32]) -> Result<u32, String> {
    let count = u32::try_from(costs.len())
        .ok()
        .filter(|n| (1..=MAX_TASKS_PER_ALLOCATION).contains(n))
        .ok_or_else(|| {
            format!(
                "the plan has {} tasks; a job has 1 to {MAX_TASKS_PER_ALLOCATION}",
                costs.len()
            )
        })?;
    match costs.iter().position(|&c| c == 0) {
        Some(index) => Err(format!(
            "task {index} has cost 0; every task needs at least 1 slot"
        )),
        None => Ok(count),
    }
}

/// Identifies an executor registration; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExecutorId(pub u64);

/// Identifies a submitted job; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub u64);

/// Identifies a task of some job; never reused across jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl std::fmt::Display for ExecutorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "executor-{}", self.0)
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job-{}", self.0)
    }
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task-{}", self.0)
    }
}

/// Identifies one write of one client: a retry reuses it, a new write increments `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The writer (e.g. a master process incarnation or a CLI session), chosen at random.
    pub client: u64,
    /// Increases by one per new write of this client.
    pub seq: u64,
}

/// One replicated write: the command plus the id used to deduplicate retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRequest {
    /// Request id; a retry carries the same id.
    pub id: RequestId,
    /// What to do.
    pub command: Command,
}

/// A change to the metadata. Times are milliseconds since the Unix epoch set by the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A new executor process announces itself; it gets a fresh id and an incarnation.
    RegisterExecutor {
        /// The executor's RPC address.
        addr: String,
        /// Human-readable name (host name, …).
        name: String,
        /// Task slots it offers.
        slots: u32,
        /// Proposer's wall-clock time.
        at_ms: u64,
    },
    /// The executor is considered dead; its tasks lose their placement.
    ExecutorLost {
        /// Which executor.
        id: ExecutorId,
        /// Why (e.g. "missed 3 heartbeats").
        reason: String,
        /// Proposer's wall-clock time.
        at_ms: u64,
    },
    /// A user submits a job.
    SubmitJob {
        /// Job type (which plan builder to use).
        job_type: String,
        /// The job specification (TOML text).
        spec: String,
        /// Proposer's wall-clock time.
        at_ms: u64,
    },
    /// The job moves to another lifecycle state.
    SetJobState {
        /// Which job.
        job: JobId,
        /// The state the proposer saw the job in. The command is refused
        /// ([`Rejection::StateChanged`]) if the job has left it since, so that a step planned
        /// against an older state (a leader's, or a user's on a lagging master) never undoes a
        /// change applied after it, such as a cancel.
        from: JobState,
        /// New state.
        state: JobState,
        /// Why.
        reason: String,
        /// What the change means to the scheduler; a [`Cause::Restart`] also counts in
        /// [`JobRecord::restarts`].
        cause: Cause,
        /// Proposer's wall-clock time.
        at_ms: u64,
    },
    /// Create a job's tasks, one per entry of `costs`; refused
    /// ([`Rejection::TasksAllocated`]) if it has them already.
    AllocateTaskIds {
        /// Which job.
        job: JobId,
        /// Each task's cost in slots (at least 1), in task order; 1 to
        /// [`MAX_TASKS_PER_ALLOCATION`] tasks.
        costs: Vec<u32>,
    },
    /// Place (or re-place) tasks of a job; compare-and-set on the job epoch, which then
    /// increases by one (fencing every older attempt).
    SetPlacements {
        /// Which job.
        job: JobId,
        /// The job epoch the proposer planned against; must equal the current one.
        epoch: u64,
        /// Task → executor.
        placements: Vec<(TaskId, ExecutorId)>,
    },
    /// A checkpoint completed: one state blob per task of the job.
    CommitCheckpoint {
        /// Which job.
        job: JobId,
        /// The epoch of the attempt that took it; must equal the current job epoch.
        epoch: u64,
        /// Checkpoint id; must be greater than the latest committed one.
        checkpoint_id: u64,
        /// Per-task state; must cover every task of the job exactly once.
        states: Vec<(TaskId, Vec<u8>)>,
        /// Proposer's wall-clock time.
        at_ms: u64,
    },
}

/// The outcome of applying one request (or one raft-internal entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// A raft-internal entry (blank or membership) was applied.
    Internal,
    /// [`Command::RegisterExecutor`] succeeded.
    ExecutorRegistered {
        /// The new id.
        id: ExecutorId,
        /// 1 for the first registration at this address, +1 for each re-registration.
        incarnation: u64,
        /// An earlier registration at the same address that is now marked lost.
        superseded: Option<ExecutorId>,
    },
    /// [`Command::ExecutorLost`] succeeded.
    ExecutorLost {
        /// Tasks that were placed on the executor and are now unplaced.
        unplaced: Vec<TaskId>,
    },
    /// [`Command::SubmitJob`] succeeded.
    JobSubmitted {
        /// The new id.
        id: JobId,
    },
    /// [`Command::SetJobState`] succeeded.
    JobStateSet,
    /// [`Command::AllocateTaskIds`] succeeded: ids `first .. first + count`.
    TaskIdsAllocated {
        /// The first new id.
        first: TaskId,
        /// How many.
        count: u32,
    },
    /// [`Command::SetPlacements`] succeeded.
    PlacementsSet {
        /// The job's new epoch.
        epoch: u64,
    },
    /// [`Command::CommitCheckpoint`] succeeded.
    CheckpointCommitted,
    /// The request was refused; the state is unchanged.
    Rejected(Rejection),
}

/// Why a request was refused (deterministic: every replica computes the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No executor with this id.
    #[error("unknown executor {0}")]
    UnknownExecutor(ExecutorId),
    /// The executor is lost and cannot receive tasks.
    #[error("executor {0} is lost")]
    ExecutorNotAlive(ExecutorId),
    /// No job with this id.
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    /// The task does not exist or belongs to another job.
    #[error("task {task} does not belong to job {job}")]
    UnknownTask {
        /// The job named in the command.
        job: JobId,
        /// The offending task.
        task: TaskId,
    },
    /// The job is in a terminal state.
    #[error("job {job} is {state} (terminal)")]
    JobTerminal {
        /// The job.
        job: JobId,
        /// Its terminal state.
        state: JobState,
    },
    /// The job is no longer in the state the command was planned against.
    #[error("job {job} is {current}, not {expected} as the command assumed")]
    StateChanged {
        /// The job.
        job: JobId,
        /// The state named in the command.
        expected: JobState,
        /// The job's current state.
        current: JobState,
    },
    /// The command was planned against an older (or future) job epoch.
    #[error("stale epoch for job {job}: command has {got}, current is {current}")]
    StaleEpoch {
        /// The job.
        job: JobId,
        /// Epoch in the command.
        got: u64,
        /// Current epoch.
        current: u64,
    },
    /// The job's tasks were allocated already (a job gets its tasks once; a repeated
    /// allocation, planned before the first one applied, would double them).
    #[error("job {job} already has its {count} tasks")]
    TasksAllocated {
        /// The job.
        job: JobId,
        /// How many tasks it has.
        count: usize,
    },
    /// The restart is recorded already for this epoch (planned again before the first one
    /// applied, it would count twice).
    #[error("job {job} was already restarted after its attempt at epoch {epoch} failed")]
    AlreadyRestarted {
        /// The job.
        job: JobId,
        /// The epoch whose failure the restart answers.
        epoch: u64,
    },
    /// The checkpoint id is not newer than the latest committed one.
    #[error("checkpoint {got} of job {job} is not newer than {latest}")]
    StaleCheckpoint {
        /// The job.
        job: JobId,
        /// Checkpoint id in the command.
        got: u64,
        /// Latest committed checkpoint id.
        latest: u64,
    },
    /// The checkpoint does not cover every task of the job exactly once.
    #[error("checkpoint of job {job} is incomplete: {reason}")]
    IncompleteCheckpoint {
        /// The job.
        job: JobId,
        /// What is missing or duplicated.
        reason: String,
    },
    /// A request older than the client's last applied one (its response is no longer known).
    #[error("request {seq} of client {client} is older than its last applied request {last}")]
    StaleRequest {
        /// Client id.
        client: u64,
        /// Sequence in the request.
        seq: u64,
        /// Last applied sequence of this client.
        last: u64,
    },
    /// An argument is out of range; the message names it.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Liveness of a registered executor as recorded in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorState {
    /// Registered and not declared lost.
    Alive,
    /// Declared lost (or superseded by a re-registration); never alive again.
    Lost,
}

/// A registered executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorRecord {
    /// Its id.
    pub id: ExecutorId,
    /// RPC address.
    pub addr: String,
    /// Name.
    pub name: String,
    /// Task slots offered.
    pub slots: u32,
    /// Registration count at this address, starting at 1.
    pub incarnation: u64,
    /// Alive or lost.
    pub state: ExecutorState,
    /// When it registered (proposer time, ms).
    pub registered_at_ms: u64,
    /// Why and when it was lost, if it was.
    pub lost: Option<(String, u64)>,
}

/// One recorded job state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTransition {
    /// The state entered.
    pub state: JobState,
    /// Why.
    pub reason: String,
    /// When (proposer time, ms).
    pub at_ms: u64,
    /// What it means to the scheduler (the reason is for people).
    pub cause: Cause,
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// Job type.
    pub job_type: String,
    /// Specification (TOML text).
    pub spec: String,
    /// Current state.
    pub state: JobState,
    /// State changes, oldest first (at most [`MAX_JOB_HISTORY`]).
    pub history: Vec<JobTransition>,
    /// How many times the job was restarted after a task failed (transitions with
    /// [`Cause::Restart`]); counted here because the history keeps only its latest entries.
    pub restarts: u32,
    /// When (proposer's wall-clock ms) the latest restarts were decided, oldest first: at most
    /// [`MAX_RECENT_RESTARTS`], enough for the leader's restart budget per time window.
    pub recent_restarts_ms: Vec<u64>,
    /// The epoch of the attempt whose failure the latest restart answered.
    pub restarted_epoch: Option<u64>,
    /// Placement epoch: increases with every [`Command::SetPlacements`].
    pub epoch: u64,
    /// The job's tasks, in allocation order.
    pub tasks: Vec<TaskId>,
    /// The checkpoint the current epoch resumes from: the latest committed one when the
    /// epoch was set (`None`: from scratch).
    pub restored_from: Option<u64>,
}

/// A task of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id.
    pub id: TaskId,
    /// Owning job.
    pub job: JobId,
    /// Slots it occupies where it is placed (its plan's cost, at least 1).
    pub cost: u32,
    /// Where it is placed, if anywhere.
    pub executor: Option<ExecutorId>,
    /// The lost executor it was unplaced from, until it is placed again.
    pub lost_from: Option<ExecutorId>,
    /// Job epoch of the placement.
    pub epoch: u64,
}

/// The latest complete checkpoint of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Checkpoint id.
    pub checkpoint_id: u64,
    /// Job epoch of the attempt that took it.
    pub epoch: u64,
    /// Per-task state blobs, in task order.
    pub states: Vec<(TaskId, Vec<u8>)>,
    /// When it was committed (proposer time, ms).
    pub at_ms: u64,
}

/// Id counters: the next id of each kind. Never decrease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Next executor id.
    pub next_executor: u64,
    /// Next job id.
    pub next_job: u64,
    /// Next task id.
    pub next_task: u64,
    /// Number of requests applied so far (drives dedup eviction order).
    pub applied_requests: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            next_executor: 1,
            next_job: 1,
            next_task: 1,
            applied_requests: 0,
        }
    }
}

/// The remembered last request of one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    /// Last applied sequence number.
    pub seq: u64,
    /// Its response.
    pub response: CommandResponse,
    /// Value of [`Counters::applied_requests`] when it was applied (eviction order).
    pub applied_at: u64,
}

/// Keys changed by `apply` since the last [`MetaState::take_dirty`]; lets the durable store
/// write only the rows that changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Executors written.
    pub executors: BTreeSet<ExecutorId>,
    /// Jobs written.
    pub jobs: BTreeSet<JobId>,
    /// Tasks written.
    pub tasks: BTreeSet<TaskId>,
    /// Jobs whose checkpoint was written.
    pub checkpoints: BTreeSet<JobId>,
    /// Clients whose dedup entry was written or evicted.
    pub clients: BTreeSet<u64>,
}

/// The whole replicated metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Id counters.
    pub counters: Counters,
    /// Executors by id.
    pub executors: BTreeMap<ExecutorId, ExecutorRecord>,
    /// Jobs by id.
    pub jobs: BTreeMap<JobId, JobRecord>,
    /// Tasks by id.
    pub tasks: BTreeMap<TaskId, TaskRecord>,
    /// Latest complete checkpoint by job.
    pub checkpoints: BTreeMap<JobId, CheckpointRecord>,
    /// Last request per client.
    pub dedup: BTreeMap<u64, DedupEntry>,
    #[serde(skip)]
    dirty: Dirty,
}

impl MetaState {
    /// Applies one request and returns its outcome. Deterministic; never panics.
    ///
    /// A request whose id was already applied returns the stored response without effect.
    pub fn apply(&mut self, request: &MetaRequest) -> CommandResponse {
        let RequestId { client, seq } = request.id;
        if let Some(entry) = self.dedup.get(&client) {
            if seq == entry.seq {
                return entry.response.clone();
            }
            if seq < entry.seq {
                return CommandResponse::Rejected(Rejection::StaleRequest {
                    client,
                    seq,
                    last: entry.seq,
                });
            }
        }
        let response = match self.execute(&request.command) {
            Ok(response) => response,
            Err(rejection) => CommandResponse::Rejected(rejection),
        };
        self.counters.applied_requests += 1;
        self.remember(client, seq, response.clone());
        response
    }

    /// The executor with this id.
    pub fn executor(&self, id: ExecutorId) -> Option<&ExecutorRecord> {
        self.executors.get(&id)
    }

    /// The job with this id.
    pub fn job(&self, id: JobId) -> Option<&JobRecord> {
        self.jobs.get(&id)
    }

    /// The task with this id.
    pub fn task(&self, id: TaskId) -> Option<&TaskRecord> {
        self.tasks.get(&id)
    }

    /// The latest complete checkpoint of a job.
    pub fn checkpoint(&self, job: JobId) -> Option<&CheckpointRecord> {
        self.checkpoints.get(&job)
    }

    /// Returns and clears the set of rows changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    fn remember(&mut self, client: u64, seq: u64, response: CommandResponse) {
        let applied_at = self.counters.applied_requests;
        self.dedup.insert(
            client,
            DedupEntry {
                seq,
                response,
                applied_at,
            },
        );
        self.dirty.clients.insert(client);
        let internal = |c: u64| c & INTERNAL_CLIENT != 0;
        let kind = internal(client);
        while self.dedup.keys().filter(|c| internal(**c) == kind).count() > MAX_DEDUP_CLIENTS {
            // Deterministic: the client of this kind with the oldest last write (ties
            // impossible, since `applied_at` is unique per applied request).
            let oldest = self
                .dedup
                .iter()
                .filter(|(c, _)| internal(**c) == kind)
                .min_by_key(|(_, e)| e.applied_at)
                .map(|(c, _)| *c);
            match oldest {
                Some(c) => {
                    self.dedup.remove(&c);
                    self.dirty.clients.insert(c);
                }
                None => break,
            }
        }
    }

    fn execute(&mut self, command: &Command) -> Result<CommandResponse, Rejection> {
        match command {
            Command::RegisterExecutor {
                addr,
                name,
                slots,
                at_ms,
            } => Ok(self.register_executor(addr, name, *slots, *at_ms)),
            Command::ExecutorLost { id, reason, at_ms } => self.executor_lost(*id, reason, *at_ms),
            Command::SubmitJob {
                job_type,
                spec,
                at_ms,
            } => self.submit_job(job_type, spec, *at_ms),
            Command::SetJobState {
                job,
                from,
                state,
                reason,
                cause,
                at_ms,
            } => self.set_job_state(*job, *from, *state, reason, *cause, *at_ms),
            Command::AllocateTaskIds { job, costs } => self.allocate_tasks(*job, costs),
            Command::SetPlacements {
                job,
                epoch,
                placements,
            } => self.set_placements(*job, *epoch, placements),
            Command::CommitCheckpoint {
                job,
                epoch,
                checkpoint_id,
                states,
                at_ms,
            } => self.commit_checkpoint(*job, *epoch, *checkpoint_id, states, *at_ms),
        }
    }

    fn register_executor(
        &mut self,
        addr: &str,
        name: &str,
        slots: u32,
        at_ms: u64,
    ) -> CommandResponse {
        let previous = self
            .executors
            .values()
            .filter(|e| e.addr == addr)
            .max_by_key(|e| e.incarnation)
            .map(|e| (e.id, e.incarnation, e.state));
        let mut superseded = None;
        if let Some((prev_id, _, ExecutorState::Alive)) = previous {
            self.mark_lost(prev_id, "superseded by a new registration", at_ms);
            superseded = Some(prev_id);
        }
        let incarnation = previous.map_or(1, |(_, inc, _)| inc + 1);
        let id = ExecutorId(self.counters.next_executor);
        self.counters.next_executor += 1;
        self.executors.insert(
            id,
            ExecutorRecord {
                id,
                addr: addr.to_owned(),
                name: name.to_owned(),
                slots,
                incarnation,
                state: ExecutorState::Alive,
                registered_at_ms: at_ms,
                lost: None,
            },
        );
        self.dirty.executors.insert(id);
        self.forget_old_executors();
        CommandResponse::ExecutorRegistered {
            id,
            incarnation,
            superseded,
        }
    }

    /// Keeps at most [`MAX_LOST_EXECUTORS`] lost executor records, dropping the oldest; the
    /// latest record of each address stays (its incarnation numbers the next registration).
    fn forget_old_executors(&mut self) {
        let mut latest: BTreeMap<&str, ExecutorId> = BTreeMap::new();
        for e in self.executors.values() {
            // Ids grow with every registration: the last one seen is the latest.
            latest.insert(&e.addr, e.id);
        }
        let latest: BTreeSet<ExecutorId> = latest.into_values().collect();
        let forgettable: Vec<ExecutorId> = self
            .executors
            .values()
            .filter(|e| e.state == ExecutorState::Lost && !latest.contains(&e.id))
            .map(|e| e.id)
            .collect();
        let lost = self
            .executors
            .values()
            .filter(|e| e.state == ExecutorState::Lost)
            .count();
        let excess = lost.saturating_sub(MAX_LOST_EXECUTORS);
        for id in forgettable.into_iter().take(excess) {
            self.executors.remove(&id);
            self.dirty.executors.insert(id);
        }
    }

    /// Keeps at most [`MAX_ENDED_JOBS`] ended jobs, forgetting those that ended first (by
    /// the time of their last transition, then id) with their tasks and checkpoints.
    fn forget_old_jobs(&mut self) {
        let mut ended: Vec<(u64, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.state.is_terminal())
            .map(|j| (j.history.last().map_or(0, |h| h.at_ms), j.id))
            .collect();
        let excess = ended.len().saturating_sub(MAX_ENDED_JOBS);
        if excess == 0 {
            return;
        }
        ended.sort_unstable();
        for (_, id) in ended.into_iter().take(excess) {
            if let Some(job) = self.jobs.remove(&id) {
                for task in job.tasks {
                    self.tasks.remove(&task);
                    self.dirty.tasks.insert(task);
                }
            }
            self.checkpoints.remove(&id);
            self.dirty.jobs.insert(id);
            self.dirty.checkpoints.insert(id);
        }
    }

    /// Marks an executor lost and unplaces its tasks; returns the unplaced tasks.
    fn mark_lost(&mut self, id: ExecutorId, reason: &str, at_ms: u64) -> Vec<TaskId> {
        let Some(record) = self.executors.get_mut(&id) else {
            return Vec::new();
        };
        if record.state == ExecutorState::Lost {
            return Vec::new();
        }
        record.state = ExecutorState::Lost;
        record.lost = Some((reason.to_owned(), at_ms));
        self.dirty.executors.insert(id);
        let mut unplaced = Vec::new();
        for task in self.tasks.values_mut() {
            if task.executor == Some(id) {
                task.executor = None;
                task.lost_from = Some(id);
                unplaced.push(task.id);
                self.dirty.tasks.insert(task.id);
            }
        }
        unplaced
    }

    fn executor_lost(
        &mut self,
        id: ExecutorId,
        reason: &str,
        at_ms: u64,
    ) -> Result<CommandResponse, Rejection> {
        if !self.executors.contains_key(&id) {
            return Err(Rejection::UnknownExecutor(id));
        }
        let unplaced = self.mark_lost(id, reason, at_ms);
        Ok(CommandResponse::ExecutorLost { unplaced })
    }

    fn submit_job(
        &mut self,
        job_type: &str,
        spec: &str,
        at_ms: u64,
    ) -> Result<CommandResponse, Rejection> {
        check_submission(job_type, spec)?;
        let id = JobId(self.counters.next_job);
        self.counters.next_job += 1;
        self.jobs.insert(
            id,
            JobRecord {
                id,
                job_type: job_type.to_owned(),
                spec: spec.to_owned(),
                state: JobState::Pending,
                history: vec![JobTransition {
                    state: JobState::Pending,
                    reason: "submitted".to_owned(),
                    at_ms,
                    cause: Cause::Step,
                }],
                restarts: 0,
                recent_restarts_ms: Vec::new(),
                restarted_epoch: None,
                epoch: 0,
                tasks: Vec::new(),
                restored_from: None,
            },
        );
        self.dirty.jobs.insert(id);
        self.forget_old_jobs();
        Ok(CommandResponse::JobSubmitted { id })
    }

    fn live_job(&mut self, job: JobId) -> Result<&mut JobRecord, Rejection> {
        let record = self.jobs.get_mut(&job).ok_or(Rejection::UnknownJob(job))?;
        if record.state.is_terminal() {
            return Err(Rejection::JobTerminal {
                job,
                state: record.state,
            });
        }
        Ok(record)
    }

    fn set_job_state(
        &mut self,
        job: JobId,
        from: JobState,
        state: JobState,
        reason: &str,
        cause: Cause,
        at_ms: u64,
    ) -> Result<CommandResponse, Rejection> {
        let record = self.live_job(job)?;
        if record.state != from {
            return Err(Rejection::StateChanged {
                job,
                expected: from,
                current: record.state,
            });
        }
        if let Cause::Restart { epoch } = cause {
            if epoch != record.epoch {
                return Err(Rejection::StaleEpoch {
                    job,
                    got: epoch,
                    current: record.epoch,
                });
            }
            // Recovering -> Recovering passes the state check: a restart planned twice
            // (the first write's outcome unknown) must not count twice.
            if record.restarted_epoch == Some(epoch) {
                return Err(Rejection::AlreadyRestarted { job, epoch });
            }
            record.restarts = record.restarts.saturating_add(1);
            record.restarted_epoch = Some(epoch);
            record.recent_restarts_ms.push(at_ms);
            if record.recent_restarts_ms.len() > MAX_RECENT_RESTARTS {
                let excess = record.recent_restarts_ms.len() - MAX_RECENT_RESTARTS;
                record.recent_restarts_ms.drain(..excess);
            }
        }
        record.state = state;
        record.history.push(JobTransition {
            state,
            reason: reason.to_owned(),
            at_ms,
            cause,
        });
        if record.history.len() > MAX_JOB_HISTORY {
            let excess = record.history.len() - MAX_JOB_HISTORY;
            record.history.drain(..excess);
        }
        self.dirty.jobs.insert(job);
        Ok(CommandResponse::JobStateSet)
    }

    fn allocate_tasks(&mut self, job: JobId, costs: &[u32]) -> Result<CommandResponse, Rejection> {
        let count = check_task_costs(costs).map_err(Rejection::InvalidArgument)?;
        let first = self.counters.next_task;
        let record = self.live_job(job)?;
        if !record.tasks.is_empty() {
            return Err(Rejection::TasksAllocated {
                job,
                count: record.tasks.len(),
            });
        }
        let ids: Vec<TaskId> = (first..first + u64::from(count)).map(TaskId).collect();
        record.tasks.extend(ids.iter().copied());
        self.counters.next_task += u64::from(count);
        for (id, &cost) in ids.into_iter().zip(costs) {
            self.tasks.insert(
                id,
                TaskRecord {
                    id,
                    job,
                    cost,
                    executor: None,
                    lost_from: None,
                    epoch: 0,
                },
            );
            self.dirty.tasks.insert(id);
        }
        self.dirty.jobs.insert(job);
        Ok(CommandResponse::TaskIdsAllocated {
            first: TaskId(first),
            count,
        })
    }

    fn check_epoch(&mut self, job: JobId, epoch: u64) -> Result<(), Rejection> {
        let current = self.live_job(job)?.epoch;
        if epoch != current {
            return Err(Rejection::StaleEpoch {
                job,
                got: epoch,
                current,
            });
        }
        Ok(())
    }

    fn check_task(&self, job: JobId, task: TaskId) -> Result<(), Rejection> {
        match self.tasks.get(&task) {
            Some(t) if t.job == job => Ok(()),
            _ => Err(Rejection::UnknownTask { job, task }),
        }
    }

    fn set_placements(
        &mut self,
        job: JobId,
        epoch: u64,
        placements: &[(TaskId, ExecutorId)],
    ) -> Result<CommandResponse, Rejection> {
        self.check_epoch(job, epoch)?;
        for &(task, executor) in placements {
            self.check_task(job, task)?;
            match self.executors.get(&executor) {
                None => return Err(Rejection::UnknownExecutor(executor)),
                Some(e) if e.state != ExecutorState::Alive => {
                    return Err(Rejection::ExecutorNotAlive(executor));
                }
                Some(_) => {}
            }
        }
        let new_epoch = epoch + 1;
        let restored_from = self.checkpoints.get(&job).map(|c| c.checkpoint_id);
        if let Some(record) = self.jobs.get_mut(&job) {
            record.epoch = new_epoch;
            record.restored_from = restored_from;
        }
        self.dirty.jobs.insert(job);
        for &(task, executor) in placements {
            if let Some(t) = self.tasks.get_mut(&task) {
                t.executor = Some(executor);
                t.lost_from = None;
                t.epoch = new_epoch;
                self.dirty.tasks.insert(task);
            }
        }
        Ok(CommandResponse::PlacementsSet { epoch: new_epoch })
    }

    fn commit_checkpoint(
        &mut self,
        job: JobId,
        epoch: u64,
        checkpoint_id: u64,
        states: &[(TaskId, Vec<u8>)],
        at_ms: u64,
    ) -> Result<CommandResponse, Rejection> {
        self.check_epoch(job, epoch)?;
        if let Some(latest) = self.checkpoints.get(&job)
            && checkpoint_id <= latest.checkpoint_id
        {
            return Err(Rejection::StaleCheckpoint {
                job,
                got: checkpoint_id,
                latest: latest.checkpoint_id,
            });
        }
        let bytes: usize = states.iter().map(|(_, s)| s.len()).sum();
        if bytes > MAX_CHECKPOINT_BYTES {
            return Err(Rejection::InvalidArgument(format!(
                "checkpoint {checkpoint_id} of {job} holds {bytes} bytes of task state; at most {MAX_CHECKPOINT_BYTES}"
            )));
        }
        let mut seen = BTreeSet::new();
        for (task, _) in states {
            self.check_task(job, *task)?;
            if !seen.insert(*task) {
                return Err(Rejection::IncompleteCheckpoint {
                    job,
                    reason: format!("{task} appears twice"),
                });
            }
        }
        let expected = self.jobs.get(&job).map_or(0, |j| j.tasks.len());
        if seen.len() != expected {
            return Err(Rejection::IncompleteCheckpoint {
                job,
                reason: format!("{} of {expected} tasks have state", seen.len()),
            });
        }
        let mut states = states.to_vec();
        states.sort_by_key(|(t, _)| *t);
        self.checkpoints.insert(
            job,
            CheckpointRecord {
                checkpoint_id,
                epoch,
                states,
                at_ms,
            },
        );
        self.dirty.checkpoints.insert(job);
        Ok(CommandResponse::CheckpointCommitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(client: u64, seq: u64, command: Command) -> MetaRequest {
        MetaRequest {
            id: RequestId { client, seq },
            command,
        }
    }

    struct Proposer {
        client: u64,
        seq: u64,
    }

    impl Proposer {
        fn new(client: u64) -> Self {
            Self { client, seq: 0 }
        }
        fn run(&mut self, state: &mut MetaState, command: Command) -> CommandResponse {
            self.seq += 1;
            state.apply(&req(self.client, self.seq, command))
        }
    }

    fn register(addr: &str) -> Command {
        Command::RegisterExecutor {
            addr: addr.to_owned(),
            name: "n".to_owned(),
            slots: 4,
            at_ms: 10,
        }
    }

    fn submit() -> Command {
        Command::SubmitJob {
            job_type: "pipeline".to_owned(),
            spec: "[job]\n".to_owned(),
            at_ms: 20,
        }
    }

    fn executor_id(r: CommandResponse) -> ExecutorId {
        match r {
            CommandResponse::ExecutorRegistered { id, .. } => id,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn job_id(r: CommandResponse) -> JobId {
        match r {
            CommandResponse::JobSubmitted { id } => id,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Ended jobs beyond the retention are forgotten, oldest first, with their tasks and
    /// checkpoints; live jobs are kept however old.
    #[test]
    fn the_oldest_ended_jobs_are_forgotten_beyond_the_retention() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let live = match p.run(&mut s, submit()) {
            CommandResponse::JobSubmitted { id } => id,
            other => panic!("{other:?}"),
        };
        p.run(
            &mut s,
            Command::AllocateTaskIds {
                job: live,
                costs: vec![1; 2],
            },
        );
        let mut ended = Vec::new();
        for _ in 0..MAX_ENDED_JOBS + 3 {
            let CommandResponse::JobSubmitted { id } = p.run(&mut s, submit()) else {
                panic!("submitted")
            };
            p.run(
                &mut s,
                Command::AllocateTaskIds {
                    job: id,
                    costs: vec![1; 1],
                },
            );
            p.run(
                &mut s,
                Command::SetJobState {
                    job: id,
                    from: JobState::Pending,
                    state: JobState::Cancelled,
                    reason: "user".into(),
                    cause: Cause::Step,
                    at_ms: 30,
                },
            );
            ended.push(id);
        }
        s.take_dirty();
        // Each submission trims: the last one finds one ended job too many.
        p.run(&mut s, submit());
        let dirty = s.take_dirty();
        let ended_now = s.jobs.values().filter(|j| j.state.is_terminal()).count();
        assert_eq!(ended_now, MAX_ENDED_JOBS);
        for gone in &ended[..3] {
            assert!(!s.jobs.contains_key(gone));
        }
        assert!(dirty.jobs.contains(&ended[2]), "its row must be deleted");
        assert!(s.jobs.contains_key(&ended[3]));
        assert!(s.jobs.contains_key(&live), "a live job stays");
        assert_eq!(
            s.tasks.len(),
            2 + MAX_ENDED_JOBS,
            "the forgotten jobs' tasks went too"
        );
        // The oldest job ends last: it is the newest ended one, and stays.
        p.run(
            &mut s,
            Command::SetJobState {
                job: live,
                from: JobState::Pending,
                state: JobState::Cancelled,
                reason: "user".into(),
                cause: Cause::Step,
                at_ms: 50,
            },
        );
        p.run(&mut s, submit());
        assert!(
            s.jobs.contains_key(&live),
            "the job that ended last was forgotten"
        );
        assert!(!s.jobs.contains_key(&ended[3]));
    }

    /// Lost executor records beyond the retention are forgotten, oldest first, but never an
    /// address's latest record: its incarnation count goes on.
    #[test]
    fn the_oldest_lost_executors_are_forgotten_but_incarnations_go_on() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        // One address re-registering over and over: every earlier record is lost.
        let mut last = 0;
        for _ in 0..MAX_LOST_EXECUTORS + 5 {
            if let CommandResponse::ExecutorRegistered { incarnation, .. } =
                p.run(&mut s, register("10.0.0.1:7000"))
            {
                last = incarnation;
            }
        }
        let lost = s
            .executors
            .values()
            .filter(|e| e.state == ExecutorState::Lost)
            .count();
        assert_eq!(lost, MAX_LOST_EXECUTORS);
        assert_eq!(last, MAX_LOST_EXECUTORS as u64 + 5);
        // Another address's only record, lost, is its latest: it is kept.
        let other = executor_id(p.run(&mut s, register("10.0.0.2:7000")));
        p.run(
            &mut s,
            Command::ExecutorLost {
                id: other,
                reason: "ttl".into(),
                at_ms: 40,
            },
        );
        for _ in 0..3 {
            p.run(&mut s, register("10.0.0.1:7000"));
        }
        assert!(s.executors.contains_key(&other));
        let CommandResponse::ExecutorRegistered { incarnation, .. } =
            p.run(&mut s, register("10.0.0.1:7000"))
        else {
            panic!("registered")
        };
        assert_eq!(incarnation, MAX_LOST_EXECUTORS as u64 + 9);
    }

    #[test]
    fn task_allocation_keeps_each_tasks_cost_and_refuses_a_cost_of_zero() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let job = job_id(p.run(&mut s, submit()));
        for costs in [vec![], vec![2, 0, 1]] {
            let r = p.run(&mut s, Command::AllocateTaskIds { job, costs });
            assert!(
                matches!(r, CommandResponse::Rejected(Rejection::InvalidArgument(_))),
                "{r:?}"
            );
        }
        assert!(s.job(job).unwrap().tasks.is_empty());
        p.run(
            &mut s,
            Command::AllocateTaskIds {
                job,
                costs: vec![2, 1, 3],
            },
        );
        let costs: Vec<u32> = s
            .job(job)
            .unwrap()
            .tasks
            .iter()
            .map(|t| s.task(*t).unwrap().cost)
            .collect();
        assert_eq!(costs, [2, 1, 3]);
    }

    #[test]
    fn ids_are_monotonic_and_never_reused() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let e1 = executor_id(p.run(&mut s, register("a:1")));
        let e2 = executor_id(p.run(&mut s, register("b:1")));
        assert!(e2 > e1);
        let j1 = job_id(p.run(&mut s, submit()));
        let j2 = job_id(p.run(&mut s, submit()));
        assert!(j2 > j1);
        let r1 = p.run(
            &mut s,
            Command::AllocateTaskIds {
                job: j1,
                costs: vec![1; 3],
            },
        );
        let r2 = p.run(
            &mut s,
            Command::AllocateTaskIds {
                job: j2,
                costs: vec![1; 2],
            },
        );
        assert_eq!(
            r1,
            CommandResponse::TaskIdsAllocated {
                first: TaskId(1),
                count: 3
            }
        );
        assert_eq!(
            r2,
            CommandResponse::TaskIdsAllocated {
                first: TaskId(4),
                count: 2
            }
        );
        assert_eq!(
            s.job(j1).map(|j| j.tasks.clone()),
            Some(vec![TaskId(1), TaskId(2), TaskId(3)])
        );
        // A serde round trip (what a snapshot does) keeps the counters.
        let bytes = postcard::to_allocvec(&s).unwrap();
        let mut restored: MetaState = postcard::from_bytes(&bytes).unwrap();
        let j3 = job_id(p.run(&mut restored, submit()));
        assert!(j3 > j2);
    }

    #[test]
    fn retried_request_is_applied_once_and_returns_original_response() {
        let mut s = MetaState::default();
        let r = req(7, 1, submit());
        let first = s.apply(&r);
        let again = s.apply(&r);
        assert_eq!(first, again);
        assert_eq!(s.jobs.len(), 1);
        // A new seq is a new write.
        let second = s.apply(&req(7, 2, submit()));
        assert_ne!(first, second);
        assert_eq!(s.jobs.len(), 2);
        // An older seq is refused, not re-applied.
        assert_eq!(
            s.apply(&r),
            CommandResponse::Rejected(Rejection::StaleRequest {
                client: 7,
                seq: 1,
                last: 2
            })
        );
        assert_eq!(s.jobs.len(), 2);
    }

    #[test]
    fn dedup_table_is_bounded_and_evicts_least_recent_client() {
        let mut s = MetaState::default();
        for client in 0..(MAX_DEDUP_CLIENTS as u64 + 10) {
            s.apply(&req(client, 1, submit()));
        }
        assert_eq!(s.dedup.len(), MAX_DEDUP_CLIENTS);
        assert!(!s.dedup.contains_key(&0));
        assert!(s.dedup.contains_key(&(MAX_DEDUP_CLIENTS as u64 + 9)));
        let dirty = s.take_dirty();
        assert!(dirty.clients.contains(&0), "evicted client must be written");
    }

    /// The masters' own writes fill a budget of their own: users' entries stay however many
    /// of them come.
    #[test]
    fn the_masters_own_writes_never_evict_a_users_request() {
        let mut s = MetaState::default();
        let user = external_client(u64::MAX);
        assert_eq!(user & INTERNAL_CLIENT, 0);
        s.apply(&req(user, 7, submit()));
        for n in 0..(2 * MAX_DEDUP_CLIENTS as u64) {
            s.apply(&req(INTERNAL_CLIENT | n, 1, submit()));
        }
        assert!(
            s.dedup.contains_key(&user),
            "the user's retry is still recognised"
        );
        assert_eq!(s.dedup.len(), MAX_DEDUP_CLIENTS + 1);
        let jobs = s.jobs.len();
        s.apply(&req(user, 7, submit()));
        assert_eq!(s.jobs.len(), jobs, "the retry submitted nothing");
    }

    #[test]
    fn job_state_transitions_are_recorded_with_reason_and_time() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let j = job_id(p.run(&mut s, submit()));
        let r = p.run(
            &mut s,
            Command::SetJobState {
                job: j,
                from: JobState::Pending,
                state: JobState::Running,
                reason: "all placed".to_owned(),
                cause: Cause::Step,
                at_ms: 99,
            },
        );
        assert_eq!(r, CommandResponse::JobStateSet);
        let job = s.job(j).unwrap();
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.history.len(), 2);
        assert_eq!(job.history[0].state, JobState::Pending);
        assert_eq!(
            job.history[1],
            JobTransition {
                state: JobState::Running,
                reason: "all placed".to_owned(),
                cause: Cause::Step,
                at_ms: 99
            }
        );
        p.run(
            &mut s,
            Command::SetJobState {
                job: j,
                from: JobState::Running,
                state: JobState::Cancelled,
                reason: "user".to_owned(),
                cause: Cause::Step,
                at_ms: 100,
            },
        );
        let r = p.run(
            &mut s,
            Command::SetJobState {
                job: j,
                from: JobState::Cancelled,
                state: JobState::Running,
                reason: "again".to_owned(),
                cause: Cause::Step,
                at_ms: 101,
            },
        );
        assert_eq!(
            r,
            CommandResponse::Rejected(Rejection::JobTerminal {
                job: j,
                state: JobState::Cancelled
            })
        );
        assert_eq!(s.job(j).unwrap().history.len(), 3);
    }

    #[test]
    fn a_state_change_planned_against_an_older_state_is_refused() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let j = job_id(p.run(&mut s, submit()));
        let set = |from, state, reason: &str| Command::SetJobState {
            job: j,
            from,
            state,
            reason: reason.to_owned(),
            cause: Cause::Step,
            at_ms: 7,
        };
        assert_eq!(
            p.run(&mut s, set(JobState::Pending, JobState::Running, "placed")),
            CommandResponse::JobStateSet
        );
        // A user cancels; a step planned before the cancel (the job still Running) then tries
        // to restart the job. It must not undo the cancel.
        assert_eq!(
            p.run(&mut s, set(JobState::Running, JobState::Cancelling, "user")),
            CommandResponse::JobStateSet
        );
        let before = s.job(j).unwrap().clone();
        assert_eq!(
            p.run(
                &mut s,
                set(JobState::Running, JobState::Recovering, "executor lost")
            ),
            CommandResponse::Rejected(Rejection::StateChanged {
                job: j,
                expected: JobState::Running,
                current: JobState::Cancelling,
            })
        );
        assert_eq!(
            s.job(j).unwrap(),
            &before,
            "a refused change changes nothing"
        );
    }

    #[test]
    fn oversized_specs_and_checkpoints_are_refused_without_change() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let before = s.clone();
        let huge = Command::SubmitJob {
            job_type: "pipeline".to_owned(),
            spec: "#".repeat(MAX_SPEC_BYTES + 1),
            at_ms: 1,
        };
        match p.run(&mut s, huge) {
            CommandResponse::Rejected(Rejection::InvalidArgument(m)) => {
                assert!(m.contains("job spec is 65537 bytes"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let long_type = Command::SubmitJob {
            job_type: "t".repeat(MAX_JOB_TYPE_BYTES + 1),
            spec: String::new(),
            at_ms: 1,
        };
        assert!(matches!(
            p.run(&mut s, long_type),
            CommandResponse::Rejected(Rejection::InvalidArgument(_))
        ));
        assert_eq!(s.jobs, before.jobs);
        assert_eq!(s.counters.next_job, before.counters.next_job);

        // A job of two tasks whose checkpoint state is one byte over the limit.
        let e = executor_id(p.run(&mut s, register("a:1")));
        let j = job_id(p.run(&mut s, submit()));
        let first = match p.run(
            &mut s,
            Command::AllocateTaskIds {
                job: j,
                costs: vec![1; 2],
            },
        ) {
            CommandResponse::TaskIdsAllocated { first, .. } => first,
            other => panic!("{other:?}"),
        };
        let tasks = [first, TaskId(first.0 + 1)];
        let placed = p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 0,
                placements: tasks.iter().map(|t| (*t, e)).collect(),
            },
        );
        assert_eq!(placed, CommandResponse::PlacementsSet { epoch: 1 });
        let half = MAX_CHECKPOINT_BYTES / 2;
        let commit = |extra: usize| Command::CommitCheckpoint {
            job: j,
            epoch: 1,
            checkpoint_id: 5,
            states: vec![(tasks[0], vec![0; half]), (tasks[1], vec![0; half + extra])],
            at_ms: 2,
        };
        assert!(matches!(
            p.run(&mut s, commit(1)),
            CommandResponse::Rejected(Rejection::InvalidArgument(_))
        ));
        assert!(s.checkpoint(j).is_none());
        assert_eq!(
            p.run(&mut s, commit(0)),
            CommandResponse::CheckpointCommitted
        );
    }

    #[test]
    fn unknown_ids_are_rejected_without_change() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let before = s.clone();
        assert_eq!(
            p.run(
                &mut s,
                Command::ExecutorLost {
                    id: ExecutorId(5),
                    reason: "x".into(),
                    at_ms: 1
                }
            ),
            CommandResponse::Rejected(Rejection::UnknownExecutor(ExecutorId(5)))
        );
        assert_eq!(
            p.run(
                &mut s,
                Command::AllocateTaskIds {
                    job: JobId(3),
                    costs: vec![1; 1]
                }
            ),
            CommandResponse::Rejected(Rejection::UnknownJob(JobId(3)))
        );
        assert_eq!(s.jobs, before.jobs);
        assert_eq!(s.executors, before.executors);
        assert_eq!(s.counters.next_task, before.counters.next_task);
        let j = job_id(p.run(&mut s, submit()));
        let e = executor_id(p.run(&mut s, register("a:1")));
        let r = p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 0,
                placements: vec![(TaskId(42), e)],
            },
        );
        assert_eq!(
            r,
            CommandResponse::Rejected(Rejection::UnknownTask {
                job: j,
                task: TaskId(42)
            })
        );
        assert_eq!(s.job(j).unwrap().epoch, 0);
        assert!(matches!(
            p.run(
                &mut s,
                Command::AllocateTaskIds {
                    job: j,
                    costs: vec![1; 0]
                }
            ),
            CommandResponse::Rejected(Rejection::InvalidArgument(_))
        ));
    }

    #[test]
    fn placements_fence_older_epochs_and_executor_loss_unplaces_tasks() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let j = job_id(p.run(&mut s, submit()));
        let e = executor_id(p.run(&mut s, register("a:1")));
        p.run(
            &mut s,
            Command::AllocateTaskIds {
                job: j,
                costs: vec![1; 2],
            },
        );
        let placements = vec![(TaskId(1), e), (TaskId(2), e)];
        let r = p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 0,
                placements: placements.clone(),
            },
        );
        assert_eq!(r, CommandResponse::PlacementsSet { epoch: 1 });
        assert_eq!(s.task(TaskId(1)).unwrap().executor, Some(e));
        // Planned against the old epoch: refused.
        let r = p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 0,
                placements,
            },
        );
        assert_eq!(
            r,
            CommandResponse::Rejected(Rejection::StaleEpoch {
                job: j,
                got: 0,
                current: 1
            })
        );
        let r = p.run(
            &mut s,
            Command::ExecutorLost {
                id: e,
                reason: "missed heartbeats".into(),
                at_ms: 5,
            },
        );
        assert_eq!(
            r,
            CommandResponse::ExecutorLost {
                unplaced: vec![TaskId(1), TaskId(2)]
            }
        );
        assert_eq!(s.executor(e).unwrap().state, ExecutorState::Lost);
        assert_eq!(s.task(TaskId(1)).unwrap().executor, None);
        // Lost executors cannot receive tasks.
        let r = p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 1,
                placements: vec![(TaskId(1), e)],
            },
        );
        assert_eq!(r, CommandResponse::Rejected(Rejection::ExecutorNotAlive(e)));
    }

    #[test]
    fn reregistration_bumps_incarnation_and_supersedes_old_id() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let first = p.run(&mut s, register("a:1"));
        let CommandResponse::ExecutorRegistered {
            id: e1,
            incarnation: 1,
            superseded: None,
        } = first
        else {
            panic!("unexpected {first:?}");
        };
        let second = p.run(&mut s, register("a:1"));
        assert_eq!(
            second,
            CommandResponse::ExecutorRegistered {
                id: ExecutorId(e1.0 + 1),
                incarnation: 2,
                superseded: Some(e1)
            }
        );
        assert_eq!(s.executor(e1).unwrap().state, ExecutorState::Lost);
    }

    #[test]
    fn checkpoints_must_be_complete_newer_and_of_current_epoch() {
        let mut s = MetaState::default();
        let mut p = Proposer::new(1);
        let j = job_id(p.run(&mut s, submit()));
        let e = executor_id(p.run(&mut s, register("a:1")));
        p.run(
            &mut s,
            Command::AllocateTaskIds {
                job: j,
                costs: vec![1; 2],
            },
        );
        p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 0,
                placements: vec![(TaskId(1), e), (TaskId(2), e)],
            },
        );
        let cp = |id: u64, epoch: u64, states: Vec<(TaskId, Vec<u8>)>| Command::CommitCheckpoint {
            job: j,
            epoch,
            checkpoint_id: id,
            states,
            at_ms: 7,
        };
        assert!(matches!(
            p.run(&mut s, cp(1, 1, vec![(TaskId(1), vec![1])])),
            CommandResponse::Rejected(Rejection::IncompleteCheckpoint { .. })
        ));
        assert!(matches!(
            p.run(
                &mut s,
                cp(1, 0, vec![(TaskId(1), vec![1]), (TaskId(2), vec![2])])
            ),
            CommandResponse::Rejected(Rejection::StaleEpoch { .. })
        ));
        assert_eq!(
            p.run(
                &mut s,
                cp(1, 1, vec![(TaskId(2), vec![2]), (TaskId(1), vec![1])])
            ),
            CommandResponse::CheckpointCommitted
        );
        let stored = s.checkpoint(j).unwrap();
        assert_eq!(
            stored.states,
            vec![(TaskId(1), vec![1]), (TaskId(2), vec![2])]
        );
        assert!(matches!(
            p.run(
                &mut s,
                cp(1, 1, vec![(TaskId(1), vec![3]), (TaskId(2), vec![4])])
            ),
            CommandResponse::Rejected(Rejection::StaleCheckpoint { latest: 1, .. })
        ));
        assert_eq!(
            p.run(
                &mut s,
                cp(2, 1, vec![(TaskId(1), vec![3]), (TaskId(2), vec![4])])
            ),
            CommandResponse::CheckpointCommitted
        );
        assert_eq!(s.checkpoint(j).unwrap().checkpoint_id, 2);
        assert_eq!(
            s.jobs[&j].restored_from, None,
            "epoch 1 started from scratch"
        );
        // The next epoch records the checkpoint it resumes from; the old epoch's late
        // checkpoint is refused.
        p.run(
            &mut s,
            Command::SetPlacements {
                job: j,
                epoch: 1,
                placements: vec![(TaskId(1), e), (TaskId(2), e)],
            },
        );
        assert_eq!(s.jobs[&j].restored_from, Some(2));
        assert!(matches!(
            p.run(
                &mut s,
                cp(3, 1, vec![(TaskId(1), vec![5]), (TaskId(2), vec![6])])
            ),
            CommandResponse::Rejected(Rejection::StaleEpoch { .. })
        ));
    }

    #[test]
    fn same_log_gives_same_state() {
        let log: Vec<MetaRequest> = vec![
            req(1, 1, register("a:1")),
            req(2, 1, submit()),
            req(
                1,
                2,
                Command::AllocateTaskIds {
                    job: JobId(1),
                    costs: vec![1; 4],
                },
            ),
            req(2, 1, submit()),
            req(
                1,
                3,
                Command::SetPlacements {
                    job: JobId(1),
                    epoch: 0,
                    placements: vec![(TaskId(1), ExecutorId(1))],
                },
            ),
        ];
        let mut a = MetaState::default();
        let mut b = MetaState::default();
        let ra: Vec<_> = log.iter().map(|r| a.apply(r)).collect();
        let rb: Vec<_> = log.iter().map(|r| b.apply(r)).collect();
        assert_eq!(ra, rb);
        assert_eq!(a, b);
        assert_eq!(a.jobs.len(), 1);
    }
}
