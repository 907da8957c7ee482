//! What the calls of one listener share: the poll, the pending connections and the
//! sessions being accepted.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::{Events, Interest, Poll, Token};
use pagewire_protocol::handshake::HELLO_TAG_RANDOM;
use pagewire_protocol::{
    Authentication, FrameDecoder, HandshakeError, Limits, ServerConfig, SessionId,
};

use super::pending::{Outcome, Pending, Phase, Tag, admit, drive_one};
use super::socket::{Conn, Socket};
use super::stats::{Counters, bump};
use super::{LISTENER, ListenerConfig, MAX_REFUSALS_KEPT, Turn};
use crate::endpoint::Endpoint;
use crate::session::{Established, SessionError};

/// A session being accepted by one call.
#[derive(Debug)]
pub(super) struct Entry {
    /// Its handshake settings (`session` is always `Some`).
    pub(super) server: ServerConfig,
    pub(super) max_channels: u16,
    pub(super) slots: Vec<Option<Established>>,
    /// Indices admitted (READY queued) whose channel is not in `slots` yet.
    pub(super) claimed: Vec<bool>,
    pub(super) count: Option<u16>,
    pub(super) refused: VecDeque<SessionError>,
    pub(super) peak: u64,
}

impl Entry {
    pub(super) fn is_complete(&self) -> bool {
        self.count.is_some() && self.slots.iter().all(Option::is_some)
    }

    /// Reserves index `channel` of `count` for a channel about to be answered READY;
    /// `Err` says why the session refuses it (the first channel admitted sets the
    /// count).
    pub(super) fn claim(&mut self, channel: u16, count: u16) -> Result<(), &'static str> {
        match self.count {
            None => {
                self.count = Some(count);
                self.slots.resize_with(usize::from(count), || None);
                self.claimed = vec![false; usize::from(count)];
            }
            Some(c) if c != count => return Err("its channel count differs from the session's"),
            Some(_) => {}
        }
        let i = usize::from(channel);
        match (self.claimed.get(i), self.slots.get(i)) {
            (Some(false), Some(None)) => {
                self.claimed[i] = true;
                Ok(())
            }
            (Some(_), Some(_)) => Err("another channel of the session holds that index"),
            _ => Err("index out of range"),
        }
    }

    /// Puts an admitted channel into the slot it claimed; false (and the channel is
    /// dropped) when it holds no claim.
    fn fill(&mut self, est: Established) -> bool {
        let i = usize::from(est.negotiated.channel.0);
        match (self.claimed.get_mut(i), self.slots.get_mut(i)) {
            (Some(claim @ true), Some(slot @ None)) => {
                *claim = false;
                *slot = Some(est);
                true
            }
            _ => false,
        }
    }

    /// Frees index `channel` of a channel admitted that never joined; the count is
    /// forgotten when no channel holds or claims an index.
    pub(super) fn release(&mut self, channel: u16) {
        if let Some(c) = self.claimed.get_mut(usize::from(channel)) {
            *c = false;
        }
        if !self.claimed.contains(&true) && self.slots.iter().all(Option::is_none) {
            self.count = None;
            self.slots.clear();
            self.claimed.clear();
        }
    }

    /// Keeps the reason, dropping the oldest beyond [`MAX_REFUSALS_KEPT`].
    pub(super) fn refuse(&mut self, e: SessionError) {
        if self.refused.len() == MAX_REFUSALS_KEPT {
            self.refused.pop_front();
        }
        self.refused.push_back(e);
    }
}

/// The state the calls of one [`Listener`] share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) poll: Poll,
    pub(super) events: Events,
    pub(super) conns: Vec<Option<Pending>>,
    pub(super) free: Vec<usize>,
    pub(super) pending: usize,
    pub(super) listener_ready: bool,
    pub(super) retry_at: Option<Instant>,
    pub(super) at_cap: bool,
    pub(super) sessions: Vec<Entry>,
    pub(super) scratch: Vec<u8>,
    /// TLS settings of a TLS listener (taken from the configuration it was bound
    /// with); `None` for a plaintext listener.
    pub(super) tls: Option<crate::tls::TlsConfig>,
    /// A descriptor kept open to be closed when `accept` runs out of them, so that the
    /// connection waiting can be accepted and weighed against the pending ones
    /// ([`reserve_descriptor`]).
    pub(super) reserve: Option<std::fs::File>,
    /// The HELLO key tags seen ([`Tag`]), by the random half of their nonce.
    pub(super) seen_tags: SeenTags,
}

/// The most HELLO key tags a listener remembers: the oldest is forgotten beyond.
const SEEN_TAGS: usize = 4096;

/// HELLO key tags seen, the last [`SEEN_TAGS`] of them (a source sends a fresh one on
/// every connection; a second of the same is a replay).
#[derive(Debug, Default)]
pub(super) struct SeenTags {
    set: std::collections::HashSet<[u8; HELLO_TAG_RANDOM]>,
    order: VecDeque<[u8; HELLO_TAG_RANDOM]>,
}

impl SeenTags {
    /// Records `random`; `false` when it was seen before.
    fn insert(&mut self, random: [u8; HELLO_TAG_RANDOM]) -> bool {
        if !self.set.insert(random) {
            return false;
        }
        if self.order.len() == SEEN_TAGS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(random);
        true
    }
}

impl Shared {
    pub(super) fn entry(&self, id: SessionId) -> Option<&Entry> {
        self.sessions.iter().find(|s| s.server.session == Some(id))
    }

    fn entry_mut(&mut self, id: SessionId) -> Option<&mut Entry> {
        self.sessions
            .iter_mut()
            .find(|s| s.server.session == Some(id))
    }

    /// Removes session `id`, closing the handshakes in progress for it (all of them
    /// when no other session is being accepted).
    pub(super) fn unregister(&mut self, id: SessionId, counters: &Counters) -> Option<Entry> {
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
    pub(super) fn step(
        &mut self,
        socket: &Socket,
        counters: &Counters,
        lim: &Turn<'_>,
        until: Instant,
    ) -> Result<(), SessionError> {
        let limits = lim.listener;
        let now = Instant::now();
        if self.listener_ready && self.retry_at.is_none_or(|t| now >= t) {
            self.retry_at = None;
            // Bounded, so that a flood of connections cannot keep the deadlines and
            // the other connections waiting: the rest is accepted on the next turn,
            // after a poll. At most `max_pending` between polls, so that a connection
            // whose first bytes were not there yet at its accept is read before as
            // many newcomers as there are places could have replaced it.
            for _ in 0..limits.max_pending {
                let full = self.pending >= limits.max_pending;
                if full {
                    if !self.at_cap {
                        self.at_cap = true;
                        bump(&counters.cap_reached);
                    }
                    if !self.may_replace(now, &limits) {
                        // Every place is held by a connection a new one may not
                        // replace yet: new connections wait in the backlog.
                        break;
                    }
                }
                match socket.accept() {
                    Ok((stream, peer)) => {
                        if !full {
                            self.at_cap = false;
                        }
                        if let Some(i) = self.take_new(counters, lim, stream, peer, now)
                            && self.pending > limits.max_pending
                        {
                            self.make_room(counters, now, &limits, i);
                        }
                        self.note_peak(counters);
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
                    Err(e) if is_out_of_descriptors(&e) => {
                        bump(&counters.accept_errors);
                        // The pending connections may be what holds the descriptors (a
                        // flood of silent connections under a low limit). A descriptor
                        // kept in reserve for this is freed to accept the connection
                        // waiting, if one is (`accept` fails so even with none waiting);
                        // then the pending connection it replaces, as when every place
                        // is taken, or else itself, is closed, and the reserve taken
                        // again. Without the reserve (its descriptor went elsewhere),
                        // or with nothing waiting, try again after a pause.
                        if !self.accept_in_reserve(socket, counters, lim, now) {
                            if self.listener_ready {
                                self.retry_at =
                                    Some(crate::deadline::after(now, limits.accept_backoff));
                            }
                            break;
                        }
                    }
                    Err(_) => {
                        // Out of memory or buffers: the connection stays in the
                        // backlog; try again after a pause.
                        bump(&counters.accept_errors);
                        self.retry_at = Some(crate::deadline::after(now, limits.accept_backoff));
                        break;
                    }
                }
            }
        }
        let mut wake = until;
        for i in 0..self.conns.len() {
            let Some(c) = &self.conns[i] else { continue };
            if c.deadline <= now {
                let peer = c.peer.clone();
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
        if self.listener_ready {
            // A connection waits: accept it now if a place is free, else when the first
            // place opens to it; after the back-off of a failed accept in any case.
            let open = if self.pending < limits.max_pending || self.may_replace(now, &limits) {
                Some(now)
            } else {
                self.next_open(&limits)
            };
            if let Some(t) = open {
                wake = wake.min(self.retry_at.map_or(t, |r| r.max(t)));
            }
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

    /// Whether a new connection may take a place while every place is taken: some
    /// place is open by `now` ([`open_at`]), or held by a connection that has not named
    /// a session being accepted (a newcomer that did, or that sent more, replaces it).
    fn may_replace(&self, now: Instant, limits: &ListenerConfig) -> bool {
        // An untagged HELLO of a session with a key may be replaced by a newcomer whose
        // HELLO carries the tag. Not on a TLS listener: there a newcomer's HELLO comes
        // only after its TLS handshake, so at its accept it ranks below any HELLO and
        // would be closed at once, where in the backlog it waits.
        let replaceable_hello = |c: &Pending| {
            self.tls.is_none()
                && c.session
                    .and_then(|id| self.entry(id))
                    .is_some_and(|e| matches!(e.server.auth, Authentication::PreSharedKey(_)))
        };
        self.conns.iter().flatten().any(|c| {
            let r = rank(c);
            r < Rank::Named
                || (r == Rank::Named && replaceable_hello(c))
                || open_at(c, limits).is_some_and(|t| t <= now)
        })
    }

    /// Brings the pending connections back to `max_pending` after the newcomer at
    /// place `new` took one too many (see the module's documentation): closes the
    /// place open by `now` ([`open_at`]) of the lowest rank accepted first, else the
    /// one of the lowest rank below the newcomer's accepted first, or, when the
    /// newcomer has not got past the first bytes of a TLS handshake (`Silent` or
    /// `Spoke`), the one of the lowest rank accepted first among those that have not
    /// either; else the newcomer itself. Each counts as evicted.
    fn make_room(
        &mut self,
        counters: &Counters,
        now: Instant,
        limits: &ListenerConfig,
        new: usize,
    ) {
        let Some(Some(newcomer)) = self.conns.get(new) else {
            return;
        };
        let victim = self
            .victim(now, limits, rank(newcomer), Some(new), false)
            .unwrap_or(new);
        bump(&counters.evicted);
        self.close(victim, None);
    }

    /// Counts a connection just accepted at `now`, takes it into a free place and reads
    /// what came with it (an honest source's HELLO), before its place is weighed;
    /// returns its place (`None`: refused).
    fn take_new(
        &mut self,
        counters: &Counters,
        lim: &Turn<'_>,
        stream: Conn,
        peer: Endpoint,
        now: Instant,
    ) -> Option<usize> {
        bump(&counters.accepted);
        let i = self.start(
            counters,
            stream,
            peer,
            now,
            crate::deadline::after(now, lim.handshake_timeout),
        )?;
        self.drive(counters, lim, i);
        Some(i)
    }

    /// Accepts one connection with the descriptor held in reserve ([`Shared::reserve`]),
    /// then closes the pending connection it replaces, as when every place is taken,
    /// and takes the reserve again with the descriptor that frees. Only connections
    /// accepted before `now` are closed, so that none of this turn is closed before its
    /// first bytes were read: with none to close, the newcomer keeps the reserve's
    /// descriptor, and the next call first takes it back from the connection a new
    /// silent one would replace (by then of an earlier turn). `false` when no
    /// connection waited, or no reserve could be had: the caller pauses.
    fn accept_in_reserve(
        &mut self,
        socket: &Socket,
        counters: &Counters,
        lim: &Turn<'_>,
        now: Instant,
    ) -> bool {
        if self.reserve.is_none() {
            if let Some(v) = self.victim(now, &lim.listener, Rank::Silent, None, true) {
                bump(&counters.evicted);
                self.close(v, None);
            }
            self.reserve = reserve_descriptor();
        }
        let Some(reserve) = self.reserve.take() else {
            return false;
        };
        drop(reserve);
        match socket.accept() {
            Ok((stream, peer)) => {
                if let Some(i) = self.take_new(counters, lim, stream, peer, now) {
                    let r = self.conns.get(i).and_then(Option::as_ref).map(rank);
                    if let Some(v) =
                        r.and_then(|r| self.victim(now, &lim.listener, r, Some(i), true))
                    {
                        bump(&counters.evicted);
                        self.close(v, None);
                        self.reserve = reserve_descriptor();
                    }
                } else {
                    self.reserve = reserve_descriptor();
                }
                self.note_peak(counters);
                // Without the reserve, wait for the next turn to take it back.
                self.reserve.is_some()
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.listener_ready = false;
                }
                self.reserve = reserve_descriptor();
                false
            }
        }
    }

    /// The pending connection a newcomer of rank `r` replaces (see
    /// `make_room`), other than place `except` and, with `older`, than those accepted
    /// at `now`; `None` when there is none.
    fn victim(
        &self,
        now: Instant,
        limits: &ListenerConfig,
        r: Rank,
        except: Option<usize>,
        older: bool,
    ) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != except)
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| !older || c.since < now)
            .filter(|(_, c)| {
                let k = rank(c);
                open_at(c, limits).is_some_and(|t| t <= now)
                    || (k != Rank::Admitted && (k < r || (k <= Rank::Spoke && r <= Rank::Spoke)))
            })
            .min_by_key(|(_, c)| (open_at(c, limits).is_none_or(|t| t > now), rank(c), c.since))
            .map(|(i, _)| i)
    }

    /// Records the number of pending connections in the peaks.
    fn note_peak(&mut self, counters: &Counters) {
        let pending = self.pending as u64;
        for s in &mut self.sessions {
            s.peak = s.peak.max(pending);
        }
        counters.peak_pending.fetch_max(pending, Ordering::Relaxed);
    }

    /// When the first place held by a pending connection opens to a new one.
    fn next_open(&self, limits: &ListenerConfig) -> Option<Instant> {
        self.conns
            .iter()
            .flatten()
            .filter_map(|c| open_at(c, limits))
            .min()
    }

    /// Takes a new connection, accepted at `since`, into a free place and registers
    /// it; returns its place (`None`: refused).
    fn start(
        &mut self,
        counters: &Counters,
        mut stream: Conn,
        peer: Endpoint,
        since: Instant,
        deadline: Instant,
    ) -> Option<usize> {
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
            return None;
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
            since,
            deadline,
            phase: Phase::Running,
            mode_checked: false,
            tls: None,
            binding: None,
            claim: None,
            received: 0,
            tag: Tag::None,
        };
        if i == self.conns.len() {
            self.conns.push(Some(c));
        } else {
            self.conns[i] = Some(c);
        }
        self.pending += 1;
        Some(i)
    }

    /// Moves a connection's handshake on after its socket became ready.
    fn drive(&mut self, counters: &Counters, lim: &Turn<'_>, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let fallback = (lim.server, lim.listener.max_channels);
        let mut outcome = drive_one(
            c,
            &mut self.scratch,
            &self.sessions,
            fallback,
            self.tls.as_ref(),
        );
        if let Tag::Unchecked(random) = c.tag {
            // A tag seen before is a replay (of a HELLO seen on the wire): it ranks as
            // an untagged HELLO.
            c.tag = match self.seen_tags.insert(random) {
                true => {
                    bump(&counters.tagged);
                    Tag::Keyed
                }
                false => Tag::None,
            };
        }
        if let Outcome::Confirmed = outcome {
            // READY (or a REJECT) is queued now: send it.
            admit(c, &mut self.sessions);
            outcome = drive_one(
                c,
                &mut self.scratch,
                &self.sessions,
                fallback,
                self.tls.as_ref(),
            );
        }
        match outcome {
            Outcome::Wait | Outcome::Confirmed => {}
            Outcome::Established => self.establish(counters, i),
            Outcome::Refused(e) => {
                let counter = match &e {
                    SessionError::TooManyChannels { .. } => &counters.refused_too_many_channels,
                    SessionError::BadChannel { .. } => &counters.refused_channel,
                    SessionError::Handshake { .. }
                    | SessionError::Encryption { .. }
                    | SessionError::Tls { .. } => &counters.refused_handshake,
                    _ => &counters.closed,
                };
                bump(counter);
                self.close(i, Some(e));
            }
        }
    }

    /// Hands a handshaken connection to the slot it was admitted to.
    fn establish(&mut self, counters: &Counters, i: usize) {
        let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.free.push(i);
        self.pending -= 1;
        let _ = self.poll.registry().deregister(&mut c.stream);
        let claim = c.claim.take();
        let negotiated = c.hs.as_ref().and_then(|hs| hs.negotiated().copied());
        let Some(negotiated) = negotiated.filter(|n| claim == Some((n.session, n.channel.0)))
        else {
            self.release(claim);
            bump(&counters.refused_handshake);
            self.refuse(
                c.session,
                SessionError::Handshake {
                    channel: None,
                    peer: c.peer,
                    peer_message: None,
                    source: HandshakeError::ProtocolError("handshake done without admission"),
                },
            );
            return;
        };
        let Some(entry) = self.entry_mut(negotiated.session) else {
            // Its call returned while the handshake finished.
            bump(&counters.abandoned);
            return;
        };
        let stream = match c.stream.into_stream() {
            Ok(s) => s,
            Err(source) => {
                entry.release(negotiated.channel.0);
                bump(&counters.closed);
                entry.refuse(SessionError::HandshakeIo {
                    peer: c.peer,
                    source,
                });
                return;
            }
        };
        let est = Established {
            stream,
            negotiated,
            leftover: c.leftover,
            tls: c.tls,
        };
        if entry.fill(est) {
            bump(&counters.established);
        } else {
            bump(&counters.refused_channel);
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
            self.release(c.claim);
        }
        if let Some(e) = why {
            self.refuse(session, e);
        }
    }

    /// Frees the index a connection claimed, if any.
    fn release(&mut self, claim: Option<(SessionId, u16)>) {
        if let Some((id, channel)) = claim
            && let Some(entry) = self.entry_mut(id)
        {
            entry.release(channel);
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

/// How far a pending connection got, for choosing which one a newcomer replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// It has sent nothing.
    Silent,
    /// It has sent bytes but named no session being accepted (a TLS handshake in
    /// progress, part of a HELLO, a HELLO of another session).
    Spoke,
    /// Its TLS handshake completed; its HELLO has not named a session being accepted
    /// yet.
    Secured,
    /// Its HELLO named a session being accepted.
    Named,
    /// Its HELLO named a session being accepted and carried that session's HELLO key
    /// tag, first seen on this connection.
    Keyed,
    /// It was admitted (READY queued): never replaced.
    Admitted,
}

fn rank(c: &Pending) -> Rank {
    match (c.claim, c.session, c.binding, c.mode_checked) {
        (Some(_), ..) => Rank::Admitted,
        (None, Some(_), ..) if c.tag == Tag::Keyed => Rank::Keyed,
        (None, Some(_), ..) => Rank::Named,
        (None, None, Some(_), _) => Rank::Secured,
        (None, None, None, true) => Rank::Spoke,
        (None, None, None, false) => Rank::Silent,
    }
}

/// When a pending connection's place opens to a new connection if every place is
/// taken: [`ListenerConfig::evict_after`] after its accept while it has named no
/// session being accepted, [`ListenerConfig::evict_named_after`] once it has and is
/// not admitted yet; never once admitted (its READY is on its way).
fn open_at(c: &Pending, limits: &ListenerConfig) -> Option<Instant> {
    match (c.claim, c.session) {
        (Some(_), _) => None,
        // Beyond what an `Instant` holds: never.
        (None, None) => c.since.checked_add(limits.evict_after),
        (None, Some(_)) => c.since.checked_add(limits.evict_named_after),
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
            peer: peer.clone(),
            peer_message: peer_message.clone(),
            source: *source,
        },
        SessionError::HandshakeIo { peer, source } => SessionError::HandshakeIo {
            peer: peer.clone(),
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
            peer: peer.clone(),
            why,
        },
        SessionError::TooManyChannels { peer, count, max } => SessionError::TooManyChannels {
            peer: peer.clone(),
            count: *count,
            max: *max,
        },
        other => SessionError::Io {
            op: "handshake",
            source: io::Error::other(other.to_string()),
        },
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

/// A descriptor held in reserve for when `accept` runs out of them (`/dev/null`, read
/// only); `None` when none can be opened.
pub(super) fn reserve_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// An `accept` error that says this process (`EMFILE`) or the system (`ENFILE`) has
/// no descriptor left for the connection.
fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// An `accept` error that waiting will not cure: the socket itself is unusable.
fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_counts_once_and_the_oldest_are_forgotten() {
        let mut seen = SeenTags::default();
        let tag = |n: usize| {
            let mut r = [0; HELLO_TAG_RANDOM];
            r[..8].copy_from_slice(&(n as u64).to_le_bytes());
            r
        };
        assert!(seen.insert(tag(0)));
        // A replay of a HELLO seen on the wire.
        assert!(!seen.insert(tag(0)));
        for n in 1..=SEEN_TAGS {
            assert!(seen.insert(tag(n)));
        }
        // Bounded: the first was forgotten, the others are still known.
        assert_eq!(seen.set.len(), SEEN_TAGS);
        assert!(!seen.insert(tag(SEEN_TAGS)));
        assert!(seen.insert(tag(0)));
    }
}
