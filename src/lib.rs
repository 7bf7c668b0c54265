//! drover: a pre-fork process supervisor. See docs/design.md for the tour.

pub mod admin;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod events;
pub mod hint;
pub mod hooks;
pub mod listen;
pub mod logfile;
pub mod logformat;
pub mod master;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod pidfile;
pub mod readiness;
pub mod scoreboard;
pub mod sdnotify;
pub mod signals;
pub mod spawn;
pub mod watch;
