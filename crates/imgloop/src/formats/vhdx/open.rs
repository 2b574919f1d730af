//! Opening: headers, log replay, regions, metadata, the parent.
//!
//! A log that needs replay is replayed into the file by a read-write open
//! (headers renewed first, the log GUID cleared after). A read-only open
//! replays it into an [`OverlayStorage`] instead: the driver reads the
//! repaired view and the file is not changed by a byte.

use super::bat::Geometry;
use super::guid::Guid;
use super::header::{Headers, RegionTable, FILE_SIGNATURE, MIB};
use super::log::{apply, Log, Op};
use super::metadata::Metadata;
use super::{LogState, Session, Vhdx, CACHE_SECTORS};
use crate::driver::DriverOpenOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::formats::table_cache::TableCache;
use crate::inflight::UnitLocks;
use crate::policy::FileRole;
use crate::state::Mode;
use crate::storage::{OverlayStorage, Storage};
use std::sync::{Arc, Mutex, RwLock};

impl Vhdx {
    /// Opens a VHDX image.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Vhdx> {
        let mut sig = [0u8; 8];
        let len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if len >= 8 {
            storage
                .read_at(&mut sig, 0)
                .map_err(|e| Error::io("reading the VHDX file identifier", e))?;
        }
        if &sig != FILE_SIGNATURE {
            return Err(Error::invalid_format(
                "VHDX file identifier",
                0,
                "not a VHDX image (no 'vhdxfile' signature)",
            ));
        }
        let mut headers = Headers::read(&*storage)?;
        let mut problems = headers.problems();
        let read_only = opts.read_only();
        let (storage, log_state) = Self::replay(storage, &mut headers, read_only)?;
        let cur = *headers.current();
        let log = (cur.log_offset, cur.log_length as u64);
        let (regions, region_problems) = RegionTable::read(&*storage)?;
        problems.extend(region_problems);
        let (bat, metadata_region) = regions.known(log)?;
        let meta = Metadata::read(&*storage, &metadata_region)?;
        let geo = Geometry::new(
            meta.size,
            meta.block_size as u64,
            meta.logical_sector as u64,
            meta.has_parent,
        );
        if geo.bat_bytes() > bat.length {
            return Err(Error::invalid_format(
                "VHDX region table",
                bat.offset,
                format!(
                    "the BAT region ({} bytes) is smaller than the {} entries the disk needs",
                    bat.length, geo.entries
                ),
            ));
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        let structures_end = regions
            .entries
            .iter()
            .map(|r| r.end())
            .chain([log.0 + log.1, file_len])
            .max()
            .unwrap_or(file_len);
        let parent = match &meta.parent {
            Some(loc) => Some(Self::find_parent(loc, opts)?),
            None => None,
        };
        let capacity = match opts.options.get("cache-size") {
            Some(v) => ((crate::size::parse_size(v)? / 4096) as usize).max(4),
            None => CACHE_SECTORS,
        };
        Ok(Vhdx {
            storages: [storage],
            state: opts.state.clone(),
            headers: Mutex::new(headers),
            meta,
            geo,
            bat,
            metadata_region,
            log,
            cache: RwLock::new(TableCache::new(capacity)),
            next_free: Mutex::new(structures_end.next_multiple_of(MIB)),
            units: UnitLocks::new(),
            flush_lock: Mutex::new(()),
            session: Mutex::new(Session::default()),
            log_state,
            parent,
            open_problems: Mutex::new(problems),
        })
    }

    /// Replays the log, if it needs it: into the file for a read-write
    /// open (returning the same storage), into an overlay otherwise.
    fn replay(
        storage: Arc<dyn Storage>,
        headers: &mut Headers,
        read_only: bool,
    ) -> Result<(Arc<dyn Storage>, LogState)> {
        let cur = *headers.current();
        let log = Log::new(&*storage, &cur)?;
        let entries = log.active()?;
        if entries.is_empty() {
            return Ok((storage, LogState::Clean));
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        let end = log.check_targets(&entries, file_len)?;
        if read_only {
            let mut view =
                OverlayStorage::new(storage).map_err(|e| Error::io("reading the image", e))?;
            for e in &entries {
                for op in &e.ops {
                    match op {
                        Op::Data { at, sector } => view.put(sector, *at),
                        Op::Zero { at, len } => view.put_zeroes(*at, *len),
                    }
                }
            }
            view.grow(end);
            return Ok((Arc::new(view), LogState::ReplayedInMemory));
        }
        // Renew the GUIDs before changing the file, replay, then mark the
        // log empty.
        let renewed = super::header::Header {
            file_write: Guid::random(),
            data_write: Guid::random(),
            ..cur
        };
        flush::write_headers(&*storage, headers, renewed)?;
        apply(&entries, &*storage, end)?;
        storage
            .sync()
            .map_err(|e| Error::io("syncing the image", e))?;
        let cleared = super::header::Header {
            log_guid: Guid::ZERO,
            ..*headers.current()
        };
        flush::write_headers(&*storage, headers, cleared)?;
        Ok((storage, LogState::Replayed))
    }

    /// The parent's file name, from the locator in the specification's
    /// order: the relative path (Windows separators turned into `/`), the
    /// volume path and the absolute Windows path (their file name next to
    /// this image, as a Windows drive means nothing here; an absolute
    /// path of this system is taken as it is). The first that opens under
    /// the policy wins; when none does, the first candidate (the error
    /// names it).
    fn find_parent(
        loc: &super::metadata::ParentLocator,
        opts: &DriverOpenOptions,
    ) -> Result<String> {
        let mut candidates = Vec::new();
        if let Some(rel) = loc.entries.get("relative_path") {
            let rel = rel.replace('\\', "/");
            let rel = rel.strip_prefix("./").unwrap_or(&rel).to_string();
            candidates.push(rel);
        }
        for key in ["volume_path", "absolute_win32_path"] {
            if let Some(p) = loc.entries.get(key) {
                // An absolute path of this system (imgloop writes one with
                // Windows separators); a drive or volume means nothing
                // here, so the file name next to this image.
                let unix = p.replace('\\', "/");
                if unix.starts_with('/') && !unix.starts_with("//") {
                    candidates.push(unix);
                }
                if let Some(name) = p.rsplit(['\\', '/']).next().filter(|n| !n.is_empty()) {
                    candidates.push(name.to_string());
                }
            }
        }
        let first = candidates.first().cloned().ok_or_else(|| {
            Error::invalid_format(
                "VHDX parent locator",
                0,
                "the parent locator names no path to the parent",
            )
        })?;
        for c in &candidates {
            if Self::parent_exists(c, opts) {
                return Ok(c.clone());
            }
        }
        Ok(first)
    }

    fn parent_exists(name: &str, opts: &DriverOpenOptions) -> bool {
        opts.policy
            .open(FileRole::Backing, opts.path.as_deref(), name, false)
            .is_ok()
    }

    /// The parent the generic layer opened must be the VHDX the child was
    /// made over: same size and sector size, and its data-write GUID the
    /// child's linkage.
    pub(super) fn check_parent(&self, parent: &crate::Image) -> Result<()> {
        let Some(p) = parent.driver().as_any().downcast_ref::<Vhdx>() else {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                format!(
                    "the parent '{}' of a differencing VHDX must be a VHDX image, not {}",
                    parent.name(),
                    parent.format()
                ),
            ));
        };
        let loc = self
            .meta
            .parent
            .as_ref()
            .expect("a differencing image has a locator");
        let have = p.data_write_guid();
        let want = [loc.linkage(), loc.linkage2()];
        if !want.contains(&Some(have)) {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                format!(
                    "the parent '{}' has data-write GUID {have}, but this image was made over {} (parent_linkage): the parent changed or is another disk",
                    parent.name(),
                    loc.linkage().map_or("an unreadable GUID".to_string(), |g| g.to_string())
                ),
            ));
        }
        if p.meta.logical_sector != self.meta.logical_sector {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                format!(
                    "the parent '{}' has {}-byte sectors, this image {}-byte ones",
                    parent.name(),
                    p.meta.logical_sector,
                    self.meta.logical_sector
                ),
            ));
        }
        Ok(())
    }

    /// Reopening read-write an image whose log was replayed in memory
    /// would need the real replay first.
    pub(super) fn reopened(&self, read_only: bool) -> Result<()> {
        if !read_only && self.log_state == LogState::ReplayedInMemory {
            return Err(Error::new(
                ErrorKind::State,
                "the image's log was replayed in memory for a read-only open; open it read-write again to replay it into the file",
            ));
        }
        Ok(())
    }

    /// True when this open may write.
    pub(super) fn writable(&self) -> bool {
        self.state.mode() != Mode::ReadOnly && self.log_state != LogState::ReplayedInMemory
    }
}

use super::flush;
