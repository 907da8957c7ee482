//! RDMA from the migration engine on a machine without RDMA: a migration configured
//! with `Backend::Rdma` fails at once on both sides with an error naming what is
//! missing (the `rdma` feature in a default build, an RDMA device in an `rdma` build).
//! The transfer itself needs a device: `pagewire-transport`'s
//! `rdma::channel::tests::transfer_over_a_device` (ignored here, with its reason).

mod common;

use std::time::Duration;

use common::*;
use pagewire::{DestinationConfig, DestinationListener, MigrationError, Source, SourceConfig};
use pagewire_protocol::Authentication;
use pagewire_transport::rdma::{self, RdmaError};
use pagewire_transport::session::{Backend, SessionError};

/// What this build and host lack, as `rdma::available` says.
fn missing() -> Option<RdmaError> {
    rdma::available().err()
}

fn is_missing(e: &MigrationError) -> bool {
    let want_not_built = !cfg!(feature = "rdma");
    match e {
        MigrationError::Session(SessionError::Rdma(r)) => match **r {
            RdmaError::NotBuilt => want_not_built,
            RdmaError::NoDevice => !want_not_built,
            _ => false,
        },
        _ => false,
    }
}

#[test]
fn a_migration_over_rdma_without_rdma_fails_saying_what_is_missing() {
    let Some(why) = missing() else {
        eprintln!("skipped: RDMA is built and a device is present; see transfer_over_a_device");
        return;
    };
    let rdma_addr = "127.0.0.1:18515".parse().unwrap();
    // The destination refuses to listen.
    let mut dcfg = DestinationConfig::new(session(1), Authentication::None);
    dcfg.backend = Backend::Rdma { addr: rdma_addr };
    let err = DestinationListener::bind(loopback(), dcfg).unwrap_err();
    assert!(is_missing(&err), "{err:?}");
    assert!(
        err.to_string().ends_with(&why.to_string()),
        "the error says it plainly: {err}"
    );

    // The source: the stream handshakes succeed, then the channel cannot move to RDMA.
    let dcfg = DestinationConfig::new(session(1), Authentication::None);
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut cfg = SourceConfig::new(session(1), Authentication::None);
    cfg.channels = 2;
    cfg.backend = Backend::Rdma { addr: rdma_addr };
    cfg.ack_timeout = Duration::from_secs(5);
    let err = Source::connect(addr, memory(4), cfg).unwrap_err();
    assert!(is_missing(&err), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("rdma") || text.contains("RDMA"),
        "the message names RDMA: {text}"
    );
    // The destination sees its channels close and fails too (never a success).
    assert!(dst.join().unwrap().is_err());
}
