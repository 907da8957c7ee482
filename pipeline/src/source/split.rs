//! How a frame's pages travel: data pages for the codec, zero pages and uniform pages
//! (one byte repeated) as runs only, each list canonical (ascending, merged).

use pagewire_accel::PageClass;
use pagewire_protocol::{PageIndex, PageRun, UniformRun};

/// A frame's pages split by what they hold, in the canonical run encoding of PAGES.
#[derive(Debug, Default)]
pub(crate) struct PageSplit {
    /// Pages for the codec, in payload order.
    pub(crate) data: Vec<PageRun>,
    /// Pages of zeros.
    pub(crate) zero: Vec<PageRun>,
    /// Pages of one non-zero byte repeated.
    pub(crate) uniform: Vec<UniformRun>,
}

impl PageSplit {
    /// Empties the lists, keeping their allocations.
    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.zero.clear();
        self.uniform.clear();
    }

    /// Adds page `p`, which must come after every page added since the last `clear`.
    pub(crate) fn push(&mut self, p: u64, class: PageClass) {
        match class {
            PageClass::Data => extend(&mut self.data, p),
            PageClass::Zero => extend(&mut self.zero, p),
            PageClass::Uniform(byte) => match self.uniform.last_mut() {
                Some(last) if last.byte == byte && last.run.end() == Some(p) => last.run.count += 1,
                _ => self.uniform.push(UniformRun {
                    run: PageRun {
                        start: PageIndex(p),
                        count: 1,
                    },
                    byte,
                }),
            },
        }
    }

    /// Pages of zeros and uniform pages: what a frame carries without a payload.
    pub(crate) fn runs_only(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.zero
            .iter()
            .copied()
            .chain(self.uniform.iter().map(|u| u.run))
    }

    /// Zero pages and uniform pages.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let sum = |it: &mut dyn Iterator<Item = u32>| it.map(u64::from).sum();
        (
            sum(&mut self.zero.iter().map(|r| r.count)),
            sum(&mut self.uniform.iter().map(|u| u.run.count)),
        )
    }
}

/// Adds page `p`, after every page of `list`, to canonical runs (merged where they
/// touch).
pub(crate) fn extend(list: &mut Vec<PageRun>, p: u64) {
    match list.last_mut() {
        Some(last) if last.end() == Some(p) => last.count += 1,
        _ => list.push(PageRun {
            start: PageIndex(p),
            count: 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, count: u32) -> PageRun {
        PageRun {
            start: PageIndex(start),
            count,
        }
    }

    #[test]
    fn runs_are_merged_per_list_and_uniform_runs_split_where_the_byte_changes() {
        let mut s = PageSplit::default();
        let classes = [
            PageClass::Data,
            PageClass::Data,
            PageClass::Zero,
            PageClass::Uniform(0xcc),
            PageClass::Uniform(0xcc),
            PageClass::Uniform(0xff),
            PageClass::Data,
            PageClass::Zero,
        ];
        for (p, c) in classes.into_iter().enumerate() {
            s.push(10 + p as u64, c);
        }
        // A gap, then the same byte again: a new run.
        s.push(20, PageClass::Uniform(0xff));
        assert_eq!(s.data, [run(10, 2), run(16, 1)]);
        assert_eq!(s.zero, [run(12, 1), run(17, 1)]);
        assert_eq!(
            s.uniform,
            [
                UniformRun {
                    run: run(13, 2),
                    byte: 0xcc
                },
                UniformRun {
                    run: run(15, 1),
                    byte: 0xff
                },
                UniformRun {
                    run: run(20, 1),
                    byte: 0xff
                },
            ]
        );
        assert_eq!(s.counts(), (2, 4));
        assert_eq!(s.runs_only().count(), 5);
        s.clear();
        assert!(s.data.is_empty() && s.zero.is_empty() && s.uniform.is_empty());
    }
}
