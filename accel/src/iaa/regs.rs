//! The IAA's BAR0 registers (the idxd register layout IAA shares with DSA, as Linux's
//! `drivers/dma/idxd/registers.h` names them), and the programming sequence a
//! user-space driver runs through VFIO: one group with every engine and one
//! dedicated work queue, then enable the device and the queue.
//!
//! [`Registers`] is the register interface; the VFIO portal implements it on the real
//! BAR0, and [`RegisterFile`] (part of the device model) implements it in memory with
//! the device's rules, so [`configure`] runs in tests.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Register offsets in BAR0.
pub mod offset {
    /// General capabilities.
    pub const GENCAP: u64 = 0x10;
    /// Work queue capabilities.
    pub const WQCAP: u64 = 0x20;
    /// Group capabilities.
    pub const GRPCAP: u64 = 0x30;
    /// Engine capabilities.
    pub const ENGCAP: u64 = 0x38;
    /// Table offsets (GRPCFG, WQCFG, ... in units of 0x100).
    pub const TABLE_OFFSET: u64 = 0x60;
    /// General status (device state in bits 0–1).
    pub const GENSTS: u64 = 0x90;
    /// Command.
    pub const CMD: u64 = 0xa0;
    /// Command status.
    pub const CMDSTS: u64 = 0xa8;
}

/// Commands (CMD bits 20–24; operand in bits 0–19).
pub mod cmd {
    /// Enable the device.
    pub const ENABLE_DEVICE: u32 = 1;
    /// Disable the device.
    pub const DISABLE_DEVICE: u32 = 2;
    /// Enable a work queue (operand: its index).
    pub const ENABLE_WQ: u32 = 6;
    /// Disable a work queue.
    pub const DISABLE_WQ: u32 = 7;
}

/// CMDSTS: a command is running.
pub const CMDSTS_ACTIVE: u32 = 1 << 31;
/// GRPCFG bytes per group.
pub const GRPCFG_SIZE: u64 = 64;

/// 32/64-bit access to BAR0.
pub trait Registers {
    /// Reads a 32-bit register.
    fn read32(&self, off: u64) -> u32;
    /// Writes a 32-bit register.
    fn write32(&self, off: u64, v: u32);
    /// Reads a 64-bit register.
    fn read64(&self, off: u64) -> u64 {
        u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32
    }
    /// Writes a 64-bit register.
    fn write64(&self, off: u64, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

/// Why the device could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegError {
    /// The device is already enabled (a kernel driver or another process owns it).
    #[error("the IAA device is already enabled; unbind it from idxd and bind it to vfio-pci")]
    AlreadyEnabled,
    /// The device offers no dedicated work queue or no engine.
    #[error("the device reports {0}")]
    Capability(&'static str),
    /// A command failed with this CMDSTS error code.
    #[error("command {cmd} failed with error {err:#x}")]
    Command {
        /// The command.
        cmd: u32,
        /// CMDSTS bits 0–7.
        err: u8,
    },
    /// A command did not finish in time.
    #[error("command {0} did not complete within 1 s")]
    Timeout(u32),
}

/// What [`configure`] set up: work queue 0, dedicated, in group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WqSetup {
    /// Entries of the queue.
    pub size: usize,
    /// Largest transfer per descriptor.
    pub max_transfer: usize,
    /// Engines in the group.
    pub engines: u32,
}

fn run(regs: &dyn Registers, command: u32, operand: u32) -> Result<(), RegError> {
    regs.write32(offset::CMD, (command & 0x1f) << 20 | (operand & 0xf_ffff));
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        let sts = regs.read32(offset::CMDSTS);
        if sts & CMDSTS_ACTIVE == 0 {
            let err = (sts & 0xff) as u8;
            return if err == 0 {
                Ok(())
            } else {
                Err(RegError::Command { cmd: command, err })
            };
        }
        if Instant::now() > until {
            return Err(RegError::Timeout(command));
        }
        std::thread::yield_now();
    }
}

/// Programs group 0 with every engine and work queue 0 (dedicated, all entries,
/// priority 1, no PASID: addresses are IOVAs of the VFIO container), then enables
/// the device and the queue.
///
/// # Errors
/// [`RegError`] when the device is in use, lacks a capability, or refuses a command.
pub fn configure(regs: &dyn Registers) -> Result<WqSetup, RegError> {
    if regs.read32(offset::GENSTS) & 0x3 != 0 {
        return Err(RegError::AlreadyEnabled);
    }
    let gencap = regs.read64(offset::GENCAP);
    let wqcap = regs.read64(offset::WQCAP);
    let engines = (regs.read64(offset::ENGCAP) & 0xff) as u32;
    let groups = regs.read64(offset::GRPCAP) & 0xff;
    let total = (wqcap & 0xffff) as u32;
    let num_wqs = (wqcap >> 16) & 0xff;
    let wqcfg_size = 1u64 << (((wqcap >> 24) & 0xf) + 5);
    if wqcap & (1 << 49) == 0 {
        return Err(RegError::Capability("no dedicated work queue mode"));
    }
    if engines == 0 || groups == 0 || num_wqs == 0 || total == 0 {
        return Err(RegError::Capability(
            "no engine, group or work queue entries",
        ));
    }
    let max_xfer_shift = ((gencap >> 16) & 0x1f) as u32;
    let table = regs.read64(offset::TABLE_OFFSET);
    let grpcfg = (table & 0xffff) * 0x100;
    let wqcfg = ((table >> 16) & 0xffff) * 0x100;
    // Group 0: work queue 0, every engine, default flags.
    regs.write64(grpcfg, 1);
    for q in 1..4 {
        regs.write64(grpcfg + 8 * q, 0);
    }
    regs.write64(grpcfg + 32, (1u64 << engines) - 1);
    regs.write32(grpcfg + 40, 0);
    // Work queue 0: size, threshold 0, dedicated, priority 1, max transfer.
    regs.write32(wqcfg, total);
    regs.write32(wqcfg + 4, 0);
    regs.write32(wqcfg + 8, 1 | 1 << 4);
    regs.write32(wqcfg + 12, max_xfer_shift);
    let _ = wqcfg_size;
    run(regs, cmd::ENABLE_DEVICE, 0)?;
    run(regs, cmd::ENABLE_WQ, 0)?;
    let state = regs.read32(wqcfg + 24) >> 30;
    if state != 1 {
        return Err(RegError::Command {
            cmd: cmd::ENABLE_WQ,
            err: 0xff,
        });
    }
    Ok(WqSetup {
        size: total as usize,
        max_transfer: 1usize << max_xfer_shift,
        engines,
    })
}

/// An in-memory BAR0 with the device's rules, part of the device model: capability
/// registers as an IAA with `engines` engines and `entries` work-queue entries
/// reports them, and commands that check the configuration as the device does.
pub struct RegisterFile {
    mem: Mutex<Vec<u8>>,
}

const GRPCFG_AT: u64 = 0x400;
const WQCFG_AT: u64 = 0x800;

impl RegisterFile {
    /// A disabled device.
    pub fn new(engines: u8, entries: u16) -> RegisterFile {
        let r = RegisterFile {
            mem: Mutex::new(vec![0; 0x1000]),
        };
        // max_xfer_shift 21 (2 MiB), config_en.
        r.poke64(offset::GENCAP, 21 << 16 | 1 << 31);
        // entries, 8 queues, 32-byte WQCFG, shared and dedicated modes.
        r.poke64(offset::WQCAP, u64::from(entries) | 8 << 16 | 3 << 48);
        r.poke64(offset::GRPCAP, 4);
        r.poke64(offset::ENGCAP, u64::from(engines));
        r.poke64(
            offset::TABLE_OFFSET,
            (GRPCFG_AT / 0x100) | ((WQCFG_AT / 0x100) << 16),
        );
        r
    }

    fn poke64(&self, off: u64, v: u64) {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        m[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn peek32(m: &[u8], off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]])
    }

    fn put32(m: &mut [u8], off: u64, v: u32) {
        m[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Whether work queue 0 is enabled.
    pub fn wq0_enabled(&self) -> bool {
        let m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        Self::peek32(&m, WQCFG_AT + 24) >> 30 == 1
    }

    fn command(m: &mut [u8], v: u32) {
        let (command, operand) = ((v >> 20) & 0x1f, v & 0xf_ffff);
        let dev_on = Self::peek32(m, offset::GENSTS) & 3 == 1;
        let err: u32 = match command {
            cmd::ENABLE_DEVICE if dev_on => 0x10, // already enabled
            cmd::ENABLE_DEVICE => {
                // A group needs an engine and a work queue.
                let wqs = Self::peek32(m, GRPCFG_AT);
                let eng = Self::peek32(m, GRPCFG_AT + 32);
                if wqs == 0 || eng == 0 {
                    0x11 // bad group configuration
                } else {
                    Self::put32(m, offset::GENSTS, 1);
                    0
                }
            }
            cmd::DISABLE_DEVICE => {
                Self::put32(m, offset::GENSTS, 0);
                0
            }
            cmd::ENABLE_WQ if !dev_on => 0x20, // device not enabled
            cmd::ENABLE_WQ if operand != 0 => 0x21, // bad queue index (one configured)
            cmd::ENABLE_WQ => {
                if Self::peek32(m, WQCFG_AT) & 0xffff == 0 {
                    0x23 // zero size
                } else {
                    let s = Self::peek32(m, WQCFG_AT + 24);
                    Self::put32(m, WQCFG_AT + 24, (s & 0x3fff_ffff) | 1 << 30);
                    0
                }
            }
            cmd::DISABLE_WQ => {
                let s = Self::peek32(m, WQCFG_AT + 24);
                Self::put32(m, WQCFG_AT + 24, s & 0x3fff_ffff);
                0
            }
            _ => 0x01,
        };
        Self::put32(m, offset::CMDSTS, err);
    }
}

impl Registers for RegisterFile {
    fn read32(&self, off: u64) -> u32 {
        let m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if off as usize + 4 > m.len() {
            return u32::MAX;
        }
        Self::peek32(&m, off)
    }

    fn write32(&self, off: u64, v: u32) {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if off as usize + 4 > m.len() || off < offset::TABLE_OFFSET + 8 && off != offset::CMD {
            return; // capability registers are read-only
        }
        if off == offset::CMD {
            Self::command(&mut m, v);
        } else if off != offset::CMDSTS && off != offset::GENSTS {
            Self::put32(&mut m, off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vfio_programming_sequence_enables_a_dedicated_queue_on_the_register_model() {
        let regs = RegisterFile::new(8, 128);
        assert!(!regs.wq0_enabled());
        let setup = configure(&regs).expect("configured");
        assert_eq!(
            setup,
            WqSetup {
                size: 128,
                max_transfer: 2 << 20,
                engines: 8
            }
        );
        assert!(regs.wq0_enabled());
        assert_eq!(regs.read32(offset::GENSTS) & 3, 1);
        // Group 0 holds queue 0 and the eight engines; queue 0 is dedicated, priority 1.
        assert_eq!(regs.read64(GRPCFG_AT), 1);
        assert_eq!(regs.read64(GRPCFG_AT + 32), 0xff);
        assert_eq!(regs.read32(WQCFG_AT + 8), 0x11);
        // A second run finds the device in use.
        assert_eq!(configure(&regs), Err(RegError::AlreadyEnabled));
    }

    #[test]
    fn a_device_without_engines_or_queue_entries_is_refused() {
        assert!(matches!(
            configure(&RegisterFile::new(0, 128)),
            Err(RegError::Capability(_))
        ));
        assert!(matches!(
            configure(&RegisterFile::new(4, 0)),
            Err(RegError::Capability(_))
        ));
    }
}
