//! The kernel work-queue portal: IAA work queues the idxd driver exposes to user
//! space as `/dev/iax/wqX.Y`, discovered under `/sys/bus/dsa/devices`.
//!
//! [`discover`] reads sysfs and says, for every IAA device and work queue, why it
//! cannot be used (disabled, not a user queue, no shared virtual addressing, no
//! character device, no permission, a CPU without `ENQCMD`/`MOVDIR64B`), each with
//! what to do. [`open`] maps the first usable queue's portal (one 4 KiB page, write
//! only) and submits with `ENQCMD` (shared) or `MOVDIR64B` (dedicated).
//!
//! Built and probed on a machine without IAA; the submission path has not run.

use std::cell::Cell;
use std::fmt;
use std::fs;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::desc::Descriptor;
use super::portal::{CpuFeatures, Enqueue, Portal, WqMode};

/// Where the idxd driver lists its devices.
pub const SYSFS_DEVICES: &str = "/sys/bus/dsa/devices";
/// Where the idxd driver puts IAA user work queues.
pub const DEV_IAX: &str = "/dev/iax";

/// One IAA work queue as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WqInfo {
    /// `wqX.Y`.
    pub name: String,
    /// Its character device (`/dev/iax/wqX.Y`).
    pub dev: PathBuf,
    /// Shared or dedicated (`None`: unreadable).
    pub mode: Option<WqMode>,
    /// Entries.
    pub size: usize,
    /// Largest transfer per descriptor.
    pub max_transfer: usize,
    /// Why it cannot be used, each with what to do; empty when usable.
    pub problems: Vec<String>,
}

/// One IAA device (`iaxN`) and its work queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `iaxN`.
    pub name: String,
    /// Why none of its queues can be used at all, each with what to do.
    pub problems: Vec<String>,
    /// Its work queues.
    pub wqs: Vec<WqInfo>,
}

/// What [`discover`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// The sysfs directory read.
    pub root: PathBuf,
    /// Whether it exists (the idxd driver is loaded).
    pub present: bool,
    /// IAA devices.
    pub devices: Vec<DeviceInfo>,
    /// The CPU's portal instructions.
    pub cpu: CpuFeatures,
}

impl Discovery {
    /// The first usable work queue.
    pub fn usable(&self) -> Option<&WqInfo> {
        self.devices
            .iter()
            .filter(|d| d.problems.is_empty())
            .flat_map(|d| &d.wqs)
            .find(|w| w.problems.is_empty())
    }
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "CPU: ENQCMD {}, MOVDIR64B {}, WAITPKG {}",
            yes(self.cpu.enqcmd),
            yes(self.cpu.movdir64b),
            yes(self.cpu.waitpkg)
        )?;
        if !self.present {
            return writeln!(
                f,
                "no IAA device found: {} does not exist (the idxd driver is not loaded, or \
                 this host has no IAA/DSA device); the software codecs will be used",
                self.root.display()
            );
        }
        if self.devices.is_empty() {
            return writeln!(
                f,
                "no IAA device found under {} (only DSA devices, or none)",
                self.root.display()
            );
        }
        for d in &self.devices {
            writeln!(f, "{}:", d.name)?;
            for p in &d.problems {
                writeln!(f, "  unusable: {p}")?;
            }
            if d.wqs.is_empty() {
                writeln!(
                    f,
                    "  no work queue configured: configure one with accel-config \
                     (config-wq --type=user --mode=shared ... then enable-wq)"
                )?;
            }
            for w in &d.wqs {
                let mode = match w.mode {
                    Some(WqMode::Shared) => "shared",
                    Some(WqMode::Dedicated) => "dedicated",
                    None => "unknown mode",
                };
                writeln!(
                    f,
                    "  {} ({mode}, {} entries, max transfer {}): {}",
                    w.dev.display(),
                    w.size,
                    w.max_transfer,
                    if w.problems.is_empty() && d.problems.is_empty() {
                        "usable"
                    } else {
                        "unusable"
                    }
                )?;
                for p in &w.problems {
                    writeln!(f, "    - {p}")?;
                }
            }
        }
        Ok(())
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn read(dir: &Path, attr: &str) -> Option<String> {
    fs::read_to_string(dir.join(attr))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Reads the idxd sysfs tree at `root` (normally [`SYSFS_DEVICES`]) and the device
/// nodes under `dev` (normally [`DEV_IAX`]).
pub fn discover(root: &Path, dev: &Path) -> Discovery {
    let cpu = CpuFeatures::detect();
    let Ok(entries) = fs::read_dir(root) else {
        return Discovery {
            root: root.into(),
            present: false,
            devices: Vec::new(),
            cpu,
        };
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut devices = Vec::new();
    for name in names.iter().filter(|n| n.starts_with("iax")) {
        let id = &name[3..];
        let dir = root.join(name);
        let mut problems = Vec::new();
        match read(&dir, "state").as_deref() {
            Some("enabled") => {}
            other => problems.push(format!(
                "device state is {} (enable it: accel-config enable-device {name})",
                other.unwrap_or("unreadable")
            )),
        }
        let sva = read(&dir, "pasid_enabled").as_deref() == Some("1");
        if !sva {
            problems.push(format!(
                "no shared virtual addressing on {name} (pasid_enabled is not 1): user work \
                 queues need it; boot with intel_iommu=on,sm_on, or use the VFIO portal \
                 (--accel vfio:PCI_ADDRESS)"
            ));
        }
        let prefix = format!("wq{id}.");
        let mut wqs = Vec::new();
        for wq in names.iter().filter(|n| n.starts_with(&prefix)) {
            wqs.push(wq_info(&root.join(wq), wq, dev, cpu));
        }
        devices.push(DeviceInfo {
            name: name.clone(),
            problems,
            wqs,
        });
    }
    Discovery {
        root: root.into(),
        present: true,
        devices,
        cpu,
    }
}

fn wq_info(dir: &Path, name: &str, dev: &Path, cpu: CpuFeatures) -> WqInfo {
    let mut problems = Vec::new();
    let mode = match read(dir, "mode").as_deref() {
        Some("shared") => Some(WqMode::Shared),
        Some("dedicated") => Some(WqMode::Dedicated),
        _ => None,
    };
    let num = |a: &str| {
        read(dir, a)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let size = num("size");
    let max_transfer = num("max_transfer_size");
    match read(dir, "state").as_deref() {
        Some("enabled") => {}
        other => problems.push(format!(
            "queue state is {} (enable it: accel-config enable-wq {name})",
            other.unwrap_or("unreadable")
        )),
    }
    match read(dir, "type").as_deref() {
        Some("user") => {}
        other => problems.push(format!(
            "queue type is {}, not user (reconfigure: accel-config config-wq --type=user)",
            other.unwrap_or("unreadable")
        )),
    }
    if size == 0 {
        problems
            .push("queue size is 0 (give it entries: accel-config config-wq --wq-size=N)".into());
    }
    match mode {
        Some(WqMode::Shared) if !cpu.enqcmd => {
            problems.push("shared queue but this CPU has no ENQCMD: use a dedicated queue".into())
        }
        Some(WqMode::Dedicated) if !cpu.movdir64b => {
            problems.push("dedicated queue but this CPU has no MOVDIR64B".into());
        }
        None => problems.push("queue mode unreadable".into()),
        _ => {}
    }
    let dev_path = dev.join(name);
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev_path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!(
            "{} does not exist: bind the queue to the idxd user driver (driver_name user)",
            dev_path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => problems.push(format!(
            "no permission to open {} ({e}): give this user access (udev rule or chmod)",
            dev_path.display()
        )),
        Err(e) => problems.push(format!("cannot open {}: {e}", dev_path.display())),
    }
    WqInfo {
        name: name.into(),
        dev: dev_path,
        mode,
        size,
        max_transfer,
        problems,
    }
}

/// Why a work queue could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WqError {
    /// No usable queue; the report says why each is unusable.
    #[error("no usable IAA work queue:\n{0}")]
    NoneUsable(Box<Discovery>),
    /// The named queue is not one sysfs lists as usable.
    #[error("{path} is not a usable IAA work queue:\n{report}")]
    Unusable {
        /// The queue asked for.
        path: PathBuf,
        /// The discovery report.
        report: Box<Discovery>,
    },
    /// Opening or mapping the portal failed.
    #[error("cannot map the portal of {path}: {source}")]
    Map {
        /// The queue.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the work queue at `path`, or the first usable one.
///
/// # Errors
/// [`WqError`] saying why no queue (or the named one) can be used.
pub fn open(path: Option<&Path>) -> Result<Box<dyn Portal>, WqError> {
    let report = discover(Path::new(SYSFS_DEVICES), Path::new(DEV_IAX));
    let wq = match path {
        None => report.usable().cloned(),
        Some(p) => report
            .devices
            .iter()
            .filter(|d| d.problems.is_empty())
            .flat_map(|d| &d.wqs)
            .find(|w| w.dev == p && w.problems.is_empty())
            .cloned(),
    };
    let Some(wq) = wq else {
        return Err(match path {
            None => WqError::NoneUsable(Box::new(report)),
            Some(p) => WqError::Unusable {
                path: p.into(),
                report: Box::new(report),
            },
        });
    };
    Ok(Box::new(WqPortal::map(&wq, Path::new(SYSFS_DEVICES))?))
}

/// A mapped idxd work queue portal.
pub struct WqPortal {
    info: WqInfo,
    state_file: PathBuf,
    portal: NonNull<u8>,
    _file: fs::File,
    checked: Cell<Instant>,
    enabled: Cell<bool>,
}

// SAFETY: the portal mapping is owned by this value and only written through
// `&mut self` (submit); the cells are touched only through this value.
unsafe impl Send for WqPortal {}

const PORTAL_SIZE: usize = 4096;

impl WqPortal {
    fn map(info: &WqInfo, sysfs: &Path) -> Result<WqPortal, WqError> {
        let err = |source| WqError::Map {
            path: info.dev.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&info.dev)
            .map_err(err)?;
        // SAFETY: a fresh shared mapping of the queue's portal page; nothing else
        // refers to the address range it returns.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(PORTAL_SIZE).unwrap_or(NonZeroUsize::MIN),
                nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED | nix::sys::mman::MapFlags::MAP_POPULATE,
                &file,
                0,
            )
        }
        .map_err(|e| err(std::io::Error::from(e)))?;
        Ok(WqPortal {
            info: info.clone(),
            state_file: sysfs.join(&info.name).join("state"),
            portal: ptr.cast(),
            _file: file,
            checked: Cell::new(Instant::now()),
            enabled: Cell::new(true),
        })
    }
}

impl Portal for WqPortal {
    fn describe(&self) -> String {
        format!(
            "{} ({:?}, {} entries)",
            self.info.dev.display(),
            self.info.mode,
            self.info.size
        )
    }

    fn mode(&self) -> WqMode {
        self.info.mode.unwrap_or(WqMode::Shared)
    }

    fn size(&self) -> usize {
        self.info.size
    }

    fn max_transfer(&self) -> usize {
        self.info.max_transfer
    }

    fn enabled(&self) -> bool {
        // sysfs is read at most every 50 ms.
        if self.checked.get().elapsed() > Duration::from_millis(50) {
            self.checked.set(Instant::now());
            self.enabled
                .set(fs::read_to_string(&self.state_file).is_ok_and(|s| s.trim() == "enabled"));
        }
        self.enabled.get()
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn submit(&mut self, desc: &Descriptor) -> Enqueue {
        match self.mode() {
            // SAFETY: a mapped shared-queue portal on a CPU with ENQCMD (discovery
            // refused the queue otherwise); the descriptor obeys the caller's contract.
            WqMode::Shared => match unsafe { super::portal::enqcmd(self.portal.as_ptr(), desc) } {
                true => Enqueue::Accepted,
                false => Enqueue::Retry,
            },
            WqMode::Dedicated => {
                // SAFETY: as above with MOVDIR64B; the backend keeps no more
                // descriptors in flight than the queue's size.
                unsafe { super::portal::movdir64b(self.portal.as_ptr(), desc) };
                Enqueue::Accepted
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn submit(&mut self, _desc: &Descriptor) -> Enqueue {
        Enqueue::Retry
    }
}

impl Drop for WqPortal {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `map` with this length and is unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.portal.cast(), PORTAL_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, attrs: &[(&str, &str)]) {
        fs::create_dir_all(dir).expect("dir");
        for (k, v) in attrs {
            fs::write(dir.join(k), format!("{v}\n")).expect("attr");
        }
    }

    #[test]
    fn this_machine_says_clearly_that_no_iaa_device_was_found() {
        let d = discover(Path::new(SYSFS_DEVICES), Path::new(DEV_IAX));
        if d.present {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("skipped: this host has {SYSFS_DEVICES}\n").as_bytes(),
            );
            return;
        }
        assert!(d.usable().is_none());
        assert!(d.to_string().contains("no IAA device found"), "{d}");
        assert!(matches!(open(None), Err(WqError::NoneUsable(_))));
    }

    #[test]
    fn discovery_reads_sysfs_and_says_why_each_queue_is_unusable() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sys = tmp.path().join("devices");
        let dev = tmp.path().join("iax");
        fs::create_dir_all(&dev).expect("dev");
        write(&sys.join("dsa0"), &[("state", "enabled")]);
        write(
            &sys.join("wq0.0"),
            &[("mode", "shared"), ("state", "enabled")],
        );
        write(
            &sys.join("iax1"),
            &[("state", "enabled"), ("pasid_enabled", "1")],
        );
        write(
            &sys.join("wq1.0"),
            &[
                ("mode", "dedicated"),
                ("size", "32"),
                ("state", "disabled"),
                ("type", "user"),
                ("max_transfer_size", "2097152"),
            ],
        );
        write(
            &sys.join("wq1.1"),
            &[
                ("mode", "shared"),
                ("size", "64"),
                ("state", "enabled"),
                ("type", "kernel"),
            ],
        );
        write(
            &sys.join("iax3"),
            &[("state", "enabled"), ("pasid_enabled", "0")],
        );
        let d = discover(&sys, &dev);
        assert!(d.present);
        let names: Vec<&str> = d.devices.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["iax1", "iax3"], "DSA devices are not listed");
        let iax1 = &d.devices[0];
        assert!(iax1.problems.is_empty());
        assert_eq!(iax1.wqs.len(), 2);
        let w0 = &iax1.wqs[0];
        assert_eq!(
            (w0.mode, w0.size, w0.max_transfer),
            (Some(WqMode::Dedicated), 32, 2 << 20)
        );
        assert!(w0.problems.iter().any(|p| p.contains("enable-wq wq1.0")));
        assert!(w0.problems.iter().any(|p| p.contains("does not exist")));
        assert!(iax1.wqs[1].problems.iter().any(|p| p.contains("not user")));
        assert!(
            d.devices[1]
                .problems
                .iter()
                .any(|p| p.contains("shared virtual addressing"))
        );
        assert!(d.usable().is_none());
        let text = d.to_string();
        assert!(
            text.contains("iax3:\n  unusable: no shared virtual addressing"),
            "{text}"
        );
        assert!(text.contains("no work queue configured"), "{text}");
    }
}
