//! Encoding a frame, envelope included, into a caller-owned buffer.

use crate::limits::MAGIC;
use crate::wire::{EncodeError, put_bytes_u8, put_list_u8, put_u16, put_u32, put_u64};

use super::{Envelope, Frame, Hello, NONCE_LEN, Welcome};

impl Frame<'_> {
    fn flags(&self) -> u8 {
        match self {
            Frame::Pages(p) => p.flags(),
            Frame::Copy(c) => c.flags(),
            Frame::Extension { flags, .. } => *flags,
            _ => 0,
        }
    }

    /// Appends the whole frame, envelope included, to `out`.
    ///
    /// Encoding does not check the protocol's rules (that is the decoder's job on the
    /// other side); it fails only when a value does not fit its field.
    ///
    /// # Errors
    /// [`EncodeError`] when a list, string or the body is too long for its field;
    /// `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        Envelope {
            frame_type: self.frame_type(),
            flags: self.flags(),
            length: 0,
        }
        .write(out);
        let res = self.encode_body(out);
        let body_len = out.len() - start - Envelope::LEN;
        let res = res.and_then(|()| {
            u32::try_from(body_len).map_err(|_| EncodeError::BodyTooLarge(body_len))
        });
        match res {
            Ok(len) => {
                out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Frame::Hello(h) => h.encode_body(out)?,
            Frame::Welcome(w) => w.encode_body(out, true)?,
            Frame::Reject(j) => {
                put_u16(out, j.reason.0);
                put_u16(out, j.version_min.0);
                put_u16(out, j.version_max.0);
                put_u32(out, j.page_size);
                put_list_u8(out, "codecs", &j.codecs)?;
                put_list_u8(out, "checksums", &j.checksums)?;
                put_list_u8(out, "auth", &j.auth)?;
                put_bytes_u8(out, "reject message", j.message.as_bytes())?;
            }
            Frame::Confirm(c) => {
                if let Some(p) = &c.proof {
                    out.extend_from_slice(p);
                }
            }
            Frame::Ready => {}
            Frame::Layout(l) => {
                let n = u32::try_from(l.regions.len()).map_err(|_| EncodeError::TooLong {
                    field: "regions",
                    len: l.regions.len(),
                    max: u32::MAX as usize,
                })?;
                put_u32(out, n);
                put_u32(out, l.chunk_pages);
                l.regions.write(out);
            }
            Frame::Pages(p) => p.encode_body(out)?,
            Frame::EndOfRound(e) => {
                put_u32(out, e.round.0);
                put_u32(out, e.frames);
                put_u64(out, e.pages);
            }
            Frame::Ack(a) => {
                out.push(a.kind.0);
                out.extend_from_slice(&[0; 3]);
                put_u64(out, a.value);
            }
            Frame::DeviceState(d) => {
                put_u32(out, d.instance);
                put_bytes_u8(out, "device state name", d.name.as_bytes())?;
                put_u64(out, d.total);
                put_u64(out, d.offset);
                out.extend_from_slice(d.data);
            }
            Frame::Complete(c) => {
                put_u32(out, c.final_round.0);
                put_u32(out, c.sections);
            }
            Frame::Abort(a) => {
                put_u16(out, a.reason.0);
                put_bytes_u8(out, "abort message", a.message.as_bytes())?;
            }
            Frame::Commit(c) => put_u32(out, c.final_round.0),
            Frame::Copy(c) => c.encode_body(out)?,
            Frame::Extension { body, .. } => out.extend_from_slice(body),
        }
        Ok(())
    }
}

impl Hello<'_> {
    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(&MAGIC);
        put_u16(out, self.version_min.0);
        put_u16(out, self.version_max.0);
        out.extend_from_slice(&self.session.0);
        put_u16(out, self.channel.0);
        put_u16(out, self.channel_count);
        put_u32(out, self.page_size);
        put_u32(out, self.max_pages);
        put_u32(out, self.max_frame_bytes);
        out.extend_from_slice(&self.nonce);
        put_list_u8(out, "codecs", &self.codecs)?;
        put_list_u8(out, "checksums", &self.checksums)?;
        put_list_u8(out, "auth", &self.auth)
    }
}

impl Welcome<'_> {
    /// The body, with or without the trailing proof (the proof covers the rest).
    pub(crate) fn encode_body(
        &self,
        out: &mut Vec<u8>,
        with_proof: bool,
    ) -> Result<(), EncodeError> {
        put_u16(out, self.version.0);
        put_u32(out, self.page_size);
        put_u32(out, self.max_pages);
        put_u32(out, self.max_frame_bytes);
        out.extend_from_slice(&self.nonce);
        put_list_u8(out, "codecs", &self.codecs)?;
        out.push(self.checksum.map_or(0, |c| c.0));
        out.push(self.auth.map_or(0, |a| a.0));
        if with_proof && self.auth.is_some() {
            out.extend_from_slice(&self.proof.unwrap_or([0; NONCE_LEN]));
        }
        Ok(())
    }
}
