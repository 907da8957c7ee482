//! The envelope in front of every frame, and the flags it carries.

use crate::error::DecodeError;
use crate::ids::FrameType;
use crate::limits::{Limits, Phase};
use crate::wire::Reader;

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

pub(crate) fn flags_only(frame: FrameType, flags: u8, allowed: u8) -> Result<(), DecodeError> {
    if flags & !allowed != 0 {
        return Err(DecodeError::UnknownFlags { frame, flags });
    }
    Ok(())
}
