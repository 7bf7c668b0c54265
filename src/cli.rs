//! The command line: a run (`drover [OPTIONS] [-- WORKER_COMMAND...]`),
//! `drover check`, `drover ctl`, and the completion scripts and manual page
//! generated from the same definitions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use tracing_subscriber::filter::LevelFilter;

use crate::config::{ConfigError, Given, Layer, Place, Settings, Source};
use crate::control::{self, Command};
use crate::logfile::LogFile;
use crate::logformat::{JsonLines, LogFormat};
use crate::master::{self, exit};

/// The config file used when none is named.
const DISCOVERED: &str = "drover.toml";

/// `drover --version`: as `rustc -V`, the commit (and its date) and the
/// target it was built from (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("DROVER_BUILD_INFO"),
    ")"
);

const USAGE: &str = "drover [OPTIONS] [-- <WORKER_COMMAND>...]
       drover check [OPTIONS] [--print] [-- <WORKER_COMMAND>...]
       drover ctl [-c FILE | --socket PATH] [--json] [--timeout DURATION] <status|ready|reload|scale N|stop|upgrade|events>
       drover completions <bash|zsh|fish|elvish|powershell>
       drover man [ctl|check]";

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version = VERSION,
    about = "A pre-fork process supervisor: binds the sockets once, runs N workers on them, \
             reloads without dropping a request and shuts down in stages",
    override_usage = USAGE,
    subcommand_value_name = "SUBCOMMAND",
    subcommand_help_heading = "Subcommands",
    after_help = "Settings come from defaults < the config file < DROVER_<KEY> environment \
                  variables < the command line; `drover check --print` shows each one and where \
                  it came from. Every key is described in docs/configuration.md."
)]
struct Cli {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    run: RunArgs,
}

/// The options of a run (and of `drover check`, which validates a run).
#[derive(Debug, Default, Args)]
struct RunArgs {
    /// Config file (TOML). Without it: $DROVER_CONFIG, else ./drover.toml if
    /// there is one, else defaults and the command line only.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable): HOST:PORT, [V6]:PORT, unix:PATH, fd://N.
    #[arg(short, long, value_name = "ADDR")]
    bind: Vec<String>,
    /// Number of workers.
    #[arg(short, long, value_name = "N")]
    workers: Option<String>,
    /// Log level: error, warn, info, debug, trace (overrides RUST_LOG, the
    /// environment and the file).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Where to write the master's pid.
    #[arg(long, value_name = "PATH")]
    pidfile: Option<String>,
    /// Any setting, as KEY=VALUE (repeatable), e.g. --set graceful_timeout=10s.
    #[arg(short, long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Development mode: reload when the app's files change (the workers'
    /// working directory, or reload_paths and reload_extra_files).
    #[arg(long)]
    reload: bool,
    /// The program the workers run and its arguments, after `--`
    /// (instead of `command` in the config).
    #[arg(last = true, value_name = "WORKER_COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Validate the configuration and exit (0 if valid, 2 if not, 3 if the
    /// workers could not boot).
    Check {
        /// Also print every setting as resolved, and where it came from
        /// (default, file, environment or command line).
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Send a command to a running drover through its control socket; the
    /// exit status follows the verdict (0 done, 1 failed or unreachable).
    Ctl(CtlArgs),
    /// Print a completion script for SHELL on standard output.
    #[command(
        after_help = "bash:  drover completions bash > ~/.local/share/bash-completion/completions/drover
zsh:   drover completions zsh > ~/.zfunc/_drover   (with fpath+=~/.zfunc before compinit)
fish:  drover completions fish > ~/.config/fish/completions/drover.fish"
    )]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
    /// Print the manual page (roff) on standard output: `drover man | man -l -`.
    Man {
        /// The page of a subcommand (drover-ctl, drover-check) instead of drover's.
        #[arg(value_name = "SUBCOMMAND")]
        subcommand: Option<String>,
    },
}

/// `drover ctl`: its options may come before or after its command.
#[derive(Debug, Args)]
struct CtlArgs {
    /// A config file, for its `control_socket`.
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The control socket (default: `control_socket` of the config).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the answer (a reload waits for its verdict).
    #[arg(long, global = true, default_value = "5m", value_name = "DURATION")]
    timeout: humantime::Duration,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
#[command(subcommand_value_name = "COMMAND")]
enum CtlCommand {
    /// Master and workers: slot, pid, generation, state, uptime, restarts, recycles, RSS.
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
        /// SIGQUIT's quick stop instead of a graceful one.
        #[arg(long)]
        quick: bool,
    },
    /// Binary upgrade; waits until the new master is ready or has failed.
    Upgrade,
    /// Exit 0 only when drover should receive traffic: enough slots have a
    /// ready worker (ready_share) and drover is not paused or stopping (a
    /// readiness probe; the same decision as the admin endpoint's /readyz).
    Ready,
    /// Print the master's events, one JSON object per line, as they happen,
    /// until drover exits or this is interrupted (across a binary upgrade,
    /// the new master's follow).
    Events,
}

impl CtlCommand {
    fn request(&self) -> Command {
        match self {
            CtlCommand::Status => Command::Status,
            CtlCommand::Reload => Command::Reload,
            CtlCommand::Scale { count } => Command::Scale { workers: *count },
            CtlCommand::Stop { quick } => Command::Stop { quick: *quick },
            CtlCommand::Upgrade => Command::Upgrade,
            CtlCommand::Ready => Command::Ready,
            CtlCommand::Events => Command::Events,
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

impl RunArgs {
    /// These options with those of `over` (given after a subcommand) on top.
    fn merged(self, over: RunArgs) -> RunArgs {
        RunArgs {
            config: over.config.or(self.config),
            bind: [self.bind, over.bind].concat(),
            workers: over.workers.or(self.workers),
            log_level: over.log_level.or(self.log_level),
            pidfile: over.pidfile.or(self.pidfile),
            set: [self.set, over.set].concat(),
            reload: self.reload || over.reload,
            command: if over.command.is_empty() {
                self.command
            } else {
                over.command
            },
        }
    }

    /// The options given, by name, for a subcommand that takes none of them.
    fn given(&self) -> Vec<&'static str> {
        [
            ("--config", self.config.is_some()),
            ("--bind", !self.bind.is_empty()),
            ("--workers", self.workers.is_some()),
            ("--log-level", self.log_level.is_some()),
            ("--pidfile", self.pidfile.is_some()),
            ("--set", !self.set.is_empty()),
            ("--reload", self.reload),
            ("-- WORKER_COMMAND", !self.command.is_empty()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

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
        if self.reload {
            layer.reload = Some(Given {
                value: true,
                at: Place::Flag("--reload".into()),
            });
        }
        if let Some(p) = &self.pidfile {
            layer = layer.overlay(flag(format!("--pidfile {p}"), &format!("pidfile={p}"))?);
        }
        let command = &self.command;
        if !command.is_empty() {
            layer.command = Some(Given {
                value: command.clone(),
                at: Place::Flag(format!("-- {}", command.join(" "))),
            });
        }
        let env = Layer::from_env(std::env::vars())?;
        for why in &env.ignored {
            eprintln!("drover: warning: {why}");
        }
        Ok(Source {
            file: self.config_file(),
            env: env.layer,
            cli: layer,
        })
    }

    /// The config file: `-c FILE`, else `$DROVER_CONFIG`, else `drover.toml`
    /// in the working directory if there is one (as Gunicorn finds
    /// `gunicorn.conf.py`).
    fn config_file(&self) -> Option<PathBuf> {
        self.config
            .clone()
            .or_else(|| {
                std::env::var_os("DROVER_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .or_else(|| Some(PathBuf::from(DISCOVERED)).filter(|p| p.is_file()))
    }
}

/// drover's entry point.
pub fn main() -> ExitCode {
    // Before anything is opened (the config, the log file): the descriptors
    // open now are our parent's, the only ones `fd://N` may name.
    crate::listen::note_open_descriptors();
    let cli = Cli::parse();
    if matches!(cli.action, Some(Action::Check { .. } | Action::Ctl(_))) {
        end_quietly_on_a_closed_pipe();
    }
    // For a check: whether to print the settings.
    let (run, check_print) = match cli.action {
        None => (cli.run, None),
        Some(Action::Check { print, run }) => (cli.run.merged(run), Some(print)),
        Some(Action::Ctl(ctl)) => return ctl_main(cli.run, ctl),
        Some(Action::Completions { shell }) => {
            if let Some(status) = refuse_run_options("completions", &cli.run) {
                return status;
            }
            return completions(shell);
        }
        Some(Action::Man { subcommand }) => {
            if let Some(status) = refuse_run_options("man", &cli.run) {
                return status;
            }
            return man(subcommand.as_deref());
        }
    };
    let (loaded, source) = match run.source().and_then(|source| Ok((source.load()?, source))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("drover: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if let Some(print) = check_print {
        return check(&source, &loaded.settings, loaded.bind_was_set, print);
    }
    let s = &loaded.settings;
    let open_log = |path: &Path| LogFile::open(path).map_err(|e| crate::hint::at_path(path, e));
    let log = match s.log_file.as_deref().map(open_log).transpose() {
        Ok(log) => log,
        Err(e) => {
            eprintln!(
                "drover: {}log_file {}: {e}",
                crate::config::located(&s.places.of("log_file").cloned()),
                s.log_file.as_deref().unwrap_or(Path::new("")).display()
            );
            return ExitCode::from(exit::FAILURE);
        }
    };
    init_logger(s, log.as_ref());
    match master::run(source, loaded, log) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_status())
        }
    }
}

/// The logger: `log_level`, `log_format`, to `log` or standard error.
fn init_logger(s: &Settings, log: Option<&LogFile>) {
    // A line that cannot be written (a full disk under log_file) is lost:
    // tracing's report of it goes to standard error with eprintln!, which
    // panics when that fails too, and the master would die with its workers.
    let fmt = tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .with_max_level(LevelFilter::from_level(s.log_level.0))
        .log_internal_errors(false);
    match (log, s.log_format) {
        (Some(file), LogFormat::Text) => fmt.with_writer(file.clone()).init(),
        (None, LogFormat::Text) => fmt.with_writer(crate::logfile::Stderr::open()).init(),
        (Some(file), LogFormat::Json) => fmt
            .event_format(JsonLines::install())
            .with_writer(file.clone())
            .init(),
        (None, LogFormat::Json) => fmt
            .event_format(JsonLines::install())
            .with_writer(crate::logfile::Stderr::open())
            .init(),
    }
}

/// A subcommand that takes none of a run's options refuses them, rather than
/// ignoring what the user meant to say.
fn refuse_run_options(subcommand: &str, run: &RunArgs) -> Option<ExitCode> {
    let given = run.given();
    if given.is_empty() {
        return None;
    }
    let what = if given.len() == 1 {
        "is not an option"
    } else {
        "are not options"
    };
    eprintln!(
        "drover {subcommand}: {} {what} of `drover {subcommand}` (see drover {subcommand} --help)",
        given.join(", ")
    );
    Some(ExitCode::from(exit::USAGE))
}

/// `drover ctl`: the control socket from --socket, else from the config's
/// `control_socket` (-c given before or after `ctl`).
fn ctl_main(run: RunArgs, ctl: CtlArgs) -> ExitCode {
    let config = ctl.config.or(run.config.clone());
    let before_ctl = RunArgs {
        config: None,
        ..run
    };
    if let Some(status) = refuse_run_options("ctl", &before_ctl) {
        return status;
    }
    let from_config = || {
        RunArgs {
            config: config.clone(),
            ..RunArgs::default()
        }
        .source()
        .and_then(|source| source.control_socket())
    };
    let path = match ctl.socket.map(Ok).or_else(|| from_config().transpose()) {
        Some(Ok(path)) => path,
        Some(Err(e)) => {
            eprintln!("drover: {e}");
            return ExitCode::from(exit::USAGE);
        }
        None => {
            eprintln!(
                "drover ctl: no control socket: give --socket PATH, or -c a config that sets control_socket"
            );
            return ExitCode::from(exit::USAGE);
        }
    };
    if let CtlCommand::Events = ctl.command {
        return ExitCode::from(crate::events::follow(&path, ctl.json));
    }
    ExitCode::from(control::ctl(
        &path,
        &ctl.command.request(),
        ctl.json,
        ctl.timeout.into(),
    ))
}

/// `drover completions SHELL`: generated into memory first (the generator
/// panics on a failed write, `drover completions bash | head` being one).
fn completions(shell: Shell) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "drover", &mut script);
    print_out("completions", &script)
}

/// For the commands that print and exit (`drover ctl status | head -1`): a
/// reader that has gone ends them silently, as it ends any Unix tool, where
/// Rust's ignored SIGPIPE made `println!` panic with a backtrace. (The
/// master keeps SIGPIPE ignored: a client that hangs up must not kill it.)
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: resets one signal's disposition, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Writes `bytes` to standard output; a closed pipe is no crash.
fn print_out(subcommand: &str, bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("drover {subcommand}: standard output: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// `drover man [SUBCOMMAND]`: the page drover(1), or drover-SUBCOMMAND(1).
fn man(subcommand: Option<&str>) -> ExitCode {
    let drover = Cli::command();
    let command = match subcommand {
        None => drover,
        Some(name) => {
            match drover.find_subcommand(name) {
                Some(sub) => {
                    // clap names are 'static; this runs once, then the process exits.
                    let page: &'static str = format!("drover-{name}").leak();
                    sub.clone()
                        .name(page)
                        .bin_name(format!("drover {name}"))
                        .version(VERSION)
                }
                None => {
                    eprintln!("drover man: no subcommand {name:?}: expected check, ctl, completions or man");
                    return ExitCode::from(exit::USAGE);
                }
            }
        }
    };
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .expect("rendering into memory");
    print_out("man", &page)
}

/// `drover check`: the settings are valid, and what a start looks up before it
/// binds anything is there: the user and group, `chdir`, the program (in the
/// PATH the workers get). Each failure exits with the status a start
/// would: 2 for the settings, the user or the group; 3 for the program or
/// `chdir`, which a start reports as "cannot boot".
fn check(source: &Source, s: &Settings, bind_was_set: bool, print: bool) -> ExitCode {
    let fail = |status: u8, message: String| {
        eprintln!("drover: {message}");
        ExitCode::from(status)
    };
    // The user, group and program, exactly as a start prepares them.
    let program = match crate::master::prepare(s) {
        Ok(program) => program.shown(),
        Err(e) => return fail(e.exit_status(), e.to_string()),
    };
    // --reload: what a start would watch can be watched.
    if let Err(e) = crate::watch::from_settings(s) {
        return fail(exit::USAGE, e.to_string());
    }
    if let Err(message) = command_runs_from_chdir(s) {
        return fail(exit::CANNOT_BOOT, message);
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
    if print {
        if let Err(e) = print_settings(source) {
            return fail(exit::USAGE, e.to_string());
        }
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

/// For `check`: a name was found in `PATH` already; a path is only tried
/// at exec, after the chdir: look at it from there, as the worker will.
fn command_runs_from_chdir(s: &Settings) -> Result<(), String> {
    if !s.command[0].contains('/') {
        return Ok(());
    }
    let exe = match &s.chdir {
        Some(dir) => dir.join(&s.command[0]),
        None => PathBuf::from(&s.command[0]),
    };
    if exe.is_file() && nix::unistd::access(&exe, nix::unistd::AccessFlags::X_OK).is_ok() {
        return Ok(());
    }
    // The errno the exec will meet, for the same hint a start gives.
    let (errno, what) = if exe.exists() {
        (nix::errno::Errno::EACCES, "not an executable file")
    } else {
        (nix::errno::Errno::ENOENT, "no such file")
    };
    Err(format!(
        "{}cannot run the worker command: {}: {what}{}",
        crate::config::located(
            &s.places
                .of("command")
                .filter(|at| !matches!(at, Place::Flag(_)))
                .cloned()
        ),
        exe.display(),
        crate::spawn::exec_hint(Path::new(&s.command[0]), errno, s.chdir.as_deref())
    ))
}

/// `drover check --print`: every setting as TOML (a valid config file), each
/// with where its value came from, in the order the precedence applies.
fn print_settings(source: &Source) -> Result<(), ConfigError> {
    println!(
        "# settings: default < {} < environment (DROVER_<KEY>, RUST_LOG) < command line",
        source
            .file
            .as_ref()
            .map_or("no config file".into(), |f| f.display().to_string())
    );
    for (key, value, at) in source.explain()? {
        let line = match value {
            Some(value) => format!("{key} = {value}"),
            None => format!("# {key} (unset)"),
        };
        let from = at.map_or("default".into(), |at| at.to_string());
        println!("{line:<40} # {from}");
    }
    Ok(())
}
