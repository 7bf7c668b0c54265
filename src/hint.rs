//! What an operator can do when drover cannot create one of its files (the
//! pidfile, the log file, the control and admin sockets, a `unix:` bind): the
//! errno alone ("No such file or directory") does not say whether the file
//! or its directory is missing, nor what to change.

use std::io;
use std::path::Path;

/// `e` from creating `path`, with what to do about it after the error's
/// own words ("; ..."). Keeps the error's kind.
pub fn at_path(path: &Path, e: io::Error) -> io::Error {
    let hint = for_path(path, &e);
    if hint.is_empty() {
        return e;
    }
    io::Error::new(e.kind(), format!("{e}; {hint}"))
}

/// What to do about `e` from creating `path`, or "" when drover has no
/// advice for that error.
pub fn for_path(path: &Path, e: &io::Error) -> String {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) if dir.exists() && !dir.is_dir() => format!(
            "{} is not a directory: choose a path in a directory",
            dir.display()
        ),
        Some(libc::ENOENT | libc::ENOTDIR) if !dir.is_dir() => format!(
            "the directory {} does not exist: create it (systemd: RuntimeDirectory=), \
             or choose a path in one that does",
            dir.display()
        ),
        Some(libc::EACCES | libc::EPERM) => format!(
            "drover (uid {}) may not create or write files in {}: choose a directory \
             it can write, or give its user that right",
            nix::unistd::geteuid(),
            dir.display()
        ),
        Some(libc::EROFS) => format!(
            "{} is on a read-only file system: choose a path on a writable one \
             (systemd's ProtectSystem=strict leaves RuntimeDirectory=, LogsDirectory= \
             and ReadWritePaths= writable)",
            dir.display()
        ),
        Some(libc::ENOSPC | libc::EDQUOT) => {
            format!("the file system of {} is full", dir.display())
        }
        Some(libc::EMFILE) => crate::spawn::limit_hint(nix::errno::Errno::EMFILE)
            .trim_start_matches("; ")
            .to_string(),
        _ => String::new(),
    }
}
