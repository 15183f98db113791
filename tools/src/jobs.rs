//! The job types this binary knows: their spec validation, plans and task launchers.
//!
//! - `demo`: the demo pipeline (`microcosm-demo`).
//! - `sleep`: N independent tasks that each wait a fixed time and finish; a minimal job for
//!   exercising scheduling, failover and the job lifecycle.

use std::time::{Duration, Instant};

use microcosm_control::executor::{JobLauncher, Launch};
use microcosm_control::leader::JobCatalog;
use microcosm_engine::{
    Context, EngineError, Input, JobGraph, Operator, Output, Status, TaskHandle, TaskSpec,
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
    /// How long each task runs (ms).
    duration_ms: u64,
}

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
        Ok(s)
    }

    fn graph(&self) -> JobGraph {
        let mut g = JobGraph::default();
        for i in 0..self.tasks {
            g.add_task(format!("sleep-{i}"), 1, None, None);
        }
        g
    }
}

/// Waits `duration` from its first run, then finishes.
struct Sleep {
    duration: Duration,
    until: Option<Instant>,
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
        Ok(if now >= until {
            Status::Finished
        } else {
            Status::WaitUntil(until)
        })
    }
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
                        let op = Sleep {
                            duration: Duration::from_millis(spec.duration_ms),
                            until: None,
                        };
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
