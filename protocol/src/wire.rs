//! Byte-level reading and writing: bounded readers and lists that are either borrowed
//! from the wire or from the caller.

use core::fmt;

use crate::error::DecodeError;
use crate::ids::{AuthMethod, ChecksumId, CodecId, FrameType, GuestAddr, PageIndex, RegionId};

/// A reader over exactly one frame body (or a field inside it). Every read checks the
/// remaining length; nothing reads past the slice it was given.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A list of `count` fixed-size items, bounds-checked before it is taken.
    pub(crate) fn list<T: WireItem>(
        &mut self,
        count: usize,
    ) -> Result<WireList<'a, T>, DecodeError> {
        let bytes = count.checked_mul(T::SIZE).ok_or(DecodeError::Truncated {
            need: usize::MAX,
            have: self.buf.len(),
        })?;
        Ok(WireList::Wire(self.take(bytes)?))
    }

    /// A list with a one-byte count in front.
    pub(crate) fn list_u8<T: WireItem>(&mut self) -> Result<WireList<'a, T>, DecodeError> {
        let n = self.u8()?;
        self.list(usize::from(n))
    }

    /// Bytes with a one-byte length in front.
    pub(crate) fn bytes_u8(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// What is left, without consuming it.
    pub(crate) fn peek_rest(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    pub(crate) fn reserved_u16(&mut self, field: &'static str) -> Result<(), DecodeError> {
        match self.u16()? {
            0 => Ok(()),
            _ => Err(DecodeError::ReservedNotZero { field }),
        }
    }

    /// Ends a frame body: leftover bytes are an error.
    pub(crate) fn finish(self, frame: FrameType) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { frame, extra }),
        }
    }
}

/// Why a frame could not be encoded: a value does not fit the field that carries it.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// A list or string is longer than its count field allows.
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The most the field can carry.
        max: usize,
    },
    /// The frame body does not fit the envelope's u32 length.
    BodyTooLarge(usize),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooLong { field, len, max } => {
                write!(f, "{field} has {len} entries, the wire allows {max}")
            }
            Self::BodyTooLarge(n) => write!(f, "frame body of {n} bytes does not fit a u32"),
        }
    }
}

impl std::error::Error for EncodeError {}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_count_u8(
    out: &mut Vec<u8>,
    field: &'static str,
    len: usize,
) -> Result<(), EncodeError> {
    let n = u8::try_from(len).map_err(|_| EncodeError::TooLong {
        field,
        len,
        max: 255,
    })?;
    out.push(n);
    Ok(())
}

pub(crate) fn put_count_u16(
    out: &mut Vec<u8>,
    field: &'static str,
    len: usize,
) -> Result<(), EncodeError> {
    let n = u16::try_from(len).map_err(|_| EncodeError::TooLong {
        field,
        len,
        max: 65535,
    })?;
    put_u16(out, n);
    Ok(())
}

pub(crate) fn put_list_u8<T: WireItem>(
    out: &mut Vec<u8>,
    field: &'static str,
    list: &WireList<'_, T>,
) -> Result<(), EncodeError> {
    put_count_u8(out, field, list.len())?;
    list.write(out);
    Ok(())
}

pub(crate) fn put_bytes_u8(
    out: &mut Vec<u8>,
    field: &'static str,
    bytes: &[u8],
) -> Result<(), EncodeError> {
    put_count_u8(out, field, bytes.len())?;
    out.extend_from_slice(bytes);
    Ok(())
}

/// A fixed-size item of a list on the wire.
pub trait WireItem: Copy {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Reads one item from exactly `SIZE` bytes.
    fn read(bytes: &[u8]) -> Self;
    /// Appends the item's encoding.
    fn write(self, out: &mut Vec<u8>);
}

pub(crate) fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

impl WireItem for u32 {
    const SIZE: usize = 4;
    fn read(bytes: &[u8]) -> Self {
        u32::from_le_bytes(le(bytes))
    }
    fn write(self, out: &mut Vec<u8>) {
        put_u32(out, self);
    }
}

impl WireItem for CodecId {
    const SIZE: usize = 2;
    fn read(bytes: &[u8]) -> Self {
        CodecId(u16::from_le_bytes(le(bytes)))
    }
    fn write(self, out: &mut Vec<u8>) {
        put_u16(out, self.0);
    }
}

impl WireItem for ChecksumId {
    const SIZE: usize = 1;
    fn read(bytes: &[u8]) -> Self {
        ChecksumId(bytes[0])
    }
    fn write(self, out: &mut Vec<u8>) {
        out.push(self.0);
    }
}

impl WireItem for AuthMethod {
    const SIZE: usize = 1;
    fn read(bytes: &[u8]) -> Self {
        AuthMethod(bytes[0])
    }
    fn write(self, out: &mut Vec<u8>) {
        out.push(self.0);
    }
}

/// A run of consecutive pages: `count` pages starting at `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// First page index of the run.
    pub start: PageIndex,
    /// Number of pages, at least 1.
    pub count: u32,
}

impl PageRun {
    /// One past the last page, or `None` if that overflows.
    pub fn end(self) -> Option<u64> {
        self.start.0.checked_add(u64::from(self.count))
    }
}

impl WireItem for PageRun {
    const SIZE: usize = 12;
    fn read(bytes: &[u8]) -> Self {
        PageRun {
            start: PageIndex(u64::from_le_bytes(le(bytes))),
            count: u32::from_le_bytes(le(&bytes[8..])),
        }
    }
    fn write(self, out: &mut Vec<u8>) {
        put_u64(out, self.start.0);
        put_u32(out, self.count);
    }
}

/// A run of consecutive pages that each hold one byte value repeated (a uniform
/// page): the destination fills them with `byte`, no payload carries them. `byte` is
/// never 0 on the wire: pages of zeros travel as zero runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UniformRun {
    /// The pages.
    pub run: PageRun,
    /// The byte every byte of these pages holds.
    pub byte: u8,
}

impl WireItem for UniformRun {
    const SIZE: usize = 13;
    fn read(bytes: &[u8]) -> Self {
        UniformRun {
            run: PageRun::read(bytes),
            byte: bytes[12],
        }
    }
    fn write(self, out: &mut Vec<u8>) {
        self.run.write(out);
        out.push(self.byte);
    }
}

/// One guest memory region as the LAYOUT frame carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionDesc {
    /// Region id, unique in the session.
    pub id: RegionId,
    /// Page size backing the region at the source (4 KiB, 2 MiB, 1 GiB...).
    pub backing_page_size: u32,
    /// Guest physical address of the first byte.
    pub guest_addr: GuestAddr,
    /// Length in bytes.
    pub length: u64,
}

impl WireItem for RegionDesc {
    const SIZE: usize = 24;
    fn read(bytes: &[u8]) -> Self {
        RegionDesc {
            id: RegionId(u32::from_le_bytes(le(bytes))),
            backing_page_size: u32::from_le_bytes(le(&bytes[4..])),
            guest_addr: GuestAddr(u64::from_le_bytes(le(&bytes[8..]))),
            length: u64::from_le_bytes(le(&bytes[16..])),
        }
    }
    fn write(self, out: &mut Vec<u8>) {
        put_u32(out, self.id.0);
        put_u32(out, self.backing_page_size);
        put_u64(out, self.guest_addr.0);
        put_u64(out, self.length);
    }
}

/// A list of fixed-size items: either still in wire bytes (what the decoder returns,
/// without copying) or a slice the caller built (what an encoder takes).
#[derive(Clone, Copy)]
pub enum WireList<'a, T> {
    /// Encoded items, `len() * T::SIZE` bytes, borrowed from a frame.
    Wire(&'a [u8]),
    /// Items from the caller.
    Slice(&'a [T]),
}

impl<'a, T: WireItem> WireList<'a, T> {
    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            Self::Wire(b) => b.len() / T::SIZE,
            Self::Slice(s) => s.len(),
        }
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items in order.
    pub fn iter(&self) -> WireIter<'a, T> {
        match *self {
            Self::Wire(b) => WireIter::Wire(b.chunks_exact(T::SIZE)),
            Self::Slice(s) => WireIter::Slice(s.iter()),
        }
    }

    /// The item at `index`.
    pub fn get(&self, index: usize) -> Option<T> {
        match self {
            Self::Wire(b) => {
                let start = index.checked_mul(T::SIZE)?;
                let end = start.checked_add(T::SIZE)?;
                b.get(start..end).map(T::read)
            }
            Self::Slice(s) => s.get(index).copied(),
        }
    }

    /// Whether `item` is in the list.
    pub fn contains(&self, item: T) -> bool
    where
        T: PartialEq,
    {
        self.iter().any(|x| x == item)
    }

    /// Copies the items into a vector.
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().collect()
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Wire(b) => out.extend_from_slice(b),
            Self::Slice(s) => s.iter().for_each(|x| x.write(out)),
        }
    }

    pub(crate) fn encoded_len(&self) -> usize {
        self.len() * T::SIZE
    }
}

impl<T: WireItem + PartialEq> PartialEq for WireList<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<T: WireItem + Eq> Eq for WireList<'_, T> {}

impl<T: WireItem + fmt::Debug> fmt::Debug for WireList<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a, T> From<&'a [T]> for WireList<'a, T> {
    fn from(s: &'a [T]) -> Self {
        Self::Slice(s)
    }
}

impl<'a, T, const N: usize> From<&'a [T; N]> for WireList<'a, T> {
    fn from(s: &'a [T; N]) -> Self {
        Self::Slice(s)
    }
}

/// Iterator over a [`WireList`].
#[derive(Clone)]
pub enum WireIter<'a, T> {
    /// Over encoded items.
    Wire(core::slice::ChunksExact<'a, u8>),
    /// Over caller items.
    Slice(core::slice::Iter<'a, T>),
}

impl<T: WireItem> Iterator for WireIter<'_, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            Self::Wire(c) => c.next().map(T::read),
            Self::Slice(s) => s.next().copied(),
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match self {
            Self::Wire(c) => c.len(),
            Self::Slice(s) => s.len(),
        };
        (n, Some(n))
    }
}

impl<T: WireItem> ExactSizeIterator for WireIter<'_, T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_reads_past_its_slice() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16().unwrap(), 0x0201);
        assert_eq!(r.u16(), Err(DecodeError::Truncated { need: 2, have: 1 }));
        assert_eq!(r.u8().unwrap(), 3);
        assert!(r.finish(FrameType::ACK).is_ok());
    }

    #[test]
    fn list_length_overflow_is_an_error() {
        let mut r = Reader::new(&[0; 4]);
        assert!(r.list::<PageRun>(usize::MAX).is_err());
    }

    #[test]
    fn wire_and_slice_lists_compare_by_items() {
        let runs = [PageRun {
            start: PageIndex(7),
            count: 3,
        }];
        let mut bytes = Vec::new();
        WireList::from(&runs).write(&mut bytes);
        assert_eq!(bytes.len(), 12);
        let wire: WireList<'_, PageRun> = WireList::Wire(&bytes);
        assert_eq!(wire, WireList::from(&runs));
        assert_eq!(wire.get(0), Some(runs[0]));
        assert_eq!(wire.get(1), None);
    }
}
