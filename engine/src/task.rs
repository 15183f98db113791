//! Tasks: an operator with its inputs and outputs, placed on one worker, plus the handles
//! used to control and observe it from other threads.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::edge::{EdgeShared, Input, Notify, Output, OutputState};
use crate::error::EngineError;
use crate::operator::{Context, Operator, Status};
use crate::worker::WorkerShared;

/// Engine-wide unique task identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task-{}", self.0)
    }
}

static NEXT_TASK_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_task_id() -> TaskId {
    TaskId(NEXT_TASK_ID.fetch_add(1, Ordering::Relaxed))
}

/// Lifecycle state of a task as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TaskState {
    /// Spawned, not yet picked up by its worker.
    Starting = 0,
    /// Running (or waiting for work).
    Running = 1,
    /// Paused: the operator is not invoked until resumed.
    Paused = 2,
    /// The operator finished; buffered output is being flushed.
    Finishing = 3,
    /// Ended normally.
    Finished = 4,
    /// Ended by an operator error or panic.
    Failed = 5,
    /// Ended by cancellation.
    Cancelled = 6,
}

impl TaskState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Running,
            2 => Self::Paused,
            3 => Self::Finishing,
            4 => Self::Finished,
            5 => Self::Failed,
            _ => Self::Cancelled,
        }
    }

    /// Whether the task has ended (finished, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Failed | Self::Cancelled)
    }
}

/// Lifecycle reports, delivered on the engine's event channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// The task was placed on its worker.
    Started {
        /// The task.
        task: TaskId,
        /// The worker index.
        worker: usize,
    },
    /// The task was paused.
    Paused {
        /// The task.
        task: TaskId,
    },
    /// The task was resumed.
    Resumed {
        /// The task.
        task: TaskId,
    },
    /// The operator finished and all its output was delivered.
    Finished {
        /// The task.
        task: TaskId,
    },
    /// The operator returned an error or panicked; only this task ended.
    Failed {
        /// The task.
        task: TaskId,
        /// What went wrong.
        error: EngineError,
    },
    /// The task was cancelled.
    Cancelled {
        /// The task.
        task: TaskId,
    },
}

impl TaskEvent {
    /// The task this event is about.
    pub fn task(&self) -> TaskId {
        match self {
            Self::Started { task, .. }
            | Self::Paused { task }
            | Self::Resumed { task }
            | Self::Finished { task }
            | Self::Failed { task, .. }
            | Self::Cancelled { task } => *task,
        }
    }
}

/// Per-task counters, updated by the worker and readable from any thread.
pub struct TaskMetrics {
    records_in: AtomicU64,
    records_out: AtomicU64,
    batches_in: AtomicU64,
    batches_out: AtomicU64,
    busy_ns: AtomicU64,
    blocked_ns: AtomicU64,
    idle_ns: AtomicU64,
    invocations: AtomicU64,
    inputs: Vec<Arc<EdgeShared>>,
}

/// A point-in-time copy of [`TaskMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Records popped from inputs.
    pub records_in: u64,
    /// Records delivered to output queues.
    pub records_out: u64,
    /// Batches popped from inputs.
    pub batches_in: u64,
    /// Batches delivered to output queues.
    pub batches_out: u64,
    /// Batches waiting in the task's input queues now.
    pub queue_depth: usize,
    /// Time spent running the task: inside the operator, plus the engine's bookkeeping
    /// since the invocation before it on the same worker (mostly that task's output flush).
    pub busy: Duration,
    /// Time spent blocked on a full output (backpressure).
    pub blocked: Duration,
    /// Time spent waiting for input, a timer or a wake-up.
    pub idle: Duration,
    /// Operator invocations.
    pub invocations: u64,
}

impl TaskMetrics {
    pub(crate) fn new(inputs: Vec<Arc<EdgeShared>>) -> Self {
        Self {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            batches_in: AtomicU64::new(0),
            batches_out: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
            invocations: AtomicU64::new(0),
            inputs,
        }
    }

    pub(crate) fn count_in(&self, records: usize) {
        self.batches_in.fetch_add(1, Ordering::Relaxed);
        self.records_in.fetch_add(records as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_out(&self, records: usize) {
        self.batches_out.fetch_add(1, Ordering::Relaxed);
        self.records_out
            .fetch_add(records as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_busy(&self, d: Duration) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.busy_ns.fetch_add(nanos(d), Ordering::Relaxed);
    }

    pub(crate) fn add_wait(&self, kind: WaitKind, d: Duration) {
        let counter = match kind {
            WaitKind::Blocked => &self.blocked_ns,
            WaitKind::Idle => &self.idle_ns,
        };
        counter.fetch_add(nanos(d), Ordering::Relaxed);
    }

    /// Records popped from inputs so far.
    pub fn records_in(&self) -> u64 {
        self.records_in.load(Ordering::Relaxed)
    }

    /// Records delivered to output queues so far.
    pub fn records_out(&self) -> u64 {
        self.records_out.load(Ordering::Relaxed)
    }

    /// Batches waiting in the task's input queues now.
    pub fn queue_depth(&self) -> usize {
        self.inputs.iter().map(|e| e.depth()).sum()
    }

    /// All counters at once.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            records_in: self.records_in(),
            records_out: self.records_out(),
            batches_in: self.batches_in.load(Ordering::Relaxed),
            batches_out: self.batches_out.load(Ordering::Relaxed),
            queue_depth: self.queue_depth(),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            blocked: Duration::from_nanos(self.blocked_ns.load(Ordering::Relaxed)),
            idle: Duration::from_nanos(self.idle_ns.load(Ordering::Relaxed)),
            invocations: self.invocations.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for TaskMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Why a task is not runnable, for time accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitKind {
    Blocked,
    Idle,
}

pub(crate) const CONTROL_RUN: u8 = 0;
pub(crate) const CONTROL_PAUSE: u8 = 1;
pub(crate) const CONTROL_CANCEL: u8 = 2;

/// Slot index meaning "not placed on the worker (yet, or any more)".
pub(crate) const NO_SLOT: usize = usize::MAX;

/// State of one task shared between its worker and every handle to it.
pub(crate) struct TaskShared {
    pub(crate) id: TaskId,
    pub(crate) name: String,
    pub(crate) worker: Arc<WorkerShared>,
    /// Set while a run-queue entry for this task is pending.
    pub(crate) notified: AtomicBool,
    /// Index in the worker's slot table, or [`NO_SLOT`].
    pub(crate) slot: AtomicUsize,
    pub(crate) control: AtomicU8,
    pub(crate) state: AtomicU8,
    /// Why the task failed; set before `state` becomes [`TaskState::Failed`].
    pub(crate) failure: OnceLock<String>,
    pub(crate) metrics: Arc<TaskMetrics>,
}

impl TaskShared {
    pub(crate) fn set_state(&self, state: TaskState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

/// Makes a task runnable from any thread. Cheap to clone; waking an already runnable task
/// does nothing.
#[derive(Clone)]
pub struct TaskWaker {
    pub(crate) shared: Arc<TaskShared>,
}

impl TaskWaker {
    /// Puts the task on its worker's run queue (once) and unparks the worker.
    pub fn wake(&self) {
        if !self.shared.notified.swap(true, Ordering::AcqRel) {
            self.shared.worker.schedule(self.shared.clone());
        }
    }

    /// The task this waker wakes.
    pub fn task(&self) -> TaskId {
        self.shared.id
    }
}

impl Notify for TaskWaker {
    fn notify(&self) {
        self.wake();
    }
}

impl fmt::Debug for TaskWaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TaskWaker").field(&self.shared.id).finish()
    }
}

/// Controls and observes one task from any thread.
#[derive(Clone)]
pub struct TaskHandle {
    pub(crate) shared: Arc<TaskShared>,
}

impl TaskHandle {
    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.shared.id
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The worker index the task lives on.
    pub fn worker(&self) -> usize {
        self.shared.worker.index
    }

    /// Current lifecycle state.
    pub fn state(&self) -> TaskState {
        TaskState::from_u8(self.shared.state.load(Ordering::Acquire))
    }

    /// Why the task failed: the error's message, present whenever [`TaskHandle::state`]
    /// returned [`TaskState::Failed`] (it is set first), so a reader of the state never has
    /// to wait for the [`TaskEvent::Failed`] event to say why.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failure.get().map(String::as_str)
    }

    /// Stops invoking the operator until [`TaskHandle::resume`]. Queued input stays queued
    /// (upstream fills the queue and then blocks).
    pub fn pause(&self) {
        self.request(CONTROL_PAUSE);
    }

    /// Resumes a paused task.
    pub fn resume(&self) {
        self.request(CONTROL_RUN);
    }

    /// Ends the task: its operator is dropped without flushing, downstream inputs end with
    /// [`Input::upstream_aborted`] set.
    pub fn cancel(&self) {
        self.shared.control.store(CONTROL_CANCEL, Ordering::Release);
        self.waker().wake();
    }

    fn request(&self, control: u8) {
        let _ = self.shared.control.compare_exchange(
            if control == CONTROL_RUN {
                CONTROL_PAUSE
            } else {
                CONTROL_RUN
            },
            control,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.waker().wake();
    }

    /// A waker for this task.
    pub fn waker(&self) -> TaskWaker {
        TaskWaker {
            shared: self.shared.clone(),
        }
    }

    /// The task's live metrics.
    pub fn metrics(&self) -> &TaskMetrics {
        &self.shared.metrics
    }
}

impl fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish()
    }
}

/// Everything needed to start a task: a name, the operator, its edges and (optionally) a
/// worker to place it on.
pub struct TaskSpec<O: Operator> {
    pub(crate) name: String,
    pub(crate) operator: O,
    pub(crate) inputs: Vec<Input<O::In>>,
    pub(crate) outputs: Vec<Output<O::Out>>,
    pub(crate) worker: Option<usize>,
}

impl<O: Operator> TaskSpec<O> {
    /// A task with no edges yet.
    pub fn new(name: impl Into<String>, operator: O) -> Self {
        Self {
            name: name.into(),
            operator,
            inputs: Vec::new(),
            outputs: Vec::new(),
            worker: None,
        }
    }

    /// Adds an input; its index is the number of inputs added before it.
    pub fn input(mut self, input: Input<O::In>) -> Self {
        self.inputs.push(input);
        self
    }

    /// Adds an output; its index is the number of outputs added before it.
    pub fn output(mut self, output: Output<O::Out>) -> Self {
        self.outputs.push(output);
        self
    }

    /// Places the task on this worker index (default: round-robin).
    pub fn on_worker(mut self, worker: usize) -> Self {
        self.worker = Some(worker);
        self
    }
}

impl<O: Operator> fmt::Debug for TaskSpec<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSpec")
            .field("name", &self.name)
            .field("inputs", &self.inputs.len())
            .field("outputs", &self.outputs.len())
            .field("worker", &self.worker)
            .finish()
    }
}

/// What the worker does with a task after an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Run again in the next round.
    Requeue,
    /// Wait for a wake-up, and for the deadline if any.
    Wait(WaitKind, Option<Instant>),
}

/// A task with its operator type erased, as stored by the worker.
pub(crate) trait Runnable: Send {
    fn invoke(&mut self, cx: &mut Context<'_>) -> Result<Status, EngineError>;
    fn take_error(&mut self) -> Option<EngineError>;
    /// Applies the output batching policy and decides when to run next.
    fn settle(&mut self, now: Instant, status: Status) -> Next;
    /// Flushes everything; true when nothing is left buffered.
    fn flush_all(&mut self, now: Instant) -> bool;
    fn is_source(&self) -> bool;
    /// Marks downstream edges as aborted (failure or cancellation).
    fn abort(&mut self);
}

pub(crate) struct Task<O: Operator> {
    pub(crate) operator: O,
    pub(crate) inputs: Vec<Input<O::In>>,
    pub(crate) outputs: Vec<Output<O::Out>>,
}

impl<O: Operator> Runnable for Task<O> {
    fn invoke(&mut self, cx: &mut Context<'_>) -> Result<Status, EngineError> {
        for out in &mut self.outputs {
            out.set_now(cx.now);
            // Give the operator the room that freed up since it last ran.
            out.flush_stalled();
        }
        self.operator.run(&mut self.inputs, &mut self.outputs, cx)
    }

    fn take_error(&mut self) -> Option<EngineError> {
        self.outputs.iter_mut().find_map(Output::take_error)
    }

    fn settle(&mut self, now: Instant, status: Status) -> Next {
        let mut deadline: Option<Instant> = None;
        let mut blocked = false;
        for out in &mut self.outputs {
            match out.settle(now) {
                OutputState::Clear => {}
                OutputState::Linger(at) => deadline = Some(deadline.map_or(at, |d| d.min(at))),
                OutputState::Blocked => blocked = true,
            }
        }
        let merge = |d: Option<Instant>, at: Instant| Some(d.map_or(at, |d: Instant| d.min(at)));
        match status {
            Status::Ready => Next::Requeue,
            Status::BlockedOnOutput if !blocked => Next::Requeue,
            Status::BlockedOnOutput => Next::Wait(WaitKind::Blocked, deadline),
            Status::WaitUntil(at) if at <= now => Next::Requeue,
            other => {
                // Register as waiting on every input, so that the next push wakes the task;
                // a held input's queue is left alone on purpose.
                let mut queued = false;
                for input in self.inputs.iter().filter(|i| !i.is_held()) {
                    queued |= input.register_waiting();
                }
                // Waiting for input or a timer, data already queued (it raced in after the
                // operator looked) means run again. An idle task returned `Idle` with that
                // data there on purpose: it waits for its waker, or for input pushed from
                // now on, rather than being run again every round for as long as it stalls.
                if queued && other != Status::Idle {
                    return Next::Requeue;
                }
                let deadline = match other {
                    Status::WaitUntil(at) => merge(deadline, at),
                    _ => deadline,
                };
                let kind = if blocked {
                    WaitKind::Blocked
                } else {
                    WaitKind::Idle
                };
                Next::Wait(kind, deadline)
            }
        }
    }

    fn flush_all(&mut self, now: Instant) -> bool {
        let mut done = true;
        for out in &mut self.outputs {
            out.set_now(now);
            done &= out.flush_to_the_end();
        }
        done
    }

    fn is_source(&self) -> bool {
        self.inputs.is_empty()
    }

    fn abort(&mut self) {
        for out in &mut self.outputs {
            out.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::testkit::settle;
    use crate::{EdgeConfig, Input, Park, Worker, edge};

    /// Takes nothing while `stalled` (returning `Idle` with its input queued, as a sink whose
    /// writer is full does); otherwise drains its input.
    struct Stall {
        stalled: Arc<AtomicBool>,
        taken: Arc<AtomicUsize>,
    }

    impl Operator for Stall {
        type In = u64;
        type Out = ();
        fn run(
            &mut self,
            inputs: &mut [Input<u64>],
            _: &mut [Output<()>],
            _: &mut Context<'_>,
        ) -> Result<Status, EngineError> {
            if self.stalled.load(Ordering::SeqCst) {
                return Ok(Status::Idle);
            }
            while inputs[0].pop().is_some() {
                self.taken.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Status::BlockedOnInput)
        }
    }

    #[test]
    fn an_idle_task_with_queued_input_waits_for_its_wake_up() {
        let clock = ManualClock::new();
        let (tx, _events) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(clock.clone()), tx);
        let config = EdgeConfig {
            capacity: 8,
            batch_size: 1,
            ..EdgeConfig::default()
        };
        let (mut feed, input) = edge::<u64>(&config).unwrap();
        feed.push(1).unwrap();
        let stalled = Arc::new(AtomicBool::new(true));
        let taken = Arc::new(AtomicUsize::new(0));
        let task = worker
            .handle()
            .spawn(
                TaskSpec::new(
                    "stall",
                    Stall {
                        stalled: stalled.clone(),
                        taken: taken.clone(),
                    },
                )
                .input(input),
            )
            .unwrap();

        let first = worker.step(clock.now());
        assert_eq!(first.ran, 1, "a new task runs once");
        assert_eq!(first.park(), Park::Indefinitely, "idle, not requeued");
        for _ in 0..3 {
            clock.advance(Duration::from_millis(1));
            assert_eq!(worker.step(clock.now()).ran, 0, "not run again until woken");
        }
        assert_eq!(task.metrics().snapshot().invocations, 1);
        assert_eq!(task.metrics().queue_depth(), 1, "the input is still queued");

        // Its waker runs it (once).
        task.waker().wake();
        assert_eq!(worker.step(clock.now()).ran, 1);
        assert_eq!(worker.step(clock.now()).ran, 0);

        // Input pushed after it went idle wakes it, as `Status::Idle` says.
        feed.push(2).unwrap();
        let pushed = worker.step(clock.now());
        assert_eq!(pushed.ran, 1, "the new batch woke it");
        assert_eq!(worker.step(clock.now()).ran, 0);

        // Out of its stall and woken, it takes what waited.
        stalled.store(false, Ordering::SeqCst);
        task.waker().wake();
        settle(&mut worker, clock.now());
        assert_eq!(taken.load(Ordering::SeqCst), 2);
        assert_eq!(task.metrics().snapshot().invocations, 4);
    }
}
