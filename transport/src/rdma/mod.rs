//! The RDMA backend: rdma_cm connection setup, one reliable connected queue pair per
//! channel, raw pages **pulled** by the destination with RDMA READ into the pages a
//! frame names, after the destination checked the frame (`PROTOCOL.md`, "RDMA
//! binding").
//!
//! The verbs code (`connect`, `RdmaListener`, `RdmaChannel`) needs the cargo
//! feature `rdma` (libibverbs, librdmacm). Without it, this module keeps what needs no
//! device: the settings ([`RdmaConfig`]), the errors ([`RdmaError::NotBuilt`] says
//! how to get RDMA), and [`plan`]: the READ planning that enforces the window, which
//! the default tests cover.
//!
//! # What was built and what was run
//! The verbs code is built and clippy-checked against `rdma-sys` in CI. The machines
//! it was written on have **no RDMA device and no soft-RoCE** (`rdma_rxe` is not in
//! their kernel), so it has never exchanged a byte: what is tested without a device is
//! device detection (the clear [`RdmaError::NoDevice`] / [`RdmaError::NotBuilt`]), the
//! planning of READs and its bounds ([`plan`]), and the encoding of the binding's
//! messages (`pagewire_protocol::rdma`, golden samples). The end-to-end test is
//! `#[ignore]`d; where a device exists it runs with `PAGEWIRE_RDMA_ADDR` set to an
//! address of the RDMA interface.
//!
//! # Contract
//! - **Setup**: `connect` resolves the address and route with rdma_cm and creates a
//!   completion queue (with a completion channel, so waits sleep) and an RC queue pair
//!   on the session's protection domain. Guest memory is registered **once per
//!   session** on each side ([`RdmaConfig::registration`] is shared by the clones of a
//!   session's configuration): on the source for remote READ, on the destination for
//!   local access only. `RdmaListener::accept` is the destination's side.
//! - **Handshake first**: the protocol handshake runs over SEND/RECV before anything
//!   else. Only once it has completed does the source send its ADVERT (region id,
//!   address, length, rkey of its registered memory), so a peer that fails
//!   authentication never learns a key.
//! - **Frames**: a raw PAGES frame whose payload lies in the source's registered
//!   memory goes as a READ_PAGES message (its header and the source segments of its
//!   payload); the destination asks its [`PageSink`](crate::PageSink) where the pages
//!   go (the migration engine's sink checks the protocol rules there), plans READs
//!   into exactly those pages ([`plan::plan_reads`]), waits for them, checks the
//!   checksum, sends DONE, and reports [`Incoming::Placed`](crate::Incoming). The
//!   source hands the payload back when DONE arrives. Every other frame is copied into
//!   registered send buffers and sent as STREAM messages, parsed like a byte stream.
//! - **No remote write**: the destination's memory has no remote access rights, so a
//!   peer can make the destination write only what the destination itself read, into
//!   pages it checked.
//! - **Close**: [`Channel::close`](crate::Channel::close) waits for every completion
//!   and sends CLOSE, so the peer's `recv` returns `Ok(None)`; a disconnect without it
//!   is an error at the peer.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use pagewire_protocol::{HandshakeError, RegionId};

use crate::buf::GuestMemory;
use crate::channel::ChannelError;
use crate::session::SessionError;

pub mod plan;

#[cfg(feature = "rdma")]
mod channel;
#[cfg(feature = "rdma")]
mod core;
#[cfg(feature = "rdma")]
mod verbs;

#[cfg(feature = "rdma")]
pub use channel::{RdmaChannel, RdmaListener, connect};
#[cfg(feature = "rdma")]
pub use verbs::devices;

/// Settings of the RDMA channels of one session.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RdmaConfig {
    /// Guest memory by region id: what the source lets the destination read, what
    /// the destination reads into.
    pub regions: Vec<(RegionId, GuestMemory)>,
    /// Largest SEND message; the receive buffers have this size.
    pub message_size: u32,
    /// Receive buffers posted per channel.
    pub recv_depth: u32,
    /// Send buffers (and outstanding send and READ work requests) per channel.
    pub send_depth: u32,
    /// Timeout of address and route resolution and of the connection.
    pub connect_timeout: Duration,
    /// How long `send` may wait for a completion.
    pub send_timeout: Duration,
    /// How long `recv` waits; `None` waits for ever.
    pub recv_timeout: Option<Duration>,
    /// The session's memory registration, made by its first channel and shared by
    /// every channel whose configuration is a clone of this one.
    pub registration: Arc<Registration>,
}

impl RdmaConfig {
    /// Settings for `regions`, with a fresh (not yet made) registration.
    pub fn new(regions: Vec<(RegionId, GuestMemory)>) -> Self {
        Self {
            regions,
            ..Self::default()
        }
    }

    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    fn validate(&self) -> Result<(), RdmaError> {
        if self.message_size < 64 || self.recv_depth == 0 || self.send_depth == 0 {
            return Err(RdmaError::Config(
                "message_size must be at least 64 and the depths at least 1",
            ));
        }
        Ok(())
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            regions: Vec::new(),
            message_size: 64 << 10,
            recv_depth: 64,
            send_depth: 256,
            connect_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(30),
            recv_timeout: None,
            registration: Arc::new(Registration::default()),
        }
    }
}

/// A session's guest-memory registration (protection domain and memory regions),
/// shared by its channels; empty until the first channel makes it.
#[derive(Default)]
pub struct Registration {
    #[cfg(feature = "rdma")]
    pub(crate) inner: std::sync::Mutex<Option<Arc<verbs::Registered>>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").finish_non_exhaustive()
    }
}

/// Why an RDMA channel could not be set up.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// This build has no RDMA support.
    #[error(
        "RDMA is not built in: rebuild with the `rdma` cargo feature of pagewire-transport (or pagewire), which needs libibverbs-dev, librdmacm-dev and libclang-dev; or use the tcp or io_uring transport"
    )]
    NotBuilt,
    /// No RDMA device is present.
    #[error(
        "no RDMA device: ibv_get_device_list found none (load the NIC's driver, or soft-RoCE with `rdma link add rxe0 type rxe netdev IFACE`); use the tcp or io_uring transport"
    )]
    NoDevice,
    /// An rdma_cm call failed.
    #[error("rdma_cm: {op} failed")]
    Cm {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A verbs call failed.
    #[error("ibverbs: {op} failed; if ENOMEM while registering memory, raise RLIMIT_MEMLOCK")]
    Verbs {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An rdma_cm event other than the one expected arrived.
    #[error("rdma_cm: expected {expected}, got event {got} (status {status})")]
    Event {
        /// The event waited for.
        expected: &'static str,
        /// The event that came.
        got: u32,
        /// Its status.
        status: i32,
    },
    /// The channels of one session are on different RDMA devices.
    #[error("the channels of one session must use one RDMA device (one registration per session)")]
    DeviceMismatch,
    /// The protocol handshake failed.
    #[error("handshake over RDMA failed: {0}")]
    Handshake(#[source] HandshakeError),
    /// The channel failed during setup.
    #[error("RDMA channel failed during setup: {0}")]
    Channel(#[from] ChannelError),
    /// A session-level failure (random nonce).
    #[error(transparent)]
    Session(#[from] Box<SessionError>),
    /// The configuration is invalid.
    #[error("invalid RDMA configuration: {0}")]
    Config(&'static str),
    /// An authenticated RDMA connection was refused: it does not fit the session the
    /// destination is accepting it for.
    #[error("RDMA connection refused: {0}")]
    Refused(&'static str),
}

impl From<SessionError> for RdmaError {
    fn from(e: SessionError) -> Self {
        RdmaError::Session(Box::new(e))
    }
}

/// The destination's RDMA listener for [`Backend::Rdma`](crate::session::Backend::Rdma):
/// bound once (so a missing device or a build without the feature shows at bind
/// time), it hands each channel of a session the RDMA connection with that channel's
/// index, whatever order they arrive in.
pub struct RdmaAcceptor {
    #[cfg(feature = "rdma")]
    state: std::sync::Mutex<AcceptorState>,
}

#[cfg(feature = "rdma")]
struct AcceptorState {
    listener: RdmaListener,
    /// Channels accepted for another call than the one that accepted them, by session
    /// and index, with the time they were accepted.
    ready: std::collections::HashMap<
        (pagewire_protocol::SessionId, u16),
        (std::time::Instant, RdmaChannel),
    >,
}

impl std::fmt::Debug for RdmaAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaAcceptor").finish_non_exhaustive()
    }
}

impl RdmaAcceptor {
    /// Listens for RDMA connections at `addr` (an address of an RDMA interface).
    ///
    /// # Errors
    /// [`RdmaError::NotBuilt`] without the `rdma` feature, [`RdmaError::NoDevice`]
    /// without a device, or the failing rdma_cm call.
    pub fn bind(addr: std::net::SocketAddr) -> Result<RdmaAcceptor, RdmaError> {
        #[cfg(feature = "rdma")]
        {
            Ok(RdmaAcceptor {
                state: std::sync::Mutex::new(AcceptorState {
                    listener: RdmaListener::bind(addr)?,
                    ready: std::collections::HashMap::new(),
                }),
            })
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = addr;
            Err(RdmaError::NotBuilt)
        }
    }

    /// The RDMA channel of channel `index` of session `cfg.session`, which has `count`
    /// channels (as its plain connections negotiated): one accepted earlier for it, or
    /// the next ones accepted until it comes. A connection that fails its handshake
    /// (another session's, a wrong key, garbage) or its setup, or that names another
    /// channel count or an index not below it, is refused and the wait goes on; a
    /// channel accepted for another index of the session is kept for the call that
    /// takes it, for as long as this call's deadline spans at most. So a session keeps
    /// at most `count - 1` channels waiting (each holds registered, pinned message
    /// buffers), and a second one for the same index replaces the first.
    ///
    /// # Errors
    /// `TimedOut` when it does not come within the connect and handshake timeouts
    /// (the last refused connection's error instead, if any); a configuration error,
    /// a missing device or a session failure at once.
    #[cfg(feature = "rdma")]
    pub fn take(
        &self,
        index: u16,
        count: u16,
        cfg: &crate::session::SessionConfig,
    ) -> Result<RdmaChannel, RdmaError> {
        use crate::channel::Channel as _;
        let window = cfg
            .rdma
            .connect_timeout
            .saturating_add(cfg.handshake_timeout);
        let deadline = crate::deadline::from_now(window);
        let mut last = None;
        loop {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // A channel whose call never came (its session failed) is closed.
            st.ready.retain(|_, (t, _)| t.elapsed() < window);
            if let Some((_, c)) = st.ready.remove(&(cfg.session, index)) {
                return Ok(c);
            }
            if std::time::Instant::now() >= deadline {
                return Err(last.unwrap_or(RdmaError::Cm {
                    op: "rdma_get_cm_event (the channel's RDMA connection never came)",
                    source: io::ErrorKind::TimedOut.into(),
                }));
            }
            match st.listener.accept(cfg, &cfg.rdma) {
                Ok(ch) => {
                    let n = ch.negotiated();
                    if n.channel_count != count || n.channel.0 >= count {
                        // Dropped here, closed: not a channel of this session's shape.
                        last = Some(RdmaError::Refused(
                            "its channel count or index does not fit the session's plain connections'",
                        ));
                        continue;
                    }
                    let key = (n.session, n.channel.0);
                    if key == (cfg.session, index) {
                        return Ok(ch);
                    }
                    st.ready.insert(key, (std::time::Instant::now(), ch));
                }
                // The caller's own: a bad configuration, no device, a session
                // failure (no randomness), channels on two devices.
                Err(
                    e @ (RdmaError::Config(_)
                    | RdmaError::NotBuilt
                    | RdmaError::NoDevice
                    | RdmaError::Session(_)
                    | RdmaError::DeviceMismatch),
                ) => return Err(e),
                Err(e) => {
                    // A peer's failure (a connection that failed its setup or its
                    // handshake) or no connection request yet: keep waiting for the
                    // channel, a little apart so that a failing listener does not spin.
                    drop(st);
                    let waited = matches!(
                        &e,
                        RdmaError::Cm { source, .. } if source.kind() == io::ErrorKind::TimedOut
                    );
                    if !waited || last.is_none() {
                        last = Some(e);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
}

/// `connect`, retried until `cfg.rdma.connect_timeout` while the destination is
/// not listening yet (its listener may be bound after the stream handshakes).
///
/// # Errors
/// The last attempt's error.
#[cfg(feature = "rdma")]
pub fn connect_retrying(
    addr: std::net::SocketAddr,
    cfg: &crate::session::SessionConfig,
    index: u16,
) -> Result<RdmaChannel, RdmaError> {
    let deadline = crate::deadline::from_now(cfg.rdma.connect_timeout);
    loop {
        match connect(addr, cfg, index, &cfg.rdma) {
            Ok(c) => return Ok(c),
            Err(e @ (RdmaError::Event { .. } | RdmaError::Cm { .. }))
                if std::time::Instant::now() < deadline =>
            {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Checks that RDMA can be used here: built in, and a device present.
///
/// # Errors
/// [`RdmaError::NotBuilt`] or [`RdmaError::NoDevice`].
pub fn available() -> Result<(), RdmaError> {
    #[cfg(feature = "rdma")]
    {
        verbs::require_device()
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err(RdmaError::NotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static BUILT: bool = cfg!(feature = "rdma");

    /// Runs by default (with or without the feature): on a machine without a device
    /// or without the feature, the error names what is missing.
    #[test]
    fn without_rdma_here_the_error_names_what_is_missing() {
        match available() {
            Ok(()) => {
                eprintln!("an RDMA device is present; the missing-RDMA path is not exercised")
            }
            Err(e @ RdmaError::NotBuilt) => {
                assert!(!BUILT, "built with the feature, yet NotBuilt");
                assert!(e.to_string().contains("`rdma` cargo feature"), "{e}");
            }
            Err(e @ RdmaError::NoDevice) => {
                assert!(BUILT, "NoDevice from a build without the feature");
                assert!(e.to_string().contains("no RDMA device"), "{e}");
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    #[test]
    fn configurations_clone_one_registration_per_session() {
        let a = RdmaConfig::default();
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.registration, &b.registration));
        assert!(!Arc::ptr_eq(
            &a.registration,
            &RdmaConfig::default().registration
        ));
        let bad = RdmaConfig {
            message_size: 8,
            ..RdmaConfig::default()
        };
        assert!(matches!(bad.validate(), Err(RdmaError::Config(_))));
    }
}
