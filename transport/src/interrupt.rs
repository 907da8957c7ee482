//! Ending a channel's blocked sends from another thread.
//!
//! A send blocks while the peer takes no data, for the channel's send timeout at most
//! (which may be `Duration::MAX`). A caller that must be able to give up sooner (a
//! VMM cancelling a migration) gives the channel an [`Interrupt`]
//! (`TcpChannel::set_interrupt`, `UringChannel::set_interrupt`): its sends then wait
//! in slices of [`SLICE`] and fail with [`ChannelError::Interrupted`] at the first slice
//! that ends with the interrupt raised. A send that does not have to wait is never
//! interrupted, so a frame sent after raising (an ABORT) still goes if there is room
//! for it. The channel is failed afterwards (a frame may have gone in part).
//!
//! [`ChannelError::Interrupted`]: crate::ChannelError::Interrupted

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a send of a channel with an [`Interrupt`] waits at a time before it looks
/// at the flag again.
pub const SLICE: Duration = Duration::from_millis(50);

/// A flag shared by the channels it was given to and whoever may raise it; clones are
/// the same flag. Raising it cannot be undone.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// A flag not raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the flag: every blocked send of every channel holding it fails within
    /// about [`SLICE`].
    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the flag was raised.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// How long one blocking wait of a send lasts at most: the whole send timeout, or with
/// an interrupt at most [`SLICE`].
pub(crate) fn slice(timeout: Duration, interrupt: Option<&Interrupt>) -> Duration {
    match interrupt {
        Some(_) => timeout.min(SLICE),
        None => timeout,
    }
}

/// How long a send may wait for the peer in all, and what ends its wait early.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendWait<'a> {
    pub(crate) timeout: Duration,
    pub(crate) interrupt: Option<&'a Interrupt>,
}
