//! `microcosm executor`: runs one executor until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use microcosm_control::executor::{ExecutorConfig, ExecutorServer};
use tracing::info;

/// Flags of `microcosm executor`; each overrides the same key of the config file.
#[derive(Args, Debug)]
pub struct ExecutorArgs {
    /// TOML config file (see config/executor-*.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data-plane address to listen on.
    #[arg(long)]
    listen_addr: Option<SocketAddr>,
    /// Master addresses, comma separated.
    #[arg(long, value_delimiter = ',')]
    masters: Option<Vec<String>>,
    /// Certificate directory.
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// Name of this executor.
    #[arg(long)]
    name: Option<String>,
    /// Task slots offered.
    #[arg(long)]
    slots: Option<u32>,
    /// Engine worker threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Heartbeat interval (ms).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// TTL (ms).
    #[arg(long)]
    ttl_ms: Option<u64>,
}

impl ExecutorArgs {
    fn config(self) -> anyhow::Result<ExecutorConfig> {
        let file = match &self.config {
            Some(path) => Some((
                path.clone(),
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
        let mut set = |k: &str, v: Option<toml::Value>| {
            if let Some(v) = v {
                doc.insert(k.to_string(), v);
            }
        };
        let int = |v: u64| toml::Value::Integer(v as i64);
        set(
            "listen-addr",
            self.listen_addr.map(|a| toml::Value::String(a.to_string())),
        );
        set(
            "masters",
            self.masters
                .map(|l| toml::Value::Array(l.into_iter().map(toml::Value::String).collect())),
        );
        set(
            "certs-dir",
            self.certs_dir
                .map(|p| toml::Value::String(p.display().to_string())),
        );
        set("name", self.name.map(toml::Value::String));
        set("slots", self.slots.map(|v| int(v.into())));
        set("workers", self.workers.map(|v| int(v as u64)));
        set("heartbeat-ms", self.heartbeat_ms.map(int));
        set("ttl-ms", self.ttl_ms.map(int));
        match ExecutorConfig::from_toml(&toml::to_string(&doc)?) {
            Ok(c) => Ok(c),
            Err(merged) => {
                // Point into the user's file when the file itself is at fault (an unknown key,
                // a wrong type), rather than into the merged document.
                if let Some((path, text)) = &file
                    && let Err(own) = ExecutorConfig::from_toml(text)
                    && !own.to_string().contains("missing field")
                {
                    anyhow::bail!("config {}: {own}", path.display());
                }
                Err(merged.into())
            }
        }
    }
}

/// Runs an executor until interrupted.
pub async fn run(args: ExecutorArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let server = ExecutorServer::start(config, Arc::new(crate::jobs::JobTypes)).await?;
    info!(addr = %server.local_addr(), "executor serving");
    crate::master::shutdown_signal().await;
    info!("shutting down");
    server.shutdown().await;
    Ok(())
}
