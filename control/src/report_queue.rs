//! Checkpoint reports waiting on an executor for its reporter to send them to the leader.
//!
//! Tasks hand in a report at every checkpoint they take, from the engine threads; one
//! reporter task sends them to the leader in batches. When the leader cannot be reached (an
//! election, every master down), each batch takes up to a TTL to fail while the tasks keep
//! checkpointing, so a plain queue would grow for as long as the masters are away. A
//! checkpoint completes only once every task of the attempt reported it, and a newer one
//! supersedes it; so of one task's reports not yet sent only the newest is worth sending.
//! [`ReportQueue`] keeps exactly that: at most one report per task of an attempt, a newer
//! checkpoint replacing an older one. It holds at most one report per task that ran here
//! since the last batch, however long the masters are away, and a reporter that falls behind
//! sends the checkpoint that can still complete rather than a backlog of stale ones.
//!
//! [`PendingReports`] is the bookkeeping only (no I/O, no clock); [`ReportQueue`] adds the
//! lock and the reporter's wake-up.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::proto::CheckpointReport;

/// Reports not yet sent, at most one per (job, epoch, task); see the [module docs](self).
#[derive(Debug, Default)]
pub struct PendingReports {
    reports: BTreeMap<(u64, u64, u32), CheckpointReport>,
    /// Reports replaced by a newer one before they were sent.
    superseded: u64,
}

impl PendingReports {
    /// Queues `report`, unless the same task's queued report is newer: a later checkpoint
    /// replaces an earlier one, and of two reports of one checkpoint a last report
    /// ([`CheckpointReport::last`]) replaces the other. Returns whether it was queued.
    pub fn push(&mut self, report: CheckpointReport) -> bool {
        let key = (report.job, report.epoch, report.index);
        match self.reports.get(&key) {
            Some(queued) if !supersedes(&report, queued) => false,
            Some(_) => {
                self.superseded += 1;
                self.reports.insert(key, report);
                true
            }
            None => {
                self.reports.insert(key, report);
                true
            }
        }
    }

    /// Takes up to `max` reports, in (job, epoch, task) order.
    pub fn take(&mut self, max: usize) -> Vec<CheckpointReport> {
        if self.reports.len() <= max {
            return std::mem::take(&mut self.reports).into_values().collect();
        }
        let mut out = Vec::with_capacity(max);
        while out.len() < max {
            match self.reports.pop_first() {
                Some((_, r)) => out.push(r),
                None => break,
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

/// Whether `new` is to replace `queued`, a queued report of the same task.
fn supersedes(new: &CheckpointReport, queued: &CheckpointReport) -> bool {
    new.checkpoint > queued.checkpoint
        || (new.checkpoint == queued.checkpoint && new.last && !queued.last)
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
            if !batch.is_empty() {
                return batch;
            }
        }
    }

    /// Reports queued.
    pub fn len(&self) -> usize {
        self.lock().len()
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

    #[test]
    fn a_last_report_is_never_replaced_by_a_plain_one_of_its_checkpoint() {
        let mut q = PendingReports::default();
        assert!(q.push(report(1, 0, 5, false)));
        assert!(q.push(report(1, 0, 5, true)), "the task finished at 5");
        assert!(!q.push(report(1, 0, 5, false)));
        assert!(
            !q.push(report(1, 0, 5, true)),
            "a resend of the held last report"
        );
        assert_eq!(checkpoints(&q.take(10)), vec![(1, 0, 5, true)]);
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
