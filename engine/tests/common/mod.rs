//! Operators shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use microcosm_engine::{Batch, Context, EngineError, Input, Operator, Output, Status};

/// Emits `0..n`; finishes early when the engine drains.
pub struct Counter {
    pub next: u64,
    pub n: u64,
    pub base: u64,
}

impl Counter {
    pub fn new(n: u64) -> Self {
        Self {
            next: 0,
            n,
            base: 0,
        }
    }
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
        let mut budget = 4096;
        while self.next < self.n {
            if cx.is_draining() {
                return Ok(Status::Finished);
            }
            if budget == 0 {
                return Ok(Status::Ready);
            }
            if out[0].push(self.base + self.next).is_err() {
                return Ok(Status::BlockedOnOutput);
            }
            self.next += 1;
            budget -= 1;
        }
        Ok(Status::Finished)
    }
}

/// Adds one to every record, keeping its place when the output is full.
#[derive(Default)]
pub struct AddOne {
    held: Option<(Batch<u64>, usize)>,
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

/// `(input index, record)` pairs in arrival order.
pub type Seen = Arc<Mutex<Vec<(usize, u64)>>>;

/// Collects `(input index, record)` pairs.
pub struct Collect {
    pub seen: Seen,
}

impl Collect {
    pub fn new() -> (Self, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
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
                seen.extend(batch.iter().map(|&x| (input.index(), x)));
            }
        }
        Ok(if inputs.iter().all(Input::is_finished) {
            Status::Finished
        } else {
            Status::BlockedOnInput
        })
    }
}
