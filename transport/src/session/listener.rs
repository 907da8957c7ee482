//! The destination's side: accepting the channels of a session.
//!
//! Before its handshake completes a connection is anyone on the network, so everything
//! it can hold is bounded. [`Listener::accept_session`] runs every pending handshake on
//! the calling thread, multiplexed with `mio` over non-blocking sockets; no thread is
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
    AuthMethod, Authentication, Capabilities, ChecksumId, Frame, FrameDecoder, HandshakeError,
    Limits, Reject, RejectReason, ServerConfig, ServerHandshake, WireList,
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
}

impl Default for ListenerConfig {
    /// 64 pending handshakes, 64 channels, a backlog of 1024, 50 ms back-off.
    fn default() -> Self {
        Self {
            max_pending: 64,
            max_channels: 64,
            backlog: 1024,
            accept_backoff: Duration::from_millis(50),
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
    /// The last [`MAX_REFUSALS_KEPT`] connections refused meanwhile, with the reason
    /// (all of them are counted in `stats`).
    pub refused: Vec<SessionError>,
    /// What happened to the connections seen during this call.
    pub stats: ListenerStats,
}

/// Accepts the channels of sessions, one session after another, on one socket.
#[derive(Debug)]
pub struct Listener {
    socket: MioListener,
    /// Held for the whole of an [`accept_session`](Self::accept_session) call: one
    /// call at a time.
    poll: Mutex<Poll>,
    counters: Counters,
}

impl Listener {
    /// Listens on `addr` with the socket settings of `cfg` and its
    /// [`ListenerConfig::backlog`].
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
            poll: Mutex::new(poll),
            counters: Counters::default(),
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

    /// Accepts connections until every channel of session `cfg.session` has completed
    /// its handshake, or `timeout` passes. Connections of other sessions, garbage,
    /// failed authentication, too many channels and handshakes that miss their
    /// deadline are refused, counted in [`Accepted::stats`] and [`Self::stats`], and the
    /// last few listed in [`Accepted::refused`]. Handshakes still in progress when the
    /// call returns are closed. Calls are served one at a time; the listener can be
    /// called again after any outcome.
    ///
    /// # Errors
    /// [`SessionError::Incomplete`] when the channels do not all arrive in time;
    /// [`SessionError::Config`] or [`SessionError::Handshake`] for an invalid `cfg`;
    /// [`SessionError::Random`] when no nonce can be drawn; [`SessionError::Io`] when
    /// epoll fails or `accept` fails for a reason other than a lack of resources.
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
        let mut poll = self.poll.lock().unwrap_or_else(PoisonError::into_inner);
        let before = self.counters.snapshot();
        let mut run = Run {
            cfg,
            server,
            counters: &self.counters,
            conns: Vec::new(),
            free: Vec::new(),
            pending: 0,
            peak: 0,
            slots: Vec::new(),
            count: None,
            refused: VecDeque::new(),
            scratch: vec![0u8; HANDSHAKE_MAX_FRAME as usize],
        };
        let result = run.serve(&self.socket, &mut poll, Instant::now() + timeout, timeout);
        run.abandon_all(poll.registry());
        let stats = self.counters.snapshot().since(&before, run.peak);
        let refused = run.refused.into();
        result.map(|channels| Accepted {
            channels,
            refused,
            stats,
        })
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
    hs: ServerHandshake,
    /// Reads the first frame alongside the handshake, to refuse a HELLO that asks for
    /// too many channels before the handshake answers it; `None` once it was seen.
    hello: Option<FrameDecoder>,
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

/// The state of one [`Listener::accept_session`] call.
struct Run<'a> {
    cfg: &'a SessionConfig,
    server: ServerConfig,
    counters: &'a Counters,
    conns: Vec<Option<Pending>>,
    free: Vec<usize>,
    pending: usize,
    peak: u64,
    slots: Vec<Option<Established>>,
    count: Option<u16>,
    refused: VecDeque<SessionError>,
    scratch: Vec<u8>,
}

impl Run<'_> {
    fn serve(
        &mut self,
        socket: &MioListener,
        poll: &mut Poll,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<Established>, SessionError> {
        let limits = self.cfg.listener;
        let mut events = Events::with_capacity(256);
        // Connections may have queued while no call was running: try at once.
        let mut listener_ready = true;
        let mut retry_at: Option<Instant> = None;
        let mut at_cap = false;
        loop {
            if self.count.is_some() && self.slots.iter().all(Option::is_some) {
                return Ok(std::mem::take(&mut self.slots)
                    .into_iter()
                    .flatten()
                    .collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SessionError::Incomplete {
                    have: self.slots.iter().flatten().count(),
                    need: self.count.map_or(0, usize::from),
                    timeout,
                });
            }
            if listener_ready && retry_at.is_none_or(|t| now >= t) {
                retry_at = None;
                loop {
                    if self.pending >= limits.max_pending {
                        if !at_cap {
                            at_cap = true;
                            bump(&self.counters.cap_reached);
                        }
                        break;
                    }
                    match socket.accept() {
                        Ok((stream, peer)) => {
                            at_cap = false;
                            bump(&self.counters.accepted);
                            self.start(poll, stream, peer, now)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            listener_ready = false;
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
                            // Out of descriptors, memory or buffers: the connection
                            // stays in the backlog; try again after a pause.
                            bump(&self.counters.accept_errors);
                            retry_at = Some(now + limits.accept_backoff);
                            break;
                        }
                    }
                }
            }
            let mut wake = deadline;
            for i in 0..self.conns.len() {
                let Some(c) = &self.conns[i] else { continue };
                if c.deadline <= now {
                    let peer = c.peer;
                    bump(&self.counters.timed_out);
                    self.close(
                        poll,
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
            if listener_ready && self.pending < limits.max_pending {
                wake = wake.min(retry_at.unwrap_or(now));
            }
            match poll.poll(&mut events, Some(wake.saturating_duration_since(now))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(SessionError::Io {
                        op: "epoll_wait",
                        source,
                    });
                }
            }
            for ev in &events {
                match ev.token() {
                    LISTENER => listener_ready = true,
                    Token(i) => self.drive(poll, i),
                }
            }
        }
    }

    /// Takes a new connection into a free place and registers it.
    fn start(
        &mut self,
        poll: &Poll,
        mut stream: MioStream,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<(), SessionError> {
        let hs = match ServerHandshake::new(self.server.clone(), nonce()?) {
            Ok(hs) => hs,
            Err(source) => {
                // Checked when the call began; counted all the same should it happen.
                bump(&self.counters.refused_handshake);
                self.refuse(SessionError::Handshake {
                    channel: None,
                    peer,
                    peer_message: None,
                    source,
                });
                return Ok(());
            }
        };
        let i = self.free.pop().unwrap_or(self.conns.len());
        if let Err(source) = poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            // Not a resource we may panic on: refuse this connection only.
            bump(&self.counters.closed);
            self.free.push(i);
            self.refuse(SessionError::HandshakeIo { peer, source });
            return Ok(());
        }
        let c = Pending {
            stream,
            peer,
            hs,
            hello: Some(FrameDecoder::new(Limits::handshake())),
            out: Vec::new(),
            leftover: Vec::new(),
            deadline: now + self.cfg.handshake_timeout,
            phase: Phase::Running,
        };
        if i == self.conns.len() {
            self.conns.push(Some(c));
        } else {
            self.conns[i] = Some(c);
        }
        self.pending += 1;
        self.peak = self.peak.max(self.pending as u64);
        self.counters
            .peak_pending
            .fetch_max(self.pending as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Moves a connection's handshake on after its socket became ready.
    fn drive(&mut self, poll: &Poll, i: usize) {
        let max_channels = self.cfg.listener.max_channels;
        let caps = self.cfg.caps;
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let outcome = drive_one(c, &mut self.scratch, max_channels, &self.server.auth, caps);
        match outcome {
            Outcome::Wait => {}
            Outcome::Established => self.establish(poll, i),
            Outcome::Refused(e) => {
                let counter = match &e {
                    SessionError::TooManyChannels { .. } => {
                        &self.counters.refused_too_many_channels
                    }
                    SessionError::Handshake { .. } => &self.counters.refused_handshake,
                    _ => &self.counters.closed,
                };
                bump(counter);
                self.close(poll, i, Some(e));
            }
        }
    }

    /// Hands a handshaken connection to its slot in the session.
    fn establish(&mut self, poll: &Poll, i: usize) {
        let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.free.push(i);
        self.pending -= 1;
        let _ = poll.registry().deregister(&mut c.stream);
        let Some(negotiated) = c.hs.negotiated().copied() else {
            bump(&self.counters.refused_handshake);
            self.refuse(SessionError::Handshake {
                channel: None,
                peer: c.peer,
                peer_message: None,
                source: HandshakeError::ProtocolError("handshake done without an agreement"),
            });
            return;
        };
        let max = self.cfg.listener.max_channels;
        if negotiated.channel_count > max {
            bump(&self.counters.refused_too_many_channels);
            self.refuse(SessionError::TooManyChannels {
                peer: c.peer,
                count: negotiated.channel_count,
                max,
            });
            return;
        }
        let stream = std::net::TcpStream::from(OwnedFd::from(c.stream));
        if let Err(source) = stream.set_nonblocking(false) {
            bump(&self.counters.closed);
            self.refuse(SessionError::HandshakeIo {
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
        match place(&mut self.slots, &mut self.count, est, c.peer) {
            Ok(()) => bump(&self.counters.established),
            Err(e) => {
                bump(&self.counters.refused_channel);
                self.refuse(e);
            }
        }
    }

    /// Closes a pending connection, recording why.
    fn close(&mut self, poll: &Poll, i: usize, why: Option<SessionError>) {
        if let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) {
            let _ = poll.registry().deregister(&mut c.stream);
            self.free.push(i);
            self.pending -= 1;
        }
        if let Some(e) = why {
            self.refuse(e);
        }
    }

    /// Closes every handshake still in progress.
    fn abandon_all(&mut self, registry: &mio::Registry) {
        for c in self.conns.iter_mut().filter_map(Option::take) {
            let mut stream = c.stream;
            let _ = registry.deregister(&mut stream);
            bump(&self.counters.abandoned);
        }
        self.pending = 0;
    }

    /// Keeps the reason, dropping the oldest beyond [`MAX_REFUSALS_KEPT`].
    fn refuse(&mut self, e: SessionError) {
        if self.refused.len() == MAX_REFUSALS_KEPT {
            self.refused.pop_front();
        }
        self.refused.push_back(e);
    }
}

/// Writes pending output, reads and feeds the handshake until the socket would block
/// or the handshake ends.
fn drive_one(
    c: &mut Pending,
    scratch: &mut [u8],
    max_channels: u16,
    auth: &Authentication,
    caps: Capabilities,
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
        let input = &scratch[..n];
        if let Some(why) = check_hello(c, input, max_channels, auth, caps) {
            c.phase = Phase::Failing(why);
            continue;
        }
        match c.hs.receive(input) {
            Ok(used) if c.hs.is_done() => {
                c.hs.take_output(&mut c.out);
                c.leftover = input[used..].to_vec();
                c.phase = Phase::Done;
            }
            Ok(_) => c.hs.take_output(&mut c.out),
            Err(source) => {
                // Tell the peer why (a REJECT is queued), then close.
                c.hs.take_output(&mut c.out);
                c.phase = Phase::Failing(SessionError::Handshake {
                    channel: None,
                    peer,
                    peer_message: c.hs.peer_message().map(str::to_owned),
                    source,
                });
            }
        }
    }
}

/// Reads `input` with the first-frame decoder; when it completes a HELLO that asks for
/// more than `max_channels` channels, queues a REJECT (`BAD_CHANNEL`, naming the limit)
/// and returns the refusal, before the handshake answers the HELLO.
fn check_hello(
    c: &mut Pending,
    input: &[u8],
    max_channels: u16,
    auth: &Authentication,
    caps: Capabilities,
) -> Option<SessionError> {
    let dec = c.hello.as_mut()?;
    let mut rest = input;
    let mut asked = None;
    let mut seen = false;
    while !rest.is_empty() {
        match dec.decode(rest) {
            Ok((_, Some(Frame::Hello(h)))) => {
                asked = Some(h.channel_count);
                seen = true;
                break;
            }
            // Another frame first, or garbage: the handshake itself refuses it.
            Ok((_, Some(_))) | Err(_) => {
                seen = true;
                break;
            }
            Ok((0, None)) => break,
            Ok((used, None)) => rest = &rest[used..],
        }
    }
    if seen {
        c.hello = None;
    }
    let count = asked.filter(|&n| n > max_channels)?;
    let message =
        format!("{count} channels asked for; this destination accepts at most {max_channels}");
    let auth_methods: &[AuthMethod] = match auth {
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
    Some(SessionError::TooManyChannels {
        peer: c.peer,
        count,
        max: max_channels,
    })
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
