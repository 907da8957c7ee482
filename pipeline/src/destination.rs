//! The destination side: accepts the session's channels, learns the layout, and applies
//! every frame straight into guest memory, one receiver thread per channel.
//!
//! Raw pages are placed into guest memory by the transport itself (no bounce buffer);
//! compressed frames are decoded by the frame's codec id directly into the guest pages.
//! Each channel applies its frames in arrival order, and page-to-channel affinity keeps
//! every version of a page on one channel, so an older version never overwrites a newer
//! one (see [`crate::plan`]). Every rule of the session lives in the protocol crate's
//! state machines ([`DestinationSession`], [`DestinationChannel`]), which this module
//! drives: a PAGES frame is checked against the layout, the open round and the affinity
//! carried in LAYOUT **before** a byte of it is placed or decoded, so two receiver
//! threads never write the same page; the layout is checked against
//! [`DestinationConfig::limits`] before any memory is mapped. Completion is verified
//! only when every channel has ended the final round with the frame and page counts the
//! source announced, and every device-state section has arrived whole; success is
//! reported only after that, once the source's COMMIT hands the guest over.
//!
//! One bound [`DestinationListener`] serves one session after another, and, shared
//! between threads, up to [`DestinationConfig::max_sessions`] at once:
//! [`DestinationListener::accept`] for the session it was bound with,
//! [`DestinationListener::accept_with`] for any other id and key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire_accel::{Codecs, PageKey, PageListMut, PageSize};
use pagewire_protocol::session::CompleteProgress;
use pagewire_protocol::{
    Abort, AbortReason, Ack, AckKind, Capabilities, ChannelId, CodecSet, Commit, Complete,
    DestinationChannel, DestinationEvent, DestinationSession, Frame, MemoryLayout, PageFrame,
    Round, SessionError,
};
use pagewire_transport::session::{AnyChannel, Listener, SessionConfig};
use pagewire_transport::{
    Channel, Endpoint, GuestSlice, Incoming, OutFrame, PageSink, RegionSink, Stream, StreamListener,
};

use crate::config::{DestinationConfig, Prefault};
use crate::error::MigrationError;
use crate::memory::{DestinationMemory, GuestMemory};
use crate::source::{frame_bytes, transport_views};
use crate::stats::{Latency, LatencySummary};

/// A device-state section as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSection {
    /// Its name.
    pub name: String,
    /// Its instance number.
    pub instance: u32,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// What the destination measured.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DestinationStats {
    /// PAGES frames applied.
    pub frames: u64,
    /// Data pages applied.
    pub data_pages: u64,
    /// Zero pages applied.
    pub zero_pages: u64,
    /// Uniform pages (one byte repeated) applied.
    pub uniform_pages: u64,
    /// Raw payload bytes the transport placed straight into guest memory.
    pub placed_bytes: u64,
    /// TLS: plaintext bytes opened from records (0 in clear), counted as each
    /// channel ends.
    pub tls_opened_bytes: u64,
    /// TLS: bytes copied in user space on the TLS receive path (0 in clear); over
    /// `data_pages`, the copies TLS costs per page. Counted as each channel ends.
    pub tls_copied_bytes: u64,
    /// Time the background pre-fault thread took ([`Prefault::Thread`] only; 0
    /// otherwise), ms.
    pub prefault_ms: f64,
    /// Frame apply latency.
    pub apply_latency: LatencySummary,
    /// CPU the destination's threads used (receivers, the pre-fault thread and the
    /// userfaultfd handler of [`Prefault::Install`]; the receivers' share is counted
    /// when each ends, the handler's when the memory is handed over).
    pub cpu: crate::stats::CpuSummary,
    /// Frames given to a hardware codec engine ([`DestinationConfig::accel`]).
    ///
    /// [`DestinationConfig::accel`]: crate::DestinationConfig::accel
    pub hw_decodes: u64,
    /// Of those, frames the hardware handed to software.
    pub hw_fallbacks: u64,
    /// Those per cause.
    pub hw_fallback_causes: crate::stats::FallbackSummary,
    /// Pages installed with `UFFDIO_COPY` ([`Prefault::Install`]).
    pub installed_pages: u64,
    /// Pages that were already present when they were to be installed (copied
    /// normally instead).
    pub install_present: u64,
    /// Accesses to pages not yet installed that the userfaultfd handler resolved with
    /// zeros (a decoder or transport writing in place, a read).
    pub install_faults: u64,
    /// Why [`Prefault::Install`] was asked for but not used (userfaultfd unavailable);
    /// the memory was then faulted in as with [`Prefault::None`].
    pub install_unavailable: Option<String>,
}

/// A migration that completed: the memory, the device state and the statistics.
#[non_exhaustive]
#[derive(Debug)]
pub struct Migrated {
    /// Guest memory as migrated.
    pub memory: Arc<GuestMemory>,
    /// Device-state sections, in arrival order.
    pub device_state: Vec<DeviceSection>,
    /// The final round.
    pub final_round: u32,
    /// Statistics.
    pub stats: DestinationStats,
}

/// A bound destination, waiting for the source's channels.
#[derive(Debug)]
pub struct DestinationListener {
    listener: Listener,
    config: DestinationConfig,
    scfg: SessionConfig,
    /// The RDMA listener, for `Backend::Rdma`, bound with the socket.
    rdma: Option<Arc<pagewire_transport::rdma::RdmaAcceptor>>,
}

/// The RDMA listener a `Backend::Rdma` configuration asks for (bound now, so a build
/// without RDMA or a host without a device fails here, saying which).
fn rdma_acceptor(
    config: &DestinationConfig,
) -> Result<Option<Arc<pagewire_transport::rdma::RdmaAcceptor>>, MigrationError> {
    match config.backend {
        pagewire_transport::session::Backend::Rdma { addr } => {
            pagewire_transport::rdma::RdmaAcceptor::bind(addr)
                .map(|a| Some(Arc::new(a)))
                .map_err(|e| {
                    MigrationError::Session(pagewire_transport::session::SessionError::Rdma(
                        Box::new(e),
                    ))
                })
        }
        _ => Ok(None),
    }
}

impl DestinationListener {
    /// Listens on the TCP address `addr`.
    ///
    /// # Errors
    /// [`MigrationError::Session`] when the socket cannot be bound or a listener
    /// setting (`max_pending`, `max_sessions`, `limits.max_channels`) is zero.
    pub fn bind(addr: SocketAddr, config: DestinationConfig) -> Result<Self, MigrationError> {
        Self::bind_endpoint(&Endpoint::Tcp(addr), config)
    }

    /// Listens on `endpoint`: a TCP address, or a Unix socket path (local migrations;
    /// the path must not exist, and is not removed when the listener is dropped).
    ///
    /// # Errors
    /// As [`Self::bind`].
    pub fn bind_endpoint(
        endpoint: &Endpoint,
        config: DestinationConfig,
    ) -> Result<Self, MigrationError> {
        let scfg = session_config(&config);
        let rdma = rdma_acceptor(&config)?;
        let listener = Listener::bind_endpoint(endpoint, &scfg)?;
        Ok(Self {
            listener,
            config,
            scfg,
            rdma,
        })
    }

    /// Accepts on a listening socket the caller bound (e.g. handed over by a
    /// management layer): a `std::net::TcpListener` or a
    /// `std::os::unix::net::UnixListener`, blocking or not. Every setting of `config`
    /// applies as with [`Self::bind`] (the backlog is set on the socket again).
    ///
    /// # Errors
    /// As [`Self::bind`].
    pub fn from_listener(
        listener: impl Into<StreamListener>,
        config: DestinationConfig,
    ) -> Result<Self, MigrationError> {
        let scfg = session_config(&config);
        let rdma = rdma_acceptor(&config)?;
        let listener = Listener::from_listener(listener, &scfg)?;
        Ok(Self {
            listener,
            config,
            scfg,
            rdma,
        })
    }

    /// The TCP address to give the source.
    ///
    /// # Errors
    /// The socket's error; `InvalidInput` on a Unix socket (see
    /// [`Self::local_endpoint`]).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The endpoint to give the source: the TCP address or the Unix socket's path.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_endpoint(&self) -> std::io::Result<Endpoint> {
        self.listener.local_endpoint()
    }

    /// What the listener did with the connections it saw (refusals, timeouts, accept
    /// errors); readable while [`Self::accept`] runs on another thread.
    pub fn stats(&self) -> pagewire_transport::session::ListenerStats {
        self.listener.stats()
    }

    /// How many sessions are being accepted right now ([`Self::accept`] and
    /// [`Self::accept_with`] calls in progress).
    pub fn accepting(&self) -> usize {
        self.listener.accepting()
    }

    /// Accepts the session's channels and starts applying frames. With `memory`, the
    /// source's layout must match it; without, the destination allocates guest memory
    /// when the layout arrives and pre-faults it in the background. The listener stays
    /// bound: after a failed or hostile attempt, call `accept` again.
    ///
    /// # Errors
    /// [`MigrationError::Session`] when the channels do not all arrive in time, or when
    /// this session is already being accepted or `max_sessions` sessions are.
    pub fn accept(&self, memory: Option<Arc<GuestMemory>>) -> Result<Destination, MigrationError> {
        self.accept_session(
            &self.config,
            &self.scfg,
            memory.into(),
            &DestinationControl::new(),
        )
    }

    /// As [`Self::accept`], with the guest memory chosen by `memory`: anonymous, given,
    /// or asked of the VMM's [`MemoryProvider`](crate::MemoryProvider) once the layout
    /// arrived.
    ///
    /// # Errors
    /// As [`Self::accept`].
    pub fn accept_into(&self, memory: DestinationMemory) -> Result<Destination, MigrationError> {
        self.accept_session(&self.config, &self.scfg, memory, &DestinationControl::new())
    }

    /// Accepts the channels of the session `config` describes (its own session id,
    /// authentication, page size, limits, timeouts and backend) on this bound listener,
    /// like [`Self::accept`]. Share the listener (e.g. in an `Arc`) and call this from
    /// one thread per incoming migration to accept several at once, up to the
    /// `max_sessions` the listener was bound with; each connection goes to the session
    /// its handshake names. `config.max_sessions` is not used here.
    ///
    /// # Errors
    /// As [`Self::accept`]; [`MigrationError::Session`] also for a `config` whose
    /// listener settings are zero.
    pub fn accept_with(
        &self,
        config: &DestinationConfig,
        memory: Option<Arc<GuestMemory>>,
    ) -> Result<Destination, MigrationError> {
        self.accept_session(
            config,
            &session_config(config),
            memory.into(),
            &DestinationControl::new(),
        )
    }

    /// [`Self::accept_with`] with the memory chosen as in [`Self::accept_into`].
    ///
    /// # Errors
    /// As [`Self::accept_with`].
    pub fn accept_with_into(
        &self,
        config: &DestinationConfig,
        memory: DestinationMemory,
    ) -> Result<Destination, MigrationError> {
        self.accept_session(
            config,
            &session_config(config),
            memory,
            &DestinationControl::new(),
        )
    }

    /// The most general accept: the session `config` describes, the memory `memory`
    /// chooses, and a `control` made beforehand ([`DestinationControl::new`]) that can
    /// cancel the migration from another thread at any point, while the channels are
    /// still being accepted (this call then returns [`MigrationError::Cancelled`]) or
    /// afterwards (as [`Destination::control`]).
    ///
    /// # Errors
    /// As [`Self::accept_with`], and [`MigrationError::Cancelled`].
    pub fn accept_controlled(
        &self,
        config: &DestinationConfig,
        memory: DestinationMemory,
        control: &DestinationControl,
    ) -> Result<Destination, MigrationError> {
        self.accept_session(config, &session_config(config), memory, control)
    }

    fn accept_session(
        &self,
        config: &DestinationConfig,
        scfg: &SessionConfig,
        memory: DestinationMemory,
        control: &DestinationControl,
    ) -> Result<Destination, MigrationError> {
        let mut scfg = scfg.clone();
        if let pagewire_transport::session::Backend::Rdma { .. } = config.backend {
            // The session's registration: the given memory, registered once for all
            // its channels (a fresh registration per session).
            let DestinationMemory::Given(m) = &memory else {
                return Err(MigrationError::Config(
                    "the RDMA backend needs the destination's guest memory up front (accept with Some(memory) or DestinationMemory::Given)".into(),
                ));
            };
            let Some(acceptor) = self.rdma.clone() else {
                return Err(MigrationError::Config(
                    "the RDMA backend must be chosen when the listener is bound".into(),
                ));
            };
            scfg.rdma =
                pagewire_transport::rdma::RdmaConfig::new(crate::source::transport_views(m));
            scfg.rdma.recv_timeout = Some(config.idle_timeout);
            scfg.rdma_acceptor = Some(acceptor);
        }
        let scfg = &scfg;
        let accepted = self
            .listener
            .accept_session_until(scfg, config.accept_timeout, &|| control.is_cancelled())
            .map_err(|e| match e {
                pagewire_transport::session::SessionError::Cancelled => MigrationError::Cancelled,
                e => MigrationError::Session(e),
            })?;
        let n = accepted.channels.len() as u16;
        let rules = DestinationSession::new(n, config.page_size, config.limits)
            .map_err(|source| MigrationError::Rule { channel: 0, source })?;
        let shared = Arc::new(Shared {
            page_size: config.page_size,
            wait: config.idle_timeout,
            // Memory the VMM gives or provides is used as it is.
            prefault: match &memory {
                DestinationMemory::Anonymous => config.prefault,
                _ => Prefault::None,
            },
            provider: match &memory {
                DestinationMemory::Provider(_) => memory.clone(),
                _ => DestinationMemory::Anonymous,
            },
            sockets: Mutex::new(Vec::new()),
            cancelled: AtomicBool::new(false),
            memory: Mutex::new(match memory {
                DestinationMemory::Given(m) => Some((m, None)),
                _ => None,
            }),
            state: Mutex::new(State {
                rules,
                failed: None,
                sections: Vec::new(),
            }),
            cv: Condvar::new(),
            apply: Latency::default(),
            frames: AtomicU64::new(0),
            data_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            uniform_pages: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            tls_opened: AtomicU64::new(0),
            tls_copied: AtomicU64::new(0),
            prefault_ns: Arc::new(AtomicU64::new(0)),
            install: OnceLock::new(),
            install_unavailable: OnceLock::new(),
            cpu_ns: Arc::new(AtomicU64::new(0)),
            hw_decodes: AtomicU64::new(0),
            hw_fallbacks: Mutex::new(pagewire_accel::FallbackCounts::default()),
            started: Instant::now(),
        });
        let mut threads = Vec::new();
        for est in accepted.channels {
            let ch = est.negotiated.channel.0;
            if let (Ok(mut sockets), Ok(dup)) = (shared.sockets.lock(), est.stream.try_clone()) {
                sockets.push(dup);
            }
            let shared2 = shared.clone();
            let backend = config.backend;
            let accel = config.accel.clone();
            let max_pages = config.max_pages;
            let scfg = scfg.clone();
            let t = std::thread::Builder::new()
                .name(format!("pagewire-dst-{ch}"))
                .spawn(move || {
                    // Opened here: an io_uring ring accepts submissions only from the
                    // thread that created it.
                    let mut channel = match est.open(&backend, &scfg) {
                        Ok(c) => c,
                        Err(e) => {
                            let e = MigrationError::from(e);
                            shared2.fail(e.to_string());
                            return Err(e);
                        }
                    };
                    let rules = match shared2.state(ch).and_then(|s| {
                        s.rules
                            .channel(ChannelId(ch))
                            .map_err(|source| MigrationError::Rule {
                                channel: ch,
                                source,
                            })
                    }) {
                        Ok(r) => r,
                        Err(e) => {
                            shared2.fail(e.to_string());
                            return Err(e);
                        }
                    };
                    let hw =
                        match crate::hwdecode::Decoder::new(&accel, shared2.page_size, max_pages) {
                            Ok(d) => d,
                            Err(e) => {
                                shared2.fail(e.to_string());
                                return Err(e);
                            }
                        };
                    let mut r = Receiver {
                        ch,
                        shared: shared2.clone(),
                        rules,
                        codecs: Codecs::new(),
                        lengths: Vec::new(),
                        hw,
                        runs: Vec::new(),
                        scratch: Vec::new(),
                    };
                    let cpu = pagewire_accel::thread_cpu_time();
                    let res = r.run(&mut channel);
                    shared2.add_cpu(pagewire_accel::thread_cpu_time().saturating_sub(cpu));
                    let st = channel.stats();
                    shared2
                        .tls_opened
                        .fetch_add(st.tls_bytes_opened, Ordering::Relaxed);
                    shared2
                        .tls_copied
                        .fetch_add(st.tls_bytes_copied, Ordering::Relaxed);
                    if let Err(e) = &res {
                        r.abort(&mut channel, e);
                        shared2.fail(e.to_string());
                    }
                    res
                })
                .map_err(|_| MigrationError::Worker(ch))?;
            threads.push(t);
        }
        control.attach(&shared);
        Ok(Destination {
            threads,
            shared,
            control: control.clone(),
            started: Instant::now(),
        })
    }
}

/// The transport's settings for the session `config` describes.
fn session_config(config: &DestinationConfig) -> SessionConfig {
    let mut caps = Capabilities::new(config.page_size);
    caps.max_pages = config.max_pages;
    caps.max_frame_bytes = frame_bytes(config.page_size, config.max_pages);
    caps.checksum = config.checksum;
    caps.codecs = CodecSet::all_known();
    let mut scfg = SessionConfig::new(caps, config.session, 1, config.auth.clone());
    scfg.tcp.recv_timeout = Some(config.idle_timeout);
    scfg.uring.recv_timeout = Some(config.idle_timeout);
    scfg.handshake_timeout = config.handshake_timeout;
    scfg.listener.max_pending = config.max_pending;
    scfg.listener.max_channels = config.limits.max_channels;
    scfg.listener.max_sessions = config.max_sessions;
    scfg.encryption = config.encryption.clone();
    scfg
}

/// Cancels an incoming migration from any thread: [`Destination::wait`] (or an
/// [`accept_controlled`](DestinationListener::accept_controlled) still waiting for the
/// channels) then returns [`MigrationError::Cancelled`] and never reports success, and
/// the guest must not be started. Every blocked wait wakes: the channels' sockets are
/// shut down (so the source sees them close), the wait for other channels at COMPLETE
/// is woken, and an accept in progress stops within 50 ms.
#[derive(Clone, Default)]
pub struct DestinationControl(Arc<ControlInner>);

#[derive(Default)]
struct ControlInner {
    cancelled: AtomicBool,
    session: Mutex<Option<std::sync::Weak<Shared>>>,
}

impl std::fmt::Debug for DestinationControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationControl")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl DestinationControl {
    /// A control for a migration not accepted yet
    /// ([`DestinationListener::accept_controlled`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the migration (idempotent).
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let session = self.0.session.lock().ok().and_then(|s| s.clone());
        if let Some(shared) = session.and_then(|w| w.upgrade()) {
            shared.cancel();
        }
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Binds the accepted session; a cancel that came meanwhile applies at once.
    fn attach(&self, shared: &Arc<Shared>) {
        if let Ok(mut s) = self.0.session.lock() {
            *s = Some(Arc::downgrade(shared));
        }
        if self.is_cancelled() {
            shared.cancel();
        }
    }
}

/// A destination receiving a migration.
#[derive(Debug)]
pub struct Destination {
    threads: Vec<JoinHandle<Result<(), MigrationError>>>,
    shared: Arc<Shared>,
    control: DestinationControl,
    started: Instant,
}

impl Destination {
    /// Statistics so far.
    pub fn stats(&self) -> DestinationStats {
        self.shared.stats()
    }

    /// A handle that cancels this migration from any thread.
    pub fn control(&self) -> DestinationControl {
        self.control.clone()
    }

    /// Since the channels were accepted.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the migration to end. Succeeds only when the source's COMPLETE was
    /// verified (every round on every channel, every device-state section) and
    /// acknowledged, **and** the source's COMMIT then arrived: only then is the guest
    /// this side's to run (PROTOCOL.md, Switchover). Start its vCPUs after this returns
    /// `Ok`, never before.
    ///
    /// # Errors
    /// The first channel's error ([`MigrationError::NoCommit`] when COMMIT did not
    /// follow ACK COMPLETE), or `Protocol` when the source went away before completing.
    pub fn wait(self) -> Result<Migrated, MigrationError> {
        let mut first = None;
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(MigrationError::Worker(u16::MAX));
                }
            }
        }
        if self.shared.cancelled.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        let committed = self
            .shared
            .state
            .lock()
            .ok()
            .and_then(|s| s.rules.committed())
            .map(|r| r.0);
        match (committed, first) {
            (Some(final_round), _) => {
                let memory = self
                    .shared
                    .memory
                    .lock()
                    .ok()
                    .and_then(|mut m| m.take())
                    .map(|(m, prefault)| {
                        if let Some(p) = prefault {
                            let _ = p.join();
                        }
                        // Nobody waits on a missing page once the VMM has the memory.
                        m.finish_install();
                        m
                    })
                    .ok_or(MigrationError::Worker(0))?;
                let device_state = self
                    .shared
                    .state
                    .lock()
                    .map(|mut s| std::mem::take(&mut s.sections))
                    .unwrap_or_default();
                Ok(Migrated {
                    memory,
                    device_state,
                    final_round,
                    stats: self.shared.stats(),
                })
            }
            (None, Some(e)) => Err(e),
            (None, None) => Err(MigrationError::Protocol {
                channel: 0,
                what: "the source closed every channel without committing".into(),
            }),
        }
    }
}

#[derive(Debug)]
struct State {
    /// The session's rules (layout, rounds ended, device state, completion).
    rules: DestinationSession,
    failed: Option<String>,
    sections: Vec<DeviceSection>,
}

type MemorySlot = Option<(Arc<GuestMemory>, Option<JoinHandle<()>>)>;

#[derive(Debug)]
struct Shared {
    page_size: u32,
    wait: Duration,
    memory: Mutex<MemorySlot>,
    /// `Provider` when the VMM chooses the memory, `Anonymous` otherwise.
    provider: DestinationMemory,
    /// Second handles on the channels' sockets, shut down by
    /// [`DestinationControl::cancel`] to wake receivers blocked on them.
    sockets: Mutex<Vec<Stream>>,
    cancelled: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    apply: Latency,
    frames: AtomicU64,
    data_pages: AtomicU64,
    zero_pages: AtomicU64,
    uniform_pages: AtomicU64,
    placed: AtomicU64,
    /// TLS bytes opened and copied, added as each channel ends.
    tls_opened: AtomicU64,
    tls_copied: AtomicU64,
    prefault: Prefault,
    prefault_ns: Arc<AtomicU64>,
    /// The userfaultfd counters ([`Prefault::Install`]), once the memory is registered.
    install: OnceLock<Arc<crate::install::InstallCounters>>,
    /// Why registering failed ([`Prefault::Install`]).
    install_unavailable: OnceLock<String>,
    /// CPU nanoseconds of the receiver and pre-fault threads.
    cpu_ns: Arc<AtomicU64>,
    /// Frames decoded on hardware, and those handed to software.
    hw_decodes: AtomicU64,
    hw_fallbacks: Mutex<pagewire_accel::FallbackCounts>,
    /// When the channels were accepted.
    started: Instant,
}

impl Shared {
    fn add_cpu(&self, d: Duration) {
        self.cpu_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn stats(&self) -> DestinationStats {
        let pages = self.data_pages.load(Ordering::Relaxed)
            + self.zero_pages.load(Ordering::Relaxed)
            + self.uniform_pages.load(Ordering::Relaxed);
        let install = self.install.get();
        let counted = |f: fn(&crate::install::InstallCounters) -> &AtomicU64| {
            install.map_or(0, |c| f(c).load(Ordering::Relaxed))
        };
        DestinationStats {
            installed_pages: counted(|c| &c.installed),
            install_present: counted(|c| &c.present),
            install_faults: counted(|c| &c.faults),
            install_unavailable: self.install_unavailable.get().cloned(),
            cpu: crate::stats::CpuSummary::new(
                Duration::from_nanos(
                    self.cpu_ns.load(Ordering::Relaxed) + counted(|c| &c.handler_cpu_ns),
                ),
                self.started.elapsed(),
                pages * u64::from(self.page_size),
            ),
            frames: self.frames.load(Ordering::Relaxed),
            data_pages: self.data_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            uniform_pages: self.uniform_pages.load(Ordering::Relaxed),
            placed_bytes: self.placed.load(Ordering::Relaxed),
            tls_opened_bytes: self.tls_opened.load(Ordering::Relaxed),
            tls_copied_bytes: self.tls_copied.load(Ordering::Relaxed),
            prefault_ms: self.prefault_ns.load(Ordering::Relaxed) as f64 / 1e6,
            apply_latency: self.apply.summary(),
            hw_decodes: self.hw_decodes.load(Ordering::Relaxed),
            hw_fallbacks: self.hw_fallbacks.lock().map_or(0, |c| c.total()),
            hw_fallback_causes: {
                let mut s = crate::stats::FallbackSummary::default();
                if let Ok(c) = self.hw_fallbacks.lock() {
                    s.add(&c);
                }
                s
            },
        }
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.fail("cancelled by the destination's VMM".into());
        if let Ok(sockets) = self.sockets.lock() {
            for s in sockets.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn fail(&self, why: String) {
        if let Ok(mut s) = self.state.lock() {
            s.failed.get_or_insert(why);
        }
        self.cv.notify_all();
    }

    fn state(&self, ch: u16) -> Result<std::sync::MutexGuard<'_, State>, MigrationError> {
        self.state.lock().map_err(|_| MigrationError::Worker(ch))
    }

    /// The guest memory for `layout`: the one given at accept (which must match), the
    /// one an earlier channel created, or a new one, pre-faulted in the background. The
    /// layout has passed the session's limits.
    fn memory_for(&self, layout: &MemoryLayout) -> Result<Arc<GuestMemory>, String> {
        let mut slot = self.memory.lock().map_err(|_| "poisoned".to_string())?;
        if let Some((m, _)) = slot.as_ref() {
            if m.layout() != layout {
                return Err("the layout differs from the guest memory already set up".into());
            }
            return Ok(m.clone());
        }
        if let DestinationMemory::Provider(p) = &self.provider {
            let m = p
                .memory_for(layout)
                .map_err(|e| format!("the VMM's memory provider refused the layout: {e}"))?;
            if m.layout() != layout {
                return Err("the VMM's memory provider returned memory of another layout".into());
            }
            *slot = Some((m.clone(), None));
            return Ok(m);
        }
        let m = Arc::new(GuestMemory::anonymous(layout).map_err(|e| e.to_string())?);
        match self.prefault {
            Prefault::Thread => {}
            Prefault::HugePages => {
                m.advise_huge_pages();
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
            Prefault::Install => {
                match m.install_pages() {
                    Ok(()) => {
                        if let Some(c) = m.install_counters() {
                            let _ = self.install.set(c);
                        }
                    }
                    // Not an error: the pages are faulted in as without a policy.
                    Err(e) => {
                        let _ = self.install_unavailable.set(error_chain(&e));
                    }
                }
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
            _ => {
                *slot = Some((m.clone(), None));
                return Ok(m);
            }
        }
        let m2 = m.clone();
        let ns = self.prefault_ns.clone();
        let shared_cpu = self.cpu_ns.clone();
        let prefault = std::thread::Builder::new()
            .name("pagewire-prefault".into())
            .spawn(move || {
                let t = Instant::now();
                let cpu = pagewire_accel::thread_cpu_time();
                m2.prefault();
                ns.store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let used = pagewire_accel::thread_cpu_time().saturating_sub(cpu);
                shared_cpu.fetch_add(
                    u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            })
            .ok();
        *slot = Some((m.clone(), prefault));
        Ok(m)
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A page sink that asks the channel's rules before the transport places a byte: a
/// frame the rules refuse is received whole instead, and refused there.
struct CheckedSink<'a> {
    rules: &'a DestinationChannel,
    inner: &'a mut RegionSink,
    /// With [`Prefault::Ahead`]: the memory whose pages are populated before placing.
    ahead: Option<&'a GuestMemory>,
    /// With [`Prefault::Install`]: the memory whose missing pages are installed, so a
    /// frame with such pages is received whole and installed from its payload.
    install: Option<&'a GuestMemory>,
}

impl PageSink for CheckedSink<'_> {
    fn place(&mut self, frame: &PageFrame<'_>, dest: &mut Vec<GuestSlice>) -> bool {
        if self.rules.check_pages(frame).is_err() {
            return false;
        }
        if let Some(m) = self.install {
            let installs = frame
                .data_runs
                .iter()
                .any(|r| m.installs(frame.region, r.start.0, u64::from(r.count)));
            if installs {
                return false;
            }
        }
        if let Some(m) = self.ahead {
            populate_data(m, frame);
        }
        self.inner.place(frame, dest)
    }
}

/// Backs a frame's data pages in one call each run, before they are written
/// ([`Prefault::Ahead`]).
fn populate_data(memory: &GuestMemory, p: &PageFrame<'_>) {
    for run in p.data_runs.iter() {
        memory.populate(p.region, run.start.0, u64::from(run.count));
    }
}

struct Receiver {
    ch: u16,
    shared: Arc<Shared>,
    rules: DestinationChannel,
    codecs: Codecs,
    lengths: Vec<u32>,
    /// The hardware decoder, when [`DestinationConfig::accel`] chose one.
    hw: Option<crate::hwdecode::Decoder>,
    /// Scratch: the frame's destination runs for the hardware decoder.
    runs: Vec<(*mut u8, u32, u64)>,
    /// Scratch: pages decoded here before they are installed ([`Prefault::Install`]).
    scratch: Vec<u8>,
}

/// What to do after a frame, once the channel's receive buffer is released.
enum After {
    Nothing,
    AckRound(Round),
    Complete(Complete),
    Commit(Commit),
    Closed,
}

impl Receiver {
    fn err(&self, what: impl Into<String>) -> MigrationError {
        MigrationError::Protocol {
            channel: self.ch,
            what: what.into(),
        }
    }

    fn rule(&self, source: SessionError) -> MigrationError {
        MigrationError::Rule {
            channel: self.ch,
            source,
        }
    }

    fn abort(&mut self, channel: &mut AnyChannel, e: &MigrationError) {
        let e = match e {
            MigrationError::NoCommit { source, .. } => source,
            e => e,
        };
        if matches!(
            e,
            MigrationError::Channel { .. } | MigrationError::PeerAborted { .. }
        ) {
            return;
        }
        let message = e.to_string();
        let mut end = message.len().min(200);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        if let Ok(f) = OutFrame::whole(&Frame::Abort(Abort {
            reason: AbortReason::BAD_FRAME,
            message: &message[..end],
        })) {
            let mut done = Vec::new();
            let _ = channel.send(f);
            let _ = channel.flush(&mut done);
        }
    }

    /// Receives until the source closes the channel. A failure while channel 0 waits
    /// for COMMIT after its ACK COMPLETE is [`MigrationError::NoCommit`].
    fn run(&mut self, channel: &mut AnyChannel) -> Result<(), MigrationError> {
        self.receive(channel)
            .map_err(|e| match self.rules.awaiting_commit() {
                Some(round) => MigrationError::NoCommit {
                    final_round: round.0,
                    source: Box::new(e),
                },
                None => e,
            })
    }

    fn receive(&mut self, channel: &mut AnyChannel) -> Result<(), MigrationError> {
        let ch = self.ch;
        let chan = |source| MigrationError::Channel {
            channel: ch,
            source,
        };
        let mut memory: Option<Arc<GuestMemory>> = None;
        let mut sink: Option<RegionSink> = None;
        loop {
            let after = {
                let ahead = memory
                    .as_deref()
                    .filter(|_| self.shared.prefault == Prefault::Ahead);
                let install = memory
                    .as_deref()
                    .filter(|_| self.shared.install.get().is_some());
                let mut checked = sink.as_mut().map(|inner| CheckedSink {
                    rules: &self.rules,
                    inner,
                    ahead,
                    install,
                });
                let incoming = channel
                    .recv(checked.as_mut().map(|s| s as &mut dyn PageSink))
                    .map_err(chan)?;
                match incoming {
                    None => After::Closed,
                    Some(Incoming::Placed(p)) => {
                        let t = Instant::now();
                        self.rules.on_placed(&p).map_err(|e| self.rule(e))?;
                        self.round_opened()?;
                        let memory = memory.as_ref().ok_or(MigrationError::Worker(ch))?;
                        let data = p.data_pages();
                        self.shared
                            .placed
                            .fetch_add(data * u64::from(self.shared.page_size), Ordering::Relaxed);
                        Self::apply_runs(memory, &p);
                        self.count(&p);
                        self.shared.apply.record(t.elapsed());
                        After::Nothing
                    }
                    Some(Incoming::Frame(Frame::Abort(a))) => {
                        return Err(MigrationError::PeerAborted {
                            reason: a.reason,
                            message: a.message.to_owned(),
                        });
                    }
                    Some(Incoming::Frame(f)) => {
                        let t = Instant::now();
                        match self.rules.on_frame(&f).map_err(|e| self.rule(e))? {
                            DestinationEvent::Layout(l) => {
                                let mut s = self.shared.state(ch)?;
                                s.rules.on_layout(l).map_err(|e| self.rule(e))?;
                                self.rules.set_layout(&s.rules).map_err(|e| self.rule(e))?;
                                drop(s);
                                if memory.is_none() {
                                    let layout =
                                        self.rules.layout().ok_or(MigrationError::Worker(ch))?;
                                    let m =
                                        self.shared.memory_for(layout).map_err(|e| self.err(e))?;
                                    sink = Some(RegionSink::new(
                                        self.shared.page_size,
                                        transport_views(&m),
                                    ));
                                    memory = Some(m);
                                }
                                After::Nothing
                            }
                            DestinationEvent::Apply(p) => {
                                self.round_opened()?;
                                let memory = memory.as_ref().ok_or(MigrationError::Worker(ch))?;
                                if self.shared.prefault == Prefault::Ahead {
                                    populate_data(memory, p);
                                }
                                let decoded = match &mut self.hw {
                                    Some(hw) if hw.takes(p.codec) && !p.data_runs.is_empty() => {
                                        Self::decode_hw(
                                            hw,
                                            &mut self.runs,
                                            &mut self.lengths,
                                            memory,
                                            p,
                                        )
                                        .map(|fell| {
                                            self.shared.hw_decodes.fetch_add(1, Ordering::Relaxed);
                                            if let (Some(cause), Ok(mut c)) =
                                                (fell, self.shared.hw_fallbacks.lock())
                                            {
                                                c.add(cause);
                                            }
                                        })
                                    }
                                    _ => Self::decode(
                                        &mut self.codecs,
                                        &mut self.lengths,
                                        &mut self.scratch,
                                        memory,
                                        p,
                                    ),
                                };
                                decoded.map_err(|source| MigrationError::Codec {
                                    channel: ch,
                                    source,
                                })?;
                                Self::apply_runs(memory, p);
                                self.count(p);
                                self.shared.apply.record(t.elapsed());
                                After::Nothing
                            }
                            DestinationEvent::AckRound(round) => After::AckRound(round),
                            DestinationEvent::DeviceState(d) => {
                                let mut s = self.shared.state(ch)?;
                                if let Some(section) = s
                                    .rules
                                    .on_device_state(ChannelId(ch), d)
                                    .map_err(|e| self.rule(e))?
                                {
                                    s.sections.push(DeviceSection {
                                        name: section.name,
                                        instance: section.instance,
                                        data: section.data,
                                    });
                                }
                                drop(s);
                                // A COMPLETE may have been waiting for this section.
                                self.shared.cv.notify_all();
                                After::Nothing
                            }
                            DestinationEvent::Complete(c) => After::Complete(*c),
                            DestinationEvent::Commit(c) => After::Commit(*c),
                            _ => After::Nothing,
                        }
                    }
                }
            };
            match after {
                After::Nothing => {}
                After::AckRound(round) => {
                    let ack = Ack {
                        kind: AckKind::ROUND,
                        value: round.0.into(),
                    };
                    self.send_ack(channel, ack)?;
                    let mut s = self.shared.state(ch)?;
                    let r = s.rules.on_round_ended(ChannelId(ch), round);
                    drop(s);
                    self.shared.cv.notify_all();
                    r.map_err(|e| self.rule(e))?;
                }
                After::Complete(c) => {
                    self.complete(c)?;
                    let s = self.shared.state(ch)?;
                    let ack = self.rules.ack_complete(&s.rules).map_err(|e| self.rule(e));
                    drop(s);
                    // Still not this side's guest: channel 0 now waits for COMMIT.
                    self.send_ack(channel, ack?)?;
                }
                After::Commit(c) => {
                    let mut s = self.shared.state(ch)?;
                    let ack = s.rules.on_commit(&c).map_err(|e| self.rule(e));
                    drop(s);
                    self.shared.cv.notify_all();
                    // The guest is this side's now; ACK COMMITTED is best effort: a source
                    // that misses it reports the outcome unknown and keeps the guest
                    // paused (PROTOCOL.md, Switchover).
                    let _ = self.send_ack(channel, ack?);
                }
                After::Closed => {
                    let s = self.shared.state(ch)?;
                    let done = match ch {
                        0 => s.rules.committed(),
                        _ => s.rules.completed(),
                    };
                    return match (done, s.rules.completed()) {
                        (Some(_), _) => Ok(()),
                        (None, Some(_)) => {
                            Err(self.err("the source closed the channel without COMMIT"))
                        }
                        (None, None) => {
                            Err(self.err("the source closed the channel before completing"))
                        }
                    };
                }
            }
        }
    }

    /// Tells the session when this channel opened a round (once per round).
    fn round_opened(&mut self) -> Result<(), MigrationError> {
        if let Some(round) = self.rules.take_opened() {
            let mut s = self.shared.state(self.ch)?;
            let r = s.rules.on_round_opened(ChannelId(self.ch), round);
            drop(s);
            self.shared.cv.notify_all();
            r.map_err(|e| self.rule(e))?;
        }
        Ok(())
    }

    fn count(&self, p: &PageFrame<'_>) {
        self.shared.frames.fetch_add(1, Ordering::Relaxed);
        self.shared
            .data_pages
            .fetch_add(p.data_pages(), Ordering::Relaxed);
        self.shared
            .zero_pages
            .fetch_add(p.zero_pages(), Ordering::Relaxed);
        self.shared
            .uniform_pages
            .fetch_add(p.uniform_pages(), Ordering::Relaxed);
    }

    /// After the data pages are in place: records them as written, and sets the zero
    /// and uniform pages.
    fn apply_runs(memory: &GuestMemory, p: &PageFrame<'_>) {
        // Bounds were checked against the layout.
        for run in p.data_runs.iter() {
            memory.note_written(p.region, run.start.0, u64::from(run.count));
        }
        for run in p.zero_runs.iter() {
            memory.zero_pages(p.region, run.start.0, u64::from(run.count));
        }
        for u in p.uniform_runs.iter() {
            memory.fill_pages(p.region, u.run.start.0, u64::from(u.run.count), u.byte);
        }
    }

    /// Decodes a frame's payload by its codec id straight into the guest pages; with
    /// [`Prefault::Install`], runs with pages still missing are decoded into `scratch`
    /// and installed from there (a raw frame's straight from its payload).
    fn decode(
        codecs: &mut Codecs,
        lengths: &mut Vec<u32>,
        scratch: &mut Vec<u8>,
        memory: &GuestMemory,
        p: &PageFrame<'_>,
    ) -> Result<(), pagewire_accel::CodecError> {
        let no_pages = pagewire_accel::CodecError::NoPages { codec: p.codec };
        let page_bytes = memory.page_size() as usize;
        let installs = |run: &pagewire_protocol::PageRun| {
            memory.installs(p.region, run.start.0, u64::from(run.count))
        };
        let installing = p.data_runs.iter().any(|r| installs(&r));
        if installing
            && p.codec == pagewire_protocol::CodecId::RAW
            && p.lengths.is_none()
            && p.payload.len() as u64 == p.data_pages() * page_bytes as u64
        {
            let mut off = 0;
            for run in p.data_runs.iter() {
                let n = run.count as usize * page_bytes;
                let part = p.payload.get(off..off + n).ok_or(no_pages)?;
                if !memory.write_pages(p.region, run.start.0, part) {
                    return Err(no_pages);
                }
                off += n;
            }
            return Ok(());
        }
        if installing {
            let total = p
                .data_runs
                .iter()
                .filter(|r| installs(r))
                .map(|r| r.count as usize * page_bytes)
                .sum();
            // Grown only: every codec but delta writes each byte of its pages or fails,
            // so what a previous frame left here is never installed.
            if scratch.len() < total {
                scratch.resize(total, 0);
            }
            if p.codec == pagewire_protocol::CodecId::DELTA {
                // The delta's base: what the pages hold (zeros where never written).
                scratch[..total].fill(0);
                let mut off = 0;
                for run in p.data_runs.iter().filter(|r| installs(r)) {
                    let n = run.count as usize * page_bytes;
                    let d = &mut scratch[off..off + n];
                    memory.read_written(p.region, run.start.0, u64::from(run.count), d);
                    off += n;
                }
            }
        }
        let ps = PageSize::new(memory.page_size()).unwrap_or_default();
        let mut dst = PageListMut::with_capacity(ps, p.data_runs.len());
        let mut scratch_off = 0;
        for run in p.data_runs.iter() {
            if installing && installs(&run) {
                let n = run.count as usize * page_bytes;
                let Some(buf) = scratch.get_mut(scratch_off..scratch_off + n) else {
                    return Err(no_pages);
                };
                // SAFETY: `buf` is a part of `scratch`, which is not resized until the
                // decode below has finished with `dst`; parts of different runs are
                // disjoint.
                unsafe { dst.push_raw(buf.as_mut_ptr(), run.count, PageKey(run.start.0)) }
                    .map_err(|_| no_pages)?;
                scratch_off += n;
                continue;
            }
            let Some((ptr, _)) = memory.span(p.region, run.start.0, u64::from(run.count)) else {
                return Err(pagewire_accel::CodecError::NoPages { codec: p.codec });
            };
            // SAFETY: the run lies inside a region of `memory` (checked against the
            // layout and again by `span`), which outlives `dst`; runs of a decoded frame
            // are disjoint; the guest is not running on the destination; and the
            // session's rules refused the frame unless every page belongs to this
            // channel by the affinity carried in LAYOUT, so no other receiver thread
            // writes these pages.
            unsafe { dst.push_raw(ptr.as_ptr(), run.count, PageKey(run.start.0)) }
                .map_err(|_| pagewire_accel::CodecError::NoPages { codec: p.codec })?;
        }
        lengths.clear();
        if let Some(l) = &p.lengths {
            lengths.extend(l.iter());
        }
        if p.data_runs.is_empty() {
            return Ok(());
        }
        codecs.decode(p.codec, p.payload, lengths, &mut dst)?;
        drop(dst);
        if installing {
            let mut off = 0;
            for run in p.data_runs.iter().filter(|r| installs(r)) {
                let n = run.count as usize * page_bytes;
                let part = scratch.get(off..off + n).ok_or(no_pages)?;
                if !memory.write_pages(p.region, run.start.0, part) {
                    return Err(no_pages);
                }
                off += n;
            }
        }
        Ok(())
    }

    /// Decodes a frame on the hardware decoder, straight into the guest pages;
    /// returns why the hardware handed it to software, if it did.
    fn decode_hw(
        hw: &mut crate::hwdecode::Decoder,
        runs: &mut Vec<(*mut u8, u32, u64)>,
        lengths: &mut Vec<u32>,
        memory: &GuestMemory,
        p: &PageFrame<'_>,
    ) -> Result<Option<pagewire_accel::FallbackCause>, pagewire_accel::CodecError> {
        hw.map(memory)?;
        runs.clear();
        for run in p.data_runs.iter() {
            let Some((ptr, _)) = memory.span(p.region, run.start.0, u64::from(run.count)) else {
                return Err(pagewire_accel::CodecError::NoPages { codec: p.codec });
            };
            runs.push((ptr.as_ptr(), run.count, run.start.0));
        }
        lengths.clear();
        if let Some(l) = &p.lengths {
            lengths.extend(l.iter());
        }
        // SAFETY: as in `decode`: the runs lie inside a region of `memory`, which
        // outlives the call; they are disjoint; the guest is not running here; and
        // channel affinity keeps every other receiver away from these pages.
        unsafe { hw.decode(p.codec, p.payload, lengths, runs) }
    }

    /// Waits until every channel ended the final round (the session's rules decide),
    /// within the idle timeout.
    fn complete(&mut self, c: Complete) -> Result<u32, MigrationError> {
        let ch = self.ch;
        let deadline = Instant::now() + self.shared.wait;
        let mut s = self.shared.state(ch)?;
        let mut progress = s.rules.on_complete(&c).map_err(|e| self.rule(e))?;
        loop {
            if let CompleteProgress::Done(r) = progress {
                return Ok(r.0);
            }
            if let Some(f) = &s.failed {
                return Err(self.err(format!("another channel failed: {f}")));
            }
            let now = Instant::now();
            if now >= deadline {
                let (ended, sections, partial) = s.rules.waiting_for();
                return Err(self.err(format!(
                    "COMPLETE for round {} not satisfied within {:?}: {ended} of {} channels \
                     ended it, {sections} of {} device-state sections arrived, {partial} \
                     unfinished",
                    c.final_round,
                    self.shared.wait,
                    s.rules.channels(),
                    c.sections
                )));
            }
            s = self
                .shared
                .cv
                .wait_timeout(s, deadline - now)
                .map_err(|_| MigrationError::Worker(ch))?
                .0;
            progress = s.rules.complete_progress();
        }
    }

    fn send_ack(&mut self, channel: &mut AnyChannel, ack: Ack) -> Result<(), MigrationError> {
        let f = OutFrame::whole(&Frame::Ack(ack)).map_err(|e| self.err(e.to_string()))?;
        let ch = self.ch;
        let mut done = Vec::new();
        channel
            .send(f)
            .and_then(|_| channel.flush(&mut done))
            .map_err(|source| MigrationError::Channel {
                channel: ch,
                source,
            })
    }
}
