//! TLS 1.3 around channels: encrypted transfers over every backend, certificate
//! failures, encryption mismatches with their REJECT reasons, a tampered record, and
//! a relay that splices two TLS sessions.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use pagewire_protocol::RegionId;
use pagewire_protocol::{AuthMethod, Authentication, HandshakeError, RejectReason, SessionKey};
use pagewire_transport::session::{self, Backend, Listener, SessionConfig, SessionError};
use pagewire_transport::tls::NotPinned;
use pagewire_transport::tls::generate::{self, Pki, Validity};
use pagewire_transport::{
    Channel, ChannelError, Completed, GuestMemory, Incoming, RegionSink, TlsConfig, TlsError,
};

fn pki() -> Pki {
    generate::pki("test CA", &["localhost", "127.0.0.1"]).unwrap()
}

/// Source and destination configurations of one session over TLS.
fn tls_configs(
    session: u8,
    channels: u16,
    src: TlsConfig,
    dst: TlsConfig,
) -> (SessionConfig, SessionConfig) {
    let base = config(session, channels);
    (base.clone().with_tls(src), base.with_tls(dst))
}

/// Runs the source's connect against a listener bound with `dst`; returns both sides'
/// outcomes (the destination's: the accept, or its refusals when it timed out).
fn attempt(
    src: &SessionConfig,
    dst: &SessionConfig,
) -> (
    Result<Vec<session::Established>, SessionError>,
    Result<session::Accepted, SessionError>,
) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), dst).unwrap();
    let addr = l.local_addr().unwrap();
    let c = src.clone();
    let t = std::thread::spawn(move || session::connect(addr, &c));
    let acc = l.accept_session(dst, Duration::from_secs(3));
    (t.join().unwrap(), acc)
}

/// Sends `pages` pages of patterned memory as raw frames over an encrypted session
/// and checks they arrive byte for byte.
fn encrypted_transfer(backend: Backend, auth: Authentication) {
    let p = pki();
    transfer_with(
        backend,
        auth,
        p.source_config("localhost").unwrap(),
        p.destination_config().unwrap(),
    );
}

/// As [`encrypted_transfer`], with the sides' TLS settings given.
fn transfer_with(backend: Backend, auth: Authentication, src: TlsConfig, dst: TlsConfig) {
    let (mut src, mut dst) = tls_configs(31, 2, src, dst);
    src.auth = auth.clone();
    dst.auth = auth.clone();
    let pages = 2048;
    let src_mem = patterned(pages, 9);
    let dst_mem = GuestMemory::anonymous(pages * PAGE).unwrap();
    src.uring.guest = vec![src_mem.clone()];
    let (s, d) = {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let addr = l.local_addr().unwrap();
        let c = src.clone();
        let t = std::thread::spawn(move || session::connect(addr, &c).unwrap());
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        (t.join().unwrap(), acc.channels)
    };
    let expected = match auth {
        Authentication::None => None,
        _ => Some(AuthMethod::HMAC_SHA256_TLS_EXPORTER),
    };
    for e in s.iter().chain(&d) {
        assert!(e.tls.is_some());
        assert_eq!(e.negotiated.auth, expected);
    }
    let receivers: Vec<_> = d
        .into_iter()
        .map(|est| {
            let (mem, cfg) = (dst_mem.clone(), dst.clone());
            std::thread::spawn(move || {
                let mut ch = est.open(&backend, &cfg).unwrap();
                let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), mem)]);
                let mut placed = 0;
                while let Some(inc) = ch.recv(Some(&mut sink)).unwrap() {
                    assert!(matches!(inc, Incoming::Placed(_)), "{inc:?}");
                    placed += 1;
                }
                (placed, ch.stats())
            })
        })
        .collect();
    let frames = pages / 64;
    let senders: Vec<_> = s
        .into_iter()
        .enumerate()
        .map(|(i, est)| {
            let (mem, cfg) = (src_mem.clone(), src.clone());
            std::thread::spawn(move || {
                let mut ch = est.open(&backend, &cfg).unwrap();
                let mut done: Vec<Completed> = Vec::new();
                for (k, f) in (i..frames).step_by(2).enumerate() {
                    ch.send(raw_frame(&mem, (f * 64) as u64, 64)).unwrap();
                    ch.poll_completions(&mut done).unwrap();
                    if k % 2 == 1 {
                        // At most two frames in flight: their records buffers are
                        // reused for the next ones.
                        ch.flush(&mut done).unwrap();
                    }
                }
                ch.close(&mut done).unwrap();
                ch.stats()
            })
        })
        .collect();
    let mut sealed = 0;
    for t in senders {
        let st = t.join().unwrap();
        sealed += st.tls_bytes_sealed;
        assert!(st.tls_bytes_copied >= st.tls_bytes_sealed);
        // 16 frames per channel, sealed into at most a few buffers (the first frame
        // grows the handshake's; io_uring keeps two more in flight).
        assert!(
            st.tls_send_buffer_allocations <= 4,
            "{} records buffers allocated for {} frames",
            st.tls_send_buffer_allocations,
            st.frames_sent
        );
    }
    let (mut placed, mut opened) = (0, 0);
    for t in receivers {
        let (n, st) = t.join().unwrap();
        placed += n;
        opened += st.tls_bytes_opened;
        assert_eq!(st.bytes_placed, n as u64 * 64 * PAGE as u64);
    }
    assert_eq!(placed, frames);
    assert!(sealed >= (pages * PAGE) as u64 && opened >= (pages * PAGE) as u64);
    assert_eq!(
        first_difference(&src_mem, &dst_mem),
        None,
        "content differs"
    );
}

#[test]
fn encrypted_transfer_over_tcp_is_byte_for_byte() {
    encrypted_transfer(Backend::Tcp, Authentication::None);
}

#[test]
fn encrypted_transfer_over_io_uring_is_byte_for_byte() {
    if uring_available() {
        encrypted_transfer(URING, Authentication::None);
    }
}

#[test]
fn a_key_inside_tls_negotiates_the_exporter_binding() {
    let key = SessionKey::new(*b"0123456789abcdef-psk").unwrap();
    encrypted_transfer(Backend::Tcp, Authentication::PreSharedKey(key));
}

fn is_tls_failure(e: &SessionError) -> bool {
    matches!(e, SessionError::Tls { .. })
}

#[test]
fn a_destination_signed_by_another_ca_is_refused() {
    let (a, b) = (pki(), generate::pki("another CA", &["localhost"]).unwrap());
    let (src, dst) = tls_configs(
        32,
        1,
        a.source_config("localhost").unwrap(),
        b.destination_config().unwrap(),
    );
    let (s, d) = attempt(&src, &dst);
    let e = s.unwrap_err();
    assert!(
        matches!(
            &e,
            SessionError::Tls {
                source: TlsError::Protocol(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                )),
                ..
            }
        ),
        "{e}"
    );
    let d = d.unwrap_err();
    assert!(matches!(d, SessionError::Incomplete { have: 0, .. }), "{d}");
}

#[test]
fn a_wrong_server_name_is_refused() {
    let p = pki();
    let (src, dst) = tls_configs(
        33,
        1,
        p.source_config("migration.example").unwrap(),
        p.destination_config().unwrap(),
    );
    let e = attempt(&src, &dst).0.unwrap_err();
    assert!(
        matches!(
            &e,
            SessionError::Tls {
                source: TlsError::Protocol(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )),
                ..
            }
        ),
        "{e}"
    );
}

/// With `configs` made from certificates of which one side's expired: the source
/// refuses an expired destination certificate (saying it expired), the destination
/// an expired source certificate (the source sees the alert, the destination gets no
/// channel).
fn expired_refused_on_either_side(session: u8, configs: impl Fn(&Pki) -> (TlsConfig, TlsConfig)) {
    let p = generate::pki_with("ca", &["localhost"], Validity::Current, Validity::Expired).unwrap();
    let (s, d) = configs(&p);
    let (src, dst) = tls_configs(session, 1, s, d);
    let e = attempt(&src, &dst).0.unwrap_err();
    assert!(
        matches!(
            &e,
            SessionError::Tls {
                source: TlsError::Protocol(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )),
                ..
            }
        ),
        "{e}"
    );
    let p = generate::pki_with("ca", &["localhost"], Validity::Expired, Validity::Current).unwrap();
    let (s, d) = configs(&p);
    let (src, dst) = tls_configs(session + 1, 1, s, d);
    let (s, d) = attempt(&src, &dst);
    let e = s.unwrap_err();
    assert!(is_tls_failure(&e), "{e}");
    let d = d.unwrap_err();
    assert!(matches!(d, SessionError::Incomplete { have: 0, .. }), "{d}");
}

#[test]
fn expired_certificates_are_refused_on_either_side() {
    expired_refused_on_either_side(34, |p| {
        (
            p.source_config("localhost").unwrap(),
            p.destination_config().unwrap(),
        )
    });
}

#[test]
fn a_source_without_a_certificate_is_refused() {
    let p = pki();
    let good = p.source_config("localhost").unwrap();
    let (client, name) = good.rustls_client().unwrap();
    // The same trust, no client certificate.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(p.ca_pem.as_bytes()) {
            r.add(c.unwrap()).unwrap();
        }
        r
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(client.crypto_provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (src, dst) = tls_configs(
        36,
        1,
        TlsConfig::client(Arc::new(anonymous), name.clone()),
        p.destination_config().unwrap(),
    );
    let e = attempt(&src, &dst).0.unwrap_err();
    assert!(
        matches!(
            &e,
            SessionError::Tls {
                source: TlsError::Protocol(rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateRequired
                )),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn pinned_certificates_carry_a_transfer_over_tcp_and_io_uring() {
    let p = pki();
    let mut backends = vec![Backend::Tcp];
    if uring_available() {
        backends.push(URING);
    } else {
        eprintln!("skipped the io_uring half: io_uring is not available");
    }
    for backend in backends {
        transfer_with(
            backend,
            Authentication::None,
            p.source_pinned_config("localhost").unwrap(),
            p.destination_pinned_config().unwrap(),
        );
    }
}

/// Whether `e` is a TLS failure because the peer's certificate is not pinned.
fn is_not_pinned(e: &SessionError) -> bool {
    match e {
        SessionError::Tls {
            source:
                TlsError::Protocol(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    o,
                ))),
            ..
        } => o.0.downcast_ref::<NotPinned>().is_some(),
        _ => false,
    }
}

#[test]
fn a_source_refuses_a_destination_certificate_it_did_not_pin() {
    let p = pki();
    // The source pins its own certificate: signed by the same CA, valid for no
    // destination name, not the destination's.
    let src = TlsConfig::from_pinned_pem(
        p.source.cert_pem.as_bytes(),
        p.source.cert_pem.as_bytes(),
        p.source.key_pem.as_bytes(),
        "localhost",
    )
    .unwrap();
    let (src, dst) = tls_configs(38, 1, src, p.destination_pinned_config().unwrap());
    let (s, d) = attempt(&src, &dst);
    let e = s.unwrap_err();
    assert!(is_not_pinned(&e), "{e}");
    assert!(
        e.to_string().contains("not one of the pinned certificates"),
        "{e}"
    );
    let d = d.unwrap_err();
    assert!(matches!(d, SessionError::Incomplete { have: 0, .. }), "{d}");
}

#[test]
fn a_destination_refuses_a_source_certificate_it_did_not_pin() {
    let p = pki();
    // Another source, signed by the same CA, that the destination did not pin.
    let other = generate::pki("test CA", &["localhost"]).unwrap();
    let stranger = TlsConfig::from_pinned_pem(
        p.destination.cert_pem.as_bytes(),
        other.source.cert_pem.as_bytes(),
        other.source.key_pem.as_bytes(),
        "localhost",
    )
    .unwrap();
    let (good, dst) = tls_configs(
        39,
        1,
        p.source_pinned_config("localhost").unwrap(),
        p.destination_pinned_config().unwrap(),
    );
    let bad = good.clone().with_tls(stranger);
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
    let addr = l.local_addr().unwrap();
    // The stranger first (refused), then the pinned source (accepted).
    let t = std::thread::spawn(move || {
        let bad = session::connect(addr, &bad);
        (bad, session::connect(addr, &good))
    });
    let acc = l.accept_session(&dst, Duration::from_secs(10)).unwrap();
    let (bad, good) = t.join().unwrap();
    assert_eq!(good.unwrap().len(), 1);
    assert_eq!(acc.channels.len(), 1);
    // The destination says why it refused the stranger; the stranger hears an alert.
    assert!(acc.refused.iter().any(is_not_pinned), "{:?}", acc.refused);
    let e = bad.unwrap_err();
    assert!(is_tls_failure(&e), "{e}");
}

#[test]
fn an_expired_pinned_certificate_is_refused_on_either_side() {
    expired_refused_on_either_side(40, |p| {
        (
            p.source_pinned_config("localhost").unwrap(),
            p.destination_pinned_config().unwrap(),
        )
    });
}

#[test]
fn a_plaintext_source_gets_encryption_required() {
    let p = pki();
    let src = config(37, 1);
    let dst = config(37, 1).with_tls(p.destination_config().unwrap());
    let (s, d) = attempt(&src, &dst);
    let e = s.unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Handshake {
                source: HandshakeError::Rejected {
                    reason: RejectReason::ENCRYPTION_REQUIRED,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    let d = d.unwrap_err();
    assert!(matches!(d, SessionError::Incomplete { have: 0, .. }), "{d}");
}

#[test]
fn a_tls_source_gets_encryption_unsupported_from_a_plaintext_destination() {
    let p = pki();
    let src = config(38, 1).with_tls(p.source_config("localhost").unwrap());
    let dst = config(38, 1);
    let e = attempt(&src, &dst).0.unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Handshake {
                source: HandshakeError::Rejected {
                    reason: RejectReason::ENCRYPTION_UNSUPPORTED,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_session_must_match_its_listener() {
    let p = pki();
    let plain = config(39, 1);
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &plain).unwrap();
    let tls = config(39, 1).with_tls(p.destination_config().unwrap());
    assert!(matches!(
        l.accept_session(&tls, Duration::from_millis(10)),
        Err(SessionError::Config(_))
    ));
}

/// Forwards bytes between `a` and `b` until both close or `deadline`; in the a → b
/// direction, once `armed`, flips one byte in the body of the next TLS record.
fn relay(a: TcpStream, b: TcpStream, armed: Arc<AtomicBool>, deadline: Instant) -> bool {
    let mut flipped = false;
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = b2.read(&mut buf) {
            if n == 0 || a2.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = a2.shutdown(std::net::Shutdown::Write);
    });
    let (mut a, mut b) = (a, b);
    a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // Record tracking: bytes left in the current record, and its header so far.
    let (mut left, mut head) = (0usize, Vec::new());
    let mut buf = [0u8; 16384];
    while Instant::now() < deadline {
        let n = match a.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        let mut i = 0;
        while i < n {
            if left == 0 {
                head.push(buf[i]);
                i += 1;
                if head.len() == 5 {
                    left = usize::from(u16::from_be_bytes([head[3], head[4]]));
                    head.clear();
                }
                continue;
            }
            let take = left.min(n - i);
            if !flipped && armed.load(Ordering::SeqCst) && take > 10 {
                buf[i + 10] ^= 0x01;
                flipped = true;
            }
            left -= take;
            i += take;
        }
        if b.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = b.shutdown(std::net::Shutdown::Write);
    let _ = back.join();
    flipped
}

/// A listener whose one connection is relayed to `to`.
fn spawn_relay(
    to: SocketAddr,
    armed: Arc<AtomicBool>,
) -> (SocketAddr, std::thread::JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        relay(a, b, armed, Instant::now() + Duration::from_secs(20))
    });
    (addr, t)
}

#[test]
fn a_tampered_record_fails_the_channel_and_places_nothing() {
    for backend in backends() {
        let p = pki();
        let (src, dst) = tls_configs(
            40,
            1,
            p.source_config("localhost").unwrap(),
            p.destination_config().unwrap(),
        );
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let (relay_addr, relay_t) = spawn_relay(l.local_addr().unwrap(), armed.clone());
        let c = src.clone();
        let arm = armed.clone();
        let pages = 256;
        let src_mem = patterned(pages, 3);
        let m = src_mem.clone();
        let sender = std::thread::spawn(move || {
            let est = session::connect(relay_addr, &c).unwrap();
            // The handshake is done: the next record the relay sees carries pages.
            arm.store(true, Ordering::SeqCst);
            let mut ch = est.into_iter().next().unwrap().open(&backend, &c).unwrap();
            let mut done = Vec::new();
            for f in 0..4 {
                if ch.send(raw_frame(&m, f * 64, 64)).is_err() {
                    break;
                }
            }
            let _ = ch.close(&mut done);
        });
        let acc = l.accept_session(&dst, Duration::from_secs(20)).unwrap();
        let est = acc.channels.into_iter().next().unwrap();
        let dst_mem = GuestMemory::anonymous(pages * PAGE).unwrap();
        let mut ch = est.open(&backend, &dst).unwrap();
        let mut sink = RegionSink::new(PAGE as u32, vec![(RegionId(0), dst_mem.clone())]);
        let err = match ch.recv(Some(&mut sink)) {
            Ok(Some(inc)) => panic!("a frame got through a tampered record: {inc:?}"),
            Ok(None) => panic!("the channel ended cleanly despite tampering"),
            Err(e) => e,
        };
        assert!(
            matches!(
                err,
                ChannelError::Tls(TlsError::Protocol(rustls::Error::DecryptError))
            ),
            "{err}"
        );
        assert_eq!(ch.stats().bytes_placed, 0);
        let zero = GuestMemory::anonymous(pages * PAGE).unwrap();
        assert_eq!(first_difference(&dst_mem, &zero), None, "a page was placed");
        drop(ch);
        let _ = sender.join();
        assert!(relay_t.join().unwrap(), "the relay flipped a byte");
    }
}

/// A man in the middle with valid certificates on both sides: it terminates the
/// source's TLS as a destination and opens its own TLS to the destination as a
/// source, and copies the plaintext between them.
fn splicing_relay(p: &Pki, to: SocketAddr) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let as_server = p
        .destination_config()
        .unwrap()
        .rustls_server()
        .unwrap()
        .clone();
    let src_cfg = p.source_config("localhost").unwrap();
    let (as_client, name) = src_cfg.rustls_client().unwrap();
    let (as_client, name) = (as_client.clone(), name.clone());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let mut sa = rustls::StreamOwned::new(rustls::ServerConnection::new(as_server).unwrap(), a);
        let mut sb =
            rustls::StreamOwned::new(rustls::ClientConnection::new(as_client, name).unwrap(), b);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let Some(a) = pump(&mut sa, &mut sb, &mut buf) else {
                break;
            };
            let Some(b) = pump(&mut sb, &mut sa, &mut buf) else {
                break;
            };
            let moved = a || b;
            if !moved && sb.conn.is_handshaking() {
                // Drive the outgoing handshake even while the source is quiet.
                let _ = sb.conn.complete_io(&mut sb.sock);
            }
        }
    });
    (addr, t)
}

#[test]
fn a_relay_splicing_two_tls_sessions_fails_authentication() {
    let p = pki();
    let key = Authentication::PreSharedKey(SessionKey::new(*b"the session's own key").unwrap());
    let (mut src, mut dst) = tls_configs(
        41,
        1,
        p.source_config("localhost").unwrap(),
        p.destination_config().unwrap(),
    );
    src.auth = key.clone();
    dst.auth = key;
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
    let (relay_addr, relay_t) = splicing_relay(&p, l.local_addr().unwrap());
    let c = src.clone();
    let t = std::thread::spawn(move || session::connect(relay_addr, &c));
    let acc = l.accept_session(&dst, Duration::from_secs(3));
    let e = t.join().unwrap().unwrap_err();
    // The destination's proof covers its own TLS session's exporter, which is not the
    // source's: the source refuses it.
    assert!(
        matches!(
            e,
            SessionError::Handshake {
                source: HandshakeError::AuthFailed,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(acc, Err(SessionError::Incomplete { have: 0, .. })));
    relay_t.join().unwrap();
}

/// Moves what `from` has to `to`: `Some(true)` when bytes moved, `Some(false)` when
/// nothing was ready, `None` when either side is closed or failed.
fn pump(from: &mut impl Read, to: &mut impl Write, buf: &mut [u8]) -> Option<bool> {
    match from.read(buf) {
        Ok(0) => None,
        Ok(n) => to.write_all(&buf[..n]).ok().map(|()| true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Some(false)
        }
        Err(_) => None,
    }
}

#[test]
fn an_oversized_tls_record_before_the_handshake_is_refused_at_once() {
    // A record header declaring 65,535 bytes, more than a TLS 1.3 record holds, then a
    // stream of bytes. Before, the listener kept what fitted its buffer, dropped the
    // rest unread and held the connection until its handshake deadline, reading
    // whatever the peer sent on the thread that runs every pending handshake.
    let p = pki();
    let (src, mut dst) = tls_configs(
        41,
        1,
        p.source_config("localhost").unwrap(),
        p.destination_config().unwrap(),
    );
    dst.handshake_timeout = Duration::from_secs(120);
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
    let addr = l.local_addr().unwrap();
    let (acc, (closed, legit)) = std::thread::scope(|s| {
        let clients = s.spawn(|| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut junk = vec![0x16, 0x03, 0x01, 0xff, 0xff];
            junk.resize(256 << 10, 0x41);
            // It may fail part-way: the listener closes the connection.
            let _ = c.write_all(&junk);
            let mut b = [0u8; 1024];
            let closed = loop {
                match c.read(&mut b) {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            };
            (closed, session::connect(addr, &src))
        });
        let acc = l.accept_session(&dst, Duration::from_secs(60));
        (acc, clients.join().unwrap())
    });
    assert!(
        closed,
        "the listener kept the connection until its deadline"
    );
    let acc = acc.unwrap();
    assert_eq!(legit.unwrap().len(), 1);
    assert_eq!(acc.channels.len(), 1);
    assert!(acc.stats.refused_handshake >= 1, "{:?}", acc.stats);
}

#[test]
fn a_tls_source_gets_in_through_a_flood_of_begun_handshakes() {
    // Connections that send the first two bytes of a TLS record and stop, opened as
    // fast as possible and held. They rank with a TLS source's connection until its
    // TLS handshake completes (both sent bytes short of it), so the source's place is
    // only as safe as the time `max_pending` newcomers take: a short flood-free window
    // is not needed, but the source may be turned away and connect again.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let p = pki();
    let (src, mut dst) = tls_configs(
        42,
        2,
        p.source_config("localhost").unwrap(),
        p.destination_config().unwrap(),
    );
    dst.handshake_timeout = Duration::from_secs(30);
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
    let addr = l.local_addr().unwrap();
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let acc = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut open = Vec::new();
            let t = Instant::now();
            // Bounded: it stops when the accept returns, or after 60 s, and holds at
            // most 600 connections (the oldest are closed).
            while !stop.load(Relaxed) && t.elapsed() < Duration::from_secs(60) {
                if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                    let _ = c.write_all(&[0x16, 0x03]);
                    open.push(c);
                    if open.len() > 600 {
                        open.remove(0);
                    }
                    opened.fetch_add(1, Relaxed);
                }
            }
        });
        let source = s.spawn(|| {
            for _ in 0..6000 {
                if opened.load(Relaxed) >= 300 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            session::connect(addr, &src)
        });
        let acc = l.accept_session(&dst, Duration::from_secs(30));
        let source = source.join().unwrap();
        stop.store(true, Relaxed);
        flooder.join().unwrap();
        assert_eq!(source.expect("the TLS source's handshake").len(), 2);
        acc.expect("the TLS source got in during the flood")
    });
    println!(
        "FIGURE {} connections that began a TLS record, during the accept: {:?}",
        opened.load(Relaxed),
        acc.stats
    );
    assert_eq!(acc.channels.len(), 2);
    assert!(acc.stats.evicted >= 100, "{:?}", acc.stats);
}

/// `Channel::has_input` sees a frame the peer sent that waits anywhere on the way in:
/// in the channel's buffer, in the TLS layer (records read from the socket together
/// but opened one at a time), in io_uring's receive buffers, or in the socket; and
/// nothing once it was read. A source relies on it to read, before it sends a frame
/// that must be answered, the answers the destination sent ahead.
#[test]
fn has_input_sees_a_frame_waiting_on_every_backend_with_and_without_tls() {
    use pagewire_protocol::{Ack, AckKind, Frame};
    use pagewire_transport::OutFrame;
    let p = pki();
    for backend in backends() {
        for tls in [false, true] {
            let (mut src, mut dst) = if tls {
                tls_configs(
                    41,
                    1,
                    p.source_config("localhost").unwrap(),
                    p.destination_config().unwrap(),
                )
            } else {
                (config(41, 1), config(41, 1))
            };
            src.uring.guest = Vec::new();
            dst.uring.guest = Vec::new();
            let l = Listener::bind("127.0.0.1:0".parse().unwrap(), &dst).unwrap();
            let addr = l.local_addr().unwrap();
            let c = src.clone();
            let t = std::thread::spawn(move || session::connect(addr, &c).unwrap());
            let mut d = l
                .accept_session(&dst, Duration::from_secs(20))
                .unwrap()
                .channels;
            let mut s = t.join().unwrap();
            let mut sender = d.remove(0).open(&backend, &dst).unwrap();
            let mut receiver = s.remove(0).open(&backend, &src).unwrap();
            let ctx = format!("{backend:?} tls {tls}");
            assert!(!receiver.has_input().unwrap(), "{ctx}: nothing sent yet");
            // Two frames, each in its own write (and TLS record), before the receiver
            // reads anything.
            let mut done = Vec::new();
            for value in [1, 2] {
                let ack = Frame::Ack(Ack {
                    kind: AckKind::ROUND,
                    value,
                });
                sender.send(OutFrame::whole(&ack).unwrap()).unwrap();
                sender.flush(&mut done).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
            for value in [1, 2] {
                assert!(receiver.has_input().unwrap(), "{ctx}: frame {value} waits");
                match receiver.recv(None).unwrap() {
                    Some(Incoming::Frame(Frame::Ack(a))) => assert_eq!(a.value, value, "{ctx}"),
                    other => panic!("{ctx}: {other:?}"),
                }
            }
            assert!(!receiver.has_input().unwrap(), "{ctx}: all read");
            // A frame that arrives while the receiver is busy sending: io_uring's
            // multishot receive takes it into its buffers when the send enters the
            // ring, and the socket no longer looks readable.
            let ack = |value| {
                OutFrame::whole(&Frame::Ack(Ack {
                    kind: AckKind::ROUND,
                    value,
                }))
                .unwrap()
            };
            sender.send(ack(3)).unwrap();
            sender.flush(&mut done).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            receiver.send(ack(9)).unwrap();
            receiver.flush(&mut done).unwrap();
            assert!(receiver.has_input().unwrap(), "{ctx}: frame 3 waits");
            assert!(matches!(
                receiver.recv(None).unwrap(),
                Some(Incoming::Frame(Frame::Ack(Ack { value: 3, .. })))
            ));
            // The peer's close is input too (a receive would end the channel).
            sender.close(&mut done).unwrap();
            drop(sender);
            std::thread::sleep(Duration::from_millis(100));
            assert!(receiver.has_input().unwrap(), "{ctx}: the close waits");
        }
    }
}
