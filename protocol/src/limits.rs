//! What a receiver accepts: the frame limit, page size and policy in force.

use core::fmt;

use crate::error::DecodeError;
use crate::ids::{ChecksumId, CodecId, Version};

/// The 8 bytes every HELLO starts with.
pub const MAGIC: [u8; 8] = *b"PAGEWIRE";
/// Protocol version 1: no affinity on the wire, a payload-only PAGES checksum. No
/// longer spoken (a destination cannot check channel affinity under it).
pub const VERSION_1: Version = Version(1);
/// Protocol version 2: no ownership hand-over at the end. No longer spoken (a lost ACK
/// COMPLETE lets both hosts run the guest).
pub const VERSION_2: Version = Version(2);
/// Protocol version 3: COMMIT hands the guest over. No longer spoken (version 4 changed
/// frames; the project had not been released under version 3).
pub const VERSION_3: Version = Version(3);
/// Protocol version 4: uniform runs, TLS, the RDMA binding. No longer spoken (version
/// 5 added COPY; the project had not been released under version 4).
pub const VERSION_4: Version = Version(4);
/// Protocol version 5: COPY. No longer spoken (version 6 gave COPY its `copy_flags` and
/// ROUND_END; the project had not been released under version 5).
pub const VERSION_5: Version = Version(5);
/// Protocol version 6, the one `PROTOCOL.md` describes.
pub const VERSION_6: Version = Version(6);
/// The versions this implementation speaks.
pub const SUPPORTED_VERSIONS: (Version, Version) = (VERSION_6, VERSION_6);
/// The frame limit while the handshake runs.
pub const HANDSHAKE_MAX_FRAME: u32 = 4096;
/// Smallest transfer page size.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest transfer page size.
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// The most pages a PAGES frame may ever carry.
pub const MAX_PAGES_PER_FRAME: u32 = 65536;
/// The largest frame limit a side may ask for.
pub const MAX_FRAME_BYTES: u32 = 64 << 20;
/// A frame limit must leave this much room beyond one page.
pub const FRAME_OVERHEAD: u32 = 1024;

/// Whether a page size is acceptable on the wire.
pub fn valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

/// The smallest frame limit a session with this page size may use.
pub fn min_frame_bytes(page_size: u32) -> u32 {
    page_size.saturating_add(FRAME_OVERHEAD)
}

/// Which frames a decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Only HELLO, WELCOME, REJECT, CONFIRM and READY (and extension frames).
    Handshake,
    /// Every frame after the handshake (LAYOUT to COMMIT, and extension frames).
    Session,
}

/// Up to [`CodecSet::CAPACITY`] codec ids, kept sorted and unique. `Copy`, so limits can
/// be handed around freely.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodecSet {
    ids: [CodecId; CodecSet::CAPACITY],
    len: u8,
}

impl CodecSet {
    /// The most codecs a set holds.
    pub const CAPACITY: usize = 32;

    /// The empty set.
    pub const fn empty() -> Self {
        Self {
            ids: [CodecId(0); Self::CAPACITY],
            len: 0,
        }
    }

    /// Every codec this crate knows by name.
    pub fn all_known() -> Self {
        let mut s = Self::empty();
        for &c in CodecId::KNOWN {
            s.insert(c);
        }
        s
    }

    /// A set from a list; `None` when the list holds more than [`Self::CAPACITY`]
    /// distinct ids.
    pub fn from_ids(ids: impl IntoIterator<Item = CodecId>) -> Option<Self> {
        let mut s = Self::empty();
        for c in ids {
            if !s.contains(c) && !s.insert(c) {
                return None;
            }
        }
        Some(s)
    }

    /// Adds a codec; `false` when the set is full.
    pub fn insert(&mut self, id: CodecId) -> bool {
        let len = usize::from(self.len);
        match self.ids[..len].binary_search(&id) {
            Ok(_) => true,
            Err(_) if len == Self::CAPACITY => false,
            Err(pos) => {
                self.ids.copy_within(pos..len, pos + 1);
                self.ids[pos] = id;
                self.len += 1;
                true
            }
        }
    }

    /// Whether the set holds `id`.
    pub fn contains(&self, id: CodecId) -> bool {
        self.as_slice().binary_search(&id).is_ok()
    }

    /// The ids, ascending.
    pub fn as_slice(&self) -> &[CodecId] {
        &self.ids[..usize::from(self.len)]
    }

    /// The id under which frames a sender writes as `codec` go to a receiver that
    /// decodes this set, at `page_size`: `codec` itself when the set holds it; for
    /// `deflate` at 4 KiB pages, `deflate-4k` when the set holds only that (PROTOCOL.md,
    /// Codecs: at 4 KiB pages no page stream reaches back more than 4096 bytes, so
    /// every `deflate` stream is also a `deflate-4k` one); `None` otherwise.
    pub fn sendable_as(&self, codec: CodecId, page_size: u32) -> Option<CodecId> {
        if self.contains(codec) {
            Some(codec)
        } else if codec == CodecId::DEFLATE
            && page_size == 4096
            && self.contains(CodecId::DEFLATE_4K)
        {
            Some(CodecId::DEFLATE_4K)
        } else {
            None
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ids in both sets.
    pub fn intersection(&self, other: &Self) -> Self {
        let mut s = Self::empty();
        for &c in self.as_slice() {
            if other.contains(c) {
                s.insert(c);
            }
        }
        s
    }
}

impl Default for CodecSet {
    fn default() -> Self {
        Self::empty()
    }
}

impl fmt::Debug for CodecSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.as_slice()).finish()
    }
}

/// What a decoder accepts. After the handshake, build it with
/// [`Negotiated::limits`](crate::Negotiated::limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Which frames are allowed.
    pub phase: Phase,
    /// Largest frame, envelope included.
    pub max_frame_bytes: u32,
    /// Transfer page size (0 during the handshake).
    pub page_size: u32,
    /// Most pages in one PAGES frame.
    pub max_pages: u32,
    /// Codecs a PAGES frame may use.
    pub codecs: CodecSet,
    /// The checksum every PAGES frame carries, if one was negotiated.
    pub checksum: Option<ChecksumId>,
}

impl Limits {
    /// The limits in force before and during the handshake.
    pub fn handshake() -> Self {
        Self {
            phase: Phase::Handshake,
            max_frame_bytes: HANDSHAKE_MAX_FRAME,
            page_size: 0,
            max_pages: 0,
            codecs: CodecSet::empty(),
            checksum: None,
        }
    }

    /// Session limits from explicit values, checked as a handshake would check them.
    ///
    /// # Errors
    /// `InvalidField` naming the value out of range.
    pub fn session(
        page_size: u32,
        max_pages: u32,
        max_frame_bytes: u32,
        codecs: CodecSet,
        checksum: Option<ChecksumId>,
    ) -> Result<Self, DecodeError> {
        if !valid_page_size(page_size) {
            return Err(DecodeError::InvalidField {
                field: "page_size",
                value: page_size.into(),
            });
        }
        if !(1..=MAX_PAGES_PER_FRAME).contains(&max_pages) {
            return Err(DecodeError::InvalidField {
                field: "max_pages",
                value: max_pages.into(),
            });
        }
        if !(min_frame_bytes(page_size)..=MAX_FRAME_BYTES).contains(&max_frame_bytes) {
            return Err(DecodeError::InvalidField {
                field: "max_frame_bytes",
                value: max_frame_bytes.into(),
            });
        }
        Ok(Self {
            phase: Phase::Session,
            max_frame_bytes,
            page_size,
            max_pages,
            codecs,
            checksum,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_set_is_sorted_unique_and_bounded() {
        let s = CodecSet::from_ids([CodecId::ZSTD, CodecId::RAW, CodecId::ZSTD]).unwrap();
        assert_eq!(s.as_slice(), &[CodecId::RAW, CodecId::ZSTD]);
        assert!(CodecSet::from_ids((0..33).map(CodecId)).is_none());
        assert!(CodecSet::from_ids((0..32).map(CodecId)).is_some());
        let t = CodecSet::from_ids([CodecId::LZ4, CodecId::ZSTD]).unwrap();
        assert_eq!(s.intersection(&t).as_slice(), &[CodecId::ZSTD]);
    }

    #[test]
    fn session_limits_are_checked() {
        let c = CodecSet::all_known();
        assert!(Limits::session(4096, 128, 1 << 20, c, None).is_ok());
        assert!(Limits::session(4095, 128, 1 << 20, c, None).is_err());
        assert!(Limits::session(4096, 0, 1 << 20, c, None).is_err());
        assert!(Limits::session(4096, 128, 4096, c, None).is_err());
        assert!(Limits::session(4096, 128, MAX_FRAME_BYTES + 1, c, None).is_err());
    }
}
