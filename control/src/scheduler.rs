//! Task placement: a pure function from demands and offers to placements.
//!
//! The leader master calls [`schedule`] with every task of one job ([`TaskDemand`]) and the free
//! capacity of every live executor ([`ExecutorOffer`]); it gets back one [`Placement`] per task
//! or an [`Unschedulable`] reason, and places nothing in the latter case (all-or-nothing per
//! job). The function does no I/O and keeps no state: the same input always gives the same
//! output, whatever order the executors are listed in.
//!
//! # Placement rules
//! - Tasks that share a co-location [`GroupId`] (tasks joined by in-process edges) form one
//!   unit whose cost is the sum of its tasks' costs, and land on one executor.
//! - Groups are placed first, largest first (first-fit decreasing), each onto the executor with
//!   the most free slots; tasks outside any group follow, also largest first, and so spread
//!   over the executors with the most free slots. Ties go to the lower executor id, then to the
//!   lower group or task id.
//! - [`TaskDemand::avoid_group`] is a soft anti-affinity: the unit prefers an executor that
//!   hosts none of the groups it avoids, and for groups the preference is symmetric (if group A
//!   avoids B, B also avoids A, whichever is placed second). When every executor that fits is
//!   avoided, the unit is placed anyway.
//! - When spreading leaves no executor big enough for a later unit although the cluster had
//!   room, the placement is retried with best fit (the smallest executor that fits), which
//!   packs tighter; only if that also fails is the job reported as fragmented.
//!
//! Placement costs `O(u log e)` for `u` units on `e` executors (a [`BinaryHeap`] keyed by free
//! slots, or a [`BTreeSet`] for best fit), plus sorting the units.
//!
//! The masters' leader derives each executor's free slots from the placements in the
//! replicated metadata (a live job holds the slots of its tasks placed on live executors, each
//! task as many as its cost, unless the job's last placement attempt found no capacity), so a newly elected leader needs no
//! ledger of its own. [`Reservations`] is such a
//! ledger for callers that schedule without that metadata (reserve after [`schedule`], release
//! when a job ends, is cancelled, or its placement fails).

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};

use serde::{Deserialize, Serialize};

/// Identifies a co-location group within one job: tasks with the same group share an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What one task needs from the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskDemand {
    /// The task's id, unique within the job.
    pub task: u64,
    /// Slots the task occupies; must be at least 1.
    pub cost: u32,
    /// Co-location group: every task of a group lands on the same executor.
    pub group: Option<GroupId>,
    /// Soft anti-affinity: prefer an executor that does not host this group.
    pub avoid_group: Option<GroupId>,
}

impl TaskDemand {
    /// A task outside any group, with no anti-affinity.
    pub fn single(task: u64, cost: u32) -> Self {
        Self {
            task,
            cost,
            group: None,
            avoid_group: None,
        }
    }

    /// A task in co-location group `group`, with no anti-affinity.
    pub fn grouped(task: u64, cost: u32, group: GroupId) -> Self {
        Self {
            task,
            cost,
            group: Some(group),
            avoid_group: None,
        }
    }

    /// The same demand, preferring an executor that does not host `group`.
    #[must_use]
    pub fn avoiding(self, group: GroupId) -> Self {
        Self {
            avoid_group: Some(group),
            ..self
        }
    }
}

/// What one live executor can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExecutorOffer {
    /// The executor's id, unique in the cluster.
    pub executor: u64,
    /// Slots not yet reserved; at most `total_slots`.
    pub free_slots: u32,
    /// All slots of the executor.
    pub total_slots: u32,
}

/// One task assigned to one executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// The task placed.
    pub task: u64,
    /// The executor that runs it.
    pub executor: u64,
    /// Slots the task occupies there (its [`TaskDemand::cost`]).
    pub slots: u32,
}

/// The thing that could not be placed: one task, or a whole co-location group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Subject {
    /// A task outside any group.
    Task(u64),
    /// A co-location group (placed as one unit).
    Group(GroupId),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Task(task) => write!(f, "task {task}"),
            Self::Group(group) => write!(f, "group {group}"),
        }
    }
}

/// Why a job could not be placed; nothing of the job was placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unschedulable {
    /// The job has tasks but the cluster has no executor.
    #[error("no executors registered")]
    NoExecutors,
    /// The job's tasks need more slots than all executors have free together.
    #[error("job needs {needed} slots in total, the cluster has {free} free")]
    InsufficientCapacity {
        /// Slots the whole job needs.
        needed: u64,
        /// Free slots summed over all executors.
        free: u64,
    },
    /// One task or group needs more slots than any single executor has free.
    #[error(
        "{subject} needs {needed} slots, the largest free capacity is {largest_free} on executor {executor}"
    )]
    TooLarge {
        /// The task or group.
        subject: Subject,
        /// Slots it needs (a group's is the sum of its tasks').
        needed: u64,
        /// The most free slots of any executor.
        largest_free: u32,
        /// The executor with that many free slots (the lowest id among equals).
        executor: u64,
    },
    /// Every unit fits somewhere on its own and the total fits, but no packing was found.
    #[error(
        "{subject} needs {needed} slots, but after placing larger demands the largest free \
         capacity left is {largest_free} on executor {executor}; the cluster's free slots are \
         too fragmented"
    )]
    Fragmented {
        /// The first task or group that found no room.
        subject: Subject,
        /// Slots it needs.
        needed: u64,
        /// The most free slots left on any executor at that point.
        largest_free: u32,
        /// The executor with that many free slots left.
        executor: u64,
    },
    /// A task asked for zero slots.
    #[error("task {task} has cost 0; every task needs at least 1 slot")]
    ZeroCost {
        /// The task.
        task: u64,
    },
    /// Two demands carry the same task id.
    #[error("task {task} appears more than once in the job")]
    DuplicateTask {
        /// The repeated task id.
        task: u64,
    },
    /// Two offers carry the same executor id.
    #[error("executor {executor} is offered more than once")]
    DuplicateExecutor {
        /// The repeated executor id.
        executor: u64,
    },
    /// An offer claims more free slots than the executor has.
    #[error(
        "executor {executor} offers {free_slots} free slots but has only {total_slots} in total"
    )]
    InvalidOffer {
        /// The executor.
        executor: u64,
        /// Free slots offered.
        free_slots: u32,
        /// Total slots of the executor.
        total_slots: u32,
    },
}

/// A placement unit: one group, or one task outside any group.
#[derive(Debug)]
struct Unit {
    subject: Subject,
    cost: u64,
    /// Units (indices) whose executors this unit prefers to avoid; deduplicated, never itself.
    avoid: Vec<usize>,
}

/// One executor during packing.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    free: u32,
}

/// How [`pack`] chooses among executors that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// The executor with the most free slots.
    Spread,
    /// The executor with the fewest free slots that still fit.
    BestFit,
}

/// Places every task of one job, or nothing.
///
/// Returns one [`Placement`] per demand, in the order of `tasks`. An empty `tasks` gives an
/// empty placement whatever the executors. Executors with no free slots are never chosen.
/// See the [module docs](self) for the rules.
///
/// # Errors
/// [`Unschedulable`] says why the job cannot be placed (no executors, not enough capacity in
/// total or on any one executor, fragmentation) or why the input is invalid (a cost of zero,
/// a repeated task or executor id, an offer with more free than total slots).
pub fn schedule(
    tasks: &[TaskDemand],
    executors: &[ExecutorOffer],
) -> Result<Vec<Placement>, Unschedulable> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let slots = validate_offers(executors)?;
    let (units, unit_of_task) = build_units(tasks)?;
    if slots.is_empty() {
        return Err(Unschedulable::NoExecutors);
    }

    let needed: u64 = units.iter().map(|unit| unit.cost).sum();
    let free: u64 = slots.iter().map(|slot| u64::from(slot.free)).sum();
    if needed > free {
        return Err(Unschedulable::InsufficientCapacity { needed, free });
    }
    let largest = largest(&slots);
    if let Some(unit) = units
        .iter()
        .find(|unit| unit.cost > u64::from(largest.free))
    {
        return Err(Unschedulable::TooLarge {
            subject: unit.subject,
            needed: unit.cost,
            largest_free: largest.free,
            executor: largest.id,
        });
    }

    let order = placement_order(&units);
    let executor_of_unit = match pack(&units, &order, &slots, Fit::Spread) {
        Ok(assigned) => assigned,
        Err(spread_failure) => pack(&units, &order, &slots, Fit::BestFit)
            .map_err(|_| spread_failure.into_error(&units))?,
    };

    Ok(tasks
        .iter()
        .zip(unit_of_task)
        .map(|(demand, unit)| Placement {
            task: demand.task,
            executor: slots[executor_of_unit[unit]].id,
            slots: demand.cost,
        })
        .collect())
}

/// Checks the offers and returns them sorted by id.
fn validate_offers(executors: &[ExecutorOffer]) -> Result<Vec<Slot>, Unschedulable> {
    let mut slots = Vec::with_capacity(executors.len());
    for offer in executors {
        if offer.free_slots > offer.total_slots {
            return Err(Unschedulable::InvalidOffer {
                executor: offer.executor,
                free_slots: offer.free_slots,
                total_slots: offer.total_slots,
            });
        }
        slots.push(Slot {
            id: offer.executor,
            free: offer.free_slots,
        });
    }
    slots.sort_unstable_by_key(|slot| slot.id);
    if let Some(pair) = slots.windows(2).find(|pair| pair[0].id == pair[1].id) {
        return Err(Unschedulable::DuplicateExecutor {
            executor: pair[0].id,
        });
    }
    Ok(slots)
}

/// Groups the demands into units; returns the units and, per demand, the index of its unit.
fn build_units(tasks: &[TaskDemand]) -> Result<(Vec<Unit>, Vec<usize>), Unschedulable> {
    let hasher = IdHashBuilder::new();
    let mut units: Vec<Unit> = Vec::with_capacity(tasks.len());
    let mut unit_of_task = Vec::with_capacity(tasks.len());
    let mut unit_of_group: HashMap<GroupId, usize, IdHashBuilder> = HashMap::with_hasher(hasher);
    let mut seen: HashSet<u64, IdHashBuilder> =
        HashSet::with_capacity_and_hasher(tasks.len(), hasher);
    // (unit, avoided group) pairs; rare, resolved once every group is known.
    let mut avoidances: Vec<(usize, GroupId)> = Vec::new();
    for demand in tasks {
        if demand.cost == 0 {
            return Err(Unschedulable::ZeroCost { task: demand.task });
        }
        if !seen.insert(demand.task) {
            return Err(Unschedulable::DuplicateTask { task: demand.task });
        }
        let index = match demand.group {
            Some(group) => *unit_of_group.entry(group).or_insert_with(|| {
                units.push(Unit {
                    subject: Subject::Group(group),
                    cost: 0,
                    avoid: Vec::new(),
                });
                units.len() - 1
            }),
            None => {
                units.push(Unit {
                    subject: Subject::Task(demand.task),
                    cost: 0,
                    avoid: Vec::new(),
                });
                units.len() - 1
            }
        };
        units[index].cost += u64::from(demand.cost);
        if let Some(avoided) = demand.avoid_group {
            avoidances.push((index, avoided));
        }
        unit_of_task.push(index);
    }

    // Anti-affinity between groups is symmetric: whichever group is placed second avoids the
    // first. A unit never avoids itself, and groups absent from the job are ignored (nothing of
    // theirs gets placed).
    for (unit, avoided) in avoidances {
        let Some(&other) = unit_of_group.get(&avoided) else {
            continue;
        };
        if other == unit {
            continue;
        }
        if !units[unit].avoid.contains(&other) {
            units[unit].avoid.push(other);
        }
        if matches!(units[unit].subject, Subject::Group(_)) && !units[other].avoid.contains(&unit) {
            units[other].avoid.push(unit);
        }
    }
    Ok((units, unit_of_task))
}

/// The order units are placed in: groups before single tasks, each largest first, ties by id.
fn placement_order(units: &[Unit]) -> Vec<usize> {
    let mut keyed: Vec<(bool, Reverse<u64>, u64, usize)> = units
        .iter()
        .enumerate()
        .map(|(index, unit)| match unit.subject {
            Subject::Group(group) => (false, Reverse(unit.cost), group.0, index),
            Subject::Task(task) => (true, Reverse(unit.cost), task, index),
        })
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, _, index)| index).collect()
}

/// Builds the hashers for the id-keyed maps used while placing.
///
/// Keys are ids from job specs, so the hash is seeded per call from the standard library's
/// random keys (a crafted set of ids cannot force collisions without knowing the seed); the
/// mixing is one splitmix64 finaliser round, much cheaper than SipHash for one `u64`. The
/// seed never influences the result: the maps are only looked up, never iterated.
#[derive(Debug, Clone, Copy)]
struct IdHashBuilder(u64);

impl IdHashBuilder {
    fn new() -> Self {
        Self(RandomState::new().hash_one(0x6d69_6372_6f63_6f73_u64))
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

/// See [`IdHashBuilder`].
#[derive(Debug, Clone, Copy)]
struct IdHasher(u64);

impl IdHasher {
    fn mix(&mut self, value: u64) {
        let mut z = self.0 ^ value;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0_u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }
}

/// The executor with the most free slots, the lowest id among equals. `slots` is non-empty
/// and sorted by id.
fn largest(slots: &[Slot]) -> Slot {
    slots
        .iter()
        .copied()
        .reduce(|best, slot| if slot.free > best.free { slot } else { best })
        .unwrap_or(Slot { id: 0, free: 0 })
}

/// A unit that found no executor during [`pack`].
#[derive(Debug)]
struct PackFailure {
    unit: usize,
    largest: Slot,
}

impl PackFailure {
    fn into_error(self, units: &[Unit]) -> Unschedulable {
        let unit = &units[self.unit];
        Unschedulable::Fragmented {
            subject: unit.subject,
            needed: unit.cost,
            largest_free: self.largest.free,
            executor: self.largest.id,
        }
    }
}

/// Assigns every unit, in `order`, to an executor (an index into `slots`).
fn pack(
    units: &[Unit],
    order: &[usize],
    slots: &[Slot],
    strategy: Fit,
) -> Result<Vec<usize>, PackFailure> {
    let mut pool = Pool::new(slots, strategy);
    let mut executor_of_unit = vec![usize::MAX; units.len()];
    let mut avoided = Vec::new();
    for &index in order {
        let unit = &units[index];
        avoided.clear();
        avoided.extend(
            unit.avoid
                .iter()
                .map(|&other| executor_of_unit[other])
                .filter(|&executor| executor != usize::MAX),
        );
        // Costs were checked against the largest free capacity, which is a u32.
        let cost = u32::try_from(unit.cost).unwrap_or(u32::MAX);
        let Some(executor) = pool.take(cost, &avoided) else {
            return Err(PackFailure {
                unit: index,
                largest: pool.largest(slots),
            });
        };
        executor_of_unit[index] = executor;
    }
    Ok(executor_of_unit)
}

/// The executors' remaining free slots during packing, indexed for the chosen strategy.
enum Pool {
    /// Max-heap on (free, lowest index): the top is the executor with the most free slots,
    /// the lowest id among equals (slots are sorted by id).
    Spread(BinaryHeap<(u32, Reverse<usize>)>),
    /// Ordered by (free, id): the first entry at or above a cost is the tightest fit.
    BestFit(BTreeSet<(u32, u64, usize)>),
}

impl Pool {
    fn new(slots: &[Slot], strategy: Fit) -> Self {
        let usable = slots.iter().enumerate().filter(|(_, slot)| slot.free > 0);
        match strategy {
            Fit::Spread => Self::Spread(
                usable
                    .map(|(index, slot)| (slot.free, Reverse(index)))
                    .collect(),
            ),
            Fit::BestFit => Self::BestFit(
                usable
                    .map(|(index, slot)| (slot.free, slot.id, index))
                    .collect(),
            ),
        }
    }

    /// Takes `cost` slots from the chosen executor that fits, preferring one whose index is not
    /// in `avoided`; returns its index, or `None` when no executor fits.
    fn take(&mut self, cost: u32, avoided: &[usize]) -> Option<usize> {
        match self {
            Self::Spread(heap) => {
                let mut top = heap.peek_mut()?;
                if top.0 < cost {
                    return None;
                }
                let Reverse(index) = top.1;
                if !avoided.contains(&index) {
                    // The common case: take from the top in place (one sift-down).
                    if top.0 == cost {
                        PeekMut::pop(top);
                    } else {
                        top.0 -= cost;
                    }
                    return Some(index);
                }
                drop(top);
                // Pop past avoided executors (at most `avoided.len()` of them) to the best
                // one that is not avoided; fall back to the first popped if none fits.
                let mut popped = Vec::new();
                let mut chosen = None;
                while let Some(entry) = heap.pop() {
                    if entry.0 < cost {
                        heap.push(entry);
                        break;
                    }
                    if avoided.contains(&entry.1.0) {
                        popped.push(entry);
                    } else {
                        chosen = Some(entry);
                        break;
                    }
                }
                let chosen = match chosen {
                    Some(entry) => Some(entry),
                    None if popped.is_empty() => None,
                    None => Some(popped.remove(0)),
                };
                heap.extend(popped);
                let (free, Reverse(index)) = chosen?;
                if free > cost {
                    heap.push((free - cost, Reverse(index)));
                }
                Some(index)
            }
            Self::BestFit(set) => {
                let (free, id, index) = {
                    let mut fitting = set.range((cost, 0, 0)..);
                    let first = fitting.next().copied()?;
                    if avoided.contains(&first.2) {
                        fitting
                            .find(|entry| !avoided.contains(&entry.2))
                            .copied()
                            .unwrap_or(first)
                    } else {
                        first
                    }
                };
                set.remove(&(free, id, index));
                if free > cost {
                    set.insert((free - cost, id, index));
                }
                Some(index)
            }
        }
    }

    /// The executor with the most free slots left (lowest id among equals).
    fn largest(&self, slots: &[Slot]) -> Slot {
        let best = match self {
            Self::Spread(heap) => heap
                .peek()
                .map(|&(free, Reverse(index))| (free, slots[index].id)),
            Self::BestFit(set) => {
                set.iter()
                    .next_back()
                    .map(|&(free, _, _)| free)
                    .and_then(|free| {
                        set.range((free, 0, 0)..)
                            .next()
                            .map(|&(free, id, _)| (free, id))
                    })
            }
        };
        match best {
            Some((free, id)) => Slot { id, free },
            // Every executor is full: report the lowest id with nothing free.
            None => Slot {
                id: slots.first().map_or(0, |slot| slot.id),
                free: 0,
            },
        }
    }
}

/// A ledger of slots held on each executor by each job, for scheduling without the masters'
/// metadata (the leader counts placements in the metadata instead; see the module docs).
///
/// Reserve a job's placements after [`schedule`] succeeds and release them when the job ends,
/// is cancelled, or a placement fails; when an executor is lost its reservations go with it.
/// Each executor's free slots for the next [`ExecutorOffer`] come from
/// [`Reservations::free_slots`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservations {
    /// executor → job → reserved slots.
    by_executor: BTreeMap<u64, BTreeMap<u64, u64>>,
    /// job → executors on which it holds slots.
    by_job: BTreeMap<u64, BTreeSet<u64>>,
}

impl Reservations {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `placements` of `job` to the ledger; reservations the job already holds are kept,
    /// so recovering a job reserves only its re-placed tasks.
    pub fn reserve(&mut self, job: u64, placements: &[Placement]) {
        for placement in placements {
            *self
                .by_executor
                .entry(placement.executor)
                .or_default()
                .entry(job)
                .or_default() += u64::from(placement.slots);
            self.by_job
                .entry(job)
                .or_default()
                .insert(placement.executor);
        }
    }

    /// Drops every reservation of `job`; returns the number of slots released.
    pub fn release_job(&mut self, job: u64) -> u64 {
        let Some(executors) = self.by_job.remove(&job) else {
            return 0;
        };
        let mut released = 0;
        for executor in executors {
            if let Some(jobs) = self.by_executor.get_mut(&executor) {
                released += jobs.remove(&job).unwrap_or(0);
                if jobs.is_empty() {
                    self.by_executor.remove(&executor);
                }
            }
        }
        released
    }

    /// Drops every reservation on `executor` (it was lost or removed); returns the jobs that
    /// held slots there, in ascending order. Those jobs keep their other reservations.
    pub fn release_executor(&mut self, executor: u64) -> Vec<u64> {
        let Some(jobs) = self.by_executor.remove(&executor) else {
            return Vec::new();
        };
        for job in jobs.keys() {
            if let Some(executors) = self.by_job.get_mut(job) {
                executors.remove(&executor);
                if executors.is_empty() {
                    self.by_job.remove(job);
                }
            }
        }
        jobs.into_keys().collect()
    }

    /// Slots reserved on `executor` by all jobs.
    pub fn reserved(&self, executor: u64) -> u64 {
        self.by_executor
            .get(&executor)
            .map_or(0, |jobs| jobs.values().sum())
    }

    /// Slots reserved by `job` on `executor`.
    pub fn reserved_by(&self, job: u64, executor: u64) -> u64 {
        self.by_executor
            .get(&executor)
            .and_then(|jobs| jobs.get(&job))
            .copied()
            .unwrap_or(0)
    }

    /// Free slots of an executor with `total` slots: `total` less what is reserved, never
    /// below zero.
    pub fn free_slots(&self, executor: u64, total: u32) -> u32 {
        let reserved = u32::try_from(self.reserved(executor)).unwrap_or(u32::MAX);
        total.saturating_sub(reserved)
    }

    /// Whether no slot is reserved anywhere.
    pub fn is_empty(&self) -> bool {
        self.by_executor.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn offer(executor: u64, free_slots: u32, total_slots: u32) -> ExecutorOffer {
        ExecutorOffer {
            executor,
            free_slots,
            total_slots,
        }
    }

    fn executor_of(placements: &[Placement], task: u64) -> u64 {
        placements
            .iter()
            .find(|placement| placement.task == task)
            .map(|placement| placement.executor)
            .unwrap()
    }

    /// Slots used per executor by `placements`.
    fn load(placements: &[Placement]) -> BTreeMap<u64, u64> {
        let mut load = BTreeMap::new();
        for placement in placements {
            *load.entry(placement.executor).or_default() += u64::from(placement.slots);
        }
        load
    }

    #[test]
    fn empty_task_list_places_nothing_even_without_executors() {
        assert_eq!(schedule(&[], &[]), Ok(Vec::new()));
        assert_eq!(schedule(&[], &[offer(1, 4, 4)]), Ok(Vec::new()));
    }

    #[test]
    fn no_executors_is_reported() {
        let err = schedule(&[TaskDemand::single(1, 1)], &[]).unwrap_err();
        assert_eq!(err, Unschedulable::NoExecutors);
        assert_eq!(err.to_string(), "no executors registered");
    }

    #[test]
    fn insufficient_total_capacity_is_reported() {
        let tasks = [TaskDemand::single(1, 3), TaskDemand::single(2, 3)];
        let err = schedule(&tasks, &[offer(1, 2, 4), offer(2, 3, 4)]).unwrap_err();
        assert_eq!(
            err,
            Unschedulable::InsufficientCapacity { needed: 6, free: 5 }
        );
        assert_eq!(
            err.to_string(),
            "job needs 6 slots in total, the cluster has 5 free"
        );
    }

    #[test]
    fn group_larger_than_any_executor_is_reported() {
        let g = GroupId(7);
        let tasks = [
            TaskDemand::grouped(1, 2, g),
            TaskDemand::grouped(2, 3, g),
            TaskDemand::single(3, 1),
        ];
        let err = schedule(&tasks, &[offer(1, 3, 8), offer(2, 4, 8), offer(3, 4, 8)]).unwrap_err();
        assert_eq!(
            err,
            Unschedulable::TooLarge {
                subject: Subject::Group(g),
                needed: 5,
                largest_free: 4,
                executor: 2,
            }
        );
        assert_eq!(
            err.to_string(),
            "group 7 needs 5 slots, the largest free capacity is 4 on executor 2"
        );
    }

    #[test]
    fn single_task_larger_than_any_executor_is_reported() {
        let err = schedule(
            &[TaskDemand::single(9, 5), TaskDemand::single(10, 1)],
            &[offer(4, 4, 4), offer(5, 4, 4)],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "task 9 needs 5 slots, the largest free capacity is 4 on executor 4"
        );
    }

    #[test]
    fn invalid_input_is_rejected_without_panicking() {
        assert_eq!(
            schedule(&[TaskDemand::single(1, 0)], &[offer(1, 1, 1)]),
            Err(Unschedulable::ZeroCost { task: 1 })
        );
        assert_eq!(
            schedule(
                &[TaskDemand::single(1, 1), TaskDemand::single(1, 1)],
                &[offer(1, 4, 4)]
            ),
            Err(Unschedulable::DuplicateTask { task: 1 })
        );
        assert_eq!(
            schedule(
                &[TaskDemand::single(1, 1)],
                &[offer(3, 1, 1), offer(3, 2, 2)]
            ),
            Err(Unschedulable::DuplicateExecutor { executor: 3 })
        );
        let err = schedule(&[TaskDemand::single(1, 1)], &[offer(3, 5, 2)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "executor 3 offers 5 free slots but has only 2 in total"
        );
    }

    #[test]
    fn huge_costs_do_not_overflow() {
        let g = GroupId(1);
        let tasks = [
            TaskDemand::grouped(1, u32::MAX, g),
            TaskDemand::grouped(2, u32::MAX, g),
        ];
        let err = schedule(
            &tasks,
            &[offer(1, u32::MAX, u32::MAX), offer(2, u32::MAX, u32::MAX)],
        )
        .unwrap_err();
        assert_eq!(
            err,
            Unschedulable::TooLarge {
                subject: Subject::Group(g),
                needed: 2 * u64::from(u32::MAX),
                largest_free: u32::MAX,
                executor: 1,
            }
        );
    }

    #[test]
    fn full_executors_are_never_chosen() {
        let tasks = [TaskDemand::single(1, 1), TaskDemand::single(2, 1)];
        let placements = schedule(&tasks, &[offer(1, 0, 8), offer(2, 2, 2)]).unwrap();
        assert!(placements.iter().all(|placement| placement.executor == 2));
    }

    #[test]
    fn singles_spread_over_the_most_free_executors() {
        let tasks: Vec<_> = (1..=4).map(|task| TaskDemand::single(task, 1)).collect();
        let executors = [
            offer(10, 4, 4),
            offer(11, 4, 4),
            offer(12, 4, 4),
            offer(13, 4, 4),
        ];
        let placements = schedule(&tasks, &executors).unwrap();
        let used: BTreeSet<u64> = placements.iter().map(|p| p.executor).collect();
        assert_eq!(
            used.len(),
            4,
            "each task on its own executor: {placements:?}"
        );
        // Ties go to the lower executor id, and the order of the result follows the input.
        assert_eq!(
            placements,
            vec![
                Placement {
                    task: 1,
                    executor: 10,
                    slots: 1
                },
                Placement {
                    task: 2,
                    executor: 11,
                    slots: 1
                },
                Placement {
                    task: 3,
                    executor: 12,
                    slots: 1
                },
                Placement {
                    task: 4,
                    executor: 13,
                    slots: 1
                },
            ]
        );
    }

    #[test]
    fn most_free_executor_is_chosen_first() {
        let placements = schedule(
            &[TaskDemand::single(1, 1)],
            &[offer(1, 2, 8), offer(2, 5, 8), offer(3, 3, 8)],
        )
        .unwrap();
        assert_eq!(placements[0].executor, 2);
    }

    #[test]
    fn groups_are_co_located_and_placed_before_singles() {
        let a = GroupId(1);
        let b = GroupId(2);
        let tasks = [
            TaskDemand::single(1, 1),
            TaskDemand::grouped(2, 1, a),
            TaskDemand::grouped(3, 2, a),
            TaskDemand::grouped(4, 1, b),
            TaskDemand::grouped(5, 1, b),
            TaskDemand::grouped(6, 1, a),
        ];
        let placements = schedule(&tasks, &[offer(1, 4, 4), offer(2, 3, 4)]).unwrap();
        // Group a (4 slots) takes executor 1 entirely; group b (2 slots) and the single go to 2.
        for task in [2, 3, 6] {
            assert_eq!(executor_of(&placements, task), 1);
        }
        for task in [1, 4, 5] {
            assert_eq!(executor_of(&placements, task), 2);
        }
    }

    #[test]
    fn avoid_group_separates_groups_when_possible() {
        let binlog = GroupId(1);
        let receive = GroupId(2);
        let tasks = [
            TaskDemand::grouped(1, 1, binlog),
            TaskDemand::grouped(2, 1, binlog),
            TaskDemand::grouped(3, 1, receive).avoiding(binlog),
            TaskDemand::grouped(4, 1, receive),
        ];
        // Executor 1 has room for both groups and would win every tie; anti-affinity moves
        // the second group away.
        let placements = schedule(&tasks, &[offer(1, 8, 8), offer(2, 2, 8)]).unwrap();
        assert_ne!(executor_of(&placements, 1), executor_of(&placements, 3));
        assert_eq!(executor_of(&placements, 1), executor_of(&placements, 2));
        assert_eq!(executor_of(&placements, 3), executor_of(&placements, 4));
    }

    #[test]
    fn avoid_group_is_symmetric() {
        let big = GroupId(1);
        let small = GroupId(2);
        // The small group declares the avoidance, yet the big group is placed first; the
        // small one must still end up elsewhere. And the other way round.
        let tasks = [
            TaskDemand::grouped(1, 3, big),
            TaskDemand::grouped(2, 1, small).avoiding(big),
        ];
        let placements = schedule(&tasks, &[offer(1, 8, 8), offer(2, 1, 8)]).unwrap();
        assert_ne!(executor_of(&placements, 1), executor_of(&placements, 2));
        let tasks = [
            TaskDemand::grouped(1, 3, big).avoiding(small),
            TaskDemand::grouped(2, 1, small),
        ];
        let placements = schedule(&tasks, &[offer(1, 8, 8), offer(2, 1, 8)]).unwrap();
        assert_ne!(executor_of(&placements, 1), executor_of(&placements, 2));
    }

    #[test]
    fn avoid_group_is_soft() {
        let a = GroupId(1);
        let b = GroupId(2);
        let tasks = [
            TaskDemand::grouped(1, 2, a),
            TaskDemand::grouped(2, 2, b).avoiding(a),
        ];
        // One executor: both land there.
        let placements = schedule(&tasks, &[offer(1, 4, 4)]).unwrap();
        assert_eq!(executor_of(&placements, 1), executor_of(&placements, 2));
        // Another executor exists but is too small for b: b shares with a.
        let placements = schedule(&tasks, &[offer(1, 4, 4), offer(2, 1, 4)]).unwrap();
        assert_eq!(executor_of(&placements, 2), 1);
    }

    #[test]
    fn single_task_avoids_a_placed_group() {
        let a = GroupId(1);
        let tasks = [
            TaskDemand::grouped(1, 1, a),
            TaskDemand::single(2, 1).avoiding(a),
        ];
        let placements = schedule(&tasks, &[offer(1, 8, 8), offer(2, 2, 8)]).unwrap();
        assert_eq!(executor_of(&placements, 1), 1);
        assert_eq!(executor_of(&placements, 2), 2);
    }

    #[test]
    fn best_fit_retry_packs_what_spreading_cannot() {
        // Spreading puts 4 on executor 1 (5 free) and 3 on executor 2 (4 free), leaving 1 + 1;
        // best fit puts 4 on executor 2 and 3 + 2 on executor 1.
        let tasks = [
            TaskDemand::single(1, 4),
            TaskDemand::single(2, 3),
            TaskDemand::single(3, 2),
        ];
        let executors = [offer(1, 5, 5), offer(2, 4, 4)];
        let placements = schedule(&tasks, &executors).unwrap();
        assert_eq!(executor_of(&placements, 1), 2);
        assert_eq!(executor_of(&placements, 2), 1);
        assert_eq!(executor_of(&placements, 3), 1);
    }

    #[test]
    fn fragmentation_is_reported() {
        // 6 slots needed, 6 free, but no executor can hold two of the 2-slot groups.
        let tasks: Vec<_> = (1..=3)
            .flat_map(|group| {
                [
                    TaskDemand::grouped(group * 10, 1, GroupId(group)),
                    TaskDemand::grouped(group * 10 + 1, 1, GroupId(group)),
                ]
            })
            .collect();
        let err = schedule(&tasks, &[offer(1, 3, 3), offer(2, 3, 3)]).unwrap_err();
        assert_eq!(
            err,
            Unschedulable::Fragmented {
                subject: Subject::Group(GroupId(3)),
                needed: 2,
                largest_free: 1,
                executor: 1,
            }
        );
        assert!(err.to_string().contains("too fragmented"), "{err}");
    }

    #[test]
    fn result_does_not_depend_on_executor_order() {
        let tasks: Vec<_> = (0..20)
            .map(|task| {
                let demand = TaskDemand::single(task, 1 + (task % 3) as u32);
                if task % 4 == 0 {
                    TaskDemand {
                        group: Some(GroupId(task % 8)),
                        ..demand
                    }
                } else {
                    demand
                }
            })
            .collect();
        let executors: Vec<_> = (0..6)
            .map(|id| offer(id, 6 + (id % 3) as u32 * 2, 10))
            .collect();
        let forward = schedule(&tasks, &executors).unwrap();
        let mut reversed = executors.clone();
        reversed.reverse();
        assert_eq!(forward, schedule(&tasks, &reversed).unwrap());
    }

    #[test]
    fn reservations_track_free_slots_and_release() {
        let mut ledger = Reservations::new();
        assert!(ledger.is_empty());
        ledger.reserve(
            100,
            &[
                Placement {
                    task: 1,
                    executor: 1,
                    slots: 2,
                },
                Placement {
                    task: 2,
                    executor: 1,
                    slots: 1,
                },
                Placement {
                    task: 3,
                    executor: 2,
                    slots: 4,
                },
            ],
        );
        ledger.reserve(
            200,
            &[Placement {
                task: 1,
                executor: 2,
                slots: 3,
            }],
        );
        assert_eq!(ledger.reserved(1), 3);
        assert_eq!(ledger.reserved(2), 7);
        assert_eq!(ledger.reserved_by(100, 2), 4);
        assert_eq!(ledger.free_slots(1, 8), 5);
        assert_eq!(
            ledger.free_slots(2, 5),
            0,
            "over-reserved executors have nothing free"
        );
        assert_eq!(ledger.free_slots(3, 8), 8);

        assert_eq!(ledger.release_executor(2), vec![100, 200]);
        assert_eq!(ledger.free_slots(2, 8), 8);
        assert_eq!(ledger.reserved(1), 3, "job 100 keeps its slots elsewhere");
        assert_eq!(
            ledger.release_job(200),
            0,
            "job 200 held slots only on executor 2"
        );
        assert_eq!(ledger.release_job(100), 3);
        assert!(ledger.is_empty());
        assert_eq!(ledger.release_executor(2), Vec::<u64>::new());
    }

    #[test]
    fn reservations_accumulate_for_recovery() {
        let mut ledger = Reservations::new();
        ledger.reserve(
            1,
            &[Placement {
                task: 1,
                executor: 1,
                slots: 2,
            }],
        );
        ledger.reserve(
            1,
            &[Placement {
                task: 2,
                executor: 1,
                slots: 2,
            }],
        );
        assert_eq!(ledger.reserved_by(1, 1), 4);
        assert_eq!(ledger.release_job(1), 4);
        assert_eq!(ledger.free_slots(1, 4), 4);
    }

    #[test]
    fn scheduling_against_the_ledger_never_over_commits() {
        let totals = [(1_u64, 4_u32), (2, 4)];
        let mut ledger = Reservations::new();
        let offers = |ledger: &Reservations| -> Vec<ExecutorOffer> {
            totals
                .iter()
                .map(|&(id, total)| offer(id, ledger.free_slots(id, total), total))
                .collect()
        };
        let job: Vec<_> = (0..3).map(|task| TaskDemand::single(task, 2)).collect();
        let first = schedule(&job, &offers(&ledger)).unwrap();
        ledger.reserve(1, &first);
        // 2 slots left: a second copy of the job does not fit and nothing is reserved.
        assert!(matches!(
            schedule(&job, &offers(&ledger)),
            Err(Unschedulable::InsufficientCapacity { needed: 6, free: 2 })
        ));
        ledger.release_job(1);
        assert!(schedule(&job, &offers(&ledger)).is_ok());
    }

    fn demands() -> impl Strategy<Value = Vec<TaskDemand>> {
        prop::collection::vec(
            (
                1_u32..4,
                prop::option::of(0_u64..6),
                prop::option::of(0_u64..6),
            ),
            0..30,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(task, (cost, group, avoid))| TaskDemand {
                    task: task as u64,
                    cost,
                    group: group.map(GroupId),
                    avoid_group: avoid.map(GroupId),
                })
                .collect()
        })
    }

    fn offers() -> impl Strategy<Value = Vec<ExecutorOffer>> {
        prop::collection::vec((0_u32..24, 0_u32..4), 0..8).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(id, (free, extra))| offer(id as u64 * 3, free, free + extra))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn placements_are_valid_or_reasons_hold(tasks in demands(), executors in offers()) {
            let result = schedule(&tasks, &executors);
            prop_assert_eq!(&result, &schedule(&tasks, &executors), "deterministic");
            let mut shuffled = executors.clone();
            shuffled.rotate_left(executors.len() / 2);
            prop_assert_eq!(&result, &schedule(&tasks, &shuffled), "independent of offer order");

            let needed: u64 = tasks.iter().map(|t| u64::from(t.cost)).sum();
            let free: u64 = executors.iter().map(|e| u64::from(e.free_slots)).sum();
            match result {
                Ok(placements) => {
                    // Every task exactly once, in input order, with its cost.
                    prop_assert_eq!(placements.len(), tasks.len());
                    for (placement, demand) in placements.iter().zip(&tasks) {
                        prop_assert_eq!(placement.task, demand.task);
                        prop_assert_eq!(placement.slots, demand.cost);
                    }
                    // Never over-commits.
                    for (executor, used) in load(&placements) {
                        let offer = executors.iter().find(|e| e.executor == executor);
                        prop_assert!(offer.is_some(), "unknown executor {}", executor);
                        prop_assert!(used <= u64::from(offer.map_or(0, |o| o.free_slots)));
                    }
                    // Groups co-located.
                    let mut group_executor = HashMap::new();
                    for (placement, demand) in placements.iter().zip(&tasks) {
                        if let Some(group) = demand.group {
                            let first = *group_executor.entry(group).or_insert(placement.executor);
                            prop_assert_eq!(first, placement.executor);
                        }
                    }
                }
                Err(Unschedulable::NoExecutors) => {
                    prop_assert!(!tasks.is_empty() && executors.is_empty());
                }
                Err(Unschedulable::InsufficientCapacity { needed: n, free: f }) => {
                    prop_assert_eq!((n, f), (needed, free));
                    prop_assert!(needed > free);
                }
                Err(Unschedulable::TooLarge { needed: n, largest_free, .. }) => {
                    let max = executors.iter().map(|e| e.free_slots).max().unwrap_or(0);
                    prop_assert_eq!(largest_free, max);
                    prop_assert!(n > u64::from(max));
                }
                Err(Unschedulable::Fragmented { .. }) => {
                    prop_assert!(needed <= free);
                }
                Err(other) => prop_assert!(false, "unexpected error for valid input: {}", other),
            }
        }

        #[test]
        fn avoided_groups_separate_when_two_executors_fit_both(
            cost_a in 1_u32..6,
            cost_b in 1_u32..6,
            frees in prop::collection::vec(0_u32..16, 2..8),
        ) {
            let biggest = cost_a.max(cost_b);
            prop_assume!(frees.iter().filter(|&&free| free >= biggest).count() >= 2);
            let a = GroupId(1);
            let b = GroupId(2);
            let tasks = [
                TaskDemand::grouped(1, cost_a, a),
                TaskDemand::grouped(2, cost_b, b).avoiding(a),
            ];
            let executors: Vec<_> = frees
                .iter()
                .enumerate()
                .map(|(id, &free)| offer(id as u64, free, free))
                .collect();
            let placements = schedule(&tasks, &executors).unwrap();
            prop_assert_ne!(placements[0].executor, placements[1].executor);
        }
    }
}
