//! The process's qatlib runtime: the loaded libraries, `icp_sal_userStart`, the data
//! compression instances (discovered, address translation set, started) and their
//! stateless deflate sessions, each an RAII owner released in reverse order.
//!
//! qatlib allows one `icp_sal_userStart` per process, so a runtime is shared by every
//! QAT engine built from the same libraries (a weak global entry per library list) and
//! stopped when the last engine drops it.

use core::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use super::ffi::{self, CpaInstanceHandle, Lib};
use super::pinned::Pinned;

/// Why the runtime could not be opened (each says what to do where known).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The libraries could not be loaded.
    #[error(
        "qatlib is not installed or not loadable ({0}); install qatlib (libqat.so.4, libusdm.so.0) or point PAGEWIRE_QATLIB at it"
    )]
    Load(#[from] ffi::LoadError),
    /// A qatlib call failed.
    #[error("{call} returned {} ({status})", ffi::status_name(*status))]
    Call {
        /// The function.
        call: &'static str,
        /// Its status.
        status: ffi::CpaStatus,
    },
    /// No instance can be used.
    #[error("{0}")]
    NoInstance(String),
}

fn check(call: &'static str, status: ffi::CpaStatus) -> Result<(), RuntimeError> {
    if status == ffi::CPA_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(RuntimeError::Call { call, status })
    }
}

/// A started data compression instance.
pub(crate) struct Instance {
    pub(crate) lib: Arc<Lib>,
    pub(crate) handle: CpaInstanceHandle,
    pub(crate) name: String,
    /// Bytes of private metadata one single-buffer list needs (pinned memory).
    pub(crate) meta_size: usize,
    /// Stateless deflate sessions by level (index 1..=12), made on first use.
    sessions: Mutex<Vec<Option<Session>>>,
    /// Held around every submission and poll on this instance: engines on several
    /// threads may share it.
    pub(crate) lock: Mutex<()>,
}

// SAFETY: the handle is an opaque pointer qatlib gives out for use from any thread;
// every call on it is made with `lock` held, so calls never overlap.
unsafe impl Send for Instance {}
// SAFETY: as above: shared use goes through `lock` (and `sessions`' mutex).
unsafe impl Sync for Instance {}

/// A session's memory (from the library's allocator: the device reads it).
struct Session {
    mem: Pinned,
}

impl Instance {
    /// The session for `level` (1..=12), set up on first use.
    pub(crate) fn session(
        &self,
        level: u32,
        callback: ffi::CpaDcCallbackFn,
    ) -> Result<*mut c_void, RuntimeError> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let slot = sessions.get_mut(level as usize).ok_or(RuntimeError::Call {
            call: "cpaDcInitSession (level out of range)",
            status: ffi::CPA_STATUS_INVALID_PARAM,
        })?;
        if let Some(s) = slot {
            return Ok(s.mem.as_ptr());
        }
        let mut setup = ffi::CpaDcSessionSetupData {
            compLevel: level,
            compType: ffi::CPA_DC_DEFLATE,
            huffType: ffi::CPA_DC_HT_FULL_DYNAMIC,
            autoSelectBestHuffmanTree: ffi::CPA_DC_ASB_DISABLED,
            sessDirection: ffi::CPA_DC_DIR_COMBINED,
            sessState: ffi::CPA_DC_STATELESS,
            windowSize: ffi::CPA_DC_WINSIZE_32K,
            minMatch: ffi::CPA_DC_MIN_3_BYTE_MATCH,
            checksum: ffi::CPA_DC_NONE,
            ..Default::default()
        };
        let (mut size, mut ctx) = (0u32, 0u32);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: live instance handle; the out-pointers point at locals.
        check("cpaDcGetSessionSize", unsafe {
            (self.lib.cpaDcGetSessionSize)(self.handle, &mut setup, &mut size, &mut ctx)
        })?;
        if ctx != 0 {
            // Stateless sessions need no context buffer; a library asking for one is
            // not one this backend was written against.
            return Err(RuntimeError::Call {
                call: "cpaDcGetSessionSize (stateless session wants a context buffer)",
                status: ffi::CPA_STATUS_UNSUPPORTED,
            });
        }
        let mem = Pinned::new(&self.lib, size as usize, 64).ok_or(RuntimeError::Call {
            call: "qaeMemAllocNUMA (session memory)",
            status: ffi::CPA_STATUS_RESOURCE,
        })?;
        // SAFETY: `mem` is `size` bytes of the library's pinned memory, kept alive in
        // `sessions` until the session is removed in `Drop`; `callback` is a plain
        // `extern "C"` function valid for the program's life.
        check("cpaDcInitSession", unsafe {
            (self.lib.cpaDcInitSession)(
                self.handle,
                mem.as_ptr(),
                &mut setup,
                core::ptr::null_mut(),
                Some(callback),
            )
        })?;
        let p = mem.as_ptr();
        *slot = Some(Session { mem });
        Ok(p)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let sessions = self.sessions.get_mut().unwrap_or_else(|e| e.into_inner());
        for s in sessions.iter_mut().filter_map(Option::take) {
            // SAFETY: the session was set up on this instance and no request on it is
            // in flight (every backend drains its requests before it drops its
            // reference to the instance).
            let status = unsafe { (self.lib.cpaDcRemoveSession)(self.handle, s.mem.as_ptr()) };
            if status != ffi::CPA_STATUS_SUCCESS {
                // The library may still use the memory: leak it rather than free it.
                core::mem::forget(s);
            }
        }
        // SAFETY: started in `Runtime::open`, stopped once here.
        let _ = unsafe { (self.lib.cpaDcStopInstance)(self.handle) };
    }
}

/// The loaded libraries, started, with their usable instances.
pub(crate) struct Runtime {
    pub(crate) instances: Vec<Arc<Instance>>,
    /// Instances found but not usable, with the reason (for the probe line).
    pub(crate) skipped: Vec<String>,
    lib: Arc<Lib>,
    next: Mutex<usize>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Instances stop first (engines hold none once the runtime goes).
        self.instances.clear();
        // SAFETY: started in `open`, stopped once here.
        let _ = unsafe { (self.lib.icp_sal_userStop)() };
    }
}

type Registry = Mutex<Vec<(Vec<PathBuf>, Weak<Runtime>)>>;
static RUNTIMES: Registry = Mutex::new(Vec::new());

impl Runtime {
    /// The runtime of `paths`, opened now or shared with the engines already using it.
    pub(crate) fn get(paths: &[PathBuf]) -> Result<Arc<Runtime>, RuntimeError> {
        let mut all = RUNTIMES.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(rt) = all
            .iter()
            .find(|(p, _)| p == paths)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(rt);
        }
        let rt = Arc::new(Runtime::open(paths)?);
        all.push((paths.to_vec(), Arc::downgrade(&rt)));
        Ok(rt)
    }

    /// The instance for the next engine (round robin: engines share instances when
    /// there are more engines than instances).
    pub(crate) fn pick(&self) -> Arc<Instance> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let i = *next % self.instances.len();
        *next = next.wrapping_add(1);
        self.instances[i].clone()
    }

    fn open(paths: &[PathBuf]) -> Result<Runtime, RuntimeError> {
        let refs: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
        // SAFETY: these are qatlib's libraries (or a stand-in with its interface): the
        // caller chose them as such; `Lib::load` checks that every symbol exists.
        let lib = Arc::new(unsafe { Lib::load(&refs)? });
        if let Some(set) = lib.standin_set_codec {
            // The stand-in borrows this process's libdeflate for its "device" work.
            // SAFETY: two `extern "C"` functions valid for the program's life.
            unsafe { set(super::standin::deflate_hook, super::standin::inflate_hook) };
        }
        // SAFETY: a NUL-terminated section name; one start per runtime, and the
        // registry keeps one runtime per library list.
        check("icp_sal_userStart", unsafe {
            (lib.icp_sal_userStart)(c"SSL".as_ptr())
        })?;
        // From here on, dropping `rt` stops what was started.
        let mut rt = Runtime {
            instances: Vec::new(),
            skipped: Vec::new(),
            lib: lib.clone(),
            next: Mutex::new(0),
        };
        let mut n = 0u16;
        // SAFETY: out-pointer to a local.
        check("cpaDcGetNumInstances", unsafe {
            (lib.cpaDcGetNumInstances)(&mut n)
        })?;
        if n == 0 {
            return Err(RuntimeError::NoInstance(
                "qatlib found no data compression instance (no QAT device, or none bound to qat_4xxx/vfio-pci with a dc service enabled)".into(),
            ));
        }
        let mut handles = vec![core::ptr::null_mut(); n as usize];
        // SAFETY: `handles` has room for `n` handles.
        check("cpaDcGetInstances", unsafe {
            (lib.cpaDcGetInstances)(n, handles.as_mut_ptr())
        })?;
        for handle in handles {
            match Self::start(&lib, handle) {
                Ok(inst) => rt.instances.push(Arc::new(inst)),
                Err(why) => rt.skipped.push(why),
            }
        }
        if rt.instances.is_empty() {
            return Err(RuntimeError::NoInstance(format!(
                "no usable QAT data compression instance: {}",
                rt.skipped.join("; ")
            )));
        }
        Ok(rt)
    }

    /// Checks and starts one instance, or says why it is not used.
    fn start(lib: &Arc<Lib>, handle: CpaInstanceHandle) -> Result<Instance, String> {
        let mut info = ffi::CpaInstanceInfo2::zeroed();
        // SAFETY: a handle from cpaDcGetInstances; out-pointer to a local.
        let s = unsafe { (lib.cpaDcInstanceGetInfo2)(handle, &mut info) };
        if s != ffi::CPA_STATUS_SUCCESS {
            return Err(format!("cpaDcInstanceGetInfo2: {}", ffi::status_name(s)));
        }
        let name = info.name();
        if info.operState != ffi::CPA_OPER_STATE_UP {
            return Err(format!("{name}: operational state is down"));
        }
        if info.requiresPhysicallyContiguousMemory != ffi::CPA_FALSE {
            // Guest pages are handed to the device by virtual address, without a
            // bounce copy: that needs shared virtual memory (SVM).
            return Err(format!(
                "{name}: needs physically contiguous buffers (no SVM); pagewire passes guest pages in place and needs an instance with SVM enabled"
            ));
        }
        if info.isPolled == ffi::CPA_FALSE {
            return Err(format!("{name}: not a polled instance"));
        }
        // SAFETY: the translation function is libusdm's, valid while `lib` is loaded.
        let s = unsafe { (lib.cpaDcSetAddressTranslation)(handle, lib.qaeVirtToPhysNUMA) };
        if s != ffi::CPA_STATUS_SUCCESS {
            return Err(format!(
                "{name}: cpaDcSetAddressTranslation: {}",
                ffi::status_name(s)
            ));
        }
        let mut nbuf = 0u16;
        // SAFETY: out-pointer to a local.
        let s = unsafe { (lib.cpaDcGetNumIntermediateBuffers)(handle, &mut nbuf) };
        if s != ffi::CPA_STATUS_SUCCESS || nbuf != 0 {
            // Older generations need intermediate buffers for dynamic Huffman; this
            // backend does not allocate them.
            return Err(format!(
                "{name}: needs {nbuf} intermediate buffers (a QAT generation before 4xxx), not supported"
            ));
        }
        // SAFETY: no intermediate buffers are needed (checked above).
        let s = unsafe { (lib.cpaDcStartInstance)(handle, 0, core::ptr::null_mut()) };
        if s != ffi::CPA_STATUS_SUCCESS {
            return Err(format!(
                "{name}: cpaDcStartInstance: {}",
                ffi::status_name(s)
            ));
        }
        let mut meta = 0u32;
        // SAFETY: out-pointer to a local.
        let s = unsafe { (lib.cpaDcBufferListGetMetaSize)(handle, 1, &mut meta) };
        let inst = Instance {
            lib: lib.clone(),
            handle,
            name,
            meta_size: meta as usize,
            sessions: Mutex::new((0..=12).map(|_| None).collect()),
            lock: Mutex::new(()),
        };
        if s != ffi::CPA_STATUS_SUCCESS {
            return Err(format!(
                "{}: cpaDcBufferListGetMetaSize: {}",
                inst.name,
                ffi::status_name(s)
            ));
        }
        Ok(inst)
    }
}
