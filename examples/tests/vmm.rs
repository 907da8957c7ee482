//! pagewire-vmm end to end on real KVM: two processes on 127.0.0.1, a running guest
//! migrated between them, and the failure cases (either side killed mid-migration).
//!
//! Without a usable /dev/kvm each test prints a SKIP line and returns, unless
//! `PAGEWIRE_REQUIRE_KVM=1`, when it fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_pagewire-vmm");
/// Generous bound on any wait: the tests never judge speed, they only must end.
const BOUND: Duration = Duration::from_secs(120);

/// The guests are CPU-heavy on a small machine: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: /dev/kvm is not usable and PAGEWIRE_REQUIRE_KVM=1"
        );
        eprintln!("SKIP {test}: /dev/kvm is not usable");
    }
    ok
}

/// A pagewire-vmm child process, killed on drop, with its stdout collected.
struct Vmm {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Vmm {
    fn spawn(name: &'static str, args: &[&str]) -> Self {
        let mut child = Command::new(VMM)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning pagewire-vmm");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                seen2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self {
            name,
            child,
            lines,
            seen,
        }
    }

    /// The next line (from now on) that satisfies `pred`.
    fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + BOUND;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no such line within {BOUND:?}: {:#?}",
                        self.name,
                        self.all()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{}: exited without such a line: {:#?}",
                        self.name,
                        self.all()
                    )
                }
            }
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let end = Instant::now() + BOUND;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread drain the pipe.
                let _ = self.lines.recv_timeout(Duration::from_secs(5));
                while self.lines.try_recv().is_ok() {}
                return s;
            }
            assert!(
                Instant::now() < end,
                "{}: still running after {BOUND:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn all(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The JSON summary: the last line that parses as a JSON object.
    fn summary(&self) -> serde_json::Value {
        self.all()
            .iter()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .unwrap_or_else(|| panic!("{}: no JSON summary: {:#?}", self.name, self.all()))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listen(extra: &[&str]) -> (Vmm, String) {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let dst = Vmm::spawn("destination", &args);
    let line = dst.wait_line(|l| l.starts_with("listening on "));
    let addr = line["listening on ".len()..].trim().to_string();
    (dst, addr)
}

fn digest(v: &Vmm, prefix: &str) -> String {
    let line = v
        .all()
        .into_iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("{}: no '{prefix}' line: {:#?}", v.name, v.all()));
    let at = line.find("crc32c=").expect("crc32c=") + "crc32c=".len();
    line[at..at + 8].to_string()
}

fn migrate_and_verify(guest: &[&str], migration: &[&str]) {
    migrate_and_verify_with(guest, migration);
}

/// [`migrate_and_verify`], returning the source's JSON summary.
fn migrate_and_verify_with(guest: &[&str], migration: &[&str]) -> serde_json::Value {
    let dst_args: Vec<&str> = guest
        .iter()
        .copied()
        .chain(["--digest", "--run-after", "0.5"])
        .collect();
    let (mut dst, addr) = listen(&dst_args);
    let mut src_args: Vec<&str> = vec!["--migrate-to", &addr, "--after", "1", "--digest"];
    src_args.extend_from_slice(guest);
    src_args.extend_from_slice(migration);
    let mut src = Vmm::spawn("source", &src_args);
    let s = src.wait_exit();
    let d = dst.wait_exit();
    assert!(s.success(), "source: {s}: {:#?}", src.all());
    assert!(d.success(), "destination: {d}: {:#?}", dst.all());
    let (ss, ds) = (src.summary(), dst.summary());
    assert_eq!(ss["status"], "completed");
    assert_eq!(ds["status"], "completed");
    assert_eq!(ds["vcpus_started"], true);
    // Memory byte for byte: both digests taken with the vCPUs stopped.
    assert_eq!(
        digest(&src, "source (paused) memory digest"),
        digest(&dst, "destination (before resume) memory digest")
    );
    // The guest checked its pages on the destination and found them right.
    assert_eq!(ds["self_check"]["wrong"], 0, "{ds}");
    assert!(ds["self_check"]["checked"].as_u64().unwrap() > 0, "{ds}");
    // It ran there: heartbeats after the resume, and a guest-seen downtime.
    assert!(ds["heartbeats"].as_u64().unwrap() > 0);
    assert!(ds["downtime"]["guest_downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(dst.all().iter().any(|l| l.starts_with("heartbeat:")));
    ss
}

#[test]
fn migrates_a_running_guest_bitmap_one_vcpu_memfd_zstd() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("migrates_a_running_guest_bitmap_one_vcpu_memfd_zstd") {
        return;
    }
    migrate_and_verify(
        &[
            "--mem-mib",
            "128",
            "--dirty-mbps",
            "20",
            "--dirty",
            "bitmap",
        ],
        &["--codec", "zstd", "--channels", "2"],
    );
}

#[test]
fn migrates_a_running_guest_inside_tls_with_certificates_made_for_the_run_and_the_default_codec() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip(
        "migrates_a_running_guest_inside_tls_with_certificates_made_for_the_run_and_the_default_codec",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pagewire-vmm-tls-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_str().unwrap().to_owned();
    let summary = migrate_and_verify_with(
        &[
            "--mem-mib",
            "128",
            "--dirty-mbps",
            "20",
            "--tls",
            "--tls-dir",
            &dir_s,
        ],
        // No --codec: the default, chosen per frame.
        &["--channels", "2"],
    );
    assert_eq!(summary["pagewire"]["tls"]["encrypted"], true, "{summary}");
    assert_eq!(summary["pagewire"]["codec"], "auto", "{summary}");
    let choices = summary["pagewire"]["adaptive"]["choices"]
        .as_array()
        .unwrap();
    assert!(
        choices.iter().any(|c| c["frames"].as_u64().unwrap() > 0),
        "{summary}"
    );
    assert!(summary["pagewire"]["tls"]["sealed_bytes"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migrates_a_running_guest_ring_two_vcpus_two_slots_anon_lz4() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("migrates_a_running_guest_ring_two_vcpus_two_slots_anon_lz4") {
        return;
    }
    migrate_and_verify(
        &[
            "--mem-mib",
            "128",
            "--slots",
            "2",
            "--vcpus",
            "2",
            "--backing",
            "anon",
            "--dirty-mbps",
            "30",
            "--dirty",
            "ring",
        ],
        &["--codec", "lz4", "--channels", "3"],
    );
}

#[test]
fn restores_a_saved_guest_within_one_process() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("restores_a_saved_guest_within_one_process") {
        return;
    }
    let mut v = Vmm::spawn(
        "restore-test",
        &[
            "--restore-test",
            "--mem-mib",
            "64",
            "--vcpus",
            "2",
            "--dirty-mbps",
            "20",
            "--after",
            "0.5",
            "--run-after",
            "0.2",
        ],
    );
    let s = v.wait_exit();
    assert!(s.success(), "{s}: {:#?}", v.all());
    let j = v.summary();
    assert_eq!(j["digest_equal"], true);
    assert_eq!(j["self_check"]["wrong"], 0);
    // The destination's device-state check, on VM B before it ran: what only KVM
    // refuses (an MSR it does not know) is refused there, not after COMMIT.
    let lines = v.all();
    for what in [
        "the check refuses an unknown MSR: ",
        "the check refuses a section named foo: ",
        "the check refuses a vmm section of 32 KiB: ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(what)),
            "no line {what:?}: {lines:#?}"
        );
    }
}

#[test]
fn the_guest_self_check_finds_a_damaged_page() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("the_guest_self_check_finds_a_damaged_page") {
        return;
    }
    let mut v = Vmm::spawn(
        "restore-test",
        &[
            "--restore-test",
            "--corrupt-first-page",
            "--mem-mib",
            "64",
            "--dirty-mbps",
            "20",
            "--after",
            "0.5",
            "--run-after",
            "0",
        ],
    );
    let s = v.wait_exit();
    assert_eq!(s.code(), Some(2), "{:#?}", v.all());
    let j = v.summary();
    assert_eq!(j["digest_equal"], false);
    assert_eq!(j["self_check"]["wrong"], 1, "{j}");
}

/// A migration slow enough to be interrupted: a 2 MB/s wire for ~30 MiB of pages.
const SLOW: [&str; 8] = [
    "--mem-mib",
    "128",
    "--dirty-mbps",
    "10",
    "--bandwidth-mbit",
    "16",
    "--timeout",
    "5",
];

#[test]
fn destination_killed_mid_round_leaves_the_source_guest_running() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("destination_killed_mid_round_leaves_the_source_guest_running") {
        return;
    }
    let (mut dst, addr) = listen(&["--mem-mib", "128", "--dirty-mbps", "10"]);
    let mut args = vec![
        "--migrate-to",
        &addr,
        "--after",
        "0.5",
        "--run-after",
        "600",
    ];
    args.extend_from_slice(&SLOW);
    let mut src = Vmm::spawn("source", &args);
    dst.wait_line(|l| l.starts_with("migration: accepted"));
    std::thread::sleep(Duration::from_millis(300));
    dst.child.kill().expect("killing the destination");
    dst.wait_exit();
    src.wait_line(|l| l.starts_with("migration failed"));
    the_source_keeps_its_guest(&mut src);
}

/// After a failed migration: the guest keeps heartbeating on the source, which ends
/// cleanly on SIGTERM and says it kept the guest running.
fn the_source_keeps_its_guest(src: &mut Vmm) {
    let first = src.wait_line(|l| l.starts_with("heartbeat:"));
    let second = src.wait_line(|l| l.starts_with("heartbeat:"));
    assert_ne!(first, second);
    src.signal(libc::SIGTERM);
    let s = src.wait_exit();
    assert_eq!(s.code(), Some(3), "{:#?}", src.all());
    let j = src.summary();
    assert_eq!(j["status"], "failed");
    assert_eq!(j["guest_kept_running"], true, "{j}");
    assert!(j["heartbeats_after_failure"].as_u64().unwrap() > 0);
}

/// Runs a source with `guest` against `addr` whose migration fails with a message
/// holding every one of `why`; it keeps its guest, and the destination exits with 1.
fn refused_source_keeps_its_guest(dst: &mut Vmm, addr: &str, guest: &[&str], why: &[&str]) {
    let mut args = vec!["--migrate-to", addr, "--after", "0.5", "--run-after", "600"];
    args.extend_from_slice(guest);
    let mut src = Vmm::spawn("source", &args);
    let failed = src.wait_line(|l| l.starts_with("migration failed"));
    assert!(why.iter().all(|w| failed.contains(w)), "{failed}");
    the_source_keeps_its_guest(&mut src);
    let s = dst.wait_exit();
    assert_eq!(s.code(), Some(1), "{:#?}", dst.all());
}

/// A source configured for another machine (2 vCPUs against the destination's 1): the
/// destination checks the device state before it acknowledges COMPLETE, answers ABORT
/// `APPLY_FAILED`, and the source, which never sent COMMIT, resumes its guest. Before
/// the check, the mismatch was found only after COMMIT and neither host ran the guest.
#[test]
fn a_source_with_another_vcpu_count_keeps_its_guest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("a_source_with_another_vcpu_count_keeps_its_guest") {
        return;
    }
    let (mut dst, addr) = listen(&["--mem-mib", "128", "--vcpus", "1"]);
    refused_source_keeps_its_guest(
        &mut dst,
        &addr,
        &["--mem-mib", "128", "--vcpus", "2"],
        &["apply failed", "device state has 2 vCPUs"],
    );
    assert!(
        dst.all()
            .iter()
            .any(|l| l.contains("device state has 2 vCPUs, this machine 1")),
        "{:#?}",
        dst.all()
    );
}

/// A destination started with `--channels 1` refuses a source that opens 2 with REJECT
/// `BAD_CHANNEL` naming its limit; the source keeps its guest.
#[test]
fn a_destination_limited_to_one_channel_refuses_two_and_the_source_keeps_its_guest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip(
        "a_destination_limited_to_one_channel_refuses_two_and_the_source_keeps_its_guest",
    ) {
        return;
    }
    let (mut dst, addr) = listen(&[
        "--mem-mib",
        "64",
        "--channels",
        "1",
        "--accept-timeout",
        "3",
    ]);
    refused_source_keeps_its_guest(
        &mut dst,
        &addr,
        &["--mem-mib", "64", "--channels", "2"],
        &["bad channel", "accepts at most 1"],
    );
}

#[test]
fn source_killed_mid_migration_the_destination_never_starts_the_guest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("source_killed_mid_migration_the_destination_never_starts_the_guest") {
        return;
    }
    let (mut dst, addr) = listen(&["--mem-mib", "128", "--dirty-mbps", "10"]);
    let mut args = vec!["--migrate-to", &addr, "--after", "0.5"];
    args.extend_from_slice(&SLOW);
    let mut src = Vmm::spawn("source", &args);
    dst.wait_line(|l| l.starts_with("migration: accepted"));
    std::thread::sleep(Duration::from_millis(300));
    src.child.kill().expect("killing the source");
    src.wait_exit();
    let d = dst.wait_exit();
    assert_eq!(d.code(), Some(1), "{:#?}", dst.all());
    let j = dst.summary();
    assert_eq!(j["status"], "failed");
    assert_eq!(j["vcpus_started"], false);
    assert!(
        !dst.all().iter().any(|l| l.starts_with("heartbeat:")),
        "the destination's guest ran: {:#?}",
        dst.all()
    );
}

/// One of the four last frames of a migration (PROTOCOL.md, Switchover).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Last {
    /// COMPLETE (0x15), source → destination.
    Complete,
    /// ACK COMPLETE (ACK 0x13, kind 3), destination → source.
    AckComplete,
    /// COMMIT (0x17), source → destination.
    Commit,
    /// ACK COMMITTED (ACK 0x13, kind 4), destination → source.
    AckCommitted,
}

impl Last {
    /// Whether the frame (envelope and body) is this one, and the direction it goes.
    fn is(self, to_destination: bool, envelope: &[u8; 8], body: &[u8]) -> bool {
        let ack = |kind| !to_destination && envelope[0] == 0x13 && body.first() == Some(&kind);
        match self {
            Last::Complete => to_destination && envelope[0] == 0x15,
            Last::AckComplete => ack(3),
            Last::Commit => to_destination && envelope[0] == 0x17,
            Last::AckCommitted => ack(4),
        }
    }
}

/// A TCP relay between the two processes that follows the frames and, at the first
/// `cut` frame it sees, drops it and closes that connection both ways: the frame is
/// lost with the connection, as when a link dies.
struct Relay {
    addr: String,
    cut_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(to: String, cut: Last) -> Relay {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::AtomicBool;
        let l = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let addr = l.local_addr().unwrap().to_string();
        let cut_done = Arc::new(AtomicBool::new(false));
        let done = cut_done.clone();
        std::thread::spawn(move || {
            // Ends when the test drops the relay's last connection (process exit).
            for client in l.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&to) else {
                    return;
                };
                for (from, into, to_destination) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (
                        server.try_clone().unwrap(),
                        client.try_clone().unwrap(),
                        false,
                    ),
                ] {
                    let (client, server, done) = (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        done.clone(),
                    );
                    std::thread::spawn(move || {
                        pump(from, into, to_destination, cut, &done);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        let _ = server.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, cut_done }
    }
}

/// Forwards whole frames from `from` to `into` until either side closes, or the cut
/// frame shows up (then it is not forwarded).
fn pump(
    mut from: std::net::TcpStream,
    mut into: std::net::TcpStream,
    to_destination: bool,
    cut: Last,
    done: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    loop {
        let mut envelope = [0u8; 8];
        if from.read_exact(&mut envelope).is_err() {
            return;
        }
        let len = u32::from_le_bytes(envelope[4..8].try_into().unwrap()) as usize;
        // Frames are bounded by the negotiated frame limit (a few MiB at most here).
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() {
            return;
        }
        if !done.load(Ordering::SeqCst) && cut.is(to_destination, &envelope, &body) {
            done.store(true, Ordering::SeqCst);
            return;
        }
        if into.write_all(&envelope).is_err() || into.write_all(&body).is_err() {
            return;
        }
    }
}

/// Migrates through a relay that loses `cut` with its connection, and checks the one
/// rule that matters: never does the guest run on both sides.
fn lose_at_switchover(cut: Last) {
    let guest = ["--mem-mib", "64", "--dirty-mbps", "10"];
    let dst_args: Vec<&str> = guest
        .iter()
        .copied()
        .chain(["--run-after", "0.5", "--timeout", "5"])
        .collect();
    let (mut dst, addr) = listen(&dst_args);
    let relay = Relay::start(addr, cut);
    let mut src_args: Vec<&str> = vec![
        "--migrate-to",
        &relay.addr,
        "--after",
        "0.5",
        "--run-after",
        "1",
        "--timeout",
        "5",
        "--channels",
        "2",
    ];
    src_args.extend_from_slice(&guest);
    let mut src = Vmm::spawn("source", &src_args);
    let s = src.wait_exit();
    let d = dst.wait_exit();
    let (ss, ds) = (src.summary(), dst.summary());
    eprintln!(
        "{cut:?}: source {s} {}; destination {d} {}",
        ss["status"], ds["status"]
    );
    assert!(
        relay.cut_done.load(std::sync::atomic::Ordering::SeqCst),
        "{cut:?} was never seen"
    );
    let destination_runs = ds["vcpus_started"] == true;
    let source_runs = ss["status"] == "failed" && ss["guest_kept_running"] == true;
    assert!(
        !(destination_runs && source_runs),
        "{cut:?}: the guest runs on both hosts: {ss} / {ds}"
    );
    // And each side did what PROTOCOL.md's table says.
    let (src_status, dst_started) = match cut {
        Last::Complete | Last::AckComplete => ("failed", false),
        Last::Commit => ("outcome-unknown", false),
        Last::AckCommitted => ("outcome-unknown", true),
    };
    assert_eq!(ss["status"], src_status, "{cut:?}: {ss}");
    assert_eq!(ds["vcpus_started"], dst_started, "{cut:?}: {ds}");
    if src_status == "outcome-unknown" {
        assert_eq!(s.code(), Some(4));
        assert_eq!(ss["guest_kept_running"], false, "paused: {ss}");
    } else {
        assert_eq!(ss["guest_kept_running"], true, "resumed: {ss}");
    }
    if dst_started {
        assert_eq!(ds["self_check"]["wrong"], 0, "{ds}");
    } else {
        assert!(!dst.all().iter().any(|l| l.starts_with("heartbeat:")));
    }
}

#[test]
fn the_final_frames_lost_one_by_one_never_leave_two_running_guests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip("the_final_frames_lost_one_by_one_never_leave_two_running_guests") {
        return;
    }
    for cut in [
        Last::Complete,
        Last::AckComplete,
        Last::Commit,
        Last::AckCommitted,
    ] {
        lose_at_switchover(cut);
    }
}

#[test]
fn the_built_in_key_is_refused_beyond_loopback() {
    // Refused while parsing the options, before KVM is opened: no KVM needed.
    for role in ["--listen", "--migrate-to"] {
        let out = Command::new(VMM)
            .args([role, "0.0.0.0:7100"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role}: {err}");
        assert!(err.contains("give --key-file"), "{role}: {err}");
    }
}
