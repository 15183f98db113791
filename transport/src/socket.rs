//! The UDP socket under every [`Endpoint`](crate::Endpoint): quinn's tokio runtime, except
//! that a short receive batch ends the read.
//!
//! quinn's endpoint driver reads its socket until a read would block: for each burst of
//! datagrams it calls `recvmmsg` once more only to be told `EAGAIN`. On the data plane, where
//! a record often travels alone in its datagram, that is a second system call per datagram,
//! in the path of every record (the driver hands the packets to their connections only
//! after the socket is drained).
//!
//! On Linux, `recvmmsg` on a non-blocking socket stops early only when the next datagram is
//! not there: a batch shorter than asked for has seen the queue empty. So [`poll_recv`]
//! clears the socket's read readiness after a short batch, as tokio's own TCP streams do
//! after a short read. Nothing can be missed by it: tokio clears only the readiness it had
//! seen when the read began, and a datagram that arrives later raises a new
//! (edge-triggered) epoll event, so the driver is woken for it. The socket carries no
//! `IP_RECVERR`, so an ICMP error cannot end a batch early either.
//!
//! Elsewhere (`BATCH_SIZE` is 1, or no `recvmmsg`) every read is a full batch and the
//! behaviour is quinn's own.
//!
//! [`poll_recv`]: quinn::AsyncUdpSocket::poll_recv

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use quinn::udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// quinn's [`TokioRuntime`] with the socket described in the module docs.
#[derive(Debug)]
pub(crate) struct DrainingRuntime;

impl Runtime for DrainingRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future);
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(DrainingSocket::new(socket)?))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// A UDP socket registered with the current tokio runtime; see the module docs.
pub(crate) struct DrainingSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
}

impl DrainingSocket {
    /// Makes `socket` non-blocking and registers it with the current tokio runtime (which
    /// must exist).
    pub(crate) fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        // `UdpSocketState::new` sets the socket options quinn relies on (GRO, ECN, PKTINFO,
        // don't-fragment) and makes the socket non-blocking.
        let state = UdpSocketState::new((&socket).into())?;
        // SAFETY: the `AsyncFd` owns the socket, so its descriptor stays open, and is never
        // replaced, for as long as it is registered.
        let io = unsafe {
            AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Self { io, state })
    }
}

impl fmt::Debug for DrainingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainingSocket")
            .field("local_addr", &self.io.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for DrainingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller { socket: self })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // `try_io` clears the write readiness when the send would block.
        self.io.try_io(Interest::WRITABLE, |socket| {
            self.state.send(socket.into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let batch = bufs.len().min(meta.len()).min(BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // `try_io` clears the read readiness when the read would block.
            match guard.try_io(|socket| self.state.recv(socket.get_ref().into(), bufs, meta)) {
                Ok(Ok(received)) => {
                    if received < batch {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(received));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Tells one quinn task when [`DrainingSocket`] may take a send again.
#[derive(Debug)]
struct WritablePoller {
    socket: Arc<DrainingSocket>,
}

impl UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Dropping the guard keeps the readiness: the send that follows clears it if the
        // socket is still full.
        let _guard = ready!(self.socket.io.poll_write_ready(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::poll_fn;
    use std::net::UdpSocket;
    use std::time::Duration;

    const DATAGRAM: usize = 64;

    fn pair() -> (UdpSocket, Arc<DrainingSocket>) {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        (sender, Arc::new(DrainingSocket::new(receiver).unwrap()))
    }

    /// Receives one batch of at most `batch` messages; returns the payloads' first bytes.
    async fn recv_batch(socket: &DrainingSocket, batch: usize) -> Vec<u8> {
        let mut storage = vec![[0u8; DATAGRAM]; batch];
        let mut meta = vec![RecvMeta::default(); batch];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
            .await
            .unwrap();
        (0..n)
            .flat_map(|i| {
                // With GRO several equal-sized datagrams may share one buffer.
                let stride = meta[i].stride.max(1);
                (0..meta[i].len)
                    .step_by(stride)
                    .map(move |at| (i, at))
                    .collect::<Vec<_>>()
            })
            .map(|(i, at)| bufs[i][at])
            .collect()
    }

    /// [`recv_batch`], failing the test with `why` if nothing wakes the reader within 5 s.
    async fn recv_batch_soon(socket: &DrainingSocket, batch: usize, why: &str) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(5), recv_batch(socket, batch))
            .await
            .unwrap_or_else(|_| panic!("{why}"))
    }

    fn ready_now(socket: &DrainingSocket) -> bool {
        let mut storage = [0u8; DATAGRAM];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        socket.poll_recv(&mut cx, &mut bufs, &mut meta).is_ready()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_short_batch_ends_the_read_and_a_later_datagram_still_arrives() {
        let (sender, socket) = pair();
        sender.send(&[1; DATAGRAM]).unwrap();
        assert_eq!(recv_batch(&socket, 4).await, vec![1]);

        // The short batch cleared the readiness: without the driver having seen a new event
        // the socket is not read again, even though a datagram is waiting by now.
        sender.send(&[2; DATAGRAM]).unwrap();
        assert!(
            !ready_now(&socket),
            "a short batch must end the read without another recvmmsg"
        );

        // The datagram's own epoll event wakes the reader: nothing is lost.
        let why = "the datagram sent after a short batch must wake the reader";
        assert_eq!(recv_batch_soon(&socket, 4, why).await, vec![2]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_batch_reads_again_without_a_new_event() {
        let (sender, socket) = pair();
        for tag in 1..=3u8 {
            sender.send(&[tag; DATAGRAM]).unwrap();
        }
        // Two buffers for three datagrams: a full batch, which must leave the socket
        // readable. No datagram follows, so no new epoll event could wake a reader whose
        // readiness had been cleared: the second read would hang.
        assert_eq!(recv_batch(&socket, 2).await, vec![1, 2]);
        let why = "a full batch must not clear the readiness";
        assert_eq!(recv_batch_soon(&socket, 2, why).await, vec![3]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sends_go_through_the_socket() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let socket =
            Arc::new(DrainingSocket::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap());
        let mut poller = socket.clone().create_io_poller();
        poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
        let payload = [7u8; DATAGRAM];
        socket
            .try_send(&Transmit {
                destination: receiver.local_addr().unwrap(),
                ecn: None,
                contents: &payload,
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        let mut buf = [0u8; 2 * DATAGRAM];
        let (n, from) = receiver.recv_from(&mut buf).unwrap();
        assert_eq!((n, from), (DATAGRAM, socket.local_addr().unwrap()));
        assert_eq!(&buf[..n], &payload[..]);
    }
}
