//! The VHDX log: a circular buffer of 4 KiB sectors holding entries that
//! describe metadata changes, so a crash between writing a change and
//! applying it in place never leaves torn metadata.
//!
//! An entry: a header (`loge`, CRC-32C of the whole entry, length, tail,
//! sequence number, descriptor count, flushed and last file offsets, log
//! GUID) followed by descriptors (`zero`: a range to zero; `desc`: a 4 KiB
//! sector to write, its first 8 and last 4 bytes in the descriptor), then
//! one data sector (`data`, sequence number halves, the middle 4084
//! bytes) per `desc` descriptor. The header and 126 descriptors fill the
//! first sector; 128 fit in each following one.
//!
//! Replay (the specification's rules): the valid entries carrying the
//! header's log GUID form sequences of consecutive sequence numbers laid
//! end to end; the active sequence is the one whose last entry (the head)
//! has the largest sequence number and whose tail field points at its
//! first entry. Its entries are applied in order, then the file is grown
//! to the head's last file offset.

use super::guid::Guid;
use super::header::{checksum, seal, Header, MIB};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The unit of the log.
pub const SECTOR: u64 = 4096;
/// Descriptors in the first sector of an entry.
const FIRST_DESCRIPTORS: u64 = 126;
/// Descriptors in each further sector.
const MORE_DESCRIPTORS: u64 = 128;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(at: u64, why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_format("VHDX log", at, why)
}

/// Sectors the descriptors of an entry with `n` descriptors take.
pub fn descriptor_sectors(n: u64) -> u64 {
    if n <= FIRST_DESCRIPTORS {
        1
    } else {
        1 + (n - FIRST_DESCRIPTORS).div_ceil(MORE_DESCRIPTORS)
    }
}

/// One change an entry makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write this 4 KiB sector at `at`.
    Data { at: u64, sector: Box<[u8]> },
    /// Zero `len` bytes at `at`.
    Zero { at: u64, len: u64 },
}

/// A valid entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Where it starts within the log.
    pub start: u64,
    /// Bytes (a multiple of 4 KiB).
    pub length: u64,
    /// Where its sequence's first entry starts.
    pub tail: u64,
    /// Its sequence number.
    pub sequence: u64,
    /// The file was at least this long when the entry was written.
    pub flushed: u64,
    /// Every structure in use lay below this offset.
    pub last: u64,
    /// Its changes, in order.
    pub ops: Vec<Op>,
}

/// The log of an image, as its header describes it.
pub struct Log<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    length: u64,
    guid: Guid,
    file_len: u64,
}

impl<'a> Log<'a> {
    /// The log `header` describes.
    pub fn new(storage: &'a dyn Storage, header: &Header) -> Result<Log<'a>> {
        Ok(Log {
            storage,
            offset: header.log_offset,
            length: header.log_length as u64,
            guid: header.log_guid,
            file_len: storage
                .len()
                .map_err(|e| Error::io("reading the image size", e))?,
        })
    }

    /// Reads `len` bytes at position `pos` of the circular log (zeroes
    /// past the end of the file).
    fn read(&self, pos: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        let mut done = 0u64;
        while done < len {
            let p = (pos + done) % self.length;
            let n = (self.length - p).min(len - done);
            let at = self.offset + p;
            if at < self.file_len {
                let m = (self.file_len - at).min(n) as usize;
                let dst = &mut out[done as usize..done as usize + m];
                self.storage
                    .read_at(dst, at)
                    .map_err(|e| Error::io("reading the VHDX log", e).at("VHDX log", at))?;
            }
            done += n;
        }
        Ok(out)
    }

    /// The entry at `pos`, if a valid one of this log starts there.
    fn entry_at(&self, pos: u64) -> Result<Option<Entry>> {
        let head = self.read(pos, SECTOR)?;
        if &head[0..4] != b"loge" || Guid::read(&head, 32) != self.guid {
            return Ok(None);
        }
        let length = le32(&head, 8) as u64;
        let tail = le32(&head, 12) as u64;
        let sequence = le64(&head, 16);
        let count = le32(&head, 24) as u64;
        if length == 0
            || !length.is_multiple_of(SECTOR)
            || length > self.length
            || sequence == 0
            || !tail.is_multiple_of(SECTOR)
            || tail >= self.length
        {
            return Ok(None);
        }
        let desc_sectors = descriptor_sectors(count);
        let data = |ops: &[(u32, u64, u64, u64)]| ops.iter().filter(|o| o.0 == 0).count() as u64;
        // Descriptors first, to know how many data sectors follow.
        if desc_sectors * SECTOR > length {
            return Ok(None);
        }
        let descs = self.read(pos, desc_sectors * SECTOR)?;
        let mut raw = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let d = 64 + 32 * i;
            let kind = &descs[d..d + 4];
            let seq = le64(&descs, d + 24);
            let at = le64(&descs, d + 16);
            if seq != sequence || !at.is_multiple_of(SECTOR) {
                return Ok(None);
            }
            match kind {
                b"desc" => raw.push((0u32, at, le64(&descs, d + 8), le32(&descs, d + 4) as u64)),
                b"zero" => {
                    let len = le64(&descs, d + 8);
                    if !len.is_multiple_of(SECTOR) {
                        return Ok(None);
                    }
                    raw.push((1u32, at, len, 0));
                }
                _ => return Ok(None),
            }
        }
        if (desc_sectors + data(&raw)) * SECTOR != length {
            return Ok(None);
        }
        // The checksum covers the whole entry, read in pieces.
        let mut crc = crc32c::crc32c(&head[0..4]);
        crc = crc32c::crc32c_append(crc, &[0; 4]);
        crc = crc32c::crc32c_append(crc, &head[8..SECTOR as usize]);
        let mut done = SECTOR;
        while done < length {
            let n = (length - done).min(MIB);
            crc = crc32c::crc32c_append(crc, &self.read(pos + done, n)?);
            done += n;
        }
        if crc != le32(&head, 4) {
            return Ok(None);
        }
        let mut ops = Vec::with_capacity(raw.len());
        let mut data_pos = pos + desc_sectors * SECTOR;
        for (kind, at, a, b) in raw {
            if kind == 1 {
                ops.push(Op::Zero { at, len: a });
                continue;
            }
            let s = self.read(data_pos, SECTOR)?;
            let stamp = (le32(&s, 4) as u64) << 32 | le32(&s, 4092) as u64;
            if &s[0..4] != b"data" || stamp != sequence {
                return Ok(None);
            }
            let mut sector = vec![0u8; SECTOR as usize].into_boxed_slice();
            sector[0..8].copy_from_slice(&a.to_le_bytes());
            sector[8..4092].copy_from_slice(&s[8..4092]);
            sector[4092..4096].copy_from_slice(&(b as u32).to_le_bytes());
            ops.push(Op::Data { at, sector });
            data_pos += SECTOR;
        }
        Ok(Some(Entry {
            start: pos,
            length,
            tail,
            sequence,
            flushed: le64(&head, 48),
            last: le64(&head, 56),
            ops,
        }))
    }

    /// The entries to replay, oldest first; empty when the log is empty
    /// (no log GUID, or no valid sequence).
    pub fn active(&self) -> Result<Vec<Entry>> {
        if self.guid.is_zero() || self.length == 0 {
            return Ok(Vec::new());
        }
        let mut valid: Vec<Entry> = Vec::new();
        let mut pos = 0;
        while pos < self.length {
            match self.entry_at(pos)? {
                Some(e) => {
                    pos += e.length.max(SECTOR);
                    valid.push(e);
                }
                None => pos += SECTOR,
            }
        }
        // Heads from the newest: the first whose tail leads to it through
        // entries of consecutive sequence numbers laid end to end.
        valid.sort_by_key(|e| std::cmp::Reverse(e.sequence));
        for head in &valid {
            let mut chain = Vec::new();
            let mut at = head.tail;
            let first_seq = loop {
                let Some(e) = valid.iter().find(|e| e.start == at) else {
                    break None;
                };
                chain.push(e.clone());
                if e.start == head.start {
                    break Some(chain[0].sequence);
                }
                if chain.len() > valid.len() {
                    break None;
                }
                at = (e.start + e.length) % self.length;
            };
            let consecutive = chain.windows(2).all(|w| w[1].sequence == w[0].sequence + 1);
            if first_seq.is_some() && consecutive {
                return Ok(chain);
            }
        }
        Ok(Vec::new())
    }

    /// Checks that `entries` only touch the file outside the header
    /// section and the log, within reasonable bounds; returns the file
    /// length they leave.
    pub fn check_targets(&self, entries: &[Entry], file_len: u64) -> Result<u64> {
        let head = entries.last().expect("a sequence has a head");
        let head_at = self.offset + head.start;
        if file_len < head.flushed {
            return Err(bad(
                head_at,
                format!(
                    "the file ({file_len} bytes) is shorter than the log says it was flushed ({})",
                    head.flushed
                ),
            ));
        }
        // The file grows by at most the metadata and blocks one entry
        // can allocate: far less than this.
        if head.last > file_len.saturating_add(1 << 40) {
            return Err(bad(
                head_at,
                format!("the log's last file offset {} is implausible", head.last),
            ));
        }
        let end = file_len.max(head.last);
        for e in entries {
            for op in &e.ops {
                let (at, len) = match op {
                    Op::Data { at, .. } => (*at, SECTOR),
                    Op::Zero { at, len } => (*at, *len),
                };
                let in_log = at < self.offset + self.length && self.offset < at.saturating_add(len);
                if at < MIB || in_log || at.checked_add(len).is_none_or(|s| s > end) {
                    return Err(bad(
                        self.offset + e.start,
                        format!("log entry {} changes {len} bytes at {at}, outside the image's metadata and data", e.sequence),
                    ));
                }
            }
        }
        Ok(end)
    }
}

/// Applies `entries` to `target` (the image, or an overlay of it) and
/// grows it to `end`.
pub fn apply(entries: &[Entry], target: &dyn Storage, end: u64) -> Result<()> {
    let io = |e| Error::io("replaying the VHDX log", e);
    for e in entries {
        for op in &e.ops {
            match op {
                Op::Data { at, sector } => target.write_at(sector, *at).map_err(io)?,
                Op::Zero { at, len } => target.zero_range(*at, *len, false).map_err(io)?,
            }
        }
    }
    if target.len().map_err(io)? < end {
        target.set_len(end).map_err(io)?;
    }
    Ok(())
}

/// The bytes of a new entry writing `sectors` (file offset, 4 KiB), whose
/// sequence starts at `tail`.
pub fn build_entry(
    guid: Guid,
    sequence: u64,
    tail: u64,
    file_len: u64,
    sectors: &[(u64, &[u8])],
) -> Vec<u8> {
    let n = sectors.len() as u64;
    let desc_sectors = descriptor_sectors(n);
    let length = (desc_sectors + n) * SECTOR;
    let mut b = vec![0u8; length as usize];
    b[0..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    b[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    b[32..48].copy_from_slice(&guid.0);
    b[48..56].copy_from_slice(&file_len.to_le_bytes());
    b[56..64].copy_from_slice(&file_len.to_le_bytes());
    for (i, (at, s)) in sectors.iter().enumerate() {
        let d = 64 + 32 * i;
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&s[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&s[0..8]);
        b[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
        b[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        let ds = ((desc_sectors + i as u64) * SECTOR) as usize;
        b[ds..ds + 4].copy_from_slice(b"data");
        b[ds + 4..ds + 8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        b[ds + 8..ds + 4092].copy_from_slice(&s[8..4092]);
        b[ds + 4092..ds + 4096].copy_from_slice(&(sequence as u32).to_le_bytes());
    }
    seal(&mut b, 4);
    debug_assert_eq!(le32(&b, 4), checksum(&b, 4));
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header(guid: Guid) -> Header {
        Header {
            sequence: 1,
            file_write: Guid::ZERO,
            data_write: Guid::ZERO,
            log_guid: guid,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    fn sector(fill: u8) -> Vec<u8> {
        let mut s = vec![fill; 4096];
        s[0] = 0xa1;
        s[4095] = 0xb2;
        s
    }

    #[test]
    fn an_entry_round_trips_and_the_newest_sequence_is_replayed() {
        let g = Guid::random();
        let mem = MemStorage::new();
        mem.set_len(4 * MIB).unwrap();
        let (s1, s2) = (sector(1), sector(2));
        let e1 = build_entry(g, 5, 0, 4 * MIB, &[(2 * MIB, &s1)]);
        mem.write_at(&e1, MIB).unwrap();
        let h = header(g);
        let log = Log::new(&mem, &h).unwrap();
        let act = log.active().unwrap();
        assert_eq!(act.len(), 1);
        assert_eq!(
            act[0].ops,
            vec![Op::Data {
                at: 2 * MIB,
                sector: s1.clone().into_boxed_slice()
            }]
        );
        // A second entry continuing the sequence (tail at the first).
        let e2 = build_entry(g, 6, 0, 4 * MIB, &[(2 * MIB, &s2), (3 * MIB, &s1)]);
        mem.write_at(&e2, MIB + e1.len() as u64).unwrap();
        let log = Log::new(&mem, &h).unwrap();
        let act = log.active().unwrap();
        assert_eq!(
            act.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![5, 6]
        );
        let end = log.check_targets(&act, 4 * MIB).unwrap();
        apply(&act, &mem, end).unwrap();
        let mut back = vec![0u8; 4096];
        mem.read_at(&mut back, 2 * MIB).unwrap();
        assert_eq!(back, s2);
        // Another GUID, or a torn entry: nothing to replay.
        assert!(Log::new(&mem, &header(Guid::random()))
            .unwrap()
            .active()
            .unwrap()
            .is_empty());
        mem.write_at(&[0xffu8; 8], MIB + 100).unwrap();
        mem.write_at(&[0xffu8; 8], MIB + e1.len() as u64 + 100)
            .unwrap();
        assert!(Log::new(&mem, &h).unwrap().active().unwrap().is_empty());
    }

    #[test]
    fn entries_writing_into_the_header_section_or_the_log_are_refused() {
        let g = Guid::random();
        let mem = MemStorage::new();
        mem.set_len(4 * MIB).unwrap();
        for target in [64 << 10, MIB + 8192] {
            let e = build_entry(g, 1, 0, 4 * MIB, &[(target, &sector(3))]);
            mem.write_at(&e, MIB).unwrap();
            let log = Log::new(&mem, &header(g)).unwrap();
            let act = log.active().unwrap();
            assert!(log.check_targets(&act, 4 * MIB).is_err(), "{target}");
        }
        // A file shorter than the entry says it was flushed.
        let e = build_entry(g, 1, 0, 8 * MIB, &[(2 * MIB, &sector(3))]);
        mem.write_at(&e, MIB).unwrap();
        let log = Log::new(&mem, &header(g)).unwrap();
        let act = log.active().unwrap();
        assert!(log
            .check_targets(&act, 4 * MIB)
            .unwrap_err()
            .to_string()
            .contains("shorter"));
    }

    #[test]
    fn many_descriptors_spill_into_more_sectors() {
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        assert_eq!(descriptor_sectors(254), 2);
        assert_eq!(descriptor_sectors(255), 3);
        let g = Guid::random();
        let mem = MemStorage::new();
        mem.set_len(8 * MIB).unwrap();
        let s = sector(9);
        let many: Vec<(u64, &[u8])> = (0..130).map(|i| (3 * MIB + i * 4096, &s[..])).collect();
        mem.write_at(&build_entry(g, 1, 0, 8 * MIB, &many), MIB)
            .unwrap();
        let act = Log::new(&mem, &header(g)).unwrap().active().unwrap();
        assert_eq!(act[0].ops.len(), 130);
    }
}
