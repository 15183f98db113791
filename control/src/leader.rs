//! The leader's decisions, as a pure function of the replicated state and what executors
//! report.
//!
//! Every tick the leader calls [`next_commands`] with the applied [`MetaState`], the latest
//! task reports of each executor, and the executors whose heartbeats expired. It returns the
//! metadata commands that move each job one step along its lifecycle (allocate tasks, place
//! them, mark them running, recover, finish, cancel); the async shell proposes them through
//! raft and calls again on the next tick. Each step is idempotent against the state it reads,
//! so a leader change in the middle loses nothing: the new leader simply continues.
//!
//! Recovery restarts the whole job attempt: when a task's executor is lost or a task fails,
//! every task of the job is placed again under a new epoch (tasks on surviving executors
//! included), so an attempt is always one consistent set of tasks, and data from an older
//! epoch is refused everywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use microcosm_engine::JobGraph;

use crate::job::{self, Cause, JobEvent, JobState};
use crate::meta::state::JobRecord;
use crate::meta::state::check_task_costs;
use crate::meta::{Command, ExecutorId, ExecutorState, JobId, MetaState, TaskId};
use crate::proto::{Assignment, RestoreState, TaskLocation, TaskReport, TaskRunState};
use crate::scheduler::{self, ExecutorOffer, GroupId, TaskDemand};

/// How many restarts after task failures a job may have had within [`RESTART_WINDOW_MS`]; a
/// failure beyond that fails the job. A job that fails at once again and again ends soon, and
/// a long-running one outlives an occasional lost executor (like Flink's failure-rate restart
/// strategy).
pub const MAX_RESTARTS: u32 = 5;

/// The time window of the restart budget ([`MAX_RESTARTS`]): 10 minutes.
pub const RESTART_WINDOW_MS: u64 = 10 * 60 * 1000;

const _: () = assert!(MAX_RESTARTS as usize <= crate::meta::state::MAX_RECENT_RESTARTS);

/// How many of `job`'s restarts were decided within [`RESTART_WINDOW_MS`] before `now_ms`.
pub fn restarts_in_window(job: &JobRecord, now_ms: u64) -> usize {
    job.recent_restarts_ms
        .iter()
        .filter(|&&at| now_ms.saturating_sub(at) < RESTART_WINDOW_MS)
        .count()
}

/// Turns job specs into task graphs.
pub trait JobCatalog: Send + Sync + 'static {
    /// Checks a spec; `Err` names the problem (field, value).
    fn validate(&self, job_type: &str, spec: &str) -> Result<(), String>;
    /// Builds the task graph of a (valid) spec. Must be deterministic.
    fn plan(&self, job_type: &str, spec: &str) -> Result<JobGraph, String>;
}

/// What the leader knows from heartbeats: each live executor's latest report.
pub type Reports = HashMap<u64, ExecutorReport>;

/// An executor's latest heartbeat, as the leader keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorReport {
    /// Its tasks' states.
    pub tasks: Vec<TaskReport>,
    /// Digest of the assignments it ran when it sent them (`None`: none received yet).
    pub running: Option<u64>,
    /// Digest of the assignments the reply to that heartbeat gave it.
    pub given: u64,
}

impl ExecutorReport {
    /// Whether the executor ran, when it reported, the assignments `state` gives it now, and
    /// had been told nothing else since: its tasks then say what it runs of them. Its report
    /// alone is not enough: it may have been sent just before the reply that handed it a
    /// job, whose tasks it started after.
    pub fn runs_current(&self, state: &MetaState, executor: u64) -> bool {
        self.running == Some(self.given)
            && self.given == assignments_digest(&assignments(state, executor))
    }
}

/// Computes the next metadata commands. `expired` are executors whose heartbeats stopped.
pub fn next_commands(
    state: &MetaState,
    reports: &Reports,
    expired: &[u64],
    catalog: &dyn JobCatalog,
    now_ms: u64,
) -> Vec<Command> {
    let mut out = Vec::new();
    for &id in expired {
        if state
            .executor(ExecutorId(id))
            .is_some_and(|e| e.state == ExecutorState::Alive)
        {
            out.push(Command::ExecutorLost {
                id: ExecutorId(id),
                reason: "heartbeats stopped for longer than the TTL".into(),
                at_ms: now_ms,
            });
        }
    }
    if !out.is_empty() {
        // Let the losses apply first: placements computed now would use the lost executors.
        return out;
    }
    // At most one placement per tick: placements computed from the same state would not see
    // each other's reservations.
    let mut may_place = true;
    for job in state.jobs.values().filter(|j| !j.state.is_terminal()) {
        if let Some(cmd) = step_job(state, job, reports, catalog, now_ms, may_place) {
            if matches!(cmd, Command::SetPlacements { .. }) {
                may_place = false;
            }
            out.push(cmd);
        }
    }
    out
}

fn transition(job: &JobRecord, event: JobEvent, now_ms: u64) -> Option<Command> {
    match job::next(job.state, &event) {
        Ok(t) => {
            let same = job.state == t.to
                && job
                    .history
                    .last()
                    .is_some_and(|h| h.reason == t.reason && h.cause == t.cause);
            (!same).then_some(Command::SetJobState {
                job: job.id,
                from: job.state,
                state: t.to,
                reason: t.reason,
                cause: t.cause,
                at_ms: now_ms,
            })
        }
        Err(e) => {
            tracing::debug!(job = job.id.0, error = %e, "transition not taken");
            None
        }
    }
}

/// The state of each task of `job` at its current epoch, as reported by the executor it is
/// placed on.
fn task_states(
    state: &MetaState,
    job: &JobRecord,
    reports: &Reports,
) -> Vec<Option<(TaskRunState, String)>> {
    let mut by_index: HashMap<u32, (TaskRunState, String)> = HashMap::new();
    for (index, task) in job.tasks.iter().enumerate() {
        let Some(rec) = state.task(*task) else {
            continue;
        };
        let Some(exec) = rec.executor else { continue };
        let Some(report) = reports.get(&exec.0) else {
            continue;
        };
        if let Some(r) = report
            .tasks
            .iter()
            .find(|r| r.job == job.id.0 && r.epoch == job.epoch && r.index as usize == index)
        {
            by_index.insert(index as u32, (r.state, r.message.clone()));
        }
    }
    (0..job.tasks.len() as u32)
        .map(|i| by_index.remove(&i))
        .collect()
}

fn all_placed_on_alive(state: &MetaState, job: &JobRecord) -> bool {
    !job.tasks.is_empty()
        && job.tasks.iter().all(|t| {
            state
                .task(*t)
                .and_then(|r| r.executor)
                .and_then(|e| state.executor(e))
                .is_some_and(|e| e.state == ExecutorState::Alive)
        })
}

/// Whether a restart is recorded for the job's current epoch, so the next step is to place
/// the job again under a new epoch (also after a placement that found no capacity: the
/// failed attempt must not run on, and the failure must not count twice).
fn restart_recorded_for(job: &JobRecord) -> bool {
    job.state == JobState::Recovering && job.restarted_epoch == Some(job.epoch)
}

fn step_job(
    state: &MetaState,
    job: &JobRecord,
    reports: &Reports,
    catalog: &dyn JobCatalog,
    now_ms: u64,
    may_place: bool,
) -> Option<Command> {
    // Planning parses the job's spec: done only for the steps that need the graph (the task
    // count, a placement), not on every tick of a running job.
    let plan = || {
        catalog.plan(&job.job_type, &job.spec).map_err(|e| {
            transition(
                job,
                JobEvent::Fatal {
                    reason: format!("cannot plan: {e}"),
                },
                now_ms,
            )
        })
    };
    if job.tasks.is_empty() {
        if job.state == JobState::Cancelling {
            return transition(job, JobEvent::AllTasksStopped, now_ms);
        }
        if job.state == JobState::Paused {
            return None;
        }
        return match plan() {
            Ok(graph) => {
                let costs: Vec<u32> = graph.tasks.iter().map(|t| t.cost).collect();
                match check_task_costs(&costs) {
                    Ok(_) => Some(Command::AllocateTaskIds { job: job.id, costs }),
                    // The metadata would refuse the allocation on every tick: fail the job.
                    Err(why) => transition(
                        job,
                        JobEvent::Fatal {
                            reason: format!("cannot plan: {why}"),
                        },
                        now_ms,
                    ),
                }
            }
            Err(fatal) => fatal,
        };
    }
    let states = task_states(state, job, reports);
    let placed = all_placed_on_alive(state, job);
    let failed = states
        .iter()
        .flatten()
        .find(|(s, _)| *s == TaskRunState::Failed)
        .map(|(_, m)| m.clone());
    match job.state {
        JobState::Pending | JobState::Recovering | JobState::Scheduling => {
            let restart_pending = restart_recorded_for(job);
            let needs_placement = !placed || job.epoch == 0 || restart_pending;
            if needs_placement {
                if !may_place {
                    return None;
                }
                let graph = match plan() {
                    Ok(graph) => graph,
                    Err(fatal) => return fatal,
                };
                if graph.tasks.len() != job.tasks.len() {
                    // The task ids were allocated from another plan of the same spec (a master
                    // of another version, say): no placement can ever fit it.
                    return transition(
                        job,
                        JobEvent::Fatal {
                            reason: format!(
                                "cannot plan: the job has {} tasks but its plan now has {}",
                                job.tasks.len(),
                                graph.tasks.len()
                            ),
                        },
                        now_ms,
                    );
                }
                return match place(state, job, &graph) {
                    Ok(placements) => Some(Command::SetPlacements {
                        job: job.id,
                        epoch: job.epoch,
                        placements,
                    }),
                    Err(reason) => transition(job, JobEvent::NoCapacity { reason }, now_ms),
                };
            }
            if job.state == JobState::Pending {
                return transition(job, JobEvent::Scheduled, now_ms);
            }
            if let Some(msg) = failed {
                return on_failure(job, msg, now_ms);
            }
            let all_up = states.iter().all(|s| {
                matches!(
                    s,
                    Some((
                        TaskRunState::Running | TaskRunState::Finished | TaskRunState::Paused,
                        _
                    ))
                )
            });
            all_up
                .then(|| transition(job, JobEvent::AllTasksRunning, now_ms))
                .flatten()
        }
        JobState::Running | JobState::Paused => {
            if !placed {
                let lost = job
                    .tasks
                    .iter()
                    .filter_map(|t| state.task(*t))
                    .find_map(|t| match t.executor {
                        // The loss already unplaced the task.
                        None => t.lost_from.map(|e| e.0),
                        Some(e)
                            if state
                                .executor(e)
                                .is_none_or(|r| r.state != ExecutorState::Alive) =>
                        {
                            Some(e.0)
                        }
                        Some(_) => None,
                    })
                    .unwrap_or_default();
                return transition(job, JobEvent::ExecutorLost { executor: lost }, now_ms);
            }
            if let Some(msg) = failed {
                return on_failure(job, msg, now_ms);
            }
            let all_done = states
                .iter()
                .all(|s| matches!(s, Some((TaskRunState::Finished, _))));
            (job.state == JobState::Running && all_done)
                .then(|| transition(job, JobEvent::AllTasksFinished, now_ms))
                .flatten()
        }
        JobState::Cancelling => {
            // Only live executors count: a lost one's last report (it may have been lost
            // while it still ran the job) says nothing about what runs now.
            let still_running = reports
                .iter()
                .filter(|(e, _)| {
                    state
                        .executor(ExecutorId(**e))
                        .is_some_and(|r| r.state == ExecutorState::Alive)
                })
                .flat_map(|(_, report)| &report.tasks)
                .any(|r| {
                    r.job == job.id.0
                        && matches!(r.state, TaskRunState::Running | TaskRunState::Paused)
                });
            // A live executor holding tasks of the job may still run them unless its report
            // was sent once it had been told to run what it runs now, without the job (see
            // `ExecutorReport::runs_current`): not heard since this master began leading, or
            // its report predates the reply that handed it the job. Their slots are free only
            // once it says they stopped.
            let holders: BTreeSet<ExecutorId> = job
                .tasks
                .iter()
                .filter_map(|t| state.task(*t)?.executor)
                .collect();
            let unheard = holders.into_iter().any(|e| {
                state
                    .executor(e)
                    .is_some_and(|r| r.state == ExecutorState::Alive)
                    && !reports
                        .get(&e.0)
                        .is_some_and(|r| r.runs_current(state, e.0))
            });
            (!still_running && !unheard)
                .then(|| transition(job, JobEvent::AllTasksStopped, now_ms))
                .flatten()
        }
        JobState::Cancelled | JobState::Finished | JobState::Failed => None,
    }
}

fn on_failure(job: &JobRecord, msg: String, now_ms: u64) -> Option<Command> {
    if restarts_in_window(job, now_ms) >= MAX_RESTARTS as usize {
        return transition(
            job,
            JobEvent::TaskFailed {
                reason: format!(
                    "{msg} (after {MAX_RESTARTS} restarts within {} minutes)",
                    RESTART_WINDOW_MS / 60_000
                ),
            },
            now_ms,
        );
    }
    // A failed task restarts the whole attempt under a new epoch.
    Some(Command::SetJobState {
        job: job.id,
        from: job.state,
        state: JobState::Recovering,
        reason: format!(
            "task failed in epoch {}: {msg}; restarting the job (restart {})",
            job.epoch,
            job.restarts + 1
        ),
        cause: Cause::Restart { epoch: job.epoch },
        at_ms: now_ms,
    })
}

/// Slots used on each executor by tasks of live jobs other than `except` (each task counts
/// its cost). A job that lost part of its placement (an executor was lost) keeps the slots of
/// its surviving tasks until its own placement has been tried again; once that found no
/// capacity, the job runs nowhere and its slots are free for others until it is placed again.
pub fn used_slots(state: &MetaState, except: Option<JobId>) -> HashMap<ExecutorId, u64> {
    let mut used = HashMap::new();
    for job in state.jobs.values() {
        let waits = || {
            !all_placed_on_alive(state, job)
                && job
                    .history
                    .last()
                    .is_some_and(|h| h.cause == Cause::NoCapacity)
        };
        if Some(job.id) == except || job.state.is_terminal() || waits() {
            continue;
        }
        for t in &job.tasks {
            if let Some(task) = state.task(*t)
                && let Some(e) = task.executor
            {
                *used.entry(e).or_insert(0) += u64::from(task.cost);
            }
        }
    }
    used
}

/// Places every task of `job` (whole-attempt placement); `graph` has one task per task of
/// `job`.
fn place(
    state: &MetaState,
    job: &JobRecord,
    graph: &JobGraph,
) -> Result<Vec<(TaskId, ExecutorId)>, String> {
    let used = used_slots(state, Some(job.id));
    let offers: Vec<ExecutorOffer> = state
        .executors
        .values()
        .filter(|e| e.state == ExecutorState::Alive)
        .map(|e| {
            let u = used.get(&e.id).copied().unwrap_or(0);
            ExecutorOffer {
                executor: e.id.0,
                free_slots: u64::from(e.slots).saturating_sub(u) as u32,
                total_slots: e.slots,
            }
        })
        .collect();
    let demands: Vec<TaskDemand> = job
        .tasks
        .iter()
        .zip(&graph.tasks)
        .map(|(id, node)| TaskDemand {
            task: id.0,
            // The cost the slots are counted with (the same plan gave it).
            cost: state.task(*id).map_or(node.cost, |t| t.cost),
            group: node.group.map(GroupId),
            avoid_group: node.avoid_group.map(GroupId),
        })
        .collect();
    let placements = scheduler::schedule(&demands, &offers).map_err(|e| e.to_string())?;
    Ok(placements
        .into_iter()
        .map(|p| (TaskId(p.task), ExecutorId(p.executor)))
        .collect())
}

/// Which task indices of `job` each executor runs, for jobs whose every task is placed.
/// A Pending job runs nowhere, even once placed: its tasks are handed out from Scheduling on,
/// so that a job cancelled while Pending has nothing running to stop.
pub fn assignments_for(state: &MetaState, executor: u64) -> Vec<(&JobRecord, BTreeMap<u32, u64>)> {
    let mut out = Vec::new();
    for job in state.jobs.values() {
        if job.state.is_terminal()
            || matches!(job.state, JobState::Cancelling | JobState::Pending)
            || job.tasks.is_empty()
        {
            continue;
        }
        let mut locations = BTreeMap::new();
        let mut complete = true;
        for (index, t) in job.tasks.iter().enumerate() {
            match state.task(*t) {
                Some(r) if r.epoch == job.epoch && r.executor.is_some() => {
                    // Checked just above.
                    locations.insert(index as u32, r.executor.map(|e| e.0).unwrap_or_default());
                }
                _ => complete = false,
            }
        }
        let here: HashSet<u64> = locations.values().copied().collect();
        if complete && here.contains(&executor) {
            out.push((job, locations));
        }
    }
    out
}

/// The job attempts executor `executor` must run, as a heartbeat reply carries them: every
/// job with all tasks placed and some of them on it, with where every task runs, and the
/// checkpoint states its own tasks resume from.
pub fn assignments(state: &MetaState, executor: u64) -> Vec<Assignment> {
    assignments_for(state, executor)
        .into_iter()
        .map(|(job, locations)| {
            let restore = state
                .checkpoint(job.id)
                .filter(|c| Some(c.checkpoint_id) == job.restored_from)
                .map(|c| {
                    // Linear in the job's tasks (a search per state would be quadratic, on
                    // every heartbeat of a restored job with thousands of tasks).
                    let indices: HashMap<TaskId, u32> = job
                        .tasks
                        .iter()
                        .enumerate()
                        .filter_map(|(i, t)| Some((*t, u32::try_from(i).ok()?)))
                        .collect();
                    (c, indices)
                })
                .map(|(c, indices)| RestoreState {
                    checkpoint: c.checkpoint_id,
                    states: c
                        .states
                        .iter()
                        .filter_map(|(task, state)| {
                            let index = *indices.get(task)?;
                            // Only the states of the tasks that run on this executor: every
                            // reply carries them until the attempt's first checkpoint.
                            (locations.get(&index) == Some(&executor))
                                .then(|| (index, state.clone()))
                        })
                        .collect(),
                });
            Assignment {
                job: job.id.0,
                epoch: job.epoch,
                job_type: job.job_type.clone(),
                spec: job.spec.clone(),
                locations: locations
                    .into_iter()
                    .map(|(index, executor)| TaskLocation {
                        index,
                        executor,
                        addr: state
                            .executor(ExecutorId(executor))
                            .map(|e| e.addr.clone())
                            .unwrap_or_default(),
                    })
                    .collect(),
                paused: job.state == JobState::Paused,
                restore_from: job.restored_from,
                restore,
            }
        })
        .collect()
}

/// A digest of an executor's assignments: equal assignments give equal digests within one
/// build of microcosm (a digest from a build that hashes differently only costs a full
/// reply).
pub fn assignments_digest(assignments: &[Assignment]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    assignments.hash(&mut hasher);
    hasher.finish()
}

/// What a heartbeat reply tells executor `executor`, which runs the assignments of digest
/// `known`: its assignments and their digest, or `None` and the digest when it runs exactly
/// them already. Leaving them out keeps a heartbeat small and spares the executor
/// reconciling what did not change.
pub fn heartbeat_assignments(
    state: &MetaState,
    executor: u64,
    known: Option<u64>,
) -> (Option<Vec<Assignment>>, u64) {
    let current = assignments(state, executor);
    let digest = assignments_digest(&current);
    if known == Some(digest) {
        (None, digest)
    } else {
        (Some(current), digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::state::Rejection;
    use crate::meta::{CommandResponse, MetaRequest, RequestId};

    /// Plans `spec` = a task count, or `NxC`: N tasks of cost C; counts its calls.
    #[derive(Default)]
    struct Catalog {
        plans: std::sync::atomic::AtomicU32,
        /// Tasks added to every plan from now on (a planner that changed).
        extra: std::sync::atomic::AtomicU32,
    }
    impl JobCatalog for Catalog {
        fn validate(&self, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
        fn plan(&self, _: &str, spec: &str) -> Result<JobGraph, String> {
            self.plans
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (n, cost) = spec.trim().split_once('x').unwrap_or((spec.trim(), "1"));
            let n: u32 = n.parse().map_err(|_| "bad spec".to_string())?;
            let n = n + self.extra.load(std::sync::atomic::Ordering::Relaxed);
            let cost: u32 = cost.parse().map_err(|_| "bad spec".to_string())?;
            let mut g = JobGraph::default();
            for i in 0..n {
                g.add_task(format!("t{i}"), cost, None, None);
            }
            Ok(g)
        }
    }

    struct Sim {
        state: MetaState,
        seq: u64,
        reports: Reports,
        catalog: Catalog,
        /// The leader's clock (ms).
        now_ms: u64,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                state: MetaState::default(),
                seq: 0,
                reports: Reports::new(),
                catalog: Catalog::default(),
                now_ms: 1,
            }
        }
        fn apply(&mut self, command: Command) -> CommandResponse {
            self.seq += 1;
            self.state.apply(&MetaRequest {
                id: RequestId {
                    client: 1,
                    seq: self.seq,
                },
                command,
            })
        }
        fn register(&mut self, slots: u32) -> u64 {
            match self.apply(Command::RegisterExecutor {
                addr: format!("127.0.0.1:{}", 9000 + self.seq),
                name: "e".into(),
                slots,
                at_ms: 0,
            }) {
                CommandResponse::ExecutorRegistered { id, .. } => id.0,
                other => panic!("{other:?}"),
            }
        }
        /// Runs leader ticks until nothing changes.
        fn settle(&mut self, expired: &[u64]) {
            let mut expired = expired.to_vec();
            for _ in 0..50 {
                let cmds = next_commands(
                    &self.state,
                    &self.reports,
                    &expired,
                    &self.catalog,
                    self.now_ms,
                );
                expired.clear();
                if cmds.is_empty() {
                    return;
                }
                for c in cmds {
                    self.apply(c);
                }
            }
            panic!("leader never settled");
        }
        fn job(&self, id: u64) -> &JobRecord {
            self.state.job(JobId(id)).unwrap()
        }
        /// Every executor reports its assigned tasks in `st`.
        fn report_all(&mut self, st: TaskRunState) {
            self.reports.clear();
            let execs: Vec<u64> = self.state.executors.keys().map(|e| e.0).collect();
            for e in execs {
                let list = assignments_for(&self.state, e)
                    .into_iter()
                    .flat_map(|(job, loc)| {
                        loc.into_iter()
                            .filter(move |(_, ex)| *ex == e)
                            .map(move |(index, _)| TaskReport {
                                job: job.id.0,
                                epoch: job.epoch,
                                index,
                                state: st,
                                message: String::new(),
                            })
                    })
                    .collect();
                let report = self.caught_up(e, list);
                self.reports.insert(e, report);
            }
        }
        /// A report of `tasks` from executor `e`, sent once it ran the assignments the state
        /// gives it now (and was told nothing else since).
        fn caught_up(&self, e: u64, tasks: Vec<TaskReport>) -> ExecutorReport {
            let digest = assignments_digest(&assignments(&self.state, e));
            ExecutorReport {
                tasks,
                running: Some(digest),
                given: digest,
            }
        }
        /// Two executors of 4 slots running one 4-task job: (sim, a, b, job).
        fn running_on_two_executors() -> (Self, u64, u64, u64) {
            let mut sim = Sim::new();
            let a = sim.register(4);
            let b = sim.register(4);
            let job = sim.submit(4);
            sim.settle(&[]);
            sim.report_all(TaskRunState::Running);
            sim.settle(&[]);
            (sim, a, b, job)
        }
        /// A user's state change of `job`.
        fn set_state(&mut self, job: u64, from: JobState, to: JobState) -> CommandResponse {
            self.apply(Command::SetJobState {
                job: JobId(job),
                from,
                state: to,
                reason: "user".into(),
                cause: Cause::Step,
                at_ms: 0,
            })
        }
        fn submit(&mut self, tasks: u32) -> u64 {
            self.submit_spec(tasks.to_string())
        }
        fn submit_spec(&mut self, spec: String) -> u64 {
            match self.apply(Command::SubmitJob {
                job_type: "t".into(),
                spec,
                at_ms: 0,
            }) {
                CommandResponse::JobSubmitted { id } => id.0,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_plan_that_no_longer_matches_the_allocated_tasks_fails_the_job() {
        let mut sim = Sim::new();
        sim.register(8);
        let job = sim.submit(4);
        for c in next_commands(&sim.state, &sim.reports, &[], &sim.catalog, 1) {
            assert!(matches!(c, Command::AllocateTaskIds { .. }), "{c:?}");
            sim.apply(c);
        }
        assert_eq!(sim.job(job).tasks.len(), 4);
        sim.catalog
            .extra
            .store(1, std::sync::atomic::Ordering::Relaxed);
        sim.settle(&[]);
        let j = sim.job(job);
        assert_eq!(j.state, JobState::Failed, "{:?}", j.history);
        let reason = &j.history.last().unwrap().reason;
        assert!(
            reason.contains("the job has 4 tasks but its plan now has 5"),
            "{reason}"
        );
    }

    #[test]
    fn each_executor_is_sent_the_restore_states_of_its_own_tasks_only() {
        let (mut sim, a, b, job) = Sim::running_on_two_executors();
        let record = sim.job(job).clone();
        let states = record
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, vec![i as u8]))
            .collect();
        let committed = sim.apply(Command::CommitCheckpoint {
            job: JobId(job),
            epoch: record.epoch,
            checkpoint_id: 7,
            states,
            at_ms: 0,
        });
        assert_eq!(committed, CommandResponse::CheckpointCommitted);
        sim.report_all(TaskRunState::Failed);
        sim.settle(&[]);
        assert_eq!(sim.job(job).restored_from, Some(7));
        let mut covered = Vec::new();
        for e in [a, b] {
            for assignment in assignments(&sim.state, e) {
                let own: Vec<u32> = assignment
                    .locations
                    .iter()
                    .filter(|l| l.executor == e)
                    .map(|l| l.index)
                    .collect();
                assert!(own.len() < 4, "the test needs tasks on both executors");
                let restore = assignment.restore.expect("the attempt resumes from 7");
                let sent: Vec<u32> = restore.states.iter().map(|(i, _)| *i).collect();
                assert_eq!(sent, own, "executor {e}");
                for (index, state) in &restore.states {
                    assert_eq!(state, &vec![*index as u8]);
                }
                covered.extend(sent);
            }
        }
        covered.sort_unstable();
        assert_eq!(covered, vec![0, 1, 2, 3]);
    }

    #[test]
    fn slots_are_counted_by_task_cost() {
        let mut sim = Sim::new();
        let a = sim.register(4);
        // Two tasks of cost 2 take the whole executor.
        let first = sim.submit_spec("2x2".into());
        sim.settle(&[]);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(first).state, JobState::Running);
        assert_eq!(used_slots(&sim.state, None).get(&ExecutorId(a)), Some(&4));
        assert_eq!(
            used_slots(&sim.state, Some(JobId(first))).get(&ExecutorId(a)),
            None
        );
        let second = sim.submit(1);
        sim.settle(&[]);
        assert_eq!(
            sim.job(second).state,
            JobState::Pending,
            "no slot is left for a task of cost 1"
        );
    }

    #[test]
    fn a_plan_with_a_task_of_cost_zero_fails_its_job() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit_spec("3x0".into());
        sim.settle(&[]);
        let record = sim.job(job);
        assert_eq!(record.state, JobState::Failed);
        assert!(record.tasks.is_empty());
        let reason = &record.history.last().unwrap().reason;
        assert!(reason.contains("task 0 has cost 0"), "{reason}");
    }

    #[test]
    fn a_job_whose_placement_failed_holds_no_slots() {
        let mut sim = Sim::new();
        let a = sim.register(4);
        let b = sim.register(4);
        let first = sim.submit(6);
        sim.settle(&[]);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(first).state, JobState::Running);
        // Two slots are left: a job of three waits.
        let second = sim.submit(3);
        sim.settle(&[]);
        assert_eq!(sim.job(second).state, JobState::Pending);
        // b is lost: the first job (six tasks) cannot be placed again on a's four slots, so
        // it runs nowhere, and the second job may use a.
        sim.reports.remove(&b);
        sim.settle(&[b]);
        assert_eq!(sim.job(first).state, JobState::Recovering);
        assert_eq!(sim.job(second).state, JobState::Scheduling);
        let on_a = sim
            .job(second)
            .tasks
            .iter()
            .filter(|t| sim.state.task(**t).and_then(|r| r.executor) == Some(ExecutorId(a)))
            .count();
        assert_eq!(on_a, 3);
    }

    #[test]
    fn a_running_job_that_lost_an_executor_is_placed_again_before_a_waiting_job() {
        let mut sim = Sim::new();
        let x = sim.register(4);
        let y = sim.register(4);
        let first = sim.submit(8);
        sim.settle(&[]);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(first).state, JobState::Running);
        let z = sim.register(4);
        // A job of eight waits: only z's four slots are free.
        let second = sim.submit(8);
        sim.settle(&[]);
        assert_eq!(sim.job(second).state, JobState::Pending);
        // y is lost: the first job still holds x while it is placed again, on x and z.
        sim.reports.remove(&y);
        sim.settle(&[y]);
        assert_eq!(sim.job(second).state, JobState::Pending);
        let executors: HashSet<u64> = sim
            .job(first)
            .tasks
            .iter()
            .filter_map(|t| sim.state.task(*t).and_then(|r| r.executor))
            .map(|e| e.0)
            .collect();
        assert_eq!(executors, HashSet::from([x, z]));
    }

    #[test]
    fn job_waits_pending_without_executors_then_runs_and_finishes() {
        let mut sim = Sim::new();
        let job = sim.submit(4);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Pending);
        assert!(
            sim.job(job)
                .history
                .last()
                .unwrap()
                .reason
                .contains("no executors"),
            "{:?}",
            sim.job(job).history
        );
        sim.register(2);
        sim.register(2);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Scheduling);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Running);
        sim.report_all(TaskRunState::Finished);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Finished);
    }

    #[test]
    fn lost_executor_moves_every_task_under_a_new_epoch() {
        let (mut sim, a, b, job) = Sim::running_on_two_executors();
        assert_eq!(sim.job(job).state, JobState::Running);
        let epoch = sim.job(job).epoch;
        sim.reports.remove(&a);
        sim.settle(&[a]);
        let j = sim.job(job);
        assert_eq!(j.state, JobState::Recovering);
        assert!(j.epoch > epoch);
        for t in &j.tasks {
            assert_eq!(sim.state.task(*t).unwrap().executor, Some(ExecutorId(b)));
        }
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Running);
    }

    /// Of two executors lost at once, the job's history names the one that ran its tasks.
    #[test]
    fn the_executor_named_lost_is_the_one_that_held_the_tasks() {
        let (mut sim, a, _b, job) = Sim::running_on_two_executors();
        let idle = sim.register(4);
        assert!(idle > a, "the idle executor is the one lost last");
        sim.reports.remove(&a);
        sim.reports.remove(&idle);
        sim.settle(&[a, idle]);
        let history = &sim.job(job).history;
        let lost: Vec<&str> = history
            .iter()
            .filter(|h| h.reason.contains(" lost;"))
            .map(|h| h.reason.as_str())
            .collect();
        assert_eq!(
            lost,
            [format!("executor {a} lost; placing its tasks again")],
            "{history:?}"
        );
    }

    #[test]
    fn failed_task_restarts_the_job_then_gives_up() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit(2);
        sim.settle(&[]);
        for _ in 0..MAX_RESTARTS {
            let epoch = sim.job(job).epoch;
            sim.report_all(TaskRunState::Failed);
            sim.settle(&[]);
            assert_eq!(sim.job(job).state, JobState::Recovering);
            assert!(sim.job(job).epoch > epoch, "a restart needs a new epoch");
        }
        sim.report_all(TaskRunState::Failed);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Failed);
    }

    /// A job placed but still Pending hands out no tasks: a cancel in that state (which ends
    /// the job at once) leaves nothing running.
    #[test]
    fn a_pending_job_runs_nowhere_even_once_placed() {
        let mut sim = Sim::new();
        let a = sim.register(4);
        let job = sim.submit(2);
        for _ in 0..2 {
            let step = next_commands(&sim.state, &sim.reports, &[], &sim.catalog, 1);
            let [command] = step.as_slice() else {
                panic!("one step at a time: {step:?}")
            };
            sim.apply(command.clone());
        }
        assert_eq!(sim.job(job).state, JobState::Pending);
        assert!(sim.job(job).epoch > 0, "placed");
        assert!(assignments_for(&sim.state, a).is_empty());
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Scheduling);
        assert_eq!(assignments_for(&sim.state, a).len(), 1);
    }

    /// An allocation planned twice (the first write's outcome was unknown when the next
    /// turn planned) gives the job its tasks once.
    #[test]
    fn a_repeated_allocation_is_refused() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit(4);
        let alloc = next_commands(&sim.state, &sim.reports, &[], &sim.catalog, 1)
            .into_iter()
            .find(|c| matches!(c, Command::AllocateTaskIds { .. }))
            .expect("the first step allocates");
        sim.apply(alloc.clone());
        assert!(matches!(
            sim.apply(alloc),
            CommandResponse::Rejected(Rejection::TasksAllocated { count: 4, .. })
        ));
        sim.settle(&[]);
        assert_eq!(sim.job(job).tasks.len(), 4);
        assert_eq!(sim.job(job).state, JobState::Scheduling);
    }

    /// A restart planned twice counts once, and a restart whose placement found no capacity
    /// is placed again instead of restarted again.
    #[test]
    fn a_restart_counts_once() {
        let (mut sim, _, _, job) = Sim::running_on_two_executors();
        sim.report_all(TaskRunState::Failed);
        let restart = next_commands(&sim.state, &sim.reports, &[], &sim.catalog, 1)
            .into_iter()
            .find(|c| {
                matches!(
                    c,
                    Command::SetJobState {
                        cause: Cause::Restart { .. },
                        ..
                    }
                )
            })
            .expect("a failed task restarts the job");
        sim.apply(restart.clone());
        // The same restart planned from Recovering (as after an executor loss) passes the
        // state check; the restart must not count again.
        let Command::SetJobState {
            job: id,
            reason,
            cause,
            ..
        } = restart
        else {
            unreachable!("matched above")
        };
        let again = Command::SetJobState {
            job: id,
            from: JobState::Recovering,
            state: JobState::Recovering,
            reason,
            cause,
            at_ms: 2,
        };
        assert!(matches!(
            sim.apply(again),
            CommandResponse::Rejected(Rejection::AlreadyRestarted { .. })
        ));
        assert_eq!(sim.job(job).restarts, 1);
        let epoch = sim.job(job).epoch;
        // The placement of the restart found no capacity (another job took the slots).
        sim.apply(Command::SetJobState {
            job: JobId(job),
            from: JobState::Recovering,
            state: JobState::Recovering,
            reason: "lost tasks wait for capacity: none free".into(),
            cause: Cause::NoCapacity,
            at_ms: 0,
        });
        // The executors still report the failed attempt: it is placed again, not restarted.
        sim.settle(&[]);
        assert_eq!(sim.job(job).restarts, 1);
        assert!(sim.job(job).epoch > epoch);
    }

    /// The restart limit counts every restart, also those the bounded history no longer
    /// holds.
    #[test]
    fn the_restart_limit_outlasts_the_history() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit(2);
        sim.settle(&[]);
        sim.report_all(TaskRunState::Failed);
        sim.settle(&[]);
        assert_eq!(sim.job(job).restarts, 1);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Running);
        // Enough pauses and resumes to push the restart out of the history.
        for _ in 0..=crate::meta::state::MAX_JOB_HISTORY / 2 {
            for (from, to) in [
                (JobState::Running, JobState::Paused),
                (JobState::Paused, JobState::Running),
            ] {
                sim.set_state(job, from, to);
            }
        }
        assert!(
            sim.job(job)
                .history
                .iter()
                .all(|h| !matches!(h.cause, Cause::Restart { .. })),
            "the first restart left the history"
        );
        for _ in 1..MAX_RESTARTS {
            sim.report_all(TaskRunState::Failed);
            sim.settle(&[]);
            assert_eq!(sim.job(job).state, JobState::Recovering);
        }
        assert_eq!(sim.job(job).restarts, MAX_RESTARTS);
        sim.report_all(TaskRunState::Failed);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Failed);
        let last = &sim.job(job).history.last().expect("a history").reason;
        assert!(
            last.contains("after 5 restarts within 10 minutes"),
            "{last}"
        );
    }

    /// The budget is per time window: a job restarted now and then runs on however many
    /// restarts it had in all; one that fails five times within the window then ends.
    #[test]
    fn the_restart_budget_is_per_time_window() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit(2);
        sim.settle(&[]);
        let fail_once = |sim: &mut Sim| {
            sim.report_all(TaskRunState::Failed);
            sim.settle(&[]);
            assert_eq!(sim.job(job).state, JobState::Recovering, "restarted");
            sim.report_all(TaskRunState::Running);
            sim.settle(&[]);
            assert_eq!(sim.job(job).state, JobState::Running);
        };
        // A restart every 2.5 minutes: at most 4 within any 10 minutes.
        for _ in 0..12 {
            fail_once(&mut sim);
            sim.now_ms += RESTART_WINDOW_MS / 4;
        }
        assert_eq!(sim.job(job).restarts, 12);
        assert_eq!(
            sim.job(job).recent_restarts_ms.len(),
            crate::meta::state::MAX_RECENT_RESTARTS.min(12)
        );
        // Then five at once (a restart a second): the sixth failure ends the job.
        sim.now_ms += RESTART_WINDOW_MS;
        for _ in 0..MAX_RESTARTS {
            fail_once(&mut sim);
            sim.now_ms += 1_000;
        }
        sim.report_all(TaskRunState::Failed);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Failed);
    }

    #[test]
    fn capacity_is_shared_between_jobs_and_freed_by_cancel() {
        let mut sim = Sim::new();
        sim.register(3);
        let first = sim.submit(3);
        let second = sim.submit(2);
        sim.settle(&[]);
        assert_eq!(sim.job(first).state, JobState::Scheduling);
        assert_eq!(sim.job(second).state, JobState::Pending);
        sim.set_state(first, JobState::Scheduling, JobState::Cancelling);
        // The executor says it runs nothing.
        sim.reports.clear();
        let execs: Vec<u64> = sim.state.executors.keys().map(|e| e.0).collect();
        for e in execs {
            let report = sim.caught_up(e, Vec::new());
            sim.reports.insert(e, report);
        }
        sim.settle(&[]);
        assert_eq!(sim.job(first).state, JobState::Cancelled);
        assert_eq!(sim.job(second).state, JobState::Scheduling);
    }

    /// The last report of an executor lost while it ran the job does not hold up a cancel.
    #[test]
    fn a_cancel_ignores_what_a_lost_executor_last_reported() {
        let (mut sim, a, b, job) = Sim::running_on_two_executors();
        let last_of_a = sim.reports[&a].clone();
        assert!(
            last_of_a
                .tasks
                .iter()
                .any(|r| r.state == TaskRunState::Running)
        );
        sim.apply(Command::ExecutorLost {
            id: ExecutorId(a),
            reason: "superseded by a new registration".into(),
            at_ms: 0,
        });
        sim.settle(&[]);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Running);
        sim.set_state(job, JobState::Running, JobState::Cancelling);
        // b stopped everything; a's entry is what it said before it was lost.
        let stopped = sim.caught_up(b, Vec::new());
        sim.reports = HashMap::from([(a, last_of_a), (b, stopped)]);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Cancelled);
    }

    #[test]
    fn a_cancel_completes_only_once_every_live_executor_holding_tasks_has_reported() {
        let mut sim = Sim::new();
        let a = sim.register(2);
        let b = sim.register(2);
        let job = sim.submit(4);
        sim.settle(&[]);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Running);
        sim.set_state(job, JobState::Running, JobState::Cancelling);
        // A new leader has heard from no executor yet: the tasks may still run.
        sim.reports.clear();
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Cancelling);
        // One executor says it runs nothing; the other is still unheard.
        let stopped = sim.caught_up(a, Vec::new());
        sim.reports.insert(a, stopped);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Cancelling);
        let stopped = sim.caught_up(b, Vec::new());
        sim.reports.insert(b, stopped);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Cancelled);
    }

    /// An executor's report sent just before the reply that handed it the job says nothing
    /// of the tasks it started after: a cancel waits for one sent once it ran what it runs
    /// now, although the empty assignments it had before look the same as those after.
    #[test]
    fn a_cancel_waits_for_an_executor_that_was_just_handed_the_job() {
        let mut sim = Sim::new();
        let e = sim.register(4);
        let before = assignments_digest(&assignments(&sim.state, e));
        let job = sim.submit(4);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Scheduling);
        let handed = assignments_digest(&assignments(&sim.state, e));
        assert_ne!(before, handed);
        // Its heartbeat reported nothing running; the reply handed it the job.
        sim.reports.insert(
            e,
            ExecutorReport {
                tasks: Vec::new(),
                running: Some(before),
                given: handed,
            },
        );
        sim.set_state(job, JobState::Scheduling, JobState::Cancelling);
        sim.settle(&[]);
        assert_eq!(
            sim.job(job).state,
            JobState::Cancelling,
            "the tasks may run"
        );
        // The next heartbeat: it runs the job (the reply now takes it away).
        let now = assignments_digest(&assignments(&sim.state, e));
        assert_eq!(now, before, "no assignments, as before the job");
        sim.reports.insert(
            e,
            ExecutorReport {
                tasks: Vec::new(),
                running: Some(handed),
                given: now,
            },
        );
        sim.settle(&[]);
        assert_eq!(
            sim.job(job).state,
            JobState::Cancelling,
            "told, not yet stopped"
        );
        // It stopped them and says so.
        let stopped = sim.caught_up(e, Vec::new());
        sim.reports.insert(e, stopped);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Cancelled);
    }

    #[test]
    fn a_plan_without_tasks_fails_the_job_instead_of_being_refused_forever() {
        let mut sim = Sim::new();
        sim.register(2);
        let job = sim.submit(0);
        sim.settle(&[]);
        let j = sim.job(job);
        assert_eq!(j.state, JobState::Failed);
        let reason = &j.history.last().unwrap().reason;
        assert!(reason.contains("0 tasks"), "{reason}");
    }

    #[test]
    fn a_running_job_is_not_planned_again_on_every_tick() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit(3);
        sim.settle(&[]);
        sim.report_all(TaskRunState::Running);
        sim.settle(&[]);
        assert_eq!(sim.job(job).state, JobState::Running);
        let plans = sim.catalog.plans.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..100 {
            assert!(next_commands(&sim.state, &sim.reports, &[], &sim.catalog, 1).is_empty());
        }
        assert_eq!(
            sim.catalog.plans.load(std::sync::atomic::Ordering::Relaxed),
            plans,
            "ticks of a running job planned it"
        );
        // A lost executor means a placement, which plans once more.
        let lost = *sim.reports.keys().next().unwrap();
        sim.register(4);
        sim.reports.remove(&lost);
        sim.settle(&[lost]);
        assert_eq!(sim.job(job).state, JobState::Recovering);
        assert!(sim.catalog.plans.load(std::sync::atomic::Ordering::Relaxed) > plans);
    }

    #[test]
    fn a_spec_that_cannot_be_planned_fails_the_job() {
        let mut sim = Sim::new();
        sim.register(4);
        let job = sim.submit_spec("not a number".into());
        sim.settle(&[]);
        let j = sim.job(job);
        assert_eq!(j.state, JobState::Failed);
        assert!(
            j.history
                .last()
                .unwrap()
                .reason
                .contains("cannot plan: bad spec"),
            "{:?}",
            j.history
        );
    }

    #[test]
    fn a_heartbeat_reply_leaves_out_assignments_the_executor_already_runs() {
        let (mut sim, a, b, job) = Sim::running_on_two_executors();
        // A fresh executor gets its assignments and their digest.
        let (first, digest) = heartbeat_assignments(&sim.state, a, None);
        let first = first.expect("an executor without a digest gets its assignments");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].job, job);
        assert_eq!(digest, assignments_digest(&first));
        // Sent back unchanged, the digest spares the reply its assignments.
        assert_eq!(
            heartbeat_assignments(&sim.state, a, Some(digest)),
            (None, digest)
        );
        // A stale or foreign digest gets the whole list.
        assert_eq!(
            heartbeat_assignments(&sim.state, a, Some(digest ^ 1)),
            (Some(first.clone()), digest)
        );

        // Pausing the job changes what the executor must do: the reply carries it again.
        sim.apply(Command::SetJobState {
            job: JobId(job),
            from: JobState::Running,
            state: JobState::Paused,
            reason: "paused by the user".into(),
            cause: Cause::Step,
            at_ms: 2,
        });
        let (paused, paused_digest) = heartbeat_assignments(&sim.state, a, Some(digest));
        let paused = paused.expect("a paused job is a change");
        assert!(paused[0].paused);
        assert_ne!(paused_digest, digest);

        // Losing executor b moves every task to a under a new epoch: a change again.
        sim.apply(Command::SetJobState {
            job: JobId(job),
            from: JobState::Paused,
            state: JobState::Running,
            reason: "resumed".into(),
            cause: Cause::Step,
            at_ms: 3,
        });
        sim.reports.remove(&b);
        sim.settle(&[b]);
        let (moved, moved_digest) = heartbeat_assignments(&sim.state, a, Some(digest));
        let moved = moved.expect("a new epoch is a change");
        assert!(moved[0].epoch > first[0].epoch);
        assert!(moved[0].locations.iter().all(|l| l.executor == a));
        assert_ne!(moved_digest, digest);
    }
}
