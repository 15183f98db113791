//! A local cluster of child processes (masters and executors of this same binary) in a
//! temporary directory with its own certificates: what `microcosm demo` and
//! `microcosm bench` run their jobs on.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use microcosm_control::client::MasterClient;
use microcosm_control::liveness::LivenessConfig;
use microcosm_control::proto::{ExecutorStatus, NodeStatus, SubmitJob, SubmitJobRequest};
use microcosm_demo::DemoSpec;
use microcosm_engine::SpinMode;
use microcosm_transport::{Endpoint, Identity, Role, Router, TransportConfig};

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    /// The node name, also the name of its log file (`<name>.log`).
    pub name: String,
    /// The process, `None` once it was killed or has exited.
    pub child: Option<Child>,
}

impl Proc {
    /// The process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 3 s for a clean exit, then SIGKILL.
    pub fn terminate(&mut self) {
        if let Some(c) = &mut self.child {
            if let Ok(Some(_)) = c.try_wait() {
                // Already exited (and now reaped): nothing to signal.
                self.child = None;
                return;
            }
            // SIGTERM lets the node shut down cleanly; fall back to SIGKILL.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        if let Some(c) = &mut self.child {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ports picked for the nodes of a cluster, each held by a bound socket until just before
/// its node starts: no two nodes get the same port, and nothing else takes one meanwhile.
#[derive(Default)]
struct Ports {
    held: Vec<UdpSocket>,
}

impl Ports {
    /// A free loopback UDP port, held until [`Ports::release`].
    fn pick(&mut self) -> anyhow::Result<u16> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let port = socket.local_addr()?.port();
        self.held.push(socket);
        Ok(port)
    }

    /// Lets the node that will listen on `port` bind it.
    fn release(&mut self, port: u16) {
        self.held
            .retain(|s| s.local_addr().map_or(true, |a| a.port() != port));
    }
}

/// `name value` as command-line arguments when `value` is set, nothing otherwise.
fn flag<T: std::fmt::Display>(name: &str, value: Option<T>) -> impl Iterator<Item = String> {
    value
        .map(|v| [name.to_owned(), v.to_string()])
        .into_iter()
        .flatten()
}

fn spawn(exe: &Path, dir: &Path, name: &str, args: &[String]) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // If this process dies without cleaning up (SIGKILL), its nodes die with it instead of
    // lingering as orphans.
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child: Some(child),
    })
}

/// Engine settings of a local cluster's executors (the `demo` and `bench` flags).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct ExecutorTuning {
    /// Engine workers per executor (default: the cores divided among the executors, at
    /// least 1, since they all share this machine).
    #[arg(long = "executor-workers")]
    pub workers: Option<usize>,
    /// µs an idle engine worker keeps polling its tasks and network before it sleeps
    /// (default: the executor's, 200; 0 = never spin).
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// When executors spin: `adaptive` (default: only while records arrive within the spin
    /// window) or `always`.
    #[arg(long)]
    pub spin_mode: Option<SpinMode>,
    /// Heartbeat interval the masters give the executors (ms; default: the masters', 250).
    /// The TTL stays 1.5 s, so at most 750.
    #[arg(long)]
    pub executor_heartbeat_ms: Option<u64>,
    /// Task slots per executor (default: the executor's, 64); set by the caller to fit its
    /// job, not a flag.
    #[arg(skip)]
    pub slots: Option<u32>,
}

/// Task slots a local cluster's executors offer to run `graph`: enough for the whole job on
/// one executor, so every placement the job's groups ask for fits whatever the executor
/// count; never fewer than an executor's default, 64.
pub fn slots_for(graph: &microcosm_engine::graph::JobGraph) -> u32 {
    graph
        .tasks
        .iter()
        .map(|t| t.cost)
        .fold(0u32, u32::saturating_add)
        .max(64)
}

/// The temporary directory and certificates of a cluster not started yet.
pub struct LocalClusterDir {
    tmp: tempfile::TempDir,
}

impl LocalClusterDir {
    /// Creates `<tmp>/<prefix>XXXXXX` with a CA and node certificates in `certs/`.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
        microcosm_transport::tls::init_cluster_certs(&tmp.path().join("certs"), "demo", &[])?;
        Ok(Self { tmp })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Starts `masters` masters and `executors` executors (named `master-<i>` and
    /// `executor-<i>`, from 1) with their logs in the directory, and a client to them.
    pub fn launch(
        self,
        masters: u32,
        executors: u32,
        tuning: ExecutorTuning,
    ) -> anyhow::Result<LocalCluster> {
        if let Some(ms) = tuning.executor_heartbeat_ms {
            // The masters' own check, with the default TTL they run with here.
            let liveness = LivenessConfig {
                heartbeat_interval: Duration::from_millis(ms),
                ..LivenessConfig::default()
            };
            liveness.validate().map_err(|e| {
                anyhow!(
                    "--executor-heartbeat-ms {ms}: must be 1 to {} ({e})",
                    liveness.ttl.as_millis() / 2
                )
            })?;
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = tuning
            .workers
            .unwrap_or_else(|| (cores / executors.max(1) as usize).max(1));
        let exe = std::env::current_exe().context("cannot find the microcosm executable")?;
        let dir = self.tmp.path().to_path_buf();
        let certs = dir.join("certs");
        let mut ports = Ports::default();
        let mut master_addrs = Vec::new();
        for _ in 0..masters {
            master_addrs.push(SocketAddr::from(([127, 0, 0, 1], ports.pick()?)));
        }
        let executor_ports = (0..executors)
            .map(|_| ports.pick())
            .collect::<anyhow::Result<Vec<u16>>>()?;
        let members: Vec<String> = master_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect();
        let certs_arg = certs.display().to_string();
        let mut master_procs = Vec::new();
        for (i, addr) in master_addrs.iter().enumerate() {
            let id = i + 1;
            ports.release(addr.port());
            master_procs.push(spawn(
                &exe,
                &dir,
                &format!("master-{id}"),
                &[
                    "master".into(),
                    "--node-id".into(),
                    id.to_string(),
                    "--listen-addr".into(),
                    addr.to_string(),
                    "--data-dir".into(),
                    dir.join(format!("master-{id}")).display().to_string(),
                    "--certs-dir".into(),
                    certs_arg.clone(),
                    "--initial-members".into(),
                    members.join(","),
                ]
                .into_iter()
                .chain(flag(
                    "--executor-heartbeat-ms",
                    tuning.executor_heartbeat_ms,
                ))
                .collect::<Vec<_>>(),
            )?);
        }
        let masters_arg = master_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut executor_procs = Vec::new();
        for (i, &port) in executor_ports.iter().enumerate() {
            ports.release(port);
            executor_procs.push(spawn(
                &exe,
                &dir,
                &format!("executor-{}", i + 1),
                &[
                    "executor".into(),
                    "--listen-addr".into(),
                    format!("127.0.0.1:{port}"),
                    "--masters".into(),
                    masters_arg.clone(),
                    "--certs-dir".into(),
                    certs_arg.clone(),
                    "--name".into(),
                    format!("executor-{}", i + 1),
                    "--workers".into(),
                    workers.to_string(),
                ]
                .into_iter()
                .chain(flag("--slots", tuning.slots))
                .chain(flag("--spin-us", tuning.spin_us))
                .chain(flag("--spin-mode", tuning.spin_mode))
                .collect::<Vec<_>>(),
            )?);
        }
        let identity = Identity::load(&certs, Role::Client)?;
        let endpoint = Endpoint::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &identity,
            TransportConfig::default(),
            Router::new(),
        )?;
        let client = MasterClient::new(endpoint.clone(), master_addrs.clone())
            .with_timeouts(Duration::from_secs(15), Duration::from_secs(3));
        Ok(LocalCluster {
            masters: master_procs,
            executors: executor_procs,
            master_addrs,
            client,
            endpoint,
            seq: 0,
            tmp: self.tmp,
        })
    }
}

/// A running local cluster. Dropping it kills every process and removes the directory
/// (unless [`LocalCluster::keep`] was called).
pub struct LocalCluster {
    /// The masters, `master-1` first.
    pub masters: Vec<Proc>,
    /// The executors, `executor-1` first.
    pub executors: Vec<Proc>,
    /// The masters' RPC addresses, in the order of `masters`.
    pub master_addrs: Vec<SocketAddr>,
    /// A client of the masters.
    pub client: MasterClient,
    /// The client's endpoint, for calls to executors.
    endpoint: Endpoint,
    seq: u64,
    // Last, so that the processes are killed before the directory is removed.
    tmp: tempfile::TempDir,
}

impl LocalCluster {
    /// The cluster directory (logs, data, certificates).
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().to_path_buf()
    }

    /// A new request id (client id, sequence number) for a write: the masters apply a write
    /// once per id and refuse one older than the client's last, so every write of this
    /// process takes its id from here.
    pub fn next_request(&mut self) -> (u64, u64) {
        self.seq += 1;
        (std::process::id().into(), self.seq)
    }

    /// Submits a demo job; returns its id. Each call uses a new request sequence number, so
    /// the master does not take a second job for a retry of the first.
    pub async fn submit_demo(&mut self, spec: &DemoSpec) -> anyhow::Result<u64> {
        let (client_id, seq) = self.next_request();
        Ok(self
            .client
            .call::<SubmitJob>(&SubmitJobRequest {
                job_type: "demo".into(),
                spec: spec.to_toml_string()?,
                client_id,
                seq,
            })
            .await
            .map_err(|e| anyhow!("cannot submit the demo job: {e}"))?
            .id)
    }

    /// The first node process that has exited, with how it ended and the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        first_exited(
            self.tmp.path(),
            self.masters.iter_mut().chain(self.executors.iter_mut()),
        )
    }

    /// Waits until a master reports `count` alive executors; fails at once if a node process
    /// exits meanwhile.
    pub async fn wait_for_executors(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.leader_status().await
                && s.executors.iter().filter(|e| e.state == "alive").count() >= count
            {
                return Ok(());
            }
            if let Some(exited) = self.exited() {
                anyhow::bail!("{exited}");
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{count} executor(s) did not register within {timeout:?} (logs in {})",
                    self.tmp.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every alive executor's status with its data-plane connections (what `cluster status
    /// --connections` shows); executors that do not answer are left out.
    pub async fn data_plane(&self) -> Vec<ExecutorStatus> {
        let Some(s) = self.leader_status().await else {
            return Vec::new();
        };
        crate::client::executor_statuses(&self.endpoint, &s.executors)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The status of the master that answers as the leader, if one does.
    async fn leader_status(&self) -> Option<NodeStatus> {
        for addr in &self.master_addrs {
            if let Ok(s) = self.client.status_of(*addr).await
                && s.role == "leader"
            {
                return Some(s);
            }
        }
        None
    }

    /// Every running process as `(name, pid)`, masters first.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.masters
            .iter()
            .chain(self.executors.iter())
            .filter_map(|p| p.pid().map(|pid| (p.name.clone(), pid)))
            .collect()
    }

    /// Terminates every process (executors first), waiting for each to exit.
    pub fn shutdown(&mut self) {
        for p in self.executors.iter_mut().chain(self.masters.iter_mut()) {
            p.terminate();
        }
    }

    /// Keeps the directory after the cluster is dropped; returns its path.
    pub fn keep(self) -> PathBuf {
        let Self {
            tmp,
            mut masters,
            mut executors,
            ..
        } = self;
        for p in executors.iter_mut().chain(masters.iter_mut()) {
            p.kill();
        }
        tmp.keep()
    }
}

/// The first of `procs` that has exited on its own (a process this program killed is not
/// watched any more), with how it ended and the end of its log in `dir`.
pub fn first_exited<'a>(dir: &Path, procs: impl Iterator<Item = &'a mut Proc>) -> Option<String> {
    for p in procs {
        let Some(child) = p.child.as_mut() else {
            continue;
        };
        if let Ok(Some(status)) = child.try_wait() {
            let log = dir.join(format!("{}.log", p.name));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Some(format!(
                "{} exited ({status}); the end of {}:\n{}",
                p.name,
                log.display(),
                tail.join("\n")
            ));
        }
    }
    None
}

/// SIGINT and SIGTERM, caught from the moment this is made: one that arrives while the
/// program is busy (starting a cluster, say) waits for [`Interrupts::recv`] instead of
/// killing the program and leaving its cluster directory behind.
pub struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Starts catching both signals (inside a tokio runtime).
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM (or one caught since the last call).
    /// Cancel-safe.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_its_name_and_value_or_nothing() {
        assert_eq!(
            flag("--spin-us", Some(0)).collect::<Vec<_>>(),
            ["--spin-us", "0"]
        );
        assert_eq!(
            flag("--spin-mode", Some(SpinMode::Always)).collect::<Vec<_>>(),
            ["--spin-mode", "always"]
        );
        assert_eq!(flag::<u64>("--executor-heartbeat-ms", None).count(), 0);
    }

    /// The slots a local cluster's executors offer fit a demo job that has more tasks in one
    /// co-location group than an executor's default 64, on one executor or two.
    #[test]
    fn local_executors_fit_a_large_demo_job() {
        use microcosm_control::scheduler::{ExecutorOffer, GroupId, TaskDemand, schedule};
        let spec = DemoSpec {
            table_num: 61,
            binlog_num: 22,
            ..DemoSpec::default()
        };
        let graph = microcosm_demo::plan::plan(&spec);
        let slots = slots_for(&graph);
        assert_eq!(slots, 61 + 4 * 22);
        assert_eq!(
            slots_for(&microcosm_demo::plan::plan(&DemoSpec::default())),
            64
        );
        let demands: Vec<TaskDemand> = (0u64..)
            .zip(&graph.tasks)
            .map(|(task, t)| TaskDemand {
                task,
                cost: t.cost,
                group: t.group.map(GroupId),
                avoid_group: t.avoid_group.map(GroupId),
            })
            .collect();
        for executors in [1, 2] {
            let offers: Vec<ExecutorOffer> = (0..executors)
                .map(|executor| ExecutorOffer {
                    executor,
                    free_slots: slots,
                    total_slots: slots,
                })
                .collect();
            schedule(&demands, &offers).unwrap();
            let default: Vec<ExecutorOffer> = offers
                .iter()
                .map(|o| ExecutorOffer {
                    free_slots: 64,
                    total_slots: 64,
                    ..*o
                })
                .collect();
            assert!(
                schedule(&demands, &default).is_err(),
                "64 slots would not fit it"
            );
        }
    }
}
