//! Large transfers over loopback and Unix sockets (bound and connected by the
//! transport or handed to it), for every backend pairing, checked by content.

mod common;

use std::time::Duration;

use common::*;
use pagewire_protocol::{Frame, RegionId};
use pagewire_transport::session::{AnyChannel, Backend, Established, SessionConfig};
use pagewire_transport::uring::{ZC_AUTO_COPIED, ZeroCopy};
use pagewire_transport::{Channel, Completed, Incoming, RegionSink};

struct Outcome {
    zc: u64,
    copied: u64,
    payload_sends: u64,
    placed: u64,
    /// Bytes the senders registered as fixed buffers.
    registered: u64,
}

/// Sends `pages` pages in frames of `frame_pages`, frame `i` on channel `i % n`, and
/// checks the destination memory equals the source afterwards.
fn transfer(
    src_b: Backend,
    dst_b: Backend,
    channels: u16,
    pages: usize,
    frame_pages: u32,
    zero_copy: ZeroCopy,
) -> Outcome {
    transfer_over(
        Link::Loopback,
        src_b,
        dst_b,
        channels,
        pages,
        frame_pages,
        zero_copy,
    )
}

/// [`transfer`] over `link`.
fn transfer_over(
    link: Link,
    src_b: Backend,
    dst_b: Backend,
    channels: u16,
    pages: usize,
    frame_pages: u32,
    zero_copy: ZeroCopy,
) -> Outcome {
    let mut cfg = config(7, channels);
    cfg.uring.zero_copy = zero_copy;
    let src_mem = patterned(pages, 42);
    let dst_mem = pagewire_transport::GuestMemory::anonymous(pages * PAGE).unwrap();
    cfg.uring.guest = vec![src_mem.clone()];
    cfg.uring.send_timeout = Duration::from_secs(20);
    let (src, dst) = pair_over(link, &cfg);

    let receivers: Vec<_> = dst
        .into_iter()
        .map(|est: Established| {
            let mem = dst_mem.clone();
            let cfg: SessionConfig = cfg.clone();
            std::thread::spawn(move || {
                let mut ch: AnyChannel = est.open(&dst_b, &cfg).unwrap();
                let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), mem)]);
                let mut frames = 0u64;
                while let Some(inc) = ch.recv(Some(&mut sink)).unwrap() {
                    match inc {
                        Incoming::Placed(p) => assert_eq!(p.region, RegionId(0)),
                        Incoming::Frame(f) => panic!("expected placed pages, got {f:?}"),
                    }
                    frames += 1;
                }
                (frames, ch.stats())
            })
        })
        .collect();
    let frames_total = pages.div_ceil(frame_pages as usize);
    let senders: Vec<_> = src
        .into_iter()
        .enumerate()
        .map(|(i, est)| {
            let mem = src_mem.clone();
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut ch = est.open(&src_b, &cfg).unwrap();
                let mut done: Vec<Completed> = Vec::new();
                let mut sent = 0u64;
                for f in (i..frames_total).step_by(usize::from(channels)) {
                    let start = f * frame_pages as usize;
                    let count = (pages - start).min(frame_pages as usize) as u32;
                    ch.send(raw_frame(&mem, start as u64, count)).unwrap();
                    sent += 1;
                    ch.poll_completions(&mut done).unwrap();
                }
                ch.close(&mut done).unwrap();
                assert_eq!(done.len() as u64, sent, "every send completes");
                let zc_per_frame: u32 = done.iter().map(|c| c.zero_copy.0 + c.zero_copy.1).sum();
                (sent, ch.stats(), zc_per_frame)
            })
        })
        .collect();
    let mut out = Outcome {
        zc: 0,
        copied: 0,
        payload_sends: 0,
        placed: 0,
        registered: 0,
    };
    let mut sent_frames = 0;
    for s in senders {
        let (sent, stats, _) = s.join().unwrap();
        sent_frames += sent;
        out.zc += stats.zc_sends;
        out.copied += stats.zc_copied;
        out.payload_sends += sent;
        out.registered += stats.registered_bytes;
    }
    let mut recv_frames = 0;
    for r in receivers {
        let (frames, stats) = r.join().unwrap();
        recv_frames += frames;
        out.placed += stats.bytes_placed;
    }
    assert_eq!(sent_frames, frames_total as u64);
    assert_eq!(recv_frames, sent_frames);
    assert_eq!(
        first_difference(&src_mem, &dst_mem),
        None,
        "content differs"
    );
    out
}

#[test]
fn tcp_to_tcp_32_mib_over_3_channels() {
    let o = transfer(Backend::Tcp, Backend::Tcp, 3, 8192, 128, ZeroCopy::Auto);
    assert_eq!(o.placed, 8192 * PAGE as u64);
    assert_eq!(o.zc + o.copied, 0);
}

#[test]
fn uring_to_uring_32_mib_over_2_channels() {
    if !uring_available() {
        return;
    }
    let o = transfer(URING, URING, 2, 8192, 256, ZeroCopy::Always);
    assert_eq!(o.placed, 8192 * PAGE as u64);
    // Every payload send got its notification, counted as in place or copied.
    assert_eq!(o.zc + o.copied, o.payload_sends);
    // `Always`: each channel registered the guest memory when it opened.
    assert_eq!(o.registered, 2 * 8192 * PAGE as u64);
}

/// Pages of `mem` the kernel has in memory.
fn resident_pages(mem: &pagewire_transport::GuestMemory) -> usize {
    let mut vec = vec![0u8; mem.len().div_ceil(PAGE)];
    // SAFETY: `mem` is a page-aligned mapping of `mem.len()` bytes, and `vec` has a
    // byte for each of its pages.
    let rc = unsafe { libc::mincore(mem.as_ptr().cast(), mem.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

#[test]
fn an_auto_uring_channel_over_loopback_pins_no_guest_memory() {
    if !uring_available() {
        return;
    }
    // 64 MiB of guest memory never touched but for the 64 pages sent: registering it
    // as fixed buffers would pin, and so fault in, all of it.
    let total = 64 << 20;
    for zero_copy in [ZeroCopy::Auto, ZeroCopy::Always] {
        let mem = pagewire_transport::GuestMemory::anonymous(total).unwrap();
        mem.write(0, &vec![0x5a; 64 * PAGE]);
        let mut cfg = config(11, 1);
        cfg.uring.guest = vec![mem.clone()];
        cfg.uring.zero_copy = zero_copy;
        let (mut src, mut dst) = pair(&cfg);
        let reader = count_frames(dst.remove(0), &cfg);
        let mut ch = src.remove(0).open(&URING, &cfg).unwrap();
        for _ in 0..2 * ZC_AUTO_COPIED {
            ch.send(raw_frame(&mem, 0, 64)).unwrap();
            ch.flush(&mut Vec::new()).unwrap();
        }
        let stats = ch.stats();
        ch.close(&mut Vec::new()).unwrap();
        assert_eq!(reader.join().unwrap(), 2 * ZC_AUTO_COPIED);
        let resident = resident_pages(&mem);
        if zero_copy == ZeroCopy::Auto {
            // Loopback copies every zero-copy send: nothing was registered.
            assert_eq!(stats.registered_bytes, 0, "{stats:?}");
            assert!(resident < total / PAGE / 4, "{resident} pages resident");
        } else {
            // Asked for: registered at open, every page pinned (the check above sees
            // it).
            assert_eq!(stats.registered_bytes, total as u64, "{stats:?}");
            assert_eq!(resident, total / PAGE);
        }
    }
}

#[test]
fn auto_zero_copy_pauses_after_copied_notifications() {
    if !uring_available() {
        return;
    }
    let cfg = config(9, 1);
    let (mut src, mut dst) = pair(&cfg);
    let mem = patterned(64, 2);
    let reader = count_frames(dst.remove(0), &cfg);
    let mut ch = src.remove(0).open(&URING, &cfg).unwrap();
    let mut usage = Vec::new();
    for _ in 0..ZC_AUTO_COPIED + 4 {
        let mut done = Vec::new();
        ch.send(raw_frame(&mem, 0, 64)).unwrap();
        ch.flush(&mut done).unwrap();
        usage.push(done[0].zero_copy);
    }
    ch.close(&mut Vec::new()).unwrap();
    assert_eq!(reader.join().unwrap(), ZC_AUTO_COPIED + 4);
    // Loopback copies every zero-copy send; after ZC_AUTO_COPIED of them the
    // channel sends plainly (no notification).
    let n = ZC_AUTO_COPIED as usize;
    assert!(usage[..n].iter().all(|&u| u == (0, 1)), "{usage:?}");
    assert!(usage[n..].iter().all(|&u| u == (0, 0)), "{usage:?}");
}

#[test]
fn uring_sender_to_tcp_receiver_and_back() {
    if !uring_available() {
        return;
    }
    // Over loopback every zero-copy send is copied: `Auto` registers nothing.
    let o = transfer(URING, Backend::Tcp, 2, 2048, 100, ZeroCopy::Auto);
    assert_eq!(o.registered, 0);
    transfer(Backend::Tcp, URING, 2, 2048, 100, ZeroCopy::Auto);
}

#[test]
fn control_frames_arrive_whole_between_pages() {
    for backend in backends() {
        let cfg = config(8, 1);
        let (mut src, mut dst) = pair(&cfg);
        let (s, d) = (src.remove(0), dst.remove(0));
        let mem = patterned(64, 1);
        let m2 = mem.clone();
        let c2 = cfg.clone();
        let t = std::thread::spawn(move || {
            let mut ch = s.open(&backend, &c2).unwrap();
            for i in 0..20u64 {
                ch.send(raw_frame(&m2, 0, 64)).unwrap();
                let ack = Frame::Ack(pagewire_protocol::Ack {
                    kind: pagewire_protocol::AckKind::FRAMES,
                    value: i,
                });
                ch.send(pagewire_transport::OutFrame::whole(&ack).unwrap())
                    .unwrap();
            }
            ch.close(&mut Vec::new()).unwrap();
        });
        let mut ch = d.open(&backend, &cfg).unwrap();
        let mut acks = Vec::new();
        let mut pages = 0;
        // Without a sink, pages arrive whole, with their payload.
        while let Some(inc) = ch.recv(None).unwrap() {
            match inc {
                Incoming::Frame(Frame::Ack(a)) => acks.push(a.value),
                Incoming::Frame(Frame::Pages(p)) => {
                    let mut want = vec![0u8; p.payload.len()];
                    mem.read(0, &mut want);
                    assert!(p.payload == want.as_slice());
                    pages += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        t.join().unwrap();
        assert_eq!(acks, (0..20).collect::<Vec<_>>());
        assert_eq!(pages, 20);
    }
}

#[test]
fn tcp_backend_over_a_unix_socket_16_mib() {
    let o = transfer_over(
        Link::Unix,
        Backend::Tcp,
        Backend::Tcp,
        2,
        4096,
        128,
        ZeroCopy::Auto,
    );
    assert_eq!(o.placed, 4096 * PAGE as u64);
    assert_eq!(o.zc + o.copied, 0);
}

#[test]
fn uring_backend_over_a_unix_socket_sends_by_copy_and_counts_it() {
    if !uring_available() {
        return;
    }
    let o = transfer_over(Link::Unix, URING, URING, 2, 4096, 128, ZeroCopy::Always);
    assert_eq!(o.placed, 4096 * PAGE as u64);
    // A Unix socket cannot send in place: every payload send the policy wanted
    // zero-copy went by copy and is counted as copied.
    assert_eq!(o.zc, 0);
    assert_eq!(o.copied, o.payload_sends);
}

#[test]
fn mixed_backends_over_a_unix_socket() {
    if !uring_available() {
        return;
    }
    transfer_over(
        Link::Unix,
        URING,
        Backend::Tcp,
        2,
        1024,
        100,
        ZeroCopy::Auto,
    );
    transfer_over(
        Link::Unix,
        Backend::Tcp,
        URING,
        2,
        1024,
        100,
        ZeroCopy::Auto,
    );
}

#[test]
fn given_listeners_and_pre_connected_streams_tcp_and_unix() {
    for link in [Link::TcpGiven, Link::UnixGiven] {
        for b in backends() {
            let o = transfer_over(link, b, b, 3, 1024, 64, ZeroCopy::Auto);
            assert_eq!(o.placed, 1024 * PAGE as u64, "{link:?} {b:?}");
        }
    }
}

#[test]
fn auto_zero_copy_over_a_unix_socket_pauses_like_loopback() {
    if !uring_available() {
        return;
    }
    let cfg = config(10, 1);
    let (mut src, mut dst) = pair_over(Link::Unix, &cfg);
    let mem = patterned(64, 3);
    let reader = count_frames(dst.remove(0), &cfg);
    let mut ch = src.remove(0).open(&URING, &cfg).unwrap();
    assert!(matches!(ch, AnyChannel::Uring(_)));
    let mut usage = Vec::new();
    for _ in 0..ZC_AUTO_COPIED + 4 {
        let mut done = Vec::new();
        ch.send(raw_frame(&mem, 0, 64)).unwrap();
        ch.flush(&mut done).unwrap();
        usage.push(done[0].zero_copy);
    }
    ch.close(&mut Vec::new()).unwrap();
    assert_eq!(reader.join().unwrap(), ZC_AUTO_COPIED + 4);
    let n = ZC_AUTO_COPIED as usize;
    assert!(usage[..n].iter().all(|&u| u == (0, 1)), "{usage:?}");
    assert!(usage[n..].iter().all(|&u| u == (0, 0)), "{usage:?}");
    assert_eq!(ch.stats().zc_copied, ZC_AUTO_COPIED as u64);
}

/// Receives on `d` over plain sockets until the peer closes; the frames counted.
fn count_frames(d: Established, cfg: &SessionConfig) -> std::thread::JoinHandle<u32> {
    let cfg = cfg.clone();
    std::thread::spawn(move || {
        let mut ch = d.open(&Backend::Tcp, &cfg).unwrap();
        let mut n = 0;
        while ch.recv(None).unwrap().is_some() {
            n += 1;
        }
        n
    })
}

/// A payload buffer of the test's own, with a number to recognise it by.
struct Numbered(Box<[u8]>, u32);

impl AsRef<[u8]> for Numbered {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

// SAFETY: the bytes are on the heap (they do not move with the value) and are written
// only before the buffer is wrapped.
unsafe impl pagewire_transport::StableBytes for Numbered {}

/// Frames whose payload is an `Owned` buffer arrive intact and every buffer comes back
/// in its send's completion as its own type, over TCP and io_uring (with zero-copy
/// sends, whose buffers the kernel holds until it notifies, and without). The sockets'
/// buffers are small and the reader slow, so TCP's sends queue in the channel and
/// io_uring's wait on the socket. Each buffer is overwritten as soon as it comes back:
/// one handed back before its bytes were sent would arrive changed.
#[test]
fn owned_payloads_arrive_and_come_back_as_themselves() {
    use pagewire_transport::{Owned, Payload};
    let mut runs = vec![(Backend::Tcp, ZeroCopy::Auto)];
    if uring_available() {
        runs.push((URING, ZeroCopy::Always));
        runs.push((URING, ZeroCopy::Never));
    }
    for (backend, zero_copy) in runs {
        let mut cfg = config(9, 1);
        cfg.uring.zero_copy = zero_copy;
        cfg.tcp.send_buffer = Some(32 << 10);
        cfg.tcp.recv_buffer = Some(32 << 10);
        cfg.tcp.send_queue = 4 << 20;
        let (mut src, mut dst) = pair(&cfg);
        let (s, d) = (src.remove(0), dst.remove(0));
        const FRAMES: u32 = 300;
        const PAGES: u32 = 4;
        let fill = |i: u32| (i % 251) as u8;
        let c2 = cfg.clone();
        let sender = std::thread::spawn(move || {
            let mut ch = s.open(&backend, &c2).unwrap();
            let mut done: Vec<Completed> = Vec::new();
            let mut back = Vec::new();
            let mut take_back = |done: &mut Vec<Completed>| {
                for mut c in done.drain(..) {
                    for p in &mut c.payload {
                        let Payload::Owned(o) = p else {
                            panic!("a payload came back as another kind: {p:?}")
                        };
                        let mut n = o.take::<Numbered>().expect("the buffer's own type");
                        // A byte `fill` never writes.
                        n.0.fill(0xFF);
                        back.push(n.1);
                    }
                }
            };
            for i in 0..FRAMES {
                let buf = Numbered(vec![fill(i); PAGES as usize * PAGE].into(), i);
                let payload = vec![Payload::Owned(Owned::new(buf))];
                ch.send(raw_pages(u64::from(i * PAGES), PAGES, payload))
                    .unwrap();
                ch.poll_completions(&mut done).unwrap();
                take_back(&mut done);
            }
            // Past one frame (payload and header): more than one frame's bytes waited
            // in the channel at once.
            let queued = ch.stats().peak_in_flight_bytes;
            ch.close(&mut done).unwrap();
            take_back(&mut done);
            back.sort_unstable();
            (back, queued)
        });
        let mut ch = d.open(&backend, &cfg).unwrap();
        let mut got = 0;
        while let Some(inc) = ch.recv(None).unwrap() {
            let Incoming::Frame(Frame::Pages(p)) = inc else {
                panic!("{inc:?}")
            };
            let i = u32::try_from(p.data_runs.iter().next().unwrap().start.0).unwrap() / PAGES;
            assert_eq!(i, got, "{backend:?}");
            assert!(p.payload.len() == PAGES as usize * PAGE);
            assert!(
                p.payload.iter().all(|&b| b == fill(i)),
                "{backend:?} {zero_copy:?}: frame {i} changed before it was sent"
            );
            got += 1;
            if got % 25 == 0 {
                // A slow reader: sends wait behind a full socket.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let (back, queued) = sender.join().unwrap();
        assert_eq!(got, FRAMES, "{backend:?} {zero_copy:?}");
        assert_eq!(
            back,
            (0..FRAMES).collect::<Vec<_>>(),
            "{backend:?} {zero_copy:?}"
        );
        if backend == Backend::Tcp {
            assert!(
                queued > 2 * u64::from(PAGES) * PAGE as u64,
                "no frame queued in the TCP channel (at most {queued} bytes held)"
            );
        }
    }
}
