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

use std::sync::Arc;
use std::time::Duration;

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

    /// Runs `f` (the worker's step) inside the reactor's context, so that I/O work it makes
    /// ready is queued behind each other and runs at the next turn in order — e.g. every
    /// stream a step wrote to goes out before the connection builds its packets, in as few
    /// packets as fit. The default just calls `f`.
    fn enter(&mut self, f: &mut dyn FnMut()) {
        f();
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
