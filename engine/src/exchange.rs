//! Remote edges: the seam between the engine and the network.
//!
//! The engine knows nothing about transports. A task's [`Output`](crate::Output) built with
//! [`Output::remote`](crate::Output::remote) offers sealed batches to an [`ExchangeSender`];
//! on the receiving side the network pushes validated batches into an
//! [`InboundHandle`](crate::InboundHandle), which wakes the consuming task. The executor
//! implements [`Exchange`] over transport streams; [`MemoryExchange`] is the in-memory
//! implementation used by tests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use rkyv::util::AlignedVec;

use crate::batch::{Record, SealedBatch};
use crate::edge::{InboundHandle, InboundRejected, Notify};
use crate::error::EngineError;

/// Names one inbound remote edge: the consuming task's input in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeAddress {
    /// The job.
    pub job: u64,
    /// The edge within the job's graph.
    pub edge: u32,
    /// The consuming parallel instance (partition) of that edge.
    pub partition: u32,
}

impl fmt::Display for EdgeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "job {} edge {} partition {}",
            self.job, self.edge, self.partition
        )
    }
}

/// Why an [`ExchangeSender`] did not take a batch; the batch is given back.
#[derive(Debug)]
pub enum Rejected<R> {
    /// No room now. The sender must call the registered [`Notify`] once room frees.
    Full(SealedBatch<R>),
    /// The destination is gone for good.
    Closed(SealedBatch<R>),
}

/// The outbound half of a remote edge, owned by the producing task's output.
///
/// Contract: `offer` never blocks; after returning [`Rejected::Full`] the implementation
/// must eventually call the [`Notify`] given to [`ExchangeSender::set_notify`] (from any
/// thread) once a retry can succeed, or the producing task stays blocked.
pub trait ExchangeSender<R>: Send + 'static {
    /// Offers a sealed batch for delivery to the destination.
    fn offer(&mut self, batch: SealedBatch<R>) -> Result<(), Rejected<R>>;
    /// Who to notify when room frees after a `Full`; called once when the task is spawned.
    fn set_notify(&mut self, notify: Arc<dyn Notify>);
    /// Whether the destination is idle (nothing in flight), so partial batches should be
    /// flushed at once rather than lingering.
    fn is_idle(&self) -> bool;
    /// Asked by a finishing producer after [`ExchangeSender::close`]: whether everything
    /// offered, the end of the stream included, has been delivered (for a network edge:
    /// acknowledged by the consuming side), so that the producer may end. `Ok(false)`: not
    /// yet; the sender calls the registered [`Notify`] when that changes. `Err`: it never will
    /// (the stream could not be opened or failed); the producer must fail rather than end as
    /// if its records were delivered. Defaults to `Ok(true)` (nothing is held on this side).
    fn drained(&mut self) -> Result<bool, EngineError> {
        Ok(true)
    }
    /// The producer finished normally: no more batches. May be called more than once.
    fn close(&mut self);
    /// The producer failed or was cancelled. Defaults to [`ExchangeSender::close`].
    fn abort(&mut self) {
        self.close();
    }
}

/// Connects remote edges: the executor implements it over transport streams.
pub trait Exchange<R: Record>: Send + Sync {
    /// Opens the outbound side towards the inbound edge at `to`.
    fn connect(&self, to: EdgeAddress) -> Result<Box<dyn ExchangeSender<R>>, EngineError>;
    /// Registers a local inbound edge so that batches sent to `at` reach it.
    fn bind(&self, at: EdgeAddress, inbound: InboundHandle<R>) -> Result<(), EngineError>;
}

/// An in-memory [`Exchange`]: every offered batch is copied into a fresh aligned buffer and
/// validated again, as if it had crossed the network.
pub struct MemoryExchange<R> {
    bound: Arc<Mutex<HashMap<EdgeAddress, Arc<InboundHandle<R>>>>>,
}

impl<R> MemoryExchange<R> {
    /// An exchange with nothing bound.
    pub fn new() -> Self {
        Self {
            bound: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<R> Default for MemoryExchange<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> Clone for MemoryExchange<R> {
    fn clone(&self) -> Self {
        Self {
            bound: self.bound.clone(),
        }
    }
}

impl<R> fmt::Debug for MemoryExchange<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self
            .bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("MemoryExchange").field("bound", &n).finish()
    }
}

impl<R: Record> Exchange<R> for MemoryExchange<R> {
    fn connect(&self, to: EdgeAddress) -> Result<Box<dyn ExchangeSender<R>>, EngineError> {
        let map = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        let target = map
            .get(&to)
            .cloned()
            .ok_or_else(|| EngineError::UnknownDestination(to.to_string()))?;
        Ok(Box::new(MemorySender {
            address: to,
            target: Some(target),
            bound: self.bound.clone(),
        }))
    }

    fn bind(&self, at: EdgeAddress, inbound: InboundHandle<R>) -> Result<(), EngineError> {
        let mut map = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&at) {
            return Err(EngineError::AddressInUse(at.to_string()));
        }
        map.insert(at, Arc::new(inbound));
        Ok(())
    }
}

struct MemorySender<R> {
    address: EdgeAddress,
    target: Option<Arc<InboundHandle<R>>>,
    bound: Arc<Mutex<HashMap<EdgeAddress, Arc<InboundHandle<R>>>>>,
}

impl<R> MemorySender<R> {
    fn release(&mut self) {
        // Dropping the last handle ends the stream for the consumer.
        self.target = None;
        self.bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.address);
    }
}

impl<R: Record> ExchangeSender<R> for MemorySender<R> {
    fn offer(&mut self, batch: SealedBatch<R>) -> Result<(), Rejected<R>> {
        let Some(target) = &self.target else {
            return Err(Rejected::Closed(batch));
        };
        // The "wire": a copy into a new aligned buffer, validated once on arrival.
        let mut wire = AlignedVec::<16>::with_capacity(batch.as_bytes().len());
        wire.extend_from_slice(batch.as_bytes());
        let Ok(received) = SealedBatch::<R>::from_bytes(wire) else {
            return Err(Rejected::Closed(batch));
        };
        match target.push(received) {
            Ok(()) => Ok(()),
            Err(InboundRejected::Full(_)) => Err(Rejected::Full(batch)),
            Err(InboundRejected::Closed(_)) => Err(Rejected::Closed(batch)),
        }
    }

    fn set_notify(&mut self, notify: Arc<dyn Notify>) {
        if let Some(target) = &self.target {
            target.set_space_notify(notify);
        }
    }

    fn is_idle(&self) -> bool {
        self.target.as_ref().is_none_or(|t| t.is_idle())
    }

    fn close(&mut self) {
        self.release();
    }

    fn abort(&mut self) {
        if let Some(target) = &self.target {
            target.abort();
        }
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::operators::Forward;
    use crate::testkit::{Collect, Counter, settle};
    use crate::{
        Batch, Context, EdgeConfig, Input, Operator, Output, Status, TaskSpec, TaskState, Worker,
        edge, inbound_edge,
    };

    /// Counts how many sealed (network) batches reach it, reading them in place.
    struct SealedSum {
        sealed: Arc<Mutex<(usize, u64)>>,
    }

    impl Operator for SealedSum {
        type In = u64;
        type Out = ();
        fn run(
            &mut self,
            inputs: &mut [Input<u64>],
            _: &mut [Output<()>],
            _: &mut Context<'_>,
        ) -> Result<Status, EngineError> {
            while let Some(batch) = inputs[0].pop() {
                let Batch::Sealed(sealed) = batch else {
                    return Err(EngineError::operator("expected a sealed batch"));
                };
                let mut s = self.sealed.lock().unwrap();
                s.0 += 1;
                s.1 += sealed.records().iter().map(|x| x.to_native()).sum::<u64>();
            }
            Ok(if inputs[0].is_finished() {
                Status::Finished
            } else {
                Status::BlockedOnInput
            })
        }
    }

    const ADDR: EdgeAddress = EdgeAddress {
        job: 1,
        edge: 2,
        partition: 0,
    };

    #[test]
    fn remote_edge_through_memory_exchange_delivers_in_order_with_backpressure() {
        let clock = ManualClock::new();
        let (tx, _events) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(clock.clone()), tx);
        let h = worker.handle();
        let exchange = MemoryExchange::<u64>::new();
        let (inbound, remote_in) = inbound_edge::<u64>(1).unwrap();
        exchange.bind(ADDR, inbound).unwrap();
        assert!(matches!(
            exchange.bind(ADDR, inbound_edge::<u64>(1).unwrap().0),
            Err(EngineError::AddressInUse(_))
        ));
        let config = EdgeConfig {
            capacity: 1,
            batch_size: 10,
            linger: Duration::from_micros(50),
        };
        let remote_out = Output::remote(exchange.connect(ADDR).unwrap(), &config).unwrap();
        let (fwd_out, fwd_in) = edge::<u64>(&config).unwrap();
        let (sink, seen) = Collect::new();
        let sink = h.spawn(TaskSpec::new("sink", sink).input(fwd_in)).unwrap();
        let fwd = h
            .spawn(
                TaskSpec::new("recv", Forward::<u64>::new())
                    .input(remote_in)
                    .output(fwd_out),
            )
            .unwrap();
        settle(&mut worker, clock.now());
        fwd.pause();
        settle(&mut worker, clock.now());
        let src = h
            .spawn(
                TaskSpec::new(
                    "src",
                    Counter {
                        next: 0,
                        n: 95,
                        per_run: 1000,
                    },
                )
                .output(remote_out),
            )
            .unwrap();
        settle(&mut worker, clock.now());
        assert_eq!(
            src.metrics().records_out(),
            10,
            "only one batch fits the remote queue"
        );
        assert_eq!(src.state(), TaskState::Running);
        fwd.resume();
        settle(&mut worker, clock.now());
        assert_eq!(src.state(), TaskState::Finished);
        assert_eq!(
            sink.state(),
            TaskState::Finished,
            "end of stream crossed the exchange"
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.records, (0..95).collect::<Vec<_>>());
        assert!(!seen.aborted);
        assert!(matches!(
            exchange.connect(ADDR),
            Err(EngineError::UnknownDestination(_))
        ));
    }

    #[test]
    fn forwarded_sealed_batches_reach_the_sink_without_reserialization() {
        let clock = ManualClock::new();
        let (tx, _events) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(clock.clone()), tx);
        let h = worker.handle();
        let (inbound, remote_in) = inbound_edge::<u64>(4).unwrap();
        let (fwd_out, fwd_in) = edge::<u64>(&EdgeConfig::default()).unwrap();
        let sealed = Arc::new(Mutex::new((0, 0)));
        h.spawn(
            TaskSpec::new("recv", Forward::<u64>::new())
                .input(remote_in)
                .output(fwd_out),
        )
        .unwrap();
        let sink = h
            .spawn(
                TaskSpec::new(
                    "sum",
                    SealedSum {
                        sealed: sealed.clone(),
                    },
                )
                .input(fwd_in),
            )
            .unwrap();
        for chunk in [vec![1u64, 2, 3], vec![4, 5]] {
            let bytes = crate::OwnedBatch::from_vec(chunk)
                .seal()
                .unwrap()
                .into_bytes();
            let mut wire = AlignedVec::<16>::new();
            wire.extend_from_slice(&bytes);
            inbound
                .push(SealedBatch::from_bytes(wire).unwrap())
                .unwrap();
        }
        drop(inbound);
        settle(&mut worker, clock.now());
        assert_eq!(*sealed.lock().unwrap(), (2, 15));
        assert_eq!(sink.state(), TaskState::Finished);
        assert!(clock.now() >= clock.start());
    }
}
