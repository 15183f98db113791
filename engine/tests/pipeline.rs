//! The same source → map → sink pipeline on one worker and on several real worker threads:
//! every record is delivered exactly once and per-edge order is preserved.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{AddOne, Collect, Counter};
use microcosm_engine::{
    Context, EdgeConfig, Engine, EngineConfig, EngineError, Input, Operator, Output, Status,
    TaskSpec, TaskState, edge, wait_finished,
};
use proptest::prelude::*;

const TIMEOUT: Duration = Duration::from_secs(30);

fn run_pipeline(n: u64, workers: usize, config: &EdgeConfig) -> Vec<u64> {
    let engine = Engine::start(EngineConfig::with_workers(workers)).unwrap();
    let (a_out, a_in) = edge::<u64>(config).unwrap();
    let (b_out, b_in) = edge::<u64>(config).unwrap();
    let (sink, seen) = Collect::new();
    engine
        .spawn(TaskSpec::new("source", Counter::new(n)).output(a_out))
        .unwrap();
    engine
        .spawn(
            TaskSpec::new("map", AddOne::default())
                .input(a_in)
                .output(b_out),
        )
        .unwrap();
    let sink = engine
        .spawn(TaskSpec::new("sink", sink).input(b_in))
        .unwrap();
    wait_finished(&[&engine], [sink.id()], TIMEOUT).unwrap();
    let report = engine.shutdown(Duration::from_secs(5));
    assert!(report.drained, "{report:?}");
    let seen = seen.lock().unwrap();
    seen.iter().map(|&(_, x)| x).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn pipeline_delivers_every_record_once_in_order(
        n in 0u64..5_000,
        batch_size in 1usize..300,
        capacity in 1usize..6,
        workers in 1usize..4,
        linger_us in 0u64..200,
    ) {
        let config = EdgeConfig { capacity, batch_size, linger: Duration::from_micros(linger_us) };
        let got = run_pipeline(n, workers, &config);
        prop_assert_eq!(got, (1..=n).collect::<Vec<_>>());
    }

    #[test]
    fn merge_keeps_per_edge_order_across_workers(
        n in 0u64..3_000,
        batch_size in 1usize..100,
        workers in 1usize..4,
    ) {
        let engine = Engine::start(EngineConfig::with_workers(workers)).unwrap();
        let config = EdgeConfig { capacity: 2, batch_size, ..EdgeConfig::default() };
        let (sink, seen) = Collect::new();
        let mut spec = TaskSpec::new("merge", sink);
        for i in 0..3u64 {
            let (out, inp) = edge::<u64>(&config).unwrap();
            let src = Counter { next: 0, n, base: i * 1_000_000 };
            engine.spawn(TaskSpec::new(format!("src-{i}"), src).output(out)).unwrap();
            spec = spec.input(inp);
        }
        let sink = engine.spawn(spec).unwrap();
        wait_finished(&[&engine], [sink.id()], TIMEOUT).unwrap();
        let seen = seen.lock().unwrap();
        for i in 0..3usize {
            let from: Vec<u64> = seen.iter().filter(|(idx, _)| *idx == i).map(|&(_, x)| x).collect();
            let want: Vec<u64> = (0..n).map(|x| i as u64 * 1_000_000 + x).collect();
            prop_assert_eq!(from, want);
        }
    }
}

/// Emits what is queued; idles otherwise; ignores draining if `stubborn`.
struct Feed {
    queue: Arc<Mutex<VecDeque<u64>>>,
    stubborn: bool,
}

impl Operator for Feed {
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
        Ok(if cx.is_draining() && !self.stubborn {
            Status::Finished
        } else {
            Status::Idle
        })
    }
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn external_wake_pause_resume_and_drain_across_threads() {
    let engine = Engine::start(EngineConfig::with_workers(2)).unwrap();
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let (out, inp) = edge::<u64>(&EdgeConfig::default()).unwrap();
    let (sink, seen) = Collect::new();
    let src = engine
        .spawn(
            TaskSpec::new(
                "feed",
                Feed {
                    queue: queue.clone(),
                    stubborn: false,
                },
            )
            .output(out)
            .on_worker(0),
        )
        .unwrap();
    let sink = engine
        .spawn(TaskSpec::new("sink", sink).input(inp).on_worker(1))
        .unwrap();
    assert_eq!((src.worker(), sink.worker()), (0, 1));
    wait_for(|| src.state() == TaskState::Running && sink.state() == TaskState::Running);

    queue.lock().unwrap().push_back(1);
    src.waker().wake();
    wait_for(|| seen.lock().unwrap().len() == 1);

    sink.pause();
    wait_for(|| sink.state() == TaskState::Paused);
    queue.lock().unwrap().extend([2, 3]);
    src.waker().wake();
    wait_for(|| sink.metrics().queue_depth() == 1);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a paused task does not consume"
    );
    sink.resume();
    wait_for(|| seen.lock().unwrap().len() == 3);

    // Idle tasks are not invoked: the engine is parked.
    let before = (
        src.metrics().snapshot().invocations,
        sink.metrics().snapshot().invocations,
    );
    std::thread::sleep(Duration::from_millis(50));
    let after = (
        src.metrics().snapshot().invocations,
        sink.metrics().snapshot().invocations,
    );
    assert_eq!(before, after);

    let report = engine.shutdown(Duration::from_secs(10));
    assert!(report.drained);
    assert_eq!(report.cancelled, 0);
    assert_eq!(src.state(), TaskState::Finished);
    assert_eq!(sink.state(), TaskState::Finished);
    let got: Vec<u64> = seen.lock().unwrap().iter().map(|&(_, x)| x).collect();
    assert_eq!(got, vec![1, 2, 3]);
}

#[test]
fn shutdown_cancels_tasks_that_do_not_drain_in_time() {
    let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let (out, inp) = edge::<u64>(&EdgeConfig::default()).unwrap();
    let (sink, _seen) = Collect::new();
    let src = engine
        .spawn(
            TaskSpec::new(
                "stubborn",
                Feed {
                    queue: Arc::new(Mutex::new(VecDeque::new())),
                    stubborn: true,
                },
            )
            .output(out),
        )
        .unwrap();
    let sink = engine
        .spawn(TaskSpec::new("sink", sink).input(inp))
        .unwrap();
    let report = engine.shutdown(Duration::from_millis(20));
    assert!(!report.drained);
    assert_eq!(report.cancelled, 2);
    assert_eq!(src.state(), TaskState::Cancelled);
    assert!(sink.state().is_terminal());
}

#[test]
fn spawning_on_a_missing_worker_is_an_error() {
    let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
    let (sink, _) = Collect::new();
    assert_eq!(
        engine.spawn(TaskSpec::new("x", sink).on_worker(3)).err(),
        Some(EngineError::NoSuchWorker(3))
    );
    assert!(matches!(
        Engine::start(EngineConfig::with_workers(0)),
        Err(EngineError::Config(_))
    ));
}
