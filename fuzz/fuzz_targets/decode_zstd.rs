#![no_main]
//! See `pagewire_accel::fuzzing::decode_zstd`: byte 0 is the destination's page count, the rest
//! the payload; the destination has guard bytes and must never be written past.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((&pages, payload)) = data.split_first() {
        pagewire_accel::fuzzing::decode_zstd(payload, pages);
    }
});
