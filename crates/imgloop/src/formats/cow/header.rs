//! The header of a User-Mode-Linux COW file, in every layout Linux
//! (`arch/um/drivers/cow_user.c`, `cow.h`) and old QEMU wrote, field by
//! field.
//!
//! | layout | byte order | backing path | header | bitmap at | data at |
//! |---|---|---|---|---|---|
//! | v1 | the writer's (little-endian in practice) | 256 bytes at 8 | 280 | 280 | round_up(280 + len₁, sector size) |
//! | v2 (UML) | big-endian | 4096 bytes at 8 | 4120 | 4120 | round_up(4120 + len₁, sector size) |
//! | v2 (old QEMU, x86-64) | big-endian | 1024 bytes at 8 | 1056 | 1056 | round_up(1056 + len₂, 512) |
//! | v3 | big-endian | 4096 bytes at 32 | 4128 | round_up(4128, align) | round_up(bitmap + len₂, align) |
//! | v3, 64-bit layout bug | big-endian | 4096 bytes at 36 | 4136 | round_up(4136, align) | round_up(bitmap + len₂, align) |
//!
//! len₁ = (size + sector − 1) / (8 · sector), UML's rounding for v1 and
//! v2 (one byte short for some sizes); len₂ = ⌈⌈size / sector⌉ / 8⌉.
//! Sector `s` is bit `s % 8` (from the least significant) of bitmap byte
//! `s / 8`; its data is at `data offset + 512 · s`.

use crate::error::{Checked, Error, Result};
use crate::storage::Storage;

/// `MOOO`, the magic of every version.
pub const MAGIC: u32 = 0x4f4f_4f4d;
/// The sector size every tool writes and Linux addresses data in.
pub const SECTOR: u64 = 512;
/// Alignment `uml_mkcow` and UML write into new v3 files (the page size).
pub const DEFAULT_ALIGN: u32 = 4096;

/// Which of the layouts a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Version 1; `big_endian` when the file came from a big-endian host.
    V1 {
        /// Fields are big-endian.
        big_endian: bool,
    },
    /// Version 2 as UML writes it (4096-byte path).
    V2,
    /// Version 2 as QEMU's `cow` driver wrote it (1024-byte path; the
    /// offset of the size field depends on the writer's ABI).
    V2Qemu {
        /// Byte offset of the size field (1040 on x86-64, 1036 on i386).
        size_at: usize,
    },
    /// Version 3.
    V3,
    /// Version 3 with the 64-bit padding bug of Linux before 2.6.15.
    V3Padded,
}

/// A validated COW header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowHeader {
    /// The layout found.
    pub layout: Layout,
    /// Backing file name as stored (UML stores an absolute path).
    pub backing_file: String,
    /// Backing file modification time (seconds, 32 bits) at creation.
    pub mtime: u32,
    /// Disk size in bytes (the backing file's size at creation).
    pub size: u64,
    /// Sector size (512).
    pub sector_size: u32,
    /// Alignment of bitmap and data (v3; the sector size for v1/v2).
    pub alignment: u32,
    /// Byte offset of the bitmap.
    pub bitmap_offset: u64,
    /// Byte offset of sector 0's data.
    pub data_offset: u64,
    /// Sectors the bitmap has bits for: all of them, except in UML's v1
    /// and v2 layouts, whose rounded-down bitmap length leaves the last
    /// sectors of a disk that is not a multiple of 4 KiB without bits.
    /// UML reads those from the backing file.
    pub bitmap_sectors: u64,
}

fn bad(at: u64, why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_format("COW header", at, why)
}

struct Fields<'a> {
    b: &'a [u8],
    big: bool,
}

impl Fields<'_> {
    fn u32(&self, at: usize) -> u32 {
        let v: [u8; 4] = self.b[at..at + 4].try_into().expect("4 bytes");
        if self.big {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        }
    }

    fn u64(&self, at: usize) -> u64 {
        let v: [u8; 8] = self.b[at..at + 8].try_into().expect("8 bytes");
        if self.big {
            u64::from_be_bytes(v)
        } else {
            u64::from_le_bytes(v)
        }
    }

    /// The NUL-terminated backing file name in the `len`-byte field at
    /// `at`.
    fn path(&self, at: usize, len: usize) -> Result<String> {
        let raw = &self.b[at..at + len];
        let Some(end) = raw.iter().position(|&c| c == 0) else {
            return Err(bad(
                at as u64,
                format!("the backing file name has no terminating NUL within its {len}-byte field"),
            ));
        };
        String::from_utf8(raw[..end].to_vec())
            .map_err(|_| bad(at as u64, "the backing file name is not valid UTF-8"))
    }
}

fn round_up(v: u64, align: u64, at: u64) -> Result<u64> {
    Checked::of("COW header", at)
        .add(v, align - 1, "offset")
        .map(|x| x / align * align)
}

/// Bytes of bitmap one bit per sector takes.
pub fn bitmap_len(size: u64, sector: u64) -> u64 {
    size.div_ceil(sector).div_ceil(8)
}

impl CowHeader {
    /// True when `head` starts like a COW file (either byte order).
    pub fn probe(head: &[u8]) -> bool {
        let Some(h) = head.get(..8) else {
            return false;
        };
        let be = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4"));
        let le = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4"));
        (be(0) == MAGIC && (1..=3).contains(&be(4))) || (le(0) == MAGIC && (1..=3).contains(&le(4)))
    }

    /// Reads and validates the header of the file on `storage`.
    pub fn read(storage: &dyn Storage) -> Result<CowHeader> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the COW file size", e))?;
        let mut b = vec![0u8; 4136.min(file_len) as usize];
        storage
            .read_at(&mut b, 0)
            .map_err(|e| Error::io("reading the COW header", e).at("COW header", 0))?;
        if b.len() < 280 {
            return Err(bad(
                0,
                format!("the file is too short ({} bytes) for a COW header", b.len()),
            ));
        }
        let big = u32::from_be_bytes(b[0..4].try_into().expect("4")) == MAGIC;
        if !big && u32::from_le_bytes(b[0..4].try_into().expect("4")) != MAGIC {
            return Err(bad(0, "not a COW file (bad magic)"));
        }
        let f = Fields { b: &b, big };
        let version = f.u32(4);
        let need = |n: usize| -> Result<()> {
            if b.len() < n {
                Err(bad(0, format!("the file is too short ({} bytes) for a version {version} COW header of {n} bytes", b.len())))
            } else {
                Ok(())
            }
        };
        let h = match version {
            1 => {
                let ss = f.u32(276);
                let size = f.u64(268);
                Self::legacy(
                    Layout::V1 { big_endian: big },
                    f.path(8, 256)?,
                    f.u32(264),
                    size,
                    ss,
                    280,
                )?
            }
            2 => {
                // UML's layout has the sector size at 4116, QEMU's at 1048
                // (x86-64) or 1044 (i386).
                if b.len() >= 4120 && f.u32(4116) == SECTOR as u32 {
                    Self::legacy(
                        Layout::V2,
                        f.path(8, 4096)?,
                        f.u32(4104),
                        f.u64(4108),
                        f.u32(4116),
                        4120,
                    )?
                } else if b.len() >= 1056 && f.u32(1048) == SECTOR as u32 {
                    Self::qemu_v2(f.path(8, 1024)?, f.u32(1032), f.u64(1040), 1040, 1056)?
                } else if b.len() >= 1048 && f.u32(1044) == SECTOR as u32 {
                    Self::qemu_v2(f.path(8, 1024)?, f.u32(1032), f.u64(1036), 1036, 1048)?
                } else {
                    return Err(bad(4116, "version 2 COW header without a 512-byte sector size where UML or QEMU put it"));
                }
            }
            3 => {
                need(4128)?;
                // The 64-bit layout bug moved everything after mtime by 4
                // bytes: the path then starts at 36, and offset 32 holds
                // the cow_format word (0) instead of a path's first bytes.
                let padded = b.len() >= 4136 && f.u32(32) == 0 && f.u32(12) == 0;
                let (layout, size_at, path_at, header) = if padded {
                    (Layout::V3Padded, 16, 36, 4136)
                } else {
                    (Layout::V3, 12, 32, 4128)
                };
                let size = f.u64(size_at);
                let ss = f.u32(size_at + 8);
                let align = f.u32(size_at + 12);
                let format = f.u32(size_at + 16);
                if format != 0 {
                    return Err(Error::unsupported(format!(
                        "COW format {format} (only the bitmap format 0 exists)"
                    ))
                    .at("COW header", size_at as u64 + 16));
                }
                if align == 0 {
                    return Err(bad(size_at as u64 + 12, "invalid COW header, align == 0"));
                }
                Self::check_sector(ss, size_at as u64 + 8)?;
                let align64 = align as u64;
                let bitmap_offset = round_up(header, align64, size_at as u64 + 12)?;
                let bm = Checked::of("COW header", size_at as u64);
                let data_offset = round_up(
                    bm.add(bitmap_offset, bitmap_len(size, SECTOR), "bitmap end")?,
                    align64,
                    size_at as u64 + 12,
                )?;
                CowHeader {
                    layout,
                    backing_file: f.path(path_at, 4096)?,
                    mtime: f.u32(8),
                    size,
                    sector_size: ss,
                    alignment: align,
                    bitmap_offset,
                    data_offset,
                    bitmap_sectors: size.div_ceil(SECTOR),
                }
            }
            v => return Err(Error::unsupported(format!("COW version {v}")).at("COW header", 4)),
        };
        h.validate()?;
        Ok(h)
    }

    fn check_sector(ss: u32, at: u64) -> Result<()> {
        if ss as u64 != SECTOR {
            return Err(Error::unsupported(format!(
                "COW sector size {ss} (Linux addresses COW data in 512-byte sectors)"
            ))
            .at("COW header", at));
        }
        Ok(())
    }

    /// Version 1 and UML's version 2: bitmap right after the header, data
    /// on the next sector boundary after UML's bitmap length.
    fn legacy(
        layout: Layout,
        backing_file: String,
        mtime: u32,
        size: u64,
        ss: u32,
        header: u64,
    ) -> Result<CowHeader> {
        Self::check_sector(ss, header - 4)?;
        let len = (size.saturating_add(SECTOR - 1)) / (8 * SECTOR);
        let data_offset = round_up(
            Checked::of("COW header", header - 12).add(header, len, "bitmap end")?,
            SECTOR,
            header - 12,
        )?;
        Ok(CowHeader {
            layout,
            backing_file,
            mtime,
            size,
            sector_size: ss,
            alignment: ss,
            bitmap_offset: header,
            data_offset,
            bitmap_sectors: (len * 8).min(size.div_ceil(SECTOR)),
        })
    }

    /// QEMU's version 2: bitmap right after its header, data rounded to
    /// the next 512 bytes.
    fn qemu_v2(
        backing_file: String,
        mtime: u32,
        size: u64,
        size_at: usize,
        header: u64,
    ) -> Result<CowHeader> {
        let data_offset = round_up(
            Checked::of("COW header", size_at as u64).add(
                header,
                bitmap_len(size, SECTOR),
                "bitmap end",
            )?,
            SECTOR,
            size_at as u64,
        )?;
        Ok(CowHeader {
            layout: Layout::V2Qemu { size_at },
            backing_file,
            mtime,
            size,
            sector_size: SECTOR as u32,
            alignment: SECTOR as u32,
            bitmap_offset: header,
            data_offset,
            bitmap_sectors: size.div_ceil(SECTOR),
        })
    }

    /// Limits every layout shares.
    fn validate(&self) -> Result<()> {
        if self.size > crate::size::MAX_IMAGE_SIZE {
            return Err(bad(0, format!("disk size {} is too large", self.size)));
        }
        if self.backing_file.is_empty() {
            return Err(bad(8, "the COW file names no backing file"));
        }
        // Every sector's data must fit in 64-bit offsets.
        Checked::of("COW header", 0).add(self.data_offset, self.size, "data end")?;
        // The bitmap must not run into the data (UML's v1/v2 rounding can
        // make it one byte short for some sizes).
        let need = self.bitmap_bytes();
        if self.bitmap_offset + need > self.data_offset {
            return Err(bad(
                self.bitmap_offset,
                "the bitmap runs into the data area (a size UML's old layouts cannot hold)",
            ));
        }
        Ok(())
    }

    /// Bytes of bitmap the layout reads.
    pub fn bitmap_bytes(&self) -> u64 {
        self.bitmap_sectors.div_ceil(8)
    }

    /// The header bytes of a new file of this header's layout (v2 or v3).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let name = self.backing_file.as_bytes();
        match self.layout {
            Layout::V3 => {
                if name.len() >= 4096 {
                    return Err(Error::invalid_argument(
                        "backing file name longer than 4095 bytes",
                    ));
                }
                let mut b = vec![0u8; 4128];
                b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
                b[4..8].copy_from_slice(&3u32.to_be_bytes());
                b[8..12].copy_from_slice(&self.mtime.to_be_bytes());
                b[12..20].copy_from_slice(&self.size.to_be_bytes());
                b[20..24].copy_from_slice(&self.sector_size.to_be_bytes());
                b[24..28].copy_from_slice(&self.alignment.to_be_bytes());
                b[32..32 + name.len()].copy_from_slice(name);
                Ok(b)
            }
            Layout::V2 => {
                if name.len() >= 4096 {
                    return Err(Error::invalid_argument(
                        "backing file name longer than 4095 bytes",
                    ));
                }
                let mut b = vec![0u8; 4120];
                b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
                b[4..8].copy_from_slice(&2u32.to_be_bytes());
                b[8..8 + name.len()].copy_from_slice(name);
                b[4104..4108].copy_from_slice(&self.mtime.to_be_bytes());
                b[4108..4116].copy_from_slice(&self.size.to_be_bytes());
                b[4116..4120].copy_from_slice(&self.sector_size.to_be_bytes());
                Ok(b)
            }
            _ => Err(Error::unsupported("creating COW files of this layout")),
        }
    }

    /// A header for a new file of `version` (2 or 3) over a backing file.
    pub fn new(version: u32, backing_file: String, mtime: u32, size: u64) -> Result<CowHeader> {
        match version {
            3 => {
                let bitmap_offset = round_up(4128, DEFAULT_ALIGN as u64, 0)?;
                let data_offset = round_up(
                    bitmap_offset + bitmap_len(size, SECTOR),
                    DEFAULT_ALIGN as u64,
                    0,
                )?;
                let h = CowHeader {
                    layout: Layout::V3,
                    backing_file,
                    mtime,
                    size,
                    sector_size: SECTOR as u32,
                    alignment: DEFAULT_ALIGN,
                    bitmap_offset,
                    data_offset,
                    bitmap_sectors: size.div_ceil(SECTOR),
                };
                h.validate()?;
                Ok(h)
            }
            2 => {
                let h = Self::legacy(Layout::V2, backing_file, mtime, size, SECTOR as u32, 4120)?;
                h.validate()?;
                let sectors = size.div_ceil(SECTOR);
                if h.bitmap_sectors < sectors {
                    return Err(Error::invalid_argument(format!(
                        "a version 2 COW file has no bitmap bits for the last {} sectors of a \
                         disk whose size is not a multiple of 4 KiB (UML's rounding); use version 3",
                        sectors - h.bitmap_sectors
                    )));
                }
                Ok(h)
            }
            v => Err(Error::invalid_argument(format!(
                "COW version {v} cannot be created (2 or 3)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn a_v3_header_round_trips_with_uml_mkcow_offsets() {
        // uml_mkcow over a 102400-byte backing file: bitmap at 0x2000,
        // data at 0x3000.
        let h = CowHeader::new(3, "/tmp/cowt/base.img".into(), 0x6593_7d25, 102_400).unwrap();
        assert_eq!((h.bitmap_offset, h.data_offset), (0x2000, 0x3000));
        let mem = MemStorage::from_bytes(&h.to_bytes().unwrap());
        mem.set_len(h.data_offset + h.size).unwrap();
        assert_eq!(CowHeader::read(&mem).unwrap(), h);
    }

    #[test]
    fn version_1_little_endian_and_the_padded_v3_layout_are_read() {
        let mut v1 = vec![0u8; 280];
        v1[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        v1[8..12].copy_from_slice(b"/b1\0");
        v1[264..268].copy_from_slice(&7u32.to_le_bytes());
        v1[268..276].copy_from_slice(&(1u64 << 20).to_le_bytes());
        v1[276..280].copy_from_slice(&512u32.to_le_bytes());
        let h = CowHeader::read(&MemStorage::from_bytes(&v1)).unwrap();
        assert_eq!(h.layout, Layout::V1 { big_endian: false });
        assert_eq!(
            (h.size, h.mtime, h.backing_file.as_str()),
            (1 << 20, 7, "/b1")
        );
        // UML's v1 bitmap length: (2^20 + 511) / 4096 = 256 bytes.
        assert_eq!((h.bitmap_offset, h.data_offset), (280, 1024));

        let mut v3 = vec![0u8; 4136];
        v3[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        v3[4..8].copy_from_slice(&3u32.to_be_bytes());
        v3[8..12].copy_from_slice(&9u32.to_be_bytes());
        v3[16..24].copy_from_slice(&(1u64 << 20).to_be_bytes());
        v3[24..28].copy_from_slice(&512u32.to_be_bytes());
        v3[28..32].copy_from_slice(&4096u32.to_be_bytes());
        v3[36..40].copy_from_slice(b"/b3\0");
        let h = CowHeader::read(&MemStorage::from_bytes(&v3)).unwrap();
        assert_eq!(h.layout, Layout::V3Padded);
        assert_eq!((h.size, h.backing_file.as_str()), (1 << 20, "/b3"));
        assert_eq!((h.bitmap_offset, h.data_offset), (8192, 12288));
    }

    #[test]
    fn hostile_fields_are_errors_naming_the_header() {
        let good = CowHeader::new(3, "/b".into(), 0, 1 << 20)
            .unwrap()
            .to_bytes()
            .unwrap();
        let with = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            CowHeader::read(&MemStorage::from_bytes(&b))
        };
        for (at, v, want) in [
            (24usize, 0u32.to_be_bytes().to_vec(), "align == 0"),
            (20, 4096u32.to_be_bytes().to_vec(), "sector size"),
            (28, 1u32.to_be_bytes().to_vec(), "COW format 1"),
            (4, 9u32.to_be_bytes().to_vec(), "version 9"),
            (12, u64::MAX.to_be_bytes().to_vec(), "too large"),
        ] {
            let Err(e) = with(at, &v) else {
                panic!("field at {at} = {v:?} accepted");
            };
            assert!(e.to_string().contains(want), "{e}");
        }
        assert!(CowHeader::read(&MemStorage::from_bytes(&good[..100])).is_err());
    }
}
