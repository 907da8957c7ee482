//! Where channels run: TCP or Unix stream sockets.
//!
//! A session's channels are stream sockets of either family; the handshake and the
//! framing are the same on both. [`Endpoint`] names where a destination listens and a
//! source connects; [`Stream`] is one connected socket a channel runs over, and
//! [`StreamListener`] a bound listening socket, either made here or handed over by the
//! caller (a management layer that passes sockets to the VMM).
//!
//! What applies to which family:
//! - `TCP_NODELAY` and the buffer sizes of [`TcpConfig`] are set on TCP sockets only.
//! - The connect timeout, attempts and retry delay, the send and receive timeouts and
//!   the handshake timeout apply to both.
//! - Zero-copy sends (`SEND_ZC`) need TCP: on a Unix socket the io_uring backend sends
//!   by copy and counts the sends it would have made zero-copy as copied
//!   ([`crate::ChannelStats::zc_copied`]), as the kernel does over loopback.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::tcp::{self, TcpConfig, TcpError};

/// Where a destination listens and a source connects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// The path of a Unix stream socket (errors about a connection accepted on a Unix
    /// socket name the socket's path, since its peer is unnamed; an empty path is an
    /// unnamed socket).
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) if p.as_os_str().is_empty() => f.write_str("unix:(unnamed)"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a)
    }
}

impl Endpoint {
    /// Connects to the endpoint, retrying refused or timed-out attempts
    /// ([`TcpConfig::connect_attempts`], each bounded by
    /// [`TcpConfig::connect_timeout`], [`TcpConfig::retry_delay`] apart). A TCP socket
    /// gets the buffer sizes before `connect` and `TCP_NODELAY` after; both families
    /// get the send and receive timeouts.
    ///
    /// # Errors
    /// [`TcpError::Connect`] with the last attempt's error (for a Unix path that does
    /// not exist, `NotFound`).
    pub fn connect(&self, cfg: &TcpConfig) -> Result<Stream, TcpError> {
        match self {
            Self::Tcp(a) => tcp::connect(*a, cfg).map(Stream::Tcp),
            Self::Unix(p) => connect_unix(p, cfg),
        }
    }

    /// Binds a listening socket at the endpoint: a TCP socket with the buffer sizes of
    /// `cfg` (inherited by accepted sockets) and `SO_REUSEADDR`, or a Unix socket at the
    /// path (which must not exist; it is not removed when the listener is dropped).
    ///
    /// # Errors
    /// [`TcpError::Socket`].
    pub fn listen(&self, cfg: &TcpConfig) -> Result<StreamListener, TcpError> {
        match self {
            Self::Tcp(a) => tcp::listen(*a, cfg).map(StreamListener::Tcp),
            Self::Unix(p) => UnixListener::bind(p)
                .map(StreamListener::Unix)
                .map_err(|source| TcpError::Socket {
                    op: "bind(AF_UNIX)",
                    source,
                }),
        }
    }
}

fn connect_unix(path: &Path, cfg: &TcpConfig) -> Result<Stream, TcpError> {
    let attempts = cfg.connect_attempts.max(1);
    let addr = SockAddr::unix(path).map_err(|source| TcpError::Socket {
        op: "sockaddr_un (is the path too long?)",
        source,
    })?;
    let mut last = None;
    for i in 0..attempts {
        if i > 0 {
            std::thread::sleep(cfg.retry_delay);
        }
        let s =
            Socket::new(Domain::UNIX, Type::STREAM, None).map_err(|source| TcpError::Socket {
                op: "socket(AF_UNIX)",
                source,
            })?;
        match s.connect_timeout(&addr, cfg.connect_timeout) {
            Ok(()) => {
                let stream = Stream::Unix(s.into());
                configure(&stream, cfg)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(TcpError::Connect {
        addr: Endpoint::Unix(path.to_owned()),
        attempts,
        source: last.unwrap_or_else(|| io::Error::other("no attempt made")),
    })
}

/// Applies the send and receive timeouts of `cfg`, and on TCP `TCP_NODELAY`
/// ([`tcp::configure`]).
pub(crate) fn configure(stream: &Stream, cfg: &TcpConfig) -> Result<(), TcpError> {
    let s = match stream {
        Stream::Tcp(s) => return tcp::configure(s, cfg),
        Stream::Unix(s) => s,
    };
    let err = |op| move |source| TcpError::Socket { op, source };
    s.set_write_timeout(Some(cfg.send_timeout.max(Duration::from_millis(1))))
        .map_err(err("setsockopt(SO_SNDTIMEO)"))?;
    s.set_read_timeout(cfg.recv_timeout.map(|t| t.max(Duration::from_millis(1))))
        .map_err(err("setsockopt(SO_RCVTIMEO)"))?;
    Ok(())
}

/// Sets the buffer sizes of `cfg` on an already-connected TCP socket (a socket the
/// caller connected itself); nothing on a Unix socket.
pub(crate) fn set_buffers(stream: &Stream, cfg: &TcpConfig) -> Result<(), TcpError> {
    let Stream::Tcp(s) = stream else {
        return Ok(());
    };
    let sock = socket2::SockRef::from(s);
    let err = |op| move |source| TcpError::Socket { op, source };
    if let Some(n) = cfg.send_buffer {
        sock.set_send_buffer_size(crate::tcp::socket_buffer(n))
            .map_err(err("setsockopt(SO_SNDBUF)"))?;
    }
    if let Some(n) = cfg.recv_buffer {
        sock.set_recv_buffer_size(crate::tcp::socket_buffer(n))
            .map_err(err("setsockopt(SO_RCVBUF)"))?;
    }
    Ok(())
}

/// A connected stream socket a channel runs over.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Self::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Self::Unix(s)
    }
}

impl Stream {
    /// The peer, for messages: its TCP address, or for a Unix socket the path of the
    /// socket (the peer's when it has one, else this side's: a connection accepted on
    /// a listening socket names that socket's path).
    ///
    /// # Errors
    /// `getpeername`'s error.
    pub fn peer(&self) -> io::Result<Endpoint> {
        match self {
            Self::Tcp(s) => s.peer_addr().map(Endpoint::Tcp),
            Self::Unix(s) => {
                let path = s.peer_addr()?.as_pathname().map(Path::to_owned);
                let path = match path {
                    Some(p) => p,
                    None => s
                        .local_addr()?
                        .as_pathname()
                        .map(Path::to_owned)
                        .unwrap_or_default(),
                };
                Ok(Endpoint::Unix(path))
            }
        }
    }

    /// Whether the socket is a TCP connection.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Self::Tcp(_))
    }

    /// `SO_RCVTIMEO` (`None`: block for ever).
    ///
    /// # Errors
    /// `setsockopt`'s error (zero is refused, as by std).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// `SO_SNDTIMEO` (`None`: block for ever).
    ///
    /// # Errors
    /// `setsockopt`'s error (zero is refused, as by std).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// `O_NONBLOCK`.
    ///
    /// # Errors
    /// `fcntl`'s error.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(on),
            Self::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// `shutdown(2)`.
    ///
    /// # Errors
    /// `shutdown`'s error (`NotConnected` once the peer reset the connection).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        }
    }

    /// The socket's pending error (`SO_ERROR`), which reading clears.
    ///
    /// # Errors
    /// `getsockopt`'s error.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Self::Tcp(s) => s.take_error(),
            Self::Unix(s) => s.take_error(),
        }
    }

    /// A second handle on the same socket (`dup(2)`), e.g. to shut it down from
    /// another thread while a channel blocks on it.
    ///
    /// # Errors
    /// `dup`'s error.
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
            Self::Unix(s) => s.try_clone().map(Self::Unix),
        }
    }
}

/// Reads retry a call interrupted before any byte came (`EINTR`): with a receive
/// timeout set, a signal handler or io_uring task work for this thread (a ring closed
/// on it) fails the read rather than restarting it, and neither says the peer is gone.
impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match *self {
                Stream::Tcp(s) => (&*s).read(buf),
                Stream::Unix(s) => (&*s).read(buf),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A bound, listening stream socket: made by [`Endpoint::listen`] or handed over by
/// the caller.
#[derive(Debug)]
pub enum StreamListener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix stream listener.
    Unix(UnixListener),
}

impl From<TcpListener> for StreamListener {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

impl From<UnixListener> for StreamListener {
    fn from(l: UnixListener) -> Self {
        Self::Unix(l)
    }
}

impl StreamListener {
    /// The endpoint listened on (an empty path for an unnamed or abstract Unix socket).
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Self::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Self::Unix(l) => Ok(Endpoint::Unix(
                l.local_addr()?
                    .as_pathname()
                    .map(Path::to_owned)
                    .unwrap_or_default(),
            )),
        }
    }
}

impl AsFd for StreamListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(l) => l.as_fd(),
            Self::Unix(l) => l.as_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring closed on this thread interrupts its next blocking read with a timeout
    /// (`EINTR`, task work and no signal): the read goes on, and times out as it
    /// should. Where io_uring cannot be set up there is nothing to interrupt it.
    #[test]
    fn a_read_interrupted_by_task_work_goes_on() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = Stream::Tcp(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let (mut peer, _) = l.accept().unwrap();
        let Stream::Tcp(t) = &s else { unreachable!() };
        t.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            match io_uring::IoUring::new(8) {
                Ok(ring) => drop(ring),
                Err(e) => {
                    assert!(
                        std::env::var("PAGEWIRE_REQUIRE_URING").as_deref() != Ok("1"),
                        "PAGEWIRE_REQUIRE_URING=1 but io_uring is unavailable: {e}"
                    );
                    eprintln!("io_uring unavailable ({e}): the read is not interrupted");
                }
            }
            let e = (&s).read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        }
        peer.write_all(b"after").unwrap();
        assert_eq!((&s).read(&mut buf).unwrap(), 5);
    }

    #[test]
    fn endpoints_print_their_family() {
        let tcp = Endpoint::from(SocketAddr::from(([127, 0, 0, 1], 4444)));
        assert_eq!(tcp.to_string(), "127.0.0.1:4444");
        assert_eq!(
            Endpoint::Unix("/run/mig.sock".into()).to_string(),
            "unix:/run/mig.sock"
        );
        assert_eq!(Endpoint::Unix(PathBuf::new()).to_string(), "unix:(unnamed)");
    }

    #[test]
    fn a_missing_unix_path_fails_after_every_attempt() {
        let dir = std::env::temp_dir().join(format!("pagewire-ep-{}", std::process::id()));
        let path = dir.join("nobody.sock");
        let cfg = TcpConfig {
            connect_attempts: 3,
            retry_delay: Duration::from_millis(1),
            ..TcpConfig::default()
        };
        let err = Endpoint::Unix(path.clone()).connect(&cfg).unwrap_err();
        let TcpError::Connect {
            addr,
            attempts,
            source,
        } = &err
        else {
            panic!("not a connect error: {err:?}");
        };
        assert_eq!(*attempts, 3);
        assert_eq!(*addr, Endpoint::Unix(path.clone()));
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn unix_streams_get_timeouts_and_name_their_socket() {
        let dir = tempdir();
        let path = dir.join("l.sock");
        let l = Endpoint::Unix(path.clone())
            .listen(&TcpConfig::default())
            .unwrap();
        assert_eq!(l.local_endpoint().unwrap(), Endpoint::Unix(path.clone()));
        let cfg = TcpConfig {
            recv_timeout: Some(Duration::from_secs(7)),
            ..TcpConfig::default()
        };
        let s = Endpoint::Unix(path.clone()).connect(&cfg).unwrap();
        assert!(!s.is_tcp());
        let Stream::Unix(u) = &s else { unreachable!() };
        assert_eq!(u.read_timeout().unwrap(), Some(Duration::from_secs(7)));
        assert_eq!(s.peer().unwrap(), Endpoint::Unix(path.clone()));
        let StreamListener::Unix(ul) = &l else {
            unreachable!()
        };
        let accepted = Stream::Unix(ul.accept().unwrap().0);
        // The client is unnamed: the accepted side names the listening socket.
        assert_eq!(accepted.peer().unwrap(), Endpoint::Unix(path));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pagewire-ep-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
