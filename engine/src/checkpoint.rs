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
    /// The task has finished: this state also stands for every later checkpoint.
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
    pub fn restore_point(&self, checkpoint: u64, tasks: u32) -> Option<RestorePoint> {
        let mut states = BTreeMap::new();
        for s in self.taken() {
            if s.checkpoint == checkpoint || (s.last && s.checkpoint < checkpoint) {
                states.insert(s.task, s.state);
            }
        }
        (states.len() == tasks as usize).then_some(RestorePoint { checkpoint, states })
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
