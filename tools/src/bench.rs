//! `microcosm bench`: the latency/throughput sweep of the demo pipeline.
//!
//! One local cluster (1 master, N executors) serves the whole sweep; every (rate, ddl-freq)
//! pair is one demo job with its own flow-id, run to completion one after the other. For
//! each run the sink CSVs are read back: data rows produced within the first
//! `--warmup-secs` of the run are discarded, the rest give end-to-end latency
//! (`sink_ns − produced_ns`) and the two stages the CSV records (`produced → synced`,
//! `synced → sink`) as HDR histograms, and the achieved throughput. Each process's CPU
//! time (`/proc/<pid>/stat`) is taken as a delta over the run and its peak RSS (`VmHWM`,
//! reset through `/proc/<pid>/clear_refs` before the run where the kernel allows it), and
//! per kind of thread (threads grouped by name) the CPU time, context switches and time spent
//! waiting for a CPU over the run (`/proc/<pid>/task/*`): how often the engine workers were
//! switched out while runnable, and how often every other thread woke up to take a vCPU from
//! them. Each executor's engine workers' wall time is split into time on a CPU, waiting for
//! one, asleep (the engine's own count, over `GetExecutorStatus`) and the rest, when the
//! hypervisor or interrupts held their vCPU; the kernel's steal count for the whole machine
//! is recorded too. The verifier checks every run. Results go to `results.json`,
//! `latency.svg` and stdout.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use microcosm_control::proto::{
    ControlJob, DataConnection, ExecutorStatus, GetJob, JobAction, JobControlRequest, JobRef,
};
use microcosm_demo::{DemoSpec, RowKind, SinkRow};
use serde::Serialize;

use crate::demo::parse_duration;
use crate::local::{Interrupts, LocalCluster, LocalClusterDir};

/// Flags of `microcosm bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Offered total rates (records/s) to sweep; 0 = as fast as possible ("max").
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,100000,500000,1000000,0"
    )]
    rates: Vec<u64>,
    /// DDL frequencies to sweep (a DDL every this many pks; 0 = none).
    #[arg(long, value_delimiter = ',', default_value = "1000,0")]
    ddl_freqs: Vec<u64>,
    /// Data records per table for every run (default: rate × (warm-up + duration) / tables,
    /// or --max-rate-rcd-cnt for rate 0).
    #[arg(long)]
    rcd_cnt: Option<u64>,
    /// Data records per table of a rate-0 (maximum rate) run when --rcd-cnt is not given.
    #[arg(long, default_value_t = 200_000)]
    max_rate_rcd_cnt: u64,
    /// Seconds at the start of each run whose rows (by produced time) are not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Seconds each run is measured for at its offered rate (sizes rcd-cnt).
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Output directory for results.json and latency.svg (created if missing).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Number of executors.
    #[arg(long, default_value_t = 2)]
    executors: u32,
    #[command(flatten)]
    tuning: crate::local::ExecutorTuning,
    /// Producers (tables), T.
    #[arg(long, default_value_t = 10)]
    table_num: u32,
    /// Binlog streams, S.
    #[arg(long, default_value_t = 4)]
    binlog_num: u32,
    /// Records per batch (default: the job spec's default).
    #[arg(long)]
    batch_size: Option<i64>,
    /// Linger bound of partial batches in µs (default: the job spec's default).
    #[arg(long)]
    linger_us: Option<i64>,
    /// Interval between checkpoints in ms (default: the job spec's default).
    #[arg(long)]
    checkpoint_interval_ms: Option<i64>,
    /// Seconds of measuring the machine's own latency floor before the cluster starts: one
    /// spinning thread per core records how long it waits for its CPU (0 = skip).
    #[arg(long, default_value_t = 3.0)]
    floor_secs: f64,
    /// Seconds of idle-cluster CPU measurement before the sweep (0 = skip).
    #[arg(long, default_value_t = 5.0)]
    idle_secs: f64,
    /// Measure only the idle cluster (for --idle-secs, which must be > 0); run no job. The
    /// flags that shape the runs are refused with it.
    #[arg(
        long,
        conflicts_with_all = [
            "rates", "ddl_freqs", "rcd_cnt", "max_rate_rcd_cnt", "warmup_secs", "duration_secs",
            "table_num", "binlog_num", "batch_size", "linger_us", "checkpoint_interval_ms",
            "run_timeout",
        ]
    )]
    idle_only: bool,
    /// Give a run up (and cancel its job) after this long, e.g. `90s`.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    run_timeout: Duration,
    /// Keep the cluster directory (logs and every run's sink files) afterwards. Without it
    /// the directory is removed when the sweep ends (every run's files stay until then:
    /// about 1.6 GB for the default sweep).
    #[arg(long)]
    keep: bool,
}

/// The machine the sweep ran on.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    kernel: String,
    /// 1-, 5- and 15-minute load averages when the sweep started.
    loadavg_at_start: String,
}

/// Fixed parameters of every run.
#[derive(Debug, Clone, Serialize)]
struct Conditions {
    masters: u32,
    executors: u32,
    table_num: u32,
    binlog_num: u32,
    batch_size: u32,
    linger_us: u64,
    checkpoint_interval_ms: u64,
    /// Engine workers per executor as asked (`null`: cores ÷ executors).
    executor_workers: Option<usize>,
    /// Executors' spin window (µs).
    spin_us: u64,
    /// When executors spin (`adaptive` or `always`; `off` with `spin-us = 0`).
    spin_mode: String,
    /// The executors' heartbeat interval, as the masters give it (ms).
    executor_heartbeat_ms: u64,
    warmup_secs: f64,
    duration_secs: f64,
    cluster: &'static str,
}

/// Percentiles of one distribution, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Percentiles {
    count: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// Share of the rows slower than 200 µs, in % (the 100k records/s p99 target holds
    /// while this stays under 1 %).
    pct_over_200us: f64,
    /// Share of the rows slower than 1 ms, in % (the p99.9 target: under 0.1 %).
    pct_over_1ms: f64,
}

/// How many rows are slow right after a checkpoint boundary compared with the rest of the
/// run: rows are split by when they were produced, relative to the job's checkpoint slots
/// (Unix time divided by the interval, the boundaries every producer sends barriers at).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct CheckpointWindow {
    /// The window after each boundary, in ms.
    window_ms: u64,
    /// The window's share of the run's time, in %.
    window_pct_of_time: f64,
    /// Measured rows produced inside a window.
    rows_after_boundary: u64,
    /// Of those, the share slower than 200 µs, in %.
    after_boundary_pct_over_200us: f64,
    /// Measured rows produced outside the windows.
    rows_elsewhere: u64,
    /// Of those, the share slower than 200 µs, in %.
    elsewhere_pct_over_200us: f64,
}

/// Slow rows grouped into episodes: rows slower than 200 µs whose produced times lie within
/// [`EPISODE_GAP_MS`] of the previous slow row's belong to one episode. A stall of a thread
/// (a vCPU the host did not run, a preemption, a checkpoint) makes one episode of every row
/// in flight through it, so a run's tail is a few episodes, and their sizes and spacing
/// tell a periodic disturbance from a rare long one.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct SlowEpisodes {
    /// How many episodes.
    count: u64,
    /// Slow rows in all of them.
    slow_rows: u64,
    /// The share of the slow rows in the [`LARGEST_EPISODES`] largest episodes, in %.
    largest_pct_of_slow_rows: f64,
    /// The largest episodes by rows, largest first.
    largest: Vec<Episode>,
}

/// One episode of slow rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Episode {
    /// When its first slow row was produced, in seconds after the first measured row.
    at_s: f64,
    /// From its first slow row's produced time to its last's, in ms.
    span_ms: f64,
    /// Rows slower than 200 µs in it.
    rows: u64,
    /// Of those, the rows slower than 1 ms.
    rows_over_1ms: u64,
    /// Its slowest row, in µs.
    max_us: f64,
}

/// One process over one run (or over the idle window).
#[derive(Debug, Clone, Serialize)]
struct ProcessUsage {
    name: String,
    /// utime + stime consumed during the window.
    cpu_s: f64,
    /// `cpu_s` over the window's wall time, in % of one core.
    cpu_pct_of_core: f64,
    /// VmHWM at the end of the window, in MiB.
    peak_rss_mb: Option<f64>,
    /// Whether the peak was reset at the start of the window (otherwise it is the peak
    /// since the process started).
    peak_rss_reset: bool,
    /// Its threads over the window, grouped and sorted by name.
    threads: Vec<ThreadUsage>,
}

/// The threads of one name in one process over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct ThreadUsage {
    /// The thread name as the kernel keeps it (`comm`, at most 15 bytes): `microcosm-worke`
    /// for the engine workers, `sink-N-file` for sink writers, `tokio-rt-worker` for a
    /// runtime's threads.
    name: String,
    /// How many threads of that name were seen at the end of the window.
    threads: usize,
    /// utime + stime consumed during the window.
    cpu_s: f64,
    /// Times a second they gave their CPU up (blocked, slept, parked): about how often they
    /// were woken again.
    voluntary_switches_per_s: f64,
    /// Times a second they were switched out while still runnable: for the engine workers,
    /// how often another thread took their CPU, by preempting them or because a spinning
    /// worker yielded it (`sched_yield` hands the CPU over only when another thread waits).
    involuntary_switches_per_s: f64,
    /// Milliseconds a second they were runnable but waited for a vCPU that another thread of
    /// this machine held (the kernel's `run_delay`, `/proc/<pid>/task/<tid>/schedstat`),
    /// summed over the threads; `None` where the kernel keeps no such count.
    waited_ms_per_s: Option<f64>,
}

/// What the host took from the machine's vCPUs over a window: the kernel's steal time
/// (`/proc/stat`), time a vCPU wanted to run and the hypervisor ran something else. A thread
/// on such a vCPU stops without any thread of this machine having taken its place, so the
/// per-thread counts (switches, `run_delay`) do not show it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct HostSteal {
    /// Steal time over all vCPUs, in ms (the kernel counts it in clock ticks, 10 ms apiece
    /// at the usual 100 Hz).
    steal_ms: f64,
    /// `steal_ms` against the window's wall time times the vCPUs, in %.
    pct_of_vcpus: f64,
}

/// The name the engine gives its worker threads, as `comm` holds it (15 bytes).
const ENGINE_WORKER_COMM: &str = "microcosm-worke";

/// The idle cluster.
#[derive(Debug, Clone, Serialize)]
struct Idle {
    secs: f64,
    processes: Vec<ProcessUsage>,
    total_cpu_pct_of_core: f64,
    /// What the host took from the vCPUs meanwhile (`None`: no `/proc/stat`).
    host_steal: Option<HostSteal>,
}

/// One (rate, ddl-freq) run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    /// Offered total records/s (0 = maximum).
    rate: u64,
    ddl_freq: u64,
    rcd_cnt: u64,
    flow_id: String,
    job_id: Option<u64>,
    /// The job's final state ("Finished", "Failed", "Cancelled", "TimedOut", ...).
    state: String,
    /// The run timed out and its job did not end when cancelled: it may still be running, so
    /// the sweep stops here.
    #[serde(skip)]
    left_running: bool,
    /// Submit → final state, in seconds.
    wall_s: f64,
    verified: bool,
    violations: u64,
    data_rows: u64,
    /// Data rows after the warm-up cut.
    measured_rows: u64,
    /// Whether rows were discarded for warm-up (false when the run was shorter).
    warmup_applied: bool,
    /// Measured rows / (last sink time − first produced time of the measured rows).
    achieved_rows_per_s: Option<f64>,
    /// `sink_ns − produced_ns` of measured data rows.
    latency: Option<Percentiles>,
    /// `synced_ns − produced_ns`: producer pacing, binlog, QUIC, receive, syncer, barrier.
    produced_to_synced: Option<Percentiles>,
    /// `sink_ns − synced_ns`: syncer → sink hop and the CSV write.
    synced_to_sink: Option<Percentiles>,
    /// Slow rows right after checkpoint boundaries against the rest.
    after_checkpoint: Option<CheckpointWindow>,
    /// The slow rows as episodes; `None` when there are none, or more than
    /// [`MAX_EPISODE_ROWS`] (an overloaded run, where every row is slow).
    slow_episodes: Option<SlowEpisodes>,
    /// Measured rows whose sink time precedes their produced time (clock skew).
    negative_latency_rows: u64,
    processes: Vec<ProcessUsage>,
    /// What the host took from the vCPUs over the same window as the threads' counts
    /// (`None`: no `/proc/stat`).
    host_steal: Option<HostSteal>,
    /// How each executor's engine workers spent that window.
    worker_time: Vec<WorkerTime>,
    /// The executors' connections to each other over the run, seen from both ends.
    data_plane: Vec<DataLink>,
    error: Option<String>,
}

/// One executor-to-executor data connection over a run, as one of its ends reports it
/// (`GetExecutorStatus` before the job and after it ended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct DataLink {
    /// The reporting executor.
    executor: String,
    /// The other end's address.
    peer: String,
    /// True on the end that dialed it (the one that sends data streams over it).
    dialed: bool,
    /// Smoothed round-trip time at the end of the run (µs).
    rtt_us: u64,
    /// Congestion window at the end of the run (bytes).
    cwnd: u64,
    /// During the run: times the congestion controller backed off.
    congestion_events: u64,
    /// During the run: packets declared lost.
    lost_packets: u64,
    /// During the run: QUIC packets sent.
    sent_packets: u64,
    /// During the run: UDP datagrams sent.
    datagrams_sent: u64,
    /// During the run: UDP datagrams received.
    datagrams_received: u64,
}

/// The executor-to-executor connections in `after`, with their counters taken relative to
/// `before`: a connection absent from `before`, or whose counters went backwards (it was
/// dialed again), counts from zero.
fn data_links(before: &[ExecutorStatus], after: &[ExecutorStatus]) -> Vec<DataLink> {
    let mut links = Vec::new();
    for status in after {
        for c in status.connections.iter().filter(|c| c.role == "executor") {
            let earlier = before
                .iter()
                .filter(|b| b.name == status.name)
                .flat_map(|b| &b.connections)
                .find(|b| b.peer == c.peer && b.dialed == c.dialed && b.role == c.role)
                .filter(|b| b.sent_packets <= c.sent_packets);
            let since = |now: u64, then: fn(&DataConnection) -> u64| {
                now.saturating_sub(earlier.map_or(0, then))
            };
            links.push(DataLink {
                executor: status.name.clone(),
                peer: c.peer.clone(),
                dialed: c.dialed,
                rtt_us: c.rtt_us,
                cwnd: c.cwnd,
                congestion_events: since(c.congestion_events, |b| b.congestion_events),
                lost_packets: since(c.lost_packets, |b| b.lost_packets),
                sent_packets: since(c.sent_packets, |b| b.sent_packets),
                datagrams_sent: since(c.datagrams_sent, |b| b.datagrams_sent),
                datagrams_received: since(c.datagrams_received, |b| b.datagrams_received),
            });
        }
    }
    links
}

/// Everything `results.json` holds.
#[derive(Debug, Serialize)]
struct Results {
    machine: Machine,
    conditions: Conditions,
    /// The machine's latency floor, measured before the cluster started.
    floor: Option<crate::floor::Floor>,
    idle: Option<Idle>,
    runs: Vec<Run>,
}

/// Runs the sweep. Returns whether every run passed verification.
pub async fn run(args: BenchArgs) -> anyhow::Result<bool> {
    if args.executors == 0 {
        bail!("--executors must be at least 1");
    }
    let non_negative = |v: f64| v >= 0.0 && v.is_finite();
    let valid = non_negative(args.warmup_secs)
        && non_negative(args.idle_secs)
        && non_negative(args.floor_secs)
        && non_negative(args.duration_secs)
        && args.duration_secs > 0.0;
    if !valid {
        bail!("--warmup-secs, --idle-secs and --floor-secs must be >= 0 and --duration-secs > 0");
    }
    let floor_time = secs_flag("--floor-secs", args.floor_secs)?;
    secs_flag("--idle-secs", args.idle_secs)?;
    if args.idle_only && args.idle_secs == 0.0 {
        bail!("--idle-only measures the idle cluster for --idle-secs, which must then be > 0");
    }
    if !args.idle_only && (args.rates.is_empty() || args.ddl_freqs.is_empty()) {
        bail!("--rates and --ddl-freqs must not be empty");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let mut base = DemoSpec {
        table_num: args.table_num,
        binlog_num: args.binlog_num,
        ..DemoSpec::default()
    };
    microcosm_demo::DemoSpecOverrides {
        batch_size: args.batch_size,
        linger_us: args.linger_us,
        checkpoint_interval_ms: args.checkpoint_interval_ms,
        ..Default::default()
    }
    .apply(&mut base)?;
    // Every run's spec is checked now, not when the sweep reaches it.
    if !args.idle_only {
        for &ddl_freq in &args.ddl_freqs {
            for &rate in &args.rates {
                run_spec(&base, &args, rate, ddl_freq, Path::new("sink"))
                    .validate()
                    .with_context(|| {
                        format!("the run at rate {} ddl-freq {ddl_freq}", rate_label(rate))
                    })?;
            }
        }
    }

    let machine = machine();
    let conditions = Conditions {
        masters: 1,
        executors: args.executors,
        table_num: base.table_num,
        binlog_num: base.binlog_num,
        batch_size: base.batch_size,
        linger_us: base.linger_us,
        checkpoint_interval_ms: base.checkpoint_interval_ms,
        executor_workers: args.tuning.workers,
        spin_us: args
            .tuning
            .spin_us
            .unwrap_or(microcosm_control::executor::DEFAULT_SPIN_US),
        spin_mode: if args.tuning.spin_us == Some(0) {
            "off".to_string()
        } else {
            args.tuning.spin_mode.unwrap_or_default().to_string()
        },
        executor_heartbeat_ms: args.tuning.executor_heartbeat_ms.unwrap_or_else(|| {
            let default = microcosm_control::liveness::LivenessConfig::default();
            u64::try_from(default.heartbeat_interval.as_millis()).unwrap_or(u64::MAX)
        }),
        warmup_secs: args.warmup_secs,
        duration_secs: args.duration_secs,
        cluster: "one cluster for the whole sweep, one job per run",
    };
    println!(
        "microcosm bench: {} CPU(s), {}; load {}",
        machine.nproc, machine.cpu_model, machine.loadavg_at_start
    );

    let floor = (args.floor_secs > 0.0).then(|| {
        println!(
            "measuring the machine's latency floor for {:.1} s ...",
            args.floor_secs
        );
        let floor = crate::floor::measure(floor_time);
        print_floor(&floor);
        floor
    });

    // Before the cluster starts: a signal while it starts is held, not fatal.
    let mut interrupts = Interrupts::install()?;
    let cluster_dir = LocalClusterDir::create("microcosm-bench-")?;
    let sink_root = cluster_dir.path().join("sink");
    let tuning = crate::local::ExecutorTuning {
        // The runs differ in rate and DDL frequency only: one plan's size fits them all.
        slots: Some(crate::local::slots_for(&microcosm_demo::plan::plan(&base))),
        ..args.tuning
    };
    let mut cluster = cluster_dir.launch(1, args.executors, tuning)?;
    println!(
        "cluster: 1 master, {} executor(s), dir {}",
        args.executors,
        cluster.dir().display()
    );
    let outcome = tokio::select! {
        r = sweep(&mut cluster, &args, &base, &sink_root) => Some(r),
        _ = interrupts.recv() => None,
    };
    cluster.shutdown();
    // The directory holds the logs an error names: kept then, and with --keep.
    if args.keep || outcome.as_ref().is_some_and(Result::is_err) {
        println!("cluster dir kept: {}", cluster.keep().display());
    }
    let Some(outcome) = outcome else {
        bail!("interrupted");
    };
    let (idle, runs) = outcome?;

    let results = Results {
        machine,
        conditions,
        floor,
        idle,
        runs,
    };
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!();
    if let Some(floor) = &results.floor {
        print_floor(floor);
    }
    if let Some(idle) = &results.idle {
        print_idle(idle);
    }
    if !results.runs.is_empty() {
        print!("{}", table(&results.runs));
        println!();
        print!("{}", stage_table(&results.runs));
        println!();
        print!("{}", wakeup_table(&results.runs));
        println!();
        print!("{}", worker_time_table(&results.runs));
        println!();
        print!("{}", data_plane_table(&results.runs));
        let svg_path = args.out.join("latency.svg");
        std::fs::write(&svg_path, latency_svg(&results.runs))
            .with_context(|| format!("cannot write {}", svg_path.display()))?;
        println!("\nwrote {} and {}", json_path.display(), svg_path.display());
    } else {
        println!("wrote {}", json_path.display());
    }
    let failed: Vec<String> = results
        .runs
        .iter()
        .filter(|r| !r.verified)
        .map(|r| format!("rate {} ddl {}", rate_label(r.rate), r.ddl_freq))
        .collect();
    if failed.is_empty() {
        Ok(true)
    } else {
        println!("verification FAILED for: {}", failed.join(", "));
        Ok(false)
    }
}

/// The job spec of the run at `rate` and `ddl_freq`, writing under `sink_root`.
fn run_spec(
    base: &DemoSpec,
    args: &BenchArgs,
    rate: u64,
    ddl_freq: u64,
    sink_root: &Path,
) -> DemoSpec {
    let mut spec = base.clone();
    spec.flow_id = format!("bench-{}-ddl{ddl_freq}", rate_label(rate));
    spec.rate = rate;
    spec.ddl_freq = ddl_freq;
    spec.sink_dir = sink_root.to_path_buf();
    spec.rcd_cnt = args.rcd_cnt.unwrap_or_else(|| {
        rcd_cnt_for(
            rate,
            args.warmup_secs + args.duration_secs,
            spec.table_num,
            args.max_rate_rcd_cnt,
        )
    });
    spec
}

/// The idle measurement and every run, on a started cluster.
async fn sweep(
    cluster: &mut LocalCluster,
    args: &BenchArgs,
    base: &DemoSpec,
    sink_root: &Path,
) -> anyhow::Result<(Option<Idle>, Vec<Run>)> {
    cluster
        .wait_for_executors(args.executors as usize, Duration::from_secs(30))
        .await?;
    let mut idle = None;
    if args.idle_secs > 0.0 {
        // Let start-up work (elections, registration) settle first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let secs = args.idle_secs;
        println!("measuring the idle cluster for {secs:.1} s ...");
        let pids = cluster.pids();
        let before = Snapshot::take(&pids);
        tokio::time::sleep(secs_flag("--idle-secs", secs)?).await;
        let end = ThreadsAt::take(&pids);
        let host_steal = host_steal(&before.threads, &end);
        let processes = before.usage(&pids, Some(end));
        let total = processes.iter().map(|p| p.cpu_s).sum::<f64>();
        idle = Some(Idle {
            secs: before.at.elapsed().as_secs_f64(),
            total_cpu_pct_of_core: 100.0 * total / before.at.elapsed().as_secs_f64(),
            processes,
            host_steal,
        });
    }
    let mut runs = Vec::new();
    if args.idle_only {
        return Ok((idle, runs));
    }
    let total = args.rates.len() * args.ddl_freqs.len();
    for &ddl_freq in &args.ddl_freqs {
        for &rate in &args.rates {
            // Checked before the sweep began.
            let spec = run_spec(base, args, rate, ddl_freq, sink_root);
            println!(
                "[{}/{total}] rate {} ddl-freq {ddl_freq}: {} x {} records ...",
                runs.len() + 1,
                rate_label(rate),
                spec.table_num,
                spec.rcd_cnt
            );
            let run = one_run(cluster, &spec, args).await;
            println!(
                "        {} in {:.1}s, {} rows/s, p50 {} p99 {} p99.9 {} µs, {}",
                run.state,
                run.wall_s,
                run.achieved_rows_per_s
                    .map_or("-".into(), |v| format!("{v:.0}")),
                us(run.latency.map(|l| l.p50_us)),
                us(run.latency.map(|l| l.p99_us)),
                us(run.latency.map(|l| l.p999_us)),
                if run.verified {
                    "verified".to_string()
                } else {
                    format!(
                        "NOT verified{}",
                        run.error
                            .as_ref()
                            .map_or(String::new(), |e| format!(": {e}"))
                    )
                }
            );
            if run.left_running {
                println!(
                    "        the sweep stops: the timed-out job may still be running and would skew every later run"
                );
                runs.push(run);
                return Ok((idle, runs));
            }
            // The run's sink files stay until the cluster directory goes at the end of the
            // sweep. Deleting them here put the cost of freeing their blocks into the next
            // run: after a 1 M records/s run (~450 MB of files) both of the next run's engine
            // threads stalled for 24–68 ms about 2 s later, with nothing of ours running (on
            // a file system mounted with `discard`; deleting as much data that had not
            // reached the disk did not do it, and a `syncfs` right after the deletion did not
            // move the stall).
            runs.push(run);
        }
    }
    Ok((idle, runs))
}

/// Records per table so that a run lasts about `secs` at `rate` (0 = `max_rate_cnt`).
fn rcd_cnt_for(rate: u64, secs: f64, tables: u32, max_rate_cnt: u64) -> u64 {
    if rate == 0 {
        return max_rate_cnt.max(1);
    }
    let n = (rate as f64 * secs / f64::from(tables.max(1))).round();
    // `as` saturates for out-of-range floats; validate() bounds the result afterwards.
    (n as u64).max(1)
}

/// Submits one job, follows it to its end, then verifies and measures its output.
async fn one_run(cluster: &mut LocalCluster, spec: &DemoSpec, args: &BenchArgs) -> Run {
    let mut run = Run {
        rate: spec.rate,
        ddl_freq: spec.ddl_freq,
        rcd_cnt: spec.rcd_cnt,
        flow_id: spec.flow_id.clone(),
        job_id: None,
        state: "NotSubmitted".into(),
        left_running: false,
        wall_s: 0.0,
        verified: false,
        violations: 0,
        data_rows: 0,
        measured_rows: 0,
        warmup_applied: false,
        achieved_rows_per_s: None,
        latency: None,
        produced_to_synced: None,
        synced_to_sink: None,
        after_checkpoint: None,
        slow_episodes: None,
        negative_latency_rows: 0,
        processes: Vec::new(),
        host_steal: None,
        worker_time: Vec::new(),
        data_plane: Vec::new(),
        error: None,
    };
    let pids = cluster.pids();
    let resets: Vec<bool> = pids.iter().map(|(_, pid)| reset_peak_rss(*pid)).collect();
    // The threads' counts, then the executors' status, at both ends of the window.
    let before = Snapshot::take(&pids);
    let statuses_before = Statuses::take(cluster).await;
    let job = match cluster.submit_demo(spec).await {
        Ok(id) => id,
        Err(e) => {
            run.error = Some(crate::error_line(&e));
            return run;
        }
    };
    run.job_id = Some(job);
    let cancel = cluster.next_request();
    let (state, window_end) = match wait_job(
        cluster,
        &pids,
        (job, cancel),
        args.run_timeout,
        paced_duration(spec),
    )
    .await
    {
        Ok(ended) => ended,
        Err(why) => {
            run.state = "TimedOut".into();
            run.left_running = true;
            run.error = Some(format!("timed out, then {why}"));
            return run;
        }
    };
    run.state = state;
    run.wall_s = before.at.elapsed().as_secs_f64();
    let (threads_end, statuses_end) = match window_end {
        Some(end) => end,
        None => (ThreadsAt::take(&pids), Statuses::take(cluster).await),
    };
    run.host_steal = host_steal(&before.threads, &threads_end);
    run.worker_time = worker_times(
        &pids,
        (&before.threads, &statuses_before),
        (&threads_end, &statuses_end),
    );
    run.processes = before.usage(&pids, Some(threads_end));
    for (p, reset) in run.processes.iter_mut().zip(resets) {
        p.peak_rss_reset = reset;
    }
    run.data_plane = data_links(&statuses_before.executors, &cluster.data_plane().await);
    if run.state == "TimedOut" {
        run.error = Some(format!(
            "timed out after {:?}; job {job} was cancelled and has ended",
            args.run_timeout
        ));
        return run;
    }
    if run.state != "Finished" {
        run.error = Some(format!("job ended {}", run.state));
        return run;
    }
    let dir = spec.output_dir();
    let verdict = {
        let (dir, spec) = (dir.clone(), spec.clone());
        tokio::task::spawn_blocking(move || microcosm_demo::verify(&dir, &spec)).await
    };
    match verdict {
        Ok(Ok(report)) => {
            let other = report.other_writer(job);
            run.verified = report.passed() && other.is_none();
            run.violations = report.violation_count;
            run.data_rows = report.data_rows;
            if let Some(other) = other {
                run.error = Some(other);
            }
        }
        Ok(Err(e)) => run.error = Some(format!("verifier: {e}")),
        Err(e) => run.error = Some(format!("verifier task: {e}")),
    }
    let warmup_ns = (args.warmup_secs * 1e9) as u64;
    let streams = spec.binlog_num;
    let slots = Slots::of(spec);
    let measured =
        tokio::task::spawn_blocking(move || measure(&dir, streams, warmup_ns, slots)).await;
    match measured {
        Ok(Ok(mut m)) => {
            run.measured_rows = m.rows;
            run.warmup_applied = m.warmup_applied;
            run.achieved_rows_per_s = m.throughput;
            run.latency = percentiles(&m.total);
            run.produced_to_synced = percentiles(&m.to_synced);
            run.synced_to_sink = percentiles(&m.to_sink);
            run.after_checkpoint = m.after_checkpoint();
            run.slow_episodes = m.episodes();
            run.negative_latency_rows = m.negative;
        }
        Ok(Err(e)) => run.error = Some(crate::error_line(&e)),
        Err(e) => run.error = Some(format!("measurement task: {e}")),
    }
    run
}

/// How long the producers of `spec` take to emit their records at its offered rate (zero for
/// an unthrottled run, whose length is not known in advance).
fn paced_duration(spec: &DemoSpec) -> Duration {
    if spec.rate == 0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(spec.total_data_records() as f64 / spec.rate as f64)
        .unwrap_or(Duration::MAX)
}

/// Poll interval once the job may end any moment: the run's wall time is known to this.
const POLL_NEAR_END: Duration = Duration::from_millis(25);

/// Longest sleep between polls while the job is expected to run on.
const POLL_WHILE_RUNNING: Duration = Duration::from_secs(1);

/// How long to wait before asking for the job's state again, `elapsed` into a run expected
/// to take `expected`. Every poll is an RPC that wakes the bench's runtime and the leader's,
/// and on a machine whose cores are all taken by spinning engine workers each wake preempts
/// one: at one poll per 25 ms that was a ~260 µs stall of the producing executor every 26 ms,
/// about 1 % of the records, i.e. the measured p99. So the bench polls rarely while the
/// producers are still pacing and often only near the expected end.
fn next_poll(elapsed: Duration, expected: Duration) -> Duration {
    match expected.checked_sub(elapsed) {
        Some(left) if left > POLL_NEAR_END => left.min(POLL_WHILE_RUNNING),
        _ => POLL_NEAR_END,
    }
}

/// The end of a run's measuring window: its processes' threads and the executors' status.
type WindowEnd = (ThreadsAt, Statuses);

/// Every executor's status, and about when the executors answered: the middle of the call,
/// which first asks the masters for the executors (a few ms on a loopback cluster).
struct Statuses {
    at: Instant,
    executors: Vec<ExecutorStatus>,
}

impl Statuses {
    async fn take(cluster: &LocalCluster) -> Self {
        let asked = Instant::now();
        let executors = cluster.data_plane().await;
        Self {
            at: asked + asked.elapsed() / 2,
            executors,
        }
    }
}

/// Polls the job until it ends (see [`next_poll`]; `expected` is how long it should run);
/// cancels it after `timeout` (with request id `cancel`) and says "TimedOut" once it ended ([`cancel_job`]; an error if it
/// did not). A paced job's processes' threads (and the
/// executors' status) are read once when the job is due to end, while the threads it
/// started (the sink writers) still run: they are gone by the time it is reported finished.
/// A job due to end within one near-end poll (or unthrottled) is read at the end instead:
/// read at its start, the window would be empty.
async fn wait_job(
    cluster: &LocalCluster,
    pids: &[(String, u32)],
    (job, cancel): (u64, (u64, u64)),
    timeout: Duration,
    expected: Duration,
) -> Result<(String, Option<WindowEnd>), String> {
    let start = Instant::now();
    let mut threads_at_end = None;
    loop {
        if threads_at_end.is_none()
            && expected > POLL_NEAR_END
            && next_poll(start.elapsed(), expected) == POLL_NEAR_END
        {
            threads_at_end = Some((ThreadsAt::take(pids), Statuses::take(cluster).await));
        }
        if let Ok(j) = cluster.client.call::<GetJob>(&JobRef { id: job }).await
            && matches!(j.state.as_str(), "Finished" | "Failed" | "Cancelled")
        {
            return Ok((j.state, threads_at_end));
        }
        if start.elapsed() > timeout {
            let ended = cancel_job(cluster, job, cancel, CANCEL_PATIENCE).await?;
            // It may have ended by itself just before the cancel.
            let state = if ended == "Cancelled" {
                "TimedOut".to_string()
            } else {
                ended
            };
            return Ok((state, threads_at_end));
        }
        tokio::time::sleep(next_poll(start.elapsed(), expected)).await;
    }
}

/// How long a timed-out run's job may take to end once cancelled.
const CANCEL_PATIENCE: Duration = Duration::from_secs(30);

/// Cancels `job` with request id `(client_id, seq)` and waits (at most `patience`) until it
/// has ended, so that its tasks are stopped before the next run starts. Returns the state it
/// ended in (not always Cancelled: it may have finished first), or says why it did not end.
async fn cancel_job(
    cluster: &LocalCluster,
    job: u64,
    (client_id, seq): (u64, u64),
    patience: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    let cancel = cluster
        .client
        .call::<ControlJob>(&JobControlRequest {
            id: job,
            action: JobAction::Cancel,
            client_id,
            seq,
        })
        .await;
    let mut last = match cancel {
        Ok(_) => String::from("no answer"),
        Err(e) => format!("the cancel failed: {e}"),
    };
    while start.elapsed() < patience {
        match cluster.client.call::<GetJob>(&JobRef { id: job }).await {
            Ok(j) if matches!(j.state.as_str(), "Finished" | "Failed" | "Cancelled") => {
                return Ok(j.state);
            }
            Ok(j) => last = format!("still {}", j.state),
            Err(e) => last = format!("its state is unknown: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "job {job} did not end within {patience:?} of its cancel ({last})"
    ))
}

/// Slower than this counts as slow (the 100k records/s p99 target).
const SLOW_NS: u64 = 200_000;

/// The rows produced this long after a checkpoint boundary are counted apart: the
/// boundary's snapshots, reports, sink fsyncs and the leader's commit fall in it.
const CHECKPOINT_WINDOW_MS: u64 = 10;

/// Slow rows produced within this of each other belong to one episode ([`SlowEpisodes`]).
const EPISODE_GAP_MS: u64 = 2;

/// How many of the largest episodes a run reports.
const LARGEST_EPISODES: usize = 5;

/// Beyond this many slow rows a run is overloaded, and its rows are not kept for episodes.
const MAX_EPISODE_ROWS: usize = 500_000;

/// Groups slow rows, given as (produced ns, latency ns), into episodes (sorting them by
/// produced time); `first_ns` is the run's first measured produced time.
fn episodes(slow: &mut [(u64, u64)], first_ns: u64) -> Option<SlowEpisodes> {
    slow.sort_unstable();
    let gap_ns = EPISODE_GAP_MS * 1_000_000;
    let mut all: Vec<(u64, u64, Episode)> = Vec::new();
    for &(produced, latency) in slow.iter() {
        let over_1ms = u64::from(latency > 1_000_000);
        let max_us = latency as f64 / 1000.0;
        match all.last_mut() {
            Some((start, last, e)) if produced - *last <= gap_ns => {
                *last = produced;
                e.span_ms = (produced - *start) as f64 / 1e6;
                e.rows += 1;
                e.rows_over_1ms += over_1ms;
                e.max_us = e.max_us.max(max_us);
            }
            _ => all.push((
                produced,
                produced,
                Episode {
                    at_s: produced.saturating_sub(first_ns) as f64 / 1e9,
                    span_ms: 0.0,
                    rows: 1,
                    rows_over_1ms: over_1ms,
                    max_us,
                },
            )),
        }
    }
    if all.is_empty() {
        return None;
    }
    let mut largest: Vec<Episode> = all.iter().map(|(_, _, e)| *e).collect();
    // Largest first; among equals, the earlier first.
    largest.sort_by(|a, b| b.rows.cmp(&a.rows).then(a.at_s.total_cmp(&b.at_s)));
    largest.truncate(LARGEST_EPISODES);
    let slow_rows = slow.len() as u64;
    Some(SlowEpisodes {
        count: all.len() as u64,
        slow_rows,
        largest_pct_of_slow_rows: pct(largest.iter().map(|e| e.rows).sum(), slow_rows),
        largest,
    })
}

/// A job's checkpoint slots: where a produced time falls relative to the boundaries.
#[derive(Debug, Clone, Copy)]
struct Slots {
    interval_ns: u64,
    window_ns: u64,
}

impl Slots {
    /// The slots of `spec`'s job, with a [`CHECKPOINT_WINDOW_MS`] window after each boundary
    /// (at most the whole interval).
    fn of(spec: &DemoSpec) -> Slots {
        let interval_ns = spec.checkpoint_interval_ms.max(1).saturating_mul(1_000_000);
        Slots {
            interval_ns,
            window_ns: (CHECKPOINT_WINDOW_MS * 1_000_000).min(interval_ns),
        }
    }

    /// Whether `produced_ns` (Unix time) lies within the window after a boundary.
    fn after_boundary(&self, produced_ns: u64) -> bool {
        produced_ns % self.interval_ns < self.window_ns
    }
}

/// Rows and slow rows of one group.
#[derive(Debug, Clone, Copy, Default)]
struct SlowCount {
    rows: u64,
    slow: u64,
}

impl SlowCount {
    fn add(&mut self, latency_ns: u64) {
        self.rows += 1;
        self.slow += u64::from(latency_ns > SLOW_NS);
    }

    fn pct(&self) -> f64 {
        pct(self.slow, self.rows)
    }
}

/// `part` of `whole` in %, 0 for an empty whole.
fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The three histograms of one run's measured rows.
struct Measured {
    total: Histogram<u64>,
    to_synced: Histogram<u64>,
    to_sink: Histogram<u64>,
    rows: u64,
    negative: u64,
    warmup_applied: bool,
    throughput: Option<f64>,
    slots: Slots,
    after_boundary: SlowCount,
    elsewhere: SlowCount,
    /// The first measured produced time.
    first_ns: u64,
    /// (produced ns, latency ns) of the slow rows; `None` once there were too many.
    slow: Option<Vec<(u64, u64)>>,
}

impl Measured {
    /// The slow rows as episodes (see [`SlowEpisodes`]).
    fn episodes(&mut self) -> Option<SlowEpisodes> {
        episodes(self.slow.as_mut()?, self.first_ns)
    }

    /// The checkpoint-window split; `None` without measured rows.
    fn after_checkpoint(&self) -> Option<CheckpointWindow> {
        let counted = self.after_boundary.rows + self.elsewhere.rows;
        (counted > 0).then(|| CheckpointWindow {
            window_ms: self.slots.window_ns / 1_000_000,
            window_pct_of_time: self.slots.window_ns as f64 * 100.0 / self.slots.interval_ns as f64,
            rows_after_boundary: self.after_boundary.rows,
            after_boundary_pct_over_200us: self.after_boundary.pct(),
            rows_elsewhere: self.elsewhere.rows,
            elsewhere_pct_over_200us: self.elsewhere.pct(),
        })
    }
}

/// A histogram of nanoseconds from 1 ns to one hour at 3 significant digits.
fn ns_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).context("histogram bounds")
}

/// `secs` seconds (the value of flag `flag`) as a [`Duration`]; an error naming the flag when
/// it is negative, not a number or too long for one (`Duration::from_secs_f64` would panic).
fn secs_flag(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .map_err(|e| anyhow::anyhow!("{flag} {secs} is not a usable number of seconds: {e}"))
}

/// Visits every data row of the sink files of `streams` streams in `dir`.
///
/// Malformed lines (not UTF-8, longer than any row, not a row) are the verifier's business:
/// they are skipped, not measured. Lines are read as bytes, at most
/// [`MAX_LINE_BYTES`](microcosm_demo::sinkfile::MAX_LINE_BYTES) of each kept, so a damaged
/// file never aborts the measurement nor fills memory. Only I/O errors are errors.
fn for_each_data_row(dir: &Path, streams: u32, mut f: impl FnMut(&SinkRow)) -> anyhow::Result<()> {
    use microcosm_demo::sinkfile::{LineRead, MAX_LINE_BYTES, read_line_bounded};
    let mut line = Vec::with_capacity(MAX_LINE_BYTES);
    for s in 0..streams {
        let path = microcosm_demo::spec::sink_file_in(dir, s);
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        loop {
            let read = read_line_bounded(&mut reader, &mut line, MAX_LINE_BYTES)
                .with_context(|| format!("cannot read {}", path.display()))?;
            match read {
                LineRead::Eof => break,
                LineRead::TooLong => continue,
                LineRead::Line { .. } => {}
            }
            if let Ok(text) = std::str::from_utf8(&line)
                && let Ok(row) = SinkRow::parse(text)
                && row.kind == RowKind::Data
            {
                f(&row);
            }
        }
    }
    Ok(())
}

/// Reads the sink files twice: once for the first produced time, once to measure the rows
/// produced at least `warmup_ns` after it (all rows if none is), split by `slots`.
fn measure(dir: &Path, streams: u32, warmup_ns: u64, slots: Slots) -> anyhow::Result<Measured> {
    let (mut first, mut last) = (u64::MAX, 0u64);
    for_each_data_row(dir, streams, |r| {
        first = first.min(r.produced_ns);
        last = last.max(r.produced_ns);
    })?;
    let mut cutoff = first.saturating_add(warmup_ns);
    let warmup_applied = warmup_ns > 0 && cutoff <= last;
    if !warmup_applied {
        cutoff = first;
    }
    let mut m = Measured {
        total: ns_histogram()?,
        to_synced: ns_histogram()?,
        to_sink: ns_histogram()?,
        rows: 0,
        negative: 0,
        warmup_applied,
        throughput: None,
        slots,
        after_boundary: SlowCount::default(),
        elsewhere: SlowCount::default(),
        first_ns: cutoff,
        slow: Some(Vec::new()),
    };
    let (mut min_produced, mut max_sink) = (u64::MAX, 0u64);
    for_each_data_row(dir, streams, |r| {
        if r.produced_ns < cutoff {
            return;
        }
        m.rows += 1;
        min_produced = min_produced.min(r.produced_ns);
        max_sink = max_sink.max(r.sink_ns);
        match r.sink_ns.checked_sub(r.produced_ns) {
            Some(d) => {
                m.total.saturating_record(d.max(1));
                if slots.after_boundary(r.produced_ns) {
                    m.after_boundary.add(d);
                } else {
                    m.elsewhere.add(d);
                }
                if d > SLOW_NS
                    && let Some(slow) = m.slow.as_mut()
                {
                    if slow.len() < MAX_EPISODE_ROWS {
                        slow.push((r.produced_ns, d));
                    } else {
                        m.slow = None;
                    }
                }
            }
            None => m.negative += 1,
        }
        if let Some(d) = r.synced_ns.checked_sub(r.produced_ns) {
            m.to_synced.saturating_record(d.max(1));
        }
        if let Some(d) = r.sink_ns.checked_sub(r.synced_ns) {
            m.to_sink.saturating_record(d.max(1));
        }
    })?;
    if max_sink > min_produced {
        m.throughput = Some(m.rows as f64 / ((max_sink - min_produced) as f64 / 1e9));
    }
    if min_produced != u64::MAX {
        m.first_ns = min_produced;
    }
    Ok(m)
}

/// p50/p90/p99/p99.9/max of a nanosecond histogram, in µs; `None` when empty.
fn percentiles(h: &Histogram<u64>) -> Option<Percentiles> {
    if h.is_empty() {
        return None;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    // Counts above a value, at the histogram's resolution (3 significant digits).
    let above = |ns: u64| h.len() - h.count_between(0, ns);
    Some(Percentiles {
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.50)),
        p90_us: us(h.value_at_quantile(0.90)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
        pct_over_200us: pct(above(SLOW_NS), h.len()),
        pct_over_1ms: pct(above(1_000_000), h.len()),
    })
}

// ---------------------------------------------------------------------------------------
// /proc

/// CPU ticks of every process, and the counters of each of its threads, at one instant.
struct Snapshot {
    at: Instant,
    ticks: Vec<Option<u64>>,
    threads: ThreadsAt,
}

/// The counters of every thread of every process, and the machine's steal time, at one
/// instant.
struct ThreadsAt {
    at: Instant,
    threads: Vec<ThreadCounters>,
    /// Steal ticks over all vCPUs and the number of vCPUs (`/proc/stat`).
    steal: Option<(u64, usize)>,
}

impl ThreadsAt {
    fn take(pids: &[(String, u32)]) -> Self {
        Self {
            at: Instant::now(),
            threads: pids.iter().map(|(_, pid)| thread_counters(*pid)).collect(),
            steal: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| parse_proc_stat_steal(&s)),
        }
    }
}

/// The host's steal time between two instants (`None` if either lacks it).
fn host_steal(before: &ThreadsAt, after: &ThreadsAt) -> Option<HostSteal> {
    let ((b, _), (a, cpus)) = (before.steal?, after.steal?);
    let steal_ms = a.saturating_sub(b) as f64 * 1000.0 / clock_ticks_per_sec();
    let wall_ms = after.at.saturating_duration_since(before.at).as_secs_f64() * 1000.0;
    Some(HostSteal {
        steal_ms,
        pct_of_vcpus: if wall_ms > 0.0 && cpus > 0 {
            100.0 * steal_ms / (wall_ms * cpus as f64)
        } else {
            0.0
        },
    })
}

/// Steal ticks summed over all vCPUs (the 8th value of the `cpu` line) and the number of
/// vCPUs (`cpuN` lines) from the text of `/proc/stat`.
fn parse_proc_stat_steal(stat: &str) -> Option<(u64, usize)> {
    let mut lines = stat.lines();
    let total = lines.next()?.strip_prefix("cpu ")?;
    let steal = total.split_whitespace().nth(7)?.parse().ok()?;
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l[3..].starts_with(|c: char| c.is_ascii_digit()))
        .count();
    Some((steal, cpus))
}

/// Counters of one thread: its name, CPU ticks, voluntary and involuntary context switches,
/// and the ns it waited runnable for a CPU (where the kernel keeps `schedstat`).
#[derive(Debug, Clone, PartialEq)]
struct ThreadCount {
    name: String,
    ticks: u64,
    voluntary: u64,
    involuntary: u64,
    /// Time on a CPU and time waiting runnable for one, in ns (`schedstat`).
    on_cpu_ns: Option<u64>,
    run_delay_ns: Option<u64>,
}

/// A process's threads by thread id.
type ThreadCounters = std::collections::HashMap<u32, ThreadCount>;

impl Snapshot {
    fn take(pids: &[(String, u32)]) -> Self {
        Self {
            at: Instant::now(),
            ticks: pids.iter().map(|(_, pid)| cpu_ticks(*pid)).collect(),
            threads: ThreadsAt::take(pids),
        }
    }

    /// CPU used since this snapshot and the current peak RSS, per process; its threads'
    /// usage up to `threads_end` (taken while the job's own threads were still alive), or
    /// up to now.
    fn usage(&self, pids: &[(String, u32)], threads_end: Option<ThreadsAt>) -> Vec<ProcessUsage> {
        let wall = self.at.elapsed().as_secs_f64();
        let tck = clock_ticks_per_sec();
        let threads_end = threads_end.unwrap_or_else(|| ThreadsAt::take(pids));
        let threads_wall = threads_end
            .at
            .saturating_duration_since(self.threads.at)
            .as_secs_f64();
        pids.iter()
            .zip(&self.ticks)
            .zip(self.threads.threads.iter().zip(&threads_end.threads))
            .map(|(((name, pid), before), (threads_before, threads_after))| {
                let cpu_s = match (before, cpu_ticks(*pid)) {
                    (Some(b), Some(a)) => a.saturating_sub(*b) as f64 / tck,
                    _ => 0.0,
                };
                ProcessUsage {
                    name: name.clone(),
                    cpu_s,
                    cpu_pct_of_core: if wall > 0.0 {
                        100.0 * cpu_s / wall
                    } else {
                        0.0
                    },
                    peak_rss_mb: peak_rss_kb(*pid).map(|kb| kb as f64 / 1024.0),
                    peak_rss_reset: false,
                    threads: thread_usage(threads_before, threads_after, threads_wall, tck),
                }
            })
            .collect()
    }
}

/// The counters of every thread of process `pid` (empty if it is gone).
fn thread_counters(pid: u32) -> ThreadCounters {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return ThreadCounters::new();
    };
    tasks
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let ticks = parse_stat_ticks(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
            let (voluntary, involuntary) =
                parse_ctxt_switches(&std::fs::read_to_string(dir.join("status")).ok()?)?;
            let (on_cpu_ns, run_delay_ns) = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| parse_schedstat(&s))
                .unzip();
            Some((
                tid,
                ThreadCount {
                    name: name.trim_end().to_string(),
                    ticks,
                    voluntary,
                    involuntary,
                    on_cpu_ns,
                    run_delay_ns,
                },
            ))
        })
        .collect()
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` from the text of
/// `/proc/<pid>/task/<tid>/status`.
fn parse_ctxt_switches(status: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

/// The ns a thread spent on a CPU and waiting runnable for one: the first two of the three
/// values in `/proc/<pid>/task/<tid>/schedstat` (the third counts time slices).
fn parse_schedstat(schedstat: &str) -> Option<(u64, u64)> {
    let mut values = schedstat.split_whitespace();
    let (on_cpu, waited, _slices) = (values.next()?, values.next()?, values.next()?);
    Some((on_cpu.parse().ok()?, waited.parse().ok()?))
}

/// How one executor's engine workers spent a window, in ms a second per worker. The four
/// add up to 1000 but for the few ms between the instants the counts were read at.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct WorkerTime {
    executor: String,
    workers: usize,
    /// On a CPU (the kernel's count, `/proc/<pid>/task/<tid>/schedstat`).
    on_cpu_ms_per_s: f64,
    /// Runnable, waiting for a CPU that another thread of this machine held (`schedstat`).
    waited_ms_per_s: f64,
    /// Asleep, waiting for work (the engine's count, from `GetExecutorStatus`).
    asleep_ms_per_s: f64,
    /// The rest of the wall time: the thread wanted to run but its vCPU was held outside
    /// any thread of this machine (the hypervisor, or interrupt handling). Kernels whose
    /// steal count covers the hypervisor show it in [`HostSteal`] too; some do not.
    stolen_ms_per_s: f64,
}

/// [`WorkerTime`] of every executor in `pids` between two instants, each given as the
/// threads' counts and the executors' status (each a rate over its own window, read a few
/// ms apart); executors missing a count are left out.
fn worker_times(
    pids: &[(String, u32)],
    (threads_before, statuses_before): (&ThreadsAt, &Statuses),
    (threads_after, statuses_after): (&ThreadsAt, &Statuses),
) -> Vec<WorkerTime> {
    let wall = threads_after
        .at
        .saturating_duration_since(threads_before.at)
        .as_secs_f64();
    let asleep_wall = statuses_after
        .at
        .saturating_duration_since(statuses_before.at)
        .as_secs_f64();
    let asleep = |statuses: &Statuses, name: &str| {
        statuses
            .executors
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.workers_asleep_ns.clone())
    };
    pids.iter()
        .zip(threads_before.threads.iter().zip(&threads_after.threads))
        .filter_map(|((name, _), (before, after))| {
            worker_time(
                name,
                (before, &asleep(statuses_before, name)?),
                (after, &asleep(statuses_after, name)?),
                (wall, asleep_wall),
            )
        })
        .collect()
}

/// One executor's [`WorkerTime`] from its threads' counts and its workers' asleep ns at both
/// ends, `wall` and `asleep_wall` seconds apart; `None` without engine workers, schedstat,
/// asleep counts or time between the ends.
fn worker_time(
    executor: &str,
    (before, asleep_before): (&ThreadCounters, &[u64]),
    (after, asleep_after): (&ThreadCounters, &[u64]),
    (wall, asleep_wall): (f64, f64),
) -> Option<WorkerTime> {
    let (mut workers, mut on_cpu, mut waited) = (0usize, 0u64, 0u64);
    for (tid, now) in after.iter().filter(|(_, t)| t.name == ENGINE_WORKER_COMM) {
        let then = before.get(tid)?;
        on_cpu += now.on_cpu_ns?.saturating_sub(then.on_cpu_ns?);
        waited += now.run_delay_ns?.saturating_sub(then.run_delay_ns?);
        workers += 1;
    }
    if workers == 0
        || asleep_after.len() != workers
        || asleep_before.len() != workers
        || wall <= 0.0
        || asleep_wall <= 0.0
    {
        return None;
    }
    let asleep: u64 = asleep_after
        .iter()
        .zip(asleep_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let per_worker_ms = |ns: u64, wall: f64| ns as f64 / 1e6 / wall / workers as f64;
    let (on_cpu, waited, asleep) = (
        per_worker_ms(on_cpu, wall),
        per_worker_ms(waited, wall),
        per_worker_ms(asleep, asleep_wall),
    );
    Some(WorkerTime {
        executor: executor.to_string(),
        workers,
        on_cpu_ms_per_s: on_cpu,
        waited_ms_per_s: waited,
        asleep_ms_per_s: asleep,
        stolen_ms_per_s: (1000.0 - on_cpu - waited - asleep).max(0.0),
    })
}

/// What the threads present at the end of a window of `wall` seconds did during it, grouped
/// by name and sorted by name (a thread that started during the window counts from zero).
fn thread_usage(
    before: &ThreadCounters,
    after: &ThreadCounters,
    wall: f64,
    ticks_per_s: f64,
) -> Vec<ThreadUsage> {
    /// Per name: threads, ticks, voluntary and involuntary switches, waited ns (`None` once
    /// a thread of the name lacks it).
    type Sums = (usize, u64, u64, u64, Option<u64>);
    let mut by_name: std::collections::BTreeMap<&str, Sums> = std::collections::BTreeMap::new();
    for (tid, now) in after {
        let (ticks, voluntary, involuntary, waited) = match before.get(tid) {
            Some(b) => (
                now.ticks.saturating_sub(b.ticks),
                now.voluntary.saturating_sub(b.voluntary),
                now.involuntary.saturating_sub(b.involuntary),
                now.run_delay_ns
                    .zip(b.run_delay_ns)
                    .map(|(n, b)| n.saturating_sub(b)),
            ),
            None => (now.ticks, now.voluntary, now.involuntary, now.run_delay_ns),
        };
        let entry = by_name
            .entry(now.name.as_str())
            .or_insert((0, 0, 0, 0, Some(0)));
        entry.0 += 1;
        entry.1 += ticks;
        entry.2 += voluntary;
        entry.3 += involuntary;
        entry.4 = entry.4.zip(waited).map(|(sum, w)| sum + w);
    }
    let per_s = |n: u64| if wall > 0.0 { n as f64 / wall } else { 0.0 };
    by_name
        .into_iter()
        .map(
            |(name, (threads, ticks, voluntary, involuntary, waited))| ThreadUsage {
                name: name.to_string(),
                threads,
                cpu_s: ticks as f64 / ticks_per_s,
                voluntary_switches_per_s: per_s(voluntary),
                involuntary_switches_per_s: per_s(involuntary),
                waited_ms_per_s: waited.map(|ns| per_s(ns) / 1e6),
            },
        )
        .collect()
}

/// Of one process's threads: how often its engine workers were switched out while runnable,
/// and how often its other threads woke up (their voluntary switches), per second.
/// `None` for the first where the process has no engine workers (a master).
fn switch_outs_and_wakeups(threads: &[ThreadUsage]) -> (Option<f64>, f64) {
    let (workers, others): (Vec<&ThreadUsage>, Vec<&ThreadUsage>) =
        threads.iter().partition(|t| t.name == ENGINE_WORKER_COMM);
    (
        (!workers.is_empty()).then(|| {
            workers
                .iter()
                .fold(0.0, |sum, t| sum + t.involuntary_switches_per_s)
        }),
        others
            .iter()
            .fold(0.0, |sum, t| sum + t.voluntary_switches_per_s),
    )
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// utime + stime from the text of `/proc/<pid>/stat` (fields 14 and 15; the command name
/// in field 2 may contain spaces and parentheses, so count from the last `)`).
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmHWM of a process, in KiB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resets a process's VmHWM to its current RSS (`5` to clear_refs, Linux ≥ 4.0).
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"5").is_ok()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/version")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------
// Text output

fn rate_label(rate: u64) -> String {
    if rate == 0 {
        "max".into()
    } else {
        rate.to_string()
    }
}

fn us(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

fn print_floor(floor: &crate::floor::Floor) {
    println!(
        "machine floor over {:.1}s ({} spinning threads): a random instant waits p99 {} µs, \
         p99.9 {} µs for its CPU; {} gaps > 200 µs ({:.2}% of the time), {} > 1 ms, longest {} µs\n",
        floor.secs,
        floor.threads,
        us(Some(floor.p99_wait_us)),
        us(Some(floor.p999_wait_us)),
        floor.gaps_over_200us,
        floor.time_in_gaps_over_200us_pct,
        floor.gaps_over_1ms,
        us(Some(floor.max_gap_us)),
    );
}

fn print_idle(idle: &Idle) {
    let per: Vec<String> = idle
        .processes
        .iter()
        .map(|p| format!("{} {:.3}s", p.name, p.cpu_s))
        .collect();
    println!(
        "idle cluster over {:.1}s: {:.2}% of one core in total ({})\n",
        idle.secs,
        idle.total_cpu_pct_of_core,
        per.join(", ")
    );
}

/// The main results table.
fn table(runs: &[Run]) -> String {
    let names: Vec<String> = runs
        .first()
        .map(|r| r.processes.iter().map(|p| short_name(&p.name)).collect())
        .unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>8} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<22} {:<22} verified",
        "rate",
        "ddl",
        "rows/s",
        "p50µs",
        "p90µs",
        "p99µs",
        "p99.9µs",
        "maxµs",
        format!("cpu s ({})", names.join("/")),
        format!("rss MB ({})", names.join("/")),
    );
    for r in runs {
        let l = r.latency;
        let cpu: Vec<String> = r
            .processes
            .iter()
            .map(|p| format!("{:.2}", p.cpu_s))
            .collect();
        let rss: Vec<String> = r
            .processes
            .iter()
            .map(|p| p.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}")))
            .collect();
        let _ = writeln!(
            s,
            "{:>8} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<22} {:<22} {}",
            rate_label(r.rate),
            r.ddl_freq,
            r.achieved_rows_per_s
                .map_or("-".into(), |v| format!("{v:.0}")),
            us(l.map(|l| l.p50_us)),
            us(l.map(|l| l.p90_us)),
            us(l.map(|l| l.p99_us)),
            us(l.map(|l| l.p999_us)),
            us(l.map(|l| l.max_us)),
            cpu.join("/"),
            rss.join("/"),
            if r.verified {
                "yes".to_string()
            } else {
                format!("NO ({})", r.state)
            }
        );
    }
    s
}

/// `master-1` → `m1`, `executor-2` → `e2`.
fn short_name(name: &str) -> String {
    if let Some(n) = name.strip_prefix("master-") {
        format!("m{n}")
    } else if let Some(n) = name.strip_prefix("executor-") {
        format!("e{n}")
    } else {
        name.to_string()
    }
}

/// Per run: how often each process's engine workers were switched out while runnable (another
/// thread took their vCPU, while they worked or while they spun idle), how often its other
/// threads woke up (on a machine whose vCPUs the engine workers keep busy, each such wake-up
/// takes a vCPU from one of them), and the share of the vCPUs the kernel counted as stolen
/// by the host.
fn wakeup_table(runs: &[Run]) -> String {
    let mut s = String::new();
    let names: Vec<String> = runs
        .first()
        .map(|r| r.processes.iter().map(|p| short_name(&p.name)).collect())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "{:<14}   {:<38}   {:<34}   host steal % of vCPUs",
        "per second",
        format!("engine workers switched out ({})", names.join("/")),
        format!("other threads' wake-ups ({})", names.join("/")),
    );
    for r in runs {
        let (switched, woken): (Vec<String>, Vec<String>) = r
            .processes
            .iter()
            .map(|p| {
                let (switched, woken) = switch_outs_and_wakeups(&p.threads);
                (
                    switched.map_or("-".into(), |n| format!("{n:.0}")),
                    format!("{woken:.0}"),
                )
            })
            .unzip();
        let _ = writeln!(
            s,
            "{:>8} {:>5}   {:<38}   {:<34}   {}",
            rate_label(r.rate),
            r.ddl_freq,
            switched.join("/"),
            woken.join("/"),
            r.host_steal
                .map_or("-".into(), |h| format!("{:.2}", h.pct_of_vcpus)),
        );
    }
    s
}

/// Per run: how each executor's engine workers spent the run, in ms a second per worker: on a
/// CPU, waiting for a CPU another thread held, asleep waiting for work, and the rest, when
/// their vCPU was held outside any thread (the hypervisor, interrupts).
fn worker_time_table(runs: &[Run]) -> String {
    let mut s = String::new();
    let names: Vec<String> = runs
        .iter()
        .find(|r| !r.worker_time.is_empty())
        .map(|r| {
            r.worker_time
                .iter()
                .map(|w| short_name(&w.executor))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "{:<14}   engine workers' time, ms a second each: on CPU/waited/asleep/stolen ({})",
        "worker time",
        names.join(", ")
    );
    for r in runs {
        let cells: Vec<String> = r
            .worker_time
            .iter()
            .map(|w| {
                format!(
                    "{:.0}/{:.1}/{:.0}/{:.1}",
                    w.on_cpu_ms_per_s, w.waited_ms_per_s, w.asleep_ms_per_s, w.stolen_ms_per_s
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "{:>8} {:>5}   {}",
            rate_label(r.rate),
            r.ddl_freq,
            if cells.is_empty() {
                "-".to_string()
            } else {
                cells.join("   ")
            }
        );
    }
    s
}

/// The data connections of each run, summed over their dialing ends (the executors that
/// send data streams): datagrams out, rows per datagram, losses, congestion back-offs, and
/// the largest round-trip time and smallest window at the run's end.
fn data_plane_table(runs: &[Run]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<14}   {:>12} {:>12} {:>8} {:>10} {:>8} {:>10}",
        "data plane", "datagrams", "rows/dgram", "lost", "cong. evts", "rtt µs", "cwnd KiB"
    );
    for r in runs {
        let out: Vec<&DataLink> = r.data_plane.iter().filter(|l| l.dialed).collect();
        if out.is_empty() {
            let _ = writeln!(s, "{:>8} {:>5}   -", rate_label(r.rate), r.ddl_freq);
            continue;
        }
        let datagrams: u64 = out.iter().map(|l| l.datagrams_sent).sum();
        let per = if datagrams == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", r.data_rows as f64 / datagrams as f64)
        };
        let _ = writeln!(
            s,
            "{:>8} {:>5}   {:>12} {:>12} {:>8} {:>10} {:>8} {:>10}",
            rate_label(r.rate),
            r.ddl_freq,
            datagrams,
            per,
            out.iter().map(|l| l.lost_packets).sum::<u64>(),
            out.iter().map(|l| l.congestion_events).sum::<u64>(),
            out.iter().map(|l| l.rtt_us).max().unwrap_or(0),
            out.iter().map(|l| l.cwnd).min().unwrap_or(0) / 1024,
        );
    }
    s
}

/// The per-stage table: produced → synced and synced → sink.
fn stage_table(runs: &[Run]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<14}   {:<38}   {:<38}   {:<36}   slow episodes (count: largest rows/max µs)",
        "per stage (µs)",
        "produced -> synced (p50/p99/p99.9/max)",
        "synced -> sink (p50/p99/p99.9/max)",
        format!(">200µs % (all/{CHECKPOINT_WINDOW_MS}ms after ckpt/rest)")
    );
    for r in runs {
        let fmt = |p: Option<Percentiles>| match p {
            Some(p) => format!(
                "{}/{}/{}/{}",
                us(Some(p.p50_us)),
                us(Some(p.p99_us)),
                us(Some(p.p999_us)),
                us(Some(p.max_us))
            ),
            None => "-".into(),
        };
        let slow = match (r.latency, r.after_checkpoint) {
            (Some(l), Some(w)) => {
                let part = |rows: u64, pct: f64| {
                    if rows == 0 {
                        "-".to_string()
                    } else {
                        format!("{pct:.2}")
                    }
                };
                format!(
                    "{:.2}/{}/{}",
                    l.pct_over_200us,
                    part(w.rows_after_boundary, w.after_boundary_pct_over_200us),
                    part(w.rows_elsewhere, w.elsewhere_pct_over_200us)
                )
            }
            (Some(l), None) => format!("{:.2}/-/-", l.pct_over_200us),
            _ => "-".into(),
        };
        let episodes = match &r.slow_episodes {
            Some(e) => match e.largest.first() {
                Some(l) => format!("{}: {}/{}", e.count, l.rows, us(Some(l.max_us))),
                None => e.count.to_string(),
            },
            None => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:>8} {:>5}   {:<38}   {:<38}   {:<36}   {}",
            rate_label(r.rate),
            r.ddl_freq,
            fmt(r.produced_to_synced),
            fmt(r.synced_to_sink),
            slow,
            episodes
        );
    }
    s
}

// ---------------------------------------------------------------------------------------
// The SVG chart

/// One line of the chart: points (offered rate, 0 = max; latency µs).
struct Series {
    percentile: usize,
    ddl_index: usize,
    points: Vec<(u64, f64)>,
}

const PERCENTILES: [(&str, &str); 3] =
    [("p50", "#1f77b4"), ("p99", "#ff7f0e"), ("p99.9", "#d62728")];
const DASHES: [&str; 4] = ["", "7,4", "2,3", "10,3,2,3"];

/// A log10 axis from `10^lo` to `10^hi` mapped onto `[a, b]` pixels.
#[derive(Debug, Clone, Copy)]
struct LogAxis {
    lo: i32,
    hi: i32,
    a: f64,
    b: f64,
}

impl LogAxis {
    /// The decades covering every positive value (at least one decade).
    fn covering(values: impl Iterator<Item = f64>, a: f64, b: f64) -> Self {
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for v in values.filter(|v| *v > 0.0 && v.is_finite()) {
            min = min.min(v);
            max = max.max(v);
        }
        if !min.is_finite() {
            (min, max) = (1.0, 10.0);
        }
        let lo = min.log10().floor() as i32;
        let mut hi = max.log10().ceil() as i32;
        if hi <= lo {
            hi = lo + 1;
        }
        Self { lo, hi, a, b }
    }

    fn pos(&self, v: f64) -> f64 {
        let t = (v.log10() - f64::from(self.lo)) / f64::from(self.hi - self.lo);
        self.a + t * (self.b - self.a)
    }
}

/// `1000` → `1k`, `1e6` → `1M`.
fn si(v: f64) -> String {
    let (n, suffix) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if n >= 1.0 || n == 0.0 {
        format!("{n:.0}{suffix}")
    } else {
        format!("{n}{suffix}")
    }
}

/// A latency in µs as a short label: `1 µs`, `100 µs`, `1 ms`, `10 s`.
fn time_label(us_value: f64) -> String {
    if us_value >= 1e6 {
        format!("{} s", si(us_value / 1e6))
    } else if us_value >= 1e3 {
        format!("{} ms", si(us_value / 1e3))
    } else {
        format!("{} µs", si(us_value))
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart of p50, p99 and p99.9 latency against offered rate, one line style per
/// ddl-freq.
fn latency_svg(runs: &[Run]) -> String {
    let mut ddls: Vec<u64> = Vec::new();
    for r in runs {
        if !ddls.contains(&r.ddl_freq) {
            ddls.push(r.ddl_freq);
        }
    }
    let mut series = Vec::new();
    for (di, ddl) in ddls.iter().enumerate() {
        for pi in 0..PERCENTILES.len() {
            let mut points: Vec<(u64, f64)> = runs
                .iter()
                .filter(|r| r.ddl_freq == *ddl)
                .filter_map(|r| {
                    let l = r.latency?;
                    let v = [l.p50_us, l.p99_us, l.p999_us][pi];
                    (v > 0.0).then_some((r.rate, v))
                })
                .collect();
            // Finite rates ascending, "max" (0) last.
            points.sort_by_key(|(rate, _)| if *rate == 0 { u64::MAX } else { *rate });
            series.push(Series {
                percentile: pi,
                ddl_index: di,
                points,
            });
        }
    }
    render_svg(&series, &ddls)
}

fn render_svg(series: &[Series], ddls: &[u64]) -> String {
    let (w, h) = (860.0, 520.0);
    let (left, right, top, bottom) = (80.0, 660.0, 50.0, 450.0);
    let rates: Vec<u64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let has_max = rates.contains(&0);
    let finite = rates.iter().filter(|r| **r > 0).map(|r| *r as f64);
    // "max" gets its own slot right of the log axis.
    let x_axis_end = if has_max { right - 70.0 } else { right };
    let x = LogAxis::covering(finite.clone(), left + 10.0, x_axis_end);
    let has_finite = finite.clone().next().is_some();
    let x_max = if has_finite {
        right - 10.0
    } else {
        (left + right) / 2.0
    };
    let xpos = |rate: u64| {
        if rate == 0 { x_max } else { x.pos(rate as f64) }
    };
    let y = LogAxis::covering(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
        bottom,
        top,
    );

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">microcosm demo pipeline: end-to-end latency vs offered rate</text>"#,
        (left + right) / 2.0
    );
    // Grid and y ticks (decades).
    for d in y.lo..=y.hi {
        let v = 10f64.powi(d);
        let py = y.pos(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{right}" y2="{py:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            py + 4.0,
            esc(&time_label(v))
        );
    }
    // x ticks: decades of the finite rates, and "max".
    if has_finite {
        for d in x.lo..=x.hi {
            let v = 10f64.powi(d);
            let px = x.pos(v);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#e0e0e0"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                bottom + 18.0,
                si(v)
            );
        }
    }
    if has_max {
        let _ = writeln!(
            s,
            r##"<line x1="{x_max:.1}" y1="{top}" x2="{x_max:.1}" y2="{bottom}" stroke="#e0e0e0" stroke-dasharray="3,3"/><text x="{x_max:.1}" y="{}" text-anchor="middle">max</text>"##,
            bottom + 18.0
        );
    }
    // Axes and their titles.
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">offered rate (records/s, log scale; max = unthrottled)</text>"#,
        (left + right) / 2.0,
        bottom + 42.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">latency, produced → sink (log scale)</text>"#,
        (top + bottom) / 2.0
    );
    // The lines.
    for ser in series {
        let (name, color) = PERCENTILES[ser.percentile % PERCENTILES.len()];
        let dash = DASHES[ser.ddl_index % DASHES.len()];
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|(r, v)| format!("{:.1},{:.1}", xpos(*r), y.pos(*v)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let ddl = ddls.get(ser.ddl_index).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            r#"<polyline class="series" data-percentile="{name}" data-ddl-freq="{ddl}" points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            pts.join(" ")
        );
        for (r, v) in &ser.points {
            let (px, py) = (xpos(*r), y.pos(*v));
            if ser.ddl_index == 0 {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#
                );
            } else {
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="white" stroke="{color}" stroke-width="1.5"/>"#,
                    px - 3.5,
                    py - 3.5
                );
            }
        }
    }
    // Legend.
    let lx = right + 20.0;
    let mut ly = top + 10.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly}" font-weight="bold">percentile</text>"#
    );
    for (name, color) in PERCENTILES {
        ly += 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{}" y="{ly}">{name}</text>"#,
            ly - 4.0,
            lx + 30.0,
            ly - 4.0,
            lx + 38.0
        );
    }
    ly += 34.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly}" font-weight="bold">DDL</text>"#
    );
    for (i, ddl) in ddls.iter().enumerate() {
        ly += 20.0;
        let label = if *ddl == 0 {
            "none".to_string()
        } else {
            format!("every {ddl}")
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="black" stroke-width="2" stroke-dasharray="{}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 4.0,
            lx + 30.0,
            ly - 4.0,
            DASHES[i % DASHES.len()],
            lx + 38.0,
            esc(&label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    #[test]
    fn idle_only_refuses_the_flags_that_shape_runs() {
        use clap::Parser;
        for flag in [
            "--rates=1000",
            "--ddl-freqs=0",
            "--duration-secs=1",
            "--table-num=2",
            "--linger-us=5",
            "--run-timeout=5s",
        ] {
            let err = Cli::try_parse_from(["bench", "--idle-only", flag]).unwrap_err();
            let name = flag.split('=').next().unwrap();
            assert!(err.to_string().contains(name), "{flag}: {err}");
        }
        let cli = Cli::try_parse_from(["bench", "--idle-only", "--idle-secs=2", "--executors=1"])
            .unwrap();
        assert!(cli.args.idle_only);
    }

    #[tokio::test]
    async fn idle_only_with_no_idle_time_is_refused_before_anything_starts() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cli = Cli::try_parse_from([
            "bench",
            "--idle-only",
            "--idle-secs=0",
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let err = run(cli.args).await.unwrap_err().to_string();
        assert!(err.contains("--idle-secs"), "{err}");
        assert!(!out.exists(), "nothing was started or written");
    }

    fn run_with(rate: u64, ddl: u64, p50: f64) -> Run {
        Run {
            rate,
            ddl_freq: ddl,
            rcd_cnt: 1,
            flow_id: "f".into(),
            job_id: Some(1),
            state: "Finished".into(),
            left_running: false,
            wall_s: 1.0,
            verified: true,
            violations: 0,
            data_rows: 1,
            measured_rows: 1,
            warmup_applied: true,
            achieved_rows_per_s: Some(1.0),
            latency: Some(Percentiles {
                count: 1,
                p50_us: p50,
                p90_us: p50 * 2.0,
                p99_us: p50 * 4.0,
                p999_us: p50 * 8.0,
                max_us: p50 * 16.0,
                pct_over_200us: 0.0,
                pct_over_1ms: 0.0,
            }),
            produced_to_synced: None,
            synced_to_sink: None,
            after_checkpoint: None,
            slow_episodes: None,
            negative_latency_rows: 0,
            processes: Vec::new(),
            host_steal: None,
            worker_time: Vec::new(),
            data_plane: Vec::new(),
            error: None,
        }
    }

    fn connection(peer: &str, dialed: bool, sent: u64, lost: u64) -> DataConnection {
        DataConnection {
            peer: peer.into(),
            role: "executor".into(),
            dialed,
            rtt_us: 40,
            cwnd: 1 << 20,
            congestion_events: lost,
            lost_packets: lost,
            sent_packets: sent,
            datagrams_sent: sent,
            datagrams_received: sent / 10,
        }
    }

    fn status(name: &str, connections: Vec<DataConnection>) -> ExecutorStatus {
        ExecutorStatus {
            name: name.into(),
            connections,
            workers_asleep_ns: Vec::new(),
        }
    }

    #[test]
    fn data_links_count_what_happened_during_the_run() {
        let mut client = connection("127.0.0.1:9", false, 5, 0);
        client.role = "client".into();
        let before = vec![status(
            "executor-1",
            vec![connection("127.0.0.1:2", true, 1_000, 1), client.clone()],
        )];
        let after = vec![
            status(
                "executor-1",
                vec![connection("127.0.0.1:2", true, 101_000, 3), client],
            ),
            // A connection the run opened counts from zero.
            status("executor-2", vec![connection("127.0.0.1:1", false, 500, 0)]),
        ];
        let links = data_links(&before, &after);
        assert_eq!(links.len(), 2, "the client's connection is not a data link");
        let out = &links[0];
        assert_eq!((out.executor.as_str(), out.dialed), ("executor-1", true));
        assert_eq!(out.datagrams_sent, 100_000);
        assert_eq!(out.datagrams_received, 10_000);
        assert_eq!((out.lost_packets, out.congestion_events), (2, 2));
        assert_eq!((out.rtt_us, out.cwnd), (40, 1 << 20), "taken at the end");
        let inc = &links[1];
        assert_eq!((inc.executor.as_str(), inc.dialed), ("executor-2", false));
        assert_eq!(inc.datagrams_sent, 500);
    }

    #[test]
    fn a_link_dialed_again_during_the_run_counts_from_zero() {
        let before = vec![status(
            "executor-1",
            vec![connection("127.0.0.1:2", true, 9_000, 4)],
        )];
        let after = vec![status(
            "executor-1",
            vec![connection("127.0.0.1:2", true, 700, 1)],
        )];
        let links = data_links(&before, &after);
        assert_eq!((links[0].datagrams_sent, links[0].lost_packets), (700, 1));
    }

    #[test]
    fn the_data_plane_table_sums_the_dialing_ends() {
        let mut r = run_with(100_000, 1000, 20.0);
        r.data_rows = 1_000_000;
        r.data_plane = data_links(
            &[],
            &[
                status("executor-1", vec![connection("127.0.0.1:2", false, 30, 0)]),
                status(
                    "executor-2",
                    vec![connection("127.0.0.1:1", true, 500_000, 7)],
                ),
            ],
        );
        let t = data_plane_table(&[r]);
        let row = t.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["100000", "1000", "500000", "2.00", "7", "7", "40", "1024"],
            "{t}"
        );
    }

    #[test]
    fn log_axis_covers_decades_and_maps_them_linearly() {
        let a = LogAxis::covering([30.0, 2_000.0].into_iter(), 0.0, 300.0);
        assert_eq!((a.lo, a.hi), (1, 4));
        assert!((a.pos(10.0) - 0.0).abs() < 1e-9);
        assert!((a.pos(100.0) - 100.0).abs() < 1e-9);
        assert!((a.pos(10_000.0) - 300.0).abs() < 1e-9);
        let one = LogAxis::covering([100.0].into_iter(), 0.0, 1.0);
        assert_eq!((one.lo, one.hi), (2, 3));
        let none = LogAxis::covering(std::iter::empty(), 0.0, 1.0);
        assert_eq!((none.lo, none.hi), (0, 1));
    }

    #[test]
    fn labels() {
        assert_eq!(si(1_000.0), "1k");
        assert_eq!(si(1_000_000.0), "1M");
        assert_eq!(si(10.0), "10");
        assert_eq!(time_label(1.0), "1 µs");
        assert_eq!(time_label(1_000.0), "1 ms");
        assert_eq!(time_label(10_000_000.0), "10 s");
        assert_eq!(rate_label(0), "max");
        assert_eq!(short_name("executor-2"), "e2");
    }

    #[test]
    fn svg_has_one_line_per_percentile_and_ddl_and_puts_max_last() {
        let runs = vec![
            run_with(10_000, 1000, 30.0),
            run_with(0, 1000, 500.0),
            run_with(100_000, 1000, 40.0),
            run_with(10_000, 0, 20.0),
            run_with(100_000, 0, 25.0),
        ];
        let svg = latency_svg(&runs);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains(">max</text>"));
        assert!(svg.contains(">every 1000</text>"));
        assert!(svg.contains(">none</text>"));
        assert!(svg.contains("stroke-dasharray=\"7,4\""));
        // The ddl-1000 p50 line ends at the "max" slot, right of the 100k point.
        let line = svg
            .lines()
            .find(|l| l.contains(r#"data-percentile="p50" data-ddl-freq="1000""#))
            .unwrap();
        let pts = line.split("points=\"").nth(1).unwrap();
        let xs: Vec<f64> = pts
            .split('"')
            .next()
            .unwrap()
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 3);
        assert!(xs[0] < xs[1] && xs[1] < xs[2], "{xs:?}");
    }

    #[test]
    fn svg_of_nothing_is_still_valid() {
        let svg = latency_svg(&[]);
        assert!(svg.contains("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 0);
    }

    #[test]
    fn percentiles_of_a_histogram() {
        let mut h = ns_histogram().unwrap();
        assert!(percentiles(&h).is_none());
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = percentiles(&h).unwrap();
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_us - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max_us - 1000.0).abs() < 1.0, "{p:?}");
        // 800 of the values are above 200 µs, none above 1 ms.
        assert!((p.pct_over_200us - 80.0).abs() < 0.2, "{p:?}");
        assert_eq!(p.pct_over_1ms, 0.0, "{p:?}");
    }

    #[test]
    fn stat_parsing_handles_odd_command_names() {
        let stat = "123 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn polls_rarely_while_the_producers_pace_and_often_near_the_end() {
        let expected = Duration::from_secs(6);
        assert_eq!(next_poll(Duration::ZERO, expected), POLL_WHILE_RUNNING);
        assert_eq!(
            next_poll(Duration::from_millis(5_600), expected),
            Duration::from_millis(400),
            "the last long sleep ends at the expected end"
        );
        assert_eq!(
            next_poll(Duration::from_millis(5_990), expected),
            POLL_NEAR_END
        );
        assert_eq!(next_poll(Duration::from_secs(9), expected), POLL_NEAR_END);
        assert_eq!(next_poll(Duration::ZERO, Duration::ZERO), POLL_NEAR_END);
    }

    #[test]
    fn paced_duration_is_records_over_rate() {
        let mut spec = DemoSpec {
            table_num: 10,
            rcd_cnt: 60_000,
            rate: 100_000,
            ..DemoSpec::default()
        };
        assert_eq!(paced_duration(&spec), Duration::from_secs(6));
        spec.rate = 0;
        assert_eq!(paced_duration(&spec), Duration::ZERO);
    }

    #[test]
    fn rcd_cnt_sizes_runs_by_rate() {
        assert_eq!(rcd_cnt_for(100_000, 6.0, 10, 7), 60_000);
        assert_eq!(rcd_cnt_for(0, 6.0, 10, 7), 7);
        assert_eq!(rcd_cnt_for(1, 0.1, 10, 7), 1);
    }

    fn slots_of(interval_ms: u64) -> Slots {
        Slots::of(&DemoSpec {
            checkpoint_interval_ms: interval_ms,
            ..DemoSpec::default()
        })
    }

    #[test]
    fn slots_put_the_first_ms_after_each_boundary_in_the_window() {
        let s = slots_of(200);
        let ms = 1_000_000;
        assert!(s.after_boundary(1_000 * 200 * ms));
        assert!(s.after_boundary(1_000 * 200 * ms + 9 * ms + 999_999));
        assert!(!s.after_boundary(1_000 * 200 * ms + 10 * ms));
        assert!(!s.after_boundary(1_000 * 200 * ms - 1));
        // An interval shorter than the window is all window.
        assert!(slots_of(5).after_boundary(4 * ms));
    }

    #[test]
    fn measure_splits_slow_rows_by_their_phase_in_the_checkpoint_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        let ms = 1_000_000u64;
        // One row per ms over two 200 ms slots; those 0..10 ms after a boundary take
        // 500 µs, every tenth of the others 300 µs, the rest 30 µs.
        for pk in 1..=400u64 {
            let produced = 10_000 * 200 * ms + (pk - 1) * ms;
            let phase_ms = (pk - 1) % 200;
            let latency = if phase_ms < 10 {
                500_000
            } else if pk.is_multiple_of(10) {
                300_000
            } else {
                30_000
            };
            SinkRow {
                kind: RowKind::Data,
                table_id: 0,
                schema_ver: 0,
                pk,
                produced_ns: produced,
                synced_ns: produced + 10_000,
                sink_ns: produced + latency,
            }
            .write_to(&mut buf);
        }
        std::fs::write(microcosm_demo::spec::sink_file_in(dir.path(), 0), &buf).unwrap();
        let mut m = measure(dir.path(), 1, 0, slots_of(200)).unwrap();
        let w = m.after_checkpoint().unwrap();
        assert_eq!(
            (w.window_ms, w.rows_after_boundary, w.rows_elsewhere),
            (10, 20, 380)
        );
        // Episodes: pk 1–10 (ms 0–9); pk 200 (ms 199) with pk 201–210 (ms 200–209); and
        // every tenth pk alone, 18 before and 19 after.
        let e = m.episodes().unwrap();
        assert_eq!((e.count, e.slow_rows), (39, 58), "{e:?}");
        assert_eq!((e.largest[0].rows, e.largest[1].rows), (11, 10), "{e:?}");
        assert!((e.largest[0].at_s - 0.199).abs() < 1e-9, "{e:?}");
        assert!((w.window_pct_of_time - 5.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.after_boundary_pct_over_200us, 100.0, "{w:?}");
        // pk 20, 30, ..., 200 and 220, ..., 400 outside the windows: 38 of 380.
        assert!((w.elsewhere_pct_over_200us - 10.0).abs() < 1e-9, "{w:?}");
        let l = percentiles(&m.total).unwrap();
        assert!(
            (l.pct_over_200us - 58.0 * 100.0 / 400.0).abs() < 1e-9,
            "{l:?}"
        );
    }

    #[test]
    fn slow_rows_group_into_episodes_by_produced_time() {
        let ms = |v: u64| v * 1_000_000;
        // Out of order, as the sink files give them: an episode of three rows at 10 ms
        // (one over 1 ms), one row alone at 20 ms, and four at 100 ms spread over 3 ms,
        // each within 2 ms of the previous.
        let mut slow = vec![
            (ms(101), 300_000),
            (ms(10), 250_000),
            (ms(20), 210_000),
            (ms(100), 400_000),
            (ms(11), 1_500_000),
            (ms(103), 900_000),
            (ms(12), 220_000),
            (ms(102), 500_000),
        ];
        let e = episodes(&mut slow, ms(5)).unwrap();
        assert_eq!((e.count, e.slow_rows), (3, 8));
        assert_eq!(e.largest.len(), 3);
        let [first, second, third] = [e.largest[0], e.largest[1], e.largest[2]];
        assert_eq!((first.rows, first.rows_over_1ms), (4, 0));
        assert!((first.at_s - 0.095).abs() < 1e-9 && (first.span_ms - 3.0).abs() < 1e-9);
        assert!((first.max_us - 900.0).abs() < 1e-9);
        assert_eq!((second.rows, second.rows_over_1ms), (3, 1));
        assert!((second.max_us - 1500.0).abs() < 1e-9 && (second.span_ms - 2.0).abs() < 1e-9);
        assert_eq!((third.rows, third.span_ms), (1, 0.0));
        assert!((e.largest_pct_of_slow_rows - 100.0).abs() < 1e-9);
        assert_eq!(episodes(&mut [], 0), None);
        // A gap just over 2 ms starts a new episode.
        let mut apart = vec![(ms(1), 300_000), (ms(3) + 1, 300_000)];
        assert_eq!(episodes(&mut apart, 0).unwrap().count, 2);
    }

    #[test]
    fn only_the_largest_episodes_are_listed() {
        // Ten single-row episodes 10 ms apart and one of three rows.
        let mut slow: Vec<(u64, u64)> = (0..10).map(|i| (i * 10_000_000, 300_000)).collect();
        slow.extend([
            (200_000_000, 300_000),
            (200_500_000, 300_000),
            (201_000_000, 300_000),
        ]);
        let e = episodes(&mut slow, 0).unwrap();
        assert_eq!(e.count, 11);
        assert_eq!(e.largest.len(), LARGEST_EPISODES);
        assert_eq!(e.largest[0].rows, 3);
        // The rest of the five: the earliest of the equal ones.
        assert!((e.largest[1].at_s - 0.0).abs() < 1e-9 && (e.largest[4].at_s - 0.03).abs() < 1e-9);
        assert!((e.largest_pct_of_slow_rows - 7.0 * 100.0 / 13.0).abs() < 1e-9);
    }

    #[test]
    fn seconds_flags_too_long_for_a_duration_are_errors_naming_the_flag() {
        assert_eq!(
            secs_flag("--floor-secs", 2.5).unwrap(),
            Duration::from_millis(2500)
        );
        assert_eq!(secs_flag("--idle-secs", 0.0).unwrap(), Duration::ZERO);
        for (flag, secs) in [
            ("--floor-secs", 1e20),
            ("--idle-secs", f64::MAX),
            ("--idle-secs", f64::INFINITY),
            ("--floor-secs", f64::NAN),
            ("--floor-secs", -1.0),
        ] {
            let err = secs_flag(flag, secs).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{flag} {secs} ")), "{err}");
        }
    }

    #[test]
    fn measuring_skips_malformed_lines_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let row = |pk: u64| SinkRow {
            kind: RowKind::Data,
            table_id: 0,
            schema_ver: 0,
            pk,
            produced_ns: pk * 1_000_000,
            synced_ns: pk * 1_000_000 + 10_000,
            sink_ns: pk * 1_000_000 + 30_000,
        };
        let mut buf = Vec::new();
        row(1).write_to(&mut buf);
        buf.extend_from_slice(b"data,0,0,\xff\xfe,1,2,3\n");
        row(2).write_to(&mut buf);
        buf.extend_from_slice(&[b'9'; 1 << 20]);
        buf.push(b'\n');
        buf.extend_from_slice(b"not a row\n");
        row(3).write_to(&mut buf);
        // The last line, cut off before its newline, still parses.
        row(4).write_to(&mut buf);
        buf.pop();
        std::fs::write(microcosm_demo::spec::sink_file_in(dir.path(), 0), &buf).unwrap();
        let mut pks = Vec::new();
        for_each_data_row(dir.path(), 1, |r| pks.push(r.pk)).unwrap();
        assert_eq!(pks, [1, 2, 3, 4]);
        let m = measure(dir.path(), 1, 0, slots_of(1000)).unwrap();
        assert_eq!(m.rows, 4);
    }

    #[test]
    fn measure_cuts_the_warmup() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        for pk in 1..=10u64 {
            SinkRow {
                kind: RowKind::Data,
                table_id: 0,
                schema_ver: 0,
                pk,
                produced_ns: pk * 1_000_000_000,
                synced_ns: pk * 1_000_000_000 + 10_000,
                sink_ns: pk * 1_000_000_000 + 30_000,
            }
            .write_to(&mut buf);
        }
        std::fs::write(microcosm_demo::spec::sink_file_in(dir.path(), 0), &buf).unwrap();
        let m = measure(dir.path(), 1, 3_000_000_000, slots_of(1000)).unwrap();
        assert!(m.warmup_applied);
        assert_eq!(m.rows, 7);
        let l = percentiles(&m.total).unwrap();
        assert!((l.p50_us - 30.0).abs() < 0.1, "{l:?}");
        let s = percentiles(&m.to_synced).unwrap();
        assert!((s.p50_us - 10.0).abs() < 0.1, "{s:?}");
        // A warm-up longer than the run measures everything.
        let all = measure(dir.path(), 1, 60_000_000_000, slots_of(1000)).unwrap();
        assert!(!all.warmup_applied);
        assert_eq!(all.rows, 10);
    }

    fn count(name: &str, ticks: u64, voluntary: u64, involuntary: u64) -> ThreadCount {
        ThreadCount {
            name: name.into(),
            ticks,
            voluntary,
            involuntary,
            on_cpu_ns: Some(ticks * 10_000_000),
            run_delay_ns: Some(ticks * 1_000),
        }
    }

    #[test]
    fn schedstat_gives_the_time_on_a_cpu_and_the_time_waiting_for_one() {
        assert_eq!(
            parse_schedstat("5034612345 8460012 1877\n"),
            Some((5_034_612_345, 8_460_012))
        );
        assert_eq!(parse_schedstat("5034612345 8460012\n"), None);
        assert_eq!(parse_schedstat("5034612345 soon 3\n"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    fn worker(on_cpu_ms: u64, waited_ms: u64) -> ThreadCount {
        ThreadCount {
            name: ENGINE_WORKER_COMM.into(),
            ticks: 0,
            voluntary: 0,
            involuntary: 0,
            on_cpu_ns: Some(on_cpu_ms * 1_000_000),
            run_delay_ns: Some(waited_ms * 1_000_000),
        }
    }

    #[test]
    fn worker_time_splits_the_wall_time_and_the_rest_is_stolen() {
        // Two workers over 2 s: 4000 ms of wall time between them.
        let before: ThreadCounters = [
            (1, worker(100, 10)),
            (2, worker(50, 5)),
            (3, count("sink-0-file", 1, 1, 1)),
        ]
        .into_iter()
        .collect();
        let after: ThreadCounters = [
            (1, worker(100 + 1900, 10 + 40)),
            (2, worker(50 + 1000, 5 + 20)),
            (3, count("sink-0-file", 9, 9, 9)),
        ]
        .into_iter()
        .collect();
        let ms = 1_000_000;
        let t = worker_time(
            "executor-1",
            (&before, &[7 * ms, 0]),
            (&after, &[7 * ms, 980 * ms]),
            (2.0, 2.0),
        )
        .unwrap();
        assert_eq!((t.executor.as_str(), t.workers), ("executor-1", 2));
        // (1900 + 1000) / 4 s on a CPU, (40 + 20) / 4 waited, 980 / 4 asleep.
        assert!((t.on_cpu_ms_per_s - 725.0).abs() < 1e-9, "{t:?}");
        assert!((t.waited_ms_per_s - 15.0).abs() < 1e-9, "{t:?}");
        assert!((t.asleep_ms_per_s - 245.0).abs() < 1e-9, "{t:?}");
        assert!((t.stolen_ms_per_s - 15.0).abs() < 1e-9, "{t:?}");
        // Without asleep counts for every worker, schedstat, workers or a window: nothing.
        assert_eq!(
            worker_time("e", (&before, &[0]), (&after, &[0]), (2.0, 2.0)),
            None
        );
        let mut blind = after.clone();
        blind.get_mut(&2).unwrap().on_cpu_ns = None;
        assert_eq!(
            worker_time("e", (&before, &[0, 0]), (&blind, &[0, 0]), (2.0, 2.0)),
            None
        );
        let sinks: ThreadCounters = [(3, count("sink-0-file", 9, 9, 9))].into_iter().collect();
        assert_eq!(
            worker_time("e", (&sinks, &[]), (&sinks, &[]), (2.0, 2.0)),
            None
        );
        assert_eq!(
            worker_time("e", (&before, &[0, 0]), (&after, &[0, 0]), (0.0, 2.0)),
            None
        );
        // Counts read a little apart never make the rest negative.
        let busy: ThreadCounters = [(1, worker(100 + 2100, 10)), (2, worker(50 + 2100, 5))]
            .into_iter()
            .collect();
        let t = worker_time("e", (&before, &[0, 0]), (&busy, &[0, 0]), (2.0, 2.0)).unwrap();
        assert_eq!(t.stolen_ms_per_s, 0.0);
    }

    #[test]
    fn worker_times_match_processes_to_executor_statuses_by_name() {
        let t0 = Instant::now();
        let at = |secs: u64, threads: ThreadCounters| ThreadsAt {
            at: t0 + Duration::from_secs(secs),
            threads: vec![ThreadCounters::new(), threads],
            steal: None,
        };
        let pids = [("master-1".to_string(), 1), ("executor-1".to_string(), 2)];
        let before = at(0, [(5, worker(0, 0))].into_iter().collect());
        let after = at(1, [(5, worker(900, 10))].into_iter().collect());
        // The statuses' own window (2 s here) gives the asleep rate: 160 ms in 2 s.
        let statuses = |secs: u64, asleep_ns: u64| {
            let mut s = status("executor-1", Vec::new());
            s.workers_asleep_ns = vec![asleep_ns];
            Statuses {
                at: t0 + Duration::from_secs(secs),
                executors: vec![s],
            }
        };
        let times = worker_times(
            &pids,
            (&before, &statuses(0, 0)),
            (&after, &statuses(2, 160_000_000)),
        );
        assert_eq!(times.len(), 1, "{times:?}");
        assert_eq!(times[0].executor, "executor-1");
        assert!((times[0].asleep_ms_per_s - 80.0).abs() < 1e-6, "{times:?}");
        assert!((times[0].stolen_ms_per_s - 10.0).abs() < 1e-6, "{times:?}");
        // An executor that did not answer is left out.
        let none = |secs| Statuses {
            at: t0 + Duration::from_secs(secs),
            executors: Vec::new(),
        };
        assert!(worker_times(&pids, (&before, &none(0)), (&after, &none(1))).is_empty());
        let mut r = run_with(100_000, 1000, 20.0);
        r.worker_time = times;
        let table = worker_time_table(&[r]);
        assert!(table.lines().next().unwrap().ends_with("(e1)"), "{table}");
        assert!(
            table.lines().nth(1).unwrap().ends_with("900/10.0/80/10.0"),
            "{table}"
        );
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_cpu_line() {
        let stat = "cpu  2412403 4 497777 1517248 16644 0 29836 2282 0 0\n\
                    cpu0 1174118 2 243015 800945 4151 0 10074 1106 0 0\n\
                    cpu1 1235775 1 253995 710741 12491 0 19761 1176 0 0\n\
                    intr 123 4 5\nctxt 99\ncpus_allowed 3\n";
        assert_eq!(parse_proc_stat_steal(stat), Some((2282, 2)));
        // A kernel too old to count steal has fewer values.
        assert_eq!(
            parse_proc_stat_steal("cpu  1 2 3 4 5 6 7\ncpu0 1 2 3 4 5 6 7\n"),
            None
        );
        assert_eq!(parse_proc_stat_steal("intr 1\n"), None);
    }

    #[test]
    fn host_steal_is_a_share_of_all_vcpus_over_the_window() {
        let ticks = clock_ticks_per_sec();
        let t0 = Instant::now();
        let at = |secs: u64, steal: Option<(u64, usize)>| ThreadsAt {
            at: t0 + Duration::from_secs(secs),
            threads: Vec::new(),
            steal,
        };
        // One second of steal ticks over 10 s on 2 vCPUs: 5 %.
        let steal = host_steal(
            &at(0, Some((100, 2))),
            &at(10, Some((100 + ticks as u64, 2))),
        )
        .unwrap();
        assert!((steal.steal_ms - 1000.0).abs() < 1e-9, "{steal:?}");
        assert!((steal.pct_of_vcpus - 5.0).abs() < 1e-9, "{steal:?}");
        assert_eq!(host_steal(&at(0, None), &at(10, Some((1, 2)))), None);
        // An empty window does not divide by zero.
        assert_eq!(
            host_steal(&at(3, Some((1, 2))), &at(3, Some((1, 2)))),
            Some(HostSteal {
                steal_ms: 0.0,
                pct_of_vcpus: 0.0
            })
        );
    }

    #[test]
    fn context_switches_are_read_from_a_task_status() {
        let status = "Name:\tmicrocosm-worke\nState:\tR (running)\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t4021\n";
        assert_eq!(parse_ctxt_switches(status), Some((17, 4021)));
        assert_eq!(
            parse_ctxt_switches("Name:\tx\nvoluntary_ctxt_switches:\t3\n"),
            None
        );
        assert_eq!(
            parse_ctxt_switches("voluntary_ctxt_switches:\tmany\nnonvoluntary_ctxt_switches:\t1\n"),
            None
        );
    }

    #[test]
    fn threads_are_grouped_by_name_over_the_window() {
        let before: ThreadCounters = [
            (10, count(ENGINE_WORKER_COMM, 100, 5, 1_000)),
            (11, count("sink-0-file", 10, 200, 3)),
            (12, count("sink-1-file", 10, 100, 0)),
            (13, count("gone", 1, 1, 1)),
        ]
        .into_iter()
        .collect();
        let after: ThreadCounters = [
            (10, count(ENGINE_WORKER_COMM, 300, 7, 1_400)),
            (11, count("sink-0-file", 20, 280, 5)),
            (12, count("sink-1-file", 14, 140, 1)),
            // Started during the window: counted from zero.
            (14, count("sink-1-file", 2, 20, 1)),
        ]
        .into_iter()
        .collect();
        let usage = thread_usage(&before, &after, 2.0, 100.0);
        let names: Vec<&str> = usage.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, [ENGINE_WORKER_COMM, "sink-0-file", "sink-1-file"]);
        assert_eq!(
            usage[0],
            ThreadUsage {
                name: ENGINE_WORKER_COMM.into(),
                threads: 1,
                cpu_s: 2.0,
                voluntary_switches_per_s: 1.0,
                involuntary_switches_per_s: 200.0,
                // 200 µs waited (200 ticks × 1 µs) over 2 s.
                waited_ms_per_s: Some(0.1),
            }
        );
        assert_eq!(usage[2].threads, 2);
        assert_eq!(usage[2].voluntary_switches_per_s, 30.0);
        assert_eq!(usage[2].cpu_s, 0.06);
        // The workers' preemptions against every other thread's wake-ups.
        assert_eq!(switch_outs_and_wakeups(&usage), (Some(200.0), 40.0 + 30.0));
        assert_eq!(switch_outs_and_wakeups(&usage[1..]), (None, 40.0 + 30.0));
    }

    #[test]
    fn a_thread_without_schedstat_leaves_its_group_without_a_wait() {
        let mut blind = count("sink-0-file", 10, 1, 1);
        blind.run_delay_ns = None;
        let before: ThreadCounters = [(1, count(ENGINE_WORKER_COMM, 100, 0, 0))]
            .into_iter()
            .collect();
        let after: ThreadCounters = [
            (1, count(ENGINE_WORKER_COMM, 300, 0, 0)),
            (2, count("sink-0-file", 10, 1, 1)),
            (3, blind),
        ]
        .into_iter()
        .collect();
        let usage = thread_usage(&before, &after, 1.0, 100.0);
        assert_eq!(usage[0].waited_ms_per_s, Some(0.2));
        assert_eq!(usage[1].threads, 2);
        assert_eq!(usage[1].waited_ms_per_s, None);
    }

    #[test]
    fn the_per_second_table_shows_the_host_steal() {
        let worker = |waited: Option<f64>| ThreadUsage {
            name: ENGINE_WORKER_COMM.into(),
            threads: 1,
            cpu_s: 1.0,
            voluntary_switches_per_s: 2.0,
            involuntary_switches_per_s: 300.0,
            waited_ms_per_s: waited,
        };
        let process = |name: &str, threads: Vec<ThreadUsage>| ProcessUsage {
            name: name.into(),
            cpu_s: 1.0,
            cpu_pct_of_core: 10.0,
            peak_rss_mb: None,
            peak_rss_reset: false,
            threads,
        };
        let mut r = run_with(100_000, 0, 20.0);
        r.processes = vec![
            process("master-1", Vec::new()),
            process("executor-1", vec![worker(Some(12.34))]),
            process("executor-2", vec![worker(None)]),
        ];
        r.host_steal = Some(HostSteal {
            steal_ms: 40.0,
            pct_of_vcpus: 0.2,
        });
        let t = wakeup_table(&[r.clone()]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("host steal % of vCPUs"), "{t}");
        assert!(lines[1].contains("-/300/300"), "{t}");
        assert!(lines[1].trim_end().ends_with("0.20"), "{t}");
        r.host_steal = None;
        assert!(
            wakeup_table(&[r])
                .lines()
                .nth(1)
                .unwrap()
                .trim_end()
                .ends_with('-')
        );
    }
}
