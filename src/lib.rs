//! Umbrella package for examples/ and benches/.
