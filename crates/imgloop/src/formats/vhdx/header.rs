//! The header section (the first MiB): the file type identifier, the two
//! headers and the two region tables, each with its CRC-32C.
//!
//! | offset | size | structure |
//! |---|---|---|
//! | 0 | 64 KiB | file type identifier: `vhdxfile`, creator (UTF-16LE, 512 bytes) |
//! | 64 KiB | 4 KiB | header 1 |
//! | 128 KiB | 4 KiB | header 2 |
//! | 192 KiB | 64 KiB | region table 1 |
//! | 256 KiB | 64 KiB | region table 2 (a copy) |
//!
//! Everything is little-endian. A header: `head`, CRC-32C of its 4 KiB
//! (the field read as zero), sequence number, file-write, data-write and
//! log GUIDs, log version (0), version (1), log length and offset. The
//! current header is the valid one with the larger sequence number.
//! A region table: `regi`, CRC-32C of its 64 KiB, entry count, then
//! entries of (GUID, file offset, length, required bit).

use super::guid::Guid;
use crate::error::{Checked, Error, ErrorKind, Result};
use crate::storage::Storage;

/// One mebibyte: the alignment of every structure after the header section.
pub const MIB: u64 = 1 << 20;
/// `vhdxfile`, the first 8 bytes.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Where the two headers are.
pub const HEADER_AT: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes a header's checksum covers.
pub const HEADER_LEN: usize = 4096;
/// Where the two region tables are.
pub const REGIONS_AT: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes a region table's checksum covers.
pub const REGIONS_LEN: usize = 64 << 10;
/// Most region table entries.
pub const MAX_REGIONS: u32 = 2047;

/// The BAT region.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The metadata region.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The CRC-32C of `b` with its 4-byte checksum field at `at` read as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// Stores the checksum of `b` in its field at `at`.
pub fn seal(b: &mut [u8], at: usize) {
    let c = checksum(b, at);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// One header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Larger is newer.
    pub sequence: u64,
    /// Changed before the first change to the file in a session.
    pub file_write: Guid,
    /// Changed before the first change to what the guest sees; children
    /// name their parent by it.
    pub data_write: Guid,
    /// Entries of the log carrying this GUID are valid; zero: no log.
    pub log_guid: Guid,
    /// 0.
    pub log_version: u16,
    /// 1.
    pub version: u16,
    /// Bytes of the log (a multiple of 1 MiB).
    pub log_length: u32,
    /// Where the log is (a multiple of 1 MiB, at least 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Decodes a header; `None` when its signature, checksum or version
    /// makes it invalid.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN
            || &b[0..4] != b"head"
            || le32(b, 4) != checksum(&b[..HEADER_LEN], 4)
        {
            return None;
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write: Guid::read(b, 16),
            data_write: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        (h.version == 1).then_some(h)
    }

    /// The 4 KiB of this header, checksummed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write.0);
        b[32..48].copy_from_slice(&self.data_write.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }

    /// Checks the log fields (whether or not a log is in use).
    pub fn check_log_fields(&self, slot: usize) -> Result<()> {
        let at = HEADER_AT[slot];
        if self.log_version != 0 {
            return Err(bad(
                "VHDX header",
                at + 64,
                format!("log version {} (only 0 exists)", self.log_version),
            ));
        }
        if self.log_offset < MIB || !self.log_offset.is_multiple_of(MIB) {
            return Err(bad(
                "VHDX header",
                at + 72,
                format!(
                    "log offset {} is not a multiple of 1 MiB past the header section",
                    self.log_offset
                ),
            ));
        }
        if !(self.log_length as u64).is_multiple_of(MIB) {
            return Err(bad(
                "VHDX header",
                at + 68,
                format!("log length {} is not a multiple of 1 MiB", self.log_length),
            ));
        }
        Checked::of("VHDX header", at + 72).add(
            self.log_offset,
            self.log_length as u64,
            "log end",
        )?;
        Ok(())
    }
}

fn bad(structure: &'static str, at: u64, why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_format(structure, at, why)
}

/// Both headers as read.
#[derive(Clone, Debug)]
pub struct Headers {
    /// The headers of the two slots that are valid.
    pub slots: [Option<Header>; 2],
    /// Which slot is current.
    pub current: usize,
}

impl Headers {
    /// The current header.
    pub fn current(&self) -> &Header {
        self.slots[self.current]
            .as_ref()
            .expect("the current slot is valid")
    }

    /// Reads and chooses the headers, as the specification says: the valid
    /// one with the larger sequence number (a torn header is ignored).
    /// Equal sequence numbers are accepted when both headers are the same
    /// bytes (Disk2VHD writes them so).
    pub fn read(storage: &dyn Storage) -> Result<Headers> {
        let mut raw = [vec![0u8; HEADER_LEN], vec![0u8; HEADER_LEN]];
        let len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        for (slot, b) in raw.iter_mut().enumerate() {
            let at = HEADER_AT[slot];
            if at + HEADER_LEN as u64 <= len {
                storage
                    .read_at(b, at)
                    .map_err(|e| Error::io("reading a VHDX header", e).at("VHDX header", at))?;
            }
        }
        let slots = [Header::parse(&raw[0]), Header::parse(&raw[1])];
        let current = match (&slots[0], &slots[1]) {
            (None, None) => {
                return Err(bad(
                    "VHDX header",
                    HEADER_AT[0],
                    "No valid VHDX header found (both headers are damaged)",
                ))
            }
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (Some(a), Some(b)) if a.sequence > b.sequence => 0,
            (Some(a), Some(b)) if a.sequence < b.sequence => 1,
            (Some(_), Some(_)) if raw[0] == raw[1] => 0,
            (Some(a), Some(_)) => {
                return Err(bad(
                    "VHDX header",
                    HEADER_AT[0],
                    format!(
                    "No valid VHDX header found (both headers have sequence number {} but differ)",
                    a.sequence
                ),
                ))
            }
        };
        let h = Headers { slots, current };
        h.current().check_log_fields(current)?;
        Ok(h)
    }

    /// Problems `check` reports: a damaged or missing header.
    pub fn problems(&self) -> Vec<String> {
        (0..2)
            .filter(|&i| self.slots[i].is_none())
            .map(|i| {
                format!(
                    "VHDX header {} at offset {} is damaged (bad signature, checksum or version)",
                    i + 1,
                    HEADER_AT[i]
                )
            })
            .collect()
    }
}

/// One region table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// What the region holds.
    pub guid: Guid,
    /// Where it starts (a multiple of 1 MiB).
    pub offset: u64,
    /// Bytes (a multiple of 1 MiB).
    pub length: u64,
    /// The file must not be opened by a reader that does not know it.
    pub required: bool,
}

impl Region {
    /// First byte past the region.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A region table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// Its entries, in file order.
    pub entries: Vec<Region>,
}

impl RegionTable {
    /// Decodes a region table at `at`; `Ok(None)` when its signature or
    /// checksum is wrong (the other copy may be good).
    pub fn parse(b: &[u8], at: u64) -> Result<Option<RegionTable>> {
        if &b[0..4] != b"regi" || le32(b, 4) != checksum(&b[..REGIONS_LEN], 4) {
            return Ok(None);
        }
        let count = le32(b, 8);
        if count > MAX_REGIONS {
            return Err(bad(
                "VHDX region table",
                at + 8,
                format!("{count} entries (at most {MAX_REGIONS})"),
            ));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = 16 + 32 * i;
            let entry_at = at + e as u64;
            let r = Region {
                guid: Guid::read(b, e),
                offset: le64(b, e + 16),
                length: le32(b, e + 24) as u64,
                required: le32(b, e + 28) & 1 != 0,
            };
            if r.offset < MIB
                || !r.offset.is_multiple_of(MIB)
                || r.length == 0
                || !r.length.is_multiple_of(MIB)
            {
                return Err(bad(
                    "VHDX region table",
                    entry_at,
                    format!(
                        "region {} at {} of {} bytes is not 1 MiB-aligned past the header section",
                        r.guid, r.offset, r.length
                    ),
                ));
            }
            Checked::of("VHDX region table", entry_at).add(r.offset, r.length, "region end")?;
            if entries.iter().any(|o: &Region| o.guid == r.guid) {
                return Err(bad(
                    "VHDX region table",
                    entry_at,
                    format!("region {} is listed twice", r.guid),
                ));
            }
            entries.push(r);
        }
        Ok(Some(RegionTable { entries }))
    }

    /// The 64 KiB of this table, checksummed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGIONS_LEN];
        b[0..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (i, r) in self.entries.iter().enumerate() {
            let e = 16 + 32 * i;
            b[e..e + 16].copy_from_slice(&r.guid.0);
            b[e + 16..e + 24].copy_from_slice(&r.offset.to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&(r.length as u32).to_le_bytes());
            b[e + 28..e + 32].copy_from_slice(&(r.required as u32).to_le_bytes());
        }
        seal(&mut b, 4);
        b
    }

    /// Reads the region table (the second copy when the first is damaged)
    /// and returns it with the problems found, for `check`.
    pub fn read(storage: &dyn Storage) -> Result<(RegionTable, Vec<String>)> {
        let mut problems = Vec::new();
        let mut found = None;
        for (copy, &at) in REGIONS_AT.iter().enumerate() {
            let mut b = vec![0u8; REGIONS_LEN];
            let len = storage
                .len()
                .map_err(|e| Error::io("reading the image size", e))?;
            if at + REGIONS_LEN as u64 <= len {
                storage.read_at(&mut b, at).map_err(|e| {
                    Error::io("reading a VHDX region table", e).at("VHDX region table", at)
                })?;
            }
            match RegionTable::parse(&b, at)? {
                Some(t) if found.is_none() => found = Some(t),
                Some(t) if Some(&t) != found.as_ref() => problems.push(format!(
                    "VHDX region table {} at offset {at} differs from the first",
                    copy + 1
                )),
                Some(_) => {}
                None => problems.push(format!(
                    "VHDX region table {} at offset {at} is damaged (bad signature or checksum)",
                    copy + 1
                )),
            }
        }
        let table = found.ok_or_else(|| {
            bad(
                "VHDX region table",
                REGIONS_AT[0],
                "both region tables are damaged (bad signature or checksum)",
            )
        })?;
        Ok((table, problems))
    }

    /// The BAT and metadata regions, refusing unknown required regions
    /// and overlaps (with each other and with the log).
    pub fn known(&self, log: (u64, u64)) -> Result<(Region, Region)> {
        let mut spans: Vec<(u64, u64, String)> = Vec::new();
        if log.1 > 0 {
            spans.push((log.0, log.0 + log.1, "the log".into()));
        }
        for r in &self.entries {
            if r.guid != BAT_REGION && r.guid != METADATA_REGION && r.required {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "the image has a required region {} this version of imgloop does not know",
                        r.guid
                    ),
                )
                .at("VHDX region table", REGIONS_AT[0]));
            }
            for (s, e, what) in &spans {
                if r.offset < *e && *s < r.end() {
                    return Err(bad(
                        "VHDX region table",
                        REGIONS_AT[0],
                        format!(
                            "region {} ({}-{}) overlaps {what} ({s}-{e})",
                            r.guid,
                            r.offset,
                            r.end()
                        ),
                    ));
                }
            }
            spans.push((r.offset, r.end(), format!("region {}", r.guid)));
        }
        let find = |g: Guid, what: &str| {
            self.entries
                .iter()
                .copied()
                .find(|r| r.guid == g)
                .ok_or_else(|| {
                    bad(
                        "VHDX region table",
                        REGIONS_AT[0],
                        format!("the image has no {what} region"),
                    )
                })
        };
        Ok((find(BAT_REGION, "BAT")?, find(METADATA_REGION, "metadata")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header(seq: u64) -> Header {
        Header {
            sequence: seq,
            file_write: Guid::random(),
            data_write: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn the_newer_valid_header_is_current_and_a_torn_one_is_ignored() {
        let mem = MemStorage::new();
        mem.set_len(MIB).unwrap();
        let (a, b) = (header(7), header(8));
        mem.write_at(&a.to_bytes(), HEADER_AT[0]).unwrap();
        mem.write_at(&b.to_bytes(), HEADER_AT[1]).unwrap();
        let h = Headers::read(&mem).unwrap();
        assert_eq!((h.current, *h.current()), (1, b));
        // Tear header 2: header 1 is current.
        mem.write_at(&[0xff; 16], HEADER_AT[1] + 100).unwrap();
        let h = Headers::read(&mem).unwrap();
        assert_eq!((h.current, *h.current()), (0, a));
        assert_eq!(h.problems().len(), 1);
        // Equal sequence numbers: fine when identical, an error otherwise.
        mem.write_at(&a.to_bytes(), HEADER_AT[1]).unwrap();
        assert_eq!(Headers::read(&mem).unwrap().current, 0);
        mem.write_at(&header(7).to_bytes(), HEADER_AT[1]).unwrap();
        assert!(Headers::read(&mem)
            .unwrap_err()
            .to_string()
            .contains("sequence number 7"));
    }

    #[test]
    fn region_tables_round_trip_and_bad_entries_are_refused() {
        let t = RegionTable {
            entries: vec![
                Region {
                    guid: METADATA_REGION,
                    offset: 2 * MIB,
                    length: MIB,
                    required: true,
                },
                Region {
                    guid: BAT_REGION,
                    offset: 3 * MIB,
                    length: MIB,
                    required: true,
                },
            ],
        };
        let b = t.to_bytes();
        assert_eq!(RegionTable::parse(&b, 0).unwrap(), Some(t.clone()));
        let (bat, meta) = t.known((MIB, MIB)).unwrap();
        assert_eq!((bat.offset, meta.offset), (3 * MIB, 2 * MIB));
        assert!(t
            .known((2 * MIB, MIB))
            .unwrap_err()
            .to_string()
            .contains("overlaps the log"));
        let mut odd = t.clone();
        odd.entries.push(Region {
            guid: Guid::random(),
            offset: 9 * MIB,
            length: MIB,
            required: true,
        });
        assert_eq!(
            odd.known((MIB, MIB)).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let mut damaged = b.clone();
        damaged[100] ^= 1;
        assert_eq!(RegionTable::parse(&damaged, 0).unwrap(), None);
        let mut unaligned = t.clone();
        unaligned.entries[0].offset += 4096;
        assert!(RegionTable::parse(&unaligned.to_bytes(), 0).is_err());
        let mut huge = t;
        huge.entries[0].offset = !(MIB - 1);
        assert!(RegionTable::parse(&huge.to_bytes(), 0)
            .unwrap_err()
            .to_string()
            .contains("overflow"));
    }
}
