//! The development mode's file watcher (`--reload`): one inotify descriptor
//! that the master polls with its other descriptors, so watching costs no
//! thread and no wake-up while nothing changes.
//!
//! Directories (`reload_paths`) are watched with everything below them,
//! directories created later included; single files (`reload_extra_files`)
//! are watched through their directory, by name, because editors save by
//! writing a new file and renaming it over the old one, which would end a
//! watch on the file itself. A change is reported once the tree has been
//! quiet for [`DEBOUNCE`]: an editor's save, a `git checkout` or a build are
//! many events and should make one reload.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// How long the files must stay unchanged before the change is reported.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// At most this many directories are watched (each takes one of the user's
/// `fs.inotify.max_user_watches`, 8192 by default on older kernels).
const MAX_DIRECTORIES: usize = 4096;

/// At most this many changed paths are kept to be named in the log.
const NAMED: usize = 5;

/// Names that are never the app's source: version control, caches, build
/// output, editors' swap and backup files, and what a running app writes
/// itself: SQLite databases with their journals (Django's startproject puts
/// `db.sqlite3` next to the code: every request that saved a session
/// reloaded) and log files (a log written at boot would reload forever).
fn ignored(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('.')
        || name.ends_with('~')
        || name == "4913" // vim's probe for a writable directory
        || ["__pycache__", "node_modules", "target"].contains(&name.as_ref())
        || [
            ".pyc", ".pyo", ".swp", ".swx", ".tmp", ".sqlite3", ".sqlite", ".db", "-journal",
            "-wal", "-shm", ".log",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("--reload: cannot create an inotify instance: {0}")]
    Init(Errno),
    #[error("--reload: cannot watch {path}: {errno}{hint}")]
    Watch {
        path: String,
        errno: Errno,
        hint: &'static str,
    },
    #[error(
        "--reload: more than {MAX_DIRECTORIES} directories under {0}: give smaller reload_paths"
    )]
    TooMany(String),
}

/// What a watch descriptor stands for.
#[derive(Debug)]
struct Watched {
    dir: PathBuf,
    /// Watch everything below (a `reload_paths` tree), or only these names
    /// (the `reload_extra_files` in this directory).
    recursive: bool,
    names: BTreeSet<std::ffi::OsString>,
}

/// The inotify instance and what each of its watches is for.
pub struct Watcher {
    inotify: Inotify,
    watches: HashMap<WatchDescriptor, Watched>,
    /// The first change since the last report, and the last one.
    pending: Option<(Instant, Instant)>,
    changed: BTreeSet<PathBuf>,
}

/// The events that mean "a file's content may be different now".
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ONLYDIR
}

impl Watcher {
    /// Watches the trees `dirs` and the files `files`.
    pub fn new(dirs: &[PathBuf], files: &[PathBuf]) -> Result<Watcher, WatchError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(WatchError::Init)?;
        let mut watcher = Watcher {
            inotify,
            watches: HashMap::new(),
            pending: None,
            changed: BTreeSet::new(),
        };
        for dir in dirs {
            watcher.watch_tree(dir, dir)?;
        }
        for file in files {
            let dir = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = file.file_name().ok_or_else(|| WatchError::Watch {
                path: file.display().to_string(),
                errno: Errno::EINVAL,
                hint: ": expected a file name",
            })?;
            let wd = watcher.add(&dir, false)?;
            if let Some(w) = watcher.watches.get_mut(&wd) {
                w.names.insert(name.to_os_string());
            }
        }
        Ok(watcher)
    }

    /// Watches `dir` (whose tree was named as `root`) and its directories.
    fn watch_tree(&mut self, dir: &Path, root: &Path) -> Result<(), WatchError> {
        self.add(dir, true)?;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(()); // added just now, so it was there: raced with a removal
        };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && !ignored(&entry.file_name()) {
                if self.watches.len() >= MAX_DIRECTORIES {
                    return Err(WatchError::TooMany(root.display().to_string()));
                }
                self.watch_tree(&entry.path(), root)?;
            }
        }
        Ok(())
    }

    fn add(&mut self, dir: &Path, recursive: bool) -> Result<WatchDescriptor, WatchError> {
        let wd = self.inotify.add_watch(dir, mask()).map_err(|errno| {
            let hint = match errno {
                Errno::ENOSPC => ": too many watches; raise fs.inotify.max_user_watches",
                Errno::ENOTDIR => ": not a directory (reload_paths are directories)",
                _ => "",
            };
            WatchError::Watch {
                path: dir.display().to_string(),
                errno,
                hint,
            }
        })?;
        // The same directory twice (a file's and a tree's): one watch, the
        // wider meaning wins.
        let w = self.watches.entry(wd).or_insert_with(|| Watched {
            dir: dir.to_path_buf(),
            recursive,
            names: BTreeSet::new(),
        });
        w.recursive |= recursive;
        Ok(wd)
    }

    /// The descriptor to poll for reading.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Reads what the kernel has queued (call when the descriptor is
    /// readable); a change that matters starts or extends the quiet period.
    pub fn read(&mut self, now: Instant) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EINTR) => continue,
                Err(_) => return, // EAGAIN: drained
            };
            for event in events {
                self.event(event, now);
            }
        }
    }

    fn event(&mut self, event: nix::sys::inotify::InotifyEvent, now: Instant) {
        if event.mask.contains(AddWatchFlags::IN_IGNORED) {
            self.watches.remove(&event.wd); // the directory is gone
            return;
        }
        let Some(w) = self.watches.get(&event.wd) else {
            return;
        };
        let Some(name) = event.name else {
            return;
        };
        if w.recursive && ignored(&name) || !w.recursive && !w.names.contains(&name) {
            return;
        }
        let path = w.dir.join(&name);
        let is_dir = event.mask.contains(AddWatchFlags::IN_ISDIR);
        if is_dir
            && w.recursive
            && event
                .mask
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        {
            // A new directory: watch it too (its files may already be there,
            // as after `mkdir -p` or a checkout; they count as a change).
            let root = path.clone();
            if self.watch_tree(&path, &root).is_err() {
                tracing::warn!(
                    "--reload: cannot watch the new directory {}",
                    path.display()
                );
            }
        }
        // A file closed after writing, or a name appearing or going away
        // (a save by rename, a new module, a deletion); a new file counts at
        // its close-after-write, so an empty file being created is no change.
        let counts = event.mask.intersects(
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE,
        ) || is_dir;
        if counts {
            self.pending = Some(match self.pending {
                Some((first, _)) => (first, now),
                None => (now, now),
            });
            if self.changed.len() < NAMED {
                self.changed.insert(path);
            }
        }
    }

    /// When the pending change is due to be reported, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|(_, last)| last + DEBOUNCE)
    }

    /// The changed paths (the first few), once the files have been quiet
    /// for [`DEBOUNCE`]; the watcher is then ready for the next change.
    pub fn take_due(&mut self, now: Instant) -> Option<Vec<PathBuf>> {
        let due = self.deadline()?;
        if now < due {
            return None;
        }
        self.pending = None;
        // Name what is there now: an editor's or sed's temporary file came
        // and went; if nothing is left, the change was a deletion.
        let changed = std::mem::take(&mut self.changed);
        let there: Vec<PathBuf> = changed.iter().filter(|p| p.exists()).cloned().collect();
        Some(if there.is_empty() {
            changed.into_iter().collect()
        } else {
            there
        })
    }

    /// How many directories are watched.
    pub fn directories(&self) -> usize {
        self.watches.len()
    }
}

/// The watcher `--reload` asks for, if it does: `reload_paths` (else the
/// workers' working directory) and `reload_extra_files`, logged.
pub fn from_settings(s: &crate::config::Settings) -> Result<Option<Watcher>, WatchError> {
    if !s.reload {
        return Ok(None);
    }
    let dirs = if s.reload_paths.is_empty() {
        vec![s.chdir.clone().unwrap_or_else(|| PathBuf::from("."))]
    } else {
        s.reload_paths.clone()
    };
    let watcher = Watcher::new(&dirs, &s.reload_extra_files)?;
    let shown = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let extra = if s.reload_extra_files.is_empty() {
        String::new()
    } else {
        format!(" and {}", shown(&s.reload_extra_files))
    };
    tracing::info!(
        "--reload: watching {}{extra} ({} directories); a change reloads",
        shown(&dirs),
        watcher.directories()
    );
    if s.ready == crate::config::Ready::Spawn {
        tracing::warn!(
            "--reload with ready = \"spawn\": new workers count as ready once exec'd, so an \
             edit that breaks the app replaces the serving workers anyway; ready = \"notify\" \
             (which drover-wsgi speaks) keeps them until the new ones are ready"
        );
    }
    Ok(Some(watcher))
}

/// The changed paths, for the log: `app.py`, `a.py, b.py and more`.
pub fn describe(changed: &[PathBuf]) -> String {
    let mut names: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
    if names.len() >= NAMED {
        names.push("more".into());
    }
    match names.len() {
        0 => "a file".into(),
        1 => names.remove(0),
        n => format!("{} and {}", names[..n - 1].join(", "), names[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    /// Polls the watcher as the master does, until `limit` has passed or a
    /// change is due; returns it and how many times poll returned.
    fn run(w: &mut Watcher, limit: Duration) -> (Option<Vec<PathBuf>>, usize) {
        let end = Instant::now() + limit;
        let mut wakeups = 0;
        loop {
            let now = Instant::now();
            if let Some(changed) = w.take_due(now) {
                return (Some(changed), wakeups);
            }
            if now >= end {
                return (None, wakeups);
            }
            let until = w.deadline().map_or(end, |d| d.min(end));
            let ms = until.saturating_duration_since(now).as_millis() as u16 + 1;
            let mut fds = [PollFd::new(w.fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(ms)).unwrap();
            wakeups += 1;
            if fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
            {
                w.read(Instant::now());
            }
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn an_edit_is_one_change_after_the_files_are_quiet() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("app.py"), "v = 1\n");
        let mut w = Watcher::new(&[dir.path().to_path_buf()], &[]).unwrap();
        // Nothing changes: the descriptor never wakes the loop.
        let (changed, wakeups) = run(&mut w, Duration::from_millis(200));
        assert_eq!((changed, wakeups), (None, 1));
        // Three writes in a row: one change, named once, after the quiet period.
        let start = Instant::now();
        for v in 2..5 {
            write(&dir.path().join("app.py"), &format!("v = {v}\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
        let (changed, _) = run(&mut w, Duration::from_secs(5));
        assert_eq!(changed, Some(vec![dir.path().join("app.py")]));
        assert!(start.elapsed() >= DEBOUNCE, "{:?}", start.elapsed());
        assert_eq!(w.deadline(), None);
        let (changed, _) = run(&mut w, Duration::from_millis(100));
        assert_eq!(changed, None, "reported once");
    }

    #[test]
    fn a_save_by_rename_and_new_directories_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(&[dir.path().to_path_buf()], &[]).unwrap();
        // An editor's save: write a temporary file, rename it over the file.
        write(&dir.path().join(".app.py.swp"), "x");
        let (changed, _) = run(&mut w, Duration::from_millis(500));
        assert_eq!(changed, None, "editor files are ignored");
        write(&dir.path().join("app.py.new"), "v = 2\n");
        std::fs::rename(dir.path().join("app.py.new"), dir.path().join("app.py")).unwrap();
        let (changed, _) = run(&mut w, Duration::from_secs(5));
        let changed = changed.expect("a change");
        assert!(changed.contains(&dir.path().join("app.py")), "{changed:?}");
        // A package created later is watched too.
        std::fs::create_dir(dir.path().join("pkg")).unwrap();
        let _ = run(&mut w, Duration::from_secs(5));
        write(&dir.path().join("pkg/mod.py"), "v = 3\n");
        let (changed, _) = run(&mut w, Duration::from_secs(5));
        assert_eq!(changed, Some(vec![dir.path().join("pkg/mod.py")]));
        // Caches are not the source.
        std::fs::create_dir(dir.path().join("__pycache__")).unwrap();
        write(&dir.path().join("pkg/mod.cpython-311.pyc"), "x");
        let (changed, _) = run(&mut w, Duration::from_millis(500));
        assert_eq!(changed, None);
    }

    #[test]
    fn what_the_app_writes_is_not_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(&[dir.path().to_path_buf()], &[]).unwrap();
        // A Django request that saves a session, and a log line.
        for name in [
            "db.sqlite3",
            "db.sqlite3-journal",
            "app.db-wal",
            "debug.log",
        ] {
            write(&dir.path().join(name), "x");
        }
        let (changed, _) = run(&mut w, Duration::from_millis(500));
        assert_eq!(changed, None, "data and logs are not the source");
        write(&dir.path().join("views.py"), "v = 1\n");
        let (changed, _) = run(&mut w, Duration::from_secs(5));
        assert_eq!(changed, Some(vec![dir.path().join("views.py")]));
    }

    #[test]
    fn extra_files_are_watched_by_name_across_renames() {
        let dir = tempfile::tempdir().unwrap();
        let settings = dir.path().join("settings.ini");
        write(&settings, "a = 1\n");
        let mut w = Watcher::new(&[], std::slice::from_ref(&settings)).unwrap();
        write(&dir.path().join("other.txt"), "x");
        let (changed, _) = run(&mut w, Duration::from_millis(500));
        assert_eq!(changed, None, "only the named file counts");
        for v in 2..4 {
            // Saved by rename twice: the second save is seen too.
            write(&dir.path().join("settings.ini.tmp"), &format!("a = {v}\n"));
            std::fs::rename(dir.path().join("settings.ini.tmp"), &settings).unwrap();
            let (changed, _) = run(&mut w, Duration::from_secs(5));
            assert_eq!(changed, Some(vec![settings.clone()]), "save {v}");
        }
    }

    #[test]
    fn what_cannot_be_watched_is_named() {
        let e = Watcher::new(&[PathBuf::from("/nonexistent-drover-dir")], &[])
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "--reload: cannot watch /nonexistent-drover-dir: ENOENT: No such file or directory"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = Watcher::new(&[file.path().to_path_buf()], &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.ends_with("ENOTDIR: Not a directory: not a directory (reload_paths are directories)"),
            "{e}"
        );
    }
}
