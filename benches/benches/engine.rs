//! Engine benchmarks: in-process hop latency between two parked workers (and between two
//! workers inside their spin window), throughput of a
//! 3-stage in-process pipeline with 1024-record batches, and the CPU use of a parked engine
//! holding 100 idle tasks.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use microcosm_engine::{
    Batch, Context, EdgeConfig, Engine, EngineConfig, EngineError, Input, Operator, Output, Status,
    TaskSpec, edge, wait_finished,
};

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn stamp() -> u64 {
    u64::try_from(base().elapsed().as_nanos()).unwrap()
}

// ---------------------------------------------------------------------------------------
// Hop latency

/// Every `period`, emits one record carrying its send time, waking on its own timer (so the
/// only threads involved in a hop are the two workers).
struct Pinger {
    period: Duration,
    next: Option<Instant>,
}

impl Operator for Pinger {
    type In = ();
    type Out = u64;
    fn run(
        &mut self,
        _: &mut [Input<()>],
        out: &mut [Output<u64>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        if cx.is_draining() {
            return Ok(Status::Finished);
        }
        let now = cx.now();
        let due = *self.next.get_or_insert(now);
        if now < due {
            return Ok(Status::WaitUntil(due));
        }
        if out[0].push(stamp()).is_err() {
            return Ok(Status::BlockedOnOutput);
        }
        let next = now + self.period;
        self.next = Some(next);
        Ok(Status::WaitUntil(next))
    }
}

/// Records receive time minus send time.
struct Ponger {
    samples: Arc<Mutex<Vec<u64>>>,
    received: Arc<AtomicU64>,
}

impl Operator for Ponger {
    type In = u64;
    type Out = ();
    fn run(
        &mut self,
        inputs: &mut [Input<u64>],
        _: &mut [Output<()>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        while let Some(batch) = inputs[0].pop() {
            let now = stamp();
            let batch = batch.into_owned()?;
            let mut samples = self.samples.lock().unwrap();
            for &sent in batch.iter() {
                samples.push(now.saturating_sub(sent));
            }
            drop(samples);
            self.received
                .fetch_add(batch.len() as u64, Ordering::AcqRel);
        }
        Ok(if inputs[0].is_finished() {
            Status::Finished
        } else {
            Status::BlockedOnInput
        })
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn hop_latency(c: &mut Criterion) {
    hop_latency_with(c, "hop_latency_parked", Duration::ZERO);
    // The workers may poll for 150 µs before parking and pings come every 100 µs: the gaps
    // are within the window, so the (default, adaptive) spin engages and the consumer is still
    // polling when a record arrives (what a steady stream sees).
    hop_latency_with(c, "hop_latency_spin_150us", Duration::from_micros(150));
}

fn hop_latency_with(c: &mut Criterion, name: &str, spin: Duration) {
    let engine = Engine::start(EngineConfig {
        spin,
        ..EngineConfig::with_workers(2)
    })
    .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
    let (out, inp) = edge::<u64>(&EdgeConfig::default()).unwrap();
    // One ping every 100 µs: both workers are parked (or, with a spin window, polling) when
    // it is sent.
    engine
        .spawn(
            TaskSpec::new(
                "ping",
                Pinger {
                    period: Duration::from_micros(100),
                    next: None,
                },
            )
            .output(out)
            .on_worker(0),
        )
        .unwrap();
    engine
        .spawn(
            TaskSpec::new(
                "pong",
                Ponger {
                    samples: samples.clone(),
                    received: received.clone(),
                },
            )
            .input(inp)
            .on_worker(1),
        )
        .unwrap();

    let mut group = c.benchmark_group("engine");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            // The pings run on their own; this thread only sleeps until `iters` more arrived
            // (so it does not compete for a core around a hop) and sums their latencies.
            let mark = samples.lock().unwrap().len();
            let want = received.load(Ordering::Acquire) + iters;
            while received.load(Ordering::Acquire) < want {
                std::thread::sleep(Duration::from_millis(2));
            }
            let taken = samples.lock().unwrap();
            let sum: u64 = taken[mark..mark + iters as usize].iter().sum();
            Duration::from_nanos(sum)
        });
    });
    group.finish();
    let mut all = samples.lock().unwrap().clone();
    if all.is_empty() {
        // Filtered out on the command line: nothing was measured.
        return;
    }
    all.sort_unstable();
    println!(
        "engine/{name}: {} pings, p50 {:.2} µs, p90 {:.2} µs, p99 {:.2} µs",
        all.len(),
        percentile(&all, 0.50),
        percentile(&all, 0.90),
        percentile(&all, 0.99)
    );
    engine.shutdown(Duration::from_secs(1));
}

/// The floor under the same conditions: a bare channel (std `sync_channel`, futex-based
/// blocking like crossbeam's) to a thread blocked in `recv`, no engine, measured the same way.
fn hop_floor(c: &mut Criterion) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(16);
    let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<u64>(16);
    let receiver = std::thread::spawn(move || {
        while let Ok(sent) = rx.recv() {
            let now = stamp();
            if back_tx.send(now.saturating_sub(sent)).is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(1 << 20);
    let mut group = c.benchmark_group("engine");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("hop_floor_channel_blocked_recv", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                std::thread::sleep(Duration::from_micros(50));
                tx.send(stamp()).unwrap();
                let ns = back_rx.recv().unwrap();
                samples.push(ns);
                total += Duration::from_nanos(ns);
            }
            total
        });
    });
    group.finish();
    drop(tx);
    receiver.join().unwrap();
    samples.sort_unstable();
    println!(
        "engine/hop_floor_channel_blocked_recv: {} pings, p50 {:.2} µs, p90 {:.2} µs, p99 {:.2} µs",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99)
    );
}

// ---------------------------------------------------------------------------------------
// Pipeline throughput

struct Source {
    next: u64,
    n: u64,
}

impl Operator for Source {
    type In = ();
    type Out = u64;
    fn run(
        &mut self,
        _: &mut [Input<()>],
        out: &mut [Output<u64>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let end = self.n.min(self.next + 16 * 1024);
        while self.next < end {
            if out[0].push(self.next).is_err() {
                return Ok(Status::BlockedOnOutput);
            }
            self.next += 1;
        }
        Ok(if self.next == self.n {
            Status::Finished
        } else {
            Status::Ready
        })
    }
}

/// Record-at-a-time map into a fresh output batch.
#[derive(Default)]
struct Map {
    held: Option<(Batch<u64>, usize)>,
}

impl Operator for Map {
    type In = u64;
    type Out = u64;
    fn run(
        &mut self,
        inputs: &mut [Input<u64>],
        out: &mut [Output<u64>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        loop {
            let (batch, start) = match self.held.take() {
                Some(h) => h,
                None => match inputs[0].pop() {
                    Some(b) => (b, 0),
                    None => break,
                },
            };
            let Batch::Owned(owned) = &batch else {
                return Err(EngineError::operator("expected owned batches"));
            };
            for i in start..owned.len() {
                if out[0].push(owned[i].wrapping_mul(3)).is_err() {
                    self.held = Some((batch, i));
                    return Ok(Status::BlockedOnOutput);
                }
            }
        }
        Ok(if inputs[0].is_finished() {
            Status::Finished
        } else {
            Status::BlockedOnInput
        })
    }
}

struct Sink {
    sum: Arc<AtomicU64>,
    acc: u64,
}

impl Operator for Sink {
    type In = u64;
    type Out = ();
    fn run(
        &mut self,
        inputs: &mut [Input<u64>],
        _: &mut [Output<()>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        while let Some(batch) = inputs[0].pop() {
            if let Batch::Owned(b) = batch {
                self.acc = b.iter().fold(self.acc, |a, &x| a.wrapping_add(x));
            }
        }
        if inputs[0].is_finished() {
            self.sum.store(self.acc, Ordering::Release);
            Ok(Status::Finished)
        } else {
            Ok(Status::BlockedOnInput)
        }
    }
}

fn run_pipeline(engine: &Engine, n: u64) -> Duration {
    let config = EdgeConfig {
        capacity: 16,
        batch_size: 1024,
        ..EdgeConfig::default()
    };
    let (a_out, a_in) = edge::<u64>(&config).unwrap();
    let (b_out, b_in) = edge::<u64>(&config).unwrap();
    let sum = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    engine
        .spawn(
            TaskSpec::new("source", Source { next: 0, n })
                .output(a_out)
                .on_worker(0),
        )
        .unwrap();
    engine
        .spawn(
            TaskSpec::new("map", Map::default())
                .input(a_in)
                .output(b_out)
                .on_worker(1),
        )
        .unwrap();
    let sink = engine
        .spawn(
            TaskSpec::new(
                "sink",
                Sink {
                    sum: sum.clone(),
                    acc: 0,
                },
            )
            .input(b_in)
            .on_worker(0),
        )
        .unwrap();
    wait_finished(&[engine], [sink.id()], Duration::from_secs(60)).unwrap();
    let elapsed = start.elapsed();
    let expected = (0..n).fold(0u64, |a, x| a.wrapping_add(x.wrapping_mul(3)));
    assert_eq!(sum.load(Ordering::Acquire), expected);
    elapsed
}

fn pipeline_throughput(c: &mut Criterion) {
    const N: u64 = 4 << 20;
    let engine = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let mut group = c.benchmark_group("engine");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(N));
    let mut best = f64::MAX;
    group.bench_function("pipeline_3_stage_1024", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = run_pipeline(&engine, N);
                best = best.min(d.as_secs_f64());
                total += d;
            }
            total
        });
    });
    group.finish();
    println!(
        "engine/pipeline_3_stage_1024: best run {:.1} M records/s",
        N as f64 / best / 1e6
    );
    engine.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Idle CPU

/// Process CPU time: sum of on-CPU nanoseconds of every thread (`/proc/self/task/*/schedstat`).
fn process_cpu() -> Duration {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let path = entry.path().join("schedstat");
            if let Ok(text) = std::fs::read_to_string(path)
                && let Some(first) = text.split_whitespace().next()
            {
                ns += first.parse::<u64>().unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

/// Does nothing until woken.
struct Dormant {
    queue: Arc<Mutex<VecDeque<u64>>>,
}

impl Operator for Dormant {
    type In = ();
    type Out = u64;
    fn run(
        &mut self,
        _: &mut [Input<()>],
        out: &mut [Output<u64>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let mut q = self.queue.lock().unwrap();
        while let Some(x) = q.pop_front() {
            if let Err(x) = out[0].push(x) {
                q.push_front(x);
                return Ok(Status::BlockedOnOutput);
            }
        }
        Ok(if cx.is_draining() {
            Status::Finished
        } else {
            Status::Idle
        })
    }
}

fn idle_cpu(c: &mut Criterion) {
    let engine = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    for i in 0..50 {
        let (out, inp) = edge::<u64>(&EdgeConfig::default()).unwrap();
        engine
            .spawn(
                TaskSpec::new(
                    format!("idle-src-{i}"),
                    Dormant {
                        queue: queue.clone(),
                    },
                )
                .output(out),
            )
            .unwrap();
        engine
            .spawn(
                TaskSpec::new(
                    format!("idle-sink-{i}"),
                    Sink {
                        sum: Arc::new(AtomicU64::new(0)),
                        acc: 0,
                    },
                )
                .input(inp),
            )
            .unwrap();
    }
    assert_eq!(engine.live_tasks(), 100);
    std::thread::sleep(Duration::from_millis(100));

    let cpu0 = process_cpu();
    let wall0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let cpu = process_cpu() - cpu0;
    let wall = wall0.elapsed();
    println!(
        "engine/idle_cpu_100_tasks: {:.3}% of a core ({:?} CPU over {:?})",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        cpu,
        wall
    );

    // The same as a criterion figure: CPU time consumed per 10 ms of wall time.
    let mut group = c.benchmark_group("engine");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("idle_cpu_per_10ms_100_tasks", |b| {
        b.iter_custom(|iters| {
            let cpu0 = process_cpu();
            std::thread::sleep(Duration::from_millis(10) * u32::try_from(iters).unwrap());
            process_cpu() - cpu0
        });
    });
    group.finish();
    assert!(engine.shutdown(Duration::from_secs(2)).drained);
}

criterion_group!(
    benches,
    hop_latency,
    hop_floor,
    pipeline_throughput,
    idle_cpu
);
criterion_main!(benches);
