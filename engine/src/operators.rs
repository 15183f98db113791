//! Reusable operators.

use std::marker::PhantomData;

use crate::batch::Record;
use crate::edge::{Input, Output};
use crate::error::EngineError;
use crate::operator::{Context, Operator, Status};

/// Most batches one invocation moves before yielding to other tasks.
const FORWARD_BUDGET: usize = 64;

/// Pass-through: moves every batch from all inputs to output 0 without copying records or
/// re-serializing sealed batches. Finishes when all inputs have ended; fails when an
/// input's producer failed or was cancelled ([`Input::upstream_aborted`]), so that the failure
/// reaches its own consumer instead of looking like a normal end of stream.
///
/// Inputs take turns one batch at a time (round-robin), and each invocation starts where the
/// previous one stopped, so a busy input cannot starve the others.
pub struct Forward<R> {
    /// The input whose turn comes first in the next invocation.
    next: usize,
    _record: PhantomData<fn() -> R>,
}

impl<R> Forward<R> {
    /// A forwarding operator.
    pub fn new() -> Self {
        Self {
            next: 0,
            _record: PhantomData,
        }
    }
}

impl<R> Default for Forward<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> std::fmt::Debug for Forward<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forward")
    }
}

impl<R: Record> Operator for Forward<R> {
    type In = R;
    type Out = R;

    fn run(
        &mut self,
        inputs: &mut [Input<R>],
        outputs: &mut [Output<R>],
        _cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let Some(out) = outputs.first_mut() else {
            return Err(EngineError::operator("Forward needs one output"));
        };
        if let Some(i) = inputs.iter().position(Input::upstream_aborted) {
            return Err(EngineError::operator(format!(
                "the upstream of input {i} failed, was cancelled or lost its stream"
            )));
        }
        let count = inputs.len();
        let mut moved = 0;
        // Turns in a row that found their input empty: a whole round of them ends the pass.
        let mut empty = 0;
        let mut at = if count == 0 { 0 } else { self.next % count };
        while empty < count {
            let input = &mut inputs[at];
            let Some(batch) = input.pop() else {
                empty += 1;
                at = (at + 1) % count;
                continue;
            };
            empty = 0;
            if let Err(batch) = out.push_batch(batch) {
                // `pop` just emptied the put-back slot, so this cannot be refused.
                let _ = input.unpop(batch);
                // This input's turn did not happen: it comes first next time.
                self.next = at;
                return Ok(Status::BlockedOnOutput);
            }
            moved += 1;
            at = (at + 1) % count;
            if moved >= FORWARD_BUDGET {
                self.next = at;
                return Ok(Status::Ready);
            }
        }
        self.next = at;
        if inputs.iter().all(Input::is_finished) {
            Ok(Status::Finished)
        } else {
            Ok(Status::BlockedOnInput)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::testkit::{Manual, drain, settle};
    use crate::{EdgeConfig, TaskEvent, TaskSpec, TaskState, Worker, edge};

    fn one_per_batch(capacity: usize) -> EdgeConfig {
        EdgeConfig {
            capacity,
            batch_size: 1,
            ..EdgeConfig::default()
        }
    }

    #[test]
    fn forward_gives_busy_inputs_turns_across_invocations() {
        const INPUTS: u64 = 3;
        const QUEUED: u64 = 100;
        let clock = ManualClock::new();
        let (tx, _events) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(clock.clone()), tx);
        let (out, mut tap) = edge::<u64>(&one_per_batch(4 * FORWARD_BUDGET)).unwrap();
        let mut spec = TaskSpec::new("forward", Forward::<u64>::new()).output(out);
        // Every input has more batches queued than two invocations move: always full.
        let mut feeds = Vec::new();
        for i in 0..INPUTS {
            let (mut feed, input) = edge::<u64>(&one_per_batch(QUEUED as usize)).unwrap();
            for j in 0..QUEUED {
                feed.push(i * 1000 + j).unwrap();
            }
            feeds.push(feed);
            spec = spec.input(input);
        }
        worker.handle().spawn(spec).unwrap();

        let mut from = Vec::new();
        for _ in 0..2 {
            let step = worker.step(clock.now());
            assert_eq!(step.ran, 1);
            assert!(step.runnable, "a full budget asks to run again");
            while let Some(batch) = tap.pop() {
                from.extend(batch.into_owned().unwrap().iter().map(|x| x / 1000));
            }
        }
        assert_eq!(from.len(), 2 * FORWARD_BUDGET);
        // 64 is not a multiple of 3: the second invocation continues the rotation.
        let expected: Vec<u64> = (0..from.len() as u64).map(|n| n % INPUTS).collect();
        assert_eq!(from, expected, "inputs take turns");
    }

    #[test]
    fn forward_fails_when_its_upstream_is_cancelled() {
        let clock = ManualClock::new();
        let (tx, events) = crossbeam_channel::unbounded();
        let mut worker = Worker::new(0, Arc::new(clock.clone()), tx);
        let h = worker.handle();
        let (src_out, fwd_in) = edge::<u64>(&one_per_batch(4)).unwrap();
        let (fwd_out, _tap) = edge::<u64>(&one_per_batch(4)).unwrap();
        let queue = Arc::new(std::sync::Mutex::new([1, 2].into()));
        let source = h
            .spawn(TaskSpec::new("src", Manual { queue }).output(src_out))
            .unwrap();
        let forward = h
            .spawn(
                TaskSpec::new("forward", Forward::<u64>::new())
                    .input(fwd_in)
                    .output(fwd_out),
            )
            .unwrap();
        settle(&mut worker, clock.now());
        assert_eq!(forward.state(), TaskState::Running);
        source.cancel();
        settle(&mut worker, clock.now());
        assert_eq!(source.state(), TaskState::Cancelled);
        assert_eq!(
            forward.state(),
            TaskState::Failed,
            "an aborted stream is not a normal end"
        );
        assert!(
            drain(&events)
                .iter()
                .any(|e| matches!(e, TaskEvent::Failed { task, .. } if *task == forward.id()))
        );
    }
}
