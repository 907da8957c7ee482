//! Every use of pagewire in the VMM, in one place.
//!
//! Points of pagewire's API used here (what a port to a reshaped API touches):
//! - `pagewire::protocol::{Authentication, SessionKey, SessionId, CodecId}`;
//! - `pagewire::GuestMemory::from_vm_memory` over the VMM's `GuestMemoryMmap`;
//! - source: `SourceConfig::new` (+ `channels`, `codec`, `bandwidth_limit`,
//!   `precopy.downtime_limit`, `precopy.max_rounds`, `send_timeout`, `ack_timeout`),
//!   `Source::connect`, `pagewire::migrate(&mut Source, &mut dyn DirtyLog,
//!   &mut dyn FnMut() -> Vec<DeviceSection>)`, `MigrationStats` (its `downtime`
//!   breakdown, `total_ms`, `pages_per_s`, serde JSON), `Failed { error, .. }`;
//! - `DirtyLog` implemented by [`KvmLog`]: `sync_and_clear` (KVM dirty log + VMM
//!   writes, merged with `DirtyBitmap::merge_words`), `pause` (stops the vCPUs *and*
//!   saves the device state, since that is the last fallible step the current API
//!   offers), `resume`;
//! - destination: `DestinationConfig::new` (+ `accept_timeout`),
//!   `DestinationListener::bind`/`local_addr`/`accept(Some(memory))`,
//!   `Destination::wait` → `Migrated { device_state, stats, .. }`, `DeviceSection`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use pagewire::protocol::{Authentication, CodecId, RegionId, SessionId, SessionKey};
use pagewire::{
    DestinationConfig, DestinationListener, DeviceSection, DirtyBitmap, DirtyLog, DirtyLogError,
    GuestMemory, Source, SourceConfig,
};

use crate::args::{Args, Codec};
use crate::dirty::DirtyTracker;
use crate::machine::Section;
use crate::memory::Ram;
use crate::vcpu::Vcpus;

const SESSION: SessionId = SessionId(*b"pagewire-vmm-v01");
/// The key both processes use when no `--key-file` is given. Fine for a test on one
/// machine; anyone who knows it can write into the destination's guest.
const DEFAULT_KEY: &[u8] = b"pagewire-vmm built-in test key; use --key-file";

fn auth(args: &Args) -> anyhow::Result<Authentication> {
    let key = match &args.key_file {
        Some(p) => {
            let mut k = std::fs::read(p)
                .with_context(|| format!("reading the key file {}", p.display()))?;
            while k.last().is_some_and(|b| b.is_ascii_whitespace()) {
                k.pop();
            }
            k
        }
        None => DEFAULT_KEY.to_vec(),
    };
    Ok(Authentication::PreSharedKey(
        SessionKey::new(key).context("the key (at least 16 bytes)")?,
    ))
}

fn describe(ram: &Arc<Ram>) -> anyhow::Result<Arc<GuestMemory>> {
    // SAFETY: the caller keeps `ram` (an Arc the machine holds for the process's life)
    // mapped and unchanged while the returned value and any migration use it.
    let m = unsafe { GuestMemory::from_vm_memory(&**ram, crate::guest::PAGE as u32) }
        .context("describing guest memory to pagewire")?;
    Ok(Arc::new(m))
}

/// What the source does at the pause: stop the vCPUs, then capture the device state.
pub trait PauseHook: Send {
    /// Stops the guest and returns its device state.
    ///
    /// # Errors
    /// The guest could not be stopped or saved; it must be running again on return.
    fn pause_and_save(&mut self) -> anyhow::Result<Vec<Section>>;
}

/// pagewire's view of the VMM: KVM's dirty log and the vCPUs.
struct KvmLog<'a> {
    dirty: &'a DirtyTracker,
    vcpus: &'a Vcpus,
    hook: &'a mut dyn PauseHook,
    saved: Arc<Mutex<Vec<Section>>>,
}

impl DirtyLog for KvmLog<'_> {
    fn sync_and_clear(
        &mut self,
        region: RegionId,
        into: &DirtyBitmap,
    ) -> Result<(), DirtyLogError> {
        let words = self.dirty.take(region.0 as usize)?;
        into.merge_words(&words);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), DirtyLogError> {
        let sections = self.hook.pause_and_save().map_err(|e| format!("{e:#}"))?;
        *self.saved.lock().map_err(|_| "device state lock")? = sections;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DirtyLogError> {
        self.vcpus.resume();
        Ok(())
    }
}

/// The source's result.
pub struct SourceReport {
    /// Whether the destination took over.
    pub completed: bool,
    /// Why not.
    pub error: Option<String>,
    /// pagewire's statistics as JSON (when completed).
    pub stats: serde_json::Value,
    /// Human-readable statistics.
    pub text: String,
}

/// Live-migrates the running guest to `to`. On failure the vCPUs run (pagewire
/// resumes them if it had paused them).
pub fn migrate_out(
    args: &Args,
    to: SocketAddr,
    ram: &Arc<Ram>,
    dirty: &DirtyTracker,
    vcpus: &Vcpus,
    hook: &mut dyn PauseHook,
    on_connected: &mut dyn FnMut(),
) -> SourceReport {
    let fail = |e: String| SourceReport {
        completed: false,
        error: Some(e),
        stats: serde_json::Value::Null,
        text: String::new(),
    };
    let mut cfg = match auth(args) {
        Ok(a) => SourceConfig::new(SESSION, a),
        Err(e) => return fail(format!("{e:#}")),
    };
    cfg.channels = args.channels;
    cfg.codec = match args.codec {
        Codec::Zstd => CodecId::ZSTD,
        Codec::Lz4 => CodecId::LZ4,
        Codec::None => CodecId::RAW,
    };
    cfg.bandwidth_limit = args.bandwidth_mbit * 1_000_000 / 8;
    cfg.precopy.downtime_limit = Duration::from_millis(args.downtime_ms);
    cfg.precopy.max_rounds = args.max_rounds;
    cfg.send_timeout = args.timeout;
    cfg.ack_timeout = args.timeout;
    let memory = match describe(ram) {
        Ok(m) => m,
        Err(e) => return fail(format!("{e:#}")),
    };
    let mut source = match Source::connect(to, memory, cfg) {
        Ok(s) => s,
        Err(e) => return fail(format!("connecting to {to}: {e}")),
    };
    on_connected();
    let saved = Arc::new(Mutex::new(Vec::new()));
    let mut log = KvmLog {
        dirty,
        vcpus,
        hook,
        saved: saved.clone(),
    };
    let mut device_state = || {
        saved
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
            .into_iter()
            .map(|s| DeviceSection {
                name: s.name,
                instance: s.instance,
                data: s.data,
            })
            .collect()
    };
    match pagewire::migrate(&mut source, &mut log, &mut device_state) {
        Ok(stats) => SourceReport {
            completed: true,
            error: None,
            stats: serde_json::to_value(&stats).unwrap_or_default(),
            text: stats.to_string(),
        },
        Err(f) => fail(format!(
            "{} ({} pages unacknowledged)",
            f.error,
            f.unacknowledged_pages()
        )),
    }
}

/// A destination waiting for a migration.
pub struct Incoming {
    listener: DestinationListener,
}

/// What arrived.
pub struct Received {
    /// Device state sections.
    pub sections: Vec<Section>,
    /// pagewire's destination statistics as JSON.
    pub stats: serde_json::Value,
    /// From accepting the channels to completion.
    pub receive_ms: f64,
}

impl Incoming {
    /// Listens on `addr`.
    ///
    /// # Errors
    /// Binding failed.
    pub fn bind(args: &Args, addr: SocketAddr) -> anyhow::Result<Self> {
        let mut cfg = DestinationConfig::new(SESSION, auth(args)?);
        cfg.accept_timeout = args.accept_timeout;
        let listener = DestinationListener::bind(addr, cfg)?;
        Ok(Self { listener })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Accepts the source's channels, placing pages straight into `ram`, and waits
    /// for the migration to complete. Nothing else may touch `ram` meanwhile.
    ///
    /// # Errors
    /// The migration failed; the guest must not run.
    pub fn receive(
        &self,
        ram: &Arc<Ram>,
        on_accepted: &mut dyn FnMut(),
    ) -> anyhow::Result<Received> {
        let memory = describe(ram)?;
        let dest = self
            .listener
            .accept(Some(memory))
            .context("accepting the source's channels")?;
        on_accepted();
        let t = Instant::now();
        let migrated = dest.wait().map_err(|e| anyhow!("{e}"))?;
        Ok(Received {
            receive_ms: t.elapsed().as_secs_f64() * 1e3,
            stats: serde_json::to_value(&migrated.stats).unwrap_or_default(),
            sections: migrated
                .device_state
                .into_iter()
                .map(|s| Section {
                    name: s.name,
                    instance: s.instance,
                    data: s.data,
                })
                .collect(),
        })
    }
}
