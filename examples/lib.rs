//! Runnable programs live in `examples/examples/`:
//!
//! - `demo`: a live migration of a simulated guest over loopback, printing its
//!   statistics (`cargo run --release -p pagewire-examples --example demo -- --help`).
