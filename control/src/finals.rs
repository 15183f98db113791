//! Finished tasks' last checkpoint reports, held by their executor until the leader of the
//! current term has them.
//!
//! A task reports its state at every checkpoint it takes, and once more when it finishes
//! ([`CheckpointReport::last`]): that last state stands for every later checkpoint of its
//! attempt (see [`crate::checkpoint`]). The leader keeps reports only in memory, for one raft
//! term, and a finished task never reports again; so if the last report reached only an
//! earlier leader (or none: a batch that could not be delivered is dropped), no later
//! checkpoint of the attempt could complete. The executor therefore holds each last report
//! while its attempt runs and queues it again whenever a heartbeat answer names a term whose
//! leader has not taken it.
//!
//! [`FinalReports`] is the bookkeeping only: no I/O, no clock.

use std::collections::{BTreeMap, HashMap};

use crate::proto::CheckpointReport;

/// What became of a batch of reports sent to the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The leader of this raft term took them.
    Taken(u64),
    /// Not delivered, for a reason that may pass (no leader, a timeout): queued again at
    /// the next heartbeat.
    Retry,
    /// Refused for good (e.g. too large to send): held no longer, as sending it again would
    /// fail every batch it goes in.
    GiveUp,
}

#[derive(Debug)]
struct Held {
    report: CheckpointReport,
    /// The newest term of a leader that took it, if one did.
    taken_in: Option<u64>,
    /// Queued for the leader and not answered yet: not queued again meanwhile.
    queued: bool,
}

/// The last reports of one executor's running attempts; see the [module docs](self).
#[derive(Debug, Default)]
pub struct FinalReports {
    /// (job, epoch) of each running attempt → task index → its last report.
    attempts: HashMap<(u64, u64), BTreeMap<u32, Held>>,
}

impl FinalReports {
    /// Starts holding the last reports of attempt `epoch` of `job` (called before its tasks
    /// start).
    pub fn open(&mut self, job: u64, epoch: u64) {
        self.attempts.entry((job, epoch)).or_default();
    }

    /// Forgets the attempt (stopped): its reports are no longer held, nor taken if they come
    /// in late.
    pub fn close(&mut self, job: u64, epoch: u64) {
        self.attempts.remove(&(job, epoch));
    }

    /// Holds `report` if it is a last report of an open attempt, as queued (the task itself
    /// is queuing it). Returns whether it is held.
    pub fn hold(&mut self, report: &CheckpointReport) -> bool {
        if !report.last {
            return false;
        }
        let Some(tasks) = self.attempts.get_mut(&(report.job, report.epoch)) else {
            return false;
        };
        tasks.insert(
            report.index,
            Held {
                report: report.clone(),
                taken_in: None,
                queued: true,
            },
        );
        true
    }

    /// The leader answered a batch of `reports` with `answer`. Held reports among them are
    /// no longer queued; taken ones remember the newest term that took them (a late answer
    /// of an older leader does not take that back).
    pub fn answered(&mut self, reports: &[CheckpointReport], answer: Answer) {
        for r in reports.iter().filter(|r| r.last) {
            let Some(tasks) = self.attempts.get_mut(&(r.job, r.epoch)) else {
                continue;
            };
            let Some(held) = tasks.get_mut(&r.index) else {
                continue;
            };
            if held.report.checkpoint != r.checkpoint {
                continue;
            }
            held.queued = false;
            match answer {
                Answer::Taken(term) => {
                    held.taken_in = Some(held.taken_in.map_or(term, |t| t.max(term)));
                }
                Answer::Retry => {}
                Answer::GiveUp => {
                    tasks.remove(&r.index);
                }
            }
        }
    }

    /// The held reports that no leader of `term` or later has taken and that are not
    /// queued: they are to be queued again, and are marked queued.
    pub fn due(&mut self, term: u64) -> Vec<CheckpointReport> {
        let mut out = Vec::new();
        for tasks in self.attempts.values_mut() {
            for held in tasks.values_mut() {
                if !held.queued && held.taken_in.is_none_or(|t| t < term) {
                    held.queued = true;
                    out.push(held.report.clone());
                }
            }
        }
        out
    }

    /// Last reports held.
    pub fn len(&self) -> usize {
        self.attempts.values().map(BTreeMap::len).sum()
    }

    /// Whether no last report is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(job: u64, epoch: u64, index: u32, last: bool) -> CheckpointReport {
        CheckpointReport {
            job,
            epoch,
            index,
            checkpoint: 4,
            last,
            state: vec![index as u8],
        }
    }

    fn indices(reports: &[CheckpointReport]) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = reports.iter().map(|r| (r.job, r.index)).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_last_report_is_sent_again_to_each_new_term_until_taken() {
        let mut f = FinalReports::default();
        f.open(1, 1);
        let last = report(1, 1, 0, true);
        assert!(f.hold(&last));
        assert!(
            !f.hold(&report(1, 1, 1, false)),
            "regular reports are not held"
        );
        assert!(f.due(5).is_empty(), "queued by its task: not queued twice");
        f.answered(std::slice::from_ref(&last), Answer::Taken(5));
        assert!(f.due(5).is_empty(), "the leader of term 5 has it");
        // A new leader: queued once, not again while on its way.
        assert_eq!(f.due(6), vec![last.clone()]);
        assert!(f.due(6).is_empty());
        assert!(f.due(7).is_empty(), "still on its way");
        f.answered(std::slice::from_ref(&last), Answer::Taken(7));
        assert!(f.due(7).is_empty());
        // A late answer of an older leader, and a heartbeat answered by one.
        f.answered(std::slice::from_ref(&last), Answer::Taken(6));
        assert!(f.due(7).is_empty(), "still taken in term 7");
        assert!(f.due(6).is_empty(), "an older leader's term needs nothing");
        assert_eq!(f.len(), 1, "held while the attempt runs");
    }

    #[test]
    fn an_undelivered_last_report_is_queued_again_in_the_same_term() {
        let mut f = FinalReports::default();
        f.open(1, 1);
        let last = report(1, 1, 2, true);
        f.hold(&last);
        f.answered(std::slice::from_ref(&last), Answer::Retry);
        assert_eq!(f.due(5), vec![last.clone()]);
        f.answered(std::slice::from_ref(&last), Answer::Taken(5));
        assert!(f.due(5).is_empty());
    }

    #[test]
    fn a_last_report_refused_for_good_is_held_no_longer() {
        let mut f = FinalReports::default();
        f.open(1, 1);
        let last = report(1, 1, 0, true);
        f.hold(&last);
        f.answered(std::slice::from_ref(&last), Answer::GiveUp);
        assert!(f.is_empty());
        assert!(f.due(5).is_empty());
    }

    #[test]
    fn reports_of_stopped_or_unknown_attempts_are_not_held() {
        let mut f = FinalReports::default();
        f.open(1, 1);
        f.open(2, 3);
        f.hold(&report(1, 1, 0, true));
        f.hold(&report(2, 3, 0, true));
        f.close(1, 1);
        assert!(
            !f.hold(&report(1, 1, 1, true)),
            "late report of a stopped attempt"
        );
        assert!(
            !f.hold(&report(2, 2, 0, true)),
            "an epoch that never ran here"
        );
        f.answered(&[report(2, 3, 0, true)], Answer::Retry);
        assert_eq!(indices(&f.due(1)), [(2, 0)]);
        assert_eq!(f.len(), 1);
        f.close(2, 3);
        assert!(f.is_empty());
    }

    #[test]
    fn an_answer_about_another_checkpoint_leaves_the_held_report_queued() {
        let mut f = FinalReports::default();
        f.open(1, 1);
        f.hold(&report(1, 1, 0, true));
        let other = CheckpointReport {
            checkpoint: 3,
            ..report(1, 1, 0, true)
        };
        f.answered(&[other], Answer::Taken(5));
        assert!(
            f.due(5).is_empty(),
            "still queued: its own answer is to come"
        );
    }
}
