//! The VFIO portal (feature `vfio`): an IAA bound to `vfio-pci`, driven from user
//! space with `vfio-ioctls`, for hosts without shared virtual addressing.
//!
//! [`open`] opens the container, the device's IOMMU group and the device; programs
//! BAR0 ([`super::regs::configure`]: group 0 with every engine, work queue 0
//! dedicated) and maps work queue 0's portal page from BAR2. Descriptors go in with
//! `MOVDIR64B`. Addresses are IOVAs equal to the process's virtual addresses: the
//! backend maps its completion records and output pages once, and the pipeline maps
//! guest memory once per migration ([`Portal::map_dma`]).
//!
//! Only built (and clippy-checked) here: this machine has no IAA and no VFIO.

use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice};

use super::desc::Descriptor;
use super::portal::{CpuFeatures, Enqueue, Portal, WqMode};
use super::regs::{self, Registers, WqSetup};

/// Why the VFIO portal could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfioPortalError {
    /// The PCI device does not exist.
    #[error("no PCI device {0} (see lspci -D for IAA devices, 8086:0cfe)")]
    NoDevice(String),
    /// The device is not bound to vfio-pci.
    #[error(
        "{addr} is bound to {driver}, not vfio-pci: unbind it and bind vfio-pci \
         (driverctl set-override {addr} vfio-pci)"
    )]
    NotVfio {
        /// The device.
        addr: String,
        /// Its driver.
        driver: String,
    },
    /// The CPU cannot submit to a dedicated queue.
    #[error("this CPU has no MOVDIR64B, needed to submit to the dedicated work queue")]
    NoMovdir64b,
    /// A VFIO call failed.
    #[error("VFIO: {0}")]
    Vfio(#[from] vfio_ioctls::VfioError),
    /// Programming the device failed.
    #[error("programming the IAA: {0}")]
    Regs(#[from] regs::RegError),
    /// Mapping BAR2 failed.
    #[error("mapping the work-queue portal (BAR2): {0}")]
    Map(#[source] std::io::Error),
}

/// BAR0 through the device's region reads and writes.
struct Bar0<'a>(&'a VfioDevice);

impl Registers for Bar0<'_> {
    fn read32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.0.region_read(0, &mut b, off);
        u32::from_le_bytes(b)
    }

    fn write32(&self, off: u64, v: u32) {
        self.0.region_write(0, &v.to_le_bytes(), off);
    }
}

/// An IAA work queue reached through VFIO (see the module documentation).
pub struct VfioPortal {
    addr: String,
    setup: WqSetup,
    portal: NonNull<u8>,
    portal_len: usize,
    mapped: Vec<(u64, usize)>,
    // Drop order: the device before the container it belongs to.
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

// SAFETY: the portal mapping is owned by this value and written only through
// `&mut self`; the VFIO objects are plain file descriptors.
unsafe impl Send for VfioPortal {}

/// Opens the IAA at PCI address `addr` (see the module documentation).
///
/// # Errors
/// [`VfioPortalError`] saying what is missing and what to do.
pub fn open(addr: &str) -> Result<Box<dyn Portal>, VfioPortalError> {
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(addr);
    if !sysfs.exists() {
        return Err(VfioPortalError::NoDevice(addr.into()));
    }
    let driver = std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "no driver".into());
    if driver != "vfio-pci" {
        return Err(VfioPortalError::NotVfio {
            addr: addr.into(),
            driver,
        });
    }
    if !CpuFeatures::detect().movdir64b {
        return Err(VfioPortalError::NoMovdir64b);
    }
    Ok(Box::new(VfioPortal::new(addr, &sysfs)?))
}

impl VfioPortal {
    fn new(addr: &str, sysfs: &Path) -> Result<VfioPortal, VfioPortalError> {
        let container = Arc::new(VfioContainer::new(None)?);
        let device = VfioDevice::new(sysfs, container.clone(), false)?;
        let setup = regs::configure(&Bar0(&device))?;
        // Work queue 0's portals are the first 4 pages of BAR2; the first is the
        // unlimited MSI-X portal used for submission.
        let len = 4096usize;
        let off = device.get_region_offset(2);
        // SAFETY: the device fd stays open as long as `device`, which outlives the
        // mapping (unmapped in Drop before the fields drop).
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        // SAFETY: a fresh shared mapping of the device's BAR2 page; nothing else
        // refers to the returned range.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(len).unwrap_or(NonZeroUsize::MIN),
                nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                off as i64,
            )
        }
        .map_err(|e| VfioPortalError::Map(e.into()))?;
        Ok(VfioPortal {
            addr: addr.into(),
            setup,
            portal: ptr.cast(),
            portal_len: len,
            mapped: Vec::new(),
            device,
            container,
        })
    }
}

impl Portal for VfioPortal {
    fn describe(&self) -> String {
        format!(
            "VFIO {} (dedicated wq0, {} entries, {} engines)",
            self.addr, self.setup.size, self.setup.engines
        )
    }

    fn mode(&self) -> WqMode {
        WqMode::Dedicated
    }

    fn size(&self) -> usize {
        self.setup.size
    }

    fn max_transfer(&self) -> usize {
        self.setup.max_transfer
    }

    fn enabled(&self) -> bool {
        Bar0(&self.device).read32(regs::offset::GENSTS) & 3 == 1
    }

    fn needs_dma_map(&self) -> bool {
        true
    }

    unsafe fn map_dma(&mut self, addr: u64, len: usize) -> std::io::Result<()> {
        // SAFETY: forwarded from this function's contract; IOVA = virtual address.
        unsafe { self.container.vfio_dma_map(addr, len, addr as *mut u8) }
            .map_err(std::io::Error::other)?;
        self.mapped.push((addr, len));
        Ok(())
    }

    unsafe fn submit(&mut self, desc: &Descriptor) -> Enqueue {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a mapped dedicated-queue portal on a CPU with MOVDIR64B (checked
            // in `open`); the backend keeps at most `size` descriptors in flight and
            // the descriptor obeys the caller's contract.
            unsafe { super::portal::movdir64b(self.portal.as_ptr(), desc) };
            Enqueue::Accepted
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = desc;
            Enqueue::Retry
        }
    }
}

impl Drop for VfioPortal {
    fn drop(&mut self) {
        let regs = Bar0(&self.device);
        regs.write32(regs::offset::CMD, regs::cmd::DISABLE_DEVICE << 20);
        for (iova, len) in self.mapped.drain(..) {
            let _ = self.container.vfio_dma_unmap(iova, len);
        }
        // SAFETY: mapped in `new` with this length, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.portal.cast(), self.portal_len) };
    }
}
