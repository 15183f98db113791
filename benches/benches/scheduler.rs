//! Placement throughput of the pure scheduler.
//!
//! Places one job of 100,000 tasks (about half of them single, the rest in co-location groups
//! of 2–4 tasks, some groups avoiding another group) onto 1,000 executors, the size the
//! scheduler is meant to handle within 50 ms. A second case fills the cluster to 95 % so that
//! the packing works with little slack. Inputs come from a fixed-seed generator, so every run
//! measures the same problem.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use microcosm_control::scheduler::{ExecutorOffer, GroupId, TaskDemand, schedule};

/// A small deterministic generator (xorshift64*), so the bench needs no rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `low..=high` (the bias is irrelevant here).
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// `count` tasks: singles of cost 1–2 and groups of 2–4 tasks of cost 1–2; every tenth group
/// avoids the group before it.
fn tasks(count: u64, seed: u64) -> Vec<TaskDemand> {
    let mut rng = Rng(seed);
    let mut tasks = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut next_group = 0_u64;
    let mut task = 0_u64;
    while task < count {
        let cost = u32::try_from(rng.range(1, 2)).unwrap_or(1);
        if rng.next().is_multiple_of(2) {
            tasks.push(TaskDemand::single(task, cost));
            task += 1;
            continue;
        }
        let group = GroupId(next_group);
        next_group += 1;
        let size = rng.range(2, 4).min(count - task);
        for member in 0..size {
            let cost = u32::try_from(rng.range(1, 2)).unwrap_or(1);
            let mut demand = TaskDemand::grouped(task, cost, group);
            if member == 0 && group.0 % 10 == 9 {
                demand = demand.avoiding(GroupId(group.0 - 1));
            }
            tasks.push(demand);
            task += 1;
        }
    }
    tasks
}

/// `count` executors sharing `total_free` free slots, with uneven sizes and some used slots.
fn executors(count: u64, total_free: u64, seed: u64) -> Vec<ExecutorOffer> {
    let mut rng = Rng(seed);
    let base = total_free / count;
    let mut left = total_free;
    (0..count)
        .map(|executor| {
            let free = if executor + 1 == count {
                left
            } else {
                // Between 3/4 and 5/4 of the mean, keeping enough for the rest.
                rng.range(base * 3 / 4, base * 5 / 4).min(left)
            };
            left -= free;
            let free = u32::try_from(free).unwrap_or(u32::MAX);
            ExecutorOffer {
                executor,
                free_slots: free,
                total_slots: free.saturating_add(u32::try_from(rng.range(0, 8)).unwrap_or(0)),
            }
        })
        .collect()
}

fn bench_schedule(c: &mut Criterion) {
    let job = tasks(100_000, 0x5EED);
    let needed: u64 = job.iter().map(|task| u64::from(task.cost)).sum();
    let roomy = executors(1_000, needed * 2, 0xFACE);
    let tight = executors(1_000, needed * 100 / 95, 0xBEEF);
    // Check once, outside the measurement, that the problems are solvable.
    assert!(schedule(&job, &roomy).is_ok(), "roomy case must place");
    assert!(schedule(&job, &tight).is_ok(), "tight case must place");

    let mut group = c.benchmark_group("schedule");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("100k_tasks_1k_executors_half_full", |b| {
        b.iter(|| schedule(black_box(&job), black_box(&roomy)));
    });
    group.bench_function("100k_tasks_1k_executors_95pct_full", |b| {
        b.iter(|| schedule(black_box(&job), black_box(&tight)));
    });
    group.finish();
}

criterion_group!(benches, bench_schedule);
criterion_main!(benches);
