//! The generated mode of the `session` fuzz target: a legitimate session produced by a
//! [`SourceChannel`] per channel, faults injected into it, and a delivery schedule.

use crate::copy::CopyRun;
use crate::frame::{Ack, Commit, DeviceState, Frame, LayoutFrame, PageFrame};
use crate::fuzzing::decode_one;
use crate::ids::{AckKind, ChannelId, CodecId, FrameType, GuestAddr, PageIndex, RegionId, Round};
use crate::limits::Limits;
use crate::session::{Affinity, SourceChannel, SourceEvent};
use crate::wire::{RegionDesc, UniformRun, WireList};

use super::destination::FuzzDestination;
use super::{Params, SESSION_PAGE, SessionOutcome, copy_frame, encoded, round_end, runs_of};

pub(super) fn session_generated(limits: &Limits, crc: bool, data: &[u8]) -> SessionOutcome {
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
