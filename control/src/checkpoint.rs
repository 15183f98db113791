//! Completing checkpoints on the leader: a pure tracker of task snapshots.
//!
//! Executors report each task's part of a checkpoint ([`CheckpointReport`]) as the task takes
//! it. The leader feeds the reports to a [`CheckpointTracker`] with what the replicated state
//! says about the job (current epoch, task count, latest committed checkpoint); once every
//! task of the current epoch has reported checkpoint `n` — or finished before it, its last
//! state standing for every later checkpoint — the tracker returns it as [`Complete`] and the
//! leader commits it through raft (`Command::CommitCheckpoint`).
//!
//! The tracker is soft state, kept per raft term: a new leader (or a master leading again in
//! a later term) starts empty, so a checkpoint whose reports went partly to the old leader
//! never completes and is simply superseded by the next one (the commit of a stale epoch or
//! an older id is refused by the state machine anyway). A finished task reports only once,
//! so its executor sends that last report again to the leader of every new term (the term is
//! in every heartbeat answer). Memory is bounded: at most [`MAX_PENDING`] incomplete
//! checkpoints per job are kept.

use std::collections::{BTreeMap, HashMap};

use crate::proto::CheckpointReport;

/// Incomplete checkpoints kept per job; older ones are dropped.
pub const MAX_PENDING: usize = 32;

/// Why a report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The report is from another attempt than the job's current one.
    #[error("job {job}: report of epoch {got}, the current epoch is {current}")]
    StaleEpoch {
        /// The job.
        job: u64,
        /// Epoch in the report.
        got: u64,
        /// The job's epoch.
        current: u64,
    },
    /// The report was read against an older leader term than the tracker already took
    /// reports in (a handler that lost a race with the next leader's first reports).
    #[error("report taken in term {got}, the tracker is in term {current}")]
    StaleTerm {
        /// The term the report came in.
        got: u64,
        /// The tracker's term.
        current: u64,
    },
    /// The task index is not a task of the job.
    #[error("job {job}: no task {index} (the job has {tasks})")]
    UnknownTask {
        /// The job.
        job: u64,
        /// Index in the report.
        index: u32,
        /// Tasks of the job.
        tasks: u32,
    },
}

/// A checkpoint every task has reported: ready to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// The job.
    pub job: u64,
    /// The epoch that took it.
    pub epoch: u64,
    /// Checkpoint id.
    pub checkpoint: u64,
    /// Every task's state, by index `0..tasks`.
    pub states: Vec<(u32, Vec<u8>)>,
}

/// What the replicated state says about a job, as the tracker needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobView {
    /// Current epoch.
    pub epoch: u64,
    /// Number of tasks.
    pub tasks: u32,
    /// Latest committed checkpoint id.
    pub committed: Option<u64>,
}

#[derive(Debug, Default)]
struct JobCheckpoints {
    epoch: u64,
    /// Checkpoint id → task index → state.
    pending: BTreeMap<u64, BTreeMap<u32, Vec<u8>>>,
    /// Finished tasks: index → (checkpoint of the last report, state).
    last: BTreeMap<u32, (u64, Vec<u8>)>,
    /// Highest id committed or handed out for committing.
    done: u64,
}

/// Collects task snapshots per job and epoch; see the [module docs](self).
#[derive(Debug, Default)]
pub struct CheckpointTracker {
    /// The raft term the reports were taken in.
    term: u64,
    jobs: HashMap<u64, JobCheckpoints>,
}

impl CheckpointTracker {
    /// An empty tracker.
    pub fn new() -> CheckpointTracker {
        CheckpointTracker::default()
    }

    /// Takes one report about a job whose replicated state is `view`, by the leader of raft
    /// term `term`. Returns the newest checkpoint the report completed, if any (older
    /// incomplete ones are then dropped). The first report of a newer term forgets every
    /// report taken in older ones; a report of an older term is refused. `view` may be
    /// older than what the tracker saw of the job (two batches read the job before either
    /// took the tracker): a report for an older epoch than the tracker's is refused, so
    /// the tracker never goes back to an earlier attempt.
    pub fn report(
        &mut self,
        report: CheckpointReport,
        view: JobView,
        term: u64,
    ) -> Result<Option<Complete>, ReportError> {
        if term < self.term {
            return Err(ReportError::StaleTerm {
                got: term,
                current: self.term,
            });
        }
        if term > self.term {
            self.jobs.clear();
            self.term = term;
        }
        let job = report.job;
        if report.epoch != view.epoch {
            return Err(ReportError::StaleEpoch {
                job,
                got: report.epoch,
                current: view.epoch,
            });
        }
        if report.index >= view.tasks {
            return Err(ReportError::UnknownTask {
                job,
                index: report.index,
                tasks: view.tasks,
            });
        }
        let entry = self.jobs.entry(job).or_default();
        if entry.epoch > view.epoch {
            return Err(ReportError::StaleEpoch {
                job,
                got: report.epoch,
                current: entry.epoch,
            });
        }
        if entry.epoch != view.epoch {
            *entry = JobCheckpoints {
                epoch: view.epoch,
                ..JobCheckpoints::default()
            };
        }
        entry.done = entry.done.max(view.committed.unwrap_or(0));
        if report.last {
            entry
                .last
                .insert(report.index, (report.checkpoint, report.state));
        } else if report.checkpoint > entry.done {
            entry
                .pending
                .entry(report.checkpoint)
                .or_default()
                .insert(report.index, report.state);
            while entry.pending.len() > MAX_PENDING {
                entry.pending.pop_first();
            }
        }
        let done = entry.done;
        entry.pending.retain(|&id, _| id > done);
        let complete = entry
            .pending
            .iter()
            .rev()
            .find(|(id, states)| {
                (0..view.tasks).all(|i| {
                    states.contains_key(&i) || entry.last.get(&i).is_some_and(|(c, _)| c < *id)
                })
            })
            .map(|(&id, _)| id);
        let Some(id) = complete else {
            return Ok(None);
        };
        let mut states = entry.pending.remove(&id).unwrap_or_default();
        for (&i, (_, state)) in &entry.last {
            states.entry(i).or_insert_with(|| state.clone());
        }
        entry.done = id;
        entry.pending.retain(|&p, _| p > id);
        Ok(Some(Complete {
            job,
            epoch: view.epoch,
            checkpoint: id,
            states: states.into_iter().collect(),
        }))
    }

    /// Takes a batch of reports, in order, by the leader of raft term `term`. `view` gives a
    /// job's replicated state, and is asked once per job of the batch (`None`: the job has
    /// ended; it is forgotten and its reports dropped). Returns, per job, the newest
    /// checkpoint the batch completed (committing it is all that counts; the older ones it
    /// supersedes), and the reports refused.
    pub fn report_batch(
        &mut self,
        reports: Vec<CheckpointReport>,
        term: u64,
        mut view: impl FnMut(u64) -> Option<JobView>,
    ) -> (BTreeMap<u64, Complete>, Vec<ReportError>) {
        let mut views: HashMap<u64, Option<JobView>> = HashMap::new();
        let mut newest: BTreeMap<u64, Complete> = BTreeMap::new();
        let mut refused = Vec::new();
        for report in reports {
            let job = report.job;
            let Some(v) = *views.entry(job).or_insert_with(|| view(job)) else {
                self.forget(job);
                continue;
            };
            match self.report(report, v, term) {
                Ok(Some(done)) => {
                    if newest
                        .get(&job)
                        .is_none_or(|n| done.checkpoint > n.checkpoint)
                    {
                        newest.insert(job, done);
                    }
                }
                Ok(None) => {}
                Err(e) => refused.push(e),
            }
        }
        (newest, refused)
    }

    /// Forgets a job (finished, cancelled or failed).
    pub fn forget(&mut self, job: u64) {
        self.jobs.remove(&job);
    }

    /// Keeps only the jobs `keep` says yes to (the leader drops jobs that ended).
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.jobs.retain(|&job, _| keep(job));
    }

    /// Forgets everything (leadership lost).
    pub fn clear(&mut self) {
        self.jobs.clear();
    }

    /// Incomplete checkpoints held for a job.
    pub fn pending(&self, job: u64) -> usize {
        self.jobs.get(&job).map_or(0, |j| j.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(index: u32, checkpoint: u64, last: bool) -> CheckpointReport {
        CheckpointReport {
            job: 1,
            epoch: 2,
            index,
            checkpoint,
            last,
            state: vec![index as u8, checkpoint as u8],
        }
    }

    /// The leader's term in most tests.
    const T: u64 = 7;

    const VIEW: JobView = JobView {
        epoch: 2,
        tasks: 3,
        committed: None,
    };

    #[test]
    fn a_checkpoint_completes_when_every_task_reported_it() {
        let mut t = CheckpointTracker::new();
        assert_eq!(t.report(r(0, 1, false), VIEW, T), Ok(None));
        assert_eq!(t.report(r(1, 1, false), VIEW, T), Ok(None));
        // Checkpoint 2 starts before 1 completes.
        assert_eq!(t.report(r(0, 2, false), VIEW, T), Ok(None));
        let done = t.report(r(2, 1, false), VIEW, T).unwrap().unwrap();
        assert_eq!(done.checkpoint, 1);
        assert_eq!(
            done.states,
            vec![(0, vec![0, 1]), (1, vec![1, 1]), (2, vec![2, 1])]
        );
        assert_eq!(t.pending(1), 1, "checkpoint 2 still pending");
        // A late report of a completed checkpoint changes nothing.
        assert_eq!(t.report(r(2, 1, false), VIEW, T), Ok(None));
    }

    #[test]
    fn a_finished_task_stands_for_later_checkpoints_with_its_last_state() {
        let mut t = CheckpointTracker::new();
        t.report(r(0, 3, true), VIEW, T).unwrap();
        t.report(r(1, 4, false), VIEW, T).unwrap();
        let done = t.report(r(2, 4, false), VIEW, T).unwrap().unwrap();
        assert_eq!(done.checkpoint, 4);
        assert_eq!(done.states[0], (0, vec![0, 3]));
        // The last state does not stand for its own checkpoint: 3 still needs task 0's
        // regular report (and it is older than the committed 4 anyway).
        assert_eq!(t.report(r(1, 3, false), VIEW, T), Ok(None));
    }

    #[test]
    fn a_newer_complete_checkpoint_supersedes_older_incomplete_ones() {
        let mut t = CheckpointTracker::new();
        t.report(r(0, 1, false), VIEW, T).unwrap();
        for i in 0..2 {
            t.report(r(i, 2, false), VIEW, T).unwrap();
        }
        let done = t.report(r(2, 2, false), VIEW, T).unwrap().unwrap();
        assert_eq!(done.checkpoint, 2);
        assert_eq!(t.pending(1), 0, "checkpoint 1 can never be committed now");
    }

    #[test]
    fn reports_of_other_epochs_and_tasks_are_refused_and_a_new_epoch_starts_clean() {
        let mut t = CheckpointTracker::new();
        t.report(r(0, 5, false), VIEW, T).unwrap();
        let old = CheckpointReport {
            epoch: 1,
            ..r(1, 5, false)
        };
        assert!(matches!(
            t.report(old, VIEW, T),
            Err(ReportError::StaleEpoch { current: 2, .. })
        ));
        assert!(matches!(
            t.report(r(7, 5, false), VIEW, T),
            Err(ReportError::UnknownTask { tasks: 3, .. })
        ));
        let next = JobView {
            epoch: 3,
            committed: Some(4),
            ..VIEW
        };
        let report = |index| CheckpointReport {
            epoch: 3,
            ..r(index, 5, false)
        };
        assert_eq!(t.report(report(1), next, T), Ok(None));
        assert_eq!(
            t.report(report(2), next, T),
            Ok(None),
            "epoch 2's report is gone"
        );
        assert_eq!(t.report(report(0), next, T).unwrap().unwrap().checkpoint, 5);
        // At or below the committed id nothing is pending.
        let low = CheckpointReport {
            epoch: 3,
            ..r(0, 4, false)
        };
        assert_eq!(t.report(low, next, T), Ok(None));
        assert_eq!(t.pending(1), 0);
    }

    #[test]
    fn a_new_term_starts_clean_and_a_finished_tasks_report_sent_again_completes_checkpoints() {
        let mut t = CheckpointTracker::new();
        t.report(r(0, 3, true), VIEW, T).unwrap();
        t.report(r(1, 4, false), VIEW, T).unwrap();
        // The leader changed: the new term knows nothing of task 0 having finished.
        t.report(r(1, 5, false), VIEW, T + 1).unwrap();
        assert_eq!(
            t.report(r(2, 5, false), VIEW, T + 1),
            Ok(None),
            "task 0's last report was taken in the old term"
        );
        assert_eq!(t.pending(1), 1, "checkpoint 4 went with the old term");
        // A handler that read the old term and locked the tracker late changes nothing.
        assert_eq!(
            t.report(r(0, 6, false), VIEW, T),
            Err(ReportError::StaleTerm {
                got: T,
                current: T + 1
            })
        );
        // Its executor sends it again to the new leader.
        let done = t.report(r(0, 3, true), VIEW, T + 1).unwrap().unwrap();
        assert_eq!(done.checkpoint, 5);
        assert_eq!(
            done.states,
            vec![(0, vec![0, 3]), (1, vec![1, 5]), (2, vec![2, 5])]
        );
    }

    #[test]
    fn a_batch_hands_out_each_jobs_newest_completed_checkpoint_reading_each_job_once() {
        let mut t = CheckpointTracker::new();
        let of_job = |job, index, checkpoint| CheckpointReport {
            job,
            ..r(index, checkpoint, false)
        };
        let mut batch: Vec<CheckpointReport> = Vec::new();
        for id in [5, 6] {
            batch.extend((0..3).map(|i| of_job(1, i, id)));
        }
        batch.push(of_job(2, 0, 5));
        batch.push(CheckpointReport {
            epoch: 1,
            ..of_job(1, 0, 7)
        });
        let mut asked = Vec::new();
        let (done, refused) = t.report_batch(batch, T, |job| {
            asked.push(job);
            (job == 1).then_some(VIEW)
        });
        assert_eq!(asked, [1, 2], "each job's state is read once");
        assert_eq!(done.len(), 1);
        assert_eq!(done[&1].checkpoint, 6, "5 is superseded within the batch");
        assert!(matches!(
            refused[..],
            [ReportError::StaleEpoch { got: 1, .. }]
        ));
        assert_eq!(t.pending(2), 0, "an ended job's reports are dropped");
    }

    /// A batch that read the job before the restart locks the tracker after one that read
    /// it after: the old epoch's reports do not take the tracker back (which would drop
    /// what the new epoch's finished tasks reported).
    #[test]
    fn a_view_older_than_the_trackers_epoch_is_refused() {
        let mut t = CheckpointTracker::new();
        let next = JobView { epoch: 3, ..VIEW };
        let of_epoch_3 = |index, checkpoint, last| CheckpointReport {
            epoch: 3,
            ..r(index, checkpoint, last)
        };
        t.report(of_epoch_3(0, 3, true), next, T).unwrap();
        assert_eq!(
            t.report(r(1, 4, false), VIEW, T),
            Err(ReportError::StaleEpoch {
                job: 1,
                got: 2,
                current: 3
            })
        );
        t.report(of_epoch_3(1, 4, false), next, T).unwrap();
        let done = t.report(of_epoch_3(2, 4, false), next, T).unwrap();
        assert_eq!(done.unwrap().checkpoint, 4, "task 0's last report was kept");
    }

    #[test]
    fn pending_checkpoints_are_bounded() {
        let mut t = CheckpointTracker::new();
        for id in 1..=(MAX_PENDING as u64 + 10) {
            t.report(r(0, id, false), VIEW, T).unwrap();
        }
        assert_eq!(t.pending(1), MAX_PENDING);
        t.retain(|job| job != 1);
        assert_eq!(t.pending(1), 0);
    }
}
