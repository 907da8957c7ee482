#![no_main]
//! See `pagewire_accel::fuzzing::delta_sequence`: sender, delta cache and receiver stay
//! equal through any sequence of page versions.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagewire_accel::fuzzing::delta_sequence(data));
