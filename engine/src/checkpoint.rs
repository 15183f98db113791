//! The interface between operators that take part in consistent checkpoints and whoever
//! collects their snapshots (the executor, which forwards them to the masters).
//!
//! The engine does not define *how* a job cuts a checkpoint (the demo job sends barrier
//! records with its data); it defines what a task hands over when it has taken its part of
//! one: a [`TaskSnapshot`] given to a [`SnapshotSink`], and what a restarted attempt gets
//! back: a [`RestorePoint`] with every task's state of the checkpoint it resumes from.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// One task's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSnapshot {
    /// The task's index in its job graph.
    pub task: u32,
    /// The checkpoint this state belongs to.
    pub checkpoint: u64,
    /// The task has finished: this is its final state, which stands for every checkpoint
    /// after `checkpoint` (not for `checkpoint` itself: that one's state is the snapshot the
    /// task took at it, reported with `last` unset).
    pub last: bool,
    /// The task's state, opaque to everyone but the operator that restores from it.
    pub state: Vec<u8>,
}

/// Receives task snapshots. Called from worker threads inside `Operator::run`, so it must not
/// block: implementations queue the snapshot and return.
pub trait SnapshotSink: Send + Sync {
    /// Hands over one snapshot. A snapshot that cannot be delivered is dropped (with a log
    /// line); the checkpoint it belongs to then never completes and a later one is used.
    fn snapshot(&self, snapshot: TaskSnapshot);
}

/// A sink that keeps every snapshot in memory, in arrival order (tests, single-process runs).
#[derive(Debug, Default)]
pub struct MemorySnapshots(Mutex<Vec<TaskSnapshot>>);

impl MemorySnapshots {
    /// An empty collector.
    pub fn new() -> MemorySnapshots {
        MemorySnapshots::default()
    }

    /// Every snapshot received so far.
    pub fn taken(&self) -> Vec<TaskSnapshot> {
        // A plain Vec: still consistent if a holder panicked.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The restore point of checkpoint `checkpoint` if every task in `0..tasks` reported it
    /// (or had finished before it), else `None`.
    ///
    /// A task's state is the one it took at `checkpoint`; a task without one that finished
    /// at an earlier checkpoint contributes its final state (the latest such report). A
    /// final report for `checkpoint` itself never stands in for the state taken at it: it
    /// holds what the task did after that checkpoint.
    pub fn restore_point(&self, checkpoint: u64, tasks: u32) -> Option<RestorePoint> {
        let mut states = BTreeMap::new();
        let mut finished = BTreeMap::new();
        for s in self.taken() {
            if s.last {
                if s.checkpoint < checkpoint {
                    finished.insert(s.task, s.state);
                }
            } else if s.checkpoint == checkpoint {
                states.insert(s.task, s.state);
            }
        }
        for (task, state) in finished {
            states.entry(task).or_insert(state);
        }
        states.retain(|&task, _| task < tasks);
        let complete = (0..tasks).all(|task| states.contains_key(&task));
        complete.then_some(RestorePoint { checkpoint, states })
    }
}

impl SnapshotSink for MemorySnapshots {
    fn snapshot(&self, snapshot: TaskSnapshot) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(snapshot);
    }
}

/// A complete checkpoint to resume from: every task's state, by task index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestorePoint {
    /// The checkpoint id; the restarted attempt numbers its next checkpoint above it.
    pub checkpoint: u64,
    /// State by task index.
    pub states: BTreeMap<u32, Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(task: u32, checkpoint: u64, last: bool, state: &str) -> TaskSnapshot {
        TaskSnapshot {
            task,
            checkpoint,
            last,
            state: state.as_bytes().to_vec(),
        }
    }

    fn state_of(point: &RestorePoint, task: u32) -> &str {
        std::str::from_utf8(&point.states[&task]).unwrap()
    }

    #[test]
    fn a_final_report_stands_only_for_later_checkpoints() {
        let memory = MemorySnapshots::new();
        memory.snapshot(snap(0, 1, false, "at 1"));
        memory.snapshot(snap(1, 1, false, "at 1"));
        // Task 0 finishes after barrier 1, re-reporting it with its final state.
        memory.snapshot(snap(0, 1, true, "final"));

        let one = memory.restore_point(1, 2).unwrap();
        assert_eq!(state_of(&one, 0), "at 1", "the state taken at the barrier");
        assert_eq!(state_of(&one, 1), "at 1");

        assert_eq!(
            memory.restore_point(2, 2),
            None,
            "task 1 has not reported 2"
        );
        memory.snapshot(snap(1, 2, false, "at 2"));
        let two = memory.restore_point(2, 2).unwrap();
        assert_eq!(state_of(&two, 0), "final", "finished before checkpoint 2");
        assert_eq!(state_of(&two, 1), "at 2");
    }

    #[test]
    fn a_final_report_alone_does_not_complete_its_own_checkpoint() {
        let memory = MemorySnapshots::new();
        memory.snapshot(snap(0, 3, true, "final"));
        memory.snapshot(snap(1, 3, false, "at 3"));
        assert_eq!(memory.restore_point(3, 2), None);
        // Tasks outside `0..tasks` do not make up for a missing one.
        memory.snapshot(snap(7, 3, false, "at 3"));
        assert_eq!(memory.restore_point(3, 2), None);
        memory.snapshot(snap(1, 4, false, "at 4"));
        let four = memory.restore_point(4, 2).unwrap();
        assert_eq!(state_of(&four, 0), "final");
        assert_eq!(four.states.len(), 2, "only tasks of the job");
    }
}
