//! The delta format of PROTOCOL.md ("Delta format"): XBZRLE-style records
//! `skip: uleb128, len: uleb128, len bytes`.

use super::CodecError;
use pagewire_protocol::CodecId;

/// Gaps of unchanged bytes at most this long are folded into the surrounding literal:
/// a new record would cost at least two header bytes.
const MERGE_GAP: usize = 2;

fn corrupt(detail: &'static str) -> CodecError {
    CodecError::Corrupt {
        codec: CodecId::DELTA,
        detail,
    }
}

/// Appends `v` as ULEB128 to `out[*pos..]`; `false` when it does not fit.
#[inline]
fn put_uleb(out: &mut [u8], pos: &mut usize, mut v: usize) -> bool {
    loop {
        let Some(slot) = out.get_mut(*pos) else {
            return false;
        };
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        *pos += 1;
        if v == 0 {
            *slot = byte;
            return true;
        }
        *slot = byte | 0x80;
    }
}

/// Reads a minimal ULEB128 not above `max`.
#[inline]
fn get_uleb(input: &[u8], pos: &mut usize, max: usize) -> Result<usize, CodecError> {
    let mut value: usize = 0;
    let mut shift = 0u32;
    loop {
        let Some(&byte) = input.get(*pos) else {
            return Err(corrupt("truncated uleb128"));
        };
        *pos += 1;
        if shift >= 35 {
            return Err(corrupt("uleb128 too long"));
        }
        value |= usize::from(byte & 0x7f) << shift;
        if value > max {
            return Err(corrupt("uleb128 value above page size"));
        }
        if byte & 0x80 == 0 {
            if byte == 0 && shift > 0 {
                return Err(corrupt("uleb128 longer than needed"));
            }
            return Ok(value);
        }
        shift += 7;
    }
}

/// Writes the delta that turns `old` into `new` into `out`, and returns its length,
/// or `None` when it would not fit in `out` (the caller's threshold). An unchanged
/// page gives `Some(0)`.
///
/// `old` and `new` must have the same length.
pub(crate) fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
    debug_assert_eq!(old.len(), new.len());
    let n = old.len().min(new.len());
    let mut pos = 0usize; // decoder position after the last record
    let mut o = 0usize; // output length
    let mut i = 0usize;
    while i < n {
        // Skip equal bytes, a word at a time.
        while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i >= n {
            break;
        }
        // A literal run: extend while bytes differ or the equal gap is short.
        let start = i;
        let mut end = i + 1;
        loop {
            while end < n && old[end] != new[end] {
                end += 1;
            }
            // `end` is at an equal byte (or the page end): look at the gap.
            let mut gap_end = end;
            while gap_end < n && gap_end - end <= MERGE_GAP && old[gap_end] == new[gap_end] {
                gap_end += 1;
            }
            if gap_end < n && gap_end - end <= MERGE_GAP {
                // Short gap followed by a difference: fold it in.
                end = gap_end + 1;
            } else {
                break;
            }
        }
        let skip = start - pos;
        let len = end - start;
        if !put_uleb(out, &mut o, skip) || !put_uleb(out, &mut o, len) {
            return None;
        }
        let lit = out.get_mut(o..o + len)?;
        lit.copy_from_slice(&new[start..end]);
        o += len;
        pos = end;
        i = end;
    }
    Some(o)
}

/// Checks `delta` against the format for a `page_size` page without writing.
fn validate(delta: &[u8], page_size: usize) -> Result<(), CodecError> {
    walk(delta, page_size, |_, _| {})
}

/// Walks the records, calling `f(position, literal)` for each.
#[inline]
fn walk(delta: &[u8], page_size: usize, mut f: impl FnMut(usize, &[u8])) -> Result<(), CodecError> {
    let mut i = 0usize;
    let mut pos = 0usize;
    let mut first = true;
    while i < delta.len() {
        let skip = get_uleb(delta, &mut i, page_size)?;
        if skip == 0 && !first {
            return Err(corrupt("record after the first with skip 0"));
        }
        let len = get_uleb(delta, &mut i, page_size)?;
        if len == 0 {
            return Err(corrupt("record with len 0"));
        }
        pos = pos
            .checked_add(skip)
            .filter(|&p| p <= page_size)
            .ok_or(corrupt("skip passes the page end"))?;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= page_size)
            .ok_or(corrupt("record passes the page end"))?;
        let lit_end = i.checked_add(len).ok_or(corrupt("truncated literal"))?;
        let lit = delta.get(i..lit_end).ok_or(corrupt("truncated literal"))?;
        f(pos, lit);
        i = lit_end;
        pos = end;
        first = false;
    }
    Ok(())
}

/// Applies `delta` to `page` in place. The whole delta is checked before the first
/// byte is written, so a corrupt delta leaves the page untouched.
pub(crate) fn apply(delta: &[u8], page: &mut [u8]) -> Result<(), CodecError> {
    let page_size = page.len();
    validate(delta, page_size)?;
    walk(delta, page_size, |pos, lit| {
        page[pos..pos + lit.len()].copy_from_slice(lit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(old: &[u8], new: &[u8]) -> usize {
        let mut out = vec![0u8; old.len() * 2];
        let n = encode(old, new, &mut out).expect("fits");
        let mut page = old.to_vec();
        apply(&out[..n], &mut page).expect("applies");
        assert_eq!(page, new);
        n
    }

    #[test]
    fn unchanged_page_is_empty_delta() {
        let page = vec![7u8; 4096];
        assert_eq!(roundtrip(&page, &page), 0);
    }

    #[test]
    fn small_changes_make_small_deltas() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[0] = 1;
        new[100] = 2;
        new[102] = 3; // gap of one: folded
        new[4095] = 4;
        let n = roundtrip(&old, &new);
        assert!(n < 20, "{n}");
        let mut all = old.clone();
        all.iter_mut().for_each(|b| *b = 0xff);
        roundtrip(&old, &all);
    }

    #[test]
    fn records_follow_the_format() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[5] = 9;
        new[200] = 8;
        let mut out = vec![0u8; 64];
        let n = encode(&old, &new, &mut out).unwrap();
        // skip 5, len 1, [9]; skip 194, len 1, [8] (194 = 0xc2 0x01 in ULEB128).
        assert_eq!(&out[..n], &[5, 1, 9, 0xc2, 0x01, 1, 8]);
    }

    #[test]
    fn delta_that_does_not_fit_is_refused() {
        let old = vec![0u8; 4096];
        let new = vec![1u8; 4096];
        let mut out = vec![0u8; 100];
        assert_eq!(encode(&old, &new, &mut out), None);
    }

    #[test]
    fn malformed_deltas_are_rejected_without_writing() {
        let mut page = vec![0u8; 4096];
        let bad: &[&[u8]] = &[
            &[0, 0],                   // len 0
            &[0, 1],                   // truncated literal
            &[0, 1, 5, 0, 1, 6],       // second record with skip 0
            &[0x80, 0x00, 1, 1],       // non-minimal uleb
            &[0x81, 0x80, 0x01, 1, 1], // 16385 > page size
            &[0xff, 0x1f, 1, 1],       // skip 4095 + len 1 = 4096 ok, but then:
            &[0x80],                   // truncated uleb
            &[0x80, 0x20, 1, 1],       // skip 4096 then len 1 passes the end
        ];
        for (k, d) in bad.iter().enumerate() {
            let r = apply(d, &mut page);
            if k == 5 {
                assert!(r.is_ok(), "{k}");
                assert_eq!(page[4095], 1);
                page[4095] = 0;
                continue;
            }
            assert!(r.is_err(), "case {k} accepted");
            assert!(page.iter().all(|&b| b == 0), "case {k} wrote");
        }
    }
}
