//! The bitmaps extension: the bitmap directory (names, granularity,
//! flags and table locations), read for `info` and checks and encoded
//! for `bitmap_ops`.
//!
//! Extension payload: `nb_bitmaps` (u32), reserved (u32),
//! `bitmap_directory_size` (u64), `bitmap_directory_offset` (u64).
//! Directory entry: table offset (u64), table size (u32), flags (u32),
//! type (u8), granularity bits (u8), name size (u16), extra data size
//! (u32), then the extra data and the name, padded to 8 bytes.

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Largest bitmap directory read (QEMU's limit).
const MAX_DIRECTORY: u64 = 64 << 20;
/// Most bitmaps an image may have (QEMU's limit).
const MAX_BITMAPS: u32 = 65535;

/// Flag bit 0: the bitmap was not saved correctly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks every write (enabled).
pub const FLAG_AUTO: u32 = 1 << 1;

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`], ...).
    pub flags: u32,
    /// log2 of the bytes of disk one bit stands for.
    pub granularity_bits: u8,
    /// The bitmap's name.
    pub name: String,
    /// Its type (1: dirty tracking).
    pub kind: u8,
    /// Extra data, kept as it is.
    pub extra: Vec<u8>,
}

impl Bitmap {
    /// Bitmap table entries a disk of `size` bytes needs at cluster size `cs`.
    pub fn table_entries(size: u64, granularity_bits: u8, cs: u64) -> u64 {
        let bits = size.div_ceil(1u64 << granularity_bits.min(63));
        bits.div_ceil(8).div_ceil(cs)
    }
}

/// Encodes a bitmap directory.
pub fn encode_directory(list: &[Bitmap]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in list {
        let start = out.len();
        out.extend_from_slice(&b.table_offset.to_be_bytes());
        out.extend_from_slice(&b.table_size.to_be_bytes());
        out.extend_from_slice(&b.flags.to_be_bytes());
        out.push(b.kind);
        out.push(b.granularity_bits);
        out.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(b.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&b.extra);
        out.extend_from_slice(b.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
    out
}

/// The extension payload naming a directory of `count` entries.
pub fn encode_extension(count: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
    let mut e = count.to_be_bytes().to_vec();
    e.extend_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(&dir_size.to_be_bytes());
    e.extend_from_slice(&dir_offset.to_be_bytes());
    e
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a bitmap directory of `count` entries.
pub fn parse_directory(dir: &[u8], count: u32) -> Result<Vec<Bitmap>> {
    let bad = |at: usize, why: &'static str| Error::corrupt("bitmap directory", at as u64, why);
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        if pos + 24 > dir.len() {
            return Err(bad(pos, "bitmap directory entry is truncated"));
        }
        let e = &dir[pos..];
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        let end = 24 + extra + name_size;
        if pos + end > dir.len() {
            return Err(bad(pos, "bitmap directory entry is truncated"));
        }
        out.push(Bitmap {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            granularity_bits: e[17],
            name: String::from_utf8_lossy(&e[24 + extra..end]).into_owned(),
            kind: e[16],
            extra: e[24..24 + extra].to_vec(),
        });
        pos += end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Reads the bitmap directory named by the extension payload `ext`.
pub fn read_directory(storage: &dyn Storage, ext: &[u8]) -> Result<Vec<Bitmap>> {
    if ext.len() < 24 {
        return Err(Error::corrupt(
            "bitmaps extension",
            0,
            "bitmaps extension is too short",
        ));
    }
    let count = be32(ext, 0);
    let size = be64(ext, 8);
    let offset = be64(ext, 16);
    if count > MAX_BITMAPS || size > MAX_DIRECTORY {
        return Err(Error::corrupt(
            "bitmaps extension",
            0,
            "bitmap directory is too large",
        ));
    }
    // Bounded by the file before anything is allocated.
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    if offset.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(Error::corrupt(
            "bitmap directory",
            offset,
            "bitmap directory lies past the end of the file",
        ));
    }
    let mut dir = vec![0u8; size as usize];
    storage
        .read_at(&mut dir, offset)
        .map_err(|e| Error::io("reading the bitmap directory", e).at("bitmap directory", offset))?;
    parse_directory(&dir, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32, gran: u8, extra: usize) -> Vec<u8> {
        let mut e = vec![0u8; 24];
        e[0..8].copy_from_slice(&0x5_0000u64.to_be_bytes());
        e[8..12].copy_from_slice(&1u32.to_be_bytes());
        e[12..16].copy_from_slice(&flags.to_be_bytes());
        e[16] = 1;
        e[17] = gran;
        e[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[20..24].copy_from_slice(&(extra as u32).to_be_bytes());
        e.extend(std::iter::repeat_n(0xaa, extra));
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    #[test]
    fn entries_follow_each_other_past_extra_data_and_padding() {
        let mut dir = entry("bm0", FLAG_AUTO, 16, 0);
        dir.extend(entry("second-bitmap", 0, 17, 5));
        let list = parse_directory(&dir, 2).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].name.as_str(), list[0].flags), ("bm0", FLAG_AUTO));
        assert_eq!(list[1].name, "second-bitmap");
        assert_eq!(list[1].granularity_bits, 17);
        assert_eq!(list[1].table_offset, 0x5_0000);
        // Encoding gives the same bytes back.
        assert_eq!(encode_directory(&list), dir);
    }

    #[test]
    fn a_short_directory_is_an_error() {
        let dir = entry("bm0", 0, 16, 0);
        assert!(parse_directory(&dir[..20], 1).is_err());
        assert!(parse_directory(&dir, 2).is_err());
    }
}
