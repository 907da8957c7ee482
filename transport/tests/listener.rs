//! The listener as a hostile client sees it: every test floods or cheats first, then a
//! legitimate session must still complete its handshake on the same listener.
//!
//! The tests that count the process's threads or lower its file-descriptor limit run
//! in a child process (this binary re-executed with one test selected), so the other
//! tests neither disturb the count nor suffer the limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use pagewire_protocol::{
    Authentication, Capabilities, ChannelId, ClientConfig, ClientHandshake, CodecSet,
    HandshakeError, RejectReason, SessionId, SessionKey,
};
use pagewire_transport::session::{
    self, Accepted, Established, Listener, ListenerStats, SessionConfig, SessionError,
};

const KEY: &[u8] = b"the listener tests' pre-shared key";
const SESSION: SessionId = SessionId([9; 16]);
/// Channels of the legitimate session.
const CHANNELS: u16 = 2;
/// The accept window: long, so that only per-connection deadlines end handshakes.
const WINDOW: Duration = Duration::from_secs(120);
const CHILD_ENV: &str = "PAGEWIRE_LISTENER_TEST_CHILD";

fn cfg(channels: u16, key: &[u8], handshake_timeout: Duration) -> SessionConfig {
    let auth = Authentication::PreSharedKey(SessionKey::new(key.to_vec()).unwrap());
    let mut c = SessionConfig::new(Capabilities::new(4096), SESSION, channels, auth);
    c.handshake_timeout = handshake_timeout;
    c
}

/// The destination's settings, with a short handshake deadline.
fn dst(handshake_timeout: Duration) -> SessionConfig {
    cfg(CHANNELS, KEY, handshake_timeout)
}

/// The legitimate source: generous client-side timeout, since it may wait in the
/// backlog behind a flood.
fn legit(addr: SocketAddr) -> Vec<Established> {
    session::connect(addr, &cfg(CHANNELS, KEY, Duration::from_secs(60))).unwrap()
}

fn bind(cfg: &SessionConfig) -> (Listener, SocketAddr) {
    let l = Listener::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Runs `accept_session` on this thread while `client` runs on another.
fn accept_while<T: Send>(
    l: &Listener,
    cfg: &SessionConfig,
    client: impl FnOnce() -> T + Send,
) -> (Accepted, T) {
    std::thread::scope(|s| {
        let c = s.spawn(client);
        let acc = l.accept_session(cfg, WINDOW);
        let out = c.join().unwrap();
        (acc.unwrap(), out)
    })
}

/// Waits (a bounded number of short sleeps) until the listener's counters satisfy `f`.
fn wait_until(l: &Listener, f: impl Fn(&ListenerStats) -> bool) {
    for _ in 0..6000 {
        if f(&l.stats()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("listener never got there: {:?}", l.stats());
}

fn assert_session(acc: &Accepted, src: &[Established]) {
    assert_eq!(acc.channels.len(), usize::from(CHANNELS));
    assert_eq!(src.len(), usize::from(CHANNELS));
    for (i, e) in acc.channels.iter().enumerate() {
        assert_eq!(usize::from(e.negotiated.channel.0), i);
        assert!(e.negotiated.auth.is_some());
    }
    assert_eq!(acc.stats.established, u64::from(CHANNELS));
}

/// A whole HELLO as the legitimate source would send it.
fn hello_bytes() -> Vec<u8> {
    hello_with(KEY, [3; 32])
}

/// A whole HELLO of the session for channel 0, from a source with `key`.
fn hello_with(key: &[u8], nonce: [u8; 32]) -> Vec<u8> {
    let c = cfg(CHANNELS, key, Duration::from_secs(1));
    let mut hs = ClientHandshake::new(
        ClientConfig {
            caps: c.caps,
            session: c.session,
            channel: ChannelId(0),
            channel_count: CHANNELS,
            auth: c.auth,
            require: CodecSet::empty(),
        },
        nonce,
    )
    .unwrap();
    let mut out = Vec::new();
    hs.take_output(&mut out);
    out
}

/// Reads /proc/self/status's `Threads:` and `VmRSS:` (kB).
fn threads_and_rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("Threads:"), field("VmRSS:"))
}

/// Whether this process is the child that runs test `name` alone.
fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// Re-executes this test binary with only test `name` selected, as a child process.
fn spawn_child(name: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The listening address the child printed as `ADDR <addr>` (the test harness prints
/// its own lines first, and the test's name before it on the same line).
fn child_addr(out: &mut impl BufRead) -> Option<SocketAddr> {
    for _ in 0..100 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        if let Some((_, a)) = line.trim().split_once("ADDR ") {
            return Some(a.parse().unwrap());
        }
    }
    None
}

/// Waits for the child, echoes its output, and checks it passed.
fn finish_child(mut child: std::process::Child, mut out: impl Read) {
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    print!("{rest}");
    assert!(status.success(), "the child failed: {status}\n{rest}");
}

#[test]
fn garbage_is_refused_and_the_session_still_opens() {
    let d = dst(Duration::from_secs(10));
    let (l, addr) = bind(&d);
    let (acc, src) = accept_while(&l, &d, || {
        let mut g = TcpStream::connect(addr).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // The listener answers with a REJECT and closes.
        g.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut sink = Vec::new();
        let _ = g.read_to_end(&mut sink);
        wait_until(&l, |s| s.refused_handshake == 1);
        legit(addr)
    });
    assert_session(&acc, &src);
    assert_eq!(acc.stats.refused_handshake, 1);
    assert!(acc.refused.iter().any(|e| matches!(
        e,
        SessionError::Handshake {
            source: HandshakeError::Decode(_),
            ..
        }
    )));
}

#[test]
fn a_wrong_key_is_refused_and_the_session_still_opens() {
    let d = dst(Duration::from_secs(10));
    let (l, addr) = bind(&d);
    let (acc, (wrong, src)) = accept_while(&l, &d, || {
        let wrong = session::connect_channel(
            addr,
            &cfg(
                CHANNELS,
                b"not the key of this session",
                Duration::from_secs(30),
            ),
            0,
        );
        wait_until(&l, |s| s.refused_handshake + s.closed == 1);
        (wrong, legit(addr))
    });
    assert!(matches!(
        wrong,
        Err(SessionError::Handshake {
            source: HandshakeError::AuthFailed,
            ..
        })
    ));
    assert_session(&acc, &src);
    assert_eq!(acc.stats.refused_handshake + acc.stats.closed, 1);
}

#[test]
fn slow_clients_time_out_on_their_own_deadline() {
    const SLOW: usize = 20;
    // Deadline of one handshake: 1 s; the accept window: 120 s.
    let d = dst(Duration::from_secs(1));
    let (l, addr) = bind(&d);
    let hello = hello_bytes();
    let (acc, (closed, src)) = accept_while(&l, &d, || {
        let closed: Vec<bool> = std::thread::scope(|s| {
            let clients: Vec<_> = (0..SLOW)
                .map(|_| {
                    let hello = &hello;
                    s.spawn(move || {
                        // One byte of a valid HELLO a second, until the listener
                        // closes the connection (a bounded number of tries).
                        let mut c = TcpStream::connect(addr).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        for b in hello.iter().take(60) {
                            if c.write_all(std::slice::from_ref(b)).is_err() {
                                return true;
                            }
                            let mut buf = [0u8; 64];
                            match c.read(&mut buf) {
                                Ok(0) => return true,
                                Ok(_) => return false, // an answer to half a HELLO?
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return true,
                            }
                        }
                        false
                    })
                })
                .collect();
            clients.into_iter().map(|c| c.join().unwrap()).collect()
        });
        wait_until(&l, |s| s.timed_out == SLOW as u64);
        (closed, legit(addr))
    });
    assert_eq!(closed, vec![true; SLOW], "each slow client was closed");
    assert_session(&acc, &src);
    assert_eq!(acc.stats.timed_out, SLOW as u64);
    assert!(acc.refused.iter().any(|e| matches!(
        e,
        SessionError::HandshakeIo { source, .. } if source.kind() == std::io::ErrorKind::TimedOut
    )));
}

#[test]
fn a_hello_with_65535_channels_is_refused_at_once() {
    // A long handshake deadline: the refusal must come from the HELLO, not a timeout.
    let d = dst(Duration::from_secs(60));
    let (l, addr) = bind(&d);
    let (acc, (greedy, src)) = accept_while(&l, &d, || {
        let greedy =
            session::connect_channel(addr, &cfg(u16::MAX, KEY, Duration::from_secs(60)), 0);
        (greedy, legit(addr))
    });
    assert!(
        matches!(
            greedy,
            Err(SessionError::Handshake {
                source: HandshakeError::Rejected {
                    reason: RejectReason::BAD_CHANNEL,
                    ..
                },
                peer_message: Some(_),
                ..
            })
        ),
        "{greedy:?}"
    );
    assert_session(&acc, &src);
    assert_eq!(acc.stats.refused_too_many_channels, 1);
    assert!(acc.refused.iter().any(|e| matches!(
        e,
        SessionError::TooManyChannels {
            count: u16::MAX,
            max: 64,
            ..
        }
    )));
}

#[test]
fn the_listener_serves_one_session_after_another() {
    let d = dst(Duration::from_secs(10));
    let (l, addr) = bind(&d);
    // Nobody comes: the attempt fails and the listener stays.
    let e = l
        .accept_session(&d, Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(e, SessionError::Incomplete { have: 0, .. }));
    for _ in 0..2 {
        let (acc, src) = accept_while(&l, &d, || legit(addr));
        assert_session(&acc, &src);
    }
    assert_eq!(l.stats().established, 2 * u64::from(CHANNELS));
}

#[test]
fn idle_connections_add_no_threads() {
    const NAME: &str = "idle_connections_add_no_threads";
    const IDLE: usize = 500;
    if !is_child(NAME) {
        let mut child = spawn_child(NAME);
        let out = child.stdout.take().unwrap();
        return finish_child(child, out);
    }
    let d = dst(Duration::from_millis(300));
    let max_pending = d.listener.max_pending as u64;
    let (l, addr) = bind(&d);
    let (threads0, rss0) = threads_and_rss();
    let (acc, (idle, threads1, rss1, src)) = accept_while(&l, &d, || {
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        wait_until(&l, |s| s.peak_pending == max_pending && s.cap_reached >= 1);
        let (threads1, rss1) = threads_and_rss();
        (idle, threads1, rss1, legit(addr))
    });
    println!(
        "FIGURE listener with {IDLE} idle connections: threads {threads0} -> {threads1}, \
         VmRSS {rss0} kB -> {rss1} kB"
    );
    drop(idle);
    // This thread, plus the one opening the connections.
    assert!(threads1 <= threads0 + 1, "{threads0} -> {threads1}");
    assert_session(&acc, &src);
    let s = acc.stats;
    assert!(s.peak_pending <= max_pending, "{s:?}");
    assert!(s.cap_reached >= 1, "{s:?}");
    assert_eq!(s.accepted, IDLE as u64 + u64::from(CHANNELS), "{s:?}");
    assert_eq!(s.timed_out + s.abandoned + s.evicted, IDLE as u64, "{s:?}");
}

/// The parent's side of a test whose listener lives in a child process under a low
/// descriptor limit: `idle` silent connections opened and held, then the legitimate
/// source, then the child's verdict.
fn silent_connections_then_source(name: &str, idle: usize) {
    let mut child = spawn_child(name);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr = child_addr(&mut out).expect("the child printed its address");
    let held: Vec<TcpStream> = (0..idle)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let src = legit(addr);
    assert_eq!(src.len(), usize::from(CHANNELS));
    drop(held);
    finish_child(child, out);
}

/// In the child: lowers this process's soft descriptor limit to `soft`, binds a
/// listener with `d`, prints its address for the parent, accepts within `window`, puts
/// the limit back, and returns the outcome with the time the accept took.
fn accept_under_descriptor_limit(
    soft: u64,
    d: &SessionConfig,
    window: Duration,
) -> (Result<Accepted, SessionError>, Duration) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid rlimit to write into.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let low = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `low` is a valid rlimit; only the soft limit of this (child) process drops.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let (l, addr) = bind(d);
    println!("ADDR {addr}");
    std::io::stdout().flush().unwrap();
    let started = std::time::Instant::now();
    let acc = l.accept_session(d, window);
    let took = started.elapsed();
    // SAFETY: `old` is the limit read above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    (acc, took)
}

#[test]
fn running_out_of_file_descriptors_does_not_end_the_listener() {
    const NAME: &str = "running_out_of_file_descriptors_does_not_end_the_listener";
    const IDLE: usize = 300;
    if !is_child(NAME) {
        // The connections come from this process; the listener lives in the child,
        // under RLIMIT_NOFILE = 256.
        return silent_connections_then_source(NAME, IDLE);
    }
    let mut d = dst(Duration::from_secs(3));
    // Above the descriptor limit, so that `accept` runs out of descriptors.
    d.listener.max_pending = 1024;
    let (acc, _) = accept_under_descriptor_limit(256, &d, WINDOW);
    let acc = acc.unwrap();
    let s = acc.stats;
    println!("FIGURE under RLIMIT_NOFILE=256 with {IDLE} idle connections: {s:?}");
    assert_eq!(acc.channels.len(), usize::from(CHANNELS));
    assert_eq!(s.established, u64::from(CHANNELS));
    assert!(s.accept_errors >= 1, "{s:?}");
    assert!(s.peak_pending < 256, "{s:?}");
}

#[test]
fn silent_connections_holding_every_descriptor_do_not_keep_a_source_out() {
    // Under a descriptor limit below `max_pending`, silent connections can hold every
    // descriptor the listener may have: `accept` then fails with EMFILE, and before
    // the listener accepted with a descriptor kept in reserve and closed a silent
    // connection for the newcomer, nothing changed until their handshake deadlines
    // (60 s here) ran out: the source, behind them in the backlog, stayed out of a
    // 10 s accept window.
    const NAME: &str = "silent_connections_holding_every_descriptor_do_not_keep_a_source_out";
    const IDLE: usize = 150;
    if !is_child(NAME) {
        return silent_connections_then_source(NAME, IDLE);
    }
    // The default `max_pending` (64), above the limit; no handshake deadline in sight.
    let d = dst(Duration::from_secs(60));
    let (acc, took) = accept_under_descriptor_limit(48, &d, Duration::from_secs(10));
    let acc = acc.expect("the source got in while silent connections held the descriptors");
    let s = acc.stats;
    println!(
        "FIGURE under RLIMIT_NOFILE=48 with {IDLE} silent connections: in after {took:?}, {s:?}"
    );
    assert_eq!(acc.channels.len(), usize::from(CHANNELS));
    assert_eq!(s.established, u64::from(CHANNELS));
    assert!(s.accept_errors >= 1, "the limit was never reached: {s:?}");
    assert!(s.evicted >= 1, "{s:?}");
    assert_eq!(s.timed_out, 0, "{s:?}");
}

/// A writable pids cgroup directory for this test, if the machine has one (cgroup v1's
/// `pids` hierarchy, or cgroup v2 with the pids controller enabled at the root).
fn pids_cgroup() -> Option<std::path::PathBuf> {
    let name = format!("pagewire-test-{}", std::process::id());
    for root in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        let root = std::path::Path::new(root);
        if !root.join("cgroup.procs").exists() {
            continue;
        }
        let dir = root.join(&name);
        if std::fs::create_dir(&dir).is_ok() {
            if dir.join("pids.max").exists() {
                return Some(dir);
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
    None
}

#[test]
fn a_small_pids_limit_does_not_end_the_listener() {
    const NAME: &str = "a_small_pids_limit_does_not_end_the_listener";
    const IDLE: usize = 300;
    if !is_child(NAME) {
        let Some(dir) = pids_cgroup() else {
            println!("skipped: no writable pids cgroup (needs root and the pids controller)");
            return;
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, NAME)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        // Let the child's harness start its threads, then allow one more task only.
        std::thread::sleep(Duration::from_millis(300));
        let current: u64 = std::fs::read_to_string(dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::write(dir.join("pids.max"), (current + 1).to_string()).unwrap();
        writeln!(child.stdin.take().unwrap(), "GO").unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let addr = child_addr(&mut out);
        let result = std::panic::catch_unwind(|| {
            let addr = addr.expect("the child printed its address");
            let idle: Vec<TcpStream> = (0..IDLE)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            let src = legit(addr);
            assert_eq!(src.len(), usize::from(CHANNELS));
            drop(idle);
        });
        finish_child(child, out);
        let _ = std::fs::remove_dir(&dir);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        return;
    }
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    assert_eq!(go.trim(), "GO");
    // The limit is in force: a few threads cannot all be had.
    let spawned: Vec<_> = (0..4)
        .map(|_| {
            std::thread::Builder::new().spawn(|| std::thread::sleep(Duration::from_millis(200)))
        })
        .collect();
    let refused = spawned.iter().filter(|s| s.is_err()).count();
    for t in spawned.into_iter().flatten() {
        t.join().unwrap();
    }
    assert!(refused >= 1, "the pids limit is not in force");
    let d = dst(Duration::from_secs(3));
    let (l, addr) = bind(&d);
    println!("ADDR {addr}");
    std::io::stdout().flush().unwrap();
    let acc = l.accept_session(&d, WINDOW).unwrap();
    let s = acc.stats;
    println!("FIGURE under a pids limit with {IDLE} idle connections: {s:?}");
    assert_eq!(acc.channels.len(), usize::from(CHANNELS));
    assert_eq!(s.established, u64::from(CHANNELS));
}

/// A session of its own: id `[id; 16]`, `channels` channels, its own key.
fn session_cfg(id: u8, channels: u16, key: &[u8]) -> SessionConfig {
    let auth = Authentication::PreSharedKey(SessionKey::new(key.to_vec()).unwrap());
    let mut c = SessionConfig::new(Capabilities::new(4096), SessionId([id; 16]), channels, auth);
    c.handshake_timeout = Duration::from_secs(60);
    c
}

/// Each source channel writes `[session byte, index]`; each accepted channel must read
/// the bytes of its own session and index, so the sockets themselves were paired right.
fn assert_own_channels(acc: &Accepted, src: &[Established], cfg: &SessionConfig) {
    assert_eq!(acc.channels.len(), usize::from(cfg.channels));
    for (i, e) in acc.channels.iter().enumerate() {
        assert_eq!(e.negotiated.session, cfg.session);
        assert_eq!(e.negotiated.channel_count, cfg.channels);
        assert_eq!(usize::from(e.negotiated.channel.0), i);
        assert!(e.negotiated.auth.is_some());
    }
    for s in src.iter().filter(|s| s.negotiated.session == cfg.session) {
        (&s.stream)
            .write_all(&[cfg.session.0[0], s.negotiated.channel.0 as u8])
            .unwrap();
    }
    for (i, e) in acc.channels.iter().enumerate() {
        let mut tag = e.leftover.clone();
        let mut byte = [0u8; 1];
        while tag.len() < 2 {
            (&e.stream).read_exact(&mut byte).unwrap();
            tag.push(byte[0]);
        }
        assert_eq!(tag, [cfg.session.0[0], i as u8]);
    }
}

#[test]
fn two_sessions_are_accepted_concurrently_and_a_third_is_refused() {
    let a = session_cfg(0xa1, 2, b"session a's own pre-shared key");
    let b = session_cfg(0xb2, 3, b"session b's quite different key");
    let mut d = a.clone();
    d.listener.max_sessions = 2;
    let (l, addr) = bind(&d);
    std::thread::scope(|s| {
        let ta = s.spawn(|| l.accept_session(&a, WINDOW));
        let tb = s.spawn(|| l.accept_session(&b, WINDOW));
        for _ in 0..6000 {
            if l.accepting() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(l.accepting(), 2);
        // A third session, and a second call for a session already being accepted,
        // are refused at once.
        let c = session_cfg(0xc3, 1, b"session c has a key as well");
        let t0 = std::time::Instant::now();
        let e = l.accept_session(&c, WINDOW).unwrap_err();
        assert!(matches!(e, SessionError::TooManySessions { max: 2 }), "{e}");
        let e = l.accept_session(&a, WINDOW).unwrap_err();
        assert!(
            matches!(e, SessionError::SessionInUse { session } if session == a.session),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        // One source thread opens the channels of both sessions interleaved.
        let order = [(&a, 0), (&b, 0), (&b, 1), (&a, 1), (&b, 2)];
        let src: Vec<Established> = order
            .iter()
            .map(|&(cfg, i)| session::connect_channel(addr, cfg, i).unwrap())
            .collect();
        let acc_a = ta.join().unwrap().unwrap();
        let acc_b = tb.join().unwrap().unwrap();
        assert_own_channels(&acc_a, &src, &a);
        assert_own_channels(&acc_b, &src, &b);
    });
    assert_eq!(l.accepting(), 0);
    assert_eq!(l.stats().established, 5);
    // Afterwards a session still opens on the same listener.
    let (acc, src) = accept_while(&l, &d, || legit_with(addr, &a));
    assert_own_channels(&acc, &src, &a);
}

fn legit_with(addr: SocketAddr, cfg: &SessionConfig) -> Vec<Established> {
    session::connect(addr, cfg).unwrap()
}

#[test]
fn a_hello_of_a_session_nobody_accepts_is_refused_while_two_are_accepted() {
    let a = session_cfg(0xa4, 1, b"session a's own pre-shared key");
    let b = session_cfg(0xb5, 1, b"session b's quite different key");
    let (l, addr) = bind(&a);
    std::thread::scope(|s| {
        let ta = s.spawn(|| l.accept_session(&a, WINDOW));
        let tb = s.spawn(|| l.accept_session(&b, WINDOW));
        while l.accepting() < 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stranger = session_cfg(0xd6, 1, b"session a's own pre-shared key");
        let e = session::connect_channel(addr, &stranger, 0).unwrap_err();
        assert!(
            matches!(
                e,
                SessionError::Handshake {
                    source: HandshakeError::Rejected {
                        reason: RejectReason::UNKNOWN_SESSION,
                        ..
                    },
                    ..
                }
            ),
            "{e}"
        );
        let src_b = session::connect(addr, &b).unwrap();
        let src_a = session::connect(addr, &a).unwrap();
        let acc_a = ta.join().unwrap().unwrap();
        let acc_b = tb.join().unwrap().unwrap();
        assert_own_channels(&acc_a, &src_a, &a);
        assert_own_channels(&acc_b, &src_b, &b);
        assert!(acc_a.refused.iter().any(|e| matches!(
            e,
            SessionError::Handshake {
                source: HandshakeError::UnknownSession(_),
                ..
            }
        )));
    });
}

#[test]
fn connections_that_name_no_session_or_never_confirm_give_their_places_up() {
    const IDLE: usize = 20;
    const PARTIAL: usize = 8;
    const NAMED: usize = 6;
    // Each handshake's deadline is far beyond the accept window: before the
    // replacement, the first four connections held every place until the window ran
    // out and the source, queued behind them, never got in.
    let mut d = dst(Duration::from_secs(600));
    d.listener.max_pending = 4;
    d.listener.evict_after = Duration::from_millis(200);
    d.listener.evict_named_after = Duration::from_millis(500);
    let (l, addr) = bind(&d);
    let hello = hello_bytes();
    let open = |first: &[u8]| {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(first).unwrap();
        c
    };
    // Queued in the backlog ahead of the source: connections that send nothing, part
    // of a HELLO, or a whole HELLO of the session (its id is no secret without TLS)
    // and then no CONFIRM.
    let hostile: Vec<TcpStream> = (0..IDLE)
        .map(|_| open(&[]))
        .chain((0..PARTIAL).map(|_| open(&hello[..hello.len() / 2])))
        .chain((0..NAMED).map(|_| open(&hello)))
        .collect();
    let (acc, src) = std::thread::scope(|s| {
        let c = s.spawn(|| legit(addr));
        let acc = l.accept_session(&d, Duration::from_secs(60));
        (acc, c.join().unwrap())
    });
    let acc = acc.expect("the source got in while the queue ahead of it idled");
    assert_session(&acc, &src);
    let s = acc.stats;
    println!(
        "FIGURE {IDLE} silent, {PARTIAL} half-HELLO and {NAMED} HELLO-only connections \
         ahead of the source: {s:?}"
    );
    let n = (IDLE + PARTIAL + NAMED) as u64;
    assert!(s.evicted >= n - 4, "{s:?}");
    // Every connection not established gave its place up. A source's connection may
    // be among them: accepted before its HELLO arrived (a slow machine), it cannot
    // replace the HELLOs of a session with a key, is closed, and opens again.
    assert!(s.accepted >= n + u64::from(CHANNELS), "{s:?}");
    assert_eq!(s.evicted + s.abandoned, s.accepted - s.established, "{s:?}");
    assert!(s.peak_pending <= 4, "{s:?}");
    drop(hostile);
}

#[test]
fn an_honest_session_wider_than_the_places_loses_none_of_its_channels() {
    // 16 channels connecting at once through 2 places, replaced at any age: each
    // channel's HELLO is read as soon as its connection is accepted, so none is ever
    // the one given up (reading it only at the next poll, the first two would be).
    let channels = 16;
    let mut d = cfg(channels, KEY, Duration::from_secs(30));
    d.listener.max_pending = 2;
    d.listener.evict_after = Duration::ZERO;
    // Never, and no overflow of the clock for it.
    d.listener.evict_named_after = Duration::MAX;
    let (l, addr) = bind(&d);
    let src_cfg = cfg(channels, KEY, Duration::from_secs(60));
    let (acc, src) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..channels)
            .map(|i| {
                let src_cfg = &src_cfg;
                s.spawn(move || session::connect_channel(addr, src_cfg, i))
            })
            .collect();
        // Not a threshold: time for every channel to connect and send its HELLO
        // before the listener accepts, so that all of them wait in the backlog.
        std::thread::sleep(Duration::from_secs(2));
        let acc = l.accept_session(&d, WINDOW);
        let src: Vec<Established> = clients
            .into_iter()
            .map(|c| c.join().unwrap().unwrap())
            .collect();
        (acc, src)
    });
    let acc = acc.unwrap();
    assert_eq!(acc.channels.len(), usize::from(channels));
    assert_eq!(src.len(), usize::from(channels));
    assert_eq!(acc.stats.evicted, 0, "{:?}", acc.stats);
    assert_eq!(acc.stats.established, u64::from(channels));
    assert_eq!(acc.stats.peak_pending, 2, "{:?}", acc.stats);
}

#[test]
fn a_flood_of_silent_connections_does_not_keep_a_source_out() {
    // A peer opening silent connections as fast as it can and holding them. Before
    // silent places were replaced at any age, only a place older than `evict_after`
    // (500 ms) opened to a new connection: the backlog drained at 64 connections per
    // 500 ms, stayed full of the flood's connections, and the source's channels waited
    // behind them (or their SYNs were dropped) until the accept window ran out.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    const NAME: &str = "a_flood_of_silent_connections_does_not_keep_a_source_out";
    if !is_child(NAME) {
        // Alone in a child process: it raises the descriptor limit and keeps both
        // cores busy, which the other tests of this binary should not see.
        let mut child = spawn_child(NAME);
        let out = child.stdout.take().unwrap();
        return finish_child(child, out);
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = lim.rlim_cur.max(lim.rlim_max.min(16384));
    // SAFETY: as above; raising the soft limit, at most up to the hard one.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    // Each connection takes a descriptor on both ends here; some for the rest.
    let flood = ((lim.rlim_cur as usize).saturating_sub(1024) / 2).min(4000);
    if flood < 1500 {
        println!(
            "SKIPPED: RLIMIT_NOFILE's hard limit {} leaves too few descriptors for the flood",
            lim.rlim_max
        );
        return;
    }
    let d = dst(Duration::from_secs(30));
    let (l, addr) = bind(&d);
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let acc = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut open = Vec::with_capacity(flood);
            let t = std::time::Instant::now();
            // Bounded: it stops when the accept returns, or after 60 s.
            while !stop.load(Relaxed) && t.elapsed() < Duration::from_secs(60) {
                if open.len() == flood {
                    std::thread::sleep(Duration::from_millis(10));
                } else if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                {
                    open.push(c);
                    opened.fetch_add(1, Relaxed);
                }
            }
        });
        let src = s.spawn(|| {
            // Until the flood has filled every place and the backlog behind them.
            for _ in 0..6000 {
                if opened.load(Relaxed) >= 1500 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            session::connect(addr, &cfg(CHANNELS, KEY, Duration::from_secs(30)))
        });
        let acc = l.accept_session(&d, Duration::from_secs(10));
        let src = src.join().unwrap();
        stop.store(true, Relaxed);
        flooder.join().unwrap();
        let acc = acc.expect("the source got in during the flood");
        assert_session(&acc, &src.expect("the source's handshake"));
        acc
    });
    let s = acc.stats;
    println!(
        "FIGURE {} silent connections opened and held during the accept: {s:?}",
        opened.load(Relaxed)
    );
    assert!(s.cap_reached >= 1 && s.evicted >= 1000, "{s:?}");
    assert!(s.peak_pending <= d.listener.max_pending as u64, "{s:?}");
}

/// A HELLO of the session naming channel 0 that waits for its CONFIRM (it offers
/// `hmac-sha256`) and never sends one: from a peer with another key (it knows the
/// session id, which is no secret without TLS, but not the key) for even `n`; for odd
/// `n`, one recorded from an earlier migration with the key, a distinct one each time
/// (tagged, with its source's clock of an hour ago).
fn hello_without_the_key(n: u64) -> Vec<u8> {
    let mut nonce = [0; 32];
    nonce[8..16].copy_from_slice(&n.to_le_bytes());
    if n.is_multiple_of(2) {
        return hello_with(b"not the listener's key, a guess.", nonce);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    nonce[..8].copy_from_slice(&(now - 3600).to_le_bytes());
    hello_with(KEY, nonce)
}

#[test]
fn a_stream_of_hellos_from_a_peer_without_the_key_does_not_keep_a_source_out() {
    // A peer that knows the session id but not the key opens 150 connections a second,
    // each sending a HELLO of the session and never a CONFIRM, and holds each for 3 s;
    // half of them are tagged HELLOs recorded from an earlier migration with the key,
    // each distinct (they counted as tagged before tags carried the source's clock,
    // held every place and kept the source out again).
    // Every place soon holds one younger than `evict_named_after` (2 s); before HELLOs
    // carried a key tag, the listener then stopped accepting, places opened at 32 a
    // second, and the source's connections waited behind the stream in the backlog
    // until their 10 s ran out. Now, with a session that has a key, the listener keeps
    // accepting: the stream's HELLOs (untagged) cannot replace each other, the
    // source's (tagged) replace them.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let d = dst(Duration::from_secs(30));
    let (l, addr) = bind(&d);
    let stop = AtomicBool::new(false);
    let opened = AtomicU64::new(0);
    let acc = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            let mut open = std::collections::VecDeque::new();
            let t = std::time::Instant::now();
            // Bounded: it stops when the accept returns, or after 60 s.
            while !stop.load(Relaxed) && t.elapsed() < Duration::from_secs(60) {
                let n = opened.load(Relaxed);
                let due = t.elapsed().as_secs_f64() * 150.0;
                if (n as f64) < due {
                    if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                    {
                        let _ = c.write_all(&hello_without_the_key(n));
                        open.push_back((std::time::Instant::now(), c));
                        opened.fetch_add(1, Relaxed);
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(2));
                }
                while open
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(3))
                {
                    open.pop_front();
                }
            }
        });
        let src = s.spawn(|| {
            // Once the stream has run for 4 s: every place held, renewed since.
            for _ in 0..6000 {
                if opened.load(Relaxed) >= 600 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let t = std::time::Instant::now();
            let src = session::connect(addr, &cfg(CHANNELS, KEY, Duration::from_secs(10)));
            (src, t.elapsed())
        });
        let acc = l.accept_session(&d, Duration::from_secs(40));
        let (src, took) = src.join().unwrap();
        stop.store(true, Relaxed);
        stream.join().unwrap();
        let acc = acc.expect("the source got in during the stream of HELLOs");
        assert_session(&acc, &src.expect("the source's handshake"));
        println!(
            "FIGURE the source's handshake took {took:?} during a stream of {} keyless HELLOs: {:?}",
            opened.load(Relaxed),
            acc.stats
        );
        acc
    });
    assert!(acc.stats.evicted >= 100, "{:?}", acc.stats);
    // The source's two channels, none of the recorded HELLOs.
    assert_eq!(acc.stats.tagged, u64::from(CHANNELS), "{:?}", acc.stats);
}
