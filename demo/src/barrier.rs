//! The DDL barrier shared by the syncers of one job in one process.
//!
//! When syncer `i` meets DDL `(t, v)` it [`polls`](BarrierCoordinator::poll) the
//! coordinator. Until every one of the `S` streams has arrived at `(t, v)` the answer is
//! [`Arrival::Waiting`], and the coordinator keeps the caller's [`Notify`] handle (the task's
//! `TaskWaker`); the syncer holds the DDL and every later record of table `t`. The last
//! stream to arrive gets [`Arrival::Passed`], bumps the [generation](BarrierCoordinator::generation)
//! and wakes the others, whose next poll also answers `Passed`. No thread ever sleeps or
//! spins.
//!
//! Released barriers are remembered as a per-table watermark (versions of one table reach
//! every stream in increasing order), so the map holds only barriers still waiting and a
//! DDL seen again (a replay) passes at once.
//!
//! A stream that ends without reaching a barrier ([`BarrierCoordinator::leave`]) makes that
//! barrier impossible; a syncer that fails or is cancelled ([`BarrierCoordinator::abandon`])
//! makes every barrier impossible. Either way the waiting syncers are woken and their poll
//! fails with a [`BarrierError`], so the job fails instead of hanging.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use microcosm_engine::Notify;

/// The answer to a [`BarrierCoordinator::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Every stream has reached this DDL: pass it and continue.
    Passed,
    /// Some stream has not reached it yet: hold it; the caller is notified when that changes.
    Waiting,
}

/// Why a barrier can never be passed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// The stream index is not below the coordinator's stream count.
    #[error("stream {stream} does not exist (the barrier has {streams} streams)")]
    UnknownStream {
        /// The stream given.
        stream: u32,
        /// The number of streams.
        streams: u32,
    },
    /// A stream ended (its input finished) without reaching this DDL.
    #[error("stream {stream} ended before reaching DDL (table {table}, version {version})")]
    StreamEnded {
        /// The stream that ended.
        stream: u32,
        /// The DDL's table.
        table: u32,
        /// The DDL's version.
        version: u32,
    },
    /// A syncer failed or was cancelled; no barrier of this job can complete.
    #[error("the barrier was abandoned by stream {stream}")]
    Abandoned {
        /// The stream whose syncer went away.
        stream: u32,
    },
}

/// One barrier not yet released.
struct Pending {
    arrived: Vec<bool>,
    count: u32,
    /// Per stream, the handle to notify while it waits.
    waiters: Vec<Option<Arc<dyn Notify>>>,
}

struct Inner {
    pending: HashMap<(u32, u32), Pending>,
    /// Per table, the highest version whose barrier was released.
    released: HashMap<u32, u32>,
    /// Streams whose syncer has ended (finished or abandoned).
    ended: Vec<bool>,
    abandoned_by: Option<u32>,
}

/// Coordinates the DDL barrier of the `S` syncers of one job (shared through an [`Arc`]).
pub struct BarrierCoordinator {
    streams: u32,
    /// Bumped whenever a barrier is released or becomes impossible.
    generation: AtomicU64,
    inner: Mutex<Inner>,
}

impl BarrierCoordinator {
    /// A coordinator for `streams` streams (indices `0..streams`).
    pub fn new(streams: u32) -> BarrierCoordinator {
        BarrierCoordinator {
            streams,
            generation: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                pending: HashMap::new(),
                released: HashMap::new(),
                ended: vec![false; streams as usize],
                abandoned_by: None,
            }),
        }
    }

    /// A coordinator whose barriers up to `released` (table → version) already passed,
    /// e.g. restored from a checkpoint.
    pub fn with_released(streams: u32, released: BTreeMap<u32, u32>) -> BarrierCoordinator {
        let coordinator = BarrierCoordinator::new(streams);
        coordinator.lock().released = released.into_iter().collect();
        coordinator
    }

    /// Per table, the highest version whose barrier was released.
    pub fn released(&self) -> BTreeMap<u32, u32> {
        self.lock().released.iter().map(|(&t, &v)| (t, v)).collect()
    }

    /// The number of streams.
    pub fn streams(&self) -> u32 {
        self.streams
    }

    /// A counter bumped (before waiters are notified) whenever some barrier is released,
    /// a stream leaves or the barrier is abandoned. A syncer holding several DDLs re-polls
    /// them only when it changed since its last look.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stream `stream` is at DDL `(table, version)`. Idempotent: polling again while
    /// waiting just re-checks (and replaces the stored notify handle).
    ///
    /// On [`Arrival::Waiting`] the coordinator will call `waker.notify()` once the barrier
    /// is released or becomes impossible; the caller must then poll again.
    pub fn poll<W: Notify + Clone + 'static>(
        &self,
        table: u32,
        version: u32,
        stream: u32,
        waker: &W,
    ) -> Result<Arrival, BarrierError> {
        let slot = self.check_stream(stream)?;
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(by) = inner.abandoned_by {
            return Err(BarrierError::Abandoned { stream: by });
        }
        if inner.released.get(&table).is_some_and(|&r| r >= version) {
            return Ok(Arrival::Passed);
        }
        let streams = self.streams as usize;
        let entry = inner
            .pending
            .entry((table, version))
            .or_insert_with(|| Pending {
                arrived: vec![false; streams],
                count: 0,
                waiters: vec![None; streams],
            });
        // `slot < streams == arrived.len()` (checked by `check_stream`).
        if let Some(arrived) = entry.arrived.get_mut(slot)
            && !*arrived
        {
            *arrived = true;
            entry.count += 1;
        }
        if entry.count >= self.streams {
            let waiters = std::mem::take(&mut entry.waiters);
            inner.pending.remove(&(table, version));
            let mark = inner.released.entry(table).or_insert(version);
            *mark = (*mark).max(version);
            self.generation.fetch_add(1, Ordering::AcqRel);
            drop(guard);
            for waiter in waiters.into_iter().flatten() {
                waiter.notify();
            }
            return Ok(Arrival::Passed);
        }
        let missing_ended = entry
            .arrived
            .iter()
            .zip(&inner.ended)
            .position(|(&arrived, &ended)| ended && !arrived);
        if let Some(ended) = missing_ended {
            return Err(BarrierError::StreamEnded {
                stream: u32::try_from(ended).unwrap_or(u32::MAX),
                table,
                version,
            });
        }
        if let Some(waiter) = entry.waiters.get_mut(slot) {
            *waiter = Some(Arc::new(waker.clone()));
        }
        Ok(Arrival::Waiting)
    }

    /// Stream `stream` ended normally (its input finished). Barriers it has not reached can
    /// never complete: their waiters are woken and their next poll fails.
    pub fn leave(&self, stream: u32) {
        let mut inner = self.lock();
        if let Some(ended) = inner.ended.get_mut(stream as usize) {
            *ended = true;
        }
        let slot = stream as usize;
        let wake: Vec<Arc<dyn Notify>> = inner
            .pending
            .values_mut()
            .filter(|p| !p.arrived.get(slot).copied().unwrap_or(true))
            .flat_map(|p| p.waiters.iter_mut().filter_map(Option::take))
            .collect();
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        for waiter in wake {
            waiter.notify();
        }
    }

    /// Stream `stream`'s syncer failed or was cancelled: every waiting syncer is woken and
    /// every later poll fails with [`BarrierError::Abandoned`].
    pub fn abandon(&self, stream: u32) {
        let mut inner = self.lock();
        if let Some(ended) = inner.ended.get_mut(stream as usize) {
            *ended = true;
        }
        inner.abandoned_by.get_or_insert(stream);
        let wake: Vec<Arc<dyn Notify>> = inner
            .pending
            .values_mut()
            .flat_map(|p| p.waiters.iter_mut().filter_map(Option::take))
            .collect();
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        for waiter in wake {
            waiter.notify();
        }
    }

    /// Barriers some stream is waiting at.
    pub fn waiting_barriers(&self) -> usize {
        self.lock().pending.len()
    }

    fn check_stream(&self, stream: u32) -> Result<usize, BarrierError> {
        if stream < self.streams {
            Ok(stream as usize)
        } else {
            Err(BarrierError::UnknownStream {
                stream,
                streams: self.streams,
            })
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent across a panic (no multi-step invariant is broken
        // mid-update), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for BarrierCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BarrierCoordinator")
            .field("streams", &self.streams)
            .field("waiting_barriers", &self.waiting_barriers())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts notifications.
    #[derive(Clone, Default)]
    struct Count(Arc<AtomicUsize>);

    impl Notify for Count {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn nobody_passes_until_the_last_stream_arrives_and_the_last_wakes_the_others() {
        let barrier = BarrierCoordinator::new(3);
        let wakers = [Count::default(), Count::default(), Count::default()];
        assert_eq!(barrier.poll(4, 1, 0, &wakers[0]), Ok(Arrival::Waiting));
        assert_eq!(barrier.poll(4, 1, 1, &wakers[1]), Ok(Arrival::Waiting));
        // Re-polling while waiting changes nothing.
        assert_eq!(barrier.poll(4, 1, 0, &wakers[0]), Ok(Arrival::Waiting));
        assert_eq!(wakers.iter().map(Count::get).sum::<usize>(), 0);
        assert_eq!(barrier.waiting_barriers(), 1);
        // Another table's barrier is independent.
        assert_eq!(barrier.poll(5, 1, 2, &wakers[2]), Ok(Arrival::Waiting));
        let generation = barrier.generation();
        assert_eq!(barrier.poll(4, 1, 2, &wakers[2]), Ok(Arrival::Passed));
        assert!(barrier.generation() > generation);
        assert!(wakers[0].get() >= 1 && wakers[1].get() >= 1);
        assert_eq!(barrier.poll(4, 1, 0, &wakers[0]), Ok(Arrival::Passed));
        assert_eq!(barrier.poll(4, 1, 1, &wakers[1]), Ok(Arrival::Passed));
        assert_eq!(barrier.waiting_barriers(), 1, "table 5 still waits");
        // The next version starts a new barrier.
        assert_eq!(barrier.poll(4, 2, 0, &wakers[0]), Ok(Arrival::Waiting));
        assert_eq!(barrier.released(), BTreeMap::from([(4, 1)]));
        let restored = BarrierCoordinator::with_released(3, barrier.released());
        assert_eq!(restored.poll(4, 1, 2, &wakers[2]), Ok(Arrival::Passed));
        assert_eq!(restored.poll(4, 2, 2, &wakers[2]), Ok(Arrival::Waiting));
    }

    #[test]
    fn a_single_stream_never_waits() {
        let barrier = BarrierCoordinator::new(1);
        let w = Count::default();
        for version in 1..10 {
            assert_eq!(barrier.poll(0, version, 0, &w), Ok(Arrival::Passed));
        }
        assert_eq!(barrier.waiting_barriers(), 0);
    }

    #[test]
    fn an_ended_stream_fails_the_barriers_it_missed() {
        let barrier = BarrierCoordinator::new(2);
        let w = Count::default();
        assert_eq!(barrier.poll(0, 1, 0, &w), Ok(Arrival::Waiting));
        barrier.leave(1);
        assert_eq!(w.get(), 1);
        assert_eq!(
            barrier.poll(0, 1, 0, &w),
            Err(BarrierError::StreamEnded {
                stream: 1,
                table: 0,
                version: 1
            })
        );
    }

    #[test]
    fn abandoning_wakes_and_fails_everyone() {
        let barrier = BarrierCoordinator::new(3);
        let w = Count::default();
        assert_eq!(barrier.poll(0, 1, 0, &w), Ok(Arrival::Waiting));
        assert_eq!(barrier.poll(1, 1, 1, &w), Ok(Arrival::Waiting));
        barrier.abandon(2);
        assert_eq!(w.get(), 2);
        assert_eq!(
            barrier.poll(0, 1, 0, &w),
            Err(BarrierError::Abandoned { stream: 2 })
        );
        assert!(matches!(
            barrier.poll(0, 1, 7, &w),
            Err(BarrierError::UnknownStream {
                stream: 7,
                streams: 3
            })
        ));
    }
}
