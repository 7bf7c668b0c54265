//! The cleanup registry: what a worker must do before it goes away.
//!
//! `atexit` handlers do not run when a process dies of a signal, and Rust runs
//! no destructors on `process::exit`. So cleanup work (flush a buffer, close a
//! session, deregister from a service) is registered here and run explicitly,
//! by the worker when it stops (see [`crate::exit`] and [`run`]); the first
//! [`register`] also arranges for it to run when the process exits normally
//! (a return from `main`, `std::process::exit`, a panic that unwinds out of
//! `main`: a `libc::atexit` hook) and when a panic aborts the process (a panic
//! hook, see [`install_panic_hook`]).
//!
//! Semantics (the same in every drover SDK):
//! * every function runs at most once, in total, last registered first;
//! * an `Err` or a panic in one is logged with its name and the rest still run;
//! * the whole run is bounded by the remaining grace budget: drover kills the
//!   worker when the grace period ends, so a function still running at the end
//!   of the budget is abandoned (logged by name) rather than holding up exit.
//!
//! # The budget
//!
//! drover gives a stopped worker `DROVER_GRACEFUL_TIMEOUT` seconds (SIGTERM),
//! or `DROVER_QUICK_TIMEOUT` seconds from a SIGQUIT if that ends earlier, and
//! then sends SIGKILL. Its clock starts when it sends the signal, a moment
//! before the worker receives it, and the worker must still exit after its
//! cleanup; so the SDK keeps a [`reserve`] back: max(0.25 s, 5 % of the
//! timeout), at most half of it. [`remaining_budget`] is the time left until
//! that earlier deadline; [`drain_deadline`] is 4/5 of the way there, when a
//! server should abandon in-flight requests so that the cleanup keeps at least
//! a fifth of the budget.

use std::any::Any;
use std::cell::Cell;
use std::error::Error;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use crate::log::log;

/// Grace budget when `DROVER_GRACEFUL_TIMEOUT` is not set (drover's default).
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// Quick-stop budget when `DROVER_QUICK_TIMEOUT` is not set (drover's default).
pub const DEFAULT_QUICK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a cleanup function returns.
pub type CleanupResult = Result<(), Box<dyn Error + Send + Sync>>;

type CleanupFn = Box<dyn FnOnce() -> CleanupResult + Send + 'static>;

struct Entry {
    name: String,
    f: CleanupFn,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Running,
    Done,
}

struct Inner {
    entries: Vec<Entry>,
    phase: Phase,
}

/// A registry; the process has one ([`register`], [`run`]), tests make their own.
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    done: Condvar,
}

/// How long a run may take: a fixed budget, or one that also follows the stop
/// state (an escalation to quick while the registry runs shortens it).
#[derive(Clone, Copy)]
pub(crate) enum Limit {
    Fixed(Duration),
    FollowStop,
}

static GLOBAL: Registry = Registry::new();

thread_local! {
    /// Set on the threads that run the registry, so that a cleanup function
    /// that panics (panic hook) or calls `run` does not wait for itself.
    static IN_CLEANUP: Cell<bool> = const { Cell::new(false) };
}

/// Registers `f` to run at cleanup under `name` (used in log lines).
/// Callable from any thread. Registering after the registry ran is logged and
/// the function is not run.
///
/// The first call also installs the exit hook (`libc::atexit`: the registry
/// runs when `main` returns or on `std::process::exit`) and the panic hook
/// ([`install_panic_hook`]).
pub fn register<F>(name: &str, f: F)
where
    F: FnOnce() -> CleanupResult + Send + 'static,
{
    GLOBAL.register(name, Box::new(f));
    install_exit_hook();
    // Changing the panic hook from a panicking thread panics; a later
    // registration installs it then.
    if !thread::panicking() {
        install_panic_hook();
    }
}

fn install_exit_hook() {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a function without arguments that never unwinds.
        if unsafe { libc::atexit(run_at_exit) } != 0 {
            log!("cannot install the exit hook; the registry will not run at exit");
        }
    });
}

extern "C" fn run_at_exit() {
    // Unwinding out of an `extern "C"` function would abort the process.
    let _ = panic::catch_unwind(run);
}

/// Runs the registry once, bounded by [`remaining_budget`] (which shrinks if
/// the stop escalates to quick meanwhile). Later calls (and calls from other
/// threads while it runs, which wait for it) do nothing more.
pub fn run() {
    GLOBAL.run(Limit::FollowStop);
}

/// Runs the registry once with an explicit time budget.
pub fn run_with_budget(budget: Duration) {
    GLOBAL.run(Limit::Fixed(budget));
}

/// The part of a stop timeout kept back for the delivery of the signal and the
/// exit: max(0.25 s, 5 %), at most half of `timeout`.
pub fn reserve(timeout: Duration) -> Duration {
    (timeout / 20)
        .max(Duration::from_millis(250))
        .min(timeout / 2)
}

/// The cleanup budget left now: the time until drover's stop deadline, less
/// the [`reserve`]. The deadline is `DROVER_GRACEFUL_TIMEOUT` (default 30 s)
/// after the first stop request (now, if there was none) or, once the stop
/// is quick, `DROVER_QUICK_TIMEOUT` (default 5 s) after the first quick
/// request, whichever is earlier (as drover does).
pub fn remaining_budget() -> Duration {
    time_left(&Timeouts::from_env(), &since_requests()).cleanup
}

/// When a server should stop waiting for in-flight requests (and abandon
/// them) so that the cleanup still gets its share of the budget: 4/5 of the
/// way from the stop request to the end of [`remaining_budget`] (for a quick
/// stop, from the quick request to the quick deadline, if earlier).
pub fn drain_deadline() -> Instant {
    Instant::now() + time_left(&Timeouts::from_env(), &since_requests()).drain
}

/// Parses `DROVER_GRACEFUL_TIMEOUT`: seconds as a decimal number (`30`, `2.5`).
/// Unset gives the default; an invalid value is logged and gives the default.
pub fn graceful_timeout(value: Option<&str>) -> Duration {
    seconds("DROVER_GRACEFUL_TIMEOUT", value, DEFAULT_GRACEFUL_TIMEOUT)
}

/// Parses `DROVER_QUICK_TIMEOUT`, as [`graceful_timeout`] does.
pub fn quick_timeout(value: Option<&str>) -> Duration {
    seconds("DROVER_QUICK_TIMEOUT", value, DEFAULT_QUICK_TIMEOUT)
}

fn seconds(var: &str, value: Option<&str>, default: Duration) -> Duration {
    let Some(value) = value else {
        return default;
    };
    match value
        .trim()
        .parse::<f64>()
        .ok()
        .map(Duration::try_from_secs_f64)
    {
        Some(Ok(budget)) => budget,
        _ => {
            log!(
                "{var}={value:?} is not a number of seconds; using {}s",
                default.as_secs_f64()
            );
            default
        }
    }
}

struct Timeouts {
    graceful: Duration,
    quick: Duration,
}

impl Timeouts {
    fn from_env() -> Timeouts {
        let var = |name| std::env::var(name).ok();
        Timeouts {
            graceful: graceful_timeout(var("DROVER_GRACEFUL_TIMEOUT").as_deref()),
            quick: quick_timeout(var("DROVER_QUICK_TIMEOUT").as_deref()),
        }
    }
}

/// Time since the first stop request and since the first quick one.
struct Since {
    stop: Option<Duration>,
    quick: Option<Duration>,
}

fn since_requests() -> Since {
    Since {
        stop: crate::stop::elapsed_since_request(),
        quick: crate::stop::elapsed_since_quick(),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Left {
    drain: Duration,
    cleanup: Duration,
}

/// The time left to drain and to clean up. Pure: the tests drive it.
fn time_left(t: &Timeouts, since: &Since) -> Left {
    // One clock per timeout: it started `since` ago and ends `reserve` early.
    let left = |timeout: Duration, since: Duration| {
        let usable = timeout - reserve(timeout);
        Left {
            drain: (usable * 4 / 5).saturating_sub(since),
            cleanup: usable.saturating_sub(since),
        }
    };
    let graceful = left(t.graceful, since.stop.unwrap_or_default());
    match since.quick {
        Some(since_quick) => {
            let quick = left(t.quick, since_quick);
            Left {
                drain: graceful.drain.min(quick.drain),
                cleanup: graceful.cleanup.min(quick.cleanup),
            }
        }
        None => graceful,
    }
}

/// Runs the registry when a panic is about to abort the process (a program
/// built with `panic = "abort"`), after the previous panic hook (which prints
/// the message) has run. The first [`register`] calls it; calling it again is
/// a no-op. A hook the application sets later with `std::panic::set_hook`
/// replaces this one (chain it with `std::panic::take_hook` to keep it).
///
/// With unwinding, the hook leaves the registry alone: a panic that unwinds
/// out of `main` ends the process through `exit(101)`, which runs the
/// registry from the exit hook that [`register`] installed; a panic that
/// something catches (a tokio or actix task, `catch_unwind`), on any thread
/// including the main one (a current-thread runtime runs its tasks there),
/// leaves the worker serving, and its registry for the real stop.
pub fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            previous(info);
            if cfg!(panic = "abort") && !IN_CLEANUP.get() {
                run();
            }
        }));
    });
}

impl Registry {
    pub(crate) const fn new() -> Registry {
        Registry {
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                phase: Phase::Open,
            }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, name: &str, f: CleanupFn) {
        let mut inner = self.lock();
        if inner.phase != Phase::Open {
            drop(inner);
            log!("cleanup '{name}' registered after cleanup started; it will not run");
            return;
        }
        inner.entries.push(Entry {
            name: name.to_owned(),
            f,
        });
    }

    pub(crate) fn run(&self, limit: Limit) {
        if IN_CLEANUP.get() {
            return;
        }
        let entries = {
            let mut inner = self.lock();
            match inner.phase {
                Phase::Open => {
                    inner.phase = Phase::Running;
                    std::mem::take(&mut inner.entries)
                }
                Phase::Running => {
                    while inner.phase == Phase::Running {
                        inner = self.done.wait(inner).unwrap_or_else(|e| e.into_inner());
                    }
                    return;
                }
                Phase::Done => return,
            }
        };
        IN_CLEANUP.set(true);
        run_entries(entries, limit);
        IN_CLEANUP.set(false);
        self.lock().phase = Phase::Done;
        self.done.notify_all();
    }
}

enum Progress {
    Started(String),
    Finished,
}

/// Runs `entries` last first on a helper thread and waits for them at most
/// the budget; what is still running then is abandoned, what has not started is
/// skipped, and both are logged by name.
fn run_entries(entries: Vec<Entry>, limit: Limit) {
    if entries.is_empty() {
        return;
    }
    let start = Instant::now();
    let mut deadline = match limit {
        Limit::Fixed(budget) => start + budget,
        Limit::FollowStop => start + remaining_budget(),
    };
    // The helper pops from the end (last registered first). It announces each
    // function while holding the lock, so that once we hold the lock, every
    // popped function has been announced on the channel.
    let queue = Arc::new(Mutex::new(entries));
    let (tx, rx) = mpsc::channel();
    let helper_queue = Arc::clone(&queue);
    let spawned = thread::Builder::new()
        .name("drover-cleanup".to_owned())
        .spawn(move || {
            IN_CLEANUP.set(true);
            loop {
                let entry = {
                    let mut queue = helper_queue.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(entry) = queue.pop() else { break };
                    if tx.send(Progress::Started(entry.name.clone())).is_err() {
                        break;
                    }
                    entry
                };
                call(entry);
                if tx.send(Progress::Finished).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        log!("cannot start the cleanup thread ({e}); running cleanup without a time limit");
        loop {
            let entry = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match entry {
                Some(entry) => call(entry),
                None => return,
            }
        }
    }
    let mut current: Option<String> = None;
    loop {
        let now = Instant::now();
        let left = match limit {
            Limit::Fixed(_) => deadline.saturating_duration_since(now),
            Limit::FollowStop => {
                // drover shortens its deadline when the stop escalates to
                // quick: look again now and then.
                deadline = deadline.min(now + remaining_budget());
                deadline
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(100))
            }
        };
        match rx.recv_timeout(left) {
            Ok(Progress::Started(name)) => current = Some(name),
            Ok(Progress::Finished) => current = None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    // Out of time: take what has not started, then read what did start.
    let skipped: Vec<String> = {
        let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.drain(..).rev().map(|e| e.name).collect()
    };
    while let Ok(progress) = rx.try_recv() {
        match progress {
            Progress::Started(name) => current = Some(name),
            Progress::Finished => current = None,
        }
    }
    report_overrun(deadline - start, current, &skipped);
}

/// Says what the budget cut: the function `running` (abandoned), and those
/// `skipped`.
fn report_overrun(budget: Duration, running: Option<String>, skipped: &[String]) {
    let budget_text = format!("{:.1}s", budget.as_secs_f64());
    let skipped_text = if skipped.is_empty() {
        String::new()
    } else {
        format!("; not started: {}", skipped.join(", "))
    };
    match running {
        Some(name) => log!(
            "cleanup budget of {budget_text} ran out while '{name}' was still running; \
             abandoned it{skipped_text}"
        ),
        None if !skipped.is_empty() => {
            log!("cleanup budget of {budget_text} ran out{skipped_text}")
        }
        None => {}
    }
}

fn call(entry: Entry) {
    let Entry { name, f } = entry;
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => log!("cleanup '{name}' failed: {err}"),
        Err(payload) => log!("cleanup '{name}' panicked: {}", panic_message(&*payload)),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn recorder() -> (
        Arc<Mutex<Vec<&'static str>>>,
        impl Fn(&'static str) -> CleanupFn,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        let make = move |name: &'static str| -> CleanupFn {
            let l = Arc::clone(&l);
            Box::new(move || {
                l.lock().unwrap().push(name);
                Ok(())
            })
        };
        (log, make)
    }

    #[test]
    fn runs_last_registered_first() {
        let reg = Registry::new();
        let (log, make) = recorder();
        for name in ["a", "b", "c"] {
            reg.register(name, make(name));
        }
        reg.run(Limit::Fixed(Duration::from_secs(5)));
        assert_eq!(*log.lock().unwrap(), ["c", "b", "a"]);
    }

    #[test]
    fn runs_once_only() {
        let reg = Registry::new();
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        reg.register(
            "count",
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        );
        reg.run(Limit::Fixed(Duration::from_secs(5)));
        reg.run(Limit::Fixed(Duration::from_secs(5)));
        // Late registrations do not run either.
        let c = Arc::clone(&count);
        reg.register(
            "late",
            Box::new(move || {
                c.fetch_add(100, Ordering::SeqCst);
                Ok(())
            }),
        );
        reg.run(Limit::Fixed(Duration::from_secs(5)));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn concurrent_runs_wait_for_the_first() {
        let reg = Arc::new(Registry::new());
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        reg.register(
            "slow",
            Box::new(move || {
                thread::sleep(Duration::from_millis(200));
                d.store(true, Ordering::SeqCst);
                Ok(())
            }),
        );
        let first = {
            let reg = Arc::clone(&reg);
            thread::spawn(move || reg.run(Limit::Fixed(Duration::from_secs(5))))
        };
        thread::sleep(Duration::from_millis(50));
        reg.run(Limit::Fixed(Duration::from_secs(5)));
        assert!(
            done.load(Ordering::SeqCst),
            "second run returned before the first finished"
        );
        first.join().unwrap();
    }

    #[test]
    fn errors_and_panics_do_not_stop_the_rest() {
        let reg = Registry::new();
        let (log, make) = recorder();
        reg.register("first", make("first"));
        reg.register("panics", Box::new(|| panic!("boom")));
        reg.register("fails", Box::new(|| Err("disk full".into())));
        reg.register("last", make("last"));
        reg.run(Limit::Fixed(Duration::from_secs(5)));
        assert_eq!(*log.lock().unwrap(), ["last", "first"]);
    }

    #[test]
    fn budget_abandons_a_slow_function() {
        let reg = Registry::new();
        let (log, make) = recorder();
        let finished = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&finished);
        reg.register("never-started", make("never-started"));
        reg.register(
            "slow",
            Box::new(move || {
                thread::sleep(Duration::from_secs(3));
                f.store(true, Ordering::SeqCst);
                Ok(())
            }),
        );
        reg.register("quick", make("quick"));
        let start = Instant::now();
        reg.run(Limit::Fixed(Duration::from_millis(300)));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(
            took < Duration::from_secs(2),
            "run blocked on the slow function: {took:?}"
        );
        assert!(!finished.load(Ordering::SeqCst));
        // The slow one is abandoned, and what came after it is not started,
        // even once the slow one finishes.
        thread::sleep(Duration::from_millis(100));
        assert_eq!(*log.lock().unwrap(), ["quick"]);
    }

    #[test]
    fn zero_budget_returns_at_once() {
        let reg = Registry::new();
        reg.register(
            "sleepy",
            Box::new(|| {
                thread::sleep(Duration::from_secs(2));
                Ok(())
            }),
        );
        let start = Instant::now();
        reg.run(Limit::Fixed(Duration::ZERO));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn graceful_timeout_parsing() {
        assert_eq!(graceful_timeout(None), Duration::from_secs(30));
        assert_eq!(graceful_timeout(Some("30")), Duration::from_secs(30));
        assert_eq!(graceful_timeout(Some("2.5")), Duration::from_millis(2500));
        assert_eq!(graceful_timeout(Some(" 0 ")), Duration::ZERO);
        assert_eq!(graceful_timeout(Some("-1")), DEFAULT_GRACEFUL_TIMEOUT);
        assert_eq!(graceful_timeout(Some("30s")), DEFAULT_GRACEFUL_TIMEOUT);
        assert_eq!(graceful_timeout(Some("inf")), DEFAULT_GRACEFUL_TIMEOUT);
    }

    /// A panic that something catches on the main thread (a current-thread
    /// tokio runtime runs its tasks there, and catches a handler's panic)
    /// leaves the worker serving: the registry waits for the real end (here
    /// the harness's exit, after the test passed), and runs once then. The
    /// previous panic hook still prints the message.
    #[test]
    fn a_caught_panic_on_the_main_thread_leaves_the_registry_alone() {
        let name = "a_caught_panic_on_the_main_thread_leaves_the_registry_alone";
        if !crate::testutil::in_child(name) {
            let out = crate::testutil::child_command(&format!("cleanup::tests::{name}"))
                .output()
                .unwrap();
            let stdout = crate::testutil::check(out.clone());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("handler bug"), "previous hook: {stderr}");
            let caught = stdout.find("panic-caught").expect("the panic was caught");
            let summary = stdout.find("test result: ok").expect("harness summary");
            let cleanup = stdout.find("cleanup-ran").expect("cleanup ran at exit");
            assert!(caught < cleanup && summary < cleanup, "{stdout}");
            assert_eq!(stdout.matches("cleanup-ran").count(), 1, "{stdout}");
            return;
        }
        // Test harness threads are not "main": run on a thread named so, as
        // a current-thread runtime's tasks run on the real main thread.
        let t = thread::Builder::new().name("main".to_owned()).spawn(|| {
            register("a", || {
                println!("cleanup-ran");
                Ok(())
            });
            let caught = panic::catch_unwind(|| panic!("handler bug"));
            assert!(caught.is_err());
            println!("panic-caught");
        });
        t.unwrap().join().unwrap();
    }

    #[test]
    fn reserve_is_5_percent_at_least_250ms_at_most_half() {
        let ms = Duration::from_millis;
        assert_eq!(reserve(Duration::from_secs(30)), ms(1500));
        assert_eq!(reserve(Duration::from_secs(2)), ms(250));
        assert_eq!(reserve(Duration::from_secs(5)), ms(250));
        assert_eq!(reserve(ms(300)), ms(150));
        assert_eq!(reserve(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn time_left_follows_drover_deadlines() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let t = Timeouts {
            graceful: s(10),
            quick: s(2),
        };
        let at =
            |stop: Option<Duration>, quick: Option<Duration>| time_left(&t, &Since { stop, quick });
        // Not stopping: the whole graceful budget less its reserve (0.5 s).
        assert_eq!(
            at(None, None),
            Left {
                drain: ms(7600),
                cleanup: ms(9500)
            }
        );
        // 1 s into a graceful stop.
        assert_eq!(
            at(Some(s(1)), None),
            Left {
                drain: ms(6600),
                cleanup: ms(8500)
            }
        );
        // Escalated to quick 1 s later: 2 s - 0.25 s from then.
        assert_eq!(
            at(Some(s(2)), Some(ms(0))),
            Left {
                drain: ms(1400),
                cleanup: ms(1750)
            }
        );
        // Quick from the start, with more graceful time than quick time left.
        assert_eq!(
            at(Some(s(1)), Some(s(1))),
            Left {
                drain: ms(400),
                cleanup: ms(750)
            }
        );
        // Past every deadline.
        assert_eq!(
            at(Some(s(60)), None),
            Left {
                drain: ms(0),
                cleanup: ms(0)
            }
        );
        // A quick deadline later than the graceful one does not extend it.
        assert_eq!(at(Some(s(9)), Some(ms(0))).cleanup, ms(500));
    }

    #[test]
    fn quick_timeout_parsing() {
        assert_eq!(quick_timeout(None), DEFAULT_QUICK_TIMEOUT);
        assert_eq!(quick_timeout(Some("1.5")), Duration::from_millis(1500));
        assert_eq!(quick_timeout(Some("soon")), DEFAULT_QUICK_TIMEOUT);
    }

    /// The budget as a worker sees it: from the environment and the stop
    /// state (in a child: signals and environment are process-wide).
    #[test]
    fn remaining_budget_uses_the_quick_timeout_once_quick() {
        if !crate::testutil::in_child("remaining_budget_uses_the_quick_timeout_once_quick") {
            crate::testutil::run_child(
                "cleanup::tests::remaining_budget_uses_the_quick_timeout_once_quick",
                &[
                    ("DROVER_GRACEFUL_TIMEOUT", "20"),
                    ("DROVER_QUICK_TIMEOUT", "2"),
                ],
            );
            return;
        }
        let near = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() < 0.2;
        let stop = crate::Stop::install();
        assert!(near(remaining_budget(), 19.0), "{:?}", remaining_budget());
        stop.request(crate::StopState::Graceful);
        assert!(near(remaining_budget(), 19.0), "{:?}", remaining_budget());
        let drain = drain_deadline().saturating_duration_since(Instant::now());
        assert!(near(drain, 15.2), "{drain:?}");
        unsafe { libc::raise(libc::SIGQUIT) };
        assert!(near(remaining_budget(), 1.75), "{:?}", remaining_budget());
        let drain = drain_deadline().saturating_duration_since(Instant::now());
        assert!(near(drain, 1.4), "{drain:?}");
    }

    /// A run started before the stop escalates to quick ends at the quick
    /// deadline, not at the graceful one it started with.
    #[test]
    fn escalation_shortens_a_running_cleanup() {
        if !crate::testutil::in_child("escalation_shortens_a_running_cleanup") {
            let out = crate::testutil::run_child(
                "cleanup::tests::escalation_shortens_a_running_cleanup",
                &[
                    ("DROVER_GRACEFUL_TIMEOUT", "30"),
                    ("DROVER_QUICK_TIMEOUT", "1"),
                ],
            );
            assert!(out.contains("run-returned"), "{out}");
            return;
        }
        let stop = crate::Stop::install();
        stop.request(crate::StopState::Graceful);
        let (tx, rx) = mpsc::channel();
        register("hangs", move || {
            tx.send(()).unwrap();
            thread::sleep(Duration::from_secs(3600));
            Ok(())
        });
        let started = Instant::now();
        let runner = thread::spawn(run);
        rx.recv().unwrap();
        unsafe { libc::raise(libc::SIGQUIT) };
        runner.join().unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{took:?}");
        println!("run-returned");
    }

    /// Returning from `main` runs the registry (here the test harness's own
    /// `main`, after the test passed): the first `register` installed the hook.
    #[test]
    fn registry_runs_when_main_returns() {
        if !crate::testutil::in_child("registry_runs_when_main_returns") {
            let out =
                crate::testutil::run_child("cleanup::tests::registry_runs_when_main_returns", &[]);
            let result = out.find("test result: ok").expect("harness summary");
            let cleanup = out.find("cleanup-at-exit").expect("cleanup ran at exit");
            assert!(cleanup > result, "ran after main returned: {out}");
            assert_eq!(out.matches("cleanup-at-exit").count(), 1, "{out}");
            return;
        }
        register("at-exit", || {
            println!("cleanup-at-exit");
            Ok(())
        });
    }

    /// `std::process::exit` runs the registry too (libc's exit runs atexit hooks).
    #[test]
    fn registry_runs_on_process_exit() {
        if !crate::testutil::in_child("registry_runs_on_process_exit") {
            let out =
                crate::testutil::child_command("cleanup::tests::registry_runs_on_process_exit")
                    .output()
                    .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(5), "{stdout}");
            assert_eq!(stdout.matches("cleanup-on-exit").count(), 1, "{stdout}");
            return;
        }
        register("on-exit", || {
            println!("cleanup-on-exit");
            Ok(())
        });
        std::process::exit(5);
    }
}
