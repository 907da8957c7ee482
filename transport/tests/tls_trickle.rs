//! A TLS destination that trickles its answer: the source's handshake still ends at its
//! deadline, not once the trickled record is whole.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use pagewire_transport::session::{self, SessionError};
use pagewire_transport::tls::generate;

/// The destination completes TLS, then, instead of WELCOME, sends one record of 200
/// plaintext bytes a byte every 50 ms (over 10 s), against a handshake timeout of 1 s.
#[test]
fn a_trickled_record_cannot_stretch_the_handshake() {
    let p = generate::pki("test CA", &["localhost", "127.0.0.1"]).unwrap();
    let dst = p.destination_config().unwrap();
    let server = dst.rustls_server().expect("a server configuration").clone();
    let mut cfg = config(61, 1).with_tls(p.source_config("localhost").unwrap());
    cfg.handshake_timeout = Duration::from_secs(1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (sent, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (sent2, stop2) = (sent.clone(), stop.clone());
    let fake = std::thread::spawn(move || -> usize {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::ServerConnection::new(server).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut s).unwrap();
        }
        tls.writer().write_all(&[0x55; 200]).unwrap();
        let mut record = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut record).unwrap();
        }
        for b in &record {
            std::thread::sleep(Duration::from_millis(50));
            if stop2.load(Ordering::SeqCst) || s.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
            sent2.fetch_add(1, Ordering::SeqCst);
        }
        record.len()
    });
    let r = session::connect(addr, &cfg);
    let at = sent.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let total = fake.join().unwrap();
    eprintln!("{:?} with {at} of {total} bytes trickled", r.as_ref().err());
    assert!(
        matches!(&r, Err(SessionError::HandshakeIo { source, .. })
            if source.kind() == std::io::ErrorKind::TimedOut
                || source.kind() == std::io::ErrorKind::WouldBlock),
        "{:?}",
        r.err()
    );
    assert!(
        at < total,
        "the handshake waited for the whole trickled record ({at} of {total} bytes)"
    );
}
