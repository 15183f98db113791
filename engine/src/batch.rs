//! Records and record batches.
//!
//! A batch exists in one of two forms:
//! - [`OwnedBatch`]: a `Vec<R>` being filled or read in process. In-process edges move these
//!   by pointer; their buffers return to a per-edge pool when dropped, so the steady state
//!   allocates nothing per record or per batch.
//! - [`SealedBatch`]: the rkyv archive of a `Vec<R>` in an aligned byte buffer, for crossing
//!   process boundaries. It is validated once (bytecheck) when constructed from received
//!   bytes and then read in place; a pass-through operator forwards the same bytes.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::error::EngineError;

/// What the engine can carry: any type rkyv can archive, validate and deserialize.
///
/// Implemented automatically for every type deriving `rkyv::{Archive, Serialize,
/// Deserialize}` whose fields support validation (the default `bytecheck` feature). `()` is a
/// record too; sources use it as their input type and sinks as their output type.
pub trait Record:
    Sized
    + Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + Deserialize<Self, HighDeserializer<rancor::Error>>,
    > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
    + Send
    + 'static
{
}

impl<T> Record for T where
    T: Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + Deserialize<T, HighDeserializer<rancor::Error>>,
        > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
        + Send
        + 'static
{
}

/// Bytes a sealed batch needs beyond its records' archived form: the root `ArchivedVec`
/// and alignment padding.
const SEAL_OVERHEAD_BYTES: usize = 64;

/// The archived form of a batch of `R`: the root of a [`SealedBatch`]'s bytes.
pub type ArchivedRecords<R> = ArchivedVec<<R as Archive>::Archived>;

/// A pool of record buffers shared by the producer and consumer of one edge.
///
/// Buffers are reused last in, first out: the next batch is written into the buffer freed
/// most recently, which is still in cache. (A FIFO queue cycles through every buffer of the
/// pool, so a one-record batch touched a cold buffer each time; at 1 M records/s that showed
/// as ~15 % of a producing executor's time in the pool and in the first writes.)
pub(crate) struct BufferPool<R> {
    free: Mutex<Vec<Vec<R>>>,
    slots: usize,
    batch_size: usize,
}

impl<R> BufferPool<R> {
    pub(crate) fn new(slots: usize, batch_size: usize) -> Self {
        let slots = slots.max(1);
        Self {
            free: Mutex::new(Vec::with_capacity(slots)),
            slots,
            batch_size,
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<Vec<R>>> {
        // The stack of buffers is valid whatever a panicking holder did to it.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An empty buffer with room for a full batch, recycled when one is available.
    pub(crate) fn take(&self) -> Vec<R> {
        let recycled = self.free().pop();
        // Allocate, if need be, after the lock is released.
        recycled.unwrap_or_else(|| Vec::with_capacity(self.batch_size))
    }

    fn give(&self, mut buffer: Vec<R>) {
        buffer.clear();
        if buffer.capacity() >= self.batch_size {
            let mut free = self.free();
            // A full pool simply drops the surplus buffer.
            if free.len() < self.slots {
                free.push(buffer);
            }
        }
    }
}

/// An in-process batch: records in a `Vec`, moved by pointer along edges.
///
/// Dereferences to `[R]`. Dropping a batch that came from an edge returns its buffer to
/// that edge's pool.
pub struct OwnedBatch<R> {
    records: Vec<R>,
    pool: Option<Arc<BufferPool<R>>>,
}

impl<R> OwnedBatch<R> {
    /// A batch owning `records`, not tied to any pool.
    pub fn from_vec(records: Vec<R>) -> Self {
        Self {
            records,
            pool: None,
        }
    }

    pub(crate) fn pooled(records: Vec<R>, pool: Arc<BufferPool<R>>) -> Self {
        Self {
            records,
            pool: Some(pool),
        }
    }

    /// Takes the records out (the buffer then no longer returns to its pool).
    pub fn into_vec(mut self) -> Vec<R> {
        self.pool = None;
        std::mem::take(&mut self.records)
    }

    /// Removes and yields the records in `range`, keeping the buffer for reuse.
    pub fn drain(&mut self, range: impl RangeBounds<usize>) -> std::vec::Drain<'_, R> {
        self.records.drain(range)
    }
}

impl<R: Record> OwnedBatch<R> {
    /// Serializes the records into a sealed (archived) batch.
    ///
    /// The buffer is sized up front for the records' archived form plus the root, so a
    /// batch of fixed-size records is written without regrowing (growing by doubling moved
    /// the bytes written so far each time: ~3 % of a sending engine thread at maximum rate).
    pub fn seal(&self) -> Result<SealedBatch<R>, EngineError> {
        let estimate = self
            .records
            .len()
            .saturating_mul(std::mem::size_of::<R::Archived>())
            .saturating_add(SEAL_OVERHEAD_BYTES);
        let bytes = rkyv::api::high::to_bytes_in::<_, rancor::Error>(
            &self.records,
            AlignedVec::with_capacity(estimate),
        )
        .map_err(|e| EngineError::Serialize(e.to_string()))?;
        Ok(SealedBatch {
            bytes,
            len: self.records.len(),
            _record: PhantomData,
        })
    }
}

impl<R> Deref for OwnedBatch<R> {
    type Target = [R];
    fn deref(&self) -> &[R] {
        &self.records
    }
}

impl<R> DerefMut for OwnedBatch<R> {
    fn deref_mut(&mut self) -> &mut [R] {
        &mut self.records
    }
}

impl<R> Drop for OwnedBatch<R> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.records));
        }
    }
}

impl<R: fmt::Debug> fmt::Debug for OwnedBatch<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedBatch")
            .field("records", &self.records)
            .finish()
    }
}

/// A batch in archived form: aligned bytes holding an rkyv `Vec<R>`, validated once.
///
/// Read the records in place with [`SealedBatch::records`]; no deserialization happens.
pub struct SealedBatch<R> {
    bytes: AlignedVec,
    len: usize,
    _record: PhantomData<fn() -> R>,
}

impl<R: Record> SealedBatch<R> {
    /// Validates received bytes (rkyv `access` with bytecheck) and wraps them.
    ///
    /// This is the only validation: later reads use the validated bytes directly.
    pub fn from_bytes(bytes: AlignedVec) -> Result<Self, EngineError> {
        let len = rkyv::access::<ArchivedRecords<R>, rancor::Error>(&bytes)
            .map_err(|e| EngineError::InvalidBatch(e.to_string()))?
            .len();
        Ok(Self {
            bytes,
            len,
            _record: PhantomData,
        })
    }

    /// The archived records, read in place.
    pub fn records(&self) -> &ArchivedRecords<R> {
        // SAFETY: `bytes` passed `rkyv::access` for exactly this root type when the batch was
        // built (`from_bytes`) or was produced by `rkyv::to_bytes` of a `Vec<R>` (`seal`), and
        // the buffer is never mutated afterwards (no `&mut` access is exposed).
        unsafe { rkyv::access_unchecked::<ArchivedRecords<R>>(&self.bytes) }
    }

    /// Deserializes the records into an owned batch (costly; avoid on the hot path).
    pub fn to_owned_batch(&self) -> Result<OwnedBatch<R>, EngineError> {
        let records: Vec<R> = rkyv::deserialize::<Vec<R>, rancor::Error>(self.records())
            .map_err(|e| EngineError::InvalidBatch(e.to_string()))?;
        Ok(OwnedBatch::from_vec(records))
    }
}

impl<R> SealedBatch<R> {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch has no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The archived bytes, e.g. for writing to the network.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives back the aligned buffer.
    pub fn into_bytes(self) -> AlignedVec {
        self.bytes
    }
}

impl<R> fmt::Debug for SealedBatch<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBatch")
            .field("len", &self.len)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What travels along an edge: an in-process batch or a sealed one that came from the network.
#[derive(Debug)]
pub enum Batch<R> {
    /// Records in a `Vec`, passed by pointer.
    Owned(OwnedBatch<R>),
    /// Archived bytes, validated once, read in place.
    Sealed(SealedBatch<R>),
}

impl<R> Batch<R> {
    /// Number of records.
    pub fn len(&self) -> usize {
        match self {
            Self::Owned(b) => b.len(),
            Self::Sealed(b) => b.len(),
        }
    }

    /// Whether the batch has no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<R: Record> Batch<R> {
    /// The sealed form: serializes an owned batch, passes a sealed one through untouched.
    pub fn seal(self) -> Result<SealedBatch<R>, EngineError> {
        match self {
            Self::Owned(b) => b.seal(),
            Self::Sealed(b) => Ok(b),
        }
    }

    /// The owned form: deserializes a sealed batch, passes an owned one through untouched.
    pub fn into_owned(self) -> Result<OwnedBatch<R>, EngineError> {
        match self {
            Self::Owned(b) => Ok(b),
            Self::Sealed(b) => b.to_owned_batch(),
        }
    }
}

impl<R> From<OwnedBatch<R>> for Batch<R> {
    fn from(batch: OwnedBatch<R>) -> Self {
        Self::Owned(batch)
    }
}

impl<R> From<SealedBatch<R>> for Batch<R> {
    fn from(batch: SealedBatch<R>) -> Self {
        Self::Sealed(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Rec {
        key: u64,
        trace: [u64; 6],
        payload: Vec<u8>,
    }

    fn recs(n: u64) -> Vec<Rec> {
        (0..n)
            .map(|key| Rec {
                key,
                trace: [key; 6],
                payload: vec![key as u8; 3],
            })
            .collect()
    }

    #[test]
    fn sealed_batch_round_trips_and_reads_in_place() {
        let owned = OwnedBatch::from_vec(recs(10));
        let sealed = owned.seal().unwrap();
        assert_eq!(sealed.len(), 10);
        // Simulate a network hop: copy into a fresh aligned buffer and validate once.
        let mut wire = AlignedVec::<16>::new();
        wire.extend_from_slice(sealed.as_bytes());
        let received = SealedBatch::<Rec>::from_bytes(wire).unwrap();
        let archived = received.records();
        assert_eq!(archived.len(), 10);
        assert_eq!(archived[7].key.to_native(), 7);
        assert_eq!(archived[7].trace[5].to_native(), 7);
        assert_eq!(received.to_owned_batch().unwrap().into_vec(), recs(10));
    }

    #[test]
    fn sealing_fixed_size_records_fits_the_buffer_sized_up_front() {
        let records: Vec<[u64; 13]> = (0..1000).map(|k| [k; 13]).collect();
        let sealed = OwnedBatch::from_vec(records.clone()).seal().unwrap();
        let expected = records.len() * std::mem::size_of::<[u64; 13]>() + SEAL_OVERHEAD_BYTES;
        let bytes = sealed.into_bytes();
        assert!(bytes.len() <= expected, "{} bytes", bytes.len());
        assert_eq!(bytes.capacity(), expected, "the buffer never grew");
        let again = SealedBatch::<[u64; 13]>::from_bytes(bytes).unwrap();
        assert_eq!(again.records()[999][12].to_native(), 999);
    }

    #[test]
    fn corrupt_bytes_are_rejected_not_panicked_on() {
        let sealed = OwnedBatch::from_vec(recs(4)).seal().unwrap();
        let mut bytes = sealed.into_bytes();
        let n = bytes.len();
        // Point the root's relative pointer far outside the buffer.
        for b in &mut bytes[n - 8..n - 4] {
            *b = 0x7f;
        }
        assert!(matches!(
            SealedBatch::<Rec>::from_bytes(bytes),
            Err(EngineError::InvalidBatch(_))
        ));
        let mut short = AlignedVec::<16>::new();
        short.extend_from_slice(&[1, 2, 3]);
        assert!(SealedBatch::<Rec>::from_bytes(short).is_err());
    }

    #[test]
    fn pooled_batches_return_their_buffer_on_drop() {
        let pool = Arc::new(BufferPool::<u64>::new(2, 8));
        let mut buf = pool.take();
        buf.extend(0..8);
        let ptr = buf.as_ptr();
        let batch = OwnedBatch::pooled(buf, pool.clone());
        assert_eq!(&*batch, &[0, 1, 2, 3, 4, 5, 6, 7]);
        drop(batch);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the same allocation is reused");
    }

    #[test]
    fn pool_hands_out_the_most_recently_freed_buffer_and_stays_bounded() {
        let pool = Arc::new(BufferPool::<u64>::new(2, 8));
        let [a, b, c] = [pool.take(), pool.take(), pool.take()];
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        for buf in [a, b, c] {
            drop(OwnedBatch::pooled(buf, pool.clone()));
        }
        assert_eq!(pool.free().len(), 2, "a full pool drops the surplus buffer");
        let (first, second) = (pool.take(), pool.take());
        assert_eq!(first.as_ptr(), pb, "last in, first out");
        assert_eq!(second.as_ptr(), pa);
        // A buffer too small for a full batch is not kept.
        drop(OwnedBatch::pooled(Vec::with_capacity(1), pool.clone()));
        assert!(pool.free().is_empty());
    }

    #[test]
    fn batch_enum_seals_owned_and_passes_sealed_through() {
        let sealed = Batch::Owned(OwnedBatch::from_vec(vec![1u32, 2, 3]))
            .seal()
            .unwrap();
        let ptr = sealed.as_bytes().as_ptr();
        let again = Batch::Sealed(sealed).seal().unwrap();
        assert_eq!(again.as_bytes().as_ptr(), ptr, "no re-serialization");
        let owned = Batch::Sealed(again).into_owned().unwrap();
        assert_eq!(&*owned, &[1, 2, 3]);
    }
}
