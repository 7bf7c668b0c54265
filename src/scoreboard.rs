//! The scoreboard: a shared-memory file in which each worker counts its own
//! requests (in progress, completed, latency histogram) with atomic writes,
//! and which the master reads only when scraped. A request costs the worker
//! a few atomic additions and the master nothing.
//!
//! drover creates the file (sparse: a record's page exists once written)
//! and gives each worker a record: `DROVER_SCOREBOARD` (the path) and
//! `DROVER_SCOREBOARD_INDEX`. The layout is in docs/protocol.md; the
//! constants below are that contract. A worker whose SDK does not fill its
//! record is absent from the request series.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{Histogram, SlotRequests};

pub const MAGIC: &[u8; 8] = b"DROVERSB";
pub const VERSION: u32 = 1;
/// Header bytes before record 0.
pub const HEADER: usize = 64;
/// Bytes per record: 32 little-endian u64 words.
pub const RECORD: usize = 256;
/// Latency bucket upper bounds, in seconds; a last bucket holds the rest.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Word indexes in a record.
pub const PID: usize = 0;
pub const BUSY: usize = 1;
pub const REQUESTS: usize = 2;
pub const LATENCY_SUM_US: usize = 3;
pub const BUCKETS: usize = 4;
/// Records in the file: every slot twice over, for the workers that
/// overlap during a replacement.
pub const CAPACITY: u32 = 2 * crate::config::MAX_WORKERS;

/// What one record holds at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The worker wrote its pid: it fills this record.
    pub pid: u64,
    pub busy: u64,
    pub requests: u64,
    pub latency: Histogram,
}

/// The master's side of the file.
pub struct Scoreboard {
    path: PathBuf,
    _file: File,
    base: *mut u8,
    len: usize,
    /// Record index → the slot of the worker holding it.
    owner: Vec<Option<u32>>,
    free: Vec<u32>,
    /// Per slot (index slot - 1): what its past workers served.
    retired: Vec<Option<(u64, Histogram)>>,
}

impl Scoreboard {
    /// Creates `dir/scoreboard` (mode 0600; with `owner`, the workers' user
    /// owns it so that workers can write their records).
    pub fn create(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<Scoreboard> {
        let path = dir.join("scoreboard");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let len = HEADER + RECORD * CAPACITY as usize;
        file.set_len(len as u64)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        // SAFETY: maps the whole file, shared; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        // SAFETY: the mapping is `len` >= HEADER bytes long.
        let header = unsafe { std::slice::from_raw_parts_mut(base, HEADER) };
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(RECORD as u32).to_le_bytes());
        header[16..20].copy_from_slice(&CAPACITY.to_le_bytes());
        header[20..24].copy_from_slice(&(LATENCY_BOUNDS.len() as u32 + 1).to_le_bytes());
        Ok(Scoreboard {
            path,
            _file: file,
            base,
            len,
            owner: vec![None; CAPACITY as usize],
            free: (0..CAPACITY).rev().collect(),
            retired: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn word(&self, index: u32, word: usize) -> &AtomicU64 {
        let offset = HEADER + index as usize * RECORD + word * 8;
        debug_assert!(offset + 8 <= self.len);
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned,
        // HEADER and RECORD are multiples of 8); AtomicU64 has u64's layout.
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    /// A zeroed record for a worker of `slot` about to be spawned; `None`
    /// when all are taken (the worker then runs without one).
    pub fn claim(&mut self, slot: u32) -> Option<u32> {
        let i = self.free.pop()?;
        for w in 0..RECORD / 8 {
            self.word(i, w).store(0, Ordering::Relaxed);
        }
        self.owner[i as usize] = Some(slot);
        Some(i)
    }

    /// The worker holding record `i` is gone: what it served is added to its
    /// slot's totals and the record is free again.
    pub fn release(&mut self, i: u32) {
        let Some(slot) = self.owner.get_mut(i as usize).and_then(Option::take) else {
            return;
        };
        let r = self.read(i);
        if r.pid != 0 {
            let s = slot as usize - 1;
            if self.retired.len() <= s {
                self.retired.resize(s + 1, None);
            }
            let (requests, latency) =
                self.retired[s].get_or_insert_with(|| (0, Histogram::new(LATENCY_BOUNDS)));
            *requests += r.requests;
            latency.add(&r.latency);
        }
        self.free.push(i);
    }

    /// Record `i` now.
    pub fn read(&self, i: u32) -> Record {
        let w = |n| self.word(i, n).load(Ordering::Relaxed);
        let mut latency = Histogram::new(LATENCY_BOUNDS);
        for (b, c) in latency.counts.iter_mut().enumerate() {
            *c = w(BUCKETS + b);
        }
        latency.sum = w(LATENCY_SUM_US) as f64 / 1e6;
        Record {
            pid: w(PID),
            busy: w(BUSY),
            requests: w(REQUESTS),
            latency,
        }
    }

    /// Per slot: requests in progress, completed (past workers included) and
    /// latency; only slots whose workers fill their records. Reads only the
    /// records in use.
    pub fn slots(&self) -> Vec<SlotRequests> {
        let mut out: Vec<SlotRequests> = Vec::new();
        let entry = |out: &mut Vec<SlotRequests>, slot: u32| -> usize {
            match out.iter().position(|s| s.slot == slot) {
                Some(p) => p,
                None => {
                    out.push(SlotRequests {
                        slot,
                        busy: 0,
                        requests: 0,
                        latency: Histogram::new(LATENCY_BOUNDS),
                    });
                    out.len() - 1
                }
            }
        };
        for (s, retired) in self.retired.iter().enumerate() {
            if let Some((requests, latency)) = retired {
                let p = entry(&mut out, s as u32 + 1);
                out[p].requests += requests;
                out[p].latency.add(latency);
            }
        }
        for (i, owner) in self.owner.iter().enumerate() {
            let Some(slot) = owner else { continue };
            let r = self.read(i as u32);
            if r.pid == 0 {
                continue;
            }
            let p = entry(&mut out, *slot);
            out[p].busy += r.busy;
            out[p].requests += r.requests;
            out[p].latency.add(&r.latency);
        }
        out.sort_by_key(|s| s.slot);
        out
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `create` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's writes, as the SDKs make them (atomic adds on its record).
    fn serve(path: &Path, index: u32, latencies_us: &[u64]) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a test mapping of the whole file.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        }
        .cast::<u8>();
        let word = |n: usize| unsafe {
            &*base
                .add(HEADER + index as usize * RECORD + n * 8)
                .cast::<AtomicU64>()
        };
        word(PID).store(42, Ordering::Relaxed);
        for us in latencies_us {
            let secs = *us as f64 / 1e6;
            let b = LATENCY_BOUNDS
                .iter()
                .position(|x| secs <= *x)
                .unwrap_or(LATENCY_BOUNDS.len());
            word(REQUESTS).fetch_add(1, Ordering::Relaxed);
            word(LATENCY_SUM_US).fetch_add(*us, Ordering::Relaxed);
            word(BUCKETS + b).fetch_add(1, Ordering::Relaxed);
        }
        word(BUSY).fetch_add(1, Ordering::Relaxed);
        unsafe { libc::munmap(base.cast(), len) };
    }

    #[test]
    fn the_header_says_what_the_file_is() {
        let dir = tempfile::tempdir().unwrap();
        let sb = Scoreboard::create(dir.path(), None).unwrap();
        let bytes = std::fs::read(sb.path()).unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 256);
        assert_eq!(u32::from_le_bytes(bytes[20..24].try_into().unwrap()), 14);
        assert!(BUCKETS + LATENCY_BOUNDS.len() < RECORD / 8);
    }

    #[test]
    fn slots_add_live_and_retired_workers() {
        let dir = tempfile::tempdir().unwrap();
        let mut sb = Scoreboard::create(dir.path(), None).unwrap();
        let a = sb.claim(1).unwrap();
        let b = sb.claim(2).unwrap();
        let silent = sb.claim(3).unwrap();
        serve(sb.path(), a, &[500, 20_000]);
        serve(sb.path(), b, &[3_000_000]);
        let slots = sb.slots();
        assert_eq!(slots.len(), 2, "slot 3's worker fills nothing: absent");
        assert_eq!((slots[0].slot, slots[0].busy, slots[0].requests), (1, 1, 2));
        assert_eq!(slots[0].latency.counts[0], 1);
        assert_eq!(slots[0].latency.counts[4], 1);
        assert!((slots[0].latency.sum - 0.0205).abs() < 1e-9);
        // Slot 1's worker is replaced: its requests stay counted, its busy
        // count goes.
        sb.release(a);
        let c = sb.claim(1).unwrap();
        assert_eq!(c, a, "records are reused");
        assert_eq!(sb.read(c).requests, 0, "and zeroed");
        serve(sb.path(), c, &[1000]);
        let slots = sb.slots();
        assert_eq!((slots[0].busy, slots[0].requests), (1, 3));
        sb.release(silent);
        sb.release(silent);
        assert_eq!(sb.slots().len(), 2);
    }

    /// The Rust SDK (drover-worker) and this reader agree on the layout.
    #[test]
    fn the_rust_sdk_fills_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut sb = Scoreboard::create(dir.path(), None).unwrap();
        let _other = sb.claim(1).unwrap();
        let i = sb.claim(2).unwrap();
        // Each test runs in its own process (nextest): the environment is ours.
        std::env::set_var("DROVER_SCOREBOARD", sb.path());
        std::env::set_var("DROVER_SCOREBOARD_INDEX", i.to_string());
        let board = drover_worker::Scoreboard::from_env().expect("record mapped");
        let first = board.begin();
        let second = board.begin();
        drop(first);
        let slots = sb.slots();
        assert_eq!(slots.len(), 1);
        assert_eq!((slots[0].slot, slots[0].busy, slots[0].requests), (2, 1, 1));
        assert_eq!(sb.read(i).pid, u64::from(std::process::id()));
        drop(second);
        let s = &sb.slots()[0];
        assert_eq!((s.busy, s.requests, s.latency.count()), (0, 2, 2));
        std::env::set_var("DROVER_SCOREBOARD_INDEX", CAPACITY.to_string());
        assert!(
            drover_worker::Scoreboard::from_env().is_none(),
            "out of range"
        );
    }
}
