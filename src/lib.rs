//! drover: a pre-fork process supervisor. See docs/design.md for the tour.

pub mod cli;
pub mod config;
pub mod hooks;
pub mod listen;
pub mod master;
pub mod notify;
pub mod pidfile;
pub mod signals;
pub mod spawn;
