//! Shared harness for process-level tests: runs the real `microcosm` binary.
//!
//! - [`cli`] / [`Cli`]: run one `microcosm` command with a hard deadline (a hung command is
//!   killed and reported, never waited for forever) and parse its JSON output.
//! - [`Node`]: one long-running `microcosm master` process with its stderr in a log file; a
//!   guard that kills (SIGKILL) and reaps the child when dropped. It can be killed and restarted
//!   with the same flags and data dir.
//! - [`Cluster`]: a temporary directory with certificates and masters on free loopback UDP
//!   ports, plus helpers for `cluster status`, `submit-job` and `job list`.
//! - [`Probe`]: asks one master for its raft status in-process (the RPC `cluster status` uses)
//!   with a short deadline. `cluster status` asks every member in turn and waits up to the
//!   connect timeout (3 s) for each dead one; the probe is for precise timing and fast polling
//!   while masters are down.
//! - [`wait_until`]: poll a condition with a deadline; the failure names the last observation.
//!
//! Each test file includes it with `mod common;` and uses what it needs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod exec;
pub mod jobs;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use microcosm_control::proto::{GetNodeStatus, NodeStatus, Nothing};
use microcosm_transport::{Endpoint, Identity, Role, Router, TransportConfig};
use serde_json::Value;

/// Path of the `microcosm` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_microcosm")
}

/// Default deadline of a client command (`cluster status`, `submit-job`, …). The CLI's own
/// patience is a few seconds; anything longer is a hang.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Interval between polls in [`wait_until`].
pub const POLL: Duration = Duration::from_millis(75);

// ---------------------------------------------------------------------------------------------
// Free ports

/// Ports handed out by this process: never hand out the same one twice.
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A UDP port on 127.0.0.1 that was free a moment ago (bound to port 0, read, released).
/// Never returns the same port twice within one test binary.
pub fn free_udp_port() -> u16 {
    let mut guard = PORTS.lock().unwrap_or_else(|p| p.into_inner());
    let used = guard.get_or_insert_with(HashSet::new);
    loop {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on 127.0.0.1:0");
        let port = sock.local_addr().expect("local addr").port();
        drop(sock);
        if used.insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<free UDP port>`.
pub fn free_udp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_udp_port()))
}

// ---------------------------------------------------------------------------------------------
// Polling

/// Calls `probe` every [`POLL`] until it returns `Ok`, or fails after `timeout` with a message
/// naming `what` and the last `Err` the probe returned (its description of what it saw).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match probe() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {:?} ({attempts} attempts) waiting until {what}; last observation: {last}",
                start.elapsed()
            ));
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot CLI commands

/// The result of one finished (or killed) `microcosm` command.
#[derive(Debug)]
pub struct Cli {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// Exit status; `None` if the command was killed at its deadline.
    pub status: Option<ExitStatus>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time until it exited or was killed.
    pub elapsed: Duration,
}

impl Cli {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Whether it was killed at its deadline.
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// Stdout parsed as JSON, or an error describing the whole run.
    pub fn json(&self) -> Result<Value, String> {
        if !self.success() {
            return Err(format!("command failed: {self}"));
        }
        serde_json::from_str(self.stdout.trim())
            .map_err(|e| format!("stdout is not JSON ({e}): {self}"))
    }

    /// Stdout trimmed, if the command succeeded.
    pub fn ok_stdout(&self) -> Result<String, String> {
        if self.success() {
            Ok(self.stdout.trim().to_string())
        } else {
            Err(format!("command failed: {self}"))
        }
    }
}

impl fmt::Display for Cli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "killed at its deadline (hung)".into(),
        };
        write!(
            f,
            "`microcosm {}` -> {status} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.elapsed,
            tail(&self.stdout, 40),
            tail(&self.stderr, 40)
        )
    }
}

/// Runs `microcosm <args>` to completion, killing it after `timeout`.
pub fn cli_with_timeout<I, S>(args: I, timeout: Duration) -> Cli
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let start = Instant::now();
    let mut child = Command::new(bin())
        .args(&args)
        .env_remove("MICROCOSM_MASTER_ADDR")
        .env_remove("MICROCOSM_CERTS_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microcosm");
    let out_reader = reader(child.stdout.take().expect("stdout"));
    let err_reader = reader(child.stderr.take().expect("stderr"));
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(s) => break Some(s),
            None if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let elapsed = start.elapsed();
    Cli {
        args: shown,
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed,
    }
}

/// Runs `microcosm <args>` to completion with the default [`CLI_TIMEOUT`].
pub fn cli<I, S>(args: I) -> Cli
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    cli_with_timeout(args, CLI_TIMEOUT)
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Creates a cluster CA and certificates in `dir` with `microcosm certs init`.
pub fn init_certs(dir: &Path) {
    let out = cli([
        "certs".as_ref(),
        "init".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(out.success(), "certs init failed: {out}");
}

// ---------------------------------------------------------------------------------------------
// In-process status probe

/// Deadline of one [`Probe::status`] call.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A client endpoint (client certificate) that asks single masters for their status.
pub struct Probe {
    endpoint: Endpoint,
    rt: tokio::runtime::Runtime,
}

impl Probe {
    /// A probe authenticated with the client certificate in `certs`.
    pub fn new(certs: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let identity = Identity::load(certs, Role::Client).expect("load the client certificate");
        let endpoint = {
            let _guard = rt.enter();
            Endpoint::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                &identity,
                TransportConfig::default(),
                Router::new(),
            )
            .expect("bind the probe endpoint")
        };
        Self { endpoint, rt }
    }

    /// The status of the master at `addr` (that master only), within [`PROBE_TIMEOUT`].
    ///
    /// A failed call drops the cached connection, so that the next call dials afresh: a master
    /// restarted on the same address is seen at once, not after the QUIC idle timeout of the
    /// connection to its previous incarnation.
    pub fn status(&self, addr: SocketAddr) -> Result<NodeStatus, String> {
        self.rt
            .block_on(self.endpoint.call_timeout::<GetNodeStatus>(
                addr,
                &Nothing::default(),
                PROBE_TIMEOUT,
            ))
            .map_err(|e| {
                self.endpoint.forget(addr, Role::Master);
                format!("status of {addr}: {e}")
            })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.endpoint.close();
    }
}

/// One line describing a master's own status, for messages.
pub fn describe(s: &NodeStatus) -> String {
    format!(
        "master {} role={} term={} leader={:?} applied={:?} members={:?}",
        s.id,
        s.role,
        s.term,
        s.leader_id,
        s.last_applied,
        s.members
            .iter()
            .map(|m| (m.id, m.voter))
            .collect::<Vec<_>>()
    )
}

// ---------------------------------------------------------------------------------------------
// Long-running master processes

/// A running (or stopped) `microcosm master` process. Dropping it kills and reaps the child.
pub struct Node {
    /// Raft node id.
    pub id: u64,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// All flags after `microcosm master`, reused by [`Node::restart`].
    pub args: Vec<OsString>,
    /// File collecting its stderr (appended to across restarts).
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Starts `microcosm master <args>` with stderr appended to `log`.
    pub fn spawn(
        id: u64,
        addr: SocketAddr,
        data_dir: PathBuf,
        args: Vec<OsString>,
        log: PathBuf,
    ) -> Self {
        let mut node = Self {
            id,
            addr,
            data_dir,
            args,
            log,
            child: None,
        };
        node.start();
        node
    }

    fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "master {} is already running",
            self.id
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open master log");
        let child = Command::new(bin())
            .arg("master")
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn microcosm master");
        self.child = Some(child);
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// SIGKILLs the process and reaps it (no-op if it is not running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `kill -<sig>` to the running process (e.g. `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("master is running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{sig} {pid} failed");
    }

    /// Starts the process again with the same flags and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Everything the process wrote to stderr so far (all incarnations).
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The last `n` lines of its stderr.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_text(), n)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Raft timing and other options shared by the masters of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `--heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// `--election-timeout-min-ms`.
    pub election_min_ms: u64,
    /// `--election-timeout-max-ms`.
    pub election_max_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
        }
    }
}

/// Masters in a temporary directory (certificates, data dirs, logs). Dropping it kills every
/// master, then removes the directory.
pub struct Cluster {
    /// Masters by node id (declared before `dir` so that they die before it is removed).
    pub nodes: BTreeMap<u64, Node>,
    /// The temporary root.
    pub dir: tempfile::TempDir,
    /// Certificates (`certs init`).
    pub certs: PathBuf,
    /// Timing flags given to every master.
    pub options: ClusterOptions,
    /// In-process status probe.
    pub probe: Probe,
}

impl Cluster {
    /// An empty cluster directory with fresh certificates and no masters.
    pub fn empty(options: ClusterOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("microcosm-test-")
            .tempdir()
            .expect("tempdir");
        let certs = dir.path().join("certs");
        init_certs(&certs);
        let probe = Probe::new(&certs);
        Self {
            nodes: BTreeMap::new(),
            dir,
            certs,
            options,
            probe,
        }
    }

    /// Starts `n` masters (ids 1..=n) that bootstrap a new cluster together.
    pub fn bootstrap(n: u64) -> Self {
        Self::bootstrap_with(n, ClusterOptions::default())
    }

    /// Like [`Cluster::bootstrap`] with explicit options.
    pub fn bootstrap_with(n: u64, options: ClusterOptions) -> Self {
        let mut c = Self::empty(options);
        let addrs: Vec<(u64, SocketAddr)> = (1..=n).map(|id| (id, free_udp_addr())).collect();
        let members = addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        for (id, addr) in addrs {
            c.spawn_master(id, addr, &["--initial-members".into(), members.clone()]);
        }
        c
    }

    /// Starts master `id` on a free port joining the cluster through the running masters.
    pub fn join(&mut self, id: u64) -> SocketAddr {
        let via = self.running_addrs();
        assert!(!via.is_empty(), "no running master to join through");
        let addr = free_udp_addr();
        self.spawn_master(id, addr, &["--join".into(), join_addrs(&via)]);
        addr
    }

    /// The common flags of master `id` plus `extra`, started with stderr in `<dir>/master-<id>.log`.
    pub fn spawn_master(&mut self, id: u64, addr: SocketAddr, extra: &[String]) {
        assert!(!self.nodes.contains_key(&id), "master {id} exists already");
        let data_dir = self.data_dir(id);
        let mut args: Vec<OsString> = vec![
            "--node-id".into(),
            id.to_string().into(),
            "--listen-addr".into(),
            addr.to_string().into(),
            "--data-dir".into(),
            data_dir.clone().into(),
            "--certs-dir".into(),
            self.certs.clone().into(),
            "--heartbeat-ms".into(),
            self.options.heartbeat_ms.to_string().into(),
            "--election-timeout-min-ms".into(),
            self.options.election_min_ms.to_string().into(),
            "--election-timeout-max-ms".into(),
            self.options.election_max_ms.to_string().into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let log = self.dir.path().join(format!("master-{id}.log"));
        self.nodes
            .insert(id, Node::spawn(id, addr, data_dir, args, log));
    }

    /// The data dir of master `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    /// Master `id`.
    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no master {id}"))
    }

    /// Address of master `id`.
    pub fn addr(&self, id: u64) -> SocketAddr {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no master {id}"))
            .addr
    }

    /// SIGKILLs master `id`.
    pub fn kill(&mut self, id: u64) {
        self.node(id).kill();
    }

    /// SIGKILLs master `id` and deletes its data dir, as a lost disk would; the cluster then
    /// no longer lists it, so that a master of the same id can be started anew.
    pub fn lose(&mut self, id: u64) {
        self.kill(id);
        self.nodes.remove(&id);
        std::fs::remove_dir_all(self.data_dir(id)).unwrap();
    }

    /// Restarts master `id` with its original flags and data dir.
    pub fn restart(&mut self, id: u64) {
        self.node(id).restart();
    }

    /// Ids of the masters whose process is running.
    pub fn running(&mut self) -> Vec<u64> {
        self.nodes
            .iter_mut()
            .filter_map(|(id, n)| n.is_running().then_some(*id))
            .collect()
    }

    /// Addresses of the running masters.
    pub fn running_addrs(&mut self) -> Vec<SocketAddr> {
        let ids = self.running();
        ids.iter().map(|id| self.addr(*id)).collect()
    }

    /// Fails if a master that should be running has exited (with its log tail).
    pub fn assert_running(&mut self, ids: &[u64]) {
        for id in ids {
            let node = self.node(*id);
            if let Some(status) = node.exit_status() {
                panic!(
                    "master {id} exited unexpectedly with {status}; stderr tail:\n{}",
                    node.log_tail(40)
                );
            }
        }
    }

    /// Runs a client command against the masters at `via`: `microcosm <args> --master-addr
    /// <via> --certs-dir <certs>`.
    pub fn client(&self, args: &[&str], via: &[SocketAddr]) -> Cli {
        self.client_with_timeout(args, via, CLI_TIMEOUT)
    }

    /// Like [`Cluster::client`] with an explicit deadline.
    pub fn client_with_timeout(&self, args: &[&str], via: &[SocketAddr], timeout: Duration) -> Cli {
        let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
        all.push("--master-addr".into());
        all.push(join_addrs(via).into());
        all.push("--certs-dir".into());
        all.push(self.certs.clone().into());
        cli_with_timeout(all, timeout)
    }

    /// `cluster status --output json` asked of the masters at `via`.
    pub fn status(&self, via: &[SocketAddr]) -> Result<Status, String> {
        let out = self.client(&["cluster", "status", "--output", "json"], via);
        Status::parse(out.json()?)
    }

    /// Waits until every master in `ids` is running, knows the same leader (one of `ids`),
    /// and that leader reports the leader role while no other master of `ids` does; asks each
    /// master directly with the [`Probe`]. Returns the leader's id.
    pub fn wait_for_leader(&mut self, ids: &[u64], timeout: Duration) -> u64 {
        let ids = ids.to_vec();
        let result = wait_until("every master agrees on one leader", timeout, || {
            self.assert_running(&ids);
            self.agreed_leader(&ids)
        });
        self.unwrap_or_dump(result)
    }

    /// The leader all of `ids` agree on right now (asked directly with the [`Probe`]), or a
    /// description of what they said.
    pub fn agreed_leader(&self, ids: &[u64]) -> Result<u64, String> {
        let views: Vec<NodeStatus> = ids
            .iter()
            .map(|id| self.probe.status(self.addr(*id)))
            .collect::<Result<_, _>>()?;
        let seen = || views.iter().map(describe).collect::<Vec<_>>().join("; ");
        let leader = views[0]
            .leader_id
            .ok_or_else(|| format!("no leader known: {}", seen()))?;
        let leaders: Vec<u64> = views
            .iter()
            .filter(|v| v.role == "leader")
            .map(|v| v.id)
            .collect();
        if views.iter().all(|v| v.leader_id == Some(leader)) && leaders == [leader] {
            Ok(leader)
        } else {
            Err(format!("no agreed single leader: {}", seen()))
        }
    }

    /// Waits until every master in `ids` is running and `cluster status` asked of each of them
    /// shows the same single leader among `ids`, with all of `ids` reachable and no other
    /// master claiming leadership. Returns the leader's id.
    pub fn wait_for_leader_cli(&mut self, ids: &[u64], timeout: Duration) -> u64 {
        let ids = ids.to_vec();
        let result = wait_until(
            "`cluster status` on every master shows the same single leader",
            timeout,
            || {
                self.assert_running(&ids);
                let mut agreed: Option<u64> = None;
                for id in &ids {
                    let s = self.status(&[self.addr(*id)])?;
                    let leader = s.single_leader()?;
                    if !ids.contains(&leader) {
                        return Err(format!("leader {leader} is not one of {ids:?}: {s}"));
                    }
                    for m in &ids {
                        if !s.master(*m).is_some_and(|x| x.reachable) {
                            return Err(format!("master {m} not reachable: {s}"));
                        }
                    }
                    match agreed {
                        None => agreed = Some(leader),
                        Some(l) if l == leader => {}
                        Some(l) => {
                            return Err(format!(
                                "master {id} sees leader {leader}, another saw {l}"
                            ));
                        }
                    }
                }
                agreed.ok_or_else(|| "no masters given".to_string())
            },
        );
        self.unwrap_or_dump(result)
    }

    /// `submit-job` of an empty (all defaults) demo spec through `via`.
    pub fn submit_job(&self, via: &[SocketAddr]) -> Cli {
        self.submit_job_with_timeout(via, CLI_TIMEOUT)
    }

    /// Like [`Cluster::submit_job`] with an explicit deadline.
    pub fn submit_job_with_timeout(&self, via: &[SocketAddr], timeout: Duration) -> Cli {
        let spec = self.dir.path().join("empty-job.toml");
        if !spec.exists() {
            std::fs::write(&spec, "").expect("write job spec");
        }
        let spec = spec.to_string_lossy().into_owned();
        self.client_with_timeout(&["submit-job", "--config", &spec], via, timeout)
    }

    /// Submits a job through `via` and returns its id; panics (with logs) on failure.
    pub fn submit_job_ok(&self, via: &[SocketAddr]) -> u64 {
        let out = self.submit_job(via);
        let id = out.ok_stdout().and_then(|s| {
            s.parse::<u64>()
                .map_err(|e| format!("job id {s:?}: {e}: {out}"))
        });
        self.unwrap_or_dump(id)
    }

    /// `job list --output json` asked of the masters at `via`: the job ids.
    pub fn job_ids(&self, via: &[SocketAddr]) -> Result<Vec<u64>, String> {
        let out = self.client(&["job", "list", "--output", "json"], via);
        let v = out.json()?;
        let jobs = v
            .as_array()
            .ok_or_else(|| format!("job list is not an array: {v}"))?;
        jobs.iter()
            .map(|j| {
                j.get("id")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("job without an id: {j}"))
            })
            .collect()
    }

    /// Waits until `job list` on master `id` (that master only) shows every job in `jobs`.
    pub fn wait_for_jobs_on(&self, id: u64, jobs: &[u64], timeout: Duration) -> Vec<u64> {
        let via = [self.addr(id)];
        let result = wait_until(&format!("master {id} lists jobs {jobs:?}"), timeout, || {
            let listed = self.job_ids(&via)?;
            if jobs.iter().all(|j| listed.contains(j)) {
                Ok(listed)
            } else {
                Err(format!("master {id} lists {listed:?}"))
            }
        });
        self.unwrap_or_dump(result)
    }

    /// The last lines of every master's stderr.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for (id, n) in &self.nodes {
            out.push_str(&format!(
                "\n===== master {id} ({}) stderr tail =====\n{}\n",
                n.addr,
                n.log_tail(lines)
            ));
        }
        out
    }

    /// Unwraps, or panics with the error and every master's stderr tail.
    pub fn unwrap_or_dump<T>(&self, r: Result<T, String>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", self.logs(dump_lines())),
        }
    }
}

/// How many of each node's last log lines a failed cluster test prints:
/// `MICROCOSM_TEST_LOG_LINES`, 30 if unset.
pub fn dump_lines() -> usize {
    std::env::var("MICROCOSM_TEST_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

/// `a,b,c`.
pub fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------------
// `cluster status --output json`

/// One master as shown by `cluster status --output json`.
#[derive(Debug, Clone)]
pub struct MasterView {
    /// Raft id.
    pub id: u64,
    /// Address.
    pub addr: String,
    /// Voter (not learner).
    pub voter: bool,
    /// Whether the status call to it succeeded.
    pub reachable: bool,
    /// `leader`, `follower`, `candidate`, `learner`; `None` if unreachable.
    pub role: Option<String>,
    /// Raft term.
    pub term: Option<u64>,
    /// Last applied log index.
    pub last_applied: Option<u64>,
}

/// Parsed `cluster status --output json`.
#[derive(Debug, Clone)]
pub struct Status {
    /// The `leader` field.
    pub leader: Option<u64>,
    /// The `masters` array.
    pub masters: Vec<MasterView>,
    /// The raw JSON.
    pub raw: Value,
}

impl Status {
    /// Parses the JSON document.
    pub fn parse(raw: Value) -> Result<Self, String> {
        let bad = |what: &str| format!("cluster status JSON: {what}: {raw}");
        let leader = match raw.get("leader") {
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| bad("leader is not an id"))?),
            None => return Err(bad("no leader field")),
        };
        let masters = raw
            .get("masters")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no masters array"))?
            .iter()
            .map(|m| {
                Ok(MasterView {
                    id: m
                        .get("id")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| bad("master id"))?,
                    addr: m
                        .get("addr")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    voter: m
                        .get("voter")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| bad("voter"))?,
                    reachable: m
                        .get("reachable")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| bad("reachable"))?,
                    role: m.get("role").and_then(Value::as_str).map(str::to_string),
                    term: m.get("term").and_then(Value::as_u64),
                    last_applied: m.get("last_applied").and_then(Value::as_u64),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            leader,
            masters,
            raw,
        })
    }

    /// Master `id`, if listed.
    pub fn master(&self, id: u64) -> Option<&MasterView> {
        self.masters.iter().find(|m| m.id == id)
    }

    /// Ids of the masters that report the leader role.
    pub fn leaders(&self) -> Vec<u64> {
        self.masters
            .iter()
            .filter(|m| m.role.as_deref() == Some("leader"))
            .map(|m| m.id)
            .collect()
    }

    /// The leader, if exactly one master claims the role and `leader` names it.
    pub fn single_leader(&self) -> Result<u64, String> {
        match (self.leader, self.leaders().as_slice()) {
            (Some(l), [only]) if l == *only => Ok(l),
            _ => Err(format!("not exactly one leader: {self}")),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.raw)
    }
}
