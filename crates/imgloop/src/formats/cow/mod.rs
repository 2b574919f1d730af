//! User-Mode-Linux COW files (`cow`): a bitmap with one bit per 512-byte
//! sector over a raw backing file. A set bit means the sector's data is in
//! the COW file at `data offset + 512 · sector`; otherwise it is read from
//! the backing file. [`header`] reads every layout Linux and old QEMU
//! wrote.
//!
//! Writes: a sector whose bit is set is rewritten in place; any other
//! write claims its 32 KiB unit, has the generic layer copy the parts of
//! the touched sectors it does not cover from the backing file, and sets
//! the bits on commit. The bitmap sits in a write-back cache of 4 KiB
//! chunks; the flush syncs the data first and then writes the changed
//! chunks (whole sectors), so a crash never shows a sector as written
//! before its data is on disk.
//!
//! Discard frees the space of stored sectors (punching holes) and leaves
//! their bits set, so they read as zeroes: old backing data never comes
//! back, and the bitmap never has to be cleared.
//!
//! Like UML, the backing file's size and modification time are compared
//! with the header on open: a mismatch is a warning (the COW file may
//! have been made over another file) and refuses writes.

pub mod header;

use crate::driver::{
    Allocation, BackingRef, BlockStatus, Commit, CreateOptions, DiscardAction, DiscardMapping,
    Driver, DriverInfo, DriverOpenOptions, Fill, Format, Mapping, OptionSpec, StorageId,
    WriteMapping, ZeroAction, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::table_cache::TableCache;
use crate::inflight::{UnitGuard, UnitLocks};
use crate::policy::{FilePolicy, FileRole};
use crate::state::{Mode, OpenState};
use crate::storage::Storage;
use header::{CowHeader, Layout, SECTOR};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

/// Bytes of bitmap one cache entry holds (16 MiB of disk).
const CHUNK: u64 = 4096;
/// Sectors one allocation claim covers (32 KiB).
const UNIT_SECTORS: u64 = 64;
/// Bitmap chunks kept cached while clean (16 GiB of disk).
const CACHE_CHUNKS: usize = 1024;

/// The UML COW format (`-f cow`).
pub struct CowFormat;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "size",
        kind: "size",
        help: "Virtual disk size (the backing file's size when not given)",
    },
    OptionSpec {
        name: "backing_file",
        kind: "string",
        help: "File name of the backing (raw) image",
    },
    OptionSpec {
        name: "backing_fmt",
        kind: "string",
        help: "Format of the backing image (raw)",
    },
    OptionSpec {
        name: "version",
        kind: "number",
        help: "COW header version (3, or 2 for old User-Mode Linux)",
    },
];

impl Format for CowFormat {
    fn name(&self) -> &'static str {
        "cow"
    }

    fn probe(&self, head: &[u8], _filename: &Path) -> u32 {
        if CowHeader::probe(head) {
            100
        } else {
            0
        }
    }

    fn open(&self, storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Box<dyn Driver>> {
        Ok(Box::new(Cow::open(storage, opts)?))
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
        let name = opts
            .backing_file
            .as_deref()
            .ok_or_else(|| Error::invalid_argument("a COW file needs a backing file (-b)"))?;
        if let Some(f) = opts.backing_format.as_deref().filter(|f| *f != "raw") {
            return Err(Error::unsupported(format!(
                "a COW file's backing file is a raw image, not {f}"
            )));
        }
        let version: u32 = opts.get("version")?.unwrap_or(3);
        // UML stores an absolute path and checks the file's size and
        // modification time against the header.
        let full = FilePolicy::resolve(path, name);
        let full = std::fs::canonicalize(&full).map_err(|e| {
            Error::io(
                format!("could not open backing file '{}'", full.display()),
                e,
            )
        })?;
        let meta = std::fs::metadata(&full).map_err(|e| {
            Error::io(
                format!("could not open backing file '{}'", full.display()),
                e,
            )
        })?;
        let size = meta.len();
        if opts.size != 0 && opts.size != size && opts.size != size.next_multiple_of(SECTOR) {
            return Err(Error::invalid_argument(format!(
                "a COW file has its backing file's size ({size} bytes), not {}",
                opts.size
            )));
        }
        let h = CowHeader::new(
            version,
            full.display().to_string(),
            meta.mtime() as u32,
            size,
        )?;
        let io = |what: &'static str| move |e| Error::io(what, e);
        storage
            .write_at(&h.to_bytes()?, 0)
            .map_err(io("writing the COW header"))?;
        // Sparse: the bitmap reads as zeroes until written, as
        // `uml_mkcow` leaves it.
        storage
            .set_len(h.data_offset + h.size)
            .map_err(io("sizing the COW file"))
    }
}

/// An open COW file.
pub struct Cow {
    storages: [Arc<dyn Storage>; 1],
    header: CowHeader,
    state: Arc<OpenState>,
    /// Bitmap chunks by their byte offset in the file.
    bitmap: RwLock<TableCache>,
    flush_lock: Mutex<()>,
    units: Arc<UnitLocks>,
    /// Why writes are refused (the backing file changed), if they are.
    refuse_writes: Option<String>,
    /// Other problems found at open, for `warnings`.
    notes: Vec<String>,
}

/// What a commit of this driver publishes: sectors `[first, last)` now
/// hold their data in the COW file.
struct Publish {
    first: u64,
    last: u64,
    _claim: UnitGuard,
}

impl Cow {
    /// Opens a COW file on `storage`, comparing the backing file (next to
    /// `opts.path`) with the header.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Cow> {
        let header = CowHeader::read(&*storage)?;
        let refuse_writes = Self::backing_mismatch(&header, opts);
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the COW file size", e))?;
        let bitmap_end = header.bitmap_offset + header.bitmap_bytes();
        let mut notes = Vec::new();
        if file_len < bitmap_end {
            notes.push(format!(
                "the file ends at {file_len}, inside the bitmap (which ends at {bitmap_end}): \
                 the missing bits read as clear, so those sectors read from the backing file"
            ));
        }
        Ok(Cow {
            storages: [storage],
            header,
            state: opts.state.clone(),
            bitmap: RwLock::new(TableCache::new(CACHE_CHUNKS)),
            flush_lock: Mutex::new(()),
            units: UnitLocks::new(),
            refuse_writes,
            notes,
        })
    }

    /// UML's backing file checks: size and 32-bit mtime must match the
    /// header (old QEMU never set them reliably, so its layout is not
    /// checked). The file is opened through the open policy; one that may
    /// not or cannot be opened is the generic layer's error to give.
    fn backing_mismatch(h: &CowHeader, opts: &DriverOpenOptions) -> Option<String> {
        if matches!(h.layout, Layout::V2Qemu { .. }) {
            return None;
        }
        let file = opts
            .policy
            .open(
                FileRole::Backing,
                opts.path.as_deref(),
                &h.backing_file,
                false,
            )
            .ok()?;
        let meta = file.as_file()?.metadata().ok()?;
        let path = FilePolicy::resolve(opts.path.as_deref(), &h.backing_file);
        if meta.len() != h.size {
            return Some(format!(
                "Size mismatch ({} vs {}) of COW header vs backing file '{}'",
                h.size,
                meta.len(),
                path.display()
            ));
        }
        if meta.mtime() as u32 != h.mtime {
            return Some(format!(
                "mtime mismatch ({} vs {}) of COW header vs backing file '{}'",
                h.mtime,
                meta.mtime(),
                path.display()
            ));
        }
        None
    }

    fn file(&self) -> &dyn Storage {
        &*self.storages[0]
    }

    /// Byte offset in the file of the bitmap chunk holding `sector`'s bit.
    fn chunk_of(&self, sector: u64) -> u64 {
        self.header.bitmap_offset + (sector / 8) / CHUNK * CHUNK
    }

    /// Reads a bitmap chunk (the part past the end of the file is zero).
    fn read_chunk(&self, off: u64) -> Result<Box<[u8]>> {
        let end = self.header.bitmap_offset + self.header.bitmap_bytes();
        let len = CHUNK.min(end - off) as usize;
        let mut b = vec![0u8; len].into_boxed_slice();
        let file_len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading the COW file size", e))?;
        if off < file_len {
            let n = ((file_len - off) as usize).min(len);
            self.file()
                .read_at(&mut b[..n], off)
                .map_err(|e| Error::io("reading the COW bitmap", e).at("COW bitmap", off))?;
        }
        Ok(b)
    }

    /// The state of `sector` and how many sectors from it (at most
    /// `max`) share it, from cached chunks; `Err(chunk)` when the first
    /// sector's chunk is not cached. A later chunk that is not cached
    /// ends the run.
    fn run_cached(
        &self,
        cache: &TableCache,
        sector: u64,
        max: u64,
        fetched: &Option<(u64, Box<[u8]>)>,
    ) -> std::result::Result<(bool, u64), u64> {
        let chunk = |off: u64| -> Option<&[u8]> {
            cache.get(off).or(match fetched {
                Some((o, d)) if *o == off => Some(&**d),
                _ => None,
            })
        };
        let first_chunk = self.chunk_of(sector);
        let Some(c) = chunk(first_chunk) else {
            return Err(first_chunk);
        };
        let bit = |c: &[u8], s: u64| {
            let i = ((s / 8) % CHUNK) as usize;
            c.get(i).is_some_and(|b| b >> (s % 8) & 1 == 1)
        };
        let state = bit(c, sector);
        let mut n = 1;
        let mut cur = (first_chunk, c);
        while n < max {
            let s = sector + n;
            let off = self.chunk_of(s);
            if off != cur.0 {
                match chunk(off) {
                    Some(c) => cur = (off, c),
                    None => break,
                }
            }
            // Whole bytes of the same state at a time.
            let i = ((s / 8) % CHUNK) as usize;
            let full = if state { 0xff } else { 0 };
            if s.is_multiple_of(8) && n + 8 <= max && cur.1.get(i) == Some(&full) {
                n += 8;
                continue;
            }
            if bit(cur.1, s) != state {
                break;
            }
            n += 1;
        }
        Ok((state, n))
    }

    /// [`run_cached`](Cow::run_cached), reading chunks that are not cached
    /// without holding the lock.
    fn run(&self, sector: u64, max: u64) -> Result<(bool, u64)> {
        let mut fetched = None;
        loop {
            let miss = {
                let cache = self.bitmap.read().unwrap_or_else(|e| e.into_inner());
                match self.run_cached(&cache, sector, max, &fetched) {
                    Ok(r) => return Ok(r),
                    Err(off) => {
                        if fetched.is_none() {
                            if let Some(n) = self.hole_run(&cache, off, sector, max)? {
                                return Ok((false, n));
                            }
                        }
                        off
                    }
                }
            };
            let data = self.read_chunk(miss)?;
            let mut cache = self.bitmap.write().unwrap_or_else(|e| e.into_inner());
            if !cache.contains(miss) {
                cache.insert(miss, data.clone(), false);
            }
            fetched = Some((miss, data));
        }
    }

    /// When the bitmap chunk at `chunk` (not cached) lies in a hole of the
    /// file (`uml_mkcow` leaves the bitmap sparse) or past its end, the
    /// sectors from `sector` whose bits are in the hole are all clear: how
    /// many of them (at most `max`), up to the next cached chunk. So block
    /// status costs what the bitmap holds, not the virtual size.
    fn hole_run(
        &self,
        cache: &TableCache,
        chunk: u64,
        sector: u64,
        max: u64,
    ) -> Result<Option<u64>> {
        let bitmap_end = self.header.bitmap_offset + self.header.bitmap_bytes();
        let (data, len) = self
            .file()
            .extent(chunk, bitmap_end - chunk)
            .map_err(|e| Error::io("reading the COW bitmap's allocation", e))?;
        if data {
            return Ok(None);
        }
        // Whole chunks only; a cached chunk (maybe with unflushed bits)
        // ends the hole.
        let mut stop = (chunk + len).min(bitmap_end);
        if stop < bitmap_end {
            stop = chunk + (stop - chunk) / CHUNK * CHUNK;
        }
        if let Some(next) = cache.next_offset_after(chunk) {
            stop = stop.min(next);
        }
        if stop <= chunk {
            return Ok(None);
        }
        let last_sector = (stop - self.header.bitmap_offset).saturating_mul(8);
        Ok(Some(last_sector.saturating_sub(sector).min(max).max(1)))
    }

    /// Sets the bits of sectors `[first, last)`.
    fn set_bits(&self, first: u64, last: u64) -> Result<()> {
        let mut cache = self.bitmap.write().unwrap_or_else(|e| e.into_inner());
        let mut s = first;
        while s < last {
            let off = self.chunk_of(s);
            if !cache.contains(off) {
                let data = self.read_chunk(off)?;
                cache.insert(off, data, false);
            }
            let c = cache.get_mut(off).expect("just loaded");
            while s < last && self.chunk_of(s) == off {
                let i = ((s / 8) % CHUNK) as usize;
                c[i] |= 1 << (s % 8);
                s += 1;
            }
        }
        let over = cache.over_capacity();
        drop(cache);
        if over {
            self.flush_bitmap()?;
        }
        Ok(())
    }

    /// Writes changed bitmap chunks after the data they describe is
    /// durable.
    fn flush_bitmap(&self) -> Result<()> {
        if self.state.mode() == Mode::ReadOnly {
            return Ok(());
        }
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let dirty = self
            .bitmap
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dirty_copies();
        if dirty.is_empty() {
            return Ok(());
        }
        // Data before the bits that say it is there.
        self.file()
            .sync()
            .map_err(|e| Error::io("syncing the COW file", e))?;
        for (off, _, data) in &dirty {
            self.file()
                .write_at(data, *off)
                .map_err(|e| Error::io("writing the COW bitmap", e).at("COW bitmap", *off))?;
        }
        let mut cache = self.bitmap.write().unwrap_or_else(|e| e.into_inner());
        for (off, generation, _) in &dirty {
            cache.mark_clean_if(*off, *generation);
        }
        cache.trim();
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if let Some(why) = &self.refuse_writes {
            return Err(Error::new(
                ErrorKind::State,
                format!(
                    "{why}; writes refused (the COW file belongs to another backing file state)"
                ),
            ));
        }
        if self.state.mode() == Mode::ReadOnly {
            return Err(Error::read_only("write"));
        }
        Ok(())
    }

    /// Refuses writes to the sectors an old layout has no bits for: UML
    /// would keep reading them from the backing file.
    fn check_has_bits(&self, sector: u64) -> Result<()> {
        if sector < self.header.bitmap_sectors {
            return Ok(());
        }
        Err(Error::unsupported(format!(
            "sector {sector} has no bit in this version {} COW file's bitmap (UML's rounding \
             leaves the last {} sectors of a disk that is not a multiple of 4 KiB to the \
             backing file)",
            if matches!(self.header.layout, Layout::V1 { .. }) {
                1
            } else {
                2
            },
            self.header.size.div_ceil(SECTOR) - self.header.bitmap_sectors
        )))
    }

    fn data_at(&self, guest: u64) -> u64 {
        self.header.data_offset + guest
    }
}

impl Driver for Cow {
    fn format_name(&self) -> &'static str {
        "cow"
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
        let sector = offset / SECTOR;
        if sector >= self.header.bitmap_sectors {
            return Ok((Mapping::Unallocated, max_len));
        }
        let max = (offset + max_len)
            .div_ceil(SECTOR)
            .min(self.header.bitmap_sectors)
            - sector;
        let (set, n) = self.run(sector, max)?;
        let len = ((sector + n) * SECTOR - offset).min(max_len);
        let m = if set {
            Mapping::Data {
                storage: StorageId::IMAGE,
                offset: self.data_at(offset),
            }
        } else {
            Mapping::Unallocated
        };
        Ok((m, len))
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (m, len) = self.map(offset, max_len)?;
        Ok(BlockStatus::of_mapping(m, len, None))
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        self.check_writable()?;
        let sector = offset / SECTOR;
        self.check_has_bits(sector)?;
        let end = (offset + len).min(self.header.size);
        let max = end.div_ceil(SECTOR).min(self.header.bitmap_sectors) - sector;
        let in_place = |set: bool, n: u64| {
            set.then(|| WriteMapping::InPlace {
                storage: StorageId::IMAGE,
                offset: self.data_at(offset),
                len: ((sector + n) * SECTOR - offset).min(len),
            })
        };
        let (set, n) = self.run(sector, max)?;
        if let Some(m) = in_place(set, n) {
            return Ok(m);
        }
        // New sectors, within one unit: claim it, then look again.
        let unit = sector / UNIT_SECTORS;
        let claim = self.units.lock(unit);
        let unit_end = (unit + 1) * UNIT_SECTORS;
        let (set, n) = self.run(sector, max.min(unit_end - sector))?;
        if let Some(m) = in_place(set, n) {
            return Ok(m);
        }
        let guest = sector * SECTOR;
        let stop = ((sector + n) * SECTOR).min(self.header.size);
        let mut fills = Vec::new();
        if offset > guest {
            fills.push(Fill {
                guest,
                len: offset - guest,
                from: Mapping::Unallocated,
            });
        }
        if end < stop {
            fills.push(Fill {
                guest: end,
                len: stop - end,
                from: Mapping::Unallocated,
            });
        }
        Ok(WriteMapping::Allocate(Allocation {
            guest,
            len: stop - guest,
            storage: StorageId::IMAGE,
            offset: self.data_at(guest),
            fills,
            zeroed: false,
            commit: Commit::new(Publish {
                first: sector,
                last: sector + n,
                _claim: claim,
            }),
        }))
    }

    fn commit(&self, commit: Commit) -> Result<()> {
        match commit.into_inner::<Publish>() {
            Some(Publish { first, last, .. }) => self.set_bits(first, last),
            None => Err(Error::new(
                ErrorKind::State,
                "a commit from another driver reached cow",
            )),
        }
    }

    fn map_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<ZeroMapping> {
        self.check_writable()?;
        let sector = offset / SECTOR;
        self.check_has_bits(sector)?;
        let max = (offset + len)
            .div_ceil(SECTOR)
            .min(self.header.bitmap_sectors)
            - sector;
        let (set, n) = self.run(sector, max)?;
        let covered = ((sector + n) * SECTOR - offset).min(len);
        // Sectors stored here are zeroed in place; the others read from
        // the backing file, so zeroes have to be written (and their bits
        // set) through the write path.
        let action = if set {
            ZeroAction::Host {
                storage: StorageId::IMAGE,
                offset: self.data_at(offset),
            }
        } else {
            ZeroAction::Buffers
        };
        Ok(ZeroMapping {
            len: covered,
            action,
            commit: None,
        })
    }

    fn map_discard(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        self.check_writable()?;
        let nothing = |len| DiscardMapping {
            len,
            action: DiscardAction::Nothing,
            commit: None,
        };
        if !offset.is_multiple_of(SECTOR) {
            let next = offset.next_multiple_of(SECTOR);
            return Ok(nothing((next - offset).min(len)));
        }
        let sector = offset / SECTOR;
        let whole = len / SECTOR;
        if whole == 0 || sector >= self.header.bitmap_sectors {
            return Ok(nothing(len));
        }
        let whole = whole.min(self.header.bitmap_sectors - sector);
        let (set, n) = self.run(sector, whole)?;
        // Sectors read from the backing file keep doing so. Stored ones
        // have their space freed and read as zeroes (like qcow2 over a
        // backing file, a discard never brings old backing data back);
        // their bits stay, so the bitmap does not change.
        let action = if set {
            DiscardAction::PunchHole {
                storage: StorageId::IMAGE,
                offset: self.data_at(offset),
            }
        } else {
            DiscardAction::Nothing
        };
        Ok(DiscardMapping {
            len: n * SECTOR,
            action,
            commit: None,
        })
    }

    fn flush(&self) -> Result<()> {
        self.flush_bitmap()
    }

    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }

    fn backing(&self) -> Option<BackingRef> {
        Some(BackingRef {
            filename: self.header.backing_file.clone(),
            format: Some("raw".into()),
        })
    }

    fn warnings(&self) -> Vec<Error> {
        let state = self
            .refuse_writes
            .iter()
            .map(|why| Error::new(ErrorKind::State, why.clone()));
        let damage = self
            .notes
            .iter()
            .map(|why| Error::invalid_format("COW bitmap", self.header.bitmap_offset, why.clone()));
        state.chain(damage).collect()
    }

    fn close(&self) -> Result<()> {
        self.flush_bitmap()?;
        if self.state.mode() == Mode::ReadOnly {
            return Ok(());
        }
        self.file()
            .sync()
            .map_err(|e| Error::io("syncing the COW file", e))
    }
}

#[cfg(test)]
mod tests;
