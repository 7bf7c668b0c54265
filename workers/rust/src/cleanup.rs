//! The cleanup registry: what a worker must do before it goes away.
//!
//! `atexit` handlers do not run when a process dies of a signal, and Rust runs
//! no destructors on `process::exit`. So cleanup work (flush a buffer, close a
//! session, deregister from a service) is registered here and run explicitly,
//! by the worker when it stops (see [`crate::exit`]) and by the panic hook.
//!
//! Semantics (the same in every drover SDK):
//! * every function runs at most once, in total, last registered first;
//! * an `Err` or a panic in one is logged with its name and the rest still run;
//! * the whole run is bounded by the remaining grace budget: drover kills the
//!   worker when the grace period ends, so a function still running at the end
//!   of the budget is abandoned (logged by name) rather than holding up exit.

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

static GLOBAL: Registry = Registry::new();

thread_local! {
    /// Set on the threads that run the registry, so that a cleanup function
    /// that panics (panic hook) or calls `run` does not wait for itself.
    static IN_CLEANUP: Cell<bool> = const { Cell::new(false) };
}

/// Registers `f` to run at cleanup under `name` (used in log lines).
/// Callable from any thread. Registering after the registry ran is logged and
/// the function is not run.
pub fn register<F>(name: &str, f: F)
where
    F: FnOnce() -> CleanupResult + Send + 'static,
{
    GLOBAL.register(name, Box::new(f));
}

/// Runs the registry once, bounded by [`remaining_budget`]. Later calls (and
/// calls from other threads while it runs, which wait for it) do nothing more.
pub fn run() {
    GLOBAL.run(remaining_budget());
}

/// Runs the registry once with an explicit time budget.
pub fn run_with_budget(budget: Duration) {
    GLOBAL.run(budget);
}

/// The grace budget left now: `DROVER_GRACEFUL_TIMEOUT` (seconds, default 30)
/// minus the time since the stop was requested, if one was (see
/// [`crate::Stop`]); the full budget otherwise.
pub fn remaining_budget() -> Duration {
    let grace = graceful_timeout(std::env::var("DROVER_GRACEFUL_TIMEOUT").ok().as_deref());
    let spent = crate::stop::elapsed_since_request().unwrap_or_default();
    grace.saturating_sub(spent)
}

/// Parses `DROVER_GRACEFUL_TIMEOUT`: seconds as a decimal number (`30`, `2.5`).
/// Unset gives the default; an invalid value is logged and gives the default.
pub fn graceful_timeout(value: Option<&str>) -> Duration {
    let Some(value) = value else {
        return DEFAULT_GRACEFUL_TIMEOUT;
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
                "DROVER_GRACEFUL_TIMEOUT={value:?} is not a number of seconds; using {}s",
                DEFAULT_GRACEFUL_TIMEOUT.as_secs()
            );
            DEFAULT_GRACEFUL_TIMEOUT
        }
    }
}

/// Runs the registry when a panic is about to end the process, after the
/// previous panic hook (which prints the message) has run.
///
/// A panic ends the process when the program is built with `panic = "abort"`
/// (the hook still runs before the abort, so cleanup happens) or when it
/// unwinds out of the main thread. A panic on another thread with unwinding
/// only ends that thread, and the worker keeps serving, so the registry is not
/// run then. (Caveat: a panic on the main thread that the program catches with
/// `catch_unwind` still runs the registry.) Installing twice is a no-op.
pub fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            previous(info);
            let ends_process = cfg!(panic = "abort") || thread::current().name() == Some("main");
            if ends_process && !IN_CLEANUP.get() {
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

    pub(crate) fn run(&self, budget: Duration) {
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
        run_entries(entries, budget);
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
/// `budget`; what is still running then is abandoned, what has not started is
/// skipped, and both are logged by name.
fn run_entries(entries: Vec<Entry>, budget: Duration) {
    if entries.is_empty() {
        return;
    }
    let deadline = Instant::now() + budget;
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
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Progress::Started(name)) => current = Some(name),
            Ok(Progress::Finished) => current = None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
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
    let budget_text = format!("{:.1}s", budget.as_secs_f64());
    let skipped_text = if skipped.is_empty() {
        String::new()
    } else {
        format!("; not started: {}", skipped.join(", "))
    };
    match current {
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
        reg.run(Duration::from_secs(5));
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
        reg.run(Duration::from_secs(5));
        reg.run(Duration::from_secs(5));
        // Late registrations do not run either.
        let c = Arc::clone(&count);
        reg.register(
            "late",
            Box::new(move || {
                c.fetch_add(100, Ordering::SeqCst);
                Ok(())
            }),
        );
        reg.run(Duration::from_secs(5));
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
            thread::spawn(move || reg.run(Duration::from_secs(5)))
        };
        thread::sleep(Duration::from_millis(50));
        reg.run(Duration::from_secs(5));
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
        reg.run(Duration::from_secs(5));
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
        reg.run(Duration::from_millis(300));
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
        reg.run(Duration::ZERO);
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

    /// The global registry and the panic hook, in a child process: a panic on
    /// the main thread runs the registry; `exit` does not run it twice.
    #[test]
    fn panic_hook_runs_the_registry() {
        if !crate::testutil::in_child("panic_hook_runs_the_registry") {
            let out =
                crate::testutil::run_child("cleanup::tests::panic_hook_runs_the_registry", &[]);
            assert!(out.contains("cleanup-from-panic-hook"), "{out}");
            assert_eq!(out.matches("cleanup-from-panic-hook").count(), 1, "{out}");
            return;
        }
        // Test harness threads are not "main": run the scenario on a thread
        // named so, as the real main thread is.
        let t = thread::Builder::new().name("main".to_owned()).spawn(|| {
            register("a", || {
                println!("cleanup-from-panic-hook");
                Ok(())
            });
            install_panic_hook();
            install_panic_hook();
            panic!("worker bug");
        });
        let _ = t.unwrap().join();
        run(); // already ran: no second line
    }
}
