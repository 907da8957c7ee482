//! Which channel carries which page, and how dirty pages are cut into frames.
//!
//! Ordering rule (the mechanism `DESIGN.md` asks us to choose): **page-to-channel
//! affinity**. Page indices are grouped into chunks of `chunk_pages` consecutive
//! pages; chunk `c` of region `r` always travels on channel `(c + r) % channels`. Every
//! version of a page therefore goes over the same ordered byte stream, and the
//! destination applies each channel's frames in the order they arrive, so an older
//! version can never overwrite a newer one, whatever the interleaving *between*
//! channels, without a per-round barrier. It is also what makes delta encoding safe:
//! the destination always holds the version the delta was computed against.

use pagewire_protocol::{ChannelId, PageIndex, PageRun, RegionId};

use crate::dirty::DirtyBitmap;

/// The affinity map. The rule itself is the protocol's
/// ([`pagewire_protocol::Affinity`]): the chunk size travels in LAYOUT and the
/// destination refuses a page that arrives on another channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity {
    /// Channels in the session.
    pub channels: u16,
    /// Pages per chunk (a power of two is not required).
    pub chunk_pages: u32,
}

impl Affinity {
    /// The protocol's map (channels and chunk pages of at least 1).
    pub fn wire(&self) -> pagewire_protocol::Affinity {
        pagewire_protocol::Affinity::new(self.channels.max(1), self.chunk_pages.max(1))
            .unwrap_or_else(|| unreachable!("both are at least 1"))
    }

    /// The channel that carries `page` of `region`.
    pub fn channel(&self, region: RegionId, page: u64) -> u16 {
        self.wire().channel(region, page).0
    }

    /// The dirty pages of `region` that belong to `channel`, cut into frames of at most
    /// `max_pages` pages each, as canonical runs (ascending, merged). Pages come out in
    /// ascending order.
    pub fn frames<'a>(
        &self,
        region: RegionId,
        channel: u16,
        dirty: &'a DirtyBitmap,
        max_pages: u32,
    ) -> FramePlan<impl Iterator<Item = (u64, u64)> + 'a> {
        let chunk = u64::from(self.chunk_pages.max(1));
        let wire = self.wire();
        let runs = dirty.runs().flat_map(move |(start, count)| {
            // Split each dirty run at chunk boundaries and keep this channel's pieces.
            let end = start + count;
            let mut p = start;
            std::iter::from_fn(move || {
                p = wire.next_on(region, ChannelId(channel), p);
                if p >= end {
                    return None;
                }
                let chunk_end = (p / chunk + 1).saturating_mul(chunk).min(end);
                let piece = (p, chunk_end - p);
                p = chunk_end;
                Some(piece)
            })
        });
        FramePlan {
            runs,
            max_pages: u64::from(max_pages.max(1)),
            pending: None,
        }
    }
}

/// Iterator over frames: each item is the runs of one frame.
#[derive(Debug)]
pub struct FramePlan<I> {
    runs: I,
    max_pages: u64,
    pending: Option<(u64, u64)>,
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for FramePlan<I> {
    type Item = Vec<PageRun>;

    fn next(&mut self) -> Option<Vec<PageRun>> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut pages = 0u64;
        while pages < self.max_pages {
            let Some((start, count)) = self.pending.take().or_else(|| self.runs.next()) else {
                break;
            };
            let take = count.min(self.max_pages - pages);
            if take < count {
                self.pending = Some((start + take, count - take));
            }
            match runs.last_mut() {
                Some(last) if last.start.0 + u64::from(last.count) == start => {
                    last.count += take as u32;
                }
                _ => runs.push(PageRun {
                    start: PageIndex(start),
                    count: take as u32,
                }),
            }
            pages += take;
        }
        (!runs.is_empty()).then_some(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn plan(a: Affinity, dirty: &DirtyBitmap, max: u32) -> Vec<Vec<Vec<PageRun>>> {
        (0..a.channels)
            .map(|ch| a.frames(RegionId(1), ch, dirty, max).collect())
            .collect()
    }

    #[test]
    fn every_dirty_page_goes_once_on_its_own_channel() {
        let dirty = DirtyBitmap::new(1000);
        for (s, c) in [(0, 3), (5, 200), (300, 1), (302, 1), (640, 333), (999, 1)] {
            dirty.set_range(s, c);
        }
        for channels in [1, 2, 3, 4] {
            for chunk in [1, 7, 64, 128] {
                for max in [1, 5, 128] {
                    let a = Affinity {
                        channels,
                        chunk_pages: chunk,
                    };
                    let mut seen = BTreeSet::new();
                    for (ch, frames) in plan(a, &dirty, max).into_iter().enumerate() {
                        let mut last = None;
                        for frame in frames {
                            let n: u64 = frame.iter().map(|r| u64::from(r.count)).sum();
                            assert!(n >= 1 && n <= u64::from(max));
                            for w in frame.windows(2) {
                                assert!(w[0].start.0 + u64::from(w[0].count) < w[1].start.0);
                            }
                            for r in frame {
                                for p in r.start.0..r.start.0 + u64::from(r.count) {
                                    assert_eq!(a.channel(RegionId(1), p), ch as u16);
                                    assert!(dirty.is_set(p));
                                    assert!(seen.insert(p), "page {p} twice");
                                    assert!(last < Some(p), "pages out of order");
                                    last = Some(p);
                                }
                            }
                        }
                    }
                    assert_eq!(seen.len() as u64, dirty.count(), "{channels} {chunk} {max}");
                }
            }
        }
    }
}
