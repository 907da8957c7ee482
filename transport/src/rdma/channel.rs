//! The channel: connection setup with rdma_cm on both sides, the handshake, the
//! source's ADVERT, and frames as STREAM or READ_PAGES messages.

use std::net::SocketAddr;
use std::ptr;
use std::time::{Duration, Instant};

use pagewire_protocol::rdma::{Advert, AdvertRegion, RdmaMsg, ReadPages, RemoteKey, SourceAddr};
use pagewire_protocol::{
    ChannelId, ClientConfig, ClientHandshake, Envelope, Negotiated, PageFrame, ServerConfig,
    ServerHandshake,
};
use rdma_sys::*;

use super::core::Core;
use super::plan::{plan_reads, run_ranges};
use super::verbs::{Side, Verbs, cm_err, expect_event, require_device, sockaddr};
use super::{RdmaConfig, RdmaError};
use crate::buf::GuestSlice;
use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::recv::{ByteSource, RxState, raw_header};
use crate::session::{Handshake, SessionConfig, nonce};

const IMM_STREAM: u32 = RdmaMsg::STREAM.0;
const IMM_READ_PAGES: u32 = RdmaMsg::READ_PAGES.0;
const IMM_ADVERT: u32 = RdmaMsg::ADVERT.0;
const IMM_CLOSE: u32 = RdmaMsg::CLOSE.0;
const IMM_DONE: u32 = RdmaMsg::DONE.0;

/// Outstanding RDMA READs a queue pair asks for (capped by the device).
const READ_DEPTH: u8 = 16;

/// The READ depth both ends of `id`'s device allow, at most [`READ_DEPTH`].
fn read_depth(id: *mut rdma_cm_id) -> u8 {
    // SAFETY: `id` is live with a device context; `attr` is a valid out-pointer.
    unsafe {
        let ctx = (*id).verbs;
        let mut attr: ibv_device_attr = std::mem::zeroed();
        if ctx.is_null() || ibv_query_device(ctx, &mut attr) != 0 {
            return 1;
        }
        let max = attr.max_qp_rd_atom.min(attr.max_qp_init_rd_atom).max(1);
        u8::try_from(max).unwrap_or(u8::MAX).min(READ_DEPTH)
    }
}

/// A channel over an RDMA RC queue pair.
pub struct RdmaChannel {
    core: Core,
    rx: RxState,
    negotiated: Negotiated,
    /// Receive buffer holding the header of the last placed frame, reposted on the
    /// next `recv`.
    held: Option<u32>,
    failed: bool,
    /// When receives must have returned by ([`RdmaChannel::set_recv_deadline`]), and
    /// the wait it ends.
    deadline: Option<(Instant, Duration)>,
}

impl std::fmt::Debug for RdmaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaChannel")
            .field("negotiated", &self.negotiated)
            .field("remote", &self.core.remote)
            .finish_non_exhaustive()
    }
}

/// Runs the protocol handshake over the message stream; returns the agreement and
/// the bytes that followed it.
fn handshake(
    core: &mut Core,
    hs: &mut dyn Handshake,
    timeout: Duration,
) -> Result<(Negotiated, Vec<u8>), RdmaError> {
    let deadline = crate::deadline::from_now(timeout);
    let mut buf = vec![0u8; 4096];
    let saved = core.cfg.recv_timeout;
    let flush = |core: &mut Core, hs: &mut dyn Handshake| {
        let mut out = Vec::new();
        hs.take_output(&mut out);
        if out.is_empty() {
            Ok(())
        } else {
            core.send_bytes(out, IMM_STREAM)
        }
    };
    let result = (|| loop {
        flush(core, hs)?;
        if let Some(n) = hs.negotiated().filter(|_| hs.is_done()) {
            return Ok((n, Vec::new()));
        }
        core.cfg.recv_timeout = Some(deadline.saturating_duration_since(Instant::now()));
        let got = core.read(&mut buf)?;
        if got == 0 {
            return Err(ChannelError::Framing("closed during the handshake").into());
        }
        match hs.receive(&buf[..got]) {
            Ok(used) if hs.is_done() => {
                flush(core, hs)?;
                let n = hs
                    .negotiated()
                    .ok_or(RdmaError::Config("handshake done without parameters"))?;
                return Ok((n, buf[used..got].to_vec()));
            }
            Ok(_) => {}
            Err(e) => {
                // Tell the peer why (a REJECT is queued), then give up.
                let _ = flush(core, hs);
                return Err(RdmaError::Handshake(e));
            }
        }
    })();
    core.cfg.recv_timeout = saved;
    result
}

/// Opens channel `index` of a session to a destination listening with
/// [`RdmaListener`] at `addr`.
///
/// # Errors
/// [`RdmaError::NoDevice`] when this machine has no RDMA device, else any setup,
/// connection or handshake failure.
pub fn connect(
    addr: SocketAddr,
    session: &SessionConfig,
    index: u16,
    cfg: &RdmaConfig,
) -> Result<RdmaChannel, RdmaError> {
    cfg.validate()?;
    require_device()?;
    let timeout_ms = i32::try_from(cfg.connect_timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: plain constructor; checked for null.
    let ec = unsafe { rdma_create_event_channel() };
    if ec.is_null() {
        return Err(cm_err("rdma_create_event_channel"));
    }
    let mut id = ptr::null_mut();
    // SAFETY: `ec` is live; `id` is a valid out-pointer.
    if unsafe { rdma_create_id(ec, &mut id, ptr::null_mut(), rdma_port_space::RDMA_PS_TCP) } != 0 {
        // SAFETY: `ec` was created above and is not used again.
        unsafe { rdma_destroy_event_channel(ec) };
        return Err(cm_err("rdma_create_id"));
    }
    let (mut dst, _) = sockaddr(&addr);
    // SAFETY: `id` is live; `dst` is a valid sockaddr for the call.
    let resolved =
        unsafe { rdma_resolve_addr(id, ptr::null_mut(), (&raw mut dst).cast(), timeout_ms) };
    let guard = Verbs::guard(ec, id)?;
    if resolved != 0 {
        return Err(cm_err("rdma_resolve_addr"));
    }
    expect_event(
        ec,
        rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
        "ADDR_RESOLVED",
        cfg.connect_timeout,
    )?;
    // SAFETY: `id` is live and its address resolved.
    if unsafe { rdma_resolve_route(id, timeout_ms) } != 0 {
        return Err(cm_err("rdma_resolve_route"));
    }
    expect_event(
        ec,
        rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
        "ROUTE_RESOLVED",
        cfg.connect_timeout,
    )?;
    // Hand the id and channel over from the guard to the real verbs set.
    let mut guard = guard;
    guard.id = ptr::null_mut();
    guard.ec = ptr::null_mut();
    drop(guard);
    let v = Verbs::setup(ec, id, cfg, Side::Source)?;
    // SAFETY: a zeroed rdma_conn_param is valid (no private data).
    let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
    // The source answers the destination's READs.
    param.responder_resources = read_depth(id);
    param.initiator_depth = 1;
    param.retry_count = 7;
    param.rnr_retry_count = 7;
    // SAFETY: `id` is live with its QP created; `param` is valid for the call.
    if unsafe { rdma_connect(id, &mut param) } != 0 {
        return Err(cm_err("rdma_connect"));
    }
    expect_event(
        ec,
        rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
        "ESTABLISHED",
        cfg.connect_timeout,
    )?;
    let mut core = Core::new(v, cfg);
    let mut hs = ClientHandshake::new(
        ClientConfig {
            caps: session.caps,
            session: session.session,
            channel: ChannelId(index),
            channel_count: session.channels,
            auth: session.auth.clone(),
            require: session.require,
        },
        crate::session::hello_nonce()?,
    )
    .map_err(RdmaError::Handshake)?;
    let (negotiated, leftover) = handshake(&mut core, &mut hs, session.handshake_timeout)?;
    if !leftover.is_empty() {
        return Err(ChannelError::Framing("bytes after READY before the advertisement").into());
    }
    // Only now, with the peer authenticated, say where it may read.
    let regions: Vec<AdvertRegion> = core
        .v
        .mrs()
        .iter()
        .map(|m| AdvertRegion {
            region: m.region,
            rkey: RemoteKey(m.rkey()),
            addr: SourceAddr(m.memory.as_ptr() as u64),
            len: m.memory.len() as u64,
        })
        .collect();
    let mut advert = Vec::new();
    Advert { regions }
        .encode(&mut advert)
        .map_err(|_| RdmaError::Config("too many regions for one ADVERT"))?;
    if advert.len() > cfg.message_size as usize {
        return Err(RdmaError::Config("too many regions for one message"));
    }
    core.send_bytes(advert, IMM_ADVERT)?;
    Ok(RdmaChannel {
        core,
        rx: RxState::new(negotiated.limits(), &[]),
        negotiated,
        held: None,
        failed: false,
        deadline: None,
    })
}

/// Accepts RDMA channels (the destination).
pub struct RdmaListener {
    ec: *mut rdma_event_channel,
    id: *mut rdma_cm_id,
}

impl std::fmt::Debug for RdmaListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaListener").finish_non_exhaustive()
    }
}

// SAFETY: the listener's id and event channel may be used from any thread; `accept`
// takes `&self` but the acceptor serialises it behind a mutex.
unsafe impl Send for RdmaListener {}

impl Drop for RdmaListener {
    fn drop(&mut self) {
        // SAFETY: both were created by `bind` and are destroyed once, id first.
        unsafe {
            rdma_destroy_id(self.id);
            rdma_destroy_event_channel(self.ec);
        }
    }
}

impl RdmaListener {
    /// Listens on `addr` (an address of an RDMA-capable interface).
    ///
    /// # Errors
    /// [`RdmaError::NoDevice`], or the failing rdma_cm call.
    pub fn bind(addr: SocketAddr) -> Result<Self, RdmaError> {
        require_device()?;
        // SAFETY: plain constructor; checked for null.
        let ec = unsafe { rdma_create_event_channel() };
        if ec.is_null() {
            return Err(cm_err("rdma_create_event_channel"));
        }
        let mut id = ptr::null_mut();
        // SAFETY: `ec` is live; `id` is a valid out-pointer.
        if unsafe { rdma_create_id(ec, &mut id, ptr::null_mut(), rdma_port_space::RDMA_PS_TCP) }
            != 0
        {
            // SAFETY: created above, not used again.
            unsafe { rdma_destroy_event_channel(ec) };
            return Err(cm_err("rdma_create_id"));
        }
        let me = Self { ec, id };
        let (mut sa, _) = sockaddr(&addr);
        // SAFETY: `id` is live; `sa` is a valid sockaddr.
        unsafe {
            if rdma_bind_addr(id, (&raw mut sa).cast()) != 0 {
                return Err(cm_err("rdma_bind_addr"));
            }
            if rdma_listen(id, 64) != 0 {
                return Err(cm_err("rdma_listen"));
            }
        }
        Ok(me)
    }

    /// Accepts one channel of `session` and runs its handshake; a connection that
    /// fails it is refused (with a REJECT) and reported as an error, leaving the
    /// listener usable.
    ///
    /// # Errors
    /// Setup, connection or handshake failures; [`RdmaError::Cm`] with `TimedOut`
    /// when no connection request arrives within `cfg.connect_timeout`.
    pub fn accept(
        &self,
        session: &SessionConfig,
        cfg: &RdmaConfig,
    ) -> Result<RdmaChannel, RdmaError> {
        cfg.validate()?;
        let id = expect_event(
            self.ec,
            rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST,
            "CONNECT_REQUEST",
            cfg.connect_timeout,
        )?;
        // The accepted id's events arrive on the listener's channel: `ec` stays null.
        let v = Verbs::setup(ptr::null_mut(), id, cfg, Side::Destination)?;
        // SAFETY: a zeroed rdma_conn_param is valid (no private data).
        let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
        // The destination issues the READs.
        param.responder_resources = 1;
        param.initiator_depth = read_depth(id);
        param.rnr_retry_count = 7;
        // SAFETY: `id` is the live requested id with its QP created.
        if unsafe { rdma_accept(id, &mut param) } != 0 {
            return Err(cm_err("rdma_accept"));
        }
        expect_event(
            self.ec,
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            "ESTABLISHED",
            cfg.connect_timeout,
        )?;
        let mut core = Core::new(v, cfg);
        let mut hs = ServerHandshake::new(
            ServerConfig {
                caps: session.caps,
                session: Some(session.session),
                auth: session.auth.clone(),
            },
            nonce()?,
        )
        .map_err(RdmaError::Handshake)?;
        let (negotiated, leftover) = handshake(&mut core, &mut hs, session.handshake_timeout)?;
        // The source's memory, readable with its keys (nothing of ours is remotely
        // accessible).
        let advert = core.control(IMM_ADVERT, session.handshake_timeout)?;
        core.remote = Advert::decode(&advert)
            .map_err(ChannelError::Decode)?
            .regions;
        Ok(RdmaChannel {
            core,
            rx: RxState::new(negotiated.limits(), &leftover),
            negotiated,
            held: None,
            failed: false,
            deadline: None,
        })
    }
}

impl RdmaChannel {
    /// The regions the source advertised (empty on the source's side).
    pub fn remote_regions(&self) -> &[AdvertRegion] {
        &self.core.remote
    }

    /// Sets when `recv` must have returned by (`None`: no deadline, each wait for a
    /// message bounded by the receive timeout alone): a peer that keeps a frame coming
    /// a byte at a time, each message within the receive timeout, is cut off at the
    /// deadline plus at most one receive timeout.
    pub fn set_recv_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = crate::recv::until(deadline);
    }

    /// How long to wait for the next message: the receive timeout, or less when the
    /// deadline comes first; its error when the deadline has passed.
    fn wait(&self) -> Result<Option<Duration>, ChannelError> {
        let timeout = self.core.cfg.recv_timeout;
        let Some((at, after)) = self.deadline else {
            return Ok(timeout);
        };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::RecvTimeout(after));
        }
        // At least a millisecond, the poll's resolution: a shorter wait would return
        // at once, before the deadline.
        let left = left.max(Duration::from_millis(1));
        Ok(Some(timeout.map_or(left, |t| t.min(left))))
    }

    fn check(&mut self) -> Result<(), ChannelError> {
        if self.failed {
            return Err(ChannelError::Failed);
        }
        if let Some(e) = self.core.error.take() {
            self.failed = true;
            return Err(e);
        }
        Ok(())
    }
}

impl Channel for RdmaChannel {
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
        let limits = self.negotiated.limits();
        let core = &mut self.core;
        let header = (frame.header.as_ptr(), frame.header.len());
        let parts: Vec<(*const u8, usize)> = std::iter::once(header)
            .chain(frame.payload.iter().map(|p| (p.as_ptr(), p.len())))
            .collect();
        let msg_seq = core.next_seq();
        let msg = core.read_pages_msg(msg_seq, &frame, &limits);
        // The frame's memory moves into its entry; the heap buffers do not move.
        let seq = core.begin(frame.header, frame.payload);
        debug_assert_eq!(seq, msg_seq);
        let result = match msg {
            Some(msg) => {
                core.await_done(seq);
                let part = [(msg.as_ptr(), msg.len())];
                core.send_stream(seq, &part, IMM_READ_PAGES)
            }
            None => core.send_stream(seq, &parts, IMM_STREAM),
        };
        core.seal(seq);
        if let Err(e) = result {
            self.failed = true;
            return Err(e);
        }
        core.stats.frames_sent += 1;
        core.stats.bytes_sent += len as u64;
        Ok(SendId(seq))
    }

    fn poll_completions(&mut self, out: &mut Vec<Completed>) -> Result<usize, ChannelError> {
        self.core.poll(None)?;
        let n = self.core.done.len();
        out.append(&mut self.core.done);
        self.check()?;
        Ok(n)
    }

    fn flush(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        let deadline = crate::deadline::from_now(self.core.cfg.send_timeout);
        while !self.core.pending.is_empty() {
            self.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.failed = true;
                return Err(ChannelError::SendTimeout(self.core.cfg.send_timeout));
            }
            self.core.poll(Some(Some(left)))?;
        }
        out.append(&mut self.core.done);
        self.check()
    }

    fn recv<'a>(
        &'a mut self,
        sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Incoming<'a>>, ChannelError> {
        if let Some(buf) = self.held.take() {
            self.core
                .v
                .post_recv(buf, self.core.cfg.message_size)
                .map_err(|e| ChannelError::io("ibv_post_recv", e))?;
        }
        if self.rx.buffered() == 0 {
            // Between frames: the next message decides the path.
            while self.core.msgs.is_empty() && !self.core.eof {
                if let Some(e) = self.core.error.take() {
                    return Err(e);
                }
                let wait = self.wait()?;
                if !self.core.poll(Some(wait))? && self.core.msgs.is_empty() {
                    self.wait()?;
                    return Err(ChannelError::RecvTimeout(
                        self.core.cfg.recv_timeout.unwrap_or_default(),
                    ));
                }
            }
            if let Some(m) = self.core.msgs.front().copied()
                && m.imm == IMM_READ_PAGES
            {
                self.core.msgs.pop_front();
                self.held = Some(m.buf);
                let size = self.core.cfg.message_size;
                // SAFETY: a completed receive buffer, held (not reposted) until the
                // next `recv`, so the returned header may borrow it until then.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.core.v.recv_buf(m.buf, size), m.len as usize)
                };
                let r = read_pages(bytes, &self.negotiated, &mut self.core, sink);
                if r.is_err() {
                    self.failed = true;
                }
                return r.map(Some);
            }
        }
        // No frame clock: a frame's deadline is not applied over RDMA (only built here).
        let mut src = crate::recv::Until {
            inner: &mut self.core,
            deadline: self.deadline,
            frame: crate::recv::FrameClock::default(),
        };
        self.rx.recv(&mut src, sink)
    }

    fn stats(&self) -> ChannelStats {
        ChannelStats {
            frames_received: self.rx.frames,
            bytes_received: self.rx.bytes,
            bytes_placed: self.rx.placed + self.core.stats.bytes_placed,
            ..self.core.stats
        }
    }

    fn close(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.flush(out)?;
        self.core.send_bytes(Vec::new(), IMM_CLOSE)?;
        self.flush(&mut Vec::new())
    }
}

/// Receives a READ_PAGES frame: decodes and checks its header, asks `sink` where its
/// pages go (the receiver's checks), reads exactly those from the source's advertised
/// memory, checks the checksum, and sends DONE.
fn read_pages<'a>(
    bytes: &'a [u8],
    negotiated: &Negotiated,
    core: &mut Core,
    sink: Option<&mut dyn PageSink>,
) -> Result<Incoming<'a>, ChannelError> {
    let limits = negotiated.limits();
    let msg = ReadPages::decode(bytes).map_err(ChannelError::Decode)?;
    let header = msg.header;
    let env_bytes: &[u8; Envelope::LEN] = header
        .get(..Envelope::LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(ChannelError::Framing("short READ_PAGES header"))?;
    let env = Envelope::parse(env_bytes, &limits).map_err(ChannelError::Decode)?;
    let payload_len = env
        .frame_len()
        .checked_sub(header.len())
        .ok_or(ChannelError::Framing(
            "READ_PAGES header longer than its frame",
        ))?;
    let frame: PageFrame<'a> =
        raw_header(env.flags, &header[Envelope::LEN..], payload_len, &limits).ok_or(
            ChannelError::Framing("READ_PAGES message is not a valid raw PAGES header"),
        )?;
    // Where the pages go: the sink's answer (after its checks), else the region's
    // own pages.
    let mut dest: Vec<GuestSlice> = Vec::new();
    let ranges: Vec<(u64, u64)> = match sink {
        Some(sink) => {
            if !sink.place(&frame, &mut dest) {
                return Err(ChannelError::Framing(
                    "the receiver refused a READ_PAGES frame's pages",
                ));
            }
            dest.iter()
                .map(|d| (d.as_ptr() as u64, d.len() as u64))
                .collect()
        }
        None => {
            let mr = core
                .v
                .mrs()
                .iter()
                .find(|m| m.region == frame.region)
                .ok_or(ChannelError::Framing(
                    "READ_PAGES for a region this side does not have",
                ))?;
            run_ranges(
                frame.data_runs.iter(),
                limits.page_size,
                mr.memory.as_ptr() as u64,
                mr.memory.len() as u64,
            )
            .map_err(|_| ChannelError::Framing("READ_PAGES pages outside their region"))?
        }
    };
    let reads = plan_reads(&ranges, &msg.segments, &core.remote).map_err(|_| {
        ChannelError::Framing("READ_PAGES segments do not match the frame or the source's memory")
    })?;
    // Each READ's local range must lie in registered memory (for its key).
    let keyed: Option<Vec<_>> = reads
        .iter()
        .map(|r| {
            core.v
                .mrs()
                .iter()
                .find(|m| {
                    let base = m.memory.as_ptr() as u64;
                    r.local >= base && r.local + u64::from(r.len) <= base + m.memory.len() as u64
                })
                .map(|m| (*r, m.lkey()))
        })
        .collect();
    let keyed = keyed.ok_or(ChannelError::Framing(
        "READ_PAGES pages outside the registered memory",
    ))?;
    core.read_remote(&keyed)?;
    if let Some(expected) = frame.crc {
        // The checksum covers the envelope and header too (PROTOCOL.md, PAGES).
        let mut crc = pagewire_protocol::pages_crc_seed(header);
        for &(addr, len) in &ranges {
            // SAFETY: the range lies in registered destination memory (checked
            // above), just written by this channel's completed READs; nothing else
            // accesses these pages while a channel places them.
            let b = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
            crc = crc32c::crc32c_append(crc, b);
        }
        if expected != crc {
            return Err(ChannelError::Decode(
                pagewire_protocol::DecodeError::ChecksumMismatch {
                    expected,
                    actual: crc,
                },
            ));
        }
    }
    let mut done = Vec::with_capacity(8);
    pagewire_protocol::rdma::Done { seq: msg.seq }.encode(&mut done);
    core.send_bytes(done, IMM_DONE)?;
    core.stats.bytes_placed += ranges.iter().map(|r| r.1).sum::<u64>();
    Ok(Incoming::Placed(frame))
}

#[cfg(test)]
mod tests {
    use super::super::verbs::devices;
    use super::*;
    use crate::buf::{GuestMemory, Payload};
    use pagewire_protocol::{PageIndex, RegionId};

    fn run(start: u64, count: u32) -> pagewire_protocol::PageRun {
        pagewire_protocol::PageRun {
            start: PageIndex(start),
            count,
        }
    }

    #[test]
    fn without_a_device_setup_says_so() {
        if !devices().is_empty() {
            eprintln!("an RDMA device is present; the no-device path is not exercised");
            return;
        }
        let err = RdmaListener::bind("127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, RdmaError::NoDevice));
        assert!(err.to_string().contains("no RDMA device"));
        let s = SessionConfig::new(
            pagewire_protocol::Capabilities::new(4096),
            pagewire_protocol::SessionId([1; 16]),
            1,
            pagewire_protocol::Authentication::None,
        );
        let err = connect(
            "127.0.0.1:1".parse().unwrap(),
            &s,
            0,
            &RdmaConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(err, RdmaError::NoDevice));
    }

    #[test]
    #[ignore = "needs an RDMA device (none on the build machines, no soft-RoCE in their kernel): run with PAGEWIRE_RDMA_ADDR=<ip of the RDMA interface> and --ignored"]
    fn transfer_over_a_device() {
        assert!(!devices().is_empty(), "no RDMA device on this machine");
        // With a device (rxe or a NIC) on this host: listen on the address named by
        // PAGEWIRE_RDMA_ADDR (an address of the RDMA interface).
        let addr = std::env::var("PAGEWIRE_RDMA_ADDR")
            .expect("set PAGEWIRE_RDMA_ADDR to an IP address of the RDMA interface");
        let addr: SocketAddr = format!("{addr}:18515").parse().unwrap();
        let session = SessionConfig::new(
            pagewire_protocol::Capabilities::new(4096),
            pagewire_protocol::SessionId([5; 16]),
            1,
            pagewire_protocol::Authentication::None,
        );
        let src = GuestMemory::anonymous(256 * 4096).unwrap();
        for p in 0..256 {
            src.write(p * 4096, &[p as u8; 4096]);
        }
        let dst = GuestMemory::anonymous(256 * 4096).unwrap();
        let l = RdmaListener::bind(addr).unwrap();
        let (s2, src2) = (session.clone(), src.clone());
        let t = std::thread::spawn(move || {
            let cfg = RdmaConfig::new(vec![(RegionId(0), src2.clone())]);
            let mut ch = connect(addr, &s2, 0, &cfg).unwrap();
            for start in (0..256).step_by(64) {
                let runs = [run(start, 64)];
                let header = pagewire_protocol::PageFrame {
                    codec: pagewire_protocol::CodecId::RAW,
                    region: RegionId(0),
                    round: pagewire_protocol::Round(1),
                    data_runs: pagewire_protocol::WireList::Slice(&runs),
                    zero_runs: pagewire_protocol::WireList::Slice(&[]),
                    uniform_runs: pagewire_protocol::WireList::Slice(&[]),
                    lengths: None,
                    crc: None,
                    payload: &[],
                };
                let slice = src2.slice(start as usize * 4096, 64 * 4096).unwrap();
                ch.send(OutFrame::pages(&header, vec![Payload::Guest(slice)]).unwrap())
                    .unwrap();
            }
            ch.close(&mut Vec::new()).unwrap();
        });
        let cfg = RdmaConfig::new(vec![(RegionId(0), dst.clone())]);
        let mut ch = l.accept(&session, &cfg).unwrap();
        // The source's read-only advertisement arrived after the handshake.
        assert_eq!(ch.remote_regions().len(), 1);
        let mut placed = 0;
        while let Some(inc) = ch.recv(None).unwrap() {
            assert!(matches!(inc, Incoming::Placed(_)));
            placed += 1;
        }
        t.join().unwrap();
        assert_eq!(placed, 4);
        let (mut a, mut b) = (vec![0; 4096], vec![0; 4096]);
        for p in 0..256 {
            src.read(p * 4096, &mut a);
            dst.read(p * 4096, &mut b);
            assert_eq!(a, b, "page {p}");
        }
    }
}
