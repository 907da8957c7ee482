//! TLS 1.3 around stream channels (TCP, Unix sockets, io_uring), with rustls.
//!
//! # Contract
//! - **TLS first**: on an encrypted channel the TLS 1.3 handshake runs on the stream
//!   before any pagewire byte; HELLO, WELCOME, CONFIRM, READY and every frame after
//!   them travel inside TLS application data. Both sides authenticate with X.509
//!   certificates (a destination requires a client certificate); the source checks
//!   that the destination's certificate is valid for the configured server name
//!   ([`TlsConfig`]).
//! - **No fallback**: a side is configured [`Encryption::Tls`] or
//!   [`Encryption::Plaintext`]. A destination tells which one a connection speaks from
//!   its first byte ([`looks_like_tls`]: a TLS handshake record starts with `0x16`, a
//!   pagewire stream with a HELLO's frame type `0x01`) and answers the wrong one with a
//!   plaintext REJECT: `ENCRYPTION_REQUIRED` (plaintext HELLO to a TLS destination) or
//!   `ENCRYPTION_UNSUPPORTED` (ClientHello to a plaintext destination). A TLS source
//!   looks at the first byte of the answer before rustls sees it, so such a REJECT is
//!   reported with its reason, not as a TLS decoding error.
//! - **Channel binding**: after the TLS handshake both sides export 32 bytes (RFC 8446
//!   §7.5, label [`ChannelBinding::TLS_EXPORTER_LABEL`], no context) and give them to
//!   the pagewire handshake, which then negotiates `hmac-sha256-tls-exporter` when a
//!   pre-shared key is configured: the key and the certificates are two independent
//!   factors, and a relay that terminates two TLS sessions cannot splice them.
//! - **Records and copies**: rustls 0.23 with the `ring` provider. rustls' *unbuffered*
//!   API offers no exporter in 0.23 and copies the same bytes internally (decrypted
//!   records leave through a `Vec`, sealed records through a `Vec` copied into the
//!   caller's buffer), so the buffered connection is driven without its own IO:
//!   - send: each frame's header and payload slices (guest pages, codec output) are
//!     handed to rustls, which copies them once into a record buffer and seals it
//!     there; the TCP backend writes the sealed records with `sendmsg` straight from
//!     rustls' buffers, the io_uring backend first gathers them into one buffer that
//!     stays alive until the send completes (one more copy);
//!   - receive: ciphertext is read in large chunks and fed to rustls (one copy into its
//!     record buffer), which decrypts in place and queues the plaintext (one copy);
//!     pagewire copies it from there to where it is decoded, or for raw pages straight
//!     into destination memory (one copy), only after the record's tag verified.
//!
//!   Every such copy is counted in [`ChannelStats`](crate::ChannelStats)
//!   (`tls_bytes_copied`, with `tls_bytes_sealed` and `tls_bytes_opened`).
//! - **Failure**: a record whose tag does not verify (tampering) fails the channel with
//!   [`ChannelError::Tls`] (`DecryptError`); the frame it
//!   belongs to is never reported placed. A peer that closes without `close_notify`
//!   fails with [`ChannelError::TlsTruncated`], so
//!   truncation is never taken for a clean end.

use std::io::{self, BufRead, Read, Write};

use pagewire_protocol::ChannelBinding;
use rustls::pki_types::ServerName;
use std::sync::Arc;

use crate::buf::{GuestSlice, Payload};
use crate::channel::{ChannelError, OutFrame};
use crate::recv::{ByteSource, copy_to_guest};

mod config;
pub mod generate;

pub use config::{Encryption, PemFiles, TlsConfig};

/// The first byte of a TLS handshake record (`ContentType::handshake`).
const TLS_HANDSHAKE: u8 = 0x16;
/// How much ciphertext one socket read takes on the TCP backend.
const CIPHER_READ: usize = 256 << 10;

/// Whether the first bytes of a connection are a TLS record rather than a pagewire
/// frame (a TLS ClientHello or ServerHello: content type 22, then version major 3).
pub fn looks_like_tls(first: &[u8]) -> bool {
    match first {
        [] => false,
        [t] => *t == TLS_HANDSHAKE,
        [t, major, ..] => *t == TLS_HANDSHAKE && *major == 3,
    }
}

/// Whether the first byte of a TLS server's answer is a TLS record at all (handshake
/// or alert); anything else is taken for a pagewire frame (a plaintext REJECT).
pub(crate) fn is_tls_record_type(first: u8) -> bool {
    (0x14..=0x17).contains(&first)
}

/// Why TLS could not be set up or failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot use the {what} from {path}: {source}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// rustls refused the configuration (certificate, key, versions).
    #[error("invalid TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The client certificate verifier could not be built (no usable CA).
    #[error("invalid TLS client verifier: {0}")]
    Verifier(String),
    /// The server name is not a DNS name or IP address.
    #[error("{0:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    /// The configuration lacks the role this side plays.
    #[error(
        "the TLS configuration has no {0} settings; build it with TlsConfig::from_pem or give the {0} config"
    )]
    MissingRole(&'static str),
    /// The TLS handshake or a record failed (bad certificate, unknown CA, expired
    /// certificate, no client certificate, a record that does not authenticate...).
    #[error("TLS failed: {0}")]
    Protocol(#[source] rustls::Error),
    /// The peer negotiated something else than TLS 1.3.
    #[error("the peer negotiated a TLS version other than 1.3")]
    NotTls13,
}

/// Byte counters of one TLS channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsCounters {
    pub(crate) sealed: u64,
    pub(crate) opened: u64,
    pub(crate) copied: u64,
}

/// One channel's TLS connection after its handshake, driven without IO of its own:
/// the channel reads and writes the socket, rustls seals and opens records.
pub struct TlsSession {
    conn: rustls::Connection,
    /// Ciphertext read from the socket and not yet given to rustls.
    cbuf: Vec<u8>,
    cstart: usize,
    cend: usize,
    /// The peer sent `close_notify`.
    closed: bool,
    pub(crate) counters: TlsCounters,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("counters", &self.counters)
            .finish()
    }
}

impl TlsSession {
    /// A source's (TLS client's) connection.
    pub(crate) fn client(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let (config, name): &(Arc<rustls::ClientConfig>, ServerName<'static>) =
            cfg.client_config()?;
        let conn = rustls::ClientConnection::new(config.clone(), name.clone())
            .map_err(TlsError::Config)?;
        Ok(Self::new(conn.into()))
    }

    /// A destination's (TLS server's) connection.
    pub(crate) fn server(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let conn = rustls::ServerConnection::new(cfg.server_config()?.clone())
            .map_err(TlsError::Config)?;
        Ok(Self::new(conn.into()))
    }

    fn new(mut conn: rustls::Connection) -> Self {
        // A whole frame is sealed before it is written: no limit on queued records
        // (a frame is bounded by the negotiated frame limit).
        conn.set_buffer_limit(None);
        Self {
            conn,
            cbuf: Vec::new(),
            cstart: 0,
            cend: 0,
            closed: false,
            counters: TlsCounters::default(),
        }
    }

    /// Whether the TLS handshake is still running.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The channel binding (exporter value) once the handshake is done; checks that
    /// the version is TLS 1.3.
    pub(crate) fn binding(&self) -> Result<ChannelBinding, TlsError> {
        if self.conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Err(TlsError::NotTls13);
        }
        self.conn
            .export_keying_material([0u8; 32], ChannelBinding::TLS_EXPORTER_LABEL, None)
            .map(ChannelBinding)
            .map_err(TlsError::Protocol)
    }

    /// Feeds ciphertext and processes it; returns the bytes taken from `input` (all of
    /// them unless rustls' buffer is full, which cannot happen with plaintext drained).
    pub(crate) fn feed(&mut self, mut input: &[u8]) -> Result<usize, TlsError> {
        let total = input.len();
        while !input.is_empty() {
            // An error means rustls' buffer is full: process what it has first.
            let n = self.conn.read_tls(&mut input).unwrap_or_default();
            self.counters.copied += n as u64;
            let state = self
                .conn
                .process_new_packets()
                .map_err(TlsError::Protocol)?;
            self.closed |= state.peer_has_closed();
            if n == 0 {
                break;
            }
        }
        Ok(total - input.len())
    }

    /// Feeds all of `input`, moving the plaintext it yields to `plain` as it goes (so
    /// rustls' plaintext queue never blocks the input).
    pub(crate) fn feed_all(
        &mut self,
        mut input: &[u8],
        plain: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        let mut buf = [0u8; 4096];
        loop {
            let used = self.feed(input)?;
            input = &input[used..];
            let mut drained = false;
            while let Some(n) = self
                .read_plain(&mut buf)
                .map_err(|e| TlsError::Protocol(rustls::Error::General(e.to_string())))?
            {
                if n == 0 {
                    break;
                }
                plain.extend_from_slice(&buf[..n]);
                drained = true;
            }
            if input.is_empty() || (used == 0 && !drained) {
                return Ok(());
            }
        }
    }

    /// Appends the records rustls wants to send (handshake messages, alerts, sealed
    /// data) to `out`.
    pub(crate) fn write_to_vec(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            match self.conn.write_tls(out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Writes the records rustls wants to send to `w`.
    pub(crate) fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        while self.conn.wants_write() {
            if self.conn.write_tls(w)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Seals `plain` (handshake frames; small).
    pub(crate) fn seal_bytes(&mut self, plain: &[u8]) -> io::Result<()> {
        self.counters.sealed += plain.len() as u64;
        self.counters.copied += plain.len() as u64;
        self.conn.writer().write_all(plain)
    }

    /// Seals a frame: its header and payload slices, in order, each read once by
    /// rustls as it copies them into records.
    pub(crate) fn seal_frame(&mut self, frame: &OutFrame) -> Result<(), ChannelError> {
        let seal_err = |e| ChannelError::io("TLS seal", e);
        self.seal_bytes(&frame.header).map_err(seal_err)?;
        for p in frame.payload.iter().filter(|p| !p.is_empty()) {
            let bytes = payload_bytes(p);
            self.seal_bytes(bytes).map_err(seal_err)?;
        }
        Ok(())
    }

    /// Queues `close_notify`.
    pub(crate) fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Decrypted bytes into `buf` (handshake frames); `None` when rustls holds none.
    pub(crate) fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.conn.reader().read(buf) {
            Ok(n) => {
                self.counters.opened += n as u64;
                self.counters.copied += 2 * n as u64;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Moves decrypted bytes into `dst`; `None` when rustls holds none.
    fn take_plain(&mut self, dst: &mut [u8]) -> Result<Option<usize>, ChannelError> {
        match self.conn.reader().read(dst) {
            Ok(0) if !dst.is_empty() => Ok(Some(0)),
            Ok(n) => {
                self.counters.opened += n as u64;
                // rustls queued the record's plaintext (one copy) and it was copied out.
                self.counters.copied += 2 * n as u64;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ChannelError::TlsTruncated),
            Err(e) => Err(ChannelError::io("TLS read", e)),
        }
    }

    /// Moves decrypted bytes into the concatenation of `dst` from byte `skip`.
    fn take_plain_guest(
        &mut self,
        dst: &[GuestSlice],
        skip: usize,
    ) -> Result<Option<usize>, ChannelError> {
        let want = dst.iter().map(GuestSlice::len).sum::<usize>() - skip;
        let mut reader = self.conn.reader();
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ChannelError::TlsTruncated);
            }
            Err(e) => return Err(ChannelError::io("TLS read", e)),
        };
        let n = chunk.len().min(want);
        copy_to_guest(dst, skip, &chunk[..n]);
        reader.consume(n);
        self.counters.opened += n as u64;
        self.counters.copied += 2 * n as u64;
        Ok(Some(n))
    }
}

/// The bytes of a payload slice, for rustls to seal.
fn payload_bytes(p: &Payload) -> &[u8] {
    // SAFETY: the payload owns or borrows memory that stays mapped and readable while
    // the frame is being sent (a pool buffer, a vector, a `Bytes`, or guest memory
    // under `GuestMemory::new`'s contract). Guest pages may change under a running
    // guest while rustls reads them; it reads each byte once, like the kernel's copy
    // of a plaintext send, and a page changed meanwhile is dirty and sent again.
    unsafe { std::slice::from_raw_parts(p.as_ptr(), p.len()) }
}

/// A [`ByteSource`] that reads TLS records from `inner` and hands out their
/// plaintext. With `staged`, ciphertext is read in chunks of up to 256 KiB into the
/// session's buffer before rustls takes it (one system call per chunk, not per 4 KiB
/// as rustls' own reads would make); without it, rustls reads from `inner` directly
/// (for a source whose `read` already copies from memory, as io_uring's ring).
pub(crate) struct TlsSource<'a, S> {
    pub(crate) inner: &'a mut S,
    pub(crate) tls: &'a mut TlsSession,
    pub(crate) staged: bool,
}

/// `io::Read` over a [`ByteSource`], keeping its error.
struct ReadAdapter<'a, S> {
    inner: &'a mut S,
    err: Option<ChannelError>,
}

impl<S: ByteSource> Read for ReadAdapter<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            self.err = Some(e);
            io::Error::other("channel read failed")
        })
    }
}

impl<S: ByteSource> TlsSource<'_, S> {
    /// Reads more ciphertext and processes it; `false` at end of stream.
    fn more(&mut self) -> Result<bool, ChannelError> {
        let tls = &mut *self.tls;
        if tls.closed {
            return Ok(false);
        }
        let n = if self.staged {
            if tls.cstart == tls.cend {
                tls.cstart = 0;
                tls.cend = 0;
                if tls.cbuf.len() < CIPHER_READ {
                    tls.cbuf.resize(CIPHER_READ, 0);
                }
                let n = self.inner.read(&mut tls.cbuf)?;
                tls.cend = n;
                if n == 0 {
                    return Ok(false);
                }
            }
            let cbuf = std::mem::take(&mut tls.cbuf);
            let used = tls.feed(&cbuf[tls.cstart..tls.cend]);
            tls.cbuf = cbuf;
            let used = used.map_err(ChannelError::Tls)?;
            tls.cstart += used;
            used
        } else {
            let mut rd = ReadAdapter {
                inner: &mut *self.inner,
                err: None,
            };
            let n = match tls.conn.read_tls(&mut rd) {
                Ok(n) => n,
                Err(e) => return Err(rd.err.take().unwrap_or(ChannelError::io("TLS read", e))),
            };
            if n == 0 {
                return Ok(false);
            }
            tls.counters.copied += n as u64;
            let state = tls
                .conn
                .process_new_packets()
                .map_err(|e| ChannelError::Tls(TlsError::Protocol(e)))?;
            tls.closed |= state.peer_has_closed();
            n
        };
        Ok(n > 0 || self.tls.closed)
    }
}

impl<S: ByteSource> ByteSource for TlsSource<'_, S> {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        loop {
            if let Some(n) = self.tls.take_plain(dst)? {
                return Ok(n);
            }
            if !self.more()? {
                // rustls says whether the end was clean (close_notify).
                return self.tls.take_plain(dst)?.ok_or(ChannelError::TlsTruncated);
            }
        }
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        loop {
            if let Some(n) = self.tls.take_plain_guest(dst, skip)? {
                return Ok(n);
            }
            if !self.more()? {
                return self
                    .tls
                    .take_plain_guest(dst, skip)?
                    .ok_or(ChannelError::TlsTruncated);
            }
        }
    }
}
