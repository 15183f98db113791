//! The record that flows through the demo pipeline, and the clock that stamps it.
//!
//! A [`DemoRecord`] is plain fixed-size data (no heap), so it is `Copy`, archives to a
//! fixed 104-byte rkyv layout, and can be read in place from a sealed network batch
//! ([`DemoRecord::from_archived`]). Each stage writes the Unix-ns time it handled the record
//! into its slot of [`DemoRecord::tracer`] (see the `TRACE_*` constants), taken from one
//! [`UnixClock`] so stamps of different tasks in a process are comparable.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use microcosm_engine::{Clock, SystemClock};

/// Tracer slot: when the producer *intended* to emit the record (open-loop pacing).
pub const TRACE_PRODUCED: usize = 0;
/// Tracer slot: when the binlog appended the record.
pub const TRACE_BINLOG: usize = 1;
/// Tracer slot: when the receiver read the record.
pub const TRACE_RECEIVE: usize = 2;
/// Tracer slot: when the syncer passed the record (after the barrier, for a DDL).
pub const TRACE_SYNCED: usize = 3;
/// Tracer slot: when the sink wrote the record.
pub const TRACE_SINK: usize = 4;
/// Tracer slot left free for experiments.
pub const TRACE_SPARE: usize = 5;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A row of a table.
    Data,
    /// A schema change of a table: every stream carries it, and the syncers hold it at the
    /// barrier.
    Ddl,
    /// A checkpoint barrier: `pk` is the checkpoint id, `table` the producer that sent it
    /// (binlogs re-send it aligned, with their stream as `table`). Never written to a sink.
    Checkpoint,
    /// The first record of a binlog's output: `pk` is the log position it serves from, so
    /// the receiver can check it resumes where its checkpoint says. Never written to a sink.
    StreamStart,
}

impl RecordKind {
    /// The byte stored in [`DemoRecord::kind`].
    pub fn as_u8(self) -> u8 {
        match self {
            RecordKind::Data => 0,
            RecordKind::Ddl => 1,
            RecordKind::Checkpoint => 2,
            RecordKind::StreamStart => 3,
        }
    }

    /// Parses a stored kind byte; `None` for anything but 0 to 3.
    pub fn from_u8(byte: u8) -> Option<RecordKind> {
        match byte {
            0 => Some(RecordKind::Data),
            1 => Some(RecordKind::Ddl),
            2 => Some(RecordKind::Checkpoint),
            3 => Some(RecordKind::StreamStart),
            _ => None,
        }
    }
}

/// One record of the demo pipeline: a data row or a DDL of table `table`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct DemoRecord {
    /// The table (= producer) id.
    pub table: u32,
    /// The table's schema version the record carries; for a DDL the new version.
    pub version: u32,
    /// [`RecordKind`] as a byte (0 data, 1 DDL, 2 checkpoint barrier, 3 stream start); see
    /// [`DemoRecord::record_kind`].
    pub kind: u8,
    /// The data row's pk; for a DDL the pk of the data record that follows it.
    pub pk: u64,
    /// Unix-ns stamps per stage, indexed by the `TRACE_*` constants; 0 = not stamped.
    pub tracer: [u64; 6],
    /// Filler standing in for row contents (derived from table and pk).
    pub payload: [u8; 32],
}

impl DemoRecord {
    /// A data record of `table` at `version` with `pk`, stamped as produced at
    /// `produced_ns`.
    pub fn data(table: u32, version: u32, pk: u64, produced_ns: u64) -> DemoRecord {
        DemoRecord::new(RecordKind::Data, table, version, pk, produced_ns)
    }

    /// A DDL moving `table` to `version` just before data record `pk`.
    pub fn ddl(table: u32, version: u32, pk: u64, produced_ns: u64) -> DemoRecord {
        DemoRecord::new(RecordKind::Ddl, table, version, pk, produced_ns)
    }

    /// Checkpoint barrier `checkpoint` sent by `origin` (a producer's table, or a binlog's
    /// stream once aligned).
    pub fn checkpoint(origin: u32, checkpoint: u64, stamp_ns: u64) -> DemoRecord {
        DemoRecord::new(RecordKind::Checkpoint, origin, 0, checkpoint, stamp_ns)
    }

    /// The header of binlog `stream`'s output: it serves from log position `position`.
    pub fn stream_start(stream: u32, position: u64, stamp_ns: u64) -> DemoRecord {
        DemoRecord::new(RecordKind::StreamStart, stream, 0, position, stamp_ns)
    }

    fn new(kind: RecordKind, table: u32, version: u32, pk: u64, produced_ns: u64) -> DemoRecord {
        let mut payload = [0u8; 32];
        payload[..8].copy_from_slice(&pk.to_le_bytes());
        payload[8..12].copy_from_slice(&table.to_le_bytes());
        let mut tracer = [0; 6];
        tracer[TRACE_PRODUCED] = produced_ns;
        DemoRecord {
            table,
            version,
            kind: kind.as_u8(),
            pk,
            tracer,
            payload,
        }
    }

    /// The kind; an unknown kind byte (only possible from foreign bytes) reads as `None`.
    pub fn record_kind(&self) -> Option<RecordKind> {
        RecordKind::from_u8(self.kind)
    }

    /// Whether this is a DDL record.
    pub fn is_ddl(&self) -> bool {
        self.kind == RecordKind::Ddl.as_u8()
    }

    /// The checkpoint id if this is a checkpoint barrier.
    pub fn checkpoint_id(&self) -> Option<u64> {
        (self.kind == RecordKind::Checkpoint.as_u8()).then_some(self.pk)
    }

    /// Whether this is a table row or DDL (what sinks write), not a control record.
    pub fn is_row(&self) -> bool {
        self.kind <= RecordKind::Ddl.as_u8()
    }

    /// Copies a record out of a sealed (archived, already validated) batch, field by field.
    pub fn from_archived(archived: &ArchivedDemoRecord) -> DemoRecord {
        DemoRecord {
            table: archived.table.to_native(),
            version: archived.version.to_native(),
            kind: archived.kind,
            pk: archived.pk.to_native(),
            tracer: archived.tracer.each_ref().map(|t| t.to_native()),
            payload: archived.payload,
        }
    }
}

/// Converts engine-clock instants to Unix nanoseconds, and reads the time afresh.
///
/// Built once per process (or per started job) and shared by every task it starts, so the
/// mapping is identical for all of them: the barrier check compares `synced` stamps of
/// different syncers, which must therefore come from the same mapping of the same monotonic
/// clock.
#[derive(Clone)]
pub struct UnixClock {
    clock: Arc<dyn Clock>,
    base_instant: Instant,
    base_unix_ns: u64,
}

impl UnixClock {
    /// A mapping anchored now, reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> UnixClock {
        let base_instant = clock.now();
        let base_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        UnixClock {
            clock,
            base_instant,
            base_unix_ns,
        }
    }

    /// A mapping over the real monotonic clock.
    pub fn system() -> UnixClock {
        UnixClock::new(Arc::new(SystemClock))
    }

    /// Unix ns of `instant` (instants before the anchor map below the anchor, saturating
    /// at 0).
    pub fn unix_ns(&self, instant: Instant) -> u64 {
        match instant.checked_duration_since(self.base_instant) {
            Some(after) => self
                .base_unix_ns
                .saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX)),
            None => {
                let before = self.base_instant.saturating_duration_since(instant);
                self.base_unix_ns
                    .saturating_sub(u64::try_from(before.as_nanos()).unwrap_or(u64::MAX))
            }
        }
    }

    /// The clock's current instant.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The instant whose Unix time is `unix_ns` under this mapping (saturating at the
    /// clock's representable range).
    pub fn instant_of(&self, unix_ns: u64) -> Instant {
        let anchor = self.base_instant;
        if unix_ns >= self.base_unix_ns {
            let after = std::time::Duration::from_nanos(unix_ns - self.base_unix_ns);
            anchor.checked_add(after).unwrap_or(anchor)
        } else {
            let before = std::time::Duration::from_nanos(self.base_unix_ns - unix_ns);
            anchor.checked_sub(before).unwrap_or(anchor)
        }
    }

    /// The current time in Unix ns (a fresh clock reading).
    pub fn now_ns(&self) -> u64 {
        self.unix_ns(self.clock.now())
    }
}

impl std::fmt::Debug for UnixClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixClock")
            .field("base_unix_ns", &self.base_unix_ns)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use microcosm_engine::{ManualClock, OwnedBatch, SealedBatch};
    use rkyv::util::AlignedVec;

    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_bytes_are_rejected() {
        for kind in [
            RecordKind::Data,
            RecordKind::Ddl,
            RecordKind::Checkpoint,
            RecordKind::StreamStart,
        ] {
            assert_eq!(RecordKind::from_u8(kind.as_u8()), Some(kind));
        }
        assert_eq!(RecordKind::from_u8(4), None);
        assert_eq!(DemoRecord::checkpoint(3, 9, 0).checkpoint_id(), Some(9));
        assert!(!DemoRecord::checkpoint(3, 9, 0).is_row());
        assert!(DemoRecord::ddl(1, 2, 3, 4).is_row() && DemoRecord::data(1, 2, 3, 4).is_row());
        assert!(DemoRecord::ddl(1, 2, 3, 4).is_ddl());
        assert!(!DemoRecord::data(1, 2, 3, 4).is_ddl());
    }

    #[test]
    fn archived_batches_read_back_equal_and_are_about_120_bytes_per_record() {
        let records: Vec<DemoRecord> = (0..100u64)
            .map(|pk| {
                let mut r = DemoRecord::data(7, 3, pk, 1_700_000_000_000_000_000 + pk);
                r.tracer[TRACE_SYNCED] = u64::MAX - pk;
                r
            })
            .collect();
        let sealed = OwnedBatch::from_vec(records.clone()).seal().unwrap();
        let per_record = sealed.as_bytes().len() / records.len();
        assert!((96..=128).contains(&per_record), "{per_record} bytes");
        let mut wire = AlignedVec::<16>::new();
        wire.extend_from_slice(sealed.as_bytes());
        let received = SealedBatch::<DemoRecord>::from_bytes(wire).unwrap();
        let back: Vec<DemoRecord> = received
            .records()
            .iter()
            .map(DemoRecord::from_archived)
            .collect();
        assert_eq!(back, records);
    }

    #[test]
    fn unix_clock_maps_instants_linearly() {
        let manual = ManualClock::new();
        let clock = UnixClock::new(Arc::new(manual.clone()));
        let t0 = clock.now_ns();
        manual.advance(Duration::from_micros(5));
        assert_eq!(clock.now_ns() - t0, 5_000);
        let earlier = manual.start();
        assert_eq!(clock.unix_ns(earlier), t0);
        assert_eq!(
            clock.instant_of(t0 + 5_000),
            manual.start() + Duration::from_micros(5)
        );
        assert_eq!(clock.unix_ns(clock.instant_of(t0 - 1_000)), t0 - 1_000);
        assert!(t0 > 1_600_000_000_000_000_000, "anchored at the real time");
    }
}
