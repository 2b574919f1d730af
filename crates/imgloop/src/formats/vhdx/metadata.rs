//! The metadata region: a table (`metadata`, entry count, entries of item
//! GUID, offset within the region, length, flags) and the items it points
//! to. The known items, all required:
//!
//! | item | payload |
//! |---|---|
//! | file parameters | u32 block size; u32 flags: bit 0 leave blocks allocated (fixed), bit 1 has parent |
//! | virtual disk size | u64 bytes |
//! | virtual disk ID (page 83) | GUID |
//! | logical sector size | u32: 512 or 4096 |
//! | physical sector size | u32: 512 or 4096 |
//! | parent locator (differencing only) | type GUID, key/value count, (key offset, value offset, key length, value length) entries, UTF-16LE strings |

use super::guid::Guid;
use super::header::{Region, MIB};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use std::collections::BTreeMap;

/// File parameters.
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual disk size.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Virtual disk ID (SCSI page 83).
pub const PAGE_83: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical sector size.
pub const LOGICAL_SECTOR: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical sector size.
pub const PHYSICAL_SECTOR: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent locator.
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The locator type of a VHDX parent.
pub const VHDX_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Bytes of the metadata table at the start of the region.
pub const TABLE_LEN: usize = 64 << 10;
/// Most entries the table can hold.
pub const MAX_ENTRIES: usize = (TABLE_LEN - 32) / 32;
/// Largest virtual disk.
pub const MAX_SIZE: u64 = 64 << 40;
/// Largest item.
const MAX_ITEM: u32 = MIB as u32;

/// Entry flag: a user item.
pub const IS_USER: u32 = 1;
/// Entry flag: the item describes the virtual disk.
pub const IS_VIRTUAL_DISK: u32 = 2;
/// Entry flag: a reader must know the item.
pub const IS_REQUIRED: u32 = 4;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(at: u64, why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_format("VHDX metadata", at, why)
}

/// The parent locator of a differencing image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// Key/value pairs (`parent_linkage`, `relative_path`, ...).
    pub entries: BTreeMap<String, String>,
}

impl ParentLocator {
    /// The parent's data-write GUID at creation.
    pub fn linkage(&self) -> Option<Guid> {
        self.entries
            .get("parent_linkage")
            .and_then(|v| Guid::parse(v))
    }

    /// An alternative linkage GUID, if any.
    pub fn linkage2(&self) -> Option<Guid> {
        self.entries
            .get("parent_linkage2")
            .and_then(|v| Guid::parse(v))
    }

    /// Decodes a locator item (`at` is its file offset, for messages).
    pub fn parse(b: &[u8], at: u64) -> Result<ParentLocator> {
        if b.len() < 20 {
            return Err(bad(at, "the parent locator is shorter than its header"));
        }
        if Guid::read(b, 0) != VHDX_LOCATOR_TYPE {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "parent locator type {} (only VHDX parents are known)",
                    Guid::read(b, 0)
                ),
            )
            .at("VHDX parent locator", at));
        }
        let count = le16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(bad(
                at,
                format!("the parent locator's {count} entries do not fit in it"),
            ));
        }
        let mut entries = BTreeMap::new();
        let text = |off: u32, len: u16, what: &str| -> Result<String> {
            let (off, len) = (off as usize, len as usize);
            if len == 0 || len % 2 != 0 || off.checked_add(len).is_none_or(|e| e > b.len()) {
                return Err(bad(
                    at,
                    format!("a parent locator {what} lies outside the locator or is not UTF-16"),
                ));
            }
            let units: Vec<u16> = b[off..off + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units)
                .map_err(|_| bad(at, format!("a parent locator {what} is not valid UTF-16")))
        };
        for i in 0..count {
            let e = 20 + i * 12;
            let key = text(le32(b, e), le16(b, e + 8), "key")?;
            let value = text(le32(b, e + 4), le16(b, e + 10), "value")?;
            if entries.insert(key.clone(), value).is_some() {
                return Err(bad(
                    at,
                    format!("the parent locator has the key '{key}' twice"),
                ));
            }
        }
        if !entries.contains_key("parent_linkage") {
            return Err(bad(at, "the parent locator has no parent_linkage"));
        }
        Ok(ParentLocator { entries })
    }

    /// The locator item's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let utf16 =
            |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect() };
        let mut head = vec![0u8; 20];
        head[0..16].copy_from_slice(&VHDX_LOCATOR_TYPE.0);
        head[18..20].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        let mut data = Vec::new();
        let base = 20 + 12 * self.entries.len();
        let mut table = Vec::new();
        for (k, v) in &self.entries {
            let (k, v) = (utf16(k), utf16(v));
            let ko = base + data.len();
            data.extend_from_slice(&k);
            let vo = base + data.len();
            data.extend_from_slice(&v);
            table.extend_from_slice(&(ko as u32).to_le_bytes());
            table.extend_from_slice(&(vo as u32).to_le_bytes());
            table.extend_from_slice(&(k.len() as u16).to_le_bytes());
            table.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        head.extend_from_slice(&table);
        head.extend_from_slice(&data);
        head
    }
}

/// The values the metadata region holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Bytes per payload block (1 MiB to 256 MiB, a power of two).
    pub block_size: u32,
    /// A fixed image: blocks never leave the fully present state.
    pub leave_allocated: bool,
    /// A differencing image.
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// The disk's identity (SCSI page 83).
    pub disk_id: Guid,
    /// Logical sector size (512 or 4096).
    pub logical_sector: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector: u32,
    /// Where the parent is (differencing images).
    pub parent: Option<ParentLocator>,
}

/// An item as the table lists it.
#[derive(Clone, Copy, Debug)]
struct Item {
    offset: u32,
    length: u32,
    flags: u32,
}

impl Metadata {
    /// Reads the metadata table and items of `region`.
    pub fn read(storage: &dyn Storage, region: &Region) -> Result<Metadata> {
        let at = region.offset;
        let mut table = vec![0u8; TABLE_LEN];
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if at >= file_len {
            return Err(bad(at, "the metadata region lies past the end of the file"));
        }
        let n = (file_len - at).min(TABLE_LEN as u64) as usize;
        storage
            .read_at(&mut table[..n], at)
            .map_err(|e| Error::io("reading the VHDX metadata table", e).at("VHDX metadata", at))?;
        if &table[0..8] != b"metadata" {
            return Err(bad(at, "bad metadata table signature"));
        }
        let count = le16(&table, 10) as usize;
        if count > MAX_ENTRIES {
            return Err(bad(
                at + 10,
                format!("{count} metadata entries (at most {MAX_ENTRIES})"),
            ));
        }
        let mut items: BTreeMap<Guid, Item> = BTreeMap::new();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for i in 0..count {
            let e = 32 + 32 * i;
            let entry_at = at + e as u64;
            let guid = Guid::read(&table, e);
            let item = Item {
                offset: le32(&table, e + 16),
                length: le32(&table, e + 20),
                flags: le32(&table, e + 24),
            };
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                PAGE_83,
                LOGICAL_SECTOR,
                PHYSICAL_SECTOR,
                PARENT_LOCATOR,
            ];
            let user = item.flags & IS_USER != 0;
            if !known.contains(&guid) || user {
                if item.flags & IS_REQUIRED != 0 {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("the image has a required metadata item {guid} this version of imgloop does not know"),
                    )
                    .at("VHDX metadata", entry_at));
                }
                // Optional unknown items stay as they are.
                continue;
            }
            if item.length > 0 {
                let (s, e2) = (item.offset as u64, item.offset as u64 + item.length as u64);
                if s < TABLE_LEN as u64 || item.length > MAX_ITEM || e2 > region.length {
                    return Err(bad(entry_at, format!("metadata item {guid} ({} bytes at {}) lies outside the metadata region's item area", item.length, item.offset)));
                }
                if spans.iter().any(|&(a, b)| s < b && a < e2) {
                    return Err(bad(
                        entry_at,
                        format!("metadata item {guid} overlaps another item"),
                    ));
                }
                spans.push((s, e2));
            }
            if items.insert(guid, item).is_some() {
                return Err(bad(
                    entry_at,
                    format!("metadata item {guid} is listed twice"),
                ));
            }
        }
        let read_item = |guid: Guid, what: &str, min: u32| -> Result<Vec<u8>> {
            let item = items.get(&guid).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidFormat,
                    format!("the image has no {what} metadata item"),
                )
                .at("VHDX metadata", at)
            })?;
            if item.length < min {
                return Err(bad(
                    at,
                    format!(
                        "the {what} metadata item has {} bytes, needs {min}",
                        item.length
                    ),
                ));
            }
            let mut b = vec![0u8; item.length as usize];
            let item_at = at + item.offset as u64;
            if item_at + b.len() as u64 > file_len {
                return Err(bad(
                    item_at,
                    format!(
                        "the {what} metadata item ({} bytes) lies past the end of the file ({file_len} bytes); the image has probably been truncated",
                        item.length
                    ),
                ));
            }
            storage.read_at(&mut b, item_at).map_err(|e| {
                Error::io("reading a VHDX metadata item", e).at("VHDX metadata", item_at)
            })?;
            Ok(b)
        };
        let item_at = |guid: Guid| items.get(&guid).map_or(at, |i| at + i.offset as u64);
        let fp = read_item(FILE_PARAMETERS, "file parameters", 8)?;
        let block_size = le32(&fp, 0);
        let flags = le32(&fp, 4);
        if !block_size.is_power_of_two() || !(MIB as u32..=256 << 20).contains(&block_size) {
            return Err(bad(
                item_at(FILE_PARAMETERS),
                format!("block size {block_size} (a power of two from 1 MiB to 256 MiB)"),
            ));
        }
        let size = le64(&read_item(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
        if size > MAX_SIZE {
            return Err(bad(
                item_at(VIRTUAL_DISK_SIZE),
                format!("virtual disk size {size} is larger than 64 TiB"),
            ));
        }
        let disk_id = Guid::read(&read_item(PAGE_83, "virtual disk ID", 16)?, 0);
        let logical_sector = le32(&read_item(LOGICAL_SECTOR, "logical sector size", 4)?, 0);
        let physical_sector = le32(&read_item(PHYSICAL_SECTOR, "physical sector size", 4)?, 0);
        for (v, g, what) in [
            (logical_sector, LOGICAL_SECTOR, "logical"),
            (physical_sector, PHYSICAL_SECTOR, "physical"),
        ] {
            if v != 512 && v != 4096 {
                return Err(bad(
                    item_at(g),
                    format!("{what} sector size {v} (512 or 4096)"),
                ));
            }
        }
        let has_parent = flags & 2 != 0;
        let parent = if has_parent {
            let b = read_item(PARENT_LOCATOR, "parent locator", 20)?;
            Some(ParentLocator::parse(&b, item_at(PARENT_LOCATOR))?)
        } else {
            None
        };
        Ok(Metadata {
            block_size,
            leave_allocated: flags & 1 != 0,
            has_parent,
            size,
            disk_id,
            logical_sector,
            physical_sector,
            parent,
        })
    }

    /// The metadata region's bytes for a new image (table and items; the
    /// region is `len` bytes).
    pub fn to_region(&self) -> Vec<u8> {
        let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
            (
                FILE_PARAMETERS,
                {
                    let mut b = self.block_size.to_le_bytes().to_vec();
                    let flags = self.leave_allocated as u32 | (self.has_parent as u32) << 1;
                    b.extend_from_slice(&flags.to_le_bytes());
                    b
                },
                IS_REQUIRED,
            ),
            (
                VIRTUAL_DISK_SIZE,
                self.size.to_le_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (
                PAGE_83,
                self.disk_id.0.to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (
                LOGICAL_SECTOR,
                self.logical_sector.to_le_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (
                PHYSICAL_SECTOR,
                self.physical_sector.to_le_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
        ];
        if let Some(p) = &self.parent {
            items.push((PARENT_LOCATOR, p.to_bytes(), IS_REQUIRED));
        }
        let mut region = vec![0u8; TABLE_LEN];
        region[0..8].copy_from_slice(b"metadata");
        region[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        for (i, (guid, payload, flags)) in items.iter().enumerate() {
            let e = 32 + 32 * i;
            let offset = region.len();
            region.extend_from_slice(payload);
            region[e..e + 16].copy_from_slice(&guid.0);
            region[e + 16..e + 20].copy_from_slice(&(offset as u32).to_le_bytes());
            region[e + 20..e + 24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            region[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        }
        region
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn sample(parent: Option<ParentLocator>) -> Metadata {
        Metadata {
            block_size: 32 << 20,
            leave_allocated: false,
            has_parent: parent.is_some(),
            size: 10 << 30,
            disk_id: Guid::random(),
            logical_sector: 512,
            physical_sector: 4096,
            parent,
        }
    }

    fn region_with(bytes: &[u8]) -> (MemStorage, Region) {
        let mem = MemStorage::new();
        mem.write_at(bytes, 2 * MIB).unwrap();
        mem.set_len(4 * MIB).unwrap();
        (
            mem,
            Region {
                guid: super::super::header::METADATA_REGION,
                offset: 2 * MIB,
                length: MIB,
                required: true,
            },
        )
    }

    #[test]
    fn metadata_and_parent_locators_round_trip() {
        let mut loc = ParentLocator::default();
        loc.entries
            .insert("parent_linkage".into(), Guid::random().to_string());
        loc.entries
            .insert("relative_path".into(), "..\\base\\parent.vhdx".into());
        let m = sample(Some(loc.clone()));
        let (mem, r) = region_with(&m.to_region());
        assert_eq!(Metadata::read(&mem, &r).unwrap(), m);
        assert_eq!(ParentLocator::parse(&loc.to_bytes(), 0).unwrap(), loc);
        let plain = sample(None);
        let (mem, r) = region_with(&plain.to_region());
        assert_eq!(Metadata::read(&mem, &r).unwrap(), plain);
    }

    #[test]
    fn bad_values_and_unknown_required_items_are_refused() {
        let m = sample(None);
        let bytes = m.to_region();
        let patch = |at: usize, v: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + v.len()].copy_from_slice(v);
            let (mem, r) = region_with(&b);
            Metadata::read(&mem, &r)
        };
        // The first item is the file parameters at 64 KiB.
        assert!(patch(TABLE_LEN, &(3u32 << 20).to_le_bytes())
            .unwrap_err()
            .to_string()
            .contains("block size"));
        assert!(patch(TABLE_LEN + 8, &u64::MAX.to_le_bytes())
            .unwrap_err()
            .to_string()
            .contains("64 TiB"));
        // An unknown required item, then the same item optional.
        let mut g = [0u8; 16];
        g[0] = 0x42;
        let unknown_at = 32 + 32 * 5;
        let mut b = bytes.clone();
        b[10..12].copy_from_slice(&6u16.to_le_bytes());
        b[unknown_at..unknown_at + 16].copy_from_slice(&g);
        b[unknown_at + 24..unknown_at + 28].copy_from_slice(&IS_REQUIRED.to_le_bytes());
        let (mem, r) = region_with(&b);
        assert_eq!(
            Metadata::read(&mem, &r).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        b[unknown_at + 24..unknown_at + 28].copy_from_slice(&0u32.to_le_bytes());
        let (mem, r) = region_with(&b);
        assert!(Metadata::read(&mem, &r).is_ok());
        // An item offset outside the region.
        assert!(patch(32 + 16, &(2u32 << 20).to_le_bytes())
            .unwrap_err()
            .to_string()
            .contains("outside"));
        // A locator entry pointing past its end.
        let mut loc = ParentLocator::default();
        loc.entries.insert("parent_linkage".into(), "{x}".into());
        let mut lb = loc.to_bytes();
        lb[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ParentLocator::parse(&lb, 0).is_err());
    }
}
