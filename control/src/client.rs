//! A client of the masters that fails over between them by itself.
//!
//! It starts from any subset of master addresses, learns the member list from the masters'
//! status replies, and retries a retryable failure (unreachable master, election in progress)
//! on the next master until its patience runs out.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use microcosm_transport::{Endpoint, Method, RpcError};

use crate::proto::{GetNodeStatus, MasterApi, NodeStatus, Nothing};

/// Shortest attempt worth starting.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// How much an error tells the user: a master's own answer beats a lost connection, which
/// beats an unreachable address, which beats a bare timeout.
fn informativeness(e: &RpcError) -> u8 {
    match e {
        RpcError::Remote(_) => 3,
        RpcError::ConnectionLost { .. } => 2,
        RpcError::Unreachable { .. } => 1,
        _ => 0,
    }
}

/// `current` updated to the masters `members`: see [`MasterClient::set_members`].
fn merged_members(
    current: &[SocketAddr],
    seeds: &[SocketAddr],
    members: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = current
        .iter()
        .copied()
        .filter(|a| members.contains(a) || seeds.contains(a))
        .collect();
    for a in members.iter().chain(seeds) {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// A failover-aware client of the masters.
pub struct MasterClient {
    endpoint: Endpoint,
    /// The addresses it was given: always kept.
    seeds: Vec<SocketAddr>,
    addrs: Mutex<Vec<SocketAddr>>,
    timeouts: Mutex<Timeouts>,
}

/// How long a call keeps retrying, and how long one attempt may take.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    patience: Duration,
    call_timeout: Duration,
}

impl MasterClient {
    /// A client reaching the masters at `addrs` through `endpoint`.
    pub fn new(endpoint: Endpoint, addrs: Vec<SocketAddr>) -> Self {
        Self {
            endpoint,
            seeds: addrs.clone(),
            addrs: Mutex::new(addrs),
            timeouts: Mutex::new(Timeouts {
                patience: Duration::from_secs(6),
                call_timeout: Duration::from_secs(3),
            }),
        }
    }

    /// Sets how long a call keeps retrying across masters (default 6 s) and the deadline of
    /// one attempt (default 3 s).
    pub fn with_timeouts(self, patience: Duration, call_timeout: Duration) -> Self {
        self.set_timeouts(patience, call_timeout);
        self
    }

    /// [`MasterClient::with_timeouts`] on a shared client; calls already under way keep the
    /// timeouts they started with.
    pub fn set_timeouts(&self, patience: Duration, call_timeout: Duration) {
        // Replaced whole; a poisoned lock still holds valid timeouts.
        *self.timeouts.lock().unwrap_or_else(|p| p.into_inner()) = Timeouts {
            patience,
            call_timeout,
        };
    }

    fn timeouts(&self) -> Timeouts {
        *self.timeouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The master addresses currently known.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SocketAddr>> {
        // The list is replaced whole; a poisoned lock still holds a valid list.
        self.addrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `members` as the masters' current addresses (from a leader's answer): known
    /// addresses in neither it nor the ones this client was given are dropped (a master that
    /// left), new ones are added, and the order is otherwise kept (the master that answered
    /// last stays first). An empty list changes nothing.
    pub fn set_members(&self, members: &[SocketAddr]) {
        if members.is_empty() {
            return;
        }
        let mut addrs = self.lock();
        *addrs = merged_members(&addrs, &self.seeds, members);
    }

    /// Adds members learned from a status reply.
    pub fn learn(&self, status: &NodeStatus) {
        let mut addrs = self.lock();
        for m in &status.members {
            if let Ok(a) = m.addr.parse::<SocketAddr>()
                && !addrs.contains(&a)
            {
                addrs.push(a);
            }
        }
    }

    /// Calls `M` on some master, failing over on retryable errors. A non-retryable error
    /// (e.g. an invalid request) is returned at once.
    pub async fn call<M>(&self, req: &M::Request) -> Result<M::Response, RpcError>
    where
        M: Method<Service = MasterApi>,
    {
        let Timeouts {
            patience,
            call_timeout,
        } = self.timeouts();
        self.call_with::<M>(req, patience, call_timeout).await
    }

    /// [`MasterClient::call`] with this call's own patience and attempt deadline instead of
    /// the client's (e.g. a call the leader answers only after a replicated write).
    pub async fn call_with<M>(
        &self,
        req: &M::Request,
        patience: Duration,
        call_timeout: Duration,
    ) -> Result<M::Response, RpcError>
    where
        M: Method<Service = MasterApi>,
    {
        let deadline = tokio::time::Instant::now() + patience;
        let mut last: Option<RpcError> = None;
        let mut round = 0u32;
        // The first attempt is always made, even when the patience is below MIN_ATTEMPT (an
        // executor with a short TTL heartbeats with little patience).
        let mut attempted = false;
        loop {
            for addr in self.addrs() {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                // An attempt cut too short would only time out and hide a real answer.
                if remaining.is_zero() || (attempted && remaining < MIN_ATTEMPT) {
                    break;
                }
                attempted = true;
                match self
                    .endpoint
                    .call_timeout::<M>(addr, req, remaining.min(call_timeout))
                    .await
                {
                    Ok(resp) => {
                        self.prefer(addr);
                        return Ok(resp);
                    }
                    Err(e) if e.is_retryable() => {
                        tracing::debug!(%addr, error = %e, "master call failed; trying the next");
                        if last
                            .as_ref()
                            .is_none_or(|l| informativeness(&e) >= informativeness(l))
                        {
                            last = Some(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if deadline.saturating_duration_since(tokio::time::Instant::now()) < MIN_ATTEMPT {
                break;
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis((50 * u64::from(round)).min(300))).await;
        }
        Err(last.unwrap_or(RpcError::Timeout(patience)))
    }

    /// Tries `addr` first next time (the master that answered last, usually the leader).
    fn prefer(&self, addr: SocketAddr) {
        let mut addrs = self.lock();
        if let Some(pos) = addrs.iter().position(|a| *a == addr)
            && pos != 0
        {
            let a = addrs.remove(pos);
            addrs.insert(0, a);
        }
    }

    /// Asks the master at `addr` (only) for its status.
    pub async fn status_of(&self, addr: SocketAddr) -> Result<NodeStatus, RpcError> {
        // A status probe of a dead master should not hold a caller up for long.
        let timeout = self.timeouts().call_timeout.min(Duration::from_secs(1));
        self.endpoint
            .call_timeout::<GetNodeStatus>(addr, &Nothing::default(), timeout)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(ports: &[u16]) -> Vec<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    #[test]
    fn members_replace_learned_addresses_but_keep_the_given_ones_and_the_order() {
        let seeds = addrs(&[1, 2]);
        // 3 answered last (first), 4 was learned and has since left the cluster.
        let current = addrs(&[3, 1, 2, 4]);
        let merged = merged_members(&current, &seeds, &addrs(&[2, 3, 5]));
        assert_eq!(merged, addrs(&[3, 1, 2, 5]));
        // Nothing new: unchanged.
        assert_eq!(merged_members(&merged, &seeds, &addrs(&[3, 5])), merged);
    }
}
