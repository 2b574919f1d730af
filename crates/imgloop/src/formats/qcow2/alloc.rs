//! Refcounts and cluster allocation.
//!
//! A refcount block covers `cluster_size * 8 / refcount_bits` clusters. When
//! allocation reaches a range whose block does not exist yet, the new block
//! is placed at the first cluster of that range, so it covers itself; when
//! the refcount table is full, a larger table is placed right after that
//! block, inside the same range, and the header switched to it.

use super::tables::PendingFree;
use super::{Qcow2, Tables};
use crate::error::{Error, ErrorKind, Result};

/// One past the largest host offset an L2 entry can hold (bits 9-55).
const MAX_HOST_OFFSET: u64 = 1 << 56;

impl Qcow2 {
    /// Clusters covered by one refcount block.
    pub(crate) fn rc_per_block(&self, tables: &Tables) -> u64 {
        self.cluster_size * 8 / tables.header.refcount_bits() as u64
    }

    pub(crate) fn rc_max(&self, tables: &Tables) -> u64 {
        let bits = tables.header.refcount_bits();
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    pub(crate) fn load_rc_block(&self, tables: &mut Tables, off: u64) -> Result<()> {
        if tables.rc.contains(off) {
            return Ok(());
        }
        let b = self.read_cluster(off, "refcount block")?;
        tables.rc.insert(off, b, false);
        Ok(())
    }

    /// Reads entry `i` of a refcount block.
    pub(crate) fn rc_entry(block: &[u8], i: u64, bits: u32) -> u64 {
        match bits {
            64 => u64::from_be_bytes(block[i as usize * 8..][..8].try_into().expect("8")),
            32 => u32::from_be_bytes(block[i as usize * 4..][..4].try_into().expect("4")) as u64,
            16 => u16::from_be_bytes(block[i as usize * 2..][..2].try_into().expect("2")) as u64,
            8 => block[i as usize] as u64,
            _ => {
                let per_byte = 8 / bits as u64;
                let byte = block[(i / per_byte) as usize];
                let shift = (i % per_byte) * bits as u64;
                ((byte >> shift) as u64) & ((1 << bits) - 1)
            }
        }
    }

    /// Writes entry `i` of a refcount block.
    pub(crate) fn set_rc_entry(block: &mut [u8], i: u64, bits: u32, v: u64) {
        match bits {
            64 => block[i as usize * 8..][..8].copy_from_slice(&v.to_be_bytes()),
            32 => block[i as usize * 4..][..4].copy_from_slice(&(v as u32).to_be_bytes()),
            16 => block[i as usize * 2..][..2].copy_from_slice(&(v as u16).to_be_bytes()),
            8 => block[i as usize] = v as u8,
            _ => {
                let per_byte = 8 / bits as u64;
                let idx = (i / per_byte) as usize;
                let shift = (i % per_byte) * bits as u64;
                let mask = (((1u16 << bits) - 1) as u8) << shift;
                block[idx] = (block[idx] & !mask) | (((v as u8) << shift) & mask);
            }
        }
    }

    /// Refcount of host cluster `c` (0 where no block covers it).
    pub(crate) fn refcount(&self, tables: &mut Tables, c: u64) -> Result<u64> {
        let per = self.rc_per_block(tables);
        let b = (c / per) as usize;
        let Some(&off) = tables.rc_table.get(b) else {
            return Ok(0);
        };
        if off == 0 {
            return Ok(0);
        }
        self.load_rc_block(tables, off)?;
        let bits = tables.header.refcount_bits();
        Ok(Self::rc_entry(
            tables.rc.get(off).expect("loaded"),
            c % per,
            bits,
        ))
    }

    /// Sets the refcount of host cluster `c`, creating its block if needed.
    pub(crate) fn set_refcount(&self, tables: &mut Tables, c: u64, v: u64) -> Result<()> {
        if v > self.rc_max(tables) {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "refcount overflow for cluster {c} ({}-bit refcounts)",
                    tables.header.refcount_bits()
                ),
            ));
        }
        let per = self.rc_per_block(tables);
        let b = c / per;
        let off = self.ensure_block(tables, b)?;
        self.load_rc_block(tables, off)?;
        let bits = tables.header.refcount_bits();
        let block = tables.rc.get_mut(off).expect("loaded");
        Self::set_rc_entry(block, c % per, bits, v);
        if v == 0 && c < tables.free_hint {
            tables.free_hint = c;
        }
        Ok(())
    }

    /// The offset of refcount block `b`, creating it (and growing the
    /// refcount table) when it does not exist.
    fn ensure_block(&self, tables: &mut Tables, b: u64) -> Result<u64> {
        if let Some(&off) = tables.rc_table.get(b as usize) {
            if off != 0 {
                return Ok(off);
            }
        }
        let cs = self.cluster_size;
        let per = self.rc_per_block(tables);
        let block_off = b
            .checked_mul(per)
            .and_then(|first| first.checked_mul(cs))
            .filter(|&o| o < MAX_HOST_OFFSET)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NoSpace,
                    "the image cannot grow past 64 PiB (the largest host offset qcow2 entries hold)",
                )
            })?;
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        let bits = tables.header.refcount_bits();
        Self::set_rc_entry(&mut block, 0, bits, 1);
        if b as usize >= tables.rc_table.len() {
            // Grow the table: place it right after the new block, in the
            // same range, so the new block covers it.
            let need_entries = (b + 1).max(tables.rc_table.len() as u64 * 2);
            let clusters = (need_entries * 8).div_ceil(cs);
            if clusters + 1 > per {
                return Err(Error::unsupported(
                    "refcount table growth at this cluster size and refcount width",
                ));
            }
            if clusters * cs > super::header::MAX_REFTABLE_BYTES {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "refcount table would exceed 8 MiB",
                ));
            }
            let table_off = block_off + cs;
            for k in 0..clusters {
                Self::set_rc_entry(&mut block, 1 + k, bits, 1);
            }
            let mut table = tables.rc_table.clone();
            table.resize((clusters * cs / 8) as usize, 0);
            table[b as usize] = block_off;
            // New block and table first, durable, then the header that
            // points to them. The new table also points at blocks that are
            // dirty in the cache (and entries not yet written): their
            // current content goes to disk too, so the table never names a
            // block that is not there. (They stay dirty for the flush; a
            // flush copy older than these writes is consistent with the L2
            // tables that flush writes.)
            self.file()
                .write_at(&block, block_off)
                .map_err(|e| Error::io("writing a refcount block", e))?;
            for (off, _, data) in tables.rc.dirty_copies() {
                self.file().write_at(&data, off).map_err(|e| {
                    Error::io("writing a refcount block", e).at("refcount block", off)
                })?;
            }
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file()
                .write_at(&bytes, table_off)
                .map_err(|e| Error::io("writing the refcount table", e))?;
            self.sync_file()?;
            let old_off = tables.header.refcount_table_offset;
            let old_clusters = tables.header.refcount_table_clusters as u64;
            tables.header.refcount_table_offset = table_off;
            tables.header.refcount_table_clusters = clusters as u32;
            self.write_header(tables)?;
            self.sync_file()?;
            tables.rc_table = table;
            tables.rc_table_dirty.clear();
            tables.rc.insert(block_off, block, false);
            self.release_range(tables, old_off, old_clusters * cs);
            return Ok(block_off);
        }
        // A new block in the cache; the flush writes it, syncs, and only
        // then the table entry that points to it (no I/O here).
        tables.rc_table[b as usize] = block_off;
        tables.rc_table_dirty.insert(b as usize);
        tables.rc.insert(block_off, block, true);
        Ok(block_off)
    }

    /// Allocates `n` contiguous clusters (refcount 1) and returns the byte
    /// offset of the first.
    pub(crate) fn alloc_clusters(&self, tables: &mut Tables, n: u64) -> Result<u64> {
        let per = self.rc_per_block(tables);
        let mut start = tables.free_hint;
        let mut first_free = None;
        let mut run = 0u64;
        let mut c = start;
        while run < n {
            let b = c / per;
            let exists = tables.rc_table.get(b as usize).is_some_and(|&o| o != 0);
            if !exists {
                // Creating the block takes the range's first cluster(s).
                self.ensure_block(tables, b)?;
            }
            if self.refcount(tables, c)? == 0 {
                if run == 0 {
                    start = c;
                }
                first_free.get_or_insert(c);
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        // Host offsets must fit the 56-bit offset fields of L1/L2 entries.
        let end = start
            .checked_add(n)
            .and_then(|e| e.checked_mul(self.cluster_size))
            .filter(|&e| e <= MAX_HOST_OFFSET);
        if end.is_none() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the image cannot grow past 64 PiB (the largest host offset qcow2 entries hold)",
            ));
        }
        for k in 0..n {
            self.set_refcount(tables, start + k, 1)?;
        }
        // Everything below the first free cluster seen is in use; when the
        // run starts there, the clusters it takes are too.
        tables.free_hint = match first_free {
            Some(f) if f < start => f,
            _ => start + n,
        };
        Ok(start * self.cluster_size)
    }

    /// Allocates `len` bytes (less than a cluster) for a compressed
    /// stream and returns the byte offset. Streams are packed byte by
    /// byte: one that does not fit in the rest of the last cluster used
    /// continues into the next cluster when that is the one allocated
    /// next, as the specification allows and QEMU packs them. Every
    /// cluster a stream touches holds one reference for it.
    pub(crate) fn alloc_bytes(&self, tables: &mut Tables, len: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let tail = tables.compressed_tail;
        if tail != 0 && !tail.is_multiple_of(cs) {
            let c = tail / cs;
            let r = self.refcount(tables, c)?;
            if r < self.rc_max(tables) {
                let room = cs - tail % cs;
                if len <= room {
                    self.set_refcount(tables, c, r + 1)?;
                    tables.compressed_tail = tail + len;
                    return Ok(tail);
                }
                let next = self.alloc_clusters(tables, 1)?;
                if next == (c + 1) * cs {
                    // Contiguous: the stream spans both clusters.
                    self.set_refcount(tables, c, r + 1)?;
                    tables.compressed_tail = tail + len;
                    return Ok(tail);
                }
                tables.compressed_tail = next + len;
                return Ok(next);
            }
        }
        let off = self.alloc_clusters(tables, 1)?;
        tables.compressed_tail = off + len;
        Ok(off)
    }

    /// Records that the reference to `[offset, offset + len)` is gone
    /// (after the metadata change that dropped it): the refcounts drop at
    /// a later flush, see [`PendingFree`].
    pub(crate) fn release_range(&self, tables: &mut Tables, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        tables.pending_free.push(PendingFree {
            offset,
            len,
            tag: self.state.requests().tag(),
        });
    }

    /// Drops one reference to every cluster overlapping each of the first
    /// `count` pending frees that no request in flight can still see;
    /// clusters reaching refcount 0 are punched out of the file. The
    /// others stay pending for a later flush.
    pub(crate) fn apply_pending_frees(&self, tables: &mut Tables, count: usize) -> Result<()> {
        let cs = self.cluster_size;
        let count = count.min(tables.pending_free.len());
        let now: Vec<PendingFree> = tables.pending_free.drain(..count).collect();
        let mut later = Vec::new();
        for f in now {
            if !self.state.requests().is_safe(f.tag) {
                later.push(f);
                continue;
            }
            let first = f.offset / cs;
            let last = (f.offset + f.len - 1) / cs;
            for c in first..=last {
                let r = self.refcount(tables, c)?;
                if r == 0 {
                    // Already free: metadata was inconsistent. Leave it.
                    continue;
                }
                self.set_refcount(tables, c, r - 1)?;
                if r == 1 {
                    if tables.compressed_tail / cs == c {
                        tables.compressed_tail = 0;
                    }
                    let _ = self.file().punch_hole(c * cs, cs);
                }
            }
        }
        // Kept in front, in their order: they are older than anything
        // released since.
        tables.pending_free.splice(0..0, later);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width_round_trip() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as u64;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for i in 0..n {
                Qcow2::set_rc_entry(&mut block, i, bits, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    Qcow2::rc_entry(&block, i, bits),
                    (i * 7) & max,
                    "bits {bits} entry {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_refcounts_fill_bytes_from_the_low_bits() {
        let mut block = vec![0u8; 1];
        Qcow2::set_rc_entry(&mut block, 0, 1, 1);
        assert_eq!(block[0], 0b0000_0001);
        Qcow2::set_rc_entry(&mut block, 3, 2, 2);
        assert_eq!(block[0], 0b1000_0001);
    }
}

#[cfg(test)]
mod alloc_tests {
    use super::super::testutil::{mem_image, qcow2};

    #[test]
    fn allocations_continue_after_the_last_one_without_rescanning() {
        let (_mem, img) = mem_image(1 << 20, &[("cluster_size", "512")]);
        let q = qcow2(&img);
        let mut tables = q.tables_mut();
        let first = q.alloc_clusters(&mut tables, 1).unwrap();
        for k in 1..2000u64 {
            let off = q.alloc_clusters(&mut tables, 1).unwrap();
            // Contiguous, except where a new refcount block takes a cluster.
            assert!(
                off > first + (k - 1) * 512,
                "allocation {k} went back to {off}"
            );
            // The hint sits right after the last allocation: the next
            // search starts there instead of at cluster 0.
            assert_eq!(tables.free_hint, off / 512 + 1, "allocation {k}");
        }
    }

    #[test]
    fn a_freed_cluster_is_reused_and_runs_skip_holes_that_are_too_small() {
        let (_mem, img) = mem_image(1 << 20, &[("cluster_size", "512")]);
        let q = qcow2(&img);
        let mut tables = q.tables_mut();
        let a = q.alloc_clusters(&mut tables, 1).unwrap() / 512;
        let b = q.alloc_clusters(&mut tables, 1).unwrap() / 512;
        let c = q.alloc_clusters(&mut tables, 1).unwrap() / 512;
        assert_eq!((b, c), (a + 1, a + 2));
        q.set_refcount(&mut tables, b, 0).unwrap();
        assert_eq!(tables.free_hint, b);
        // Two clusters do not fit in the hole: they go after c, and the
        // hole stays where the next search starts.
        let run = q.alloc_clusters(&mut tables, 2).unwrap() / 512;
        assert_eq!(run, c + 1);
        assert_eq!(tables.free_hint, b);
        assert_eq!(q.alloc_clusters(&mut tables, 1).unwrap() / 512, b);
        assert_eq!(q.alloc_clusters(&mut tables, 1).unwrap() / 512, c + 3);
    }
}

#[cfg(test)]
mod compressed_alloc_tests {
    use super::super::testutil::{mem_image, qcow2};

    #[test]
    fn compressed_streams_continue_into_the_next_cluster_when_it_is_contiguous() {
        let (_mem, img) = mem_image(1 << 20, &[("cluster_size", "512")]);
        let q = qcow2(&img);
        let mut tables = q.tables_mut();
        let a = q.alloc_bytes(&mut tables, 300).unwrap();
        let b = q.alloc_bytes(&mut tables, 300).unwrap();
        // The second stream starts right after the first and spans into
        // the next cluster: both clusters hold a reference for it.
        assert_eq!(b, a + 300);
        let c0 = a / 512;
        assert_eq!(q.refcount(&mut tables, c0).unwrap(), 2);
        assert_eq!(q.refcount(&mut tables, c0 + 1).unwrap(), 1);
        // A stream that fits in the rest of the cluster goes there.
        let other = q.alloc_clusters(&mut tables, 1).unwrap();
        assert_eq!(other / 512, c0 + 2);
        assert_eq!(q.alloc_bytes(&mut tables, 100).unwrap(), a + 600);
        assert_eq!(q.refcount(&mut tables, c0 + 1).unwrap(), 2);
        // A cluster allocated elsewhere in between breaks the run: a
        // stream that does not fit starts fresh in the cluster it gets.
        let d = q.alloc_bytes(&mut tables, 400).unwrap();
        assert_eq!(d, (c0 + 3) * 512, "no stream spans a foreign cluster");
        assert_eq!(q.refcount(&mut tables, c0 + 1).unwrap(), 2);
    }
}
