//! The verbs objects: the session's registration ([`Registered`], one protection
//! domain and one memory region per guest region, shared by the session's channels)
//! and each connection's own ([`Verbs`]: completion channel and queue, queue pair,
//! message buffers), each destroyed in dependency order.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use pagewire_protocol::RegionId;
use rdma_sys::*;

use super::{RdmaConfig, RdmaError};
use crate::buf::{GuestMemory, Mapping};
use crate::session::wait_readable;

/// Bit marking a receive work request id.
pub(super) const RECV_BIT: u64 = 1 << 63;
/// Bit marking an RDMA READ work request id.
pub(super) const READ_BIT: u64 = 1 << 62;

pub(super) fn cm_err(op: &'static str) -> RdmaError {
    RdmaError::Cm {
        op,
        source: io::Error::last_os_error(),
    }
}

pub(super) fn verbs_err(op: &'static str) -> RdmaError {
    RdmaError::Verbs {
        op,
        source: io::Error::last_os_error(),
    }
}

/// Names of the RDMA devices present.
pub fn devices() -> Vec<String> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let names = (0..usize::try_from(n).unwrap_or(0))
        .filter_map(|i| {
            // SAFETY: `list` holds `n` device pointers; each name is a C string owned by
            // the device, copied out before the list is freed.
            unsafe {
                let d = *list.add(i);
                let name = ibv_get_device_name(d);
                (!name.is_null()).then(|| {
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned()
                })
            }
        })
        .collect();
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

pub(crate) fn require_device() -> Result<(), RdmaError> {
    if devices().is_empty() {
        return Err(RdmaError::NoDevice);
    }
    Ok(())
}

/// A registered guest region.
pub(super) struct Mr {
    pub(super) region: RegionId,
    pub(super) memory: GuestMemory,
    pub(super) mr: *mut ibv_mr,
}

impl Mr {
    pub(super) fn lkey(&self) -> u32 {
        // SAFETY: a live registration (it lives as long as `self`).
        unsafe { (*self.mr).lkey }
    }
    pub(super) fn rkey(&self) -> u32 {
        // SAFETY: a live registration.
        unsafe { (*self.mr).rkey }
    }
}

/// Which side a registration is for: what the peer may do with the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// The source: the destination may READ its guest memory.
    Source,
    /// The destination: no remote access at all (it reads into its own memory).
    Destination,
}

/// A session's protection domain and guest-memory registrations, made once by the
/// session's first channel and shared by all of them (dropped with the last).
pub(crate) struct Registered {
    ctx: *mut ibv_context,
    pub(super) pd: *mut ibv_pd,
    pub(super) mrs: Vec<Mr>,
}

// SAFETY: verbs objects may be used from any thread (libibverbs is thread-safe); the
// registrations are only read after creation.
unsafe impl Send for Registered {}
// SAFETY: as above.
unsafe impl Sync for Registered {}

impl Drop for Registered {
    fn drop(&mut self) {
        // SAFETY: the MRs and the PD were created by `Registered::get` and are
        // destroyed once, MRs first; every queue pair using the PD was destroyed
        // before its channel dropped its reference.
        unsafe {
            for m in &self.mrs {
                ibv_dereg_mr(m.mr);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
        }
    }
}

impl Registered {
    /// The session's registration on device context `ctx`: made now (guest memory
    /// registered with `side`'s rights) or shared with the channels already open.
    fn get(
        ctx: *mut ibv_context,
        cfg: &RdmaConfig,
        side: Side,
    ) -> Result<Arc<Registered>, RdmaError> {
        let mut cell = cfg
            .registration
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cell.as_ref() {
            if r.ctx != ctx {
                return Err(RdmaError::DeviceMismatch);
            }
            return Ok(r.clone());
        }
        let access = match side {
            Side::Source => ibv_access_flags::IBV_ACCESS_REMOTE_READ.0 as i32,
            Side::Destination => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
        };
        let mut r = Registered {
            ctx,
            pd: ptr::null_mut(),
            mrs: Vec::new(),
        };
        // SAFETY: `ctx` is the live device context of an rdma_cm id; the objects are
        // stored in `r` at once, so its `Drop` frees them on any later error; the
        // registered memory outlives the registrations (guest memory clones in `mrs`).
        unsafe {
            r.pd = ibv_alloc_pd(ctx);
            if r.pd.is_null() {
                return Err(verbs_err("ibv_alloc_pd"));
            }
            for (region, memory) in &cfg.regions {
                let mr = ibv_reg_mr(r.pd, memory.as_ptr().cast(), memory.len(), access);
                if mr.is_null() {
                    return Err(verbs_err("ibv_reg_mr (guest memory)"));
                }
                r.mrs.push(Mr {
                    region: *region,
                    memory: memory.clone(),
                    mr,
                });
            }
        }
        let r = Arc::new(r);
        *cell = Some(r.clone());
        Ok(r)
    }
}

/// The verbs objects of one connection, destroyed in the right order on drop.
pub(super) struct Verbs {
    /// The event channel this id owns (null for an accepted id, whose events come
    /// on the listener's channel).
    pub(super) ec: *mut rdma_event_channel,
    pub(super) id: *mut rdma_cm_id,
    pub(super) comp: *mut ibv_comp_channel,
    pub(super) cq: *mut ibv_cq,
    pub(super) qp_created: bool,
    pub(super) send_bufs: Mapping,
    pub(super) send_mr: *mut ibv_mr,
    pub(super) recv_bufs: Mapping,
    pub(super) recv_mr: *mut ibv_mr,
    /// The session's registration; released after the queue pair, before the id.
    pub(super) reg: Option<Arc<Registered>>,
}

// SAFETY: libibverbs and librdmacm objects may be used from any thread; a `Verbs` is
// owned by one channel, used through `&mut` by one thread at a time.
unsafe impl Send for Verbs {}

impl Drop for Verbs {
    fn drop(&mut self) {
        // SAFETY: every pointer is either null or an object this struct created and
        // owns; each is destroyed once, dependents (QP, MRs) before what they depend
        // on (CQ, PD), the id before its event channel.
        unsafe {
            if !self.id.is_null() {
                rdma_disconnect(self.id);
                if self.qp_created {
                    rdma_destroy_qp(self.id);
                }
            }
            if !self.send_mr.is_null() {
                ibv_dereg_mr(self.send_mr);
            }
            if !self.recv_mr.is_null() {
                ibv_dereg_mr(self.recv_mr);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.comp.is_null() {
                ibv_destroy_comp_channel(self.comp);
            }
        }
        // The last channel frees the session's PD while its id still holds the device.
        self.reg = None;
        // SAFETY: as above.
        unsafe {
            if !self.id.is_null() {
                rdma_destroy_id(self.id);
            }
            if !self.ec.is_null() {
                rdma_destroy_event_channel(self.ec);
            }
        }
    }
}

/// Waits for the next rdma_cm event on `ec` and checks it is `expected`; returns the
/// event's id (for CONNECT_REQUEST: the new connection's id).
pub(super) fn expect_event(
    ec: *mut rdma_event_channel,
    expected: rdma_cm_event_type::Type,
    name: &'static str,
    timeout: Duration,
) -> Result<*mut rdma_cm_id, RdmaError> {
    // SAFETY: `ec` is a live event channel owned by the caller, and its fd stays open
    // while the channel lives, which is longer than this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw((*ec).fd) };
    if !wait_readable(fd, Some(timeout)).map_err(|source| RdmaError::Cm {
        op: "poll(event channel)",
        source,
    })? {
        return Err(RdmaError::Cm {
            op: name,
            source: io::ErrorKind::TimedOut.into(),
        });
    }
    let mut ev: *mut rdma_cm_event = ptr::null_mut();
    // SAFETY: `ec` is live; `ev` is a valid out-pointer; the event is acknowledged
    // after its fields are copied.
    unsafe {
        if rdma_get_cm_event(ec, &mut ev) != 0 {
            return Err(cm_err("rdma_get_cm_event"));
        }
        let (kind, status, id) = ((*ev).event, (*ev).status, (*ev).id);
        rdma_ack_cm_event(ev);
        if kind != expected || status != 0 {
            return Err(RdmaError::Event {
                expected: name,
                got: kind,
                status,
            });
        }
        Ok(id)
    }
}

pub(super) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s = socket2::SockAddr::from(*addr);
    // SAFETY: a zeroed sockaddr_storage is valid; `s` fits in it (it is one).
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = s.len();
    // SAFETY: `s.as_ptr()` points at `len` bytes of a sockaddr no larger than
    // sockaddr_storage.
    unsafe {
        ptr::copy_nonoverlapping(
            s.as_ptr().cast::<u8>(),
            (&raw mut st).cast::<u8>(),
            len as usize,
        );
    }
    (st, len)
}

impl Verbs {
    /// A guard owning only `ec` and `id` (for the steps before `setup`).
    pub(super) fn guard(
        ec: *mut rdma_event_channel,
        id: *mut rdma_cm_id,
    ) -> Result<Self, RdmaError> {
        Ok(Verbs {
            ec,
            id,
            comp: ptr::null_mut(),
            cq: ptr::null_mut(),
            qp_created: false,
            send_bufs: Mapping::new(1).map_err(|source| RdmaError::Verbs { op: "mmap", source })?,
            send_mr: ptr::null_mut(),
            recv_bufs: Mapping::new(1).map_err(|source| RdmaError::Verbs { op: "mmap", source })?,
            recv_mr: ptr::null_mut(),
            reg: None,
        })
    }

    /// Creates the CQ and QP on a resolved (or requested) id, on the session's
    /// protection domain (registering the guest memory if this is the session's first
    /// channel), and posts the receive buffers. Takes ownership of `ec` and `id`.
    pub(super) fn setup(
        ec: *mut rdma_event_channel,
        id: *mut rdma_cm_id,
        cfg: &RdmaConfig,
        side: Side,
    ) -> Result<Self, RdmaError> {
        let mut v = Verbs::guard(ec, id)?;
        cfg.validate()?;
        let map = |n: u32| {
            Mapping::new(n as usize * cfg.message_size as usize)
                .map_err(|source| RdmaError::Verbs { op: "mmap", source })
        };
        v.send_bufs = map(cfg.send_depth)?;
        v.recv_bufs = map(cfg.recv_depth)?;
        let local = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32;
        let depth = cfg
            .send_depth
            .checked_add(cfg.recv_depth)
            .and_then(|d| i32::try_from(d).ok())
            .ok_or(RdmaError::Config("send_depth + recv_depth must fit an i32"))?;
        // SAFETY: `id` is a live rdma_cm id with a device context (`verbs`) after
        // address resolution or a connect request; every object created here is
        // stored in `v` at once, so `Verbs::drop` frees it on any later error; the
        // message buffers outlive their registrations (mappings in `v`).
        unsafe {
            let ctx = (*id).verbs;
            if ctx.is_null() {
                return Err(RdmaError::Config("rdma_cm id has no device context"));
            }
            let reg = Registered::get(ctx, cfg, side)?;
            let pd = reg.pd;
            v.reg = Some(reg);
            v.comp = ibv_create_comp_channel(ctx);
            if v.comp.is_null() {
                return Err(verbs_err("ibv_create_comp_channel"));
            }
            v.cq = ibv_create_cq(ctx, depth, ptr::null_mut(), v.comp, 0);
            if v.cq.is_null() {
                return Err(verbs_err("ibv_create_cq"));
            }
            let mut attr: ibv_qp_init_attr = std::mem::zeroed();
            attr.send_cq = v.cq;
            attr.recv_cq = v.cq;
            attr.qp_type = ibv_qp_type::IBV_QPT_RC;
            attr.cap.max_send_wr = cfg.send_depth;
            attr.cap.max_recv_wr = cfg.recv_depth;
            attr.cap.max_send_sge = 1;
            attr.cap.max_recv_sge = 1;
            if rdma_create_qp(id, pd, &mut attr) != 0 {
                return Err(cm_err("rdma_create_qp"));
            }
            v.qp_created = true;
            v.send_mr = ibv_reg_mr(pd, v.send_bufs.ptr.as_ptr().cast(), v.send_bufs.len, local);
            v.recv_mr = ibv_reg_mr(pd, v.recv_bufs.ptr.as_ptr().cast(), v.recv_bufs.len, local);
            if v.send_mr.is_null() || v.recv_mr.is_null() {
                return Err(verbs_err("ibv_reg_mr (message buffers)"));
            }
        }
        for i in 0..cfg.recv_depth {
            v.post_recv(i, cfg.message_size)
                .map_err(|source| RdmaError::Verbs {
                    op: "ibv_post_recv",
                    source,
                })?;
        }
        Ok(v)
    }

    /// The session's registered guest regions.
    pub(super) fn mrs(&self) -> &[Mr] {
        self.reg.as_deref().map_or(&[], |r| &r.mrs)
    }

    pub(super) fn post_recv(&self, index: u32, size: u32) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: self.recv_bufs.ptr.as_ptr() as u64 + u64::from(index) * u64::from(size),
            length: size,
            // SAFETY: `recv_mr` is a live registration (checked non-null in setup).
            lkey: unsafe { (*self.recv_mr).lkey },
        };
        let mut wr = ibv_recv_wr {
            wr_id: RECV_BIT | u64::from(index),
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; the SGE covers receive buffer `index`, which is
        // registered and not posted twice (it is reposted only after its completion
        // was consumed).
        let r = unsafe { ibv_post_recv((*self.id).qp, &mut wr, &mut bad) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    pub(super) fn recv_buf(&self, index: u32, size: u32) -> *mut u8 {
        self.recv_bufs
            .ptr
            .as_ptr()
            .wrapping_add(index as usize * size as usize)
    }

    pub(super) fn send_buf(&self, index: u32, size: u32) -> *mut u8 {
        self.send_bufs
            .ptr
            .as_ptr()
            .wrapping_add(index as usize * size as usize)
    }
}
