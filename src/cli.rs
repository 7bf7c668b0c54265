//! The command line: `drover [OPTIONS] [-- COMMAND...]` and `drover check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::LevelFilter;

use crate::config::{ConfigError, Layer, Loaded, Source};
use crate::control::{self, Command};
use crate::logfile::LogFile;
use crate::master::{self, exit};

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "A pre-fork process supervisor",
    args_conflicts_with_subcommands = false
)]
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
    Check {
        /// The worker command, after `--`, as for a run.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Send a command to a running drover through its control socket; the
    /// exit status follows the verdict (0 done, 1 failed or unreachable).
    Ctl {
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        /// The control socket (default: `control_socket` of the config).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// How long to wait for the answer (a reload waits for its verdict).
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        timeout: humantime::Duration,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Master and workers: slot, pid, generation, state, uptime, restarts, RSS.
    Status,
    /// Reload the config; waits for the verdict (applied or rolled back).
    Reload,
    /// Run N workers.
    Scale {
        #[arg(value_name = "N")]
        count: u32,
    },
    /// Shut down (graceful, or quick with --quick).
    Stop {
        #[arg(long)]
        quick: bool,
    },
    /// Binary upgrade; waits until the new master is ready or has failed.
    Upgrade,
}

impl CtlCommand {
    fn request(&self) -> Command {
        match self {
            CtlCommand::Status => Command::Status,
            CtlCommand::Reload => Command::Reload,
            CtlCommand::Scale { count } => Command::Scale { workers: *count },
            CtlCommand::Stop { quick } => Command::Stop { quick: *quick },
            CtlCommand::Upgrade => Command::Upgrade,
        }
    }
}

/// One command-line flag as a settings layer: `key = value` in TOML, with
/// errors that name the flag.
fn flag(flag: &str, key: &str, value: &str) -> Result<Layer, ConfigError> {
    Layer::parse_override(&format!("{key}={value}")).map_err(|e| match e {
        ConfigError::Invalid { message, .. } => {
            ConfigError::Other(format!("{flag} {value}: {message}"))
        }
        other => other,
    })
}

impl Cli {
    /// The command line as a settings layer, over the file.
    fn source(&self) -> Result<Source, ConfigError> {
        let mut layer = Layer::default();
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
        let command = match &self.action {
            Some(Action::Check { command }) if !command.is_empty() => command,
            _ => &self.command,
        };
        if !command.is_empty() {
            layer.command = Some(command.clone());
        }
        Ok(Source {
            file: self.config.clone(),
            cli: layer,
        })
    }
}

/// drover's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Action::Ctl {
        json,
        socket,
        timeout,
        command,
    }) = &cli.action
    {
        let path = match socket
            .clone()
            .map(Ok)
            .or_else(|| cli.source().and_then(|s| s.control_socket()).transpose())
        {
            Some(Ok(path)) => path,
            Some(Err(e)) => {
                eprintln!("drover: {e}");
                return ExitCode::from(exit::USAGE);
            }
            None => {
                eprintln!("drover ctl: no control socket: give --socket PATH, or -c a config that sets control_socket");
                return ExitCode::from(exit::USAGE);
            }
        };
        return ExitCode::from(control::ctl(
            &path,
            &command.request(),
            *json,
            (*timeout).into(),
        ));
    }
    let loaded = cli.source().and_then(|source| Ok((source.load()?, source)));
    let (
        Loaded {
            settings,
            bind_was_set,
        },
        source,
    ) = match loaded {
        Ok(l) => l,
        Err(e) => {
            eprintln!("drover: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if let Some(Action::Check { .. }) = cli.action {
        let origin = source.origin();
        println!(
            "{origin}: ok ({} worker(s) running {:?}, listening on {})",
            settings.workers.0,
            settings.command.join(" "),
            settings
                .bind
                .iter()
                .map(|b| b.address.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::from(exit::OK);
    }
    let log = match settings.log_file.as_deref().map(LogFile::open).transpose() {
        Ok(log) => log,
        Err(e) => {
            eprintln!("drover: log file: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let level = LevelFilter::from_level(settings.log_level.0);
    let fmt = tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .with_max_level(level);
    match &log {
        Some(file) => fmt.with_writer(file.clone()).init(),
        None => fmt.with_writer(std::io::stderr).init(),
    }
    let first = Loaded {
        settings,
        bind_was_set,
    };
    match master::run(source, first, log) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_status())
        }
    }
}
