//! RPC and data streams over real QUIC sockets on 127.0.0.1 with mutual TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use microcosm_transport::tls::{ClusterCa, init_cluster_certs};
use microcosm_transport::{
    DataSender, Endpoint, ErrorCode, Frame, Identity, Method, Peer, RemoteError, Role, Router,
    RpcError, Service, TransportConfig,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

struct TestService;
impl Service for TestService {
    const NAME: &'static str = "test";
    const SERVED_BY: Role = Role::Master;
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
struct EchoReq {
    n: u64,
    text: String,
}

macro_rules! method {
    ($name:ident, $id:expr, $callers:expr, $req:ty, $resp:ty) => {
        struct $name;
        impl Method for $name {
            type Service = TestService;
            const ID: u32 = $id;
            const NAME: &'static str = stringify!($name);
            const CALLERS: &'static [Role] = $callers;
            type Request = $req;
            type Response = $resp;
        }
    };
}

const ALL: &[Role] = &[Role::Master, Role::Executor, Role::Client];
method!(Echo, 1, ALL, EchoReq, EchoReq);
method!(Sleep, 2, ALL, u64, u64);
method!(Fail, 3, ALL, u32, u32);
method!(MasterOnly, 4, &[Role::Master], u32, u32);
method!(Grow, 5, ALL, u32, Vec<u8>);

fn router() -> Router {
    Router::new()
        .route::<Echo, _, _>(|_peer: Peer, req: EchoReq| async move { Ok(req) })
        .route::<Sleep, _, _>(|_, ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ms)
        })
        .route::<Fail, _, _>(|_, code: u32| async move {
            Err(RemoteError {
                code,
                message: format!("failing with {code}"),
            })
        })
        .route::<MasterOnly, _, _>(|_, x: u32| async move { Ok(x + 1) })
        .route::<Grow, _, _>(|_, n: u32| async move { Ok(vec![7u8; n as usize]) })
}

struct Cluster {
    _dir: tempfile::TempDir,
    server: Endpoint,
    dir_path: std::path::PathBuf,
}

impl Cluster {
    fn new() -> Self {
        Self::with_config(TransportConfig::default())
    }

    fn with_config(config: TransportConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        init_cluster_certs(dir.path(), "test", &[]).unwrap();
        let identity = Identity::load(dir.path(), Role::Master).unwrap();
        let server = Endpoint::bind(localhost(), &identity, config, router()).unwrap();
        let dir_path = dir.path().to_path_buf();
        Self {
            _dir: dir,
            server,
            dir_path,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn client(&self, role: Role) -> Endpoint {
        endpoint_from(&self.dir_path, role)
    }
}

fn endpoint_from(dir: &Path, role: Role) -> Endpoint {
    let identity = Identity::load(dir, role).unwrap();
    Endpoint::bind(
        localhost(),
        &identity,
        TransportConfig::default(),
        Router::new(),
    )
    .unwrap()
}

/// An executor endpoint serving `router` with `config`, a `role` endpoint to reach it, and
/// a data stream opened from the latter to the former with `header`.
async fn data_stream_to(
    dir: &Path,
    router: Router,
    config: TransportConfig,
    role: Role,
    header: &'static [u8],
) -> (Endpoint, Endpoint, DataSender) {
    let server = Endpoint::bind(
        localhost(),
        &Identity::load(dir, Role::Executor).unwrap(),
        config,
        router,
    )
    .unwrap();
    let client = endpoint_from(dir, role);
    let sender = client
        .open_data_stream(
            server.local_addr(),
            Bytes::from_static(header),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    (server, client, sender)
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn round_trip() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    let req = EchoReq {
        n: 42,
        text: "hello".into(),
    };
    let resp = client.call::<Echo>(cluster.addr(), &req).await.unwrap();
    assert_eq!(resp, req);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_calls_share_one_connection() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Executor);
    let addr = cluster.addr();
    let conn = client
        .connection(addr, Role::Master, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..1000u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = EchoReq {
                n,
                text: n.to_string(),
            };
            client
                .call_timeout::<Echo>(addr, &req, Duration::from_secs(20))
                .await
                .map(|r| r == req)
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    let again = client
        .connection(addr, Role::Master, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        conn.quinn().stable_id(),
        again.quinn().stable_id(),
        "connection was not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_dials_share_one_connection() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Executor);
    let addr = cluster.addr();
    let dials: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .connection(addr, Role::Master, Instant::now() + Duration::from_secs(5))
                    .await
                    .map(|c| c.quinn().stable_id())
            })
        })
        .collect();
    let mut ids = Vec::new();
    for d in dials {
        ids.push(d.await.unwrap().unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "concurrent dials opened {} connections",
        ids.len()
    );
}

/// A call that timed out on a peer that answers (acknowledges) it keeps the connection, and
/// leaves alone the other calls on it, and no connection is left open twice.
#[tokio::test]
async fn a_call_timed_out_on_a_live_peer_leaves_its_connection_and_the_other_calls_alone() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    assert_eq!(client.call::<Sleep>(cluster.addr(), &1).await.unwrap(), 1);
    let before = client.connection_stats();
    let slow = {
        let client = client.clone();
        let addr = cluster.addr();
        tokio::spawn(async move {
            client
                .call_timeout::<Sleep>(addr, &1_500, Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = client
        .call_timeout::<Sleep>(cluster.addr(), &5_000, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout(_)), "{err:?}");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        1_500,
        "the call beside it went on"
    );
    let after = client.connection_stats();
    assert_eq!((before.len(), after.len()), (1, 1), "{before:?} {after:?}");
    assert_eq!(before[0].id, after[0].id, "the same connection");
}

/// A multi-threaded runtime of `threads` workers, for tests that stop one node's runtime.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// A call that timed out without a word from its peer (a hung node: here its runtime is
/// gone) closes its connection, so the next call dials afresh instead of sending into it
/// until the idle timeout.
#[test]
fn a_call_timed_out_on_a_silent_peer_closes_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let (main, crashing) = (runtime(1), runtime(1));
    let identity = Identity::load(dir.path(), Role::Master).unwrap();
    let server = crashing.block_on(async {
        Endpoint::bind(localhost(), &identity, TransportConfig::default(), router()).unwrap()
    });
    let addr = server.local_addr();
    main.block_on(async {
        let client = endpoint_from(dir.path(), Role::Client);
        assert_eq!(client.call::<Sleep>(addr, &1).await.unwrap(), 1);
        // Its tasks stop; its socket stays open (the handle lives), read by nobody: a hung
        // node, which neither answers nor closes.
        crashing.shutdown_background();
        let err = client
            .call_timeout::<Sleep>(addr, &1, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::Timeout(_)), "{err:?}");
        assert!(
            client.connection_stats().is_empty(),
            "the silent connection was dropped"
        );
        drop(server);
    });
}

/// A call that timed out closes no connection for good: the next call works, and no
/// connection is left open twice on either side.
#[tokio::test]
async fn a_timed_out_call_leaves_one_connection_on_each_side() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    let err = client
        .call_timeout::<Sleep>(cluster.addr(), &5_000, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout(_)), "{err:?}");
    assert_eq!(client.call::<Sleep>(cluster.addr(), &1).await.unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ours, theirs) = (
            client.connection_stats().len(),
            cluster.server.connection_stats().len(),
        );
        if (ours, theirs) == (1, 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ours} connections on the client, {theirs} on the server; want 1 and 1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deadline_expires() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    let started = Instant::now();
    let err = client
        .call_timeout::<Sleep>(cluster.addr(), &5_000, Duration::from_millis(200))
        .await
        .unwrap_err();
    // It names the caller's timeout, not what was left of it after connecting.
    assert!(
        matches!(err, RpcError::Timeout(t) if t == Duration::from_millis(200)),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(3));
    // The connection still serves calls afterwards.
    assert_eq!(client.call::<Sleep>(cluster.addr(), &1).await.unwrap(), 1);
}

#[tokio::test]
async fn server_error_is_typed() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    let err = client
        .call::<Fail>(cluster.addr(), &(ErrorCode::NotFound as u32))
        .await
        .unwrap_err();
    let remote = err.remote().expect("a remote error");
    assert!(remote.is(ErrorCode::NotFound));
    assert_eq!(remote.message, "failing with 7");
    assert!(!err.is_retryable());
    let err = client
        .call::<Fail>(cluster.addr(), &(ErrorCode::Unavailable as u32))
        .await
        .unwrap_err();
    assert!(err.is_retryable());
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let cluster = Cluster::new();
    let other = tempfile::tempdir().unwrap();
    init_cluster_certs(other.path(), "other", &[]).unwrap();
    let stranger = endpoint_from(other.path(), Role::Master);
    let err = stranger
        .call_timeout::<Echo>(
            cluster.addr(),
            &EchoReq {
                n: 1,
                text: String::new(),
            },
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::Unreachable { .. } | RpcError::Timeout(_)),
        "{err:?}"
    );

    // A client trusting the right CA but holding a certificate signed by another one.
    let ca = ClusterCa::generate("rogue").unwrap();
    let rogue = ca.issue(Role::Master, &[]).unwrap();
    let ca_pem = std::fs::read(cluster.dir_path.join("ca.pem")).unwrap();
    let id = Identity::from_pem(
        Role::Master,
        &ca_pem,
        rogue.cert_pem.as_bytes(),
        rogue.key_pem.as_bytes(),
    )
    .unwrap();
    let rogue_ep =
        Endpoint::bind(localhost(), &id, TransportConfig::default(), Router::new()).unwrap();
    let err = rogue_ep
        .call_timeout::<MasterOnly>(cluster.addr(), &1, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::Unreachable { .. } | RpcError::Timeout(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn role_may_not_call_master_only_method() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    let err = client
        .call::<MasterOnly>(cluster.addr(), &1)
        .await
        .unwrap_err();
    assert!(
        err.remote().unwrap().is(ErrorCode::PermissionDenied),
        "{err:?}"
    );
    let master = cluster.client(Role::Master);
    assert_eq!(
        master.call::<MasterOnly>(cluster.addr(), &1).await.unwrap(),
        2
    );
}

/// Sends raw bytes on a new stream of `conn` and returns the error the server answered.
async fn raw_request(
    name: &str,
    conn: &quinn::Connection,
    bytes: Vec<u8>,
    finish: bool,
) -> RpcError {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let mut head = [0u8; 8];
    recv.read_exact(&mut head).await.expect("an error response");
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let status = u32::from_le_bytes(head[4..].try_into().unwrap());
    assert_eq!(status, 1, "{name}: expected an error status");
    let mut body = Frame::new();
    body.resize(len, 0);
    recv.read_exact(body.as_mut_slice()).await.unwrap();
    #[derive(rkyv::Archive, rkyv::Deserialize, rkyv::Serialize)]
    struct WireError {
        code: u32,
        message: String,
    }
    let e: WireError = microcosm_transport::Message::decode(&body).unwrap();
    RpcError::Remote(RemoteError {
        code: e.code,
        message: e.message,
    })
}

/// A client of `cluster`'s server, its address, and the raw QUIC connection to it (for
/// writing frames by hand).
async fn raw_connection(cluster: &Cluster) -> (Endpoint, SocketAddr, quinn::Connection) {
    let client = cluster.client(Role::Client);
    let addr = cluster.addr();
    let conn = client
        .connection(addr, Role::Master, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    let q = conn.quinn().clone();
    (client, addr, q)
}

fn request(len: u32, method: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&method.to_le_bytes());
    v.extend_from_slice(&5000u32.to_le_bytes());
    v.extend_from_slice(body);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_fail_their_stream_only() {
    let config = TransportConfig {
        max_frame_bytes: 1 << 20,
        ..Default::default()
    };
    let cluster = Cluster::with_config(config);
    let (client, addr, q) = raw_connection(&cluster).await;
    let good = microcosm_transport::Message::encode(&EchoReq {
        n: 3,
        text: "ok".into(),
    })
    .unwrap();
    let good_len = good.len() as u32;

    // A slow good call runs in parallel with every bad frame on the same connection.
    let parallel = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<Sleep>(addr, &300).await })
    };
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("length 0", request(0, 1, &[]), true, "empty frame"),
        (
            "over the limit",
            request((1 << 20) + 1, 1, &[0; 16]),
            false,
            "exceeds the limit",
        ),
        (
            "2^32-1",
            request(u32::MAX, 1, &[0; 16]),
            false,
            "exceeds the limit",
        ),
        (
            "truncated",
            request(good_len, 1, &good[..good.len() / 2]),
            true,
            "ended inside a frame",
        ),
        (
            "trailing bytes after the frame",
            {
                let mut v = request(good_len, 1, &good);
                v.extend_from_slice(b"more");
                v
            },
            true,
            "trailing bytes",
        ),
        (
            "not an archive",
            request(64, 1, &[0xAB; 64]),
            true,
            "invalid archive",
        ),
        (
            "unknown method",
            request(good_len, 999, &good),
            true,
            "unknown method",
        ),
    ];
    for (name, bytes, finish, expect) in cases {
        let err = raw_request(name, &q, bytes, finish).await;
        let remote = err.remote().unwrap();
        assert!(
            remote.message.contains(expect),
            "{name}: expected {expect:?} in {:?}",
            remote.message
        );
        // After each bad frame, a good call on the same connection succeeds.
        let ok = client
            .call::<Echo>(
                addr,
                &EchoReq {
                    n: 9,
                    text: name.into(),
                },
            )
            .await
            .unwrap();
        assert_eq!(ok.text, name);
    }
    assert_eq!(parallel.await.unwrap().unwrap(), 300);
    assert!(q.close_reason().is_none(), "connection was closed");
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Batch {
    records: Vec<Rec>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy)]
struct Rec {
    seq: u64,
    table: u32,
    payload: [u64; 12],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_stream_delivers_records_in_order() {
    const TOTAL: u64 = 100_000;
    const BATCH: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let received = Arc::new(Mutex::new(Vec::<u64>::new()));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<String>();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let router = {
        let received = received.clone();
        Router::new().data_streams(&[Role::Executor], move |_peer, mut stream| {
            let received = received.clone();
            let done_tx = done_tx.clone();
            async move {
                let header = String::from_utf8_lossy(stream.header()).to_string();
                let mut buf = Frame::new();
                while stream.recv_into(&mut buf).await.unwrap() {
                    let batch = microcosm_transport::frame::access::<ArchivedBatch>(&buf).unwrap();
                    let mut r = received.lock().await;
                    r.extend(batch.records.iter().map(|rec| rec.seq.to_native()));
                }
                if let Some(tx) = done_tx.lock().await.take() {
                    let _ = tx.send(header);
                }
            }
        })
    };
    let (_server, _client, mut sender) = data_stream_to(
        dir.path(),
        router,
        TransportConfig::default(),
        Role::Executor,
        b"edge-7",
    )
    .await;
    // The first half one frame per write, the second half five frames per write.
    let mut group = Vec::new();
    for b in 0..TOTAL / BATCH {
        let records = (0..BATCH)
            .map(|i| Rec {
                seq: b * BATCH + i,
                table: 1,
                payload: [i; 12],
            })
            .collect();
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&Batch { records }).unwrap();
        let frame = Bytes::from(bytes.into_vec());
        if b < TOTAL / BATCH / 2 {
            sender.send(frame).await.unwrap();
        } else {
            group.push(frame);
            if group.len() == 5 {
                sender.send_many(std::mem::take(&mut group)).await.unwrap();
            }
        }
    }
    sender.send_many(group).await.unwrap();
    sender.finish().unwrap();
    let header = tokio::time::timeout(Duration::from_secs(30), done_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(header, "edge-7");
    let r = received.lock().await;
    assert_eq!(r.len() as u64, TOTAL);
    assert!(
        r.iter().enumerate().all(|(i, s)| *s == i as u64),
        "records out of order"
    );
}

/// Two data-plane endpoints on the loopback raise their datagrams by path MTU discovery
/// beyond the 1,472 bytes of an Ethernet path, up to `DATA_PLANE_UDP_PAYLOAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_connections_discover_large_datagrams_on_the_loopback() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let bind = |role| {
        Endpoint::bind(
            localhost(),
            &Identity::load(dir.path(), role).unwrap(),
            TransportConfig::data_plane(),
            router(),
        )
        .unwrap()
    };
    let (a, b) = (bind(Role::Executor), bind(Role::Master));
    let conn = a
        .connection(
            b.local_addr(),
            Role::Master,
            Instant::now() + Duration::from_secs(5),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mtu = loop {
        let mtu = conn.quinn().stats().path.current_mtu;
        if mtu > 1472 || Instant::now() > deadline {
            break mtu;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        mtu > 1472 && mtu <= microcosm_transport::config::DATA_PLANE_UDP_PAYLOAD,
        "current MTU {mtu}"
    );
    // Calls still work over the connection at that size.
    let text = "x".repeat(5000);
    let resp = a
        .call::<Echo>(
            b.local_addr(),
            &EchoReq {
                n: 1,
                text: text.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(resp.text, text);
}

#[tokio::test]
async fn client_may_not_open_data_streams() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let router = Router::new().data_streams(&[Role::Executor], |_, _| async {});
    let (_server, _client, mut sender) = data_stream_to(
        dir.path(),
        router,
        TransportConfig::default(),
        Role::Client,
        b"h",
    )
    .await;
    // The server stops the stream; writes fail soon after.
    let mut failed = false;
    for _ in 0..200 {
        if sender.send(Bytes::from(vec![0u8; 1024])).await.is_err() {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(failed, "server accepted a data stream from a client");
}

#[tokio::test]
async fn unreachable_peer_is_a_retryable_error() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    // Bind a socket and drop it to get a port nobody listens on.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = client
        .call_timeout::<Echo>(
            dead,
            &EchoReq {
                n: 0,
                text: String::new(),
            },
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn connection_stats_name_both_ends_and_forget_closed_connections() {
    let cluster = Cluster::new();
    assert!(cluster.server.connection_stats().is_empty());
    let client = cluster.client(Role::Client);
    let req = EchoReq {
        n: 7,
        text: "stats".into(),
    };
    for _ in 0..3 {
        client.call::<Echo>(cluster.addr(), &req).await.unwrap();
    }

    let dialed = client.connection_stats();
    assert_eq!(dialed.len(), 1, "{dialed:?}");
    let d = &dialed[0];
    assert_eq!(d.peer.addr, cluster.addr());
    assert_eq!(d.peer.role, Role::Master);
    assert!(d.dialed);
    assert!(d.rtt > Duration::ZERO);
    assert!(d.cwnd > 0);
    assert!(
        d.sent_packets >= 4,
        "handshake, hello and three calls: {d:?}"
    );
    assert!(d.datagrams_sent >= 4 && d.datagrams_received >= 4, "{d:?}");
    assert_eq!(d.lost_packets, 0, "nothing is lost on the loopback: {d:?}");

    let accepted = cluster.server.connection_stats();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    let a = &accepted[0];
    assert_eq!(a.peer.addr, client.local_addr());
    assert_eq!(
        a.peer.role,
        Role::Client,
        "the role the client's certificate names"
    );
    assert!(!a.dialed);
    // What one end sent, the other received (the last ACKs may still be in flight).
    assert!(
        a.datagrams_received >= d.datagrams_sent - 2,
        "{a:?} vs {d:?}"
    );

    client.close();
    assert!(client.connection_stats().is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.server.connection_stats().is_empty() {
        assert!(
            Instant::now() < deadline,
            "a closed connection must leave the server's stats"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_stalls_is_answered_once_the_read_timeout_passes() {
    let config = TransportConfig {
        request_read_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let cluster = Cluster::with_config(config);
    let (client, addr, q) = raw_connection(&cluster).await;
    // A header announcing 1000 bytes, 10 of them sent, and the stream left open.
    let err = raw_request("stalled", &q, request(1000, 1, &[0; 10]), false).await;
    let remote = err.remote().unwrap();
    assert_eq!(remote.code, ErrorCode::BadRequest as u32);
    assert!(
        remote.message.contains("did not arrive whole within 300ms"),
        "{}",
        remote.message
    );
    // The connection still serves calls.
    let ok = client
        .call::<Echo>(
            addr,
            &EchoReq {
                n: 1,
                text: "after".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(ok.text, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_frame_limit_is_an_error_not_a_lost_connection() {
    let config = TransportConfig {
        max_frame_bytes: 64 << 10,
        ..Default::default()
    };
    let cluster = Cluster::with_config(config);
    let client = cluster.client(Role::Client);
    let addr = cluster.addr();
    let err = client.call::<Grow>(addr, &(128 << 10)).await.unwrap_err();
    let remote = err
        .remote()
        .unwrap_or_else(|| panic!("not a remote error: {err}"));
    assert_eq!(remote.code, ErrorCode::Internal as u32);
    assert!(
        remote
            .message
            .contains("larger than the frame limit (65536 bytes)"),
        "{}",
        remote.message
    );
    assert!(!err.is_retryable(), "{err}");
    assert_eq!(client.call::<Grow>(addr, &16).await.unwrap(), vec![7u8; 16]);
}

/// A receive dropped part-way through a frame (as in a `select!`) loses nothing: the next
/// one completes the frame, and the frames after it are framed right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_dropped_mid_frame_loses_nothing() {
    const BIG: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(Vec<Vec<u8>>, usize)>();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let router = Router::new().data_streams(&[Role::Executor], move |_peer, mut stream| {
        let done_tx = done_tx.clone();
        async move {
            let mut frames = Vec::new();
            let mut dropped = 0;
            loop {
                // Poll a fresh receive once; drop it if the frame is not complete yet.
                match tokio::time::timeout(Duration::ZERO, stream.recv()).await {
                    Ok(Ok(Some(frame))) => frames.push(frame.to_vec()),
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => panic!("after {} frames: {e}", frames.len()),
                    Err(_) => {
                        dropped += 1;
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
            }
            if let Some(tx) = done_tx.lock().await.take() {
                let _ = tx.send((frames, dropped));
            }
        }
    });
    let (_server, _client, mut sender) = data_stream_to(
        dir.path(),
        router,
        TransportConfig::default(),
        Role::Executor,
        b"h",
    )
    .await;
    let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    sender.send(Bytes::from(big.clone())).await.unwrap();
    sender.send(Bytes::from_static(b"after")).await.unwrap();
    sender.finish().unwrap();
    let (frames, dropped) = tokio::time::timeout(Duration::from_secs(30), done_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(
        dropped > 0,
        "no receive was dropped: the test tested nothing"
    );
    assert_eq!(frames.len(), 2);
    assert!(frames[0] == big, "the big frame arrived changed");
    assert_eq!(frames[1], b"after");
}

/// Opening a data stream is bounded by its timeout also while its header waits for the
/// connection's flow-control window (full with another stream nobody reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_data_stream_times_out_when_the_connection_window_is_full() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    // The receiver accepts streams and never reads them.
    let router = Router::new().data_streams(&[Role::Executor], |_peer, stream| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stream);
    });
    let config = TransportConfig {
        receive_window: 64 * 1024,
        stream_receive_window: 64 * 1024,
        ..TransportConfig::default()
    };
    let (server, client, mut first) =
        data_stream_to(dir.path(), router, config, Role::Executor, b"first").await;
    // Fills the connection's window and then waits in `send`.
    let filler = tokio::spawn(async move {
        let _ = first.send(Bytes::from(vec![1u8; 1 << 20])).await;
        first
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        client.open_data_stream(
            server.local_addr(),
            Bytes::from(vec![2u8; 1024]),
            Duration::from_secs(1),
        ),
    )
    .await
    .expect("open_data_stream outlived its own 1 s timeout");
    assert!(
        matches!(second, Err(RpcError::Timeout(_))),
        "{:?}",
        second.map(|_| ())
    );
    filler.abort();
}

/// Dropping the last handle of an endpoint closes it: its port is free again and its peers'
/// connections end, rather than being served on by its accept loop.
#[tokio::test]
async fn dropping_an_endpoint_closes_it_and_frees_its_port() {
    let cluster = Cluster::new();
    let client = cluster.client(Role::Client);
    let addr = client.local_addr();
    // A connection the server keeps serving.
    let req = EchoReq {
        n: 1,
        text: "x".into(),
    };
    client.call::<Echo>(cluster.addr(), &req).await.unwrap();
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let freed = std::net::UdpSocket::bind(addr).is_ok();
        let served = cluster.server.connection_stats().len();
        if freed && served == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "port free: {freed}; the server still has {served} connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node that crashed and restarted at the same address, with the same key, answers its
/// predecessor's connection with a stateless reset its peer accepts: a data stream into that
/// connection fails to finish at once instead of looking delivered until the idle timeout.
/// It takes both keys derived from the identity: the reset key, and the connection-id key
/// without which the restarted node does not recognise the old ids and drops their packets.
#[test]
fn a_stream_to_a_peer_that_restarted_at_its_address_fails_to_finish() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    // On both ends, far longer than the test waits: only a reset can end the connection in
    // time.
    let config = TransportConfig {
        idle_timeout: Duration::from_secs(60),
        ..TransportConfig::default()
    };
    // Both nodes take data streams and read them to the end.
    let reading = || {
        Router::new().data_streams(&[Role::Executor], |_peer, mut stream| async move {
            while let Ok(Some(_)) = stream.recv().await {}
        })
    };
    let (main, crashing) = (runtime(2), runtime(1));
    let identity = Identity::load(dir.path(), Role::Executor).unwrap();
    let first = crashing.block_on(async {
        Endpoint::bind(localhost(), &identity, config.clone(), reading()).unwrap()
    });
    let addr = first.local_addr();
    main.block_on(async {
        let client = Endpoint::bind(localhost(), &identity, config.clone(), Router::new()).unwrap();
        let mut sender = client
            .open_data_stream(addr, Bytes::from_static(b"h"), Duration::from_secs(5))
            .await
            .unwrap();
        sender.send(Bytes::from_static(b"before")).await.unwrap();
        // The crash: the first node's tasks and socket go without a word to its peers.
        // (Its close below cannot send anything: its runtime is gone.)
        crashing.shutdown_background();
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        let second = loop {
            match Endpoint::bind(addr, &identity, config.clone(), reading()) {
                Ok(e) => break e,
                Err(e) if Instant::now() > deadline => panic!("rebinding {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let started = Instant::now();
        // A full-size frame: every packet it goes out in is large enough to be answered
        // with a reset. A third of the idle timeout: only a reset ends it that soon.
        let outcome = tokio::time::timeout(Duration::from_secs(20), async move {
            sender.send(Bytes::from(vec![7u8; 64 * 1024])).await?;
            sender.finish_acknowledged().await
        })
        .await
        .expect("the reset ends the stream long before the idle timeout");
        assert!(
            matches!(outcome, Err(RpcError::ConnectionLost { .. })),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        drop(second);
    });
}

/// A finished stream counts as delivered once its receiver acknowledged all of it.
#[tokio::test]
async fn finishing_a_stream_waits_for_the_receivers_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let router = Router::new().data_streams(&[Role::Executor], move |_peer, mut stream| {
        let tx = tx.clone();
        async move {
            let mut frames = 0;
            while let Ok(Some(_)) = stream.recv().await {
                frames += 1;
            }
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(frames);
            }
        }
    });
    let (_server, _client, mut sender) = data_stream_to(
        dir.path(),
        router,
        TransportConfig::default(),
        Role::Executor,
        b"h",
    )
    .await;
    for _ in 0..3 {
        sender.send(Bytes::from_static(b"frame")).await.unwrap();
    }
    sender.finish_acknowledged().await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap(),
        3
    );
}

/// A data-stream header over `MAX_DATA_HEADER_BYTES` is refused by the sender before it opens
/// anything, and by a receiver that gets one anyway without handing it to its handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_data_stream_header_is_refused_on_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "t", &[]).unwrap();
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = {
        let handled = handled.clone();
        Router::new().data_streams(&[Role::Executor], move |_peer, _stream| {
            handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {}
        })
    };
    let limit = microcosm_transport::MAX_DATA_HEADER_BYTES as usize;
    let (server, client, _ok) = data_stream_to(
        dir.path(),
        router,
        TransportConfig::default(),
        Role::Executor,
        b"fits",
    )
    .await;
    let too_big = Bytes::from(vec![7u8; limit + 1]);
    let refused = client
        .open_data_stream(server.local_addr(), too_big, Duration::from_secs(5))
        .await;
    assert!(
        matches!(refused, Err(RpcError::BadFrame(_))),
        "{:?}",
        refused.err()
    );
    // The same header written by hand: the receiver stops the stream.
    let conn = client
        .connection(
            server.local_addr(),
            Role::Executor,
            Instant::now() + Duration::from_secs(5),
        )
        .await
        .unwrap();
    let mut raw = conn.quinn().open_uni().await.unwrap();
    raw.write_all(&((limit + 1) as u32).to_le_bytes())
        .await
        .unwrap();
    // The receiver may stop the stream as soon as it read the length: the rest of the header
    // then fails to write, which is the point.
    match raw.write_all(&vec![7u8; limit + 1]).await {
        Ok(()) | Err(quinn::WriteError::Stopped(_)) => {}
        Err(e) => panic!("writing the header: {e}"),
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), raw.stopped())
        .await
        .expect("the receiver answers")
        .unwrap();
    assert!(stopped.is_some(), "the stream was stopped, not read");
    wait_until_handled(&handled, 1).await;
    assert_eq!(
        handled.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the stream with a fitting header reached the handler"
    );
    // A header at the limit is taken.
    let at_limit = Bytes::from(vec![7u8; limit]);
    client
        .open_data_stream(server.local_addr(), at_limit, Duration::from_secs(5))
        .await
        .unwrap();
    wait_until_handled(&handled, 2).await;
}

async fn wait_until_handled(handled: &std::sync::atomic::AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while handled.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the handler never saw stream {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
