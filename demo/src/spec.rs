//! The demo job's specification: [`DemoSpec`], parsed from TOML and checked.
//!
//! A spec file uses kebab-case keys; every key is optional and unknown keys are rejected:
//!
//! ```toml
//! flow-id = "demo"            # [A-Za-z0-9_-]{1,128}; becomes a directory name
//! table-num = 10              # T producers, table ids 0..T-1       (1..=10000)
//! binlog-num = 4              # S binlog streams                    (1..=1024)
//! rcd-cnt = 100000            # data records per table              (1..=10^10)
//! ddl-freq = 10000            # a DDL before every pk % ddl-freq == 0 (0 = never);
//!                             # rcd-cnt / ddl-freq <= 2^32 - 1 (schema versions)
//! rate = 100000               # total records/s offered (0 = as fast as possible, <= 10^9)
//! sink-dir = "/tmp/microcosm-sink"
//! batch-size = 256            # records per batch                   (1..=65536)
//! linger-us = 50              # how long a partial batch may wait   (0..=10^6)
//! checkpoint-interval-ms = 1000 #                                  (10..=3600000)
//! ```
//!
//! The legacy key `servers` (a list of addresses) is still accepted: when `binlog-num` is
//! absent its length is used as `binlog-num`, with a warning; when both are given they must
//! agree.
//!
//! Integers are read as `i64` and range-checked afterwards, so a negative or oversized
//! value is reported with the key's name ("table-num must be between 1 and 10000, got -3").
//! Type errors (`table-num = "ten"`) come from the TOML parser, whose message quotes the
//! offending line and therefore the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a spec could not be parsed, applied or validated.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The text is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("invalid demo spec: {0}")]
    Toml(#[from] toml::de::Error),
    /// An integer key is outside its allowed range.
    #[error("{key} must be between {min} and {max}, got {got}")]
    OutOfRange {
        /// The spec key, e.g. `table-num`.
        key: &'static str,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
        /// The value given (wide enough for both negative inputs and `u64` fields).
        got: i128,
    },
    /// `flow-id` cannot be used as a directory name.
    #[error("flow-id {flow_id:?} is invalid: {reason}")]
    InvalidFlowId {
        /// The rejected value.
        flow_id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `sink-dir` is the empty path.
    #[error("sink-dir must not be empty")]
    EmptySinkDir,
    /// `rcd-cnt / ddl-freq` is more schema versions per table than a record's 32-bit
    /// version field holds.
    #[error(
        "rcd-cnt / ddl-freq = {rcd_cnt} / {ddl_freq} = {versions} schema versions per table; at most {max} are supported (raise ddl-freq or lower rcd-cnt)"
    )]
    TooManyVersions {
        /// The `rcd-cnt` value.
        rcd_cnt: u64,
        /// The `ddl-freq` value.
        ddl_freq: u64,
        /// Versions the spec needs.
        versions: u64,
        /// The largest supported, [`MAX_SCHEMA_VERSIONS`].
        max: u64,
    },
    /// Both `binlog-num` and the legacy `servers` were given and disagree.
    #[error("binlog-num is {binlog_num} but servers lists {servers} entries; give only binlog-num")]
    ServersMismatch {
        /// The `binlog-num` value given.
        binlog_num: i64,
        /// The number of entries in `servers`.
        servers: usize,
    },
    /// The spec could not be written as TOML (for example a non-UTF-8 `sink-dir`).
    #[error("cannot write the demo spec as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
}

/// An inclusive allowed range for one integer key.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    key: &'static str,
    min: u64,
    max: u64,
}

impl Bounds {
    /// Checks a value as read from TOML or a CLI flag (possibly negative).
    fn check_i64(self, got: i64) -> Result<u64, SpecError> {
        match u64::try_from(got) {
            Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
            _ => Err(self.error(i128::from(got))),
        }
    }

    /// Checks a value already held in a typed field.
    fn check_u64(self, got: u64) -> Result<(), SpecError> {
        if (self.min..=self.max).contains(&got) {
            Ok(())
        } else {
            Err(self.error(i128::from(got)))
        }
    }

    fn error(self, got: i128) -> SpecError {
        SpecError::OutOfRange {
            key: self.key,
            min: self.min,
            max: self.max,
            got,
        }
    }
}

const TABLE_NUM: Bounds = Bounds {
    key: "table-num",
    min: 1,
    max: 10_000,
};
const BINLOG_NUM: Bounds = Bounds {
    key: "binlog-num",
    min: 1,
    max: 1_024,
};
const RCD_CNT: Bounds = Bounds {
    key: "rcd-cnt",
    min: 1,
    max: 10_000_000_000,
};
const DDL_FREQ: Bounds = Bounds {
    key: "ddl-freq",
    min: 0,
    max: i64::MAX as u64,
};
const RATE: Bounds = Bounds {
    key: "rate",
    min: 0,
    max: 1_000_000_000,
};
const BATCH_SIZE: Bounds = Bounds {
    key: "batch-size",
    min: 1,
    max: 65_536,
};
const LINGER_US: Bounds = Bounds {
    key: "linger-us",
    min: 0,
    max: 1_000_000,
};
const CHECKPOINT_INTERVAL_MS: Bounds = Bounds {
    key: "checkpoint-interval-ms",
    min: 10,
    max: 3_600_000,
};

/// Longest accepted `flow-id`, in bytes (it is a single path component).
pub const MAX_FLOW_ID_LEN: usize = 128;

/// Most schema versions a table may reach (`rcd-cnt / ddl-freq`): a record carries its
/// version in 32 bits.
pub const MAX_SCHEMA_VERSIONS: u64 = u32::MAX as u64;

/// The demo job's parameters, validated.
///
/// Fields are public so a launcher can read them directly; after changing a field by hand
/// call [`DemoSpec::validate`] (or change it through [`DemoSpecOverrides::apply`], which
/// validates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DemoSpec {
    /// Job name; the sinks write under `<sink-dir>/<flow-id>/`.
    pub flow_id: String,
    /// T: number of tables, hence producers (table ids `0..T`).
    pub table_num: u32,
    /// S: number of binlog streams (each with a receiver, a syncer and a sink).
    pub binlog_num: u32,
    /// Data records per table (pks `1..=rcd_cnt`).
    pub rcd_cnt: u64,
    /// A producer bumps its table's schema version at every `pk % ddl_freq == 0`; 0 = never.
    pub ddl_freq: u64,
    /// Total records per second offered by all producers together; 0 = unthrottled.
    pub rate: u64,
    /// Root directory of the sink output.
    pub sink_dir: PathBuf,
    /// Records per batch on every edge.
    pub batch_size: u32,
    /// How long (µs) a partially filled batch may wait before it is sent.
    pub linger_us: u64,
    /// Interval between checkpoints, in milliseconds. Each checkpoint costs a burst of work
    /// outside the engine threads (snapshot reports, the sinks' fsyncs, the leader's raft
    /// commit) that delays the records in flight for a few ms; a recovery replays at most
    /// one interval of records. The default, 1 s, keeps that burst to 1 % of the time.
    pub checkpoint_interval_ms: u64,
}

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec {
            flow_id: "demo".to_owned(),
            table_num: 10,
            binlog_num: 4,
            rcd_cnt: 100_000,
            ddl_freq: 10_000,
            rate: 100_000,
            sink_dir: std::env::temp_dir().join("microcosm-sink"),
            batch_size: 256,
            linger_us: 50,
            checkpoint_interval_ms: 1000,
        }
    }
}

/// One DDL a producer must emit: table `table` moves to schema `version` just before its
/// data record `pk` (which carries `version`), and every stream carries it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpectedDdl {
    /// The table whose schema changes.
    pub table: u32,
    /// The new schema version (1 for the first DDL).
    pub version: u64,
    /// The pk of the data record that follows the DDL.
    pub pk: u64,
}

impl DemoSpec {
    /// Parses and validates a spec; absent keys take their defaults.
    pub fn from_toml_str(text: &str) -> Result<DemoSpec, SpecError> {
        let overrides: DemoSpecOverrides = toml::from_str(text)?;
        let mut spec = DemoSpec::default();
        overrides.apply(&mut spec)?;
        Ok(spec)
    }

    /// Writes the spec as TOML with every key present; [`DemoSpec::from_toml_str`] reads it
    /// back to an equal spec.
    pub fn to_toml_string(&self) -> Result<String, SpecError> {
        Ok(toml::to_string(self)?)
    }

    /// Checks every field's range, the `flow-id` charset, that `sink-dir` is not empty and
    /// that `rcd-cnt / ddl-freq` is at most [`MAX_SCHEMA_VERSIONS`].
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_flow_id(&self.flow_id)?;
        TABLE_NUM.check_u64(u64::from(self.table_num))?;
        BINLOG_NUM.check_u64(u64::from(self.binlog_num))?;
        RCD_CNT.check_u64(self.rcd_cnt)?;
        DDL_FREQ.check_u64(self.ddl_freq)?;
        RATE.check_u64(self.rate)?;
        BATCH_SIZE.check_u64(u64::from(self.batch_size))?;
        LINGER_US.check_u64(self.linger_us)?;
        CHECKPOINT_INTERVAL_MS.check_u64(self.checkpoint_interval_ms)?;
        if self.sink_dir.as_os_str().is_empty() {
            return Err(SpecError::EmptySinkDir);
        }
        let versions = self.ddls_per_table();
        if versions > MAX_SCHEMA_VERSIONS {
            return Err(SpecError::TooManyVersions {
                rcd_cnt: self.rcd_cnt,
                ddl_freq: self.ddl_freq,
                versions,
                max: MAX_SCHEMA_VERSIONS,
            });
        }
        Ok(())
    }

    /// Data records over all tables: `table-num × rcd-cnt`.
    pub fn total_data_records(&self) -> u64 {
        u64::from(self.table_num).saturating_mul(self.rcd_cnt)
    }

    /// DDLs each producer emits: `rcd-cnt / ddl-freq` (0 when `ddl-freq` is 0). This is
    /// also the highest schema version a table reaches.
    pub fn ddls_per_table(&self) -> u64 {
        self.rcd_cnt.checked_div(self.ddl_freq).unwrap_or(0)
    }

    /// DDL rows every single sink must write: one per (table, version).
    pub fn ddl_rows_per_stream(&self) -> u64 {
        u64::from(self.table_num).saturating_mul(self.ddls_per_table())
    }

    /// The schema version a table's data record `pk` carries: `pk / ddl-freq`
    /// (0 when `ddl-freq` is 0).
    pub fn version_of(&self, pk: u64) -> u64 {
        pk.checked_div(self.ddl_freq).unwrap_or(0)
    }

    /// The DDLs table `table`'s producer emits, in order (versions 1, 2, …).
    pub fn expected_ddls(&self, table: u32) -> impl Iterator<Item = ExpectedDdl> + use<> {
        let freq = self.ddl_freq;
        (1..=self.ddls_per_table()).map(move |version| ExpectedDdl {
            table,
            version,
            pk: version.saturating_mul(freq),
        })
    }

    /// The directory the sinks of this job write to: `<sink-dir>/<flow-id>`.
    pub fn output_dir(&self) -> PathBuf {
        self.sink_dir.join(&self.flow_id)
    }

    /// The file sink `stream` writes: `<sink-dir>/<flow-id>/sink_<stream>.csv`.
    pub fn sink_path(&self, stream: u32) -> PathBuf {
        sink_file_in(&self.output_dir(), stream)
    }
}

/// The file of sink `stream` inside a job's output directory: `<dir>/sink_<stream>.csv`.
pub fn sink_file_in(dir: &Path, stream: u32) -> PathBuf {
    dir.join(format!("sink_{stream}.csv"))
}

fn validate_flow_id(flow_id: &str) -> Result<(), SpecError> {
    let reason = if flow_id.is_empty() {
        Some("it must not be empty")
    } else if flow_id.len() > MAX_FLOW_ID_LEN {
        Some("it must be at most 128 bytes long")
    } else if !flow_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some("only ASCII letters, digits, '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SpecError::InvalidFlowId {
            flow_id: flow_id.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Optional replacements for a spec's keys, one per key: what a CLI collects from its
/// flags, and also what a spec file deserializes into (same kebab-case keys, unknown keys
/// rejected).
///
/// Integers are `i64` so that a negative value is reported against its key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DemoSpecOverrides {
    /// Replaces `flow-id`.
    pub flow_id: Option<String>,
    /// Replaces `table-num`.
    pub table_num: Option<i64>,
    /// Replaces `binlog-num`.
    pub binlog_num: Option<i64>,
    /// Legacy: when `binlog_num` is `None`, its length replaces `binlog-num`.
    pub servers: Option<Vec<String>>,
    /// Replaces `rcd-cnt`.
    pub rcd_cnt: Option<i64>,
    /// Replaces `ddl-freq`.
    pub ddl_freq: Option<i64>,
    /// Replaces `rate`.
    pub rate: Option<i64>,
    /// Replaces `sink-dir`.
    pub sink_dir: Option<PathBuf>,
    /// Replaces `batch-size`.
    pub batch_size: Option<i64>,
    /// Replaces `linger-us`.
    pub linger_us: Option<i64>,
    /// Replaces `checkpoint-interval-ms`.
    pub checkpoint_interval_ms: Option<i64>,
}

impl DemoSpecOverrides {
    /// Applies every `Some` field to `spec`, then validates the result. On error `spec` is
    /// left unchanged.
    pub fn apply(&self, spec: &mut DemoSpec) -> Result<(), SpecError> {
        let mut next = spec.clone();
        if let Some(flow_id) = &self.flow_id {
            next.flow_id.clone_from(flow_id);
        }
        if let Some(v) = self.table_num {
            next.table_num = narrow(TABLE_NUM, v)?;
        }
        if let Some(binlog_num) = self.binlog_num_with_legacy()? {
            next.binlog_num = narrow(BINLOG_NUM, binlog_num)?;
        }
        if let Some(v) = self.rcd_cnt {
            next.rcd_cnt = RCD_CNT.check_i64(v)?;
        }
        if let Some(v) = self.ddl_freq {
            next.ddl_freq = DDL_FREQ.check_i64(v)?;
        }
        if let Some(v) = self.rate {
            next.rate = RATE.check_i64(v)?;
        }
        if let Some(dir) = &self.sink_dir {
            next.sink_dir.clone_from(dir);
        }
        if let Some(v) = self.batch_size {
            next.batch_size = narrow(BATCH_SIZE, v)?;
        }
        if let Some(v) = self.linger_us {
            next.linger_us = LINGER_US.check_i64(v)?;
        }
        if let Some(v) = self.checkpoint_interval_ms {
            next.checkpoint_interval_ms = CHECKPOINT_INTERVAL_MS.check_i64(v)?;
        }
        next.validate()?;
        *spec = next;
        Ok(())
    }

    /// Resolves `binlog-num` against the legacy `servers` list.
    fn binlog_num_with_legacy(&self) -> Result<Option<i64>, SpecError> {
        let Some(servers) = &self.servers else {
            return Ok(self.binlog_num);
        };
        // A list longer than i64::MAX cannot exist in memory; saturate for the message.
        let count = i64::try_from(servers.len()).unwrap_or(i64::MAX);
        match self.binlog_num {
            Some(binlog_num) if binlog_num != count => Err(SpecError::ServersMismatch {
                binlog_num,
                servers: servers.len(),
            }),
            Some(binlog_num) => {
                tracing::warn!(
                    binlog_num,
                    "the `servers` key is deprecated and ignored; binlog-num is used"
                );
                Ok(Some(binlog_num))
            }
            None => {
                tracing::warn!(
                    binlog_num = count,
                    "the `servers` key is deprecated; using its length as binlog-num"
                );
                Ok(Some(count))
            }
        }
    }
}

/// Range-checks `v` and converts it to `u32`; every `u32` field's maximum fits in `u32`.
fn narrow(bounds: Bounds, v: i64) -> Result<u32, SpecError> {
    let checked = bounds.check_i64(v)?;
    u32::try_from(checked).map_err(|_| bounds.error(i128::from(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_the_defaults() {
        let spec = DemoSpec::from_toml_str("").unwrap();
        assert_eq!(spec, DemoSpec::default());
        assert_eq!(spec.flow_id, "demo");
        assert_eq!(spec.table_num, 10);
        assert_eq!(spec.binlog_num, 4);
        assert_eq!(spec.rcd_cnt, 100_000);
        assert_eq!(spec.ddl_freq, 10_000);
        assert_eq!(spec.rate, 100_000);
        assert_eq!(spec.batch_size, 256);
        assert_eq!(spec.linger_us, 50);
        assert_eq!(spec.checkpoint_interval_ms, 1000);
        assert_eq!(spec.sink_dir, std::env::temp_dir().join("microcosm-sink"));
        spec.validate().unwrap();
    }

    #[test]
    fn every_key_is_read() {
        let spec = DemoSpec::from_toml_str(
            r#"
            flow-id = "job_7-a"
            table-num = 3
            binlog-num = 2
            rcd-cnt = 1000
            ddl-freq = 100
            rate = 0
            sink-dir = "/var/tmp/sinks"
            batch-size = 64
            linger-us = 0
            checkpoint-interval-ms = 1000
            "#,
        )
        .unwrap();
        assert_eq!(
            spec,
            DemoSpec {
                flow_id: "job_7-a".into(),
                table_num: 3,
                binlog_num: 2,
                rcd_cnt: 1000,
                ddl_freq: 100,
                rate: 0,
                sink_dir: PathBuf::from("/var/tmp/sinks"),
                batch_size: 64,
                linger_us: 0,
                checkpoint_interval_ms: 1000,
            }
        );
    }

    #[test]
    fn to_toml_string_round_trips() {
        let spec = DemoSpec {
            flow_id: "rt".into(),
            table_num: 10_000,
            binlog_num: 1_024,
            rcd_cnt: 10_000_000_000,
            ddl_freq: 0,
            rate: 1_000_000_000,
            sink_dir: PathBuf::from("/x/y z"),
            batch_size: 65_536,
            linger_us: 1_000_000,
            checkpoint_interval_ms: 10,
        };
        let text = spec.to_toml_string().unwrap();
        assert!(text.contains("table-num = 10000"), "{text}");
        assert_eq!(DemoSpec::from_toml_str(&text).unwrap(), spec);
        let default = DemoSpec::default();
        assert_eq!(
            DemoSpec::from_toml_str(&default.to_toml_string().unwrap()).unwrap(),
            default
        );
    }

    #[test]
    fn negative_integer_names_the_key() {
        let err = DemoSpec::from_toml_str("table-num = -3").unwrap_err();
        assert_eq!(
            err.to_string(),
            "table-num must be between 1 and 10000, got -3"
        );
        let err = DemoSpec::from_toml_str("rate = -1").unwrap_err();
        assert!(err.to_string().starts_with("rate must be between"), "{err}");
        let err = DemoSpec::from_toml_str("ddl-freq = -10").unwrap_err();
        assert!(err.to_string().contains("ddl-freq"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_rejected_with_their_key() {
        let cases = [
            ("table-num = 0", "table-num"),
            ("table-num = 10001", "table-num"),
            ("binlog-num = 0", "binlog-num"),
            ("binlog-num = 1025", "binlog-num"),
            ("rcd-cnt = 0", "rcd-cnt"),
            ("rcd-cnt = 10000000001", "rcd-cnt"),
            ("rate = 1000000001", "rate"),
            ("batch-size = 0", "batch-size"),
            ("batch-size = 65537", "batch-size"),
            ("linger-us = 1000001", "linger-us"),
            ("checkpoint-interval-ms = 0", "checkpoint-interval-ms"),
            ("checkpoint-interval-ms = 9", "checkpoint-interval-ms"),
        ];
        for (text, key) in cases {
            match DemoSpec::from_toml_str(text) {
                Err(SpecError::OutOfRange { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("{text}: expected OutOfRange for {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        let spec = DemoSpec::from_toml_str(
            "table-num = 1\nbinlog-num = 1\nrcd-cnt = 1\nddl-freq = 0\nrate = 0\n\
             batch-size = 1\nlinger-us = 1000000\ncheckpoint-interval-ms = 3600000",
        )
        .unwrap();
        assert_eq!(spec.table_num, 1);
        assert_eq!(spec.ddls_per_table(), 0);
    }

    #[test]
    fn type_errors_name_the_key() {
        for (text, key) in [
            ("table-num = \"ten\"", "table-num"),
            ("rate = 1.5", "rate"),
            ("servers = \"a:1\"", "servers"),
            ("flow-id = 7", "flow-id"),
        ] {
            let err = DemoSpec::from_toml_str(text).unwrap_err();
            assert!(matches!(err, SpecError::Toml(_)), "{text}: {err:?}");
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = DemoSpec::from_toml_str("table-nums = 3").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field"), "{msg}");
        assert!(msg.contains("table-nums"), "{msg}");
        // snake_case spellings are not the documented keys.
        assert!(DemoSpec::from_toml_str("table_num = 3").is_err());
    }

    #[test]
    fn legacy_servers_sets_binlog_num() {
        let spec = DemoSpec::from_toml_str(r#"servers = ["a:1", "b:1", "c:1"]"#).unwrap();
        assert_eq!(spec.binlog_num, 3);
        let spec = DemoSpec::from_toml_str("binlog-num = 2\nservers = [\"a:1\", \"b:1\"]").unwrap();
        assert_eq!(spec.binlog_num, 2);
    }

    #[test]
    fn legacy_servers_conflicting_with_binlog_num_is_an_error() {
        let err = DemoSpec::from_toml_str("binlog-num = 2\nservers = [\"a:1\"]").unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::ServersMismatch {
                    binlog_num: 2,
                    servers: 1
                }
            ),
            "{err:?}"
        );
        let err = DemoSpec::from_toml_str("servers = []").unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::OutOfRange {
                    key: "binlog-num",
                    got: 0,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn flow_id_must_be_a_safe_directory_name() {
        for bad in ["", "a/b", "..", "a b", "é", "x.y"] {
            let text = format!("flow-id = {bad:?}");
            let err = DemoSpec::from_toml_str(&text).unwrap_err();
            assert!(
                matches!(err, SpecError::InvalidFlowId { .. }),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains("flow-id"), "{err}");
        }
        let long = "a".repeat(MAX_FLOW_ID_LEN + 1);
        assert!(DemoSpec::from_toml_str(&format!("flow-id = {long:?}")).is_err());
        let ok = "a".repeat(MAX_FLOW_ID_LEN);
        assert!(DemoSpec::from_toml_str(&format!("flow-id = {ok:?}")).is_ok());
    }

    #[test]
    fn empty_sink_dir_is_rejected() {
        let err = DemoSpec::from_toml_str("sink-dir = \"\"").unwrap_err();
        assert!(matches!(err, SpecError::EmptySinkDir), "{err:?}");
    }

    #[test]
    fn overrides_replace_only_given_keys_and_validate() {
        let mut spec = DemoSpec::from_toml_str("table-num = 3\nrate = 5").unwrap();
        let overrides = DemoSpecOverrides {
            rate: Some(7),
            servers: Some(vec!["x".into(), "y".into()]),
            sink_dir: Some(PathBuf::from("/srv/out")),
            ..DemoSpecOverrides::default()
        };
        overrides.apply(&mut spec).unwrap();
        assert_eq!(spec.table_num, 3);
        assert_eq!(spec.rate, 7);
        assert_eq!(spec.binlog_num, 2);
        assert_eq!(spec.sink_dir, PathBuf::from("/srv/out"));

        let before = spec.clone();
        let bad = DemoSpecOverrides {
            rate: Some(1),
            batch_size: Some(-4),
            ..DemoSpecOverrides::default()
        };
        let err = bad.apply(&mut spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch-size must be between 1 and 65536, got -4"
        );
        assert_eq!(spec, before, "a failed apply must not change the spec");
    }

    #[test]
    fn validate_catches_hand_edited_fields() {
        let spec = DemoSpec {
            binlog_num: 0,
            ..DemoSpec::default()
        };
        assert!(matches!(
            spec.validate(),
            Err(SpecError::OutOfRange {
                key: "binlog-num",
                ..
            })
        ));
        let spec = DemoSpec {
            rcd_cnt: u64::MAX,
            ..DemoSpec::default()
        };
        let err = spec.validate().unwrap_err();
        assert!(err.to_string().contains(&u64::MAX.to_string()), "{err}");
    }

    #[test]
    fn more_schema_versions_than_a_record_holds_are_refused_naming_the_keys() {
        let err = DemoSpec::from_toml_str("rcd-cnt = 10000000000\nddl-freq = 1").unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::TooManyVersions {
                    rcd_cnt: 10_000_000_000,
                    ddl_freq: 1,
                    versions: 10_000_000_000,
                    max: MAX_SCHEMA_VERSIONS,
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("rcd-cnt") && msg.contains("ddl-freq"), "{msg}");
        // A hand-built spec is caught by validate, and the boundary is accepted.
        let spec = DemoSpec {
            rcd_cnt: 2 * MAX_SCHEMA_VERSIONS + 2,
            ddl_freq: 2,
            ..DemoSpec::default()
        };
        assert!(matches!(
            spec.validate(),
            Err(SpecError::TooManyVersions { .. })
        ));
        let spec = DemoSpec {
            rcd_cnt: 2 * MAX_SCHEMA_VERSIONS + 2,
            ddl_freq: 3,
            ..DemoSpec::default()
        };
        spec.validate().unwrap();
        let spec = DemoSpec::from_toml_str("rcd-cnt = 4294967295\nddl-freq = 1").unwrap();
        assert_eq!(spec.ddls_per_table(), MAX_SCHEMA_VERSIONS);
        DemoSpec::from_toml_str("rcd-cnt = 4294967296\nddl-freq = 1").unwrap_err();
    }

    #[test]
    fn derived_counts_and_expected_ddls() {
        let spec = DemoSpec::from_toml_str("table-num = 3\nrcd-cnt = 25\nddl-freq = 10").unwrap();
        assert_eq!(spec.total_data_records(), 75);
        assert_eq!(spec.ddls_per_table(), 2);
        assert_eq!(spec.ddl_rows_per_stream(), 6);
        assert_eq!(spec.version_of(9), 0);
        assert_eq!(spec.version_of(10), 1);
        assert_eq!(spec.version_of(25), 2);
        let ddls: Vec<_> = spec.expected_ddls(2).collect();
        assert_eq!(
            ddls,
            vec![
                ExpectedDdl {
                    table: 2,
                    version: 1,
                    pk: 10
                },
                ExpectedDdl {
                    table: 2,
                    version: 2,
                    pk: 20
                },
            ]
        );
        let none = DemoSpec::from_toml_str("ddl-freq = 0").unwrap();
        assert_eq!(none.expected_ddls(0).count(), 0);
        assert_eq!(none.version_of(12345), 0);
    }

    #[test]
    fn output_paths() {
        let spec = DemoSpec::from_toml_str("flow-id = \"f1\"\nsink-dir = \"/data/sink\"").unwrap();
        assert_eq!(spec.output_dir(), PathBuf::from("/data/sink/f1"));
        assert_eq!(spec.sink_path(3), PathBuf::from("/data/sink/f1/sink_3.csv"));
    }
}
