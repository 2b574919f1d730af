//! The qcow2 write path: in-place writes, cluster allocation with
//! copy-on-write, zero clusters, discard and resize.

use super::entry::{self, Cluster, Sub};
use super::{header, Meta, Qcow2};
use crate::driver::{IoCtx, Preallocation, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Qcow2 {
    /// Waits until no other request allocates guest cluster `gc`, then
    /// claims it. Returns a guard that releases the claim.
    pub(crate) fn claim(&self, gc: u64) -> Claim<'_> {
        let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while set.contains(&gc) {
            set = self
                .inflight_cv
                .wait(set)
                .unwrap_or_else(|e| e.into_inner());
        }
        set.insert(gc);
        Claim { q: self, gc }
    }

    fn check_writable(&self, m: &Meta) -> Result<()> {
        if m.corrupt {
            return Err(
                Error::new(ErrorKind::Corrupt, "the image is marked corrupt")
                    .with_condition(crate::error::Condition::MarkedCorrupt),
            );
        }
        if self.read_only.load(Ordering::Acquire) {
            return Err(Error::read_only("write"));
        }
        Ok(())
    }

    /// [`lookup`](Qcow2::lookup) for the write path: invalid metadata marks
    /// the image corrupt, which stops all further writes.
    fn lookup_for_write(&self, m: &mut Meta, guest: u64) -> Result<(Cluster, u64)> {
        self.lookup(m, guest).map_err(|e| match e.kind() {
            ErrorKind::Corrupt => self.mark_corrupt(m, e),
            _ => e,
        })
    }

    /// Makes room in the L2 cache and inserts a (dirty) table.
    fn insert_l2(&self, m: &mut Meta, off: u64, table: Box<[u8]>) -> Result<()> {
        if let Some((victim, dirty)) = m.l2.victim_if_full() {
            if dirty {
                self.flush_refcounts(m)?;
                self.sync_file()?;
                if let Some(t) = m.l2.peek(victim) {
                    self.file
                        .write_at(t, victim)
                        .map_err(|e| Error::io("writing an L2 table", e))?;
                }
            }
            m.l2.remove(victim);
        }
        m.l2.insert(off, table, true);
        Ok(())
    }

    /// The offset of a writable (refcount 1) L2 table for `guest`,
    /// allocating a new table or copying a shared one as needed.
    pub(crate) fn l2_for_write(&self, m: &mut Meta, guest: u64) -> Result<u64> {
        let (i1, _) = self.indices(guest);
        let cs = self.cluster_size;
        let Some(&e) = m.l1.get(i1) else {
            return Err(self.mark_corrupt(
                m,
                Error::corrupt(
                    "L1 table",
                    m.header.l1_table_offset,
                    "L1 table is too small for the virtual size",
                ),
            ));
        };
        let off = e & entry::L1_OFFSET_MASK;
        if off != 0 && e & entry::COPIED != 0 {
            return Ok(off);
        }
        let new = self.alloc_clusters(m, 1)?;
        let table = if off == 0 {
            vec![0u8; cs as usize].into_boxed_slice()
        } else {
            // Shared with a snapshot: copy it; the old one loses a reference.
            self.load_l2(m, off)?;
            let t: Box<[u8]> = m.l2.get(off).expect("loaded").into();
            m.pending_free.push((off, cs));
            t
        };
        self.insert_l2(m, new, table)?;
        m.l1[i1] = new | entry::COPIED;
        m.l1_dirty.insert(i1);
        Ok(new)
    }

    /// Sets the L2 entry of `guest` in a writable table.
    pub(crate) fn set_l2(&self, m: &mut Meta, guest: u64, e: u64, bitmap: u64) -> Result<()> {
        let off = self.l2_for_write(m, guest)?;
        self.load_l2(m, off)?;
        let (_, i2) = self.indices(guest);
        let table = m.l2.get_mut(off).expect("loaded");
        self.l2_set(table, i2, e, bitmap);
        Ok(())
    }

    /// Drops this image's reference to the host storage of cluster `c`.
    pub(crate) fn release(&self, m: &mut Meta, c: Cluster) {
        match c {
            Cluster::Compressed { host, len } => m.pending_free.push((host, len)),
            _ => {
                if let Some(h) = c.host_cluster() {
                    if Arc::ptr_eq(&self.file, &self.data) {
                        m.pending_free.push((h, self.cluster_size));
                    }
                }
            }
        }
    }

    /// A host cluster for new data of the guest cluster at `guest_base`.
    fn alloc_data(&self, m: &mut Meta, guest_base: u64) -> Result<u64> {
        if Arc::ptr_eq(&self.file, &self.data) {
            self.alloc_clusters(m, 1)
        } else {
            // External data files map guest offsets one to one.
            Ok(guest_base)
        }
    }

    /// Fills `out` with the old guest content of `[from, to)` (cluster-
    /// relative) of a cluster described by `c`/`bitmap`.
    fn old_content(
        &self,
        ctx: &IoCtx,
        c: Cluster,
        bitmap: u64,
        base: u64,
        from: u64,
        out: &mut [u8],
    ) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        match c {
            Cluster::Unallocated => ctx.read_backing(out, base + from),
            Cluster::Zero { .. } if !self.ext_l2 => {
                out.fill(0);
                Ok(())
            }
            Cluster::Compressed { .. } => {
                let mut whole = vec![0u8; self.cluster_size as usize];
                super::compress::read_compressed(self, &mut whole, base)?;
                out.copy_from_slice(&whole[from as usize..from as usize + out.len()]);
                Ok(())
            }
            Cluster::Normal { host, .. } if !self.ext_l2 => self
                .data
                .read_at(out, host + from)
                .map_err(|e| Error::io("reading cluster for copy-on-write", e)),
            _ => {
                // Extended L2: per subcluster.
                let sc = self.cluster_size / entry::SUBCLUSTERS as u64;
                let host = c.host_cluster();
                let mut pos = 0usize;
                while pos < out.len() {
                    let at = from + pos as u64;
                    let i = (at / sc) as u32;
                    let n = ((i as u64 + 1) * sc - at).min((out.len() - pos) as u64) as usize;
                    let part = &mut out[pos..pos + n];
                    match (entry::subcluster(bitmap, i), host) {
                        (Sub::Data, Some(h)) => self
                            .data
                            .read_at(part, h + at)
                            .map_err(|e| Error::io("reading subcluster for copy-on-write", e))?,
                        (Sub::Zero, _) | (Sub::Data, None) => part.fill(0),
                        (Sub::Unallocated, _) => ctx.read_backing(part, base + at)?,
                    }
                    pos += n;
                }
                Ok(())
            }
        }
    }
}

/// A claimed guest cluster; dropping releases it.
pub(crate) struct Claim<'a> {
    q: &'a Qcow2,
    gc: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = self.q.inflight.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.gc);
        self.q.inflight_cv.notify_all();
    }
}

/// True when the subclusters covering `[from, to)` are all data.
fn subclusters_all_data(bitmap: u64, sc: u64, from: u64, to: u64) -> bool {
    let first = (from / sc) as u32;
    let last = to.div_ceil(sc) as u32;
    (first..last).all(|i| entry::subcluster(bitmap, i) == Sub::Data)
}

/// Writes `buf` at guest `offset`.
pub(super) fn write(q: &Qcow2, ctx: &IoCtx, buf: &[u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        done += write_step(q, ctx, &buf[done..], offset + done as u64)?;
    }
    Ok(())
}

/// Writes as much as one step can from the start of `buf`; returns bytes done.
fn write_step(q: &Qcow2, ctx: &IoCtx, buf: &[u8], pos: u64) -> Result<usize> {
    let cs = q.cluster_size;
    let sc = cs / entry::SUBCLUSTERS as u64;
    let in_cluster = pos & (cs - 1);
    let first_len = (buf.len() as u64).min(cs - in_cluster);
    {
        let mut m = q.lock();
        q.check_writable(&m)?;
        let (c, bitmap) = q.lookup_for_write(&mut m, pos)?;
        if let Cluster::Normal { host, copied: true } = c {
            if !q.ext_l2 || subclusters_all_data(bitmap, sc, in_cluster, in_cluster + first_len) {
                // In place; extend over following host-contiguous clusters.
                let mut len = first_len;
                while len < buf.len() as u64 {
                    let next = pos + len;
                    let n = (buf.len() as u64 - len).min(cs);
                    match q.lookup_for_write(&mut m, next)? {
                        (
                            Cluster::Normal {
                                host: h,
                                copied: true,
                            },
                            b,
                        ) if h == host + in_cluster + len
                            && (!q.ext_l2 || subclusters_all_data(b, sc, 0, n)) =>
                        {
                            len += n
                        }
                        _ => break,
                    }
                }
                // The gate keeps the cluster from being freed and reused
                // until this write is done.
                let _gate = q.io_gate.read().unwrap_or_else(|e| e.into_inner());
                drop(m);
                q.data
                    .write_at(&buf[..len as usize], host + in_cluster)
                    .map_err(|e| Error::io("writing guest data", e))?;
                return Ok(len as usize);
            }
        }
    }
    let _claim = q.claim(pos >> q.cluster_bits);
    allocate_write(q, ctx, &buf[..first_len as usize], pos)?;
    Ok(first_len as usize)
}

/// Writes `data` (inside one cluster) where the cluster needs new storage
/// or subcluster allocation. The caller holds the cluster's claim.
fn allocate_write(q: &Qcow2, ctx: &IoCtx, data: &[u8], pos: u64) -> Result<()> {
    let cs = q.cluster_size;
    let sc = cs / entry::SUBCLUSTERS as u64;
    let in_cluster = pos & (cs - 1);
    let base = pos - in_cluster;
    let end_in = in_cluster + data.len() as u64;
    let mut m = q.lock();
    q.check_writable(&m)?;
    // The L2 table first (it may need allocating): tables then sit before
    // the data they map, as QEMU lays them out, and a failure here leaves
    // nothing half done.
    q.l2_for_write(&mut m, pos)?;
    let (c, bitmap) = q.lookup_for_write(&mut m, pos)?;
    // Where to write, which cluster-relative range, and whether the old
    // host storage is dropped.
    let (host, from, to, drop_old) = match c {
        Cluster::Normal { host, copied: true } => {
            if !q.ext_l2 || subclusters_all_data(bitmap, sc, in_cluster, end_in) {
                let _gate = q.io_gate.read().unwrap_or_else(|e| e.into_inner());
                drop(m);
                return q
                    .data
                    .write_at(data, host + in_cluster)
                    .map_err(|e| Error::io("writing guest data", e));
            }
            // Allocated cluster with unallocated or zero subclusters.
            (host, in_cluster / sc * sc, end_in.div_ceil(sc) * sc, false)
        }
        Cluster::Zero {
            host: Some(h),
            copied: true,
        } if !q.ext_l2 => (h, 0, cs, false),
        Cluster::Unallocated | Cluster::Zero { host: None, .. } if q.ext_l2 => {
            let h = q.alloc_data(&mut m, base)?;
            (h, in_cluster / sc * sc, end_in.div_ceil(sc) * sc, false)
        }
        _ => (q.alloc_data(&mut m, base)?, 0, cs, true),
    };
    drop(m);

    let head = (in_cluster - from) as usize;
    let tail = (to - end_in) as usize;
    if head == 0 && tail == 0 {
        q.data
            .write_at(data, host + from)
            .map_err(|e| Error::io("writing guest data", e))?;
    } else {
        let mut b = vec![0u8; (to - from) as usize];
        q.old_content(ctx, c, bitmap, base, from, &mut b[..head])?;
        let tail_start = b.len() - tail;
        q.old_content(ctx, c, bitmap, base, end_in, &mut b[tail_start..])?;
        b[head..head + data.len()].copy_from_slice(data);
        q.data
            .write_at(&b, host + from)
            .map_err(|e| Error::io("writing guest data", e))?;
    }

    let mut m = q.lock();
    let new_bitmap = if q.ext_l2 {
        let old =
            if drop_old && c.host_cluster().is_some() || matches!(c, Cluster::Compressed { .. }) {
                entry::ALL_ALLOC
            } else {
                bitmap
            };
        entry::set_subclusters(old, (from / sc) as u32, (to / sc) as u32, Sub::Data)
    } else {
        0
    };
    q.set_l2(&mut m, pos, host | entry::COPIED, new_bitmap)?;
    if drop_old {
        q.release(&mut m, c);
    }
    Ok(())
}

/// Makes `[offset, offset+len)` read as zeroes.
pub(super) fn write_zeroes(
    q: &Qcow2,
    ctx: &IoCtx,
    offset: u64,
    len: u64,
    flags: ZeroFlags,
) -> Result<()> {
    let cs = q.cluster_size;
    let (raw_data, has_backing) = {
        let m = q.lock();
        (m.header.data_file_raw(), m.header.backing_file.is_some())
    };
    if !q.v3 && has_backing {
        // No zero flag in version 2, and unallocated clusters would show
        // the backing image: write real zeroes.
        return write_zero_bytes(q, ctx, offset, len);
    }
    let end = offset + len;
    let first_full = offset.div_ceil(cs) * cs;
    let last_full = (end / cs * cs).max(first_full);
    let size = q.size.load(Ordering::Acquire);
    // A partial last cluster of the disk counts as full.
    let last_full = if end == size && !size.is_multiple_of(cs) && end > first_full {
        end
    } else {
        last_full
    };
    let partial = |from: u64, to: u64| {
        if q.ext_l2 && !raw_data {
            zero_subclusters(q, ctx, from, to)
        } else {
            write_zero_bytes(q, ctx, from, to - from)
        }
    };
    if first_full >= last_full {
        return partial(offset, end);
    }
    partial(offset, first_full)?;
    let mut g = first_full;
    while g < last_full {
        let _claim = q.claim(g >> q.cluster_bits);
        let mut m = q.lock();
        q.check_writable(&m)?;
        let (c, _) = q.lookup_for_write(&mut m, g)?;
        if !q.v3 {
            // Version 2 without a backing image: an unallocated cluster
            // reads as zeroes.
            if c != Cluster::Unallocated {
                q.set_l2(&mut m, g, 0, 0)?;
                q.release(&mut m, c);
            }
            g += cs;
            continue;
        }
        if raw_data {
            // The data file must stay a valid raw image: zero the cluster
            // there too, and keep it mapped at its fixed place.
            let n = cs.min(size - g);
            q.data
                .zero_range(g, n, flags.may_unmap)
                .map_err(|e| Error::io("zeroing the raw data file", e))?;
            let (e, bitmap) = if q.ext_l2 {
                (g | entry::COPIED, entry::ALL_ZERO)
            } else {
                (g | entry::COPIED | entry::ZERO, 0)
            };
            q.set_l2(&mut m, g, e, bitmap)?;
            g += cs;
            continue;
        }
        let keep = !flags.may_unmap
            && matches!(
                c,
                Cluster::Normal { copied: true, .. }
                    | Cluster::Zero {
                        copied: true,
                        host: Some(_)
                    }
            );
        let (e, bitmap) = match (keep, c.host_cluster(), q.ext_l2) {
            (true, Some(h), false) => (h | entry::COPIED | entry::ZERO, 0),
            (true, Some(h), true) => (h | entry::COPIED, entry::ALL_ZERO),
            (_, _, false) => (entry::ZERO, 0),
            (_, _, true) => (0, entry::ALL_ZERO),
        };
        q.set_l2(&mut m, g, e, bitmap)?;
        if !keep {
            q.release(&mut m, c);
        }
        g += cs;
    }
    let tail_from = last_full.min(end);
    partial(tail_from, end)
}

/// Zeroes `[from, to)` of an image with extended L2 entries, where the
/// range covers no whole cluster: whole subclusters become zero
/// subclusters (QEMU does the same), the unaligned rest gets zero bytes.
fn zero_subclusters(q: &Qcow2, ctx: &IoCtx, from: u64, to: u64) -> Result<()> {
    let cs = q.cluster_size;
    let sc = cs / entry::SUBCLUSTERS as u64;
    let mut pos = from;
    while pos < to {
        let base = pos & !(cs - 1);
        let stop = to.min(base + cs);
        let (a, b) = (pos.div_ceil(sc) * sc, stop / sc * sc);
        if a >= b {
            write_zero_bytes(q, ctx, pos, stop - pos)?;
            pos = stop;
            continue;
        }
        write_zero_bytes(q, ctx, pos, a - pos)?;
        let done = {
            let _claim = q.claim(base >> q.cluster_bits);
            let mut m = q.lock();
            q.check_writable(&m)?;
            let (c, bitmap) = q.lookup_for_write(&mut m, base)?;
            let (first, last) = (((a - base) / sc) as u32, ((b - base) / sc) as u32);
            let host = match c {
                Cluster::Normal { host, copied: true } => Some(host | entry::COPIED),
                Cluster::Unallocated | Cluster::Zero { host: None, .. } => Some(0),
                // Shared or compressed: rewrite the data instead.
                _ => None,
            };
            if let Some(e) = host {
                let bitmap = entry::set_subclusters(bitmap, first, last, Sub::Zero);
                q.set_l2(&mut m, base, e, bitmap)?;
            }
            host.is_some()
        };
        if !done {
            write_zero_bytes(q, ctx, a, b - a)?;
        }
        write_zero_bytes(q, ctx, b, stop - b)?;
        pos = stop;
    }
    Ok(())
}

fn write_zero_bytes(q: &Qcow2, ctx: &IoCtx, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let chunk = (1u64 << 20).min(len) as usize;
    let zeros = vec![0u8; chunk];
    let mut done = 0;
    while done < len {
        let n = (chunk as u64).min(len - done) as usize;
        write(q, ctx, &zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Frees whole clusters in `[offset, offset+len)`; they then read as
/// zeroes (version 3) or from the backing image (version 2).
pub(super) fn discard(q: &Qcow2, offset: u64, len: u64) -> Result<()> {
    let cs = q.cluster_size;
    let (raw_data, has_backing) = {
        let m = q.lock();
        (m.header.data_file_raw(), m.header.backing_file.is_some())
    };
    let size = q.size.load(Ordering::Acquire);
    let end = offset + len;
    let mut g = offset.div_ceil(cs) * cs;
    let stop = if end == size { end } else { end / cs * cs };
    while g < stop {
        let _claim = q.claim(g >> q.cluster_bits);
        let mut m = q.lock();
        q.check_writable(&m)?;
        let (c, _) = q.lookup_for_write(&mut m, g)?;
        if c == Cluster::Unallocated && !has_backing {
            g += cs;
            continue;
        }
        if raw_data {
            // The data file must stay a valid raw image that reads like the
            // guest disk: the discarded range reads as zeroes there too.
            q.data
                .punch_hole(g, cs.min(size - g))
                .map_err(|e| Error::io("discarding in the raw data file", e))?;
        }
        let (e, bitmap) = match (q.v3, q.ext_l2) {
            (true, false) => (entry::ZERO, 0),
            (true, true) => (0, entry::ALL_ZERO),
            _ => (0, 0),
        };
        q.set_l2(&mut m, g, e, bitmap)?;
        q.release(&mut m, c);
        g += cs;
    }
    Ok(())
}

/// Changes the virtual size.
pub(super) fn resize(
    q: &Qcow2,
    _ctx: &IoCtx,
    new_size: u64,
    prealloc: Preallocation,
) -> Result<()> {
    if prealloc != Preallocation::Off {
        return Err(Error::unsupported(
            "qcow2 resize supports only preallocation=off",
        ));
    }
    if new_size > header::MAX_VIRTUAL_SIZE {
        return Err(Error::invalid_argument("new size is too large for qcow2"));
    }
    let cs = q.cluster_size;
    let old = q.size.load(Ordering::Acquire);
    if new_size < old {
        // Free everything past the new end (whole clusters).
        let from = new_size.div_ceil(cs) * cs;
        if from < old {
            discard_all(q, from, old)?;
        }
    }
    let mut m = q.lock();
    q.check_writable(&m)?;
    q.flush_meta(&mut m)?;
    let per_l1 = cs * q.l2_entries;
    let need = new_size.div_ceil(per_l1);
    if need > m.l1.len() as u64 {
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Error::invalid_argument(
                "new size needs an L1 table larger than 32 MiB",
            ));
        }
        let clusters = (need * 8).div_ceil(cs);
        let new_off = q.alloc_clusters(&mut m, clusters)?;
        let mut l1 = m.l1.clone();
        l1.resize(need as usize, 0);
        let mut bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((clusters * cs) as usize, 0);
        q.flush_refcounts(&mut m)?;
        q.file
            .write_at(&bytes, new_off)
            .map_err(|e| Error::io("writing the new L1 table", e))?;
        q.sync_file()?;
        let old_off = m.header.l1_table_offset;
        let old_bytes = m.l1.len() as u64 * 8;
        m.header.l1_table_offset = new_off;
        m.header.l1_size = need as u32;
        m.header.size = new_size;
        q.write_header(&m)?;
        q.sync_file()?;
        m.l1 = l1;
        if old_bytes > 0 {
            m.pending_free.push((old_off, old_bytes.div_ceil(cs) * cs));
        }
    } else {
        m.header.size = new_size;
        q.write_header(&m)?;
        q.sync_file()?;
    }
    q.size.store(new_size, Ordering::Release);
    if q.external_data {
        // The data file follows the disk size, as at creation.
        q.data
            .set_len(new_size)
            .map_err(|e| Error::io("resizing the data file", e))?;
        if m.header.data_file_raw() && new_size > old {
            // Every new guest cluster maps to its place in the raw data
            // file, as in a new image.
            let bitmap = if q.ext_l2 { entry::ALL_ALLOC } else { 0 };
            let mut g = old.div_ceil(cs) * cs;
            while g < new_size {
                if q.lookup_for_write(&mut m, g)?.0 == Cluster::Unallocated {
                    q.set_l2(&mut m, g, g | entry::COPIED, bitmap)?;
                }
                g += cs;
            }
            q.flush_meta(&mut m)?;
        }
    }
    Ok(())
}

/// Unallocates every cluster in `[from, to)` (cluster-aligned `from`).
fn discard_all(q: &Qcow2, from: u64, to: u64) -> Result<()> {
    let cs = q.cluster_size;
    let mut g = from;
    while g < to {
        let _claim = q.claim(g >> q.cluster_bits);
        let mut m = q.lock();
        let (c, _) = q.lookup_for_write(&mut m, g)?;
        if c != Cluster::Unallocated {
            q.set_l2(&mut m, g, 0, 0)?;
            q.release(&mut m, c);
        }
        g += cs;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::mem_image;
    use super::*;
    use crate::driver::{Driver, Mapping};
    use crate::storage::{FileStorage, Storage};
    use crate::Image;

    fn read_all(mem: &crate::storage::MemStorage, len: usize) -> Vec<u8> {
        let img = Image::open_storage(Arc::new(mem.clone()), Some("qcow2"), true, None).unwrap();
        let mut b = vec![0u8; len];
        img.read(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn version_2_zero_writes_without_a_backing_image_deallocate_whole_clusters() {
        let (mem, q) = mem_image(1 << 20, &[("compat", "0.10")]);
        let ctx = IoCtx::none();
        q.write(&ctx, &[0xaa; 3 << 16], 0).unwrap();
        let host = match q.lookup(&mut q.lock(), 0).unwrap().0 {
            Cluster::Normal { host, .. } => host,
            other => panic!("{other:?}"),
        };
        q.write_zeroes(&ctx, 100, (2 << 16) - 100 + 10, ZeroFlags::default())
            .unwrap();
        // Cluster 1 is covered whole: unallocated (no zero flag in v2).
        assert_eq!(
            q.lookup(&mut q.lock(), 1 << 16).unwrap().0,
            Cluster::Unallocated
        );
        assert!(matches!(
            q.lookup(&mut q.lock(), 0).unwrap().0,
            Cluster::Normal { .. }
        ));
        q.flush().unwrap();
        let rc = q.refcount(&mut q.lock(), host / 65536 + 1).unwrap();
        assert_eq!(rc, 0, "the deallocated cluster is free");
        drop(q);
        let b = read_all(&mem, 3 << 16);
        assert!(b[..100].iter().all(|&x| x == 0xaa));
        assert!(b[100..(2 << 16) + 10].iter().all(|&x| x == 0));
        assert!(b[(2 << 16) + 10..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn extended_l2_zero_writes_turn_whole_subclusters_into_zero_subclusters() {
        let (mem, q) = mem_image(1 << 20, &[("extended_l2", "on")]);
        let ctx = IoCtx::none();
        q.write(&ctx, &[0xaa; 1 << 16], 0).unwrap();
        // Subclusters are 2 KiB: 1000..11000 covers subclusters 1 to 4.
        q.write_zeroes(&ctx, 1000, 10000, ZeroFlags::default())
            .unwrap();
        let (c, bitmap) = q.lookup(&mut q.lock(), 0).unwrap();
        assert!(matches!(c, Cluster::Normal { .. }));
        let states: Vec<Sub> = (0..7).map(|i| entry::subcluster(bitmap, i)).collect();
        use Sub::{Data as D, Zero as Z};
        assert_eq!(states, [D, Z, Z, Z, Z, D, D]);
        let s = q.block_status(2048, 1 << 16).unwrap();
        assert_eq!((s.zero, s.len), (true, 4 * 2048));
        // An unallocated cluster gets zero subclusters without a host.
        q.write_zeroes(&ctx, (1 << 16) + 4096, 4096, ZeroFlags::default())
            .unwrap();
        let (c, bitmap) = q.lookup(&mut q.lock(), 1 << 16).unwrap();
        assert!(matches!(c, Cluster::Zero { host: None, .. }), "{c:?}");
        assert_eq!(entry::subcluster(bitmap, 2), Sub::Zero);
        assert_eq!(entry::subcluster(bitmap, 4), Sub::Unallocated);
        q.flush().unwrap();
        drop(q);
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

    #[test]
    fn a_raw_data_file_reads_like_the_disk_after_zero_writes_and_discards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        let data = dir.path().join("img.data");
        let storage = create_with_raw_data_file(&path, &data);
        let q = Qcow2::open(
            storage,
            &crate::driver::DriverOpenOptions::default(),
            Some(dir.path()),
        )
        .unwrap();
        let ctx = IoCtx::none();
        q.write(&ctx, &[0x5a; 1 << 19], 0).unwrap();
        q.discard(1 << 16, 1 << 16).unwrap();
        q.write_zeroes(&ctx, 3 << 16, 1 << 16, ZeroFlags::default())
            .unwrap();
        q.flush().unwrap();
        let raw = std::fs::read(&data).unwrap();
        assert_eq!(raw.len(), 1 << 20, "the raw data file has the disk's size");
        assert!(raw[..1 << 16].iter().all(|&x| x == 0x5a));
        assert!(raw[1 << 16..2 << 16].iter().all(|&x| x == 0), "discarded");
        assert!(raw[2 << 16..3 << 16].iter().all(|&x| x == 0x5a));
        assert!(raw[3 << 16..4 << 16].iter().all(|&x| x == 0), "zeroed");
        for g in [1u64 << 16, 3 << 16] {
            let s = q.block_status(g, 1 << 16).unwrap();
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
        let q = Qcow2::open(
            storage,
            &crate::driver::DriverOpenOptions {
                read_only: true,
                ..Default::default()
            },
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(
            q.map(0, 1 << 20).unwrap(),
            (Mapping::Data { host_offset: 0 }, 1 << 20)
        );
    }
}
