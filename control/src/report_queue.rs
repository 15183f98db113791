//! Checkpoint reports waiting on an executor for its reporter to send them to the leader.
//!
//! Tasks hand in a report at every checkpoint they take, from the engine threads; one
//! reporter task sends them to the leader in batches. When the leader cannot be reached (an
//! election, every master down), each batch takes up to a TTL to fail while the tasks keep
//! checkpointing, so a plain queue would grow for as long as the masters are away. A
//! checkpoint completes only once every task of the attempt reported it, and a newer one
//! supersedes it; so of one task's regular reports not yet sent only the newest is worth
//! sending. [`ReportQueue`] keeps exactly that: per task of an attempt at most one regular
//! report, a newer checkpoint replacing an older one, and its last report
//! ([`CheckpointReport::last`]) apart. A last report stands only for the checkpoints after
//! its own, so it never replaces the regular report of its checkpoint, which that
//! checkpoint still needs. The queue holds at most two reports per task that ran here since
//! the last batch, however long the masters are away, and a reporter that falls behind
//! sends the checkpoint that can still complete rather than a backlog of stale ones.
//! Reports go out oldest first (a replaced report keeps its place), so no task's report
//! waits behind others for more than a batch.
//!
//! [`PendingReports`] is the bookkeeping only (no I/O, no clock); [`ReportQueue`] adds the
//! lock and the reporter's wake-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::proto::CheckpointReport;

/// (job, epoch, task index, last report).
type Key = (u64, u64, u32, bool);

/// Reports not yet sent, at most one regular and one last report per (job, epoch, task);
/// see the [module docs](self).
#[derive(Debug, Default)]
pub struct PendingReports {
    /// Each queued report and the place it was queued at.
    reports: HashMap<Key, (u64, CheckpointReport)>,
    /// Queue order: place → key.
    order: BTreeMap<u64, Key>,
    next: u64,
    /// Reports replaced by a newer one before they were sent.
    superseded: u64,
}

impl PendingReports {
    /// Queues `report`, unless the same task's queued report of its kind (regular or last)
    /// is as new: a later checkpoint replaces an earlier one, in its place in the queue.
    /// Returns whether it was queued.
    pub fn push(&mut self, report: CheckpointReport) -> bool {
        let key = (report.job, report.epoch, report.index, report.last);
        match self.reports.get_mut(&key) {
            Some((_, queued)) if queued.checkpoint >= report.checkpoint => false,
            Some((_, queued)) => {
                self.superseded += 1;
                *queued = report;
                true
            }
            None => {
                let place = self.next;
                self.next += 1;
                self.reports.insert(key, (place, report));
                self.order.insert(place, key);
                true
            }
        }
    }

    /// Takes up to `max` reports, the longest queued first.
    pub fn take(&mut self, max: usize) -> Vec<CheckpointReport> {
        let mut out = Vec::with_capacity(max.min(self.reports.len()));
        while out.len() < max {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, report)) = self.reports.remove(&key) {
                out.push(report);
            }
        }
        out
    }

    /// Reports queued.
    pub fn len(&self) -> usize {
        self.reports.len()
    }

    /// Whether no report is queued.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }

    /// Reports replaced by a newer one of the same task before they were sent, so far.
    pub fn superseded(&self) -> u64 {
        self.superseded
    }
}

/// [`PendingReports`] shared between the engine threads that push and the reporter task that
/// takes, which it wakes.
#[derive(Debug, Default)]
pub struct ReportQueue {
    pending: Mutex<PendingReports>,
    wake: tokio::sync::Notify,
}

impl ReportQueue {
    /// Queues `report` (see [`PendingReports::push`]) and wakes the reporter.
    pub fn push(&self, report: CheckpointReport) {
        if self.lock().push(report) {
            self.wake.notify_one();
        }
    }

    /// Waits until a report is queued, then `linger` more for the rest of its checkpoint (the
    /// reports of one checkpoint come from every task within a fraction of a millisecond),
    /// and takes up to `max`. Reports queued already (a checkpoint that began while the
    /// previous batch was out, or what a full batch left) only wait the linger.
    pub async fn next_batch(
        &self,
        linger: std::time::Duration,
        max: usize,
    ) -> Vec<CheckpointReport> {
        loop {
            if self.lock().is_empty() {
                // `notify_one` leaves a permit when no one waits, so a push between the
                // check and this wait is not missed.
                self.wake.notified().await;
            }
            tokio::time::sleep(linger).await;
            let batch = self.lock().take(max);
            // A push during the linger left a permit for reports this batch took: drop it,
            // or the next call would wake for nothing. (One for a report pushed since is
            // not needed either: the queue is checked before waiting.)
            let stale = self.wake.notified();
            tokio::pin!(stale);
            stale.as_mut().enable();
            if !batch.is_empty() {
                return batch;
            }
        }
    }

    /// Reports queued.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Reports replaced by a newer one before they were sent, so far.
    pub fn superseded(&self) -> u64 {
        self.lock().superseded()
    }

    /// Whether no report is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingReports> {
        // The bookkeeping stays consistent if a holder panicked: every change is one insert
        // or removal.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn report(job: u64, index: u32, checkpoint: u64, last: bool) -> CheckpointReport {
        CheckpointReport {
            job,
            epoch: 1,
            index,
            checkpoint,
            last,
            state: checkpoint.to_le_bytes().to_vec(),
        }
    }

    fn checkpoints(reports: &[CheckpointReport]) -> Vec<(u64, u32, u64, bool)> {
        reports
            .iter()
            .map(|r| (r.job, r.index, r.checkpoint, r.last))
            .collect()
    }

    #[test]
    fn a_task_keeps_only_its_newest_unsent_report() {
        let mut q = PendingReports::default();
        for checkpoint in 1..=1000 {
            for index in 0..4 {
                assert!(q.push(report(7, index, checkpoint, false)));
            }
        }
        assert_eq!(q.len(), 4, "one report per task, however many checkpoints");
        assert_eq!(q.superseded(), 4 * 999);
        let sent = q.take(usize::MAX);
        assert_eq!(
            checkpoints(&sent),
            (0..4).map(|i| (7, i, 1000, false)).collect::<Vec<_>>()
        );
        assert_eq!(sent[0].state, 1000u64.to_le_bytes().to_vec());
        assert!(q.is_empty());
    }

    #[test]
    fn an_older_report_does_not_replace_a_newer_one() {
        let mut q = PendingReports::default();
        assert!(q.push(report(1, 0, 5, false)));
        assert!(!q.push(report(1, 0, 4, false)));
        assert!(!q.push(report(1, 0, 5, false)), "the same checkpoint again");
        assert_eq!(checkpoints(&q.take(10)), vec![(1, 0, 5, false)]);
    }

    /// A last report stands only for the checkpoints after its own: the regular report of
    /// its checkpoint is still needed for that one, so both go out.
    #[test]
    fn a_last_report_is_kept_beside_the_regular_report_of_its_checkpoint() {
        let mut q = PendingReports::default();
        assert!(q.push(report(1, 0, 5, false)));
        assert!(q.push(report(1, 0, 5, true)), "the task finished at 5");
        assert!(
            !q.push(report(1, 0, 5, false)),
            "the same regular report again"
        );
        assert!(
            !q.push(report(1, 0, 5, true)),
            "a resend of the held last report"
        );
        assert_eq!(q.superseded(), 0);
        assert_eq!(
            checkpoints(&q.take(10)),
            vec![(1, 0, 5, false), (1, 0, 5, true)]
        );
    }

    /// Reports go out oldest first; one replaced by a newer checkpoint keeps its place, and a
    /// task that reports again after its report went out queues behind the others.
    #[test]
    fn reports_go_out_oldest_first_so_none_waits_behind_busier_tasks() {
        let mut q = PendingReports::default();
        for index in 0..6 {
            q.push(report(1, index, 1, false));
        }
        q.push(report(1, 4, 2, false));
        let first = q.take(2);
        assert_eq!(
            checkpoints(&first),
            vec![(1, 0, 1, false), (1, 1, 1, false)]
        );
        // Tasks 0 and 1 checkpoint again before the next batch.
        q.push(report(1, 0, 2, false));
        q.push(report(1, 1, 2, false));
        assert_eq!(
            checkpoints(&q.take(3)),
            vec![(1, 2, 1, false), (1, 3, 1, false), (1, 4, 2, false)]
        );
        assert_eq!(
            checkpoints(&q.take(10)),
            vec![(1, 5, 1, false), (1, 0, 2, false), (1, 1, 2, false)]
        );
    }

    #[test]
    fn tasks_of_different_jobs_and_epochs_are_kept_apart() {
        let mut q = PendingReports::default();
        q.push(report(1, 0, 3, false));
        q.push(report(2, 0, 9, false));
        let mut other_epoch = report(1, 0, 1, false);
        other_epoch.epoch = 2;
        q.push(other_epoch);
        assert_eq!(q.len(), 3);
        assert_eq!(q.superseded(), 0);
    }

    #[test]
    fn take_returns_at_most_max_and_leaves_the_rest() {
        let mut q = PendingReports::default();
        for index in 0..10 {
            q.push(report(1, index, 1, false));
        }
        assert_eq!(q.take(4).len(), 4);
        assert_eq!(q.len(), 6);
        assert_eq!(q.take(100).len(), 6);
        assert!(q.take(100).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_reporter_waits_for_the_first_report_then_the_linger() {
        let q = Arc::new(ReportQueue::default());
        // Tokio's timer counts whole milliseconds: every step below is at least one.
        let linger = Duration::from_millis(5);
        let pusher = {
            let q = q.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                for index in 0..3 {
                    q.push(report(1, index, 7, false));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // The next checkpoint, after the linger.
                tokio::time::sleep(Duration::from_millis(10)).await;
                q.push(report(1, 0, 8, false));
            })
        };
        let start = tokio::time::Instant::now();
        let first = q.next_batch(linger, 1024).await;
        assert_eq!(
            checkpoints(&first),
            vec![(1, 0, 7, false), (1, 1, 7, false), (1, 2, 7, false)]
        );
        assert!(
            start.elapsed() >= Duration::from_millis(15),
            "waited for the linger"
        );
        let second = q.next_batch(linger, 1024).await;
        assert_eq!(checkpoints(&second), vec![(1, 0, 8, false)]);
        pusher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn reports_left_over_a_full_batch_wait_only_the_linger() {
        let q = ReportQueue::default();
        for index in 0..5 {
            q.push(report(1, index, 1, false));
        }
        let first = q.next_batch(Duration::from_millis(2), 3).await;
        assert_eq!(first.len(), 3);
        let start = tokio::time::Instant::now();
        let rest = q.next_batch(Duration::from_millis(2), 3).await;
        assert_eq!(rest.len(), 2);
        assert_eq!(start.elapsed(), Duration::from_millis(2));
        assert!(q.is_empty());
    }
}
