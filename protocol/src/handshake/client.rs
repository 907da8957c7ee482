//! The source side of the handshake: HELLO out, WELCOME in, CONFIRM out, READY in.

use crate::error::DecodeError;
use hmac::Mac;

use crate::frame::{Confirm, Frame, Hello, NONCE_LEN, Welcome};
use crate::ids::{ChannelId, ChecksumId, CodecId, SessionId};
use crate::limits::{CodecSet, Limits, min_frame_bytes};
use crate::stream::FrameDecoder;
use crate::wire::WireList;

use super::{
    Authentication, ChannelBinding, ClientConfig, Common, DESTINATION_LABEL, HandshakeError,
    Negotiated, SOURCE_LABEL, auth_methods, drive, keyed_method,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    AwaitWelcome,
    AwaitReady,
    Done,
}

/// The source's handshake on one channel.
#[derive(Debug)]
pub struct ClientHandshake {
    common: Common,
    decoder: FrameDecoder,
    session: SessionId,
    channel: ChannelId,
    channel_count: u16,
    require: CodecSet,
    hello: Vec<u8>,
    state: ClientState,
    negotiated: Option<Negotiated>,
}

impl ClientHandshake {
    /// Starts a handshake; HELLO is queued at once.
    ///
    /// # Errors
    /// `Config` when the configuration is invalid.
    pub fn new(config: ClientConfig, nonce: [u8; NONCE_LEN]) -> Result<Self, HandshakeError> {
        Self::with_binding(config, nonce, None)
    }

    /// Starts a handshake on a channel inside TLS whose exporter value is `binding`
    /// (`None`: as [`Self::new`]); with a pre-shared key, HELLO offers only
    /// `hmac-sha256-tls-exporter`.
    ///
    /// # Errors
    /// `Config` when the configuration is invalid.
    pub fn with_binding(
        config: ClientConfig,
        nonce: [u8; NONCE_LEN],
        binding: Option<ChannelBinding>,
    ) -> Result<Self, HandshakeError> {
        if config.channel_count == 0 || config.channel.0 >= config.channel_count {
            return Err(HandshakeError::Config("channel must be < channel_count"));
        }
        // With a key, the nonce's second half is its HELLO key tag.
        let nonce = match &config.auth {
            Authentication::PreSharedKey(key) => {
                key.tag_hello_nonce(config.session, config.channel, config.channel_count, nonce)
            }
            Authentication::None => nonce,
        };
        let mut common = Common::new(config.caps, config.auth, nonce)?;
        common.binding = binding;
        let caps = common.caps;
        let hello = Hello {
            version_min: caps.versions.0,
            version_max: caps.versions.1,
            session: config.session,
            channel: config.channel,
            channel_count: config.channel_count,
            page_size: caps.page_size,
            max_pages: caps.max_pages,
            max_frame_bytes: caps.max_frame_bytes,
            nonce,
            codecs: WireList::Slice(caps.codecs.as_slice()),
            checksums: WireList::Slice(caps.checksums()),
            auth: WireList::Slice(auth_methods(&common.auth, binding.is_some())),
        };
        let mut body = Vec::new();
        hello
            .encode_body(&mut body)
            .map_err(|_| HandshakeError::Config("too many codecs"))?;
        common.send(&Frame::Hello(hello));
        Ok(Self {
            common,
            decoder: FrameDecoder::new(Limits::handshake()),
            session: config.session,
            channel: config.channel,
            channel_count: config.channel_count,
            require: config.require,
            hello: body,
            state: ClientState::AwaitWelcome,
            negotiated: None,
        })
    }

    /// Appends the bytes to send to `out`.
    pub fn take_output(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.common.out);
    }

    /// Whether bytes are waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.common.out.is_empty()
    }

    /// Whether the channel is open for pages.
    pub fn is_done(&self) -> bool {
        self.state == ClientState::Done
    }

    /// The agreed parameters, once done (they are final only when READY arrives).
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref().filter(|_| self.is_done())
    }

    /// The message of the peer's REJECT, if it sent one.
    pub fn peer_message(&self) -> Option<&str> {
        self.common.peer_message.as_deref()
    }

    /// Consumes received bytes; returns how many belong to the handshake (bytes after
    /// its last frame are left to the caller).
    ///
    /// # Errors
    /// Any [`HandshakeError`]; the handshake then stays failed. Send the pending output
    /// (a REJECT) before closing.
    pub fn receive(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
        if self.state == ClientState::Done {
            return Ok(0);
        }
        let Self {
            common,
            decoder,
            session,
            channel,
            channel_count,
            require,
            hello,
            state,
            negotiated,
        } = self;
        drive(decoder, common, input, |common, frame| {
            match (*state, frame) {
                (_, Frame::Reject(r)) => Err(common.rejected(&r)),
                (ClientState::AwaitWelcome, Frame::Welcome(w)) => {
                    let ids = (*session, *channel, *channel_count);
                    let n = check_welcome(common, &w, hello, ids, require)?;
                    *negotiated = Some(n);
                    *state = ClientState::AwaitReady;
                    Ok(false)
                }
                (ClientState::AwaitReady, Frame::Ready) => {
                    *state = ClientState::Done;
                    Ok(true)
                }
                (_, f) => Err(DecodeError::UnexpectedFrame(f.frame_type()).into()),
            }
        })
        .inspect_err(|_| *negotiated = None)
    }
}

fn check_welcome(
    common: &mut Common,
    w: &Welcome<'_>,
    hello: &[u8],
    (session, channel, channel_count): (SessionId, ChannelId, u16),
    require: &CodecSet,
) -> Result<Negotiated, HandshakeError> {
    let caps = common.caps;
    let proto = |what| Err(HandshakeError::ProtocolError(what));
    if w.version < caps.versions.0 || w.version > caps.versions.1 {
        return proto("WELCOME chose a version this side did not offer");
    }
    if w.page_size != caps.page_size {
        return Err(HandshakeError::PageSizeMismatch {
            ours: caps.page_size,
            theirs: w.page_size,
        });
    }
    if w.max_pages == 0 || w.max_pages > caps.max_pages {
        return proto("WELCOME max_pages is outside this side's limit");
    }
    if w.max_frame_bytes < min_frame_bytes(caps.page_size)
        || w.max_frame_bytes > caps.max_frame_bytes
    {
        return proto("WELCOME max_frame_bytes is outside this side's limit");
    }
    let mut codecs = CodecSet::empty();
    for c in w.codecs.iter() {
        if !caps.codecs.contains(c) {
            return proto("WELCOME lists a codec this side did not offer");
        }
        codecs.insert(c);
    }
    if !codecs.contains(CodecId::RAW) || !codecs.contains(CodecId::ZERO) {
        return Err(HandshakeError::NoCommonCodec);
    }
    if let Some(&c) = require
        .as_slice()
        .iter()
        .find(|&&c| codecs.sendable_as(c, caps.page_size).is_none())
    {
        return Err(HandshakeError::CodecRequired(c));
    }
    match w.checksum {
        None => {}
        Some(ChecksumId::CRC32C) if caps.checksum => {}
        Some(_) => return proto("WELCOME chose a checksum this side did not offer"),
    }
    let mut welcome = Vec::new();
    if w.encode_body(&mut welcome, false).is_err() {
        return proto("WELCOME does not re-encode");
    }
    let binding = common.binding;
    let proof = match (common.auth.key(), w.auth, w.proof) {
        (None, None, _) => None,
        (None, Some(_), _) => return proto("WELCOME chose authentication this side did not offer"),
        (Some(_), None, _) => return Err(HandshakeError::PeerNotAuthenticated),
        (Some(key), Some(m), Some(proof_d)) if m == keyed_method(binding.as_ref()) => {
            if key
                .proof(DESTINATION_LABEL, binding.as_ref(), hello, &welcome)
                .verify_slice(&proof_d)
                .is_err()
            {
                return Err(HandshakeError::AuthFailed);
            }
            let proof_s: [u8; NONCE_LEN] = key
                .proof(SOURCE_LABEL, binding.as_ref(), hello, &welcome)
                .finalize()
                .into_bytes()
                .into();
            Some(proof_s)
        }
        (Some(_), Some(_), _) => {
            return proto("WELCOME chose an authentication method this side did not offer");
        }
    };
    common.send(&Frame::Confirm(Confirm { proof }));
    Ok(Negotiated {
        version: w.version,
        session,
        channel,
        channel_count,
        page_size: w.page_size,
        max_pages: w.max_pages,
        max_frame_bytes: w.max_frame_bytes,
        codecs,
        checksum: w.checksum,
        auth: w.auth,
    })
}
