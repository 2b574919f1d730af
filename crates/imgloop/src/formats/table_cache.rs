//! An LRU cache of metadata tables (qcow2 L2 tables and refcount blocks,
//! COW bitmap chunks, ...), keyed by their host offset, with dirty
//! tracking for write-back. Shared by the formats.
//!
//! Lookups take `&self` (the recency stamp is atomic), so readers share
//! the cache under a read lock. The cache never writes anything itself:
//! inserting a table evicts the least recently used *clean* table when
//! the cache is full, and when every table is dirty it grows past its
//! capacity until the next flush writes the dirty ones out (in the
//! crash-safe order the driver's flush keeps) and [`trim`](TableCache::trim)
//! can drop them. Each change of a table bumps its generation, so a flush
//! that wrote a copy marks the table clean only if nothing changed since.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Keys are cluster-aligned host offsets: one multiply mixes them well
/// enough, and costs far less than SipHash on the read path.
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Map = HashMap<u64, Entry, BuildHasherDefault<OffsetHasher>>;

struct Entry {
    data: Box<[u8]>,
    dirty: bool,
    /// Bumped on every change.
    generation: u64,
    /// Recency stamp, updated by lookups under a shared lock.
    used: AtomicU64,
}

/// A copy of a dirty table taken for write-back: (offset, generation, bytes).
pub type DirtyCopy = (u64, u64, Box<[u8]>);

/// A bounded cache of cluster-sized tables.
pub struct TableCache {
    capacity: usize,
    tick: AtomicU64,
    entries: Map,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2) while they
    /// are clean.
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(2),
            tick: AtomicU64::new(0),
            entries: Map::default(),
        }
    }

    /// A new recency stamp (inserts and changes, under the exclusive lock).
    /// Stamps of inserts are even; lookups between two inserts share the
    /// odd value after the last one.
    fn stamp(&self) -> u64 {
        self.tick.fetch_add(2, Ordering::Relaxed) + 2
    }

    /// The table at `offset`, if cached (marks it recently used). Lookups
    /// share the clock instead of advancing it, and write the stamp only
    /// when it changed, so readers on many threads do not fight over one
    /// cache line: recency is exact up to the last insert.
    pub fn get(&self, offset: u64) -> Option<&[u8]> {
        self.entries.get(&offset).map(|e| {
            let now = self.tick.load(Ordering::Relaxed) + 1;
            if e.used.load(Ordering::Relaxed) != now {
                e.used.store(now, Ordering::Relaxed);
            }
            &*e.data
        })
    }

    /// Mutable access to a cached table; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        let stamp = self.stamp();
        self.entries.get_mut(&offset).map(|e| {
            e.used.store(stamp, Ordering::Relaxed);
            e.dirty = true;
            e.generation += 1;
            &mut *e.data
        })
    }

    /// The smallest cached offset above `offset` (a scan of the cache).
    pub fn next_offset_after(&self, offset: u64) -> Option<u64> {
        self.entries.keys().copied().filter(|&k| k > offset).min()
    }

    /// True when `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// Drops a table, dirty or not (the caller wrote it, or discards it).
    pub fn remove(&mut self, offset: u64) -> Option<Box<[u8]>> {
        self.entries.remove(&offset).map(|e| e.data)
    }

    /// Inserts a table (replacing one at the same offset), then drops
    /// least recently used clean tables beyond the capacity; the new
    /// table itself stays until a later insert or trim.
    pub fn insert(&mut self, offset: u64, data: Box<[u8]>, dirty: bool) {
        let used = AtomicU64::new(self.stamp());
        let generation = self.entries.get(&offset).map_or(0, |e| e.generation + 1);
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty,
                generation,
                used,
            },
        );
        self.trim_except(Some(offset));
    }

    /// Drops least recently used clean tables until the cache is within
    /// its capacity (or only dirty tables are left).
    pub fn trim(&mut self) {
        self.trim_except(None);
    }

    fn trim_except(&mut self, keep: Option<u64>) {
        while self.entries.len() > self.capacity {
            let victim = self
                .entries
                .iter()
                .filter(|(k, e)| !e.dirty && Some(**k) != keep)
                .min_by_key(|(_, e)| e.used.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
    }

    /// True when dirty tables keep the cache past its capacity: time to
    /// flush.
    pub fn over_capacity(&self) -> bool {
        self.entries.len() > self.capacity
    }

    /// Offsets of dirty tables, sorted (so write-back is sequential).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Copies of every dirty table, sorted by offset, for writing them
    /// out without holding the lock the cache sits behind.
    pub fn dirty_copies(&self) -> Vec<DirtyCopy> {
        self.dirty_offsets()
            .into_iter()
            .map(|off| {
                let e = &self.entries[&off];
                (off, e.generation, e.data.clone())
            })
            .collect()
    }

    /// Marks a table clean after a copy of generation `generation` was
    /// written, unless it changed since.
    pub fn mark_clean_if(&mut self, offset: u64, generation: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            if e.generation == generation {
                e.dirty = false;
            }
        }
    }

    /// The data of a cached table without touching LRU order.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.entries.get(&offset).map(|e| &*e.data)
    }

    /// Marks a table clean after it was written (by a caller that holds
    /// every lock, such as a repair).
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = false;
        }
    }

    /// True when any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }

    /// Forgets everything (dirty tables included).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_clean_table_is_dropped_first() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0u8; 4].into(), false);
        c.insert(2, vec![0u8; 4].into(), false);
        c.get(1);
        c.insert(3, vec![0u8; 4].into(), false);
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
    }

    #[test]
    fn dirty_tables_are_never_dropped_and_the_cache_grows_instead() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0u8; 4].into(), true);
        c.insert(2, vec![0u8; 4].into(), true);
        c.insert(3, vec![0u8; 4].into(), false);
        // The clean newcomer stays (its reader needs it) until the next
        // insert, which drops it as the only clean table.
        assert!(c.contains(1) && c.contains(2) && c.contains(3));
        c.insert(4, vec![0u8; 4].into(), true);
        assert!(!c.contains(3));
        assert_eq!(c.len(), 3);
        assert!(c.over_capacity());
        for (off, generation, _) in c.dirty_copies() {
            c.mark_clean_if(off, generation);
        }
        c.trim();
        assert!(!c.over_capacity());
    }

    #[test]
    fn a_table_changed_after_its_copy_was_taken_stays_dirty() {
        let mut c = TableCache::new(8);
        c.insert(10, vec![0u8; 4].into(), false);
        c.get_mut(10).unwrap()[0] = 1;
        let copies = c.dirty_copies();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].2[0], 1);
        c.get_mut(10).unwrap()[0] = 2;
        c.mark_clean_if(copies[0].0, copies[0].1);
        assert_eq!(c.dirty_offsets(), vec![10]);
        let again = c.dirty_copies();
        c.mark_clean_if(again[0].0, again[0].1);
        assert!(!c.any_dirty());
    }
}
