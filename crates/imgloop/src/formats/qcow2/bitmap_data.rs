//! Persistent dirty bitmaps, bits: reading a bitmap's data clusters into
//! a [`DirtyBitmap`], writing one back (fresh clusters, then the header
//! switch), `bitmap --merge`, and recording guest writes in the enabled
//! bitmaps as QEMU does.
//!
//! Recording: at the first change of guest data in a read-write open,
//! every enabled (`auto`) bitmap is read into memory and marked in use on
//! disk (one directory switch, synced) before the change is made. Each
//! change then sets its chunks in memory. When the image is closed (or
//! before any other bitmap change) the bits are written to fresh
//! clusters and a new directory without the in-use flag replaces the old
//! one. A crash in between leaves the bitmaps marked in use, which QEMU
//! and imgloop treat as inconsistent (never as clean): no write is ever
//! missing from a bitmap that claims to be valid.

use super::bitmap::{Bitmap, FLAG_AUTO, FLAG_IN_USE};
use super::bitmap_ops::TableEntry;
use super::{Qcow2, Tables};
use crate::dirty_bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Reads the bits of bitmap `b` from its data clusters.
    pub(crate) fn read_bitmap_bits(&self, b: &Bitmap) -> Result<DirtyBitmap> {
        if b.flags & FLAG_IN_USE != 0 {
            return Err(Error::invalid_argument(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                b.name
            )));
        }
        let cs = self.cluster_size;
        let size = self.size.load(Ordering::Acquire);
        let granularity = 1u64 << b.granularity_bits.min(63);
        let mut bits = DirtyBitmap::new(size, granularity)?;
        let need = bits.as_bytes().len() as u64;
        if (b.table_size as u64).saturating_mul(cs) < need {
            return Err(Error::corrupt(
                "bitmap directory",
                b.table_offset,
                format!("bitmap '{}' has a table too small for the disk", b.name),
            ));
        }
        if need == 0 {
            return Ok(bits);
        }
        let table = self.bitmap_table(b)?;
        let mut bytes = vec![0u8; need as usize];
        for (chunk, e) in bytes.chunks_mut(cs as usize).zip(table) {
            match e {
                TableEntry::Clean => {}
                TableEntry::Dirty => chunk.fill(0xff),
                TableEntry::Data(off) => self
                    .file()
                    .read_at(chunk, off)
                    .map_err(|err| Error::io("reading bitmap data", err).at("bitmap data", off))?,
            }
        }
        bits = DirtyBitmap::from_bytes(size, granularity, bytes)?;
        Ok(bits)
    }

    /// Writes `bits` to fresh clusters (clean clusters stay unallocated)
    /// and a table naming them; returns the table's offset and entries.
    pub(crate) fn write_bitmap_bits(
        &self,
        t: &mut Tables,
        bits: &DirtyBitmap,
        entries: u32,
    ) -> Result<u64> {
        let cs = self.cluster_size as usize;
        let mut table = vec![0u64; entries as usize];
        for (slot, chunk) in table.iter_mut().zip(bits.as_bytes().chunks(cs)) {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let mut data = chunk.to_vec();
            data.resize(cs, 0);
            let off = self.alloc_clusters(t, 1)?;
            self.file()
                .write_at(&data, off)
                .map_err(|e| Error::io("writing bitmap data", e).at("bitmap data", off))?;
            *slot = off;
        }
        self.write_bitmap_table(t, &table)
    }

    /// `bitmap_read`: the bits of `name`, from memory while this open
    /// records into it.
    pub(crate) fn bitmap_bits(&self, name: &str) -> Result<DirtyBitmap> {
        {
            let live = self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, b)) = live.iter().find(|(n, _)| n == name) {
                return Ok(b.clone());
            }
        }
        let tables = self.tables();
        let list = self.bitmap_list(&tables)?;
        let i = Self::find_bitmap(&list, name)?;
        self.read_bitmap_bits(&list[i])
    }

    /// `bitmap_status`: from memory while recording, else from the bitmap
    /// read once (and kept until the directory changes).
    pub(crate) fn bitmap_range_status(
        &self,
        name: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<(bool, u64)> {
        {
            let live = self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, b)) = live.iter().find(|(n, _)| n == name) {
                return Ok(b.status(offset, max_len));
            }
        }
        let cached = {
            let cache = self.bitmap_cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b.clone())
        };
        let bits = match cached {
            Some(b) => b,
            None => {
                let b = std::sync::Arc::new(self.bitmap_bits(name)?);
                let mut cache = self.bitmap_cache.lock().unwrap_or_else(|e| e.into_inner());
                cache.push((name.to_string(), b.clone()));
                b
            }
        };
        Ok(bits.status(offset, max_len))
    }

    /// `bitmap --merge`: the bits of `source` are set in `target` too.
    pub(crate) fn merge_bitmap(&self, target: &str, source: &DirtyBitmap) -> Result<()> {
        self.edit_bitmaps(|q, t, list, free| {
            let i = Self::find_bitmap(list, target)?;
            let mut bits = q.read_bitmap_bits(&list[i])?;
            bits.merge(source);
            let cs = q.cluster_size;
            for d in q.bitmap_data(&list[i])? {
                free.push((d, cs));
            }
            if list[i].table_size > 0 {
                free.push((
                    list[i].table_offset,
                    (list[i].table_size as u64 * 8).div_ceil(cs) * cs,
                ));
            }
            list[i].table_offset = q.write_bitmap_bits(t, &bits, list[i].table_size)?;
            Ok(())
        })
    }

    /// Before guest data in `offset..offset + len` changes: recorded in
    /// every enabled bitmap (which starts the recording at the first
    /// change of this open).
    pub(crate) fn before_data_change(&self, offset: u64, len: u64) -> Result<()> {
        if !self.bitmaps_kept.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.recording.load(Ordering::Acquire) {
            self.start_recording()?;
        }
        let mut live = self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner());
        for (_, b) in live.iter_mut() {
            b.set(offset, len);
        }
        Ok(())
    }

    /// Reads the enabled bitmaps into memory and marks them in use.
    fn start_recording(&self) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        let t = &mut *tables;
        if self.recording.load(Ordering::Acquire) || !self.bitmaps_kept.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut list = self.bitmap_list(t)?;
        let mut live = Vec::new();
        for b in list.iter_mut() {
            if b.flags & FLAG_AUTO == 0 || b.flags & FLAG_IN_USE != 0 {
                continue;
            }
            live.push((b.name.clone(), self.read_bitmap_bits(b)?));
            b.flags |= FLAG_IN_USE;
        }
        if live.is_empty() {
            // Nothing records: the disabled bitmaps stay valid as they are.
            self.recording.store(true, Ordering::Release);
            return Ok(());
        }
        self.flush_held(t)?;
        // In memory first, so readers never see the in-use flag without
        // the bits.
        *self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner()) = live;
        if let Err(e) = self.switch_bitmaps(t, &list, Vec::new()) {
            self.live_bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return Err(e);
        }
        self.recording.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes the recorded bits back and clears the in-use flags (caller
    /// holds the locks). Nothing when nothing records.
    pub(crate) fn store_recorded(&self, t: &mut Tables) -> Result<()> {
        if !self.recording.load(Ordering::Acquire) {
            return Ok(());
        }
        let live =
            std::mem::take(&mut *self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner()));
        if live.is_empty() {
            self.recording.store(false, Ordering::Release);
            return Ok(());
        }
        let result = (|| {
            let cs = self.cluster_size;
            let mut list = self.bitmap_list(t)?;
            let mut free = Vec::new();
            for (name, bits) in &live {
                let Some(b) = list.iter_mut().find(|b| &b.name == name) else {
                    continue;
                };
                let mut unmarked = b.clone();
                unmarked.flags &= !FLAG_IN_USE;
                for d in self.bitmap_data(&unmarked)? {
                    free.push((d, cs));
                }
                if b.table_size > 0 {
                    free.push((b.table_offset, (b.table_size as u64 * 8).div_ceil(cs) * cs));
                }
                b.table_offset = self.write_bitmap_bits(t, bits, b.table_size)?;
                b.flags &= !FLAG_IN_USE;
            }
            self.check_sole(t, &free)?;
            self.flush_held(t)?;
            self.switch_bitmaps(t, &list, free)
        })();
        match result {
            Ok(()) => {
                self.recording.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Kept, so a later attempt can still store them.
                *self.live_bitmaps.lock().unwrap_or_else(|e| e.into_inner()) = live;
                Err(e)
            }
        }
    }

    /// [`store_recorded`](Self::store_recorded), taking the locks.
    pub(crate) fn store_recorded_bitmaps(&self) -> Result<()> {
        if !self.recording.load(Ordering::Acquire) {
            return Ok(());
        }
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        self.store_recorded(&mut tables)
    }
}
