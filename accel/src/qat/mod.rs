//! The Intel QAT backend, through Intel's user-space library qatlib (its `cpa` data
//! compression API), loaded at run time with `dlopen`: nothing changes for a build or
//! a host without it.
//!
//! - [`ffi`]: the C types and functions, declared by hand from qatlib's headers, and
//!   the loader.
//! - `runtime`: `icp_sal_userStart`, instance discovery (an instance is used only
//!   when it is up, polled, needs no intermediate buffers and has shared virtual
//!   memory, because guest pages are handed to it in place), instance start, and one
//!   stateless deflate session per level.
//! - [`QatBackend`]: the engine [`Backend`](crate::Backend): one request per page,
//!   batched asynchronous submission, completion by polling with callbacks, the
//!   optional compress-and-verify, and per-job fallback to software with its cause
//!   ([`FallbackCause`](crate::FallbackCause)).
//!
//! The output is the `deflate` format of `PROTOCOL.md`: one raw deflate stream per
//! page, pages that do not shrink raw, so the software codecs decode what QAT writes
//! and QAT decodes what they write.
//!
//! # What ran where
//! No machine this was written on has a QAT device or qatlib. Every path here runs in
//! the tests against the **stand-in** ([`standin_library`]): a C library built with
//! this crate that exports the same functions with the same types and runs each
//! request with libdeflate. It proves the FFI path (loading, discovery, start,
//! sessions, buffer lists, pinned metadata, submission, polling, callbacks, retry,
//! errors, fallback, packing) and the format. Only a device can show that the
//! declared layouts and the calling sequence are what qatlib accepts, that SVM lets
//! the device read guest pages in place, and how fast it is.

pub mod ffi;

mod backend;
mod pinned;
mod runtime;
pub mod standin;

use core::time::Duration;
use std::path::PathBuf;

pub use backend::QatBackend;

/// The environment variable that names the libraries to load instead of qatlib's
/// (`:`-separated paths), or `standin` for the stand-in built with this crate.
pub const LIBRARY_ENV: &str = "PAGEWIRE_QATLIB";

/// How the QAT backend runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct QatConfig {
    /// The libraries to load, in order (default: [`libraries_from_env`]).
    pub libraries: Vec<PathBuf>,
    /// Jobs in flight at once (each holds one request per page).
    pub queue_depth: usize,
    /// Ask the device to decompress what it compressed and compare
    /// (`compressAndVerify`); a failed check sends the job to software.
    pub verify: bool,
    /// How long a job may wait on a busy instance (`CPA_STATUS_RETRY`) before it goes
    /// to software.
    pub busy_timeout: Duration,
    /// How long requests may stay in flight on a failed instance before the backend
    /// reports an error.
    pub device_timeout: Duration,
}

impl Default for QatConfig {
    fn default() -> Self {
        Self {
            libraries: libraries_from_env(),
            queue_depth: 16,
            verify: true,
            busy_timeout: Duration::from_millis(200),
            device_timeout: Duration::from_secs(5),
        }
    }
}

impl QatConfig {
    /// The default configuration loading `libraries`.
    pub fn with_libraries(libraries: Vec<PathBuf>) -> Self {
        Self {
            libraries,
            ..Self::default()
        }
    }
}

/// The stand-in library built with this crate (see the module documentation).
pub fn standin_library() -> PathBuf {
    PathBuf::from(env!("PAGEWIRE_QAT_STANDIN"))
}

/// The libraries [`LIBRARY_ENV`] names, else qatlib's ([`ffi::DEFAULT_LIBRARIES`]).
pub fn libraries_from_env() -> Vec<PathBuf> {
    match std::env::var_os(LIBRARY_ENV) {
        Some(v) if v == "standin" => vec![standin_library()],
        Some(v) if !v.is_empty() => std::env::split_paths(&v).collect(),
        _ => ffi::DEFAULT_LIBRARIES.iter().map(PathBuf::from).collect(),
    }
}

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QatProbe {
    /// The libraries loaded.
    pub libraries: Vec<PathBuf>,
    /// The usable instances' names.
    pub instances: Vec<String>,
    /// Instances found but not used, with the reason.
    pub skipped: Vec<String>,
}

/// Opens qatlib from `libraries` and lists its usable instances.
///
/// # Errors
/// Why QAT cannot be used here, in words for a log line ("cannot load libqat.so.4
/// ...", "no usable QAT data compression instance: ...").
pub fn probe(libraries: &[PathBuf]) -> Result<QatProbe, String> {
    let rt = runtime::Runtime::get(libraries).map_err(|e| e.to_string())?;
    Ok(QatProbe {
        libraries: libraries.to_vec(),
        instances: rt.instances.iter().map(|i| i.name.clone()).collect(),
        skipped: rt.skipped.clone(),
    })
}
