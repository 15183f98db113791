//! Operators and helpers for the crate's unit tests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::{
    Batch, Context, EngineError, Input, Operator, Output, Status, StepOutcome, TaskEvent, Worker,
};

/// Emits `0..n`, at most `per_run` per invocation.
pub(crate) struct Counter {
    pub(crate) next: u64,
    pub(crate) n: u64,
    pub(crate) per_run: u64,
}

impl Operator for Counter {
    type In = ();
    type Out = u64;
    fn run(
        &mut self,
        _: &mut [Input<()>],
        out: &mut [Output<u64>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let mut pushed = 0;
        while self.next < self.n {
            if cx.is_draining() {
                return Ok(Status::Finished);
            }
            if pushed == self.per_run {
                return Ok(Status::Ready);
            }
            if out[0].push(self.next).is_err() {
                return Ok(Status::BlockedOnOutput);
            }
            self.next += 1;
            pushed += 1;
        }
        Ok(Status::Finished)
    }
}

/// Emits whatever is put in its queue; idles when the queue is empty.
pub(crate) struct Manual {
    pub(crate) queue: Arc<Mutex<VecDeque<u64>>>,
}

impl Operator for Manual {
    type In = ();
    type Out = u64;
    fn run(
        &mut self,
        _: &mut [Input<()>],
        out: &mut [Output<u64>],
        cx: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let mut queue = self.queue.lock().unwrap();
        while let Some(x) = queue.pop_front() {
            if let Err(x) = out[0].push(x) {
                queue.push_front(x);
                return Ok(Status::BlockedOnOutput);
            }
        }
        Ok(if cx.is_draining() {
            Status::Finished
        } else {
            Status::Idle
        })
    }
}

/// What a [`Collect`] sink saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) records: Vec<u64>,
    pub(crate) batch_sizes: Vec<usize>,
    pub(crate) per_input: Vec<(usize, u64)>,
    pub(crate) aborted: bool,
}

/// Records everything from all its inputs; finishes when all inputs end.
pub(crate) struct Collect {
    pub(crate) seen: Arc<Mutex<Seen>>,
}

impl Collect {
    pub(crate) fn new() -> (Self, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        (Self { seen: seen.clone() }, seen)
    }
}

impl Operator for Collect {
    type In = u64;
    type Out = ();
    fn run(
        &mut self,
        inputs: &mut [Input<u64>],
        _: &mut [Output<()>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        let mut seen = self.seen.lock().unwrap();
        for input in inputs.iter_mut() {
            while let Some(batch) = input.pop() {
                let batch = batch.into_owned()?;
                seen.batch_sizes.push(batch.len());
                for &x in batch.iter() {
                    seen.records.push(x);
                    seen.per_input.push((input.index(), x));
                }
            }
            seen.aborted |= input.upstream_aborted();
        }
        // Lenient: records an abort and ends, so tests can look at what arrived.
        Ok(
            if inputs
                .iter()
                .all(|i| i.is_finished() || i.upstream_aborted())
            {
                Status::Finished
            } else {
                Status::BlockedOnInput
            },
        )
    }
}

/// Adds `add` to every record, keeping its place when the output is full.
pub(crate) struct AddOne {
    pub(crate) held: Option<(Batch<u64>, usize)>,
}

impl Operator for AddOne {
    type In = u64;
    type Out = u64;
    fn run(
        &mut self,
        inputs: &mut [Input<u64>],
        out: &mut [Output<u64>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        loop {
            let (batch, start) = match self.held.take() {
                Some(h) => h,
                None => match inputs[0].pop() {
                    Some(b) => (b, 0),
                    None => break,
                },
            };
            let Batch::Owned(owned) = &batch else {
                return Err(EngineError::operator("expected owned batches"));
            };
            for i in start..owned.len() {
                if out[0].push(owned[i] + 1).is_err() {
                    self.held = Some((batch, i));
                    return Ok(Status::BlockedOnOutput);
                }
            }
        }
        Ok(if inputs[0].is_finished() {
            Status::Finished
        } else {
            Status::BlockedOnInput
        })
    }
}

/// Fails (or panics) on its first invocation.
pub(crate) struct Faulty {
    pub(crate) panic: bool,
}

impl Operator for Faulty {
    type In = ();
    type Out = u64;
    fn run(
        &mut self,
        _: &mut [Input<()>],
        _: &mut [Output<u64>],
        _: &mut Context<'_>,
    ) -> Result<Status, EngineError> {
        if self.panic {
            panic!("boom in operator");
        }
        Err(EngineError::operator("bad input"))
    }
}

/// Steps the worker (without moving the clock) until nothing is runnable; returns the last
/// outcome.
pub(crate) fn settle(worker: &mut Worker, now: Instant) -> StepOutcome {
    for _ in 0..10_000 {
        let out = worker.step(now);
        if !out.runnable {
            return out;
        }
    }
    panic!("worker never became idle");
}

/// Drains the events received so far.
pub(crate) fn drain(events: &Receiver<TaskEvent>) -> Vec<TaskEvent> {
    events.try_iter().collect()
}
