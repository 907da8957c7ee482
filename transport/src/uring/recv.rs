//! Receiving: bytes from the provided-buffer ring, and payloads straight into
//! destination memory with one `recvmsg`.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::opcode;
use io_uring::types::Fd;

use super::{CANCEL_TAG, Core, DIRECT_MIN, DIRECT_TAG, Direct, RECV_TAG};
use crate::buf::GuestSlice;
use crate::channel::ChannelError;
use crate::recv::{ByteSource, copy_to_guest, guest_iovecs};

impl Core {
    /// Whether the multishot receive took bytes not read yet, or saw the end of the
    /// stream or an error (after [`Core::reap`]).
    pub(super) fn has_received(&self) -> bool {
        !self.chunks.is_empty() || self.eof || self.recv_error.is_some()
    }

    /// Receives payload bytes straight into `dst` (from byte `skip`): stops the
    /// multishot receive so it takes no more of the stream, then `recvmsg` with
    /// `MSG_WAITALL` into the destination. `None` when bytes arrived through the ring
    /// meanwhile (they come first, by copy).
    pub(super) fn recv_direct(
        &mut self,
        dst: &[GuestSlice],
        skip: usize,
    ) -> Result<Option<usize>, ChannelError> {
        let timeout = self.cfg.recv_timeout;
        // The whole receive is bounded by the timeout, however many waits it takes.
        let deadline = timeout.map(crate::deadline::from_now);
        let left = || deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if self.armed {
            let cancel = opcode::AsyncCancel::new(RECV_TAG)
                .build()
                .user_data(CANCEL_TAG);
            self.push_now(&cancel)
                .map_err(|e| ChannelError::io("io_uring cancel", e))?;
            while self.armed {
                if !self.enter(1, left())?
                    && self.ring.completion().is_empty()
                    && left().is_some_and(|l| l.is_zero())
                {
                    return Err(ChannelError::RecvTimeout(timeout.unwrap_or_default()));
                }
                self.reap()?;
            }
        }
        if !self.chunks.is_empty() || self.eof || self.recv_error.is_some() {
            return Ok(None);
        }
        let mut d = Box::new(Direct {
            // SAFETY: a zeroed msghdr is valid (no name, no control data).
            msg: unsafe { std::mem::zeroed() },
            iov: guest_iovecs(dst, skip, 1024),
            _dst: dst.to_vec(),
        });
        d.msg.msg_iov = d.iov.as_mut_ptr();
        d.msg.msg_iovlen = d.iov.len();
        let e = opcode::RecvMsg::new(Fd(self.stream.as_raw_fd()), &raw mut d.msg)
            .flags(libc::MSG_WAITALL as u32)
            .build()
            .user_data(DIRECT_TAG);
        self.direct_res = None;
        loop {
            // SAFETY: the msghdr, its iovecs and the destination memory they point at
            // live in the box (which holds the guest slices), kept in `self.direct`
            // until the completion arrives (or leaked by `Drop` if it never does);
            // destination pages are not accessed by anyone else while placed.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                break;
            }
            self.ring
                .submit()
                .map_err(|e| ChannelError::io("io_uring_enter", e))?;
        }
        self.direct = Some(d);
        loop {
            if let Some(res) = self.direct_res.take() {
                self.direct = None;
                return match res {
                    r if r >= 0 => Ok(Some(r as usize)),
                    r => Err(ChannelError::io(
                        "io_uring recvmsg",
                        io::Error::from_raw_os_error(-r),
                    )),
                };
            }
            if !self.enter(1, left())?
                && self.ring.completion().is_empty()
                && left().is_some_and(|l| l.is_zero())
            {
                // Leave the receive with the kernel; `Drop` cancels and waits for it.
                return Err(ChannelError::RecvTimeout(timeout.unwrap_or_default()));
            }
            self.reap()?;
        }
    }
}

impl ByteSource for Core {
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ChannelError> {
        let Some((bid, len, off)) = self.front()? else {
            return Ok(0);
        };
        let n = dst.len().min((len - off) as usize);
        // SAFETY: the kernel wrote `len` bytes into buffer `bid` and handed it over in a
        // completion; it is not given back to the kernel until consumed, so reading
        // `off..off + n` (within `len`) races with nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.br.buf_ptr(bid).add(off as usize),
                dst.as_mut_ptr(),
                n,
            );
        }
        self.consume(n as u32);
        Ok(n)
    }

    fn read_guest(&mut self, dst: &[GuestSlice], skip: usize) -> Result<usize, ChannelError> {
        let want = dst.iter().map(GuestSlice::len).sum::<usize>() - skip;
        if self.chunks.is_empty()
            && want >= DIRECT_MIN
            && !self.eof
            && self.recv_error.is_none()
            && let Some(n) = self.recv_direct(dst, skip)?
        {
            return Ok(n);
        }
        let Some((bid, len, off)) = self.front()? else {
            return Ok(0);
        };
        let total: usize = dst.iter().map(GuestSlice::len).sum();
        let n = total.saturating_sub(skip).min((len - off) as usize);
        // SAFETY: as in `read`: bytes `off..off + n` of buffer `bid` are ours to read.
        let src = unsafe { std::slice::from_raw_parts(self.br.buf_ptr(bid).add(off as usize), n) };
        copy_to_guest(dst, skip, src);
        self.consume(n as u32);
        Ok(n)
    }
}
