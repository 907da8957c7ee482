//! IAA descriptors and completion records, byte for byte as the Intel In-Memory
//! Analytics Accelerator architecture specification lays them out (and as Linux's
//! `include/uapi/linux/idxd.h` declares them: `struct iax_hw_desc`,
//! `struct iax_completion_record`).
//!
//! Building a descriptor is safe: it is 64 bytes of numbers. Handing it to a device
//! (a portal) is the unsafe step, because its addresses then get read and written.
//!
//! Descriptor (64 bytes, little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | PASID (bits 0–19), reserved, privilege (bit 31) |
//! | 4 | 4 | operation flags (bits 0–23), opcode (bits 24–31) |
//! | 8 | 8 | completion record address |
//! | 16 | 8 | source 1 address |
//! | 24 | 8 | destination address |
//! | 32 | 4 | source 1 size |
//! | 36 | 2 | interrupt handle |
//! | 38 | 2 | compression / decompression flags |
//! | 40 | 8 | source 2 address (AECS) |
//! | 48 | 4 | maximum destination size |
//! | 52 | 4 | source 2 size |
//! | 56 | 4 | filter flags |
//! | 60 | 4 | number of inputs |
//!
//! Completion record (64 bytes, 64-byte aligned; the device writes it):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 1 | status (bits 0–6; bit 7: the fault was on a write) |
//! | 1 | 1 | error code |
//! | 2 | 1 | fault info |
//! | 4 | 4 | bytes completed (of source 1, on a partial completion) |
//! | 8 | 8 | fault address |
//! | 16 | 4 | invalid flags |
//! | 24 | 4 | output size |
//! | 28 | 1 | output bits (valid bits of the last output byte) |
//! | 30 | 2 | XOR checksum |
//! | 32 | 4 | CRC |
//! | 36..48 | 12 | min, max, sum (analytics) |

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

/// Descriptor size in bytes.
pub const DESC_SIZE: usize = 64;
/// Completion record size (and alignment) in bytes.
pub const RECORD_SIZE: usize = 64;

/// IAA operation codes.
pub mod opcode {
    /// No operation.
    pub const NOOP: u8 = 0x00;
    /// Drain: completes once every earlier descriptor has.
    pub const DRAIN: u8 = 0x02;
    /// Decompress (inflate) source 1 into the destination.
    pub const DECOMPRESS: u8 = 0x42;
    /// Compress (deflate) source 1 into the destination.
    pub const COMPRESS: u8 = 0x43;
}

/// Operation flags (descriptor bytes 4–6).
pub mod op_flags {
    /// Fence: wait for earlier descriptors of a batch.
    pub const FENCE: u32 = 1 << 0;
    /// Block on fault: the device waits for the OS to resolve a page fault instead
    /// of reporting it.
    pub const BLOCK_ON_FAULT: u32 = 1 << 1;
    /// The completion record address is valid.
    pub const COMPLETION_ADDR_VALID: u32 = 1 << 2;
    /// Request a completion record (also on success).
    pub const REQUEST_COMPLETION: u32 = 1 << 3;
    /// Request a completion interrupt.
    pub const REQUEST_INTERRUPT: u32 = 1 << 4;
    /// Cache control: write the destination to the cache (else to memory).
    pub const CACHE_CONTROL: u32 = 1 << 8;
    /// Read source 2 as an AECS (the compress state: Huffman tables, history).
    pub const READ_SRC2_AECS: u32 = 1 << 16;
    /// Write the AECS back after compression.
    pub const WRITE_SRC2_AECS: u32 = 1 << 18;
    /// Write the AECS back on an output overflow only.
    pub const WRITE_SRC2_AECS_ON_OVERFLOW: u32 = 2 << 18;
    /// CRC per RFC 3720 (CRC32C) instead of the deflate CRC32.
    pub const CRC_RFC3720: u32 = 1 << 21;
    /// Select the second AECS of the pair.
    pub const AECS_SELECT: u32 = 1 << 22;
}

/// Compression flags (descriptor bytes 38–39, opcode `COMPRESS`).
pub mod compress_flags {
    /// Statistics mode: gather the histogram only (first pass of dynamic Huffman).
    pub const STATS_MODE: u16 = 1 << 0;
    /// Flush the output: write out the final partial byte.
    pub const FLUSH_OUTPUT: u16 = 1 << 1;
    /// End processing: append an end-of-block code.
    pub const APPEND_EOB: u16 = 1 << 2;
    /// End processing: append an end-of-block code and a final empty stored block,
    /// so the stream is complete (BFINAL seen).
    pub const APPEND_EOB_FINAL: u16 = 3 << 2;
    /// Generate the deflate block header (1-pass, `3` = final block header).
    pub const HEADER_GEN_FINAL: u16 = 3 << 12;
}

/// Decompression flags (descriptor bytes 38–39, opcode `DECOMPRESS`).
pub mod decompress_flags {
    /// Enable decompression (else the device only passes data through).
    pub const ENABLE: u16 = 1 << 0;
    /// Flush the output at the end.
    pub const FLUSH_OUTPUT: u16 = 1 << 1;
    /// Stop at the end-of-block code.
    pub const STOP_ON_EOB: u16 = 1 << 2;
    /// Report an error unless the stream ends with an end-of-block code.
    pub const CHECK_FOR_EOB: u16 = 1 << 3;
    /// With the two above: the end-of-block of the final (BFINAL) block.
    pub const SELECT_BFINAL_EOB: u16 = 1 << 4;
}

/// A completion status (record byte 0, bits 0–6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u8);

impl Status {
    /// Not yet written by the device.
    pub const NONE: Status = Status(0x00);
    /// Success.
    pub const SUCCESS: Status = Status(0x01);
    /// Page fault without block-on-fault: a partial completion (bytes completed and
    /// fault address are valid).
    pub const PAGE_FAULT_NOBOF: Status = Status(0x03);
    /// Page fault the OS could not resolve (page request service answered invalid).
    pub const PAGE_FAULT_IR: Status = Status(0x04);
    /// The analytics engine failed (a corrupt deflate stream; error code says more).
    pub const ANALYTICS_ERROR: Status = Status(0x0a);
    /// The output did not fit the maximum destination size.
    pub const OUTPUT_OVERFLOW: Status = Status(0x0b);
    /// Unknown opcode.
    pub const BAD_OPCODE: Status = Status(0x10);
    /// Invalid flags (see invalid flags).
    pub const INVALID_FLAGS: Status = Status(0x11);
    /// Non-zero reserved field.
    pub const NONZERO_RESERVED: Status = Status(0x12);
    /// Invalid size.
    pub const INVALID_SIZE: Status = Status(0x13);
    /// Overlapping buffers.
    pub const OVERLAPPING_BUFFERS: Status = Status(0x16);
    /// Completion record address not 64-byte aligned.
    pub const RECORD_ALIGN: Status = Status(0x1b);
    /// Misaligned address.
    pub const ADDR_ALIGN: Status = Status(0x1c);
    /// Hardware error.
    pub const HW_ERROR: Status = Status(0x20);
    /// Address translation failed.
    pub const TRANSLATION_FAIL: Status = Status(0x22);
    /// Page request timed out.
    pub const PRS_TIMEOUT: Status = Status(0x23);
    /// Watchdog expired.
    pub const WATCHDOG: Status = Status(0x24);
    /// Invalid compression flags.
    pub const INVALID_COMPRESS_FLAGS: Status = Status(0x30);

    /// Whether this is one of the page-fault statuses.
    pub fn is_page_fault(self) -> bool {
        self == Status::PAGE_FAULT_NOBOF || self == Status::PAGE_FAULT_IR
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Status::NONE => "none",
            Status::SUCCESS => "success",
            Status::PAGE_FAULT_NOBOF => "page-fault",
            Status::PAGE_FAULT_IR => "page-fault-ir",
            Status::ANALYTICS_ERROR => "analytics-error",
            Status::OUTPUT_OVERFLOW => "output-overflow",
            Status::BAD_OPCODE => "bad-opcode",
            Status::INVALID_FLAGS => "invalid-flags",
            Status::INVALID_SIZE => "invalid-size",
            Status::HW_ERROR => "hw-error",
            _ => return write!(f, "Status({:#04x})", self.0),
        };
        f.write_str(name)
    }
}

/// One 64-byte IAA descriptor (see the module documentation for the layout).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct Descriptor(pub [u8; DESC_SIZE]);

impl Default for Descriptor {
    fn default() -> Self {
        Descriptor([0; DESC_SIZE])
    }
}

impl fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Descriptor")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("flags", &format_args!("{:#08x}", self.flags()))
            .field("src1", &format_args!("{:#x}", self.src1_addr()))
            .field("src1_size", &self.src1_size())
            .field("dst", &format_args!("{:#x}", self.dst_addr()))
            .field("max_dst_size", &self.max_dst_size())
            .field("record", &format_args!("{:#x}", self.completion_addr()))
            .finish()
    }
}

macro_rules! field {
    ($get:ident, $set:ident, $ty:ty, $off:expr, $doc:literal) => {
        #[doc = concat!("The ", $doc, ".")]
        pub fn $get(&self) -> $ty {
            const N: usize = core::mem::size_of::<$ty>();
            let mut b = [0u8; N];
            b.copy_from_slice(&self.0[$off..$off + N]);
            <$ty>::from_le_bytes(b)
        }
        #[doc = concat!("Sets the ", $doc, ".")]
        pub fn $set(&mut self, v: $ty) -> &mut Self {
            const N: usize = core::mem::size_of::<$ty>();
            self.0[$off..$off + N].copy_from_slice(&v.to_le_bytes());
            self
        }
    };
}

impl Descriptor {
    field!(
        pasid_word,
        set_pasid_word,
        u32,
        0,
        "PASID / privilege word (bytes 0–3)"
    );
    field!(
        completion_addr,
        set_completion_addr,
        u64,
        8,
        "completion record address"
    );
    field!(src1_addr, set_src1_addr, u64, 16, "source 1 address");
    field!(dst_addr, set_dst_addr, u64, 24, "destination address");
    field!(src1_size, set_src1_size, u32, 32, "source 1 size");
    field!(int_handle, set_int_handle, u16, 36, "interrupt handle");
    field!(
        op_specific_flags,
        set_op_specific_flags,
        u16,
        38,
        "compression or decompression flags"
    );
    field!(src2_addr, set_src2_addr, u64, 40, "source 2 (AECS) address");
    field!(
        max_dst_size,
        set_max_dst_size,
        u32,
        48,
        "maximum destination size"
    );
    field!(src2_size, set_src2_size, u32, 52, "source 2 size");
    field!(filter_flags, set_filter_flags, u32, 56, "filter flags");
    field!(num_inputs, set_num_inputs, u32, 60, "number of inputs");

    fn word1(&self) -> u32 {
        u32::from_le_bytes([self.0[4], self.0[5], self.0[6], self.0[7]])
    }

    fn set_word1(&mut self, w: u32) {
        self.0[4..8].copy_from_slice(&w.to_le_bytes());
    }

    /// The opcode (byte 7).
    pub fn opcode(&self) -> u8 {
        (self.word1() >> 24) as u8
    }

    /// The operation flags (bits 0–23 of bytes 4–7).
    pub fn flags(&self) -> u32 {
        self.word1() & 0x00ff_ffff
    }

    /// Sets the opcode and the operation flags (only their low 24 bits count).
    pub fn set_op(&mut self, opcode: u8, flags: u32) -> &mut Self {
        self.set_word1((u32::from(opcode) << 24) | (flags & 0x00ff_ffff));
        self
    }

    /// The PASID (bits 0–19 of bytes 0–3).
    pub fn pasid(&self) -> u32 {
        self.pasid_word() & 0x000f_ffff
    }

    /// Whether the privilege bit (bit 31) is set.
    pub fn privileged(&self) -> bool {
        self.pasid_word() & (1 << 31) != 0
    }

    /// A compress descriptor: deflate `src_len` bytes at `src` into at most `max_dst`
    /// bytes at `dst`, one complete raw deflate stream (final block, end of block),
    /// the completion written to `record`. History is the device's: 4 KiB.
    ///
    /// Without `aecs` the device uses the fixed Huffman code and generates the final
    /// block's header itself (header generation `3`), and ends the stream with an
    /// end-of-block code and a final empty stored block. With `aecs` (address, size)
    /// the device reads that compress AECS ([`super::aecs`]): it emits the AECS's
    /// output accumulator (where the host wrote the dynamic block's header, BFINAL
    /// set) and codes the tokens with the AECS's Huffman table, appending that
    /// table's end-of-block code (end processing `1`); no header generation.
    pub fn compress(
        src: u64,
        src_len: u32,
        dst: u64,
        max_dst: u32,
        record: u64,
        aecs: Option<(u64, u32)>,
    ) -> Descriptor {
        let mut d = Descriptor::default();
        let mut flags = op_flags::COMPLETION_ADDR_VALID
            | op_flags::REQUEST_COMPLETION
            | op_flags::CACHE_CONTROL;
        if aecs.is_some() {
            flags |= op_flags::READ_SRC2_AECS;
        }
        d.set_op(opcode::COMPRESS, flags)
            .set_completion_addr(record)
            .set_src1_addr(src)
            .set_src1_size(src_len)
            .set_dst_addr(dst)
            .set_max_dst_size(max_dst)
            .set_op_specific_flags(match aecs {
                None => {
                    compress_flags::FLUSH_OUTPUT
                        | compress_flags::APPEND_EOB_FINAL
                        | compress_flags::HEADER_GEN_FINAL
                }
                Some(_) => compress_flags::FLUSH_OUTPUT | compress_flags::APPEND_EOB,
            });
        if let Some((addr, len)) = aecs {
            d.set_src2_addr(addr).set_src2_size(len);
        }
        d
    }

    /// A compress descriptor in statistics mode, the first pass of dynamic Huffman:
    /// the device parses `src_len` bytes at `src` as it would compress them and
    /// writes the literal/length and distance histogram (1280 bytes, see
    /// [`super::aecs::Histogram`]) to `histogram`, the completion to `record`. No
    /// AECS is read.
    pub fn statistics(src: u64, src_len: u32, histogram: u64, record: u64) -> Descriptor {
        let mut d = Descriptor::default();
        d.set_op(
            opcode::COMPRESS,
            op_flags::COMPLETION_ADDR_VALID | op_flags::REQUEST_COMPLETION,
        )
        .set_completion_addr(record)
        .set_src1_addr(src)
        .set_src1_size(src_len)
        .set_dst_addr(histogram)
        .set_max_dst_size(super::aecs::HISTOGRAM_SIZE as u32)
        .set_op_specific_flags(compress_flags::STATS_MODE);
        d
    }

    /// Whether this is a statistics-mode compress descriptor.
    pub fn is_statistics(&self) -> bool {
        self.opcode() == opcode::COMPRESS
            && self.op_specific_flags() & compress_flags::STATS_MODE != 0
    }

    /// A decompress descriptor: inflate the complete raw deflate stream of `src_len`
    /// bytes at `src` into at most `max_dst` bytes at `dst` (straight into the
    /// destination pages), the completion written to `record`.
    pub fn decompress(src: u64, src_len: u32, dst: u64, max_dst: u32, record: u64) -> Descriptor {
        let mut d = Descriptor::default();
        d.set_op(
            opcode::DECOMPRESS,
            op_flags::COMPLETION_ADDR_VALID
                | op_flags::REQUEST_COMPLETION
                | op_flags::CACHE_CONTROL,
        )
        .set_completion_addr(record)
        .set_src1_addr(src)
        .set_src1_size(src_len)
        .set_dst_addr(dst)
        .set_max_dst_size(max_dst)
        .set_op_specific_flags(
            decompress_flags::ENABLE
                | decompress_flags::FLUSH_OUTPUT
                | decompress_flags::STOP_ON_EOB
                | decompress_flags::CHECK_FOR_EOB
                | decompress_flags::SELECT_BFINAL_EOB,
        );
        d
    }
}

/// What a completion record says, read once the status is non-zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// The status (bits 0–6 of byte 0).
    pub status: u8,
    /// Whether a reported page fault was on a write (bit 7 of byte 0).
    pub fault_on_write: bool,
    /// Error code (byte 1).
    pub error_code: u8,
    /// Fault info (byte 2).
    pub fault_info: u8,
    /// Source bytes completed before a fault (bytes 4–7).
    pub bytes_completed: u32,
    /// The faulting address (bytes 8–15).
    pub fault_addr: u64,
    /// Which descriptor fields were invalid (bytes 16–19).
    pub invalid_flags: u32,
    /// Output bytes written (bytes 24–27).
    pub output_size: u32,
    /// Valid bits in the last output byte, 0 meaning all 8 (byte 28).
    pub output_bits: u8,
    /// CRC of the uncompressed data (bytes 32–35).
    pub crc: u32,
}

impl Completed {
    /// The status as a [`Status`].
    pub fn status(&self) -> Status {
        Status(self.status)
    }

    /// Encodes the record's 64 bytes (what a device writes; the device model uses it).
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0] = (self.status & 0x7f) | if self.fault_on_write { 0x80 } else { 0 };
        b[1] = self.error_code;
        b[2] = self.fault_info;
        b[4..8].copy_from_slice(&self.bytes_completed.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.invalid_flags.to_le_bytes());
        b[24..28].copy_from_slice(&self.output_size.to_le_bytes());
        b[28] = self.output_bits;
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes a record's 64 bytes.
    pub fn from_bytes(b: &[u8; RECORD_SIZE]) -> Completed {
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut fa = [0u8; 8];
        fa.copy_from_slice(&b[8..16]);
        Completed {
            status: b[0] & 0x7f,
            fault_on_write: b[0] & 0x80 != 0,
            error_code: b[1],
            fault_info: b[2],
            bytes_completed: u32at(4),
            fault_addr: u64::from_le_bytes(fa),
            invalid_flags: u32at(16),
            output_size: u32at(24),
            output_bits: b[28],
            crc: u32at(32),
        }
    }
}

/// A completion record the device writes (64 bytes, 64-byte aligned as IAA
/// requires). Its status byte is read atomically; the rest only once the status is
/// non-zero.
#[repr(C, align(64))]
pub struct CompletionRecord(UnsafeCell<[u8; RECORD_SIZE]>);

// SAFETY: the record is shared with a device (or the device model's thread) that
// writes it; all access goes through raw pointers with the status byte read and
// written atomically (acquire / release), which orders the other bytes.
unsafe impl Sync for CompletionRecord {}
// SAFETY: as above; it holds plain bytes.
unsafe impl Send for CompletionRecord {}

impl Default for CompletionRecord {
    fn default() -> Self {
        CompletionRecord(UnsafeCell::new([0; RECORD_SIZE]))
    }
}

impl fmt::Debug for CompletionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompletionRecord({:?})", self.status())
    }
}

impl CompletionRecord {
    /// The record's address, for a descriptor.
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    fn status_byte(&self) -> &AtomicU8 {
        // SAFETY: byte 0 of the record is a valid, aligned u8 for the record's
        // lifetime, and every access to it (ours and the writer's) is atomic.
        unsafe { AtomicU8::from_ptr(self.0.get().cast::<u8>()) }
    }

    /// The status so far ([`Status::NONE`] until the device wrote the record).
    pub fn status(&self) -> Status {
        Status(self.status_byte().load(Ordering::Acquire) & 0x7f)
    }

    /// Whether the device wrote the record.
    pub fn is_done(&self) -> bool {
        self.status() != Status::NONE
    }

    /// Clears the status before the record's descriptor is submitted (again).
    pub fn reset(&self) {
        self.status_byte().store(0, Ordering::Release);
    }

    /// The whole record, once [`CompletionRecord::is_done`].
    pub fn read(&self) -> Completed {
        let status = self.status_byte().load(Ordering::Acquire);
        let mut b = [0u8; RECORD_SIZE];
        // SAFETY: the writer stored bytes 1.. before it released the status we just
        // acquired, and does not write the record again until it is resubmitted.
        // Byte 0 is taken from the atomic load.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.0.get().cast::<u8>().add(1),
                b.as_mut_ptr().add(1),
                RECORD_SIZE - 1,
            );
        }
        b[0] = status;
        Completed::from_bytes(&b)
    }

    /// Writes a record at `addr` as a device does: every byte but the status, then
    /// the status with release ordering.
    ///
    /// # Safety
    /// `addr` must be the address of a live [`CompletionRecord`] whose descriptor
    /// was submitted and not yet completed.
    pub unsafe fn write_at(addr: u64, rec: &Completed) {
        let bytes = rec.to_bytes();
        let p = addr as *mut u8;
        // SAFETY: per the contract, `p` is a live record of 64 bytes; bytes 1.. are
        // not read until the status below is released.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr().add(1), p.add(1), RECORD_SIZE - 1);
            AtomicU8::from_ptr(p).store(bytes[0], Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_64_bytes_and_records_64_byte_aligned() {
        assert_eq!(core::mem::size_of::<Descriptor>(), 64);
        assert_eq!(core::mem::size_of::<CompletionRecord>(), 64);
        assert_eq!(core::mem::align_of::<CompletionRecord>(), 64);
        let recs: Vec<CompletionRecord> = (0..3).map(|_| CompletionRecord::default()).collect();
        assert!(recs.iter().all(|r| r.addr() % 64 == 0));
    }

    #[test]
    fn compress_descriptor_fields_sit_at_the_specified_offsets() {
        let d = Descriptor::compress(
            0x1111_2222_3333_4440,
            4096,
            0x5555_6666_7777_8880,
            4095,
            0x9999_aaaa_bbbb_cc00,
            Some((0xdddd_0000, 1568)),
        );
        let b = &d.0;
        assert_eq!(
            &b[0..4],
            &[0, 0, 0, 0],
            "no PASID (the kernel fills it for ENQCMD)"
        );
        // Flags: CRAV | RCR | CC | read AECS = 0x01_010c, opcode 0x43 in byte 7.
        assert_eq!(&b[4..8], &[0x0c, 0x01, 0x01, 0x43]);
        assert_eq!(d.opcode(), opcode::COMPRESS);
        assert_eq!(&b[8..16], &0x9999_aaaa_bbbb_cc00u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1111_2222_3333_4440u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x5555_6666_7777_8880u64.to_le_bytes());
        assert_eq!(&b[32..36], &4096u32.to_le_bytes());
        assert_eq!(&b[36..38], &[0, 0], "no interrupt handle");
        // With an AECS: flush output (bit 1), end processing 1 = append the table's
        // EOB (bits 2-3), no header generation (the header is in the AECS): 0x0006.
        assert_eq!(&b[38..40], &[0x06, 0x00]);
        assert_eq!(&b[40..48], &0xdddd_0000u64.to_le_bytes());
        assert_eq!(&b[48..52], &4095u32.to_le_bytes());
        assert_eq!(&b[52..56], &1568u32.to_le_bytes());
        assert_eq!(&b[56..64], &[0; 8]);
        let fixed = Descriptor::compress(1, 2, 3, 4, 64, None);
        assert_eq!(fixed.flags() & op_flags::READ_SRC2_AECS, 0);
        assert_eq!((fixed.src2_addr(), fixed.src2_size()), (0, 0));
        // Fixed: flush output (bit 1), EOB + final block (bits 2-3 = 3), 1-pass
        // final header generation (bits 12-14 = 3): 0x300e.
        assert_eq!(&fixed.0[38..40], &[0x0e, 0x30]);
        assert!(!fixed.is_statistics() && !d.is_statistics());
    }

    #[test]
    fn statistics_descriptor_fields_sit_at_the_specified_offsets() {
        let d = Descriptor::statistics(0x1000, 4096, 0x2120, 0x3040);
        let b = &d.0;
        // CRAV | RCR, no AECS read, opcode 0x43.
        assert_eq!(&b[4..8], &[0x0c, 0x00, 0x00, 0x43]);
        assert_eq!(&b[8..16], &0x3040u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x2120u64.to_le_bytes());
        assert_eq!(&b[32..36], &4096u32.to_le_bytes());
        // Statistics mode only (bit 0).
        assert_eq!(&b[38..40], &[0x01, 0x00]);
        assert_eq!(&b[40..48], &[0; 8], "no AECS");
        assert_eq!(&b[48..52], &1280u32.to_le_bytes(), "histogram size");
        assert_eq!(&b[52..64], &[0; 12]);
        assert!(d.is_statistics());
    }

    #[test]
    fn decompress_descriptor_fields_sit_at_the_specified_offsets() {
        let d = Descriptor::decompress(0x1000, 777, 0x2000, 4096, 0x3040);
        let b = &d.0;
        assert_eq!(&b[4..8], &[0x0c, 0x01, 0x00, 0x42]);
        assert_eq!(d.flags(), 0x10c);
        assert_eq!(&b[8..16], &0x3040u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x2000u64.to_le_bytes());
        assert_eq!(&b[32..36], &777u32.to_le_bytes());
        // Enable | flush | stop on EOB | check EOB | BFINAL EOB = 0x1f.
        assert_eq!(&b[38..40], &[0x1f, 0x00]);
        assert_eq!(&b[48..52], &4096u32.to_le_bytes());
        assert_eq!(d.pasid(), 0);
        assert!(!d.privileged());
        let mut p = d;
        p.set_pasid_word(0x8000_0000 | 0xabcde);
        assert_eq!((p.pasid(), p.privileged()), (0xabcde, true));
    }

    #[test]
    fn completion_record_fields_round_trip_at_their_offsets() {
        let c = Completed {
            status: Status::PAGE_FAULT_NOBOF.0,
            fault_on_write: true,
            error_code: 0x21,
            fault_info: 0x02,
            bytes_completed: 0x0102_0304,
            fault_addr: 0x7fff_0000_1000,
            invalid_flags: 0x00ab_cdef,
            output_size: 0x0000_0a0b,
            output_bits: 5,
            crc: 0xdead_beef,
        };
        let b = c.to_bytes();
        assert_eq!(b[0], 0x83);
        assert_eq!(b[1], 0x21);
        assert_eq!(b[2], 0x02);
        assert_eq!(b[3], 0);
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(&b[8..16], &0x7fff_0000_1000u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0xef, 0xcd, 0xab, 0]);
        assert_eq!(&b[24..28], &[0x0b, 0x0a, 0, 0]);
        assert_eq!(b[28], 5);
        assert_eq!(&b[32..36], &[0xef, 0xbe, 0xad, 0xde]);
        assert!(b[36..].iter().all(|&x| x == 0));
        assert_eq!(Completed::from_bytes(&b), c);
        assert!(c.status().is_page_fault());

        let rec = CompletionRecord::default();
        assert!(!rec.is_done());
        // SAFETY: `rec` is a live record.
        unsafe { CompletionRecord::write_at(rec.addr(), &c) };
        assert_eq!(rec.status(), Status::PAGE_FAULT_NOBOF);
        assert_eq!(rec.read(), c);
        rec.reset();
        assert_eq!(rec.status(), Status::NONE);
    }

    #[test]
    fn status_codes_match_the_idxd_uapi_values() {
        assert_eq!(Status::SUCCESS.0, 0x01);
        assert_eq!(Status::PAGE_FAULT_IR.0, 0x04);
        assert_eq!(Status::ANALYTICS_ERROR.0, 0x0a);
        assert_eq!(Status::OUTPUT_OVERFLOW.0, 0x0b);
        assert_eq!(Status::BAD_OPCODE.0, 0x10);
        assert_eq!(Status::INVALID_SIZE.0, 0x13);
        assert_eq!(Status::ADDR_ALIGN.0, 0x1c);
        assert_eq!(Status::WATCHDOG.0, 0x24);
        assert_eq!(Status::INVALID_COMPRESS_FLAGS.0, 0x30);
        assert_eq!(format!("{:?}", Status(0x55)), "Status(0x55)");
        assert_eq!(op_flags::READ_SRC2_AECS, 0x01_0000);
        assert_eq!(op_flags::CRC_RFC3720, 0x20_0000);
    }
}
