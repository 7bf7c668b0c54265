//! The scoreboard: this worker's request counts in the shared-memory file
//! drover created (`DROVER_SCOREBOARD`, record `DROVER_SCOREBOARD_INDEX`),
//! which drover reads when its `/metrics` is scraped. Each request costs a
//! few atomic additions and no system call. Layout: docs/protocol.md.
//!
//! ```no_run
//! let board = drover_worker::Scoreboard::from_env();
//! // for each request:
//! let _request = board.as_ref().map(|b| b.begin());
//! // ... serve it; dropping the guard counts it, with its latency ...
//! ```

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const MAGIC: &[u8; 8] = b"DROVERSB";
const HEADER: usize = 64;
const RECORD: usize = 256;
const PID: usize = 0;
const BUSY: usize = 1;
const REQUESTS: usize = 2;
const LATENCY_SUM_US: usize = 3;
const BUCKETS: usize = 4;
/// Bucket upper bounds in microseconds (the protocol's, in seconds:
/// 0.001 … 10); a last bucket holds the rest.
const BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// This worker's record, mapped.
pub struct Scoreboard {
    record: *const AtomicU64,
    map: *mut libc::c_void,
    len: usize,
}

// SAFETY: the record is only touched through atomics; the mapping lives as
// long as the value.
unsafe impl Send for Scoreboard {}
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// The record drover gave this worker, if any (and the file is one this
    /// SDK understands). Marks the record as filled with this pid.
    pub fn from_env() -> Option<Scoreboard> {
        let path = std::env::var_os("DROVER_SCOREBOARD")?;
        let index: usize = std::env::var("DROVER_SCOREBOARD_INDEX")
            .ok()?
            .parse()
            .ok()?;
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let len = file.metadata().ok()?.len() as usize;
        if len < HEADER + (index + 1) * RECORD {
            return None;
        }
        // SAFETY: maps the file shared; unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: the mapping is at least HEADER bytes.
        let header = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), HEADER) };
        let version = u32::from_le_bytes(header[8..12].try_into().ok()?);
        let record_size = u32::from_le_bytes(header[12..16].try_into().ok()?);
        if &header[..8] != MAGIC || version != 1 || record_size as usize != RECORD {
            // SAFETY: unmaps what was just mapped.
            unsafe { libc::munmap(map, len) };
            return None;
        }
        // SAFETY: in bounds (checked above) and 8-aligned.
        let record = unsafe { map.cast::<u8>().add(HEADER + index * RECORD) }.cast::<AtomicU64>();
        let board = Scoreboard { record, map, len };
        board
            .word(PID)
            .store(u64::from(std::process::id()), Ordering::Relaxed);
        Some(board)
    }

    fn word(&self, n: usize) -> &AtomicU64 {
        // SAFETY: n < RECORD / 8, within this worker's record.
        unsafe { &*self.record.add(n) }
    }

    /// A request starts: counted as in progress until the guard is dropped,
    /// then as completed with its latency.
    pub fn begin(&self) -> Request<'_> {
        self.word(BUSY).fetch_add(1, Ordering::Relaxed);
        Request {
            board: self,
            start: Instant::now(),
        }
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmaps what from_env mapped.
        unsafe { libc::munmap(self.map, self.len) };
    }
}

/// A request in progress (see [`Scoreboard::begin`]).
pub struct Request<'a> {
    board: &'a Scoreboard,
    start: Instant,
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        let us = self.start.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BOUNDS_US.len());
        let b = self.board;
        b.word(BUCKETS + bucket).fetch_add(1, Ordering::Relaxed);
        b.word(LATENCY_SUM_US).fetch_add(us, Ordering::Relaxed);
        b.word(REQUESTS).fetch_add(1, Ordering::Relaxed);
        b.word(BUSY).fetch_sub(1, Ordering::Relaxed);
    }
}
