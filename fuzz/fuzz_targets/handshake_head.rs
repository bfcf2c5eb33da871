#![no_main]

//! `cargo fuzz run handshake_head`: see `common::handshake_head` for the input format and checks.

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::handshake_head(data));
