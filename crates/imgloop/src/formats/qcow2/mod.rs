//! The qcow2 format (QEMU copy-on-write, versions 2 and 3).
//!
//! Split by concern: [`header`] parses and writes the header, [`entry`]
//! decodes L1/L2 entries, [`cache`] holds metadata tables, `alloc` keeps
//! refcounts and allocates clusters, `write` is the write path, `create`
//! makes new images, `compress` handles compressed clusters and `check`
//! verifies and repairs metadata.
//!
//! Locking: all metadata sits behind one mutex ([`Meta`]); guest data I/O
//! happens outside it. Writes that allocate a guest cluster mark it
//! in flight, so two writers never allocate the same guest cluster twice.
//!
//! Crash safety: the caches are write-back. [`Qcow2::flush_meta`] writes
//! refcount blocks first, syncs, then L2 tables, syncs, then L1 entries;
//! data is written before the L2 entry that points to it is even changed
//! in the cache, and refcount decrements are applied only after the L2
//! changes that dropped the references are durable. A crash therefore
//! leaves at worst leaked clusters.

mod alloc;
pub mod bitmap;
pub mod cache;
mod check;
mod compress;
mod create;
mod deflate;
pub mod entry;
pub mod header;
mod snapshot;
mod write;

pub use check::OPEN_FOR_CHECK;

use crate::driver::{
    BackingRef, BlockStatus, CheckReport, CreateOptions, Driver, DriverInfo, DriverOpenOptions,
    Format, IoCtx, Mapping, OptionSpec, Preallocation, RepairMode, ZeroFlags,
};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{FileStorage, Storage};
use cache::TableCache;
use entry::{Cluster, Sub};
use header::{CompressionType, Header};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};

/// qcow2-specific failures, converted into [`Error`] with context.
#[derive(Debug, thiserror::Error)]
pub enum QcowError {
    /// A structure is cut short by the end of the file.
    #[error("truncated {what}: needs {need} bytes, file has {have}")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Bytes it needs.
        need: u64,
        /// Bytes there are.
        have: u64,
    },
    /// A header field holds an invalid value.
    #[error("invalid header field {field} = {value}: {why}")]
    Field {
        /// Field name as in the specification.
        field: &'static str,
        /// Byte offset of the field in the header.
        offset: u64,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A feature imgloop does not implement.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// A table entry is invalid.
    #[error("invalid {table} entry {index}: {why}")]
    Entry {
        /// "L1", "L2", "refcount table".
        table: &'static str,
        /// Entry index.
        index: u64,
        /// Offset of the table.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

impl From<QcowError> for Error {
    fn from(e: QcowError) -> Error {
        let (kind, at) = match &e {
            QcowError::Truncated { what, offset, .. } => (ErrorKind::InvalidFormat, (*what, *offset)),
            QcowError::Field { offset, .. } => (ErrorKind::InvalidFormat, ("header", *offset)),
            QcowError::Unsupported(_) => (ErrorKind::Unsupported, ("", 0)),
            QcowError::Entry { table, offset, .. } => (ErrorKind::Corrupt, (*table, *offset)),
        };
        let err = Error::from_source(kind, e);
        if at.0.is_empty() {
            err
        } else {
            err.at(at.0, at.1)
        }
    }
}

/// The qcow2 format (`-f qcow2`).
pub struct Qcow2Format;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "size",
        kind: "size",
        help: "Virtual disk size",
    },
    OptionSpec {
        name: "compat",
        kind: "string",
        help: "Compatibility level (v2 [0.10], v3 [1.1])",
    },
    OptionSpec {
        name: "cluster_size",
        kind: "size",
        help: "qcow2 cluster size (512 B to 2 MiB)",
    },
    OptionSpec {
        name: "refcount_bits",
        kind: "number",
        help: "Width of a reference count entry in bits (1 to 64)",
    },
    OptionSpec {
        name: "lazy_refcounts",
        kind: "bool",
        help: "Postpone refcount updates",
    },
    OptionSpec {
        name: "extended_l2",
        kind: "bool",
        help: "Extended L2 tables (32 subclusters per cluster)",
    },
    OptionSpec {
        name: "compression_type",
        kind: "string",
        help: "Compression method for compressed clusters (zlib, zstd)",
    },
    OptionSpec {
        name: "preallocation",
        kind: "string",
        help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
    },
    OptionSpec {
        name: "backing_file",
        kind: "string",
        help: "File name of a base image",
    },
    OptionSpec {
        name: "backing_fmt",
        kind: "string",
        help: "Image format of the base image",
    },
    OptionSpec {
        name: "data_file",
        kind: "string",
        help: "File name of an external data file",
    },
    OptionSpec {
        name: "data_file_raw",
        kind: "bool",
        help: "The external data file must stay valid as a raw image",
    },
    OptionSpec {
        name: "encrypt.format",
        kind: "string",
        help: "Encryption (not supported)",
    },
];

impl Format for Qcow2Format {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, header: &[u8], _filename: &Path) -> u32 {
        if header.len() >= 8
            && header[0..4] == header::MAGIC.to_be_bytes()
            && u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")) >= 2
        {
            100
        } else {
            0
        }
    }

    fn open(&self, storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Box<dyn Driver>> {
        Ok(Box::new(Qcow2::open(
            storage,
            opts,
            opts.path.as_deref().and_then(Path::parent),
        )?))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn create(
        &self,
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &CreateOptions,
    ) -> Result<()> {
        create::create(storage, path, opts)
    }
}

/// Mutable metadata state, behind [`Qcow2::meta`].
pub(crate) struct Meta {
    pub(crate) header: Header,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: BTreeSet<usize>,
    pub(crate) l2: TableCache,
    pub(crate) rc_table: Vec<u64>,
    pub(crate) rc: TableCache,
    /// Lowest cluster index that may be free.
    pub(crate) free_hint: u64,
    /// Host ranges whose references were dropped, to be unreferenced once
    /// the dropping L2/L1 updates are durable.
    pub(crate) pending_free: Vec<(u64, u64)>,
    /// Byte offset where the next compressed cluster may go (0: none).
    pub(crate) compressed_tail: u64,
    /// Metadata corruption was detected: no more writes.
    pub(crate) corrupt: bool,
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) data: Arc<dyn Storage>,
    pub(crate) data_file_name: Option<String>,
    /// Guest data lives in an external data file (`data` is not `file`).
    pub(crate) external_data: bool,
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    pub(crate) l2_entries: u64,
    pub(crate) ext_l2: bool,
    pub(crate) v3: bool,
    pub(crate) compression: CompressionType,
    pub(crate) size: AtomicU64,
    pub(crate) read_only: AtomicBool,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) inflight: Mutex<HashSet<u64>>,
    pub(crate) inflight_cv: Condvar,
    /// Held shared by in-place data writes and exclusively while freed
    /// clusters are returned, so no write lands in a reused cluster.
    pub(crate) io_gate: RwLock<()>,
    /// The last decompressed cluster: (host offset, data).
    pub(crate) decompressed: Mutex<Option<(u64, Box<[u8]>)>>,
    /// The image looks preallocated with `preallocation=metadata` (decided
    /// once, on the first block status query; see
    /// [`Qcow2::metadata_preallocated`]).
    pub(crate) metadata_prealloc: OnceLock<bool>,
}

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
    /// Opens a qcow2 image on `storage`. `dir` is the image's directory,
    /// for resolving an external data file name.
    pub fn open(
        storage: Arc<dyn Storage>,
        opts: &DriverOpenOptions,
        dir: Option<&Path>,
    ) -> Result<Qcow2> {
        let header = Header::read(&*storage)?;
        let read_only = opts.read_only;
        let for_check = opts.options.contains_key(OPEN_FOR_CHECK);
        if header.incompatible_features & header::incompat::CORRUPT != 0 && !read_only && !for_check
        {
            return Err(Error::new(ErrorKind::Corrupt, "the image is marked corrupt")
                .with_condition(crate::error::Condition::MarkedCorrupt));
        }
        let cs = header.cluster_size();
        let l2_cache = parse_cache_size(opts, "l2-cache-size", DEFAULT_L2_CACHE)?;
        let rc_cache = parse_cache_size(opts, "refcount-cache-size", (l2_cache / 4).max(4 * cs))?;
        // L1 table: l1_size entries (bounded by the header check).
        let l1 = read_u64_table(
            &*storage,
            header.l1_table_offset,
            header.l1_size as u64,
            "L1 table",
        )?;
        for (i, &e) in l1.iter().enumerate().filter(|_| !for_check) {
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
        let rc_table = read_u64_table(
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
        let data_file_name = header.data_file_name();
        let data: Arc<dyn Storage> = if header.has_data_file() {
            let name = data_file_name.as_deref().ok_or_else(|| {
                Error::invalid_format(
                    "header",
                    0,
                    "external data file feature set but no data file name",
                )
            })?;
            let path = match dir {
                Some(d) if !Path::new(name).is_absolute() => d.join(name),
                _ => PathBuf::from(name),
            };
            Arc::new(FileStorage::open(&path, !read_only).map_err(|e| {
                Error::io(format!("could not open data file '{}'", path.display()), e)
            })?)
        } else {
            storage.clone()
        };
        let meta = Meta {
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new((l2_cache / cs) as usize),
            rc_table,
            rc: TableCache::new((rc_cache / cs) as usize),
            free_hint: 0,
            pending_free: Vec::new(),
            compressed_tail: 0,
            corrupt: false,
            header,
        };
        let h = &meta.header;
        let q = Qcow2 {
            file: storage,
            data,
            data_file_name,
            external_data: h.has_data_file(),
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: h.l2_entries(),
            ext_l2: h.extended_l2(),
            v3: h.version >= 3,
            compression: h.compression_type,
            size: AtomicU64::new(h.size),
            read_only: AtomicBool::new(read_only),
            meta: Mutex::new(meta),
            inflight: Mutex::new(HashSet::new()),
            inflight_cv: Condvar::new(),
            io_gate: RwLock::new(()),
            decompressed: Mutex::new(None),
            metadata_prealloc: OnceLock::new(),
        };
        if !read_only && !for_check {
            q.prepare_for_writing()?;
        }
        Ok(q)
    }

    /// On a read-write open: repair a dirty image and clear autoclear bits
    /// for features imgloop does not maintain.
    fn prepare_for_writing(&self) -> Result<()> {
        let dirty = self.lock().header.incompatible_features & header::incompat::DIRTY != 0;
        if dirty {
            // Lazy refcounts left unflushed: rebuild them before writing.
            self.check_image(Some(RepairMode::All))?;
            let mut m = self.lock();
            m.header.incompatible_features &= !header::incompat::DIRTY;
            self.write_header(&m)?;
        }
        let mut m = self.lock();
        let unknown = m.header.autoclear_features & !header::autoclear::SUPPORTED;
        if unknown != 0 {
            m.header.autoclear_features &= header::autoclear::SUPPORTED;
            self.write_header(&m)?;
            self.file.sync().map_err(|e| Error::io("syncing", e))?;
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the header cluster content.
    pub(crate) fn write_header(&self, m: &Meta) -> Result<()> {
        let bytes = m.header.to_bytes()?;
        self.file
            .write_at(&bytes, 0)
            .map_err(|e| Error::io("writing the header", e))
    }

    /// Reads one metadata cluster.
    pub(crate) fn read_cluster(&self, offset: u64, what: &'static str) -> Result<Box<[u8]>> {
        let mut buf = vec![0u8; self.cluster_size as usize].into_boxed_slice();
        self.file.read_at(&mut buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(
                    what,
                    offset,
                    format!("{what} lies past the end of the file"),
                )
            } else {
                Error::io(format!("reading {what}"), e).at(what, offset)
            }
        })?;
        Ok(buf)
    }

    /// Makes sure the L2 table at `off` is cached, evicting (and writing,
    /// in crash-safe order) another table if the cache is full.
    pub(crate) fn load_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.l2.contains(off) {
            return Ok(());
        }
        if let Some((victim, dirty)) = m.l2.victim_if_full() {
            if dirty {
                self.flush_refcounts(m)?;
                self.sync_file()?;
                self.write_l2(m, victim)?;
            }
            m.l2.remove(victim);
        }
        let t = self.read_cluster(off, "L2 table")?;
        m.l2.insert(off, t, false);
        Ok(())
    }

    fn write_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        if let Some(t) = m.l2.peek(off) {
            self.file
                .write_at(t, off)
                .map_err(|e| Error::io("writing an L2 table", e).at("L2 table", off))?;
        }
        m.l2.mark_clean(off);
        Ok(())
    }

    pub(crate) fn sync_file(&self) -> Result<()> {
        self.file.sync().map_err(|e| Error::io("syncing", e))
    }

    /// Index pair (L1 index, L2 index) of a guest offset.
    pub(crate) fn indices(&self, guest: u64) -> (usize, usize) {
        let cluster = guest >> self.cluster_bits;
        (
            (cluster / self.l2_entries) as usize,
            (cluster % self.l2_entries) as usize,
        )
    }

    /// The L2 table offset for an L1 index (0 when unallocated).
    pub(crate) fn l2_offset(&self, m: &Meta, l1_index: usize) -> u64 {
        m.l1.get(l1_index)
            .map(|e| e & entry::L1_OFFSET_MASK)
            .unwrap_or(0)
    }

    /// Raw (entry, bitmap) of an L2 slot in a cached table.
    pub(crate) fn l2_get(&self, table: &[u8], idx: usize) -> (u64, u64) {
        let w = if self.ext_l2 { 16 } else { 8 };
        let at = idx * w;
        let e = u64::from_be_bytes(table[at..at + 8].try_into().expect("8 bytes"));
        let b = if self.ext_l2 {
            u64::from_be_bytes(table[at + 8..at + 16].try_into().expect("8 bytes"))
        } else {
            0
        };
        (e, b)
    }

    pub(crate) fn l2_set(&self, table: &mut [u8], idx: usize, e: u64, bitmap: u64) {
        let w = if self.ext_l2 { 16 } else { 8 };
        let at = idx * w;
        table[at..at + 8].copy_from_slice(&e.to_be_bytes());
        if self.ext_l2 {
            table[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
        }
    }

    /// The decoded L2 entry of guest cluster `gc` plus its raw bitmap.
    pub(crate) fn lookup(&self, m: &mut Meta, guest: u64) -> Result<(Cluster, u64)> {
        let (i1, i2) = self.indices(guest);
        let l2 = self.l2_offset(m, i1);
        if l2 == 0 {
            return Ok((Cluster::Unallocated, 0));
        }
        self.load_l2(m, l2)?;
        let table = m.l2.get(l2).expect("just loaded");
        let (e, bitmap) = self.l2_get(table, i2);
        let c = entry::decode_in(
            e,
            bitmap,
            self.cluster_bits,
            self.ext_l2,
            self.v3,
            self.external_data,
        )
        .map_err(|why| {
            Error::from(QcowError::Entry {
                table: "L2 table",
                index: i2 as u64,
                offset: l2,
                why: why.describe(),
            })
        })?;
        Ok((c, bitmap))
    }

    /// Where `guest` (up to `max_len` bytes, within one cluster) lives.
    fn map_cluster(
        &self,
        m: &mut Meta,
        guest: u64,
        max_len: u64,
    ) -> Result<(Mapping, u64, Option<u64>)> {
        let cs = self.cluster_size;
        let in_cluster = guest & (cs - 1);
        let mut len = max_len.min(cs - in_cluster);
        let (c, bitmap) = self.lookup(m, guest)?;
        let mapping = match c {
            Cluster::Unallocated => (Mapping::Unallocated, None),
            Cluster::Zero { host, .. } => (Mapping::Zero, host.map(|h| h + in_cluster)),
            Cluster::Compressed { .. } => (Mapping::Special, None),
            Cluster::Normal { host, .. } if !self.ext_l2 => (
                Mapping::Data {
                    host_offset: host + in_cluster,
                },
                Some(host + in_cluster),
            ),
            Cluster::Normal { host, .. } => {
                // Subclusters: the run of equal states from this one on.
                let sc = cs / entry::SUBCLUSTERS as u64;
                let first = (in_cluster / sc) as u32;
                let state = entry::subcluster(bitmap, first);
                let mut last = first + 1;
                while last < entry::SUBCLUSTERS && entry::subcluster(bitmap, last) == state {
                    last += 1;
                }
                len = len.min(last as u64 * sc - in_cluster);
                let host_off = host + in_cluster;
                match state {
                    Sub::Data => (
                        Mapping::Data {
                            host_offset: host_off,
                        },
                        Some(host_off),
                    ),
                    Sub::Zero => (Mapping::Zero, Some(host_off)),
                    // Unallocated, but the host cluster exists: block
                    // status names its offset, as QEMU's does.
                    Sub::Unallocated => (Mapping::Unallocated, Some(host_off)),
                }
            }
        };
        if self.ext_l2 && matches!(c, Cluster::Zero { .. }) {
            // Zero cluster without host: per-subcluster zero or unallocated.
            let sc = cs / entry::SUBCLUSTERS as u64;
            let first = (in_cluster / sc) as u32;
            let state = entry::subcluster(bitmap, first);
            let mut last = first + 1;
            while last < entry::SUBCLUSTERS && entry::subcluster(bitmap, last) == state {
                last += 1;
            }
            len = len.min(last as u64 * sc - in_cluster);
            let m = if state == Sub::Zero {
                Mapping::Zero
            } else {
                Mapping::Unallocated
            };
            return Ok((m, len, None));
        }
        Ok((mapping.0, len, mapping.1))
    }

    /// Flushes dirty refcount blocks and refcount table entries.
    pub(crate) fn flush_refcounts(&self, m: &mut Meta) -> Result<()> {
        for off in m.rc.dirty_offsets() {
            if let Some(b) = m.rc.peek(off) {
                self.file.write_at(b, off).map_err(|e| {
                    Error::io("writing a refcount block", e).at("refcount block", off)
                })?;
            }
            m.rc.mark_clean(off);
        }
        Ok(())
    }

    /// Writes all cached metadata in crash-safe order (see the module docs).
    pub(crate) fn flush_meta(&self, m: &mut Meta) -> Result<()> {
        let l2_dirty = m.l2.dirty_offsets();
        let need_rc = m.rc.any_dirty();
        if need_rc {
            self.flush_refcounts(m)?;
        }
        if !l2_dirty.is_empty() || !m.l1_dirty.is_empty() {
            // Data and refcount increases must be durable before any new
            // reference to them.
            self.sync_file()?;
            if !Arc::ptr_eq(&self.file, &self.data) {
                self.data
                    .sync()
                    .map_err(|e| Error::io("syncing the data file", e))?;
            }
        }
        for off in &l2_dirty {
            self.write_l2(m, *off)?;
        }
        if !m.l1_dirty.is_empty() {
            if !l2_dirty.is_empty() {
                self.sync_file()?;
            }
            let l1_off = m.header.l1_table_offset;
            let dirty: Vec<usize> = std::mem::take(&mut m.l1_dirty).into_iter().collect();
            for i in dirty {
                self.file
                    .write_at(&m.l1[i].to_be_bytes(), l1_off + i as u64 * 8)
                    .map_err(|e| Error::io("writing the L1 table", e).at("L1 table", l1_off))?;
            }
        }
        if !m.pending_free.is_empty() {
            // The dropped references are durable before the refcounts drop.
            self.sync_file()?;
            let _gate = self.io_gate.write().unwrap_or_else(|e| e.into_inner());
            self.apply_pending_frees(m)?;
            self.flush_refcounts(m)?;
        }
        Ok(())
    }

    /// Marks the image corrupt on disk and refuses further writes; returns
    /// `cause` (the damage found) saying so.
    pub(crate) fn mark_corrupt(&self, m: &mut Meta, cause: Error) -> Error {
        m.corrupt = true;
        if self.v3 && !self.read_only.load(Ordering::Acquire) {
            m.header.incompatible_features |= header::incompat::CORRUPT;
            let _ = self.write_header(m);
            let _ = self.file.sync();
        }
        cause
            .with_kind(ErrorKind::Corrupt)
            .noting("the image is now marked corrupt")
            .with_condition(crate::error::Condition::MarkedCorrupt)
    }

    /// Whether the image looks like `preallocation=metadata` made it: more
    /// clusters are in use by refcount than the file has allocated on the
    /// host (by a margin of 1/9, and at least 2 clusters). Decided once per
    /// open, as QEMU does; then block status looks for holes inside data
    /// clusters and reports them as zero.
    pub(crate) fn metadata_preallocated(&self, m: &mut Meta) -> Result<bool> {
        if let Some(&v) = self.metadata_prealloc.get() {
            return Ok(v);
        }
        let cs = self.cluster_size;
        let io = |e| Error::io("reading image size", e);
        let file_len = self.file.len().map_err(io)?;
        let v = match self.file.allocated_size().map_err(io)? {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                let mut in_use = 0;
                let mut c = 0;
                while c < file_len.div_ceil(cs) && in_use < threshold {
                    if self.refcount(m, c)? != 0 {
                        in_use += 1;
                    }
                    c += 1;
                }
                in_use >= threshold
            }
        };
        let _ = self.metadata_prealloc.set(v);
        Ok(v)
    }

    /// The bitmaps of the bitmaps extension, when it is there and marked
    /// consistent (autoclear bit 0); `None` otherwise or when the
    /// directory cannot be read.
    fn consistent_bitmaps(&self, h: &Header) -> Option<Vec<bitmap::Bitmap>> {
        if h.autoclear_features & header::autoclear::BITMAPS == 0 {
            return None;
        }
        let ext = h.extension(header::ext::BITMAPS)?;
        bitmap::read_directory(&*self.file, ext).ok()
    }

    /// The snapshot table for `info` (empty when it cannot be read: `check`
    /// reports that).
    fn snapshot_infos(&self, h: &Header) -> Vec<crate::driver::SnapshotInfo> {
        if h.nb_snapshots == 0 {
            return Vec::new();
        }
        let Ok(t) = snapshot::read_table(&*self.file, h.snapshots_offset, h.nb_snapshots) else {
            return Vec::new();
        };
        t.entries
            .into_iter()
            .map(|s| crate::driver::SnapshotInfo {
                id: s.id,
                name: s.name,
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec as u64,
                date_nsec: s.date_nsec as u64,
                vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
                vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
                icount: s.icount,
            })
            .collect()
    }

    fn check_image(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        check::check(self, repair)
    }
}

/// Reads a table of `count` big-endian u64 entries at `offset` (the part
/// past the end of the file reads as zeroes only if the file ends inside
/// the table's last cluster, as QEMU writes short L1 tables).
pub(crate) fn read_u64_table(
    storage: &dyn Storage,
    offset: u64,
    count: u64,
    what: &'static str,
) -> Result<Vec<u64>> {
    let bytes = count * 8;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    if bytes == 0 {
        return Ok(Vec::new());
    }
    if offset >= file_len {
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

impl Driver for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn request_alignment(&self) -> u32 {
        1
    }

    fn data_storage(&self) -> &dyn Storage {
        &*self.data
    }

    fn file_storage(&self) -> &dyn Storage {
        &*self.file
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let mut m = self.lock();
        let (first, mut len, first_host) = self.map_cluster(&mut m, offset, max_len)?;
        // Merge following clusters of the same kind (contiguous for data).
        while len < max_len && !matches!(first, Mapping::Special) {
            let (next, n, host) = self.map_cluster(&mut m, offset + len, max_len - len)?;
            let same = match (first, next) {
                (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b }) => {
                    a + len == b
                }
                (a, b) => a == b && first_host.is_none() == host.is_none(),
            };
            if !same {
                break;
            }
            len += n;
        }
        Ok((first, len))
    }

    fn read_special(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        compress::read_compressed(self, buf, offset)
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let mut m = self.lock();
        let (mapping, len, host) = self.map_cluster(&mut m, offset, max_len)?;
        let mut s = BlockStatus::of_mapping(mapping, len, host);
        // Merge same-kind neighbours so maps stay short.
        while s.len < max_len {
            let (mp, n, h) = self.map_cluster(&mut m, offset + s.len, max_len - s.len)?;
            let t = BlockStatus::of_mapping(mp, n, h);
            let contiguous = match (s.offset, t.offset) {
                (Some(a), Some(b)) => a + s.len == b,
                (None, None) => true,
                _ => false,
            };
            if t.allocated != s.allocated
                || t.data != s.data
                || t.zero != s.zero
                || t.compressed != s.compressed
                || !contiguous
            {
                break;
            }
            s.len += n;
        }
        if s.data && !s.compressed && self.metadata_preallocated(&mut m)? {
            // Preallocated data clusters that were never written are holes
            // in the data file: they read as zeroes, and say so.
            if let Some(host) = s.offset {
                let (is_data, n) = self
                    .data
                    .extent(host, s.len)
                    .map_err(|e| Error::io("querying allocation of the data file", e))?;
                if !is_data {
                    s.zero = true;
                }
                s.len = n.clamp(1, s.len);
            }
        }
        Ok(s)
    }

    fn write(&self, ctx: &IoCtx, buf: &[u8], offset: u64) -> Result<()> {
        write::write(self, ctx, buf, offset)
    }

    fn write_zeroes(&self, ctx: &IoCtx, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        write::write_zeroes(self, ctx, offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        write::discard(self, offset, len)
    }

    fn compression_unit(&self) -> Option<u64> {
        Some(self.cluster_size)
    }

    fn compress(&self, unit: &[u8]) -> Result<Option<Vec<u8>>> {
        compress::compress_unit(self, unit)
    }

    fn write_compressed(
        &self,
        ctx: &IoCtx,
        plain: &[u8],
        packed: &[u8],
        offset: u64,
    ) -> Result<()> {
        compress::write_compressed(self, ctx, plain, packed, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.lock();
        self.flush_meta(&mut m)
    }

    fn resize(&self, ctx: &IoCtx, new_size: u64, prealloc: Preallocation) -> Result<()> {
        write::resize(self, ctx, new_size, prealloc)
    }

    fn info(&self) -> DriverInfo {
        let m = self.lock();
        let h = &m.header;
        let mut data = serde_json::Map::new();
        let compat = if h.version >= 3 { "1.1" } else { "0.10" };
        data.insert("compat".into(), compat.into());
        let mut lines = vec![("compat".to_string(), compat.to_string())];
        if h.version >= 3 {
            data.insert("compression-type".into(), h.compression_type.name().into());
            lines.push(("compression type".into(), h.compression_type.name().into()));
            let lazy = h.compatible_features & header::compat::LAZY_REFCOUNTS != 0;
            data.insert("lazy-refcounts".into(), lazy.into());
            lines.push(("lazy refcounts".into(), lazy.to_string()));
        } else {
            data.insert("compression-type".into(), h.compression_type.name().into());
            lines.push(("compression type".into(), h.compression_type.name().into()));
        }
        if let Some(list) = self.consistent_bitmaps(h) {
            let mut human = Vec::new();
            let json: Vec<serde_json::Value> = list
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & bitmap::FLAG_IN_USE != 0 {
                        flags.push("in-use");
                    }
                    if b.flags & bitmap::FLAG_AUTO != 0 {
                        flags.push("auto");
                    }
                    let granularity = 1u64 << b.granularity_bits.min(63);
                    human.push(format!(
                        "{} (granularity {granularity}{}{})",
                        b.name,
                        if flags.is_empty() { "" } else { ", " },
                        flags.join(", ")
                    ));
                    serde_json::json!({
                        "flags": flags,
                        "name": b.name,
                        "granularity": granularity,
                    })
                })
                .collect();
            data.insert("bitmaps".into(), json.into());
            lines.push(("bitmaps".into(), human.join("; ")));
        }
        data.insert("refcount-bits".into(), h.refcount_bits().into());
        lines.push(("refcount bits".into(), h.refcount_bits().to_string()));
        let corrupt = h.incompatible_features & header::incompat::CORRUPT != 0;
        if h.version >= 3 {
            data.insert("corrupt".into(), corrupt.into());
            lines.push(("corrupt".into(), corrupt.to_string()));
            data.insert("extended-l2".into(), h.extended_l2().into());
            lines.push(("extended l2".into(), h.extended_l2().to_string()));
        }
        if let Some(df) = &self.data_file_name {
            data.insert("data-file".into(), df.clone().into());
            data.insert("data-file-raw".into(), h.data_file_raw().into());
            lines.push(("data file".into(), df.clone()));
            lines.push(("data file raw".into(), h.data_file_raw().to_string()));
        }
        DriverInfo {
            cluster_size: Some(self.cluster_size),
            dirty: h.incompatible_features & header::incompat::DIRTY != 0,
            format_specific: Some(serde_json::json!({"type": "qcow2", "data": data})),
            human_lines: lines,
            snapshots: self.snapshot_infos(h),
        }
    }

    fn backing(&self) -> Option<BackingRef> {
        let m = self.lock();
        m.header.backing_file.clone().map(|f| BackingRef {
            filename: f,
            format: m.header.backing_format(),
        })
    }

    fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() {
            let mut m = self.lock();
            self.flush_meta(&mut m)?;
        }
        self.check_image(repair)
    }

    fn set_read_only(&self, read_only: bool) -> Result<()> {
        if !read_only {
            if let Some(other) = (!Arc::ptr_eq(&self.file, &self.data)).then_some(&self.data) {
                other
                    .reopen(true)
                    .map_err(|e| Error::io("reopening the data file", e))?;
            }
            let corrupt = self.lock().header.incompatible_features & header::incompat::CORRUPT != 0;
            if corrupt {
                return Err(
                    Error::new(ErrorKind::Corrupt, "the image is marked corrupt")
                        .with_condition(crate::error::Condition::MarkedCorrupt),
                );
            }
            self.read_only.store(false, Ordering::Release);
            self.prepare_for_writing()?;
        } else {
            let mut m = self.lock();
            self.flush_meta(&mut m)?;
            self.read_only.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        if self.read_only.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.lock();
        self.flush_meta(&mut m)?;
        self.sync_file()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::storage::MemStorage;

    /// A new image of `size` bytes with `-o` options `kv`, created and
    /// opened read-write in memory.
    pub(crate) fn mem_image(size: u64, kv: &[(&str, &str)]) -> (MemStorage, Qcow2) {
        let mem = MemStorage::new();
        let mut opts = CreateOptions {
            size,
            ..Default::default()
        };
        for (k, v) in kv {
            opts.options.insert(k.to_string(), v.to_string());
        }
        create::create(Arc::new(mem.clone()), None, &opts).unwrap();
        let q = reopen(&mem);
        (mem, q)
    }

    /// Opens the image in `mem` read-write.
    pub(crate) fn reopen(mem: &MemStorage) -> Qcow2 {
        Qcow2::open(Arc::new(mem.clone()), &DriverOpenOptions::default(), None).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::mem_image;
    use super::*;

    #[test]
    fn unwritten_parts_of_metadata_preallocated_clusters_are_data_reading_as_zero() {
        let (_mem, q) = mem_image(1 << 20, &[("preallocation", "metadata")]);
        q.write(&IoCtx::none(), &[1; 4096], 0).unwrap();
        let s = q.block_status(0, 1 << 20).unwrap();
        assert_eq!((s.data, s.zero, s.len), (true, false, 4096));
        let s = q.block_status(4096, (1 << 20) - 4096).unwrap();
        assert_eq!((s.data, s.zero, s.len), (true, true, (1 << 20) - 4096));
        assert_eq!(s.offset.map(|o| o % 65536), Some(4096));
    }

    #[test]
    fn without_preallocation_written_clusters_are_plain_data() {
        let (_mem, q) = mem_image(1 << 20, &[]);
        q.write(&IoCtx::none(), &[1; 4096], 0).unwrap();
        let s = q.block_status(0, 1 << 20).unwrap();
        assert_eq!((s.data, s.zero, s.len), (true, false, 65536));
    }

    #[test]
    fn unallocated_subclusters_of_an_allocated_cluster_name_its_host_offset() {
        let (_mem, q) = mem_image(1 << 20, &[("extended_l2", "on")]);
        q.write(&IoCtx::none(), &[1; 2048], 4096).unwrap();
        let host = q.block_status(4096, 2048).unwrap().offset.unwrap();
        let s = q.block_status(0, 1 << 20).unwrap();
        assert_eq!(
            (s.allocated, s.len, s.offset),
            (false, 4096, Some(host - 4096))
        );
        let s = q.block_status(6144, 1 << 20).unwrap();
        assert_eq!(
            (s.allocated, s.len, s.offset),
            (false, 65536 - 6144, Some(host + 2048))
        );
        // Unallocated clusters have no host offset.
        let s = q.block_status(65536, 1 << 20).unwrap();
        assert_eq!((s.allocated, s.offset), (false, None));
    }
}
