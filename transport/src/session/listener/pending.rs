//! One connection before its handshake completes: its first frame picks the session,
//! then the handshake runs over the non-blocking socket.

use std::io::{self, Read, Write};
use std::time::Instant;

use pagewire_protocol::{
    AuthMethod, Authentication, ChecksumId, Frame, FrameDecoder, Reject, RejectReason,
    ServerConfig, ServerHandshake, SessionId, WireList,
};

use super::shared::Entry;
use super::socket::Conn;
use crate::endpoint::Endpoint;
use crate::session::{SessionError, nonce};

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
    pub(super) deadline: Instant,
    pub(super) phase: Phase,
}

/// What driving a connection came to.
pub(super) enum Outcome {
    /// It waits for the socket.
    Wait,
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
                    peer: peer.clone(),
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
        peer: c.peer.clone(),
        count,
        max: max_channels,
    }
}
