//! The driver API every image format implements.
//!
//! A format plugs in with two objects:
//! - a [`Format`]: its name, a probe, `open` and `create` (stateless, one
//!   static instance in the [registry](crate::registry));
//! - a [`Driver`]: one open image. It answers *where does a guest byte
//!   live* ([`Driver::map`]) and performs the format-specific parts of writes.
//!
//! The generic layer ([`crate::Image`]) does everything formats share:
//! bounds checks, request splitting, read-modify-write for unaligned writes,
//! read-only enforcement, reading unallocated ranges from the backing image,
//! and the actual data I/O for mapped ranges. Drivers only see requests that
//! are inside the virtual disk and aligned to [`Driver::request_alignment`].

use crate::error::{Error, Result};
use crate::storage::Storage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Where a guest range lives, as told by [`Driver::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Stored as-is at `host_offset` in the driver's data storage.
    Data {
        /// Byte offset in [`Driver::data_storage`].
        host_offset: u64,
    },
    /// Reads as zeroes; this layer says so (the backing image is not consulted).
    Zero,
    /// Not stored in this layer: read from the backing image, or zeroes.
    Unallocated,
    /// Stored in a transformed way (compressed, encrypted): only the driver
    /// can read it, through [`Driver::read_special`].
    Special,
}

/// Block status of a guest range in one layer, as `qemu-img map` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockStatus {
    /// Length of the range that shares this status (never 0).
    pub len: u64,
    /// The range is stored in this layer (otherwise it comes from the backing image).
    pub allocated: bool,
    /// The range holds data (it may still happen to be zero).
    pub data: bool,
    /// The range is known to read as zeroes.
    pub zero: bool,
    /// The range is stored compressed.
    pub compressed: bool,
    /// Host offset of the data in the layer's data file, when it is stored plainly.
    pub offset: Option<u64>,
}

impl BlockStatus {
    /// The status a [`Mapping`] of `len` bytes implies. `host` is the host
    /// offset a zero or unallocated range still has (preallocated space, an
    /// unallocated subcluster of an allocated cluster), shown by `map`.
    pub fn of_mapping(mapping: Mapping, len: u64, host: Option<u64>) -> BlockStatus {
        match mapping {
            Mapping::Data { host_offset } => BlockStatus {
                len,
                allocated: true,
                data: true,
                offset: Some(host_offset),
                ..Default::default()
            },
            Mapping::Zero => BlockStatus {
                len,
                allocated: true,
                zero: true,
                offset: host,
                ..Default::default()
            },
            Mapping::Unallocated => BlockStatus {
                len,
                offset: host,
                ..Default::default()
            },
            Mapping::Special => BlockStatus {
                len,
                allocated: true,
                data: true,
                compressed: true,
                ..Default::default()
            },
        }
    }
}

/// Flags for [`Driver::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (like `fallocate` punch-hole).
    pub may_unmap: bool,
}

/// Preallocation modes for create and resize.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// Sparse: allocate nothing up front.
    #[default]
    Off,
    /// Allocate metadata only (formats with metadata).
    Metadata,
    /// Reserve space with `fallocate`.
    Falloc,
    /// Write zeroes to every byte.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(Error::invalid_argument(format!(
                "invalid preallocation mode '{other}' (expected off, metadata, falloc or full)"
            ))),
        }
    }
}

/// A backing file reference stored in an image header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// The file name as stored in the image (may be relative to the image).
    pub filename: String,
    /// The backing format as stored, if any.
    pub format: Option<String>,
}

/// Format-level facts for `info`.
#[derive(Clone, Debug, Default)]
pub struct DriverInfo {
    /// Cluster (allocation unit) size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// The image was not closed cleanly.
    pub dirty: bool,
    /// `format-specific` object of `qemu-img info --output=json`
    /// (`{"type": FORMAT, "data": {...}}`), if the format has details.
    pub format_specific: Option<serde_json::Value>,
    /// Extra lines for human-readable `info` ("Format specific information").
    pub human_lines: Vec<(String, String)>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// One internal snapshot, with the field names of `qemu-img info --output=json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Unique ID string.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock at creation, whole seconds.
    pub vm_clock_sec: u64,
    /// Guest clock at creation, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Instruction count at creation, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// Repair modes of `check -r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Repair leaked clusters only.
    Leaks,
    /// Repair leaks and corruptions.
    All,
}

/// Result of a consistency check; field names follow `qemu-img check --output=json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Internal errors that kept the check from completing.
    pub check_errors: u64,
    /// Corruptions found (and not repaired).
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// Leaked clusters found (and not repaired).
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// Corruptions repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// End of the image's used area in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    /// Guest clusters in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    /// Guest clusters allocated in this layer.
    #[serde(skip_serializing_if = "none_or_zero")]
    pub allocated_clusters: Option<u64>,
    /// Allocated guest clusters not contiguous with the previous one.
    #[serde(skip_serializing_if = "none_or_zero")]
    pub fragmented_clusters: Option<u64>,
    /// Compressed guest clusters.
    #[serde(skip_serializing_if = "none_or_zero")]
    pub compressed_clusters: Option<u64>,
    /// Human-readable findings, one per line.
    #[serde(skip)]
    pub messages: Vec<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn none_or_zero(v: &Option<u64>) -> bool {
    matches!(v, None | Some(0))
}

/// What a driver may use during an operation: the backing image, for
/// reading the parts of a cluster a partial write does not cover.
pub struct IoCtx<'a> {
    pub(crate) backing: Option<&'a crate::Image>,
}

impl IoCtx<'_> {
    /// A context with no backing image.
    pub fn none() -> IoCtx<'static> {
        IoCtx { backing: None }
    }

    /// Reads guest data of the layer below: the backing image, or zeroes
    /// where there is none or it is shorter than the request.
    pub fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.backing {
            Some(b) => b.read_zero_extended(buf, offset),
            None => {
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
/// once; drivers keep metadata behind their own locks. Requests reaching a
/// driver are inside the virtual disk and aligned to
/// [`request_alignment`](Driver::request_alignment).
pub trait Driver: Send + Sync {
    /// The format name (`raw`, `qcow2`, ...).
    fn format_name(&self) -> &'static str;

    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Logical sector size the image presents to guests.
    fn sector_size(&self) -> u32 {
        512
    }

    /// Write granularity: the generic layer turns smaller or unaligned writes
    /// into read-modify-write of whole units.
    fn request_alignment(&self) -> u32 {
        1
    }

    /// The storage that [`Mapping::Data`] offsets point into.
    fn data_storage(&self) -> &dyn Storage;

    /// The storage holding the image file itself (for `actual-size`).
    fn file_storage(&self) -> &dyn Storage {
        self.data_storage()
    }

    /// Where the guest range starting at `offset` lives, and for how many
    /// bytes (1..=`max_len`) that answer holds.
    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)>;

    /// Reads a range [`map`](Driver::map) called [`Mapping::Special`].
    fn read_special(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported("this format has no special clusters"))
    }

    /// Block status of the range at `offset` (at most `max_len` bytes).
    /// The default derives it from [`map`](Driver::map).
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (m, len) = self.map(offset, max_len)?;
        Ok(BlockStatus::of_mapping(m, len, None))
    }

    /// Writes `buf` at `offset`, allocating as needed.
    fn write(&self, ctx: &IoCtx, buf: &[u8], offset: u64) -> Result<()>;

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
    /// the unit `plain` at `offset`. Only for units never written before,
    /// as in `convert -c`; units that already have storage get `plain`
    /// written normally. Called in guest order, the result is the same
    /// image whatever thread compressed what.
    fn write_compressed(
        &self,
        _ctx: &IoCtx,
        _plain: &[u8],
        _packed: &[u8],
        _offset: u64,
    ) -> Result<()> {
        Err(Error::unsupported(
            "Compression not supported for this file format",
        ))
    }

    /// Makes a range read as zeroes. The default writes zero buffers.
    fn write_zeroes(&self, ctx: &IoCtx, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        let chunk = (1u64 << 20).min(len) as usize;
        let zeros = vec![0u8; chunk];
        let mut done = 0;
        while done < len {
            let n = (chunk as u64).min(len - done) as usize;
            self.write(ctx, &zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Tells the image a range is no longer needed. Afterwards the range may
    /// read as anything its backing image or zeroes hold; it is advisory, so
    /// the default does nothing.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Writes cached metadata out to the storage (not necessarily durable).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Makes all completed writes durable: flush, then sync the storage.
    fn sync(&self) -> Result<()> {
        self.flush()?;
        self.data_storage()
            .sync()
            .map_err(|e| Error::io("syncing", e))?;
        if !std::ptr::addr_eq(self.file_storage(), self.data_storage()) {
            self.file_storage()
                .sync()
                .map_err(|e| Error::io("syncing", e))?;
        }
        Ok(())
    }

    /// Changes the virtual size.
    fn resize(&self, _ctx: &IoCtx, _new_size: u64, _prealloc: Preallocation) -> Result<()> {
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

    /// Checks (and with `repair`, repairs) the image's metadata.
    fn check(&self, _repair: Option<RepairMode>) -> Result<CheckReport> {
        Err(Error::unsupported(
            "This image format does not support checks",
        ))
    }

    /// Called when the image switches between read-only and read-write
    /// (after the storage was reopened), e.g. to set or clear a dirty flag.
    fn set_read_only(&self, _read_only: bool) -> Result<()> {
        Ok(())
    }

    /// Called once before the image is closed, after a final flush.
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Options for [`Format::open`], besides the storage.
#[derive(Clone, Debug, Default)]
pub struct DriverOpenOptions {
    /// Open without write access.
    pub read_only: bool,
    /// Where the image file is (for companion files such as external data
    /// files), when it is a file.
    pub path: Option<std::path::PathBuf>,
    /// Driver-specific options (`key=value`, e.g. `l2-cache-size`).
    pub options: BTreeMap<String, String>,
}

/// Options for [`Format::create`].
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// `-o key=value` options, checked against [`Format::create_options`].
    pub options: BTreeMap<String, String>,
    /// Backing file (`-b`).
    pub backing_file: Option<String>,
    /// Backing file format (`-F`).
    pub backing_format: Option<String>,
}

impl CreateOptions {
    /// Fails on any option the format does not list.
    pub fn check_known(&self, format: &dyn Format) -> Result<()> {
        let known = format.create_options();
        for key in self.options.keys() {
            if !known.iter().any(|o| o.name == key) {
                return Err(Error::invalid_argument(format!(
                    "invalid parameter '{key}' for format '{}'",
                    format.name()
                )));
            }
        }
        Ok(())
    }

    /// A typed option value, or `None` when not given.
    pub fn get<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.options.get(key) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|_| {
                Error::invalid_argument(format!("invalid value '{v}' for option '{key}'"))
            }),
        }
    }
}

/// Describes one `-o` option of a format (for `-o help` and validation).
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    /// Option name.
    pub name: &'static str,
    /// Value type: "size", "bool", "string", "number".
    pub kind: &'static str,
    /// One-line description.
    pub help: &'static str,
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
}
