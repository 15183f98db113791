//! microcosm's control plane.
//!
//! Masters keep the cluster's metadata in a replicated state machine ([`meta`]) driven by
//! openraft and stored in redb. The leader places tasks with the pure [`scheduler`], tracks
//! executor liveness with the pure [`liveness`] detector and drives every job through the
//! explicit lifecycle state machine in [`job`], and completes consistent checkpoints from the
//! tasks' snapshots with the pure [`checkpoint`] tracker. The cores take inputs and time and return
//! decisions, so they are unit-tested without sockets or sleeps; the async shells around them
//! do the I/O over `microcosm-transport`.

pub mod checkpoint;
pub mod client;
pub mod exchange;
pub mod executor;
pub mod finals;
pub mod job;
pub mod leader;
pub mod liveness;
pub mod master;
pub mod meta;
pub mod proto;
pub mod reactor;
pub mod report_queue;
pub mod scheduler;

/// Describes a TOML parse error on one line, naming the key of the offending line when the
/// error points into a `key = value` line (toml's own message spans several lines).
pub fn toml_error_line(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return message.to_string();
    };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[start..].lines().next().unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.contains('[') => {
            format!("key {:?} (line {line_no}): {message}", key.trim())
        }
        _ => format!("line {line_no}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn toml_errors_name_the_key_on_one_line() {
        let text = "a = 1\nrcd-cnt = \"many\"\n";
        let err = toml::from_str::<std::collections::BTreeMap<String, i64>>(text).unwrap_err();
        let line = super::toml_error_line(&err, text);
        assert!(
            line.contains("\"rcd-cnt\"") && line.contains("line 2"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
