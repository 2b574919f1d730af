//! The qcow2 format (QEMU copy-on-write, versions 2 and 3).
//!
//! Split by concern: [`header`] parses and writes the header, [`entry`]
//! decodes L1/L2 entries, `open` opens images and their data files,
//! `tables` holds the metadata state and looks entries up, `mapping`
//! answers reads and block status, `write` answers writes, write-zeroes
//! and discard and publishes their metadata, `alloc` keeps refcounts and
//! allocates clusters, the shared [`TableCache`](super::table_cache::TableCache) holds metadata tables, `flush` writes
//! them back in crash-safe order, `resize`, `create`, `compress` (through
//! the shared `deflate`), `check`, `info`, [`bitmap`] and `snapshot` do the rest.
//!
//! Locking: metadata sits behind one reader/writer lock ([`Tables`]).
//! Reads take it shared (one acquisition for a request spanning many
//! clusters) and never do I/O under it: an L2 table that is not cached is
//! read without any lock and inserted afterwards. Writes that only reuse
//! allocated clusters also map under the shared lock; allocating writes
//! claim their guest cluster ([`UnitLocks`]), reserve space under the
//! exclusive lock, and publish the L2 entry in [`Driver::commit`] after
//! the generic layer wrote the data. Guest data I/O never holds the lock.
//!
//! Crash safety: the caches are write-back, and only the flush writes
//! them (`flush`): refcount blocks, then a sync of the image and data
//! files, then L2 tables, a sync, then L1 entries; refcount decrements
//! are applied only after the L2 changes that dropped the references are
//! durable, and freed clusters are reused only once no request that
//! could still see them is in flight ([`RequestTracker`]). A crash
//! therefore leaves at worst leaked clusters.
//!
//! [`RequestTracker`]: crate::inflight::RequestTracker

mod alloc;
mod amend;
pub mod bitmap;
mod bitmap_data;
mod bitmap_ops;
#[cfg(test)]
mod bitmap_tests;
mod check;
mod compress;
mod create;
mod crypt;
#[cfg(test)]
mod crypt_tests;
pub mod entry;
mod flush;
pub mod header;
mod info;
mod mapping;
mod open;
mod resize;
mod snapshot;
mod snapshot_ops;
#[cfg(test)]
mod snapshot_tests;
mod tables;
mod write;

pub use amend::AMEND_HELP;
pub use check::{OPEN_FOR_CHECK, OPEN_METADATA_ONLY};
pub use compress::DecompressError;
pub(crate) use tables::Tables;

use crate::driver::{
    BackingRef, BlockStatus, CheckReport, Commit, CreateOptions, DiscardMapping, Driver,
    DriverInfo, DriverOpenOptions, Format, Mapping, OptionSpec, Preallocation, RepairMode,
    WriteMapping, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::inflight::UnitLocks;
use crate::state::{Mode, OpenState};
use crate::storage::Storage;
use header::CompressionType;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// qcow2-specific failures, kept as the typed source of an [`Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
            QcowError::Truncated { what, offset, .. } => {
                (ErrorKind::InvalidFormat, Some((*what, *offset)))
            }
            QcowError::Field { offset, .. } => {
                (ErrorKind::InvalidFormat, Some(("header", *offset)))
            }
            QcowError::Unsupported(_) => (ErrorKind::Unsupported, None),
            QcowError::Entry { table, offset, .. } => (ErrorKind::Corrupt, Some((*table, *offset))),
        };
        let err = Error::from_source(kind, e);
        match at {
            Some((what, offset)) => err.at(what, offset),
            None => err,
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
        help: "Encrypt the image, format choices: 'aes', 'luks'",
    },
    OptionSpec {
        name: "encrypt.key-secret",
        kind: "string",
        help: "ID of secret providing qcow AES key or LUKS passphrase",
    },
    OptionSpec {
        name: "encrypt.cipher-alg",
        kind: "string",
        help: "Name of encryption cipher algorithm (aes-128, aes-192, aes-256)",
    },
    OptionSpec {
        name: "encrypt.cipher-mode",
        kind: "string",
        help: "Name of encryption cipher mode (ecb, cbc, ctr, xts)",
    },
    OptionSpec {
        name: "encrypt.ivgen-alg",
        kind: "string",
        help: "Name of IV generator algorithm (plain, plain64, essiv)",
    },
    OptionSpec {
        name: "encrypt.ivgen-hash-alg",
        kind: "string",
        help: "Name of IV generator hash algorithm",
    },
    OptionSpec {
        name: "encrypt.hash-alg",
        kind: "string",
        help: "Name of encryption hash algorithm",
    },
    OptionSpec {
        name: "encrypt.iter-time",
        kind: "number",
        help: "Time to spend in PBKDF in milliseconds",
    },
    OptionSpec {
        name: "encryption",
        kind: "bool",
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
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
        Ok(Box::new(Qcow2::open(storage, opts)?))
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

    fn measure(
        &self,
        opts: &CreateOptions,
        source: Option<&crate::Image>,
    ) -> Result<crate::driver::Measure> {
        create::measure(opts, source)
    }
}

/// An open qcow2 image.
pub struct Qcow2 {
    /// The image file, then the external data file when there is one.
    pub(crate) storages: Vec<Arc<dyn Storage>>,
    /// Name of the external data file, as stored in the header.
    pub(crate) data_file_name: Option<String>,
    /// Guest data lives in an external data file (storage 1).
    pub(crate) external_data: bool,
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    pub(crate) l2_entries: u64,
    /// log2 of `l2_entries` (a power of two).
    pub(crate) l2_bits: u32,
    pub(crate) ext_l2: bool,
    /// Version 3 (or later); changes only by `amend`.
    pub(crate) v3: std::sync::atomic::AtomicBool,
    pub(crate) compression: CompressionType,
    pub(crate) size: AtomicU64,
    /// Read-only or read-write, and the requests in flight: shared with
    /// the generic layer.
    pub(crate) state: Arc<OpenState>,
    /// All metadata.
    pub(crate) tables: RwLock<Tables>,
    /// Serializes flushes (and repairs), which write the caches out.
    pub(crate) flush_lock: Mutex<()>,
    /// Claims on guest clusters being allocated.
    pub(crate) units: Arc<UnitLocks>,
    /// The last decompressed cluster: (host offset, data).
    pub(crate) decompressed: Mutex<Option<(u64, Box<[u8]>)>>,
    /// The image looks preallocated with `preallocation=metadata` (decided
    /// once, on the first block status query; see
    /// [`Qcow2::metadata_preallocated`]).
    pub(crate) metadata_prealloc: OnceLock<bool>,
    /// Opened read-only to show an internal snapshot.
    pub(crate) snapshot_view: bool,
    /// The encryption of guest data (LUKS or legacy AES), if any.
    pub(crate) crypt: Option<crypt::Encryption>,
    /// Read-write: the persistent bitmaps are still valid (see
    /// `bitmap_ops`).
    pub(crate) bitmaps_kept: std::sync::atomic::AtomicBool,
    /// Guest writes are being recorded in `live_bitmaps` (see
    /// `bitmap_data`).
    pub(crate) recording: std::sync::atomic::AtomicBool,
    /// The enabled bitmaps, by name, while recording.
    pub(crate) live_bitmaps: Mutex<Vec<(String, crate::DirtyBitmap)>>,
    /// Bitmaps read for `bitmap_status`, dropped at every change of the
    /// bitmap directory.
    pub(crate) bitmap_cache: Mutex<Vec<(String, Arc<crate::DirtyBitmap>)>>,
}

impl Qcow2 {
    /// The image is version 3 (zero flags, feature bits).
    pub(crate) fn v3(&self) -> bool {
        self.v3.load(Ordering::Acquire)
    }

    /// The image file.
    pub(crate) fn file(&self) -> &dyn Storage {
        &*self.storages[0]
    }

    /// Where guest data lives: the data file, or the image file.
    pub(crate) fn data(&self) -> &dyn Storage {
        &**self
            .storages
            .last()
            .expect("the image file is always there")
    }

    /// The [`StorageId`](crate::StorageId) of [`data`](Qcow2::data).
    pub(crate) fn data_id(&self) -> crate::StorageId {
        crate::StorageId((self.storages.len() - 1) as u16)
    }

    /// True when the image is open read-only (a closed image still
    /// flushes what it has).
    pub(crate) fn read_only(&self) -> bool {
        self.state.mode() == Mode::ReadOnly
    }

    /// The metadata, shared (the read path).
    pub(crate) fn tables(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata, exclusively (metadata changes).
    pub(crate) fn tables_mut(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Index pair (L1 index, L2 index) of a guest offset.
    pub(crate) fn indices(&self, guest: u64) -> (usize, usize) {
        let cluster = guest >> self.cluster_bits;
        (
            (cluster >> self.l2_bits) as usize,
            (cluster & (self.l2_entries - 1)) as usize,
        )
    }

    pub(crate) fn sync_file(&self) -> Result<()> {
        self.file()
            .sync()
            .map_err(|e| Error::io("syncing the image file", e))
    }

    /// Makes data and metadata written so far durable in every storage.
    pub(crate) fn sync_storages(&self) -> Result<()> {
        crate::driver::sync_all(&self.storages)
    }

    fn check_image(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        check::check(self, repair)
    }
}

impl Driver for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn storages(&self) -> &[Arc<dyn Storage>] {
        &self.storages
    }

    fn request_alignment(&self) -> u32 {
        // Encrypted data is sealed in whole sectors.
        if self.crypt.is_some() {
            512
        } else {
            1
        }
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.map_range(offset, max_len)
    }

    fn data_cipher(&self) -> Result<Option<&dyn crate::driver::DataCipher>> {
        match &self.crypt {
            None => Ok(None),
            Some(c) => Ok(Some(c.key()? as &dyn crate::driver::DataCipher)),
        }
    }

    fn read_transformed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        compress::read_compressed(self, buf, offset)
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        self.status_range(offset, max_len)
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        self.before_data_change(offset, len)?;
        write::map_write(self, offset, len)
    }

    fn commit(&self, commit: Commit) -> Result<()> {
        write::commit(self, commit)
    }

    fn abort(&self, commit: Commit) {
        write::abort(self, commit)
    }

    fn map_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<ZeroMapping> {
        self.before_data_change(offset, len)?;
        write::map_zeroes(self, offset, len, flags)
    }

    fn map_discard(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        self.before_data_change(offset, len)?;
        write::map_discard(self, offset, len)
    }

    fn compression_unit(&self) -> Option<u64> {
        Some(self.cluster_size)
    }

    fn compress(&self, unit: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.crypt.is_some() {
            // qemu stores such clusters unencrypted; imgloop refuses, as
            // qemu-img convert does.
            return Err(Error::unsupported(
                "Compression and encryption not supported at the same time",
            ));
        }
        compress::compress_unit(self, unit)
    }

    fn write_compressed(&self, packed: &[u8], offset: u64) -> Result<bool> {
        self.before_data_change(offset, self.cluster_size)?;
        compress::write_compressed(self, packed, offset)
    }

    fn flush(&self) -> Result<()> {
        self.flush_meta()
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        resize::resize(self, new_size, prealloc)
    }

    fn info(&self) -> DriverInfo {
        self.driver_info()
    }

    fn backing(&self) -> Option<BackingRef> {
        let tables = self.tables();
        tables.header.backing_file.clone().map(|f| BackingRef {
            filename: f,
            format: tables.header.backing_format(),
        })
    }

    fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() {
            self.flush_meta()?;
        }
        self.check_image(repair)
    }

    fn set_backing(&self, backing: Option<(&str, Option<&str>)>) -> Result<()> {
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = self.tables_mut();
        self.check_writable(&tables)?;
        if self.external_data && tables.header.data_file_raw() && backing.is_some() {
            return Err(Error::invalid_argument(
                "data_file_raw cannot be used with a backing file",
            ));
        }
        self.flush_held(&mut tables)?;
        let h = &mut tables.header;
        match backing {
            Some((name, format)) => {
                if name.is_empty() || name.len() > header::MAX_BACKING_NAME as usize {
                    return Err(Error::invalid_argument(
                        "the backing file name must be 1 to 1023 bytes",
                    ));
                }
                h.backing_file = Some(name.to_string());
                h.backing_file_size = name.len() as u32;
                h.set_extension(
                    header::ext::BACKING_FORMAT,
                    format.map(|f| f.as_bytes().to_vec()),
                );
            }
            None => {
                h.backing_file = None;
                h.backing_file_size = 0;
                h.backing_file_offset = 0;
                h.set_extension(header::ext::BACKING_FORMAT, None);
            }
        }
        self.write_header(&tables)?;
        self.sync_file()
    }

    fn make_empty(&self) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        self.before_data_change(0, size)?;
        write::unallocate(self, 0, size)?;
        self.flush_meta()
    }

    fn bitmap(&self, op: &crate::driver::BitmapOp) -> Result<()> {
        use crate::driver::BitmapOp;
        match op {
            BitmapOp::Add {
                name,
                granularity,
                enabled,
            } => self.add_bitmap(name, *granularity, *enabled),
            BitmapOp::Remove(_) | BitmapOp::Clear(_) => {
                // Freeing clusters of a damaged image could free what other
                // metadata still uses: such an image is repaired first.
                self.flush_meta()?;
                let r = self.check_image(None)?;
                if r.corruptions > 0 {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "the image has {} corruptions (its metadata is shared with other \
                             metadata or damaged); repair it with check -r all first",
                            r.corruptions
                        ),
                    ));
                }
                match op {
                    BitmapOp::Remove(n) => self.remove_bitmap(n),
                    BitmapOp::Clear(n) => self.clear_bitmap(n),
                    _ => unreachable!("matched above"),
                }
            }
            BitmapOp::Enable(n) => self.enable_bitmap(n, true),
            BitmapOp::Disable(n) => self.enable_bitmap(n, false),
            BitmapOp::Merge { target, source } => self.merge_bitmap(target, source),
        }
    }

    fn bitmap_read(&self, name: &str) -> Result<crate::DirtyBitmap> {
        self.bitmap_bits(name)
    }

    fn bitmap_status(&self, name: &str, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.bitmap_range_status(name, offset, max_len)
    }

    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        if !self.v3() {
            return None;
        }
        let tables = self.tables();
        let list = self.consistent_bitmaps(&tables.header).unwrap_or_default();
        Some(
            list.iter()
                .map(|b| (b.name.clone(), 1u64 << b.granularity_bits.min(63)))
                .collect(),
        )
    }

    fn amend(&self, opts: &crate::driver::AmendOptions) -> Result<()> {
        self.store_recorded_bitmaps()?;
        amend::amend(self, opts)
    }

    fn snapshot_create(&self, name: &str) -> Result<()> {
        self.create_snapshot(name)
    }

    fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.before_data_change(0, self.size.load(Ordering::Acquire))?;
        self.apply_snapshot(key)
    }

    fn shows_snapshot(&self) -> bool {
        self.snapshot_view
    }

    fn snapshot_delete(&self, sel: &crate::driver::SnapshotSelector) -> Result<()> {
        self.delete_snapshot(sel)
    }

    fn set_read_only(&self, read_only: bool) -> Result<()> {
        if read_only {
            // What close would write: the recorded bitmaps, stored and no
            // longer marked in use, and the metadata, durable.
            self.store_recorded_bitmaps()?;
            self.flush_meta()?;
            return self.sync_file();
        }
        let corrupt = self.tables().header.incompatible_features & header::incompat::CORRUPT != 0;
        if corrupt {
            return Err(
                Error::new(ErrorKind::Corrupt, "the image is marked corrupt")
                    .with_condition(crate::error::Condition::MarkedCorrupt),
            );
        }
        self.prepare_for_writing()
    }

    fn close(&self) -> Result<()> {
        if self.read_only() {
            return Ok(());
        }
        self.store_recorded_bitmaps()?;
        self.flush_meta()?;
        self.sync_file()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::storage::MemStorage;
    use crate::Image;

    /// A new image of `size` bytes with `-o` options `kv`, created and
    /// opened read-write in memory.
    pub(crate) fn mem_image(size: u64, kv: &[(&str, &str)]) -> (MemStorage, Image) {
        let mem = MemStorage::new();
        let mut opts = CreateOptions {
            size,
            ..Default::default()
        };
        for (k, v) in kv {
            opts.options.insert(k.to_string(), v.to_string());
        }
        create::create(Arc::new(mem.clone()), None, &opts).unwrap();
        let img = reopen(&mem);
        (mem, img)
    }

    /// Opens the image in `mem` read-write.
    pub(crate) fn reopen(mem: &MemStorage) -> Image {
        Image::open_storage(Arc::new(mem.clone()), Some("qcow2"), false, None).unwrap()
    }

    /// The qcow2 driver of `img`.
    pub(crate) fn qcow2(img: &Image) -> &Qcow2 {
        img.driver()
            .as_any()
            .downcast_ref::<Qcow2>()
            .expect("a qcow2 image")
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::mem_image;
    use super::*;

    #[test]
    fn unwritten_parts_of_metadata_preallocated_clusters_are_data_reading_as_zero() {
        let (_mem, img) = mem_image(1 << 20, &[("preallocation", "metadata")]);
        img.write(&[1; 4096], 0).unwrap();
        let s = img.block_status(0, 1 << 20).unwrap();
        assert_eq!((s.data, s.zero, s.len), (true, false, 4096));
        let s = img.block_status(4096, (1 << 20) - 4096).unwrap();
        assert_eq!((s.data, s.zero, s.len), (true, true, (1 << 20) - 4096));
        assert_eq!(s.offset.map(|o| o % 65536), Some(4096));
    }

    #[test]
    fn without_preallocation_written_clusters_are_plain_data() {
        let (_mem, img) = mem_image(1 << 20, &[]);
        img.write(&[1; 4096], 0).unwrap();
        let s = img.block_status(0, 1 << 20).unwrap();
        assert_eq!((s.data, s.zero, s.len), (true, false, 65536));
    }

    #[test]
    fn unallocated_subclusters_of_an_allocated_cluster_name_its_host_offset() {
        let (_mem, img) = mem_image(1 << 20, &[("extended_l2", "on")]);
        img.write(&[1; 2048], 4096).unwrap();
        let host = img.block_status(4096, 2048).unwrap().offset.unwrap();
        let s = img.block_status(0, 1 << 20).unwrap();
        assert_eq!(
            (s.allocated, s.len, s.offset),
            (false, 4096, Some(host - 4096))
        );
        let s = img.block_status(6144, 1 << 20).unwrap();
        assert_eq!(
            (s.allocated, s.len, s.offset),
            (false, 65536 - 6144, Some(host + 2048))
        );
        // Unallocated clusters have no host offset.
        let s = img.block_status(65536, 1 << 20).unwrap();
        assert_eq!((s.allocated, s.offset), (false, None));
    }

    #[test]
    fn block_status_of_a_sparse_image_is_one_run_per_kind_whatever_the_virtual_size() {
        let (_mem, img) = mem_image(4 << 40, &[]);
        let s = img.block_status(0, 4 << 40).unwrap();
        assert_eq!((s.allocated, s.len), (false, 4 << 40));
        img.write(&[1; 65536], 2 << 40).unwrap();
        let s = img.block_status(0, 4 << 40).unwrap();
        assert_eq!((s.allocated, s.len), (false, 2 << 40));
        let s = img.block_status(2 << 40, 4 << 40).unwrap();
        assert_eq!((s.allocated, s.data, s.len), (true, true, 65536));
        let rest = (2 << 40) - 65536;
        let s = img.block_status((2 << 40) + 65536, rest).unwrap();
        assert_eq!((s.allocated, s.len), (false, rest));
        assert_eq!(img.map_entries(0, u64::MAX).unwrap().len(), 3);
    }

    #[test]
    fn block_status_of_a_huge_sparse_file_costs_what_its_refcount_blocks_hold() {
        // A hostile file: a small valid image, then a huge apparent
        // length. Deciding whether it is metadata-preallocated must not
        // walk every cluster of that length (2^31 here).
        let (mem, img) = mem_image(1 << 20, &[("cluster_size", "512")]);
        drop(img);
        use crate::storage::Storage;
        mem.set_len(1 << 40).unwrap();
        let img = super::testutil::reopen(&mem);
        let s = img.block_status(0, 1 << 20).unwrap();
        assert!(!s.allocated);
    }

    #[test]
    fn a_compressed_stream_beyond_what_a_descriptor_can_hold_is_stored_plainly() {
        let mem = crate::storage::MemStorage::with_limit(1 << 52);
        let mut opts = CreateOptions {
            size: 4 << 20,
            ..Default::default()
        };
        opts.options.insert("cluster_size".into(), "2M".into());
        create::create(Arc::new(mem.clone()), None, &opts).unwrap();
        let img = super::testutil::reopen(&mem);
        let q = super::testutil::qcow2(&img);
        // Allocation continues at 512 TiB, where 2 MiB-cluster compressed
        // descriptors (49 offset bits) end.
        q.tables_mut().free_hint = (1u64 << 49) / (2 << 20);
        let data: Vec<u8> = (0..2u32 << 20).map(|i| (i / 4096) as u8).collect();
        img.write_compressed(&data, 0).unwrap();
        let (c, _) = q.lookup(&mut q.tables_mut(), 0).unwrap();
        assert!(
            matches!(c, entry::Cluster::Normal { host, .. } if host >= 1 << 49),
            "{c:?}"
        );
        let mut back = vec![0u8; data.len()];
        img.read(&mut back, 0).unwrap();
        assert!(back == data);
    }

    #[test]
    fn a_table_reaching_past_the_files_last_cluster_is_refused_before_allocation() {
        let mem = crate::storage::MemStorage::from_bytes(&[0u8; 4096]);
        let e = open::read_u64_table(&mem, 512, 1 << 22, 512, "snapshot L1 table").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        // Ending inside the last cluster the file touches is fine.
        let mem = crate::storage::MemStorage::from_bytes(&[0u8; 1000]);
        assert_eq!(
            open::read_u64_table(&mem, 512, 64, 512, "L1")
                .unwrap()
                .len(),
            64
        );
    }
}
