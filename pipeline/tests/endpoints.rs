//! Whole migrations over Unix sockets and over sockets the caller connected or bound
//! (a management layer handing them to the VMM), memory equal byte for byte while a
//! writer keeps dirtying the source; and the errors of a wrong stream count and of a
//! Unix socket that is not there.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pagewire::source::ChannelTransport;
use pagewire::{
    DestinationConfig, DestinationListener, Endpoint, GuestMemory, MigrationError, Source,
    SourceConfig, Stream,
};
use pagewire_protocol::{Authentication, RegionId, SessionKey};
use pagewire_transport::session::{Backend, SessionError};
use pagewire_transport::tcp::TcpError;

const CHANNELS: u16 = 3;

fn key() -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(*b"endpoint test key, 32 bytes....").unwrap())
}

fn destination_config(n: u8, backend: Backend) -> DestinationConfig {
    let mut cfg = DestinationConfig::new(session(n), key());
    cfg.backend = backend;
    cfg.accept_timeout = Duration::from_secs(30);
    cfg.idle_timeout = Duration::from_secs(30);
    cfg
}

fn source_config(n: u8, backend: Backend) -> SourceConfig {
    let mut cfg = SourceConfig::new(session(n), key());
    cfg.channels = CHANNELS;
    cfg.backend = backend;
    cfg.ack_timeout = Duration::from_secs(30);
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 6;
    cfg
}

/// Pre-copy migration of 16 MiB under a writer: `listen` makes the destination, and
/// `open` the source from the source's memory and configuration.
fn migrate_with(
    n: u8,
    backend: Backend,
    listen: impl FnOnce(DestinationConfig) -> DestinationListener,
    open: impl FnOnce(Arc<GuestMemory>, SourceConfig) -> Source + Send + 'static,
) {
    let src_mem = memory(16);
    fill(&src_mem, u64::from(n));
    let listener = listen(destination_config(n, backend));
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut guest = guest(src_mem.clone(), 20_000, u64::from(n));
    let mut source = open(src_mem.clone(), source_config(n, backend));
    let want = match backend {
        Backend::Uring { .. } => ChannelTransport::Uring,
        _ => ChannelTransport::Tcp,
    };
    assert_eq!(
        source.channel_transports(),
        vec![want; usize::from(CHANNELS)]
    );
    let mut log = guest.log();
    let mut vcpus = guest.vcpus();
    let mut devices =
        |out: &mut pagewire::DeviceStateWriter<'_>| -> Result<(), pagewire::DirtyLogError> {
            out.write_section("cpu", 0, &[n; 4096])?;
            Ok(())
        };
    let stats = pagewire::migrate(&mut source, &mut log, &mut vcpus, &mut devices).unwrap();
    guest.stop();
    drop(source);
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&src_mem, &migrated.memory), None);
    assert_eq!(migrated.device_state[0].data, vec![n; 4096]);
    assert_eq!(stats.status, "completed");
    assert!(guest.writes() > 0);
}

/// io_uring without fallback, when this machine has it.
fn uring() -> Option<Backend> {
    uring_available().then_some(Backend::Uring {
        fallback_to_tcp: false,
    })
}

fn over_unix_socket(n: u8, backend: Backend) {
    let dir = TempDir::new();
    let ep = Endpoint::Unix(dir.path.join("dst.sock"));
    let ep2 = ep.clone();
    within(
        Duration::from_secs(120),
        "a migration over a Unix socket",
        move || {
            migrate_with(
                n,
                backend,
                |cfg| {
                    let l = DestinationListener::bind_endpoint(&ep, cfg).unwrap();
                    assert_eq!(l.local_endpoint().unwrap(), ep);
                    l
                },
                move |mem, cfg| Source::connect_to(&ep2, mem, cfg).unwrap(),
            )
        },
    );
}

#[test]
fn migration_over_a_unix_socket_tcp_backend() {
    over_unix_socket(1, Backend::Tcp);
}

#[test]
fn migration_over_a_unix_socket_io_uring_backend() {
    if let Some(b) = uring() {
        over_unix_socket(2, b);
    }
}

#[test]
fn migration_over_pre_connected_tcp_streams_to_a_pre_bound_listener() {
    within(
        Duration::from_secs(120),
        "a migration over given sockets",
        || {
            let std_l = std::net::TcpListener::bind(loopback()).unwrap();
            let addr = std_l.local_addr().unwrap();
            migrate_with(
                3,
                Backend::Tcp,
                |cfg| DestinationListener::from_listener(std_l, cfg).unwrap(),
                move |mem, cfg| {
                    let streams = (0..CHANNELS)
                        .map(|_| Stream::from(std::net::TcpStream::connect(addr).unwrap()))
                        .collect();
                    Source::from_streams(streams, mem, cfg).unwrap()
                },
            )
        },
    );
}

#[test]
fn migration_to_a_pre_bound_tcp_listener() {
    within(
        Duration::from_secs(120),
        "a migration to a given listener",
        || {
            let std_l = std::net::TcpListener::bind(loopback()).unwrap();
            let addr = std_l.local_addr().unwrap();
            migrate_with(
                4,
                Backend::Tcp,
                |cfg| {
                    let l = DestinationListener::from_listener(std_l, cfg).unwrap();
                    assert_eq!(l.local_addr().unwrap(), addr);
                    l
                },
                move |mem, cfg| Source::connect(addr, mem, cfg).unwrap(),
            )
        },
    );
}

#[test]
fn migration_over_pre_connected_unix_streams_with_io_uring() {
    let Some(backend) = uring() else { return };
    let dir = TempDir::new();
    let path = dir.path.join("given.sock");
    within(
        Duration::from_secs(120),
        "a migration over given Unix sockets",
        move || {
            let std_l = UnixListener::bind(&path).unwrap();
            migrate_with(
                5,
                backend,
                |cfg| DestinationListener::from_listener(std_l, cfg).unwrap(),
                move |mem, cfg| {
                    let streams = (0..CHANNELS)
                        .map(|_| Stream::from(UnixStream::connect(&path).unwrap()))
                        .collect();
                    Source::from_streams(streams, mem, cfg).unwrap()
                },
            )
        },
    );
}

#[test]
fn a_stream_count_other_than_channels_is_a_config_error() {
    let l = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let streams: Vec<Stream> = (0..CHANNELS - 1)
        .map(|_| std::net::TcpStream::connect(addr).unwrap().into())
        .collect();
    let mem = memory(1);
    let err = Source::from_streams(streams, mem, source_config(6, Backend::Tcp)).unwrap_err();
    assert!(matches!(err, MigrationError::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("2 pre-connected streams") && msg.contains("3 channels"),
        "{msg}"
    );
}

#[test]
fn a_missing_unix_socket_fails_after_the_configured_attempts() {
    let dir = TempDir::new();
    let path = dir.path.join("nobody.sock");
    let mut cfg = source_config(7, Backend::Tcp);
    cfg.connect_attempts = 3;
    cfg.connect_retry_delay = Duration::from_millis(1);
    let err = Source::connect_to(&Endpoint::Unix(path.clone()), memory(1), cfg).unwrap_err();
    let MigrationError::Session(SessionError::Tcp(TcpError::Connect {
        addr,
        attempts,
        source,
    })) = &err
    else {
        panic!("not a connect error: {err:?}");
    };
    assert_eq!(*attempts, 3);
    assert_eq!(*addr, Endpoint::Unix(path.clone()));
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    // Many VMMs log `{e}` only: it names the socket and the attempts.
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("3 attempts"), "{msg}");
    assert!(
        !path.exists(),
        "a failed connect leaves nothing at the path"
    );
}

#[test]
fn regions_arrive_whole_over_a_unix_socket_without_a_writer() {
    // A single full round (no writer), checked region by region.
    let dir = TempDir::new();
    let ep = Endpoint::Unix(dir.path.join("r.sock"));
    let src_mem = memory(4);
    fill(&src_mem, 9);
    let listener =
        DestinationListener::bind_endpoint(&ep, destination_config(8, Backend::Tcp)).unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));
    let mut src = Source::connect_to(&ep, src_mem.clone(), source_config(8, Backend::Tcp)).unwrap();
    let all = src_mem
        .region_ids()
        .map(|id| (id, pagewire::DirtyBitmap::full(src_mem.pages(id).unwrap())))
        .collect();
    src.send_round(all, true).unwrap();
    assert!(src.complete().unwrap().is_committed());
    let migrated = dst.join().unwrap().unwrap();
    assert_eq!(first_difference(&src_mem, &migrated.memory), None);
    assert_eq!(
        migrated.memory.pages(RegionId(1)),
        src_mem.pages(RegionId(1))
    );
}
