//! Reads and writes: mappings from the BAT, cluster allocation at the end
//! of the data, write-zeroes and discard, the in-use marker, the flush
//! and the clean close.

use super::header::{HEADER_LEN, IN_USE};
use super::{Parallels, Prealloc, PIECE};
use crate::driver::{
    Allocation, Commit, DiscardAction, DiscardMapping, Fill, Mapping, StorageId, WriteMapping,
    ZeroAction, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::inflight::UnitGuard;

/// What a commit publishes: the BAT entry of a new cluster.
pub(super) struct Publish {
    index: u64,
    entry: u32,
    _claim: Option<UnitGuard>,
}

impl Parallels {
    /// The mapping at guest `offset` and for how many bytes (at most
    /// `max_len`): runs of clusters contiguous in the file merge.
    pub(super) fn map_run(&self, offset: u64, max_len: u64) -> (Mapping, u64) {
        let cs = self.cluster_size();
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let first = offset / cs;
        let in_cluster = offset % cs;
        let e = t.entry(first);
        let mut len = (cs - in_cluster).min(max_len);
        let mut i = first + 1;
        let bat = self.header.wire.bat_entries as u64;
        if e == 0 {
            while len < max_len && i < bat && t.entry(i) == 0 {
                len = (len + cs).min(max_len);
                i += 1;
            }
            return (Mapping::Unallocated, len);
        }
        let host = self.host_of(e);
        while len < max_len && i < bat {
            let next = t.entry(i);
            if next == 0 || self.host_of(next) != host + (i - first) * cs {
                break;
            }
            len = (len + cs).min(max_len);
            i += 1;
        }
        (
            Mapping::Data {
                storage: StorageId::IMAGE,
                offset: host + in_cluster,
            },
            len,
        )
    }

    /// Refuses in-place writes through a damaged entry: into the header,
    /// the BAT or before the data area (qemu's repair drops such entries;
    /// reads of them still work).
    fn check_place(&self, host: u64, index: u64) -> Result<()> {
        if host < self.data_start {
            return Err(Error::corrupt(
                "Parallels BAT",
                HEADER_LEN + 4 * index,
                format!(
                    "cluster {index} at byte {host} lies before the data area ({}); repair the image with check -r all",
                    self.data_start
                ),
            ));
        }
        Ok(())
    }

    /// Writes the in-use marker before the first change of a session (and
    /// detaches a format extension, whose bitmaps the writes would make
    /// stale), synced before any data is written.
    fn mark_in_use(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.marked_fast.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if *marked {
            return Ok(());
        }
        self.write_header(|w| {
            w.inuse = IN_USE;
            w.ext_off = 0;
        })?;
        *marked = true;
        self.marked_fast.store(true, Ordering::Release);
        Ok(())
    }

    /// Appends one cluster at the end of the data, growing the file (by
    /// the preallocation size too) when it is too short. Returns the
    /// cluster's offset and whether it reads as zeroes already.
    fn append(&self) -> Result<(u64, bool)> {
        self.append_with(self.prealloc.1)
    }

    /// Appends a cluster without preallocating past it (for repairs).
    pub(super) fn append_unpreallocated(&self) -> Result<u64> {
        Ok(self.append_with(0)?.0)
    }

    fn append_with(&self, prealloc: u64) -> Result<(u64, bool)> {
        let cs = self.cluster_size();
        let unit = self.header.entry_unit();
        let mut s = self.space.lock().unwrap_or_else(|e| e.into_inner());
        let at = s.data_end.next_multiple_of(unit);
        let end = at + cs;
        if at / unit > u32::MAX as u64 {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the Parallels file would grow past what a BAT entry can address",
            ));
        }
        if end > s.file_len {
            let new_len = end.saturating_add(prealloc);
            let grown = match self.prealloc.0 {
                Prealloc::Falloc => self
                    .file()
                    .allocate(s.file_len, new_len - s.file_len)
                    .or_else(|_| self.file().set_len(new_len)),
                Prealloc::Truncate => self.file().set_len(new_len),
            };
            grown.map_err(|e| Error::io("growing the Parallels file", e))?;
            s.file_len = new_len;
        }
        s.data_end = end;
        Ok((at, at >= self.zero_from))
    }

    pub(super) fn map_write_range(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        let cs = self.cluster_size();
        let index = offset / cs;
        let cluster = index * cs;
        let in_cluster = offset - cluster;
        let n = len.min(cs - in_cluster);
        let in_place = |e: u32| -> Result<Option<WriteMapping>> {
            if e == 0 {
                return Ok(None);
            }
            let host = self.host_of(e);
            self.check_place(host, index)?;
            Ok(Some(WriteMapping::InPlace {
                storage: StorageId::IMAGE,
                offset: host + in_cluster,
                len: n,
            }))
        };
        let current = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entry(index);
        if let Some(m) = in_place(current)? {
            self.mark_in_use()?;
            return Ok(m);
        }
        let claim = self.units.lock(index);
        let current = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entry(index);
        if let Some(m) = in_place(current)? {
            self.mark_in_use()?;
            return Ok(m);
        }
        self.mark_in_use()?;
        let (host, zeroed) = self.append()?;
        let stop = (cluster + cs).min(self.header.size);
        let end = offset + n;
        let mut fills = Vec::new();
        if in_cluster > 0 {
            fills.push(Fill {
                guest: cluster,
                len: in_cluster,
                from: Mapping::Unallocated,
            });
        }
        if end < stop {
            fills.push(Fill {
                guest: end,
                len: stop - end,
                from: Mapping::Unallocated,
            });
        }
        Ok(WriteMapping::Allocate(Allocation {
            guest: cluster,
            len: stop - cluster,
            storage: StorageId::IMAGE,
            offset: host,
            fills,
            zeroed,
            commit: Commit::new(Publish {
                index,
                entry: (host / self.header.entry_unit()) as u32,
                _claim: Some(claim),
            }),
        }))
    }

    pub(super) fn publish(&self, commit: Commit) -> Result<()> {
        let p = commit.into_inner::<Publish>().ok_or_else(|| {
            Error::new(
                ErrorKind::State,
                "a commit from another driver reached parallels",
            )
        })?;
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_entry(p.index, p.entry);
        Ok(())
    }

    /// Write-zeroes: unallocated clusters read as zeroes already; whole
    /// allocated clusters are released when the request may unmap (the
    /// BAT entry cleared, the space punched out), other parts zeroed in
    /// place.
    pub(super) fn map_zero_range(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<ZeroMapping> {
        let cs = self.cluster_size();
        let index = offset / cs;
        let in_cluster = offset % cs;
        let n = len.min(cs - in_cluster);
        let e = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entry(index);
        if e == 0 {
            // Over a parent image, zeroes must be stored.
            let action = match self.has_parent() {
                true => ZeroAction::Buffers,
                false => ZeroAction::Metadata,
            };
            return Ok(ZeroMapping {
                len: n,
                action,
                commit: None,
            });
        }
        let host = self.host_of(e);
        self.check_place(host, index)?;
        self.mark_in_use()?;
        let whole = in_cluster == 0 && (n == cs || offset + n == self.header.size);
        // A released cluster would show the parent's data.
        let release = whole && flags.may_unmap && !self.has_parent();
        Ok(ZeroMapping {
            len: n,
            action: ZeroAction::Host {
                storage: StorageId::IMAGE,
                offset: host + in_cluster,
            },
            commit: release.then(|| {
                Commit::new(Publish {
                    index,
                    entry: 0,
                    _claim: None,
                })
            }),
        })
    }

    /// Discard: whole allocated clusters are released (entry cleared,
    /// space punched out, as qemu does); parts of clusters are left alone.
    pub(super) fn map_discard_range(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        let cs = self.cluster_size();
        let index = offset / cs;
        let in_cluster = offset % cs;
        let n = len.min(cs - in_cluster);
        let e = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entry(index);
        let whole = in_cluster == 0 && (n == cs || offset + n == self.header.size);
        // Over a parent image a released cluster would show the parent's
        // data, neither the old bytes nor zeroes: left alone, as qemu does.
        if e == 0 || !whole || self.has_parent() {
            return Ok(DiscardMapping {
                len: n,
                action: DiscardAction::Nothing,
                commit: None,
            });
        }
        let host = self.host_of(e);
        self.check_place(host, index)?;
        self.mark_in_use()?;
        Ok(DiscardMapping {
            len: n,
            action: DiscardAction::PunchHole {
                storage: StorageId::IMAGE,
                offset: host,
            },
            commit: Some(Commit::new(Publish {
                index,
                entry: 0,
                _claim: None,
            })),
        })
    }

    /// Syncs the data, then writes the changed pieces of the header and
    /// BAT and syncs again: the BAT on disk points only at durable data.
    pub(super) fn flush_table(&self) -> Result<()> {
        let _f = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let pieces: Vec<(u64, Vec<u8>)> = {
            let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
            let dirty = std::mem::take(&mut t.dirty);
            dirty
                .into_iter()
                .map(|p| {
                    let start = (p * PIECE) as usize;
                    let end = (start + PIECE as usize).min(t.bytes.len());
                    (p * PIECE, t.bytes[start..end].to_vec())
                })
                .collect()
        };
        if pieces.is_empty() {
            return Ok(());
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        self.file().sync().map_err(io("syncing the image"))?;
        for (at, bytes) in &pieces {
            if let Err(e) = self.file().write_at(bytes, *at) {
                // Written again by the next flush.
                let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
                for (at, _) in &pieces {
                    t.dirty.insert(at / PIECE);
                }
                return Err(Error::io("writing the Parallels BAT", e).at("Parallels BAT", *at));
            }
        }
        self.file().sync().map_err(io("syncing the image"))
    }

    /// A clean close of a session that wrote: the BAT, then the file cut
    /// back to the end of the data, then the in-use marker cleared.
    pub(super) fn close_image(&self) -> Result<()> {
        self.flush_table()?;
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if !*marked {
            return Ok(());
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        let len = self.file().len().map_err(io("reading the image size"))?;
        // Every cluster an entry names (a discarded last cluster and the
        // preallocated tail are dropped).
        let end = self.used_end(len);
        if len > end {
            self.file()
                .set_len(end)
                .map_err(io("cutting the Parallels file back to its data"))?;
            self.file().sync().map_err(io("syncing the image"))?;
        }
        self.write_header(|w| w.inuse = 0)?;
        *marked = false;
        self.marked_fast
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
