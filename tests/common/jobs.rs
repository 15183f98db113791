//! Submitting, following and verifying jobs through the CLI.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::{Cluster, cli_with_timeout, wait_until};

/// `submit-job <args> --config <spec>` through `via`; the job id.
pub fn submit(cluster: &Cluster, via: &[SocketAddr], spec: &str, args: &[&str]) -> u64 {
    let mut all = vec!["submit-job"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", spec]);
    let out = cluster.client(&all, via);
    let id = out
        .ok_stdout()
        .and_then(|s| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}")));
    cluster.unwrap_or_dump(id)
}

/// `job status <id> --output json`.
pub fn job(cluster: &Cluster, via: &[SocketAddr], id: u64) -> Result<Value, String> {
    cluster
        .client(&["job", "status", &id.to_string(), "--output", "json"], via)
        .json()
}

/// Waits until job `id` is in `state`; returns its status.
pub fn wait_state(
    cluster: &Cluster,
    via: &[SocketAddr],
    id: u64,
    state: &str,
    timeout: Duration,
) -> Value {
    let r = wait_until(&format!("job {id} is {state}"), timeout, || {
        let j = job(cluster, via, id)?;
        if j["state"] == state {
            Ok(j)
        } else {
            Err(j.to_string())
        }
    });
    cluster.unwrap_or_dump(r)
}

/// The executors in `cluster status --output json`.
pub fn executors(cluster: &Cluster, via: &[SocketAddr]) -> Result<Vec<Value>, String> {
    let v = cluster
        .client(&["cluster", "status", "--output", "json"], via)
        .json()?;
    Ok(v["executors"].as_array().cloned().unwrap_or_default())
}

/// Waits until `n` executors are alive, so that a job submitted next is placed over all of
/// them (`Executor::start` returns before the executor registered).
pub fn wait_for_executors(cluster: &Cluster, via: &[SocketAddr], n: usize) {
    let r = wait_until(
        &format!("{n} executors registered and alive"),
        Duration::from_secs(10),
        || {
            let execs = executors(cluster, via)?;
            let alive = execs.iter().filter(|e| e["state"] == "alive").count();
            if alive == n {
                Ok(())
            } else {
                Err(format!("{execs:?}"))
            }
        },
    );
    cluster.unwrap_or_dump(r);
}

/// Runs `microcosm verify` on a demo job's output and expects it to pass with `rows` data rows.
pub fn verify_demo(spec: &str, dir: &str, rows: u64) {
    let out = cli_with_timeout(
        ["verify", "--dir", dir, "--job", spec],
        Duration::from_secs(60),
    );
    assert!(out.success(), "verification failed: {out}");
    let expect = format!("data rows         {rows} (expected {rows})");
    assert!(out.stdout.contains(&expect), "{out}");
}
