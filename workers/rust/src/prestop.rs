//! drover's pre-stop notice. When a `SIGTERM` starts drover's pre-stop delay
//! (`prestop_delay`), drover sends each worker `SIGWINCH`: the worker goes on
//! serving, but should end keep-alive (answer with `Connection: close`), so
//! that when the stop comes its clients are not holding idle connections that
//! it must close under them. `SIGWINCH` is ignored by default, so a worker
//! that does not watch for it is unaffected.
//!
//! ```no_run
//! drover_worker::prestop::watch();
//! // ... for each response:
//! let keep_alive = !drover_worker::prestop::noticed();
//! # let _ = keep_alive;
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

static NOTICED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_notice(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    NOTICED.store(true, Ordering::Relaxed);
}

/// Installs the `SIGWINCH` handler that records the notice. A handler the
/// application installed before is left in place (and this one is not
/// installed): it is the application's to decide.
pub fn watch() {
    // SAFETY: sigaction with a handler that only does an atomic store; the
    // previous action is read first and restored if it was the
    // application's own.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGWINCH, std::ptr::null(), &mut old) != 0 {
            return;
        }
        if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
            return;
        }
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_notice as *const () as libc::sighandler_t;
        new.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        libc::sigaction(libc::SIGWINCH, &new, std::ptr::null_mut());
    }
}

/// Whether drover's pre-stop delay has begun (a `SIGWINCH` arrived since
/// [`watch`]): end keep-alive.
pub fn noticed() -> bool {
    NOTICED.load(Ordering::Relaxed)
}
