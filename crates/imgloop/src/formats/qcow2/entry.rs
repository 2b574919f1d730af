//! L1 and L2 table entries: bit layouts and decoding.

/// "Bits 9-55 of L1 entries: offset of the L2 table" (cluster-aligned).
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Bits 9-55 of standard L2 entries: host cluster offset".
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Bit 63: 0 for a cluster that is unused or requires COW, 1 if its
/// refcount is exactly one" (L1 and standard L2 entries).
pub const COPIED: u64 = 1 << 63;
/// "Bit 62: 0 for standard clusters, 1 for compressed clusters".
pub const COMPRESSED: u64 = 1 << 62;
/// "Bit 0 of a standard L2 entry: the cluster reads as all zeros" (v3).
pub const ZERO: u64 = 1;
/// Reserved bits of a standard L2 entry (1-8 and 56-61) that must be 0.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of an L1 entry (0-8 and 56-62) that must be 0.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Extended L2 bitmap: all subclusters allocated.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Extended L2 bitmap: all subclusters read as zero.
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// What one L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: backing image or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is kept for reuse when preallocated.
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<u64>,
        /// The entry's COPIED flag.
        copied: bool,
    },
    /// Plain data at `host`.
    Normal {
        /// Host cluster offset.
        host: u64,
        /// The entry's COPIED flag (refcount is exactly 1).
        copied: bool,
    },
    /// Compressed data of `len` bytes at byte offset `host`.
    Compressed {
        /// Byte offset of the compressed stream in the image file.
        host: u64,
        /// Upper bound of the compressed stream's length.
        len: u64,
    },
}

impl Cluster {
    /// The host cluster this entry owns (for refcounting), if any.
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            Cluster::Normal { host, .. } => Some(host),
            Cluster::Zero { host, .. } => host,
            _ => None,
        }
    }
}

/// Why an entry is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// Reserved bits set.
    Reserved,
    /// Host offset not aligned to a cluster.
    Unaligned,
    /// A zero flag in a version 2 image.
    ZeroInV2,
    /// Extended L2 bitmap marks a subcluster both allocated and zero, or
    /// has allocated subclusters without a host cluster.
    Bitmap,
}

impl EntryError {
    /// A description for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            EntryError::Reserved => "reserved bits are set",
            EntryError::Unaligned => "host offset is not cluster-aligned",
            EntryError::ZeroInV2 => "zero flag in a version 2 image",
            EntryError::Bitmap => "invalid subcluster bitmap",
        }
    }
}

/// Number of bits of the host offset in a compressed descriptor:
/// "x = 62 - (cluster_bits - 8)".
pub fn compressed_offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// Decodes an L2 entry (and, with extended L2, its bitmap) of an image
/// without an external data file.
pub fn decode(
    entry: u64,
    bitmap: u64,
    cluster_bits: u32,
    ext_l2: bool,
    v3: bool,
) -> Result<Cluster, EntryError> {
    decode_in(entry, bitmap, cluster_bits, ext_l2, v3, false)
}

/// Decodes an L2 entry. With an external data file (`data_file`), host
/// offset 0 with the COPIED bit set is guest cluster 0 stored at offset 0
/// of the data file ("the offset may only be 0 with bit 63 set when an
/// external data file is used"); otherwise offset 0 means unallocated.
pub fn decode_in(
    entry: u64,
    bitmap: u64,
    cluster_bits: u32,
    ext_l2: bool,
    v3: bool,
    data_file: bool,
) -> Result<Cluster, EntryError> {
    let cs = 1u64 << cluster_bits;
    if entry & COMPRESSED != 0 {
        let x = compressed_offset_bits(cluster_bits);
        let host = entry & ((1u64 << x) - 1);
        let sectors = (entry & !COMPRESSED & !COPIED) >> x;
        // The stream ends at the end of the sector holding `host` plus
        // `sectors` more 512-byte sectors.
        let end = (host & !511) + (sectors + 1) * 512;
        return Ok(Cluster::Compressed {
            host,
            len: end - host,
        });
    }
    if entry & L2_RESERVED != 0 {
        return Err(EntryError::Reserved);
    }
    let host = entry & L2_OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if !host.is_multiple_of(cs) {
        return Err(EntryError::Unaligned);
    }
    // Host offset 0 of an external data file is a real location.
    let at_zero = host == 0 && !(data_file && copied);
    if ext_l2 {
        // The per-subcluster bitmap decides; the entry's zero bit is unused.
        if bitmap & (bitmap >> 32) & ALL_ALLOC != 0 {
            return Err(EntryError::Bitmap);
        }
        if at_zero {
            if bitmap & ALL_ALLOC != 0 {
                return Err(EntryError::Bitmap);
            }
            return Ok(if bitmap == 0 {
                Cluster::Unallocated
            } else {
                Cluster::Zero { host: None, copied }
            });
        }
        return Ok(Cluster::Normal { host, copied });
    }
    if entry & ZERO != 0 {
        if !v3 {
            return Err(EntryError::ZeroInV2);
        }
        return Ok(Cluster::Zero {
            host: (!at_zero).then_some(host),
            copied,
        });
    }
    if at_zero {
        return Ok(Cluster::Unallocated);
    }
    Ok(Cluster::Normal { host, copied })
}

/// Builds a compressed cluster descriptor for `len` bytes at byte `host`.
pub fn encode_compressed(host: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = compressed_offset_bits(cluster_bits);
    let sectors = ((host + len - 1) >> 9) - (host >> 9);
    COMPRESSED | (sectors << x) | host
}

/// State of one subcluster in an extended L2 bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    /// Data at the cluster's host offset.
    Data,
    /// Reads as zeroes.
    Zero,
    /// Not allocated (backing image).
    Unallocated,
}

/// State of subcluster `i` (0..32).
pub fn subcluster(bitmap: u64, i: u32) -> Sub {
    if bitmap & (1 << i) != 0 {
        Sub::Data
    } else if bitmap & (1 << (32 + i)) != 0 {
        Sub::Zero
    } else {
        Sub::Unallocated
    }
}

/// Bitmap with subclusters `first..last` (exclusive) set to `state`.
pub fn set_subclusters(bitmap: u64, first: u32, last: u32, state: Sub) -> u64 {
    let mask = if last - first >= 32 {
        ALL_ALLOC
    } else {
        ((1u64 << (last - first)) - 1) << first
    };
    let cleared = bitmap & !mask & !(mask << 32);
    match state {
        Sub::Data => cleared | mask,
        Sub::Zero => cleared | (mask << 32),
        Sub::Unallocated => cleared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries_decode_by_their_flags() {
        assert_eq!(decode(0, 0, 16, false, true), Ok(Cluster::Unallocated));
        assert_eq!(
            decode(COPIED | 0x30000, 0, 16, false, true),
            Ok(Cluster::Normal {
                host: 0x30000,
                copied: true
            })
        );
        assert_eq!(
            decode(ZERO, 0, 16, false, true),
            Ok(Cluster::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(decode(ZERO, 0, 16, false, false), Err(EntryError::ZeroInV2));
        assert_eq!(
            decode(0x30200, 0, 16, false, true),
            Err(EntryError::Unaligned)
        );
        assert_eq!(
            decode(0x30002, 0, 16, false, true),
            Err(EntryError::Reserved)
        );
    }

    #[test]
    fn host_offset_0_is_allocated_only_in_an_external_data_file_with_copied_set() {
        for ext in [false, true] {
            let bm = if ext { ALL_ALLOC } else { 0 };
            assert_eq!(
                decode_in(COPIED, bm, 16, ext, true, true),
                Ok(Cluster::Normal {
                    host: 0,
                    copied: true
                }),
                "ext {ext}"
            );
            // Without COPIED (or without a data file) it stays unallocated.
            assert_eq!(
                decode_in(0, 0, 16, ext, true, true),
                Ok(Cluster::Unallocated)
            );
            assert_eq!(
                decode_in(COPIED, 0, 16, ext, true, false),
                Ok(Cluster::Unallocated)
            );
        }
        assert_eq!(
            decode_in(COPIED | ZERO, 0, 16, false, true, true),
            Ok(Cluster::Zero {
                host: Some(0),
                copied: true
            })
        );
        assert_eq!(
            decode_in(COPIED, 1, 16, true, true, false),
            Err(EntryError::Bitmap)
        );
    }

    #[test]
    fn compressed_descriptors_round_trip() {
        for bits in [9u32, 12, 16, 21] {
            let host = 0x12_3456_7a01 & ((1u64 << compressed_offset_bits(bits)) - 1);
            let len = 700;
            let e = encode_compressed(host, len, bits);
            match decode(e, 0, bits, false, true).unwrap() {
                Cluster::Compressed { host: h, len: l } => {
                    assert_eq!(h, host);
                    assert!(l >= len && l < len + 512, "bits {bits}: {l}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn subcluster_bitmaps_set_and_read_ranges() {
        let b = set_subclusters(0, 0, 32, Sub::Zero);
        assert_eq!(b, ALL_ZERO);
        let b = set_subclusters(b, 3, 5, Sub::Data);
        assert_eq!(subcluster(b, 2), Sub::Zero);
        assert_eq!(subcluster(b, 3), Sub::Data);
        assert_eq!(subcluster(b, 4), Sub::Data);
        assert_eq!(subcluster(b, 5), Sub::Zero);
        let b = set_subclusters(b, 4, 6, Sub::Unallocated);
        assert_eq!(subcluster(b, 4), Sub::Unallocated);
        assert_eq!(subcluster(b, 5), Sub::Unallocated);
        assert_eq!(
            decode(0x30000, b, 16, true, true),
            Ok(Cluster::Normal {
                host: 0x30000,
                copied: false
            })
        );
        assert_eq!(decode(0, 1, 16, true, true), Err(EntryError::Bitmap));
        assert_eq!(
            decode(0x30000, 1 | (1 << 32), 16, true, true),
            Err(EntryError::Bitmap)
        );
    }
}
