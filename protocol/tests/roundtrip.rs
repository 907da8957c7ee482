//! Round-trip property tests for every frame type, through the stream decoder in
//! random splits, plus the fuzz entry points replayed on random input.

use pagewire_protocol::frame::{Confirm, Hello, Welcome};
use pagewire_protocol::*;
use proptest::collection::vec;
use proptest::prelude::*;

/// Everything a frame borrows, owned, so strategies can produce it.
#[derive(Clone, Debug)]
enum Owned {
    Hello {
        v: (u16, u16),
        session: [u8; 16],
        ch: (u16, u16),
        nums: (u32, u32, u32),
        nonce: [u8; 32],
        codecs: Vec<CodecId>,
        sums: Vec<ChecksumId>,
        auth: Vec<AuthMethod>,
    },
    Welcome {
        version: u16,
        nums: (u32, u32, u32),
        nonce: [u8; 32],
        codecs: Vec<CodecId>,
        checksum: Option<u8>,
        proof: Option<(u8, [u8; 32])>,
    },
    Reject {
        reason: u16,
        v: (u16, u16),
        page_size: u32,
        codecs: Vec<CodecId>,
        sums: Vec<ChecksumId>,
        auth: Vec<AuthMethod>,
        message: String,
    },
    Confirm(Option<[u8; 32]>),
    Ready,
    Layout(u32, Vec<RegionDesc>),
    Pages {
        codec: CodecId,
        region: u32,
        round: u32,
        data: Vec<PageRun>,
        zero: Vec<PageRun>,
        uniform: Vec<UniformRun>,
        lengths: Option<Vec<u32>>,
        crc: bool,
        payload: Vec<u8>,
    },
    Copy {
        region: u32,
        round: u32,
        round_end: bool,
        runs: Vec<CopyRun>,
        crc: bool,
    },
    EndOfRound(u32, u32, u64),
    Ack(u8, u64),
    DeviceState {
        instance: u32,
        name: String,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Complete(u32, u32),
    Commit(u32),
    Abort(u16, String),
    Extension(u8, u8, Vec<u8>),
}

impl Owned {
    fn frame(&self) -> Frame<'_> {
        match self {
            Owned::Hello {
                v,
                session,
                ch,
                nums,
                nonce,
                codecs,
                sums,
                auth,
            } => Frame::Hello(Hello {
                version_min: Version(v.0),
                version_max: Version(v.1),
                session: SessionId(*session),
                channel: ChannelId(ch.0),
                channel_count: ch.1,
                page_size: nums.0,
                max_pages: nums.1,
                max_frame_bytes: nums.2,
                nonce: *nonce,
                codecs: WireList::Slice(codecs),
                checksums: WireList::Slice(sums),
                auth: WireList::Slice(auth),
            }),
            Owned::Welcome {
                version,
                nums,
                nonce,
                codecs,
                checksum,
                proof,
            } => Frame::Welcome(Welcome {
                version: Version(*version),
                page_size: nums.0,
                max_pages: nums.1,
                max_frame_bytes: nums.2,
                nonce: *nonce,
                codecs: WireList::Slice(codecs),
                checksum: checksum.map(ChecksumId),
                auth: proof.map(|p| AuthMethod(p.0)),
                proof: proof.map(|p| p.1),
            }),
            Owned::Reject {
                reason,
                v,
                page_size,
                codecs,
                sums,
                auth,
                message,
            } => Frame::Reject(Reject {
                reason: RejectReason(*reason),
                version_min: Version(v.0),
                version_max: Version(v.1),
                page_size: *page_size,
                codecs: WireList::Slice(codecs),
                checksums: WireList::Slice(sums),
                auth: WireList::Slice(auth),
                message,
            }),
            Owned::Confirm(proof) => Frame::Confirm(Confirm { proof: *proof }),
            Owned::Ready => Frame::Ready,
            Owned::Layout(chunk, regions) => Frame::Layout(LayoutFrame {
                chunk_pages: *chunk,
                regions: WireList::Slice(regions),
            }),
            Owned::Pages {
                codec,
                region,
                round,
                data,
                zero,
                uniform,
                lengths,
                crc,
                payload,
            } => {
                let mut f = PageFrame {
                    codec: *codec,
                    region: RegionId(*region),
                    round: Round(*round),
                    data_runs: WireList::Slice(data),
                    zero_runs: WireList::Slice(zero),
                    uniform_runs: WireList::Slice(uniform),
                    lengths: lengths.as_deref().map(WireList::Slice),
                    crc: crc.then_some(0),
                    payload,
                };
                if *crc {
                    // The whole frame but the crc field, the last 4 bytes of the header.
                    let mut bytes = Vec::new();
                    Frame::Pages(f).encode(&mut bytes).unwrap();
                    let hl = f.header_len();
                    f.crc = Some(crc32c_of(&[&bytes[..hl - 4], &bytes[hl..]].concat()));
                }
                Frame::Pages(f)
            }
            Owned::Copy {
                region,
                round,
                round_end,
                runs,
                crc,
            } => {
                let mut f = CopyFrame {
                    region: RegionId(*region),
                    round: Round(*round),
                    round_end: *round_end,
                    runs: WireList::Slice(runs),
                    crc: crc.then_some(0),
                };
                if *crc {
                    // The whole frame but the crc field, its last 4 bytes.
                    let mut bytes = Vec::new();
                    Frame::Copy(f).encode(&mut bytes).unwrap();
                    f.crc = Some(crc32c_of(&bytes[..bytes.len() - 4]));
                    assert_eq!(f.with_crc().unwrap(), f);
                }
                Frame::Copy(f)
            }
            Owned::EndOfRound(r, f, p) => Frame::EndOfRound(EndOfRound {
                round: Round(*r),
                frames: *f,
                pages: *p,
            }),
            Owned::Ack(k, v) => Frame::Ack(Ack {
                kind: AckKind(*k),
                value: *v,
            }),
            Owned::DeviceState {
                instance,
                name,
                total,
                offset,
                data,
            } => Frame::DeviceState(DeviceState {
                instance: *instance,
                name,
                total: *total,
                offset: *offset,
                data,
            }),
            Owned::Complete(r, s) => Frame::Complete(Complete {
                final_round: Round(*r),
                sections: *s,
            }),
            Owned::Commit(r) => Frame::Commit(Commit {
                final_round: Round(*r),
            }),
            Owned::Abort(r, m) => Frame::Abort(Abort {
                reason: AbortReason(*r),
                message: m,
            }),
            Owned::Extension(t, f, b) => Frame::Extension {
                frame_type: FrameType(*t),
                flags: *f,
                body: b,
            },
        }
    }

    fn limits(&self) -> Limits {
        let handshake = matches!(
            self,
            Owned::Hello { .. }
                | Owned::Welcome { .. }
                | Owned::Reject { .. }
                | Owned::Confirm(_)
                | Owned::Ready
        );
        pagewire_protocol::fuzzing::limits(u8::from(handshake) | (u8::from(self.crc()) << 1))
    }

    fn crc(&self) -> bool {
        matches!(
            self,
            Owned::Pages { crc: true, .. } | Owned::Copy { crc: true, .. }
        )
    }
}

fn crc32c_of(bytes: &[u8]) -> u32 {
    // Bitwise CRC32C, independent of the crate the decoder uses.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn codec_id() -> impl Strategy<Value = CodecId> {
    any::<u16>().prop_map(CodecId)
}

fn utf8(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("\\PC{{0,{max_chars}}}")).unwrap()
}

fn handshake_frames() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (
            any::<(u16, u16)>(),
            any::<[u8; 16]>(),
            any::<(u16, u16)>(),
            any::<(u32, u32, u32)>(),
            any::<[u8; 32]>(),
            vec(codec_id(), 0..40),
            vec(any::<u8>().prop_map(ChecksumId), 0..4),
            vec(any::<u8>().prop_map(AuthMethod), 0..4),
        )
            .prop_map(|(v, session, ch, nums, nonce, codecs, sums, auth)| {
                Owned::Hello {
                    v,
                    session,
                    ch,
                    nums,
                    nonce,
                    codecs,
                    sums,
                    auth,
                }
            }),
        (
            any::<u16>(),
            any::<(u32, u32, u32)>(),
            any::<[u8; 32]>(),
            vec(codec_id(), 0..40),
            proptest::option::of(1u8..),
            proptest::option::of((1u8.., any::<[u8; 32]>())),
        )
            .prop_map(|(version, nums, nonce, codecs, checksum, proof)| {
                Owned::Welcome {
                    version,
                    nums,
                    nonce,
                    codecs,
                    checksum,
                    proof,
                }
            }),
        (
            any::<u16>(),
            any::<(u16, u16)>(),
            any::<u32>(),
            vec(codec_id(), 0..10),
            vec(any::<u8>().prop_map(ChecksumId), 0..4),
            vec(any::<u8>().prop_map(AuthMethod), 0..4),
            utf8(60),
        )
            .prop_map(|(reason, v, page_size, codecs, sums, auth, message)| {
                Owned::Reject {
                    reason,
                    v,
                    page_size,
                    codecs,
                    sums,
                    auth,
                    message,
                }
            }),
        proptest::option::of(any::<[u8; 32]>()).prop_map(Owned::Confirm),
        Just(Owned::Ready),
    ]
}

fn region() -> impl Strategy<Value = RegionDesc> {
    (any::<u32>(), 12u32..31, 0u64..(1 << 40), 1u64..(1 << 20)).prop_map(
        |(id, shift, addr_pages, len_pages)| RegionDesc {
            id: RegionId(id),
            backing_page_size: 1 << shift,
            guest_addr: GuestAddr(addr_pages * 4096),
            length: len_pages * 4096,
        },
    )
}

/// A canonical pages frame: runs separated by gaps, each run data, zero or uniform, a codec
/// and payload that fit the layout rules.
fn pages_frame() -> impl Strategy<Value = Owned> {
    (
        vec((1u64..1000, 1u32..20, 0u8..3, 1u8..), 1..12),
        any::<u64>(),
        0usize..6,
        any::<(u32, u32, bool)>(),
        any::<u64>(),
    )
        .prop_map(|(runs, base, pick, (region, round, crc), seed)| {
            let mut next = base % (1 << 50);
            let (mut data, mut zero, mut uniform) = (Vec::new(), Vec::new(), Vec::new());
            for (gap, count, kind, byte) in runs {
                next += gap;
                let run = PageRun {
                    start: PageIndex(next),
                    count,
                };
                next += u64::from(count);
                match kind {
                    0 => data.push(run),
                    1 => zero.push(run),
                    _ => uniform.push(UniformRun { run, byte }),
                }
            }
            let data_pages: u32 = data.iter().map(|r| r.count).sum();
            let mut rng = seed;
            let mut rand = move |m: u64| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (rng >> 33) % m
            };
            let bytes = |n: usize, rand: &mut dyn FnMut(u64) -> u64| {
                (0..n).map(|_| rand(256) as u8).collect::<Vec<u8>>()
            };
            let codecs = [
                CodecId::RAW,
                CodecId::ZSTD,
                CodecId::LZ4,
                CodecId::DEFLATE,
                CodecId::DELTA,
                fuzzing::PRIVATE_CODEC,
            ];
            let (codec, lengths, payload) = if data_pages == 0 {
                (CodecId::ZERO, None, Vec::new())
            } else {
                let codec = codecs[pick];
                let per_page = match payload_layout(codec) {
                    Some(PayloadLayout::PerPage) => true,
                    Some(_) => false,
                    None => rand(2) == 1,
                };
                if per_page {
                    let min = u64::from(codec != CodecId::DELTA);
                    let lengths: Vec<u32> = (0..data_pages)
                        .map(|_| match rand(4) {
                            0 => 4096,
                            _ => (min + rand(300)) as u32,
                        })
                        .collect();
                    let total: u32 = lengths.iter().sum();
                    (codec, Some(lengths), bytes(total as usize, &mut rand))
                } else if codec == CodecId::RAW {
                    (codec, None, bytes(data_pages as usize * 4096, &mut rand))
                } else {
                    let n = 1 + rand(u64::from(data_pages) * 4096) as usize;
                    (codec, None, bytes(n.min(5000), &mut rand))
                }
            };
            Owned::Pages {
                codec,
                region,
                round,
                data,
                zero,
                uniform,
                lengths,
                crc,
                payload,
            }
        })
}

/// A canonical COPY frame: targets ascending with gaps (or touching where the sources do
/// not continue), sources below the first target or past the last one, so no source page
/// is a target page; within the fuzz limits' 256 pages; with or without ROUND_END.
fn copy_frame() -> impl Strategy<Value = Owned> {
    (
        vec((0u64..1000, 1u32..20, any::<bool>(), 0u64..1 << 20), 1..12),
        0u64..1 << 50,
        any::<(u32, u32, bool, bool)>(),
    )
        .prop_map(|(spec, base, (region, round, round_end, crc))| {
            let mut next = base + (1 << 21);
            let mut runs: Vec<CopyRun> = Vec::new();
            for (gap, count, low, offset) in spec {
                let start = next + gap;
                next = start + u64::from(count);
                // Low sources lie below `base + 2^21`, the first target; high ones past
                // 2^51 + 2^22, beyond the last.
                let mut from = match low {
                    true => base + offset,
                    false => (1 << 51) + (1 << 22) + offset,
                };
                if let Some(p) = runs.last()
                    && p.start.0 + u64::from(p.count) == start
                    && p.from.0 + u64::from(p.count) == from
                {
                    from += 1;
                }
                runs.push(CopyRun {
                    start: PageIndex(start),
                    count,
                    from: PageIndex(from),
                });
            }
            Owned::Copy {
                region,
                round,
                round_end,
                runs,
                crc,
            }
        })
}

fn session_frames() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (1u32.., vec(region(), 0..20)).prop_map(|(c, r)| Owned::Layout(c, r)),
        pages_frame(),
        copy_frame(),
        any::<(u32, u32, u64)>().prop_map(|(r, f, p)| Owned::EndOfRound(r, f, p)),
        any::<(u8, u64)>().prop_map(|(k, v)| Owned::Ack(k, v)),
        (
            any::<u32>(),
            utf8(60).prop_filter("non-empty", |s| !s.is_empty()),
            vec(any::<u8>(), 0..300),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(instance, name, data, pad_before, pad_after)| {
                let offset = u64::from(pad_before);
                let total = offset + data.len() as u64 + u64::from(pad_after);
                Owned::DeviceState {
                    instance,
                    name,
                    total,
                    offset,
                    data,
                }
            }),
        any::<(u32, u32)>().prop_map(|(r, s)| Owned::Complete(r, s)),
        any::<u32>().prop_map(Owned::Commit),
        (any::<u16>(), utf8(60)).prop_map(|(r, m)| Owned::Abort(r, m)),
        (0x80u8.., any::<u8>(), vec(any::<u8>(), 0..100))
            .prop_map(|(t, f, b)| Owned::Extension(t, f, b)),
    ]
}

fn check_round_trip(owned: &Owned, split: usize) -> Result<(), TestCaseError> {
    let frame = owned.frame();
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).unwrap();
    let mut dec = FrameDecoder::new(owned.limits());
    let mut got = None;
    let mut buffered_copy = Vec::new();
    for chunk in bytes.chunks(split.max(1)) {
        let (used, f) = dec
            .decode(chunk)
            .map_err(|e| TestCaseError::fail(format!("{e} decoding {frame:?}")))?;
        prop_assert_eq!(used, chunk.len());
        if let Some(f) = f {
            prop_assert_eq!(f, frame);
            f.encode(&mut buffered_copy).unwrap();
            got = Some(());
        }
    }
    prop_assert!(got.is_some(), "no frame decoded");
    prop_assert_eq!(&buffered_copy, &bytes);
    // A PAGES header decodes the same apart from its payload.
    if let Frame::Pages(p) = frame {
        let hlen = p.header_len();
        let head = PageFrame::decode_header(
            bytes[1],
            &bytes[Envelope::LEN..hlen],
            p.payload.len(),
            &owned.limits(),
        )
        .map_err(|e| TestCaseError::fail(format!("{e} decoding the header of {p:?}")))?;
        prop_assert_eq!(head, PageFrame { payload: &[], ..p });
        if p.lengths.is_none() {
            prop_assert_eq!(
                PageFrame::header_len_from_prefix(bytes[1], &bytes),
                Some(hlen)
            );
        }
        // A payload length that disagrees with the header is refused (where the
        // header fixes it: raw, zero, per-page tables).
        let exact = p.lengths.is_some() || p.codec == CodecId::RAW || p.codec == CodecId::ZERO;
        prop_assert!(
            !exact
                || PageFrame::decode_header(
                    bytes[1],
                    &bytes[Envelope::LEN..hlen],
                    p.payload.len() + 1,
                    &owned.limits()
                )
                .is_err()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn handshake_frames_round_trip(owned in handshake_frames(), split in 1usize..64) {
        check_round_trip(&owned, split)?;
    }

    #[test]
    fn session_frames_round_trip(owned in session_frames(), split in prop_oneof![1usize..64, Just(usize::MAX)]) {
        check_round_trip(&owned, split)?;
    }

    #[test]
    fn fuzz_entry_points_hold_on_random_bytes(data in vec(any::<u8>(), 0..600)) {
        fuzzing::frame_roundtrip(&data);
        fuzzing::stream_chunks(&data);
        fuzzing::handshake(&data);
    }

    #[test]
    fn fuzz_entry_points_hold_on_mutated_frames(owned in session_frames(), flips in vec((any::<usize>(), any::<u8>()), 0..4), k in 0u8..16) {
        let mut bytes = Vec::new();
        owned.frame().encode(&mut bytes).unwrap();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        let crc = u8::from(owned.crc()) << 1;
        let mut input = vec![crc];
        input.extend_from_slice(&bytes);
        fuzzing::frame_roundtrip(&input);
        let mut chunked = vec![crc, k, 3, 1, 7];
        chunked.extend_from_slice(&bytes);
        chunked.extend_from_slice(&bytes);
        fuzzing::stream_chunks(&chunked);
    }
}
