//! The qcow2 answers to writes, write-zeroes and discard, and the
//! metadata they publish.
//!
//! A write to an allocated cluster with refcount 1 (COPIED) goes in place,
//! mapped under the shared lock. Any other write claims its guest
//! cluster, reserves storage under the exclusive lock (the L2 table
//! first, so tables sit before the data they map, as QEMU lays them out)
//! and returns an [`Allocation`] whose fills say where the rest of the
//! cluster (or of its subclusters) is now: the generic layer copies it,
//! writes the data, and [`commit`] points the L2 entry at the new place.
//! Until then readers see the old entry; a crash leaves at worst a leaked
//! cluster.

use super::entry::{self, Cluster, Sub};
use super::tables::{Miss, Tables};
use super::Qcow2;
use crate::driver::{
    Allocation, Commit, DiscardAction, DiscardMapping, Fill, WriteMapping, ZeroAction, ZeroFlags,
    ZeroMapping,
};
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::inflight::UnitGuard;
use std::sync::atomic::Ordering;

/// What a mapping of this driver publishes in [`commit`].
enum Publish {
    /// Point the L2 entry of an allocating write at its new place.
    Data(DataUpdate),
    /// Make a cluster read as zeroes after its raw data file range was
    /// zeroed or punched.
    RawZero { guest: u64, _claim: UnitGuard },
}

/// The L2 update of an allocating write.
struct DataUpdate {
    /// Guest offset of the cluster.
    guest: u64,
    /// Host cluster (without flags).
    host: u64,
    /// With extended L2: the subclusters `[first, last)` written; `None`
    /// when the whole cluster was.
    subclusters: Option<(u32, u32)>,
    /// The cluster's old storage, released once the entry is published.
    drop_old: Option<Cluster>,
    /// A host cluster this write allocated (freed again on abort).
    fresh: Option<u64>,
    _claim: UnitGuard,
}

impl Qcow2 {
    pub(crate) fn check_writable(&self, tables: &Tables) -> Result<()> {
        if tables.corrupt {
            return Err(
                Error::new(ErrorKind::Corrupt, "the image is marked corrupt")
                    .with_condition(Condition::MarkedCorrupt),
            );
        }
        if self.read_only() {
            return Err(Error::read_only("write"));
        }
        Ok(())
    }

    /// [`lookup`](Qcow2::lookup) for the write path: invalid metadata marks
    /// the image corrupt, which stops all further writes.
    fn lookup_for_write(&self, tables: &mut Tables, guest: u64) -> Result<(Cluster, u64)> {
        self.lookup(tables, guest).map_err(|e| match e.kind() {
            ErrorKind::Corrupt => self.mark_corrupt(tables, e),
            _ => e,
        })
    }

    /// The offset of a writable (refcount 1) L2 table for `guest`,
    /// allocating a new table or copying a shared one as needed.
    pub(crate) fn l2_for_write(&self, tables: &mut Tables, guest: u64) -> Result<u64> {
        let (i1, _) = self.indices(guest);
        let cs = self.cluster_size;
        let Some(&e) = tables.l1.get(i1) else {
            let at = tables.header.l1_table_offset;
            return Err(self.mark_corrupt(
                tables,
                Error::corrupt("L1 table", at, "L1 table is too small for the virtual size"),
            ));
        };
        let off = e & entry::L1_OFFSET_MASK;
        if off != 0 && e & entry::COPIED != 0 {
            return Ok(off);
        }
        let new = self.alloc_clusters(tables, 1)?;
        let table = if off == 0 {
            vec![0u8; cs as usize].into_boxed_slice()
        } else {
            // Shared with a snapshot: copy it; the old one loses a reference.
            self.load_l2(tables, off)?;
            let t: Box<[u8]> = tables.l2.peek(off).expect("loaded").into();
            self.release_range(tables, off, cs);
            t
        };
        tables.l2.insert(new, table, true);
        tables.l1[i1] = new | entry::COPIED;
        tables.l1_dirty.insert(i1);
        Ok(new)
    }

    /// Sets the L2 entry of `guest` in a writable table.
    pub(crate) fn set_l2(
        &self,
        tables: &mut Tables,
        guest: u64,
        e: u64,
        bitmap: u64,
    ) -> Result<()> {
        let off = self.l2_for_write(tables, guest)?;
        self.load_l2(tables, off)?;
        let (_, i2) = self.indices(guest);
        let table = tables.l2.get_mut(off).expect("loaded");
        self.l2_set(table, i2, e, bitmap);
        Ok(())
    }

    /// Drops this image's reference to the host storage of cluster `c`
    /// (call after the entry no longer points at it).
    pub(crate) fn release(&self, tables: &mut Tables, c: Cluster) {
        match c {
            Cluster::Compressed { host, len } => self.release_range(tables, host, len),
            _ => {
                if let Some(h) = c.host_cluster() {
                    if !self.external_data {
                        self.release_range(tables, h, self.cluster_size);
                    }
                }
            }
        }
    }

    /// A host cluster for new data of the guest cluster at `guest_base`,
    /// and whether it was allocated now.
    fn alloc_data(&self, tables: &mut Tables, guest_base: u64) -> Result<(u64, bool)> {
        if self.external_data {
            // External data files map guest offsets one to one.
            Ok((guest_base, false))
        } else {
            Ok((self.alloc_clusters(tables, 1)?, true))
        }
    }

    /// The fills of `[from, to)` (guest offsets, inside one cluster whose
    /// entry is `c`/`bitmap`): where that content is now.
    fn fills(&self, c: Cluster, bitmap: u64, from: u64, to: u64, out: &mut Vec<Fill>) {
        let mut pos = from;
        while pos < to {
            let (mapping, n, _) = self.classify(c, bitmap, pos, to - pos);
            out.push(Fill {
                guest: pos,
                len: n,
                from: mapping,
            });
            pos += n;
        }
    }

    /// The in-place part of a write at `offset`, when the cluster is
    /// allocated with refcount 1 (and, with extended L2, the first
    /// subcluster holds data): extends over following host-contiguous
    /// clusters of the same kind. `lookup` gives an entry, or a [`Miss`]
    /// for a table that is not cached (which ends the run, or for the
    /// first cluster is the answer).
    fn in_place_with(
        &self,
        offset: u64,
        len: u64,
        mut lookup: impl FnMut(u64) -> Result<std::result::Result<(Cluster, u64), Miss>>,
    ) -> Result<std::result::Result<Option<WriteMapping>, Miss>> {
        let cs = self.cluster_size;
        let sc = cs / entry::SUBCLUSTERS as u64;
        let in_cluster = offset & (cs - 1);
        let (c, bitmap) = match lookup(offset)? {
            Ok(e) => e,
            Err(miss) => return Ok(Err(miss)),
        };
        let Cluster::Normal { host, copied: true } = c else {
            return Ok(Ok(None));
        };
        let mut n = len.min(cs - in_cluster);
        if self.ext_l2 {
            let first = (in_cluster / sc) as u32;
            let run = data_run(bitmap, first);
            if run == 0 {
                return Ok(Ok(None));
            }
            n = n.min((first + run) as u64 * sc - in_cluster);
        }
        let start = host + in_cluster;
        while n < len && (offset + n).is_multiple_of(cs) {
            let want = (len - n).min(cs);
            match lookup(offset + n)? {
                Ok((
                    Cluster::Normal {
                        host: h,
                        copied: true,
                    },
                    b,
                )) if h == start + n && (!self.ext_l2 || data_run(b, 0) as u64 * sc >= want) => {
                    n += want
                }
                _ => break,
            }
        }
        Ok(Ok(Some(WriteMapping::InPlace {
            storage: self.data_id(),
            offset: start,
            len: n,
        })))
    }

    /// Reserves storage for a write at `offset` (for at most `len`
    /// bytes, inside one cluster) whose cluster cannot be written in
    /// place; the caller holds the cluster's claim.
    fn allocate(
        &self,
        tables: &mut Tables,
        offset: u64,
        len: u64,
        claim: UnitGuard,
    ) -> Result<WriteMapping> {
        let cs = self.cluster_size;
        let sc = cs / entry::SUBCLUSTERS as u64;
        let in_cluster = offset & (cs - 1);
        let base = offset - in_cluster;
        let end_in = (in_cluster + len).min(cs);
        self.l2_for_write(tables, offset)?;
        let (c, bitmap) = self.lookup_for_write(tables, offset)?;
        // Where to write, the cluster-relative range [from, to), the
        // subclusters it sets, and whether the old storage is dropped.
        let (host, fresh, from, to, subclusters, drop_old) = match c {
            Cluster::Normal { host, copied: true } => {
                // Extended L2 with the first touched subcluster not data:
                // allocate the run of non-data subclusters, so no fill
                // copies data another write may change in place.
                let first = (in_cluster / sc) as u32;
                let mut last = first + 1;
                while last < entry::SUBCLUSTERS && entry::subcluster(bitmap, last) != Sub::Data {
                    last += 1;
                }
                let to = (end_in.div_ceil(sc) * sc).min(last as u64 * sc);
                let last = (to / sc) as u32;
                (host, None, first as u64 * sc, to, Some((first, last)), None)
            }
            Cluster::Zero {
                host: Some(h),
                copied: true,
            } if !self.ext_l2 => (h, None, 0, cs, None, None),
            Cluster::Unallocated | Cluster::Zero { host: None, .. } if self.ext_l2 => {
                let (h, new) = self.alloc_data(tables, base)?;
                let first = (in_cluster / sc) as u32;
                let last = end_in.div_ceil(sc) as u32;
                let fresh = new.then_some(h);
                (
                    h,
                    fresh,
                    first as u64 * sc,
                    last as u64 * sc,
                    Some((first, last)),
                    None,
                )
            }
            _ => {
                let (h, new) = self.alloc_data(tables, base)?;
                (h, new.then_some(h), 0, cs, None, Some(c))
            }
        };
        // The last cluster of an odd-sized disk ends at the disk's end.
        let size = self.size.load(Ordering::Acquire);
        let to = to.min(size - base);
        let mut fills = Vec::new();
        self.fills(c, bitmap, base + from, offset, &mut fills);
        self.fills(c, bitmap, base + end_in.min(to), base + to, &mut fills);
        Ok(WriteMapping::Allocate(Allocation {
            guest: base + from,
            len: to - from,
            storage: self.data_id(),
            offset: host + from,
            fills,
            zeroed: false,
            commit: Commit::new(Publish::Data(DataUpdate {
                guest: base,
                host,
                subclusters,
                drop_old,
                fresh,
                _claim: claim,
            })),
        }))
    }

    /// Reads the L2 table for `guest` into the cache without holding the
    /// exclusive lock, so the allocation under it rarely does I/O.
    fn prefetch_l2(&self, guest: u64) -> Result<()> {
        let (i1, _) = self.indices(guest);
        let off = {
            let tables = self.tables();
            let off = self.l2_offset(&tables, i1);
            if off == 0 || tables.l2.contains(off) {
                return Ok(());
            }
            off
        };
        self.fetch_l2(off).map(|_| ())
    }
}

/// Subclusters holding data from `first` on, in a row.
fn data_run(bitmap: u64, first: u32) -> u32 {
    (first..entry::SUBCLUSTERS)
        .take_while(|&i| entry::subcluster(bitmap, i) == Sub::Data)
        .count() as u32
}

/// Where the bytes of a write at `offset` go.
pub(super) fn map_write(img: &Qcow2, offset: u64, len: u64) -> Result<WriteMapping> {
    // Rewrites of allocated clusters need only the shared lock.
    img.check_writable(&img.tables())?;
    let fast = img
        .walk(|tables, fetched| {
            img.in_place_with(offset, len, |g| img.lookup_cached(tables, g, fetched))
        })
        .map_err(|e| match e.kind() {
            // Invalid metadata found by a write stops all writes.
            ErrorKind::Corrupt => img.mark_corrupt(&mut img.tables_mut(), e),
            _ => e,
        })?;
    if let Some(m) = fast {
        return Ok(m);
    }
    let claim = img.units.lock(offset >> img.cluster_bits);
    let mut tables = img.tables_mut();
    img.check_writable(&tables)?;
    // Someone may have allocated the cluster while we waited.
    let again = img.in_place_with(offset, len, |g| {
        img.lookup_for_write(&mut tables, g).map(Ok)
    })?;
    if let Ok(Some(m)) = again {
        return Ok(m);
    }
    img.allocate(&mut tables, offset, len, claim)
}

/// Publishes what a mapping of this driver reserved.
pub(super) fn commit(img: &Qcow2, commit: Commit) -> Result<()> {
    let Some(publish) = commit.into_inner::<Publish>() else {
        return Err(Error::new(
            ErrorKind::State,
            "a commit from another driver reached qcow2",
        ));
    };
    {
        let mut tables = img.tables_mut();
        match publish {
            Publish::Data(u) => {
                let bitmap = match (img.ext_l2, u.subclusters) {
                    (false, _) => 0,
                    (true, None) => entry::ALL_ALLOC,
                    (true, Some((first, last))) => {
                        let (_, now) = img.lookup_for_write(&mut tables, u.guest)?;
                        entry::set_subclusters(now, first, last, Sub::Data)
                    }
                };
                img.set_l2(&mut tables, u.guest, u.host | entry::COPIED, bitmap)?;
                if let Some(old) = u.drop_old {
                    img.release(&mut tables, old);
                }
                if matches!(u.drop_old, Some(Cluster::Compressed { .. })) {
                    *img.decompressed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
            Publish::RawZero { guest, .. } => {
                let (e, bitmap) = if img.ext_l2 {
                    (guest | entry::COPIED, entry::ALL_ZERO)
                } else {
                    (guest | entry::COPIED | entry::ZERO, 0)
                };
                img.set_l2(&mut tables, guest, e, bitmap)?;
            }
        }
    }
    img.flush_if_over_capacity()
}

/// Gives back what a mapping reserved: a freshly allocated host cluster
/// becomes free again (nothing points at it).
pub(super) fn abort(img: &Qcow2, commit: Commit) {
    if let Some(Publish::Data(u)) = commit.into_inner::<Publish>() {
        if let Some(h) = u.fresh {
            let mut tables = img.tables_mut();
            let _ = img.set_refcount(&mut tables, h / img.cluster_size, 0);
        }
    }
}

/// What write-zeroes makes of a prefix of `[offset, offset + len)`.
pub(super) fn map_zeroes(
    img: &Qcow2,
    offset: u64,
    len: u64,
    flags: ZeroFlags,
) -> Result<ZeroMapping> {
    let cs = img.cluster_size;
    let (raw_data, has_backing) = {
        let tables = img.tables();
        img.check_writable(&tables)?;
        (
            tables.header.data_file_raw(),
            tables.header.backing_file.is_some(),
        )
    };
    let buffers = |len| ZeroMapping {
        len,
        action: ZeroAction::Buffers,
        commit: None,
    };
    if !img.v3() && has_backing {
        // No zero flag in version 2, and unallocated clusters would show
        // the backing image: real zeroes have to be written.
        return Ok(buffers(len));
    }
    let size = img.size.load(Ordering::Acquire);
    let end = offset + len;
    let base = offset & !(cs - 1);
    let cluster_end = (base + cs).min(size);
    let stop = end.min(cluster_end);
    // A partial last cluster of the disk counts as whole.
    let whole = offset == base && stop == cluster_end;
    if !whole {
        if !img.ext_l2 || raw_data {
            return Ok(buffers(stop - offset));
        }
        return zero_subclusters(img, offset, stop);
    }
    let claim = img.units.lock(base >> img.cluster_bits);
    img.prefetch_l2(base)?;
    let mut tables = img.tables_mut();
    img.check_writable(&tables)?;
    let (c, _) = img.lookup_for_write(&mut tables, base)?;
    let n = cluster_end - base;
    if !img.v3() {
        // Version 2 without a backing image: an unallocated cluster reads
        // as zeroes.
        if c != Cluster::Unallocated {
            img.set_l2(&mut tables, base, 0, 0)?;
            img.release(&mut tables, c);
        }
    } else if raw_data {
        // The data file must stay a valid raw image: zero the cluster
        // there first, then mark it zero at its fixed place.
        drop(tables);
        return Ok(ZeroMapping {
            len: n,
            action: ZeroAction::Host {
                storage: img.data_id(),
                offset: base,
            },
            commit: Some(Commit::new(Publish::RawZero {
                guest: base,
                _claim: claim,
            })),
        });
    } else {
        let keep = !flags.may_unmap
            && matches!(
                c,
                Cluster::Normal { copied: true, .. }
                    | Cluster::Zero {
                        copied: true,
                        host: Some(_)
                    }
            );
        let (e, bitmap) = match (keep, c.host_cluster(), img.ext_l2) {
            (true, Some(h), false) => (h | entry::COPIED | entry::ZERO, 0),
            (true, Some(h), true) => (h | entry::COPIED, entry::ALL_ZERO),
            (_, _, false) => (entry::ZERO, 0),
            (_, _, true) => (0, entry::ALL_ZERO),
        };
        img.set_l2(&mut tables, base, e, bitmap)?;
        if !keep {
            img.release(&mut tables, c);
        }
    }
    drop(tables);
    drop(claim);
    img.flush_if_over_capacity()?;
    Ok(ZeroMapping {
        len: n,
        action: ZeroAction::Metadata,
        commit: None,
    })
}

/// Zeroes `[from, to)` (inside one cluster, not all of it) of an image
/// with extended L2 entries: whole subclusters become zero subclusters,
/// as QEMU does; the unaligned rest gets zero buffers.
fn zero_subclusters(img: &Qcow2, from: u64, to: u64) -> Result<ZeroMapping> {
    let cs = img.cluster_size;
    let sc = cs / entry::SUBCLUSTERS as u64;
    let base = from & !(cs - 1);
    let (a, b) = (from.div_ceil(sc) * sc, to / sc * sc);
    let buffers = |len| ZeroMapping {
        len,
        action: ZeroAction::Buffers,
        commit: None,
    };
    if a >= b {
        return Ok(buffers(to - from));
    }
    if from < a {
        return Ok(buffers(a - from));
    }
    let claim = img.units.lock(base >> img.cluster_bits);
    let mut tables = img.tables_mut();
    img.check_writable(&tables)?;
    let (c, bitmap) = img.lookup_for_write(&mut tables, base)?;
    let (first, last) = (((a - base) / sc) as u32, ((b - base) / sc) as u32);
    let e = match c {
        Cluster::Normal { host, copied: true } => Some(host | entry::COPIED),
        Cluster::Unallocated | Cluster::Zero { host: None, .. } => Some(0),
        // Shared or compressed: the data is rewritten instead.
        _ => None,
    };
    let Some(e) = e else {
        return Ok(buffers(b - a));
    };
    let bitmap = entry::set_subclusters(bitmap, first, last, Sub::Zero);
    img.set_l2(&mut tables, base, e, bitmap)?;
    drop(tables);
    drop(claim);
    img.flush_if_over_capacity()?;
    Ok(ZeroMapping {
        len: b - a,
        action: ZeroAction::Metadata,
        commit: None,
    })
}

/// What discard releases of a prefix of `[offset, offset + len)`: whole
/// clusters are freed; they then read as zeroes (version 3) or from the
/// backing image (version 2).
pub(super) fn map_discard(img: &Qcow2, offset: u64, len: u64) -> Result<DiscardMapping> {
    let cs = img.cluster_size;
    let (raw_data, has_backing) = {
        let tables = img.tables();
        img.check_writable(&tables)?;
        (
            tables.header.data_file_raw(),
            tables.header.backing_file.is_some(),
        )
    };
    let size = img.size.load(Ordering::Acquire);
    let end = offset + len;
    let base = offset & !(cs - 1);
    let cluster_end = (base + cs).min(size);
    let nothing = |len| DiscardMapping {
        len,
        action: DiscardAction::Nothing,
        commit: None,
    };
    if offset != base || end < cluster_end {
        // Part of a cluster: nothing to free.
        return Ok(nothing(end.min(cluster_end) - offset));
    }
    let n = cluster_end - base;
    let claim = img.units.lock(base >> img.cluster_bits);
    img.prefetch_l2(base)?;
    let mut tables = img.tables_mut();
    img.check_writable(&tables)?;
    let (c, _) = img.lookup_for_write(&mut tables, base)?;
    if c == Cluster::Unallocated && !has_backing {
        return Ok(nothing(n));
    }
    let (e, bitmap) = match (img.v3(), img.ext_l2) {
        (true, false) => (entry::ZERO, 0),
        (true, true) => (0, entry::ALL_ZERO),
        _ => (0, 0),
    };
    if raw_data {
        // The data file must stay a raw image that reads like the guest
        // disk: the discarded range reads as zeroes there too, punched
        // before the entry says so.
        drop(tables);
        return Ok(DiscardMapping {
            len: n,
            action: DiscardAction::PunchHole {
                storage: img.data_id(),
                offset: base,
            },
            commit: Some(Commit::new(Publish::RawZero {
                guest: base,
                _claim: claim,
            })),
        });
    }
    img.set_l2(&mut tables, base, e, bitmap)?;
    img.release(&mut tables, c);
    drop(tables);
    drop(claim);
    img.flush_if_over_capacity()?;
    Ok(DiscardMapping {
        len: n,
        action: DiscardAction::Metadata,
        commit: None,
    })
}

/// Unallocates every cluster in `[from, to)` (cluster-aligned `from`),
/// for shrinking.
pub(super) fn unallocate(img: &Qcow2, from: u64, to: u64) -> Result<()> {
    let cs = img.cluster_size;
    let mut g = from;
    while g < to {
        let _claim = img.units.lock(g >> img.cluster_bits);
        let mut tables = img.tables_mut();
        let (c, _) = img.lookup_for_write(&mut tables, g)?;
        if c != Cluster::Unallocated {
            img.set_l2(&mut tables, g, 0, 0)?;
            img.release(&mut tables, c);
        }
        g += cs;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{mem_image, qcow2};
    use super::*;
    use crate::driver::{DriverOpenOptions, Mapping, StorageId};
    use crate::storage::{FileStorage, Storage};
    use crate::Image;
    use std::sync::Arc;

    fn read_all(mem: &crate::storage::MemStorage, len: usize) -> Vec<u8> {
        let img = Image::open_storage(Arc::new(mem.clone()), Some("qcow2"), true, None).unwrap();
        let mut b = vec![0u8; len];
        img.read(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn version_2_zero_writes_without_a_backing_image_deallocate_whole_clusters() {
        let (mem, img) = mem_image(1 << 20, &[("compat", "0.10")]);
        let q = qcow2(&img);
        img.write(&[0xaa; 3 << 16], 0).unwrap();
        let host = match q.lookup(&mut q.tables_mut(), 0).unwrap().0 {
            Cluster::Normal { host, .. } => host,
            other => panic!("{other:?}"),
        };
        img.write_zeroes(100, (2 << 16) - 100 + 10, false).unwrap();
        // Cluster 1 is covered whole: unallocated (no zero flag in v2).
        assert_eq!(
            q.lookup(&mut q.tables_mut(), 1 << 16).unwrap().0,
            Cluster::Unallocated
        );
        assert!(matches!(
            q.lookup(&mut q.tables_mut(), 0).unwrap().0,
            Cluster::Normal { .. }
        ));
        img.flush().unwrap();
        let rc = q.refcount(&mut q.tables_mut(), host / 65536 + 1).unwrap();
        assert_eq!(rc, 0, "the deallocated cluster is free");
        drop(img);
        let b = read_all(&mem, 3 << 16);
        assert!(b[..100].iter().all(|&x| x == 0xaa));
        assert!(b[100..(2 << 16) + 10].iter().all(|&x| x == 0));
        assert!(b[(2 << 16) + 10..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn extended_l2_zero_writes_turn_whole_subclusters_into_zero_subclusters() {
        let (mem, img) = mem_image(1 << 20, &[("extended_l2", "on")]);
        let q = qcow2(&img);
        img.write(&[0xaa; 1 << 16], 0).unwrap();
        // Subclusters are 2 KiB: 1000..11000 covers subclusters 1 to 4.
        img.write_zeroes(1000, 10000, false).unwrap();
        let (c, bitmap) = q.lookup(&mut q.tables_mut(), 0).unwrap();
        assert!(matches!(c, Cluster::Normal { .. }));
        let states: Vec<Sub> = (0..7).map(|i| entry::subcluster(bitmap, i)).collect();
        use Sub::{Data as D, Zero as Z};
        assert_eq!(states, [D, Z, Z, Z, Z, D, D]);
        let s = img.block_status(2048, 1 << 16).unwrap();
        assert_eq!((s.zero, s.len), (true, 4 * 2048));
        // An unallocated cluster gets zero subclusters without a host.
        img.write_zeroes((1 << 16) + 4096, 4096, false).unwrap();
        let (c, bitmap) = q.lookup(&mut q.tables_mut(), 1 << 16).unwrap();
        assert!(matches!(c, Cluster::Zero { host: None, .. }), "{c:?}");
        assert_eq!(entry::subcluster(bitmap, 2), Sub::Zero);
        assert_eq!(entry::subcluster(bitmap, 4), Sub::Unallocated);
        img.flush().unwrap();
        drop(img);
        let b = read_all(&mem, 1 << 17);
        assert!(b[..1000].iter().all(|&x| x == 0xaa));
        assert!(b[1000..11000].iter().all(|&x| x == 0));
        assert!(b[11000..1 << 16].iter().all(|&x| x == 0xaa));
        assert!(b[1 << 16..].iter().all(|&x| x == 0));
    }

    /// Creates a 1 MiB image at `path` with the raw external data file `data`.
    fn create_with_raw_data_file(
        path: &std::path::Path,
        data: &std::path::Path,
    ) -> Arc<dyn Storage> {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(path).unwrap());
        let mut opts = crate::CreateOptions {
            size: 1 << 20,
            ..Default::default()
        };
        opts.options
            .insert("data_file".into(), data.display().to_string());
        opts.options.insert("data_file_raw".into(), "on".into());
        super::super::create::create(storage.clone(), Some(path), &opts).unwrap();
        storage
    }

    /// Opens the image at `path` on `storage`, data file allowed.
    fn open_with_data_file(storage: Arc<dyn Storage>, path: &std::path::Path, ro: bool) -> Image {
        let opts = DriverOpenOptions {
            path: Some(path.to_path_buf()),
            policy: crate::FilePolicy::like_qemu_img(),
            ..DriverOpenOptions::new(ro)
        };
        Image::open_storage_with(storage, Some("qcow2"), &opts, None).unwrap()
    }

    #[test]
    fn a_raw_data_file_reads_like_the_disk_after_zero_writes_and_discards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        let data = dir.path().join("img.data");
        let storage = create_with_raw_data_file(&path, &data);
        let img = open_with_data_file(storage, &path, false);
        img.write(&[0x5a; 1 << 19], 0).unwrap();
        img.discard(1 << 16, 1 << 16).unwrap();
        img.write_zeroes(3 << 16, 1 << 16, false).unwrap();
        img.flush().unwrap();
        let raw = std::fs::read(&data).unwrap();
        assert_eq!(raw.len(), 1 << 20, "the raw data file has the disk's size");
        assert!(raw[..1 << 16].iter().all(|&x| x == 0x5a));
        assert!(raw[1 << 16..2 << 16].iter().all(|&x| x == 0), "discarded");
        assert!(raw[2 << 16..3 << 16].iter().all(|&x| x == 0x5a));
        assert!(raw[3 << 16..4 << 16].iter().all(|&x| x == 0), "zeroed");
        for g in [1u64 << 16, 3 << 16] {
            let s = img.block_status(g, 1 << 16).unwrap();
            assert!(s.zero && !s.data, "guest {g:#x}: {s:?}");
        }
    }

    #[test]
    fn raw_data_files_are_created_preallocated_so_every_cluster_maps_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.qcow2");
        let data = dir.path().join("p.data");
        let storage = create_with_raw_data_file(&path, &data);
        // Data written to the raw file by another program shows through.
        std::fs::write(&data, vec![0x6b; 1 << 20]).unwrap();
        let img = open_with_data_file(storage, &path, true);
        assert_eq!(
            img.driver().map(0, 1 << 20).unwrap(),
            (
                Mapping::Data {
                    storage: StorageId(1),
                    offset: 0
                },
                1 << 20
            )
        );
    }
}
