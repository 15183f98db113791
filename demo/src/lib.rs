//! The demo pipeline job of microcosm: its spec, its sink file format and its verifier.
//!
//! # The pipeline
//!
//! The job has `T + 4S` tasks: **T producers**, **S binlogs**, and for each binlog a chain
//! **receive → syncer → sink**:
//!
//! ```text
//!  producer 0 ─┐                  ┌─ binlog 0 → receive 0 → syncer 0 → sink 0 → sink_0.csv
//!  producer 1 ─┼─ data: round ────┼─ binlog 1 → receive 1 → syncer 1 → sink 1 → sink_1.csv
//!     …        │  robin; DDL: to  │     …                      ▲ barrier ▲
//!  producer T-1┘  every binlog    └─ binlog S-1 → …  → syncer S-1 → sink S-1
//! ```
//!
//! - Producer `t` owns table `t` and emits data records with pk `1..=rcd-cnt`. The table's
//!   schema version starts at 0; at every `pk % ddl-freq == 0` the producer bumps it and
//!   sends a **DDL record** `(t, version)` to *every* binlog, then the data record, which
//!   carries the new version. Data records go round-robin over the S binlogs.
//! - Each binlog is a replayable record stream; its receiver reads it and feeds its syncer.
//! - **The barrier**: a syncer holds DDL `(t, v)` until every stream's syncer has reached
//!   DDL `(t, v)`, then passes it. So no row of table `t` with version `≥ v` is synced on any
//!   stream before every row of table `t` with version `< v` has been synced on all of them.
//!   While it waits, the syncer holds only table `t`'s later records; other tables pass
//!   (holding the whole stream can deadlock, see [`operators::Syncer`]).
//! - Each sink appends one line per record to `<sink-dir>/<flow-id>/sink_<i>.csv`:
//!   `kind,table_id,schema_ver,pk,produced_ns,synced_ns,sink_ns` (see [`sinkfile`]).
//!
//! # The modules
//!
//! - [`spec`]: [`DemoSpec`], the job parameters, read from TOML and validated;
//!   [`DemoSpecOverrides`] lets a CLI replace keys.
//! - [`sinkfile`]: [`SinkRow`], its allocation-free writer and strict parser.
//! - [`verify`](mod@verify): [`verify()`] reads the sink files after a run and checks
//!   exactly-once delivery, per-stream DDL order and the barrier, and measures latency and
//!   throughput into a [`Report`].
//! - [`record`]: [`DemoRecord`], the fixed-size rkyv record with its per-stage tracer
//!   stamps, and [`UnixClock`], the shared Instant → Unix-ns mapping.
//! - [`plan`](mod@plan): [`plan()`] turns a spec into the job's `JobGraph` (task names,
//!   co-location groups, edges); [`task_kind`] reads a task back as a [`TaskKind`].
//! - [`operators`]: the engine operators (producer with open-loop pacing, binlog, receive,
//!   syncer, sink).
//! - [`barrier`]: [`BarrierCoordinator`], the in-memory DDL barrier of a job's syncers.
//! - [`checkpoint`]: consistent checkpoints (aligned barrier records) and recovery from
//!   them: what each task saves ([`checkpoint::TaskState`]) and why the cut is consistent.
//! - [`runtime`]: [`start_tasks`] instantiates the tasks placed on one executor, wires their
//!   edges (in-process or through an `Exchange`) and spawns them on its `Engine`.
//!
//! ```
//! use microcosm_demo::{DemoSpec, SpecError};
//!
//! let spec = DemoSpec::from_toml_str("flow-id = \"smoke\"\ntable-num = 2\nbinlog-num = 3")?;
//! assert_eq!(spec.binlog_num, 3);
//! assert!(spec.sink_path(0).ends_with("smoke/sink_0.csv"));
//! assert!(DemoSpec::from_toml_str("table-num = -3").is_err());
//! # Ok::<(), SpecError>(())
//! ```

pub mod barrier;
pub mod checkpoint;
pub mod fence;
pub mod operators;
pub mod plan;
pub mod record;
pub mod runtime;
pub mod sinkfile;
pub mod sinkwriter;
pub mod spec;
pub mod verify;

pub use barrier::{Arrival, BarrierCoordinator, BarrierError};
pub use plan::{TaskKind, plan, task_kind};
pub use record::{DemoRecord, RecordKind, UnixClock};
pub use runtime::{DemoError, StartContext, StartedTasks, start_tasks};

pub use sinkfile::{RowError, RowKind, SinkRow};
pub use spec::{DemoSpec, DemoSpecOverrides, ExpectedDdl, SpecError};
pub use verify::{Report, VerifyError, Violation, verify};
