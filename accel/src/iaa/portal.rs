//! The portal: where descriptors go in. One trait, three implementations: a kernel
//! idxd work queue ([`super::wq`]), a BAR mapped through VFIO (`super::vfio`, feature
//! `vfio`), and the device model ([`super::model`]).
//!
//! Also the CPU side of submission and waiting: `ENQCMD` (shared work queues: the
//! device may refuse, the CPU reports it in ZF), `MOVDIR64B` (dedicated work queues:
//! no feedback, so the submitter counts its descriptors against the queue size), and
//! `UMONITOR`/`UMWAIT` to wait on a completion record's status with the core in a
//! light sleep where the CPU has WAITPKG. The instructions are emitted as bytes, so
//! the crate builds with any target features; each is used only after CPUID says the
//! CPU has it.

use std::time::Instant;

use super::desc::{CompletionRecord, Descriptor};

/// How a work queue is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WqMode {
    /// Shared: many submitters, `ENQCMD`, the device may refuse a descriptor.
    Shared,
    /// Dedicated: one submitter, `MOVDIR64B`, never more descriptors in flight than
    /// the queue holds.
    Dedicated,
}

/// Whether the device took a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueue {
    /// Accepted: its completion record will be written.
    Accepted,
    /// Refused (shared queue full, `ENQCMD` set ZF): submit it again later.
    Retry,
}

/// A place to submit IAA descriptors to.
pub trait Portal: Send {
    /// A one-line description (`"/dev/iax/wq1.0 (shared, 128 entries)"`).
    fn describe(&self) -> String;
    /// Shared or dedicated.
    fn mode(&self) -> WqMode;
    /// Entries of the work queue.
    fn size(&self) -> usize;
    /// Largest source or destination one descriptor may have.
    fn max_transfer(&self) -> usize;
    /// Whether the work queue still takes descriptors (`false` once the device or
    /// queue was disabled: descriptors in flight will never complete).
    fn enabled(&self) -> bool;
    /// Submits one descriptor.
    ///
    /// # Safety
    /// Every address in `desc` must stay valid until its completion record is
    /// written (or [`Portal::enabled`] turned `false`): the source readable, the
    /// destination and the 64-byte-aligned completion record writable and not
    /// accessed by anyone else meanwhile.
    unsafe fn submit(&mut self, desc: &Descriptor) -> Enqueue;
    /// Whether memory the device touches must first be DMA-mapped with
    /// [`Portal::map_dma`] (VFIO); `false` with shared virtual addressing.
    fn needs_dma_map(&self) -> bool {
        false
    }
    /// Makes `len` bytes at `addr` reachable by the device at the same address (an
    /// identity IOVA mapping in the VFIO container); nothing to do with shared
    /// virtual addressing.
    ///
    /// # Safety
    /// The range must stay mapped and allocated until the portal is dropped, and be
    /// accessed only through raw pointers while the device may write it.
    ///
    /// # Errors
    /// The mapping ioctl's error.
    unsafe fn map_dma(&mut self, addr: u64, len: usize) -> std::io::Result<()> {
        let _ = (addr, len);
        Ok(())
    }
}

/// CPU features the portal instructions need (CPUID leaf 7, ECX).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// `UMONITOR`/`UMWAIT`/`TPAUSE`.
    pub waitpkg: bool,
    /// `MOVDIR64B`.
    pub movdir64b: bool,
    /// `ENQCMD`.
    pub enqcmd: bool,
}

impl CpuFeatures {
    /// Asks CPUID.
    pub fn detect() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            let max = core::arch::x86_64::__cpuid(0).eax;
            if max < 7 {
                return CpuFeatures::default();
            }
            let ecx = core::arch::x86_64::__cpuid_count(7, 0).ecx;
            CpuFeatures {
                waitpkg: ecx & (1 << 5) != 0,
                movdir64b: ecx & (1 << 28) != 0,
                enqcmd: ecx & (1 << 29) != 0,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuFeatures::default()
    }
}

/// `ENQCMD portal, desc`: `true` when the device accepted it.
///
/// # Safety
/// `portal` must be a mapped idxd shared work queue portal, the CPU must have ENQCMD,
/// and `desc`'s addresses must obey [`Portal::submit`]'s contract.
#[cfg(target_arch = "x86_64")]
pub unsafe fn enqcmd(portal: *mut u8, desc: &Descriptor) -> bool {
    let retry: u8;
    // SAFETY: per the contract. `sfence` orders the caller's earlier stores (buffers,
    // the zeroed record) before the device can see the descriptor; `enqcmd rax,
    // [rdx]` (F2 0F 38 F8 /r, ModRM 0x02) sets ZF when the device refused.
    unsafe {
        core::arch::asm!(
            "sfence",
            ".byte 0xf2, 0x0f, 0x38, 0xf8, 0x02",
            "setz {r}",
            in("rax") portal,
            in("rdx") desc as *const Descriptor,
            r = out(reg_byte) retry,
            options(nostack),
        );
    }
    retry == 0
}

/// `MOVDIR64B portal, desc`.
///
/// # Safety
/// `portal` must be a mapped idxd dedicated work queue portal with room for one more
/// descriptor, the CPU must have MOVDIR64B, and `desc`'s addresses must obey
/// [`Portal::submit`]'s contract.
#[cfg(target_arch = "x86_64")]
pub unsafe fn movdir64b(portal: *mut u8, desc: &Descriptor) {
    // SAFETY: per the contract; `movdir64b rax, [rdx]` is 66 0F 38 F8 /r, ModRM 0x02.
    unsafe {
        core::arch::asm!(
            "sfence",
            ".byte 0x66, 0x0f, 0x38, 0xf8, 0x02",
            in("rax") portal,
            in("rdx") desc as *const Descriptor,
            options(nostack),
        );
    }
}

/// Waits until `record` is written or `until` passes: `UMONITOR` on the record and
/// `UMWAIT` (C0.2 light sleep, bounded by a TSC deadline) when the CPU has WAITPKG,
/// else a spin with `pause` that yields the core every 64 rounds and, after 4096
/// rounds, sleeps 20 µs at a time. Returns whether the record was written.
pub fn wait_record(record: &CompletionRecord, until: Instant, cpu: CpuFeatures) -> bool {
    let mut spins = 0u32;
    loop {
        if record.is_done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if cpu.waitpkg {
            // SAFETY: the CPU has WAITPKG; the monitored address is the live record;
            // UMWAIT only sleeps (at most ~100 µs of TSC ticks here) and clobbers
            // nothing but flags.
            unsafe { umwait_on(record.addr(), 200_000) };
            continue;
        }
        let _ = cpu;
        spins += 1;
        if spins > 4096 {
            // Long waits (a slow device, a shared core): stop burning the core.
            std::thread::sleep(std::time::Duration::from_micros(20));
        } else if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            core::hint::spin_loop();
        }
    }
}

/// `UMONITOR addr; UMWAIT` for up to `ticks` TSC ticks.
///
/// # Safety
/// The CPU must have WAITPKG.
#[cfg(target_arch = "x86_64")]
unsafe fn umwait_on(addr: u64, ticks: u64) {
    // SAFETY: per the contract; RDTSC reads the counter, UMONITOR rax (F3 0F AE F0)
    // arms the monitor, UMWAIT ecx (F2 0F AE F1) with ecx = 0 (C0.2) sleeps until a
    // store to the line or the EDX:EAX deadline.
    unsafe {
        core::arch::asm!(
            ".byte 0xf3, 0x0f, 0xae, 0xf0",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "add rax, {t}",
            "mov rdx, rax",
            "shr rdx, 32",
            "xor ecx, ecx",
            ".byte 0xf2, 0x0f, 0xae, 0xf1",
            t = in(reg) ticks,
            inout("rax") addr => _,
            out("rdx") _,
            out("rcx") _,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_returns_when_another_thread_writes_the_record_or_times_out() {
        let cpu = CpuFeatures::detect();
        let rec = std::sync::Arc::new(CompletionRecord::default());
        let start = Instant::now();
        assert!(!wait_record(
            &rec,
            start + std::time::Duration::from_millis(5),
            cpu
        ));
        let r2 = rec.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let done = super::super::desc::Completed {
                status: 1,
                ..Default::default()
            };
            // SAFETY: the record is live (held by the Arc).
            unsafe { CompletionRecord::write_at(r2.addr(), &done) };
        });
        assert!(wait_record(
            &rec,
            Instant::now() + std::time::Duration::from_secs(10),
            cpu
        ));
        t.join().expect("writer");
    }
}
