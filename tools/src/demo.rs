//! `microcosm demo`: a local cluster as child processes, the demo job, live progress, the
//! verifier and a summary — the first thing a newcomer runs.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use microcosm_control::client::MasterClient;
use microcosm_control::proto::{GetJob, JobRef};
use microcosm_demo::fence::Owner;
use microcosm_demo::{DemoSpec, DemoSpecOverrides};

use crate::local::{Interrupts, LocalCluster, LocalClusterDir, Proc};

/// Flags of `microcosm demo`. Every job-spec key can be overridden by the flag of the same name.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of masters (1, or 3 for HA).
    #[arg(long, default_value_t = 1)]
    masters: u32,
    /// Number of executors.
    #[arg(long, default_value_t = 2)]
    executors: u32,
    #[command(flatten)]
    tuning: crate::local::ExecutorTuning,
    /// Job spec file to start from (defaults are used otherwise). Its keys apply, sink-dir
    /// included, unless the flag of the same name overrides them.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Job name; also the output sub-directory.
    #[arg(long)]
    flow_id: Option<String>,
    /// Producers (tables).
    #[arg(long)]
    table_num: Option<i64>,
    /// Binlog streams.
    #[arg(long)]
    binlog_num: Option<i64>,
    /// Data records per table.
    #[arg(long)]
    rcd_cnt: Option<i64>,
    /// A DDL every this many pks (0 = none).
    #[arg(long)]
    ddl_freq: Option<i64>,
    /// Offered records per second in total (0 = as fast as possible).
    #[arg(long)]
    rate: Option<i64>,
    /// Where sinks write (default: the --config file's sink-dir if it sets one, else inside
    /// the cluster's temporary directory).
    #[arg(long)]
    sink_dir: Option<PathBuf>,
    /// Records per batch.
    #[arg(long)]
    batch_size: Option<i64>,
    /// Linger bound of partial batches (µs).
    #[arg(long)]
    linger_us: Option<i64>,
    /// Interval between checkpoints (ms).
    #[arg(long)]
    checkpoint_interval_ms: Option<i64>,
    /// Kill one executor (SIGKILL) this long after the job starts, e.g. `3s`.
    #[arg(long, value_parser = parse_duration)]
    kill_executor_after: Option<Duration>,
    /// Kill the leader master (SIGKILL) this long after the job starts (needs --masters 3).
    #[arg(long, value_parser = parse_duration)]
    kill_leader_after: Option<Duration>,
    /// Keep the cluster's temporary directory (logs, data, certificates) afterwards.
    #[arg(long)]
    keep: bool,
    /// Give up if the job has not finished after this long, e.g. `10m` (exit status 3, the
    /// cluster directory kept).
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    timeout: Duration,
}

/// Parses `250ms`, `3s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 500ms, 3s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} is too long"))
}

/// The demo's job spec: the defaults, then the keys of the `config` file (its path and text)
/// if given, then the flags. `sink-dir` defaults to `default_sink_dir` only when neither the
/// file nor a flag sets it.
fn job_spec(
    config: Option<(&Path, &str)>,
    flags: &DemoSpecOverrides,
    default_sink_dir: PathBuf,
) -> anyhow::Result<DemoSpec> {
    let file = match config {
        Some((path, text)) => toml::from_str::<DemoSpecOverrides>(text)
            .map_err(microcosm_demo::SpecError::from)
            .with_context(|| format!("job spec {}", path.display()))?,
        None => DemoSpecOverrides::default(),
    };
    let mut spec = DemoSpec::default();
    if file.sink_dir.is_none() && flags.sink_dir.is_none() {
        spec.sink_dir = default_sink_dir;
    }
    if let Some((path, _)) = config {
        file.apply(&mut spec)
            .with_context(|| format!("job spec {}", path.display()))?;
    }
    flags.apply(&mut spec)?;
    Ok(spec)
}

/// Whether the time since `last` (`None`: never) is at least `every`. An `Option` rather than
/// a made-up instant in the past: `Instant::now() - d` panics while the monotonic clock is
/// below `d` (a freshly booted machine).
fn due(last: Option<Instant>, every: Duration) -> bool {
    last.is_none_or(|at| at.elapsed() >= every)
}

/// Follows the sinks' output while the job runs.
///
/// While records flow it only looks at file sizes: reading the files to count their lines
/// took a vCPU for 10–20 ms every progress line (tens of MB of new CSV per 2 s at 100k
/// records/s), and with both vCPUs held by spinning engine workers that stalled the
/// pipeline it was reporting on (demo p99 5–6 ms against 0.7 ms for the same job under
/// `microcosm bench`). Rows are therefore estimated from the bytes, at the mean bytes per row
/// of each file's first and last [`SAMPLE_BYTES`] (rows grow as pks get longer); the exact
/// count is taken once, after the job ended.
struct Progress {
    files: Vec<SinkFile>,
}

/// Bytes sampled from a sink file, its head once and its tail at every estimate, to learn its
/// bytes per row.
const SAMPLE_BYTES: usize = 64 * 1024;

/// One sink file as [`Progress`] sees it.
struct SinkFile {
    path: PathBuf,
    /// Bytes per row of the file's head, once the file holds [`SAMPLE_BYTES`].
    bytes_per_row: Option<f64>,
}

impl Progress {
    fn new(spec: &DemoSpec) -> Self {
        Self::of_files((0..spec.binlog_num).map(|i| spec.sink_path(i)).collect())
    }

    fn of_files(paths: Vec<PathBuf>) -> Self {
        Self {
            files: paths
                .into_iter()
                .map(|path| SinkFile {
                    path,
                    bytes_per_row: None,
                })
                .collect(),
        }
    }

    /// Rows written so far, estimated from the files' sizes (see [`Progress`]).
    fn estimated_rows(&mut self) -> u64 {
        let mut total = 0.0;
        for file in &mut self.files {
            let len = std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
            if file.bytes_per_row.is_none() && len >= SAMPLE_BYTES as u64 {
                file.bytes_per_row = bytes_per_row_at(&file.path, 0);
            }
            let Some(head) = file.bytes_per_row else {
                continue;
            };
            let tail = bytes_per_row_at(&file.path, len.saturating_sub(SAMPLE_BYTES as u64));
            total += len as f64 / tail.map_or(head, |tail| (head + tail) / 2.0);
        }
        total.round() as u64
    }

    /// Rows written, counted line by line: reads every file in full, so only once the job
    /// has ended.
    fn counted_rows(&self) -> u64 {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        for file in &self.files {
            let Ok(mut f) = std::fs::File::open(&file.path) else {
                continue;
            };
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
            }
        }
        total
    }

    /// Per sink file, its size if an attempt of job `job` with epoch `epoch` or later has
    /// claimed it (truncated it to its checkpoint), else `None`.
    fn claimed_sizes(&self, job: u64, epoch: u64) -> Vec<Option<u64>> {
        self.files
            .iter()
            .map(|file| {
                let p = &file.path;
                let owner = microcosm_demo::fence::owner(p).ok()??;
                (owner.job == job && owner.epoch >= epoch)
                    .then(|| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            })
            .collect()
    }
}

/// Bytes per row in the [`SAMPLE_BYTES`] of `path` from `offset` on; `None` if they cannot
/// be read or hold no complete row.
fn bytes_per_row_at(path: &Path, offset: u64) -> Option<f64> {
    use std::io::{Seek, SeekFrom};
    let mut sample = vec![0u8; SAMPLE_BYTES];
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    f.read_exact(&mut sample).ok()?;
    let rows = sample.iter().filter(|b| **b == b'\n').count();
    (rows > 0).then(|| SAMPLE_BYTES as f64 / rows as f64)
}

/// Runs the demo. Returns whether verification passed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    if args.masters == 0 || args.executors == 0 {
        bail!("--masters and --executors must be at least 1");
    }
    if args.kill_leader_after.is_some() && args.masters < 3 {
        bail!("--kill-leader-after needs --masters 3 (a single master is not highly available)");
    }
    if args.kill_executor_after.is_some() && args.executors < 2 {
        bail!(
            "--kill-executor-after needs --executors 2 or more (the tasks of the only executor \
             would have nowhere to go)"
        );
    }
    // Before anything is created: a signal from now on shuts the cluster down cleanly.
    let mut interrupts = Interrupts::install()?;
    let cluster_dir = LocalClusterDir::create("microcosm-demo-")?;
    let dir = cluster_dir.path().to_path_buf();

    // The job spec: defaults, then a file, then flags.
    let config = match &args.config {
        Some(p) => Some((
            p.as_path(),
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )),
        None => None,
    };
    let flags = DemoSpecOverrides {
        flow_id: args.flow_id.clone(),
        table_num: args.table_num,
        binlog_num: args.binlog_num,
        servers: None,
        rcd_cnt: args.rcd_cnt,
        ddl_freq: args.ddl_freq,
        rate: args.rate,
        sink_dir: args.sink_dir.clone(),
        batch_size: args.batch_size,
        linger_us: args.linger_us,
        checkpoint_interval_ms: args.checkpoint_interval_ms,
    };
    let spec = job_spec(
        config.as_ref().map(|(p, text)| (*p, text.as_str())),
        &flags,
        dir.join("sink"),
    )?;
    check_output_dir(&spec.output_dir())?;

    println!(
        "microcosm demo: {} master(s), {} executor(s), cluster dir {}",
        args.masters,
        args.executors,
        dir.display()
    );
    println!(
        "job: {} tables x {} records, {} binlog streams, DDL every {}, rate {}",
        spec.table_num,
        spec.rcd_cnt,
        spec.binlog_num,
        if spec.ddl_freq == 0 {
            "never".to_string()
        } else {
            spec.ddl_freq.to_string()
        },
        if spec.rate == 0 {
            "unlimited".to_string()
        } else {
            format!("{}/s", spec.rate)
        }
    );

    let tuning = crate::local::ExecutorTuning {
        slots: Some(crate::local::slots_for(&microcosm_demo::plan::plan(&spec))),
        ..args.tuning
    };
    let mut cluster = cluster_dir.launch(args.masters, args.executors, tuning)?;
    // On an error the cluster's logs are what explains it: keep them.
    let keep_on_error = |mut cluster: LocalCluster, e: anyhow::Error| {
        cluster.shutdown();
        let kept = cluster.keep();
        e.context(format!("cluster logs kept in {}", kept.display()))
    };
    // Submitting before every executor registered would place the whole job on the first
    // one: no record would cross the network, and the placement would differ between runs.
    let started = async {
        cluster
            .wait_for_executors(args.executors as usize, Duration::from_secs(30))
            .await?;
        cluster.submit_demo(&spec).await
    };
    // Ctrl-C (or SIGTERM) shuts the cluster down in every phase; --keep keeps its directory.
    let interrupted = |mut cluster: LocalCluster| {
        println!("\ninterrupted; shutting the cluster down");
        cluster.shutdown();
        if args.keep {
            println!("cluster dir kept: {}", cluster.keep().display());
        }
        anyhow::anyhow!("interrupted")
    };
    let started = tokio::select! {
        r = started => r,
        _ = interrupts.recv() => return Err(interrupted(cluster)),
    };
    let job = match started {
        Ok(job) => job,
        Err(e) => return Err(keep_on_error(cluster, e)),
    };
    println!(
        "submitted job {job}; output in {}",
        spec.output_dir().display()
    );

    let outcome = tokio::select! {
        r = watch(&mut cluster, job, &spec, &args) => r,
        _ = interrupts.recv() => return Err(interrupted(cluster)),
    };
    let state = match outcome {
        Ok(state) => state,
        Err(e) => return Err(keep_on_error(cluster, e)),
    };
    cluster.shutdown();
    let ended = match state {
        Watched::Ended(state) if state == "Finished" => None,
        Watched::Ended(state) => Some(format!("job {job} ended {state}")),
        Watched::TimedOut => Some(format!(
            "job {job} did not finish within {:?} (--timeout)",
            args.timeout
        )),
    };
    if let Some(ended) = ended {
        println!("{ended}; cluster logs kept in {}", dir.display());
        let _ = cluster.keep();
        return Ok(false);
    }
    println!("\nverifying {} ...", spec.output_dir().display());
    // On its own thread, so that Ctrl-C still ends a long verification. A thread rather
    // than the blocking pool: the runtime's shutdown would wait for a blocking task.
    let (verified_tx, verified) = tokio::sync::oneshot::channel();
    let verify_spec = spec.clone();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || {
            let report = microcosm_demo::verify(&verify_spec.output_dir(), &verify_spec);
            let _ = verified_tx.send(report);
        })
        .context("cannot start the verifier thread")?;
    let report = tokio::select! {
        r = verified => match r {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => return Err(keep_on_error(cluster, e.into())),
            Err(_) => {
                let e = anyhow::anyhow!("the verifier ended without a report");
                return Err(keep_on_error(cluster, e));
            }
        },
        _ = interrupts.recv() => {
            let kept = cluster.keep();
            bail!(
                "interrupted during verification; cluster dir kept in {} (the job's output is \
                 in {})",
                kept.display(),
                spec.output_dir().display()
            );
        }
    };
    println!("{report}");
    print_stages(&spec);
    let other = report.other_writer(job);
    if let Some(other) = &other {
        println!("{other}");
    }
    let passed = report.passed() && other.is_none();
    println!(
        "{}",
        if passed {
            "verification PASSED"
        } else {
            "verification FAILED"
        }
    );
    if args.keep || !passed {
        let kept = cluster.keep();
        println!("cluster dir kept: {}", kept.display());
    }
    Ok(passed)
}

/// How [`watch`] saw the job end.
enum Watched {
    /// In this terminal state.
    Ended(String),
    /// Not within `--timeout`.
    TimedOut,
}

/// Follows the job to its end, printing progress and injecting the requested failures. Fails
/// at once if a node process exits on its own.
async fn watch(
    cluster: &mut LocalCluster,
    job: u64,
    spec: &DemoSpec,
    args: &DemoArgs,
) -> anyhow::Result<Watched> {
    let dir = cluster.dir();
    let LocalCluster {
        masters,
        executors,
        master_addrs,
        client,
        ..
    } = cluster;
    let client = &*client;
    let master_addrs = master_addrs.as_slice();
    let tty = std::io::stdout().is_terminal();
    let expected =
        spec.total_data_records() + spec.ddl_rows_per_stream() * u64::from(spec.binlog_num);
    let mut progress = Progress::new(spec);
    let start = Instant::now();
    let mut running_since: Option<Instant> = None;
    let mut last_print: Option<Instant> = None;
    let mut last_rows = 0u64;
    let mut last_rate_at = Instant::now();
    let mut rate = 0.0;
    // When, the epoch before the kill, and per sink its size when the new attempt claimed it.
    let mut killed_executor: Option<(Instant, u64, Vec<Option<u64>>)> = None;
    let mut recovery_reported = false;
    let mut killed_leader = false;
    // The reason last shown for a job that does not run (e.g. waiting for capacity).
    let mut shown_reason = String::new();
    loop {
        if start.elapsed() > args.timeout {
            return Ok(Watched::TimedOut);
        }
        // A node that dies (other than one killed here on purpose) ends the demo now, with
        // its log, rather than at the timeout.
        if let Some(exited) =
            crate::local::first_exited(&dir, masters.iter_mut().chain(executors.iter_mut()))
        {
            bail!("{exited}");
        }
        let info = client.call::<GetJob>(&JobRef { id: job }).await;
        let (state, epoch) = match &info {
            Ok(j) => (j.state.clone(), j.epoch),
            Err(_) => ("unknown".to_string(), 0),
        };
        if matches!(state.as_str(), "Finished" | "Failed" | "Cancelled") {
            let rows = progress.counted_rows();
            if tty {
                println!();
            }
            println!(
                "job {job} {state} after {:.1}s ({rows} rows written)",
                start.elapsed().as_secs_f64()
            );
            if let Ok(j) = &info
                && state != "Finished"
            {
                println!("reason: {}", j.reason);
            }
            let came_due = |after: Duration| running_since.is_some_and(|s| s.elapsed() >= after);
            if let Some(after) = args.kill_executor_after
                && killed_executor.is_none()
            {
                if came_due(after) {
                    println!(
                        "no executor was killed: none was running tasks once --kill-executor-after ({after:?}) came due"
                    );
                } else {
                    println!(
                        "no executor was killed: the job ended before --kill-executor-after ({after:?}) was due"
                    );
                }
            }
            if let Some(after) = args.kill_leader_after
                && !killed_leader
            {
                if came_due(after) {
                    println!(
                        "no master was killed: no master answered as the leader once --kill-leader-after ({after:?}) came due"
                    );
                } else {
                    println!(
                        "no master was killed: the job ended before --kill-leader-after ({after:?}) was due"
                    );
                }
            }
            return Ok(Watched::Ended(state));
        }
        if state == "Running" && running_since.is_none() {
            running_since = Some(Instant::now());
        }
        if let Ok(j) = &info
            && state != "Running"
            && !j.reason.is_empty()
            && j.reason != shown_reason
        {
            if tty {
                println!();
            }
            println!("job {job} {state}: {}", j.reason);
            shown_reason.clone_from(&j.reason);
        }
        if let Some(since) = running_since {
            if let Some(after) = args.kill_executor_after
                && killed_executor.is_none()
                && since.elapsed() >= after
                && let Some(victim) = busy_executor(client, master_addrs, executors).await
            {
                println!("\n>>> killing {} (SIGKILL)", victim.name);
                victim.kill();
                killed_executor = Some((Instant::now(), epoch, vec![None; progress.files.len()]));
            }
            if let Some(after) = args.kill_leader_after
                && !killed_leader
                && since.elapsed() >= after
            {
                for (i, addr) in master_addrs.iter().enumerate() {
                    if let Ok(s) = client.status_of(*addr).await
                        && s.role == "leader"
                    {
                        println!("\n>>> killing leader master-{} (SIGKILL)", i + 1);
                        masters[i].kill();
                        killed_leader = true;
                        break;
                    }
                }
            }
        }
        // Recovery: from the kill until every sink writes again under the new attempt (its
        // file grew past the size it had when the new attempt claimed and truncated it).
        if let Some((at, old_epoch, baseline)) = &mut killed_executor
            && !recovery_reported
            && epoch > *old_epoch
        {
            let sizes = progress.claimed_sizes(job, *old_epoch + 1);
            for (base, now) in baseline.iter_mut().zip(&sizes) {
                if base.is_none() {
                    *base = *now;
                }
            }
            let progressed = sizes
                .iter()
                .zip(baseline.iter())
                .all(|(now, base)| matches!((now, base), (Some(n), Some(b)) if n > b));
            if progressed {
                let resumed = match info.as_ref().ok().and_then(|j| j.restored_from) {
                    Some(id) => format!("resumed from checkpoint {id}"),
                    None => "no checkpoint had completed: restarted from scratch".to_string(),
                };
                println!(
                    "\n>>> recovered: every sink makes progress again {:.2}s after the kill (epoch {epoch}, {resumed})",
                    at.elapsed().as_secs_f64()
                );
                recovery_reported = true;
            }
        }
        if due(
            last_print,
            Duration::from_millis(if tty { 200 } else { 2000 }),
        ) {
            // An estimate: never shown past the expected total.
            let rows = progress.estimated_rows().min(expected);
            let dt = last_rate_at.elapsed().as_secs_f64();
            if dt > 0.5 {
                rate = rows.saturating_sub(last_rows) as f64 / dt;
                last_rows = rows;
                last_rate_at = Instant::now();
            }
            let line = format!(
                "[{:>6.1}s] {state:<10} rows ~{rows}/{expected} ({:.0}%)  {rate:.0} rows/s",
                start.elapsed().as_secs_f64(),
                100.0 * rows as f64 / expected.max(1) as f64
            );
            if tty {
                print!("\r{line}   ");
                let _ = std::io::stdout().flush();
            } else {
                println!("{line}");
            }
            last_print = Some(Instant::now());
        }
        let watching = (args.kill_executor_after.is_some() && killed_executor.is_none())
            || (killed_executor.is_some() && !recovery_reported)
            || (args.kill_leader_after.is_some() && !killed_leader);
        tokio::time::sleep(if watching {
            POLL_WATCHING
        } else {
            POLL_PROGRESS
        })
        .await;
    }
}

/// Poll interval while a kill is due or a recovery is being timed (their resolution).
const POLL_WATCHING: Duration = Duration::from_millis(50);

/// Poll interval otherwise, the terminal's refresh: every poll is an RPC that wakes the
/// leader and this process, and on a machine whose cores are held by spinning engine
/// workers each wake-up preempts one of them.
const POLL_PROGRESS: Duration = Duration::from_millis(200);

/// An executor process that runs tasks right now (the victim of `--kill-executor-after`).
async fn busy_executor<'a>(
    client: &MasterClient,
    master_addrs: &[SocketAddr],
    executors: &'a mut [Proc],
) -> Option<&'a mut Proc> {
    for addr in master_addrs {
        let Ok(status) = client.status_of(*addr).await else {
            continue;
        };
        if status.role != "leader" {
            continue;
        }
        let busy: Vec<String> = status
            .executors
            .iter()
            .filter(|e| e.state == "alive" && e.used > 0)
            .map(|e| e.name.clone())
            .collect();
        return executors
            .iter_mut()
            .find(|p| p.child.is_some() && busy.contains(&p.name));
    }
    None
}

/// Refuses an output directory this demo's job cannot write: the job of a fresh cluster is job
/// 1 in its first attempt, and sink files that a higher job id, or a later attempt of a job 1,
/// of an earlier cluster owns would be refused to it (the job would fail after its restarts).
/// Output of an earlier first attempt of job 1 is taken over (overwritten).
fn check_output_dir(dir: &Path) -> anyhow::Result<()> {
    match latest_owner(dir) {
        Some(owner) if owner > (Owner { job: 1, epoch: 1 }) => anyhow::bail!(
            "{} holds the output of {owner} of an earlier cluster, which this demo's fresh \
             cluster (job 1) may not take over; remove the directory, or use another \
             --flow-id or --sink-dir",
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// The greatest owner the sink fences in `dir` name (the output of a job that already ran
/// there), if any; unreadable fences are left to the sinks to report.
fn latest_owner(dir: &Path) -> Option<Owner> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let data = path.to_str()?.strip_suffix(".fence")?;
            microcosm_demo::fence::owner(Path::new(data)).ok()?
        })
        .max()
}

/// Prints each sink's per-stage latency breakdown (from the records' time tracer).
fn print_stages(spec: &DemoSpec) {
    println!(
        "per-stage latency (µs, every {}th data row), by sink:",
        microcosm_demo::operators::STAGE_SAMPLE_EVERY
    );
    for i in 0..spec.binlog_num {
        let path = microcosm_demo::operators::stages_path(&spec.sink_path(i));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [stage, _count, p50, p90, p99, p999, max] = f.as_slice() {
                println!(
                    "  sink {i}  {stage:<17} p50 {p50:>9}  p90 {p90:>9}  p99 {p99:>9}  p99.9 {p999:>9}  max {max:>9}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_estimates_rows_from_sizes_and_counts_them_exactly_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        // 16-byte rows in one file, 32-byte rows in the other.
        let rows_a = 10_000;
        let rows_b = 3_000;
        std::fs::write(&a, "data,1,0,123456\n".repeat(rows_a)).unwrap();
        std::fs::write(&b, "data,2,0,1234567890123456789012\n".repeat(rows_b)).unwrap();
        let mut progress = Progress::of_files(vec![a.clone(), b.clone(), dir.path().join("none")]);
        assert_eq!(progress.estimated_rows(), (rows_a + rows_b) as u64);
        assert_eq!(progress.counted_rows(), (rows_a + rows_b) as u64);
        // Rows that grow along the file: the head alone would overestimate by ~6 %.
        let c = dir.path().join("c.csv");
        let text: String = (0..40_000u64)
            .map(|pk| format!("data,3,0,{pk}\n"))
            .collect();
        std::fs::write(&c, &text).unwrap();
        let estimate = Progress::of_files(vec![c]).estimated_rows() as f64;
        assert!(
            (estimate / 40_000.0 - 1.0).abs() < 0.03,
            "estimate {estimate}"
        );
        // A file still shorter than the sample is not estimated yet, but is counted.
        std::fs::write(&b, "short\n").unwrap();
        let mut fresh = Progress::of_files(vec![b]);
        assert_eq!(fresh.estimated_rows(), 0);
        assert_eq!(fresh.counted_rows(), 1);
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: DemoArgs,
    }

    #[test]
    fn durations_too_long_for_a_duration_are_errors_naming_the_flag() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for huge in ["100000000000000000000", "99999999999999999999m", "1e400"] {
            let err = parse_duration(huge).unwrap_err();
            assert!(err.contains(huge), "{err}");
        }
        assert!(
            parse_duration("100000000000000000000")
                .unwrap_err()
                .contains("too long")
        );
        use clap::Parser;
        for flag in ["--timeout", "--kill-executor-after", "--kill-leader-after"] {
            let err = Cli::try_parse_from(["demo", flag, "100000000000000000000"]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(flag) && msg.contains("too long"), "{msg}");
        }
        let cli = Cli::try_parse_from(["demo", "--timeout", "90s"]).unwrap();
        assert_eq!(cli.args.timeout, Duration::from_secs(90));
    }

    #[test]
    fn the_first_progress_line_is_due_at_once() {
        assert!(due(None, Duration::from_secs(3600)));
        assert!(!due(Some(Instant::now()), Duration::from_secs(3600)));
        assert!(due(Some(Instant::now()), Duration::ZERO));
    }

    #[test]
    fn an_output_dir_the_fresh_cluster_cannot_take_over_is_refused_up_front() {
        use microcosm_demo::fence::FencedFile;
        let dir = tempfile::tempdir().unwrap();
        // Nothing there yet, or the output of an earlier first attempt of job 1: fine.
        check_output_dir(dir.path()).unwrap();
        check_output_dir(&dir.path().join("missing")).unwrap();
        let sink = dir.path().join("sink_0.csv");
        drop(FencedFile::claim(&sink, Owner { job: 1, epoch: 1 }, 0).unwrap());
        check_output_dir(dir.path()).unwrap();
        // A recovered job 1, or a later job, of an earlier cluster: refused, naming both.
        for owner in [Owner { job: 1, epoch: 2 }, Owner { job: 3, epoch: 1 }] {
            drop(FencedFile::claim(&sink, owner, 0).unwrap());
            let err = check_output_dir(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains(&dir.path().display().to_string()) && err.contains(&owner.to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn the_config_files_sink_dir_is_kept_and_only_a_flag_overrides_it() {
        let file = Path::new("job.toml");
        let default = PathBuf::from("/cluster/sink");
        let none = DemoSpecOverrides::default();
        let flag = DemoSpecOverrides {
            sink_dir: Some(PathBuf::from("/flag")),
            rate: Some(7),
            ..DemoSpecOverrides::default()
        };
        let with_dir = "sink-dir = \"/from/file\"\nrate = 5\n";
        let without_dir = "rate = 5\n";
        let spec = job_spec(Some((file, with_dir)), &none, default.clone()).unwrap();
        assert_eq!(
            (spec.sink_dir.as_path(), spec.rate),
            (Path::new("/from/file"), 5)
        );
        let spec = job_spec(Some((file, with_dir)), &flag, default.clone()).unwrap();
        assert_eq!(
            (spec.sink_dir.as_path(), spec.rate),
            (Path::new("/flag"), 7)
        );
        let spec = job_spec(Some((file, without_dir)), &none, default.clone()).unwrap();
        assert_eq!((spec.sink_dir.as_path(), spec.rate), (default.as_path(), 5));
        let spec = job_spec(None, &none, default.clone()).unwrap();
        assert_eq!(spec.sink_dir, default);
        assert_eq!(spec.rate, DemoSpec::default().rate);
        let spec = job_spec(None, &flag, default.clone()).unwrap();
        assert_eq!(spec.sink_dir, Path::new("/flag"));
        // Errors of the file name it and the key.
        for (bad, key) in [
            ("table-num = -3", "table-num"),
            ("table-nums = 3", "table-nums"),
            ("rate = \"x\"", "rate"),
        ] {
            let err = job_spec(Some((file, bad)), &none, default.clone()).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.starts_with("job spec job.toml: ") && msg.contains(key),
                "{msg}"
            );
        }
    }

    #[test]
    fn recovery_looks_only_at_files_this_job_claimed() {
        use microcosm_demo::fence::FencedFile;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("sink_0.csv"), dir.path().join("sink_1.csv"));
        let progress = Progress::of_files(vec![a.clone(), b.clone()]);
        assert_eq!(latest_owner(dir.path()), None);
        let mut file = FencedFile::claim(&a, Owner { job: 3, epoch: 2 }, 0).unwrap();
        std::io::Write::write_all(&mut file, b"row\n").unwrap();
        FencedFile::claim(&b, Owner { job: 2, epoch: 5 }, 0).unwrap();
        assert_eq!(progress.claimed_sizes(3, 2), [Some(4), None]);
        assert_eq!(progress.claimed_sizes(3, 3), [None, None]);
        assert_eq!(progress.claimed_sizes(2, 1), [None, Some(0)]);
        assert_eq!(latest_owner(dir.path()), Some(Owner { job: 3, epoch: 2 }));
    }
}
