#![warn(missing_docs)]
//! Worker SDK for [drover](https://docs.rs/drover), the pre-fork process supervisor.
//!
//! drover starts workers with the systemd conventions (socket activation and
//! `sd_notify`), so this crate is small and has no dependency beyond `libc`:
//! an application links it without pulling in any of the master's crates.
//!
//! What a worker needs, one module each:
//!
//! * [`listen`]: the listening sockets passed at fd 3.. (`LISTEN_FDS`).
//! * [`notify`](mod@notify): `READY=1`, `WATCHDOG=1`, `STATUS=…`, `STOPPING=1` to the master.
//! * [`stop`]: SIGTERM / SIGINT / SIGQUIT turned into a flag, a pollable fd
//!   and a future for async code ([`Stop::stopped`]).
//! * [`prestop`]: drover's pre-stop notice (SIGWINCH): end keep-alive.
//! * [`scoreboard`](mod@scoreboard): requests in progress, completed and their
//!   latency, counted in drover's shared-memory scoreboard.
//! * [`cleanup`]: functions that run once, last registered first, on stop,
//!   exit and panic, bounded by the remaining grace budget.
//!
//! The usual shape of a worker:
//!
//! ```no_run
//! let stop = drover_worker::Stop::install();
//! let listeners = drover_worker::listeners().unwrap_or_else(|e| {
//!     eprintln!("{e}");
//!     std::process::exit(3) // "cannot boot": drover will not respawn in a loop
//! });
//! drover_worker::cleanup::register("flush", || Ok(()));
//! drover_worker::cleanup::install_panic_hook();
//! // ... serve `listeners` on threads ...
//! let _ = drover_worker::ready();
//! stop.wait();
//! // ... stop accepting, drain ...
//! drover_worker::exit(0); // runs the cleanup registry, then exits
//! # drop(listeners);
//! ```

mod log;

pub mod cleanup;
pub mod listen;
pub mod notify;
pub mod prestop;
pub mod scoreboard;
pub mod stop;
mod stopped;

pub use listen::{listeners, listeners_or_bind, ListenError, Listener, Stream};
pub use notify::{extend_timeout, heartbeat, notify, ready, status, stopping, watchdog_interval};
pub use scoreboard::Scoreboard;
pub use stop::{Stop, StopState, Stopped};

/// Runs the cleanup registry (see [`cleanup::run`]) and then exits with `code`.
///
/// `std::process::exit` does not run destructors or anything registered with
/// the SDK, so a worker that ends on its own should leave through here.
pub fn exit(code: i32) -> ! {
    cleanup::run();
    std::process::exit(code)
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests {
    /// Normal exit through the SDK runs the registry, last registered first,
    /// then exits with the code given (in a child process: it really exits).
    #[test]
    fn exit_runs_the_registry_then_exits() {
        if !crate::testutil::in_child("exit_runs_the_registry_then_exits") {
            let out = crate::testutil::child_command("tests::exit_runs_the_registry_then_exits")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(7), "{stdout}");
            let first = stdout.find("cleanup-second").expect("second ran");
            let then = stdout.find("cleanup-first").expect("first ran");
            assert!(first < then, "last registered runs first: {stdout}");
            return;
        }
        crate::cleanup::register("first", || {
            println!("cleanup-first");
            Ok(())
        });
        crate::cleanup::register("second", || {
            println!("cleanup-second");
            Ok(())
        });
        crate::exit(7);
    }
}
