//! Worker SDK for [drover](https://github.com/), the pre-fork process supervisor.
//!
//! drover starts workers with the systemd conventions (socket activation and
//! `sd_notify`), so this crate is small and has no dependency beyond `libc`:
//! an application links it without pulling in any of the master's crates.
//!
//! What a worker needs, one module each:
//!
//! * [`listen`]: the listening sockets passed at fd 3.. (`LISTEN_FDS`).
//! * [`notify`](mod@notify): `READY=1`, `WATCHDOG=1`, `STATUS=…`, `STOPPING=1` to the master.
//! * [`stop`]: SIGTERM / SIGINT / SIGQUIT turned into a flag and a pollable fd.
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
pub mod stop;

pub use listen::{listeners, listeners_or_bind, ListenError, Listener, Stream};
pub use notify::{extend_timeout, heartbeat, notify, ready, status, stopping, watchdog_interval};
pub use stop::{Stop, StopState};

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
