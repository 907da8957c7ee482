//! The listening socket and its pending connections, TCP or Unix, as `mio` sources.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use mio::event::Source;
use mio::{Interest, Registry, Token, net};

use crate::endpoint::{Endpoint, Stream, StreamListener};

/// A non-blocking listening socket.
#[derive(Debug)]
pub(super) enum Socket {
    Tcp(net::TcpListener),
    /// With its path, which names the connections accepted on it (their peers are
    /// unnamed).
    Unix(net::UnixListener, Endpoint),
}

impl Socket {
    /// Takes over a bound listening socket, made non-blocking.
    pub(super) fn new(listener: StreamListener) -> io::Result<Self> {
        match listener {
            StreamListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Ok(Self::Tcp(net::TcpListener::from_std(l)))
            }
            StreamListener::Unix(l) => {
                l.set_nonblocking(true)?;
                let path = l.local_addr()?.as_pathname().map(Path::to_owned);
                let at = Endpoint::Unix(path.unwrap_or_default());
                Ok(Self::Unix(net::UnixListener::from_std(l), at))
            }
        }
    }

    /// Accepts one connection (non-blocking, close-on-exec).
    pub(super) fn accept(&self) -> io::Result<(Conn, Endpoint)> {
        match self {
            Self::Tcp(l) => l.accept().map(|(s, a)| (Conn::Tcp(s), Endpoint::Tcp(a))),
            Self::Unix(l, at) => l.accept().map(|(s, _)| (Conn::Unix(s), at.clone())),
        }
    }

    /// The endpoint listened on.
    pub(super) fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Self::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Self::Unix(_, at) => Ok(at.clone()),
        }
    }
}

impl Source for Socket {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.register(r, t, i),
            Self::Unix(l, _) => l.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.reregister(r, t, i),
            Self::Unix(l, _) => l.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.deregister(r),
            Self::Unix(l, _) => l.deregister(r),
        }
    }
}

/// A non-blocking accepted connection.
#[derive(Debug)]
pub(super) enum Conn {
    Tcp(net::TcpStream),
    Unix(net::UnixStream),
}

impl Conn {
    /// The connection as a blocking [`Stream`].
    pub(super) fn into_stream(self) -> io::Result<Stream> {
        let stream = match self {
            Self::Tcp(s) => Stream::Tcp(OwnedFd::from(s).into()),
            Self::Unix(s) => Stream::Unix(OwnedFd::from(s).into()),
        };
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Conn {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.register(r, t, i),
            Self::Unix(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.reregister(r, t, i),
            Self::Unix(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.deregister(r),
            Self::Unix(s) => s.deregister(r),
        }
    }
}
