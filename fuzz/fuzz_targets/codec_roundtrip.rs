#![no_main]
//! See `pagewire_accel::fuzzing::roundtrip`: encode, decode, compare.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let [codec, level, rest @ ..] = data {
        pagewire_accel::fuzzing::roundtrip(*codec, *level as i8, rest);
    }
});
