//! The command line: `drover [OPTIONS] [-- COMMAND...]` and `drover check`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::LevelFilter;

use crate::config::{ConfigError, Layer, LogLevel, Settings};
use crate::master::{self, exit};

#[derive(Debug, Parser)]
#[command(name = "drover", version, about = "A pre-fork process supervisor", args_conflicts_with_subcommands = false)]
struct Cli {
    #[command(subcommand)]
    action: Option<Action>,
    /// Config file (TOML). Without it, defaults and the command line only.
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable): HOST:PORT, [V6]:PORT, unix:PATH, fd://N.
    #[arg(short, long, global = true, value_name = "ADDR")]
    bind: Vec<String>,
    /// Number of workers.
    #[arg(short, long, global = true, value_name = "N")]
    workers: Option<String>,
    /// Log level: error, warn, info, debug, trace (overrides RUST_LOG and the file).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Where to write the master's pid.
    #[arg(long, global = true, value_name = "PATH")]
    pidfile: Option<String>,
    /// Any setting, as KEY=VALUE (repeatable), e.g. --set graceful_timeout=10s.
    #[arg(short, long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The worker command, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Validate the configuration and exit (0 if valid, 2 if not).
    Check,
}

/// One command-line flag as a settings layer: `key = value` in TOML, with
/// errors that name the flag.
fn flag(flag: &str, key: &str, value: &str) -> Result<Layer, ConfigError> {
    Layer::parse_override(&format!("{key}={value}")).map_err(|e| match e {
        ConfigError::Invalid { message, .. } => ConfigError::Other(format!("{flag} {value}: {message}")),
        other => other,
    })
}

impl Cli {
    /// The file, then every flag on top.
    fn settings(&self) -> Result<(Settings, bool), ConfigError> {
        let mut layer = match &self.config {
            Some(path) => Layer::read(path)?,
            None => Layer::default(),
        };
        for s in &self.set {
            layer = layer.overlay(Layer::parse_override(s)?);
        }
        if !self.bind.is_empty() {
            let quoted: Vec<String> = self.bind.iter().map(|b| format!("{b:?}")).collect();
            layer = layer.overlay(flag("--bind", "bind", &format!("[{}]", quoted.join(",")))?);
        }
        if let Some(n) = &self.workers {
            layer = layer.overlay(flag("--workers", "workers", n)?);
        }
        if let Some(level) = &self.log_level {
            layer = layer.overlay(flag("--log-level", "log_level", level)?);
        }
        if let Some(p) = &self.pidfile {
            layer = layer.overlay(flag("--pidfile", "pidfile", p)?);
        }
        if !self.command.is_empty() {
            layer.command = Some(self.command.clone());
        }
        let bind_was_set = layer.bind.is_some();
        let log_from_cli = self.log_level.is_some();
        let mut settings = layer.resolve()?;
        // RUST_LOG sits between the file and the command line.
        if !log_from_cli {
            if let Some(level) = std::env::var("RUST_LOG").ok().and_then(|v| LogLevel::from_str(&v).ok()) {
                settings.log_level = level;
            }
        }
        Ok((settings, bind_was_set))
    }
}

/// drover's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (settings, bind_was_set) = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("drover: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if let Some(Action::Check) = cli.action {
        let origin = cli.config.as_ref().map_or("command line".into(), |p| p.display().to_string());
        println!(
            "{origin}: ok ({} worker(s) running {:?}, listening on {})",
            settings.workers.0,
            settings.command.join(" "),
            settings.bind.iter().map(|b| b.address.to_string()).collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(exit::OK);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .with_max_level(LevelFilter::from_level(settings.log_level.0))
        .init();
    match master::run(settings, bind_was_set) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_status())
        }
    }
}
