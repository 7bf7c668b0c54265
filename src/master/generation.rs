//! A generation: one version of the settings with everything prepared from
//! them for spawning (program, environment, listeners). A reload builds the
//! next generation next to the current one; the workers say which one they
//! belong to.

use std::cell::RefCell;

use crate::config::{Loaded, Place, Settings};
use crate::listen::{self, Inherited, Set};
use crate::spawn::{Env, Identity, Program, SpawnError};

use super::priority::Boot;
use super::StartError;

/// Shared (`Rc`) by the master and every worker started from it, so that
/// each worker follows its own generation's settings to the end.
pub struct Generation {
    pub number: u32,
    pub s: Settings,
    pub program: Program,
    pub env: Env,
    /// Emptied when the sockets are closed (see `take_listeners`); the
    /// workers keep their own copies.
    pub listeners: RefCell<Set>,
    /// The command is one of drover's own launchers, which always send
    /// `READY=1`: `ready = "auto"` holds its workers to it from the exec.
    pub notifies: bool,
    /// `boot_priority`: a booting worker's and a ready one's, once drover
    /// has checked that it can restore the second (`priority::check`, after
    /// the build: at start, after the master took its user); None when off.
    pub boot: Option<Boot>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "generation {}", self.number)
    }
}

impl Generation {
    /// `boot_priority = "idle"`: its workers may also run their exit (what
    /// follows their cleanup: the runtime's teardown, freeing the heap) at
    /// `SCHED_IDLE`, told so by `DROVER_EXIT_PRIORITY`; drover gives the
    /// normal priority back at half the stop timeout, as it can (checked).
    pub fn exits_idle(&self) -> bool {
        self.boot.is_some_and(|b| b.low == crate::spawn::Low::Idle)
    }

    /// Prepares generation `number` from `loaded`, reusing the sockets of
    /// `current` (and those `inherited`) where the addresses match. Nothing
    /// is started; on error nothing was changed.
    pub fn build(
        number: u32,
        loaded: Loaded,
        inherited: Vec<Inherited>,
        current: &Set,
        master_switched: bool,
    ) -> Result<Generation, StartError> {
        let s = loaded.settings;
        let (env, program) = prepare(&s, master_switched)?;
        let listeners = listen::open_all(&s, loaded.bind_was_set, inherited, current)?;
        let notifies = is_drover_launcher(&s.command);
        Ok(Generation {
            number,
            notifies,
            s,
            program,
            env,
            listeners: RefCell::new(listeners),
            boot: None,
        })
    }

    /// The listeners, handed over to be closed (or released).
    pub fn take_listeners(&self) -> Set {
        std::mem::take(&mut *self.listeners.borrow_mut())
    }

    /// The workers' user and group as configured (to compare generations).
    pub fn user_and_group(&self) -> (Option<&str>, Option<&str>) {
        (self.s.user.as_deref(), self.s.group.as_deref())
    }

    /// The workers' user and group, if they differ from drover's.
    pub fn owner(&self) -> Option<(u32, u32)> {
        let id = self.program.identity.as_ref()?;
        Some((
            id.uid.unwrap_or_else(|| nix::unistd::getuid().as_raw()),
            id.gid,
        ))
    }
}

/// Whether `command` runs one of drover's Python launchers (`drover-wsgi`,
/// `drover-uvicorn`, `drover-granian`, `drover-hypercorn`, `drover-aiohttp`,
/// or `python -m
/// drover_wsgi` and the like). They announce themselves on NOTIFY_SOCKET
/// too, but only once the interpreter has started, which took over
/// `announce_timeout` on a saturated machine: knowing them by name does not
/// depend on the load.
fn is_drover_launcher(command: &[String]) -> bool {
    const LAUNCHERS: [&str; 5] = [
        "drover-wsgi",
        "drover-uvicorn",
        "drover-granian",
        "drover-hypercorn",
        "drover-aiohttp",
    ];
    const MODULES: [&str; 5] = [
        "drover_wsgi",
        "drover_worker.uvicorn",
        "drover_worker.granian",
        "drover_worker.hypercorn",
        "drover_worker.aiohttp",
    ];
    let Some(program) = command.first() else {
        return false;
    };
    let name = std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    LAUNCHERS.contains(&name)
        || command
            .windows(2)
            .any(|w| w[0] == "-m" && MODULES.contains(&w[1].as_str()))
}

/// The workers' environment and program, as every generation (and `drover
/// check`) prepares them from `s`: the user and group resolved, the program
/// looked up in the workers' `PATH`.
pub fn prepare(s: &Settings, master_switched: bool) -> Result<(Env, Program), StartError> {
    let mut env = Env::inherit(&s.env_remove);
    for (k, v) in &s.env {
        env.set(k, v);
    }
    let at = |key: &str| s.places.of(key).cloned();
    let identity = Identity::resolve(s.user.as_deref(), s.group.as_deref())
        .map_err(|source| {
            let key = match &source {
                SpawnError::Unknown { key, .. } => key,
                _ => "user",
            };
            StartError::Identity {
                at: at(key),
                source,
            }
        })?
        // Resolved all the same (an unknown user is an error), but a master
        // that already runs as that user has nothing to switch.
        .filter(|_| !master_switched);
    // Checked here, not only by the worker's chdir: a reload to a missing
    // directory is refused, not rolled back after a failed spawn.
    if let Some(dir) = s.chdir.as_ref().filter(|d| !d.is_dir()) {
        return Err(StartError::Program {
            at: at("chdir"),
            source: SpawnError::NoDirectory(dir.clone()),
        });
    }
    let program = Program::new(&s.command, env.get("PATH"))
        .and_then(|p| p.with(identity, s.chdir.as_deref(), s.umask.map(|m| m.0)))
        .map_err(|e| StartError::Program {
            // After `--`, the flag would only repeat the command.
            at: at("command").filter(|at| !matches!(at, Place::Flag(_))),
            source: e.looked_up_from(s.chdir.as_deref()),
        })?;
    Ok((env, program))
}

/// A generation from TOML text, with no sockets, for the decision tests.
#[cfg(test)]
pub fn for_test(number: u32, toml: &str) -> Generation {
    let s = crate::config::Layer::parse("test.toml", toml)
        .and_then(|l| l.resolve())
        .expect("a valid test config");
    let (env, program) = prepare(&s, false).expect("a program");
    // Taken as checked: the decision tests start no process.
    let boot = match s.boot_priority {
        crate::config::BootPriority::Normal => None,
        crate::config::BootPriority::Nice(n) => Some(crate::spawn::Low::Nice(n as i32)),
        crate::config::BootPriority::Idle => Some(crate::spawn::Low::Idle),
    }
    .map(|low| Boot { low, normal: 0 });
    Generation {
        number,
        notifies: is_drover_launcher(&s.command),
        s,
        program,
        env,
        listeners: RefCell::new(Vec::new()),
        boot,
    }
}

#[cfg(test)]
mod tests {
    use super::is_drover_launcher;

    fn cmd(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn drovers_launchers_are_known_by_name() {
        assert!(is_drover_launcher(&cmd(&[
            ".venv/bin/drover-wsgi",
            "app:app"
        ])));
        assert!(is_drover_launcher(&cmd(&["drover-uvicorn", "main:app"])));
        assert!(is_drover_launcher(&cmd(&["drover-hypercorn", "main:app"])));
        assert!(is_drover_launcher(&cmd(&["drover-aiohttp", "main:app"])));
        assert!(is_drover_launcher(&cmd(&[
            "python3",
            "-m",
            "drover_worker.aiohttp",
            "main:app"
        ])));
        assert!(is_drover_launcher(&cmd(&[
            "python3",
            "-m",
            "drover_wsgi",
            "app:app"
        ])));
        assert!(!is_drover_launcher(&cmd(&[
            "uvicorn", "--fd", "3", "main:app"
        ])));
        assert!(!is_drover_launcher(&cmd(&[
            "python3",
            "app.py",
            "-m",
            "drover_wsgi_x"
        ])));
        assert!(!is_drover_launcher(&cmd(&[])));
    }
}
