//! The source's side of a channel inside TLS on a blocking socket: the TLS handshake
//! (with the look at the destination's first byte that tells a plaintext REJECT from
//! TLS), and handshake frames read and written through TLS.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use pagewire_protocol::{Frame, FrameDecoder, HandshakeError, Limits};

use super::SessionError;
use crate::endpoint::{Endpoint, Stream};
use crate::tls::{TlsError, TlsSession, is_tls_record_type};

/// Writes handshake output: in clear, or sealed into TLS records.
pub(super) fn hs_write(
    stream: &mut Stream,
    tls: Option<&mut TlsSession>,
    out: &[u8],
) -> io::Result<()> {
    match tls {
        None => stream.write_all(out),
        Some(tls) => {
            tls.seal_bytes(out).map_err(io::Error::other)?;
            tls.write_to(stream)
        }
    }
}

/// Why reading handshake bytes failed.
pub(super) enum HsReadError {
    Io(io::Error),
    Tls(TlsError),
}

/// Reads handshake input: in clear, or the plaintext of TLS records. Each read waits
/// only the time left before `deadline` (the caller set the socket's read timeout to it
/// for the first), so records without plaintext, or a record trickled a byte at a time,
/// cannot hold the handshake past it.
pub(super) fn hs_read(
    stream: &mut Stream,
    tls: Option<&mut TlsSession>,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<usize, HsReadError> {
    let Some(tls) = tls else {
        return stream.read(buf).map_err(HsReadError::Io);
    };
    let mut raw = [0u8; 4096];
    loop {
        match tls.read_plain(buf) {
            Ok(Some(n)) => return Ok(n),
            Ok(None) => {}
            Err(e) => return Err(HsReadError::Tls(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HsReadError::Io(io::ErrorKind::TimedOut.into()));
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(HsReadError::Io)?;
        let n = stream.read(&mut raw).map_err(HsReadError::Io)?;
        if n == 0 {
            return Ok(0);
        }
        let mut fed = 0;
        while fed < n {
            let used = tls.feed(&raw[fed..n]).map_err(HsReadError::Tls)?;
            if used == 0 {
                break;
            }
            fed += used;
        }
        // An alert (e.g. the peer refusing this side's certificate) may be queued.
        let _ = tls.write_to(stream);
    }
}

/// Runs a TLS source's TLS handshake on a blocking socket. The first byte of the
/// destination's answer is looked at before rustls sees it: a plaintext destination
/// answers a ClientHello with a pagewire REJECT (`ENCRYPTION_UNSUPPORTED`), reported
/// as that refusal.
pub(super) fn tls_client_handshake(
    stream: &mut Stream,
    cfg: &crate::tls::TlsConfig,
    timeout: Duration,
    peer: &Endpoint,
    channel: u16,
) -> Result<Box<TlsSession>, SessionError> {
    let tls_err = |source| SessionError::Tls {
        peer: peer.clone(),
        source,
    };
    // The pagewire handshake has not begun: a close is the peer turning the
    // connection away.
    let io_err = |source| SessionError::HandshakeIo {
        peer: peer.clone(),
        source: super::turned_away(source),
    };
    let mut tls = Box::new(TlsSession::client(cfg).map_err(tls_err)?);
    let deadline = crate::deadline::from_now(timeout);
    let mut buf = vec![0u8; 16 << 10];
    let mut first = true;
    loop {
        tls.write_to(stream).map_err(io_err)?;
        if !tls.is_handshaking() {
            return Ok(tls);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_err(io::ErrorKind::TimedOut.into()));
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(io_err)?;
        let n = stream.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            return Err(io_err(io::ErrorKind::UnexpectedEof.into()));
        }
        if std::mem::take(&mut first) && !is_tls_record_type(buf[0]) {
            return Err(plaintext_answer(stream, &buf[..n], deadline, peer, channel));
        }
        let mut fed = 0;
        while fed < n {
            match tls.feed(&buf[fed..n]) {
                Ok(0) => break,
                Ok(used) => fed += used,
                Err(e) => {
                    // Send the alert that says why, then give up.
                    let _ = tls.write_to(stream);
                    return Err(tls_err(e));
                }
            }
        }
    }
}

/// Reads the pagewire frame a plaintext destination answered a ClientHello with
/// (`input` and what follows, up to one handshake frame before the deadline).
fn plaintext_answer(
    stream: &mut Stream,
    input: &[u8],
    deadline: Instant,
    peer: &Endpoint,
    channel: u16,
) -> SessionError {
    let not_tls = || SessionError::NotTls { peer: peer.clone() };
    let mut dec = FrameDecoder::new(Limits::handshake());
    let mut bytes = input.to_vec();
    let mut buf = [0u8; 4096];
    for _ in 0..8 {
        let mut rest = &bytes[..];
        loop {
            match dec.decode(rest) {
                Ok((_, Some(Frame::Reject(r)))) => {
                    return SessionError::Handshake {
                        channel: Some(channel),
                        peer: peer.clone(),
                        peer_message: Some(r.message.to_owned()),
                        source: HandshakeError::Rejected {
                            reason: r.reason,
                            version_min: r.version_min,
                            version_max: r.version_max,
                            page_size: r.page_size,
                        },
                    };
                }
                Ok((_, Some(_))) | Err(_) => return not_tls(),
                Ok((0, None)) => break,
                Ok((used, None)) => rest = &rest[used..],
            }
        }
        bytes.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return not_tls();
        }
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return not_tls(),
        }
    }
    not_tls()
}
