//! Consistent checkpoints of the demo job: what each task snapshots, and why the cut is
//! consistent.
//!
//! ## The protocol (aligned barriers, as in Chandy–Lamport and Flink)
//! - Every producer sends checkpoint barrier `n` ([`DemoRecord::checkpoint`]) to every
//!   stream once per `checkpoint-interval-ms`, between records. Barriers are sent at the
//!   boundaries of wall-clock slots (Unix time divided by the interval) with the slot as the
//!   id, so all producers send the same ids at nearly the same moment and binlogs wait
//!   little to align them; ids only grow, across restarts too (always above the checkpoint
//!   restored from). A producer that fell behind skips the slots it missed, and those
//!   checkpoints are abandoned. Its snapshot is taken as it sends: the next pk to emit (the
//!   schema version follows from it) and the pacing schedule.
//! - A binlog **aligns**: once barrier `n` arrived on one input it takes nothing more from
//!   that input until barrier `n` arrived on every input that has not finished. It then
//!   appends one barrier `n` to its log, snapshots the log position and forwards the
//!   barrier. Its log up to the barrier therefore holds exactly what each producer sent
//!   before its own barrier `n`.
//! - A receiver snapshots the log position it has read up to (the barrier included).
//! - A syncer forwards barrier `n` only after every record before it has passed the DDL
//!   barrier; while a DDL before the barrier is still held it takes no record that comes
//!   after the barrier. Its snapshot is the per-table watermark of released DDLs.
//! - A sink snapshots its file's length at barrier `n`; its file writer reports the snapshot
//!   once everything before the barrier is written and fsynced ([`crate::sinkwriter`]).
//!
//! A checkpoint is complete when every task has snapshotted it (a task that finished stands
//! for every later checkpoint with its last state); the masters then commit it.
//!
//! ## Recovery
//! The whole job restarts under a new epoch from the last committed checkpoint: producers
//! resume at their next pk on their old schedule (the outage shows as latency, not as lost
//! records), binlogs start an empty log at their checkpointed position, receivers expect
//! exactly that position ([`RecordKind::StreamStart`](crate::RecordKind::StreamStart) checks
//! it), and sinks truncate their files to the committed length when they claim them (the
//! fence next to each file names the owning job and epoch, so an older attempt or an older
//! job writing to the same directory cannot append after that: see [`crate::fence`]).
//! Whole-job rather than regional restart: every binlog is fed by every producer, so a lost
//! executor always touches a region that spans the whole graph anyway, and one rule keeps
//! recovery simple to reason about.
//!
//! ## Why the DDL barrier and checkpoint barriers cannot deadlock
//! Producers send DDLs and checkpoint barriers to every stream in their own order, and
//! binlogs align, so a DDL is before checkpoint `n` on one stream exactly when it is before
//! checkpoint `n` on every stream. A syncer stops taking records only *after* a checkpoint
//! barrier while holding a DDL *before* it; that DDL's counterparts are before the barrier on
//! every other stream too, so every syncer reaches them and releases it. Nothing waits for a
//! checkpoint to *complete*, and binlogs never stop reading because of a held DDL (syncers
//! keep taking records of other tables), so neither barrier can wait on the other.

use std::collections::BTreeMap;
use std::sync::Arc;

use microcosm_engine::{MemorySnapshots, SnapshotSink, TaskSnapshot};
use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::record::DemoRecord;

/// Why a task's saved state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The bytes do not decode as a demo task state.
    #[error("task {task}: checkpoint state does not decode: {reason}")]
    Decode {
        /// Task index.
        task: u32,
        /// What was wrong.
        reason: String,
    },
    /// The state belongs to another kind of task.
    #[error("task {task} ({kind}): checkpoint holds the state of a {found}")]
    WrongKind {
        /// Task index.
        task: u32,
        /// The task's kind.
        kind: String,
        /// The kind of state found.
        found: &'static str,
    },
    /// The restore point has no state for a task.
    #[error("checkpoint {checkpoint} has no state for task {task} ({kind})")]
    Missing {
        /// The checkpoint.
        checkpoint: u64,
        /// Task index.
        task: u32,
        /// The task's kind.
        kind: String,
    },
}

/// The saved state of one demo task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// A producer: `next_pk` is the first pk it has not sent; `start_unix_ns` anchors its
    /// pacing schedule (0 when unpaced or not yet started).
    Producer {
        /// First pk not yet emitted.
        next_pk: u64,
        /// Unix ns of the schedule's start.
        start_unix_ns: u64,
    },
    /// A binlog: records (barriers included) appended to its log.
    Binlog {
        /// The log position.
        position: u64,
    },
    /// A receiver: log positions read.
    Receive {
        /// The position read up to.
        position: u64,
    },
    /// A syncer: per table, the highest DDL version released.
    Syncer {
        /// Table → version.
        released: BTreeMap<u32, u32>,
    },
    /// A sink: the file's committed length and rows.
    Sink {
        /// Bytes of the file covered by the checkpoint.
        length: u64,
        /// Rows in those bytes.
        rows: u64,
    },
}

impl TaskState {
    /// Encodes the state (postcard).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain integers and maps into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes task `task`'s state.
    pub fn decode(task: u32, bytes: &[u8]) -> Result<TaskState, StateError> {
        postcard::from_bytes(bytes).map_err(|e| StateError::Decode {
            task,
            reason: e.to_string(),
        })
    }

    /// The kind of task this state belongs to.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskState::Producer { .. } => "producer",
            TaskState::Binlog { .. } => "binlog",
            TaskState::Receive { .. } => "receive",
            TaskState::Syncer { .. } => "syncer",
            TaskState::Sink { .. } => "sink",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_garbage_is_an_error() {
        let states = [
            TaskState::Producer {
                next_pk: 17,
                start_unix_ns: 1_700_000_000_000_000_000,
            },
            TaskState::Binlog { position: 9 },
            TaskState::Receive { position: 9 },
            TaskState::Syncer {
                released: BTreeMap::from([(1, 4), (2, 3)]),
            },
            TaskState::Sink {
                length: 4096,
                rows: 50,
            },
        ];
        for s in states {
            assert_eq!(TaskState::decode(0, &s.encode()).unwrap(), s);
        }
        let err = TaskState::decode(3, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.to_string().contains("task 3"), "{err}");
    }
}

/// Where one task sends its snapshots: its graph index and the job's [`SnapshotSink`].
#[derive(Clone)]
pub struct Snapshots {
    task: u32,
    sink: Arc<dyn SnapshotSink>,
}

impl Snapshots {
    /// Snapshots of task `task`, handed to `sink`.
    pub fn new(task: u32, sink: Arc<dyn SnapshotSink>) -> Snapshots {
        Snapshots { task, sink }
    }

    /// Snapshots that are kept in memory and otherwise ignored (tests, tools).
    pub fn in_memory(task: u32) -> (Snapshots, Arc<MemorySnapshots>) {
        let memory = Arc::new(MemorySnapshots::new());
        (Snapshots::new(task, memory.clone()), memory)
    }

    /// The task index.
    pub fn task(&self) -> u32 {
        self.task
    }

    /// Hands over the task's state for `checkpoint`; `last` when the task has finished.
    pub fn report(&self, checkpoint: u64, last: bool, state: &TaskState) {
        self.sink.snapshot(TaskSnapshot {
            task: self.task,
            checkpoint,
            last,
            state: state.encode(),
        });
    }
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("task", &self.task)
            .finish()
    }
}
