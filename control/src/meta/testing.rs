//! An in-memory [`RaftTransport`] for tests and benchmarks, with fault injection.
//!
//! [`MemRouter`] maps node ids to running raft instances. Each node gets its own
//! [`MemTransport`] (from [`MemRouter::transport`]) so the router knows the sender and can
//! cut a node off in both directions with [`MemRouter::disconnect`]. Every request and response
//! is postcard-encoded and decoded on the way, as on the real wire.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::network::{RaftRpc, RaftRpcResponse, RaftTransport, TransportFailure, handle_raft_rpc};
use super::{NodeId, Raft};

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<NodeId, Raft>,
    disconnected: BTreeSet<NodeId>,
    max_request_bytes: Option<usize>,
}

/// Routes raft RPCs between in-process nodes.
#[derive(Default)]
pub struct MemRouter {
    inner: Mutex<Inner>,
}

impl MemRouter {
    /// An empty router.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport node `id` uses to send.
    pub fn transport(self: &Arc<Self>, id: NodeId) -> Arc<MemTransport> {
        Arc::new(MemTransport {
            router: self.clone(),
            from: id,
        })
    }

    /// Makes node `id` reachable through `raft` (replacing a previous instance).
    pub fn register(&self, id: NodeId, raft: Raft) {
        self.lock().nodes.insert(id, raft);
    }

    /// Forgets node `id` (e.g. after it was shut down): calls to it fail as unreachable.
    pub fn remove(&self, id: NodeId) {
        self.lock().nodes.remove(&id);
    }

    /// Cuts node `id` off: it can neither send nor receive until [`MemRouter::reconnect`].
    pub fn disconnect(&self, id: NodeId) {
        self.lock().disconnected.insert(id);
    }

    /// Undoes [`MemRouter::disconnect`].
    pub fn reconnect(&self, id: NodeId) {
        self.lock().disconnected.remove(&id);
    }

    /// Refuses (as [`TransportFailure::TooLarge`]) every request whose encoding is larger than
    /// `max` bytes, like a transport's frame limit; `None` lifts the limit.
    pub fn limit_request_bytes(&self, max: Option<usize>) {
        self.lock().max_request_bytes = max;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn route(&self, from: NodeId, target: NodeId) -> Result<Raft, TransportFailure> {
        let inner = self.lock();
        let unreachable = |reason: &str| TransportFailure::Unreachable {
            target,
            reason: reason.to_owned(),
        };
        if inner.disconnected.contains(&from) {
            return Err(unreachable("sender disconnected"));
        }
        if inner.disconnected.contains(&target) {
            return Err(unreachable("target disconnected"));
        }
        inner
            .nodes
            .get(&target)
            .cloned()
            .ok_or_else(|| unreachable("no such node"))
    }
}

/// One node's handle on a [`MemRouter`].
pub struct MemTransport {
    router: Arc<MemRouter>,
    from: NodeId,
}

fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(
    target: NodeId,
    v: &T,
) -> Result<T, TransportFailure> {
    let network = |e: postcard::Error| TransportFailure::Network {
        target,
        reason: e.to_string(),
    };
    let bytes = postcard::to_allocvec(v).map_err(network)?;
    postcard::from_bytes(&bytes).map_err(network)
}

impl RaftTransport for MemTransport {
    async fn call(
        &self,
        target: NodeId,
        _node: &crate::meta::MasterNode,
        req: RaftRpc,
        timeout: Duration,
    ) -> Result<RaftRpcResponse, TransportFailure> {
        let raft = self.router.route(self.from, target)?;
        if let Some(max) = self.router.lock().max_request_bytes {
            let len = postcard::to_allocvec(&req).map_or(0, |b| b.len());
            if len > max {
                return Err(TransportFailure::TooLarge {
                    target,
                    reason: format!("{len} bytes, the limit is {max}"),
                });
            }
        }
        let req = wire(target, &req)?;
        let resp = tokio::time::timeout(timeout, handle_raft_rpc(&raft, req))
            .await
            .map_err(|_| TransportFailure::Network {
                target,
                reason: format!("timed out after {} ms", timeout.as_millis()),
            })?;
        // A node cut off while the call was in flight loses the answer.
        self.router.route(self.from, target)?;
        wire(target, &resp)
    }
}
