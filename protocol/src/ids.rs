//! Newtypes for every number that crosses the wire.
//!
//! Code points (frame types, codec ids, reason codes...) are *open* newtypes: any
//! value decodes, known values have named constants and print by name, unknown ones
//! print as `Codec(0x2a)`. Whether an unknown value is acceptable is decided by the
//! code that uses it, never by a panic.

use core::fmt;

/// Declares an open code-point newtype with named constants.
macro_rules! code_point {
    (
        $(#[$meta:meta])*
        $name:ident($repr:ty), $label:literal {
            $( $(#[$cmeta:meta])* $const:ident = $value:literal => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $repr);

        impl $name {
            $( $(#[$cmeta])* pub const $const: Self = Self($value); )*

            /// Every value this version of the crate knows by name.
            pub const KNOWN: &'static [Self] = &[$(Self::$const),*];

            /// The constant's name when the value is known.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($text), )*
                    _ => None,
                }
            }

            /// Whether this version of the crate knows the value.
            pub fn is_known(self) -> bool {
                self.name().is_some()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, concat!($label, "({:#x})"), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

code_point! {
    /// The type byte of a frame's envelope. Types `0x80..=0xff` are extension frames
    /// that a receiver which does not know them skips by length; an unknown type below
    /// `0x80` is an error.
    FrameType(u8), "FrameType" {
        /// Client's opening handshake message.
        HELLO = 0x01 => "HELLO",
        /// Server's acceptance with the negotiated parameters.
        WELCOME = 0x02 => "WELCOME",
        /// Refusal of a handshake, with the reason and what the sender supports.
        REJECT = 0x03 => "REJECT",
        /// Client's acceptance of the WELCOME, with its proof when authenticating.
        CONFIRM = 0x04 => "CONFIRM",
        /// Server's confirmation that the channel may carry pages.
        READY = 0x05 => "READY",
        /// Guest memory layout.
        LAYOUT = 0x10 => "LAYOUT",
        /// Guest pages.
        PAGES = 0x11 => "PAGES",
        /// End of a round on one channel.
        END_OF_ROUND = 0x12 => "END_OF_ROUND",
        /// Acknowledgement from the destination.
        ACK = 0x13 => "ACK",
        /// A chunk of a named device-state section.
        DEVICE_STATE = 0x14 => "DEVICE_STATE",
        /// The source has sent everything.
        COMPLETE = 0x15 => "COMPLETE",
        /// Either side gives up, with a reason.
        ABORT = 0x16 => "ABORT",
        /// The source hands the guest over: the destination may run it.
        COMMIT = 0x17 => "COMMIT",
        /// Pages whose content equals pages sent earlier on the channel, by reference.
        COPY = 0x18 => "COPY",
    }
}

impl FrameType {
    /// Whether a receiver that does not know this type may skip it by length.
    pub fn is_skippable(self) -> bool {
        self.0 & 0x80 != 0
    }
}

code_point! {
    /// The format of a page frame's payload: which decoder the receiver must use.
    /// A format names bytes, not a device: deflate written by IAA hardware and deflate
    /// written by software decode the same way.
    ///
    /// Ids `0xf000..=0xffff` are reserved for private, unregistered formats.
    CodecId(u16), "Codec" {
        /// Pages as they are in memory, `page_size` bytes each.
        RAW = 0x0001 => "raw",
        /// Frame of zero pages only: no data pages and no payload.
        ZERO = 0x0002 => "zero",
        /// One zstd frame (RFC 8878) for the whole payload, no dictionary.
        ZSTD = 0x0003 => "zstd",
        /// One LZ4 block (no frame header) for the whole payload.
        LZ4 = 0x0004 => "lz4",
        /// Raw deflate (RFC 1951), one independent stream per page; per-page lengths.
        DEFLATE = 0x0005 => "deflate",
        /// XBZRLE-style delta of each page against the version the receiver holds;
        /// per-page lengths.
        DELTA = 0x0006 => "delta",
        /// Raw deflate like [`CodecId::DEFLATE`], with every back-reference at most
        /// 4096 bytes long: the history an Intel IAA keeps, so a receiver's IAA may
        /// inflate it (a plain deflate frame may need a 32 KiB window).
        DEFLATE_4K = 0x0007 => "deflate-4k",
    }
}

code_point! {
    /// A checksum algorithm a side can verify.
    ChecksumId(u8), "Checksum" {
        /// CRC32C (Castagnoli) over a page frame's payload.
        CRC32C = 0x01 => "crc32c",
    }
}

code_point! {
    /// An authentication method a side can perform.
    AuthMethod(u8), "Auth" {
        /// Challenge-response with HMAC-SHA256 keyed by a pre-shared session key.
        HMAC_SHA256 = 0x01 => "hmac-sha256",
        /// HMAC-SHA256 challenge-response whose proofs also cover the channel's TLS
        /// exporter value (PROTOCOL.md, "Channel binding"); offered only inside TLS.
        HMAC_SHA256_TLS_EXPORTER = 0x02 => "hmac-sha256-tls-exporter",
    }
}

code_point! {
    /// Why a handshake was refused.
    RejectReason(u16), "RejectReason" {
        /// The two version ranges do not overlap.
        UNSUPPORTED_VERSION = 0x0001 => "unsupported version",
        /// The page sizes differ.
        PAGE_SIZE_MISMATCH = 0x0002 => "page size mismatch",
        /// The two sides share no usable codec (raw is mandatory).
        NO_COMMON_CODEC = 0x0003 => "no common codec",
        /// This side requires authentication and the peer offered none it can do.
        AUTH_REQUIRED = 0x0004 => "authentication required",
        /// The peer's proof did not verify.
        AUTH_FAILED = 0x0005 => "authentication failed",
        /// The session id is not one this side expects.
        UNKNOWN_SESSION = 0x0006 => "unknown session",
        /// The channel index or count is invalid or already in use.
        BAD_CHANNEL = 0x0007 => "bad channel",
        /// A handshake field is out of range (limits, sizes).
        BAD_PARAMETERS = 0x0008 => "bad parameters",
        /// The peer sent something the handshake cannot accept.
        PROTOCOL_ERROR = 0x0009 => "protocol error",
        /// The peer does not authenticate but this side requires it.
        PEER_NOT_AUTHENTICATED = 0x000a => "peer does not authenticate",
        /// This side requires TLS and the peer spoke plaintext (sent in clear, before
        /// any TLS; PROTOCOL.md, "TLS").
        ENCRYPTION_REQUIRED = 0x000b => "encryption required",
        /// The peer opened TLS and this side is configured for plaintext (sent in
        /// clear, in answer to the TLS ClientHello).
        ENCRYPTION_UNSUPPORTED = 0x000c => "encryption unsupported",
    }
}

code_point! {
    /// Why a migration was aborted.
    AbortReason(u16), "AbortReason" {
        /// Cancelled by the VMM or the operator.
        CANCELLED = 0x0001 => "cancelled",
        /// A frame failed to decode or apply.
        BAD_FRAME = 0x0002 => "bad frame",
        /// A channel failed.
        CHANNEL_FAILED = 0x0003 => "channel failed",
        /// The destination could not apply a page or section.
        APPLY_FAILED = 0x0004 => "apply failed",
        /// An internal error.
        INTERNAL = 0x0005 => "internal error",
        /// A time limit was exceeded.
        TIMEOUT = 0x0006 => "timeout",
    }
}

code_point! {
    /// What an acknowledgement acknowledges.
    AckKind(u8), "AckKind" {
        /// Every page frame of every round up to and including `value` is applied.
        ROUND = 0x01 => "round",
        /// `value` page frames received on this channel have been applied (cumulative).
        FRAMES = 0x02 => "frames",
        /// The whole migration, ending at round `value`, is applied; the destination
        /// waits for COMMIT before it runs the guest.
        COMPLETE = 0x03 => "complete",
        /// COMMIT for final round `value` arrived: the destination owns the guest.
        COMMITTED = 0x04 => "committed",
    }
}

/// Declares a transparent numeric newtype for ids, addresses and counts.
macro_rules! number {
    ($(#[$meta:meta])* $name:ident($repr:ty)) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $repr);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

number!(
    /// A protocol version.
    Version(u16)
);
number!(
    /// A guest memory region's id, unique within a session.
    RegionId(u32)
);
number!(
    /// A channel's index within its session, `0..channel_count`.
    ChannelId(u16)
);
number!(
    /// A pre-copy round. Round numbers only grow within a session.
    Round(u32)
);
number!(
    /// A page's index within its region, in units of the session's page size.
    PageIndex(u64)
);
number!(
    /// A guest physical address.
    GuestAddr(u64)
);

/// A session id: 16 bytes chosen by the source, the same on every channel of a session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_code_points_print_as_numbers() {
        assert_eq!(format!("{:?}", CodecId(0x2a)), "Codec(0x2a)");
        assert_eq!(format!("{:?}", CodecId::ZSTD), "zstd");
        assert_eq!(format!("{}", FrameType(0x7e)), "FrameType(0x7e)");
        assert!(!CodecId(0x2a).is_known());
        assert!(FrameType(0x80).is_skippable());
        assert!(!FrameType::PAGES.is_skippable());
        assert_eq!(format!("{:?}", RegionId(3)), "RegionId(3)");
    }
}
