//! The version-2 format extension: one cluster at `ext_off` holding a
//! magic, an MD5 of the rest of the cluster and a list of features; the
//! one feature defined is a dirty bitmap, whose L1 table names clusters
//! with its bits (or 0 / 1 for all-clear / all-set parts).
//!
//! imgloop reads it (bitmaps are listed by `info`) and keeps its clusters
//! out of the way of new data. The first write of a session detaches it
//! (`ext_off = 0`): the bitmaps would no longer say which parts changed.

use super::header::{Header, SECTOR};
use crate::driver::ParallelsBitmap;
use crate::error::{Error, Result};
use crate::storage::Storage;
use md5::{Digest, Md5};

/// Magic of the extension cluster.
pub const EXT_MAGIC: u64 = 0xab23_4cef_23dc_ea87;
/// Magic of a dirty-bitmap feature.
pub const BITMAP_MAGIC: u64 = 0x2038_5fae_252c_b34a;
/// Bytes of a feature header (magic, flags, data size, padding).
const FEATURE_HEADER: usize = 24;
/// Bytes of a bitmap feature before its L1 table.
const BITMAP_HEADER: usize = 32;

/// One dirty bitmap of the extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name: the UUID of the feature.
    pub id: String,
    /// Bytes of disk per bit.
    pub granularity: u64,
}

/// The format extension as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// The dirty bitmaps.
    pub bitmaps: Vec<Bitmap>,
    /// File ranges (offset, length) it uses: its own cluster and the
    /// bitmaps' data clusters.
    pub clusters: Vec<(u64, u64)>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn uuid_text(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Extension {
    /// Reads the extension at sector `ext_off` of an image with `header`.
    /// Errors say what is wrong; the caller decides what that means.
    pub fn read(storage: &dyn Storage, ext_off: u64, header: &Header) -> Result<Extension> {
        let cs = header.cluster_size;
        let at = ext_off * SECTOR;
        let bad = |msg: String| Error::invalid_format("Parallels format extension", at, msg);
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        if at.checked_add(cs).is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "the extension cluster at byte {at} is not inside the file ({file_len} bytes)"
            )));
        }
        let mut c = vec![0u8; cs as usize];
        storage
            .read_at(&mut c, at)
            .map_err(|e| Error::io("reading the Parallels format extension", e))?;
        let magic = le64(&c, 0);
        if magic != EXT_MAGIC {
            return Err(bad(format!(
                "Wrong parallels Format Extension magic: {magic:#x}, expected: {EXT_MAGIC:#x}"
            )));
        }
        let digest = Md5::digest(&c[24..]);
        if digest[..] != c[8..24] {
            return Err(bad(
                "Wrong checksum in Format Extension header. Format extension is corrupted.".into(),
            ));
        }
        let mut x = Extension {
            bitmaps: Vec::new(),
            clusters: vec![(at, cs)],
        };
        let mut pos = 24usize;
        loop {
            if c.len() - pos < FEATURE_HEADER {
                return Err(bad(format!(
                    "no end marker: {} bytes left for a feature header of {FEATURE_HEADER}",
                    c.len() - pos
                )));
            }
            let magic = le64(&c, pos);
            let flags = le64(&c, pos + 8);
            let size = le32(&c, pos + 16) as usize;
            if magic == 0 {
                return Ok(x);
            }
            if flags != 0 {
                return Err(bad("Flags for extension feature are unsupported".into()));
            }
            let data = pos + FEATURE_HEADER;
            if size > c.len() - data {
                return Err(bad(
                    "Feature data_size exceeds Format Extension cluster".into()
                ));
            }
            match magic {
                BITMAP_MAGIC => x.read_bitmap(&c[data..data + size], header, file_len, &bad)?,
                m => return Err(bad(format!("Unknown feature: {m:#x}"))),
            }
            pos = (data + size).next_multiple_of(8);
        }
    }

    fn read_bitmap(
        &mut self,
        d: &[u8],
        header: &Header,
        file_len: u64,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<()> {
        if d.len() < BITMAP_HEADER {
            return Err(bad(format!(
                "Too small Bitmap Feature area in Parallels Format Extension: {} bytes, expected at least {BITMAP_HEADER} bytes",
                d.len()
            )));
        }
        let sectors = le64(d, 0);
        let disk_sectors = header.size / SECTOR;
        if sectors != disk_sectors {
            return Err(bad(format!(
                "Bitmap size (in sectors) {sectors} differs from disk size in sectors {disk_sectors}"
            )));
        }
        let granularity = le32(d, 24) as u64;
        if granularity == 0 || !granularity.is_power_of_two() {
            return Err(bad(format!(
                "bitmap granularity of {granularity} sectors is not a power of two"
            )));
        }
        let l1_size = le32(d, 28) as usize;
        if l1_size > (d.len() - BITMAP_HEADER) / 8 {
            return Err(bad(
                "Bitmaps feature corrupted: l1 table exceeds extension data_size".into(),
            ));
        }
        let cs = header.cluster_size;
        // One bit per granule, in clusters of bits.
        let granules = disk_sectors.div_ceil(granularity);
        let want = granules.div_ceil(8).div_ceil(cs);
        if l1_size as u64 != want {
            return Err(bad(format!(
                "Bitmap table size {l1_size} does not correspond to bitmap size and cluster size. Expected {want}"
            )));
        }
        for k in 0..l1_size {
            let e = le64(d, BITMAP_HEADER + 8 * k);
            if e <= 1 {
                continue;
            }
            let at = e
                .checked_mul(SECTOR)
                .filter(|&a| a.checked_add(cs).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    bad(format!(
                        "bitmap table entry {k} ({e}) points outside the file"
                    ))
                })?;
            self.clusters.push((at, cs));
        }
        self.bitmaps.push(Bitmap {
            id: uuid_text(&d[8..24]),
            granularity: granularity * SECTOR,
        });
        Ok(())
    }

    /// The bitmaps as `info` lists them.
    pub fn bitmap_infos(&self) -> Vec<ParallelsBitmap> {
        self.bitmaps
            .iter()
            .map(|b| ParallelsBitmap {
                name: b.id.clone(),
                granularity: b.granularity,
            })
            .collect()
    }
}

/// Builds an extension cluster (one cluster of `header`'s size) holding
/// one dirty bitmap with L1 table `l1` (0: clear, 1: all set, else the
/// sector of a cluster of bits), for tests and hand-made images.
pub fn build_bitmap_extension(
    header: &Header,
    id: [u8; 16],
    granularity_sectors: u32,
    l1: &[u64],
) -> Vec<u8> {
    let cs = header.cluster_size as usize;
    let mut c = vec![0u8; cs];
    c[0..8].copy_from_slice(&EXT_MAGIC.to_le_bytes());
    let mut pos = 24;
    c[pos..pos + 8].copy_from_slice(&BITMAP_MAGIC.to_le_bytes());
    let size = BITMAP_HEADER + 8 * l1.len();
    c[pos + 16..pos + 20].copy_from_slice(&(size as u32).to_le_bytes());
    pos += FEATURE_HEADER;
    c[pos..pos + 8].copy_from_slice(&(header.size / SECTOR).to_le_bytes());
    c[pos + 8..pos + 24].copy_from_slice(&id);
    c[pos + 24..pos + 28].copy_from_slice(&granularity_sectors.to_le_bytes());
    c[pos + 28..pos + 32].copy_from_slice(&(l1.len() as u32).to_le_bytes());
    for (k, e) in l1.iter().enumerate() {
        let at = pos + BITMAP_HEADER + 8 * k;
        c[at..at + 8].copy_from_slice(&e.to_le_bytes());
    }
    // The end marker is the zeroes that follow.
    let digest = Md5::digest(&c[24..]);
    c[8..24].copy_from_slice(&digest);
    c
}
