//! vCPU and VM state: saved from a paused VM, encoded as tagged byte records, decoded
//! and restored into another VM before its vCPUs first run.
//!
//! The encoding is `(tag u32, length u32, bytes)*`, little-endian, each record a KVM
//! structure's bytes (kvm-bindings' zerocopy impls); both ends are this binary on one
//! kind of host, so the structures' layout is shared.

use anyhow::{Context, anyhow, bail};
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use zerocopy::{FromBytes, IntoBytes};

/// MSRs saved when the host's KVM lists them: SYSENTER, SYSCALL, kernel GS base, TSC,
/// TSC_AUX, misc enable, PAT, MTRR default type, TSC deadline.
const MSRS: [u32; 14] = [
    0x174,
    0x175,
    0x176,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
    0x10,
    0x1a0,
    0x277,
    0x2ff,
    0x6e0,
];

/// The MSRs of [`MSRS`] this host's KVM can save.
///
/// # Errors
/// `KVM_GET_MSR_INDEX_LIST` failed.
pub fn msr_indices(kvm: &Kvm) -> anyhow::Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().context("KVM_GET_MSR_INDEX_LIST")?;
    let have = list.as_slice();
    Ok(MSRS.iter().copied().filter(|m| have.contains(m)).collect())
}

mod tag {
    pub const REGS: u32 = 1;
    pub const SREGS: u32 = 2;
    pub const XSAVE: u32 = 3;
    pub const XCRS: u32 = 4;
    pub const MSRS: u32 = 5;
    pub const LAPIC: u32 = 6;
    pub const EVENTS: u32 = 7;
    pub const MP_STATE: u32 = 8;
    pub const DEBUGREGS: u32 = 9;
    pub const PIC_MASTER: u32 = 20;
    pub const PIC_SLAVE: u32 = 21;
    pub const IOAPIC: u32 = 22;
    pub const CLOCK: u32 = 23;
}

/// One vCPU's architectural state.
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

impl VcpuState {
    /// Saves a paused vCPU (its pending I/O completed).
    ///
    /// # Errors
    /// A KVM get ioctl failed, or not every MSR could be read.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> anyhow::Result<Self> {
        let mut msrs = Msrs::from_entries(
            &msr_indices
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| anyhow!("MSR list: {e:?}"))?;
        let n = fd.get_msrs(&mut msrs).context("KVM_GET_MSRS")?;
        if n != msr_indices.len() {
            bail!("KVM_GET_MSRS read {n} of {} MSRs", msr_indices.len());
        }
        Ok(Self {
            regs: fd.get_regs().context("KVM_GET_REGS")?,
            sregs: fd.get_sregs().context("KVM_GET_SREGS")?,
            xsave: fd.get_xsave().context("KVM_GET_XSAVE")?,
            xcrs: fd.get_xcrs().context("KVM_GET_XCRS")?,
            msrs: msrs.as_slice().to_vec(),
            lapic: fd.get_lapic().context("KVM_GET_LAPIC")?,
            events: fd.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
            mp_state: fd.get_mp_state().context("KVM_GET_MP_STATE")?,
            debugregs: fd.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
        })
    }

    /// The saved MSRs (the restore test alters one, to see the check refuse it).
    pub fn msrs_mut(&mut self) -> &mut [kvm_msr_entry] {
        &mut self.msrs
    }

    /// Loads this state into a vCPU that has not run yet (CPUID already set), in
    /// Firecracker's order.
    ///
    /// # Errors
    /// A KVM set ioctl failed.
    pub fn restore(&self, fd: &VcpuFd) -> anyhow::Result<()> {
        fd.set_mp_state(self.mp_state).context("KVM_SET_MP_STATE")?;
        fd.set_regs(&self.regs).context("KVM_SET_REGS")?;
        fd.set_sregs(&self.sregs).context("KVM_SET_SREGS")?;
        // SAFETY: `kvm_xsave` is the 4 KiB legacy area, which is all KVM reads when
        // KVM_CAP_XSAVE2 reports at most 4096 bytes (checked by `Vm::xsave_fits`
        // before anything is saved or restored).
        unsafe { fd.set_xsave(&self.xsave) }.context("KVM_SET_XSAVE")?;
        fd.set_xcrs(&self.xcrs).context("KVM_SET_XCRS")?;
        fd.set_debug_regs(&self.debugregs)
            .context("KVM_SET_DEBUGREGS")?;
        fd.set_lapic(&self.lapic).context("KVM_SET_LAPIC")?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| anyhow!("MSRs: {e:?}"))?;
        let n = fd.set_msrs(&msrs).context("KVM_SET_MSRS")?;
        if n != self.msrs.len() {
            bail!("KVM_SET_MSRS wrote {n} of {} MSRs", self.msrs.len());
        }
        fd.set_vcpu_events(&self.events)
            .context("KVM_SET_VCPU_EVENTS")?;
        Ok(())
    }

    /// The state's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        put(&mut w, tag::REGS, self.regs.as_bytes());
        put(&mut w, tag::SREGS, self.sregs.as_bytes());
        put(&mut w, tag::XSAVE, self.xsave.as_bytes());
        put(&mut w, tag::XCRS, self.xcrs.as_bytes());
        put(&mut w, tag::MSRS, self.msrs.as_slice().as_bytes());
        put(&mut w, tag::LAPIC, self.lapic.as_bytes());
        put(&mut w, tag::EVENTS, self.events.as_bytes());
        put(&mut w, tag::MP_STATE, self.mp_state.as_bytes());
        put(&mut w, tag::DEBUGREGS, self.debugregs.as_bytes());
        w
    }

    /// Decodes [`Self::encode`]'s bytes.
    ///
    /// # Errors
    /// A record is missing, truncated or of the wrong size.
    pub fn decode(b: &[u8]) -> anyhow::Result<Self> {
        let r = records(b)?;
        only(
            &r,
            &[
                tag::REGS,
                tag::SREGS,
                tag::XSAVE,
                tag::XCRS,
                tag::MSRS,
                tag::LAPIC,
                tag::EVENTS,
                tag::MP_STATE,
                tag::DEBUGREGS,
            ],
        )?;
        let msr_bytes = find(&r, tag::MSRS)?;
        if !msr_bytes.len().is_multiple_of(size_of::<kvm_msr_entry>())
            || msr_bytes.len() > MSRS.len() * size_of::<kvm_msr_entry>()
        {
            bail!("MSR record of {} bytes", msr_bytes.len());
        }
        let msrs: Vec<kvm_msr_entry> = msr_bytes
            .chunks(size_of::<kvm_msr_entry>())
            .map(|c| kvm_msr_entry::read_from_bytes(c).map_err(|_| anyhow!("bad MSR entry")))
            .collect::<Result<_, _>>()?;
        // Only the MSRs this VMM saves, each once: a peer's state sets nothing else in
        // the guest's vCPU.
        for (i, m) in msrs.iter().enumerate() {
            if !MSRS.contains(&m.index) {
                bail!("MSR {:#x} is not one this VMM saves", m.index);
            }
            if msrs[..i].iter().any(|o| o.index == m.index) {
                bail!("MSR {:#x} saved twice", m.index);
            }
        }
        Ok(Self {
            regs: get(&r, tag::REGS)?,
            sregs: get(&r, tag::SREGS)?,
            xsave: get(&r, tag::XSAVE)?,
            xcrs: get(&r, tag::XCRS)?,
            msrs,
            lapic: get(&r, tag::LAPIC)?,
            events: get(&r, tag::EVENTS)?,
            mp_state: get(&r, tag::MP_STATE)?,
            debugregs: get(&r, tag::DEBUGREGS)?,
        })
    }
}

/// VM-wide state: the in-kernel PIC and IOAPIC, and the KVM clock.
pub struct VmState {
    chips: [kvm_irqchip; 3],
    clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Saves a paused VM's irqchip and clock.
    ///
    /// # Errors
    /// A KVM get ioctl failed.
    pub fn save(vm: &VmFd) -> anyhow::Result<Self> {
        let mut chips = [kvm_irqchip::default(); 3];
        for (c, id) in chips.iter_mut().zip(CHIPS) {
            c.chip_id = id;
            vm.get_irqchip(c).context("KVM_GET_IRQCHIP")?;
        }
        Ok(Self {
            chips,
            clock: vm.get_clock().context("KVM_GET_CLOCK")?,
        })
    }

    /// Loads this state into a VM whose vCPUs have not run.
    ///
    /// # Errors
    /// A KVM set ioctl failed.
    pub fn restore(&self, vm: &VmFd) -> anyhow::Result<()> {
        for c in &self.chips {
            vm.set_irqchip(c).context("KVM_SET_IRQCHIP")?;
        }
        let mut clock = self.clock;
        // Only the clock value; the flags KVM_GET_CLOCK reports are not settable.
        clock.flags = 0;
        vm.set_clock(&clock).context("KVM_SET_CLOCK")?;
        Ok(())
    }

    /// The state's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        for (c, t) in self
            .chips
            .iter()
            .zip([tag::PIC_MASTER, tag::PIC_SLAVE, tag::IOAPIC])
        {
            put(&mut w, t, c.as_bytes());
        }
        put(&mut w, tag::CLOCK, self.clock.as_bytes());
        w
    }

    /// Decodes [`Self::encode`]'s bytes.
    ///
    /// # Errors
    /// A record is missing, truncated or of the wrong size.
    pub fn decode(b: &[u8]) -> anyhow::Result<Self> {
        let r = records(b)?;
        only(
            &r,
            &[tag::PIC_MASTER, tag::PIC_SLAVE, tag::IOAPIC, tag::CLOCK],
        )?;
        let chips: [kvm_irqchip; 3] = [
            get(&r, tag::PIC_MASTER)?,
            get(&r, tag::PIC_SLAVE)?,
            get(&r, tag::IOAPIC)?,
        ];
        // Each chip's id names the chip its record is for, or KVM would set another.
        for (c, id) in chips.iter().zip(CHIPS) {
            if c.chip_id != id {
                bail!("an irqchip record of chip {} holds chip {}", id, c.chip_id);
            }
        }
        Ok(Self {
            chips,
            clock: get(&r, tag::CLOCK)?,
        })
    }
}

fn put(w: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    w.extend_from_slice(&tag.to_le_bytes());
    w.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    w.extend_from_slice(bytes);
}

/// The most records a section may hold: a vCPU's are 9, a VM's 4.
const MAX_RECORDS: usize = 16;

/// The records of a section: each tag at most once, at most [`MAX_RECORDS`] of them
/// (the bytes come from the source).
fn records(mut b: &[u8]) -> anyhow::Result<Vec<(u32, &[u8])>> {
    let mut out: Vec<(u32, &[u8])> = Vec::new();
    // Bounded: every record consumes at least its 8-byte header, and there are at most
    // MAX_RECORDS.
    while !b.is_empty() {
        if out.len() == MAX_RECORDS {
            bail!("more than {MAX_RECORDS} state records");
        }
        if b.len() < 8 {
            bail!("truncated record header");
        }
        let tag = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let rest = &b[8..];
        if rest.len() < len {
            bail!("record {tag} needs {len} bytes, {} left", rest.len());
        }
        if out.iter().any(|(t, _)| *t == tag) {
            bail!("state record {tag} twice");
        }
        out.push((tag, &rest[..len]));
        b = &rest[len..];
    }
    Ok(out)
}

/// Refuses a record whose tag is not one of `known`: what restore would ignore.
fn only(r: &[(u32, &[u8])], known: &[u32]) -> anyhow::Result<()> {
    match r.iter().find(|(t, _)| !known.contains(t)) {
        Some((t, _)) => bail!("unknown state record {t}"),
        None => Ok(()),
    }
}

fn find<'a>(r: &[(u32, &'a [u8])], tag: u32) -> anyhow::Result<&'a [u8]> {
    r.iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, b)| *b)
        .ok_or_else(|| anyhow!("state record {tag} missing"))
}

fn get<T: FromBytes>(r: &[(u32, &[u8])], tag: u32) -> anyhow::Result<T> {
    let b = find(r, tag)?;
    T::read_from_bytes(b).map_err(|_| {
        anyhow!(
            "state record {tag}: {} bytes, expected {}",
            b.len(),
            size_of::<T>()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_truncation() {
        let mut w = Vec::new();
        put(&mut w, 1, &[1, 2, 3]);
        put(&mut w, 7, &[]);
        let r = records(&w).unwrap();
        assert_eq!(r, vec![(1, &[1u8, 2, 3][..]), (7, &[][..])]);
        assert!(records(&w[..w.len() - 9]).is_err());
        assert!(get::<u64>(&r, 1).is_err());
        assert!(find(&r, 9).is_err());
        // A tag twice, or more records than any state has, is refused.
        put(&mut w, 1, &[4]);
        assert!(records(&w).is_err());
        let mut many = Vec::new();
        for t in 0..=MAX_RECORDS as u32 {
            put(&mut many, t, &[]);
        }
        assert!(records(&many).is_err());
    }

    #[test]
    fn only_the_msrs_this_vmm_saves_are_taken_each_once() {
        let state = |indices: &[u32]| VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            msrs: indices
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            debugregs: Default::default(),
        };
        let good = VcpuState::decode(&state(&[0x174, 0x10, 0x6e0]).encode()).expect("decodes");
        assert_eq!(good.msrs.len(), 3);
        let e = VcpuState::decode(&state(&[0x174, 0xc000_0080]).encode()).err();
        assert!(format!("{e:?}").contains("0xc0000080 is not one"), "{e:?}");
        let e = VcpuState::decode(&state(&[0x10, 0x174, 0x10]).encode()).err();
        assert!(format!("{e:?}").contains("0x10 saved twice"), "{e:?}");
    }
}
