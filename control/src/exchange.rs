//! The engine's [`Exchange`] over QUIC data streams: how remote edges cross executors.
//!
//! Outbound, each remote edge gets one long-lived unidirectional stream to the executor that
//! runs the consuming task, opened with a [`StreamHeader`] naming job, epoch and edge. Batches
//! go through a small bounded queue to an async sender; a full queue is reported to the engine
//! as `Full` (the producing task blocks) and the sender notifies the task when room frees, so
//! QUIC flow control ends up as the backpressure. A producer that finishes finishes its stream
//! (the consumer's input ends) and ends only once the consuming executor acknowledged all of
//! it, so a stream into a connection whose peer is gone (e.g. restarted at the same address)
//! fails the producer instead of ending it as if delivered. One that fails or is cancelled
//! resets its stream, so the consumer sees an aborted stream rather than a normal end. A stream that broke makes the producer's next
//! offer fail, which fails the producing task.
//!
//! Inbound, executors register each remote edge's [`InboundHandle`] in an [`InboundRegistry`].
//! An arriving stream is matched by (job, epoch, edge, partition); a stream from an older epoch
//! than the one registered for its job is refused (fencing a replaced attempt). Each frame is
//! validated once ([`SealedBatch::from_bytes`]) and pushed to the consuming task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use microcosm_engine::{
    EdgeAddress, EngineError, Exchange, ExchangeSender, InboundHandle, InboundRejected, Notify,
    Record, Rejected, SealedBatch,
};
use microcosm_transport::{DataStream, Endpoint, Frame, Message, Role, Router};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::proto::StreamHeader;

/// Batches queued per outbound edge before the producer is told the edge is full.
const OUTBOUND_QUEUE: usize = 8;
/// How long an arriving stream waits for its consumer to be registered before a warning says
/// so (it goes on waiting while its epoch is current).
const BIND_WAIT: Duration = Duration::from_secs(10);
/// Stream stop code: stale epoch or unknown edge.
const STOP_REFUSED: u32 = 10;
/// Stream reset code: the producing task failed or was cancelled.
const RESET_ABORTED: u32 = 11;

/// A type-erased inbound edge: takes validated frames.
trait InboundPort: Send + Sync {
    /// Pushes one frame; `Err(Some(frame))` means full (retry after notify), `Err(None)` closed
    /// or invalid.
    fn push(&self, frame: Frame) -> Result<(), PushError>;
    fn set_space_notify(&self, notify: Arc<dyn Notify>);
    fn abort(&self);
}

enum PushError {
    Full(Frame),
    Closed,
    Invalid(String),
}

impl<R: Record> InboundPort for InboundHandle<R> {
    fn push(&self, frame: Frame) -> Result<(), PushError> {
        let batch =
            SealedBatch::<R>::from_bytes(frame).map_err(|e| PushError::Invalid(e.to_string()))?;
        match InboundHandle::push(self, batch) {
            Ok(()) => Ok(()),
            Err(InboundRejected::Full(b)) => match b.seal() {
                Ok(sealed) => Err(PushError::Full(sealed.into_bytes())),
                Err(e) => Err(PushError::Invalid(e.to_string())),
            },
            Err(InboundRejected::Closed(_)) => Err(PushError::Closed),
        }
    }

    fn set_space_notify(&self, notify: Arc<dyn Notify>) {
        InboundHandle::set_space_notify(self, notify);
    }

    fn abort(&self) {
        InboundHandle::abort(self);
    }
}

type PortKey = (u64, u64, u32, u32);

/// Inbound remote edges of every job attempt on this executor.
#[derive(Default, Clone)]
pub struct InboundRegistry {
    inner: Arc<Mutex<RegistryInner>>,
    /// Signalled when a data stream arrives for an attempt not running here yet.
    unknown_attempt: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct RegistryInner {
    ports: HashMap<PortKey, Arc<dyn InboundPort>>,
    /// Newest epoch registered per job: streams of older epochs are refused.
    epochs: HashMap<u64, u64>,
    /// Highest epoch retired per job: its streams are refused too (the attempt was stopped
    /// here, so its consumers will not come back).
    retired: HashMap<u64, u64>,
    /// The attempts (job → epoch) the masters last told this executor to run, when that
    /// heartbeat was sent, and the grace ([`InboundRegistry::confirm_assignments`]).
    confirmed: Option<Confirmed>,
    /// Jobs forgotten here ([`InboundRegistry::forget_job`]) and when: their entries in
    /// `epochs` and `retired` go once the masters have not given them here for
    /// [`FORGOTTEN_KEPT_FOR_GRACES`] graces, so the maps do not grow with every job ever run.
    forgotten: HashMap<u64, Instant>,
    /// Streams waiting for their consumer.
    waiting: usize,
    /// The attempt (job → epoch) launched here, all its inbound edges bound: a stream of it
    /// for an edge not registered is not for this executor (or came twice).
    launched: HashMap<u64, u64>,
    /// Edges whose stream failed before their consumer registered, oldest first (at most
    /// [`FAILED_KEPT`]): the consumer is failed when it registers, instead of waiting for a
    /// stream that will not come again.
    failed: std::collections::VecDeque<PortKey>,
}

/// Most edges remembered as failed before their consumer registered.
const FAILED_KEPT: usize = 1024;

/// How many of [`InboundRegistry::confirm_assignments`]' graces a forgotten job's epochs are
/// kept. One grace is as long as any master may still hand out an attempt the others moved
/// on from; the rest is margin.
pub const FORGOTTEN_KEPT_FOR_GRACES: u32 = 10;

impl InboundRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        // The maps stay consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, key: PortKey, port: Arc<dyn InboundPort>) -> Result<(), EngineError> {
        let mut inner = self.lock();
        let newest = inner.epochs.entry(key.0).or_insert(key.1);
        if key.1 < *newest {
            return Err(EngineError::operator(format!(
                "job {} epoch {} is older than the registered epoch {}",
                key.0, key.1, newest
            )));
        }
        *newest = key.1;
        if let Some(at) = inner.failed.iter().position(|k| *k == key) {
            inner.failed.remove(at);
            drop(inner);
            warn!(
                job = key.0,
                epoch = key.1,
                edge = key.2,
                partition = key.3,
                "the data stream of this edge failed before its consumer started: failing it"
            );
            port.abort();
            return Ok(());
        }
        inner.ports.insert(key, port);
        Ok(())
    }

    /// Remembers that the stream of edge `key` failed before its consumer registered, or
    /// fails the consumer if it registered meanwhile.
    fn stream_failed_early(&self, key: PortKey) {
        let mut inner = self.lock();
        if let Some(port) = inner.ports.remove(&key) {
            drop(inner);
            port.abort();
            return;
        }
        // A retired attempt's consumers will not register: nothing to fail.
        let retired = inner.retired.get(&key.0).is_some_and(|r| key.1 <= *r);
        if retired || inner.failed.contains(&key) {
            return;
        }
        if inner.failed.len() == FAILED_KEPT {
            inner.failed.pop_front();
        }
        inner.failed.push_back(key);
    }

    /// A router that hands every data stream opened by another executor to this registry
    /// ([`InboundRegistry::serve`]): what an executor's endpoint serves.
    pub fn router(&self) -> Router {
        let registry = self.clone();
        Router::new().data_streams(&[Role::Executor], move |_peer, stream| {
            let registry = registry.clone();
            async move { registry.serve(stream).await }
        })
    }

    /// Attempt `epoch` of `job` is launched here: every inbound edge it has here is bound.
    /// A stream of it for any other edge (or a second one for an edge whose stream ended) is
    /// refused from now on instead of waiting for a consumer that will not come.
    pub fn launched(&self, job: u64, epoch: u64) {
        self.lock().launched.insert(job, epoch);
    }

    /// Forgets every inbound edge of `job` at epochs up to `epoch` (aborting them); streams
    /// of those epochs that arrive later are refused.
    pub fn retire(&self, job: u64, epoch: u64) {
        let mut inner = self.lock();
        if inner.launched.get(&job).is_some_and(|e| *e <= epoch) {
            inner.launched.remove(&job);
        }
        let retired = inner.retired.entry(job).or_insert(epoch);
        *retired = (*retired).max(epoch);
        let stale: Vec<PortKey> = inner
            .ports
            .keys()
            .filter(|k| k.0 == job && k.1 <= epoch)
            .copied()
            .collect();
        for k in stale {
            if let Some(p) = inner.ports.remove(&k) {
                p.abort();
            }
        }
        // Their consumers will not register: nothing to fail any more.
        inner.failed.retain(|k| !(k.0 == job && k.1 <= epoch));
    }

    /// Forgets a job's attempts here: every inbound edge, up to the newest epoch registered
    /// (a later attempt of the job may still come here).
    pub fn forget_job(&self, job: u64) {
        let newest = {
            let mut inner = self.lock();
            inner.forgotten.insert(job, Instant::now());
            inner.epochs.get(&job).copied()
        };
        if let Some(newest) = newest {
            self.retire(job, newest);
        }
    }

    /// Records the attempts (job, epoch) the masters told this executor to run in the reply
    /// to a heartbeat sent at `sent`. A stream for an attempt not among them that arrived at
    /// least `grace` before `sent` will never find its consumer here: its producer learned
    /// of its epoch from state any leader answering that late had applied, and this executor
    /// was not given the attempt (the job was re-placed without it, cancelled, or moved on).
    /// `grace` is the executor TTL, which the masters keep longer than a leader cut off from
    /// the others may go on answering with older state.
    ///
    /// A job forgotten here that the masters have not given back for
    /// [`FORGOTTEN_KEPT_FOR_GRACES`] graces is dropped from the registry altogether (its late
    /// streams then wait for a heartbeat like any unknown attempt's, and are refused by it).
    pub fn confirm_assignments(
        &self,
        sent: Instant,
        grace: Duration,
        attempts: impl IntoIterator<Item = (u64, u64)>,
    ) {
        let attempts: HashMap<u64, u64> = attempts.into_iter().collect();
        let kept_for = grace.saturating_mul(FORGOTTEN_KEPT_FOR_GRACES);
        let mut inner = self.lock();
        let RegistryInner {
            epochs,
            retired,
            forgotten,
            ..
        } = &mut *inner;
        forgotten.retain(|job, at| {
            if attempts.contains_key(job) {
                // Given here again: no longer forgotten.
                return false;
            }
            let expired = sent
                .checked_duration_since(*at)
                .is_some_and(|d| d >= kept_for);
            if expired {
                epochs.remove(job);
                retired.remove(job);
            }
            !expired
        });
        inner.confirmed = Some(Confirmed {
            sent,
            grace,
            attempts,
        });
    }

    /// Whether attempt (`job`, `epoch`) was stopped here ([`InboundRegistry::retire`],
    /// [`InboundRegistry::forget_job`]): it must not run here again, as its streams are
    /// refused and its sinks' files may have been written by its first run.
    pub fn is_retired(&self, job: u64, epoch: u64) -> bool {
        self.lock().retired.get(&job).is_some_and(|r| epoch <= *r)
    }

    /// Completes once a data stream arrived for an attempt that does not run here (yet) since
    /// the last call: the masters have probably given this executor an attempt it learns of
    /// at its next heartbeat, while the producing executor already runs its part. The
    /// executor heartbeats at once then, so that the stream's records do not wait up to a
    /// heartbeat interval (500 ms on an idle executor) for their consumer.
    pub async fn stream_for_unknown_attempt(&self) {
        self.unknown_attempt.notified().await;
    }

    /// How many data streams are waiting for their consumer's attempt to start here.
    pub fn waiting_streams(&self) -> usize {
        self.lock().waiting
    }

    fn lookup(&self, key: PortKey, arrived: Instant) -> Lookup {
        let inner = self.lock();
        if let Some(p) = inner.ports.get(&key) {
            return Lookup::Found(p.clone());
        }
        let newest = inner.epochs.get(&key.0).copied().unwrap_or(0);
        let retired = inner.retired.get(&key.0).copied();
        if key.1 < newest || retired.is_some_and(|r| key.1 <= r) {
            return Lookup::Stale(newest.max(retired.unwrap_or(0)));
        }
        if inner.launched.get(&key.0) == Some(&key.1) {
            return Lookup::NotHere;
        }
        match &inner.confirmed {
            Some(c)
                if arrived.checked_add(c.grace).is_some_and(|t| c.sent > t)
                    && c.attempts.get(&key.0) != Some(&key.1) =>
            {
                Lookup::NotHere
            }
            _ => Lookup::NotYet,
        }
    }

    /// Serves one incoming data stream until it ends.
    ///
    /// A stream may arrive before its consumer's attempt is launched here (the executors
    /// learn of a new attempt at their own heartbeats). It waits for the consumer as long as
    /// its epoch is current and may still come here: refusing it after a while would lose
    /// what the producer sent, and a producer that has finished would never send it again.
    /// The wait ends when the attempt is found stale (a later epoch is registered, or the
    /// attempt was stopped here), when the reply to a heartbeat sent a TTL or more after the
    /// stream arrived does not give this executor the attempt
    /// ([`InboundRegistry::confirm_assignments`]), when its attempt was launched here
    /// without its edge ([`InboundRegistry::launched`]), or when the producer resets the
    /// stream before its first frame arrived (that frame is read ahead meanwhile).
    pub async fn serve(&self, mut stream: DataStream) {
        let header = match StreamHeader::decode(stream.header()) {
            Ok(h) => h,
            Err(e) => {
                warn!(peer = %stream.peer().addr, error = %e, "bad data stream header");
                stream.stop(STOP_REFUSED);
                return;
            }
        };
        let key = (header.job, header.epoch, header.edge, header.partition);
        let mut first: Option<Frame> = None;
        let mut ended = false;
        let arrived = Instant::now();
        let found = {
            let _waiting = Waiting::new(self);
            // `recv` is cancel-safe: dropped part-way through a frame when the consumer is
            // found, it leaves the bytes it read to the loop below.
            let mut next = std::pin::pin!(stream.recv());
            let mut read_ahead = false;
            let mut announced = false;
            let mut pause = Duration::from_millis(1);
            let since = tokio::time::Instant::now();
            let mut warned = false;
            loop {
                match self.lookup(key, arrived) {
                    Lookup::Found(p) => break Ok(p),
                    Lookup::Stale(newest) => break Err(Some(newest)),
                    Lookup::NotHere => break Err(None),
                    Lookup::NotYet => {
                        if !announced {
                            // The masters probably gave this executor a new attempt it hears
                            // of at its next heartbeat; asking now starts it sooner.
                            announced = true;
                            self.unknown_attempt.notify_one();
                        }
                    }
                }
                if !warned && since.elapsed() >= BIND_WAIT {
                    warned = true;
                    warn!(
                        ?header,
                        "a data stream has waited {BIND_WAIT:?} for its consumer"
                    );
                }
                tokio::select! {
                    r = &mut next, if !read_ahead => {
                        read_ahead = true;
                        match r {
                            Ok(Some(frame)) => first = Some(frame),
                            Ok(None) => ended = true,
                            Err(e) => {
                                warn!(?header, error = %e, "data stream failed before its consumer registered");
                                self.stream_failed_early(key);
                                return;
                            }
                        }
                    }
                    _ = tokio::time::sleep(pause) => {
                        pause = (pause * 2).min(Duration::from_millis(100));
                    }
                }
            }
        };
        let port = match found {
            Ok(port) => port,
            Err(Some(newest)) => {
                warn!(
                    job = header.job,
                    epoch = header.epoch,
                    newest,
                    "refusing a data stream of a stale epoch"
                );
                stream.stop(STOP_REFUSED);
                return;
            }
            Err(None) => {
                warn!(
                    job = header.job,
                    epoch = header.epoch,
                    edge = header.edge,
                    partition = header.partition,
                    "refusing a data stream no task here consumes (the masters did not give \
                     this executor its attempt, or the attempt has no such edge here)"
                );
                stream.stop(STOP_REFUSED);
                return;
            }
        };
        let space = Arc::new(TokioNotify(tokio::sync::Notify::new()));
        port.set_space_notify(space.clone());
        let mut pending = first;
        loop {
            if pending.is_none() && !ended {
                pending = match stream.recv().await {
                    Ok(Some(f)) => Some(f),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(?header, error = %e, "data stream failed; failing its consumer");
                        port.abort();
                        return;
                    }
                };
                ended = pending.is_none();
            }
            let Some(frame) = pending.take() else {
                break;
            };
            let mut frame = frame;
            loop {
                match port.push(frame) {
                    Ok(()) => break,
                    Err(PushError::Full(f)) => {
                        frame = f;
                        // Wait for room, re-checking now and then in case a notify raced.
                        let _ = tokio::time::timeout(Duration::from_millis(20), space.0.notified())
                            .await;
                    }
                    Err(PushError::Closed) => {
                        stream.stop(STOP_REFUSED);
                        return;
                    }
                    Err(PushError::Invalid(e)) => {
                        warn!(?header, error = %e, "invalid batch on data stream");
                        port.abort();
                        stream.stop(STOP_REFUSED);
                        return;
                    }
                }
            }
        }
        // The sender finished: end of this edge. Dropping our reference (and the registry's on
        // retire) closes it; close now so the consumer sees the end without waiting.
        let mut inner = self.lock();
        inner.ports.remove(&key);
    }
}

/// What a heartbeat's reply said runs here ([`InboundRegistry::confirm_assignments`]).
struct Confirmed {
    sent: Instant,
    grace: Duration,
    attempts: HashMap<u64, u64>,
}

/// Counts a stream as waiting for its consumer while it lives.
struct Waiting<'a>(&'a InboundRegistry);

impl<'a> Waiting<'a> {
    fn new(registry: &'a InboundRegistry) -> Self {
        registry.lock().waiting += 1;
        Waiting(registry)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.waiting = inner.waiting.saturating_sub(1);
    }
}

enum Lookup {
    Found(Arc<dyn InboundPort>),
    Stale(u64),
    /// No task here consumes the stream: the masters did not give this executor its
    /// attempt, or the attempt was launched here without that edge.
    NotHere,
    NotYet,
}

struct TokioNotify(tokio::sync::Notify);
impl Notify for TokioNotify {
    fn notify(&self) {
        self.0.notify_one();
    }
}

/// The [`Exchange`] of one job attempt on one executor.
pub struct QuicExchange {
    job: u64,
    epoch: u64,
    endpoint: Endpoint,
    runtime: tokio::runtime::Handle,
    /// Edge id → address of the executor running the consuming task.
    routes: HashMap<u32, SocketAddr>,
    registry: InboundRegistry,
}

impl QuicExchange {
    /// An exchange for attempt `epoch` of `job`; `routes` maps each remote edge to the
    /// executor that consumes it.
    pub fn new(
        job: u64,
        epoch: u64,
        endpoint: Endpoint,
        runtime: tokio::runtime::Handle,
        routes: HashMap<u32, SocketAddr>,
        registry: InboundRegistry,
    ) -> Self {
        Self {
            job,
            epoch,
            endpoint,
            runtime,
            routes,
            registry,
        }
    }
}

impl<R: Record> Exchange<R> for QuicExchange {
    fn connect(&self, to: EdgeAddress) -> Result<Box<dyn ExchangeSender<R>>, EngineError> {
        let addr = *self
            .routes
            .get(&to.edge)
            .ok_or_else(|| EngineError::operator(format!("no route for {to}")))?;
        let header = StreamHeader {
            job: self.job,
            epoch: self.epoch,
            edge: to.edge,
            partition: to.partition,
        };
        let (tx, rx) = mpsc::channel::<Bytes>(OUTBOUND_QUEUE);
        let shared = Arc::new(SenderShared::default());
        self.runtime.spawn(run_sender(
            self.endpoint.clone(),
            addr,
            header,
            rx,
            shared.clone(),
        ));
        Ok(Box::new(QuicSender {
            tx: Some(tx),
            shared,
            _record: std::marker::PhantomData,
        }))
    }

    fn bind(&self, at: EdgeAddress, inbound: InboundHandle<R>) -> Result<(), EngineError> {
        self.registry.register(
            (self.job, self.epoch, at.edge, at.partition),
            Arc::new(inbound),
        )
    }
}

#[derive(Default)]
struct SenderShared {
    notify: Mutex<Option<Arc<dyn Notify>>>,
    wants_notify: AtomicBool,
    in_flight: AtomicUsize,
    failed: AtomicBool,
    /// The stream was finished and the consuming executor acknowledged every byte of it,
    /// its end included: the producer may end.
    delivered: AtomicBool,
    /// The producer failed or was cancelled: reset the stream instead of finishing it.
    aborted: AtomicBool,
}

impl SenderShared {
    fn notify(&self) {
        if self.wants_notify.swap(false, Ordering::SeqCst) {
            // A poisoned lock still holds a valid Option.
            let n = self
                .notify
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(n) = n {
                n.notify();
            }
        }
    }
}

struct QuicSender<R> {
    tx: Option<mpsc::Sender<Bytes>>,
    shared: Arc<SenderShared>,
    _record: std::marker::PhantomData<fn() -> R>,
}

impl<R: Record> ExchangeSender<R> for QuicSender<R> {
    fn offer(&mut self, batch: SealedBatch<R>) -> Result<(), Rejected<R>> {
        let Some(tx) = &self.tx else {
            return Err(Rejected::Closed(batch));
        };
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(Rejected::Closed(batch));
        }
        // Announce interest before trying, so a slot freed in between still notifies.
        self.shared.wants_notify.store(true, Ordering::Release);
        match tx.try_reserve() {
            Ok(permit) => {
                self.shared.wants_notify.store(false, Ordering::Release);
                self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
                // Hand the archived bytes over without copying them.
                permit.send(Bytes::from_owner(batch.into_bytes()));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(Rejected::Full(batch)),
            Err(mpsc::error::TrySendError::Closed(())) => Err(Rejected::Closed(batch)),
        }
    }

    fn set_notify(&mut self, notify: Arc<dyn Notify>) {
        *self.shared.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(notify);
    }

    fn is_idle(&self) -> bool {
        self.shared.in_flight.load(Ordering::Acquire) == 0
    }

    fn drained(&mut self) -> Result<bool, EngineError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(EngineError::operator(
                "the data stream to the consuming executor failed or could not be opened; \
                 records offered to it were not delivered",
            ));
        }
        // Announce interest first: the sender notifies once the stream's end is acknowledged
        // (and when it fails), so a delivery in between is not missed. The store and the
        // loads below must not pass each other (the sender writes the same two the other way).
        self.shared.wants_notify.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.delivered.load(Ordering::SeqCst)
            && !self.shared.failed.load(Ordering::SeqCst)
        {
            self.shared.wants_notify.store(false, Ordering::Release);
            return Ok(true);
        }
        Ok(false)
    }

    fn close(&mut self) {
        self.tx = None;
    }

    fn abort(&mut self) {
        // Set before the queue closes, so the sender sees it when its queue ends.
        self.shared.aborted.store(true, Ordering::Release);
        self.tx = None;
    }
}

/// Most queued batches written to a data stream at once.
const SEND_COALESCE: usize = 64;

async fn run_sender(
    endpoint: Endpoint,
    addr: SocketAddr,
    header: StreamHeader,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<SenderShared>,
) {
    let fail = |shared: &SenderShared, why: String| {
        warn!(%addr, ?header, error = %why, "outbound edge failed");
        shared.failed.store(true, Ordering::Release);
        shared.in_flight.store(0, Ordering::Release);
        shared.wants_notify.store(true, Ordering::Release);
        shared.notify();
    };
    let head = match header.encode() {
        Ok(h) => Bytes::from_owner(h),
        Err(e) => return fail(&shared, e.to_string()),
    };
    let mut sender = match endpoint
        .open_data_stream(addr, head, Duration::from_secs(10))
        .await
    {
        Ok(s) => s,
        Err(e) => return fail(&shared, e.to_string()),
    };
    shared.notify();
    // Everything already queued goes out in one write, so that a burst of small batches
    // shares packets instead of costing one each.
    let mut batch = Vec::new();
    while let Some(bytes) = rx.recv().await {
        batch.push(bytes);
        while batch.len() < SEND_COALESCE
            && let Ok(more) = rx.try_recv()
        {
            batch.push(more);
        }
        shared.notify();
        let n = batch.len();
        if let Err(e) = sender.send_many(std::mem::take(&mut batch)).await {
            return fail(&shared, e.to_string());
        }
        shared.in_flight.fetch_sub(n, Ordering::SeqCst);
        shared.notify();
    }
    if shared.aborted.load(Ordering::Acquire) {
        // The consumer must not take what it got for the whole stream.
        debug!(%addr, ?header, "producer aborted: resetting its data stream");
        sender.reset(RESET_ABORTED);
    } else {
        match sender.finish_acknowledged().await {
            Ok(()) => {
                shared.delivered.store(true, Ordering::SeqCst);
                shared.notify();
            }
            Err(e) => fail(
                &shared,
                format!("the end of the stream was not acknowledged: {e}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use microcosm_engine::{
        Context, Engine, EngineConfig, Input, Operator, Output, OwnedBatch, Status, TaskEvent,
        TaskSpec, inbound_edge,
    };
    use microcosm_transport::tls::init_cluster_certs;
    use microcosm_transport::{Identity, TransportConfig};

    use super::*;

    /// Reports every record it receives; fails if its upstream aborted, finishes at the end
    /// of the stream.
    struct Strict {
        received: std_mpsc::Sender<u64>,
    }

    impl Operator for Strict {
        type In = u64;
        type Out = ();
        fn run(
            &mut self,
            inputs: &mut [Input<u64>],
            _: &mut [Output<()>],
            _: &mut Context<'_>,
        ) -> Result<Status, EngineError> {
            while let Some(batch) = inputs[0].pop() {
                for &x in batch.into_owned()?.iter() {
                    let _ = self.received.send(x);
                }
            }
            if inputs[0].upstream_aborted() {
                return Err(EngineError::operator("upstream aborted"));
            }
            Ok(if inputs[0].is_finished() {
                Status::Finished
            } else {
                Status::BlockedOnInput
            })
        }
    }

    /// An engine running a [`Strict`] consumer bound to the inbound edge `to` of `side`; the
    /// records it receives arrive on the returned channel.
    fn consume(
        side: &QuicExchange,
        to: EdgeAddress,
    ) -> (
        Engine,
        microcosm_engine::TaskHandle,
        std_mpsc::Receiver<u64>,
    ) {
        let engine = Engine::start(EngineConfig::with_workers(1)).unwrap();
        let (inbound, input) = inbound_edge::<u64>(4).unwrap();
        Exchange::<u64>::bind(side, to, inbound).unwrap();
        let (received, arrivals) = std_mpsc::channel();
        let consumer = engine
            .spawn(TaskSpec::new("consumer", Strict { received }).input(input))
            .unwrap();
        (engine, consumer, arrivals)
    }

    /// The event with which `task` of `engine` ended.
    fn end_of(
        engine: &Engine,
        task: &microcosm_engine::TaskHandle,
        patience: Duration,
    ) -> TaskEvent {
        let events = engine.events();
        loop {
            let event = events.recv_timeout(patience).expect("the task ends");
            if event.task() == task.id() && !matches!(event, TaskEvent::Started { .. }) {
                return event;
            }
        }
    }

    /// A multi-threaded runtime for the data-plane tasks of a test.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Two executors' exchanges for job 1 epoch 1 on loopback: the receiving side (with its
    /// registry serving its endpoint) and the sending side, routing edge 2 to it.
    fn two_sides(
        runtime: &tokio::runtime::Runtime,
    ) -> (tempfile::TempDir, QuicExchange, QuicExchange, EdgeAddress) {
        let dir = tempfile::tempdir().unwrap();
        init_cluster_certs(dir.path(), "test", &[]).unwrap();
        let identity = Identity::load(dir.path(), Role::Executor).unwrap();
        let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let registry = InboundRegistry::default();
        let bind = |router| {
            Endpoint::bind(localhost, &identity, TransportConfig::default(), router).unwrap()
        };
        let receiving = bind(registry.router());
        let sending = bind(Router::new());
        let to = EdgeAddress {
            job: 1,
            edge: 2,
            partition: 0,
        };
        let inbound_side = QuicExchange::new(
            1,
            1,
            receiving.clone(),
            runtime.handle().clone(),
            HashMap::new(),
            registry,
        );
        let outbound_side = QuicExchange::new(
            1,
            1,
            sending,
            runtime.handle().clone(),
            HashMap::from([(to.edge, receiving.local_addr())]),
            InboundRegistry::default(),
        );
        (dir, inbound_side, outbound_side, to)
    }

    /// The consumer's attempt starts here only after the producer has sent everything and
    /// finished (longer than the wait that used to refuse such a stream): every record still
    /// arrives, and so does the end of the stream.
    #[test]
    fn a_stream_waits_for_a_consumer_that_registers_late() {
        const PATIENCE: Duration = Duration::from_secs(30);
        let runtime = runtime();
        let _inside = runtime.enter();
        let (_dir, inbound_side, outbound_side, to) = two_sides(&runtime);
        let mut sender = Exchange::<u64>::connect(&outbound_side, to).unwrap();
        let (signal, signals) = std_mpsc::channel();
        sender.set_notify(Arc::new(Signal(signal)));
        let batch = OwnedBatch::from_vec(vec![1u64, 2, 3]).seal().unwrap();
        assert!(sender.offer(batch).is_ok());
        sender.close();
        // Delivered: the receiving executor acknowledged all of it, its end included, though
        // no consumer is there yet.
        while !sender.drained().unwrap() {
            signals.recv_timeout(PATIENCE).expect("the sender notifies");
        }
        std::thread::sleep(BIND_WAIT + Duration::from_secs(1));

        let (engine, consumer, arrivals) = consume(&inbound_side, to);
        let got: Vec<u64> = (0..3)
            .map(|_| arrivals.recv_timeout(PATIENCE).unwrap())
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
        let ended = end_of(&engine, &consumer, PATIENCE);
        assert!(matches!(ended, TaskEvent::Finished { .. }), "{ended:?}");
        assert!(engine.shutdown(Duration::from_secs(5)).drained);
    }

    /// A stream that breaks while it waits for its consumer (here: reset before its first
    /// frame) cannot come again: the consumer that registers later fails at once instead of
    /// waiting for it for good.
    #[test]
    fn a_consumer_whose_stream_failed_before_it_registered_fails() {
        const PATIENCE: Duration = Duration::from_secs(30);
        let runtime = runtime();
        let _inside = runtime.enter();
        let (_dir, inbound_side, outbound_side, to) = two_sides(&runtime);
        let header = StreamHeader {
            job: 1,
            epoch: 1,
            edge: to.edge,
            partition: to.partition,
        }
        .encode()
        .unwrap();
        let registry = inbound_side.registry.clone();
        let waiting = |n: usize| {
            let deadline = Instant::now() + PATIENCE;
            while registry.waiting_streams() != n {
                assert!(Instant::now() < deadline, "waiting streams never {n}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let sender = runtime
            .block_on(outbound_side.endpoint.open_data_stream(
                inbound_side.endpoint.local_addr(),
                Bytes::from_owner(header),
                PATIENCE,
            ))
            .unwrap();
        waiting(1);
        sender.reset(99);
        waiting(0);
        let (engine, consumer, _arrivals) = consume(&inbound_side, to);
        let ended = end_of(&engine, &consumer, PATIENCE);
        assert!(
            matches!(&ended, TaskEvent::Failed { error, .. } if error.to_string().contains("upstream aborted")),
            "{ended:?}"
        );
        assert!(engine.shutdown(Duration::from_secs(5)).drained);
    }

    /// One batch over a real data stream, then the producer aborts: the consumer must fail,
    /// not finish as if the stream had ended normally.
    #[test]
    fn an_aborted_sender_fails_the_remote_consumer_instead_of_ending_its_stream() {
        const PATIENCE: Duration = Duration::from_secs(30);
        let runtime = runtime();
        let _inside = runtime.enter();
        let (_dir, inbound_side, outbound_side, to) = two_sides(&runtime);

        let (engine, consumer, arrivals) = consume(&inbound_side, to);
        let mut sender = Exchange::<u64>::connect(&outbound_side, to).unwrap();
        let batch = OwnedBatch::from_vec(vec![1u64, 2, 3]).seal().unwrap();
        assert!(sender.offer(batch).is_ok());
        // The stream is up and its first batch through before the producer aborts.
        let first: Vec<u64> = (0..3)
            .map(|_| arrivals.recv_timeout(PATIENCE).unwrap())
            .collect();
        assert_eq!(first, vec![1, 2, 3]);
        sender.abort();

        let ended = end_of(&engine, &consumer, PATIENCE);
        assert!(
            matches!(&ended, TaskEvent::Failed { error, .. } if error.to_string().contains("upstream aborted")),
            "{ended:?}"
        );
        assert!(engine.shutdown(Duration::from_secs(5)).drained);
    }

    struct Signal(std_mpsc::Sender<()>);

    impl microcosm_engine::Notify for Signal {
        fn notify(&self) {
            let _ = self.0.send(());
        }
    }

    /// A producer whose data stream never opens (nothing answers at the consumer's address)
    /// must not be told its records left: `drained` waits, then fails.
    #[test]
    fn a_sender_whose_stream_never_opens_is_not_drained_but_fails() {
        let runtime = runtime();
        let _inside = runtime.enter();
        let dir = tempfile::tempdir().unwrap();
        init_cluster_certs(dir.path(), "test", &[]).unwrap();
        let identity = Identity::load(dir.path(), Role::Executor).unwrap();
        let config = TransportConfig {
            connect_timeout: Duration::from_millis(300),
            ..TransportConfig::default()
        };
        let sending = Endpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity,
            config,
            Router::new(),
        )
        .unwrap();
        // A socket that takes datagrams and never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = EdgeAddress {
            job: 1,
            edge: 2,
            partition: 0,
        };
        let exchange = QuicExchange::new(
            1,
            1,
            sending,
            runtime.handle().clone(),
            HashMap::from([(to.edge, silent.local_addr().unwrap())]),
            InboundRegistry::default(),
        );
        let mut sender = Exchange::<u64>::connect(&exchange, to).unwrap();
        let (signal, signals) = std_mpsc::channel();
        sender.set_notify(Arc::new(Signal(signal)));
        let batch = OwnedBatch::from_vec(vec![1u64, 2, 3]).seal().unwrap();
        assert!(sender.offer(batch).is_ok(), "queued while the stream opens");
        assert!(!sender.drained().unwrap(), "nothing has left yet");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let error = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            signals.recv_timeout(left).expect("the sender notifies");
            match sender.drained() {
                Ok(false) => continue,
                Ok(true) => panic!("drained although the stream never opened"),
                Err(e) => break e,
            }
        };
        assert!(error.to_string().contains("not delivered"), "{error}");
    }

    /// A stream waits for its attempt until a heartbeat sent after it arrived says the
    /// masters did not give this executor that attempt.
    #[test]
    fn a_stream_for_an_attempt_the_masters_did_not_give_here_is_refused() {
        let registry = InboundRegistry::default();
        let key = (7, 2, 1, 0);
        let before = Instant::now();
        let arrived = before + Duration::from_millis(10);
        let after = arrived + Duration::from_millis(10);
        let lookup = |r: &InboundRegistry| r.lookup(key, arrived);
        assert!(matches!(lookup(&registry), Lookup::NotYet));
        let none = Duration::ZERO;
        // A reply to a heartbeat sent before the stream arrived proves nothing.
        registry.confirm_assignments(before, none, []);
        assert!(matches!(lookup(&registry), Lookup::NotYet));
        // Nor does one sent within the grace after it (a leader cut off from the others
        // may still answer then, from older state).
        registry.confirm_assignments(after, Duration::from_secs(1), []);
        assert!(matches!(lookup(&registry), Lookup::NotYet));
        // The attempt is among those given here: it is being launched.
        registry.confirm_assignments(after, none, [(7, 2), (8, 1)]);
        assert!(matches!(lookup(&registry), Lookup::NotYet));
        // Neither the job nor this epoch of it was given here.
        registry.confirm_assignments(after, none, [(8, 1)]);
        assert!(matches!(lookup(&registry), Lookup::NotHere));
        registry.confirm_assignments(after, none, [(7, 3)]);
        assert!(matches!(lookup(&registry), Lookup::NotHere));
        registry.confirm_assignments(after, none, [(7, 1)]);
        assert!(matches!(lookup(&registry), Lookup::NotHere));
    }

    /// A stream that arrives for an attempt not running here asks for an early heartbeat.
    #[test]
    fn a_stream_for_an_unknown_attempt_asks_for_a_heartbeat() {
        let runtime = runtime();
        let _inside = runtime.enter();
        let (_dir, inbound_side, outbound_side, to) = two_sides(&runtime);
        let registry = inbound_side.registry.clone();
        let mut sender = Exchange::<u64>::connect(&outbound_side, to).unwrap();
        let batch = OwnedBatch::from_vec(vec![1u64]).seal().unwrap();
        assert!(sender.offer(batch).is_ok());
        let asked = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                registry.stream_for_unknown_attempt(),
            )
            .await
        });
        assert!(asked.is_ok(), "no early heartbeat was asked for");
        sender.close();
    }

    /// The same over a real stream: it waits, then a heartbeat's reply ends the wait.
    #[test]
    fn a_waiting_stream_ends_when_the_masters_did_not_give_its_attempt_here() {
        const PATIENCE: Duration = Duration::from_secs(30);
        let runtime = runtime();
        let _inside = runtime.enter();
        let (_dir, inbound_side, outbound_side, to) = two_sides(&runtime);
        let registry = inbound_side.registry.clone();
        let mut sender = Exchange::<u64>::connect(&outbound_side, to).unwrap();
        let batch = OwnedBatch::from_vec(vec![1u64, 2, 3]).seal().unwrap();
        assert!(sender.offer(batch).is_ok());
        let waited = |want: usize| {
            let deadline = Instant::now() + PATIENCE;
            while registry.waiting_streams() != want {
                assert!(Instant::now() < deadline, "never {want} waiting streams");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        waited(1);
        registry.confirm_assignments(Instant::now(), Duration::ZERO, [(to.job + 1, 1)]);
        waited(0);
        sender.close();
    }

    #[test]
    fn retired_and_forgotten_epochs_are_stale_and_later_ones_wait() {
        let registry = InboundRegistry::default();
        let now = Instant::now();
        let stale = |r: &InboundRegistry, epoch| {
            matches!(r.lookup((7, epoch, 1, 0), now), Lookup::Stale(_))
        };
        let waits =
            |r: &InboundRegistry, epoch| matches!(r.lookup((7, epoch, 1, 0), now), Lookup::NotYet);
        // Nothing known of job 7 yet: any epoch may still come.
        assert!(waits(&registry, 1));
        let (inbound, _input) = inbound_edge::<u64>(4).unwrap();
        registry.register((7, 2, 1, 0), Arc::new(inbound)).unwrap();
        assert!(matches!(
            registry.lookup((7, 2, 1, 0), now),
            Lookup::Found(_)
        ));
        assert!(stale(&registry, 1), "older than the registered epoch");
        assert!(
            matches!(registry.lookup((7, 2, 2, 0), now), Lookup::NotYet),
            "another edge of the registered epoch may still be bound"
        );
        // The attempt is stopped here: its epoch is refused from now on, later ones wait.
        assert!(!registry.is_retired(7, 2));
        registry.retire(7, 2);
        assert!(stale(&registry, 2));
        assert!(waits(&registry, 3));
        assert!(registry.is_retired(7, 2) && registry.is_retired(7, 1));
        assert!(!registry.is_retired(7, 3) && !registry.is_retired(8, 2));
        // Forgetting the job refuses everything up to what was registered, not later epochs.
        registry.forget_job(7);
        assert!(stale(&registry, 2));
        assert!(waits(&registry, 3));
    }

    /// A stream that fails while waiting, just as its consumer registers, fails that
    /// consumer; a consumer that registers after the failure is failed at its registration.
    #[test]
    fn an_early_stream_failure_fails_the_consumer_whenever_it_registers() {
        let registry = InboundRegistry::default();
        let (inbound, input) = inbound_edge::<u64>(4).unwrap();
        registry.register((7, 2, 1, 0), Arc::new(inbound)).unwrap();
        registry.stream_failed_early((7, 2, 1, 0));
        assert!(input.upstream_aborted(), "registered meanwhile: failed now");
        registry.stream_failed_early((7, 2, 2, 0));
        let (inbound, input) = inbound_edge::<u64>(4).unwrap();
        assert!(!input.upstream_aborted());
        registry.register((7, 2, 2, 0), Arc::new(inbound)).unwrap();
        assert!(input.upstream_aborted(), "registered after: failed at once");
        assert!(registry.lock().failed.is_empty());
    }

    /// Retiring an attempt forgets its edges' early failures (their consumers will not come),
    /// not those of a later attempt.
    #[test]
    fn retiring_an_attempt_forgets_its_early_stream_failures() {
        let registry = InboundRegistry::default();
        registry.stream_failed_early((7, 2, 1, 0));
        registry.stream_failed_early((7, 3, 1, 0));
        registry.stream_failed_early((8, 2, 1, 0));
        registry.retire(7, 2);
        // A failure of the retired attempt reported later is not remembered either.
        registry.stream_failed_early((7, 2, 2, 0));
        let failed: Vec<PortKey> = registry.lock().failed.iter().copied().collect();
        assert_eq!(failed, [(7, 3, 1, 0), (8, 2, 1, 0)]);
    }

    /// Once an attempt is launched here, every inbound edge it has here is bound: a stream of
    /// it for another edge is refused at once instead of waiting (holding what it read) for
    /// as long as the attempt runs. Later epochs still wait.
    #[test]
    fn a_stream_for_an_edge_a_launched_attempt_does_not_consume_here_is_refused() {
        let registry = InboundRegistry::default();
        let now = Instant::now();
        let (inbound, _input) = inbound_edge::<u64>(4).unwrap();
        registry.register((7, 2, 1, 0), Arc::new(inbound)).unwrap();
        assert!(
            matches!(registry.lookup((7, 2, 999, 0), now), Lookup::NotYet),
            "its tasks may still be binding"
        );
        registry.launched(7, 2);
        assert!(matches!(
            registry.lookup((7, 2, 999, 0), now),
            Lookup::NotHere
        ));
        assert!(matches!(
            registry.lookup((7, 2, 1, 7), now),
            Lookup::NotHere
        ));
        assert!(matches!(
            registry.lookup((7, 2, 1, 0), now),
            Lookup::Found(_)
        ));
        assert!(matches!(registry.lookup((7, 3, 1, 0), now), Lookup::NotYet));
        assert!(matches!(registry.lookup((8, 2, 1, 0), now), Lookup::NotYet));
        // Stopped: its streams are stale; a later attempt's wait until it is launched too.
        registry.retire(7, 2);
        assert!(matches!(
            registry.lookup((7, 2, 999, 0), now),
            Lookup::Stale(_)
        ));
        let (inbound, _input) = inbound_edge::<u64>(4).unwrap();
        registry.register((7, 3, 1, 0), Arc::new(inbound)).unwrap();
        assert!(matches!(
            registry.lookup((7, 3, 999, 0), now),
            Lookup::NotYet
        ));
    }

    /// A forgotten job's epochs are kept while a master could still hand its attempts out,
    /// then dropped; a job given here again is not dropped.
    #[test]
    fn a_forgotten_jobs_epochs_go_after_the_masters_stopped_giving_it_for_long() {
        let registry = InboundRegistry::default();
        let grace = Duration::from_secs(1);
        let horizon = grace * FORGOTTEN_KEPT_FOR_GRACES;
        for job in [7, 8] {
            let (inbound, _input) = inbound_edge::<u64>(4).unwrap();
            registry
                .register((job, 2, 1, 0), Arc::new(inbound))
                .unwrap();
            registry.forget_job(job);
        }
        let forgot = Instant::now();
        let entries = |r: &InboundRegistry| {
            let inner = r.lock();
            (
                inner.epochs.len(),
                inner.retired.len(),
                inner.forgotten.len(),
            )
        };
        assert_eq!(entries(&registry), (2, 2, 2));
        registry.confirm_assignments(forgot + horizon / 2, grace, []);
        assert!(registry.is_retired(7, 2), "kept within the horizon");
        // Job 8 is given here again; job 7 is not.
        registry.confirm_assignments(forgot + horizon / 2, grace, [(8, 3)]);
        registry.confirm_assignments(forgot + horizon + grace, grace, [(8, 3)]);
        assert!(!registry.is_retired(7, 2));
        assert!(
            matches!(registry.lookup((7, 2, 1, 0), forgot), Lookup::NotHere),
            "a late stream of job 7 is refused by the heartbeat instead"
        );
        assert!(registry.is_retired(8, 2), "job 8 runs here again: kept");
        assert_eq!(entries(&registry), (1, 1, 0));
    }
}
