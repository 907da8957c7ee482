//! One conformance suite, run against every codec through every subject: the codecs
//! called directly, the engine inline, and the engine on worker threads.

mod common;

use common::{Encoded, KINDS, Kind, PS, Rng, Subject, content, subjects};
use pagewire_accel::{CodecError, EncodeParams, Level};
use pagewire_protocol::CodecId;

/// Compressing formats and levels under test.
fn compressors(pages: usize) -> Vec<EncodeParams> {
    let mut v = vec![
        EncodeParams::new(CodecId::ZSTD, Level(-5)),
        EncodeParams::new(CodecId::ZSTD, Level(3)),
        EncodeParams::new(CodecId::LZ4, Level::DEFAULT),
        EncodeParams::new(CodecId::DEFLATE, Level(1)),
        EncodeParams::new(CodecId::DEFLATE, Level::DEFAULT),
        EncodeParams::new(CodecId::DEFLATE_4K, Level::DEFAULT),
    ];
    if pages <= 4 {
        v.push(EncodeParams::new(CodecId::ZSTD, Level(19)));
        v.push(EncodeParams::new(CodecId::DEFLATE, Level(12)));
    }
    v
}

/// The layout rules of PROTOCOL.md for an encoded frame of `input`.
fn check_frame(s: &dyn Subject, requested: CodecId, input: &[u8], e: &Encoded) {
    let ctx = format!("{} {requested}", s.name());
    assert!(
        e.codec == requested || e.codec == CodecId::RAW,
        "{ctx}: used {}",
        e.codec
    );
    assert!(
        e.payload.len() <= input.len(),
        "{ctx}: payload longer than its pages"
    );
    match e.codec {
        CodecId::RAW => {
            assert_eq!(e.payload, input, "{ctx}: raw payload is not the pages");
            assert!(e.lengths.is_empty(), "{ctx}: raw has no table");
        }
        CodecId::DEFLATE | CodecId::DEFLATE_4K | CodecId::DELTA => {
            assert_eq!(
                e.lengths.len(),
                input.len() / PS,
                "{ctx}: one entry per page"
            );
            let sum: u64 = e.lengths.iter().map(|&l| u64::from(l)).sum();
            assert_eq!(
                sum,
                e.payload.len() as u64,
                "{ctx}: entries sum to the payload"
            );
            for (i, &l) in e.lengths.iter().enumerate() {
                assert!(l as usize <= PS, "{ctx}: entry {i}");
                assert!(
                    l > 0 || e.codec == CodecId::DELTA,
                    "{ctx}: zero entry outside delta"
                );
                if l as usize == PS {
                    assert_eq!(
                        &e.payload[e.lengths[..i].iter().map(|&l| l as usize).sum::<usize>()..]
                            [..PS],
                        &input[i * PS..(i + 1) * PS],
                        "{ctx}: raw entry {i} is not the page"
                    );
                }
            }
            assert!(
                e.payload.len() < input.len(),
                "{ctx}: a per-page frame that did not shrink must be raw"
            );
        }
        _ => {
            assert!(e.lengths.is_empty(), "{ctx}: block formats have no table");
            assert!(
                e.payload.len() < input.len(),
                "{ctx}: a block that did not shrink must be raw"
            );
        }
    }
}

fn round_trip(s: &mut dyn Subject, params: EncodeParams, input: &[u8], split: bool) -> Encoded {
    let e = s
        .encode(params, input, 0, split)
        .unwrap_or_else(|err| panic!("{} {params:?}: encode: {err}", s.name()));
    check_frame(s, params.codec, input, &e);
    let mut back = vec![0x5au8; input.len()];
    s.decode(e.codec, &e.payload, &e.lengths, &mut back, split)
        .unwrap_or_else(|err| panic!("{} {params:?}: decode: {err}", s.name()));
    assert!(
        back == input,
        "{} {params:?} split={split}: round trip differs",
        s.name()
    );
    e
}

#[test]
fn every_kind_of_content_round_trips() {
    for mut s in subjects() {
        for (seed, kind) in KINDS.into_iter().enumerate() {
            for pages in [1usize, 3, 32] {
                let input = content(kind, pages, seed as u64);
                for params in compressors(pages)
                    .into_iter()
                    .chain([EncodeParams::new(CodecId::RAW, Level::DEFAULT)])
                {
                    for split in [false, true] {
                        let e = round_trip(s.as_mut(), params, &input, split);
                        if params.codec != CodecId::RAW
                            && matches!(kind, Kind::Zeros | Kind::Repeated | Kind::Text)
                        {
                            assert_eq!(
                                e.codec,
                                params.codec,
                                "{} {kind:?} {params:?} did not compress",
                                s.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn incompressible_frames_go_raw() {
    for mut s in subjects() {
        let input = content(Kind::Random, 8, 7);
        for params in compressors(8) {
            let e = round_trip(s.as_mut(), params, &input, false);
            assert_eq!(e.codec, CodecId::RAW, "{} {params:?}", s.name());
            let in_place = EncodeParams {
                raw_in_place: true,
                ..params
            };
            let e = s.encode(in_place, &input, 0, false).expect("encode");
            assert_eq!(e.codec, CodecId::RAW);
            // Block formats skip the copy; per-page formats built the payload page
            // by page and keep it.
            if matches!(params.codec, CodecId::ZSTD | CodecId::LZ4) {
                assert!(
                    e.in_place && e.payload.is_empty(),
                    "{} {params:?}",
                    s.name()
                );
            } else {
                assert!(!e.in_place && e.payload == input, "{} {params:?}", s.name());
            }
        }
        let e = s.encode(
            EncodeParams {
                raw_in_place: true,
                ..EncodeParams::new(CodecId::RAW, Level::DEFAULT)
            },
            &input,
            0,
            false,
        );
        assert!(e.expect("raw").in_place);
    }
}

#[test]
fn a_mostly_random_frame_keeps_its_compressible_pages() {
    for mut s in subjects() {
        let mut input = content(Kind::Random, 4, 3);
        input[PS..2 * PS].copy_from_slice(&content(Kind::Text, 1, 4));
        let e = round_trip(
            s.as_mut(),
            EncodeParams::new(CodecId::DEFLATE, Level::DEFAULT),
            &input,
            true,
        );
        assert_eq!(e.codec, CodecId::DEFLATE);
        assert_eq!(e.lengths[0] as usize, PS);
        assert!((e.lengths[1] as usize) < PS);
        assert_eq!(e.lengths[2] as usize, PS);
    }
}

#[test]
fn zero_frames_carry_nothing_and_decode_to_zeros() {
    for mut s in subjects() {
        let zeros = vec![0u8; 5 * PS];
        let e = s
            .encode(
                EncodeParams::new(CodecId::ZERO, Level::DEFAULT),
                &zeros,
                0,
                true,
            )
            .expect("encode");
        assert_eq!(e.codec, CodecId::ZERO);
        assert!(e.payload.is_empty() && e.lengths.is_empty());
        let mut dst = content(Kind::Random, 5, 1);
        s.decode(CodecId::ZERO, &[], &[], &mut dst, true)
            .expect("decode");
        assert!(dst.iter().all(|&b| b == 0), "{}", s.name());
        // Not all zeros: sent raw.
        let mut one = zeros.clone();
        one[3 * PS + 17] = 9;
        let e = round_trip(
            s.as_mut(),
            EncodeParams::new(CodecId::ZERO, Level::DEFAULT),
            &one,
            false,
        );
        assert_eq!(e.codec, CodecId::RAW);
        // A zero frame with a payload is corrupt.
        let r = s.decode(CodecId::ZERO, &[0], &[], &mut dst, false);
        assert!(
            matches!(r, Err(CodecError::Corrupt { .. })),
            "{}: {r:?}",
            s.name()
        );
    }
}

#[test]
fn delta_sends_changes_against_the_last_version() {
    for mut s in subjects() {
        for (seed, kind) in KINDS.into_iter().enumerate() {
            let pages = 4;
            let key = 1000 * seed as u64;
            let params = EncodeParams::new(CodecId::DELTA, Level::DEFAULT);
            let v1 = content(kind, pages, seed as u64);
            // First sight: cache misses, pages go raw.
            let e1 = s.encode(params, &v1, key, false).expect("encode v1");
            assert_eq!(e1.codec, CodecId::RAW, "{} {kind:?}", s.name());
            let mut held = vec![0u8; v1.len()];
            s.decode(e1.codec, &e1.payload, &e1.lengths, &mut held, false)
                .expect("decode v1");
            assert_eq!(held, v1);
            // A few bytes change in every page.
            let mut v2 = v1.clone();
            let mut rng = Rng::new(seed as u64 + 99);
            for p in 0..pages {
                for _ in 0..5 {
                    let i = p * PS + rng.below(PS);
                    v2[i] = v2[i].wrapping_add(1 + rng.below(200) as u8);
                }
            }
            let e2 = s
                .encode(params, &v2, key, seed % 2 == 0)
                .expect("encode v2");
            check_frame(s.as_ref(), CodecId::DELTA, &v2, &e2);
            assert_eq!(e2.codec, CodecId::DELTA, "{} {kind:?}", s.name());
            assert!(
                e2.payload.len() < 20 * pages * 3,
                "{} {kind:?}: delta of {} bytes",
                s.name(),
                e2.payload.len()
            );
            s.decode(e2.codec, &e2.payload, &e2.lengths, &mut held, seed % 2 == 1)
                .expect("decode v2");
            assert!(held == v2, "{} {kind:?}: delta applied wrongly", s.name());
            // Unchanged: all entries 0, empty payload.
            let e3 = s.encode(params, &v2, key, false).expect("encode v3");
            assert_eq!((e3.codec, e3.payload.len()), (CodecId::DELTA, 0));
            assert_eq!(e3.lengths, vec![0; pages]);
            s.decode(e3.codec, &e3.payload, &e3.lengths, &mut held, false)
                .expect("decode v3");
            assert!(held == v2);
            // Page 1 rewritten completely: overflow, that page raw, others unchanged.
            let mut v4 = v2.clone();
            Rng::new(5).fill(&mut v4[PS..2 * PS]);
            let e4 = s.encode(params, &v4, key, false).expect("encode v4");
            assert_eq!(e4.codec, CodecId::DELTA);
            assert_eq!(e4.lengths, vec![0, PS as u32, 0, 0]);
            s.decode(e4.codec, &e4.payload, &e4.lengths, &mut held, false)
                .expect("decode v4");
            assert!(held == v4);
        }
    }
}

/// Encoded frames of every compressing format for the corruption tests.
fn frames(s: &mut dyn Subject) -> Vec<(Vec<u8>, Encoded)> {
    let mut out = Vec::new();
    for params in compressors(4) {
        let input = content(Kind::Text, 4, 11);
        let e = s.encode(params, &input, 0, false).expect("encode");
        assert_eq!(e.codec, params.codec);
        out.push((input, e));
    }
    // A delta frame: first the base, then the change.
    let base = content(Kind::Code, 4, 12);
    let params = EncodeParams::new(CodecId::DELTA, Level::DEFAULT);
    s.encode(params, &base, 1 << 30, false).expect("base");
    let mut v2 = base.clone();
    for p in 0..4 {
        v2[p * PS + 100] ^= 0xff;
        v2[p * PS + 3000] ^= 0x0f;
    }
    let e = s.encode(params, &v2, 1 << 30, false).expect("delta");
    assert_eq!(e.codec, CodecId::DELTA);
    out.push((base, e));
    out
}

#[test]
fn truncated_payloads_are_rejected() {
    for mut s in subjects() {
        for (input, e) in frames(s.as_mut()) {
            let n = e.payload.len();
            let ctx = format!("{} {}", s.name(), e.codec);
            if e.lengths.is_empty() {
                for cut in [n - 1, n / 2, 1, 0] {
                    let mut dst = input.clone();
                    let r = s.decode(e.codec, &e.payload[..cut], &[], &mut dst, false);
                    assert!(r.is_err(), "{ctx}: payload cut to {cut} of {n} accepted");
                }
                continue;
            }
            // The table no longer matches a cut payload.
            let mut dst = input.clone();
            let r = s.decode(e.codec, &e.payload[..n - 1], &e.lengths, &mut dst, false);
            assert!(
                matches!(r, Err(CodecError::TableSum { .. })),
                "{ctx}: {r:?}"
            );
            // One page's stream cut short, the table kept consistent.
            for page in 0..e.lengths.len() {
                let len = e.lengths[page] as usize;
                let start: usize = e.lengths[..page].iter().map(|&l| l as usize).sum();
                // A delta cut at a record boundary is a shorter valid delta (the
                // format has no record count; the frame checksum covers that case),
                // so only a cut inside the last literal must fail for delta.
                let keeps = if e.codec == CodecId::DELTA {
                    vec![len - 1]
                } else {
                    vec![len - 1, len / 2, 1]
                };
                for keep in keeps {
                    if keep == 0 || keep >= len {
                        continue;
                    }
                    let mut payload = e.payload[..start + keep].to_vec();
                    payload.extend_from_slice(&e.payload[start + len..]);
                    let mut lengths = e.lengths.clone();
                    lengths[page] = keep as u32;
                    let mut dst = input.clone();
                    let r = s.decode(e.codec, &payload, &lengths, &mut dst, false);
                    assert!(
                        r.is_err(),
                        "{ctx}: page {page} cut to {keep} of {len} accepted"
                    );
                }
            }
        }
    }
}

#[test]
fn corrupt_payloads_are_rejected() {
    for mut s in subjects() {
        for (input, e) in frames(s.as_mut()) {
            let mut dst = input.clone();
            let ctx = format!("{} {}", s.name(), e.codec);
            // Garbage of the same length.
            let mut garbage = e.payload.clone();
            Rng::new(77).fill(&mut garbage);
            if e.codec == CodecId::DELTA {
                // Make every record run past the page end: 0xff bytes are huge ULEB128s.
                garbage.iter_mut().for_each(|b| *b = 0xff);
            }
            assert!(
                s.decode(e.codec, &garbage, &e.lengths, &mut dst, false)
                    .is_err(),
                "{ctx}: garbage accepted"
            );
            // A trailing byte.
            let mut longer = e.payload.clone();
            longer.push(0);
            let mut lengths = e.lengths.clone();
            if let Some(l) = lengths.last_mut() {
                *l += 1;
            }
            assert!(
                s.decode(e.codec, &longer, &lengths, &mut dst, false)
                    .is_err(),
                "{ctx}: trailing byte accepted"
            );
            // Per-page tables that do not add up or break the entry rules.
            if !e.lengths.is_empty() {
                let mut bad = e.lengths.clone();
                bad[0] += 1;
                assert!(
                    matches!(
                        s.decode(e.codec, &e.payload, &bad, &mut dst, false),
                        Err(CodecError::TableSum { .. })
                    ),
                    "{ctx}"
                );
                let short = &e.lengths[1..];
                assert!(
                    matches!(
                        s.decode(e.codec, &e.payload, short, &mut dst, false),
                        Err(CodecError::TableEntries { .. })
                    ),
                    "{ctx}"
                );
                let mut over = e.lengths.clone();
                over[0] = PS as u32 + 1;
                assert!(
                    matches!(
                        s.decode(e.codec, &e.payload, &over, &mut dst, false),
                        Err(CodecError::BadPageLength { .. })
                    ),
                    "{ctx}"
                );
                if e.codec == CodecId::DEFLATE {
                    let mut zero = e.lengths.clone();
                    zero[1] += zero[0];
                    zero[0] = 0;
                    assert!(
                        matches!(
                            s.decode(e.codec, &e.payload, &zero, &mut dst, false),
                            Err(CodecError::BadPageLength { .. })
                        ),
                        "{ctx}: zero entry accepted for deflate"
                    );
                }
            } else {
                // Block formats take no table.
                assert!(
                    s.decode(e.codec, &e.payload, &[1], &mut dst, false)
                        .is_err(),
                    "{ctx}: table accepted"
                );
            }
        }
        // zstd specifics: a bad magic, and two frames back to back.
        let input = content(Kind::Text, 2, 5);
        let e = s
            .encode(EncodeParams::new(CodecId::ZSTD, Level(3)), &input, 0, false)
            .expect("encode");
        let mut dst = input.clone();
        let mut bad = e.payload.clone();
        bad[0] ^= 1;
        assert!(s.decode(CodecId::ZSTD, &bad, &[], &mut dst, false).is_err());
        let half = content(Kind::Text, 1, 5);
        let h = s
            .encode(EncodeParams::new(CodecId::ZSTD, Level(3)), &half, 0, false)
            .expect("encode");
        let mut two = h.payload.clone();
        two.extend_from_slice(&h.payload);
        if two.len() <= 2 * PS {
            let r = s.decode(CodecId::ZSTD, &two, &[], &mut dst, false);
            assert!(r.is_err(), "{}: two zstd frames accepted as one", s.name());
        }
        // A skippable frame (magic 0x184D2A5?, 4-byte length, then its bytes) before
        // the frame of pages.
        let mut skip = vec![0x53, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        skip.extend_from_slice(&h.payload);
        let mut one = half.clone();
        let r = s.decode(CodecId::ZSTD, &skip, &[], &mut one, false);
        let e = r.expect_err("skippable frame accepted").to_string();
        assert!(e.contains("skippable"), "{}: {e}", s.name());
        // A frame with its optional Content_Checksum decodes; with the checksum
        // altered it is refused (PROTOCOL.md, Codecs).
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .unwrap();
        let mut sum = vec![0u8; 2 * PS];
        let n = cctx.compress2(&mut sum[..], &half[..]).unwrap();
        sum.truncate(n);
        let mut one = vec![0u8; half.len()];
        s.decode(CodecId::ZSTD, &sum, &[], &mut one, false)
            .unwrap_or_else(|e| panic!("{}: a Content_Checksum refused: {e}", s.name()));
        assert_eq!(one, half, "{}", s.name());
        *sum.last_mut().unwrap() ^= 1;
        assert!(
            s.decode(CodecId::ZSTD, &sum, &[], &mut one, false).is_err(),
            "{}: a wrong Content_Checksum accepted",
            s.name()
        );
        // A frame (one RLE block of a page) declaring Window_Log 31 with the largest
        // mantissa (3.75 GiB), the most the zstd library decodes (on 64-bit hosts),
        // decodes into the page alone; 32 is refused, saying why (PROTOCOL.md, Codecs).
        let max: u8 = if cfg!(target_pointer_width = "64") {
            31
        } else {
            30
        };
        for (log, decodes) in [(max, true), (max + 1, false)] {
            let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (log - 10) << 3 | 7];
            f.extend_from_slice(&(1 | 1 << 1 | (PS as u32) << 3).to_le_bytes()[..3]);
            f.push(0x5a);
            let mut page = vec![0u8; PS];
            let r = s.decode(CodecId::ZSTD, &f, &[], &mut page, false);
            if decodes {
                r.unwrap_or_else(|e| panic!("{}: Window_Log {log}: {e}", s.name()));
                assert!(page.iter().all(|&b| b == 0x5a), "{}", s.name());
            } else {
                let e = r.expect_err("too large a Window_Log accepted").to_string();
                assert!(e.contains("Window_Log above"), "{}: {e}", s.name());
            }
        }
    }
}

#[test]
fn destinations_of_the_wrong_size_are_refused() {
    for mut s in subjects() {
        let mut all = frames(s.as_mut());
        let input = content(Kind::Mixed, 4, 13);
        let raw = s
            .encode(
                EncodeParams::new(CodecId::RAW, Level::DEFAULT),
                &input,
                0,
                false,
            )
            .expect("raw");
        all.push((input, raw));
        for (input, e) in all {
            for pages in [3usize, 5, 1, 0] {
                let mut dst = vec![0u8; pages * PS];
                let r = s.decode(e.codec, &e.payload, &e.lengths, &mut dst, pages % 2 == 1);
                assert!(
                    r.is_err(),
                    "{} {}: decode into {pages} pages accepted",
                    s.name(),
                    e.codec
                );
            }
            // The right size still works (delta needs its base, which `input` is).
            let mut dst = input.clone();
            s.decode(e.codec, &e.payload, &e.lengths, &mut dst, false)
                .expect("right size");
        }
    }
}

#[test]
fn unknown_formats_and_bad_levels_are_errors() {
    for mut s in subjects() {
        let input = content(Kind::Text, 1, 1);
        let r = s.encode(
            EncodeParams::new(CodecId(0x2a), Level::DEFAULT),
            &input,
            0,
            false,
        );
        assert!(
            matches!(r, Err(CodecError::Unsupported(CodecId(0x2a)))),
            "{}: {r:?}",
            s.name()
        );
        let r = s.encode(
            EncodeParams::new(CodecId::DEFLATE, Level(13)),
            &input,
            0,
            false,
        );
        assert!(
            matches!(r, Err(CodecError::BadLevel { .. })),
            "{}: {r:?}",
            s.name()
        );
        let r = s.encode(EncodeParams::new(CodecId::LZ4, Level(1)), &input, 0, false);
        assert!(
            matches!(r, Err(CodecError::BadLevel { .. })),
            "{}: {r:?}",
            s.name()
        );
        let mut dst = input.clone();
        let r = s.decode(CodecId(0xf001), &input, &[], &mut dst, false);
        assert!(
            matches!(r, Err(CodecError::Unsupported(_))),
            "{}: {r:?}",
            s.name()
        );
    }
}
