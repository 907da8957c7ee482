//! The part of qatlib's C interface the QAT backend uses, declared by hand from
//! qatlib's public headers (`cpa.h`, `cpa_types.h`, `dc/cpa_dc.h`, `icp_sal_user.h`,
//! `icp_sal_poll.h` and libusdm's `qae_mem.h`), and loaded at run time with `dlopen`.
//!
//! The layouts are those of qatlib 24.x (`libqat.so.4`, API with LZ4 and zstd fields
//! in `CpaDcSessionSetupData`); the sizes and field offsets below were checked against
//! those headers with a C compiler, and `tests::layouts_match_qatlib` keeps them.
//! Nothing here is called without going through [`Lib`], whose loader resolves every
//! symbol up front: a library missing one is refused as a whole.

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use core::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};

pub type CpaStatus = i32;
pub type CpaBoolean = u32;
pub type CpaInstanceHandle = *mut c_void;
pub type CpaDcSessionHandle = *mut c_void;
pub type CpaPhysicalAddr = u64;
pub type CpaVirtualToPhysical = unsafe extern "C" fn(*mut c_void) -> CpaPhysicalAddr;
pub type CpaDcCallbackFn = unsafe extern "C" fn(callback_tag: *mut c_void, status: CpaStatus);
/// The stand-in's deflate hook: level, input, length, output, capacity → bytes
/// written, 0 when they do not fit.
pub type StandinDeflate = unsafe extern "C" fn(c_int, *const u8, usize, *mut u8, usize) -> usize;
/// The stand-in's inflate hook: input, length, output, capacity, consumed, produced →
/// 0 done, 1 output too small, 2 bad stream.
pub type StandinInflate =
    unsafe extern "C" fn(*const u8, usize, *mut u8, usize, *mut usize, *mut usize) -> c_int;

pub const CPA_FALSE: CpaBoolean = 0;
pub const CPA_TRUE: CpaBoolean = 1;

pub const CPA_STATUS_SUCCESS: CpaStatus = 0;
pub const CPA_STATUS_FAIL: CpaStatus = -1;
pub const CPA_STATUS_RETRY: CpaStatus = -2;
pub const CPA_STATUS_RESOURCE: CpaStatus = -3;
pub const CPA_STATUS_INVALID_PARAM: CpaStatus = -4;
pub const CPA_STATUS_FATAL: CpaStatus = -5;
pub const CPA_STATUS_UNSUPPORTED: CpaStatus = -6;
pub const CPA_STATUS_RESTARTING: CpaStatus = -7;

// CpaDcFlush
pub const CPA_DC_FLUSH_FINAL: u32 = 1;
// CpaDcHuffType
pub const CPA_DC_HT_STATIC: u32 = 0;
pub const CPA_DC_HT_FULL_DYNAMIC: u32 = 2;
// CpaDcCompType
pub const CPA_DC_DEFLATE: u32 = 3;
// CpaDcChecksum
pub const CPA_DC_NONE: u32 = 0;
// CpaDcSessionDir
pub const CPA_DC_DIR_COMBINED: u32 = 2;
// CpaDcSessionState
pub const CPA_DC_STATELESS: u32 = 1;
// CpaDcCompWindowSize
pub const CPA_DC_WINSIZE_32K: u32 = 3;
// CpaDcCompMinMatch
pub const CPA_DC_MIN_3_BYTE_MATCH: u32 = 0;
// CpaDcAutoSelectBest
pub const CPA_DC_ASB_DISABLED: u32 = 0;
// CpaOperationalState
pub const CPA_OPER_STATE_UP: u32 = 1;

// CpaDcReqStatus (the ones the backend tells apart).
pub const CPA_DC_OK: i32 = 0;
pub const CPA_DC_OVERFLOW: i32 = -11;
pub const CPA_DC_VERIFY_ERROR: i32 = -18;

/// `CpaFlatBuffer`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpaFlatBuffer {
    pub dataLenInBytes: u32,
    pub pData: *mut u8,
}

/// `CpaBufferList`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpaBufferList {
    pub numBuffers: u32,
    pub pBuffers: *mut CpaFlatBuffer,
    pub pUserData: *mut c_void,
    pub pPrivateMetaData: *mut c_void,
}

/// `CpaDcSessionSetupData`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpaDcSessionSetupData {
    pub compLevel: u32,
    pub compType: u32,
    pub huffType: u32,
    pub autoSelectBestHuffmanTree: u32,
    pub sessDirection: u32,
    pub sessState: u32,
    pub windowSize: u32,
    pub minMatch: u32,
    pub lz4BlockMaxSize: u32,
    pub lz4BlockChecksum: CpaBoolean,
    pub lz4BlockIndependence: CpaBoolean,
    pub checksum: u32,
    pub accumulateXXHash: CpaBoolean,
}

/// `CpaDcRqResults`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpaDcRqResults {
    pub status: i32,
    pub produced: u32,
    pub consumed: u32,
    pub checksum: u32,
    pub endOfLastBlock: CpaBoolean,
    pub dataUncompressed: CpaBoolean,
}

/// `CpaDcSkipData`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpaDcSkipData {
    pub skipMode: u32,
    pub skipLength: u32,
    pub strideLength: u32,
    pub firstSkipOffset: u32,
}

/// `CpaDcOpData`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpaDcOpData {
    pub flushFlag: u32,
    pub compressAndVerify: CpaBoolean,
    pub compressAndVerifyAndRecover: CpaBoolean,
    pub integrityCrcCheck: CpaBoolean,
    pub verifyHwIntegrityCrcs: CpaBoolean,
    pub integrityCrcSize: u32,
    pub inputSkipData: CpaDcSkipData,
    pub outputSkipData: CpaDcSkipData,
    pub pCrcData: *mut c_void,
}

/// `CpaInstanceInfo2` (4-byte aligned, 932 bytes); the backend reads the name, the
/// operational state and the memory and polling flags.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CpaInstanceInfo2 {
    pub accelerationServiceType: u32,
    pub vendorName: [u8; 64],
    pub partName: [u8; 64],
    pub swVersion: [u8; 64],
    pub instName: [u8; 64],
    pub instID: [u8; 128],
    /// `CpaPhysicalInstanceId`: package, accelerator, engine, bus address (u16 each),
    /// KPT handle (u32).
    pub physInstId: [u16; 6],
    pub coreAffinity: [u32; 128],
    pub nodeAffinity: u32,
    pub operState: u32,
    pub requiresPhysicallyContiguousMemory: CpaBoolean,
    pub isPolled: CpaBoolean,
    pub isOffloaded: CpaBoolean,
}

impl CpaInstanceInfo2 {
    pub fn zeroed() -> Self {
        CpaInstanceInfo2 {
            accelerationServiceType: 0,
            vendorName: [0; 64],
            partName: [0; 64],
            swVersion: [0; 64],
            instName: [0; 64],
            instID: [0; 128],
            physInstId: [0; 6],
            coreAffinity: [0; 128],
            nodeAffinity: 0,
            operState: 0,
            requiresPhysicallyContiguousMemory: CPA_FALSE,
            isPolled: CPA_FALSE,
            isOffloaded: CPA_FALSE,
        }
    }

    /// The instance's name, up to its first NUL.
    pub fn name(&self) -> String {
        let end = self
            .instName
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.instName.len());
        String::from_utf8_lossy(&self.instName[..end]).into_owned()
    }
}

/// The library names tried by default: qatlib's `libqat` and its memory driver
/// `libusdm` (the sonames of qatlib 24.x).
pub const DEFAULT_LIBRARIES: [&str; 2] = ["libqat.so.4", "libusdm.so.0"];

/// The qatlib functions the backend calls, resolved from the loaded libraries.
pub struct Lib {
    pub icp_sal_userStart: unsafe extern "C" fn(*const c_char) -> CpaStatus,
    pub icp_sal_userStop: unsafe extern "C" fn() -> CpaStatus,
    pub icp_sal_DcPollInstance: unsafe extern "C" fn(CpaInstanceHandle, u32) -> CpaStatus,
    pub cpaDcGetNumInstances: unsafe extern "C" fn(*mut u16) -> CpaStatus,
    pub cpaDcGetInstances: unsafe extern "C" fn(u16, *mut CpaInstanceHandle) -> CpaStatus,
    pub cpaDcInstanceGetInfo2:
        unsafe extern "C" fn(CpaInstanceHandle, *mut CpaInstanceInfo2) -> CpaStatus,
    pub cpaDcSetAddressTranslation:
        unsafe extern "C" fn(CpaInstanceHandle, CpaVirtualToPhysical) -> CpaStatus,
    pub cpaDcGetNumIntermediateBuffers:
        unsafe extern "C" fn(CpaInstanceHandle, *mut u16) -> CpaStatus,
    pub cpaDcStartInstance:
        unsafe extern "C" fn(CpaInstanceHandle, u16, *mut *mut CpaBufferList) -> CpaStatus,
    pub cpaDcStopInstance: unsafe extern "C" fn(CpaInstanceHandle) -> CpaStatus,
    pub cpaDcBufferListGetMetaSize:
        unsafe extern "C" fn(CpaInstanceHandle, u32, *mut u32) -> CpaStatus,
    pub cpaDcGetSessionSize: unsafe extern "C" fn(
        CpaInstanceHandle,
        *mut CpaDcSessionSetupData,
        *mut u32,
        *mut u32,
    ) -> CpaStatus,
    pub cpaDcInitSession: unsafe extern "C" fn(
        CpaInstanceHandle,
        CpaDcSessionHandle,
        *mut CpaDcSessionSetupData,
        *mut CpaBufferList,
        Option<CpaDcCallbackFn>,
    ) -> CpaStatus,
    pub cpaDcRemoveSession:
        unsafe extern "C" fn(CpaInstanceHandle, CpaDcSessionHandle) -> CpaStatus,
    pub cpaDcCompressData2: unsafe extern "C" fn(
        CpaInstanceHandle,
        CpaDcSessionHandle,
        *mut CpaBufferList,
        *mut CpaBufferList,
        *mut CpaDcOpData,
        *mut CpaDcRqResults,
        *mut c_void,
    ) -> CpaStatus,
    pub cpaDcDecompressData2: unsafe extern "C" fn(
        CpaInstanceHandle,
        CpaDcSessionHandle,
        *mut CpaBufferList,
        *mut CpaBufferList,
        *mut CpaDcOpData,
        *mut CpaDcRqResults,
        *mut c_void,
    ) -> CpaStatus,
    pub qaeMemAllocNUMA: unsafe extern "C" fn(usize, c_int, usize) -> *mut c_void,
    pub qaeMemFreeNUMA: unsafe extern "C" fn(*mut *mut c_void),
    pub qaeVirtToPhysNUMA: unsafe extern "C" fn(*mut c_void) -> u64,
    /// The stand-in's codec hook (`pagewire_standin_set_codec`), present only in the
    /// stand-in library (see `qat::standin`).
    pub standin_set_codec: Option<unsafe extern "C" fn(StandinDeflate, StandinInflate)>,
    /// The libraries, kept loaded while the function pointers above are used.
    _libs: Vec<libloading::Library>,
    /// What was loaded, for messages.
    pub paths: Vec<PathBuf>,
}

impl core::fmt::Debug for Lib {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Lib")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// Why the libraries could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `dlopen` refused a library (not installed, or a missing dependency).
    #[error("cannot load {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: libloading::Error,
    },
    /// A function the backend needs is in none of the libraries.
    #[error("{symbol} is not exported by {paths:?} (not qatlib 24.x or later?)")]
    Symbol {
        symbol: &'static str,
        paths: Vec<PathBuf>,
    },
}

impl Lib {
    /// Loads `paths` in order (global symbol scope, as qatlib's libraries depend on
    /// each other) and resolves every function from the first library that has it.
    ///
    /// # Safety
    /// The libraries must export these names with the C signatures declared here
    /// (qatlib's, or a stand-in's with the same interface), and loading them must be
    /// safe (their initialisers are run).
    pub unsafe fn load(paths: &[&Path]) -> Result<Lib, LoadError> {
        let mut libs = Vec::with_capacity(paths.len());
        for &path in paths {
            // SAFETY: the caller vouches for the library's initialisers.
            let lib = unsafe {
                libloading::os::unix::Library::open(
                    Some(path),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            }
            .map_err(|source| LoadError::Open {
                path: path.to_path_buf(),
                source,
            })?;
            libs.push(libloading::Library::from(lib));
        }
        let names: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
        macro_rules! sym {
            ($name:ident) => {{
                let mut found = None;
                for lib in &libs {
                    // SAFETY: the caller guarantees the symbol has the declared type;
                    // the pointer is copied out and used only while `libs` is alive
                    // (it is stored in the same `Lib`).
                    if let Ok(s) = unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes()) } {
                        found = Some(*s);
                        break;
                    }
                }
                found.ok_or_else(|| LoadError::Symbol {
                    symbol: stringify!($name),
                    paths: names.clone(),
                })?
            }};
        }
        Ok(Lib {
            icp_sal_userStart: sym!(icp_sal_userStart),
            icp_sal_userStop: sym!(icp_sal_userStop),
            icp_sal_DcPollInstance: sym!(icp_sal_DcPollInstance),
            cpaDcGetNumInstances: sym!(cpaDcGetNumInstances),
            cpaDcGetInstances: sym!(cpaDcGetInstances),
            cpaDcInstanceGetInfo2: sym!(cpaDcInstanceGetInfo2),
            cpaDcSetAddressTranslation: sym!(cpaDcSetAddressTranslation),
            cpaDcGetNumIntermediateBuffers: sym!(cpaDcGetNumIntermediateBuffers),
            cpaDcStartInstance: sym!(cpaDcStartInstance),
            cpaDcStopInstance: sym!(cpaDcStopInstance),
            cpaDcBufferListGetMetaSize: sym!(cpaDcBufferListGetMetaSize),
            cpaDcGetSessionSize: sym!(cpaDcGetSessionSize),
            cpaDcInitSession: sym!(cpaDcInitSession),
            cpaDcRemoveSession: sym!(cpaDcRemoveSession),
            cpaDcCompressData2: sym!(cpaDcCompressData2),
            cpaDcDecompressData2: sym!(cpaDcDecompressData2),
            qaeMemAllocNUMA: sym!(qaeMemAllocNUMA),
            qaeMemFreeNUMA: sym!(qaeMemFreeNUMA),
            qaeVirtToPhysNUMA: sym!(qaeVirtToPhysNUMA),
            standin_set_codec: libs.iter().find_map(|lib| {
                // SAFETY: only the stand-in exports this name, with this signature.
                unsafe { lib.get(b"pagewire_standin_set_codec\0") }
                    .ok()
                    .map(|s| *s)
            }),
            _libs: libs,
            paths: names,
        })
    }
}

/// A human name for a `CpaStatus`.
pub fn status_name(s: CpaStatus) -> &'static str {
    match s {
        CPA_STATUS_SUCCESS => "CPA_STATUS_SUCCESS",
        CPA_STATUS_FAIL => "CPA_STATUS_FAIL",
        CPA_STATUS_RETRY => "CPA_STATUS_RETRY",
        CPA_STATUS_RESOURCE => "CPA_STATUS_RESOURCE",
        CPA_STATUS_INVALID_PARAM => "CPA_STATUS_INVALID_PARAM",
        CPA_STATUS_FATAL => "CPA_STATUS_FATAL",
        CPA_STATUS_UNSUPPORTED => "CPA_STATUS_UNSUPPORTED",
        CPA_STATUS_RESTARTING => "CPA_STATUS_RESTARTING",
        _ => "an unknown CpaStatus",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    /// Sizes and offsets printed by a C compiler over qatlib's headers (x86-64).
    #[test]
    fn layouts_match_qatlib() {
        assert_eq!(size_of::<CpaFlatBuffer>(), 16);
        assert_eq!(offset_of!(CpaFlatBuffer, pData), 8);
        assert_eq!(size_of::<CpaBufferList>(), 32);
        assert_eq!(offset_of!(CpaBufferList, pBuffers), 8);
        assert_eq!(offset_of!(CpaBufferList, pUserData), 16);
        assert_eq!(offset_of!(CpaBufferList, pPrivateMetaData), 24);
        assert_eq!(size_of::<CpaDcSessionSetupData>(), 52);
        assert_eq!(offset_of!(CpaDcSessionSetupData, sessState), 20);
        assert_eq!(offset_of!(CpaDcSessionSetupData, checksum), 44);
        assert_eq!(offset_of!(CpaDcSessionSetupData, accumulateXXHash), 48);
        assert_eq!(size_of::<CpaDcRqResults>(), 24);
        assert_eq!(offset_of!(CpaDcRqResults, produced), 4);
        assert_eq!(offset_of!(CpaDcRqResults, consumed), 8);
        assert_eq!(offset_of!(CpaDcRqResults, dataUncompressed), 20);
        assert_eq!(size_of::<CpaDcOpData>(), 64);
        assert_eq!(offset_of!(CpaDcOpData, compressAndVerify), 4);
        assert_eq!(offset_of!(CpaDcOpData, integrityCrcSize), 20);
        assert_eq!(offset_of!(CpaDcOpData, inputSkipData), 24);
        assert_eq!(offset_of!(CpaDcOpData, outputSkipData), 40);
        assert_eq!(offset_of!(CpaDcOpData, pCrcData), 56);
        assert_eq!(size_of::<CpaInstanceInfo2>(), 932);
        assert_eq!(align_of::<CpaInstanceInfo2>(), 4);
        assert_eq!(offset_of!(CpaInstanceInfo2, instName), 196);
        assert_eq!(offset_of!(CpaInstanceInfo2, physInstId), 388);
        assert_eq!(offset_of!(CpaInstanceInfo2, coreAffinity), 400);
        assert_eq!(offset_of!(CpaInstanceInfo2, nodeAffinity), 912);
        assert_eq!(offset_of!(CpaInstanceInfo2, operState), 916);
        assert_eq!(
            offset_of!(CpaInstanceInfo2, requiresPhysicallyContiguousMemory),
            920
        );
        assert_eq!(offset_of!(CpaInstanceInfo2, isPolled), 924);
        assert_eq!(offset_of!(CpaInstanceInfo2, isOffloaded), 928);
    }
}
