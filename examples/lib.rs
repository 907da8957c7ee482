//! Runnable programs live in `examples/examples/`.
