//! Facts drivers report and options they take: `info` details, check
//! reports, create and open options.

use super::Format;
use crate::error::{Error, Result};
use crate::policy::FilePolicy;
use crate::state::OpenState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// The guest data is encrypted.
    pub encrypted: bool,
    /// Facts only this format has (qemu-img's `format-specific`).
    pub format_specific: Option<FormatSpecific>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Facts only one format has, as typed values. They serialize to the
/// `format-specific` object of `qemu-img info --output=json`
/// (`{"type": FORMAT, "data": {...}}`, field names and order as qemu's);
/// how to show them to people is the caller's business.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
#[non_exhaustive]
pub enum FormatSpecific {
    /// qcow2 details.
    Qcow2(Qcow2Specific),
    /// VHDX details (qemu-img shows none; these are imgloop's).
    Vhdx(VhdxSpecific),
    /// Parallels details (qemu-img shows none; these are imgloop's).
    Parallels(ParallelsSpecific),
}

/// What `info` reports of a Parallels image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ParallelsSpecific {
    /// 1 (`WithoutFreeSpace`: BAT entries in sectors) or 2
    /// (`WithouFreSpacExt`: in clusters).
    pub version: u32,
    /// The in-use marker is set: the image is open for writing, or was
    /// not closed cleanly.
    pub in_use: bool,
    /// The disk bundle's descriptor, for an image of a bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// This image's GUID in the bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_guid: Option<String>,
    /// Dirty bitmaps of the format extension.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<ParallelsBitmap>,
}

/// One dirty bitmap of a Parallels image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ParallelsBitmap {
    /// Its name (the feature's UUID).
    pub name: String,
    /// Bytes of disk per bit.
    pub granularity: u64,
}

/// What `info` reports of a VHDX image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VhdxSpecific {
    /// "dynamic", "fixed" or "differencing".
    pub subformat: String,
    /// Bytes per payload block.
    pub block_size: u64,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// The image has a parent.
    pub has_parent: bool,
    /// "clean", "replayed" (at this read-write open) or "replayed in
    /// memory" (a read-only open of an image whose log needs replay).
    pub log: String,
    /// The data-write GUID (what children name their parent by).
    pub data_write_guid: String,
    /// The virtual disk ID (SCSI page 83).
    pub disk_id: String,
}

/// What `info` reports of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    /// "0.10" (version 2) or "1.1" (version 3).
    pub compat: String,
    /// Compression of compressed clusters: "zlib" or "zstd".
    pub compression_type: String,
    /// Lazy refcounts are on (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent dirty bitmaps, when the bitmap directory is consistent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapSpecific>>,
    /// Width of a refcount entry in bits.
    pub refcount_bits: u32,
    /// The encryption, for an encrypted image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<EncryptSpecific>,
    /// The external data file, as named in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// The external data file is a valid raw image by itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// The corrupt bit is set (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (subclusters) are in use (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// The encryption of a qcow2 image, as `qemu-img info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EncryptSpecific {
    /// Legacy AES-CBC: `{"format": "aes"}`.
    Aes {
        /// "aes".
        format: String,
    },
    /// LUKS.
    Luks(LuksSpecific),
}

/// A LUKS header, with qemu-img's field names and order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSpecific {
    /// IV generator (`plain64`).
    pub ivgen_alg: String,
    /// The header is in a separate file (never, in qcow2).
    pub detached_header: bool,
    /// Hash of PBKDF2 and the splitter.
    pub hash_alg: String,
    /// Cipher and key size (`aes-256`).
    pub cipher_alg: String,
    /// The volume's UUID.
    pub uuid: String,
    /// ESSIV's hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<String>,
    /// "luks".
    pub format: String,
    /// Cipher mode (`xts`).
    pub cipher_mode: String,
    /// The eight key slots.
    pub slots: Vec<LuksSlotInfo>,
    /// Where the payload would start, in bytes (qcow2 does not use it).
    pub payload_offset: u64,
    /// PBKDF2 iterations of the master key digest.
    pub master_key_iters: u64,
}

/// One LUKS key slot in `info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSlotInfo {
    /// The slot holds a key.
    pub active: bool,
    /// Its PBKDF2 iterations (active slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u64>,
    /// Where its key material starts, in bytes from the LUKS header.
    pub key_offset: u64,
    /// Its stripes (active slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
}

/// One persistent bitmap of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BitmapSpecific {
    /// "in-use" (not saved correctly), "auto" (tracks every write).
    pub flags: Vec<String>,
    /// The bitmap's name.
    pub name: String,
    /// Bytes of disk one bit stands for.
    pub granularity: u64,
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

/// Which internal snapshot an operation means. With both set, both must
/// match (qemu's rule for `snapshot.id=…,snapshot.name=…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSelector {
    /// The snapshot's ID.
    pub id: Option<String>,
    /// The snapshot's name (tag).
    pub name: Option<String>,
}

impl SnapshotSelector {
    /// The snapshot with this name.
    pub fn by_name(name: &str) -> Self {
        SnapshotSelector {
            id: None,
            name: Some(name.to_string()),
        }
    }

    /// True when a snapshot with `id` and `name` is the one meant.
    pub fn matches(&self, id: &str, name: &str) -> bool {
        (self.id.is_some() || self.name.is_some())
            && self.id.as_deref().is_none_or(|i| i == id)
            && self.name.as_deref().is_none_or(|n| n == name)
    }
}

/// One `bitmap` operation on a persistent dirty bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapOp {
    /// A new, empty bitmap; granularity in bytes (default: the format's).
    Add {
        /// Its name.
        name: String,
        /// Bytes of disk per bit.
        granularity: Option<u64>,
        /// It tracks writes (`auto`).
        enabled: bool,
    },
    /// Delete a bitmap and free its clusters.
    Remove(String),
    /// Clear every bit.
    Clear(String),
    /// Track writes.
    Enable(String),
    /// Stop tracking writes.
    Disable(String),
    /// Set in `target` every bit `source` has set (`bitmap --merge`).
    Merge {
        /// The bitmap changed.
        target: String,
        /// The bits added (read from this image or another one).
        source: crate::DirtyBitmap,
    },
}

/// What `amend` changes: the `-o` options, the secrets they name
/// (`encrypt.new-secret`, `encrypt.old-secret`), and `--force`.
#[derive(Clone, Debug, Default)]
pub struct AmendOptions {
    /// `key=value` options.
    pub options: std::collections::BTreeMap<String, String>,
    /// Secrets the options name.
    pub secrets: crate::secret::Secrets,
    /// Allow what could lose data (overwriting or erasing the last key slot).
    pub force: bool,
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

/// Options for [`Format::open`](super::Format::open), besides the storage.
#[derive(Clone, Debug)]
pub struct DriverOpenOptions {
    /// The image's open state (read-only or read-write, requests in
    /// flight), shared with the generic layer.
    pub state: Arc<OpenState>,
    /// Where the image file is (for companion files such as external data
    /// files), when it is a file.
    pub path: Option<std::path::PathBuf>,
    /// Driver-specific options (`key=value`, e.g. `l2-cache-size`).
    pub options: BTreeMap<String, String>,
    /// Which files the image may make the driver open (data files).
    pub policy: FilePolicy,
    /// Storages the caller provides for files the image names, keyed by
    /// the name as stored in the image: used instead of opening a file
    /// (in-memory multi-file images, crash-simulation tests).
    pub companions: BTreeMap<String, Arc<dyn crate::storage::Storage>>,
    /// Secrets the driver options may name (`encrypt.key-secret=ID`).
    pub secrets: crate::secret::Secrets,
}

impl Default for DriverOpenOptions {
    /// Read-write, no path, no options, the safe default policy.
    fn default() -> Self {
        Self::new(false)
    }
}

impl DriverOpenOptions {
    /// Options for a read-only or read-write open with a fresh state.
    pub fn new(read_only: bool) -> Self {
        DriverOpenOptions {
            state: OpenState::new(read_only),
            path: None,
            options: BTreeMap::new(),
            policy: FilePolicy::default(),
            companions: BTreeMap::new(),
            secrets: crate::secret::Secrets::new(),
        }
    }

    /// True when the image is opened without write access.
    pub fn read_only(&self) -> bool {
        self.state.is_read_only()
    }
}

/// Options for [`Format::create`].
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// `-o key=value` options, checked against [`Format::create_options`](super::Format::create_options).
    pub options: BTreeMap<String, String>,
    /// Backing file (`-b`).
    pub backing_file: Option<String>,
    /// Backing file format (`-F`).
    pub backing_format: Option<String>,
    /// Secrets the options may name (`encrypt.key-secret=ID`).
    pub secrets: crate::secret::Secrets,
    /// Do not open the backing file (`create -u`): its size and format are
    /// not checked, and the size must be given.
    pub unsafe_backing: bool,
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

    /// The on/off option `key` (qemu-img spellings: on/off, true/false,
    /// yes/no), false when absent.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.options.get(key).map(String::as_str) {
            None | Some("off") | Some("false") | Some("no") => Ok(false),
            Some("on") | Some("true") | Some("yes") => Ok(true),
            Some(v) => Err(Error::invalid_argument(format!(
                "invalid value '{v}' for option '{key}' (expected on or off)"
            ))),
        }
    }

    /// The size option `key` (`64k`, `1M`, ...), if given.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>> {
        self.options
            .get(key)
            .map(|v| crate::size::parse_size(v))
            .transpose()
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
