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
//! Only idle periods the worker spun through enter the average. A spinning worker sees work
//! the moment it arrives, so its idle period is the true gap; a sleeping one also measures its
//! own wake-up (tens of µs on a VM) and, because work piles up meanwhile, wakes less often
//! for longer gaps. Averaging those would let the mode decide itself: at a rate whose gaps
//! are near the window, a worker that started out sleeping measured gaps over the window and
//! kept sleeping, while one that started out spinning kept spinning. So a sleeping worker
//! instead spins through one idle period in [`PROBE_EVERY`] to sample the gaps as a spinning
//! one would see them, which costs at most one window per that many idle periods.
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
/// A sleeping adaptive worker spins through one idle period in this many, to keep sampling
/// the gaps between arrivals (see the module docs).
pub const PROBE_EVERY: u32 = 16;

/// Decides how long an idle worker spins; see the module docs.
///
/// The worker calls [`SpinGovernor::idle_started`] when it runs out of work, spins for the
/// duration returned, and calls [`SpinGovernor::idle_ended`] with the whole idle period
/// (spinning and sleeping included) once it has work again.
#[derive(Debug, Clone)]
pub struct SpinGovernor {
    window: Duration,
    mode: SpinMode,
    /// Moving average of the idle periods spun through, in ns.
    average_idle_ns: u64,
    /// Idle periods not spun through since the last one that was.
    slept: u32,
    /// Whether the current idle period spins.
    spinning: bool,
}

impl SpinGovernor {
    /// A governor for spin window `window` (zero: never spin). It starts out as after a long
    /// idle period: an adaptive one spins only once work arrives often.
    pub fn new(window: Duration, mode: SpinMode) -> Self {
        let mut governor = Self {
            window,
            mode,
            average_idle_ns: 0,
            slept: 0,
            spinning: false,
        };
        governor.average_idle_ns = governor.clamp(Duration::MAX);
        governor
    }

    /// The configured window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether the worker spins now (through every idle period), rather than sleeping at
    /// once (apart from a probe in every [`PROBE_EVERY`] idle periods).
    pub fn spins(&self) -> bool {
        match self.mode {
            _ if self.window.is_zero() => false,
            SpinMode::Always => true,
            SpinMode::Adaptive => self.average_idle_ns <= nanos(self.window),
        }
    }

    /// Starts an idle period: how long to spin before sleeping (zero: sleep at once).
    pub fn idle_started(&mut self) -> Duration {
        let probe = !self.window.is_zero() && self.slept + 1 >= PROBE_EVERY;
        self.spinning = self.spins() || probe;
        if self.spinning {
            self.slept = 0;
            self.window
        } else {
            self.slept += 1;
            Duration::ZERO
        }
    }

    /// Ends the idle period begun by the last [`SpinGovernor::idle_started`]: it lasted
    /// `idle`. Only a period spun through is averaged (see the module docs).
    pub fn idle_ended(&mut self, idle: Duration) {
        if !std::mem::take(&mut self.spinning) {
            return;
        }
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

    /// What a sleeping worker adds to a gap: waking up, and the work that piles up meanwhile.
    const WAKE: Duration = Duration::from_micros(120);

    /// One idle period before work arrives `gap` after the worker ran out: a worker spinning
    /// long enough sees it at once, one that sleeps (or spins too briefly) also pays `WAKE`.
    /// Returns whether the period was spun through.
    fn period(g: &mut SpinGovernor, gap: Duration) -> bool {
        let spin = g.idle_started();
        let idle = if spin >= gap { gap } else { gap + WAKE };
        g.idle_ended(idle);
        !spin.is_zero()
    }

    /// Idle periods, at `gap` each, until the governor spins through every one (true) or
    /// `limit` periods pass (false).
    fn starts_spinning(g: &mut SpinGovernor, gap: Duration, limit: usize) -> bool {
        (0..limit).any(|_| {
            period(g, gap);
            g.spins()
        })
    }

    #[test]
    fn adaptive_spins_once_work_arrives_within_the_window_and_stops_when_it_thins_out() {
        let mut g = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
        assert!(!g.spins(), "a fresh worker sleeps");
        assert_eq!(g.idle_started(), Duration::ZERO);
        g.idle_ended(us(80));
        // A dense stream: gaps of 80 µs, which a sleeping worker measures as 200 µs, over the
        // window. Its probes see the true gaps, and within a few hundred gaps it spins.
        assert!(
            starts_spinning(&mut g, us(80), 400),
            "never started spinning"
        );
        for _ in 0..100 {
            assert!(
                period(&mut g, us(80)),
                "a spinning worker spins every period"
            );
        }
        // One long pause does not stop it; a trickle (1 ms gaps) does.
        period(&mut g, Duration::from_secs(5));
        assert!(g.spins(), "one pause counts as at most four windows");
        let mut gaps = 0;
        while g.spins() {
            period(&mut g, us(1000));
            gaps += 1;
            assert!(gaps < 64, "never stopped spinning");
        }
    }

    #[test]
    fn gaps_longer_than_the_window_never_make_it_spin_but_are_probed() {
        let mut g = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
        let mut spun = 0;
        for _ in 0..1600 {
            spun += u32::from(period(&mut g, us(200)));
            assert!(!g.spins());
        }
        assert_eq!(
            spun,
            1600 / PROBE_EVERY,
            "one probe per {PROBE_EVERY} periods"
        );
    }

    #[test]
    fn the_mode_follows_the_gaps_not_where_it_started() {
        // Gaps the window catches, but not once a sleeping worker's wake-up is added: both a
        // sleeping and a spinning worker end up spinning.
        let dense = |g: &mut SpinGovernor| starts_spinning(g, us(40), 400);
        for gap in [us(100), us(140)] {
            let mut sleeping = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
            assert!(
                starts_spinning(&mut sleeping, gap, 800),
                "{gap:?} from sleeping"
            );
            let mut spinning = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
            assert!(dense(&mut spinning));
            for _ in 0..800 {
                period(&mut spinning, gap);
            }
            assert!(spinning.spins(), "{gap:?} from spinning");
        }
        // Gaps just over the window: both end up sleeping.
        let mut spinning = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
        assert!(dense(&mut spinning));
        for _ in 0..800 {
            period(&mut spinning, us(170));
        }
        assert!(!spinning.spins(), "170 µs gaps from spinning");
        let mut sleeping = SpinGovernor::new(WINDOW, SpinMode::Adaptive);
        assert!(!starts_spinning(&mut sleeping, us(170), 800));
    }

    #[test]
    fn always_spins_the_window_and_a_zero_window_never_spins() {
        let mut always = SpinGovernor::new(WINDOW, SpinMode::Always);
        for _ in 0..3 {
            assert_eq!(always.idle_started(), WINDOW);
            always.idle_ended(Duration::from_secs(1));
            assert!(always.spins());
        }
        for mode in [SpinMode::Adaptive, SpinMode::Always] {
            let mut off = SpinGovernor::new(Duration::ZERO, mode);
            for _ in 0..2 * PROBE_EVERY {
                assert_eq!(off.idle_started(), Duration::ZERO, "{mode}");
                off.idle_ended(Duration::ZERO);
            }
            assert!(!off.spins(), "{mode}");
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
