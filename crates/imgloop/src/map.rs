//! Guest-range maps through the backing chain, as `qemu-img map` shows them.

use crate::error::Result;
use crate::Image;
use serde::Serialize;

/// One extent of `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that holds the range (0 = the top image).
    pub depth: usize,
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the data file of the layer at `depth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file `offset` is in (the layer's image file, or its external
    /// data file), for human-readable maps.
    #[serde(skip)]
    pub file: Option<String>,
    /// The range is stored encrypted.
    #[serde(skip)]
    pub encrypted: bool,
}

impl MapEntry {
    fn extends(&self, next: &MapEntry) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.encrypted == next.encrypted
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

impl Image {
    /// The map of `len` bytes from `start` (clamped to the disk), with
    /// neighbouring extents of the same kind merged.
    pub fn map_entries(&self, start: u64, len: u64) -> Result<Vec<MapEntry>> {
        let mut out = Vec::new();
        self.map_each(start, len, |e| {
            out.push(e);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`map_entries`](Image::map_entries), handing each merged extent to
    /// `each` as soon as it is complete: memory stays bounded however many
    /// extents a fragmented image has.
    pub fn map_each(
        &self,
        start: u64,
        len: u64,
        mut each: impl FnMut(MapEntry) -> Result<()>,
    ) -> Result<()> {
        let end = self.size().min(start.saturating_add(len));
        let mut pending: Option<MapEntry> = None;
        let mut pos = start;
        let chain = self.chain();
        while pos < end {
            let (s, depth) = self.block_status_chain(pos, end - pos)?;
            let file = s.storage.and_then(|id| {
                chain
                    .get(depth)
                    .and_then(|img| img.driver().storages().get(id.0 as usize))
                    .map(|st| st.describe())
            });
            let e = MapEntry {
                start: pos,
                length: s.len,
                depth,
                present: s.allocated,
                zero: s.zero,
                data: s.data,
                compressed: s.compressed,
                // As qemu-img: the host place of ciphertext is not shown.
                offset: s.offset.filter(|_| !s.encrypted),
                file,
                encrypted: s.encrypted,
            };
            match pending.as_mut() {
                Some(last) if last.extends(&e) => last.length += e.length,
                _ => {
                    if let Some(done) = pending.replace(e) {
                        each(done)?;
                    }
                }
            }
            pos += s.len;
        }
        match pending {
            Some(last) => each(last),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{MemStorage, Storage};
    use crate::Image;
    use std::sync::Arc;

    #[test]
    fn neighbouring_extents_of_one_kind_merge_and_holes_split_them() {
        let mem = MemStorage::new();
        mem.set_len(1 << 20).unwrap();
        mem.write_at(&[1u8; 8192], 65536).unwrap();
        mem.write_at(&[1u8; 4096], 65536 + 8192).unwrap();
        let img = Image::open_storage(Arc::new(mem), Some("raw"), true, None).unwrap();
        let m = img.map_entries(0, u64::MAX).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].start, m[0].length, m[0].data), (0, 65536, false));
        assert_eq!((m[1].start, m[1].length, m[1].data), (65536, 12288, true));
        assert_eq!(m[1].offset, Some(65536));
        assert_eq!(m[2].start + m[2].length, 1 << 20);
        let part = img.map_entries(70000, 1000).unwrap();
        assert_eq!((part[0].start, part[0].length), (70000, 1000));
    }
}
