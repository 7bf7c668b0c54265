//! The command line: `drover [OPTIONS] [-- COMMAND...]` and `drover check`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::LevelFilter;

use crate::config::{ConfigError, Given, Layer, Loaded, Place, Settings, Source};
use crate::control::{self, Command};
use crate::logfile::LogFile;
use crate::logformat::{JsonLines, LogFormat};
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

/// A command-line flag as a settings layer: `key_value` read as for `--set`,
/// with errors (now or when the settings are checked) that name the flag as
/// `shown`.
fn flag(shown: String, key_value: &str) -> Result<Layer, ConfigError> {
    let at = Place::Flag(shown);
    match Layer::parse_override(key_value) {
        Ok(layer) => Ok(layer.placed(&at)),
        Err(ConfigError::Invalid { message, .. }) => Err(ConfigError::Invalid { at, message }),
        Err(other) => Err(other),
    }
}

impl Cli {
    /// The command line as a settings layer, over the file.
    fn source(&self) -> Result<Source, ConfigError> {
        let mut layer = Layer::default();
        for s in &self.set {
            layer = layer.overlay(Layer::parse_override(s)?);
        }
        if !self.bind.is_empty() {
            // Each -b is checked alone, so that an error names that one.
            let mut binds = Vec::new();
            for b in &self.bind {
                let one = flag(format!("--bind {b}"), &format!("bind=[{b:?}]"))?;
                binds.extend(one.bind.map(|g| g.value).unwrap_or_default());
            }
            layer.bind = Some(Given {
                value: binds,
                at: Place::Flag(format!("--bind {}", self.bind[0])),
            });
            layer.bind_items = self
                .bind
                .iter()
                .map(|b| Place::Flag(format!("--bind {b}")))
                .collect();
        }
        if let Some(n) = &self.workers {
            layer = layer.overlay(flag(format!("--workers {n}"), &format!("workers={n}"))?);
        }
        if let Some(level) = &self.log_level {
            layer = layer.overlay(flag(
                format!("--log-level {level}"),
                &format!("log_level={level}"),
            )?);
        }
        if let Some(p) = &self.pidfile {
            layer = layer.overlay(flag(format!("--pidfile {p}"), &format!("pidfile={p}"))?);
        }
        let command = match &self.action {
            Some(Action::Check { command }) if !command.is_empty() => command,
            _ => &self.command,
        };
        if !command.is_empty() {
            layer.command = Some(Given {
                value: command.clone(),
                at: Place::Flag(format!("-- {}", command.join(" "))),
            });
        }
        Ok(Source {
            file: self.config.clone(),
            cli: layer,
        })
    }
}

/// drover's entry point.
pub fn main() -> ExitCode {
    // Before anything is opened (the config, the log file): the descriptors
    // open now are our parent's, the only ones `fd://N` may name.
    crate::listen::note_open_descriptors();
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
        return check(&source, &settings, bind_was_set);
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
    match (&log, settings.log_format) {
        (Some(file), LogFormat::Text) => fmt.with_writer(file.clone()).init(),
        (None, LogFormat::Text) => fmt.with_writer(std::io::stderr).init(),
        (Some(file), LogFormat::Json) => fmt
            .event_format(JsonLines::install())
            .with_writer(file.clone())
            .init(),
        (None, LogFormat::Json) => fmt
            .event_format(JsonLines::install())
            .with_writer(std::io::stderr)
            .init(),
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

/// `drover check`: the settings are valid, and what a start looks up before it
/// binds anything is there: the user and group, the program (in the PATH the
/// workers get), and `chdir`. Each failure exits with the status a start
/// would: 2 for the settings, the user or the group; 3 for the program or
/// `chdir`, which a start reports as "cannot boot".
fn check(source: &Source, s: &Settings, bind_was_set: bool) -> ExitCode {
    let fail = |status: u8, message: String| {
        eprintln!("drover: {message}");
        ExitCode::from(status)
    };
    // The user, group and program, exactly as a start prepares them.
    let program = match crate::master::prepare(s) {
        Ok(program) => program.shown(),
        Err(e) => return fail(e.exit_status(), e.to_string()),
    };
    if let Some(dir) = &s.chdir {
        if !dir.is_dir() {
            return fail(
                exit::CANNOT_BOOT,
                format!(
                    "chdir {}: not a directory (or not reachable)",
                    dir.display()
                ),
            );
        }
    }
    // A name was found in PATH just now; a path is only tried at exec, after
    // the chdir: look at it from there, as the worker will.
    if s.command[0].contains('/') {
        let exe = s
            .chdir
            .as_deref()
            .unwrap_or(Path::new("."))
            .join(&s.command[0]);
        let runnable =
            exe.is_file() && nix::unistd::access(&exe, nix::unistd::AccessFlags::X_OK).is_ok();
        if !runnable {
            return fail(
                exit::CANNOT_BOOT,
                format!(
                    "cannot run the worker command: {}: not an executable file",
                    exe.display()
                ),
            );
        }
    }
    // Sockets handed in (LISTEN_FDS) that no bind would adopt: a start logs
    // this as an error and goes on without them; the check fails on it, so
    // that a socket unit and a config that disagree are caught before a
    // start loses that socket's traffic.
    let unmatched = match crate::listen::take_inherited() {
        Ok(inherited) => crate::listen::unmatched(s, bind_was_set, inherited),
        Err(e) => return fail(exit::FAILURE, e.to_string()),
    };
    if !unmatched.is_empty() {
        for why in &unmatched {
            eprintln!("drover: error: {why}");
        }
        return ExitCode::from(exit::USAGE);
    }
    println!(
        "{}: ok ({} worker(s) running {:?}, listening on {})",
        source.origin(),
        s.workers.0,
        std::iter::once(program.as_str())
            .chain(s.command[1..].iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        s.bind
            .iter()
            .map(|b| b.address.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "checked: the settings, user and group, the program, chdir, \
         and that each LISTEN_FDS socket matches a bind; \
         not checked: binding the addresses, fd://N sockets, \
         the pidfile, log file and control socket paths, and what the workers' user may access"
    );
    ExitCode::from(exit::OK)
}
