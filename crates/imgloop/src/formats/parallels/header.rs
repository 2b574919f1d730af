//! The 64-byte Parallels header: the wire layout apart from the validated
//! values. Everything is little-endian.

use crate::error::{Error, ErrorKind, Result};

/// Bytes of the header; the BAT follows it directly.
pub const HEADER_LEN: u64 = 64;
/// A sector, the unit of most header fields.
pub const SECTOR: u64 = 512;
/// The version-1 magic: BAT entries count sectors.
pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
/// The version-2 magic: BAT entries count clusters; a format extension may
/// follow.
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
/// The only version field value.
pub const VERSION: u32 = 2;
/// `inuse` while an image is open for writing (the bytes spell "Ynot").
pub const IN_USE: u32 = 0x746f_6e59;
/// Most sectors per cluster qemu opens (about 2 GiB clusters).
pub const MAX_TRACKS: u32 = 4_186_127;
/// Most BAT entries qemu opens.
pub const MAX_BAT_ENTRIES: u32 = 0x1fff_ffff;
/// `ext_off` values from here on are refused (their byte offset would not
/// fit 63 bits).
pub const MAX_EXT_OFF: u64 = 0x3f_ffff_ffff_ffff;

/// The two header magics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Magic {
    /// `WithoutFreeSpace`: BAT entries are sector numbers; only the low 32
    /// bits of the sector count count.
    V1,
    /// `WithouFreSpacExt`: BAT entries are cluster numbers.
    V2,
}

/// The header as stored, field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireHeader {
    /// One of the two magics (anything else is not a Parallels image).
    pub magic: [u8; 16],
    /// Must be 2.
    pub version: u32,
    /// Guest geometry, informational.
    pub heads: u32,
    /// Guest geometry, informational.
    pub cylinders: u32,
    /// Sectors per cluster.
    pub tracks: u32,
    /// Entries of the BAT (one per guest cluster).
    pub bat_entries: u32,
    /// Virtual disk size in sectors.
    pub nb_sectors: u64,
    /// [`IN_USE`] while open for writing; anything else means closed.
    pub inuse: u32,
    /// First sector of the data area (0 in version 1: right after the BAT).
    pub data_off: u32,
    /// Bit 0: empty image (never read).
    pub flags: u32,
    /// Sector of the format extension cluster, 0 for none.
    pub ext_off: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl WireHeader {
    /// Decodes the first 64 bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<WireHeader> {
        if b.len() < HEADER_LEN as usize {
            return None;
        }
        Some(WireHeader {
            magic: b[0..16].try_into().expect("16 bytes"),
            version: le32(b, 16),
            heads: le32(b, 20),
            cylinders: le32(b, 24),
            tracks: le32(b, 28),
            bat_entries: le32(b, 32),
            nb_sectors: le64(b, 36),
            inuse: le32(b, 44),
            data_off: le32(b, 48),
            flags: le32(b, 52),
            ext_off: le64(b, 56),
        })
    }

    /// The 64 bytes of the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..16].copy_from_slice(&self.magic);
        b[16..20].copy_from_slice(&self.version.to_le_bytes());
        b[20..24].copy_from_slice(&self.heads.to_le_bytes());
        b[24..28].copy_from_slice(&self.cylinders.to_le_bytes());
        b[28..32].copy_from_slice(&self.tracks.to_le_bytes());
        b[32..36].copy_from_slice(&self.bat_entries.to_le_bytes());
        b[36..44].copy_from_slice(&self.nb_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.inuse.to_le_bytes());
        b[48..52].copy_from_slice(&self.data_off.to_le_bytes());
        b[52..56].copy_from_slice(&self.flags.to_le_bytes());
        b[56..64].copy_from_slice(&self.ext_off.to_le_bytes());
        b
    }

    /// Which magic, if either, and the version is 2 (what qemu probes).
    pub fn magic(&self) -> Option<Magic> {
        if self.version != VERSION {
            return None;
        }
        match &self.magic {
            m if m == MAGIC_V1 => Some(Magic::V1),
            m if m == MAGIC_V2 => Some(Magic::V2),
            _ => None,
        }
    }
}

/// A header whose fields were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The header as stored (with the values the driver has changed since).
    pub wire: WireHeader,
    /// Version 1 or 2.
    pub magic: Magic,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Virtual disk size in bytes.
    pub size: u64,
}

fn bad(at: u64, msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_format("Parallels header", at, msg)
}

impl Header {
    /// Validates a wire header with qemu's rules and messages, and one of
    /// its own: the BAT must cover the whole disk (qemu opens such images
    /// and then aborts on a write past the BAT).
    pub fn validate(wire: WireHeader) -> Result<Header> {
        let magic = wire
            .magic()
            .ok_or_else(|| bad(0, "Image not in Parallels format"))?;
        if wire.tracks == 0 {
            return Err(bad(28, "Invalid image: Zero sectors per track"));
        }
        if wire.tracks > MAX_TRACKS {
            return Err(bad(28, "Invalid image: Too big cluster"));
        }
        if wire.bat_entries > MAX_BAT_ENTRIES {
            return Err(bad(32, "Catalog too large"));
        }
        if wire.ext_off >= MAX_EXT_OFF {
            return Err(bad(56, "Invalid image: Too big offset"));
        }
        let sectors = match magic {
            Magic::V1 => wire.nb_sectors & 0xffff_ffff,
            Magic::V2 => wire.nb_sectors,
        };
        let cluster_size = wire.tracks as u64 * SECTOR;
        let covered = wire.bat_entries as u64 * cluster_size;
        let size = sectors
            .checked_mul(SECTOR)
            .filter(|&s| s <= covered)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidFormat,
                    format!(
                        "the disk has {sectors} sectors but its BAT of {} entries covers only {covered} bytes",
                        wire.bat_entries
                    ),
                )
                .at("Parallels header", 36)
            })?;
        Ok(Header {
            wire,
            magic,
            cluster_size,
            size,
        })
    }

    /// Bytes of the header and the BAT.
    pub fn table_end(&self) -> u64 {
        HEADER_LEN + 4 * self.wire.bat_entries as u64
    }

    /// The lowest valid data offset, in sectors: the end of the BAT,
    /// rounded up to a sector (and to a cluster in version 2).
    pub fn min_data_off(&self) -> u64 {
        let s = self.table_end().div_ceil(SECTOR);
        match self.magic {
            Magic::V1 => s,
            Magic::V2 => s.next_multiple_of(self.wire.tracks as u64),
        }
    }

    /// Whether `data_off` is valid for a file of `file_len` bytes (qemu's
    /// rule: 0 in version 1, or between the end of the BAT and the end of
    /// the file).
    pub fn data_off_valid(&self, file_len: u64) -> bool {
        let d = self.wire.data_off as u64;
        (self.magic == Magic::V1 && d == 0)
            || (self.min_data_off() <= d && d <= file_len.div_ceil(SECTOR))
    }

    /// Byte offset of the data area (the minimum when `data_off` is not
    /// valid, as qemu uses it).
    pub fn data_start(&self, file_len: u64) -> u64 {
        let d = self.wire.data_off as u64;
        if d != 0 && self.data_off_valid(file_len) {
            d * SECTOR
        } else {
            self.min_data_off() * SECTOR
        }
    }

    /// Bytes one unit of a BAT entry stands for.
    pub fn entry_unit(&self) -> u64 {
        match self.magic {
            Magic::V1 => SECTOR,
            Magic::V2 => self.cluster_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WireHeader {
        WireHeader {
            magic: *MAGIC_V2,
            version: 2,
            heads: 16,
            cylinders: 256,
            tracks: 2048,
            bat_entries: 64,
            nb_sectors: 131072,
            inuse: 0,
            data_off: 2048,
            flags: 0,
            ext_off: 0,
        }
    }

    #[test]
    fn the_header_round_trips_and_reads_as_qemu_writes_it() {
        let w = sample();
        let b = w.to_bytes();
        // qemu-img create -f parallels x 64M, first 64 bytes.
        let mut want = Vec::new();
        want.extend_from_slice(b"WithouFreSpacExt");
        for v in [2u32, 16, 256, 2048, 64] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(&131072u64.to_le_bytes());
        for v in [0u32, 2048, 0] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(b.to_vec(), want);
        assert_eq!(WireHeader::parse(&b), Some(w));
        let h = Header::validate(w).unwrap();
        assert_eq!((h.cluster_size, h.size), (1 << 20, 64 << 20));
        assert_eq!(h.min_data_off(), 2048);
        assert!(h.data_off_valid(1 << 20));
    }

    #[test]
    fn bad_fields_are_refused_with_qemus_messages() {
        type Case = (fn(&mut WireHeader), &'static str);
        let cases: [Case; 6] = [
            (|w| w.version = 3, "Image not in Parallels format"),
            (|w| w.magic[0] = b'X', "Image not in Parallels format"),
            (|w| w.tracks = 0, "Zero sectors per track"),
            (|w| w.tracks = MAX_TRACKS + 1, "Too big cluster"),
            (|w| w.bat_entries = MAX_BAT_ENTRIES + 1, "Catalog too large"),
            (|w| w.ext_off = MAX_EXT_OFF, "Too big offset"),
        ];
        for (edit, msg) in cases {
            let mut w = sample();
            edit(&mut w);
            let e = Header::validate(w).unwrap_err();
            assert!(e.message().contains(msg), "{e}");
        }
        // A disk larger than its BAT covers.
        let mut w = sample();
        w.nb_sectors = u64::MAX;
        assert!(Header::validate(w)
            .unwrap_err()
            .message()
            .contains("covers only"));
        // Version 1 counts only the low 32 bits of the sector count.
        let mut w = sample();
        w.magic = *MAGIC_V1;
        w.nb_sectors = (1 << 32) | 2048;
        assert_eq!(Header::validate(w).unwrap().size, 1 << 20);
    }

    #[test]
    fn data_off_follows_qemus_rule() {
        let mut w = sample();
        w.data_off = 2047;
        let h = Header::validate(w).unwrap();
        assert!(!h.data_off_valid(5 << 20));
        assert_eq!(h.data_start(5 << 20), 1 << 20);
        let mut w = sample();
        w.magic = *MAGIC_V1;
        w.data_off = 0;
        let h = Header::validate(w).unwrap();
        assert!(h.data_off_valid(0));
        // 64 + 4 * 64 bytes: one sector.
        assert_eq!(h.data_start(0), 512);
        assert_eq!(h.entry_unit(), 512);
    }
}
