//! The channel handshake as two sans-IO state machines.
//!
//! The caller moves bytes: it sends what [`ClientHandshake::take_output`] hands it,
//! feeds what it receives to [`ClientHandshake::receive`], and stops when the handshake
//! is done or has failed. After a failure it still sends the pending output (a REJECT
//! telling the peer why) and then closes the channel. Randomness comes in as an
//! argument: the nonce must be fresh random bytes for every channel.
//!
//! ```
//! use pagewire_protocol::handshake::*;
//! use pagewire_protocol::{ChannelId, CodecSet, SessionId};
//!
//! let key = SessionKey::new(*b"a pre-shared key of 32 bytes....").unwrap();
//! let caps = Capabilities::new(4096);
//! let session = SessionId([7; 16]);
//! let mut client = ClientHandshake::new(
//!     ClientConfig { caps, session, channel: ChannelId(0), channel_count: 1,
//!                    auth: Authentication::PreSharedKey(key.clone()),
//!                    require: CodecSet::empty() },
//!     [1; 32],
//! ).unwrap();
//! let mut server = ServerHandshake::new(
//!     ServerConfig { caps, session: Some(session),
//!                    auth: Authentication::PreSharedKey(key) },
//!     [2; 32],
//! ).unwrap();
//!
//! let mut wire = Vec::new();
//! while !(client.is_done() && server.is_done()) {
//!     client.take_output(&mut wire);
//!     server.receive(&wire).unwrap();
//!     wire.clear();
//!     server.take_output(&mut wire);
//!     client.receive(&wire).unwrap();
//!     wire.clear();
//! }
//! assert_eq!(client.negotiated(), server.negotiated());
//! ```

use core::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::DecodeError;
use crate::frame::{Frame, Hello, NONCE_LEN, Reject};
use crate::ids::{AuthMethod, ChannelId, ChecksumId, CodecId, RejectReason, SessionId, Version};
use crate::limits::{
    CodecSet, Limits, MAX_FRAME_BYTES, MAX_PAGES_PER_FRAME, SUPPORTED_VERSIONS, min_frame_bytes,
    valid_page_size,
};
use crate::stream::FrameDecoder;
use crate::wire::WireList;

type HmacSha256 = Hmac<Sha256>;

const DESTINATION_LABEL: &[u8] = b"pagewire v1 destination proof";
const SOURCE_LABEL: &[u8] = b"pagewire v1 source proof";
const HELLO_TAG_LABEL: &[u8] = b"pagewire v1 hello tag";

/// Bytes of a HELLO nonce that are random when it carries a key tag; the tag fills
/// the rest ([`SessionKey::tag_hello_nonce`]).
pub const HELLO_TAG_RANDOM: usize = NONCE_LEN - HELLO_TAG_LEN;
/// Bytes of a HELLO key tag: the last of the nonce.
pub const HELLO_TAG_LEN: usize = 16;

/// A pre-shared session key. Its bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(Vec<u8>);

impl SessionKey {
    /// The shortest key accepted.
    pub const MIN_LEN: usize = 16;

    /// A key of at least [`Self::MIN_LEN`] bytes.
    ///
    /// # Errors
    /// `Config` when the key is too short.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, HandshakeError> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_LEN {
            return Err(HandshakeError::Config(
                "a session key must be at least 16 bytes",
            ));
        }
        Ok(Self(bytes))
    }

    /// The proof's MAC: `HMAC(key, label || binding || hello || welcome)`, where
    /// `binding` is the channel's TLS exporter value (32 bytes) for
    /// `hmac-sha256-tls-exporter` and empty for `hmac-sha256`.
    fn proof(
        &self,
        label: &[u8],
        binding: Option<&ChannelBinding>,
        hello: &[u8],
        welcome: &[u8],
    ) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(label);
        if let Some(b) = binding {
            mac.update(&b.0);
        }
        mac.update(hello);
        mac.update(welcome);
        mac
    }
}

impl SessionKey {
    /// The HELLO key tag (PROTOCOL.md, "HELLO key tag"): the first 16 bytes of
    /// `HMAC(key, "pagewire v1 hello tag" || session || channel || channel_count ||
    /// random)`, the integers little-endian, `random` the nonce's first 16 bytes.
    fn hello_tag(
        &self,
        session: SessionId,
        channel: ChannelId,
        channel_count: u16,
        random: &[u8],
    ) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(HELLO_TAG_LABEL);
        mac.update(&session.0);
        mac.update(&channel.0.to_le_bytes());
        mac.update(&channel_count.to_le_bytes());
        mac.update(random);
        mac
    }

    /// `nonce` with its last [`HELLO_TAG_LEN`] bytes replaced by the HELLO key tag of
    /// its first [`HELLO_TAG_RANDOM`] (which stay random): what a source with this key
    /// sends in HELLO, so that a destination with the key can tell, before any round
    /// trip, a HELLO from a holder of the key from one of a peer that only knows the
    /// session id ([`Self::tags_hello`]). [`ClientHandshake`] does this itself.
    pub fn tag_hello_nonce(
        &self,
        session: SessionId,
        channel: ChannelId,
        channel_count: u16,
        mut nonce: [u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        let (random, tag) = nonce.split_at_mut(HELLO_TAG_RANDOM);
        let mac = self.hello_tag(session, channel, channel_count, random);
        tag.copy_from_slice(&mac.finalize().into_bytes()[..HELLO_TAG_LEN]);
        nonce
    }

    /// Whether `hello`'s nonce carries this key's HELLO key tag (compared in constant
    /// time). Only a hint for admitting connections: a HELLO is authenticated by the
    /// proofs that follow, and a tag seen on the wire can be replayed.
    pub fn tags_hello(&self, hello: &Hello<'_>) -> bool {
        let (random, tag) = hello.nonce.split_at(HELLO_TAG_RANDOM);
        self.hello_tag(hello.session, hello.channel, hello.channel_count, random)
            .verify_truncated_left(tag)
            .is_ok()
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// A value both ends of one secure channel computed and nobody else can: the TLS
/// exporter (RFC 8446 §7.5) with label [`ChannelBinding::TLS_EXPORTER_LABEL`], an
/// empty context and 32 bytes of output. Given to
/// [`ClientHandshake::with_binding`] / [`ServerHandshake::with_binding`] on a channel
/// inside TLS, it turns authentication with a pre-shared key into
/// `hmac-sha256-tls-exporter`, whose proofs cover it: a proof made inside one TLS
/// session does not verify inside another, so a relay cannot splice two of them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding(pub [u8; 32]);

impl ChannelBinding {
    /// The TLS exporter label (PROTOCOL.md, "Channel binding").
    pub const TLS_EXPORTER_LABEL: &'static [u8] = b"EXPORTER-pagewire-channel-binding";
}

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChannelBinding(<redacted>)")
    }
}

/// Whether a side authenticates. There is deliberately no default: a listener without
/// authentication must say `Authentication::None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// No authentication: anyone who can connect can write guest memory. Only for
    /// trusted networks and tests.
    None,
    /// Require the peer to prove knowledge of this key (HMAC-SHA256 challenge-response).
    PreSharedKey(SessionKey),
}

impl Authentication {
    fn key(&self) -> Option<&SessionKey> {
        match self {
            Self::None => None,
            Self::PreSharedKey(k) => Some(k),
        }
    }
}

/// What one side can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Versions spoken, `(min, max)`; within [`SUPPORTED_VERSIONS`].
    pub versions: (Version, Version),
    /// Transfer page size.
    pub page_size: u32,
    /// Most pages per PAGES frame.
    pub max_pages: u32,
    /// Largest frame accepted.
    pub max_frame_bytes: u32,
    /// Codecs this side can decode; must include raw and zero.
    pub codecs: CodecSet,
    /// Whether this side supports CRC32C on page payloads.
    pub checksum: bool,
}

impl Capabilities {
    /// Defaults for a page size: every supported version, 128 pages and 4 MiB per frame,
    /// every known codec, no checksum.
    pub fn new(page_size: u32) -> Self {
        Self {
            versions: SUPPORTED_VERSIONS,
            page_size,
            max_pages: 128,
            max_frame_bytes: 4 << 20,
            codecs: CodecSet::all_known(),
            checksum: false,
        }
    }

    fn validate(&self) -> Result<(), HandshakeError> {
        let (min, max) = self.versions;
        if min > max || min < SUPPORTED_VERSIONS.0 || max > SUPPORTED_VERSIONS.1 {
            return Err(HandshakeError::Config(
                "versions must be a range within SUPPORTED_VERSIONS",
            ));
        }
        if !valid_page_size(self.page_size) {
            return Err(HandshakeError::Config(
                "page size must be a power of two from 4 KiB to 2 MiB",
            ));
        }
        if !(1..=MAX_PAGES_PER_FRAME).contains(&self.max_pages) {
            return Err(HandshakeError::Config("max_pages must be 1..=65536"));
        }
        if !(min_frame_bytes(self.page_size)..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(HandshakeError::Config(
                "max_frame_bytes must be page size + 1024 ..= 64 MiB",
            ));
        }
        if !self.codecs.contains(CodecId::RAW) || !self.codecs.contains(CodecId::ZERO) {
            return Err(HandshakeError::Config("codecs must include raw and zero"));
        }
        Ok(())
    }

    fn checksums(&self) -> &'static [ChecksumId] {
        if self.checksum {
            &[ChecksumId::CRC32C]
        } else {
            &[]
        }
    }
}

/// The authentication methods a side offers: none without a key; with a key,
/// `hmac-sha256` on a plain channel and only `hmac-sha256-tls-exporter` on a channel
/// bound to TLS (a keyed side inside TLS requires the binding).
pub fn auth_methods(auth: &Authentication, bound: bool) -> &'static [AuthMethod] {
    match (auth, bound) {
        (Authentication::None, _) => &[],
        (Authentication::PreSharedKey(_), false) => &[AuthMethod::HMAC_SHA256],
        (Authentication::PreSharedKey(_), true) => &[AuthMethod::HMAC_SHA256_TLS_EXPORTER],
    }
}

/// Appends a REJECT with `reason` and `message` (cut to 255 bytes) that describes a
/// side with `caps` and `auth` (`bound`: on a channel bound to TLS), for refusals made
/// outside a handshake machine: a listener's channel limit, or a connection that
/// spoke plaintext to a side that requires TLS and the reverse
/// ([`RejectReason::ENCRYPTION_REQUIRED`], [`RejectReason::ENCRYPTION_UNSUPPORTED`]).
pub fn encode_reject(
    caps: &Capabilities,
    auth: &Authentication,
    bound: bool,
    reason: RejectReason,
    message: &str,
    out: &mut Vec<u8>,
) {
    let reject = Frame::Reject(Reject {
        reason,
        version_min: caps.versions.0,
        version_max: caps.versions.1,
        page_size: caps.page_size,
        codecs: WireList::Slice(caps.codecs.as_slice()),
        checksums: WireList::Slice(caps.checksums()),
        auth: WireList::Slice(auth_methods(auth, bound)),
        message: truncate_utf8(message, 255),
    });
    // A REJECT within these limits always encodes; were it not to, the peer sees a close.
    let _ = reject.encode(out);
}

/// The method a keyed side uses, bound to TLS or not.
fn keyed_method(binding: Option<&ChannelBinding>) -> AuthMethod {
    if binding.is_some() {
        AuthMethod::HMAC_SHA256_TLS_EXPORTER
    } else {
        AuthMethod::HMAC_SHA256
    }
}

/// The source's side of a channel.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// What the source can do.
    pub caps: Capabilities,
    /// The session this channel belongs to.
    pub session: SessionId,
    /// This channel's index.
    pub channel: ChannelId,
    /// Channels in the session.
    pub channel_count: u16,
    /// Authentication.
    pub auth: Authentication,
    /// Codecs the WELCOME must list besides `raw` and `zero`: those the source is
    /// configured to send with no other choice. A WELCOME without one of them is
    /// refused with REJECT `NO_COMMON_CODEC` instead of CONFIRM
    /// ([`HandshakeError::CodecRequired`]), so the destination learns why before the
    /// session starts. `deflate` at 4 KiB pages is satisfied by `deflate-4k` too
    /// ([`CodecSet::sendable_as`]). Empty: any WELCOME list with `raw` and `zero` will
    /// do.
    pub require: CodecSet,
}

/// The destination's side of a channel.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// What the destination can do.
    pub caps: Capabilities,
    /// The session expected, or `None` to accept any (the caller then sorts channels by
    /// [`Negotiated::session`]).
    pub session: Option<SessionId>,
    /// Authentication.
    pub auth: Authentication,
}

/// The parameters both sides agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol version.
    pub version: Version,
    /// Session id.
    pub session: SessionId,
    /// This channel.
    pub channel: ChannelId,
    /// Channels in the session.
    pub channel_count: u16,
    /// Transfer page size.
    pub page_size: u32,
    /// Most pages per frame.
    pub max_pages: u32,
    /// Frame limit.
    pub max_frame_bytes: u32,
    /// Codecs either side may send.
    pub codecs: CodecSet,
    /// Checksum carried by every PAGES frame.
    pub checksum: Option<ChecksumId>,
    /// Authentication performed.
    pub auth: Option<AuthMethod>,
}

impl Negotiated {
    /// The decoder limits for the rest of the channel.
    pub fn limits(&self) -> Limits {
        Limits {
            phase: crate::limits::Phase::Session,
            max_frame_bytes: self.max_frame_bytes,
            page_size: self.page_size,
            max_pages: self.max_pages,
            codecs: self.codecs,
            checksum: self.checksum,
        }
    }
}

/// Why a handshake failed.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// A handshake frame did not decode.
    #[error("handshake frame rejected: {0}")]
    Decode(#[from] DecodeError),
    /// The peer sent REJECT.
    #[error(
        "peer refused the handshake: {reason} (peer speaks versions {version_min}..={version_max}, page size {page_size})"
    )]
    Rejected {
        /// The peer's reason.
        reason: RejectReason,
        /// The peer's lowest version.
        version_min: Version,
        /// The peer's highest version.
        version_max: Version,
        /// The peer's page size.
        page_size: u32,
    },
    /// No version in common.
    #[error(
        "no common protocol version: this side speaks {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}"
    )]
    VersionMismatch {
        /// Our lowest.
        ours_min: Version,
        /// Our highest.
        ours_max: Version,
        /// The peer's lowest.
        theirs_min: Version,
        /// The peer's highest.
        theirs_max: Version,
    },
    /// Different page sizes.
    #[error("page size mismatch: this side uses {ours}, the peer {theirs}")]
    PageSizeMismatch {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The codec intersection lacks raw or zero.
    #[error("no common codec: both sides must decode raw and zero")]
    NoCommonCodec,
    /// The WELCOME lacks a codec this source is configured to send with no other
    /// choice ([`ClientConfig::require`]).
    #[error(
        "the destination does not decode {0:?}, the only codec this source is configured to send"
    )]
    CodecRequired(CodecId),
    /// This side requires authentication and the peer offered none.
    #[error(
        "the peer offers no authentication method this side can do, and this side requires \
         a pre-shared key (hmac-sha256 on a plaintext channel, hmac-sha256-tls-exporter \
         inside TLS)"
    )]
    AuthRequired,
    /// This side has a key and the peer did not authenticate.
    #[error("the peer does not authenticate; configure the same pre-shared key on both sides")]
    PeerNotAuthenticated,
    /// A proof did not verify.
    #[error("authentication failed: the peer's proof does not match (different keys?)")]
    AuthFailed,
    /// The session id is not the one expected.
    #[error("unknown session {0:?}")]
    UnknownSession(SessionId),
    /// Invalid channel index or count.
    #[error("bad channel {channel:?} of {count}")]
    BadChannel {
        /// The index.
        channel: ChannelId,
        /// The count.
        count: u16,
    },
    /// A channel valid on its own that its session refuses (sent as `BAD_CHANNEL`).
    #[error("channel {channel} of {count} refused: {why}")]
    ChannelRefused {
        /// The index.
        channel: u16,
        /// The count.
        count: u16,
        /// Why: another channel holds the index, or the session's count differs.
        why: &'static str,
    },
    /// A handshake value is out of range.
    #[error("bad handshake parameter: {0}")]
    BadParameters(&'static str),
    /// The peer broke the handshake's rules.
    #[error("handshake protocol error: {0}")]
    ProtocolError(&'static str),
    /// This side's configuration is invalid.
    #[error("invalid handshake configuration: {0}")]
    Config(&'static str),
}

impl HandshakeError {
    /// The reason code to send the peer for a failure found on this side, if any.
    fn reject_reason(&self) -> Option<RejectReason> {
        Some(match self {
            Self::Rejected { .. } | Self::Config(_) => return None,
            Self::Decode(_) | Self::ProtocolError(_) => RejectReason::PROTOCOL_ERROR,
            Self::VersionMismatch { .. } => RejectReason::UNSUPPORTED_VERSION,
            Self::PageSizeMismatch { .. } => RejectReason::PAGE_SIZE_MISMATCH,
            Self::NoCommonCodec | Self::CodecRequired(_) => RejectReason::NO_COMMON_CODEC,
            Self::AuthRequired => RejectReason::AUTH_REQUIRED,
            Self::PeerNotAuthenticated => RejectReason::PEER_NOT_AUTHENTICATED,
            Self::AuthFailed => RejectReason::AUTH_FAILED,
            Self::UnknownSession(_) => RejectReason::UNKNOWN_SESSION,
            Self::BadChannel { .. } | Self::ChannelRefused { .. } => RejectReason::BAD_CHANNEL,
            Self::BadParameters(_) => RejectReason::BAD_PARAMETERS,
        })
    }
}

/// What both state machines share: framing, output, failure.
#[derive(Debug)]
struct Common {
    caps: Capabilities,
    auth: Authentication,
    binding: Option<ChannelBinding>,
    nonce: [u8; NONCE_LEN],
    out: Vec<u8>,
    failed: Option<HandshakeError>,
    peer_message: Option<String>,
}

impl Common {
    fn new(
        caps: Capabilities,
        auth: Authentication,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, HandshakeError> {
        caps.validate()?;
        Ok(Self {
            caps,
            auth,
            binding: None,
            nonce,
            out: Vec::new(),
            failed: None,
            peer_message: None,
        })
    }

    fn send(&mut self, frame: &Frame<'_>) {
        // Handshake frames built here are far below every field's limit.
        if frame.encode(&mut self.out).is_err() {
            unreachable!("handshake frame too large to encode");
        }
    }

    /// Records a failure and queues a REJECT for the peer when the failure is ours to
    /// report.
    fn fail(&mut self, e: HandshakeError) -> HandshakeError {
        if let Some(reason) = e.reject_reason() {
            let message = e.to_string();
            let bound = self.binding.is_some();
            encode_reject(
                &self.caps,
                &self.auth,
                bound,
                reason,
                &message,
                &mut self.out,
            );
        }
        self.failed = Some(e);
        e
    }

    fn rejected(&mut self, r: &Reject<'_>) -> HandshakeError {
        self.peer_message = Some(r.message.to_owned());
        let e = HandshakeError::Rejected {
            reason: r.reason,
            version_min: r.version_min,
            version_max: r.version_max,
            page_size: r.page_size,
        };
        self.failed = Some(e);
        e
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Feeds `input` to `decoder` one frame at a time, handing each frame to `on_frame`
/// until `done()` says the handshake needs no more; returns the bytes consumed, so
/// bytes after the handshake stay with the caller.
fn drive(
    decoder: &mut FrameDecoder,
    common: &mut Common,
    input: &[u8],
    mut on_frame: impl FnMut(&mut Common, Frame<'_>) -> Result<bool, HandshakeError>,
) -> Result<usize, HandshakeError> {
    if let Some(e) = common.failed {
        return Err(e);
    }
    let mut used = 0;
    while used < input.len() {
        let (n, frame) = match decoder.decode(&input[used..]) {
            Ok(x) => x,
            Err(e) => return Err(common.fail(e.into())),
        };
        used += n;
        if let Some(frame) = frame {
            match on_frame(common, frame) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    if common.failed.is_none() {
                        return Err(common.fail(e));
                    }
                    return Err(e);
                }
            }
        }
    }
    Ok(used)
}

mod client;
mod server;

pub use client::ClientHandshake;
pub use server::ServerHandshake;
