//! Persistent dirty bitmaps, write side: adding, removing, clearing,
//! enabling and disabling bitmaps (`imgloop bitmap`), resizing them with
//! the disk, and keeping the extension's autoclear bit true.
//!
//! Guest writes are recorded in the enabled bitmaps (`bitmap_data`); the
//! bits recorded so far are stored before any change made here.
//!
//! Every change ends in one header write (the extension names the new
//! directory) after the new tables and directory are durable; the old
//! ones are freed after it.

use super::bitmap::{self, Bitmap, FLAG_AUTO, FLAG_IN_USE};
use super::header::{autoclear, ext};
use super::open::read_u64_table;
use super::{Qcow2, Tables};
use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::Ordering;

/// Bits 9..55 of a bitmap table entry: the data cluster.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of an entry without a cluster: every bit of it is set.
const ALL_ONES: u64 = 1;

/// One entry of a bitmap table, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TableEntry {
    /// No cluster; every bit clear.
    Clean,
    /// No cluster; every bit set.
    Dirty,
    /// The bits are in this cluster.
    Data(u64),
}
/// Longest bitmap name (QEMU's limit).
const MAX_NAME: usize = 1023;

impl Qcow2 {
    /// The bitmaps the header names, when they are consistent.
    pub(crate) fn bitmap_list(&self, t: &Tables) -> Result<Vec<Bitmap>> {
        let h = &t.header;
        let Some(e) = h.extension(ext::BITMAPS) else {
            return Ok(Vec::new());
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the image's bitmaps are inconsistent (a program without bitmap support \
                 wrote it); remove them with qemu-img or repair with check -r",
            ));
        }
        bitmap::read_directory(self.file(), e)
    }

    /// Whether the bitmaps stay valid across this read-write open (set at
    /// open: the bit is set and the directory reads).
    pub(crate) fn keep_bitmaps_at_open(&self, t: &Tables) -> bool {
        t.header.extension(ext::BITMAPS).is_some()
            && t.header.autoclear_features & autoclear::BITMAPS != 0
            && self.bitmap_list(t).is_ok()
    }

    /// The data clusters a bitmap table references, checked before any
    /// of them is freed: cluster-aligned, inside the file, referenced once.
    pub(super) fn bitmap_data(&self, b: &Bitmap) -> Result<Vec<u64>> {
        Ok(self
            .bitmap_table(b)?
            .into_iter()
            .filter_map(|e| match e {
                TableEntry::Data(o) => Some(o),
                _ => None,
            })
            .collect())
    }

    /// The entries of bitmap `b`'s table, each checked (the one place
    /// bitmap tables are validated): the table cluster-aligned; in each
    /// entry the reserved bits clear, a data cluster aligned and inside
    /// the file, and bit 0 (all ones) set only without one.
    pub(super) fn bitmap_table(&self, b: &Bitmap) -> Result<Vec<TableEntry>> {
        if b.table_size == 0 {
            return Ok(Vec::new());
        }
        let cs = self.cluster_size;
        if b.table_offset == 0 || !b.table_offset.is_multiple_of(cs) {
            return Err(Error::corrupt(
                "bitmap directory",
                b.table_offset,
                format!("bitmap '{}' has an invalid table offset", b.name),
            ));
        }
        let table = read_u64_table(
            self.file(),
            b.table_offset,
            b.table_size as u64,
            cs,
            "bitmap table",
        )?;
        let file_len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading image size", e))?;
        table
            .into_iter()
            .map(|e| {
                let o = e & TABLE_OFFSET_MASK;
                let reserved = e & !TABLE_OFFSET_MASK & !ALL_ONES != 0;
                match (o, e & ALL_ONES != 0) {
                    _ if reserved => None,
                    (0, false) => Some(TableEntry::Clean),
                    (0, true) => Some(TableEntry::Dirty),
                    (o, false) if o.is_multiple_of(cs) && o < file_len => Some(TableEntry::Data(o)),
                    _ => None,
                }
                .ok_or_else(|| {
                    Error::corrupt(
                        "bitmap table",
                        b.table_offset,
                        format!("bitmap '{}' has an invalid table entry {e:#x}", b.name),
                    )
                })
            })
            .collect()
    }

    /// The clusters `ranges` name are each referenced once (so freeing
    /// them frees nothing else).
    pub(super) fn check_sole(&self, t: &mut Tables, ranges: &[(u64, u64)]) -> Result<()> {
        let cs = self.cluster_size;
        let mut seen = std::collections::HashSet::new();
        for &(off, len) in ranges {
            for c in off / cs..(off + len).div_ceil(cs) {
                if !seen.insert(c) || self.refcount(t, c)? != 1 {
                    return Err(Error::corrupt(
                        "bitmap",
                        c * cs,
                        "a bitmap cluster is shared with other metadata; repair with check -r all",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Writes a bitmap table of `entries` to fresh clusters.
    pub(super) fn write_bitmap_table(&self, t: &mut Tables, entries: &[u64]) -> Result<u64> {
        let cs = self.cluster_size;
        let mut bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        let clusters = (bytes.len() as u64).div_ceil(cs).max(1);
        bytes.resize((clusters * cs) as usize, 0);
        let off = self.alloc_clusters(t, clusters)?;
        self.file()
            .write_at(&bytes, off)
            .map_err(|e| Error::io("writing a bitmap table", e).at("bitmap table", off))?;
        Ok(off)
    }

    /// Makes `list` the bitmaps: a new directory, then the header naming
    /// it (without bitmaps: no extension); then `free` (byte ranges) and
    /// the old directory are released.
    pub(super) fn switch_bitmaps(
        &self,
        t: &mut Tables,
        list: &[Bitmap],
        free: Vec<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.cluster_size;
        self.bitmap_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let old = t.header.extension(ext::BITMAPS).map(|e| e.to_vec());
        let (payload, bit) = if list.is_empty() {
            (None, false)
        } else {
            let dir = bitmap::encode_directory(list);
            let clusters = (dir.len() as u64).div_ceil(cs);
            let off = self.alloc_clusters(t, clusters)?;
            self.file()
                .write_at(&dir, off)
                .map_err(|e| Error::io("writing the bitmap directory", e))?;
            (
                Some(bitmap::encode_extension(
                    list.len() as u32,
                    dir.len() as u64,
                    off,
                )),
                true,
            )
        };
        // Tables, directory and their refcounts durable first.
        self.flush_held(t)?;
        self.sync_file()?;
        t.header.set_extension(ext::BITMAPS, payload);
        if bit {
            t.header.autoclear_features |= autoclear::BITMAPS;
        } else {
            t.header.autoclear_features &= !autoclear::BITMAPS;
        }
        if let Err(e) = self.write_header(t).and_then(|_| self.sync_file()) {
            t.corrupt = true;
            return Err(e);
        }
        self.bitmaps_kept.store(bit, Ordering::Release);
        if let Some(e) = old.filter(|e| e.len() >= 24) {
            let size = u64::from_be_bytes(e[8..16].try_into().expect("8 bytes"));
            let off = u64::from_be_bytes(e[16..24].try_into().expect("8 bytes"));
            if size > 0 {
                self.release_range(t, off, size.div_ceil(cs) * cs);
            }
        }
        for (off, len) in free {
            self.release_range(t, off, len);
        }
        self.flush_held(t)
    }

    /// Runs `f` on the bitmap list under the locks, for a writable image.
    pub(super) fn edit_bitmaps<R>(
        &self,
        f: impl FnOnce(&Self, &mut Tables, &mut Vec<Bitmap>, &mut Vec<(u64, u64)>) -> Result<R>,
    ) -> Result<R> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        let t = &mut *tables;
        self.check_writable(t)?;
        if !self.v3() {
            return Err(Error::unsupported(
                "persistent bitmaps need a version 3 (compat=1.1) image",
            ));
        }
        self.store_recorded(t)?;
        self.flush_held(t)?;
        let mut list = self.bitmap_list(t)?;
        let mut free = Vec::new();
        let r = f(self, t, &mut list, &mut free)?;
        self.check_sole(t, &free)?;
        self.switch_bitmaps(t, &list, free)?;
        Ok(r)
    }

    pub(super) fn find_bitmap(list: &[Bitmap], name: &str) -> Result<usize> {
        list.iter().position(|b| b.name == name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("Dirty bitmap '{name}' not found"),
            )
        })
    }

    /// `bitmap --add NAME [-g GRANULARITY] [--disable]`.
    pub(crate) fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let size = self.size.load(Ordering::Acquire);
        self.edit_bitmaps(|q, t, list, _| {
            if name.is_empty() || name.len() > MAX_NAME {
                return Err(Error::invalid_argument("Bitmap names are 1 to 1023 bytes"));
            }
            if list.iter().any(|b| b.name == name) {
                return Err(Error::invalid_argument(format!(
                    "Bitmap already exists: {name}"
                )));
            }
            if list.len() >= 65535 {
                return Err(Error::new(ErrorKind::NoSpace, "too many bitmaps"));
            }
            let g = granularity.unwrap_or(cs.max(65536));
            if !g.is_power_of_two() || !(512..=(1u64 << 31)).contains(&g) {
                return Err(Error::invalid_argument(
                    "Granularity must be power of 2 and between 512 and 2147483648",
                ));
            }
            let gbits = g.trailing_zeros() as u8;
            let entries = Bitmap::table_entries(size, gbits, cs);
            check_bitmap_size(entries, cs)?;
            let table_offset = q.write_bitmap_table(t, &vec![0u64; entries as usize])?;
            list.push(Bitmap {
                table_offset,
                table_size: entries as u32,
                flags: if enabled { FLAG_AUTO } else { 0 },
                granularity_bits: gbits,
                name: name.to_string(),
                kind: 1,
                extra: Vec::new(),
            });
            Ok(())
        })
    }

    /// `bitmap --remove NAME`.
    pub(crate) fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.edit_bitmaps(|q, _, list, free| {
            let i = Self::find_bitmap(list, name)?;
            let b = list.remove(i);
            let cs = q.cluster_size;
            for d in q.bitmap_data(&b)? {
                free.push((d, cs));
            }
            if b.table_size > 0 {
                free.push((b.table_offset, (b.table_size as u64 * 8).div_ceil(cs) * cs));
            }
            Ok(())
        })
    }

    /// `bitmap --clear NAME`: every bit zero.
    pub(crate) fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.edit_bitmaps(|q, t, list, free| {
            let i = Self::find_bitmap(list, name)?;
            let cs = q.cluster_size;
            let b = &list[i];
            if b.flags & FLAG_IN_USE != 0 {
                return Err(Error::invalid_argument(format!(
                    "Bitmap '{name}' is inconsistent and cannot be used"
                )));
            }
            for d in q.bitmap_data(b)? {
                free.push((d, cs));
            }
            if b.table_size > 0 {
                free.push((b.table_offset, (b.table_size as u64 * 8).div_ceil(cs) * cs));
            }
            let entries = b.table_size as usize;
            list[i].table_offset = q.write_bitmap_table(t, &vec![0u64; entries])?;
            Ok(())
        })
    }

    /// `bitmap --enable NAME` / `--disable NAME`.
    pub(crate) fn enable_bitmap(&self, name: &str, on: bool) -> Result<()> {
        self.edit_bitmaps(|_, _, list, _| {
            let i = Self::find_bitmap(list, name)?;
            if list[i].flags & FLAG_IN_USE != 0 {
                return Err(Error::invalid_argument(format!(
                    "Bitmap '{name}' is inconsistent and cannot be used"
                )));
            }
            if on {
                list[i].flags |= FLAG_AUTO;
            } else {
                list[i].flags &= !FLAG_AUTO;
            }
            Ok(())
        })
    }

    /// After a resize to `new_size` (caller holds the locks): each valid
    /// bitmap's table grows with clean (zero) entries or is cut, freeing
    /// the data clusters past the end, as QEMU resizes bitmaps.
    pub(crate) fn resize_bitmaps(&self, t: &mut Tables, new_size: u64) -> Result<()> {
        if !self.bitmaps_kept.load(Ordering::Acquire) {
            return Ok(());
        }
        self.store_recorded(t)?;
        let cs = self.cluster_size;
        let mut list = self.bitmap_list(t)?;
        let mut free = Vec::new();
        // Every table entry is checked before anything changes.
        for b in &list {
            self.bitmap_data(b)?;
        }
        for b in &mut list {
            let want = Bitmap::table_entries(new_size, b.granularity_bits, cs);
            if want == b.table_size as u64 {
                continue;
            }
            check_bitmap_size(want, cs)?;
            let mut table = if b.table_size == 0 {
                Vec::new()
            } else {
                read_u64_table(
                    self.file(),
                    b.table_offset,
                    b.table_size as u64,
                    cs,
                    "bitmap table",
                )?
            };
            for &e in table.iter().skip(want as usize) {
                if e & TABLE_OFFSET_MASK != 0 {
                    free.push((e & TABLE_OFFSET_MASK, cs));
                }
            }
            table.resize(want as usize, 0);
            if b.table_size > 0 {
                free.push((b.table_offset, (b.table_size as u64 * 8).div_ceil(cs) * cs));
            }
            b.table_offset = self.write_bitmap_table(t, &table)?;
            b.table_size = want as u32;
        }
        self.check_sole(t, &free)?;
        self.switch_bitmaps(t, &list, free)
    }
}

/// QEMU's limits: a bitmap table of at most 2^27 entries, and at most
/// 512 MiB of bitmap data.
fn check_bitmap_size(entries: u64, cs: u64) -> Result<()> {
    if entries > 1 << 27 || entries.saturating_mul(cs) > 512 << 20 {
        return Err(Error::invalid_argument(
            "the bitmap would be too large (QEMU's limits: 2^27 table entries, 512 MiB of data)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{mem_image, qcow2, reopen};
    use crate::driver::BitmapOp;
    use crate::storage::Storage;

    #[test]
    fn a_bitmap_table_naming_other_metadata_is_refused_not_freed() {
        let (mem, img) = mem_image(1 << 20, &[("cluster_size", "4096")]);
        img.write(&[1u8; 8192], 0).unwrap();
        img.bitmap(&BitmapOp::Add {
            name: "b".into(),
            granularity: Some(512),
            enabled: false,
        })
        .unwrap();
        let list = {
            let q = qcow2(&img);
            let t = q.tables();
            q.bitmap_list(&t).unwrap()
        };
        let l1 = qcow2(&img).tables().header.l1_table_offset;
        img.close().unwrap();
        drop(img);
        // Point the bitmap's first table entry at the L1 table.
        mem.write_at(&l1.to_be_bytes(), list[0].table_offset)
            .unwrap();
        let before = mem.to_vec();
        let img = reopen(&mem);
        let e = img.bitmap(&BitmapOp::Remove("b".into())).unwrap_err();
        assert!(e.to_string().contains("repair it with check -r all"), "{e}");
        let e = img.bitmap(&BitmapOp::Clear("b".into())).unwrap_err();
        assert!(e.to_string().contains("corruptions"), "{e}");
        drop(img);
        // The L1 table is intact and still referenced.
        let img = reopen(&mem);
        let mut b = vec![0u8; 8192];
        img.read(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        assert!(
            mem.to_vec() == before,
            "the refused operations changed the file"
        );
    }

    #[test]
    fn bitmaps_larger_than_qemu_allows_are_refused() {
        let (_mem, img) = mem_image(1 << 45, &[]);
        let e = img
            .bitmap(&BitmapOp::Add {
                name: "huge".into(),
                granularity: Some(512),
                enabled: true,
            })
            .unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }
}
