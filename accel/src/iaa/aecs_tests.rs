use super::*;

#[test]
fn the_aecs_is_1568_bytes_32_byte_aligned_with_fields_at_the_specified_offsets() {
    assert_eq!(core::mem::size_of::<Aecs>(), 1568);
    assert_eq!(core::mem::align_of::<Aecs>(), 32);
    assert_eq!(AECS_SIZE, 0x620, "QPL's HW_AECS_COMPRESS_WITH_HT");
    assert_eq!(TABLE_OFFSET, 4 + 4 + 20 + 4 + 256);
    assert_eq!(DIST_OFFSET, TABLE_OFFSET + 286 * 4 + 8);
    assert_eq!(TABLE_OFFSET + HISTOGRAM_SIZE, AECS_SIZE);
    let mut a = Aecs::default();
    assert_eq!(a.histogram_addr(), a.addr() + 288);
    let b = a.bytes_mut();
    b[28..32].copy_from_slice(&0x0102_0304u32.to_le_bytes());
    b[288..292].copy_from_slice(&entry(8, 0x30).to_le_bytes());
    b[288 + 285 * 4..288 + 286 * 4].copy_from_slice(&7u32.to_le_bytes());
    b[1440..1444].copy_from_slice(&entry(5, 3).to_le_bytes());
    b[1440 + 29 * 4..1440 + 30 * 4].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(a.accum_bits(), 0x0102_0304);
    assert_eq!(entry_parts(a.ll_entry(0)), (8, 0x30));
    assert_eq!(a.ll_entry(285), 7);
    assert_eq!(entry_parts(a.d_entry(0)), (5, 3));
    assert_eq!(a.d_entry(29), 9);
}

#[test]
fn table_entries_hold_the_length_in_bits_18_to_15_and_the_code_below() {
    assert_eq!(
        entry(8, 0),
        8 << 15,
        "QPL's big-endian EOB work-around value"
    );
    assert_eq!(entry(15, 0x7fff), 0x7_ffff);
    assert_eq!(entry(3, 0b101), 0x1_8005);
    assert_eq!(entry_parts(0x1_8005), (3, 0b101));
}

#[test]
fn the_histogram_has_the_statistics_layout() {
    let mut h = Histogram::default();
    h.ll[0] = 1;
    h.ll[256] = 2;
    h.ll[285] = 3;
    h.d[0] = 4;
    h.d[29] = 5;
    let b = h.to_bytes();
    assert_eq!(&b[0..4], &1u32.to_le_bytes());
    assert_eq!(&b[1024..1028], &2u32.to_le_bytes());
    assert_eq!(&b[1140..1144], &3u32.to_le_bytes());
    assert_eq!(&b[1144..1152], &[0; 8], "reserved");
    assert_eq!(&b[1152..1156], &4u32.to_le_bytes());
    assert_eq!(&b[1268..1272], &5u32.to_le_bytes());
    assert_eq!(&b[1272..1280], &[0; 8], "reserved");
    assert_eq!(Histogram::from_bytes(&b), h);
}

fn kraft(lens: &[u8]) -> f64 {
    lens.iter()
        .filter(|&&l| l > 0)
        .map(|&l| 2f64.powi(-i32::from(l)))
        .sum()
}

#[test]
fn code_lengths_are_complete_and_at_most_the_limit() {
    // Fibonacci frequencies make an unlimited Huffman tree 29 levels deep.
    let mut fib = vec![1u32, 1];
    while fib.len() < 30 {
        let n = fib[fib.len() - 1] + fib[fib.len() - 2];
        fib.push(n);
    }
    let lens = code_lengths(&fib, 15);
    assert!(lens.iter().all(|&l| (1..=15).contains(&l)), "{lens:?}");
    assert!((kraft(&lens) - 1.0).abs() < 1e-12, "complete code");
    // Rarer symbols never get shorter codes.
    for i in 1..fib.len() {
        assert!(lens[i] <= lens[i - 1]);
    }
    // Unlimited case: a plain Huffman code.
    let lens = code_lengths(&[5, 1, 1, 2, 0, 0], 15);
    assert_eq!(lens, vec![1, 3, 3, 2, 0, 0]);
    // One used symbol: a second gets a code so the code is complete.
    let lens = code_lengths(&[0, 0, 9, 0], 15);
    assert_eq!(lens, vec![1, 0, 1, 0]);
    assert_eq!(code_lengths(&[0; 4], 7), vec![1, 1, 0, 0]);
}

#[test]
fn canonical_codes_follow_rfc_1951() {
    // RFC 1951 §3.2.2's example: lengths (3, 3, 3, 3, 3, 2, 4, 4).
    let codes = canonical_codes(&[3, 3, 3, 3, 3, 2, 4, 4]);
    assert_eq!(
        codes,
        vec![0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]
    );
}

#[test]
fn load_dynamic_writes_table_and_header_from_the_histogram() {
    let mut a = Aecs::default();
    let mut h = Histogram::default();
    for (i, v) in h.ll.iter_mut().enumerate().take(256) {
        *v = (i % 7) as u32;
    }
    h.ll[257] = 40;
    h.ll[270] = 3;
    h.d[3] = 10;
    h.d[12] = 1;
    a.bytes_mut()[TABLE_OFFSET..].copy_from_slice(&h.to_bytes());
    assert_eq!(a.histogram(), h);
    assert!(a.load_dynamic());
    let ll: Vec<u8> = (0..LL_SYMBOLS)
        .map(|s| entry_parts(a.ll_entry(s)).0)
        .collect();
    let d: Vec<u8> = (0..D_SYMBOLS)
        .map(|s| entry_parts(a.d_entry(s)).0)
        .collect();
    assert!(ll[256] > 0, "end of block has a code");
    assert_eq!(ll[0], 0, "unused literal has none");
    assert!(ll[257] > 0 && ll[270] > 0 && d[3] > 0 && d[12] > 0);
    assert!((kraft(&ll) - 1.0).abs() < 1e-12 && (kraft(&d) - 1.0).abs() < 1e-12);
    let codes = canonical_codes(&ll);
    for s in 0..LL_SYMBOLS {
        assert_eq!(
            a.ll_entry(s),
            if ll[s] > 0 { entry(ll[s], codes[s]) } else { 0 }
        );
    }
    // The accumulator starts with BFINAL = 1, BTYPE = 10, then HLIT = 271 - 257,
    // HDIST = 13 - 1.
    let b = a.bytes();
    let bits = a.accum_bits() as usize;
    assert!(bits > 3 + 5 + 5 + 4 + 4 * 3 && bits <= ACCUM_SIZE * 8);
    let acc = u32::from_le_bytes([b[32], b[33], b[34], b[35]]);
    assert_eq!(acc & 1, 1);
    assert_eq!((acc >> 1) & 3, 2);
    assert_eq!((acc >> 3) & 31, 14);
    assert_eq!((acc >> 8) & 31, 12);
}
