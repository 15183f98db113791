//! microcosm's control plane.
//!
//! Masters keep the cluster's metadata in a replicated state machine ([`meta`]) driven by
//! openraft and stored in redb. The leader places tasks with the pure [`scheduler`], tracks
//! executor liveness with the pure [`liveness`] detector and drives every job through the
//! explicit lifecycle state machine in [`job`]. The cores take inputs and time and return
//! decisions, so they are unit-tested without sockets or sleeps; the async shells around them
//! do the I/O over `microcosm-transport`.

pub mod client;
pub mod exchange;
pub mod executor;
pub mod job;
pub mod leader;
pub mod liveness;
pub mod master;
pub mod meta;
pub mod proto;
pub mod scheduler;
