//! The pure part of the RDMA binding (no verbs, always built): which RDMA READs a
//! destination posts for a READ_PAGES frame, and which source segments a source
//! announces for a frame's payload. Everything a peer sent is checked here before a
//! work request exists.

use pagewire_protocol::PageRun;
use pagewire_protocol::rdma::{AdvertRegion, RemoteKey, Segment, SourceAddr};

/// One RDMA READ: source bytes into the destination's own memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOp {
    /// Destination address (inside the destination's region, from the frame's runs).
    pub local: u64,
    /// Source address.
    pub remote: SourceAddr,
    /// Remote key of the advertised source region that holds `remote..remote + len`.
    pub rkey: RemoteKey,
    /// Bytes.
    pub len: u32,
}

/// Why a READ_PAGES frame cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A page of the frame lies outside the destination's region.
    #[error("a page of the frame lies outside its region")]
    PageOutsideRegion,
    /// A segment is not inside one region the source advertised.
    #[error("a source segment lies outside the memory the source advertised")]
    SegmentNotAdvertised,
    /// The segments do not hold exactly the frame's pages.
    #[error("the source segments hold {segments} bytes for {pages} bytes of pages")]
    LengthMismatch {
        /// Bytes of the segments.
        segments: u64,
        /// Bytes of the frame's data pages.
        pages: u64,
    },
}

/// The destination byte ranges (address, length) of a frame's data pages `runs` (of
/// `page_size` bytes) in a region at `base` of `len` bytes, in payload order: what a
/// receiver without a [`PageSink`](crate::PageSink) reads into.
///
/// # Errors
/// [`PlanError::PageOutsideRegion`] when a page is not inside the region.
pub fn run_ranges(
    runs: impl Iterator<Item = PageRun>,
    page_size: u32,
    base: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>, PlanError> {
    let ps = u64::from(page_size);
    let outside = PlanError::PageOutsideRegion;
    runs.map(|run| {
        let start = run.start.0.checked_mul(ps).ok_or(outside)?;
        let n = u64::from(run.count).checked_mul(ps).ok_or(outside)?;
        if start.checked_add(n).is_none_or(|end| end > len) {
            return Err(outside);
        }
        Ok((base + start, n))
    })
    .collect()
}

/// Plans the READs that fill `dest` (destination ranges, address and length, in
/// payload order: the pages the frame names, as the receiver's checks mapped them)
/// from `segments` of the source's advertised `sources`.
///
/// # Errors
/// [`PlanError`] when a segment is not advertised memory or the bytes do not match;
/// nothing is planned then.
pub fn plan_reads(
    dest: &[(u64, u64)],
    segments: &[Segment],
    sources: &[AdvertRegion],
) -> Result<Vec<ReadOp>, PlanError> {
    let mut keys = Vec::with_capacity(segments.len());
    let mut seg_total = 0u64;
    for s in segments {
        let src = sources
            .iter()
            .find(|r| r.contains(s.addr, u64::from(s.len)))
            .ok_or(PlanError::SegmentNotAdvertised)?;
        keys.push(src.rkey);
        seg_total += u64::from(s.len);
    }
    let pages_total = dest.iter().map(|d| d.1).sum::<u64>();
    if seg_total != pages_total {
        return Err(PlanError::LengthMismatch {
            segments: seg_total,
            pages: pages_total,
        });
    }
    let mut ops = Vec::new();
    let (mut seg, mut seg_off) = (0usize, 0u64);
    for &(addr, len) in dest {
        let (mut dst, mut left) = (addr, len);
        while left > 0 {
            // The totals match, so a segment is left while bytes are.
            let s = segments[seg];
            let n = (u64::from(s.len) - seg_off).min(left);
            ops.push(ReadOp {
                local: dst,
                remote: SourceAddr(s.addr.0 + seg_off),
                rkey: keys[seg],
                // `n <= s.len`, a u32.
                len: n as u32,
            });
            dst += n;
            left -= n;
            seg_off += n;
            if seg_off == u64::from(s.len) {
                seg += 1;
                seg_off = 0;
            }
        }
    }
    Ok(ops)
}

/// The segments a source announces for a payload of `slices` (address, length, in
/// payload order), each of which must lie in one of its `registered` regions (address,
/// length); `None` when one does not (the frame then goes as a stream) or a slice is
/// longer than a segment can say.
pub fn source_segments(slices: &[(u64, u64)], registered: &[(u64, u64)]) -> Option<Vec<Segment>> {
    slices
        .iter()
        .map(|&(addr, len)| {
            let inside = registered.iter().any(|&(base, size)| {
                addr >= base && addr.checked_add(len).is_some_and(|e| e <= base + size)
            });
            (inside && len > 0).then_some(Segment {
                addr: SourceAddr(addr),
                len: u32::try_from(len).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::{PageIndex, RegionId};

    fn run(start: u64, count: u32) -> PageRun {
        PageRun {
            start: PageIndex(start),
            count,
        }
    }

    const SRC: AdvertRegion = AdvertRegion {
        region: RegionId(3),
        rkey: RemoteKey(77),
        addr: SourceAddr(0x10_0000),
        len: 64 * 4096,
    };
    const BASE: u64 = 0x7000_0000;
    const LEN: u64 = 64 * 4096;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: SourceAddr(addr),
            len,
        }
    }

    fn op(local: u64, remote: u64, len: u32) -> ReadOp {
        ReadOp {
            local,
            remote: SourceAddr(remote),
            rkey: RemoteKey(77),
            len,
        }
    }

    fn plan(runs: &[PageRun], segs: &[Segment]) -> Result<Vec<ReadOp>, PlanError> {
        let dest = run_ranges(runs.iter().copied(), 4096, BASE, LEN)?;
        plan_reads(&dest, segs, &[SRC])
    }

    #[test]
    fn reads_follow_the_runs_across_segments() {
        // Pages 2..4 and 10..11 from two segments split mid-run.
        let segs = [seg(0x10_0000, 3 * 4096), seg(0x10_0000 + 40 * 4096, 4096)];
        let ops = plan(&[run(2, 2), run(10, 2)], &segs).unwrap();
        assert_eq!(
            ops,
            vec![
                op(BASE + 2 * 4096, 0x10_0000, 8192),
                op(BASE + 10 * 4096, 0x10_0000 + 8192, 4096),
                op(BASE + 11 * 4096, 0x10_0000 + 40 * 4096, 4096),
            ]
        );
    }

    /// The window: every READ lands inside the pages the frame names, in the
    /// destination's own region, whatever the peer put in the message.
    #[test]
    fn nothing_is_read_outside_the_frames_pages_or_from_unadvertised_memory() {
        let segs = [seg(0x10_0000, 2 * 4096)];
        let p = plan;
        assert_eq!(p(&[run(63, 2)], &segs), Err(PlanError::PageOutsideRegion));
        assert_eq!(
            p(&[run(64, 1)], &[seg(0x10_0000, 4096)]),
            Err(PlanError::PageOutsideRegion)
        );
        assert_eq!(
            p(&[run(u64::MAX / 2, 2)], &segs),
            Err(PlanError::PageOutsideRegion)
        );
        assert!(matches!(
            p(&[run(0, 3)], &segs),
            Err(PlanError::LengthMismatch { .. })
        ));
        assert!(matches!(
            p(&[run(0, 1)], &segs),
            Err(PlanError::LengthMismatch { .. })
        ));
        // Source memory the source did not advertise, or straddling its end.
        assert_eq!(
            p(&[run(0, 1)], &[seg(0x20_0000, 4096)]),
            Err(PlanError::SegmentNotAdvertised)
        );
        assert_eq!(
            p(&[run(0, 2)], &[seg(0x10_0000 + 63 * 4096, 8192)]),
            Err(PlanError::SegmentNotAdvertised)
        );
        assert_eq!(
            p(&[run(0, 1)], &[seg(u64::MAX - 10, 4096)]),
            Err(PlanError::SegmentNotAdvertised)
        );
        // Accepted plans stay inside [BASE, BASE + LEN) and inside the named pages.
        let ops = p(&[run(1, 1), run(62, 2)], &[seg(0x10_0000, 3 * 4096)]).unwrap();
        for o in &ops {
            assert!(o.local >= BASE && o.local + u64::from(o.len) <= BASE + LEN);
        }
        let pages: Vec<u64> = ops.iter().map(|o| (o.local - BASE) / 4096).collect();
        assert_eq!(pages, [1, 62]);
    }

    #[test]
    fn a_source_announces_only_registered_slices() {
        let reg = [(0x1000, 0x4000)];
        assert_eq!(
            source_segments(&[(0x1000, 0x2000), (0x4000, 0x1000)], &reg),
            Some(vec![seg(0x1000, 0x2000), seg(0x4000, 0x1000)])
        );
        assert_eq!(source_segments(&[(0x4000, 0x2000)], &reg), None);
        assert_eq!(source_segments(&[(0x1000, 0)], &reg), None);
        assert_eq!(source_segments(&[(0x0, 0x1000)], &reg), None);
    }
}
