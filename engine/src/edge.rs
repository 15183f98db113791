//! Edges between tasks: bounded queues of batches with wake-ups in both directions, and the
//! producer side's latency-bounded batching.
//!
//! An edge has one producer ([`Output`], or an [`InboundHandle`] fed by the network) and one
//! consumer ([`Input`]). The queue is a bounded crossbeam channel of [`Batch`]es: a full queue
//! makes the producer's send fail and the producing task block (backpressure); memory stays
//! bounded by `capacity` batches plus one pending and one stalled batch at the producer.
//!
//! Wake-ups use a "waiting" flag per direction with `SeqCst` fences on both sides (Dekker
//! style), so a wake is never lost and a busy peer is never woken needlessly: a consumer that
//! found its queue empty is woken by the next push, a producer that found it full is woken by
//! the next pop.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::batch::{Batch, BufferPool, OwnedBatch, Record};
use crate::error::EngineError;
use crate::exchange::{ExchangeSender, Rejected};
use crate::task::{TaskMetrics, TaskWaker};

/// Default linger bound: a partly filled batch is flushed at most this long after its first
/// record was added.
pub const DEFAULT_LINGER: Duration = Duration::from_micros(50);

/// Something that can be told "you may make progress now", from any thread.
pub trait Notify: Send + Sync {
    /// Signals the waiting party. Must be cheap and must not block.
    fn notify(&self);
}

/// Sizing and batching of one edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    /// Queue capacity in batches (at least 1).
    pub capacity: usize,
    /// Records per full batch (at least 1).
    pub batch_size: usize,
    /// Longest time a partly filled batch waits for more records.
    pub linger: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            capacity: 16,
            batch_size: 1024,
            linger: DEFAULT_LINGER,
        }
    }
}

impl EdgeConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.capacity == 0 {
            return Err(EngineError::Config(
                "edge capacity must be at least 1".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(EngineError::Config("batch size must be at least 1".into()));
        }
        Ok(())
    }
}

/// State shared by both ends of an edge.
pub(crate) struct EdgeShared {
    consumer: OnceLock<TaskWaker>,
    producer: Mutex<Option<Arc<dyn Notify>>>,
    consumer_waiting: AtomicBool,
    producer_waiting: AtomicBool,
    producer_closed: AtomicBool,
    producer_aborted: AtomicBool,
    consumer_closed: AtomicBool,
    queued: AtomicIsize,
}

impl EdgeShared {
    fn new() -> Self {
        Self {
            consumer: OnceLock::new(),
            producer: Mutex::new(None),
            consumer_waiting: AtomicBool::new(false),
            producer_waiting: AtomicBool::new(false),
            producer_closed: AtomicBool::new(false),
            producer_aborted: AtomicBool::new(false),
            consumer_closed: AtomicBool::new(false),
            queued: AtomicIsize::new(0),
        }
    }

    /// Batches currently queued.
    pub(crate) fn depth(&self) -> usize {
        usize::try_from(self.queued.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn set_producer(&self, notify: Arc<dyn Notify>) {
        *self.producer.lock().unwrap_or_else(PoisonError::into_inner) = Some(notify);
    }

    fn wake_consumer(&self) {
        if let Some(waker) = self.consumer.get() {
            waker.wake();
        }
    }

    fn wake_producer(&self) {
        let guard = self.producer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(notify) = guard.as_ref() {
            notify.notify();
        }
    }

    /// After a successful push: wake the consumer if it declared itself waiting.
    fn pushed(&self) {
        fence(Ordering::SeqCst);
        if self.consumer_waiting.load(Ordering::Relaxed)
            && self.consumer_waiting.swap(false, Ordering::AcqRel)
        {
            self.wake_consumer();
        }
    }

    /// After a successful pop: wake the producer if it was blocked on a full queue.
    fn popped(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.producer_waiting.load(Ordering::Relaxed)
            && self.producer_waiting.swap(false, Ordering::AcqRel)
        {
            self.wake_producer();
        }
    }

    /// Tries to enqueue; on a full queue registers the producer as waiting and retries once
    /// so a concurrent pop cannot be missed.
    fn try_push<R>(&self, tx: &Sender<Batch<R>>, batch: Batch<R>) -> PushResult<R> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let batch = match tx.try_send(batch) {
            Ok(()) => {
                self.pushed();
                return PushResult::Sent;
            }
            Err(TrySendError::Disconnected(batch)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                return PushResult::Closed(batch);
            }
            Err(TrySendError::Full(batch)) => batch,
        };
        self.producer_waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        match tx.try_send(batch) {
            Ok(()) => {
                self.pushed();
                PushResult::Sent
            }
            Err(TrySendError::Full(batch)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                PushResult::Full(batch)
            }
            Err(TrySendError::Disconnected(batch)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                PushResult::Closed(batch)
            }
        }
    }
}

enum PushResult<R> {
    Sent,
    Full(Batch<R>),
    Closed(Batch<R>),
}

/// Creates an in-process edge: the producer's [`Output`] and the consumer's [`Input`].
pub fn edge<R: Record>(config: &EdgeConfig) -> Result<(Output<R>, Input<R>), EngineError> {
    config.validate()?;
    let (tx, rx) = crossbeam_channel::bounded(config.capacity);
    let shared = Arc::new(EdgeShared::new());
    // Buffers in flight: the queue, one being consumed, one stalled, one being filled.
    let pool = Arc::new(BufferPool::new(config.capacity + 3, config.batch_size));
    let output = Output::new(
        Route::Local {
            tx,
            edge: shared.clone(),
        },
        pool,
        config,
    );
    Ok((output, Input::new(rx, shared)))
}

/// Creates an edge whose producer is the network side: received sealed batches are pushed
/// through the [`InboundHandle`] and consumed by the task holding the [`Input`].
pub fn inbound_edge<R: Record>(
    capacity: usize,
) -> Result<(InboundHandle<R>, Input<R>), EngineError> {
    if capacity == 0 {
        return Err(EngineError::Config(
            "edge capacity must be at least 1".into(),
        ));
    }
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let shared = Arc::new(EdgeShared::new());
    Ok((
        InboundHandle {
            tx,
            edge: shared.clone(),
        },
        Input::new(rx, shared),
    ))
}

/// The consuming end of an edge, handed to the operator at its input index.
pub struct Input<R> {
    rx: Receiver<Batch<R>>,
    edge: Arc<EdgeShared>,
    putback: Option<Batch<R>>,
    index: usize,
    metrics: Option<Arc<TaskMetrics>>,
    held: bool,
}

impl<R> Input<R> {
    fn new(rx: Receiver<Batch<R>>, edge: Arc<EdgeShared>) -> Self {
        Self {
            rx,
            edge,
            putback: None,
            index: 0,
            metrics: None,
            held: false,
        }
    }

    /// Holds this input (`true`) or lets it go (`false`). While it is held, batches queued on
    /// it do not make its task runnable again when the operator returns
    /// [`Status::BlockedOnInput`](crate::Status::BlockedOnInput) or
    /// [`Status::WaitUntil`](crate::Status::WaitUntil), and pushes to it need not wake the task;
    /// its end and an abort still do. For an operator that leaves an input unread on purpose
    /// while it waits on its other inputs (a barrier that arrived here first, say), so that it
    /// waits for them instead of being run again every round. Held inputs are the operator's
    /// business: it lets them go when it reads them again.
    pub fn hold(&mut self, held: bool) {
        self.held = held;
    }

    /// Whether the input is held ([`Input::hold`]).
    pub fn is_held(&self) -> bool {
        self.held
    }

    pub(crate) fn edge(&self) -> &Arc<EdgeShared> {
        &self.edge
    }

    pub(crate) fn bind(&mut self, index: usize, waker: &TaskWaker, metrics: &Arc<TaskMetrics>) {
        self.index = index;
        self.metrics = Some(metrics.clone());
        // An `Input` is not `Clone`, so its edge has no consumer yet.
        let _ = self.edge.consumer.set(waker.clone());
    }

    /// This input's position among the task's inputs.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Takes the next batch, if any. Popping wakes a producer blocked on a full queue.
    pub fn pop(&mut self) -> Option<Batch<R>> {
        if let Some(batch) = self.putback.take() {
            return Some(batch);
        }
        match self.rx.try_recv() {
            Ok(batch) => {
                self.edge.popped();
                if let Some(m) = &self.metrics {
                    m.count_in(batch.len());
                }
                Some(batch)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// Puts back the batch just popped (e.g. when the output was full); it is the next one
    /// [`Input::pop`] returns. Fails, returning the batch, if one is already put back.
    pub fn unpop(&mut self, batch: Batch<R>) -> Result<(), Batch<R>> {
        if self.putback.is_some() {
            return Err(batch);
        }
        self.putback = Some(batch);
        Ok(())
    }

    /// Batches waiting (including a put-back one).
    pub fn len(&self) -> usize {
        self.rx.len() + usize::from(self.putback.is_some())
    }

    /// Whether no batch is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the producer has finished normally and every batch has been popped: no
    /// more data will come. Never true for an aborted upstream ([`Input::upstream_aborted`]),
    /// so an operator that checked for an abort a moment before its upstream aborted cannot
    /// take the end of an incomplete stream for a normal one.
    pub fn is_finished(&self) -> bool {
        // The abort is stored before the close: a close seen here makes its abort visible.
        self.edge.producer_closed.load(Ordering::Acquire)
            && !self.edge.producer_aborted.load(Ordering::Acquire)
            && self.is_empty()
    }

    /// True if the producer failed or was cancelled (rather than finishing normally), or the
    /// network stream feeding this input broke ([`InboundHandle::abort`]). The consuming task
    /// is woken when this becomes true. An operator that sees it should fail (as
    /// [`Forward`](crate::operators::Forward) does): what it received is incomplete, and an
    /// aborted input never ends ([`Input::is_finished`]).
    pub fn upstream_aborted(&self) -> bool {
        self.edge.producer_aborted.load(Ordering::Acquire)
    }

    /// Declares the consumer waiting for data: the next push wakes it. Returns true if a
    /// batch is already there (queued or put back), in which case a task waiting for input
    /// should run again instead of waiting.
    pub(crate) fn register_waiting(&self) -> bool {
        self.edge.consumer_waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.putback.is_some() || !self.rx.is_empty()
    }
}

impl<R> Drop for Input<R> {
    fn drop(&mut self) {
        self.edge.consumer_closed.store(true, Ordering::Release);
        self.edge.wake_producer();
    }
}

impl<R> fmt::Debug for Input<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Input")
            .field("index", &self.index)
            .field("queued", &self.rx.len())
            .finish()
    }
}

enum Route<R: Record> {
    Local {
        tx: Sender<Batch<R>>,
        edge: Arc<EdgeShared>,
    },
    Remote(Box<dyn ExchangeSender<R>>),
}

/// The producing end of an edge: fills batches and sends them when full, when the consumer
/// is idle, or when the linger bound since the first record has passed.
///
/// Used inside a task, the engine flushes it after every operator invocation according to
/// that policy. Used outside a task (e.g. a test driver), call [`Output::flush`] yourself.
pub struct Output<R: Record> {
    route: Route<R>,
    pool: Arc<BufferPool<R>>,
    current: Vec<R>,
    first_at: Option<Instant>,
    stalled: Option<Batch<R>>,
    batch_size: usize,
    linger: Duration,
    now: Instant,
    closed: bool,
    error: Option<EngineError>,
    metrics: Option<Arc<TaskMetrics>>,
}

/// What an output needs after an operator invocation.
pub(crate) enum OutputState {
    /// Nothing pending.
    Clear,
    /// A partial batch waits; flush it at this instant at the latest.
    Linger(Instant),
    /// A batch could not be sent; the producer will be woken when space frees.
    Blocked,
}

impl<R: Record> Output<R> {
    fn new(route: Route<R>, pool: Arc<BufferPool<R>>, config: &EdgeConfig) -> Self {
        Self {
            current: Vec::new(),
            route,
            pool,
            first_at: None,
            stalled: None,
            batch_size: config.batch_size,
            linger: config.linger,
            now: Instant::now(),
            closed: false,
            error: None,
            metrics: None,
        }
    }

    /// An output whose batches go to a remote task through an exchange.
    pub fn remote(
        sender: Box<dyn ExchangeSender<R>>,
        config: &EdgeConfig,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let pool = Arc::new(BufferPool::new(2, config.batch_size));
        Ok(Self::new(Route::Remote(sender), pool, config))
    }

    pub(crate) fn bind(&mut self, waker: &TaskWaker, metrics: &Arc<TaskMetrics>) {
        self.metrics = Some(metrics.clone());
        let notify: Arc<dyn Notify> = Arc::new(waker.clone());
        match &mut self.route {
            Route::Local { edge, .. } => edge.set_producer(notify),
            Route::Remote(sender) => sender.set_notify(notify),
        }
    }

    pub(crate) fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// Records per full batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Appends a record. Returns it back if the output is blocked (a full batch is waiting
    /// for queue space); the operator should then return
    /// [`Status::BlockedOnOutput`](crate::Status::BlockedOnOutput).
    pub fn push(&mut self, record: R) -> Result<(), R> {
        if self.current.len() >= self.batch_size && !self.send_current() {
            return Err(record);
        }
        if self.current.capacity() == 0 {
            self.current = self.pool.take();
        }
        if self.current.is_empty() {
            self.first_at = Some(self.now);
        }
        self.current.push(record);
        if self.current.len() >= self.batch_size {
            self.send_current();
        }
        Ok(())
    }

    /// Whether [`Output::push`] would accept a record now.
    pub fn has_capacity(&self) -> bool {
        self.current.len() < self.batch_size || self.stalled.is_none()
    }

    /// Whether a batch is stuck waiting for queue space.
    pub fn is_blocked(&self) -> bool {
        self.stalled.is_some()
    }

    /// Whether the consumer is gone; records pushed now are discarded. A local consumer that
    /// ended needs nothing more; a remote edge closed by its receiving side (the consuming
    /// task or the network stream is gone) also fails this task, as its records were lost.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Records buffered here, not yet in the queue.
    pub fn pending(&self) -> usize {
        self.current.len() + self.stalled.as_ref().map_or(0, Batch::len)
    }

    /// Forwards a whole batch (e.g. a sealed batch in a pass-through operator) without
    /// copying or re-serializing it. Buffered records go first, so order is kept. Returns the
    /// batch back if the output is blocked.
    pub fn push_batch(&mut self, batch: Batch<R>) -> Result<(), Batch<R>> {
        if !self.drain_stalled() {
            return Err(batch);
        }
        if !self.current.is_empty() {
            let current = self.take_current();
            if let Err(current) = self.send(current) {
                self.stalled = Some(current);
                return Err(batch);
            }
        }
        if let Err(batch) = self.send(batch) {
            self.stalled = Some(batch);
        }
        Ok(())
    }

    /// Sends everything buffered now, regardless of batch size or linger. Returns true if
    /// nothing remains buffered (false: the queue is full; retry after a wake-up).
    pub fn flush(&mut self) -> bool {
        if self.drain_stalled() && !self.current.is_empty() {
            self.send_current();
        }
        self.stalled.is_none() && self.current.is_empty()
    }

    /// [`Output::flush`], and for a remote edge also closes the sender and waits until it
    /// delivered everything, its end included: what a finishing task waits for before it ends
    /// (false: retry after a wake-up). A sender that can no longer deliver records an error,
    /// which fails the task.
    pub(crate) fn flush_to_the_end(&mut self) -> bool {
        if !self.flush() {
            return false;
        }
        match &mut self.route {
            Route::Local { .. } => true,
            Route::Remote(sender) => {
                // Nothing more will be offered: the end of the stream can go out with the
                // rest (closing twice is harmless).
                sender.close();
                match sender.drained() {
                    Ok(done) => done,
                    Err(error) => {
                        if self.error.is_none() {
                            self.error = Some(error);
                        }
                        false
                    }
                }
            }
        }
    }

    /// Retries a batch stuck on a full queue; true if none is stuck any more.
    pub(crate) fn flush_stalled(&mut self) -> bool {
        self.drain_stalled()
    }

    pub(crate) fn take_error(&mut self) -> Option<EngineError> {
        self.error.take()
    }

    /// Applies the batching policy after an operator invocation.
    pub(crate) fn settle(&mut self, now: Instant) -> OutputState {
        if !self.drain_stalled() {
            return OutputState::Blocked;
        }
        let Some(first_at) = self.first_at.filter(|_| !self.current.is_empty()) else {
            return OutputState::Clear;
        };
        let deadline = first_at + self.linger;
        if self.current.len() >= self.batch_size || now >= deadline || self.downstream_idle() {
            self.send_current();
            if self.stalled.is_some() {
                OutputState::Blocked
            } else {
                OutputState::Clear
            }
        } else {
            OutputState::Linger(deadline)
        }
    }

    fn downstream_idle(&self) -> bool {
        match &self.route {
            Route::Local { tx, .. } => tx.is_empty(),
            Route::Remote(sender) => sender.is_idle(),
        }
    }

    fn take_current(&mut self) -> Batch<R> {
        self.first_at = None;
        let records = std::mem::take(&mut self.current);
        Batch::Owned(OwnedBatch::pooled(records, self.pool.clone()))
    }

    /// Moves the current batch out (into the queue, or into the stalled slot). Returns true
    /// if the current buffer is empty afterwards.
    fn send_current(&mut self) -> bool {
        if !self.drain_stalled() {
            return false;
        }
        let batch = self.take_current();
        if let Err(batch) = self.send(batch) {
            self.stalled = Some(batch);
        }
        true
    }

    fn drain_stalled(&mut self) -> bool {
        match self.stalled.take() {
            None => true,
            Some(batch) => match self.send(batch) {
                Ok(()) => true,
                Err(batch) => {
                    self.stalled = Some(batch);
                    false
                }
            },
        }
    }

    /// Sends one batch; `Err` gives it back when the queue is full. A closed consumer
    /// swallows the batch; a remote edge closed before this side closed it also records an
    /// error, which the worker takes after the invocation, settle or flush and fails the task
    /// with.
    fn send(&mut self, batch: Batch<R>) -> Result<(), Batch<R>> {
        if self.closed {
            return Ok(());
        }
        let len = batch.len();
        let result = match &mut self.route {
            Route::Local { tx, edge } => match edge.try_push(tx, batch) {
                PushResult::Sent => Ok(true),
                PushResult::Full(batch) => Err(batch),
                PushResult::Closed(_) => Ok(false),
            },
            Route::Remote(sender) => match batch.seal() {
                Err(error) => {
                    self.error = Some(error);
                    Ok(false)
                }
                Ok(sealed) => match sender.offer(sealed) {
                    Ok(()) => Ok(true),
                    Err(Rejected::Full(sealed)) => Err(Batch::Sealed(sealed)),
                    // Only `Drop` closes the sender, so the receiving side (the consuming
                    // task, or the stream to it) went first: this batch and every later one
                    // would be lost, which a normal finish must not hide.
                    Err(Rejected::Closed(_)) => {
                        if self.error.is_none() {
                            self.error = Some(EngineError::operator(format!(
                                "the remote edge was closed by its receiving side before this \
                                 task finished; a batch of {len} records was not delivered"
                            )));
                        }
                        Ok(false)
                    }
                },
            },
        };
        match result {
            Ok(true) => {
                if let Some(m) = &self.metrics {
                    m.count_out(len);
                }
                Ok(())
            }
            Ok(false) => {
                self.closed = true;
                Ok(())
            }
            Err(batch) => Err(batch),
        }
    }

    /// Ends the edge as failed without running: its consumer sees
    /// [`Input::upstream_aborted`], not an end. For an output built for a task that will not
    /// run after all (a launch that failed part-way); dropping it would end the stream as if
    /// its producer had finished.
    pub fn abandon(mut self) {
        self.abort();
    }

    /// Marks the edge as ended by failure or cancellation (the consumer sees
    /// [`Input::upstream_aborted`]).
    pub(crate) fn abort(&mut self) {
        match &mut self.route {
            Route::Local { edge, .. } => edge.producer_aborted.store(true, Ordering::Release),
            Route::Remote(sender) => sender.abort(),
        }
    }
}

impl<R: Record> Drop for Output<R> {
    fn drop(&mut self) {
        match &mut self.route {
            Route::Local { edge, .. } => {
                edge.producer_closed.store(true, Ordering::Release);
                edge.wake_consumer();
            }
            Route::Remote(sender) => sender.close(),
        }
    }
}

impl<R: Record> fmt::Debug for Output<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Output")
            .field("buffered", &self.current.len())
            .field("stalled", &self.stalled.is_some())
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .finish()
    }
}

/// Why the network side could not hand a batch to its consumer; the batch is given back.
#[derive(Debug)]
pub enum InboundRejected<R> {
    /// The consumer's queue is full; retry after the space notification fires.
    Full(Batch<R>),
    /// The consuming task is gone.
    Closed(Batch<R>),
}

/// The network side's end of an inbound remote edge: received batches are pushed here and
/// wake the consuming task. Methods take `&self`; share it in an `Arc` if needed. Dropping
/// it ends the stream for the consumer.
pub struct InboundHandle<R> {
    tx: Sender<Batch<R>>,
    edge: Arc<EdgeShared>,
}

impl<R> InboundHandle<R> {
    /// Hands a received batch (normally a [`SealedBatch`](crate::SealedBatch) validated by
    /// `SealedBatch::from_bytes`) to the consumer, waking it if it waits for data.
    pub fn push(&self, batch: impl Into<Batch<R>>) -> Result<(), InboundRejected<R>> {
        match self.edge.try_push(&self.tx, batch.into()) {
            PushResult::Sent => Ok(()),
            PushResult::Full(b) => Err(InboundRejected::Full(b)),
            PushResult::Closed(b) => Err(InboundRejected::Closed(b)),
        }
    }

    /// Registers who to notify when a full queue gets space again (after
    /// [`InboundRejected::Full`]). Replaces an earlier registration.
    pub fn set_space_notify(&self, notify: Arc<dyn Notify>) {
        self.edge.set_producer(notify);
    }

    /// Whether the consumer's queue can take a batch now.
    pub fn has_space(&self) -> bool {
        !self.tx.is_full()
    }

    /// Whether the consumer's queue is empty (the consumer is idle).
    pub fn is_idle(&self) -> bool {
        self.tx.is_empty()
    }

    /// Whether the consuming task is gone.
    pub fn is_closed(&self) -> bool {
        self.edge.consumer_closed.load(Ordering::Acquire)
    }

    /// Ends the stream as failed (e.g. the connection was lost): the consuming task is woken
    /// and sees [`Input::upstream_aborted`].
    pub fn abort(&self) {
        self.edge.producer_aborted.store(true, Ordering::Release);
        self.edge.wake_consumer();
    }
}

impl<R> Drop for InboundHandle<R> {
    fn drop(&mut self) {
        self.edge.producer_closed.store(true, Ordering::Release);
        self.edge.wake_consumer();
    }
}

impl<R> fmt::Debug for InboundHandle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundHandle")
            .field("queued", &self.tx.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::exchange::{EdgeAddress, Exchange, MemoryExchange};
    use crate::testkit::{Counter, Manual, drain, settle};
    use crate::{Context, Operator, Park, Status, TaskEvent, TaskSpec, TaskState, Worker};

    fn worker() -> (Worker, ManualClock, crossbeam_channel::Receiver<TaskEvent>) {
        let clock = ManualClock::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        (Worker::new(0, Arc::new(clock.clone()), tx), clock, rx)
    }

    fn failure_of(events: &crossbeam_channel::Receiver<TaskEvent>, task: crate::TaskId) -> String {
        drain(events)
            .into_iter()
            .find_map(|e| match e {
                TaskEvent::Failed { task: t, error } if t == task => Some(error.to_string()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Drains its input and fails once its upstream is aborted (as the demo's operators do).
    struct Strict;

    impl Operator for Strict {
        type In = u64;
        type Out = ();
        fn run(
            &mut self,
            inputs: &mut [Input<u64>],
            _: &mut [Output<()>],
            _: &mut Context<'_>,
        ) -> Result<Status, EngineError> {
            if inputs[0].upstream_aborted() {
                return Err(EngineError::operator("upstream aborted"));
            }
            while inputs[0].pop().is_some() {}
            Ok(if inputs[0].is_finished() {
                Status::Finished
            } else {
                Status::BlockedOnInput
            })
        }
    }

    /// An abandoned output's consumer sees an abort, not an end.
    #[test]
    fn an_abandoned_output_aborts_its_consumer() {
        let (out, input) = edge::<u64>(&EdgeConfig::default()).unwrap();
        out.abandon();
        assert!(input.upstream_aborted() && !input.is_finished());
    }

    /// An upstream that aborted and then went away never looks like one that finished.
    #[test]
    fn an_aborted_upstream_never_looks_finished() {
        let config = EdgeConfig {
            capacity: 2,
            batch_size: 1,
            ..EdgeConfig::default()
        };
        let (mut out, mut input) = edge::<u64>(&config).unwrap();
        out.abort();
        drop(out);
        assert!(input.pop().is_none());
        assert!(input.upstream_aborted());
        assert!(!input.is_finished());

        let (inbound, input) = inbound_edge::<u64>(2).unwrap();
        inbound.abort();
        drop(inbound);
        assert!(input.upstream_aborted());
        assert!(!input.is_finished());
    }

    #[test]
    fn aborting_an_inbound_edge_wakes_its_blocked_consumer_which_fails() {
        let (mut worker, clock, events) = worker();
        let (inbound, input) = inbound_edge::<u64>(4).unwrap();
        let task = worker
            .handle()
            .spawn(TaskSpec::new("strict", Strict).input(input))
            .unwrap();
        let out = settle(&mut worker, clock.now());
        assert_eq!(out.park(), Park::Indefinitely, "blocked on input");

        inbound.abort();
        let woken = worker.step(clock.now());
        assert_eq!(woken.ran, 1, "the abort woke the consumer");
        assert_eq!(task.state(), TaskState::Failed);
        assert!(failure_of(&events, task.id()).contains("upstream aborted"));
        drop(inbound);
    }

    const ADDR: EdgeAddress = EdgeAddress {
        job: 1,
        edge: 1,
        partition: 0,
    };

    /// A remote output towards an inbound edge whose consumer is already gone.
    fn remote_to_closed_consumer(config: &EdgeConfig) -> Output<u64> {
        let exchange = MemoryExchange::<u64>::new();
        let (inbound, input) = inbound_edge::<u64>(4).unwrap();
        exchange.bind(ADDR, inbound).unwrap();
        let output = Output::remote(exchange.connect(ADDR).unwrap(), config).unwrap();
        drop(input);
        output
    }

    #[test]
    fn a_remote_output_closed_by_the_receiver_fails_its_task_when_it_finishes() {
        let (mut worker, clock, events) = worker();
        // Large batches and a long linger: the records go out only in the final flush.
        let config = EdgeConfig {
            capacity: 4,
            batch_size: 100,
            linger: Duration::from_secs(60),
        };
        let source = Counter {
            next: 0,
            n: 5,
            per_run: 100,
        };
        let task = worker
            .handle()
            .spawn(TaskSpec::new("src", source).output(remote_to_closed_consumer(&config)))
            .unwrap();
        settle(&mut worker, clock.now());
        assert_eq!(task.state(), TaskState::Failed, "not a normal finish");
        assert!(failure_of(&events, task.id()).contains("5 records was not delivered"));
    }

    #[test]
    fn a_remote_output_closed_by_the_receiver_fails_its_task_while_it_runs() {
        let (mut worker, clock, events) = worker();
        let config = EdgeConfig {
            capacity: 4,
            batch_size: 100,
            linger: Duration::ZERO,
        };
        let queue = Arc::new(Mutex::new(VecDeque::from([1, 2, 3])));
        let task = worker
            .handle()
            .spawn(
                TaskSpec::new("src", Manual { queue }).output(remote_to_closed_consumer(&config)),
            )
            .unwrap();
        // The source goes idle with a partial batch, which the settle after it sends.
        settle(&mut worker, clock.now());
        assert_eq!(task.state(), TaskState::Failed);
        assert!(failure_of(&events, task.id()).contains("closed by its receiving side"));
    }

    /// A remote sender that takes every batch and reports them gone only when told to
    /// (`Some(true)`), or that it failed (`None`).
    struct Holding {
        state: Arc<Mutex<Option<bool>>>,
        notify: Option<Arc<dyn Notify>>,
    }

    impl ExchangeSender<u64> for Holding {
        fn offer(&mut self, _: crate::SealedBatch<u64>) -> Result<(), Rejected<u64>> {
            Ok(())
        }
        fn set_notify(&mut self, notify: Arc<dyn Notify>) {
            self.notify = Some(notify);
        }
        fn is_idle(&self) -> bool {
            false
        }
        fn drained(&mut self) -> Result<bool, EngineError> {
            match *self.state.lock().unwrap() {
                Some(done) => Ok(done),
                None => Err(EngineError::operator("the stream failed")),
            }
        }
        fn close(&mut self) {}
    }

    #[test]
    fn a_finishing_producer_waits_until_its_remote_sender_has_sent_everything() {
        for outcome in [Some(true), None] {
            let (mut worker, clock, events) = worker();
            let state = Arc::new(Mutex::new(Some(false)));
            let sender = Holding {
                state: state.clone(),
                notify: None,
            };
            let source = Counter {
                next: 0,
                n: 5,
                per_run: 100,
            };
            let output = Output::remote(Box::new(sender), &EdgeConfig::default()).unwrap();
            let task = worker
                .handle()
                .spawn(TaskSpec::new("src", source).output(output))
                .unwrap();
            settle(&mut worker, clock.now());
            assert_eq!(task.state(), TaskState::Finishing, "records still held");
            // A pause does not apply to a task that only waits for its outputs.
            task.pause();
            settle(&mut worker, clock.now());
            assert_eq!(task.state(), TaskState::Finishing, "not paused");
            *state.lock().unwrap() = outcome;
            // The sender's notify is the task's waker; wake it as the sender would.
            task.waker().wake();
            settle(&mut worker, clock.now());
            match outcome {
                Some(_) => assert_eq!(task.state(), TaskState::Finished),
                None => {
                    assert_eq!(task.state(), TaskState::Failed);
                    assert!(failure_of(&events, task.id()).contains("the stream failed"));
                }
            }
        }
    }
}
