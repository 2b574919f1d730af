//! The L1 table (in memory) and the L2 tables (cached), what an entry
//! says, the read side (mappings, block status, compressed and encrypted
//! reads) and the flush.
//!
//! Reads take the lock shared and never do I/O under it: an L2 table that
//! is not cached is read after the lock is dropped, then inserted.

use super::header::COMPRESSED;
use super::Qcow;
use crate::driver::{Mapping, StorageId};
use crate::error::{Checked, Error, ErrorKind, Result};
use crate::formats::table_cache::TableCache;
use std::collections::BTreeSet;

/// The image's tables.
pub(super) struct Tables {
    /// L2 table offsets by L1 index (0: none).
    pub l1: Vec<u64>,
    /// L1 indexes changed since the last flush.
    pub l1_dirty: BTreeSet<usize>,
    /// L2 tables by host offset.
    pub l2: TableCache,
}

impl Tables {
    pub fn new(l1: Vec<u64>, capacity: usize) -> Tables {
        Tables {
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(capacity),
        }
    }
}

/// What an L2 entry says about a guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Entry {
    /// Not stored here: the backing image, or zeroes.
    Unallocated,
    /// Stored at `host` (plain, or encrypted in an encrypted image).
    Normal { host: u64 },
    /// A deflate stream of `len` bytes at `offset`.
    Compressed { offset: u64, len: u64 },
}

/// Most clusters one walk looks at under the lock before returning what
/// it has.
const WALK_LIMIT: u64 = 1 << 16;

/// A lookup that needs the L2 table at this offset read first.
pub(super) struct Miss(pub u64);

impl Qcow {
    /// Guest bytes one L1 entry covers.
    pub(super) fn l1_span(&self) -> u64 {
        self.cluster_size() << self.header.l2_bits
    }

    /// Bytes of one L2 table.
    pub(super) fn l2_bytes(&self) -> u64 {
        8 << self.header.l2_bits
    }

    /// Decodes the raw entry of the cluster holding `guest`.
    pub(super) fn decode(&self, raw: u64, guest: u64) -> Result<Entry> {
        if raw == 0 {
            return Ok(Entry::Unallocated);
        }
        let cb = self.header.cluster_bits;
        if raw & COMPRESSED != 0 {
            let offset = raw & ((1 << (63 - cb)) - 1);
            let len = (raw >> (63 - cb)) & (self.cluster_size() - 1);
            if len == 0 {
                return Err(Error::corrupt(
                    "qcow L2 entry",
                    guest,
                    format!("compressed cluster at {offset} has length 0"),
                ));
            }
            return Ok(Entry::Compressed { offset, len });
        }
        Checked::of("qcow L2 entry", guest).add(raw, self.cluster_size(), "cluster end")?;
        if raw >= self.host_limit() {
            return Err(Error::corrupt(
                "qcow L2 entry",
                guest,
                format!("cluster offset {raw} is beyond what a qcow image can address"),
            ));
        }
        Ok(Entry::Normal { host: raw })
    }

    /// The raw L2 entry for `guest` from cached tables, `Ok(None)` when its
    /// L1 entry is empty.
    fn entry_cached(&self, t: &Tables, guest: u64) -> std::result::Result<Option<u64>, Miss> {
        let l1i = (guest / self.l1_span()) as usize;
        let l2_off = t.l1.get(l1i).copied().unwrap_or(0);
        if l2_off == 0 {
            return Ok(None);
        }
        let table = t.l2.get(l2_off).ok_or(Miss(l2_off))?;
        let i = ((guest / self.cluster_size()) & (self.header.l2_entries() - 1)) as usize * 8;
        Ok(Some(u64::from_be_bytes(
            table[i..i + 8].try_into().expect("8 bytes"),
        )))
    }

    /// Reads the L2 table at `offset` (the part past the end of the file
    /// reads as zeroes, as QEMU reads it).
    pub(super) fn read_l2(&self, offset: u64) -> Result<Box<[u8]>> {
        let len = self.l2_bytes();
        Checked::of("qcow L1 entry", offset).add(offset, len, "L2 table end")?;
        let mut b = vec![0u8; len as usize].into_boxed_slice();
        let file_len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if offset < file_len {
            let n = (file_len - offset).min(len) as usize;
            self.file()
                .read_at(&mut b[..n], offset)
                .map_err(|e| Error::io("reading an L2 table", e).at("qcow L2 table", offset))?;
        }
        Ok(b)
    }

    /// Caches the L2 table at `offset`, read without holding the lock.
    pub(super) fn load_l2(&self, offset: u64) -> Result<()> {
        let data = self.read_l2(offset)?;
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        if !t.l2.contains(offset) {
            t.l2.insert(offset, data, false);
        }
        Ok(())
    }

    /// The decoded entry of the cluster holding `guest`.
    pub(super) fn entry(&self, guest: u64) -> Result<Entry> {
        loop {
            let found = {
                let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
                self.entry_cached(&t, guest)
            };
            match found {
                Ok(raw) => return self.decode(raw.unwrap_or(0), guest),
                Err(Miss(off)) => self.load_l2(off)?,
            }
        }
    }

    /// What `raw` (the entry of `guest`'s cluster) maps the bytes from
    /// `guest` to, and for how many (at most `max`, within the cluster).
    fn classify(&self, raw: Option<u64>, guest: u64, max: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let in_cluster = guest & (cs - 1);
        let Some(raw) = raw else {
            // A whole L1 entry is empty.
            let span_end = (guest / self.l1_span() + 1) * self.l1_span();
            return Ok((Mapping::Unallocated, max.min(span_end - guest)));
        };
        let len = max.min(cs - in_cluster);
        let m = match self.decode(raw, guest)? {
            Entry::Unallocated => Mapping::Unallocated,
            Entry::Compressed { .. } => Mapping::Compressed,
            Entry::Normal { host } if self.encrypted() => Mapping::Encrypted {
                storage: StorageId::IMAGE,
                offset: host + in_cluster,
            },
            Entry::Normal { host } => Mapping::Data {
                storage: StorageId::IMAGE,
                offset: host + in_cluster,
            },
        };
        Ok((m, len))
    }

    /// The mapping of `offset` and how many bytes (at most `max_len`)
    /// share it, host places contiguous.
    pub(super) fn map_run(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let end = offset + max_len;
        let mut first: Option<Mapping> = None;
        let mut pos = offset;
        let mut looked = 0;
        while pos < end && looked < WALK_LIMIT {
            let miss = {
                let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
                let mut miss = None;
                while pos < end && looked < WALK_LIMIT {
                    let raw = match self.entry_cached(&t, pos) {
                        Ok(r) => r,
                        Err(m) => {
                            miss = Some(m);
                            break;
                        }
                    };
                    looked += 1;
                    let (m, n) = self.classify(raw, pos, end - pos)?;
                    match first {
                        None => first = Some(m),
                        Some(f) if advance(f, pos - offset) == m => {}
                        Some(_) => return Ok((first.expect("set"), pos - offset)),
                    }
                    pos += n;
                }
                miss
            };
            if let Some(Miss(off)) = miss {
                self.load_l2(off)?;
            }
        }
        Ok((first.unwrap_or(Mapping::Unallocated), pos - offset))
    }

    /// Reads guest data of compressed and encrypted clusters.
    pub(super) fn read_transformed_range(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cs - 1);
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.entry(pos)? {
                Entry::Compressed { offset: at, len } => {
                    let cluster = self.decompress(at, len, pos)?;
                    out.copy_from_slice(&cluster[in_cluster as usize..in_cluster as usize + n]);
                }
                Entry::Normal { host } if self.encrypted() => {
                    self.read_encrypted(out, host + in_cluster, pos)?;
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::State,
                        format!("guest offset {pos} is neither compressed nor encrypted"),
                    ))
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads guest bytes at `guest` (stored encrypted at `host`, within
    /// one cluster): the whole sectors around them are read and decrypted.
    pub(super) fn read_encrypted(&self, out: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let sector = super::crypt::SECTOR;
        let head = guest % sector;
        let first = guest - head;
        let len = (head + out.len() as u64).next_multiple_of(sector);
        let mut buf = vec![0u8; len as usize];
        let at = host - head;
        self.file()
            .read_at(&mut buf, at)
            .map_err(|e| Error::io(format!("reading data at host offset {at}"), e))?;
        cipher.decrypt(&mut buf, first / sector);
        out.copy_from_slice(&buf[head as usize..head as usize + out.len()]);
        Ok(())
    }

    /// The cluster stored as a `len`-byte deflate stream at `at`.
    pub(super) fn decompress(&self, at: u64, len: u64, guest: u64) -> Result<Vec<u8>> {
        let file_len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        let end = Checked::of("qcow L2 entry", guest).add(at, len, "compressed cluster end")?;
        // The last stream of a file may end early; the rest reads as zeroes.
        let mut packed = vec![0u8; len as usize];
        if at < file_len {
            let n = (end.min(file_len) - at) as usize;
            self.file().read_at(&mut packed[..n], at).map_err(|e| {
                Error::io("reading a compressed cluster", e).at("qcow compressed cluster", at)
            })?;
        }
        let mut out = vec![0u8; self.cluster_size() as usize];
        let got = crate::formats::deflate::inflate_raw(&packed, &mut out)
            .map_err(|e| Error::corrupt("qcow compressed cluster", at, e.to_string()))?;
        if got != out.len() {
            return Err(Error::corrupt(
                "qcow compressed cluster",
                at,
                format!("the stream gives {got} bytes, expected {}", out.len()),
            ));
        }
        Ok(out)
    }

    /// Writes cached tables back, data first: sync, dirty L2 tables, sync,
    /// dirty L1 entries.
    pub(super) fn flush_tables(&self) -> Result<()> {
        if self.state.mode() == crate::state::Mode::ReadOnly {
            return Ok(());
        }
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (l2, l1) = {
            let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
            let l1: Vec<(usize, u64)> = t.l1_dirty.iter().map(|&i| (i, t.l1[i])).collect();
            (t.l2.dirty_copies(), l1)
        };
        if l2.is_empty() && l1.is_empty() {
            return Ok(());
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        self.file().sync().map_err(io("syncing the image"))?;
        for (off, _, data) in &l2 {
            self.file()
                .write_at(data, *off)
                .map_err(|e| Error::io("writing an L2 table", e).at("qcow L2 table", *off))?;
        }
        if !l1.is_empty() {
            self.file().sync().map_err(io("syncing the image"))?;
            for (i, off) in &l1 {
                let at = self.header.l1_table_offset + *i as u64 * 8;
                self.file()
                    .write_at(&off.to_be_bytes(), at)
                    .map_err(|e| Error::io("writing the L1 table", e).at("qcow L1 table", at))?;
            }
        }
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        for (off, generation, _) in &l2 {
            t.l2.mark_clean_if(*off, *generation);
        }
        for (i, off) in &l1 {
            if t.l1[*i] == *off {
                t.l1_dirty.remove(i);
            }
        }
        t.l2.trim();
        Ok(())
    }
}

/// `m` moved `by` bytes on: what the next range must map to for the two to
/// be one run.
fn advance(m: Mapping, by: u64) -> Mapping {
    match m {
        Mapping::Data { storage, offset } => Mapping::Data {
            storage,
            offset: offset.wrapping_add(by),
        },
        Mapping::Encrypted { storage, offset } => Mapping::Encrypted {
            storage,
            offset: offset.wrapping_add(by),
        },
        other => other,
    }
}
