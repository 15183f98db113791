//! Node configuration: a TOML file whose keys can be overridden by flags of the same name.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Flag values to lay over the file, by TOML key.
#[derive(Default)]
pub struct Overrides {
    doc: toml::Table,
    /// A flag value no config key can hold, reported by [`Overrides::load`].
    invalid: Option<String>,
}

impl Overrides {
    /// Sets `key` when the flag was given.
    pub fn set(&mut self, key: &str, value: Option<impl Into<toml::Value>>) -> &mut Self {
        if let Some(v) = value {
            self.doc.insert(key.to_string(), v.into());
        }
        self
    }

    /// Sets a path-valued `key`.
    pub fn path(&mut self, key: &str, value: Option<PathBuf>) -> &mut Self {
        self.set(key, value.map(|p| p.display().to_string()))
    }

    /// Sets an address- or other `Display`-valued `key`.
    pub fn display(&mut self, key: &str, value: Option<impl std::fmt::Display>) -> &mut Self {
        self.set(key, value.map(|v| v.to_string()))
    }

    /// Sets a list-valued `key`.
    pub fn list(&mut self, key: &str, value: Option<Vec<String>>) -> &mut Self {
        self.set(
            key,
            value.map(|l| toml::Value::Array(l.into_iter().map(toml::Value::String).collect())),
        )
    }

    /// Sets an integer `key`. A value above what TOML holds (`i64::MAX`) is an error of
    /// [`Overrides::load`], naming the flag.
    pub fn int(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        let Some(v) = value else { return self };
        match i64::try_from(v) {
            Ok(v) => self.set(key, Some(toml::Value::Integer(v))),
            Err(_) => {
                self.invalid.get_or_insert_with(|| {
                    // Flags are named like the keys they set.
                    format!("--{key}: {v} is larger than {}", i64::MAX)
                });
                self
            }
        }
    }

    /// Reads `file` (if any), lays the flags over it, and parses the result with `parse`.
    /// Errors caused by the file itself (an unknown key, a wrong type) name the file and the
    /// line in it rather than the merged document.
    pub fn load<T, E>(
        &self,
        file: Option<&Path>,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> anyhow::Result<T>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        if let Some(invalid) = &self.invalid {
            anyhow::bail!("{invalid}");
        }
        let file = match file {
            Some(path) => Some((
                path,
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?,
            )),
            None => None,
        };
        let mut doc: toml::Table = match &file {
            Some((path, text)) => text.parse().map_err(|e: toml::de::Error| {
                anyhow::anyhow!(
                    "config {}: {}",
                    path.display(),
                    microcosm_control::toml_error_line(&e, text)
                )
            })?,
            None => toml::Table::new(),
        };
        doc.extend(self.doc.clone());
        match parse(&toml::to_string(&doc)?) {
            Ok(c) => Ok(c),
            Err(merged) => {
                if let Some((path, text)) = &file
                    && let Err(own) = parse(text)
                    && !own.to_string().contains("missing field")
                {
                    anyhow::bail!("config {}: {own}", path.display());
                }
                Err(merged.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag value TOML cannot hold is refused naming the flag, not clamped.
    #[test]
    fn an_integer_flag_too_large_for_toml_is_refused_naming_it() {
        let parse = |t: &str| t.parse::<toml::Table>();
        let mut o = Overrides::default();
        o.int("node-id", Some(u64::MAX));
        let err = o.load(None, parse).expect_err("refused").to_string();
        assert!(
            err.contains("--node-id") && err.contains(&u64::MAX.to_string()),
            "{err}"
        );
        let mut o = Overrides::default();
        o.int("node-id", Some(7));
        let doc = o.load(None, parse).expect("a value TOML holds");
        assert_eq!(doc["node-id"].as_integer(), Some(7));
    }
}
