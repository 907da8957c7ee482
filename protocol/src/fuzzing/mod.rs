//! Entry points for the cargo-fuzz targets in `fuzz/` (each target is a thin wrapper
//! over one of these) and for the tests that replay them. Not a stable API.
//!
//! Every input starts with a selector byte that picks the limits; the rest is peer
//! bytes, so a frame's encoding prefixed with a selector is a valid seed.

use crate::frame::{Envelope, Frame};
use crate::ids::{ChecksumId, CodecId};
use crate::limits::{CodecSet, Limits};
use crate::stream::FrameDecoder;

mod handshake;
mod session;

pub use handshake::{handshake, handshake_seeds};
pub use session::{SessionOutcome, session, session_run, session_seeds};

/// A private codec id the fuzz limits accept, to reach the "unknown layout" paths.
pub const PRIVATE_CODEC: CodecId = CodecId(0xf001);

/// Limits picked by a selector byte: bit 0 handshake phase, bit 1 checksum negotiated.
pub fn limits(selector: u8) -> Limits {
    if selector & 1 != 0 {
        return Limits::handshake();
    }
    let mut codecs = CodecSet::all_known();
    codecs.insert(PRIVATE_CODEC);
    let checksum = (selector & 2 != 0).then_some(ChecksumId::CRC32C);
    Limits::session(4096, 256, 1 << 20, codecs, checksum).unwrap_or_else(|_| Limits::handshake())
}

/// Decodes one frame from the start of `bytes`; returns it with its length.
fn decode_one<'a>(bytes: &'a [u8], limits: &Limits) -> Option<(Frame<'a>, usize)> {
    let env_bytes: &[u8; Envelope::LEN] = bytes.get(..Envelope::LEN)?.try_into().ok()?;
    let env = Envelope::parse(env_bytes, limits).ok()?;
    let body = bytes.get(Envelope::LEN..env.frame_len())?;
    Frame::decode(env, body, limits)
        .ok()
        .map(|f| (f, env.frame_len()))
}

/// Decode, re-encode, compare: every frame the decoder accepts has exactly one
/// encoding, the bytes it came from.
///
/// # Panics
/// When the property fails (that is the bug the fuzzer looks for).
pub fn frame_roundtrip(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let limits = limits(selector);
    if let Some((frame, len)) = decode_one(bytes, &limits) {
        let mut out = Vec::new();
        frame.encode(&mut out).expect("a decoded frame encodes");
        assert_eq!(out, &bytes[..len], "re-encoding differs for {frame:?}");
    }
}

/// The stream decoder fed in fuzzer-chosen chunk sizes gives the same frames and the
/// same first error as decoding the stream whole.
///
/// Input: selector, chunk-size count `k`, `k` chunk sizes, then the stream.
///
/// # Panics
/// When the two decodings differ.
pub fn stream_chunks(data: &[u8]) {
    let [selector, k, rest @ ..] = data else {
        return;
    };
    let k = usize::from(*k % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(k);
    let limits = limits(*selector);
    let whole = collect(&limits, &mut core::iter::once(stream));
    let mut sizes = sizes.iter().map(|&s| usize::from(s) + 1).cycle();
    let mut pos = 0;
    let mut chunks = core::iter::from_fn(|| {
        if pos >= stream.len() {
            return None;
        }
        let n = sizes.next().unwrap_or(stream.len()).min(stream.len() - pos);
        let c = &stream[pos..pos + n];
        pos += n;
        Some(c)
    });
    let split = collect(&limits, &mut chunks);
    assert_eq!(whole, split, "chunked decoding differs");
}

type Decoded = (Vec<Vec<u8>>, Option<crate::DecodeError>);

fn collect(limits: &Limits, chunks: &mut dyn Iterator<Item = &[u8]>) -> Decoded {
    let mut dec = FrameDecoder::new(*limits);
    let mut frames = Vec::new();
    for chunk in chunks {
        let mut input = chunk;
        // Each turn consumes at least one byte or yields a frame; bound it anyway.
        for _ in 0..=2 * chunk.len() + 1 {
            match dec.decode(input) {
                Ok((used, frame)) => {
                    if let Some(f) = frame {
                        let mut out = Vec::new();
                        f.encode(&mut out).expect("a decoded frame encodes");
                        frames.push(out);
                    }
                    input = &input[used..];
                    if input.is_empty() {
                        break;
                    }
                }
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

/// The RDMA binding's messages (`rdma`): the first byte picks the kind (ADVERT,
/// READ_PAGES, DONE), the rest is the message. Whatever decodes must encode back to
/// the same bytes, and nothing may panic.
pub fn rdma_messages(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let kind = [
        crate::rdma::RdmaMsg::ADVERT,
        crate::rdma::RdmaMsg::READ_PAGES,
        crate::rdma::RdmaMsg::DONE,
    ][usize::from(sel) % 3];
    if let Some(again) = crate::rdma::roundtrip(kind, body) {
        assert_eq!(again, body, "{kind:?} re-encodes differently");
    }
}
