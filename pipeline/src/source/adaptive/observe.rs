//! What the selector measures: each frame's encode (cost and ratio), the guest bytes
//! the channel moved per second while a candidate was the choice, and the link, from
//! the bytes handed to the channel, the time spent waiting on it and, where the
//! channel tells, what it still holds unacknowledged. The choice itself is in the
//! parent module.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagewire_protocol::CodecId;

use super::*;

/// What the channels of one source, which share the link, tell each other of it.
///
/// First, what the first channel to find the link slow measured in its early window:
/// bytes per second (`f64` bits; 0 until then). The channels
/// share the link, and a channel whose neighbour's frames keep it from waiting 95 % of
/// a window would otherwise send raw frames for its first 100–250 ms: at 1 Gbit/s on a
/// compressible guest, a few percent of the guest's bytes sent raw cost a tenth of the
/// migration's time on the wire.
///
/// It also keeps what left each channel in its latest window. The channels share the
/// link, and one channel's share of a fixed pipe swings with its neighbours' demand
/// (43-66 MB/s for one of two channels on a 1 Gbit/s link: 1.5x, more than
/// [`WIRE_DIFFERS`]), while their sum stays at the link's rate: a busy window measures
/// the wire of the current choice by that sum (see [`Selector::fixed_link`]).
///
/// And, where the source gives a reader for it, the machine's idle CPU time (see
/// [`Selector::cores_for`]).
#[derive(Debug, Default)]
pub(crate) struct SharedLink {
    /// The early window's figure (see above).
    start: AtomicU64,
    /// Per channel: bytes per second that left it in its latest window, and when.
    drained: Mutex<Vec<Option<(f64, Instant)>>>,
    /// Reads the machine's idle and total CPU time (`/proc/stat`); `None`: not known.
    cpu: Option<CpuReader>,
    /// Cores the source may use, and its channels: idle cores are shared among them.
    cores: f64,
    channels: f64,
    idle: Mutex<Idle>,
}

/// Idle and total CPU time of the machine, in any one unit (the source reads
/// `/proc/stat`: `source::setup::proc_stat`).
pub(crate) type CpuReader = fn() -> Option<(u64, u64)>;

/// The latest reading of [`CpuReader`], and the idle cores found since the one before.
#[derive(Debug, Default)]
struct Idle {
    last: Option<(u64, u64, Instant)>,
    cores: Option<f64>,
}

/// How often the machine's idle time is read at most (a channel's window closes every
/// 100 ms, and the channels share the reading).
pub(super) const IDLE_EVERY: Duration = Duration::from_millis(50);

/// How long a channel's latest window counts in the source's total: three windows
/// (a channel that finished or stalls drops out of it).
const DRAINED_FOR: Duration = Duration::from_millis(300);

impl SharedLink {
    /// Also reads the machine's idle CPU with `cpu`, for a source that may use `cores`
    /// cores over `channels` channels.
    pub(crate) fn with_cpu(cpu: CpuReader, cores: usize, channels: u16) -> SharedLink {
        SharedLink {
            cpu: Some(cpu),
            cores: cores.max(1) as f64,
            channels: f64::from(channels.max(1)),
            ..SharedLink::default()
        }
    }

    /// Idle cores per channel between the latest two readings of the machine's CPU
    /// time, read again if the latest is [`IDLE_EVERY`] old; `None` until two were
    /// taken, or where it cannot be read.
    pub(super) fn idle_per_channel(&self, now: Instant) -> Option<f64> {
        let read = self.cpu?;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle
            .last
            .is_none_or(|(_, _, at)| now.saturating_duration_since(at) >= IDLE_EVERY)
            && let Some((i, t)) = read()
        {
            if let Some((pi, pt, _)) = idle.last
                && t > pt
            {
                let share = (i.saturating_sub(pi) as f64 / (t - pt) as f64).clamp(0.0, 1.0);
                idle.cores = Some(share * self.cores);
            }
            idle.last = Some((i, t, now));
        }
        idle.cores.map(|c| c / self.channels)
    }

    fn publish(&self, rate: f64) {
        let _ = self.start.compare_exchange(
            0,
            rate.max(1.0).to_bits(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub(super) fn get(&self) -> Option<f64> {
        match self.start.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// Records that `rate` bytes per second left `channel` in the window that ended at
    /// `now`; returns the sum over the channels whose latest window ended within
    /// [`DRAINED_FOR`] of `now` (this one's included): what left the source per
    /// second. Called once per window and channel (every 100 ms), so a lock is cheap.
    fn drained(&self, channel: u16, rate: f64, now: Instant) -> f64 {
        // A poisoned lock (a channel thread panicked) still holds valid figures.
        let mut all = self.drained.lock().unwrap_or_else(|e| e.into_inner());
        let ch = usize::from(channel);
        if all.len() <= ch {
            all.resize(ch + 1, None);
        }
        all[ch] = Some((rate, now));
        all.iter()
            .flatten()
            .filter(|&&(_, at)| now.saturating_duration_since(at) < DRAINED_FOR)
            .map(|&(r, _)| r)
            .sum()
    }
}

impl Selector {
    /// What encoding frame `i`'s `guest` bytes into `payload` bytes took (`None`: not
    /// known, the ratio only counts).
    pub(crate) fn observe_encode(
        &mut self,
        i: usize,
        guest: u64,
        payload: u64,
        took: Option<Duration>,
    ) {
        let frame = self.frame;
        if i >= self.arms.len() {
            return;
        }
        if guest > 0 {
            let spent = took.map_or(self.arms[i].cost * guest as f64, |t| t.as_secs_f64());
            self.explore_budget += EXPLORE_SHARE * spent;
            self.frame_bytes += 0.2 * (guest as f64 - self.frame_bytes);
        }
        let a = &mut self.arms[i];
        a.stats.frames += 1;
        a.stats.guest_bytes += guest;
        a.stats.payload_bytes += payload;
        if guest == 0 {
            return;
        }
        let ratio = payload as f64 / guest as f64;
        let first = a.measured == 0;
        if first {
            a.ratio = ratio;
        } else {
            a.ratio += ALPHA * (ratio - a.ratio);
        }
        if let Some(took) = took {
            let cost = took.as_secs_f64() / guest as f64;
            a.cost = match a.samples {
                // A candidate's first frame creates and faults in its codec's context
                // (zstd's workspace, deflate's compressor): here 3-5x slower than the
                // frames after it (zstd:1 96 MB/s against 300-700). It counts for no
                // slower than the prior; the next frame sets the cost, up to
                // [`SPIKE`] times the estimate.
                0 => cost.min(a.cost),
                1 => cost.min(SPIKE * a.cost),
                // A frame slower than the estimate counts as the median of its cost
                // and the two before it (the lesser of two): one frame slowed by what
                // is not its codec's (memory backed for the first time, the other
                // threads on the core) does not move the estimate, a codec that got
                // slower does from its second slow frame. Nothing makes a frame
                // faster than its codec: a faster one counts at once.
                _ => {
                    let seen = match a.costs {
                        _ if cost <= a.cost => cost,
                        [Some(p), Some(q)] => cost.max(p.min(q)).min(p.max(q)),
                        [Some(p), None] | [None, Some(p)] => cost.min(p),
                        [None, None] => cost,
                    };
                    a.cost + ALPHA * (seen - a.cost)
                }
            };
            if a.samples > 0 {
                a.costs = [Some(cost), a.costs[0]];
            }
            a.samples = a.samples.saturating_add(1);
        }
        let saved = (1.0 - ratio).max(0.0);
        if a.params.codec != CodecId::RAW {
            // The current compressor's frames (any compressor's while the current
            // choice is raw, which says nothing of the content) say how compressible
            // the content is now, against what they save on the reference; the frames
            // of the others, explored meanwhile, say how much they save on it.
            let anchor = self.current == i || self.arms[self.current].params.codec == CodecId::RAW;
            let a = &mut self.arms[i];
            if anchor {
                let c = (saved / a.saves.max(1e-3)).min(MAX_CONTENT);
                self.content += CONTENT_ALPHA * (c - self.content);
            } else if self.content >= MIN_CONTENT && a.pairs == 0 {
                let seen = saved / self.content.max(1e-3);
                a.saves = if first {
                    seen
                } else {
                    a.saves + ALPHA * (seen - a.saves)
                };
            }
        }
        let a = &mut self.arms[i];
        a.measured = frame.max(1);
    }

    /// Dedup found `copies` of a frame's pages sent before and left `data` pages for
    /// arm `i` to encode: raw, which skips dedup, would send them all (see
    /// [`Selector::ratio`]).
    pub(crate) fn observe_dedup(&mut self, i: usize, data: u64, copies: u64) {
        let all = data + copies;
        if all == 0
            || self
                .arms
                .get(i)
                .is_none_or(|a| a.params.codec == CodecId::RAW)
        {
            return;
        }
        let share = copies as f64 / all as f64;
        self.copy_share += ALPHA * (share - self.copy_share);
    }

    /// On the same sample of an explored frame, arm `i` saved `saved` of its bytes and
    /// the current choice `saved_current`: `i` saves that much more or less than the
    /// current one does on the reference content. Once paired, an arm's savings follow
    /// its pairs only, not its explored frames, which are other content than the
    /// current choice's frames they would be compared with.
    pub(crate) fn observe_pair(&mut self, i: usize, saved: f64, saved_current: f64) {
        // A sample the current choice hardly compresses tells nothing of the others.
        if i >= self.arms.len() || i == self.current || saved_current < PAIR_MIN_SAVED {
            return;
        }
        let seen = self.arms[self.current].saves * saved / saved_current;
        let a = &mut self.arms[i];
        a.saves = if a.pairs == 0 {
            seen
        } else {
            a.saves + PAIR_ALPHA * (seen - a.saves)
        };
        a.pairs += 1;
    }

    /// A frame handed over at `now` that the current choice did not encode (delta in
    /// its place): the time since the frame before is not counted in its window.
    pub(crate) fn skip_frame(&mut self, now: Instant) {
        self.frame_end = Some(now);
        self.now = self.now.max(now);
    }

    /// A frame of `guest` bytes was handed to the channel at `now`. The wall time since
    /// the previous one counts for the current choice (an exploring frame in between
    /// is a small share of it): over a window, the guest bytes per second the channel
    /// moved with it, end to end. `setup` is the wall time the frame spent having
    /// memory backed for the first time: a window that spent more than
    /// [`SETUP_SHARE`] of its time so measured the memory, not the codec, and is not
    /// counted (the dedup table, 32 MiB at 2 GiB, took the first frames 30-70 ms
    /// each on this machine, and the figures the first candidates realized then, 5-15
    /// MB/s, kept them out of the choice for the whole migration).
    pub(crate) fn observe_frame(&mut self, guest: u64, setup: Duration, now: Instant) {
        let Some(prev) = self.frame_end.replace(now) else {
            return;
        };
        self.now = self.now.max(now);
        if now < self.settle_until {
            return;
        }
        let ratio = self.ratio(self.current);
        let a = &mut self.arms[self.current];
        a.win_bytes += guest as f64;
        a.win_secs += now.saturating_duration_since(prev).as_secs_f64();
        a.win_setup += setup.as_secs_f64();
        if a.win_secs < WINDOW.as_secs_f64() || a.win_bytes <= 0.0 {
            return;
        }
        let r = a.win_bytes / a.win_secs;
        let setup = a.win_setup / a.win_secs;
        (a.win_bytes, a.win_secs, a.win_setup) = (0.0, 0.0, 0.0);
        if setup > SETUP_SHARE {
            return;
        }
        a.realized = Some(match a.realized {
            Some((old, at, then)) if now.saturating_duration_since(at) < 2 * WINDOW => {
                let old = old * then / ratio;
                (old + 0.5 * (r - old), now, ratio)
            }
            _ => (r, now, ratio),
        });
    }

    /// `bytes` handed to the channel, of which `blocked` was spent waiting on it (or on
    /// the bandwidth cap).
    #[cfg(test)]
    pub(crate) fn observe_send(&mut self, bytes: u64, blocked: Duration, now: Instant) {
        self.observe_send_unacked(bytes, blocked, None, || None, now);
    }

    /// [`Selector::observe_send`], with what the channel still held unacknowledged
    /// right after (`Channel::unacked_bytes`, when it can tell): the link's rate is
    /// then the bytes that left it, not the bytes it took in. While the socket's and
    /// the link's buffers fill (the first 100 ms of a migration at 1 Gbit/s) the two
    /// differ by 2–3x.
    ///
    /// `peer_limited` tells, when a window closes, how long the channel's sends have
    /// waited on the peer's receive window in all (`Channel::peer_limited`; `None`
    /// where the channel cannot tell): a window that waited so more than half its time
    /// measured the receiver, not the link (see [`Selector::receiver_cap`]).
    pub(crate) fn observe_send_unacked(
        &mut self,
        bytes: u64,
        blocked: Duration,
        unacked: Option<u64>,
        peer_limited: impl FnOnce() -> Option<Duration>,
        now: Instant,
    ) {
        self.window_bytes += bytes;
        self.window_blocked += blocked;
        self.unacked = unacked;
        self.peak_unacked = self.peak_unacked.max(unacked.unwrap_or(0));
        // Time spent waiting on the channel pays for exploring as encode time does: a
        // channel sending raw frames to a slow link, whose encode time is next to
        // nothing, still measures the compressors now and then, and finds content
        // that became compressible again. Not time waiting on the receiver: no
        // compressor would move more there (see [`Selector::receiver_cap`]), and on
        // cores it shares with the source each explored frame takes the receiver's
        // time (into fresh memory on loopback, a raw migration's explored frames
        // doubled its source's CPU).
        if !self.receiver_lately(now) {
            self.explore_budget += EXPLORE_SHARE * blocked.as_secs_f64();
        }
        let span = now.saturating_duration_since(self.window_start);
        // Until the link is known, a window that spent 95 % of its time waiting on
        // the channel closes early: the first choice is made blind (raw, on no
        // evidence), and on a slow link each of its frames costs several compressed
        // ones.
        // Where the channel tells what it holds, a window that spent half its time
        // waiting while what the channel holds grew by half of what it took in says
        // the same: the link drains far slower than the channel is fed; once what
        // it holds reached a megabyte, after a few milliseconds already.
        let grew = match (self.window_unacked, unacked) {
            (Some(a), Some(b)) => b.saturating_sub(a) >= self.window_bytes / 2,
            _ => false,
        };
        let filling = grew && unacked.is_some_and(|b| b >= BACKLOG);
        let half = self.window_blocked > span / 2;
        let early = self.link.is_none()
            && ((span >= FIRST_WINDOW
                && (self.window_blocked > span.mul_f64(0.95) || (grew && half)))
                || (span >= EARLY_SPAN && filling && half));
        // The window after an early one confirms its figure soon.
        let short = self.confirm && span >= FIRST_WINDOW;
        if span < WINDOW && !early && !short {
            return;
        }
        // A window whose sends waited on the receiver's window most of the time found
        // the receiver slow, not the link: into fresh destination memory on loopback,
        // raw frames wait so 85 % of the time, and pricing that as a slow link had
        // auto compress, which only took the receiver's cores.
        let peer = peer_limited();
        let receiver =
            peer.is_some_and(|p| p.saturating_sub(self.window_peer) > span.mul_f64(PEER_BOUND));
        let early = early && !receiver;
        if span < WINDOW && !early && !short {
            return;
        }
        if let Some(p) = peer {
            self.window_peer = p;
        }
        // What left the channel over the window, where it tells.
        let drained = match (self.window_unacked, unacked) {
            (Some(a), Some(b)) => (self.window_bytes + a).saturating_sub(b),
            _ => self.window_bytes,
        };
        let rate = drained as f64 / span.as_secs_f64();
        if early {
            // The link, busy; not the copy, which a window spent waiting cannot show.
            self.now = self.now.max(now);
            self.shared.publish(rate);
            self.found_slow(rate, now);
            return;
        }
        self.confirm = false;
        self.idle = self.shared.idle_per_channel(now);
        let per_byte = self.window_blocked.as_secs_f64() / self.window_bytes.max(1) as f64;
        self.now = self.now.max(now);
        // A link busy in every window never shows the copy alone: no copy is taken to
        // be slower than COPY_MAX.
        let copy = self
            .copy
            .map_or(per_byte, |c| (c * 1.02).min(per_byte))
            .min(COPY_MAX);
        self.copy = Some(copy);
        // A backlog that shrank over the window says the cores limited it: the link
        // drained faster than the channel was fed, and a deep queue (the TCP send
        // queue, the io_uring ring) carries the link through such a stretch. Pricing
        // it as link-bound had auto spend the cores on zstd while they were what
        // limited.
        let deep = matches!(
            (self.window_unacked, unacked),
            (Some(a), Some(b)) if a.min(b) >= BACKLOG
        );
        let backlog = deep && unacked >= self.window_unacked;
        self.limited = !receiver
            && (backlog || (per_byte > BLOCKED * copy && self.window_blocked > span / 10));
        self.windows += 1;
        if receiver {
            self.receiver_windows += 1;
            self.peer_bound = Some(now);
        }
        // The wire is what left all the channels of the source: one channel's share of
        // a fixed pipe swings with its neighbours' demand, their sum does not.
        let source = self.shared.drained(self.channel, rate, now);
        // A link that fell to a fraction of its figure is another link: what the
        // candidates moved and what the source accepted under them were measured on
        // the one before (see [`LINK_CHANGED`]), and so was the choice, which is made
        // again at once, as one made on an early figure that the link refuted.
        let changed = self.limited && self.link.is_some_and(|l| rate * LINK_CHANGED < l);
        if changed {
            for a in &mut self.arms {
                (a.realized, a.wire) = (None, None);
            }
            self.blind_on = self.link;
        }
        if self.limited {
            let w = &mut self.arms[self.current].wire;
            *w = Some((w.map_or(source, |(w, _)| w + 0.5 * (source - w)), now));
        }
        // A backlog deep all window, even one that shrank, kept the link busy all
        // along: what left is the link's rate, and a link that carried all it could is
        // credited nothing for not blocking. After a switch from raw to a compressor,
        // the raw bytes left in the socket drain for a few hundred milliseconds at
        // 1 Gbit/s without a send waiting: taken as a link that did not block, its
        // credit grew and moved the choice to lz4 or zstd:-5 for as long.
        let busy = self.limited || (deep && !receiver);
        // A window the receiver limited shows nothing of the link either: the sends
        // waited on the receiver, not on a link with room to spare. (Into fresh
        // destination memory at 1 Gbit/s, the credit grew through such windows until raw
        // looked as fast as zstd:1 for the receiver, and 10-16 % of the guest went raw
        // at a third of zstd:1's pages per second on the wire.)
        if busy || receiver {
            self.last_limited = now;
        }
        self.link = Some(match (self.link, busy) {
            // A busy link carries what it can: a drop is taken at once.
            (Some(l), true) if rate < l => rate,
            (Some(l), true) => l + 0.5 * (rate - l),
            (Some(l), false) => l.max(rate),
            (None, _) => rate,
        });
        self.next_window(now);
    }

    /// Starts the next window of [`Selector::observe_send`] at `now`.
    pub(super) fn next_window(&mut self, now: Instant) {
        self.window_start = now;
        self.window_unacked = self.unacked;
        self.window_bytes = 0;
        self.window_blocked = Duration::ZERO;
    }
}
