//! The guest memory layout, validated as a whole.

use crate::copy::CopyFrame;
use crate::error::DecodeError;
use crate::frame::{LayoutFrame, PageFrame, check_region};
use crate::ids::RegionId;
use crate::wire::{PageRun, RegionDesc, WireList};

/// A validated set of guest memory regions: each region well-formed, ids unique, no two
/// regions overlapping in guest physical space. Built by the source from its regions and
/// by the destination from the LAYOUT frame; the allocation is bounded by the frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    page_size: u32,
    /// Sorted by id.
    regions: Vec<RegionDesc>,
}

impl MemoryLayout {
    /// Validates `regions` for a session with `page_size`.
    ///
    /// # Errors
    /// `InvalidField` for a malformed region, `LayoutConflict` for duplicate ids or
    /// overlapping regions.
    pub fn new(
        page_size: u32,
        regions: impl IntoIterator<Item = RegionDesc>,
    ) -> Result<Self, DecodeError> {
        let mut regions: Vec<RegionDesc> = regions.into_iter().collect();
        for r in &regions {
            check_region(r, page_size)?;
        }
        let mut by_addr: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.guest_addr.0, r.guest_addr.0 + r.length))
            .collect();
        by_addr.sort_unstable();
        if by_addr.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(DecodeError::LayoutConflict);
        }
        regions.sort_unstable_by_key(|r| r.id);
        if regions.windows(2).any(|w| w[0].id == w[1].id) {
            return Err(DecodeError::LayoutConflict);
        }
        Ok(Self { page_size, regions })
    }

    /// Validates a received LAYOUT frame.
    ///
    /// # Errors
    /// As [`MemoryLayout::new`].
    pub fn from_frame(frame: &LayoutFrame<'_>, page_size: u32) -> Result<Self, DecodeError> {
        Self::new(page_size, frame.regions.iter())
    }

    /// The LAYOUT frame describing this layout, with affinity chunks of `chunk_pages`.
    pub fn frame(&self, chunk_pages: u32) -> LayoutFrame<'_> {
        LayoutFrame {
            chunk_pages,
            regions: WireList::Slice(&self.regions),
        }
    }

    /// Guest memory bytes over all regions (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |t, r| t.saturating_add(r.length))
    }

    /// Session pages over all regions (saturating).
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().fold(0u64, |t, r| {
            t.saturating_add(r.length / u64::from(self.page_size))
        })
    }

    /// The session page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The regions, by id.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.regions
    }

    /// One region.
    pub fn region(&self, id: RegionId) -> Option<&RegionDesc> {
        self.regions
            .binary_search_by_key(&id, |r| r.id)
            .ok()
            .map(|i| &self.regions[i])
    }

    /// Pages in a region, in session pages.
    pub fn pages(&self, id: RegionId) -> Option<u64> {
        self.region(id)
            .map(|r| r.length / u64::from(self.page_size))
    }

    /// Checks that every page a frame names lies inside its region.
    ///
    /// # Errors
    /// `UnknownRegion` or `PageOutOfRange`.
    pub fn check_pages(&self, frame: &PageFrame<'_>) -> Result<(), DecodeError> {
        self.check_runs(frame.region, frame.all_runs())
    }

    /// Checks that every target and every source page of a COPY frame lies inside its
    /// region.
    ///
    /// # Errors
    /// `UnknownRegion` or `PageOutOfRange`.
    pub fn check_copy(&self, frame: &CopyFrame<'_>) -> Result<(), DecodeError> {
        self.check_runs(frame.region, frame.all_runs())
    }

    /// Checks that every page of `runs` lies inside region `region`.
    ///
    /// # Errors
    /// `UnknownRegion` or `PageOutOfRange`.
    pub fn check_runs(
        &self,
        region: RegionId,
        runs: impl IntoIterator<Item = PageRun>,
    ) -> Result<(), DecodeError> {
        let pages = self
            .pages(region)
            .ok_or(DecodeError::UnknownRegion(region))?;
        // Runs are ascending in a decoded frame, but check every run: the frame may come
        // from a caller rather than the decoder, and a COPY's sources are in no order.
        for run in runs {
            let end = run.end().unwrap_or(u64::MAX);
            if end > pages {
                return Err(DecodeError::PageOutOfRange { region, end, pages });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CodecId, GuestAddr, PageIndex, Round};
    use crate::wire::PageRun;

    fn region(id: u32, addr: u64, len: u64) -> RegionDesc {
        RegionDesc {
            id: RegionId(id),
            backing_page_size: 4096,
            guest_addr: GuestAddr(addr),
            length: len,
        }
    }

    #[test]
    fn overlap_and_duplicates_are_refused() {
        assert!(MemoryLayout::new(4096, [region(0, 0, 8192), region(1, 8192, 4096)]).is_ok());
        assert_eq!(
            MemoryLayout::new(4096, [region(0, 0, 8192), region(1, 4096, 4096)]),
            Err(DecodeError::LayoutConflict)
        );
        assert_eq!(
            MemoryLayout::new(4096, [region(0, 0, 4096), region(0, 8192, 4096)]),
            Err(DecodeError::LayoutConflict)
        );
    }

    #[test]
    fn pages_must_lie_inside_their_region() {
        let l = MemoryLayout::new(4096, [region(3, 0, 4 * 4096)]).unwrap();
        let runs = [PageRun {
            start: PageIndex(3),
            count: 2,
        }];
        let f = PageFrame {
            codec: CodecId::ZERO,
            region: RegionId(3),
            round: Round(0),
            data_runs: WireList::Slice(&[]),
            zero_runs: (&runs).into(),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &[],
        };
        assert!(matches!(
            l.check_pages(&f),
            Err(DecodeError::PageOutOfRange {
                end: 5,
                pages: 4,
                ..
            })
        ));
        let f = PageFrame {
            region: RegionId(9),
            ..f
        };
        assert_eq!(
            l.check_pages(&f),
            Err(DecodeError::UnknownRegion(RegionId(9)))
        );
    }
}
