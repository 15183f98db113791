//! `microcosm master`: runs one master until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use microcosm_control::master::{MasterConfig, MasterServer};
use tracing::info;

/// Flags of `microcosm master`; each overrides the same key of the config file.
#[derive(Args, Debug)]
pub struct MasterArgs {
    /// TOML config file (see config/master-*.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Raft id of this master.
    #[arg(long)]
    node_id: Option<u64>,
    /// Name of this master.
    #[arg(long)]
    name: Option<String>,
    /// Address to listen on (and advertise).
    #[arg(long)]
    listen_addr: Option<SocketAddr>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Certificate directory.
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// Cluster id.
    #[arg(long)]
    cluster_id: Option<String>,
    /// Members of a new cluster, `id=host:port`, comma separated.
    #[arg(long, value_delimiter = ',')]
    initial_members: Option<Vec<String>>,
    /// Running masters to join, comma separated.
    #[arg(long, value_delimiter = ',')]
    join: Option<Vec<String>>,
    /// Raft heartbeat interval (ms).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Election timeout lower bound (ms).
    #[arg(long)]
    election_timeout_min_ms: Option<u64>,
    /// Election timeout upper bound (ms).
    #[arg(long)]
    election_timeout_max_ms: Option<u64>,
}

impl MasterArgs {
    fn config(self) -> anyhow::Result<MasterConfig> {
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
        let path = |p: PathBuf| toml::Value::String(p.display().to_string());
        let list =
            |l: Vec<String>| toml::Value::Array(l.into_iter().map(toml::Value::String).collect());
        set(
            "node-id",
            self.node_id.map(|v| toml::Value::Integer(v as i64)),
        );
        set("name", self.name.map(toml::Value::String));
        set(
            "listen-addr",
            self.listen_addr.map(|a| toml::Value::String(a.to_string())),
        );
        set("data-dir", self.data_dir.map(path));
        set("certs-dir", self.certs_dir.map(path));
        set("cluster-id", self.cluster_id.map(toml::Value::String));
        set("initial-members", self.initial_members.map(list));
        set("join", self.join.map(list));
        set(
            "heartbeat-ms",
            self.heartbeat_ms.map(|v| toml::Value::Integer(v as i64)),
        );
        set(
            "election-timeout-min-ms",
            self.election_timeout_min_ms
                .map(|v| toml::Value::Integer(v as i64)),
        );
        set(
            "election-timeout-max-ms",
            self.election_timeout_max_ms
                .map(|v| toml::Value::Integer(v as i64)),
        );
        match MasterConfig::from_toml(&toml::to_string(&doc)?) {
            Ok(c) => Ok(c),
            Err(merged) => {
                // Point into the user's file when the file itself is at fault (an unknown key,
                // a wrong type), rather than into the merged document.
                if let Some((path, text)) = &file
                    && let Err(own) = MasterConfig::from_toml(text)
                    && !own.to_string().contains("missing field")
                {
                    anyhow::bail!("config {}: {own}", path.display());
                }
                Err(merged.into())
            }
        }
    }
}

/// Runs a master until interrupted.
pub async fn run(args: MasterArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let server = MasterServer::start(config, Arc::new(crate::jobs::JobTypes)).await?;
    info!(addr = %server.local_addr(), "master serving");
    shutdown_signal().await;
    info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
