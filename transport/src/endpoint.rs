//! QUIC endpoints that both listen and dial, with one reused connection per peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::TransportConfig;
use crate::error::{EndpointError, ErrorCode, FrameError, RemoteError, RpcError};
use crate::frame::{self, Frame, Message};
use crate::rpc::{
    HELLO_ID, Method, PROTOCOL_VERSION, Peer, Router, STATUS_ERR, STATUS_OK, Service, WireError,
};
use crate::stream::{DataSender, DataStream, PartialFrame};
use crate::tls::{Identity, Role, role_of_cert};

/// Application close code: the peer's certificate names no valid role.
const CLOSE_BAD_IDENTITY: u32 = 1;
/// Application close code: the endpoint is shutting down.
const CLOSE_SHUTDOWN: u32 = 2;
/// Stream stop code: a request could not be read.
const STOP_BAD_FRAME: u32 = 1;
/// Stream stop code: the peer's role may not open data streams here.
const STOP_REFUSED: u32 = 2;

/// A QUIC endpoint: serves a [`Router`] and dials peers, reusing one connection per peer.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

/// A handle to an [`Endpoint`] that does not keep it open, for a handler of the endpoint's
/// own router that needs the endpoint (holding the endpoint itself there would be a cycle).
#[derive(Clone, Debug)]
pub struct WeakEndpoint {
    inner: std::sync::Weak<Inner>,
}

impl WeakEndpoint {
    /// The endpoint, unless every [`Endpoint`] handle to it has been dropped.
    pub fn upgrade(&self) -> Option<Endpoint> {
        self.inner.upgrade().map(|inner| Endpoint { inner })
    }
}

/// Held while dialing one peer; see `Inner::dials`.
type DialGate = Arc<tokio::sync::Mutex<()>>;

type DialGates = Mutex<HashMap<(SocketAddr, Role), DialGate>>;

/// A caller's share of a peer's dial gate. Dropping it (the call ended, or its future was
/// dropped) removes the gate from the map once nobody else holds it.
struct GateRef<'a> {
    gates: &'a DialGates,
    key: (SocketAddr, Role),
    gate: Option<DialGate>,
}

impl<'a> GateRef<'a> {
    fn join(gates: &'a DialGates, key: (SocketAddr, Role)) -> Self {
        let gate = lock(gates).entry(key).or_default().clone();
        Self {
            gates,
            key,
            gate: Some(gate),
        }
    }

    fn gate(&self) -> &tokio::sync::Mutex<()> {
        // Invariant: `gate` is `Some` until `drop`.
        self.gate.as_ref().expect("the gate is held until drop")
    }
}

impl Drop for GateRef<'_> {
    fn drop(&mut self) {
        let mut gates = lock(self.gates);
        // Count and release under the map's lock, so two callers leaving together cannot
        // both see the other's reference and leave the entry behind.
        if let Some(gate) = self.gate.take()
            && Arc::strong_count(&gate) == 2
        {
            gates.remove(&self.key);
        }
    }
}

struct Inner {
    quinn: quinn::Endpoint,
    config: TransportConfig,
    router: Arc<Router>,
    conns: Mutex<HashMap<(SocketAddr, Role), quinn::Connection>>,
    /// Connections peers dialed to us, by quinn's stable id, while they are served.
    accepted: Mutex<HashMap<usize, (Peer, quinn::Connection)>>,
    /// One gate per peer being dialed: callers that find no cached connection queue here, so
    /// concurrent first calls share one dial instead of racing to open a connection each.
    dials: DialGates,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: nobody can use or close the endpoint any more, while its
        // accept loop and connections would keep the socket and serve peers for good.
        self.quinn.close(CLOSE_SHUTDOWN.into(), b"endpoint dropped");
    }
}

/// The stateless-reset and connection-id keys of an endpoint of `identity` bound at `bound`,
/// derived from both so that a node restarted there answers its predecessor's connections
/// with resets their peers accept. `None` (quinn's random keys) for an endpoint bound to a
/// wildcard address with a port the system picked, such as a client's: such a node never
/// comes back at the same address, and another one of the same identity elsewhere that got
/// the same port must not share its keys.
fn stable_keys(identity: &Identity, bound: SocketAddr) -> Option<(ring::hmac::Key, u64)> {
    (!bound.ip().is_unspecified()).then(|| (identity.reset_key(bound), identity.cid_key(bound)))
}

impl Endpoint {
    /// Binds `addr` (port 0 picks a free port) and starts serving `router`. Must be called
    /// inside a tokio runtime. Dropping the last handle closes the endpoint (as
    /// [`Endpoint::close`] does) and frees its port.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        config: TransportConfig,
        router: Router,
    ) -> Result<Self, EndpointError> {
        config.validate()?;
        let transport = Arc::new(config.quinn()?);
        let server_tls = QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| EndpointError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport.clone());
        let client_tls = QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| EndpointError::Config(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport);

        let socket = udp_socket(addr, config.udp_buffer_bytes)?;
        let bound = socket
            .local_addr()
            .map_err(|source| EndpointError::Bind { addr, source })?;
        let mut endpoint = quinn::Endpoint::new(
            config.quinn_endpoint(stable_keys(identity, bound))?,
            Some(server),
            socket,
            Arc::new(crate::socket::DrainingRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr, source })?;
        endpoint.set_default_client_config(client);

        let inner = Arc::new(Inner {
            quinn: endpoint,
            config,
            router: Arc::new(router),
            conns: Mutex::new(HashMap::new()),
            accepted: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(Arc::downgrade(&inner), inner.quinn.clone()));
        Ok(Self { inner })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // The socket was bound in `bind`; quinn only fails here if the socket is gone, which
        // cannot happen while the endpoint lives. Fall back to the unspecified address.
        self.inner
            .quinn
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// A handle that does not keep the endpoint open ([`WeakEndpoint`]).
    pub fn downgrade(&self) -> WeakEndpoint {
        WeakEndpoint {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The endpoint's configuration.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// Returns the connection to `addr`, whose certificate must grant `role`, dialing (and
    /// re-dialing with backoff) until `deadline` if there is none or it was lost.
    pub async fn connection(
        &self,
        addr: SocketAddr,
        role: Role,
        deadline: Instant,
    ) -> Result<Connection, RpcError> {
        if let Some(conn) = self.cached(addr, role) {
            return Ok(conn);
        }
        let gate = GateRef::join(&self.inner.dials, (addr, role));
        let dialing = tokio::time::timeout_at(deadline, gate.gate().lock()).await;
        match dialing {
            Ok(_turn) => match self.cached(addr, role) {
                // Another caller dialed while we waited.
                Some(conn) => Ok(conn),
                None => self.dial_with_retries(addr, role, deadline).await,
            },
            Err(_) => Err(RpcError::Unreachable {
                addr,
                reason: "timed out waiting for a connection attempt in progress".into(),
            }),
        }
    }

    /// Dials `addr`, re-dialing with backoff until `deadline`.
    async fn dial_with_retries(
        &self,
        addr: SocketAddr,
        role: Role,
        deadline: Instant,
    ) -> Result<Connection, RpcError> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let attempt_deadline = deadline.min(Instant::now() + self.inner.config.connect_timeout);
            match self.dial(addr, role, attempt_deadline).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    let now = Instant::now();
                    if now + backoff >= deadline {
                        return Err(e);
                    }
                    debug!(%addr, error = %e, ?backoff, "dial failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn cached(&self, addr: SocketAddr, role: Role) -> Option<Connection> {
        let mut conns = lock(&self.inner.conns);
        match conns.get(&(addr, role)) {
            Some(c) if c.close_reason().is_none() => {
                Some(self.wrap(c.clone(), Peer { role, addr }))
            }
            Some(_) => {
                conns.remove(&(addr, role));
                None
            }
            None => None,
        }
    }

    fn wrap(&self, conn: quinn::Connection, peer: Peer) -> Connection {
        Connection {
            conn,
            peer,
            max_frame: self.inner.config.max_frame_bytes,
        }
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        role: Role,
        deadline: Instant,
    ) -> Result<Connection, RpcError> {
        let unreachable = |reason: String| RpcError::Unreachable { addr, reason };
        let connecting = self
            .inner
            .quinn
            .connect(addr, role.server_name())
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = self.wrap(conn, Peer { role, addr });
        // With TLS 1.3 the client's handshake completes before the server has checked our
        // certificate: only a hello round trip proves that we were admitted.
        let version: u32 = conn
            .raw_call(HELLO_ID, &PROTOCOL_VERSION, deadline)
            .await
            .map_err(|e| unreachable(format!("refused: {e}")))?;
        if version != PROTOCOL_VERSION {
            conn.conn
                .close(CLOSE_SHUTDOWN.into(), b"protocol version mismatch");
            return Err(unreachable(format!(
                "peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}"
            )));
        }
        tokio::spawn(serve_connection(
            self.inner.router.clone(),
            conn.conn.clone(),
            conn.peer,
            ServeLimits {
                max_frame: self.inner.config.max_frame_bytes,
                read_timeout: self.inner.config.request_read_timeout,
            },
        ));
        let mut conns = lock(&self.inner.conns);
        // Connections to peers that are gone (and never looked up again) go here, so the map
        // holds about one entry per live peer.
        conns.retain(|_, c| c.close_reason().is_none());
        conns.insert((addr, role), conn.conn.clone());
        Ok(conn)
    }

    /// Calls method `M` on the node at `addr` with the default deadline.
    pub async fn call<M: Method>(
        &self,
        addr: SocketAddr,
        req: &M::Request,
    ) -> Result<M::Response, RpcError> {
        self.call_timeout::<M>(addr, req, self.inner.config.default_call_timeout)
            .await
    }

    /// Calls method `M` on the node at `addr`; the whole call, including (re)connecting, must
    /// finish within `timeout`.
    pub async fn call_timeout<M: Method>(
        &self,
        addr: SocketAddr,
        req: &M::Request,
        timeout: Duration,
    ) -> Result<M::Response, RpcError> {
        let deadline = Instant::now() + timeout;
        let conn = self
            .connection(addr, <M::Service as Service>::SERVED_BY, deadline)
            .await?;
        let heard_before = conn.conn.stats().udp_rx.datagrams;
        let result = conn.raw_call(M::ID, req, deadline).await;
        // A lost connection is dropped: the next call dials afresh. So is one on which a call
        // timed out without a single datagram from the peer since it began (not even the
        // acknowledgement of the request): the peer may have died, which QUIC would only
        // notice at the idle timeout. A peer that answered something is alive and only slow
        // with this call: its connection, and the other calls on it, stay.
        let silent = || conn.conn.stats().udp_rx.datagrams == heard_before;
        match &result {
            Err(RpcError::ConnectionLost { .. }) => {
                self.forget_failed(addr, <M::Service as Service>::SERVED_BY, &conn.conn);
            }
            Err(RpcError::Timeout(_)) if silent() => {
                self.forget_failed(addr, <M::Service as Service>::SERVED_BY, &conn.conn);
            }
            _ => {}
        }
        // The server enforces the same deadline and may notice it a moment before we do: the
        // caller sees one outcome either way (the connection is fine, so it is kept).
        match result {
            Err(RpcError::Remote(e)) if e.is(ErrorCode::DeadlineExceeded) => {
                Err(RpcError::Timeout(timeout))
            }
            // The connection's own timer started after connecting; the caller set `timeout`.
            Err(RpcError::Timeout(_)) => Err(RpcError::Timeout(timeout)),
            other => other,
        }
    }

    /// Opens a data stream to the executor at `addr`, starting with `header`.
    pub async fn open_data_stream(
        &self,
        addr: SocketAddr,
        header: Bytes,
        timeout: Duration,
    ) -> Result<DataSender, RpcError> {
        let deadline = Instant::now() + timeout;
        let conn = self.connection(addr, Role::Executor, deadline).await?;
        conn.open_data_stream(header, deadline).await
    }

    /// Closes the cached connection to `addr` and drops it, so the next call dials again.
    /// Calls and streams still in flight on it fail with [`RpcError::ConnectionLost`].
    /// (Only dropping it would leave it open: the task serving the peer's streams on it
    /// holds it, and keep-alives keep it from ever timing out.)
    pub fn forget(&self, addr: SocketAddr, role: Role) {
        if let Some(conn) = lock(&self.inner.conns).remove(&(addr, role)) {
            conn.close(CLOSE_SHUTDOWN.into(), b"forgotten");
        }
    }

    /// [`Endpoint::forget`] for the connection a call failed on: only if it is still the
    /// cached one. Calls that failed on an older connection (closed by the first failure)
    /// must not close the one a retry has dialed since.
    fn forget_failed(&self, addr: SocketAddr, role: Role, failed: &quinn::Connection) {
        let mut conns = lock(&self.inner.conns);
        if conns
            .get(&(addr, role))
            .is_some_and(|c| c.stable_id() == failed.stable_id())
        {
            conns.remove(&(addr, role));
        }
        drop(conns);
        failed.close(CLOSE_SHUTDOWN.into(), b"forgotten after a failed call");
    }

    /// The state of every open connection, dialed or accepted: round-trip time, congestion
    /// window and losses, and what went over it. For operators and benchmarks; a
    /// connection that closed is left out.
    pub fn connection_stats(&self) -> Vec<ConnectionStats> {
        let mut stats: Vec<ConnectionStats> = lock(&self.inner.conns)
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(&(addr, role), c)| ConnectionStats::of(Peer { role, addr }, true, c))
            .collect();
        stats.extend(
            lock(&self.inner.accepted)
                .values()
                .filter(|(_, c)| c.close_reason().is_none())
                .map(|(peer, c)| ConnectionStats::of(*peer, false, c)),
        );
        stats.sort_by_key(|s| (s.peer.addr, !s.dialed));
        stats
    }

    /// Closes every connection and stops accepting new ones.
    pub fn close(&self) {
        self.inner.quinn.close(CLOSE_SHUTDOWN.into(), b"shutdown");
        lock(&self.inner.conns).clear();
    }

    /// Waits (at most `patience`) until every connection has been closed cleanly: after
    /// [`Endpoint::close`], until the peers were told. True if that happened in time.
    pub async fn wait_closed(&self, patience: Duration) -> bool {
        tokio::time::timeout(patience, self.inner.quinn.wait_idle())
            .await
            .is_ok()
    }
}

/// One connection's state and counters, as [`Endpoint::connection_stats`] reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Identifies the connection among this endpoint's open ones (a redial gets another).
    pub id: usize,
    /// The peer, as its certificate names it.
    pub peer: Peer,
    /// True if this endpoint dialed the connection, false if the peer did.
    pub dialed: bool,
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Congestion window (bytes).
    pub cwnd: u64,
    /// Times the congestion controller backed off.
    pub congestion_events: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Packets sent (QUIC packets, several of which may share a datagram).
    pub sent_packets: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
}

impl ConnectionStats {
    fn of(peer: Peer, dialed: bool, conn: &quinn::Connection) -> Self {
        let stats = conn.stats();
        Self {
            id: conn.stable_id(),
            peer,
            dialed,
            rtt: stats.path.rtt,
            cwnd: stats.path.cwnd,
            congestion_events: stats.path.congestion_events,
            lost_packets: stats.path.lost_packets,
            sent_packets: stats.path.sent_packets,
            datagrams_sent: stats.udp_tx.datagrams,
            datagrams_received: stats.udp_rx.datagrams,
        }
    }
}

/// One connection to a peer, shared by all calls and streams to it.
#[derive(Clone)]
pub struct Connection {
    conn: quinn::Connection,
    peer: Peer,
    max_frame: u32,
}

impl Connection {
    /// The peer at the other end.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The underlying quinn connection (for tests and diagnostics).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Calls method `M` on this connection, finishing before `deadline`.
    pub async fn call<M: Method>(
        &self,
        req: &M::Request,
        deadline: Instant,
    ) -> Result<M::Response, RpcError> {
        self.raw_call(M::ID, req, deadline).await
    }

    async fn raw_call<Req: Message, Resp: Message>(
        &self,
        method: u32,
        req: &Req,
        deadline: Instant,
    ) -> Result<Resp, RpcError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let payload = req.encode().map_err(|e| RpcError::Encode(e.to_string()))?;
        let len = frame::len_prefix(payload.len(), self.max_frame)
            .map_err(|e| RpcError::Encode(e.to_string()))?;
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&len);
        header[4..8].copy_from_slice(&method.to_le_bytes());
        header[8..].copy_from_slice(&timeout_ms.to_le_bytes());
        let lost = |reason: String| RpcError::ConnectionLost {
            addr: self.peer.addr,
            reason,
        };
        let exchange = async {
            let (mut send, mut recv) =
                self.conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
            let mut chunks = [Bytes::copy_from_slice(&header), Bytes::from_owner(payload)];
            send.write_all_chunks(&mut chunks)
                .await
                .map_err(|e| lost(e.to_string()))?;
            // Finishing an open stream we own cannot fail; a failure means the connection died.
            send.finish().map_err(|e| lost(e.to_string()))?;
            let Some(head) = frame::read_header::<8>(&mut recv)
                .await
                .map_err(|e| map_stream(e, &lost))?
            else {
                return Err(lost("stream closed before a response".into()));
            };
            let (len, status) = split_header(&head);
            let len = frame::check_len(len, self.max_frame)?;
            let mut body = Frame::new();
            frame::read_body(&mut recv, len, &mut body)
                .await
                .map_err(|e| map_stream(e, &lost))?;
            match status {
                STATUS_OK => Ok(Resp::decode(&body)?),
                STATUS_ERR => {
                    let err = WireError::decode(&body)?;
                    Err(RpcError::Remote(RemoteError {
                        code: err.code,
                        message: err.message,
                    }))
                }
                other => Err(RpcError::BadFrame(FrameError::InvalidArchive(format!(
                    "unknown response status {other}"
                )))),
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout(timeout)),
        }
    }

    /// Opens a data stream on this connection, starting with `header`.
    pub async fn open_data_stream(
        &self,
        header: Bytes,
        deadline: Instant,
    ) -> Result<DataSender, RpcError> {
        let lost = |reason: String| RpcError::ConnectionLost {
            addr: self.peer.addr,
            reason,
        };
        frame::len_prefix(
            header.len(),
            crate::stream::MAX_DATA_HEADER_BYTES.min(self.max_frame),
        )?;
        // Opening waits for stream credit, and writing the header for flow-control credit
        // (the connection's window may be full with other streams): both within the deadline.
        let waited = deadline.saturating_duration_since(Instant::now());
        let open = async {
            let send = self
                .conn
                .open_uni()
                .await
                .map_err(|e| lost(e.to_string()))?;
            let mut sender = DataSender {
                send,
                max_frame: self.max_frame,
                addr: self.peer.addr,
            };
            sender.send(header).await?;
            Ok(sender)
        };
        tokio::time::timeout_at(deadline, open)
            .await
            .map_err(|_| RpcError::Timeout(waited))?
    }
}

fn map_stream(e: FrameError, lost: &impl Fn(String) -> RpcError) -> RpcError {
    match e {
        FrameError::Stream(reason) => lost(reason),
        other => RpcError::BadFrame(other),
    }
}

fn split_header(head: &[u8; 8]) -> (u32, u32) {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let status = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (len, status)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means another thread panicked mid-update of a cache; the map itself
    // is still structurally valid, so keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| EndpointError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        warn!(error = %e, "cannot size UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        warn!(error = %e, "cannot size UDP send buffer");
    }
    let granted = (
        socket.recv_buffer_size().unwrap_or(0),
        socket.send_buffer_size().unwrap_or(0),
    );
    // Linux reports double the granted size and silently caps at net.core.{r,w}mem_max.
    if granted.0 < buffer {
        debug!(
            requested = buffer,
            recv = granted.0,
            send = granted.1,
            "UDP buffers capped by the kernel"
        );
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

async fn accept_loop(inner: std::sync::Weak<Inner>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(strong) = inner.upgrade() else { break };
        let router = strong.router.clone();
        let limits = ServeLimits {
            max_frame: strong.config.max_frame_bytes,
            read_timeout: strong.config.request_read_timeout,
        };
        drop(strong);
        let weak = inner.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "handshake failed");
                    return;
                }
            };
            let addr = conn.remote_address();
            let Some(role) = peer_role(&conn) else {
                warn!(%addr, "peer certificate names no valid role; closing");
                conn.close(
                    CLOSE_BAD_IDENTITY.into(),
                    b"certificate names no valid role",
                );
                return;
            };
            debug!(%addr, %role, "accepted connection");
            let peer = Peer { role, addr };
            let id = conn.stable_id();
            if let Some(inner) = weak.upgrade() {
                lock(&inner.accepted).insert(id, (peer, conn.clone()));
            }
            serve_connection(router, conn, peer, limits).await;
            if let Some(inner) = weak.upgrade() {
                lock(&inner.accepted).remove(&id);
            }
        });
    }
    info!("endpoint stopped accepting");
}

fn peer_role(conn: &quinn::Connection) -> Option<Role> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    role_of_cert(certs.first()?).ok()
}

/// What an accepting endpoint enforces on what its peers send.
#[derive(Debug, Clone, Copy)]
struct ServeLimits {
    /// [`TransportConfig::max_frame_bytes`].
    max_frame: u32,
    /// [`TransportConfig::request_read_timeout`].
    read_timeout: Duration,
}

/// Serves calls and data streams the peer opens on `conn` until it closes.
async fn serve_connection(
    router: Arc<Router>,
    conn: quinn::Connection,
    peer: Peer,
    limits: ServeLimits,
) {
    let uni = {
        let router = router.clone();
        let conn = conn.clone();
        async move {
            while let Ok(recv) = conn.accept_uni().await {
                tokio::spawn(serve_data_stream(router.clone(), peer, recv, limits));
            }
        }
    };
    let bi = async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(serve_call(router.clone(), peer, send, recv, limits));
        }
    };
    tokio::join!(uni, bi);
}

async fn serve_data_stream(
    router: Arc<Router>,
    peer: Peer,
    mut recv: quinn::RecvStream,
    limits: ServeLimits,
) {
    let max_frame = limits.max_frame;
    let Some((callers, handler)) = router.streams.as_ref() else {
        let _ = recv.stop(STOP_REFUSED.into());
        return;
    };
    if !callers.contains(&peer.role) {
        warn!(addr = %peer.addr, role = %peer.role, "data stream refused for role");
        let _ = recv.stop(STOP_REFUSED.into());
        return;
    }
    let mut header = Frame::new();
    let header_limit = crate::stream::MAX_DATA_HEADER_BYTES.min(max_frame);
    let read = frame::read_frame(&mut recv, header_limit, &mut header);
    match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return,
        Ok(Err(e)) => {
            warn!(addr = %peer.addr, error = %e, "bad data stream header");
            let _ = recv.stop(STOP_BAD_FRAME.into());
            return;
        }
        Err(_) => {
            warn!(addr = %peer.addr, timeout = ?limits.read_timeout, "data stream header did not arrive in time");
            let _ = recv.stop(STOP_BAD_FRAME.into());
            return;
        }
    }
    handler(
        peer,
        DataStream {
            peer,
            header,
            recv,
            max_frame,
            partial: PartialFrame::default(),
        },
    )
    .await;
}

/// An error response's body; `None` (and the stream reset) if it cannot be encoded.
fn error_body(
    send: &mut quinn::SendStream,
    code: u32,
    message: String,
) -> Option<rkyv::util::AlignedVec> {
    match (WireError { code, message }).encode() {
        Ok(body) => Some(body),
        Err(e) => {
            warn!(error = %e, "cannot encode error response");
            let _ = send.reset(STOP_BAD_FRAME.into());
            None
        }
    }
}

async fn serve_call(
    router: Arc<Router>,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    limits: ServeLimits,
) {
    let max_frame = limits.max_frame;
    let result = handle_call(&router, peer, &mut recv, limits).await;
    let (status, body) = match result {
        Ok(Some(body)) => (STATUS_OK, body),
        Ok(None) => return,
        Err(err) => {
            if err.is(ErrorCode::BadRequest) {
                debug!(addr = %peer.addr, error = %err.message, "bad request frame");
                // Stop reading the rest of a bad request; the connection carries on.
                let _ = recv.stop(STOP_BAD_FRAME.into());
            }
            let Some(body) = error_body(&mut send, err.code, err.message) else {
                return;
            };
            (STATUS_ERR, body)
        }
    };
    let (status, body) = match frame::len_prefix(body.len(), max_frame) {
        Ok(_) => (status, body),
        Err(_) => {
            // Tell the caller what happened rather than resetting the stream, which it would
            // take for a lost connection and retry.
            warn!(addr = %peer.addr, len = body.len(), max_frame, "response exceeds the frame limit");
            let message = format!(
                "the response ({} bytes) is larger than the frame limit ({max_frame} bytes)",
                body.len()
            );
            let Some(body) = error_body(&mut send, ErrorCode::Internal as u32, message) else {
                return;
            };
            (STATUS_ERR, body)
        }
    };
    let Ok(len) = frame::len_prefix(body.len(), max_frame) else {
        // Only with a frame limit smaller than the error message itself (it may be 64 bytes).
        let _ = send.reset(STOP_BAD_FRAME.into());
        return;
    };
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&len);
    header[4..].copy_from_slice(&status.to_le_bytes());
    let mut chunks = [Bytes::copy_from_slice(&header), Bytes::from_owner(body)];
    if send.write_all_chunks(&mut chunks).await.is_ok() {
        let _ = send.finish();
    }
}

/// A request read off its stream: its route (`None`: the hello), its body and the caller's
/// deadline.
struct Request<'r> {
    route: Option<&'r crate::rpc::Route>,
    body: Frame,
    timeout_ms: u32,
}

/// Reads and checks one request. `Ok(None)`: the stream ended before a request.
async fn read_request<'r>(
    router: &'r Router,
    peer: Peer,
    recv: &mut quinn::RecvStream,
    max_frame: u32,
) -> Result<Option<Request<'r>>, RemoteError> {
    let bad = |e: FrameError| RemoteError::new(ErrorCode::BadRequest, e.to_string());
    let Some(head) = frame::read_header::<12>(recv).await.map_err(bad)? else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let method = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let timeout_ms = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let len = frame::check_len(len, max_frame).map_err(bad)?;
    let route = if method == HELLO_ID {
        None
    } else {
        let route = router.routes.get(&method).ok_or_else(|| {
            RemoteError::new(
                ErrorCode::UnknownMethod,
                format!("unknown method id {method}"),
            )
        })?;
        if !route.callers.contains(&peer.role) {
            return Err(RemoteError::new(
                ErrorCode::PermissionDenied,
                format!("role {} may not call {}", peer.role, route.name),
            ));
        }
        Some(route)
    };
    let mut body = Frame::new();
    frame::read_body(recv, len, &mut body).await.map_err(bad)?;
    frame::expect_end(recv).await.map_err(bad)?;
    Ok(Some(Request {
        route,
        body,
        timeout_ms,
    }))
}

/// Reads, checks and runs one call. `Ok(None)`: the stream ended before a request.
async fn handle_call(
    router: &Router,
    peer: Peer,
    recv: &mut quinn::RecvStream,
    limits: ServeLimits,
) -> Result<Option<rkyv::util::AlignedVec>, RemoteError> {
    let read = tokio::time::timeout(
        limits.read_timeout,
        read_request(router, peer, recv, limits.max_frame),
    );
    let request = match read.await {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(RemoteError::new(
                ErrorCode::BadRequest,
                format!(
                    "the request did not arrive whole within {:?}",
                    limits.read_timeout
                ),
            ));
        }
    };
    let bad = |e: FrameError| RemoteError::new(ErrorCode::BadRequest, e.to_string());
    let Some(route) = request.route else {
        let version = u32::decode(&request.body).map_err(bad)?;
        debug!(addr = %peer.addr, version, "hello");
        return PROTOCOL_VERSION.encode().map(Some).map_err(bad);
    };
    let deadline = Duration::from_millis(request.timeout_ms.into());
    match tokio::time::timeout(deadline, (route.handler)(peer, request.body)).await {
        Ok(result) => result.map(Some),
        Err(_) => Err(RemoteError::new(
            ErrorCode::DeadlineExceeded,
            format!("{} did not finish within {deadline:?}", route.name),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::tls::init_cluster_certs;

    /// A directory with a fresh cluster's certificates.
    fn certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        init_cluster_certs(dir.path(), "t", &[]).unwrap();
        dir
    }

    /// An endpoint of `role` on a free port of 127.0.0.1, serving nothing.
    fn bind(certs: &tempfile::TempDir, role: Role) -> Endpoint {
        let identity = Identity::load(certs.path(), role).unwrap();
        let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Endpoint::bind(
            localhost,
            &identity,
            TransportConfig::default(),
            Router::new(),
        )
        .unwrap()
    }

    /// Closed connections to peers never looked up again are dropped from the cache when
    /// another peer is dialed, so it holds about one entry per live peer.
    #[tokio::test]
    async fn dialing_drops_closed_connections_from_the_cache() {
        let dir = certs();
        let bind = |role| bind(&dir, role);
        let client = bind(Role::Client);
        let deadline = || Instant::now() + Duration::from_secs(5);
        let cached = |e: &Endpoint| lock(&e.inner.conns).len();
        let mut gone = Vec::new();
        for _ in 0..3 {
            let server = bind(Role::Master);
            let conn = client
                .connection(server.local_addr(), Role::Master, deadline())
                .await
                .unwrap();
            gone.push((server, conn));
        }
        for (server, conn) in &gone {
            server.close();
            // The client hears of the close.
            conn.conn.closed().await;
        }
        assert_eq!(
            cached(&client),
            3,
            "nothing looked the closed ones up again"
        );
        let live = bind(Role::Master);
        client
            .connection(live.local_addr(), Role::Master, deadline())
            .await
            .unwrap();
        assert_eq!(
            cached(&client),
            1,
            "only the live peer's connection is kept"
        );
    }

    /// A call that failed on a connection already replaced (the first failure closed it and
    /// a retry dialed anew) leaves the new connection alone.
    #[tokio::test]
    async fn a_late_failure_on_an_old_connection_leaves_the_new_one_alone() {
        let dir = certs();
        let bind = |role| bind(&dir, role);
        let server = bind(Role::Master);
        let client = bind(Role::Client);
        let addr = server.local_addr();
        let deadline = || Instant::now() + Duration::from_secs(5);
        let first = client
            .connection(addr, Role::Master, deadline())
            .await
            .unwrap();
        // The first failure on it: closed and uncached.
        client.forget_failed(addr, Role::Master, &first.conn);
        assert!(first.conn.close_reason().is_some());
        let second = client
            .connection(addr, Role::Master, deadline())
            .await
            .unwrap();
        assert_ne!(second.conn.stable_id(), first.conn.stable_id());
        // A second call that was in flight on the first connection fails late.
        client.forget_failed(addr, Role::Master, &first.conn);
        assert!(
            second.conn.close_reason().is_none(),
            "the new connection was closed"
        );
        let again = client
            .connection(addr, Role::Master, deadline())
            .await
            .unwrap();
        assert_eq!(
            again.conn.stable_id(),
            second.conn.stable_id(),
            "still cached"
        );
    }
}
