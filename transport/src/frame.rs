//! Length-prefixed frames carrying rkyv archives.
//!
//! A frame is a little-endian `u32` length followed by that many bytes. The length is checked
//! against the configured maximum *before* anything is allocated, and the body is read into an
//! [`AlignedVec`] that grows only as bytes actually arrive, so a lying length prefix cannot make
//! a node allocate. Bodies are rkyv archives and are validated with `rkyv::access` (bytecheck)
//! before use.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::BoxedError;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};

use crate::error::FrameError;

/// A received frame body, aligned so that an archive can be read from it in place.
pub type Frame = AlignedVec<16>;

/// Checks a length prefix against the limit.
pub fn check_len(len: u32, max: u32) -> Result<usize, FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    // u32 always fits in usize on the 32/64-bit targets microcosm supports.
    Ok(len as usize)
}

/// First allocation step when reading a body; the buffer doubles from there as bytes arrive.
const FIRST_STEP: usize = 64 * 1024;

/// Reads a fixed-size header. `Ok(None)` means the stream ended cleanly before its first byte.
pub(crate) async fn read_header<const N: usize>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<[u8; N]>, FrameError> {
    let mut header = [0u8; N];
    match recv.read_exact(&mut header).await {
        Ok(()) => Ok(Some(header)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            Err(FrameError::Truncated { got, want: N })
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(FrameError::Stream(e.to_string())),
    }
}

/// Reads a body of `len` (already checked) bytes into `buf`, growing it as data arrives.
///
/// The bytes are appended chunk by chunk as QUIC hands them over: nothing is reserved before
/// the first chunk arrives, then at most [`FIRST_STEP`] (or that chunk), and the buffer then
/// grows with what did arrive, never ahead of it by more than doubling. (Sizing the buffer with zeros and reading into it
/// wrote every body twice: ~1 % of a receiving engine thread at maximum rate in `memset`.)
pub(crate) async fn read_body(
    recv: &mut quinn::RecvStream,
    len: usize,
    buf: &mut Frame,
) -> Result<(), FrameError> {
    buf.clear();
    append_body(recv, len, buf).await
}

/// Reads the rest of a body of `len` bytes of which `buf` holds the first ones, as
/// [`read_body`] does. Cancel-safe: dropped part-way, `buf` keeps every byte read so far.
pub(crate) async fn append_body(
    recv: &mut quinn::RecvStream,
    len: usize,
    buf: &mut Frame,
) -> Result<(), FrameError> {
    while buf.len() < len {
        let remaining = len - buf.len();
        match recv.read_chunk(remaining, true).await {
            Ok(Some(chunk)) => {
                if buf.capacity() == 0 {
                    // Nothing is reserved until data arrives: a length prefix alone costs
                    // the receiver no memory.
                    buf.reserve(len.min(FIRST_STEP.max(chunk.bytes.len())));
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(FrameError::Truncated {
                    got: buf.len(),
                    want: len,
                });
            }
            Err(e) => return Err(FrameError::Stream(e.to_string())),
        }
    }
    Ok(())
}

/// Reads one length-prefixed frame into `buf`. `Ok(false)` means the stream ended cleanly
/// between frames.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: u32,
    buf: &mut Frame,
) -> Result<bool, FrameError> {
    let Some(header) = read_header::<4>(recv).await? else {
        return Ok(false);
    };
    let len = check_len(u32::from_le_bytes(header), max)?;
    read_body(recv, len, buf).await?;
    Ok(true)
}

/// Fails with [`FrameError::TrailingBytes`] unless the stream ends here.
pub(crate) async fn expect_end(recv: &mut quinn::RecvStream) -> Result<(), FrameError> {
    let mut probe = [0u8; 1];
    match recv.read(&mut probe).await {
        Ok(None) => Ok(()),
        Ok(Some(0)) => Ok(()),
        Ok(Some(_)) => Err(FrameError::TrailingBytes),
        Err(e) => Err(FrameError::Stream(e.to_string())),
    }
}

/// A type that can travel in a frame: archived with rkyv, validated on receipt.
///
/// Implemented for every type whose archive can be checked with bytecheck; control-plane
/// messages are decoded to owned values, data-plane batches are read in place instead.
pub trait Message: Sized + Send + 'static {
    /// Archives the value.
    fn encode(&self) -> Result<AlignedVec, FrameError>;
    /// Validates `bytes` and decodes an owned value.
    fn decode(bytes: &[u8]) -> Result<Self, FrameError>;
}

impl<T> Message for T
where
    T: Archive
        + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, BoxedError>>
        + Send
        + 'static,
    T::Archived: Portable
        + for<'a> CheckBytes<HighValidator<'a, BoxedError>>
        + Deserialize<T, HighDeserializer<BoxedError>>,
{
    fn encode(&self) -> Result<AlignedVec, FrameError> {
        rkyv::to_bytes::<BoxedError>(self).map_err(|e| FrameError::InvalidArchive(e.to_string()))
    }

    fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let archived = access::<T::Archived>(bytes)?;
        rkyv::deserialize::<T, BoxedError>(archived)
            .map_err(|e| FrameError::InvalidArchive(e.to_string()))
    }
}

/// Validates `bytes` as an archive of `T` and returns a reference into them.
///
/// `bytes` must be 16-byte aligned (a [`Frame`] is); misaligned input is rejected, not read.
pub fn access<T>(bytes: &[u8]) -> Result<&T, FrameError>
where
    T: Portable + for<'a> CheckBytes<HighValidator<'a, BoxedError>>,
{
    rkyv::access::<T, BoxedError>(bytes).map_err(|e| FrameError::InvalidArchive(e.to_string()))
}

/// Encodes a `u32` length prefix.
pub fn len_prefix(len: usize, max: u32) -> Result<[u8; 4], FrameError> {
    match u32::try_from(len) {
        Ok(l) if l != 0 && l <= max => Ok(l.to_le_bytes()),
        Ok(0) => Err(FrameError::Empty),
        _ => Err(FrameError::TooLarge {
            len: len as u64,
            max,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
    struct Sample {
        id: u64,
        name: String,
        values: Vec<u32>,
    }

    #[test]
    fn length_checks() {
        assert_eq!(check_len(0, 100), Err(FrameError::Empty));
        assert_eq!(
            check_len(101, 100),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
        assert!(matches!(
            check_len(u32::MAX, 100),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(check_len(100, 100), Ok(100));
        assert!(len_prefix(0, 10).is_err());
        assert!(len_prefix(11, 10).is_err());
        assert_eq!(len_prefix(10, 10).unwrap(), 10u32.to_le_bytes());
    }

    #[test]
    fn round_trip_and_every_prefix_is_rejected() {
        let s = Sample {
            id: 7,
            name: "seven".into(),
            values: vec![1, 2, 3],
        };
        let bytes = s.encode().unwrap();
        assert_eq!(Sample::decode(&bytes).unwrap(), s);
        for cut in 0..bytes.len() {
            let mut prefix = Frame::new();
            prefix.extend_from_slice(&bytes[..cut]);
            assert!(
                Sample::decode(&prefix).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
    }

    #[test]
    fn bit_flips_never_panic() {
        let s = Sample {
            id: 1,
            name: "x".repeat(40),
            values: (0..16).collect(),
        };
        let bytes = s.encode().unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = Frame::new();
                flipped.extend_from_slice(&bytes);
                flipped.as_mut_slice()[i] ^= 1 << bit;
                // Either a clean error or a (different) valid value; never a panic.
                let _ = Sample::decode(&flipped);
            }
        }
    }

    #[test]
    fn misaligned_input_is_rejected() {
        let s = Sample {
            id: 9,
            name: String::new(),
            values: vec![5],
        };
        let bytes = s.encode().unwrap();
        let mut shifted = Frame::new();
        shifted.push(0);
        shifted.extend_from_slice(&bytes);
        assert!(Sample::decode(&shifted[1..]).is_err());
    }
}
