//! When an idle worker spins instead of sleeping: [`SpinMode`] and the [`SpinGovernor`] that
//! applies it.
//!
//! Sleeping and being woken costs a thread a few µs on bare metal, and 30–40 µs on a virtual
//! machine whose idle vCPUs halt: a record that arrives at a sleeping worker pays that before
//! anything runs. Spinning for a while after the last work (polling the run queue and turning
//! the reactor) avoids it, at the price of the CPU burnt while nothing arrives.
//!
//! [`SpinMode::Adaptive`] spends that CPU only where it buys something: the governor keeps a
//! moving average of how long the worker's idle periods last, and spins only while that
//! average is within the spin window, i.e. while work keeps arriving sooner than the window
//! ends. Under a dense stream of small batches the worker then never sleeps; when records
//! arrive further apart than the window (a trickle, or no job at all) it sleeps at once, as if
//! spinning were off, so an idle or lightly loaded engine costs no CPU.
//!
//! The governor takes durations and returns decisions; the worker measures the time.

use std::time::Duration;

/// How an idle worker uses its spin window (`EngineConfig::spin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpinMode {
    /// Spin only while recent idle periods were, on average, shorter than the window.
    #[default]
    Adaptive,
    /// Spin for the whole window after every piece of work.
    Always,
}

impl SpinMode {
    /// The mode's name as written in configuration: `adaptive` or `always`.
    pub fn as_str(self) -> &'static str {
        match self {
            SpinMode::Adaptive => "adaptive",
            SpinMode::Always => "always",
        }
    }
}

impl std::str::FromStr for SpinMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adaptive" => Ok(SpinMode::Adaptive),
            "always" => Ok(SpinMode::Always),
            other => Err(format!(
                "unknown spin mode {other:?} (expected \"adaptive\" or \"always\")"
            )),
        }
    }
}

impl std::fmt::Display for SpinMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Weight of the newest idle period in the moving average: 1/8.
const NEWEST_SHIFT: u32 = 3;
/// Idle periods enter the average clamped to this many spin windows, so one long pause (or
/// the time before a job started) is forgotten after a few dozen short ones.
const CLAMP_WINDOWS: u32 = 4;

/// Decides how long an idle worker spins; see the module docs.
#[derive(Debug, Clone)]
pub struct SpinGovernor {
    window: Duration,
    mode: SpinMode,
    /// Moving average of idle periods, in ns.
    average_idle_ns: u64,
}

impl SpinGovernor {
    /// A governor for spin window `window` (zero: never spin). It starts out as after a long
    /// idle period: an adaptive one spins only once work arrives often.
    pub fn new(window: Duration, mode: SpinMode) -> Self {
        let mut governor = Self {
            window,
            mode,
            average_idle_ns: 0,
        };
        governor.average_idle_ns = governor.clamp(Duration::MAX);
        governor
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How long to spin now, before sleeping (zero: sleep at once).
    pub fn spin(&self) -> Duration {
        match self.mode {
            SpinMode::Always => self.window,
            SpinMode::Adaptive if self.average_idle_ns <= nanos(self.window) => self.window,
            SpinMode::Adaptive => Duration::ZERO,
        }
    }

    /// Records that an idle period (from running out of work to finding some, spinning and
    /// sleeping included) lasted `idle`.
    pub fn idle_ended(&mut self, idle: Duration) {
        let sample = self.clamp(idle);
        let average = self.average_idle_ns;
        self.average_idle_ns = average - (average >> NEWEST_SHIFT) + (sample >> NEWEST_SHIFT);
    }

    fn clamp(&self, idle: Duration) -> u64 {
        nanos(idle).min(nanos(self.window).saturating_mul(u64::from(CLAMP_WINDOWS)))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(150);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn adaptive_spins_once_work_arrives_within_the_window_and_stops_when_it_thins_out() {
        let mut g = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
        assert_eq!(g.spin(), Duration::ZERO, "a fresh worker sleeps");
        // A dense stream: gaps of 80 µs. Within a few dozen gaps the average is inside the window.
        let mut gaps = 0;
        while g.spin().is_zero() {
            g.idle_ended(us(80));
            gaps += 1;
            assert!(gaps < 64, "never started spinning");
        }
        assert_eq!(g.spin(), WINDOW);
        for _ in 0..100 {
            g.idle_ended(us(80));
        }
        // One long pause does not stop it; a trickle (1 ms gaps) does.
        g.idle_ended(Duration::from_secs(5));
        assert_eq!(g.spin(), WINDOW, "one pause counts as at most four windows");
        let mut gaps = 0;
        while !g.spin().is_zero() {
            g.idle_ended(us(1000));
            gaps += 1;
            assert!(gaps < 64, "never stopped spinning");
        }
    }

    #[test]
    fn gaps_longer_than_the_window_never_make_it_spin() {
        let mut g = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
        for _ in 0..1000 {
            g.idle_ended(us(200));
            assert_eq!(g.spin(), Duration::ZERO);
        }
    }

    #[test]
    fn always_spins_the_window_and_a_zero_window_never_spins() {
        let mut always = SpinGovernor::new(WINDOW, SpinMode::Always);
        assert_eq!(always.spin(), WINDOW);
        always.idle_ended(Duration::from_secs(1));
        assert_eq!(always.spin(), WINDOW);
        for mode in [SpinMode::Adaptive, SpinMode::Always] {
            let mut off = SpinGovernor::new(Duration::ZERO, mode);
            off.idle_ended(Duration::ZERO);
            assert_eq!(off.spin(), Duration::ZERO, "{mode}");
        }
    }

    #[test]
    fn modes_parse_from_their_names() {
        for mode in [SpinMode::Adaptive, SpinMode::Always] {
            assert_eq!(mode.as_str().parse::<SpinMode>(), Ok(mode));
        }
        let err = "sometimes".parse::<SpinMode>().unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
    }
}
