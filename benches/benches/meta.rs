//! Metadata write latency and throughput through the raft leader.
//!
//! Three in-process masters (`microcosm_control::meta::MetaNode`) on the in-memory router
//! (`meta::testing::MemRouter`, which still postcard-encodes every RPC), each with its own redb
//! file in a temp dir (fsync on every commit). Measures:
//! - `meta/write_latency`: one `SubmitJob` at a time, from proposal until applied on the leader
//!   (replicated to a quorum, fsynced on leader and follower);
//! - `meta/write_throughput/N`: N concurrent writes in flight (openraft batches them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use microcosm_control::meta::testing::MemRouter;
use microcosm_control::meta::{Command, MetaConfig, MetaNode};

/// The id of the node every node agrees is leader (waits for it).
async fn leader_of(nodes: &BTreeMap<u64, Arc<MetaNode>>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leaders: Vec<_> = nodes.values().map(|n| n.status().leader).collect();
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
            && nodes[l].read_linearizable(|_| ()).await.is_ok()
        {
            return *l;
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A job submission with a spec of typical size.
fn submit(n: u64) -> Command {
    Command::SubmitJob {
        job_type: "pipeline".into(),
        spec: format!("[job]\nname = \"bench-{n}\"\nparallelism = 4\n"),
        at_ms: n,
    }
}

struct Setup {
    rt: tokio::runtime::Runtime,
    leader: Arc<MetaNode>,
    nodes: BTreeMap<u64, Arc<MetaNode>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let router = MemRouter::new();
    let mut dirs = Vec::new();
    let mut nodes = BTreeMap::new();
    rt.block_on(async {
        for id in 1..=3u64 {
            let dir = tempfile::TempDir::new().expect("temp dir");
            let config = MetaConfig::new(id, format!("mem:{id}"), dir.path(), "bench");
            let node = MetaNode::start(config, router.transport(id))
                .await
                .expect("start node");
            router.register(id, node.raft().clone());
            nodes.insert(id, Arc::new(node));
            dirs.push(dir);
        }
        let members = nodes.iter().map(|(id, n)| (*id, n.master_node())).collect();
        nodes[&1].bootstrap(members).await.expect("bootstrap");
    });
    let leader = rt.block_on(leader_of(&nodes));
    Setup {
        leader: nodes[&leader].clone(),
        rt,
        nodes,
        _dirs: dirs,
    }
}

fn bench_meta(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("meta");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    let mut n = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function("write_latency", |b| {
        b.iter(|| {
            n += 1;
            let req = s.leader.request(submit(n));
            s.rt.block_on(s.leader.write(req)).expect("write")
        })
    });
    for in_flight in [16u64, 64] {
        group.throughput(Throughput::Elements(in_flight));
        group.bench_function(format!("write_throughput/{in_flight}"), |b| {
            b.iter_custom(|iters| {
                let leader = s.leader.clone();
                s.rt.block_on(async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let mut tasks = Vec::with_capacity(in_flight as usize);
                        for i in 0..in_flight {
                            let leader = leader.clone();
                            tasks.push(tokio::spawn(async move {
                                let req = leader.request(submit(i));
                                leader.write(req).await.expect("write")
                            }));
                        }
                        for t in tasks {
                            t.await.expect("write task");
                        }
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
    s.rt.block_on(async {
        for node in s.nodes.values() {
            let _ = node.shutdown().await;
        }
    });
}

criterion_group!(benches, bench_meta);
criterion_main!(benches);
