#![no_main]
//! See `pagewire_protocol::fuzzing::session`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagewire_protocol::fuzzing::session(data));
