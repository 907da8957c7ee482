//! The TCP channel's send queue: what the socket cannot take yet waits here, so the
//! sender goes on encoding while the link drains what it produced before.
//!
//! On a link slower than the cores, a migration alternates between stretches where the
//! cores limit (the link idles) and stretches where the link limits (the sender sits in
//! a blocked `sendmsg`, its core idles). The socket's own buffer, autotuned up to
//! `tcp_wmem`'s maximum (4 MiB by default, about 30 ms of a 1 Gbit/s link), is much
//! shorter than these stretches (0.2–0.6 s on the two-copy test image, BENCHMARKS.md).
//! With the queue the sender runs ahead while the link limits, and the link drains the
//! queue while the cores do.
//!
//! What a queued frame keeps:
//! - its header and its pool, foreign and byte payloads are copied into the queue, and
//!   the frame completes at once: its buffers go back to their pools, so the queue does
//!   not need the encoder's pool to be any deeper (on a link slow enough to fill the
//!   queue these are compressed bytes, a copy of about 1 % of what was compressed);
//! - guest pages are not copied: the queue points into guest memory, as a zero-copy
//!   send does, and the frame's payload (which keeps the memory mapped) completes only
//!   once its last byte is written.
//!
//! Bytes go out with `sendmsg(MSG_DONTWAIT)` whenever the channel is used. Only while
//! the queue holds more than its budget (and on `flush`) are its first frames sent
//! whole with a blocking `sendmsg`, within the send timeout each, as a channel without
//! a queue sends every frame: waiting for room and writing what fits cost about 10 %
//! of raw pages/s on loopback in more system calls.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use crate::buf::Payload;
use crate::channel::{ChannelError, Completed, OutFrame, SendId};
use crate::endpoint::Stream;
use crate::interrupt::SendWait;

/// Most `iovec`s handed to one `sendmsg` (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Frames the socket has not taken whole, in send order.
#[derive(Debug, Default)]
pub(crate) struct SendQueue {
    frames: VecDeque<Queued>,
    /// Bytes queued and not yet written.
    bytes: usize,
}

/// Where the rest of a frame's bytes are.
#[derive(Debug)]
enum Seg {
    /// In the frame's copy.
    Own(Range<usize>),
    /// In payload part `part` (guest memory), by offset in that part.
    Part { part: usize, range: Range<usize> },
}

#[derive(Debug)]
struct Queued {
    id: SendId,
    own: Vec<u8>,
    segs: VecDeque<Seg>,
    /// The payload, while a segment points into it; empty when it completed at once.
    payload: Vec<Payload>,
}

impl Queued {
    fn seg_bytes(&self, s: &Seg) -> (*const u8, usize) {
        match s {
            Seg::Own(r) => (self.own[r.clone()].as_ptr(), r.len()),
            Seg::Part { part, range } => (
                self.payload[*part].as_ptr().wrapping_add(range.start),
                range.len(),
            ),
        }
    }

    /// Drops the first `n` bytes of the segments.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                return;
            };
            let r = match front {
                Seg::Own(r) | Seg::Part { range: r, .. } => r,
            };
            let take = n.min(r.len());
            r.start += take;
            n -= take;
            if r.start >= r.end {
                self.segs.pop_front();
            }
        }
    }
}

/// The result of one non-blocking `sendmsg`.
enum Sent {
    Bytes(usize),
    Full,
}

fn send_nb(stream: &Stream, iov: &[libc::iovec]) -> Result<Sent, ChannelError> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len().min(IOV_MAX);
    loop {
        // SAFETY: every iovec points into memory its owner keeps alive and readable
        // for the call (a queued frame's copy, a guest slice it holds, or the frame the
        // caller passed); `msg` points at them.
        let n = unsafe {
            libc::sendmsg(
                stream.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(Sent::Bytes(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(Sent::Full),
            _ => return Err(ChannelError::io("sendmsg", e)),
        }
    }
}

impl SendQueue {
    /// Bytes queued and not yet written.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Sends `frame` (id `id`): at once as far as the socket takes it, the rest queued;
    /// then, while the queue holds more than `budget` bytes, waits for the socket.
    /// Frames that complete (written, or copied into the queue) go to `done`.
    ///
    /// # Errors
    /// [`ChannelError::SendTimeout`] when the socket takes nothing for `timeout`, or the
    /// socket's error.
    pub(crate) fn send(
        &mut self,
        stream: &Stream,
        frame: OutFrame,
        id: SendId,
        budget: usize,
        wait: SendWait<'_>,
        done: &mut Vec<Completed>,
    ) -> Result<(), ChannelError> {
        if self.frames.is_empty() {
            let iov = crate::tcp::frame_iovecs(&frame);
            let total = frame.wire_len();
            let written = write_direct(stream, iov, total)?;
            if written == total {
                done.push(Completed {
                    id,
                    payload: frame.payload,
                    zero_copy: (0, 0),
                });
                return Ok(());
            }
            // The socket is full: the rest waits.
            self.enqueue(frame, id, written, done);
            return self.drain_to(stream, budget, wait, done);
        }
        self.enqueue(frame, id, 0, done);
        if self.bytes > budget {
            self.drain_to(stream, budget, wait, done)
        } else {
            self.push(stream, done).map(drop)
        }
    }

    /// Writes what the socket takes now, without waiting.
    ///
    /// # Errors
    /// The socket's error.
    pub(crate) fn push(
        &mut self,
        stream: &Stream,
        done: &mut Vec<Completed>,
    ) -> Result<usize, ChannelError> {
        let mut total = 0;
        let mut iov = Vec::new();
        while let Some(front) = self.frames.front_mut() {
            iov.clear();
            iov.extend(front.segs.iter().take(IOV_MAX).map(|s| {
                let (ptr, len) = front.seg_bytes(s);
                libc::iovec {
                    iov_base: ptr.cast_mut().cast(),
                    iov_len: len,
                }
            }));
            let n = match send_nb(stream, &iov)? {
                Sent::Full => break,
                Sent::Bytes(n) => n,
            };
            front.advance(n);
            self.bytes -= n;
            total += n;
            if front.segs.is_empty()
                && let Some(f) = self.frames.pop_front()
                && !f.payload.is_empty()
            {
                done.push(Completed {
                    id: f.id,
                    payload: f.payload,
                    zero_copy: (0, 0),
                });
            }
        }
        Ok(total)
    }

    /// Waits until the queue holds at most `budget` bytes (0: until it is empty): sends
    /// its first frames whole with blocking `sendmsg` calls (as a channel without a
    /// queue sends every frame), fewer system calls than waiting for room and writing
    /// what fits.
    ///
    /// # Errors
    /// [`ChannelError::SendTimeout`] when a frame does not go out within `timeout`, or
    /// the socket's error.
    pub(crate) fn drain_to(
        &mut self,
        stream: &Stream,
        budget: usize,
        wait: SendWait<'_>,
        done: &mut Vec<Completed>,
    ) -> Result<(), ChannelError> {
        let mut iov = Vec::new();
        while self.bytes > budget {
            let Some(front) = self.frames.front() else {
                break;
            };
            iov.clear();
            iov.extend(front.segs.iter().map(|s| {
                let (ptr, len) = front.seg_bytes(s);
                libc::iovec {
                    iov_base: ptr.cast_mut().cast(),
                    iov_len: len,
                }
            }));
            let n: usize = iov.iter().map(|v| v.iov_len).sum();
            crate::tcp::send_all(stream, &mut iov, wait)?;
            self.bytes -= n;
            if let Some(f) = self.frames.pop_front()
                && !f.payload.is_empty()
            {
                done.push(Completed {
                    id: f.id,
                    payload: f.payload,
                    zero_copy: (0, 0),
                });
            }
        }
        Ok(())
    }

    /// Queues what is left of `frame` after its first `written` bytes.
    fn enqueue(&mut self, frame: OutFrame, id: SendId, written: usize, done: &mut Vec<Completed>) {
        let mut skip = written;
        let mut own = Vec::new();
        let mut segs = VecDeque::new();
        copy_rest(&frame.header, &mut skip, &mut own, &mut segs);
        let mut guest = false;
        for (i, p) in frame.payload.iter().enumerate() {
            match p {
                Payload::Guest(g) => {
                    let from = skip.min(g.len());
                    skip -= from;
                    if from < g.len() {
                        segs.push_back(Seg::Part {
                            part: i,
                            range: from..g.len(),
                        });
                        guest = true;
                    }
                }
                Payload::Pool(b) => copy_rest(b.as_slice(), &mut skip, &mut own, &mut segs),
                Payload::Bytes(b) => copy_rest(b, &mut skip, &mut own, &mut segs),
                Payload::Foreign(b) => copy_rest(b, &mut skip, &mut own, &mut segs),
                Payload::Owned(b) => copy_rest(b.as_slice(), &mut skip, &mut own, &mut segs),
            }
        }
        let payload = if guest {
            frame.payload
        } else {
            done.push(Completed {
                id,
                payload: frame.payload,
                zero_copy: (0, 0),
            });
            Vec::new()
        };
        let queued = Queued {
            id,
            own,
            segs,
            payload,
        };
        self.bytes += queued
            .segs
            .iter()
            .map(|s| match s {
                Seg::Own(r) | Seg::Part { range: r, .. } => r.len(),
            })
            .sum::<usize>();
        if !queued.segs.is_empty() {
            self.frames.push_back(queued);
        }
    }
}

/// Copies what is left of `bytes` after the first `skip` bytes still to skip into
/// `own`, as a segment (merged with the last one when they touch).
fn copy_rest(bytes: &[u8], skip: &mut usize, own: &mut Vec<u8>, segs: &mut VecDeque<Seg>) {
    let from = (*skip).min(bytes.len());
    *skip -= from;
    if from == bytes.len() {
        return;
    }
    let start = own.len();
    own.extend_from_slice(&bytes[from..]);
    match segs.back_mut() {
        Some(Seg::Own(r)) if r.end == start => r.end = own.len(),
        _ => segs.push_back(Seg::Own(start..own.len())),
    }
}

/// Writes `iov` (`total` bytes) as far as the socket takes it now; returns how much.
fn write_direct(
    stream: &Stream,
    mut iov: Vec<libc::iovec>,
    total: usize,
) -> Result<usize, ChannelError> {
    let mut written = 0;
    let mut idx = 0;
    while written < total {
        let n = match send_nb(stream, &iov[idx..])? {
            Sent::Full => break,
            Sent::Bytes(n) => n,
        };
        written += n;
        idx = crate::tcp::advance_iovecs(&mut iov, idx, n);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use std::time::Duration;

    use super::*;
    use crate::Interrupt;
    use crate::buf::GuestMemory;

    const T: Duration = Duration::from_secs(5);

    /// Waits of `timeout`, with no interrupt.
    fn wait(timeout: Duration) -> SendWait<'static> {
        SendWait {
            timeout,
            interrupt: None,
        }
    }

    fn bytes_frame(tag: u8, n: usize) -> OutFrame {
        OutFrame {
            header: vec![tag; 16],
            payload: vec![Payload::Bytes(vec![tag.wrapping_add(100); n])],
        }
    }

    fn wire(f: &OutFrame) -> Vec<u8> {
        let mut v = f.header.clone();
        for p in &f.payload {
            let mut b = vec![0; p.len()];
            match p {
                Payload::Bytes(x) => b.copy_from_slice(x),
                Payload::Guest(g) => g.memory().read(g.offset(), &mut b),
                _ => unreachable!("the tests send bytes and guest pages"),
            }
            v.extend_from_slice(&b);
        }
        v
    }

    fn read_all(mut peer: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            peer.read_to_end(&mut v).unwrap();
            v
        })
    }

    #[test]
    fn what_the_socket_cannot_take_waits_and_goes_out_whole_and_in_order() {
        let (a, peer) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        let mut q = SendQueue::default();
        let mut done = Vec::new();
        let mut expect = Vec::new();
        // 4 MiB in 64 frames: far more than the socket holds, and nobody reads yet.
        for i in 0..64u8 {
            let f = bytes_frame(i, 64 << 10);
            expect.extend(wire(&f));
            q.send(&s, f, SendId(u64::from(i)), 16 << 20, wait(T), &mut done)
                .unwrap();
        }
        // Every frame completed at once (written, or copied into the queue) ...
        let ids: Vec<u64> = done.iter().map(|c| c.id.0).collect();
        assert_eq!(ids, (0..64).collect::<Vec<_>>());
        // ... and most of them wait in the queue.
        assert!(q.bytes() > 2 << 20, "queued {}", q.bytes());
        let reader = read_all(peer);
        q.drain_to(&s, 0, wait(T), &mut done).unwrap();
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
        drop(s);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "bytes out of order or altered");
    }

    #[test]
    fn past_its_budget_send_blocks_and_a_peer_that_never_reads_times_it_out() {
        let (a, _peer) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        // As a channel sets it: the blocking sends past the budget wait this long.
        crate::tcp::set_send_timeout(&s, Duration::from_millis(100)).unwrap();
        let mut q = SendQueue::default();
        let mut done = Vec::new();
        let budget = 256 << 10;
        let frame = 64 << 10;
        let mut sent = 0;
        let err = loop {
            match q.send(
                &s,
                bytes_frame(1, frame),
                SendId(sent),
                budget,
                wait(Duration::from_millis(100)),
                &mut done,
            ) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1000, "the queue never filled");
        };
        assert!(matches!(err, ChannelError::SendTimeout(_)), "{err:?}");
        // The queue never held more than its budget and one frame.
        assert!(q.bytes() <= budget + frame + 16, "queued {}", q.bytes());
        assert!(q.bytes() > budget, "queued {}", q.bytes());
    }

    #[test]
    fn a_raised_interrupt_ends_a_send_that_waits_for_a_peer_that_never_reads() {
        let (a, _peer) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        let interrupt = Interrupt::new();
        // As a channel with an interrupt sets it: one slice at a time.
        let long = Duration::from_secs(3600);
        crate::tcp::set_send_timeout(&s, crate::interrupt::slice(long, Some(&interrupt))).unwrap();
        let raiser = {
            let i = interrupt.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                i.raise();
            })
        };
        let mut q = SendQueue::default();
        let mut done = Vec::new();
        let start = std::time::Instant::now();
        let mut sent = 0;
        let err = loop {
            match q.send(
                &s,
                bytes_frame(1, 64 << 10),
                SendId(sent),
                256 << 10,
                SendWait {
                    timeout: long,
                    interrupt: Some(&interrupt),
                },
                &mut done,
            ) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1000, "the queue never filled");
        };
        raiser.join().unwrap();
        assert!(matches!(err, ChannelError::Interrupted), "{err:?}");
        // Not the hour of the send timeout (a bound for a loaded machine, not a
        // measurement).
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn guest_pages_are_pointed_at_not_copied_and_complete_once_written() {
        let (a, peer) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        let mem = GuestMemory::anonymous(1 << 20).unwrap();
        mem.write(0, &vec![7; 1 << 20]);
        let mut q = SendQueue::default();
        let mut done = Vec::new();
        let mut expect = Vec::new();
        let mut id = 0;
        // Guest frames until one waits in the queue.
        while q.is_empty() {
            let f = OutFrame {
                header: vec![9; 16],
                payload: vec![Payload::Guest(mem.slice(0, 1 << 20).unwrap())],
            };
            expect.push(wire(&f));
            q.send(&s, f, SendId(id), 16 << 20, wait(T), &mut done)
                .unwrap();
            id += 1;
            assert!(id < 64, "the socket never filled");
        }
        // The queued frame has not completed: its payload keeps the memory.
        let last = id - 1;
        assert!(done.iter().all(|c| c.id.0 != last));
        // Not copied: what the queue still has to write is what the memory holds
        // when it is written.
        mem.write(0, &vec![8; 1 << 20]);
        let reader = read_all(peer);
        q.drain_to(&s, 0, wait(T), &mut done).unwrap();
        assert!(done.iter().any(|c| c.id.0 == last));
        drop(s);
        let got = reader.join().unwrap();
        let before: usize = expect[..expect.len() - 1].iter().map(Vec::len).sum();
        assert_eq!(got.len(), before + expect[expect.len() - 1].len());
        assert!(got[..before] == expect.concat()[..before]);
        assert_eq!(
            *got.last().unwrap(),
            8,
            "the queued tail was copied, not pointed at"
        );
    }
}
