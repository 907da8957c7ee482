//! TLS 1.3 around stream channels (TCP, Unix sockets, io_uring), with rustls.
//!
//! # Contract
//! - **TLS first**: on an encrypted channel the TLS 1.3 handshake runs on the stream
//!   before any pagewire byte; HELLO, WELCOME, CONFIRM, READY and every frame after
//!   them travel inside TLS application data. Both sides authenticate with X.509
//!   certificates (a destination requires a client certificate); the source checks
//!   that the destination's certificate is valid for the configured server name
//!   ([`TlsConfig`]). Instead of a CA, a side may pin the peer's certificates
//!   ([`TlsConfig::from_pinned_pem`]; module `pin`): then only the whole DER of a
//!   pinned certificate is accepted, within its validity period, and the handshake
//!   signature is verified with its key.
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
//! - **Records and copies**: rustls 0.23 (the `ring` provider) runs the TLS handshake;
//!   at its end it hands over the traffic keys, and pagewire's own record layer
//!   (`record.rs`, RFC 8446 §5, ring's AEADs) seals and opens every record after it.
//!   rustls' *unbuffered* API, meant for this, has no exporter in 0.23, and in 0.23 it
//!   and the buffered API copy every byte internally once more (plaintext leaves
//!   through a `Vec`); the handshake is therefore fed to the buffered connection one
//!   whole record at a time, so that rustls never holds application data, and the
//!   keys are taken from it (`dangerous_extract_secrets`) once the exporter value is.
//!   - send: each frame's header and payload slices (guest pages, codec output) are
//!     copied once into the record buffer and sealed there in place; that buffer is
//!     what is sent (one `sendmsg` on TCP; the io_uring send keeps it until it
//!     completes). One copy per byte, against none for a plaintext send (whose copy
//!     the kernel makes).
//!   - receive: ciphertext is read in chunks of up to 256 KiB into the session's
//!     buffer and each record is opened in place there; its plaintext is copied to
//!     where it is decoded, or for raw pages straight into destination memory, only
//!     after the record's tag verified. One copy per byte, plus the tail of a partial
//!     record moved to the front of the buffer between reads (at most one record per
//!     256 KiB read).
//!
//!   Every such copy is counted in [`ChannelStats`](crate::ChannelStats)
//!   (`tls_bytes_copied`, with `tls_bytes_sealed` and `tls_bytes_opened`). The record
//!   layer never rekeys (see `record.rs`): a KeyUpdate from the peer fails the channel,
//!   and a direction that reaches 2^24 records under one key (256 GiB) fails with
//!   [`TlsError::RecordLimit`].
//! - **Failure**: a record whose tag does not verify (tampering) fails the channel with
//!   [`ChannelError::Tls`] (`DecryptError`); the frame it
//!   belongs to is never reported placed. A peer that closes without `close_notify`
//!   fails with [`ChannelError::TlsTruncated`], so
//!   truncation is never taken for a clean end.

use std::io::{self, Write};

use pagewire_protocol::ChannelBinding;
use rustls::pki_types::ServerName;
use std::sync::Arc;

use crate::buf::{GuestSlice, Payload};
use crate::channel::{ChannelError, OutFrame};
use crate::recv::{ByteSource, copy_to_guest};
use record::{HEADER, MAX_RECORD, Opened, Records};

mod config;
pub mod generate;
mod pin;

/// Entry points for the cargo-fuzz targets in `fuzz/`.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::record::fuzz as records;
}
mod record;

pub use config::{Encryption, PemFiles, PinnedPemFiles, TlsConfig};
pub use pin::NotPinned;

/// The first byte of a TLS handshake record (`ContentType::handshake`).
const TLS_HANDSHAKE: u8 = 0x16;
/// Size of the ciphertext buffer: one socket read takes up to this much.
const CIPHER_BUF: usize = 256 << 10;

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
    /// A certificate to pin is unusable (none given, or not a certificate).
    #[error("cannot pin the peer certificates: {0}")]
    Pinned(String),
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
    /// The record layer met something it does not support.
    #[error("unsupported by the record layer: {0}")]
    Unsupported(&'static str),
    /// A direction sealed or opened 2^24 records under one key, and this record layer
    /// does not rekey (see the module docs).
    #[error(
        "2^24 TLS records under one key on this channel (256 GiB): the record layer does not rekey; use more channels"
    )]
    RecordLimit,
}

/// Byte counters of one TLS channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsCounters {
    pub(crate) sealed: u64,
    pub(crate) opened: u64,
    pub(crate) copied: u64,
    /// Frames sealed into a records buffer too small for them (an allocation).
    pub(crate) send_buffer_allocations: u64,
}

/// One channel's TLS session, driven without IO of its own (the channel reads and
/// writes the socket). rustls runs the TLS handshake; then pagewire's record layer seals and opens
/// the records on the secrets rustls hands over.
pub struct TlsSession {
    /// The handshake, until it completes.
    hs: Option<rustls::Connection>,
    /// The record layer, after it.
    records: Option<Records>,
    binding: Option<ChannelBinding>,
    /// Ciphertext received: `cbuf[cstart..cend]` not processed yet;
    /// `cbuf[pstart..pend]` plaintext opened in place and not handed out yet.
    cbuf: Vec<u8>,
    cstart: usize,
    cend: usize,
    pstart: usize,
    pend: usize,
    /// Sealed records (and, during the handshake, rustls' records) to send.
    out: Vec<u8>,
    /// The peer sent `close_notify`.
    closed: bool,
    pub(crate) counters: TlsCounters,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.is_handshaking())
            .field("counters", &self.counters)
            .finish()
    }
}

/// rustls' error for a record layer that is not there (a call out of order).
fn not_ready() -> TlsError {
    TlsError::Protocol(rustls::Error::HandshakeNotComplete)
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

    fn new(conn: rustls::Connection) -> Self {
        Self {
            hs: Some(conn),
            records: None,
            binding: None,
            // Room for one record and a read while the handshake runs: a connection
            // that has not authenticated holds little (see `grow`).
            cbuf: vec![0; MAX_RECORD + 4096],
            cstart: 0,
            cend: 0,
            pstart: 0,
            pend: 0,
            out: Vec::new(),
            closed: false,
            counters: TlsCounters::default(),
        }
    }

    /// Whether bytes received wait here: plaintext not handed out yet, ciphertext not
    /// opened yet, or the peer's close.
    pub(crate) fn has_pending(&self) -> bool {
        self.pstart < self.pend || self.cstart < self.cend || self.closed
    }

    /// Whether the TLS handshake is still running.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.records.is_none()
    }

    /// The channel binding (exporter value), once the handshake is done.
    pub(crate) fn binding(&self) -> Result<ChannelBinding, TlsError> {
        self.binding.ok_or_else(not_ready)
    }

    /// Gives the ciphertext buffer its full size, once the channel runs.
    fn grow(&mut self) {
        if self.cbuf.len() < CIPHER_BUF {
            self.cbuf.resize(CIPHER_BUF, 0);
        }
    }

    /// Room for more ciphertext at the end of the buffer, after moving what is left
    /// of a partial record to its front (counted as copied).
    fn spare(&mut self) -> &mut [u8] {
        if self.pstart == self.pend && self.cstart > 0 && self.cbuf.len() - self.cend < MAX_RECORD {
            let left = self.cend - self.cstart;
            self.cbuf.copy_within(self.cstart..self.cend, 0);
            self.counters.copied += left as u64;
            self.cstart = 0;
            self.cend = left;
            self.pstart = 0;
            self.pend = 0;
        }
        &mut self.cbuf[self.cend..]
    }

    /// Takes ciphertext from the peer (handshake phase: small).
    pub(crate) fn feed(&mut self, mut input: &[u8]) -> Result<usize, TlsError> {
        let total = input.len();
        while !input.is_empty() {
            let spare = self.spare();
            if spare.is_empty() {
                // Undelivered plaintext fills the buffer: let the caller drain it.
                break;
            }
            let n = spare.len().min(input.len());
            spare[..n].copy_from_slice(&input[..n]);
            self.cend += n;
            self.counters.copied += n as u64;
            input = &input[n..];
            self.handshake()?;
        }
        Ok(total - input.len())
    }

    /// Gives rustls the whole records received while the handshake runs, one at a
    /// time, and moves to the record layer as soon as it completes (so rustls never
    /// holds application data).
    fn handshake(&mut self) -> Result<(), TlsError> {
        let Some(conn) = self.hs.as_mut() else {
            return Ok(());
        };
        while conn.is_handshaking() {
            let Some(&[_, _, _, hi, lo]) = self.cbuf.get(self.cstart..self.cstart + HEADER) else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if len > MAX_RECORD - HEADER {
                // Longer than any TLS 1.3 record (RFC 8446, 5.1 and 5.2): it would
                // never fit the buffer, and the bytes after it would be dropped.
                return Err(TlsError::Protocol(rustls::Error::General(format!(
                    "a TLS record of {len} bytes, more than a record may hold"
                ))));
            }
            let end = self.cstart + HEADER + len;
            if end > self.cend {
                break;
            }
            let mut rec = &self.cbuf[self.cstart..end];
            while !rec.is_empty() {
                if conn
                    .read_tls(&mut rec)
                    .map_err(|e| TlsError::Protocol(rustls::Error::General(e.to_string())))?
                    == 0
                {
                    break;
                }
                conn.process_new_packets().map_err(TlsError::Protocol)?;
            }
            self.cstart = end;
        }
        self.pull_handshake_output();
        let Some(conn) = self.hs.as_mut() else {
            return Ok(());
        };
        if conn.is_handshaking() {
            return Ok(());
        }
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Err(TlsError::NotTls13);
        }
        let binding = conn
            .export_keying_material([0u8; 32], ChannelBinding::TLS_EXPORTER_LABEL, None)
            .map_err(TlsError::Protocol)?;
        self.binding = Some(ChannelBinding(binding));
        let conn = self.hs.take().ok_or_else(not_ready)?;
        self.records = Some(Records::new(conn)?);
        Ok(())
    }

    /// Moves rustls' own records (handshake messages, an alert) to the records to
    /// send.
    fn pull_handshake_output(&mut self) {
        if let Some(conn) = self.hs.as_mut() {
            while conn.wants_write() {
                if conn.write_tls(&mut self.out).unwrap_or(0) == 0 {
                    break;
                }
            }
        }
    }

    /// Feeds all of `input`, moving the plaintext it yields to `plain` as it goes.
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
            while let Some(n) = self.read_plain(&mut buf)? {
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

    /// Opens records until plaintext is available; `false` when a whole record is
    /// missing or the peer closed.
    fn fill_plain(&mut self) -> Result<bool, TlsError> {
        if self.pstart < self.pend {
            return Ok(true);
        }
        let Some(records) = self.records.as_mut() else {
            return Ok(false);
        };
        loop {
            match records.open(&mut self.cbuf[self.cstart..self.cend])? {
                Opened::NeedMore => return Ok(false),
                Opened::Data { consumed, len } => {
                    self.pstart = self.cstart + HEADER;
                    self.pend = self.pstart + len;
                    self.cstart += consumed;
                    self.counters.opened += len as u64;
                    if len > 0 {
                        return Ok(true);
                    }
                }
                Opened::Control { consumed } => self.cstart += consumed,
                Opened::Closed { consumed } => {
                    self.cstart += consumed;
                    self.closed = true;
                    return Ok(false);
                }
            }
        }
    }

    /// Decrypted bytes into `buf` (handshake frames); `None` when none are ready
    /// (`Some(0)`: the peer closed).
    pub(crate) fn read_plain(&mut self, buf: &mut [u8]) -> Result<Option<usize>, TlsError> {
        if self.fill_plain()? {
            return Ok(Some(self.copy_plain(buf)));
        }
        Ok(self.closed.then_some(0))
    }

    /// Copies opened plaintext into `dst`.
    fn copy_plain(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.pend - self.pstart);
        dst[..n].copy_from_slice(&self.cbuf[self.pstart..self.pstart + n]);
        self.pstart += n;
        self.counters.copied += n as u64;
        n
    }

    /// Copies opened plaintext into the concatenation of `dst` from byte `skip`.
    fn copy_plain_guest(&mut self, dst: &[GuestSlice], skip: usize) -> usize {
        let want = dst.iter().map(GuestSlice::len).sum::<usize>() - skip;
        let n = want.min(self.pend - self.pstart);
        copy_to_guest(dst, skip, &self.cbuf[self.pstart..self.pstart + n]);
        self.pstart += n;
        self.counters.copied += n as u64;
        n
    }

    /// Appends the records to send to `out`.
    pub(crate) fn write_to_vec(&mut self, out: &mut Vec<u8>) {
        self.pull_handshake_output();
        out.append(&mut self.out);
    }

    /// The records to send, taken (an io_uring send keeps them until it completes);
    /// `next` (emptied) receives the records sealed from now on, so that a buffer whose
    /// send completed is sealed into again rather than a new one allocated.
    pub(crate) fn take_records(&mut self, mut next: Vec<u8>) -> Vec<u8> {
        next.clear();
        std::mem::replace(&mut self.out, next)
    }

    /// Writes the records to send to `w`.
    pub(crate) fn write_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        self.pull_handshake_output();
        let r = w.write_all(&self.out);
        self.out.clear();
        r
    }

    /// Seals `plain` (handshake frames): copied once into the records to send.
    pub(crate) fn seal_bytes(&mut self, plain: &[u8]) -> Result<(), TlsError> {
        let records = self.records.as_mut().ok_or_else(not_ready)?;
        records.seal(plain, &mut self.out)?;
        self.counters.sealed += plain.len() as u64;
        self.counters.copied += plain.len() as u64;
        Ok(())
    }

    /// Seals a frame: its header and payload slices, in order, each copied once into
    /// the records to send and sealed there.
    pub(crate) fn seal_frame(&mut self, frame: &OutFrame) -> Result<(), ChannelError> {
        let need = frame.wire_len() + (frame.wire_len() / record::MAX_PLAIN + 2) * 22;
        if self.out.capacity() - self.out.len() < need {
            self.counters.send_buffer_allocations += 1;
        }
        self.out.reserve(need);
        self.seal_bytes(&frame.header).map_err(ChannelError::Tls)?;
        for p in frame.payload.iter().filter(|p| !p.is_empty()) {
            self.seal_bytes(payload_bytes(p))
                .map_err(ChannelError::Tls)?;
        }
        Ok(())
    }

    /// Queues `close_notify`.
    pub(crate) fn close(&mut self) -> Result<(), TlsError> {
        let records = self.records.as_mut().ok_or_else(not_ready)?;
        records.close_notify(&mut self.out)
    }
}

/// The bytes of a payload slice, to be sealed.
fn payload_bytes(p: &Payload) -> &[u8] {
    // SAFETY: the payload owns or borrows memory that stays mapped and readable while
    // the frame is being sent (a pool buffer, a vector, a `Bytes`, an `Owned` under
    // `StableBytes`'s contract, or guest memory under `GuestMemory::new`'s contract). Guest pages may change under a running
    // guest while they are copied into the record; each byte is read once, like the
    // kernel's copy of a plaintext send, and a page changed meanwhile is dirty and
    // sent again.
    unsafe { std::slice::from_raw_parts(p.as_ptr(), p.len()) }
}

/// A [`ByteSource`] that reads TLS records from `inner` into the session's buffer,
/// opens them in place and hands out their plaintext.
pub(crate) struct TlsSource<'a, S> {
    pub(crate) inner: &'a mut S,
    pub(crate) tls: &'a mut TlsSession,
}

impl<S: ByteSource> TlsSource<'_, S> {
    /// Opens records, reading more ciphertext as needed, until plaintext is there;
    /// `false` at the peer's `close_notify`.
    fn ready(&mut self) -> Result<bool, ChannelError> {
        loop {
            if self.tls.fill_plain().map_err(ChannelError::Tls)? {
                return Ok(true);
            }
            if self.tls.closed {
                return Ok(false);
            }
            self.tls.grow();
            let n = self.inner.read(self.tls.spare())?;
            if n == 0 {
                return Err(ChannelError::TlsTruncated);
            }
            self.tls.cend += n;
        }
    }
}

impl<S: ByteSource> ByteSource for TlsSource<'_, S> {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        if !self.ready()? {
            return Ok(0);
        }
        Ok(self.tls.copy_plain(dst))
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        if !self.ready()? {
            return Ok(0);
        }
        Ok(self.tls.copy_plain_guest(dst, skip))
    }

    fn frame_len(&mut self, len: usize) {
        self.inner.frame_len(len);
    }
}
