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
//! - a place among at most [`ListenerConfig::max_pending`] pending connections; while
//!   they are all taken, new connections wait in the kernel's backlog
//!   ([`ListenerConfig::backlog`]) and are accepted as places free up.
//!
//! A HELLO that asks for more than [`ListenerConfig::max_channels`] channels is refused
//! with a REJECT (`BAD_CHANNEL`) as soon as it arrives. A failing `accept` (out of file
//! descriptors, memory or socket buffers) is counted and retried after
//! [`ListenerConfig::accept_backoff`]; it ends neither the call nor the listener.
//! Refusals are counted in [`ListenerStats`]; only the last few reasons are kept.
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
//! with every session being accepted when it named none of them.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::net::{TcpListener as MioListener, TcpStream as MioStream};
use mio::{Events, Interest, Poll, Token};
use pagewire_protocol::limits::HANDSHAKE_MAX_FRAME;
use pagewire_protocol::{
    AuthMethod, Authentication, ChecksumId, Frame, FrameDecoder, HandshakeError, Limits, Reject,
    RejectReason, ServerConfig, ServerHandshake, SessionId, WireList,
};

use super::{Established, SessionConfig, SessionError, nonce};
use crate::tcp;

/// How many refusal reasons [`Accepted::refused`] keeps (the most recent ones).
pub const MAX_REFUSALS_KEPT: usize = 16;

const LISTENER: Token = Token(usize::MAX);

/// Bounds of a [`Listener`] on connections that have not completed their handshake.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Most connections whose handshake is in progress at once; further connections
    /// wait in the kernel's backlog. At least 1.
    pub max_pending: usize,
    /// Most channels a session may have; a HELLO asking for more is refused at once.
    /// At least 1.
    pub max_channels: u16,
    /// The `listen(2)` backlog: connections the kernel holds while `max_pending` are
    /// in progress (the kernel caps it at `net.core.somaxconn`). At least 1.
    pub backlog: u32,
    /// Pause before retrying an `accept` that failed for lack of resources
    /// (file descriptors, memory). More than zero.
    pub accept_backoff: Duration,
    /// Most sessions accepted at once ([`Listener::accept_session`] calls running
    /// together on different threads); taken when the listener is bound. At least 1.
    pub max_sessions: usize,
}

impl Default for ListenerConfig {
    /// 64 pending handshakes, 64 channels, a backlog of 1024, 50 ms back-off, 8
    /// sessions at once.
    fn default() -> Self {
        Self {
            max_pending: 64,
            max_channels: 64,
            backlog: 1024,
            accept_backoff: Duration::from_millis(50),
            max_sessions: 8,
        }
    }
}

impl ListenerConfig {
    fn validate(&self) -> Result<(), SessionError> {
        let bad = SessionError::Config;
        if self.max_pending == 0 {
            return Err(bad("ListenerConfig::max_pending must be at least 1"));
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

/// What a [`Listener`] did with the connections it saw: since it was bound
/// ([`Listener::stats`]) or during one call ([`Accepted::stats`]).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections taken from the socket.
    pub accepted: u64,
    /// Connections that completed their handshake and became a channel of the session.
    pub established: u64,
    /// Handshakes that failed: garbage, failed authentication, another session, no
    /// common version or codec, a REJECT from the peer.
    pub refused_handshake: u64,
    /// HELLOs asking for more channels than [`ListenerConfig::max_channels`].
    pub refused_too_many_channels: u64,
    /// Completed handshakes that did not fit the session (an index already open, out
    /// of range, or a channel count that differs).
    pub refused_channel: u64,
    /// Connections the peer closed, or whose socket failed, during the handshake.
    pub closed: u64,
    /// Handshakes that did not complete within their deadline.
    pub timed_out: u64,
    /// Handshakes still in progress when a call returned; they were closed.
    pub abandoned: u64,
    /// Times `max_pending` handshakes were in progress and new connections were left
    /// in the backlog.
    pub cap_reached: u64,
    /// `accept` calls that failed (out of file descriptors, memory, ...); each was
    /// retried after the back-off.
    pub accept_errors: u64,
    /// The most handshakes in progress at once.
    pub peak_pending: u64,
}

impl ListenerStats {
    fn since(&self, before: &Self, peak: u64) -> Self {
        Self {
            accepted: self.accepted - before.accepted,
            established: self.established - before.established,
            refused_handshake: self.refused_handshake - before.refused_handshake,
            refused_too_many_channels: self.refused_too_many_channels
                - before.refused_too_many_channels,
            refused_channel: self.refused_channel - before.refused_channel,
            closed: self.closed - before.closed,
            timed_out: self.timed_out - before.timed_out,
            abandoned: self.abandoned - before.abandoned,
            cap_reached: self.cap_reached - before.cap_reached,
            accept_errors: self.accept_errors - before.accept_errors,
            peak_pending: peak,
        }
    }
}

/// The live counters behind [`ListenerStats`], readable from any thread.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    established: AtomicU64,
    refused_handshake: AtomicU64,
    refused_too_many_channels: AtomicU64,
    refused_channel: AtomicU64,
    closed: AtomicU64,
    timed_out: AtomicU64,
    abandoned: AtomicU64,
    cap_reached: AtomicU64,
    accept_errors: AtomicU64,
    peak_pending: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> ListenerStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerStats {
            accepted: l(&self.accepted),
            established: l(&self.established),
            refused_handshake: l(&self.refused_handshake),
            refused_too_many_channels: l(&self.refused_too_many_channels),
            refused_channel: l(&self.refused_channel),
            closed: l(&self.closed),
            timed_out: l(&self.timed_out),
            abandoned: l(&self.abandoned),
            cap_reached: l(&self.cap_reached),
            accept_errors: l(&self.accept_errors),
            peak_pending: l(&self.peak_pending),
        }
    }
}

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
    socket: MioListener,
    /// The poll, the pending handshakes and the sessions being accepted. A call holds
    /// it for one slice (at most [`SLICE`]) at a time.
    shared: Mutex<Shared>,
    counters: Counters,
    /// [`ListenerConfig::max_sessions`] as bound.
    max_sessions: usize,
}

impl Listener {
    /// Listens on `addr` with the socket settings of `cfg`, its
    /// [`ListenerConfig::backlog`] and its [`ListenerConfig::max_sessions`].
    ///
    /// # Errors
    /// [`SessionError::Tcp`] when the socket cannot be bound, [`SessionError::Config`]
    /// for an invalid [`ListenerConfig`], [`SessionError::Io`] when epoll cannot be set
    /// up.
    pub fn bind(addr: SocketAddr, cfg: &SessionConfig) -> Result<Self, SessionError> {
        cfg.listener.validate()?;
        let io_err = |op| move |source| SessionError::Io { op, source };
        let std_listener = tcp::listen(addr, &cfg.tcp)?;
        // Listening again only changes the backlog (validated to fit an i32).
        socket2::SockRef::from(&std_listener)
            .listen(cfg.listener.backlog as i32)
            .map_err(io_err("listen"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("fcntl(O_NONBLOCK)"))?;
        let mut socket = MioListener::from_std(std_listener);
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
            }),
            counters: Counters::default(),
            max_sessions: cfg.listener.max_sessions,
        })
    }

    /// The address listened on.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
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
    /// arrive in time; [`SessionError::Config`] or [`SessionError::Handshake`] for an
    /// invalid `cfg`; [`SessionError::Io`] when epoll fails or `accept` fails for a
    /// reason other than a lack of resources.
    pub fn accept_session(
        &self,
        cfg: &SessionConfig,
        timeout: Duration,
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
                    .local_addr()
                    .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into()),
                peer_message: None,
                source,
            }
        })?;
        let deadline = Instant::now() + timeout;
        let before = self.counters.snapshot();
        {
            let mut sh = self.lock();
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
                let (channels, refused, peak) = entry.map_or_else(Default::default, |e| {
                    (
                        e.slots.into_iter().flatten().collect(),
                        e.refused.into(),
                        e.peak,
                    )
                });
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

/// The settings of the call driving the poll for a slice.
struct Turn<'a> {
    listener: ListenerConfig,
    handshake_timeout: Duration,
    /// Answers connections that name no session being accepted (or send garbage).
    server: &'a ServerConfig,
}

/// A session being accepted by one call.
#[derive(Debug)]
struct Entry {
    /// Its handshake settings (`session` is always `Some`).
    server: ServerConfig,
    max_channels: u16,
    slots: Vec<Option<Established>>,
    count: Option<u16>,
    refused: VecDeque<SessionError>,
    peak: u64,
}

impl Entry {
    fn is_complete(&self) -> bool {
        self.count.is_some() && self.slots.iter().all(Option::is_some)
    }

    /// Keeps the reason, dropping the oldest beyond [`MAX_REFUSALS_KEPT`].
    fn refuse(&mut self, e: SessionError) {
        if self.refused.len() == MAX_REFUSALS_KEPT {
            self.refused.pop_front();
        }
        self.refused.push_back(e);
    }
}

/// Where a pending handshake stands.
#[derive(Debug)]
enum Phase {
    /// Exchanging frames.
    Running,
    /// Done: the last output (READY) is being sent.
    Done,
    /// Failed: the last output (a REJECT) is being sent, then the connection closes.
    Failing(SessionError),
}

/// A connection whose handshake is in progress.
#[derive(Debug)]
struct Pending {
    stream: MioStream,
    peer: SocketAddr,
    /// Built once the first frame arrived, for the session it names.
    hs: Option<ServerHandshake>,
    /// The session being accepted that the HELLO named, if any.
    session: Option<SessionId>,
    /// Reads the first frame, to pick the session and refuse a HELLO that asks for too
    /// many channels before the handshake answers it; `None` once it was seen.
    hello: Option<FrameDecoder>,
    /// The bytes received before the first frame was complete (at most one frame and
    /// one read), fed to the handshake once it is built.
    early: Vec<u8>,
    /// Output not yet written.
    out: Vec<u8>,
    /// Bytes received after the handshake's last frame.
    leftover: Vec<u8>,
    deadline: Instant,
    phase: Phase,
}

/// What driving a connection came to.
enum Outcome {
    /// It waits for the socket.
    Wait,
    /// Its handshake completed and its last output was written.
    Established,
    /// It is refused (the reason) and to be closed.
    Refused(SessionError),
}

/// The state the calls of one [`Listener`] share.
#[derive(Debug)]
struct Shared {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Pending>>,
    free: Vec<usize>,
    pending: usize,
    listener_ready: bool,
    retry_at: Option<Instant>,
    at_cap: bool,
    sessions: Vec<Entry>,
    scratch: Vec<u8>,
}

impl Shared {
    fn entry(&self, id: SessionId) -> Option<&Entry> {
        self.sessions.iter().find(|s| s.server.session == Some(id))
    }

    fn entry_mut(&mut self, id: SessionId) -> Option<&mut Entry> {
        self.sessions
            .iter_mut()
            .find(|s| s.server.session == Some(id))
    }

    /// Removes session `id`, closing the handshakes in progress for it (all of them
    /// when no other session is being accepted).
    fn unregister(&mut self, id: SessionId, counters: &Counters) -> Option<Entry> {
        let pos = self
            .sessions
            .iter()
            .position(|s| s.server.session == Some(id));
        let entry = pos.map(|p| self.sessions.swap_remove(p));
        let last = self.sessions.is_empty();
        for i in 0..self.conns.len() {
            let ours = self.conns[i]
                .as_ref()
                .is_some_and(|c| last || c.session == Some(id));
            if ours && let Some(mut c) = self.conns[i].take() {
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.free.push(i);
                self.pending -= 1;
                bump(&counters.abandoned);
            }
        }
        entry
    }

    /// Accepts what waits, closes what missed its deadline, polls once (until `until`
    /// at the latest) and drives the connections that became ready.
    fn step(
        &mut self,
        socket: &MioListener,
        counters: &Counters,
        lim: &Turn<'_>,
        until: Instant,
    ) -> Result<(), SessionError> {
        let limits = lim.listener;
        let now = Instant::now();
        if self.listener_ready && self.retry_at.is_none_or(|t| now >= t) {
            self.retry_at = None;
            loop {
                if self.pending >= limits.max_pending {
                    if !self.at_cap {
                        self.at_cap = true;
                        bump(&counters.cap_reached);
                    }
                    break;
                }
                match socket.accept() {
                    Ok((stream, peer)) => {
                        self.at_cap = false;
                        bump(&counters.accepted);
                        self.start(counters, stream, peer, now + lim.handshake_timeout);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.listener_ready = false;
                        break;
                    }
                    Err(e) if is_transient(&e) => {}
                    Err(e) if is_fatal(&e) => {
                        return Err(SessionError::Io {
                            op: "accept",
                            source: e,
                        });
                    }
                    Err(_) => {
                        // Out of descriptors, memory or buffers: the connection stays
                        // in the backlog; try again after a pause.
                        bump(&counters.accept_errors);
                        self.retry_at = Some(now + limits.accept_backoff);
                        break;
                    }
                }
            }
        }
        let mut wake = until;
        for i in 0..self.conns.len() {
            let Some(c) = &self.conns[i] else { continue };
            if c.deadline <= now {
                let peer = c.peer;
                bump(&counters.timed_out);
                self.close(
                    i,
                    Some(SessionError::HandshakeIo {
                        peer,
                        source: io::ErrorKind::TimedOut.into(),
                    }),
                );
            } else {
                wake = wake.min(c.deadline);
            }
        }
        if self.listener_ready && self.pending < limits.max_pending {
            wake = wake.min(self.retry_at.unwrap_or(now));
        }
        match self
            .poll
            .poll(&mut self.events, Some(wake.saturating_duration_since(now)))
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(source) => {
                return Err(SessionError::Io {
                    op: "epoll_wait",
                    source,
                });
            }
        }
        let ready: Vec<Token> = self.events.iter().map(|ev| ev.token()).collect();
        for token in ready {
            match token {
                LISTENER => self.listener_ready = true,
                Token(i) => self.drive(counters, lim, i),
            }
        }
        Ok(())
    }

    /// Takes a new connection into a free place and registers it.
    fn start(
        &mut self,
        counters: &Counters,
        mut stream: MioStream,
        peer: SocketAddr,
        deadline: Instant,
    ) {
        let i = self.free.pop().unwrap_or(self.conns.len());
        if let Err(source) = self.poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            // Not a resource we may panic on: refuse this connection only.
            bump(&counters.closed);
            self.free.push(i);
            self.refuse(None, SessionError::HandshakeIo { peer, source });
            return;
        }
        let c = Pending {
            stream,
            peer,
            hs: None,
            session: None,
            hello: Some(FrameDecoder::new(Limits::handshake())),
            early: Vec::new(),
            out: Vec::new(),
            leftover: Vec::new(),
            deadline,
            phase: Phase::Running,
        };
        if i == self.conns.len() {
            self.conns.push(Some(c));
        } else {
            self.conns[i] = Some(c);
        }
        self.pending += 1;
        let pending = self.pending as u64;
        for s in &mut self.sessions {
            s.peak = s.peak.max(pending);
        }
        counters.peak_pending.fetch_max(pending, Ordering::Relaxed);
    }

    /// Moves a connection's handshake on after its socket became ready.
    fn drive(&mut self, counters: &Counters, lim: &Turn<'_>, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let fallback = (lim.server, lim.listener.max_channels);
        let outcome = drive_one(c, &mut self.scratch, &self.sessions, fallback);
        match outcome {
            Outcome::Wait => {}
            Outcome::Established => self.establish(counters, i),
            Outcome::Refused(e) => {
                let counter = match &e {
                    SessionError::TooManyChannels { .. } => &counters.refused_too_many_channels,
                    SessionError::Handshake { .. } => &counters.refused_handshake,
                    _ => &counters.closed,
                };
                bump(counter);
                self.close(i, Some(e));
            }
        }
    }

    /// Hands a handshaken connection to its slot in its session.
    fn establish(&mut self, counters: &Counters, i: usize) {
        let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.free.push(i);
        self.pending -= 1;
        let _ = self.poll.registry().deregister(&mut c.stream);
        let Some(negotiated) = c.hs.as_ref().and_then(|hs| hs.negotiated().copied()) else {
            bump(&counters.refused_handshake);
            self.refuse(
                c.session,
                SessionError::Handshake {
                    channel: None,
                    peer: c.peer,
                    peer_message: None,
                    source: HandshakeError::ProtocolError("handshake done without an agreement"),
                },
            );
            return;
        };
        let Some(entry) = self.entry_mut(negotiated.session) else {
            // Its call returned while the handshake finished.
            bump(&counters.abandoned);
            return;
        };
        let max = entry.max_channels;
        if negotiated.channel_count > max {
            bump(&counters.refused_too_many_channels);
            entry.refuse(SessionError::TooManyChannels {
                peer: c.peer,
                count: negotiated.channel_count,
                max,
            });
            return;
        }
        let stream = std::net::TcpStream::from(OwnedFd::from(c.stream));
        if let Err(source) = stream.set_nonblocking(false) {
            bump(&counters.closed);
            entry.refuse(SessionError::HandshakeIo {
                peer: c.peer,
                source,
            });
            return;
        }
        let est = Established {
            stream,
            negotiated,
            leftover: c.leftover,
        };
        match place(&mut entry.slots, &mut entry.count, est, c.peer) {
            Ok(()) => bump(&counters.established),
            Err(e) => {
                bump(&counters.refused_channel);
                entry.refuse(e);
            }
        }
    }

    /// Closes a pending connection, recording why.
    fn close(&mut self, i: usize, why: Option<SessionError>) {
        let mut session = None;
        if let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.free.push(i);
            self.pending -= 1;
            session = c.session;
        }
        if let Some(e) = why {
            self.refuse(session, e);
        }
    }

    /// Keeps a refusal with the session the connection named, or, when it named none
    /// being accepted, with every session being accepted.
    fn refuse(&mut self, session: Option<SessionId>, e: SessionError) {
        if let Some(entry) = session.and_then(|id| self.entry_mut(id)) {
            entry.refuse(e);
            return;
        }
        let Some((last, rest)) = self.sessions.split_last_mut() else {
            return;
        };
        for s in rest {
            s.refuse(copy_refusal(&e));
        }
        last.refuse(e);
    }
}

/// A copy of a refusal for another session's list (an `io::Error` keeps its kind and
/// message only).
fn copy_refusal(e: &SessionError) -> SessionError {
    let io = |s: &io::Error| io::Error::new(s.kind(), s.to_string());
    match e {
        SessionError::Handshake {
            channel,
            peer,
            peer_message,
            source,
        } => SessionError::Handshake {
            channel: *channel,
            peer: *peer,
            peer_message: peer_message.clone(),
            source: *source,
        },
        SessionError::HandshakeIo { peer, source } => SessionError::HandshakeIo {
            peer: *peer,
            source: io(source),
        },
        SessionError::BadChannel {
            channel,
            count,
            peer,
            why,
        } => SessionError::BadChannel {
            channel: *channel,
            count: *count,
            peer: *peer,
            why,
        },
        SessionError::TooManyChannels { peer, count, max } => SessionError::TooManyChannels {
            peer: *peer,
            count: *count,
            max: *max,
        },
        other => SessionError::Io {
            op: "handshake",
            source: io::Error::other(other.to_string()),
        },
    }
}

/// Writes pending output, reads and feeds the handshake until the socket would block
/// or the handshake ends. `fallback` answers a first frame that names no session being
/// accepted.
fn drive_one(
    c: &mut Pending,
    scratch: &mut [u8],
    sessions: &[Entry],
    fallback: (&ServerConfig, u16),
) -> Outcome {
    let peer = c.peer;
    let io_err = |source| SessionError::HandshakeIo { peer, source };
    loop {
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => return Outcome::Refused(io_err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return match std::mem::replace(&mut c.phase, Phase::Running) {
                        // The peer went away before reading the REJECT: report why we
                        // refused it, not the write error.
                        Phase::Failing(why) => Outcome::Refused(why),
                        _ => Outcome::Refused(io_err(e)),
                    };
                }
            }
        }
        match std::mem::replace(&mut c.phase, Phase::Running) {
            Phase::Running => {}
            Phase::Done => return Outcome::Established,
            Phase::Failing(why) => return Outcome::Refused(why),
        }
        let n = match c.stream.read(scratch) {
            Ok(0) => return Outcome::Refused(io_err(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Outcome::Refused(io_err(e)),
        };
        let early;
        let input: &[u8] = if c.hs.is_none() {
            c.early.extend_from_slice(&scratch[..n]);
            let first = match first_frame(c, &scratch[..n]) {
                First::Incomplete => continue,
                First::Hello { session, count } => Some((session, count)),
                First::Other => None,
            };
            let known = first.and_then(|(session, _)| {
                sessions.iter().find(|s| s.server.session == Some(session))
            });
            let (server, max_channels) = known.map_or(fallback, |s| (&s.server, s.max_channels));
            c.session = known.and(first.map(|(session, _)| session));
            if let Some(count) = first.map(|(_, n)| n).filter(|&n| n > max_channels) {
                c.phase = Phase::Failing(reject_too_many(c, count, max_channels, server));
                continue;
            }
            match nonce().and_then(|n| {
                ServerHandshake::new(server.clone(), n).map_err(|source| SessionError::Handshake {
                    channel: None,
                    peer,
                    peer_message: None,
                    source,
                })
            }) {
                Ok(hs) => c.hs = Some(hs),
                Err(e) => return Outcome::Refused(e),
            }
            early = std::mem::take(&mut c.early);
            &early
        } else {
            &scratch[..n]
        };
        let Some(hs) = c.hs.as_mut() else {
            continue;
        };
        match hs.receive(input) {
            Ok(used) if hs.is_done() => {
                hs.take_output(&mut c.out);
                c.leftover = input[used..].to_vec();
                c.phase = Phase::Done;
            }
            Ok(_) => hs.take_output(&mut c.out),
            Err(source) => {
                // Tell the peer why (a REJECT is queued), then close.
                hs.take_output(&mut c.out);
                c.phase = Phase::Failing(SessionError::Handshake {
                    channel: None,
                    peer,
                    peer_message: hs.peer_message().map(str::to_owned),
                    source,
                });
            }
        }
    }
}

/// What the first frame of a connection is.
enum First {
    /// Not complete yet.
    Incomplete,
    /// A HELLO for `session` asking for `count` channels.
    Hello { session: SessionId, count: u16 },
    /// Another frame, or garbage: the handshake itself refuses it.
    Other,
}

/// Reads `input` with the first-frame decoder.
fn first_frame(c: &mut Pending, input: &[u8]) -> First {
    let Some(dec) = c.hello.as_mut() else {
        return First::Other;
    };
    let mut rest = input;
    let mut first = First::Incomplete;
    while !rest.is_empty() {
        match dec.decode(rest) {
            Ok((_, Some(Frame::Hello(h)))) => {
                first = First::Hello {
                    session: h.session,
                    count: h.channel_count,
                };
                break;
            }
            Ok((_, Some(_))) | Err(_) => {
                first = First::Other;
                break;
            }
            Ok((0, None)) => break,
            Ok((used, None)) => rest = &rest[used..],
        }
    }
    if !matches!(first, First::Incomplete) {
        c.hello = None;
    }
    first
}

/// Queues a REJECT (`BAD_CHANNEL`, naming the limit) for a HELLO that asks for more
/// than `max_channels` channels, before any handshake answers it; returns the refusal.
fn reject_too_many(
    c: &mut Pending,
    count: u16,
    max_channels: u16,
    server: &ServerConfig,
) -> SessionError {
    let caps = server.caps;
    let message =
        format!("{count} channels asked for; this destination accepts at most {max_channels}");
    let auth_methods: &[AuthMethod] = match server.auth {
        Authentication::None => &[],
        Authentication::PreSharedKey(_) => &[AuthMethod::HMAC_SHA256],
    };
    let checksums: &[ChecksumId] = if caps.checksum {
        &[ChecksumId::CRC32C]
    } else {
        &[]
    };
    let reject = Frame::Reject(Reject {
        reason: RejectReason::BAD_CHANNEL,
        version_min: caps.versions.0,
        version_max: caps.versions.1,
        page_size: caps.page_size,
        codecs: WireList::Slice(caps.codecs.as_slice()),
        checksums: WireList::Slice(checksums),
        auth: WireList::Slice(auth_methods),
        message: &message,
    });
    // A REJECT of this size always encodes; were it not to, the peer just sees a close.
    let _ = reject.encode(&mut c.out);
    SessionError::TooManyChannels {
        peer: c.peer,
        count,
        max: max_channels,
    }
}

/// An `accept` error that concerns only the connection being accepted (accept(2) says
/// to treat these like `EAGAIN` and go on).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        )
    )
}

/// An `accept` error that waiting will not cure: the socket itself is unusable.
fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Puts a handshaken channel into its slot, refusing duplicates and disagreeing counts.
fn place(
    slots: &mut Vec<Option<Established>>,
    count: &mut Option<u16>,
    est: Established,
    peer: SocketAddr,
) -> Result<(), SessionError> {
    let n = est.negotiated;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::connect;
    use crate::session::connect_channel;
    use pagewire_protocol::SessionKey;
    use pagewire_protocol::{Authentication, Capabilities, HandshakeError, SessionId};
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
