#![no_main]
//! See `pagewire_accel::fuzzing::decode_delta`: an arbitrary payload and length table
//! applied over destination pages holding `base`.

libfuzzer_sys::fuzz_target!(|input: (u8, Vec<u32>, &[u8], &[u8])| {
    let (pages, lengths, base, payload) = input;
    pagewire_accel::fuzzing::decode_delta(payload, &lengths, pages, base);
});
