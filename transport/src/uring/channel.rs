//! [`UringChannel`]: setting up the ring and registering memory, and the
//! [`Channel`] operations.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::opcode;
use io_uring::types::Fd;
use pagewire_protocol::Negotiated;

use super::{
    BGID, BufRing, Core, Fixed, FixedState, InFlight, MAX_FIXED, MsgHdr, SEND_ZC_REPORT_USAGE,
    UringChannel, UringConfig, UringError, ZC_AUTO_COPIED, ZeroCopy, build_ring,
};
use crate::buf::Payload;
use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::endpoint::Stream;
use crate::recv::{FrameClock, RxState, Until, until};

impl UringChannel {
    /// Takes a connected socket after its handshake (`leftover`: bytes received after
    /// it), sets up the ring on the calling thread and registers the configured memory.
    ///
    /// # Errors
    /// [`UringError`].
    pub fn new(
        stream: impl Into<Stream>,
        negotiated: Negotiated,
        leftover: &[u8],
        cfg: &UringConfig,
    ) -> Result<Self, UringError> {
        let stream = stream.into();
        let ring = build_ring(cfg)?;
        if let Stream::Tcp(s) = &stream {
            s.set_nodelay(true).map_err(|source| UringError::Io {
                op: "setsockopt(TCP_NODELAY)",
                source,
            })?;
        }
        let zc_capable = stream.is_tcp();
        let mut fixed = Vec::new();
        let regions = cfg
            .guest
            .iter()
            .map(|g| (g.id(), g.as_ptr(), g.len()))
            .chain(cfg.pools.iter().map(|p| {
                let (ptr, len) = p.region();
                (p.id(), ptr, len)
            }));
        for (memory, ptr, len) in regions {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(MAX_FIXED);
                fixed.push(Fixed {
                    memory,
                    base: ptr as usize + off,
                    len: n,
                });
                off += n;
            }
        }
        if fixed.len() > usize::from(u16::MAX) {
            return Err(UringError::Config("too many fixed buffers"));
        }
        // Registering pins (and so faults in) every page of the memory: done at once
        // only when every payload goes zero-copy; with `Auto`, once a send went in
        // place (see `FixedState`).
        let fixed_state = if fixed.is_empty() || cfg.zero_copy == ZeroCopy::Never {
            FixedState::Never
        } else if cfg.zero_copy == ZeroCopy::Always {
            register_fixed(&ring, &fixed)?;
            FixedState::Registered
        } else {
            FixedState::Deferred
        };
        let mut br = BufRing::new(cfg.recv_buffers, cfg.recv_buffer_size)
            .map_err(|source| UringError::Io { op: "mmap", source })?;
        // SAFETY: the ring mapping is page-aligned, `recv_buffers` entries long, and
        // lives in `Core::br`, which is dropped after `Core::ring`.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                br.ring.ptr.as_ptr() as u64,
                cfg.recv_buffers,
                BGID,
                0,
            )
        }
        .map_err(|source| UringError::Register {
            what: "the provided-buffer ring",
            source,
        })?;
        for bid in 0..cfg.recv_buffers {
            br.push(bid);
        }
        let mut core = Core {
            ring,
            stream: ManuallyDrop::new(stream),
            zc_capable,
            cfg: cfg.clone(),
            fixed,
            fixed_state,
            inflight: HashMap::new(),
            next_seq: 0,
            pending: VecDeque::new(),
            chain_left: 0,
            in_flight_bytes: 0,
            copied_bytes: 0,
            unsent_bytes: 0,
            done: Vec::new(),
            send_error: None,
            br,
            chunks: VecDeque::new(),
            armed: false,
            eof: false,
            recv_error: None,
            direct: None,
            direct_res: None,
            zc_copied_run: 0,
            zc_pause: 0,
            zc_budget: ZC_AUTO_COPIED,
            spare_records: Vec::new(),
            stats: ChannelStats::default(),
            interrupt: None,
        };
        if fixed_state == FixedState::Registered {
            core.stats.registered_bytes = core.fixed_bytes();
        }
        core.arm().map_err(|source| UringError::Io {
            op: "arming the multishot receive",
            source,
        })?;
        Ok(Self {
            core,
            rx: RxState::new(negotiated.limits(), leftover),
            negotiated,
            failed: false,
            tls: None,
            deadline: None,
            frame: FrameClock::default(),
        })
    }

    /// Runs the channel inside the TLS session its handshake ran in.
    pub(crate) fn with_tls(mut self, tls: Option<Box<crate::tls::TlsSession>>) -> Self {
        self.tls = tls;
        self
    }

    /// Whether frames go inside TLS.
    pub fn is_encrypted(&self) -> bool {
        self.tls.is_some()
    }

    /// With TLS, the frame sealed: one buffer of records to send, and the payload
    /// slices to hold until it is sent. Without, the frame as it is.
    fn seal(&mut self, frame: OutFrame) -> Result<(OutFrame, Vec<Payload>), ChannelError> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok((frame, Vec::new()));
        };
        tls.seal_frame(&frame)?;
        // The buffer the records were sealed in is the one sent; the next frame is
        // sealed into one whose send completed, when there is one.
        let spare = self.core.spare_records.pop().unwrap_or_default();
        let wire = OutFrame {
            header: tls.take_records(spare),
            payload: Vec::new(),
        };
        Ok((wire, frame.payload))
    }

    /// Sets when every later `recv` must have returned by (`None`: no deadline), as
    /// [`TcpChannel::set_recv_deadline`](crate::tcp::TcpChannel::set_recv_deadline) does.
    pub fn set_recv_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = until(deadline);
    }

    /// Sets how long a frame may take to arrive whole from its first byte (`None`: no
    /// bound, the default), as
    /// [`TcpChannel::set_frame_timeout`](crate::tcp::TcpChannel::set_frame_timeout)
    /// does.
    pub fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.frame.set_timeout(timeout);
    }

    /// Changes how long `recv` waits for bytes (`None`: for ever), e.g. to the time
    /// left before a deadline.
    pub fn set_recv_timeout(&mut self, timeout: Option<Duration>) {
        self.core.cfg.recv_timeout = timeout;
    }

    /// Gives the channel an [`Interrupt`](crate::Interrupt) that ends its waits for
    /// sends early (see [`crate::interrupt`]), or takes it away (`None`): from then on
    /// they wait in slices of at most [`crate::interrupt::SLICE`]. The socket's own
    /// send timeout stays as it is (the kernel's sends use it) until TLS's
    /// `close_notify`, written directly, needs the slice.
    ///
    /// # Errors
    /// None yet; the `Result` matches [`TcpChannel::set_interrupt`](crate::tcp::TcpChannel::set_interrupt).
    pub fn set_interrupt(
        &mut self,
        interrupt: Option<crate::Interrupt>,
    ) -> Result<(), ChannelError> {
        self.core.interrupt = interrupt;
        Ok(())
    }

    /// Frames whose payload is still owned by the channel.
    pub fn in_flight(&self) -> usize {
        self.core.inflight.len()
    }

    /// Payload bytes still owned by the channel.
    pub fn in_flight_bytes(&self) -> usize {
        self.core.in_flight_bytes
    }

    /// Processes completions that are ready, without waiting.
    ///
    /// # Errors
    /// A failed system call.
    pub fn progress(&mut self) -> Result<(), ChannelError> {
        self.core.pump();
        self.core.enter(0, None)?;
        self.core.reap()
    }

    fn check(&mut self) -> Result<(), ChannelError> {
        if self.failed {
            return Err(ChannelError::Failed);
        }
        if let Some(e) = self.core.send_error.take() {
            self.failed = true;
            return Err(ChannelError::io("io_uring send", e));
        }
        Ok(())
    }
}

/// Registers `fixed` as the ring's fixed buffers, in order (a piece's index is its
/// `buf_index`).
fn register_fixed(ring: &io_uring::IoUring, fixed: &[Fixed]) -> Result<(), UringError> {
    let iovecs: Vec<libc::iovec> = fixed
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.base as *mut libc::c_void,
            iov_len: f.len,
        })
        .collect();
    // SAFETY: each iovec covers memory owned by a GuestMemory or BufferPool kept in
    // `Core::cfg` for as long as the ring lives; the ring is dropped first.
    unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| UringError::Register {
        what: "guest memory and buffer pools",
        source,
    })
}

impl Core {
    /// Bytes of the pieces to register.
    fn fixed_bytes(&self) -> u64 {
        self.fixed.iter().map(|f| f.len as u64).sum()
    }

    /// [`ZeroCopy::Auto`]: registers the fixed buffers once a zero-copy send went in
    /// place (the link can use them); a failure (`RLIMIT_MEMLOCK`) leaves the sends
    /// zero-copy from unregistered memory, which the kernel pins per send.
    pub(super) fn register_when_due(&mut self) {
        if self.fixed_state != FixedState::Deferred || self.zc_budget != u32::MAX {
            return;
        }
        self.fixed_state = match register_fixed(&self.ring, &self.fixed) {
            Ok(()) => {
                self.stats.registered_bytes = self.fixed_bytes();
                FixedState::Registered
            }
            Err(_) => {
                self.stats.register_failures += 1;
                FixedState::Failed
            }
        };
    }
}

impl Channel for UringChannel {
    fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    fn send(&mut self, frame: OutFrame) -> Result<SendId, ChannelError> {
        self.check()?;
        let len = frame.wire_len();
        if len > self.negotiated.max_frame_bytes as usize {
            return Err(ChannelError::FrameTooLarge {
                len,
                max: self.negotiated.max_frame_bytes,
            });
        }
        let (mut frame, held) = match self.seal(frame) {
            Ok(f) => f,
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        let core = &mut self.core;
        core.register_when_due();
        let seq = core.next_seq;
        core.next_seq += 1;
        let id = SendId(seq);
        let early = held.is_empty() && core.copy_behind(&mut frame, id);
        let wire = frame.wire_len();
        let fd = Fd(core.stream.as_raw_fd());
        let wait_all = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        let payload_bytes = wire - frame.header.len();
        let more = if payload_bytes > 0 { libc::MSG_MORE } else { 0 };
        let mut ops = 0;
        let want_zc = payload_bytes > 0
            && !early
            && match core.cfg.zero_copy {
                ZeroCopy::Always => true,
                ZeroCopy::Never => false,
                ZeroCopy::Auto => core.zc_pause == 0 && core.zc_budget > 0,
            };
        let used_zc = want_zc;
        let use_zc = want_zc && core.zc_capable;
        let mut msg = None;
        let slices = frame.payload.iter().filter(|p| !p.is_empty()).count();
        // A socket that cannot send in place (Unix): the payload goes by copy, and each
        // send the policy wanted zero-copy counts as copied, like a copied notification.
        let copied_anyway = if want_zc && !use_zc {
            u32::try_from(slices).unwrap_or(u32::MAX)
        } else {
            0
        };
        if !use_zc && slices < 1024 {
            // Copying anyway: the whole frame in one vectored send.
            let mut iov = crate::tcp::frame_iovecs(&frame);
            let mut m = Box::new(MsgHdr {
                // SAFETY: a zeroed msghdr is valid (no name, no control data).
                msg: unsafe { std::mem::zeroed() },
                _iov: Vec::new(),
            });
            m.msg.msg_iov = iov.as_mut_ptr();
            m.msg.msg_iovlen = iov.len();
            m._iov = iov;
            core.pending.push_back(
                opcode::SendMsg::new(fd, &raw const m.msg)
                    .flags(wait_all as u32)
                    .build()
                    .user_data(seq),
            );
            msg = Some(m);
            ops += 1;
        } else {
            if !frame.header.is_empty() {
                core.pending.push_back(
                    opcode::Send::new(fd, frame.header.as_ptr(), frame.header.len() as u32)
                        .flags(wait_all | more)
                        .build()
                        .user_data(seq),
                );
                ops += 1;
            }
            for p in frame.payload.iter().filter(|p| !p.is_empty()) {
                // `len` is below the frame limit (64 MiB), so it fits a u32.
                let e = if use_zc {
                    let mut op = opcode::SendZc::new(fd, p.as_ptr(), p.len() as u32)
                        .flags(wait_all)
                        .zc_flags(SEND_ZC_REPORT_USAGE);
                    if let Some(i) = core.fixed_index(p) {
                        op = op.buf_index(Some(i));
                    }
                    op.build()
                } else {
                    opcode::Send::new(fd, p.as_ptr(), p.len() as u32)
                        .flags(wait_all)
                        .build()
                };
                core.pending.push_back(e.user_data(seq));
                ops += 1;
            }
        }
        if core.cfg.zero_copy == ZeroCopy::Auto {
            if used_zc && core.zc_budget != u32::MAX {
                core.zc_budget = core.zc_budget.saturating_sub(1);
            }
            core.zc_pause = core.zc_pause.saturating_sub(1);
        }
        for _ in 0..copied_anyway {
            core.note_zc_usage(true);
        }
        // With TLS the records buffer is what the kernel holds.
        let held_bytes = if held.is_empty() {
            payload_bytes
        } else {
            frame.header.len()
        };
        let mut payload = frame.payload;
        payload.extend(held);
        core.inflight.insert(
            seq,
            InFlight {
                id,
                header: frame.header,
                sealed: self.tls.is_some(),
                _msg: msg,
                payload,
                ops,
                zc: 0,
                copied: copied_anyway,
                bytes: held_bytes,
                early,
            },
        );
        core.in_flight_bytes += held_bytes;
        core.unsent_bytes += wire as u64;
        if early {
            core.copied_bytes += held_bytes;
        }
        core.stats.peak_in_flight_bytes = core
            .stats
            .peak_in_flight_bytes
            .max(core.in_flight_bytes as u64);
        core.stats.frames_sent += 1;
        core.stats.bytes_sent += len as u64;
        if ops == 0 {
            // Nothing to send (cannot happen for a real frame); complete at once.
            core.on_send_empty(seq);
        }
        self.progress()?;
        let limit = self.core.cfg.max_in_flight_bytes;
        if let Err(e) = self.core.wait_in_flight(limit) {
            self.failed = true;
            return Err(e);
        }
        self.check()?;
        Ok(id)
    }

    fn poll_completions(&mut self, out: &mut Vec<Completed>) -> Result<usize, ChannelError> {
        // The last `send` entered the kernel already; enter again only when that
        // brought nothing back.
        self.core.reap()?;
        if self.core.done.is_empty() {
            self.progress()?;
        }
        let n = self.core.done.len();
        out.append(&mut self.core.done);
        self.check()?;
        Ok(n)
    }

    fn flush(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.check()?;
        if let Err(e) = self.core.wait_in_flight(0) {
            self.failed = true;
            return Err(e);
        }
        out.append(&mut self.core.done);
        self.check()
    }

    fn recv<'a>(
        &'a mut self,
        sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Incoming<'a>>, ChannelError> {
        let held = self.rx.buffered() > 0 || self.tls.as_ref().is_some_and(|t| t.has_pending());
        self.frame.resume(held);
        let mut src = Until {
            inner: &mut self.core,
            deadline: self.deadline,
            frame: self.frame,
        };
        let res = match self.tls.as_deref_mut() {
            Some(tls) => {
                let mut src = crate::tls::TlsSource {
                    inner: &mut src,
                    tls,
                };
                self.rx.recv(&mut src, sink)
            }
            None => self.rx.recv(&mut src, sink),
        };
        self.frame = src.frame;
        self.frame.received(res.is_ok());
        res
    }

    fn unacked_bytes(&self) -> Option<u64> {
        // The socket's queue and what the ring holds for it: a channel that takes
        // frames in far faster than the link drains them holds the difference here.
        // The part of a send under way that is in the socket already counts twice
        // (at most one send's bytes).
        crate::tcp::unacked(self.core.stream.as_raw_fd()).map(|n| n + self.core.unsent_bytes)
    }

    fn peer_limited(&self) -> Option<std::time::Duration> {
        crate::tcp::rwnd_limited(self.core.stream.as_raw_fd())
    }

    fn has_input(&mut self) -> Result<bool, ChannelError> {
        if self.rx.buffered() > 0 || self.tls.as_ref().is_some_and(|t| t.has_pending()) {
            return Ok(true);
        }
        // The multishot receive takes what arrives into the ring's buffers, so the
        // socket itself may not look readable: take up its completions first (entering
        // without waiting runs the kernel's deferred work).
        self.core.enter(0, None)?;
        self.core.reap()?;
        Ok(self.core.has_received() || crate::tcp::readable_now(self.core.stream.as_raw_fd()))
    }

    fn wait_sends(&mut self, timeout: std::time::Duration) -> Result<(), ChannelError> {
        self.check()?;
        if self.core.inflight.is_empty() {
            // As for TCP: a socket the peer reset keeps its `SIOCOUTQ` count.
            crate::tcp::socket_failed(&self.core.stream)?;
            std::thread::sleep(timeout.min(std::time::Duration::from_micros(200)));
            return Ok(());
        }
        // Entries that did not fit the ring go in as room frees; one completion (or
        // the timeout) ends the wait.
        self.core.pump();
        self.core.enter(1, Some(timeout))?;
        self.core.reap()
    }

    fn stats(&self) -> ChannelStats {
        let tls = self.tls.as_ref().map(|t| t.counters).unwrap_or_default();
        ChannelStats {
            frames_received: self.rx.frames,
            bytes_received: self.rx.bytes,
            bytes_placed: self.rx.placed,
            tls_bytes_sealed: tls.sealed,
            tls_bytes_opened: tls.opened,
            tls_bytes_copied: tls.copied,
            tls_send_buffer_allocations: tls.send_buffer_allocations,
            ..self.core.stats
        }
    }

    fn close(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.flush(out)?;
        if let Some(tls) = self.tls.as_deref_mut() {
            // Every send has completed: close_notify goes last, written directly.
            tls.close().map_err(ChannelError::Tls)?;
            if let Some(i) = self.core.interrupt.as_ref() {
                // `send_all` waits a slice at a time on this socket's send timeout.
                let slice = crate::interrupt::slice(self.core.cfg.send_timeout, Some(i));
                crate::tcp::set_send_timeout(&self.core.stream, slice)
                    .map_err(|e| ChannelError::io("setsockopt(SO_SNDTIMEO)", e))?;
            }
            let mut w = crate::tcp::SockWriter {
                stream: &self.core.stream,
                wait: crate::interrupt::SendWait {
                    timeout: self.core.cfg.send_timeout,
                    interrupt: self.core.interrupt.as_ref(),
                },
                err: None,
            };
            tls.write_to(&mut w).map_err(|e| w.error(e))?;
        }
        match self.core.stream.shutdown(std::net::Shutdown::Write) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(ChannelError::io("shutdown", e)),
        }
    }
}
