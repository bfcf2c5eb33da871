#![no_main]

//! `cargo fuzz run envelope`: see `common::envelope` for the input format and checks.

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::envelope(data));
