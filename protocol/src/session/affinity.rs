//! Page-to-channel affinity: the rule that keeps every version of a page on one ordered
//! channel, so concurrent channels never write the same page.

use crate::ids::{ChannelId, RegionId};
use crate::session::SessionError;
use crate::wire::PageRun;

/// The affinity map of a session: pages are grouped into chunks of `chunk_pages`
/// consecutive pages, and chunk `c` of region `r` travels on channel
/// `(c + r) % channels` (`PROTOCOL.md`, "Channel affinity").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity {
    channels: u16,
    chunk_pages: u32,
}

impl Affinity {
    /// The map for `channels` channels and chunks of `chunk_pages` pages; `None` when
    /// either is 0.
    pub fn new(channels: u16, chunk_pages: u32) -> Option<Self> {
        (channels > 0 && chunk_pages > 0).then_some(Self {
            channels,
            chunk_pages,
        })
    }

    /// Channels in the session.
    pub fn channels(&self) -> u16 {
        self.channels
    }

    /// Pages per chunk.
    pub fn chunk_pages(&self) -> u32 {
        self.chunk_pages
    }

    /// The channel that carries `page` of `region`.
    pub fn channel(&self, region: RegionId, page: u64) -> ChannelId {
        let chunk = page / u64::from(self.chunk_pages);
        ChannelId(((chunk + u64::from(region.0)) % u64::from(self.channels)) as u16)
    }

    /// The first page at or after `page` of `region` that `channel` carries (saturating
    /// at `u64::MAX`).
    pub fn next_on(&self, region: RegionId, channel: ChannelId, page: u64) -> u64 {
        let chunk = u64::from(self.chunk_pages);
        let channels = u64::from(self.channels);
        let c = page / chunk;
        let current = (c + u64::from(region.0)) % channels;
        match (u64::from(channel.0) % channels + channels - current) % channels {
            0 => page,
            delta => (c + delta).saturating_mul(chunk),
        }
    }

    /// How many of the `pages` pages of `region` `channel` carries.
    pub fn pages_on(&self, region: RegionId, pages: u64, channel: ChannelId) -> u64 {
        let chunk = u128::from(self.chunk_pages);
        let channels = u128::from(self.channels);
        let pages = u128::from(pages);
        let chunks = pages.div_ceil(chunk);
        // Chunk `c` is the channel's when `c ≡ channel − region (mod channels)`.
        let first = (u128::from(channel.0) % channels + channels - u128::from(region.0) % channels)
            % channels;
        if first >= chunks {
            return 0;
        }
        let owned = 1 + (chunks - 1 - first) / channels;
        let mut total = owned * chunk;
        // The last chunk may be short.
        if (chunks - 1) % channels == first {
            total -= chunks * chunk - pages;
        }
        // At most `pages`, which is a u64.
        total as u64
    }

    /// Checks that every page of `run` in `region` belongs to `channel`. The work is
    /// bounded by the run's chunks (at most `count / chunk_pages + 2`).
    ///
    /// # Errors
    /// [`SessionError::WrongChannel`] naming the first page that belongs elsewhere.
    pub fn check_run(
        &self,
        region: RegionId,
        channel: ChannelId,
        run: PageRun,
    ) -> Result<(), SessionError> {
        if self.channels == 1 {
            return Ok(());
        }
        let chunk = u64::from(self.chunk_pages);
        let start = run.start.0;
        let Some(end) = run.end() else {
            return Err(SessionError::WrongChannel {
                region,
                page: start,
                channel,
                owner: self.channel(region, start),
            });
        };
        if end <= start {
            return Ok(());
        }
        let first = start / chunk;
        let last = (end - 1) / chunk;
        // A run longer than `channels` chunks cannot lie on one channel.
        let span = (last - first).min(u64::from(self.channels));
        for c in first..=first + span {
            if c > last {
                break;
            }
            let page = (c * chunk).max(start);
            let owner = self.channel(region, page);
            if owner != channel {
                return Err(SessionError::WrongChannel {
                    region,
                    page,
                    channel,
                    owner,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_on_counts_what_channel_says_page_by_page() {
        // Smaller under Miri, which runs this about a thousand times slower.
        let (most_channels, most_chunk, most_pages) =
            if cfg!(miri) { (3, 2, 9) } else { (5, 4, 23) };
        for channels in 1..=most_channels {
            for chunk in 1..=most_chunk {
                let a = Affinity::new(channels, chunk).unwrap();
                for region in [0u32, 1, 3, 7, u32::MAX] {
                    for pages in 0..=most_pages {
                        let mut sum = 0;
                        for c in 0..channels {
                            let want = (0..pages)
                                .filter(|&p| a.channel(RegionId(region), p) == ChannelId(c))
                                .count() as u64;
                            let got = a.pages_on(RegionId(region), pages, ChannelId(c));
                            assert_eq!(
                                got, want,
                                "{channels} channels, chunk {chunk}, region {region}, {pages} pages, channel {c}"
                            );
                            sum += got;
                        }
                        assert_eq!(sum, pages);
                    }
                }
            }
        }
        // No overflow at the ends of the ranges.
        let a = Affinity::new(64, u32::MAX).unwrap();
        let all: u128 = (0..64)
            .map(|c| u128::from(a.pages_on(RegionId(9), u64::MAX, ChannelId(c))))
            .sum();
        assert_eq!(all, u128::from(u64::MAX));
        let one = Affinity::new(1, 1).unwrap();
        assert_eq!(one.pages_on(RegionId(5), u64::MAX, ChannelId(0)), u64::MAX);
    }
}
