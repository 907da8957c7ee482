//! The selector's tests: simulated links and machines, no wall clock. The choice
//! here; how the link is measured in `link.rs`.

use super::*;

mod cpu;
mod link;
mod receiver;

fn selector(now: Instant) -> Selector {
    let cfg = AdaptiveConfig::default();
    Selector::new(&cfg, |_| true, false, 1, 0, now).unwrap()
}

/// Feeds `frames` frames: each candidate encodes at its `(bytes/s, ratio)` from
/// `speeds`, and the link carries `link` bytes/s (blocking when asked for more).
fn drive(
    s: &mut Selector,
    now: &mut Instant,
    frames: usize,
    speeds: &dyn Fn(&str) -> (f64, f64),
    link: f64,
) -> Vec<String> {
    drive_copying(s, now, frames, speeds, link, 0.0)
}

/// [`drive`] where handing each byte to the channel also takes `copy` seconds of
/// the thread (loopback: the kernel copies on the sender's core).
fn drive_copying(
    s: &mut Selector,
    now: &mut Instant,
    frames: usize,
    speeds: &dyn Fn(&str) -> (f64, f64),
    link: f64,
    copy: f64,
) -> Vec<String> {
    let guest = 512 * 1024u64;
    let mut chosen = Vec::new();
    for _ in 0..frames {
        let (i, _) = s.choose(*now);
        let label = s.arms[i].label.clone();
        let (speed, ratio) = speeds(&label);
        let took = Duration::from_secs_f64(guest as f64 / speed);
        let payload = (guest as f64 * ratio) as u64;
        s.observe_encode(i, guest, payload, Some(took));
        let send = Duration::from_secs_f64(payload as f64 / link);
        // Sends overlap the next encode: only what exceeds it blocks; the copy
        // never overlaps.
        let blocked = send.saturating_sub(took) + Duration::from_secs_f64(payload as f64 * copy);
        *now += took + blocked;
        s.observe_send(payload, blocked, *now);
        s.observe_frame(guest, Duration::ZERO, *now);
        chosen.push(label);
    }
    chosen
}

fn tail_share(chosen: &[String], label: &str) -> f64 {
    let tail = &chosen[chosen.len() / 2..];
    tail.iter().filter(|l| *l == label).count() as f64 / tail.len() as f64
}

/// Random bytes: every compressor at its speed on text, leaving `ratio` of them.
fn random(ratio: f64) -> impl Fn(&str) -> (f64, f64) {
    move |label: &str| match label {
        "raw" => (10e9, 1.0),
        l => (text(l).0, ratio),
    }
}

/// Text-like content: zstd:3 compresses most, slowly; raw is free.
fn text(label: &str) -> (f64, f64) {
    match label {
        "raw" => (10e9, 1.0),
        "lz4" => (1.2e9, 0.45),
        "zstd:-5" => (800e6, 0.40),
        "zstd:1" => (350e6, 0.30),
        "zstd:3" => (150e6, 0.28),
        _ => (60e6, 0.32),
    }
}

#[test]
fn a_slow_link_gets_strong_compression_and_a_fast_one_gets_raw() {
    let mut now = Instant::now();
    let mut s = selector(now);
    // 1 Gbit/s: zstd:1 moves 125 MB/s / 0.30 = 416 MB/s (core 350): the best;
    // zstd:-5 (312 MB/s) is close, the probing of the link goes there at times.
    let slow = drive(&mut s, &mut now, 400, &text, 125e6);
    let zstd = tail_share(&slow, "zstd:1") + tail_share(&slow, "zstd:-5");
    assert!(zstd > 0.8 && tail_share(&slow, "raw") < 0.05, "{slow:?}");
    // The cap rises to 100 Gbit/s mid-run: raw.
    // (raw's rate measured at 1 Gbit/s holds a few seconds: then it is tried again)
    let fast = drive(&mut s, &mut now, 12000, &text, 12.5e9);
    assert!(tail_share(&fast, "raw") > 0.6, "{fast:?}");
    let st = s.stats();
    assert!(
        st.switches
            .iter()
            .any(|w| w.to == "raw" && w.reason == "cpu-bound")
    );
    assert!(
        st.switches
            .iter()
            .any(|w| w.from == "raw" || w.to == "zstd:1")
    );
    assert_eq!(
        st.choices.iter().map(|c| c.frames).sum::<u64>(),
        12400,
        "{st:?}"
    );
    // And back down to 1 Gbit/s: compression again, for the link's sake (zstd:1, whose
    // core is a little slower than the link, probes lz4 and zstd:-5 now and then, 200
    // ms each: a link that does not block is credited more).
    let slow = drive(&mut s, &mut now, 1000, &text, 125e6);
    let zstd = tail_share(&slow, "zstd:1") + tail_share(&slow, "zstd:-5");
    assert!(
        zstd > 0.6 && tail_share(&slow, "raw") < 0.05,
        "{:#?}",
        s.stats().recent
    );
    assert!(
        s.stats()
            .switches
            .iter()
            .any(|w| w.from == "raw" && w.reason == "link-bound")
    );
}

#[test]
fn on_loopback_the_send_copy_counts_and_raw_wins() {
    let mut now = Instant::now();
    let mut s = selector(now);
    // 0.4 ns a byte to send: raw 0.1 + 0.4 ns/B, lz4 0.83 + 0.45 × 0.4 ns/B.
    let chosen = drive_copying(&mut s, &mut now, 2000, &text, 1e12, 0.4e-9);
    assert!(tail_share(&chosen, "raw") > 0.8, "{chosen:?}");
}

/// A channel whose destination shares the machine: each frame's period is the
/// slowest of the source's encode plus its copy into the socket, the link, and the
/// destination's work on it (`dest`, seconds per guest byte, which a compressed
/// frame adds its decode to), varied by a fixed pseudo-random load of ±`jitter`
/// that changes every 200 frames, so some windows block and some do not, as on a
/// loaded machine. With `peer`, the channel tells how long its sends waited on the
/// destination (`Channel::peer_limited`: TCP's receive window): all of a frame's wait
/// where the destination's work is the slowest of the three.
/// Returns the choices and the guest bytes per second of the second half.
struct Machine<'a> {
    speeds: &'a dyn Fn(&str) -> (f64, f64),
    dest: &'a dyn Fn(&str) -> f64,
    copy: f64,
    link: f64,
    jitter: f64,
    peer: bool,
}

impl Machine<'_> {
    /// A frame's encode, its wait on the channel, and whether the destination is
    /// what it waited on.
    fn period(&self, label: &str, guest: f64, noise: f64) -> (Duration, Duration, bool) {
        let (speed, ratio) = (self.speeds)(label);
        let payload = guest * ratio;
        let took = guest / speed;
        let src = took + payload * self.copy;
        let dst = guest * (self.dest)(label) * (1.0 + self.jitter * noise);
        let period = src.max(dst).max(payload / self.link);
        (
            Duration::from_secs_f64(took),
            Duration::from_secs_f64(period - took),
            dst > src && dst > payload / self.link,
        )
    }

    /// Guest bytes per second of a static codec over the second half of `frames`
    /// frames, under the same load as [`Machine::run`].
    fn static_rate(&self, label: &str, frames: usize) -> f64 {
        let guest = 512.0 * 1024.0;
        let (mut bytes, mut secs) = (0.0, 0.0);
        for (f, noise) in Self::load(frames).enumerate() {
            if f >= frames / 2 {
                let (took, blocked, _) = self.period(label, guest, noise);
                bytes += guest;
                secs += (took + blocked).as_secs_f64();
            }
        }
        bytes / secs
    }

    /// The load of each frame, in [-1, 1]: it changes every 200 frames (other work
    /// comes and goes).
    fn load(frames: usize) -> impl Iterator<Item = f64> {
        let mut seed = 0x2545_f491_u64;
        (0..frames).map(move |f| {
            if f % 200 == 0 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            ((seed >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
        })
    }

    fn run(&self, s: &mut Selector, now: &mut Instant, frames: usize) -> (Vec<String>, f64) {
        let guest = 512 * 1024u64;
        let mut chosen = Vec::new();
        let (mut tail_bytes, mut tail_secs) = (0.0, 0.0);
        let mut waited = Duration::ZERO;
        for (f, noise) in Self::load(frames).enumerate() {
            let (i, _) = s.choose(*now);
            let label = s.arms[i].label.clone();
            let (took, blocked, receiver) = self.period(&label, guest as f64, noise);
            let ratio = (self.speeds)(&label).1;
            let payload = (guest as f64 * ratio) as u64;
            s.observe_encode(i, guest, payload, Some(took));
            *now += took + blocked;
            if receiver {
                waited += blocked;
            }
            s.observe_send_unacked(payload, blocked, None, || self.peer.then_some(waited), *now);
            s.observe_frame(guest, Duration::ZERO, *now);
            if f >= frames / 2 {
                tail_bytes += guest as f64;
                tail_secs += (took + blocked).as_secs_f64();
            }
            chosen.push(label);
        }
        (chosen, tail_bytes / tail_secs)
    }
}

/// Fresh destination memory at 1 GB/s, plus each codec's decode.
fn fresh_dest(label: &str) -> f64 {
    1e-9 + match label {
        "raw" => 0.0,
        "lz4" => 0.3e-9,
        "zstd:-5" | "zstd:1" | "zstd:3" => 1.0e-9,
        _ => 3e-9,
    }
}

fn best_static(m: &Machine<'_>, frames: usize) -> (String, f64) {
    ["raw", "lz4", "zstd:-5", "zstd:1", "zstd:3", "deflate:1"]
        .iter()
        .map(|l| (l.to_string(), m.static_rate(l, frames)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
}

#[test]
fn on_loopback_with_a_busy_destination_auto_matches_the_best_static_codec() {
    // The link is the same cores: the destination's page faults are what blocks
    // the channel, and its decode makes every compressor slower end to end.
    let m = Machine {
        speeds: &text,
        dest: &fresh_dest,
        copy: 0.1e-9,
        link: 1e12,
        jitter: 0.5,
        peer: false,
    };
    let (best, best_rate) = best_static(&m, 6000);
    assert_eq!(best, "raw");
    let mut now = Instant::now();
    let mut s = selector(now);
    let (chosen, rate) = m.run(&mut s, &mut now, 6000);
    assert!(
        rate >= 0.95 * best_rate,
        "auto {rate:.3e} B/s vs raw {best_rate:.3e}: {:?}",
        s.stats()
    );
    assert!(tail_share(&chosen, "raw") > 0.85, "{:?}", s.stats());
}

#[test]
fn on_a_slow_link_with_a_busy_destination_auto_matches_the_best_static_codec() {
    // With `peer`, the channel tells when its sends waited on the receiver: the
    // compressed frames do part of the time, raw ones would wait on the link, where
    // they move a third as many guest bytes; it must still compress.
    for peer in [false, true] {
        let m = Machine {
            speeds: &text,
            dest: &fresh_dest,
            copy: 0.1e-9,
            link: 125e6,
            jitter: 0.5,
            peer,
        };
        let (best, best_rate) = best_static(&m, 3000);
        assert!(best.starts_with("zstd"), "{best}");
        let mut now = Instant::now();
        let mut s = selector(now);
        let (chosen, rate) = m.run(&mut s, &mut now, 3000);
        assert!(tail_share(&chosen, "raw") < 0.05, "{:?}", s.stats());
        // zstd:1 and zstd:-5 are within 10 % of each other here and the load swings:
        // trials of the other cost a little (0.93-0.96x in this simulation).
        assert!(
            rate >= 0.9 * best_rate,
            "peer {peer}: auto {rate:.3e} B/s vs {best} {best_rate:.3e}: {:?}",
            s.stats()
        );
    }
}

#[test]
fn incompressible_content_goes_raw_even_on_a_slow_link() {
    let mut now = Instant::now();
    let mut s = selector(now);
    let _ = drive(&mut s, &mut now, 300, &text, 125e6);
    let chosen = drive(&mut s, &mut now, 600, &random(1.0), 125e6);
    assert!(tail_share(&chosen, "raw") > 0.6, "{chosen:?}");
}

#[test]
fn the_first_frames_after_a_switch_to_less_compression_are_not_measured() {
    let mut now = Instant::now();
    let mut s = selector(now);
    let (raw, zstd) = (0, 2);
    assert_eq!(s.arms[raw].label, "raw");
    s.current = zstd;
    s.observe_frame(0, Duration::ZERO, now);
    s.switch_to(raw, now, true);
    // A burst into empty buffers, then the steady rate: only the latter counts.
    for (bytes, ms) in [(50_000_000u64, 40u64), (1_000_000, 10), (10_000_000, 100)] {
        now += Duration::from_millis(ms);
        s.observe_frame(bytes, Duration::ZERO, now);
    }
    let r = s.arms[raw].realized.expect("measured").0;
    assert!((r - 100e6).abs() < 1.0, "{r}");
    assert!(s.arms[zstd].realized.is_none());
}

#[test]
fn a_window_spent_backing_memory_is_not_what_the_codec_moved() {
    // The first frames of a migration back the dedup table's pages: 30-70 ms each
    // on this machine's virtual memory, which measured zstd:1 moving 6 MB/s.
    let mut now = Instant::now();
    let mut s = selector(now);
    let z = arm(&s, "zstd:1");
    s.current = z;
    s.settle_until = now;
    s.observe_frame(0, Duration::ZERO, now);
    for _ in 0..2 {
        now += Duration::from_millis(50);
        s.observe_frame(512 * 1024, Duration::from_millis(45), now);
    }
    assert!(s.arms[z].realized.is_none(), "{:?}", s.arms[z].realized);
    // Once the memory is backed, a window measures the codec: 20 frames of 512 KiB
    // in 100 ms, one of them with a little backing left.
    for f in 0..20 {
        now += Duration::from_millis(5);
        s.observe_frame(
            512 * 1024,
            Duration::from_micros(if f == 0 { 900 } else { 0 }),
            now,
        );
    }
    let r = s.arms[z].realized.expect("measured").0;
    assert!(
        (r / (20.0 * 512.0 * 1024.0 / 0.1) - 1.0).abs() < 0.01,
        "{r}"
    );
}

#[test]
fn one_slow_frame_moves_no_cost_and_a_codec_that_got_slower_is_followed() {
    let now = Instant::now();
    let mut s = selector(now);
    let z = arm(&s, "zstd:1");
    let guest = 512 * 1024u64;
    let took = |bytes_per_s: f64| Some(Duration::from_secs_f64(guest as f64 / bytes_per_s));
    let speed = |s: &Selector, i: usize| 1.0 / s.arms[i].cost;
    for b in [96e6, 450e6, 450e6, 450e6] {
        s.observe_encode(z, guest, guest / 3, took(b));
    }
    assert!((speed(&s, z) / 450e6 - 1.0).abs() < 0.01);
    // One frame 20x slower (memory backed for the first time, another thread on the
    // core): the estimate does not move.
    s.observe_encode(z, guest, guest / 3, took(20e6));
    assert!(
        (speed(&s, z) / 450e6 - 1.0).abs() < 0.01,
        "{:.3e}",
        speed(&s, z)
    );
    // Slower for real: followed from its second slow frame on.
    s.observe_encode(z, guest, guest / 3, took(200e6));
    assert!(speed(&s, z) < 400e6, "{:.3e}", speed(&s, z));
    for _ in 0..30 {
        s.observe_encode(z, guest, guest / 3, took(200e6));
    }
    assert!(
        (speed(&s, z) / 200e6 - 1.0).abs() < 0.02,
        "{:.3e}",
        speed(&s, z)
    );
    // Faster counts at once.
    let before = speed(&s, z);
    s.observe_encode(z, guest, guest / 3, took(400e6));
    assert!(speed(&s, z) > 1.05 * before, "{:.3e}", speed(&s, z));
    // The frame after the warm-up one sets the cost, at most twice the estimate.
    let l = arm(&s, "lz4");
    s.observe_encode(l, guest, guest / 2, took(1e9));
    let warm = speed(&s, l);
    s.observe_encode(l, guest, guest / 2, took(10e6));
    assert!(
        (speed(&s, l) / (warm / 2.0) - 1.0).abs() < 0.01,
        "{:.3e}",
        speed(&s, l)
    );
}

#[test]
fn unusable_codecs_and_delta_are_left_out() {
    let now = Instant::now();
    let cfg = AdaptiveConfig {
        candidates: vec![(CodecId::DELTA, 0), (CodecId::ZSTD, 1), (CodecId::LZ4, 0)],
        explore_every: 8,
    };
    let s = Selector::new(&cfg, |c| c != CodecId::LZ4, false, 1, 0, now).unwrap();
    assert_eq!(s.arms.len(), 1);
    assert_eq!(s.arms[0].label, "zstd:1");
    assert!(Selector::new(&cfg, |_| false, false, 1, 0, now).is_none());
    assert_eq!(label(CodecId::ZSTD, -5), "zstd:-5");
}

#[test]
fn one_compressor_that_finds_nothing_to_compress_speaks_for_the_others() {
    // Incompressible from the first frame on a slow link: once a compressor measured
    // it, the candidates not yet measured are not trusted to find what it did not, so
    // raw follows without a trial of every compressor in turn.
    let mut now = Instant::now();
    let mut s = selector(now);
    let chosen = drive(&mut s, &mut now, 400, &random(0.99), 125e6);
    let st = s.stats();
    let to_compressors = st.switches.iter().filter(|w| w.to != "raw");
    assert!(to_compressors.map(|w| w.count).sum::<u64>() <= 1, "{st:?}");
    assert!(tail_share(&chosen, "raw") > 0.9, "{chosen:?}");
}

#[test]
fn compressible_content_after_incompressible_finds_compression_again() {
    // Raw for random bytes on a slow link, then text again: raw's encode time is
    // tiny, but the time its frames wait on the link pays for exploring.
    let mut now = Instant::now();
    let mut s = selector(now);
    let _ = drive(&mut s, &mut now, 400, &random(1.0), 125e6);
    let chosen = drive(&mut s, &mut now, 1500, &text, 125e6);
    assert!(tail_share(&chosen, "raw") < 0.2, "{:?}", s.stats());
}

#[test]
fn on_a_slow_link_probing_for_a_faster_one_costs_little() {
    // 1 Gbit/s, text: zstd:1 is the best (350 MB/s of core, 105 MB/s on the wire, so
    // the link never blocks and is probed with a cheaper codec now and then); each
    // probe that finds the link as slow as before costs its trial.
    let mut now = Instant::now();
    let mut s = selector(now);
    let _ = drive(&mut s, &mut now, 500, &text, 125e6);
    let start = now;
    let chosen = drive(&mut s, &mut now, 4000, &text, 125e6);
    let rate = chosen.len() as f64 * 512.0 * 1024.0 / (now - start).as_secs_f64();
    assert!(rate > 0.95 * 350e6, "{rate:.3e}: {:?}", s.stats());
    assert!(tail_share(&chosen, "zstd:1") > 0.85, "{:?}", s.stats());
}

#[test]
fn content_that_varies_along_the_guest_does_not_mislead_the_comparison() {
    // Regions of the guest compress differently (every 40 frames the content's
    // savings scale by another factor), so candidates measured at different times saw
    // different content: compared on the content of now, the best static codec on
    // this 1 Gbit/s link (zstd:1) keeps most frames.
    let scales = [1.0, 0.4, 0.8, 0.55, 1.1, 0.7];
    let speeds = |label: &str, f: usize| {
        let (speed, ratio) = text(label);
        let k: f64 = scales[(f / 40) % scales.len()];
        (speed, (1.0 - (1.0 - ratio) * k).clamp(0.01, 1.0))
    };
    let link = 125e6;
    let guest = 512 * 1024u64;
    let frames = 4000;
    let period = |label: &str, f: usize| {
        let (speed, ratio) = speeds(label, f);
        let took = guest as f64 / speed;
        (took, (guest as f64 * ratio / link - took).max(0.0), ratio)
    };
    let mut now = Instant::now();
    let mut s = selector(now);
    let (mut bytes, mut secs) = (0.0, 0.0);
    for f in 0..frames {
        let (i, _) = s.choose(now);
        let label = s.arms[i].label.clone();
        let (took, blocked, ratio) = period(&label, f);
        let payload = (guest as f64 * ratio) as u64;
        s.observe_encode(i, guest, payload, Some(Duration::from_secs_f64(took)));
        now += Duration::from_secs_f64(took + blocked);
        s.observe_send(payload, Duration::from_secs_f64(blocked), now);
        s.observe_frame(guest, Duration::ZERO, now);
        if f >= frames / 2 {
            bytes += guest as f64;
            secs += took + blocked;
        }
    }
    let auto = bytes / secs;
    let stat = |label: &str| {
        let (mut b, mut t) = (0.0, 0.0);
        for f in frames / 2..frames {
            let (took, blocked, _) = period(label, f);
            b += guest as f64;
            t += took + blocked;
        }
        b / t
    };
    let (best, best_rate) = ["raw", "lz4", "zstd:-5", "zstd:1", "zstd:3", "deflate:1"]
        .iter()
        .map(|l| (*l, stat(l)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert!(
        auto >= 0.95 * best_rate,
        "auto {auto:.3e} vs {best} {best_rate:.3e}: {:?}",
        s.stats()
    );
}

#[test]
fn on_a_fixed_slow_link_the_candidate_that_moves_most_wins_over_a_cheaper_one() {
    // 40 MB/s: zstd:1 moves 40 / 0.30 = 133 MB/s of guest, zstd:3 40 / 0.28 = 143 MB/s
    // (its core does 150), 7 % more for twice the core time: within 10 %, the cheaper
    // zstd:1 is kept.
    let lz4 = |s: &Selector| s.arms.iter().position(|a| a.label == "lz4").unwrap();
    let mut now = Instant::now();
    let mut s = selector(now);
    let first = drive(&mut s, &mut now, 1500, &text, 40e6);
    assert!(tail_share(&first, "zstd:1") > 0.6, "{:?}", s.stats());
    // Where the channel accepted the same 40 MB/s under another candidate lately, the
    // link is a fixed pipe: the core zstd:1 would save idles, the pages it loses are
    // lost.
    let i = lz4(&s);
    s.arms[i].wire = Some((40e6, now));
    let fixed = drive(&mut s, &mut now, 800, &text, 40e6);
    assert!(tail_share(&fixed, "zstd:3") > 0.6, "{:?}", s.stats());
    // Where it accepted three times as much (the receiver's work on the same cores,
    // lighter for lz4), the link depends on the codec: the cheaper rule stands.
    let mut now = Instant::now();
    let mut s = selector(now);
    drive(&mut s, &mut now, 1500, &text, 40e6);
    let i = lz4(&s);
    s.arms[i].wire = Some((120e6, now));
    let shared = drive(&mut s, &mut now, 800, &text, 40e6);
    assert!(tail_share(&shared, "zstd:1") > 0.6, "{:?}", s.stats());
}

/// Two channels on one fixed 120 MB/s pipe, both busy: channel 0 takes 35 % of it for
/// three windows under lz4, then 65 % for three under zstd:1 (its neighbour sent less
/// meanwhile). Returns whether channel 0 then takes the link for a fixed pipe, with the
/// two channels sharing their figures (`shared`) or not.
fn fixed_under_swinging_shares(shared: bool) -> bool {
    let start = Instant::now();
    let mut a = selector(start);
    let mut b = selector(start);
    b.channel = 1;
    if shared {
        let both = Arc::new(SharedLink::default());
        a = a.with_shared(both.clone());
        b = b.with_shared(both);
    }
    a.choose(start);
    b.choose(start);
    let mut now = start;
    let arm = |s: &Selector, l: &str| s.arms.iter().position(|a| a.label == l).unwrap();
    let held = Some(2u64 << 20);
    for (label, share) in [("lz4", 0.35), ("zstd:1", 0.65)] {
        a.current = arm(&a, label);
        for _ in 0..3 {
            now += WINDOW;
            // Half of each window spent waiting, 2 MiB held all along: both busy.
            let sent = |share: f64| (120e6 * share * WINDOW.as_secs_f64()) as u64;
            b.observe_send_unacked(sent(1.0 - share), WINDOW / 2, held, || None, now);
            a.observe_send_unacked(sent(share), WINDOW / 2, held, || None, now);
        }
    }
    assert!(a.limited);
    a.fixed_link()
}

#[test]
fn a_fixed_pipe_shared_by_channels_is_known_by_their_total_not_one_channels_share() {
    // Channel 0 alone saw 42 MB/s under lz4 and 78 under zstd:1, as where the
    // receiver's work on the same cores accepts more of one codec than of another; the
    // two channels together saw 120 MB/s under each.
    assert!(!fixed_under_swinging_shares(false));
    assert!(fixed_under_swinging_shares(true));
}

#[test]
fn a_candidate_left_in_a_stretch_where_the_core_limits_is_taken_back_soon_after() {
    // 60 MB/s. For 600 frames zstd:1 costs 150 MB/s of core (content it compresses
    // slowly): lz4 moves as much for a third of the core. Then zstd:1 costs 350 MB/s
    // again: it moves 200 MB/s of guest to lz4's 150, and is measured only when explored.
    let slow = std::cell::Cell::new(true);
    let speeds = |l: &str| match l {
        "zstd:1" if slow.get() => (150e6, 0.30),
        "lz4" => (1.2e9, 0.40),
        other => text(other),
    };
    let mut now = Instant::now();
    let mut s = selector(now);
    let first = drive(&mut s, &mut now, 600, &speeds, 60e6);
    let lz4_then = tail_share(&first, "lz4") + tail_share(&first, "zstd:-5");
    slow.set(false);
    let after = drive(&mut s, &mut now, 300, &speeds, 60e6);
    assert!(lz4_then > 0.8, "{first:?}");
    let zstd1 = after.iter().filter(|l| *l == "zstd:1").count();
    assert!(zstd1 > 200, "{after:?}");
}

/// Runs 3000 frames at 60 MB/s where every explored frame (each 16th) meets content
/// 1.3x as compressible as the reference and every other frame 0.8x: returns the
/// selector and its choices. `paired`: each explored frame's sample is also encoded by
/// the current choice ([`Selector::observe_pair`]).
fn explored_on_other_content(paired: bool) -> (Selector, Vec<String>) {
    let guest = 512 * 1024u64;
    let link = 60e6;
    let ratio_at = |label: &str, k: f64| (1.0 - (1.0 - text(label).1) * k).clamp(0.01, 1.0);
    let mut now = Instant::now();
    let mut s = selector(now);
    let mut chosen = Vec::new();
    for _ in 0..3000 {
        let (i, _) = s.choose(now);
        let k = if s.frame.is_multiple_of(16) { 1.3 } else { 0.8 };
        let label = s.arms[i].label.clone();
        let ratio = ratio_at(&label, k);
        if paired && i != s.current {
            let cur = s.arms[s.current].label.clone();
            s.observe_pair(i, 1.0 - ratio, 1.0 - ratio_at(&cur, k));
        }
        let took = guest as f64 / text(&label).0;
        let payload = (guest as f64 * ratio) as u64;
        s.observe_encode(i, guest, payload, Some(Duration::from_secs_f64(took)));
        let blocked = (payload as f64 / link - took).max(0.0);
        now += Duration::from_secs_f64(took + blocked);
        s.observe_send(payload, Duration::from_secs_f64(blocked), now);
        s.observe_frame(guest, Duration::ZERO, now);
        chosen.push(label);
    }
    (s, chosen)
}

#[test]
fn paired_samples_compare_an_explored_compressor_on_the_same_content() {
    let truth = |label: &str| 1.0 - (1.0 - text(label).1) * 0.8;
    let err = |s: &Selector, label: &str| {
        let i = s.arms.iter().position(|a| a.label == label).unwrap();
        (s.ratio(i) - truth(label)).abs()
    };
    let (s, chosen) = explored_on_other_content(true);
    for label in ["lz4", "deflate:1"] {
        assert!(err(&s, label) < 0.03, "{label}: {:?}", s.arms);
    }
    // lz4 and zstd:-5 move fewer pages over this link than zstd:1: never kept.
    let cheap = tail_share(&chosen, "lz4") + tail_share(&chosen, "zstd:-5");
    assert!(cheap < 0.1, "{chosen:?}");
    // Without pairs the explored frames' content misleads the estimates (deflate:1,
    // which no other candidate bounds, looks far more compressing than it is).
    let (s, _) = explored_on_other_content(false);
    assert!(err(&s, "deflate:1") > 0.1, "{:?}", s.arms);
}

#[test]
fn where_dedup_finds_most_pages_sent_before_raw_is_not_chosen() {
    let mut now = Instant::now();
    let mut s = selector(now);
    let _ = drive(&mut s, &mut now, 300, &text, 125e6);
    // The guest's second copy of its files: dedup finds 80 % of each frame's pages sent
    // before, and the pages left do not compress. Raw skips dedup and sends them all.
    let guest = 512 * 1024u64;
    let mut chosen = Vec::new();
    for _ in 0..600 {
        let (i, _) = s.choose(now);
        let label = s.arms[i].label.clone();
        let raw = label == "raw";
        let data = if raw { guest } else { guest / 5 };
        if !raw {
            s.observe_dedup(i, data / 4096, (guest - data) / 4096);
        }
        let took = Duration::from_secs_f64(data as f64 / text(&label).0);
        s.observe_encode(i, data, data, Some(took));
        let blocked = Duration::from_secs_f64(data as f64 / 125e6).saturating_sub(took);
        now += took + blocked;
        s.observe_send(data, blocked, now);
        s.observe_frame(guest, Duration::ZERO, now);
        chosen.push(label);
    }
    assert!(tail_share(&chosen, "raw") < 0.05, "{chosen:?}");
}

fn arm(s: &Selector, label: &str) -> usize {
    s.arms.iter().position(|a| a.label == label).unwrap()
}

/// A selector on a busy 60 MB/s link whose candidates save and encode as `arms` says:
/// (label, share saved on the reference content, guest bytes per second of core).
fn on_a_busy_link(now: Instant, arms: &[(&str, f64, f64)]) -> Selector {
    let mut s = selector(now);
    (s.link, s.limited, s.content) = (Some(60e6), true, 1.0);
    for &(label, saves, bytes_per_s) in arms {
        let i = arm(&s, label);
        (s.arms[i].saves, s.arms[i].cost) = (saves, 1.0 / bytes_per_s);
    }
    s
}

#[test]
fn a_candidates_first_frame_counts_no_slower_than_its_prior() {
    // The first frame creates the codec's context and faults in its workspace: zstd:1
    // ran at 96 MB/s there, and at 300-700 MB/s on the frames after it.
    let now = Instant::now();
    let mut s = selector(now);
    let z = arm(&s, "zstd:1");
    let prior = s.arms[z].cost;
    let guest = 512 * 1024u64;
    let took = |bytes_per_s: f64| Duration::from_secs_f64(guest as f64 / bytes_per_s);
    s.observe_encode(z, guest, guest / 3, Some(took(96e6)));
    assert!(s.arms[z].cost <= prior, "{:?}", s.arms[z]);
    s.observe_encode(z, guest, guest / 3, Some(took(450e6)));
    let warm = guest as f64 / s.arms[z].cost / guest as f64;
    assert!((warm / 450e6 - 1.0).abs() < 0.01, "{warm:.3e}");
    // A cold first frame faster than the prior counts as measured.
    let l = arm(&s, "lz4");
    s.observe_encode(l, guest, guest / 2, Some(took(1e9)));
    assert!((1.0 / s.arms[l].cost / 1e9 - 1.0).abs() < 0.01);
}

#[test]
fn a_candidate_whose_estimate_ties_one_that_compresses_more_is_not_taken_for_it() {
    // lz4's own estimate says it saves more than zstd:1, which it cannot: its ratio is
    // raised to zstd:1's, and on a busy link the two tie on paper. The cheaper one
    // would send more bytes in its stead.
    let now = Instant::now();
    let mut s = on_a_busy_link(
        now,
        &[
            ("lz4", 0.8, 5e8),
            ("zstd:-5", 0.5, 6e8),
            ("zstd:1", 0.7, 4e8),
            ("zstd:3", 0.72, 1e8),
            ("deflate:1", 0.6, 1e8),
        ],
    );
    let (lz4, zstd) = (arm(&s, "lz4"), arm(&s, "zstd:1"));
    assert_eq!(s.ratio(lz4), s.ratio(zstd));
    assert_eq!(s.best(), zstd, "{:?}", s.arms);
    // Off a busy link the cheaper one is right: the link does not price the ratio.
    s.limited = false;
    s.last_limited = now;
    assert_eq!(s.best(), lz4);
}

#[test]
fn on_a_busy_link_a_cheaper_candidate_that_sends_more_is_not_taken_for_being_cheaper() {
    // zstd:3 is the choice on a busy 60 MB/s link, its figure held down to 143 MB/s by
    // what a window measured it moving; lz4, which sends 1.6x its bytes per guest
    // byte, is priced at 146 MB/s for half the core time. The link carries as many
    // bytes of either, so lz4 moves fewer pages: not taken for being cheaper.
    let now = Instant::now();
    let mut s = on_a_busy_link(
        now,
        &[
            ("lz4", 0.59, 5e8),
            ("zstd:-5", 0.5, 1e8),
            ("zstd:1", 0.7, 1e8),
            ("zstd:3", 0.74, 2.3e8),
            ("deflate:1", 0.6, 1e8),
        ],
    );
    let (lz4, z3) = (arm(&s, "lz4"), arm(&s, "zstd:3"));
    s.current = z3;
    s.arms[z3].realized = Some((130e6, now, s.ratio(z3)));
    s.chosen_at = now - Duration::from_secs(1);
    (s.frame, s.next_decision) = (1, now);
    assert_eq!(s.best(), lz4, "the cheaper one is near the top on paper");
    assert!(s.rate(lz4) * CHEAP_NEAR >= s.rate(z3));
    assert_eq!(s.choose(now).0, z3, "{:?}", s.stats());
    // Where the receiver, not the link, limits, every candidate is priced at what
    // the current one moved, and the cheapest that reaches it is right; but lz4 must
    // leave the link room for the receiver to speed up again, and at 60 MB/s it
    // would carry lz4's frames at 1.1x what the receiver takes now.
    s.peer_bound = Some(now);
    s.next_decision = now;
    assert_eq!(s.choose(now).0, z3, "{:?}", s.stats());
    // On a link that carries 3.7x that, it is.
    s.link = Some(200e6);
    s.next_decision = now;
    assert_eq!(s.choose(now).0, lz4, "{:?}", s.stats());
}
