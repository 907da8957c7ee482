//! The destination side of the handshake: HELLO in, WELCOME out, CONFIRM in, READY out.

use crate::error::DecodeError;
use hmac::Mac;

use crate::frame::{Frame, Hello, NONCE_LEN, Welcome};
use crate::ids::{ChecksumId, CodecId, SessionId};
use crate::limits::{
    CodecSet, Limits, MAX_FRAME_BYTES, MAX_PAGES_PER_FRAME, min_frame_bytes, valid_page_size,
};
use crate::stream::FrameDecoder;
use crate::wire::WireList;

use super::{
    ChannelBinding, Common, DESTINATION_LABEL, HandshakeError, Negotiated, SOURCE_LABEL,
    ServerConfig, drive, keyed_method,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    AwaitHello,
    AwaitConfirm,
    /// CONFIRM verified; READY waits for [`ServerHandshake::admit`] (only with
    /// [`ServerHandshake::hold_ready`]).
    Confirmed,
    Done,
}

/// The destination's handshake on one accepted channel.
#[derive(Debug)]
pub struct ServerHandshake {
    common: Common,
    decoder: FrameDecoder,
    expected_session: Option<SessionId>,
    /// HELLO body and WELCOME body without proof: what the source proves.
    transcript: (Vec<u8>, Vec<u8>),
    state: ServerState,
    pending: Option<Negotiated>,
    negotiated: Option<Negotiated>,
    /// Whether READY waits for [`Self::admit`].
    hold: bool,
}

impl ServerHandshake {
    /// Waits for a HELLO.
    ///
    /// # Errors
    /// `Config` when the configuration is invalid.
    pub fn new(config: ServerConfig, nonce: [u8; NONCE_LEN]) -> Result<Self, HandshakeError> {
        Self::with_binding(config, nonce, None)
    }

    /// Waits for a HELLO on a channel inside TLS whose exporter value is `binding`
    /// (`None`: as [`Self::new`]); with a pre-shared key, only
    /// `hmac-sha256-tls-exporter` is accepted.
    ///
    /// # Errors
    /// `Config` when the configuration is invalid.
    pub fn with_binding(
        config: ServerConfig,
        nonce: [u8; NONCE_LEN],
        binding: Option<ChannelBinding>,
    ) -> Result<Self, HandshakeError> {
        let mut common = Common::new(config.caps, config.auth, nonce)?;
        common.binding = binding;
        Ok(Self {
            common,
            decoder: FrameDecoder::new(Limits::handshake()),
            expected_session: config.session,
            transcript: (Vec::new(), Vec::new()),
            state: ServerState::AwaitHello,
            pending: None,
            negotiated: None,
            hold: false,
        })
    }

    /// Holds READY back after a valid CONFIRM: the handshake then stops with
    /// [`Self::confirmed`] set, and the caller either admits the channel
    /// ([`Self::admit`], which queues READY) or refuses it ([`Self::refuse`], which
    /// queues a REJECT). A destination uses it to check what one channel cannot know
    /// alone, such as another channel of the session holding the same index, before
    /// it answers READY.
    #[must_use]
    pub fn hold_ready(mut self) -> Self {
        self.hold = true;
        self
    }

    /// The parameters of a channel whose CONFIRM verified and whose READY is held
    /// ([`Self::hold_ready`]); `None` before, and once admitted or refused.
    pub fn confirmed(&self) -> Option<&Negotiated> {
        match self.state {
            ServerState::Confirmed => self.pending.as_ref(),
            _ => None,
        }
    }

    /// Queues READY for a [`Self::confirmed`] channel: the handshake is done. Does
    /// nothing in any other state.
    pub fn admit(&mut self) {
        if self.state != ServerState::Confirmed {
            return;
        }
        self.common.send(&Frame::Ready);
        self.negotiated = self.pending.take();
        self.state = ServerState::Done;
    }

    /// Refuses a [`Self::confirmed`] channel for `e`: queues a REJECT with its reason
    /// code (a [`HandshakeError::ChannelRefused`] is sent as `BAD_CHANNEL`) and fails
    /// the handshake. Returns `e`. In any other state than confirmed it only returns
    /// `e`, and the handshake is unchanged.
    pub fn refuse(&mut self, e: HandshakeError) -> HandshakeError {
        if self.state != ServerState::Confirmed {
            return e;
        }
        self.pending = None;
        self.state = ServerState::AwaitHello;
        self.common.fail(e)
    }

    /// Appends the bytes to send to `out`.
    pub fn take_output(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.common.out);
    }

    /// Whether bytes are waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.common.out.is_empty()
    }

    /// Whether the channel is open for pages (READY is queued).
    pub fn is_done(&self) -> bool {
        self.state == ServerState::Done
    }

    /// The agreed parameters, once done.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The message of the peer's REJECT, if it sent one.
    pub fn peer_message(&self) -> Option<&str> {
        self.common.peer_message.as_deref()
    }

    /// Consumes received bytes; returns how many belong to the handshake.
    ///
    /// # Errors
    /// Any [`HandshakeError`]; the handshake then stays failed. Send the pending output
    /// (a REJECT) before closing.
    pub fn receive(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
        if matches!(self.state, ServerState::Done | ServerState::Confirmed) {
            return Ok(0);
        }
        let Self {
            common,
            decoder,
            expected_session,
            transcript,
            state,
            pending,
            negotiated,
            hold,
        } = self;
        drive(decoder, common, input, |common, frame| {
            match (*state, frame) {
                (_, Frame::Reject(r)) => Err(common.rejected(&r)),
                (ServerState::AwaitHello, Frame::Hello(h)) => {
                    *pending = Some(answer_hello(common, &h, *expected_session, transcript)?);
                    *state = ServerState::AwaitConfirm;
                    Ok(false)
                }
                (ServerState::AwaitConfirm, Frame::Confirm(c)) => {
                    let n = pending
                        .take()
                        .ok_or(HandshakeError::ProtocolError("CONFIRM before WELCOME"))?;
                    let held = *hold;
                    match (common.auth.key(), c.proof) {
                        (None, None) => {}
                        (None, Some(_)) => {
                            return Err(HandshakeError::ProtocolError(
                                "CONFIRM carries a proof that was not negotiated",
                            ));
                        }
                        (Some(_), None) => return Err(HandshakeError::AuthFailed),
                        (Some(key), Some(proof_s)) => {
                            let (hello, welcome) = transcript;
                            if key
                                .proof(SOURCE_LABEL, common.binding.as_ref(), hello, welcome)
                                .verify_slice(&proof_s)
                                .is_err()
                            {
                                return Err(HandshakeError::AuthFailed);
                            }
                        }
                    }
                    if held {
                        *pending = Some(n);
                        *state = ServerState::Confirmed;
                    } else {
                        common.send(&Frame::Ready);
                        *negotiated = Some(n);
                        *state = ServerState::Done;
                    }
                    Ok(true)
                }
                (_, f) => Err(DecodeError::UnexpectedFrame(f.frame_type()).into()),
            }
        })
    }
}

fn answer_hello(
    common: &mut Common,
    h: &Hello<'_>,
    expected_session: Option<SessionId>,
    transcript: &mut (Vec<u8>, Vec<u8>),
) -> Result<Negotiated, HandshakeError> {
    let caps = common.caps;
    if h.version_min.0 == 0 || h.version_min > h.version_max {
        return Err(HandshakeError::BadParameters(
            "HELLO version range is empty",
        ));
    }
    let lo = caps.versions.0.max(h.version_min);
    let hi = caps.versions.1.min(h.version_max);
    if lo > hi {
        return Err(HandshakeError::VersionMismatch {
            ours_min: caps.versions.0,
            ours_max: caps.versions.1,
            theirs_min: h.version_min,
            theirs_max: h.version_max,
        });
    }
    if expected_session.is_some_and(|s| s != h.session) {
        return Err(HandshakeError::UnknownSession(h.session));
    }
    if h.channel_count == 0 || h.channel.0 >= h.channel_count {
        return Err(HandshakeError::BadChannel {
            channel: h.channel,
            count: h.channel_count,
        });
    }
    if !valid_page_size(h.page_size) {
        return Err(HandshakeError::BadParameters("HELLO page size"));
    }
    if h.page_size != caps.page_size {
        return Err(HandshakeError::PageSizeMismatch {
            ours: caps.page_size,
            theirs: h.page_size,
        });
    }
    if !(1..=MAX_PAGES_PER_FRAME).contains(&h.max_pages) {
        return Err(HandshakeError::BadParameters("HELLO max_pages"));
    }
    if !(min_frame_bytes(h.page_size)..=MAX_FRAME_BYTES).contains(&h.max_frame_bytes) {
        return Err(HandshakeError::BadParameters("HELLO max_frame_bytes"));
    }
    let mut codecs = CodecSet::empty();
    for c in h.codecs.iter() {
        if caps.codecs.contains(c) {
            codecs.insert(c);
        }
    }
    if !codecs.contains(CodecId::RAW) || !codecs.contains(CodecId::ZERO) {
        return Err(HandshakeError::NoCommonCodec);
    }
    let checksum =
        (caps.checksum && h.checksums.contains(ChecksumId::CRC32C)).then_some(ChecksumId::CRC32C);
    let key = common.auth.key().cloned();
    let method = keyed_method(common.binding.as_ref());
    let auth = match &key {
        None => None,
        Some(_) if h.auth.contains(method) => Some(method),
        Some(_) => return Err(HandshakeError::AuthRequired),
    };
    let mut welcome = Welcome {
        version: hi,
        page_size: caps.page_size,
        max_pages: caps.max_pages.min(h.max_pages),
        max_frame_bytes: caps.max_frame_bytes.min(h.max_frame_bytes),
        nonce: common.nonce,
        codecs: WireList::Slice(codecs.as_slice()),
        checksum,
        auth,
        proof: None,
    };
    let (hello_body, welcome_body) = transcript;
    hello_body.clear();
    welcome_body.clear();
    if Frame::Hello(*h).encode(hello_body).is_err() {
        return Err(HandshakeError::ProtocolError("HELLO does not re-encode"));
    }
    // Keep only the body: the transcript covers bodies, not envelopes.
    hello_body.drain(..crate::frame::Envelope::LEN);
    if welcome.encode_body(welcome_body, false).is_err() {
        unreachable!("WELCOME within field limits");
    }
    if let Some(key) = &key {
        welcome.proof = Some(
            key.proof(
                DESTINATION_LABEL,
                common.binding.as_ref(),
                hello_body,
                welcome_body,
            )
            .finalize()
            .into_bytes()
            .into(),
        );
    }
    common.send(&Frame::Welcome(welcome));
    Ok(Negotiated {
        version: hi,
        session: h.session,
        channel: h.channel,
        channel_count: h.channel_count,
        page_size: welcome.page_size,
        max_pages: welcome.max_pages,
        max_frame_bytes: welcome.max_frame_bytes,
        codecs,
        checksum,
        auth,
    })
}
