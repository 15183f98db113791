//! liveness (in progress)
