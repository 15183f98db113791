//! The machine's own latency floor, measured before a bench sweep: how long a thread that
//! never sleeps still waits for its CPU.
//!
//! One thread per core spins reading the monotonic clock. Any gap between two readings is
//! time the thread did not run although it wanted to: the kernel's own threads, interrupts,
//! another process, or, in a virtual machine, the host descheduling the vCPU. A record that
//! reaches a pipeline thread at a random instant inside such a gap waits for the rest of it,
//! so the gaps set a floor under the pipeline's tail latency that no tuning of ours removes.
//!
//! [`residual_quantile`] turns the gaps into that floor: the wait of a random instant at a
//! given percentile. A pipeline has several threads on a record's path, so its floor is
//! higher still; the figure is a lower bound to read the sweep's p99 and p99.9 against.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Gaps shorter than this are the clock read itself and cache misses, not scheduling.
const MIN_GAP: Duration = Duration::from_micros(20);
/// At most this many gaps are kept per thread (a pathological machine could have more).
const MAX_GAPS: usize = 1 << 20;

/// The floor measured over all spinning threads.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// Seconds measured.
    pub secs: f64,
    /// Spinning threads (one per core).
    pub threads: usize,
    /// A random instant's wait at the 99th percentile (µs).
    pub p99_wait_us: f64,
    /// A random instant's wait at the 99.9th percentile (µs).
    pub p999_wait_us: f64,
    /// Gaps longer than 200 µs, over all threads.
    pub gaps_over_200us: usize,
    /// Gaps longer than 1 ms, over all threads.
    pub gaps_over_1ms: usize,
    /// The longest gap (µs).
    pub max_gap_us: f64,
    /// Share of the threads' time spent in gaps longer than 200 µs (%).
    pub time_in_gaps_over_200us_pct: f64,
}

/// Spins one thread per core for `duration` and summarises their gaps.
pub fn measure(duration: Duration) -> Floor {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let handles: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || spin(duration)))
        .collect();
    let mut gaps = Vec::new();
    let mut total_ns = 0u64;
    for h in handles {
        // A spinning thread only reads the clock and pushes to its own Vec, so it does not
        // panic; were one lost anyway, the others still give a floor.
        if let Ok((g, ns)) = h.join() {
            gaps.extend(g);
            total_ns += ns;
        }
    }
    summarise(&mut gaps, total_ns, duration.as_secs_f64(), threads)
}

/// One spinning thread: its gaps (ns) and the time it measured (ns).
fn spin(duration: Duration) -> (Vec<u64>, u64) {
    let min = MIN_GAP.as_nanos() as u64;
    let start = Instant::now();
    let mut last = start;
    let mut gaps = Vec::new();
    loop {
        let now = Instant::now();
        let gap = now.duration_since(last).as_nanos() as u64;
        if gap >= min && gaps.len() < MAX_GAPS {
            gaps.push(gap);
        }
        last = now;
        if now.duration_since(start) >= duration {
            return (gaps, now.duration_since(start).as_nanos() as u64);
        }
    }
}

fn summarise(gaps: &mut [u64], total_ns: u64, secs: f64, threads: usize) -> Floor {
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    let us = |ns: u64| ns as f64 / 1000.0;
    let over_200 = gaps.iter().filter(|&&g| g > 200_000).count();
    let in_200: u64 = gaps.iter().filter(|&&g| g > 200_000).sum();
    Floor {
        secs,
        threads,
        p99_wait_us: us(residual_quantile(gaps, total_ns, 0.01)),
        p999_wait_us: us(residual_quantile(gaps, total_ns, 0.001)),
        gaps_over_200us: over_200,
        gaps_over_1ms: gaps.iter().filter(|&&g| g > 1_000_000).count(),
        max_gap_us: us(gaps.first().copied().unwrap_or(0)),
        time_in_gaps_over_200us_pct: if total_ns == 0 {
            0.0
        } else {
            100.0 * in_200 as f64 / total_ns as f64
        },
    }
}

/// The wait `x` that a uniformly random instant exceeds with probability `tail`, given the
/// gaps (ns, sorted longest first) in `total_ns` of observed time: an instant inside a gap
/// of length `g` waits for the rest of it, so P(wait > x) = Σ max(g − x, 0) / total. 0 when
/// the gaps are too rare to reach `tail`.
pub fn residual_quantile(gaps_desc: &[u64], total_ns: u64, tail: f64) -> u64 {
    if total_ns == 0 || gaps_desc.is_empty() {
        return 0;
    }
    let budget = tail * total_ns as f64;
    // With the k longest gaps above x, P(wait > x)·total = sum_k − k·x, decreasing in x.
    // Find the smallest x where it is ≤ budget, scanning k upwards.
    let mut sum = 0.0;
    for (i, &g) in gaps_desc.iter().enumerate() {
        sum += g as f64;
        let k = (i + 1) as f64;
        // x solving sum − k·x = budget, valid if it lies within [next gap, this gap].
        let x = (sum - budget) / k;
        let next = gaps_desc.get(i + 1).copied().unwrap_or(0) as f64;
        if x >= next {
            return x.clamp(0.0, g as f64) as u64;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_residual_wait_of_a_random_instant() {
        // 1 s observed, one 20 ms gap: a random instant is inside it 2 % of the time, waiting
        // 0-20 ms uniformly. P(wait > x) = (20 ms − x) / 1 s: 1 % at x = 10 ms, 0.1 % at 19 ms.
        let gaps = [20_000_000];
        assert_eq!(residual_quantile(&gaps, 1_000_000_000, 0.01), 10_000_000);
        assert_eq!(residual_quantile(&gaps, 1_000_000_000, 0.001), 19_000_000);
        // Gaps covering less than the tail: no floor.
        assert_eq!(residual_quantile(&gaps, 1_000_000_000, 0.05), 0);
        assert_eq!(residual_quantile(&[], 1_000_000_000, 0.01), 0);
        // Two gaps, 4 ms and 2 ms in 100 ms. Above 2 ms only the longer one counts:
        // (4 − x) / 100 = 1 % at x = 3 ms. Below, both do: ((4 − x) + (2 − x)) / 100 = 4 % at
        // x = 1 ms.
        assert_eq!(
            residual_quantile(&[4_000_000, 2_000_000], 100_000_000, 0.01),
            3_000_000
        );
        assert_eq!(
            residual_quantile(&[4_000_000, 2_000_000], 100_000_000, 0.04),
            1_000_000
        );
    }

    #[test]
    fn summary_counts_and_shares() {
        let mut gaps = vec![300_000, 50_000, 2_000_000];
        let f = summarise(&mut gaps, 1_000_000_000, 1.0, 2);
        assert_eq!((f.gaps_over_200us, f.gaps_over_1ms), (2, 1));
        assert_eq!(f.max_gap_us, 2000.0);
        assert!((f.time_in_gaps_over_200us_pct - 0.23).abs() < 1e-9);
        // 2.35 ms of gaps in 1 s: P(wait > 0) = 0.235 % < 1 %, so the p99 floor is 0.
        assert_eq!(f.p99_wait_us, 0.0);
        assert!(f.p999_wait_us > 0.0);
    }

    #[test]
    fn spinning_measures_its_duration() {
        let (_, ns) = spin(Duration::from_millis(20));
        assert!(ns >= 20_000_000);
    }
}
