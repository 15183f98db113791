//! Sharing a worker thread with an I/O event loop.
//!
//! On a machine where waking an idle thread is expensive (tens of µs on a VM whose idle
//! vCPUs halt), every hand-off between an engine worker and a separate network thread costs
//! a wake-up on each side of every record. A [`Reactor`] removes those hand-offs: it is an
//! event loop (in the executor, an async runtime driving the QUIC data plane) that runs *on*
//! a worker thread. The worker turns it between steps while tasks are runnable and blocks in
//! it, instead of parking the thread, when they are not; whoever wakes one of the worker's
//! tasks interrupts that block through [`Reactor::unparker`]. For tasks on that worker, a
//! remote edge's batch then goes from the producing task into the connection on the same
//! thread, and an arriving batch is pushed to its consumer without a second thread in
//! between; tasks on other workers still hand over to (and are woken by) it. The engine
//! stops the reactor's worker last, so other workers never lose it while they run.
//!
//! A worker without one uses [`ThreadParker`], the reactor with no I/O: it parks the thread.
//!
//! Each worker keeps a [`SleepMeter`] of the time its thread spends blocked waiting for work.
//! A reactor whose park also runs I/O work marks the spans it really blocks in
//! ([`Reactor::measure_sleep`]); for one that only blocks, the whole park counts.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Interrupts a blocked [`Reactor::park`] from any thread.
pub type Unparker = Arc<dyn Fn() + Send + Sync>;

/// An I/O event loop that shares a worker thread; see the [module docs](self).
///
/// The engine calls these only from the worker's thread.
pub trait Reactor: Send + 'static {
    /// Runs the I/O work that is ready now, without blocking.
    fn turn(&mut self);

    /// Blocks, running I/O work as it becomes ready, until the [`Reactor::unparker`] is
    /// called or `timeout` has passed (`None`: no timeout; zero: do not block). A call of
    /// the unparker that happened since the previous `park` returned makes this return at
    /// once, so a wake-up between a worker's step and its park is never lost. Returning
    /// early is allowed.
    fn park(&mut self, timeout: Option<Duration>);

    /// A handle that ends the current or next [`Reactor::park`].
    fn unparker(&self) -> Unparker;

    /// Takes the meter of the worker that drives this reactor, to mark on it the spans in
    /// which [`Reactor::park`] really blocks ([`SleepMeter::sleeping`], [`SleepMeter::awake`])
    /// and not the I/O work it runs in between. Returns false (the default) if it does not:
    /// the worker then counts each whole park as asleep, which is right for a reactor whose
    /// park only blocks.
    fn measure_sleep(&self, meter: Arc<SleepMeter>) -> bool {
        let _ = meter;
        false
    }

    /// Runs `f` (the worker's step) inside the reactor's context, so that I/O work it makes
    /// ready is queued behind each other and runs at the next turn in order — e.g. every
    /// stream a step wrote to goes out before the connection builds its packets, in as few
    /// packets as fit. The default just calls `f`.
    fn enter(&mut self, f: &mut dyn FnMut()) {
        f();
    }
}

/// The time a thread has spent asleep, blocked until work arrives or a deadline passes: with
/// the kernel's counts for the thread (time on a CPU, time waiting for one;
/// `/proc/<pid>/task/<tid>/schedstat` on Linux) it accounts for the thread's wall time, and
/// what is left is time the thread wanted to run while its CPU did something the kernel
/// charges to no thread (the hypervisor holding the vCPU, interrupt handling).
#[derive(Debug, Default)]
pub struct SleepMeter {
    state: Mutex<Sleeps>,
}

#[derive(Debug, Default)]
struct Sleeps {
    /// Total of the sleeps that ended.
    ended: Duration,
    /// When the sleep in progress began.
    since: Option<Instant>,
}

impl SleepMeter {
    /// The thread is about to block. (A second call before [`SleepMeter::awake`] restarts
    /// the sleep in progress.)
    pub fn sleeping(&self) {
        self.state().since = Some(Instant::now());
    }

    /// The thread stopped blocking.
    pub fn awake(&self) {
        let mut state = self.state();
        if let Some(since) = state.since.take() {
            state.ended += since.elapsed();
        }
    }

    /// Total time asleep, a sleep in progress counting as far as it went.
    pub fn asleep(&self) -> Duration {
        let state = self.state();
        state.ended + state.since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Sleeps> {
        // Two plain fields, consistent whatever a panicking holder did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a reactor built before its worker exists finds the worker's [`SleepMeter`]: give
/// [`SleepSlot::sleeping`] and [`SleepSlot::awake`] to the event loop's park hooks, and fill
/// the slot from [`Reactor::measure_sleep`] with [`SleepSlot::set`]. Until then the hooks do
/// nothing.
#[derive(Debug, Clone, Default)]
pub struct SleepSlot(Arc<OnceLock<Arc<SleepMeter>>>);

impl SleepSlot {
    /// Fills the slot; false if it was filled already.
    pub fn set(&self, meter: Arc<SleepMeter>) -> bool {
        self.0.set(meter).is_ok()
    }

    /// [`SleepMeter::sleeping`] on the meter, if set.
    pub fn sleeping(&self) {
        if let Some(m) = self.0.get() {
            m.sleeping();
        }
    }

    /// [`SleepMeter::awake`] on the meter, if set.
    pub fn awake(&self) {
        if let Some(m) = self.0.get() {
            m.awake();
        }
    }
}

/// The reactor of a worker without I/O: nothing to turn; blocking parks the thread, and the
/// unparker unparks the thread that asked for it (call [`Reactor::unparker`] on the worker's
/// thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadParker;

impl Reactor for ThreadParker {
    fn turn(&mut self) {}

    fn park(&mut self, timeout: Option<Duration>) {
        match timeout {
            None => std::thread::park(),
            Some(t) if t.is_zero() => {}
            Some(t) => std::thread::park_timeout(t),
        }
    }

    fn unparker(&self) -> Unparker {
        let thread = std::thread::current();
        Arc::new(move || thread.unpark())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_meter_adds_ended_sleeps_and_the_one_in_progress() {
        let meter = SleepMeter::default();
        assert_eq!(meter.asleep(), Duration::ZERO);
        // Awake without a sleep: nothing.
        meter.awake();
        assert_eq!(meter.asleep(), Duration::ZERO);
        meter.sleeping();
        std::thread::sleep(Duration::from_millis(10));
        let during = meter.asleep();
        assert!(during >= Duration::from_millis(10), "{during:?}");
        meter.awake();
        let ended = meter.asleep();
        assert!(ended >= during, "{ended:?}");
        // Time awake does not count.
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(meter.asleep(), ended);
    }

    #[test]
    fn a_sleep_slot_forwards_once_filled() {
        let slot = SleepSlot::default();
        slot.sleeping();
        slot.awake();
        let meter = Arc::new(SleepMeter::default());
        assert!(slot.set(meter.clone()));
        assert!(!slot.set(Arc::new(SleepMeter::default())));
        slot.sleeping();
        std::thread::sleep(Duration::from_millis(5));
        slot.awake();
        assert!(meter.asleep() >= Duration::from_millis(5));
    }
}
