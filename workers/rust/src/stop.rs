//! Stop requests: SIGTERM and SIGINT (graceful), SIGQUIT (quick).
//!
//! A signal handler may only do async-signal-safe work, so ours does three
//! things and returns: it records the kind of stop in an atomic (quick wins
//! over graceful, a stop is never downgraded), stamps the time of the first
//! request, and writes one byte to a non-blocking self-pipe. The pipe is never
//! drained, so its read end ([`Stop::fd`]) stays readable from the first stop
//! on: any number of threads can `poll()` it next to their sockets, and an
//! async runtime can watch it, without a wake-up being "consumed" by one of them.
//! In async code, [`Stop::stopped`] is a future for the same (any runtime,
//! any number of waiters).
//!
//! Installing does not take a signal away from the application: if a function
//! handler was installed before, ours calls it afterwards (as `sa_handler` or
//! `sa_sigaction`, as it was registered). An application that wants Ctrl+C for
//! itself can leave SIGINT alone with [`StopBuilder::sigint`]; one that wants
//! nothing of this simply does not call [`Stop::install`].

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libc::c_int;

pub use crate::stopped::Stopped;

/// What has been asked of the worker so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StopState {
    /// No stop requested.
    Running,
    /// SIGTERM or SIGINT: stop accepting, finish in-flight work, clean up, exit 0.
    Graceful,
    /// SIGQUIT: stop now; clean up within a short budget and exit.
    Quick,
}

const RUNNING: u8 = 0;
const GRACEFUL: u8 = 1;
const QUICK: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(RUNNING);
/// CLOCK_MONOTONIC nanoseconds of the first stop request (0: none yet).
static REQUESTED_AT_NS: AtomicU64 = AtomicU64::new(0);
/// The same for the first quick stop request: drover's quick deadline counts
/// from there (see [`crate::cleanup::remaining_budget`]).
static QUICK_AT_NS: AtomicU64 = AtomicU64::new(0);
static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// The signals handled, and per signal the handler that was there before us.
const SIGNALS: [c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];
static PREV_HANDLER: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];
static PREV_FLAGS: [AtomicI32; 3] = [const { AtomicI32::new(0) }; 3];

static INSTALLED: Mutex<Option<Stop>> = Mutex::new(None);

/// Handle on the worker's stop state. Cheap to clone, shareable across threads.
/// Obtained from [`Stop::install`] (or [`install`]); all handles are the same.
#[derive(Clone, Debug)]
pub struct Stop {
    read_fd: RawFd,
}

/// Options for [`Stop::builder`].
#[derive(Clone, Debug)]
pub struct StopBuilder {
    sigint: bool,
}

impl Default for StopBuilder {
    fn default() -> Self {
        StopBuilder { sigint: true }
    }
}

impl StopBuilder {
    /// Whether SIGINT counts as a graceful stop (default: yes). With `false`,
    /// SIGINT's disposition is left exactly as the application set it.
    pub fn sigint(mut self, handle: bool) -> Self {
        self.sigint = handle;
        self
    }

    /// Installs the handlers; panics if the self-pipe cannot be created (see
    /// [`StopBuilder::try_install`]).
    pub fn install(self) -> Stop {
        self.try_install()
            .unwrap_or_else(|e| panic!("drover-worker: cannot install stop handlers: {e}"))
    }

    /// Installs the handlers, once per process: later calls return the same
    /// [`Stop`] and ignore their options.
    pub fn try_install(self) -> io::Result<Stop> {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stop) = installed.as_ref() {
            return Ok(stop.clone());
        }
        let (read_fd, write_fd) = self_pipe()?;
        PIPE_READ.store(read_fd, Ordering::SeqCst);
        PIPE_WRITE.store(write_fd, Ordering::SeqCst);
        for (slot, &sig) in SIGNALS.iter().enumerate() {
            if sig == libc::SIGINT && !self.sigint {
                continue;
            }
            install_handler(slot, sig)?;
        }
        let stop = Stop { read_fd };
        *installed = Some(stop.clone());
        Ok(stop)
    }
}

/// Same as [`Stop::install`].
pub fn install() -> Stop {
    Stop::install()
}

impl Stop {
    /// Installs handlers for SIGTERM, SIGINT and SIGQUIT (chaining to any
    /// installed before) and returns the handle. Idempotent.
    pub fn install() -> Stop {
        StopBuilder::default().install()
    }

    /// Options: `Stop::builder().sigint(false).install()`.
    pub fn builder() -> StopBuilder {
        StopBuilder::default()
    }

    /// Whether a stop was asked for, and which.
    pub fn state(&self) -> StopState {
        current_state()
    }

    /// A stop was asked for (graceful or quick).
    pub fn is_stopping(&self) -> bool {
        self.state() != StopState::Running
    }

    /// Blocks until a stop is requested.
    pub fn wait(&self) {
        while !self.is_stopping() {
            poll_readable(self.read_fd, -1);
        }
    }

    /// Blocks until a stop is requested or `timeout` passes; returns whether
    /// a stop was requested.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_stopping() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as c_int;
            poll_readable(self.read_fd, ms);
        }
    }

    /// A future that completes once a stop is requested (graceful or quick),
    /// with the stop state then. Runtime-agnostic (no dependency on tokio),
    /// `Send + 'static`; create as many as needed:
    ///
    /// ```no_run
    /// # async fn serve() {}
    /// # async fn example() {
    /// let stop = drover_worker::Stop::install();
    /// // e.g. axum::serve(listener, app).with_graceful_shutdown(stop.stopped())
    /// let state = stop.stopped().await;
    /// # let _ = state;
    /// # }
    /// ```
    ///
    /// Requires [`Stop::install`] (a `Stop` comes from nothing else). The
    /// first one polled starts a small thread that wakes the futures: a
    /// signal handler cannot wake them itself.
    pub fn stopped(&self) -> Stopped {
        Stopped::new(StopState::Graceful)
    }

    /// A future that completes once the stop state is at least `state`:
    /// `reached(StopState::Quick)` completes at a SIGQUIT (also one that
    /// escalates a graceful stop), for example to cut a drain short.
    /// `Running` counts as `Graceful`.
    pub fn reached(&self, state: StopState) -> Stopped {
        Stopped::new(state)
    }

    /// A file descriptor that becomes readable once a stop is requested and
    /// stays readable. Poll it next to your sockets; do not read from it or
    /// close it.
    pub fn fd(&self) -> RawFd {
        self.read_fd
    }

    /// Requests a stop from inside the program, exactly as the signal would
    /// (`Running` is ignored: a stop cannot be taken back).
    pub fn request(&self, state: StopState) {
        match state {
            StopState::Running => {}
            StopState::Graceful => record(GRACEFUL),
            StopState::Quick => record(QUICK),
        }
    }

    /// Time since the first stop request, if there was one.
    pub fn elapsed(&self) -> Option<Duration> {
        elapsed_since_request()
    }
}

/// Time since the first stop request, if the handlers are installed and a
/// stop was requested (used to measure the remaining grace budget).
pub(crate) fn elapsed_since_request() -> Option<Duration> {
    elapsed_since(&REQUESTED_AT_NS)
}

/// Time since the first quick stop request (SIGQUIT, or an escalation), if any.
pub(crate) fn elapsed_since_quick() -> Option<Duration> {
    elapsed_since(&QUICK_AT_NS)
}

fn elapsed_since(stamp: &AtomicU64) -> Option<Duration> {
    match stamp.load(Ordering::SeqCst) {
        0 => None,
        at => Some(Duration::from_nanos(monotonic_ns().saturating_sub(at))),
    }
}

pub(crate) fn current_state() -> StopState {
    match STATE.load(Ordering::SeqCst) {
        RUNNING => StopState::Running,
        GRACEFUL => StopState::Graceful,
        _ => StopState::Quick,
    }
}

/// Records a stop request of `kind`. The state only goes up (`fetch_max`):
/// quick wins over graceful and is never downgraded.
/// Async-signal-safe: atomics, clock_gettime and write only.
fn record(kind: u8) {
    let now = monotonic_ns().max(1);
    let _ = REQUESTED_AT_NS.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    if kind == QUICK {
        let _ = QUICK_AT_NS.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    }
    STATE.fetch_max(kind, Ordering::SeqCst);
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // A full pipe (EAGAIN) is fine: it is already readable.
        // SAFETY: writing one byte from a valid local to an fd we own.
        unsafe { libc::write(fd, &kind as *const u8 as *const libc::c_void, 1) };
    }
    crate::stopped::notify_waker_thread();
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime is async-signal-safe and writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

extern "C" fn on_signal(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let saved_errno = errno();
    record(if sig == libc::SIGQUIT {
        QUICK
    } else {
        GRACEFUL
    });
    if let Some(slot) = SIGNALS.iter().position(|&s| s == sig) {
        let prev = PREV_HANDLER[slot].load(Ordering::SeqCst);
        if prev != libc::SIG_DFL && prev != libc::SIG_IGN && prev != handler_address() {
            // SAFETY: `prev` was read back from sigaction() as the address of
            // a handler with the signature its SA_SIGINFO flag declares.
            unsafe {
                if PREV_FLAGS[slot].load(Ordering::SeqCst) & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(prev);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(c_int) = std::mem::transmute(prev);
                    f(sig);
                }
            }
        }
    }
    set_errno(saved_errno);
}

/// Our handler as `sigaction` stores it.
fn handler_address() -> libc::sighandler_t {
    on_signal as *const () as libc::sighandler_t
}

fn install_handler(slot: usize, sig: c_int) -> io::Result<()> {
    // SAFETY: sigaction with zero-initialised structs we own.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Ctrl+C explicitly ignored (e.g. by a shell for a background job)
        // stays ignored, as Python does for its KeyboardInterrupt handler.
        if sig == libc::SIGINT && old.sa_sigaction == libc::SIG_IGN {
            return Ok(());
        }
        if old.sa_sigaction != handler_address() {
            PREV_FLAGS[slot].store(old.sa_flags, Ordering::SeqCst);
            PREV_HANDLER[slot].store(old.sa_sigaction, Ordering::SeqCst);
        }
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = handler_address();
        new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        if libc::sigaction(sig, &new, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A non-blocking, close-on-exec pipe (so that programs the worker runs do not
/// inherit it).
pub(crate) fn self_pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: pipe2/fcntl on a local array and the fds it returns.
    unsafe {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            if libc::pipe(fds.as_mut_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            for fd in fds {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
            }
        }
    }
    Ok((fds[0], fds[1]))
}

fn poll_readable(fd: RawFd, timeout_ms: c_int) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own; EINTR simply returns to the caller's loop.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn errno_location() -> *mut c_int {
    // SAFETY: returns the calling thread's errno slot.
    unsafe { libc::__errno_location() }
}

#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
fn errno_location() -> *mut c_int {
    // SAFETY: returns the calling thread's errno slot.
    unsafe { libc::__error() }
}

fn errno() -> c_int {
    // SAFETY: the pointer is valid for the calling thread.
    unsafe { *errno_location() }
}

fn set_errno(value: c_int) {
    // SAFETY: the pointer is valid for the calling thread.
    unsafe { *errno_location() = value }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn states_are_ordered_by_strength() {
        // record() relies on this order (fetch_max) to never downgrade.
        assert!(StopState::Running < StopState::Graceful);
        assert!(StopState::Graceful < StopState::Quick);
        assert_eq!((RUNNING, GRACEFUL, QUICK), (0, 1, 2));
    }

    static APP_TERM: AtomicBool = AtomicBool::new(false);
    static APP_QUIT_SIGINFO: AtomicBool = AtomicBool::new(false);

    extern "C" fn app_term(_: c_int) {
        APP_TERM.store(true, Ordering::SeqCst);
    }

    extern "C" fn app_quit(_: c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        APP_QUIT_SIGINFO.store(!info.is_null(), Ordering::SeqCst);
    }

    fn set_handler(sig: c_int, handler: usize, flags: c_int) {
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler;
            sa.sa_flags = flags;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
        }
    }

    fn current_handler(sig: c_int) -> usize {
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            old.sa_sigaction
        }
    }

    /// Signals in a child process (the test binary re-run on this one test),
    /// so that handlers and the process-wide state do not leak into others.
    #[test]
    fn signals_chain_and_escalate() {
        if !crate::testutil::in_child("signals_chain_and_escalate") {
            crate::testutil::run_child("stop::tests::signals_chain_and_escalate", &[]);
            return;
        }
        set_handler(libc::SIGTERM, app_term as *const () as usize, 0);
        set_handler(
            libc::SIGQUIT,
            app_quit as *const () as usize,
            libc::SA_SIGINFO,
        );
        let stop = Stop::install();
        assert_eq!(Stop::install().fd(), stop.fd(), "install twice: same Stop");
        assert_eq!(stop.state(), StopState::Running);
        assert!(!stop.wait_timeout(Duration::from_millis(20)));
        assert!(stop.elapsed().is_none());

        let waiter = {
            let stop = stop.clone();
            std::thread::spawn(move || stop.wait())
        };
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(stop.state(), StopState::Graceful);
        assert!(
            APP_TERM.load(Ordering::SeqCst),
            "previous SIGTERM handler was chained"
        );
        waiter.join().unwrap();
        assert!(stop.wait_timeout(Duration::ZERO));
        let mut pfd = libc::pollfd {
            fd: stop.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1, "stop fd readable");
        assert!(stop.elapsed().is_some());

        unsafe { libc::raise(libc::SIGQUIT) };
        assert_eq!(stop.state(), StopState::Quick);
        assert!(
            APP_QUIT_SIGINFO.load(Ordering::SeqCst),
            "SA_SIGINFO handler got siginfo"
        );
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(stop.state(), StopState::Quick, "never downgraded");
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1, "still readable");
    }

    #[test]
    fn sigint_can_be_left_alone() {
        if !crate::testutil::in_child("sigint_can_be_left_alone") {
            crate::testutil::run_child("stop::tests::sigint_can_be_left_alone", &[]);
            return;
        }
        set_handler(libc::SIGINT, app_term as *const () as usize, 0);
        let stop = Stop::builder().sigint(false).install();
        assert_eq!(
            current_handler(libc::SIGINT),
            app_term as *const () as usize
        );
        assert_eq!(current_handler(libc::SIGTERM), handler_address());
        unsafe { libc::raise(libc::SIGINT) };
        assert!(APP_TERM.load(Ordering::SeqCst));
        assert_eq!(stop.state(), StopState::Running);
        stop.request(StopState::Graceful);
        assert_eq!(stop.state(), StopState::Graceful);
    }
}
