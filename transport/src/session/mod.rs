//! Sessions: opening the channels of a migration and accepting them.
//!
//! The source calls [`connect`] (a TCP address) or [`connect_to`] (any [`Endpoint`],
//! TCP or a Unix socket path), which opens `channels` connections and runs the
//! protocol's handshake on each, or [`connect_streams`] with one already-connected
//! [`Stream`] per channel (sockets handed over by a management layer); the destination's [`Listener::accept_session`] accepts
//! connections, runs all their handshakes on the calling thread (non-blocking sockets
//! multiplexed with `mio`, each with its own deadline, at most
//! [`ListenerConfig::max_pending`] at once), and keeps the channels of the session it
//! was asked for; it listens on a TCP or Unix socket it binds ([`Listener::bind`],
//! [`Listener::bind_endpoint`]) or on one it is given ([`Listener::from_listener`]).
//! A connection that sends garbage, fails authentication, names another
//! session, asks for too many channels, misses its deadline or repeats a channel index
//! is refused (with a REJECT when the handshake got that far) and closed, without
//! touching the session's other channels; the refusals are counted in
//! [`ListenerStats`] and the last few reported in [`Accepted::refused`]. The listener
//! survives every refusal and resource failure and can accept one session after
//! another, and several at once from different threads (each call with its own session
//! id and key, up to [`ListenerConfig::max_sessions`]); each connection goes to the
//! session its HELLO names.
//!
//! A handshaken connection is an [`Established`]; turn it into a channel of the
//! backend you want on the thread that will drive it ([`Established::open`]); io_uring
//! channels are bound to the thread that creates them.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pagewire_protocol::{
    Authentication, Capabilities, ChannelId, ClientConfig, ClientHandshake, CodecSet,
    HandshakeError, Negotiated, ServerHandshake, SessionId,
};

use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::endpoint::{self, Endpoint, Stream};
use crate::tcp::{TcpChannel, TcpConfig, TcpError};
use crate::tls::{Encryption, TlsError, TlsSession};
use crate::uring::{self, UringChannel, UringConfig, UringError};

mod listener;
mod secure;

use secure::{HsReadError, hs_read, hs_write, tls_client_handshake};

pub use listener::{
    Accepted, Listener, ListenerConfig, ListenerStats, MAX_PENDING, MAX_REFUSALS_KEPT,
};

/// Which backend a channel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Blocking TCP sockets.
    Tcp,
    /// io_uring with zero-copy sends; with `fallback_to_tcp`, a machine without usable
    /// io_uring gets a TCP channel instead of an error.
    Uring {
        /// Fall back to TCP when io_uring cannot be used.
        fallback_to_tcp: bool,
    },
    /// RDMA ([`crate::rdma`], cargo feature `rdma`): once a channel's handshake on its
    /// stream succeeded, its frames move to an RDMA queue pair (with a handshake of
    /// its own) set up with rdma_cm at `addr`: the destination listens there
    /// ([`SessionConfig::rdma_acceptor`]), the source connects to it. Without the
    /// feature or without a device, opening fails with an error that says which.
    Rdma {
        /// The destination's RDMA address (an address of its RDMA interface).
        addr: SocketAddr,
    },
}

/// Settings of a session, for either side.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// What this side can do.
    pub caps: Capabilities,
    /// The session id (a destination's call accepts only this one's channels).
    pub session: SessionId,
    /// Channels the source opens.
    pub channels: u16,
    /// Authentication.
    pub auth: Authentication,
    /// A source's codecs that the destination's WELCOME must list (see
    /// `ClientConfig::require`); ignored by a destination. Empty in [`Self::new`].
    pub require: CodecSet,
    /// Socket settings.
    pub tcp: TcpConfig,
    /// io_uring settings, for [`Backend::Uring`].
    pub uring: UringConfig,
    /// Time allowed for one channel's handshake (on the destination, counted for each
    /// connection from its `accept`, apart from the accept window).
    pub handshake_timeout: Duration,
    /// The destination's bounds on connections before their handshake completes.
    pub listener: ListenerConfig,
    /// TLS 1.3 around every channel, or plaintext ([`Encryption::Plaintext`], the
    /// default of [`Self::new`]). A destination's listener takes it from the
    /// configuration it is bound with, and every session accepted on it must agree.
    pub encryption: Encryption,
    /// RDMA settings, for [`Backend::Rdma`]: the guest memory to register (once per
    /// session: clones of this configuration share the registration).
    pub rdma: crate::rdma::RdmaConfig,
    /// The destination's RDMA listener, for [`Backend::Rdma`] (`None` on a source).
    pub rdma_acceptor: Option<std::sync::Arc<crate::rdma::RdmaAcceptor>>,
}

impl SessionConfig {
    /// A configuration with default socket, io_uring and timeout settings.
    pub fn new(
        caps: Capabilities,
        session: SessionId,
        channels: u16,
        auth: Authentication,
    ) -> Self {
        Self {
            caps,
            session,
            channels,
            auth,
            require: CodecSet::empty(),
            tcp: TcpConfig::default(),
            uring: UringConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            listener: ListenerConfig::default(),
            encryption: Encryption::Plaintext,
            rdma: crate::rdma::RdmaConfig::default(),
            rdma_acceptor: None,
        }
    }

    /// This configuration with its channels inside TLS 1.3.
    #[must_use]
    pub fn with_tls(mut self, tls: crate::tls::TlsConfig) -> Self {
        self.encryption = Encryption::Tls(tls);
        self
    }
}

/// Why a session could not be opened or a channel was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A socket could not be set up or connected.
    #[error(transparent)]
    Tcp(#[from] TcpError),
    /// io_uring could not be used (and no fallback was asked for).
    #[error(transparent)]
    Uring(#[from] UringError),
    /// An RDMA channel could not be set up (not built in, no device, or a failure).
    #[error(transparent)]
    Rdma(Box<crate::rdma::RdmaError>),
    /// The handshake failed.
    #[error(
        "handshake of {} with {peer} failed{}: {source}",
        channel.map_or_else(|| "a channel".to_owned(), |c| format!("channel {c}")),
        peer_message.as_deref().map(|m| format!(" (peer says: {m})")).unwrap_or_default()
    )]
    Handshake {
        /// The channel index, when known.
        channel: Option<u16>,
        /// The peer.
        peer: Endpoint,
        /// The REJECT message the peer sent, if any.
        peer_message: Option<String>,
        /// Why.
        #[source]
        source: HandshakeError,
    },
    /// The peer closed the connection or went silent during the handshake.
    #[error("{peer} closed the connection or timed out during the handshake: {source}")]
    HandshakeIo {
        /// The peer.
        peer: Endpoint,
        /// The error (`UnexpectedEof` for a close).
        #[source]
        source: io::Error,
    },
    /// A handshaken channel does not fit the session.
    #[error(
        "channel {channel} of {count} from {peer} refused: {why}; the source must open channels 0..count with one count"
    )]
    BadChannel {
        /// Its index.
        channel: u16,
        /// Its channel count.
        count: u16,
        /// The peer.
        peer: Endpoint,
        /// What is wrong.
        why: &'static str,
    },
    /// A HELLO asked for more channels than this destination accepts.
    #[error(
        "{peer} asked for {count} channels; this destination accepts at most {max} (ListenerConfig::max_channels)"
    )]
    TooManyChannels {
        /// The peer.
        peer: Endpoint,
        /// The channel count it asked for.
        count: u16,
        /// The limit.
        max: u16,
    },
    /// [`ListenerConfig::max_sessions`] sessions are already being accepted.
    #[error(
        "{max} sessions are already being accepted on this listener (ListenerConfig::max_sessions); try again when one is done"
    )]
    TooManySessions {
        /// The limit.
        max: usize,
    },
    /// Another call is already accepting this session id on the listener.
    #[error("session {session:?} is already being accepted on this listener")]
    SessionInUse {
        /// The session id.
        session: SessionId,
    },
    /// A setting is invalid.
    #[error("invalid session configuration: {0}")]
    Config(&'static str),
    /// The caller cancelled the accept
    /// ([`Listener::accept_session_until`]).
    #[error("accepting the session was cancelled")]
    Cancelled,
    /// The number of pre-connected streams is not the session's channel count.
    #[error(
        "{given} pre-connected streams were given for a session of {channels} channels; give one stream per channel"
    )]
    StreamCount {
        /// Streams given.
        given: usize,
        /// [`SessionConfig::channels`].
        channels: u16,
    },
    /// Not every channel arrived in time.
    #[error("{}", incomplete(*have, *need, *timeout))]
    Incomplete {
        /// Channels established.
        have: usize,
        /// Channels expected (0 while none arrived).
        need: usize,
        /// The wait.
        timeout: Duration,
    },
    /// TLS could not be set up or its handshake failed (unknown CA, expired or missing
    /// certificate, wrong server name, an alert from the peer).
    #[error("TLS with {peer} failed: {source}")]
    Tls {
        /// The peer.
        peer: Endpoint,
        /// Why.
        #[source]
        source: TlsError,
    },
    /// The connection spoke plaintext to a TLS destination, or TLS to a plaintext one;
    /// it was refused with a plaintext REJECT of `reason` (`ENCRYPTION_REQUIRED` or
    /// `ENCRYPTION_UNSUPPORTED`).
    #[error("{peer} refused: {reason}; configure encryption alike on both sides")]
    Encryption {
        /// The peer.
        peer: Endpoint,
        /// The REJECT reason sent.
        reason: pagewire_protocol::RejectReason,
    },
    /// A TLS source's ClientHello was answered with bytes that are neither TLS nor a
    /// pagewire REJECT.
    #[error("{peer} answered the TLS ClientHello with neither TLS nor a pagewire REJECT")]
    NotTls {
        /// The peer.
        peer: Endpoint,
    },
    /// No random nonce could be drawn.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// A socket call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A connection whose handshake completed.
#[derive(Debug)]
pub struct Established {
    /// The socket (TCP or Unix).
    pub stream: Stream,
    /// What was agreed.
    pub negotiated: Negotiated,
    /// Bytes received after the handshake's last frame (decrypted, on a TLS channel).
    pub leftover: Vec<u8>,
    /// The TLS session the channel runs in, when encrypted; the channels opened from
    /// this connection keep using it.
    pub tls: Option<Box<TlsSession>>,
}

impl Established {
    /// A channel of the plain-socket backend (TCP or Unix socket alike).
    ///
    /// # Errors
    /// [`TcpError`] when the socket options cannot be set.
    pub fn into_tcp(self, cfg: &TcpConfig) -> Result<TcpChannel, TcpError> {
        Ok(TcpChannel::new(self.stream, self.negotiated, &self.leftover, cfg)?.with_tls(self.tls))
    }

    /// An io_uring channel, bound to the calling thread.
    ///
    /// # Errors
    /// [`UringError`], which says when io_uring is disabled, blocked or too old.
    pub fn into_uring(self, cfg: &UringConfig) -> Result<UringChannel, UringError> {
        Ok(
            UringChannel::new(self.stream, self.negotiated, &self.leftover, cfg)?
                .with_tls(self.tls),
        )
    }

    /// A channel of `backend`, falling back from io_uring to TCP when asked to and
    /// io_uring cannot be used here.
    ///
    /// # Errors
    /// [`SessionError::Tcp`] or [`SessionError::Uring`].
    pub fn open(self, backend: &Backend, cfg: &SessionConfig) -> Result<AnyChannel, SessionError> {
        match *backend {
            Backend::Tcp => Ok(AnyChannel::Tcp(self.into_tcp(&cfg.tcp)?)),
            Backend::Uring { fallback_to_tcp } => match uring::probe(&cfg.uring) {
                Ok(()) => Ok(AnyChannel::Uring(Box::new(self.into_uring(&cfg.uring)?))),
                // A setting that cannot work is the caller's to fix, not a missing
                // io_uring: no fallback then.
                Err(e) if fallback_to_tcp && !matches!(e, uring::UringError::Config(_)) => {
                    Ok(AnyChannel::Fallback(self.into_tcp(&cfg.tcp)?, e))
                }
                Err(e) => Err(e.into()),
            },
            // RDMA READs move pages outside the stream, so TLS would protect only the
            // frames around them: refused rather than silently half-encrypted.
            Backend::Rdma { .. } if self.tls.is_some() => Err(SessionError::Config(
                "RDMA moves pages outside the TLS stream: TLS and Backend::Rdma cannot be combined",
            )),
            Backend::Rdma { addr } => self.into_rdma(addr, cfg),
        }
    }

    /// The RDMA channel of this handshaken connection (see [`Backend::Rdma`]).
    #[cfg(feature = "rdma")]
    fn into_rdma(self, addr: SocketAddr, cfg: &SessionConfig) -> Result<AnyChannel, SessionError> {
        let rdma = |e| SessionError::Rdma(Box::new(e));
        let index = self.negotiated.channel.0;
        let count = self.negotiated.channel_count;
        let channel = match &cfg.rdma_acceptor {
            Some(acceptor) => acceptor.take(index, count, cfg).map_err(rdma)?,
            None => crate::rdma::connect_retrying(addr, cfg, index).map_err(rdma)?,
        };
        // The stream stays open beside the queue pair (it carried the first
        // handshake); the frames go over RDMA.
        Ok(AnyChannel::Rdma(Box::new(channel), self.stream))
    }

    /// Without the `rdma` feature: the error that says so.
    #[cfg(not(feature = "rdma"))]
    fn into_rdma(
        self,
        _addr: SocketAddr,
        _cfg: &SessionConfig,
    ) -> Result<AnyChannel, SessionError> {
        Err(SessionError::Rdma(Box::new(
            crate::rdma::RdmaError::NotBuilt,
        )))
    }
}

/// A channel of any backend.
#[derive(Debug)]
pub enum AnyChannel {
    /// TCP.
    Tcp(TcpChannel),
    /// io_uring.
    Uring(Box<UringChannel>),
    /// TCP, because io_uring was asked for and could not be used (the reason).
    Fallback(TcpChannel, UringError),
    /// RDMA, beside the stream that carried the first handshake.
    #[cfg(feature = "rdma")]
    Rdma(Box<crate::rdma::RdmaChannel>, Stream),
}

impl AnyChannel {
    fn inner(&mut self) -> &mut dyn Channel {
        match self {
            Self::Tcp(c) | Self::Fallback(c, _) => c,
            Self::Uring(c) => c.as_mut(),
            #[cfg(feature = "rdma")]
            Self::Rdma(c, _) => c.as_mut(),
        }
    }

    fn inner_ref(&self) -> &dyn Channel {
        match self {
            Self::Tcp(c) | Self::Fallback(c, _) => c,
            Self::Uring(c) => c.as_ref(),
            #[cfg(feature = "rdma")]
            Self::Rdma(c, _) => c.as_ref(),
        }
    }
}

impl Channel for AnyChannel {
    fn negotiated(&self) -> &Negotiated {
        self.inner_ref().negotiated()
    }
    fn send(&mut self, frame: OutFrame) -> Result<SendId, ChannelError> {
        self.inner().send(frame)
    }
    fn poll_completions(&mut self, out: &mut Vec<Completed>) -> Result<usize, ChannelError> {
        self.inner().poll_completions(out)
    }
    fn flush(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.inner().flush(out)
    }
    fn recv<'a>(
        &'a mut self,
        sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Incoming<'a>>, ChannelError> {
        match self {
            Self::Tcp(c) | Self::Fallback(c, _) => c.recv(sink),
            Self::Uring(c) => c.recv(sink),
            #[cfg(feature = "rdma")]
            Self::Rdma(c, _) => c.recv(sink),
        }
    }
    fn stats(&self) -> ChannelStats {
        self.inner_ref().stats()
    }
    fn unacked_bytes(&self) -> Option<u64> {
        self.inner_ref().unacked_bytes()
    }
    fn peer_limited(&self) -> Option<std::time::Duration> {
        self.inner_ref().peer_limited()
    }
    fn has_input(&mut self) -> Result<bool, ChannelError> {
        self.inner().has_input()
    }
    fn wait_sends(&mut self, timeout: std::time::Duration) -> Result<(), ChannelError> {
        self.inner().wait_sends(timeout)
    }
    fn close(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.inner().close(out)
    }
}

pub(crate) fn nonce() -> Result<[u8; 32], SessionError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(SessionError::Random)?;
    Ok(n)
}

/// A source's HELLO nonce: random bytes, the first 8 this host's clock (seconds since
/// the Unix epoch, little-endian), which a HELLO key tag covers so that a destination
/// honours the tag only near its own clock (PROTOCOL.md, HELLO key tag).
pub(crate) fn hello_nonce() -> Result<[u8; 32], SessionError> {
    let mut n = nonce()?;
    n[..8].copy_from_slice(&unix_seconds().to_le_bytes());
    Ok(n)
}

/// This host's clock, seconds since the Unix epoch (0 before it).
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The two handshake machines behind one face.
pub(crate) trait Handshake {
    fn take_output(&mut self, out: &mut Vec<u8>);
    fn receive(&mut self, input: &[u8]) -> Result<usize, HandshakeError>;
    fn is_done(&self) -> bool;
    fn negotiated(&self) -> Option<Negotiated>;
    fn peer_message(&self) -> Option<String>;
}

macro_rules! impl_handshake {
    ($t:ty) => {
        impl Handshake for $t {
            fn take_output(&mut self, out: &mut Vec<u8>) {
                <$t>::take_output(self, out)
            }
            fn receive(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
                <$t>::receive(self, input)
            }
            fn is_done(&self) -> bool {
                <$t>::is_done(self)
            }
            fn negotiated(&self) -> Option<Negotiated> {
                <$t>::negotiated(self).copied()
            }
            fn peer_message(&self) -> Option<String> {
                <$t>::peer_message(self).map(str::to_owned)
            }
        }
    };
}
impl_handshake!(ClientHandshake);
impl_handshake!(ServerHandshake);

/// Runs a handshake over a blocking socket (inside `tls` when given) until it is
/// done; returns the agreement and the bytes that followed it.
///
/// `peer` names the peer in errors: the address connected to, not asked of the socket,
/// whose `getpeername` fails once the peer reset the connection (a destination that
/// turned the connection away, which is then tried again, not a hard error).
fn run_handshake(
    stream: &mut Stream,
    peer: Endpoint,
    hs: &mut dyn Handshake,
    timeout: Duration,
    channel: Option<u16>,
    mut tls: Option<&mut TlsSession>,
) -> Result<(Negotiated, Vec<u8>), SessionError> {
    let io_err = |source| SessionError::HandshakeIo {
        peer: peer.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let deadline = crate::deadline::from_now(timeout);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    // Until the peer's first bytes, a close is the peer turning the connection away.
    let mut heard = false;
    let closed = |heard: bool, e: io::Error| if heard { e } else { turned_away(e) };
    loop {
        out.clear();
        hs.take_output(&mut out);
        hs_write(stream, tls.as_deref_mut(), &out).map_err(|e| io_err(closed(heard, e)))?;
        if let Some(n) = hs.negotiated().filter(|_| hs.is_done()) {
            return Ok((n, Vec::new()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_err(io::ErrorKind::TimedOut.into()));
        }
        // One deadline for the whole handshake, however the peer's bytes trickle in.
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(io_err)?;
        let n = match hs_read(stream, tls.as_deref_mut(), &mut buf, deadline) {
            Ok(n) => n,
            Err(HsReadError::Io(e)) => return Err(io_err(closed(heard, e))),
            Err(HsReadError::Tls(source)) => {
                return Err(SessionError::Tls {
                    peer: peer.clone(),
                    source,
                });
            }
        };
        if n == 0 {
            return Err(io_err(closed(heard, io::ErrorKind::UnexpectedEof.into())));
        }
        heard = true;
        match hs.receive(&buf[..n]) {
            Ok(used) if hs.is_done() => {
                out.clear();
                hs.take_output(&mut out);
                hs_write(stream, tls.as_deref_mut(), &out).map_err(io_err)?;
                let n_ = hs
                    .negotiated()
                    .ok_or_else(|| io_err(io::ErrorKind::InvalidData.into()))?;
                return Ok((n_, buf[used..n].to_vec()));
            }
            Ok(_) => {}
            Err(source) => {
                // Tell the peer why (a REJECT is queued), then give up.
                out.clear();
                hs.take_output(&mut out);
                let _ = hs_write(stream, tls.as_deref_mut(), &out);
                return Err(SessionError::Handshake {
                    channel,
                    peer: peer.clone(),
                    peer_message: hs.peer_message(),
                    source,
                });
            }
        }
    }
}

/// Opens the session's channels to the TCP address `addr`: connects each (with the
/// configured retry), runs the handshake, and returns them in channel order.
///
/// # Errors
/// The first channel that fails; channels already open are closed.
pub fn connect(addr: SocketAddr, cfg: &SessionConfig) -> Result<Vec<Established>, SessionError> {
    connect_to(&Endpoint::Tcp(addr), cfg)
}

/// Opens the session's channels to `endpoint`, a TCP address or a Unix socket path:
/// connects each with [`TcpConfig::connect_timeout`], [`TcpConfig::connect_attempts`]
/// and [`TcpConfig::retry_delay`], runs the handshake within
/// [`SessionConfig::handshake_timeout`], and returns them in channel order.
///
/// # Errors
/// The first channel that fails ([`SessionError::Tcp`] with [`TcpError::Connect`] when
/// every attempt failed); channels already open are closed.
pub fn connect_to(
    endpoint: &Endpoint,
    cfg: &SessionConfig,
) -> Result<Vec<Established>, SessionError> {
    (0..cfg.channels)
        .map(|i| connect_channel_to(endpoint, cfg, i))
        .collect()
}

/// Opens the session's channels over already-connected streams, one per channel in
/// channel order (`streams[i]` becomes channel `i`): sets the socket options that
/// apply (on TCP the buffer sizes, set after `connect` here, and `TCP_NODELAY`; on
/// both the send and receive timeouts) and runs the handshake on each within
/// [`SessionConfig::handshake_timeout`].
///
/// # Errors
/// [`SessionError::StreamCount`] when there are not [`SessionConfig::channels`]
/// streams (nothing is sent then); else the first channel that fails, as
/// [`connect_to`]. Every stream is closed on error.
pub fn connect_streams(
    streams: Vec<Stream>,
    cfg: &SessionConfig,
) -> Result<Vec<Established>, SessionError> {
    if streams.len() != usize::from(cfg.channels) {
        return Err(SessionError::StreamCount {
            given: streams.len(),
            channels: cfg.channels,
        });
    }
    (0..cfg.channels)
        .zip(streams)
        .map(|(i, stream)| connect_stream(stream, cfg, i))
        .collect()
}

/// Opens channel `index` of the session over an already-connected stream, as
/// [`connect_streams`] does for each of its streams.
///
/// # Errors
/// [`SessionError`].
pub fn connect_stream(
    stream: impl Into<Stream>,
    cfg: &SessionConfig,
    index: u16,
) -> Result<Established, SessionError> {
    let stream = stream.into();
    endpoint::set_buffers(&stream, &cfg.tcp)?;
    endpoint::configure(&stream, &cfg.tcp)?;
    let peer = stream.peer().map_err(|source| SessionError::Io {
        op: "getpeername",
        source,
    })?;
    handshake(stream, peer, cfg, index)
}

/// Opens channel `index` of the session to the TCP address `addr` (to re-open a failed
/// channel, or to open channels from several threads).
///
/// # Errors
/// [`SessionError`].
pub fn connect_channel(
    addr: SocketAddr,
    cfg: &SessionConfig,
    index: u16,
) -> Result<Established, SessionError> {
    connect_channel_to(&Endpoint::Tcp(addr), cfg, index)
}

/// Opens channel `index` of the session to `endpoint`, as [`connect_to`] does for each.
///
/// A connection the destination closes before any answer to the handshake (no
/// WELCOME or REJECT; with TLS, before the TLS handshake completed) is opened again,
/// up to [`TcpConfig::connect_attempts`] times in all, [`TcpConfig::retry_delay`]
/// apart, while less than [`SessionConfig::handshake_timeout`] has passed since the
/// first attempt: a destination whose pending places are all taken may turn away a
/// connection whose HELLO it has not read yet (see [`Listener`]). A reopened
/// connection's handshake gets what is left of that timeout, not a whole one again
/// (with TLS, as on a first attempt, the TLS handshake and the pagewire handshake each
/// get that time).
///
/// # Errors
/// [`SessionError`].
pub fn connect_channel_to(
    endpoint: &Endpoint,
    cfg: &SessionConfig,
    index: u16,
) -> Result<Established, SessionError> {
    let attempts = cfg.tcp.connect_attempts.max(1);
    let started = Instant::now();
    let mut attempt = 1;
    let mut again;
    loop {
        let stream = endpoint.connect(&cfg.tcp)?;
        let this = if attempt == 1 {
            cfg
        } else {
            again = SessionConfig {
                // Never zero, which a socket timeout refuses: at worst a quick timeout.
                handshake_timeout: cfg
                    .handshake_timeout
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(1)),
                ..cfg.clone()
            };
            &again
        };
        match handshake(stream, endpoint.clone(), this, index) {
            Err(SessionError::HandshakeIo { source, .. })
                if attempt < attempts
                    && is_turned_away(&source)
                    && started.elapsed() < cfg.handshake_timeout =>
            {
                attempt += 1;
                std::thread::sleep(cfg.tcp.retry_delay);
            }
            r => return r,
        }
    }
}

/// The mark of a handshake's I/O error when the peer closed the connection before any
/// handshake frame of its own arrived (with TLS: before the TLS handshake completed),
/// as a destination whose pending places are all taken may do.
#[derive(Debug)]
struct TurnedAway(io::ErrorKind);

impl std::fmt::Display for TurnedAway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the peer closed the connection before answering the handshake ({})",
            self.0
        )
    }
}

impl std::error::Error for TurnedAway {}

/// `e`, marked [`TurnedAway`] when it says the peer closed the connection.
pub(crate) fn turned_away(e: io::Error) -> io::Error {
    let kind = e.kind();
    match kind {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => io::Error::new(kind, TurnedAway(kind)),
        _ => e,
    }
}

fn is_turned_away(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<TurnedAway>())
}

/// Runs the source's handshake for channel `index` on a connected stream.
fn handshake(
    mut stream: Stream,
    peer: Endpoint,
    cfg: &SessionConfig,
    index: u16,
) -> Result<Established, SessionError> {
    let mut tls = match cfg.encryption.tls() {
        Some(t) => Some(tls_client_handshake(
            &mut stream,
            t,
            cfg.handshake_timeout,
            &peer,
            index,
        )?),
        None => None,
    };
    let binding = match tls.as_deref() {
        Some(t) => Some(t.binding().map_err(|source| SessionError::Tls {
            peer: peer.clone(),
            source,
        })?),
        None => None,
    };
    let mut hs = ClientHandshake::with_binding(
        ClientConfig {
            caps: cfg.caps,
            session: cfg.session,
            channel: ChannelId(index),
            channel_count: cfg.channels,
            auth: cfg.auth.clone(),
            require: cfg.require,
        },
        hello_nonce()?,
        binding,
    )
    .map_err(|source| SessionError::Handshake {
        channel: Some(index),
        peer: peer.clone(),
        peer_message: None,
        source,
    })?;
    let (negotiated, leftover) = run_handshake(
        &mut stream,
        peer,
        &mut hs,
        cfg.handshake_timeout,
        Some(index),
        tls.as_deref_mut(),
    )?;
    Ok(Established {
        stream,
        negotiated,
        leftover,
        tls,
    })
}

/// Waits up to `timeout` (for ever with `None`) for `fd` to become readable;
/// `Ok(false)` on timeout or interruption.
#[cfg(feature = "rdma")]
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let timeout = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
    });
    match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// [`SessionError::Incomplete`]'s message: with no channel established the count is
/// unknown (no handshake named it).
fn incomplete(have: usize, need: usize, timeout: Duration) -> String {
    match need {
        0 => format!(
            "no channel of the session completed its handshake within {timeout:?}; is the \
             source running, with this session's id and key?"
        ),
        _ => format!(
            "only {have} of {need} channels arrived within {timeout:?}; is the source running?"
        ),
    }
}
