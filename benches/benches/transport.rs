//! Transport benchmarks on loopback: small RPC round-trip latency and record-batch stream
#![allow(clippy::unwrap_used, missing_docs)]
//! throughput (120-byte records, 1024 per batch) over one QUIC connection with mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use microcosm_transport::tls::init_cluster_certs;
use microcosm_transport::{
    Endpoint, Frame, Identity, Method, Role, Router, Service, TransportConfig,
};

struct Bench;
impl Service for Bench {
    const NAME: &'static str = "bench";
    const SERVED_BY: Role = Role::Master;
}
struct Ping;
impl Method for Ping {
    type Service = Bench;
    const ID: u32 = 1;
    const NAME: &'static str = "ping";
    const CALLERS: &'static [Role] = &[Role::Client];
    type Request = u64;
    type Response = u64;
}

/// The demo's record shape: 120 bytes archived.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy)]
struct Rec {
    table: u32,
    version: u32,
    kind: u8,
    pk: u64,
    tracer: [u64; 6],
    payload: [u8; 32],
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Batch {
    records: Vec<Rec>,
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn rpc_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "bench", &[]).unwrap();
    let (server, client) = rt.block_on(async {
        let server = Endpoint::bind(
            localhost(),
            &Identity::load(dir.path(), Role::Master).unwrap(),
            TransportConfig::default(),
            Router::new().route::<Ping, _, _>(|_, n: u64| async move { Ok(n) }),
        )
        .unwrap();
        let client = Endpoint::bind(
            localhost(),
            &Identity::load(dir.path(), Role::Client).unwrap(),
            TransportConfig::default(),
            Router::new(),
        )
        .unwrap();
        client.call::<Ping>(server.local_addr(), &0).await.unwrap();
        (server, client)
    });
    let addr = server.local_addr();

    // Percentiles from plain samples (criterion reports means and medians of batches).
    let samples = rt.block_on(async {
        let mut v = Vec::with_capacity(20_000);
        for i in 0..20_000u64 {
            let t = Instant::now();
            client.call::<Ping>(addr, &i).await.unwrap();
            v.push(t.elapsed());
        }
        v.sort();
        v
    });
    println!(
        "rpc round trip over {} calls: p50 {:?} p90 {:?} p99 {:?} p99.9 {:?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999)
    );

    c.bench_function("rpc_round_trip_u64", |b| {
        b.to_async(&rt)
            .iter(|| async { client.call::<Ping>(addr, &7).await.unwrap() })
    });
}

fn batch_stream_throughput(c: &mut Criterion) {
    const BATCH: usize = 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    init_cluster_certs(dir.path(), "bench", &[]).unwrap();
    let received = Arc::new(AtomicU64::new(0));
    // The client endpoint is kept too: dropping its last handle would close it.
    let (_server, _client, mut sender) = rt.block_on(async {
        let counter = received.clone();
        let router = Router::new().data_streams(&[Role::Executor], move |_, mut stream| {
            let counter = counter.clone();
            async move {
                let mut buf = Frame::new();
                while let Ok(true) = stream.recv_into(&mut buf).await {
                    let batch = microcosm_transport::frame::access::<ArchivedBatch>(&buf).unwrap();
                    counter.fetch_add(batch.records.len() as u64, Ordering::Release);
                }
            }
        });
        let server = Endpoint::bind(
            localhost(),
            &Identity::load(dir.path(), Role::Executor).unwrap(),
            TransportConfig::default(),
            router,
        )
        .unwrap();
        let client = Endpoint::bind(
            localhost(),
            &Identity::load(dir.path(), Role::Executor).unwrap(),
            TransportConfig::default(),
            Router::new(),
        )
        .unwrap();
        let sender = client
            .open_data_stream(
                server.local_addr(),
                Bytes::from_static(b"bench"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        (server, client, sender)
    });
    let records: Vec<Rec> = (0..BATCH as u64)
        .map(|pk| Rec {
            table: 1,
            version: 0,
            kind: 0,
            pk,
            tracer: [pk; 6],
            payload: [7; 32],
        })
        .collect();
    let batch = Batch { records };
    let archived_len = rkyv::to_bytes::<rkyv::rancor::Error>(&batch).unwrap().len();
    println!(
        "batch of {BATCH} records archives to {archived_len} bytes ({} per record)",
        archived_len / BATCH
    );

    let mut group = c.benchmark_group("batch_stream");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("records_120B_batch_1024", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start_count = received.load(Ordering::Acquire);
                let target = start_count + iters * BATCH as u64;
                let t = Instant::now();
                for _ in 0..iters {
                    // Serialize per batch, as a producer would.
                    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&batch).unwrap();
                    sender.send(Bytes::from_owner(bytes)).await.unwrap();
                }
                while received.load(Ordering::Acquire) < target {
                    tokio::task::yield_now().await;
                }
                t.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    targets = rpc_round_trip, batch_stream_throughput
}
criterion_main!(benches);
