//! The operator trait: user logic free of I/O and threads.

use std::time::Instant;

use crate::batch::Record;
use crate::edge::{Input, Output};
use crate::error::EngineError;
use crate::task::{TaskId, TaskMetrics, TaskWaker};

/// What an operator tells the task loop after one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// More work is ready: run again in the worker's next round. Do not return this while
    /// waiting on a full output (that would spin); return [`Status::BlockedOnOutput`].
    Ready,
    /// Nothing to do until an input receives data (or ends).
    BlockedOnInput,
    /// An output is full; run again when the consumer frees space.
    BlockedOnOutput,
    /// Run again at this instant (or earlier, if input arrives or a wake-up comes).
    WaitUntil(Instant),
    /// Run again only when woken through the [`TaskWaker`], or when input is pushed after
    /// this return. Input already queued does not run the task again: an operator that leaves
    /// its input on purpose (waiting for room elsewhere, or for a barrier) waits for its waker
    /// instead of being run every round.
    Idle,
    /// Done: buffered output is flushed, then the task ends and downstream inputs finish.
    Finished,
}

/// What an invocation may use besides its inputs and outputs.
#[derive(Debug)]
pub struct Context<'a> {
    pub(crate) now: Instant,
    pub(crate) task: TaskId,
    pub(crate) waker: &'a TaskWaker,
    pub(crate) metrics: &'a TaskMetrics,
    pub(crate) draining: bool,
}

impl Context<'_> {
    /// The engine clock's time at this invocation.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// This task's id.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// A handle that makes this task runnable from any thread (e.g. for external events).
    pub fn waker(&self) -> &TaskWaker {
        self.waker
    }

    /// This task's metrics.
    pub fn metrics(&self) -> &TaskMetrics {
        self.metrics
    }

    /// True while the engine drains for shutdown: sources should stop producing and return
    /// [`Status::Finished`] so that downstream tasks finish after consuming what is queued. A
    /// bounded source whose consumers must see all of it (or know they did not) should fail
    /// instead, which aborts its outputs.
    pub fn is_draining(&self) -> bool {
        self.draining
    }
}

/// User logic of a task.
///
/// The engine calls [`Operator::run`] on the task's worker thread whenever the task is
/// runnable. `run` must not block: it consumes what its inputs hold, pushes to its outputs
/// while they have capacity, and returns a [`Status`]. A source has no inputs (use
/// `type In = ()`), a sink no outputs (use `type Out = ()`). Returning `Err` (or panicking)
/// fails only this task; the failure is reported as
/// [`TaskEvent::Failed`](crate::TaskEvent::Failed).
///
/// An input ends ([`Input::is_finished`](crate::Input::is_finished)) only when its producer
/// finished normally. One whose producer failed, was cancelled or lost its stream says so in
/// [`Input::upstream_aborted`](crate::Input::upstream_aborted) (and wakes the task) and never
/// ends: an operator should check it and fail, as
/// [`Forward`](crate::operators::Forward) does, rather than wait.
pub trait Operator: Send + 'static {
    /// Input record type (all inputs share it).
    type In: Record;
    /// Output record type (all outputs share it).
    type Out: Record;

    /// Does a bounded amount of work.
    fn run(
        &mut self,
        inputs: &mut [Input<Self::In>],
        outputs: &mut [Output<Self::Out>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError>;
}
