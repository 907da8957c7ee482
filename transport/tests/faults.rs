//! Faults: a peer that closes mid-frame, stops reading, sends garbage; io_uring buffer
//! lifetime; falling back to TCP when io_uring is blocked.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use pagewire_protocol::RegionId;
use pagewire_transport::session::{AnyChannel, Backend, SessionConfig, SessionError};
use pagewire_transport::uring::{UringError, ZeroCopy};
use pagewire_transport::{
    BufferPool, Channel, ChannelError, Completed, Incoming, OutFrame, Payload, RegionSink,
};

/// [`config`] with 64 KiB socket buffers both ways: a peer that does not read fills
/// them at once.
fn small_buffers(session: u8, channels: u16) -> SessionConfig {
    let mut cfg = config(session, channels);
    cfg.tcp.send_buffer = Some(64 << 10);
    cfg.tcp.recv_buffer = Some(64 << 10);
    cfg
}

fn encoded(frame: OutFrame, mem: &pagewire_transport::GuestMemory) -> Vec<u8> {
    // The bytes a frame of `mem`'s first pages puts on the wire: its header, then its
    // payload (the same memory the frame was built from).
    let mut out = frame.header().to_vec();
    let mut page = vec![0u8; (frame.wire_len() - out.len()).min(mem.len())];
    mem.read(0, &mut page);
    out.extend_from_slice(&page);
    out
}

#[test]
fn peer_closing_mid_frame_is_reported() {
    for backend in backends() {
        for with_sink in [false, true] {
            let cfg = config(20, 1);
            let (mut src, mut dst) = pair(&cfg);
            let mem = patterned(64, 3);
            let bytes = encoded(raw_frame(&mem, 0, 64), &mem);
            let mut s = src.remove(0).stream;
            // Half a frame, then close.
            s.write_all(&bytes[..bytes.len() / 2]).unwrap();
            drop(s);
            let mut ch = dst.remove(0).open(&backend, &cfg).unwrap();
            let dst_mem = pagewire_transport::GuestMemory::anonymous(64 * PAGE).unwrap();
            let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), dst_mem)]);
            let r = if with_sink {
                ch.recv(Some(&mut sink)).map(|_| ())
            } else {
                ch.recv(None).map(|_| ())
            };
            match r {
                Err(ChannelError::PeerClosedMidFrame { have, need }) => {
                    assert_eq!(need, bytes.len());
                    assert!(have < need);
                }
                other => panic!("{backend:?}: expected PeerClosedMidFrame, got {other:?}"),
            }
        }
    }
}

#[test]
fn a_peer_that_stops_reading_makes_the_sender_time_out_with_bounded_memory() {
    for backend in backends() {
        let mut cfg = small_buffers(21, 1);
        cfg.tcp.send_timeout = Duration::from_millis(300);
        cfg.uring.send_timeout = Duration::from_millis(300);
        cfg.uring.max_in_flight_bytes = 4 << 20;
        cfg.tcp.send_queue = 4 << 20;
        let (mut src, dst) = pair(&cfg);
        let mem = patterned(128, 5);
        let mut ch = src.remove(0).open(&backend, &cfg).unwrap();
        let mut done: Vec<Completed> = Vec::new();
        let mut result = Ok(());
        let mut frames = 0;
        // The destination holds its sockets open and reads nothing.
        for _ in 0..1000 {
            match ch.send(raw_frame(&mem, 0, 128)) {
                Ok(_) => frames += 1,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            ch.poll_completions(&mut done).unwrap();
        }
        let stats = ch.stats();
        match result {
            Err(ChannelError::SendTimeout(t)) => assert_eq!(t, Duration::from_millis(300)),
            other => panic!("{backend:?}: expected SendTimeout, got {other:?} after {frames}"),
        }
        assert!(frames < 1000);
        // The sends went past what the socket holds before they blocked.
        assert!(
            frames as u64 * 128 * PAGE as u64 >= 4 << 20,
            "{backend:?}: {frames}"
        );
        let frame = 128 * PAGE as u64;
        // Each backend holds at most its budget and the frame that went past it.
        let bound = (4 << 20) + frame;
        assert!(
            stats.peak_in_flight_bytes <= bound,
            "{backend:?}: {} bytes in flight",
            stats.peak_in_flight_bytes
        );
        // The channel is failed now; later sends say so.
        assert!(matches!(
            ch.send(raw_frame(&mem, 0, 1)),
            Err(ChannelError::Failed)
        ));
        drop(ch);
        drop(dst);
    }
}

#[test]
fn garbage_on_one_channel_leaves_the_others_intact() {
    for backend in backends() {
        let cfg = config(22, 2);
        let (mut src, dst) = pair(&cfg);
        let mem = patterned(256, 9);
        let dst_mem = pagewire_transport::GuestMemory::anonymous(256 * PAGE).unwrap();
        // The garbage channel places into memory of its own: two channels never write
        // the same pages (the affinity a destination enforces), which ThreadSanitizer
        // would report as the data race it is.
        let bad_mem = pagewire_transport::GuestMemory::anonymous(256 * PAGE).unwrap();
        let receivers: Vec<_> = dst
            .into_iter()
            .zip([dst_mem.clone(), bad_mem])
            .map(|(est, m)| {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let mut ch: AnyChannel = est.open(&backend, &cfg).unwrap();
                    let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), m)]);
                    let mut frames = 0;
                    loop {
                        match ch.recv(Some(&mut sink)) {
                            Ok(Some(Incoming::Placed(_))) => frames += 1,
                            Ok(Some(other)) => panic!("{other:?}"),
                            Ok(None) => return Ok(frames),
                            Err(e) => return Err(e),
                        }
                    }
                })
            })
            .collect();
        // Channel 1: a valid frame, then garbage.
        let mut bad = src.pop().unwrap().stream;
        bad.write_all(&encoded(raw_frame(&mem, 0, 8), &mem))
            .unwrap();
        bad.write_all(&[0x42; 64]).unwrap();
        // Channel 0: the whole memory.
        let c2 = cfg.clone();
        let good = src.pop().unwrap();
        let m2 = mem.clone();
        let sender = std::thread::spawn(move || {
            let mut ch = good.open(&backend, &c2).unwrap();
            for start in (0..256).step_by(32) {
                ch.send(raw_frame(&m2, start, 32)).unwrap();
            }
            ch.close(&mut Vec::new()).unwrap();
        });
        sender.join().unwrap();
        let mut r = receivers.into_iter();
        let good_frames = r.next().unwrap().join().unwrap().unwrap();
        let bad_result = r.next().unwrap().join().unwrap();
        drop(bad);
        assert_eq!(good_frames, 8);
        assert!(
            matches!(bad_result, Err(ChannelError::Decode(_))),
            "{bad_result:?}"
        );
        assert_eq!(first_difference(&mem, &dst_mem), None);
    }
}

#[test]
fn uring_zero_copy_buffer_is_not_released_before_its_notification() {
    if !uring_available() {
        return;
    }
    // Small socket buffers, so a 2 MiB send cannot finish while nobody reads.
    let mut cfg = small_buffers(23, 1);
    let pool = BufferPool::new(1, 2 << 20).unwrap();
    cfg.uring.pools = vec![pool.clone()];
    cfg.uring.zero_copy = ZeroCopy::Always;
    let (mut src, mut dst) = pair(&cfg);
    let mut ch = src.remove(0).open(&URING, &cfg).unwrap();

    let mut buf = pool.take().unwrap();
    let content = patterned(512, 77);
    content.read(0, buf.spare_mut());
    buf.set_len(2 << 20);
    let id = ch
        .send(raw_pages(0, 512, vec![Payload::Pool(buf)]))
        .unwrap();
    let mut done = Vec::new();
    for _ in 0..10 {
        ch.poll_completions(&mut done).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(done.is_empty(), "completed while the kernel still holds it");
    assert_eq!(pool.available(), 0, "the buffer is still the channel's");

    let est = dst.remove(0);
    let c2 = cfg.clone();
    let reader = std::thread::spawn(move || {
        let mut rx = est.open(&Backend::Tcp, &c2).unwrap();
        let got = match rx.recv(None).unwrap() {
            Some(Incoming::Frame(pagewire_protocol::Frame::Pages(p))) => p.payload.to_vec(),
            other => panic!("{other:?}"),
        };
        assert!(rx.recv(None).unwrap().is_none());
        got
    });
    ch.close(&mut done).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(done.len(), 1);
    let c = done.pop().unwrap();
    assert_eq!(c.id, id);
    // The notification arrived (one per zero-copy send) before the buffer came back.
    assert_eq!(c.zero_copy.0 + c.zero_copy.1, 1);
    assert_eq!(pool.available(), 0);
    let Payload::Pool(back) = c.payload.into_iter().next().unwrap() else {
        panic!("the pool buffer comes back");
    };
    assert!(back.as_slice() == got.as_slice());
    drop(back);
    assert_eq!(pool.available(), 1);
    assert_eq!(ch.stats().zc_sends + ch.stats().zc_copied, 1);
}

/// Makes `io_uring_setup` fail with EPERM in the calling thread only, as a container's
/// seccomp profile does.
#[cfg(target_arch = "x86_64")]
fn block_io_uring_in_this_thread() {
    let filter = [
        // Load the system call number.
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and affects this thread.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    // SAFETY: `prog` points at a valid filter for the duration of the call; without
    // SECCOMP_FILTER_FLAG_TSYNC it applies to the calling thread (and its children) only.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn blocked_io_uring_is_named_and_falls_back_to_tcp_when_asked() {
    let cfg = config(24, 2);
    let (src, dst) = pair(&cfg);
    let c2 = cfg.clone();
    std::thread::spawn(move || {
        block_io_uring_in_this_thread();
        let mut src = src.into_iter();
        let refused = src.next().unwrap().open(&URING, &c2).unwrap_err();
        assert!(
            matches!(refused, SessionError::Uring(UringError::Blocked(_))),
            "{refused}"
        );
        assert!(refused.to_string().contains("tcp transport"));
        let mut ch = src
            .next()
            .unwrap()
            .open(
                &Backend::Uring {
                    fallback_to_tcp: true,
                },
                &c2,
            )
            .unwrap();
        assert!(matches!(
            ch,
            AnyChannel::Fallback(_, UringError::Blocked(_))
        ));
        let mem = patterned(64, 11);
        ch.send(raw_frame(&mem, 0, 64)).unwrap();
        ch.close(&mut Vec::new()).unwrap();
    })
    .join()
    .unwrap();
    let mut dst = dst.into_iter();
    let _first = dst.next();
    let rx_backend = if uring_available() {
        URING
    } else {
        Backend::Tcp
    };
    let mut rx = dst.next().unwrap().open(&rx_backend, &cfg).unwrap();
    assert!(matches!(
        rx.recv(None).unwrap(),
        Some(Incoming::Frame(pagewire_protocol::Frame::Pages(_)))
    ));
}

#[test]
fn a_receive_timeout_between_frames_leaves_the_channel_usable() {
    for backend in backends() {
        let mut cfg = config(25, 1);
        cfg.tcp.recv_timeout = Some(Duration::from_millis(200));
        cfg.uring.recv_timeout = Some(Duration::from_millis(200));
        let (mut src, mut dst) = pair(&cfg);
        let mut rx = dst.remove(0).open(&backend, &cfg).unwrap();
        match rx.recv(None) {
            Err(ChannelError::RecvTimeout(t)) => assert_eq!(t, Duration::from_millis(200)),
            other => panic!("{backend:?}: expected RecvTimeout, got {other:?}"),
        }
        let mut tx = src.remove(0).open(&backend, &cfg).unwrap();
        let mem = patterned(8, 4);
        tx.send(raw_frame(&mem, 0, 8)).unwrap();
        tx.close(&mut Vec::new()).unwrap();
        assert!(matches!(
            rx.recv(None).unwrap(),
            Some(Incoming::Frame(pagewire_protocol::Frame::Pages(_)))
        ));
        assert!(rx.recv(None).unwrap().is_none());
    }
}

#[test]
fn a_tcp_channel_queues_behind_a_slow_peer_and_sends_its_queue_before_awaiting_a_reply() {
    use pagewire_protocol::{Ack, AckKind, Frame};
    let mut cfg = small_buffers(23, 1);
    cfg.tcp.recv_timeout = Some(Duration::from_secs(20));
    let (mut src, mut dst) = pair(&cfg);
    let mem = patterned(128, 11);
    let mut ch = src.remove(0).open(&Backend::Tcp, &cfg).unwrap();
    // 16 frames of the 128 pages, 8 MiB, while the peer reads nothing: every send
    // returns (the queue's budget is 16 MiB), and the channel holds what the socket
    // could not take.
    for _ in 0..16 {
        ch.send(raw_frame(&mem, 0, 128)).unwrap();
    }
    let held = ch.unacked_bytes().expect("TCP tells what it holds");
    assert!(held > 4 << 20, "held {held}");
    // The peer takes all 16, then replies.
    let dst_mem = pagewire_transport::GuestMemory::anonymous(128 * PAGE).unwrap();
    let m = dst_mem.clone();
    let c = cfg.clone();
    let peer = std::thread::spawn(move || {
        let mut ch: AnyChannel = dst.remove(0).open(&Backend::Tcp, &c).unwrap();
        let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), m)]);
        for _ in 0..16 {
            match ch.recv(Some(&mut sink)).unwrap() {
                Some(Incoming::Placed(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        let ack = Frame::Ack(Ack {
            kind: AckKind::FRAMES,
            value: 16,
        });
        ch.send(OutFrame::whole(&ack).unwrap()).unwrap();
        ch.flush(&mut Vec::new()).unwrap();
        // Until the source closes.
        assert!(ch.recv(Some(&mut sink)).unwrap().is_none());
    });
    // Waiting for the reply sends what is queued first: without that, the peer would
    // never see its 16 frames, and this receive would time out.
    match ch.recv(None).unwrap() {
        Some(Incoming::Frame(Frame::Ack(a))) => {
            assert_eq!((a.kind, a.value), (AckKind::FRAMES, 16))
        }
        other => panic!("{other:?}"),
    }
    // The peer read every byte before it replied, and the reply acknowledged them.
    assert_eq!(ch.unacked_bytes(), Some(0));
    let mut done = Vec::new();
    ch.close(&mut done).unwrap();
    peer.join().unwrap();
    assert_eq!(first_difference(&mem, &dst_mem), None);
}

#[test]
fn a_uring_channel_behind_a_backlog_copies_buffer_frames_and_hands_their_buffers_back() {
    if !uring_available() {
        return;
    }
    let mut cfg = small_buffers(24, 1);
    cfg.uring.zero_copy = ZeroCopy::Never;
    cfg.uring.copy_backlog = 8 << 20;
    // 6 buffers of 512 KiB: without the copies, the seventh frame would find none.
    let pool = BufferPool::new(6, 512 << 10).unwrap();
    let (mut src, mut dst) = pair(&cfg);
    let mut ch = src.remove(0).open(&URING, &cfg).unwrap();
    let mut sent = Vec::new();
    let mut done = Vec::new();
    // 18 frames, 9 MiB, while the peer reads nothing.
    for i in 0..18u8 {
        let mut buf = pool
            .take()
            .unwrap_or_else(|| panic!("no buffer back for frame {i}"));
        buf.spare_mut().fill(i);
        buf.set_len(512 << 10);
        ch.send(raw_pages(0, 128, vec![Payload::Pool(buf)]))
            .unwrap();
        sent.push(i);
        ch.poll_completions(&mut done).unwrap();
        done.clear();
    }
    // What it holds: the frames before the backlog, the copies, at most its budget.
    let held = match &ch {
        AnyChannel::Uring(u) => u.in_flight_bytes(),
        other => panic!("{other:?}"),
    };
    assert!(held >= 8 << 20, "held {held}");
    assert!(held <= (2 << 20) + (512 << 10) + (8 << 20), "held {held}");
    // Unacknowledged: the socket's queue and what the ring still holds for it, all of
    // the 9 MiB but what the peer's small receive buffer took; the bytes of a send
    // under way count in both, so up to one frame more.
    let unacked = ch.unacked_bytes().expect("a TCP socket tells its queue");
    assert!(unacked >= (9 << 20) - (512 << 10), "unacked {unacked}");
    assert!(
        unacked <= (9 << 20) + (512 << 10) + 18 * 4096,
        "unacked {unacked}"
    );
    let est = dst.remove(0);
    let c2 = cfg.clone();
    let reader = std::thread::spawn(move || {
        let mut rx = est.open(&Backend::Tcp, &c2).unwrap();
        let mut got = Vec::new();
        while let Some(i) = rx.recv(None).unwrap() {
            match i {
                Incoming::Frame(pagewire_protocol::Frame::Pages(p)) => {
                    assert!(p.payload.len() == 512 << 10);
                    assert!(p.payload.iter().all(|&b| b == p.payload[0]));
                    got.push(p.payload[0]);
                }
                other => panic!("{other:?}"),
            }
        }
        got
    });
    ch.close(&mut done).unwrap();
    assert_eq!(
        reader.join().unwrap(),
        sent,
        "frames lost, altered or out of order"
    );
    drop(done);
    assert_eq!(pool.available(), 6);
}

#[test]
fn wait_sends_waits_in_the_kernel_and_what_it_waited_for_drains() {
    for backend in backends() {
        let mut cfg = small_buffers(25, 1);
        cfg.tcp.recv_timeout = Some(Duration::from_secs(20));
        let (mut src, mut dst) = pair(&cfg);
        let mem = patterned(128, 12);
        let mut ch = src.remove(0).open(&backend, &cfg).unwrap();
        let (est, c) = (dst.remove(0), cfg.clone());
        // The peer reads nothing for 300 ms, then all 16 frames.
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        let g = go.clone();
        let peer = std::thread::spawn(move || {
            let mut rx = est.open(&Backend::Tcp, &c).unwrap();
            g.wait();
            std::thread::sleep(Duration::from_millis(300));
            let mut frames = 0;
            while let Some(i) = rx.recv(None).unwrap() {
                assert!(matches!(i, Incoming::Frame(_)), "{i:?}");
                frames += 1;
            }
            frames
        });
        let mut done = Vec::new();
        if backend == Backend::Tcp {
            // What the socket cannot take waits in the channel's queue; with the
            // socket full and the peer not reading, the wait lasts until the kernel
            // finds room (41 ms in one run: the peer's kernel makes some) or its
            // timeout, where a nap would have ended after 200 µs.
            for _ in 0..16 {
                ch.send(raw_frame(&mem, 0, 128)).unwrap();
            }
            ch.poll_completions(&mut done).unwrap();
            let t = std::time::Instant::now();
            ch.wait_sends(Duration::from_millis(100)).unwrap();
            assert!(t.elapsed() >= Duration::from_millis(2), "{:?}", t.elapsed());
            go.wait();
        } else {
            go.wait();
            for _ in 0..16 {
                ch.send(raw_frame(&mem, 0, 128)).unwrap();
            }
        }
        // Waiting and taking up completions alone, without a flush, moves everything
        // to the peer.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while ch.unacked_bytes() != Some(0) && std::time::Instant::now() < deadline {
            ch.wait_sends(Duration::from_millis(5)).unwrap();
            ch.poll_completions(&mut done).unwrap();
        }
        assert_eq!(ch.unacked_bytes(), Some(0), "{backend:?}");
        ch.close(&mut done).unwrap();
        assert_eq!(peer.join().unwrap(), 16, "{backend:?}");
    }
}

/// Closing a ring sends task work to the thread that set it up, which interrupts a
/// blocking socket call with a timeout (`EINTR`, no signal involved). `uring::probe`
/// is what a VMM calls on its own thread before choosing a backend: the thread's next
/// blocking reads must not fail for it.
#[test]
fn probing_io_uring_leaves_the_calling_thread_s_blocking_reads_alone() {
    use std::io::Read;
    let handle = std::thread::spawn(|| {
        // `uring_available` probes on this thread (and fails under
        // PAGEWIRE_REQUIRE_URING=1 where io_uring is missing).
        if !uring_available() {
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _peer = l.accept().unwrap();
        for _ in 0..3 {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let e = s.read(&mut [0u8; 16]).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
            pagewire_transport::uring::probe(&Default::default()).unwrap();
        }
    });
    handle.join().unwrap();
}
