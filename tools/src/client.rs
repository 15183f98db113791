//! Commands that talk to a running cluster as a client: cluster status, submit-job, job ….

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use microcosm_control::client::MasterClient;
use microcosm_control::proto::{
    ControlJob, DataConnection, ExecutorInfo, ExecutorStatus, GetExecutorStatus, GetJob, JobAction,
    JobControlRequest, JobInfo, JobRef, ListJobs, NodeStatus, Nothing, SubmitJob, SubmitJobRequest,
};
use microcosm_transport::{Endpoint, Identity, Role, Router, RpcError, TransportConfig};
use serde_json::json;

/// How to print results.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON on stdout, for scripts.
    Json,
}

/// Where the cluster is and how to authenticate to it.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Master addresses (ip:port, comma separated); any subset of the masters will do.
    #[arg(
        long,
        env = "MICROCOSM_MASTER_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:7101"
    )]
    pub master_addr: Vec<SocketAddr>,
    /// Directory with the cluster CA and the client certificate.
    #[arg(long, env = "MICROCOSM_CERTS_DIR", default_value = "certs")]
    pub certs_dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ClusterArgs {
    /// Connects a failover-aware client.
    pub fn client(&self) -> anyhow::Result<MasterClient> {
        Ok(MasterClient::new(
            self.endpoint()?,
            self.master_addr.clone(),
        ))
    }

    /// A client endpoint with the cluster's client certificate, for calls to any node.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let identity = Identity::load(&self.certs_dir, Role::Client).with_context(|| {
            format!(
                "loading the client certificate from {}",
                self.certs_dir.display()
            )
        })?;
        // The masters' address family: an IPv4 socket cannot reach an IPv6 master.
        let any = match self.master_addr.first() {
            Some(SocketAddr::V6(_)) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            _ => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        Ok(Endpoint::bind(
            any,
            &identity,
            TransportConfig::default(),
            Router::new(),
        )?)
    }
}

fn explain(e: RpcError, addrs: &[SocketAddr]) -> anyhow::Error {
    let list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    match e {
        RpcError::Remote(r) => anyhow::anyhow!("{}", r.message),
        RpcError::Unreachable { .. } | RpcError::ConnectionLost { .. } => {
            anyhow::anyhow!("cluster unreachable at {list}: {e}")
        }
        RpcError::Timeout(t) => anyhow::anyhow!("no master at {list} answered within {t:?}"),
        other => anyhow::anyhow!(other),
    }
}

fn client_id() -> u64 {
    // Distinct per invocation: pid and time.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Asks every alive executor in `executors` for its status at once; `None` where one did
/// not answer.
pub async fn executor_statuses(
    endpoint: &Endpoint,
    executors: &[ExecutorInfo],
) -> Vec<Option<ExecutorStatus>> {
    let pending: Vec<_> = executors
        .iter()
        .map(|e| {
            let endpoint = endpoint.clone();
            let addr = (e.state == "alive")
                .then(|| e.addr.parse::<SocketAddr>().ok())
                .flatten();
            tokio::spawn(async move {
                let addr = addr?;
                endpoint
                    .call_timeout::<GetExecutorStatus>(addr, &Nothing::default(), STATUS_TIMEOUT)
                    .await
                    .ok()
            })
        })
        .collect();
    let mut statuses = Vec::with_capacity(pending.len());
    for task in pending {
        statuses.push(task.await.ok().flatten());
    }
    statuses
}

/// How long `cluster status --connections` waits for each executor.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// One data-plane connection as JSON.
fn connection_json(c: &DataConnection) -> serde_json::Value {
    json!({
        "peer": c.peer, "role": c.role, "dialed": c.dialed, "rtt_us": c.rtt_us,
        "cwnd": c.cwnd, "congestion_events": c.congestion_events,
        "lost_packets": c.lost_packets, "sent_packets": c.sent_packets,
        "datagrams_sent": c.datagrams_sent, "datagrams_received": c.datagrams_received,
    })
}

/// `microcosm cluster status`; with `connections`, each executor's data-plane connections too.
pub async fn cluster_status(args: &ClusterArgs, connections: bool) -> anyhow::Result<()> {
    let endpoint = args.endpoint()?;
    let client = MasterClient::new(endpoint.clone(), args.master_addr.clone());
    // Learn the members from whichever master answers first.
    let mut first: Option<NodeStatus> = None;
    let mut last_error = None;
    for addr in client.addrs() {
        match client.status_of(addr).await {
            Ok(s) => {
                client.learn(&s);
                first = Some(s);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let Some(first) = first else {
        return Err(match last_error {
            Some(e) => explain(e, &args.master_addr),
            None => anyhow::anyhow!("no master address given"),
        });
    };
    // Ask every member at once, so that dead ones cost one timeout in total, not one each.
    let client = std::sync::Arc::new(client);
    let mut pending = Vec::new();
    for m in &first.members {
        let client = client.clone();
        let addr = m.addr.parse::<SocketAddr>().ok();
        pending.push(tokio::spawn(async move {
            match addr {
                Some(a) => client.status_of(a).await.ok(),
                None => None,
            }
        }));
    }
    let mut rows = Vec::new();
    for (m, task) in first.members.iter().zip(pending) {
        rows.push((m.clone(), task.await.ok().flatten()));
    }
    let leader = rows
        .iter()
        .find(|(_, s)| s.as_ref().is_some_and(|s| s.role == "leader"))
        .map(|(m, _)| m.id);
    let executors = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref())
        .find(|s| s.role == "leader")
        .unwrap_or(&first)
        .executors
        .clone();
    let statuses = if connections {
        executor_statuses(&endpoint, &executors).await
    } else {
        vec![None; executors.len()]
    };
    if args.output == Output::Json {
        let masters: Vec<_> = rows
            .iter()
            .map(|(m, s)| {
                json!({
                    "id": m.id, "name": m.name, "addr": m.addr, "voter": m.voter,
                    "reachable": s.is_some(),
                    "role": s.as_ref().map(|s| s.role.clone()),
                    "term": s.as_ref().map(|s| s.term),
                    "last_applied": s.as_ref().and_then(|s| s.last_applied),
                })
            })
            .collect();
        let execs: Vec<_> = executors
            .iter()
            .zip(&statuses)
            .map(|(e, status)| {
                let mut v = json!({"id": e.id, "name": e.name, "addr": e.addr, "state": e.state, "slots": e.slots, "used": e.used, "incarnation": e.incarnation, "lost_reason": e.lost_reason});
                if connections {
                    v["connections"] = status.as_ref().map_or(serde_json::Value::Null, |s| {
                        s.connections.iter().map(connection_json).collect()
                    });
                }
                v
            })
            .collect();
        println!(
            "{}",
            json!({"leader": leader, "masters": masters, "executors": execs})
        );
        return Ok(());
    }
    match leader {
        Some(id) => println!("leader: master {id}"),
        None => println!("leader: none (election in progress or no quorum)"),
    }
    println!(
        "{:<4} {:<12} {:<22} {:<10} {:<6} {:<8} {:<9}",
        "ID", "NAME", "ADDRESS", "ROLE", "TERM", "APPLIED", "REACHABLE"
    );
    for (m, s) in &rows {
        match s {
            Some(s) => println!(
                "{:<4} {:<12} {:<22} {:<10} {:<6} {:<8} yes",
                m.id,
                m.name,
                m.addr,
                s.role,
                s.term,
                s.last_applied
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into())
            ),
            None => println!(
                "{:<4} {:<12} {:<22} {:<10} {:<6} {:<8} no",
                m.id, m.name, m.addr, "-", "-", "-"
            ),
        }
    }
    println!();
    println!("executors: {}", executors.len());
    if !executors.is_empty() {
        println!(
            "{:<4} {:<12} {:<22} {:<6} {:<10} WHY LOST",
            "ID", "NAME", "ADDRESS", "STATE", "USED/TOTAL"
        );
        for e in &executors {
            println!(
                "{:<4} {:<12} {:<22} {:<6} {:<10} {}",
                e.id,
                e.name,
                e.addr,
                e.state,
                format!("{}/{}", e.used, e.slots),
                e.lost_reason
            );
        }
    }
    if connections {
        print_connections(&executors, &statuses);
    }
    Ok(())
}

fn print_connections(executors: &[ExecutorInfo], statuses: &[Option<ExecutorStatus>]) {
    println!();
    println!("data-plane connections:");
    println!(
        "{:<12} {:<22} {:<9} {:<4} {:>8} {:>10} {:>6} {:>6} {:>12} {:>12}",
        "EXECUTOR",
        "PEER",
        "ROLE",
        "DIR",
        "RTT µs",
        "CWND",
        "CONG",
        "LOST",
        "DGRAMS OUT",
        "DGRAMS IN"
    );
    for (e, status) in executors.iter().zip(statuses) {
        let Some(status) = status else {
            println!("{:<12} (no answer)", e.name);
            continue;
        };
        for c in &status.connections {
            println!(
                "{:<12} {:<22} {:<9} {:<4} {:>8} {:>10} {:>6} {:>6} {:>12} {:>12}",
                e.name,
                c.peer,
                c.role,
                if c.dialed { "out" } else { "in" },
                c.rtt_us,
                c.cwnd,
                c.congestion_events,
                c.lost_packets,
                c.datagrams_sent,
                c.datagrams_received
            );
        }
    }
}

/// `microcosm submit-job`.
pub async fn submit_job(
    args: &ClusterArgs,
    job_type: &str,
    config: &std::path::Path,
) -> anyhow::Result<()> {
    let spec = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read job config {}", config.display()))?;
    let client = args.client()?;
    let req = SubmitJobRequest {
        job_type: job_type.to_string(),
        spec,
        client_id: client_id(),
        seq: 1,
    };
    let job = client
        .call::<SubmitJob>(&req)
        .await
        .map_err(|e| explain(e, &args.master_addr))?;
    if args.output == Output::Json {
        println!("{}", json!({"job_id": job.id}));
    } else {
        println!("{}", job.id);
    }
    Ok(())
}

fn job_json(j: &JobInfo) -> serde_json::Value {
    json!({
        "id": j.id, "type": j.job_type, "state": j.state, "reason": j.reason, "epoch": j.epoch,
        "tasks": j.tasks,
        "checkpoint": j.checkpoint.map(|c| json!({"id": c.id, "epoch": c.epoch, "at_ms": c.at_ms})),
        "restored_from": j.restored_from,
        "restarts": j.restarts, "recent_restarts": j.recent_restarts,
        "history": j.history.iter().map(|h| json!({"state": h.state, "reason": h.reason, "at_ms": h.at_ms})).collect::<Vec<_>>(),
        "stale": j.stale,
    })
}

/// `microcosm job list`.
pub async fn job_list(args: &ClusterArgs) -> anyhow::Result<()> {
    let client = args.client()?;
    let list = client
        .call::<ListJobs>(&Nothing::default())
        .await
        .map_err(|e| explain(e, &args.master_addr))?;
    if let Some(why) = &list.stale {
        eprintln!("warning: {why}");
    }
    if args.output == Output::Json {
        // Each job carries the list's staleness warning (null when current).
        println!(
            "{}",
            serde_json::Value::Array(
                list.jobs
                    .iter()
                    .map(|j| {
                        let mut v = job_json(j);
                        v["stale"] = json!(list.stale);
                        // The list carries no history (`job status` shows it).
                        if let Some(o) = v.as_object_mut() {
                            o.remove("history");
                        }
                        v
                    })
                    .collect()
            )
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<8} {:<11} {:<6} REASON",
        "ID", "TYPE", "STATE", "TASKS"
    );
    for j in &list.jobs {
        println!(
            "{:<6} {:<8} {:<11} {:<6} {}",
            j.id, j.job_type, j.state, j.tasks, j.reason
        );
    }
    Ok(())
}

fn print_job(args: &ClusterArgs, j: &JobInfo) {
    if let Some(why) = &j.stale {
        eprintln!("warning: {why}");
    }
    if args.output == Output::Json {
        println!("{}", job_json(j));
        return;
    }
    println!("id     = {}", j.id);
    println!("type   = {}", j.job_type);
    println!("state  = {}", j.state);
    println!("reason = {}", j.reason);
    println!("epoch  = {}", j.epoch);
    println!("tasks  = {}", j.tasks);
    match j.checkpoint {
        Some(c) => println!(
            "checkpoint = {} (taken by epoch {}, committed at {} ms)",
            c.id, c.epoch, c.at_ms
        ),
        None => println!("checkpoint = none"),
    }
    match j.restored_from {
        Some(id) => println!("resumed from checkpoint {id} (this epoch)"),
        None => println!("resumed from = nothing (this epoch started from scratch)"),
    }
    println!(
        "restarts = {} ({} within the last {} minutes; a failure after {} there fails the job)",
        j.restarts,
        j.recent_restarts,
        microcosm_control::leader::RESTART_WINDOW_MS / 60_000,
        microcosm_control::leader::MAX_RESTARTS
    );
    println!("\nhistory:");
    for h in &j.history {
        println!("  {:>15}  {:<11} {}", h.at_ms, h.state, h.reason);
    }
}

/// `microcosm job status ID`.
pub async fn job_status(args: &ClusterArgs, id: u64) -> anyhow::Result<()> {
    let client = args.client()?;
    let j = client
        .call::<GetJob>(&JobRef { id })
        .await
        .map_err(|e| explain(e, &args.master_addr))?;
    print_job(args, &j);
    Ok(())
}

/// `microcosm job cancel|pause|resume ID`.
pub async fn job_control(args: &ClusterArgs, id: u64, action: JobAction) -> anyhow::Result<()> {
    let client = args
        .client()?
        .with_timeouts(Duration::from_secs(8), Duration::from_secs(5));
    let req = JobControlRequest {
        id,
        action,
        client_id: client_id(),
        seq: 1,
    };
    let j = client
        .call::<ControlJob>(&req)
        .await
        .map_err(|e| explain(e, &args.master_addr))?;
    print_job(args, &j);
    Ok(())
}
