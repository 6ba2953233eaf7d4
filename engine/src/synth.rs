//! Synthetic policies of any size, for benchmarks and scale tests.
