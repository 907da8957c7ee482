//! The io_uring backend: zero-copy sends from registered memory, multishot receive
//! into a provided-buffer ring, no async runtime.
//!
//! # Contract
//! - **Ring**: one ring per channel, set up with `IORING_SETUP_SINGLE_ISSUER` and
//!   `IORING_SETUP_DEFER_TASKRUN`, so a [`UringChannel`] is bound to the thread that
//!   created it (the type is not `Send`). Every call that waits enters the kernel with
//!   `GETEVENTS`, which is when deferred completions run.
//! - **Copying sends**: a frame sent without zero-copy goes as one vectored
//!   `IORING_OP_SENDMSG` of its header and payload.
//! - **Registration**: the guest memory regions and buffer pools named in
//!   [`UringConfig`] are registered once, when the channel opens, as fixed buffers (in
//!   pieces of at most 1 GiB). A payload slice inside one of them is sent with
//!   `IORING_OP_SEND_ZC` and `IORING_RECVSEND_FIXED_BUF`; any other slice with
//!   `SEND_ZC` on unregistered memory (the kernel pins it per send). The header goes
//!   with a plain `IORING_OP_SEND` (`MSG_MORE`), since copying a few bytes is cheaper
//!   than a notification.
//! - **Ordering**: a frame's sends are linked (`IOSQE_IO_LINK`) and sent with
//!   `MSG_WAITALL`, and only one linked chain is in the kernel at a time; frames queued
//!   meanwhile go out as the next chain. Frames therefore reach the socket in `send`
//!   order, whole.
//! - **Buffer lifetime**: a frame's payload slices are handed back in a [`Completed`]
//!   only when every send of the frame has completed *and* every zero-copy
//!   notification (`IORING_CQE_F_NOTIF`) has arrived, that is when the kernel has
//!   released the memory. With `IORING_SEND_ZC_REPORT_USAGE` each notification says
//!   whether the kernel sent the pages in place or copied them
//!   (`IORING_NOTIF_USAGE_ZC_COPIED`); the counts are in [`Completed::zero_copy`] and
//!   [`ChannelStats`]. Over loopback the kernel always copies: zero-copy needs a NIC.
//!   A copied zero-copy send costs more than a plain send (measured on loopback:
//!   about 0.13 CPU-seconds more per GB), so with [`ZeroCopy::Auto`] (the default) a
//!   channel whose sends keep coming back copied switches to plain `SEND` for a while
//!   and then checks again.
//! - **Backpressure**: `send` queues and returns at once while the payload bytes owned
//!   by the channel are under `max_in_flight_bytes`; above that it waits for
//!   completions and fails with [`ChannelError::SendTimeout`] when none comes within
//!   `send_timeout`.
//! - **Receive**: one multishot `IORING_OP_RECV` fills buffers of a provided-buffer
//!   ring (`IORING_REGISTER_PBUF_RING`); each buffer goes back to the ring as soon as
//!   its bytes are consumed, and the receive is re-armed when it ends (ring empty).
//!   Frames are parsed from those buffers. With a [`PageSink`], a raw page payload
//!   is placed like this: the bytes the multishot receive already took are copied
//!   from the ring into destination memory; then, when at least 64 KiB remain, the
//!   multishot receive is cancelled (its completions are processed up to its last)
//!   and one `IORING_OP_RECVMSG` with `MSG_WAITALL` receives the rest straight into
//!   destination memory; the multishot receive is re-armed for the next header. The
//!   default ring is small (16 × 8 KiB): the multishot receive takes ahead whatever
//!   fits the ring, and that part of a payload goes the copying way (measured on
//!   loopback with 512 KiB frames: 0.40 CPU-seconds per GB with this ring, as TCP,
//!   against 0.46 with 32 × 16 KiB). A destination that receives mostly compressed
//!   frames (never placed) may prefer larger buffers, for fewer completions.
//! - **Unavailable io_uring**: [`probe`] and [`UringChannel::new`] fail with a
//!   [`UringError`] that says why (the `io_uring_disabled` sysctl, a seccomp or
//!   container policy, a kernel too old for an opcode or setup flag); the session layer
//!   can fall back to TCP ([`crate::session::Backend::Uring`]).
//! - **Drop**: cancels what is in the kernel, shuts the socket and waits (bounded) for
//!   every completion; memory the kernel still holds after that is leaked, never freed.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::ManuallyDrop;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use pagewire_protocol::Negotiated;

use crate::buf::{BufferPool, GuestMemory, GuestSlice, Mapping, Payload};
use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::recv::{ByteSource, RxState, copy_to_guest, guest_iovecs};

const RECV_TAG: u64 = u64::MAX;
const CANCEL_TAG: u64 = u64::MAX - 1;
const DIRECT_TAG: u64 = u64::MAX - 2;
/// Smallest payload remainder received straight into destination memory; below it,
/// the bytes come through the provided-buffer ring and are copied.
const DIRECT_MIN: usize = 64 << 10;
const BGID: u16 = 0;
/// Largest fixed buffer the kernel accepts.
const MAX_FIXED: usize = 1 << 30;
/// `IORING_SEND_ZC_REPORT_USAGE` (not exported by the `io-uring` crate).
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's `res`.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// Settings of an io_uring channel.
#[derive(Clone, Debug)]
pub struct UringConfig {
    /// Submission queue entries (the completion queue has four times as many).
    pub entries: u32,
    /// Payload bytes the channel may own before `send` waits.
    pub max_in_flight_bytes: usize,
    /// Buffers in the provided-buffer ring (a power of two, at most 32768).
    pub recv_buffers: u16,
    /// Size of each receive buffer (see the module docs for the trade-off).
    pub recv_buffer_size: u32,
    /// How long `send` may wait for a completion before it fails.
    pub send_timeout: Duration,
    /// How long `recv` waits for bytes; `None` waits for ever.
    pub recv_timeout: Option<Duration>,
    /// When payloads go with `SEND_ZC`.
    pub zero_copy: ZeroCopy,
    /// Guest memory to register as fixed buffers.
    pub guest: Vec<GuestMemory>,
    /// Buffer pools to register as fixed buffers.
    pub pools: Vec<BufferPool>,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            entries: 256,
            max_in_flight_bytes: 64 << 20,
            recv_buffers: 16,
            recv_buffer_size: 8 << 10,
            send_timeout: Duration::from_secs(30),
            recv_timeout: None,
            zero_copy: ZeroCopy::Auto,
            guest: Vec::new(),
            pools: Vec::new(),
        }
    }
}

/// When payload slices are sent with `IORING_OP_SEND_ZC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Always `SEND_ZC`.
    Always,
    /// Never: plain `SEND`, which copies.
    Never,
    /// Probe with [`ZC_AUTO_COPIED`] frames sent with `SEND_ZC` (plain `SEND` until
    /// their notifications answer): one that comes back in place turns zero-copy on
    /// for good; [`ZC_AUTO_COPIED`] copied in a row (loopback, a NIC without
    /// scatter-gather) mean plain `SEND` for the next [`ZC_AUTO_PAUSE`] frames, since
    /// a copied zero-copy send costs more than a plain one, and then a new probe.
    Auto,
}

/// [`ZeroCopy::Auto`]: copied notifications in a row that pause zero-copy.
pub const ZC_AUTO_COPIED: u32 = 8;
/// [`ZeroCopy::Auto`]: frames sent with plain `SEND` before zero-copy is tried again.
pub const ZC_AUTO_PAUSE: u32 = 256;

/// Why an io_uring channel could not be opened.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// The sysctl forbids io_uring.
    #[error(
        "io_uring is disabled by {IO_URING_DISABLED} (= {0}); set it to 0 or use the tcp transport"
    )]
    Disabled(u8),
    /// `io_uring_setup` was refused although the sysctl allows it.
    #[error(
        "io_uring_setup was refused: a seccomp filter or container policy blocks io_uring; allow it or use the tcp transport"
    )]
    Blocked(#[source] io::Error),
    /// The kernel lacks something this backend needs.
    #[error("this kernel does not support {what}; use the tcp transport")]
    NotSupported {
        /// What is missing.
        what: &'static str,
        /// The kernel's answer, if it gave one.
        #[source]
        source: Option<io::Error>,
    },
    /// Memory could not be registered.
    #[error(
        "registering {what} with io_uring failed; if ENOMEM, raise RLIMIT_MEMLOCK (ulimit -l) or register less memory"
    )]
    Register {
        /// What was registered.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid io_uring configuration: {0}")]
    Config(&'static str),
    /// Another system call failed.
    #[error("{op} failed")]
    Io {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_uring_disabled() -> Option<u8> {
    std::fs::read_to_string(IO_URING_DISABLED)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Names the reason `io_uring_setup` failed, given the sysctl's value.
fn classify_setup_error(e: io::Error, disabled: Option<u8>) -> UringError {
    match e.raw_os_error() {
        Some(libc::EPERM) => match disabled {
            Some(d) if d > 0 => UringError::Disabled(d),
            _ => UringError::Blocked(e),
        },
        Some(libc::EACCES) => UringError::Blocked(e),
        Some(libc::ENOSYS) => UringError::NotSupported {
            what: "io_uring (built without it, or a seccomp filter answers ENOSYS)",
            source: Some(e),
        },
        Some(libc::EINVAL) => UringError::NotSupported {
            what: "IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN (Linux 6.1 or later)",
            source: Some(e),
        },
        _ => UringError::Io {
            op: "io_uring_setup",
            source: e,
        },
    }
}

fn build_ring(cfg: &UringConfig) -> Result<IoUring, UringError> {
    if cfg.entries == 0 || !cfg.recv_buffers.is_power_of_two() || cfg.recv_buffers > 32768 {
        return Err(UringError::Config(
            "entries must be > 0 and recv_buffers a power of two up to 32768",
        ));
    }
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(cfg.entries.saturating_mul(4))
        .build(cfg.entries)
        .map_err(|e| classify_setup_error(e, io_uring_disabled()))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|source| UringError::NotSupported {
            what: "IORING_REGISTER_PROBE (Linux 5.6 or later)",
            source: Some(source),
        })?;
    for (code, what) in [
        (
            opcode::SendZc::CODE,
            "IORING_OP_SEND_ZC (Linux 6.0 or later)",
        ),
        (opcode::Send::CODE, "IORING_OP_SEND"),
        (opcode::RecvMulti::CODE, "IORING_OP_RECV"),
        (opcode::AsyncCancel2::CODE, "IORING_OP_ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(UringError::NotSupported { what, source: None });
        }
    }
    Ok(ring)
}

/// Checks that this process can open io_uring channels with `cfg` (ring flags and
/// opcodes), without opening one.
///
/// # Errors
/// [`UringError`] saying what is missing.
pub fn probe(cfg: &UringConfig) -> Result<(), UringError> {
    build_ring(cfg).map(drop)
}

/// A registered fixed buffer.
#[derive(Debug)]
struct Fixed {
    memory: u64,
    base: usize,
    len: usize,
}

/// One frame in the kernel.
#[derive(Debug)]
struct InFlight {
    id: SendId,
    /// Kept alive for the header send.
    _header: Vec<u8>,
    /// Kept alive for a vectored send of the whole frame.
    _msg: Option<Box<MsgHdr>>,
    payload: Vec<Payload>,
    /// Completions still expected: one per send, one per announced notification.
    ops: u32,
    zc: u32,
    copied: u32,
    bytes: usize,
}

/// A `msghdr` and its `iovec`s, at a stable address while the kernel reads them.
/// Raw libc types, not nix's: payload iovecs cover guest memory, not Rust slices.
#[derive(Debug)]
struct MsgHdr {
    msg: libc::msghdr,
    _iov: Vec<libc::iovec>,
}

/// The provided-buffer ring and its buffers.
#[derive(Debug)]
struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    size: u32,
    tail: u16,
}

impl BufRing {
    fn new(entries: u16, size: u32) -> io::Result<Self> {
        let ring = Mapping::new(
            usize::from(entries) * std::mem::size_of::<io_uring::types::BufRingEntry>(),
        )?;
        let bufs = Mapping::new(usize::from(entries) * size as usize)?;
        Ok(Self {
            ring,
            bufs,
            entries,
            size,
            tail: 0,
        })
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        self.bufs
            .ptr
            .as_ptr()
            .wrapping_add(usize::from(bid) * self.size as usize)
    }

    /// Hands buffer `bid` to the kernel.
    fn push(&mut self, bid: u16) {
        let base = self
            .ring
            .ptr
            .as_ptr()
            .cast::<io_uring::types::BufRingEntry>();
        let slot = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `slot < entries`, so the entry lies inside the ring mapping; the
        // kernel reads entries only up to the published tail, and this one is past it.
        let entry = unsafe { &mut *base.add(slot) };
        entry.set_addr(self.buf_ptr(bid) as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry of the ring mapping, which is
        // valid and aligned for a u16; the kernel reads it concurrently, hence atomic.
        let tail =
            unsafe { AtomicU16::from_ptr(io_uring::types::BufRingEntry::tail(base).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }
}

/// Everything but the receive parser, so the parser can pull bytes from it.
struct Core {
    // Declared first: dropped (closed) before any memory it may reference.
    ring: IoUring,
    /// Closed explicitly in `Drop`, after the kernel is done with it.
    stream: ManuallyDrop<TcpStream>,
    cfg: UringConfig,
    fixed: Vec<Fixed>,
    inflight: HashMap<u64, InFlight>,
    next_seq: u64,
    pending: VecDeque<squeue::Entry>,
    chain_left: u32,
    in_flight_bytes: usize,
    done: Vec<Completed>,
    send_error: Option<io::Error>,
    br: BufRing,
    chunks: VecDeque<(u16, u32, u32)>,
    armed: bool,
    eof: bool,
    recv_error: Option<io::Error>,
    /// A receive straight into destination memory, while the kernel has it.
    direct: Option<Box<Direct>>,
    /// Its result, once completed.
    direct_res: Option<i32>,
    /// Copied zero-copy notifications in a row ([`ZeroCopy::Auto`]).
    zc_copied_run: u32,
    /// Frames left to send without zero-copy ([`ZeroCopy::Auto`]).
    zc_pause: u32,
    /// Zero-copy sends allowed before their notifications have answered whether the
    /// kernel copies ([`ZeroCopy::Auto`]); `u32::MAX` once one came back in place.
    zc_budget: u32,
    stats: ChannelStats,
}

/// A channel over a TCP socket driven by io_uring.
///
/// Bound to the thread that created it (`IORING_SETUP_SINGLE_ISSUER`), so it is not
/// `Send`:
///
/// ```compile_fail
/// fn is_send<T: Send>() {}
/// is_send::<pagewire_transport::uring::UringChannel>();
/// ```
#[derive(Debug)]
pub struct UringChannel {
    core: Core,
    rx: RxState,
    negotiated: Negotiated,
    failed: bool,
}

impl UringChannel {
    /// Takes a connected socket after its handshake (`leftover`: bytes received after
    /// it), sets up the ring on the calling thread and registers the configured memory.
    ///
    /// # Errors
    /// [`UringError`].
    pub fn new(
        stream: TcpStream,
        negotiated: Negotiated,
        leftover: &[u8],
        cfg: &UringConfig,
    ) -> Result<Self, UringError> {
        let ring = build_ring(cfg)?;
        stream.set_nodelay(true).map_err(|source| UringError::Io {
            op: "setsockopt(TCP_NODELAY)",
            source,
        })?;
        let mut iovecs = Vec::new();
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
                iovecs.push(libc::iovec {
                    iov_base: ptr.wrapping_add(off).cast(),
                    iov_len: n,
                });
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
        if !iovecs.is_empty() {
            // SAFETY: each iovec covers memory owned by a GuestMemory or BufferPool
            // kept in `cfg`, which the channel holds (in `Core::cfg`) for as long as the
            // ring lives; the ring is dropped first.
            unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
                UringError::Register {
                    what: "guest memory and buffer pools",
                    source,
                }
            })?;
        }
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
            cfg: cfg.clone(),
            fixed,
            inflight: HashMap::new(),
            next_seq: 0,
            pending: VecDeque::new(),
            chain_left: 0,
            in_flight_bytes: 0,
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
            stats: ChannelStats::default(),
        };
        core.arm().map_err(|source| UringError::Io {
            op: "arming the multishot receive",
            source,
        })?;
        Ok(Self {
            core,
            rx: RxState::new(negotiated.limits(), leftover),
            negotiated,
            failed: false,
        })
    }

    /// Changes how long `recv` waits for bytes (`None`: for ever), e.g. to the time
    /// left before a deadline.
    pub fn set_recv_timeout(&mut self, timeout: Option<Duration>) {
        self.core.cfg.recv_timeout = timeout;
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

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("fd", &self.stream.as_raw_fd())
            .field("in_flight", &self.inflight.len())
            .field("in_flight_bytes", &self.in_flight_bytes)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Core {
    fn fixed_index(&self, p: &Payload) -> Option<u16> {
        let id = p.memory_id()?;
        let start = p.as_ptr() as usize;
        let end = start + p.len();
        self.fixed
            .iter()
            .position(|f| f.memory == id && f.base <= start && end <= f.base + f.len)
            .and_then(|i| u16::try_from(i).ok())
    }

    fn arm(&mut self) -> io::Result<()> {
        let e = opcode::RecvMulti::new(Fd(self.stream.as_raw_fd()), BGID)
            .build()
            .user_data(RECV_TAG);
        self.push_now(&e)?;
        self.armed = true;
        Ok(())
    }

    /// Pushes one entry outside the send chain (receive, cancel).
    fn push_now(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry references no memory (receive uses the registered
            // buffer ring; cancel carries no pointer).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Starts the next linked chain of queued sends when none is in the kernel.
    fn pump(&mut self) {
        if self.chain_left > 0 || self.pending.is_empty() {
            return;
        }
        let mut sq = self.ring.submission();
        let room = sq.capacity() - sq.len();
        let n = room.min(self.pending.len());
        for i in 0..n {
            let Some(mut e) = self.pending.pop_front() else {
                break;
            };
            if i + 1 < n {
                e = e.flags(squeue::Flags::IO_LINK);
            }
            // SAFETY: every queued send points into memory owned by its `InFlight`
            // entry (header vector, boxed msghdr and iovecs, payload slices holding
            // their regions), which stays
            // in `self.inflight` until all of its completions, notifications included,
            // have arrived. `room` guarantees the push succeeds.
            let pushed = unsafe { sq.push(&e) };
            debug_assert!(pushed.is_ok());
        }
        self.chain_left = n as u32;
    }

    /// Enters the kernel: submits, runs deferred work, waits for `want` completions at
    /// most `timeout` long. Returns `false` on timeout.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<bool, ChannelError> {
        let r = match timeout {
            Some(t) => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None if want == 0 => {
                let n = self.ring.submission().len();
                // SAFETY: the queued entries satisfy `pump`'s and `push_now`'s
                // invariants; no extra argument is passed.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        n as u32,
                        0,
                        io_uring::EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            None => self.ring.submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(ChannelError::io("io_uring_enter", e)),
        }
    }

    /// Handles every completion in the queue.
    fn reap(&mut self) -> Result<(), ChannelError> {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        for cqe in cqes {
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            match ud {
                RECV_TAG => self.on_recv(res, flags)?,
                CANCEL_TAG => {}
                DIRECT_TAG => self.direct_res = Some(res),
                seq => self.on_send(seq, res, flags)?,
            }
        }
        Ok(())
    }

    fn on_recv(&mut self, res: i32, flags: u32) -> Result<(), ChannelError> {
        if !cqueue::more(flags) {
            self.armed = false;
        }
        if res > 0 {
            let bid =
                cqueue::buffer_select(flags).ok_or(ChannelError::UnknownCompletion(RECV_TAG))?;
            if bid >= self.br.entries {
                return Err(ChannelError::UnknownCompletion(RECV_TAG));
            }
            self.chunks.push_back((bid, res as u32, 0));
        } else if res == 0 {
            self.eof = true;
        } else if res != -libc::ENOBUFS && res != -libc::ECANCELED {
            self.recv_error = Some(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }

    fn on_send(&mut self, seq: u64, res: i32, flags: u32) -> Result<(), ChannelError> {
        let f = self
            .inflight
            .get_mut(&seq)
            .ok_or(ChannelError::UnknownCompletion(seq))?;
        f.ops -= 1;
        if cqueue::notif(flags) {
            if res as u32 & NOTIF_USAGE_ZC_COPIED != 0 {
                f.copied += 1;
                self.zc_copied_run += 1;
                if self.zc_copied_run >= ZC_AUTO_COPIED {
                    self.zc_copied_run = 0;
                    self.zc_pause = ZC_AUTO_PAUSE;
                    self.zc_budget = ZC_AUTO_COPIED;
                }
            } else {
                f.zc += 1;
                self.zc_copied_run = 0;
                self.zc_budget = u32::MAX;
            }
        } else {
            self.chain_left = self.chain_left.saturating_sub(1);
            if cqueue::more(flags) {
                f.ops += 1;
            }
            if res < 0 && self.send_error.is_none() {
                self.send_error = Some(io::Error::from_raw_os_error(-res));
            }
        }
        if f.ops == 0
            && let Some(f) = self.inflight.remove(&seq)
        {
            self.in_flight_bytes -= f.bytes;
            self.stats.zc_sends += u64::from(f.zc);
            self.stats.zc_copied += u64::from(f.copied);
            self.done.push(Completed {
                id: f.id,
                payload: f.payload,
                zero_copy: (f.zc, f.copied),
            });
        }
        Ok(())
    }

    /// Waits until at most `limit` payload bytes are in flight; the send timeout runs
    /// from the last completion.
    fn wait_in_flight(&mut self, limit: usize) -> Result<(), ChannelError> {
        let timeout = self.cfg.send_timeout;
        let mut deadline = Instant::now() + timeout;
        while self.in_flight_bytes > limit || (limit == 0 && !self.inflight.is_empty()) {
            if self.send_error.is_some() {
                return Ok(());
            }
            self.pump();
            let before = self.done.len() + usize::from(self.chain_left > 0);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(timeout));
            }
            self.enter(1, Some(left))?;
            self.reap()?;
            if self.done.len() + usize::from(self.chain_left > 0) != before {
                deadline = Instant::now() + timeout;
            }
        }
        Ok(())
    }

    fn recycle(&mut self, bid: u16) {
        self.br.push(bid);
    }

    /// The front chunk's unread bytes, waiting for one if needed. `None` at EOF.
    /// The receive timeout runs from the call, whatever other completions (sends,
    /// notifications) arrive meanwhile.
    fn front(&mut self) -> Result<Option<(u16, u32, u32)>, ChannelError> {
        let deadline = self.cfg.recv_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(&c) = self.chunks.front() {
                return Ok(Some(c));
            }
            if self.eof {
                return Ok(None);
            }
            if let Some(e) = self.recv_error.take() {
                return Err(ChannelError::io("io_uring recv", e));
            }
            if !self.armed {
                self.arm()
                    .map_err(|e| ChannelError::io("io_uring recv", e))?;
            }
            self.pump();
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let timed_out = match left {
                Some(l) if l.is_zero() => {
                    self.enter(0, None)?;
                    self.ring.completion().is_empty()
                }
                _ => !self.enter(1, left)? && self.ring.completion().is_empty(),
            };
            if timed_out {
                return Err(ChannelError::RecvTimeout(
                    self.cfg.recv_timeout.unwrap_or_default(),
                ));
            }
            self.reap()?;
        }
    }

    fn consume(&mut self, n: u32) {
        if let Some(c) = self.chunks.front_mut() {
            c.2 += n;
            if c.2 == c.1 {
                let bid = c.0;
                self.chunks.pop_front();
                self.recycle(bid);
            }
        }
    }
}

/// A `recvmsg` into destination memory: the header and `iovec`s the kernel reads,
/// and the slices that keep the memory mapped.
/// Raw libc types, not nix's: the iovecs cover guest memory, not Rust slices.
struct Direct {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
    _dst: Vec<GuestSlice>,
}

impl Core {
    /// Receives payload bytes straight into `dst` (from byte `skip`): stops the
    /// multishot receive so it takes no more of the stream, then `recvmsg` with
    /// `MSG_WAITALL` into the destination. `None` when bytes arrived through the ring
    /// meanwhile (they come first, by copy).
    fn recv_direct(
        &mut self,
        dst: &[GuestSlice],
        skip: usize,
    ) -> Result<Option<usize>, ChannelError> {
        let timeout = self.cfg.recv_timeout;
        if self.armed {
            let cancel = opcode::AsyncCancel::new(RECV_TAG)
                .build()
                .user_data(CANCEL_TAG);
            self.push_now(&cancel)
                .map_err(|e| ChannelError::io("io_uring cancel", e))?;
            while self.armed {
                if !self.enter(1, timeout)? && self.ring.completion().is_empty() {
                    return Err(ChannelError::RecvTimeout(timeout.unwrap_or_default()));
                }
                self.reap()?;
            }
        }
        if !self.chunks.is_empty() || self.eof || self.recv_error.is_some() {
            return Ok(None);
        }
        let mut d = Box::new(Direct {
            // SAFETY: a zeroed msghdr is valid (no name, no control data).
            msg: unsafe { std::mem::zeroed() },
            iov: guest_iovecs(dst, skip, 1024),
            _dst: dst.to_vec(),
        });
        d.msg.msg_iov = d.iov.as_mut_ptr();
        d.msg.msg_iovlen = d.iov.len();
        let e = opcode::RecvMsg::new(Fd(self.stream.as_raw_fd()), &raw mut d.msg)
            .flags(libc::MSG_WAITALL as u32)
            .build()
            .user_data(DIRECT_TAG);
        self.direct_res = None;
        loop {
            // SAFETY: the msghdr, its iovecs and the destination memory they point at
            // live in the box (which holds the guest slices), kept in `self.direct`
            // until the completion arrives (or leaked by `Drop` if it never does);
            // destination pages are not accessed by anyone else while placed.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                break;
            }
            self.ring
                .submit()
                .map_err(|e| ChannelError::io("io_uring_enter", e))?;
        }
        self.direct = Some(d);
        loop {
            if let Some(res) = self.direct_res.take() {
                self.direct = None;
                return match res {
                    r if r >= 0 => Ok(Some(r as usize)),
                    r => Err(ChannelError::io(
                        "io_uring recvmsg",
                        io::Error::from_raw_os_error(-r),
                    )),
                };
            }
            if !self.enter(1, timeout)? && self.ring.completion().is_empty() {
                // Leave the receive with the kernel; `Drop` cancels and waits for it.
                return Err(ChannelError::RecvTimeout(timeout.unwrap_or_default()));
            }
            self.reap()?;
        }
    }
}

impl ByteSource for Core {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        let Some((bid, len, off)) = self.front()? else {
            return Ok(0);
        };
        let n = dst.len().min((len - off) as usize);
        // SAFETY: the kernel wrote `len` bytes into buffer `bid` and handed it over in a
        // completion; it is not given back to the kernel until consumed, so reading
        // `off..off + n` (within `len`) races with nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.br.buf_ptr(bid).add(off as usize),
                dst.as_mut_ptr(),
                n,
            );
        }
        self.consume(n as u32);
        Ok(n)
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        let want = dst.iter().map(GuestSlice::len).sum::<usize>() - skip;
        if self.chunks.is_empty()
            && want >= DIRECT_MIN
            && !self.eof
            && self.recv_error.is_none()
            && let Some(n) = self.recv_direct(dst, skip)?
        {
            return Ok(n);
        }
        let Some((bid, len, off)) = self.front()? else {
            return Ok(0);
        };
        let total: usize = dst.iter().map(GuestSlice::len).sum();
        let n = total.saturating_sub(skip).min((len - off) as usize);
        // SAFETY: as in `read`: bytes `off..off + n` of buffer `bid` are ours to read.
        let src = unsafe { std::slice::from_raw_parts(self.br.buf_ptr(bid).add(off as usize), n) };
        copy_to_guest(dst, skip, src);
        self.consume(n as u32);
        Ok(n)
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
        let core = &mut self.core;
        let seq = core.next_seq;
        core.next_seq += 1;
        let id = SendId(seq);
        let fd = Fd(core.stream.as_raw_fd());
        let wait_all = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        let payload_bytes = len - frame.header.len();
        let more = if payload_bytes > 0 { libc::MSG_MORE } else { 0 };
        let mut ops = 0;
        let use_zc = payload_bytes > 0
            && match core.cfg.zero_copy {
                ZeroCopy::Always => true,
                ZeroCopy::Never => false,
                ZeroCopy::Auto => core.zc_pause == 0 && core.zc_budget > 0,
            };
        let used_zc = use_zc;
        let mut msg = None;
        let slices = frame.payload.iter().filter(|p| !p.is_empty()).count();
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
        core.inflight.insert(
            seq,
            InFlight {
                id,
                _header: frame.header,
                _msg: msg,
                payload: frame.payload,
                ops,
                zc: 0,
                copied: 0,
                bytes: payload_bytes,
            },
        );
        core.in_flight_bytes += payload_bytes;
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
        match self.core.stream.shutdown(std::net::Shutdown::Write) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(ChannelError::io("shutdown", e)),
        }
    }
}

impl Core {
    fn on_send_empty(&mut self, seq: u64) {
        if let Some(f) = self.inflight.remove(&seq) {
            self.in_flight_bytes -= f.bytes;
            self.done.push(Completed {
                id: f.id,
                payload: f.payload,
                zero_copy: (0, 0),
            });
        }
    }
}

impl Core {
    /// Whether a direct receive is with the kernel.
    fn direct_pending(&self) -> bool {
        self.direct.is_some() && self.direct_res.is_none()
    }

    /// Forgets the sends never handed to the kernel, so their frames complete.
    fn drop_pending(&mut self) {
        for e in std::mem::take(&mut self.pending) {
            let seq = e.get_user_data();
            if let Some(f) = self.inflight.get_mut(&seq) {
                f.ops -= 1;
                if f.ops == 0 {
                    self.on_send_empty(seq);
                }
            }
        }
    }

    /// Waits for outstanding completions until `deadline`; `true` when none is left.
    fn drain(&mut self, deadline: Instant) -> bool {
        while !self.inflight.is_empty() || self.armed || self.direct_pending() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || self
                    .enter(1, Some(left.min(Duration::from_millis(100))))
                    .is_err()
                || self.reap().is_err()
            {
                return false;
            }
        }
        true
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // Nothing queued may start now; cancel what the kernel has.
        self.drop_pending();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        let _ = self.push_now(&cancel);
        let drained = self.drain(Instant::now() + Duration::from_millis(500));
        if !drained {
            // Zero-copy notifications wait for the socket's send queue, which a peer
            // that reads nothing never empties: reset the connection to free it.
            let _ = socket2::SockRef::from(&*self.stream).set_linger(Some(Duration::ZERO));
        }
        // SAFETY: `stream` is taken exactly once, here, and not used afterwards.
        drop(unsafe { ManuallyDrop::take(&mut self.stream) });
        if !drained && !self.drain(Instant::now() + Duration::from_secs(5)) {
            // Memory the kernel may still reference must outlive it: leak it.
            if let Some(d) = self.direct.take() {
                std::mem::forget(d);
            }
            for (_, f) in self.inflight.drain() {
                std::mem::forget(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_say_what_to_do() {
        let e = classify_setup_error(io::Error::from_raw_os_error(libc::EPERM), Some(2));
        assert!(matches!(e, UringError::Disabled(2)));
        assert!(e.to_string().contains("io_uring_disabled"));
        assert!(e.to_string().contains("tcp transport"));
        let e = classify_setup_error(io::Error::from_raw_os_error(libc::EPERM), Some(0));
        assert!(matches!(e, UringError::Blocked(_)));
        assert!(e.to_string().contains("seccomp"));
        let e = classify_setup_error(io::Error::from_raw_os_error(libc::ENOSYS), None);
        assert!(matches!(e, UringError::NotSupported { .. }));
        let e = classify_setup_error(io::Error::from_raw_os_error(libc::EINVAL), Some(0));
        assert!(e.to_string().contains("6.1"));
    }

    #[test]
    fn bad_configuration_is_refused() {
        let cfg = UringConfig {
            recv_buffers: 3,
            ..UringConfig::default()
        };
        assert!(matches!(probe(&cfg), Err(UringError::Config(_))));
    }
}
