#![no_main]

//! `cargo fuzz run hub_events`: see `common::hub_events` for the input format and checks.

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::hub_events(data));
