//! The incremental frame decoder: bytes in any split, whole frames out.

use core::cell::Cell;

use crate::error::DecodeError;
use crate::frame::{Envelope, Frame};
use crate::limits::Limits;

/// Decodes a byte stream into frames, whatever the split of the bytes.
///
/// When a whole frame lies in the caller's input it is decoded in place, borrowing
/// its lists and payload from the input. A frame split across inputs is gathered in an
/// internal buffer that never grows past the frame limit in force, and borrowed from
/// there.
///
/// After an error the decoder stays failed: the stream is no longer in sync and the
/// channel must be closed.
///
/// ```
/// use pagewire_protocol::{Ack, AckKind, Frame, FrameDecoder, Limits, CodecSet};
/// let limits = Limits::session(4096, 128, 1 << 20, CodecSet::all_known(), None).unwrap();
/// let mut wire = Vec::new();
/// Frame::Ack(Ack { kind: AckKind::ROUND, value: 3 }).encode(&mut wire).unwrap();
///
/// let mut dec = FrameDecoder::new(limits);
/// let mut frames = 0;
/// for chunk in wire.chunks(5) {
///     let mut input = chunk;
///     while !input.is_empty() {
///         let (used, frame) = dec.decode(input).unwrap();
///         input = &input[used..];
///         if let Some(Frame::Ack(ack)) = frame {
///             assert_eq!(ack.value, 3);
///             frames += 1;
///         }
///     }
/// }
/// assert_eq!(frames, 1);
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    buf: Vec<u8>,
    /// The buffer held a frame that was handed out; clear it on the next call.
    handed_out: bool,
    failed: Cell<Option<DecodeError>>,
}

impl FrameDecoder {
    /// A decoder that enforces `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            handed_out: false,
            failed: Cell::new(None),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits, for example once the handshake has completed. Takes effect
    /// from the next frame; a frame partly buffered is checked under the new limits.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Bytes of an unfinished frame held inside the decoder.
    pub fn buffered(&self) -> usize {
        if self.handed_out { 0 } else { self.buf.len() }
    }

    /// Consumes bytes from `input` and returns how many it used, with a frame when one
    /// is complete. At most one frame is returned per call: call again with the rest of
    /// the input. `(n, None)` means all `n` bytes were taken and more are needed.
    ///
    /// # Errors
    /// Any [`DecodeError`]; the decoder then stays failed.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Frame<'a>>), DecodeError> {
        if let Some(e) = self.failed.get() {
            return Err(e);
        }
        if self.handed_out {
            self.buf.clear();
            self.handed_out = false;
        }
        let (used, env, in_input) = match self.step(input) {
            Ok(Step::NeedMore(n)) => return Ok((n, None)),
            Ok(Step::InInput(n, env)) => (n, env, true),
            Ok(Step::InBuffer(n, env)) => (n, env, false),
            Err(e) => {
                self.failed.set(Some(e));
                self.buf = Vec::new();
                return Err(e);
            }
        };
        let body = if in_input {
            &input[Envelope::LEN..used]
        } else {
            self.handed_out = true;
            &self.buf[Envelope::LEN..]
        };
        match Frame::decode(env, body, &self.limits) {
            Ok(frame) => Ok((used, Some(frame))),
            Err(e) => {
                // A shared borrow of `self.buf` may be live here; record through the Cell.
                self.failed.set(Some(e));
                Err(e)
            }
        }
    }

    fn step(&mut self, input: &[u8]) -> Result<Step, DecodeError> {
        // Fast path: nothing buffered and the whole frame is in the input.
        if self.buf.is_empty() && input.len() >= Envelope::LEN {
            let env = self.envelope(&input[..Envelope::LEN])?;
            let len = env.frame_len();
            if input.len() >= len {
                return Ok(Step::InInput(len, env));
            }
        }
        let mut used = 0;
        if self.buf.len() < Envelope::LEN {
            let take = (Envelope::LEN - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            used += take;
            if self.buf.len() < Envelope::LEN {
                return Ok(Step::NeedMore(used));
            }
        }
        let env = self.envelope(&self.buf[..Envelope::LEN])?;
        let len = env.frame_len();
        // Bounded by the frame limit checked in `envelope`.
        let take = (len - self.buf.len()).min(input.len() - used);
        if self.buf.capacity() < len {
            self.buf.reserve_exact(len - self.buf.len());
        }
        self.buf.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.buf.len() == len {
            Ok(Step::InBuffer(used, env))
        } else {
            Ok(Step::NeedMore(used))
        }
    }

    fn envelope(&self, bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let mut a = [0u8; Envelope::LEN];
        a.copy_from_slice(bytes);
        Envelope::parse(&a, &self.limits)
    }
}

enum Step {
    NeedMore(usize),
    InInput(usize, Envelope),
    InBuffer(usize, Envelope),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Ack, PageFrame};
    use crate::ids::{AckKind, CodecId, PageIndex, RegionId, Round};
    use crate::limits::CodecSet;
    use crate::wire::{PageRun, WireList};

    fn limits() -> Limits {
        Limits::session(4096, 128, 64 << 10, CodecSet::all_known(), None).unwrap()
    }

    fn stream() -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let payload = vec![0x5a; 2 * 4096];
        let runs = [PageRun {
            start: PageIndex(10),
            count: 2,
        }];
        for i in 0..3u32 {
            Frame::Pages(PageFrame {
                codec: CodecId::RAW,
                region: RegionId(0),
                round: Round(i),
                data_runs: (&runs).into(),
                zero_runs: WireList::Slice(&[]),
                uniform_runs: WireList::Slice(&[]),
                lengths: None,
                crc: None,
                payload: &payload,
            })
            .encode(&mut out)
            .unwrap();
            Frame::Ack(Ack {
                kind: AckKind::FRAMES,
                value: i.into(),
            })
            .encode(&mut out)
            .unwrap();
        }
        (out, 6)
    }

    fn count_frames(dec: &mut FrameDecoder, chunks: &mut dyn Iterator<Item = &[u8]>) -> usize {
        let mut n = 0;
        for chunk in chunks {
            let mut input = chunk;
            loop {
                let (used, frame) = dec.decode(input).unwrap();
                input = &input[used..];
                if frame.is_some() {
                    n += 1;
                }
                if input.is_empty() && frame.is_none() {
                    break;
                }
                if input.is_empty() {
                    break;
                }
            }
        }
        n
    }

    #[test]
    fn any_split_yields_the_same_frames() {
        let (bytes, frames) = stream();
        for size in [1, 2, 7, 8, 9, 100, 4096, 5000, bytes.len()] {
            let mut dec = FrameDecoder::new(limits());
            assert_eq!(
                count_frames(&mut dec, &mut bytes.chunks(size)),
                frames,
                "chunk {size}"
            );
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(limits());
        let env = [0x11, 0, 0, 0, 0, 0, 0x10, 0];
        assert!(matches!(
            dec.decode(&env),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        assert_eq!(dec.buffered(), 0);
        // Stays failed.
        assert!(dec.decode(&[0]).is_err());
    }

    #[test]
    fn partial_envelope_is_buffered() {
        let mut dec = FrameDecoder::new(limits());
        let (bytes, _) = stream();
        let (used, f) = dec.decode(&bytes[..3]).unwrap();
        assert_eq!((used, f.is_none()), (3, true));
        assert_eq!(dec.buffered(), 3);
    }
}
