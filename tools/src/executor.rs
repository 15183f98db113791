//! `microcosm executor`: runs one executor until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use microcosm_control::executor::{ExecutorConfig, ExecutorServer};
use microcosm_engine::SpinMode;

use crate::config::Overrides;
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
    /// µs an idle engine worker keeps polling for work (worker 0: and its network) before
    /// it sleeps (0 = at once).
    #[arg(long)]
    spin_us: Option<u64>,
    /// When to spin: `adaptive` (only while work keeps arriving within the spin window) or
    /// `always`.
    #[arg(long)]
    spin_mode: Option<SpinMode>,
    /// Heartbeat interval (ms), used only if the leader's answers give none.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Time without a heartbeat before the executor warns it is probably lost (ms); the
    /// current leader's, from its answers, takes precedence.
    #[arg(long)]
    ttl_ms: Option<u64>,
}

impl ExecutorArgs {
    fn config(self) -> anyhow::Result<ExecutorConfig> {
        let mut o = Overrides::default();
        o.display("listen-addr", self.listen_addr)
            .list("masters", self.masters)
            .path("certs-dir", self.certs_dir)
            .set("name", self.name)
            .int("slots", self.slots.map(u64::from))
            .int("workers", self.workers.map(|w| w as u64))
            .int("spin-us", self.spin_us)
            .display("spin-mode", self.spin_mode)
            .int("heartbeat-ms", self.heartbeat_ms)
            .int("ttl-ms", self.ttl_ms);
        o.load(self.config.as_deref(), ExecutorConfig::from_toml)
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
