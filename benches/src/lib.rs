//! Criterion benchmarks for microcosm live in `benches/`; this library is empty on purpose.
