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
    /// Members of a new cluster, `id=ip:port`, comma separated.
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
    /// How long a write may wait for a quorum before it fails with "no quorum" (ms).
    #[arg(long)]
    write_timeout_ms: Option<u64>,
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
            .int("write-timeout-ms", self.write_timeout_ms)
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: MasterArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<MasterConfig> {
        let cli = Cli::try_parse_from(std::iter::once("master").chain(args.iter().copied()))?;
        cli.args.config()
    }

    /// Every key of the example configs has a flag that overrides it.
    #[test]
    fn every_key_of_the_example_configs_has_a_flag_that_overrides_it() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/master-single.toml");
        let from_file = config(&["--config", file]).unwrap();
        assert_eq!(from_file.write_timeout_ms, 2000);
        let flags = config(&[
            "--config",
            file,
            "--node-id",
            "7",
            "--name",
            "m7",
            "--listen-addr",
            "127.0.0.1:7999",
            "--data-dir",
            "/d",
            "--certs-dir",
            "/c",
            "--cluster-id",
            "other",
            "--initial-members",
            "7=127.0.0.1:7999",
            "--heartbeat-ms",
            "60",
            "--election-timeout-min-ms",
            "200",
            "--election-timeout-max-ms",
            "400",
            "--write-timeout-ms",
            "5000",
            "--executor-heartbeat-ms",
            "300",
            "--executor-ttl-ms",
            "2000",
        ])
        .unwrap();
        assert_eq!(flags.write_timeout_ms, 5000);
        assert_eq!(
            (
                flags.node_id,
                flags.name.as_deref(),
                flags.cluster_id.as_str()
            ),
            (7, Some("m7"), "other")
        );
        assert_eq!(
            (flags.heartbeat_ms, flags.election_timeout_min_ms),
            (60, 200)
        );
        assert_eq!(
            (flags.executor_heartbeat_ms, flags.executor_ttl_ms),
            (300, 2000)
        );
        // Every key the example configs set is one the flags above override.
        for name in [
            "master-single.toml",
            "master-1.toml",
            "master-2.toml",
            "master-3.toml",
            "master-4-join.toml",
        ] {
            let path = format!("{}/../config/{name}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            let doc: toml::Table = text.parse().unwrap();
            let help = {
                use clap::CommandFactory;
                Cli::command().render_long_help().to_string()
            };
            for key in doc.keys() {
                assert!(
                    help.contains(&format!("--{key}")),
                    "{name}: no flag --{key}"
                );
            }
        }
    }
}
