//! The RDMA binding's own messages (`PROTOCOL.md`, "RDMA binding"): what travels on an
//! RDMA channel beside the frame stream, told apart by a SEND's immediate data
//! ([`RdmaMsg`]).
//!
//! - [`Advert`]: the source's registered guest memory, sent once after the handshake:
//!   per region its id, remote key, address and length. It allows RDMA READ only: the
//!   destination's memory is never open to remote access.
//! - [`ReadPages`]: a raw PAGES frame whose payload the destination fetches itself
//!   with RDMA READs from the source segments it lists, into the pages the frame's
//!   header names (and nowhere else).
//! - [`Done`]: the destination read a [`ReadPages`] frame; the source may reuse its
//!   payload.
//!
//! Sans-IO like the rest of the crate: encoders append to a `Vec`, decoders check every
//! length against what they were given and never allocate from a peer's count beyond
//! what the message can hold.

use core::fmt;

use crate::error::DecodeError;
use crate::ids::RegionId;
use crate::wire::{EncodeError, Reader, put_u16, put_u32, put_u64};

/// The kind of an RDMA message: the immediate data of its SEND (an open code point).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdmaMsg(pub u32);

impl RdmaMsg {
    /// A slice of the frame stream (the handshake, and every frame not sent by READ).
    pub const STREAM: RdmaMsg = RdmaMsg(0);
    /// A [`ReadPages`] announcement.
    pub const READ_PAGES: RdmaMsg = RdmaMsg(1);
    /// The source's [`Advert`].
    pub const ADVERT: RdmaMsg = RdmaMsg(2);
    /// A clean close: no more messages follow.
    pub const CLOSE: RdmaMsg = RdmaMsg(3);
    /// A [`Done`] acknowledgement.
    pub const DONE: RdmaMsg = RdmaMsg(4);
}

impl fmt::Debug for RdmaMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::STREAM => f.write_str("STREAM"),
            Self::READ_PAGES => f.write_str("READ_PAGES"),
            Self::ADVERT => f.write_str("ADVERT"),
            Self::CLOSE => f.write_str("CLOSE"),
            Self::DONE => f.write_str("DONE"),
            RdmaMsg(n) => write!(f, "RdmaMsg({n:#x})"),
        }
    }
}

/// An address in the source's memory, as the source advertises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceAddr(pub u64);

/// A remote key: what the peer names registered memory with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteKey(pub u32);

/// The source's number for a READ_PAGES frame, echoed in DONE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReadSeq(pub u64);

/// One region of the source's registered memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdvertRegion {
    /// Region id from the layout.
    pub region: RegionId,
    /// Remote key (remote READ access only).
    pub rkey: RemoteKey,
    /// Address of the region's first byte at the source.
    pub addr: SourceAddr,
    /// Length in bytes (at least 1; `addr + len` does not overflow).
    pub len: u64,
}

impl AdvertRegion {
    /// Whether `[addr, addr + len)` lies inside the region.
    pub fn contains(&self, addr: SourceAddr, len: u64) -> bool {
        addr >= self.addr
            && addr
                .0
                .checked_add(len)
                .is_some_and(|end| end <= self.addr.0 + self.len)
    }
}

/// Bytes of one [`AdvertRegion`] on the wire.
pub const ADVERT_REGION_LEN: usize = 24;

/// The source's registered memory (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// The regions, each id at most once.
    pub regions: Vec<AdvertRegion>,
}

impl Advert {
    /// Appends the encoding: a u16 count, then per region id u32, rkey u32, address
    /// u64 and length u64 (little-endian).
    ///
    /// # Errors
    /// [`EncodeError::TooLong`] for more than 65535 regions.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let n = u16::try_from(self.regions.len()).map_err(|_| EncodeError::TooLong {
            field: "advert regions",
            len: self.regions.len(),
            max: usize::from(u16::MAX),
        })?;
        put_u16(out, n);
        for r in &self.regions {
            put_u32(out, r.region.0);
            put_u32(out, r.rkey.0);
            put_u64(out, r.addr.0);
            put_u64(out, r.len);
        }
        Ok(())
    }

    /// Decodes a whole ADVERT message.
    ///
    /// # Errors
    /// [`DecodeError`]: truncated, trailing bytes, an empty or wrapping region, or a
    /// region id given twice.
    pub fn decode(bytes: &[u8]) -> Result<Advert, DecodeError> {
        let mut r = Reader::new(bytes);
        let n = usize::from(r.u16()?);
        // Bounded by the message: `n` items must be there before any is kept.
        let need = n * ADVERT_REGION_LEN;
        if r.remaining() < need {
            return Err(DecodeError::Truncated {
                need,
                have: r.remaining(),
            });
        }
        let mut regions: Vec<AdvertRegion> = Vec::with_capacity(n);
        for _ in 0..n {
            let region = AdvertRegion {
                region: RegionId(r.u32()?),
                rkey: RemoteKey(r.u32()?),
                addr: SourceAddr(r.u64()?),
                len: r.u64()?,
            };
            if region.len == 0 || region.addr.0.checked_add(region.len).is_none() {
                return Err(DecodeError::InvalidField {
                    field: "advert region length",
                    value: region.len,
                });
            }
            if regions.iter().any(|o| o.region == region.region) {
                return Err(DecodeError::LayoutConflict);
            }
            regions.push(region);
        }
        trailing("RDMA ADVERT", r.remaining())?;
        Ok(Advert { regions })
    }
}

/// Source bytes a [`ReadPages`] frame's payload is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Source address.
    pub addr: SourceAddr,
    /// Bytes (at least 1).
    pub len: u32,
}

/// Bytes of one [`Segment`] on the wire.
pub const SEGMENT_LEN: usize = 12;

/// A raw PAGES frame the destination reads itself (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPages<'a> {
    /// The source's number for the frame, returned in [`Done`].
    pub seq: ReadSeq,
    /// Where the payload is at the source, in payload order.
    pub segments: Vec<Segment>,
    /// The frame's envelope and header, without its payload: a raw PAGES frame whose
    /// stated length includes the payload the segments hold.
    pub header: &'a [u8],
}

impl ReadPages<'_> {
    /// Appends the encoding: seq u64, a u16 segment count, per segment address u64 and
    /// length u32, then the frame header bytes to the end of the message.
    ///
    /// # Errors
    /// [`EncodeError::TooLong`] for more than 65535 segments.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let n = u16::try_from(self.segments.len()).map_err(|_| EncodeError::TooLong {
            field: "read segments",
            len: self.segments.len(),
            max: usize::from(u16::MAX),
        })?;
        put_u64(out, self.seq.0);
        put_u16(out, n);
        for s in &self.segments {
            put_u64(out, s.addr.0);
            put_u32(out, s.len);
        }
        out.extend_from_slice(self.header);
        Ok(())
    }

    /// Decodes a whole READ_PAGES message (the header is checked by the frame
    /// decoder, not here).
    ///
    /// # Errors
    /// [`DecodeError`]: truncated, an empty segment, or no header bytes.
    pub fn decode(bytes: &[u8]) -> Result<ReadPages<'_>, DecodeError> {
        let mut r = Reader::new(bytes);
        let seq = ReadSeq(r.u64()?);
        let n = usize::from(r.u16()?);
        let need = n * SEGMENT_LEN;
        if r.remaining() < need {
            return Err(DecodeError::Truncated {
                need,
                have: r.remaining(),
            });
        }
        let mut segments = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Segment {
                addr: SourceAddr(r.u64()?),
                len: r.u32()?,
            };
            if s.len == 0 {
                return Err(DecodeError::InvalidField {
                    field: "read segment length",
                    value: 0,
                });
            }
            segments.push(s);
        }
        let header = r.rest();
        if header.is_empty() {
            return Err(DecodeError::Truncated { need: 1, have: 0 });
        }
        Ok(ReadPages {
            seq,
            segments,
            header,
        })
    }
}

/// The destination read the [`ReadPages`] frame `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The frame's `seq`.
    pub seq: ReadSeq,
}

impl Done {
    /// Appends the encoding: seq u64.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.seq.0);
    }

    /// Decodes a whole DONE message.
    ///
    /// # Errors
    /// [`DecodeError`] unless it is exactly 8 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Done, DecodeError> {
        let mut r = Reader::new(bytes);
        let seq = ReadSeq(r.u64()?);
        trailing("RDMA DONE", r.remaining())?;
        Ok(Done { seq })
    }
}

fn trailing(field: &'static str, extra: usize) -> Result<(), DecodeError> {
    if extra == 0 {
        Ok(())
    } else {
        Err(DecodeError::LengthMismatch {
            field,
            expected: 0,
            actual: extra as u64,
        })
    }
}

/// Decodes any RDMA control message of kind `kind` and re-encodes it, for the fuzz
/// target: a message that decodes must encode back to the same bytes.
pub fn roundtrip(kind: RdmaMsg, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match kind {
        RdmaMsg::ADVERT => Advert::decode(bytes).ok()?.encode(&mut out).ok()?,
        RdmaMsg::READ_PAGES => ReadPages::decode(bytes).ok()?.encode(&mut out).ok()?,
        RdmaMsg::DONE => Done::decode(bytes).ok()?.encode(&mut out),
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adverts_round_trip_and_refuse_bad_regions() {
        let a = Advert {
            regions: vec![
                AdvertRegion {
                    region: RegionId(0),
                    rkey: RemoteKey(0x1234),
                    addr: SourceAddr(0x7f00_0000_0000),
                    len: 1 << 30,
                },
                AdvertRegion {
                    region: RegionId(5),
                    rkey: RemoteKey(9),
                    addr: SourceAddr(0x1000),
                    len: 4096,
                },
            ],
        };
        let mut b = Vec::new();
        a.encode(&mut b).unwrap();
        assert_eq!(b.len(), 2 + 2 * ADVERT_REGION_LEN);
        assert_eq!(Advert::decode(&b).unwrap(), a);
        assert!(matches!(
            Advert::decode(&b[..b.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut extra = b.clone();
        extra.push(0);
        assert!(matches!(
            Advert::decode(&extra),
            Err(DecodeError::LengthMismatch { .. })
        ));
        // A count far beyond the message allocates nothing and fails.
        assert!(matches!(
            Advert::decode(&[0xff, 0xff, 0, 0]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut dup = a.clone();
        dup.regions[1].region = RegionId(0);
        let mut b = Vec::new();
        dup.encode(&mut b).unwrap();
        assert_eq!(Advert::decode(&b), Err(DecodeError::LayoutConflict));
        for bad_len in [0, u64::MAX] {
            let mut bad = a.clone();
            bad.regions[0].len = bad_len;
            let mut b = Vec::new();
            bad.encode(&mut b).unwrap();
            assert!(matches!(
                Advert::decode(&b),
                Err(DecodeError::InvalidField { .. })
            ));
        }
    }

    #[test]
    fn read_pages_and_done_round_trip() {
        let header = [0xaa; 20];
        let m = ReadPages {
            seq: ReadSeq(77),
            segments: vec![
                Segment {
                    addr: SourceAddr(0x5000),
                    len: 8192,
                },
                Segment {
                    addr: SourceAddr(0x9000),
                    len: 4096,
                },
            ],
            header: &header,
        };
        let mut b = Vec::new();
        m.encode(&mut b).unwrap();
        assert_eq!(ReadPages::decode(&b).unwrap(), m);
        assert!(
            ReadPages::decode(&b[..10 + 2 * SEGMENT_LEN]).is_err(),
            "no header"
        );
        let mut zero = b.clone();
        zero[10 + 8..10 + 12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            ReadPages::decode(&zero),
            Err(DecodeError::InvalidField { .. })
        ));
        let mut d = Vec::new();
        Done { seq: ReadSeq(77) }.encode(&mut d);
        assert_eq!(Done::decode(&d), Ok(Done { seq: ReadSeq(77) }));
        assert!(Done::decode(&d[..7]).is_err());
        assert!(Done::decode(&[0; 9]).is_err());
        assert_eq!(roundtrip(RdmaMsg::DONE, &d), Some(d));
        assert_eq!(format!("{:?}", RdmaMsg(0x2a)), "RdmaMsg(0x2a)");
    }

    #[test]
    fn advert_regions_contain_only_their_bytes() {
        let r = AdvertRegion {
            region: RegionId(1),
            rkey: RemoteKey(1),
            addr: SourceAddr(100),
            len: 50,
        };
        assert!(r.contains(SourceAddr(100), 50) && r.contains(SourceAddr(120), 1));
        assert!(
            !r.contains(SourceAddr(99), 2)
                && !r.contains(SourceAddr(149), 2)
                && !r.contains(SourceAddr(u64::MAX), 2)
        );
    }
}
