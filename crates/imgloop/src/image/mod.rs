//! The generic block layer: one open image of any format.
//!
//! [`Image`] wraps a format [`Driver`] and does, once for every format,
//! what no driver should repeat: lifecycle and read-only enforcement,
//! bounds checks, splitting of requests, copy-on-write and the data I/O of
//! writes the driver mapped, read-modify-write of unaligned writes, reads
//! of unallocated ranges from the backing image, image locking, and
//! opening the backing chain under one [`FilePolicy`].
//!
//! - `io`: the data path (read, write, write-zeroes, discard, compressed
//!   writes, block status);
//! - `open`: opening an image file and its backing chain, and `create`;
//! - `file_ranges`: guest ranges that lie as-is in plain files, for
//!   readers that pass host pages on without copying them.

mod file_ranges;
mod io;
mod open;

pub use file_ranges::FileRanges;
pub use open::{create, file_id, same_file};

use crate::driver::{BackingRef, CheckReport, Driver, Preallocation, RepairMode};
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::inflight::RangeLocks;
use crate::lock::{ImageLock, LockMode};
use crate::policy::FilePolicy;
use crate::state::{Mode, OpenState};
use crate::storage::Storage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Largest piece a request is split into before it reaches a driver.
pub const MAX_REQUEST: u64 = 64 << 20;

/// How many bytes of a file probing looks at.
pub const PROBE_BYTES: usize = 4096;

/// Options for [`Image::open`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format; probed from the file when `None`.
    pub format: Option<String>,
    /// Open without write access.
    pub read_only: bool,
    /// Take no image locks (`-U`); only allowed read-only.
    pub force_share: bool,
    /// Which files the image may make imgloop open (backing files, data
    /// files). The default opens none: safe for untrusted images.
    pub policy: FilePolicy,
    /// Driver options (`key=value`).
    pub driver_options: BTreeMap<String, String>,
    /// Secrets the driver options may name (`encrypt.key-secret=ID`).
    pub secrets: crate::secret::Secrets,
    /// Cache mode "unsafe": ignore sync requests on the image file (fast,
    /// but a crash may lose or tear recent writes).
    pub unsafe_cache: bool,
}

impl OpenOptions {
    /// Read-only options with the given format (or probing).
    pub fn read_only(format: Option<&str>) -> Self {
        OpenOptions {
            format: format.map(str::to_string),
            read_only: true,
            ..Default::default()
        }
    }

    /// Read-write options with the given format (or probing).
    pub fn read_write(format: Option<&str>) -> Self {
        OpenOptions {
            format: format.map(str::to_string),
            ..Default::default()
        }
    }

    /// These options with `policy`.
    pub fn with_policy(mut self, policy: FilePolicy) -> Self {
        self.policy = policy;
        self
    }
}

/// Facts about an image, with the field names of `qemu-img info --output=json`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// File name as given.
    pub filename: String,
    /// Format name.
    pub format: String,
    /// Bytes allocated on the host (every file the image keeps data in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// The guest data is encrypted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The image was not closed cleanly.
    pub dirty_flag: bool,
    /// Cluster size, for formats that have clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Backing file name as stored in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// Backing file format as stored in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Format-specific details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<crate::driver::FormatSpecific>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<crate::driver::SnapshotInfo>,
}

/// One open image of any format, with its backing chain.
///
/// All I/O methods take `&self` and may run on several threads at once.
pub struct Image {
    driver: Box<dyn Driver>,
    state: Arc<OpenState>,
    backing: Option<Arc<Image>>,
    backing_ref: Option<BackingRef>,
    full_backing: Option<PathBuf>,
    name: String,
    path: Option<PathBuf>,
    probed_raw: bool,
    /// Locks on the image file and every other file of the image (data
    /// files), in the mode the image is open in.
    locks: Mutex<Vec<ImageLock>>,
    /// Read-modify-write cycles of unaligned writes hold their unit
    /// exclusively; aligned parts of writes hold their range shared
    /// (only for drivers with a request alignment).
    ranges: RangeLocks,
    /// Held shared by every write-type request, exclusively by resize.
    gate: RwLock<()>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("format", &self.driver.format_name())
            .field("mode", &self.state.mode())
            .finish()
    }
}

impl Image {
    /// The name used in messages (the path as given).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path, for file-backed images.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The format name.
    pub fn format(&self) -> &'static str {
        self.driver.format_name()
    }

    /// The driver (for format-specific calls).
    pub fn driver(&self) -> &dyn Driver {
        &*self.driver
    }

    /// The image file's storage.
    pub fn file_storage(&self) -> &dyn Storage {
        &*self.driver.storages()[0]
    }

    /// The backing image, when one is open.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }

    /// The backing file the image names (name as stored, format), whether
    /// or not it was opened.
    pub fn backing_ref(&self) -> Option<&crate::driver::BackingRef> {
        self.backing_ref.as_ref()
    }

    /// The image and every image below it, top first.
    pub fn chain(&self) -> Vec<&Image> {
        let mut v = vec![self];
        let mut cur = self;
        while let Some(b) = cur.backing.as_deref() {
            v.push(b);
            cur = b;
        }
        v
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.virtual_size()
    }

    /// Logical sector size.
    pub fn sector_size(&self) -> u32 {
        self.driver.sector_size()
    }

    /// True when writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.state.is_read_only()
    }

    /// True when the format was probed and came out raw (sector 0 is guarded).
    pub fn probed_raw(&self) -> bool {
        self.probed_raw
    }

    /// The shared open state (mode, requests in flight).
    pub fn state(&self) -> &Arc<OpenState> {
        &self.state
    }

    fn err(&self, e: Error) -> Error {
        e.in_file(&self.name)
    }

    fn check_open(&self) -> Result<()> {
        if self.state.mode() == Mode::Closed {
            return Err(self.err(Error::new(ErrorKind::State, "the image is closed")));
        }
        Ok(())
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        match self.state.mode() {
            Mode::Closed => Err(self.err(Error::new(ErrorKind::State, "the image is closed"))),
            Mode::ReadOnly => Err(self.err(Error::read_only(what))),
            Mode::ReadWrite => Ok(()),
        }
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(self.err(Error::out_of_bounds(offset, len, size))),
        }
    }

    /// Writes cached metadata out (not necessarily durable).
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        if self.is_read_only() {
            return Ok(());
        }
        self.driver.flush().map_err(|e| self.err(e))
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> Result<()> {
        self.check_open()?;
        if self.is_read_only() {
            return Ok(());
        }
        self.driver.sync().map_err(|e| self.err(e))
    }

    /// Changes the virtual size. Shrinking needs `allow_shrink`.
    pub fn resize(&self, new_size: u64, prealloc: Preallocation, allow_shrink: bool) -> Result<()> {
        self.check_writable("resize")?;
        if new_size < self.size() && !allow_shrink {
            return Err(self.err(
                Error::invalid_argument(format!(
                    "shrinking from {} to {new_size} bytes was not allowed",
                    self.size()
                ))
                .with_condition(Condition::ShrinkNotAllowed),
            ));
        }
        // No write may run across a size change.
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver
            .resize(new_size, prealloc)
            .map_err(|e| self.err(e))
    }

    /// Names `backing` (file name as stored, format) as this image's
    /// backing file, or none, without touching data (`rebase -u`).
    pub fn set_backing(&self, backing: Option<(&str, Option<&str>)>) -> Result<()> {
        self.check_writable("rebase")?;
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver.set_backing(backing).map_err(|e| self.err(e))
    }

    /// Changes the image's persistent dirty bitmaps.
    pub fn bitmap(&self, op: &crate::driver::BitmapOp) -> Result<()> {
        self.check_writable("bitmap")?;
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver.bitmap(op).map_err(|e| self.err(e))
    }

    /// The bits of the persistent dirty bitmap `name` (with this open's
    /// writes recorded in an enabled one).
    pub fn bitmap_read(&self, name: &str) -> Result<crate::DirtyBitmap> {
        self.driver.bitmap_read(name).map_err(|e| self.err(e))
    }

    /// Whether `offset` is dirty in the persistent bitmap `name`, and for
    /// how many bytes (at most `max_len`) that stays so.
    pub fn bitmap_status(&self, name: &str, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.driver
            .bitmap_status(name, offset, max_len)
            .map_err(|e| self.err(e))
    }

    /// Makes every cluster of this layer unallocated (`commit`).
    pub fn make_empty(&self) -> Result<()> {
        self.check_writable("commit")?;
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver.make_empty().map_err(|e| self.err(e))
    }

    /// Bytes the persistent bitmaps of this image would take in a qcow2
    /// image of `cluster_size` clusters (whole bitmaps, their tables and
    /// directory, as `qemu-img measure` counts them), or `None` when this
    /// image cannot hold bitmaps.
    pub fn persistent_bitmaps_size(&self, cluster_size: u64) -> Option<u64> {
        let list = self.driver.persistent_bitmaps()?;
        let cs = cluster_size;
        let size = self.size();
        let mut total = 0u64;
        let mut dir = 0u64;
        for (name, granularity) in list {
            let bytes = size.div_ceil(granularity.max(1)).div_ceil(8);
            let clusters = bytes.div_ceil(cs);
            total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
            dir += (24 + name.len() as u64).div_ceil(8) * 8;
        }
        Some(total + dir.div_ceil(cs) * cs)
    }

    /// Changes the image's options in place, as `qemu-img amend` does:
    /// the format's own (`compat`, `refcount_bits`, LUKS key slots, ...)
    /// and `size` (grown or shrunk, as qemu-img's amend allows).
    pub fn amend(&self, opts: &crate::driver::AmendOptions) -> Result<()> {
        self.check_writable("amend")?;
        let mut own = opts.clone();
        let size = own.options.remove("size");
        let new_size = match &size {
            Some(s) => Some(crate::size::parse_size(s).map_err(|e| self.err(e))?),
            None => None,
        };
        {
            // A format that cannot amend refuses even a size alone.
            let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
            self.driver.amend(&own).map_err(|e| self.err(e))?;
        }
        if let Some(n) = new_size {
            self.resize(n, Preallocation::Off, true)?;
        }
        Ok(())
    }

    /// Takes an internal snapshot named `name` of the disk as it is now
    /// (qcow2). Writes in flight finish first.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.check_writable("snapshot")?;
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver.snapshot_create(name).map_err(|e| self.err(e))
    }

    /// Reverts the disk to the internal snapshot whose ID, else name, is
    /// `key` (its content and its virtual size).
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.check_writable("snapshot")?;
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver.snapshot_apply(key).map_err(|e| self.err(e))
    }

    /// Deletes the internal snapshot `sel` names.
    pub fn snapshot_delete(&self, sel: &crate::driver::SnapshotSelector) -> Result<()> {
        self.check_writable("snapshot")?;
        let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.driver.snapshot_delete(sel).map_err(|e| self.err(e))
    }

    /// Checks the image's metadata; with `repair`, fixes what it can.
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() {
            self.check_writable("repair")?;
        } else {
            self.check_open()?;
        }
        self.driver.check(repair).map_err(|e| self.err(e))
    }

    /// Bytes allocated on the host for the image file (as qemu-img's
    /// `disk size`, which leaves an external data file out).
    fn actual_size(&self) -> Option<u64> {
        self.driver.storages()[0].allocated_size().ok().flatten()
    }

    /// Facts for `info`.
    pub fn info(&self) -> ImageInfo {
        let di = self.driver.info();
        ImageInfo {
            virtual_size: self.size(),
            filename: self.name.clone(),
            format: self.format().to_string(),
            actual_size: self.actual_size(),
            encrypted: di.encrypted,
            dirty_flag: di.dirty,
            cluster_size: di.cluster_size,
            backing_filename: self.backing_ref.as_ref().map(|b| b.filename.clone()),
            full_backing_filename: self.full_backing.as_ref().map(|p| p.display().to_string()),
            backing_filename_format: self.backing_ref.as_ref().and_then(|b| b.format.clone()),
            format_specific: di.format_specific,
            snapshots: di.snapshots,
        }
    }

    /// Reopens every storage of the image with or without write access.
    fn reopen_storages(&self, writable: bool) -> Result<()> {
        let storages = self.driver.storages();
        for (i, s) in storages.iter().enumerate() {
            if storages[..i].iter().any(|o| Arc::ptr_eq(o, s)) {
                continue;
            }
            s.reopen(writable)
                .map_err(|e| self.err(Error::io(format!("reopening {}", s.describe()), e)))?;
        }
        Ok(())
    }

    /// Switches between read-only and read-write. Going read-write takes the
    /// exclusive locks and may fail when another process uses the image.
    pub fn reopen(&self, read_only: bool) -> Result<()> {
        self.check_open()?;
        if read_only == self.is_read_only() {
            return Ok(());
        }
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if read_only {
            {
                // No request runs while the driver finishes its writes
                // (recorded dirty bitmaps are stored) and the mode changes.
                let _all = self.gate.write().unwrap_or_else(|e| e.into_inner());
                self.driver.flush().map_err(|e| self.err(e))?;
                self.driver.set_read_only(true).map_err(|e| self.err(e))?;
                self.state.set(Mode::ReadOnly);
            }
            self.reopen_storages(false)?;
            for l in locks.iter_mut() {
                if l.mode() == LockMode::Exclusive {
                    l.change(LockMode::Shared)?;
                }
            }
        } else {
            for l in locks.iter_mut() {
                if l.mode() == LockMode::None {
                    return Err(self.err(Error::invalid_argument(
                        "an image opened with force-share cannot be reopened read-write",
                    )));
                }
                l.change(LockMode::Exclusive)?;
            }
            self.reopen_storages(true)?;
            self.state.set(Mode::ReadWrite);
            if let Err(e) = self.driver.set_read_only(false) {
                self.state.set(Mode::ReadOnly);
                return Err(self.err(e));
            }
        }
        Ok(())
    }

    /// Flushes and closes the image. Later calls fail with a state error.
    pub fn close(&self) -> Result<()> {
        let prev = self.state.set(Mode::Closed);
        if prev == Mode::Closed {
            return Ok(());
        }
        let mut result = Ok(());
        if prev == Mode::ReadWrite {
            result = self.driver.flush().and_then(|_| self.driver.close());
        }
        self.locks.lock().unwrap_or_else(|e| e.into_inner()).clear();
        result.map_err(|e| self.err(e))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

fn round_down(v: u64, align: u64) -> u64 {
    v / align * align
}

/// Resolves a backing file name stored in `image`: relative names are
/// relative to the directory holding the image.
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    FilePolicy::resolve(Some(image), backing)
}

#[cfg(test)]
mod tests;
