//! The settings' value types: each checks its value as it is deserialized,
//! with a message that says what is expected (`Dur`, `Size`, `Sig`, `Mode`,
//! `LogLevel`, `Ready`, `BootPriority`, the bounded counts, `Share`,
//! `EventHooks`, `EnvVars`, `Bind`, `Address`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// A setting whose value is parsed from a string, with a message that says
/// what is expected.
macro_rules! from_str_setting {
    ($ty:ty, $expecting:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// A duration written like `"30s"`, `"500ms"` or `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match humantime::parse_duration(s) {
            Ok(d) if d <= Duration::from_secs(366 * 24 * 3600) => Ok(Dur(d)),
            Ok(_) => Err(format!("duration {s:?} is too long: at most 366 days")),
            Err(e) => Err(format!(
                "invalid duration {s:?} ({e}): expected a duration like \"30s\", \"500ms\" or \"1m 30s\""
            )),
        }
    }
}
from_str_setting!(Dur, "a duration like \"30s\" or \"500ms\"");

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A signal name such as `"SIGTERM"` or `"TERM"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub Signal);

impl FromStr for Sig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        let signal = Signal::from_str(&full).map_err(|_| {
            format!("unknown signal {s:?}: expected a name like \"SIGTERM\" or \"INT\"")
        })?;
        if !stops_gracefully(signal) {
            return Err(format!(
                "{} cannot be a stop signal: {}; expected one whose default action \
                 ends the process and that it can catch, like \"SIGTERM\" or \"SIGINT\"",
                signal.as_str(),
                match signal {
                    Signal::SIGKILL => "it cannot be caught, so no worker could stop gracefully",
                    Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU =>
                        "by default it suspends the process instead of ending it",
                    _ => "by default it is ignored",
                }
            ));
        }
        Ok(Sig(signal))
    }
}

/// Whether a worker that does not handle `signal` is ended by it, and one
/// that does can: a stop signal that suspends or is ignored by default
/// would leave the worker running until its deadline, and SIGKILL leaves
/// no graceful stop at all.
fn stops_gracefully(signal: Signal) -> bool {
    !matches!(
        signal,
        Signal::SIGKILL
            | Signal::SIGSTOP
            | Signal::SIGTSTP
            | Signal::SIGTTIN
            | Signal::SIGTTOU
            | Signal::SIGCHLD
            | Signal::SIGCONT
            | Signal::SIGURG
            | Signal::SIGWINCH
    )
}
from_str_setting!(Sig, "a signal name like \"SIGTERM\"");

/// The `env` table: names a process environment can hold (not empty, no
/// `=`, no NUL) and values without NUL, which `execve` would cut short.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVars(pub BTreeMap<String, String>);

impl<'a> IntoIterator for &'a EnvVars {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A checked `env` name (its error carries the name's position).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct EnvName(String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name.is_empty() {
            return Err(de::Error::custom(
                "`env`: a variable name is empty: expected a name like \"APP_MODE\"",
            ));
        }
        if let Some(c) = name.chars().find(|c| *c == '=' || *c == '\0') {
            return Err(de::Error::custom(format!(
                "`env`: the variable name {name:?} contains {c:?}, which no environment \
                 variable name can hold"
            )));
        }
        Ok(EnvName(name))
    }
}

/// A checked `env` value.
struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        if value.contains('\0') {
            return Err(de::Error::custom(format!(
                "`env`: the value {value:?} contains a NUL character, which would cut it short"
            )));
        }
        Ok(EnvValue(value))
    }
}

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<EnvName, EnvValue>::deserialize(d)?;
        Ok(EnvVars(map.into_iter().map(|(k, v)| (k.0, v.0)).collect()))
    }
}

/// Unix permission bits written in octal, like `"0660"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 => Ok(Mode(m)),
            _ => Err(format!(
                "invalid mode {s:?}: expected octal permission bits like \"0660\""
            )),
        }
    }
}
impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("octal permission bits like \"0660\" or 0o660")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mode, E> {
                s.parse().map_err(E::custom)
            }
            // A TOML octal literal (0o660) arrives as its value.
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Mode, E> {
                match u32::try_from(n) {
                    Ok(m) if m <= 0o777 => Ok(Mode(m)),
                    _ => Err(E::custom(format!(
                        "invalid mode {n}: expected octal permission bits like 0o660 or \"0660\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes, written like `"512MiB"`, `"1GiB"`, `"300MB"` or `"4096"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1000 * 1000,
            "MiB" => 1 << 20,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1 << 30,
            _ => u64::MAX,
        };
        match digits.parse::<u64>() {
            Ok(n) if factor != u64::MAX && n > 0 => Ok(Size(n.saturating_mul(factor))),
            _ => Err(format!(
                "invalid size {s:?}: expected a number with an optional unit, like \"512MiB\", \"1GiB\" or \"300MB\""
            )),
        }
    }
}
from_str_setting!(Size, "a size like \"512MiB\"");

impl fmt::Display for Size {
    /// In the largest binary unit that divides it exactly.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let unit = [("GiB", 30), ("MiB", 20), ("KiB", 10)]
            .into_iter()
            .find(|(_, shift)| self.0.is_multiple_of(1 << shift));
        match unit {
            Some((name, shift)) => write!(f, "{}{name}", self.0 >> shift),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A log level name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLevel(pub tracing::Level);

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        tracing::Level::from_str(s).map(LogLevel).map_err(|_| {
            format!("unknown log level {s:?}: expected error, warn, info, debug or trace")
        })
    }
}
from_str_setting!(LogLevel, "a log level: error, warn, info, debug or trace");

/// How the master decides that a worker is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    /// Ready once it has been exec'd (for programs that do not speak the protocol).
    Spawn,
    /// Ready once it sends `READY=1` to `NOTIFY_SOCKET`.
    Notify,
    /// As `Notify` for a worker that sends anything to `NOTIFY_SOCKET`
    /// within `announce_timeout` of its exec (`X_DROVER_WILL_NOTIFY=1`
    /// before a slow boot), as `Spawn` (from then) for one that says nothing.
    Auto,
}

impl Ready {
    /// The value as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Ready::Spawn => "spawn",
            Ready::Notify => "notify",
            Ready::Auto => "auto",
        }
    }
}

/// `boot_priority`: how a worker boots while others serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPriority {
    /// At drover's own priority, as when it serves.
    Normal,
    /// At drover's nice value plus this (1 to 19; at most 19 in all).
    Nice(u32),
    /// `SCHED_IDLE`: only the CPU no other process wants.
    Idle,
}

impl<'de> Deserialize<'de> for BootPriority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "\"normal\", \"idle\", or a nice increment from 0 to 19";
        impl Visitor<'_> for V {
            type Value = BootPriority;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<BootPriority, E> {
                match n {
                    0 => Ok(BootPriority::Normal),
                    1..=19 => Ok(BootPriority::Nice(n as u32)),
                    _ => Err(E::custom(format!(
                        "{n} is out of range: expected {EXPECTED}"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<BootPriority, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<BootPriority, E> {
                match s {
                    "normal" => Ok(BootPriority::Normal),
                    "idle" => Ok(BootPriority::Idle),
                    _ => Err(E::custom(format!(
                        "invalid boot_priority {s:?}: expected {EXPECTED}"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A bounded whole number, for counts that must stay in a sane range.
macro_rules! bounded_setting {
    ($ty:ident, $min:expr, $max:expr, $what:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $ty(pub u32);

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        write!(f, "{} from {} to {}", $what, $min, $max)
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$ty, E> {
                        if ($min..=$max).contains(&n) {
                            Ok($ty(n as u32))
                        } else {
                            Err(E::custom(format!(
                                "{n} is out of range: expected {} from {} to {}",
                                $what, $min, $max
                            )))
                        }
                    }
                    fn visit_u64<E: de::Error>(self, n: u64) -> Result<$ty, E> {
                        self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
                    }
                }
                d.deserialize_i64(V)
            }
        }
    };
}

/// Where the admin endpoint listens (`admin_bind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminBind(pub crate::admin::AdminAddr);

impl FromStr for AdminBind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::admin::parse_addr(s).map(AdminBind)
    }
}

from_str_setting!(
    AdminBind,
    "an address like \"127.0.0.1:9100\", \"[::1]:9100\" or \"unix:/run/drover-admin.sock\""
);

/// A share of the slots, in (0, 1] (`ready_share`): `"all"`, a number like
/// `0.5`, or a percentage like `"50%"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share(pub f64);

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Share;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"all\", a share like 0.5, or a percentage like \"50%\"")
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Share, E> {
                if x > 0.0 && x <= 1.0 {
                    Ok(Share(x))
                } else {
                    Err(E::custom(format!(
                        "{x} is out of range: expected a share above 0 and at most 1"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Share, E> {
                self.visit_f64(n as f64)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Share, E> {
                self.visit_f64(n as f64)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Share, E> {
                if s == "all" {
                    return Ok(Share(1.0));
                }
                match s.strip_suffix('%').map(|p| p.trim().parse::<f64>()) {
                    Some(Ok(p)) => self.visit_f64(p / 100.0),
                    _ => Err(E::custom(format!(
                        "invalid share {s:?}: expected \"all\", a number like 0.5, or \"50%\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `event_hooks`: event name → the argv to run for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventHooks(pub BTreeMap<String, Vec<String>>);

impl<'de> Deserialize<'de> for EventHooks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Vec<String>>::deserialize(d)?;
        for (name, argv) in &map {
            if !crate::events::NAMES.contains(&name.as_str()) {
                return Err(de::Error::custom(format!(
                    "unknown event {name:?}: expected one of {}",
                    crate::events::NAMES.join(", ")
                )));
            }
            if argv.is_empty() {
                return Err(de::Error::custom(format!(
                    "the hook for {name} is empty: expected an argv like [\"/usr/local/bin/notify\", \"--quiet\"]"
                )));
            }
        }
        Ok(EventHooks(map))
    }
}

/// The most workers drover runs: `workers`, and what scaling may reach.
pub const MAX_WORKERS: u32 = 4096;

bounded_setting!(WorkerCount, 1, MAX_WORKERS as i64, "a number of workers");
bounded_setting!(Count, 1, 1_000_000, "a count");
bounded_setting!(Backlog, 1, 65535, "a listen backlog");

/// One listening address, with the name the workers see in `LISTEN_FDNAMES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub address: Address,
    pub name: Option<String>,
}

/// Where a listener comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// A socket already open in drover, handed in by its parent.
    Fd(RawFd),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

/// The longest path a Unix socket can be bound at (`sun_path`, less its
/// terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why `path` cannot name a Unix socket, if it is too long: the kernel's
/// own word for it (`path must be shorter than SUN_LEN`, at bind time)
/// says neither the limit nor by how much.
pub fn socket_path_too_long(path: &std::path::Path) -> Option<String> {
    let len = path.as_os_str().len();
    (len > MAX_SOCKET_PATH).then(|| {
        format!(
            "{}: the path is {len} bytes, and a Unix socket's path holds at most \
             {MAX_SOCKET_PATH}: use a shorter one (a relative path counts as written)",
            path.display()
        )
    })
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, like \"unix:/run/app.sock\"".into());
            }
            let path = PathBuf::from(path);
            if let Some(e) = socket_path_too_long(&path) {
                return Err(e);
            }
            return Ok(Address::Unix(path));
        }
        if let Some(n) = s.strip_prefix("fd://") {
            return match n.parse::<RawFd>() {
                Ok(fd) if fd >= 3 => Ok(Address::Fd(fd)),
                _ => Err(format!(
                    "invalid {s:?}: expected fd://N with N a descriptor number >= 3"
                )),
            };
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Address::Tcp(addr));
        }
        // A host name: resolve it once, now (only names like "localhost" make
        // sense for a server that binds).
        match s.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(Address::Tcp)
                .ok_or_else(|| format!("{s:?} resolves to no address")),
            Err(_) => Err(format!(
                "invalid address {s:?}: expected HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N"
            )),
        }
    }
}

impl Bind {
    pub fn parse(s: &str) -> Result<Bind, String> {
        Ok(Bind {
            address: s.parse()?,
            name: None,
        })
    }

    /// The name workers see in `LISTEN_FDNAMES` for entry `i` of `bind`.
    pub fn fd_name(&self, i: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("bind{i}"))
    }
}

impl<'de> Deserialize<'de> for Bind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bind;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address string or a table { address = \"...\", name = \"...\" }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Bind, E> {
                Bind::parse(s).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bind, A::Error> {
                let (mut address, mut name) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "address" => {
                            let s: String = map.next_value()?;
                            address = Some(s.parse::<Address>().map_err(de::Error::custom)?);
                        }
                        "name" => {
                            let s: String = map.next_value()?;
                            if s.is_empty() || s.len() > 255 || s.contains(':') {
                                return Err(de::Error::custom(format!(
                                    "invalid name {s:?}: expected 1 to 255 characters without ':'"
                                )));
                            }
                            name = Some(s);
                        }
                        other => return Err(de::Error::unknown_field(other, &["address", "name"])),
                    }
                }
                let address = address.ok_or_else(|| de::Error::missing_field("address"))?;
                Ok(Bind { address, name })
            }
        }
        d.deserialize_any(V)
    }
}
