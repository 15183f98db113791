//! Starting the demo job's tasks on an executor: [`start_tasks`].
//!
//! An executor that was assigned some tasks of a demo job calls [`start_tasks`] with the
//! job's spec, its planned graph ([`plan`](crate::plan::plan)), the indices of the tasks
//! placed on it, its [`Engine`] and its [`Exchange`]. Every edge touching a local task is
//! wired with the spec's batching knobs ([`edge_config`]):
//!
//! - both ends local: an in-process [`edge`];
//! - local producer, remote consumer: [`Output::remote`] over
//!   [`Exchange::connect`] to `EdgeAddress { job, edge: id, partition: 0 }`;
//! - remote producer, local consumer: an [`inbound_edge`] bound with [`Exchange::bind`] at
//!   the same address.
//!
//! All binds of one call happen before its connects. An exchange that resolves addresses
//! eagerly (like [`MemoryExchange`](microcosm_engine::MemoryExchange)) therefore needs the
//! consuming side's tasks started first when a job spans several engines.
//!
//! The syncers of a job coordinate their DDL barrier in memory, so a `local` set must hold
//! either all of them or none ([`DemoError::SplitBarrier`]). Everything is checked before any
//! edge is created or task spawned; if spawning fails midway, the tasks already spawned are
//! cancelled (binds already made on the exchange are not undone).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use microcosm_engine::graph::JobGraph;
use microcosm_engine::{
    EdgeAddress, EdgeConfig, Engine, EngineError, Exchange, Input, Operator, Output, RestorePoint,
    SnapshotSink, TaskHandle, TaskId, TaskSpec, edge, inbound_edge,
};

use crate::barrier::BarrierCoordinator;
use crate::checkpoint::{Snapshots, StateError, TaskState};
use crate::fence::Owner;
use crate::operators::{
    Binlog, LatencyHandle, LogPosition, Producer, Receive, Sink, Syncer, new_histogram,
};
use crate::plan::{PlanError, TaskKind, task_kind};
use crate::record::{DemoRecord, UnixClock};
use crate::spec::{DemoSpec, SpecError};
use crate::verify::LatencySummary;

/// Queue capacity, in batches, of every edge the demo job creates.
pub const EDGE_CAPACITY: usize = 64;

/// Why the demo job's tasks could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The spec does not validate.
    #[error("invalid demo spec: {0}")]
    Spec(#[from] SpecError),
    /// A task of the graph is not a demo task.
    #[error("{0}")]
    Plan(#[from] PlanError),
    /// The graph is malformed or does not have the shape [`plan`](crate::plan::plan) gives
    /// for this spec.
    #[error("the job graph does not fit the demo spec: {0}")]
    InvalidGraph(String),
    /// A task index appears twice in the local set.
    #[error("task {0} is listed twice in the local task set")]
    DuplicateTask(u32),
    /// The local set holds some but not all syncers; their barrier needs one process.
    #[error(
        "the local task set holds {local} of the job's {streams} syncers; the DDL barrier needs all of them in one process"
    )]
    SplitBarrier {
        /// Syncers in the local set.
        local: u32,
        /// Syncers in the job.
        streams: u32,
    },
    /// The checkpoint to restore from is unusable.
    #[error("cannot restore: {0}")]
    State(#[from] StateError),
    /// Creating an edge, binding or connecting through the exchange, or spawning failed.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
}

/// What [`start_tasks`] needs.
#[derive(Clone, Copy)]
pub struct StartContext<'a> {
    /// The job id: names the job's remote edges, and its sinks' files are fenced by it (a
    /// newer job writing to the same directory takes them over, an older one is refused; see
    /// [`crate::fence`]).
    pub job: u64,
    /// The attempt's epoch: sinks refuse to write once a newer attempt of the job claimed
    /// their files.
    pub epoch: u64,
    /// The job's spec.
    pub spec: &'a DemoSpec,
    /// The job's graph, as [`plan`](crate::plan::plan) computed it from `spec`.
    pub graph: &'a JobGraph,
    /// Indices (into `graph.tasks`) of the tasks to run here.
    pub local: &'a [u32],
    /// The engine to run them on.
    pub engine: &'a Engine,
    /// How edges to and from tasks elsewhere are connected.
    pub exchange: &'a dyn Exchange<DemoRecord>,
    /// The checkpoint this attempt resumes from (`None`: start from scratch).
    pub restore: Option<&'a RestorePoint>,
    /// Where the tasks hand their checkpoint snapshots.
    pub snapshots: &'a Arc<dyn SnapshotSink>,
}

impl std::fmt::Debug for StartContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartContext")
            .field("job", &self.job)
            .field("flow_id", &self.spec.flow_id)
            .field("tasks", &self.graph.tasks.len())
            .field("local", &self.local)
            .field("restore", &self.restore.map(|r| r.checkpoint))
            .finish()
    }
}

/// The tasks [`start_tasks`] spawned, and handles to observe them.
#[derive(Debug)]
pub struct StartedTasks {
    tasks: BTreeMap<u32, TaskHandle>,
    latency: BTreeMap<u32, LatencyHandle>,
    binlogs: BTreeMap<u32, LogPosition>,
    barrier: Option<Arc<BarrierCoordinator>>,
}

impl StartedTasks {
    /// The spawned tasks, by graph task index.
    pub fn tasks(&self) -> &BTreeMap<u32, TaskHandle> {
        &self.tasks
    }

    /// The engine ids of the spawned tasks.
    pub fn ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.values().map(TaskHandle::id)
    }

    /// The handle of graph task `index`, if it was started here.
    pub fn handle(&self, index: u32) -> Option<&TaskHandle> {
        self.tasks.get(&index)
    }

    /// The graph task index of an engine task id (e.g. from a `TaskEvent`).
    pub fn task_index(&self, id: TaskId) -> Option<u32> {
        self.tasks
            .iter()
            .find_map(|(&index, handle)| (handle.id() == id).then_some(index))
    }

    /// The local sinks' latency histograms, by stream.
    pub fn latency_handles(&self) -> &BTreeMap<u32, LatencyHandle> {
        &self.latency
    }

    /// The local binlogs' log positions, by stream.
    pub fn binlog_positions(&self) -> &BTreeMap<u32, LogPosition> {
        &self.binlogs
    }

    /// The barrier coordinator, if the syncers run here.
    pub fn barrier(&self) -> Option<&Arc<BarrierCoordinator>> {
        self.barrier.as_ref()
    }

    /// The local sinks' latency histograms merged (ns of `sink − produced`, data rows).
    pub fn merged_latency(&self) -> Histogram<u64> {
        let mut merged = new_histogram();
        for handle in self.latency.values() {
            // The merged histogram auto-resizes, so adding cannot run out of range.
            if merged.add(handle.snapshot()).is_err() {
                tracing::warn!("a latency histogram could not be merged");
            }
        }
        merged
    }

    /// Percentiles of the merged latency, in µs; `None` before any data row reached a
    /// local sink.
    pub fn latency_summary(&self) -> Option<LatencySummary> {
        let merged = self.merged_latency();
        if merged.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Some(LatencySummary {
            p50_us: us(merged.value_at_quantile(0.5)),
            p90_us: us(merged.value_at_quantile(0.9)),
            p99_us: us(merged.value_at_quantile(0.99)),
            p999_us: us(merged.value_at_quantile(0.999)),
            max_us: us(merged.max()),
        })
    }

    /// Cancels every task started here.
    pub fn cancel_all(&self) {
        for handle in self.tasks.values() {
            handle.cancel();
        }
    }
}

/// The edge configuration of the demo job: the spec's batch size and linger, capacity
/// [`EDGE_CAPACITY`].
pub fn edge_config(spec: &DemoSpec) -> EdgeConfig {
    EdgeConfig {
        capacity: EDGE_CAPACITY,
        batch_size: spec.batch_size.max(1) as usize,
        linger: Duration::from_micros(spec.linger_us),
    }
}

/// Instantiates the tasks `ctx.local` of the demo job, wires their edges and spawns them on
/// `ctx.engine`. See the [module docs](self) for the wiring rules.
pub fn start_tasks(ctx: StartContext<'_>) -> Result<StartedTasks, DemoError> {
    let StartContext {
        job,
        epoch,
        spec,
        graph,
        local,
        engine,
        exchange,
        restore,
        snapshots,
    } = ctx;
    // Also refuses specs needing more schema versions than a record holds.
    spec.validate()?;
    graph.validate().map_err(DemoError::InvalidGraph)?;
    let mut kinds = BTreeMap::new();
    for &index in local {
        let kind = task_kind(graph, index)?;
        if kinds.insert(index, kind).is_some() {
            return Err(DemoError::DuplicateTask(index));
        }
        check_shape(graph, spec, index, kind)?;
    }
    let syncers = kinds
        .values()
        .filter(|k| matches!(k, TaskKind::Syncer(_)))
        .count();
    let syncers = u32::try_from(syncers).unwrap_or(u32::MAX);
    if syncers != 0 && syncers != spec.binlog_num {
        return Err(DemoError::SplitBarrier {
            local: syncers,
            streams: spec.binlog_num,
        });
    }

    // Decode every local task's saved state before anything is wired.
    let mut states = BTreeMap::new();
    if let Some(point) = restore {
        for (&index, kind) in &kinds {
            let bytes = point
                .states
                .get(&index)
                .ok_or_else(|| StateError::Missing {
                    checkpoint: point.checkpoint,
                    task: index,
                    kind: kind.to_string(),
                })?;
            let state = TaskState::decode(index, bytes)?;
            if !state_fits(*kind, &state) {
                return Err(StateError::WrongKind {
                    task: index,
                    kind: kind.to_string(),
                    found: state.kind(),
                }
                .into());
            }
            states.insert(index, state);
        }
    }
    let mut released = BTreeMap::new();
    for state in states.values() {
        if let TaskState::Syncer { released: r } = state {
            for (&table, &version) in r {
                let v = released.entry(table).or_insert(version);
                *v = (*v).max(version);
            }
        }
    }
    let restored = restore.map_or(0, |p| p.checkpoint);
    let snapshots_of = |index: u32| Snapshots::new(index, snapshots.clone());

    let mut ports = Ports::wire(job, graph, &kinds, spec, exchange)?;
    let clock = UnixClock::system();
    let barrier = (syncers > 0)
        .then(|| Arc::new(BarrierCoordinator::with_released(spec.binlog_num, released)));
    let mut started = StartedTasks {
        tasks: BTreeMap::new(),
        latency: BTreeMap::new(),
        binlogs: BTreeMap::new(),
        barrier: barrier.clone(),
    };
    for (&index, &kind) in &kinds {
        let name = kind.to_string();
        let inputs = ports.take_inputs(index);
        let outputs = ports.take_outputs(index);
        let state = states.get(&index);
        let snaps = snapshots_of(index);
        // Each state was checked to fit its task above.
        let spawned = match kind {
            TaskKind::Producer(table) => {
                let mut op = Producer::new(spec, table, clock.clone(), snaps);
                if let Some(&TaskState::Producer {
                    next_pk,
                    start_unix_ns,
                }) = state
                {
                    op.restore(restored, next_pk, start_unix_ns);
                }
                spawn(engine, TaskSpec::new(name, op), Vec::new(), outputs)
            }
            TaskKind::Binlog(stream) => {
                let mut op = Binlog::new(stream, clock.clone(), snaps);
                if let Some(&TaskState::Binlog { position }) = state {
                    op.restore(position);
                }
                started.binlogs.insert(stream, op.position_handle());
                spawn(engine, TaskSpec::new(name, op), inputs, outputs)
            }
            TaskKind::Receive(stream) => {
                let mut op = Receive::new(stream, clock.clone(), snaps);
                if let Some(&TaskState::Receive { position }) = state {
                    op.restore(position);
                }
                spawn(engine, TaskSpec::new(name, op), inputs, outputs)
            }
            // A syncer's saved watermark seeded the shared coordinator above.
            TaskKind::Syncer(stream) => match &barrier {
                Some(barrier) => {
                    let op = Syncer::new(stream, barrier.clone(), clock.clone(), snaps);
                    spawn(engine, TaskSpec::new(name, op), inputs, outputs)
                }
                None => Err(EngineError::operator("a syncer without a barrier")),
            },
            TaskKind::Sink(stream) => {
                let latency = LatencyHandle::new();
                started.latency.insert(stream, latency.clone());
                let mut op = Sink::new(
                    stream,
                    spec.sink_path(stream),
                    Owner { job, epoch },
                    spec.binlog_num,
                    clock.clone(),
                    latency,
                    snaps,
                );
                if let Some(&TaskState::Sink { length, rows }) = state {
                    op.restore(length, rows);
                }
                spawn(engine, TaskSpec::new(name, op), inputs, Vec::new())
            }
        };
        match spawned {
            Ok(handle) => {
                started.tasks.insert(index, handle);
            }
            Err(error) => {
                started.cancel_all();
                return Err(error.into());
            }
        }
    }
    Ok(started)
}

/// Whether `state` is the kind of state task kind `kind` saves.
fn state_fits(kind: TaskKind, state: &TaskState) -> bool {
    matches!(
        (kind, state),
        (TaskKind::Producer(_), TaskState::Producer { .. })
            | (TaskKind::Binlog(_), TaskState::Binlog { .. })
            | (TaskKind::Receive(_), TaskState::Receive { .. })
            | (TaskKind::Syncer(_), TaskState::Syncer { .. })
            | (TaskKind::Sink(_), TaskState::Sink { .. })
    )
}

/// Spawns `spec` with `inputs` and `outputs` in port order.
fn spawn<O, I, P>(
    engine: &Engine,
    mut spec: TaskSpec<O>,
    inputs: Vec<Input<I>>,
    outputs: Vec<Output<P>>,
) -> Result<TaskHandle, EngineError>
where
    O: Operator<In = I, Out = P>,
    P: microcosm_engine::Record,
{
    for input in inputs {
        spec = spec.input(input);
    }
    for output in outputs {
        spec = spec.output(output);
    }
    engine.spawn(spec)
}

/// Checks task `index` (of kind `kind`) is connected as [`plan`](crate::plan::plan) does.
fn check_shape(
    graph: &JobGraph,
    spec: &DemoSpec,
    index: u32,
    kind: TaskKind,
) -> Result<(), DemoError> {
    let bad = |what: String| Err(DemoError::InvalidGraph(format!("{kind}: {what}")));
    let limit = match kind {
        TaskKind::Producer(_) => spec.table_num,
        _ => spec.binlog_num,
    };
    if kind.index() >= limit {
        return bad(format!("index beyond the spec's {limit}"));
    }
    let ins: Vec<TaskKind> = graph
        .inputs(index)
        .map(|e| task_kind(graph, e.from))
        .collect::<Result<_, _>>()?;
    let outs: Vec<TaskKind> = graph
        .outputs(index)
        .map(|e| task_kind(graph, e.to))
        .collect::<Result<_, _>>()?;
    let (want_ins, want_outs): (Vec<TaskKind>, Vec<TaskKind>) = match kind {
        TaskKind::Producer(_) => (
            Vec::new(),
            (0..spec.binlog_num).map(TaskKind::Binlog).collect(),
        ),
        TaskKind::Binlog(i) => (
            (0..spec.table_num).map(TaskKind::Producer).collect(),
            vec![TaskKind::Receive(i)],
        ),
        TaskKind::Receive(i) => (vec![TaskKind::Binlog(i)], vec![TaskKind::Syncer(i)]),
        TaskKind::Syncer(i) => (vec![TaskKind::Receive(i)], vec![TaskKind::Sink(i)]),
        TaskKind::Sink(i) => (vec![TaskKind::Syncer(i)], Vec::new()),
    };
    // Producers and binlogs may have their ports in any order: compare as sets (the
    // producer's outputs are re-ordered by stream when wired).
    let same = |mut got: Vec<TaskKind>, mut want: Vec<TaskKind>| {
        got.sort_unstable();
        want.sort_unstable();
        got == want
    };
    if !same(ins.clone(), want_ins.clone()) {
        return bad(format!("inputs from {ins:?}, expected {want_ins:?}"));
    }
    if !same(outs.clone(), want_outs.clone()) {
        return bad(format!("outputs to {outs:?}, expected {want_outs:?}"));
    }
    Ok(())
}

/// The wired edge ends of the local tasks, by task index and port.
struct Ports {
    inputs: BTreeMap<u32, Vec<Option<Input<DemoRecord>>>>,
    /// Per task: (sort key, output). A producer's key is the stream its output leads to,
    /// so its outputs come out in stream order; other tasks use the port index.
    outputs: BTreeMap<u32, Vec<(u32, Output<DemoRecord>)>>,
}

impl Drop for Ports {
    fn drop(&mut self) {
        // Outputs no task took (the launch failed part-way): their consumers, here or on
        // other executors, must see a failed producer, not one that finished.
        for (_, outputs) in std::mem::take(&mut self.outputs) {
            for (_, output) in outputs {
                output.abandon();
            }
        }
    }
}

impl Ports {
    /// Creates every edge touching a local task: binds first, then connects.
    fn wire(
        job: u64,
        graph: &JobGraph,
        kinds: &BTreeMap<u32, TaskKind>,
        spec: &DemoSpec,
        exchange: &dyn Exchange<DemoRecord>,
    ) -> Result<Ports, DemoError> {
        let config = edge_config(spec);
        let mut ports = Ports {
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
        };
        let mut edges: Vec<_> = graph.edges.iter().collect();
        edges.sort_unstable_by_key(|e| e.id);
        let mut out_port: BTreeMap<u32, u32> = BTreeMap::new();
        let mut in_port: BTreeMap<u32, u32> = BTreeMap::new();
        let mut connects = Vec::new();
        for e in edges {
            let from_port = bump(&mut out_port, e.from);
            let to_port = bump(&mut in_port, e.to);
            let address = EdgeAddress {
                job,
                edge: e.id,
                partition: 0,
            };
            let out_key = match task_kind(graph, e.to)? {
                TaskKind::Binlog(stream)
                    if matches!(kinds.get(&e.from), Some(TaskKind::Producer(_))) =>
                {
                    stream
                }
                _ => from_port,
            };
            match (kinds.contains_key(&e.from), kinds.contains_key(&e.to)) {
                (true, true) => {
                    let (output, input) = edge::<DemoRecord>(&config)?;
                    ports.put_output(e.from, out_key, output);
                    ports.put_input(e.to, to_port, input);
                }
                (false, true) => {
                    let (handle, input) = inbound_edge::<DemoRecord>(config.capacity)?;
                    exchange.bind(address, handle)?;
                    ports.put_input(e.to, to_port, input);
                }
                (true, false) => connects.push((e.from, out_key, address)),
                (false, false) => {}
            }
        }
        for (from, key, address) in connects {
            let output = Output::remote(exchange.connect(address)?, &config)?;
            ports.put_output(from, key, output);
        }
        Ok(ports)
    }

    fn put_input(&mut self, task: u32, port: u32, input: Input<DemoRecord>) {
        let slots = self.inputs.entry(task).or_default();
        let port = port as usize;
        if slots.len() <= port {
            slots.resize_with(port + 1, || None);
        }
        if let Some(slot) = slots.get_mut(port) {
            *slot = Some(input);
        }
    }

    fn put_output(&mut self, task: u32, key: u32, output: Output<DemoRecord>) {
        self.outputs.entry(task).or_default().push((key, output));
    }

    /// Task `task`'s inputs in port order (every port of a local task is wired).
    fn take_inputs(&mut self, task: u32) -> Vec<Input<DemoRecord>> {
        self.inputs
            .remove(&task)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect()
    }

    /// Task `task`'s outputs in port order (producers: in stream order).
    fn take_outputs(&mut self, task: u32) -> Vec<Output<DemoRecord>> {
        let mut outputs = self.outputs.remove(&task).unwrap_or_default();
        outputs.sort_by_key(|(key, _)| *key);
        outputs.into_iter().map(|(_, output)| output).collect()
    }
}

/// Returns the counter's value for `task` and increments it.
fn bump(counters: &mut BTreeMap<u32, u32>, task: u32) -> u32 {
    let counter = counters.entry(task).or_insert(0);
    let value = *counter;
    *counter += 1;
    value
}

#[cfg(test)]
mod tests {
    use microcosm_engine::{EngineConfig, MemoryExchange, MemorySnapshots, wait_finished};

    use super::*;
    use crate::plan::plan;
    use crate::verify::verify;

    fn spec() -> DemoSpec {
        DemoSpec {
            table_num: 2,
            binlog_num: 3,
            rcd_cnt: 10,
            ddl_freq: 5,
            ..DemoSpec::default()
        }
    }

    /// Outputs that no task took (a launch that failed part-way) are abandoned when the
    /// wiring is dropped: their consumers see an aborted producer, never a finished one.
    #[test]
    fn outputs_no_task_took_are_abandoned_when_the_wiring_is_dropped() {
        let spec = spec();
        let graph = plan(&spec);
        let kinds: BTreeMap<u32, TaskKind> = (0..graph.tasks.len() as u32)
            .map(|i| (i, task_kind(&graph, i).unwrap()))
            .collect();
        let exchange = MemoryExchange::<DemoRecord>::new();
        let mut ports = Ports::wire(1, &graph, &kinds, &spec, &exchange).unwrap();
        let (binlog, _) = kinds
            .iter()
            .find(|(_, k)| matches!(k, TaskKind::Binlog(_)))
            .unwrap();
        let inputs = ports.take_inputs(*binlog);
        assert_eq!(
            inputs.len(),
            spec.table_num as usize,
            "one input per producer"
        );
        assert!(inputs.iter().all(|i| !i.upstream_aborted()));
        drop(ports);
        assert!(
            inputs
                .iter()
                .all(|i| i.upstream_aborted() && !i.is_finished()),
            "the producers' untaken outputs were abandoned"
        );
    }

    #[test]
    fn a_split_barrier_and_bad_task_sets_are_refused_before_anything_starts() {
        let spec = spec();
        let graph = plan(&spec);
        let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
        let exchange = MemoryExchange::<DemoRecord>::new();
        let syncer = |i| {
            (0u32..)
                .zip(&graph.tasks)
                .find(|(_, t)| t.name == format!("syncer-{i}"))
                .map(|(index, _)| index)
                .unwrap()
        };
        let snapshots: Arc<dyn SnapshotSink> = Arc::new(microcosm_engine::MemorySnapshots::new());
        let ctx = |local| StartContext {
            epoch: 1,
            job: 1,
            spec: &spec,
            graph: &graph,
            local,
            engine: &engine,
            exchange: &exchange,
            restore: None,
            snapshots: &snapshots,
        };
        let split = [syncer(0), syncer(1)];
        assert!(matches!(
            start_tasks(ctx(&split)),
            Err(DemoError::SplitBarrier {
                local: 2,
                streams: 3
            })
        ));
        assert!(matches!(
            start_tasks(ctx(&[0, 0])),
            Err(DemoError::DuplicateTask(0))
        ));
        assert!(matches!(
            start_tasks(ctx(&[999])),
            Err(DemoError::Plan(PlanError::NoSuchTask { .. }))
        ));
        let other = plan(&DemoSpec {
            binlog_num: 2,
            ..spec.clone()
        });
        let wrong = StartContext {
            graph: &other,
            ..ctx(&[0])
        };
        assert!(matches!(
            start_tasks(wrong),
            Err(DemoError::InvalidGraph(_))
        ));
        let huge = DemoSpec {
            rcd_cnt: 10_000_000_000,
            ddl_freq: 1,
            ..spec.clone()
        };
        assert!(matches!(
            start_tasks(StartContext {
                spec: &huge,
                ..ctx(&[])
            }),
            Err(DemoError::Spec(SpecError::TooManyVersions { .. }))
        ));
        // A restore point without the task's state, or with another kind's state.
        let sink0 = (0u32..)
            .zip(&graph.tasks)
            .find(|(_, t)| t.name == "sink-0")
            .map(|(index, _)| index)
            .unwrap();
        let only_sink = [sink0];
        let empty = RestorePoint {
            checkpoint: 4,
            states: BTreeMap::new(),
        };
        let err = start_tasks(StartContext {
            restore: Some(&empty),
            ..ctx(&only_sink)
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("checkpoint 4 has no state for task"),
            "{err}"
        );
        let wrong_kind = RestorePoint {
            checkpoint: 4,
            states: BTreeMap::from([(sink0, TaskState::Binlog { position: 3 }.encode())]),
        };
        let err = start_tasks(StartContext {
            restore: Some(&wrong_kind),
            ..ctx(&only_sink)
        })
        .unwrap_err();
        assert!(err.to_string().contains("state of a binlog"), "{err}");
        assert_eq!(engine.live_tasks(), 0, "nothing was spawned");
    }

    /// Runs every task of `spec` as attempt 1 of job `job` on a fresh engine, to the end.
    fn run_job(spec: &DemoSpec, job: u64) -> Result<(), EngineError> {
        let engine = Engine::start(EngineConfig::with_workers(1))?;
        let graph = plan(spec);
        let local: Vec<u32> = (0..graph.tasks.len() as u32).collect();
        let exchange = MemoryExchange::<DemoRecord>::new();
        let snapshots: Arc<dyn SnapshotSink> = Arc::new(MemorySnapshots::new());
        let started = start_tasks(StartContext {
            job,
            epoch: 1,
            spec,
            graph: &graph,
            local: &local,
            engine: &engine,
            exchange: &exchange,
            restore: None,
            snapshots: &snapshots,
        })
        .map_err(|e| EngineError::operator(e.to_string()))?;
        // A guard against a hang, not a measurement.
        let result = wait_finished(&[&engine], started.ids(), Duration::from_secs(120));
        started.cancel_all();
        engine.shutdown(Duration::from_secs(10));
        result
    }

    #[test]
    fn a_newer_job_in_the_same_directory_takes_the_output_over_and_an_older_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec_with = |streams| DemoSpec {
            flow_id: "same".to_owned(),
            table_num: 2,
            binlog_num: streams,
            rcd_cnt: 300,
            ddl_freq: 50,
            rate: 0,
            sink_dir: dir.path().to_owned(),
            checkpoint_interval_ms: 3_600_000,
            ..DemoSpec::default()
        };
        let four = spec_with(4);
        run_job(&four, 3).unwrap();
        assert!(verify(&four.output_dir(), &four).unwrap().passed());
        // The same flow-id and sink-dir again, as a newer job (its attempt is epoch 1 too)
        // with fewer streams: it takes the files over and retires those of streams 2 and 3.
        let two = spec_with(2);
        run_job(&two, 4).unwrap();
        let report = verify(&two.output_dir(), &two).unwrap();
        assert!(report.passed(), "{report}");
        assert_eq!(report.data_rows, two.total_data_records());
        // The older job is refused and changes nothing.
        let err = run_job(&four, 3).unwrap_err().to_string();
        assert!(
            err.contains("belong to job 4, newer than job 3")
                && err.contains(&four.output_dir().display().to_string()),
            "{err}"
        );
        let report = verify(&two.output_dir(), &two).unwrap();
        assert!(report.passed(), "{report}");
        assert_eq!(report.data_rows, two.total_data_records());
    }
}
