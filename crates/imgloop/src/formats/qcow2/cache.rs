//! An LRU cache of metadata tables (L2 tables, refcount blocks), keyed by
//! their host offset, with dirty tracking for write-back.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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
    used: u64,
}

/// A bounded cache of cluster-sized tables.
pub struct TableCache {
    capacity: usize,
    tick: u64,
    entries: Map,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(2),
            tick: 0,
            entries: Map::default(),
        }
    }

    /// The table at `offset`, if cached (marks it recently used).
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&offset).map(|e| {
            e.used = tick;
            &*e.data
        })
    }

    /// Mutable access to a cached table; marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&offset).map(|e| {
            e.used = tick;
            e.dirty = true;
            &mut *e.data
        })
    }

    /// True when `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// The least recently used dirty table that must be written before
    /// inserting one more table, if the cache is full and the victim is dirty.
    pub fn victim_if_full(&self) -> Option<(u64, bool)> {
        if self.entries.len() < self.capacity {
            return None;
        }
        self.entries
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(k, e)| (*k, e.dirty))
    }

    /// Drops a table (after it was written, if dirty).
    pub fn remove(&mut self, offset: u64) -> Option<Box<[u8]>> {
        self.entries.remove(&offset).map(|e| e.data)
    }

    /// Inserts a table. The caller must have made room (see
    /// [`victim_if_full`](Self::victim_if_full)).
    pub fn insert(&mut self, offset: u64, data: Box<[u8]>, dirty: bool) {
        self.tick += 1;
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty,
                used: self.tick,
            },
        );
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

    /// The data of a cached table (for write-back) without touching LRU order.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.entries.get(&offset).map(|e| &*e.data)
    }

    /// Marks a table clean after it was written.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_table_is_the_victim() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![0u8; 4].into(), false);
        c.insert(2, vec![0u8; 4].into(), true);
        c.get(1);
        assert_eq!(c.victim_if_full(), Some((2, true)));
        c.get(2);
        assert_eq!(c.victim_if_full(), Some((1, false)));
        c.remove(1);
        assert_eq!(c.victim_if_full(), None);
    }

    #[test]
    fn get_mut_marks_dirty_and_dirty_offsets_are_sorted() {
        let mut c = TableCache::new(8);
        for off in [30, 10, 20] {
            c.insert(off, vec![0u8; 4].into(), false);
        }
        assert!(!c.any_dirty());
        c.get_mut(30).unwrap()[0] = 1;
        c.get_mut(10).unwrap()[0] = 1;
        assert_eq!(c.dirty_offsets(), vec![10, 30]);
        c.mark_clean(10);
        assert_eq!(c.dirty_offsets(), vec![30]);
        assert_eq!(c.peek(30).unwrap()[0], 1);
    }
}
