//! Paired samples for the adaptive choice: when a frame explores another compressor,
//! its first pages are also encoded, off the wire, by that compressor and by the
//! current choice, so the selector compares the two on the same bytes. An explored
//! frame alone is compared with the current choice's recent frames, other content:
//! on the two-copy image, one such frame had lz4 saving more than zstd:1.

use pagewire_accel::{Codecs, EncodeParams, PageKey, PageList, PageSize};
use pagewire_protocol::{CodecId, PageRun, RegionId};

use super::Worker;

/// Pages a paired sample encodes at most: 256 KiB of 4 KiB pages, half a default
/// frame, for each of the two compressors, on explored frames only (one in 16 at
/// most). zstd finds matches across a frame's pages, and a higher level more of
/// them: on the two-copy image zstd:3 sends 5.4 % fewer bytes than zstd:1 on whole
/// 128-page frames, 4.4 % fewer on their first 64 pages, 3.4 % on their first 16
/// (which had auto take the two for equal).
const SAMPLE_PAGES: usize = 64;

/// What pairing keeps between frames: its own codec contexts and buffers.
#[derive(Default)]
pub(super) struct Pairing {
    codecs: Codecs,
    sample: Vec<u8>,
    out: Vec<u8>,
    lengths: Vec<u32>,
}

impl Pairing {
    /// The share of `sample` that `params` saves; `None` if it cannot encode it.
    fn saved(&mut self, params: &EncodeParams, sample_len: usize, ps: PageSize) -> Option<f64> {
        let pages = sample_len / ps.bytes();
        let mut list = PageList::new(ps);
        list.push_slice(&self.sample[..sample_len], PageKey(0))
            .ok()?;
        let need = pagewire_accel::max_payload_len(pages, ps);
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        let out = self
            .codecs
            .encode(params, &list, None, &mut self.out, &mut self.lengths)
            .ok()?;
        let saved = 1.0 - out.bytes_out() as f64 / sample_len.max(1) as f64;
        Some(saved.max(0.0))
    }
}

impl Worker {
    /// When frame arm `arm` (`params`) explores a compressor other than the current
    /// choice, encodes the first pages of its data (`staged`, the copy dedup took, or
    /// `runs` of guest memory) with both and tells the selector what each saved.
    pub(super) fn pair_sample(
        &mut self,
        region: RegionId,
        arm: usize,
        params: &EncodeParams,
        staged: Option<&[u8]>,
        runs: &[PageRun],
    ) {
        let Some(sel) = self.s.adaptive.as_ref() else {
            return;
        };
        let (current, cur) = sel.current();
        if current == arm || cur.codec == CodecId::RAW || params.codec == CodecId::RAW {
            return;
        }
        let Some(ps) = PageSize::new(self.s.memory.page_size()) else {
            return;
        };
        let p = self.pairing.get_or_insert_with(Box::default);
        let want = SAMPLE_PAGES * ps.bytes();
        if p.sample.len() < want {
            p.sample.resize(want, 0);
        }
        let len = match staged {
            Some(buf) => {
                let n = buf.len().min(want) / ps.bytes() * ps.bytes();
                p.sample[..n].copy_from_slice(&buf[..n]);
                n
            }
            None => {
                let mut n = 0;
                for run in runs {
                    let take = (run.count as usize).min((want - n) / ps.bytes());
                    if take == 0 {
                        break;
                    }
                    let end = n + take * ps.bytes();
                    if !self.s.memory.read_pages(
                        region,
                        run.start.0,
                        take as u64,
                        &mut p.sample[n..end],
                    ) {
                        return;
                    }
                    n = end;
                }
                n
            }
        };
        if len == 0 {
            return;
        }
        if let (Some(a), Some(c)) = (p.saved(params, len, ps), p.saved(&cur, len, ps))
            && let Some(sel) = self.s.adaptive.as_mut()
        {
            sel.observe_pair(arm, a, c);
        }
    }
}
