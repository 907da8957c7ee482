use super::*;

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn key(seed: u64) -> [u8; 32] {
    bytes(32, seed).try_into().unwrap()
}

/// What every implementation must compute, from the `polyval` and `aes` crates alone:
/// AES-128 (key bytes 16..32) of POLYVAL (key bytes 0..16) of the piece zero-padded and
/// its length block.
fn reference_one(key: &[u8; 32], piece: &[u8]) -> PageHash {
    let h: [u8; 16] = key[..16].try_into().unwrap();
    let mut p = Polyval::new(&h.into());
    p.update_padded(piece);
    let mut len = [0u8; 16];
    len[..8].copy_from_slice(&(piece.len() as u64).to_le_bytes());
    p.update(&[len.into()]);
    let mut b = p.finalize();
    Aes128::new(key[16..].into()).encrypt_block(&mut b);
    PageHash::of(&b)
}

/// [`reference_one`] of each `ps` piece.
fn reference(key: &[u8; 32], pages: &[u8], ps: usize) -> Vec<PageHash> {
    pages.chunks(ps).map(|p| reference_one(key, p)).collect()
}

/// The implementations this machine has; the ones it lacks are named as skipped.
fn hashers(key: [u8; 32]) -> Vec<(Kind, PageHasher)> {
    let mut out = Vec::new();
    for kind in [Kind::Wide, Kind::Narrow, Kind::Crate] {
        match PageHasher::on(key, kind) {
            Some(h) => out.push((kind, h)),
            None => eprintln!("skipped: {kind:?} (not on this machine)"),
        }
    }
    out
}

#[test]
fn polyval_by_carry_less_multiplication_is_rfc_8452s() {
    // RFC 8452, Appendix A: POLYVAL(H, X_1, X_2).
    let hex = |s: &str| -> [u8; 16] {
        std::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
    };
    let h = hex("25629347589242761d31f826ba4b757b");
    let x1 = hex("4f4f95668c83dfb6401762bb2d01a262");
    let x2 = hex("d1a24ddd2721d006bbe45f20d3c9f362");
    let want = hex("f7a3b47b846119fae5b7866cf5e5b77e");
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&h);
    let mut ran = 0;
    for (kind, hasher) in hashers(key) {
        let got: [u8; 16] = match &hasher.poly {
            #[cfg(target_arch = "x86_64")]
            Poly::Wide(w) => w.hash(&x1, &x2),
            #[cfg(target_arch = "x86_64")]
            Poly::Narrow(n) => n.hash(&x1, &x2),
            Poly::Crate => continue,
        };
        assert_eq!(got, want, "{kind:?}");
        ran += 1;
    }
    // x86_64 machines all have PCLMULQDQ since 2010; this project's have both.
    if cfg!(target_arch = "x86_64") {
        assert!(ran >= 1, "no carry-less implementation ran");
    }
}

#[test]
fn every_implementation_this_machine_has_hashes_as_the_reference() {
    let mut ran = Vec::new();
    for seed in 0..4u64 {
        let key = key(seed);
        for (kind, h) in hashers(key) {
            // Sizes around both step lengths (128 and 256 bytes), pages, and pieces
            // that end mid-block.
            for ps in [
                1usize, 15, 16, 17, 127, 128, 255, 256, 257, 1000, 4096, 8192,
            ] {
                for n in [0usize, 1, 3, 33, 40] {
                    let pages = bytes(n * ps + (seed as usize % 3) * 7, (ps + n) as u64);
                    let mut got = Vec::new();
                    h.hash_pages(&pages, ps, &mut got);
                    assert_eq!(got, reference(&key, &pages, ps), "{kind:?}, {ps} x {n}");
                }
            }
            let page = bytes(4096, seed);
            assert_eq!(h.hash(&page), reference_one(&key, &page), "{kind:?}");
            assert_eq!(h.hash(&[]), reference_one(&key, &[]), "{kind:?}");
            ran.push(kind);
        }
    }
    eprintln!("ran: {ran:?}");
    assert!(ran.contains(&Kind::Crate));
}

#[test]
fn equal_pages_hash_equal_and_one_changed_bit_or_trailing_zero_does_not() {
    for (kind, h) in hashers(key(9)) {
        let mut pages = bytes(4096, 9).repeat(BATCH + 3);
        pages[7 * 4096 + 4095] ^= 1;
        pages[(BATCH + 1) * 4096] ^= 0x80;
        let mut got = Vec::new();
        h.hash_pages(&pages, 4096, &mut got);
        assert_eq!(got.len(), BATCH + 3);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(*g == got[0], i != 7 && i != BATCH + 1, "{kind:?}: page {i}");
        }
        // The same bytes padded with a zero are another message (the length block).
        let a = bytes(100, 3);
        let mut b = a.clone();
        b.push(0);
        assert_ne!(h.hash(&a), h.hash(&b), "{kind:?}");
        assert_ne!(h.hash(&[]), h.hash(&[0; 16]), "{kind:?}");
    }
}

#[test]
fn a_piece_shorter_than_a_page_is_hashed_as_it_is() {
    let key = [3u8; 32];
    let h = PageHasher::new(key);
    let pages = bytes(3 * 4096 + 100, 4);
    let mut got = Vec::new();
    h.hash_pages(&pages, 4096, &mut got);
    assert_eq!(got, reference(&key, &pages, 4096));
    assert_eq!(got.len(), 4);
}

#[test]
fn a_zero_polyval_key_is_never_used() {
    let mut key = [0u8; 32];
    key[16..].copy_from_slice(&[5; 16]);
    let h = PageHasher::new(key);
    assert_ne!(h.hash(&[1; 4096]), h.hash(&[2; 4096]));
}
