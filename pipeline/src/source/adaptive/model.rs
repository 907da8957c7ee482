//! The model: what each candidate is expected to move (its ratio on the content of now,
//! the guest bytes per second the link and its core allow), whether the busy link is a
//! fixed pipe, and which candidate is the best. The parent module's documentation
//! gives the rules; the choice over time (windows, exploring, switching) is there too.

use super::*;

impl Selector {
    /// Payload bytes per guest byte expected of arm `i` on the content of now: the
    /// share it saves on the reference content, times how compressible the content is
    /// now. Before its first frame, a compressor's share is its prior's.
    pub(super) fn ratio(&self, i: usize) -> f64 {
        let a = &self.arms[i];
        if a.params.codec == CodecId::RAW {
            // Raw skips dedup: for each page the others encode, it sends the pages they
            // send as copies too.
            return 1.0 / (1.0 - self.copy_share).max(MIN_RAW_SHARE);
        }
        let own = |a: &Arm| (1.0 - a.saves * self.content).clamp(MIN_RATIO, 1.0);
        // No candidate compresses better than one that compresses at least as well on
        // any content: an estimate from a few explored frames, on content that varied
        // from the current choice's, had lz4 at 0.23 where zstd:1 was at 0.28 (it
        // sent 0.40 against 0.26).
        self.arms
            .iter()
            .filter(|b| compresses_as_well(b.params, a.params))
            .map(own)
            .fold(own(a), f64::max)
    }

    /// Guest bytes per second the model expects of arm `i`.
    pub(super) fn rate(&self, i: usize) -> f64 {
        let a = &self.arms[i];
        let cpu = self.cores_for(i) / a.cost.max(1e-12);
        let link = match (self.link, self.limited) {
            (None, _) => f64::INFINITY,
            (Some(l), true) => l,
            (Some(l), false) => {
                let free = self.now.saturating_duration_since(self.last_limited);
                l * (1.0 + PROBE_PER_S * free.as_secs_f64())
            }
        };
        // The thread encodes and hands the frame over (its copy); the link carries the
        // previous frames meanwhile (the socket and the send queue hold them). The
        // link's figure is what left the channel while it was busy, copy included
        // where the copy is the link (loopback): the copy is not added to it again.
        let ratio = self.ratio(i).max(1e-6);
        let thread = 1.0 / cpu + ratio * self.copy.unwrap_or(0.0);
        // The current choice keeps a busy link busy: its thread outpaces the link,
        // whatever its measured cost says (the encode's time swings with the other
        // work on the same cores), and it moves what the link carries.
        let thread = if i == self.current && self.limited && link.is_finite() {
            thread.min(ratio / link)
        } else {
            thread
        };
        let period = thread.max(ratio / link);
        let model = 1.0 / period.max(1e-15);
        // What the channel really moved lately while it was the choice bounds the
        // model: where the link is the same cores (loopback, a veth pair), the
        // destination's decoding and the kernel's copy take the cores the encoder
        // needs, and a compressor saves less than the model thinks. For a candidate
        // that compresses less than the current one it replaces the model: the bytes
        // the channel accepts under a compressor say little of what it accepts raw
        // when the receiver's work is what limits it.
        let cap = self.receiver_cap();
        if i == self.current
            && let Some(cap) = cap
        {
            // What it moved while the receiver held it back: the link carried all of
            // it, and a figure priced from the link, which measured the receiver
            // then, would say less.
            return cap;
        }
        let figure = match a.realized {
            Some((r, at, then))
                if self.now.saturating_duration_since(at) < REALIZED_FOR * (1 << a.losses) =>
            {
                let r = r * (then / ratio).clamp(0.5, 2.0);
                // Only where the source accepted clearly more bytes under it than
                // under the current choice: over a real link, whose rate does not
                // depend on the codec, the model prices it as well, with less noise.
                // (Per channel, the share of a 1 Gbit/s link swung 43-66 MB/s, and
                // zstd:-5 replaced zstd:1 at ratio 0.35 against 0.23.)
                let receiver_bound = a
                    .wire
                    .zip(self.arms[self.current].wire)
                    .is_none_or(|((w, _), (c, _))| w > c * WIRE_DIFFERS);
                if self.limited && receiver_bound && ratio > self.ratio(self.current) * NEAR {
                    r
                } else {
                    model.min(r * NEAR)
                }
            }
            _ => model,
        };
        let Some(cap) = cap else {
            return figure;
        };
        // One that sends more bytes per guest byte must leave the link room for the
        // receiver's rate to swing back up: into fresh destination memory the receiver
        // alternates between stretches of first writes (page faults) and stretches at
        // several times their rate. Priced on the slow stretch alone, raw reached it at
        // 1 Gbit/s and kept the choice until a busy window refuted it, hundreds of
        // milliseconds later: 10-16 % of the guest went raw, at a third of zstd:1's
        // pages per second on that link.
        if ratio > self.ratio(self.current) {
            figure.min(cap).min(link / ratio / RECEIVER_SWING)
        } else {
            figure.min(cap)
        }
    }

    /// The cores arm `i` may encode on. Where the current choice is raw, which takes
    /// next to no core time, a compressor would have to take its cores from what the
    /// machine leaves idle: at most the idle cores' share of this channel (where known)
    /// and what raw uses. At 10 Gbit/s over a veth pair, with both cores shared by the
    /// source and the destination, 0.6 of a core was idle under raw; a channel's busy
    /// window measured the link at 600 MB/s, zstd:-5 priced on a whole core (700-900
    /// MB/s) looked faster, and compressed 8-16 % of the guest in 3-4 runs of 8.
    /// But never less than [`IDLE_FLOOR`] of its cores: on a machine with no core
    /// idle the scheduler still shares the cores with a thread that wants one, and a
    /// slow link must not be left to raw because other work keeps the cores busy.
    pub(super) fn cores_for(&self, i: usize) -> f64 {
        let cur = &self.arms[self.current];
        match self.idle {
            Some(idle) if cur.params.codec == CodecId::RAW && i != self.current => {
                let used = cur.realized.map_or(0.0, |(r, _, _)| r * cur.cost);
                self.cores.min((idle + used).max(IDLE_FLOOR * self.cores))
            }
            _ => self.cores,
        }
    }

    /// Where a window lately found the receiver, not the link, the limit (its sends
    /// waited on the receiver's window most of the time): the guest bytes per second
    /// the current choice moved, which no candidate is expected to beat. The
    /// receiver's work per guest byte (placing the page, its page fault on fresh
    /// memory) does not shrink with compression, and a decoder adds to it; so among
    /// candidates that all reach it, the cheapest is taken (see
    /// [`Selector::best`]), which is raw where the link allows it.
    pub(super) fn receiver_cap(&self) -> Option<f64> {
        if !self.receiver_lately(self.now) {
            return None;
        }
        self.arms[self.current]
            .realized
            .filter(|&(_, at, _)| self.now.saturating_duration_since(at) < REALIZED_FOR)
            .map(|(r, _, _)| r)
    }

    /// Whether a window found the receiver the limit within [`PEER_HOLDS`] of `now`.
    pub(super) fn receiver_lately(&self, now: Instant) -> bool {
        self.peer_bound
            .is_some_and(|at| now.saturating_duration_since(at) < PEER_HOLDS)
    }

    /// Whether the busy link is a fixed pipe: at least one other candidate has been the
    /// choice in a busy window lately, and the source's channels together accepted
    /// about as many bytes per second under each as under the current one (not the
    /// receiver's work on the same cores, which accepts more bytes of a codec that costs
    /// it less).
    pub(super) fn fixed_link(&self) -> bool {
        let Some((cur, _)) = self.arms[self.current].wire else {
            return false;
        };
        let fresh =
            |at: Instant| self.now.saturating_duration_since(at) < REALIZED_FOR * (1 << MAX_LOSSES);
        let others = self
            .arms
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != self.current)
            .filter_map(|(_, a)| a.wire.filter(|&(_, at)| fresh(at)).map(|(w, _)| w));
        let mut any = false;
        for w in others {
            if w > cur * WIRE_DIFFERS || cur > w * WIRE_DIFFERS {
                return false;
            }
            any = true;
        }
        any
    }

    /// The fastest candidate; among those within [`NEAR`] of it, the one that costs
    /// the least core time (the link caps them all alike). On a busy link that is a
    /// fixed pipe, within [`CHEAP_NEAR`]: there the core a cheaper candidate saves
    /// idles, while the pages it loses are lost (with [`NEAR`], zstd:1 was kept where
    /// zstd:3 moves 7 % more at 1 Gbit/s).
    pub(super) fn best(&self) -> usize {
        let top = (0..self.arms.len())
            .map(|i| self.rate(i))
            .fold(f64::MIN, f64::max);
        let near = if self.limited && self.fixed_link() {
            CHEAP_NEAR
        } else {
            NEAR
        };
        let near_top = |i: usize| self.rate(i) * near >= top;
        // On a busy link, not one whose estimate was raised to that of a candidate that
        // compresses at least as well (its own said it compresses more, which it
        // cannot): the two tie on paper, and the cheaper one, lz4 or zstd:-5, sent
        // 10-20 % more bytes than zstd:1 in its stead.
        let tied_up = |i: usize| {
            self.limited
                && (0..self.arms.len()).any(|b| {
                    near_top(b)
                        && compresses_as_well(self.arms[b].params, self.arms[i].params)
                        && self.ratio(i) <= self.ratio(b)
                })
        };
        (0..self.arms.len())
            .filter(|&i| near_top(i) && !tied_up(i))
            .min_by(|&a, &b| self.arms[a].cost.total_cmp(&self.arms[b].cost))
            .unwrap_or(0)
    }
}
