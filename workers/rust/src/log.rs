//! One-line log messages on stderr, prefixed `drover-worker:`.
//!
//! The SDK has no logging dependency: the master captures each worker's stderr,
//! so a single line per event, written with one `write` call, is what reads
//! best in the master's log and cannot be interleaved with other threads.

use std::fmt;
use std::io::Write;

/// Writes `drover-worker: <message>` as one line (newlines in the message are
/// turned into spaces so that one event stays one line).
pub(crate) fn line(args: fmt::Arguments<'_>) {
    let mut text = format!("drover-worker: {args}");
    if text.contains(['\n', '\r']) {
        text = text.replace(['\n', '\r'], " ");
    }
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

macro_rules! log {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}
pub(crate) use log;
