//! Runnable programs:
//!
//! - `demo` (`examples/examples/demo.rs`): a live migration of a simulated guest over
//!   loopback, printing its statistics
//!   (`cargo run --release -p pagewire-examples --example demo -- --help`).
//! - `pagewire-vmm` (`examples/vmm/`): a small KVM VMM (kvm-ioctls, vm-memory) whose
//!   running guest live-migrates between two processes; see the README, "A real guest"
//!   (`cargo run --release -p pagewire-examples --bin pagewire-vmm -- --help`).
//!
//! - `receive` and `send` (`examples/examples/`): pagewire's destination and source as
//!   processes of their own, one migration each, for peers written from PROTOCOL.md
//!   alone (`protocol/conformance/`).
//!
//! The first two take `--tls` (see [`tls`]): TLS 1.3 around every channel, with certificates
//! made for the run unless PEM files are given.

pub mod cli;
pub mod tls;
