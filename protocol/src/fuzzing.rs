//! Entry points for the cargo-fuzz targets in `fuzz/` (each target is a thin wrapper
//! over one of these) and for the tests that replay them. Not a stable API.
//!
//! Every input starts with a selector byte that picks the limits; the rest is peer
//! bytes, so a frame's encoding prefixed with a selector is a valid seed.

use crate::copy::{CopyFrame, CopyRun};
use crate::frame::{
    Ack, Commit, Complete, DeviceState, EndOfRound, Envelope, Frame, LayoutFrame, NONCE_LEN,
    PageFrame,
};
use crate::handshake::{
    Authentication, Capabilities, ChannelBinding, ClientConfig, ClientHandshake, ServerConfig,
    ServerHandshake, SessionKey,
};
use crate::ids::{
    AckKind, ChannelId, ChecksumId, CodecId, FrameType, GuestAddr, PageIndex, RegionId, Round,
    SessionId,
};
use crate::limits::{CodecSet, Limits};
use crate::session::{
    Affinity, CompleteProgress, DestinationChannel, DestinationEvent, DestinationLimits,
    DestinationSession, SessionError, SourceChannel, SourceEvent,
};
use crate::stream::FrameDecoder;
use crate::wire::{PageRun, RegionDesc, UniformRun, WireList};

mod round_end;
use round_end::RoundEnd;

/// A private codec id the fuzz limits accept, to reach the "unknown layout" paths.
pub const PRIVATE_CODEC: CodecId = CodecId(0xf001);

/// Limits picked by a selector byte: bit 0 handshake phase, bit 1 checksum negotiated.
pub fn limits(selector: u8) -> Limits {
    if selector & 1 != 0 {
        return Limits::handshake();
    }
    let mut codecs = CodecSet::all_known();
    codecs.insert(PRIVATE_CODEC);
    let checksum = (selector & 2 != 0).then_some(ChecksumId::CRC32C);
    Limits::session(4096, 256, 1 << 20, codecs, checksum).unwrap_or_else(|_| Limits::handshake())
}

/// Decodes one frame from the start of `bytes`; returns it with its length.
fn decode_one<'a>(bytes: &'a [u8], limits: &Limits) -> Option<(Frame<'a>, usize)> {
    let env_bytes: &[u8; Envelope::LEN] = bytes.get(..Envelope::LEN)?.try_into().ok()?;
    let env = Envelope::parse(env_bytes, limits).ok()?;
    let body = bytes.get(Envelope::LEN..env.frame_len())?;
    Frame::decode(env, body, limits)
        .ok()
        .map(|f| (f, env.frame_len()))
}

/// Decode, re-encode, compare: every frame the decoder accepts has exactly one
/// encoding, the bytes it came from.
///
/// # Panics
/// When the property fails (that is the bug the fuzzer looks for).
pub fn frame_roundtrip(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let limits = limits(selector);
    if let Some((frame, len)) = decode_one(bytes, &limits) {
        let mut out = Vec::new();
        frame.encode(&mut out).expect("a decoded frame encodes");
        assert_eq!(out, &bytes[..len], "re-encoding differs for {frame:?}");
    }
}

/// The stream decoder fed in fuzzer-chosen chunk sizes gives the same frames and the
/// same first error as decoding the stream whole.
///
/// Input: selector, chunk-size count `k`, `k` chunk sizes, then the stream.
///
/// # Panics
/// When the two decodings differ.
pub fn stream_chunks(data: &[u8]) {
    let [selector, k, rest @ ..] = data else {
        return;
    };
    let k = usize::from(*k % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(k);
    let limits = limits(*selector);
    let whole = collect(&limits, &mut core::iter::once(stream));
    let mut sizes = sizes.iter().map(|&s| usize::from(s) + 1).cycle();
    let mut pos = 0;
    let mut chunks = core::iter::from_fn(|| {
        if pos >= stream.len() {
            return None;
        }
        let n = sizes.next().unwrap_or(stream.len()).min(stream.len() - pos);
        let c = &stream[pos..pos + n];
        pos += n;
        Some(c)
    });
    let split = collect(&limits, &mut chunks);
    assert_eq!(whole, split, "chunked decoding differs");
}

type Decoded = (Vec<Vec<u8>>, Option<crate::DecodeError>);

fn collect(limits: &Limits, chunks: &mut dyn Iterator<Item = &[u8]>) -> Decoded {
    let mut dec = FrameDecoder::new(*limits);
    let mut frames = Vec::new();
    for chunk in chunks {
        let mut input = chunk;
        // Each turn consumes at least one byte or yields a frame; bound it anyway.
        for _ in 0..=2 * chunk.len() + 1 {
            match dec.decode(input) {
                Ok((used, frame)) => {
                    if let Some(f) = frame {
                        let mut out = Vec::new();
                        f.encode(&mut out).expect("a decoded frame encodes");
                        frames.push(out);
                    }
                    input = &input[used..];
                    if input.is_empty() {
                        break;
                    }
                }
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

/// Drives a handshake state machine with arbitrary peer bytes.
///
/// Input: selector (bit 0: play the destination, else the source; bit 1: this side has a
/// key), chunk size, then the peer's bytes. Nothing may panic, the state machine must
/// stay within its frame limit, and a side with a key must never finish: the fuzzer
/// cannot know the key, so finishing would mean authentication was bypassed.
///
/// # Panics
/// When a keyed side completes against the fuzzer.
pub fn handshake(data: &[u8]) {
    let [selector, chunk, peer @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let keyed = selector & 2 != 0;
    let auth = if keyed {
        SessionKey::new(*b"fuzzing key, never sent")
            .map_or(Authentication::None, Authentication::PreSharedKey)
    } else {
        Authentication::None
    };
    let mut caps = Capabilities::new(4096);
    caps.checksum = selector & 4 != 0;
    // Bit 3: the channel is bound to a TLS exporter value the fuzzer does not know.
    let binding = (selector & 8 != 0).then_some(ChannelBinding([0x5a; 32]));
    let session = SessionId([0x11; 16]);
    let mut out = Vec::new();
    if selector & 1 != 0 {
        let Ok(mut s) = ServerHandshake::with_binding(
            ServerConfig {
                caps,
                session: Some(session),
                auth,
            },
            [3; NONCE_LEN],
            binding,
        ) else {
            return;
        };
        for piece in peer.chunks(chunk) {
            let Ok(used) = s.receive(piece) else { break };
            assert!(used <= piece.len());
            s.take_output(&mut out);
            if s.is_done() {
                assert!(!keyed, "destination authenticated a peer without the key");
                let n = s.negotiated().expect("done means negotiated");
                assert!(n.codecs.contains(CodecId::RAW));
                break;
            }
        }
    } else {
        let Ok(mut c) = ClientHandshake::with_binding(
            ClientConfig {
                caps,
                session,
                channel: ChannelId(0),
                channel_count: 1,
                auth,
            },
            [4; NONCE_LEN],
            binding,
        ) else {
            return;
        };
        c.take_output(&mut out);
        for piece in peer.chunks(chunk) {
            let Ok(used) = c.receive(piece) else { break };
            assert!(used <= piece.len());
            c.take_output(&mut out);
            if c.is_done() {
                assert!(!keyed, "source accepted a destination without the key");
                let n = c.negotiated().expect("done means negotiated");
                assert!(n.codecs.contains(CodecId::RAW) && n.page_size == 4096);
                break;
            }
        }
    }
    // The handshake never writes more than a few frames.
    assert!(out.len() <= 4 * crate::limits::HANDSHAKE_MAX_FRAME as usize);
}

/// Seeds for [`handshake`]: what a real peer says to each fuzzed side, so the fuzzer
/// starts from complete exchanges (unkeyed ones reach the end).
pub fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let session = SessionId([0x11; 16]);
    let caps = Capabilities::new(4096);
    let mut seeds = Vec::new();
    for keyed in [false, true] {
        let auth = || match keyed {
            true => SessionKey::new(*b"the peer's own key, not ours")
                .map_or(Authentication::None, Authentication::PreSharedKey),
            false => Authentication::None,
        };
        let (Ok(mut c), Ok(mut s)) = (
            ClientHandshake::new(
                ClientConfig {
                    caps,
                    session,
                    channel: ChannelId(0),
                    channel_count: 1,
                    auth: auth(),
                },
                [4; NONCE_LEN],
            ),
            ServerHandshake::new(
                ServerConfig {
                    caps,
                    session: Some(session),
                    auth: auth(),
                },
                [3; NONCE_LEN],
            ),
        ) else {
            continue;
        };
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            let mut wire = Vec::new();
            c.take_output(&mut wire);
            to_server.extend_from_slice(&wire);
            let _ = s.receive(&wire);
            wire.clear();
            s.take_output(&mut wire);
            to_client.extend_from_slice(&wire);
            let _ = c.receive(&wire);
        }
        let sel = u8::from(keyed) << 1;
        let (dn, sn) = match keyed {
            false => ("seed-destination", "seed-source"),
            true => ("seed-destination-keyed", "seed-source-keyed"),
        };
        seeds.push((dn, [&[sel | 1, 64][..], &to_server].concat()));
        seeds.push((sn, [&[sel, 255][..], &to_client].concat()));
    }
    seeds
}

/// Destination limits small enough for the fuzzer to reach every one of them.
fn session_limits() -> DestinationLimits {
    DestinationLimits {
        max_guest_bytes: 1 << 20,
        max_regions: 4,
        max_channels: 4,
        max_device_sections: 4,
        max_device_bytes: 4096,
    }
}

/// The page size of fuzzed sessions (the one [`limits`] uses).
const SESSION_PAGE: u64 = 4096;

/// What one run of [`session`] did, for the tests that replay it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOutcome {
    /// The final round, when the destination verified the session complete.
    pub completed: Option<Round>,
    /// The final round the source's channel 0 saw acknowledged by ACK COMPLETE.
    pub source_completed: Option<Round>,
    /// The final round, when the destination took a valid COMMIT: it reports success
    /// and runs the guest.
    pub committed: Option<Round>,
    /// The final round of the COMMIT the source's channel 0 sent (or began to send):
    /// from then on it must not resume the guest.
    pub source_commit_sent: Option<Round>,
    /// The final round the source's channel 0 saw acknowledged by ACK COMMITTED.
    pub source_committed: Option<Round>,
    /// PAGES and COPY frames the destination applied, per channel.
    pub applied: Vec<u64>,
    /// The COPY frames among them, per channel (ROUND_END ones when recorded).
    pub copied: Vec<u64>,
    /// ROUND_END COPY frames applied at the end of their round, per channel.
    pub round_end: Vec<u64>,
    /// Channels that failed (an error from the state machines, or an undecodable frame).
    pub dead: Vec<bool>,
    /// Why each channel failed, in order: the state machines' error, or `None` for a
    /// frame that did not decode.
    pub errors: Vec<(usize, Option<SessionError>)>,
    /// Faults injected into a generated session (0 for the frame mode).
    pub faults: usize,
}

/// A destination driven as the pipeline drives one, with an independent record of what
/// the session's rules allow, checked on every frame the state machines let through.
struct FuzzDestination {
    session: DestinationSession,
    channels: Vec<DestinationChannel>,
    dead: Vec<bool>,
    errors: Vec<(usize, Option<SessionError>)>,
    /// The first accepted LAYOUT, kept here: (region id, pages) and the chunk size.
    layout: Option<(Vec<(u32, u64)>, u32)>,
    /// The last round each channel ended, by the AckRound events seen here.
    ended: Vec<Option<Round>>,
    applied: Vec<u64>,
    copied: Vec<u64>,
    /// Bytes of the device-state sections handed out whole.
    device_bytes: u64,
    /// ACKs to send back, per channel.
    acks: Vec<Vec<Ack>>,
    /// Whether channel 0 sent ACK COMPLETE (by the events seen here).
    ack_complete_sent: bool,
    /// ROUND_END copies recorded and applied, and the ACK ROUNDs they hold back.
    round_end: RoundEnd,
}

impl FuzzDestination {
    fn new(channels: u16) -> Option<Self> {
        let session = DestinationSession::new(channels, 4096, session_limits()).ok()?;
        let chans = (0..channels)
            .map(|c| session.channel(ChannelId(c)))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let n = usize::from(channels);
        Some(Self {
            session,
            channels: chans,
            dead: vec![false; n],
            errors: Vec::new(),
            layout: None,
            ended: vec![None; n],
            applied: vec![0; n],
            copied: vec![0; n],
            device_bytes: 0,
            acks: vec![Vec::new(); n],
            ack_complete_sent: false,
            round_end: RoundEnd::new(n),
        })
    }

    fn kill(&mut self, c: usize, why: Option<SessionError>) {
        self.dead[c] = true;
        self.errors.push((c, why));
    }

    /// Feeds a decoded frame to channel `c` and carries out what the machine says.
    fn receive(&mut self, c: usize, frame: &Frame<'_>) {
        if self.dead[c] {
            return;
        }
        let id = ChannelId(c as u16);
        let event = match self.channels[c].on_frame(frame) {
            Ok(e) => e,
            Err(e) => return self.kill(c, Some(e)),
        };
        let result = match event {
            DestinationEvent::Layout(l) => self.session.on_layout(l).and_then(|first| {
                if first {
                    let regions = l
                        .regions
                        .iter()
                        .map(|r| (r.id.0, r.length / SESSION_PAGE))
                        .collect();
                    self.layout = Some((regions, l.chunk_pages));
                }
                self.channels[c].set_layout(&self.session)
            }),
            DestinationEvent::Apply(p) => {
                self.check_apply(c, p.region, p.round, p.all_runs(), [].into_iter());
                return self.applied(c);
            }
            DestinationEvent::Copy(copy) => {
                assert!(!copy.round_end, "a ROUND_END copy applied at once");
                self.check_apply(c, copy.region, copy.round, copy.all_runs(), [].into_iter());
                check_copy_runs(copy);
                self.copied[c] += 1;
                return self.applied(c);
            }
            DestinationEvent::RoundEndCopy(copy) => {
                // Targets of this channel, sources of any channel inside the region.
                assert!(copy.round_end, "a plain COPY deferred");
                self.check_apply(c, copy.region, copy.round, copy.targets(), copy.sources());
                check_copy_runs(copy);
                let layout_pages = self
                    .layout
                    .as_ref()
                    .map_or(0, |(regions, _)| regions.iter().map(|(_, p)| p).sum());
                self.applied(c);
                if !self.dead[c] {
                    self.copied[c] += 1;
                    self.round_end
                        .record(c, copy.round, copy.pages(), layout_pages);
                }
                return;
            }
            DestinationEvent::AckRound(round) => {
                assert!(
                    self.ended[c].is_none_or(|e| round > e),
                    "channel {c} ended round {round} after round {:?}",
                    self.ended[c]
                );
                self.ended[c] = Some(round);
                self.round_end.ended(c, round);
                let result = self.session.on_round_ended(id, round);
                // ACK ROUND once the channel's ROUND_END copies of its rounds are applied.
                let released = self.round_end.release(self.session.ended_everywhere());
                for (ch, r) in released.into_iter().filter(|&(ch, _)| !self.dead[ch]) {
                    self.acks[ch].push(Ack {
                        kind: AckKind::ROUND,
                        value: r.0.into(),
                    });
                }
                result.map(|p| self.progress(p))
            }
            DestinationEvent::DeviceState(d) => {
                self.session.on_device_state(id, d).map(|section| {
                    if let Some(s) = section {
                        self.device_bytes += s.data.len() as u64;
                        assert!(
                            self.device_bytes <= session_limits().max_device_bytes,
                            "device state past the byte limit"
                        );
                    }
                })
            }
            DestinationEvent::Complete(done) => {
                assert_eq!(c, 0, "COMPLETE accepted on channel {c}");
                assert_eq!(
                    self.ended[0],
                    Some(done.final_round),
                    "COMPLETE accepted before channel 0 ended its final round"
                );
                self.session
                    .on_complete(done)
                    .map(|p| self.progress(Some(p)))
            }
            DestinationEvent::Commit(commit) => {
                assert_eq!(c, 0, "COMMIT accepted on channel {c}");
                assert!(
                    self.ack_complete_sent,
                    "COMMIT accepted before ACK COMPLETE was sent"
                );
                assert_eq!(self.session.completed(), Some(commit.final_round));
                self.session.on_commit(commit).map(|ack| {
                    assert_eq!(self.session.committed(), Some(commit.final_round));
                    self.acks[0].push(ack);
                })
            }
            DestinationEvent::Skip => Ok(()),
        };
        if let Err(e) = result {
            self.kill(c, Some(e));
        }
    }

    /// A PAGES or COPY frame applied on channel `c`: its round may have opened, and it
    /// counts for ACK FRAMES.
    fn applied(&mut self, c: usize) {
        if let Some(round) = self.channels[c].take_opened()
            && let Err(e) = self.session.on_round_opened(ChannelId(c as u16), round)
        {
            return self.kill(c, Some(e));
        }
        self.applied[c] += 1;
        self.acks[c].push(Ack {
            kind: AckKind::FRAMES,
            value: self.applied[c],
        });
    }

    /// On completion: every channel ended the final round (by the events seen here),
    /// every channel is finished, and channel 0 answers ACK COMPLETE.
    fn progress(&mut self, p: Option<CompleteProgress>) {
        let Some(CompleteProgress::Done(last)) = p else {
            return;
        };
        assert_eq!(self.session.completed(), Some(last));
        assert!(
            self.ended.iter().all(|e| *e == Some(last)),
            "complete at round {last} but channels ended {:?}",
            self.ended
        );
        assert!(
            self.round_end.idle(),
            "complete at round {last} with ROUND_END copies not applied: {:?}",
            self.round_end
        );
        for ch in &mut self.channels {
            ch.finish();
        }
        if self.dead[0] {
            return;
        }
        let ack = self.channels[0]
            .ack_complete(&self.session)
            .expect("channel 0 took the COMPLETE the session verified");
        assert_eq!(
            ack,
            Ack {
                kind: AckKind::COMPLETE,
                value: last.0.into(),
            }
        );
        self.ack_complete_sent = true;
        self.acks[0].push(ack);
    }

    /// The invariant of every applied frame (PAGES, or COPY with its targets and sources),
    /// recomputed without the session module: its pages lie inside a region of the
    /// LAYOUT, each of `runs` belongs to channel `c` by `(page / chunk + region) %
    /// channels` (`foreign`, a ROUND_END copy's sources, may belong to any), and its
    /// round is still open on `c`.
    fn check_apply(
        &self,
        c: usize,
        region: RegionId,
        round: Round,
        runs: impl Iterator<Item = PageRun>,
        foreign: impl Iterator<Item = PageRun>,
    ) {
        assert!(
            self.session.completed().is_none(),
            "pages applied after completion"
        );
        let Some((regions, chunk)) = &self.layout else {
            panic!("pages applied on channel {c} before any LAYOUT was accepted");
        };
        let Some(&(_, pages)) = regions.iter().find(|(id, _)| *id == region.0) else {
            panic!("pages applied for region {region} outside the LAYOUT");
        };
        let channels = self.channels.len() as u128;
        let runs = runs.map(|r| (r, true)).chain(foreign.map(|r| (r, false)));
        for (run, own) in runs {
            let start = u128::from(run.start.0);
            let end = start + u128::from(run.count);
            assert!(
                end <= u128::from(pages),
                "run {run:?} past region {region} of {pages} pages"
            );
            for page in (start..end).filter(|_| own) {
                let owner = (page / u128::from(*chunk) + u128::from(region.0)) % channels;
                assert_eq!(
                    owner, c as u128,
                    "page {page} of region {region} applied on channel {c}, owner {owner}"
                );
            }
        }
        assert!(
            self.ended[c].is_none_or(|e| round > e),
            "pages of round {round} applied on channel {c}, which ended {:?}",
            self.ended[c]
        );
    }

    fn outcome(&self, source: Option<&SourceChannel>, faults: usize) -> SessionOutcome {
        let committed = self.session.committed();
        assert!(
            committed.is_none() || committed == self.session.completed(),
            "committed {committed:?} without completing at that round"
        );
        SessionOutcome {
            completed: self.session.completed(),
            source_completed: source.and_then(SourceChannel::completed),
            committed,
            source_commit_sent: source.and_then(SourceChannel::commit_sent),
            source_committed: source.and_then(SourceChannel::committed),
            applied: self.applied.clone(),
            copied: self.copied.clone(),
            round_end: self.round_end.applied.clone(),
            dead: self.dead.clone(),
            errors: self.errors.clone(),
            faults,
        }
    }
}

/// The decoder's rules of an applied COPY, recomputed page by page (its pages lie inside a
/// region of at most [`session_limits`]' guest bytes, checked before): at least one run,
/// targets ascending and disjoint, no source page among the targets.
fn check_copy_runs(copy: &CopyFrame<'_>) {
    assert!(!copy.runs.is_empty(), "a COPY without runs applied");
    let mut targets: Vec<u64> = Vec::new();
    for t in copy.targets() {
        assert!(
            targets.last().is_none_or(|&l| l < t.start.0) && t.count > 0,
            "COPY targets not ascending: {copy:?}"
        );
        targets.extend(t.start.0..t.start.0 + u64::from(t.count));
    }
    for s in copy.sources() {
        assert!(
            (s.start.0..s.start.0 + u64::from(s.count)).all(|p| !targets.contains(&p)),
            "a COPY source page is one of its targets: {copy:?}"
        );
    }
}

/// Reads fuzzer bytes as parameters; 0 once they run out.
struct Params<'a>(&'a [u8]);

impl Params<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

/// The session state machines (`crate::session`) against a fuzzer.
///
/// Input: a selector byte (bit 0: generated-session mode, else frame mode; bit 1: CRC32C
/// negotiated), then:
/// - frame mode: a byte choosing 1–4 channels, then records `channel byte || frame`
///   (a whole frame as on the wire). The frames go to a [`DestinationSession`] and its
///   channels exactly as a destination would feed them; with bit 7 of the channel byte
///   set, to a [`SourceChannel`] that sent nothing yet, which must accept no ACK but
///   FRAMES 0.
/// - generated mode: parameters of a legitimate session (channels, chunk size, regions,
///   rounds, dirty pages, device-state sections, extension frames, COPY frames, ROUND_END
///   ones among them with sources of other channels) that a
///   [`SourceChannel`] per channel produces, a fault list (drop, duplicate, move to
///   another channel, alter a run of a PAGES or COPY frame, flip a byte) and a delivery schedule (which channel's
///   next frame the destination reads). The destination's ACKs go back to the source,
///   which sends COMMIT once ACK COMPLETE arrived. A session with faults may also lose
///   COMMIT or ACK COMMITTED, or send a COMMIT too early (bits 3 and 4 of its
///   extension byte).
///
/// Invariants: nothing panics; every frame the destination applies names pages inside
/// the LAYOUT (a COPY's sources too, none of them among its targets), all on the channel
/// that owns them by `(page / chunk + region) % channels`
/// recomputed here (but a ROUND_END copy's sources), in a round that channel has not
/// ended; a channel's ROUND_END copies of a round target at most the layout's pages, are
/// applied once every channel ended their round, and hold back the channel's ACK ROUND
/// until then, and none is left unapplied when the session completes; a channel that failed gets
/// no more frames; the destination takes COMMIT only on channel 0 after it sent ACK
/// COMPLETE, and unless frames were altered or COMMIT sent early, it never owns the
/// guest while the source may still resume it (has not sent COMMIT). Without faults a
/// generated session completes and commits at its final round on both sides, with every
/// frame applied and every ACK accepted by the source, whatever the schedule. The generated source holds COMPLETE back until every device-state
/// section sent on another channel than 0 is acknowledged by a later ROUND ACK there,
/// as `PROTOCOL.md` asks (COMPLETE).
///
/// # Panics
/// When an invariant fails.
pub fn session(data: &[u8]) {
    let _ = session_run(data);
}

/// [`session`], returning what happened.
///
/// # Panics
/// As [`session`].
pub fn session_run(data: &[u8]) -> SessionOutcome {
    let Some((&selector, rest)) = data.split_first() else {
        return SessionOutcome::default();
    };
    let limits = limits(selector & 2);
    match selector & 1 {
        0 => session_frames(&limits, rest),
        _ => session_generated(&limits, selector & 2 != 0, rest),
    }
}

fn session_frames(limits: &Limits, data: &[u8]) -> SessionOutcome {
    let Some((&n, mut rest)) = data.split_first() else {
        return SessionOutcome::default();
    };
    let channels = 1 + u16::from(n % 4);
    let Some(mut dest) = FuzzDestination::new(channels) else {
        return SessionOutcome::default();
    };
    // Source channels that sent nothing but LAYOUT, for frames with bit 7 of their
    // channel byte set: they must accept no ACK but FRAMES 0.
    let mut sources: Vec<SourceChannel> = match Affinity::new(channels, 1) {
        Some(a) => (0..channels)
            .filter_map(|c| SourceChannel::new(ChannelId(c), a).ok())
            .collect(),
        None => Vec::new(),
    };
    for s in &mut sources {
        s.on_send_layout();
    }
    while let Some((&ch, tail)) = rest.split_first() {
        let c = usize::from(ch & 0x7f) % usize::from(channels);
        let Some(env) = tail
            .get(..Envelope::LEN)
            .and_then(|b| <&[u8; Envelope::LEN]>::try_from(b).ok())
            .and_then(|b| Envelope::parse(b, limits).ok())
        else {
            // The channel's stream cannot be framed: it fails, and the input ends.
            dest.kill(c, None);
            break;
        };
        let Some(body) = tail.get(Envelope::LEN..env.frame_len()) else {
            dest.kill(c, None);
            break;
        };
        match (Frame::decode(env, body, limits), sources.get_mut(c)) {
            (Ok(f), Some(s)) if ch & 0x80 != 0 => {
                let event = s.on_frame(&f);
                match f {
                    Frame::Ack(a) if a.kind == AckKind::FRAMES && a.value == 0 => {
                        assert_eq!(event, Ok(SourceEvent::FramesApplied(0)));
                    }
                    Frame::Extension { .. } => assert_eq!(event, Ok(SourceEvent::Skip)),
                    _ => assert!(event.is_err(), "a source that sent nothing took {f:?}"),
                }
            }
            (Ok(f), _) => dest.receive(c, &f),
            (Err(_), _) => dest.kill(c, None),
        }
        rest = &tail[env.frame_len()..];
    }
    dest.outcome(None, 0)
}

/// Canonical runs of ascending, distinct pages.
fn runs_of(pages: &[u64]) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if r.start.0 + u64::from(r.count) == p => r.count += 1,
            _ => runs.push(PageRun {
                start: PageIndex(p),
                count: 1,
            }),
        }
    }
    runs
}

/// A generated COPY frame, with its CRC when `crc`.
fn copy_frame(
    region: RegionId,
    round: Round,
    round_end: bool,
    runs: &[CopyRun],
    crc: bool,
) -> CopyFrame<'_> {
    let copy = CopyFrame {
        region,
        round,
        round_end,
        runs: WireList::Slice(runs),
        crc: None,
    };
    match crc {
        true => copy.with_crc().expect("a generated frame fits its fields"),
        false => copy,
    }
}

fn encoded(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    frame
        .encode(&mut out)
        .expect("a generated frame fits its fields");
    out
}

fn session_generated(limits: &Limits, crc: bool, data: &[u8]) -> SessionOutcome {
    let mut r = Params(data);
    let channels = 1 + u16::from(r.u8() % 4);
    let n = usize::from(channels);
    // How many faults, first, so a seed can say "none" whatever follows.
    let nfaults = usize::from(r.u8() % 4);
    let chunk_pages = 1 + u32::from(r.u8() % 8);
    let Some(affinity) = Affinity::new(channels, chunk_pages) else {
        return SessionOutcome::default();
    };
    let owner = |region: u32, page: u64| {
        ((page / u64::from(chunk_pages) + u64::from(region)) % u64::from(channels)) as usize
    };

    // The guest: 1–3 regions of 1–32 pages, ids ascending with gaps, apart or adjacent.
    let mut regions = Vec::new();
    let mut id = u32::from(r.u8() % 4);
    let mut addr = 0u64;
    for i in 0..1 + r.u8() % 3 {
        if i > 0 {
            id += 1 + u32::from(r.u8() % 4);
        }
        let pages = 1 + u64::from(r.u8() % 32);
        addr += u64::from(r.u8() % 2) * SESSION_PAGE;
        regions.push(RegionDesc {
            id: RegionId(id),
            backing_page_size: 4096,
            guest_addr: GuestAddr(addr),
            length: pages * SESSION_PAGE,
        });
        addr += pages * SESSION_PAGE;
    }
    let rounds = 1 + r.u8() % 4;
    let per_frame = 1 + usize::from(r.u8() % 16);
    let ext = r.u8();
    let copies = ext & 0x20 != 0;
    // With COPY frames, ROUND_END ones too (bit 6 of `ext`).
    let late = copies && ext & 0x40 != 0;
    // Device-state sections: (channel, total, chunk, round index).
    let sections: Vec<(usize, usize, usize, u8)> = (0..r.u8() % 3)
        .map(|_| {
            (
                usize::from(r.u8()) % n,
                usize::from(r.u8() % 40),
                1 + usize::from(r.u8() % 16),
                r.u8() % rounds,
            )
        })
        .collect();

    let extension = |t: u8| {
        encoded(&Frame::Extension {
            frame_type: FrameType(0x80 | t),
            flags: t,
            body: b"extension",
        })
    };
    let mut source: Vec<SourceChannel> = (0..channels)
        .map(|c| SourceChannel::new(ChannelId(c), affinity))
        .collect::<Result<_, _>>()
        .expect("every channel index is inside the session");
    let mut wire: Vec<Vec<Vec<u8>>> = vec![Vec::new(); n];
    let mut sent = vec![0u64; n];
    let layout = encoded(&Frame::Layout(LayoutFrame {
        chunk_pages,
        regions: WireList::Slice(&regions),
    }));
    for (c, w) in wire.iter_mut().enumerate() {
        if ext & 1 != 0 {
            w.push(extension(c as u8));
        }
        source[c].on_send_layout();
        w.push(layout.clone());
    }
    // Sections sent on a channel other than 0, with the round whose END_OF_ROUND follows
    // them there: COMPLETE waits for that round's ACK (PROTOCOL.md, COMPLETE).
    let mut waits: Vec<(usize, Round)> = Vec::new();
    let mut round = Round(0);
    for k in 0..rounds {
        if k > 0 {
            round = Round(round.0 + 1 + u32::from(r.u8() % 2));
        }
        for region in &regions {
            let pages = region.length / SESSION_PAGE;
            let (mut dirty, mut bits) = (Vec::new(), 0u8);
            for p in 0..pages {
                if p % 8 == 0 {
                    bits = r.u8();
                }
                if bits >> (p % 8) & 1 != 0 {
                    dirty.push(p);
                }
            }
            // ROUND_END copy targets per channel, and the pages every PAGES frame of the
            // region starts with (never a target): their sources.
            let (mut targets, mut firsts) = (vec![Vec::new(); n], Vec::new());
            for (c, w) in wire.iter_mut().enumerate() {
                let mine: Vec<u64> = dirty
                    .iter()
                    .copied()
                    .filter(|&p| owner(region.id.0, p) == c)
                    .collect();
                for group in mine.chunks(per_frame) {
                    // Which pages of the group carry data (raw) and which are zero.
                    // Of the others, every third page is uniform (0xcc), the rest zero.
                    // With COPY frames (bit 5 of `ext`), data pages after the first of
                    // the group, at odd positions or all (bit 7 of the mask), are copies
                    // of the group's first page, which the PAGES frame just sent: they
                    // travel in a COPY right after it; with ROUND_END copies (bit 6),
                    // the even ones among them go in one at the region's end instead,
                    // from first pages of any channel's groups.
                    let mask = r.u8();
                    firsts.push(group[0]);
                    let (mut data, mut zero, mut uniform) = (Vec::new(), Vec::new(), Vec::new());
                    let mut copied = Vec::new();
                    for (i, &p) in group.iter().enumerate() {
                        match (mask >> (i % 8) & 1, p % 3) {
                            (0, 0) => uniform.push(p),
                            (0, _) => zero.push(p),
                            _ if copies && i > 0 && (i % 2 == 1 || mask & 0x80 != 0) => {
                                match late && p % 2 == 0 {
                                    true => targets[c].push(p),
                                    false => copied.push(p),
                                }
                            }
                            _ => data.push(p),
                        }
                    }
                    let (data_runs, zero_runs) = (runs_of(&data), runs_of(&zero));
                    let uniform_runs: Vec<UniformRun> = runs_of(&uniform)
                        .into_iter()
                        .map(|run| UniformRun { run, byte: 0xcc })
                        .collect();
                    let payload = vec![0u8; data.len() * SESSION_PAGE as usize];
                    let mut frame = PageFrame {
                        codec: if data.is_empty() {
                            CodecId::ZERO
                        } else {
                            CodecId::RAW
                        },
                        region: region.id,
                        round,
                        data_runs: WireList::Slice(&data_runs),
                        zero_runs: WireList::Slice(&zero_runs),
                        uniform_runs: WireList::Slice(&uniform_runs),
                        lengths: None,
                        crc: None,
                        payload: &payload,
                    };
                    if crc {
                        frame = frame
                            .with_crc(&[&payload[..]])
                            .expect("a generated frame fits its fields");
                    }
                    source[c]
                        .on_send_pages(&frame)
                        .expect("the source accepts pages routed by the affinity");
                    w.push(encoded(&Frame::Pages(frame)));
                    sent[c] += 1;
                    if copied.is_empty() {
                        continue;
                    }
                    // One run per page, all from the group's first page: runs that touch
                    // are canonical, as their sources do not continue.
                    let runs: Vec<CopyRun> = copied
                        .iter()
                        .map(|&p| CopyRun {
                            start: PageIndex(p),
                            count: 1,
                            from: PageIndex(group[0]),
                        })
                        .collect();
                    let copy = copy_frame(region.id, round, false, &runs, crc);
                    source[c]
                        .on_send_copy(&copy)
                        .expect("the source accepts copies routed by the affinity");
                    w.push(encoded(&Frame::Copy(copy)));
                    sent[c] += 1;
                }
            }
            for (c, pages) in targets.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
                let runs = round_end::late_runs(c, pages, &firsts, |p| owner(region.id.0, p));
                let copy = copy_frame(region.id, round, true, &runs, crc);
                source[c]
                    .on_send_copy(&copy)
                    .expect("the source accepts ROUND_END copies of its own targets");
                wire[c].push(encoded(&Frame::Copy(copy)));
                sent[c] += 1;
            }
        }
        for (i, &(c, total, chunk, at)) in sections.iter().enumerate() {
            if at != k {
                continue;
            }
            if c != 0 {
                waits.push((c, round));
            }
            let bytes: Vec<u8> = (0..total).map(|b| (b + i) as u8).collect();
            let name = ["dev-a", "dev-b", "dev-c"][i % 3];
            let mut offset = 0;
            loop {
                let end = (offset + chunk).min(total);
                wire[c].push(encoded(&Frame::DeviceState(DeviceState {
                    instance: i as u32,
                    name,
                    total: total as u64,
                    offset: offset as u64,
                    data: &bytes[offset..end],
                })));
                offset = end;
                if offset == total {
                    break;
                }
            }
        }
        for (c, w) in wire.iter_mut().enumerate() {
            let e = source[c]
                .end_round(round)
                .expect("the source ends its open round");
            w.push(encoded(&Frame::EndOfRound(e)));
            if ext & 2 != 0 && c == usize::from(k) % n {
                w.push(extension(k));
            }
        }
    }
    let complete = source[0]
        .complete(round, sections.len() as u32)
        .expect("channel 0 ended the final round");
    wire[0].push(encoded(&Frame::Complete(complete)));
    // The switchover, disturbed only in sessions with faults (bits 3 and 4 of `ext`): 0
    // as it should go, 1 COMMIT lost, 2 ACK COMMITTED lost, 3 a COMMIT sent too early,
    // right after COMPLETE (a buggy source: refused unless ACK COMPLETE went out first).
    let handover = if nfaults > 0 { (ext >> 3) & 3 } else { 0 };
    if handover == 3 {
        wire[0].push(encoded(&Frame::Commit(Commit { final_round: round })));
    }

    // Faults: (kind, channel, index, argument).
    let mut altered = false;
    for _ in 0..nfaults {
        let (kind, c, idx, arg) = (r.u8() % 5, usize::from(r.u8()) % n, r.u8(), r.u8());
        altered |= kind >= 3;
        let len = wire[c].len();
        if len == 0 {
            continue;
        }
        let i = usize::from(idx) % len;
        match kind {
            0 => {
                wire[c].remove(i);
            }
            1 => {
                let f = wire[c][i].clone();
                wire[c].insert(i, f);
            }
            2 => {
                let f = wire[c].remove(i);
                let to = (c + 1 + usize::from(arg)) % n;
                let at = usize::from(idx).min(wire[to].len());
                wire[to].insert(at, f);
            }
            3 => {
                // Alter a run of a PAGES frame (move its start or grow its count) or of
                // a COPY frame (move its start or its source, or grow its count). An
                // earlier fault may have flipped the type or the run counts: the bytes
                // are only trusted as far as they reach.
                let f = &mut wire[c][i];
                let u16_at = |f: &[u8], at: usize| {
                    f.get(at..at + 2)
                        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
                };
                // The first run's offset, the runs and the field to alter.
                let target = match f.first().map(|&t| FrameType(t)) {
                    Some(FrameType::PAGES) => {
                        let runs = u16_at(f, 20) + u16_at(f, 22);
                        let at = 24 + 12 * (usize::from(arg) % runs.max(1));
                        (runs > 0).then_some(match arg & 0x80 {
                            0 => (at, 8),
                            _ => (at + 8, 4),
                        })
                    }
                    Some(FrameType::COPY) => {
                        let runs = u16_at(f, 16);
                        let at = 20 + 20 * (usize::from(arg) % runs.max(1));
                        (runs > 0).then_some(match arg >> 6 {
                            0 | 1 => (at, 8),
                            2 => (at + 8, 4),
                            _ => (at + 12, 8),
                        })
                    }
                    _ => None,
                };
                if let Some((field, width)) = target
                    && let Some(bytes) = f.get_mut(field..field + width)
                {
                    let mut v = [0u8; 8];
                    v[..width].copy_from_slice(bytes);
                    let bumped = u64::from_le_bytes(v).wrapping_add(1 + u64::from(arg & 7));
                    bytes.copy_from_slice(&bumped.to_le_bytes()[..width]);
                }
            }
            _ => {
                let f = &mut wire[c][i];
                let at = usize::from(arg) % f.len();
                f[at] ^= 1 << (idx % 8);
            }
        }
    }

    // Delivery: the schedule picks whose next frame the destination reads; then the
    // rest, round-robin. Every ACK goes straight back to its source channel.
    let Some(mut dest) = FuzzDestination::new(channels) else {
        return SessionOutcome::default();
    };
    let mut source_ok = vec![true; n];
    if ext & 4 != 0 {
        for s in &mut source {
            let f = Frame::Extension {
                frame_type: FrameType(0xff),
                flags: 0,
                body: &[],
            };
            assert!(matches!(s.on_frame(&f), Ok(SourceEvent::Skip)));
        }
    }
    let mut next = vec![0usize; n];
    let schedule: Vec<usize> = r.0.iter().map(|&b| usize::from(b) % n).collect();
    // After the schedule, round-robin until no channel can move.
    let (mut turn, mut idle) = (0usize, 0usize);
    loop {
        let c = match schedule.get(turn) {
            Some(&c) => c,
            None if idle > n => break,
            None => {
                idle += 1;
                (turn - schedule.len()) % n
            }
        };
        turn += 1;
        let Some(bytes) = wire[c].get(next[c]) else {
            continue;
        };
        // The source sends COMPLETE only once every section sent elsewhere is
        // acknowledged by a later ROUND ACK on its channel.
        if bytes[0] == FrameType::COMPLETE.0
            && waits
                .iter()
                .any(|&(sc, r)| source[sc].acked_round().is_none_or(|a| a < r))
        {
            continue;
        }
        idle = 0;
        next[c] += 1;
        match decode_one(bytes, limits) {
            Some((f, len)) if len == bytes.len() => dest.receive(c, &f),
            _ => dest.kill(c, None),
        }
        for (c, acks) in dest.acks.iter_mut().enumerate() {
            for a in acks.drain(..) {
                if handover == 2 && a.kind == AckKind::COMMITTED {
                    continue;
                }
                if source_ok[c] {
                    let accepted = source[c].on_frame(&Frame::Ack(a)).is_ok();
                    assert!(
                        accepted || nfaults > 0,
                        "the source refused {a:?} of a faultless session on channel {c}"
                    );
                    source_ok[c] = accepted;
                }
            }
        }
        // ACK COMPLETE arrived: the source hands the guest over.
        if source_ok[0] && source[0].completed().is_some() && source[0].commit_sent().is_none() {
            let commit = source[0]
                .commit()
                .expect("the source commits after ACK COMPLETE");
            if handover != 1 {
                wire[0].push(encoded(&Frame::Commit(commit)));
            }
        }
    }
    let out = dest.outcome(Some(&source[0]), nfaults);
    // The switchover's invariant: the destination never runs the guest while the source
    // may resume it (it has not begun to send COMMIT). Only a COMMIT that the source did
    // not send (forged by altered bytes, or sent too early) could break it.
    if !altered && handover != 3 {
        assert!(
            out.committed.is_none() || out.source_commit_sent.is_some(),
            "both sides may run the guest: {out:?}"
        );
    }
    assert!(
        out.source_committed.is_none() || out.source_committed == out.committed,
        "the source saw ACK COMMITTED the destination did not send: {out:?}"
    );
    if nfaults == 0 {
        assert!(
            out.errors.is_empty(),
            "a faultless session failed: {:?}",
            out.errors
        );
        assert_eq!(
            out.completed,
            Some(round),
            "a faultless session did not complete"
        );
        assert_eq!(out.source_completed, Some(round));
        assert_eq!(
            out.committed,
            Some(round),
            "a faultless session did not commit"
        );
        assert_eq!(out.source_committed, Some(round));
        assert_eq!(out.applied, sent, "a faultless session lost frames");
        // And the source still refuses what was never sent or goes backwards.
        for (c, s) in source.iter_mut().enumerate() {
            for (kind, value) in [
                (AckKind::ROUND, u64::from(round.0)),
                (AckKind::ROUND, u64::from(round.0) + 1),
                (AckKind::FRAMES, sent[c] + 1),
                (AckKind::COMPLETE, u64::from(round.0)),
                (AckKind::COMMITTED, u64::from(round.0)),
            ] {
                let a = Frame::Ack(Ack { kind, value });
                assert!(s.on_frame(&a).is_err(), "channel {c} took {a:?}");
            }
        }
    }
    out
}

/// Seeds for [`session`]: destination-side frame streams (a complete two-channel session,
/// and one with a page on the wrong channel) and generated sessions with and without
/// faults.
pub fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn record(out: &mut Vec<u8>, ch: u8, frame: &Frame<'_>) {
        out.push(ch);
        out.extend_from_slice(&encoded(frame));
    }
    let regions = [
        RegionDesc {
            id: RegionId(0),
            backing_page_size: 4096,
            guest_addr: GuestAddr(0),
            length: 16 * SESSION_PAGE,
        },
        RegionDesc {
            id: RegionId(1),
            backing_page_size: 4096,
            guest_addr: GuestAddr(1 << 20),
            length: 8 * SESSION_PAGE,
        },
    ];
    let layout = Frame::Layout(LayoutFrame {
        chunk_pages: 4,
        regions: WireList::Slice(&regions),
    });
    let run = |start, count| PageRun {
        start: PageIndex(start),
        count,
    };
    // Two channels, chunks of 4 pages: region 0 pages 0..4 and region 1 pages 4..8 are
    // channel 0's; region 0 pages 4..8 and region 1 pages 0..4 are channel 1's.
    let ch0_zero = [run(1, 3)];
    let ch1_zero = [run(4, 2)];
    let ch1_region1 = [run(0, 4)];
    let data_page = [0u8; 4096];
    let data_run = [run(5, 1)];
    // Page 5 of region 0, raw (channel 1's).
    let raw_page = Frame::Pages(PageFrame {
        codec: CodecId::RAW,
        region: RegionId(0),
        round: Round(0),
        data_runs: WireList::Slice(&data_run),
        zero_runs: WireList::Slice(&[]),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &data_page,
    });
    let zero = |region, runs| {
        Frame::Pages(PageFrame {
            codec: CodecId::ZERO,
            region: RegionId(region),
            round: Round(0),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(runs),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &[],
        })
    };
    let end = |frames, pages| {
        Frame::EndOfRound(EndOfRound {
            round: Round(0),
            frames,
            pages,
        })
    };
    let mut complete = vec![0, 1];
    record(
        &mut complete,
        1,
        &Frame::Extension {
            frame_type: FrameType(0x80),
            flags: 0,
            body: b"before layout",
        },
    );
    record(&mut complete, 0, &layout);
    record(&mut complete, 1, &layout);
    record(&mut complete, 0, &zero(0, &ch0_zero[..]));
    record(&mut complete, 1, &zero(0, &ch1_zero[..]));
    record(&mut complete, 1, &zero(1, &ch1_region1[..]));
    record(&mut complete, 1, &raw_page);
    record(
        &mut complete,
        0,
        &Frame::DeviceState(DeviceState {
            instance: 0,
            name: "cpu",
            total: 3,
            offset: 0,
            data: b"abc",
        }),
    );
    record(&mut complete, 0, &end(1, 3));
    record(&mut complete, 1, &end(3, 7));
    let complete_frame = Frame::Complete(Complete {
        final_round: Round(0),
        sections: 1,
    });
    let commit = Frame::Commit(Commit {
        final_round: Round(0),
    });
    // The same session up to COMPLETE, with COMMITs the destination must refuse: on
    // channel 1, and on channel 0 before ACK COMPLETE (channel 1 has not ended the
    // round yet).
    let mut early = complete.clone();
    let at = early.len() - 1 - encoded(&end(3, 7)).len();
    early.truncate(at);
    record(&mut early, 1, &commit);
    record(&mut early, 0, &complete_frame);
    record(&mut early, 0, &commit);
    record(&mut complete, 0, &complete_frame);
    record(&mut complete, 0, &commit);

    let mut wrong = vec![0, 1];
    record(&mut wrong, 0, &layout);
    record(&mut wrong, 1, &layout);
    // Channel 0's pages on channel 1, then on channel 0.
    record(&mut wrong, 1, &zero(0, &ch0_zero[..]));
    record(&mut wrong, 0, &zero(0, &ch0_zero[..]));
    record(&mut wrong, 0, &end(1, 3));

    // COPY frames: channel 0 copies its zero pages 1..4 of region 0 to 8..11; channel 1
    // its data page 5 to pages 4, 12 and 13 (two touching runs whose sources do not
    // continue). Then the same COPYs with a source (channel 0) or a target (channel 1)
    // of the other channel.
    let copy_of = |round_end, runs| {
        Frame::Copy(CopyFrame {
            region: RegionId(0),
            round: Round(0),
            round_end,
            runs: WireList::Slice(runs),
            crc: None,
        })
    };
    let copy = |runs| copy_of(false, runs);
    let copy_run = |start, count, from| CopyRun {
        start: PageIndex(start),
        count,
        from: PageIndex(from),
    };
    let ch0_copy = [copy_run(8, 3, 1)];
    let ch1_copy = [copy_run(4, 1, 5), copy_run(12, 1, 5), copy_run(13, 1, 5)];
    let mut copies = vec![0, 1];
    record(&mut copies, 0, &layout);
    record(&mut copies, 1, &layout);
    record(&mut copies, 0, &zero(0, &ch0_zero[..]));
    record(&mut copies, 0, &copy(&ch0_copy[..]));
    record(&mut copies, 1, &raw_page);
    record(&mut copies, 1, &copy(&ch1_copy[..]));
    record(&mut copies, 0, &end(2, 6));
    record(&mut copies, 1, &end(2, 4));
    record(
        &mut copies,
        0,
        &Frame::Complete(Complete {
            final_round: Round(0),
            sections: 0,
        }),
    );
    record(&mut copies, 0, &commit);
    let mut copies_wrong = vec![0, 1];
    record(&mut copies_wrong, 0, &layout);
    record(&mut copies_wrong, 1, &layout);
    let across = [copy_run(8, 1, 5)];
    record(&mut copies_wrong, 0, &copy(&across[..]));
    record(&mut copies_wrong, 1, &copy(&across[..]));

    // ROUND_END copies with sources of the other channel: channel 1 sets its pages 12
    // and 13 to channel 0's zero pages 1 and 2, channel 0 its page 8 to channel 1's data
    // page 5. Channel 1 ends the round first: its copy waits for channel 0's
    // END_OF_ROUND.
    let ch1_late = [copy_run(12, 2, 1)];
    let ch0_late = [copy_run(8, 1, 5)];
    let mut late = vec![0, 1];
    record(&mut late, 0, &layout);
    record(&mut late, 1, &layout);
    record(&mut late, 1, &copy_of(true, &ch1_late[..]));
    record(&mut late, 0, &zero(0, &ch0_zero[..]));
    record(&mut late, 1, &raw_page);
    record(&mut late, 0, &copy_of(true, &ch0_late[..]));
    record(&mut late, 1, &end(2, 3));
    record(&mut late, 0, &end(2, 4));
    record(
        &mut late,
        0,
        &Frame::Complete(Complete {
            final_round: Round(0),
            sections: 0,
        }),
    );
    record(&mut late, 0, &commit);

    // ACKs and an extension frame for sources that sent nothing (bit 7 of the channel
    // byte), then a LAYOUT for the destination.
    let mut acks = vec![0, 1];
    for (ch, kind, value) in [
        (0x80, AckKind::FRAMES, 0),
        (0x81, AckKind::ROUND, 0),
        (0x80, AckKind::FRAMES, 1),
        (0x81, AckKind::COMPLETE, 0),
        (0x80, AckKind::COMMITTED, 0),
    ] {
        record(&mut acks, ch, &Frame::Ack(Ack { kind, value }));
    }
    record(
        &mut acks,
        0x81,
        &Frame::Extension {
            frame_type: FrameType(0xfe),
            flags: 0,
            body: &[],
        },
    );
    record(&mut acks, 0, &layout);

    vec![
        ("seed-frames-complete", complete),
        ("seed-frames-commit-early", early),
        ("seed-frames-wrong-channel", wrong),
        ("seed-frames-copy", copies),
        ("seed-frames-copy-wrong-channel", copies_wrong),
        ("seed-frames-round-end-copy", late),
        ("seed-frames-acks-to-idle-source", acks),
        // 2 channels, chunks of 2, two regions of 8 and 4 pages, 2 rounds, up to 4
        // pages a frame, extension frames everywhere; no sections, no faults.
        (
            "seed-generated",
            vec![
                1,
                1,
                0,
                1,
                0,
                1,
                7,
                0,
                0,
                3,
                1,
                1,
                3,
                7,
                0,
                0b1011_0110,
                0x5a,
                0x33,
                1,
                0x0f,
                0xf0,
                0x66,
            ],
        ),
        // 3 channels with CRC32C, one region of 16 pages, 3 rounds, one device-state
        // section on channel 0; no faults.
        (
            "seed-generated-crc-section",
            vec![
                3, 2, 0, 3, 1, 0, 15, 1, 2, 5, 3, 1, 0, 20, 8, 1, 0xff, 0xff, 0x33, 0x0f, 0xf0,
                0x55, 0xaa, 0x0f, 0x3c, 0xc3,
            ],
        ),
        // 2 channels with CRC32C, chunks of 2, one region of 16 pages, 2 rounds, up to 8
        // pages a frame, COPY frames (ext bit 5); no sections, no faults.
        (
            "seed-generated-copy",
            vec![
                3, 1, 0, 1, 0, 0, 15, 0, 1, 7, 0x27, 0, 0xff, 0xff, 0xff, 0x7f, 0x8f, 0xf5, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
        // 3 channels with CRC32C, chunks of 2, one region of 16 pages, rounds 0 and 2, up to 8
        // pages a frame, COPY frames and ROUND_END ones (ext bits 5 and 6); no sections,
        // no faults.
        (
            "seed-generated-round-end-copy",
            vec![
                3, 2, 0, 1, 0, 0, 15, 0, 1, 7, 0x67, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
        // 4 channels, chunks of 1, one region of 32 pages all dirty in 2 rounds: a
        // drop, a move and an altered run.
        (
            "seed-generated-faults",
            [
                &[1u8, 3, 3, 0, 0, 0, 31, 0, 1, 7, 0, 0][..],
                &[0xff; 4],
                &[0x0f; 4],
                &[0],
                &[0xff; 4],
                &[0xf0; 4],
                &[0, 0, 1, 2, 2, 2, 0, 3, 3, 3, 1, 0x81],
                &[3, 2, 1, 0, 3, 2, 1, 0],
            ]
            .concat(),
        ),
    ]
}

/// The RDMA binding's messages (`rdma`): the first byte picks the kind (ADVERT,
/// READ_PAGES, DONE), the rest is the message. Whatever decodes must encode back to
/// the same bytes, and nothing may panic.
pub fn rdma_messages(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let kind = [
        crate::rdma::RdmaMsg::ADVERT,
        crate::rdma::RdmaMsg::READ_PAGES,
        crate::rdma::RdmaMsg::DONE,
    ][usize::from(sel) % 3];
    if let Some(again) = crate::rdma::roundtrip(kind, body) {
        assert_eq!(again, body, "{kind:?} re-encodes differently");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        session_seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
            .unwrap()
    }

    #[test]
    fn session_frames_complete_two_channels() {
        let out = session_run(&seed("seed-frames-complete"));
        assert_eq!(out.dead, [false, false]);
        assert_eq!(out.applied, [1, 3]);
        assert_eq!(out.completed, Some(Round(0)));
        assert_eq!(out.committed, Some(Round(0)));
    }

    #[test]
    fn copy_frames_are_applied_counted_and_kept_to_their_channel() {
        let out = session_run(&seed("seed-frames-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.applied, [2, 2]);
        assert_eq!(out.copied, [1, 1]);
        assert_eq!(out.committed, Some(Round(0)));

        let out = session_run(&seed("seed-frames-copy-wrong-channel"));
        assert_eq!(out.applied, [0, 0]);
        let wrong = |page, channel, owner| SessionError::WrongChannel {
            region: RegionId(0),
            page,
            channel: ChannelId(channel),
            owner: ChannelId(owner),
        };
        // Channel 0: the source page 5 is channel 1's. Channel 1: the target page 8 is
        // channel 0's.
        assert_eq!(
            out.errors,
            [(0, Some(wrong(5, 0, 1))), (1, Some(wrong(8, 1, 0)))]
        );

        // A generated session with COPY frames and CRC32C completes with every frame.
        let out = session_run(&seed("seed-generated-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.committed, Some(Round(2)));
        assert!(out.copied.iter().all(|&c| c > 0), "{out:?}");
        assert_eq!(out.round_end, [0, 0]);
    }

    #[test]
    fn round_end_copies_read_other_channels_and_apply_when_every_channel_ended() {
        let out = session_run(&seed("seed-frames-round-end-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.applied, [2, 2]);
        assert_eq!(out.copied, [1, 1]);
        assert_eq!(out.round_end, [1, 1]);
        assert_eq!(out.committed, Some(Round(0)));

        // A generated session of three channels with ROUND_END copies completes with
        // every frame, each copy applied at its round's end.
        let out = session_run(&seed("seed-generated-round-end-copy"));
        assert_eq!(out.errors, []);
        assert_eq!(out.committed, Some(Round(2)));
        assert!(out.round_end.iter().all(|&c| c > 0), "{out:?}");
    }

    #[test]
    fn commit_is_refused_on_another_channel_and_before_ack_complete() {
        let out = session_run(&seed("seed-frames-commit-early"));
        assert_eq!(out.dead, [true, true]);
        assert_eq!(
            out.errors,
            [
                (1, Some(SessionError::CommitChannel(ChannelId(1)))),
                (
                    0,
                    Some(SessionError::CommitEarly {
                        final_round: Round(0)
                    })
                ),
            ]
        );
        assert_eq!(out.committed, None);
    }

    /// Faults in the switchover (bits 3 and 4 of the generated session's `ext` byte)
    /// never leave both sides free to run the guest, and each loss ends as
    /// PROTOCOL.md's table says.
    #[test]
    fn switchover_losses_never_let_both_sides_run_the_guest() {
        for mode in 0..4u8 {
            // One channel, one region of one page, one round; extension frames before
            // LAYOUT; one fault, read from exhausted input as zeros: drop channel 0's
            // first frame (the extension frame). Then the switchover `mode`.
            let ext = 1 | (mode << 3);
            let input = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, ext, 0, 1];
            let out = session_run(&input);
            assert_eq!(out.faults, 1, "mode {mode}");
            assert!(out.completed.is_some(), "mode {mode}: {out:?}");
            match mode {
                0 => {
                    assert_eq!(out.committed, out.completed, "{out:?}");
                    assert_eq!(out.source_committed, out.completed);
                }
                1 => {
                    // COMMIT lost: the destination never runs the guest; the source sent
                    // COMMIT, so it must not resume it either (outcome unknown).
                    assert_eq!(out.committed, None, "{out:?}");
                    assert_eq!(out.source_commit_sent, out.completed);
                    assert_eq!(out.source_committed, None);
                }
                2 => {
                    // ACK COMMITTED lost: the destination runs the guest, the source does
                    // not know it.
                    assert_eq!(out.committed, out.completed, "{out:?}");
                    assert_eq!(out.source_commit_sent, out.completed);
                    assert_eq!(out.source_committed, None);
                }
                _ => {
                    // With one channel ACK COMPLETE goes out at COMPLETE, so the early
                    // COMMIT right behind it is taken, and the source's own COMMIT is
                    // refused as a second one.
                    assert_eq!(out.committed, out.completed, "{out:?}");
                    assert!(
                        out.errors
                            .contains(&(0, Some(SessionError::AfterCommit(FrameType::COMMIT))))
                    );
                }
            }
        }
    }

    /// Found by the `session` fuzz target (before its source learnt to wait): a legitimate
    /// source sends a device-state section on channel 1, ends the round there and on
    /// channel 0, then COMPLETE on channel 0. Channels are read independently, so the
    /// destination may take COMPLETE before channel 1's section; it then refuses it
    /// (`SectionCount`), although it waited for channel 1's round in the same situation.
    /// The session now waits for sections as it waits for rounds.
    #[test]
    fn complete_waits_for_a_section_still_travelling_on_another_channel() {
        let mut s = DestinationSession::new(2, 4096, session_limits()).unwrap();
        let regions = [RegionDesc {
            id: RegionId(0),
            backing_page_size: 4096,
            guest_addr: GuestAddr(0),
            length: SESSION_PAGE,
        }];
        let layout = LayoutFrame {
            chunk_pages: 1,
            regions: WireList::Slice(&regions),
        };
        assert_eq!(s.on_layout(&layout), Ok(true));
        assert_eq!(s.on_round_ended(ChannelId(0), Round(0)), Ok(None));
        let complete = Complete {
            final_round: Round(0),
            sections: 1,
        };
        assert_eq!(s.on_complete(&complete), Ok(CompleteProgress::Waiting));
        let section = DeviceState {
            instance: 0,
            name: "cpu",
            total: 1,
            offset: 0,
            data: b"x",
        };
        assert!(s.on_device_state(ChannelId(1), &section).is_ok());
        assert_eq!(
            s.on_round_ended(ChannelId(1), Round(0)),
            Ok(Some(CompleteProgress::Done(Round(0))))
        );
    }

    /// Found by the fuzzer in this harness: a byte flip that turned run counts (or a
    /// COMPLETE's type) into nonsense made the run-altering fault index past the frame.
    #[test]
    fn a_fault_after_a_byte_flip_stays_inside_the_frame() {
        let input = [
            53, 3, 3, 144, 144, 144, 1, 128, 144, 144, 50, 144, 144, 144, 144, 0, 0, 144, 144, 144,
            3, 3, 0, 0, 15, 240, 102, 1, 71, 0, 0, 55, 255, 255, 240, 240, 240, 240, 0, 0, 129, 2,
            154, 63, 154, 154, 154, 154, 154, 1, 1, 1, 1, 1, 129, 3, 43, 2, 1, 153, 128, 38, 144,
            144, 39, 39,
        ];
        assert!(session_run(&input).faults > 0);
    }

    /// A channel that ended the final round and then opened a later one (its pages
    /// applied) does not stop the session from completing.
    #[test]
    fn pages_after_the_final_round_fail_completion() {
        let regions = [RegionDesc {
            id: RegionId(0),
            backing_page_size: 4096,
            guest_addr: GuestAddr(0),
            length: 4 * SESSION_PAGE,
        }];
        let layout = Frame::Layout(LayoutFrame {
            chunk_pages: 1,
            regions: WireList::Slice(&regions),
        });
        let runs = [PageRun {
            start: PageIndex(1),
            count: 1,
        }];
        let end = Frame::EndOfRound(EndOfRound {
            round: Round(0),
            frames: 0,
            pages: 0,
        });
        let late = Frame::Pages(PageFrame {
            codec: CodecId::ZERO,
            region: RegionId(0),
            round: Round(1),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(&runs),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &[],
        });
        let complete = Frame::Complete(Complete {
            final_round: Round(0),
            sections: 0,
        });
        let mut input = vec![0, 1];
        for (ch, f) in [
            (0, &layout),
            (1, &layout),
            (0, &end),
            (1, &end),
            (1, &late),
            (0, &complete),
        ] {
            input.push(ch);
            input.extend_from_slice(&encoded(f));
        }
        let out = session_run(&input);
        assert_eq!(out.applied, [0, 1]);
        assert_eq!(out.completed, None, "{out:?}");
    }

    #[test]
    fn short_and_empty_inputs_do_nothing() {
        for input in [&[][..], &[0], &[1], &[2, 3], &[0, 0, 0x11]] {
            session(input);
        }
    }
}
