//! Frames: the envelope, every frame type, and their encoding and decoding.
//!
//! Decoding borrows from the bytes it is given (lists, names and payloads are slices of
//! the frame); encoding appends to a caller-owned `Vec<u8>`.

use crate::copy::CopyFrame;
use crate::ids::{
    AbortReason, AckKind, AuthMethod, ChannelId, ChecksumId, CodecId, FrameType, RejectReason,
    Round, SessionId, Version,
};
pub use crate::pages::{PAGES_FIXED_LEN, PageFrame, pages_crc_seed};
use crate::wire::{RegionDesc, WireList};

mod decode;
mod encode;
mod envelope;

pub(crate) use decode::check_region;
pub(crate) use envelope::flags_only;
pub use envelope::{Envelope, FLAG_CRC32C, FLAG_PER_PAGE};

/// The size of a HELLO/WELCOME/CONFIRM nonce or proof.
pub const NONCE_LEN: usize = 32;

/// HELLO: the source's opening message on every channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Lowest version the source speaks.
    pub version_min: Version,
    /// Highest version the source speaks.
    pub version_max: Version,
    /// Session id.
    pub session: SessionId,
    /// This channel's index.
    pub channel: ChannelId,
    /// Channels in the session.
    pub channel_count: u16,
    /// Transfer page size.
    pub page_size: u32,
    /// Most pages per PAGES frame.
    pub max_pages: u32,
    /// Largest frame the source accepts.
    pub max_frame_bytes: u32,
    /// Fresh random bytes.
    pub nonce: [u8; NONCE_LEN],
    /// Codecs the source can decode.
    pub codecs: WireList<'a, CodecId>,
    /// Checksums the source supports.
    pub checksums: WireList<'a, ChecksumId>,
    /// Authentication methods the source can perform.
    pub auth: WireList<'a, AuthMethod>,
}

/// WELCOME: the destination accepts and states the negotiated parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome<'a> {
    /// The chosen version.
    pub version: Version,
    /// Transfer page size (equal to the HELLO's).
    pub page_size: u32,
    /// Negotiated most pages per frame.
    pub max_pages: u32,
    /// Negotiated frame limit.
    pub max_frame_bytes: u32,
    /// Fresh random bytes from the destination.
    pub nonce: [u8; NONCE_LEN],
    /// Codecs both sides decode.
    pub codecs: WireList<'a, CodecId>,
    /// Chosen checksum.
    pub checksum: Option<ChecksumId>,
    /// Chosen authentication method.
    pub auth: Option<AuthMethod>,
    /// The destination's proof, present exactly when `auth` is.
    pub proof: Option<[u8; NONCE_LEN]>,
}

/// REJECT: a handshake refused, with the reason and what the sender supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject<'a> {
    /// Why.
    pub reason: RejectReason,
    /// The sender's lowest version.
    pub version_min: Version,
    /// The sender's highest version.
    pub version_max: Version,
    /// The sender's page size.
    pub page_size: u32,
    /// Codecs the sender decodes.
    pub codecs: WireList<'a, CodecId>,
    /// Checksums the sender supports.
    pub checksums: WireList<'a, ChecksumId>,
    /// Authentication methods the sender can perform.
    pub auth: WireList<'a, AuthMethod>,
    /// Human-readable detail.
    pub message: &'a str,
}

/// CONFIRM: the source accepts the WELCOME, with its proof when authentication was
/// negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// The source's proof.
    pub proof: Option<[u8; NONCE_LEN]>,
}

/// LAYOUT: the guest memory regions and the page-to-channel affinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutFrame<'a> {
    /// Pages per affinity chunk, ≥ 1: chunk `c` of region `r` travels on channel
    /// `(c + r) % channel_count` (see `PROTOCOL.md`, "Channel affinity").
    pub chunk_pages: u32,
    /// The regions, as sent.
    pub regions: WireList<'a, RegionDesc>,
}

/// END_OF_ROUND: one channel's last frame of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndOfRound {
    /// The round that ended.
    pub round: Round,
    /// PAGES and COPY frames this channel sent in the round.
    pub frames: u32,
    /// Pages in those frames: data, zero and uniform pages of PAGES, target pages of
    /// COPY.
    pub pages: u64,
}

/// ACK: what the destination has applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// What is acknowledged.
    pub kind: AckKind,
    /// Round number or frame count, per `kind`.
    pub value: u64,
}

/// DEVICE_STATE: a chunk of a named device-state section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// Instance number.
    pub instance: u32,
    /// Section name, 1..=255 bytes of UTF-8.
    pub name: &'a str,
    /// The section's full length.
    pub total: u64,
    /// Where this chunk starts.
    pub offset: u64,
    /// The chunk.
    pub data: &'a [u8],
}

/// COMPLETE: the source has sent everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Complete {
    /// The last round.
    pub final_round: Round,
    /// Device-state sections sent.
    pub sections: u32,
}

/// COMMIT: the source hands the guest over to the destination (after ACK COMPLETE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The final round, as in COMPLETE and its ACK.
    pub final_round: Round,
}

/// ABORT: the migration is abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort<'a> {
    /// Why.
    pub reason: AbortReason,
    /// Human-readable detail.
    pub message: &'a str,
}

/// Any frame.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// HELLO.
    Hello(Hello<'a>),
    /// WELCOME.
    Welcome(Welcome<'a>),
    /// REJECT.
    Reject(Reject<'a>),
    /// CONFIRM.
    Confirm(Confirm),
    /// READY.
    Ready,
    /// LAYOUT.
    Layout(LayoutFrame<'a>),
    /// PAGES.
    Pages(PageFrame<'a>),
    /// END_OF_ROUND.
    EndOfRound(EndOfRound),
    /// ACK.
    Ack(Ack),
    /// DEVICE_STATE.
    DeviceState(DeviceState<'a>),
    /// COMPLETE.
    Complete(Complete),
    /// ABORT.
    Abort(Abort<'a>),
    /// COMMIT.
    Commit(Commit),
    /// COPY.
    Copy(CopyFrame<'a>),
    /// An extension frame (type `0x80..=0xff`) this version does not know: skip it.
    Extension {
        /// Its type.
        frame_type: FrameType,
        /// Its flags.
        flags: u8,
        /// Its body.
        body: &'a [u8],
    },
}

/// How a codec lays out its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadLayout {
    /// No data pages, no payload (`zero`).
    Empty,
    /// One block for the frame.
    Block,
    /// A length table and one entry per data page.
    PerPage,
}

/// The payload layout `PROTOCOL.md` fixes for a codec, `None` for codecs this crate does
/// not know (a private codec may use either).
pub fn payload_layout(codec: CodecId) -> Option<PayloadLayout> {
    match codec {
        CodecId::ZERO => Some(PayloadLayout::Empty),
        CodecId::RAW | CodecId::ZSTD | CodecId::LZ4 => Some(PayloadLayout::Block),
        CodecId::DEFLATE | CodecId::DEFLATE_4K | CodecId::DELTA => Some(PayloadLayout::PerPage),
        _ => None,
    }
}

impl Frame<'_> {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Welcome(_) => FrameType::WELCOME,
            Frame::Reject(_) => FrameType::REJECT,
            Frame::Confirm(_) => FrameType::CONFIRM,
            Frame::Ready => FrameType::READY,
            Frame::Layout(_) => FrameType::LAYOUT,
            Frame::Pages(_) => FrameType::PAGES,
            Frame::EndOfRound(_) => FrameType::END_OF_ROUND,
            Frame::Ack(_) => FrameType::ACK,
            Frame::DeviceState(_) => FrameType::DEVICE_STATE,
            Frame::Complete(_) => FrameType::COMPLETE,
            Frame::Abort(_) => FrameType::ABORT,
            Frame::Commit(_) => FrameType::COMMIT,
            Frame::Copy(_) => FrameType::COPY,
            Frame::Extension { frame_type, .. } => *frame_type,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::DecodeError;
    use crate::ids::{GuestAddr, RegionId};
    use crate::limits::{CodecSet, Limits};

    pub(crate) fn limits() -> Limits {
        Limits::session(4096, 128, 1 << 20, CodecSet::all_known(), None).unwrap()
    }

    pub(crate) fn decode_one<'a>(
        bytes: &'a [u8],
        limits: &Limits,
    ) -> Result<Frame<'a>, DecodeError> {
        let env = Envelope::parse(bytes[..8].try_into().unwrap(), limits)?;
        Frame::decode(env, &bytes[8..], limits)
    }

    pub(crate) fn encode(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        out
    }

    /// A REJECT or ABORT whose message is not UTF-8 is refused, and the error names
    /// the reason code it carried.
    #[test]
    fn a_message_not_utf8_is_refused_naming_the_reason() {
        let l = limits();
        let mut abort = encode(&Frame::Abort(Abort {
            reason: AbortReason::BAD_FRAME,
            message: "ab",
        }));
        *abort.last_mut().unwrap() = 0xff;
        assert_eq!(
            decode_one(&abort, &l),
            Err(DecodeError::InvalidField {
                field: "ABORT message (not UTF-8), whose reason is",
                value: AbortReason::BAD_FRAME.0.into(),
            })
        );
        let hs = Limits::handshake();
        let mut reject = encode(&Frame::Reject(Reject {
            reason: RejectReason::AUTH_FAILED,
            version_min: crate::ids::Version(6),
            version_max: crate::ids::Version(6),
            page_size: 4096,
            codecs: WireList::Slice(&[]),
            checksums: WireList::Slice(&[]),
            auth: WireList::Slice(&[]),
            message: "ab",
        }));
        *reject.last_mut().unwrap() = 0xc3;
        let e = decode_one(&reject, &hs).unwrap_err();
        assert_eq!(
            e,
            DecodeError::InvalidField {
                field: "REJECT message (not UTF-8), whose reason is",
                value: RejectReason::AUTH_FAILED.0.into(),
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                "invalid REJECT message (not UTF-8), whose reason is: {}",
                RejectReason::AUTH_FAILED.0
            )
        );
    }

    #[test]
    fn phase_and_unknown_types() {
        let l = limits();
        let ready = encode(&Frame::Ready);
        assert_eq!(
            decode_one(&ready, &l),
            Err(DecodeError::UnexpectedFrame(FrameType::READY))
        );
        assert_eq!(decode_one(&ready, &Limits::handshake()), Ok(Frame::Ready));
        let unknown = [0x40, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_one(&unknown, &l),
            Err(DecodeError::UnknownFrameType(FrameType(0x40)))
        );
        let ext = [0x90, 3, 0, 0, 2, 0, 0, 0, 0xaa, 0xbb];
        assert_eq!(
            decode_one(&ext, &l),
            Ok(Frame::Extension {
                frame_type: FrameType(0x90),
                flags: 3,
                body: &[0xaa, 0xbb]
            })
        );
        let big = [FrameType::ACK.0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_one(&big, &l),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_reserved_fields_are_errors() {
        let l = limits();
        let mut bytes = encode(&Frame::Complete(Complete {
            final_round: Round(3),
            sections: 1,
        }));
        bytes.push(0);
        bytes[4] += 1;
        assert_eq!(
            decode_one(&bytes, &l),
            Err(DecodeError::TrailingBytes {
                frame: FrameType::COMPLETE,
                extra: 1
            })
        );
        let mut ack = encode(&Frame::Ack(Ack {
            kind: AckKind::ROUND,
            value: 1,
        }));
        ack[9] = 1;
        assert!(matches!(
            decode_one(&ack, &l),
            Err(DecodeError::ReservedNotZero { .. })
        ));
    }

    #[test]
    fn layout_regions_are_checked() {
        let l = limits();
        let good = [RegionDesc {
            id: RegionId(0),
            backing_page_size: 2 << 20,
            guest_addr: GuestAddr(1 << 30),
            length: 1 << 30,
        }];
        let f = Frame::Layout(LayoutFrame {
            chunk_pages: 128,
            regions: (&good).into(),
        });
        assert_eq!(decode_one(&encode(&f), &l), Ok(f));
        let bad = [RegionDesc {
            length: 100,
            ..good[0]
        }];
        let f = Frame::Layout(LayoutFrame {
            chunk_pages: 128,
            regions: (&bad).into(),
        });
        assert!(decode_one(&encode(&f), &l).is_err());
    }

    #[test]
    fn device_state_bounds() {
        let l = limits();
        let f = Frame::DeviceState(DeviceState {
            instance: 0,
            name: "virtio-net",
            total: 4,
            offset: 2,
            data: &[1, 2, 3],
        });
        assert!(matches!(
            decode_one(&encode(&f), &l),
            Err(DecodeError::InvalidField { .. })
        ));
    }
}
