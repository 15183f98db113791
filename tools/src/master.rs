//! `microcosm master`: runs one master until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use microcosm_control::master::{MasterConfig, MasterServer};

use crate::config::Overrides;
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
    /// Heartbeat interval the leader gives executors when they register (ms).
    #[arg(long)]
    executor_heartbeat_ms: Option<u64>,
    /// Silence after which the leader declares an executor lost (ms).
    #[arg(long)]
    executor_ttl_ms: Option<u64>,
}

impl MasterArgs {
    fn config(self) -> anyhow::Result<MasterConfig> {
        let mut o = Overrides::default();
        o.int("node-id", self.node_id)
            .set("name", self.name)
            .display("listen-addr", self.listen_addr)
            .path("data-dir", self.data_dir)
            .path("certs-dir", self.certs_dir)
            .set("cluster-id", self.cluster_id)
            .list("initial-members", self.initial_members)
            .list("join", self.join)
            .int("heartbeat-ms", self.heartbeat_ms)
            .int("election-timeout-min-ms", self.election_timeout_min_ms)
            .int("election-timeout-max-ms", self.election_timeout_max_ms)
            .int("executor-heartbeat-ms", self.executor_heartbeat_ms)
            .int("executor-ttl-ms", self.executor_ttl_ms);
        o.load(self.config.as_deref(), MasterConfig::from_toml)
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
