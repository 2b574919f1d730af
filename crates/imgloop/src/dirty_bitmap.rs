//! An in-memory dirty bitmap: one bit per `granularity` bytes of disk,
//! set where the disk changed. Bit `k` stands for bytes
//! `k * granularity ..` and is bit `k % 8` of byte `k / 8`, the order in
//! which qcow2 stores bitmap data, so bytes go to and from the image
//! unchanged.

use crate::error::{Error, Result};

/// A dirty bitmap over a disk of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Bytes of disk one bit stands for (a power of two).
    granularity: u64,
    /// Bytes of disk covered.
    size: u64,
    /// The bits, least significant first in each byte.
    bytes: Vec<u8>,
}

/// Most bytes of bits one bitmap may take (QEMU's 512 MiB limit on
/// bitmap data).
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;

impl DirtyBitmap {
    /// A clean bitmap for `size` bytes at `granularity` bytes per bit.
    pub fn new(size: u64, granularity: u64) -> Result<DirtyBitmap> {
        let n = Self::byte_len(size, granularity)?;
        Ok(DirtyBitmap {
            granularity,
            size,
            bytes: vec![0; n],
        })
    }

    /// A bitmap with these bits (`bytes` longer than needed is cut, shorter
    /// is padded with clean bits).
    pub fn from_bytes(size: u64, granularity: u64, mut bytes: Vec<u8>) -> Result<DirtyBitmap> {
        let n = Self::byte_len(size, granularity)?;
        bytes.resize(n, 0);
        let mut b = DirtyBitmap {
            granularity,
            size,
            bytes,
        };
        b.clear_tail();
        Ok(b)
    }

    fn byte_len(size: u64, granularity: u64) -> Result<usize> {
        if !granularity.is_power_of_two() {
            return Err(Error::invalid_argument(format!(
                "bitmap granularity {granularity} is not a power of two"
            )));
        }
        let n = size.div_ceil(granularity).div_ceil(8);
        if n > MAX_BITMAP_BYTES {
            return Err(Error::invalid_argument(
                "the bitmap would be too large (more than 512 MiB of bits)",
            ));
        }
        Ok(n as usize)
    }

    /// Bits past the last chunk of the disk are clean.
    fn clear_tail(&mut self) {
        let bits = self.size.div_ceil(self.granularity);
        let full = (bits / 8) as usize;
        if let Some(last) = self.bytes.get_mut(full) {
            let keep = (bits % 8) as u32;
            *last &= ((1u16 << keep) - 1) as u8;
            for b in &mut self.bytes[full + 1..] {
                *b = 0;
            }
        }
    }

    /// Bytes of disk per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Bytes of disk covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bits as stored (least significant bit first).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn bit(&self, k: u64) -> bool {
        self.bytes
            .get((k / 8) as usize)
            .is_some_and(|b| b & (1 << (k % 8)) != 0)
    }

    /// Marks every chunk that `offset..offset + len` touches as dirty
    /// (clipped to the disk).
    pub fn set(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let (first, last) = (offset / self.granularity, (end - 1) / self.granularity);
        let mut k = first;
        while k <= last {
            if k.is_multiple_of(8) && k + 8 <= last + 1 {
                self.bytes[(k / 8) as usize] = 0xff;
                k += 8;
            } else {
                self.bytes[(k / 8) as usize] |= 1 << (k % 8);
                k += 1;
            }
        }
    }

    /// Whether the byte at `offset` is in a dirty chunk.
    pub fn is_dirty(&self, offset: u64) -> bool {
        offset < self.size && self.bit(offset / self.granularity)
    }

    /// From `offset`: whether it is dirty and how many bytes (at most
    /// `max_len`, not past the disk) share that state.
    pub fn status(&self, offset: u64, max_len: u64) -> (bool, u64) {
        let end = offset.saturating_add(max_len).min(self.size);
        if offset >= end {
            return (false, 0);
        }
        let dirty = self.is_dirty(offset);
        let mut k = offset / self.granularity + 1;
        let last = (end - 1) / self.granularity;
        while k <= last {
            let byte = self.bytes[(k / 8) as usize];
            if k.is_multiple_of(8) && byte == if dirty { 0xff } else { 0 } {
                k += 8;
                continue;
            }
            if self.bit(k) != dirty {
                break;
            }
            k += 1;
        }
        let run_end = k.saturating_mul(self.granularity).min(end);
        (dirty, run_end - offset)
    }

    /// The dirty ranges, in order, as (offset, length).
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let (dirty, n) = self.status(pos, self.size - pos);
            if dirty {
                out.push((pos, n));
            }
            pos += n;
        }
        out
    }

    /// True when no bit is set.
    pub fn is_clean(&self) -> bool {
        self.bytes.iter().all(|&b| b == 0)
    }

    /// Sets every chunk `other` has dirty (the granularities may differ;
    /// a coarser chunk here is dirty when any part of it is).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if other.granularity == self.granularity && other.size == self.size {
            for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
                *a |= b;
            }
            return;
        }
        for (off, len) in other.dirty_ranges() {
            self.set(off, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_status_follow_chunks_and_clip_to_the_disk() {
        let mut b = DirtyBitmap::new(1 << 20, 64 << 10).unwrap();
        assert!(b.is_clean());
        assert_eq!(b.status(0, 1 << 20), (false, 1 << 20));
        b.set(65536 + 10, 1);
        assert_eq!(b.status(0, 1 << 20), (false, 65536));
        assert_eq!(b.status(65536, 1 << 20), (true, 65536));
        assert_eq!(b.status(65536 + 100, 10), (true, 10));
        b.set(0, 1 << 40);
        assert_eq!(b.status(0, u64::MAX), (true, 1 << 20));
        assert_eq!(b.dirty_ranges(), vec![(0, 1 << 20)]);
        // A disk that is not a whole number of chunks.
        let mut b = DirtyBitmap::new(100_000, 512).unwrap();
        b.set(99_999, 5);
        assert_eq!(b.dirty_ranges(), vec![(99_840, 160)]);
        let long = DirtyBitmap::from_bytes(1024, 512, vec![0xff; 4]).unwrap();
        assert_eq!(long.as_bytes(), &[0b11]);
    }

    #[test]
    fn long_runs_are_found_across_whole_bytes() {
        let mut b = DirtyBitmap::new(1 << 30, 512).unwrap();
        b.set(512 * 7, 512 * 100);
        b.set(512 * 300, 512);
        assert_eq!(b.status(0, u64::MAX), (false, 512 * 7));
        assert_eq!(b.status(512 * 7, u64::MAX), (true, 512 * 100));
        assert_eq!(b.status(512 * 107, u64::MAX), (false, 512 * 193));
        assert_eq!(
            b.dirty_ranges(),
            vec![(512 * 7, 512 * 100), (512 * 300, 512)]
        );
    }

    #[test]
    fn merge_handles_different_granularities() {
        let mut coarse = DirtyBitmap::new(1 << 20, 64 << 10).unwrap();
        let mut fine = DirtyBitmap::new(1 << 20, 512).unwrap();
        fine.set(70_000, 1);
        coarse.merge(&fine);
        assert_eq!(coarse.dirty_ranges(), vec![(65536, 65536)]);
        let mut other = DirtyBitmap::new(1 << 20, 512).unwrap();
        other.set(0, 512);
        fine.merge(&other);
        assert_eq!(fine.dirty_ranges(), vec![(0, 512), (69_632, 512)]);
        assert!(DirtyBitmap::new(1 << 20, 1000).is_err());
        assert!(DirtyBitmap::new(u64::MAX, 512).is_err());
    }
}
