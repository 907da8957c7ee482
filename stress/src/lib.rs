//! pagewire-stress: a whole-migration stress benchmark, like iperf3 for live
//! migration.
//!
//! A run is a matrix of cells (the cartesian product of codecs, channels, frame
//! sizes, dirty rates, links and transports); each cell live-migrates a simulated
//! guest ([`workload`]) with pagewire, verifies the destination, and is measured
//! ([`cell`], with CPU per side from [`cpu`]); [`sweep`] runs the matrix, a
//! plain-socket baseline per link and channel count, and the bisection for the
//! largest dirty rate that still converges; [`report`] prints the tables and writes
//! JSON, CSV and charts. [`serve`] is the destination end for runs across hosts.
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod bisect;
pub mod cell;
pub mod chart;
pub mod cli;
pub mod cpu;
pub mod destmem;
pub mod link;
pub mod report;
pub mod serve;
pub mod sweep;
pub mod workload;

pub use crate::bisect::{Bisection, bisect};
pub use crate::chart::{Series, bar_chart, line_chart};
pub use crate::link::{Link, LinkSpec};

use std::io::Read;

/// Fills `buf` from the kernel's random source (session ids, generated keys).
///
/// # Panics
/// When /dev/urandom cannot be read, which leaves nothing safe to do.
pub fn random_bytes(buf: &mut [u8]) {
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
    if let Err(e) = ok {
        panic!("reading /dev/urandom: {e}");
    }
}

/// The handshake's authentication from the key options: the key file's bytes (one
/// trailing newline removed), none with `--insecure-no-key`, or, when `generate` (a
/// local run, both ends in this process), a fresh random key.
///
/// # Errors
/// No key and neither `--insecure-no-key` nor `generate`; an unreadable or short key
/// file.
pub fn authentication(
    key: &cli::KeyArgs,
    generate: bool,
) -> anyhow::Result<pagewire::Authentication> {
    use pagewire::{Authentication, SessionKey};
    if let Some(path) = &key.key_file {
        let k = pagewire::key_from_file(path)?;
        return Ok(Authentication::PreSharedKey(k));
    }
    if key.insecure_no_key {
        return Ok(Authentication::None);
    }
    if generate {
        let mut k = vec![0u8; 32];
        random_bytes(&mut k);
        return Ok(Authentication::PreSharedKey(SessionKey::new(k)?));
    }
    anyhow::bail!(
        "give the pre-shared key with --key-file FILE (the same on both ends), or --insecure-no-key on both ends"
    )
}
