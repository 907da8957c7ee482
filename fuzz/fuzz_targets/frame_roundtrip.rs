#![no_main]
//! See `pagewire_protocol::fuzzing::frame_roundtrip`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagewire_protocol::fuzzing::frame_roundtrip(data));
