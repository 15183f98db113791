//! The job types this binary knows: their spec validation, plans and task launchers.
//!
//! - `demo`: the demo pipeline (`microcosm-demo`).
//! - `sleep`: N independent tasks that each wait a fixed time and finish; a minimal job for
//!   exercising scheduling, failover, checkpoints and the job lifecycle.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use microcosm_control::executor::{JobLauncher, Launch};
use microcosm_control::leader::JobCatalog;
use microcosm_engine::{
    Context, EngineError, Input, JobGraph, Operator, Output, RestorePoint, SnapshotSink, Status,
    TaskHandle, TaskSnapshot, TaskSpec,
};
use serde::Deserialize;

/// Every job type of this binary.
pub struct JobTypes;

/// Spec of the `sleep` job type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SleepSpec {
    /// Number of tasks (1..=10000).
    tasks: u32,
    /// How long task 0 runs (ms).
    duration_ms: u64,
    /// How much longer each task runs than the one before it (ms): task `i` runs
    /// `duration-ms + i × stagger-ms`.
    #[serde(default)]
    stagger_ms: u64,
    /// Checkpoint interval (ms); 0: the tasks take no checkpoints. A task's state is the time
    /// it has left, so a restarted attempt waits only that.
    #[serde(default)]
    checkpoint_interval_ms: u64,
}

/// Longest a sleep task may run (30 days, in ms).
const MAX_SLEEP_MS: u64 = 30 * 24 * 3600 * 1000;

/// Shortest checkpoint interval of a sleep job (ms): every task reports at every one.
const MIN_SLEEP_CHECKPOINT_MS: u64 = 10;

impl SleepSpec {
    fn parse(spec: &str) -> Result<Self, String> {
        let s: SleepSpec = toml::from_str(spec).map_err(|e| {
            format!(
                "invalid sleep job spec: {}",
                microcosm_control::toml_error_line(&e, spec)
            )
        })?;
        if s.tasks == 0 || s.tasks > 10_000 {
            return Err(format!(
                "invalid sleep job spec: tasks must be between 1 and 10000, got {}",
                s.tasks
            ));
        }
        let longest = u64::from(s.tasks - 1)
            .checked_mul(s.stagger_ms)
            .and_then(|extra| extra.checked_add(s.duration_ms))
            .filter(|&ms| ms <= MAX_SLEEP_MS);
        if longest.is_none() {
            return Err(format!(
                "invalid sleep job spec: the last task would run duration-ms + (tasks - 1) × stagger-ms = {} + {} × {} ms; at most {MAX_SLEEP_MS} (30 days)",
                s.duration_ms,
                s.tasks - 1,
                s.stagger_ms
            ));
        }
        if s.checkpoint_interval_ms != 0
            && !(MIN_SLEEP_CHECKPOINT_MS..=MAX_SLEEP_MS).contains(&s.checkpoint_interval_ms)
        {
            return Err(format!(
                "invalid sleep job spec: checkpoint-interval-ms must be 0 (none) or {MIN_SLEEP_CHECKPOINT_MS} to {MAX_SLEEP_MS}, got {}",
                s.checkpoint_interval_ms
            ));
        }
        Ok(s)
    }

    /// How long task `index` runs.
    fn duration(&self, index: u32) -> Duration {
        Duration::from_millis(
            self.duration_ms
                .saturating_add(u64::from(index).saturating_mul(self.stagger_ms)),
        )
    }

    fn graph(&self) -> JobGraph {
        let mut g = JobGraph::default();
        for i in 0..self.tasks {
            g.add_task(format!("sleep-{i}"), 1, None, None);
        }
        g
    }
}

/// Waits `duration` from its first run, then finishes; with `checkpoints`, reports the time
/// it has left at every checkpoint.
struct Sleep {
    duration: Duration,
    until: Option<Instant>,
    checkpoints: Option<SleepCheckpoints>,
}

/// A sleep task's part in checkpoints: checkpoint `n` is taken by every task in the `n`-th
/// interval since the Unix epoch, so tasks on different executors agree on the ids without
/// talking to each other.
struct SleepCheckpoints {
    task: u32,
    interval_ms: u64,
    sink: Arc<dyn SnapshotSink>,
    /// The last checkpoint reported (or restored from).
    last: u64,
}

impl SleepCheckpoints {
    /// Reports checkpoint `slot` with `left` to sleep if it is newer than the last one.
    fn take(&mut self, slot: u64, left: Duration) {
        if slot > self.last {
            self.last = slot;
            self.report(false, left);
        }
    }

    fn report(&self, last: bool, left: Duration) {
        self.sink.snapshot(TaskSnapshot {
            task: self.task,
            checkpoint: self.last,
            last,
            state: sleep_state(left),
        });
    }
}

/// A sleep task's checkpoint state: the milliseconds it has left, little-endian.
fn sleep_state(left: Duration) -> Vec<u8> {
    u64::try_from(left.as_millis())
        .unwrap_or(u64::MAX)
        .to_le_bytes()
        .to_vec()
}

/// Reads [`sleep_state`].
fn sleep_left(state: &[u8]) -> Result<Duration, String> {
    let bytes: [u8; 8] = state.try_into().map_err(|_| {
        format!(
            "sleep task state must be 8 bytes, got {} (not a sleep job's checkpoint?)",
            state.len()
        )
    })?;
    Ok(Duration::from_millis(u64::from_le_bytes(bytes)))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The checkpoint slot of Unix time `unix_ms` for `interval_ms` (> 0), and how long until
/// the next one starts.
fn checkpoint_slot(unix_ms: u64, interval_ms: u64) -> (u64, Duration) {
    let slot = unix_ms / interval_ms;
    let next = slot.saturating_add(1).saturating_mul(interval_ms);
    (slot, Duration::from_millis(next.saturating_sub(unix_ms)))
}

impl Operator for Sleep {
    type In = ();
    type Out = ();
    fn run(
        &mut self,
        _: &mut [Input<()>],
        _: &mut [Output<()>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let now = cx.now();
        let until = *self.until.get_or_insert(now + self.duration);
        let left = until.saturating_duration_since(now);
        let Some(c) = &mut self.checkpoints else {
            return Ok(if left.is_zero() {
                Status::Finished
            } else {
                Status::WaitUntil(until)
            });
        };
        if left.is_zero() {
            // Done: this state stands for every later checkpoint.
            c.report(true, left);
            return Ok(Status::Finished);
        }
        let (slot, next) = checkpoint_slot(unix_ms(), c.interval_ms);
        c.take(slot, left);
        Ok(Status::WaitUntil(until.min(now + next)))
    }
}

/// The sleep task `index` of a job with `spec`, resuming from `restore` if given.
fn sleep_task(
    spec: &SleepSpec,
    index: u32,
    restore: Option<&RestorePoint>,
    sink: &Arc<dyn SnapshotSink>,
) -> Result<Sleep, String> {
    let mut duration = spec.duration(index);
    let mut last = 0;
    if let Some(point) = restore {
        let state = point.states.get(&index).ok_or_else(|| {
            format!(
                "checkpoint {} has no state for task {index}",
                point.checkpoint
            )
        })?;
        duration = sleep_left(state)?.min(Duration::from_millis(MAX_SLEEP_MS));
        last = point.checkpoint;
    }
    let checkpoints = (spec.checkpoint_interval_ms > 0).then(|| SleepCheckpoints {
        task: index,
        interval_ms: spec.checkpoint_interval_ms,
        sink: sink.clone(),
        last,
    });
    Ok(Sleep {
        duration,
        until: None,
        checkpoints,
    })
}

fn demo_spec(spec: &str) -> Result<microcosm_demo::DemoSpec, String> {
    microcosm_demo::DemoSpec::from_toml_str(spec).map_err(|e| match e {
        microcosm_demo::SpecError::Toml(t) => {
            format!(
                "invalid demo job spec: {}",
                microcosm_control::toml_error_line(&t, spec)
            )
        }
        other => format!("invalid demo job spec: {other}"),
    })
}

impl JobCatalog for JobTypes {
    fn validate(&self, job_type: &str, spec: &str) -> Result<(), String> {
        JobCatalog::plan(self, job_type, spec).map(|_| ())
    }

    fn plan(&self, job_type: &str, spec: &str) -> Result<JobGraph, String> {
        match job_type {
            "demo" => Ok(microcosm_demo::plan::plan(&demo_spec(spec)?)),
            "sleep" => Ok(SleepSpec::parse(spec)?.graph()),
            other => Err(format!("unknown job type {other:?} (known: demo, sleep)")),
        }
    }
}

impl JobLauncher for JobTypes {
    fn plan(&self, job_type: &str, spec: &str) -> Result<JobGraph, String> {
        JobCatalog::plan(self, job_type, spec)
    }

    fn launch(&self, l: Launch<'_>) -> Result<Vec<(u32, TaskHandle)>, String> {
        match l.job_type {
            "sleep" => {
                let spec = SleepSpec::parse(l.spec)?;
                l.local
                    .iter()
                    .map(|&i| {
                        let op = sleep_task(&spec, i, l.restore, l.snapshots)?;
                        l.engine
                            .spawn(TaskSpec::new(format!("sleep-{i}"), op))
                            .map(|h| (i, h))
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            }
            "demo" => {
                let spec = demo_spec(l.spec)?;
                let started =
                    microcosm_demo::runtime::start_tasks(microcosm_demo::runtime::StartContext {
                        job: l.job,
                        epoch: l.epoch,
                        spec: &spec,
                        graph: l.graph,
                        local: l.local,
                        engine: l.engine,
                        exchange: l.exchange,
                        restore: l.restore,
                        snapshots: l.snapshots,
                    })
                    .map_err(|e| e.to_string())?;
                Ok(started
                    .tasks()
                    .iter()
                    .map(|(i, h)| (*i, h.clone()))
                    .collect())
            }
            other => Err(format!("unknown job type {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use microcosm_engine::{Engine, EngineConfig, MemorySnapshots};

    #[test]
    fn sleep_specs_stagger_durations_and_default_to_no_checkpoints() {
        let s = SleepSpec::parse("tasks = 3\nduration-ms = 100\nstagger-ms = 50\n").unwrap();
        assert_eq!(s.checkpoint_interval_ms, 0);
        assert_eq!(
            (0..3).map(|i| s.duration(i)).collect::<Vec<_>>(),
            [100, 150, 200].map(Duration::from_millis)
        );
        let e = SleepSpec::parse("tasks = 1\nduration-ms = 1\nstager-ms = 5\n").unwrap_err();
        assert!(e.contains("stager-ms"), "{e}");
        for (spec, named) in [
            (
                "tasks = 3\nduration-ms = 1\nstagger-ms = 18446744073709551615\n",
                "stagger-ms",
            ),
            ("tasks = 1\nduration-ms = 18446744073709551615\n", "30 days"),
            (
                "tasks = 1\nduration-ms = 1\ncheckpoint-interval-ms = 1\n",
                "checkpoint-interval-ms",
            ),
        ] {
            let e = SleepSpec::parse(spec).unwrap_err();
            assert!(e.contains(named), "{spec}: {e}");
        }
    }

    #[test]
    fn the_example_sleep_job_parses() {
        let s = SleepSpec::parse(include_str!("../../config/sleep-job.toml")).unwrap();
        assert!(s.checkpoint_interval_ms > 0 && s.stagger_ms > 0);
    }

    #[test]
    fn checkpoint_slots_are_unix_time_intervals() {
        assert_eq!(
            checkpoint_slot(1_000, 100),
            (10, Duration::from_millis(100))
        );
        assert_eq!(checkpoint_slot(1_099, 100), (10, Duration::from_millis(1)));
        assert_eq!(
            checkpoint_slot(1_100, 100),
            (11, Duration::from_millis(100))
        );
    }

    #[test]
    fn a_sleep_state_reads_back_and_a_foreign_one_is_refused() {
        let left = Duration::from_millis(1234);
        assert_eq!(sleep_left(&sleep_state(left)), Ok(left));
        let e = sleep_left(&[1, 2, 3]).unwrap_err();
        assert!(e.contains("8 bytes, got 3"), "{e}");
    }

    #[test]
    fn a_restored_sleep_task_waits_only_what_it_had_left() {
        let spec =
            SleepSpec::parse("tasks = 2\nduration-ms = 60000\ncheckpoint-interval-ms = 10\n")
                .unwrap();
        let sink: Arc<dyn SnapshotSink> = Arc::new(MemorySnapshots::new());
        let point = RestorePoint {
            checkpoint: 9,
            states: [(0, sleep_state(Duration::from_millis(70)))].into(),
        };
        let task = sleep_task(&spec, 0, Some(&point), &sink).unwrap();
        assert_eq!(task.duration, Duration::from_millis(70));
        assert_eq!(task.checkpoints.as_ref().unwrap().last, 9);
        let e = sleep_task(&spec, 1, Some(&point), &sink).err().unwrap();
        assert!(e.contains("no state for task 1"), "{e}");
    }

    /// A checkpointing sleep task reports its time left at each interval it lives through,
    /// with rising ids, then a last report that stands for the checkpoints after its last.
    #[test]
    fn a_checkpointing_sleep_task_reports_each_interval_and_a_last_state() {
        let spec = SleepSpec::parse("tasks = 1\nduration-ms = 120\ncheckpoint-interval-ms = 20\n")
            .unwrap();
        let snapshots = Arc::new(MemorySnapshots::new());
        let sink: Arc<dyn SnapshotSink> = snapshots.clone();
        let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
        let op = sleep_task(&spec, 0, None, &sink).unwrap();
        let handle = engine.spawn(TaskSpec::new("sleep-0", op)).unwrap();
        microcosm_engine::wait_finished(&[&engine], [handle.id()], Duration::from_secs(10))
            .unwrap();
        let taken = snapshots.taken();
        let (last, regular) = taken.split_last().unwrap();
        assert!(regular.len() >= 3, "one report per 20 ms of 120: {taken:?}");
        assert!(regular.iter().all(|s| !s.last && s.task == 0));
        assert!(
            regular
                .windows(2)
                .all(|w| w[0].checkpoint < w[1].checkpoint)
        );
        let lefts: Vec<Duration> = regular
            .iter()
            .map(|s| sleep_left(&s.state).unwrap())
            .collect();
        assert!(lefts.windows(2).all(|w| w[0] > w[1]), "{lefts:?}");
        assert!(last.last);
        assert_eq!(last.checkpoint, regular.last().unwrap().checkpoint);
        assert_eq!(sleep_left(&last.state), Ok(Duration::ZERO));
    }
}
