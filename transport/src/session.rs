//! Sessions: opening the channels of a migration and accepting them.
//!
//! The source calls [`connect`], which opens `channels` TCP connections and runs the
//! protocol's handshake on each; the destination's [`Listener::accept_session`] accepts
//! connections, runs the handshake on each in its own thread, and keeps the channels of
//! the session it was asked for. A connection that sends garbage, fails
//! authentication, names another session or repeats a channel index is refused (with
//! a REJECT when the handshake got that far) and closed, without touching the
//! session's other channels; the refusals are reported in [`Accepted::refused`].
//!
//! A handshaken connection is an [`Established`]; turn it into a channel of the
//! backend you want on the thread that will drive it ([`Established::open`]); io_uring
//! channels are bound to the thread that creates them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagewire_protocol::{
    Authentication, Capabilities, ChannelId, ClientConfig, ClientHandshake, HandshakeError,
    Negotiated, ServerConfig, ServerHandshake, SessionId,
};

use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::tcp::{self, TcpChannel, TcpConfig, TcpError};
use crate::uring::{self, UringChannel, UringConfig, UringError};

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
}

/// Settings of a session, for either side.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// What this side can do.
    pub caps: Capabilities,
    /// The session id (the destination accepts only this one).
    pub session: SessionId,
    /// Channels the source opens.
    pub channels: u16,
    /// Authentication.
    pub auth: Authentication,
    /// Socket settings.
    pub tcp: TcpConfig,
    /// io_uring settings, for [`Backend::Uring`].
    pub uring: UringConfig,
    /// Time allowed for one channel's handshake.
    pub handshake_timeout: Duration,
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
            tcp: TcpConfig::default(),
            uring: UringConfig::default(),
            handshake_timeout: Duration::from_secs(10),
        }
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
    /// The handshake failed.
    #[error("handshake of channel {channel:?} with {peer} failed{}", peer_message.as_deref().map(|m| format!(" (peer says: {m})")).unwrap_or_default())]
    Handshake {
        /// The channel index, when known.
        channel: Option<u16>,
        /// The peer.
        peer: SocketAddr,
        /// The REJECT message the peer sent, if any.
        peer_message: Option<String>,
        /// Why.
        #[source]
        source: HandshakeError,
    },
    /// The peer closed the connection or went silent during the handshake.
    #[error("{peer} closed the connection or timed out during the handshake")]
    HandshakeIo {
        /// The peer.
        peer: SocketAddr,
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
        peer: SocketAddr,
        /// What is wrong.
        why: &'static str,
    },
    /// Not every channel arrived in time.
    #[error("only {have} of {need} channels arrived within {timeout:?}; is the source running?")]
    Incomplete {
        /// Channels established.
        have: usize,
        /// Channels expected (0 while none arrived).
        need: usize,
        /// The wait.
        timeout: Duration,
    },
    /// No random nonce could be drawn.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// A socket call failed.
    #[error("{op} failed")]
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
    /// The socket.
    pub stream: TcpStream,
    /// What was agreed.
    pub negotiated: Negotiated,
    /// Bytes received after the handshake's last frame.
    pub leftover: Vec<u8>,
}

impl Established {
    /// A TCP channel.
    ///
    /// # Errors
    /// [`TcpError`] when the socket options cannot be set.
    pub fn into_tcp(self, cfg: &TcpConfig) -> Result<TcpChannel, TcpError> {
        TcpChannel::new(self.stream, self.negotiated, &self.leftover, cfg)
    }

    /// An io_uring channel, bound to the calling thread.
    ///
    /// # Errors
    /// [`UringError`], which says when io_uring is disabled, blocked or too old.
    pub fn into_uring(self, cfg: &UringConfig) -> Result<UringChannel, UringError> {
        UringChannel::new(self.stream, self.negotiated, &self.leftover, cfg)
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
                Err(e) if fallback_to_tcp => Ok(AnyChannel::Fallback(self.into_tcp(&cfg.tcp)?, e)),
                Err(e) => Err(e.into()),
            },
        }
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
}

impl AnyChannel {
    fn inner(&mut self) -> &mut dyn Channel {
        match self {
            Self::Tcp(c) | Self::Fallback(c, _) => c,
            Self::Uring(c) => c.as_mut(),
        }
    }

    fn inner_ref(&self) -> &dyn Channel {
        match self {
            Self::Tcp(c) | Self::Fallback(c, _) => c,
            Self::Uring(c) => c.as_ref(),
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
        }
    }
    fn stats(&self) -> ChannelStats {
        self.inner_ref().stats()
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

/// Runs a handshake over a blocking socket until it is done; returns the agreement and
/// the bytes that followed it.
fn run_handshake(
    stream: &mut TcpStream,
    hs: &mut dyn Handshake,
    timeout: Duration,
    channel: Option<u16>,
) -> Result<(Negotiated, Vec<u8>), SessionError> {
    let peer = stream.peer_addr().map_err(|source| SessionError::Io {
        op: "getpeername",
        source,
    })?;
    let io_err = |source| SessionError::HandshakeIo { peer, source };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        out.clear();
        hs.take_output(&mut out);
        stream.write_all(&out).map_err(io_err)?;
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
        let n = stream.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            return Err(io_err(io::ErrorKind::UnexpectedEof.into()));
        }
        match hs.receive(&buf[..n]) {
            Ok(used) if hs.is_done() => {
                out.clear();
                hs.take_output(&mut out);
                stream.write_all(&out).map_err(io_err)?;
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
                let _ = stream.write_all(&out);
                return Err(SessionError::Handshake {
                    channel,
                    peer,
                    peer_message: hs.peer_message(),
                    source,
                });
            }
        }
    }
}

/// Opens the session's channels to `addr`: connects each (with the configured retry),
/// runs the handshake, and returns them in channel order.
///
/// # Errors
/// The first channel that fails; channels already open are closed.
pub fn connect(addr: SocketAddr, cfg: &SessionConfig) -> Result<Vec<Established>, SessionError> {
    let mut out = Vec::with_capacity(usize::from(cfg.channels));
    for i in 0..cfg.channels {
        out.push(connect_channel(addr, cfg, i)?);
    }
    Ok(out)
}

/// Opens channel `index` of the session (to re-open a failed channel, or to open
/// channels from several threads).
///
/// # Errors
/// [`SessionError`].
pub fn connect_channel(
    addr: SocketAddr,
    cfg: &SessionConfig,
    index: u16,
) -> Result<Established, SessionError> {
    let mut stream = tcp::connect(addr, &cfg.tcp)?;
    let mut hs = ClientHandshake::new(
        ClientConfig {
            caps: cfg.caps,
            session: cfg.session,
            channel: ChannelId(index),
            channel_count: cfg.channels,
            auth: cfg.auth.clone(),
        },
        nonce()?,
    )
    .map_err(|source| SessionError::Handshake {
        channel: Some(index),
        peer: addr,
        peer_message: None,
        source,
    })?;
    let (negotiated, leftover) =
        run_handshake(&mut stream, &mut hs, cfg.handshake_timeout, Some(index))?;
    Ok(Established {
        stream,
        negotiated,
        leftover,
    })
}

/// The channels of one session, and what was refused while waiting for them.
#[derive(Debug)]
pub struct Accepted {
    /// The channels, in index order.
    pub channels: Vec<Established>,
    /// Connections refused meanwhile, with the reason.
    pub refused: Vec<SessionError>,
}

/// Accepts the channels of sessions.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    /// Listens on `addr` with the socket settings of `cfg`.
    ///
    /// # Errors
    /// [`SessionError::Tcp`].
    pub fn bind(addr: SocketAddr, cfg: &SessionConfig) -> Result<Self, SessionError> {
        Ok(Self {
            listener: tcp::listen(addr, &cfg.tcp)?,
        })
    }

    /// The address listened on.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until every channel of session `cfg.session` has completed
    /// its handshake, or `timeout` passes. Connections of other sessions, garbage and
    /// failed authentication are refused and listed in [`Accepted::refused`].
    ///
    /// # Errors
    /// [`SessionError::Incomplete`] when the channels do not all arrive in time.
    pub fn accept_session(
        &self,
        cfg: &SessionConfig,
        timeout: Duration,
    ) -> Result<Accepted, SessionError> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = mpsc::channel();
        let mut slots: Vec<Option<Established>> = Vec::new();
        let mut count: Option<u16> = None;
        let mut refused = Vec::new();
        let server = ServerConfig {
            caps: cfg.caps,
            session: Some(cfg.session),
            auth: cfg.auth.clone(),
        };
        loop {
            while let Ok(r) = rx.try_recv() {
                match r {
                    Ok(est) => {
                        if let Err(e) = place(&mut slots, &mut count, est) {
                            refused.push(e);
                        }
                    }
                    Err(e) => refused.push(e),
                }
            }
            if count.is_some() && slots.iter().all(Option::is_some) {
                let channels = slots.into_iter().flatten().collect();
                return Ok(Accepted { channels, refused });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SessionError::Incomplete {
                    have: slots.iter().flatten().count(),
                    need: count.map_or(0, usize::from),
                    timeout,
                });
            }
            // Wait for a connection, at most 50 ms so finished handshakes are collected.
            let wait = (deadline - now).min(Duration::from_millis(50));
            let readable = wait_readable(self.listener.as_raw_fd(), Some(wait))
                .map_err(|source| SessionError::Io { op: "poll", source })?;
            if !readable {
                continue;
            }
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(source) => {
                    return Err(SessionError::Io {
                        op: "accept",
                        source,
                    });
                }
            };
            let tx = tx.clone();
            let server = server.clone();
            let hs_timeout = cfg.handshake_timeout;
            std::thread::spawn(move || {
                let r = nonce()
                    .and_then(|n| {
                        ServerHandshake::new(server, n).map_err(|source| SessionError::Handshake {
                            channel: None,
                            peer: stream.peer_addr().unwrap_or(([0, 0, 0, 0], 0).into()),
                            peer_message: None,
                            source,
                        })
                    })
                    .and_then(|mut hs| run_handshake(&mut stream, &mut hs, hs_timeout, None))
                    .map(|(negotiated, leftover)| Established {
                        stream,
                        negotiated,
                        leftover,
                    });
                // The receiver may be gone when the session completed meanwhile.
                let _ = tx.send(r);
            });
        }
    }
}

/// Puts a handshaken channel into its slot, refusing duplicates and disagreeing counts.
fn place(
    slots: &mut Vec<Option<Established>>,
    count: &mut Option<u16>,
    est: Established,
) -> Result<(), SessionError> {
    let n = est.negotiated;
    let peer = est
        .stream
        .peer_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let bad = |why| SessionError::BadChannel {
        channel: n.channel.0,
        count: n.channel_count,
        peer,
        why,
    };
    match *count {
        None => {
            *count = Some(n.channel_count);
            slots.resize_with(usize::from(n.channel_count), || None);
        }
        Some(c) if c != n.channel_count => return Err(bad("its channel count differs")),
        Some(_) => {}
    }
    let slot = slots
        .get_mut(usize::from(n.channel.0))
        .ok_or_else(|| bad("index out of range"))?;
    if slot.is_some() {
        return Err(bad("that index is already open"));
    }
    *slot = Some(est);
    Ok(())
}

/// Waits up to `timeout` (for ever with `None`) for `fd` to become readable;
/// `Ok(false)` on timeout or interruption.
pub(crate) fn wait_readable(fd: i32, timeout: Option<Duration>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::SessionKey;

    fn cfg(session: u8, channels: u16, key: Option<&[u8]>) -> SessionConfig {
        let auth = match key {
            Some(k) => Authentication::PreSharedKey(SessionKey::new(k.to_vec()).unwrap()),
            None => Authentication::None,
        };
        let mut c = SessionConfig::new(
            Capabilities::new(4096),
            SessionId([session; 16]),
            channels,
            auth,
        );
        c.handshake_timeout = Duration::from_secs(5);
        c
    }

    #[test]
    fn channels_arrive_in_order_and_strangers_are_refused() {
        let key = b"0123456789abcdef0123";
        let dst = cfg(1, 3, Some(key));
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            // Garbage, a wrong key and another session first; then the real channels.
            let mut g = TcpStream::connect(addr).unwrap();
            g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let wrong = connect_channel(addr, &cfg(1, 3, Some(b"another key of 20 b")), 0);
            let other = connect_channel(addr, &cfg(2, 3, Some(key)), 0);
            let good = connect(addr, &cfg(1, 3, Some(key))).unwrap();
            (wrong.unwrap_err(), other.unwrap_err(), good)
        });
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        let (wrong, other, good) = t.join().unwrap();
        assert_eq!(acc.channels.len(), 3);
        for (i, e) in acc.channels.iter().enumerate() {
            assert_eq!(e.negotiated.channel.0 as usize, i);
            assert!(e.negotiated.auth.is_some());
        }
        assert_eq!(good.len(), 3);
        assert!(
            matches!(
                wrong,
                SessionError::Handshake {
                    source: HandshakeError::AuthFailed,
                    ..
                }
            ),
            "{wrong}"
        );
        assert!(
            matches!(
                other,
                SessionError::Handshake {
                    source: HandshakeError::Rejected { .. },
                    ..
                }
            ),
            "{other}"
        );
        assert!(acc.refused.len() >= 2, "{:?}", acc.refused);
    }

    #[test]
    fn a_duplicate_channel_is_refused() {
        let dst = cfg(3, 2, None);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let src = cfg(3, 2, None);
            let a = connect_channel(addr, &src, 0).unwrap();
            let dup = connect_channel(addr, &src, 0).unwrap();
            let b = connect_channel(addr, &src, 1).unwrap();
            (a, dup, b)
        });
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        let _keep = t.join().unwrap();
        assert_eq!(acc.channels.len(), 2);
        assert!(
            acc.refused
                .iter()
                .any(|e| matches!(e, SessionError::BadChannel { channel: 0, .. }))
        );
    }

    #[test]
    fn missing_channels_time_out_with_a_count() {
        let dst = cfg(4, 2, None);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || connect_channel(addr, &cfg(4, 2, None), 1).unwrap());
        let e = l
            .accept_session(&dst, Duration::from_millis(1500))
            .unwrap_err();
        let _keep = t.join().unwrap();
        assert!(
            matches!(
                e,
                SessionError::Incomplete {
                    have: 1,
                    need: 2,
                    ..
                }
            ),
            "{e}"
        );
    }
}
