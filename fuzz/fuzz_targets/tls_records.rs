#![no_main]
//! See `pagewire_transport::tls::fuzzing::records`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagewire_transport::tls::fuzzing::records(data));
