//! Settings of a migration, and the handle that changes them while it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use pagewire_accel::BackendChoice;
use pagewire_protocol::{Authentication, CodecId, DestinationLimits, SessionId};
use pagewire_transport::session::Backend;
use pagewire_transport::{Encryption, Interrupt};

use crate::error::MigrationError;
use crate::limit::RateLimiter;
use crate::precopy::PrecopyConfig;
use crate::source::adaptive::AdaptiveConfig;

/// How the source encodes data pages ([`SourceConfig::codec`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodecPolicy {
    /// Every frame with `codec` at `level` (zstd: -7..=22, deflate: 1..=12, clamped
    /// into the range; ignored by the codecs without levels). `raw` sends pages as
    /// they are. The destination must decode it, or the migration fails at set-up.
    Fixed {
        /// The codec.
        codec: CodecId,
        /// Its level.
        level: i32,
    },
    /// Per frame, the candidate that moves the most guest bytes per second, from the
    /// measured link rate, each candidate's measured speed and ratio on recent frames,
    /// the machine's idle CPU and the receiver's window (`--codec auto`; the rules are
    /// in the documentation of [`AdaptiveConfig`]'s module). Candidates the destination
    /// cannot decode are left out.
    Auto(AdaptiveConfig),
}

impl CodecPolicy {
    /// `codec` at `level` on every frame.
    pub fn fixed(codec: CodecId, level: i32) -> Self {
        Self::Fixed { codec, level }
    }

    /// The adaptive choice over [`AdaptiveConfig::default`]'s candidates.
    pub fn auto() -> Self {
        Self::Auto(AdaptiveConfig::default())
    }

    /// The adaptive choice over [`AdaptiveConfig::default`]'s candidates and delta
    /// for cached pages ([`AdaptiveConfig::with_delta`]; `--codec auto+delta`).
    pub fn auto_with_delta() -> Self {
        Self::Auto(AdaptiveConfig::default().with_delta())
    }

    /// The fixed codec, or `None` for the adaptive choice.
    pub fn fixed_codec(&self) -> Option<CodecId> {
        match self {
            Self::Fixed { codec, .. } => Some(*codec),
            Self::Auto(_) => None,
        }
    }

    /// The name [`crate::MigrationStats::codec`] reports: the fixed codec's, `auto`,
    /// or `auto+delta` (delta among the candidates).
    pub(crate) fn label(&self) -> String {
        match self {
            Self::Fixed { codec, .. } => format!("{codec:?}"),
            Self::Auto(a) if a.has_delta() => "auto+delta".into(),
            Self::Auto(_) => "auto".into(),
        }
    }
}

impl From<CodecId> for CodecPolicy {
    /// `codec` at level 1 (zstd's and deflate's fastest entropy-coded level) on every
    /// frame.
    fn from(codec: CodecId) -> Self {
        Self::fixed(codec, 1)
    }
}

/// Source settings.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Session id, the same the destination expects.
    pub session: SessionId,
    /// Channels to open.
    pub channels: u16,
    /// How data pages are encoded: per frame by the adaptive choice
    /// ([`CodecPolicy::Auto`], the default), or every frame with one codec at one level
    /// ([`CodecPolicy::Fixed`]).
    pub codec: CodecPolicy,
    /// Most pages per frame.
    pub max_pages: u32,
    /// Transport backend. `Backend::Rdma { addr }` (feature `rdma`) moves each
    /// channel to an RDMA queue pair connected to the destination's RDMA address
    /// `addr` after its stream handshake; without the feature or a device the
    /// connection fails with an error saying which.
    pub backend: Backend,
    /// Authentication; there is no default.
    pub auth: Authentication,
    /// TLS 1.3 around every channel ([`Encryption::Tls`], with this side's
    /// certificate and the destination's expected name), or
    /// [`Encryption::Plaintext`] (the default of [`Self::new`]): the destination must
    /// be configured alike, or it refuses the channels (`ENCRYPTION_REQUIRED`,
    /// `ENCRYPTION_UNSUPPORTED`).
    pub encryption: Encryption,
    /// Ask for CRC32C on every page frame (always asked with the delta codec, and with
    /// delta among the adaptive candidates).
    pub checksum: bool,
    /// Wire bandwidth cap in bytes/s (0 = none); changeable through [`Control`].
    pub bandwidth_limit: u64,
    /// Pre-copy policy (the downtime limit is changeable through [`Control`]).
    pub precopy: PrecopyConfig,
    /// Codec engine backend per channel: auto (an accelerator when one is usable,
    /// else software), software, IAA (kernel work queue, VFIO or the device model) or
    /// QAT. Jobs a hardware backend gives up on run on software, counted in
    /// [`EngineSummary::hw_fallbacks`](crate::stats::EngineSummary::hw_fallbacks).
    pub accel: BackendChoice,
    /// Codec worker threads per channel; `Some(0)` compresses on the channel's own
    /// thread. `None` (the default) chooses from the machine: see
    /// [`codec_threads_for`].
    pub codec_threads: Option<usize>,
    /// Frames in flight in the codec engine per channel.
    pub queue_depth: usize,
    /// Pages kept by the sender's delta cache per channel (the delta codec, or delta
    /// among the adaptive candidates: [`AdaptiveConfig::with_delta`]). Its page memory
    /// is allocated as pages are kept, 1 MiB at a time.
    pub delta_cache_pages: usize,
    /// Send a data page equal to one its channel already sent, and unchanged since, as a
    /// COPY reference to it instead of its bytes (PROTOCOL.md, COPY). Content is
    /// compared by a hash keyed with a secret of this source (AES-128 of the page's
    /// POLYVAL, `source/pagehash.rs`), over a copy of the
    /// pages that the codec then encodes. Only frames whose codec compresses: raw pages
    /// go out without a copy; and only with the software codec engine (a hardware
    /// engine reads guest memory by DMA, not the copy). Costs per data page a copy and
    /// a hash, and per channel 4 bytes per guest page it carries and a table of at most
    /// 32 MiB. Default: on.
    pub dedup: bool,
    /// How long to wait for the destination's acknowledgement of a round (or of
    /// COMPLETE) once every frame of it was handed over; one deadline for the whole
    /// wait, however many frames arrive meanwhile.
    pub ack_timeout: Duration,
    /// How long a channel may go without the peer taking a whole frame (a send
    /// completing) before the destination counts as gone; also bounds waits for the
    /// codec engine (a free buffer, a finished job).
    pub send_timeout: Duration,
    /// Bytes each TCP channel may queue in user space beyond what its socket takes
    /// before a send waits (`TcpConfig::send_queue`; frames outside TLS): on a link
    /// slower than the cores, the channel goes on encoding while the link drains what
    /// it encoded before. 0: a send waits as soon as the socket is full. Default:
    /// 16 MiB ([`pagewire_transport::tcp::DEFAULT_SEND_QUEUE`]).
    pub send_queue: usize,
    /// Time allowed for one TCP connection attempt.
    pub connect_timeout: Duration,
    /// Connection attempts per channel (at least 1).
    pub connect_attempts: u32,
    /// Pause between connection attempts.
    pub connect_retry_delay: Duration,
    /// Time allowed for one channel's handshake.
    pub handshake_timeout: Duration,
    /// How long a channel waiting for its next command (the VMM's dirty-log sync, its
    /// round callback, its device state, a pause) goes without sending before it
    /// sends an empty extension frame (type `0xFF`, to which pagewire gives no
    /// meaning), so that the destination's idle timeout does not take a source that
    /// is only slow for a dead one (PROTOCOL.md, "Idle timeout" and END_OF_ROUND).
    /// Until COMPLETE: channels then wait for the switchover without sending. Keep it
    /// well under the destination's idle timeout (pagewire's default there is 60 s).
    /// Default 5 s; `Duration::MAX`: never.
    pub keepalive: Duration,
}

impl SourceConfig {
    /// Defaults: 2 channels, the adaptive codec choice over its default candidates
    /// ([`CodecPolicy::auto`]), 128 pages per frame, TCP, no checksum, no bandwidth
    /// cap, 300 ms downtime.
    pub fn new(session: SessionId, auth: Authentication) -> Self {
        Self {
            session,
            channels: 2,
            codec: CodecPolicy::auto(),
            max_pages: 128,
            backend: Backend::Tcp,
            auth,
            encryption: Encryption::Plaintext,
            checksum: false,
            bandwidth_limit: 0,
            precopy: PrecopyConfig::default(),
            accel: BackendChoice::Auto,
            codec_threads: None,
            queue_depth: 16,
            delta_cache_pages: 64 * 1024,
            dedup: true,
            ack_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            send_queue: pagewire_transport::tcp::DEFAULT_SEND_QUEUE,
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 5,
            connect_retry_delay: Duration::from_millis(200),
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(5),
        }
    }

    /// Checks the settings; [`Source::connect`](crate::Source::connect) calls it.
    ///
    /// # Errors
    /// [`MigrationError::Config`] naming the first unusable setting: no channel, a
    /// zero timeout or attempt count, a frame size out of `1..=65536` pages, a queue
    /// depth out of `1..=`[`MAX_QUEUE_DEPTH`], more than [`MAX_CODEC_THREADS`] codec
    /// threads, a delta cache over [`MAX_DELTA_CACHE_PAGES`] pages (or of none with
    /// delta among the codecs), a send
    /// queue over [`MAX_SEND_QUEUE`], or `precopy.max_rounds` of 0. Timeouts may be as
    /// long as `Duration::MAX` (no deadline in practice).
    pub fn validate(&self) -> Result<(), MigrationError> {
        let bad = |what: &str| Err(MigrationError::Config(what.into()));
        if self.channels == 0 {
            return bad("at least one channel");
        }
        if self.max_pages == 0 || self.max_pages > MAX_PAGES_PER_FRAME {
            return bad("max_pages must be in 1..=65536");
        }
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return bad("queue_depth must be in 1..=1024");
        }
        if self.codec_threads.is_some_and(|n| n > MAX_CODEC_THREADS) {
            return bad("codec_threads must be at most 256");
        }
        let delta = self.codec.fixed_codec() == Some(CodecId::DELTA)
            || matches!(&self.codec, CodecPolicy::Auto(a) if a.has_delta());
        if self.delta_cache_pages > MAX_DELTA_CACHE_PAGES || (delta && self.delta_cache_pages == 0)
        {
            return bad("delta_cache_pages must be in 1..=2^24 (with delta)");
        }
        if self.send_queue > MAX_SEND_QUEUE {
            return bad("send_queue must be at most 1 GiB");
        }
        if self.precopy.max_rounds == 0 {
            return bad(
                "precopy.max_rounds must be at least 1 (round 0, the first pass over memory, runs with the guest running)",
            );
        }
        if self.connect_attempts == 0 {
            return bad("connect_attempts must be at least 1");
        }
        nonzero([
            ("ack_timeout", self.ack_timeout),
            ("send_timeout", self.send_timeout),
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("keepalive", self.keepalive),
        ])
    }
}

/// Destination settings.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct DestinationConfig {
    /// The session accepted.
    pub session: SessionId,
    /// Authentication; there is no default.
    pub auth: Authentication,
    /// TLS 1.3 around every channel, or [`Encryption::Plaintext`] (the default of
    /// [`Self::new`]); a listener takes it from the configuration it is bound with.
    pub encryption: Encryption,
    /// Transfer page size.
    pub page_size: u32,
    /// Most pages per frame this side accepts.
    pub max_pages: u32,
    /// Accept CRC32C if the source asks.
    pub checksum: bool,
    /// Transport backend for the accepted channels. `Backend::Rdma { addr }` (feature
    /// `rdma`) listens for RDMA connections at `addr` from the moment the listener is
    /// bound (binding fails without the feature or a device) and needs the guest
    /// memory given to `accept` (`DestinationMemory::Given`), registered once per
    /// session; pages are pulled with RDMA READ after the rules are checked.
    pub backend: Backend,
    /// Codec engine backend that decodes pages into guest memory: software (the
    /// default: the receiver threads' own codecs), auto (a usable accelerator, else
    /// software), or an IAA/QAT choice, which decodes the formats the hardware takes
    /// (IAA: deflate-4k, and deflate at 4 KiB pages) straight into guest pages; jobs
    /// the hardware gives up on run in software, counted in
    /// [`DestinationStats::hw_fallbacks`](crate::DestinationStats::hw_fallbacks).
    pub accel: BackendChoice,
    /// What the destination accepts from an authenticated source: guest memory,
    /// regions, channels, device-state sections and bytes. The destination never maps
    /// more guest memory than `limits.max_guest_bytes`, whatever LAYOUT says.
    pub limits: DestinationLimits,
    /// How long to wait for all channels to arrive.
    pub accept_timeout: Duration,
    /// How long one connection may take over its handshake, counted from its accept
    /// (a slow or silent peer is closed after this, whatever the accept window).
    pub handshake_timeout: Duration,
    /// Most connections whose handshake is in progress at once. While they are all
    /// taken, a new connection is accepted and read, then takes the place of one that
    /// has not named a session being accepted within [`Self::evict_after`] of its
    /// accept, or else that was not admitted within [`Self::evict_named_after`], or
    /// else that got less far than it (sent nothing; sent bytes short of a finished
    /// TLS handshake; finished one but named no session being accepted), or, when
    /// neither got past such first bytes, any that did not; when there is none it is
    /// closed. Only while every place is held by a connection that finished
    /// its TLS handshake or named a session being accepted do more wait in the
    /// kernel's backlog (the transport's `ListenerConfig` has the details).
    pub max_pending: usize,
    /// See [`Self::max_pending`]: an honest source's HELLO follows its connection at
    /// once (over TLS, after the TLS handshake), so this covers a round trip or two.
    /// `Duration::MAX`: never by age.
    pub evict_after: Duration,
    /// See [`Self::max_pending`]: covers an honest source's whole handshake (two round
    /// trips, three with TLS), and bounds how long a peer that knows the session id
    /// but not the key holds a place while others wait. `Duration::MAX`: never.
    pub evict_named_after: Duration,
    /// Most sessions accepted at once on one [`DestinationListener`]
    /// ([`DestinationListener::accept`]/[`DestinationListener::accept_with`] calls
    /// running together on different threads); taken when the listener is bound. At
    /// least 1.
    ///
    /// [`DestinationListener`]: crate::DestinationListener
    /// [`DestinationListener::accept`]: crate::DestinationListener::accept
    /// [`DestinationListener::accept_with`]: crate::DestinationListener::accept_with
    pub max_sessions: usize,
    /// How long a channel may stay silent before the source counts as gone; also how
    /// long a frame may take to arrive whole from its first byte (plus its length at
    /// `pagewire_transport::FRAME_MIN_RATE`, 128 KiB/s), and COMMIT from ACK COMPLETE
    /// (PROTOCOL.md, Idle timeout).
    pub idle_timeout: Duration,
    /// How the destination prepares the anonymous guest memory it maps itself (memory
    /// the VMM gives or provides is used as it is, never pre-faulted).
    pub prefault: Prefault,
    /// The VMM's check of the device state, run once every section has arrived and
    /// before the destination acknowledges COMPLETE: a VMM that could not restore what
    /// the source sent (another vCPU count, a section it does not know, one that does
    /// not decode) says so here, while the source still owns the guest. An `Err`
    /// fails the migration with [`MigrationError::DeviceStateRefused`] and ABORT
    /// `APPLY_FAILED`, and the source resumes its guest. Without a check (the default)
    /// the sections are the VMM's to check after COMMIT, when the guest is already this
    /// side's (PROTOCOL.md, COMPLETE).
    pub check_device_state: Option<DeviceStateCheck>,
}

/// A check of the device state before COMPLETE is acknowledged
/// ([`DestinationConfig::check_device_state`]).
#[derive(Clone)]
pub struct DeviceStateCheck(Arc<CheckFn>);

type CheckFn = dyn Fn(&[crate::DeviceSection]) -> Result<(), String> + Send + Sync;

impl DeviceStateCheck {
    /// `check` gets every section, in arrival order, and returns why it refuses them.
    pub fn new(
        check: impl Fn(&[crate::DeviceSection]) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(check))
    }

    /// Runs the check.
    pub(crate) fn check(&self, sections: &[crate::DeviceSection]) -> Result<(), String> {
        (self.0)(sections)
    }
}

impl std::fmt::Debug for DeviceStateCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceStateCheck(..)")
    }
}

/// How a destination prepares the anonymous guest memory it maps for the source's
/// layout. Measured with `pagewire-stress --prefault` (BENCHMARKS.md, "Destination
/// memory", "Destination memory on transparent huge pages, again" and "Huge pages
/// where frames are dense").
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefault {
    /// Nothing ahead: the receivers fault pages in as they write them, 4 KiB at a
    /// time. Zero pages on memory never written are not touched at all. The default
    /// until [`Prefault::HugeWhereDense`] took half its CPU on dense guests.
    None,
    /// A background thread populates every page (`MADV_POPULATE_WRITE`) while the
    /// first round arrives: it competes with the receivers for the cores. It stops
    /// once the receivers have ended (in [`Destination::wait`](crate::Destination::wait)
    /// or a drop), so it never lengthens the downtime: pages it had not reached yet
    /// are faulted in as the guest touches them.
    Thread,
    /// Transparent huge pages (`MADV_HUGEPAGE`) on the whole mapping: a fault backs 2
    /// MiB at once (where the kernel allows THP for `madvise`), no thread, whatever the
    /// rest of the block holds: one written page in a block of zero pages backs all of
    /// it (a guest with one page written per 2 MiB took 2 GiB of 2 GiB against 4 MiB,
    /// at 5x the destination CPU). Measured 3-4x slower than `None` on one machine
    /// (each fault zeroes and may compact 2 MiB) and half `None`'s destination CPU on
    /// another (BENCHMARKS.md, "Destination memory on transparent huge pages, again").
    HugePages,
    /// The default. Transparent huge pages only for the 2 MiB blocks that the first
    /// frame writing into each shows to be dense: a PAGES frame that writes at least
    /// 256 KiB there with at most an eighth of its span in the block zero pages, a COPY
    /// that writes at least 256 KiB and half its span; a frame that shows too little
    /// either way (a COPY of a few pages, a PAGES frame whose other pages went as
    /// copies) counts as dense unless more than an eighth of the blocks PAGES frames
    /// showed so far were sparse (more than an eighth zero pages). That block is advised
    /// `MADV_HUGEPAGE` just before the frame is written, so the write backs all of it
    /// in one fault; every other block is faulted in 4 KiB at a time as with `None`
    /// (the mapping is advised `MADV_NOHUGEPAGE` first, so this holds where THP is on
    /// for every mapping too), and pages never written stay unbacked. Where THP is off
    /// or its huge pages are not 2 MiB it behaves as `None`; where the kernel compacts
    /// memory for `madvise` faults (`defrag`), a fault on fragmented memory may wait
    /// for that. At most 1,024 advised blocks without an advised neighbour (each
    /// splits the mapping; a process has `vm.max_map_count` mappings), and none after
    /// the kernel refused one. How many blocks it advised:
    /// [`DestinationStats::huge_blocks`](crate::DestinationStats::huge_blocks). The
    /// advice outlives the migration: the memory handed over
    /// ([`Migrated::memory`](crate::Migrated::memory)) keeps `MADV_NOHUGEPAGE` outside
    /// the dense blocks, so neither a fault nor khugepaged backs a sparse guest's
    /// free memory with huge pages. A VMM that wants its guest on huge pages
    /// everywhere (and accepts what khugepaged may then back) calls
    /// [`GuestMemory::advise_huge_pages`](crate::GuestMemory::advise_huge_pages) on it.
    /// Measured in BENCHMARKS.md ("Huge pages where frames are dense").
    #[default]
    HugeWhereDense,
    /// Each receiver populates (`MADV_POPULATE_WRITE`) the data pages of a frame right
    /// before it writes them: one system call per frame instead of a fault per page.
    Ahead,
    /// The memory is registered with a userfaultfd (MISSING mode) and pages never
    /// written are installed with `UFFDIO_COPY`, a run of contiguous pages per call:
    /// the kernel allocates each page and copies into it, with no fault and no
    /// `clear_page` first. Raw frames are received whole and installed from the
    /// payload, compressed ones decoded into a scratch buffer and installed; pages
    /// already present are written in place as before. A handler thread resolves any
    /// other access to a missing page with zeros (frames a hardware decoder takes,
    /// [`DestinationConfig::accel`], are still decoded in place: their faults go to the
    /// handler, tested with the IAA device model only), and the memory is unregistered
    /// before the migration hands it over. Where userfaultfd is unavailable (no
    /// `CAP_SYS_PTRACE` and `vm.unprivileged_userfaultfd=0`, seccomp, an old kernel)
    /// the destination behaves as with `None` and says why in
    /// [`DestinationStats::install_unavailable`](crate::DestinationStats::install_unavailable).
    /// Measured in BENCHMARKS.md ("Destination memory: installing pages").
    Install,
}

impl DestinationConfig {
    /// Defaults: 4 KiB pages, 256 pages per frame, TCP, [`DestinationLimits`]' defaults
    /// (16 GiB of guest memory, 64 channels, 256 MiB of device state), 10 s per
    /// handshake, 64 pending handshakes (a new connection replaces one that named no
    /// session within 500 ms or was not admitted within 2 s), 8 sessions at once.
    pub fn new(session: SessionId, auth: Authentication) -> Self {
        Self {
            session,
            auth,
            encryption: Encryption::Plaintext,
            page_size: 4096,
            max_pages: 256,
            checksum: true,
            backend: Backend::Tcp,
            accel: BackendChoice::Software,
            limits: DestinationLimits::default(),
            accept_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_pending: 64,
            evict_after: Duration::from_millis(500),
            evict_named_after: Duration::from_secs(2),
            max_sessions: 8,
            idle_timeout: Duration::from_secs(60),
            prefault: Prefault::default(),
            check_device_state: None,
        }
    }

    /// Checks the settings; [`DestinationListener`](crate::DestinationListener) calls it
    /// when it is bound and for every accept.
    ///
    /// # Errors
    /// [`MigrationError::Config`] naming the first unusable setting: a page size that
    /// is not a power of two from 4 KiB to 2 MiB, a frame size out of `1..=65536`
    /// pages, a zero timeout (accept, handshake, idle), `max_pending` out of
    /// `1..=65536`, or no place for a session or a channel. Timeouts may be as long as
    /// `Duration::MAX` (no deadline in practice).
    pub fn validate(&self) -> Result<(), MigrationError> {
        let bad = |what: &str| Err(MigrationError::Config(what.into()));
        if !pagewire_protocol::limits::valid_page_size(self.page_size) {
            return bad("page_size must be a power of two from 4096 to 2 MiB");
        }
        if self.max_pages == 0 || self.max_pages > MAX_PAGES_PER_FRAME {
            return bad("max_pages must be in 1..=65536");
        }
        if self.max_pending == 0
            || self.max_pending > pagewire_transport::session::MAX_PENDING
            || self.max_sessions == 0
            || self.limits.max_channels == 0
        {
            return bad(
                "max_pending must be in 1..=65536, max_sessions and limits.max_channels at least 1",
            );
        }
        nonzero([
            ("accept_timeout", self.accept_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
        ])
    }
}

/// Most pages per frame either side may configure (the protocol's bound).
const MAX_PAGES_PER_FRAME: u32 = pagewire_protocol::limits::MAX_PAGES_PER_FRAME;

/// Most frames in flight in a source channel's codec engine
/// ([`SourceConfig::queue_depth`]): each holds two output buffers of a whole frame.
pub const MAX_QUEUE_DEPTH: usize = 1024;

/// Most codec worker threads per source channel ([`SourceConfig::codec_threads`]).
pub const MAX_CODEC_THREADS: usize = 256;

/// Most pages of a channel's delta cache ([`SourceConfig::delta_cache_pages`]): 64 GiB
/// of 4 KiB pages, whose index alone (allocated when the channel's engine is built)
/// takes a few hundred MiB.
pub const MAX_DELTA_CACHE_PAGES: usize = 1 << 24;

/// Most bytes a TCP channel may queue in user space ([`SourceConfig::send_queue`]).
pub const MAX_SEND_QUEUE: usize = 1 << 30;

/// `Err` naming the first of `timeouts` that is zero.
fn nonzero<const N: usize>(timeouts: [(&str, Duration); N]) -> Result<(), MigrationError> {
    match timeouts.iter().find(|(_, t)| t.is_zero()) {
        Some((name, _)) => Err(MigrationError::Config(format!(
            "{name} must be longer than zero"
        ))),
        None => Ok(()),
    }
}

/// Changes a running migration: bandwidth cap, downtime limit, cancellation. Cheap to
/// clone and usable from any thread.
#[derive(Clone, Debug)]
pub struct Control(Arc<ControlInner>);

#[derive(Debug)]
struct ControlInner {
    limiter: RateLimiter,
    downtime_ns: AtomicU64,
    /// [`CANCELLED`] and [`SEALED`].
    state: AtomicU8,
    /// Raised by a cancel before the seal: ends the channels' blocked sends.
    interrupt: Interrupt,
}

/// `Control::cancel` was called.
const CANCELLED: u8 = 1;
/// COMMIT is about to be sent (`Control::seal`): a cancel no longer interrupts.
const SEALED: u8 = 2;

impl Control {
    pub(crate) fn new(bandwidth: u64, downtime: Duration) -> Self {
        Self(Arc::new(ControlInner {
            limiter: RateLimiter::new(bandwidth),
            downtime_ns: AtomicU64::new(downtime.as_nanos() as u64),
            state: AtomicU8::new(0),
            interrupt: Interrupt::new(),
        }))
    }

    /// Sets the wire bandwidth cap, bytes/s (0 = none).
    pub fn set_bandwidth_limit(&self, bytes_per_s: u64) {
        self.0.limiter.set_rate(bytes_per_s);
    }

    /// Sets the downtime limit used by the next convergence decision.
    pub fn set_downtime_limit(&self, d: Duration) {
        self.0
            .downtime_ns
            .store(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The downtime limit in force.
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_nanos(self.0.downtime_ns.load(Ordering::Relaxed))
    }

    /// Asks the migration to stop; it fails with `Cancelled` at the next frame, or
    /// within a few tens of milliseconds while it waits for the bandwidth cap, for an
    /// acknowledgement (of a round, or of COMPLETE), for a link that does not drain
    /// (the adaptive codec's wait) or, over TCP, TLS and io_uring, for a socket that
    /// takes nothing (a send blocked on a destination that stopped reading; that
    /// channel is closed without an ABORT, the others try to send ABORT `CANCELLED`,
    /// which goes where a socket has room). RDMA's
    /// sends wait for their `send_timeout`. Once COMMIT was about to be sent it no
    /// longer can: the wait for ACK COMMITTED goes on.
    pub fn cancel(&self) {
        let before = self.0.state.fetch_or(CANCELLED, Ordering::AcqRel);
        if before & SEALED == 0 {
            self.0.interrupt.raise();
        }
    }

    /// Whether cancellation was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.state.load(Ordering::Acquire) & CANCELLED != 0
    }

    /// Whether a cancel came before the seal: then COMMIT is never sent, and a channel
    /// may tell the destination (one load, so it cannot race with [`Self::seal`]: if
    /// this sees a cancel unsealed, the seal sees the cancel).
    pub(crate) fn cancelled_unsealed(&self) -> bool {
        self.0.state.load(Ordering::Acquire) & (CANCELLED | SEALED) == CANCELLED
    }

    /// Called just before COMMIT is sent: from then on a cancel interrupts nothing.
    /// `false` when a cancel came first (COMMIT must not be sent).
    pub(crate) fn seal(&self) -> bool {
        self.0.state.fetch_or(SEALED, Ordering::AcqRel) & CANCELLED == 0
    }

    /// The flag the source's channels end their blocked sends on.
    pub(crate) fn interrupt(&self) -> &Interrupt {
        &self.0.interrupt
    }

    pub(crate) fn limiter(&self) -> &RateLimiter {
        &self.0.limiter
    }
}

/// Codec worker threads per channel for `channels` channels on this machine: enough
/// that the channels' own threads plus their codec threads cover every core the
/// process may use (`std::thread::available_parallelism`, which honours the CPU
/// affinity mask and a cgroup v2 CPU quota), and none when the channels alone already
/// do (each channel then compresses on its own thread, and more threads would only
/// take turns on the same cores).
pub fn codec_threads_for(channels: u16) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    threads_per_channel(cores, usize::from(channels.max(1)))
}

fn threads_per_channel(cores: usize, channels: usize) -> usize {
    cores.saturating_sub(channels).div_ceil(channels)
}

#[cfg(test)]
mod control_tests {
    use super::*;

    #[test]
    fn a_cancel_before_the_seal_interrupts_and_keeps_commit_back() {
        let c = Control::new(0, Duration::from_millis(300));
        assert!(!c.interrupt().is_raised());
        c.cancel();
        assert!(c.is_cancelled());
        assert!(c.interrupt().is_raised());
        assert!(!c.seal(), "COMMIT must not follow a cancel");
    }

    #[test]
    fn a_cancel_after_the_seal_interrupts_nothing() {
        let c = Control::new(0, Duration::from_millis(300));
        assert!(c.seal());
        c.cancel();
        assert!(c.is_cancelled());
        assert!(
            !c.interrupt().is_raised(),
            "a send after COMMIT was interrupted"
        );
    }

    #[test]
    fn cancel_and_seal_racing_end_one_way_or_the_other() {
        for _ in 0..200 {
            let c = Control::new(0, Duration::from_millis(300));
            let c2 = c.clone();
            let t = std::thread::spawn(move || c2.cancel());
            let sealed = c.seal();
            t.join().unwrap();
            // Sealed first: nothing interrupted. Cancelled first: no COMMIT.
            assert_eq!(sealed, !c.interrupt().is_raised());
        }
    }
}

#[cfg(test)]
mod codec_thread_tests {
    use super::*;

    #[test]
    fn codec_threads_fill_the_cores_the_channels_leave() {
        // This machine's case: two cores, two channels: compress on the channels.
        assert_eq!(threads_per_channel(2, 2), 0);
        assert_eq!(threads_per_channel(1, 4), 0);
        assert_eq!(threads_per_channel(2, 1), 1);
        assert_eq!(threads_per_channel(16, 2), 7);
        assert_eq!(threads_per_channel(16, 3), 5);
        assert!(codec_threads_for(0) < 4096);
    }
}
