//! The qcow2 header and its extensions: parsing, validation, writing.
//!
//! All multi-byte fields are big-endian. [`RawHeader`] is the header as
//! stored; [`Header`] is the validated form the driver works with.

use super::QcowError;
use crate::error::{Checked, Error, Result};
use crate::storage::Storage;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Largest L1 table imgloop accepts (bytes), as QEMU: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table imgloop accepts (bytes), as QEMU: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size (the spec's limit for 64-bit offsets with flags).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// Incompatible feature bits: an implementation that does not know a set
/// bit must refuse to open the image.
pub mod incompat {
    /// "Dirty bit": refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// "Corrupt bit": metadata is known to be damaged; writes are unsafe.
    pub const CORRUPT: u64 = 1 << 1;
    /// "External data file": guest data lives in a separate file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// "Compression type": the compression_type header field is valid.
    pub const COMPRESSION: u64 = 1 << 3;
    /// "Extended L2 entries": 128-bit L2 entries with 32 subclusters.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit imgloop understands.
    pub const SUPPORTED: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits: may be ignored by readers.
pub mod compat {
    /// "Lazy refcounts": refcount updates may be delayed while dirty.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits: a writer that does not maintain the feature
/// must clear the bit.
pub mod autoclear {
    /// "Bitmaps extension" is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    /// "Raw external data": the data file is a valid raw image by itself.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Bits imgloop keeps consistent itself.
    pub const SUPPORTED: u64 = DATA_FILE_RAW;
}

/// `crypt_method`: legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS.
pub const CRYPT_LUKS: u32 = 2;

/// Header extension type codes.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps extension.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate with a 4 KiB window (type 0, the default).
    Zlib,
    /// Zstandard frames (type 1).
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One header extension as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Type code.
    pub kind: u32,
    /// Payload without padding.
    pub data: Vec<u8>,
}

/// A feature name table entry: (type 0/1/2, bit, name).
pub type FeatureName = (u8, u8, String);

/// The validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (see [`incompat`]).
    pub incompatible_features: u64,
    /// Compatible feature bits (see [`compat`]).
    pub compatible_features: u64,
    /// Autoclear feature bits (see [`autoclear`]).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the fixed header (72 for v2, at least 104 for v3).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Header extensions, in file order (the end marker excluded).
    pub extensions: Vec<Extension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

/// An invalid header field (`field` at byte `offset` holds `value`).
fn bad_field(field: &'static str, offset: u64, value: u64, why: &'static str) -> Error {
    QcowError::Field {
        field,
        offset,
        value,
        why,
    }
    .into()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// An external data file is in use.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// The data file is raw-consistent.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Bytes of one L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries of one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// The payload of the first extension of `kind`.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Replaces (or removes, with `None`) the extension of `kind`.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        let pos = self.extensions.iter().position(|e| e.kind == kind);
        match (pos, data) {
            (Some(i), Some(d)) => self.extensions[i].data = d,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(d)) => self.extensions.push(Extension { kind, data: d }),
            (None, None) => {}
        }
    }

    /// Offset and length of the LUKS header in the image file (the full
    /// disk encryption header extension), when there is one.
    pub fn crypto_header(&self) -> Option<(u64, u64)> {
        let d = self.extension(ext::CRYPTO)?;
        (d.len() == 16).then(|| {
            (
                u64::from_be_bytes(d[0..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(d[8..16].try_into().expect("8 bytes")),
            )
        })
    }

    /// The backing format from its extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(ext::BACKING_FORMAT).map(|d| {
            String::from_utf8_lossy(d)
                .trim_end_matches('\0')
                .to_string()
        })
    }

    /// The external data file name from its extension.
    pub fn data_file_name(&self) -> Option<String> {
        self.extension(ext::DATA_FILE).map(|d| {
            String::from_utf8_lossy(d)
                .trim_end_matches('\0')
                .to_string()
        })
    }

    /// Feature names from the feature name table.
    pub fn feature_names(&self) -> Vec<FeatureName> {
        let Some(d) = self.extension(ext::FEATURE_TABLE) else {
            return Vec::new();
        };
        d.chunks_exact(48)
            .map(|e| {
                let name = String::from_utf8_lossy(&e[2..]);
                (e[0], e[1], name.trim_end_matches('\0').to_string())
            })
            .collect()
    }

    /// Reads and validates the header of the image on `storage`.
    pub fn read(storage: &dyn Storage) -> Result<Header> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading image size", e))?;
        if file_len < 72 {
            return Err(QcowError::Truncated {
                what: "header",
                offset: 0,
                need: 72,
                have: file_len,
            }
            .into());
        }
        let mut b = vec![0u8; (file_len.min(4096)) as usize];
        storage
            .read_at(&mut b, 0)
            .map_err(|e| Error::io("reading the header", e).at("header", 0))?;
        if be32(&b, 0) != MAGIC {
            return Err(Error::invalid_format(
                "header",
                0,
                "not a qcow2 image (bad magic)",
            ));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(QcowError::Unsupported(format!("qcow2 version {version}")).into());
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits: be32(&b, 20),
            size: be64(&b, 24),
            crypt_method: be32(&b, 32),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Zlib,
            extensions: Vec::new(),
            backing_file: None,
        };
        if !(9..=21).contains(&h.cluster_bits) {
            return Err(bad_field(
                "cluster_bits",
                20,
                h.cluster_bits as u64,
                "must be between 9 (512 B) and 21 (2 MiB)",
            ));
        }
        let cs = h.cluster_size();
        if version == 3 {
            if b.len() < 104 {
                return Err(QcowError::Truncated {
                    what: "version 3 header",
                    offset: 0,
                    need: 104,
                    have: b.len() as u64,
                }
                .into());
            }
            h.incompatible_features = be64(&b, 72);
            h.compatible_features = be64(&b, 80);
            h.autoclear_features = be64(&b, 88);
            h.refcount_order = be32(&b, 96);
            h.header_length = be32(&b, 100);
            if h.header_length < 104 || h.header_length as u64 > cs.min(b.len() as u64) {
                return Err(bad_field(
                    "header_length",
                    100,
                    h.header_length as u64,
                    "must be at least 104 and fit in the first cluster",
                ));
            }
            if h.header_length > 104 {
                h.compression_type = match b[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(bad_field(
                            "compression_type",
                            104,
                            other as u64,
                            "unknown compression type",
                        ))
                    }
                };
            }
            if h.compression_type != CompressionType::Zlib
                && h.incompatible_features & incompat::COMPRESSION == 0
            {
                return Err(bad_field(
                    "compression_type",
                    104,
                    1,
                    "set without the compression type feature bit",
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad_field(
                "refcount_order",
                96,
                h.refcount_order as u64,
                "must be at most 6 (64-bit refcounts)",
            ));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(bad_field("size", 24, h.size, "virtual size is too large"));
        }
        // Extensions: from the end of the fixed header to the end of the
        // first cluster (or the backing file name, whichever comes first).
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cs)
        } else {
            cs
        }
        .min(b.len() as u64) as usize;
        let mut pos = h.header_length as usize;
        loop {
            if pos + 8 > ext_end {
                break;
            }
            let kind = be32(&b, pos);
            let len = be32(&b, pos + 4) as usize;
            if kind == ext::END {
                break;
            }
            let data_end = pos + 8 + len;
            if data_end > ext_end {
                return Err(bad_field(
                    "header extension length",
                    pos as u64 + 4,
                    len as u64,
                    "extends past the end of the header cluster",
                ));
            }
            h.extensions.push(Extension {
                kind,
                data: b[pos + 8..data_end].to_vec(),
            });
            pos = (data_end + 7) & !7;
        }
        let unknown = h.incompatible_features & !incompat::SUPPORTED;
        if unknown != 0 {
            let names = h.feature_names();
            let list: Vec<String> = (0..64)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| {
                    names
                        .iter()
                        .find(|(t, b, _)| *t == 0 && *b as u64 == bit)
                        .map(|(_, _, n)| format!("'{n}'"))
                        .unwrap_or_else(|| format!("unknown feature bit {bit}"))
                })
                .collect();
            return Err(QcowError::Unsupported(format!(
                "incompatible features {}",
                list.join(", ")
            ))
            .into());
        }
        if h.crypt_method > CRYPT_LUKS {
            return Err(QcowError::Unsupported(format!(
                "Unsupported encryption method {}",
                h.crypt_method
            ))
            .into());
        }
        match (h.extension(ext::CRYPTO), h.crypt_method) {
            (Some(_), m) if m != CRYPT_LUKS => {
                return Err(Error::invalid_format(
                    "header extension",
                    0,
                    "CRYPTO header extension only expected with LUKS encryption method",
                ))
            }
            (Some(d), _) if d.len() != 16 => {
                return Err(Error::invalid_format(
                    "header extension",
                    0,
                    format!(
                        "CRYPTO header extension size {}, but expected size 16",
                        d.len()
                    ),
                ))
            }
            (None, CRYPT_LUKS) => {
                return Err(Error::invalid_format(
                    "header",
                    32,
                    "Missing CRYPTO header for crypt method 2",
                ))
            }
            _ => {}
        }
        if let Some((off, _)) = h.crypto_header() {
            if off == 0 || !off.is_multiple_of(h.cluster_size()) {
                return Err(Error::invalid_format(
                    "header extension",
                    0,
                    format!(
                        "Encryption header offset '{off}' is not a multiple of cluster size '{}'",
                        h.cluster_size()
                    ),
                ));
            }
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size == 0 || h.backing_file_size > MAX_BACKING_NAME {
                return Err(bad_field(
                    "backing_file_size",
                    16,
                    h.backing_file_size as u64,
                    "backing file name length must be 1 to 1023",
                ));
            }
            let end = Checked::of("header", 8).add(
                h.backing_file_offset,
                h.backing_file_size as u64,
                "backing_file_offset + backing_file_size",
            )?;
            if end > cs || end > file_len {
                return Err(bad_field(
                    "backing_file_offset",
                    8,
                    h.backing_file_offset,
                    "backing file name lies outside the header cluster",
                ));
            }
            let mut name = vec![0u8; h.backing_file_size as usize];
            storage
                .read_at(&mut name, h.backing_file_offset)
                .map_err(|e| Error::io("reading the backing file name", e))?;
            h.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
        }
        h.validate_tables(file_len)?;
        Ok(h)
    }

    /// Checks table offsets and sizes.
    fn validate_tables(&self, _file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let aligned = |v: u64| v.is_multiple_of(cs);
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(bad_field(
                "l1_size",
                36,
                self.l1_size as u64,
                "L1 table is larger than 32 MiB",
            ));
        }
        let per_l1 = cs * self.l2_entries();
        let needed = self.size.div_ceil(per_l1);
        if (self.l1_size as u64) < needed {
            return Err(bad_field(
                "l1_size",
                36,
                self.l1_size as u64,
                "L1 table is too small for the virtual size",
            ));
        }
        if !aligned(self.l1_table_offset) || (self.l1_size > 0 && self.l1_table_offset == 0) {
            return Err(bad_field(
                "l1_table_offset",
                40,
                self.l1_table_offset,
                "L1 table offset is not cluster-aligned",
            ));
        }
        if !aligned(self.refcount_table_offset) || self.refcount_table_offset == 0 {
            return Err(bad_field(
                "refcount_table_offset",
                48,
                self.refcount_table_offset,
                "refcount table offset is not a non-zero multiple of the cluster size",
            ));
        }
        if self.refcount_table_clusters == 0
            || self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES
        {
            return Err(bad_field(
                "refcount_table_clusters",
                56,
                self.refcount_table_clusters as u64,
                "refcount table must be 1 cluster to 8 MiB",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad_field(
                "nb_snapshots",
                60,
                self.nb_snapshots as u64,
                "too many snapshots",
            ));
        }
        if self.nb_snapshots > 0 && !aligned(self.snapshots_offset) {
            return Err(bad_field(
                "snapshots_offset",
                64,
                self.snapshots_offset,
                "snapshot table offset is not cluster-aligned",
            ));
        }
        // Tables must not overlap the header cluster.
        for (field, off, at) in [
            ("l1_table_offset", self.l1_table_offset, 40),
            ("refcount_table_offset", self.refcount_table_offset, 48),
        ] {
            if off < cs && !(field == "l1_table_offset" && self.l1_size == 0) {
                return Err(QcowError::Field {
                    field,
                    offset: at,
                    value: off,
                    why: "table overlaps the header",
                }
                .into());
            }
        }
        Ok(())
    }

    /// Serializes the header cluster's content: fixed header, extensions,
    /// end marker, backing file name. The feature name table is optional
    /// and left out when it does not fit (as QEMU leaves it out); fails if
    /// the rest does not fit one cluster.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match self.to_bytes_with(true) {
            Err(_) if self.extension(ext::FEATURE_TABLE).is_some() => self.to_bytes_with(false),
            r => r,
        }
    }

    fn to_bytes_with(&self, feature_table: bool) -> Result<Vec<u8>> {
        let mut b = vec![0u8; if self.version == 2 { 72 } else { 112 }];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        // backing offset is filled in below
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&112u32.to_be_bytes());
            b[104] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
        }
        for e in &self.extensions {
            if (self.version == 2 || !feature_table) && e.kind == ext::FEATURE_TABLE {
                continue;
            }
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            while b.len() % 8 != 0 {
                b.push(0);
            }
        }
        b.extend_from_slice(&[0u8; 8]);
        let mut backing_off = 0u64;
        if let Some(name) = &self.backing_file {
            backing_off = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
        }
        b[8..16].copy_from_slice(&backing_off.to_be_bytes());
        if b.len() as u64 > self.cluster_size() {
            return Err(QcowError::Unsupported(
                "header, extensions and backing file name do not fit in one cluster".into(),
            )
            .into());
        }
        Ok(b)
    }
}

/// The feature name table imgloop writes into new v3 images.
pub fn default_feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut d = Vec::with_capacity(names.len() * 48);
    for (t, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        d.extend_from_slice(&e);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            extensions: vec![Extension {
                kind: ext::FEATURE_TABLE,
                data: default_feature_table(),
            }],
            backing_file: None,
        }
    }

    fn roundtrip(h: &Header) -> Result<Header> {
        let mem = MemStorage::from_bytes(&h.to_bytes().unwrap());
        mem.set_len(4 << 16).unwrap();
        Header::read(&mem)
    }

    #[test]
    fn a_written_header_reads_back_identically() {
        let mut h = sample();
        h.backing_file = Some("base.raw".into());
        h.backing_file_size = 8;
        h.set_extension(ext::BACKING_FORMAT, Some(b"raw".to_vec()));
        let back = roundtrip(&h).unwrap();
        assert_eq!(back.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(back.backing_format().as_deref(), Some("raw"));
        assert_eq!(back.feature_names().len(), 8);
        let mut expect = h.clone();
        expect.backing_file_offset = back.backing_file_offset;
        assert_eq!(back, expect);
    }

    #[test]
    fn cluster_bits_outside_9_to_21_are_refused_naming_the_field() {
        for bits in [8u32, 22] {
            let mut bytes = sample().to_bytes().unwrap();
            bytes[20..24].copy_from_slice(&bits.to_be_bytes());
            let mem = MemStorage::from_bytes(&bytes);
            mem.set_len(4 << 16).unwrap();
            let e = Header::read(&mem).unwrap_err();
            assert!(e.to_string().contains("cluster_bits"), "{e}");
        }
    }

    #[test]
    fn an_unknown_incompatible_bit_is_refused_by_its_table_name() {
        let mut h = sample();
        h.incompatible_features = 1 << 7;
        let mut table = default_feature_table();
        let mut e = [0u8; 48];
        e[1] = 7;
        e[2..9].copy_from_slice(b"foo bar");
        table.extend_from_slice(&e);
        h.set_extension(ext::FEATURE_TABLE, Some(table));
        let err = roundtrip(&h).unwrap_err();
        assert!(err.to_string().contains("'foo bar'"), "{err}");
        h.set_extension(ext::FEATURE_TABLE, None);
        let err = roundtrip(&h).unwrap_err();
        assert!(err.to_string().contains("unknown feature bit 7"), "{err}");
    }

    #[test]
    fn huge_tables_from_the_header_are_refused_before_allocation() {
        let mut h = sample();
        h.l1_size = u32::MAX;
        assert!(roundtrip(&h).unwrap_err().to_string().contains("l1_size"));
        let mut h = sample();
        h.refcount_table_clusters = u32::MAX;
        assert!(roundtrip(&h)
            .unwrap_err()
            .to_string()
            .contains("refcount_table_clusters"));
        let mut h = sample();
        h.refcount_table_offset = 0;
        assert!(roundtrip(&h).is_err());
    }

    #[test]
    fn a_truncated_header_is_an_error() {
        let mem = MemStorage::from_bytes(&sample().to_bytes().unwrap()[..50]);
        let e = Header::read(&mem).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn a_backing_name_offset_near_2_to_the_64_is_an_error_not_an_overflow() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[8..16].copy_from_slice(&(u64::MAX - 3).to_be_bytes());
        bytes[16..20].copy_from_slice(&100u32.to_be_bytes());
        let mem = MemStorage::from_bytes(&bytes);
        mem.set_len(4 << 16).unwrap();
        let e = Header::read(&mem).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidFormat);
        assert!(e.to_string().contains("backing_file_offset"), "{e}");
    }
}
