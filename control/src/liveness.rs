//! Executor failure detection: a pure, heartbeat-driven deadline tracker.
//!
//! The leader master feeds [`LivenessTracker`] with registrations and heartbeats, asks it which
//! executors have been silent for a whole TTL ([`LivenessTracker::expired`]) and when to ask
//! next ([`LivenessTracker::next_deadline`]). It does no I/O and reads no clock: every method
//! that depends on time takes `now`, a [`std::time::Instant`] (monotonic, so wall-clock jumps
//! cannot expire or revive executors). Tests pass instants built from one base instant plus
//! offsets, which makes them exact and sleep-free.
//!
//! Deadlines only move forward: a heartbeat or a grace period never shortens one, so replaying
//! an old heartbeat is harmless. A new leader does not know when executors last reported to the
//! old one, so [`LivenessTracker::on_leadership_acquired`] gives every known executor one full
//! TTL from the moment of election before it can be declared dead.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Timing of executor heartbeats and of failure detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessConfig {
    /// How often an executor sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// How long an executor may stay silent before it is declared lost; at least two
    /// heartbeat intervals, so one lost heartbeat is tolerated.
    pub ttl: Duration,
}

impl Default for LivenessConfig {
    /// Heartbeat every 250 ms, declared lost after 1.5 s of silence.
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            ttl: Duration::from_millis(1500),
        }
    }
}

/// Why a [`LivenessConfig`] is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LivenessConfigError {
    /// The heartbeat interval is zero.
    #[error("heartbeat_interval must be greater than zero")]
    ZeroHeartbeatInterval,
    /// The TTL is zero.
    #[error("ttl must be greater than zero")]
    ZeroTtl,
    /// The TTL would declare an executor lost after a single missed heartbeat.
    #[error(
        "ttl ({ttl:?}) must be at least 2 × heartbeat_interval ({heartbeat_interval:?}), \
         i.e. at least {:?}", .heartbeat_interval.saturating_mul(2)
    )]
    TtlTooShort {
        /// The configured TTL.
        ttl: Duration,
        /// The configured heartbeat interval.
        heartbeat_interval: Duration,
    },
    /// The TTL is longer than [`MAX_TTL`].
    #[error("ttl ({0:?}) must be at most {MAX_TTL:?}")]
    TtlTooLong(Duration),
}

/// The longest TTL accepted: a day. An executor silent for longer is lost by any measure, and
/// the bound keeps every deadline representable.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

impl LivenessConfig {
    /// Checks that both durations are non-zero, `ttl >= 2 × heartbeat_interval` and
    /// `ttl <= MAX_TTL`.
    ///
    /// # Errors
    /// [`LivenessConfigError`] names the offending values.
    pub fn validate(&self) -> Result<(), LivenessConfigError> {
        if self.heartbeat_interval.is_zero() {
            return Err(LivenessConfigError::ZeroHeartbeatInterval);
        }
        if self.ttl.is_zero() {
            return Err(LivenessConfigError::ZeroTtl);
        }
        if self.ttl > MAX_TTL {
            return Err(LivenessConfigError::TtlTooLong(self.ttl));
        }
        match self.heartbeat_interval.checked_mul(2) {
            Some(minimum) if self.ttl >= minimum => Ok(()),
            _ => Err(LivenessConfigError::TtlTooShort {
                ttl: self.ttl,
                heartbeat_interval: self.heartbeat_interval,
            }),
        }
    }
}

/// Tracks, per executor id, the instant at which it is declared lost unless it reports.
///
/// Call [`register`](Self::register) when an executor joins, [`heartbeat`](Self::heartbeat)
/// on every heartbeat, [`expired`](Self::expired) when [`next_deadline`](Self::next_deadline)
/// has passed (or on any tick), and [`on_leadership_acquired`](Self::on_leadership_acquired)
/// when this master becomes leader. An executor counts as expired at `now >= last report + ttl`.
#[derive(Debug, Clone)]
pub struct LivenessTracker {
    ttl: Duration,
    /// executor → its current deadline.
    deadlines: HashMap<u64, Instant>,
    /// (deadline, executor), for the earliest deadline and range expiry; mirrors `deadlines`.
    queue: BTreeSet<(Instant, u64)>,
}

impl LivenessTracker {
    /// A tracker with no executors, using `config.ttl`.
    ///
    /// # Errors
    /// The config fails [`LivenessConfig::validate`].
    pub fn new(config: LivenessConfig) -> Result<Self, LivenessConfigError> {
        config.validate()?;
        Ok(Self {
            ttl: config.ttl,
            deadlines: HashMap::new(),
            queue: BTreeSet::new(),
        })
    }

    /// The TTL in use.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts tracking `executor`, due to report within one TTL of `now`; returns whether it
    /// was new. Registering a known executor counts as a heartbeat.
    pub fn register(&mut self, executor: u64, now: Instant) -> bool {
        let known = self.deadlines.contains_key(&executor);
        self.extend(executor, self.deadline_from(now));
        !known
    }

    /// Records a heartbeat from `executor` at `now`; returns whether the executor is known.
    /// An unknown executor (never registered, removed, or already expired) is not tracked: it
    /// must register again.
    pub fn heartbeat(&mut self, executor: u64, now: Instant) -> bool {
        if !self.deadlines.contains_key(&executor) {
            return false;
        }
        self.extend(executor, self.deadline_from(now));
        true
    }

    /// Stops tracking `executor` (it left cleanly); returns whether it was known.
    pub fn remove(&mut self, executor: u64) -> bool {
        match self.deadlines.remove(&executor) {
            Some(deadline) => {
                self.queue.remove(&(deadline, executor));
                true
            }
            None => false,
        }
    }

    /// Gives every known executor at least one full TTL from `now` (called when this master
    /// becomes leader, as it does not know when executors last reported to the old leader).
    pub fn on_leadership_acquired(&mut self, now: Instant) {
        let grace = self.deadline_from(now);
        let executors: Vec<u64> = self.deadlines.keys().copied().collect();
        for executor in executors {
            self.extend(executor, grace);
        }
    }

    /// The executors whose deadline is at or before `now`, earliest deadline first (then by
    /// id). Each is reported once and then forgotten.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let mut lost = Vec::new();
        while let Some(&(deadline, executor)) = self.queue.first() {
            if deadline > now {
                break;
            }
            self.queue.pop_first();
            self.deadlines.remove(&executor);
            lost.push(executor);
        }
        lost
    }

    /// The earliest deadline of any tracked executor: when [`expired`](Self::expired) may next
    /// report something. `None` when nothing is tracked.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.first().map(|&(deadline, _)| deadline)
    }

    /// The deadline of `executor`, if tracked.
    pub fn deadline(&self, executor: u64) -> Option<Instant> {
        self.deadlines.get(&executor).copied()
    }

    /// Whether `executor` is tracked.
    pub fn contains(&self, executor: u64) -> bool {
        self.deadlines.contains_key(&executor)
    }

    /// The number of tracked executors.
    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    /// Whether no executor is tracked.
    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// `now + ttl` (at most [`MAX_TTL`] by validation); `now` if an `Instant` cannot hold it,
    /// which no real clock reaches, rather than a panic.
    fn deadline_from(&self, now: Instant) -> Instant {
        now.checked_add(self.ttl).unwrap_or(now)
    }

    /// Moves `executor`'s deadline to `deadline` unless it already is later.
    fn extend(&mut self, executor: u64, deadline: Instant) {
        match self.deadlines.get_mut(&executor) {
            Some(current) if *current >= deadline => {}
            Some(current) => {
                self.queue.remove(&(*current, executor));
                *current = deadline;
                self.queue.insert((deadline, executor));
            }
            None => {
                self.deadlines.insert(executor, deadline);
                self.queue.insert((deadline, executor));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn tracker() -> (LivenessTracker, Instant) {
        let config = LivenessConfig {
            heartbeat_interval: 100 * MS,
            ttl: 1000 * MS,
        };
        (LivenessTracker::new(config).unwrap(), Instant::now())
    }

    #[test]
    fn default_config_is_valid() {
        let config = LivenessConfig::default();
        assert_eq!(config.heartbeat_interval, 250 * MS);
        assert_eq!(config.ttl, 1500 * MS);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn config_validation_names_the_values() {
        let short = LivenessConfig {
            heartbeat_interval: 250 * MS,
            ttl: 400 * MS,
        };
        let err = short.validate().unwrap_err();
        assert_eq!(
            err,
            LivenessConfigError::TtlTooShort {
                ttl: 400 * MS,
                heartbeat_interval: 250 * MS,
            }
        );
        let message = err.to_string();
        assert!(message.contains("400ms"), "{message}");
        assert!(message.contains("250ms"), "{message}");
        assert!(LivenessTracker::new(short).is_err());

        let exact = LivenessConfig {
            heartbeat_interval: 250 * MS,
            ttl: 500 * MS,
        };
        assert_eq!(exact.validate(), Ok(()));
        let zero_heartbeat = LivenessConfig {
            heartbeat_interval: Duration::ZERO,
            ttl: 500 * MS,
        };
        assert_eq!(
            zero_heartbeat.validate(),
            Err(LivenessConfigError::ZeroHeartbeatInterval)
        );
        let zero_ttl = LivenessConfig {
            heartbeat_interval: 250 * MS,
            ttl: Duration::ZERO,
        };
        assert_eq!(zero_ttl.validate(), Err(LivenessConfigError::ZeroTtl));
        let huge = LivenessConfig {
            heartbeat_interval: Duration::MAX,
            ttl: Duration::MAX,
        };
        assert_eq!(
            huge.validate(),
            Err(LivenessConfigError::TtlTooLong(Duration::MAX))
        );
        let longest = LivenessConfig {
            heartbeat_interval: 250 * MS,
            ttl: MAX_TTL,
        };
        assert_eq!(longest.validate(), Ok(()));
        let too_long = LivenessConfig {
            heartbeat_interval: 250 * MS,
            ttl: MAX_TTL + MS,
        };
        assert!(LivenessTracker::new(too_long).is_err());
        assert!(
            too_long
                .validate()
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
    }

    #[test]
    fn the_longest_ttl_does_not_expire_an_executor_at_once() {
        let mut t = LivenessTracker::new(LivenessConfig {
            heartbeat_interval: 250 * MS,
            ttl: MAX_TTL,
        })
        .unwrap();
        let t0 = Instant::now();
        t.register(1, t0);
        assert!(t.expired(t0 + 1000 * MS).is_empty());
        assert_eq!(t.expired(t0 + MAX_TTL), vec![1]);
    }

    #[test]
    fn silent_executor_expires_after_exactly_one_ttl() {
        let (mut tracker, t0) = tracker();
        assert!(tracker.register(1, t0));
        assert_eq!(tracker.next_deadline(), Some(t0 + 1000 * MS));
        assert!(tracker.expired(t0 + 999 * MS).is_empty());
        assert_eq!(tracker.expired(t0 + 1000 * MS), vec![1]);
        assert!(!tracker.contains(1));
        assert_eq!(tracker.next_deadline(), None);
    }

    #[test]
    fn heartbeats_keep_an_executor_alive() {
        let (mut tracker, t0) = tracker();
        tracker.register(1, t0);
        for step in 1..=50 {
            let now = t0 + step * 100 * MS;
            assert!(tracker.heartbeat(1, now));
            assert!(tracker.expired(now).is_empty());
        }
        let last = t0 + 5000 * MS;
        assert_eq!(tracker.deadline(1), Some(last + 1000 * MS));
        assert_eq!(tracker.expired(last + 1000 * MS), vec![1]);
    }

    #[test]
    fn expired_executors_are_reported_once() {
        let (mut tracker, t0) = tracker();
        tracker.register(1, t0);
        assert_eq!(tracker.expired(t0 + 2000 * MS), vec![1]);
        assert!(tracker.expired(t0 + 3000 * MS).is_empty());
        assert!(
            !tracker.heartbeat(1, t0 + 3000 * MS),
            "forgotten after expiry"
        );
        assert!(tracker.register(1, t0 + 3000 * MS), "may register again");
    }

    #[test]
    fn unknown_heartbeat_is_rejected_and_not_tracked() {
        let (mut tracker, t0) = tracker();
        assert!(!tracker.heartbeat(7, t0));
        assert!(tracker.is_empty());
        assert_eq!(tracker.next_deadline(), None);
    }

    #[test]
    fn expiry_order_is_by_deadline_then_id() {
        let (mut tracker, t0) = tracker();
        tracker.register(3, t0);
        tracker.register(2, t0 + 10 * MS);
        tracker.register(1, t0);
        tracker.register(4, t0 + 500 * MS);
        assert_eq!(tracker.len(), 4);
        assert_eq!(tracker.expired(t0 + 1200 * MS), vec![1, 3, 2]);
        assert_eq!(tracker.next_deadline(), Some(t0 + 1500 * MS));
        assert_eq!(tracker.len(), 1);
    }

    #[test]
    fn next_deadline_follows_the_earliest_executor() {
        let (mut tracker, t0) = tracker();
        tracker.register(1, t0);
        tracker.register(2, t0 + 300 * MS);
        assert_eq!(tracker.next_deadline(), Some(t0 + 1000 * MS));
        tracker.heartbeat(1, t0 + 600 * MS);
        assert_eq!(tracker.next_deadline(), Some(t0 + 1300 * MS));
        assert!(tracker.remove(2));
        assert!(!tracker.remove(2));
        assert_eq!(tracker.next_deadline(), Some(t0 + 1600 * MS));
    }

    #[test]
    fn deadlines_never_move_backwards() {
        let (mut tracker, t0) = tracker();
        tracker.register(1, t0 + 500 * MS);
        // A late-delivered, older heartbeat does not shorten the deadline.
        assert!(tracker.heartbeat(1, t0));
        assert_eq!(tracker.deadline(1), Some(t0 + 1500 * MS));
        // Re-registering counts as a heartbeat.
        assert!(!tracker.register(1, t0 + 700 * MS));
        assert_eq!(tracker.deadline(1), Some(t0 + 1700 * MS));
    }

    #[test]
    fn new_leader_grants_a_full_ttl_of_grace() {
        let (mut tracker, t0) = tracker();
        tracker.register(1, t0);
        tracker.register(2, t0 + 900 * MS);
        // Elected at t0 + 950 ms: executor 1 would have expired at t0 + 1000 ms.
        let elected = t0 + 950 * MS;
        tracker.on_leadership_acquired(elected);
        assert_eq!(tracker.deadline(1), Some(elected + 1000 * MS));
        assert_eq!(tracker.deadline(2), Some(elected + 1000 * MS));
        assert!(tracker.expired(elected + 999 * MS).is_empty());
        assert_eq!(tracker.expired(elected + 1000 * MS), vec![1, 2]);
    }

    #[test]
    fn removed_executor_is_never_reported() {
        let (mut tracker, t0) = tracker();
        tracker.register(1, t0);
        tracker.register(2, t0);
        tracker.remove(1);
        assert_eq!(tracker.expired(t0 + 5000 * MS), vec![2]);
    }
}
