//! The per-core task loop.
//!
//! A [`Worker`] owns the tasks placed on it and runs them one round at a time with
//! [`Worker::step`], which takes the current time and returns a [`StepOutcome`] telling the
//! caller whether to run again at once, park until a deadline, or park until woken. The thread
//! wrapper in [`Engine`](crate::Engine) is just `step` then park; tests call `step` directly
//! with a [`ManualClock`](crate::ManualClock), so the loop is deterministic and needs no sleeps.
//!
//! Wake-ups come from other threads through [`TaskWaker`]s: a woken task goes on the worker's
//! crossbeam run queue (at most once, thanks to its `notified` flag) and the worker is
//! unparked. Unparking a running worker costs one atomic operation.

use std::any::Any;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::clock::Clock;
use crate::error::EngineError;
use crate::operator::{Context, Operator, Status};
use crate::reactor::{Reactor, SleepMeter, ThreadParker, Unparker};
use crate::spin::{SpinGovernor, SpinMode};
use crate::task::{
    CONTROL_CANCEL, CONTROL_PAUSE, CONTROL_RUN, NO_SLOT, Next, Runnable, Task, TaskEvent,
    TaskHandle, TaskMetrics, TaskShared, TaskSpec, TaskState, TaskWaker, WaitKind, next_task_id,
};

/// State of a worker shared with wakers and handles on other threads.
pub(crate) struct WorkerShared {
    pub(crate) index: usize,
    run_tx: Sender<Arc<TaskShared>>,
    run_rx: Receiver<Arc<TaskShared>>,
    inbox_tx: Sender<NewTask>,
    inbox_rx: Receiver<NewTask>,
    /// Wakes the thread running this worker's loop, once attached.
    unparker: OnceLock<Unparker>,
    draining: AtomicBool,
    stopping: AtomicBool,
    live: AtomicUsize,
    /// Time the worker's thread spent blocked waiting for work: marked by the worker around
    /// each park, or by the reactor around its real blocking when `reactor_measures_sleep`.
    /// Taken twice per sleep (just before it, so off the hot path) and by readers of
    /// [`WorkerHandle::asleep`].
    sleep: Arc<SleepMeter>,
    reactor_measures_sleep: AtomicBool,
    events: Sender<TaskEvent>,
}

impl WorkerShared {
    /// Queues a task whose `notified` flag the caller just set, and unparks the worker.
    pub(crate) fn schedule(&self, task: Arc<TaskShared>) {
        // The receiver lives in `self`, so the queue cannot be disconnected.
        let _ = self.run_tx.send(task);
        self.unpark();
    }

    /// Wakes the worker thread if it is parked (a single atomic operation if it is not).
    fn unpark(&self) {
        if let Some(unpark) = self.unparker.get() {
            unpark();
        }
    }

    fn emit(&self, event: TaskEvent) {
        // Nobody listening is fine: events are informational.
        let _ = self.events.send(event);
    }

    /// Ends every task still waiting in the inbox as cancelled, without placing it: for
    /// tasks spawned while the worker stopped, which its loop may never pick up. Safe from
    /// any thread, and concurrently with the worker's own `accept` (each task is taken once).
    fn cancel_unplaced(&self) {
        while let Ok(NewTask { shared, mut task }) = self.inbox_rx.try_recv() {
            tracing::debug!(task = %shared.id, name = %shared.name, worker = self.index, "task cancelled before it was placed");
            task.abort();
            shared.set_state(TaskState::Cancelled);
            // Its edges close here, so its peers see the aborted end.
            drop(task);
            self.live.fetch_sub(1, Ordering::AcqRel);
            self.emit(TaskEvent::Cancelled { task: shared.id });
        }
    }
}

struct NewTask {
    shared: Arc<TaskShared>,
    task: Box<dyn Runnable>,
}

/// Spawns tasks onto one worker from any thread.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<WorkerShared>,
}

impl WorkerHandle {
    /// The worker's index.
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// Tasks placed on this worker that have not ended.
    pub fn live_tasks(&self) -> usize {
        self.shared.live.load(Ordering::Acquire)
    }

    /// How long the worker's thread has been asleep in [`Worker::park_in`] (blocked until work
    /// or a deadline, after any spinning; a reactor's I/O work in between does not count), in
    /// total since the worker was created, a sleep in progress counting as far as it went.
    /// See [`SleepMeter`] for what it is good for.
    pub fn asleep(&self) -> Duration {
        self.shared.sleep.asleep()
    }

    /// Places a task on this worker. It runs once as soon as the worker picks it up.
    ///
    /// Fails with [`EngineError::ShutDown`] once the worker is stopping. A spawn that races
    /// with the stop may instead return a handle whose task is cancelled
    /// ([`TaskEvent::Cancelled`]); either way no task is left behind unended.
    pub fn spawn<O: Operator>(&self, spec: TaskSpec<O>) -> Result<TaskHandle, EngineError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(EngineError::ShutDown);
        }
        let (task, handle) = self.prepare(spec);
        self.submit(task);
        Ok(handle)
    }

    /// Builds a task and counts it as live; [`WorkerHandle::submit`] hands it to the worker.
    fn prepare<O: Operator>(&self, spec: TaskSpec<O>) -> (NewTask, TaskHandle) {
        let TaskSpec {
            name,
            operator,
            mut inputs,
            mut outputs,
            ..
        } = spec;
        let metrics = Arc::new(TaskMetrics::new(
            inputs.iter().map(|i| i.edge().clone()).collect(),
        ));
        let shared = Arc::new(TaskShared {
            id: next_task_id(),
            name,
            worker: self.shared.clone(),
            notified: AtomicBool::new(false),
            slot: AtomicUsize::new(NO_SLOT),
            control: AtomicU8::new(CONTROL_RUN),
            state: AtomicU8::new(TaskState::Starting as u8),
            failure: OnceLock::new(),
            metrics: metrics.clone(),
        });
        let waker = TaskWaker {
            shared: shared.clone(),
        };
        for (index, input) in inputs.iter_mut().enumerate() {
            input.bind(index, &waker, &metrics);
        }
        for output in &mut outputs {
            output.bind(&waker, &metrics);
        }
        let task = Box::new(Task {
            operator,
            inputs,
            outputs,
        });
        self.shared.live.fetch_add(1, Ordering::AcqRel);
        let handle = TaskHandle {
            shared: shared.clone(),
        };
        (NewTask { shared, task }, handle)
    }

    /// Puts a prepared task in the worker's inbox. If the worker stopped meanwhile (its last
    /// drain of the inbox may have come before this send), ends what is left there.
    fn submit(&self, task: NewTask) {
        // The receiver lives in `self.shared`, so the inbox cannot be disconnected.
        let _ = self.shared.inbox_tx.send(task);
        // Pairs with the fence in `Worker::drop`: either the worker's final drain sees this
        // task, or this sees `stopping` and cancels it.
        fence(Ordering::SeqCst);
        if self.shared.stopping.load(Ordering::Relaxed) {
            self.shared.cancel_unplaced();
        }
        self.shared.unpark();
    }

    pub(crate) fn set_draining(&self) {
        self.shared.draining.store(true, Ordering::Release);
        self.shared.unpark();
    }

    pub(crate) fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.unpark();
    }
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("index", &self.shared.index)
            .field("live_tasks", &self.live_tasks())
            .finish()
    }
}

/// What one [`Worker::step`] did and what the caller should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOutcome {
    /// Operator invocations (and flush retries) performed.
    pub ran: usize,
    /// Whether tasks are already runnable again (run queue or inbox non-empty).
    pub runnable: bool,
    /// Earliest timer (linger flush or `WaitUntil`) still pending.
    pub next_deadline: Option<Instant>,
    /// Tasks living on the worker.
    pub tasks: usize,
}

/// The parking decision derived from a [`StepOutcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// Do not park: step again at once.
    No,
    /// Park until this instant (or an earlier wake-up).
    Until(Instant),
    /// Park until woken.
    Indefinitely,
}

impl StepOutcome {
    /// Whether and how long to park after this step.
    pub fn park(&self) -> Park {
        if self.runnable {
            Park::No
        } else {
            match self.next_deadline {
                Some(at) => Park::Until(at),
                None => Park::Indefinitely,
            }
        }
    }
}

struct Slot {
    shared: Arc<TaskShared>,
    task: Box<dyn Runnable>,
    state: TaskState,
    /// The earliest timer queued for this task (later heap entries for it are stale).
    timer: Option<Instant>,
    waiting: Option<(Instant, WaitKind)>,
    source: bool,
}

/// How a task ended.
#[derive(Debug, Clone, Copy)]
enum End {
    Finished,
    Cancelled,
}

/// One per-core task loop. Not `Sync`: it is owned by its thread (or by a test).
pub struct Worker {
    shared: Arc<WorkerShared>,
    clock: Arc<dyn Clock>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    tasks: usize,
    drain_seen: bool,
    spin: SpinGovernor,
    /// When the last invocation ended (or, for a round's first task, when the round's tasks
    /// began): the next one's busy time starts here, so each invocation costs one clock
    /// reading instead of two.
    mark: Instant,
}

impl Worker {
    /// A worker with index `index` that reports lifecycle events on `events` and measures
    /// busy time with `clock`.
    pub fn new(index: usize, clock: Arc<dyn Clock>, events: Sender<TaskEvent>) -> Self {
        let (run_tx, run_rx) = crossbeam_channel::unbounded();
        let (inbox_tx, inbox_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(WorkerShared {
            index,
            run_tx,
            run_rx,
            inbox_tx,
            inbox_rx,
            unparker: OnceLock::new(),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            sleep: Arc::new(SleepMeter::default()),
            reactor_measures_sleep: AtomicBool::new(false),
            events,
        });
        Self {
            shared,
            clock,
            slots: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            tasks: 0,
            drain_seen: false,
            spin: SpinGovernor::new(Duration::ZERO, SpinMode::default()),
            mark: Instant::now(),
        }
    }

    /// Sets how long [`Worker::park`] may poll before parking, and when it does (see
    /// `EngineConfig::spin` and [`SpinMode`]).
    pub fn set_spin(&mut self, window: Duration, mode: SpinMode) {
        self.spin = SpinGovernor::new(window, mode);
    }

    /// A handle for spawning onto this worker from any thread.
    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Tasks currently placed on this worker.
    pub fn task_count(&self) -> usize {
        self.tasks
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Makes the calling thread the one that wake-ups unpark ([`ThreadParker`]). Call once,
    /// from the thread that will run [`Worker::step`] and [`Worker::park`]. Returns false if
    /// a thread or reactor was already attached.
    pub fn attach_current_thread(&self) -> bool {
        self.attach(&ThreadParker)
    }

    /// Makes wake-ups go through `reactor`'s unparker: for a worker whose thread blocks in
    /// it (see [`Worker::park_in`]). Call once, on the worker's thread, before the first
    /// step. Returns false if a thread or reactor was already attached.
    pub fn attach(&self, reactor: &dyn Reactor) -> bool {
        if self.shared.unparker.set(reactor.unparker()).is_err() {
            return false;
        }
        let measures = reactor.measure_sleep(self.shared.sleep.clone());
        self.shared
            .reactor_measures_sleep
            .store(measures, Ordering::Release);
        true
    }

    /// The other half of the loop after [`Worker::step`]: turns `reactor` if tasks are
    /// runnable, otherwise blocks in it until the outcome's deadline or a wake-up.
    ///
    /// With a spin window (`set_spin`), an idle worker first keeps turning the reactor (and
    /// polling its queues) for that long, so arriving work and wake-ups are seen without the
    /// thread going to sleep, and a timed block ends that much before the deadline, which is
    /// then awaited by spinning. In [`SpinMode::Adaptive`] it does so only while its idle
    /// periods have lately been shorter than the window (see [`crate::spin`]).
    pub fn park_in(&mut self, outcome: &StepOutcome, reactor: &mut dyn Reactor) {
        let deadline = match outcome.park() {
            Park::No => {
                reactor.turn();
                return;
            }
            Park::Until(at) => Some(at),
            Park::Indefinitely => None,
        };
        let idle_from = Instant::now();
        let spin = self.spin.idle_started();
        if !spin.is_zero() && self.poll_for(spin, deadline, &mut || reactor.turn()) {
            self.spin.idle_ended(idle_from.elapsed());
            return;
        }
        let timeout = match deadline {
            Some(at) => match at.saturating_duration_since(self.clock.now()) {
                left if left.is_zero() => {
                    reactor.turn();
                    self.spin.idle_ended(idle_from.elapsed());
                    return;
                }
                left => Some(left.saturating_sub(spin)),
            },
            None => None,
        };
        let meter = (!self.shared.reactor_measures_sleep.load(Ordering::Acquire))
            .then_some(&self.shared.sleep);
        if let Some(meter) = meter {
            meter.sleeping();
        }
        reactor.park(timeout);
        if let Some(meter) = meter {
            meter.awake();
        }
        self.spin.idle_ended(idle_from.elapsed());
    }

    /// [`Worker::park_in`] for a worker without a reactor: parks the calling (attached)
    /// thread as `outcome` says. A wake-up that arrived since the step makes this return at
    /// once; spurious returns are harmless (the caller steps again).
    pub fn park(&mut self, outcome: &StepOutcome) {
        self.park_in(outcome, &mut ThreadParker);
    }

    /// Whether something may be runnable: a queued task or wake-up, or a lifecycle request.
    fn has_work(&self) -> bool {
        !self.shared.run_rx.is_empty()
            || !self.shared.inbox_rx.is_empty()
            || self.shared.stopping.load(Ordering::Acquire)
            || (self.shared.draining.load(Ordering::Acquire) && !self.drain_seen)
    }

    /// Polls for work for at most `budget` (real time), or until `deadline` on the worker's
    /// clock, calling `turn` each round. True if work arrived or the deadline passed.
    ///
    /// Between rounds the thread yields its CPU (`sched_yield`): if another thread is
    /// runnable on the same CPU (a second worker the kernel placed there, a control-plane
    /// runtime thread, a sink's file writer) it runs now instead of waiting for the
    /// scheduler to end this spinning thread's time slice at a tick, milliseconds later
    /// (2.6 ms was seen). With nothing else runnable the call returns at once. Two workers
    /// sharing a vCPU thus take turns every round instead of every slice.
    fn poll_for(
        &self,
        budget: Duration,
        deadline: Option<Instant>,
        turn: &mut dyn FnMut(),
    ) -> bool {
        let started = Instant::now();
        loop {
            turn();
            if self.has_work() || deadline.is_some_and(|d| self.clock.now() >= d) {
                return true;
            }
            if started.elapsed() >= budget {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Runs one round: accepts new tasks, fires due timers, then runs every task that was
    /// runnable at the start of the round once. Tasks made runnable during the round run in
    /// the next one.
    pub fn step(&mut self, now: Instant) -> StepOutcome {
        self.accept();
        if self.shared.draining.load(Ordering::Acquire) && !self.drain_seen {
            self.drain_seen = true;
            self.wake_sources();
        }
        self.fire_timers(now);
        self.mark = self.clock.now();
        let budget = self.shared.run_rx.len();
        let mut ran = 0;
        for _ in 0..budget {
            let Ok(task) = self.shared.run_rx.try_recv() else {
                break;
            };
            let slot = task.slot.load(Ordering::Acquire);
            if slot == NO_SLOT {
                continue;
            }
            task.notified.store(false, Ordering::Release);
            drop(task);
            if self.run_slot(slot, now) {
                ran += 1;
            }
        }
        StepOutcome {
            ran,
            runnable: !self.shared.run_rx.is_empty() || !self.shared.inbox_rx.is_empty(),
            next_deadline: self.next_deadline(),
            tasks: self.tasks,
        }
    }

    /// Cancels every task on the worker (used when stopping).
    pub fn cancel_all(&mut self) {
        self.accept();
        for index in 0..self.slots.len() {
            if self.slots[index].is_some() {
                self.end(index, End::Cancelled);
            }
        }
    }

    fn accept(&mut self) {
        while let Ok(NewTask { shared, task }) = self.shared.inbox_rx.try_recv() {
            let index = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let source = task.is_source();
            shared.slot.store(index, Ordering::Release);
            shared.set_state(TaskState::Running);
            tracing::debug!(task = %shared.id, name = %shared.name, worker = self.shared.index, "task started");
            self.shared.emit(TaskEvent::Started {
                task: shared.id,
                worker: self.shared.index,
            });
            // A wake that raced ahead of placement may have left `notified` set with its queue
            // entry already discarded: reset it so this first run is queued.
            shared.notified.store(false, Ordering::Release);
            let waker = TaskWaker {
                shared: shared.clone(),
            };
            self.slots[index] = Some(Slot {
                shared,
                task,
                state: TaskState::Running,
                timer: None,
                waiting: None,
                source,
            });
            self.tasks += 1;
            waker.wake();
        }
    }

    fn wake_sources(&self) {
        for slot in self.slots.iter().flatten() {
            if slot.source {
                TaskWaker {
                    shared: slot.shared.clone(),
                }
                .wake();
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, index))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut)
                && slot.timer == Some(at)
            {
                slot.timer = None;
                TaskWaker {
                    shared: slot.shared.clone(),
                }
                .wake();
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, index))) = self.timers.peek() {
            let live = self
                .slots
                .get(index)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.timer == Some(at));
            if live {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs the task in `index` once. Returns whether anything was invoked.
    fn run_slot(&mut self, index: usize, now: Instant) -> bool {
        let draining = self.shared.draining.load(Ordering::Acquire);
        let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return false;
        };
        match slot.shared.control.load(Ordering::Acquire) {
            CONTROL_CANCEL => {
                self.end(index, End::Cancelled);
                return false;
            }
            // A finishing task has returned `Finished` already: it only waits for its outputs
            // to drain, and pausing it would run its operator again on resume.
            CONTROL_PAUSE if slot.state != TaskState::Finishing => {
                if slot.state != TaskState::Paused {
                    slot.state = TaskState::Paused;
                    slot.shared.set_state(TaskState::Paused);
                    self.shared.emit(TaskEvent::Paused {
                        task: slot.shared.id,
                    });
                }
                return false;
            }
            _ => {
                if slot.state == TaskState::Paused {
                    slot.state = TaskState::Running;
                    slot.shared.set_state(TaskState::Running);
                    self.shared.emit(TaskEvent::Resumed {
                        task: slot.shared.id,
                    });
                }
            }
        }
        if let Some((since, kind)) = slot.waiting.take() {
            slot.shared
                .metrics
                .add_wait(kind, now.saturating_duration_since(since));
        }
        if slot.state == TaskState::Finishing {
            let flushed = slot.task.flush_all(now);
            if let Some(error) = slot.task.take_error() {
                return self.fail(index, error);
            }
            if flushed {
                self.end(index, End::Finished);
            } else {
                slot.waiting = Some((now, WaitKind::Blocked));
            }
            return true;
        }

        let waker = TaskWaker {
            shared: slot.shared.clone(),
        };
        let mut cx = Context {
            now,
            task: slot.shared.id,
            waker: &waker,
            metrics: &slot.shared.metrics,
            draining,
        };
        let task = &mut slot.task;
        let result = catch_unwind(AssertUnwindSafe(|| task.invoke(&mut cx)));
        // Busy time runs from the previous invocation's end (or the start of the round): it
        // includes the engine's bookkeeping in between, mostly settling the previous task's
        // outputs, and leaves out the last settle of each round.
        let ended = self.clock.now();
        slot.shared
            .metrics
            .add_busy(ended.saturating_duration_since(self.mark));
        self.mark = ended;
        let status = match result {
            Ok(Ok(status)) => match slot.task.take_error() {
                None => status,
                Some(error) => return self.fail(index, error),
            },
            Ok(Err(error)) => return self.fail(index, error),
            Err(panic) => return self.fail(index, EngineError::Panicked(panic_message(&*panic))),
        };
        if status == Status::Finished {
            slot.state = TaskState::Finishing;
            slot.shared.set_state(TaskState::Finishing);
            let flushed = slot.task.flush_all(now);
            if let Some(error) = slot.task.take_error() {
                return self.fail(index, error);
            }
            if flushed {
                self.end(index, End::Finished);
            } else {
                slot.waiting = Some((now, WaitKind::Blocked));
            }
            return true;
        }
        let next = slot.task.settle(now, status);
        // Sending what the invocation left buffered can fail too (a remote edge closed).
        if let Some(error) = slot.task.take_error() {
            return self.fail(index, error);
        }
        match next {
            Next::Requeue => waker.wake(),
            Next::Wait(kind, deadline) => {
                slot.waiting = Some((now, kind));
                // Only an earlier deadline needs a new heap entry; a later one is picked up
                // when the queued timer fires early and the task re-evaluates. This keeps the
                // heap at about one entry per task.
                if let Some(at) = deadline
                    && slot.timer.is_none_or(|queued| at < queued)
                {
                    slot.timer = Some(at);
                    self.timers.push(Reverse((at, index)));
                }
            }
        }
        true
    }

    fn fail(&mut self, index: usize, error: EngineError) -> bool {
        let Some(mut slot) = self.slots.get_mut(index).and_then(Option::take) else {
            return false;
        };
        tracing::warn!(task = %slot.shared.id, name = %slot.shared.name, %error, "task failed");
        slot.task.abort();
        let task = slot.shared.id;
        // Before the state: whoever sees `Failed` finds the reason.
        let _ = slot.shared.failure.set(error.to_string());
        self.release(index, slot, TaskState::Failed);
        self.shared.emit(TaskEvent::Failed { task, error });
        true
    }

    fn end(&mut self, index: usize, end: End) {
        let Some(mut slot) = self.slots.get_mut(index).and_then(Option::take) else {
            return;
        };
        let task = slot.shared.id;
        match end {
            End::Finished => {
                tracing::debug!(task = %task, name = %slot.shared.name, "task finished");
                self.release(index, slot, TaskState::Finished);
                self.shared.emit(TaskEvent::Finished { task });
            }
            End::Cancelled => {
                tracing::debug!(task = %task, name = %slot.shared.name, "task cancelled");
                slot.task.abort();
                self.release(index, slot, TaskState::Cancelled);
                self.shared.emit(TaskEvent::Cancelled { task });
            }
        }
    }

    /// Removes a task: its edges close (waking peers) when the operator box drops.
    fn release(&mut self, index: usize, slot: Slot, state: TaskState) {
        slot.shared.slot.store(NO_SLOT, Ordering::Release);
        slot.shared.set_state(state);
        drop(slot.task);
        self.free.push(index);
        self.tasks -= 1;
        self.shared.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Refuse new spawns; pairs with the fence in `WorkerHandle::submit`, so a task sent
        // after the drain below is cancelled by its spawner.
        self.shared.stopping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.cancel_all();
        // Break `TaskShared -> WorkerShared -> run queue -> TaskShared` cycles.
        while self.shared.run_rx.try_recv().is_ok() {}
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.shared.index)
            .field("tasks", &self.tasks)
            .finish()
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::testkit::{AddOne, Collect, Counter, Faulty, Manual, drain, settle};
    use crate::{EdgeConfig, TaskSpec, edge};

    fn setup() -> (Worker, ManualClock, Receiver<TaskEvent>) {
        let clock = ManualClock::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        (Worker::new(0, Arc::new(clock.clone()), tx), clock, rx)
    }

    fn cfg(capacity: usize, batch_size: usize, linger_us: u64) -> EdgeConfig {
        EdgeConfig {
            capacity,
            batch_size,
            linger: Duration::from_micros(linger_us),
        }
    }

    /// What a [`Manual`] source emits next.
    type Feed = Arc<Mutex<VecDeque<u64>>>;

    /// A source that emits what is pushed to its feed, feeding a collecting sink, spawned on
    /// `worker`: (feed, source, sink, what the sink saw).
    fn manual_to_collect(
        worker: &Worker,
    ) -> (
        Feed,
        TaskHandle,
        TaskHandle,
        Arc<Mutex<crate::testkit::Seen>>,
    ) {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let (out, inp) = edge::<u64>(&cfg(4, 8, 50)).unwrap();
        let (sink, seen) = Collect::new();
        let h = worker.handle();
        let source = h
            .spawn(
                TaskSpec::new(
                    "src",
                    Manual {
                        queue: queue.clone(),
                    },
                )
                .output(out),
            )
            .unwrap();
        let sink = h.spawn(TaskSpec::new("sink", sink).input(inp)).unwrap();
        (queue, source, sink, seen)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_spinning_worker_lets_another_thread_on_its_cpu_run_between_rounds() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
        assert!(crate::engine::pin_current_thread(cpu));
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // A thread on the same CPU that also gives way after every look: it sees a new round
        // each time the worker let it run.
        let other = {
            let (rounds, stop) = (rounds.clone(), stop.clone());
            std::thread::spawn(move || {
                assert!(crate::engine::pin_current_thread(cpu));
                let (mut last, mut turns) = (0, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let now = rounds.load(Ordering::Relaxed);
                    if now != last {
                        (last, turns) = (now, turns + 1);
                    }
                    std::thread::yield_now();
                }
                turns
            })
        };
        let (tx, _events) = crossbeam_channel::unbounded();
        let worker = Worker::new(0, Arc::new(crate::SystemClock), tx);
        let polled = worker.poll_for(Duration::from_millis(200), None, &mut || {
            rounds.fetch_add(1, Ordering::Relaxed);
        });
        assert!(!polled, "no work arrived");
        stop.store(true, Ordering::Relaxed);
        let turns = other.join().unwrap();
        let total = rounds.load(Ordering::Relaxed);
        // Holding the CPU for whole time slices, the worker would let the other thread in
        // once per slice (milliseconds): some tens of turns against 10^5 rounds.
        assert!(
            turns * 4 >= total,
            "the other thread ran between only {turns} of {total} rounds"
        );
    }

    #[test]
    fn a_spinning_worker_sees_work_or_its_deadline_without_parking() {
        let (tx, _events) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(crate::SystemClock), tx);
        worker.set_spin(Duration::from_secs(5), SpinMode::Always);
        worker.attach_current_thread();
        // A deadline inside the spin window: polled until it passes, no park.
        let start = Instant::now();
        let at = start + Duration::from_millis(2);
        let idle = StepOutcome {
            ran: 0,
            runnable: false,
            next_deadline: None,
            tasks: 0,
        };
        worker.park(&StepOutcome {
            next_deadline: Some(at),
            ..idle
        });
        assert!(Instant::now() >= at);
        // Idle: a task spawned from another thread ends the polling long before the window.
        let handle = worker.handle();
        let spawner = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            handle
                .spawn(TaskSpec::new(
                    "late",
                    Counter {
                        next: 0,
                        n: 1,
                        per_run: 1,
                    },
                ))
                .unwrap();
        });
        let start = Instant::now();
        worker.park(&idle);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        assert!(worker.has_work());
        spawner.join().unwrap();
    }

    /// Records what the worker asked of it; the unparker counts wake-ups.
    #[derive(Default)]
    struct FakeReactor {
        turns: usize,
        parks: Vec<Option<Duration>>,
        unparks: Arc<AtomicUsize>,
    }

    impl Reactor for FakeReactor {
        fn turn(&mut self) {
            self.turns += 1;
        }
        fn park(&mut self, timeout: Option<Duration>) {
            self.parks.push(timeout);
        }
        fn unparker(&self) -> Unparker {
            let unparks = self.unparks.clone();
            Arc::new(move || {
                unparks.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    #[test]
    fn a_worker_with_a_reactor_turns_it_while_busy_blocks_in_it_when_idle_and_wakes_it() {
        let (mut worker, clock, _events) = setup();
        let mut reactor = FakeReactor::default();
        assert!(worker.attach(&reactor));
        assert!(
            !worker.attach_current_thread(),
            "one wake-up path per worker"
        );
        // Spawning wakes the worker through the reactor's unparker.
        let (queue, source, _sink, seen) = manual_to_collect(&worker);
        assert!(reactor.unparks.load(Ordering::SeqCst) >= 2);
        // Busy: the reactor is turned, never blocked in.
        let outcome = worker.step(clock.now());
        assert!(outcome.runnable || outcome.ran > 0);
        worker.park_in(&outcome, &mut reactor);
        assert!(reactor.turns + reactor.parks.len() == 1);
        settle(&mut worker, clock.now());
        // Idle with nothing pending: blocked without a deadline.
        let idle = worker.step(clock.now());
        assert_eq!(idle.park(), Park::Indefinitely);
        reactor.parks.clear();
        worker.park_in(&idle, &mut reactor);
        assert_eq!(reactor.parks, vec![None]);
        // A record pushed from outside: the wake goes through the unparker and the record
        // arrives.
        let before = reactor.unparks.load(Ordering::SeqCst);
        queue.lock().unwrap().push_back(7);
        source.waker().wake();
        assert!(reactor.unparks.load(Ordering::SeqCst) > before);
        settle(&mut worker, clock.now());
        assert_eq!(seen.lock().unwrap().records, vec![7]);
        // A deadline already passed on the worker's clock: turned, not blocked in.
        let turns = reactor.turns;
        reactor.parks.clear();
        worker.park_in(
            &StepOutcome {
                ran: 0,
                runnable: false,
                next_deadline: Some(clock.now()),
                tasks: 2,
            },
            &mut reactor,
        );
        assert_eq!((reactor.turns, reactor.parks.len()), (turns + 1, 0));
        let later = clock.now() + Duration::from_micros(30);
        worker.park_in(
            &StepOutcome {
                ran: 0,
                runnable: false,
                next_deadline: Some(later),
                tasks: 2,
            },
            &mut reactor,
        );
        assert_eq!(reactor.parks, vec![Some(later - clock.now())]);
    }

    /// Blocks for `block` in every park, then notes what `worker` says it has slept so far;
    /// turning does nothing.
    struct SlowReactor {
        block: Duration,
        worker: WorkerHandle,
        seen_in_park: Vec<Duration>,
    }

    impl Reactor for SlowReactor {
        fn turn(&mut self) {}
        fn park(&mut self, _timeout: Option<Duration>) {
            std::thread::sleep(self.block);
            self.seen_in_park.push(self.worker.asleep());
        }
        fn unparker(&self) -> Unparker {
            Arc::new(|| {})
        }
    }

    #[test]
    fn only_time_blocked_in_a_park_counts_as_asleep() {
        let (mut worker, clock, _events) = setup();
        let handle = worker.handle();
        let mut reactor = SlowReactor {
            block: Duration::from_millis(20),
            worker: handle.clone(),
            seen_in_park: Vec::new(),
        };
        assert!(worker.attach(&reactor));
        assert_eq!(handle.asleep(), Duration::ZERO);
        let outcome = |runnable: bool, next_deadline: Option<Instant>| StepOutcome {
            ran: 0,
            runnable,
            next_deadline,
            tasks: 1,
        };
        // Busy, or a deadline already passed: the reactor is only turned.
        worker.park_in(&outcome(true, None), &mut reactor);
        worker.park_in(&outcome(false, Some(clock.now())), &mut reactor);
        assert_eq!(handle.asleep(), Duration::ZERO);
        // Idle, without a deadline and with one ahead: each block is added.
        worker.park_in(&outcome(false, None), &mut reactor);
        let later = clock.now() + Duration::from_secs(1);
        worker.park_in(&outcome(false, Some(later)), &mut reactor);
        let asleep = handle.asleep();
        assert!(asleep >= Duration::from_millis(40), "{asleep:?}");
        assert!(asleep < Duration::from_secs(10), "{asleep:?}");
        // A park in progress counts as far as it went.
        assert_eq!(reactor.seen_in_park.len(), 2);
        assert!(reactor.seen_in_park[0] >= Duration::from_millis(20));
        assert!(reactor.seen_in_park[1] >= reactor.seen_in_park[0] + Duration::from_millis(20));
        assert!(reactor.seen_in_park[1] <= asleep);
    }

    /// Busy for `work`, then asleep for `block`, in every park; it says so on the worker's
    /// meter.
    struct MeasuringReactor {
        work: Duration,
        block: Duration,
        meter: Option<Arc<SleepMeter>>,
    }

    impl Reactor for MeasuringReactor {
        fn turn(&mut self) {}
        fn park(&mut self, _timeout: Option<Duration>) {
            std::thread::sleep(self.work);
            if let Some(m) = &self.meter {
                m.sleeping();
            }
            std::thread::sleep(self.block);
            if let Some(m) = &self.meter {
                m.awake();
            }
        }
        fn unparker(&self) -> Unparker {
            Arc::new(|| {})
        }
        fn measure_sleep(&self, _meter: Arc<SleepMeter>) -> bool {
            true
        }
    }

    #[test]
    fn a_reactor_that_measures_its_sleep_is_trusted_with_it() {
        let (mut worker, _clock, _events) = setup();
        let handle = worker.handle();
        let mut reactor = MeasuringReactor {
            work: Duration::from_millis(30),
            block: Duration::from_millis(5),
            meter: None,
        };
        assert!(worker.attach(&reactor));
        reactor.meter = Some(worker.shared.sleep.clone());
        let idle = StepOutcome {
            ran: 0,
            runnable: false,
            next_deadline: None,
            tasks: 1,
        };
        worker.park_in(&idle, &mut reactor);
        let asleep = handle.asleep();
        // The 5 ms it slept, not the 35 ms the park took.
        assert!(asleep >= Duration::from_millis(5), "{asleep:?}");
        assert!(asleep < Duration::from_millis(30), "{asleep:?}");
    }

    #[test]
    fn idle_worker_parks_until_woken_and_a_wake_makes_the_task_run() {
        let (mut worker, clock, _events) = setup();
        let (queue, source, sink, seen) = manual_to_collect(&worker);

        let first = worker.step(clock.now());
        assert_eq!(first.ran, 2, "new tasks run once");
        assert_eq!(first.tasks, 2);
        assert_eq!(first.park(), Park::Indefinitely);
        assert_eq!(
            worker.step(clock.now()).ran,
            0,
            "nothing runs without a wake"
        );

        queue.lock().unwrap().push_back(7);
        source.waker().wake();
        source.waker().wake(); // a second wake of a runnable task is a no-op
        let woke = worker.step(clock.now());
        assert_eq!(woke.ran, 1, "only the woken source ran");
        // Downstream queue was empty, so the single record was flushed at once and the
        // waiting sink was woken.
        assert!(woke.runnable);
        assert_eq!(woke.park(), Park::No);
        let next = worker.step(clock.now());
        assert_eq!(next.ran, 1);
        assert_eq!(seen.lock().unwrap().records, vec![7]);
        assert_eq!(next.park(), Park::Indefinitely);
        let m = sink.metrics().snapshot();
        assert_eq!((m.records_in, m.batches_in, m.queue_depth), (1, 1, 0));
        assert_eq!(source.metrics().records_out(), 1);
    }

    #[test]
    fn partial_batch_lingers_while_consumer_is_busy_then_flushes_at_deadline() {
        let (mut worker, clock, _events) = setup();
        let (queue, source, sink, seen) = manual_to_collect(&worker);
        settle(&mut worker, clock.now());
        sink.pause();
        settle(&mut worker, clock.now());
        assert_eq!(sink.state(), TaskState::Paused);

        // Idle consumer (empty queue): sent at once.
        queue.lock().unwrap().extend([1, 2, 3]);
        source.waker().wake();
        let out = settle(&mut worker, clock.now());
        assert_eq!(sink.metrics().queue_depth(), 1);
        assert_eq!(out.next_deadline, None);

        // Consumer busy (queue non-empty): the partial batch lingers.
        queue.lock().unwrap().extend([4, 5]);
        source.waker().wake();
        let t0 = clock.now();
        let out = settle(&mut worker, t0);
        assert_eq!(sink.metrics().queue_depth(), 1, "not flushed yet");
        let deadline = t0 + Duration::from_micros(50);
        assert_eq!(out.next_deadline, Some(deadline));
        assert_eq!(out.park(), Park::Until(deadline));

        // More records under load join the same batch.
        clock.advance(Duration::from_micros(20));
        queue.lock().unwrap().push_back(6);
        source.waker().wake();
        let out = settle(&mut worker, clock.now());
        assert_eq!(
            out.next_deadline,
            Some(deadline),
            "deadline counts from the first record"
        );

        clock.advance(Duration::from_micros(29));
        let out = worker.step(clock.now());
        assert_eq!(out.ran, 0, "timer not due yet");
        assert_eq!(sink.metrics().queue_depth(), 1);

        clock.advance(Duration::from_micros(1));
        let out = worker.step(clock.now());
        assert_eq!(out.ran, 1, "the linger timer woke the source");
        assert_eq!(
            sink.metrics().queue_depth(),
            2,
            "flushed at the linger bound"
        );
        assert_eq!(out.next_deadline, None);

        sink.resume();
        settle(&mut worker, clock.now());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.batch_sizes, vec![3, 3]);
        assert_eq!(seen.records, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn full_batches_flush_immediately_without_waiting_for_linger() {
        let (mut worker, clock, _events) = setup();
        let (out, inp) = edge::<u64>(&cfg(8, 4, 1_000_000)).unwrap();
        let (sink, seen) = Collect::new();
        let h = worker.handle();
        let sink = h.spawn(TaskSpec::new("sink", sink).input(inp)).unwrap();
        settle(&mut worker, clock.now());
        sink.pause();
        settle(&mut worker, clock.now());
        h.spawn(
            TaskSpec::new(
                "src",
                Counter {
                    next: 0,
                    n: 8,
                    per_run: 100,
                },
            )
            .output(out),
        )
        .unwrap();
        settle(&mut worker, clock.now());
        assert_eq!(sink.metrics().queue_depth(), 2, "two full batches of 4");
        sink.resume();
        settle(&mut worker, clock.now());
        assert_eq!(seen.lock().unwrap().batch_sizes, vec![4, 4]);
    }

    #[test]
    fn full_queue_blocks_the_producer_until_the_consumer_pops() {
        let (mut worker, clock, events) = setup();
        let (out, inp) = edge::<u64>(&cfg(1, 2, 50)).unwrap();
        let (sink, seen) = Collect::new();
        let h = worker.handle();
        let sink = h.spawn(TaskSpec::new("sink", sink).input(inp)).unwrap();
        settle(&mut worker, clock.now());
        sink.pause();
        settle(&mut worker, clock.now());
        let source = h
            .spawn(
                TaskSpec::new(
                    "src",
                    Counter {
                        next: 0,
                        n: 100,
                        per_run: 1000,
                    },
                )
                .output(out),
            )
            .unwrap();
        let out = settle(&mut worker, clock.now());
        assert_eq!(
            out.park(),
            Park::Indefinitely,
            "blocked producer does not spin"
        );
        assert_eq!(
            source.metrics().records_out(),
            2,
            "one batch fits the queue"
        );
        assert_eq!(sink.metrics().queue_depth(), 1);
        let invocations = source.metrics().snapshot().invocations;
        for _ in 0..5 {
            clock.advance(Duration::from_millis(1));
            assert_eq!(worker.step(clock.now()).ran, 0);
        }
        assert_eq!(source.metrics().snapshot().invocations, invocations);

        sink.resume();
        let out = worker.step(clock.now());
        assert!(out.ran >= 1);
        assert!(out.runnable, "the pop woke the blocked producer");
        let out = settle(&mut worker, clock.now());
        assert_eq!(out.tasks, 0, "both finished");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.records, (0..100).collect::<Vec<_>>());
        assert!(seen.batch_sizes.iter().all(|&n| n <= 2));
        let m = source.metrics().snapshot();
        assert!(
            m.blocked >= Duration::from_millis(5),
            "blocked time accounted: {m:?}"
        );
        let ended: Vec<_> = drain(&events)
            .into_iter()
            .filter(|e| matches!(e, TaskEvent::Finished { .. }))
            .map(|e| e.task())
            .collect();
        assert_eq!(ended.len(), 2);
        assert!(ended.contains(&source.id()) && ended.contains(&sink.id()));
    }

    #[test]
    fn cancelling_a_task_ends_it_and_downstream_sees_an_aborted_stream() {
        let (mut worker, clock, events) = setup();
        let queue = Arc::new(Mutex::new(VecDeque::from([1, 2])));
        let (out, inp) = edge::<u64>(&cfg(4, 8, 50)).unwrap();
        let (sink, seen) = Collect::new();
        let h = worker.handle();
        let source = h
            .spawn(TaskSpec::new("src", Manual { queue }).output(out))
            .unwrap();
        let sink = h.spawn(TaskSpec::new("sink", sink).input(inp)).unwrap();
        settle(&mut worker, clock.now());
        assert_eq!(seen.lock().unwrap().records, vec![1, 2]);

        source.cancel();
        let out = settle(&mut worker, clock.now());
        assert_eq!(source.state(), TaskState::Cancelled);
        assert_eq!(
            sink.state(),
            TaskState::Finished,
            "input ended when the source went"
        );
        assert!(seen.lock().unwrap().aborted);
        assert_eq!(out.tasks, 0);
        let evs = drain(&events);
        assert!(evs.contains(&TaskEvent::Cancelled { task: source.id() }));
        assert!(evs.contains(&TaskEvent::Finished { task: sink.id() }));
        assert_eq!(h.live_tasks(), 0);
    }

    #[test]
    fn operator_errors_and_panics_fail_only_their_task() {
        let (mut worker, clock, events) = setup();
        let h = worker.handle();
        let (bad_out, bad_in) = edge::<u64>(&cfg(4, 8, 50)).unwrap();
        let (panic_out, panic_in) = edge::<u64>(&cfg(4, 8, 50)).unwrap();
        let (good_out, good_in) = edge::<u64>(&cfg(2, 8, 50)).unwrap();
        let (mid_out, mid_in) = edge::<u64>(&cfg(2, 8, 50)).unwrap();
        let (bad_sink, bad_seen) = Collect::new();
        let (good_sink, good_seen) = Collect::new();
        let bad = h
            .spawn(TaskSpec::new("bad", Faulty { panic: false }).output(bad_out))
            .unwrap();
        let panicky = h
            .spawn(TaskSpec::new("panicky", Faulty { panic: true }).output(panic_out))
            .unwrap();
        let (panic_sink, _) = Collect::new();
        h.spawn(TaskSpec::new("bad-sink", bad_sink).input(bad_in))
            .unwrap();
        h.spawn(TaskSpec::new("panic-sink", panic_sink).input(panic_in))
            .unwrap();
        h.spawn(
            TaskSpec::new(
                "good",
                Counter {
                    next: 0,
                    n: 500,
                    per_run: 7,
                },
            )
            .output(good_out),
        )
        .unwrap();
        h.spawn(
            TaskSpec::new("add", AddOne { held: None })
                .input(good_in)
                .output(mid_out),
        )
        .unwrap();
        h.spawn(TaskSpec::new("good-sink", good_sink).input(mid_in))
            .unwrap();

        let out = settle(&mut worker, clock.now());
        assert_eq!(out.tasks, 0, "every task ended");
        assert_eq!(bad.state(), TaskState::Failed);
        assert_eq!(panicky.state(), TaskState::Failed);
        // The reason is on the handle as soon as the state says Failed; no event needed.
        let reason = bad.failure().expect("a failed task has a reason");
        assert!(reason.contains("bad input"), "{reason}");
        let reason = panicky.failure().expect("a failed task has a reason");
        assert!(reason.contains("panicked"), "{reason}");
        assert!(bad_seen.lock().unwrap().aborted);
        assert_eq!(
            good_seen.lock().unwrap().records,
            (1..=500).collect::<Vec<_>>(),
            "the healthy pipeline on the same worker delivered everything"
        );
        let failures: Vec<_> = drain(&events)
            .into_iter()
            .filter_map(|e| match e {
                TaskEvent::Failed { task, error } => Some((task, error)),
                _ => None,
            })
            .collect();
        assert_eq!(failures.len(), 2);
        assert!(failures.contains(&(bad.id(), EngineError::Operator("bad input".into()))));
        assert!(failures.contains(&(
            panicky.id(),
            EngineError::Panicked("boom in operator".into())
        )));
    }

    #[test]
    fn wait_until_parks_until_the_deadline_then_runs() {
        struct Ticker {
            every: Duration,
            ticks: Arc<Mutex<Vec<Instant>>>,
        }
        impl Operator for Ticker {
            type In = ();
            type Out = ();
            fn run(
                &mut self,
                _: &mut [crate::Input<()>],
                _: &mut [crate::Output<()>],
                cx: &mut Context<'_>,
            ) -> Result<Status, EngineError> {
                self.ticks.lock().unwrap().push(cx.now());
                Ok(Status::WaitUntil(cx.now() + self.every))
            }
        }
        let (mut worker, clock, _events) = setup();
        let ticks = Arc::new(Mutex::new(Vec::new()));
        worker
            .handle()
            .spawn(TaskSpec::new(
                "ticker",
                Ticker {
                    every: Duration::from_millis(10),
                    ticks: ticks.clone(),
                },
            ))
            .unwrap();
        let t0 = clock.now();
        let out = worker.step(t0);
        assert_eq!(out.park(), Park::Until(t0 + Duration::from_millis(10)));
        clock.advance(Duration::from_millis(9));
        assert_eq!(worker.step(clock.now()).ran, 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(worker.step(clock.now()).ran, 1);
        assert_eq!(
            *ticks.lock().unwrap(),
            vec![t0, t0 + Duration::from_millis(10)]
        );
    }

    #[test]
    fn often_woken_task_with_a_far_deadline_keeps_one_timer() {
        struct Patient;
        impl Operator for Patient {
            type In = ();
            type Out = ();
            fn run(
                &mut self,
                _: &mut [crate::Input<()>],
                _: &mut [crate::Output<()>],
                cx: &mut Context<'_>,
            ) -> Result<Status, EngineError> {
                Ok(Status::WaitUntil(cx.now() + Duration::from_secs(10)))
            }
        }
        let (mut worker, clock, _events) = setup();
        let task = worker
            .handle()
            .spawn(TaskSpec::new("patient", Patient))
            .unwrap();
        let t0 = clock.now();
        worker.step(t0);
        for _ in 0..1000 {
            clock.advance(Duration::from_millis(1));
            task.waker().wake();
            assert_eq!(worker.step(clock.now()).ran, 1);
        }
        assert_eq!(worker.timers.len(), 1);
        let out = worker.step(clock.now());
        assert_eq!(out.park(), Park::Until(t0 + Duration::from_secs(10)));
        // The queued (earlier) timer fires, the task re-arms for its current deadline.
        clock.advance(Duration::from_secs(9));
        assert_eq!(worker.step(clock.now()).ran, 1);
        let last = clock.now() + Duration::from_secs(10);
        assert_eq!(worker.step(clock.now()).next_deadline, Some(last));
    }

    #[test]
    fn multi_input_operator_sees_input_indices_and_finishes_after_all_inputs() {
        let (mut worker, clock, _events) = setup();
        let h = worker.handle();
        let (a_out, a_in) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        let (b_out, b_in) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        let (sink, seen) = Collect::new();
        let sink = h
            .spawn(TaskSpec::new("merge", sink).input(a_in).input(b_in))
            .unwrap();
        let counter = |n| Counter {
            next: 0,
            n,
            per_run: 2,
        };
        h.spawn(TaskSpec::new("a", counter(10)).output(a_out))
            .unwrap();
        let out = settle(&mut worker, clock.now());
        assert_eq!(out.tasks, 1, "merge waits for its second input");
        h.spawn(TaskSpec::new("b", counter(5)).output(b_out))
            .unwrap();
        settle(&mut worker, clock.now());
        assert_eq!(sink.state(), TaskState::Finished);
        let seen = seen.lock().unwrap();
        let from = |i| {
            seen.per_input
                .iter()
                .filter(|(idx, _)| *idx == i)
                .map(|(_, x)| *x)
                .collect::<Vec<_>>()
        };
        assert_eq!(from(0), (0..10).collect::<Vec<_>>());
        assert_eq!(from(1), (0..5).collect::<Vec<_>>());
    }

    #[test]
    fn draining_asks_sources_to_finish_and_spawn_after_stop_is_refused() {
        let (mut worker, clock, _events) = setup();
        let h = worker.handle();
        let (out, inp) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        let (sink, _seen) = Collect::new();
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        h.spawn(TaskSpec::new("src", Manual { queue }).output(out))
            .unwrap();
        h.spawn(TaskSpec::new("sink", sink).input(inp)).unwrap();
        assert_eq!(settle(&mut worker, clock.now()).tasks, 2);
        h.set_draining();
        assert_eq!(settle(&mut worker, clock.now()).tasks, 0);
        h.stop();
        let (sink, _) = Collect::new();
        assert_eq!(
            h.spawn(TaskSpec::new("late", sink)).err(),
            Some(EngineError::ShutDown)
        );
    }

    #[test]
    fn a_spawn_racing_with_the_end_of_its_worker_is_cancelled_not_left_starting() {
        let (mut worker, clock, events) = setup();
        let h = worker.handle();
        let spec = |out| {
            let queue = Arc::new(Mutex::new(VecDeque::new()));
            TaskSpec::new("late", Manual { queue }).output(out)
        };

        // The spawn passed its `stopping` check, then the worker stopped and made its final
        // drain, and only then did the task reach the inbox.
        let (out, late_in) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        assert!(!worker.is_stopping());
        let (task, late) = h.prepare(spec(out));
        h.stop();
        assert_eq!(settle(&mut worker, clock.now()).tasks, 0);
        worker.cancel_all();
        h.submit(task);
        assert_eq!(late.state(), TaskState::Cancelled);
        assert_eq!(h.live_tasks(), 0);
        // Its consumer sees the abort; an aborted input never looks finished.
        assert!(late_in.upstream_aborted() && !late_in.is_finished());
        assert_eq!(
            drain(&events),
            vec![TaskEvent::Cancelled { task: late.id() }]
        );

        // The same when the worker was dropped rather than stopped.
        let (mut worker, _clock, events) = setup();
        let h = worker.handle();
        let (out, late_in) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        let (task, late) = h.prepare(spec(out));
        worker.cancel_all();
        drop(worker);
        h.submit(task);
        assert_eq!(late.state(), TaskState::Cancelled);
        assert_eq!(h.live_tasks(), 0);
        assert!(late_in.upstream_aborted() && !late_in.is_finished());
        assert_eq!(
            drain(&events),
            vec![TaskEvent::Cancelled { task: late.id() }]
        );
        let (out, _) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        assert_eq!(h.spawn(spec(out)).err(), Some(EngineError::ShutDown));

        // A task that reached the inbox before the final drain is cancelled by the worker.
        let (worker, _clock, events) = setup();
        let h = worker.handle();
        let (out, late_in) = edge::<u64>(&cfg(2, 3, 50)).unwrap();
        let late = h.spawn(spec(out)).unwrap();
        drop(worker);
        assert_eq!(late.state(), TaskState::Cancelled);
        assert_eq!(h.live_tasks(), 0);
        assert!(late_in.upstream_aborted() && !late_in.is_finished());
        assert!(drain(&events).contains(&TaskEvent::Cancelled { task: late.id() }));
    }
}
