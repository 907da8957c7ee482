//! Entry points for the cargo-fuzz targets in `fuzz/` (each target is a thin wrapper
//! over one of these) and for the tests that replay them. Not a stable API.
//!
//! Every input starts with a selector byte that picks the limits; the rest is peer
//! bytes, so a frame's encoding prefixed with a selector is a valid seed.

use crate::frame::{Envelope, Frame, NONCE_LEN};
use crate::handshake::{
    Authentication, Capabilities, ClientConfig, ClientHandshake, ServerConfig, ServerHandshake,
    SessionKey,
};
use crate::ids::{ChannelId, ChecksumId, CodecId, SessionId};
use crate::limits::{CodecSet, Limits};
use crate::stream::FrameDecoder;

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

/// Drives a handshake state machine with arbitrary peer bytes.
///
/// Input: selector (bit 0: play the destination, else the source; bit 1: this side has a
/// key), chunk size, then the peer's bytes. Nothing may panic, the state machine must
/// stay within its frame limit, and a side with a key must never finish: the fuzzer
/// cannot know the key, so finishing would mean authentication was bypassed.
///
/// # Panics
/// When a keyed side completes against the fuzzer.
pub fn handshake(data: &[u8]) {
    let [selector, chunk, peer @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let keyed = selector & 2 != 0;
    let auth = if keyed {
        SessionKey::new(*b"fuzzing key, never sent")
            .map_or(Authentication::None, Authentication::PreSharedKey)
    } else {
        Authentication::None
    };
    let mut caps = Capabilities::new(4096);
    caps.checksum = selector & 4 != 0;
    let session = SessionId([0x11; 16]);
    let mut out = Vec::new();
    if selector & 1 != 0 {
        let Ok(mut s) = ServerHandshake::new(
            ServerConfig {
                caps,
                session: Some(session),
                auth,
            },
            [3; NONCE_LEN],
        ) else {
            return;
        };
        for piece in peer.chunks(chunk) {
            let Ok(used) = s.receive(piece) else { break };
            assert!(used <= piece.len());
            s.take_output(&mut out);
            if s.is_done() {
                assert!(!keyed, "destination authenticated a peer without the key");
                let n = s.negotiated().expect("done means negotiated");
                assert!(n.codecs.contains(CodecId::RAW));
                break;
            }
        }
    } else {
        let Ok(mut c) = ClientHandshake::new(
            ClientConfig {
                caps,
                session,
                channel: ChannelId(0),
                channel_count: 1,
                auth,
            },
            [4; NONCE_LEN],
        ) else {
            return;
        };
        c.take_output(&mut out);
        for piece in peer.chunks(chunk) {
            let Ok(used) = c.receive(piece) else { break };
            assert!(used <= piece.len());
            c.take_output(&mut out);
            if c.is_done() {
                assert!(!keyed, "source accepted a destination without the key");
                let n = c.negotiated().expect("done means negotiated");
                assert!(n.codecs.contains(CodecId::RAW) && n.page_size == 4096);
                break;
            }
        }
    }
    // The handshake never writes more than a few frames.
    assert!(out.len() <= 4 * crate::limits::HANDSHAKE_MAX_FRAME as usize);
}

/// Seeds for [`handshake`]: what a real peer says to each fuzzed side, so the fuzzer
/// starts from complete exchanges (unkeyed ones reach the end).
pub fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let session = SessionId([0x11; 16]);
    let caps = Capabilities::new(4096);
    let mut seeds = Vec::new();
    for keyed in [false, true] {
        let auth = || match keyed {
            true => SessionKey::new(*b"the peer's own key, not ours")
                .map_or(Authentication::None, Authentication::PreSharedKey),
            false => Authentication::None,
        };
        let (Ok(mut c), Ok(mut s)) = (
            ClientHandshake::new(
                ClientConfig {
                    caps,
                    session,
                    channel: ChannelId(0),
                    channel_count: 1,
                    auth: auth(),
                },
                [4; NONCE_LEN],
            ),
            ServerHandshake::new(
                ServerConfig {
                    caps,
                    session: Some(session),
                    auth: auth(),
                },
                [3; NONCE_LEN],
            ),
        ) else {
            continue;
        };
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            let mut wire = Vec::new();
            c.take_output(&mut wire);
            to_server.extend_from_slice(&wire);
            let _ = s.receive(&wire);
            wire.clear();
            s.take_output(&mut wire);
            to_client.extend_from_slice(&wire);
            let _ = c.receive(&wire);
        }
        let sel = u8::from(keyed) << 1;
        let (dn, sn) = match keyed {
            false => ("seed-destination", "seed-source"),
            true => ("seed-destination-keyed", "seed-source-keyed"),
        };
        seeds.push((dn, [&[sel | 1, 64][..], &to_server].concat()));
        seeds.push((sn, [&[sel, 255][..], &to_client].concat()));
    }
    seeds
}
