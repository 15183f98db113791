//! The demo job's task graph: which tasks exist, how they are grouped, how they connect.
//!
//! [`plan`] is deterministic: every master and executor computes the same [`JobGraph`] from
//! the same [`DemoSpec`]. Tasks are named `producer-<t>`, `binlog-<i>`, `receive-<i>`,
//! `syncer-<i>` and `sink-<i>`; [`TaskKind::parse`] reads a name back.
//!
//! Placement hints: group [`GROUP_SOURCES`] holds all producers and binlogs (so the
//! producer → binlog edges are in-process queues); group [`GROUP_SYNC`] holds every receive,
//! syncer and sink (so the syncers share one process and run their barrier in memory) and
//! asks to avoid group [`GROUP_SOURCES`], so that with two or more executors the
//! binlog → receive edges cross the network.

use std::fmt;

use microcosm_engine::graph::JobGraph;

use crate::spec::DemoSpec;

/// Co-location group of the producers and binlogs.
pub const GROUP_SOURCES: u64 = 1;
/// Co-location group of the receivers, syncers and sinks.
pub const GROUP_SYNC: u64 = 2;

/// What a task of the demo job does, and its index (table for producers, stream otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// `producer-<table>`: emits table `table`'s records.
    Producer(u32),
    /// `binlog-<stream>`: merges the producers' records for one stream into a log.
    Binlog(u32),
    /// `receive-<stream>`: reads a binlog (usually over the network).
    Receive(u32),
    /// `syncer-<stream>`: passes records, holding DDLs at the barrier.
    Syncer(u32),
    /// `sink-<stream>`: writes `sink_<stream>.csv`.
    Sink(u32),
}

impl TaskKind {
    /// Parses a task name such as `syncer-2`. Rejects unknown prefixes and indices that
    /// are not canonical decimals (`syncer-02`, `syncer-+2`).
    pub fn parse(name: &str) -> Option<TaskKind> {
        let (prefix, index) = name.rsplit_once('-')?;
        let canonical = !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
            && (index == "0" || !index.starts_with('0'));
        if !canonical {
            return None;
        }
        let index: u32 = index.parse().ok()?;
        Some(match prefix {
            "producer" => TaskKind::Producer(index),
            "binlog" => TaskKind::Binlog(index),
            "receive" => TaskKind::Receive(index),
            "syncer" => TaskKind::Syncer(index),
            "sink" => TaskKind::Sink(index),
            _ => return None,
        })
    }

    /// The table (producer) or stream index.
    pub fn index(self) -> u32 {
        match self {
            TaskKind::Producer(i)
            | TaskKind::Binlog(i)
            | TaskKind::Receive(i)
            | TaskKind::Syncer(i)
            | TaskKind::Sink(i) => i,
        }
    }
}

impl fmt::Display for TaskKind {
    /// The task name, e.g. `sink-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self {
            TaskKind::Producer(_) => "producer",
            TaskKind::Binlog(_) => "binlog",
            TaskKind::Receive(_) => "receive",
            TaskKind::Syncer(_) => "syncer",
            TaskKind::Sink(_) => "sink",
        };
        write!(f, "{prefix}-{}", self.index())
    }
}

/// Why a graph task could not be classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The index names no task of the graph.
    #[error("task index {index} is out of range (the graph has {tasks} tasks)")]
    NoSuchTask {
        /// The index asked for.
        index: u32,
        /// How many tasks the graph has.
        tasks: usize,
    },
    /// The task's name is not one the demo planner gives.
    #[error("task {index} is named {name:?}, which is not a demo task name")]
    UnknownName {
        /// The task index.
        index: u32,
        /// Its name.
        name: String,
    },
}

/// Builds the demo job's graph: `T + 4S` tasks of cost 1 and `T·S + 3S` edges.
///
/// Task indices: producers `0..T`, then per stream `i` the four tasks binlog, receive,
/// syncer, sink. Edges: `producer_t → binlog_s` for every `(t, s)` (t-major, so producer
/// `t`'s output port `s` leads to binlog `s` and binlog `s`'s input port `t` comes from
/// producer `t`), then `binlog_i → receive_i → syncer_i → sink_i`.
pub fn plan(spec: &DemoSpec) -> JobGraph {
    let mut graph = JobGraph::default();
    let producers: Vec<u32> = (0..spec.table_num)
        .map(|t| {
            graph.add_task(
                TaskKind::Producer(t).to_string(),
                1,
                Some(GROUP_SOURCES),
                None,
            )
        })
        .collect();
    let mut chains = Vec::with_capacity(spec.binlog_num as usize);
    for i in 0..spec.binlog_num {
        let binlog = graph.add_task(
            TaskKind::Binlog(i).to_string(),
            1,
            Some(GROUP_SOURCES),
            None,
        );
        let [receive, syncer, sink] =
            [TaskKind::Receive(i), TaskKind::Syncer(i), TaskKind::Sink(i)].map(|kind| {
                graph.add_task(kind.to_string(), 1, Some(GROUP_SYNC), Some(GROUP_SOURCES))
            });
        chains.push([binlog, receive, syncer, sink]);
    }
    for &producer in &producers {
        for &[binlog, ..] in &chains {
            graph.connect(producer, binlog);
        }
    }
    for &[binlog, receive, syncer, sink] in &chains {
        graph.connect(binlog, receive);
        graph.connect(receive, syncer);
        graph.connect(syncer, sink);
    }
    graph
}

/// Indices of the tasks of `graph` in co-location group `group` (e.g. [`GROUP_SOURCES`]).
pub fn tasks_in_group(graph: &JobGraph, group: u64) -> Vec<u32> {
    (0u32..)
        .zip(&graph.tasks)
        .filter(|(_, t)| t.group == Some(group))
        .map(|(i, _)| i)
        .collect()
}

/// Classifies task `index` of `graph` by its name.
pub fn task_kind(graph: &JobGraph, index: u32) -> Result<TaskKind, PlanError> {
    let node = graph
        .tasks
        .get(index as usize)
        .ok_or(PlanError::NoSuchTask {
            index,
            tasks: graph.tasks.len(),
        })?;
    TaskKind::parse(&node.name).ok_or_else(|| PlanError::UnknownName {
        index,
        name: node.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tables: u32, streams: u32) -> DemoSpec {
        DemoSpec {
            table_num: tables,
            binlog_num: streams,
            ..DemoSpec::default()
        }
    }

    #[test]
    fn graph_has_the_documented_shape() {
        let (t, s) = (3u32, 2u32);
        let graph = plan(&spec(t, s));
        graph.validate().unwrap();
        assert_eq!(graph.tasks.len() as u32, t + 4 * s);
        assert_eq!(graph.edges.len() as u32, t * s + 3 * s);
        assert!(graph.tasks.iter().all(|n| n.cost == 1));
        for (index, node) in (0u32..).zip(&graph.tasks) {
            let kind = task_kind(&graph, index).unwrap();
            assert_eq!(kind.to_string(), node.name);
            match kind {
                TaskKind::Producer(_) | TaskKind::Binlog(_) => {
                    assert_eq!((node.group, node.avoid_group), (Some(GROUP_SOURCES), None));
                }
                _ => assert_eq!(
                    (node.group, node.avoid_group),
                    (Some(GROUP_SYNC), Some(GROUP_SOURCES))
                ),
            }
            let outs: Vec<TaskKind> = graph
                .outputs(index)
                .map(|e| task_kind(&graph, e.to).unwrap())
                .collect();
            let ins: Vec<TaskKind> = graph
                .inputs(index)
                .map(|e| task_kind(&graph, e.from).unwrap())
                .collect();
            match kind {
                TaskKind::Producer(_) => {
                    assert!(ins.is_empty());
                    assert_eq!(outs, (0..s).map(TaskKind::Binlog).collect::<Vec<_>>());
                }
                TaskKind::Binlog(i) => {
                    assert_eq!(ins, (0..t).map(TaskKind::Producer).collect::<Vec<_>>());
                    assert_eq!(outs, vec![TaskKind::Receive(i)]);
                }
                TaskKind::Receive(i) => {
                    assert_eq!(
                        (ins, outs),
                        (vec![TaskKind::Binlog(i)], vec![TaskKind::Syncer(i)])
                    );
                }
                TaskKind::Syncer(i) => {
                    assert_eq!(
                        (ins, outs),
                        (vec![TaskKind::Receive(i)], vec![TaskKind::Sink(i)])
                    );
                }
                TaskKind::Sink(i) => {
                    assert_eq!((ins, outs), (vec![TaskKind::Syncer(i)], vec![]));
                }
            }
        }
        assert_eq!(plan(&spec(t, s)), graph, "planning is deterministic");
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(TaskKind::parse("producer-0"), Some(TaskKind::Producer(0)));
        assert_eq!(TaskKind::parse("sink-1023"), Some(TaskKind::Sink(1023)));
        for bad in [
            "sink",
            "sink-",
            "sink-01",
            "sink-+1",
            "sink-x",
            "mystery-1",
            "sink-99999999999",
        ] {
            assert_eq!(TaskKind::parse(bad), None, "{bad}");
        }
        let graph = plan(&spec(1, 1));
        assert!(matches!(
            task_kind(&graph, 99),
            Err(PlanError::NoSuchTask { .. })
        ));
        let mut odd = JobGraph::default();
        odd.add_task("mystery", 1, None, None);
        assert!(matches!(
            task_kind(&odd, 0),
            Err(PlanError::UnknownName { .. })
        ));
    }
}
