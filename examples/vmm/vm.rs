//! The KVM virtual machine: VM fd, in-kernel irqchip, memslots (with dirty logging
//! switched on and off), vCPU creation and their boot state (64-bit long mode).

use anyhow::{Context, bail};
use kvm_bindings::{
    CpuId, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    kvm_enable_cap, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::guest;

/// How KVM reports dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect).
    Bitmap,
    /// A dirty ring per vCPU (`KVM_CAP_DIRTY_LOG_RING`).
    Ring,
}

/// Dirty ring entries per vCPU.
pub const RING_ENTRIES: u32 = 16384;

/// One memslot.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Host address of its first byte.
    pub host: u64,
    /// Guest physical address.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Slot {
    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.len / guest::PAGE
    }
}

/// A VM with its memslots.
pub struct Vm {
    /// The `/dev/kvm` handle.
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
    /// Memslots, slot `i` at index `i`, in guest address order.
    pub slots: Vec<Slot>,
    /// How dirty pages are reported.
    pub dirty: DirtyMode,
    /// Bytes of one vCPU's dirty ring (ring mode).
    pub ring_bytes: u32,
    cpuid: CpuId,
}

impl Vm {
    /// Creates the VM, its irqchip and memslots (logging off) over `slots`. The dirty
    /// ring must be enabled before any vCPU exists, so it is chosen here.
    ///
    /// # Safety
    /// Every slot's host range must stay mapped, readable and writable, for the VM's
    /// lifetime: the guest reads and writes it.
    pub unsafe fn new(slots: Vec<Slot>, dirty: DirtyMode) -> anyhow::Result<Self> {
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        fd.set_tss_address(0xfffb_d000)
            .context("KVM_SET_TSS_ADDR")?;
        fd.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        let ring_bytes = match dirty {
            DirtyMode::Bitmap => {
                enable_cap(&fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
                    .context("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (use --dirty ring)")?;
                0
            }
            DirtyMode::Ring => enable_ring(&fd)?,
        };
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let vm = Self {
            kvm,
            fd,
            slots,
            dirty,
            ring_bytes,
            cpuid,
        };
        // SAFETY: the caller keeps the slots' memory mapped for the VM's lifetime.
        unsafe { vm.set_logging(false)? };
        Ok(vm)
    }

    /// (Re)registers every memslot with dirty logging on or off; KVM allows changing
    /// only the flags of a live slot, so this can run while vCPUs do.
    ///
    /// # Safety
    /// As [`Vm::new`]: the slots' memory stays mapped.
    pub unsafe fn set_logging(&self, on: bool) -> anyhow::Result<()> {
        for (i, s) in self.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: i as u32,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.guest,
                memory_size: s.len,
                userspace_addr: s.host,
            };
            // SAFETY: the host range is mapped for the VM's lifetime (the caller's
            // contract) and does not overlap another slot's.
            unsafe { self.fd.set_user_memory_region(region) }
                .with_context(|| format!("KVM_SET_USER_MEMORY_REGION slot {i}"))?;
        }
        Ok(())
    }

    /// Creates vCPU `id` with the host's supported CPUID.
    ///
    /// # Errors
    /// KVM refuses the vCPU or its CPUID.
    pub fn create_vcpu(&self, id: u64) -> anyhow::Result<VcpuFd> {
        let vcpu = self
            .fd
            .create_vcpu(id)
            .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
        vcpu.set_cpuid2(&self.cpuid).context("KVM_SET_CPUID2")?;
        Ok(vcpu)
    }

    /// Whether KVM reports the 4 KiB `kvm_xsave` as large enough for the guest's
    /// XSAVE state (`KVM_CAP_XSAVE2` at most 4096); otherwise FPU state is used.
    pub fn xsave_fits(&self) -> bool {
        if !self.fd.check_extension(Cap::Xsave) {
            return false;
        }
        let size = self.fd.check_extension_int(Cap::Xsave2);
        size <= 4096
    }
}

fn enable_cap(fd: &VmFd, cap: u32, arg0: u64) -> std::io::Result<()> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    fd.enable_cap(&c).map_err(std::io::Error::from)
}

fn enable_ring(fd: &VmFd) -> anyhow::Result<u32> {
    let bytes = RING_ENTRIES * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u32;
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let max = fd.check_extension_raw(u64::from(cap)) as i64;
        if max >= i64::from(bytes) {
            enable_cap(fd, cap, u64::from(bytes)).context("enabling the dirty ring")?;
            return Ok(bytes);
        }
    }
    bail!("KVM has no dirty ring of {bytes} bytes (KVM_CAP_DIRTY_LOG_RING); use --dirty bitmap")
}

/// Puts vCPU `id` of `vcpus` into 64-bit long mode at the guest program's entry.
///
/// # Errors
/// KVM refuses a register set.
pub fn boot_vcpu(vcpu: &VcpuFd, mem_bytes: u64, vcpus: u64, id: u64) -> anyhow::Result<()> {
    let mut s = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 3,
        db: 1,
        l: 0,
        ..code
    };
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.gdt.base = guest::GDT;
    s.gdt.limit = (8 * guest::gdt().len() - 1) as u16;
    s.cr3 = guest::PML4;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE
    s.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&s).context("KVM_SET_SREGS")?;
    vcpu.set_regs(&guest::initial_regs(mem_bytes, vcpus, id))
        .context("KVM_SET_REGS")?;
    // With an in-kernel irqchip, application processors wait for INIT/SIPI; this guest
    // has no firmware to send them, so every vCPU starts runnable.
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .context("KVM_SET_MP_STATE")?;
    Ok(())
}
