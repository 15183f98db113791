//! The demo pipeline on real engines: planned with `plan`, started with `start_tasks`, run
//! to completion, and judged by the verifier reading the real sink files.
//!
//! - `one_engine_*`: every task in one engine (the exchange is unused);
//! - `two_engines_*`: group 1 on engine A, group 2 on engine B, the binlog → receive edges
//!   crossing a `MemoryExchange` as sealed batches;
//! - `barrier_*`: three syncers driven record by record: nobody passes a DDL until the last
//!   stream reaches it;
//! - `paced_*`: open-loop pacing takes the intended time and loses nothing;
//! - `sink_io_error_*`: an unwritable sink fails its task, not the process;
//! - `a_stuck_sink_writer_*`: a sink whose file writer cannot keep up holds the pipeline by
//!   backpressure and loses nothing;
//! - `restoring_*`, `a_binlog_aligns_*`, `a_syncer_passes_*`: consistent checkpoints and
//!   recovery from one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use microcosm_demo::checkpoint::{Snapshots, TaskState};
use microcosm_demo::operators::{Binlog, STAGE_SAMPLE_EVERY, Syncer, stages_path};
use microcosm_demo::plan::{GROUP_SOURCES, GROUP_SYNC, tasks_in_group};
use microcosm_demo::record::TRACE_SYNCED;
use microcosm_demo::{
    BarrierCoordinator, DemoRecord, DemoSpec, RecordKind, Report, StartContext, StartedTasks,
    UnixClock, plan, start_tasks, verify,
};
use microcosm_engine::{
    EdgeConfig, Engine, EngineConfig, EngineError, Input, MemoryExchange, MemorySnapshots, Output,
    RestorePoint, SnapshotSink, TaskEvent, TaskSpec, edge, wait_finished,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A snapshot sink for runs that do not restore.
fn discard() -> Arc<dyn SnapshotSink> {
    Arc::new(MemorySnapshots::new())
}

fn spec_in(dir: &Path, tables: u32, streams: u32, rcd_cnt: u64, rate: u64) -> DemoSpec {
    let spec = DemoSpec {
        flow_id: "it".to_owned(),
        table_num: tables,
        binlog_num: streams,
        rcd_cnt,
        ddl_freq: 100,
        rate,
        sink_dir: dir.to_owned(),
        batch_size: 64,
        linger_us: 50,
        // Checkpoints only where a test asks for them: barriers would change record counts.
        checkpoint_interval_ms: 3_600_000,
    };
    spec.validate().unwrap();
    spec
}

/// Waits until every task of `started` has finished; panics on a failure or the timeout.
fn wait_all_finished(engines: &[&Engine], started: &[&StartedTasks]) {
    wait_finished(engines, started.iter().flat_map(|s| s.ids()), TIMEOUT).unwrap();
}

fn assert_passes(spec: &DemoSpec) -> Report {
    let report = verify(&spec.output_dir(), spec).unwrap();
    assert!(report.passed(), "{report:?}");
    assert_eq!(report.data_rows, spec.total_data_records());
    assert_eq!(
        report.ddl_rows,
        spec.ddl_rows_per_stream() * u64::from(spec.binlog_num)
    );
    assert_eq!(report.missing_data + report.duplicate_data, 0);
    report
}

/// Starts every task of `spec`'s job (epoch 1, job 7) on `engine`, without restoring.
fn start_all_on(spec: &DemoSpec, engine: &Engine) -> StartedTasks {
    let graph = plan(spec);
    let local: Vec<u32> = (0..graph.tasks.len() as u32).collect();
    let exchange = MemoryExchange::<DemoRecord>::new();
    let started = start_tasks(StartContext {
        epoch: 1,
        job: 7,
        spec,
        graph: &graph,
        local: &local,
        engine,
        exchange: &exchange,
        restore: None,
        snapshots: &discard(),
    })
    .unwrap();
    assert_eq!(started.tasks().len(), graph.tasks.len());
    started
}

fn run_on_one_engine(spec: &DemoSpec, workers: usize) -> StartedTasks {
    let engine = Engine::start(EngineConfig::with_workers(workers)).unwrap();
    let started = start_all_on(spec, &engine);
    wait_all_finished(&[&engine], &[&started]);
    assert!(engine.shutdown(Duration::from_secs(5)).drained);
    started
}

#[test]
fn one_engine_runs_the_whole_pipeline_and_the_verifier_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_in(tmp.path(), 3, 2, 2000, 0);
    let started = run_on_one_engine(&spec, 2);
    let report = assert_passes(&spec);
    assert_eq!(report.data_rows, 3 * 2000);
    // The sinks measured every data row.
    let measured: u64 = started.latency_handles().values().map(|h| h.len()).sum();
    assert_eq!(measured, 3 * 2000);
    let summary = started.latency_summary().unwrap();
    assert!(summary.p50_us <= summary.p99_us && summary.p99_us <= summary.max_us);
    // Every record went through a binlog once: data + one DDL per (table, version, stream).
    let logged: u64 = started.binlog_positions().values().map(|p| p.get()).sum();
    assert_eq!(logged, 3 * 2000 + 3 * 20 * 2);
    // Each sink's stage breakdown covers every STAGE_SAMPLE_EVERY-th of its data rows.
    for stream in 0..spec.binlog_num {
        let rows = report.per_stream[stream as usize].data_rows;
        let text = std::fs::read_to_string(stages_path(&spec.sink_path(stream))).unwrap();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines.len(), 4, "{text}");
        for line in lines {
            let count: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert_eq!(count, rows.div_ceil(STAGE_SAMPLE_EVERY), "{line}");
        }
    }
}

#[test]
fn one_engine_runs_the_prototype_case() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_in(tmp.path(), 10, 3, 10_000, 0);
    run_on_one_engine(&spec, 2);
    assert_passes(&spec);
}

/// Batches of 3 records with no linger on one worker: outputs fill constantly, so every
/// operator keeps its place through many `BlockedOnOutput` rounds.
#[test]
fn one_engine_with_tiny_batches_loses_nothing_under_backpressure() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec_in(tmp.path(), 4, 3, 1500, 0);
    spec.batch_size = 3;
    spec.linger_us = 0;
    run_on_one_engine(&spec, 1);
    assert_passes(&spec);
}

#[test]
fn two_engines_split_by_group_pass_sealed_batches_through_the_exchange() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_in(tmp.path(), 3, 2, 2000, 0);
    let graph = plan(&spec);
    let exchange = MemoryExchange::<DemoRecord>::new();
    let sources = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let syncing = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let (group1, group2) = (
        tasks_in_group(&graph, GROUP_SOURCES),
        tasks_in_group(&graph, GROUP_SYNC),
    );
    assert_eq!(group1.len() + group2.len(), graph.tasks.len());
    // The consuming side binds its inbound edges first; the memory exchange resolves
    // addresses when the producing side connects.
    let b = start_tasks(StartContext {
        epoch: 1,
        job: 9,
        spec: &spec,
        graph: &graph,
        local: &group2,
        engine: &syncing,
        exchange: &exchange,
        restore: None,
        snapshots: &discard(),
    })
    .unwrap();
    let a = start_tasks(StartContext {
        epoch: 1,
        job: 9,
        spec: &spec,
        graph: &graph,
        local: &group1,
        engine: &sources,
        exchange: &exchange,
        restore: None,
        snapshots: &discard(),
    })
    .unwrap();
    assert!(a.barrier().is_none() && b.barrier().is_some());
    wait_all_finished(&[&sources, &syncing], &[&a, &b]);
    assert_passes(&spec);
    // What the binlogs sent on engine A is what the receivers read on engine B.
    let names: BTreeMap<u32, &str> = (0u32..)
        .zip(&graph.tasks)
        .map(|(i, t)| (i, t.name.as_str()))
        .collect();
    let sum = |started: &StartedTasks, prefix: &str, out: bool| -> u64 {
        started
            .tasks()
            .iter()
            .filter(|(i, _)| names[*i].starts_with(prefix))
            .map(|(_, h)| {
                if out {
                    h.metrics().records_out()
                } else {
                    h.metrics().records_in()
                }
            })
            .sum()
    };
    // Rows, plus each binlog's stream-start header.
    let crossed = 3 * 2000 + 3 * 20 * 2 + 2;
    assert_eq!(sum(&a, "binlog-", true), crossed);
    assert_eq!(sum(&b, "receive-", false), crossed);
}

#[test]
fn paced_run_takes_the_intended_time_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_in(tmp.path(), 2, 2, 2000, 20_000);
    let started_at = Instant::now();
    run_on_one_engine(&spec, 2);
    // Each producer emits 10 000 records/s; its last record is intended 199.9 ms in.
    let took = started_at.elapsed();
    assert!(took >= Duration::from_millis(195), "finished in {took:?}");
    let report = assert_passes(&spec);
    // Produced stamps are intended times: the data span is about 0.2 s.
    let span_s = report.data_rows as f64 / report.throughput_rows_per_s.unwrap();
    assert!(span_s >= 0.19, "rows spread over {span_s} s");
}

#[test]
fn sink_io_error_fails_only_the_sink_task() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    // `<file>/it/sink_0.csv` cannot be created.
    let spec = spec_in(&blocker, 1, 1, 200, 0);
    let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let events = engine.events();
    let graph = plan(&spec);
    let started = start_all_on(&spec, &engine);
    let deadline = Instant::now() + TIMEOUT;
    let failed = loop {
        assert!(Instant::now() < deadline, "no failure reported");
        if let Ok(TaskEvent::Failed { task, error }) =
            events.recv_timeout(Duration::from_millis(50))
        {
            break (task, error);
        }
    };
    let index = started.task_index(failed.0).unwrap();
    assert_eq!(graph.tasks[index as usize].name, "sink-0");
    assert!(
        matches!(&failed.1, EngineError::Operator(m) if m.contains("sink 0")),
        "{:?}",
        failed.1
    );
    // The process carries on: shutting down works.
    engine.shutdown(Duration::from_secs(5));
}

/// The sink's file writer is stuck (its claim waits on the fence lock this test holds), so
/// its queue fills and the sink stops taking input: the pipeline waits by backpressure,
/// nothing reaches the file. Once the lock goes, the writer wakes the sink and the run ends
/// with every row exactly once.
#[test]
fn a_stuck_sink_writer_holds_the_pipeline_by_backpressure_and_loses_nothing() {
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    // About 4.5 MB of rows: more than the writer's queue holds.
    let spec = spec_in(tmp.path(), 1, 1, 60_000, 0);
    let path = spec.sink_path(0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let fence = std::fs::File::create(microcosm_demo::fence::fence_path(&path)).unwrap();
    // SAFETY: flock on a descriptor owned by `fence`, open for the whole test.
    assert_eq!(unsafe { libc::flock(fence.as_raw_fd(), libc::LOCK_EX) }, 0);
    let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let started = start_all_on(&spec, &engine);
    std::thread::sleep(Duration::from_millis(300));
    // Unimpeded, the producer would have finished in a few ms: it is held back.
    for (index, task) in started.tasks() {
        assert!(
            !task.state().is_terminal(),
            "task {index} ended while the sink's file was locked: {:?}",
            task.state()
        );
    }
    assert_eq!(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0), 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::flock(fence.as_raw_fd(), libc::LOCK_UN) }, 0);
    wait_all_finished(&[&engine], &[&started]);
    assert!(engine.shutdown(Duration::from_secs(5)).drained);
    assert_passes(&spec);
}

/// Three syncers fed by hand. Streams 0 and 1 reach DDL (table 0, version 1); stream 2 has
/// not: 0 and 1 pass their earlier record but not the DDL nor table 0's next record (table
/// 1's record passes). When stream 2 reaches it, all three pass the DDL and what follows,
/// stamped no earlier than anything of table 0 before it.
#[test]
fn barrier_holds_every_stream_until_the_last_arrives() {
    let engine = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let barrier = Arc::new(BarrierCoordinator::new(3));
    let clock = UnixClock::system();
    let config = EdgeConfig {
        capacity: 8,
        batch_size: 16,
        linger: Duration::ZERO,
    };
    let mut feeds: Vec<Output<DemoRecord>> = Vec::new();
    let mut taps: Vec<Input<DemoRecord>> = Vec::new();
    let mut ids = Vec::new();
    for stream in 0..3 {
        let (feed, syncer_in) = edge::<DemoRecord>(&config).unwrap();
        let (syncer_out, tap) = edge::<DemoRecord>(&config).unwrap();
        let op = Syncer::new(
            stream,
            barrier.clone(),
            clock.clone(),
            Snapshots::new(stream, discard()),
        );
        let handle = engine
            .spawn(
                TaskSpec::new(format!("syncer-{stream}"), op)
                    .input(syncer_in)
                    .output(syncer_out),
            )
            .unwrap();
        ids.push(handle.id());
        feeds.push(feed);
        taps.push(tap);
    }
    let send = |feed: &mut Output<DemoRecord>, records: &[DemoRecord]| {
        for &r in records {
            feed.push(r).unwrap();
        }
        assert!(feed.flush());
    };
    let mut seen: Vec<Vec<DemoRecord>> = vec![Vec::new(); 3];
    let collect = |taps: &mut [Input<DemoRecord>], seen: &mut [Vec<DemoRecord>]| {
        for (tap, got) in taps.iter_mut().zip(seen.iter_mut()) {
            while let Some(batch) = tap.pop() {
                got.extend(batch.into_owned().unwrap().iter().copied());
            }
        }
    };
    let wait_for =
        |taps: &mut [Input<DemoRecord>], seen: &mut [Vec<DemoRecord>], want: [usize; 3]| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                collect(taps, seen);
                let have: Vec<usize> = seen.iter().map(Vec::len).collect();
                if have == want {
                    return;
                }
                assert!(Instant::now() < deadline, "have {have:?}, want {want:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
    let ddl = DemoRecord::ddl(0, 1, 100, 1);
    for (stream, feed) in feeds.iter_mut().enumerate().take(2) {
        let pk = stream as u64 + 1;
        send(
            feed,
            &[
                DemoRecord::data(0, 0, pk, 1),
                ddl,
                DemoRecord::data(0, 1, 100 + pk, 1),
            ],
        );
    }
    // Stream 0 also carries a record of table 1, which no barrier holds.
    send(&mut feeds[0], &[DemoRecord::data(1, 0, 5, 1)]);
    send(&mut feeds[2], &[DemoRecord::data(0, 0, 3, 1)]);
    wait_for(&mut taps, &mut seen, [2, 1, 1]);
    // Give the held syncers every chance to (wrongly) pass the DDL.
    std::thread::sleep(Duration::from_millis(200));
    collect(&mut taps, &mut seen);
    assert_eq!(seen.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 1]);
    assert_eq!(barrier.waiting_barriers(), 1);
    assert!(seen.iter().flatten().all(|r| !r.is_ddl()));
    assert_eq!((seen[0][1].table, seen[0][1].pk), (1, 5));

    send(&mut feeds[2], &[ddl, DemoRecord::data(0, 1, 103, 1)]);
    wait_for(&mut taps, &mut seen, [4, 3, 3]);
    assert_eq!(barrier.waiting_barriers(), 0);
    let table0: Vec<Vec<DemoRecord>> = seen
        .iter()
        .map(|s| s.iter().filter(|r| r.table == 0).copied().collect())
        .collect();
    let before_max = table0
        .iter()
        .map(|s| s[0].tracer[TRACE_SYNCED])
        .max()
        .unwrap();
    for (stream, got) in table0.iter().enumerate() {
        assert_eq!(got.len(), 3);
        assert!(
            got[1].is_ddl() && got[1].version == 1,
            "stream {stream}: {got:?}"
        );
        assert_eq!(got[2].pk, 101 + stream as u64);
        assert!(got[1].tracer[TRACE_SYNCED] >= before_max);
        assert!(got[2].tracer[TRACE_SYNCED] >= got[1].tracer[TRACE_SYNCED]);
    }
    // Ending the inputs finishes the syncers.
    drop(feeds);
    wait_finished(&[&engine], ids, Duration::from_secs(10)).unwrap();
}

/// The latest checkpoint every one of `tasks` tasks has reported (or finished before).
fn latest_complete(snapshots: &MemorySnapshots, tasks: u32) -> Option<RestorePoint> {
    let ids: BTreeSet<u64> = snapshots.taken().iter().map(|s| s.checkpoint).collect();
    ids.into_iter()
        .rev()
        .find_map(|id| snapshots.restore_point(id, tasks))
}

/// Starts every task of `spec` on `engine` as attempt `epoch`, resuming from `restore`.
fn start_all(
    spec: &DemoSpec,
    engine: &Engine,
    epoch: u64,
    restore: Option<&RestorePoint>,
    snapshots: &Arc<dyn SnapshotSink>,
) -> StartedTasks {
    let graph = plan(spec);
    let local: Vec<u32> = (0..graph.tasks.len() as u32).collect();
    let exchange = MemoryExchange::<DemoRecord>::new();
    start_tasks(StartContext {
        epoch,
        job: 11,
        spec,
        graph: &graph,
        local: &local,
        engine,
        exchange: &exchange,
        restore,
        snapshots,
    })
    .unwrap()
}

/// A crash after a checkpoint: the first attempt is cancelled mid-run (its sinks have
/// written past the checkpoint), a second attempt restores from the last complete
/// checkpoint, and the output is exactly once with the barrier intact — while the second
/// attempt does only the rest of the work.
#[test]
fn restoring_from_a_checkpoint_after_a_crash_delivers_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec_in(tmp.path(), 3, 2, 6000, 12_000);
    spec.checkpoint_interval_ms = 40;
    let graph = plan(&spec);
    let tasks = graph.tasks.len() as u32;
    let memory = Arc::new(MemorySnapshots::new());
    let snapshots: Arc<dyn SnapshotSink> = memory.clone();

    let first = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let a = start_all(&spec, &first, 1, None, &snapshots);
    let deadline = Instant::now() + TIMEOUT;
    let point = loop {
        // A few checkpoints in, so that the first attempt has written a good part.
        if let Some(point) = latest_complete(&memory, tasks)
            && memory.taken().len() >= 5 * tasks as usize
        {
            break point;
        }
        assert!(Instant::now() < deadline, "no checkpoint completed");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let the sinks write past the checkpoint, then "crash".
    std::thread::sleep(Duration::from_millis(60));
    a.cancel_all();
    first.shutdown(Duration::from_secs(5));
    let point = latest_complete(&memory, tasks).unwrap_or(point);
    let partial = verify(&spec.output_dir(), &spec).unwrap();
    assert!(!partial.passed(), "the crash left the output incomplete");

    let second = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let after = Arc::new(MemorySnapshots::new());
    let after_sink: Arc<dyn SnapshotSink> = after.clone();
    let b = start_all(&spec, &second, 2, Some(&point), &after_sink);
    wait_all_finished(&[&second], &[&b]);
    assert!(second.shutdown(Duration::from_secs(5)).drained);
    assert_passes(&spec);
    // The second attempt resumed: its sinks wrote fewer rows than the whole job has.
    let written: u64 = b.latency_handles().values().map(|h| h.len()).sum();
    assert!(written < spec.total_data_records(), "{written}");
    // Its checkpoints continue the numbering.
    let taken = after.taken();
    assert!(!taken.is_empty(), "the second attempt snapshotted nothing");
    for s in taken {
        assert!(
            s.checkpoint > point.checkpoint || (s.last && s.checkpoint == point.checkpoint),
            "{s:?} after restoring {}",
            point.checkpoint
        );
    }
}

/// A binlog aligns: after barrier 1 on input 0, input 0's later records wait until input 1
/// delivers barrier 1; then one barrier is forwarded and the position snapshotted.
#[test]
fn a_binlog_aligns_checkpoint_barriers_across_its_inputs() {
    let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let config = EdgeConfig {
        capacity: 8,
        batch_size: 16,
        linger: Duration::ZERO,
    };
    let (mut feed0, in0) = edge::<DemoRecord>(&config).unwrap();
    let (mut feed1, in1) = edge::<DemoRecord>(&config).unwrap();
    let (out, mut tap) = edge::<DemoRecord>(&config).unwrap();
    let (snaps, memory) = Snapshots::in_memory(4);
    let op = Binlog::new(0, UnixClock::system(), snaps);
    engine
        .spawn(
            TaskSpec::new("binlog-0", op)
                .input(in0)
                .input(in1)
                .output(out),
        )
        .unwrap();
    let send = |feed: &mut Output<DemoRecord>, records: &[DemoRecord]| {
        for &r in records {
            feed.push(r).unwrap();
        }
        assert!(feed.flush());
    };
    let mut got: Vec<DemoRecord> = Vec::new();
    let wait_for = |tap: &mut Input<DemoRecord>, got: &mut Vec<DemoRecord>, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < n {
            assert!(Instant::now() < deadline, "have {got:?}");
            while let Some(batch) = tap.pop() {
                got.extend(batch.into_owned().unwrap().iter().copied());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    send(
        &mut feed0,
        &[
            DemoRecord::data(0, 0, 1, 1),
            DemoRecord::checkpoint(0, 1, 1),
            DemoRecord::data(0, 0, 2, 1),
        ],
    );
    send(&mut feed1, &[DemoRecord::data(1, 0, 1, 1)]);
    // Header, then the two records before the barrier.
    wait_for(&mut tap, &mut got, 3);
    std::thread::sleep(Duration::from_millis(100));
    while let Some(batch) = tap.pop() {
        got.extend(batch.into_owned().unwrap().iter().copied());
    }
    assert_eq!(
        got.len(),
        3,
        "input 0's record after the barrier waits: {got:?}"
    );
    assert_eq!(got[0].record_kind(), Some(RecordKind::StreamStart));
    assert!(memory.taken().is_empty());
    send(&mut feed1, &[DemoRecord::checkpoint(1, 1, 1)]);
    wait_for(&mut tap, &mut got, 5);
    assert_eq!(got[3].checkpoint_id(), Some(1));
    assert_eq!((got[4].table, got[4].pk), (0, 2));
    let taken = memory.taken();
    assert_eq!(taken.len(), 1);
    assert_eq!((taken[0].task, taken[0].checkpoint), (4, 1));
    // Log positions: two rows and the barrier.
    assert_eq!(
        TaskState::decode(4, &taken[0].state).unwrap(),
        TaskState::Binlog { position: 3 }
    );

    // Input 1 fell behind and skipped checkpoint 2: input 0's barrier 2 is abandoned (its
    // later record flows at once), barrier 3 is aligned, and a late 2 is dropped.
    send(
        &mut feed0,
        &[
            DemoRecord::checkpoint(0, 2, 1),
            DemoRecord::data(0, 0, 3, 1),
        ],
    );
    send(
        &mut feed1,
        &[
            DemoRecord::checkpoint(1, 3, 1),
            DemoRecord::data(1, 0, 2, 1),
        ],
    );
    wait_for(&mut tap, &mut got, 6);
    assert_eq!((got[5].table, got[5].pk), (0, 3), "{got:?}");
    send(
        &mut feed0,
        &[
            DemoRecord::checkpoint(0, 3, 1),
            DemoRecord::checkpoint(0, 2, 1),
            DemoRecord::data(0, 0, 4, 1),
        ],
    );
    wait_for(&mut tap, &mut got, 9);
    let ids: Vec<u64> = got.iter().filter_map(DemoRecord::checkpoint_id).collect();
    assert_eq!(ids, [1, 3], "{got:?}");
    let checkpoints: Vec<u64> = memory.taken().iter().map(|s| s.checkpoint).collect();
    assert_eq!(checkpoints, [1, 3]);
    engine.shutdown(Duration::from_secs(1));
}

/// A syncer holding a DDL before a checkpoint barrier takes nothing after the barrier (not
/// even another table's record) until the DDL is released; then the DDL, the barrier and the
/// rest pass in order, and the snapshot is taken with nothing held.
#[test]
fn a_syncer_passes_a_checkpoint_barrier_only_after_the_ddls_before_it() {
    let engine = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let barrier = Arc::new(BarrierCoordinator::new(2));
    let config = EdgeConfig {
        capacity: 8,
        batch_size: 16,
        linger: Duration::ZERO,
    };
    let mut feeds = Vec::new();
    let mut taps = Vec::new();
    let mut memories = Vec::new();
    for stream in 0..2 {
        let (feed, syncer_in) = edge::<DemoRecord>(&config).unwrap();
        let (syncer_out, tap) = edge::<DemoRecord>(&config).unwrap();
        let (snaps, memory) = Snapshots::in_memory(stream);
        let op = Syncer::new(stream, barrier.clone(), UnixClock::system(), snaps);
        engine
            .spawn(
                TaskSpec::new(format!("syncer-{stream}"), op)
                    .input(syncer_in)
                    .output(syncer_out),
            )
            .unwrap();
        feeds.push(feed);
        taps.push(tap);
        memories.push(memory);
    }
    let send = |feed: &mut Output<DemoRecord>, records: &[DemoRecord]| {
        for &r in records {
            feed.push(r).unwrap();
        }
        assert!(feed.flush());
    };
    let drain = |tap: &mut Input<DemoRecord>, got: &mut Vec<DemoRecord>| {
        while let Some(batch) = tap.pop() {
            got.extend(batch.into_owned().unwrap().iter().copied());
        }
    };
    let ddl = DemoRecord::ddl(0, 1, 10, 1);
    send(
        &mut feeds[0],
        &[
            ddl,
            DemoRecord::checkpoint(0, 1, 1),
            DemoRecord::data(1, 0, 7, 1),
        ],
    );
    std::thread::sleep(Duration::from_millis(150));
    let mut got0 = Vec::new();
    drain(&mut taps[0], &mut got0);
    assert!(
        got0.is_empty(),
        "nothing passes while the DDL is held: {got0:?}"
    );
    assert!(memories[0].taken().is_empty());
    send(&mut feeds[1], &[ddl, DemoRecord::checkpoint(1, 1, 1)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while got0.len() < 3 {
        assert!(Instant::now() < deadline, "{got0:?}");
        drain(&mut taps[0], &mut got0);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(got0[0].is_ddl());
    assert_eq!(got0[1].checkpoint_id(), Some(1));
    assert_eq!((got0[2].table, got0[2].pk), (1, 7));
    let taken = memories[0].taken();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        TaskState::decode(0, &taken[0].state).unwrap(),
        TaskState::Syncer {
            released: BTreeMap::from([(0, 1)])
        }
    );
    engine.shutdown(Duration::from_secs(1));
}
