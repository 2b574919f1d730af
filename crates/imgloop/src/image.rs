//! The generic block layer: one open image of any format.
//!
//! [`Image`] wraps a format [`Driver`] and does, once for every format,
//! what no driver should repeat: lifecycle and read-only enforcement, bounds
//! checks, splitting of large requests, read-modify-write of unaligned
//! writes, data I/O for mapped ranges, reads of unallocated ranges from the
//! backing image, image locking, and opening the backing chain under one
//! policy ([`ChainPolicy`]).

use crate::driver::{
    BackingRef, BlockStatus, CheckReport, CreateOptions, Driver, DriverOpenOptions, IoCtx, Mapping,
    Preallocation, RepairMode, ZeroFlags,
};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::{ImageLock, LockMode};
use crate::registry;
use crate::storage::{FileStorage, Storage};
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Largest piece a request is split into before it reaches a driver.
pub const MAX_REQUEST: u64 = 64 << 20;

/// How many bytes of a file probing looks at.
pub const PROBE_BYTES: usize = 4096;

const CLOSED: u8 = 0;
const OPEN_RO: u8 = 1;
const OPEN_RW: u8 = 2;

/// Rules for opening backing files.
#[derive(Clone, Debug)]
pub struct ChainPolicy {
    /// Do not open backing files at all (unallocated ranges read as zeroes).
    pub no_backing: bool,
    /// Longest allowed chain below the top image.
    pub max_depth: usize,
    /// Probe the format of a backing file whose header does not name one.
    /// When false, such a backing file is an error.
    pub probe_backing: bool,
}

impl Default for ChainPolicy {
    fn default() -> Self {
        ChainPolicy {
            no_backing: false,
            max_depth: 16,
            probe_backing: true,
        }
    }
}

/// Options for [`Image::open`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format; probed from the file when `None`.
    pub format: Option<String>,
    /// Open without write access.
    pub read_only: bool,
    /// Take no image locks (`-U`); only allowed read-only.
    pub force_share: bool,
    /// Backing file policy.
    pub chain: ChainPolicy,
    /// Driver options (`key=value`).
    pub driver_options: BTreeMap<String, String>,
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
    /// Bytes allocated on the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
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
    pub format_specific: Option<serde_json::Value>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<crate::driver::SnapshotInfo>,
    /// Human-readable format-specific lines.
    #[serde(skip)]
    pub format_specific_lines: Vec<(String, String)>,
}

/// One open image of any format, with its backing chain.
///
/// All I/O methods take `&self` and may run on several threads at once.
pub struct Image {
    driver: Box<dyn Driver>,
    storage: Arc<dyn Storage>,
    backing: Option<Arc<Image>>,
    backing_ref: Option<BackingRef>,
    full_backing: Option<PathBuf>,
    name: String,
    path: Option<PathBuf>,
    state: AtomicU8,
    probed_raw: bool,
    lock: Mutex<Option<ImageLock>>,
    /// Taken exclusively by read-modify-write cycles and shared by aligned
    /// writes, so an RMW never clobbers a concurrent write's bytes.
    rmw: RwLock<()>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("format", &self.driver.format_name())
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

/// Identity of a host file, for loop detection.
type FileId = (u64, u64);

impl Image {
    /// Opens the image file at `path` and its backing chain.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let mut seen = Vec::new();
        Self::open_chain(path, opts, 0, &mut seen)
    }

    /// Opens an image on any storage (memory, another image). No locking
    /// and no backing files: `backing`, when given, serves as the backing image.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        format: Option<&str>,
        read_only: bool,
        backing: Option<Arc<Image>>,
    ) -> Result<Image> {
        let dopts = DriverOpenOptions {
            read_only,
            ..Default::default()
        };
        Self::open_storage_with(storage, format, &dopts, backing)
    }

    /// Like [`open_storage`](Image::open_storage), with driver options
    /// (e.g. `l2-cache-size` for qcow2).
    pub fn open_storage_with(
        storage: Arc<dyn Storage>,
        format: Option<&str>,
        dopts: &DriverOpenOptions,
        backing: Option<Arc<Image>>,
    ) -> Result<Image> {
        let read_only = dopts.read_only;
        let name = storage.describe();
        let (fmt, probed) = pick_format(&*storage, format, Path::new(&name))?;
        let driver = fmt.open(storage.clone(), dopts)?;
        let backing_ref = driver.backing();
        Ok(Image {
            driver,
            storage,
            backing,
            backing_ref,
            full_backing: None,
            name,
            path: None,
            state: AtomicU8::new(if read_only { OPEN_RO } else { OPEN_RW }),
            probed_raw: probed && fmt.name() == "raw",
            lock: Mutex::new(None),
            rmw: RwLock::new(()),
        })
    }

    fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        depth: usize,
        seen: &mut Vec<FileId>,
    ) -> Result<Image> {
        let name = path.display().to_string();
        if opts.force_share && !opts.read_only {
            return Err(Error::invalid_argument(
                "force-share (-U) is only allowed for read-only opens",
            )
            .in_file(path));
        }
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("could not open", e).in_file(path))?;
        if meta.is_dir() {
            return Err(Error::invalid_argument("is a directory, not an image file").in_file(path));
        }
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                "backing chain loop: this file is already part of the chain",
            )
            .in_file(path));
        }
        seen.push(id);
        if let Some(f) = &opts.format {
            // Fail on an unknown format name before touching the file.
            registry::find(f).map_err(|e| e.in_file(path))?;
        }
        let mut file = FileStorage::open(path, !opts.read_only)
            .map_err(|e| Error::io("could not open", e).in_file(path))?;
        if opts.unsafe_cache {
            file = file.ignore_syncs();
        }
        let storage: Arc<dyn Storage> = Arc::new(file);
        let lock_mode = if opts.force_share {
            LockMode::None
        } else if opts.read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let lock = ImageLock::acquire(path, lock_mode)?;
        let (fmt, probed) =
            pick_format(&*storage, opts.format.as_deref(), path).map_err(|e| e.in_file(path))?;
        let dopts = DriverOpenOptions {
            read_only: opts.read_only,
            path: Some(path.to_path_buf()),
            options: opts.driver_options.clone(),
        };
        let driver = fmt
            .open(storage.clone(), &dopts)
            .map_err(|e| e.in_file(path))?;
        let backing_ref = driver.backing();
        let mut full_backing = None;
        let mut backing = None;
        if let Some(b) = &backing_ref {
            let full = resolve_backing(path, &b.filename);
            if !opts.chain.no_backing {
                if depth + 1 > opts.chain.max_depth {
                    return Err(Error::new(
                        ErrorKind::InvalidFormat,
                        format!(
                            "backing chain is deeper than {} images",
                            opts.chain.max_depth
                        ),
                    )
                    .in_file(path));
                }
                if b.format.is_none() && !opts.chain.probe_backing {
                    return Err(Error::invalid_argument(format!(
                        "backing file '{}' has no format recorded and probing is disabled",
                        b.filename
                    ))
                    .in_file(path));
                }
                let bopts = OpenOptions {
                    format: b.format.clone(),
                    read_only: true,
                    force_share: opts.force_share,
                    chain: opts.chain.clone(),
                    driver_options: BTreeMap::new(),
                    unsafe_cache: false,
                };
                let img = Self::open_chain(&full, &bopts, depth + 1, seen).map_err(|e| {
                    if e.kind() == ErrorKind::NotFound {
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "could not open backing file '{}': No such file or directory",
                                full.display()
                            ),
                        )
                        .in_file(path)
                    } else {
                        e
                    }
                })?;
                backing = Some(Arc::new(img));
            }
            full_backing = Some(full);
        }
        Ok(Image {
            driver,
            storage,
            backing,
            backing_ref,
            full_backing,
            name,
            path: Some(path.to_path_buf()),
            state: AtomicU8::new(if opts.read_only { OPEN_RO } else { OPEN_RW }),
            probed_raw: probed && fmt.name() == "raw",
            lock: Mutex::new(Some(lock)),
            rmw: RwLock::new(()),
        })
    }

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

    /// The backing image, when one is open.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
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
        self.state.load(Ordering::Acquire) != OPEN_RW
    }

    /// True when the format was probed and came out raw (sector 0 is guarded).
    pub fn probed_raw(&self) -> bool {
        self.probed_raw
    }

    fn err(&self, e: Error) -> Error {
        e.in_file(&self.name)
    }

    fn check_open(&self) -> Result<()> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Err(self.err(Error::new(ErrorKind::State, "the image is closed")));
        }
        Ok(())
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Err(self.err(Error::new(ErrorKind::State, "the image is closed"))),
            OPEN_RO => Err(self.err(Error::read_only(what))),
            _ => Ok(()),
        }
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(self.err(Error::out_of_bounds(offset, len, size))),
        }
    }

    fn ctx(&self) -> IoCtx<'_> {
        IoCtx {
            backing: self.backing.as_deref(),
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_open()?;
        self.check_bounds(offset, buf.len() as u64)?;
        self.read_unchecked(buf, offset)
    }

    fn read_unchecked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (mapping, n) = self.driver.map(pos, want).map_err(|e| self.err(e))?;
            if n == 0 {
                return Err(self.err(Error::corrupt(
                    "mapping",
                    pos,
                    "driver mapped an empty range",
                )));
            }
            let n = n.min(want) as usize;
            let part = &mut buf[done..done + n];
            match mapping {
                Mapping::Data { host_offset } => self
                    .driver
                    .data_storage()
                    .read_at(part, host_offset)
                    .map_err(|e| {
                        self.err(Error::io(
                            format!("reading data at host offset {host_offset}"),
                            e,
                        ))
                    })?,
                Mapping::Zero => part.fill(0),
                Mapping::Unallocated => match &self.backing {
                    Some(b) => b.read_zero_extended(part, pos)?,
                    None => part.fill(0),
                },
                Mapping::Special => self
                    .driver
                    .read_special(part, pos)
                    .map_err(|e| self.err(e))?,
            }
            done += n;
        }
        Ok(())
    }

    /// Reads like [`read`](Image::read), but the part of the request past
    /// the end of the disk reads as zeroes (how a shorter backing image looks
    /// from above).
    pub fn read_zero_extended(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_open()?;
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if !head.is_empty() {
            self.read_unchecked(head, offset)?;
        }
        Ok(())
    }

    /// Writes `buf` to the virtual disk at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        self.check_bounds(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.guard_sector0(buf, offset)?;
        let align = self.driver.request_alignment() as u64;
        if align <= 1 {
            return self.write_split(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let head_end = round_up(offset, align).min(end);
        let tail_start = round_down(end, align).max(head_end);
        if offset != head_end {
            self.rmw_write(&buf[..(head_end - offset) as usize], offset, align)?;
        }
        if tail_start > head_end {
            let _g = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            let s = (head_end - offset) as usize;
            let e = (tail_start - offset) as usize;
            self.write_split(&buf[s..e], head_end)?;
        }
        if end != tail_start {
            self.rmw_write(&buf[(tail_start - offset) as usize..], tail_start, align)?;
        }
        Ok(())
    }

    fn write_split(&self, buf: &[u8], offset: u64) -> Result<()> {
        let ctx = self.ctx();
        for (i, chunk) in buf.chunks(MAX_REQUEST as usize).enumerate() {
            self.driver
                .write(&ctx, chunk, offset + i as u64 * MAX_REQUEST)
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Writes `buf` (inside one alignment unit) by reading the whole unit,
    /// patching it and writing it back.
    fn rmw_write(&self, buf: &[u8], offset: u64, align: u64) -> Result<()> {
        let _g = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        let start = round_down(offset, align);
        let end = round_up(offset + buf.len() as u64, align).min(self.size());
        let mut unit = vec![0u8; (end - start) as usize];
        self.read_unchecked(&mut unit, start)?;
        let s = (offset - start) as usize;
        unit[s..s + buf.len()].copy_from_slice(buf);
        self.driver
            .write(&self.ctx(), &unit, start)
            .map_err(|e| self.err(e))
    }

    /// QEMU's protection for probed raw images: refuse writing a first
    /// sector that another format would recognise, because the next open
    /// would then interpret the guest's data as image metadata.
    fn guard_sector0(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.probed_raw || offset >= 512 {
            return Ok(());
        }
        let mut sector = vec![0u8; 512.min(self.size()) as usize];
        self.read_unchecked(&mut sector, 0)?;
        let start = offset as usize;
        let n = (sector.len() - start).min(buf.len());
        sector[start..start + n].copy_from_slice(&buf[..n]);
        if let Some(fmt) = registry::probe_non_raw(&sector) {
            return Err(self.err(
                Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "write to sector 0 refused: the format was probed as raw and the new \
                         data looks like a {fmt} header"
                    ),
                )
                .with_condition(crate::error::Condition::ProbedRawHeader),
            ));
        }
        Ok(())
    }

    /// Size of the units [`write_compressed`](Image::write_compressed)
    /// takes, or `None` when the format cannot compress.
    pub fn compression_unit(&self) -> Option<u64> {
        self.driver.compression_unit()
    }

    fn check_compressed_unit(&self, len: u64, offset: u64) -> Result<u64> {
        self.check_bounds(offset, len)?;
        let unit = self.driver.compression_unit().ok_or_else(|| {
            self.err(Error::unsupported(
                "Compression not supported for this file format",
            ))
        })?;
        if !offset.is_multiple_of(unit) || (len != unit && offset + len != self.size()) {
            return Err(self.err(Error::invalid_argument(format!(
                "compressed writes must cover whole {unit}-byte units"
            ))));
        }
        Ok(unit)
    }

    /// Compresses one unit of guest data at `offset` for
    /// [`write_packed`](Image::write_packed): `None` when it does not
    /// shrink. Only computes, so many threads can compress at once while
    /// one writes the results in guest order (deterministic images).
    pub fn compress(&self, buf: &[u8], offset: u64) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        self.check_compressed_unit(buf.len() as u64, offset)?;
        self.driver.compress(buf).map_err(|e| self.err(e))
    }

    /// Stores one unit `buf` at `offset` as [`compress`](Image::compress)
    /// packed it (`packed`), or plainly when `packed` is `None`.
    pub fn write_packed(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        self.check_writable("compressed write")?;
        self.check_compressed_unit(buf.len() as u64, offset)?;
        let Some(packed) = packed else {
            return self.write(buf, offset);
        };
        let _g = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        self.driver
            .write_compressed(&self.ctx(), buf, packed, offset)
            .map_err(|e| self.err(e))
    }

    /// Writes one unit compressed (stored plainly when it does not shrink).
    /// The last unit of the disk may be shorter.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("compressed write")?;
        let packed = self.compress(buf, offset)?;
        self.write_packed(buf, packed.as_deref(), offset)
    }

    /// Makes a range read as zeroes. With `may_unmap` the space may be freed.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable("write zeroes")?;
        self.check_bounds(offset, len)?;
        let align = self.driver.request_alignment() as u64;
        let end = offset + len;
        let head_end = round_up(offset, align).min(end);
        let tail_start = round_down(end, align).max(head_end);
        if offset != head_end {
            self.write(&vec![0u8; (head_end - offset) as usize], offset)?;
        }
        if tail_start > head_end {
            let _g = (align > 1).then(|| self.rmw.read().unwrap_or_else(|e| e.into_inner()));
            let ctx = self.ctx();
            let mut pos = head_end;
            while pos < tail_start {
                let n = (tail_start - pos).min(MAX_REQUEST);
                self.driver
                    .write_zeroes(&ctx, pos, n, ZeroFlags { may_unmap })
                    .map_err(|e| self.err(e))?;
                pos += n;
            }
        }
        if end != tail_start {
            self.write(&vec![0u8; (end - tail_start) as usize], tail_start)?;
        }
        Ok(())
    }

    /// Tells the image a range is unused. Advisory: only the aligned part
    /// reaches the driver; afterwards the range reads as zeroes or as the
    /// backing image's content.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        self.check_bounds(offset, len)?;
        let align = self.driver.request_alignment() as u64;
        let start = round_up(offset, align);
        let end = round_down(offset + len, align);
        if end > start {
            let _g = (align > 1).then(|| self.rmw.read().unwrap_or_else(|e| e.into_inner()));
            self.driver
                .discard(start, end - start)
                .map_err(|e| self.err(e))?;
        }
        Ok(())
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

    /// Block status of one layer (this image only) at `offset`.
    pub fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        self.check_open()?;
        let size = self.size();
        if offset >= size || max_len == 0 {
            return Err(self.err(Error::out_of_bounds(offset, max_len, size)));
        }
        let max_len = max_len.min(size - offset);
        let mut s = self
            .driver
            .block_status(offset, max_len)
            .map_err(|e| self.err(e))?;
        if s.len == 0 {
            return Err(self.err(Error::corrupt(
                "block status",
                offset,
                "driver reported an empty range",
            )));
        }
        s.len = s.len.min(max_len);
        Ok(s)
    }

    /// Block status through the backing chain: the status of the first layer
    /// that has the range allocated, and that layer's depth (0 = this image).
    /// A range allocated nowhere comes back unallocated and zero, with the
    /// depth of the bottom layer.
    pub fn block_status_chain(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, usize)> {
        let mut s = self.block_status(offset, max_len)?;
        if s.allocated {
            return Ok((s, 0));
        }
        match &self.backing {
            Some(b) if offset < b.size() => {
                let (bs, depth) = b.block_status_chain(offset, s.len)?;
                Ok((bs, depth + 1))
            }
            // Past the end of a shorter backing image: zeroes, reported
            // at this layer as qemu-img does.
            Some(_) => {
                s.zero = true;
                Ok((s, 0))
            }
            None => {
                s.zero = true;
                Ok((s, 0))
            }
        }
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
                .with_condition(crate::error::Condition::ShrinkNotAllowed),
            ));
        }
        let _g = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        self.driver
            .resize(&self.ctx(), new_size, prealloc)
            .map_err(|e| self.err(e))
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

    /// Facts for `info`.
    pub fn info(&self) -> ImageInfo {
        let di = self.driver.info();
        let actual = self.driver.file_storage().allocated_size().ok().flatten();
        ImageInfo {
            virtual_size: self.size(),
            filename: self.name.clone(),
            format: self.format().to_string(),
            actual_size: actual,
            dirty_flag: di.dirty,
            cluster_size: di.cluster_size,
            backing_filename: self.backing_ref.as_ref().map(|b| b.filename.clone()),
            full_backing_filename: self.full_backing.as_ref().map(|p| p.display().to_string()),
            backing_filename_format: self.backing_ref.as_ref().and_then(|b| b.format.clone()),
            format_specific: di.format_specific,
            format_specific_lines: di.human_lines,
            snapshots: di.snapshots,
        }
    }

    /// Switches between read-only and read-write. Going read-write takes the
    /// exclusive lock and may fail when another process uses the image.
    pub fn reopen(&self, read_only: bool) -> Result<()> {
        self.check_open()?;
        if read_only == self.is_read_only() {
            return Ok(());
        }
        let mut lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if read_only {
            self.driver.flush().map_err(|e| self.err(e))?;
            self.driver.set_read_only(true).map_err(|e| self.err(e))?;
            self.state.store(OPEN_RO, Ordering::Release);
            self.storage
                .reopen(false)
                .map_err(|e| self.err(Error::io("reopening read-only", e)))?;
            if let Some(l) = lock.as_mut() {
                if l.mode() == LockMode::Exclusive {
                    l.change(LockMode::Shared)?;
                }
            }
        } else {
            if let Some(l) = lock.as_mut() {
                if l.mode() == LockMode::None {
                    return Err(self.err(Error::invalid_argument(
                        "an image opened with force-share cannot be reopened read-write",
                    )));
                }
                l.change(LockMode::Exclusive)?;
            }
            self.storage
                .reopen(true)
                .map_err(|e| self.err(Error::io("reopening read-write", e)))?;
            self.driver.set_read_only(false).map_err(|e| self.err(e))?;
            self.state.store(OPEN_RW, Ordering::Release);
        }
        Ok(())
    }

    /// Flushes and closes the image. Later calls fail with a state error.
    pub fn close(&self) -> Result<()> {
        let prev = self.state.swap(CLOSED, Ordering::AcqRel);
        if prev == CLOSED {
            return Ok(());
        }
        let mut result = Ok(());
        if prev == OPEN_RW {
            result = self.driver.flush().and_then(|_| self.driver.close());
        }
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// Chooses the format: the named one, or the best probe. The bool says
/// whether it was probed.
fn pick_format(
    storage: &dyn Storage,
    format: Option<&str>,
    name: &Path,
) -> Result<(&'static dyn crate::driver::Format, bool)> {
    if let Some(f) = format {
        return Ok((registry::find(f)?, false));
    }
    let len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    let mut head = vec![0u8; (PROBE_BYTES as u64).min(len) as usize];
    storage
        .read_at(&mut head, 0)
        .map_err(|e| Error::io("reading the header for probing", e))?;
    Ok((registry::probe(&head, name), true))
}

/// Creates a new image file of `format` at `path`.
///
/// When `opts.size` is 0 and a backing file is given, the size is taken from
/// the backing image. A half-made file is removed on failure.
pub fn create(path: &Path, format: &str, opts: &CreateOptions) -> Result<()> {
    let fmt = registry::find(format).map_err(|e| e.in_file(path))?;
    opts.check_known(fmt).map_err(|e| e.in_file(path))?;
    let mut opts = opts.clone();
    if let Some(b) = &opts.backing_file {
        let full = resolve_backing(path, b);
        let bopts = OpenOptions {
            format: opts.backing_format.clone(),
            read_only: true,
            force_share: true,
            ..Default::default()
        };
        let backing = Image::open(&full, &bopts).map_err(|e| {
            Error::new(
                e.kind(),
                format!("could not open backing file '{}': {e}", full.display()),
            )
            .in_file(path)
        })?;
        if opts.size == 0 {
            opts.size = backing.size();
        }
        if opts.backing_format.is_none() {
            opts.backing_format = Some(backing.format().to_string());
        }
    }
    if path.is_dir() {
        return Err(Error::invalid_argument("is a directory, not an image file").in_file(path));
    }
    let existed = path.exists();
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::create(path).map_err(|e| Error::io("could not create", e).in_file(path))?,
    );
    let _lock = ImageLock::acquire(path, LockMode::Exclusive)?;
    let result = fmt
        .create(storage.clone(), Some(path), &opts)
        .and_then(|_| storage.sync().map_err(|e| Error::io("syncing", e)));
    if let Err(e) = result {
        if !existed {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.in_file(path));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn mem_raw(size: u64) -> (MemStorage, Image) {
        let mem = MemStorage::new();
        mem.set_len(size).unwrap();
        let img = Image::open_storage(Arc::new(mem.clone()), Some("raw"), false, None).unwrap();
        (mem, img)
    }

    #[test]
    fn reads_and_writes_outside_the_disk_are_refused() {
        let (_m, img) = mem_raw(4096);
        let mut b = [0u8; 10];
        assert_eq!(
            img.read(&mut b, 4090).unwrap_err().kind(),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            img.write(&b, u64::MAX - 2).unwrap_err().kind(),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            img.write_zeroes(4000, 100, false).unwrap_err().kind(),
            ErrorKind::OutOfBounds
        );
        img.read(&mut b, 4086).unwrap();
    }

    #[test]
    fn a_read_only_image_refuses_every_kind_of_write() {
        let mem = MemStorage::from_bytes(&[1u8; 8192]);
        let img = Image::open_storage(Arc::new(mem.clone()), Some("raw"), true, None).unwrap();
        assert_eq!(img.write(&[0], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(
            img.write_zeroes(0, 10, true).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            img.discard(0, 4096).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            img.resize(0, Preallocation::Off, true).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(mem.to_vec(), vec![1u8; 8192]);
    }

    #[test]
    fn a_closed_image_refuses_io_with_a_state_error() {
        let (_m, img) = mem_raw(4096);
        img.close().unwrap();
        let mut b = [0u8; 1];
        assert_eq!(img.read(&mut b, 0).unwrap_err().kind(), ErrorKind::State);
        assert_eq!(img.write(&b, 0).unwrap_err().kind(), ErrorKind::State);
        assert_eq!(img.flush().unwrap_err().kind(), ErrorKind::State);
        img.close().unwrap();
    }

    #[test]
    fn a_probed_raw_image_refuses_a_format_header_in_sector_0_only_when_a_format_claims_it() {
        let mem = MemStorage::new();
        mem.set_len(65536).unwrap();
        let img = Image::open_storage(Arc::new(mem.clone()), None, false, None).unwrap();
        assert!(img.probed_raw());
        // No non-raw format claims plain data, so writes pass.
        img.write(b"hello", 0).unwrap();
        // A qcow2 magic and version in the first sector is refused, also
        // when it is completed by a write that does not start at 0.
        let qcow2 = [b'Q', b'F', b'I', 0xfb, 0, 0, 0, 3];
        let e = img.write(&qcow2, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        img.write(&[0u8; 8], 0).unwrap();
        // The magic alone (version 0) is no qcow2 header yet.
        img.write(&qcow2[..4], 0).unwrap();
        assert_eq!(
            img.write(&qcow2[4..], 4).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        let mut head = [0u8; 8];
        img.read(&mut head, 0).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb");
        let explicit = Image::open_storage(Arc::new(mem), Some("raw"), false, None).unwrap();
        assert!(!explicit.probed_raw());
        explicit.write(&qcow2, 0).unwrap();
    }

    #[test]
    fn shrinking_needs_explicit_permission() {
        let (_m, img) = mem_raw(8192);
        let e = img.resize(4096, Preallocation::Off, false).unwrap_err();
        assert_eq!(
            e.condition(),
            Some(crate::error::Condition::ShrinkNotAllowed)
        );
        img.resize(4096, Preallocation::Off, true).unwrap();
        assert_eq!(img.size(), 4096);
    }

    #[test]
    fn zero_extended_reads_pad_past_the_end() {
        let mem = MemStorage::from_bytes(&[7u8; 100]);
        let img = Image::open_storage(Arc::new(mem), Some("raw"), true, None).unwrap();
        let mut b = [1u8; 200];
        img.read_zero_extended(&mut b, 50).unwrap();
        assert!(b[..50].iter().all(|&x| x == 7));
        assert!(b[50..].iter().all(|&x| x == 0));
    }

    #[test]
    fn backing_names_resolve_relative_to_the_image_directory() {
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), "base.raw"),
            PathBuf::from("/a/b/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("top.qcow2"), "base.raw"),
            PathBuf::from("base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/top"), "/abs/base"),
            PathBuf::from("/abs/base")
        );
    }
}
