//! The driver API every image format implements.
//!
//! A format plugs in with two objects:
//! - a [`Format`]: its name, a probe, `open` and `create` (stateless, one
//!   static instance in the [registry](crate::registry));
//! - a [`Driver`]: one open image. It answers *where does a guest byte
//!   live*: for reads ([`Driver::map`]), for writes ([`Driver::map_write`]:
//!   an existing place, or one it just reserved), for write-zeroes and
//!   discard ([`Driver::map_zeroes`], [`Driver::map_discard`]: what the
//!   range becomes), and publishes its metadata once the data is in place
//!   ([`Driver::commit`]).
//!
//! The generic layer ([`crate::Image`]) does everything formats share:
//! bounds checks, request splitting, read-only enforcement, reading
//! unallocated ranges from the backing image, copy-on-write of the parts
//! of an allocation unit a write does not cover, read-modify-write for
//! formats with a request alignment, and all data I/O for mapped ranges.
//! Data is always written before the metadata that points to it is
//! published. `docs/DESIGN.md` follows a read and an allocating write
//! through these steps.

mod facts;
mod mapping;

pub use facts::{
    AmendOptions, BackingRef, BitmapOp, BitmapSpecific, CheckReport, CreateOptions, DriverInfo,
    DriverOpenOptions, EncryptSpecific, FormatSpecific, LuksSlotInfo, LuksSpecific, OptionSpec,
    ParallelsBitmap, ParallelsSpecific, Preallocation, Qcow2Specific, RepairMode, SnapshotInfo,
    SnapshotSelector, VhdxSpecific,
};
pub use mapping::{
    Allocation, BlockStatus, Commit, DiscardAction, DiscardMapping, Fill, Mapping, StorageId,
    WriteFlags, WriteMapping, ZeroAction, ZeroFlags, ZeroMapping,
};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use std::path::Path;
use std::sync::Arc;

/// The encryption of guest data a driver stores in place (qcow2's LUKS and
/// legacy AES): the generic layer encrypts what it writes to, and decrypts
/// what it reads from, [`Mapping::Encrypted`] ranges and the allocations
/// and in-place writes of such a driver, in whole 512-byte sectors (the
/// driver's [`request_alignment`](Driver::request_alignment) is 512).
pub trait DataCipher: Send + Sync {
    /// Encrypts `buf` (whole sectors) stored at `host` in the data
    /// storage, holding guest bytes from `guest` on.
    fn encrypt(&self, buf: &mut [u8], host: u64, guest: u64);
    /// Decrypts `buf` (whole sectors) read from `host`, guest bytes from
    /// `guest` on.
    fn decrypt(&self, buf: &mut [u8], host: u64, guest: u64);
}

/// What a driver may use while it stores transformed data: the backing
/// image, for the parts of a unit a partial write does not cover.
pub struct IoCtx<'a> {
    pub(crate) backing: Option<&'a crate::Image>,
    /// The image names a backing file the open policy left closed.
    pub(crate) closed_backing: Option<&'a str>,
}

impl IoCtx<'_> {
    /// A context with no backing image.
    pub fn none() -> IoCtx<'static> {
        IoCtx {
            backing: None,
            closed_backing: None,
        }
    }

    /// Reads guest data of the layer below: the backing image, or zeroes
    /// where there is none or it is shorter than the request. Fails with
    /// [`ErrorKind::Refused`] when the image names a backing file that
    /// was not opened: copying zeroes instead of its data would change
    /// what the guest sees.
    pub fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match (self.backing, self.closed_backing) {
            (Some(b), _) => b.read_zero_extended(buf, offset),
            (None, Some(name)) => Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "this write needs data from the backing file '{name}', which was not \
                     opened (the open policy does not follow backing files)"
                ),
            )),
            (None, None) => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// True when there is a backing image.
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }
}

/// One open image of some format.
///
/// Every method takes `&self` and may be called from several threads at
/// once; drivers keep metadata behind their own locks, and take only
/// shared locks on the read path. Requests reaching a driver are inside
/// the virtual disk.
pub trait Driver: Send + Sync {
    /// The format name (`raw`, `qcow2`, ...).
    fn format_name(&self) -> &'static str;

    /// The driver as [`Any`](std::any::Any), for callers that need the
    /// concrete type (format-specific calls, tests).
    fn as_any(&self) -> &dyn std::any::Any;

    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Logical sector size the image presents to guests.
    fn sector_size(&self) -> u32 {
        512
    }

    /// Granularity of writes the driver can take: the generic layer turns
    /// smaller or unaligned writes into read-modify-write of whole units
    /// (for formats whose transformed data comes in sectors).
    fn request_alignment(&self) -> u32 {
        1
    }

    /// Every storage the image keeps data or metadata in. A
    /// [`StorageId`] is an index into this list; index 0 is the image
    /// file. Sync, `actual-size` and locking cover all of them.
    fn storages(&self) -> &[Arc<dyn Storage>];

    /// Where the guest range starting at `offset` lives, and for how many
    /// bytes (1..=`max_len`) that answer holds.
    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)>;

    /// True when the host place a [`Mapping::Data`] answer names holds
    /// those guest bytes for as long as the image is open: no allocation
    /// ever moves them or gives their place to other guest bytes (raw).
    /// Only then may a reader hand the host pages themselves onward
    /// ([`Image::file_ranges`](crate::Image::file_ranges)), to be read
    /// after the request that mapped them has ended.
    fn fixed_data_layout(&self) -> bool {
        false
    }

    /// Reads a range [`map`](Driver::map) called [`Mapping::Compressed`]
    /// or [`Mapping::Encrypted`].
    fn read_transformed(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported(
            "this format has no compressed or encrypted data",
        ))
    }

    /// Block status of the range at `offset` (at most `max_len` bytes).
    /// The default derives it from [`map`](Driver::map).
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (m, len) = self.map(offset, max_len)?;
        Ok(BlockStatus::of_mapping(m, len, None))
    }

    /// Where the bytes of a write of `len` bytes at `offset` go (for a
    /// prefix of the request): an existing writable place, or one the
    /// driver just reserved, with what must be copied around the write
    /// first. The driver changes no metadata that readers see until
    /// [`commit`](Driver::commit).
    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping>;

    /// Publishes what an [`Allocation`], [`ZeroMapping`] or
    /// [`DiscardMapping`] reserved, once the generic layer wrote the data.
    fn commit(&self, _commit: Commit) -> Result<()> {
        Err(Error::unsupported("this driver has nothing to commit"))
    }

    /// Gives up what a mapping reserved (the data write failed).
    fn abort(&self, _commit: Commit) {}

    /// Stores a range [`map_write`](Driver::map_write) answered with
    /// [`WriteMapping::Transformed`].
    fn write_transformed(&self, _ctx: &IoCtx, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported(
            "this format has no compressed or encrypted data",
        ))
    }

    /// Size of the units [`compress`](Driver::compress) takes, or `None`
    /// when the format cannot store compressed data.
    fn compression_unit(&self) -> Option<u64> {
        None
    }

    /// Compresses one unit of [`compression_unit`](Driver::compression_unit)
    /// bytes (the last unit of the disk may be shorter) in the format's
    /// stream format. `None` when it does not shrink: the unit is then
    /// stored plainly. Pure computation, safe to run on many threads; the
    /// result goes to [`write_compressed`](Driver::write_compressed).
    fn compress(&self, _unit: &[u8]) -> Result<Option<Vec<u8>>> {
        Err(Error::unsupported(
            "Compression not supported for this file format",
        ))
    }

    /// Stores `packed`, the output of [`compress`](Driver::compress) for
    /// the unit at `offset`. Returns false, storing nothing, when the unit
    /// already has storage: the generic layer then writes it plainly.
    /// Called in guest order, the result is the same image whatever
    /// thread compressed what.
    fn write_compressed(&self, _packed: &[u8], _offset: u64) -> Result<bool> {
        Err(Error::unsupported(
            "Compression not supported for this file format",
        ))
    }

    /// What write-zeroes of `len` bytes at `offset` makes of (a prefix
    /// of) the range. The default: the format cannot zero cheaply.
    fn map_zeroes(&self, _offset: u64, len: u64, _flags: ZeroFlags) -> Result<ZeroMapping> {
        Ok(ZeroMapping {
            len,
            action: ZeroAction::Buffers,
            commit: None,
        })
    }

    /// What discard of `len` bytes at `offset` releases (for a prefix of
    /// the range). Discard is advisory: afterwards the range reads as its
    /// old content, zeroes or the backing image's content. The default
    /// releases nothing.
    fn map_discard(&self, _offset: u64, len: u64) -> Result<DiscardMapping> {
        Ok(DiscardMapping {
            len,
            action: DiscardAction::Nothing,
            commit: None,
        })
    }

    /// Writes cached metadata out to the storage (not necessarily durable).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Makes all completed writes durable: flush, then sync every storage.
    fn sync(&self) -> Result<()> {
        self.flush()?;
        sync_all(self.storages())
    }

    /// Changes the virtual size.
    fn resize(&self, _new_size: u64, _prealloc: Preallocation) -> Result<()> {
        Err(Error::unsupported(format!(
            "the {} format does not support resizing",
            self.format_name()
        )))
    }

    /// Format details for `info`.
    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }

    /// The backing file named in the image, if any.
    fn backing(&self) -> Option<BackingRef> {
        None
    }

    /// Checks the backing image the generic layer opened for this image
    /// (e.g. a VHDX parent's data-write GUID against the child's linkage).
    fn check_backing(&self, _backing: &crate::Image) -> Result<()> {
        Ok(())
    }

    /// Problems found at open that do not stop reads (e.g. a backing file
    /// that changed since the image was made); the CLI prints them.
    fn warnings(&self) -> Vec<Error> {
        Vec::new()
    }

    /// Checks (and with `repair`, repairs) the image's metadata.
    fn check(&self, _repair: Option<RepairMode>) -> Result<CheckReport> {
        Err(Error::unsupported(
            "This image format does not support checks",
        ))
    }

    /// The cipher of the guest data this driver stores encrypted: `None`
    /// when it stores plain data, an error when the data is encrypted but
    /// the image was opened without its key.
    fn data_cipher(&self) -> Result<Option<&dyn DataCipher>> {
        Ok(None)
    }

    /// Names a new backing file (`name`, `format`), or none, in the
    /// image's metadata; the data is not touched (`rebase` copies what
    /// must be copied first).
    fn set_backing(&self, _backing: Option<(&str, Option<&str>)>) -> Result<()> {
        Err(Error::unsupported("Operation not supported"))
    }

    /// Makes every cluster of this layer unallocated, so the image reads
    /// as its backing file (`commit` without `-d`).
    fn make_empty(&self) -> Result<()> {
        Err(Error::unsupported("Operation not supported"))
    }

    /// Changes the persistent dirty bitmaps (`imgloop bitmap`).
    fn bitmap(&self, _op: &BitmapOp) -> Result<()> {
        Err(Error::unsupported(
            "Persistent bitmaps are not supported by this image format",
        ))
    }

    /// Whether `offset` is dirty in the persistent bitmap `name`, and for
    /// how many bytes (at most `max_len`) that stays so (NBD's
    /// `qemu:dirty-bitmap:` contexts).
    fn bitmap_status(&self, _name: &str, _offset: u64, _max_len: u64) -> Result<(bool, u64)> {
        Err(Error::unsupported(
            "Persistent bitmaps are not supported by this image format",
        ))
    }

    /// The bits of the persistent dirty bitmap `name`, with the writes of
    /// this open recorded in them.
    fn bitmap_read(&self, _name: &str) -> Result<crate::DirtyBitmap> {
        Err(Error::unsupported(
            "Persistent bitmaps are not supported by this image format",
        ))
    }

    /// The persistent dirty bitmaps (name, granularity in bytes), or
    /// `None` when this image cannot hold any (only qcow2 version 3 can).
    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        None
    }

    /// Changes image options in place (`qemu-img amend`); `size` is
    /// handled by the generic layer, not here.
    fn amend(&self, _opts: &AmendOptions) -> Result<()> {
        Err(Error::unsupported(format!(
            "Format driver '{}' does not support option amendment",
            self.format_name()
        )))
    }

    /// Takes an internal snapshot named `name` (the image is quiesced
    /// and writable).
    fn snapshot_create(&self, name: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "Could not create snapshot '{name}': Operation not supported"
        )))
    }

    /// Reverts the disk to the internal snapshot whose ID, else name, is
    /// `key`; the virtual size becomes the snapshot's.
    fn snapshot_apply(&self, key: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "Could not apply snapshot '{key}': Operation not supported"
        )))
    }

    /// True when the image was opened to show an internal snapshot (the
    /// `snapshot`, `snapshot.id`, `snapshot.name` open options) instead of
    /// the current disk.
    fn shows_snapshot(&self) -> bool {
        false
    }

    /// Deletes the internal snapshot `sel` names.
    fn snapshot_delete(&self, sel: &SnapshotSelector) -> Result<()> {
        let what = sel.name.as_deref().or(sel.id.as_deref()).unwrap_or("");
        Err(Error::unsupported(format!(
            "Could not delete snapshot '{what}': Operation not supported"
        )))
    }

    /// Called when the image switches between read-only and read-write.
    /// Going read-only it comes first, while the image is still writable
    /// and no request runs, to write what close would (a dirty flag,
    /// recorded bitmaps). Going read-write it comes after the storages
    /// were reopened, and the open state already says read-write.
    fn set_read_only(&self, _read_only: bool) -> Result<()> {
        Ok(())
    }

    /// Called once before the image is closed, after a final flush.
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Syncs each storage once (the same storage may be listed twice).
pub fn sync_all(storages: &[Arc<dyn Storage>]) -> Result<()> {
    for (i, s) in storages.iter().enumerate() {
        if storages[..i].iter().any(|o| Arc::ptr_eq(o, s)) {
            continue;
        }
        s.sync()
            .map_err(|e| Error::io(format!("syncing {}", s.describe()), e))?;
    }
    Ok(())
}

/// An image format: probe, open and create. One static instance per format.
pub trait Format: Send + Sync {
    /// The format name as qemu-img spells it.
    fn name(&self) -> &'static str;

    /// How sure the format is that an image starting with `header` (up to
    /// 4 KiB; less for short files) and named `filename` is one of its own:
    /// 0 (no) to 100 (magic matches).
    fn probe(&self, header: &[u8], filename: &Path) -> u32;

    /// Opens an image on `storage`.
    fn open(&self, storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Box<dyn Driver>>;

    /// The `-o` options `create` accepts.
    fn create_options(&self) -> &'static [OptionSpec];

    /// Writes a new, empty image on `storage` (already created and empty).
    /// `path` is where it lives, for formats that create companion files.
    fn create(
        &self,
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &CreateOptions,
    ) -> Result<()>;

    /// How large a new image of this format with the `-o` options of
    /// `opts` would be (`qemu-img measure`): of `opts.size` bytes, or
    /// holding the data of `source` (its whole chain) when given.
    fn measure(&self, _opts: &CreateOptions, _source: Option<&crate::Image>) -> Result<Measure> {
        Err(Error::unsupported(format!(
            "Block driver '{}' does not support size measurement",
            self.name()
        )))
    }
}

/// What `measure` reports, with qemu-img's JSON field names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    /// Bytes of persistent bitmaps the copy would need (when both the
    /// source and the format support them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<u64>,
    /// Bytes the file needs for the data there is.
    pub required: u64,
    /// Bytes the file needs fully allocated.
    pub fully_allocated: u64,
}
