#![no_main]
//! See `pagewire_protocol::fuzzing::stream_chunks`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagewire_protocol::fuzzing::stream_chunks(data));
