//! The masters' replicated metadata: openraft 0.9 over a redb store.
//!
//! Layers, from the inside out:
//! - [`state`]: the metadata model ([`MetaState`]) and its pure, deterministic
//!   [`MetaState::apply`] of [`MetaRequest`]s (executors, jobs, tasks and placements,
//!   checkpoints, id counters, request-id dedup). Unit-tested without raft or disk.
//! - [`store`]: openraft's `RaftLogStorage` / `RaftStateMachine` / snapshot builder over one
//!   redb file in the master's data dir, guarded by a schema version and a cluster id.
//! - [`network`]: openraft's network traits over the abstract [`RaftTransport`]
//!   (request/response; the QUIC RPC layer implements it) plus the server-side
//!   [`handle_raft_rpc`].
//! - [`node`]: [`MetaNode`], which owns the `openraft::Raft`, and exposes bootstrap, writes with
//!   leader forwarding hints and a timeout, linearizable reads, membership changes, status and a
//!   split-vote watchdog.
//! - [`testing`]: [`testing::MemRouter`], an in-memory transport with fault injection.

pub mod network;
pub mod node;
pub mod state;
pub mod store;
pub mod testing;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use network::{
    RaftEnvelope, RaftRpc, RaftRpcResponse, RaftTransport, TransportFailure, handle_raft_rpc,
};
pub use node::{MetaConfig, MetaNode, MetaStatus, SplitVoteWatchdog};
pub use state::{
    Command, CommandResponse, ExecutorId, ExecutorState, JobId, MetaRequest, MetaState, Rejection,
    RequestId, TaskId,
};

/// Identifies a master in the raft group (stable for the life of its data dir).
pub type NodeId = u64;

/// What the raft group knows about a master: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterNode {
    /// The master's RPC address (`ip:port`).
    pub addr: String,
    /// Human-readable name.
    pub name: String,
    /// A random number drawn when its data dir was created (0: not known, as for the other
    /// masters named in a bootstrap). A master with a new data dir has a new one, which tells
    /// a master whose data was lost from the same master asking again.
    pub incarnation: u64,
    /// Which start of its data dir described the master so (1 for its first; 0: not known,
    /// as in a bootstrap). It orders the descriptions one master sent from successive starts:
    /// a request of an earlier start, still retried on its behalf, must not undo a later one.
    pub start: u64,
}

impl MasterNode {
    /// A node description of unknown incarnation.
    pub fn new(addr: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            name: name.into(),
            incarnation: 0,
            start: 0,
        }
    }

    /// The same, as written by start `start` of its data dir.
    pub fn with_start(self, start: u64) -> Self {
        Self { start, ..self }
    }

    /// Whether `other` names the same address, name and data dir (whichever start wrote it).
    pub fn same_as(&self, other: &MasterNode) -> bool {
        self.addr == other.addr && self.name == other.name && self.incarnation == other.incarnation
    }

    /// Whether this description, of the same data dir as `recorded`, comes from an earlier
    /// start than the one that wrote `recorded`.
    pub fn older_than(&self, recorded: &MasterNode) -> bool {
        self.incarnation == recorded.incarnation && self.start < recorded.start
    }

    /// The same, of data-dir incarnation `incarnation`.
    pub fn with_incarnation(self, incarnation: u64) -> Self {
        Self {
            incarnation,
            ..self
        }
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the masters' metadata group.
    pub TypeConfig:
        D = MetaRequest,
        R = CommandResponse,
        NodeId = NodeId,
        Node = MasterNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The openraft instance type of a master.
pub type Raft = openraft::Raft<TypeConfig>;

/// Errors of the metadata layer. [`MetaError::is_retryable`] tells a caller whether trying again
/// (possibly elsewhere) can succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// A configuration value is impossible; the message names the key.
    #[error("invalid meta config: {0}")]
    InvalidConfig(String),
    /// This master is not the leader; retry at the hinted leader (if any).
    #[error("{}", not_leader_message(*.leader_id, .leader_addr.as_deref()))]
    ForwardToLeader {
        /// The current leader, if known.
        leader_id: Option<NodeId>,
        /// Its RPC address, if known.
        leader_addr: Option<String>,
    },
    /// No quorum confirmed the operation in time (too many masters down or partitioned). The
    /// write may still commit later; retry with the same request id.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// A membership change is already in progress.
    #[error("membership change in progress: {0}")]
    MembershipInProgress(String),
    /// A membership change was refused (unknown learner, empty membership, …).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The data dir belongs to another cluster.
    #[error("data dir {dir} belongs to cluster {found:?}, not {expected:?}")]
    ClusterMismatch {
        /// The data dir.
        dir: String,
        /// Cluster id stored in it.
        found: String,
        /// Cluster id configured.
        expected: String,
    },
    /// The data dir was written by an incompatible version.
    #[error("data dir schema version {found} is not the supported version {expected}")]
    SchemaMismatch {
        /// Version stored.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The local store failed.
    #[error("metadata storage: {context}: {message}")]
    Storage {
        /// What was being done.
        context: String,
        /// The underlying error.
        message: String,
    },
    /// The bootstrap was refused (e.g. this node is not among the members).
    #[error("bootstrap refused: {0}")]
    Bootstrap(String),
    /// The raft node stopped (shut down, storage failure or panic).
    #[error("raft stopped: {0}")]
    Stopped(String),
}

fn not_leader_message(id: Option<NodeId>, addr: Option<&str>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("not leader (leader is {id} at {addr})"),
        (Some(id), None) => format!("not leader (leader is {id}, address unknown)"),
        _ => "not leader (no leader known: election in progress)".to_owned(),
    }
}

impl MetaError {
    /// Whether retrying (after a short pause, or at the hinted leader) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::ForwardToLeader { .. } | Self::NoQuorum(_) | Self::MembershipInProgress(_)
        )
    }
}
