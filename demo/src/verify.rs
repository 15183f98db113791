//! The verifier: reads a finished demo job's sink files and checks what the pipeline
//! promises.
//!
//! [`verify`] streams `sink_<i>.csv` for every stream `i` line by line and checks:
//!
//! - **exactly once**: every `(table, pk)` with `pk` in `1..=rcd-cnt` appears once as a data
//!   row over all files (missing rows and duplicates are counted, with examples); rows for
//!   unknown tables or pks are violations;
//! - **versions**: a data row carries version `pk / ddl-freq`; a DDL row is one of the
//!   expected `(table, version, pk = version × ddl-freq)`;
//! - **per stream**: every stream has exactly one DDL row per expected `(table, version)`;
//!   a table's data pks strictly increase; a data row carries the version of the latest DDL
//!   the stream delivered for its table (a DDL reaches every stream before the data it
//!   precedes);
//! - **the barrier**: for every `(t, v)`, every row of table `t` with version `< v` was
//!   synced no later than any row of table `t` with version `≥ v`, on any stream:
//!   `max synced_ns(t, < v) <= min synced_ns(t, ≥ v)`. Equal timestamps are accepted: a
//!   clock can return the same reading twice, so a tie proves nothing either way. The check
//!   keeps a min/max of `synced_ns` per `(table, version)` and compares a prefix maximum with
//!   a suffix minimum, so it is linear in the number of versions;
//! - **format**: every line parses ([`SinkRow::parse`]), is UTF-8, ends with `\n` and is at
//!   most [`MAX_LINE_LEN`] bytes long;
//! - **one writer**: the files' fences ([`crate::fence`]) name the same job attempt (the
//!   report names it, so output left by an earlier run of the same flow is told apart).
//!
//! Data problems are collected in the [`Report`] (the first [`MAX_REPORTED_VIOLATIONS`] in
//! discovery order, plus the total); [`VerifyError`] is only for trouble reading the
//! directory or a file. Timestamps are compared as given: the barrier check assumes the
//! syncers' clocks are comparable (one host, or synchronized clocks). Latency
//! (`sink_ns − produced_ns`) is not checked, only measured; rows whose sink time precedes
//! their produced time (clock skew between hosts) are counted and recorded as 0.
//!
//! Memory is one bit per expected data row, one bit per expected DDL per table, and 16 bytes
//! per (table, version); [`verify`] refuses specs needing more than [`MEMORY_LIMIT_BYTES`].

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use crate::fence::Owner;
use crate::sinkfile::{LineRead, RowError, RowKind, SinkRow, read_line_bounded};
use crate::spec::{DemoSpec, SpecError, sink_file_in};

/// How many violations a [`Report`] keeps (the total is always counted).
pub const MAX_REPORTED_VIOLATIONS: usize = 10;

/// How many missing / duplicate `(table, pk)` examples a [`Report`] keeps.
pub const MAX_EXAMPLES: usize = 5;

/// Longest accepted sink line, newline excluded. Real lines are under 150 bytes.
pub const MAX_LINE_LEN: usize = 4096;

/// Largest amount of bookkeeping memory [`verify`] will allocate.
pub const MEMORY_LIMIT_BYTES: u64 = 4 << 30;

/// Why verification could not run at all. Problems in the data are [`Violation`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The spec does not validate.
    #[error("the demo spec is invalid: {0}")]
    Spec(#[from] SpecError),
    /// The sink directory is missing or cannot be listed.
    #[error("cannot read sink directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The sink directory path exists but is not a directory.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A sink file exists but cannot be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The spec is so large that verifying it would need too much memory.
    #[error(
        "verifying this spec needs about {needed_bytes} bytes of bookkeeping, more than the {limit_bytes}-byte limit"
    )]
    TooLarge {
        /// Estimated bytes needed.
        needed_bytes: u128,
        /// The limit, [`MEMORY_LIMIT_BYTES`].
        limit_bytes: u64,
    },
}

/// A line in a sink file: `sink_<stream>.csv:<line>` (lines count from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// The stream, i.e. the file `sink_<stream>.csv`.
    pub stream: u32,
    /// The 1-based line number.
    pub line: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sink_{}.csv:{}", self.stream, self.line)
    }
}

/// Why a line could not be read as a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    /// The line is not a valid row.
    #[error("{0}")]
    Row(RowError),
    /// The line is not UTF-8.
    #[error("not valid UTF-8")]
    NotUtf8,
    /// The line is longer than [`MAX_LINE_LEN`] bytes.
    #[error("longer than {MAX_LINE_LEN} bytes")]
    TooLong,
    /// The file's last line has no terminating `\n` (it was probably cut off; the line is
    /// still checked if it parses).
    #[error("last line has no terminating newline")]
    NoTrailingNewline,
}

/// One broken promise found in the sink files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// `sink_<stream>.csv` does not exist.
    #[error("sink_{stream}.csv: file is missing")]
    MissingFile {
        /// The stream whose file is missing.
        stream: u32,
    },
    /// A file named like a sink file for a stream the spec does not have.
    #[error("{name}: sink file for a stream beyond binlog-num")]
    UnexpectedFile {
        /// The file name.
        name: String,
    },
    /// Two files' fences name different job attempts: they hold the output of different
    /// runs (or a replaced attempt's sink wrote on).
    #[error(
        "sink_{stream}.csv was last claimed by {owner}, sink_{first_stream}.csv by {first}: the files are not one attempt's output"
    )]
    WritersDiffer {
        /// The stream whose file differs.
        stream: u32,
        /// Its fence's owner.
        owner: Owner,
        /// The first stream with a fence.
        first_stream: u32,
        /// That file's owner.
        first: Owner,
    },
    /// A sink file without a fence next to files that have one.
    #[error("sink_{stream}.csv has no fence while the other files have one")]
    Unfenced {
        /// The stream.
        stream: u32,
    },
    /// A fence file that is not one.
    #[error("sink_{stream}.csv.fence: {problem}")]
    BadFence {
        /// The stream.
        stream: u32,
        /// What is wrong with it.
        problem: String,
    },
    /// A line could not be read as a row.
    #[error("{at}: malformed line: {problem}")]
    Malformed {
        /// Where.
        at: Location,
        /// What is wrong.
        problem: LineProblem,
    },
    /// A row for a table outside `0..table-num`, or a data row with a pk outside
    /// `1..=rcd-cnt`.
    #[error("{at}: row for an unknown table or pk: {row}")]
    UnknownRow {
        /// Where.
        at: Location,
        /// The row.
        row: SinkRow,
    },
    /// A DDL row that no producer emits (version 0, too high, or the wrong pk).
    #[error("{at}: unexpected DDL row: {row}")]
    UnexpectedDdl {
        /// Where.
        at: Location,
        /// The row.
        row: SinkRow,
    },
    /// A data row whose schema version is not `pk / ddl-freq`.
    #[error("{at}: table {table} pk {pk} carries schema version {got}, expected {expected}")]
    WrongVersion {
        /// Where.
        at: Location,
        /// The table.
        table: u32,
        /// The pk.
        pk: u64,
        /// The version in the row.
        got: u64,
        /// The version the producer assigns to this pk.
        expected: u64,
    },
    /// A data row seen before (in any file).
    #[error("{at}: duplicate data row for table {table} pk {pk}")]
    DuplicateData {
        /// Where the second (or later) copy is.
        at: Location,
        /// The table.
        table: u32,
        /// The pk.
        pk: u64,
    },
    /// An expected data row that is in no file.
    #[error("table {table} pk {pk}: data row is missing")]
    MissingData {
        /// The table.
        table: u32,
        /// The pk.
        pk: u64,
    },
    /// A second DDL row for the same (table, version) in one file.
    #[error("{at}: duplicate DDL row for table {table} version {version}")]
    DuplicateDdl {
        /// Where the second (or later) copy is.
        at: Location,
        /// The table.
        table: u32,
        /// The version.
        version: u64,
    },
    /// A stream has no DDL row for an expected (table, version).
    #[error("sink_{stream}.csv: no DDL row for table {table} version {version}")]
    MissingDdl {
        /// The stream.
        stream: u32,
        /// The table.
        table: u32,
        /// The version.
        version: u64,
    },
    /// A table's data pk is not above the previous one of that table in the same file.
    #[error("{at}: table {table} pk {pk} follows pk {previous} in the same stream")]
    PkNotIncreasing {
        /// Where.
        at: Location,
        /// The table.
        table: u32,
        /// The pk of this row.
        pk: u64,
        /// The pk of the table's previous data row in this file.
        previous: u64,
    },
    /// A DDL row that goes back in its stream: it comes after the table's DDL to a later
    /// version. (A DDL that comes late, after data rows of its version, is reported once, as
    /// those rows' [`Violation::VersionOrder`].)
    #[error(
        "{at}: DDL of table {table} to version {version} comes after the stream's DDL to version {stream_version}"
    )]
    DdlOrder {
        /// Where.
        at: Location,
        /// The table.
        table: u32,
        /// The version of this DDL.
        version: u64,
        /// The version of the table's latest DDL before this one in the file.
        stream_version: u64,
    },
    /// A data row's version differs from the latest DDL the stream delivered for its table
    /// (the DDL came late, or not at all, or a later DDL came early).
    #[error(
        "{at}: table {table} pk {pk} carries version {version} but the stream's latest DDL for the table is version {stream_version}"
    )]
    VersionOrder {
        /// Where.
        at: Location,
        /// The table.
        table: u32,
        /// The pk.
        pk: u64,
        /// The version in the row.
        version: u64,
        /// The version of the latest DDL for the table before this row in the file.
        stream_version: u64,
    },
    /// The DDL barrier did not hold: a row of a version below `version` was synced after a
    /// row of version `version` or later.
    #[error(
        "table {table} version {version}: barrier broken, a row of an older version was synced at {before_max_synced_ns} ns, after a row of this or a newer version at {after_min_synced_ns} ns"
    )]
    BarrierBroken {
        /// The table.
        table: u32,
        /// The version whose DDL should have separated the rows.
        version: u64,
        /// Latest `synced_ns` among the table's rows with a version below `version`.
        before_max_synced_ns: u64,
        /// Earliest `synced_ns` among the table's rows with version `version` or newer.
        after_min_synced_ns: u64,
    },
}

/// What one sink file held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// The stream (file `sink_<stream>.csv`).
    pub stream: u32,
    /// Whether the file exists.
    pub present: bool,
    /// Lines read, malformed ones included.
    pub lines: u64,
    /// Well-formed data rows.
    pub data_rows: u64,
    /// Well-formed DDL rows.
    pub ddl_rows: u64,
}

/// Percentiles of `sink_ns − produced_ns` over data rows, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The directory verified.
    pub dir: PathBuf,
    /// T, from the spec.
    pub tables: u32,
    /// S, from the spec.
    pub streams: u32,
    /// Data rows the spec expects over all files.
    pub expected_data_rows: u64,
    /// DDL rows the spec expects in each file.
    pub expected_ddl_rows_per_stream: u64,
    /// Per file, in stream order.
    pub per_stream: Vec<StreamStats>,
    /// The job attempt whose fences the files carry, when they all carry the same one
    /// (`None`: no fence, or they differ, which is a [`Violation::WritersDiffer`]).
    pub written_by: Option<Owner>,
    /// Well-formed data rows over all files.
    pub data_rows: u64,
    /// Well-formed DDL rows over all files.
    pub ddl_rows: u64,
    /// Lines that could not be read as rows.
    pub malformed_lines: u64,
    /// Expected data rows found in no file.
    pub missing_data: u64,
    /// The first few missing `(table, pk)`.
    pub missing_examples: Vec<(u32, u64)>,
    /// Data rows seen more than once (each extra copy counts).
    pub duplicate_data: u64,
    /// The first few duplicated `(table, pk)`.
    pub duplicate_examples: Vec<(u32, u64)>,
    /// Data rows whose `sink_ns` is before their `produced_ns` (recorded as 0 latency).
    pub negative_latency_rows: u64,
    /// Latency percentiles, if there were data rows.
    pub latency: Option<LatencySummary>,
    /// Data rows per second between the earliest `produced_ns` and the latest `sink_ns`,
    /// if that span is positive.
    pub throughput_rows_per_s: Option<f64>,
    /// The first [`MAX_REPORTED_VIOLATIONS`] violations, in the order found.
    pub violations: Vec<Violation>,
    /// All violations found.
    pub violation_count: u64,
}

impl Report {
    /// Whether no violation was found.
    pub fn passed(&self) -> bool {
        self.violation_count == 0
    }

    /// Why the files are not job `job`'s output, if their fences name another job (output an
    /// earlier run left, which a job that never claimed the files would not replace).
    pub fn other_writer(&self, job: u64) -> Option<String> {
        self.written_by
            .filter(|owner| owner.job != job)
            .map(|owner| format!("the sink files were written by {owner}, not by job {job}"))
    }
}

/// Verifies the sink files of a finished job in `dir` (normally [`DemoSpec::output_dir`])
/// against `spec`.
pub fn verify(dir: &Path, spec: &DemoSpec) -> Result<Report, VerifyError> {
    spec.validate()?;
    let meta = fs::metadata(dir).map_err(|source| VerifyError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(VerifyError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let mut checker = Checker::new(dir, spec)?;
    checker.check_unexpected_files(dir)?;
    checker.check_writers(dir, spec.binlog_num)?;
    for stream in 0..spec.binlog_num {
        let path = sink_file_in(dir, stream);
        match File::open(&path) {
            Ok(file) => {
                let reader = BufReader::with_capacity(1 << 16, file);
                checker
                    .read_stream(stream, reader)
                    .map_err(|source| VerifyError::Io { path, source })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => checker.missing_stream(stream),
            Err(source) => return Err(VerifyError::Io { path, source }),
        }
    }
    Ok(checker.finish())
}

/// A fixed-size set of bits.
#[derive(Debug)]
struct BitSet {
    words: Vec<u64>,
    len: u64,
}

impl BitSet {
    fn new(len: u64) -> Result<BitSet, VerifyError> {
        let words = usize::try_from(len.div_ceil(64)).map_err(|_| VerifyError::TooLarge {
            needed_bytes: u128::from(len) / 8,
            limit_bytes: MEMORY_LIMIT_BYTES,
        })?;
        Ok(BitSet {
            words: vec![0; words],
            len,
        })
    }

    /// Sets bit `i` (`i < len`); returns whether it was already set.
    fn insert(&mut self, i: u64) -> bool {
        // `i < len` and `words.len() == ceil(len / 64)`, so the index is in bounds and fits
        // in usize (the vector was allocated with that many words).
        let word = &mut self.words[(i / 64) as usize];
        let mask = 1u64 << (i % 64);
        let was = *word & mask != 0;
        *word |= mask;
        was
    }

    fn clear(&mut self) {
        self.words.fill(0);
    }

    fn count_zeros(&self) -> u64 {
        let ones: u64 = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.len - ones
    }

    /// The first `limit` unset bit indices below `len`.
    fn first_zeros(&self, limit: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, &word) in (0u64..).zip(&self.words) {
            let mut zeros = !word;
            while zeros != 0 && out.len() < limit {
                let i = w * 64 + u64::from(zeros.trailing_zeros());
                if i >= self.len {
                    return out;
                }
                out.push(i);
                zeros &= zeros - 1;
            }
            if out.len() >= limit {
                break;
            }
        }
        out
    }
}

/// `synced_ns` range of one (table, version); empty while `min > max`.
#[derive(Debug, Clone, Copy)]
struct SyncSpan {
    min: u64,
    max: u64,
}

impl SyncSpan {
    const EMPTY: SyncSpan = SyncSpan {
        min: u64::MAX,
        max: 0,
    };

    fn add(&mut self, ns: u64) {
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }
}

/// The verification state, fed one stream at a time.
struct Checker {
    tables: u32,
    streams: u32,
    rcd_cnt: u64,
    ddl_freq: u64,
    /// Highest version a table reaches (= DDLs per table).
    max_version: u64,
    /// Bit `t * rcd_cnt + pk - 1`: data row (t, pk) seen in some file.
    data_seen: BitSet,
    /// Bit `t * max_version + v - 1`: DDL (t, v) seen in the current file.
    ddl_seen: BitSet,
    /// Index `t * (max_version + 1) + v`: synced range of table t's rows of version v.
    spans: Vec<SyncSpan>,
    /// Per table, in the current file: last data pk (0 = none yet).
    last_pk: Vec<u64>,
    /// Per table, in the current file: version of the latest DDL (0 = none yet).
    stream_version: Vec<u64>,
    latency_ns: Histogram<u64>,
    min_produced_ns: u64,
    max_sink_ns: u64,
    report: Report,
}

impl Checker {
    fn new(dir: &Path, spec: &DemoSpec) -> Result<Checker, VerifyError> {
        let tables = u64::from(spec.table_num);
        let max_version = spec.ddls_per_table();
        let t = u128::from(tables);
        let needed_bytes = t * u128::from(spec.rcd_cnt) / 8
            + t * u128::from(max_version) / 8
            + t * (u128::from(max_version) + 1) * 16
            + t * 16;
        if needed_bytes > u128::from(MEMORY_LIMIT_BYTES) {
            return Err(VerifyError::TooLarge {
                needed_bytes,
                limit_bytes: MEMORY_LIMIT_BYTES,
            });
        }
        // The products below are bounded by the memory check above, so they fit in u64
        // and (on 64-bit targets) in usize; `BitSet::new` and `to_usize` still check.
        let span_count = to_usize(tables * (max_version + 1), needed_bytes)?;
        let table_count = to_usize(tables, needed_bytes)?;
        // 3 significant figures is within hdrhistogram's allowed 0..=5.
        let latency_ns =
            Histogram::new(3).expect("3 significant figures is a valid hdrhistogram precision");
        Ok(Checker {
            tables: spec.table_num,
            streams: spec.binlog_num,
            rcd_cnt: spec.rcd_cnt,
            ddl_freq: spec.ddl_freq,
            max_version,
            data_seen: BitSet::new(tables * spec.rcd_cnt)?,
            ddl_seen: BitSet::new(tables * max_version)?,
            spans: vec![SyncSpan::EMPTY; span_count],
            last_pk: vec![0; table_count],
            stream_version: vec![0; table_count],
            latency_ns,
            min_produced_ns: u64::MAX,
            max_sink_ns: 0,
            report: Report {
                dir: dir.to_owned(),
                tables: spec.table_num,
                streams: spec.binlog_num,
                expected_data_rows: spec.total_data_records(),
                expected_ddl_rows_per_stream: spec.ddl_rows_per_stream(),
                per_stream: Vec::with_capacity(spec.binlog_num as usize),
                written_by: None,
                data_rows: 0,
                ddl_rows: 0,
                malformed_lines: 0,
                missing_data: 0,
                missing_examples: Vec::new(),
                duplicate_data: 0,
                duplicate_examples: Vec::new(),
                negative_latency_rows: 0,
                latency: None,
                throughput_rows_per_s: None,
                violations: Vec::new(),
                violation_count: 0,
            },
        })
    }

    fn violation(&mut self, violation: Violation) {
        self.report.violation_count += 1;
        if self.report.violations.len() < MAX_REPORTED_VIOLATIONS {
            self.report.violations.push(violation);
        }
    }

    /// Flags `sink_<n>.csv` files for `n >= binlog-num`.
    fn check_unexpected_files(&mut self, dir: &Path) -> Result<(), VerifyError> {
        let dir_error = |source| VerifyError::Dir {
            path: dir.to_owned(),
            source,
        };
        let mut extra = Vec::new();
        for entry in fs::read_dir(dir).map_err(dir_error)? {
            let name = entry.map_err(dir_error)?.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(index) = name
                .strip_prefix("sink_")
                .and_then(|rest| rest.strip_suffix(".csv"))
            else {
                continue;
            };
            if index
                .parse::<u64>()
                .is_ok_and(|i| i >= u64::from(self.streams))
            {
                extra.push(name.to_owned());
            }
        }
        extra.sort();
        for name in extra {
            self.violation(Violation::UnexpectedFile { name });
        }
        Ok(())
    }

    /// Reads every file's fence: they must all name the same job attempt.
    ///
    /// Files without a fence pass only if no file has one (output written by other means);
    /// a fence that cannot be read as one is a violation.
    fn check_writers(&mut self, dir: &Path, streams: u32) -> Result<(), VerifyError> {
        let mut first: Option<(u32, Owner)> = None;
        let mut differ = false;
        let mut unfenced = Vec::new();
        for stream in 0..streams {
            let path = sink_file_in(dir, stream);
            let owner = match crate::fence::owner(&path) {
                Ok(owner) => owner,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    differ = true;
                    self.violation(Violation::BadFence {
                        stream,
                        problem: e.to_string(),
                    });
                    continue;
                }
                Err(source) => {
                    return Err(VerifyError::Io {
                        path: crate::fence::fence_path(&path),
                        source,
                    });
                }
            };
            let Some(owner) = owner else {
                if path.exists() {
                    unfenced.push(stream);
                }
                continue;
            };
            match first {
                None => first = Some((stream, owner)),
                Some((first_stream, first_owner)) if first_owner != owner => {
                    differ = true;
                    self.violation(Violation::WritersDiffer {
                        stream,
                        owner,
                        first_stream,
                        first: first_owner,
                    });
                }
                Some(_) => {}
            }
        }
        if first.is_some() {
            for stream in unfenced {
                differ = true;
                self.violation(Violation::Unfenced { stream });
            }
        }
        if !differ {
            self.report.written_by = first.map(|(_, owner)| owner);
        }
        Ok(())
    }

    fn missing_stream(&mut self, stream: u32) {
        self.report.per_stream.push(StreamStats {
            stream,
            present: false,
            ..StreamStats::default()
        });
        self.violation(Violation::MissingFile { stream });
    }

    fn read_stream<R: BufRead>(&mut self, stream: u32, mut reader: R) -> io::Result<()> {
        self.last_pk.fill(0);
        self.stream_version.fill(0);
        self.ddl_seen.clear();
        let mut stats = StreamStats {
            stream,
            present: true,
            ..StreamStats::default()
        };
        let mut buf = Vec::with_capacity(256);
        loop {
            let read = read_line_bounded(&mut reader, &mut buf, MAX_LINE_LEN)?;
            let terminated = match read {
                LineRead::Eof => break,
                LineRead::Line { terminated } => terminated,
                LineRead::TooLong => {
                    stats.lines += 1;
                    self.malformed(stream, stats.lines, LineProblem::TooLong);
                    continue;
                }
            };
            stats.lines += 1;
            let at = Location {
                stream,
                line: stats.lines,
            };
            if !terminated {
                self.violation(Violation::Malformed {
                    at,
                    problem: LineProblem::NoTrailingNewline,
                });
            }
            let Ok(text) = std::str::from_utf8(&buf) else {
                self.malformed(stream, stats.lines, LineProblem::NotUtf8);
                continue;
            };
            match SinkRow::parse(text) {
                Ok(row) => {
                    match row.kind {
                        RowKind::Data => stats.data_rows += 1,
                        RowKind::Ddl => stats.ddl_rows += 1,
                    }
                    self.row(at, row);
                }
                Err(e) => self.malformed(stream, stats.lines, LineProblem::Row(e)),
            }
        }
        self.report.data_rows += stats.data_rows;
        self.report.ddl_rows += stats.ddl_rows;
        self.report.per_stream.push(stats);
        self.missing_ddls(stream);
        Ok(())
    }

    fn malformed(&mut self, stream: u32, line: u64, problem: LineProblem) {
        self.report.malformed_lines += 1;
        self.violation(Violation::Malformed {
            at: Location { stream, line },
            problem,
        });
    }

    fn row(&mut self, at: Location, row: SinkRow) {
        match row.kind {
            RowKind::Data => self.data_row(at, row),
            RowKind::Ddl => self.ddl_row(at, row),
        }
    }

    fn data_row(&mut self, at: Location, row: SinkRow) {
        self.measure(&row);
        let SinkRow {
            table_id: table,
            pk,
            schema_ver: version,
            ..
        } = row;
        if table >= self.tables || pk == 0 || pk > self.rcd_cnt {
            self.violation(Violation::UnknownRow { at, row });
            return;
        }
        let t = table as usize;
        if self
            .data_seen
            .insert(u64::from(table) * self.rcd_cnt + pk - 1)
        {
            self.report.duplicate_data += 1;
            if self.report.duplicate_examples.len() < MAX_EXAMPLES {
                self.report.duplicate_examples.push((table, pk));
            }
            self.violation(Violation::DuplicateData { at, table, pk });
        }
        let previous = self.last_pk[t];
        if previous != 0 && pk <= previous {
            self.violation(Violation::PkNotIncreasing {
                at,
                table,
                pk,
                previous,
            });
        }
        self.last_pk[t] = pk;
        let expected = pk.checked_div(self.ddl_freq).unwrap_or(0);
        if version != expected {
            self.violation(Violation::WrongVersion {
                at,
                table,
                pk,
                got: version,
                expected,
            });
        } else if version != self.stream_version[t] {
            self.violation(Violation::VersionOrder {
                at,
                table,
                pk,
                version,
                stream_version: self.stream_version[t],
            });
            // Resynchronize so one late or missing DDL is reported once, not per row.
            self.stream_version[t] = version;
        }
        self.add_to_span(table, version, row.synced_ns);
    }

    fn ddl_row(&mut self, at: Location, row: SinkRow) {
        let SinkRow {
            table_id: table,
            schema_ver: version,
            pk,
            ..
        } = row;
        if table >= self.tables {
            self.violation(Violation::UnknownRow { at, row });
            return;
        }
        if version == 0
            || version > self.max_version
            || Some(pk) != version.checked_mul(self.ddl_freq)
        {
            self.violation(Violation::UnexpectedDdl { at, row });
            return;
        }
        if self
            .ddl_seen
            .insert(u64::from(table) * self.max_version + version - 1)
        {
            self.violation(Violation::DuplicateDdl { at, table, version });
        } else {
            let stream_version = self.stream_version[table as usize];
            if version < stream_version {
                self.violation(Violation::DdlOrder {
                    at,
                    table,
                    version,
                    stream_version,
                });
            }
            self.stream_version[table as usize] = version;
        }
        self.add_to_span(table, version, row.synced_ns);
    }

    fn add_to_span(&mut self, table: u32, version: u64, synced_ns: u64) {
        if version <= self.max_version {
            let index = u64::from(table) * (self.max_version + 1) + version;
            // table < T and version <= max_version, so index < spans.len().
            self.spans[index as usize].add(synced_ns);
        }
    }

    fn measure(&mut self, row: &SinkRow) {
        let latency = match row.sink_ns.checked_sub(row.produced_ns) {
            Some(latency) => latency,
            None => {
                self.report.negative_latency_rows += 1;
                0
            }
        };
        // Auto-resizing histograms track values up to i64::MAX / 2 (292 years in ns).
        let latency = latency.min(i64::MAX as u64 / 2);
        if self.latency_ns.record(latency).is_err() {
            self.latency_ns.saturating_record(latency);
        }
        self.min_produced_ns = self.min_produced_ns.min(row.produced_ns);
        self.max_sink_ns = self.max_sink_ns.max(row.sink_ns);
    }

    /// Reports expected DDLs missing from the file just read.
    fn missing_ddls(&mut self, stream: u32) {
        if self.max_version == 0 {
            return;
        }
        let missing = self.ddl_seen.count_zeros();
        if missing == 0 {
            return;
        }
        let room = MAX_REPORTED_VIOLATIONS - self.report.violations.len();
        for i in self.ddl_seen.first_zeros(room) {
            self.report.violations.push(Violation::MissingDdl {
                stream,
                // i < T * max_version, so the quotient is below T, which is a u32.
                table: (i / self.max_version) as u32,
                version: i % self.max_version + 1,
            });
        }
        self.report.violation_count += missing;
    }

    fn missing_data(&mut self) {
        let missing = self.data_seen.count_zeros();
        self.report.missing_data = missing;
        if missing == 0 {
            return;
        }
        let room = MAX_REPORTED_VIOLATIONS - self.report.violations.len();
        let zeros = self.data_seen.first_zeros(room.max(MAX_EXAMPLES));
        for (n, &i) in zeros.iter().enumerate() {
            // i < T * rcd_cnt, so the quotient is below T, which is a u32.
            let (table, pk) = ((i / self.rcd_cnt) as u32, i % self.rcd_cnt + 1);
            if n < MAX_EXAMPLES {
                self.report.missing_examples.push((table, pk));
            }
            if n < room {
                self.report
                    .violations
                    .push(Violation::MissingData { table, pk });
            }
        }
        self.report.violation_count += missing;
    }

    fn barrier(&mut self) {
        let versions = (self.max_version + 1) as usize;
        let mut suffix_min = vec![u64::MAX; versions + 1];
        // Taken out so `self.violation` can be called while reading it; put back below.
        let all_spans = std::mem::take(&mut self.spans);
        for (table, spans) in (0u32..).zip(all_spans.chunks(versions)) {
            for v in (0..versions).rev() {
                suffix_min[v] = suffix_min[v + 1].min(spans[v].min);
            }
            let mut prefix_max = 0u64;
            for v in 1..versions {
                prefix_max = prefix_max.max(spans[v - 1].max);
                // Ties are allowed: equal clock readings do not show an order.
                if prefix_max > suffix_min[v] {
                    self.violation(Violation::BarrierBroken {
                        table,
                        version: v as u64,
                        before_max_synced_ns: prefix_max,
                        after_min_synced_ns: suffix_min[v],
                    });
                }
            }
        }
        self.spans = all_spans;
    }

    fn finish(mut self) -> Report {
        self.missing_data();
        self.barrier();
        if self.report.data_rows > 0 {
            let h = &self.latency_ns;
            let us = |ns: u64| ns as f64 / 1_000.0;
            self.report.latency = Some(LatencySummary {
                p50_us: us(h.value_at_quantile(0.50)),
                p90_us: us(h.value_at_quantile(0.90)),
                p99_us: us(h.value_at_quantile(0.99)),
                p999_us: us(h.value_at_quantile(0.999)),
                max_us: us(h.max()),
            });
            if self.max_sink_ns > self.min_produced_ns {
                let seconds = (self.max_sink_ns - self.min_produced_ns) as f64 / 1e9;
                self.report.throughput_rows_per_s = Some(self.report.data_rows as f64 / seconds);
            }
        }
        self.report
    }
}

fn to_usize(n: u64, needed_bytes: u128) -> Result<usize, VerifyError> {
    usize::try_from(n).map_err(|_| VerifyError::TooLarge {
        needed_bytes,
        limit_bytes: MEMORY_LIMIT_BYTES,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const W: usize = 18;
        let verdict = if self.passed() { "PASSED" } else { "FAILED" };
        writeln!(f, "demo sink verification: {verdict}")?;
        writeln!(f, "  {:<W$}{}", "directory", self.dir.display())?;
        match self.written_by {
            Some(owner) => writeln!(f, "  {:<W$}{owner}", "written by")?,
            None => writeln!(f, "  {:<W$}-", "written by")?,
        }
        writeln!(
            f,
            "  {:<W$}{} x {}",
            "tables x streams", self.tables, self.streams
        )?;
        writeln!(
            f,
            "  {:<W$}{} (expected {})",
            "data rows", self.data_rows, self.expected_data_rows
        )?;
        writeln!(
            f,
            "  {:<W$}{} (expected {} per stream)",
            "ddl rows", self.ddl_rows, self.expected_ddl_rows_per_stream
        )?;
        writeln!(
            f,
            "  {:<W$}{}{}",
            "missing data",
            self.missing_data,
            examples(&self.missing_examples)
        )?;
        writeln!(
            f,
            "  {:<W$}{}{}",
            "duplicate data",
            self.duplicate_data,
            examples(&self.duplicate_examples)
        )?;
        writeln!(f, "  {:<W$}{}", "malformed lines", self.malformed_lines)?;
        match &self.latency {
            Some(l) => writeln!(
                f,
                "  {:<W$}p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                "latency (us)", l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            )?,
            None => writeln!(f, "  {:<W$}n/a (no data rows)", "latency (us)")?,
        }
        if self.negative_latency_rows > 0 {
            writeln!(
                f,
                "  {:<W$}{} rows with sink_ns before produced_ns (clock skew?)",
                "", self.negative_latency_rows
            )?;
        }
        match self.throughput_rows_per_s {
            Some(t) => writeln!(f, "  {:<W$}{t:.0} data rows/s", "throughput")?,
            None => writeln!(f, "  {:<W$}n/a", "throughput")?,
        }
        writeln!(f, "  streams:")?;
        writeln!(
            f,
            "    {:>6}  {:<7}  {:>12}  {:>12}  {:>12}",
            "stream", "file", "lines", "data rows", "ddl rows"
        )?;
        for s in &self.per_stream {
            writeln!(
                f,
                "    {:>6}  {:<7}  {:>12}  {:>12}  {:>12}",
                s.stream,
                if s.present { "ok" } else { "MISSING" },
                s.lines,
                s.data_rows,
                s.ddl_rows
            )?;
        }
        write!(f, "  {:<W$}{}", "violations", self.violation_count)?;
        if self.violation_count > self.violations.len() as u64 {
            write!(f, " (first {} shown)", self.violations.len())?;
        }
        writeln!(f)?;
        for v in &self.violations {
            writeln!(f, "    - {v}")?;
        }
        Ok(())
    }
}

fn examples(list: &[(u32, u64)]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let items: Vec<String> = list
        .iter()
        .map(|(t, pk)| format!("table {t} pk {pk}"))
        .collect();
    format!(" (e.g. {})", items.join(", "))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A spec of the given shape, set through the public overrides path.
    fn small_spec(tables: i64, streams: i64, rcd_cnt: i64, ddl_freq: i64) -> DemoSpec {
        let mut spec = DemoSpec::default();
        crate::spec::DemoSpecOverrides {
            table_num: Some(tables),
            binlog_num: Some(streams),
            rcd_cnt: Some(rcd_cnt),
            ddl_freq: Some(ddl_freq),
            ..Default::default()
        }
        .apply(&mut spec)
        .unwrap();
        spec
    }

    /// What a correct pipeline writes: producers interleaved pk-major, DDLs broadcast to
    /// every stream before the data they precede, data round-robin per producer, and every
    /// record synced and written in emission order (so the barrier trivially holds).
    fn simulate(spec: &DemoSpec) -> Vec<Vec<SinkRow>> {
        let s = spec.binlog_num as usize;
        let mut streams = vec![Vec::new(); s];
        let mut next_stream = vec![0usize; spec.table_num as usize];
        let mut clock = 1_700_000_000_000_000_000u64;
        let mut stamp = |kind, table_id, schema_ver, pk| {
            clock += 1_000;
            SinkRow {
                kind,
                table_id,
                schema_ver,
                pk,
                produced_ns: clock,
                synced_ns: clock + 300,
                sink_ns: clock + 500,
            }
        };
        for pk in 1..=spec.rcd_cnt {
            for table in 0..spec.table_num {
                let version = spec.version_of(pk);
                if spec.ddl_freq != 0 && pk % spec.ddl_freq == 0 {
                    for stream in &mut streams {
                        stream.push(stamp(RowKind::Ddl, table, version, pk));
                    }
                }
                let target = &mut next_stream[table as usize];
                streams[*target % s].push(stamp(RowKind::Data, table, version, pk));
                *target += 1;
            }
        }
        streams
    }

    fn write_files(dir: &Path, streams: &[Vec<SinkRow>]) {
        let mut buf = Vec::new();
        for (i, rows) in streams.iter().enumerate() {
            buf.clear();
            for row in rows {
                row.write_to(&mut buf);
            }
            fs::write(sink_file_in(dir, i as u32), &buf).unwrap();
        }
    }

    fn run(streams: &[Vec<SinkRow>], spec: &DemoSpec) -> Report {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), streams);
        verify(dir.path(), spec).unwrap()
    }

    fn has(report: &Report, pred: impl Fn(&Violation) -> bool) -> bool {
        report.violations.iter().any(pred)
    }

    /// T=2, S=3, 12 records per table, a DDL every 4 pks (versions 1..=3).
    fn spec_2x3() -> DemoSpec {
        small_spec(2, 3, 12, 4)
    }

    fn position(rows: &[SinkRow], kind: RowKind, table: u32, pk: u64) -> usize {
        rows.iter()
            .position(|r| r.kind == kind && r.table_id == table && r.pk == pk)
            .unwrap()
    }

    #[test]
    fn correct_output_passes_with_exact_counts() {
        let spec = spec_2x3();
        let report = run(&simulate(&spec), &spec);
        assert!(report.passed(), "{report}");
        assert_eq!(report.violation_count, 0);
        assert!(report.violations.is_empty());
        assert_eq!(report.data_rows, 24);
        assert_eq!(report.expected_data_rows, 24);
        assert_eq!(report.ddl_rows, 2 * 3 * 3);
        assert_eq!(report.expected_ddl_rows_per_stream, 6);
        assert_eq!(report.per_stream.len(), 3);
        for s in &report.per_stream {
            assert!(s.present);
            assert_eq!(s.data_rows, 8);
            assert_eq!(s.ddl_rows, 6);
            assert_eq!(s.lines, 14);
        }
        let latency = report.latency.unwrap();
        assert!((latency.p50_us - 0.5).abs() < 0.01, "{latency:?}");
        assert!((latency.max_us - 0.5).abs() < 0.01, "{latency:?}");
        let throughput = report.throughput_rows_per_s.unwrap();
        assert!(throughput > 0.0);
        let text = report.to_string();
        assert!(text.contains("PASSED"), "{text}");
        assert!(text.contains("violations"), "{text}");
    }

    /// The fences name who wrote the files: one attempt passes and is named; files of two
    /// attempts are a violation.
    #[test]
    fn the_files_must_be_one_attempts_and_it_is_named() {
        use crate::fence::FencedFile;
        let spec = spec_2x3();
        let dir = tempfile::tempdir().unwrap();
        let claim = |stream: u32, job, epoch| {
            FencedFile::claim(&sink_file_in(dir.path(), stream), Owner { job, epoch }, 0).unwrap()
        };
        let claims: Vec<FencedFile> = (0..3).map(|i| claim(i, 4, 2)).collect();
        drop(claims);
        write_files(dir.path(), &simulate(&spec));
        let report = verify(dir.path(), &spec).unwrap();
        assert!(report.passed(), "{report}");
        assert_eq!(report.written_by, Some(Owner { job: 4, epoch: 2 }));
        assert_eq!(report.other_writer(4), None);
        let other = report.other_writer(3).unwrap();
        assert!(
            other.contains("written by job 4 epoch 2, not by job 3"),
            "{other}"
        );
        assert!(
            report
                .to_string()
                .contains("written by        job 4 epoch 2"),
            "{report}"
        );
        // A file whose fence is gone, and one whose fence is damaged.
        fs::remove_file(crate::fence::fence_path(&sink_file_in(dir.path(), 2))).unwrap();
        let report = verify(dir.path(), &spec).unwrap();
        assert!(
            has(&report, |v| matches!(v, Violation::Unfenced { stream: 2 })),
            "{report}"
        );
        fs::write(
            crate::fence::fence_path(&sink_file_in(dir.path(), 2)),
            "nonsense\n",
        )
        .unwrap();
        let report = verify(dir.path(), &spec).unwrap();
        assert!(
            has(&report, |v| matches!(
                v,
                Violation::BadFence { stream: 2, .. }
            )),
            "{report}"
        );
        assert_eq!(report.written_by, None);
        fs::remove_file(crate::fence::fence_path(&sink_file_in(dir.path(), 2))).unwrap();
        drop(claim(2, 4, 2));
        // Stream 1's file taken over by a later job.
        drop(claim(1, 5, 1));
        write_files(dir.path(), &simulate(&spec));
        let report = verify(dir.path(), &spec).unwrap();
        assert!(!report.passed());
        assert_eq!(report.written_by, None);
        assert!(
            has(&report, |v| matches!(
                v,
                Violation::WritersDiffer {
                    stream: 1,
                    first_stream: 0,
                    ..
                }
            )),
            "{report}"
        );
    }

    #[test]
    fn prototype_sized_run_passes() {
        // The prototype's integration test shape: T=10, S=3, DDL every 100 records.
        let spec = small_spec(10, 3, 1_000, 100);
        let report = run(&simulate(&spec), &spec);
        assert!(report.passed(), "{report}");
        assert_eq!(report.data_rows, 10_000);
        assert_eq!(report.ddl_rows, 10 * 10 * 3);
    }

    #[test]
    fn no_ddl_spec_passes() {
        let spec = small_spec(3, 2, 50, 0);
        let report = run(&simulate(&spec), &spec);
        assert!(report.passed(), "{report}");
        assert_eq!(report.ddl_rows, 0);
    }

    #[test]
    fn missing_data_row_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        let i = position(&streams[1], RowKind::Data, 1, 5);
        streams[1].remove(i);
        let report = run(&streams, &spec);
        assert!(!report.passed());
        assert_eq!(report.missing_data, 1);
        assert_eq!(report.missing_examples, vec![(1, 5)]);
        assert!(has(&report, |v| matches!(
            v,
            Violation::MissingData { table: 1, pk: 5 }
        )));
        assert_eq!(report.violation_count, 1, "{report}");
        assert!(report.to_string().contains("FAILED"));
    }

    #[test]
    fn duplicate_data_row_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        let i = position(&streams[0], RowKind::Data, 0, 4);
        let copy = streams[0][i];
        // Deliver it again right after the original on another stream's corresponding
        // place: append at the end of stream 2.
        streams[2].push(copy);
        let report = run(&streams, &spec);
        assert_eq!(report.duplicate_data, 1);
        assert_eq!(report.duplicate_examples, vec![(0, 4)]);
        assert!(has(&report, |v| matches!(
            v,
            Violation::DuplicateData {
                at: Location { stream: 2, .. },
                table: 0,
                pk: 4
            }
        )));
        assert_eq!(report.missing_data, 0);
    }

    #[test]
    fn barrier_violation_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        // Table 0 pk 2 (version 0) is synced after every other row: after DDL(0, 1) passed.
        let late = streams.iter().flatten().map(|r| r.synced_ns).max().unwrap() + 10;
        let s = (0..3)
            .find(|&s| {
                streams[s]
                    .iter()
                    .any(|r| r.kind == RowKind::Data && r.table_id == 0 && r.pk == 2)
            })
            .unwrap();
        let i = position(&streams[s], RowKind::Data, 0, 2);
        streams[s][i].synced_ns = late;
        let report = run(&streams, &spec);
        assert!(!report.passed());
        for version in 1..=3 {
            assert!(
                has(&report, |v| *v
                    == Violation::BarrierBroken {
                        table: 0,
                        version,
                        before_max_synced_ns: late,
                        after_min_synced_ns: streams
                            .iter()
                            .flatten()
                            .filter(|r| r.table_id == 0 && r.schema_ver >= version)
                            .map(|r| r.synced_ns)
                            .min()
                            .unwrap(),
                    }),
                "{report}"
            );
        }
        assert!(!has(&report, |v| matches!(
            v,
            Violation::BarrierBroken { table: 1, .. }
        )));
    }

    #[test]
    fn barrier_allows_equal_timestamps() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        let first_v1 = streams
            .iter()
            .flatten()
            .filter(|r| r.table_id == 0 && r.schema_ver >= 1)
            .map(|r| r.synced_ns)
            .min()
            .unwrap();
        let i = position(&streams[0], RowKind::Data, 0, 1);
        streams[0][i].synced_ns = first_v1;
        let report = run(&streams, &spec);
        assert!(report.passed(), "{report}");
    }

    #[test]
    fn malformed_line_is_reported_with_file_and_line() {
        let spec = spec_2x3();
        let streams = simulate(&spec);
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &streams);
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(sink_file_in(dir.path(), 1))
            .unwrap();
        file.write_all(b"data,0,0,x7,1,2,3\n").unwrap();
        drop(file);
        let report = verify(dir.path(), &spec).unwrap();
        assert_eq!(report.malformed_lines, 1);
        let expected_at = Location {
            stream: 1,
            line: streams[1].len() as u64 + 1,
        };
        assert!(
            has(&report, |v| matches!(
                v,
                Violation::Malformed {
                    at,
                    problem: LineProblem::Row(RowError::BadInteger { column: "pk", .. }),
                } if *at == expected_at
            )),
            "{report}"
        );
        assert_eq!(report.violation_count, 1);
        let text = report.to_string();
        assert!(
            text.contains(&format!("sink_1.csv:{}", expected_at.line)),
            "{text}"
        );
        assert!(text.contains("column `pk`"), "{text}");
    }

    #[test]
    fn unterminated_non_utf8_and_overlong_lines_are_reported() {
        let spec = spec_2x3();
        let streams = simulate(&spec);
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &streams);
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(sink_file_in(dir.path(), 0))
            .unwrap();
        file.write_all(b"data,0,\xff,1,0,0,0\n").unwrap();
        file.write_all(&vec![b'9'; MAX_LINE_LEN + 10]).unwrap();
        file.write_all(b"\n").unwrap();
        file.write_all(b"ddl,0,1").unwrap();
        drop(file);
        let report = verify(dir.path(), &spec).unwrap();
        let base = streams[0].len() as u64;
        let problem_at = |line: u64, want: LineProblem| {
            report.violations.iter().any(|v| {
                *v == Violation::Malformed {
                    at: Location { stream: 0, line },
                    problem: want.clone(),
                }
            })
        };
        assert!(problem_at(base + 1, LineProblem::NotUtf8), "{report}");
        assert!(problem_at(base + 2, LineProblem::TooLong), "{report}");
        assert!(
            problem_at(base + 3, LineProblem::NoTrailingNewline),
            "{report}"
        );
        assert!(problem_at(
            base + 3,
            LineProblem::Row(RowError::FieldCount { found: 3 })
        ));
        assert_eq!(report.malformed_lines, 3);
    }

    #[test]
    fn missing_ddl_on_one_stream_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        let i = position(&streams[2], RowKind::Ddl, 1, 8);
        streams[2].remove(i);
        let report = run(&streams, &spec);
        assert!(
            has(&report, |v| *v
                == Violation::MissingDdl {
                    stream: 2,
                    table: 1,
                    version: 2
                }),
            "{report}"
        );
        assert!(!has(&report, |v| matches!(
            v,
            Violation::MissingDdl { stream: 0 | 1, .. }
        )));
    }

    #[test]
    fn duplicate_and_unexpected_ddl_rows_are_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        let i = position(&streams[0], RowKind::Ddl, 0, 4);
        let ddl = streams[0][i];
        streams[0].insert(i + 1, ddl);
        let bogus = SinkRow {
            schema_ver: 1,
            pk: 5,
            ..ddl
        };
        streams[1].push(bogus);
        let report = run(&streams, &spec);
        assert!(has(&report, |v| matches!(
            v,
            Violation::DuplicateDdl {
                at: Location { stream: 0, .. },
                table: 0,
                version: 1
            }
        )));
        assert!(has(&report, |v| matches!(
            v,
            Violation::UnexpectedDdl { row, .. } if *row == bogus
        )));
    }

    #[test]
    fn non_increasing_pk_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        // Stream 0 carries table 0 pks 1, 4, 7, 10 (round-robin over 3 streams).
        let a = position(&streams[0], RowKind::Data, 0, 1);
        let b = position(&streams[0], RowKind::Data, 0, 10);
        let (pk_a, pk_b) = (streams[0][a].pk, streams[0][b].pk);
        streams[0][a].pk = pk_b;
        streams[0][b].pk = pk_a;
        streams[0][a].schema_ver = spec.version_of(pk_b);
        streams[0][b].schema_ver = spec.version_of(pk_a);
        let report = run(&streams, &spec);
        assert!(
            has(&report, |v| matches!(
                v,
                Violation::PkNotIncreasing {
                    at: Location { stream: 0, .. },
                    table: 0,
                    pk: 4,
                    previous: 10
                }
            )),
            "{report}"
        );
    }

    #[test]
    fn data_before_its_ddl_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        // Move DDL(0, 1) on stream 0 after table 0's data pk 4, which carries version 1.
        let d = position(&streams[0], RowKind::Ddl, 0, 4);
        let ddl = streams[0].remove(d);
        let p = position(&streams[0], RowKind::Data, 0, 4);
        streams[0].insert(p + 1, ddl);
        let report = run(&streams, &spec);
        assert!(
            has(&report, |v| matches!(
                v,
                Violation::VersionOrder {
                    at: Location { stream: 0, .. },
                    table: 0,
                    pk: 4,
                    version: 1,
                    stream_version: 0
                }
            )),
            "{report}"
        );
        // Reported once: the late DDL itself is no second violation.
        assert!(
            !has(&report, |v| matches!(v, Violation::DdlOrder { .. })),
            "{report}"
        );
    }

    #[test]
    fn a_ddl_that_goes_back_in_its_stream_is_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        // Move DDL(0, 3) on stream 0 to just before DDL(0, 2), its fields unchanged.
        let d3 = position(&streams[0], RowKind::Ddl, 0, 12);
        let ddl = streams[0].remove(d3);
        let d2 = position(&streams[0], RowKind::Ddl, 0, 8);
        streams[0].insert(d2, ddl);
        let report = run(&streams, &spec);
        assert!(!report.passed(), "{report}");
        assert!(
            has(&report, |v| matches!(
                v,
                Violation::DdlOrder {
                    at: Location { stream: 0, .. },
                    table: 0,
                    version: 2,
                    stream_version: 3
                }
            )),
            "{report}"
        );
    }

    #[test]
    fn wrong_version_and_unknown_rows_are_reported() {
        let spec = spec_2x3();
        let mut streams = simulate(&spec);
        let i = position(&streams[1], RowKind::Data, 1, 2);
        streams[1][i].schema_ver = 3;
        let unknown_table = SinkRow {
            table_id: 2,
            ..streams[1][i]
        };
        let unknown_pk = SinkRow {
            pk: 13,
            ..streams[0][0]
        };
        streams[1].push(unknown_table);
        streams[0].push(unknown_pk);
        let report = run(&streams, &spec);
        assert!(has(&report, |v| matches!(
            v,
            Violation::WrongVersion {
                table: 1,
                pk: 2,
                got: 3,
                expected: 0,
                ..
            }
        )));
        assert!(has(&report, |v| matches!(
            v,
            Violation::UnknownRow { row, .. } if *row == unknown_table
        )));
        assert!(has(&report, |v| matches!(
            v,
            Violation::UnknownRow { row, .. } if *row == unknown_pk
        )));
    }

    #[test]
    fn missing_file_is_reported() {
        let spec = spec_2x3();
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &simulate(&spec));
        fs::remove_file(sink_file_in(dir.path(), 1)).unwrap();
        let report = verify(dir.path(), &spec).unwrap();
        assert_eq!(report.violations[0], Violation::MissingFile { stream: 1 });
        assert!(!report.per_stream[1].present);
        assert!(report.missing_data > 0);
        assert!(report.to_string().contains("MISSING"));
    }

    #[test]
    fn extra_stream_file_is_reported() {
        let spec = spec_2x3();
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &simulate(&spec));
        fs::write(sink_file_in(dir.path(), 3), b"").unwrap();
        let report = verify(dir.path(), &spec).unwrap();
        assert_eq!(
            report.violations,
            vec![Violation::UnexpectedFile {
                name: "sink_3.csv".into()
            }]
        );
    }

    #[test]
    fn only_the_first_violations_are_kept_but_all_are_counted() {
        let spec = small_spec(2, 2, 100, 0);
        let mut streams = simulate(&spec);
        streams[0].clear();
        let report = run(&streams, &spec);
        assert_eq!(report.missing_data, 100);
        assert_eq!(report.violation_count, 100);
        assert_eq!(report.violations.len(), MAX_REPORTED_VIOLATIONS);
        assert_eq!(report.missing_examples.len(), MAX_EXAMPLES);
        assert!(report.to_string().contains("first 10 shown"));
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = verify(&dir.path().join("nope"), &spec_2x3()).unwrap_err();
        assert!(matches!(err, VerifyError::Dir { .. }), "{err:?}");
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        let err = verify(&file, &spec_2x3()).unwrap_err();
        assert!(matches!(err, VerifyError::NotADirectory { .. }), "{err:?}");
    }

    #[test]
    fn huge_spec_is_refused_instead_of_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let spec = small_spec(10_000, 1, 10_000_000_000, 0);
        let err = verify(dir.path(), &spec).unwrap_err();
        assert!(matches!(err, VerifyError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn bitset_tracks_bits_and_zeros() {
        let mut set = BitSet::new(130).unwrap();
        assert!(!set.insert(0));
        assert!(set.insert(0));
        assert!(!set.insert(129));
        assert_eq!(set.count_zeros(), 128);
        assert_eq!(set.first_zeros(3), vec![1, 2, 3]);
        for i in 0..130 {
            set.insert(i);
        }
        assert_eq!(set.count_zeros(), 0);
        assert!(set.first_zeros(5).is_empty());
        set.clear();
        assert_eq!(set.count_zeros(), 130);
    }
}
