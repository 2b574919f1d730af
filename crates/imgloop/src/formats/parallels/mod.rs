//! Parallels / Virtuozzo expandable images (`parallels`), versions 1
//! (`WithoutFreeSpace`) and 2 (`WithouFreSpacExt`): a 64-byte header, a
//! BAT of 32-bit entries (one per guest cluster; 0 = unallocated) and the
//! data clusters.
//!
//! - [`header`]: the wire header and its validation.
//! - [`extension`]: the version-2 format extension (dirty bitmaps).
//! - `io`: mappings for reads and writes, allocation, write-zeroes and
//!   discard, the flush and the in-use marker.
//! - `check`: qemu-img's checks and repairs.
//! - `create`.
//!
//! The header and the BAT are held in memory as the bytes they are on
//! disk; changed 4 KiB pieces are written back by the flush, after the
//! data they point at is synced. The in-use marker is written (and synced)
//! before the first change of a session and cleared on a clean close,
//! when the file is also cut back to the end of its data (dropping the
//! space preallocated on growth).

pub mod bundle;
mod check;
mod create;
pub mod extension;
pub mod header;
mod io;
#[cfg(test)]
mod tests;

use crate::driver::{
    BackingRef, BlockStatus, Commit, CreateOptions, DiscardMapping, Driver, DriverInfo,
    DriverOpenOptions, Format, FormatSpecific, Mapping, OptionSpec, ParallelsSpecific, RepairMode,
    WriteMapping, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::inflight::UnitLocks;
use crate::state::{Mode, OpenState};
use crate::storage::Storage;
use extension::Extension;
use header::{Header, Magic, WireHeader, HEADER_LEN, IN_USE};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

/// The Parallels format (`-f parallels`).
pub struct ParallelsFormat;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "size",
        kind: "size",
        help: "Virtual disk size",
    },
    OptionSpec {
        name: "cluster_size",
        kind: "size",
        help: "Parallels image cluster size (default 1M)",
    },
    OptionSpec {
        name: "preallocation",
        kind: "string",
        help: "Accepted as qemu-img accepts it (off, falloc, full); the image is made the same way",
    },
    OptionSpec {
        name: "backing_file",
        kind: "string",
        help: "The image to make a snapshot over, in the same directory (recorded in the directory's DiskDescriptor.xml bundle, made when there is none)",
    },
    OptionSpec {
        name: "backing_fmt",
        kind: "string",
        help: "Format of the backing image (parallels or raw)",
    },
];

/// Open option: how the file grows (`falloc`, the default, or `truncate`).
pub const PREALLOC_MODE: &str = "prealloc-mode";
/// Open option: bytes added past the new data when the file grows
/// (default 128 MiB, as qemu).
pub const PREALLOC_SIZE: &str = "prealloc-size";
const DEFAULT_PREALLOC: u64 = 128 << 20;

impl Format for ParallelsFormat {
    fn name(&self) -> &'static str {
        "parallels"
    }

    fn probe(&self, head: &[u8], _filename: &Path) -> u32 {
        // The magic and version decide, as in qemu (a file cut inside the
        // header is still a Parallels image, and gets a clear error).
        let mut padded = [0u8; HEADER_LEN as usize];
        let n = head.len().min(padded.len());
        padded[..n].copy_from_slice(&head[..n]);
        match (n >= 20)
            .then(|| WireHeader::parse(&padded))
            .flatten()
            .and_then(|w| w.magic())
        {
            Some(_) => 100,
            None => 0,
        }
    }

    fn open(&self, storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Box<dyn Driver>> {
        Ok(Box::new(Parallels::open(storage, opts)?))
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
        opts.check_known(self)?;
        create::create(&*storage, path, opts)
    }
}

/// The header and BAT bytes as on disk, and which 4 KiB pieces changed.
pub(super) struct Table {
    bytes: Vec<u8>,
    dirty: BTreeSet<u64>,
}

/// Piece of the table written back at once.
const PIECE: u64 = 4096;

impl Table {
    fn entry(&self, index: u64) -> u32 {
        let at = (HEADER_LEN + 4 * index) as usize;
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn set_entry(&mut self, index: u64, value: u32) {
        let at = HEADER_LEN + 4 * index;
        self.bytes[at as usize..at as usize + 4].copy_from_slice(&value.to_le_bytes());
        self.dirty.insert(at / PIECE);
    }

    fn wire(&self) -> WireHeader {
        WireHeader::parse(&self.bytes).expect("the table holds the header")
    }

    /// Changes the header in memory; it reaches the file only through
    /// [`Parallels::write_header`] (the flush writes BAT pieces, which may
    /// hold the header's bytes too, but then as already written).
    fn set_wire(&mut self, w: &WireHeader) {
        self.bytes[..HEADER_LEN as usize].copy_from_slice(&w.to_bytes());
    }
}

/// How the file grows when a cluster is appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prealloc {
    /// `fallocate` (zeroes really allocated).
    Falloc,
    /// `ftruncate` (a sparse tail).
    Truncate,
}

/// Where the next cluster goes, and how long the file is.
struct Space {
    /// End of the data (the file is cut back to it on a clean close).
    data_end: u64,
    /// The file's length (past `data_end` when preallocated).
    file_len: u64,
}

/// An open Parallels image.
pub struct Parallels {
    storages: [Arc<dyn Storage>; 1],
    /// The validated header as opened (geometry never changes).
    header: Header,
    /// First byte of the data area.
    data_start: u64,
    state: Arc<OpenState>,
    table: RwLock<Table>,
    space: Mutex<Space>,
    /// Bytes past this offset were added by this open and read as zeroes.
    zero_from: u64,
    prealloc: (Prealloc, u64),
    units: Arc<UnitLocks>,
    flush_lock: Mutex<()>,
    /// The in-use marker is on disk (this session changed the image).
    marked: Mutex<bool>,
    /// `marked` for the write path's check without the lock.
    marked_fast: std::sync::atomic::AtomicBool,
    /// The format extension, when it was read.
    extension: Option<Extension>,
    /// Why the extension was not read (reported by `check`).
    extension_problem: Option<String>,
    /// Messages of the repair a read-write open ran.
    repaired: Vec<String>,
    /// The parent image, for an image of a disk bundle that has one.
    backing: Option<BackingRef>,
    /// The bundle's descriptor and this image's GUID in it.
    bundle: Option<(String, String)>,
}

impl Parallels {
    /// Opens a Parallels image. A read-write open of an image that was not
    /// closed cleanly (or has damage qemu repairs on open) repairs it
    /// first, as qemu 10 does; the repair's messages come back as
    /// warnings.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Parallels> {
        let mut prealloc = (Prealloc::Falloc, DEFAULT_PREALLOC);
        let mut for_check = false;
        for (key, value) in &opts.options {
            match key.as_str() {
                PREALLOC_MODE => {
                    prealloc.0 = match value.as_str() {
                        "falloc" => Prealloc::Falloc,
                        "truncate" => Prealloc::Truncate,
                        v => {
                            return Err(Error::invalid_argument(format!(
                                "invalid parameter value: {v} (prealloc-mode is falloc or truncate)"
                            )))
                        }
                    }
                }
                PREALLOC_SIZE => prealloc.1 = crate::size::parse_size(value)?,
                k if k == crate::formats::qcow2::OPEN_FOR_CHECK => for_check = true,
                k if k == crate::formats::qcow2::OPEN_METADATA_ONLY => {}
                k => {
                    return Err(Error::invalid_argument(format!(
                        "Unknown open option '{k}' for format 'parallels'"
                    )))
                }
            }
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        let mut head = [0u8; HEADER_LEN as usize];
        if file_len < HEADER_LEN {
            return Err(Error::invalid_format(
                "Parallels header",
                0,
                format!("the file ({file_len} bytes) is shorter than a Parallels header"),
            ));
        }
        storage
            .read_at(&mut head, 0)
            .map_err(|e| Error::io("reading the Parallels header", e))?;
        let wire = WireHeader::parse(&head).expect("64 bytes");
        let header = Header::validate(wire)?;
        let table_end = header.table_end();
        if table_end > file_len {
            return Err(Error::invalid_format(
                "Parallels BAT",
                HEADER_LEN,
                format!(
                    "the BAT of {} entries ends at byte {table_end}, past the end of the file ({file_len} bytes)",
                    wire.bat_entries
                ),
            ));
        }
        let mut bytes = vec![0u8; table_end as usize];
        storage.read_at(&mut bytes, 0).map_err(|e| {
            Error::io("reading the Parallels BAT", e).at("Parallels BAT", HEADER_LEN)
        })?;
        let data_start = header.data_start(file_len);
        let table = Table {
            bytes,
            dirty: BTreeSet::new(),
        };
        let (extension, extension_problem) = match wire.ext_off {
            0 => (None, None),
            at => match Extension::read(&*storage, at, &header) {
                Ok(x) => (Some(x), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        let (backing, bundle) = bundle_parent(opts.path.as_deref(), &header)?;
        let mut p = Parallels {
            storages: [storage],
            header,
            data_start,
            state: opts.state.clone(),
            space: Mutex::new(Space {
                data_end: 0,
                file_len,
            }),
            zero_from: file_len,
            table: RwLock::new(table),
            prealloc,
            units: UnitLocks::new(),
            flush_lock: Mutex::new(()),
            marked: Mutex::new(false),
            marked_fast: std::sync::atomic::AtomicBool::new(false),
            extension,
            extension_problem,
            repaired: Vec::new(),
            backing,
            bundle,
        };
        let end = p.used_end(file_len);
        p.space
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .data_end = end;
        if opts.state.mode() != Mode::ReadOnly && !for_check && p.needs_repair(file_len) {
            let r = p.check_image(Some(RepairMode::All))?;
            p.repaired = r.messages;
        }
        Ok(p)
    }

    fn file(&self) -> &dyn Storage {
        &*self.storages[0]
    }

    /// Whether unallocated clusters read from a parent image.
    fn has_parent(&self) -> bool {
        self.backing.is_some()
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size
    }

    /// Host byte offset of a BAT entry's cluster (0: unallocated).
    fn host_of(&self, entry: u32) -> u64 {
        entry as u64 * self.header.entry_unit()
    }

    /// The end of what the image uses in a file of `file_len` bytes: the
    /// data area's start, every cluster inside the file, and the format
    /// extension's clusters.
    fn used_end(&self, file_len: u64) -> u64 {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let cs = self.cluster_size();
        let mut end = self.data_start;
        for i in 0..self.header.wire.bat_entries as u64 {
            let e = t.entry(i);
            if e == 0 {
                continue;
            }
            let host = self.host_of(e);
            if host + cs <= file_len {
                end = end.max(host + cs);
            }
        }
        if let Some(x) = self.extension.as_ref().filter(|_| t.wire().ext_off != 0) {
            for &(at, len) in &x.clusters {
                end = end.max(at + len);
            }
        }
        end
    }

    /// Changes the header with `edit`, writes it and syncs.
    fn write_header(&self, edit: impl FnOnce(&mut WireHeader)) -> Result<()> {
        let bytes = {
            let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
            let mut w = t.wire();
            edit(&mut w);
            t.set_wire(&w);
            w.to_bytes()
        };
        self.file()
            .write_at(&bytes, 0)
            .and_then(|_| self.file().sync())
            .map_err(|e| Error::io("writing the Parallels header", e).at("Parallels header", 0))
    }

    /// What qemu 10 repairs on a read-write open: the in-use marker, a bad
    /// `data_off`, clusters outside the file, clusters shared by two
    /// entries.
    fn needs_repair(&self, file_len: u64) -> bool {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let w = t.wire();
        if w.inuse == IN_USE || !self.header.data_off_valid(file_len) {
            return true;
        }
        let cs = self.cluster_size();
        let mut hosts = Vec::new();
        for i in 0..w.bat_entries as u64 {
            let e = t.entry(i);
            if e != 0 {
                let host = self.host_of(e);
                if host + cs > file_len || host < self.data_start {
                    return true;
                }
                hosts.push(host);
            }
        }
        hosts.sort_unstable();
        hosts.windows(2).any(|w| w[1] < w[0] + cs)
    }

    fn check_writable(&self) -> Result<()> {
        if self.state.mode() == Mode::ReadOnly {
            return Err(Error::read_only("write"));
        }
        Ok(())
    }
}

impl Driver for Parallels {
    fn format_name(&self) -> &'static str {
        "parallels"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn storages(&self) -> &[Arc<dyn Storage>] {
        &self.storages
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        Ok(self.map_run(offset, max_len))
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (m, len) = self.map_run(offset, max_len);
        Ok(BlockStatus::of_mapping(m, len, None))
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        self.check_writable()?;
        self.map_write_range(offset, len)
    }

    fn commit(&self, commit: Commit) -> Result<()> {
        self.publish(commit)
    }

    fn map_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<ZeroMapping> {
        self.check_writable()?;
        self.map_zero_range(offset, len, flags)
    }

    fn map_discard(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        self.check_writable()?;
        self.map_discard_range(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_table()
    }

    fn info(&self) -> DriverInfo {
        let w = self.table.read().unwrap_or_else(|e| e.into_inner()).wire();
        DriverInfo {
            cluster_size: Some(self.cluster_size()),
            dirty: w.inuse == IN_USE,
            format_specific: Some(FormatSpecific::Parallels(ParallelsSpecific {
                version: match self.header.magic {
                    Magic::V1 => 1,
                    Magic::V2 => 2,
                },
                in_use: w.inuse == IN_USE,
                bundle: self.bundle.as_ref().map(|b| b.0.clone()),
                bundle_guid: self.bundle.as_ref().map(|b| b.1.clone()),
                bitmaps: self
                    .extension
                    .as_ref()
                    .filter(|_| w.ext_off != 0)
                    .map(|x| x.bitmap_infos())
                    .unwrap_or_default(),
            })),
            ..DriverInfo::default()
        }
    }

    fn backing(&self) -> Option<BackingRef> {
        self.backing.clone()
    }

    fn warnings(&self) -> Vec<Error> {
        let repaired = self
            .repaired
            .iter()
            .map(|m| Error::new(ErrorKind::State, m.clone()));
        let ext = self.extension_problem.iter().map(|m| {
            Error::invalid_format(
                "Parallels format extension",
                self.header.wire.ext_off * header::SECTOR,
                format!("the format extension is ignored: {m}"),
            )
        });
        repaired.chain(ext).collect()
    }

    fn check(&self, repair: Option<RepairMode>) -> Result<crate::driver::CheckReport> {
        self.check_image(repair)
    }

    fn close(&self) -> Result<()> {
        self.close_image()
    }
}

/// An image's place in a disk bundle: its parent (as a backing file,
/// relative to the bundle directory) and (descriptor, GUID).
type BundlePlace = (Option<BackingRef>, Option<(String, String)>);

/// For an image file inside a disk bundle: its [`BundlePlace`].
fn bundle_parent(path: Option<&Path>, header: &Header) -> Result<BundlePlace> {
    let Some(path) = path else {
        return Ok((None, None));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !bundle::Bundle::is_bundle(dir) {
        return Ok((None, None));
    }
    let b = bundle::Bundle::read(dir)?;
    let descriptor = dir.join(bundle::DESCRIPTOR).display().to_string();
    let Some(me) = b.image_for(path) else {
        return Err(Error::invalid_format(
            "Parallels DiskDescriptor.xml",
            0,
            format!("the bundle's descriptor ({descriptor}) does not list this image"),
        ));
    };
    if let Some(bs) = b.block_size.filter(|&bs| bs != header.wire.tracks as u64) {
        return Err(Error::invalid_format(
            "Parallels DiskDescriptor.xml",
            0,
            format!(
                "the descriptor gives {bs} sectors per cluster, the image has {}",
                header.wire.tracks
            ),
        ));
    }
    let backing = b.parent(me).map(|p| BackingRef {
        filename: p.file.display().to_string(),
        format: Some(if p.expandable { "parallels" } else { "raw" }.to_string()),
    });
    Ok((backing, Some((descriptor, me.guid.clone()))))
}
