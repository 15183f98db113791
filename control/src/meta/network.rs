//! The network seam between openraft and whatever carries the masters' RPCs.
//!
//! openraft talks to peers through [`RaftNetworkFactory`] / [`RaftNetwork`]; both are
//! implemented here over the small request/response [`RaftTransport`] trait, which the QUIC RPC
//! layer implements (postcard-encoding [`RaftRpc`] / [`RaftRpcResponse`] into its payloads) and
//! which [`super::testing::MemRouter`] implements in memory for tests. The server side of the
//! same RPC is [`handle_raft_rpc`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::{MasterNode, NodeId, Raft, TypeConfig};

/// How long openraft waits after an `Unreachable` error before retrying a peer.
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

/// A raft RPC from one master to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Election.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// A [`RaftRpc`] addressed to one master: the master `to`, of data-dir incarnation
/// `incarnation` (0: not known). The receiver refuses one meant for another master, or for
/// another data dir of it ([`RaftEnvelope::misaddressed`]): a master whose data dir was lost,
/// back at its old address, must not take the log entries and votes its predecessor was
/// counted for (its empty log would also look to the leader like a log that went back).
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftEnvelope {
    /// The master it is for.
    pub to: NodeId,
    /// The data-dir incarnation the sender has on record for it.
    pub incarnation: u64,
    /// The request.
    pub rpc: RaftRpc,
}

impl RaftEnvelope {
    /// Why master `id` of incarnation `incarnation` must not answer this, if it must not.
    pub fn misaddressed(&self, id: NodeId, incarnation: u64) -> Option<String> {
        if self.to != id {
            return Some(format!(
                "a raft message for master {} reached master {id} (which now has its address)",
                self.to
            ));
        }
        if self.incarnation != 0 && self.incarnation != incarnation {
            return Some(format!(
                "a raft message for master {id}'s data dir {} reached its data dir {incarnation}: \
                 this master's data dir was lost and replaced; it must join under a new node-id",
                self.incarnation
            ));
        }
        None
    }
}

/// The peer's answer to a [`RaftRpc`], including openraft-level errors raised by the peer.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcResponse {
    /// Answer to [`RaftRpc::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RaftRpc::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RaftRpc::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
}

/// Why a [`RaftTransport::call`] produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportFailure {
    /// No connection could be made (peer down, refused, wrong identity); openraft backs off.
    #[error("peer {target} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        target: NodeId,
        /// Why.
        reason: String,
    },
    /// The call failed after the request may have been sent (reset, timeout, bad frame).
    #[error("rpc to peer {target} failed: {reason}")]
    Network {
        /// The peer.
        target: NodeId,
        /// Why.
        reason: String,
    },
    /// The request is larger than the transport carries; nothing was sent. openraft then
    /// replicates fewer entries per request.
    #[error("rpc to peer {target} too large: {reason}")]
    TooLarge {
        /// The peer.
        target: NodeId,
        /// Sizes.
        reason: String,
    },
}

/// A request/response transport between masters.
///
/// Implementations must answer within `timeout` or fail with [`TransportFailure::Network`], fail
/// with [`TransportFailure::TooLarge`] (sending nothing) a request larger than they carry, and
/// reach a master (e.g. by checking that its certificate names the master role; the addresses
/// come from the replicated membership, so `target` is the master at `node.addr`, unless it
/// moved or lost its data dir: see [`RaftEnvelope`]).
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends `req` to master `target`, described as `node` (its address, and the data dir
    /// that must answer: see [`RaftEnvelope`]), and returns its response.
    fn call(
        &self,
        target: NodeId,
        node: &MasterNode,
        req: RaftRpc,
        timeout: Duration,
    ) -> impl Future<Output = Result<RaftRpcResponse, TransportFailure>> + Send;
}

/// Answers one incoming [`RaftRpc`] with the local raft instance (the server side of the seam).
pub async fn handle_raft_rpc(raft: &Raft, rpc: RaftRpc) -> RaftRpcResponse {
    match rpc {
        RaftRpc::AppendEntries(req) => {
            RaftRpcResponse::AppendEntries(raft.append_entries(req).await)
        }
        RaftRpc::Vote(req) => RaftRpcResponse::Vote(raft.vote(req).await),
        RaftRpc::InstallSnapshot(req) => {
            RaftRpcResponse::InstallSnapshot(raft.install_snapshot(req).await)
        }
    }
}

/// openraft's network factory over a [`RaftTransport`]. Creating a client does no I/O.
pub struct NetworkFactory<T> {
    transport: Arc<T>,
}

impl<T> NetworkFactory<T> {
    /// Wraps a transport.
    pub fn new(transport: Arc<T>) -> Self {
        Self { transport }
    }
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &MasterNode) -> Self::Network {
        PeerClient {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// openraft's per-peer network client over a [`RaftTransport`].
pub struct PeerClient<T> {
    transport: Arc<T>,
    target: NodeId,
    node: MasterNode,
}

/// A response of the wrong kind for the request.
#[derive(Debug, thiserror::Error)]
#[error("peer answered {got} to a {sent} request")]
struct Mismatch {
    sent: &'static str,
    got: &'static str,
}

fn kind(r: &RaftRpcResponse) -> &'static str {
    match r {
        RaftRpcResponse::AppendEntries(_) => "append-entries",
        RaftRpcResponse::Vote(_) => "vote",
        RaftRpcResponse::InstallSnapshot(_) => "install-snapshot",
    }
}

impl<T: RaftTransport> PeerClient<T> {
    async fn call<E: std::error::Error>(
        &self,
        req: RaftRpc,
        option: &RPCOption,
    ) -> Result<RaftRpcResponse, RPCError<NodeId, MasterNode, E>> {
        self.transport
            .call(self.target, &self.node, req, option.hard_ttl())
            .await
            .map_err(|f| match &f {
                TransportFailure::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&f)),
                TransportFailure::Network { .. } | TransportFailure::TooLarge { .. } => {
                    RPCError::Network(NetworkError::new(&f))
                }
            })
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, MasterNode, E> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

fn mismatch<E: std::error::Error>(
    sent: &'static str,
    got: &RaftRpcResponse,
) -> RPCError<NodeId, MasterNode, E> {
    RPCError::Network(NetworkError::new(&Mismatch {
        sent,
        got: kind(got),
    }))
}

impl<T: RaftTransport> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MasterNode, RaftError<NodeId>>>
    {
        let entries = rpc.entries.len() as u64;
        let response = self
            .transport
            .call(
                self.target,
                &self.node,
                RaftRpc::AppendEntries(rpc),
                option.hard_ttl(),
            )
            .await;
        match response {
            Ok(RaftRpcResponse::AppendEntries(r)) => r.map_err(|e| self.remote(e)),
            Ok(other) => Err(mismatch("append-entries", &other)),
            // Halve the batch; one entry too large for the transport cannot be split.
            Err(TransportFailure::TooLarge { .. }) if entries > 1 => Err(
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)),
            ),
            Err(f @ TransportFailure::Unreachable { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&f)))
            }
            Err(f) => Err(RPCError::Network(NetworkError::new(&f))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MasterNode, RaftError<NodeId>>> {
        match self.call(RaftRpc::Vote(rpc), &option).await? {
            RaftRpcResponse::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(mismatch("vote", &other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MasterNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(RaftRpc::InstallSnapshot(rpc), &option).await? {
            RaftRpcResponse::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(mismatch("install-snapshot", &other)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raft message is answered only by the master and data dir it is for (any data dir
    /// when the sender knows none).
    #[test]
    fn a_raft_message_for_another_master_or_data_dir_is_refused() {
        let to = |to: NodeId, incarnation: u64| RaftEnvelope {
            to,
            incarnation,
            rpc: RaftRpc::Vote(VoteRequest::new(openraft::Vote::new(1, 1), None)),
        };
        assert_eq!(to(2, 7).misaddressed(2, 7), None);
        assert_eq!(
            to(2, 0).misaddressed(2, 7),
            None,
            "incarnation not known yet"
        );
        let other_master = to(2, 7).misaddressed(3, 7).unwrap();
        assert!(
            other_master.contains("for master 2 reached master 3"),
            "{other_master}"
        );
        let other_dir = to(2, 7).misaddressed(2, 8).unwrap();
        assert!(
            other_dir.contains("must join under a new node-id"),
            "{other_dir}"
        );
    }
}
