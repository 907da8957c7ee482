//! Every use of pagewire in the VMM, in one place.
//!
//! The source hands pagewire three views of the machine ([`SourceVm`]): KVM's dirty
//! log (`DirtyLog`: logging switched on by `start`, off by `stop` on every way out,
//! `KVM_GET_DIRTY_LOG`/`KVM_CLEAR_DIRTY_LOG` or the dirty rings in `sync_and_clear`,
//! plus the VMM's own writes), the vCPUs (`VcpuControl`), and the device state
//! (`DeviceState`: vCPU state and the VMM's own section, written into pagewire's
//! writer during downtime). `Migration::run` ends in one of three ways, each handled by
//! the caller: committed (the destination owns the guest), failed with the guest
//! running here, or outcome unknown (the guest stays paused here).
//!
//! The destination hands pagewire the guest RAM it built (`DestinationMemory::Given`)
//! and starts the vCPUs only after `Destination::wait` returned `Ok`, which happens
//! only after the source's COMMIT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use pagewire::{
    Authentication, CodecId, DestinationConfig, DestinationControl, DestinationListener,
    DestinationMemory, DeviceState, DeviceStateWriter, DirtyBitmap, DirtyLog, DirtyLogError,
    GuestMemory, Migration, MigrationError, RegionId, RoundAction, SessionId, SessionKey, Source,
    SourceConfig, VcpuControl,
};

use crate::args::{Args, Codec};
use crate::machine::Section;
use crate::memory::Ram;

const SESSION: SessionId = SessionId(*b"pagewire-vmm-v01");
/// The key both processes use when no `--key-file` is given. Fine for a test on one
/// machine; anyone who knows it can write into the destination's guest.
const DEFAULT_KEY: &[u8] = b"pagewire-vmm built-in test key; use --key-file";

fn auth(args: &Args) -> anyhow::Result<Authentication> {
    // The key file by the rule every pagewire tool follows (its bytes, one trailing
    // newline removed).
    Ok(Authentication::PreSharedKey(match &args.key_file {
        Some(p) => pagewire::key_from_file(p)?,
        None => SessionKey::new(DEFAULT_KEY).context("the built-in key")?,
    }))
}

fn describe(ram: &Arc<Ram>) -> anyhow::Result<Arc<GuestMemory>> {
    // SAFETY: the caller keeps `ram` (an Arc the machine holds for the process's life)
    // mapped and unchanged while the returned value and any migration use it.
    let m = unsafe { GuestMemory::from_vm_memory(&**ram, crate::guest::PAGE as u32) }
        .context("describing guest memory to pagewire")?;
    Ok(Arc::new(m))
}

/// The source machine as pagewire sees it.
pub trait SourceVm: Sync {
    /// Turns KVM's dirty logging on or off on every memslot.
    ///
    /// # Errors
    /// KVM refused.
    fn set_dirty_logging(&self, on: bool) -> anyhow::Result<()>;
    /// Pages of memslot `slot` dirtied since the last call (KVM's log, the dirty
    /// rings and the VMM's own writes), as bitmap words; clears them.
    ///
    /// # Errors
    /// KVM refused.
    fn take_dirty(&self, slot: usize) -> anyhow::Result<Vec<u64>>;
    /// Stops every vCPU.
    ///
    /// # Errors
    /// A vCPU did not stop.
    fn pause(&self) -> anyhow::Result<()>;
    /// Restarts the vCPUs.
    fn resume(&self);
    /// The device state, while paused: vCPU state and the VMM's section.
    ///
    /// # Errors
    /// A vCPU's state could not be read.
    fn save(&self) -> anyhow::Result<Vec<Section>>;
}

fn vmm_error(e: anyhow::Error) -> DirtyLogError {
    format!("{e:#}").into()
}

/// KVM's dirty log.
struct KvmLog<'a>(&'a dyn SourceVm);

impl DirtyLog for KvmLog<'_> {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.0.set_dirty_logging(true).map_err(vmm_error)
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.0.set_dirty_logging(false).map_err(vmm_error)
    }

    fn sync_and_clear(
        &mut self,
        region: RegionId,
        into: &DirtyBitmap,
    ) -> Result<(), DirtyLogError> {
        let words = self.0.take_dirty(region.0 as usize).map_err(vmm_error)?;
        into.merge_words(&words)?;
        Ok(())
    }
}

/// The vCPUs.
struct KvmVcpus<'a>(&'a dyn SourceVm);

impl VcpuControl for KvmVcpus<'_> {
    fn pause(&mut self) -> Result<(), DirtyLogError> {
        self.0.pause().map_err(vmm_error)
    }

    fn resume(&mut self) -> Result<(), DirtyLogError> {
        self.0.resume();
        Ok(())
    }
}

/// The device state, streamed into pagewire's writer.
struct KvmDevices<'a>(&'a dyn SourceVm);

impl DeviceState for KvmDevices<'_> {
    fn pending_bytes(&self) -> u64 {
        // vCPU state and the VMM's section: a few KiB.
        16 << 10
    }

    fn save(&mut self, out: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        for s in self.0.save().map_err(vmm_error)? {
            out.write_section(&s.name, s.instance, &s.data)?;
        }
        Ok(())
    }
}

/// How a source's migration ended.
pub enum Outcome {
    /// The destination owns the guest: discard it here.
    Committed,
    /// Failed; the guest runs here (pagewire resumed it if it had paused it).
    Failed,
    /// COMMIT went out unacknowledged: the destination may run the guest. It stays
    /// paused here until someone asks the destination.
    Unknown,
}

/// The source's result.
pub struct SourceReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Why not committed.
    pub error: Option<String>,
    /// pagewire's statistics as JSON (when committed).
    pub stats: serde_json::Value,
    /// Human-readable statistics.
    pub text: String,
    /// Per pre-copy round: round, dirty pages left, expected downtime (ms).
    pub rounds: Vec<serde_json::Value>,
}

/// Live-migrates the running guest to `to`.
pub fn migrate_out(
    args: &Args,
    to: SocketAddr,
    ram: &Arc<Ram>,
    vm: &dyn SourceVm,
    on_connected: &mut dyn FnMut(),
) -> SourceReport {
    let fail = |e: String| SourceReport {
        outcome: Outcome::Failed,
        error: Some(e),
        stats: serde_json::Value::Null,
        text: String::new(),
        rounds: Vec::new(),
    };
    let mut cfg = match auth(args) {
        Ok(a) => SourceConfig::new(SESSION, a),
        Err(e) => return fail(format!("{e:#}")),
    };
    if args.tls.enabled {
        match args.tls.side(true) {
            Ok(t) => cfg.encryption = pagewire::Encryption::Tls(t),
            Err(e) => return fail(format!("TLS: {e:#}")),
        }
    }
    cfg.channels = args.channels;
    cfg.codec = match args.codec {
        Codec::Auto => pagewire::CodecPolicy::auto(),
        Codec::Zstd => CodecId::ZSTD.into(),
        Codec::Lz4 => CodecId::LZ4.into(),
        Codec::None => CodecId::RAW.into(),
    };
    cfg.bandwidth_limit = args.bandwidth_mbit * 1_000_000 / 8;
    cfg.precopy.downtime_limit = Duration::from_millis(args.downtime_ms);
    cfg.precopy.max_rounds = args.max_rounds;
    cfg.send_timeout = args.timeout;
    cfg.ack_timeout = args.timeout;
    // The destination's idle timeout is the same `--timeout`: keepalives well within.
    cfg.keepalive = (args.timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let memory = match describe(ram) {
        Ok(m) => m,
        Err(e) => return fail(format!("{e:#}")),
    };
    let mut source = match Source::connect(to, memory, cfg) {
        Ok(s) => s,
        Err(e) => return fail(format!("connecting to {to}: {e}")),
    };
    on_connected();
    let mut rounds = Vec::new();
    let (mut log, mut vcpus, mut devices) = (KvmLog(vm), KvmVcpus(vm), KvmDevices(vm));
    let result = Migration::new(&mut source, &mut log, &mut vcpus)
        .device_state(&mut devices)
        .on_round(|p| {
            rounds.push(serde_json::json!({
                "round": p.round,
                "dirty_pages": p.dirty_pages,
                "expected_downtime_ms": p.expected_downtime.map(|d| d.as_secs_f64() * 1e3),
                "mbit_per_s": p.last_round_mbit_per_s,
            }));
            RoundAction::Continue
        })
        .run();
    match result {
        Ok(stats) => SourceReport {
            outcome: Outcome::Committed,
            error: None,
            stats: serde_json::to_value(&stats).unwrap_or_default(),
            text: stats.to_string(),
            rounds,
        },
        Err(f) => SourceReport {
            outcome: if f.may_resume_source() {
                Outcome::Failed
            } else {
                Outcome::Unknown
            },
            error: Some(format!(
                "{f} ({} pages unacknowledged)",
                f.unacknowledged_pages()
            )),
            stats: serde_json::Value::Null,
            text: String::new(),
            rounds,
        },
    }
}

/// A destination waiting for a migration.
pub struct Incoming {
    listener: DestinationListener,
    config: DestinationConfig,
    control: DestinationControl,
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
    /// Listens on `addr`, for a migration into the machine `restorer` loads state into.
    ///
    /// # Errors
    /// Binding failed.
    pub fn bind(
        args: &Args,
        addr: SocketAddr,
        restorer: crate::machine::Restorer,
    ) -> anyhow::Result<Self> {
        let mut cfg = DestinationConfig::new(SESSION, auth(args)?);
        if args.tls.enabled {
            cfg.encryption = pagewire::Encryption::Tls(args.tls.side(false)?);
        }
        cfg.accept_timeout = args.accept_timeout;
        cfg.idle_timeout = args.timeout;
        if args.channels_given {
            cfg.limits.max_channels = args.channels;
        }
        // The device state is checked before ACK COMPLETE, while the source still owns
        // the guest: a source with another vCPU count keeps it (PROTOCOL.md, COMPLETE).
        // The check loads it into this machine's VM and vCPUs, which have not run, so
        // whatever this host's KVM refuses is refused here, not after COMMIT; the
        // resume loads the same bytes again.
        let vcpus = args.vcpus;
        cfg.check_device_state = Some(pagewire::DeviceStateCheck::new(move |sections| {
            let it = sections
                .iter()
                .map(|s| (s.name.as_str(), s.instance, s.data.as_slice()));
            crate::machine::Machine::check_sections(vcpus, it.clone())
                .and_then(|()| restorer.restore(it))
                .map_err(|e| format!("{e:#}"))
        }));
        let listener = DestinationListener::bind(addr, cfg.clone())?;
        Ok(Self {
            listener,
            config: cfg,
            control: DestinationControl::new(),
        })
    }

    /// Cancels the incoming migration from any thread (e.g. on SIGTERM).
    pub fn control(&self) -> DestinationControl {
        self.control.clone()
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
            .accept_controlled(
                &self.config,
                DestinationMemory::Given(memory),
                &self.control,
            )
            .context("accepting the source's channels")?;
        on_accepted();
        let t = Instant::now();
        // `Ok` only after the source's COMMIT: then, and only then, this side owns the
        // guest (PROTOCOL.md, Switchover).
        let migrated = dest.wait().map_err(|e| match e {
            MigrationError::Cancelled => anyhow!("cancelled"),
            e => anyhow!("{e}"),
        })?;
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
