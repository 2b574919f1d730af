//! Reads and writes: BAT and sector-bitmap lookups through the sector
//! cache, mappings for reads, allocation for writes, write-zeroes and
//! discard.
//!
//! | block state | read | write |
//! |---|---|---|
//! | fully present | the block | in place |
//! | partially present (differencing) | per sector: the block or the parent | set sectors in place; others written, then their bits set |
//! | not present | zeroes, or the parent (differencing) | a new block (whole in plain images, per sector in differencing ones) |
//! | zero, unmapped, undefined | zeroes | a new fully present block |
//!
//! New blocks are appended at the end of the file (1 MiB-aligned); the
//! BAT entry and sector bits are set in the cache after the data is
//! written and reach the file through the log at the next flush.

use super::bat::{self, Payload, BITMAP_BLOCK, SB_PRESENT};
use super::header::MIB;
use super::Vhdx;
use crate::driver::{
    Allocation, Commit, DiscardAction, DiscardMapping, Fill, Mapping, StorageId, WriteMapping,
    ZeroAction, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::table_cache::TableCache;
use crate::inflight::UnitGuard;

/// Bytes of a cached metadata sector.
const SECTOR: u64 = 4096;

/// A metadata change a commit publishes.
#[derive(Debug)]
enum Change {
    /// BAT entry `index` becomes `entry`.
    Entry { index: u64, entry: u64 },
    /// The sector-bitmap bits of logical sectors `[first, last)` (guest
    /// offsets divided by the sector size) are set; the bitmap block is
    /// at `bitmap`.
    Bits { bitmap: u64, first: u64, last: u64 },
}

/// What a commit publishes.
struct Publish {
    changes: Vec<Change>,
    _claim: Option<UnitGuard>,
}

/// Most blocks one read-side walk looks at before returning.
const WALK_LIMIT: u64 = 1 << 16;

/// A sector the cache does not hold.
struct Miss(u64);

impl Vhdx {
    fn sector_cached<'c>(
        &self,
        cache: &'c TableCache,
        offset: u64,
    ) -> std::result::Result<&'c [u8], Miss> {
        let s = offset & !(SECTOR - 1);
        cache.get(s).ok_or(Miss(s))
    }

    /// Reads metadata sector `s` (zeroes past the end of the file).
    fn read_sector(&self, s: u64) -> Result<Box<[u8]>> {
        let mut b = vec![0u8; SECTOR as usize].into_boxed_slice();
        let len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if s < len {
            let n = (len - s).min(SECTOR) as usize;
            self.file()
                .read_at(&mut b[..n], s)
                .map_err(|e| Error::io("reading VHDX metadata", e).at("VHDX metadata sector", s))?;
        }
        Ok(b)
    }

    fn load(&self, s: u64) -> Result<()> {
        let data = self.read_sector(s)?;
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if !cache.contains(s) {
            cache.insert(s, data, false);
        }
        Ok(())
    }

    /// Runs `f` on the cache with the sector holding `offset` cached.
    fn with_sector<T>(&self, offset: u64, f: impl Fn(&TableCache, &[u8]) -> T) -> Result<T> {
        loop {
            let miss = {
                let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
                match self.sector_cached(&cache, offset) {
                    Ok(s) => return Ok(f(&cache, s)),
                    Err(m) => m,
                }
            };
            self.load(miss.0)?;
        }
    }

    /// File offset of BAT entry `index`.
    fn entry_at(&self, index: u64) -> u64 {
        self.bat.offset + index * 8
    }

    /// BAT entry `index`.
    pub(super) fn entry(&self, index: u64) -> Result<u64> {
        let at = self.entry_at(index);
        let i = (at % SECTOR) as usize;
        self.with_sector(at, |_, s| {
            u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"))
        })
    }

    /// The state and file offset of payload block `block`, checked.
    pub(super) fn block(&self, block: u64) -> Result<(Payload, u64)> {
        let e = self.entry(self.geo.payload_index(block))?;
        let state = Payload::of(e);
        let off = bat::offset_of(e);
        let at = self.entry_at(self.geo.payload_index(block));
        match state {
            Payload::FullyPresent | Payload::PartiallyPresent => {
                if state == Payload::PartiallyPresent && !self.meta.has_parent {
                    return Err(Error::corrupt(
                        "VHDX BAT",
                        at,
                        format!("block {block} is partially present in an image without a parent"),
                    ));
                }
                if off < MIB || off.checked_add(self.geo.block_size).is_none() {
                    return Err(Error::corrupt("VHDX BAT", at, format!("block {block} at file offset {off} lies in the header section or past 2^64")));
                }
            }
            Payload::Reserved(s) => {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    at,
                    format!("block {block} has the reserved state {s}"),
                ));
            }
            _ => {}
        }
        Ok((state, off))
    }

    /// The sector bitmap block of the chunk holding `block`, if present.
    fn bitmap_block(&self, block: u64) -> Result<Option<u64>> {
        let index = self.geo.bitmap_index(block);
        let e = self.entry(index)?;
        if e & 7 != SB_PRESENT {
            return Ok(None);
        }
        let off = bat::offset_of(e);
        if off < MIB || off.checked_add(BITMAP_BLOCK).is_none() {
            return Err(Error::corrupt(
                "VHDX BAT",
                self.entry_at(index),
                format!(
                    "sector bitmap at file offset {off} lies in the header section or past 2^64"
                ),
            ));
        }
        Ok(Some(off))
    }

    /// Whether the logical sector at guest `guest` is in this file, and
    /// how many sectors from it (at most `max`) share that.
    fn sector_run(&self, bitmap: Option<u64>, guest: u64, max: u64) -> Result<(bool, u64)> {
        let Some(bitmap) = bitmap else {
            return Ok((false, max));
        };
        let ls = self.geo.sector;
        let mut n = 0;
        let mut state = None;
        while n < max {
            let (byte, bit) = self.geo.bitmap_bit(guest + n * ls);
            let at = bitmap + byte;
            let i = (at % SECTOR) as usize;
            let (set, run) = self.with_sector(at, |_, s| {
                let v = s[i] >> bit & 1 == 1;
                // Whole bytes of one state at a time.
                let full = if v { 0xff } else { 0 };
                let mut k = 1u64;
                if bit == 0 {
                    let mut j = i;
                    while j < SECTOR as usize && s[j] == full {
                        j += 1;
                    }
                    k = ((j - i) as u64 * 8).max(1);
                }
                (v, k)
            })?;
            match state {
                None => state = Some(set),
                Some(s) if s != set => break,
                _ => {}
            }
            if run > 1 {
                n += run;
            } else {
                n += 1;
            }
        }
        Ok((state.unwrap_or(false), n.min(max)))
    }

    /// The mapping of `offset` for at most `len` bytes inside one block.
    fn map_in_block(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let n = len.min(bs - in_block);
        let data = |off: u64| Mapping::Data {
            storage: StorageId::IMAGE,
            offset: off + in_block,
        };
        let (state, off) = self.block(block)?;
        Ok(match state {
            Payload::FullyPresent => (data(off), n),
            Payload::PartiallyPresent => {
                let ls = self.geo.sector;
                let first = offset / ls;
                let last = (offset + n).div_ceil(ls);
                let (set, k) =
                    self.sector_run(self.bitmap_block(block)?, first * ls, last - first)?;
                let run = ((first + k) * ls - offset).min(n);
                (if set { data(off) } else { Mapping::Unallocated }, run)
            }
            Payload::NotPresent => (Mapping::Unallocated, n),
            _ => (Mapping::Zero, n),
        })
    }

    /// The mapping of `offset` and how many bytes share it.
    pub(super) fn map_run(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let (first, mut len) = self.map_in_block(offset, max_len)?;
        let mut steps = 1;
        while len < max_len && steps < WALK_LIMIT {
            let (m, n) = self.map_in_block(offset + len, max_len - len)?;
            let expect = match first {
                Mapping::Data { storage, offset: o } => Mapping::Data {
                    storage,
                    offset: o + len,
                },
                other => other,
            };
            if m != expect {
                break;
            }
            len += n;
            steps += 1;
        }
        Ok((first, len))
    }

    /// Appends `len` bytes (1 MiB-aligned) at the end of the file and
    /// grows the file over them, so the image always covers its blocks.
    pub(super) fn append(&self, len: u64) -> Result<u64> {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let at = *next;
        let end = at
            .checked_add(len)
            .filter(|&e| e < 1 << 56)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NoSpace,
                    "the VHDX file would grow past what a BAT entry can address",
                )
            })?;
        let file_len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if file_len < end {
            self.file()
                .set_len(end)
                .map_err(|e| Error::io("growing the VHDX file", e))?;
        }
        *next = end;
        Ok(at)
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable() {
            return Err(Error::read_only("write"));
        }
        self.start_session()
    }

    /// Where a write of `len` bytes at `offset` goes.
    pub(super) fn map_write_range(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        self.check_writable()?;
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let n = len.min(bs - in_block);
        let in_place = |off: u64, n: u64| WriteMapping::InPlace {
            storage: StorageId::IMAGE,
            offset: off + in_block,
            len: n,
        };
        if let (Payload::FullyPresent, off) = self.block(block)? {
            return Ok(in_place(off, n));
        }
        if let (Payload::PartiallyPresent, off) = self.block(block)? {
            if let Some(m) = self.sectors_in_place(block, off, offset, n)? {
                return Ok(m);
            }
        }
        let claim = self.units.lock(block);
        let (state, off) = self.block(block)?;
        match state {
            Payload::FullyPresent => Ok(in_place(off, n)),
            Payload::PartiallyPresent => match self.sectors_in_place(block, off, offset, n)? {
                Some(m) => Ok(m),
                None => self.write_sectors(block, off, offset, n, Vec::new(), claim),
            },
            Payload::NotPresent if self.meta.has_parent => {
                // A new block whose other sectors keep reading from the
                // parent: only the touched sectors are written.
                let mut changes = Vec::new();
                let bitmap = match self.bitmap_block(block)? {
                    Some(b) => b,
                    None => {
                        let b = self.append(BITMAP_BLOCK)?;
                        changes.push(Change::Entry {
                            index: self.geo.bitmap_index(block),
                            entry: b | SB_PRESENT,
                        });
                        b
                    }
                };
                let off = self.append(bs)?;
                changes.push(Change::Entry {
                    index: self.geo.payload_index(block),
                    entry: bat::entry(Payload::PartiallyPresent, off),
                });
                self.write_sectors_into(block, off, bitmap, offset, n, changes, claim)
            }
            _ => {
                // A whole new block; it reads as zeroes around the write.
                let off = self.append(bs)?;
                let start = block * bs;
                let stop = (start + bs).min(self.meta.size);
                let mut fills = Vec::new();
                if in_block > 0 {
                    fills.push(Fill {
                        guest: start,
                        len: in_block,
                        from: Mapping::Zero,
                    });
                }
                if offset + n < stop {
                    fills.push(Fill {
                        guest: offset + n,
                        len: stop - offset - n,
                        from: Mapping::Zero,
                    });
                }
                Ok(WriteMapping::Allocate(Allocation {
                    guest: start,
                    len: stop - start,
                    storage: StorageId::IMAGE,
                    offset: off,
                    fills,
                    zeroed: true,
                    commit: Commit::new(Publish {
                        changes: vec![Change::Entry {
                            index: self.geo.payload_index(block),
                            entry: bat::entry(Payload::FullyPresent, off),
                        }],
                        _claim: Some(claim),
                    }),
                }))
            }
        }
    }

    /// A partially present block's sectors under `[offset, offset + n)`
    /// that are all in this file: written in place.
    fn sectors_in_place(
        &self,
        block: u64,
        off: u64,
        offset: u64,
        n: u64,
    ) -> Result<Option<WriteMapping>> {
        let ls = self.geo.sector;
        let first = offset / ls;
        let last = (offset + n).div_ceil(ls);
        let (set, k) = self.sector_run(self.bitmap_block(block)?, first * ls, last - first)?;
        if !set {
            return Ok(None);
        }
        let run = ((first + k) * ls - offset).min(n);
        Ok(Some(WriteMapping::InPlace {
            storage: StorageId::IMAGE,
            offset: off + offset % self.geo.block_size,
            len: run,
        }))
    }

    fn write_sectors(
        &self,
        block: u64,
        off: u64,
        offset: u64,
        n: u64,
        changes: Vec<Change>,
        claim: UnitGuard,
    ) -> Result<WriteMapping> {
        let bitmap = self.bitmap_block(block)?.ok_or_else(|| {
            Error::corrupt(
                "VHDX BAT",
                self.entry_at(self.geo.bitmap_index(block)),
                format!("block {block} is partially present but its chunk has no sector bitmap"),
            )
        })?;
        self.write_sectors_into(block, off, bitmap, offset, n, changes, claim)
    }

    /// Writes the not-yet-present sectors from `offset` (at most `n`
    /// bytes' worth) of a block at `off`, the rest of each touched sector
    /// filled from the parent, and sets their bits on commit.
    #[allow(clippy::too_many_arguments)]
    fn write_sectors_into(
        &self,
        _block: u64,
        off: u64,
        bitmap: u64,
        offset: u64,
        n: u64,
        mut changes: Vec<Change>,
        claim: UnitGuard,
    ) -> Result<WriteMapping> {
        let ls = self.geo.sector;
        let bs = self.geo.block_size;
        let first = offset / ls;
        let last = (offset + n).div_ceil(ls);
        // Only the run of absent sectors from the first one.
        let present = changes.is_empty();
        let (_, k) = if present {
            self.sector_run(Some(bitmap), first * ls, last - first)?
        } else {
            (false, last - first)
        };
        let last = first + k;
        let start = first * ls;
        let stop = (last * ls).min(self.meta.size);
        let end = (offset + n).min(stop);
        let mut fills = Vec::new();
        if offset > start {
            fills.push(Fill {
                guest: start,
                len: offset - start,
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
        changes.push(Change::Bits {
            bitmap,
            first,
            last,
        });
        Ok(WriteMapping::Allocate(Allocation {
            guest: start,
            len: stop - start,
            storage: StorageId::IMAGE,
            offset: off + start % bs,
            fills,
            zeroed: false,
            commit: Commit::new(Publish {
                changes,
                _claim: Some(claim),
            }),
        }))
    }

    /// Applies a commit's changes to the cache.
    pub(super) fn publish(&self, commit: Commit) -> Result<()> {
        let Some(p) = commit.into_inner::<Publish>() else {
            return Err(Error::new(
                ErrorKind::State,
                "a commit from another driver reached vhdx",
            ));
        };
        for c in &p.changes {
            match *c {
                Change::Entry { index, entry } => {
                    let at = self.entry_at(index);
                    self.modify(at, |s, i| s[i..i + 8].copy_from_slice(&entry.to_le_bytes()))?;
                }
                Change::Bits {
                    bitmap,
                    first,
                    last,
                } => {
                    let ls = self.geo.sector;
                    let mut sector = first;
                    while sector < last {
                        let (byte, bit) = self.geo.bitmap_bit(sector * ls);
                        let at = bitmap + byte;
                        // Whole bytes where possible.
                        if bit == 0 && sector + 8 <= last {
                            let whole = ((last - sector) / 8).min(SECTOR - at % SECTOR);
                            self.modify(at, |s, i| s[i..i + whole as usize].fill(0xff))?;
                            sector += whole * 8;
                        } else {
                            self.modify(at, |s, i| s[i] |= 1 << bit)?;
                            sector += 1;
                        }
                    }
                }
            }
        }
        let over = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .over_capacity();
        if over {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Sets BAT entry `index` in the cache at once (for repairs).
    pub(super) fn set_entry_now(&self, index: u64, entry: u64) -> Result<()> {
        let at = self.entry_at(index);
        self.modify(at, |s, i| s[i..i + 8].copy_from_slice(&entry.to_le_bytes()))
    }

    /// Changes the cached sector holding `at` (`f` gets the sector and the
    /// index of `at` in it); the sector becomes dirty.
    fn modify(&self, at: u64, f: impl Fn(&mut [u8], usize)) -> Result<()> {
        let s = at & !(SECTOR - 1);
        loop {
            {
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                if let Some(data) = cache.get_mut(s) {
                    f(data, (at - s) as usize);
                    return Ok(());
                }
            }
            self.load(s)?;
        }
    }

    /// Write-zeroes: zero states for whole blocks of dynamic and
    /// differencing images, zeroing in place for fixed ones and parts of
    /// present blocks, zero buffers where the parent shows through.
    pub(super) fn map_zero_range(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<ZeroMapping> {
        self.check_writable()?;
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let n = len.min(bs - in_block);
        let whole = in_block == 0 && (n == bs || offset + n == self.meta.size);
        let (state, off) = self.block(block)?;
        let zero_state = || {
            Some(Commit::new(Publish {
                changes: vec![Change::Entry {
                    index: self.geo.payload_index(block),
                    entry: bat::entry(Payload::Zero, 0),
                }],
                _claim: None,
            }))
        };
        let (action, commit) = match state {
            Payload::FullyPresent if whole && !self.meta.leave_allocated && flags.may_unmap => (
                ZeroAction::Host {
                    storage: StorageId::IMAGE,
                    offset: off,
                },
                zero_state(),
            ),
            Payload::FullyPresent => (
                ZeroAction::Host {
                    storage: StorageId::IMAGE,
                    offset: off + in_block,
                },
                None,
            ),
            Payload::Zero | Payload::Unmapped | Payload::Undefined => (ZeroAction::Metadata, None),
            Payload::NotPresent if !self.meta.has_parent => (ZeroAction::Metadata, None),
            _ if whole => (ZeroAction::Metadata, zero_state()),
            _ => (ZeroAction::Buffers, None),
        };
        Ok(ZeroMapping {
            len: n,
            action,
            commit,
        })
    }

    /// Discard: whole blocks of dynamic images become unmapped (their
    /// space punched out); present ranges of fixed images are punched out
    /// in place; the rest is left alone.
    pub(super) fn map_discard_range(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        self.check_writable()?;
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let n = len.min(bs - in_block);
        let whole = in_block == 0 && (n == bs || offset + n == self.meta.size);
        let (state, off) = self.block(block)?;
        let unmap = || {
            Some(Commit::new(Publish {
                changes: vec![Change::Entry {
                    index: self.geo.payload_index(block),
                    entry: bat::entry(Payload::Unmapped, 0),
                }],
                _claim: None,
            }))
        };
        let (action, commit) = match state {
            Payload::FullyPresent if whole && !self.meta.leave_allocated => (
                DiscardAction::PunchHole {
                    storage: StorageId::IMAGE,
                    offset: off,
                },
                unmap(),
            ),
            Payload::FullyPresent => (
                DiscardAction::PunchHole {
                    storage: StorageId::IMAGE,
                    offset: off + in_block,
                },
                None,
            ),
            Payload::PartiallyPresent if whole => (
                DiscardAction::PunchHole {
                    storage: StorageId::IMAGE,
                    offset: off,
                },
                unmap(),
            ),
            _ => (DiscardAction::Nothing, None),
        };
        Ok(DiscardMapping {
            len: n,
            action,
            commit,
        })
    }
}
