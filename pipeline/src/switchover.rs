//! How the hand-over of the guest ended on the source (PROTOCOL.md, Switchover).

use crate::error::{Failed, MigrationError};

/// What [`Source::complete`](crate::Source::complete) learnt about the hand-over of the
/// guest, once COMMIT may have left: either the destination owns the guest, or nobody
/// here can tell. (A failure before COMMIT is `Err(Failed)` instead: the destination
/// cannot run the guest, and the source may resume it.)
///
/// Neither variant allows resuming the guest on the source:
///
/// | result of `complete()` | destination | the VMM on the source |
/// | --- | --- | --- |
/// | `Err(Failed)` | failed, cannot run the guest | may resume the guest |
/// | `Ok(Switchover::Committed)` | owns and runs the guest | discards the guest |
/// | `Ok(Switchover::Unknown { .. })` | may or may not run it | keeps it paused, neither resumes nor discards it, and asks the management layer |
///
/// Deliberately not `#[non_exhaustive]`: a VMM matches every outcome, and a new one
/// would not fall silently into a catch-all arm.
#[must_use = "on Switchover::Unknown the guest must stay paused: resuming it may run it on both hosts"]
#[derive(Debug)]
pub enum Switchover {
    /// ACK COMMITTED arrived: the destination owns the guest and runs it. Never resume
    /// it here.
    Committed,
    /// COMMIT was handed to channel 0, whole or in part, but ACK COMMITTED did not
    /// arrive: the destination may or may not own the guest. Keep the guest paused here,
    /// neither resume nor discard it, until the management layer learns from the
    /// destination whether it reported success (like libvirt's Confirm step): if it did,
    /// discard the guest here; if it reported failure, resume it here.
    Unknown {
        /// Why ACK COMMITTED did not arrive (a channel error, a timeout, an ABORT).
        error: Box<MigrationError>,
    },
}

impl Switchover {
    /// Whether the destination acknowledged COMMIT and owns the guest.
    pub fn is_committed(&self) -> bool {
        matches!(self, Switchover::Committed)
    }

    /// `Ok(())` when committed; otherwise a [`Failed`] with
    /// [`MigrationError::OutcomeUnknown`], whose
    /// [`may_resume_source`](Failed::may_resume_source) is `false`.
    ///
    /// # Errors
    /// When the outcome is unknown.
    pub fn into_result(self) -> Result<(), Failed> {
        match self {
            Switchover::Committed => Ok(()),
            Switchover::Unknown { error } => Err(Failed::bare(MigrationError::OutcomeUnknown {
                source: error,
            })),
        }
    }
}
