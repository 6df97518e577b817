//! Ctrl-C handling for long runs: the first SIGINT asks the trainer to stop after the current
//! step and save a checkpoint; a second one kills the process as usual.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    // SAFETY: `signal` is async-signal-safe; restoring the default makes a second Ctrl-C fatal.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Installs the handler (Unix); elsewhere Ctrl-C keeps its default behaviour.
pub fn install() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls `signal`.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
