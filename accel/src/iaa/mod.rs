//! Intel In-Memory Analytics Accelerator (IAA) behind the codec engine.
//!
//! Layers, bottom up:
//! - [`aecs`]: the compress AECS (Huffman table, output accumulator) and the host
//!   side of dynamic Huffman: histogram in, length-limited canonical code and block
//!   header out.
//! - [`desc`]: 64-byte descriptors and 64-byte completion records, exactly as the
//!   IAA specification and Linux's idxd uapi header lay them out.
//! - [`portal`]: where descriptors go in ([`Portal`]): `ENQCMD`/`MOVDIR64B` and
//!   `UMWAIT` on the CPU side.
//! - [`wq`]: the kernel idxd work-queue portal (`/dev/iax/wqX.Y`), with sysfs
//!   discovery and a probe that says why a queue is unusable.
//! - `vfio` (feature `vfio`): the user-space VFIO portal.
//! - [`model`]: the **device model**, software behind the same portal interface that
//!   executes descriptors with the device's semantics and injects its faults.
//! - [`backend`]: the engine [`Backend`](crate::Backend) over any portal.
//!
//! What ran where: the descriptor layer, the backend (fixed and dynamic Huffman) and
//! its fallbacks ran against the device model only; the kernel work-queue and VFIO portals were built (and
//! their discovery and probing run) on a machine without IAA. No code here has met
//! IAA hardware.

pub mod aecs;
pub mod backend;
pub mod desc;
pub mod model;
pub mod portal;
pub mod regs;
#[cfg(feature = "vfio")]
pub mod vfio;
pub mod wq;

pub use aecs::{Aecs, Histogram};
pub use backend::{Huffman, IaaBackend, IaaConfig, IaaCounters};
pub use desc::{Completed, CompletionRecord, Descriptor, Status};
pub use model::{DeviceModel, ModelConfig};
pub use portal::{CpuFeatures, Enqueue, Portal, WqMode};

/// Opens the VFIO portal on the device at PCI address `addr`.
///
/// # Errors
/// Why it cannot be opened, or that this build lacks the `vfio` feature.
pub fn open_vfio(addr: &str) -> Result<Box<dyn Portal>, String> {
    #[cfg(feature = "vfio")]
    {
        vfio::open(addr).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "vfio"))]
    {
        Err(format!(
            "cannot open {addr}: this build has no VFIO support (build pagewire-accel with \
             the `vfio` feature)"
        ))
    }
}
