//! Process signals: SIGUSR1 asks the source to migrate now, SIGTERM and SIGINT ask
//! the VMM to stop its guest and exit cleanly.

use std::sync::atomic::{AtomicBool, Ordering};

static MIGRATE_NOW: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: i32) {
    if sig == libc::SIGUSR1 {
        MIGRATE_NOW.store(true, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

/// Installs the handlers (once, at start).
pub fn install() {
    for sig in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to atomics (async-signal-safe); SA_RESTART
        // keeps other threads' blocking calls from failing with EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether SIGUSR1 arrived.
pub fn migrate_now() -> bool {
    MIGRATE_NOW.load(Ordering::Relaxed)
}

/// Whether SIGTERM or SIGINT arrived.
pub fn stop() -> bool {
    STOP.load(Ordering::Relaxed)
}
