//! The TCP backend: blocking sockets, one thread per channel.
//!
//! # Contract
//! - **Send**: `send` writes the header and every payload slice with one vectored
//!   `sendmsg` (`MSG_NOSIGNAL`) as far as the socket takes it. What it does not take
//!   waits in the channel's send queue ([`TcpConfig::send_queue`] bytes, 16 MiB by
//!   default; module `sendq`): header and buffer payloads are copied there and their
//!   frame completes at once, guest pages are pointed at and their frame completes
//!   once its last byte is written. `send` blocks only while the queue holds more than
//!   its budget; every later `send`, `poll_completions`, `flush` and `recv` writes what
//!   the socket takes (`flush` and `recv` until the queue is empty, so a reply is never
//!   awaited behind unsent frames). Memory in flight is therefore the socket buffer
//!   plus at most the budget and one frame: a peer that stops reading makes `send`
//!   block, and after `send_timeout` without progress it fails with
//!   [`ChannelError::SendTimeout`]. With a budget of 0, and inside TLS, `send` returns
//!   only when the kernel has copied the whole frame, and the frame's [`Completed`] is
//!   ready at once.
//! - **Receive**: `recv` reads into a buffer sized to the largest frame seen (bounded by
//!   the negotiated frame limit). With a [`PageSink`], reads stop at most 4 KiB past
//!   the header they need, and a raw PAGES frame's payload is then read with `readv`
//!   straight into destination memory: no bounce buffer (only the few payload bytes
//!   read together with the header are copied into place).
//! - Sockets have `TCP_NODELAY`, the configured `SO_SNDBUF`/`SO_RCVBUF` (set before
//!   `connect`/`listen` so window scaling follows them), and `connect` retries with a
//!   timeout per attempt.
//! - **TLS** ([`crate::tls`]): a frame is sealed into one buffer of records and sent
//!   with one `sendmsg`; received records are read in chunks of up to 256 KiB, opened
//!   in place, and their plaintext copied to the receive buffer or, for raw pages,
//!   into destination memory.
//! - The same channel runs over a Unix stream socket ([`Stream::Unix`]): the framing,
//!   the timeouts and the receive into destination memory are the same; the TCP
//!   options are not set.
//!
//! Blocking sockets were chosen over mio: a channel is one ordered stream driven by one
//! thread, so readiness polling would add an `epoll_wait` per write without adding
//! concurrency. The benchmark measures this backend against a plain blocking loop (it
//! reaches it); no mio variant was built to compare.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use pagewire_protocol::Negotiated;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::buf::GuestSlice;
use crate::channel::{
    Channel, ChannelError, ChannelStats, Completed, Incoming, OutFrame, PageSink, SendId,
};
use crate::endpoint::{self, Endpoint, Stream};
use crate::interrupt::{self, Interrupt, SendWait};
use crate::recv::{ByteSource, FrameClock, RxState, Until, guest_iovecs, until};
use crate::sendq::SendQueue;
use crate::tls::{TlsSession, TlsSource};

/// Most `iovec`s handed to one system call (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Socket settings. The timeouts, attempts and retry delay apply to Unix sockets too;
/// the buffer sizes (and `TCP_NODELAY`) only to TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// `SO_SNDBUF`, or the kernel's autotuning when `None` (sizes past `i32::MAX / 2`
    /// are taken as that; the kernel caps them at `net.core.wmem_max` in any case).
    pub send_buffer: Option<usize>,
    /// `SO_RCVBUF`, or the kernel's autotuning when `None` (capped likewise,
    /// `net.core.rmem_max`).
    pub recv_buffer: Option<usize>,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Attempts before `connect` gives up (at least one is made).
    pub connect_attempts: u32,
    /// Pause between attempts.
    pub retry_delay: Duration,
    /// How long a send may make no progress before it fails.
    pub send_timeout: Duration,
    /// How long `recv` waits for bytes; `None` waits for ever.
    pub recv_timeout: Option<Duration>,
    /// Bytes a channel may hold in user space beyond what its socket takes before
    /// `send` blocks (frames outside TLS; 0: `send` blocks as soon as the socket is
    /// full). See [`TcpChannel`].
    pub send_queue: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            send_buffer: None,
            recv_buffer: None,
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 5,
            retry_delay: Duration::from_millis(200),
            send_timeout: Duration::from_secs(30),
            recv_timeout: None,
            send_queue: DEFAULT_SEND_QUEUE,
        }
    }
}

/// [`TcpConfig::send_queue`]'s default: 16 MiB, about 130 ms of a 1 Gbit/s link.
pub const DEFAULT_SEND_QUEUE: usize = 16 << 20;

/// Why a TCP socket could not be set up.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// Every connection attempt failed.
    #[error(
        "could not connect to {addr} after {attempts} attempts ({source}); is the destination listening and reachable?"
    )]
    Connect {
        /// The endpoint.
        addr: Endpoint,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        source: io::Error,
    },
    /// A socket call failed.
    #[error("{op} failed: {source}")]
    Socket {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn sock_err(op: &'static str) -> impl FnOnce(io::Error) -> TcpError {
    move |source| TcpError::Socket { op, source }
}

fn new_socket(addr: &SocketAddr, cfg: &TcpConfig) -> Result<Socket, TcpError> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(sock_err("socket"))?;
    if let Some(n) = cfg.send_buffer {
        s.set_send_buffer_size(socket_buffer(n))
            .map_err(sock_err("setsockopt(SO_SNDBUF)"))?;
    }
    if let Some(n) = cfg.recv_buffer {
        s.set_recv_buffer_size(socket_buffer(n))
            .map_err(sock_err("setsockopt(SO_RCVBUF)"))?;
    }
    Ok(s)
}

/// A socket buffer size as `setsockopt` takes it (a C `int`, which the kernel doubles):
/// larger sizes are taken as the largest, where a plain cast wrapped 4 GiB to 0, the
/// kernel's smallest buffer.
pub(crate) fn socket_buffer(n: usize) -> usize {
    n.min(libc::c_int::MAX as usize / 2)
}

/// Connects to `addr`, retrying refused or timed-out attempts.
///
/// # Errors
/// [`TcpError::Connect`] with the last attempt's error.
pub fn connect(addr: SocketAddr, cfg: &TcpConfig) -> Result<TcpStream, TcpError> {
    let attempts = cfg.connect_attempts.max(1);
    let mut last = None;
    for i in 0..attempts {
        if i > 0 {
            std::thread::sleep(cfg.retry_delay);
        }
        let s = new_socket(&addr, cfg)?;
        match s.connect_timeout(&SockAddr::from(addr), cfg.connect_timeout) {
            Ok(()) => {
                let stream: TcpStream = s.into();
                configure(&stream, cfg)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(TcpError::Connect {
        addr: Endpoint::Tcp(addr),
        attempts,
        source: last.unwrap_or_else(|| io::Error::other("no attempt made")),
    })
}

/// Binds a listening socket whose accepted sockets inherit the buffer sizes.
///
/// # Errors
/// [`TcpError::Socket`].
pub fn listen(addr: SocketAddr, cfg: &TcpConfig) -> Result<TcpListener, TcpError> {
    let s = new_socket(&addr, cfg)?;
    s.set_reuse_address(true)
        .map_err(sock_err("setsockopt(SO_REUSEADDR)"))?;
    s.bind(&SockAddr::from(addr)).map_err(sock_err("bind"))?;
    s.listen(128).map_err(sock_err("listen"))?;
    Ok(s.into())
}

/// Applies `TCP_NODELAY` and the timeouts to a connected socket.
///
/// # Errors
/// [`TcpError::Socket`].
pub fn configure(stream: &TcpStream, cfg: &TcpConfig) -> Result<(), TcpError> {
    stream
        .set_nodelay(true)
        .map_err(sock_err("setsockopt(TCP_NODELAY)"))?;
    stream
        .set_write_timeout(Some(cfg.send_timeout.max(Duration::from_millis(1))))
        .map_err(sock_err("setsockopt(SO_SNDTIMEO)"))?;
    stream
        .set_read_timeout(cfg.recv_timeout.map(|t| t.max(Duration::from_millis(1))))
        .map_err(sock_err("setsockopt(SO_RCVTIMEO)"))?;
    Ok(())
}

/// `iovec`s for a frame: header, then each payload slice.
pub(crate) fn frame_iovecs(frame: &OutFrame) -> Vec<libc::iovec> {
    std::iter::once((frame.header.as_ptr(), frame.header.len()))
        .chain(frame.payload.iter().map(|p| (p.as_ptr(), p.len())))
        .filter(|&(_, len)| len > 0)
        .map(|(ptr, len)| libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        })
        .collect()
}

/// An error when the socket has failed (the peer reset it, or an earlier send's error
/// is pending): `poll` says `POLLERR` or `POLLHUP` at once. Its send queue's count
/// (`SIOCOUTQ`) then no longer drains, so a sender waiting on it must stop.
pub(crate) fn socket_failed(stream: &Stream) -> Result<(), ChannelError> {
    if poll_now(stream.as_raw_fd(), libc::POLLOUT) & (libc::POLLERR | libc::POLLHUP) != 0 {
        let e = match stream.take_error() {
            Ok(Some(e)) => e,
            _ => io::Error::from(io::ErrorKind::ConnectionReset),
        };
        return Err(ChannelError::io("send", e));
    }
    Ok(())
}

/// Whether the socket `fd` is readable now (data, or the peer's close or reset),
/// without waiting.
pub(crate) fn readable_now(fd: std::os::fd::RawFd) -> bool {
    poll_now(fd, libc::POLLIN) & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// `poll`'s `revents` for `events` on `fd`, without waiting (0 when nothing is ready or
/// the call fails).
fn poll_now(fd: std::os::fd::RawFd, events: libc::c_short) -> libc::c_short {
    poll_for(fd, events, Duration::ZERO).unwrap_or(0)
}

/// Waits `timeout` at most (rounded up to whole milliseconds) for `events` on `fd`;
/// `poll`'s `revents` (0 when the time passed).
fn poll_for(
    fd: std::os::fd::RawFd,
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, alive for the call.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        rc if rc < 0 => Err(io::Error::last_os_error()),
        0 => Ok(0),
        _ => Ok(p.revents),
    }
}

/// Bytes the socket `fd` holds that the peer has not acknowledged (`SIOCOUTQ`); `None`
/// when the kernel does not say.
pub(crate) fn unacked(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which points at
    // `n`, alive for the call; a bad descriptor only makes the call fail.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then(|| u64::try_from(n).ok()).flatten()
}

/// `TCP_INFO`'s `tcpi_rwnd_limited`: microseconds, since the socket connected, that
/// its sends were stalled by the peer's receive window (`include/uapi/linux/tcp.h`;
/// the field is at this offset since Linux 4.10, whatever fields later kernels add
/// after it).
const RWND_LIMITED_AT: usize = 176;

/// How long the sends of socket `fd` waited on the peer's receive window in all
/// (`TCP_INFO`'s `tcpi_rwnd_limited`); `None` when the kernel does not say (older than
/// 4.10, or not a TCP socket).
pub(crate) fn rwnd_limited(fd: std::os::fd::RawFd) -> Option<Duration> {
    // `struct tcp_info` up to and including the field; the kernel copies at most
    // `len` bytes and says how many it wrote.
    #[repr(C, align(8))]
    struct Info([u8; RWND_LIMITED_AT + 8]);
    let mut info = Info([0; RWND_LIMITED_AT + 8]);
    let mut len = libc::socklen_t::try_from(info.0.len()).ok()?;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that long
    // and alive for the call, and stores the count written in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.0.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < info.0.len() {
        return None;
    }
    let us = u64::from_ne_bytes(info.0[RWND_LIMITED_AT..].try_into().ok()?);
    Some(Duration::from_micros(us))
}

/// Sets `SO_SNDTIMEO` of `stream` (at least 1 ms: zero would mean no timeout).
pub(crate) fn set_send_timeout(stream: &Stream, t: Duration) -> io::Result<()> {
    stream.set_write_timeout(Some(t.max(Duration::from_millis(1))))
}

/// Sends every byte of `iov` with `sendmsg(MSG_NOSIGNAL)`, advancing over short writes,
/// within `send.timeout` of the call in all. `SO_SNDTIMEO` bounds each `sendmsg`: the
/// socket's is [`interrupt::slice`] of the timeout (all of it, or with an interrupt at
/// most [`interrupt::SLICE`]); a `sendmsg` that waits that long takes what the socket
/// took meanwhile (or nothing), and the next one gets the time left, if less
/// (restored before returning). Between waits, a raised interrupt ends the send with
/// [`ChannelError::Interrupted`].
pub(crate) fn send_all(
    stream: &Stream,
    iov: &mut [libc::iovec],
    send: SendWait<'_>,
) -> Result<(), ChannelError> {
    let wait = Wait {
        timeout: send.timeout,
        deadline: crate::deadline::from_now(send.timeout),
        slice: interrupt::slice(send.timeout, send.interrupt),
        interrupt: send.interrupt,
    };
    let mut set = wait.slice;
    let r = send_all_until(stream, iov, &wait, &mut set);
    if set != wait.slice {
        let restored = set_send_timeout(stream, wait.slice);
        if r.is_ok() {
            restored.map_err(|e| ChannelError::io("setsockopt(SO_SNDTIMEO)", e))?;
        }
    }
    r
}

/// How a [`send_all`] waits.
struct Wait<'a> {
    timeout: Duration,
    deadline: Instant,
    /// The socket's `SO_SNDTIMEO` between calls.
    slice: Duration,
    interrupt: Option<&'a Interrupt>,
}

fn send_all_until(
    stream: &Stream,
    iov: &mut [libc::iovec],
    wait: &Wait<'_>,
    set: &mut Duration,
) -> Result<(), ChannelError> {
    let mut idx = 0;
    let mut waited = false;
    while idx < iov.len() {
        if waited {
            if wait.interrupt.is_some_and(Interrupt::is_raised) {
                return Err(ChannelError::Interrupted);
            }
            let left = wait.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::SendTimeout(wait.timeout));
            }
            // The rest of the frame gets only the time left.
            let next = left.min(wait.slice);
            if next != *set {
                set_send_timeout(stream, next)
                    .map_err(|e| ChannelError::io("setsockopt(SO_SNDTIMEO)", e))?;
                *set = next;
            }
        }
        let count = (iov.len() - idx).min(IOV_MAX);
        // Raw sendmsg, not nix's or std's: payload iovecs cover guest memory, not Rust slices.
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[idx..].as_mut_ptr();
        msg.msg_iovlen = count;
        let called = Instant::now();
        // SAFETY: every iovec points into memory the caller keeps alive and readable for
        // the duration of the call (an `OutFrame`'s header and payload, which it owns);
        // `msg` points at `count` of them.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // `SO_SNDTIMEO` passed with nothing taken; or the socket is in
                // non-blocking mode (a caller's), which returns at once: then wait for
                // room here, so that the loop never spins.
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    let rest = set.saturating_sub(called.elapsed());
                    if rest > *set / 2 {
                        wait_writable(stream, rest);
                    }
                    waited = true;
                    continue;
                }
                _ => return Err(ChannelError::from_send_io("sendmsg", e, wait.timeout)),
            }
        }
        idx = advance_iovecs(iov, idx, n as usize);
        // A short write: `SO_SNDTIMEO` passed with part of it taken.
        waited = idx < iov.len();
    }
    Ok(())
}

/// Waits until `stream` has room to write, `timeout` at most (errors end the wait: the
/// next write reports them).
fn wait_writable(stream: &Stream, timeout: Duration) {
    let _ = poll_for(stream.as_raw_fd(), libc::POLLOUT, timeout);
}

/// Drops the first `n` bytes of `iov[idx..]` (a write's count); returns the index of
/// the first iovec with bytes left.
pub(crate) fn advance_iovecs(iov: &mut [libc::iovec], mut idx: usize, mut n: usize) -> usize {
    while n > 0 && idx < iov.len() {
        if n >= iov[idx].iov_len {
            n -= iov[idx].iov_len;
            idx += 1;
        } else {
            iov[idx].iov_base = iov[idx].iov_base.cast::<u8>().wrapping_add(n).cast();
            iov[idx].iov_len -= n;
            n = 0;
        }
    }
    idx
}

/// `io::Write` over [`send_all`], for rustls to write sealed records straight from its
/// buffers with one `sendmsg` per batch; keeps the channel error.
pub(crate) struct SockWriter<'a> {
    pub(crate) stream: &'a Stream,
    pub(crate) wait: SendWait<'a>,
    pub(crate) err: Option<ChannelError>,
}

impl SockWriter<'_> {
    fn send(&mut self, iov: &mut [libc::iovec]) -> io::Result<usize> {
        let total = iov.iter().map(|v| v.iov_len).sum();
        send_all(self.stream, iov, self.wait).map_err(|e| {
            self.err = Some(e);
            io::Error::other("channel send failed")
        })?;
        Ok(total)
    }

    /// The channel error behind an `io::Error` this writer returned.
    pub(crate) fn error(&mut self, e: io::Error) -> ChannelError {
        self.err.take().unwrap_or(ChannelError::io("TLS write", e))
    }
}

impl io::Write for SockWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            })
            .collect();
        self.send(&mut iov)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct TcpSource<'a> {
    stream: &'a Stream,
    timeout: Option<Duration>,
}

impl TcpSource<'_> {
    fn map_err(&self, e: io::Error) -> ChannelError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ChannelError::RecvTimeout(self.timeout.unwrap_or_default())
            }
            _ => ChannelError::io("recv", e),
        }
    }
}

impl ByteSource for TcpSource<'_> {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        loop {
            match { self.stream }.read(dst) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.map_err(e)),
            }
        }
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        let iov = guest_iovecs(dst, skip, IOV_MAX);
        // Raw readv, not nix's or std's: the iovecs cover guest memory, not Rust slices.
        loop {
            // SAFETY: the iovecs cover destination guest memory that the slices keep
            // mapped and that no one else accesses while the channel places pages
            // (GuestMemory contract).
            let n = unsafe {
                libc::readv(
                    self.stream.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(self.map_err(e));
            }
        }
    }
}

/// A channel over a TCP or Unix stream socket whose handshake is done.
#[derive(Debug)]
pub struct TcpChannel {
    stream: Stream,
    negotiated: Negotiated,
    cfg: TcpConfig,
    rx: RxState,
    next_id: u64,
    done: Vec<Completed>,
    stats: ChannelStats,
    failed: bool,
    tls: Option<Box<TlsSession>>,
    queue: SendQueue,
    /// When `recv` must have returned by ([`TcpChannel::set_recv_deadline`]).
    deadline: Option<(Instant, Duration)>,
    /// When the frame being received must have arrived whole by
    /// ([`TcpChannel::set_frame_timeout`]).
    frame: FrameClock,
    /// What ends a blocked send early ([`TcpChannel::set_interrupt`]).
    interrupt: Option<Interrupt>,
}

impl TcpChannel {
    /// Wraps a connected socket after its handshake; `leftover` are the bytes received
    /// after the handshake's last frame.
    ///
    /// # Errors
    /// [`TcpError::Socket`] when the socket options cannot be set.
    pub fn new(
        stream: impl Into<Stream>,
        negotiated: Negotiated,
        leftover: &[u8],
        cfg: &TcpConfig,
    ) -> Result<Self, TcpError> {
        let stream = stream.into();
        endpoint::configure(&stream, cfg)?;
        Ok(Self {
            stream,
            rx: RxState::new(negotiated.limits(), leftover),
            negotiated,
            cfg: cfg.clone(),
            next_id: 0,
            done: Vec::new(),
            stats: ChannelStats::default(),
            failed: false,
            tls: None,
            queue: SendQueue::default(),
            deadline: None,
            frame: FrameClock::default(),
            interrupt: None,
        })
    }

    /// Gives the channel an [`Interrupt`] that ends its blocked sends early (see
    /// [`crate::interrupt`]), or takes it away (`None`): from then on a send waits in
    /// slices of at most [`interrupt::SLICE`].
    ///
    /// # Errors
    /// [`ChannelError::Io`] when the socket's send timeout cannot be set.
    pub fn set_interrupt(&mut self, interrupt: Option<Interrupt>) -> Result<(), ChannelError> {
        set_send_timeout(
            &self.stream,
            interrupt::slice(self.cfg.send_timeout, interrupt.as_ref()),
        )
        .map_err(|e| ChannelError::io("setsockopt(SO_SNDTIMEO)", e))?;
        self.interrupt = interrupt;
        Ok(())
    }

    /// Runs the channel inside the TLS session its handshake ran in.
    pub(crate) fn with_tls(mut self, tls: Option<Box<TlsSession>>) -> Self {
        self.tls = tls;
        self
    }

    /// Whether frames go inside TLS.
    pub fn is_encrypted(&self) -> bool {
        self.tls.is_some()
    }

    fn send_tls(&mut self, frame: &OutFrame) -> Result<(), ChannelError> {
        let wait = SendWait {
            timeout: self.cfg.send_timeout,
            interrupt: self.interrupt.as_ref(),
        };
        let Some(tls) = self.tls.as_deref_mut() else {
            let mut iov = frame_iovecs(frame);
            return send_all(&self.stream, &mut iov, wait);
        };
        tls.seal_frame(frame)?;
        let mut w = SockWriter {
            stream: &self.stream,
            wait,
            err: None,
        };
        tls.write_to(&mut w).map_err(|e| w.error(e))
    }

    /// The socket (for `shutdown` from another thread, or inspection).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Sets when every later `recv` must have returned by (`None`: no deadline): it
    /// fails with [`ChannelError::RecvTimeout`] then, even with a frame half received,
    /// at most one read timeout ([`TcpChannel::set_recv_timeout`]) late, however slowly
    /// the peer sends. A frame cut short so stays buffered (unless its pages were being
    /// placed), and a later `recv` continues it.
    pub fn set_recv_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = until(deadline);
    }

    /// Sets how long a frame may take to arrive whole from its first byte (`None`: no
    /// bound, the default), plus its length at [`FRAME_MIN_RATE`](crate::FRAME_MIN_RATE)
    /// once its envelope has arrived: `recv` fails with [`ChannelError::FrameTimeout`] then,
    /// however slowly the peer sends, at most one read timeout
    /// ([`TcpChannel::set_recv_timeout`]) late; the channel is unusable afterwards. A
    /// frame's first byte is the first the socket gives once the previous frame was
    /// received (below TLS, a record's), or, for bytes that came with the previous
    /// frame, the start of the next `recv`.
    pub fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.frame.set_timeout(timeout);
    }

    /// Changes how long `recv` waits for bytes (`None`: for ever), e.g. to the time
    /// left before a deadline.
    ///
    /// # Errors
    /// [`ChannelError::Io`] when the socket option cannot be set.
    pub fn set_recv_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        if timeout == self.cfg.recv_timeout {
            return Ok(());
        }
        self.stream
            .set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
            .map_err(|e| ChannelError::io("setsockopt(SO_RCVTIMEO)", e))?;
        self.cfg.recv_timeout = timeout;
        Ok(())
    }

    /// Writes what the send queue holds as far as the socket takes it (`all`: waits
    /// until it is empty).
    fn push_queue(&mut self, all: bool) -> Result<(), ChannelError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        if self.failed {
            return Err(ChannelError::Failed);
        }
        let res = match all {
            true => {
                let wait = SendWait {
                    timeout: self.cfg.send_timeout,
                    interrupt: self.interrupt.as_ref(),
                };
                self.queue.drain_to(&self.stream, 0, wait, &mut self.done)
            }
            false => self.queue.push(&self.stream, &mut self.done).map(drop),
        };
        if res.is_err() {
            self.failed = true;
        }
        res
    }
}

impl Channel for TcpChannel {
    fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    fn send(&mut self, frame: OutFrame) -> Result<SendId, ChannelError> {
        if self.failed {
            return Err(ChannelError::Failed);
        }
        let len = frame.wire_len();
        if len > self.negotiated.max_frame_bytes as usize {
            return Err(ChannelError::FrameTooLarge {
                len,
                max: self.negotiated.max_frame_bytes,
            });
        }
        let payload_bytes = (len - frame.header.len()) as u64;
        let id = SendId(self.next_id);
        let queued = self.tls.is_none() && self.cfg.send_queue > 0;
        let res = if queued {
            self.queue.send(
                &self.stream,
                frame,
                id,
                self.cfg.send_queue,
                SendWait {
                    timeout: self.cfg.send_timeout,
                    interrupt: self.interrupt.as_ref(),
                },
                &mut self.done,
            )
        } else {
            self.send_tls(&frame).map(|()| {
                self.done.push(Completed {
                    id,
                    payload: frame.payload,
                    zero_copy: (0, 0),
                });
            })
        };
        if let Err(e) = res {
            self.failed = true;
            return Err(e);
        }
        let held = if queued {
            self.queue.bytes() as u64
        } else {
            payload_bytes
        };
        self.stats.peak_in_flight_bytes = self.stats.peak_in_flight_bytes.max(held);
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += len as u64;
        self.next_id += 1;
        Ok(id)
    }

    fn poll_completions(&mut self, out: &mut Vec<Completed>) -> Result<usize, ChannelError> {
        self.push_queue(false)?;
        let n = self.done.len();
        out.append(&mut self.done);
        Ok(n)
    }

    fn flush(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.push_queue(true)?;
        self.poll_completions(out).map(drop)
    }

    fn recv<'a>(
        &'a mut self,
        sink: Option<&mut dyn PageSink>,
    ) -> Result<Option<Incoming<'a>>, ChannelError> {
        // A reply may wait on what is still queued: send it first (a channel whose
        // send failed has nothing more to send, and may still read why).
        if !self.failed {
            self.push_queue(true)?;
        }
        let mut src = TcpSource {
            stream: &self.stream,
            timeout: self.cfg.recv_timeout,
        };
        let held = self.rx.buffered() > 0 || self.tls.as_ref().is_some_and(|t| t.has_pending());
        self.frame.resume(held);
        let mut src = Until {
            inner: &mut src,
            deadline: self.deadline,
            frame: self.frame,
        };
        let res = match self.tls.as_deref_mut() {
            Some(tls) => {
                let mut src = TlsSource {
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
        unacked(self.stream.as_raw_fd()).map(|n| n + self.queue.bytes() as u64)
    }

    fn has_input(&mut self) -> Result<bool, ChannelError> {
        Ok(self.rx.buffered() > 0
            || self.tls.as_ref().is_some_and(|t| t.has_pending())
            || readable_now(self.stream.as_raw_fd()))
    }

    fn peer_limited(&self) -> Option<Duration> {
        rwnd_limited(self.stream.as_raw_fd())
    }

    fn wait_sends(&mut self, timeout: Duration) -> Result<(), ChannelError> {
        if self.failed {
            return Err(ChannelError::Failed);
        }
        if self.queue.is_empty() {
            // All of it is in the socket already, which tells nothing of it draining;
            // but a socket the peer reset keeps the count it had (`SIOCOUTQ`), so
            // look for that first.
            if let Err(e) = socket_failed(&self.stream) {
                self.failed = true;
                return Err(e);
            }
            std::thread::sleep(timeout.min(Duration::from_micros(200)));
            return Ok(());
        }
        match poll_for(self.stream.as_raw_fd(), libc::POLLOUT, timeout) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(ChannelError::io("poll", e)),
            _ => Ok(()),
        }
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
            ..self.stats
        }
    }

    fn close(&mut self, out: &mut Vec<Completed>) -> Result<(), ChannelError> {
        self.flush(out)?;
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.close().map_err(ChannelError::Tls)?;
            let mut w = SockWriter {
                stream: &self.stream,
                wait: SendWait {
                    timeout: self.cfg.send_timeout,
                    interrupt: self.interrupt.as_ref(),
                },
                err: None,
            };
            tls.write_to(&mut w).map_err(|e| w.error(e))?;
        }
        match self.stream.shutdown(std::net::Shutdown::Write) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(ChannelError::io("shutdown", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's CPU time.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec, alive for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A socket a caller put in non-blocking mode returns `EAGAIN` at once: the send
    /// waits for room in `poll`, not in a loop of `sendmsg` calls, and still ends at
    /// its timeout (or at once on a raised interrupt).
    #[test]
    fn a_full_non_blocking_socket_waits_without_spinning() {
        let (a, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        s.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut iov = [libc::iovec {
            iov_base: chunk.as_ptr().cast_mut().cast(),
            iov_len: chunk.len(),
        }];
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let timeout = Duration::from_millis(400);
        let r = send_all(
            &s,
            &mut iov,
            SendWait {
                timeout,
                interrupt: None,
            },
        );
        assert!(matches!(r, Err(ChannelError::SendTimeout(_))), "{r:?}");
        assert!(wall.elapsed() >= timeout);
        // A spinning loop would burn the whole 400 ms.
        let burnt = thread_cpu() - cpu;
        assert!(burnt < Duration::from_millis(200), "{burnt:?} of CPU");
        let raised = Interrupt::new();
        raised.raise();
        let r = send_all(
            &s,
            &mut iov,
            SendWait {
                timeout: Duration::from_secs(3600),
                interrupt: Some(&raised),
            },
        );
        assert!(matches!(r, Err(ChannelError::Interrupted)), "{r:?}");
    }

    #[test]
    fn a_socket_buffer_of_4_gib_is_the_largest_not_the_smallest() {
        let s = new_socket(
            &"127.0.0.1:0".parse().unwrap(),
            &TcpConfig {
                send_buffer: Some(4 << 30),
                recv_buffer: Some(4 << 30),
                ..TcpConfig::default()
            },
        )
        .unwrap();
        // A plain cast made 4 GiB a 0, which the kernel raises to its minimum (4608
        // and 2304 bytes); capped at `[wr]mem_max`, the largest is far above that.
        assert!(s.send_buffer_size().unwrap() > 64 << 10);
        assert!(s.recv_buffer_size().unwrap() > 64 << 10);
    }

    #[test]
    fn connect_retries_then_names_the_address() {
        // A port nobody listens on: bind, note the port, close.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = TcpConfig {
            connect_attempts: 3,
            retry_delay: Duration::from_millis(1),
            connect_timeout: Duration::from_millis(200),
            ..TcpConfig::default()
        };
        let err = connect(port, &cfg).unwrap_err();
        assert!(matches!(err, TcpError::Connect { attempts: 3, .. }));
        assert!(matches!(&err, TcpError::Connect { addr, .. } if *addr == Endpoint::Tcp(port)));
        assert!(err.to_string().contains(&port.to_string()));
    }

    /// A connected pair on loopback whose receiving end has a 64 KiB buffer.
    fn small_window_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(64 << 10)
            .unwrap();
        (tx, rx)
    }

    /// Writes into `tx` until it would block (the peer's receive buffer and our send
    /// queue full); returns the bytes written.
    fn fill(tx: &mut TcpStream) -> usize {
        use std::io::Write;
        tx.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        for _ in 0..1024 {
            match tx.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        sent
    }

    /// Reads `sent` bytes from `rx`, then waits (5 s at most) until `tx` holds nothing
    /// unacknowledged.
    fn drain(tx: &TcpStream, rx: &mut TcpStream, sent: usize) {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while got < sent {
            got += rx.read(&mut buf).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while unacked(tx.as_raw_fd()) != Some(0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn unacked_counts_what_the_peer_has_not_taken_and_drops_once_it_has() {
        let (mut tx, mut rx) = small_window_pair();
        assert_eq!(unacked(tx.as_raw_fd()), Some(0));
        let sent = fill(&mut tx);
        let held = unacked(tx.as_raw_fd()).unwrap();
        assert!(held > 0 && held as usize <= sent, "{held} of {sent}");
        // The peer reads everything: nothing is left unacknowledged.
        drain(&tx, &mut rx, sent);
        assert_eq!(unacked(tx.as_raw_fd()), Some(0));
        assert_eq!(unacked(-1), None);
    }

    #[test]
    fn a_peer_that_stops_reading_shows_as_time_limited_by_its_window() {
        let (mut tx, mut rx) = small_window_pair();
        assert_eq!(rwnd_limited(tx.as_raw_fd()), Some(Duration::ZERO));
        // The peer reads nothing for 200 ms.
        let sent = fill(&mut tx);
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let waited = rwnd_limited(tx.as_raw_fd()).unwrap();
        assert!(
            waited >= Duration::from_millis(100)
                && waited <= start.elapsed() + Duration::from_millis(50),
            "{waited:?}"
        );
        // Once the peer has read everything the count stops growing.
        drain(&tx, &mut rx, sent);
        let after = rwnd_limited(tx.as_raw_fd()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rwnd_limited(tx.as_raw_fd()), Some(after));
        assert_eq!(rwnd_limited(-1), None);
    }

    #[test]
    fn connect_succeeds_once_the_listener_appears() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let cfg = TcpConfig {
            connect_attempts: 50,
            retry_delay: Duration::from_millis(20),
            send_buffer: Some(1 << 20),
            recv_buffer: Some(1 << 20),
            ..TcpConfig::default()
        };
        let lcfg = cfg.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let l = listen(addr, &lcfg).unwrap();
            l.accept().unwrap().0
        });
        let s = connect(addr, &cfg).unwrap();
        assert!(s.nodelay().unwrap());
        let peer = t.join().unwrap();
        let sock = socket2::SockRef::from(&peer);
        // Linux doubles the value asked for.
        assert!(sock.recv_buffer_size().unwrap() >= 1 << 20);
    }
}
