//! The one interface every backend implements, and the types that cross it.

use std::io;
use std::time::Duration;

use pagewire_protocol::{
    DecodeError, EncodeError, Frame, Negotiated, PageFrame, PageRun, RegionId,
};

use crate::buf::{GuestMemory, GuestSlice, Payload};

/// Identifies one [`Channel::send`]; completions report it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SendId(pub u64);

/// A frame to send: its encoded header (the whole frame for control frames) and the
/// payload slices that follow it on the wire, in order.
#[derive(Debug)]
pub struct OutFrame {
    pub(crate) header: Vec<u8>,
    pub(crate) payload: Vec<Payload>,
}

impl OutFrame {
    /// A frame encoded whole (control frames, or a PAGES frame whose payload is already
    /// in a buffer of its own and small).
    ///
    /// # Errors
    /// The protocol's [`EncodeError`].
    pub fn whole(frame: &Frame<'_>) -> Result<Self, EncodeError> {
        let mut header = Vec::new();
        frame.encode(&mut header)?;
        Ok(Self {
            header,
            payload: Vec::new(),
        })
    }

    /// A PAGES frame whose payload is sent from `payload` (pool buffers or guest memory)
    /// without being copied into the frame; `frame.payload` is ignored.
    ///
    /// # Errors
    /// The protocol's [`EncodeError`].
    pub fn pages(frame: &PageFrame<'_>, payload: Vec<Payload>) -> Result<Self, EncodeError> {
        let len = payload.iter().map(Payload::len).sum();
        let mut header = Vec::with_capacity(frame.header_len());
        frame.encode_header(len, &mut header)?;
        Ok(Self { header, payload })
    }

    /// Bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.header.len() + self.payload.iter().map(Payload::len).sum::<usize>()
    }

    /// The encoded envelope and header.
    pub fn header(&self) -> &[u8] {
        &self.header
    }
}

/// A finished send: its payload slices are handed back and may be reused (the memory
/// has been copied or released by the kernel/NIC).
#[derive(Debug)]
pub struct Completed {
    /// Which send.
    pub id: SendId,
    /// The payload slices, back with the caller.
    pub payload: Vec<Payload>,
    /// Payload sends of this frame the kernel reported as zero-copy and as copied
    /// (io_uring SEND_ZC with usage reporting; both 0 on backends that always copy).
    pub zero_copy: (u32, u32),
}

/// A frame received.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A whole frame, borrowed from the channel's receive buffer until the next call.
    Frame(Frame<'a>),
    /// A raw PAGES frame whose payload a [`PageSink`] placed into destination memory;
    /// `payload` is empty here, the pages are already in place (and checksummed when a
    /// checksum was negotiated).
    Placed(PageFrame<'a>),
}

/// Lets the receiver place the payload of raw PAGES frames straight into destination
/// memory, instead of into the channel's buffer.
pub trait PageSink {
    /// Called with the header of a raw PAGES frame (its `payload` is empty). Push
    /// destination slices whose lengths add up to the payload length (`data_pages ×
    /// page_size`), in payload order, and return `true`; or return `false` to receive
    /// the frame whole as [`Incoming::Frame`].
    fn place(&mut self, frame: &PageFrame<'_>, dest: &mut Vec<GuestSlice>) -> bool;
}

/// A [`PageSink`] that maps each region id of the layout to a [`GuestMemory`] whose
/// page `i` is at offset `i × page_size`.
#[derive(Clone, Debug)]
pub struct RegionSink {
    page_size: u32,
    regions: Vec<(RegionId, GuestMemory)>,
}

impl RegionSink {
    /// A sink over `regions`.
    pub fn new(page_size: u32, regions: Vec<(RegionId, GuestMemory)>) -> Self {
        Self { page_size, regions }
    }

    fn run_slice(&self, mem: &GuestMemory, run: PageRun) -> Option<GuestSlice> {
        let ps = u64::from(self.page_size);
        let off = usize::try_from(run.start.0.checked_mul(ps)?).ok()?;
        let len = usize::try_from(u64::from(run.count).checked_mul(ps)?).ok()?;
        mem.slice(off, len)
    }
}

impl PageSink for RegionSink {
    fn place(&mut self, frame: &PageFrame<'_>, dest: &mut Vec<GuestSlice>) -> bool {
        let Some((_, mem)) = self.regions.iter().find(|(id, _)| *id == frame.region) else {
            return false;
        };
        let start = dest.len();
        for run in frame.data_runs.iter() {
            match self.run_slice(mem, run) {
                Some(s) => dest.push(s),
                None => {
                    // A page outside the region: let the caller see and reject the frame.
                    dest.truncate(start);
                    return false;
                }
            }
        }
        true
    }
}

/// Counters of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Frames handed to `send`.
    pub frames_sent: u64,
    /// Bytes of those frames.
    pub bytes_sent: u64,
    /// Frames received (whole or placed).
    pub frames_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Payload bytes placed straight into destination memory.
    pub bytes_placed: u64,
    /// Zero-copy sends the kernel completed without copying.
    pub zc_sends: u64,
    /// Zero-copy sends the kernel fell back to copying (always so on loopback).
    pub zc_copied: u64,
    /// io_uring: bytes of guest memory and buffer pools registered as fixed buffers
    /// (pinned), 0 until a zero-copy send went in place with `ZeroCopy::Auto` (see the
    /// `uring` module).
    pub registered_bytes: u64,
    /// io_uring: registrations the kernel refused (e.g. `RLIMIT_MEMLOCK`); the sends
    /// stayed zero-copy from unregistered memory.
    pub register_failures: u64,
    /// Highest number of payload bytes owned by the channel at once.
    pub peak_in_flight_bytes: u64,
    /// TLS: plaintext bytes sealed into records (frames sent, handshake included).
    pub tls_bytes_sealed: u64,
    /// TLS: plaintext bytes opened from records (frames received).
    pub tls_bytes_opened: u64,
    /// TLS: bytes copied in user space on the TLS path, by rustls and by pagewire
    /// (see the `tls` module's contract); 0 without TLS. Divided by the pages moved,
    /// the copies TLS costs per page.
    pub tls_bytes_copied: u64,
    /// TLS: frames for which the buffer of sealed records had to be allocated or grown
    /// (TCP keeps one buffer; io_uring recycles a few, see the `uring` module); 0
    /// without TLS. Close to the number of channels' buffers, not of frames, when
    /// buffers are reused.
    pub tls_send_buffer_allocations: u64,
}

/// Why a channel operation failed. After any error but `RecvTimeout`, the channel is
/// unusable: close it and report the pages it did not complete.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A system call failed.
    #[error("{op} failed on the channel socket: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The peer stopped taking data for longer than the send timeout.
    #[error(
        "the peer took no data for {0:?} (send timeout): it stopped reading or the link is down"
    )]
    SendTimeout(Duration),
    /// Nothing arrived within the receive timeout.
    #[error("nothing received for {0:?} (receive timeout)")]
    RecvTimeout(Duration),
    /// A frame did not arrive whole within the frame timeout of its first byte (the
    /// peer sent it too slowly, or stopped inside it); the channel is closed.
    #[error(
        "a frame did not arrive whole within {after:?} of its first byte ({have} of {need} \
         bytes): the peer sends too slowly or stopped inside it"
    )]
    FrameTimeout {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes of the frame expected (8 while the envelope is incomplete).
        need: usize,
        /// The frame timeout.
        after: Duration,
    },
    /// The peer closed the connection inside a frame.
    #[error("the peer closed the connection in the middle of a frame ({have} of {need} bytes)")]
    PeerClosedMidFrame {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes of the frame expected (8 while the envelope is incomplete).
        need: usize,
    },
    /// The peer's bytes are not a valid frame stream; close the channel.
    #[error("the peer sent an invalid frame: {0}")]
    Decode(#[source] DecodeError),
    /// A [`PageSink`] gave destination memory of the wrong size.
    #[error("the page sink placed {placed} bytes for a payload of {payload} bytes")]
    BadPlacement {
        /// Bytes of destination given.
        placed: usize,
        /// Payload length.
        payload: usize,
    },
    /// The frame is larger than the negotiated limit.
    #[error("frame of {len} bytes exceeds the negotiated limit of {max}")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Limit.
        max: u32,
    },
    /// An earlier error left the channel unusable.
    #[error("the channel failed earlier and is closed")]
    Failed,
    /// A send was waiting for the peer when the channel's [`Interrupt`] was raised; the
    /// channel is closed (part of a frame may have gone).
    ///
    /// [`Interrupt`]: crate::Interrupt
    #[error("a send waiting for the peer was interrupted; the channel is closed")]
    Interrupted,
    /// The peer broke the backend's own framing (RDMA message kinds).
    #[error("the peer broke the transport's framing: {0}")]
    Framing(&'static str),
    /// TLS failed: a record that does not authenticate (tampering: rustls'
    /// `DecryptError`), an alert from the peer, or a TLS protocol violation.
    #[error("TLS record layer failed: {0}; the channel is closed (tampering or a broken peer)")]
    Tls(#[source] crate::tls::TlsError),
    /// The peer closed a TLS channel without `close_notify`: the stream may have been
    /// cut short by someone on the path.
    #[error("the peer closed the TLS channel without close_notify (truncated stream)")]
    TlsTruncated,
    /// The NIC reported a failed work request.
    #[error("RDMA work request failed: {0}")]
    WorkRequest(String),
    /// The backend's completion queue reported something it did not submit.
    #[error("completion for a request this channel did not submit ({0:#x})")]
    UnknownCompletion(u64),
}

impl ChannelError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }

    /// A [`ChannelError::FrameTimeout`] with the frame's progress; any other error as
    /// it is.
    pub(crate) fn in_frame(self, have: usize, need: usize) -> Self {
        match self {
            Self::FrameTimeout { after, .. } => Self::FrameTimeout { have, need, after },
            e => e,
        }
    }

    pub(crate) fn from_send_io(op: &'static str, e: io::Error, timeout: Duration) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::SendTimeout(timeout),
            _ => Self::io(op, e),
        }
    }
}

/// A channel: one ordered stream of protocol frames after a completed handshake.
///
/// Each backend documents its contract (what is zero-copy, when a payload slice is
/// handed back, how it blocks). Common to all:
/// - `send` takes ownership of the frame's payload slices and hands them back through
///   [`poll_completions`](Self::poll_completions) only when the memory may be reused;
///   frames go out in `send` order;
/// - `send` blocks while the peer does not take data and fails with
///   [`ChannelError::SendTimeout`] after the configured send timeout, so a stalled peer
///   holds at most the configured in-flight memory;
/// - `recv` returns `Ok(None)` when the peer closed cleanly between frames and
///   [`ChannelError::PeerClosedMidFrame`] when it closed inside one.
pub trait Channel {
    /// The handshake's result for this channel.
    fn negotiated(&self) -> &Negotiated;

    /// Queues or sends a frame; see the backend's contract for when it blocks.
    ///
    /// # Errors
    /// [`ChannelError`]; the channel is unusable afterwards.
    fn send(&mut self, frame: OutFrame) -> Result<SendId, ChannelError>;

    /// Moves finished sends to `out` without blocking; returns how many.
    ///
    /// # Errors
    /// [`ChannelError`].
    fn poll_completions(&mut self, out: &mut Vec<Completed>) -> Result<usize, ChannelError>;

    /// Blocks until every send has completed (payloads released), then moves them to
    /// `out`.
    ///
    /// # Errors
    /// [`ChannelError::SendTimeout`] when the peer takes nothing for the send timeout.
    fn flush(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError>;

    /// Receives the next frame; with a sink, raw PAGES payloads go straight to
    /// destination memory.
    ///
    /// # Errors
    /// [`ChannelError`].
    fn recv<'a>(
        &'a mut self,
        sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Incoming<'a>>, ChannelError>;

    /// Counters.
    fn stats(&self) -> ChannelStats;

    /// Bytes handed to the channel that the peer has not acknowledged yet, when the
    /// backend can tell (TCP: `SIOCOUTQ`, what is still in the socket's send queue or
    /// on the wire unacknowledged); `None` otherwise. With the bytes handed over it
    /// gives the rate the link really drains at, which the time `send` blocks
    /// overstates while the socket's and the link's buffers fill.
    fn unacked_bytes(&self) -> Option<u64> {
        None
    }

    /// How long, in all since the channel opened, its sends were held back by the
    /// peer's receive window (TCP: `tcpi_rwnd_limited` of `TCP_INFO`, Linux 4.10 and
    /// later), when the backend can tell; `None` otherwise. Time the channel waited
    /// with the window closed is time the receiver, not the link, was what limited
    /// it: over loopback into fresh destination memory it was 85 % of the time a
    /// raw migration's sends were busy, over a 1 Gbit/s link into populated memory
    /// none of it.
    fn peer_limited(&self) -> Option<Duration> {
        None
    }

    /// Whether something from the peer is waiting to be received, without waiting for
    /// it: bytes the channel (or its TLS layer, or its io_uring receive) holds, or a
    /// socket readable now (data, or the peer's close or reset). `false` when the
    /// backend cannot tell (RDMA). A sender checks it before a frame that the peer
    /// must answer, so that an answer the peer sent before that frame was sent is
    /// read, and refused, then.
    ///
    /// # Errors
    /// [`ChannelError`] when looking fails (io_uring: entering the ring).
    fn has_input(&mut self) -> Result<bool, ChannelError> {
        Ok(false)
    }

    /// Waits, `timeout` at most, for the sends to move on: where the backend can wait
    /// in the kernel (TCP: room in the socket for what its send queue holds; io_uring:
    /// a completion), until they did; otherwise 200 µs (or `timeout`, if shorter).
    /// [`poll_completions`](Self::poll_completions) then takes up what moved. A
    /// sender that waits for what the channel holds to drain calls it instead of
    /// sleeping: each wake-up costs CPU (about 34 µs on this project's test machine,
    /// whatever the sleep's length).
    ///
    /// # Errors
    /// [`ChannelError`] when the wait itself fails.
    fn wait_sends(&mut self, timeout: Duration) -> Result<(), ChannelError> {
        std::thread::sleep(timeout.min(Duration::from_micros(200)));
        Ok(())
    }

    /// Flushes every send and closes the sending direction, so the peer's `recv`
    /// returns `Ok(None)` after the last frame. Frames may still be received.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    fn close(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError>;
}

/// Sum of the payload lengths a sink placed for a frame, checked against the payload.
pub(crate) fn placed_len(dest: &[GuestSlice]) -> usize {
    dest.iter().map(GuestSlice::len).sum()
}
