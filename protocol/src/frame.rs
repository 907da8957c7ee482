//! Frames: the envelope, every frame type, and their encoding and decoding.
//!
//! Decoding borrows from the bytes it is given (lists, names and payloads are slices of
//! the frame); encoding appends to a caller-owned `Vec<u8>`.

use crate::copy::{CopyFrame, decode_copy};
use crate::error::DecodeError;
use crate::ids::{
    AbortReason, AckKind, AuthMethod, ChannelId, ChecksumId, CodecId, FrameType, RejectReason,
    Round, SessionId, Version,
};
use crate::limits::{Limits, MAGIC, Phase};
use crate::pages::decode_pages;
pub use crate::pages::{PAGES_FIXED_LEN, PageFrame, pages_crc_seed};
use crate::wire::{
    EncodeError, Reader, RegionDesc, WireList, put_bytes_u8, put_list_u8, put_u16, put_u32, put_u64,
};

/// The 8 bytes in front of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The frame's type.
    pub frame_type: FrameType,
    /// Per-type flags.
    pub flags: u8,
    /// Body length in bytes.
    pub length: u32,
}

impl Envelope {
    /// Encoded size.
    pub const LEN: usize = 8;

    /// Parses and checks an envelope against the limits in force: the frame limit, the
    /// frame type (unknown types below `0x80` are errors) and the phase.
    ///
    /// # Errors
    /// `ReservedNotZero`, `FrameTooLarge`, `UnknownFrameType`, `UnexpectedFrame`.
    pub fn parse(bytes: &[u8; Self::LEN], limits: &Limits) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let frame_type = FrameType(r.u8()?);
        let flags = r.u8()?;
        r.reserved_u16("envelope reserved")?;
        let length = r.u32()?;
        let env = Self {
            frame_type,
            flags,
            length,
        };
        env.check(limits)?;
        Ok(env)
    }

    /// Checks an envelope against the limits in force.
    ///
    /// # Errors
    /// `FrameTooLarge`, `UnknownFrameType`, `UnexpectedFrame`.
    pub fn check(&self, limits: &Limits) -> Result<(), DecodeError> {
        let total = u64::from(self.length) + Self::LEN as u64;
        if total > u64::from(limits.max_frame_bytes) {
            return Err(DecodeError::FrameTooLarge {
                len: total,
                max: limits.max_frame_bytes,
            });
        }
        let ty = self.frame_type;
        if !ty.is_known() {
            return match ty.is_skippable() {
                true => Ok(()),
                false => Err(DecodeError::UnknownFrameType(ty)),
            };
        }
        let handshake = matches!(
            ty,
            FrameType::HELLO
                | FrameType::WELCOME
                | FrameType::REJECT
                | FrameType::CONFIRM
                | FrameType::READY
        );
        if handshake != (limits.phase == Phase::Handshake) {
            return Err(DecodeError::UnexpectedFrame(ty));
        }
        Ok(())
    }

    /// Total frame length, envelope included.
    pub fn frame_len(&self) -> usize {
        Self::LEN + self.length as usize
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; Self::LEN];
        self.write_into(&mut b);
        out.extend_from_slice(&b);
    }

    /// The envelope's 8 bytes as they go on the wire.
    pub fn write_into(&self, out: &mut [u8; Self::LEN]) {
        out[0] = self.frame_type.0;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&[0, 0]);
        out[4..8].copy_from_slice(&self.length.to_le_bytes());
    }
}

/// PAGES flag: the payload has a per-page length table.
pub const FLAG_PER_PAGE: u8 = 0x01;
/// PAGES and COPY flag: the frame carries a CRC32C of the frame (its crc field left
/// out).
pub const FLAG_CRC32C: u8 = 0x02;

/// The size of a HELLO/WELCOME/CONFIRM nonce or proof.
pub const NONCE_LEN: usize = 32;

/// HELLO: the source's opening message on every channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Lowest version the source speaks.
    pub version_min: Version,
    /// Highest version the source speaks.
    pub version_max: Version,
    /// Session id.
    pub session: SessionId,
    /// This channel's index.
    pub channel: ChannelId,
    /// Channels in the session.
    pub channel_count: u16,
    /// Transfer page size.
    pub page_size: u32,
    /// Most pages per PAGES frame.
    pub max_pages: u32,
    /// Largest frame the source accepts.
    pub max_frame_bytes: u32,
    /// Fresh random bytes.
    pub nonce: [u8; NONCE_LEN],
    /// Codecs the source can decode.
    pub codecs: WireList<'a, CodecId>,
    /// Checksums the source supports.
    pub checksums: WireList<'a, ChecksumId>,
    /// Authentication methods the source can perform.
    pub auth: WireList<'a, AuthMethod>,
}

/// WELCOME: the destination accepts and states the negotiated parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome<'a> {
    /// The chosen version.
    pub version: Version,
    /// Transfer page size (equal to the HELLO's).
    pub page_size: u32,
    /// Negotiated most pages per frame.
    pub max_pages: u32,
    /// Negotiated frame limit.
    pub max_frame_bytes: u32,
    /// Fresh random bytes from the destination.
    pub nonce: [u8; NONCE_LEN],
    /// Codecs both sides decode.
    pub codecs: WireList<'a, CodecId>,
    /// Chosen checksum.
    pub checksum: Option<ChecksumId>,
    /// Chosen authentication method.
    pub auth: Option<AuthMethod>,
    /// The destination's proof, present exactly when `auth` is.
    pub proof: Option<[u8; NONCE_LEN]>,
}

/// REJECT: a handshake refused, with the reason and what the sender supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject<'a> {
    /// Why.
    pub reason: RejectReason,
    /// The sender's lowest version.
    pub version_min: Version,
    /// The sender's highest version.
    pub version_max: Version,
    /// The sender's page size.
    pub page_size: u32,
    /// Codecs the sender decodes.
    pub codecs: WireList<'a, CodecId>,
    /// Checksums the sender supports.
    pub checksums: WireList<'a, ChecksumId>,
    /// Authentication methods the sender can perform.
    pub auth: WireList<'a, AuthMethod>,
    /// Human-readable detail.
    pub message: &'a str,
}

/// CONFIRM: the source accepts the WELCOME, with its proof when authentication was
/// negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// The source's proof.
    pub proof: Option<[u8; NONCE_LEN]>,
}

/// LAYOUT: the guest memory regions and the page-to-channel affinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutFrame<'a> {
    /// Pages per affinity chunk, ≥ 1: chunk `c` of region `r` travels on channel
    /// `(c + r) % channel_count` (see `PROTOCOL.md`, "Channel affinity").
    pub chunk_pages: u32,
    /// The regions, as sent.
    pub regions: WireList<'a, RegionDesc>,
}

/// END_OF_ROUND: one channel's last frame of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndOfRound {
    /// The round that ended.
    pub round: Round,
    /// PAGES and COPY frames this channel sent in the round.
    pub frames: u32,
    /// Pages in those frames: data, zero and uniform pages of PAGES, target pages of
    /// COPY.
    pub pages: u64,
}

/// ACK: what the destination has applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// What is acknowledged.
    pub kind: AckKind,
    /// Round number or frame count, per `kind`.
    pub value: u64,
}

/// DEVICE_STATE: a chunk of a named device-state section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// Instance number.
    pub instance: u32,
    /// Section name, 1..=255 bytes of UTF-8.
    pub name: &'a str,
    /// The section's full length.
    pub total: u64,
    /// Where this chunk starts.
    pub offset: u64,
    /// The chunk.
    pub data: &'a [u8],
}

/// COMPLETE: the source has sent everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Complete {
    /// The last round.
    pub final_round: Round,
    /// Device-state sections sent.
    pub sections: u32,
}

/// COMMIT: the source hands the guest over to the destination (after ACK COMPLETE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The final round, as in COMPLETE and its ACK.
    pub final_round: Round,
}

/// ABORT: the migration is abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort<'a> {
    /// Why.
    pub reason: AbortReason,
    /// Human-readable detail.
    pub message: &'a str,
}

/// Any frame.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// HELLO.
    Hello(Hello<'a>),
    /// WELCOME.
    Welcome(Welcome<'a>),
    /// REJECT.
    Reject(Reject<'a>),
    /// CONFIRM.
    Confirm(Confirm),
    /// READY.
    Ready,
    /// LAYOUT.
    Layout(LayoutFrame<'a>),
    /// PAGES.
    Pages(PageFrame<'a>),
    /// END_OF_ROUND.
    EndOfRound(EndOfRound),
    /// ACK.
    Ack(Ack),
    /// DEVICE_STATE.
    DeviceState(DeviceState<'a>),
    /// COMPLETE.
    Complete(Complete),
    /// ABORT.
    Abort(Abort<'a>),
    /// COMMIT.
    Commit(Commit),
    /// COPY.
    Copy(CopyFrame<'a>),
    /// An extension frame (type `0x80..=0xff`) this version does not know: skip it.
    Extension {
        /// Its type.
        frame_type: FrameType,
        /// Its flags.
        flags: u8,
        /// Its body.
        body: &'a [u8],
    },
}

/// How a codec lays out its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadLayout {
    /// No data pages, no payload (`zero`).
    Empty,
    /// One block for the frame.
    Block,
    /// A length table and one entry per data page.
    PerPage,
}

/// The payload layout `PROTOCOL.md` fixes for a codec, `None` for codecs this crate does
/// not know (a private codec may use either).
pub fn payload_layout(codec: CodecId) -> Option<PayloadLayout> {
    match codec {
        CodecId::ZERO => Some(PayloadLayout::Empty),
        CodecId::RAW | CodecId::ZSTD | CodecId::LZ4 => Some(PayloadLayout::Block),
        CodecId::DEFLATE | CodecId::DEFLATE_4K | CodecId::DELTA => Some(PayloadLayout::PerPage),
        _ => None,
    }
}

pub(crate) fn flags_only(frame: FrameType, flags: u8, allowed: u8) -> Result<(), DecodeError> {
    if flags & !allowed != 0 {
        return Err(DecodeError::UnknownFlags { frame, flags });
    }
    Ok(())
}

fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    core::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidField {
        field,
        value: e.valid_up_to() as u64,
    })
}

fn opt_code<T>(v: u8, f: impl FnOnce(u8) -> T) -> Option<T> {
    (v != 0).then(|| f(v))
}

impl<'a> Frame<'a> {
    /// Decodes one frame body whose envelope has been parsed with
    /// [`Envelope::parse`] under the same `limits`.
    ///
    /// # Errors
    /// Any [`DecodeError`]: the body is checked field by field, leftover bytes included.
    pub fn decode(
        env: Envelope,
        body: &'a [u8],
        limits: &Limits,
    ) -> Result<Frame<'a>, DecodeError> {
        env.check(limits)?;
        if body.len() != env.length as usize {
            return Err(DecodeError::LengthMismatch {
                field: "frame body",
                expected: env.length.into(),
                actual: body.len() as u64,
            });
        }
        let ty = env.frame_type;
        let mut r = Reader::new(body);
        let frame = match ty {
            FrameType::HELLO => {
                flags_only(ty, env.flags, 0)?;
                if r.array::<8>()? != MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                Frame::Hello(Hello {
                    version_min: Version(r.u16()?),
                    version_max: Version(r.u16()?),
                    session: SessionId(r.array()?),
                    channel: ChannelId(r.u16()?),
                    channel_count: r.u16()?,
                    page_size: r.u32()?,
                    max_pages: r.u32()?,
                    max_frame_bytes: r.u32()?,
                    nonce: r.array()?,
                    codecs: r.list_u8()?,
                    checksums: r.list_u8()?,
                    auth: r.list_u8()?,
                })
            }
            FrameType::WELCOME => {
                flags_only(ty, env.flags, 0)?;
                let version = Version(r.u16()?);
                let page_size = r.u32()?;
                let max_pages = r.u32()?;
                let max_frame_bytes = r.u32()?;
                let nonce = r.array()?;
                let codecs = r.list_u8()?;
                let checksum = opt_code(r.u8()?, ChecksumId);
                let auth = opt_code(r.u8()?, AuthMethod);
                let proof = match auth {
                    Some(_) => Some(r.array()?),
                    None => None,
                };
                Frame::Welcome(Welcome {
                    version,
                    page_size,
                    max_pages,
                    max_frame_bytes,
                    nonce,
                    codecs,
                    checksum,
                    auth,
                    proof,
                })
            }
            FrameType::REJECT => {
                flags_only(ty, env.flags, 0)?;
                Frame::Reject(Reject {
                    reason: RejectReason(r.u16()?),
                    version_min: Version(r.u16()?),
                    version_max: Version(r.u16()?),
                    page_size: r.u32()?,
                    codecs: r.list_u8()?,
                    checksums: r.list_u8()?,
                    auth: r.list_u8()?,
                    message: utf8(r.bytes_u8()?, "reject message")?,
                })
            }
            FrameType::CONFIRM => {
                flags_only(ty, env.flags, 0)?;
                let proof = match r.remaining() {
                    0 => None,
                    _ => Some(r.array()?),
                };
                Frame::Confirm(Confirm { proof })
            }
            FrameType::READY => {
                flags_only(ty, env.flags, 0)?;
                Frame::Ready
            }
            FrameType::LAYOUT => {
                flags_only(ty, env.flags, 0)?;
                let count = r.u32()?;
                let chunk_pages = r.u32()?;
                if chunk_pages == 0 {
                    return Err(DecodeError::InvalidField {
                        field: "layout chunk pages",
                        value: 0,
                    });
                }
                let regions: WireList<'a, RegionDesc> = r.list(count as usize)?;
                for region in regions.iter() {
                    check_region(&region, limits.page_size)?;
                }
                Frame::Layout(LayoutFrame {
                    chunk_pages,
                    regions,
                })
            }
            FrameType::PAGES => Frame::Pages(decode_pages(env, &mut r, limits)?),
            FrameType::COPY => Frame::Copy(decode_copy(env, &mut r, limits)?),
            FrameType::END_OF_ROUND => {
                flags_only(ty, env.flags, 0)?;
                Frame::EndOfRound(EndOfRound {
                    round: Round(r.u32()?),
                    frames: r.u32()?,
                    pages: r.u64()?,
                })
            }
            FrameType::ACK => {
                flags_only(ty, env.flags, 0)?;
                let kind = AckKind(r.u8()?);
                if r.array::<3>()? != [0; 3] {
                    return Err(DecodeError::ReservedNotZero {
                        field: "ack reserved",
                    });
                }
                Frame::Ack(Ack {
                    kind,
                    value: r.u64()?,
                })
            }
            FrameType::DEVICE_STATE => {
                flags_only(ty, env.flags, 0)?;
                let instance = r.u32()?;
                let name = utf8(r.bytes_u8()?, "device state name")?;
                if name.is_empty() {
                    return Err(DecodeError::InvalidField {
                        field: "device state name length",
                        value: 0,
                    });
                }
                let total = r.u64()?;
                let offset = r.u64()?;
                let data = r.rest();
                let end = offset.checked_add(data.len() as u64);
                if end.is_none_or(|end| end > total) {
                    return Err(DecodeError::InvalidField {
                        field: "device state offset",
                        value: offset,
                    });
                }
                Frame::DeviceState(DeviceState {
                    instance,
                    name,
                    total,
                    offset,
                    data,
                })
            }
            FrameType::COMPLETE => {
                flags_only(ty, env.flags, 0)?;
                Frame::Complete(Complete {
                    final_round: Round(r.u32()?),
                    sections: r.u32()?,
                })
            }
            FrameType::ABORT => {
                flags_only(ty, env.flags, 0)?;
                Frame::Abort(Abort {
                    reason: AbortReason(r.u16()?),
                    message: utf8(r.bytes_u8()?, "abort message")?,
                })
            }
            FrameType::COMMIT => {
                flags_only(ty, env.flags, 0)?;
                Frame::Commit(Commit {
                    final_round: Round(r.u32()?),
                })
            }
            _ if ty.is_skippable() => Frame::Extension {
                frame_type: ty,
                flags: env.flags,
                body: r.rest(),
            },
            _ => return Err(DecodeError::UnknownFrameType(ty)),
        };
        r.finish(ty)?;
        Ok(frame)
    }

    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Welcome(_) => FrameType::WELCOME,
            Frame::Reject(_) => FrameType::REJECT,
            Frame::Confirm(_) => FrameType::CONFIRM,
            Frame::Ready => FrameType::READY,
            Frame::Layout(_) => FrameType::LAYOUT,
            Frame::Pages(_) => FrameType::PAGES,
            Frame::EndOfRound(_) => FrameType::END_OF_ROUND,
            Frame::Ack(_) => FrameType::ACK,
            Frame::DeviceState(_) => FrameType::DEVICE_STATE,
            Frame::Complete(_) => FrameType::COMPLETE,
            Frame::Abort(_) => FrameType::ABORT,
            Frame::Commit(_) => FrameType::COMMIT,
            Frame::Copy(_) => FrameType::COPY,
            Frame::Extension { frame_type, .. } => *frame_type,
        }
    }

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

pub(crate) fn check_region(region: &RegionDesc, page_size: u32) -> Result<(), DecodeError> {
    let ps = u64::from(page_size);
    let bad = |field, value| Err(DecodeError::InvalidField { field, value });
    if region.length == 0 || !region.length.is_multiple_of(ps) {
        return bad("region length", region.length);
    }
    if !region.guest_addr.0.is_multiple_of(ps)
        || region.guest_addr.0.checked_add(region.length).is_none()
    {
        return bad("region guest address", region.guest_addr.0);
    }
    if !region.backing_page_size.is_power_of_two() || region.backing_page_size < page_size {
        return bad("region backing page size", region.backing_page_size.into());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ids::{GuestAddr, RegionId};
    use crate::limits::CodecSet;

    pub(crate) fn limits() -> Limits {
        Limits::session(4096, 128, 1 << 20, CodecSet::all_known(), None).unwrap()
    }

    pub(crate) fn decode_one<'a>(
        bytes: &'a [u8],
        limits: &Limits,
    ) -> Result<Frame<'a>, DecodeError> {
        let env = Envelope::parse(bytes[..8].try_into().unwrap(), limits)?;
        Frame::decode(env, &bytes[8..], limits)
    }

    pub(crate) fn encode(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn phase_and_unknown_types() {
        let l = limits();
        let ready = encode(&Frame::Ready);
        assert_eq!(
            decode_one(&ready, &l),
            Err(DecodeError::UnexpectedFrame(FrameType::READY))
        );
        assert_eq!(decode_one(&ready, &Limits::handshake()), Ok(Frame::Ready));
        let unknown = [0x40, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_one(&unknown, &l),
            Err(DecodeError::UnknownFrameType(FrameType(0x40)))
        );
        let ext = [0x90, 3, 0, 0, 2, 0, 0, 0, 0xaa, 0xbb];
        assert_eq!(
            decode_one(&ext, &l),
            Ok(Frame::Extension {
                frame_type: FrameType(0x90),
                flags: 3,
                body: &[0xaa, 0xbb]
            })
        );
        let big = [FrameType::ACK.0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_one(&big, &l),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_reserved_fields_are_errors() {
        let l = limits();
        let mut bytes = encode(&Frame::Complete(Complete {
            final_round: Round(3),
            sections: 1,
        }));
        bytes.push(0);
        bytes[4] += 1;
        assert_eq!(
            decode_one(&bytes, &l),
            Err(DecodeError::TrailingBytes {
                frame: FrameType::COMPLETE,
                extra: 1
            })
        );
        let mut ack = encode(&Frame::Ack(Ack {
            kind: AckKind::ROUND,
            value: 1,
        }));
        ack[9] = 1;
        assert!(matches!(
            decode_one(&ack, &l),
            Err(DecodeError::ReservedNotZero { .. })
        ));
    }

    #[test]
    fn layout_regions_are_checked() {
        let l = limits();
        let good = [RegionDesc {
            id: RegionId(0),
            backing_page_size: 2 << 20,
            guest_addr: GuestAddr(1 << 30),
            length: 1 << 30,
        }];
        let f = Frame::Layout(LayoutFrame {
            chunk_pages: 128,
            regions: (&good).into(),
        });
        assert_eq!(decode_one(&encode(&f), &l), Ok(f));
        let bad = [RegionDesc {
            length: 100,
            ..good[0]
        }];
        let f = Frame::Layout(LayoutFrame {
            chunk_pages: 128,
            regions: (&bad).into(),
        });
        assert!(decode_one(&encode(&f), &l).is_err());
    }

    #[test]
    fn device_state_bounds() {
        let l = limits();
        let f = Frame::DeviceState(DeviceState {
            instance: 0,
            name: "virtio-net",
            total: 4,
            offset: 2,
            data: &[1, 2, 3],
        });
        assert!(matches!(
            decode_one(&encode(&f), &l),
            Err(DecodeError::InvalidField { .. })
        ));
    }
}
