//! pagewire-vmm: a small KVM VMM (kvm-ioctls, vm-memory) whose guest live-migrates
//! between two processes through pagewire. See `examples/VMM.md` and `--help`.
//!
//! Modules: `guest` (the guest program and memory layout), `memory` (guest RAM),
//! `vm` (VM, memslots, vCPU boot state), `dirty` (KVM dirty bitmap / ring and VMM
//! writes), `vcpu` (vCPU threads, exits, pause/resume), `state` (save/restore),
//! `machine` (all of them together), `migration` (every use of pagewire).

mod args;
mod dirty;
mod guest;
mod machine;
mod memory;
mod migration;
mod signals;
mod state;
mod vcpu;
mod vm;

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::json;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::args::{Args, Role};
use crate::machine::{Machine, Section, Shape};
use crate::vcpu::{Monitor, Vcpus, realtime_ns};

/// Exit code of a source whose migration failed (its guest kept running).
const EXIT_MIGRATION_FAILED: u8 = 3;
/// Exit code when the guest's self-check found wrong pages.
const EXIT_CHECK_FAILED: u8 = 2;
/// Exit status of a source whose migration's outcome is unknown (COMMIT sent, its
/// acknowledgement lost): the guest was left paused.
const EXIT_OUTCOME_UNKNOWN: u8 = 4;
/// Longest wait for a self-check report.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a guest's first heartbeat.
const FIRST_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pagewire-vmm: {e:#}");
            println!(
                "{}",
                json!({"status": "error", "error": pagewire_examples::cli::error_text(&e)})
            );
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let args = args::parse()?;
    signals::install();
    match args.role.clone() {
        Role::Local => local(&args),
        Role::RestoreTest => restore_test(&args),
        Role::Listen(addr) => destination(&args, addr),
        Role::MigrateTo(addr) => source(&args, addr),
    }
}

fn shape(args: &Args) -> Shape {
    Shape {
        mem_bytes: args.mem_mib << 20,
        slots: args.slots,
        vcpus: args.vcpus,
        backing: args.backing,
        dirty: args.dirty,
        dirty_bytes_per_s: args.dirty_mbps * 1_000_000,
    }
}

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Prints the guest's heartbeats every 200 ms while they change.
struct HeartbeatPrinter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HeartbeatPrinter {
    fn start(monitor: Arc<Monitor>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = 0;
            // Ends when asked to stop.
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let hb = monitor.heartbeats();
                if hb.count != last {
                    say(format!(
                        "heartbeat: count={} last_realtime_ns={} guest_pages_written={}",
                        hb.count, hb.last_ns, hb.pages_written
                    ));
                    last = hb.count;
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HeartbeatPrinter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits `d`, or less if SIGTERM/SIGINT arrive (or `also` says so).
fn wait(d: Duration, also: impl Fn() -> bool) {
    let end = Instant::now() + d;
    // Bounded by `end`.
    while Instant::now() < end && !signals::stop() && !also() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn digest_line(who: &str, ram: &memory::Ram) -> anyhow::Result<u32> {
    let (all, per) = memory::digest(ram)?;
    let per: Vec<String> = per.iter().map(|c| format!("{c:08x}")).collect();
    say(format!(
        "{who} memory digest: crc32c={all:08x} slots=[{}]",
        per.join(",")
    ));
    Ok(all)
}

fn check_and_report(m: &Machine) -> anyhow::Result<(u64, u64)> {
    let (checked, wrong) =
        m.monitor
            .self_check(&m.ram, &m.dirty, m.shape.vcpus as usize, CHECK_TIMEOUT)?;
    say(format!(
        "guest self-check: {checked} pages checked, {wrong} wrong: {}",
        if wrong == 0 { "PASS" } else { "FAIL" }
    ));
    Ok((checked, wrong))
}

fn first_heartbeat(monitor: &Monitor) -> anyhow::Result<u64> {
    let end = Instant::now() + FIRST_HEARTBEAT_TIMEOUT;
    // Bounded by `end`.
    loop {
        let hb = monitor.heartbeats();
        if hb.first_ns != 0 {
            return Ok(hb.first_ns);
        }
        if Instant::now() > end {
            bail!("the guest did not heartbeat within {FIRST_HEARTBEAT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Runs the guest here for `--run-after`, then self-checks it.
fn local(args: &Args) -> anyhow::Result<ExitCode> {
    let mut m = Machine::build(shape(args))?;
    m.boot()?;
    let vcpus = m.start()?;
    say(format!(
        "guest running: {} MiB, {} vCPU(s), writing {} MB/s",
        args.mem_mib, args.vcpus, args.dirty_mbps
    ));
    let printer = HeartbeatPrinter::start(m.monitor.clone());
    wait(args.run_after, || false);
    let (checked, wrong) = check_and_report(&m)?;
    drop(printer);
    vcpus.stop()?;
    let hb = m.monitor.heartbeats();
    say(
        json!({"role": "local", "status": if wrong == 0 {"passed"} else {"check-failed"},
        "heartbeats": hb.count, "guest_pages_written": hb.pages_written,
        "self_check": {"checked": checked, "wrong": wrong}})
        .to_string(),
    );
    Ok(if wrong == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}

fn copy_ram(from: &memory::Ram, to: &memory::Ram) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for r in from.iter() {
        let mut off = 0;
        while off < r.len() {
            let n = (r.len() - off).min(buf.len() as u64) as usize;
            let at = vm_memory::GuestAddress(r.start_addr().0 + off);
            from.read_slice(&mut buf[..n], at)?;
            to.write_slice(&buf[..n], at)?;
            off += n as u64;
        }
    }
    Ok(())
}

/// The destination's device-state check (as `Incoming` runs it) on `m`, which has not
/// run: it passes `sections`, and refuses altered copies that only this host's KVM
/// can refuse, or that the VMM does not know; prints one line per refusal.
fn refusals(m: &Machine, saved: &[Section], vcpus: u32) -> anyhow::Result<()> {
    // As a migration sends them: the machine's sections and the VMM's own.
    let mut sections = saved.to_vec();
    sections.push(Section {
        name: "vmm".into(),
        instance: 0,
        data: b"{}".to_vec(),
    });
    let sections = &sections[..];
    let check = |s: &[Section]| {
        let it = s
            .iter()
            .map(|s| (s.name.as_str(), s.instance, s.data.as_slice()));
        Machine::check_sections(vcpus, it.clone()).and_then(|()| m.restorer().restore(it))
    };
    check(sections).context("the check refused the saved state")?;
    // vcpu/0 with its first MSR's index changed to one no KVM knows.
    let mut msr = sections.to_vec();
    let v = msr
        .iter_mut()
        .find(|s| s.name == "vcpu" && s.instance == 0)
        .ok_or_else(|| anyhow!("no vcpu/0"))?;
    let mut state = crate::state::VcpuState::decode(&v.data)?;
    let first = state
        .msrs_mut()
        .first_mut()
        .ok_or_else(|| anyhow!("vcpu/0 saved no MSR"))?;
    first.index = 0xdead_0000;
    v.data = state.encode();
    let mut unknown = sections.to_vec();
    unknown.push(Section {
        name: "foo".into(),
        instance: 0,
        data: Vec::new(),
    });
    let mut big = sections.to_vec();
    if let Some(s) = big.iter_mut().find(|s| s.name == "vmm") {
        s.data = format!("[{}0]", "0,".repeat(16 << 10)).into_bytes();
    }
    for (what, altered) in [("an unknown MSR", msr), ("a section named foo", unknown)]
        .into_iter()
        .chain([("a vmm section of 32 KiB", big)])
    {
        match check(&altered) {
            Ok(()) => bail!("the check passed {what}"),
            Err(e) => say(format!("the check refuses {what}: {e:#}")),
        }
    }
    // Refusals leave the machine as restore finds it: the saved state still passes.
    check(sections).context("the check refused the saved state after the altered ones")
}

/// Pauses the guest, saves it, restores it into a second VM of this process with a
/// copy of its memory, and runs the copy.
fn restore_test(args: &Args) -> anyhow::Result<ExitCode> {
    let mut a = Machine::build(shape(args))?;
    a.boot()?;
    let va = a.start()?;
    say("guest running in VM A");
    wait(args.after, || false);
    va.pause()?;
    let last = a.monitor.heartbeats();
    let sections = a.save(&va)?;
    let da = digest_line("VM A (paused)", &a.ram)?;
    let mut b = Machine::build(shape(args))?;
    copy_ram(&a.ram, &b.ram)?;
    if args.corrupt {
        let (first, _) = guest::vcpu_pages(shape(args).mem_bytes, u64::from(args.vcpus), 0);
        let at = first * guest::PAGE + (guest::GEN_STRIDE - 1) * 8;
        b.ram
            .write_obj(!0u64, vm_memory::GuestAddress(at))
            .context("corrupting a page")?;
        say(format!("corrupted guest page {first} in VM B"));
    }
    refusals(&b, &sections, args.vcpus)?;
    b.restore(&sections)?;
    let db = digest_line("VM B (restored)", &b.ram)?;
    va.stop()?;
    let vb = b.start()?;
    let first = first_heartbeat(&b.monitor)?;
    say(format!(
        "VM B running; {:.3} ms between A's last heartbeat and B's first",
        ms(first.saturating_sub(last.last_ns))
    ));
    let printer = HeartbeatPrinter::start(b.monitor.clone());
    let (checked, wrong) = check_and_report(&b)?;
    wait(args.run_after, || false);
    drop(printer);
    vb.stop()?;
    let ok = wrong == 0 && da == db;
    say(
        json!({"role": "restore-test", "status": if ok {"passed"} else {"failed"},
        "digest_equal": da == db, "self_check": {"checked": checked, "wrong": wrong}})
        .to_string(),
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}

/// The source machine as pagewire sees it: the dirty log, the vCPUs (noting when
/// they stopped, for the destination's downtime figures) and the device state.
struct SourcePause<'a> {
    m: &'a Machine,
    vcpus: &'a Vcpus,
    digest: bool,
    /// Realtime ns when the pause began and when every vCPU had stopped.
    paused: Mutex<(u64, u64)>,
    save_ms: Mutex<f64>,
}

impl migration::SourceVm for SourcePause<'_> {
    fn set_dirty_logging(&self, on: bool) -> anyhow::Result<()> {
        self.m.set_dirty_logging(on)
    }

    fn take_dirty(&self, slot: usize) -> anyhow::Result<Vec<u64>> {
        Ok(self.m.dirty.take(slot)?)
    }

    fn pause(&self) -> anyhow::Result<()> {
        let pause_begin = realtime_ns();
        self.vcpus.pause()?;
        *self.paused.lock().map_err(|_| anyhow!("lock"))? = (pause_begin, realtime_ns());
        Ok(())
    }

    fn resume(&self) {
        self.vcpus.resume();
    }

    fn save(&self) -> anyhow::Result<Vec<Section>> {
        let save_begin = realtime_ns();
        let (pause_begin, paused) = *self.paused.lock().map_err(|_| anyhow!("lock"))?;
        let t = Instant::now();
        let mut sections = self.m.save(self.vcpus)?;
        *self.save_ms.lock().map_err(|_| anyhow!("lock"))? = t.elapsed().as_secs_f64() * 1e3;
        let saved = realtime_ns();
        let digest = if self.digest {
            Some(digest_line("source (paused)", &self.m.ram)?)
        } else {
            None
        };
        let digested = realtime_ns();
        let hb = self.m.monitor.heartbeats();
        sections.push(Section {
            name: "vmm".into(),
            instance: 0,
            data: json!({
                "last_heartbeat_ns": hb.last_ns,
                "pause_begin_ns": pause_begin,
                "paused_ns": paused,
                "save_begin_ns": save_begin,
                "saved_ns": saved,
                "digested_ns": digested,
                "heartbeats": hb.count,
                "guest_pages_written": hb.pages_written,
                "digest": digest,
            })
            .to_string()
            .into_bytes(),
        });
        Ok(sections)
    }
}

fn source(args: &Args, to: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let mut m = Machine::build(shape(args))?;
    m.boot()?;
    let vcpus = m.start()?;
    say(format!(
        "guest running: {} MiB in {} slot(s), {} vCPU(s), writing {} MB/s, dirty tracking {:?}",
        args.mem_mib, args.slots, args.vcpus, args.dirty_mbps, args.dirty
    ));
    let printer = HeartbeatPrinter::start(m.monitor.clone());
    wait(args.after, signals::migrate_now);
    if signals::stop() {
        drop(printer);
        vcpus.stop()?;
        say(json!({"role": "source", "status": "stopped"}).to_string());
        return Ok(ExitCode::SUCCESS);
    }
    say(format!("migration: connecting to {to}"));
    let t = Instant::now();
    let vm = SourcePause {
        m: &m,
        vcpus: &vcpus,
        digest: args.digest,
        paused: Mutex::new((0, 0)),
        save_ms: Mutex::new(0.0),
    };
    let report = migration::migrate_out(args, to, &m.ram, &vm, &mut || say("migration: started"));
    let save_ms = vm.save_ms.lock().map(|v| *v).unwrap_or(0.0);
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    for r in &report.rounds {
        say(format!("migration: pre-copy round {r}"));
    }
    if let migration::Outcome::Unknown = report.outcome {
        // The destination may run the guest: never resume it here. A management layer
        // would now ask the destination; this example stops.
        let error = report.error.unwrap_or_default();
        drop(printer);
        let before = m.monitor.heartbeats().count;
        std::thread::sleep(Duration::from_millis(500));
        let after = m.monitor.heartbeats().count;
        vcpus.stop()?;
        say(format!(
            "migration outcome unknown: {error}; the guest stays paused here (ask the destination)"
        ));
        say(
            json!({"role": "source", "status": "outcome-unknown", "error": error,
            "guest_kept_running": after > before})
            .to_string(),
        );
        return Ok(ExitCode::from(EXIT_OUTCOME_UNKNOWN));
    }
    if let migration::Outcome::Committed = report.outcome {
        drop(printer);
        vcpus.stop()?;
        print!("{}", report.text);
        let s = &report.stats;
        say(format!(
            "migration: completed in {:.1} ms; source-side downtime {:.2} ms (pause {:.2}, last pages {:.2}, device state {:.2} [vCPU save {:.2}], switchover {:.2}); {:.0} pages/s",
            s["total_ms"].as_f64().unwrap_or(0.0),
            s["downtime_ms"].as_f64().unwrap_or(0.0),
            s["downtime"]["pause_ms"].as_f64().unwrap_or(0.0),
            s["downtime"]["last_pages_ms"].as_f64().unwrap_or(0.0),
            s["downtime"]["device_state_ms"].as_f64().unwrap_or(0.0),
            save_ms,
            s["downtime"]["completion_ms"].as_f64().unwrap_or(0.0),
            s["pages_per_s"].as_f64().unwrap_or(0.0),
        ));
        say(
            json!({"role": "source", "status": "completed", "total_ms": total_ms,
            "vcpu_state_save_ms": save_ms, "pagewire": report.stats})
            .to_string(),
        );
        return Ok(ExitCode::SUCCESS);
    }
    // The guest runs on: pagewire resumed it if it had been paused, and switched dirty
    // logging off.
    let error = report.error.unwrap_or_default();
    say(format!(
        "migration failed: {error}; the guest keeps running here"
    ));
    let before = m.monitor.heartbeats().count;
    wait(args.run_after, || false);
    drop(printer);
    let after = m.monitor.heartbeats().count;
    vcpus.stop()?;
    say(json!({"role": "source", "status": "failed", "error": error,
        "guest_kept_running": after > before,
        "heartbeats_after_failure": after - before})
    .to_string());
    Ok(ExitCode::from(EXIT_MIGRATION_FAILED))
}

fn destination(args: &Args, addr: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let mut m = Machine::build(shape(args))?;
    let incoming = migration::Incoming::bind(args, addr, m.restorer())?;
    say(format!("listening on {}", incoming.local_addr()?));
    // SIGTERM/SIGINT cancel the incoming migration at any point before COMMIT
    // (pagewire's DestinationControl wakes every wait); the guest is then never started.
    // After COMMIT the guest is this side's and a cancel changes nothing.
    let control = incoming.control();
    let receiving = Arc::new(AtomicBool::new(true));
    let watcher = {
        let receiving = receiving.clone();
        std::thread::spawn(move || {
            // Bounded: ends when the migration ends or a signal cancels it.
            while receiving.load(Ordering::Relaxed) {
                if signals::stop() {
                    control.cancel();
                    break;
                }
                std::thread::park_timeout(Duration::from_millis(20));
            }
        })
    };
    let received = incoming.receive(&m.ram, &mut || {
        say("migration: accepted the source's channels")
    });
    let completed = realtime_ns();
    receiving.store(false, Ordering::Relaxed);
    watcher.thread().unpark();
    let _ = watcher.join();
    let received = match received {
        Ok(r) => r,
        Err(e) => {
            say(format!(
                "migration failed: {e:#}; the guest was not started"
            ));
            say(
                json!({"role": "destination", "status": "failed", "error": pagewire_examples::cli::error_text(&e),
                "vcpus_started": false})
                .to_string(),
            );
            return Ok(ExitCode::from(1));
        }
    };
    say(format!(
        "migration: received in {:.1} ms",
        received.receive_ms
    ));
    if let Err(e) = m.restore(&received.sections) {
        say(format!(
            "restoring the guest failed: {e:#}; the guest was not started"
        ));
        say(
            json!({"role": "destination", "status": "failed", "error": pagewire_examples::cli::error_text(&e),
            "vcpus_started": false})
            .to_string(),
        );
        return Ok(ExitCode::from(1));
    }
    let restored = realtime_ns();
    let vmm: serde_json::Value = received
        .sections
        .iter()
        .find(|s| s.name == "vmm" && s.instance == 0)
        .map(|s| serde_json::from_slice(&s.data))
        .transpose()
        .context("the source's vmm section")?
        .ok_or_else(|| anyhow!("no vmm section in the device state"))?;
    let digest = if args.digest {
        let d = digest_line("destination (before resume)", &m.ram)?;
        if let Some(src) = vmm["digest"].as_u64() {
            say(format!(
                "digest equals the source's: {}",
                u64::from(d) == src
            ));
        }
        Some(d)
    } else {
        None
    };
    let start = realtime_ns();
    let vcpus = m.start()?;
    let first = first_heartbeat(&m.monitor)?;
    let printer = HeartbeatPrinter::start(m.monitor.clone());
    let ns = |k: &str| vmm[k].as_u64().unwrap_or(0);
    let last = ns("last_heartbeat_ns");
    // The source's stamps, in order: its last heartbeat, every vCPU stopped, the last
    // pages sent (device state begins), vCPU state saved, memory digested (optional);
    // then this side's: migration committed, state restored, memory digested
    // (optional), vCPUs started, first heartbeat.
    let parts = [
        ("pause", ns("paused_ns").saturating_sub(last)),
        (
            "last pages",
            ns("save_begin_ns").saturating_sub(ns("paused_ns")),
        ),
        (
            "vcpu save",
            ns("saved_ns").saturating_sub(ns("save_begin_ns")),
        ),
        (
            "source digest",
            ns("digested_ns").saturating_sub(ns("saved_ns")),
        ),
        (
            "device state + switchover",
            completed.saturating_sub(ns("digested_ns")),
        ),
        ("restore", restored.saturating_sub(completed)),
        ("digest", start.saturating_sub(restored)),
        ("resume", first.saturating_sub(start)),
    ];
    let mut downtime = serde_json::Map::new();
    downtime.insert(
        "guest_downtime_ms".into(),
        json!(ms(first.saturating_sub(last))),
    );
    let mut text = Vec::new();
    for (name, d) in parts {
        if name.contains("digest") && !args.digest {
            continue;
        }
        let key = format!("{}_ms", name.replace(" + ", "_").replace(' ', "_"));
        downtime.insert(key, json!(ms(d)));
        text.push(format!("{name} {:.2}", ms(d)));
    }
    let downtime = serde_json::Value::Object(downtime);
    say(format!(
        "guest downtime (source's last heartbeat to destination's first): {:.2} ms = {}",
        ms(first.saturating_sub(last)),
        text.join(" + ")
    ));
    let (checked, wrong) = check_and_report(&m)?;
    wait(args.run_after, || false);
    drop(printer);
    vcpus.stop()?;
    let hb = m.monitor.heartbeats();
    let ok = wrong == 0;
    say(
        json!({"role": "destination", "status": if ok {"completed"} else {"check-failed"},
        "vcpus_started": true, "downtime": downtime, "receive_ms": received.receive_ms,
        "self_check": {"checked": checked, "wrong": wrong}, "digest": digest,
        "heartbeats": hb.count, "source": vmm, "pagewire": received.stats})
        .to_string(),
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}
