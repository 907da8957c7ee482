//! The decoder's error type.

use core::fmt;

use crate::ids::{CodecId, FrameType, RegionId};

/// What was wrong with bytes received from a peer.
///
/// Small and `Copy`, so it can be returned from hot paths and stored in statistics.
/// Every variant names the field or rule that failed.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A field reaches past the end of the frame body that holds it.
    Truncated {
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the body.
        have: usize,
    },
    /// The frame's stated length exceeds the frame limit in force.
    FrameTooLarge {
        /// Length of the whole frame, envelope included.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// HELLO did not start with `PAGEWIRE`.
    BadMagic,
    /// A frame type below `0x80` that this version does not know.
    UnknownFrameType(FrameType),
    /// A known frame arrived where the protocol does not allow it.
    UnexpectedFrame(FrameType),
    /// Flag bits this frame type does not define.
    UnknownFlags {
        /// The frame's type.
        frame: FrameType,
        /// The flags byte.
        flags: u8,
    },
    /// A reserved field is not zero.
    ReservedNotZero {
        /// Which field.
        field: &'static str,
    },
    /// Bytes left after the last field of a frame.
    TrailingBytes {
        /// The frame's type.
        frame: FrameType,
        /// How many bytes were left.
        extra: usize,
    },
    /// A field's value is outside what the protocol allows.
    InvalidField {
        /// Which field.
        field: &'static str,
        /// The value, widened.
        value: u64,
    },
    /// Two lengths that must agree do not.
    LengthMismatch {
        /// What was compared.
        field: &'static str,
        /// The length the rest of the frame implies.
        expected: u64,
        /// The length found.
        actual: u64,
    },
    /// Page runs of one list are not ascending, overlap or touch, or a page is in two
    /// lists.
    RunsNotCanonical {
        /// Which list: `data runs`, `zero runs`, `uniform runs`, `copy runs`, or the
        /// lists together.
        list: &'static str,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The frame carries more pages than negotiated (or none).
    PageCount {
        /// Pages in the frame.
        pages: u64,
        /// The negotiated maximum.
        max: u32,
    },
    /// The per-page flag does not fit the codec, or the frame has data runs for a
    /// codec without a payload or none for a codec with one.
    LayoutMismatch {
        /// The frame's codec.
        codec: CodecId,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The codec is not one both sides negotiated.
    CodecNotNegotiated(CodecId),
    /// Checksums were negotiated and the frame carries none.
    ChecksumMissing,
    /// The frame carries a checksum that was not negotiated.
    ChecksumNotNegotiated,
    /// The payload's CRC32C does not match.
    ChecksumMismatch {
        /// The CRC the frame states.
        expected: u32,
        /// The CRC of the payload received.
        actual: u32,
    },
    /// A region id appears twice in a layout, or regions overlap.
    LayoutConflict,
    /// A frame names a region the layout does not have.
    UnknownRegion(RegionId),
    /// A page lies outside its region.
    PageOutOfRange {
        /// The region.
        region: RegionId,
        /// One past the highest page the frame names.
        end: u64,
        /// Pages in the region.
        pages: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { need, have } => {
                write!(f, "frame truncated: field needs {need} bytes, {have} left")
            }
            Self::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            Self::BadMagic => f.write_str("bad magic: the peer does not speak pagewire"),
            Self::UnknownFrameType(t) => write!(f, "unknown frame type {t}"),
            Self::UnexpectedFrame(t) => write!(f, "frame {t} not allowed here"),
            Self::UnknownFlags { frame, flags } => {
                write!(
                    f,
                    "flags {flags:#04x} on {frame} set bits this frame type does not define"
                )
            }
            Self::ReservedNotZero { field } => write!(f, "reserved field {field} is not zero"),
            Self::TrailingBytes { frame, extra } => {
                write!(f, "{extra} bytes left over after the last field of {frame}")
            }
            Self::InvalidField { field, value } => write!(f, "invalid {field}: {value}"),
            Self::LengthMismatch {
                field,
                expected,
                actual,
            } => write!(f, "{field}: expected {expected} bytes, found {actual}"),
            Self::RunsNotCanonical { list, rule } => {
                write!(f, "page runs not canonical: {list}: {rule}")
            }
            Self::PageCount { pages, max } => {
                write!(f, "frame carries {pages} pages, allowed 1..={max}")
            }
            Self::LayoutMismatch { codec, rule } => {
                write!(f, "frame does not fit codec {codec}: {rule}")
            }
            Self::CodecNotNegotiated(c) => write!(f, "codec {c} was not negotiated"),
            Self::ChecksumMissing => f.write_str("checksum negotiated but frame carries none"),
            Self::ChecksumNotNegotiated => {
                f.write_str("frame carries a checksum that was not negotiated")
            }
            Self::ChecksumMismatch { expected, actual } => write!(
                f,
                "frame CRC32C mismatch: frame says {expected:#010x}, its bytes have {actual:#010x}"
            ),
            Self::LayoutConflict => {
                f.write_str("memory layout has a duplicate region id or overlapping regions")
            }
            Self::UnknownRegion(r) => write!(f, "{r:?} is not in the memory layout"),
            Self::PageOutOfRange { region, end, pages } => write!(
                f,
                "frame names pages up to {end} of {region:?}, which has {pages} pages"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}
