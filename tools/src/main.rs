//! `microcosm`: the one binary that launches masters and executors, manages cluster
//! certificates, and submits and inspects jobs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use microcosm_control::proto::JobAction;

mod bench;
mod certs;
mod client;
mod config;
mod demo;
mod executor;
mod floor;
mod jobs;
mod local;
mod master;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of `demo`, `bench` and `verify` when they ran to the end but the output did
/// not pass verification (or a job did not finish). Distinct from 1 (any other error) and
/// from 2, which clap uses for a usage error.
const NOT_VERIFIED: u8 = 3;

/// microcosm: a distributed dataflow engine and task scheduler.
#[derive(Parser)]
#[command(
    name = "microcosm",
    version,
    about,
    propagate_version = true,
    after_help = "Exit status: 0 on success; 1 on an error; 2 on a usage error; 3 when `demo`, \
                  `bench` or `verify` ran but the output failed verification (or a job did not \
                  finish)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the cluster CA and node certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run a master.
    Master(master::MasterArgs),
    /// Run an executor.
    Executor(executor::ExecutorArgs),
    /// Run the demo pipeline on a local cluster (child processes), verify it, and print a summary.
    Demo(demo::DemoArgs),
    /// Sweep offered rate × DDL frequency on a local cluster; write latency, throughput, CPU
    /// and memory per run to results.json, latency.svg and a table.
    Bench(bench::BenchArgs),
    /// Verify the output of a demo job.
    Verify {
        /// The job's output directory (`<sink-dir>/<flow-id>`).
        #[arg(long)]
        dir: PathBuf,
        /// The job spec the output was produced with.
        #[arg(long)]
        job: PathBuf,
    },
    /// Inspect the cluster.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Submit a job; prints its id.
    SubmitJob {
        #[command(flatten)]
        cluster: client::ClusterArgs,
        /// The job specification (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The job type.
        #[arg(long = "type", default_value = "demo")]
        job_type: String,
    },
    /// Inspect and control jobs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster CA and one certificate per role (master, executor, client).
    Init {
        /// Directory to write the certificates into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Name of the cluster, recorded in the CA certificate.
        #[arg(long, default_value = "microcosm")]
        cluster_name: String,
        /// Extra IP addresses or DNS names the node certificates are valid for
        /// (loopback and localhost are always included). Repeat or separate by commas.
        #[arg(long = "san", value_delimiter = ',')]
        sans: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every master with its role, term, last applied index and reachability; the executors.
    Status {
        #[command(flatten)]
        cluster: client::ClusterArgs,
        /// Also ask every alive executor for its data-plane connections: round-trip time,
        /// congestion window, losses and datagrams sent and received.
        #[arg(long)]
        connections: bool,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// List jobs.
    List {
        #[command(flatten)]
        cluster: client::ClusterArgs,
    },
    /// Show one job with its history.
    Status {
        /// Job id.
        id: u64,
        #[command(flatten)]
        cluster: client::ClusterArgs,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: u64,
        #[command(flatten)]
        cluster: client::ClusterArgs,
    },
    /// Pause a job.
    Pause {
        /// Job id.
        id: u64,
        #[command(flatten)]
        cluster: client::ClusterArgs,
    },
    /// Resume a paused job.
    Resume {
        /// Job id.
        id: u64,
        #[command(flatten)]
        cluster: client::ClusterArgs,
    },
}

fn main() -> ExitCode {
    // Before anything sizeable is allocated; inherited by the nodes a local cluster starts.
    let thp_off = microcosm_engine::disable_transparent_huge_pages();
    init_tracing();
    if !thp_off {
        tracing::debug!("transparent huge pages could not be turned off for this process");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    cluster_name,
                    sans,
                },
        } => certs::init(&dir, &cluster_name, &sans),
        // Store writes run on the blocking pool (`meta::store`), so one runtime thread
        // carries a master's RPCs and raft; the executor's data plane runs on its engine
        // thread, so its runtime only carries control traffic (a heartbeat every 250 ms).
        // One thread each: fewer idle wake-ups than two.
        Command::Master(args) => runtime_with(1).and_then(|rt| rt.block_on(master::run(args))),
        Command::Executor(args) => runtime_with(1).and_then(|rt| rt.block_on(executor::run(args))),
        Command::Demo(args) => match runtime().and_then(|rt| rt.block_on(demo::run(args))) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(NOT_VERIFIED),
            Err(e) => Err(e),
        },
        Command::Bench(args) => match runtime().and_then(|rt| rt.block_on(bench::run(args))) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(NOT_VERIFIED),
            Err(e) => Err(e),
        },
        Command::Verify { dir, job } => match verify(&dir, &job) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(NOT_VERIFIED),
            Err(e) => Err(e),
        },
        Command::Cluster {
            command:
                ClusterCommand::Status {
                    cluster,
                    connections,
                },
        } => runtime().and_then(|rt| rt.block_on(client::cluster_status(&cluster, connections))),
        Command::SubmitJob {
            cluster,
            config,
            job_type,
        } => runtime().and_then(|rt| rt.block_on(client::submit_job(&cluster, &job_type, &config))),
        Command::Job { command } => runtime().and_then(|rt| {
            rt.block_on(async {
                match command {
                    JobCommand::List { cluster } => client::job_list(&cluster).await,
                    JobCommand::Status { id, cluster } => client::job_status(&cluster, id).await,
                    JobCommand::Cancel { id, cluster } => {
                        client::job_control(&cluster, id, JobAction::Cancel).await
                    }
                    JobCommand::Pause { id, cluster } => {
                        client::job_control(&cluster, id, JobAction::Pause).await
                    }
                    JobCommand::Resume { id, cluster } => {
                        client::job_control(&cluster, id, JobAction::Resume).await
                    }
                }
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line. A cause whose text its parent's message already
/// ends with is not repeated (library errors often name their source in their own message).
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    let mut parent = line.clone();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !parent.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        parent = text;
    }
    line
}

fn verify(dir: &std::path::Path, job: &std::path::Path) -> anyhow::Result<bool> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(job).with_context(|| format!("cannot read {}", job.display()))?;
    let spec = microcosm_demo::DemoSpec::from_toml_str(&text)
        .with_context(|| format!("job spec {}", job.display()))?;
    let report = microcosm_demo::verify(dir, &spec)?;
    println!("{report}");
    if !report.passed() {
        eprintln!("verification FAILED");
    }
    Ok(report.passed())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(2)
}

fn runtime_with(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    microcosm_engine::precise_timers();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .on_thread_start(microcosm_engine::precise_timers)
        .enable_all()
        .build()?)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::error_line;
    use microcosm_transport::EndpointError;

    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        // The cause is already in the message: not repeated.
        let e = anyhow::Error::new(EndpointError::Bind {
            addr: "127.0.0.1:9".parse().unwrap(),
            source: io(),
        });
        assert_eq!(
            error_line(&e),
            "cannot bind 127.0.0.1:9: Address already in use"
        );
        // A context that does not name its cause: the cause follows.
        let e = anyhow::Error::new(io()).context("starting the executor");
        assert_eq!(
            error_line(&e),
            "starting the executor: Address already in use"
        );
    }
}
