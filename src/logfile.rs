//! drover's own log file (the `log_file` setting), reopened on SIGUSR1 so that
//! logrotate can move it away.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The log file, shared by the tracing writer and the master (which reopens it).
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(open(path)?)),
        })
    }

    /// Opens the path again: after a rotation, a new file at the same name.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// One log line's writer.
pub struct Line(Arc<Mutex<File>>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(self.file.clone())
    }
}
