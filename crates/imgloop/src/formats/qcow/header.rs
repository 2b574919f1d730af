//! The qcow (version 1) header: the 48-byte big-endian wire struct, apart
//! from the validated header the driver uses.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `QFI\xfb` |
//! | 4 | 4 | version (1) |
//! | 8 | 8 | backing file name offset (0: none) |
//! | 16 | 4 | backing file name length |
//! | 20 | 4 | mtime (unused, 0) |
//! | 24 | 8 | virtual size in bytes |
//! | 32 | 1 | cluster_bits (9..16) |
//! | 33 | 1 | l2_bits: log2 of the entries per L2 table (6..13) |
//! | 34 | 2 | padding |
//! | 36 | 4 | crypt_method (0 none, 1 AES-128-CBC) |
//! | 40 | 8 | L1 table offset |
//!
//! The L1 table has ⌈size / 2^(cluster_bits + l2_bits)⌉ entries, each the
//! offset of an L2 table of 2^l2_bits entries (0: not allocated). An L2
//! entry is the host offset of a cluster (0: not allocated), or, with bit
//! 63 set, a compressed cluster: the stream starts at the low
//! 63 − cluster_bits bits and its length is in the cluster_bits bits above.

use crate::error::{Checked, Error, Result};
use crate::storage::Storage;

/// `QFI\xfb`, shared with qcow2 (the version tells them apart).
pub const MAGIC: u32 = 0x5146_49fb;
/// Bytes of the fixed header.
pub const HEADER_LEN: u64 = 48;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest L1 table imgloop reads (8 TiB of disk with 4 KiB clusters and
/// 4 KiB L2 tables), so no header makes it allocate more.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// L2 entry bit 63: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 63;

/// How the data is encrypted (`crypt_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptMethod {
    /// Plain data.
    None,
    /// AES-128-CBC per 512-byte sector, IV = the guest sector number
    /// (little-endian, zero-padded), key = the password's first 16 bytes.
    Aes,
}

/// The header fields as stored (no checks yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireHeader {
    /// `QFI\xfb`.
    pub magic: u32,
    /// 1.
    pub version: u32,
    /// Where the backing file name is (0: none).
    pub backing_file_offset: u64,
    /// Its length in bytes (no terminator).
    pub backing_file_size: u32,
    /// Unused by every writer (0).
    pub mtime: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the entries of an L2 table.
    pub l2_bits: u8,
    /// 0 none, 1 AES.
    pub crypt_method: u32,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
}

impl WireHeader {
    /// Decodes the first 48 bytes of `b`.
    pub fn parse(b: &[u8; HEADER_LEN as usize]) -> WireHeader {
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        WireHeader {
            magic: u32_at(0),
            version: u32_at(4),
            backing_file_offset: u64_at(8),
            backing_file_size: u32_at(16),
            mtime: u32_at(20),
            size: u64_at(24),
            cluster_bits: b[32],
            l2_bits: b[33],
            crypt_method: u32_at(36),
            l1_table_offset: u64_at(40),
        }
    }

    /// The 48 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtime.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32] = self.cluster_bits;
        b[33] = self.l2_bits;
        b[36..40].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b
    }
}

/// A validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QcowHeader {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// log2 of the cluster size (9..16).
    pub cluster_bits: u32,
    /// log2 of the entries per L2 table (6..13).
    pub l2_bits: u32,
    /// How the data is encrypted.
    pub crypt: CryptMethod,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
    /// Entries of the L1 table.
    pub l1_size: u64,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

fn bad(at: u64, why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_format("qcow header", at, why)
}

impl QcowHeader {
    /// True when `head` starts like a qcow version 1 image.
    pub fn probe(head: &[u8]) -> bool {
        head.len() >= 8 && head[0..4] == MAGIC.to_be_bytes() && head[4..8] == 1u32.to_be_bytes()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Reads and validates the header (QEMU's limits and messages), and
    /// the backing file name.
    pub fn read(storage: &dyn Storage) -> Result<QcowHeader> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if file_len < HEADER_LEN {
            return Err(bad(
                0,
                format!("the file is too short ({file_len} bytes) for a qcow header"),
            ));
        }
        let mut b = [0u8; HEADER_LEN as usize];
        storage
            .read_at(&mut b, 0)
            .map_err(|e| Error::io("reading the qcow header", e).at("qcow header", 0))?;
        let w = WireHeader::parse(&b);
        if w.magic != MAGIC {
            return Err(bad(0, "not a qcow image (bad magic)"));
        }
        if w.version != 1 {
            return Err(
                Error::unsupported(format!("Unsupported qcow version {}", w.version))
                    .at("qcow header", 4),
            );
        }
        if !(9..=16).contains(&w.cluster_bits) {
            return Err(bad(
                32,
                format!(
                    "Cluster size must be between 512 and 64k (cluster_bits {})",
                    w.cluster_bits
                ),
            ));
        }
        if !(6..=13).contains(&w.l2_bits) {
            return Err(bad(
                33,
                format!(
                    "L2 table size must be between 512 and 64k (l2_bits {})",
                    w.l2_bits
                ),
            ));
        }
        let crypt = match w.crypt_method {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            m => {
                return Err(bad(
                    36,
                    format!("invalid encryption method {m} in qcow header"),
                ))
            }
        };
        if w.size > crate::size::MAX_IMAGE_SIZE {
            return Err(bad(24, format!("Image too large ({} bytes)", w.size)));
        }
        let shift = w.cluster_bits as u32 + w.l2_bits as u32;
        let l1_size = w.size.div_ceil(1 << shift);
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(
                24,
                format!(
                    "Image too large: its L1 table would take {l1_bytes} bytes (imgloop reads at most {MAX_L1_BYTES})"
                ),
            ));
        }
        let l1_end =
            Checked::of("qcow header", 40).add(w.l1_table_offset, l1_bytes, "L1 table end")?;
        if l1_end > i64::MAX as u64 {
            return Err(bad(
                40,
                format!("L1 table offset {} is invalid", w.l1_table_offset),
            ));
        }
        let backing_file = if w.backing_file_offset != 0 {
            Some(Self::read_backing_name(storage, &w, file_len)?)
        } else {
            None
        };
        Ok(QcowHeader {
            size: w.size,
            cluster_bits: w.cluster_bits as u32,
            l2_bits: w.l2_bits as u32,
            crypt,
            l1_table_offset: w.l1_table_offset,
            l1_size,
            backing_file,
        })
    }

    fn read_backing_name(storage: &dyn Storage, w: &WireHeader, file_len: u64) -> Result<String> {
        let len = w.backing_file_size;
        if len > MAX_BACKING_NAME {
            return Err(bad(16, format!("Backing file name too long ({len} bytes)")));
        }
        let at = w.backing_file_offset;
        let end = Checked::of("qcow header", 8).add(at, len as u64, "backing file name end")?;
        if end > file_len {
            return Err(bad(
                8,
                format!("the backing file name ({len} bytes at {at}) runs past the end of the file ({file_len} bytes)"),
            ));
        }
        let mut name = vec![0u8; len as usize];
        storage
            .read_at(&mut name, at)
            .map_err(|e| Error::io("reading the backing file name", e).at("qcow header", 8))?;
        // QEMU stops at a NUL inside the stored length.
        if let Some(nul) = name.iter().position(|&c| c == 0) {
            name.truncate(nul);
        }
        if name.is_empty() {
            return Err(bad(8, "the backing file name is empty"));
        }
        String::from_utf8(name).map_err(|_| bad(at, "the backing file name is not valid UTF-8"))
    }

    /// The wire header of a new image: the L1 table right after the
    /// header and the backing name, 8-byte aligned, as QEMU lays it out.
    pub fn new_wire(
        size: u64,
        cluster_bits: u8,
        l2_bits: u8,
        crypt: CryptMethod,
        backing_name_len: u32,
    ) -> WireHeader {
        let backing_at = if backing_name_len > 0 { HEADER_LEN } else { 0 };
        let l1_at = (HEADER_LEN + backing_name_len as u64).next_multiple_of(8);
        WireHeader {
            magic: MAGIC,
            version: 1,
            backing_file_offset: backing_at,
            backing_file_size: backing_name_len,
            mtime: 0,
            size,
            cluster_bits,
            l2_bits,
            crypt_method: match crypt {
                CryptMethod::None => 0,
                CryptMethod::Aes => 1,
            },
            l1_table_offset: l1_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn image(w: &WireHeader, extra: &[u8]) -> MemStorage {
        let mut b = w.to_bytes().to_vec();
        b.extend_from_slice(extra);
        b.resize(4096, 0);
        MemStorage::from_bytes(&b)
    }

    #[test]
    fn a_header_round_trips_and_names_its_backing_file() {
        let w = QcowHeader::new_wire(10 << 20, 9, 12, CryptMethod::None, 5);
        assert_eq!(w.l1_table_offset, 56);
        let h = QcowHeader::read(&image(&w, b"b.raw")).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("b.raw"));
        assert_eq!(
            (h.cluster_size(), h.l2_entries(), h.l1_size),
            (512, 4096, 5)
        );
        assert_eq!(WireHeader::parse(&w.to_bytes()), w);
    }

    #[test]
    fn fields_out_of_range_are_errors_naming_the_header_and_offset() {
        let good = QcowHeader::new_wire(1 << 20, 12, 9, CryptMethod::None, 0);
        let cases: Vec<(WireHeader, &str)> = vec![
            (
                WireHeader { version: 2, ..good },
                "Unsupported qcow version 2",
            ),
            (
                WireHeader {
                    cluster_bits: 8,
                    ..good
                },
                "between 512 and 64k",
            ),
            (
                WireHeader {
                    cluster_bits: 17,
                    ..good
                },
                "between 512 and 64k",
            ),
            (WireHeader { l2_bits: 5, ..good }, "L2 table size"),
            (
                WireHeader {
                    l2_bits: 14,
                    ..good
                },
                "L2 table size",
            ),
            (
                WireHeader {
                    crypt_method: 2,
                    ..good
                },
                "invalid encryption method",
            ),
            (
                WireHeader {
                    size: u64::MAX,
                    ..good
                },
                "Image too large",
            ),
            (
                WireHeader {
                    size: 1 << 62,
                    l2_bits: 6,
                    cluster_bits: 9,
                    ..good
                },
                "Image too large",
            ),
            (
                WireHeader {
                    l1_table_offset: u64::MAX - 4,
                    ..good
                },
                "overflow",
            ),
            (
                WireHeader {
                    backing_file_offset: 48,
                    backing_file_size: 1024,
                    ..good
                },
                "too long",
            ),
            (
                WireHeader {
                    backing_file_offset: u64::MAX,
                    backing_file_size: 10,
                    ..good
                },
                "overflow",
            ),
            (
                WireHeader {
                    backing_file_offset: 4090,
                    backing_file_size: 100,
                    ..good
                },
                "past the end",
            ),
        ];
        for (w, want) in cases {
            let e = QcowHeader::read(&image(&w, b"")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(want), "{w:?}: {msg}");
            assert!(msg.contains("qcow header"), "{msg}");
        }
        let short = MemStorage::from_bytes(&good.to_bytes()[..40]);
        assert!(QcowHeader::read(&short)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }

    #[test]
    fn probing_tells_qcow_from_qcow2() {
        let w = QcowHeader::new_wire(1 << 20, 12, 9, CryptMethod::None, 0);
        assert!(QcowHeader::probe(&w.to_bytes()));
        let v2 = WireHeader { version: 2, ..w };
        assert!(!QcowHeader::probe(&v2.to_bytes()));
    }
}
