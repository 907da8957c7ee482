//! CPU time per side, measured in the tool until the library's statistics carry it.
//!
//! A [`CpuMeter`] samples `/proc/self/task/*/stat` every few milliseconds on a thread
//! of its own and keeps, per thread, the user + system time it last saw, from the
//! meter's start. Threads are assigned to a side by their name: the source is this
//! tool's `stress-src` thread, pagewire's channel threads `pagewire-src-N` and codec
//! workers `pagewire-codec-N`; the destination is `stress-dst`, `pagewire-dst-N` and
//! `pagewire-prefault`. The simulated guest's writer (`pagewire-sim-guest`, the
//! vCPUs) and the meter itself count for neither. A thread that ends between two
//! samples loses at most one sampling interval of CPU time (the time itself is read
//! from each thread's CPU-time clock, to the nanosecond);
//! [`CpuMeter::sample`] can be called right before threads are joined.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which side a thread works for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The migration source.
    Source,
    /// The migration destination.
    Destination,
}

/// The side a thread named `comm` (as the kernel truncates it, 15 bytes) works for.
pub fn side_of(comm: &str) -> Option<Side> {
    if comm == "stress-src" || comm.starts_with("pagewire-src") || comm.starts_with("pagewire-cod")
    {
        Some(Side::Source)
    } else if comm == "stress-dst"
        || comm.starts_with("pagewire-dst")
        || comm.starts_with("pagewire-pref")
    {
        Some(Side::Destination)
    } else {
        None
    }
}

/// A thread's identity and CPU time, from one line of `/proc/self/task/TID/stat`.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskStat {
    /// Thread name.
    pub comm: String,
    /// Start time in clock ticks since boot (tells a reused thread id apart).
    pub start: u64,
    /// User + system time, seconds.
    pub cpu_s: f64,
}

/// Parses a `stat` line (`pid (comm) state ...`; comm may contain spaces and
/// parentheses, so fields are counted from the last `)`).
pub fn parse_stat(line: &str, ticks_per_s: f64) -> Option<TaskStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15, starttime 22.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    let start: u64 = rest.get(19)?.parse().ok()?;
    Some(TaskStat {
        comm,
        start,
        cpu_s: (utime + stime) as f64 / ticks_per_s,
    })
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds of thread `tid` of this process, in nanoseconds' precision, from its
/// CPU-time clock (the clock id `pthread_getcpuclockid` builds: `~tid << 3 |
/// CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED`); `None` when the thread is gone.
pub fn tid_cpu_s(tid: u64) -> Option<f64> {
    let tid = i32::try_from(tid).ok()?;
    let clock: libc::clockid_t = ((!(tid as u32)) << 3) as i32 | 6;
    // SAFETY: timespec is plain data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec; a bad clock id is an error return.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// The threads of this process and their CPU time now (from each thread's CPU-time
/// clock; from `stat`'s clock ticks where that clock cannot be read).
pub fn tasks() -> Vec<(u64, TaskStat)> {
    let tps = ticks_per_s();
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let tid: u64 = e.file_name().to_str()?.parse().ok()?;
            let line = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let mut t = parse_stat(&line, tps)?;
            if let Some(precise) = tid_cpu_s(tid) {
                t.cpu_s = precise;
            }
            Some((tid, t))
        })
        .collect()
}

/// CPU seconds of the calling thread (`getrusage(RUSAGE_THREAD)`).
pub fn thread_cpu_s() -> f64 {
    // SAFETY: rusage is plain data, fully written by getrusage on success.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Debug, Default)]
struct Seen {
    /// (tid, start) -> (side, cpu at first sight or meter start, cpu last seen).
    threads: HashMap<(u64, u64), (Side, f64, f64)>,
}

impl Seen {
    fn record(&mut self, all: Vec<(u64, TaskStat)>, at_start: bool) {
        for (tid, t) in all {
            let Some(side) = side_of(&t.comm) else {
                continue;
            };
            let e = self
                .threads
                .entry((tid, t.start))
                // A thread seen at the meter's start counts from there; one born
                // later counts from zero.
                .or_insert((side, if at_start { t.cpu_s } else { 0.0 }, t.cpu_s));
            e.2 = e.2.max(t.cpu_s);
        }
    }
}

/// CPU seconds per side over an interval (see the module docs).
#[derive(Debug)]
pub struct CpuMeter {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CpuMeter {
    /// Starts sampling every `every`.
    pub fn start(every: Duration) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        if let Ok(mut s) = seen.lock() {
            s.record(tasks(), true);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("stress-cpu".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let all = tasks();
                    if let Ok(mut s) = s2.lock() {
                        s.record(all, false);
                    }
                }
            })
            .ok();
        CpuMeter { seen, stop, thread }
    }

    /// Takes a sample now (call it right before joining the threads measured).
    pub fn sample(&self) {
        let all = tasks();
        if let Ok(mut s) = self.seen.lock() {
            s.record(all, false);
        }
    }

    /// Stops sampling and returns (source, destination) CPU seconds.
    pub fn finish(mut self) -> (f64, f64) {
        self.sample();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = self.seen.lock().map(|s| {
            let mut out = (0.0, 0.0);
            for (side, first, last) in s.threads.values() {
                let d = (last - first).max(0.0);
                match side {
                    Side::Source => out.0 += d,
                    Side::Destination => out.1 += d,
                }
            }
            out
        });
        s.unwrap_or((0.0, 0.0))
    }
}

impl Drop for CpuMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "1234 (pagewire-src-0) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 777 0 0";
        let t = parse_stat(line, 100.0).unwrap();
        assert_eq!(t.comm, "pagewire-src-0");
        assert!((t.cpu_s - 3.0).abs() < 1e-9);
        assert_eq!(t.start, 777);
        let odd = "1 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 1 1 0 0 20 0 3 0 9 0 0";
        assert_eq!(parse_stat(odd, 100.0).unwrap().comm, "a) b (c)");
        assert!(parse_stat("garbage", 100.0).is_none());
    }

    #[test]
    fn a_threads_cpu_clock_matches_getrusage() {
        let mut x = 1u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u64;
        let (a, b) = (thread_cpu_s(), tid_cpu_s(tid).unwrap());
        assert!(b > 0.0 && (a - b).abs() < 0.02, "getrusage {a}, clock {b}");
        assert!(tid_cpu_s(u64::from(u32::MAX)).is_none());
    }

    #[test]
    fn threads_are_assigned_by_name() {
        assert_eq!(side_of("pagewire-src-3"), Some(Side::Source));
        assert_eq!(side_of("pagewire-codec-"), Some(Side::Source));
        assert_eq!(side_of("stress-dst"), Some(Side::Destination));
        assert_eq!(side_of("pagewire-prefau"), Some(Side::Destination));
        assert_eq!(side_of("pagewire-sim-gu"), None);
        assert_eq!(side_of("stress-cpu"), None);
    }

    #[test]
    fn a_busy_source_thread_is_measured() {
        let meter = CpuMeter::start(Duration::from_millis(5));
        let own = std::thread::Builder::new()
            .name("stress-src".into())
            .spawn(|| {
                // Bounded busy work: until this thread used 50 ms of CPU, at most 10^10
                // iterations.
                let mut x = 1u64;
                for i in 0..10_000_000_000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                    if i % 1_000_000 == 0 && thread_cpu_s() >= 0.05 {
                        break;
                    }
                }
                std::hint::black_box(x);
                thread_cpu_s()
            })
            .unwrap();
        // Sample while it is still alive, then join.
        let used = loop {
            meter.sample();
            if own.is_finished() {
                break own.join().unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let (src, dst) = meter.finish();
        assert!(used >= 0.05);
        assert!(src >= 0.03 && src <= used + 0.02, "src {src}, used {used}");
        assert_eq!(dst, 0.0);
    }
}
