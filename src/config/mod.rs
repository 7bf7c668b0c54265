//! Settings: the schema, their defaults, and how a file and the command line
//! are layered into one validated [`Settings`].
//!
//! Every value is validated while it is deserialized (each setting has a type
//! whose `Deserialize` checks it), so a bad value is reported by `toml` with the
//! exact span of the offending text, which we turn into `FILE:LINE:COLUMN`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

mod values;
pub use values::*;

/// The type a setting is read as: its own, or `$raw` when given.
macro_rules! raw_type {
    ($ty:ty) => {
        $ty
    };
    ($ty:ty, $raw:ty) => {
        $raw
    };
}

/// Declares every setting once: its type and its default. From that list come
/// the [`Layer`] (what one source sets, all optional, each value with where it
/// was set) and the resolved [`Settings`] (every key has a value).
macro_rules! settings {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty $(as $raw:ty)? = $default:expr; )*) => {
        /// The file as toml reads it: each value with its byte span (read as
        /// `$raw` where a key accepts more forms than its type).
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawLayer {
            $( #[serde(default)] $name: Option<Spanned<raw_type!($ty $(, $raw)?)>>, )*
        }

        /// What one source (the file, the command line) sets. Unset keys are `None`.
        #[derive(Debug, Default, Clone)]
        pub struct Layer {
            $( pub $name: Option<Given<$ty>>, )*
            /// Where each `bind` entry was set, for errors about one address.
            pub bind_items: Vec<Place>,
        }

        /// The effective settings: every key has a value.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $( $(#[$doc])* pub $name: $ty, )*
            /// Where each key that is not a default was set, for errors
            /// found after the config was read (an unknown user, say).
            pub places: Places,
        }

        impl RawLayer {
            #[allow(clippy::useless_conversion)] // most raw types are the type itself
            fn locate(self, place: impl Fn(Range<usize>) -> Place) -> Layer {
                Layer {
                    $( $name: self.$name.map(|v| Given { at: place(v.span()), value: v.into_inner().into() }), )*
                    bind_items: Vec::new(),
                }
            }
        }

        impl Layer {
            /// This layer with `over` laid on top: what `over` sets wins.
            pub fn overlay(self, over: Layer) -> Layer {
                let bind_items = match over.bind {
                    Some(_) => over.bind_items,
                    None => self.bind_items,
                };
                Layer { $( $name: over.$name.or(self.$name), )* bind_items }
            }

            /// Every value of this layer marked as set at `at` (a flag).
            pub fn placed(self, at: &Place) -> Layer {
                Layer {
                    $( $name: self.$name.map(|v| Given { at: at.clone(), ..v }), )*
                    bind_items: self.bind_items.iter().map(|_| at.clone()).collect(),
                }
            }

            fn fill_defaults(self) -> Settings {
                let places = Places(
                    self.places()
                        .into_iter()
                        .filter_map(|(key, at)| Some((key, at?.clone())))
                        .collect(),
                );
                Settings { $( $name: self.$name.map_or_else(|| $default, |v| v.value), )* places }
            }

            /// Where each key was set; `None` for a default.
            pub fn places(&self) -> Vec<(&'static str, Option<&Place>)> {
                vec![$( (stringify!($name), self.$name.as_ref().map(|g| &g.at)), )*]
            }
        }

        impl Settings {
            /// Each key and its value as TOML (`None`: unset).
            pub fn shown(&self) -> Vec<(&'static str, Option<String>)> {
                vec![$( (stringify!($name), self.$name.toml()), )*]
            }
        }

        /// Every key, in declaration order (used by docs tests).
        pub const KEYS: &[&str] = &[$( stringify!($name) ),*];
    };
}

settings! {
    /// Addresses to listen on: `HOST:PORT`, `[V6]:PORT`, `unix:PATH`, `fd://N`.
    /// One address alone may be written without the list.
    bind: Vec<Bind> as OneOrMore<Bind> = vec![Bind::parse("127.0.0.1:8000").expect("default bind")];
    /// listen(2) backlog of every socket.
    backlog: Backlog = Backlog(2048);
    /// Set `IPV6_V6ONLY` on IPv6 sockets.
    ipv6_only: bool = true;
    /// Permission bits of Unix sockets, in octal.
    unix_socket_mode: Mode = Mode(0o660);
    /// The worker's argv.
    command: Vec<String> = Vec::new();
    /// How many workers to run.
    workers: WorkerCount = WorkerCount(1);
    /// When a worker counts as ready.
    ready: Ready = Ready::Auto;
    /// With `ready = "auto"`: how long after its exec a worker has to say
    /// that it speaks the notify protocol before it counts as ready.
    announce_timeout: Dur = Dur(Duration::from_secs(1));
    /// How long a worker may take to report `READY=1`.
    boot_timeout: Dur = Dur(Duration::from_secs(30));
    /// The signal that asks a worker to stop gracefully.
    stop_signal: Sig = Sig(Signal::SIGTERM);
    /// How long a graceful stop may take before SIGKILL.
    graceful_timeout: Dur = Dur(Duration::from_secs(30));
    /// How long a quick stop may take before SIGKILL.
    quick_timeout: Dur = Dur(Duration::from_secs(5));
    /// On SIGTERM, how long to keep serving (not ready) before stopping.
    prestop_delay: Dur = Dur(Duration::ZERO);
    /// First delay before respawning a worker that failed quickly.
    respawn_delay: Dur = Dur(Duration::from_millis(100));
    /// Upper bound of the exponential respawn delay.
    respawn_max_delay: Dur = Dur(Duration::from_secs(10));
    /// A worker that ran this long resets its slot's failure count.
    respawn_reset_after: Dur = Dur(Duration::from_secs(10));
    /// Heartbeat: a ready worker must send WATCHDOG=1 at least this often.
    timeout: Option<Dur> = None;
    /// After the SIGABRT of a missed heartbeat, how long before SIGKILL.
    abort_grace: Dur = Dur(Duration::from_secs(5));
    /// Replace a worker after it has run this long.
    max_age: Option<Dur> = None;
    /// Up to this much is added at random to each worker's max_age.
    max_age_jitter: Dur = Dur(Duration::ZERO);
    /// Replace a worker whose resident memory exceeds this.
    max_memory: Option<Size> = None;
    /// How often resident memory is checked when max_memory is set.
    memory_check_interval: Dur = Dur(Duration::from_secs(10));
    /// A slot that failed this many times in a row is reported as degraded.
    degraded_after: Count = Count(5);
    /// Run workers as this user (name or uid); its groups unless `group` is set.
    user: Option<String> = None;
    /// Run workers with this primary group (name or gid).
    group: Option<String> = None;
    /// Run the master too as `user`/`group`, once its sockets are bound.
    master_as_user: bool = false;
    /// The workers' umask, in octal.
    umask: Option<Mode> = None;
    /// The workers' working directory.
    chdir: Option<PathBuf> = None;
    /// During a reload, at most this many new workers boot at once.
    max_surge: Count = Count(1);
    /// The CPU priority a worker boots at while others serve: "normal",
    /// "idle" (SCHED_IDLE), or a nice increment; restored at `READY=1`.
    boot_priority: BootPriority = BootPriority::Normal;
    /// Development mode: reload (as SIGHUP does) when the app's files change.
    reload: bool = false;
    /// With `reload`: directories watched with everything below them; none
    /// means the workers' working directory (`chdir`, else drover's).
    reload_paths: Vec<PathBuf> = Vec::new();
    /// With `reload`: more files watched (a config the app reads, say).
    reload_extra_files: Vec<PathBuf> = Vec::new();
    /// The control socket (JSON lines, mode 0600); none if unset.
    control_socket: Option<PathBuf> = None;
    /// drover's own log file (reopened on SIGUSR1); stderr if unset.
    log_file: Option<PathBuf> = None;
    /// Start the worker command once per generation as a template that
    /// loads the app and forks the workers (docs/protocol.md, "Preload").
    preload: bool = false;
    /// Become a child subreaper; unset means "when PID 1".
    subreaper: bool = std::process::id() == 1;
    /// Where to write the master's pid.
    pidfile: Option<PathBuf> = None;
    /// Log level: error, warn, info, debug, trace.
    log_level: LogLevel = LogLevel(tracing::Level::INFO);
    /// argv run once after every worker is reaped at exit.
    on_exit: Vec<String> = Vec::new();
    /// How long the on_exit hook may run before it is killed.
    hook_timeout: Dur = Dur(Duration::from_secs(10));
    /// Variables added to the workers' environment.
    env: EnvVars = EnvVars::default();
    /// Variables removed from the workers' environment.
    env_remove: Vec<String> = Vec::new();
    /// The admin endpoint (/livez, /readyz, /metrics): HOST:PORT or unix:PATH; none if unset.
    admin_bind: Option<AdminBind> = None;
    /// The share of slots that must have a ready worker for /readyz to answer 200.
    ready_share: Share = Share(1.0);
    /// drover's log lines: "text" or "json" (one object per line).
    log_format: crate::logformat::LogFormat = crate::logformat::LogFormat::Text;
    /// Workers' stdout and stderr go through drover into its log, line by line.
    capture_output: bool = false;
    /// Event name → argv run when that event happens (bounded by hook_timeout).
    event_hooks: EventHooks = EventHooks::default();
}

/// Where a value was set, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In a file (or the text of a `--set`): 1-based line and column.
    Text {
        origin: String,
        line: usize,
        column: usize,
    },
    /// A command-line flag, shown as given: `--bind 127.0.0.1:80`.
    Flag(String),
    /// An environment variable, by name: `DROVER_WORKERS`.
    Env(String),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Place::Text {
                origin,
                line,
                column,
            } => write!(f, "{origin}:{line}:{column}"),
            Place::Flag(flag) => f.write_str(flag),
            Place::Env(name) => write!(f, "environment {name}"),
        }
    }
}

/// Where the keys of the effective settings were set; a key left at its
/// default has no place.
#[derive(Debug, Clone, Default)]
pub struct Places(Vec<(&'static str, Place)>);

impl Places {
    pub fn of(&self, key: &str) -> Option<&Place> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, at)| at)
    }
}

/// `at` as the start of an error message, `"drover.toml:3:8: "`; empty
/// for a default.
pub fn located(at: &Option<Place>) -> String {
    at.as_ref().map_or(String::new(), |at| format!("{at}: "))
}

/// A value as one source set it, and where.
#[derive(Debug, Clone)]
pub struct Given<T> {
    pub value: T,
    pub at: Place,
}

/// A configuration error, located in its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{at}: {message}")]
    Invalid { at: Place, message: String },
    #[error("{0}")]
    Other(String),
}

const NO_COMMAND: &str = "no worker command: set `command = [\"program\", \"arg\"]` in the config \
                          or give it after `--` on the command line";

impl Layer {
    /// Parses a TOML file's text; errors name `origin` and the line and column.
    pub fn parse(origin: &str, text: &str) -> Result<Layer, ConfigError> {
        let place = |span: Range<usize>| {
            let (line, column) = line_column(text, span.start);
            Place::Text {
                origin: origin.to_string(),
                line,
                column,
            }
        };
        let raw: RawLayer = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            ConfigError::Invalid {
                message: with_hint(&syntax_hint(e.message().trim_end(), text, &span))
                    .replace('\n', " "),
                at: place(span),
            }
        })?;
        let mut layer = raw.locate(place);
        if layer.bind.is_some() {
            // Read again for the position of each entry: an error about one
            // address among several points at that one.
            #[derive(Deserialize)]
            struct Entries {
                bind: Vec<Spanned<de::IgnoredAny>>,
            }
            if let Ok(entries) = toml::from_str::<Entries>(text) {
                layer.bind_items = entries.bind.iter().map(|e| place(e.span())).collect();
            }
        }
        Ok(layer)
    }

    /// Reads and parses a config file.
    pub fn read(path: &Path) -> Result<Layer, ConfigError> {
        let shown = path.display().to_string();
        let text = read_config_text(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Layer::parse(&shown, &text)
    }

    /// One `KEY=VALUE` override from the command line. The value is TOML
    /// (`workers=4`, `bind=["a","b"]`); a bare word is taken as a string
    /// (`graceful_timeout=5s`).
    pub fn parse_override(arg: &str) -> Result<Layer, ConfigError> {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(ConfigError::Other(format!(
                "--set {arg}: expected KEY=VALUE, for example --set graceful_timeout=10s"
            )));
        };
        let origin = format!("--set {arg}");
        let key = key.trim();
        let as_toml = format!("{key} = {value}");
        let layer = match Layer::parse(&origin, &as_toml) {
            Ok(layer) => layer,
            // Valid TOML that the setting refuses: that error is the one to
            // show. Otherwise the value was a bare word: read it as a string.
            Err(first) if toml::from_str::<toml::Table>(&as_toml).is_ok() => return Err(first),
            Err(_) => Layer::parse(&origin, &format!("{key} = {}", toml_string(value)))?,
        };
        // Checks of the whole configuration name the option, not a column of
        // a text the user never wrote.
        Ok(layer.placed(&Place::Flag(origin)))
    }

    /// Resolves defaults and checks what needs more than one value: each
    /// error names where the offending value was set.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        self.check_values()?;
        // Both may be defaults; keep where they were set for the message.
        let delay_at = self.respawn_delay.as_ref().map(|g| g.at.clone());
        let max_at = self.respawn_max_delay.as_ref().map(|g| g.at.clone());
        let settings = self.fill_defaults();
        let (delay, max) = (settings.respawn_delay, settings.respawn_max_delay);
        if delay.0 > max.0 {
            // Point at the bound if it was set, else at the delay that passes
            // the default bound (both defaults agree with each other).
            let at = max_at
                .clone()
                .or(delay_at.clone())
                .expect("a value was set");
            let source = |at: &Option<Place>| {
                at.as_ref()
                    .map_or("the default".to_string(), |p| format!("set at {p}"))
            };
            return Err(ConfigError::Invalid {
                at,
                message: format!(
                    "`respawn_max_delay` ({max}, {}) is less than `respawn_delay` ({delay}, {}): \
                     expected respawn_delay <= respawn_max_delay",
                    source(&max_at),
                    source(&delay_at)
                ),
            });
        }
        Ok(settings)
    }

    /// Checks of values whose type alone cannot refuse them (an empty path is
    /// a valid path, zero a valid duration), and of `bind` as a whole.
    fn check_values(&self) -> Result<(), ConfigError> {
        let invalid = |at: &Place, message: String| {
            Err(ConfigError::Invalid {
                at: at.clone(),
                message,
            })
        };
        match &self.command {
            None => return Err(ConfigError::Other(NO_COMMAND.into())),
            Some(c) if c.value.is_empty() => {
                return invalid(
                    &c.at,
                    "`command` is empty: expected the program and its arguments, like [\"./app\", \"--port\", \"80\"]".into(),
                )
            }
            Some(c) if c.value[0].is_empty() => {
                return invalid(&c.at, "`command`: the program name is empty".into())
            }
            Some(_) => {}
        }
        if let Some(bind) = &self.bind {
            check_binds(bind, &self.bind_items)?;
        }
        let empty_path = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str().is_empty());
        let empty_name = |s: &Option<String>| s.as_deref() == Some("");
        for (key, at) in [
            ("pidfile", set_at(&self.pidfile, empty_path)),
            ("chdir", set_at(&self.chdir, empty_path)),
            ("control_socket", set_at(&self.control_socket, empty_path)),
            ("log_file", set_at(&self.log_file, empty_path)),
            ("user", set_at(&self.user, empty_name)),
            ("group", set_at(&self.group, empty_name)),
            (
                "on_exit",
                set_at(&self.on_exit, |argv| {
                    argv.first().is_some_and(String::is_empty)
                }),
            ),
        ] {
            if let Some(at) = at {
                return invalid(
                    at,
                    format!("`{key}` is empty: remove the key or give it a value"),
                );
            }
        }
        if let Some(c) = &self.control_socket {
            if let Some(e) = c.value.as_deref().and_then(values::socket_path_too_long) {
                return invalid(&c.at, format!("`control_socket` {e}"));
            }
        }
        if let Some(at) = set_at(&self.boot_timeout, |d| d.0.is_zero()) {
            return invalid(at, "`boot_timeout` must be more than 0s".into());
        }
        if let Some(at) = set_at(&self.timeout, |t| t.is_some_and(|t| t.0.is_zero())) {
            return invalid(
                at,
                "`timeout` must be more than 0s (remove it to turn heartbeats off)".into(),
            );
        }
        // Below this no worker can keep up (it beats at half the interval,
        // from the code that serves): every worker would be aborted soon
        // after it is ready, forever.
        if let Some(at) = set_at(&self.timeout, |t| {
            t.is_some_and(|t| t.0 < MIN_HEARTBEAT_TIMEOUT)
        }) {
            return invalid(
                at,
                format!(
                    "`timeout` must be at least {}: workers send WATCHDOG=1 at half of it; \
                     set it above your slowest request (the kits use 30s)",
                    humantime::format_duration(MIN_HEARTBEAT_TIMEOUT)
                ),
            );
        }
        Ok(())
    }
}

/// Where `given` was set, if its value is `bad`.
fn set_at<T>(given: &Option<Given<T>>, bad: impl Fn(&T) -> bool) -> Option<&Place> {
    given.as_ref().filter(|g| bad(&g.value)).map(|g| &g.at)
}

/// `bind` needs an address, each bound once (a second socket on the same
/// address fails with "address in use" after the first was bound), and
/// distinct names for `LISTEN_FDNAMES`.
fn check_binds(bind: &Given<Vec<Bind>>, items: &[Place]) -> Result<(), ConfigError> {
    if bind.value.is_empty() {
        return Err(ConfigError::Invalid {
            at: bind.at.clone(),
            message: "`bind` is empty: expected at least one address, like [\"127.0.0.1:8000\"]"
                .into(),
        });
    }
    let at = |i: usize| items.get(i).unwrap_or(&bind.at).clone();
    for (i, b) in bind.value.iter().enumerate() {
        let earlier = &bind.value[..i];
        // Port 0 asks for a new free port each time: several are distinct.
        let fixed = !matches!(b.address, Address::Tcp(a) if a.port() == 0);
        if let Some(first) = earlier.iter().position(|e| fixed && e.address == b.address) {
            return Err(ConfigError::Invalid {
                at: at(i),
                message: format!(
                    "`bind`: {} is listed twice (first at {}): expected each address once",
                    b.address,
                    at(first)
                ),
            });
        }
        if let Some(first) = earlier
            .iter()
            .enumerate()
            .position(|(j, e)| e.fd_name(j) == b.fd_name(i))
        {
            return Err(ConfigError::Invalid {
                at: at(i),
                message: format!(
                    "`bind`: the name {:?} is used twice (first at {}): expected distinct names",
                    b.fd_name(i),
                    at(first)
                ),
            });
        }
    }
    Ok(())
}

/// Where the settings come from: the file, re-read on every reload, and the
/// environment (`DROVER_<KEY>`, read once at start) and the command line,
/// laid on top of it in that order each time.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub file: Option<PathBuf>,
    pub env: Layer,
    pub cli: Layer,
}

/// One setting for `drover check --print`: its key, its value as TOML
/// (`None` if unset) and where it was set (`None` for the default).
pub type Explained = (&'static str, Option<String>, Option<Place>);

/// Settings as loaded, with what the loader needs to know about them.
pub struct Loaded {
    pub settings: Settings,
    /// `bind` was given explicitly (else inherited sockets replace the default).
    pub bind_was_set: bool,
}

impl Source {
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let file = match &self.file {
            Some(path) => Layer::read(path)?,
            None => Layer::default(),
        };
        let layer = self.layered(file);
        let bind_was_set = layer.bind.is_some();
        let settings = layer.resolve()?;
        Ok(Loaded {
            settings,
            bind_was_set,
        })
    }

    /// The file's layer with the environment and the command line on top.
    fn layered(&self, file: Layer) -> Layer {
        file.overlay(self.env.clone()).overlay(self.cli.clone())
    }

    /// The settings with where each was set, for `drover check --print`.
    pub fn explain(&self) -> Result<Vec<Explained>, ConfigError> {
        let file = match &self.file {
            Some(path) => Layer::read(path)?,
            None => Layer::default(),
        };
        let layer = self.layered(file);
        let places: Vec<Option<Place>> = layer
            .places()
            .into_iter()
            .map(|(_, at)| at.cloned())
            .collect();
        let settings = layer.resolve()?;
        Ok(settings
            .shown()
            .into_iter()
            .zip(places)
            .map(|((key, value), at)| (key, value, at))
            .collect())
    }

    /// The control socket the settings name, without requiring the rest to
    /// be complete (for `drover ctl`).
    pub fn control_socket(&self) -> Result<Option<PathBuf>, ConfigError> {
        let file = match &self.file {
            Some(path) => Layer::read(path)?,
            None => Layer::default(),
        };
        Ok(self.layered(file).control_socket.and_then(|g| g.value))
    }

    /// Where the settings come from, for messages.
    pub fn origin(&self) -> String {
        self.file
            .as_ref()
            .map_or("command line".into(), |p| p.display().to_string())
    }
}

/// `DROVER_*` variables that are not settings: the worker contract and the
/// environment drover gives its hooks and a new master. `DROVER_CONFIG`
/// names the config file (read by the command line).
const NOT_SETTINGS: &[&str] = &[
    "DROVER_CONFIG",
    "DROVER_WORKER_ID",
    "DROVER_GENERATION",
    "DROVER_UPGRADE_FROM",
    "DROVER_UPGRADE_BOUND",
    "DROVER_UPGRADE_ADMIN_FD",
    "DROVER_SERVICE_NOTIFY_SOCKET",
    "DROVER_CAUSE",
    "DROVER_SHUTDOWN",
    "DROVER_KILLED",
    "DROVER_EXIT_STATUS",
];

/// Settings whose `DROVER_<KEY>` name drover also sets for its workers: in a
/// worker of another drover (`DROVER_WORKER_ID` is set) they are that
/// drover's budget for this process, not settings for this one.
const WORKER_CONTRACT_SETTINGS: &[&str] = &["graceful_timeout", "quick_timeout"];

/// The shortest heartbeat interval (`timeout`) drover accepts.
const MIN_HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// The settings found in the environment, and what was left out.
#[derive(Debug, Default)]
pub struct FromEnv {
    pub layer: Layer,
    /// Variables ignored, each with why (`DROVER_WORKR` is not a setting…).
    pub ignored: Vec<String>,
}

impl Layer {
    /// The settings given as `DROVER_<KEY>` (the key in upper case) among
    /// `vars`, each value read as for `--set`; and `RUST_LOG` for the log
    /// level when it is a plain level name and `DROVER_LOG_LEVEL` is not set.
    pub fn from_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<FromEnv, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        let in_worker = vars.contains_key("DROVER_WORKER_ID");
        let mut found = FromEnv::default();
        for (name, value) in &vars {
            let Some(upper) = name.strip_prefix("DROVER_") else {
                continue;
            };
            let key = upper.to_ascii_lowercase();
            if NOT_SETTINGS.contains(&name.as_str()) {
                continue;
            }
            if !KEYS.contains(&key.as_str()) {
                let near = nearest(&key, KEYS.iter().copied())
                    .map(|k| format!(" (did you mean DROVER_{}?)", k.to_ascii_uppercase()))
                    .unwrap_or_default();
                found
                    .ignored
                    .push(format!("{name} is not a setting{near}: ignored"));
                continue;
            }
            if in_worker && WORKER_CONTRACT_SETTINGS.contains(&key.as_str()) {
                found.ignored.push(format!(
                    "{name}={value} is ignored: DROVER_WORKER_ID is set, so it is the stop budget \
                     of the drover this one runs under (give it as --set {key}=… instead)"
                ));
                continue;
            }
            let at = Place::Env(name.clone());
            let layer = match Layer::parse_override(&format!("{key}={value}")) {
                Ok(layer) => layer.placed(&at),
                Err(ConfigError::Invalid { message, .. }) => {
                    return Err(ConfigError::Invalid { at, message })
                }
                Err(other) => return Err(other),
            };
            found.layer = std::mem::take(&mut found.layer).overlay(layer);
        }
        if found.layer.log_level.is_none() {
            if let Some(level) = vars
                .get("RUST_LOG")
                .and_then(|v| LogLevel::from_str(v).ok())
            {
                found.layer.log_level = Some(Given {
                    value: level,
                    at: Place::Env("RUST_LOG".into()),
                });
            }
        }
        Ok(found)
    }
}

/// A serde message with what to write instead, for the usual slips: a name
/// near a known one, a string where a list is expected, a quoted number.
/// toml's syntax errors with what they are about: the key set twice, the
/// bare word that is no value.
fn syntax_hint(message: &str, text: &str, span: &Range<usize>) -> String {
    let rest = text.get(span.start..).unwrap_or_default();
    let line = rest.lines().next().unwrap_or_default();
    match message {
        "duplicate key" => {
            let key = line.split('=').next().unwrap_or_default();
            let key = key.trim().trim_end_matches(']').trim();
            format!("duplicate key `{key}`: set each key once")
        }
        "string values must be quoted, expected literal string" => {
            let word = line
                .split(['#', ',', ']'])
                .next()
                .unwrap_or_default()
                .trim();
            if word.is_empty() {
                return "a value is missing: write one after `=`, like workers = 4".to_string();
            }
            if let Some(c) = word.chars().find(|c| c.is_control()) {
                return format!("a control character ({c:?}) is in the file here: remove it");
            }
            format!(
                "`{word}` is not a value: quote a string (\"{word}\"); a number or a boolean is written bare, like 4 or true"
            )
        }
        _ => message.to_string(),
    }
}

fn with_hint(message: &str) -> String {
    // `invalid type: string "app", expected a sequence`
    if let Some(rest) = message.strip_prefix("invalid type: string ") {
        if let Some(value) = rest.strip_suffix(", expected a sequence") {
            // A command line written as one string: its words, one per item.
            let words: Vec<String> = value
                .trim_matches('"')
                .split_whitespace()
                .map(toml_string)
                .collect();
            return format!("{message}: write a list, like [{}]", words.join(", "));
        }
        if let Some((value, expected)) = rest.split_once(", expected ") {
            let digits = value.trim_matches('"');
            let numeric = expected.contains("from ") && digits.parse::<i64>().is_ok();
            if numeric {
                return format!("{message}: write the number without quotes, like {digits}");
            }
        }
    }
    did_you_mean(message)
}

/// A serde "unknown field" or "unknown variant" message with the nearest of
/// the names it expected instead of all of them, when one is near enough.
fn did_you_mean(message: &str) -> String {
    let mut ticked = message.split('`').skip(1).step_by(2);
    let kind = ["unknown field", "unknown variant"]
        .into_iter()
        .find(|k| message.starts_with(k));
    let (Some(kind), Some(given)) = (kind, ticked.next()) else {
        return message.to_string();
    };
    match nearest(given, ticked) {
        Some(near) => format!("{kind} `{given}` — did you mean `{near}`?"),
        None => message.to_string(),
    }
}

/// The candidate nearest to `word` by edit distance, if it is near enough to
/// be a typo of it: at most one edit per three letters (rounded up).
pub fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = word.chars().count().div_ceil(3).max(1);
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A list that may be written as its one element alone (`bind = "…"`).
pub struct OneOrMore<T>(Vec<T>);

impl<T> From<OneOrMore<T>> for Vec<T> {
    fn from(list: OneOrMore<T>) -> Vec<T> {
        list.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMore<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMore<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list like [\"127.0.0.1:8000\"] or one address")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMore(items))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                T::deserialize(de::value::StrDeserializer::new(s)).map(|t| OneOrMore(vec![t]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| OneOrMore(vec![t]))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A setting's value written back as TOML, for `drover check --print`.
pub trait Toml {
    /// The value as TOML text; `None` when unset.
    fn toml(&self) -> Option<String>;
}

macro_rules! toml_as {
    ($($ty:ty => |$v:ident| $e:expr;)*) => {
        $(impl Toml for $ty {
            fn toml(&self) -> Option<String> {
                let $v = self;
                Some($e)
            }
        })*
    };
}

toml_as! {
    bool => |b| b.to_string();
    String => |s| toml_string(s);
    PathBuf => |p| toml_string(&p.display().to_string());
    Backlog => |n| n.0.to_string();
    WorkerCount => |n| n.0.to_string();
    Count => |n| n.0.to_string();
    BootPriority => |p| match p {
        BootPriority::Normal => toml_string("normal"),
        BootPriority::Idle => toml_string("idle"),
        BootPriority::Nice(n) => n.to_string(),
    };
    Mode => |m| format!("0o{:o}", m.0);
    Dur => |d| toml_string(&d.to_string());
    Sig => |s| toml_string(s.0.as_str());
    Size => |s| toml_string(&s.to_string());
    LogLevel => |l| toml_string(&l.0.to_string().to_ascii_lowercase());
    // Unit variants named in lower case (serde's rename_all = "lowercase").
    Ready => |r| toml_string(&format!("{r:?}").to_ascii_lowercase());
    crate::logformat::LogFormat => |f| toml_string(&format!("{f:?}").to_ascii_lowercase());
    AdminBind => |a| toml_string(&a.0.to_string());
    Share => |s| if s.0 == 1.0 { toml_string("all") } else { s.0.to_string() };
    EventHooks => |h| format!(
        "{{ {} }}",
        h.0.iter()
            .map(|(k, argv)| format!("{} = {}", toml_string(k), argv.toml().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Bind => |b| match &b.name {
        None => toml_string(&b.address.to_string()),
        Some(name) => format!(
            "{{ address = {}, name = {} }}",
            toml_string(&b.address.to_string()),
            toml_string(name)
        ),
    };
    EnvVars => |m| m.0.toml()?;
    BTreeMap<String, String> => |m| format!(
        "{{ {} }}",
        m.iter()
            .map(|(k, v)| format!("{} = {}", toml_string(k), toml_string(v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

impl<T: Toml> Toml for Vec<T> {
    fn toml(&self) -> Option<String> {
        let items: Vec<String> = self.iter().filter_map(Toml::toml).collect();
        Some(format!("[{}]", items.join(", ")))
    }
}

impl<T: Toml> Toml for Option<T> {
    fn toml(&self) -> Option<String> {
        self.as_ref().and_then(Toml::toml)
    }
}

/// The most a config file may hold: far more than any real one, little
/// enough that a wrong path (a log, a disk image) is refused, not loaded.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A config file's text. Only a regular file is read: a FIFO or a device
/// would block the master (a reload runs in its loop) or never end. The
/// open itself does not block (`O_NONBLOCK`), and the check is made on the
/// opened file, so the path cannot change in between.
fn read_config_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!(
            "not a regular file (a {}): expected a TOML file",
            file_kind(&meta.file_type())
        )));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "{} bytes: a config file may have at most {MAX_CONFIG_BYTES} bytes",
            meta.len()
        )));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    Ok(text)
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Layer::parse("c.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn syntax_errors_name_what_they_are_about() {
        assert_eq!(
            err("workers = 2\nworkers = 3\n"),
            "c.toml:2:1: duplicate key `workers`: set each key once"
        );
        assert_eq!(
            err("[env]\nA = \"1\"\n[env]\n"),
            "c.toml:3:2: duplicate key `env`: set each key once"
        );
        assert_eq!(
            err("workers = 4x\n"),
            "c.toml:1:11: `4x` is not a value: quote a string (\"4x\"); \
             a number or a boolean is written bare, like 4 or true"
        );
        assert_eq!(
            err("workers =\n"),
            "c.toml:1:10: a value is missing: write one after `=`, like workers = 4"
        );
        assert_eq!(
            err("command = [python3, \"x\"]\n"),
            "c.toml:1:12: `python3` is not a value: quote a string (\"python3\"); \
             a number or a boolean is written bare, like 4 or true"
        );
    }

    #[test]
    fn unknown_key_names_file_line_column_and_the_known_keys() {
        let e = err("workers = 2\nworkrs = 3\n");
        assert!(e.starts_with("c.toml:2:1: unknown field `workrs`"), "{e}");
        assert!(e.contains("`workers`"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_values_say_what_is_expected() {
        let e = err("workers = \"four\"");
        assert!(e.starts_with("c.toml:1:11:"), "{e}");
        assert!(e.contains("a number of workers from 1 to 4096"), "{e}");
        let e = err("workers = 0");
        assert!(e.contains("0 is out of range"), "{e}");
        let e = err("\n\ngraceful_timeout = \"3x\"");
        assert!(e.starts_with("c.toml:3:20:"), "{e}");
        assert!(e.contains("expected a duration like"), "{e}");
        let e = err("bind = [\"nowhere\"]");
        assert!(e.contains("expected HOST:PORT"), "{e}");
        let e = err("stop_signal = \"SIGNOPE\"");
        assert!(e.contains("unknown signal"), "{e}");
        let e = err("ready = \"soon\"");
        assert!(e.contains("unknown variant `soon`"), "{e}");
        let e = err("max_memory = \"12 apples\"");
        assert!(e.contains("invalid size"), "{e}");
        assert_eq!(
            Layer::parse("c", "unix_socket_mode = 0o640")
                .unwrap()
                .unix_socket_mode
                .map(|g| g.value),
            Some(Mode(0o640))
        );
        let e = err("unix_socket_mode = 660");
        assert!(e.contains("expected octal permission bits"), "{e}");
        let e = err("boot_timeout = \"400000000000 years\"");
        assert!(e.contains("too long"), "{e}");
        let e = err("unix_socket_mode = \"999\"");
        assert!(e.contains("octal permission bits"), "{e}");
    }

    #[test]
    fn observability_settings() {
        let l = Layer::parse(
            "c",
            "command = [\"x\"]\nadmin_bind = \"127.0.0.1:9100\"\nready_share = \"50%\"\nlog_format = \"json\"\n\
             capture_output = true\n[event_hooks]\nworker_exited = [\"logger\", \"x\"]\n",
        )
        .unwrap();
        let s = l.resolve().unwrap();
        assert_eq!(
            s.admin_bind,
            Some(AdminBind(crate::admin::AdminAddr::Tcp(
                "127.0.0.1:9100".parse().unwrap()
            )))
        );
        assert_eq!(s.ready_share, Share(0.5));
        assert_eq!(s.log_format, crate::logformat::LogFormat::Json);
        assert!(s.capture_output);
        assert_eq!(s.event_hooks.0["worker_exited"], vec!["logger", "x"]);
        let l = Layer::parse("c", "ready_share = 0.25").unwrap();
        assert_eq!(l.ready_share.unwrap().value, Share(0.25));
        let l = Layer::parse("c", "ready_share = 1").unwrap();
        assert_eq!(l.ready_share.unwrap().value, Share(1.0));
        let e = err("ready_share = 0");
        assert!(e.contains("out of range"), "{e}");
        let e = err("ready_share = \"most\"");
        assert!(
            e.starts_with("c.toml:1:15:") && e.contains("invalid share"),
            "{e}"
        );
        let e = err("admin_bind = \"fd://3\"");
        assert!(e.contains("not fd://N"), "{e}");
        let e = err("log_format = \"xml\"");
        assert!(e.contains("unknown variant `xml`"), "{e}");
        let e = err("[event_hooks]\nworker_died = [\"x\"]");
        assert!(e.contains("unknown event \"worker_died\""), "{e}");
        assert!(e.contains("worker_exited"), "{e}");
        let e = err("[event_hooks]\npaused = []");
        assert!(e.contains("is empty"), "{e}");
    }

    #[test]
    fn log_format_is_text_or_json() {
        let l = Layer::parse("c", "log_format = \"json\"").unwrap();
        assert_eq!(
            l.log_format.unwrap().value,
            crate::logformat::LogFormat::Json
        );
        let e = err("log_format = \"xml\"");
        assert!(
            e.contains("unknown variant `xml`, expected `text` or `json`"),
            "{e}"
        );
    }

    #[test]
    fn binds_in_every_form() {
        let l = Layer::parse(
            "c",
            r#"bind = ["127.0.0.1:0", "[::1]:80", "unix:/tmp/x.sock", "fd://3",
                       { address = "127.0.0.1:9", name = "admin" }]"#,
        )
        .unwrap();
        let b = l.bind.unwrap().value;
        assert_eq!(b[0].address, Address::Tcp("127.0.0.1:0".parse().unwrap()));
        assert_eq!(b[1].address, Address::Tcp("[::1]:80".parse().unwrap()));
        assert_eq!(b[2].address, Address::Unix("/tmp/x.sock".into()));
        assert_eq!(b[3].address, Address::Fd(3));
        assert_eq!(b[4].name.as_deref(), Some("admin"));
        assert_eq!("512MiB".parse::<Size>().unwrap(), Size(512 << 20));
        assert_eq!("300MB".parse::<Size>().unwrap(), Size(300_000_000));
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert!(
            err("bind = [{ address = \"127.0.0.1:9\", name = \"a:b\" }]").contains("without ':'")
        );
    }

    #[test]
    fn overrides_win_and_bare_words_are_strings() {
        let file = Layer::parse(
            "c",
            "workers = 2\ngraceful_timeout = \"9s\"\ncommand = [\"x\"]",
        )
        .unwrap();
        let cli = Layer::parse_override("graceful_timeout=5s")
            .unwrap()
            .overlay(Layer::parse_override("bind=[\"127.0.0.1:1\"]").unwrap());
        let s = file.overlay(cli).resolve().unwrap();
        assert_eq!(s.workers, WorkerCount(2));
        assert_eq!(s.graceful_timeout, Dur(Duration::from_secs(5)));
        assert_eq!(s.bind.len(), 1);
        let e = Layer::parse_override("workers=zero")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--set workers=zero:1:"), "{e}");
        assert!(e.contains("expected a number of workers"), "{e}");
        let e = Layer::parse_override("ready=Notify")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `Notify`"), "{e}");
        let e = Layer::parse_override("workers=0").unwrap_err().to_string();
        assert!(e.contains("0 is out of range"), "{e}");
    }

    #[test]
    fn typos_suggest_the_nearest_name() {
        assert_eq!(
            err("worker = 3"),
            "c.toml:1:1: unknown field `worker` — did you mean `workers`?"
        );
        assert_eq!(
            err("graceful_timout = \"3s\""),
            "c.toml:1:1: unknown field `graceful_timout` — did you mean `graceful_timeout`?"
        );
        assert_eq!(
            err("ready = \"notfy\""),
            "c.toml:1:9: unknown variant `notfy` — did you mean `notify`?"
        );
        assert_eq!(
            err("bind = [{ adress = \"127.0.0.1:1\" }]"),
            "c.toml:1:9: unknown field `adress` — did you mean `address`?"
        );
        // Nothing near: the whole list, as before.
        let e = err("zzzzzz = 1");
        assert!(
            e.contains("unknown field `zzzzzz`, expected one of `bind`"),
            "{e}"
        );
        assert_eq!(nearest("workr", KEYS.iter().copied()), Some("workers"));
        assert_eq!(nearest("wrk", KEYS.iter().copied()), None);
    }

    #[test]
    fn a_string_for_a_list_or_a_quoted_number_says_what_to_write() {
        assert_eq!(
            err("command = \"./app --port 80\""),
            "c.toml:1:11: invalid type: string \"./app --port 80\", expected a sequence: \
             write a list, like [\"./app\", \"--port\", \"80\"]"
        );
        assert_eq!(
            err("env_remove = \"DEBUG\""),
            "c.toml:1:14: invalid type: string \"DEBUG\", expected a sequence: write a list, \
             like [\"DEBUG\"]"
        );
        assert_eq!(
            err("workers = \"4\""),
            "c.toml:1:11: invalid type: string \"4\", expected a number of workers from 1 to \
             4096: write the number without quotes, like 4"
        );
        let e = err("workers = \"four\"");
        assert!(
            e.ends_with("expected a number of workers from 1 to 4096"),
            "{e}"
        );
    }

    #[test]
    fn bind_may_be_one_address_without_the_list() {
        let b = Layer::parse("c", "bind = \"127.0.0.1:8000\"")
            .unwrap()
            .bind
            .unwrap();
        assert_eq!(b.value, vec![Bind::parse("127.0.0.1:8000").unwrap()]);
        let b = Layer::parse("c", "bind = { address = \"unix:/tmp/a\", name = \"web\" }")
            .unwrap()
            .bind
            .unwrap();
        assert_eq!(b.value[0].name.as_deref(), Some("web"));
        assert_eq!(
            err("bind = \"nowhere\""),
            "c.toml:1:8: invalid address \"nowhere\": expected HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N"
        );
        let e = err("bind = 80");
        assert!(
            e.starts_with("c.toml:1:8: invalid type: integer `80`, expected a list like [\"127.0.0.1:8000\"] or one address"),
            "{e}"
        );
    }

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_environment_sits_between_the_file_and_the_command_line() {
        // A name that is no setting is a warning (the environment is shared
        // with other programs), not an error as in a file.
        let env = Layer::from_env(vars(&[
            ("DROVER_WORKERS", "3"),
            ("DROVER_BIND", "127.0.0.1:9"),
            ("DROVER_GRACEFUL_TIMEOUT", "7s"),
            ("DROVER_WORKR", "1"),
            ("DROVER_GENERATION", "4"),
            ("DROVER_CONFIG", "x.toml"),
            ("RUST_LOG", "debug"),
            ("HOME", "/root"),
        ]))
        .unwrap();
        assert_eq!(
            env.ignored,
            ["DROVER_WORKR is not a setting (did you mean DROVER_WORKERS?): ignored"]
        );
        let source = Source {
            file: None,
            env: Layer::parse("c.toml", "command = [\"x\"]\nworkers = 2")
                .unwrap()
                .overlay(env.layer),
            cli: Layer::parse_override("workers=5").unwrap(),
        };
        let explained = source.explain().unwrap();
        let find = |key: &str| {
            let (_, value, at) = explained.iter().find(|(k, _, _)| *k == key).unwrap();
            (
                value.clone().unwrap_or_default(),
                at.as_ref().map(|p| p.to_string()),
            )
        };
        assert_eq!(
            find("workers"),
            ("5".into(), Some("--set workers=5".into()))
        );
        assert_eq!(
            find("bind"),
            (
                "[\"127.0.0.1:9\"]".into(),
                Some("environment DROVER_BIND".into())
            )
        );
        assert_eq!(
            find("graceful_timeout"),
            (
                "\"7s\"".into(),
                Some("environment DROVER_GRACEFUL_TIMEOUT".into())
            )
        );
        assert_eq!(
            find("log_level"),
            ("\"debug\"".into(), Some("environment RUST_LOG".into()))
        );
        assert_eq!(
            find("command"),
            ("[\"x\"]".into(), Some("c.toml:1:11".into()))
        );
        assert_eq!(find("backlog"), ("2048".into(), None));
        // DROVER_LOG_LEVEL wins over RUST_LOG; a bad value names the variable.
        let env =
            Layer::from_env(vars(&[("DROVER_LOG_LEVEL", "warn"), ("RUST_LOG", "debug")])).unwrap();
        assert_eq!(
            env.layer.log_level.unwrap().value,
            LogLevel(tracing::Level::WARN)
        );
        let e = Layer::from_env(vars(&[("DROVER_WORKERS", "0")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment DROVER_WORKERS: 0 is out of range: expected a number of workers from 1 to 4096"
        );
    }

    #[test]
    fn in_a_worker_of_another_drover_its_stop_budget_is_not_a_setting() {
        let env = Layer::from_env(vars(&[
            ("DROVER_WORKER_ID", "1"),
            ("DROVER_GRACEFUL_TIMEOUT", "30"),
            ("DROVER_QUICK_TIMEOUT", "5"),
            ("DROVER_WORKERS", "2"),
        ]))
        .unwrap();
        assert!(env.layer.graceful_timeout.is_none());
        assert!(env.layer.quick_timeout.is_none());
        assert_eq!(env.layer.workers.unwrap().value, WorkerCount(2));
        assert_eq!(env.ignored.len(), 2, "{:?}", env.ignored);
        assert!(env.ignored[0]
            .starts_with("DROVER_GRACEFUL_TIMEOUT=30 is ignored: DROVER_WORKER_ID is set"));
    }

    #[test]
    fn printed_settings_read_back_as_the_same_settings() {
        let text = "bind = [\"127.0.0.1:0\", { address = \"unix:/tmp/a b\", name = \"web\" }]\n\
                    command = [\"python3\", \"app.py\", \"--say \\\"hi\\\"\"]\n\
                    unix_socket_mode = 0o600\nmax_memory = \"1GiB\"\ntimeout = \"1m 30s\"\n\
                    stop_signal = \"INT\"\nready = \"notify\"\nlog_level = \"warn\"\nlog_format = \"json\"\n\
                    env = { \"A B\" = \"1\", C = \"x\\ny\" }\nchdir = \"/srv/app\"\numask = \"027\"";
        let source = Source {
            file: None,
            env: Layer::parse("c.toml", text).unwrap(),
            cli: Layer::default(),
        };
        let printed: String = source
            .explain()
            .unwrap()
            .into_iter()
            .filter_map(|(key, value, _)| value.map(|v| format!("{key} = {v}\n")))
            .collect();
        let again = Source {
            file: None,
            env: Layer::parse("printed", &printed).unwrap(),
            cli: Layer::default(),
        };
        let values = |s: &Source| -> Vec<Option<String>> {
            s.explain()
                .unwrap()
                .into_iter()
                .map(|(_, v, _)| v)
                .collect()
        };
        assert_eq!(values(&source), values(&again), "{printed}");
    }

    #[test]
    fn stop_signals_must_end_a_worker_that_can_catch_them() {
        for bad in [
            "SIGSTOP", "KILL", "SIGCHLD", "TSTP", "SIGTTIN", "SIGTTOU", "CONT", "URG", "WINCH",
        ] {
            let e = err(&format!("\nstop_signal = \"{bad}\""));
            assert!(e.starts_with("c.toml:2:15: SIG"), "{bad}: {e}");
            assert!(e.contains("cannot be a stop signal"), "{bad}: {e}");
        }
        for good in [
            "SIGTERM", "INT", "SIGQUIT", "HUP", "USR1", "SIGUSR2", "ALRM", "PWR",
        ] {
            Layer::parse("c", &format!("stop_signal = \"{good}\"")).unwrap();
        }
    }

    #[test]
    fn env_names_and_values_must_fit_an_environment() {
        for (text, at, why) in [
            (
                "env = { \"\" = \"x\" }",
                "c.toml:2:",
                "a variable name is empty",
            ),
            ("env = { \"A=B\" = \"x\" }", "c.toml:2:", "contains '='"),
            (
                "[env]\nOK = \"1\"\n\"A=B\" = \"x\"",
                "c.toml:4:",
                "contains '='",
            ),
            ("env = { A = \"x\\u0000y\" }", "c.toml:2:", "contains a NUL"),
            (
                "env = { \"A\\u0000\" = \"x\" }",
                "c.toml:2:",
                "contains '\\0'",
            ),
        ] {
            let e = err(&format!("\n{text}"));
            assert!(e.starts_with(at) && e.contains(why), "{text}: {e}");
        }
        let l = Layer::parse("c", "[env]\nA = \"1\"\nB = \"\"").unwrap();
        assert_eq!(l.env.unwrap().value.0.len(), 2);
    }

    #[test]
    fn only_a_regular_file_is_read_as_config() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // On the old code this blocked for good: no writer ever opens the FIFO.
        let e = Layer::read(&fifo).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "fifo.toml: cannot read: not a regular file (a FIFO): expected a TOML file"
            ),
            "{e}"
        );
        let e = Layer::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file (a directory)"), "{e}");
        let e = Layer::read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("(a character device)"), "{e}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
        let e = Layer::read(&big).unwrap_err().to_string();
        assert!(e.contains("at most 1048576 bytes"), "{e}");
    }

    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        // The complete example claims every key: the TOML block after its heading.
        let example = doc
            .split("## A complete example")
            .nth(1)
            .and_then(|rest| rest.split("```toml").nth(1))
            .and_then(|block| block.split("```").next())
            .expect("docs/configuration.md has a complete example");
        for key in KEYS {
            assert!(
                doc.contains(&format!("\n### {key}\n")),
                "docs/configuration.md has no section for `{key}`"
            );
            assert!(
                doc.contains(&format!("\n| [`{key}`](#{key}) |")),
                "the settings table of docs/configuration.md has no row for `{key}`"
            );
            assert!(
                example.lines().any(
                    |line| line.starts_with(&format!("{key} = ")) || line == format!("[{key}]")
                ),
                "the complete example of docs/configuration.md does not set `{key}`"
            );
        }
    }

    #[test]
    fn a_command_is_required() {
        let e = Layer::default().resolve().unwrap_err().to_string();
        assert!(e.contains("no worker command"), "{e}");
    }

    fn resolve_err(text: &str) -> String {
        let layer = Layer::parse("c.toml", &format!("command = [\"x\"]\n{text}")).unwrap();
        layer.resolve().unwrap_err().to_string()
    }

    #[test]
    fn checks_of_the_whole_config_name_file_line_column() {
        for (text, expected) in [
            ("pidfile = \"\"", "c.toml:2:11: `pidfile` is empty"),
            ("\nchdir = \"\"", "c.toml:3:9: `chdir` is empty"),
            ("user = \"\"", "c.toml:2:8: `user` is empty"),
            ("on_exit = [\"\", \"x\"]", "c.toml:2:11: `on_exit` is empty"),
            (
                "boot_timeout = \"0s\"",
                "c.toml:2:16: `boot_timeout` must be more than 0s",
            ),
            (
                "timeout = \"0s\"",
                "c.toml:2:11: `timeout` must be more than 0s",
            ),
            (
                "timeout = \"1ms\"",
                "c.toml:2:11: `timeout` must be at least 100ms: workers send WATCHDOG=1 at half of it",
            ),
            (
                "bind = []",
                "c.toml:2:8: `bind` is empty: expected at least one address",
            ),
            (
                "bind = [\"127.0.0.1:9\",\n  \"127.0.0.1:9\"]",
                "c.toml:3:3: `bind`: 127.0.0.1:9 is listed twice (first at c.toml:2:9)",
            ),
            (
                "bind = [\"unix:/tmp/a\", { address = \"unix:/tmp/a\", name = \"b\" }]",
                "c.toml:2:24: `bind`: unix:/tmp/a is listed twice",
            ),
            (
                "bind = [\"fd://3\", \"fd://3\"]",
                "c.toml:2:19: `bind`: fd://3 is listed twice",
            ),
            (
                "bind = [\"127.0.0.1:1\", { address = \"127.0.0.1:2\", name = \"bind0\" }]",
                "c.toml:2:24: `bind`: the name \"bind0\" is used twice (first at c.toml:2:9)",
            ),
            (
                "respawn_delay = \"10s\"\nrespawn_max_delay = \"1s\"",
                "c.toml:3:21: `respawn_max_delay` (1s, set at c.toml:3:21) is less than \
                 `respawn_delay` (10s, set at c.toml:2:17)",
            ),
            (
                "respawn_delay = \"20s\"",
                "c.toml:2:17: `respawn_max_delay` (10s, the default) is less than `respawn_delay`",
            ),
        ] {
            let e = resolve_err(text);
            assert!(e.starts_with(expected), "{text:?}: {e}");
        }
        let e = Layer::parse("c.toml", "command = [\"\"]")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml:1:11: `command`: the program name is empty"),
            "{e}"
        );
        // Several port-0 binds are several sockets; an equal delay and bound is fine.
        let ok = "bind = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\nrespawn_delay = \"1s\"\nrespawn_max_delay = \"1s\"";
        Layer::parse("c", &format!("command = [\"x\"]\n{ok}"))
            .unwrap()
            .resolve()
            .unwrap();
    }

    #[test]
    fn checks_name_the_option_for_values_from_the_command_line() {
        let file = Layer::parse("c.toml", "command = [\"x\"]\nrespawn_delay = \"10s\"").unwrap();
        let e = file
            .overlay(Layer::parse_override("respawn_max_delay=1s").unwrap())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--set respawn_max_delay=1s: `respawn_max_delay` (1s, set at --set respawn_max_delay=1s) is less than `respawn_delay` (10s, set at c.toml:2:17)"),
            "{e}"
        );
        let e = Layer::parse("c.toml", "command = [\"x\"]")
            .unwrap()
            .overlay(Layer::parse_override("pidfile=''").unwrap())
            .resolve()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--set pidfile='': `pidfile` is empty: remove the key or give it a value"
        );
    }
}
