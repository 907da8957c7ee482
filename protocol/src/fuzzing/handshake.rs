//! The `handshake` fuzz target: a handshake state machine against arbitrary peer bytes,
//! and the seeds that start it from complete exchanges.

use crate::frame::NONCE_LEN;
use crate::handshake::{
    Authentication, Capabilities, ChannelBinding, ClientConfig, ClientHandshake, ServerConfig,
    ServerHandshake, SessionKey,
};
use crate::ids::{ChannelId, CodecId, SessionId};
use crate::limits::CodecSet;

/// Drives a handshake state machine with arbitrary peer bytes.
///
/// Input: selector (bit 0: play the destination, else the source; bit 1: this side has a
/// key; bit 2: CRC32C offered; bit 3: bound to TLS; bit 4: the destination holds READY
/// and then admits the channel, or refuses it with bit 5), chunk size, then the peer's
/// bytes. Nothing may panic, the state machine must
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
    // Bit 3: the channel is bound to a TLS exporter value the fuzzer does not know.
    let binding = (selector & 8 != 0).then_some(ChannelBinding([0x5a; 32]));
    let session = SessionId([0x11; 16]);
    let mut out = Vec::new();
    if selector & 1 != 0 {
        let Ok(mut s) = ServerHandshake::with_binding(
            ServerConfig {
                caps,
                session: Some(session),
                auth,
            },
            [3; NONCE_LEN],
            binding,
        ) else {
            return;
        };
        let hold = selector & 16 != 0;
        if hold {
            s = s.hold_ready();
        }
        for piece in peer.chunks(chunk) {
            let Ok(used) = s.receive(piece) else { break };
            assert!(used <= piece.len());
            if s.confirmed().is_some() {
                assert!(!keyed, "destination confirmed a peer without the key");
                if selector & 32 != 0 {
                    let _ = s.refuse(crate::HandshakeError::ChannelRefused {
                        channel: 0,
                        count: 1,
                        why: "fuzzing",
                    });
                    assert!(s.receive(piece).is_err() && s.confirmed().is_none());
                } else {
                    s.admit();
                }
            }
            assert!(hold || s.confirmed().is_none());
            s.take_output(&mut out);
            if s.is_done() {
                assert!(!keyed, "destination authenticated a peer without the key");
                let n = s.negotiated().expect("done means negotiated");
                assert!(n.codecs.contains(CodecId::RAW));
                break;
            }
        }
    } else {
        // Bit 4: the source sends zstd and nothing else, so a WELCOME must list it.
        let require = if selector & 16 != 0 {
            CodecSet::from_ids([CodecId::ZSTD]).unwrap_or_default()
        } else {
            CodecSet::empty()
        };
        let Ok(mut c) = ClientHandshake::with_binding(
            ClientConfig {
                caps,
                session,
                channel: ChannelId(0),
                channel_count: 1,
                auth,
                require,
            },
            [4; NONCE_LEN],
            binding,
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
                assert!(require.as_slice().iter().all(|&r| n.codecs.contains(r)));
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
                    require: CodecSet::empty(),
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
        if !keyed {
            // The destination that holds READY, then admits (bit 4) or refuses (bit 5).
            let admit = [&[0x11, 64][..], &to_server].concat();
            let refuse = [&[0x31, 64][..], &to_server].concat();
            seeds.push(("seed-destination-held-admit", admit));
            seeds.push(("seed-destination-held-refuse", refuse));
        }
    }
    seeds
}
