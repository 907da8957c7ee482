//! The handshake matrix: versions, codecs, checksums, keys, truncation, garbage.

use pagewire_protocol::frame::{Confirm, Hello, NONCE_LEN, Welcome};
use pagewire_protocol::*;

const SESSION: SessionId = SessionId([0x42; 16]);

fn key(b: u8) -> Authentication {
    Authentication::PreSharedKey(SessionKey::new(vec![b; 32]).unwrap())
}

fn client_with(caps: Capabilities, auth: Authentication) -> ClientHandshake {
    ClientHandshake::new(
        ClientConfig {
            caps,
            session: SESSION,
            channel: ChannelId(1),
            channel_count: 2,
            auth,
            require: CodecSet::empty(),
        },
        [0xc1; NONCE_LEN],
    )
    .unwrap()
}

fn server_with(caps: Capabilities, auth: Authentication) -> ServerHandshake {
    ServerHandshake::new(
        ServerConfig {
            caps,
            session: Some(SESSION),
            auth,
        },
        [0x5e; NONCE_LEN],
    )
    .unwrap()
}

type Outcome = (Result<(), HandshakeError>, Result<(), HandshakeError>);

/// Moves bytes between the two until both are done or one has failed and its last
/// words were delivered; bounded, never hangs.
fn pump(c: &mut ClientHandshake, s: &mut ServerHandshake, chunk: usize) -> Outcome {
    let (mut cr, mut sr) = (Ok(()), Ok(()));
    for _ in 0..8 {
        let mut wire = Vec::new();
        c.take_output(&mut wire);
        for piece in wire.chunks(chunk) {
            if sr.is_ok() {
                sr = s.receive(piece).map(|_| ());
            }
        }
        let mut wire = Vec::new();
        s.take_output(&mut wire);
        for piece in wire.chunks(chunk) {
            if cr.is_ok() {
                cr = c.receive(piece).map(|_| ());
            }
        }
        let settled = |r: &Result<(), _>, done: bool| r.is_err() || done;
        if settled(&cr, c.is_done()) && settled(&sr, s.is_done()) && !c.has_output() {
            break;
        }
    }
    (cr, sr)
}

fn handshake(
    ccaps: Capabilities,
    cauth: Authentication,
    scaps: Capabilities,
    sauth: Authentication,
) -> (ClientHandshake, ServerHandshake, Outcome) {
    let mut c = client_with(ccaps, cauth);
    let mut s = server_with(scaps, sauth);
    let out = pump(&mut c, &mut s, usize::MAX);
    (c, s, out)
}

fn caps() -> Capabilities {
    Capabilities::new(4096)
}

fn hello_bytes(min: u16, max: u16, codecs: &[CodecId]) -> Vec<u8> {
    let mut out = Vec::new();
    Frame::Hello(Hello {
        version_min: Version(min),
        version_max: Version(max),
        session: SESSION,
        channel: ChannelId(0),
        channel_count: 1,
        page_size: 4096,
        max_pages: 64,
        max_frame_bytes: 1 << 20,
        nonce: [9; NONCE_LEN],
        codecs: WireList::Slice(codecs),
        checksums: WireList::Slice(&[]),
        auth: WireList::Slice(&[]),
    })
    .encode(&mut out)
    .unwrap();
    out
}

/// Decodes the single handshake frame in `bytes`.
fn only_frame(bytes: &[u8]) -> Frame<'_> {
    let env = Envelope::parse(bytes[..8].try_into().unwrap(), &Limits::handshake()).unwrap();
    assert_eq!(env.frame_len(), bytes.len(), "exactly one frame");
    Frame::decode(env, &bytes[8..], &Limits::handshake()).unwrap()
}

#[test]
fn equal_versions_without_keys() {
    let (c, s, (cr, sr)) = handshake(caps(), Authentication::None, caps(), Authentication::None);
    assert_eq!((cr, sr), (Ok(()), Ok(())));
    let n = *c.negotiated().unwrap();
    assert_eq!(Some(&n), s.negotiated());
    assert_eq!(n.version, Version(6));
    assert_eq!(n.channel, ChannelId(1));
    assert_eq!(n.channel_count, 2);
    assert_eq!(n.auth, None);
    assert_eq!(n.checksum, None);
    assert_eq!(n.codecs, CodecSet::all_known());
}

#[test]
fn same_key_authenticates_both_ways_and_limits_take_the_minimum() {
    let mut sc = caps();
    sc.max_pages = 32;
    sc.checksum = true;
    let mut cc = caps();
    cc.max_frame_bytes = 1 << 20;
    cc.checksum = true;
    let (c, s, (cr, sr)) = handshake(cc, key(1), sc, key(1));
    assert_eq!((cr, sr), (Ok(()), Ok(())));
    let n = c.negotiated().unwrap();
    assert_eq!(Some(n), s.negotiated());
    assert_eq!(n.auth, Some(AuthMethod::HMAC_SHA256));
    assert_eq!(n.checksum, Some(ChecksumId::CRC32C));
    assert_eq!((n.max_pages, n.max_frame_bytes), (32, 1 << 20));
}

#[test]
fn one_byte_at_a_time() {
    let mut c = client_with(caps(), key(3));
    let mut s = server_with(caps(), key(3));
    assert_eq!(pump(&mut c, &mut s, 1), (Ok(()), Ok(())));
    assert!(c.is_done() && s.is_done());
}

#[test]
fn overlapping_ranges_pick_the_highest_common_version() {
    // A future source speaking 1..=9 meets this destination (6..=6).
    let mut s = server_with(caps(), Authentication::None);
    let hello = hello_bytes(1, 9, &[CodecId::RAW, CodecId::ZERO, CodecId(0xf00d)]);
    assert_eq!(s.receive(&hello), Ok(hello.len()));
    let mut out = Vec::new();
    s.take_output(&mut out);
    let Frame::Welcome(w) = only_frame(&out) else {
        panic!("expected WELCOME")
    };
    assert_eq!(w.version, Version(6));
    // Unknown private codec dropped from the intersection.
    assert_eq!(w.codecs.to_vec(), [CodecId::RAW, CodecId::ZERO]);
}

#[test]
fn disjoint_ranges_fail_clearly_on_both_sides() {
    // A version-1 source (no channel affinity on the wire) meets this destination.
    let mut s = server_with(caps(), Authentication::None);
    let err = s.receive(&hello_bytes(1, 1, &[CodecId::RAW, CodecId::ZERO]));
    assert_eq!(
        err,
        Err(HandshakeError::VersionMismatch {
            ours_min: Version(6),
            ours_max: Version(6),
            theirs_min: Version(1),
            theirs_max: Version(1)
        })
    );
    let mut out = Vec::new();
    s.take_output(&mut out);
    let Frame::Reject(r) = only_frame(&out) else {
        panic!("expected REJECT")
    };
    assert_eq!(r.reason, RejectReason::UNSUPPORTED_VERSION);
    assert_eq!((r.version_min, r.version_max), (Version(6), Version(6)));
    assert!(r.message.contains("version"), "{}", r.message);
    // The failure is sticky.
    assert!(s.receive(&[0]).is_err());

    // A version-2 source (no COMMIT: a lost ACK COMPLETE lets both hosts run the guest)
    // is refused the same way, whether it speaks 2 only or 1..=2.
    // Versions 3, 4 and 5 were never released: refused too.
    for (min, max) in [
        (2, 2),
        (1, 2),
        (3, 3),
        (1, 3),
        (4, 4),
        (1, 4),
        (3, 4),
        (5, 5),
        (1, 5),
        (4, 5),
    ] {
        let mut s = server_with(caps(), Authentication::None);
        let err = s.receive(&hello_bytes(min, max, &[CodecId::RAW, CodecId::ZERO]));
        assert_eq!(
            err,
            Err(HandshakeError::VersionMismatch {
                ours_min: Version(6),
                ours_max: Version(6),
                theirs_min: Version(min),
                theirs_max: Version(max)
            })
        );
    }

    // This source meets a future destination that answers with its own REJECT.
    let mut c = client_with(caps(), Authentication::None);
    let mut reject = Vec::new();
    Frame::Reject(Reject {
        reason: RejectReason::UNSUPPORTED_VERSION,
        version_min: Version(7),
        version_max: Version(8),
        page_size: 4096,
        codecs: WireList::Slice(&[CodecId::RAW, CodecId::ZERO]),
        checksums: WireList::Slice(&[]),
        auth: WireList::Slice(&[]),
        message: "speaks 7..=8",
    })
    .encode(&mut reject)
    .unwrap();
    let e = c.receive(&reject).unwrap_err();
    assert_eq!(
        e,
        HandshakeError::Rejected {
            reason: RejectReason::UNSUPPORTED_VERSION,
            version_min: Version(7),
            version_max: Version(8),
            page_size: 4096
        }
    );
    assert!(e.to_string().contains("7..=8"), "{e}");
    assert_eq!(c.peer_message(), Some("speaks 7..=8"));
}

#[test]
fn welcome_with_a_version_not_offered_is_refused() {
    let mut c = client_with(caps(), Authentication::None);
    let mut out = Vec::new();
    Frame::Welcome(Welcome {
        version: Version(2),
        page_size: 4096,
        max_pages: 64,
        max_frame_bytes: 1 << 20,
        nonce: [0; NONCE_LEN],
        codecs: WireList::Slice(&[CodecId::RAW, CodecId::ZERO]),
        checksum: None,
        auth: None,
        proof: None,
    })
    .encode(&mut out)
    .unwrap();
    assert!(matches!(
        c.receive(&out),
        Err(HandshakeError::ProtocolError(_))
    ));
    assert!(c.has_output(), "a REJECT tells the destination why");
}

#[test]
fn codecs_missing_on_one_side_are_not_negotiated() {
    let mut cc = caps();
    cc.codecs = CodecSet::from_ids([CodecId::RAW, CodecId::ZERO, CodecId::ZSTD]).unwrap();
    let mut sc = caps();
    sc.codecs = CodecSet::from_ids([CodecId::RAW, CodecId::ZERO, CodecId::LZ4]).unwrap();
    let (c, _s, (cr, sr)) = handshake(cc, Authentication::None, sc, Authentication::None);
    assert_eq!((cr, sr), (Ok(()), Ok(())));
    let n = c.negotiated().unwrap();
    assert_eq!(n.codecs.as_slice(), &[CodecId::RAW, CodecId::ZERO]);
    // A zstd frame is then refused by the receiver.
    let payload = [1u8; 100];
    let runs = [PageRun {
        start: PageIndex(0),
        count: 1,
    }];
    let mut bytes = Vec::new();
    Frame::Pages(PageFrame {
        codec: CodecId::ZSTD,
        region: RegionId(0),
        round: Round(0),
        data_runs: WireList::Slice(&runs),
        zero_runs: WireList::Slice(&[]),
        uniform_runs: WireList::Slice(&[]),
        lengths: None,
        crc: None,
        payload: &payload,
    })
    .encode(&mut bytes)
    .unwrap();
    let mut dec = FrameDecoder::new(n.limits());
    assert_eq!(
        dec.decode(&bytes).map(|_| ()),
        Err(DecodeError::CodecNotNegotiated(CodecId::ZSTD))
    );
}

#[test]
fn no_raw_in_common_is_rejected() {
    let mut s = server_with(caps(), Authentication::None);
    assert_eq!(
        s.receive(&hello_bytes(6, 6, &[CodecId::ZSTD])),
        Err(HandshakeError::NoCommonCodec)
    );
    let mut out = Vec::new();
    s.take_output(&mut out);
    let Frame::Reject(r) = only_frame(&out) else {
        panic!()
    };
    assert_eq!(r.reason, RejectReason::NO_COMMON_CODEC);
    assert_eq!(r.codecs.to_vec(), CodecSet::all_known().as_slice());
}

#[test]
fn wrong_key_fails_on_both_sides() {
    let (c, s, (cr, sr)) = handshake(caps(), key(1), caps(), key(2));
    assert_eq!(cr, Err(HandshakeError::AuthFailed));
    assert!(matches!(
        sr,
        Err(HandshakeError::Rejected {
            reason: RejectReason::AUTH_FAILED,
            ..
        })
    ));
    assert!(c.negotiated().is_none() && s.negotiated().is_none());
}

#[test]
fn forged_source_proof_is_refused_before_any_page() {
    let mut c = client_with(caps(), key(1));
    let mut s = server_with(caps(), key(1));
    let mut wire = Vec::new();
    c.take_output(&mut wire);
    s.receive(&wire).unwrap();
    // The source never answers; an attacker replays a CONFIRM with a made-up proof.
    let mut forged = Vec::new();
    Frame::Confirm(Confirm {
        proof: Some([0xaa; NONCE_LEN]),
    })
    .encode(&mut forged)
    .unwrap();
    assert_eq!(s.receive(&forged), Err(HandshakeError::AuthFailed));
    assert!(!s.is_done() && s.negotiated().is_none());
    // A CONFIRM without any proof is refused too.
    let mut s = server_with(caps(), key(1));
    s.receive(&wire).unwrap();
    let mut bare = Vec::new();
    Frame::Confirm(Confirm { proof: None })
        .encode(&mut bare)
        .unwrap();
    assert_eq!(s.receive(&bare), Err(HandshakeError::AuthFailed));
}

#[test]
fn key_on_the_destination_only() {
    let (_c, _s, (cr, sr)) = handshake(caps(), Authentication::None, caps(), key(1));
    assert_eq!(sr, Err(HandshakeError::AuthRequired));
    assert!(matches!(
        cr,
        Err(HandshakeError::Rejected {
            reason: RejectReason::AUTH_REQUIRED,
            ..
        })
    ));
}

#[test]
fn key_on_the_source_only() {
    let (_c, s, (cr, sr)) = handshake(caps(), key(1), caps(), Authentication::None);
    assert_eq!(cr, Err(HandshakeError::PeerNotAuthenticated));
    assert!(matches!(
        sr,
        Err(HandshakeError::Rejected {
            reason: RejectReason::PEER_NOT_AUTHENTICATED,
            ..
        })
    ));
    assert!(!s.is_done(), "the destination never opened the channel");
}

/// A source configured to send one codec only (`ClientConfig::require`) refuses a
/// WELCOME without it in place of CONFIRM, and the destination learns why; with it,
/// the handshake completes as usual.
#[test]
fn a_source_that_sends_one_codec_refuses_a_welcome_without_it() {
    let client = |require| {
        ClientHandshake::new(
            ClientConfig {
                caps: caps(),
                session: SESSION,
                channel: ChannelId(0),
                channel_count: 1,
                auth: key(1),
                require,
            },
            [0xc1; NONCE_LEN],
        )
        .unwrap()
    };
    let zstd = CodecSet::from_ids([CodecId::ZSTD]).unwrap();
    let mut lacking = caps();
    lacking.codecs = CodecSet::from_ids([CodecId::RAW, CodecId::ZERO, CodecId::LZ4]).unwrap();
    let mut c = client(zstd);
    let mut s = server_with(lacking, key(1));
    let (cr, sr) = pump(&mut c, &mut s, usize::MAX);
    assert_eq!(cr, Err(HandshakeError::CodecRequired(CodecId::ZSTD)));
    assert!(
        matches!(
            sr,
            Err(HandshakeError::Rejected {
                reason: RejectReason::NO_COMMON_CODEC,
                ..
            })
        ),
        "{sr:?}"
    );
    let told = s.peer_message().unwrap_or_default();
    assert!(
        told.contains("zstd"),
        "the REJECT says which codec: {told:?}"
    );
    assert!(!s.is_done() && !c.is_done());

    let mut c = client(zstd);
    let mut s = server_with(caps(), key(1));
    assert_eq!(pump(&mut c, &mut s, usize::MAX), (Ok(()), Ok(())));
    assert!(c.negotiated().unwrap().codecs.contains(CodecId::ZSTD));
}

/// A source configured to send deflate takes a WELCOME that lists deflate-4k but not
/// deflate at 4 KiB pages, where every deflate stream is a deflate-4k one (PROTOCOL.md,
/// Codecs), and refuses it at larger pages, where a stream may reach back further.
#[test]
fn a_deflate_source_takes_a_deflate_4k_destination_at_4k_pages_only() {
    let deflate = CodecSet::from_ids([CodecId::DEFLATE]).unwrap();
    let only_4k = [CodecId::RAW, CodecId::ZERO, CodecId::DEFLATE_4K];
    for page_size in [4096, 8192] {
        let client_caps = Capabilities::new(page_size);
        let mut server_caps = client_caps;
        server_caps.codecs = CodecSet::from_ids(only_4k).unwrap();
        let mut c = ClientHandshake::new(
            ClientConfig {
                caps: client_caps,
                session: SESSION,
                channel: ChannelId(0),
                channel_count: 1,
                auth: key(1),
                require: deflate,
            },
            [0xc1; NONCE_LEN],
        )
        .unwrap();
        let mut s = server_with(server_caps, key(1));
        let (cr, _) = pump(&mut c, &mut s, usize::MAX);
        if page_size == 4096 {
            assert_eq!(cr, Ok(()));
            let codecs = c.negotiated().unwrap().codecs;
            assert_eq!(
                codecs.sendable_as(CodecId::DEFLATE, page_size),
                Some(CodecId::DEFLATE_4K)
            );
        } else {
            assert_eq!(cr, Err(HandshakeError::CodecRequired(CodecId::DEFLATE)));
            let codecs = CodecSet::from_ids(only_4k).unwrap();
            assert_eq!(codecs.sendable_as(CodecId::DEFLATE, page_size), None);
        }
    }
    // A destination that decodes deflate gets deflate.
    let both = CodecSet::from_ids([CodecId::DEFLATE, CodecId::DEFLATE_4K]).unwrap();
    assert_eq!(
        both.sendable_as(CodecId::DEFLATE, 4096),
        Some(CodecId::DEFLATE)
    );
    assert_eq!(both.sendable_as(CodecId::LZ4, 4096), None);
}

#[test]
fn page_size_session_and_channel_mismatches() {
    let (_, _, (cr, sr)) = handshake(
        Capabilities::new(65536),
        Authentication::None,
        caps(),
        Authentication::None,
    );
    assert_eq!(
        sr,
        Err(HandshakeError::PageSizeMismatch {
            ours: 4096,
            theirs: 65536
        })
    );
    assert!(matches!(
        cr,
        Err(HandshakeError::Rejected {
            reason: RejectReason::PAGE_SIZE_MISMATCH,
            ..
        })
    ));

    let mut s = ServerHandshake::new(
        ServerConfig {
            caps: caps(),
            session: Some(SessionId([1; 16])),
            auth: Authentication::None,
        },
        [0; NONCE_LEN],
    )
    .unwrap();
    assert_eq!(
        s.receive(&hello_bytes(6, 6, &[CodecId::RAW, CodecId::ZERO])),
        Err(HandshakeError::UnknownSession(SESSION))
    );

    let mut bad = hello_bytes(6, 6, &[CodecId::RAW, CodecId::ZERO]);
    // channel (offset 8 + 8 + 4 + 16) = 5 of channel_count 1.
    bad[36] = 5;
    let mut s = server_with(caps(), Authentication::None);
    assert!(matches!(
        s.receive(&bad),
        Err(HandshakeError::BadChannel { .. })
    ));
}

#[test]
fn truncated_handshake_waits_and_garbage_fails() {
    let mut c = client_with(caps(), Authentication::None);
    let mut s = server_with(caps(), Authentication::None);
    let mut hello = Vec::new();
    c.take_output(&mut hello);
    // Half a HELLO: consumed, no answer, no error, not done.
    let half = &hello[..hello.len() / 2];
    assert_eq!(s.receive(half), Ok(half.len()));
    assert!(!s.is_done() && !s.has_output());
    // The rest completes it.
    assert!(s.receive(&hello[hello.len() / 2..]).is_ok());
    assert!(s.has_output());

    // Something that is not pagewire at all.
    let mut s = server_with(caps(), Authentication::None);
    let e = s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
    assert!(matches!(e, HandshakeError::Decode(_)), "{e:?}");
    // A HELLO with the wrong magic.
    let mut s = server_with(caps(), Authentication::None);
    let mut bad = hello.clone();
    bad[8] = b'X';
    assert_eq!(
        s.receive(&bad),
        Err(HandshakeError::Decode(DecodeError::BadMagic))
    );
}

#[test]
fn bytes_after_the_handshake_stay_with_the_caller() {
    let mut c = client_with(caps(), Authentication::None);
    let mut s = server_with(caps(), Authentication::None);
    let mut wire = Vec::new();
    c.take_output(&mut wire);
    s.receive(&wire).unwrap();
    wire.clear();
    s.take_output(&mut wire);
    c.receive(&wire).unwrap();
    wire.clear();
    c.take_output(&mut wire);
    let confirm_len = wire.len();
    Frame::Complete(Complete {
        final_round: Round(0),
        sections: 0,
    })
    .encode(&mut wire)
    .unwrap();
    assert_eq!(s.receive(&wire), Ok(confirm_len));
    assert!(s.is_done());
    let mut dec = FrameDecoder::new(s.negotiated().unwrap().limits());
    let (_, f) = dec.decode(&wire[confirm_len..]).unwrap();
    assert!(matches!(f, Some(Frame::Complete(_))));
}

#[test]
fn configurations_are_checked() {
    let mut bad = caps();
    bad.codecs = CodecSet::from_ids([CodecId::ZSTD]).unwrap();
    assert!(matches!(
        ServerHandshake::new(
            ServerConfig {
                caps: bad,
                session: None,
                auth: Authentication::None
            },
            [0; NONCE_LEN]
        ),
        Err(HandshakeError::Config(_))
    ));
    assert!(SessionKey::new(vec![0; 8]).is_err());
    assert_eq!(
        format!("{:?}", SessionKey::new(vec![7; 16]).unwrap()),
        "SessionKey(<redacted>)"
    );
}

fn bound_pair(
    auth_c: Authentication,
    bind_c: Option<ChannelBinding>,
    auth_s: Authentication,
    bind_s: Option<ChannelBinding>,
) -> (ClientHandshake, ServerHandshake) {
    let c = ClientHandshake::with_binding(
        ClientConfig {
            caps: caps(),
            session: SESSION,
            channel: ChannelId(0),
            channel_count: 1,
            auth: auth_c,
            require: CodecSet::empty(),
        },
        [0xc1; NONCE_LEN],
        bind_c,
    )
    .unwrap();
    let s = ServerHandshake::with_binding(
        ServerConfig {
            caps: caps(),
            session: Some(SESSION),
            auth: auth_s,
        },
        [0x5e; NONCE_LEN],
        bind_s,
    )
    .unwrap();
    (c, s)
}

#[test]
fn tls_bound_keys_negotiate_the_exporter_method() {
    let b = Some(ChannelBinding([7; 32]));
    let (mut c, mut s) = bound_pair(key(1), b, key(1), b);
    let mut hello = Vec::new();
    c.take_output(&mut hello);
    let Frame::Hello(h) = only_frame(&hello) else {
        panic!("no HELLO")
    };
    assert_eq!(
        h.auth.iter().collect::<Vec<_>>(),
        [AuthMethod::HMAC_SHA256_TLS_EXPORTER]
    );
    s.receive(&hello).unwrap();
    let mut rest = Vec::new();
    s.take_output(&mut rest);
    c.receive(&rest).unwrap();
    rest.clear();
    c.take_output(&mut rest);
    s.receive(&rest).unwrap();
    assert!(s.is_done());
    assert_eq!(
        s.negotiated().unwrap().auth,
        Some(AuthMethod::HMAC_SHA256_TLS_EXPORTER)
    );
    // Without a key, the binding adds no method: certificates authenticate.
    let (mut c, mut s) = bound_pair(Authentication::None, b, Authentication::None, b);
    assert_eq!(pump(&mut c, &mut s, 1000), (Ok(()), Ok(())));
    assert_eq!(s.negotiated().unwrap().auth, None);
}

#[test]
fn a_spliced_relay_fails_the_proofs() {
    // Same key, but each end saw a different TLS session (a relay terminating both):
    // the exporters differ and the destination's proof does not verify at the source.
    let (mut c, mut s) = bound_pair(
        key(1),
        Some(ChannelBinding([1; 32])),
        key(1),
        Some(ChannelBinding([2; 32])),
    );
    let (cr, _) = pump(&mut c, &mut s, 1000);
    assert_eq!(cr, Err(HandshakeError::AuthFailed));
    assert!(!s.is_done());
}

#[test]
fn a_bound_side_refuses_an_unbound_keyed_peer() {
    // A keyed destination inside TLS requires the exporter method.
    let b = Some(ChannelBinding([3; 32]));
    let (mut c, mut s) = bound_pair(key(1), None, key(1), b);
    let (cr, sr) = pump(&mut c, &mut s, 1000);
    assert_eq!(sr, Err(HandshakeError::AuthRequired));
    assert!(matches!(
        cr,
        Err(HandshakeError::Rejected {
            reason: RejectReason::AUTH_REQUIRED,
            ..
        })
    ));
    // A bound source does not accept a plain method either.
    let (mut c, mut s) = bound_pair(key(1), b, key(1), None);
    let (_, sr) = pump(&mut c, &mut s, 1000);
    assert_eq!(sr, Err(HandshakeError::AuthRequired));
}

#[test]
fn encryption_rejects_decode_with_their_reason() {
    for reason in [
        RejectReason::ENCRYPTION_REQUIRED,
        RejectReason::ENCRYPTION_UNSUPPORTED,
    ] {
        let mut out = Vec::new();
        encode_reject(&caps(), &key(1), true, reason, "say why", &mut out);
        let Frame::Reject(r) = only_frame(&out) else {
            panic!("no REJECT")
        };
        assert_eq!((r.reason, r.message), (reason, "say why"));
        assert_eq!(
            r.auth.iter().collect::<Vec<_>>(),
            [AuthMethod::HMAC_SHA256_TLS_EXPORTER]
        );
        // The source's handshake reports it as a refusal with that reason.
        let mut c = client_with(caps(), key(1));
        assert!(matches!(
            c.receive(&out),
            Err(HandshakeError::Rejected { reason: r, .. }) if r == reason
        ));
    }
}

#[test]
fn a_held_ready_waits_for_admission_and_a_refusal_reaches_the_source() {
    for admit in [true, false] {
        let mut c = client_with(caps(), key(7));
        let mut s = server_with(caps(), key(7)).hold_ready();
        let (cr, sr) = pump(&mut c, &mut s, usize::MAX);
        assert_eq!((cr, sr), (Ok(()), Ok(())));
        // CONFIRM verified, READY not sent: neither side is done.
        assert!(!s.is_done() && !c.is_done() && !s.has_output());
        let n = *s.confirmed().expect("confirmed, READY held");
        assert_eq!((n.channel, n.channel_count), (ChannelId(1), 2));
        assert_eq!(s.receive(b"pages after CONFIRM").unwrap(), 0);
        if admit {
            s.admit();
            assert!(s.is_done() && s.confirmed().is_none());
            assert_eq!(s.negotiated(), Some(&n));
            assert_eq!(pump(&mut c, &mut s, 1), (Ok(()), Ok(())));
            assert!(c.is_done());
            assert_eq!(c.negotiated(), Some(&n));
        } else {
            let e = s.refuse(HandshakeError::ChannelRefused {
                channel: 1,
                count: 2,
                why: "another channel of the session holds that index",
            });
            assert!(!s.is_done() && s.confirmed().is_none() && s.negotiated().is_none());
            assert_eq!(s.receive(&[]), Err(e));
            let (cr, _) = pump(&mut c, &mut s, 3);
            assert!(
                matches!(
                    cr,
                    Err(HandshakeError::Rejected {
                        reason: RejectReason::BAD_CHANNEL,
                        ..
                    })
                ),
                "{cr:?}"
            );
            assert!(!c.is_done() && c.negotiated().is_none());
            let m = c.peer_message().unwrap();
            assert!(m.contains("channel 1 of 2 refused: another channel"), "{m}");
        }
    }
}

#[test]
fn admit_and_refuse_do_nothing_before_confirm() {
    let mut s = server_with(caps(), Authentication::None).hold_ready();
    s.admit();
    assert!(!s.is_done() && !s.has_output());
    let e = HandshakeError::ChannelRefused {
        channel: 0,
        count: 1,
        why: "test",
    };
    assert_eq!(s.refuse(e), e);
    assert!(!s.has_output());
    // Unchanged: the handshake still completes.
    let mut c = client_with(caps(), Authentication::None);
    assert_eq!(pump(&mut c, &mut s, 5), (Ok(()), Ok(())));
    s.admit();
    assert_eq!(pump(&mut c, &mut s, 5), (Ok(()), Ok(())));
    assert!(c.is_done() && s.is_done());
}

#[test]
fn a_source_with_a_key_tags_its_hello_nonce() {
    // The test vector of PROTOCOL.md ("HELLO key tag").
    let k = SessionKey::new(*b"a pre-shared key of 32 bytes....").unwrap();
    let random: [u8; 16] = core::array::from_fn(|i| i as u8);
    let mut nonce = [0xee; NONCE_LEN];
    nonce[..16].copy_from_slice(&random);
    let session = SessionId(*b"pagewire-vmm-v01");
    let tagged = k.tag_hello_nonce(session, ChannelId(1), 2, nonce);
    assert_eq!(tagged[..16], random);
    let hex: String = tagged[16..].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "d02015fa1b89b5bff1b9542527430b64");

    // ClientHandshake tags its HELLO with its key; the tag verifies with that key
    // only, for that session, channel and count only; a source without a key sends
    // its nonce as it was given.
    for (auth, tagged) in [(key(7), true), (Authentication::None, false)] {
        let mut c = client_with(caps(), auth);
        let mut wire = Vec::new();
        c.take_output(&mut wire);
        let Frame::Hello(h) = only_frame(&wire) else {
            panic!("not a HELLO");
        };
        let Authentication::PreSharedKey(k7) = key(7) else {
            unreachable!()
        };
        let Authentication::PreSharedKey(k8) = key(8) else {
            unreachable!()
        };
        assert_eq!(k7.tags_hello(&h), tagged);
        assert!(!k8.tags_hello(&h));
        if tagged {
            assert_eq!(h.nonce[..16], [0xc1; 16]);
            let other = Hello {
                channel: ChannelId(0),
                ..h
            };
            assert!(!k7.tags_hello(&other));
        } else {
            assert_eq!(h.nonce, [0xc1; NONCE_LEN]);
        }
    }
    // And the handshake still completes with it.
    let (c, s, (cr, sr)) = handshake(caps(), key(7), caps(), key(7));
    assert!(cr.is_ok() && sr.is_ok() && c.is_done() && s.is_done());
}
