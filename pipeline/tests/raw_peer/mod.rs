//! A source written by hand against PROTOCOL.md for the hostile-peer tests: the protocol
//! crate's sans-IO handshake and frame encoder over a plain socket, none of the
//! pipeline's source, and a destination on loopback to point it at.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use pagewire::{DestinationConfig, DestinationListener, GuestMemory, MigrationError};
use pagewire_protocol::*;

use crate::common;

pub const PS: u32 = 4096;

/// One channel of a hand-driven source.
pub struct Raw {
    pub stream: TcpStream,
    limits: Limits,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(
        addr: SocketAddr,
        session: SessionId,
        channel: u16,
        count: u16,
        crc: bool,
    ) -> Raw {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut caps = Capabilities::new(PS);
        caps.checksum = crc;
        let mut hs = ClientHandshake::new(
            ClientConfig {
                caps,
                session,
                channel: ChannelId(channel),
                channel_count: count,
                auth: Authentication::None,
                require: CodecSet::empty(),
            },
            [channel as u8 + 1; 32],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            out.clear();
            hs.take_output(&mut out);
            stream.write_all(&out).unwrap();
            if hs.is_done() {
                break;
            }
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "destination closed during the handshake");
            hs.receive(&buf[..n]).unwrap();
        }
        out.clear();
        hs.take_output(&mut out);
        stream.write_all(&out).unwrap();
        let limits = hs.negotiated().unwrap().limits();
        Raw {
            stream,
            limits,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, f: Frame<'_>) {
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        self.send_bytes(&out);
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        // The destination may already have closed: its verdict is what the test reads.
        let _ = self.stream.write_all(b);
    }

    /// The next frame type and, for ACK and ABORT, its value or reason.
    pub fn recv(&mut self) -> Option<(FrameType, u64)> {
        self.next(|f| match f {
            Frame::Ack(a) => (FrameType::ACK, a.value),
            Frame::Abort(a) => (FrameType::ABORT, u64::from(a.reason.0)),
            f => (f.frame_type(), 0),
        })
        .ok()
    }

    /// The next frame, through `read`; `Err` with what ended the stream instead: an
    /// `UnexpectedEof` for a clean close, the read's error (a reset, a timeout), or
    /// `InvalidData` for bytes that are no frame.
    pub fn next<T>(&mut self, read: impl FnOnce(Frame<'_>) -> T) -> std::io::Result<T> {
        use std::io::{Error, ErrorKind};
        let mut dec = FrameDecoder::new(self.limits);
        let mut chunk = [0u8; 4096];
        loop {
            if !self.buf.is_empty() {
                let (used, f) = dec
                    .decode(&self.buf)
                    .map_err(|e| Error::new(ErrorKind::InvalidData, e.to_string()))?;
                if let Some(f) = f {
                    let got = read(f);
                    self.buf.drain(..used);
                    return Ok(got);
                }
                self.buf.drain(..used);
            }
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The ABORT's reason and message, when the next frame is one.
    pub fn recv_abort(&mut self) -> Option<(AbortReason, String)> {
        self.next(|f| match f {
            Frame::Abort(a) => Some((a.reason, a.message.to_owned())),
            _ => None,
        })
        .ok()
        .flatten()
    }

    /// Every frame until the destination ends the connection, as [`Self::recv`] gives
    /// them; `Err` when the read timed out (or failed otherwise) first.
    pub fn until_end(&mut self) -> std::io::Result<Vec<(FrameType, u64)>> {
        use std::io::ErrorKind;
        let mut frames = Vec::new();
        loop {
            match self.next(|f| match f {
                Frame::Ack(a) => (FrameType::ACK, a.value),
                Frame::Abort(a) => (FrameType::ABORT, u64::from(a.reason.0)),
                f => (f.frame_type(), 0),
            }) {
                Ok(f) => frames.push(f),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(frames);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

pub fn regions(bytes: u64) -> [RegionDesc; 1] {
    [RegionDesc {
        id: RegionId(0),
        backing_page_size: PS,
        guest_addr: GuestAddr(0),
        length: bytes,
    }]
}

pub fn memory(bytes: u64) -> Arc<GuestMemory> {
    let layout = MemoryLayout::new(PS, regions(bytes)).unwrap();
    Arc::new(GuestMemory::anonymous(&layout).unwrap())
}

pub fn run(start: u64, count: u32) -> PageRun {
    PageRun {
        start: PageIndex(start),
        count,
    }
}

pub fn raw_pages<'a>(
    runs: &'a [PageRun],
    payload: &'a [u8],
    round: u32,
    crc: bool,
) -> PageFrame<'a> {
    let f = PageFrame {
        codec: CodecId::RAW,
        region: RegionId(0),
        round: Round(round),
        data_runs: WireList::Slice(runs),
        zero_runs: WireList::Slice(&[]),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload,
    };
    if crc {
        f.with_crc(&[payload]).unwrap()
    } else {
        f
    }
}

/// A destination on loopback for session `n`; each [`Dest::accept`] serves one session
/// on the same listener.
pub struct Dest {
    pub n: u8,
    pub listener: Arc<DestinationListener>,
    pub addr: SocketAddr,
}

pub type Verdict = std::thread::JoinHandle<Result<pagewire::Migrated, MigrationError>>;

impl Dest {
    pub fn new(n: u8, limits: Option<DestinationLimits>) -> Dest {
        Self::with(n, |cfg| {
            if let Some(l) = limits {
                cfg.limits = l;
            }
        })
    }

    /// As [`Self::new`], with the configuration changed by `change`.
    pub fn with(n: u8, change: impl FnOnce(&mut DestinationConfig)) -> Dest {
        let mut cfg = DestinationConfig::new(common::session(n), Authentication::None);
        cfg.idle_timeout = Duration::from_secs(10);
        cfg.accept_timeout = Duration::from_secs(10);
        cfg.handshake_timeout = Duration::from_secs(5);
        change(&mut cfg);
        let listener = Arc::new(DestinationListener::bind(common::loopback(), cfg).unwrap());
        let addr = listener.local_addr().unwrap();
        Dest { n, listener, addr }
    }

    /// Accepts one session (optionally into `memory`) and waits for its end.
    pub fn accept(&self, memory: Option<Arc<GuestMemory>>) -> Verdict {
        let l = self.listener.clone();
        std::thread::spawn(move || l.accept(memory)?.wait())
    }

    pub fn connect(&self, channel: u16, count: u16, crc: bool) -> Raw {
        Raw::connect(self.addr, common::session(self.n), channel, count, crc)
    }
}

pub fn rule(r: Result<pagewire::Migrated, MigrationError>) -> SessionError {
    match r {
        Err(MigrationError::Rule { source, .. }) => source,
        other => panic!("expected a session rule error, got {other:?}"),
    }
}

/// A whole legitimate session over `count` raw channels on `dest`'s listener: LAYOUT
/// (after an extension frame), one page per channel, END_OF_ROUND, COMPLETE, COMMIT;
/// the destination's memory is checked byte for byte.
pub fn legitimate(dest: &Dest, count: u16) {
    let t = dest.accept(None);
    let mut chans: Vec<Raw> = (0..count).map(|c| dest.connect(c, count, true)).collect();
    let regions = regions(64 * u64::from(PS));
    let aff = Affinity::new(count, 4).unwrap();
    for (c, raw) in chans.iter_mut().enumerate() {
        raw.send(Frame::Extension {
            frame_type: FrameType(0x90),
            flags: 0,
            body: b"before layout",
        });
        raw.send(Frame::Layout(LayoutFrame {
            chunk_pages: 4,
            regions: WireList::Slice(&regions),
        }));
        let page = aff.next_on(RegionId(0), ChannelId(c as u16), 0);
        let runs = [run(page, 1)];
        let payload = vec![c as u8 + 1; PS as usize];
        raw.send(Frame::Pages(raw_pages(&runs, &payload, 0, true)));
        raw.send(Frame::Extension {
            frame_type: FrameType(0xfe),
            flags: 3,
            body: &[0; 100],
        });
        raw.send(Frame::EndOfRound(EndOfRound {
            round: Round(0),
            frames: 1,
            pages: 1,
        }));
        assert_eq!(raw.recv(), Some((FrameType::ACK, 0)));
    }
    chans[0].send(Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    }));
    assert_eq!(chans[0].recv(), Some((FrameType::ACK, 0)));
    chans[0].send(Frame::Commit(Commit {
        final_round: Round(0),
    }));
    assert_eq!(chans[0].recv(), Some((FrameType::ACK, 0)));
    drop(chans);
    let m = t.join().unwrap().expect("the legitimate session completes");
    assert_eq!(m.final_round, 0);
    let mut want = vec![0u8; 64 * PS as usize];
    for c in 0..count {
        let page = aff.next_on(RegionId(0), ChannelId(c), 0) as usize;
        want[page * PS as usize..(page + 1) * PS as usize].fill(c as u8 + 1);
    }
    let mut got = vec![0u8; want.len()];
    assert!(m.memory.read_pages(RegionId(0), 0, 64, &mut got));
    assert!(got == want, "the destination's memory differs");
}

/// LAYOUT (64 pages, chunks of 4) and an empty round 0 on channel `c`, acknowledged.
pub fn through_an_empty_round_0(c: &mut Raw) {
    let regions = regions(64 * u64::from(PS));
    c.send(Frame::Layout(LayoutFrame {
        chunk_pages: 4,
        regions: WireList::Slice(&regions),
    }));
    c.send(Frame::EndOfRound(EndOfRound {
        round: Round(0),
        frames: 0,
        pages: 0,
    }));
    assert_eq!(c.recv(), Some((FrameType::ACK, 0)));
}

/// Round 0 is the final round: COMPLETE and COMMIT on channel 0, each acknowledged.
pub fn complete_and_commit(c: &mut Raw) {
    c.send(Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    }));
    assert_eq!(c.recv(), Some((FrameType::ACK, 0)));
    c.send(Frame::Commit(Commit {
        final_round: Round(0),
    }));
    assert_eq!(c.recv(), Some((FrameType::ACK, 0)));
}
