//! The write side: in-place writes, allocation with copy-on-write (the
//! generic layer fills and writes; encrypted images do it here), stored
//! compressed clusters, write-zeroes and discard.

use super::header::COMPRESSED;
use super::tables::Entry;
use super::Qcow;
use crate::driver::{
    Allocation, Commit, DiscardAction, DiscardMapping, Fill, IoCtx, Mapping, StorageId,
    WriteMapping, ZeroAction, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::inflight::UnitGuard;

/// What a commit publishes: the L2 entry of the cluster holding `guest`.
pub(super) struct Publish {
    guest: u64,
    raw: u64,
    _claim: UnitGuard,
}

/// Compresses one cluster like QEMU (raw deflate, 4 KiB window); `None`
/// unless the stream is smaller than the cluster.
pub(super) fn compress_cluster(unit: &[u8], cluster_size: u64) -> Option<Vec<u8>> {
    let cs = cluster_size as usize;
    let mut padded;
    let input = if unit.len() < cs {
        padded = unit.to_vec();
        padded.resize(cs, 0);
        &padded[..]
    } else {
        unit
    };
    crate::formats::deflate::deflate_raw(input, cs - 1)
}

impl Qcow {
    /// Host offsets must fit the entry's offset bits (those of a compressed
    /// entry are the fewest).
    pub(super) fn host_limit(&self) -> u64 {
        1 << (63 - self.header.cluster_bits)
    }

    /// Appends `len` bytes aligned to `align` and returns where.
    fn append(&self, len: u64, align: u64) -> Result<u64> {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let at = next.next_multiple_of(align);
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.host_limit())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NoSpace,
                    format!(
                    "the image file would grow past {} bytes, the most qcow entries can address",
                    self.host_limit()
                ),
                )
            })?;
        *next = end;
        Ok(at)
    }

    /// Makes sure the L1 entry of `guest` has an L2 table (a new one is
    /// zeroed, dirty in the cache, and published in the in-memory L1 at
    /// once: it maps nothing yet).
    fn ensure_l2(&self, guest: u64) -> Result<()> {
        let l1i = (guest / self.l1_span()) as usize;
        loop {
            let l2_off = {
                let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
                t.l1.get(l1i).copied()
            };
            match l2_off {
                None => {
                    return Err(Error::corrupt(
                        "qcow L1 table",
                        self.header.l1_table_offset,
                        format!("guest offset {guest} is past the L1 table"),
                    ))
                }
                Some(0) => {}
                Some(off) => {
                    let cached = self
                        .tables
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .l2
                        .contains(off);
                    if !cached {
                        self.load_l2(off)?;
                    }
                    return Ok(());
                }
            }
            let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
            if t.l1[l1i] != 0 {
                continue;
            }
            let off = self.append(self.l2_bytes(), self.cluster_size())?;
            t.l1[l1i] = off;
            t.l1_dirty.insert(l1i);
            t.l2.insert(
                off,
                vec![0u8; self.l2_bytes() as usize].into_boxed_slice(),
                true,
            );
            return Ok(());
        }
    }

    /// Sets the L2 entry of `guest`'s cluster (its table is cached or
    /// read first).
    fn set_entry(&self, guest: u64, raw: u64) -> Result<()> {
        let l1i = (guest / self.l1_span()) as usize;
        let i = ((guest / self.cluster_size()) & (self.header.l2_entries() - 1)) as usize * 8;
        loop {
            let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
            let off = t.l1[l1i];
            if off == 0 {
                return Err(Error::new(
                    ErrorKind::State,
                    format!("no L2 table for guest offset {guest}"),
                ));
            }
            if let Some(table) = t.l2.get_mut(off) {
                table[i..i + 8].copy_from_slice(&raw.to_be_bytes());
                let over = t.l2.over_capacity();
                drop(t);
                if over {
                    self.flush_tables()?;
                }
                return Ok(());
            }
            drop(t);
            self.load_l2(off)?;
        }
    }

    /// Refuses in-place writes through a damaged entry: into the header or
    /// L1 table (they would destroy the image's metadata), or into a
    /// cluster that is not aligned (it overlaps its neighbour). Reads of
    /// such clusters still work, as in QEMU.
    fn check_place(&self, host: u64, guest: u64) -> Result<()> {
        if host < self.metadata_end() {
            return Err(Error::corrupt(
                "qcow L2 entry",
                guest,
                format!("cluster at host offset {host} overlaps the header or L1 table"),
            ));
        }
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(Error::corrupt(
                "qcow L2 entry",
                guest,
                format!("cluster at host offset {host} is not aligned to the cluster size"),
            ));
        }
        Ok(())
    }

    pub(super) fn map_write_range(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        let cs = self.cluster_size();
        let cluster = offset & !(cs - 1);
        let in_cluster = offset - cluster;
        let n = len.min(cs - in_cluster);
        if self.encrypted() {
            return Ok(WriteMapping::Transformed { len: n });
        }
        let in_place = |e: Entry| -> Result<Option<WriteMapping>> {
            match e {
                Entry::Normal { host } => {
                    self.check_place(host, offset)?;
                    Ok(Some(WriteMapping::InPlace {
                        storage: StorageId::IMAGE,
                        offset: host + in_cluster,
                        len: n,
                    }))
                }
                _ => Ok(None),
            }
        };
        if let Some(m) = in_place(self.entry(offset)?)? {
            return Ok(m);
        }
        let claim = self.units.lock(cluster / cs);
        let entry = self.entry(offset)?;
        if let Some(m) = in_place(entry)? {
            return Ok(m);
        }
        self.ensure_l2(offset)?;
        let host = self.append(cs, cs)?;
        // The cluster's content around the write: from the backing image
        // (or zeroes), or the old compressed data.
        let from = match entry {
            Entry::Compressed { .. } => Mapping::Compressed,
            _ => Mapping::Unallocated,
        };
        let stop = (cluster + cs).min(self.header.size);
        let end = offset + n;
        let mut fills = Vec::new();
        if in_cluster > 0 {
            fills.push(Fill {
                guest: cluster,
                len: in_cluster,
                from,
            });
        }
        if end < stop {
            fills.push(Fill {
                guest: end,
                len: stop - end,
                from,
            });
        }
        Ok(WriteMapping::Allocate(Allocation {
            guest: cluster,
            len: stop - cluster,
            storage: StorageId::IMAGE,
            offset: host,
            fills,
            zeroed: true,
            commit: Commit::new(Publish {
                guest: cluster,
                raw: host,
                _claim: claim,
            }),
        }))
    }

    pub(super) fn publish(&self, commit: Commit) -> Result<()> {
        match commit.into_inner::<Publish>() {
            Some(p) => self.set_entry(p.guest, p.raw),
            None => Err(Error::new(
                ErrorKind::State,
                "a commit from another driver reached qcow",
            )),
        }
    }

    /// Encrypted writes (whole sectors): encrypt in place into an
    /// allocated cluster, or build the whole new cluster (backing data or
    /// the old compressed data around the write), encrypt and append it.
    pub(super) fn write_encrypted(&self, ctx: &IoCtx, buf: &[u8], offset: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let sector = super::crypt::SECTOR;
        if !offset.is_multiple_of(sector) || !(buf.len() as u64).is_multiple_of(sector) {
            return Err(Error::new(
                ErrorKind::State,
                "an encrypted write that is not sector-aligned reached the qcow driver",
            ));
        }
        let cs = self.cluster_size();
        let cluster = offset & !(cs - 1);
        let in_cluster = (offset - cluster) as usize;
        let write_at = |host: u64, data: &mut [u8], guest: u64| -> Result<()> {
            cipher.encrypt(data, guest / sector);
            self.file()
                .write_at(data, host)
                .map_err(|e| Error::io("writing guest data", e))
        };
        if let Entry::Normal { host } = self.entry(offset)? {
            self.check_place(host, offset)?;
            return write_at(host + in_cluster as u64, &mut buf.to_vec(), offset);
        }
        let claim = self.units.lock(cluster / cs);
        let entry = self.entry(offset)?;
        if let Entry::Normal { host } = entry {
            self.check_place(host, offset)?;
            return write_at(host + in_cluster as u64, &mut buf.to_vec(), offset);
        }
        let stop = (cluster + cs).min(self.header.size);
        // Whole sectors of the cluster inside the disk.
        let mut unit = vec![0u8; (stop - cluster).next_multiple_of(sector) as usize];
        match entry {
            Entry::Compressed { offset: at, len } => {
                let old = self.decompress(at, len, cluster)?;
                let n = unit.len();
                unit.copy_from_slice(&old[..n]);
            }
            _ => {
                let inside = (stop - cluster) as usize;
                ctx.read_backing(&mut unit[..inside], cluster)?;
            }
        }
        unit[in_cluster..in_cluster + buf.len()].copy_from_slice(buf);
        self.ensure_l2(offset)?;
        let host = self.append(cs, cs)?;
        write_at(host, &mut unit, cluster)?;
        self.publish(Commit::new(Publish {
            guest: cluster,
            raw: host,
            _claim: claim,
        }))
    }

    /// Stores a compressed cluster at guest `offset` (cluster-aligned)
    /// when it is not allocated yet; `Ok(false)` leaves it to a plain
    /// write.
    pub(super) fn store_compressed(&self, packed: &[u8], offset: u64) -> Result<bool> {
        let cs = self.cluster_size();
        if self.encrypted()
            || !offset.is_multiple_of(cs)
            || packed.is_empty()
            || packed.len() as u64 >= cs
        {
            return Ok(false);
        }
        let claim = self.units.lock(offset / cs);
        if self.entry(offset)? != Entry::Unallocated {
            return Ok(false);
        }
        self.ensure_l2(offset)?;
        let at = self.append(packed.len() as u64, 1)?;
        self.file()
            .write_at(packed, at)
            .map_err(|e| Error::io("writing a compressed cluster", e))?;
        let raw = at | COMPRESSED | ((packed.len() as u64) << (63 - self.header.cluster_bits));
        self.publish(Commit::new(Publish {
            guest: offset,
            raw,
            _claim: claim,
        }))?;
        Ok(true)
    }

    /// Write-zeroes: plain allocated clusters are zeroed in place;
    /// unallocated ones already read as zeroes without a backing file;
    /// everything else (backing data, compressed or encrypted clusters)
    /// gets zero buffers through the write path.
    pub(super) fn map_zero_range(&self, offset: u64, len: u64) -> Result<ZeroMapping> {
        let cs = self.cluster_size();
        let n = len.min(cs - (offset & (cs - 1)));
        let action = match self.entry(offset)? {
            Entry::Normal { host } if !self.encrypted() => {
                self.check_place(host, offset)?;
                ZeroAction::Host {
                    storage: StorageId::IMAGE,
                    offset: host + (offset & (cs - 1)),
                }
            }
            Entry::Unallocated if self.header.backing_file.is_none() => ZeroAction::Metadata,
            _ => ZeroAction::Buffers,
        };
        Ok(ZeroMapping {
            len: n,
            action,
            commit: None,
        })
    }

    /// Discard: qcow cannot free clusters (no refcounts), so plain
    /// allocated ones get a hole punched and read as zeroes; the rest is
    /// left alone.
    pub(super) fn map_discard_range(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        let cs = self.cluster_size();
        let n = len.min(cs - (offset & (cs - 1)));
        let action = match self.entry(offset)? {
            Entry::Normal { host } if !self.encrypted() => {
                self.check_place(host, offset)?;
                DiscardAction::PunchHole {
                    storage: StorageId::IMAGE,
                    offset: host + (offset & (cs - 1)),
                }
            }
            _ => DiscardAction::Nothing,
        };
        Ok(DiscardMapping {
            len: n,
            action,
            commit: None,
        })
    }
}
