//! Per-frame codec choice (`CodecPolicy::Auto`, the default of `SourceConfig::codec`;
//! `--codec auto`): each channel picks, for every frame, the codec and level that
//! moves the most guest bytes per second given what it measured, so that neither the
//! link nor the channel's core idles while the other is the bottleneck.
//!
//! The model, per candidate `c` (a codec at a level):
//! - `cost(c)`: seconds of the channel's encode per guest byte, measured on recent
//!   frames of this guest: in the channel thread's CPU time when it encodes itself (no
//!   codec threads; wall time there swings 3x with the other threads on the same
//!   cores), otherwise in wall time from submit to completion; a candidate's first
//!   frame, which creates and faults in its codec's context, counts no slower than
//!   the prior, and the frame after it sets the cost (at most twice the estimate);
//!   after that a frame slower than the estimate counts as the median of its cost and
//!   the two before it, so one frame slowed by what is not its codec's moves nothing;
//!   the CPU the kernel takes to back memory for the first time (a new buffer, the
//!   dedup table's entries) is not counted;
//! - `ratio(c)`: payload bytes per guest byte on the content of now: the share of
//!   bytes `c` saves on a reference content (a prior until a frame measures it), times
//!   a content factor that the current compressor's frames keep up to date (its
//!   savings now over its savings on the reference). Candidates measured at different
//!   times, on parts of the guest that compress differently, are so compared on the
//!   same content; the others' share follows paired samples (the first pages of an
//!   explored frame encoded, off the wire, by it and by the current choice:
//!   `Selector::observe_pair`), or their explored frames until a pair is taken; no
//!   estimate has a candidate compress less than one it cannot beat (zstd at a lower
//!   level, lz4 against zstd at level 1 or above);
//! - `copy`: seconds per byte that handing a frame to an idle channel takes (the
//!   least seen lately, at most 0.3 ns: a link busy in every window never shows it
//!   alone): the thread's own cost of sending, on top of encoding;
//! - `link`: the bytes per second that left the channel while it was the bottleneck
//!   (handing bytes over took more than twice the copy, for a tenth of the window or
//!   more: time waiting on the channel or on the bandwidth cap). Where the channel
//!   tells what it holds unacknowledged (`Channel::unacked_bytes`: TCP's `SIOCOUTQ`),
//!   that is the bytes handed over less what the channel's holding grew by, the rate
//!   the link really drains at (a holding of 1 MiB or more all window, even one that
//!   shrank, kept the link busy: it is measured so, and credited nothing); otherwise
//!   the bytes handed over, which overstate it while the socket's and the link's
//!   buffers fill. While the channel does not block,
//!   the link is at least that, and the longer it goes without
//!   blocking the more the model credits it (twice as much after two seconds), so a
//!   cheaper codec gets tried and a link that got faster is found; the first window
//!   that blocks measures it again. Until the link is known, a window of 20 ms (from
//!   the first frame) spent 95 % waiting on the channel, or half waiting while what
//!   the channel holds grew by half of what it took in, measures it, and the first
//!   choice (made on no evidence) is reconsidered at once, on this channel and on the
//!   other channels of the source, which share the link (`SharedLink`); the first
//!   50 ms, which fill empty buffers, are not measured.
//!
//! The guest bytes per second of `c` are `1 / max(cost(c) / cores + ratio(c) * copy,
//! ratio(c) / link)`: the thread encodes and hands frames over while the link carries
//! the frames before them (where the current choice is raw, a compressor's `cores` is
//! at most the channel's share of the machine's idle cores plus what raw uses, and at
//! least half a core: `Selector::cores_for`), and the link's figure, what left the channel while it was
//! busy, already holds the copy where the copy is the link (loopback). What the channel
//! really moved while a candidate was the choice (guest bytes per second of wall time
//! between frames handed over, over a window: encode, send, and whatever the receiver's
//! work on the same cores slowed them by; a window that spent more than a tenth of its
//! time having memory backed for the first time is not counted) bounds its figure,
//! since where the link is the same cores (loopback, a veth pair) compression saves
//! less than the model thinks; for a candidate that compresses less than the current
//! one it replaces the figure, since what the channel accepts under a compressor says
//! little of what it accepts raw when the receiver's CPU is what limits it, as long as
//! the channel is busy and the source's channels together accepted clearly more bytes
//! per second while this channel had that candidate than while it has the current one
//! (over a real link, whose rate does not depend on the codec, the model is the better
//! figure); it is scaled by how much the candidate's ratio changed since (content that
//! compresses worse moves fewer guest bytes over the same link). That measurement holds
//! 2 s, twice as long after each trial the candidate lost within a second (up to 8 s),
//! then the model may try it again. A candidate that would replace the current one
//! while its cost is still its prior is first measured on up to three frames, and the
//! choice made again at once (not at the start, where the first choice, made blind, is
//! found wrong by an early window: there every frame counts). A new choice is kept
//! until a window measured it (or, for a choice made on an early window's figure, the
//! link was found at less than two thirds of it: an early window can measure a burst,
//! and the window after it closes after 20 ms to confirm it; or a busy window found the
//! link below a quarter of its figure: another link, on which what each candidate moved
//! and what the source accepted under it before are forgotten), and after a switch to a
//! candidate that compresses less the first 50 ms are not measured (the socket's and
//! the link's buffers, which the compressor left empty, absorb them). The best candidate is the cheapest in core time
//! among those within 10 % of the fastest (within 2 % on a busy link that is a fixed
//! pipe: the source's channels together accepted about as many bytes per second while
//! this one had each candidate it measured there, whatever each channel's share of the
//! link, so a core saved idles while pages lost are lost; and on a busy link not one
//! whose ratio was raised to that of a candidate that compresses at least as well,
//! among those). It is taken when it beats the current one by 5 % (2 % on a busy fixed
//! pipe, where the candidates differ by their ratios alone), or, on a busy link, moves
//! within 2 % as much for a fifth less core time while sending no more bytes per guest
//! byte (within 2 %; where the receiver limits, whatever it sends). The choice is
//! reconsidered at most once per 100 ms window. At most one frame in `explore_every`,
//! and no more than 3 % of the time spent encoding or waiting on the channel, goes to
//! the compressor measured longest ago, one measured fewer than twice first (raw, whose
//! ratio and cost do not depend on the content, is never explored), so every estimate
//! follows the content as it changes class while a slow candidate is tried seldom. A
//! destination slower than the link shows as a slower link (it accepts less), unless
//! the channel tells how long its sends waited on the receiver's window
//! (`Channel::peer_limited`: TCP's `tcpi_rwnd_limited`): a window that waited so for
//! more than half its length measured the receiver, not the link. It measures no link
//! figure; for 300 ms after it, the current choice is priced at what it moved and no
//! other candidate above that (the receiver's work per guest page does not shrink with
//! compression, and a decoder adds to it), so the cheapest that reaches it is taken,
//! raw where the link figure allows: one that sends more bytes per guest byte than the
//! current one reaches it only where the link carries twice that of it, since the
//! receiver's rate swings by more than that (into fresh memory, between stretches of
//! first writes and stretches without); such a window does not credit the link for
//! not blocking (its sends waited on the receiver); and time spent waiting on the
//! receiver does not pay for exploring.
//!
//! Pure logic: time comes in as arguments, nothing here does IO (the machine's idle
//! time comes from a reader the source gives, `SharedLink::with_cpu`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire_accel::{EncodeParams, Level};
use pagewire_protocol::CodecId;

use crate::stats::{AdaptiveStats, ChoiceStats, CodecSwitch};

/// What the adaptive choice chooses among.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptiveConfig {
    /// Codecs and levels; those the destination cannot decode are left out. Levels are
    /// clamped into each codec's range.
    pub candidates: Vec<(CodecId, i32)>,
    /// At most one frame in this many goes to the compressor measured longest ago (at
    /// least 2), within 3 % of the time spent encoding or waiting on the channel.
    pub explore_every: u32,
}

impl AdaptiveConfig {
    /// These candidates and delta for pages whose previous version is cached (see
    /// `source/adaptive/delta.rs`): from the second round on, the source keeps what
    /// it sends of each page in its delta cache (`SourceConfig::delta_cache_pages`
    /// per channel), and a frame whose pages are all there goes as delta when that
    /// sends no more than the current compressor. It asks for CRC32C, as delta does
    /// (PROTOCOL.md, Delta format), and needs the software codecs.
    pub fn with_delta(mut self) -> Self {
        if !self.candidates.iter().any(|&(c, _)| c == CodecId::DELTA) {
            self.candidates.push((CodecId::DELTA, 0));
        }
        self
    }

    /// Whether delta is among the candidates.
    pub fn has_delta(&self) -> bool {
        self.candidates.iter().any(|&(c, _)| c == CodecId::DELTA)
    }
}

impl Default for AdaptiveConfig {
    /// raw, lz4, zstd at -5, 1 and 3, deflate at 1; one frame in 16 explores.
    fn default() -> Self {
        Self {
            candidates: vec![
                (CodecId::RAW, 0),
                (CodecId::LZ4, 0),
                (CodecId::ZSTD, -5),
                (CodecId::ZSTD, 1),
                (CodecId::ZSTD, 3),
                (CodecId::DEFLATE, 1),
            ],
            explore_every: 16,
        }
    }
}

/// How long the link is observed before its estimate changes.
const WINDOW: Duration = Duration::from_millis(100);
/// Before the link is known, a window this long that was mostly spent waiting on the
/// channel is enough to measure it.
const FIRST_WINDOW: Duration = Duration::from_millis(20);
/// Before the link is known, a window this long is enough where the channel's holding
/// reached [`BACKLOG`], grew by half of what it took in, and half the window was spent
/// waiting: the link drains far slower than raw frames come. At 1 Gbit/s the blind
/// raw start put 3.5 MB into each channel's socket in 20 ms, 2-3 % of a compressed
/// migration's bytes on the wire.
const EARLY_SPAN: Duration = Duration::from_millis(4);
/// A window whose seconds per byte handed to the channel exceed the plain copy's by
/// this factor found the link busy.
const BLOCKED: f64 = 2.0;
/// What the channel holds unacknowledged (socket and send queue) at both ends of a
/// window for the window to count as link-bound whatever its sends waited: the link
/// had bytes to carry all along. A TCP channel queues megabytes before `send` waits.
const BACKLOG: u64 = 1 << 20;
/// How long a candidate's realized rate bounds its model, at first: doubled each time
/// a trial of it lost right away (at most [`MAX_LOSSES`] times).
const REALIZED_FOR: Duration = Duration::from_secs(2);
/// Trials lost in a row that lengthen how long a realized rate holds.
const MAX_LOSSES: u32 = 2;
/// A candidate that was the choice for less than this before another replaced it lost
/// its trial.
const TRIAL: Duration = Duration::from_secs(1);
/// The slowest copy assumed, seconds per byte (3.3 GB/s: slower than any memory
/// copy and any loopback send here; at 1 ns, where the link was busy in every window
/// and so never showed the copy alone, it took a third of a nanosecond per guest byte
/// from zstd:1 against zstd:-5, and at 10 Gbit/s a nanosecond from raw against lz4).
const COPY_MAX: f64 = 0.3e-9;
/// How fast the credit of a link that does not block grows, per second unblocked.
const PROBE_PER_S: f64 = 0.5;
/// A new best must beat the current candidate by this factor.
const HYSTERESIS: f64 = 1.05;
/// Candidates within this factor of the fastest count as fast as it (estimates of
/// candidates measured a while ago lag): the one that costs the least core wins.
const NEAR: f64 = 1.10;
/// On a busy link a cheaper candidate replaces the current one only if it moves this
/// close to as much: the core it saves idles, while the pages it loses are lost (with
/// [`NEAR`], lz4 replaced zstd:1 on poorly compressible stretches at 1 Gbit/s for 8 %
/// fewer pages).
const CHEAP_NEAR: f64 = 1.02;
/// A candidate under which the channel accepted this many times the bytes per second
/// it accepts under the current one shows a link that depends on the codec (the
/// receiver's work on the same cores), not a fixed pipe.
const WIRE_DIFFERS: f64 = 1.25;
/// How long after a switch to a candidate that compresses less its frames are not
/// measured.
const SETTLE: Duration = Duration::from_millis(50);
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.15;
/// A window of what the channel moved that spent more than this share of its time
/// having memory backed for the first time is not counted.
const SETUP_SHARE: f64 = 0.1;
/// A candidate's first frame after the warm-up one sets its cost, up to this many
/// times the estimate (a cost that really is higher follows within two more frames).
const SPIKE: f64 = 2.0;
/// Raw's ratio is at most 1 over this (with 95 % of pages copies, raw sends 20 times the
/// bytes).
const MIN_RAW_SHARE: f64 = 0.05;
/// Weight of a new paired sample in an arm's savings (see
/// [`Selector::observe_pair`]).
const PAIR_ALPHA: f64 = 0.3;
/// Below this share saved by the current choice, a paired sample is not used.
const PAIR_MIN_SAVED: f64 = 0.05;
/// Weight of a new frame of the current compressor in the content factor: it follows
/// the content within a few frames.
const CONTENT_ALPHA: f64 = 0.3;
/// Below this content factor (content next to incompressible) a frame cannot tell
/// one compressor from another: the others' savings are not updated from it.
const MIN_CONTENT: f64 = 0.1;
/// The content factor's bound: content at most this much more compressible than the
/// reference (a compressor whose reference savings are small would otherwise scale
/// every other one's without bound).
const MAX_CONTENT: f64 = 2.0;
/// The least payload per guest byte the model expects of any candidate.
const MIN_RATIO: f64 = 0.01;
/// Share of the encode time that exploring other candidates may take: a slow
/// candidate is tried less often than a fast one.
const EXPLORE_SHARE: f64 = 0.03;
/// A candidate whose cost is still its prior (a guess on the slow side, but not for
/// every machine: lz4's 500 MB/s was 400-446 on cores shared with the receivers) is
/// measured on up to this many frames before it replaces the current choice, unless
/// the choice was made blind: at 10 Gbit/s raw went to lz4 on its prior for 500 ms,
/// 3-13 % of the guest, and the migration moved 0.73-0.91x static raw.
const PROBE_FRAMES: u32 = 3;
/// Switches kept in the statistics' log, per channel.
const LOG: usize = 32;
/// A window whose sends waited on the peer's receive window (`Channel::peer_limited`)
/// for more than this share of it measured the receiver, not the link.
const PEER_BOUND: f64 = 0.5;
/// How long after such a window the receiver's rate bounds every candidate.
const PEER_HOLDS: Duration = Duration::from_millis(300);
/// While the receiver limits, a candidate that sends more bytes per guest byte than the
/// current one is priced at no more than this fraction of what the link carries of it:
/// the receiver's rate swings by this much and more between stretches of first writes
/// and stretches without (78 against 201 MB/s per channel at 1 Gbit/s into fresh
/// memory).
const RECEIVER_SWING: f64 = 2.0;
/// A link figure this many times below the early one the current choice was made on
/// refutes it: the choice is made again without waiting for a window of what it
/// moved. At 1 Gbit/s an early window measured 132-217 MB/s for one channel (a
/// burst into the link's empty bucket), the next ones 60; the choice made on the
/// burst (zstd:-5 or lz4) was kept for 300-420 ms, since the first frames' windows,
/// spent backing the dedup table, measured nothing: 2-3 % of the guest at a ratio
/// of 0.40 where zstd:1 sent 0.25. (The window after an early one closes after
/// [`FIRST_WINDOW`] for the same reason.) Later choices wait as before: at 10 Gbit/s
/// over veth single windows measured 117 MB/s.
const LINK_MOVED: f64 = 1.5;
/// A busy window that measured the link at less than this fraction of its figure found
/// another link (a cap lowered mid-run): the figures of what each candidate moved and
/// what the source accepted under it, measured on the link before, are dropped. A
/// channel's share of a fixed pipe swings by up to 1.5x, and a destination on the same
/// cores under other work that comes and goes by up to 3x (where the choice needs
/// what raw moved to come back to it). With 20 Gbit/s lowered to 1 Gbit/s, raw's 700
/// MB/s, moved on the fast link, still counted as what the channel accepts raw when
/// the receiver limits (see [`Selector::rate`]): the choice went from zstd:1 back to
/// raw for 200 ms over the slow link.
const LINK_CHANGED: f64 = 4.0;
/// The least share of its cores a compressor replacing raw is priced on, however few
/// the machine has idle (see [`Selector::cores_for`]).
const IDLE_FLOOR: f64 = 0.5;

#[derive(Debug)]
struct Arm {
    params: EncodeParams,
    label: String,
    /// Seconds per guest byte.
    cost: f64,
    /// Payload bytes per guest byte on its recent frames, as measured (shown in the
    /// statistics; the model uses `saves`).
    ratio: f64,
    /// The share of bytes it saves on content of the kind the selector takes as its
    /// reference (see [`Selector::content`]): its frames' savings over the content
    /// factor when they were measured. A prior (see [`prior`]) until one is.
    saves: f64,
    /// Frame number of the last measurement (0: a prior only).
    measured: u64,
    /// Frames measured (the first only warms the codec's context: see
    /// [`Selector::observe_encode`]).
    samples: u32,
    /// Seconds per guest byte of the latest two frames measured after the first, the
    /// latest first.
    costs: [Option<f64>; 2],
    /// Guest bytes per second the channel actually moved while it was the choice
    /// (wall time between frames handed over: encode, send, and whatever the
    /// destination or other work on the same cores slowed them by), when, and its
    /// ratio then (on content that compresses differently now, the rate is scaled by
    /// the change of its ratio, as on a busy link).
    realized: Option<(f64, Instant, f64)>,
    /// Guest bytes and wall seconds of the window being measured for `realized`.
    win_bytes: f64,
    win_secs: f64,
    /// Of which spent having memory backed for the first time.
    win_setup: f64,
    /// Trials lost in a row (see [`REALIZED_FOR`]).
    losses: u32,
    /// Paired samples taken of it (see [`Selector::observe_pair`]).
    pairs: u32,
    /// Bytes per second the source's channels together accepted in busy windows of
    /// this channel while it was the choice (one channel's share of a link swings with
    /// what the others send; see [`SharedLink`]).
    /// Over a real link every candidate sees the same figure; where the link is the
    /// receiver's work on the same cores, a candidate that compresses less sees more
    /// (raw costs the receiver less per byte than a decoder does). With when it was
    /// last measured: a figure older than the longest a realized rate holds (8 s) may
    /// be of another link.
    wire: Option<(f64, Instant)>,
    stats: ChoiceStats,
}

/// A label for a codec at a level, as the statistics show it (`zstd:-5`, `lz4`).
pub fn label(codec: CodecId, level: i32) -> String {
    let name = match codec {
        CodecId::RAW => "raw",
        CodecId::LZ4 => "lz4",
        CodecId::ZSTD => "zstd",
        CodecId::DEFLATE => "deflate",
        CodecId::DEFLATE_4K => "deflate-4k",
        CodecId::DELTA => "delta",
        _ => return format!("{codec:?}"),
    };
    match codec {
        CodecId::ZSTD | CodecId::DEFLATE | CodecId::DEFLATE_4K => format!("{name}:{level}"),
        _ => name.to_string(),
    }
}

/// A starting guess (seconds per byte, ratio) until a frame measures the candidate:
/// on the slow side (a core shared with other work), since a frame spent on a
/// compressor that is slower than guessed costs far more than one sent raw.
fn prior(codec: CodecId, level: i32) -> (f64, f64) {
    let (bytes_per_s, ratio) = match codec {
        CodecId::RAW => (4e9, 1.0),
        CodecId::LZ4 => (5e8, 0.5),
        CodecId::ZSTD if level < 0 => (4e8, 0.45),
        CodecId::ZSTD if level <= 1 => (3e8, 0.35),
        CodecId::ZSTD => (1.5e8, 0.33),
        _ => (1e8, 0.37),
    };
    (1.0 / bytes_per_s, ratio)
}

/// Whether `b` compresses any content at least as well as `a`, as the codecs are
/// built: zstd at a higher level than at a lower one, and zstd at level 1 or above
/// (entropy-coded) than lz4.
fn compresses_as_well(b: EncodeParams, a: EncodeParams) -> bool {
    match (b.codec, a.codec) {
        (CodecId::ZSTD, CodecId::ZSTD) => b.level.0 > a.level.0,
        (CodecId::ZSTD, CodecId::LZ4) => b.level.0 >= 1,
        _ => false,
    }
}

/// Why the choice changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The link limits the current codec: one that compresses more moves more.
    LinkBound,
    /// The core limits the current codec: a cheaper one moves more.
    CpuBound,
    /// Another moves as much for less core time.
    Cheaper,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::LinkBound => "link-bound",
            Reason::CpuBound => "cpu-bound",
            Reason::Cheaper => "cheaper",
        }
    }
}

/// One channel's selector.
#[derive(Debug)]
pub(crate) struct Selector {
    arms: Vec<Arm>,
    current: usize,
    frame: u64,
    explore_every: u64,
    /// Cores that encode this channel's frames.
    cores: f64,
    /// The machine's idle cores, per channel of the source, in the latest window
    /// (`None`: not known).
    idle: Option<f64>,
    /// Measured link bytes per second, once known.
    link: Option<f64>,
    /// How compressible the content is now, relative to the reference: the current
    /// compressor's recent savings over its `saves`. Every candidate's ratio moves with
    /// it, so candidates measured at different times, on different parts of the guest,
    /// are compared on the content of now.
    content: f64,
    /// The share of data pages dedup found sent before, lately (0 without dedup).
    copy_share: f64,
    /// Seconds per byte that handing bytes to an idle channel takes (its copy): the
    /// least seen, creeping up 2 % a window so it follows a machine that got slower.
    copy: Option<f64>,
    limited: bool,
    /// A window closed early found a slow link before anything else was measured:
    /// the blind first choice is reconsidered at once.
    blind: bool,
    /// The link's figure came from an early window (this channel's or another's): the
    /// next window closes after [`FIRST_WINDOW`], so a burst it measured is corrected
    /// within milliseconds.
    confirm: bool,
    /// What this source's channels found of the link at the start.
    shared: Arc<SharedLink>,
    /// When a window last found the link busy.
    last_limited: Instant,
    /// The latest time given.
    now: Instant,
    /// The choice is reconsidered at most once a window.
    next_decision: Instant,
    window_start: Instant,
    window_bytes: u64,
    window_blocked: Duration,
    /// What the channel held unacknowledged after the latest send, and when the window
    /// started (see [`Selector::observe_send_unacked`]).
    unacked: Option<u64>,
    window_unacked: Option<u64>,
    /// The most `unacked` was.
    peak_unacked: u64,
    /// How long the channel's sends had waited on the peer's receive window in all
    /// when the window started (`Channel::peer_limited`; zero where it cannot tell).
    window_peer: Duration,
    /// When a window last found the receiver, not the link, the limit (see
    /// [`Selector::receiver_cap`]).
    peer_bound: Option<Instant>,
    /// Windows measured, and those the receiver limited.
    windows: u64,
    receiver_windows: u64,
    started: Instant,
    channel: u16,
    switches: Vec<CodecSwitch>,
    log: Vec<CodecSwitch>,
    explored: u64,
    /// A candidate that would replace the current one on its prior alone, measured
    /// first (see [`PROBE_FRAMES`]), and the frames of it taken so far.
    probe: Option<(usize, u32)>,
    /// Encode seconds exploring may still spend (grows with every frame).
    explore_budget: f64,
    /// Guest bytes of a recent frame, to price an exploration.
    frame_bytes: f64,
    /// When the last frame was handed over.
    frame_end: Option<Instant>,
    /// When the current choice was made.
    chosen_at: Instant,
    /// The early link figure the current choice was made on, until the choice is
    /// made again (see [`LINK_MOVED`]); or the figure of a link that changed since
    /// the choice was made (see [`LINK_CHANGED`]).
    blind_on: Option<f64>,
    /// Frames handed over before this are not measured: after a switch to a candidate
    /// that compresses less, the socket and the link's queue absorb the first of them
    /// (raw fills the buffers a compressor left empty, and would look faster than the
    /// link).
    settle_until: Instant,
    /// Delta for cached pages, when among the candidates.
    delta: Option<DeltaGate>,
}

impl Selector {
    /// A selector over the candidates `usable` allows; `None` when none is. Delta
    /// among them (and usable) enables delta for cached pages (`delta.rs`).
    pub(crate) fn new(
        config: &AdaptiveConfig,
        usable: impl Fn(CodecId) -> bool,
        raw_in_place: bool,
        cores: usize,
        channel: u16,
        now: Instant,
    ) -> Option<Selector> {
        let mut arms: Vec<Arm> = Vec::new();
        for &(codec, level) in &config.candidates {
            let Some((min, max)) = pagewire_accel::level_range(codec) else {
                continue;
            };
            let level = level.clamp(min.0, max.0);
            let label = label(codec, level);
            if !usable(codec) || codec == CodecId::DELTA || arms.iter().any(|a| a.label == label) {
                continue;
            }
            let (cost, ratio) = prior(codec, level);
            arms.push(Arm {
                params: EncodeParams {
                    codec,
                    level: Level(level),
                    raw_in_place,
                    remember: false,
                },
                stats: ChoiceStats {
                    choice: label.clone(),
                    ..Default::default()
                },
                label,
                cost,
                ratio,
                saves: 1.0 - ratio,
                measured: 0,
                samples: 0,
                costs: [None; 2],
                realized: None,
                win_bytes: 0.0,
                win_secs: 0.0,
                win_setup: 0.0,
                losses: 0,
                pairs: 0,
                wire: None,
            });
        }
        if arms.is_empty() {
            return None;
        }
        let delta = (config.has_delta() && usable(CodecId::DELTA)).then(DeltaGate::new);
        let mut s = Selector {
            arms,
            delta,
            current: 0,
            frame: 0,
            explore_every: u64::from(config.explore_every.max(2)),
            cores: cores.max(1) as f64,
            idle: None,
            link: None,
            content: 1.0,
            copy_share: 0.0,
            copy: None,
            limited: false,
            blind: false,
            confirm: false,
            shared: Arc::default(),
            last_limited: now,
            now,
            next_decision: now,
            window_start: now,
            window_bytes: 0,
            window_blocked: Duration::ZERO,
            unacked: None,
            window_unacked: None,
            peak_unacked: 0,
            window_peer: Duration::ZERO,
            peer_bound: None,
            windows: 0,
            receiver_windows: 0,
            started: now,
            channel,
            switches: Vec::new(),
            log: Vec::new(),
            explored: 0,
            probe: None,
            explore_budget: 0.0,
            frame_bytes: 0.0,
            frame_end: None,
            chosen_at: now,
            blind_on: None,
            // The first frames fill the socket's and the link's empty buffers: not
            // measured, as after a switch to less compression.
            settle_until: now + SETTLE,
        };
        s.current = s.best();
        Some(s)
    }

    /// The current choice: its index and parameters.
    pub(crate) fn current(&self) -> (usize, EncodeParams) {
        (self.current, self.arms[self.current].params)
    }

    /// Whether the link's rate was measured (or told by another channel) yet.
    pub(crate) fn link_known(&self) -> bool {
        self.link.is_some() || self.shared.get().is_some()
    }

    /// The selector, sharing what the first channel to find the link slow measured
    /// with the other channels of its source.
    pub(crate) fn with_shared(mut self, shared: Arc<SharedLink>) -> Selector {
        self.shared = shared;
        self
    }

    /// The link as found slow at the start, by this channel's early window or another
    /// channel's: the blind first choice is reconsidered at once.
    fn found_slow(&mut self, rate: f64, now: Instant) {
        (self.link, self.limited, self.last_limited) = (Some(rate), true, now);
        (self.blind, self.confirm) = (true, true);
        self.next_window(now);
    }

    /// The candidate for the next frame: its index (for [`Selector::observe_encode`])
    /// and its parameters.
    pub(crate) fn choose(&mut self, now: Instant) -> (usize, EncodeParams) {
        self.frame += 1;
        self.now = self.now.max(now);
        if self.frame == 1 {
            // The clocks start with the first frame, not when the channel was set up:
            // a first window that began before any frame could not be 95 % waiting.
            (self.window_start, self.started, self.chosen_at) = (now, now, now);
            (self.window_bytes, self.window_blocked) = (0, Duration::ZERO);
            // Nothing sent yet is nothing held.
            self.window_unacked = Some(self.unacked.unwrap_or(0));
            (self.next_decision, self.settle_until) = (now, now + SETTLE);
        }
        if self.link.is_none()
            && let Some(rate) = self.shared.get()
        {
            // Another channel found the link slow: this one is sending blind on it.
            self.found_slow(rate, now);
        }
        if self.frame.is_multiple_of(self.explore_every) && self.arms.len() > 1 {
            // The compressor measured longest ago, other than the current one, if the
            // budget affords a frame of it; first one measured fewer than twice (its
            // first frame only warms its context: see `Selector::observe_encode`). Raw
            // is never explored: its ratio is 1 and its cost next to nothing whatever
            // the content, and on a slow link a raw frame costs several compressed ones.
            let i = (0..self.arms.len())
                .filter(|&i| i != self.current && self.arms[i].params.codec != CodecId::RAW)
                .min_by_key(|&i| (self.arms[i].samples >= 2, self.arms[i].measured))
                .unwrap_or(self.current);
            // Its encode, or its time on the link if that is longer (a frame that
            // compresses little costs a slow link more than the core).
            let wire = self
                .link
                .map_or(0.0, |l| self.ratio(i) * self.frame_bytes / l.max(1.0));
            let price = (self.arms[i].cost * self.frame_bytes).max(wire);
            if i != self.current && price <= self.explore_budget {
                self.explore_budget -= price;
                self.explored += 1;
                return (i, self.arms[i].params);
            }
        }
        // A candidate about to replace the current one on its prior is measured first,
        // then the choice is made again at once.
        let mut probed = false;
        if let Some((i, taken)) = self.probe.take() {
            if self.arms[i].samples < 2 && taken < PROBE_FRAMES {
                return self.probe_frame(i, taken + 1);
            }
            probed = true;
        }
        // A blind first choice found wrong by an early window is reconsidered at once,
        // without moving the schedule of the others.
        let blind = std::mem::take(&mut self.blind);
        // So is one made on an early figure that the link was found far below.
        let moved = self
            .blind_on
            .zip(self.link)
            .is_some_and(|(then, l)| l * LINK_MOVED < then);
        if now < self.next_decision && !blind && !probed && !moved {
            return (self.current, self.arms[self.current].params);
        }
        if !blind {
            self.next_decision = now + WINDOW;
        }
        // A new choice is kept until a window measured it (at most four windows);
        // the first choice, made before anything was measured, is not.
        let measured = self.arms[self.current]
            .realized
            .is_some_and(|(_, at, _)| at > self.chosen_at);
        // A probe was begun past this point: its end is not held here.
        if !measured
            && !blind
            && !probed
            && !moved
            && now.saturating_duration_since(self.chosen_at) < 4 * WINDOW
        {
            return (self.current, self.arms[self.current].params);
        }
        self.blind_on = if blind { self.link } else { None };
        let best = self.best();
        let (now_rate, best_rate) = (self.rate(self.current), self.rate(best));
        // On a busy link that is a fixed pipe the candidates differ by their ratios
        // alone, which paired samples measure on the same pages: a smaller margin
        // keeps the one that compresses more (zstd:3 moved 5 % more pages than zstd:1
        // at 1 Gbit/s, right at the margin, and the choice hovered between them).
        let margin = if self.limited && self.fixed_link() {
            CHEAP_NEAR
        } else {
            HYSTERESIS
        };
        let faster = best_rate > now_rate * margin;
        // As fast on a busy link (whose figure is measured, not credited), for a fifth
        // less core time at least.
        // On a busy link (not the receiver) that holds only for one that sends no more
        // bytes per guest byte: the link carries as many bytes of either, so one
        // that sends more moves fewer pages whatever the figures say (at 1 Gbit/s,
        // zstd:3 at ratio 0.26 went to lz4 at 0.41 for 800 ms, its figure held down
        // by a first window that measured it low).
        let receiver = self.receiver_cap().is_some();
        let sends_no_more = self.ratio(best) <= self.ratio(self.current) * CHEAP_NEAR;
        let cheaper = (receiver || (self.limited && sends_no_more))
            && best_rate * CHEAP_NEAR >= now_rate
            && self.arms[best].cost < 0.8 * self.arms[self.current].cost;
        if best != self.current && (faster || cheaper) {
            if !blind && !probed && self.arms[best].samples < 2 {
                return self.probe_frame(best, 1);
            }
            self.switch_to(best, now, faster);
        }
        (self.current, self.arms[self.current].params)
    }

    /// Frame `taken` of the probe of arm `i` (see [`PROBE_FRAMES`]).
    fn probe_frame(&mut self, i: usize, taken: u32) -> (usize, EncodeParams) {
        self.probe = Some((i, taken));
        self.explored += 1;
        (i, self.arms[i].params)
    }
}

mod delta;
mod model;
mod observe;
mod switch;

use delta::DeltaGate;
pub(crate) use observe::SharedLink;

#[cfg(test)]
mod tests;
