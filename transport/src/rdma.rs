//! The RDMA backend (cargo feature `rdma`): rdma_cm connection setup, one reliable
//! connected queue pair per channel, raw pages written straight into the
//! destination's memory with RDMA WRITE.
//!
//! # What was built and what was run
//! This module is built and clippy-checked against `rdma-sys` (libibverbs and
//! librdmacm headers). The machines it was written on have **no RDMA device and no
//! soft-RoCE** (`rdma_rxe` is not in their kernel), so nothing here has exchanged a
//! byte: what is tested without a device is device detection (the clear
//! [`RdmaError::NoDevice`]), the planning of RDMA WRITEs from page runs and payload
//! slices ([`plan_writes`]), and the encoding of the region advertisement. The
//! end-to-end test prints "skipped: no RDMA device" here; where a device exists it
//! runs when `PAGEWIRE_RDMA_ADDR` names an address of the RDMA interface.
//!
//! # Contract
//! - **Setup**: [`connect`] resolves the address and route with rdma_cm, creates a
//!   protection domain, one completion queue (with a completion channel, so waits
//!   sleep) and an RC queue pair, registers the configured guest memory once
//!   (`IBV_ACCESS_LOCAL_WRITE`; on the destination also `IBV_ACCESS_REMOTE_WRITE`),
//!   posts the receive buffers, and connects (`retry_count` 7, `rnr_retry_count` 7:
//!   a destination that posts no receive buffer stalls the sender instead of failing
//!   it). [`RdmaListener::accept`] is the destination's side.
//! - **Handshake first**: the protocol handshake runs over SEND/RECV before anything
//!   else. Only once it has completed does the destination send its *region
//!   advertisement* (region id, address, length, rkey), so a peer that fails
//!   authentication never learns a key to write guest memory with.
//! - **Frames**: every frame starts a new message. A raw PAGES frame whose payload
//!   slices all lie in registered guest memory, for a region the destination
//!   advertised, is sent as RDMA WRITEs of its pages to their place in the
//!   destination's memory, followed by a SEND (with immediate data `PLACED`) of its
//!   header only; on an RC queue pair the WRITEs are placed before the SEND completes
//!   at the destination, which then reports [`Incoming::Placed`]. Every other frame is
//!   copied into registered send buffers and sent as SENDs of at most `message_size`
//!   bytes, which the destination parses like a byte stream.
//! - **Completion**: every work request is signalled; a frame's payload is handed back
//!   when all of its work requests have completed (the NIC has read the memory).
//!   `send` waits for send buffers or completions at most `send_timeout`.
//! - **Close**: [`Channel::close`] waits for every completion and sends a `CLOSE`
//!   message, so the peer's `recv` returns `Ok(None)`; a disconnect without it is an
//!   error at the peer.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::ptr;
use std::time::{Duration, Instant};

use pagewire_protocol::{
    ChannelId, ClientConfig, ClientHandshake, Envelope, HandshakeError, Negotiated, PageRun,
    RegionId, ServerConfig, ServerHandshake,
};
use rdma_sys::*;

use crate::buf::{GuestMemory, GuestSlice, Mapping, Payload};
use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::recv::{ByteSource, RxState, copy_to_guest, raw_header};
use crate::session::{Handshake, SessionConfig, SessionError, nonce, wait_readable};

/// Immediate data of a message: an ordinary slice of the frame stream.
const IMM_STREAM: u32 = 0;
/// Immediate data of a message holding only a PAGES header whose payload was written.
const IMM_PLACED: u32 = 1;
/// Immediate data of the destination's region advertisement.
const IMM_ADVERT: u32 = 2;
/// Immediate data of a clean close.
const IMM_CLOSE: u32 = 3;
/// Bit marking a receive work request id.
const RECV_BIT: u64 = 1 << 63;
/// One advertised region on the wire: id u32, rkey u32, address u64, length u64.
const ADVERT_LEN: usize = 24;

/// Settings of an RDMA channel.
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Guest memory by region id: what the source sends from, what the destination
    /// lets the source write into.
    pub regions: Vec<(RegionId, GuestMemory)>,
    /// Largest SEND message; the receive buffers have this size.
    pub message_size: u32,
    /// Receive buffers posted per channel.
    pub recv_depth: u32,
    /// Send buffers (and outstanding send work requests) per channel.
    pub send_depth: u32,
    /// Timeout of address and route resolution and of the connection.
    pub connect_timeout: Duration,
    /// How long `send` may wait for a completion.
    pub send_timeout: Duration,
    /// How long `recv` waits; `None` waits for ever.
    pub recv_timeout: Option<Duration>,
}

impl RdmaConfig {
    fn validate(&self) -> Result<(), RdmaError> {
        if self.message_size == 0 || self.recv_depth == 0 || self.send_depth == 0 {
            return Err(RdmaError::Config("sizes and depths must be > 0"));
        }
        Ok(())
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            regions: Vec::new(),
            message_size: 64 << 10,
            recv_depth: 64,
            send_depth: 256,
            connect_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(30),
            recv_timeout: None,
        }
    }
}

/// Why an RDMA channel could not be set up.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA device is present.
    #[error(
        "no RDMA device: ibv_get_device_list found none (load the NIC's driver, or soft-RoCE with `rdma link add rxe0 type rxe netdev IFACE`); use the tcp or io_uring transport"
    )]
    NoDevice,
    /// An rdma_cm call failed.
    #[error("rdma_cm: {op} failed")]
    Cm {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A verbs call failed.
    #[error("ibverbs: {op} failed; if ENOMEM while registering memory, raise RLIMIT_MEMLOCK")]
    Verbs {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An rdma_cm event other than the one expected arrived.
    #[error("rdma_cm: expected {expected}, got event {got} (status {status})")]
    Event {
        /// The event waited for.
        expected: &'static str,
        /// The event that came.
        got: u32,
        /// Its status.
        status: i32,
    },
    /// The protocol handshake failed.
    #[error("handshake over RDMA failed: {0}")]
    Handshake(#[source] HandshakeError),
    /// The channel failed during setup.
    #[error("RDMA channel failed during setup: {0}")]
    Channel(#[from] ChannelError),
    /// A session-level failure (random nonce).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The configuration is invalid.
    #[error("invalid RDMA configuration: {0}")]
    Config(&'static str),
}

fn cm_err(op: &'static str) -> RdmaError {
    RdmaError::Cm {
        op,
        source: io::Error::last_os_error(),
    }
}

fn verbs_err(op: &'static str) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: io::Error::last_os_error(),
    }
}

/// Names of the RDMA devices present.
pub fn devices() -> Vec<String> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let names = (0..usize::try_from(n).unwrap_or(0))
        .filter_map(|i| {
            // SAFETY: `list` holds `n` device pointers; each name is a C string owned by
            // the device, copied out before the list is freed.
            unsafe {
                let d = *list.add(i);
                let name = ibv_get_device_name(d);
                (!name.is_null()).then(|| {
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned()
                })
            }
        })
        .collect();
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

fn require_device() -> Result<(), RdmaError> {
    if devices().is_empty() {
        return Err(RdmaError::NoDevice);
    }
    Ok(())
}

/// One RDMA WRITE: bytes from local memory to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOp {
    /// Local address.
    pub local: u64,
    /// Local key of the memory region.
    pub lkey: u32,
    /// Remote address.
    pub remote: u64,
    /// Remote key.
    pub rkey: u32,
    /// Bytes.
    pub len: u32,
}

/// A region the destination advertised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Region id from the layout.
    pub region: RegionId,
    /// Address of page 0 at the destination.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

/// Splits a raw frame's payload (`slices`: local address, length, lkey, in payload
/// order) into RDMA WRITEs that put each data page at `page × page_size` in `remote`.
/// `None` when the payload does not match the runs or a page lies outside the region.
pub fn plan_writes(
    runs: impl Iterator<Item = PageRun>,
    page_size: u32,
    slices: &[(u64, u64, u32)],
    remote: &RemoteRegion,
) -> Option<Vec<WriteOp>> {
    let ps = u64::from(page_size);
    let mut ops = Vec::new();
    let mut slice = 0;
    let mut slice_off = 0u64;
    for run in runs {
        let mut dst = run.start.0.checked_mul(ps)?;
        let mut left = u64::from(run.count).checked_mul(ps)?;
        if dst.checked_add(left)? > remote.len {
            return None;
        }
        while left > 0 {
            let &(addr, len, lkey) = slices.get(slice)?;
            let n = (len - slice_off).min(left).min(u64::from(u32::MAX));
            ops.push(WriteOp {
                local: addr + slice_off,
                lkey,
                remote: remote.addr.checked_add(dst)?,
                rkey: remote.rkey,
                len: u32::try_from(n).ok()?,
            });
            dst += n;
            left -= n;
            slice_off += n;
            if slice_off == len {
                slice += 1;
                slice_off = 0;
            }
        }
    }
    // Every payload byte is used.
    (slice == slices.len() && slice_off == 0).then_some(ops)
}

fn encode_advert(regions: &[RemoteRegion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(regions.len() * ADVERT_LEN);
    for r in regions {
        out.extend_from_slice(&r.region.0.to_le_bytes());
        out.extend_from_slice(&r.rkey.to_le_bytes());
        out.extend_from_slice(&r.addr.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
    }
    out
}

fn decode_advert(bytes: &[u8]) -> Option<Vec<RemoteRegion>> {
    if !bytes.len().is_multiple_of(ADVERT_LEN) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(ADVERT_LEN)
            .map(|c| {
                let u32_at = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
                let u64_at = |i: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&c[i..i + 8]);
                    u64::from_le_bytes(a)
                };
                RemoteRegion {
                    region: RegionId(u32_at(0)),
                    rkey: u32_at(4),
                    addr: u64_at(8),
                    len: u64_at(16),
                }
            })
            .collect(),
    )
}

/// A registered guest region.
struct Mr {
    region: RegionId,
    memory: GuestMemory,
    mr: *mut ibv_mr,
}

/// The verbs objects of one connection, destroyed in the right order on drop.
struct Verbs {
    /// The event channel this id owns (null for an accepted id, whose events come
    /// on the listener's channel).
    ec: *mut rdma_event_channel,
    id: *mut rdma_cm_id,
    pd: *mut ibv_pd,
    comp: *mut ibv_comp_channel,
    cq: *mut ibv_cq,
    qp_created: bool,
    mrs: Vec<Mr>,
    send_bufs: Mapping,
    send_mr: *mut ibv_mr,
    recv_bufs: Mapping,
    recv_mr: *mut ibv_mr,
}

impl Drop for Verbs {
    fn drop(&mut self) {
        // SAFETY: every pointer is either null or an object this struct created and
        // owns; each is destroyed once, dependents (QP, MRs) before what they depend
        // on (CQ, PD), the id before its event channel.
        unsafe {
            if !self.id.is_null() {
                rdma_disconnect(self.id);
                if self.qp_created {
                    rdma_destroy_qp(self.id);
                }
            }
            for m in &self.mrs {
                ibv_dereg_mr(m.mr);
            }
            if !self.send_mr.is_null() {
                ibv_dereg_mr(self.send_mr);
            }
            if !self.recv_mr.is_null() {
                ibv_dereg_mr(self.recv_mr);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.comp.is_null() {
                ibv_destroy_comp_channel(self.comp);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            if !self.id.is_null() {
                rdma_destroy_id(self.id);
            }
            if !self.ec.is_null() {
                rdma_destroy_event_channel(self.ec);
            }
        }
    }
}

/// Waits for the next rdma_cm event on `ec` and checks it is `expected`; returns the
/// event's id (for CONNECT_REQUEST: the new connection's id).
fn expect_event(
    ec: *mut rdma_event_channel,
    expected: rdma_cm_event_type::Type,
    name: &'static str,
    timeout: Duration,
) -> Result<*mut rdma_cm_id, RdmaError> {
    // SAFETY: `ec` is a live event channel owned by the caller, and its fd stays open
    // while the channel lives, which is longer than this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw((*ec).fd) };
    if !wait_readable(fd, Some(timeout)).map_err(|source| RdmaError::Cm {
        op: "poll(event channel)",
        source,
    })? {
        return Err(RdmaError::Cm {
            op: name,
            source: io::ErrorKind::TimedOut.into(),
        });
    }
    let mut ev: *mut rdma_cm_event = ptr::null_mut();
    // SAFETY: `ec` is live; `ev` is a valid out-pointer; the event is acknowledged
    // after its fields are copied.
    unsafe {
        if rdma_get_cm_event(ec, &mut ev) != 0 {
            return Err(cm_err("rdma_get_cm_event"));
        }
        let (kind, status, id) = ((*ev).event, (*ev).status, (*ev).id);
        rdma_ack_cm_event(ev);
        if kind != expected || status != 0 {
            return Err(RdmaError::Event {
                expected: name,
                got: kind,
                status,
            });
        }
        Ok(id)
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s = socket2::SockAddr::from(*addr);
    // SAFETY: a zeroed sockaddr_storage is valid; `s` fits in it (it is one).
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = s.len();
    // SAFETY: `s.as_ptr()` points at `len` bytes of a sockaddr no larger than
    // sockaddr_storage.
    unsafe {
        ptr::copy_nonoverlapping(
            s.as_ptr().cast::<u8>(),
            (&raw mut st).cast::<u8>(),
            len as usize,
        );
    }
    (st, len)
}

impl Verbs {
    /// Creates the PD, CQ and QP on a resolved (or requested) id, registers memory
    /// and posts the receive buffers.
    fn setup(
        ec: *mut rdma_event_channel,
        id: *mut rdma_cm_id,
        cfg: &RdmaConfig,
        remote_write: bool,
    ) -> Result<Self, RdmaError> {
        let bufs = cfg.validate().and_then(|()| {
            let map = |n: u32| {
                Mapping::new(n as usize * cfg.message_size as usize)
                    .map_err(|source| RdmaError::Verbs { op: "mmap", source })
            };
            Ok((map(cfg.send_depth)?, map(cfg.recv_depth)?))
        });
        let (send_bufs, recv_bufs) = match bufs {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: `id` (and `ec` when not null) are owned by this call and
                // destroyed once; nothing else was created on them yet.
                unsafe {
                    rdma_destroy_id(id);
                    if !ec.is_null() {
                        rdma_destroy_event_channel(ec);
                    }
                }
                return Err(e);
            }
        };
        let mut v = Verbs {
            ec,
            id,
            pd: ptr::null_mut(),
            comp: ptr::null_mut(),
            cq: ptr::null_mut(),
            qp_created: false,
            mrs: Vec::new(),
            send_bufs,
            send_mr: ptr::null_mut(),
            recv_bufs,
            recv_mr: ptr::null_mut(),
        };
        let local = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32;
        let guest_access = if remote_write {
            local | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0 as i32
        } else {
            local
        };
        let depth = (cfg.send_depth + cfg.recv_depth) as i32;
        // SAFETY: `id` is a live rdma_cm id with a device context (`verbs`) after
        // address resolution or a connect request; every object created here is
        // stored in `v` at once, so `Verbs::drop` frees it on any later error; the
        // registered memory outlives the registrations (mappings in `v`, guest memory
        // clones in `v.mrs`).
        unsafe {
            let ctx = (*id).verbs;
            if ctx.is_null() {
                return Err(RdmaError::Config("rdma_cm id has no device context"));
            }
            v.pd = ibv_alloc_pd(ctx);
            if v.pd.is_null() {
                return Err(verbs_err("ibv_alloc_pd"));
            }
            v.comp = ibv_create_comp_channel(ctx);
            if v.comp.is_null() {
                return Err(verbs_err("ibv_create_comp_channel"));
            }
            v.cq = ibv_create_cq(ctx, depth, ptr::null_mut(), v.comp, 0);
            if v.cq.is_null() {
                return Err(verbs_err("ibv_create_cq"));
            }
            let mut attr: ibv_qp_init_attr = std::mem::zeroed();
            attr.send_cq = v.cq;
            attr.recv_cq = v.cq;
            attr.qp_type = ibv_qp_type::IBV_QPT_RC;
            attr.cap.max_send_wr = cfg.send_depth;
            attr.cap.max_recv_wr = cfg.recv_depth;
            attr.cap.max_send_sge = 1;
            attr.cap.max_recv_sge = 1;
            if rdma_create_qp(id, v.pd, &mut attr) != 0 {
                return Err(cm_err("rdma_create_qp"));
            }
            v.qp_created = true;
            v.send_mr = ibv_reg_mr(
                v.pd,
                v.send_bufs.ptr.as_ptr().cast(),
                v.send_bufs.len,
                local,
            );
            v.recv_mr = ibv_reg_mr(
                v.pd,
                v.recv_bufs.ptr.as_ptr().cast(),
                v.recv_bufs.len,
                local,
            );
            if v.send_mr.is_null() || v.recv_mr.is_null() {
                return Err(verbs_err("ibv_reg_mr (message buffers)"));
            }
            for (region, memory) in &cfg.regions {
                let mr = ibv_reg_mr(v.pd, memory.as_ptr().cast(), memory.len(), guest_access);
                if mr.is_null() {
                    return Err(verbs_err("ibv_reg_mr (guest memory)"));
                }
                v.mrs.push(Mr {
                    region: *region,
                    memory: memory.clone(),
                    mr,
                });
            }
        }
        for i in 0..cfg.recv_depth {
            v.post_recv(i, cfg.message_size)
                .map_err(|source| RdmaError::Verbs {
                    op: "ibv_post_recv",
                    source,
                })?;
        }
        Ok(v)
    }

    fn post_recv(&self, index: u32, size: u32) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: self.recv_bufs.ptr.as_ptr() as u64 + u64::from(index) * u64::from(size),
            length: size,
            // SAFETY: `recv_mr` is a live registration (checked non-null in setup).
            lkey: unsafe { (*self.recv_mr).lkey },
        };
        let mut wr = ibv_recv_wr {
            wr_id: RECV_BIT | u64::from(index),
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; the SGE covers receive buffer `index`, which is
        // registered and not posted twice (it is reposted only after its completion
        // was consumed).
        let r = unsafe { ibv_post_recv((*self.id).qp, &mut wr, &mut bad) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    fn recv_buf(&self, index: u32, size: u32) -> *mut u8 {
        self.recv_bufs
            .ptr
            .as_ptr()
            .wrapping_add(index as usize * size as usize)
    }

    fn send_buf(&self, index: u32, size: u32) -> *mut u8 {
        self.send_bufs
            .ptr
            .as_ptr()
            .wrapping_add(index as usize * size as usize)
    }
}

/// One received message.
#[derive(Clone, Copy, Debug)]
struct Msg {
    buf: u32,
    len: u32,
    off: u32,
    imm: u32,
}

/// A frame whose work requests are with the NIC.
struct Pending {
    id: SendId,
    /// Kept alive until the frame's work requests complete.
    _header: Vec<u8>,
    payload: Vec<Payload>,
    /// Work requests posted and not completed.
    ops: u32,
    /// Every work request of the frame is posted.
    sealed: bool,
    slots: Vec<u32>,
}

/// Everything but the receive parser.
struct Core {
    // Declared first so the verbs objects go before the memory they reference.
    v: Verbs,
    cfg: RdmaConfig,
    msgs: VecDeque<Msg>,
    free_slots: Vec<u32>,
    pending: HashMap<u64, Pending>,
    next_seq: u64,
    remote: Vec<RemoteRegion>,
    done: Vec<Completed>,
    error: Option<ChannelError>,
    eof: bool,
    /// Send work requests posted and not completed (at most `send_depth`).
    outstanding: u32,
    stats: ChannelStats,
}

impl Core {
    fn new(v: Verbs, cfg: &RdmaConfig) -> Self {
        Self {
            v,
            free_slots: (0..cfg.send_depth).rev().collect(),
            cfg: cfg.clone(),
            msgs: VecDeque::new(),
            pending: HashMap::new(),
            next_seq: 0,
            remote: Vec::new(),
            done: Vec::new(),
            error: None,
            eof: false,
            outstanding: 0,
            stats: ChannelStats::default(),
        }
    }

    /// Polls the CQ; with `timeout`, sleeps on the completion channel first when it
    /// is empty. Returns whether anything completed.
    fn poll(&mut self, timeout: Option<Option<Duration>>) -> Result<bool, ChannelError> {
        let mut wcs: [ibv_wc; 16] =
            // SAFETY: ibv_wc is plain data; an all-zero value is valid.
            unsafe { std::mem::zeroed() };
        let mut any = false;
        for attempt in 0..2 {
            // SAFETY: the CQ is live; `wcs` has room for 16 entries.
            let n = unsafe { ibv_poll_cq(self.v.cq, 16, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(ChannelError::WorkRequest("ibv_poll_cq failed".into()));
            }
            for wc in &wcs[..n as usize] {
                self.on_completion(wc)?;
                any = true;
            }
            if any || attempt == 1 {
                break;
            }
            let Some(t) = timeout else { break };
            // Arm the notification, re-poll to close the race, then sleep.
            // SAFETY: the CQ is live.
            if unsafe { ibv_req_notify_cq(self.v.cq, 0) } != 0 {
                return Err(ChannelError::WorkRequest("ibv_req_notify_cq failed".into()));
            }
            // SAFETY: the CQ is live; `wcs` has room for 16 entries.
            let n = unsafe { ibv_poll_cq(self.v.cq, 16, wcs.as_mut_ptr()) };
            for wc in &wcs[..n.max(0) as usize] {
                self.on_completion(wc)?;
                any = true;
            }
            if any {
                break;
            }
            // SAFETY: `comp` is the live completion channel of the CQ, and its fd stays
            // open while the channel lives, which is longer than this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw((*self.v.comp).fd) };
            if !wait_readable(fd, t).map_err(|e| ChannelError::io("poll(completion channel)", e))? {
                return Ok(false);
            }
            let (mut cq, mut ctx) = (ptr::null_mut(), ptr::null_mut());
            // SAFETY: the channel is readable, so ibv_get_cq_event does not block; the
            // one event it returns is acknowledged at once.
            unsafe {
                if ibv_get_cq_event(self.v.comp, &mut cq, &mut ctx) == 0 {
                    ibv_ack_cq_events(cq, 1);
                }
            }
        }
        Ok(any)
    }

    fn on_completion(&mut self, wc: &ibv_wc) -> Result<(), ChannelError> {
        if wc.wr_id & RECV_BIT != 0 {
            let buf = (wc.wr_id & !RECV_BIT) as u32;
            if wc.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                // The connection is gone; without a CLOSE first it was not clean.
                if !self.eof {
                    self.error
                        .get_or_insert(ChannelError::Framing("the peer disconnected"));
                }
                return Ok(());
            }
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS || buf >= self.cfg.recv_depth {
                return Err(ChannelError::WorkRequest(format!(
                    "receive completed with status {}",
                    wc.status
                )));
            }
            let imm = if wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
                // SAFETY: the flag says the union holds immediate data.
                u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
            } else {
                IMM_STREAM
            };
            if imm == IMM_CLOSE {
                self.eof = true;
                let _ = self.v.post_recv(buf, self.cfg.message_size);
                return Ok(());
            }
            self.msgs.push_back(Msg {
                buf,
                len: wc.byte_len.min(self.cfg.message_size),
                off: 0,
                imm,
            });
            return Ok(());
        }
        let seq = wc.wr_id;
        self.outstanding = self.outstanding.saturating_sub(1);
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            self.error.get_or_insert(ChannelError::WorkRequest(format!(
                "send or write completed with status {}",
                wc.status
            )));
        }
        let p = self
            .pending
            .get_mut(&seq)
            .ok_or(ChannelError::UnknownCompletion(seq))?;
        p.ops = p.ops.saturating_sub(1);
        if p.ops == 0 && p.sealed {
            self.finish(seq);
        }
        Ok(())
    }

    fn finish(&mut self, seq: u64) {
        if let Some(p) = self.pending.remove(&seq) {
            self.free_slots.extend(p.slots);
            self.done.push(Completed {
                id: p.id,
                payload: p.payload,
                zero_copy: (0, 0),
            });
        }
    }

    /// Starts tracking a frame; its memory stays here until it completes.
    fn begin(&mut self, header: Vec<u8>, payload: Vec<Payload>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                id: SendId(seq),
                _header: header,
                payload,
                ops: 0,
                sealed: false,
                slots: Vec::new(),
            },
        );
        seq
    }

    /// Every work request of `seq` is posted.
    fn seal(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.sealed = true;
            if p.ops == 0 {
                self.finish(seq);
            }
        }
    }

    /// Sends bytes of the stream as one frame of their own (handshake, control).
    fn send_bytes(&mut self, bytes: Vec<u8>, imm: u32) -> Result<(), ChannelError> {
        let part = [(bytes.as_ptr(), bytes.len())];
        let seq = self.begin(bytes, Vec::new());
        let r = self.send_stream(seq, &part, imm);
        self.seal(seq);
        r
    }

    fn wait_slot(&mut self) -> Result<u32, ChannelError> {
        let deadline = Instant::now() + self.cfg.send_timeout;
        loop {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            if let Some(s) = self.free_slots.pop() {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(self.cfg.send_timeout));
            }
            self.poll(Some(Some(left)))?;
        }
    }

    /// Waits until `n` more send work requests fit the send queue.
    fn reserve(&mut self, n: u32) -> Result<(), ChannelError> {
        let deadline = Instant::now() + self.cfg.send_timeout;
        while self.outstanding + n > self.cfg.send_depth {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(self.cfg.send_timeout));
            }
            self.poll(Some(Some(left)))?;
        }
        Ok(())
    }

    /// Posts work requests of frame `seq`, in batches that fit the send queue.
    fn post(&mut self, seq: u64, wrs: &mut [(ibv_send_wr, ibv_sge)]) -> Result<(), ChannelError> {
        let batch = (self.cfg.send_depth as usize / 2).max(1);
        for chunk in wrs.chunks_mut(batch) {
            self.reserve(chunk.len() as u32)?;
            self.post_batch(seq, chunk)?;
        }
        Ok(())
    }

    fn post_batch(
        &mut self,
        seq: u64,
        wrs: &mut [(ibv_send_wr, ibv_sge)],
    ) -> Result<(), ChannelError> {
        let n = wrs.len();
        for i in 0..n {
            let (head, tail) = wrs.split_at_mut(i + 1);
            let (wr, sge) = &mut head[i];
            wr.sg_list = sge;
            wr.num_sge = 1;
            wr.wr_id = seq;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.next = tail.first_mut().map_or(ptr::null_mut(), |(w, _)| w);
        }
        let Some((first, _)) = wrs.first_mut() else {
            return Ok(());
        };
        if let Some(p) = self.pending.get_mut(&seq) {
            p.ops += n as u32;
        }
        self.outstanding += n as u32;
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; every WR's SGE points into registered memory that
        // the frame's `Pending` entry (payload slices, send buffer slots) keeps
        // until the WR completes; the WR structs themselves are only read during the
        // call.
        let r = unsafe { ibv_post_send((*self.v.id).qp, first, &mut bad) };
        if r != 0 {
            return Err(ChannelError::io(
                "ibv_post_send",
                io::Error::from_raw_os_error(r),
            ));
        }
        Ok(())
    }

    fn message_wr(&self, slot: u32, len: u32, imm: u32) -> (ibv_send_wr, ibv_sge) {
        // SAFETY: ibv_send_wr is plain data; zero is a valid start.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        wr.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
            imm_data: imm.to_be(),
        };
        let sge = ibv_sge {
            addr: self.v.send_buf(slot, self.cfg.message_size) as u64,
            length: len,
            // SAFETY: `send_mr` is a live registration.
            lkey: unsafe { (*self.v.send_mr).lkey },
        };
        (wr, sge)
    }

    /// Sends `parts` as messages of the stream, copied into send buffers.
    fn send_stream(
        &mut self,
        seq: u64,
        parts: &[(*const u8, usize)],
        imm: u32,
    ) -> Result<(), ChannelError> {
        let size = self.cfg.message_size as usize;
        let mut slots = Vec::new();
        let mut fill = 0usize;
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut sent = 0;
        let mut part = 0;
        let mut part_off = 0;
        while sent < total || (total == 0 && slots.is_empty()) {
            let slot = self.wait_slot()?;
            if let Some(p) = self.pending.get_mut(&seq) {
                p.slots.push(slot);
            }
            slots.push(slot);
            let dst = self.v.send_buf(slot, self.cfg.message_size);
            while fill < size && part < parts.len() {
                let (p, len) = parts[part];
                let n = (len - part_off).min(size - fill);
                // SAFETY: the source is `n` bytes inside a buffer the caller keeps
                // alive (frame header or payload slice, read without forming a
                // reference to guest memory); the target is inside send slot `slot`,
                // owned by this frame until its completion.
                unsafe { ptr::copy_nonoverlapping(p.add(part_off), dst.add(fill), n) };
                fill += n;
                part_off += n;
                sent += n;
                if part_off == len {
                    part += 1;
                    part_off = 0;
                }
            }
            // Posted at once, so a frame larger than all send buffers together
            // still goes out as buffers come back.
            let mut wr = [self.message_wr(slot, fill as u32, imm)];
            self.post(seq, &mut wr)?;
            fill = 0;
            if total == 0 {
                break;
            }
        }
        Ok(())
    }

    fn lkey_of(&self, p: &Payload) -> Option<u32> {
        let Payload::Guest(s) = p else { return None };
        self.v
            .mrs
            .iter()
            .find(|m| m.memory.id() == s.memory().id())
            // SAFETY: every MR in `mrs` is a live registration.
            .map(|m| unsafe { (*m.mr).lkey })
    }

    /// Plans the WRITEs of a raw PAGES frame, when it can go that way.
    fn plan(&self, frame: &OutFrame, limits: &pagewire_protocol::Limits) -> Option<Vec<WriteOp>> {
        let header = frame.header.get(Envelope::LEN..)?;
        let payload_len = frame.wire_len() - frame.header.len();
        let h = raw_header(frame.header[1], header, payload_len, limits)?;
        let remote = self.remote.iter().find(|r| r.region == h.region)?;
        let slices: Option<Vec<(u64, u64, u32)>> = frame
            .payload
            .iter()
            .map(|p| Some((p.as_ptr() as u64, p.len() as u64, self.lkey_of(p)?)))
            .collect();
        plan_writes(h.data_runs.iter(), limits.page_size, &slices?, remote)
    }
}

impl ByteSource for Core {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        let Some(m) = self.front()? else {
            return Ok(0);
        };
        let n = dst.len().min((m.len - m.off) as usize);
        // SAFETY: the NIC wrote `m.len` bytes into receive buffer `m.buf` and
        // completed; the buffer is not reposted until consumed.
        unsafe {
            ptr::copy_nonoverlapping(
                self.v
                    .recv_buf(m.buf, self.cfg.message_size)
                    .add(m.off as usize),
                dst.as_mut_ptr(),
                n,
            );
        }
        self.consume(n as u32)?;
        Ok(n)
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        let Some(m) = self.front()? else {
            return Ok(0);
        };
        let total: usize = dst.iter().map(GuestSlice::len).sum();
        let n = total.saturating_sub(skip).min((m.len - m.off) as usize);
        // SAFETY: as in `read`.
        let src = unsafe {
            std::slice::from_raw_parts(
                self.v
                    .recv_buf(m.buf, self.cfg.message_size)
                    .add(m.off as usize),
                n,
            )
        };
        copy_to_guest(dst, skip, src);
        self.consume(n as u32)?;
        Ok(n)
    }
}

impl Core {
    /// The next stream message, waiting for one; `None` after a clean close.
    fn front(&mut self) -> Result<Option<Msg>, ChannelError> {
        loop {
            if let Some(m) = self.msgs.front() {
                if m.imm != IMM_STREAM {
                    return Err(ChannelError::Framing(
                        "a placed-pages or advertisement message inside a frame",
                    ));
                }
                return Ok(Some(*m));
            }
            if self.eof {
                return Ok(None);
            }
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            if !self.poll(Some(self.cfg.recv_timeout))? && self.msgs.is_empty() && !self.eof {
                return Err(ChannelError::RecvTimeout(
                    self.cfg.recv_timeout.unwrap_or_default(),
                ));
            }
        }
    }

    fn consume(&mut self, n: u32) -> Result<(), ChannelError> {
        if let Some(m) = self.msgs.front_mut() {
            m.off += n;
            if m.off == m.len {
                let buf = m.buf;
                self.msgs.pop_front();
                self.v
                    .post_recv(buf, self.cfg.message_size)
                    .map_err(|e| ChannelError::io("ibv_post_recv", e))?;
            }
        }
        Ok(())
    }

    /// Waits for a whole message of kind `imm` and returns its bytes (copied).
    fn control(&mut self, imm: u32, timeout: Duration) -> Result<Vec<u8>, ChannelError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.msgs.front().copied() {
                if m.imm != imm {
                    return Err(ChannelError::Framing("unexpected message kind"));
                }
                let mut out = vec![0u8; m.len as usize];
                // SAFETY: as in `read`: a completed receive buffer not yet reposted.
                unsafe {
                    ptr::copy_nonoverlapping(
                        self.v.recv_buf(m.buf, self.cfg.message_size),
                        out.as_mut_ptr(),
                        out.len(),
                    );
                }
                self.msgs.pop_front();
                self.v
                    .post_recv(m.buf, self.cfg.message_size)
                    .map_err(|e| ChannelError::io("ibv_post_recv", e))?;
                return Ok(out);
            }
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.eof {
                return Err(ChannelError::RecvTimeout(timeout));
            }
            self.poll(Some(Some(left)))?;
        }
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
    let deadline = Instant::now() + timeout;
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
    let guard = Verbs {
        ec,
        id,
        pd: ptr::null_mut(),
        comp: ptr::null_mut(),
        cq: ptr::null_mut(),
        qp_created: false,
        mrs: Vec::new(),
        send_bufs: Mapping::new(1).map_err(|source| RdmaError::Verbs { op: "mmap", source })?,
        send_mr: ptr::null_mut(),
        recv_bufs: Mapping::new(1).map_err(|source| RdmaError::Verbs { op: "mmap", source })?,
        recv_mr: ptr::null_mut(),
    };
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
    let v = Verbs::setup(ec, id, cfg, false)?;
    // SAFETY: a zeroed rdma_conn_param is valid (no private data).
    let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
    param.responder_resources = 1;
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
        },
        nonce()?,
    )
    .map_err(RdmaError::Handshake)?;
    let (negotiated, leftover) = handshake(&mut core, &mut hs, session.handshake_timeout)?;
    if !leftover.is_empty() {
        return Err(ChannelError::Framing("bytes after READY before the advertisement").into());
    }
    let advert = core.control(IMM_ADVERT, session.handshake_timeout)?;
    core.remote =
        decode_advert(&advert).ok_or(ChannelError::Framing("malformed region advertisement"))?;
    Ok(RdmaChannel {
        core,
        rx: RxState::new(negotiated.limits(), &[]),
        negotiated,
        held: None,
        failed: false,
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
        let v = Verbs::setup(ptr::null_mut(), id, cfg, true)?;
        // SAFETY: a zeroed rdma_conn_param is valid (no private data).
        let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
        param.responder_resources = 1;
        param.initiator_depth = 1;
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
        // Only now, with the peer authenticated, reveal where it may write.
        let regions: Vec<RemoteRegion> = core
            .v
            .mrs
            .iter()
            .map(|m| RemoteRegion {
                region: m.region,
                addr: m.memory.as_ptr() as u64,
                len: m.memory.len() as u64,
                // SAFETY: a live registration.
                rkey: unsafe { (*m.mr).rkey },
            })
            .collect();
        let advert = encode_advert(&regions);
        if advert.len() > cfg.message_size as usize {
            return Err(RdmaError::Config("too many regions for one message"));
        }
        core.send_bytes(advert, IMM_ADVERT)?;
        Ok(RdmaChannel {
            core,
            rx: RxState::new(negotiated.limits(), &leftover),
            negotiated,
            held: None,
            failed: false,
        })
    }
}

impl RdmaChannel {
    /// The regions the destination advertised (empty on the destination's side).
    pub fn remote_regions(&self) -> &[RemoteRegion] {
        &self.core.remote
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
        let plan = core
            .plan(&frame, &limits)
            .filter(|_| frame.header.len() <= core.cfg.message_size as usize);
        let header = (frame.header.as_ptr(), frame.header.len());
        let parts: Vec<(*const u8, usize)> = std::iter::once(header)
            .chain(frame.payload.iter().map(|p| (p.as_ptr(), p.len())))
            .collect();
        // The frame's memory moves into its entry; the heap buffers do not move.
        let seq = core.begin(frame.header, frame.payload);
        let result = match plan {
            Some(writes) => {
                let mut wrs: Vec<(ibv_send_wr, ibv_sge)> = writes
                    .iter()
                    .map(|w| {
                        // SAFETY: plain data; zero is a valid start.
                        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
                        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                        wr.wr = wr_t {
                            rdma: rdma_t {
                                remote_addr: w.remote,
                                rkey: w.rkey,
                            },
                        };
                        let sge = ibv_sge {
                            addr: w.local,
                            length: w.len,
                            lkey: w.lkey,
                        };
                        (wr, sge)
                    })
                    .collect();
                core.post(seq, &mut wrs)
                    .and_then(|()| core.send_stream(seq, &[header], IMM_PLACED))
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
        let deadline = Instant::now() + self.core.cfg.send_timeout;
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
                if !self.core.poll(Some(self.core.cfg.recv_timeout))? && self.core.msgs.is_empty() {
                    return Err(ChannelError::RecvTimeout(
                        self.core.cfg.recv_timeout.unwrap_or_default(),
                    ));
                }
            }
            if let Some(m) = self.core.msgs.front().copied()
                && m.imm == IMM_PLACED
            {
                self.core.msgs.pop_front();
                self.held = Some(m.buf);
                let size = self.core.cfg.message_size;
                // SAFETY: a completed receive buffer, held (not reposted) until the
                // next `recv`, so the returned header may borrow it until then.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.core.v.recv_buf(m.buf, size), m.len as usize)
                };
                return placed(bytes, &self.negotiated, &self.core).map(Some);
            }
        }
        self.rx.recv(&mut self.core, sink)
    }

    fn stats(&self) -> ChannelStats {
        ChannelStats {
            frames_received: self.rx.frames,
            bytes_received: self.rx.bytes,
            bytes_placed: self.rx.placed,
            ..self.core.stats
        }
    }

    fn close(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.flush(out)?;
        self.core.send_bytes(Vec::new(), IMM_CLOSE)?;
        self.flush(&mut Vec::new())
    }
}

/// Checks a placed-pages header: a valid raw frame for a region this side registered,
/// with its pages inside the region, and its checksum when one was negotiated.
fn placed<'a>(
    bytes: &'a [u8],
    negotiated: &Negotiated,
    core: &Core,
) -> Result<Incoming<'a>, ChannelError> {
    let limits = negotiated.limits();
    let env_bytes: &[u8; Envelope::LEN] = bytes
        .get(..Envelope::LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(ChannelError::Framing("short placed-pages header"))?;
    let env = Envelope::parse(env_bytes, &limits).map_err(ChannelError::Decode)?;
    let payload_len = env
        .frame_len()
        .checked_sub(bytes.len())
        .ok_or(ChannelError::Framing(
            "placed-pages header longer than its frame",
        ))?;
    let frame = raw_header(env.flags, &bytes[Envelope::LEN..], payload_len, &limits).ok_or(
        ChannelError::Framing("placed-pages message is not a valid raw PAGES header"),
    )?;
    let mr = core
        .v
        .mrs
        .iter()
        .find(|m| m.region == frame.region)
        .ok_or(ChannelError::Framing(
            "placed pages for a region this side did not advertise",
        ))?;
    let ps = u64::from(limits.page_size);
    // The checksum covers the envelope and header too (PROTOCOL.md, PAGES).
    let mut crc = pagewire_protocol::pages_crc_seed(bytes);
    for run in frame.data_runs.iter() {
        let start = run.start.0.checked_mul(ps);
        let len = u64::from(run.count) * ps;
        let slice = start
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| mr.memory.slice(s, len as usize))
            .ok_or(ChannelError::Framing("placed pages outside their region"))?;
        if frame.crc.is_some() {
            // SAFETY: the slice lies inside the registered region, written by the
            // peer's RDMA WRITEs that completed before this SEND; nothing else
            // accesses destination pages while a channel places them.
            let b = unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len()) };
            crc = crc32c::crc32c_append(crc, b);
        }
    }
    if let Some(expected) = frame.crc
        && expected != crc
    {
        return Err(ChannelError::Decode(
            pagewire_protocol::DecodeError::ChecksumMismatch {
                expected,
                actual: crc,
            },
        ));
    }
    Ok(Incoming::Placed(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire_protocol::PageIndex;

    fn run(start: u64, count: u32) -> PageRun {
        PageRun {
            start: PageIndex(start),
            count,
        }
    }

    const REMOTE: RemoteRegion = RemoteRegion {
        region: RegionId(3),
        addr: 0x10_0000,
        len: 64 * 4096,
        rkey: 77,
    };

    #[test]
    fn writes_follow_the_runs_across_slices() {
        // Pages 2..4 and 10..11 from two payload slices split mid-run.
        let slices = [(0x5000, 3 * 4096, 1), (0x9000, 4096, 2)];
        let ops = plan_writes([run(2, 2), run(10, 2)].into_iter(), 4096, &slices, &REMOTE).unwrap();
        assert_eq!(
            ops,
            vec![
                WriteOp {
                    local: 0x5000,
                    lkey: 1,
                    remote: 0x10_0000 + 2 * 4096,
                    rkey: 77,
                    len: 8192
                },
                WriteOp {
                    local: 0x5000 + 8192,
                    lkey: 1,
                    remote: 0x10_0000 + 10 * 4096,
                    rkey: 77,
                    len: 4096
                },
                WriteOp {
                    local: 0x9000,
                    lkey: 2,
                    remote: 0x10_0000 + 11 * 4096,
                    rkey: 77,
                    len: 4096
                },
            ]
        );
    }

    #[test]
    fn writes_refuse_mismatched_payloads_and_pages_outside_the_region() {
        let slices = [(0x5000, 2 * 4096, 1)];
        assert!(plan_writes([run(0, 3)].into_iter(), 4096, &slices, &REMOTE).is_none());
        assert!(plan_writes([run(0, 1)].into_iter(), 4096, &slices, &REMOTE).is_none());
        assert!(plan_writes([run(63, 2)].into_iter(), 4096, &slices, &REMOTE).is_none());
        assert!(plan_writes([run(u64::MAX / 2, 2)].into_iter(), 4096, &slices, &REMOTE).is_none());
    }

    #[test]
    fn advertisements_round_trip_and_reject_bad_lengths() {
        let regions = [
            REMOTE,
            RemoteRegion {
                region: RegionId(9),
                ..REMOTE
            },
        ];
        assert_eq!(decode_advert(&encode_advert(&regions)).unwrap(), regions);
        assert!(decode_advert(&[0; 23]).is_none());
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
    fn transfer_over_a_device() {
        if devices().is_empty() {
            // Written past the test harness's capture, so the skip is always visible.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no RDMA device");
            return;
        }
        // With a device (rxe or a NIC) on this host: listen on the address named by
        // PAGEWIRE_RDMA_ADDR (an address of the RDMA interface).
        let Ok(addr) = std::env::var("PAGEWIRE_RDMA_ADDR") else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: PAGEWIRE_RDMA_ADDR not set (an IP of the RDMA interface)"
            );
            return;
        };
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
            let cfg = RdmaConfig {
                regions: vec![(RegionId(0), src2.clone())],
                ..RdmaConfig::default()
            };
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
        let cfg = RdmaConfig {
            regions: vec![(RegionId(0), dst.clone())],
            ..RdmaConfig::default()
        };
        let mut ch = l.accept(&session, &cfg).unwrap();
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
