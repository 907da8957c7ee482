#![no_main]
//! See `pagewire_protocol::fuzzing::rdma_messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagewire_protocol::fuzzing::rdma_messages(data));
