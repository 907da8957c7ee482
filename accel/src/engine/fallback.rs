//! The hardware→software fallback contract.
//!
//! A hardware [`Backend`](super::Backend) never drops a job and never turns a device
//! problem into a codec error. When the device cannot finish a job, the backend
//! completes it with [`Job::fall_back`](super::Job::fall_back) and a
//! [`FallbackCause`]; the [`Engine`](super::Engine) then runs that job on its own
//! software codecs, on the thread that polls, before handing the completion to the
//! caller. The caller sees an ordinary completion, run by
//! [`BackendKind::Software`](super::BackendKind::Software), whose
//! [`Completion::fallback`](super::Completion::fallback) names the cause; the engine
//! counts it in [`EngineStats::hw_fallbacks`](crate::EngineStats::hw_fallbacks) and,
//! per cause, in [`EngineStats::fallback_causes`](crate::EngineStats::fallback_causes).
//!
//! The engine also sends to software, with [`FallbackCause::Unsupported`], a job whose
//! format or level the hardware backend's [`Probe`](super::Probe) does not list but the
//! software codecs do (zstd on an IAA engine), instead of failing it.
//!
//! Whatever the device wrote before it gave up (a partial output, pages of a
//! partially completed decompress) is overwritten by the software run: for an encode
//! the payload buffer and length table are rewritten from the start, for a decode
//! every destination page is written again.

use core::fmt;

/// Why a hardware backend handed a job to software.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackCause {
    /// The work queue stayed full (ENQCMD rejected, no free slot in a dedicated queue,
    /// no free request in the device's ring) after the backend's bounded retries.
    QueueFull,
    /// The device reported a page fault it could not resolve, again after the backend
    /// touched the pages and resubmitted once.
    PageFault,
    /// The device's output did not fit the buffer it was given, in a case the backend
    /// cannot settle by itself (an encoder that sends incompressible pages raw
    /// handles that case itself and does not fall back).
    OutputOverflow,
    /// The device completed the job with an error status other than the above.
    DeviceError,
    /// No completion arrived within the backend's deadline (a hung descriptor); the
    /// backend abandoned the job (its buffers are not reused while the device might
    /// still write them).
    Timeout,
    /// The device or its queue was disabled or removed: this job and every later one
    /// go to software.
    DeviceLost,
    /// The hardware does not do this format or level; the software codecs do.
    Unsupported,
}

impl FallbackCause {
    /// Every cause, in the order of [`FallbackCounts`].
    pub const ALL: [FallbackCause; 7] = [
        FallbackCause::QueueFull,
        FallbackCause::PageFault,
        FallbackCause::OutputOverflow,
        FallbackCause::DeviceError,
        FallbackCause::Timeout,
        FallbackCause::DeviceLost,
        FallbackCause::Unsupported,
    ];

    /// A short lower-case name (`queue-full`, `page-fault`, ...), as statistics print it.
    pub fn name(self) -> &'static str {
        match self {
            FallbackCause::QueueFull => "queue-full",
            FallbackCause::PageFault => "page-fault",
            FallbackCause::OutputOverflow => "output-overflow",
            FallbackCause::DeviceError => "device-error",
            FallbackCause::Timeout => "timeout",
            FallbackCause::DeviceLost => "device-lost",
            FallbackCause::Unsupported => "unsupported",
        }
    }

    fn index(self) -> usize {
        match self {
            FallbackCause::QueueFull => 0,
            FallbackCause::PageFault => 1,
            FallbackCause::OutputOverflow => 2,
            FallbackCause::DeviceError => 3,
            FallbackCause::Timeout => 4,
            FallbackCause::DeviceLost => 5,
            FallbackCause::Unsupported => 6,
        }
    }
}

impl fmt::Display for FallbackCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Jobs handed to software, per [`FallbackCause`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FallbackCounts([u64; 7]);

impl FallbackCounts {
    /// Jobs that fell back for `cause`.
    pub fn of(&self, cause: FallbackCause) -> u64 {
        self.0[cause.index()]
    }

    /// Jobs that fell back, all causes together.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Counts one more job for `cause`.
    pub fn add(&mut self, cause: FallbackCause) {
        self.0[cause.index()] += 1;
    }

    /// Adds `other`'s counts to these (summing engines).
    pub fn merge(&mut self, other: &FallbackCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// The causes with a non-zero count, with their counts.
    pub fn iter(&self) -> impl Iterator<Item = (FallbackCause, u64)> + '_ {
        FallbackCause::ALL
            .into_iter()
            .map(|c| (c, self.of(c)))
            .filter(|&(_, n)| n > 0)
    }
}

impl fmt::Display for FallbackCounts {
    /// `0`, or `5 (queue-full 3, page-fault 2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.total())?;
        let mut first = true;
        for (cause, n) in self.iter() {
            f.write_str(if first { " (" } else { ", " })?;
            write!(f, "{cause} {n}")?;
            first = false;
        }
        if !first {
            f.write_str(")")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_cause_sum_merge_and_print() {
        let mut a = FallbackCounts::default();
        assert_eq!(a.to_string(), "0");
        a.add(FallbackCause::QueueFull);
        a.add(FallbackCause::QueueFull);
        a.add(FallbackCause::PageFault);
        let mut b = FallbackCounts::default();
        b.add(FallbackCause::DeviceLost);
        b.merge(&a);
        assert_eq!(b.of(FallbackCause::QueueFull), 2);
        assert_eq!(b.of(FallbackCause::Timeout), 0);
        assert_eq!(b.total(), 4);
        assert_eq!(
            b.to_string(),
            "4 (queue-full 2, page-fault 1, device-lost 1)"
        );
        let names: Vec<_> = FallbackCause::ALL.iter().map(|c| c.index()).collect();
        assert_eq!(names, (0..7).collect::<Vec<_>>());
    }
}
