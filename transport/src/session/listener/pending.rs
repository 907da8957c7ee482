//! One connection before its handshake completes: its first frame picks the session,
//! then the handshake runs over the non-blocking socket.

use std::io::{self, Read, Write};
use std::time::Instant;

use pagewire_protocol::handshake::HELLO_TAG_RANDOM;
use pagewire_protocol::{
    Authentication, ChannelBinding, Frame, FrameDecoder, HandshakeError, RejectReason,
    ServerConfig, ServerHandshake, SessionId, encode_reject,
};

use super::shared::Entry;
use super::socket::Conn;
use crate::endpoint::Endpoint;
use crate::session::{SessionError, nonce};
use crate::tls::{TlsConfig, TlsSession, looks_like_tls};

/// Where a pending handshake stands.
#[derive(Debug)]
pub(super) enum Phase {
    /// Exchanging frames.
    Running,
    /// Done: the last output (READY) is being sent.
    Done,
    /// Failed: the last output (a REJECT) is being sent, then the connection closes.
    Failing(SessionError),
}

/// A connection whose handshake is in progress.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) stream: Conn,
    pub(super) peer: Endpoint,
    /// Built once the first frame arrived, for the session it names.
    pub(super) hs: Option<ServerHandshake>,
    /// The session being accepted that the HELLO named, if any.
    pub(super) session: Option<SessionId>,
    /// Reads the first frame, to pick the session and refuse a HELLO that asks for too
    /// many channels before the handshake answers it; `None` once it was seen.
    pub(super) hello: Option<FrameDecoder>,
    /// The bytes received before the first frame was complete (at most one frame and
    /// one read), fed to the handshake once it is built.
    pub(super) early: Vec<u8>,
    /// Output not yet written.
    pub(super) out: Vec<u8>,
    /// Bytes received after the handshake's last frame.
    pub(super) leftover: Vec<u8>,
    /// When it was accepted.
    pub(super) since: Instant,
    pub(super) deadline: Instant,
    pub(super) phase: Phase,
    /// The first bytes were seen and matched the listener's encryption.
    pub(super) mode_checked: bool,
    /// The TLS session, on a TLS listener.
    pub(super) tls: Option<Box<TlsSession>>,
    /// The TLS exporter value, once the TLS handshake is done.
    pub(super) binding: Option<ChannelBinding>,
    /// The session and index reserved for it when it was admitted (READY queued).
    pub(super) claim: Option<(SessionId, u16)>,
    /// Bytes read from it so far (at most [`MAX_HANDSHAKE_INPUT`]).
    pub(super) received: usize,
    /// Whether its HELLO carried the HELLO key tag of the session it named.
    pub(super) tag: Tag,
}

/// How far a HELLO key tag's clock (its nonce's first 8 bytes) may be from this host's,
/// in seconds, for the tag to count.
pub(super) const HELLO_TAG_WINDOW_S: u64 = 120;

/// A pending connection's HELLO key tag (PROTOCOL.md, "HELLO key tag").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tag {
    /// None, or one seen before (a replay).
    None,
    /// A tag that verifies, with the random half of its nonce, not yet checked
    /// against those seen before.
    Unchecked([u8; HELLO_TAG_RANDOM]),
    /// A tag that verifies, first seen on this connection.
    Keyed,
}

/// Most bytes a connection may send before its handshake completes: an honest one
/// sends a few KiB (a TLS ClientHello and Finished, a HELLO and a CONFIRM of at most
/// the protocol's 4096-byte handshake frame limit each). More is refused, so that one
/// connection cannot keep the listener's thread reading.
pub(super) const MAX_HANDSHAKE_INPUT: usize = 64 << 10;

impl Pending {
    /// Queues handshake output: in clear, or sealed into TLS records.
    fn emit(&mut self, plain: &[u8]) {
        match self.tls.as_deref_mut() {
            None => self.out.extend_from_slice(plain),
            Some(tls) => {
                // Sealing into rustls' queue of a small frame cannot fail; were it to,
                // the peer sees a close.
                let _ = tls.seal_bytes(plain);
                tls.write_to_vec(&mut self.out);
            }
        }
    }

    /// Queues the handshake's output.
    fn emit_from(&mut self, hs_out: impl FnOnce(&mut Vec<u8>)) {
        let mut plain = Vec::new();
        hs_out(&mut plain);
        self.emit(&plain);
    }

    /// Checks the first bytes against the listener's encryption; on a TLS listener
    /// starts the TLS session. `Err` is the refusal (a plaintext REJECT is queued).
    fn check_mode(
        &mut self,
        first: &[u8],
        tls: Option<&TlsConfig>,
        server: &ServerConfig,
    ) -> Result<(), SessionError> {
        self.mode_checked = true;
        let (reason, message) = match (tls, looks_like_tls(first)) {
            (Some(cfg), true) => {
                let t = TlsSession::server(cfg).map_err(|source| SessionError::Tls {
                    peer: self.peer.clone(),
                    source,
                })?;
                self.tls = Some(Box::new(t));
                return Ok(());
            }
            (None, false) => return Ok(()),
            (Some(_), false) => (
                RejectReason::ENCRYPTION_REQUIRED,
                "this destination requires TLS 1.3; configure the source with TLS",
            ),
            (None, true) => (
                RejectReason::ENCRYPTION_UNSUPPORTED,
                "this destination is configured for plaintext; configure both sides alike",
            ),
        };
        encode_reject(
            &server.caps,
            &server.auth,
            false,
            reason,
            message,
            &mut self.out,
        );
        Err(SessionError::Encryption {
            peer: self.peer.clone(),
            reason,
        })
    }

    /// Feeds ciphertext to the TLS session and returns the plaintext it yields (empty
    /// while the TLS handshake runs); queues what rustls has to send.
    fn open(&mut self, input: &[u8]) -> Result<Vec<u8>, SessionError> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(input.to_vec());
        };
        let peer = &self.peer;
        let tls_err = |source| SessionError::Tls {
            peer: peer.clone(),
            source,
        };
        let mut plain = Vec::new();
        let r = tls.feed_all(input, &mut plain);
        // Handshake records, or the alert that says why it failed.
        tls.write_to_vec(&mut self.out);
        r.map_err(tls_err)?;
        if !tls.is_handshaking() && self.binding.is_none() {
            self.binding = Some(tls.binding().map_err(tls_err)?);
        }
        Ok(plain)
    }
}

/// What driving a connection came to.
pub(super) enum Outcome {
    /// It waits for the socket.
    Wait,
    /// Its CONFIRM verified: [`admit`] decides between READY and a REJECT.
    Confirmed,
    /// Its handshake completed and its last output was written.
    Established,
    /// It is refused (the reason) and to be closed.
    Refused(SessionError),
}

/// Writes pending output, reads and feeds the handshake until the socket would block
/// or the handshake ends. `fallback` answers a first frame that names no session being
/// accepted.
pub(super) fn drive_one(
    c: &mut Pending,
    scratch: &mut [u8],
    sessions: &[Entry],
    fallback: (&ServerConfig, u16),
    tls: Option<&TlsConfig>,
) -> Outcome {
    let peer = c.peer.clone();
    let io_err = |source| SessionError::HandshakeIo {
        peer: peer.clone(),
        source,
    };
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
            Ok(n) if c.received + n > MAX_HANDSHAKE_INPUT => {
                return Outcome::Refused(io_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sent more than a handshake before its handshake completed",
                )));
            }
            Ok(n) => {
                c.received += n;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Outcome::Refused(io_err(e)),
        };
        if !c.mode_checked
            && let Err(why) = c.check_mode(&scratch[..n], tls, fallback.0)
        {
            c.phase = Phase::Failing(why);
            continue;
        }
        let plain = match c.open(&scratch[..n]) {
            Ok(p) => p,
            Err(why) => {
                c.phase = Phase::Failing(why);
                continue;
            }
        };
        if plain.is_empty() {
            continue;
        }
        let early;
        let input: &[u8] = if c.hs.is_none() {
            c.early.extend_from_slice(&plain);
            let first = match first_frame(c, &plain, sessions) {
                First::Incomplete => continue,
                First::Hello {
                    session,
                    count,
                    tag,
                } => {
                    c.tag = tag.map_or(Tag::None, Tag::Unchecked);
                    Some((session, count))
                }
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
            let binding = c.binding;
            match nonce().and_then(|n| {
                ServerHandshake::with_binding(server.clone(), n, binding)
                    .map(ServerHandshake::hold_ready)
                    .map_err(|source| SessionError::Handshake {
                        channel: None,
                        peer: peer.clone(),
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
            &plain
        };
        let Some(mut hs) = c.hs.take() else {
            continue;
        };
        match hs.receive(input) {
            Ok(used) if hs.confirmed().is_some() => {
                c.leftover = input[used..].to_vec();
                c.hs = Some(hs);
                return Outcome::Confirmed;
            }
            Ok(used) if hs.is_done() => {
                c.emit_from(|o| hs.take_output(o));
                c.leftover = input[used..].to_vec();
                c.phase = Phase::Done;
            }
            Ok(_) => c.emit_from(|o| hs.take_output(o)),
            Err(source) => {
                // Tell the peer why (a REJECT is queued), then close.
                c.emit_from(|o| hs.take_output(o));
                c.phase = Phase::Failing(SessionError::Handshake {
                    channel: None,
                    peer: peer.clone(),
                    peer_message: hs.peer_message().map(str::to_owned),
                    source,
                });
            }
        }
        c.hs = Some(hs);
    }
}

/// Answers a [`Outcome::Confirmed`] connection: READY when its session admits its
/// index, else a REJECT (`BAD_CHANNEL` for an index another channel holds or a count
/// that differs from the session's, `UNKNOWN_SESSION` when its session is no longer
/// being accepted). The caller then drives it again to send the answer.
pub(super) fn admit(c: &mut Pending, sessions: &mut [Entry]) {
    let Some(mut hs) = c.hs.take() else {
        return;
    };
    let Some(n) = hs.confirmed().copied() else {
        c.hs = Some(hs);
        return;
    };
    let entry = sessions
        .iter_mut()
        .find(|s| s.server.session == Some(n.session));
    let verdict = match entry {
        None => Err(HandshakeError::UnknownSession(n.session)),
        Some(e) => {
            e.claim(n.channel.0, n.channel_count)
                .map_err(|why| HandshakeError::ChannelRefused {
                    channel: n.channel.0,
                    count: n.channel_count,
                    why,
                })
        }
    };
    match verdict {
        Ok(()) => {
            hs.admit();
            c.claim = Some((n.session, n.channel.0));
            c.phase = Phase::Done;
        }
        Err(e) => {
            let source = hs.refuse(e);
            c.phase = Phase::Failing(match source {
                HandshakeError::ChannelRefused { why, .. } => SessionError::BadChannel {
                    channel: n.channel.0,
                    count: n.channel_count,
                    peer: c.peer.clone(),
                    why,
                },
                source => SessionError::Handshake {
                    channel: Some(n.channel.0),
                    peer: c.peer.clone(),
                    peer_message: None,
                    source,
                },
            });
        }
    }
    c.emit_from(|o| hs.take_output(o));
    c.hs = Some(hs);
}

/// What the first frame of a connection is.
enum First {
    /// Not complete yet.
    Incomplete,
    /// A HELLO for `session` asking for `count` channels; `tag`: the random half of
    /// its nonce when the other half is the HELLO key tag of the key of the session
    /// being accepted under that id.
    Hello {
        session: SessionId,
        count: u16,
        tag: Option<[u8; HELLO_TAG_RANDOM]>,
    },
    /// Another frame, or garbage: the handshake itself refuses it.
    Other,
}

/// Reads `input` with the first-frame decoder.
fn first_frame(c: &mut Pending, input: &[u8], sessions: &[Entry]) -> First {
    let Some(dec) = c.hello.as_mut() else {
        return First::Other;
    };
    let mut rest = input;
    let mut first = First::Incomplete;
    while !rest.is_empty() {
        match dec.decode(rest) {
            Ok((_, Some(Frame::Hello(h)))) => {
                let key = sessions
                    .iter()
                    .find(|s| s.server.session == Some(h.session))
                    .and_then(|s| match &s.server.auth {
                        Authentication::PreSharedKey(k) => Some(k),
                        Authentication::None => None,
                    });
                // Only near this host's clock: a tag recorded from an earlier
                // migration does not count.
                let sent = u64::from_le_bytes(h.nonce[..8].try_into().unwrap_or_default());
                let fresh = crate::session::unix_seconds().abs_diff(sent) <= HELLO_TAG_WINDOW_S;
                let tag = key.filter(|k| fresh && k.tags_hello(&h)).map(|_| {
                    let mut random = [0; HELLO_TAG_RANDOM];
                    random.copy_from_slice(&h.nonce[..HELLO_TAG_RANDOM]);
                    random
                });
                first = First::Hello {
                    session: h.session,
                    count: h.channel_count,
                    tag,
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
    let message =
        format!("{count} channels asked for; this destination accepts at most {max_channels}");
    let mut reject = Vec::new();
    let bound = c.binding.is_some();
    encode_reject(
        &server.caps,
        &server.auth,
        bound,
        RejectReason::BAD_CHANNEL,
        &message,
        &mut reject,
    );
    c.emit(&reject);
    SessionError::TooManyChannels {
        peer: c.peer.clone(),
        count,
        max: max_channels,
    }
}
