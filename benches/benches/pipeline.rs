//! End-to-end latency of the demo pipeline (producer → binlog → receive → syncer → sink,
//! CSV sinks, checkpoints on), paced at 100k records/s, T = 10, S = 4:
//!
//! - `pipeline/one_engine`: every task on one engine with one worker, in-process edges only
//!   (on a 2-core machine two workers measured p50 165 µs against 52 µs with one: every
//!   cross-worker hop is a thread wake-up competing for the same two cores);
//! - `pipeline/two_engines_quic`: split like a two-executor cluster — producers and binlogs
//!   on one engine, receivers, syncers and sinks on another (one worker each), each with its
//!   own QUIC endpoint driven on its engine's worker thread and the executors' exchange
//!   (`QuicExchange`, `DataPlaneReactor`), so every record crosses QUIC once. Both sides
//!   live in this process (`two_processes_quic` below puts them in two).
//!   Both engines have no spin window (executor `spin-us = 0`): an idle worker sleeps at once.
//! - `pipeline/two_engines_quic_adaptive_spin`: the same with the executors' default, a 200 µs
//!   adaptive spin window (`spin-us = 200`, `spin-mode = "adaptive"`): while records keep
//!   arriving within 200 µs an idle worker keeps turning its network reactor instead of
//!   sleeping.
//!
//! Each iteration runs one 50,000-record job; criterion's time is the job's wall time (about
//! 0.5 s when the pipeline keeps up), and the producer-to-sink latency percentiles of all
//! iterations are printed at the end.
//!
//! - `pipeline/two_processes_quic`: the split of `two_engines_quic_adaptive_spin` with each
//!   side in its own process, like two executors: the bench starts itself twice as a child
//!   (`MICROCOSM_BENCH_SIDE` set), each child an engine with its QUIC endpoint on its worker
//!   thread and the default 200 µs adaptive spin, and tells them over stdin which tasks of
//!   each job to run. The latency percentiles come from the receiving child's sinks.
//!
//! `pipeline/one_engine_max_rate` and `pipeline/two_engines_quic_max_rate` run the same
//! jobs unpaced (rate 0, as fast as the outputs take records) with 200,000 records each, and
//! report records per second: the cost per record of the operators (and, for the second, of
//! the QUIC hop), with fewer processes and threads sharing the two cores than a cluster has.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use criterion::{Criterion, Throughput, criterion_group};
use hdrhistogram::Histogram;
use microcosm_control::exchange::{InboundRegistry, QuicExchange};
use microcosm_control::reactor::DataPlaneReactor;
use microcosm_demo::plan::{GROUP_SOURCES, GROUP_SYNC, tasks_in_group};
use microcosm_demo::{DemoRecord, DemoSpec, StartContext, StartedTasks, plan, start_tasks};
use microcosm_engine::{
    Engine, EngineConfig, MemoryExchange, MemorySnapshots, SnapshotSink, wait_finished,
};
use microcosm_transport::tls::init_cluster_certs;
use microcosm_transport::{Endpoint, Identity, Role, TransportConfig};

/// How a benchmark's job is paced.
#[derive(Clone, Copy)]
struct Load {
    /// Offered total rate in records/s (0: unpaced).
    rate: u64,
    /// Records per table.
    rcd_cnt: u64,
}

/// Paced at 100k records/s, 50,000 records: the latency benchmarks.
const PACED: Load = Load {
    rate: 100_000,
    rcd_cnt: 5_000,
};

/// Unpaced, 200,000 records: the throughput benchmarks.
const MAX_RATE: Load = Load {
    rate: 0,
    rcd_cnt: 20_000,
};

const TABLES: u32 = 10;

fn spec(dir: &std::path::Path, flow: &str, load: Load) -> DemoSpec {
    DemoSpec {
        flow_id: flow.to_owned(),
        table_num: TABLES,
        binlog_num: 4,
        rcd_cnt: load.rcd_cnt,
        ddl_freq: 1_000,
        rate: load.rate,
        sink_dir: dir.to_owned(),
        ..DemoSpec::default()
    }
}

/// Benchmark settings for `load`: unpaced runs report records per second.
fn configure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    load: Load,
) {
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6));
    if load.rate == 0 {
        group.throughput(Throughput::Elements(u64::from(TABLES) * load.rcd_cnt));
    }
}

/// Waits until every task of `started` finished; panics on a failure.
fn wait_all_finished(engines: &[&Engine], started: &[&StartedTasks]) {
    let ids = started.iter().flat_map(|s| s.ids());
    wait_finished(engines, ids, Duration::from_secs(60)).unwrap();
}

fn merge(into: &mut Histogram<u64>, started: &StartedTasks) {
    into.add(started.merged_latency()).unwrap();
}

/// Prints the latency percentiles of `name`'s runs (nothing if it did not run, e.g. filtered
/// out on the command line).
fn report(name: &str, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "pipeline/{name}: {} records, latency p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
        h.len(),
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999)
    );
}

fn histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
    h.auto(true);
    h
}

fn one_engine(c: &mut Criterion) {
    on_one_engine(c, "one_engine", PACED);
}

fn one_engine_max_rate(c: &mut Criterion) {
    on_one_engine(c, "one_engine_max_rate", MAX_RATE);
}

/// The whole job on one engine with one worker.
fn on_one_engine(c: &mut Criterion, name: &str, load: Load) {
    let dir = tempfile::tempdir().unwrap();
    let snapshots: Arc<dyn SnapshotSink> = Arc::new(MemorySnapshots::new());
    let mut all = histogram();
    let mut run = 0u64;
    // Started once, like an executor's engine: jobs come and go on it. One worker (see the
    // module docs).
    let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let mut group = c.benchmark_group("pipeline");
    configure(&mut group, load);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let spec = spec(dir.path(), &format!("one-{run}"), load);
                let graph = plan(&spec);
                let local: Vec<u32> = (0..graph.tasks.len() as u32).collect();
                let exchange = MemoryExchange::<DemoRecord>::new();
                let start = Instant::now();
                let started = start_tasks(StartContext {
                    job: run,
                    epoch: 1,
                    spec: &spec,
                    graph: &graph,
                    local: &local,
                    engine: &engine,
                    exchange: &exchange,
                    restore: None,
                    snapshots: &snapshots,
                })
                .unwrap();
                wait_all_finished(&[&engine], &[&started]);
                total += start.elapsed();
                merge(&mut all, &started);
                let _ = std::fs::remove_dir_all(spec.output_dir());
            }
            total
        });
    });
    group.finish();
    report(name, &all);
    engine.shutdown(Duration::from_secs(5));
}

/// One side of the split: an engine, a QUIC endpoint and the registry its inbound data
/// streams are delivered to.
struct Side {
    engine: Engine,
    endpoint: Endpoint,
    registry: InboundRegistry,
    data_runtime: tokio::runtime::Handle,
}

impl Side {
    /// Like an executor: the data endpoint runs on the engine worker's thread.
    fn start(certs: &std::path::Path, spin: Duration) -> Side {
        let registry = InboundRegistry::default();
        let reactor = DataPlaneReactor::new().unwrap();
        let data_runtime = reactor.handle();
        let endpoint = {
            let _guard = data_runtime.enter();
            Endpoint::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                &Identity::load(certs, Role::Executor).unwrap(),
                TransportConfig::data_plane(),
                registry.router(),
            )
            .unwrap()
        };
        Side {
            engine: Engine::start_with_reactor(
                EngineConfig {
                    spin,
                    ..EngineConfig::with_workers(1)
                },
                Box::new(reactor),
            )
            .unwrap(),
            endpoint,
            registry,
            data_runtime,
        }
    }

    fn exchange(&self, job: u64, routes: HashMap<u32, SocketAddr>) -> QuicExchange {
        QuicExchange::new(
            job,
            1,
            self.endpoint.clone(),
            self.data_runtime.clone(),
            routes,
            self.registry.clone(),
        )
    }
}

fn two_engines_quic(c: &mut Criterion) {
    split_over_quic(c, "two_engines_quic", Duration::ZERO, PACED);
}

fn default_spin() -> Duration {
    Duration::from_micros(microcosm_control::executor::DEFAULT_SPIN_US)
}

fn two_engines_quic_adaptive_spin(c: &mut Criterion) {
    split_over_quic(c, "two_engines_quic_adaptive_spin", default_spin(), PACED);
}

fn two_engines_quic_max_rate(c: &mut Criterion) {
    split_over_quic(c, "two_engines_quic_max_rate", default_spin(), MAX_RATE);
}

/// The split job; `spin` is both engines' spin window (executor `spin-us`, adaptive).
fn split_over_quic(c: &mut Criterion, name: &str, spin: Duration, load: Load) {
    let certs = tempfile::tempdir().unwrap();
    init_cluster_certs(certs.path(), "bench", &[]).unwrap();
    let sources = Side::start(certs.path(), spin);
    let syncing = Side::start(certs.path(), spin);
    let dir = tempfile::tempdir().unwrap();
    let snapshots: Arc<dyn SnapshotSink> = Arc::new(MemorySnapshots::new());
    let mut all = histogram();
    let mut run = 0u64;
    let mut group = c.benchmark_group("pipeline");
    configure(&mut group, load);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let spec = spec(dir.path(), &format!("quic-{run}"), load);
                let graph = plan(&spec);
                let start = Instant::now();
                // The consuming side binds first.
                let b_tasks = syncing.start_half(run, &spec, &graph, Half::Sync, &snapshots);
                let to = Half::Sources(syncing.endpoint.local_addr());
                let a_tasks = sources.start_half(run, &spec, &graph, to, &snapshots);
                wait_all_finished(&[&sources.engine, &syncing.engine], &[&a_tasks, &b_tasks]);
                total += start.elapsed();
                merge(&mut all, &b_tasks);
                syncing.registry.forget_job(run);
                let _ = std::fs::remove_dir_all(spec.output_dir());
            }
            total
        });
    });
    group.finish();
    report(name, &all);
    for side in [sources, syncing] {
        // Close while the engine thread still drives the connections.
        side.endpoint.close();
        side.engine.shutdown(Duration::from_secs(5));
    }
}

/// Set in a child process of `two_processes_quic` to the certificates directory; the child
/// then serves as one side instead of running benchmarks.
const SIDE_ENV: &str = "MICROCOSM_BENCH_SIDE";

/// Which half of the split job a side runs.
#[derive(Debug, Clone, Copy)]
enum Half {
    /// Producers and binlogs, sending to the other side's endpoint at this address.
    Sources(SocketAddr),
    /// Receivers, syncers and sinks.
    Sync,
}

impl Half {
    /// The half a child is told to run: `sources <peer address>` or `sync -`.
    fn parse(role: &str, peer: &str) -> Half {
        match role {
            "sources" => Half::Sources(peer.parse().unwrap()),
            "sync" => Half::Sync,
            other => panic!("side process: unknown half {other:?}"),
        }
    }
}

impl Side {
    /// Starts `half` of job `job` (`spec`, planned as `graph`) on this side.
    fn start_half(
        &self,
        job: u64,
        spec: &DemoSpec,
        graph: &microcosm_engine::graph::JobGraph,
        half: Half,
        snapshots: &Arc<dyn SnapshotSink>,
    ) -> StartedTasks {
        let (g1, g2) = (
            tasks_in_group(graph, GROUP_SOURCES),
            tasks_in_group(graph, GROUP_SYNC),
        );
        let (local, routes) = match half {
            // Edges leaving the sources' half go to the other side's endpoint.
            Half::Sources(peer) => {
                let routes: HashMap<u32, SocketAddr> = graph
                    .edges
                    .iter()
                    .filter(|e| g1.contains(&e.from) && g2.contains(&e.to))
                    .map(|e| (e.id, peer))
                    .collect();
                (g1, routes)
            }
            Half::Sync => (g2, HashMap::new()),
        };
        let exchange = self.exchange(job, routes);
        start_tasks(StartContext {
            job,
            epoch: 1,
            spec,
            graph,
            local: &local,
            engine: &self.engine,
            exchange: &exchange,
            restore: None,
            snapshots,
        })
        .unwrap()
    }
}

/// A child process's life: one side, driven by lines on stdin —
/// `run <job> <sources|sync> <sink dir> <peer address or ->` (answered `started`, then `done`
/// once its tasks finished) and `quit` (answered with the sync side's latency percentiles,
/// in ns: `latency <count> <p50> <p90> <p99> <p99.9>`).
fn side_process(certs: &std::path::Path) {
    let side = Side::start(certs, default_spin());
    let snapshots: Arc<dyn SnapshotSink> = Arc::new(MemorySnapshots::new());
    let mut all = histogram();
    let mut out = std::io::stdout().lock();
    writeln!(out, "addr {}", side.endpoint.local_addr()).unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["run", job, role, dir, peer] => {
                let job: u64 = job.parse().unwrap();
                let half = Half::parse(role, peer);
                let spec = spec(std::path::Path::new(dir), &format!("proc-{job}"), PACED);
                let graph = plan(&spec);
                let started = side.start_half(job, &spec, &graph, half, &snapshots);
                writeln!(out, "started").unwrap();
                out.flush().unwrap();
                wait_all_finished(&[&side.engine], &[&started]);
                if matches!(half, Half::Sync) {
                    merge(&mut all, &started);
                    side.registry.forget_job(job);
                    let _ = std::fs::remove_dir_all(spec.output_dir());
                }
                writeln!(out, "done").unwrap();
                out.flush().unwrap();
            }
            ["quit"] => break,
            other => panic!("side process: unknown command {other:?}"),
        }
    }
    let q = |q: f64| all.value_at_quantile(q);
    writeln!(
        out,
        "latency {} {} {} {} {}",
        all.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999)
    )
    .unwrap();
    out.flush().unwrap();
    side.endpoint.close();
    side.engine.shutdown(Duration::from_secs(5));
}

/// The parent's handle on one child side.
struct SideProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl SideProcess {
    fn spawn(certs: &std::path::Path) -> SideProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(SIDE_ENV, certs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let first = read_line(&mut stdout);
        let addr = first.strip_prefix("addr ").unwrap().parse().unwrap();
        SideProcess {
            child,
            stdin,
            stdout,
            addr,
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn expect(&mut self, what: &str) -> String {
        let line = read_line(&mut self.stdout);
        assert!(
            line.starts_with(what),
            "expected {what:?} from a side, got {line:?}"
        );
        line
    }
}

/// The next line from a child, without its newline; panics at the end of its output (the
/// child died).
fn read_line(from: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    assert!(
        from.read_line(&mut line).unwrap() > 0,
        "a side process ended early"
    );
    line.trim_end().to_owned()
}

/// The split job with each side in its own process.
fn two_processes_quic(c: &mut Criterion) {
    let certs = tempfile::tempdir().unwrap();
    init_cluster_certs(certs.path(), "bench", &[]).unwrap();
    let mut sources = SideProcess::spawn(certs.path());
    let mut syncing = SideProcess::spawn(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let sink_dir = dir.path().display().to_string();
    let mut run = 0u64;
    let mut group = c.benchmark_group("pipeline");
    configure(&mut group, PACED);
    group.bench_function("two_processes_quic", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let start = Instant::now();
                // The consuming side starts its tasks first.
                syncing.send(&format!("run {run} sync {sink_dir} -"));
                syncing.expect("started");
                sources.send(&format!("run {run} sources {sink_dir} {}", syncing.addr));
                sources.expect("started");
                sources.expect("done");
                syncing.expect("done");
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
    sources.send("quit");
    syncing.send("quit");
    let _ = sources.expect("latency");
    let latency = syncing.expect("latency");
    let n: Vec<f64> = latency
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    if n[0] > 0.0 {
        println!(
            "pipeline/two_processes_quic: {} records, latency p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
            n[0],
            n[1] / 1000.0,
            n[2] / 1000.0,
            n[3] / 1000.0,
            n[4] / 1000.0
        );
    }
    for side in [&mut sources, &mut syncing] {
        side.child.wait().unwrap();
    }
}

criterion_group!(
    benches,
    one_engine,
    two_engines_quic,
    two_engines_quic_adaptive_spin,
    two_processes_quic,
    one_engine_max_rate,
    two_engines_quic_max_rate
);

fn main() {
    // A child of `two_processes_quic` serves one side and runs no benchmark.
    if let Some(certs) = std::env::var_os(SIDE_ENV) {
        side_process(std::path::Path::new(&certs));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
