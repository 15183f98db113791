//! The demo pipeline's operators on `microcosm-engine`: [`Producer`], [`Binlog`],
//! [`Receive`], [`Syncer`] and [`Sink`].
//!
//! All of them follow the engine's rules: `run` never blocks or sleeps, does a bounded
//! amount of work ([`RECORD_BUDGET`] records, then `Status::Ready`), and never loses a record
//! when an output is full — a record leaves its input batch (or the operator's backlog) only
//! after `Output::push` accepted it or it was queued, and the operator returns
//! `Status::BlockedOnOutput` to be run again when room frees.
//!
//! An operator reads its input batch where it lies, through a cursor (a sealed batch from
//! the network in place, field by field, [`DemoRecord::from_archived`]), stamps the record's
//! tracer slot on a copy and pushes that straight into its output's batch: one copy of the
//! 104-byte record per stage. Only records the output refused, or records held back on
//! purpose (a syncer's held tables), wait in a queue of the operator's own. (Staging every
//! record in such a queue first cost three copies per stage: ~25 % of a receiving engine
//! thread in `memmove` and ~11 % in `VecDeque` growth at maximum rate.)
//!
//! An operator whose upstream failed or was cancelled (`Input::upstream_aborted`) fails
//! too, so a broken job ends with failed tasks rather than with sink files that look
//! complete.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use microcosm_engine::{Batch, Context, EngineError, Input, Notify, Operator, Output, Status};

use crate::barrier::{Arrival, BarrierCoordinator};
use crate::checkpoint::{Snapshots, TaskState};
use crate::fence::Owner;
use crate::record::{
    DemoRecord, RecordKind, TRACE_BINLOG, TRACE_PRODUCED, TRACE_RECEIVE, TRACE_SINK, TRACE_SYNCED,
    UnixClock,
};
use crate::sinkfile::{RowKind, SinkRow};
use crate::sinkwriter::{After, BUFFER_BYTES, Job, Offer, QUEUE_BUFFERS, SinkWriter, WriterTarget};
use crate::spec::DemoSpec;

/// Most records one invocation of an operator handles before yielding to other tasks.
pub const RECORD_BUDGET: usize = 4096;

/// Records a binlog keeps in memory (the newest; older ones are dropped). Recovery does not
/// read them: a restarted binlog rebuilds its log from the producers' replay, starting at
/// its checkpointed position.
pub const DEFAULT_LOG_RETENTION: usize = 65_536;

/// Largest latency the histograms track exactly (one hour, in ns); larger values are
/// clamped to it.
pub const MAX_TRACKED_LATENCY_NS: u64 = 3_600_000_000_000;

/// Fails if any input's producer failed or was cancelled, or its network stream broke.
fn check_upstream<R>(inputs: &[Input<R>]) -> Result<(), EngineError> {
    match inputs.iter().position(Input::upstream_aborted) {
        Some(i) => Err(EngineError::operator(format!(
            "the upstream of input {i} failed, was cancelled or lost its stream"
        ))),
        None => Ok(()),
    }
}

/// The input batch an operator is working through, and the index of its next record.
///
/// Records are read where the batch holds them (a sealed batch from the network in place,
/// [`DemoRecord::from_archived`]), one at a time: an operator handles a record and pushes it
/// on before it reads the next, so no record is copied into a staging queue first. The
/// batch is dropped, returning its buffer to the edge's pool, as soon as its last record is
/// consumed.
#[derive(Debug, Default)]
struct Cursor {
    batch: Option<Batch<DemoRecord>>,
    next: usize,
}

impl Cursor {
    /// Whether no record is left (no batch, or every record of it consumed).
    fn is_empty(&self) -> bool {
        self.batch
            .as_ref()
            .is_none_or(|batch| self.next >= batch.len())
    }

    /// A copy of the next record, if any.
    fn peek(&self) -> Option<DemoRecord> {
        match self.batch.as_ref()? {
            Batch::Owned(records) => records.get(self.next).copied(),
            Batch::Sealed(sealed) => sealed
                .records()
                .get(self.next)
                .map(DemoRecord::from_archived),
        }
    }

    /// Consumes the record [`Cursor::peek`] returned.
    fn advance(&mut self) {
        self.next += 1;
        if self.is_empty() {
            self.batch = None;
        }
    }

    /// When no record is left, moves on to `input`'s next non-empty batch; true if one was
    /// loaded, false if a record was left or the input has none.
    fn refill(&mut self, input: &mut Input<DemoRecord>) -> bool {
        if !self.is_empty() {
            return false;
        }
        while let Some(batch) = input.pop() {
            if !batch.is_empty() {
                self.batch = Some(batch);
                self.next = 0;
                return true;
            }
        }
        false
    }
}

/// Pushes `record` to `out`, or queues it in `backlog` if `out` is full or records are
/// already queued there (so order is kept).
fn push_or_queue(
    out: &mut Output<DemoRecord>,
    backlog: &mut VecDeque<DemoRecord>,
    record: DemoRecord,
) {
    if !backlog.is_empty() {
        backlog.push_back(record);
    } else if let Err(record) = out.push(record) {
        backlog.push_back(record);
    }
}

/// Pushes queued records to `out` while it accepts them; false if it blocked.
fn drain_to(backlog: &mut VecDeque<DemoRecord>, out: &mut Output<DemoRecord>) -> bool {
    while let Some(&record) = backlog.front() {
        if out.push(record).is_err() {
            return false;
        }
        backlog.pop_front();
    }
    true
}

/// The one output of task `kind stream`; the error (formatted only on failure) names it.
fn single_output<'a>(
    outputs: &'a mut [Output<DemoRecord>],
    kind: &str,
    stream: u32,
) -> Result<&'a mut Output<DemoRecord>, EngineError> {
    match outputs {
        [out] => Ok(out),
        _ => Err(EngineError::operator(format!(
            "{kind} {stream} needs exactly one output, has {}",
            outputs.len()
        ))),
    }
}

/// The one input of task `kind stream`; the error (formatted only on failure) names it.
fn single_input<'a>(
    inputs: &'a mut [Input<DemoRecord>],
    kind: &str,
    stream: u32,
) -> Result<&'a mut Input<DemoRecord>, EngineError> {
    match inputs {
        [input] => Ok(input),
        _ => Err(EngineError::operator(format!(
            "{kind} {stream} needs exactly one input, has {}",
            inputs.len()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Producer
// ---------------------------------------------------------------------------------------

/// A producer's open-loop schedule (see [`Producer`]): `tables` producers share `rate`
/// records/s, and this one's records are those with `k % tables == phase`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    tables: u64,
    phase: u64,
    rate: u64,
}

impl Pace {
    /// Nanoseconds from the start to data record `pk`'s intended emission:
    /// `((pk − 1) · tables + phase) · 10⁹ / rate`.
    ///
    /// In u64 arithmetic whenever the product fits (any realistic run): the u128 division
    /// it needs otherwise, once per record, showed in the producing executor's profile.
    fn offset_ns(self, pk: u64) -> u64 {
        let k = pk
            .saturating_sub(1)
            .saturating_mul(self.tables)
            .saturating_add(self.phase);
        let rate = self.rate.max(1);
        match k.checked_mul(1_000_000_000) {
            Some(product) => product / rate,
            None => {
                let ns = u128::from(k) * 1_000_000_000 / u128::from(rate);
                u64::try_from(ns).unwrap_or(u64::MAX)
            }
        }
    }
}

/// Source of table `table`: emits data records with pk `1..=rcd-cnt`, preceded at every
/// `pk % ddl-freq == 0` by a DDL to every stream, and a checkpoint barrier to every stream
/// every `checkpoint-interval-ms`.
///
/// Output port `s` must lead to stream `s`'s binlog. Data record `pk` goes to stream
/// `(pk + table) % S`. Pacing is open loop: with a total rate `r` over `T` producers, the
/// job's data records are numbered `k = (pk − 1) · T + table` (every table's first record,
/// then every table's second, …) and record `k` is *intended* at `start + k / r` seconds, so
/// the `T` producers together offer one record every `1 / r`, each producer one every
/// `T / r` at its own phase (not `T` records at once every `T / r`). Each run emits every
/// record whose intended time has passed and otherwise returns `Status::WaitUntil` the next
/// one. The record's produced stamp is its intended time, so time spent waiting behind a
/// slow pipeline counts as latency (no coordinated omission). With rate 0 records are emitted
/// as fast as the outputs take them, stamped with the invocation's time.
///
/// Checkpoint barriers and DDLs are sent between records only, so each reaches every stream
/// at the same point of the producer's output (see [`crate::checkpoint`]). Restored from a
/// checkpoint ([`Producer::restore`]) it resumes at the saved pk on the saved schedule.
#[derive(Debug)]
pub struct Producer {
    table: u32,
    streams: u32,
    rcd_cnt: u64,
    ddl_freq: u64,
    /// The open-loop schedule; `None` = unpaced.
    pace: Option<Pace>,
    clock: UnixClock,
    start: Option<Instant>,
    next_pk: u64,
    /// The current pk's records are being emitted (its stamp is fixed).
    in_progress: bool,
    /// DDL records of the current pk already emitted (streams `0..ddl_sent`).
    ddl_sent: u32,
    stamp: u64,
    snapshots: Snapshots,
    /// Checkpoint interval in ns (at least 1 ms).
    interval_ns: u64,
    /// Id of the last barrier sent (or of the checkpoint restored from).
    last_checkpoint: u64,
    /// When the next barrier is due (set on the first run).
    checkpoint_due: Option<Instant>,
    /// The barrier being sent and the streams it has reached.
    barrier: Option<(u64, u32)>,
}

impl Producer {
    /// The producer of table `table` for `spec`, stamping with `clock` and handing its
    /// checkpoint state to `snapshots`.
    pub fn new(spec: &DemoSpec, table: u32, clock: UnixClock, snapshots: Snapshots) -> Producer {
        let pace = (spec.rate > 0).then(|| Pace {
            tables: u64::from(spec.table_num.max(1)),
            phase: u64::from(table % spec.table_num.max(1)),
            rate: spec.rate,
        });
        Producer {
            table,
            streams: spec.binlog_num,
            rcd_cnt: spec.rcd_cnt,
            ddl_freq: spec.ddl_freq,
            pace,
            clock,
            start: None,
            next_pk: 1,
            in_progress: false,
            ddl_sent: 0,
            stamp: 0,
            snapshots,
            interval_ns: spec.checkpoint_interval_ms.max(1).saturating_mul(1_000_000),
            last_checkpoint: 0,
            checkpoint_due: None,
            barrier: None,
        }
    }

    /// Resumes from its state saved at checkpoint `checkpoint` ([`TaskState::Producer`]):
    /// later barriers have larger ids.
    pub fn restore(&mut self, checkpoint: u64, next_pk: u64, start_unix_ns: u64) {
        self.next_pk = next_pk.max(1);
        self.start = (start_unix_ns > 0).then(|| self.clock.instant_of(start_unix_ns));
        self.last_checkpoint = checkpoint;
    }

    /// Data records emitted so far (restored ones included).
    pub fn emitted(&self) -> u64 {
        self.next_pk - 1
    }

    fn state(&self) -> TaskState {
        TaskState::Producer {
            next_pk: self.next_pk,
            start_unix_ns: match (self.pace, self.start) {
                (Some(_), Some(start)) => self.clock.unix_ns(start),
                _ => 0,
            },
        }
    }

    /// Nanoseconds from the start to record `pk`'s intended emission; `None` if unpaced.
    fn offset_ns(&self, pk: u64) -> Option<u64> {
        self.pace.map(|pace| pace.offset_ns(pk))
    }

    fn version(&self, pk: u64) -> Result<u32, EngineError> {
        let version = pk.checked_div(self.ddl_freq).unwrap_or(0);
        u32::try_from(version).map_err(|_| {
            EngineError::operator(format!(
                "table {} pk {pk}: schema version {version} does not fit in 32 bits",
                self.table
            ))
        })
    }

    fn is_ddl_pk(&self, pk: u64) -> bool {
        self.ddl_freq > 0 && pk.is_multiple_of(self.ddl_freq)
    }

    /// The checkpoint slot `now` falls in: Unix time divided by the interval. Every
    /// producer of the job sends its barriers at the same slot boundaries, with the slot as
    /// the id, so binlogs align them with little waiting.
    fn slot(&self, now: Instant) -> u64 {
        self.clock.unix_ns(now) / self.interval_ns
    }

    /// When slot `slot` begins.
    fn slot_start(&self, slot: u64) -> Instant {
        self.clock.instant_of(slot.saturating_mul(self.interval_ns))
    }

    /// Sends the barrier in progress to the remaining streams; false if an output is full.
    fn send_barrier(&mut self, outputs: &mut [Output<DemoRecord>], now: Instant) -> bool {
        let Some((id, mut sent)) = self.barrier else {
            return true;
        };
        let barrier = DemoRecord::checkpoint(self.table, id, self.clock.unix_ns(now));
        while let Some(out) = outputs.get_mut(sent as usize) {
            if out.push(barrier).is_err() {
                self.barrier = Some((id, sent));
                return false;
            }
            sent += 1;
        }
        self.barrier = None;
        self.last_checkpoint = id;
        self.snapshots.report(id, false, &self.state());
        true
    }
}

impl Operator for Producer {
    type In = ();
    type Out = DemoRecord;

    fn run(
        &mut self,
        _inputs: &mut [Input<()>],
        outputs: &mut [Output<DemoRecord>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        if self.streams == 0 || outputs.len() != self.streams as usize {
            return Err(EngineError::operator(format!(
                "producer {} needs {} outputs (one per stream), has {}",
                self.table,
                self.streams,
                outputs.len()
            )));
        }
        let now = cx.now();
        let start = *self.start.get_or_insert(now);
        // Stamps are computed in Unix ns from these two conversions, once per invocation:
        // `unix_ns(start + offset) = unix_ns(start) + offset`.
        let (start_ns, now_ns) = (self.clock.unix_ns(start), self.clock.unix_ns(now));
        if self.checkpoint_due.is_none() {
            self.checkpoint_due = Some(self.slot_start(self.slot(now) + 1));
        }
        let mut emitted = 0usize;
        while self.next_pk <= self.rcd_cnt {
            let pk = self.next_pk;
            if !self.in_progress {
                // Stop between records only, so a DDL or a barrier reaches either all
                // streams or none.
                if !self.send_barrier(outputs, now) {
                    return Ok(Status::BlockedOnOutput);
                }
                if cx.is_draining() {
                    // A drain asks sources to finish; this one is bounded, and finishing now
                    // would end its streams as if complete. Failing aborts them instead.
                    return Err(EngineError::operator(format!(
                        "producer of table {} stopped by the engine's drain at pk {pk} of {}: its streams are incomplete",
                        self.table, self.rcd_cnt
                    )));
                }
                if self.checkpoint_due.is_some_and(|due| now >= due) {
                    // A producer that fell behind skips the slots it missed; binlogs then
                    // abandon those checkpoints (see `Binlog`).
                    let slot = self.slot(now);
                    self.barrier = Some((slot.max(self.last_checkpoint + 1), 0));
                    self.checkpoint_due = Some(self.slot_start(slot + 1));
                    continue;
                }
                if emitted >= RECORD_BUDGET {
                    return Ok(Status::Ready);
                }
                self.stamp = match self.offset_ns(pk) {
                    Some(offset) => {
                        let intended_ns = start_ns.saturating_add(offset);
                        if intended_ns > now_ns {
                            let intended = start
                                .checked_add(Duration::from_nanos(offset))
                                .unwrap_or(now);
                            let wake = self.checkpoint_due.map_or(intended, |d| d.min(intended));
                            return Ok(Status::WaitUntil(wake));
                        }
                        intended_ns
                    }
                    None => now_ns,
                };
                self.in_progress = true;
                self.ddl_sent = 0;
            }
            let version = self.version(pk)?;
            if self.is_ddl_pk(pk) {
                while let Some(out) = outputs.get_mut(self.ddl_sent as usize) {
                    let ddl = DemoRecord::ddl(self.table, version, pk, self.stamp);
                    if out.push(ddl).is_err() {
                        return Ok(Status::BlockedOnOutput);
                    }
                    self.ddl_sent += 1;
                }
            }
            let stream = pk.saturating_add(u64::from(self.table)) % u64::from(self.streams);
            // `stream < streams == outputs.len()`.
            let Some(out) = outputs.get_mut(stream as usize) else {
                return Err(EngineError::operator("stream index out of range"));
            };
            if out
                .push(DemoRecord::data(self.table, version, pk, self.stamp))
                .is_err()
            {
                return Ok(Status::BlockedOnOutput);
            }
            self.in_progress = false;
            self.next_pk += 1;
            emitted += 1;
        }
        if !self.send_barrier(outputs, now) {
            return Ok(Status::BlockedOnOutput);
        }
        // Done: this state stands for every later checkpoint.
        self.snapshots
            .report(self.last_checkpoint, true, &self.state());
        Ok(Status::Finished)
    }
}

// ---------------------------------------------------------------------------------------
// Binlog
// ---------------------------------------------------------------------------------------

/// The position of a binlog, readable from any thread: the number of records appended.
#[derive(Debug, Clone, Default)]
pub struct LogPosition(Arc<AtomicU64>);

impl LogPosition {
    /// Records appended so far (the position the next record gets).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, position: u64) {
        self.0.store(position, Ordering::Release);
    }
}

/// An ordered in-memory record log with positions, keeping the latest records for replay.
///
/// Memory is bounded: at most `retention` records are kept; older ones are dropped
/// ([`BinlogLog::truncate_before`] drops explicitly). A log restored from a checkpoint starts
/// empty at the saved position ([`BinlogLog::starting_at`]).
#[derive(Debug)]
pub struct BinlogLog {
    records: VecDeque<DemoRecord>,
    /// Position of `records[0]`.
    first: u64,
    retention: usize,
}

impl BinlogLog {
    /// An empty log keeping at most `retention` records (at least 1).
    pub fn new(retention: usize) -> BinlogLog {
        BinlogLog::starting_at(0, retention)
    }

    /// An empty log whose next record gets position `position` (a log rebuilt after a
    /// restore from a checkpoint taken at that position).
    ///
    /// The whole retention is reserved at once. Grown by doubling instead, the deque moved
    /// every record it held into a fresh allocation whose pages were then faulted in: at 100k
    /// records/s the four binlogs of one executor crossed 32,768 records within 5 ms of each
    /// other and stalled their worker for ~13 ms, always 1.3 s into a run. Reserved memory is
    /// only faulted in as records fill it, a page at a time.
    pub fn starting_at(position: u64, retention: usize) -> BinlogLog {
        let retention = retention.max(1);
        BinlogLog {
            records: VecDeque::with_capacity(retention),
            first: position,
            retention,
        }
    }

    /// Records the log can hold without allocating (at least its retention).
    pub fn capacity(&self) -> usize {
        self.records.capacity()
    }

    /// Appends a record and returns its position.
    pub fn append(&mut self, record: DemoRecord) -> u64 {
        let position = self.end();
        if self.records.len() >= self.retention {
            self.records.pop_front();
            self.first += 1;
        }
        self.records.push_back(record);
        position
    }

    /// The position the next record gets (= records appended so far).
    pub fn end(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    /// The oldest position still held.
    pub fn start(&self) -> u64 {
        self.first
    }

    /// The records from `position` on, if still held.
    pub fn read_from(&self, position: u64) -> Option<impl Iterator<Item = &DemoRecord>> {
        let skip = usize::try_from(position.checked_sub(self.first)?).ok()?;
        (skip <= self.records.len()).then(|| self.records.iter().skip(skip))
    }

    /// Drops the records before `position` (e.g. once a checkpoint covers them).
    pub fn truncate_before(&mut self, position: u64) {
        while self.first < position && self.records.pop_front().is_some() {
            self.first += 1;
        }
    }
}

/// Binlog `stream`: merges the producers' records (per-producer order kept by the edges),
/// appends each to its [`BinlogLog`], stamps `tracer[TRACE_BINLOG]` and forwards it to its one
/// output, after a [`RecordKind::StreamStart`] header naming
/// the position it serves from. Finishes when every input has ended and everything is
/// forwarded.
///
/// **Alignment.** Once checkpoint barrier `n` arrived on an input, nothing more is taken from
/// that input until barrier `n` arrived on every input that has not finished; then one
/// barrier `n` is appended and forwarded and the log position is snapshotted. A producer
/// that fell behind may skip checkpoints: a barrier `m > n` while aligning `n` abandons `n`
/// (it never completes anywhere, as that producer sent no `n` to any stream) and aligns `m`;
/// a barrier older than the one aligning, or than the last one aligned, is dropped.
#[derive(Debug)]
pub struct Binlog {
    stream: u32,
    clock: UnixClock,
    log: BinlogLog,
    position: LogPosition,
    /// Appended (and stamped) records the output has not accepted yet, in order.
    backlog: VecDeque<DemoRecord>,
    next_input: usize,
    snapshots: Snapshots,
    /// Per input: the batch being read (records after a barrier wait there for the
    /// alignment).
    unread: Vec<Cursor>,
    /// The barrier being aligned, and which inputs delivered it.
    aligning: Option<u64>,
    arrived: Vec<bool>,
    /// The last barrier aligned and forwarded.
    last_aligned: u64,
    /// The stream-start header was queued.
    started: bool,
}

impl Binlog {
    /// Binlog `stream`, keeping [`DEFAULT_LOG_RETENTION`] records.
    pub fn new(stream: u32, clock: UnixClock, snapshots: Snapshots) -> Binlog {
        Binlog {
            stream,
            clock,
            log: BinlogLog::new(DEFAULT_LOG_RETENTION),
            position: LogPosition::default(),
            backlog: VecDeque::new(),
            next_input: 0,
            snapshots,
            unread: Vec::new(),
            aligning: None,
            arrived: Vec::new(),
            last_aligned: 0,
            started: false,
        }
    }

    /// Resumes from its saved position ([`TaskState::Binlog`]): the log restarts empty there.
    pub fn restore(&mut self, position: u64) {
        self.log = BinlogLog::starting_at(position, DEFAULT_LOG_RETENTION);
        self.position.set(position);
    }

    /// The log position: records appended so far.
    pub fn log_position(&self) -> u64 {
        self.log.end()
    }

    /// A handle reading the log position from another thread.
    pub fn position_handle(&self) -> LogPosition {
        self.position.clone()
    }

    /// The log.
    pub fn log(&self) -> &BinlogLog {
        &self.log
    }

    /// Stamps `record`, appends it to the log and forwards it.
    fn append(&mut self, mut record: DemoRecord, stamp: u64, out: &mut Output<DemoRecord>) {
        record.tracer[TRACE_BINLOG] = stamp;
        self.log.append(record);
        push_or_queue(out, &mut self.backlog, record);
    }

    /// Appends input `i`'s records up to and including a barrier, to the end of its current
    /// batch, or until the output refuses one; returns how many records it consumed.
    fn read_input(
        &mut self,
        i: usize,
        input: &mut Input<DemoRecord>,
        out: &mut Output<DemoRecord>,
    ) -> Result<usize, EngineError> {
        let Some(unread) = self.unread.get_mut(i) else {
            return Ok(0);
        };
        unread.refill(input);
        if unread.is_empty() {
            return Ok(0);
        }
        let stamp = self.clock.now_ns();
        let mut read = 0;
        while self.backlog.is_empty()
            && let Some(unread) = self.unread.get_mut(i)
            && let Some(record) = unread.peek()
        {
            unread.advance();
            read += 1;
            if let Some(id) = record.checkpoint_id() {
                match self.aligning {
                    Some(aligning) if id < aligning => {
                        // A producer that fell behind sent a checkpoint the others have
                        // moved past: abandoned, nothing to wait for.
                        continue;
                    }
                    Some(aligning) if id > aligning => {
                        // This producer skipped `aligning`: it can never complete. Abandon
                        // it (no barrier, no snapshot) and align `id` instead.
                        self.arrived.iter_mut().for_each(|a| *a = false);
                        self.aligning = Some(id);
                    }
                    Some(_) => {}
                    None if id <= self.last_aligned => continue,
                    None => self.aligning = Some(id),
                }
                if let Some(arrived) = self.arrived.get_mut(i) {
                    *arrived = true;
                }
                break;
            }
            if !record.is_row() {
                return Err(EngineError::operator(format!(
                    "binlog {}: input {i} sent a record of kind {} (producers send rows and barriers only)",
                    self.stream, record.kind
                )));
            }
            self.append(record, stamp, out);
        }
        self.position.set(self.log.end());
        Ok(read)
    }

    /// Completes the alignment once every input delivered the barrier or finished.
    fn try_align(&mut self, inputs: &[Input<DemoRecord>], out: &mut Output<DemoRecord>) {
        let Some(id) = self.aligning else { return };
        let aligned = inputs.iter().zip(&self.arrived).zip(&self.unread).all(
            |((input, &arrived), unread)| arrived || (input.is_finished() && unread.is_empty()),
        );
        if !aligned {
            return;
        }
        let stamp = self.clock.now_ns();
        self.append(DemoRecord::checkpoint(self.stream, id, stamp), stamp, out);
        self.position.set(self.log.end());
        self.snapshots.report(
            id,
            false,
            &TaskState::Binlog {
                position: self.log.end(),
            },
        );
        self.aligning = None;
        self.last_aligned = id;
        self.arrived.iter_mut().for_each(|a| *a = false);
    }

    /// Reads the next input round-robin that has records, skipping those blocked by the
    /// alignment; returns how many records it consumed (0: none had any).
    fn read_inputs(
        &mut self,
        inputs: &mut [Input<DemoRecord>],
        out: &mut Output<DemoRecord>,
    ) -> Result<usize, EngineError> {
        let n = inputs.len();
        for k in 0..n {
            let i = (self.next_input + k) % n;
            if self.arrived.get(i).copied().unwrap_or(true) {
                continue;
            }
            let Some(input) = inputs.get_mut(i) else {
                continue;
            };
            let read = self.read_input(i, input, out)?;
            if read > 0 {
                self.next_input = (i + 1) % n;
                self.try_align(inputs, out);
                return Ok(read);
            }
        }
        self.try_align(inputs, out);
        Ok(0)
    }
}

impl Operator for Binlog {
    type In = DemoRecord;
    type Out = DemoRecord;

    fn run(
        &mut self,
        inputs: &mut [Input<DemoRecord>],
        outputs: &mut [Output<DemoRecord>],
        _cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let status = self.step(inputs, outputs);
        // An input whose barrier arrived waits, unread, for the other inputs' barriers: held,
        // so that what it has queued meanwhile does not run the binlog every round.
        for (input, &arrived) in inputs.iter_mut().zip(&self.arrived) {
            input.hold(arrived);
        }
        status
    }
}

impl Binlog {
    fn step(
        &mut self,
        inputs: &mut [Input<DemoRecord>],
        outputs: &mut [Output<DemoRecord>],
    ) -> Result<Status, EngineError> {
        check_upstream(inputs)?;
        let out = single_output(outputs, "binlog", self.stream)?;
        if !self.started {
            self.started = true;
            self.unread = inputs.iter().map(|_| Cursor::default()).collect();
            self.arrived = vec![false; inputs.len()];
            let header = DemoRecord::stream_start(self.stream, self.log.end(), self.clock.now_ns());
            self.backlog.push_back(header);
        }
        let mut moved = 0;
        loop {
            if !drain_to(&mut self.backlog, out) {
                return Ok(Status::BlockedOnOutput);
            }
            if moved >= RECORD_BUDGET {
                return Ok(Status::Ready);
            }
            let read = self.read_inputs(inputs, out)?;
            if read == 0 && self.backlog.is_empty() {
                break;
            }
            moved += read;
        }
        let done = inputs
            .iter()
            .zip(&self.unread)
            .all(|(input, unread)| input.is_finished() && unread.is_empty());
        Ok(if done && self.aligning.is_none() {
            Status::Finished
        } else {
            Status::BlockedOnInput
        })
    }
}

// ---------------------------------------------------------------------------------------
// Receive
// ---------------------------------------------------------------------------------------

/// Receiver `stream`: reads its binlog's records (sealed batches when they crossed the
/// network), stamps `tracer[TRACE_RECEIVE]` and forwards them.
///
/// It counts the log positions it has read. The binlog's stream must begin with a
/// [`RecordKind::StreamStart`] header at exactly that
/// position (0, or the position restored from a checkpoint); anything else fails the task,
/// as records would be lost or repeated. At each checkpoint barrier it snapshots the
/// position.
#[derive(Debug)]
pub struct Receive {
    stream: u32,
    clock: UnixClock,
    /// The batch being read.
    cursor: Cursor,
    snapshots: Snapshots,
    position: u64,
    started: bool,
}

impl Receive {
    /// Receiver `stream`.
    pub fn new(stream: u32, clock: UnixClock, snapshots: Snapshots) -> Receive {
        Receive {
            stream,
            clock,
            cursor: Cursor::default(),
            snapshots,
            position: 0,
            started: false,
        }
    }

    /// Resumes from its saved position ([`TaskState::Receive`]): the binlog must serve from
    /// there.
    pub fn restore(&mut self, position: u64) {
        self.position = position;
    }

    /// Log positions read so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Checks a stream-start header at log position `position`: it must come first, and at
    /// exactly the position this receiver has read up to.
    fn start(&mut self, position: u64) -> Result<(), EngineError> {
        if self.started || position != self.position {
            return Err(EngineError::operator(format!(
                "receive {}: binlog serves from position {position} but this receiver has read up to {}{}",
                self.stream,
                self.position,
                if self.started {
                    " (a second stream start)"
                } else {
                    ""
                }
            )));
        }
        self.started = true;
        Ok(())
    }
}

impl Operator for Receive {
    type In = DemoRecord;
    type Out = DemoRecord;

    fn run(
        &mut self,
        inputs: &mut [Input<DemoRecord>],
        outputs: &mut [Output<DemoRecord>],
        _cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        check_upstream(inputs)?;
        let out = single_output(outputs, "receive", self.stream)?;
        let input = single_input(inputs, "receive", self.stream)?;
        // Records are stamped with the time their batch was first read in this invocation.
        let mut stamp = if self.cursor.is_empty() {
            0
        } else {
            self.clock.now_ns()
        };
        let mut moved = 0;
        loop {
            if self.cursor.refill(input) {
                stamp = self.clock.now_ns();
            }
            let Some(mut record) = self.cursor.peek() else {
                break;
            };
            if moved >= RECORD_BUDGET {
                return Ok(Status::Ready);
            }
            if record.record_kind() == Some(RecordKind::StreamStart) {
                self.start(record.pk)?;
                self.cursor.advance();
                continue;
            }
            if !self.started {
                return Err(EngineError::operator(format!(
                    "receive {}: the binlog stream did not begin with its start position",
                    self.stream
                )));
            }
            record.tracer[TRACE_RECEIVE] = stamp;
            if out.push(record).is_err() {
                return Ok(Status::BlockedOnOutput);
            }
            // Taken: only now does it count as read.
            self.cursor.advance();
            moved += 1;
            self.position += 1;
            if let Some(id) = record.checkpoint_id() {
                self.snapshots.report(
                    id,
                    false,
                    &TaskState::Receive {
                        position: self.position,
                    },
                );
            }
        }
        Ok(if input.is_finished() {
            Status::Finished
        } else {
            Status::BlockedOnInput
        })
    }
}

// ---------------------------------------------------------------------------------------
// Syncer
// ---------------------------------------------------------------------------------------

/// Syncer `stream`: passes records to its sink, stamping `tracer[TRACE_SYNCED]`, and holds
/// each DDL at the [`BarrierCoordinator`] until every stream has reached it.
///
/// **Per-table holding.** While DDL `(t, v)` waits, the syncer holds it and every later
/// record of table `t` (in order), but keeps passing the other tables' records. Holding the
/// whole stream would deadlock: each binlog merges its producers in its own order, so stream
/// 0 may meet DDL `(a, 1)` before DDL `(b, 1)` while stream 1 meets them the other way round,
/// and each would wait for the other. The guarantee the verifier checks is per table, and
/// per-table holding gives it. Held records are bounded by what the producers can emit while
/// the slowest stream catches up, because every producer also feeds that stream and blocks
/// on it.
///
/// **Stamps** are fresh clock readings: one at the start of each run, and a new one after
/// each barrier release. A stream passes (stamps) its records of table `t` older than DDL
/// `(t, v)` before it arrives at the barrier, and every record of `t` from `(t, v)` on is
/// stamped after the release, so `max synced(t, < v) <= min synced(t, >= v)` over all
/// streams.
#[derive(Debug)]
pub struct Syncer {
    stream: u32,
    barrier: Arc<BarrierCoordinator>,
    clock: UnixClock,
    /// Per held table: the waiting DDL first, then the table's later records.
    held: HashMap<u32, VecDeque<DemoRecord>>,
    /// Passed and stamped records not yet accepted by the output, in order.
    outbox: VecDeque<DemoRecord>,
    /// The batch being classified.
    cursor: Cursor,
    /// The coordinator generation at the last re-poll of the held tables.
    seen_generation: u64,
    /// The syncer finished normally (otherwise dropping it abandons the barrier).
    done: bool,
    snapshots: Snapshots,
    /// A checkpoint barrier that arrived while DDLs before it were held: it passes, and
    /// later records are taken, once nothing is held.
    barrier_record: Option<DemoRecord>,
}

impl Syncer {
    /// Syncer `stream` of the job whose syncers share `barrier`.
    pub fn new(
        stream: u32,
        barrier: Arc<BarrierCoordinator>,
        clock: UnixClock,
        snapshots: Snapshots,
    ) -> Syncer {
        Syncer {
            stream,
            barrier,
            clock,
            held: HashMap::new(),
            outbox: VecDeque::new(),
            cursor: Cursor::default(),
            seen_generation: u64::MAX,
            done: false,
            snapshots,
            barrier_record: None,
        }
    }

    /// Passes the checkpoint barrier and snapshots, once nothing before it is held.
    fn pass_barrier(&mut self, stamp: u64, out: &mut Output<DemoRecord>) {
        if !self.held.is_empty() {
            return;
        }
        if let Some(record) = self.barrier_record.take() {
            if let Some(id) = record.checkpoint_id() {
                let released = self.barrier.released();
                self.snapshots
                    .report(id, false, &TaskState::Syncer { released });
            }
            self.pass(record, stamp, out);
        }
    }

    /// Tables currently held at a barrier.
    pub fn held_tables(&self) -> usize {
        self.held.len()
    }

    /// Stamps `record` and forwards it (after what the outbox holds).
    fn pass(&mut self, mut record: DemoRecord, stamp: u64, out: &mut Output<DemoRecord>) {
        record.tracer[TRACE_SYNCED] = stamp;
        push_or_queue(out, &mut self.outbox, record);
    }

    fn poll(&self, ddl: &DemoRecord, cx: &Context<'_>) -> Result<Arrival, EngineError> {
        self.barrier
            .poll(ddl.table, ddl.version, self.stream, cx.waker())
            .map_err(|e| EngineError::operator(format!("syncer {}: {e}", self.stream)))
    }

    /// Routes one incoming record: held behind its table's DDL, held as a new DDL, or passed.
    fn classify(
        &mut self,
        record: DemoRecord,
        stamp: &mut u64,
        cx: &Context<'_>,
        out: &mut Output<DemoRecord>,
    ) -> Result<(), EngineError> {
        if record.checkpoint_id().is_some() {
            self.barrier_record = Some(record);
            self.pass_barrier(*stamp, out);
            return Ok(());
        }
        if !record.is_row() {
            return Err(EngineError::operator(format!(
                "syncer {}: unexpected record of kind {}",
                self.stream, record.kind
            )));
        }
        if !self.held.is_empty()
            && let Some(queue) = self.held.get_mut(&record.table)
        {
            queue.push_back(record);
            return Ok(());
        }
        if record.is_ddl() {
            match self.poll(&record, cx)? {
                Arrival::Passed => {
                    *stamp = self.clock.now_ns();
                    self.pass(record, *stamp, out);
                }
                Arrival::Waiting => {
                    self.held.insert(record.table, VecDeque::from([record]));
                }
            }
        } else {
            self.pass(record, *stamp, out);
        }
        Ok(())
    }

    /// Re-polls every held table's DDL; passes the released ones and what follows them up
    /// to the table's next DDL (which is polled in turn).
    fn release_ready(
        &mut self,
        stamp: &mut u64,
        cx: &Context<'_>,
        out: &mut Output<DemoRecord>,
    ) -> Result<(), EngineError> {
        let tables: Vec<u32> = self.held.keys().copied().collect();
        for table in tables {
            let Some(mut queue) = self.held.remove(&table) else {
                continue;
            };
            while let Some(&ddl) = queue.front() {
                if self.poll(&ddl, cx)? == Arrival::Waiting {
                    break;
                }
                *stamp = self.clock.now_ns();
                queue.pop_front();
                self.pass(ddl, *stamp, out);
                while let Some(&record) = queue.front().filter(|r| !r.is_ddl()) {
                    queue.pop_front();
                    self.pass(record, *stamp, out);
                }
            }
            if !queue.is_empty() {
                self.held.insert(table, queue);
            }
        }
        self.pass_barrier(*stamp, out);
        Ok(())
    }
}

impl Operator for Syncer {
    type In = DemoRecord;
    type Out = DemoRecord;

    fn run(
        &mut self,
        inputs: &mut [Input<DemoRecord>],
        outputs: &mut [Output<DemoRecord>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        check_upstream(inputs)?;
        let out = single_output(outputs, "syncer", self.stream)?;
        let input = single_input(inputs, "syncer", self.stream)?;
        let mut stamp = self.clock.now_ns();
        let generation = self.barrier.generation();
        if generation != self.seen_generation && !self.held.is_empty() {
            self.release_ready(&mut stamp, cx, out)?;
        }
        self.seen_generation = generation;
        let mut moved = 0;
        loop {
            if !drain_to(&mut self.outbox, out) {
                return Ok(Status::BlockedOnOutput);
            }
            if moved >= RECORD_BUDGET {
                return Ok(Status::Ready);
            }
            if self.barrier_record.is_some() {
                // Held DDLs before a checkpoint barrier: take nothing after it. Their release
                // wakes us (see `crate::checkpoint` for why it always comes).
                return Ok(Status::Idle);
            }
            self.cursor.refill(input);
            let Some(record) = self.cursor.peek() else {
                break;
            };
            self.cursor.advance();
            moved += 1;
            self.classify(record, &mut stamp, cx, out)?;
        }
        if !input.is_finished() {
            return Ok(Status::BlockedOnInput);
        }
        if self.held.is_empty() {
            self.done = true;
            self.barrier.leave(self.stream);
            return Ok(Status::Finished);
        }
        // Input ended with DDLs still held: the release wakes us.
        Ok(Status::Idle)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        if !self.done {
            // Failed, cancelled or never run: the other syncers must not wait for us.
            self.barrier.abandon(self.stream);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sink
// ---------------------------------------------------------------------------------------

/// A latency histogram (ns, `sink − produced` of data rows) shared between a sink and
/// whoever reports on it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LatencyHandle(Arc<Mutex<Histogram<u64>>>);

impl LatencyHandle {
    /// An empty histogram (3 significant digits, growing as needed).
    pub fn new() -> LatencyHandle {
        LatencyHandle(Arc::new(Mutex::new(new_histogram())))
    }

    /// A copy of the histogram as it is now.
    pub fn snapshot(&self) -> Histogram<u64> {
        self.lock().clone()
    }

    /// Records counted so far.
    pub fn len(&self) -> u64 {
        self.lock().len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn merge(&self, local: &Histogram<u64>) -> Result<(), EngineError> {
        self.lock()
            .add(local)
            .map_err(|e| EngineError::operator(format!("merging latency histograms: {e:?}")))
    }

    fn lock(&self) -> MutexGuard<'_, Histogram<u64>> {
        // A histogram is valid after any completed call; a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for LatencyHandle {
    fn default() -> Self {
        LatencyHandle::new()
    }
}

/// An auto-resizing ns histogram with 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    let mut histogram = Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, 3)
        // Invariant: the bounds are constants satisfying 1 <= low, high >= 2·low, sigfig <= 5.
        .expect("constant histogram bounds are valid");
    histogram.auto(true);
    histogram
}

/// Sink `stream`: writes one CSV line per record ([`SinkRow::write_to`]) to its file,
/// measures `sink − produced` latency of data rows into a [`LatencyHandle`] (published every
/// [`PUBLISH_EVERY`] and at the end), and at each checkpoint barrier has the file made
/// durable before its snapshot (file length and rows) is reported.
///
/// The sink itself never touches the file: it formats rows into buffers and hands them to
/// its [`SinkWriter`] thread (see [`crate::sinkwriter`] for why), which claims the file
/// (creating it and its directory, keeping only the committed prefix), appends, fsyncs at
/// checkpoints and at the end, and writes the stage breakdown. A row's `sink_ns` is when the
/// sink took it. While the writer's queue is full the sink takes no input. It finishes once
/// the writer has fsynced everything. I/O errors fail the task.
#[derive(Debug)]
pub struct Sink {
    stream: u32,
    path: PathBuf,
    clock: UnixClock,
    /// The job and attempt the sink writes for (see [`crate::fence`]).
    owner: Owner,
    /// The job's number of streams (see [`WriterTarget::streams`]).
    streams: u32,
    /// Started on the first invocation (it needs the task's waker).
    writer: Option<SinkWriter>,
    /// Formatted rows not yet handed to the writer.
    buf: Vec<u8>,
    /// The batch being formatted (its rest waits here while the writer's queue is full).
    cursor: Cursor,
    local: Histogram<u64>,
    latency: LatencyHandle,
    rows: u64,
    /// Per-stage latency of every [`STAGE_SAMPLE_EVERY`]-th data row: produced→binlog,
    /// binlog→receive, receive→synced, synced→sink (ns), from the records' time tracer.
    stages: [Histogram<u64>; 4],
    /// Data rows seen, for sampling `stages`.
    data_rows: u64,
    snapshots: Snapshots,
    /// Bytes of the file including `buf` (the restored prefix included).
    length: u64,
    /// Length to keep when claiming the file (restored from a checkpoint).
    keep: u64,
    /// The end was handed to the writer; the sink finishes when the writer did.
    finish_sent: bool,
    /// When the latency histogram was last published.
    published_at: Option<Instant>,
}

/// How often a sink publishes its latency histogram while running.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// A sink records the per-stage breakdown ([`stages_path`]) of every this many data rows
/// (the first, the ninth, ...). Recording a row's four stages cost as much as formatting its
/// CSV line (~9 % of a sink executor's engine thread at 1 M records/s); a sample of one in
/// eight still holds hundreds of thousands of rows per run. End-to-end latency is measured
/// on every row.
pub const STAGE_SAMPLE_EVERY: u64 = 8;

/// Names of the stages a sink breaks latency into, in tracer order.
pub const STAGES: [&str; 4] = [
    "producer->binlog",
    "binlog->receive",
    "receive->syncer",
    "syncer->sink",
];

/// Where a sink writes its per-stage breakdown: next to its data file, `<file>.stages`.
pub fn stages_path(sink_path: &std::path::Path) -> PathBuf {
    let mut p = sink_path.as_os_str().to_owned();
    p.push(".stages");
    PathBuf::from(p)
}

impl Sink {
    /// Sink `stream` of a job with `streams` streams, writing to `path` for `owner` (the job
    /// and its attempt), reporting latency into `latency`.
    pub fn new(
        stream: u32,
        path: PathBuf,
        owner: Owner,
        streams: u32,
        clock: UnixClock,
        latency: LatencyHandle,
        snapshots: Snapshots,
    ) -> Sink {
        Sink {
            stream,
            path,
            owner,
            streams,
            clock,
            writer: None,
            buf: Vec::new(),
            cursor: Cursor::default(),
            local: new_histogram(),
            latency,
            rows: 0,
            stages: [
                new_histogram(),
                new_histogram(),
                new_histogram(),
                new_histogram(),
            ],
            data_rows: 0,
            snapshots,
            length: 0,
            keep: 0,
            finish_sent: false,
            published_at: None,
        }
    }

    /// Resumes from its saved state ([`TaskState::Sink`]): the file is cut back to the
    /// committed length when claimed.
    pub fn restore(&mut self, length: u64, rows: u64) {
        self.keep = length;
        self.length = length;
        self.rows = rows;
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Starts the writer thread on the first invocation.
    fn start_writer(&mut self, cx: &Context<'_>) -> Result<&SinkWriter, EngineError> {
        let writer = match &mut self.writer {
            Some(w) => w,
            none => {
                let target = WriterTarget {
                    stream: self.stream,
                    path: self.path.clone(),
                    owner: self.owner,
                    keep: self.keep,
                    streams: self.streams,
                };
                let waker: Arc<dyn Notify> = Arc::new(cx.waker().clone());
                let w = SinkWriter::start(target, self.snapshots.clone(), waker, QUEUE_BUFFERS)?;
                self.buf = w.buffer();
                none.insert(w)
            }
        };
        if let Some(reason) = writer.failure() {
            return Err(EngineError::operator(reason));
        }
        Ok(writer)
    }

    /// Hands `buf` and `after` to the writer; false (nothing changed) if its queue is full.
    fn hand_over(&mut self, after: After) -> Result<bool, EngineError> {
        let Some(writer) = self.writer.as_ref() else {
            return Err(EngineError::operator("sink writer is not started"));
        };
        let data = std::mem::take(&mut self.buf);
        match writer.offer(Job { data, after })? {
            Offer::Taken => {
                self.buf = writer.buffer();
                Ok(true)
            }
            Offer::Full(job) => {
                self.buf = job.data;
                Ok(false)
            }
        }
    }

    /// Appends `record`'s line to `buf` and measures it.
    fn format(&mut self, mut record: DemoRecord, now_ns: u64) -> Result<(), EngineError> {
        if !record.is_row() {
            return Err(EngineError::operator(format!(
                "sink {}: unexpected record of kind {}",
                self.stream, record.kind
            )));
        }
        record.tracer[TRACE_SINK] = now_ns;
        let kind = if record.is_ddl() {
            RowKind::Ddl
        } else {
            self.local
                .saturating_record(now_ns.saturating_sub(record.tracer[TRACE_PRODUCED]));
            if self.data_rows.is_multiple_of(STAGE_SAMPLE_EVERY) {
                let t = &record.tracer;
                let steps = [
                    (TRACE_PRODUCED, TRACE_BINLOG),
                    (TRACE_BINLOG, TRACE_RECEIVE),
                    (TRACE_RECEIVE, TRACE_SYNCED),
                    (TRACE_SYNCED, TRACE_SINK),
                ];
                for (h, (from, to)) in self.stages.iter_mut().zip(steps) {
                    h.saturating_record(t[to].saturating_sub(t[from]).max(1));
                }
            }
            self.data_rows += 1;
            RowKind::Data
        };
        let row = SinkRow {
            kind,
            table_id: record.table,
            schema_ver: u64::from(record.version),
            pk: record.pk,
            produced_ns: record.tracer[TRACE_PRODUCED],
            synced_ns: record.tracer[TRACE_SYNCED],
            sink_ns: now_ns,
        };
        let before = self.buf.len();
        row.write_to(&mut self.buf);
        self.length += (self.buf.len() - before) as u64;
        self.rows += 1;
        Ok(())
    }

    /// Merges the local histogram into the shared one — at most every [`PUBLISH_EVERY`]
    /// (a merge walks every bucket: per invocation it would cost more than the rows), and
    /// always at the end.
    fn publish_latency(&mut self, now: Instant, last: bool) -> Result<(), EngineError> {
        if !last && self.published_at.is_some_and(|at| now < at + PUBLISH_EVERY) {
            return Ok(());
        }
        self.published_at = Some(now);
        if !self.local.is_empty() {
            self.latency.merge(&self.local)?;
            self.local.reset();
        }
        Ok(())
    }

    /// The per-stage breakdown: one line per stage with count and p50, p90, p99, p99.9 and
    /// max in µs.
    fn stages_text(&self) -> String {
        let mut text = String::from("stage count p50_us p90_us p99_us p999_us max_us\n");
        for (name, h) in STAGES.iter().zip(&self.stages) {
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            text.push_str(&format!(
                "{name} {} {:.1} {:.1} {:.1} {:.1} {:.1}\n",
                h.len(),
                us(0.5),
                us(0.9),
                us(0.99),
                us(0.999),
                h.max() as f64 / 1000.0
            ));
        }
        text
    }
}

impl Operator for Sink {
    type In = DemoRecord;
    type Out = ();

    fn run(
        &mut self,
        inputs: &mut [Input<DemoRecord>],
        _outputs: &mut [Output<()>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        check_upstream(inputs)?;
        let finished = self.start_writer(cx)?.is_finished();
        if self.finish_sent {
            return Ok(if finished {
                Status::Finished
            } else {
                Status::Idle
            });
        }
        let input = single_input(inputs, "sink", self.stream)?;
        // A row's sink time is when its batch was first formatted in this invocation.
        let mut now_ns = if self.cursor.is_empty() {
            0
        } else {
            self.clock.now_ns()
        };
        let mut handled = 0;
        let status = loop {
            if self.buf.len() >= BUFFER_BYTES && !self.hand_over(After::Nothing)? {
                // The writer wakes this task when its queue has room.
                break Status::Idle;
            }
            if self.cursor.refill(input) {
                now_ns = self.clock.now_ns();
            }
            let Some(record) = self.cursor.peek() else {
                break if input.is_finished() {
                    Status::Finished
                } else {
                    Status::BlockedOnInput
                };
            };
            if handled >= RECORD_BUDGET {
                break Status::Ready;
            }
            if let Some(checkpoint) = record.checkpoint_id() {
                let state = TaskState::Sink {
                    length: self.length,
                    rows: self.rows,
                };
                if !self.hand_over(After::Checkpoint { checkpoint, state })? {
                    break Status::Idle;
                }
                self.cursor.advance();
                continue;
            }
            self.cursor.advance();
            self.format(record, now_ns)?;
            handled += 1;
        };
        self.publish_latency(cx.now(), status == Status::Finished)?;
        if status != Status::Finished {
            return Ok(status);
        }
        let after = After::Finish {
            stages_path: stages_path(&self.path),
            stages: self.stages_text(),
        };
        if self.hand_over(after)? {
            self.finish_sent = true;
        }
        // Finished once the writer has made everything durable (it wakes this task).
        Ok(Status::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use microcosm_engine::{EdgeConfig, OwnedBatch, edge};

    #[test]
    fn a_cursor_reads_batches_in_order_skips_empty_ones_and_lets_each_go_when_read() {
        let (mut out, mut input) = edge::<DemoRecord>(&EdgeConfig::default()).unwrap();
        let record = |pk| DemoRecord::data(1, 0, pk, 0);
        let batch = |pks: &[u64]| {
            Batch::Owned(OwnedBatch::from_vec(
                pks.iter().map(|&pk| record(pk)).collect(),
            ))
        };
        for pks in [&[][..], &[1, 2], &[], &[3]] {
            assert!(out.push_batch(batch(pks)).is_ok());
        }
        let mut cursor = Cursor::default();
        assert!(cursor.is_empty() && cursor.peek().is_none());
        let mut read = Vec::new();
        while cursor.refill(&mut input) || !cursor.is_empty() {
            assert!(
                !cursor.refill(&mut input),
                "a batch with records left is kept"
            );
            let next = cursor.peek().unwrap();
            assert_eq!(cursor.peek(), Some(next), "peeking does not consume");
            cursor.advance();
            read.push(next.pk);
            if cursor.is_empty() {
                assert!(cursor.batch.is_none(), "a read batch is dropped at once");
            }
        }
        assert_eq!(read, [1, 2, 3]);
        assert!(!cursor.refill(&mut input));
    }

    #[test]
    fn log_keeps_positions_and_bounded_history() {
        let mut log = BinlogLog::new(3);
        for pk in 0..5 {
            assert_eq!(log.append(DemoRecord::data(0, 0, pk, 0)), pk);
        }
        assert_eq!((log.start(), log.end()), (2, 5));
        let pks: Vec<u64> = log.read_from(3).unwrap().map(|r| r.pk).collect();
        assert_eq!(pks, vec![3, 4]);
        assert!(log.read_from(1).is_none(), "dropped");
        assert!(log.read_from(6).is_none(), "beyond the end");
        assert_eq!(log.read_from(5).unwrap().count(), 0);
        log.truncate_before(4);
        assert_eq!((log.start(), log.end()), (4, 5));
        log.truncate_before(100);
        assert_eq!((log.start(), log.end()), (5, 5));
    }

    #[test]
    fn log_reserves_its_retention_up_front_and_never_grows() {
        for mut log in [BinlogLog::new(1000), BinlogLog::starting_at(77, 1000)] {
            let reserved = log.capacity();
            assert!(reserved >= 1000, "reserved {reserved}");
            for pk in 0..5000 {
                log.append(DemoRecord::data(0, 0, pk, 0));
            }
            assert_eq!(
                log.capacity(),
                reserved,
                "appending past the retention reallocated"
            );
            assert_eq!(log.end() - log.start(), 1000);
        }
    }

    /// A binlog whose barrier arrived on one input waits for the other's without being run
    /// again for the records queued behind the barrier, and reads them once it aligned.
    #[test]
    fn a_binlog_waiting_for_a_barrier_sleeps_and_wakes_on_the_missing_one() {
        use microcosm_engine::{Clock, ManualClock, TaskSpec, Worker};
        let clock = ManualClock::new();
        let (events, _rx) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(clock.clone()), events);
        let config = EdgeConfig {
            capacity: 16,
            batch_size: 1,
            ..EdgeConfig::default()
        };
        let (mut out0, in0) = edge::<DemoRecord>(&config).unwrap();
        let (mut out1, in1) = edge::<DemoRecord>(&config).unwrap();
        let (out, mut logged) = edge::<DemoRecord>(&config).unwrap();
        let binlog = Binlog::new(
            0,
            UnixClock::new(Arc::new(clock.clone())),
            Snapshots::in_memory(0).0,
        );
        worker
            .handle()
            .spawn(
                TaskSpec::new("binlog", binlog)
                    .input(in0)
                    .input(in1)
                    .output(out),
            )
            .unwrap();
        let push = |out: &mut Output<DemoRecord>, record| {
            let batch = Batch::Owned(OwnedBatch::from_vec(vec![record]));
            assert!(out.push_batch(batch).is_ok());
        };
        push(&mut out0, DemoRecord::checkpoint(0, 5, 0));
        push(&mut out0, DemoRecord::data(0, 0, 1, 0));
        let now = clock.now();
        let mut settled = false;
        for _ in 0..10 {
            if !worker.step(now).runnable {
                settled = true;
                break;
            }
        }
        assert!(settled, "the binlog is run again and again while it waits");
        assert_eq!(
            worker.step(now).ran,
            0,
            "nothing to run until input 1 moves"
        );

        push(&mut out1, DemoRecord::checkpoint(1, 5, 0));
        for _ in 0..10 {
            if !worker.step(now).runnable {
                break;
            }
        }
        let mut kinds = Vec::new();
        while let Some(batch) = logged.pop() {
            let batch = batch.into_owned().unwrap();
            kinds.extend(batch.iter().map(|r| (r.checkpoint_id(), r.is_row())));
        }
        // The stream header, the aligned barrier, then the record queued behind it.
        assert_eq!(kinds[1..], [(Some(5), false), (None, true)], "{kinds:?}");
    }

    /// Producer `table` of `table_num` sharing `rate` records/s.
    fn paced_producer(table_num: u32, rate: u64, table: u32) -> Producer {
        let spec = DemoSpec {
            table_num,
            rate,
            ..DemoSpec::default()
        };
        Producer::new(&spec, table, UnixClock::system(), Snapshots::in_memory(0).0)
    }

    /// An engine drain stops a producer that has records left by failing it: its consumers
    /// see an aborted stream, never one that ended as if complete.
    #[test]
    fn a_drained_producer_aborts_its_streams() {
        use microcosm_engine::{Engine, EngineConfig, TaskSpec};
        let spec = DemoSpec {
            table_num: 1,
            binlog_num: 1,
            rcd_cnt: 1_000,
            rate: 100,
            ..DemoSpec::default()
        };
        let producer = Producer::new(&spec, 0, UnixClock::system(), Snapshots::in_memory(0).0);
        let (out, input) = edge::<DemoRecord>(&EdgeConfig::default()).unwrap();
        let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
        engine
            .spawn(TaskSpec::new("producer", producer).output(out))
            .unwrap();
        engine.shutdown(Duration::from_secs(5));
        assert!(
            input.upstream_aborted(),
            "10 s of records were not all sent"
        );
        assert!(!input.is_finished());
    }

    #[test]
    fn producer_paces_records_by_their_intended_times() {
        let p = paced_producer(4, 1_000, 0);
        // 4 producers sharing 1000 records/s: 4 ms apart each.
        assert_eq!(p.offset_ns(1), Some(0));
        assert_eq!(p.offset_ns(2), Some(4_000_000));
        assert_eq!(p.offset_ns(251), Some(1_000_000_000));
        // Producer 3 runs 3 ms behind producer 0.
        let p3 = paced_producer(4, 1_000, 3);
        assert_eq!(p3.offset_ns(1), Some(3_000_000));
        assert_eq!(p3.offset_ns(2), Some(7_000_000));
        // A product past u64 (2·10¹⁰ × 10⁹) takes the u128 path; the quotient still fits.
        let far = 5_000_000_001;
        assert_eq!(p.offset_ns(far), Some(5_000_000_000 * 4_000_000));
        assert_eq!(paced_producer(4, 0, 0).offset_ns(2), None);
    }

    #[test]
    fn producers_together_offer_one_record_every_one_over_rate() {
        // 7 producers at 100k records/s in total: the union of their schedules is one
        // record every 10 µs, in table order (record k at k × 10 µs), not 7 at once.
        let producers: Vec<Producer> = (0..7).map(|t| paced_producer(7, 100_000, t)).collect();
        let mut offsets: Vec<u64> = producers
            .iter()
            .flat_map(|p| (1..=50).map(|pk| p.offset_ns(pk).unwrap()))
            .collect();
        offsets.sort_unstable();
        let expected: Vec<u64> = (0..350).map(|k| k * 10_000).collect();
        assert_eq!(offsets, expected);
    }
}
