//! Replicated metadata (in progress)
