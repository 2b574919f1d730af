//! Opening a qcow2 image: header, L1 and refcount tables, the external
//! data file (through the open policy), cache sizes.

use super::check::OPEN_FOR_CHECK;
use super::header::{self, Header};
use super::{entry, Qcow2, QcowError, Tables};
use crate::driver::{DriverOpenOptions, RepairMode};
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::formats::header_table::read_header_table;
use crate::formats::table_cache::TableCache;
use crate::inflight::UnitLocks;
use crate::policy::FileRole;
use crate::storage::Storage;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Default L2 cache: 32 MiB, enough for 256 GiB of a 64 KiB-cluster image.
const DEFAULT_L2_CACHE: u64 = 32 << 20;

fn parse_cache_size(opts: &DriverOpenOptions, key: &str, default: u64) -> Result<u64> {
    match opts.options.get(key) {
        Some(v) => crate::size::parse_size(v)
            .map_err(|_| Error::invalid_argument(format!("invalid value '{v}' for {key}"))),
        None => Ok(default),
    }
}

impl Qcow2 {
    /// Opens a qcow2 image on `storage`. An external data file is opened
    /// through `opts.policy`, relative to `opts.path`, read-only when the
    /// image is.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Qcow2> {
        let header = Header::read(&*storage)?;
        let read_only = opts.read_only();
        let for_check = opts.options.contains_key(OPEN_FOR_CHECK);
        if header.incompatible_features & header::incompat::CORRUPT != 0 && !read_only && !for_check
        {
            return Err(
                Error::new(ErrorKind::Corrupt, "the image is marked corrupt")
                    .with_condition(Condition::MarkedCorrupt),
            );
        }
        let cs = header.cluster_size();
        let l2_cache = parse_cache_size(opts, "l2-cache-size", DEFAULT_L2_CACHE)?;
        let rc_cache = parse_cache_size(opts, "refcount-cache-size", (l2_cache / 4).max(4 * cs))?;
        // The header tables (bounded by the header check: 32 MiB, 8 MiB)
        // read as zeroes where they run past the end of the file, as
        // qemu-img reads them, so such an image opens and its data can
        // be recovered.
        let l1 = read_header_table(
            &*storage,
            header.l1_table_offset,
            header.l1_size as u64,
            "L1 table",
        )?;
        // Only the entries the virtual size reaches are ever used; a
        // table longer than that may hold anything past them (qemu-img
        // opens such images too).
        let needed = header.size.div_ceil(cs * header.l2_entries()) as usize;
        for (i, &e) in l1.iter().enumerate().take(needed).filter(|_| !for_check) {
            if e & entry::L1_RESERVED != 0 || !(e & entry::L1_OFFSET_MASK).is_multiple_of(cs) {
                return Err(QcowError::Entry {
                    table: "L1 table",
                    index: i as u64,
                    offset: header.l1_table_offset,
                    why: "reserved bits set or L2 offset not cluster-aligned",
                }
                .into());
            }
        }
        let rc_entries = header.refcount_table_clusters as u64 * cs / 8;
        let rc_table = read_header_table(
            &*storage,
            header.refcount_table_offset,
            rc_entries,
            "refcount table",
        )?;
        for (i, &e) in rc_table.iter().enumerate().filter(|_| !for_check) {
            if e % cs != 0 {
                return Err(QcowError::Entry {
                    table: "refcount table",
                    index: i as u64,
                    offset: header.refcount_table_offset,
                    why: "refcount block offset not cluster-aligned",
                }
                .into());
            }
        }
        let crypt =
            super::crypt::Encryption::open(&*storage, &header, &opts.options, &opts.secrets)?;
        let metadata_only =
            for_check || opts.options.contains_key(super::check::OPEN_METADATA_ONLY);
        if let Some(c) = &crypt {
            if !metadata_only {
                // As qemu: the data is unusable without the key, so the
                // open fails (info and check need no key).
                c.key()?;
            }
        }
        let data_file_name = header.data_file_name();
        let mut storages = vec![storage];
        if header.has_data_file() {
            let name = data_file_name.as_deref().ok_or_else(|| {
                Error::invalid_format(
                    "header",
                    0,
                    "external data file feature set but no data file name",
                )
            })?;
            // A storage the caller provides for the name wins; otherwise
            // the file opens through the policy.
            let data: Arc<dyn Storage> = match opts.companions.get(name) {
                Some(s) => s.clone(),
                None => Arc::new(opts.policy.open(
                    FileRole::DataFile,
                    opts.path.as_deref(),
                    name,
                    !read_only,
                )?),
            };
            storages.push(data);
        }
        let tables = Tables {
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new((l2_cache / cs) as usize),
            rc_table,
            rc_table_dirty: BTreeSet::new(),
            rc: TableCache::new((rc_cache / cs) as usize),
            free_hint: 0,
            pending_free: Vec::new(),
            compressed_tail: 0,
            corrupt: false,
            header,
        };
        let h = &tables.header;
        let image = Qcow2 {
            storages,
            data_file_name,
            external_data: h.has_data_file(),
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: h.l2_entries(),
            l2_bits: h.l2_entries().trailing_zeros(),
            ext_l2: h.extended_l2(),
            v3: std::sync::atomic::AtomicBool::new(h.version >= 3),
            compression: h.compression_type,
            size: AtomicU64::new(h.size),
            state: opts.state.clone(),
            tables: RwLock::new(tables),
            flush_lock: Mutex::new(()),
            units: UnitLocks::new(),
            decompressed: Mutex::new(None),
            metadata_prealloc: OnceLock::new(),
            snapshot_view: false,
            crypt,
            bitmaps_kept: std::sync::atomic::AtomicBool::new(false),
            recording: std::sync::atomic::AtomicBool::new(false),
            live_bitmaps: Mutex::new(Vec::new()),
            bitmap_cache: Mutex::new(Vec::new()),
        };
        let view = ["snapshot", "snapshot.id", "snapshot.name"]
            .iter()
            .any(|k| opts.options.contains_key(*k));
        let mut image = image;
        image.snapshot_view = view;
        if view {
            if !read_only {
                return Err(Error::invalid_argument(
                    "an internal snapshot opens read-only (as qemu-img's -l does)",
                ));
            }
            image.load_snapshot_view(
                opts.options.get("snapshot").map(String::as_str),
                &crate::driver::SnapshotSelector {
                    id: opts.options.get("snapshot.id").cloned(),
                    name: opts.options.get("snapshot.name").cloned(),
                },
            )?;
        }
        if !read_only && !for_check {
            image.prepare_for_writing()?;
        }
        Ok(image)
    }

    /// On a read-write open: repair a dirty image and clear autoclear bits
    /// for features imgloop does not maintain.
    pub(super) fn prepare_for_writing(&self) -> Result<()> {
        let dirty = self.tables().header.incompatible_features & header::incompat::DIRTY != 0;
        if dirty {
            // Lazy refcounts left unflushed: rebuild them before writing.
            self.check_image(Some(RepairMode::All))?;
            let mut tables = self.tables_mut();
            tables.header.incompatible_features &= !header::incompat::DIRTY;
            self.write_header(&tables)?;
        }
        let mut tables = self.tables_mut();
        // Valid bitmaps stay valid until guest data changes (bitmap_ops).
        let keep = self.keep_bitmaps_at_open(&tables);
        self.bitmaps_kept
            .store(keep, std::sync::atomic::Ordering::Release);
        let kept = header::autoclear::SUPPORTED | if keep { header::autoclear::BITMAPS } else { 0 };
        let unknown = tables.header.autoclear_features & !kept;
        if unknown != 0 {
            tables.header.autoclear_features &= kept;
            self.write_header(&tables)?;
            self.sync_file()?;
        }
        Ok(())
    }
}

/// Reads a table of `count` big-endian u64 entries at `offset`. The table
/// must end within the last cluster (of `cluster_size` bytes) the file
/// touches: the part past the end of the file reads as zeroes then, as
/// QEMU writes short L1 tables, and a table reaching further is an error
/// before anything is allocated for it.
pub(crate) fn read_u64_table(
    storage: &dyn Storage,
    offset: u64,
    count: u64,
    cluster_size: u64,
    what: &'static str,
) -> Result<Vec<u64>> {
    let bytes = count
        .checked_mul(8)
        .ok_or_else(|| Error::overflow(what, offset, "table size"))?;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    if bytes == 0 {
        return Ok(Vec::new());
    }
    let file_end = file_len.div_ceil(cluster_size).saturating_mul(cluster_size);
    if offset >= file_len || offset.checked_add(bytes).is_none_or(|end| end > file_end) {
        return Err(Error::corrupt(
            what,
            offset,
            format!("{what} lies past the end of the file"),
        ));
    }
    let avail = (file_len - offset).min(bytes);
    let mut buf = vec![0u8; bytes as usize];
    storage
        .read_at(&mut buf[..avail as usize], offset)
        .map_err(|e| Error::io(format!("reading {what}"), e).at(what, offset))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}
