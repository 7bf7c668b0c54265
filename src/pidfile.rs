//! The pidfile: locked for the master's whole life (so a second drover
//! refuses to start, and a stale file whose pid was reused never blocks a
//! start), removed at exit.
//!
//! The lock lives on the pidfile's own inode, which never changes while a
//! drover holds it: open (or create) the path, lock it, then check that the
//! path still names the inode we locked (a drover that was exiting may have
//! removed it meanwhile) and retry if not. Locking a separate temporary file
//! and renaming it into place would leave a window in which two drovers each
//! hold a lock on a different inode, and both run.
//!
//! The pid is written in place (truncate, one `write`): a reader sees an
//! empty file or the whole line, never a part of it, since the line is a few
//! bytes written by one call. An empty file means "starting": read again.
//!
//! No `fsync`: readers read the page cache, and after a crash the pid is
//! stale whatever the disk holds (the lock is what counts). A failed upgrade
//! takes the pidfile back on the master's loop, and an `fsync` there waits
//! for the disk: seconds, on a busy one, with the loop stopped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {path}: another drover (pid {pid}) is running and holds its lock")]
    Running { path: String, pid: String },
    #[error("pidfile {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// A pidfile we wrote and hold locked; removed on drop unless released.
pub struct Pidfile {
    path: PathBuf,
    file: File,
    /// Removed on drop: false once released to a new master.
    remove: bool,
}

fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        e => Err(e),
    }
}

/// Whether `path` still names the inode open as `file`.
fn same_inode(path: &Path, file: &File) -> io::Result<bool> {
    let opened = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == opened.dev() && now.ino() == opened.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl Pidfile {
    /// Takes the pidfile at `path` and writes our pid into it. A file left by
    /// a drover that died (its lock went with it) is taken over; one whose
    /// lock is held means another drover runs: an error.
    pub fn create(path: &Path) -> Result<Pidfile, PidfileError> {
        let shown = path.display().to_string();
        let io = |source| PidfileError::Io {
            path: shown.clone(),
            source,
        };
        // Each retry means another drover removed or replaced the file
        // between our open and our lock: a handful is plenty.
        for _ in 0..10 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| io(crate::hint::at_path(path, e)))?;
            if !try_lock(&file).map_err(io)? {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = match pid.trim() {
                    "" => "unknown: still starting".to_string(),
                    pid => pid.to_string(),
                };
                return Err(PidfileError::Running { path: shown, pid });
            }
            if !same_inode(path, &file).map_err(io)? {
                continue;
            }
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
                .map_err(io)?;
            return Ok(Pidfile {
                path: path.to_path_buf(),
                file,
                remove: true,
            });
        }
        Err(io(io::Error::other(
            "it keeps being removed or replaced while drover takes it; is something else managing this path?",
        )))
    }

    /// Lets a new master take the pidfile: unlocks it and leaves the file
    /// in place (with our pid until the new master writes its own).
    pub fn release(mut self) {
        self.remove = false;
    }

    /// Makes the pidfile belong to `uid`:`gid`, so that a master that gives
    /// up root can still remove it, and a new master of an upgrade, running
    /// as that user, can write it.
    pub fn chown(&self, uid: Option<u32>, gid: u32) -> io::Result<()> {
        std::os::unix::fs::fchown(&self.file, uid, Some(gid))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Unlink while still locked, and only our own inode (an operator may
        // have replaced the file): whoever opened it meanwhile finds, once
        // our lock is gone, that the path no longer names it, and retries.
        if self.remove && same_inode(&self.path, &self.file).unwrap_or(false) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_pidfile_refuses_a_second_taker_and_a_released_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.pid");
        let first = Pidfile::create(&path).unwrap();
        let me = std::process::id().to_string();
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), me);
        match Pidfile::create(&path) {
            Err(PidfileError::Running { pid, .. }) => assert_eq!(pid, me),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        first.release();
        assert!(
            path.exists(),
            "a released pidfile stays for the next master"
        );
        let second = Pidfile::create(&path).unwrap();
        drop(second);
        assert!(!path.exists(), "removed at exit");
    }

    #[test]
    fn a_replaced_file_is_not_removed_by_the_old_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.pid");
        let held = Pidfile::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's\n").unwrap();
        drop(held);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's\n");
    }
}
