//! The sink file format: one CSV line per record, no header.
//!
//! ```text
//! kind,table_id,schema_ver,pk,produced_ns,synced_ns,sink_ns
//! data,3,1,10,1700000000000000000,1700000000000150000,1700000000000200000
//! ```
//!
//! `kind` is `data` or `ddl`; the integers are unsigned decimal without sign, padding or
//! leading zeros; times are Unix nanoseconds. For a DDL row `pk` is the pk of the data
//! record that follows it. Every line ends with `\n`.
//!
//! [`SinkRow::write_to`] appends a line to a reusable buffer without allocating (beyond
//! the buffer's own growth); [`SinkRow::parse`] is strict and says which column is wrong.
//! [`read_line_bounded`] reads a file's lines as bytes with a bounded length, for readers
//! that must not trust what is on disk.

use std::fmt;
use std::io::{self, BufRead};

/// Number of comma-separated fields in a sink line.
pub const FIELD_COUNT: usize = 7;

/// Column names, in order, as used in [`RowError`] messages.
pub const COLUMNS: [&str; FIELD_COUNT] = [
    "kind",
    "table_id",
    "schema_ver",
    "pk",
    "produced_ns",
    "synced_ns",
    "sink_ns",
];

/// Longest excerpt of a bad field quoted in an error.
const MAX_QUOTED: usize = 32;

/// Whether a row is a data record or a schema change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowKind {
    /// A data record (`data`).
    Data,
    /// A DDL (schema change) record (`ddl`).
    Ddl,
}

impl RowKind {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Data => "data",
            RowKind::Ddl => "ddl",
        }
    }
}

impl fmt::Display for RowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a sink file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SinkRow {
    /// Data or DDL.
    pub kind: RowKind,
    /// The table (producer) id.
    pub table_id: u32,
    /// The table's schema version the record carries (for a DDL: the new version).
    pub schema_ver: u64,
    /// The data record's pk (for a DDL: the pk of the data record that follows it).
    pub pk: u64,
    /// When the producer intended to emit the record (Unix ns).
    pub produced_ns: u64,
    /// When the syncer passed the record (Unix ns).
    pub synced_ns: u64,
    /// When the sink wrote the record (Unix ns).
    pub sink_ns: u64,
}

/// What is wrong with a sink line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// The line does not have exactly [`FIELD_COUNT`] comma-separated fields.
    #[error("expected 7 comma-separated fields, found {found}")]
    FieldCount {
        /// How many fields the line has.
        found: usize,
    },
    /// The first field is neither `data` nor `ddl`.
    #[error("bad kind {found:?} (expected `data` or `ddl`)")]
    BadKind {
        /// The field (truncated to 32 bytes).
        found: String,
    },
    /// An integer column does not hold a canonical unsigned decimal that fits.
    #[error("bad integer {found:?} in column `{column}`: {problem}")]
    BadInteger {
        /// The column name (one of [`COLUMNS`]).
        column: &'static str,
        /// The field (truncated to 32 bytes).
        found: String,
        /// Why it is not accepted.
        problem: IntProblem,
    },
}

/// Why an integer field was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntProblem {
    /// The field is empty.
    Empty,
    /// The field has a character other than `0`–`9` (signs and spaces included).
    NotADigit,
    /// The field has a leading zero (only `0` itself may start with `0`).
    LeadingZero,
    /// The value does not fit the column's type.
    Overflow,
}

impl fmt::Display for IntProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IntProblem::Empty => "empty",
            IntProblem::NotADigit => "not a decimal digit string",
            IntProblem::LeadingZero => "leading zero",
            IntProblem::Overflow => "too large",
        })
    }
}

impl SinkRow {
    /// Appends this row as one line, `\n` included, to `buf`.
    ///
    /// The line is formatted on the stack, last byte first, and appended in one copy.
    pub fn write_to(&self, buf: &mut Vec<u8>) {
        let mut line = Line::new();
        line.prepend(b'\n');
        for value in [
            self.sink_ns,
            self.synced_ns,
            self.produced_ns,
            self.pk,
            self.schema_ver,
            u64::from(self.table_id),
        ] {
            line.prepend_u64(value);
            line.prepend(b',');
        }
        line.prepend_bytes(self.kind.as_str().as_bytes());
        buf.extend_from_slice(line.as_bytes());
    }

    /// Parses one line, without its terminating `\n`.
    pub fn parse(line: &str) -> Result<SinkRow, RowError> {
        let mut fields = [""; FIELD_COUNT];
        let mut found = 0;
        for field in line.split(',') {
            if let Some(slot) = fields.get_mut(found) {
                *slot = field;
            }
            found += 1;
        }
        if found != FIELD_COUNT {
            return Err(RowError::FieldCount { found });
        }
        let [
            kind,
            table_id,
            schema_ver,
            pk,
            produced_ns,
            synced_ns,
            sink_ns,
        ] = fields;
        let kind = match kind {
            "data" => RowKind::Data,
            "ddl" => RowKind::Ddl,
            other => {
                return Err(RowError::BadKind {
                    found: quote(other),
                });
            }
        };
        let table_id =
            u32::try_from(parse_column(1, table_id)?).map_err(|_| RowError::BadInteger {
                column: COLUMNS[1],
                found: quote(table_id),
                problem: IntProblem::Overflow,
            })?;
        Ok(SinkRow {
            kind,
            table_id,
            schema_ver: parse_column(2, schema_ver)?,
            pk: parse_column(3, pk)?,
            produced_ns: parse_column(4, produced_ns)?,
            synced_ns: parse_column(5, synced_ns)?,
            sink_ns: parse_column(6, sink_ns)?,
        })
    }
}

impl fmt::Display for SinkRow {
    /// The row as it appears in the file, without the newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{},{},{},{},{}",
            self.kind,
            self.table_id,
            self.schema_ver,
            self.pk,
            self.produced_ns,
            self.synced_ns,
            self.sink_ns
        )
    }
}

/// Longest line [`SinkRow::write_to`] writes: the kind (`data`), six integers of at most
/// 20 digits, six commas and the newline.
pub const MAX_LINE_BYTES: usize = 4 + 6 * 20 + 6 + 1;

/// `"00" "01" … "99"`: two decimal digits per lookup.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// One sink line being formatted in a fixed stack buffer, from its end towards its start.
///
/// Integers come out least significant digits first, eight per step as four lookups in
/// [`DIGIT_PAIRS`] (sinks format three 19-digit timestamps per row; the digit-at-a-time
/// loop of an earlier round was ~11 % of a sink executor's CPU), so writing the line
/// backwards puts every byte in place with fixed-size stores. Copying each field in
/// instead (`itoa`'s output, then the pieces into the buffer) made every row a dozen small
/// `memmove` calls: ~10 % of the receiving engine thread at maximum rate. Bytes that would
/// not fit are dropped, which [`MAX_LINE_BYTES`] rules out for sink rows.
struct Line {
    bytes: [u8; MAX_LINE_BYTES],
    /// Index of the first written byte (`MAX_LINE_BYTES` while empty).
    start: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            bytes: [0; MAX_LINE_BYTES],
            start: MAX_LINE_BYTES,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(self.start..).unwrap_or_default()
    }

    fn prepend(&mut self, byte: u8) {
        self.prepend_fixed([byte]);
    }

    fn prepend_bytes(&mut self, text: &[u8]) {
        for &byte in text.iter().rev() {
            self.prepend(byte);
        }
    }

    /// Prepends `digits`, all at once.
    fn prepend_fixed<const N: usize>(&mut self, digits: [u8; N]) {
        if let Some(at) = self.start.checked_sub(N)
            && let Some(slot) = self.bytes.get_mut(at..self.start)
        {
            slot.copy_from_slice(&digits);
            self.start = at;
        }
    }

    /// Prepends the decimal digits of `value` (no sign, no leading zero).
    ///
    /// Eight digits at a time while more remain (a fixed-size store, no loop over bytes),
    /// then the leading ones two at a time.
    fn prepend_u64(&mut self, mut value: u64) {
        while value >= 100_000_000 {
            // `value % 10⁸ < 10⁸` fits a u32.
            let low = (value % 100_000_000) as u32;
            value /= 100_000_000;
            let (hi, lo) = (low / 10_000, low % 10_000);
            let [a, b] = pair(hi / 100);
            let [c, d] = pair(hi % 100);
            let [e, f] = pair(lo / 100);
            let [g, h] = pair(lo % 100);
            self.prepend_fixed([a, b, c, d, e, f, g, h]);
        }
        // `value < 10⁸` fits a u32.
        let mut rest = value as u32;
        while rest >= 100 {
            self.prepend_fixed(pair(rest % 100));
            rest /= 100;
        }
        if rest >= 10 {
            self.prepend_fixed(pair(rest));
        } else {
            self.prepend_fixed([b'0' + rest as u8]);
        }
    }
}

/// The two ASCII digits of `n` (< 100; larger values give those of `n % 100`).
fn pair(n: u32) -> [u8; 2] {
    let at = (n % 100) as usize * 2;
    [DIGIT_PAIRS[at], DIGIT_PAIRS[at + 1]]
}

/// Parses a canonical unsigned decimal: digits only, no sign, no leading zero.
pub fn parse_u64(text: &str) -> Result<u64, IntProblem> {
    let bytes = text.as_bytes();
    match bytes {
        [] => return Err(IntProblem::Empty),
        [b'0', _, ..] => {
            return Err(if bytes.iter().all(u8::is_ascii_digit) {
                IntProblem::LeadingZero
            } else {
                IntProblem::NotADigit
            });
        }
        _ => {}
    }
    let mut value: u64 = 0;
    let mut overflow = false;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return Err(IntProblem::NotADigit);
        }
        match value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
        {
            Some(v) => value = v,
            // Keep scanning: a later non-digit is the more useful complaint.
            None => overflow = true,
        }
    }
    if overflow {
        Err(IntProblem::Overflow)
    } else {
        Ok(value)
    }
}

fn parse_column(index: usize, text: &str) -> Result<u64, RowError> {
    parse_u64(text).map_err(|problem| RowError::BadInteger {
        column: COLUMNS[index],
        found: quote(text),
        problem,
    })
}

/// At most [`MAX_QUOTED`] bytes of `text`, cut at a character boundary.
fn quote(text: &str) -> String {
    let mut end = text.len().min(MAX_QUOTED);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// What [`read_line_bounded`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// The input has ended; nothing was read.
    Eof,
    /// A line is in the buffer, without its `\n`; `terminated` is false for a last line that
    /// has none (a file cut off mid-line).
    Line {
        /// Whether the line ended with `\n`.
        terminated: bool,
    },
    /// The line was longer than the limit: it was consumed to its end but not kept (the
    /// buffer is empty).
    TooLong,
}

/// Reads the next line of `reader` into `buf` (cleared first; the `\n` is consumed, not
/// kept), keeping at most `max` bytes of it. A longer line is skipped whole and reported as
/// [`LineRead::TooLong`], so a file with a huge line, or none at all, never buffers more than
/// `max` bytes. Works on bytes: whether a line is UTF-8 is the caller's question. Only I/O
/// errors are errors.
pub fn read_line_bounded<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => LineRead::Eof,
                (true, true) => LineRead::TooLong,
                (true, false) => LineRead::Line { terminated: false },
            });
        }
        any = true;
        let (body, used, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        if !too_long {
            if buf.len() + body.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(body);
            }
        }
        reader.consume(used);
        if done {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line { terminated: true }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_as_bytes_with_a_bounded_length() {
        let mut input = Vec::new();
        input.extend_from_slice(b"short\n");
        input.extend_from_slice(&[0xff, 0xfe, b'\n']);
        input.extend_from_slice(&[b'x'; 100]);
        input.push(b'\n');
        input.extend_from_slice(b"\n");
        input.extend_from_slice(&[b'y'; 10]);
        input.push(b'\n');
        input.extend_from_slice(b"cut off");
        // A reader buffer smaller than a line: lines span several fills.
        let mut reader = io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            let read = read_line_bounded(&mut reader, &mut buf, 10).unwrap();
            if read == LineRead::Eof {
                break;
            }
            got.push((read, buf.clone()));
        }
        let line = |terminated, bytes: &[u8]| (LineRead::Line { terminated }, bytes.to_vec());
        assert_eq!(
            got,
            [
                line(true, b"short"),
                line(true, &[0xff, 0xfe]),
                (LineRead::TooLong, Vec::new()),
                line(true, b""),
                line(true, &[b'y'; 10]),
                line(false, b"cut off"),
            ]
        );
        // A huge line without a newline is skipped whole, holding at most the limit.
        let huge = vec![b'z'; 1 << 20];
        let mut reader = io::BufReader::new(&huge[..]);
        assert_eq!(
            read_line_bounded(&mut reader, &mut buf, 150).unwrap(),
            LineRead::TooLong
        );
        assert!(buf.capacity() <= 1024, "{}", buf.capacity());
        assert_eq!(
            read_line_bounded(&mut reader, &mut buf, 150).unwrap(),
            LineRead::Eof
        );
    }

    const EDGES: [u64; 8] = [
        0,
        1,
        9,
        10,
        99,
        1_700_000_000_123_456_789,
        u64::MAX - 1,
        u64::MAX,
    ];

    fn row(kind: RowKind, v: u64, table_id: u32) -> SinkRow {
        SinkRow {
            kind,
            table_id,
            schema_ver: v,
            pk: v,
            produced_ns: v,
            synced_ns: v,
            sink_ns: v,
        }
    }

    #[test]
    fn writes_the_documented_format() {
        let mut buf = Vec::new();
        SinkRow {
            kind: RowKind::Ddl,
            table_id: 3,
            schema_ver: 1,
            pk: 10,
            produced_ns: 100,
            synced_ns: 250,
            sink_ns: 0,
        }
        .write_to(&mut buf);
        assert_eq!(buf, b"ddl,3,1,10,100,250,0\n");
        row(RowKind::Data, u64::MAX, u32::MAX).write_to(&mut buf);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text.lines().nth(1).unwrap(),
            format!("data,{},{m},{m},{m},{m},{m}", u32::MAX, m = u64::MAX)
        );
    }

    #[test]
    fn integers_format_like_std() {
        let digits = |x: u64| {
            let mut line = Line::new();
            line.prepend_u64(x);
            line.as_bytes().to_vec()
        };
        let mut v: u64 = 1;
        for _ in 0..20 {
            for x in [v - 1, v, v + 1] {
                assert_eq!(digits(x), x.to_string().as_bytes());
            }
            v = v.saturating_mul(10);
        }
        for x in EDGES {
            assert_eq!(digits(x), x.to_string().as_bytes());
        }
    }

    #[test]
    fn write_then_parse_round_trips_edge_values() {
        let mut buf = Vec::with_capacity(256);
        for kind in [RowKind::Data, RowKind::Ddl] {
            for table_id in [0, 1, 9_999, u32::MAX] {
                for a in EDGES {
                    for b in EDGES {
                        let original = SinkRow {
                            kind,
                            table_id,
                            schema_ver: a,
                            pk: b,
                            produced_ns: a,
                            synced_ns: b,
                            sink_ns: a ^ b,
                        };
                        buf.clear();
                        original.write_to(&mut buf);
                        assert_eq!(buf.last(), Some(&b'\n'));
                        let line = std::str::from_utf8(&buf[..buf.len() - 1]).unwrap();
                        assert_eq!(SinkRow::parse(line), Ok(original), "{line}");
                        assert_eq!(original.to_string(), line);
                    }
                }
            }
        }
    }

    #[test]
    fn write_reuses_the_buffer_without_growing() {
        let mut buf = Vec::with_capacity(256);
        let ptr = buf.as_ptr();
        for _ in 0..1000 {
            buf.clear();
            row(RowKind::Data, u64::MAX, u32::MAX).write_to(&mut buf);
        }
        assert_eq!(buf.as_ptr(), ptr);
        assert_eq!(buf.capacity(), 256);
    }

    #[test]
    fn wrong_field_count_is_reported() {
        assert_eq!(
            SinkRow::parse("data,1,2,3,4,5"),
            Err(RowError::FieldCount { found: 6 })
        );
        assert_eq!(
            SinkRow::parse("data,1,2,3,4,5,6,7"),
            Err(RowError::FieldCount { found: 8 })
        );
        assert_eq!(SinkRow::parse(""), Err(RowError::FieldCount { found: 1 }));
    }

    #[test]
    fn bad_kind_is_reported() {
        let err = SinkRow::parse("DATA,1,2,3,4,5,6").unwrap_err();
        assert_eq!(
            err,
            RowError::BadKind {
                found: "DATA".into()
            }
        );
        assert!(err.to_string().contains("DATA"), "{err}");
    }

    #[test]
    fn bad_integers_name_their_column() {
        let cases: [(&str, &str, IntProblem); 9] = [
            ("data,x,0,1,0,0,0", "table_id", IntProblem::NotADigit),
            (
                "data,4294967296,0,1,0,0,0",
                "table_id",
                IntProblem::Overflow,
            ),
            ("data,0,,1,0,0,0", "schema_ver", IntProblem::Empty),
            ("data,0,0,abc,0,0,0", "pk", IntProblem::NotADigit),
            ("data,0,0,+1,0,0,0", "pk", IntProblem::NotADigit),
            ("data,0,0,-1,0,0,0", "pk", IntProblem::NotADigit),
            ("ddl,0,0,1,007,0,0", "produced_ns", IntProblem::LeadingZero),
            (
                "ddl,0,0,1,0,18446744073709551616,0",
                "synced_ns",
                IntProblem::Overflow,
            ),
            ("ddl,0,0,1,0,0,5\r", "sink_ns", IntProblem::NotADigit),
        ];
        for (line, column, problem) in cases {
            match SinkRow::parse(line) {
                Err(RowError::BadInteger {
                    column: c,
                    problem: p,
                    ..
                }) => {
                    assert_eq!((c, p), (column, problem), "{line}");
                }
                other => panic!("{line}: expected BadInteger in {column}, got {other:?}"),
            }
        }
        let err = SinkRow::parse("data,0,0,abc,0,0,0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad integer \"abc\" in column `pk`: not a decimal digit string"
        );
    }

    #[test]
    fn spaces_are_not_tolerated() {
        assert!(SinkRow::parse("data, 1,0,1,0,0,0").is_err());
        assert!(SinkRow::parse(" data,1,0,1,0,0,0").is_err());
        assert!(SinkRow::parse("data,1,0,1,0,0,0 ").is_err());
    }

    #[test]
    fn quoted_excerpts_are_truncated_on_char_boundaries() {
        let long = format!("data,0,0,{},0,0,0", "é".repeat(100));
        match SinkRow::parse(&long) {
            Err(RowError::BadInteger { found, .. }) => {
                assert!(found.len() <= MAX_QUOTED);
                assert!(found.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_u64_accepts_exactly_the_canonical_forms() {
        assert_eq!(parse_u64("0"), Ok(0));
        assert_eq!(parse_u64("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_u64("00"), Err(IntProblem::LeadingZero));
        assert_eq!(parse_u64("0x1"), Err(IntProblem::NotADigit));
        assert_eq!(
            parse_u64("99999999999999999999x"),
            Err(IntProblem::NotADigit)
        );
        assert_eq!(parse_u64("99999999999999999999"), Err(IntProblem::Overflow));
    }

    mod prop {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #[test]
            fn any_row_round_trips(
                ddl in any::<bool>(),
                table_id in any::<u32>(),
                values in any::<[u64; 5]>(),
            ) {
                let original = SinkRow {
                    kind: if ddl { RowKind::Ddl } else { RowKind::Data },
                    table_id,
                    schema_ver: values[0],
                    pk: values[1],
                    produced_ns: values[2],
                    synced_ns: values[3],
                    sink_ns: values[4],
                };
                let mut buf = Vec::new();
                original.write_to(&mut buf);
                let text = std::str::from_utf8(&buf).unwrap();
                prop_assert_eq!(SinkRow::parse(text.trim_end_matches('\n')), Ok(original));
            }

            #[test]
            fn parse_never_panics(line in ".{0,80}") {
                let _ = SinkRow::parse(&line);
            }
        }
    }
}
