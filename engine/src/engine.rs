//! The engine: N worker threads, each running a [`Worker`] loop that parks when idle.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::clock::{Clock, SystemClock};
use crate::error::EngineError;
use crate::operator::Operator;
use crate::reactor::{Reactor, ThreadParker};
use crate::spin::SpinMode;
use crate::task::{TaskEvent, TaskHandle, TaskId, TaskSpec};
use crate::worker::{Worker, WorkerHandle};

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Worker threads (at least 1). Defaults to the available cores.
    pub workers: usize,
    /// Pin worker `i` to core `i % cores` (best effort, Linux only).
    pub pin_workers: bool,
    /// Prefix of the worker threads' names.
    pub thread_name: String,
    /// How long an idle worker keeps polling its run queue (and turning its reactor, if it
    /// has one) before it parks, and how early it wakes from a timed park to poll until the
    /// deadline (default 0: park at once). `spin_mode` says when it does.
    ///
    /// Parking and waking a thread costs a few µs on bare metal and 30–40 µs on a VM whose
    /// idle vCPUs halt, and a timed park can end as late; spinning trades CPU for that latency. An
    /// idle engine still parks for good after `spin`, so it costs nothing when nothing
    /// happens; under a steady load of small batches a spinning worker rarely parks.
    pub spin: Duration,
    /// When an idle worker spins: only while work arrives within the window (the default),
    /// or always (see [`SpinMode`]).
    pub spin_mode: SpinMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            pin_workers: false,
            thread_name: "microcosm-worker".to_owned(),
            spin: Duration::ZERO,
            spin_mode: SpinMode::default(),
        }
    }
}

impl EngineConfig {
    /// The default configuration with `workers` threads.
    pub fn with_workers(workers: usize) -> Self {
        Self {
            workers,
            ..Self::default()
        }
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every task ended by itself within the drain timeout.
    pub drained: bool,
    /// Tasks still alive at the deadline, cancelled.
    pub cancelled: usize,
}

/// A running set of worker threads.
pub struct Engine {
    workers: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
    events: Receiver<TaskEvent>,
    next: AtomicUsize,
}

impl Engine {
    /// Starts the worker threads with the system clock.
    pub fn start(config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Starts the worker threads with the system clock; worker 0 shares its thread with
    /// `reactor` (see [`Reactor`]): it turns the reactor between steps and blocks in it
    /// when idle, so the reactor's I/O and worker 0's tasks hand work to each other without
    /// waking another thread.
    pub fn start_with_reactor(
        config: EngineConfig,
        reactor: Box<dyn Reactor>,
    ) -> Result<Self, EngineError> {
        Self::build(config, Arc::new(SystemClock), Some(reactor))
    }

    /// Starts the worker threads with the given clock.
    pub fn with_clock(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Self, EngineError> {
        Self::build(config, clock, None)
    }

    fn build(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        mut reactor: Option<Box<dyn Reactor>>,
    ) -> Result<Self, EngineError> {
        if config.workers == 0 {
            return Err(EngineError::Config(
                "an engine needs at least one worker".into(),
            ));
        }
        let (events_tx, events) = crossbeam_channel::unbounded();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let mut engine = Self {
            workers: Vec::with_capacity(config.workers),
            threads: Vec::with_capacity(config.workers),
            events,
            next: AtomicUsize::new(0),
        };
        for index in 0..config.workers {
            let mut worker = Worker::new(index, clock.clone(), events_tx.clone());
            worker.set_spin(config.spin, config.spin_mode);
            engine.workers.push(worker.handle());
            let pin = config.pin_workers.then_some(index % cores);
            let clock = clock.clone();
            let reactor = reactor.take();
            let thread = std::thread::Builder::new()
                .name(format!("{}-{index}", config.thread_name))
                .spawn(move || run_worker(worker, clock, pin, reactor))
                .map_err(|e| EngineError::Spawn(e.to_string()))?;
            engine.threads.push(thread);
        }
        Ok(engine)
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Handle of worker `index`.
    pub fn worker(&self, index: usize) -> Option<&WorkerHandle> {
        self.workers.get(index)
    }

    /// Places a task on the worker named in the spec, or round-robin.
    pub fn spawn<O: Operator>(&self, spec: TaskSpec<O>) -> Result<TaskHandle, EngineError> {
        let index = match spec.worker {
            Some(i) => i,
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len(),
        };
        self.workers
            .get(index)
            .ok_or(EngineError::NoSuchWorker(index))?
            .spawn(spec)
    }

    /// The lifecycle event stream (all clones share one queue).
    pub fn events(&self) -> Receiver<TaskEvent> {
        self.events.clone()
    }

    /// Tasks that have not ended, over all workers.
    pub fn live_tasks(&self) -> usize {
        self.workers.iter().map(WorkerHandle::live_tasks).sum()
    }

    /// Drains, then stops: sources see [`Context::is_draining`](crate::Context::is_draining)
    /// and should finish; every task may run until it ends by itself or `drain_timeout`
    /// passes; what is left is cancelled and the threads are joined.
    pub fn shutdown(mut self, drain_timeout: Duration) -> ShutdownReport {
        for worker in &self.workers {
            worker.set_draining();
        }
        let deadline = Instant::now() + drain_timeout;
        // Shutdown is rare: a coarse poll keeps this simple.
        while self.live_tasks() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let cancelled = self.live_tasks();
        self.stop();
        ShutdownReport {
            drained: cancelled == 0,
            cancelled,
        }
    }

    fn stop(&mut self) {
        // Worker 0 stops last: if it drives a reactor (the network), tasks on the other
        // workers must not lose it while they still run.
        let join = |thread: JoinHandle<()>| {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked outside operator code");
            }
        };
        for worker in self.workers.iter().skip(1) {
            worker.stop();
        }
        let mut threads: Vec<_> = self.threads.drain(..).collect();
        let first = if threads.is_empty() {
            None
        } else {
            Some(threads.remove(0))
        };
        threads.into_iter().for_each(join);
        if let Some(worker) = self.workers.first() {
            worker.stop();
        }
        first.into_iter().for_each(join);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.workers.len())
            .field("live_tasks", &self.live_tasks())
            .finish()
    }
}

/// Blocks until every one of `tasks` (on any of `engines`) has finished, reading the engines'
/// event streams — for tests and benchmarks that run a job in process and own those streams.
/// Fails on the first of them that failed or was cancelled, or once `timeout` has passed.
pub fn wait_finished(
    engines: &[&Engine],
    tasks: impl IntoIterator<Item = TaskId>,
    timeout: Duration,
) -> Result<(), EngineError> {
    let mut waiting: BTreeSet<TaskId> = tasks.into_iter().collect();
    let events: Vec<_> = engines.iter().map(|e| e.events()).collect();
    let deadline = Instant::now() + timeout;
    while !waiting.is_empty() {
        if Instant::now() >= deadline {
            return Err(EngineError::NotFinished(format!(
                "still running after {timeout:?}: {waiting:?}"
            )));
        }
        for rx in &events {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(TaskEvent::Finished { task }) => {
                    waiting.remove(&task);
                }
                Ok(TaskEvent::Failed { task, error }) if waiting.contains(&task) => {
                    return Err(EngineError::NotFinished(format!("{task} failed: {error}")));
                }
                Ok(TaskEvent::Cancelled { task }) if waiting.contains(&task) => {
                    return Err(EngineError::NotFinished(format!("{task} was cancelled")));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The thread wrapper: step, then park (or block in the reactor) as the step says.
fn run_worker(
    mut worker: Worker,
    clock: Arc<dyn Clock>,
    pin: Option<usize>,
    reactor: Option<Box<dyn Reactor>>,
) {
    let mut reactor = reactor.unwrap_or_else(|| Box::new(ThreadParker));
    worker.attach(reactor.as_ref());
    precise_timers();
    if let Some(core) = pin
        && !pin_current_thread(core)
    {
        tracing::warn!(core, "pinning worker thread failed; continuing unpinned");
    }
    loop {
        if worker.is_stopping() {
            worker.cancel_all();
            break;
        }
        let mut outcome = None;
        reactor.enter(&mut || outcome = Some(worker.step(clock.now())));
        if let Some(outcome) = outcome {
            worker.park_in(&outcome, reactor.as_mut());
        }
    }
}

/// Asks the kernel to fire this thread's timers on time. Linux lets a timed wait (our
/// `park_timeout` until a linger or pacing deadline) end up to the thread's timer slack late,
/// 50 µs by default, which would add straight to every record's latency.
#[cfg(target_os = "linux")]
pub fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK only changes a scheduling attribute of the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Asks the kernel to fire this thread's timers on time (no-op off Linux).
#[cfg(not(target_os = "linux"))]
pub fn precise_timers() {}

/// Turns transparent huge pages off for the calling process (and the processes it starts:
/// the setting is inherited and kept across `exec`). Returns whether the kernel accepted it.
///
/// With THP, the first touch of a fresh 2 MiB region (mimalloc asks for huge pages on its
/// large mappings) zeroes the whole region inside one page fault. Measured in a 2-vCPU VM,
/// each such fault held an engine thread for ~5 ms: a binlog's growing log or a batch
/// buffer crossing into new memory stalled every record behind it, several times a second
/// until the process's memory had settled. Without THP the same memory is faulted in 4 KiB
/// at a time, a few µs each; the processes' resident memory also halves. Call it first
/// thing in `main`, before the memory it should cover is touched.
#[cfg(target_os = "linux")]
pub fn disable_transparent_huge_pages() -> bool {
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on the calling process's memory
    // descriptor; no memory is read or written.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0, 0, 0) == 0 }
}

/// Turns transparent huge pages off for the calling process (no-op off Linux).
#[cfg(not(target_os = "linux"))]
pub fn disable_transparent_huge_pages() -> bool {
    false
}

/// Whether transparent huge pages are off for the calling process (`None` when unknown).
#[cfg(target_os = "linux")]
pub fn transparent_huge_pages_disabled() -> Option<bool> {
    // SAFETY: PR_GET_THP_DISABLE only reads a flag of the calling process.
    match unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } {
        r if r < 0 => None,
        r => Some(r != 0),
    }
}

/// Whether transparent huge pages are off for the calling process (`None` off Linux).
#[cfg(not(target_os = "linux"))]
pub fn transparent_huge_pages_disabled() -> Option<bool> {
    None
}

/// Pins the calling thread to one core. Best effort.
#[cfg(target_os = "linux")]
pub(crate) fn pin_current_thread(core: usize) -> bool {
    // SAFETY: `cpu_set_t` is plain data for which all-zero is the empty set; CPU_SET writes
    // within the set (core is reduced modulo the set size); sched_setaffinity(0, ..) only
    // reads the set and affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn pin_current_thread(_core: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Counter, Faulty};

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_can_be_turned_off_for_the_process() {
        // Another test of this binary may have turned them off already; either way they
        // are off afterwards.
        assert!(transparent_huge_pages_disabled().is_some());
        assert!(disable_transparent_huge_pages());
        assert_eq!(transparent_huge_pages_disabled(), Some(true));
    }

    #[test]
    fn wait_finished_returns_when_the_tasks_finished_and_reports_a_failed_one() {
        let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
        let (out, _input) = crate::edge::<u64>(&crate::EdgeConfig::default()).unwrap();
        let done = engine
            .spawn(
                TaskSpec::new(
                    "done",
                    Counter {
                        next: 0,
                        n: 3,
                        per_run: 1,
                    },
                )
                .output(out),
            )
            .unwrap();
        wait_finished(&[&engine], [done.id()], Duration::from_secs(10)).unwrap();
        let faulty = engine
            .spawn(TaskSpec::new("faulty", Faulty { panic: false }))
            .unwrap();
        let err = wait_finished(&[&engine], [faulty.id()], Duration::from_secs(10)).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{} failed", faulty.id())),
            "{err}"
        );
        engine.shutdown(Duration::from_secs(5));
    }
}
