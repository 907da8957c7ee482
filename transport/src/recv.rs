//! The receive side shared by the stream backends (TCP and io_uring): bytes in, frames
//! out, with raw page payloads placed straight into destination memory.
//!
//! Frames are parsed with the protocol crate ([`Envelope::parse`], [`Frame::decode`]).
//! The one thing the protocol crate cannot do yet is check a PAGES *header* whose
//! payload is not in the same buffer; [`raw_header`] does that for raw frames, and
//! anything it does not accept goes the whole-frame way, where the protocol's decoder
//! gives the exact error.

use pagewire_protocol::{
    CodecId, DecodeError, Envelope, Frame, FrameType, Limits, PageFrame,
    frame::{FLAG_PER_PAGE, PAGES_FIXED_LEN as PAGES_FIXED},
};

use std::time::{Duration, Instant};

use crate::buf::GuestSlice;
use crate::channel::{ChannelError, Incoming, PageSink, placed_len};

/// Receive buffer size before any large frame arrives.
const INITIAL_BUF: usize = 256 << 10;
/// With a sink, how far past the bytes it needs a read may go: enough to take a whole
/// header (and the next small frame) in one read, little enough that the payload bytes
/// it brings along (copied from the buffer into place) do not matter.
const SINK_READ_AHEAD: usize = 4096;

/// Where a stream backend gets its bytes.
pub(crate) trait ByteSource {
    /// Reads into `dst`; `Ok(0)` is end of stream.
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError>;

    /// Reads into the concatenation of `dst`, starting `skip` bytes into it; `Ok(0)` is
    /// end of stream.
    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError>;

    /// The frame being received is `len` bytes long (its envelope has arrived): a
    /// [`FrameClock`] below gives it time in proportion.
    fn frame_len(&mut self, len: usize) {
        let _ = len;
    }
}

/// A [`ByteSource`] that reads nothing once its deadline has passed
/// ([`ChannelError::RecvTimeout`]): a receive that must end by then, like a source's
/// wait for an ACK, cannot be stretched by a peer that sends a frame a byte at a time,
/// each byte within the per-read timeout. Below TLS, so records that carry no
/// plaintext cannot stretch it either. Without a deadline it only passes reads on.
///
/// It also keeps the [`FrameClock`]: once a frame has begun, nothing is read past its
/// frame timeout ([`ChannelError::FrameTimeout`]).
pub(crate) struct Until<'s, S> {
    pub(crate) inner: &'s mut S,
    /// The deadline and the wait it ends (reported in the error).
    pub(crate) deadline: Option<(Instant, Duration)>,
    /// When the frame being received must have arrived whole by.
    pub(crate) frame: FrameClock,
}

impl<S: ByteSource> Until<'_, S> {
    fn check(&self) -> Result<(), ChannelError> {
        match self.deadline {
            Some((at, after)) if Instant::now() >= at => Err(ChannelError::RecvTimeout(after)),
            _ => self.frame.check(),
        }
    }

    fn read_some(&mut self, n: usize) -> usize {
        if n > 0 {
            self.frame.begin();
        }
        n
    }
}

impl<S: ByteSource> ByteSource for Until<'_, S> {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        self.check()?;
        let n = self.inner.read(dst)?;
        Ok(self.read_some(n))
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        self.check()?;
        let n = self.inner.read_guest(dst, skip)?;
        Ok(self.read_some(n))
    }

    fn frame_len(&mut self, len: usize) {
        self.frame.len = len;
    }
}

/// The slowest a frame may arrive once begun, beyond its frame timeout: 128 KiB/s
/// (about 1 Mbit/s). A large frame on a slow link gets its frame timeout plus its
/// length at this rate (a 64 MiB frame, the protocol's largest, 60 s + 512 s), so
/// that a link slower than the frame timeout allows for one frame is not taken for a
/// peer trickling bytes, whose frames still end in bounded time.
pub const FRAME_MIN_RATE: u64 = 128 << 10;

/// A channel's frame timeout (`set_frame_timeout`): each frame must arrive whole within
/// it of its first byte, however its bytes trickle in, each within the per-read
/// timeout. Its first byte is the first the socket gives once the previous frame was
/// received (below TLS: a record's first byte); for bytes that came with the previous
/// frame, the moment the next receive starts, so that time the receiver spent on its
/// own work does not count against the peer. Checked before each read, so a receive
/// fails at most one read timeout late.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FrameClock {
    timeout: Option<Duration>,
    /// When the frame being received began, once it has.
    began: Option<Instant>,
    /// Its length, once its envelope arrived (0 before).
    len: usize,
}

impl FrameClock {
    pub(crate) fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Before a receive: `held` when bytes of the next frame are already held (a frame
    /// begun and cut short, or bytes that came with the last one).
    pub(crate) fn resume(&mut self, held: bool) {
        if !held {
            self.began = None;
            self.len = 0;
        } else if self.began.is_none() {
            self.began = Some(Instant::now());
        }
    }

    /// After a receive: a frame that arrived ends the clock; an error leaves it
    /// running for the rest of the frame.
    pub(crate) fn received(&mut self, frame: bool) {
        if frame {
            self.began = None;
            self.len = 0;
        }
    }

    /// The time the frame being received has: the frame timeout, plus its length at
    /// [`FRAME_MIN_RATE`].
    fn budget(&self, timeout: Duration) -> Duration {
        timeout.saturating_add(Duration::from_secs_f64(
            self.len as f64 / FRAME_MIN_RATE as f64,
        ))
    }

    fn begin(&mut self) {
        if self.timeout.is_some() && self.began.is_none() {
            self.began = Some(Instant::now());
        }
    }

    fn check(&self) -> Result<(), ChannelError> {
        match (self.timeout, self.began) {
            (Some(t), Some(b)) if Instant::now() >= crate::deadline::after(b, self.budget(t)) => {
                Err(ChannelError::FrameTimeout {
                    have: 0,
                    need: 0,
                    after: self.budget(t),
                })
            }
            _ => Ok(()),
        }
    }
}

/// A deadline for [`Until`]: `deadline` and the wait from now to it.
pub(crate) fn until(deadline: Option<Instant>) -> Option<(Instant, Duration)> {
    deadline.map(|d| (d, d.saturating_duration_since(Instant::now())))
}

/// Copies `src` into the concatenation of `dst` starting at byte `skip`.
pub(crate) fn copy_to_guest(dst: &[GuestSlice], mut skip: usize, mut src: &[u8]) {
    for d in dst {
        if src.is_empty() {
            break;
        }
        if skip >= d.len() {
            skip -= d.len();
            continue;
        }
        let n = (d.len() - skip).min(src.len());
        // SAFETY: `skip + n <= d.len()`, so the target lies inside the slice's region,
        // which `GuestMemory::new`'s contract keeps mapped and writable and free of
        // other accessors while a channel places pages; `src` is a Rust buffer that
        // does not overlap guest memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.as_ptr().add(skip), n) };
        src = &src[n..];
        skip = 0;
    }
}

/// `iovec`s over the concatenation of `dst` from byte `skip`, at most `max` of them.
pub(crate) fn guest_iovecs(dst: &[GuestSlice], mut skip: usize, max: usize) -> Vec<libc::iovec> {
    let mut iov = Vec::with_capacity(dst.len().min(max));
    for d in dst {
        if iov.len() == max {
            break;
        }
        if skip >= d.len() {
            skip -= d.len();
            continue;
        }
        iov.push(libc::iovec {
            iov_base: d.as_ptr().wrapping_add(skip).cast(),
            iov_len: d.len() - skip,
        });
        skip = 0;
    }
    iov
}

/// The envelope-plus-header length of a PAGES frame whose first 24 bytes are `head`,
/// for a frame without a per-page table; `None` if it cannot be computed.
fn raw_header_len(head: &[u8], flags: u8) -> Option<usize> {
    PageFrame::header_len_from_prefix(flags, head)
}

/// Parses the header of a raw PAGES frame (`header` is the body up to the payload) and
/// checks every rule `PROTOCOL.md` sets for it, the payload length included (the
/// protocol crate's [`PageFrame::decode_header`]). `None` when the frame is not a
/// valid raw frame: the caller then decodes it whole, and the protocol's decoder names
/// the error.
pub(crate) fn raw_header<'a>(
    flags: u8,
    header: &'a [u8],
    payload_len: usize,
    limits: &Limits,
) -> Option<PageFrame<'a>> {
    PageFrame::decode_header(flags, header, payload_len, limits)
        .ok()
        .filter(|f| f.codec == CodecId::RAW)
}

enum Ready {
    Whole {
        at: usize,
        env: Envelope,
    },
    Placed {
        at: usize,
        hlen: usize,
        env: Envelope,
    },
}

/// Receive state of one stream channel.
#[derive(Debug)]
pub(crate) struct RxState {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limits: Limits,
    dest: Vec<GuestSlice>,
    failed: bool,
    /// A payload is being placed: its bytes are partly in destination memory, so no
    /// error (not even a timeout) leaves the stream resumable.
    placing: bool,
    /// The sink declined the frame being received: it is received whole, and the
    /// sink is not asked again.
    declined: bool,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    pub(crate) placed: u64,
}

impl RxState {
    /// Starts with the bytes that followed the handshake.
    pub(crate) fn new(limits: Limits, leftover: &[u8]) -> Self {
        let mut buf = vec![0; INITIAL_BUF.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(leftover);
        Self {
            buf,
            start: 0,
            end: leftover.len(),
            limits,
            dest: Vec::new(),
            failed: false,
            placing: false,
            declined: false,
            frames: 0,
            bytes: 0,
            placed: 0,
        }
    }

    /// Bytes of an unfinished frame held.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn recv<'a>(
        &'a mut self,
        src: &mut impl ByteSource,
        sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Incoming<'a>>, ChannelError> {
        if self.failed {
            return Err(ChannelError::Failed);
        }
        let ready = match self.step(src, sink) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => {
                if self.placing || !matches!(e, ChannelError::RecvTimeout(_)) {
                    self.failed = true;
                }
                return Err(e);
            }
        };
        self.frames += 1;
        match ready {
            Ready::Whole { at, env } => {
                self.bytes += env.frame_len() as u64;
                let body = &self.buf[at + Envelope::LEN..at + env.frame_len()];
                match Frame::decode(env, body, &self.limits) {
                    Ok(f) => Ok(Some(Incoming::Frame(f))),
                    Err(e) => {
                        self.failed = true;
                        Err(ChannelError::Decode(e))
                    }
                }
            }
            Ready::Placed { at, hlen, env } => {
                self.bytes += env.frame_len() as u64;
                let header = &self.buf[at + Envelope::LEN..at + hlen];
                raw_header(env.flags, header, env.frame_len() - hlen, &self.limits)
                    .map(|f| Some(Incoming::Placed(f)))
                    .ok_or(ChannelError::Failed)
            }
        }
    }

    fn step(
        &mut self,
        src: &mut impl ByteSource,
        mut sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Ready>, ChannelError> {
        let bounded = sink.is_some();
        loop {
            let avail = self.end - self.start;
            let mut frame_len = None;
            let want = if avail >= Envelope::LEN {
                let mut head = [0u8; Envelope::LEN];
                head.copy_from_slice(&self.buf[self.start..self.start + Envelope::LEN]);
                let env = Envelope::parse(&head, &self.limits).map_err(ChannelError::Decode)?;
                let flen = env.frame_len();
                frame_len = Some(flen);
                src.frame_len(flen);
                let placeable = sink.is_some()
                    && !self.declined
                    && env.frame_type == FrameType::PAGES
                    && env.flags & FLAG_PER_PAGE == 0;
                let head_len = Envelope::LEN + PAGES_FIXED;
                if !placeable || flen < head_len {
                    flen
                } else if avail < head_len {
                    head_len
                } else {
                    let at = self.start;
                    match raw_header_len(&self.buf[at..at + head_len], env.flags) {
                        Some(h) if h <= flen && avail < h => h,
                        Some(h) if h <= flen => {
                            if let Some(r) = self.try_place(src, &mut sink, env, h)? {
                                return Ok(Some(r));
                            }
                            self.declined = true;
                            flen
                        }
                        _ => flen,
                    }
                }
            } else {
                Envelope::LEN
            };
            if avail >= want {
                // Only the whole-frame case gets here: every header case either placed
                // the frame or asked for more bytes than are buffered.
                let at = self.start;
                let env_bytes: &[u8; Envelope::LEN] = self.buf[at..at + Envelope::LEN]
                    .try_into()
                    .map_err(|_| ChannelError::Failed)?;
                let env = Envelope::parse(env_bytes, &self.limits).map_err(ChannelError::Decode)?;
                self.start += want;
                self.declined = false;
                return Ok(Some(Ready::Whole { at, env }));
            }
            let need = frame_len.unwrap_or(Envelope::LEN);
            if !self
                .fill(src, want, bounded)
                .map_err(|e| e.in_frame(avail, need))?
            {
                if avail == 0 {
                    return Ok(None);
                }
                return Err(ChannelError::PeerClosedMidFrame { have: avail, need });
            }
        }
    }

    /// With the header of a PAGES frame buffered, asks the sink for destination memory
    /// and reads the payload into it. `None` when the frame is to be received whole.
    fn try_place(
        &mut self,
        src: &mut impl ByteSource,
        sink: &mut Option<&mut dyn PageSink>,
        env: Envelope,
        hlen: usize,
    ) -> Result<Option<Ready>, ChannelError> {
        let Some(sink) = sink.as_deref_mut() else {
            return Ok(None);
        };
        let at = self.start;
        let flen = env.frame_len();
        let payload_len = flen - hlen;
        let header = &self.buf[at + Envelope::LEN..at + hlen];
        let Some(frame) = raw_header(env.flags, header, payload_len, &self.limits) else {
            return Ok(None);
        };
        self.dest.clear();
        if !sink.place(&frame, &mut self.dest) {
            self.dest.clear();
            return Ok(None);
        }
        let placed = placed_len(&self.dest);
        if placed != payload_len {
            return Err(ChannelError::BadPlacement {
                placed,
                payload: payload_len,
            });
        }
        // The checksum covers the envelope and header too (PROTOCOL.md, PAGES).
        let crc = frame.crc.map(|c| {
            (
                c,
                pagewire_protocol::pages_crc_seed(&self.buf[at..at + hlen]),
            )
        });
        self.placing = true;
        let buffered = (self.end - at - hlen).min(payload_len);
        copy_to_guest(&self.dest, 0, &self.buf[at + hlen..at + hlen + buffered]);
        let mut done = buffered;
        while done < payload_len {
            let n = src
                .read_guest(&self.dest, done)
                .map_err(|e| e.in_frame(hlen + done, flen))?;
            if n == 0 {
                return Err(ChannelError::PeerClosedMidFrame {
                    have: hlen + done,
                    need: flen,
                });
            }
            done += n;
        }
        if let Some((expected, seed)) = crc {
            let actual = self.dest.iter().fold(seed, |c, d| {
                // SAFETY: the slice lies inside a mapped region (GuestMemory contract)
                // whose bytes were all just written by this channel, and no one else
                // accesses destination pages while a channel places them.
                let bytes = unsafe { std::slice::from_raw_parts(d.as_ptr(), d.len()) };
                crc32c::crc32c_append(c, bytes)
            });
            if actual != expected {
                return Err(ChannelError::Decode(DecodeError::ChecksumMismatch {
                    expected,
                    actual,
                }));
            }
        }
        self.dest.clear();
        self.placing = false;
        self.placed += payload_len as u64;
        self.start = at + hlen + buffered;
        Ok(Some(Ready::Placed { at, hlen, env }))
    }

    /// Reads more bytes so that `want` bytes of the current frame can be buffered.
    /// Returns `false` at end of stream.
    fn fill(
        &mut self,
        src: &mut impl ByteSource,
        want: usize,
        bounded: bool,
    ) -> Result<bool, ChannelError> {
        if self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if want > self.buf.len() {
                // `want` is bounded by the frame limit checked in `Envelope::parse`.
                self.buf.resize(want, 0);
            }
        } else if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let limit = if bounded {
            (self.start + want + SINK_READ_AHEAD).min(self.buf.len())
        } else {
            self.buf.len()
        };
        let n = src.read(&mut self.buf[self.end..limit])?;
        self.end += n;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::GuestMemory;
    use crate::channel::RegionSink;
    use pagewire_protocol::{
        Ack, AckKind, ChecksumId, CodecSet, PageIndex, PageRun, RegionId, Round, WireList,
    };

    /// A byte source over a vector, handing out at most `chunk` bytes per read.
    struct Bytes {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl ByteSource for Bytes {
        fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
            let n = dst.len().min(self.chunk).min(self.data.len() - self.pos);
            dst[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
        fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
            let total = placed_len(dst) - skip;
            let n = total.min(self.chunk).min(self.data.len() - self.pos);
            copy_to_guest(dst, skip, &self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn limits(crc: bool) -> Limits {
        Limits::session(
            4096,
            64,
            1 << 20,
            CodecSet::all_known(),
            crc.then_some(ChecksumId::CRC32C),
        )
        .unwrap()
    }

    fn pages(runs: &[PageRun], fill: u8, crc: bool) -> Vec<u8> {
        let n: u32 = runs.iter().map(|r| r.count).sum();
        let payload: Vec<u8> = (0..n as usize * 4096).map(|i| fill ^ (i as u8)).collect();
        let mut out = Vec::new();
        let frame = PageFrame {
            codec: CodecId::RAW,
            region: RegionId(1),
            round: Round(2),
            data_runs: runs.into(),
            zero_runs: WireList::Slice(&[]),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &payload,
        };
        let frame = if crc {
            frame.with_crc(&[&payload[..]]).unwrap()
        } else {
            frame
        };
        Frame::Pages(frame).encode(&mut out).unwrap();
        out
    }

    fn run(start: u64, count: u32) -> PageRun {
        PageRun {
            start: PageIndex(start),
            count,
        }
    }

    fn ack() -> Vec<u8> {
        let mut out = Vec::new();
        Frame::Ack(Ack {
            kind: AckKind::ROUND,
            value: 9,
        })
        .encode(&mut out)
        .unwrap();
        out
    }

    /// A peer that sends a frame a byte at a time, each within any per-read timeout,
    /// cannot stretch a receive past its deadline; the bytes so far stay buffered and a
    /// receive without a deadline finishes the frame.
    #[test]
    fn a_deadline_cuts_a_trickled_frame_off_and_the_frame_resumes() {
        struct Slow(Bytes);
        impl ByteSource for Slow {
            fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
                std::thread::sleep(Duration::from_millis(20));
                self.0.read(dst)
            }
            fn read_guest(&mut self, d: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
                self.0.read_guest(d, skip)
            }
        }
        let frame = ack();
        let mut src = Slow(Bytes {
            data: frame.clone(),
            pos: 0,
            chunk: 1,
        });
        let mut rx = RxState::new(limits(false), &[]);
        let mut past = Until {
            inner: &mut src,
            deadline: until(Some(Instant::now())),
            frame: FrameClock::default(),
        };
        assert!(matches!(
            rx.recv(&mut past, None),
            Err(ChannelError::RecvTimeout(_))
        ));
        assert_eq!(src.0.pos, 0, "nothing is read past the deadline");
        // 20 ms a byte: the whole frame would take 400 ms.
        let mut soon = Until {
            inner: &mut src,
            deadline: until(Some(Instant::now() + Duration::from_millis(50))),
            frame: FrameClock::default(),
        };
        assert!(matches!(
            rx.recv(&mut soon, None),
            Err(ChannelError::RecvTimeout(_))
        ));
        let read = src.0.pos;
        assert!(read < frame.len(), "{read} of {} bytes", frame.len());
        let mut free = Until {
            inner: &mut src,
            deadline: None,
            frame: FrameClock::default(),
        };
        assert!(matches!(
            rx.recv(&mut free, None),
            Ok(Some(Incoming::Frame(Frame::Ack(a)))) if a.value == 9
        ));
    }

    /// A frame trickled a byte at a time fails once its frame timeout from its first
    /// byte has passed, naming how much of it arrived; the wait before the first byte
    /// does not count, and a frame that arrives in time ends the clock.
    #[test]
    fn a_frame_timeout_counts_from_the_first_byte_and_names_the_progress() {
        struct Slow(Bytes, Duration);
        impl ByteSource for Slow {
            fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
                std::thread::sleep(self.1);
                self.0.read(dst)
            }
            fn read_guest(&mut self, d: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
                self.0.read_guest(d, skip)
            }
        }
        // `data` in reads of `chunk` bytes, each after `ms` ms.
        let slow = |data: Vec<u8>, chunk: usize, ms: u64| {
            Slow(
                Bytes {
                    data,
                    pos: 0,
                    chunk,
                },
                Duration::from_millis(ms),
            )
        };
        let frame = ack();
        let mut two = frame.clone();
        two.extend(ack());
        // 60 ms before the first byte, whole frames at once: within a 40 ms timeout.
        let mut src = slow(two, frame.len() + 3, 60);
        let mut rx = RxState::new(limits(false), &[]);
        let mut clock = FrameClock::default();
        clock.set_timeout(Some(Duration::from_millis(40)));
        for _ in 0..2 {
            clock.resume(rx.buffered() > 0);
            let mut until = Until {
                inner: &mut src,
                deadline: None,
                frame: clock,
            };
            let r = rx.recv(&mut until, None);
            clock = until.frame;
            assert!(matches!(r, Ok(Some(Incoming::Frame(Frame::Ack(_))))));
            clock.received(true);
        }
        // 20 ms a byte against a 50 ms timeout.
        let mut src = slow(frame.clone(), 1, 20);
        let mut rx = RxState::new(limits(false), &[]);
        clock.set_timeout(Some(Duration::from_millis(50)));
        clock.resume(false);
        let mut until = Until {
            inner: &mut src,
            deadline: None,
            frame: clock,
        };
        match rx.recv(&mut until, None) {
            Err(ChannelError::FrameTimeout { have, need, after }) => {
                assert!((2..6).contains(&have), "{have} bytes");
                assert_eq!(need, if have < 8 { 8 } else { frame.len() });
                assert_eq!(after, Duration::from_millis(50));
            }
            other => panic!("expected a frame timeout, got {other:?}"),
        }
        assert!(matches!(
            rx.recv(&mut until, None),
            Err(ChannelError::Failed)
        ));

        // A 32 KiB frame in 4 KiB reads 15 ms apart (about 270 KiB/s, above
        // FRAME_MIN_RATE): past its 50 ms frame timeout, within that plus its length at
        // the minimum rate (250 ms), so a slow link is not taken for a trickle.
        let mut big = Vec::new();
        Frame::Extension {
            frame_type: FrameType(0x90),
            flags: 0,
            body: &[7; 32 << 10],
        }
        .encode(&mut big)
        .unwrap();
        let mut src = slow(big, 4096, 15);
        let mut rx = RxState::new(limits(false), &[]);
        clock.resume(false);
        let mut until = Until {
            inner: &mut src,
            deadline: None,
            frame: clock,
        };
        let t = std::time::Instant::now();
        let r = rx.recv(&mut until, None);
        assert!(
            matches!(r, Ok(Some(Incoming::Frame(Frame::Extension { .. })))),
            "{r:?}"
        );
        assert!(
            t.elapsed() > Duration::from_millis(50),
            "it took longer than the timeout"
        );
    }

    #[test]
    fn placed_and_whole_frames_in_any_split() {
        for crc in [false, true] {
            let runs = [run(1, 2), run(5, 3)];
            let mut data = ack();
            data.extend(pages(&runs, 0x33, crc));
            data.extend(ack());
            let whole = pages(&runs, 0x33, crc);
            for chunk in [1, 7, 100, 4096, 1 << 20] {
                let mem = GuestMemory::anonymous(16 * 4096).unwrap();
                let mut sink = RegionSink::new(4096, vec![(RegionId(1), mem.clone())]);
                let mut rx = RxState::new(limits(crc), &data[..3]);
                let mut src = Bytes {
                    data: data[3..].to_vec(),
                    pos: 0,
                    chunk,
                };
                let mut kinds = Vec::new();
                while let Some(inc) = rx.recv(&mut src, Some(&mut sink)).unwrap() {
                    kinds.push(match inc {
                        Incoming::Frame(Frame::Ack(_)) => 'a',
                        Incoming::Placed(p) => {
                            assert_eq!(p.data_pages(), 5);
                            'p'
                        }
                        other => panic!("unexpected {other:?}"),
                    });
                }
                assert_eq!(kinds, ['a', 'p', 'a'], "chunk {chunk}");
                // The pages landed where the runs say, byte for byte.
                let payload = &whole[whole.len() - 5 * 4096..];
                let mut got = vec![0; 4096];
                for (i, page) in [1u64, 2, 5, 6, 7].into_iter().enumerate() {
                    mem.read(page as usize * 4096, &mut got);
                    assert_eq!(got, payload[i * 4096..(i + 1) * 4096], "page {page}");
                }
                assert_eq!(rx.placed, 5 * 4096);
            }
        }
    }

    #[test]
    fn without_a_sink_frames_arrive_whole() {
        let data = pages(&[run(0, 4)], 1, false);
        let mut rx = RxState::new(limits(false), &[]);
        let mut src = Bytes {
            data: data.clone(),
            pos: 0,
            chunk: 1000,
        };
        match rx.recv(&mut src, None).unwrap() {
            Some(Incoming::Frame(Frame::Pages(p))) => {
                assert_eq!(p.payload, &data[data.len() - 4 * 4096..])
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.recv(&mut src, None).unwrap().is_none());
    }

    #[test]
    fn corrupted_placed_payload_fails_its_checksum() {
        let mut data = pages(&[run(0, 2)], 5, true);
        let last = data.len() - 1;
        data[last] ^= 0xff;
        let mem = GuestMemory::anonymous(4 * 4096).unwrap();
        let mut sink = RegionSink::new(4096, vec![(RegionId(1), mem)]);
        let mut rx = RxState::new(limits(true), &[]);
        let mut src = Bytes {
            data,
            pos: 0,
            chunk: 3000,
        };
        let err = rx.recv(&mut src, Some(&mut sink)).unwrap_err();
        assert!(matches!(
            err,
            ChannelError::Decode(DecodeError::ChecksumMismatch { .. })
        ));
        assert!(matches!(
            rx.recv(&mut src, Some(&mut sink)),
            Err(ChannelError::Failed)
        ));
    }

    #[test]
    fn pages_outside_the_sink_region_fall_back_to_the_buffer() {
        let data = pages(&[run(3, 2)], 5, false);
        let mem = GuestMemory::anonymous(4 * 4096).unwrap();
        let mut sink = RegionSink::new(4096, vec![(RegionId(1), mem)]);
        let mut rx = RxState::new(limits(false), &[]);
        let mut src = Bytes {
            data,
            pos: 0,
            chunk: 5000,
        };
        assert!(matches!(
            rx.recv(&mut src, Some(&mut sink)).unwrap(),
            Some(Incoming::Frame(Frame::Pages(_)))
        ));
    }

    /// Declines every frame and counts the questions.
    struct Declining(usize);

    impl PageSink for Declining {
        fn place(&mut self, _: &PageFrame<'_>, _: &mut Vec<GuestSlice>) -> bool {
            self.0 += 1;
            false
        }
    }

    #[test]
    fn a_declining_sink_is_asked_once_per_frame() {
        let mut data = pages(&[run(0, 4)], 1, false);
        data.extend(pages(&[run(8, 2)], 2, false));
        let mut rx = RxState::new(limits(false), &[]);
        let mut src = Bytes {
            data,
            pos: 0,
            chunk: 1000,
        };
        let mut sink = Declining(0);
        let mut whole = 0;
        while let Some(inc) = rx.recv(&mut src, Some(&mut sink)).unwrap() {
            assert!(matches!(inc, Incoming::Frame(Frame::Pages(_))));
            whole += 1;
        }
        assert_eq!((whole, sink.0), (2, 2));
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let data = pages(&[run(0, 2)], 5, false);
        for cut in [3, 8, 30, data.len() - 1] {
            for sink_on in [false, true] {
                let mem = GuestMemory::anonymous(4 * 4096).unwrap();
                let mut sink = RegionSink::new(4096, vec![(RegionId(1), mem)]);
                let mut rx = RxState::new(limits(false), &[]);
                let mut src = Bytes {
                    data: data[..cut].to_vec(),
                    pos: 0,
                    chunk: 4096,
                };
                let sink: Option<&mut dyn PageSink> = if sink_on { Some(&mut sink) } else { None };
                assert!(
                    matches!(
                        rx.recv(&mut src, sink),
                        Err(ChannelError::PeerClosedMidFrame { .. })
                    ),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn header_parser_agrees_with_the_protocol_decoder() {
        // Every single-byte corruption of a raw header: whenever `raw_header` accepts
        // the frame, the protocol's decoder must accept the same bytes too.
        let frame = pages(&[run(1, 1), run(4, 2)], 9, false);
        let hlen = raw_header_len(&frame[..24], frame[1]).unwrap();
        let lim = limits(false);
        for i in 8..hlen {
            for v in [0u8, 1, 0x80, 0xff] {
                let mut f = frame.clone();
                f[i] = v;
                let payload_len = f.len() - hlen;
                let ours = raw_header(f[1], &f[8..hlen], payload_len, &lim).is_some();
                let env = Envelope::parse(f[..8].try_into().unwrap(), &lim).unwrap();
                let theirs = Frame::decode(env, &f[8..], &lim).is_ok();
                assert!(!ours || theirs, "byte {i} = {v:#x}");
            }
        }
    }
}
