//! Umbrella package for examples/ and benches/.

pub mod gpu_check;
