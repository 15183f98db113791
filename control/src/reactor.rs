//! [`DataPlaneReactor`]: an executor's QUIC data plane running on engine worker 0's thread.
//!
//! The reactor is a single-threaded tokio runtime that the engine worker drives (see
//! [`microcosm_engine::Reactor`]): the data endpoint's connection drivers, the outbound edge
//! senders and the inbound stream readers all run there, between the worker's steps. A batch
//! a task hands to a remote edge is written into the connection on the same thread, and an
//! arriving batch is pushed into its consumer's queue on the thread that runs the consumer
//! (when it lives on worker 0), so neither direction wakes another thread.
//!
//! Blocking uses tokio's I/O driver, whose timers have millisecond resolution; the engine's
//! deadlines (linger bounds, producer pacing) need microseconds, so a deadline is armed on a
//! `timerfd` that the driver watches like any socket.
//!
//! A park runs the I/O work that arrives while it lasts, so only the runtime's own park
//! (tokio's park hooks, around the driver's wait) counts as the worker asleep
//! ([`Reactor::measure_sleep`]).

use std::sync::Arc;
use std::time::Duration;

use microcosm_engine::{Reactor, SleepMeter, SleepSlot, Unparker};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Notify;

/// A single-threaded tokio runtime that an engine worker drives; see the module docs.
pub struct DataPlaneReactor {
    /// Always `Some` until dropped (see `Drop`).
    runtime: Option<Runtime>,
    wake: Arc<Notify>,
    timer: DeadlineTimer,
    /// The driving worker's sleep meter, marked by the runtime's park hooks.
    sleep: SleepSlot,
}

impl DataPlaneReactor {
    /// A reactor with its own runtime. Spawn onto it (and bind endpoints under
    /// [`Handle::enter`]) with [`DataPlaneReactor::handle`]; nothing runs until a worker
    /// drives it.
    pub fn new() -> std::io::Result<Self> {
        let sleep = SleepSlot::default();
        let (sleeping, awake) = (sleep.clone(), sleep.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || sleeping.sleeping())
            .on_thread_unpark(move || awake.awake())
            .build()?;
        let timer = {
            let _guard = runtime.enter();
            DeadlineTimer::new()?
        };
        Ok(Self {
            runtime: Some(runtime),
            wake: Arc::new(Notify::new()),
            timer,
            sleep,
        })
    }

    /// The runtime's handle: tasks spawned through it run on the driving worker's thread.
    pub fn handle(&self) -> Handle {
        self.runtime().handle().clone()
    }

    fn runtime(&self) -> &Runtime {
        // Invariant: `runtime` is `Some` from `new` until `drop`.
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the reactor")
    }
}

impl Drop for DataPlaneReactor {
    fn drop(&mut self) {
        // A plain drop waits for the runtime's blocking pool, which panics inside an async
        // context (e.g. an executor whose start fails after creating the reactor).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for DataPlaneReactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneReactor").finish_non_exhaustive()
    }
}

impl Reactor for DataPlaneReactor {
    fn turn(&mut self) {
        // `yield_now` completes after the runtime has run its ready tasks and polled the I/O
        // driver once without blocking.
        self.runtime().block_on(tokio::task::yield_now());
    }

    fn park(&mut self, timeout: Option<Duration>) {
        let (wake, timer) = (&self.wake, &self.timer);
        match timeout {
            Some(t) if t.is_zero() => self.turn(),
            None => self.runtime().block_on(wake.notified()),
            Some(t) => self.runtime().block_on(async move {
                if let Err(e) = timer.arm(t) {
                    // Fall back to the runtime's (millisecond) timer.
                    tracing::warn!(error = %e, "arming the deadline timer failed");
                    let _ = tokio::time::timeout(t, wake.notified()).await;
                    return;
                }
                let fired = tokio::select! {
                    () = wake.notified() => false,
                    () = timer.expired() => true,
                };
                // A one-shot timer that fired (and whose expiry `expired` read) is disarmed
                // already: two syscalls saved on every timed park that ends at its deadline.
                if !fired {
                    timer.disarm();
                }
            }),
        }
    }

    fn enter(&mut self, f: &mut dyn FnMut()) {
        // Inside `block_on`, wake-ups of the runtime's tasks (an edge's sender, woken by a
        // batch) go to its local FIFO queue; the connection driver they wake in turn queues
        // behind all of them, so one step's writes share packets.
        self.runtime().block_on(async { f() });
    }

    fn unparker(&self) -> Unparker {
        let wake = self.wake.clone();
        // `notify_one` keeps a permit when nobody waits, so a wake-up between the worker's
        // step and its park is not lost.
        Arc::new(move || wake.notify_one())
    }

    fn measure_sleep(&self, meter: Arc<SleepMeter>) -> bool {
        self.sleep.set(meter)
    }
}

#[cfg(target_os = "linux")]
use timerfd::DeadlineTimer;

/// A one-shot timer with nanosecond resolution whose expiry the tokio I/O driver sees.
#[cfg(target_os = "linux")]
mod timerfd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    pub(super) struct DeadlineTimer(AsyncFd<OwnedFd>);

    impl DeadlineTimer {
        /// Must be called within the runtime (it registers with its I/O driver).
        pub(super) fn new() -> std::io::Result<Self> {
            // SAFETY: timerfd_create takes no pointers; a non-negative result is a new fd
            // that nothing else owns.
            let fd = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it from here on;
            // nothing closes or replaces the descriptor while it is registered.
            let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
                .map_err(std::io::Error::from)?;
            Ok(Self(fd))
        }

        fn set(&self, after: Duration) -> std::io::Result<()> {
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                    tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
                },
            };
            // SAFETY: `spec` is a valid itimerspec for the call's duration; a null old-value
            // pointer is allowed.
            let rc = unsafe {
                libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut())
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }

        /// Fires once, `after` from now (a zero duration fires at once).
        pub(super) fn arm(&self, after: Duration) -> std::io::Result<()> {
            // An all-zero value would disarm instead.
            self.set(after.max(Duration::from_nanos(1)))
        }

        /// Cancels a pending expiry and forgets one that happened.
        pub(super) fn disarm(&self) {
            let _ = self.set(Duration::ZERO);
            self.consume();
        }

        /// Reads the expiry count; false if the timer has not fired.
        fn consume(&self) -> bool {
            let mut count = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte buffer.
            let n = unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            n == 8
        }

        /// Completes when the armed expiry has happened.
        pub(super) async fn expired(&self) {
            loop {
                let Ok(mut guard) = self.0.readable().await else {
                    // The driver is gone (runtime shutting down): nothing left to wait for.
                    return std::future::pending().await;
                };
                if self.consume() {
                    return;
                }
                guard.clear_ready();
            }
        }
    }
}

/// Off Linux: the runtime's own timer (millisecond resolution).
#[cfg(not(target_os = "linux"))]
struct DeadlineTimer(std::sync::Mutex<Option<tokio::time::Instant>>);

#[cfg(not(target_os = "linux"))]
impl DeadlineTimer {
    fn new() -> std::io::Result<Self> {
        Ok(Self(std::sync::Mutex::new(None)))
    }
    fn arm(&self, after: std::time::Duration) -> std::io::Result<()> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now() + after);
        Ok(())
    }
    fn disarm(&self) {}
    async fn expired(&self) {
        let at = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn dropping_a_reactor_inside_an_async_context_does_not_panic() {
        // E.g. an executor whose start fails after it created its reactor.
        let reactor = DataPlaneReactor::new().unwrap();
        reactor.handle().spawn(async {});
        drop(reactor);
    }

    #[test]
    fn park_ends_at_its_deadline_and_on_an_unpark_from_another_thread() {
        let mut reactor = DataPlaneReactor::new().unwrap();
        let start = Instant::now();
        reactor.park(Some(Duration::from_micros(300)));
        assert!(
            start.elapsed() >= Duration::from_micros(300),
            "returned before the deadline"
        );

        // An unpark before the park is kept: the park returns at once.
        reactor.unparker()();
        let start = Instant::now();
        reactor.park(None);
        assert!(start.elapsed() < Duration::from_secs(5));

        // An unpark from another thread ends a park without deadline.
        let unpark = reactor.unparker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            unpark();
        });
        reactor.park(None);
        t.join().unwrap();
    }

    #[test]
    fn only_the_runtime_waiting_counts_as_asleep_not_the_work_a_park_runs() {
        let mut reactor = DataPlaneReactor::new().unwrap();
        let meter = Arc::new(SleepMeter::default());
        assert!(reactor.measure_sleep(meter.clone()));
        assert!(!reactor.measure_sleep(Arc::new(SleepMeter::default())));
        // A timed park with nothing to do sleeps through it.
        reactor.park(Some(Duration::from_millis(20)));
        let slept = meter.asleep();
        assert!(slept >= Duration::from_millis(15), "{slept:?}");
        // Turning never sleeps.
        reactor.turn();
        reactor.turn();
        assert!(meter.asleep() - slept < Duration::from_millis(5));
        // A park that runs 40 ms of work and is then woken by it: the work is not sleep.
        let unpark = reactor.unparker();
        reactor.handle().spawn(async move {
            std::thread::sleep(Duration::from_millis(40));
            unpark();
        });
        let before = meter.asleep();
        let start = Instant::now();
        reactor.park(None);
        assert!(start.elapsed() >= Duration::from_millis(40));
        let during = meter.asleep() - before;
        assert!(during < Duration::from_millis(20), "{during:?}");
    }

    #[test]
    fn work_woken_inside_enter_runs_in_wake_order_before_what_it_wakes_in_turn() {
        // Tasks A and B are woken by a "step" inside `enter`; A wakes C when it runs. C must
        // run after B (like a connection driver woken by the first of several stream
        // writes, which should see all of them).
        let mut reactor = DataPlaneReactor::new().unwrap();
        let handle = reactor.handle();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (to_a, mut a_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (to_b, mut b_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (to_c, mut c_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let log = |name: &'static str| {
            let order = order.clone();
            move || order.lock().unwrap().push(name)
        };
        let (a, b, c) = (log("a"), log("b"), log("c"));
        handle.spawn(async move {
            while a_rx.recv().await.is_some() {
                a();
                to_c.send(()).unwrap();
            }
        });
        handle.spawn(async move {
            while b_rx.recv().await.is_some() {
                b();
            }
        });
        handle.spawn(async move {
            while c_rx.recv().await.is_some() {
                c();
            }
        });
        // Let the three tasks start and wait on their channels.
        for _ in 0..3 {
            reactor.turn();
        }
        reactor.enter(&mut || {
            to_a.send(()).unwrap();
            to_b.send(()).unwrap();
        });
        for _ in 0..3 {
            reactor.turn();
        }
        assert_eq!(*order.lock().unwrap(), vec!["a", "b", "c"]);
    }

    #[test]
    fn spawned_tasks_and_io_run_while_the_reactor_is_turned_or_parked() {
        let mut reactor = DataPlaneReactor::new().unwrap();
        let handle = reactor.handle();
        // A UDP round trip between two sockets on the reactor.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        handle.spawn(async move {
            let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            a.send_to(b"ping", b.local_addr().unwrap()).await.unwrap();
            let mut buf = [0u8; 8];
            let (n, _) = b.recv_from(&mut buf).await.unwrap();
            tx.send(buf[..n].to_vec()).unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            if let Ok(v) = rx.try_recv() {
                break v;
            }
            assert!(Instant::now() < deadline, "the task never ran");
            reactor.park(Some(Duration::from_millis(5)));
            reactor.turn();
        };
        assert_eq!(got, b"ping");
        // A stale expiry does not end a later park early: arm, let it fire, park again.
        reactor.park(Some(Duration::from_micros(50)));
        std::thread::sleep(Duration::from_millis(2));
        let start = Instant::now();
        reactor.park(Some(Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
