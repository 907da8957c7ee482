//! The IAA **device model**: software standing in for an IAA work queue, behind the
//! same [`Portal`] interface, for tests and `demo --accel model`. It is not a device
//! and no figure measured on it says anything about IAA hardware.
//!
//! What it models:
//! - a work queue of `size` entries, shared (a full queue refuses a submission, as
//!   `ENQCMD` does) or dedicated (the submitter must count; an overfull submission is
//!   a caller bug and is refused too);
//! - `engines` worker threads that take descriptors from the queue and execute them
//!   with the device's semantics, so completions come back out of order from
//!   another thread: compress (0x43) with a 4 KiB history, output capped at the
//!   maximum destination size (status `OUTPUT_OVERFLOW` when it does not fit), either
//!   with the fixed Huffman code (no AECS), in statistics mode (the histogram of the
//!   tokens written to the destination), or with the Huffman table and output
//!   accumulator of a compress AECS read from source 2 ([`super::aecs`]; a symbol
//!   without a code in the table is an `ANALYTICS_ERROR`); decompress (0x42) of one
//!   complete stream into at most the maximum
//!   destination size, refusing streams that reach back more than 4 KiB as an IAA
//!   does (`ANALYTICS_ERROR`); any other opcode gets `BAD_OPCODE`;
//! - memory access like a device with shared virtual addressing: it reads the source
//!   and writes the destination and the completion record at the descriptor's
//!   addresses, the record last with its status released;
//! - faults on demand ([`ModelFaults`]): queue full (a burst of refusals longer than a
//!   submitter's retry budget), a page fault with a partial completion (half the
//!   source reported done, fault address and bytes completed set; the destination may
//!   hold output written before the fault), an
//!   output overflow, a hung descriptor (never completed), and the device disabled
//!   (every later descriptor dropped, [`Portal::enabled`] false).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};

use super::aecs::{self, AECS_SIZE, Aecs, HISTOGRAM_SIZE, Histogram};
use super::desc::{
    Completed, CompletionRecord, Descriptor, Status, compress_flags, op_flags, opcode,
};
use super::portal::{Enqueue, Portal, WqMode};
use crate::codec::deflate::{
    BitWriter, Inflater, Token, WINDOW_4K, compress_fixed_window, distance_code,
    inflate_max_distance, length_symbol, lz77_window, put_code,
};
use crate::engine::{ModelFault, ModelFaults};

/// Refusals in one injected queue-full burst: more than any submitter retries.
pub const QUEUE_FULL_BURST: u64 = 1024;

/// How the device model is built.
#[derive(Clone, Copy, Debug)]
pub struct ModelConfig {
    /// Shared or dedicated work queue.
    pub mode: WqMode,
    /// Work queue entries.
    pub size: usize,
    /// Engines (worker threads) executing descriptors.
    pub engines: usize,
    /// Largest transfer per descriptor.
    pub max_transfer: usize,
    /// Faults to inject.
    pub faults: ModelFaults,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            mode: WqMode::Shared,
            size: 128,
            engines: 2,
            max_transfer: 2 << 20,
            faults: ModelFaults::default(),
        }
    }
}

/// What the model did, for tests.
#[derive(Debug, Default)]
pub struct ModelCounters {
    /// Descriptors accepted.
    pub accepted: AtomicU64,
    /// Submissions refused.
    pub refused: AtomicU64,
    /// Completion records written.
    pub completed: AtomicU64,
    /// Faults injected.
    pub injected: AtomicU64,
}

struct Shared {
    enabled: AtomicBool,
    counters: ModelCounters,
    faults: ModelFaults,
    /// Refusals left in the current injected queue-full burst.
    burst_left: AtomicU64,
    /// The descriptor index whose queue-full burst was injected last.
    last_burst: AtomicU64,
}

/// The device model (see the module documentation).
pub struct DeviceModel {
    config: ModelConfig,
    tx: Option<Sender<(u64, Descriptor)>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl core::fmt::Debug for DeviceModel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DeviceModel {
    /// Starts the model's engines.
    ///
    /// # Errors
    /// The error of a thread that could not start.
    pub fn new(config: ModelConfig) -> std::io::Result<DeviceModel> {
        let (tx, rx) = bounded::<(u64, Descriptor)>(config.size.max(1));
        let shared = Arc::new(Shared {
            enabled: AtomicBool::new(true),
            counters: ModelCounters::default(),
            faults: config.faults,
            burst_left: AtomicU64::new(0),
            last_burst: AtomicU64::new(u64::MAX),
        });
        let mut workers = Vec::new();
        for i in 0..config.engines.max(1) {
            let rx = rx.clone();
            let shared = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("iaa-model-{i}"))
                    .spawn(move || engine(&rx, &shared))?,
            );
        }
        Ok(DeviceModel {
            config,
            tx: Some(tx),
            shared,
            workers,
        })
    }

    /// The model's counters.
    pub fn counters(&self) -> &ModelCounters {
        &self.shared.counters
    }

    /// Disables the device now, as an administrator or a device error would.
    pub fn disable(&self) {
        self.shared.enabled.store(false, Ordering::Release);
    }

    fn fault_due(&self, index: u64, fault: ModelFault) -> bool {
        self.shared.faults.fault == Some(fault)
            && (index + 1).is_multiple_of(u64::from(self.shared.faults.every.max(1)))
    }
}

impl Portal for DeviceModel {
    fn describe(&self) -> String {
        format!(
            "IAA device model ({:?}, {} entries, {} engines{})",
            self.config.mode,
            self.config.size,
            self.config.engines,
            match self.config.faults.fault {
                Some(f) => format!(
                    ", injecting {} every {}",
                    f.name(),
                    self.config.faults.every
                ),
                None => String::new(),
            }
        )
    }

    fn mode(&self) -> WqMode {
        self.config.mode
    }

    fn size(&self) -> usize {
        self.config.size
    }

    fn max_transfer(&self) -> usize {
        self.config.max_transfer
    }

    fn enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Acquire)
    }

    unsafe fn submit(&mut self, desc: &Descriptor) -> Enqueue {
        let c = &self.shared.counters;
        if !self.enabled() {
            c.refused.fetch_add(1, Ordering::Relaxed);
            return Enqueue::Retry;
        }
        let index = c.accepted.load(Ordering::Relaxed);
        if self.shared.burst_left.load(Ordering::Relaxed) > 0 {
            self.shared.burst_left.fetch_sub(1, Ordering::Relaxed);
            c.refused.fetch_add(1, Ordering::Relaxed);
            return Enqueue::Retry;
        }
        if self.fault_due(index, ModelFault::QueueFull)
            && self.shared.last_burst.swap(index, Ordering::Relaxed) != index
        {
            c.injected.fetch_add(1, Ordering::Relaxed);
            self.shared
                .burst_left
                .store(QUEUE_FULL_BURST - 1, Ordering::Relaxed);
            c.refused.fetch_add(1, Ordering::Relaxed);
            return Enqueue::Retry;
        }
        if self.fault_due(index, ModelFault::DeviceDisabled) {
            c.injected.fetch_add(1, Ordering::Relaxed);
            self.disable();
        }
        let Some(tx) = self.tx.as_ref() else {
            return Enqueue::Retry;
        };
        match tx.try_send((index, *desc)) {
            Ok(()) => {
                c.accepted.fetch_add(1, Ordering::Relaxed);
                Enqueue::Accepted
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                Enqueue::Retry
            }
        }
    }
}

impl Drop for DeviceModel {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn engine(rx: &Receiver<(u64, Descriptor)>, shared: &Shared) {
    let mut src = Vec::new();
    let mut out = Vec::new();
    let mut inflater = None;
    loop {
        let (index, desc) = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(d) => d,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if !shared.enabled.load(Ordering::Acquire) {
            continue; // a disabled device drops what it holds
        }
        let due = |f| {
            shared.faults.fault == Some(f)
                && (index + 1).is_multiple_of(u64::from(shared.faults.every.max(1)))
        };
        if due(ModelFault::Hang) {
            shared.counters.injected.fetch_add(1, Ordering::Relaxed);
            continue; // never completes
        }
        let mut rec = execute(&desc, &mut src, &mut out, &mut inflater);
        if rec.status == Status::SUCCESS.0 && due(ModelFault::PageFault) {
            shared.counters.injected.fetch_add(1, Ordering::Relaxed);
            rec = partial_fault(&desc);
        } else if rec.status == Status::SUCCESS.0 && due(ModelFault::OutputOverflow) {
            shared.counters.injected.fetch_add(1, Ordering::Relaxed);
            rec = Completed {
                status: Status::OUTPUT_OVERFLOW.0,
                bytes_completed: desc.src1_size() / 2,
                ..Default::default()
            };
        }
        if desc.completion_addr() != 0 && desc.completion_addr().is_multiple_of(64) {
            // SAFETY: the submitter's contract (`Portal::submit`) keeps the record
            // live and unaccessed until it is written, which happens once, here.
            unsafe { CompletionRecord::write_at(desc.completion_addr(), &rec) };
            shared.counters.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A page fault half way through the source: the device stops there and reports
/// what it did.
fn partial_fault(desc: &Descriptor) -> Completed {
    let half = desc.src1_size() / 2;
    let on_write = desc.opcode() == opcode::DECOMPRESS;
    Completed {
        status: Status::PAGE_FAULT_NOBOF.0,
        fault_on_write: on_write,
        bytes_completed: half,
        fault_addr: if on_write {
            desc.dst_addr() + u64::from(desc.max_dst_size() / 2)
        } else {
            desc.src1_addr() + u64::from(half)
        },
        ..Default::default()
    }
}

/// Runs one descriptor and returns its completion record (written by the caller).
fn execute(
    desc: &Descriptor,
    src: &mut Vec<u8>,
    out: &mut Vec<u8>,
    inflater: &mut Option<Option<Inflater>>,
) -> Completed {
    let fail = |s: Status| Completed {
        status: s.0,
        ..Default::default()
    };
    if !desc.completion_addr().is_multiple_of(64) {
        return fail(Status::RECORD_ALIGN);
    }
    let op = desc.opcode();
    if op != opcode::COMPRESS && op != opcode::DECOMPRESS {
        return fail(Status::BAD_OPCODE);
    }
    let (src_len, max_dst) = (desc.src1_size() as usize, desc.max_dst_size() as usize);
    if src_len == 0 || desc.src1_addr() == 0 || desc.dst_addr() == 0 || max_dst == 0 {
        return fail(Status::INVALID_SIZE);
    }
    src.resize(src_len, 0);
    // SAFETY: the submitter's contract makes the source readable for `src_len` bytes
    // until the record is written; a device reads it with no regard for concurrent
    // CPU writes, and so does this raw copy.
    unsafe {
        core::ptr::copy_nonoverlapping(desc.src1_addr() as *const u8, src.as_mut_ptr(), src_len)
    };
    out.resize(max_dst, 0);
    let produced = if op == opcode::COMPRESS {
        let r = if desc.is_statistics() {
            let h = statistics(src).to_bytes();
            out.get_mut(..HISTOGRAM_SIZE).map(|o| {
                o.copy_from_slice(&h);
                HISTOGRAM_SIZE
            })
        } else if desc.flags() & op_flags::READ_SRC2_AECS != 0 {
            if (desc.src2_size() as usize) < AECS_SIZE || desc.src2_addr() == 0 {
                return fail(Status::INVALID_SIZE);
            }
            if !desc.src2_addr().is_multiple_of(32) {
                return fail(Status::ADDR_ALIGN);
            }
            let mut state = Aecs::default();
            // SAFETY: the submitter's contract makes source 2 readable for its size
            // (at least `AECS_SIZE`, checked above) until the record is written.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    desc.src2_addr() as *const u8,
                    state.bytes_mut().as_mut_ptr(),
                    AECS_SIZE,
                )
            };
            let eob = desc.op_specific_flags() & compress_flags::APPEND_EOB != 0;
            match compress_with_aecs(src, &state, eob, out) {
                Ok(r) => r,
                Err(status) => {
                    return Completed {
                        status: status.0,
                        error_code: 2,
                        ..Default::default()
                    };
                }
            }
        } else {
            compress_fixed_window(src, out)
        };
        match r {
            Some(n) => n,
            None => {
                return Completed {
                    status: Status::OUTPUT_OVERFLOW.0,
                    ..Default::default()
                };
            }
        }
    } else {
        // The model inflates streams whose output is exactly the destination size,
        // which is how the backend uses the device (one page per descriptor). Up to
        // 4 KiB of output no back-reference can reach further than the history, so
        // libdeflate does it; beyond, the checking inflater refuses longer ones.
        let ok = if max_dst <= WINDOW_4K {
            inflater
                .get_or_insert_with(Inflater::new)
                .as_mut()
                .is_some_and(|i| i.inflate_exact(src, out))
        } else {
            inflate_max_distance(src, out).is_some_and(|d| d <= WINDOW_4K)
        };
        match ok {
            true => max_dst,
            _ => {
                return Completed {
                    status: Status::ANALYTICS_ERROR.0,
                    error_code: 1,
                    ..Default::default()
                };
            }
        }
    };
    // SAFETY: the submitter's contract makes the destination writable for
    // `max_dst` bytes (we write `produced ≤ max_dst`) and unaccessed by others.
    unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), desc.dst_addr() as *mut u8, produced) };
    Completed {
        status: Status::SUCCESS.0,
        bytes_completed: src_len as u32,
        output_size: produced as u32,
        ..Default::default()
    }
}

/// Statistics mode: the histogram of the tokens the compressor would write for
/// `src` (the end-of-block code is not counted; the host adds it).
fn statistics(src: &[u8]) -> Histogram {
    let mut h = Histogram::default();
    let _ = lz77_window(src, |t| {
        match t {
            Token::Literal(b) => h.ll[usize::from(b)] += 1,
            Token::Match { len, dist } => {
                let (sym, _, _) = length_symbol(usize::from(len))?;
                let (code, _, _) = distance_code(usize::from(dist))?;
                h.ll[sym as usize] += 1;
                h.d[code as usize] += 1;
            }
        }
        Some(())
    });
    h
}

/// Compression with a compress AECS: the accumulator's valid bits, then the tokens
/// coded with the AECS's table, then (with `eob`) the table's end-of-block code,
/// flushed to a whole byte. `Ok(None)` when the output does not fit `out`;
/// `Err(ANALYTICS_ERROR)` for an invalid accumulator or a symbol without a code.
fn compress_with_aecs(
    src: &[u8],
    state: &Aecs,
    eob: bool,
    out: &mut [u8],
) -> Result<Option<usize>, Status> {
    let bits = state.accum_bits() as usize;
    if bits > aecs::ACCUM_SIZE * 8 {
        return Err(Status::ANALYTICS_ERROR);
    }
    let accum = &state.bytes()[aecs::ACCUM_OFFSET..aecs::ACCUM_OFFSET + aecs::ACCUM_SIZE];
    let mut w = BitWriter::new(out);
    let mut bad = false;
    let mut code = |w: &mut BitWriter<'_>, e: u32, extra: u32, v: u32| {
        let (len, c) = aecs::entry_parts(e);
        if len == 0 {
            bad = true;
            return None;
        }
        put_code(w, u32::from(c), u32::from(len))?;
        w.put(v, extra)
    };
    let written = (|| {
        for &byte in &accum[..bits / 8] {
            w.put(u32::from(byte), 8)?;
        }
        if !bits.is_multiple_of(8) {
            w.put(u32::from(accum[bits / 8]), (bits % 8) as u32)?;
        }
        lz77_window(src, |t| match t {
            Token::Literal(b) => code(&mut w, state.ll_entry(usize::from(b)), 0, 0),
            Token::Match { len, dist } => {
                let (sym, lx, lv) = length_symbol(usize::from(len))?;
                code(&mut w, state.ll_entry(sym as usize), lx, lv)?;
                let (dc, dx, dv) = distance_code(usize::from(dist))?;
                code(&mut w, state.d_entry(dc as usize), dx, dv)
            }
        })?;
        if eob {
            code(&mut w, state.ll_entry(256), 0, 0)?;
        }
        Some(())
    })();
    if bad {
        return Err(Status::ANALYTICS_ERROR);
    }
    Ok(written.and_then(|()| w.finish()))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::iaa::portal::{CpuFeatures, wait_record};

    /// Submits `d` to `model` and waits for its record.
    fn execute_on(model: &mut DeviceModel, d: &Descriptor, rec: &CompletionRecord) -> Completed {
        rec.reset();
        // SAFETY: every address in `d` points at live buffers of the caller's that
        // outlive the wait below, which returns once the record is written.
        assert_eq!(unsafe { model.submit(d) }, Enqueue::Accepted);
        let until = Instant::now() + Duration::from_secs(10);
        wait_record(rec, until, CpuFeatures::detect());
        assert!(rec.is_done());
        rec.read()
    }

    #[test]
    fn statistics_then_aecs_compression_make_a_dynamic_stream_and_a_missing_code_fails() {
        let mut model = DeviceModel::new(ModelConfig::default()).expect("model");
        let rec = CompletionRecord::default();
        // Words in a pseudo-random order: repeats for LZ77, skewed bytes for Huffman.
        let words = ["dirty ", "guest ", "page ", "0x7f3a ", "frame\n", "round "];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut page = Vec::new();
        while page.len() < 4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            page.extend_from_slice(words[(x % 6) as usize].as_bytes());
        }
        page.truncate(4096);
        let mut aecs = Box::new(Aecs::default());
        let mut out = vec![0u8; 4095];
        let src = page.as_ptr() as u64;

        // Pass 1: the histogram lands in the AECS table region.
        let d = Descriptor::statistics(src, 4096, aecs.histogram_addr(), rec.addr());
        let c = execute_on(&mut model, &d, &rec);
        assert_eq!((c.status(), c.output_size), (Status::SUCCESS, 1280));
        let h = aecs.histogram();
        assert_eq!(h, statistics(&page));
        assert!(h.ll[usize::from(b'd')] > 0 && h.ll[257..].iter().any(|&n| n > 0));
        assert_eq!(h.ll[256], 0, "end of block is the host's to add");

        // Compress descriptors of the page into `out`, capped at `max` bytes.
        let dst = out.as_mut_ptr() as u64;
        let compress = |aecs, max| Descriptor::compress(src, 4096, dst, max, rec.addr(), aecs);

        // A table without codes for the page's symbols: the device refuses.
        let empty = Box::new(Aecs::default());
        let d = compress(Some((empty.addr(), AECS_SIZE as u32)), 4095);
        let c = execute_on(&mut model, &d, &rec);
        assert_eq!(c.status(), Status::ANALYTICS_ERROR);
        // An AECS shorter than its layout is an invalid size.
        let d = compress(Some((aecs.addr(), 1024)), 4095);
        let c = execute_on(&mut model, &d, &rec);
        assert_eq!(c.status(), Status::INVALID_SIZE);

        // Pass 2 with the host's code: a final dynamic block libdeflate inflates.
        assert!(aecs.load_dynamic());
        let aecs_arg = Some((aecs.addr(), AECS_SIZE as u32));
        let d = compress(aecs_arg, 4095);
        let c = execute_on(&mut model, &d, &rec);
        assert_eq!(c.status(), Status::SUCCESS);
        let n = c.output_size as usize;
        assert_eq!(out[0] & 0b111, 0b101, "BFINAL, dynamic");
        let mut back = vec![0u8; 4096];
        assert!(
            Inflater::new()
                .expect("inflater")
                .inflate_exact(&out[..n], &mut back)
        );
        assert_eq!(back, page);
        let mut fixed = vec![0u8; 4096];
        let f = compress_fixed_window(&page, &mut fixed).expect("fits");
        assert!(n < f, "dynamic {n} bytes vs fixed {f}");

        // The output cap: one byte short of the stream is an overflow.
        let d = compress(aecs_arg, n as u32 - 1);
        assert_eq!(
            execute_on(&mut model, &d, &rec).status(),
            Status::OUTPUT_OVERFLOW
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// Any page, through statistics, the host's code and compression with the
        /// AECS, is one stream libdeflate inflates back to the page (or does not
        /// fit the cap): headers and tables hold for every histogram shape.
        #[test]
        fn every_page_round_trips_through_the_dynamic_path(
            alphabet in 1u8..=255,
            runs in 0usize..64,
            seed in proptest::prelude::any::<u64>(),
            len in 1usize..=4096,
        ) {
            let mut x = seed | 1;
            let mut page = Vec::with_capacity(len);
            while page.len() < len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = (x % u64::from(alphabet)) as u8;
                let n = if runs > 0 && x % 7 == 0 { (x as usize >> 8) % runs } else { 1 };
                page.extend(std::iter::repeat_n(b, n.max(1)));
            }
            page.truncate(len);
            let mut aecs = Aecs::default();
            aecs.bytes_mut()[aecs::TABLE_OFFSET..].copy_from_slice(&statistics(&page).to_bytes());
            proptest::prop_assert!(aecs.load_dynamic());
            let mut out = vec![0u8; len + 1024];
            let n = compress_with_aecs(&page, &aecs, true, &mut out)
                .expect("every symbol has a code")
                .expect("fits");
            let mut back = vec![0u8; len];
            proptest::prop_assert!(Inflater::new().expect("inflater").inflate_exact(&out[..n], &mut back));
            proptest::prop_assert_eq!(back, page);
        }
    }
}
