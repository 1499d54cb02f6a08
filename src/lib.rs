//! Umbrella package for examples/ and benches/.

pub mod decode_timing;
pub mod gpu_check;
