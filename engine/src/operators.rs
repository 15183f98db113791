//! Reusable operators.

use std::marker::PhantomData;

use crate::batch::Record;
use crate::edge::{Input, Output};
use crate::error::EngineError;
use crate::operator::{Context, Operator, Status};

/// Most batches one invocation moves before yielding to other tasks.
const FORWARD_BUDGET: usize = 64;

/// Pass-through: moves every batch from all inputs (round-robin) to output 0 without
/// copying records or re-serializing sealed batches. Finishes when all inputs have ended.
pub struct Forward<R> {
    _record: PhantomData<fn() -> R>,
}

impl<R> Forward<R> {
    /// A forwarding operator.
    pub fn new() -> Self {
        Self {
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
        let mut moved = 0;
        for input in inputs.iter_mut() {
            while let Some(batch) = input.pop() {
                if let Err(batch) = out.push_batch(batch) {
                    // `pop` just emptied the put-back slot, so this cannot be refused.
                    let _ = input.unpop(batch);
                    return Ok(Status::BlockedOnOutput);
                }
                moved += 1;
                if moved >= FORWARD_BUDGET {
                    return Ok(Status::Ready);
                }
            }
        }
        if inputs.iter().all(Input::is_finished) {
            Ok(Status::Finished)
        } else {
            Ok(Status::BlockedOnInput)
        }
    }
}
