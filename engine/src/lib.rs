//! # microcosm-engine
//!
//! Runs the tasks of a job inside an executor: per-core task loops, zero-copy record batches
//! and latency-bounded batching. It is built like timely-dataflow's worker — synchronous
//! loops that run runnable tasks and **park** when idle — not like a pool of spinning
//! futures, and it knows nothing about networking (remote edges go through the [`Exchange`]
//! trait).
//!
//! ## Pieces
//! - **Records and batches** ([`Record`], [`OwnedBatch`], [`SealedBatch`], [`Batch`]):
//!   in-process edges move `Vec`-backed batches by pointer and recycle their buffers; batches
//!   from the network are rkyv archives validated once and read in place.
//! - **Operators** ([`Operator`], [`Status`], [`Context`]): user logic without I/O or
//!   threads. Errors and panics fail only their task and are reported as
//!   [`TaskEvent::Failed`].
//! - **Edges** ([`edge`], [`Input`], [`Output`], [`inbound_edge`], [`InboundHandle`]):
//!   bounded queues with wake-ups both ways (backpressure, no lost wake-ups) and
//!   latency-bounded batching: a batch is sent when full, when the consumer's queue is empty,
//!   or when the linger bound ([`EdgeConfig::linger`], default 50 µs) has passed.
//! - **Workers** ([`Worker`], [`StepOutcome`], [`Park`]): the task loop as a steppable
//!   core, `step(now) -> StepOutcome`, driven deterministically in tests with a
//!   [`ManualClock`], or by [`Engine`] threads that park between steps.
//! - **Reactors** ([`Reactor`]): an I/O event loop (the executor's QUIC data plane) may
//!   share worker 0's thread — turned between steps, blocked in when idle — so network I/O
//!   and tasks hand batches to each other without waking another thread.
//! - **Checkpoints** ([`SnapshotSink`], [`TaskSnapshot`], [`RestorePoint`]): how a task hands
//!   over its part of a consistent checkpoint and gets it back after a restart; the cut
//!   itself is the job's business (the demo job sends barrier records with its data).
//! - **Lifecycle and metrics** ([`TaskHandle`], [`TaskMetrics`]): pause, resume, cancel,
//!   drain on shutdown; counters readable from any thread.
//!
//! ## Example: source → map → sink on two workers
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::time::Duration;
//! use microcosm_engine::{
//!     edge, Batch, Context, EdgeConfig, Engine, EngineConfig, EngineError, Input, Operator,
//!     Output, Status, TaskEvent, TaskSpec,
//! };
//!
//! /// Emits 0..n, then finishes.
//! struct Count { next: u64, n: u64 }
//! impl Operator for Count {
//!     type In = ();
//!     type Out = u64;
//!     fn run(&mut self, _: &mut [Input<()>], out: &mut [Output<u64>], _: &mut Context<'_>)
//!         -> Result<Status, EngineError> {
//!         while self.next < self.n {
//!             if out[0].push(self.next).is_err() {
//!                 return Ok(Status::BlockedOnOutput);
//!             }
//!             self.next += 1;
//!         }
//!         Ok(Status::Finished)
//!     }
//! }
//!
//! /// Doubles every record.
//! struct Double;
//! impl Operator for Double {
//!     type In = u64;
//!     type Out = u64;
//!     fn run(&mut self, inp: &mut [Input<u64>], out: &mut [Output<u64>], _: &mut Context<'_>)
//!         -> Result<Status, EngineError> {
//!         while let Some(batch) = inp[0].pop() {
//!             let Batch::Owned(batch) = batch else {
//!                 return Err(EngineError::operator("expected in-process batches"));
//!             };
//!             for &x in batch.iter() {
//!                 // A real operator keeps its place when the output is full; this one
//!                 // keeps the output large enough instead (capacity 64 batches).
//!                 if out[0].push(x * 2).is_err() {
//!                     return Err(EngineError::operator("output full"));
//!                 }
//!             }
//!         }
//!         Ok(if inp[0].is_finished() { Status::Finished } else { Status::BlockedOnInput })
//!     }
//! }
//!
//! /// Sums what it receives.
//! struct Sum(Arc<AtomicU64>);
//! impl Operator for Sum {
//!     type In = u64;
//!     type Out = ();
//!     fn run(&mut self, inp: &mut [Input<u64>], _: &mut [Output<()>], _: &mut Context<'_>)
//!         -> Result<Status, EngineError> {
//!         if inp[0].upstream_aborted() {
//!             // An aborted input never ends: fail rather than wait.
//!             return Err(EngineError::operator("the upstream failed"));
//!         }
//!         while let Some(batch) = inp[0].pop() {
//!             let batch = batch.into_owned()?;
//!             self.0.fetch_add(batch.iter().sum::<u64>(), Ordering::Relaxed);
//!         }
//!         Ok(if inp[0].is_finished() { Status::Finished } else { Status::BlockedOnInput })
//!     }
//! }
//!
//! # fn main() -> Result<(), EngineError> {
//! let engine = Engine::start(EngineConfig::with_workers(2))?;
//! let events = engine.events();
//! let config = EdgeConfig { capacity: 64, batch_size: 256, ..EdgeConfig::default() };
//! let (a_out, a_in) = edge::<u64>(&config)?;
//! let (b_out, b_in) = edge::<u64>(&config)?;
//! let total = Arc::new(AtomicU64::new(0));
//! engine.spawn(TaskSpec::new("count", Count { next: 0, n: 1000 }).output(a_out).on_worker(0))?;
//! engine.spawn(TaskSpec::new("double", Double).input(a_in).output(b_out))?;
//! let sink = engine.spawn(TaskSpec::new("sum", Sum(total.clone())).input(b_in))?;
//! loop {
//!     match events.recv_timeout(Duration::from_secs(10)).expect("pipeline finishes") {
//!         TaskEvent::Finished { task } if task == sink.id() => break,
//!         TaskEvent::Failed { error, .. } => return Err(error),
//!         _ => {}
//!     }
//! }
//! assert_eq!(total.load(Ordering::Relaxed), 2 * (0..1000u64).sum::<u64>());
//! assert!(engine.shutdown(Duration::from_secs(1)).drained);
//! # Ok(())
//! # }
//! ```

mod batch;
pub mod checkpoint;
mod clock;
mod edge;
mod engine;
mod error;
mod exchange;
pub mod graph;
mod operator;
pub mod operators;
pub mod reactor;
pub mod spin;
mod task;
#[cfg(test)]
mod testkit;
mod worker;

pub use batch::{ArchivedRecords, Batch, OwnedBatch, Record, SealedBatch};
pub use checkpoint::{MemorySnapshots, RestorePoint, SnapshotSink, TaskSnapshot};
pub use clock::{Clock, ManualClock, SystemClock};
pub use edge::{
    DEFAULT_LINGER, EdgeConfig, InboundHandle, InboundRejected, Input, Notify, Output, edge,
    inbound_edge,
};
pub use engine::{
    Engine, EngineConfig, ShutdownReport, disable_transparent_huge_pages, precise_timers,
    transparent_huge_pages_disabled, wait_finished,
};
pub use error::EngineError;
pub use exchange::{EdgeAddress, Exchange, ExchangeSender, MemoryExchange, Rejected};
pub use graph::{EdgeNode, JobGraph, TaskNode};
pub use operator::{Context, Operator, Status};
pub use reactor::{Reactor, SleepMeter, SleepSlot, ThreadParker, Unparker};
pub use spin::{SpinGovernor, SpinMode};
pub use task::{
    MetricsSnapshot, TaskEvent, TaskHandle, TaskId, TaskMetrics, TaskSpec, TaskState, TaskWaker,
};
pub use worker::{Park, StepOutcome, Worker, WorkerHandle};

/// Re-export of the rkyv version the engine is built against.
pub use rkyv;
