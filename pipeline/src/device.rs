//! Device state, streamed and fallible: the VMM writes each section into a writer that
//! sends it in DEVICE_STATE chunks as it goes, so no section has to be whole in memory,
//! and an error from the VMM aborts the migration cleanly.
//!
//! A device with a pre-copy phase (VFIO-style: a large state that mostly stays put)
//! sends what it can while the guest runs ([`DeviceState::precopy`], after every
//! pre-copy round), and only the rest during downtime ([`DeviceState::save`]).

use std::collections::HashSet;
use std::io;

use crate::dirty::DirtyLogError;
use crate::error::{Failed, MigrationError};
use crate::source::Source;

/// The VMM's device state (vCPU registers, interrupt controllers, device models).
///
/// Every section is identified by its name and instance and sent once per migration;
/// a device that sends during pre-copy names each piece uniquely (e.g. instance =
/// piece number). A closure `FnMut(&mut DeviceStateWriter) -> Result<(), DirtyLogError>`
/// is a `DeviceState` with no pre-copy phase.
pub trait DeviceState {
    /// Called after each pre-copy round while the guest runs: sends what is ready.
    /// The default sends nothing.
    ///
    /// # Errors
    /// Whatever the VMM reports; the migration fails and the guest keeps running.
    fn precopy(&mut self, out: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        let _ = out;
        Ok(())
    }

    /// Bytes the device still has to send during downtime (an estimate, added to the
    /// expected downtime). The default is 0.
    fn pending_bytes(&self) -> u64 {
        0
    }

    /// Called while the guest is paused, after the last pages: sends the final state.
    ///
    /// # Errors
    /// Whatever the VMM reports; the migration fails and the guest is resumed here.
    fn save(&mut self, out: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError>;
}

impl<F> DeviceState for F
where
    F: FnMut(&mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError>,
{
    fn save(&mut self, out: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        self(out)
    }
}

/// No device state at all (memory only).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDeviceState;

impl DeviceState for NoDeviceState {
    fn save(&mut self, _: &mut DeviceStateWriter<'_>) -> Result<(), DirtyLogError> {
        Ok(())
    }
}

/// Bytes gathered before a chunk goes out.
const CHUNK: usize = 256 * 1024;

/// Where the VMM writes device state: section by section, each sent in chunks on
/// channel 0 as it is written.
pub struct DeviceStateWriter<'a> {
    source: &'a mut Source,
    failed: Option<Failed>,
    seen: &'a mut HashSet<(String, u32)>,
}

impl std::fmt::Debug for DeviceStateWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStateWriter")
            .field("failed", &self.failed.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> DeviceStateWriter<'a> {
    pub(crate) fn new(source: &'a mut Source, seen: &'a mut HashSet<(String, u32)>) -> Self {
        Self {
            source,
            failed: None,
            seen,
        }
    }

    /// The first failure of a send, which fails the migration whatever the VMM
    /// returned.
    pub(crate) fn into_failure(self) -> Option<Failed> {
        self.failed
    }

    /// Sends a whole section.
    ///
    /// # Errors
    /// The channel failed, or the name or instance is not usable (see
    /// [`section`](Self::section)); the migration fails either way.
    pub fn write_section(&mut self, name: &str, instance: u32, data: &[u8]) -> io::Result<()> {
        let mut s = self.section(name, instance, data.len() as u64)?;
        io::Write::write_all(&mut s, data)?;
        s.finish()
    }

    /// Opens a section of exactly `len` bytes, written through the returned
    /// [`io::Write`] and ended with [`SectionWriter::finish`].
    ///
    /// # Errors
    /// A name that is empty or longer than 255 bytes, a (name, instance) already sent
    /// in this migration, or an earlier failure of this writer.
    pub fn section(
        &mut self,
        name: &str,
        instance: u32,
        len: u64,
    ) -> io::Result<SectionWriter<'_, 'a>> {
        self.check()?;
        if name.is_empty() || name.len() > 255 {
            return Err(self.fail(MigrationError::Config(format!(
                "device-state section name {name:?}: 1..=255 bytes"
            ))));
        }
        if !self.seen.insert((name.to_owned(), instance)) {
            return Err(self.fail(MigrationError::Config(format!(
                "device-state section {name:?}/{instance} was already sent"
            ))));
        }
        Ok(SectionWriter {
            name: name.to_owned(),
            instance,
            total: len,
            offset: 0,
            buf: Vec::with_capacity(CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))),
            opened: false,
            writer: self,
        })
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(f) => Err(io::Error::other(format!(
                "device state: an earlier send failed: {}",
                f.error
            ))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: MigrationError) -> io::Error {
        let err = io::Error::other(e.to_string());
        self.failed.get_or_insert(Failed::bare(e));
        err
    }

    fn send(
        &mut self,
        name: &str,
        instance: u32,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> io::Result<()> {
        self.check()?;
        match self
            .source
            .send_device_chunk(name, instance, total, offset, data)
        {
            Ok(()) => Ok(()),
            Err(f) => {
                let err = io::Error::other(f.error.to_string());
                self.failed.get_or_insert(f);
                Err(err)
            }
        }
    }
}

/// One device-state section being written; see [`DeviceStateWriter::section`].
pub struct SectionWriter<'w, 'a> {
    writer: &'w mut DeviceStateWriter<'a>,
    name: String,
    instance: u32,
    total: u64,
    offset: u64,
    buf: Vec<u8>,
    /// The first chunk went out.
    opened: bool,
}

impl std::fmt::Debug for SectionWriter<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectionWriter")
            .field("name", &self.name)
            .field("instance", &self.instance)
            .field("total", &self.total)
            .field("written", &(self.offset + self.buf.len() as u64))
            .finish()
    }
}

impl SectionWriter<'_, '_> {
    /// Hands the buffered bytes to the channel (moved, not copied) and starts a new
    /// buffer for the rest of the section.
    fn flush_chunk(&mut self) -> io::Result<()> {
        let len = self.buf.len() as u64;
        let rest = self.total.saturating_sub(self.offset + len);
        let next = Vec::with_capacity(usize::try_from(rest).map_or(CHUNK, |r| r.min(CHUNK)));
        let data = std::mem::replace(&mut self.buf, next);
        self.writer
            .send(&self.name, self.instance, self.total, self.offset, data)?;
        self.opened = true;
        self.offset += len;
        Ok(())
    }

    /// Ends the section: sends what is buffered and checks that exactly the announced
    /// length was written.
    ///
    /// # Errors
    /// Fewer bytes than announced (the migration fails), or the channel failed.
    pub fn finish(mut self) -> io::Result<()> {
        let written = self.offset + self.buf.len() as u64;
        if written != self.total {
            let e = MigrationError::Config(format!(
                "device-state section {:?}/{}: {written} bytes written of the {} announced",
                self.name, self.instance, self.total
            ));
            return Err(self.writer.fail(e));
        }
        if !self.buf.is_empty() || !self.opened {
            self.flush_chunk()?;
        }
        self.total = u64::MAX; // finished: Drop has nothing to say
        Ok(())
    }
}

impl io::Write for SectionWriter<'_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let written = self.offset + self.buf.len() as u64;
        let room = self.total.saturating_sub(written);
        if data.len() as u64 > room {
            let e = MigrationError::Config(format!(
                "device-state section {:?}/{}: more than the {} bytes announced",
                self.name, self.instance, self.total
            ));
            return Err(self.writer.fail(e));
        }
        let mut rest = data;
        while !rest.is_empty() {
            let n = (CHUNK - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == CHUNK {
                self.flush_chunk()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SectionWriter<'_, '_> {
    fn drop(&mut self) {
        if self.total != u64::MAX {
            let e = MigrationError::Config(format!(
                "device-state section {:?}/{} was dropped before finish()",
                self.name, self.instance
            ));
            let _ = self.writer.fail(e);
        }
    }
}
