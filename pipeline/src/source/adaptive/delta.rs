//! Delta for pages whose previous version is cached (`(CodecId::DELTA, _)` among the
//! candidates, [`AdaptiveConfig::with_delta`]).
//!
//! Delta is not priced like the other candidates: it applies only to pages the
//! destination holds a known version of, and for those it is cheaper than any
//! compressor on both sides (a compare at memory speed on the source, a patch on the
//! destination). So the rule is simpler than the model's:
//! - From the second round on, every frame keeps in the source's delta cache what it
//!   sends for each page (`EncodeParams::remember`: the bytes a compressor encoded or
//!   copied raw; pages of raw frames, raw fallbacks sent in place, zero and uniform
//!   pages and copies are forgotten). The first round does not:
//!   a page sent again is likely to be sent again, while the first round's pages, the
//!   whole guest, would only push those out of the bounded cache and cost a copy each.
//! - A paused round keeps nothing but through its delta frames and forgets the other
//!   pages it sends: no round that could use them follows, and a page's first copy
//!   into the cache costs a fault on its memory inside the downtime.
//! - A frame whose data pages are all in the cache goes as delta instead of the
//!   current choice when that choice is a compressor (not raw: raw is chosen where
//!   the core or the receiver limits, and raw frames sent in place keep nothing) and
//!   is not being explored.
//! - Delta must send no more bytes per guest byte than the current choice is
//!   expected to: once two delta frames have measured it (a moving average of its
//!   frames), delta sending more (pages rewritten whole go raw inside a delta frame)
//!   stops it for [`DELTA_RETRY`], then it is tried again.
//!
//! Each start and stop is a switch in the statistics (`cached`, `delta-larger`), and
//! delta's frames are a choice of their own (`delta`).

use super::*;

/// How long delta stays off after its frames sent more than the current choice.
pub(super) const DELTA_RETRY: Duration = Duration::from_secs(2);
/// Delta frames that measure it before it may be stopped.
const DELTA_TRIAL: u32 = 2;
/// Weight of a frame in delta's moving average.
const DELTA_WEIGHT: f64 = 0.25;

/// Delta's state on one channel.
#[derive(Debug, Default)]
pub(super) struct DeltaGate {
    /// Delta's payload bytes per guest byte over its frames since it (re)started.
    ratio: Option<f64>,
    /// Its frames since it (re)started.
    frames: u32,
    /// Delta is off until then.
    off_until: Option<Instant>,
    /// Whether a start was logged since the last stop.
    started: bool,
    stats: ChoiceStats,
}

impl DeltaGate {
    pub(super) fn new() -> DeltaGate {
        DeltaGate {
            stats: ChoiceStats {
                choice: label(CodecId::DELTA, 0),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Its frames so far, as a choice of the statistics.
    pub(super) fn stats(&self) -> Option<ChoiceStats> {
        (self.stats.frames > 0).then(|| self.stats.clone())
    }
}

impl Selector {
    /// Whether delta is among the candidates (the source then keeps its delta cache).
    pub(crate) fn delta_enabled(&self) -> bool {
        self.delta.is_some()
    }

    /// Whether a frame chosen as arm `i` at `now` goes as delta instead; `cached` tells
    /// whether its data pages all have a cached version (asked last: it takes a lock
    /// per page).
    pub(crate) fn delta_for(
        &mut self,
        i: usize,
        now: Instant,
        cached: impl FnOnce() -> bool,
    ) -> bool {
        if i != self.current
            || self
                .arms
                .get(i)
                .is_none_or(|a| a.params.codec == CodecId::RAW)
        {
            return false;
        }
        let Some(g) = self.delta.as_mut() else {
            return false;
        };
        if g.off_until.is_some_and(|t| now < t) || !cached() {
            return false;
        }
        g.off_until = None;
        if !std::mem::replace(&mut g.started, true) {
            (g.ratio, g.frames) = (None, 0);
            let (from, ratio) = (self.arms[i].label.clone(), self.ratio(i));
            self.log_switch(
                from.clone(),
                label(CodecId::DELTA, 0),
                "cached",
                now,
                format!("pages cached; {from} expects ratio {ratio:.2}"),
            );
        }
        true
    }

    /// A delta frame chosen in place of arm `i` carried `guest` bytes of data pages in
    /// `payload` bytes.
    pub(crate) fn observe_delta(&mut self, i: usize, guest: u64, payload: u64, now: Instant) {
        if guest == 0 || i >= self.arms.len() {
            return;
        }
        let expected = self.ratio(i);
        let Some(g) = self.delta.as_mut() else {
            return;
        };
        g.stats.frames += 1;
        g.stats.guest_bytes += guest;
        g.stats.payload_bytes += payload;
        let r = payload as f64 / guest as f64;
        let avg = g
            .ratio
            .map_or(r, |x| x * (1.0 - DELTA_WEIGHT) + r * DELTA_WEIGHT);
        g.ratio = Some(avg);
        g.frames += 1;
        if g.started && g.frames >= DELTA_TRIAL && avg > expected {
            let frames = g.frames;
            (g.started, g.off_until) = (false, Some(now + DELTA_RETRY));
            let to = self.arms[i].label.clone();
            self.log_switch(
                label(CodecId::DELTA, 0),
                to.clone(),
                "delta-larger",
                now,
                format!(
                    "delta sent ratio {avg:.2} over {frames} frames; {to} expects {expected:.2}"
                ),
            );
        }
    }
}
