//! [`CodecError`]: what an encode or decode reports when it fails.

use pagewire_protocol::CodecId;

use super::Level;

/// Why an encode or decode failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A format the software codecs do not implement.
    #[error(
        "codec {0} is not supported; use one of raw, zero, zstd, lz4, deflate, delta, deflate-4k"
    )]
    Unsupported(CodecId),
    /// A level outside the format's range.
    #[error("level {level} is out of range {min}..={max} for {codec}")]
    BadLevel {
        /// The format.
        codec: CodecId,
        /// The refused level.
        level: Level,
        /// Lowest accepted level.
        min: Level,
        /// Highest accepted level.
        max: Level,
    },
    /// A job without pages (only `zero` frames have no data pages).
    #[error("{codec} needs at least one page")]
    NoPages {
        /// The format.
        codec: CodecId,
    },
    /// The payload buffer cannot hold the worst case.
    #[error("payload buffer of {have} bytes is below the {need} bytes this job may need")]
    OutputTooSmall {
        /// Bytes needed ([`max_payload_len`](super::max_payload_len)).
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A job with more pages than the backend or engine takes at once.
    #[error("a job of {pages} pages exceeds the limit of {max} pages per job")]
    TooManyPages {
        /// Pages in the job.
        pages: usize,
        /// The limit.
        max: usize,
    },
    /// Pages of another size than the engine's.
    #[error("{codec} frame of {page_size}-byte pages for an engine of {expected}-byte pages")]
    PageSize {
        /// The format.
        codec: CodecId,
        /// The frame's page size.
        page_size: usize,
        /// The engine's page size.
        expected: usize,
    },
    /// Delta encoding without a delta cache.
    #[error("delta encoding needs a delta cache; configure one for the engine")]
    NoDeltaCache,
    /// The delta cache was built for another page size.
    #[error("delta cache holds {cache}-byte pages, the job has {job}-byte pages")]
    DeltaPageSize {
        /// The cache's page size.
        cache: usize,
        /// The job's page size.
        job: usize,
    },
    /// A payload that decodes to more or fewer bytes than the destination holds.
    #[error("{codec} payload decodes to a size other than the destination's {expected} bytes")]
    SizeMismatch {
        /// The format.
        codec: CodecId,
        /// Bytes the destination holds.
        expected: usize,
    },
    /// A block payload longer than the pages it carries.
    #[error("{codec} payload of {len} bytes is longer than its {max} bytes of pages")]
    PayloadTooLong {
        /// The format.
        codec: CodecId,
        /// The payload length.
        len: usize,
        /// `data_pages × page_size`.
        max: usize,
    },
    /// A length table whose entry count differs from the destination's pages.
    #[error("length table has {entries} entries for {pages} pages")]
    TableEntries {
        /// Entries in the table.
        entries: usize,
        /// Pages in the destination.
        pages: usize,
    },
    /// A length table entry out of range for the format.
    #[error("page {page}: length {len} is invalid for {codec}")]
    BadPageLength {
        /// The format.
        codec: CodecId,
        /// The page's index in the frame.
        page: usize,
        /// The entry.
        len: u32,
    },
    /// A length table whose entries do not sum to the payload length.
    #[error("length table sums to {sum} bytes, the payload has {len}")]
    TableSum {
        /// Sum of the entries (saturated).
        sum: u64,
        /// The payload length.
        len: usize,
    },
    /// Anything else wrong in a payload.
    #[error("corrupt {codec} payload: {detail}")]
    Corrupt {
        /// The format.
        codec: CodecId,
        /// What was wrong.
        detail: &'static str,
    },
    /// A codec library could not allocate its context.
    #[error("{codec} context allocation failed: out of memory")]
    OutOfMemory {
        /// The format.
        codec: CodecId,
    },
}
