//! cargo-fuzz target `dht_record`: the oracle of the same name in mesh-core's fuzz_support.
#![no_main]

#[path = "../../mesh-core/tests/fuzz_support/mod.rs"]
mod fuzz_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_support::run("dht_record", data);
});
