//! Refcounts and cluster allocation.
//!
//! A refcount block covers `cluster_size * 8 / refcount_bits` clusters. When
//! allocation reaches a range whose block does not exist yet, the new block
//! is placed at the first cluster of that range, so it covers itself; when
//! the refcount table is full, a larger table is placed right after that
//! block, inside the same range, and the header switched to it.

use super::{Meta, Qcow2};
use crate::error::{Error, ErrorKind, Result};

impl Qcow2 {
    /// Clusters covered by one refcount block.
    pub(crate) fn rc_per_block(&self, m: &Meta) -> u64 {
        self.cluster_size * 8 / m.header.refcount_bits() as u64
    }

    fn rc_max(&self, m: &Meta) -> u64 {
        let bits = m.header.refcount_bits();
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    fn load_rc_block(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.rc.contains(off) {
            return Ok(());
        }
        if let Some((victim, dirty)) = m.rc.victim_if_full() {
            if dirty {
                if let Some(b) = m.rc.peek(victim) {
                    self.file
                        .write_at(b, victim)
                        .map_err(|e| Error::io("writing a refcount block", e))?;
                }
            }
            m.rc.remove(victim);
        }
        let b = self.read_cluster(off, "refcount block")?;
        m.rc.insert(off, b, false);
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
    pub(crate) fn refcount(&self, m: &mut Meta, c: u64) -> Result<u64> {
        let per = self.rc_per_block(m);
        let b = (c / per) as usize;
        let Some(&off) = m.rc_table.get(b) else {
            return Ok(0);
        };
        if off == 0 {
            return Ok(0);
        }
        self.load_rc_block(m, off)?;
        let bits = m.header.refcount_bits();
        Ok(Self::rc_entry(
            m.rc.get(off).expect("loaded"),
            c % per,
            bits,
        ))
    }

    /// Sets the refcount of host cluster `c`, creating its block if needed.
    pub(crate) fn set_refcount(&self, m: &mut Meta, c: u64, v: u64) -> Result<()> {
        if v > self.rc_max(m) {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "refcount overflow for cluster {c} ({}-bit refcounts)",
                    m.header.refcount_bits()
                ),
            ));
        }
        let per = self.rc_per_block(m);
        let b = c / per;
        let off = self.ensure_block(m, b)?;
        self.load_rc_block(m, off)?;
        let bits = m.header.refcount_bits();
        let block = m.rc.get_mut(off).expect("loaded");
        Self::set_rc_entry(block, c % per, bits, v);
        if v == 0 && c < m.free_hint {
            m.free_hint = c;
        }
        Ok(())
    }

    /// The offset of refcount block `b`, creating it (and growing the
    /// refcount table) when it does not exist.
    fn ensure_block(&self, m: &mut Meta, b: u64) -> Result<u64> {
        if let Some(&off) = m.rc_table.get(b as usize) {
            if off != 0 {
                return Ok(off);
            }
        }
        let cs = self.cluster_size;
        let per = self.rc_per_block(m);
        let first = b * per;
        let block_off = first * cs;
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        let bits = m.header.refcount_bits();
        Self::set_rc_entry(&mut block, 0, bits, 1);
        if b as usize >= m.rc_table.len() {
            // Grow the table: place it right after the new block, in the
            // same range, so the new block covers it.
            let need_entries = (b + 1).max(m.rc_table.len() as u64 * 2);
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
            let mut table = m.rc_table.clone();
            table.resize((clusters * cs / 8) as usize, 0);
            table[b as usize] = block_off;
            // New block and table first, then the header that points to them.
            self.file
                .write_at(&block, block_off)
                .map_err(|e| Error::io("writing a refcount block", e))?;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file
                .write_at(&bytes, table_off)
                .map_err(|e| Error::io("writing the refcount table", e))?;
            self.flush_refcounts(m)?;
            self.sync_file()?;
            let old_off = m.header.refcount_table_offset;
            let old_clusters = m.header.refcount_table_clusters as u64;
            m.header.refcount_table_offset = table_off;
            m.header.refcount_table_clusters = clusters as u32;
            self.write_header(m)?;
            self.sync_file()?;
            m.rc_table = table;
            m.rc.insert(block_off, block, false);
            m.pending_free.push((old_off, old_clusters * cs));
            return Ok(block_off);
        }
        // Block first, then the table entry that points to it.
        self.file
            .write_at(&block, block_off)
            .map_err(|e| Error::io("writing a refcount block", e))?;
        self.sync_file()?;
        let entry_off = m.header.refcount_table_offset + b * 8;
        self.file
            .write_at(&block_off.to_be_bytes(), entry_off)
            .map_err(|e| Error::io("writing the refcount table", e))?;
        m.rc_table[b as usize] = block_off;
        if let Some((victim, dirty)) = m.rc.victim_if_full() {
            if dirty {
                if let Some(v) = m.rc.peek(victim) {
                    self.file
                        .write_at(v, victim)
                        .map_err(|e| Error::io("writing a refcount block", e))?;
                }
            }
            m.rc.remove(victim);
        }
        m.rc.insert(block_off, block, false);
        Ok(block_off)
    }

    /// Allocates `n` contiguous clusters (refcount 1) and returns the byte
    /// offset of the first.
    pub(crate) fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let per = self.rc_per_block(m);
        let mut start = m.free_hint;
        let mut first_free = None;
        let mut run = 0u64;
        let mut c = start;
        while run < n {
            let b = c / per;
            let exists = m.rc_table.get(b as usize).is_some_and(|&o| o != 0);
            if !exists {
                // Creating the block takes the range's first cluster(s).
                self.ensure_block(m, b)?;
            }
            if self.refcount(m, c)? == 0 {
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
        for k in 0..n {
            self.set_refcount(m, start + k, 1)?;
        }
        // Everything below the first free cluster seen is in use; when the
        // run starts there, the clusters it takes are too.
        m.free_hint = match first_free {
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
    pub(crate) fn alloc_bytes(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let tail = m.compressed_tail;
        if tail != 0 && !tail.is_multiple_of(cs) {
            let c = tail / cs;
            let r = self.refcount(m, c)?;
            if r < self.rc_max(m) {
                let room = cs - tail % cs;
                if len <= room {
                    self.set_refcount(m, c, r + 1)?;
                    m.compressed_tail = tail + len;
                    return Ok(tail);
                }
                let next = self.alloc_clusters(m, 1)?;
                if next == (c + 1) * cs {
                    // Contiguous: the stream spans both clusters.
                    self.set_refcount(m, c, r + 1)?;
                    m.compressed_tail = tail + len;
                    return Ok(tail);
                }
                m.compressed_tail = next + len;
                return Ok(next);
            }
        }
        let off = self.alloc_clusters(m, 1)?;
        m.compressed_tail = off + len;
        Ok(off)
    }

    /// Drops one reference to every cluster overlapping `[off, off+len)`;
    /// clusters reaching refcount 0 are punched out of the file.
    pub(crate) fn apply_pending_frees(&self, m: &mut Meta) -> Result<()> {
        let cs = self.cluster_size;
        let pending = std::mem::take(&mut m.pending_free);
        for (off, len) in pending {
            if len == 0 {
                continue;
            }
            let first = off / cs;
            let last = (off + len - 1) / cs;
            for c in first..=last {
                let r = self.refcount(m, c)?;
                if r == 0 {
                    // Already free: metadata was inconsistent. Leave it.
                    continue;
                }
                self.set_refcount(m, c, r - 1)?;
                if r == 1 {
                    if m.compressed_tail / cs == c {
                        m.compressed_tail = 0;
                    }
                    let _ = self.file.punch_hole(c * cs, cs);
                }
            }
        }
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
    use super::super::testutil::mem_image;

    #[test]
    fn allocations_continue_after_the_last_one_without_rescanning() {
        let (_mem, q) = mem_image(1 << 20, &[("cluster_size", "512")]);
        let mut m = q.lock();
        let first = q.alloc_clusters(&mut m, 1).unwrap();
        for k in 1..2000u64 {
            let off = q.alloc_clusters(&mut m, 1).unwrap();
            // Contiguous, except where a new refcount block takes a cluster.
            assert!(
                off > first + (k - 1) * 512,
                "allocation {k} went back to {off}"
            );
            // The hint sits right after the last allocation: the next
            // search starts there instead of at cluster 0.
            assert_eq!(m.free_hint, off / 512 + 1, "allocation {k}");
        }
    }

    #[test]
    fn a_freed_cluster_is_reused_and_runs_skip_holes_that_are_too_small() {
        let (_mem, q) = mem_image(1 << 20, &[("cluster_size", "512")]);
        let mut m = q.lock();
        let a = q.alloc_clusters(&mut m, 1).unwrap() / 512;
        let b = q.alloc_clusters(&mut m, 1).unwrap() / 512;
        let c = q.alloc_clusters(&mut m, 1).unwrap() / 512;
        assert_eq!((b, c), (a + 1, a + 2));
        q.set_refcount(&mut m, b, 0).unwrap();
        assert_eq!(m.free_hint, b);
        // Two clusters do not fit in the hole: they go after c, and the
        // hole stays where the next search starts.
        let run = q.alloc_clusters(&mut m, 2).unwrap() / 512;
        assert_eq!(run, c + 1);
        assert_eq!(m.free_hint, b);
        assert_eq!(q.alloc_clusters(&mut m, 1).unwrap() / 512, b);
        assert_eq!(q.alloc_clusters(&mut m, 1).unwrap() / 512, c + 3);
    }
}

#[cfg(test)]
mod compressed_alloc_tests {
    use super::super::testutil::mem_image;

    #[test]
    fn compressed_streams_continue_into_the_next_cluster_when_it_is_contiguous() {
        let (_mem, q) = mem_image(1 << 20, &[("cluster_size", "512")]);
        let mut m = q.lock();
        let a = q.alloc_bytes(&mut m, 300).unwrap();
        let b = q.alloc_bytes(&mut m, 300).unwrap();
        // The second stream starts right after the first and spans into
        // the next cluster: both clusters hold a reference for it.
        assert_eq!(b, a + 300);
        let c0 = a / 512;
        assert_eq!(q.refcount(&mut m, c0).unwrap(), 2);
        assert_eq!(q.refcount(&mut m, c0 + 1).unwrap(), 1);
        // A stream that fits in the rest of the cluster goes there.
        let other = q.alloc_clusters(&mut m, 1).unwrap();
        assert_eq!(other / 512, c0 + 2);
        assert_eq!(q.alloc_bytes(&mut m, 100).unwrap(), a + 600);
        assert_eq!(q.refcount(&mut m, c0 + 1).unwrap(), 2);
        // A cluster allocated elsewhere in between breaks the run: a
        // stream that does not fit starts fresh in the cluster it gets.
        let d = q.alloc_bytes(&mut m, 400).unwrap();
        assert_eq!(d, (c0 + 3) * 512, "no stream spans a foreign cluster");
        assert_eq!(q.refcount(&mut m, c0 + 1).unwrap(), 2);
    }
}
