//! The job lifecycle as an explicit state machine.
//!
//! Every job is in exactly one [`JobState`]; transitions are decided by pure functions in this
//! module and recorded (with a reason and a time) in the replicated metadata.

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Accepted, running nowhere: not placed yet (e.g. no executor has free capacity; the
    /// reason says why), or placed but not yet handed to executors.
    Pending,
    /// Placements are being handed to executors.
    Scheduling,
    /// Every task runs.
    Running,
    /// Tasks were lost with their executor, or a task failed and the job restarts: the job
    /// is being placed again under a new epoch.
    Recovering,
    /// Paused by a user; tasks keep their state and placement.
    Paused,
    /// A cancel was requested; tasks are being stopped.
    Cancelling,
    /// Cancelled by a user; capacity released. Terminal.
    Cancelled,
    /// Every task completed. Terminal.
    Finished,
    /// The job failed and will not be retried. Terminal.
    Failed,
}

impl JobState {
    /// Whether no further transition can leave this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Cancelled | Self::Finished | Self::Failed)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl JobState {
    /// Every state, in declaration order.
    pub const ALL: [JobState; 9] = [
        Self::Pending,
        Self::Scheduling,
        Self::Running,
        Self::Recovering,
        Self::Paused,
        Self::Cancelling,
        Self::Cancelled,
        Self::Finished,
        Self::Failed,
    ];

    /// Whether a job in this state holds placements, and so reserved executor slots.
    pub fn holds_capacity(self) -> bool {
        matches!(
            self,
            Self::Scheduling | Self::Running | Self::Recovering | Self::Paused | Self::Cancelling
        )
    }
}

/// Something that happened to a job: a scheduler outcome, an executor report or a user request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobEvent {
    /// The scheduler found a placement for every task.
    Scheduled,
    /// The scheduler could not place the job (or its lost tasks); `reason` says why.
    NoCapacity {
        /// The scheduler's explanation.
        reason: String,
    },
    /// Every executor accepted the tasks handed to it.
    Placed,
    /// Every task reported running.
    AllTasksRunning,
    /// An executor that ran tasks of the job was lost.
    ExecutorLost {
        /// The lost executor.
        executor: u64,
    },
    /// The tasks lost with an executor were placed again.
    Rescheduled,
    /// A user asked to pause the job.
    PauseRequested,
    /// A user asked to resume the paused job.
    ResumeRequested,
    /// A user asked to cancel the job.
    CancelRequested,
    /// Every task stopped (after a cancel).
    AllTasksStopped,
    /// Every task completed its work.
    AllTasksFinished,
    /// A task failed and will not be retried.
    TaskFailed {
        /// What went wrong.
        reason: String,
    },
    /// The job cannot go on (e.g. its retries are exhausted or its spec became invalid).
    Fatal {
        /// What went wrong.
        reason: String,
    },
}

impl JobEvent {
    /// What the event asks of the job, as a verb phrase for messages ("cancel", "resume").
    pub fn action(&self) -> &'static str {
        match self {
            Self::Scheduled => "apply a schedule",
            Self::NoCapacity { .. } => "wait for capacity",
            Self::Placed => "confirm placements",
            Self::AllTasksRunning => "mark all tasks running",
            Self::ExecutorLost { .. } => "recover from a lost executor",
            Self::Rescheduled => "reschedule lost tasks",
            Self::PauseRequested => "pause",
            Self::ResumeRequested => "resume",
            Self::CancelRequested => "cancel",
            Self::AllTasksStopped => "mark all tasks stopped",
            Self::AllTasksFinished => "finish",
            Self::TaskFailed { .. } => "fail a task",
            Self::Fatal { .. } => "fail",
        }
    }
}

/// What a recorded transition means to the scheduler, beyond its human-readable reason.
/// Stored with each history entry, so that no decision depends on the reason's wording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cause {
    /// Any other step.
    #[default]
    Step,
    /// The job's last placement attempt found no capacity ([`JobEvent::NoCapacity`]): it runs
    /// nowhere and holds no slots until it is placed again.
    NoCapacity,
    /// A task of the attempt at `epoch` failed; the whole job is placed again under a new
    /// epoch (a restart, counted against the job's restart limit).
    Restart {
        /// The epoch of the attempt that failed.
        epoch: u64,
    },
}

/// The outcome of a valid event: the job's new state (possibly the same) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The state the job is in after the event.
    pub to: JobState,
    /// A human-readable reason, stored in the job's history.
    pub reason: String,
    /// What the transition means to the scheduler: [`Cause::NoCapacity`] for
    /// [`JobEvent::NoCapacity`], [`Cause::Step`] for every other event.
    pub cause: Cause,
}

impl Transition {
    /// The history entry for this transition out of `from`, at `at_ms` (milliseconds since
    /// the Unix epoch, as the leader's clock read it).
    pub fn record(&self, from: JobState, at_ms: u64) -> TransitionRecord {
        TransitionRecord {
            from,
            to: self.to,
            reason: self.reason.clone(),
            at_ms,
        }
    }
}

/// One entry of a job's history, as stored in the replicated metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransitionRecord {
    /// The state before the event.
    pub from: JobState,
    /// The state after the event.
    pub to: JobState,
    /// Why the job moved.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// An event that does not apply to the job's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job is {state}; cannot {action}")]
pub struct InvalidTransition {
    /// The job's state, unchanged.
    pub state: JobState,
    /// The rejected event's [`JobEvent::action`].
    pub action: &'static str,
}

/// Decides where `event` takes a job in `state`.
///
/// | from | event | to |
/// |---|---|---|
/// | Pending | Scheduled | Scheduling |
/// | Pending | NoCapacity | Pending |
/// | Pending | CancelRequested | Cancelled |
/// | Scheduling | Placed | Scheduling |
/// | Scheduling | AllTasksRunning | Running |
/// | Scheduling | NoCapacity | Pending (placement failed, capacity released) |
/// | Scheduling, Running, Paused, Recovering | ExecutorLost | Recovering |
/// | Recovering | Rescheduled, Placed, NoCapacity | Recovering |
/// | Recovering | AllTasksRunning | Running |
/// | Running | PauseRequested | Paused |
/// | Paused | ResumeRequested | Running |
/// | Scheduling, Running, Recovering, Paused | CancelRequested | Cancelling |
/// | Running | AllTasksFinished | Finished |
/// | Scheduling, Running, Recovering, Paused | TaskFailed | Failed |
/// | Cancelling | ExecutorLost | Cancelling |
/// | Cancelling | AllTasksStopped, TaskFailed | Cancelled |
/// | Cancelling | AllTasksFinished | Finished |
/// | any non-terminal | Fatal | Failed |
///
/// A paused job that loses an executor goes to Recovering: its lost tasks must be placed again,
/// and it runs once they are (pause it again if needed).
///
/// # Errors
/// [`InvalidTransition`] for every other pair, including any event in a terminal state; the
/// state is then unchanged.
pub fn next(state: JobState, event: &JobEvent) -> Result<Transition, InvalidTransition> {
    use JobEvent as E;
    use JobState as S;

    let (to, reason) = match (state, event) {
        (s, _) if s.is_terminal() => return Err(invalid(state, event)),
        (_, E::Fatal { reason }) => (S::Failed, format!("fatal: {reason}")),

        (S::Pending, E::Scheduled) => (S::Scheduling, "placed every task".to_owned()),
        (S::Pending, E::NoCapacity { reason }) => {
            (S::Pending, format!("waiting for capacity: {reason}"))
        }
        (S::Pending, E::CancelRequested) => (
            S::Cancelled,
            "cancelled before any task was placed".to_owned(),
        ),

        (S::Scheduling, E::Placed) => (
            S::Scheduling,
            "every executor accepted its tasks".to_owned(),
        ),
        (S::Scheduling, E::AllTasksRunning) => (S::Running, "every task is running".to_owned()),
        (S::Scheduling, E::NoCapacity { reason }) => (
            S::Pending,
            format!("placement failed, capacity released: {reason}"),
        ),

        (S::Scheduling | S::Running | S::Recovering | S::Paused, E::ExecutorLost { executor }) => (
            S::Recovering,
            format!("executor {executor} lost; placing its tasks again"),
        ),
        (S::Recovering, E::Rescheduled) => (S::Recovering, "lost tasks placed again".to_owned()),
        (S::Recovering, E::Placed) => (
            S::Recovering,
            "executors accepted the re-placed tasks".to_owned(),
        ),
        (S::Recovering, E::NoCapacity { reason }) => (
            S::Recovering,
            format!("lost tasks wait for capacity: {reason}"),
        ),
        (S::Recovering, E::AllTasksRunning) => {
            (S::Running, "recovered; every task is running".to_owned())
        }

        (S::Running, E::PauseRequested) => (S::Paused, "paused on request".to_owned()),
        (S::Paused, E::ResumeRequested) => (S::Running, "resumed on request".to_owned()),

        (S::Scheduling | S::Running | S::Recovering | S::Paused, E::CancelRequested) => {
            (S::Cancelling, "cancel requested; stopping tasks".to_owned())
        }
        (S::Running, E::AllTasksFinished) => (S::Finished, "every task finished".to_owned()),
        (S::Scheduling | S::Running | S::Recovering | S::Paused, E::TaskFailed { reason }) => {
            (S::Failed, format!("task failed: {reason}"))
        }

        (S::Cancelling, E::ExecutorLost { executor }) => (
            S::Cancelling,
            format!("executor {executor} lost while cancelling; its tasks are gone"),
        ),
        (S::Cancelling, E::AllTasksStopped) => (S::Cancelled, "every task stopped".to_owned()),
        (S::Cancelling, E::TaskFailed { reason }) => (
            S::Cancelled,
            format!("a task failed while cancelling: {reason}"),
        ),
        (S::Cancelling, E::AllTasksFinished) => (
            S::Finished,
            "every task finished before the cancel took effect".to_owned(),
        ),

        _ => return Err(invalid(state, event)),
    };
    let cause = match event {
        E::NoCapacity { .. } => Cause::NoCapacity,
        _ => Cause::Step,
    };
    Ok(Transition { to, reason, cause })
}

fn invalid(state: JobState, event: &JobEvent) -> InvalidTransition {
    InvalidTransition {
        state,
        action: event.action(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState as S;

    /// One event of every kind; the match makes adding a variant without a test a compile error.
    fn all_events() -> Vec<JobEvent> {
        let events = vec![
            JobEvent::Scheduled,
            JobEvent::NoCapacity {
                reason: "no executors registered".to_owned(),
            },
            JobEvent::Placed,
            JobEvent::AllTasksRunning,
            JobEvent::ExecutorLost { executor: 42 },
            JobEvent::Rescheduled,
            JobEvent::PauseRequested,
            JobEvent::ResumeRequested,
            JobEvent::CancelRequested,
            JobEvent::AllTasksStopped,
            JobEvent::AllTasksFinished,
            JobEvent::TaskFailed {
                reason: "sink refused the batch".to_owned(),
            },
            JobEvent::Fatal {
                reason: "spec invalid".to_owned(),
            },
        ];
        for event in &events {
            match event {
                JobEvent::Scheduled
                | JobEvent::NoCapacity { .. }
                | JobEvent::Placed
                | JobEvent::AllTasksRunning
                | JobEvent::ExecutorLost { .. }
                | JobEvent::Rescheduled
                | JobEvent::PauseRequested
                | JobEvent::ResumeRequested
                | JobEvent::CancelRequested
                | JobEvent::AllTasksStopped
                | JobEvent::AllTasksFinished
                | JobEvent::TaskFailed { .. }
                | JobEvent::Fatal { .. } => {}
            }
        }
        events
    }

    /// The expected table: (from, event action, to), every valid pair and nothing else.
    const TABLE: &[(JobState, &str, JobState)] = &[
        (S::Pending, "apply a schedule", S::Scheduling),
        (S::Pending, "wait for capacity", S::Pending),
        (S::Pending, "cancel", S::Cancelled),
        (S::Pending, "fail", S::Failed),
        (S::Scheduling, "confirm placements", S::Scheduling),
        (S::Scheduling, "mark all tasks running", S::Running),
        (S::Scheduling, "wait for capacity", S::Pending),
        (S::Scheduling, "recover from a lost executor", S::Recovering),
        (S::Scheduling, "cancel", S::Cancelling),
        (S::Scheduling, "fail a task", S::Failed),
        (S::Scheduling, "fail", S::Failed),
        (S::Running, "recover from a lost executor", S::Recovering),
        (S::Running, "pause", S::Paused),
        (S::Running, "cancel", S::Cancelling),
        (S::Running, "finish", S::Finished),
        (S::Running, "fail a task", S::Failed),
        (S::Running, "fail", S::Failed),
        (S::Recovering, "recover from a lost executor", S::Recovering),
        (S::Recovering, "reschedule lost tasks", S::Recovering),
        (S::Recovering, "confirm placements", S::Recovering),
        (S::Recovering, "wait for capacity", S::Recovering),
        (S::Recovering, "mark all tasks running", S::Running),
        (S::Recovering, "cancel", S::Cancelling),
        (S::Recovering, "fail a task", S::Failed),
        (S::Recovering, "fail", S::Failed),
        (S::Paused, "recover from a lost executor", S::Recovering),
        (S::Paused, "resume", S::Running),
        (S::Paused, "cancel", S::Cancelling),
        (S::Paused, "fail a task", S::Failed),
        (S::Paused, "fail", S::Failed),
        (S::Cancelling, "recover from a lost executor", S::Cancelling),
        (S::Cancelling, "mark all tasks stopped", S::Cancelled),
        (S::Cancelling, "fail a task", S::Cancelled),
        (S::Cancelling, "finish", S::Finished),
        (S::Cancelling, "fail", S::Failed),
    ];

    #[test]
    fn every_state_and_event_pair_matches_the_table() {
        let events = all_events();
        let mut valid = 0;
        for state in JobState::ALL {
            for event in &events {
                let expected = TABLE
                    .iter()
                    .find(|(from, action, _)| *from == state && *action == event.action())
                    .map(|&(_, _, to)| to);
                match (next(state, event), expected) {
                    (Ok(transition), Some(to)) => {
                        valid += 1;
                        assert_eq!(transition.to, to, "{state} + {event:?}");
                        assert!(!transition.reason.is_empty(), "{state} + {event:?}");
                    }
                    (Err(err), None) => {
                        assert_eq!(
                            err,
                            InvalidTransition {
                                state,
                                action: event.action()
                            }
                        );
                        assert_eq!(
                            err.to_string(),
                            format!("job is {state}; cannot {}", event.action())
                        );
                    }
                    (result, expected) => {
                        panic!("{state} + {event:?}: got {result:?}, expected {expected:?}")
                    }
                }
            }
        }
        assert_eq!(valid, TABLE.len(), "every table row was exercised");
    }

    #[test]
    fn actions_are_distinct() {
        let events = all_events();
        for (i, a) in events.iter().enumerate() {
            for b in &events[i + 1..] {
                assert_ne!(a.action(), b.action(), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for state in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in all_events() {
                assert!(next(state, &event).is_err(), "{state} + {event:?}");
            }
        }
    }

    #[test]
    fn errors_name_state_and_event() {
        let err = next(S::Finished, &JobEvent::CancelRequested).unwrap_err();
        assert_eq!(err.to_string(), "job is Finished; cannot cancel");
        let err = next(S::Running, &JobEvent::ResumeRequested).unwrap_err();
        assert_eq!(err.to_string(), "job is Running; cannot resume");
        let err = next(S::Paused, &JobEvent::PauseRequested).unwrap_err();
        assert_eq!(err.to_string(), "job is Paused; cannot pause");
        let err = next(S::Cancelling, &JobEvent::CancelRequested).unwrap_err();
        assert_eq!(err.to_string(), "job is Cancelling; cannot cancel");
    }

    #[test]
    fn reasons_carry_the_event_details() {
        let lost = next(S::Running, &JobEvent::ExecutorLost { executor: 42 }).unwrap();
        assert!(lost.reason.contains("executor 42"), "{}", lost.reason);
        let waiting = next(
            S::Pending,
            &JobEvent::NoCapacity {
                reason: "job needs 8 slots in total, the cluster has 3 free".to_owned(),
            },
        )
        .unwrap();
        assert!(
            waiting.reason.contains("the cluster has 3 free"),
            "{}",
            waiting.reason
        );
        let failed = next(
            S::Running,
            &JobEvent::TaskFailed {
                reason: "disk full".to_owned(),
            },
        )
        .unwrap();
        assert_eq!(failed.to, S::Failed);
        assert!(failed.reason.contains("disk full"), "{}", failed.reason);
    }

    #[test]
    fn a_normal_life_and_its_history() {
        let mut state = S::Pending;
        let mut history = Vec::new();
        let events = [
            JobEvent::NoCapacity {
                reason: "no executors registered".to_owned(),
            },
            JobEvent::Scheduled,
            JobEvent::Placed,
            JobEvent::AllTasksRunning,
            JobEvent::ExecutorLost { executor: 3 },
            JobEvent::Rescheduled,
            JobEvent::AllTasksRunning,
            JobEvent::PauseRequested,
            JobEvent::ResumeRequested,
            JobEvent::CancelRequested,
            JobEvent::AllTasksStopped,
        ];
        for (at_ms, event) in (1000_u64..).zip(&events) {
            let transition = next(state, event).unwrap();
            history.push(transition.record(state, at_ms));
            state = transition.to;
        }
        assert_eq!(state, S::Cancelled);
        let path: Vec<JobState> = history.iter().map(|record| record.to).collect();
        assert_eq!(
            path,
            vec![
                S::Pending,
                S::Scheduling,
                S::Scheduling,
                S::Running,
                S::Recovering,
                S::Recovering,
                S::Running,
                S::Paused,
                S::Running,
                S::Cancelling,
                S::Cancelled,
            ]
        );
        for pair in history.windows(2) {
            assert_eq!(pair[0].to, pair[1].from);
            assert!(pair[0].at_ms < pair[1].at_ms);
        }
    }

    #[test]
    fn holds_capacity_exactly_while_placed() {
        let holding: Vec<JobState> = JobState::ALL
            .into_iter()
            .filter(|s| s.holds_capacity())
            .collect();
        assert_eq!(
            holding,
            vec![
                S::Scheduling,
                S::Running,
                S::Recovering,
                S::Paused,
                S::Cancelling
            ]
        );
        assert!(
            JobState::ALL
                .iter()
                .all(|s| !(s.is_terminal() && s.holds_capacity()))
        );
    }

    #[test]
    fn records_round_trip_through_serde() {
        let record = next(S::Running, &JobEvent::PauseRequested)
            .unwrap()
            .record(S::Running, 1_700_000_000_000);
        let bytes = postcard::to_stdvec(&record).unwrap();
        let back: TransitionRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.from, S::Running);
        assert_eq!(back.to, S::Paused);
        let event = JobEvent::ExecutorLost { executor: 9 };
        let bytes = postcard::to_stdvec(&event).unwrap();
        assert_eq!(postcard::from_bytes::<JobEvent>(&bytes).unwrap(), event);
    }
}
