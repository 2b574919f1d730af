//! VHDX (`vhdx`), Hyper-V's virtual hard disk format, version 2: fixed,
//! dynamic and differencing images.
//!
//! - [`header`]: the file type identifier, the two headers and the region
//!   tables (CRC-32C each).
//! - [`metadata`]: block size, disk size, sector sizes, disk ID, parent
//!   locator.
//! - [`bat`]: payload block states and the sector-bitmap entries.
//! - [`log`]: the journal of metadata changes, its replay and its entries.
//! - `open`: opening, log replay (on disk for read-write opens, in memory
//!   for read-only ones), finding the parent.
//! - `io`: mappings for reads and writes, write-zeroes and discard.
//! - `flush`: headers, and metadata written through the log.
//! - `create`, `check`.
//!
//! Metadata (BAT sectors and sector-bitmap sectors) sits in a write-back
//! cache of 4 KiB sectors keyed by file offset. The flush syncs the data,
//! writes every dirty sector as one log entry, syncs, writes the sectors
//! in place and syncs again: after a crash the log replays the change
//! whole, so the BAT never points at data that is not on disk and is
//! never torn.

pub mod bat;
mod check;
mod create;
mod flush;
pub mod guid;
pub mod header;
mod io;
pub mod log;
pub mod metadata;
mod open;
#[cfg(test)]
mod tests;

use crate::driver::{
    BackingRef, BlockStatus, Commit, CreateOptions, DiscardMapping, Driver, DriverInfo,
    DriverOpenOptions, Format, FormatSpecific, Mapping, OptionSpec, RepairMode, VhdxSpecific,
    WriteMapping, ZeroFlags, ZeroMapping,
};
use crate::error::Result;
use crate::formats::table_cache::TableCache;
use crate::inflight::UnitLocks;
use crate::state::OpenState;
use crate::storage::Storage;
use bat::Geometry;
use header::{Headers, Region};
use metadata::Metadata;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

/// The VHDX format (`-f vhdx`).
pub struct VhdxFormat;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "size",
        kind: "size",
        help: "Virtual disk size; max of 64TB",
    },
    OptionSpec {
        name: "log_size",
        kind: "size",
        help: "Log size; min 1MB",
    },
    OptionSpec {
        name: "block_size",
        kind: "size",
        help: "Block Size; min 1MB, max 256MB; 0 means auto-calculate",
    },
    OptionSpec {
        name: "subformat",
        kind: "string",
        help: "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    },
    OptionSpec {
        name: "block_state_zero",
        kind: "bool",
        help: "Unallocated blocks of a dynamic image read as zero blocks (state ZERO, qemu-img's default) rather than not present",
    },
    OptionSpec {
        name: "logical_sector_size",
        kind: "number",
        help: "Logical sector size, 512 or 4096 (an imgloop extension)",
    },
    OptionSpec {
        name: "physical_sector_size",
        kind: "number",
        help: "Physical sector size, 512 or 4096 (an imgloop extension; default 4096, as Hyper-V)",
    },
    OptionSpec {
        name: "backing_file",
        kind: "string",
        help: "Parent image of a differencing image (VHDX)",
    },
    OptionSpec {
        name: "backing_fmt",
        kind: "string",
        help: "Format of the parent image (vhdx)",
    },
];

impl Format for VhdxFormat {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn probe(&self, head: &[u8], _filename: &Path) -> u32 {
        if head.len() >= 8 && &head[0..8] == header::FILE_SIGNATURE {
            100
        } else {
            0
        }
    }

    fn open(&self, storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Box<dyn Driver>> {
        Ok(Box::new(Vhdx::open(storage, opts)?))
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

/// How the log looked when the image was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogState {
    /// Nothing to replay.
    Clean,
    /// Replayed into the file by this (read-write) open.
    Replayed,
    /// Replayed into memory by this read-only open; the file is unchanged.
    ReplayedInMemory,
}

/// What this open has done to the headers.
#[derive(Debug, Default)]
struct Session {
    /// The file-write and data-write GUIDs were renewed.
    started: bool,
    /// The log GUID the entries of this session carry (zero: none yet).
    log_guid: guid::Guid,
    /// Where the next entry goes within the log.
    log_pos: u64,
    /// The next entry's sequence number.
    next_sequence: u64,
}

/// An open VHDX image.
pub struct Vhdx {
    storages: [Arc<dyn Storage>; 1],
    state: Arc<OpenState>,
    headers: Mutex<Headers>,
    meta: Metadata,
    geo: Geometry,
    bat: Region,
    metadata_region: Region,
    /// The log's place (offset, length).
    log: (u64, u64),
    /// 4 KiB metadata sectors (BAT and sector bitmaps) by file offset.
    cache: RwLock<TableCache>,
    /// Where the next block goes (1 MiB-aligned, past everything).
    next_free: Mutex<u64>,
    units: Arc<UnitLocks>,
    flush_lock: Mutex<()>,
    session: Mutex<Session>,
    log_state: LogState,
    /// The parent file name chosen from the parent locator.
    parent: Option<String>,
    /// Problems found at open that `check` reports (cleared when `check
    /// -r` repairs them).
    open_problems: Mutex<Vec<String>>,
}

/// 4 KiB metadata sectors kept cached while clean (16 MiB).
const CACHE_SECTORS: usize = 4096;

impl Vhdx {
    fn file(&self) -> &dyn Storage {
        &*self.storages[0]
    }

    /// The image's metadata values.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The data-write GUID of the current header.
    pub fn data_write_guid(&self) -> guid::Guid {
        self.headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current()
            .data_write
    }

    /// How the log looked at open.
    pub fn log_state(&self) -> LogState {
        self.log_state
    }

    fn subformat(&self) -> &'static str {
        if self.meta.has_parent {
            "differencing"
        } else if self.meta.leave_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }
}

impl Driver for Vhdx {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn virtual_size(&self) -> u64 {
        self.meta.size
    }

    fn sector_size(&self) -> u32 {
        self.meta.logical_sector
    }

    fn storages(&self) -> &[Arc<dyn Storage>] {
        &self.storages
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.map_run(offset, max_len)
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (m, len) = self.map_run(offset, max_len)?;
        Ok(BlockStatus::of_mapping(m, len, None))
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        self.map_write_range(offset, len)
    }

    fn commit(&self, commit: Commit) -> Result<()> {
        self.publish(commit)
    }

    fn map_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<ZeroMapping> {
        self.map_zero_range(offset, len, flags)
    }

    fn map_discard(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        self.map_discard_range(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_metadata()
    }

    fn info(&self) -> DriverInfo {
        let log = match self.log_state {
            LogState::Clean => "clean",
            LogState::Replayed => "replayed",
            LogState::ReplayedInMemory => "replayed in memory",
        };
        DriverInfo {
            cluster_size: Some(self.meta.block_size as u64),
            format_specific: Some(FormatSpecific::Vhdx(VhdxSpecific {
                subformat: self.subformat().into(),
                block_size: self.meta.block_size as u64,
                logical_sector_size: self.meta.logical_sector,
                physical_sector_size: self.meta.physical_sector,
                has_parent: self.meta.has_parent,
                log: log.into(),
                data_write_guid: self.data_write_guid().to_string(),
                disk_id: self.meta.disk_id.to_string(),
            })),
            ..DriverInfo::default()
        }
    }

    fn backing(&self) -> Option<BackingRef> {
        self.parent.as_ref().map(|p| BackingRef {
            filename: p.clone(),
            format: Some("vhdx".into()),
        })
    }

    fn check_backing(&self, backing: &crate::Image) -> Result<()> {
        self.check_parent(backing)
    }

    fn check(&self, repair: Option<RepairMode>) -> Result<crate::driver::CheckReport> {
        self.check_image(repair)
    }

    fn set_read_only(&self, read_only: bool) -> Result<()> {
        self.reopened(read_only)
    }

    fn close(&self) -> Result<()> {
        self.close_session()
    }
}
