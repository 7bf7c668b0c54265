//! The pidfile: written atomically, locked for the master's whole life (so a
//! second drover refuses to start, and a stale file whose pid was reused never
//! blocks a start), removed at exit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {path}: another drover (pid {pid}) is running and holds its lock")]
    Running { path: String, pid: String },
    #[error("pidfile {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// A pidfile we wrote and hold locked; removed on drop.
pub struct Pidfile {
    path: PathBuf,
    file: File,
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

impl Pidfile {
    pub fn create(path: &Path) -> Result<Pidfile, PidfileError> {
        let shown = path.display().to_string();
        let io = |source| PidfileError::Io {
            path: shown.clone(),
            source,
        };
        // The lock, not the pid in the file, says whether a drover is alive.
        if let Ok(mut old) = File::open(path) {
            if !try_lock(&old).map_err(io)? {
                let mut pid = String::new();
                let _ = old.read_to_string(&mut pid);
                return Err(PidfileError::Running {
                    path: shown,
                    pid: pid.trim().to_string(),
                });
            }
        }
        // Write a locked temporary file, then rename it into place: readers
        // never see a partial file, and the lock travels with the inode.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        let written = try_lock(&file)
            .and_then(|locked| match locked {
                true => Ok(()),
                // Another drover is creating the same temporary name: cannot
                // happen with our pid in the name, but never write unlocked.
                false => Err(io::Error::other("cannot lock the new pidfile")),
            })
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(Pidfile {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Remove it only if it is still ours (an upgrade may have replaced it).
        let ours = match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
