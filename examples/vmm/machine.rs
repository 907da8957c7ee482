//! A machine: guest RAM, the VM and its vCPUs, dirty tracking and the guest monitor,
//! put together; its state as device sections; the two ways it starts (boot, or
//! restore from sections).

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, anyhow, bail};
use kvm_ioctls::VcpuFd;

use crate::dirty::DirtyTracker;
use crate::memory::{self, Backing, Ram};
use crate::state::{VcpuState, VmState};
use crate::vcpu::{GuestCtx, Monitor, Vcpus};
use crate::vm::{DirtyMode, Slot, Vm, boot_vcpu};

/// The machine's shape; the destination must be built with the source's.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Memslots.
    pub slots: u32,
    /// vCPUs (1 or 2).
    pub vcpus: u32,
    /// RAM backing.
    pub backing: Backing,
    /// Dirty tracking.
    pub dirty: DirtyMode,
    /// Guest page writes, bytes per second over all vCPUs.
    pub dirty_bytes_per_s: u64,
}

/// One piece of device state, named like a pagewire device section.
#[derive(Clone, Debug)]
pub struct Section {
    /// Device name ("vcpu", "vm", "vmm").
    pub name: String,
    /// Instance (the vCPU index for "vcpu").
    pub instance: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// A built machine whose vCPUs have not started.
pub struct Machine {
    /// Its shape.
    pub shape: Shape,
    /// Guest RAM (kept alive as long as the VM and any migration).
    pub ram: Arc<Ram>,
    /// The VM.
    pub vm: Arc<Vm>,
    /// Dirty pages (KVM's and the VMM's).
    pub dirty: Arc<DirtyTracker>,
    /// Heartbeats and self-check reports.
    pub monitor: Arc<Monitor>,
    msrs: Vec<u32>,
    /// The vCPUs until they start; shared with the device-state check
    /// ([`Machine::restorer`]), which restores into them before ACK COMPLETE.
    fds: Arc<Mutex<Vec<VcpuFd>>>,
}

/// Loads sections into a machine's VM and vCPUs before they run: the destination's
/// device-state check does (before ACK COMPLETE, so whatever KVM refuses is refused
/// while the source still owns the guest), and so does [`Machine::restore`].
#[derive(Clone)]
pub struct Restorer {
    vm: Arc<Vm>,
    fds: Arc<Mutex<Vec<VcpuFd>>>,
}

/// The largest `vm` or `vcpu` section (each is a few KiB), and the largest `vmm`
/// section (a JSON object of a few numbers): the bytes come from the source.
const MAX_STATE: usize = 64 << 10;
const MAX_VMM: usize = 16 << 10;

impl Machine {
    /// Allocates RAM, creates the VM with its memslots and the vCPUs (CPUID set).
    ///
    /// # Errors
    /// A bad shape, or KVM or the kernel refusing something.
    pub fn build(shape: Shape) -> anyhow::Result<Self> {
        if !(1..=2).contains(&shape.vcpus) {
            bail!("--vcpus must be 1 or 2");
        }
        let ram = Arc::new(memory::create(shape.mem_bytes, shape.slots, shape.backing)?);
        let slots = memory::regions(&ram)
            .into_iter()
            .map(|(host, guest, len)| Slot { host, guest, len })
            .collect();
        // SAFETY: `ram` is kept in the machine next to the VM (and outlives it: the
        // VM's Arc is dropped with the machine, and the RAM's Arc with it or later).
        let vm = Arc::new(unsafe { Vm::new(slots, shape.dirty)? });
        if !vm.xsave_fits() {
            bail!("this host's XSAVE state does not fit kvm_xsave (KVM_CAP_XSAVE2 > 4096)");
        }
        let msrs = crate::state::msr_indices(&vm.kvm)?;
        let mut dirty = DirtyTracker::new(vm.clone());
        let mut fds = Vec::new();
        for id in 0..shape.vcpus {
            let fd = vm.create_vcpu(u64::from(id))?;
            dirty.attach(&fd).context("mapping the dirty ring")?;
            fds.push(fd);
        }
        Ok(Self {
            shape,
            ram,
            vm,
            dirty: Arc::new(dirty),
            monitor: Arc::new(Monitor::default()),
            msrs,
            fds: Arc::new(Mutex::new(fds)),
        })
    }

    /// Loads the guest program and puts every vCPU at its entry.
    ///
    /// # Errors
    /// Loading or a KVM register set failed.
    pub fn boot(&self) -> anyhow::Result<()> {
        memory::load_guest(&self.ram, self.shape.mem_bytes)?;
        let fds = self.fds.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, fd) in fds.iter().enumerate() {
            boot_vcpu(
                fd,
                self.shape.mem_bytes,
                u64::from(self.shape.vcpus),
                id as u64,
            )?;
        }
        Ok(())
    }

    /// Checks, without KVM, what [`Machine::restore`] and the resume need of the
    /// sections a source sent (`(name, instance, data)`): one `vm` section that decodes,
    /// exactly `vcpus` `vcpu` sections numbered from 0 that decode, a `vmm` section of
    /// JSON, nothing else, and none larger than this VMM ever writes. The destination
    /// runs it before it acknowledges COMPLETE (`DestinationConfig::check_device_state`),
    /// then [`Restorer::restore`], so a source configured for another machine keeps its
    /// guest instead of losing it after COMMIT.
    ///
    /// # Errors
    /// What is missing, unknown, too large or does not decode.
    pub fn check_sections<'a>(
        vcpus: u32,
        sections: impl Iterator<Item = (&'a str, u32, &'a [u8])> + Clone,
    ) -> anyhow::Result<()> {
        let sent = sections.clone().filter(|&(n, _, _)| n == "vcpu").count();
        if sent != vcpus as usize {
            bail!("device state has {sent} vCPUs, this machine {vcpus}");
        }
        for (name, instance, data) in sections.clone() {
            let (known, max) = match name {
                "vm" | "vmm" => (
                    instance == 0,
                    if name == "vm" { MAX_STATE } else { MAX_VMM },
                ),
                "vcpu" => (instance < vcpus, MAX_STATE),
                _ => (false, 0),
            };
            if !known {
                bail!("device state has {name}/{instance}, which this machine does not know");
            }
            if data.len() > max {
                bail!(
                    "device state {name}/{instance} of {} bytes (at most {max})",
                    data.len()
                );
            }
        }
        let find = |name: &str, instance: u32| section(sections.clone(), name, instance);
        VmState::decode(find("vm", 0)?).context("vm state")?;
        for id in 0..vcpus {
            VcpuState::decode(find("vcpu", id)?).with_context(|| format!("vcpu {id} state"))?;
        }
        serde_json::from_slice::<serde_json::Value>(find("vmm", 0)?).context("the vmm section")?;
        Ok(())
    }

    /// Loads VM and vCPU state from `sections` (from [`Machine::save`]).
    ///
    /// # Errors
    /// A section is missing or malformed, or KVM refused it.
    pub fn restore(&self, sections: &[Section]) -> anyhow::Result<()> {
        self.restorer().restore(
            sections
                .iter()
                .map(|s| (s.name.as_str(), s.instance, s.data.as_slice())),
        )
    }

    /// What restores sections into this machine, for the device-state check.
    pub fn restorer(&self) -> Restorer {
        Restorer {
            vm: self.vm.clone(),
            fds: self.fds.clone(),
        }
    }

    /// Starts the vCPU threads.
    ///
    /// # Errors
    /// A thread could not be spawned.
    pub fn start(&mut self) -> anyhow::Result<Vcpus> {
        let ctx = Arc::new(GuestCtx {
            ram: self.ram.clone(),
            dirty: self.dirty.clone(),
            monitor: self.monitor.clone(),
            pages_per_s: self.shape.dirty_bytes_per_s as f64
                / crate::guest::PAGE as f64
                / f64::from(self.shape.vcpus),
        });
        let fds = std::mem::take(&mut *self.fds.lock().unwrap_or_else(PoisonError::into_inner));
        Vcpus::start(fds, ctx)
    }

    /// The VM's and every vCPU's state, as sections; `vcpus` must be paused.
    ///
    /// # Errors
    /// A KVM get ioctl failed.
    pub fn save(&self, vcpus: &Vcpus) -> anyhow::Result<Vec<Section>> {
        let mut out = vec![Section {
            name: "vm".into(),
            instance: 0,
            data: VmState::save(&self.vm.fd)?.encode(),
        }];
        vcpus.with_fds(|fds| {
            for (id, fd) in fds.iter().enumerate() {
                out.push(Section {
                    name: "vcpu".into(),
                    instance: id as u32,
                    data: VcpuState::save(fd, &self.msrs)?.encode(),
                });
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Dirty logging on or off in every memslot.
    ///
    /// # Errors
    /// KVM refused the memslot update.
    pub fn set_dirty_logging(&self, on: bool) -> anyhow::Result<()> {
        // SAFETY: the slots' memory is `self.ram`, alive as long as `self`.
        unsafe { self.vm.set_logging(on) }
    }
}

impl Restorer {
    /// Loads the `vm` and `vcpu` sections into the VM and its vCPUs, which have not
    /// run: every KVM set ioctl the resume needs, so whatever this host's KVM refuses
    /// (an MSR it lacks, a register value it rejects) fails here.
    ///
    /// # Errors
    /// A section is missing or malformed, the vCPUs already started, or KVM refused it.
    pub fn restore<'a>(
        &self,
        sections: impl Iterator<Item = (&'a str, u32, &'a [u8])> + Clone,
    ) -> anyhow::Result<()> {
        let find = |name: &str, instance: u32| section(sections.clone(), name, instance);
        let fds = self.fds.lock().unwrap_or_else(PoisonError::into_inner);
        let vcpus = sections.clone().filter(|&(n, _, _)| n == "vcpu").count();
        if vcpus != fds.len() {
            bail!("device state has {vcpus} vCPUs, this machine {}", fds.len());
        }
        VmState::decode(find("vm", 0)?)?.restore(&self.vm.fd)?;
        for (id, fd) in fds.iter().enumerate() {
            VcpuState::decode(find("vcpu", id as u32)?)
                .with_context(|| format!("vcpu {id} state"))?
                .restore(fd)
                .with_context(|| format!("restoring vcpu {id}"))?;
        }
        Ok(())
    }
}

/// The bytes of section `name`/`instance` among `sections`.
fn section<'a>(
    mut sections: impl Iterator<Item = (&'a str, u32, &'a [u8])>,
    name: &str,
    instance: u32,
) -> anyhow::Result<&'a [u8]> {
    sections
        .find(|&(n, i, _)| n == name && i == instance)
        .map(|(_, _, d)| d)
        .ok_or_else(|| anyhow!("device state has no {name}/{instance}"))
}
