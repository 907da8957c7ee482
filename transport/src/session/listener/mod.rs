//! The destination's side: accepting the channels of a session.
//!
//! Before its handshake completes a connection is anyone on the network, so everything
//! it can hold is bounded. [`Listener::accept_session`] runs the pending handshakes on
//! the calling threads, multiplexed with `mio` over non-blocking sockets; no thread is
//! spawned per connection. Each pending connection has
//!
//! - a deadline of its own ([`SessionConfig::handshake_timeout`]), separate from the
//!   accept window,
//! - at most one handshake frame of buffered input (the protocol's 4096-byte handshake
//!   frame limit) and the few frames of its own replies,
//! - a place among at most [`ListenerConfig::max_pending`] pending connections.
//!
//! While every place is taken, a new connection is still accepted and what came with
//! it read at once (an honest source's plaintext HELLO, or its TLS ClientHello); then
//! one connection is closed (counted in [`ListenerStats::evicted`]). Connections rank
//! by how far they got: sent nothing; sent bytes (a TLS handshake in progress, part of
//! a HELLO, a HELLO of a session not being accepted); finished the TLS handshake;
//! named a session being accepted; named one that has a key with its HELLO key tag
//! (PROTOCOL.md, "HELLO key tag"; a tag seen before, a replay, does not count);
//! admitted (READY queued: never closed so). The one
//! closed is, lowest rank first and among equals the one accepted first: one whose
//! place is open (it named no session being accepted within
//! [`ListenerConfig::evict_after`] of its accept, or was not admitted within
//! [`ListenerConfig::evict_named_after`]); else one of a lower rank than the newcomer,
//! or, when neither got past the first bytes (nothing, or bytes short of a finished
//! TLS handshake), any such one; else the newcomer itself. Only while every place is held
//! by a connection that finished its TLS handshake or named a session being accepted
//! (with its tag, for a session with a key on a plaintext listener, where a newcomer's
//! tagged HELLO would outrank an untagged one) and is not past its time do new
//! connections wait in the kernel's backlog
//! ([`ListenerConfig::backlog`]); then the accepts between two polls are at most
//! `max_pending`, so a connection whose first bytes were not there at its accept is
//! read before as many newcomers could have replaced it.
//!
//! So connections that send nothing, never a HELLO of a session being accepted, or
//! never a CONFIRM that verifies, cannot keep a source out, however many and however
//! fast they come: the backlog drains as fast as connections are accepted, and a
//! source's plaintext HELLO, read at its accept, outranks them. (Before, 64 such
//! connections renewed every 10 s, the default deadline, did; later, when only places
//! older than `evict_after` opened, a flood of silent connections held every place and
//! a backlog of a thousand more, and a source behind them never got in.) Over TLS a
//! source's connection ranks with the flood's until its TLS handshake completes: it
//! keeps its place while `max_pending` newcomers that sent as much are accepted, which
//! covers a TLS handshake unless the flood comes faster than `max_pending` per round
//! trip; and each newcomer that sends a ClientHello costs the listener's thread a TLS
//! server flight before its place is weighed. A source's connection turned away
//! before its handshake was answered is opened again by the source
//! ([`connect_channel_to`](super::connect_channel_to)). A peer that knows the session
//! id (no secret without TLS) but not the key sends HELLOs without the tag: on a
//! plaintext listener a source's tagged HELLO replaces one of them, and while they hold
//! every place the listener keeps accepting, closing each new one that cannot replace
//! any, so they cannot keep a source out either (a stream of 150 a second, each held
//! 3 s, did before: places opened at 32 a second and the source waited in the backlog
//! behind the stream). A tag counts once per listener (the last 4096 seen) and only
//! within 120 s of this host's clock (the tag covers the source's clock): tagged HELLOs
//! recorded from an earlier migration, each distinct, held every place before that and
//! kept a source out again. For a session without a key, and over TLS (where a connection's
//! HELLO comes only after its TLS handshake, so a source ranks below a finished one
//! until then; client certificates keep such a peer from finishing one), such a peer
//! can still hold places with HELLOs for up to `evict_named_after` each. An honest
//! handshake is admitted within a few round trips.
//!
//! A HELLO that asks for more than [`ListenerConfig::max_channels`] channels is refused
//! with a REJECT (`BAD_CHANNEL`) as soon as it arrives. A failing `accept` (out of file
//! descriptors, memory or socket buffers) is counted and ends neither the call nor the
//! listener. The listener keeps one descriptor open in reserve: out of file descriptors
//! (`EMFILE`, `ENFILE`), it closes it, accepts the waiting connection with it, reads
//! its first bytes, and closes the pending connection it replaces by the rule for a
//! full set of places (only one accepted in an earlier turn), taking the reserve again
//! with that descriptor; so connections that say nothing cannot hold the descriptors
//! under a limit below `max_pending`. With nothing older to replace, the newcomer keeps
//! the reserve's descriptor until the next turn takes it back. Without a reserve, with
//! nothing waiting, and for the other failures, it retries after
//! [`ListenerConfig::accept_backoff`].
//! Refusals are counted in [`ListenerStats`]; only the last few reasons are kept.
//!
//! A listener bound with [`Encryption::Tls`](crate::Encryption::Tls) runs the TLS
//! handshake of each connection first, in the same non-blocking loop and within the
//! same deadline, and answers a plaintext HELLO with a plaintext REJECT
//! (`ENCRYPTION_REQUIRED`); a plaintext listener answers a TLS ClientHello with REJECT
//! `ENCRYPTION_UNSUPPORTED`. Every session accepted on a listener must have its
//! encryption ([`SessionError::Config`] otherwise).
//!
//! The listener is not consumed: after a session was accepted, or after an attempt
//! failed, [`Listener::accept_session`] can be called again on the same socket.
//!
//! Several sessions can be accepted at once, each by its own call on its own thread
//! with its own [`SessionConfig`] (session id and authentication), up to
//! [`ListenerConfig::max_sessions`]; a call beyond it fails at once with
//! [`SessionError::TooManySessions`], and a second call for a session id already being
//! accepted with [`SessionError::SessionInUse`]. The calls share one poll, the pending
//! handshakes and a registry of the sessions being accepted, behind one mutex; each
//! call drives the poll for a slice of at most 50 ms, then lets the others have a
//! turn, and returns when its own session's channels are all there. A pending
//! connection belongs to the session its HELLO names: only then is its handshake built,
//! with that session's settings; a HELLO of a session nobody is accepting is refused
//! (`UNKNOWN_SESSION`). A refusal is listed with the session the connection named, or
//! with every session being accepted when it named none of them. The bounds on
//! connections before their HELLO (`max_pending`, `accept_backoff`, the handshake
//! deadline) are those of the call driving the poll when the connection is accepted;
//! after its HELLO, a connection is held to its own session's `max_channels`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use pagewire_protocol::limits::HANDSHAKE_MAX_FRAME;
use pagewire_protocol::{Abort, AbortReason, Frame, ServerConfig, ServerHandshake};

use super::{Established, SessionConfig, SessionError};
use crate::channel::{Channel, OutFrame};
use crate::endpoint::{Endpoint, StreamListener};
use crate::tcp::{TcpConfig, TcpError};

mod pending;
mod shared;
mod socket;
mod stats;

use shared::{Entry, Shared};
use socket::Socket;
use stats::Counters;
pub use stats::ListenerStats;

/// How many refusal reasons [`Accepted::refused`] keeps (the most recent ones).
pub const MAX_REFUSALS_KEPT: usize = 16;

const LISTENER: Token = Token(usize::MAX);

/// Bounds of a [`Listener`] on connections that have not completed their handshake.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Most connections whose handshake is in progress at once; a further connection
    /// replaces one of them or is closed, or waits in the kernel's backlog (see the
    /// module's documentation). 1 to [`MAX_PENDING`].
    pub max_pending: usize,
    /// Most channels a session may have; a HELLO asking for more is refused at once.
    /// At least 1.
    pub max_channels: u16,
    /// The `listen(2)` backlog: connections the kernel holds while `max_pending` are
    /// in progress (the kernel caps it at `net.core.somaxconn`). At least 1.
    pub backlog: u32,
    /// Pause before retrying an `accept` that failed for lack of resources (memory, or
    /// file descriptors when the reserve descriptor is gone or nothing waited). More
    /// than zero.
    pub accept_backoff: Duration,
    /// How long after its accept a pending connection that has named no session being
    /// accepted keeps its place against a new connection that got no further while
    /// every place is taken (see the module's documentation: one that has not finished
    /// a TLS handshake yields its place to a newcomer of its rank or above at any age,
    /// whatever this says). An honest source's HELLO comes right after
    /// its connection (after the TLS handshake with TLS), so this needs to cover a
    /// round trip or two, not the handshake deadline. `Duration::MAX`: never by age.
    pub evict_after: Duration,
    /// The same for a pending connection whose HELLO named a session being accepted
    /// but that is not admitted yet (its CONFIRM not verified): it covers an honest
    /// source's whole handshake, two round trips (three with TLS) and its key
    /// derivation, and keeps a peer that knows the session id but not its key from
    /// holding a place for the whole handshake deadline. `Duration::MAX`: never.
    pub evict_named_after: Duration,
    /// Most sessions accepted at once ([`Listener::accept_session`] calls running
    /// together on different threads); taken when the listener is bound. At least 1.
    pub max_sessions: usize,
}

impl Default for ListenerConfig {
    /// 64 pending handshakes, 64 channels, a backlog of 1024, 50 ms back-off, a new
    /// connection replaces one that named no session within 500 ms or was not admitted
    /// within 2 s, 8 sessions at once.
    fn default() -> Self {
        Self {
            max_pending: 64,
            max_channels: 64,
            backlog: 1024,
            accept_backoff: Duration::from_millis(50),
            evict_after: Duration::from_millis(500),
            evict_named_after: Duration::from_secs(2),
            max_sessions: 8,
        }
    }
}

impl ListenerConfig {
    fn validate(&self) -> Result<(), SessionError> {
        let bad = SessionError::Config;
        if self.max_pending == 0 || self.max_pending > MAX_PENDING {
            return Err(bad("ListenerConfig::max_pending must be in 1..=65536"));
        }
        if self.max_channels == 0 {
            return Err(bad("ListenerConfig::max_channels must be at least 1"));
        }
        if self.backlog == 0 || i32::try_from(self.backlog).is_err() {
            return Err(bad("ListenerConfig::backlog must be 1..=i32::MAX"));
        }
        if self.accept_backoff.is_zero() {
            return Err(bad("ListenerConfig::accept_backoff must be more than zero"));
        }
        if self.max_sessions == 0 {
            return Err(bad("ListenerConfig::max_sessions must be at least 1"));
        }
        Ok(())
    }
}

/// Most pending connections a listener may be configured for
/// ([`ListenerConfig::max_pending`]): each holds a descriptor and up to 64 KiB of
/// handshake input, and as many are accepted between two polls.
pub const MAX_PENDING: usize = 65536;

/// The channels of one session, and what was refused while waiting for them.
#[derive(Debug)]
pub struct Accepted {
    /// The channels, in index order.
    pub channels: Vec<Established>,
    /// The last [`MAX_REFUSALS_KEPT`] connections refused meanwhile that named this
    /// session or no session being accepted, with the reason (all refusals are counted
    /// in `stats`).
    pub refused: Vec<SessionError>,
    /// What happened to the connections the listener saw during this call (those of
    /// sessions accepted at the same time included).
    pub stats: ListenerStats,
}

/// The longest a call drives the shared poll before it lets other calls have a turn.
const SLICE: Duration = Duration::from_millis(50);

/// Accepts the channels of sessions on one socket: one session after another, and up
/// to [`ListenerConfig::max_sessions`] at once from different threads.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// The poll, the pending handshakes and the sessions being accepted. A call holds
    /// it for one slice (at most [`SLICE`]) at a time.
    shared: Mutex<Shared>,
    counters: Counters,
    /// [`ListenerConfig::max_sessions`] as bound.
    max_sessions: usize,
}

impl Listener {
    /// Listens on the TCP address `addr` with the socket settings of `cfg`, its
    /// [`ListenerConfig::backlog`] and its [`ListenerConfig::max_sessions`].
    ///
    /// # Errors
    /// [`SessionError::Tcp`] when the socket cannot be bound, [`SessionError::Config`]
    /// for an invalid [`ListenerConfig`], [`SessionError::Io`] when epoll cannot be set
    /// up.
    pub fn bind(addr: SocketAddr, cfg: &SessionConfig) -> Result<Self, SessionError> {
        Self::bind_endpoint(&Endpoint::Tcp(addr), cfg)
    }

    /// Listens on `endpoint`, a TCP address or a Unix socket path (which must not
    /// exist yet, and is not removed when the listener is dropped), as [`Self::bind`].
    ///
    /// # Errors
    /// As [`Self::bind`].
    pub fn bind_endpoint(endpoint: &Endpoint, cfg: &SessionConfig) -> Result<Self, SessionError> {
        cfg.listener.validate()?;
        let listener = endpoint.listen(&cfg.tcp)?;
        Self::listen_on(listener, cfg)
    }

    /// Accepts on a listening socket bound by the caller (e.g. handed over by a
    /// management layer): a `std::net::TcpListener` or `std::os::unix::net::UnixListener`
    /// (blocking or not; it is made non-blocking). Its backlog becomes
    /// [`ListenerConfig::backlog`]; on TCP, the buffer sizes of `cfg` are set on it and
    /// apply to the connections accepted from now on.
    ///
    /// # Errors
    /// As [`Self::bind`].
    pub fn from_listener(
        listener: impl Into<StreamListener>,
        cfg: &SessionConfig,
    ) -> Result<Self, SessionError> {
        cfg.listener.validate()?;
        let listener = listener.into();
        if let StreamListener::Tcp(l) = &listener {
            let sock = socket2::SockRef::from(l);
            let err = |op| move |source| TcpError::Socket { op, source };
            if let Some(n) = cfg.tcp.send_buffer {
                sock.set_send_buffer_size(crate::tcp::socket_buffer(n))
                    .map_err(err("setsockopt(SO_SNDBUF)"))?;
            }
            if let Some(n) = cfg.tcp.recv_buffer {
                sock.set_recv_buffer_size(crate::tcp::socket_buffer(n))
                    .map_err(err("setsockopt(SO_RCVBUF)"))?;
            }
        }
        Self::listen_on(listener, cfg)
    }

    fn listen_on(listener: StreamListener, cfg: &SessionConfig) -> Result<Self, SessionError> {
        if let Some(t) = cfg.encryption.tls() {
            // A destination needs the server role: say so now, not per connection.
            t.server_config().map_err(|source| SessionError::Tls {
                peer: Endpoint::Tcp(([0, 0, 0, 0], 0).into()),
                source,
            })?;
        }
        let io_err = |op| move |source| SessionError::Io { op, source };
        // Listening again only changes the backlog (validated to fit an i32).
        socket2::SockRef::from(&listener)
            .listen(cfg.listener.backlog as i32)
            .map_err(io_err("listen"))?;
        let mut socket = Socket::new(listener).map_err(io_err("fcntl(O_NONBLOCK)"))?;
        let poll = Poll::new().map_err(io_err("epoll_create"))?;
        poll.registry()
            .register(&mut socket, LISTENER, Interest::READABLE)
            .map_err(io_err("epoll_ctl"))?;
        Ok(Self {
            socket,
            shared: Mutex::new(Shared {
                poll,
                events: Events::with_capacity(256),
                conns: Vec::new(),
                free: Vec::new(),
                pending: 0,
                listener_ready: true,
                retry_at: None,
                at_cap: false,
                sessions: Vec::new(),
                scratch: vec![0u8; HANDSHAKE_MAX_FRAME as usize],
                tls: cfg.encryption.tls().cloned(),
                reserve: shared::reserve_descriptor(),
                seen_tags: shared::SeenTags::default(),
            }),
            counters: Counters::default(),
            max_sessions: cfg.listener.max_sessions,
        })
    }

    /// The TCP address listened on.
    ///
    /// # Errors
    /// `getsockname`'s error; `InvalidInput` for a Unix socket (see
    /// [`Self::local_endpoint`]).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.local_endpoint()? {
            Endpoint::Tcp(a) => Ok(a),
            Endpoint::Unix(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Unix socket has no IP address; use local_endpoint",
            )),
        }
    }

    /// The endpoint listened on: the TCP address, or the Unix socket's path.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        self.socket.local_endpoint()
    }

    /// What the listener did with the connections it saw since it was bound; readable
    /// from any thread, also while a call is accepting.
    pub fn stats(&self) -> ListenerStats {
        self.counters.snapshot()
    }

    /// How many sessions are being accepted right now ([`Self::accept_session`] calls
    /// in progress).
    pub fn accepting(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Accepts connections until every channel of session `cfg.session` has completed
    /// its handshake, or `timeout` passes. Each connection is matched to a session by
    /// the id in its HELLO: other calls running at the same time on other threads
    /// (up to [`ListenerConfig::max_sessions`], each with its own session id and
    /// authentication) get their own channels, and a HELLO of a session nobody is
    /// accepting is refused (`UNKNOWN_SESSION`). Garbage, failed authentication, too
    /// many channels and handshakes that miss their deadline are refused too, counted
    /// in [`Accepted::stats`] and [`Self::stats`], and the last few listed in
    /// [`Accepted::refused`]. When the call returns, handshakes in progress for its
    /// session (all of them, when no other call is accepting) are closed. The listener
    /// can be called again after any outcome.
    ///
    /// # Errors
    /// [`SessionError::TooManySessions`] at once when `max_sessions` calls are already
    /// accepting; [`SessionError::SessionInUse`] at once when another call is accepting
    /// the same session id; [`SessionError::Incomplete`] when the channels do not all
    /// arrive in time (those that did are sent ABORT `TIMEOUT`, naming the missing
    /// ones, and closed); [`SessionError::Config`] or [`SessionError::Handshake`] for an
    /// invalid `cfg`; [`SessionError::Io`] when epoll fails or `accept` fails for a
    /// reason other than a lack of resources.
    pub fn accept_session(
        &self,
        cfg: &SessionConfig,
        timeout: Duration,
    ) -> Result<Accepted, SessionError> {
        self.accept_session_until(cfg, timeout, &|| false)
    }

    /// [`Self::accept_session`], also ended early, with [`SessionError::Cancelled`],
    /// once `cancelled()` returns true (checked at least every 50 ms).
    ///
    /// # Errors
    /// As [`Self::accept_session`], and [`SessionError::Cancelled`].
    pub fn accept_session_until(
        &self,
        cfg: &SessionConfig,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Accepted, SessionError> {
        cfg.listener.validate()?;
        let server = ServerConfig {
            caps: cfg.caps,
            session: Some(cfg.session),
            auth: cfg.auth.clone(),
        };
        // A configuration the handshake refuses is this side's fault: say so now.
        ServerHandshake::new(server.clone(), [0; 32]).map_err(|source| {
            SessionError::Handshake {
                channel: None,
                peer: self
                    .local_endpoint()
                    .unwrap_or_else(|_| Endpoint::Tcp(([0, 0, 0, 0], 0).into())),
                peer_message: None,
                source,
            }
        })?;
        let deadline = crate::deadline::from_now(timeout);
        let before = self.counters.snapshot();
        {
            let mut sh = self.lock();
            if sh.tls.is_some() != cfg.encryption.tls().is_some() {
                return Err(SessionError::Config(
                    "the session's encryption differs from the listener's (bind the listener with the same Encryption)",
                ));
            }
            if sh
                .sessions
                .iter()
                .any(|s| s.server.session == Some(cfg.session))
            {
                return Err(SessionError::SessionInUse {
                    session: cfg.session,
                });
            }
            if sh.sessions.len() >= self.max_sessions {
                return Err(SessionError::TooManySessions {
                    max: self.max_sessions,
                });
            }
            sh.sessions.push(Entry {
                server: server.clone(),
                max_channels: cfg.listener.max_channels,
                slots: Vec::new(),
                claimed: Vec::new(),
                count: None,
                refused: VecDeque::new(),
                peak: 0,
            });
            // Connections may have queued while no call was running: try at once.
            sh.listener_ready = true;
        }
        let id = cfg.session;
        loop {
            let mut sh = self.lock();
            let done = sh.entry(id).is_some_and(Entry::is_complete);
            let now = Instant::now();
            let result = if done {
                Some(Ok(()))
            } else if cancelled() {
                Some(Err(SessionError::Cancelled))
            } else if now >= deadline {
                let e = sh.entry(id);
                Some(Err(SessionError::Incomplete {
                    have: e.map_or(0, |e| e.slots.iter().flatten().count()),
                    need: e.and_then(|e| e.count).map_or(0, usize::from),
                    timeout,
                }))
            } else {
                let lim = Turn {
                    listener: cfg.listener,
                    handshake_timeout: cfg.handshake_timeout,
                    server: &server,
                };
                sh.step(
                    &self.socket,
                    &self.counters,
                    &lim,
                    deadline.min(now + SLICE),
                )
                .err()
                .map(Err)
            };
            if let Some(result) = result {
                let entry = sh.unregister(id, &self.counters);
                drop(sh);
                let missing: Vec<u16> = entry.as_ref().map_or_else(Vec::new, |e| {
                    (0u16..)
                        .zip(&e.slots)
                        .filter(|(_, s)| s.is_none())
                        .map(|(i, _)| i)
                        .collect()
                });
                let (channels, refused, peak) = entry.map_or_else(Default::default, |e| {
                    (
                        e.slots.into_iter().flatten().collect(),
                        e.refused.into(),
                        e.peak,
                    )
                });
                if let Err(e @ SessionError::Incomplete { need, timeout, .. }) = result {
                    abort_incomplete(channels, &missing, need, timeout, &cfg.tcp);
                    return Err(e);
                }
                let stats = self.counters.snapshot().since(&before, peak);
                return result.map(|()| Accepted {
                    channels,
                    refused,
                    stats,
                });
            }
            let others = sh.sessions.len() > 1;
            drop(sh);
            if others {
                // Let a call waiting for the lock take its turn (std's mutex is not fair).
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tells the source, on each channel of a session that completed its handshake, why
/// the session ends when the accept window closed with channels `missing` (of
/// `count`): ABORT `TIMEOUT` naming them (PROTOCOL.md, ABORT), best effort. Each channel
/// then closes its sending side (TLS `close_notify` first), and what the source sent
/// meanwhile is read and dropped until it closes or 250 ms pass in all, so that the
/// close does not reset the connection with the ABORT still unread. Each send is
/// bounded by a second.
fn abort_incomplete(
    channels: Vec<Established>,
    missing: &[u16],
    count: usize,
    window: Duration,
    tcp: &TcpConfig,
) {
    if channels.is_empty() {
        return;
    }
    let mut names: Vec<String> = missing.iter().take(8).map(u16::to_string).collect();
    if missing.len() > 8 {
        names.push(format!("and {} more", missing.len() - 8));
    }
    let message = format!(
        "the destination's accept window ({window:?}) ended without channel {} of {count}",
        names.join(", ")
    );
    let frame = Frame::Abort(Abort {
        reason: AbortReason::TIMEOUT,
        message: &message,
    });
    let tcp = TcpConfig {
        send_timeout: Duration::from_secs(1),
        ..tcp.clone()
    };
    // Each channel's frame goes out before any is closed, and the reads to drain come
    // from a second handle to the socket (none when descriptors have run out).
    let mut open = Vec::with_capacity(channels.len());
    for e in channels {
        let drain = e.stream.try_clone().ok();
        if let (Ok(mut ch), Ok(f)) = (e.into_tcp(&tcp), OutFrame::whole(&frame)) {
            let _ = ch.send(f);
            open.push((ch, drain));
        }
    }
    let deadline = Instant::now() + Duration::from_millis(250);
    let mut done = Vec::new();
    for (mut ch, drain) in open {
        let _ = ch.close(&mut done);
        let Some(mut s) = drain else { continue };
        let mut sink = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match std::io::Read::read(&mut s, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// The settings of the call driving the poll for a slice.
struct Turn<'a> {
    listener: ListenerConfig,
    handshake_timeout: Duration,
    /// Answers connections that name no session being accepted (or send garbage).
    server: &'a ServerConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::connect;
    use crate::session::connect_channel;
    use pagewire_protocol::SessionKey;
    use pagewire_protocol::{
        Authentication, Capabilities, HandshakeError, RejectReason, SessionId,
    };
    use std::io::Write;
    use std::net::TcpStream;

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
    fn a_duplicate_channel_or_another_count_is_refused_before_ready() {
        let dst = cfg(3, 2, None);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let src = cfg(3, 2, None);
            let a = connect_channel(addr, &src, 0).unwrap();
            let dup = connect_channel(addr, &src, 0).unwrap_err();
            let three = connect_channel(addr, &cfg(3, 3, None), 2).unwrap_err();
            let b = connect_channel(addr, &src, 1).unwrap();
            (a, dup, three, b)
        });
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        let (_a, dup, three, _b) = t.join().unwrap();
        assert_eq!(acc.channels.len(), 2);
        for (e, want) in [(&dup, "holds that index"), (&three, "count differs")] {
            assert!(
                matches!(
                    e,
                    SessionError::Handshake {
                        source: HandshakeError::Rejected {
                            reason: RejectReason::BAD_CHANNEL,
                            ..
                        },
                        peer_message: Some(m),
                        ..
                    } if m.contains(want)
                ),
                "{e}"
            );
        }
        let bad: Vec<_> = acc
            .refused
            .iter()
            .filter_map(|e| match e {
                SessionError::BadChannel { channel, count, .. } => Some((*channel, *count)),
                _ => None,
            })
            .collect();
        assert_eq!(bad, [(0, 2), (2, 3)], "{:?}", acc.refused);
        assert_eq!(acc.stats.refused_channel, 2);
        assert_eq!(acc.stats.established, 2);
    }

    #[test]
    fn missing_channels_time_out_with_a_count() {
        let dst = cfg(4, 2, None);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut c = connect_channel(addr, &cfg(4, 2, None), 1).unwrap();
            // A source may send once READY arrived: bytes the destination never reads,
            // which a plain close would answer with a reset that loses the ABORT.
            c.stream.write_all(&[0x5a; 32 * 1024]).unwrap();
            c
        });
        let e = l
            .accept_session(&dst, Duration::from_millis(1500))
            .unwrap_err();
        let mut keep = t.join().unwrap();
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
        // The channel that arrived is told why it ends, then closed.
        let mut got = std::mem::take(&mut keep.leftover);
        keep.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::io::Read::read_to_end(&mut keep.stream, &mut got).unwrap();
        let limits = pagewire_protocol::Limits::session(
            4096,
            64,
            1 << 20,
            pagewire_protocol::CodecSet::all_known(),
            None,
        )
        .unwrap();
        let env = pagewire_protocol::Envelope::parse(got[..8].try_into().unwrap(), &limits)
            .expect("an envelope");
        match Frame::decode(env, &got[8..], &limits).expect("a whole frame, alone") {
            Frame::Abort(a) => {
                assert_eq!(a.reason, AbortReason::TIMEOUT);
                assert!(
                    a.message.contains("without channel 0 of 2"),
                    "{}",
                    a.message
                );
            }
            f => panic!("not an ABORT: {f:?}"),
        }
    }

    #[test]
    fn invalid_listener_settings_are_refused() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut c = cfg(5, 1, None);
        c.listener.max_pending = 0;
        assert!(matches!(
            Listener::bind(addr, &c),
            Err(SessionError::Config(_))
        ));
        c = cfg(5, 1, None);
        c.listener.max_sessions = 0;
        assert!(matches!(
            Listener::bind(addr, &c),
            Err(SessionError::Config(_))
        ));
        let good = cfg(5, 1, None);
        let l = Listener::bind(addr, &good).unwrap();
        let mut c = good.clone();
        c.listener.max_channels = 0;
        assert!(matches!(
            l.accept_session(&c, Duration::from_millis(10)),
            Err(SessionError::Config(_))
        ));
        c = good;
        c.listener.accept_backoff = Duration::ZERO;
        assert!(matches!(
            l.accept_session(&c, Duration::from_millis(10)),
            Err(SessionError::Config(_))
        ));
    }
}
