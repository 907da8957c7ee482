//! One channel's receiver thread: checks every frame against the channel's rules, then
//! places, decodes or installs its pages and answers the control frames.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::Instant;

use pagewire_accel::{Codecs, PageKey, PageListMut, PageSize};
use pagewire_protocol::session::CompleteProgress;
use pagewire_protocol::{
    Ack, AckKind, ChannelId, Commit, Complete, CopyRun, DestinationChannel, DestinationEvent,
    Frame, PageFrame, RegionId, Round, SessionError,
};
use pagewire_transport::session::AnyChannel;
use pagewire_transport::{
    Channel, ChannelError, GuestSlice, Incoming, OutFrame, PageSink, RegionSink,
};

use crate::config::Prefault;
use crate::error::MigrationError;
use crate::memory::GuestMemory;
use crate::source::transport_views;

use super::bounds::{self, CommitWait};
use super::dense::DenseBlocks;
use super::{DeviceSection, Shared, State};
use crate::error::peer_fault;

/// frame the rules refuse is received whole instead, and refused there.
struct CheckedSink<'a, 'g> {
    rules: &'a DestinationChannel,
    /// The session, told of a round this frame opens before its pages are placed.
    shared: &'a Shared,
    /// Why the session refused the frame's round, when it did: the receive that
    /// follows ends with this, not with what the transport saw after the session
    /// failed.
    refused: &'a mut Option<MigrationError>,
    /// The copy gate, held shared from the moment a frame is allowed until its pages
    /// are in place (in `held`, which outlives the sink).
    gate: &'g RwLock<()>,
    held: &'a mut Option<RwLockReadGuard<'g, ()>>,
    inner: &'a mut RegionSink,
    /// With [`Prefault::Ahead`]: the memory whose pages are populated before placing.
    ahead: Option<&'a GuestMemory>,
    /// With [`Prefault::Install`]: the memory whose missing pages are installed, so a
    /// frame with such pages is received whole and installed from its payload.
    install: Option<&'a GuestMemory>,
    /// With [`Prefault::HugeWhereDense`]: the blocks to decide before placing.
    dense: Option<(&'a DenseBlocks, &'a GuestMemory)>,
}

impl PageSink for CheckedSink<'_, '_> {
    fn place(&mut self, frame: &PageFrame<'_>, dest: &mut Vec<GuestSlice>) -> bool {
        if self.rules.check_pages(frame).is_err() {
            return false;
        }
        // A frame that opens a round is the session's to allow before a page of it is
        // written: not after COMPLETE's final round nor once the session completed, and
        // a COMPLETE waiting now sees the round open.
        if let Some(round) = self.rules.opens_round(frame.round) {
            let ch = self.rules.id();
            let Ok(mut s) = self.shared.state(ch.0) else {
                return false;
            };
            let r = s.rules.on_round_opened(ch, round);
            drop(s);
            self.shared.cv.notify_all();
            if let Err(source) = r {
                // Received whole and refused where it is applied; the session fails
                // now, not once the peer sends the rest of the frame.
                let e = MigrationError::Rule {
                    channel: ch.0,
                    source,
                };
                self.shared.channel_failed(ch.0, &e);
                *self.refused = Some(e);
                return false;
            }
        }
        if let Some(m) = self.install {
            let installs = frame
                .data_runs
                .iter()
                .any(|r| m.installs(frame.region, r.start.0, u64::from(r.count)));
            if installs {
                return false;
            }
        }
        if let Some(m) = self.ahead {
            populate_data(m, frame);
        }
        if let Some((d, m)) = self.dense {
            d.before_pages(m, frame);
        }
        let placed = self.inner.place(frame, dest);
        // Taken only for a frame placed here (the transport writes its pages once this
        // returns): a frame received whole takes it where it is applied, and a thread
        // asking twice while an exclusive holder waits would wait for itself.
        if placed && self.held.is_none() {
            *self.held = Some(shared_gate(self.gate));
        }
        placed
    }
}

/// The copy gate held shared: this receiver writes or reads pages of its own channel.
fn shared_gate(gate: &RwLock<()>) -> RwLockReadGuard<'_, ()> {
    // The gate guards no data: a panic while it was held leaves nothing half done.
    gate.read().unwrap_or_else(PoisonError::into_inner)
}

/// Backs a frame's data pages in one call each run, before they are written
/// ([`Prefault::Ahead`]).
fn populate_data(memory: &GuestMemory, p: &PageFrame<'_>) {
    for run in p.data_runs.iter() {
        memory.populate(p.region, run.start.0, u64::from(run.count));
    }
}

pub(super) struct Receiver {
    ch: u16,
    shared: Arc<Shared>,
    rules: DestinationChannel,
    codecs: Codecs,
    lengths: Vec<u32>,
    /// The hardware decoder, when [`DestinationConfig::accel`](crate::DestinationConfig::accel) chose one.
    hw: Option<crate::hwdecode::Decoder>,
    /// Scratch: the frame's destination runs for the hardware decoder.
    runs: Vec<(*mut u8, u32, u64)>,
    /// Scratch: pages decoded here before they are installed ([`Prefault::Install`]).
    scratch: Vec<u8>,
    /// Scratch: the frame's destination pages for the software codecs, empty between
    /// frames (kept so that a frame allocates nothing).
    dst: PageListMut<'static>,
    /// The `ROUND_END` copy runs of the open round, applied once every channel ended
    /// it. The session's rules bound their pages per round by the layout's.
    round_end: Vec<(RegionId, CopyRun)>,
    /// Channel 0's wait for COMMIT, once it sent ACK COMPLETE.
    commit: Option<CommitWait>,
}

/// What to do after a frame, once the channel's receive buffer is released.
enum After {
    Nothing,
    AckRound(Round),
    Complete(Complete),
    Commit(Commit),
    Closed,
}

impl Receiver {
    /// Channel `ch`'s receiver, checking frames with `rules`, decoding on `hw` when a
    /// hardware decoder was chosen.
    pub(super) fn new(
        ch: u16,
        shared: Arc<Shared>,
        rules: DestinationChannel,
        hw: Option<crate::hwdecode::Decoder>,
    ) -> Self {
        Self {
            ch,
            shared,
            rules,
            codecs: Codecs::new(),
            lengths: Vec::new(),
            hw,
            runs: Vec::new(),
            scratch: Vec::new(),
            dst: PageListMut::new(PageSize::KIB4),
            round_end: Vec::new(),
            commit: None,
        }
    }

    fn err(&self, what: impl Into<String>) -> MigrationError {
        MigrationError::Protocol {
            channel: self.ch,
            what: what.into(),
        }
    }

    fn rule(&self, source: SessionError) -> MigrationError {
        MigrationError::Rule {
            channel: self.ch,
            source,
        }
    }

    /// Receives until the source closes the channel, or until the session is over (channel 0
    /// took COMMIT, which ends every receiver). A failure while channel 0 waits
    /// for COMMIT after its ACK COMPLETE is [`MigrationError::NoCommit`].
    pub(super) fn run(&mut self, channel: &mut AnyChannel) -> Result<(), MigrationError> {
        // Each frame whole within the idle timeout of its first byte: a source that
        // trickles one cannot hold this thread, its buffers and the session.
        bounds::set_frame_timeout(channel, self.shared.wait);
        self.receive(channel)
            .map_err(|e| match self.rules.awaiting_commit() {
                Some(round) => MigrationError::NoCommit {
                    final_round: round.0,
                    source: Box::new(e),
                },
                None => e,
            })
    }

    fn receive(&mut self, channel: &mut AnyChannel) -> Result<(), MigrationError> {
        let ch = self.ch;
        let shared = self.shared.clone();
        // A receive that ended because another channel failed the session (which shut
        // this socket's receiving side down) is that failure, not this channel's; a
        // frame that does not decode, an idle timeout and a frame not whole in time are
        // this channel's.
        let chan = |source: ChannelError| match peer_fault(&source)
            || matches!(
                source,
                ChannelError::RecvTimeout(_) | ChannelError::FrameTimeout { .. }
            ) {
            true => MigrationError::Channel {
                channel: ch,
                source,
            },
            false => shared.failed_before(ch).unwrap_or(MigrationError::Channel {
                channel: ch,
                source,
            }),
        };
        let mut memory: Option<Arc<GuestMemory>> = None;
        let mut sink: Option<RegionSink> = None;
        loop {
            // After ACK COMPLETE, COMMIT within the idle timeout of it: what arrives
            // meanwhile does not move that bound.
            if let Some(w) = &self.commit {
                w.before_recv(channel)?;
            }
            let after = {
                // Dropped with this block, before anything waits for the gate.
                let mut held = None;
                let mut refused = None;
                let ahead = memory
                    .as_deref()
                    .filter(|_| self.shared.prefault == Prefault::Ahead);
                let install = memory
                    .as_deref()
                    .filter(|_| self.shared.install.get().is_some());
                let dense = memory
                    .as_deref()
                    .and_then(|m| self.shared.dense.get().map(|d| (d, m)));
                let mut checked = sink.as_mut().map(|inner| CheckedSink {
                    rules: &self.rules,
                    shared: &shared,
                    refused: &mut refused,
                    gate: &shared.gate,
                    held: &mut held,
                    inner,
                    ahead,
                    install,
                    dense,
                });
                let incoming = channel.recv(checked.as_mut().map(|s| s as &mut dyn PageSink));
                if let Some(e) = refused.take() {
                    return Err(e);
                }
                let incoming = match (incoming, self.commit) {
                    (Err(e), Some(w)) if w.retry(&e) => continue,
                    (Err(ChannelError::RecvTimeout(_)), Some(w)) => return Err(w.timed_out()),
                    (incoming, _) => incoming.map_err(chan)?,
                };
                match incoming {
                    None => After::Closed,
                    Some(Incoming::Placed(p)) => {
                        let t = Instant::now();
                        // Held since `place` allowed the frame, or taken now.
                        let _gate = held.is_none().then(|| shared_gate(&shared.gate));
                        self.rules.on_placed(&p).map_err(|e| self.rule(e))?;
                        self.round_opened()?;
                        let memory = memory.as_ref().ok_or(MigrationError::Worker(ch))?;
                        let data = p.data_pages();
                        self.shared
                            .placed
                            .fetch_add(data * u64::from(self.shared.page_size), Ordering::Relaxed);
                        Self::apply_runs(memory, &p);
                        self.count(&p);
                        self.shared.apply.record(t.elapsed());
                        After::Nothing
                    }
                    Some(Incoming::Frame(Frame::Abort(a))) => {
                        return Err(MigrationError::PeerAborted {
                            channel: self.ch,
                            reason: a.reason,
                            message: a.message.to_owned(),
                        });
                    }
                    Some(Incoming::Frame(f)) => {
                        let t = Instant::now();
                        match self.rules.on_frame(&f).map_err(|e| self.rule(e))? {
                            DestinationEvent::Layout(l) => {
                                let mut s = self.shared.state(ch)?;
                                s.rules.on_layout(l).map_err(|e| self.rule(e))?;
                                self.rules.set_layout(&s.rules).map_err(|e| self.rule(e))?;
                                drop(s);
                                if memory.is_none() {
                                    let layout =
                                        self.rules.layout().ok_or(MigrationError::Worker(ch))?;
                                    let m = self.shared.memory_for(ch, layout)?;
                                    sink = Some(RegionSink::new(
                                        self.shared.page_size,
                                        transport_views(&m),
                                    ));
                                    memory = Some(m);
                                }
                                After::Nothing
                            }
                            DestinationEvent::Apply(p) => {
                                self.round_opened()?;
                                let memory = memory.as_ref().ok_or(MigrationError::Worker(ch))?;
                                let _gate = held.is_none().then(|| shared_gate(&shared.gate));
                                if self.shared.prefault == Prefault::Ahead {
                                    populate_data(memory, p);
                                }
                                if let Some(d) = self.shared.dense.get() {
                                    d.before_pages(memory, p);
                                }
                                let decoded = match &mut self.hw {
                                    Some(hw) if hw.takes(p.codec) && !p.data_runs.is_empty() => {
                                        Self::decode_hw(
                                            hw,
                                            &mut self.runs,
                                            &mut self.lengths,
                                            memory,
                                            p,
                                        )
                                        .map(|fell| {
                                            self.shared.hw_decodes.fetch_add(1, Ordering::Relaxed);
                                            if let (Some(cause), Ok(mut c)) =
                                                (fell, self.shared.hw_fallbacks.lock())
                                            {
                                                c.add(cause);
                                            }
                                        })
                                    }
                                    _ => Self::decode(
                                        &mut self.codecs,
                                        &mut self.lengths,
                                        &mut self.scratch,
                                        &mut self.dst,
                                        memory,
                                        p,
                                    ),
                                };
                                decoded.map_err(|source| MigrationError::Codec {
                                    channel: ch,
                                    source,
                                })?;
                                Self::apply_runs(memory, p);
                                self.count(p);
                                self.shared.apply.record(t.elapsed());
                                After::Nothing
                            }
                            DestinationEvent::RoundEndCopy(c) => {
                                self.round_opened()?;
                                // Applied once every channel ended the round.
                                self.round_end.extend(c.runs.iter().map(|r| (c.region, r)));
                                self.shared.frames.fetch_add(1, Ordering::Relaxed);
                                self.shared
                                    .copied_pages
                                    .fetch_add(c.pages(), Ordering::Relaxed);
                                self.shared
                                    .round_end_pages
                                    .fetch_add(c.pages(), Ordering::Relaxed);
                                After::Nothing
                            }
                            DestinationEvent::Copy(c) => {
                                self.round_opened()?;
                                let memory = memory.as_ref().ok_or(MigrationError::Worker(ch))?;
                                let _gate = held.is_none().then(|| shared_gate(&shared.gate));
                                if let Some(d) = self.shared.dense.get() {
                                    d.before_copies(memory, c.region, c.runs.iter());
                                }
                                super::copies::copy(
                                    memory,
                                    &mut self.scratch,
                                    c.region,
                                    c.runs.iter(),
                                )
                                .map_err(|what| self.err(what))?;
                                self.shared.frames.fetch_add(1, Ordering::Relaxed);
                                self.shared
                                    .copied_pages
                                    .fetch_add(c.pages(), Ordering::Relaxed);
                                self.shared.apply.record(t.elapsed());
                                After::Nothing
                            }
                            DestinationEvent::AckRound(round) => After::AckRound(round),
                            DestinationEvent::DeviceState(d) => {
                                let mut s = self.shared.state(ch)?;
                                if let Some(section) = s
                                    .rules
                                    .on_device_state(ChannelId(ch), d)
                                    .map_err(|e| self.rule(e))?
                                {
                                    s.sections.push(DeviceSection {
                                        name: section.name,
                                        instance: section.instance,
                                        data: section.data,
                                    });
                                }
                                drop(s);
                                // A COMPLETE may have been waiting for this section.
                                self.shared.cv.notify_all();
                                After::Nothing
                            }
                            DestinationEvent::Complete(c) => After::Complete(*c),
                            DestinationEvent::Commit(c) => After::Commit(*c),
                            _ => After::Nothing,
                        }
                    }
                }
            };
            match after {
                After::Nothing => {}
                After::AckRound(round) => {
                    self.round_end_copies(round, memory.as_deref())?;
                    // The session's rules before the ACK: a round after the final one
                    // is refused, not acknowledged first.
                    let mut s = self.shared.state(ch)?;
                    // A session another channel failed acknowledges nothing more.
                    if let Some(e) = self.shared.failure(ch, &s) {
                        return Err(e);
                    }
                    let r = s.rules.on_round_ended(ChannelId(ch), round);
                    drop(s);
                    self.shared.cv.notify_all();
                    r.map_err(|e| self.rule(e))?;
                    let ack = Ack {
                        kind: AckKind::ROUND,
                        value: round.0.into(),
                    };
                    self.send_ack(channel, ack)?;
                }
                After::Complete(c) => {
                    self.complete(c)?;
                    self.check_device_state()?;
                    let s = self.shared.state(ch)?;
                    // A channel may have failed the session since COMPLETE's conditions
                    // were met (a frame refused, the source's ABORT), while the VMM
                    // checked the device state: no ACK COMPLETE then. Checked under the
                    // lock that records a failure, so one recorded before this point
                    // is seen; one recorded after it may still see this ACK sent, and
                    // COMMIT then checks again.
                    if let Some(e) = self.shared.failure(ch, &s) {
                        return Err(e);
                    }
                    let ack = self.rules.ack_complete(&s.rules).map_err(|e| self.rule(e));
                    drop(s);
                    // Still not this side's guest: channel 0 now waits for COMMIT, for
                    // the idle timeout from here at most.
                    self.send_ack(channel, ack?)?;
                    self.commit = Some(CommitWait::from_now(self.shared.wait));
                }
                After::Commit(c) => {
                    // A COMMIT read once the wait ended is not taken: past that bound
                    // this side reports failure (PROTOCOL.md, Outcome unknown).
                    if let Some(w) = self.commit.filter(CommitWait::expired) {
                        return Err(w.timed_out());
                    }
                    let mut s = self.shared.state(ch)?;
                    // A session that failed before COMMIT was taken never becomes this
                    // side's: another channel's refused frame or ABORT may reach the
                    // session before this receiver sees its socket shut down, and the
                    // source may have sent COMMIT meanwhile (ABORT, PROTOCOL.md).
                    if let Some(e) = self.shared.failure(ch, &s) {
                        return Err(e);
                    }
                    let ack = s.rules.on_commit(&c).map_err(|e| self.rule(e));
                    drop(s);
                    self.shared.cv.notify_all();
                    // The guest is this side's now; ACK COMMITTED is best effort: a source
                    // that misses it reports the outcome unknown and keeps the guest
                    // paused (PROTOCOL.md, Switchover).
                    let _ = self.send_ack(channel, ack?);
                    // Nothing the channels carry now changes the outcome: every receiver
                    // ends here, so `Destination::wait` reports success now, not when
                    // the source gets round to closing its channels (or they idle out).
                    self.shared.end_receivers();
                    return Ok(());
                }
                After::Closed => {
                    let s = self.shared.state(ch)?;
                    let done = match ch {
                        0 => s.rules.committed(),
                        _ => s.rules.completed(),
                    };
                    if done.is_none()
                        && let Some(e) = self.shared.failure(ch, &s)
                    {
                        // Woken by the failure of another channel.
                        return Err(e);
                    }
                    return match (done, s.rules.completed()) {
                        (Some(_), _) => Ok(()),
                        (None, Some(_)) => {
                            Err(self.err("the source closed the channel without COMMIT"))
                        }
                        (None, None) => {
                            Err(self.err("the source closed the channel before completing"))
                        }
                    };
                }
            }
        }
    }

    /// Tells the session when this channel opened a round (once per round).
    fn round_opened(&mut self) -> Result<(), MigrationError> {
        if let Some(round) = self.rules.take_opened() {
            let mut s = self.shared.state(self.ch)?;
            let r = s.rules.on_round_opened(ChannelId(self.ch), round);
            drop(s);
            self.shared.cv.notify_all();
            r.map_err(|e| self.rule(e))?;
        }
        Ok(())
    }

    fn count(&self, p: &PageFrame<'_>) {
        self.shared.frames.fetch_add(1, Ordering::Relaxed);
        self.shared
            .data_pages
            .fetch_add(p.data_pages(), Ordering::Relaxed);
        self.shared
            .zero_pages
            .fetch_add(p.zero_pages(), Ordering::Relaxed);
        self.shared
            .uniform_pages
            .fetch_add(p.uniform_pages(), Ordering::Relaxed);
    }

    /// Channel `ch` ended `round`: records it, and when this channel holds `ROUND_END`
    /// copies, waits until every channel ended that round or a later one, then applies
    /// them with the copy gate held exclusively (PROTOCOL.md, COPY).
    fn round_end_copies(
        &mut self,
        round: Round,
        memory: Option<&GuestMemory>,
    ) -> Result<(), MigrationError> {
        let ch = self.ch;
        let mut s = self.shared.state(ch)?;
        let n = usize::from(s.rules.channels());
        s.copy_ended.resize(n, None);
        if let Some(slot) = s.copy_ended.get_mut(usize::from(ch)) {
            *slot = Some(round);
        }
        self.shared.cv.notify_all();
        if self.round_end.is_empty() {
            return Ok(());
        }
        let deadline = pagewire_transport::deadline::from_now(self.shared.wait);
        while !s.copy_ended.iter().all(|e| e.is_some_and(|e| e >= round)) {
            s = match self.wait_state(s, deadline, round)? {
                Ok(s) => s,
                Err(s) => {
                    let ended = s
                        .copy_ended
                        .iter()
                        .filter(|e| e.is_some_and(|e| e >= round))
                        .count();
                    return Err(self.err(format!(
                        "ROUND_END copies of round {}: {ended} of {n} channels ended the \
                         round within {:?}",
                        round.0, self.shared.wait
                    )));
                }
            };
        }
        drop(s);
        let memory = memory.ok_or(MigrationError::Worker(ch))?;
        let runs = std::mem::take(&mut self.round_end);
        let started = Instant::now();
        let _gate = self
            .shared
            .gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = self.shared.dense.get() {
            for group in runs.chunk_by(|a, b| a.0 == b.0) {
                d.before_copies(memory, group[0].0, group.iter().map(|r| r.1));
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let helpers = super::copies::apply_round_end(memory, &mut self.scratch, &runs, threads)
            .map_err(|what| self.err(what))?;
        self.shared.add_cpu(helpers);
        self.shared.round_end_ns.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // Its allocation is kept for the next round.
        self.round_end = runs;
        self.round_end.clear();
        Ok(())
    }

    /// After the data pages are in place: records them as written, and sets the zero
    /// and uniform pages.
    fn apply_runs(memory: &GuestMemory, p: &PageFrame<'_>) {
        // Bounds were checked against the layout.
        for run in p.data_runs.iter() {
            memory.note_written(p.region, run.start.0, u64::from(run.count));
        }
        for run in p.zero_runs.iter() {
            memory.zero_pages(p.region, run.start.0, u64::from(run.count));
        }
        for u in p.uniform_runs.iter() {
            memory.fill_pages(p.region, u.run.start.0, u64::from(u.run.count), u.byte);
        }
    }

    /// Decodes a frame's payload by its codec id straight into the guest pages; with
    /// [`Prefault::Install`], runs with pages still missing are decoded into `scratch`
    /// and installed from there (a raw frame's straight from its payload).
    fn decode(
        codecs: &mut Codecs,
        lengths: &mut Vec<u32>,
        scratch: &mut Vec<u8>,
        dst: &mut PageListMut<'static>,
        memory: &GuestMemory,
        p: &PageFrame<'_>,
    ) -> Result<(), pagewire_accel::CodecError> {
        let ps = PageSize::new(memory.page_size()).unwrap_or_default();
        dst.reset(ps);
        let r = Self::decode_into(codecs, lengths, scratch, dst, memory, p);
        // Its pointers are not kept past the frame.
        dst.reset(ps);
        r
    }

    /// [`Receiver::decode`] with `dst` empty.
    fn decode_into(
        codecs: &mut Codecs,
        lengths: &mut Vec<u32>,
        scratch: &mut Vec<u8>,
        dst: &mut PageListMut<'static>,
        memory: &GuestMemory,
        p: &PageFrame<'_>,
    ) -> Result<(), pagewire_accel::CodecError> {
        let no_pages = pagewire_accel::CodecError::NoPages { codec: p.codec };
        let page_bytes = memory.page_size() as usize;
        let installs = |run: &pagewire_protocol::PageRun| {
            memory.installs(p.region, run.start.0, u64::from(run.count))
        };
        let installing = p.data_runs.iter().any(|r| installs(&r));
        if installing
            && p.codec == pagewire_protocol::CodecId::RAW
            && p.lengths.is_none()
            && p.payload.len() as u64 == p.data_pages() * page_bytes as u64
        {
            let mut off = 0;
            for run in p.data_runs.iter() {
                let n = run.count as usize * page_bytes;
                let part = p.payload.get(off..off + n).ok_or(no_pages)?;
                if !memory.write_pages(p.region, run.start.0, part) {
                    return Err(no_pages);
                }
                off += n;
            }
            return Ok(());
        }
        if installing {
            let total = p
                .data_runs
                .iter()
                .filter(|r| installs(r))
                .map(|r| r.count as usize * page_bytes)
                .sum();
            // Grown only: every codec but delta writes each byte of its pages or fails,
            // so what a previous frame left here is never installed.
            if scratch.len() < total {
                scratch.resize(total, 0);
            }
            if p.codec == pagewire_protocol::CodecId::DELTA {
                // The delta's base: what the pages hold (zeros where never written).
                scratch[..total].fill(0);
                let mut off = 0;
                for run in p.data_runs.iter().filter(|r| installs(r)) {
                    let n = run.count as usize * page_bytes;
                    let d = &mut scratch[off..off + n];
                    memory.read_written(p.region, run.start.0, u64::from(run.count), d);
                    off += n;
                }
            }
        }
        let mut scratch_off = 0;
        // One pointer to the whole buffer for every run in it (runs pushed raw may join).
        let scratch_base = scratch.as_mut_ptr();
        for run in p.data_runs.iter() {
            if installing && installs(&run) {
                let n = run.count as usize * page_bytes;
                if scratch_off + n > scratch.len() {
                    return Err(no_pages);
                }
                let part = scratch_base.wrapping_add(scratch_off);
                // SAFETY: `part .. part + n` is a part of `scratch` (checked above), which
                // is not resized or otherwise touched until the decode below has finished
                // with `dst`; parts of different runs are disjoint; every part's pointer
                // comes from `scratch_base`.
                unsafe { dst.push_raw(part, run.count, PageKey(run.start.0)) }
                    .map_err(|_| no_pages)?;
                scratch_off += n;
                continue;
            }
            let Some((ptr, _)) = memory.span(p.region, run.start.0, u64::from(run.count)) else {
                return Err(pagewire_accel::CodecError::NoPages { codec: p.codec });
            };
            // SAFETY: the run lies inside a region of `memory` (checked against the
            // layout and again by `span`), which outlives `dst`; runs of a decoded frame
            // are disjoint; the guest is not running on the destination; and the
            // session's rules refused the frame unless every page belongs to this
            // channel by the affinity carried in LAYOUT, so no other receiver thread
            // writes these pages.
            unsafe { dst.push_raw(ptr.as_ptr(), run.count, PageKey(run.start.0)) }
                .map_err(|_| pagewire_accel::CodecError::NoPages { codec: p.codec })?;
        }
        lengths.clear();
        if let Some(l) = &p.lengths {
            lengths.extend(l.iter());
        }
        if p.data_runs.is_empty() {
            return Ok(());
        }
        codecs.decode(p.codec, p.payload, lengths, dst)?;
        if installing {
            let mut off = 0;
            for run in p.data_runs.iter().filter(|r| installs(r)) {
                let n = run.count as usize * page_bytes;
                let part = scratch.get(off..off + n).ok_or(no_pages)?;
                if !memory.write_pages(p.region, run.start.0, part) {
                    return Err(no_pages);
                }
                off += n;
            }
        }
        Ok(())
    }

    /// Decodes a frame on the hardware decoder, straight into the guest pages;
    /// returns why the hardware handed it to software, if it did.
    fn decode_hw(
        hw: &mut crate::hwdecode::Decoder,
        runs: &mut Vec<(*mut u8, u32, u64)>,
        lengths: &mut Vec<u32>,
        memory: &GuestMemory,
        p: &PageFrame<'_>,
    ) -> Result<Option<pagewire_accel::FallbackCause>, pagewire_accel::CodecError> {
        hw.map(memory)?;
        runs.clear();
        for run in p.data_runs.iter() {
            let Some((ptr, _)) = memory.span(p.region, run.start.0, u64::from(run.count)) else {
                return Err(pagewire_accel::CodecError::NoPages { codec: p.codec });
            };
            runs.push((ptr.as_ptr(), run.count, run.start.0));
        }
        lengths.clear();
        if let Some(l) = &p.lengths {
            lengths.extend(l.iter());
        }
        // SAFETY: as in `decode`: the runs lie inside a region of `memory`, which
        // outlives the call; they are disjoint; the guest is not running here; and
        // channel affinity keeps every other receiver away from these pages.
        unsafe { hw.decode(p.codec, p.payload, lengths, runs) }
    }

    /// The VMM's check of the device state, once it has all arrived and before ACK
    /// COMPLETE ([`DestinationConfig::check_device_state`]).
    ///
    /// [`DestinationConfig::check_device_state`]: crate::DestinationConfig::check_device_state
    fn check_device_state(&self) -> Result<(), MigrationError> {
        let Some(check) = &self.shared.check else {
            return Ok(());
        };
        // Out of the session's state while the VMM checks them, which may take long
        // (pagewire-vmm loads them into its VM): no lock is held meanwhile, so another
        // channel's failure or a cancel is recorded at once. Every section has arrived
        // (COMPLETE's conditions are met) and the rules refuse any further one.
        let sections = std::mem::take(&mut self.shared.state(self.ch)?.sections);
        // A panic in the VMM's check refuses the state (ABORT `APPLY_FAILED`) rather
        // than end this thread without a word to the source or the other channels.
        let checked = crate::error::vmm_call(|| check.check(&sections))
            .unwrap_or_else(|panic| Err(format!("the check panicked: {panic}")));
        self.shared.state(self.ch)?.sections = sections;
        checked.map_err(|what| MigrationError::DeviceStateRefused { what })
    }

    /// Waits until every channel ended the final round (the session's rules decide),
    /// within the idle timeout.
    fn complete(&mut self, c: Complete) -> Result<u32, MigrationError> {
        let ch = self.ch;
        let deadline = pagewire_transport::deadline::from_now(self.shared.wait);
        let mut s = self.shared.state(ch)?;
        let mut progress = s.rules.on_complete(&c).map_err(|e| self.rule(e))?;
        loop {
            if let CompleteProgress::Done(r) = progress {
                return Ok(r.0);
            }
            s = match self.wait_state(s, deadline, c.final_round)? {
                Ok(s) => s,
                Err(s) => {
                    let (ended, sections, partial) = s.rules.waiting_for();
                    return Err(self.err(format!(
                        "COMPLETE for round {} not satisfied within {:?}: {ended} of {} \
                         channels ended it, {sections} of {} device-state sections arrived, \
                         {partial} unfinished",
                        c.final_round,
                        self.shared.wait,
                        s.rules.channels(),
                        c.sections
                    )));
                }
            };
            progress = s.rules.complete_progress();
        }
    }

    /// One wait on the session's condition variable, for every channel to end `round`,
    /// at most until `deadline`: `Ok` with the state after the wait, `Err` with it once
    /// the deadline has passed.
    ///
    /// # Errors
    /// Another channel failed the session, or idled out before it ended `round`.
    fn wait_state<'s>(
        &self,
        s: MutexGuard<'s, State>,
        deadline: Instant,
        round: Round,
    ) -> Result<Result<MutexGuard<'s, State>, MutexGuard<'s, State>>, MigrationError> {
        if let Some(e) = self.shared.failure(self.ch, &s) {
            return Err(e);
        }
        if let Some(e) = self.shared.idle_blocks(self.ch, &s, round) {
            return Err(e);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Err(s));
        }
        self.shared
            .cv
            .wait_timeout(s, deadline - now)
            .map(|(s, _)| Ok(s))
            .map_err(|_| MigrationError::Worker(self.ch))
    }

    fn send_ack(&mut self, channel: &mut AnyChannel, ack: Ack) -> Result<(), MigrationError> {
        let f = OutFrame::whole(&Frame::Ack(ack)).map_err(|e| self.err(e.to_string()))?;
        let ch = self.ch;
        let mut done = Vec::new();
        channel
            .send(f)
            .and_then(|_| channel.flush(&mut done))
            .map_err(|source| MigrationError::Channel {
                channel: ch,
                source,
            })
    }
}
