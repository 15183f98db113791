//! The engine's error type.

use std::fmt::Display;

/// Everything that can go wrong inside the engine.
///
/// Task failures ([`EngineError::Operator`], [`EngineError::Panicked`]) are reported through
/// [`TaskEvent::Failed`](crate::TaskEvent::Failed); they end only the failing task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Bytes received for a sealed batch failed rkyv validation (bytecheck).
    #[error("batch failed validation: {0}")]
    InvalidBatch(String),
    /// Serializing an owned batch into its archived form failed.
    #[error("serializing a batch failed: {0}")]
    Serialize(String),
    /// Operator code returned an error; only its task fails.
    #[error("operator failed: {0}")]
    Operator(String),
    /// Operator code panicked; the panic was caught and only its task fails.
    #[error("operator panicked: {0}")]
    Panicked(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The engine (or worker) is stopping or stopped and takes no new tasks.
    #[error("engine is shut down")]
    ShutDown,
    /// A task was placed on a worker index that does not exist.
    #[error("no such worker: {0}")]
    NoSuchWorker(usize),
    /// An exchange has no inbound handle bound at this address.
    #[error("unknown exchange destination {0}")]
    UnknownDestination(String),
    /// An exchange already has an inbound handle bound at this address.
    #[error("exchange address already bound: {0}")]
    AddressInUse(String),
    /// The operating system refused to start a worker thread.
    #[error("starting a worker thread failed: {0}")]
    Spawn(String),
    /// Tasks waited for with [`wait_finished`](crate::wait_finished) failed, were cancelled
    /// or did not finish in time.
    #[error("tasks did not finish: {0}")]
    NotFinished(String),
}

impl EngineError {
    /// An operator failure with a message, for use in [`Operator::run`](crate::Operator::run).
    pub fn operator(message: impl Display) -> Self {
        Self::Operator(message.to_string())
    }
}
