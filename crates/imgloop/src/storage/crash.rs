//! A storage that simulates power cuts.
//!
//! Reads see every write, as a page cache would. [`Storage::sync`] makes
//! everything written so far durable. A power cut keeps everything up to
//! the last completed sync, plus any subset of the changes after it, in
//! any order a disk's volatile cache could have written them back, and a
//! write may be torn: only some of its 512-byte sectors made it.
//! [`CrashStorage::crash`] returns the worst case for durability (nothing
//! after the last sync); [`CrashStorage::crash_sample`] one of the other
//! states, chosen by a seed, for property tests that explore many.
//!
//! Tests use it to check that a driver's `flush`/`sync` ordering really
//! makes acknowledged writes durable and keeps metadata consistent in
//! every state, which a `kill -9` (page cache intact) cannot show.

use super::{MemStorage, Storage};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// One change not yet synced.
#[derive(Debug, Clone)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Zero(u64, u64, bool),
    Punch(u64, u64),
    Allocate(u64, u64),
}

#[derive(Debug, Default)]
struct Log {
    changes: Vec<Change>,
    syncs: u64,
    /// With [`CrashStorage::start_capture`]: the power-cut states seen so
    /// far (every prefix of the write stream between syncs).
    captured: Option<Vec<MemStorage>>,
}

/// See the module documentation. Clones share the same bytes.
#[derive(Debug, Clone)]
pub struct CrashStorage {
    live: MemStorage,
    durable: MemStorage,
    log: Arc<Mutex<Log>>,
}

impl Default for CrashStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl CrashStorage {
    /// An empty storage, nothing durable yet.
    pub fn new() -> Self {
        Self::from_durable(MemStorage::new())
    }

    /// A storage whose durable (and live) content is a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self::from_durable(MemStorage::from_bytes(bytes))
    }

    fn from_durable(durable: MemStorage) -> Self {
        CrashStorage {
            live: MemStorage::from_bytes(&durable.to_vec()),
            durable,
            log: Arc::new(Mutex::new(Log::default())),
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a power cut now would leave if nothing after the last sync
    /// reached the disk.
    pub fn crash(&self) -> MemStorage {
        let _log = self.log();
        MemStorage::from_bytes(&self.durable.to_vec())
    }

    /// One state a power cut now could leave, chosen by `seed`: the synced
    /// content, then each change since the last sync applied or not (in
    /// the order they were made; an earlier change that was not applied
    /// lets a later one to the same place be seen alone, as a reordering
    /// cache would), and each applied write possibly torn to a subset of
    /// its 512-byte sectors.
    pub fn crash_sample(&self, seed: u64) -> MemStorage {
        let log = self.log();
        let out = MemStorage::from_bytes(&self.durable.to_vec());
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15 | 1;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        // Which changes land: none, all, or each with even odds.
        let mode = next() % 4;
        for c in &log.changes {
            let keep = match mode {
                0 => false,
                1 => true,
                _ => next() % 2 == 0,
            };
            if !keep {
                continue;
            }
            // In memory: errors cannot happen below the storage's limit.
            let _ = match c {
                Change::Write(off, data) => {
                    if next() % 4 == 0 {
                        // Torn: some of its sectors only.
                        for (i, sector) in data.chunks(512).enumerate() {
                            if next() % 2 == 0 {
                                let _ = out.write_at(sector, off + i as u64 * 512);
                            }
                        }
                        Ok(())
                    } else {
                        out.write_at(data, *off)
                    }
                }
                Change::SetLen(len) => out.set_len(*len),
                Change::Zero(off, len, unmap) => out.zero_range(*off, *len, *unmap),
                Change::Punch(off, len) => out.punch_hole(*off, *len),
                Change::Allocate(off, len) => out.allocate(*off, *len),
            };
        }
        out
    }

    /// Changes made since the last sync.
    pub fn pending(&self) -> usize {
        self.log().changes.len()
    }

    /// The state a power cut leaves when exactly the first `n` changes
    /// since the last sync reached the disk, in the order they were made:
    /// the write stream cut at one point (no reordering, no tearing).
    pub fn crash_prefix(&self, n: usize) -> MemStorage {
        let log = self.log();
        let out = MemStorage::from_bytes(&self.durable.to_vec());
        for c in log.changes.iter().take(n) {
            // In memory: errors cannot happen below the storage's limit.
            let _ = apply_change(&out, c);
        }
        out
    }

    /// From now on, records every state a power cut could leave with the
    /// write stream cut at one point (each prefix of the changes between
    /// two syncs), for tests of operations that sync several times, where
    /// a crash may come between any two of them. Ends with
    /// [`take_captured`](CrashStorage::take_captured).
    pub fn start_capture(&self) {
        self.log().captured = Some(Vec::new());
    }

    /// The states recorded since [`start_capture`](CrashStorage::start_capture),
    /// the prefixes of the changes not yet synced included; stops recording.
    pub fn take_captured(&self) -> Vec<MemStorage> {
        let mut log = self.log();
        let mut out = log.captured.take().unwrap_or_default();
        let base = MemStorage::from_bytes(&self.durable.to_vec());
        Self::prefixes_into(&base, &log.changes, &mut out);
        out
    }

    fn prefixes_into(durable: &MemStorage, changes: &[Change], out: &mut Vec<MemStorage>) {
        let state = MemStorage::from_bytes(&durable.to_vec());
        out.push(MemStorage::from_bytes(&state.to_vec()));
        for c in changes {
            // In memory: errors cannot happen below the storage's limit.
            let _ = apply_change(&state, c);
            out.push(MemStorage::from_bytes(&state.to_vec()));
        }
    }

    /// How many syncs reached this storage.
    pub fn syncs(&self) -> u64 {
        self.log().syncs
    }

    /// True when writes are waiting for a sync.
    pub fn has_unsynced(&self) -> bool {
        !self.log().changes.is_empty()
    }

    fn record(&self, change: Change) {
        self.log().changes.push(change);
    }
}

fn apply_change(to: &MemStorage, c: &Change) -> io::Result<()> {
    match c {
        Change::Write(off, data) => to.write_at(data, *off),
        Change::SetLen(len) => to.set_len(*len),
        Change::Zero(off, len, unmap) => to.zero_range(*off, *len, *unmap),
        Change::Punch(off, len) => to.punch_hole(*off, *len),
        Change::Allocate(off, len) => to.allocate(*off, *len),
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut log = self.log();
        self.live.write_at(buf, offset)?;
        log.changes.push(Change::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.live.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.live.set_len(len)?;
        self.record(Change::SetLen(len));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut log = self.log();
        if let Some(mut captured) = log.captured.take() {
            Self::prefixes_into(&self.durable, &log.changes, &mut captured);
            log.captured = Some(captured);
        }
        for c in std::mem::take(&mut log.changes) {
            apply_change(&self.durable, &c)?;
        }
        log.syncs += 1;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.log();
        self.live.punch_hole(offset, len)?;
        log.changes.push(Change::Punch(offset, len));
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mut log = self.log();
        self.live.zero_range(offset, len, may_unmap)?;
        log.changes.push(Change::Zero(offset, len, may_unmap));
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut log = self.log();
        self.live.allocate(offset, len)?;
        log.changes.push(Change::Allocate(offset, len));
        Ok(())
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<(bool, u64)> {
        self.live.extent(offset, max_len)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.live.allocated_size()
    }

    fn describe(&self) -> String {
        "crash-simulating memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_in_a_crash_and_synced_ones_survive() {
        let s = CrashStorage::new();
        s.write_at(b"durable", 0).unwrap();
        s.sync().unwrap();
        s.write_at(b"lost", 100).unwrap();
        let mut b = [0u8; 4];
        s.read_at(&mut b, 100).unwrap();
        assert_eq!(&b, b"lost", "reads see unsynced writes");
        assert!(s.has_unsynced());
        let after = s.crash();
        assert_eq!(&after.to_vec()[..7], b"durable");
        assert_eq!(after.len().unwrap(), 7, "the unsynced growth is gone too");
        assert_eq!(s.syncs(), 1);
    }

    #[test]
    fn crash_samples_range_from_nothing_to_everything_after_the_sync() {
        let s = CrashStorage::new();
        s.write_at(&[1; 1024], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2; 1024], 0).unwrap();
        s.write_at(&[3; 512], 1024).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let v = s.crash_sample(seed).to_vec();
            // Synced data is always there; every sector is old or new.
            assert!(v.len() == 1024 || v.len() == 1536, "{}", v.len());
            for (i, sector) in v.chunks(512).enumerate() {
                let ok = match i {
                    0 | 1 => sector == [1; 512] || sector == [2; 512],
                    _ => sector == [3; 512],
                };
                assert!(ok, "seed {seed}: sector {i} is neither old nor new");
            }
            seen.insert((v[0], v[512], v.len()));
        }
        // Nothing, everything and torn states all occur.
        assert!(seen.contains(&(1, 1, 1024)));
        assert!(seen.contains(&(2, 2, 1536)));
        assert!(seen.contains(&(2, 1, 1024)) || seen.contains(&(1, 2, 1024)));
    }
}
