//! Decoding a frame's body, field by field, under the limits of the session's phase.

use crate::copy::decode_copy;
use crate::error::DecodeError;
use crate::ids::{
    AbortReason, AckKind, AuthMethod, ChannelId, ChecksumId, FrameType, RejectReason, Round,
    SessionId, Version,
};
use crate::limits::{Limits, MAGIC};
use crate::pages::decode_pages;
use crate::wire::{Reader, RegionDesc, WireList};

use super::{
    Abort, Ack, Commit, Complete, Confirm, DeviceState, EndOfRound, Envelope, Frame, Hello,
    LayoutFrame, Reject, Welcome, flags_only,
};

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
                let reason = RejectReason(r.u16()?);
                Frame::Reject(Reject {
                    reason,
                    version_min: Version(r.u16()?),
                    version_max: Version(r.u16()?),
                    page_size: r.u32()?,
                    codecs: r.list_u8()?,
                    checksums: r.list_u8()?,
                    auth: r.list_u8()?,
                    // Refused, but naming the reason it carried, which is then not lost.
                    message: core::str::from_utf8(r.bytes_u8()?).map_err(|_| {
                        DecodeError::InvalidField {
                            field: "REJECT message (not UTF-8), whose reason is",
                            value: reason.0.into(),
                        }
                    })?,
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
                let name = utf8(r.bytes_u8()?, "device state name (UTF-8 valid up to byte)")?;
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
                        field: "device state offset (its data would end past the section's total)",
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
                let reason = AbortReason(r.u16()?);
                Frame::Abort(Abort {
                    reason,
                    // Refused, but naming the reason it carried, which is then not lost.
                    message: core::str::from_utf8(r.bytes_u8()?).map_err(|_| {
                        DecodeError::InvalidField {
                            field: "ABORT message (not UTF-8), whose reason is",
                            value: reason.0.into(),
                        }
                    })?,
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
}

pub(crate) fn check_region(region: &RegionDesc, page_size: u32) -> Result<(), DecodeError> {
    let ps = u64::from(page_size);
    let bad = |field, value| Err(DecodeError::InvalidField { field, value });
    if region.length == 0 || !region.length.is_multiple_of(ps) {
        return bad("region length", region.length);
    }
    if !region.guest_addr.0.is_multiple_of(ps) {
        return bad(
            "region guest address (not a multiple of the page size)",
            region.guest_addr.0,
        );
    }
    if region.guest_addr.0.checked_add(region.length).is_none() {
        return bad(
            "region guest address (guest_addr + length passes 2^64)",
            region.guest_addr.0,
        );
    }
    if !region.backing_page_size.is_power_of_two() || region.backing_page_size < page_size {
        return bad("region backing page size", region.backing_page_size.into());
    }
    Ok(())
}
