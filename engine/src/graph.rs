//! Job graphs: the tasks of a job and the edges between them, as plain data.
//!
//! A job type's planner turns a job spec into a [`JobGraph`]; the masters place its tasks
//! (tasks sharing a [`TaskNode::group`] land on the same executor, so edges inside a group are
//! in-process queues), and each executor instantiates the tasks placed on it, wiring an edge as
//! an in-process [`edge`](crate::edge) when both ends are local and through an
//! [`Exchange`](crate::Exchange) otherwise. Planning is deterministic: every node computes the
//! same graph from the same spec.

/// One task of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskNode {
    /// Name, unique in the job (e.g. `producer-3`).
    pub name: String,
    /// Slots the task occupies on an executor.
    pub cost: u32,
    /// Co-location group: all tasks of a group run on one executor.
    pub group: Option<u64>,
    /// A group this task's group should not share an executor with, when possible.
    pub avoid_group: Option<u64>,
}

/// A directed edge between two tasks of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeNode {
    /// Edge id, unique in the job (its index in [`JobGraph::edges`]).
    pub id: u32,
    /// Index of the producing task in [`JobGraph::tasks`].
    pub from: u32,
    /// Index of the consuming task.
    pub to: u32,
}

/// The tasks of a job and their edges. A task's outputs are its outgoing edges in edge-id
/// order; its inputs are its incoming edges in edge-id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobGraph {
    /// Tasks, by index.
    pub tasks: Vec<TaskNode>,
    /// Edges, by id.
    pub edges: Vec<EdgeNode>,
}

impl JobGraph {
    /// Adds a task and returns its index.
    pub fn add_task(
        &mut self,
        name: impl Into<String>,
        cost: u32,
        group: Option<u64>,
        avoid_group: Option<u64>,
    ) -> u32 {
        self.tasks.push(TaskNode {
            name: name.into(),
            cost,
            group,
            avoid_group,
        });
        (self.tasks.len() - 1) as u32
    }

    /// Adds an edge `from → to` and returns its id.
    pub fn connect(&mut self, from: u32, to: u32) -> u32 {
        let id = self.edges.len() as u32;
        self.edges.push(EdgeNode { id, from, to });
        id
    }

    /// Outgoing edges of `task`, in output-port order.
    pub fn outputs(&self, task: u32) -> impl Iterator<Item = &EdgeNode> {
        self.edges.iter().filter(move |e| e.from == task)
    }

    /// Incoming edges of `task`, in input-port order.
    pub fn inputs(&self, task: u32) -> impl Iterator<Item = &EdgeNode> {
        self.edges.iter().filter(move |e| e.to == task)
    }

    /// Checks that every edge names existing tasks and that names are unique.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.tasks.len() as u32;
        for e in &self.edges {
            if e.from >= n || e.to >= n {
                return Err(format!("edge {} names a task that does not exist", e.id));
            }
            if e.from == e.to {
                return Err(format!("edge {} connects task {} to itself", e.id, e.from));
            }
        }
        let mut names: Vec<&str> = self.tasks.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("task name {} is used twice", w[0]));
        }
        if let Some(t) = self.tasks.iter().find(|t| t.cost == 0) {
            return Err(format!("task {} has cost 0", t.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_edge_order_and_validation_catches_errors() {
        let mut g = JobGraph::default();
        let a = g.add_task("a", 1, None, None);
        let b = g.add_task("b", 1, Some(1), None);
        let c = g.add_task("c", 1, Some(1), None);
        g.connect(a, b);
        g.connect(a, c);
        g.connect(b, c);
        assert_eq!(g.outputs(a).map(|e| e.to).collect::<Vec<_>>(), vec![b, c]);
        assert_eq!(g.inputs(c).map(|e| e.from).collect::<Vec<_>>(), vec![a, b]);
        g.validate().unwrap();
        g.connect(c, 9);
        assert!(g.validate().unwrap_err().contains("does not exist"));
        let mut dup = JobGraph::default();
        dup.add_task("x", 1, None, None);
        dup.add_task("x", 1, None, None);
        assert!(dup.validate().unwrap_err().contains("twice"));
    }
}
