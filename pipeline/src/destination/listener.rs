//! [`DestinationListener`]: binds, accepts a session's channels and starts a receiver
//! thread per channel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Instant;

use pagewire_accel::BackendChoice;
use pagewire_protocol::{Capabilities, ChannelId, CodecSet, DestinationSession};
use pagewire_transport::session::{Backend, Established, Listener, SessionConfig};
use pagewire_transport::{Channel, Endpoint, StreamListener};

use crate::config::{DestinationConfig, Prefault};
use crate::error::MigrationError;
use crate::memory::{DestinationMemory, GuestMemory};
use crate::source::frame_bytes;
use crate::stats::Latency;

use super::receiver::Receiver;
use super::{Destination, DestinationControl, Shared, State};

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
    /// [`MigrationError::Config`] for an unusable setting
    /// ([`DestinationConfig::validate`]); [`MigrationError::Session`] when the socket
    /// cannot be bound.
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
        config.validate()?;
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
        config.validate()?;
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
    /// when the layout arrives and prepares it as [`DestinationConfig::prefault`] says
    /// (by default huge pages where frames are dense, no pre-faulting). The listener stays
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
        config.validate()?;
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
            check: config.check_device_state.clone(),
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
            provider_failed: OnceLock::new(),
            memory: Mutex::new(match memory {
                DestinationMemory::Given(m) => Some((m, None)),
                _ => None,
            }),
            state: Mutex::new(State {
                rules,
                failed: None,
                failed_channel: None,
                sections: Vec::new(),
                copy_ended: Vec::new(),
                idled: Vec::new(),
            }),
            cv: Condvar::new(),
            gate: RwLock::new(()),
            apply: Latency::default(),
            frames: AtomicU64::new(0),
            data_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            uniform_pages: AtomicU64::new(0),
            copied_pages: AtomicU64::new(0),
            round_end_pages: AtomicU64::new(0),
            round_end_ns: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            tls_opened: AtomicU64::new(0),
            tls_copied: AtomicU64::new(0),
            prefault_ns: Arc::new(AtomicU64::new(0)),
            prefault_stop: Arc::new(AtomicBool::new(false)),
            install: OnceLock::new(),
            install_unavailable: OnceLock::new(),
            dense: OnceLock::new(),
            cpu_ns: Arc::new(AtomicU64::new(0)),
            hw_decodes: AtomicU64::new(0),
            hw_fallbacks: Mutex::new(pagewire_accel::FallbackCounts::default()),
            started: Instant::now(),
        });
        let mut threads = Vec::new();
        for est in accepted.channels {
            let ch = est.negotiated.channel.0;
            if let (Ok(mut sockets), Ok(dup)) = (shared.sockets.lock(), est.stream.try_clone()) {
                sockets.push((ch, dup));
            }
            let shared2 = shared.clone();
            let backend = config.backend;
            let accel = config.accel.clone();
            // A frame holds at most what its negotiated limit fits: the hardware
            // decoder's buffers are sized for that, not for `max_pages` pages, which at
            // 2 MiB pages may be far more than any frame carries.
            let n = &est.negotiated;
            let max_pages = n.max_pages.min(crate::source::pages_per_frame(
                n.page_size,
                n.max_frame_bytes,
            ));
            let scfg = scfg.clone();
            let t = std::thread::Builder::new()
                .name(format!("pagewire-dst-{ch}"))
                .spawn(move || {
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        receive(est, &shared2, &backend, &scfg, &accel, max_pages)
                    }))
                    .unwrap_or_else(|panic| {
                        // A bug: the session fails at once (the other channels tell the
                        // source), not when they idle out.
                        let e = crate::error::worker_ended(ch, Err(panic));
                        shared2.channel_failed(ch, &e);
                        Err(e)
                    });
                    // Its connection closes now (the socket's second handle would keep
                    // it open until the session ends).
                    shared2.release(ch);
                    res
                })
                .map_err(|_| {
                    // The receivers started already end now, not at the idle timeout.
                    shared.fail(Some(ch), "no receiver thread could be started".into());
                    shared.end_receivers();
                    MigrationError::Worker(ch)
                })?;
            threads.push((ch, t));
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

/// Channel `est`'s receiver: opens the channel on this thread (an io_uring ring accepts
/// submissions only from the thread that created it) and applies its frames until it
/// ends. A failure fails the session, ends its other receivers and is told to the
/// source (ABORT) where it can be.
fn receive(
    est: Established,
    shared: &Arc<Shared>,
    backend: &Backend,
    scfg: &SessionConfig,
    accel: &BackendChoice,
    max_pages: u32,
) -> Result<(), MigrationError> {
    let ch = est.negotiated.channel.0;
    let failed = |e: MigrationError| {
        shared.channel_failed(ch, &e);
        e
    };
    let mut channel = est
        .open(backend, scfg)
        .map_err(|e| failed(MigrationError::from(e)))?;
    let rules = shared
        .state(ch)
        .and_then(|s| {
            s.rules
                .channel(ChannelId(ch))
                .map_err(|source| MigrationError::Rule {
                    channel: ch,
                    source,
                })
        })
        .map_err(failed)?;
    let hw = crate::hwdecode::Decoder::new(accel, shared.page_size, max_pages).map_err(failed)?;
    let mut r = Receiver::new(ch, shared.clone(), rules, hw);
    let cpu = pagewire_accel::thread_cpu_time();
    let res = r.run(&mut channel);
    shared.add_cpu(pagewire_accel::thread_cpu_time().saturating_sub(cpu));
    let st = channel.stats();
    shared
        .tls_opened
        .fetch_add(st.tls_bytes_opened, Ordering::Relaxed);
    shared
        .tls_copied
        .fetch_add(st.tls_bytes_copied, Ordering::Relaxed);
    if let Err(e) = &res {
        // The other receivers first: this channel's ABORT may block up to the send
        // timeout on a peer that reads nothing.
        shared.channel_failed(ch, e);
        super::abort::send(&mut channel, e);
    }
    res
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
    // The destination sends only small replies: no send queue, so a source that stops
    // reading them holds no more than the socket buffer here.
    scfg.tcp.send_queue = 0;
    scfg.uring.recv_timeout = Some(config.idle_timeout);
    scfg.handshake_timeout = config.handshake_timeout;
    scfg.listener.max_pending = config.max_pending;
    scfg.listener.evict_after = config.evict_after;
    scfg.listener.evict_named_after = config.evict_named_after;
    scfg.listener.max_channels = config.limits.max_channels;
    scfg.listener.max_sessions = config.max_sessions;
    scfg.encryption = config.encryption.clone();
    scfg
}
