//! Opening sessions from endpoints and from sockets handed over by the caller: the
//! errors of a wrong stream count, a missing Unix socket, and refusals that name the
//! Unix socket they came through.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use pagewire_transport::session::{self, Listener, SessionError};
use pagewire_transport::tcp::TcpError;
use pagewire_transport::{Endpoint, Stream};

#[test]
fn a_stream_count_other_than_channels_is_refused_before_any_handshake() {
    let cfg = config(20, 3);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let streams: Vec<Stream> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap().into())
        .collect();
    let err = session::connect_streams(streams, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::StreamCount {
                given: 2,
                channels: 3
            }
        ),
        "{err:?}"
    );
    // Nothing was sent: both accepted connections see only the close.
    l.set_nonblocking(false).unwrap();
    for _ in 0..2 {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(std::io::Read::read(&mut s, &mut buf).unwrap(), 0);
    }
}

#[test]
fn a_missing_unix_socket_fails_after_the_configured_attempts() {
    let dir = TempDir::new();
    let path = dir.path.join("nobody.sock");
    let mut cfg = config(21, 2);
    cfg.tcp.connect_attempts = 3;
    cfg.tcp.retry_delay = Duration::from_millis(1);
    let err = session::connect_to(&Endpoint::Unix(path.clone()), &cfg).unwrap_err();
    let SessionError::Tcp(TcpError::Connect {
        addr,
        attempts,
        source,
    }) = &err
    else {
        panic!("not a connect error: {err:?}");
    };
    assert_eq!(*attempts, 3);
    assert_eq!(*addr, Endpoint::Unix(path.clone()));
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(
        err.to_string()
            .contains(&format!("unix:{}", path.display()))
    );
}

#[test]
fn a_unix_listener_has_an_endpoint_but_no_ip_address() {
    let dir = TempDir::new();
    let ep = Endpoint::Unix(dir.path.join("l.sock"));
    let l = Listener::bind_endpoint(&ep, &config(22, 1)).unwrap();
    assert_eq!(l.local_endpoint().unwrap(), ep);
    assert_eq!(
        l.local_addr().unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    // The path is taken: a second listener there fails to bind.
    let again = Listener::bind_endpoint(&ep, &config(22, 1)).unwrap_err();
    assert!(
        matches!(again, SessionError::Tcp(TcpError::Socket { .. })),
        "{again:?}"
    );
}

#[test]
fn garbage_on_a_unix_socket_is_refused_naming_the_socket() {
    let dir = TempDir::new();
    let path = dir.path.join("l.sock");
    let ep = Endpoint::Unix(path.clone());
    let cfg = config(23, 1);
    let l = Listener::bind_endpoint(&ep, &cfg).unwrap();
    let c = cfg.clone();
    let p2 = path.clone();
    let t = std::thread::spawn(move || {
        let mut junk = std::os::unix::net::UnixStream::connect(&p2).unwrap();
        junk.write_all(&[0xAB; 64]).unwrap();
        session::connect_to(&Endpoint::Unix(p2), &c).unwrap()
    });
    let acc = l.accept_session(&cfg, Duration::from_secs(20)).unwrap();
    let src = t.join().unwrap();
    assert_eq!(acc.channels.len(), 1);
    assert_eq!(src.len(), 1);
    assert!(
        acc.refused.iter().any(|e| matches!(
            e,
            SessionError::Handshake { peer, .. } | SessionError::HandshakeIo { peer, .. }
                if *peer == ep
        )),
        "{:?}",
        acc.refused
    );
    assert!(acc.stats.refused_handshake + acc.stats.closed >= 1);
}

#[test]
fn a_given_blocking_listener_is_made_non_blocking() {
    // A blocking listener would hang the poll loop on `accept`; the session completes.
    let cfg = config(24, 2);
    let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_l.local_addr().unwrap();
    let l = Listener::from_listener(std_l, &cfg).unwrap();
    assert_eq!(l.local_addr().unwrap(), addr);
    let c = cfg.clone();
    let t = std::thread::spawn(move || session::connect(addr, &c).unwrap());
    let acc = l.accept_session(&cfg, Duration::from_secs(20)).unwrap();
    assert_eq!(acc.channels.len(), 2);
    assert_eq!(t.join().unwrap().len(), 2);
    assert!(acc.channels.iter().all(|e| e.stream.is_tcp()));
}

/// A destination that turns each connection away just before the handshake timeout
/// cannot stretch the source's handshake past it: the reopened connection's handshake
/// gets what is left of the timeout (0.2 s here), not a whole one again (2 s, ending
/// about 3.6 s after the start when this peer turns it away too).
#[test]
fn a_reopened_connection_gets_only_what_is_left_of_the_handshake_timeout() {
    let mut cfg = config(23, 1);
    cfg.handshake_timeout = Duration::from_secs(2);
    cfg.tcp.connect_attempts = 5;
    cfg.tcp.retry_delay = Duration::from_millis(1);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let peer = std::thread::spawn(move || {
        // Each connection is held 1.8 s without a word, then closed; at most two,
        // and no new one after 6 s.
        let start = std::time::Instant::now();
        let mut seen = 0;
        while seen < 2 && start.elapsed() < Duration::from_secs(6) {
            match l.accept() {
                Ok((s, _)) => {
                    seen += 1;
                    std::thread::sleep(Duration::from_millis(1800));
                    drop(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        seen
    });
    let start = std::time::Instant::now();
    let err = session::connect_channel_to(&Endpoint::Tcp(addr), &cfg, 0).unwrap_err();
    let took = start.elapsed();
    assert_eq!(peer.join().unwrap(), 2, "the source did not reopen: {err}");
    println!("FIGURE gave up after {took:.2?} (handshake timeout 2 s): {err}");
    assert!(
        took < Duration::from_millis(3000),
        "the handshakes took {took:?} in all, past the 2 s timeout: {err}"
    );
}
