#![no_main]
//! See `pagewire_accel::fuzzing::decode_deflate`: an arbitrary payload with an arbitrary
//! claimed per-page length table.

libfuzzer_sys::fuzz_target!(|input: (u8, Vec<u32>, &[u8])| {
    let (pages, lengths, payload) = input;
    pagewire_accel::fuzzing::decode_deflate(payload, &lengths, pages);
});
