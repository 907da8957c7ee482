//! COPY (0x18): pages whose content equals pages the source sent earlier on the same
//! channel, sent as references instead of bytes (`PROTOCOL.md`, "COPY"); with
//! [`COPY_ROUND_END`], pages whose content equals what other pages of the region, on any
//! channel, hold at the end of the frame's round.
//!
//! Like PAGES, a decoded COPY frame borrows its runs from the wire ([`WireList`]); the
//! decoder checks every rule of the frame itself (canonical runs, no source page that
//! is also a target, the page count, the checksum), and the session
//! ([`crate::session`]) checks the pages against the layout, the channel affinity and
//! the rounds.

use crate::error::DecodeError;
use crate::frame::{Envelope, FLAG_CRC32C, flags_only};
use crate::ids::{ChecksumId, FrameType, PageIndex, RegionId, Round};
use crate::limits::Limits;
use crate::wire::{
    EncodeError, PageRun, Reader, WireItem, WireList, le, put_count_u16, put_u16, put_u32,
};

/// One copy run: target pages `start..start + count` of the frame's region get the
/// content of pages `from..from + count` of the same region, page by page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyRun {
    /// First target page.
    pub start: PageIndex,
    /// Number of pages, at least 1.
    pub count: u32,
    /// First source page.
    pub from: PageIndex,
}

impl CopyRun {
    /// The pages this run writes.
    pub fn target(&self) -> PageRun {
        PageRun {
            start: self.start,
            count: self.count,
        }
    }

    /// The pages this run reads.
    pub fn source(&self) -> PageRun {
        PageRun {
            start: self.from,
            count: self.count,
        }
    }

    fn bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.start.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..].copy_from_slice(&self.from.0.to_le_bytes());
        b
    }
}

impl WireItem for CopyRun {
    const SIZE: usize = 20;
    fn read(bytes: &[u8]) -> Self {
        CopyRun {
            start: PageIndex(u64::from_le_bytes(le(bytes))),
            count: u32::from_le_bytes(le(&bytes[8..])),
            from: PageIndex(u64::from_le_bytes(le(&bytes[12..]))),
        }
    }
    fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bytes());
    }
}

/// `copy_flags` bit 0: the copy applies at the end of its round, once every channel
/// ended it, and its sources may be pages of any channel (`PROTOCOL.md`, "COPY").
pub const COPY_ROUND_END: u16 = 0x0001;

/// COPY: pages of one region set to the content of other pages of that region: pages this
/// channel sent (PAGES or COPY) earlier, or with [`CopyFrame::round_end`], the content
/// pages of any channel hold at the end of the round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyFrame<'a> {
    /// Region of the target and source pages.
    pub region: RegionId,
    /// Round the target pages belong to.
    pub round: Round,
    /// `ROUND_END` ([`COPY_ROUND_END`]): the destination records the frame and applies it
    /// once every channel ended `round` (or a later round), exclusively; its sources may
    /// belong to any channel. Without it the frame applies in channel order and its
    /// sources are this channel's pages.
    pub round_end: bool,
    /// The copy runs, ascending by target page.
    pub runs: WireList<'a, CopyRun>,
    /// CRC32C of the envelope and the body up to this field (see
    /// [`CopyFrame::with_crc`]).
    pub crc: Option<u32>,
}

/// Bytes of COPY body before the runs: `region`, `round`, `runs`, `copy_flags`.
pub const COPY_FIXED_LEN: usize = 12;

impl CopyFrame<'_> {
    /// The envelope flags this frame is encoded with.
    pub fn flags(&self) -> u8 {
        match self.crc {
            Some(_) => FLAG_CRC32C,
            None => 0,
        }
    }

    /// The `copy_flags` field this frame is encoded with.
    pub fn copy_flags(&self) -> u16 {
        match self.round_end {
            true => COPY_ROUND_END,
            false => 0,
        }
    }

    /// Target pages: the pages this frame writes, as END_OF_ROUND counts them.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.count)).sum()
    }

    /// The target runs, in order.
    pub fn targets(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.runs.iter().map(|r| r.target())
    }

    /// The source runs, in the order of their targets.
    pub fn sources(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.runs.iter().map(|r| r.source())
    }

    /// Every run a region-bounds check walks: the targets, then the sources. (A channel
    /// affinity check walks these without `round_end`, the targets only with it.)
    pub fn all_runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.targets().chain(self.sources())
    }

    /// Every run a channel affinity check walks: the targets and the sources, or with
    /// `round_end` the targets only (the sources of a ROUND_END copy may belong to any
    /// channel).
    pub fn affine_runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        let n = match self.round_end {
            true => self.runs.len(),
            false => 2 * self.runs.len(),
        };
        self.all_runs().take(n)
    }

    /// Bytes of the whole frame, envelope included.
    pub fn frame_len(&self) -> usize {
        Envelope::LEN
            + COPY_FIXED_LEN
            + self.runs.encoded_len()
            + if self.crc.is_some() { 4 } else { 0 }
    }

    /// This frame with `crc` set to the CRC32C of its envelope and body up to the crc
    /// field.
    ///
    /// # Errors
    /// [`EncodeError::TooLong`] when there are more runs than the u16 count carries.
    pub fn with_crc(self) -> Result<Self, EncodeError> {
        let with = CopyFrame {
            crc: Some(0),
            ..self
        };
        let mut head = Vec::with_capacity(Envelope::LEN + COPY_FIXED_LEN);
        with.envelope()?.write(&mut head);
        with.encode_fixed(&mut head)?;
        let mut crc = crc32c::crc32c(&head);
        match self.runs {
            WireList::Wire(bytes) => crc = crc32c::crc32c_append(crc, bytes),
            WireList::Slice(runs) => {
                for run in runs {
                    crc = crc32c::crc32c_append(crc, &run.bytes());
                }
            }
        }
        Ok(CopyFrame {
            crc: Some(crc),
            ..self
        })
    }

    fn envelope(&self) -> Result<Envelope, EncodeError> {
        let body = self.frame_len() - Envelope::LEN;
        Ok(Envelope {
            frame_type: FrameType::COPY,
            flags: self.flags(),
            length: u32::try_from(body).map_err(|_| EncodeError::BodyTooLarge(body))?,
        })
    }

    fn encode_fixed(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        put_u32(out, self.region.0);
        put_u32(out, self.round.0);
        put_count_u16(out, "copy runs", self.runs.len())?;
        put_u16(out, self.copy_flags());
        Ok(())
    }

    /// Appends the body (what follows the envelope).
    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_fixed(out)?;
        self.runs.write(out);
        if let Some(crc) = self.crc {
            put_u32(out, crc);
        }
        Ok(())
    }
}

/// Reads and checks a COPY body (all but leftover bytes, which the caller's
/// `Reader::finish` refuses).
pub(crate) fn decode_copy<'a>(
    env: Envelope,
    r: &mut Reader<'a>,
    limits: &Limits,
) -> Result<CopyFrame<'a>, DecodeError> {
    flags_only(FrameType::COPY, env.flags, FLAG_CRC32C)?;
    let body = r.peek_rest();
    let region = RegionId(r.u32()?);
    let round = Round(r.u32()?);
    let n = r.u16()?;
    let copy_flags = r.u16()?;
    if copy_flags & !COPY_ROUND_END != 0 {
        return Err(DecodeError::InvalidField {
            field: "copy flags",
            value: copy_flags.into(),
        });
    }
    let runs: WireList<'a, CopyRun> = r.list(n.into())?;
    let pages = check_runs(&runs)?;
    if pages > u64::from(limits.max_pages) {
        return Err(DecodeError::PageCount {
            pages,
            max: limits.max_pages,
        });
    }
    let crc = match (env.flags & FLAG_CRC32C != 0, limits.checksum) {
        (true, Some(ChecksumId::CRC32C)) => Some(r.u32()?),
        (true, _) => return Err(DecodeError::ChecksumNotNegotiated),
        (false, Some(_)) => return Err(DecodeError::ChecksumMissing),
        (false, None) => None,
    };
    if let Some(expected) = crc {
        let covered = body.len() - r.remaining() - 4;
        let mut head = [0u8; Envelope::LEN];
        env.write_into(&mut head);
        let actual = crc32c::crc32c_append(crc32c::crc32c(&head), &body[..covered]);
        if actual != expected {
            return Err(DecodeError::ChecksumMismatch { expected, actual });
        }
    }
    Ok(CopyFrame {
        region,
        round,
        round_end: copy_flags & COPY_ROUND_END != 0,
        runs,
        crc,
    })
}

/// Checks the copy runs: at least one; every run non-empty, its target and source ends
/// free of overflow; targets ascending and disjoint, touching only where the sources
/// do not continue (one encoding per copy); no source page among the targets. Returns
/// the number of target pages.
fn check_runs(runs: &WireList<'_, CopyRun>) -> Result<u64, DecodeError> {
    let bad = |rule| DecodeError::RunsNotCanonical {
        list: "copy runs",
        rule,
    };
    if runs.is_empty() {
        return Err(bad("none (a COPY frame has at least one run)"));
    }
    let mut pages = 0u64;
    // The previous run's target end and source end.
    let mut prev: Option<(u64, u64)> = None;
    for run in runs.iter() {
        let (Some(end), Some(from_end)) = (run.target().end(), run.source().end()) else {
            return Err(bad(
                "a target or source run past the last page index (start + count overflows u64)",
            ));
        };
        if run.count == 0 {
            return Err(bad(crate::pages::EMPTY_RUN));
        }
        if let Some((p_end, p_from_end)) = prev {
            if run.start.0 < p_end {
                return Err(bad(
                    "a target run that starts before the previous one's end (targets ascend without overlapping)",
                ));
            }
            if run.start.0 == p_end && run.from.0 == p_from_end {
                return Err(bad(
                    "a run that continues the previous one in both target and source (they must be one run)",
                ));
            }
        }
        prev = Some((end, from_end));
        // At most 65535 runs of u32 pages: the sum cannot overflow.
        pages += u64::from(run.count);
    }
    if runs.iter().any(|run| hits_a_target(runs, run.source())) {
        return Err(bad("a source page that is also a target page"));
    }
    Ok(pages)
}

/// Whether `pages` shares a page with a target of `runs`, whose targets are ascending,
/// disjoint and free of overflow (checked): a binary search for the first target that
/// ends after `pages` starts, no allocation.
fn hits_a_target(runs: &WireList<'_, CopyRun>, pages: PageRun) -> bool {
    let end = pages.end().unwrap_or(u64::MAX);
    let target_end = |i: usize| runs.get(i).and_then(|r| r.target().end());
    let (mut lo, mut hi) = (0, runs.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if target_end(mid).is_some_and(|e| e <= pages.start.0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    runs.get(lo).is_some_and(|t| t.start.0 < end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use crate::limits::CodecSet;

    fn limits(crc: bool) -> Limits {
        let checksum = crc.then_some(ChecksumId::CRC32C);
        Limits::session(4096, 128, 1 << 20, CodecSet::all_known(), checksum).unwrap()
    }

    fn cr(start: u64, count: u32, from: u64) -> CopyRun {
        CopyRun {
            start: PageIndex(start),
            count,
            from: PageIndex(from),
        }
    }

    fn frame(runs: &[CopyRun]) -> CopyFrame<'_> {
        CopyFrame {
            region: RegionId(3),
            round: Round(7),
            round_end: false,
            runs: WireList::Slice(runs),
            crc: None,
        }
    }

    fn encode(f: CopyFrame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        Frame::Copy(f).encode(&mut out).unwrap();
        out
    }

    fn decode<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Frame<'a>, DecodeError> {
        let env = Envelope::parse(bytes[..8].try_into().unwrap(), limits)?;
        Frame::decode(env, &bytes[8..], limits)
    }

    fn check(runs: &[CopyRun]) -> Result<(), DecodeError> {
        decode(&encode(frame(runs)), &limits(false)).map(|_| ())
    }

    #[test]
    fn copy_round_trips_and_borrows_its_runs() {
        let runs = [cr(10, 2, 0), cr(12, 1, 5), cr(40, 3, 0)];
        let f = frame(&runs);
        let bytes = encode(f);
        assert_eq!(bytes.len(), f.frame_len());
        assert_eq!(bytes.len(), Envelope::LEN + COPY_FIXED_LEN + 3 * 20);
        assert_eq!(&bytes[..2], &[FrameType::COPY.0, 0]);
        let back = decode(&bytes, &limits(false)).unwrap();
        assert_eq!(back, Frame::Copy(f));
        let Frame::Copy(c) = back else { unreachable!() };
        assert!(matches!(c.runs, WireList::Wire(w) if w.as_ptr() == bytes[20..].as_ptr()));
        assert_eq!(c.pages(), 6);
        assert_eq!(c.flags(), 0);
        let run = |start, count| PageRun {
            start: PageIndex(start),
            count,
        };
        assert_eq!(
            c.targets().collect::<Vec<_>>(),
            [run(10, 2), run(12, 1), run(40, 3)]
        );
        assert_eq!(
            c.sources().collect::<Vec<_>>(),
            [run(0, 2), run(5, 1), run(0, 3)]
        );
        assert_eq!(c.all_runs().count(), 6);
        assert!(c.affine_runs().eq(c.all_runs()));
        let late = CopyFrame {
            round_end: true,
            ..c
        };
        assert!(late.affine_runs().eq(c.targets()));
    }

    #[test]
    fn round_end_is_bit_0_of_copy_flags_and_round_trips() {
        let runs = [cr(10, 2, 0), cr(40, 1, 900)];
        let plain = frame(&runs);
        let late = CopyFrame {
            round_end: true,
            ..plain
        };
        assert_eq!((plain.copy_flags(), late.copy_flags()), (0, COPY_ROUND_END));
        let (plain_bytes, bytes) = (encode(plain), encode(late));
        // Only the copy_flags field differs; the envelope flags do not carry it.
        assert_eq!(&bytes[18..20], &[1, 0]);
        assert_eq!(&plain_bytes[18..20], &[0, 0]);
        assert_eq!(bytes[..18], plain_bytes[..18]);
        assert_eq!(bytes[20..], plain_bytes[20..]);
        assert_eq!(bytes.len(), late.frame_len());
        assert_eq!(decode(&bytes, &limits(false)), Ok(Frame::Copy(late)));
        assert_eq!(decode(&plain_bytes, &limits(false)), Ok(Frame::Copy(plain)));
        // With a CRC, whose value differs from the plain frame's: it covers the flag.
        let l = limits(true);
        let (late_crc, plain_crc) = (late.with_crc().unwrap(), plain.with_crc().unwrap());
        assert_ne!(late_crc.crc, plain_crc.crc);
        let bytes = encode(late_crc);
        assert_eq!(decode(&bytes, &l), Ok(Frame::Copy(late_crc)));
        // Clearing ROUND_END (bit 0) under the CRC fails the check, and so does setting
        // it on a plain frame.
        for (mut bad, crc) in [(bytes, late_crc.crc), (encode(plain_crc), plain_crc.crc)] {
            bad[18] ^= 1;
            assert!(
                matches!(
                    decode(&bad, &l),
                    Err(DecodeError::ChecksumMismatch { expected, .. }) if Some(expected) == crc
                ),
                "{bad:?}"
            );
        }
        // The decoder's run rules are those of a plain COPY: a source among the targets.
        let bad = [cr(10, 2, 11)];
        let f = CopyFrame {
            round_end: true,
            ..frame(&bad)
        };
        assert_eq!(
            decode(&encode(f), &limits(false)),
            Err(DecodeError::RunsNotCanonical {
                list: "copy runs",
                rule: "a source page that is also a target page"
            })
        );
    }

    #[test]
    fn the_crc_covers_envelope_and_body_and_is_checked() {
        let l = limits(true);
        let runs = [cr(10, 2, 0), cr(20, 1, 4)];
        let f = frame(&runs).with_crc().unwrap();
        assert_eq!(f.flags(), FLAG_CRC32C);
        let bytes = encode(f);
        assert_eq!(bytes.len(), f.frame_len());
        // An independent computation: everything but the last 4 bytes.
        let n = bytes.len();
        assert_eq!(
            f.crc,
            Some(crc32c::crc32c(&bytes[..n - 4])),
            "the crc covers frame bytes 0..len-4"
        );
        let Ok(Frame::Copy(back)) = decode(&bytes, &l) else {
            panic!("a COPY with its CRC decodes")
        };
        assert_eq!(back, f);
        // A decoded frame's CRC recomputes from its wire runs to the same value.
        assert_eq!(back.with_crc().unwrap(), back);
        // Any altered byte outside the envelope's length fails the check: region,
        // round, copy_flags (ROUND_END set), a run's start, count and source, the crc
        // itself.
        for at in [8, 12, 18, 20, 28, 32, 40, n - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(
                matches!(decode(&bad, &l), Err(DecodeError::ChecksumMismatch { .. })),
                "byte {at}"
            );
        }
        // Present but not negotiated, and negotiated but missing.
        assert_eq!(
            decode(&bytes, &limits(false)),
            Err(DecodeError::ChecksumNotNegotiated)
        );
        assert_eq!(
            decode(&encode(frame(&runs)), &l),
            Err(DecodeError::ChecksumMissing)
        );
    }

    #[test]
    fn runs_have_one_canonical_encoding() {
        // Good: sources may overlap each other and lie anywhere but on a target;
        // touching targets whose sources do not continue.
        for good in [
            &[cr(10, 2, 0)][..],
            &[cr(10, 2, 0), cr(12, 2, 0)],
            &[cr(10, 2, 0), cr(12, 2, 1)],
            &[cr(10, 2, 3), cr(20, 2, 3)],
            &[cr(10, 1, 9), cr(11, 1, 12)],
            &[cr(0, 1, u64::MAX - 1)],
            &[cr(u64::MAX - 1, 1, 0)],
        ] {
            assert_eq!(check(good), Ok(()), "{good:?}");
        }
        for bad in [
            // No runs; an empty run.
            &[][..],
            &[cr(10, 0, 0)],
            &[cr(10, 1, 0), cr(12, 0, 0)],
            // Target or source end overflows.
            &[cr(u64::MAX, 1, 0)],
            &[cr(0, 2, u64::MAX)],
            &[cr(10, 1, 0), cr(u64::MAX - 1, 2, 0)],
            // Targets out of order or overlapping.
            &[cr(20, 1, 0), cr(10, 1, 0)],
            &[cr(10, 3, 0), cr(12, 1, 30)],
            &[cr(10, 1, 0), cr(10, 1, 1)],
            // Touching with continuing sources: one run of 4.
            &[cr(10, 2, 0), cr(12, 2, 2)],
            // A source page that is a target page: of its own run, of a later run, of
            // an earlier run, at either edge.
            &[cr(10, 2, 11)],
            &[cr(10, 2, 9)],
            &[cr(10, 2, 0), cr(20, 2, 10)],
            &[cr(10, 2, 21), cr(20, 2, 0)],
            &[cr(10, 2, 0), cr(20, 2, 9)],
            &[cr(10, 2, 0), cr(20, 2, 21), cr(30, 1, 0)],
            &[cr(10, 1, 0), cr(20, 1, 0), cr(30, 1, 0), cr(40, 5, 28)],
        ] {
            assert!(
                matches!(check(bad), Err(DecodeError::RunsNotCanonical { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pages_are_bounded_by_max_pages() {
        assert_eq!(check(&[cr(1000, 128, 0)]), Ok(()));
        assert_eq!(
            check(&[cr(1000, 100, 0), cr(1200, 29, 0)]),
            Err(DecodeError::PageCount {
                pages: 129,
                max: 128
            })
        );
        assert!(matches!(
            check(&[cr(1000, u32::MAX, 1 << 40)]),
            Err(DecodeError::PageCount { .. })
        ));
    }

    #[test]
    fn bad_envelopes_and_bodies_are_errors() {
        let l = limits(false);
        let runs = [cr(10, 2, 0)];
        let good = encode(frame(&runs));
        // Undefined copy_flags bits (only bit 0, ROUND_END, is defined), alone or beside
        // ROUND_END; unknown envelope flags (PER_PAGE is PAGES' only).
        for copy_flags in [0x0002u16, 0x0003, 0x0100, 0x8001, 0xffff] {
            let mut bad = good.clone();
            bad[18..20].copy_from_slice(&copy_flags.to_le_bytes());
            assert_eq!(
                decode(&bad, &l),
                Err(DecodeError::InvalidField {
                    field: "copy flags",
                    value: copy_flags.into()
                }),
                "{copy_flags:#06x}"
            );
        }
        for flags in [0x01, 0x04, 0x80] {
            let mut bad = good.clone();
            bad[1] = flags;
            assert_eq!(
                decode(&bad, &l),
                Err(DecodeError::UnknownFlags {
                    frame: FrameType::COPY,
                    flags
                })
            );
        }
        // A byte after the body; a run count that reaches past it.
        let mut bad = good.clone();
        bad.push(0);
        bad[4] += 1;
        assert_eq!(
            decode(&bad, &l),
            Err(DecodeError::TrailingBytes {
                frame: FrameType::COPY,
                extra: 1
            })
        );
        let mut bad = good.clone();
        bad[16] = 2;
        assert_eq!(
            decode(&bad, &l),
            Err(DecodeError::Truncated { need: 40, have: 20 })
        );
        // Every prefix of the body is truncated, never a panic.
        for cut in 0..good.len() - 8 {
            let mut short = good[..8 + cut].to_vec();
            short[4..8].copy_from_slice(&(cut as u32).to_le_bytes());
            assert!(
                matches!(decode(&short, &l), Err(DecodeError::Truncated { .. })),
                "{cut}"
            );
        }
        // During the handshake a COPY is unexpected.
        assert_eq!(
            decode(&good, &Limits::handshake()),
            Err(DecodeError::UnexpectedFrame(FrameType::COPY))
        );
    }

    #[test]
    fn too_many_runs_do_not_encode() {
        let runs = vec![cr(0, 1, 1 << 40); 65536];
        let mut out = vec![0xaa];
        assert_eq!(
            Frame::Copy(frame(&runs)).encode(&mut out),
            Err(EncodeError::TooLong {
                field: "copy runs",
                len: 65536,
                max: 65535
            })
        );
        assert_eq!(out, [0xaa], "a failed encode leaves the buffer as it was");
        assert!(frame(&runs).with_crc().is_err());
    }
}
