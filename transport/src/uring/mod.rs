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
//!   [`UringConfig`] are registered once as fixed buffers (in pieces of at most 1 GiB):
//!   when the channel opens with [`ZeroCopy::Always`]; with [`ZeroCopy::Auto`] only
//!   once a zero-copy send went in place, since registering pins, and so faults in,
//!   every page of the memory (about 30-60 ms per GiB here, and all of a sparse
//!   guest's memory), which a link that always copies (loopback, veth, a Unix socket)
//!   never repays; never with [`ZeroCopy::Never`]. If the kernel refuses a deferred
//!   registration (`RLIMIT_MEMLOCK`), the sends stay zero-copy from unregistered
//!   memory ([`ChannelStats::register_failures`]). Once registered, a payload slice
//!   inside that memory is sent with `IORING_OP_SEND_ZC` and
//!   `IORING_RECVSEND_FIXED_BUF`; any other slice with `SEND_ZC` on unregistered
//!   memory (the kernel pins it per send). The header goes
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
//! - **Unix sockets**: a channel over a Unix stream socket ([`Stream::Unix`]) works the
//!   same way, but the kernel cannot send on it in place (it refuses `SEND_ZC`): a
//!   payload the policy would send zero-copy goes by plain send instead and is counted
//!   as a copied zero-copy send ([`Completed::zero_copy`], `ChannelStats::zc_copied`),
//!   exactly as a copied notification over loopback, so [`ZeroCopy::Auto`] pauses
//!   after [`ZC_AUTO_COPIED`] of them.
//! - **Backpressure**: `send` queues and returns at once while the payload bytes owned
//!   by the channel are under `max_in_flight_bytes`; above that it waits for
//!   completions and fails with [`ChannelError::SendTimeout`](crate::ChannelError::SendTimeout) when none comes within
//!   `send_timeout`. Behind a backlog (more than [`COPY_FROM`] in flight), a frame
//!   whose payload is all buffers is copied and completes at once, up to
//!   [`UringConfig::copy_backlog`] of copies: its buffer goes back to the codec's pool,
//!   so the sender runs ahead of a slow link by more than its pool holds.
//! - **Receive**: one multishot `IORING_OP_RECV` fills buffers of a provided-buffer
//!   ring (`IORING_REGISTER_PBUF_RING`); each buffer goes back to the ring as soon as
//!   its bytes are consumed, and the receive is re-armed when it ends (ring empty).
//!   Frames are parsed from those buffers. With a [`PageSink`](crate::PageSink), a raw page payload
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
//! - **TLS** (`crate::tls`): a frame is sealed into one buffer of records, sent with
//!   one `SENDMSG` (never `SEND_ZC`: the records buffer is not registered, and loopback
//!   copies anyway) and kept until it completes; the frame's payload slices are handed
//!   back then, and the records buffer is kept (up to 4 of at most 2 MiB each) to seal
//!   a later frame into, so a steady stream of frames allocates no new buffers.
//!   Received records are copied from the provided-buffer ring into the session's
//!   buffer and opened there; raw pages are placed from the opened records (no direct
//!   receive into destination memory: ciphertext must be authenticated before a byte
//!   is placed).
//! - **Drop**: cancels what is in the kernel, shuts the socket and waits (bounded) for
//!   every completion; memory the kernel still holds after that is leaked, never freed.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue};
use pagewire_protocol::Negotiated;

use crate::buf::{BufferPool, GuestMemory, GuestSlice, Mapping, Payload};
use crate::channel::{ChannelStats, Completed, SendId};
use crate::endpoint::Stream;
use crate::recv::RxState;

mod channel;
mod recv;
mod ring;

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
/// TLS: how many records buffers whose sends completed a channel keeps for later
/// frames (more frames in flight than this allocate).
const SPARE_RECORD_BUFFERS: usize = 4;
/// TLS: a records buffer larger than this is freed rather than kept (a rare large
/// frame does not pin its memory).
const MAX_SPARE_RECORD_BUFFER: usize = 2 << 20;
/// What a channel holds in flight before it copies buffer payloads (see
/// [`UringConfig::copy_backlog`]): about the socket's buffer, 30 ms at 1 Gbit/s.
pub const COPY_FROM: usize = 2 << 20;
const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// Settings of an io_uring channel.
#[derive(Clone, Debug)]
pub struct UringConfig {
    /// Submission queue entries, 1 to 16384 (the completion queue has four times as
    /// many, at most the kernel's 65536).
    pub entries: u32,
    /// Payload bytes the channel may own before `send` waits.
    pub max_in_flight_bytes: usize,
    /// Behind a backlog (more than [`COPY_FROM`] bytes in flight), a frame whose
    /// payload is all buffers (no guest pages) is copied into memory of the channel
    /// and completes at once, so its buffer goes back to its pool while the link is
    /// what limits; at most this many bytes of such copies at a time (0: never). The
    /// codec's pool otherwise bounds what a channel can send ahead of a slow link (32
    /// compressed frames, about 70 ms at 1 Gbit/s), and stretches where the cores
    /// limit leave the link idle. Not inside TLS (the sealed records are a copy
    /// already).
    pub copy_backlog: usize,
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
    /// Guest memory to register as fixed buffers (when, see the module docs).
    pub guest: Vec<GuestMemory>,
    /// Buffer pools to register as fixed buffers (with `guest`).
    pub pools: Vec<BufferPool>,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            entries: 256,
            max_in_flight_bytes: 64 << 20,
            copy_backlog: 16 << 20,
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
        "io_uring_setup was refused ({0}): a seccomp filter or container policy blocks io_uring; allow it or use the tcp transport"
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
        "registering {what} with io_uring failed ({source}); if ENOMEM, raise RLIMIT_MEMLOCK (ulimit -l) or register less memory"
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
    #[error("{op} failed: {source}")]
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
    // The completion queue has four times the entries, at most the kernel's 65536
    // (more fails the setup with EINVAL, which would read as an old kernel).
    if cfg.entries == 0
        || cfg.entries > 16384
        || !cfg.recv_buffers.is_power_of_two()
        || cfg.recv_buffers > 32768
        || cfg.recv_buffer_size == 0
    {
        return Err(UringError::Config(
            "entries must be in 1..=16384, recv_buffers a power of two up to 32768 and recv_buffer_size more than 0",
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
/// The trial ring is set up and closed on a thread of its own: closing a ring sends
/// task work to the thread that set it up, and that interrupts the thread's next
/// blocking socket call that has a timeout (`EINTR` without any signal), which the
/// caller of a probe, about to open its channels, should not see.
///
/// # Errors
/// [`UringError`] saying what is missing.
pub fn probe(cfg: &UringConfig) -> Result<(), UringError> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("pagewire-uring-probe".into())
            .spawn_scoped(s, || build_ring(cfg).map(drop))
            .map_err(|source| UringError::Io {
                op: "spawning the probe's thread",
                source,
            })?
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A piece of memory to register as a fixed buffer.
#[derive(Debug)]
struct Fixed {
    memory: u64,
    base: usize,
    len: usize,
}

/// Whether [`Core::fixed`] is registered with the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FixedState {
    /// Nothing to register, or [`ZeroCopy::Never`].
    Never,
    /// [`ZeroCopy::Auto`] until a zero-copy send goes in place: pinning the memory
    /// costs time at open (about 30-60 ms per GiB here) and faults in every page of
    /// it, which a link that copies (loopback, veth, a Unix socket) never repays.
    Deferred,
    /// Registered: payloads inside it are sent with `IORING_RECVSEND_FIXED_BUF`.
    Registered,
    /// Registering failed (e.g. `RLIMIT_MEMLOCK`); sends stay zero-copy from
    /// unregistered memory.
    Failed,
}

/// One frame in the kernel.
#[derive(Debug)]
struct InFlight {
    id: SendId,
    /// Kept alive for the header send (with TLS: the sealed records).
    header: Vec<u8>,
    /// `header` holds sealed records: recycled once the send completed.
    sealed: bool,
    /// Kept alive for a vectored send of the whole frame.
    _msg: Option<Box<MsgHdr>>,
    payload: Vec<Payload>,
    /// Completions still expected: one per send, one per announced notification.
    ops: u32,
    zc: u32,
    copied: u32,
    bytes: usize,
    /// Its payload is a copy and its frame completed when sent (`copy_backlog`): no
    /// completion is due when the kernel is done with it.
    early: bool,
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

/// Everything but the receive parser, so the parser can pull bytes from it.
struct Core {
    // Declared first: dropped (closed) before any memory it may reference.
    ring: IoUring,
    /// Closed explicitly in `Drop`, after the kernel is done with it.
    stream: ManuallyDrop<Stream>,
    /// Whether the socket can send in place (`SEND_ZC`): TCP can, a Unix socket
    /// cannot (the kernel refuses `SEND_ZC` on it).
    zc_capable: bool,
    cfg: UringConfig,
    fixed: Vec<Fixed>,
    fixed_state: FixedState,
    inflight: HashMap<u64, InFlight>,
    next_seq: u64,
    pending: VecDeque<squeue::Entry>,
    chain_left: u32,
    in_flight_bytes: usize,
    /// Bytes of in-flight frames whose payload is a copy (`copy_backlog`).
    copied_bytes: usize,
    /// Bytes queued on the ring that no send has handed to the socket yet: with the
    /// socket's own queue, what the channel holds unacknowledged.
    unsent_bytes: u64,
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
    /// TLS: records buffers whose sends completed, to seal the next frames into.
    spare_records: Vec<Vec<u8>>,
    stats: ChannelStats,
    /// What ends a wait for sends early ([`UringChannel::set_interrupt`]).
    interrupt: Option<crate::Interrupt>,
}

/// A channel over a TCP or Unix stream socket driven by io_uring.
///
/// Bound to the thread that created it (`IORING_SETUP_SINGLE_ISSUER`), so it is not
/// `Send`:
///
/// ```compile_fail
/// fn is_send<T: Send>() {}
/// is_send::<pagewire_transport::uring::UringChannel>();
/// ```
///
/// Dropping it closes its ring, which queues task work for this thread: the thread's
/// next blocking socket call that has a timeout may fail with `EINTR` (no signal is
/// involved), to be retried. pagewire's own blocking reads retry it.
#[derive(Debug)]
pub struct UringChannel {
    core: Core,
    rx: RxState,
    negotiated: Negotiated,
    failed: bool,
    tls: Option<Box<crate::tls::TlsSession>>,
    /// When `recv` must have returned by ([`UringChannel::set_recv_deadline`]).
    deadline: Option<(std::time::Instant, Duration)>,
    /// When the frame being received must have arrived whole by
    /// ([`UringChannel::set_frame_timeout`]).
    frame: crate::recv::FrameClock,
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

/// A `recvmsg` into destination memory: the header and `iovec`s the kernel reads,
/// and the slices that keep the memory mapped.
/// Raw libc types, not nix's: the iovecs cover guest memory, not Rust slices.
struct Direct {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
    _dst: Vec<GuestSlice>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_too_large_for_the_kernel_is_a_setting_not_an_old_kernel() {
        // 20000 entries ask for a completion queue of 80000, past the kernel's 65536:
        // `io_uring_setup` says EINVAL, which read as a kernel without DEFER_TASKRUN
        // (and made a channel that may fall back use TCP without a word).
        for (entries, recv_buffer_size) in [(20000, 8192), (0, 8192), (64, 0)] {
            let cfg = UringConfig {
                entries,
                recv_buffer_size,
                ..UringConfig::default()
            };
            assert!(
                matches!(probe(&cfg), Err(UringError::Config(_))),
                "{entries} {recv_buffer_size}"
            );
        }
    }

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
    fn auto_registers_the_memory_once_a_send_went_in_place() {
        // Loopback never sends in place; the notification that would is fed by hand.
        if let Err(e) = probe(&UringConfig::default()) {
            assert!(
                std::env::var("PAGEWIRE_REQUIRE_URING").as_deref() != Ok("1"),
                "PAGEWIRE_REQUIRE_URING=1 but io_uring is unavailable: {e}"
            );
            eprintln!("skipped: io_uring unavailable: {e}");
            return;
        }
        let mem = GuestMemory::anonymous(2 << 20).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        let negotiated = Negotiated {
            version: pagewire_protocol::limits::VERSION_6,
            session: pagewire_protocol::SessionId([1; 16]),
            channel: pagewire_protocol::ChannelId(0),
            channel_count: 1,
            page_size: 4096,
            max_pages: 64,
            max_frame_bytes: 1 << 20,
            codecs: pagewire_protocol::CodecSet::all_known(),
            checksum: None,
            auth: None,
        };
        let cfg = UringConfig {
            guest: vec![mem.clone()],
            ..UringConfig::default()
        };
        let mut ch = UringChannel::new(stream, negotiated, &[], &cfg).unwrap();
        let page = Payload::Guest(mem.slice(4096, 4096).unwrap());
        assert_eq!(ch.core.fixed_state, FixedState::Deferred);
        assert_eq!(ch.core.fixed_index(&page), None);
        // Copied notifications change nothing.
        ch.core.note_zc_usage(true);
        ch.core.register_when_due();
        assert_eq!(ch.core.fixed_state, FixedState::Deferred);
        // One in place: the next send registers, and guest slices go as fixed buffers.
        ch.core.note_zc_usage(false);
        ch.core.register_when_due();
        assert_eq!(ch.core.fixed_state, FixedState::Registered);
        assert_eq!(ch.core.fixed_index(&page), Some(0));
        assert_eq!(ch.core.stats.registered_bytes, 2 << 20);
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
