//! The destination's side: accepting the channels of a session.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagewire_protocol::{ServerConfig, ServerHandshake};

use super::{Established, SessionConfig, SessionError, nonce, run_handshake, wait_readable};
use crate::tcp;

/// The channels of one session, and what was refused while waiting for them.
#[derive(Debug)]
pub struct Accepted {
    /// The channels, in index order.
    pub channels: Vec<Established>,
    /// Connections refused meanwhile, with the reason.
    pub refused: Vec<SessionError>,
}

/// Accepts the channels of sessions.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    /// Listens on `addr` with the socket settings of `cfg`.
    ///
    /// # Errors
    /// [`SessionError::Tcp`].
    pub fn bind(addr: SocketAddr, cfg: &SessionConfig) -> Result<Self, SessionError> {
        Ok(Self {
            listener: tcp::listen(addr, &cfg.tcp)?,
        })
    }

    /// The address listened on.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until every channel of session `cfg.session` has completed
    /// its handshake, or `timeout` passes. Connections of other sessions, garbage and
    /// failed authentication are refused and listed in [`Accepted::refused`].
    ///
    /// # Errors
    /// [`SessionError::Incomplete`] when the channels do not all arrive in time.
    pub fn accept_session(
        &self,
        cfg: &SessionConfig,
        timeout: Duration,
    ) -> Result<Accepted, SessionError> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = mpsc::channel();
        let mut slots: Vec<Option<Established>> = Vec::new();
        let mut count: Option<u16> = None;
        let mut refused = Vec::new();
        let server = ServerConfig {
            caps: cfg.caps,
            session: Some(cfg.session),
            auth: cfg.auth.clone(),
        };
        loop {
            while let Ok(r) = rx.try_recv() {
                match r {
                    Ok(est) => {
                        if let Err(e) = place(&mut slots, &mut count, est) {
                            refused.push(e);
                        }
                    }
                    Err(e) => refused.push(e),
                }
            }
            if count.is_some() && slots.iter().all(Option::is_some) {
                let channels = slots.into_iter().flatten().collect();
                return Ok(Accepted { channels, refused });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SessionError::Incomplete {
                    have: slots.iter().flatten().count(),
                    need: count.map_or(0, usize::from),
                    timeout,
                });
            }
            // Wait for a connection, at most 50 ms so finished handshakes are collected.
            let wait = (deadline - now).min(Duration::from_millis(50));
            let readable = wait_readable(self.listener.as_raw_fd(), Some(wait))
                .map_err(|source| SessionError::Io { op: "poll", source })?;
            if !readable {
                continue;
            }
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(source) => {
                    return Err(SessionError::Io {
                        op: "accept",
                        source,
                    });
                }
            };
            let tx = tx.clone();
            let server = server.clone();
            let hs_timeout = cfg.handshake_timeout;
            std::thread::spawn(move || {
                let r = nonce()
                    .and_then(|n| {
                        ServerHandshake::new(server, n).map_err(|source| SessionError::Handshake {
                            channel: None,
                            peer: stream.peer_addr().unwrap_or(([0, 0, 0, 0], 0).into()),
                            peer_message: None,
                            source,
                        })
                    })
                    .and_then(|mut hs| run_handshake(&mut stream, &mut hs, hs_timeout, None))
                    .map(|(negotiated, leftover)| Established {
                        stream,
                        negotiated,
                        leftover,
                    });
                // The receiver may be gone when the session completed meanwhile.
                let _ = tx.send(r);
            });
        }
    }
}

/// Puts a handshaken channel into its slot, refusing duplicates and disagreeing counts.
fn place(
    slots: &mut Vec<Option<Established>>,
    count: &mut Option<u16>,
    est: Established,
) -> Result<(), SessionError> {
    let n = est.negotiated;
    let peer = est
        .stream
        .peer_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let bad = |why| SessionError::BadChannel {
        channel: n.channel.0,
        count: n.channel_count,
        peer,
        why,
    };
    match *count {
        None => {
            *count = Some(n.channel_count);
            slots.resize_with(usize::from(n.channel_count), || None);
        }
        Some(c) if c != n.channel_count => return Err(bad("its channel count differs")),
        Some(_) => {}
    }
    let slot = slots
        .get_mut(usize::from(n.channel.0))
        .ok_or_else(|| bad("index out of range"))?;
    if slot.is_some() {
        return Err(bad("that index is already open"));
    }
    *slot = Some(est);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::connect;
    use crate::session::connect_channel;
    use pagewire_protocol::SessionKey;
    use pagewire_protocol::{Authentication, Capabilities, HandshakeError, SessionId};
    use std::io::Write;
    use std::net::TcpStream;

    fn cfg(session: u8, channels: u16, key: Option<&[u8]>) -> SessionConfig {
        let auth = match key {
            Some(k) => Authentication::PreSharedKey(SessionKey::new(k.to_vec()).unwrap()),
            None => Authentication::None,
        };
        let mut c = SessionConfig::new(
            Capabilities::new(4096),
            SessionId([session; 16]),
            channels,
            auth,
        );
        c.handshake_timeout = Duration::from_secs(5);
        c
    }

    #[test]
    fn channels_arrive_in_order_and_strangers_are_refused() {
        let key = b"0123456789abcdef0123";
        let dst = cfg(1, 3, Some(key));
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            // Garbage, a wrong key and another session first; then the real channels.
            let mut g = TcpStream::connect(addr).unwrap();
            g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let wrong = connect_channel(addr, &cfg(1, 3, Some(b"another key of 20 b")), 0);
            let other = connect_channel(addr, &cfg(2, 3, Some(key)), 0);
            let good = connect(addr, &cfg(1, 3, Some(key))).unwrap();
            (wrong.unwrap_err(), other.unwrap_err(), good)
        });
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        let (wrong, other, good) = t.join().unwrap();
        assert_eq!(acc.channels.len(), 3);
        for (i, e) in acc.channels.iter().enumerate() {
            assert_eq!(e.negotiated.channel.0 as usize, i);
            assert!(e.negotiated.auth.is_some());
        }
        assert_eq!(good.len(), 3);
        assert!(
            matches!(
                wrong,
                SessionError::Handshake {
                    source: HandshakeError::AuthFailed,
                    ..
                }
            ),
            "{wrong}"
        );
        assert!(
            matches!(
                other,
                SessionError::Handshake {
                    source: HandshakeError::Rejected { .. },
                    ..
                }
            ),
            "{other}"
        );
        assert!(acc.refused.len() >= 2, "{:?}", acc.refused);
    }

    #[test]
    fn a_duplicate_channel_is_refused() {
        let dst = cfg(3, 2, None);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let src = cfg(3, 2, None);
            let a = connect_channel(addr, &src, 0).unwrap();
            let dup = connect_channel(addr, &src, 0).unwrap();
            let b = connect_channel(addr, &src, 1).unwrap();
            (a, dup, b)
        });
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        let _keep = t.join().unwrap();
        assert_eq!(acc.channels.len(), 2);
        assert!(
            acc.refused
                .iter()
                .any(|e| matches!(e, SessionError::BadChannel { channel: 0, .. }))
        );
    }

    #[test]
    fn missing_channels_time_out_with_a_count() {
        let dst = cfg(4, 2, None);
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || connect_channel(addr, &cfg(4, 2, None), 1).unwrap());
        let e = l
            .accept_session(&dst, Duration::from_millis(1500))
            .unwrap_err();
        let _keep = t.join().unwrap();
        assert!(
            matches!(
                e,
                SessionError::Incomplete {
                    have: 1,
                    need: 2,
                    ..
                }
            ),
            "{e}"
        );
    }
}
