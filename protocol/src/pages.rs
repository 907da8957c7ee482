//! PAGES (0x11): guest pages of one region, as data runs whose bytes ride in the
//! payload, zero runs and uniform runs (`PROTOCOL.md`, "PAGES").
//!
//! A decoded PAGES frame borrows its runs, length table and payload from the wire
//! ([`WireList`]); the decoder checks every rule of the frame itself (canonical and
//! disjoint runs, the page count, the codec and its payload layout, the checksum), and
//! the session ([`crate::session`]) checks the pages against the layout, the channel
//! affinity and the rounds. A transport that places the payload itself decodes the
//! header alone with [`PageFrame::decode_header`].

use crate::error::DecodeError;
use crate::frame::{
    Envelope, FLAG_CRC32C, FLAG_PER_PAGE, PayloadLayout, flags_only, payload_layout,
};
use crate::ids::{ChecksumId, CodecId, FrameType, RegionId, Round};
use crate::limits::Limits;
use crate::wire::{
    EncodeError, PageRun, Reader, UniformRun, WireList, put_count_u16, put_u16, put_u32,
};

/// PAGES: guest pages of one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFrame<'a> {
    /// Payload format.
    pub codec: CodecId,
    /// Region the pages belong to.
    pub region: RegionId,
    /// Round the pages belong to.
    pub round: Round,
    /// Pages carried in the payload, in payload order.
    pub data_runs: WireList<'a, PageRun>,
    /// Pages to set to zero.
    pub zero_runs: WireList<'a, PageRun>,
    /// Pages to fill with one repeated non-zero byte each.
    pub uniform_runs: WireList<'a, UniformRun>,
    /// Per-page payload lengths, for per-page codecs.
    pub lengths: Option<WireList<'a, u32>>,
    /// CRC32C of the whole frame but this field: the envelope, the header up to this
    /// field, and the payload (see [`PageFrame::crc_seed`]).
    pub crc: Option<u32>,
    /// The payload.
    pub payload: &'a [u8],
}

/// Bytes of PAGES body before the run lists.
pub const PAGES_FIXED_LEN: usize = 16;

/// A run whose `start + count` passes the last page index.
pub(crate) const PAST_LAST: &str = "a run past the last page index (start + count overflows u64)";
/// A run of no pages.
pub(crate) const EMPTY_RUN: &str = "a run of 0 pages";

/// Checks one run list: non-empty runs, ascending, neither overlapping nor touching.
/// Returns the number of pages.
fn check_runs(runs: &WireList<'_, PageRun>, list: &'static str) -> Result<u64, DecodeError> {
    let bad = |rule| DecodeError::RunsNotCanonical { list, rule };
    let mut pages = 0u64;
    let mut prev_end: Option<u64> = None;
    for run in runs.iter() {
        let end = run.end().ok_or(bad(PAST_LAST))?;
        if run.count == 0 {
            return Err(bad(EMPTY_RUN));
        }
        if prev_end.is_some_and(|p| run.start.0 <= p) {
            return Err(bad(
                "a run that does not start past the previous one's end (runs ascend, neither overlapping nor touching)",
            ));
        }
        prev_end = Some(end);
        pages += u64::from(run.count);
    }
    Ok(pages)
}

/// Checks the uniform run list: non-zero bytes, non-empty runs, ascending, not
/// overlapping, and touching only where the byte changes (so every set of uniform pages
/// has one encoding). Returns the number of pages.
fn check_uniform_runs(runs: &WireList<'_, UniformRun>) -> Result<u64, DecodeError> {
    let mut pages = 0u64;
    let mut prev: Option<(u64, u8)> = None;
    for u in runs.iter() {
        if u.byte == 0 {
            return Err(DecodeError::InvalidField {
                field: "uniform byte",
                value: 0,
            });
        }
        let bad = |rule| DecodeError::RunsNotCanonical {
            list: "uniform runs",
            rule,
        };
        let end = u.run.end().ok_or(bad(PAST_LAST))?;
        if u.run.count == 0 {
            return Err(bad(EMPTY_RUN));
        }
        if let Some((p_end, p_byte)) = prev {
            if u.run.start.0 < p_end {
                return Err(bad(
                    "a run that starts before the previous one's end (runs ascend without overlapping)",
                ));
            }
            if u.run.start.0 == p_end && u.byte == p_byte {
                return Err(bad(
                    "a run that touches the previous one with the same byte (they must be one run)",
                ));
            }
        }
        prev = Some((end, u.byte));
        pages += u64::from(u.run.count);
    }
    Ok(pages)
}

/// Whether two canonical run lists share a page (linear merge).
fn runs_intersect(
    mut ia: impl Iterator<Item = PageRun>,
    mut ib: impl Iterator<Item = PageRun>,
) -> bool {
    let (mut ra, mut rb) = (ia.next(), ib.next());
    while let (Some(x), Some(y)) = (ra, rb) {
        // Both runs are checked not to overflow.
        let (xe, ye) = (
            x.start.0 + u64::from(x.count),
            y.start.0 + u64::from(y.count),
        );
        if x.start.0 < ye && y.start.0 < xe {
            return true;
        }
        if xe <= y.start.0 {
            ra = ia.next();
        } else {
            rb = ib.next();
        }
    }
    false
}

pub(crate) fn decode_pages<'a>(
    env: Envelope,
    r: &mut Reader<'a>,
    limits: &Limits,
) -> Result<PageFrame<'a>, DecodeError> {
    let body = r.peek_rest();
    let mut frame = pages_header(env.flags, r, limits)?;
    let header_len = body.len() - r.remaining();
    let payload = r.rest();
    check_payload(&frame, payload.len(), limits)?;
    if let Some(expected) = frame.crc {
        let mut head = [0u8; Envelope::LEN];
        env.write_into(&mut head);
        // The header ends with the 4-byte crc field, which the checksum leaves out.
        let seed = crc32c::crc32c_append(crc32c::crc32c(&head), &body[..header_len - 4]);
        let actual = crc32c::crc32c_append(seed, payload);
        if actual != expected {
            return Err(DecodeError::ChecksumMismatch { expected, actual });
        }
    }
    frame.payload = payload;
    Ok(frame)
}

/// The CRC32C of an encoded PAGES frame's envelope and header, leaving out the crc field
/// that ends `head`: the seed to which the payload's bytes are appended
/// (`crc32c_append`). `head` is the frame from its first byte up to the payload.
pub fn pages_crc_seed(head: &[u8]) -> u32 {
    crc32c::crc32c(&head[..head.len().saturating_sub(4)])
}

/// Reads and checks everything of a PAGES body before its payload.
fn pages_header<'a>(
    flags: u8,
    r: &mut Reader<'a>,
    limits: &Limits,
) -> Result<PageFrame<'a>, DecodeError> {
    flags_only(FrameType::PAGES, flags, FLAG_PER_PAGE | FLAG_CRC32C)?;
    let codec = CodecId(r.u16()?);
    let n_uniform = r.u16()?;
    let region = RegionId(r.u32()?);
    let round = Round(r.u32()?);
    let n_data = r.u16()?;
    let n_zero = r.u16()?;
    let data_runs: WireList<'a, PageRun> = r.list(n_data.into())?;
    let zero_runs: WireList<'a, PageRun> = r.list(n_zero.into())?;
    let uniform_runs: WireList<'a, UniformRun> = r.list(n_uniform.into())?;
    let data_pages = check_runs(&data_runs, "data runs")?;
    let zero_pages = check_runs(&zero_runs, "zero runs")?;
    let uniform_pages = check_uniform_runs(&uniform_runs)?;
    let uniform = || uniform_runs.iter().map(|u| u.run);
    if runs_intersect(data_runs.iter(), zero_runs.iter())
        || runs_intersect(data_runs.iter(), uniform())
        || runs_intersect(zero_runs.iter(), uniform())
    {
        return Err(DecodeError::RunsNotCanonical {
            list: "data, zero and uniform runs",
            rule: "a page in two lists",
        });
    }
    // Each count is at most 65535 runs of u32 pages: the sum cannot overflow.
    let pages = data_pages + zero_pages + uniform_pages;
    if pages == 0 || pages > u64::from(limits.max_pages) {
        return Err(DecodeError::PageCount {
            pages,
            max: limits.max_pages,
        });
    }
    if !limits.codecs.contains(codec) {
        return Err(DecodeError::CodecNotNegotiated(codec));
    }
    let per_page = flags & FLAG_PER_PAGE != 0;
    let layout = payload_layout(codec);
    let rule = match layout {
        Some(PayloadLayout::Empty) if data_pages > 0 => {
            Some("it has data runs, and the codec carries no page data")
        }
        Some(PayloadLayout::Empty | PayloadLayout::Block) if per_page => {
            Some("the per-page flag is set, and the codec's payload has no per-page length table")
        }
        Some(PayloadLayout::PerPage) if !per_page => Some(
            "the per-page flag is clear, and the codec's payload needs a per-page length table",
        ),
        Some(PayloadLayout::Block | PayloadLayout::PerPage) | None if data_pages == 0 => Some(
            "it has no data runs, and the codec needs page data (zero and uniform pages go in frames of codec zero or beside data runs)",
        ),
        _ => None,
    };
    if let Some(rule) = rule {
        return Err(DecodeError::LayoutMismatch { codec, rule });
    }
    // data_pages <= max_pages <= 65536: the table length cannot overflow.
    let lengths = if per_page {
        Some(r.list::<u32>(data_pages as usize)?)
    } else {
        None
    };
    let crc = match (flags & FLAG_CRC32C != 0, limits.checksum) {
        (true, Some(ChecksumId::CRC32C)) => Some(r.u32()?),
        (true, _) => return Err(DecodeError::ChecksumNotNegotiated),
        (false, Some(_)) => return Err(DecodeError::ChecksumMissing),
        (false, None) => None,
    };
    Ok(PageFrame {
        codec,
        region,
        round,
        data_runs,
        zero_runs,
        uniform_runs,
        lengths,
        crc,
        payload: &[],
    })
}

/// Checks a payload length against a PAGES header: the length table, or the codec's
/// block rule.
fn check_payload(
    frame: &PageFrame<'_>,
    payload_len: usize,
    limits: &Limits,
) -> Result<(), DecodeError> {
    let page_size = u64::from(limits.page_size);
    let payload_len = payload_len as u64;
    let codec = frame.codec;
    if let Some(lengths) = &frame.lengths {
        let mut sum = 0u64;
        for len in lengths.iter() {
            let len = u64::from(len);
            if len > page_size || (len == 0 && codec != CodecId::DELTA) {
                return Err(DecodeError::InvalidField {
                    field: "page length",
                    value: len,
                });
            }
            sum += len;
        }
        if sum != payload_len {
            return Err(DecodeError::LengthMismatch {
                field: "page length table",
                expected: sum,
                actual: payload_len,
            });
        }
        return Ok(());
    }
    // Bounded by max_pages and the page size: no overflow.
    let data_bytes = frame.data_pages() * page_size;
    let ok = match codec {
        CodecId::RAW => payload_len == data_bytes,
        CodecId::ZERO => payload_len == 0,
        _ => payload_len > 0 && payload_len <= data_bytes,
    };
    if !ok {
        return Err(DecodeError::LengthMismatch {
            field: match codec {
                CodecId::RAW => "payload (raw: exactly the data pages' bytes)",
                CodecId::ZERO => "payload (zero: none)",
                _ => "payload (one compressed block: 1 byte up to the data pages' bytes)",
            },
            expected: if codec == CodecId::ZERO {
                0
            } else {
                data_bytes
            },
            actual: payload_len,
        });
    }
    Ok(())
}

impl<'a> PageFrame<'a> {
    /// Decodes a PAGES frame's header when its payload is elsewhere (a transport placing
    /// raw pages straight into guest memory): `header` is the body up to the payload,
    /// exactly, and `payload_len` the payload's length. Every rule of `PROTOCOL.md` is
    /// checked but the CRC, which the caller verifies over the payload where it lies.
    /// The frame's `payload` is empty.
    ///
    /// # Errors
    /// As [`Frame::decode`](crate::frame::Frame::decode) for a PAGES frame,
    /// `TrailingBytes` when `header` holds more than the header.
    pub fn decode_header(
        flags: u8,
        header: &'a [u8],
        payload_len: usize,
        limits: &Limits,
    ) -> Result<PageFrame<'a>, DecodeError> {
        let mut r = Reader::new(header);
        let frame = pages_header(flags, &mut r, limits)?;
        r.finish(FrameType::PAGES)?;
        check_payload(&frame, payload_len, limits)?;
        Ok(frame)
    }

    /// The header length (envelope included) of a PAGES frame without a per-page table,
    /// from its first `Envelope::LEN + PAGES_FIXED_LEN` bytes; `None` when `prefix` is
    /// shorter or the frame has a length table (whose size depends on the runs).
    pub fn header_len_from_prefix(flags: u8, prefix: &[u8]) -> Option<usize> {
        if flags & FLAG_PER_PAGE != 0 {
            return None;
        }
        let b = prefix.get(Envelope::LEN..Envelope::LEN + PAGES_FIXED_LEN)?;
        let runs = usize::from(u16::from_le_bytes([b[12], b[13]]))
            + usize::from(u16::from_le_bytes([b[14], b[15]]));
        let uniform = usize::from(u16::from_le_bytes([b[2], b[3]]));
        let crc = if flags & FLAG_CRC32C != 0 { 4 } else { 0 };
        Some(
            Envelope::LEN
                + PAGES_FIXED_LEN
                + runs * <PageRun as crate::wire::WireItem>::SIZE
                + uniform * <UniformRun as crate::wire::WireItem>::SIZE
                + crc,
        )
    }
}

impl PageFrame<'_> {
    /// The envelope flags this frame is encoded with.
    pub fn flags(&self) -> u8 {
        let mut f = 0;
        if self.lengths.is_some() {
            f |= FLAG_PER_PAGE;
        }
        if self.crc.is_some() {
            f |= FLAG_CRC32C;
        }
        f
    }

    /// Pages carried in the payload.
    pub fn data_pages(&self) -> u64 {
        self.data_runs.iter().map(|r| u64::from(r.count)).sum()
    }

    /// Pages to be zeroed.
    pub fn zero_pages(&self) -> u64 {
        self.zero_runs.iter().map(|r| u64::from(r.count)).sum()
    }

    /// Pages to be filled with their byte.
    pub fn uniform_pages(&self) -> u64 {
        self.uniform_runs
            .iter()
            .map(|u| u64::from(u.run.count))
            .sum()
    }

    /// Every page the frame names: data, zero and uniform pages.
    pub fn pages(&self) -> u64 {
        self.data_pages() + self.zero_pages() + self.uniform_pages()
    }

    /// Every run of the frame, data runs first, then zero runs, then uniform runs (as
    /// plain runs): what region-bounds and channel-affinity checks walk.
    pub fn all_runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.data_runs
            .iter()
            .chain(self.zero_runs.iter())
            .chain(self.uniform_runs.iter().map(|u| u.run))
    }

    /// Every data page index in payload order.
    pub fn data_page_indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.data_runs
            .iter()
            .flat_map(|r| r.start.0..r.start.0.saturating_add(u64::from(r.count)))
    }

    /// The body, payload included: what [`Frame::encode`](crate::frame::Frame::encode)
    /// writes after the envelope.
    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_fields(out)?;
        out.extend_from_slice(self.payload);
        Ok(())
    }

    fn encode_fields(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        put_u16(out, self.codec.0);
        put_count_u16(out, "uniform runs", self.uniform_runs.len())?;
        put_u32(out, self.region.0);
        put_u32(out, self.round.0);
        put_count_u16(out, "data runs", self.data_runs.len())?;
        put_count_u16(out, "zero runs", self.zero_runs.len())?;
        self.data_runs.write(out);
        self.zero_runs.write(out);
        self.uniform_runs.write(out);
        if let Some(l) = &self.lengths {
            l.write(out);
        }
        if let Some(crc) = self.crc {
            put_u32(out, crc);
        }
        Ok(())
    }

    /// The CRC32C of this frame's envelope and header (the crc field left out) for a
    /// payload of `payload_len` bytes, as if `crc` were set: append the payload's bytes
    /// to it with `crc32c::crc32c_append` to get the frame's checksum.
    ///
    /// # Errors
    /// [`EncodeError`] when a run list or the frame is too long for its field.
    pub fn crc_seed(&self, payload_len: usize) -> Result<u32, EncodeError> {
        let with_crc = PageFrame {
            crc: Some(0),
            ..*self
        };
        let mut head = Vec::with_capacity(with_crc.header_len());
        with_crc.encode_header(payload_len, &mut head)?;
        Ok(pages_crc_seed(&head))
    }

    /// This frame with `crc` set to the checksum of its envelope, header and `payload`
    /// (given in pieces, in payload order).
    ///
    /// # Errors
    /// As [`PageFrame::crc_seed`].
    pub fn with_crc(self, payload: &[&[u8]]) -> Result<Self, EncodeError> {
        let len = payload.iter().map(|p| p.len()).sum();
        let mut crc = self.crc_seed(len)?;
        for p in payload {
            crc = crc32c::crc32c_append(crc, p);
        }
        Ok(PageFrame {
            crc: Some(crc),
            ..self
        })
    }

    /// Bytes of envelope and header in front of the payload.
    pub fn header_len(&self) -> usize {
        Envelope::LEN
            + 16
            + self.data_runs.encoded_len()
            + self.zero_runs.encoded_len()
            + self.uniform_runs.encoded_len()
            + self.lengths.as_ref().map_or(0, |l| l.encoded_len())
            + if self.crc.is_some() { 4 } else { 0 }
    }

    /// Appends the envelope and header for a payload of `payload_len` bytes that the
    /// caller sends separately (for example straight from guest memory); the frame's own
    /// `payload` field is ignored.
    ///
    /// # Errors
    /// [`EncodeError`] when a run list or the frame is too long for its field.
    pub fn encode_header(&self, payload_len: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let body_len = self.header_len() - Envelope::LEN + payload_len;
        let length = u32::try_from(body_len).map_err(|_| EncodeError::BodyTooLarge(body_len))?;
        let start = out.len();
        Envelope {
            frame_type: FrameType::PAGES,
            flags: self.flags(),
            length,
        }
        .write(out);
        self.encode_fields(out).inspect_err(|_| out.truncate(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use crate::frame::tests::{decode_one, encode, limits};
    use crate::ids::PageIndex;

    fn run(start: u64, count: u32) -> PageRun {
        PageRun {
            start: PageIndex(start),
            count,
        }
    }

    #[test]
    fn raw_pages_round_trip_and_payload_is_borrowed() {
        let payload = vec![7u8; 3 * 4096];
        let runs = [run(0, 2), run(5, 1)];
        let zeros = [run(3, 2)];
        let f = Frame::Pages(PageFrame {
            codec: CodecId::RAW,
            region: RegionId(1),
            round: Round(2),
            data_runs: (&runs).into(),
            zero_runs: (&zeros).into(),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &payload,
        });
        let bytes = encode(&f);
        let back = decode_one(&bytes, &limits()).unwrap();
        assert_eq!(back, f);
        let Frame::Pages(p) = back else { panic!() };
        assert_eq!(
            p.payload.as_ptr(),
            bytes[bytes.len() - payload.len()..].as_ptr()
        );
        assert_eq!(p.data_page_indices().collect::<Vec<_>>(), [0, 1, 5]);
        assert_eq!(p.header_len(), bytes.len() - payload.len());
    }

    #[test]
    fn pages_rules_are_enforced() {
        let l = limits();
        let payload = vec![1u8; 4096];
        let base = PageFrame {
            codec: CodecId::RAW,
            region: RegionId(0),
            round: Round(0),
            data_runs: WireList::Slice(&[]),
            zero_runs: WireList::Slice(&[]),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &payload,
        };
        let check = |p: PageFrame<'_>| decode_one(&encode(&Frame::Pages(p)), &l).map(|_| ());
        let one = [run(4, 1)];
        let ok = PageFrame {
            data_runs: (&one).into(),
            ..base
        };
        assert_eq!(check(ok), Ok(()));
        // No pages at all.
        assert!(matches!(check(base), Err(DecodeError::PageCount { .. })));
        // Touching runs must be merged.
        let touching = [run(0, 1), run(1, 1)];
        let two = vec![0u8; 8192];
        let p = PageFrame {
            data_runs: (&touching).into(),
            payload: &two,
            ..base
        };
        assert!(matches!(
            check(p),
            Err(DecodeError::RunsNotCanonical { .. })
        ));
        // A page both data and zero.
        let p = PageFrame {
            data_runs: (&one).into(),
            zero_runs: (&one).into(),
            uniform_runs: WireList::Slice(&[]),
            ..base
        };
        assert_eq!(
            check(p),
            Err(DecodeError::RunsNotCanonical {
                list: "data, zero and uniform runs",
                rule: "a page in two lists"
            })
        );
        // Raw payload of the wrong size.
        let p = PageFrame {
            data_runs: (&one).into(),
            payload: &two,
            ..base
        };
        assert!(matches!(check(p), Err(DecodeError::LengthMismatch { .. })));
        // Too many pages.
        let many = [run(0, 129)];
        let p = PageFrame {
            codec: CodecId::ZERO,
            zero_runs: (&many).into(),
            uniform_runs: WireList::Slice(&[]),
            payload: &[],
            ..base
        };
        assert!(matches!(check(p), Err(DecodeError::PageCount { .. })));
        // Deflate needs a length table.
        let p = PageFrame {
            codec: CodecId::DEFLATE,
            data_runs: (&one).into(),
            payload: &payload[..100],
            ..base
        };
        assert!(matches!(
            check(p),
            Err(DecodeError::LayoutMismatch {
                codec: CodecId::DEFLATE,
                ..
            })
        ));
        // A codec that was not negotiated.
        let p = PageFrame {
            codec: CodecId(0x2a),
            data_runs: (&one).into(),
            ..base
        };
        assert_eq!(
            check(p),
            Err(DecodeError::CodecNotNegotiated(CodecId(0x2a)))
        );
        // Checksum present but not negotiated.
        let p = PageFrame {
            data_runs: (&one).into(),
            crc: Some(crc32c::crc32c(&payload)),
            ..base
        };
        assert_eq!(check(p), Err(DecodeError::ChecksumNotNegotiated));
    }

    #[test]
    fn uniform_runs_round_trip_and_bad_ones_are_errors() {
        let l = limits();
        let payload = vec![1u8; 4096];
        let data = [run(4, 1)];
        let zeros = [run(0, 2)];
        let uniform = |start: u64, count: u32, byte: u8| UniformRun {
            run: run(start, count),
            byte,
        };
        let good = [
            uniform(2, 2, 0xcc),
            uniform(5, 1, 0xcc),
            uniform(6, 1, 0x01),
        ];
        let base = PageFrame {
            codec: CodecId::RAW,
            region: RegionId(0),
            round: Round(0),
            data_runs: (&data).into(),
            zero_runs: (&zeros).into(),
            uniform_runs: (&good).into(),
            lengths: None,
            crc: None,
            payload: &payload,
        };
        let bytes = encode(&Frame::Pages(base));
        let back = decode_one(&bytes, &l).unwrap();
        assert_eq!(back, Frame::Pages(base));
        let Frame::Pages(p) = back else { panic!() };
        assert_eq!(
            (p.data_pages(), p.zero_pages(), p.uniform_pages()),
            (1, 2, 4)
        );
        assert_eq!(p.pages(), 7);
        assert_eq!(p.header_len(), bytes.len() - payload.len());
        assert_eq!(
            PageFrame::header_len_from_prefix(p.flags(), &bytes),
            Some(p.header_len())
        );
        let check = |u: &[UniformRun]| {
            decode_one(
                &encode(&Frame::Pages(PageFrame {
                    uniform_runs: u.into(),
                    ..base
                })),
                &l,
            )
            .map(|_| ())
        };
        // Byte 0 is a zero run's job.
        assert!(matches!(
            check(&[uniform(8, 1, 0)]),
            Err(DecodeError::InvalidField {
                field: "uniform byte",
                ..
            })
        ));
        // Overlapping a data page, a zero page, or another uniform run.
        for bad in [
            &[uniform(4, 1, 0xcc)][..],
            &[uniform(1, 1, 0xcc)],
            &[uniform(8, 2, 0xcc), uniform(9, 1, 0xdd)],
            // Touching runs of the same byte must be merged; out of order; empty.
            &[uniform(8, 1, 0xcc), uniform(9, 1, 0xcc)],
            &[uniform(9, 1, 0xcc), uniform(7, 1, 0xdd)],
            &[uniform(8, 0, 0xcc)],
            &[uniform(u64::MAX, 2, 0xcc)],
        ] {
            assert!(
                matches!(check(bad), Err(DecodeError::RunsNotCanonical { .. })),
                "{bad:?}"
            );
        }
        // They count against max_pages.
        assert!(matches!(
            check(&[uniform(8, 200, 0xcc)]),
            Err(DecodeError::PageCount { pages: 203, .. })
        ));
        // A frame of uniform pages only has no payload: codec zero.
        let only = PageFrame {
            codec: CodecId::ZERO,
            data_runs: WireList::Slice(&[]),
            payload: &[],
            ..base
        };
        assert!(decode_one(&encode(&Frame::Pages(only)), &l).is_ok());
    }

    #[test]
    fn crc_is_verified_when_negotiated() {
        let mut l = limits();
        l.checksum = Some(ChecksumId::CRC32C);
        let payload = vec![9u8; 4096];
        let one = [run(0, 1)];
        let mut p = PageFrame {
            codec: CodecId::RAW,
            region: RegionId(0),
            round: Round(0),
            data_runs: (&one).into(),
            zero_runs: WireList::Slice(&[]),
            uniform_runs: WireList::Slice(&[]),
            lengths: None,
            crc: None,
            payload: &payload,
        }
        .with_crc(&[&payload[..]])
        .unwrap();
        assert!(decode_one(&encode(&Frame::Pages(p)), &l).is_ok());
        let mut bytes = encode(&Frame::Pages(p));
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            decode_one(&bytes, &l),
            Err(DecodeError::ChecksumMismatch { .. })
        ));
        // The checksum covers the header: the same payload moved to another page, round
        // or region fails it.
        for (at, what) in [
            (Envelope::LEN + 4, "region"),
            (Envelope::LEN + 8, "round"),
            (Envelope::LEN + 16, "run start"),
        ] {
            let mut bytes = encode(&Frame::Pages(p));
            bytes[at] ^= 1;
            assert!(
                matches!(
                    decode_one(&bytes, &l),
                    Err(DecodeError::ChecksumMismatch { .. })
                ),
                "{what}"
            );
        }
        // The payload-only checksum of version 1 no longer passes.
        let v1 = PageFrame {
            crc: Some(crc32c::crc32c(&payload)),
            ..p
        };
        assert!(matches!(
            decode_one(&encode(&Frame::Pages(v1)), &l),
            Err(DecodeError::ChecksumMismatch { .. })
        ));
        p.crc = None;
        assert_eq!(
            decode_one(&encode(&Frame::Pages(p)), &l),
            Err(DecodeError::ChecksumMissing)
        );
    }
}
