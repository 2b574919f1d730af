//! Changing the virtual size of a qcow2 image.

use super::entry::{self, Cluster};
use super::{header, write, Qcow2};
use crate::driver::Preallocation;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;

/// Changes the virtual size (the generic layer keeps writes out).
pub(super) fn resize(img: &Qcow2, new_size: u64, prealloc: Preallocation) -> Result<()> {
    if prealloc != Preallocation::Off && img.crypt.is_some() {
        return Err(Error::unsupported(
            "preallocation of encrypted images (preallocated clusters would not decrypt to zeroes)",
        ));
    }
    if new_size > header::MAX_VIRTUAL_SIZE {
        return Err(Error::invalid_argument("new size is too large for qcow2"));
    }
    if !img.v3() && img.tables().header.nb_snapshots > 0 {
        // Version 2 snapshot entries need not record their disk size, so
        // qemu-img refuses this too.
        return Err(Error::unsupported(
            "Can't resize a v2 image which has snapshots",
        ));
    }
    let cs = img.cluster_size;
    let old = img.size.load(Ordering::Acquire);
    if new_size < old {
        // Free everything past the new end (whole clusters).
        let from = new_size.div_ceil(cs) * cs;
        if from < old {
            write::unallocate(img, from, old)?;
        }
    }
    let _serial = img.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut tables = img.tables_mut();
    if tables.corrupt || img.read_only() {
        return Err(Error::read_only("resize"));
    }
    img.flush_held(&mut tables)?;
    let per_l1 = cs * img.l2_entries;
    let need = new_size.div_ceil(per_l1);
    if need > tables.l1.len() as u64 {
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Error::invalid_argument(
                "new size needs an L1 table larger than 32 MiB",
            ));
        }
        let clusters = (need * 8).div_ceil(cs);
        let new_off = img.alloc_clusters(&mut tables, clusters)?;
        let mut l1 = tables.l1.clone();
        l1.resize(need as usize, 0);
        let mut bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((clusters * cs) as usize, 0);
        // The new table's refcounts, then the table, then the header.
        img.flush_held(&mut tables)?;
        img.file()
            .write_at(&bytes, new_off)
            .map_err(|e| Error::io("writing the new L1 table", e))?;
        img.sync_file()?;
        let old_off = tables.header.l1_table_offset;
        let old_bytes = tables.l1.len() as u64 * 8;
        tables.header.l1_table_offset = new_off;
        tables.header.l1_size = need as u32;
        tables.header.size = new_size;
        img.write_header(&tables)?;
        img.sync_file()?;
        tables.l1 = l1;
        if old_bytes > 0 {
            img.release_range(&mut tables, old_off, old_bytes.div_ceil(cs) * cs);
        }
    } else {
        tables.header.size = new_size;
        img.write_header(&tables)?;
        img.sync_file()?;
    }
    img.size.store(new_size, Ordering::Release);
    // Bitmaps follow the disk, as QEMU resizes them.
    img.resize_bitmaps(&mut tables, new_size)?;
    if prealloc != Preallocation::Off && new_size > old {
        drop(tables);
        drop(_serial);
        return preallocate_range(img, old, new_size, prealloc);
    }
    if img.external_data {
        // The data file follows the disk size, as at creation.
        img.data()
            .set_len(new_size)
            .map_err(|e| Error::io("resizing the data file", e))?;
        if tables.header.data_file_raw() && new_size > old {
            // Every new guest cluster maps to its place in the raw data
            // file, as in a new image.
            let bitmap = if img.ext_l2 { entry::ALL_ALLOC } else { 0 };
            let mut g = old.div_ceil(cs) * cs;
            while g < new_size {
                if img.lookup(&mut tables, g)?.0 == Cluster::Unallocated {
                    img.set_l2(&mut tables, g, g | entry::COPIED, bitmap)?;
                }
                g += cs;
            }
            img.flush_held(&mut tables)?;
        }
    }
    Ok(())
}

/// Allocates the L2 tables and data clusters of the guest range
/// `[from, to)` that have none (`metadata`), and with `falloc` or `full`
/// reserves or zeroes their space, as `qemu-img resize --preallocation`
/// does for the added part of the disk.
fn preallocate_range(img: &Qcow2, from: u64, to: u64, mode: Preallocation) -> Result<()> {
    let cs = img.cluster_size;
    let mut fresh: Vec<u64> = Vec::new();
    let mut g = from - from % cs;
    while g < to {
        let _claim = img.units.lock(g >> img.cluster_bits);
        let mut tables = img.tables_mut();
        img.l2_for_write(&mut tables, g)?;
        if img.lookup(&mut tables, g)?.0 == Cluster::Unallocated {
            let host = if img.external_data {
                g
            } else {
                img.alloc_clusters(&mut tables, 1)?
            };
            let bitmap = if img.ext_l2 { entry::ALL_ALLOC } else { 0 };
            img.set_l2(&mut tables, g, host | entry::COPIED, bitmap)?;
            fresh.push(host);
        }
        let full = tables.l2.over_capacity() || tables.rc.over_capacity();
        drop(tables);
        if full {
            img.flush_meta()?;
        }
        g += cs;
    }
    let data = img.data();
    let io = |what: &'static str| move |e| Error::io(what, e);
    // The space first (it reads as zeroes), then the metadata naming it.
    let end = fresh.iter().map(|h| h + cs).max().unwrap_or(0);
    if end > data.len().map_err(io("reading the file size"))? {
        data.set_len(end).map_err(io("extending the file"))?;
    }
    for &h in &fresh {
        match mode {
            Preallocation::Falloc => data.allocate(h, cs).map_err(io("preallocating"))?,
            Preallocation::Full => data
                .zero_range(h, cs, false)
                .map_err(io("writing zeroes"))?,
            _ => {}
        }
    }
    img.flush_meta()
}
