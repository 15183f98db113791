//! Long-lived unidirectional data streams carrying framed record batches.
//!
//! A data stream starts with one header frame (chosen by the application, e.g. which edge of
//! which job and epoch it carries) followed by batch frames. The receiver gets each batch as a
//! 16-byte aligned [`Frame`] that can be validated once and read in place. QUIC flow control is
//! the backpressure: a sender whose receiver stops reading blocks in [`DataSender::send`].

use std::net::SocketAddr;

use bytes::Bytes;

use crate::error::{FrameError, RpcError};
use crate::frame::{self, Frame};
use crate::rpc::Peer;

/// Largest data-stream header accepted, in bytes. A header names what the stream carries (a
/// few ids); the receiver keeps it for the stream's life, so it is not allowed the full
/// frame size.
pub const MAX_DATA_HEADER_BYTES: u32 = 4096;

/// The sending half of a data stream.
pub struct DataSender {
    pub(crate) send: quinn::SendStream,
    pub(crate) max_frame: u32,
    pub(crate) addr: SocketAddr,
}

impl DataSender {
    /// Sends one frame (e.g. an archived record batch). Waits while the receiver's flow-control
    /// window is full.
    pub async fn send(&mut self, payload: Bytes) -> Result<(), RpcError> {
        let prefix = frame::len_prefix(payload.len(), self.max_frame)?;
        self.write(&mut [Bytes::copy_from_slice(&prefix), payload])
            .await
    }

    /// Sends several frames with one write, so that they can share packets. Waits while the
    /// receiver's flow-control window is full.
    pub async fn send_many(&mut self, payloads: Vec<Bytes>) -> Result<(), RpcError> {
        let mut chunks = Vec::with_capacity(2 * payloads.len());
        for payload in payloads {
            let prefix = frame::len_prefix(payload.len(), self.max_frame)?;
            chunks.push(Bytes::copy_from_slice(&prefix));
            chunks.push(payload);
        }
        self.write(&mut chunks).await
    }

    async fn write(&mut self, chunks: &mut [Bytes]) -> Result<(), RpcError> {
        self.send
            .write_all_chunks(chunks)
            .await
            .map_err(|e| RpcError::ConnectionLost {
                addr: self.addr,
                reason: e.to_string(),
            })
    }

    /// Ends the stream after everything sent so far.
    pub fn finish(mut self) -> Result<(), RpcError> {
        self.send.finish().map_err(|e| RpcError::ConnectionLost {
            addr: self.addr,
            reason: e.to_string(),
        })
    }

    /// Finishes the stream, then waits until the peer has acknowledged every byte of it:
    /// received by its endpoint (not necessarily read by its application yet). Fails if the
    /// peer stopped the stream or the connection was lost first: a peer that restarted at the
    /// same address never acknowledges what was sent to its old process, and resets the
    /// connection (endpoints derive their reset key from their identity and address, so the
    /// reset is accepted); a peer that is gone for good is
    /// found out at the connection's idle timeout. A live peer that stops reading holds it
    /// for as long as it does.
    pub async fn finish_acknowledged(mut self) -> Result<(), RpcError> {
        let addr = self.addr;
        let lost = |reason: String| RpcError::ConnectionLost { addr, reason };
        self.send.finish().map_err(|e| lost(e.to_string()))?;
        match self.send.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(lost(format!(
                "the receiver stopped the stream (code {code}) before the end"
            ))),
            Err(e) => Err(lost(e.to_string())),
        }
    }

    /// Aborts the stream with an application error code.
    pub fn reset(mut self, code: u32) {
        // Resetting an already closed stream has no effect worth reporting.
        let _ = self.send.reset(quinn::VarInt::from_u32(code));
    }
}

/// The receiving half of a data stream, handed to the router's data-stream handler.
pub struct DataStream {
    pub(crate) peer: Peer,
    pub(crate) header: Frame,
    pub(crate) recv: quinn::RecvStream,
    pub(crate) max_frame: u32,
    pub(crate) partial: PartialFrame,
}

/// The frame a [`DataStream`] is reading, kept between calls so that a receive dropped
/// part-way (in a `select!`, say) loses no bytes: the next one goes on where it stopped.
#[derive(Default)]
pub(crate) struct PartialFrame {
    /// The length prefix, `prefix_len` bytes of it read.
    prefix: [u8; 4],
    prefix_len: usize,
    /// The body read so far, once the prefix is whole.
    body: Frame,
}

impl DataStream {
    /// The peer that opened the stream.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The header frame the sender opened the stream with.
    pub fn header(&self) -> &Frame {
        &self.header
    }

    /// Receives the next frame into `buf` (whose allocation the stream keeps for the next
    /// frame). Returns `Ok(false)` when the sender finished the stream.
    ///
    /// Cancel-safe: if the future is dropped before it is ready, the bytes of the frame
    /// read so far stay with the stream and the next call completes that frame.
    pub async fn recv_into(&mut self, buf: &mut Frame) -> Result<bool, FrameError> {
        let partial = &mut self.partial;
        while partial.prefix_len < partial.prefix.len() {
            // `read` returns as soon as any bytes arrived: cancel-safe.
            match self
                .recv
                .read(&mut partial.prefix[partial.prefix_len..])
                .await
            {
                Ok(Some(n)) => partial.prefix_len += n,
                Ok(None) if partial.prefix_len == 0 => return Ok(false),
                Ok(None) => {
                    return Err(FrameError::Truncated {
                        got: partial.prefix_len,
                        want: partial.prefix.len(),
                    });
                }
                Err(e) => return Err(FrameError::Stream(e.to_string())),
            }
        }
        let len = frame::check_len(u32::from_le_bytes(partial.prefix), self.max_frame)?;
        frame::append_body(&mut self.recv, len, &mut partial.body).await?;
        std::mem::swap(buf, &mut partial.body);
        partial.body.clear();
        partial.prefix_len = 0;
        Ok(true)
    }

    /// Receives the next frame in a new buffer; `Ok(None)` when the stream is finished.
    /// Cancel-safe, like [`DataStream::recv_into`].
    pub async fn recv(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut buf = Frame::new();
        Ok(self.recv_into(&mut buf).await?.then_some(buf))
    }

    /// Tells the sender to stop (e.g. the frame was invalid or the task is gone).
    pub fn stop(mut self, code: u32) {
        // Stopping an already finished stream has no effect worth reporting.
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}
