//! Internal snapshots: create, apply (revert to), delete, and the
//! read-only view of one snapshot.
//!
//! Reference counting follows the specification: a cluster's refcount
//! counts every path to it from the active L1 table and from each
//! snapshot's L1 table, so taking a snapshot raises the refcount of every
//! L2 table and data cluster the active table reaches, and deleting one
//! lowers the refcounts of what its table reaches. Writes then copy any
//! cluster whose refcount is above 1 (the COPIED flag is clear on such
//! entries; [`Qcow2::fix_copied_flags`] keeps the flags true).
//!
//! Crash safety: every operation ends in one header write (the size, the
//! L1 table, the refcount table and the snapshot table fields all sit in
//! its first sector), and nothing the old header reaches is changed in a
//! way it would notice before that write, but raised refcounts (leaks):
//! - create: every active L2 table is copied (entries without COPIED, as
//!   their clusters get a second reference); data refcounts are raised in
//!   place; the old active L1 table and L2 tables become the snapshot's.
//! - apply: the snapshot's L2 tables are copied for the new active table
//!   and its data refcounts raised in place; after the header switch, the
//!   old active tree's references are dropped (no cluster the new active
//!   table reaches falls to refcount 1 by that, so no flag changes).
//! - delete: refcounts fall, and clusters left with one reference must get
//!   COPIED at the same moment; so the refcount blocks that change, the
//!   refcount table, the active L2 tables whose flags change and the L1
//!   table are written as copies, and the header switches to them.
//!
//! A crash thus leaves the state before or after, with at worst leaked
//! clusters.
//!
//! These are administrative operations: they run with the image's
//! metadata lock held, as qemu-img runs them on an image no one else has
//! open.

use super::entry::{self, Cluster};
use super::header;
use super::open::read_u64_table;
use super::snapshot::{self, Snapshot};
use super::{Qcow2, QcowError, Tables};
use crate::driver::SnapshotSelector;
use crate::error::{Error, ErrorKind, Result};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// The snapshot table as the header names it.
    pub(crate) fn read_snapshots(&self, tables: &Tables) -> Result<Vec<Snapshot>> {
        let h = &tables.header;
        if h.nb_snapshots == 0 {
            return Ok(Vec::new());
        }
        Ok(snapshot::read_table(self.file(), h.snapshots_offset, h.nb_snapshots)?.entries)
    }

    /// Index of the snapshot `sel` names: by ID, by name, or both.
    pub(crate) fn find_snapshot(list: &[Snapshot], sel: &SnapshotSelector) -> Option<usize> {
        list.iter().position(|s| sel.matches(&s.id, &s.name))
    }

    /// Index of the snapshot whose ID is `key`, else the first whose name is.
    pub(crate) fn find_by_id_or_name(list: &[Snapshot], key: &str) -> Option<usize> {
        list.iter()
            .position(|s| s.id == key)
            .or_else(|| list.iter().position(|s| s.name == key))
    }

    /// Reads and checks the L1 table of snapshot `s`.
    pub(crate) fn snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        let at = s.l1_table_offset;
        if s.l1_size as u64 * 8 > header::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "snapshot table",
                at,
                format!("Snapshot '{}' has an L1 table that is too large", s.name),
            ));
        }
        if s.l1_size > 0 && !at.is_multiple_of(self.cluster_size) {
            return Err(Error::corrupt(
                "snapshot table",
                at,
                format!("Snapshot '{}' has an invalid L1 table offset", s.name),
            ));
        }
        read_u64_table(
            self.file(),
            at,
            s.l1_size as u64,
            self.cluster_size,
            "snapshot L1 table",
        )
    }

    /// Calls `f(tables, offset, len, is_l2_table)` for every reference
    /// the L1 table `l1` (at `l1_offset`) holds: its L2 tables and their
    /// data clusters. Invalid entries and an L2 table named twice are
    /// errors, so the work is bounded by the file's size; callers walk
    /// once with a no-op `f` to validate before they change anything.
    fn walk_refs(
        &self,
        tables: &mut Tables,
        l1: &[u64],
        l1_offset: u64,
        mut f: impl FnMut(&mut Tables, u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let mut seen = HashSet::new();
        for (i, &e) in l1.iter().enumerate() {
            let off = e & entry::L1_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if e & entry::L1_RESERVED != 0 || !off.is_multiple_of(cs) {
                return Err(QcowError::Entry {
                    table: "L1 table",
                    index: i as u64,
                    offset: l1_offset,
                    why: "reserved bits set or L2 offset not cluster-aligned",
                }
                .into());
            }
            if !seen.insert(off) {
                return Err(QcowError::Entry {
                    table: "L1 table",
                    index: i as u64,
                    offset: l1_offset,
                    why: "an L2 table is named twice",
                }
                .into());
            }
            f(tables, off, cs, true)?;
            let table = self.l2_copy(tables, off)?;
            for i2 in 0..self.l2_entries as usize {
                let (c, _) = self.decode(&table, off, i2)?;
                match c {
                    Cluster::Compressed { host, len } => f(tables, host, len, false)?,
                    c => {
                        if let Some(h) = c.host_cluster().filter(|_| !self.external_data) {
                            f(tables, h, cs, false)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A copy of the L2 table at `off` (through the cache, which is
    /// flushed when it grows past its capacity).
    fn l2_copy(&self, tables: &mut Tables, off: u64) -> Result<Box<[u8]>> {
        if tables.l2.over_capacity() || tables.rc.over_capacity() {
            self.flush_held(tables)?;
            tables.l2.trim();
        }
        self.load_l2(tables, off)?;
        Ok(tables.l2.peek(off).expect("loaded").into())
    }

    /// `table` (an L2 table) with the COPIED flag of every entry set to
    /// `keep(host cluster)`; returns whether anything changed.
    fn set_l2_flags(
        &self,
        tables: &mut Tables,
        table: &mut [u8],
        at: u64,
        mut keep: impl FnMut(&mut Tables, u64) -> Result<bool>,
    ) -> Result<bool> {
        let mut changed = false;
        for i2 in 0..self.l2_entries as usize {
            let (raw, bitmap) = self.l2_get(table, i2);
            let (c, _) = self.decode(table, at, i2)?;
            let host = match c {
                Cluster::Compressed { .. } => continue,
                c => c.host_cluster(),
            };
            let want = match host {
                Some(h) if keep(tables, h)? => raw | entry::COPIED,
                _ => raw & !entry::COPIED,
            };
            if want != raw {
                self.l2_set(table, i2, want, bitmap);
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Writes a metadata structure at `offset`.
    fn write_meta(&self, bytes: &[u8], offset: u64, what: &'static str) -> Result<()> {
        self.file()
            .write_at(bytes, offset)
            .map_err(|e| Error::io(format!("writing the {what}"), e).at(what, offset))
    }

    /// Allocates clusters for `l1` and writes it (as given), returning the
    /// offset (0 for an empty table).
    fn write_new_l1(&self, tables: &mut Tables, l1: &[u64]) -> Result<u64> {
        if l1.is_empty() {
            return Ok(0);
        }
        let cs = self.cluster_size;
        let mut bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let clusters = (bytes.len() as u64).div_ceil(cs);
        bytes.resize((clusters * cs) as usize, 0);
        let off = self.alloc_clusters(tables, clusters)?;
        self.write_meta(&bytes, off, "L1 table")?;
        Ok(off)
    }

    /// Copies of the L2 tables `l1` names, every entry without COPIED,
    /// written to new clusters: the new L1 entries (with COPIED: the
    /// copies have one reference).
    fn copy_l2_tables(&self, tables: &mut Tables, l1: &[u64], l1_offset: u64) -> Result<Vec<u64>> {
        let mut out = vec![0u64; l1.len()];
        for (i, &e) in l1.iter().enumerate() {
            let off = e & entry::L1_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let mut table = self.l2_copy(tables, off)?;
            self.set_l2_flags(tables, &mut table, off, |_, _| Ok(false))
                .map_err(|e| e.at("L1 table", l1_offset))?;
            let new = self.alloc_clusters(tables, 1)?;
            self.write_meta(&table, new, "L2 table")?;
            out[i] = new | entry::COPIED;
        }
        Ok(out)
    }

    /// Encodes `entries` and writes them to new clusters (nothing for an
    /// empty list): the table's offset.
    fn write_new_snapshot_table(&self, tables: &mut Tables, entries: &[Snapshot]) -> Result<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let bytes = snapshot::encode_table(entries)?;
        let off = self.alloc_clusters(tables, (bytes.len() as u64).div_ceil(self.cluster_size))?;
        self.write_meta(&bytes, off, "snapshot table")?;
        Ok(off)
    }

    /// Begins a snapshot operation: the image is writable, has no external
    /// data file, and its caches are written out.
    fn begin_snapshot_op(&self, tables: &mut Tables, what: &str) -> Result<()> {
        self.check_writable(tables)?;
        if self.external_data {
            return Err(Error::unsupported(format!(
                "Could not {what}: Operation not supported (internal snapshots and an \
                 external data file do not mix)"
            )));
        }
        self.flush_held(tables)
    }

    /// Takes an internal snapshot named `name` of the current disk.
    pub(crate) fn create_snapshot(&self, name: &str) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        let t = &mut *tables;
        self.begin_snapshot_op(t, &format!("create snapshot '{name}'"))?;
        let mut list = self.read_snapshots(t)?;
        if list.len() as u64 >= header::MAX_SNAPSHOTS as u64 {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "Could not create snapshot '{name}': the image already has {} snapshots",
                    header::MAX_SNAPSHOTS
                ),
            ));
        }
        if name.len() > u16::MAX as usize {
            return Err(Error::invalid_argument(
                "snapshot names are at most 65535 bytes",
            ));
        }
        let old_bytes: u64 = list.iter().map(Snapshot::encoded_len).sum();
        // QEMU's rule: one more than the largest numeric ID.
        let id = list
            .iter()
            .map(|s| s.id.parse::<u64>().unwrap_or(0))
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| {
                Error::invalid_argument("no snapshot ID is left (the largest is in use)")
            })?;
        let l1 = t.l1.clone();
        let l1_offset = t.header.l1_table_offset;
        self.walk_refs(t, &l1, l1_offset, |_, _, _, _| Ok(()))?;
        let cs = self.cluster_size;
        let mut delta = Delta::default();
        self.walk_refs(t, &l1, l1_offset, |_, off, len, is_l2| {
            if !is_l2 {
                delta.add(cs, off, len, 1);
            }
            Ok(())
        })?;
        delta.check(self, t, &format!("Could not create snapshot '{name}'"))?;
        // The new active tables: copies; the old ones become the snapshot's.
        let new_l1 = self.copy_l2_tables(t, &l1, l1_offset)?;
        if t.header.nb_snapshots > 0 {
            delta.add(cs, t.header.snapshots_offset, old_bytes, -1);
        }
        let new_l1_offset = self.write_new_l1(t, &new_l1)?;
        let size = self.size.load(Ordering::Acquire);
        list.push(Snapshot::new(
            id.to_string(),
            name.to_string(),
            l1_offset,
            l1.len() as u32,
            size,
        ));
        let table = self.write_new_snapshot_table(t, &list)?;
        let refcounts = self.copy_refcounts(t, &mut delta)?;
        // Everything the new header names, durable before it.
        self.flush_held(t)?;
        self.sync_file()?;
        t.header.l1_table_offset = new_l1_offset;
        t.header.nb_snapshots = list.len() as u32;
        t.header.snapshots_offset = table;
        t.l1 = new_l1;
        self.switch_to(t, refcounts)
    }

    /// Writes the header (with the new refcount table) and syncs: the one
    /// step that switches an operation from the old state to the new one;
    /// then the in-memory state follows.
    fn switch_to(&self, t: &mut Tables, refcounts: (Vec<u64>, u64, u32)) -> Result<()> {
        let (rc_table, rc_offset, rc_clusters) = refcounts;
        t.header.refcount_table_offset = rc_offset;
        t.header.refcount_table_clusters = rc_clusters;
        if let Err(e) = self.write_header(t).and_then(|_| self.sync_file()) {
            // The header in memory names structures the file may not:
            // no more writes through this handle.
            t.corrupt = true;
            return Err(e);
        }
        t.l1_dirty.clear();
        t.rc_table = rc_table;
        t.rc_table_dirty.clear();
        t.rc.clear();
        t.free_hint = 0;
        t.compressed_tail = 0;
        t.l2.clear();
        *self.decompressed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Reverts the disk to the snapshot whose ID, else name, is `key`.
    pub(crate) fn apply_snapshot(&self, key: &str) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        let t = &mut *tables;
        self.begin_snapshot_op(t, &format!("apply snapshot '{key}'"))?;
        let list = self.read_snapshots(t)?;
        let Some(i) = Self::find_by_id_or_name(&list, key) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "Could not apply snapshot '{key}': Failed to load snapshot: No such file or directory"
                ),
            ));
        };
        let sn = &list[i];
        let sn_l1 = self.snapshot_l1(sn)?;
        let disk_size = sn.disk_size.unwrap_or(self.size.load(Ordering::Acquire));
        if disk_size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(
                "snapshot table",
                t.header.snapshots_offset,
                format!("Snapshot '{}' records an invalid disk size", sn.name),
            ));
        }
        if !self.v3() && disk_size != self.size.load(Ordering::Acquire) {
            // As qemu-img: a version 2 image with snapshots cannot change size.
            return Err(Error::unsupported(format!(
                "Could not apply snapshot '{key}': Failed to load snapshot: Operation not supported \
                 (a version 2 image with snapshots cannot change its size)"
            )));
        }
        let per_l1 = self.cluster_size * self.l2_entries;
        if sn.disk_size.is_some() && disk_size.div_ceil(per_l1) > sn_l1.len() as u64 {
            return Err(Error::corrupt(
                "snapshot table",
                t.header.snapshots_offset,
                format!(
                    "Snapshot '{}' has an L1 table too small for its disk size",
                    sn.name
                ),
            ));
        }
        let need = disk_size.div_ceil(per_l1).max(sn_l1.len() as u64);
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "snapshot table",
                t.header.snapshots_offset,
                format!("Snapshot '{}' needs an L1 table over 32 MiB", sn.name),
            ));
        }
        let old_l1 = t.l1.clone();
        let old_l1_offset = t.header.l1_table_offset;
        let sn_off = sn.l1_table_offset;
        self.walk_refs(t, &sn_l1, sn_off, |_, _, _, _| Ok(()))?;
        self.walk_refs(t, &old_l1, old_l1_offset, |_, _, _, _| Ok(()))?;
        // The snapshot's data gains a reference (from the copies); the old
        // active tree loses all of its.
        let cs = self.cluster_size;
        let mut delta = Delta::default();
        self.walk_refs(t, &sn_l1, sn_off, |_, off, len, is_l2| {
            if !is_l2 {
                delta.add(cs, off, len, 1);
            }
            Ok(())
        })?;
        self.walk_refs(t, &old_l1, old_l1_offset, |_, off, len, _| {
            delta.add(cs, off, len, -1);
            Ok(())
        })?;
        delta.add(cs, old_l1_offset, old_l1.len() as u64 * 8, -1);
        delta.check(self, t, &format!("Could not apply snapshot '{key}'"))?;
        let mut new_l1 = self.copy_l2_tables(t, &sn_l1, sn_off)?;
        new_l1.resize(need as usize, 0);
        let new_off = self.write_new_l1(t, &new_l1)?;
        let refcounts = self.copy_refcounts(t, &mut delta)?;
        self.flush_held(t)?;
        self.sync_file()?;
        t.header.size = disk_size;
        t.header.l1_size = need as u32;
        t.header.l1_table_offset = new_off;
        t.l1 = new_l1;
        self.switch_to(t, refcounts)?;
        self.size.store(disk_size, Ordering::Release);
        // Bitmaps that are still valid follow the disk's new size.
        self.resize_bitmaps(t, disk_size)
    }

    /// Deletes the snapshot `sel` names.
    pub(crate) fn delete_snapshot(&self, sel: &SnapshotSelector) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        let t = &mut *tables;
        let what = sel.name.as_deref().or(sel.id.as_deref()).unwrap_or("");
        self.begin_snapshot_op(t, &format!("delete snapshot '{what}'"))?;
        let mut list = self.read_snapshots(t)?;
        let old_bytes: u64 = list.iter().map(Snapshot::encoded_len).sum();
        let Some(i) = Self::find_snapshot(&list, sel) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Could not delete snapshot '{what}': snapshot not found"),
            ));
        };
        let sn = list.remove(i);
        let sn_l1 = self.snapshot_l1(&sn)?;
        self.walk_refs(t, &sn_l1, sn.l1_table_offset, |_, _, _, _| Ok(()))?;
        let cs = self.cluster_size;
        // The refcount changes of the new state, cluster by cluster.
        let mut delta = Delta::default();
        self.walk_refs(t, &sn_l1, sn.l1_table_offset, |_, off, len, _| {
            delta.add(cs, off, len, -1);
            Ok(())
        })?;
        delta.add(cs, sn.l1_table_offset, sn_l1.len() as u64 * 8, -1);
        if t.header.nb_snapshots > 0 {
            delta.add(cs, t.header.snapshots_offset, old_bytes, -1);
        }
        // The COPIED flags of the new state: the active L2 tables whose
        // flags change are copied.
        let mut new_l1 = t.l1.clone();
        let mut copies = Vec::new();
        delta.check(self, t, &format!("Could not delete snapshot '{what}'"))?;
        for (i1, slot) in new_l1.iter_mut().enumerate() {
            let e = *slot;
            let off = e & entry::L1_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let sole_table = delta.after(self, t, off / cs)? == 1;
            let mut table = self.l2_copy(t, off)?;
            let changed = self.set_l2_flags(t, &mut table, off, |t, host| {
                Ok(sole_table && (self.external_data || delta.after(self, t, host / cs)? == 1))
            })?;
            if changed {
                copies.push((i1, off, table));
            } else if sole_table {
                *slot = e | entry::COPIED;
            } else {
                *slot = e & !entry::COPIED;
            }
        }
        for (i1, off, table) in &copies {
            let new = self.alloc_clusters(t, 1)?;
            delta.add(cs, *off, cs, -1);
            new_l1[*i1] = new | entry::COPIED;
            self.write_meta(table, new, "L2 table")?;
        }
        let mut l1_offset = t.header.l1_table_offset;
        if new_l1 != t.l1 {
            delta.add(cs, l1_offset, t.l1.len() as u64 * 8, -1);
            l1_offset = self.write_new_l1(t, &new_l1)?;
        }
        let table = self.write_new_snapshot_table(t, &list)?;
        let refcounts = self.copy_refcounts(t, &mut delta)?;
        self.flush_held(t)?;
        self.sync_file()?;
        t.header.l1_table_offset = l1_offset;
        t.header.nb_snapshots = list.len() as u32;
        t.header.snapshots_offset = table;
        t.l1 = new_l1;
        self.switch_to(t, refcounts)
    }

    /// Writes copies of the refcount blocks `delta` changes (with the
    /// changes applied) and a new refcount table naming them, for a header
    /// switch: returns the new table, its offset and its size in clusters.
    /// The clusters the copies take are allocated in the current blocks
    /// (leaks until the switch); the blocks and table they replace are
    /// freed in the new ones.
    fn copy_refcounts(&self, t: &mut Tables, delta: &mut Delta) -> Result<(Vec<u64>, u64, u32)> {
        let cs = self.cluster_size;
        let per = self.rc_per_block(t);
        let mut copies: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut table: Option<(u64, u64)> = None;
        // The table being replaced (it can move while clusters are
        // allocated: a table that grows releases the old one itself).
        let mut replaced: Option<(u64, u64)> = None;
        loop {
            let mut grew = false;
            let current = (
                t.header.refcount_table_offset,
                t.header.refcount_table_clusters as u64,
            );
            if replaced != Some(current) {
                if let Some((o, n)) = replaced {
                    delta.add(cs, o, n * cs, 1);
                }
                delta.add(cs, current.0, current.1 * cs, -1);
                replaced = Some(current);
                grew = true;
            }
            let blocks: Vec<u64> = delta.clusters().map(|c| c / per).collect();
            for b in blocks {
                if copies.contains_key(&b) {
                    continue;
                }
                let Some(&old) = t.rc_table.get(b as usize).filter(|&&o| o != 0) else {
                    return Err(Error::corrupt(
                        "refcount table",
                        t.header.refcount_table_offset,
                        format!("no refcount block for cluster {} of a snapshot", b * per),
                    ));
                };
                let new = self.alloc_clusters(t, 1)?;
                copies.insert(b, new);
                delta.add(cs, old, cs, -1);
                grew = true;
            }
            let need = (t.rc_table.len() as u64 * 8).div_ceil(cs);
            if table.is_none_or(|(_, n)| n < need) {
                if let Some((o, n)) = table {
                    delta.add(cs, o, n * cs, -1);
                }
                table = Some((self.alloc_clusters(t, need)?, need));
                grew = true;
            }
            if !grew {
                break;
            }
        }
        // The current blocks, as allocations left them, durable first.
        self.flush_held(t)?;
        let bits = t.header.refcount_bits();
        let (table_off, table_clusters) = table.expect("allocated above");
        let mut new_table = t.rc_table.clone();
        new_table.resize((table_clusters * cs / 8) as usize, 0);
        for (&b, &new) in &copies {
            let old = t.rc_table[b as usize];
            self.load_rc_block(t, old)?;
            let mut block: Box<[u8]> = t.rc.peek(old).expect("loaded").into();
            for (c, d) in delta.in_range(b * per, (b + 1) * per) {
                let v = Self::rc_entry(&block, c % per, bits) as i128 + d as i128;
                if v < 0 || v > self.rc_max(t) as i128 {
                    return Err(Error::corrupt(
                        "refcount block",
                        old,
                        format!("refcount of cluster {c} would leave its range"),
                    ));
                }
                Self::set_rc_entry(&mut block, c % per, bits, v as u64);
            }
            self.write_meta(&block, new, "refcount block")?;
            new_table[b as usize] = new;
        }
        let bytes: Vec<u8> = new_table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_meta(&bytes, table_off, "refcount table")?;
        Ok((new_table, table_off, table_clusters as u32))
    }

    /// Makes this (read-only) image show the snapshot named by `key` (ID,
    /// else name) or `sel`: its L1 table, at the image's current size.
    pub(crate) fn load_snapshot_view(
        &self,
        key: Option<&str>,
        sel: &SnapshotSelector,
    ) -> Result<()> {
        let mut tables = self.tables_mut();
        let list = self.read_snapshots(&tables)?;
        let found = match key {
            Some(k) => Self::find_by_id_or_name(&list, k),
            None => Self::find_snapshot(&list, sel),
        };
        let Some(i) = found else {
            let what = key
                .or(sel.name.as_deref())
                .or(sel.id.as_deref())
                .unwrap_or("");
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Failed to load snapshot '{what}': snapshot not found"),
            ));
        };
        let sn = &list[i];
        let l1 = self.snapshot_l1(sn)?;
        // The entries are checked now, as the active table's are at open.
        self.walk_refs(&mut tables, &l1, sn.l1_table_offset, |_, _, _, _| Ok(()))?;
        // The disk keeps its current size, as qemu-img's -l shows it: what
        // the snapshot's table does not reach reads as zeroes.
        tables.l1 = l1;
        Ok(())
    }
}

/// Refcount changes per cluster, for a state written as copies.
#[derive(Default)]
struct Delta(std::collections::BTreeMap<u64, i64>);

impl Delta {
    /// Adds `d` to every cluster `[offset, offset + len)` touches.
    fn add(&mut self, cs: u64, offset: u64, len: u64, d: i64) {
        if len == 0 {
            return;
        }
        for c in offset / cs..=(offset + len - 1) / cs {
            *self.0.entry(c).or_default() += d;
        }
    }

    /// The clusters with a change.
    fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().filter(|(_, &d)| d != 0).map(|(&c, _)| c)
    }

    /// The changes of clusters `[from, to)`.
    fn in_range(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.0.range(from..to).map(|(&c, &d)| (c, d))
    }

    /// Fails (before anything is allocated) when a change would take a
    /// refcount out of its range.
    fn check(&self, img: &Qcow2, t: &mut Tables, what: &str) -> Result<()> {
        let max = img.rc_max(t) as i128;
        for (&c, &d) in &self.0 {
            let v = img.refcount(t, c)? as i128 + d as i128;
            if v > max {
                return Err(Error::invalid_argument(format!(
                    "{what}: Invalid argument (cluster {c} would need {v} references; \
                     {}-bit refcounts hold at most {max})",
                    t.header.refcount_bits()
                )));
            }
            if v < 0 {
                return Err(Error::corrupt(
                    "refcount block",
                    c * img.cluster_size,
                    format!(
                        "{what}: cluster {c} has fewer references counted than the tables hold"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Cluster `c`'s refcount after the changes.
    fn after(&self, img: &Qcow2, t: &mut Tables, c: u64) -> Result<i128> {
        let now = img.refcount(t, c)? as i128;
        Ok(now + self.0.get(&c).copied().unwrap_or(0) as i128)
    }
}
