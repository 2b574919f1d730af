//! A read-only view of a storage with some ranges replaced: how a format
//! shows the result of replaying a journal (the VHDX log) without writing
//! to an image opened read-only.

use super::Storage;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, RwLockReadGuard};

/// What a replaced range reads as.
#[derive(Clone, Debug)]
enum Patch {
    Bytes(Arc<[u8]>, usize),
    Zero,
}

/// See the module documentation. Writes fail with `EROFS`.
#[derive(Debug)]
pub struct OverlayStorage {
    base: Arc<dyn Storage>,
    /// Disjoint ranges by start: (end, content).
    patches: BTreeMap<u64, (u64, Patch)>,
    /// The length the view reports (at least the base's).
    len: u64,
}

impl OverlayStorage {
    /// A view of `base` with nothing replaced yet.
    pub fn new(base: Arc<dyn Storage>) -> io::Result<OverlayStorage> {
        let len = base.len()?;
        Ok(OverlayStorage {
            base,
            patches: BTreeMap::new(),
            len,
        })
    }

    /// True when nothing is replaced.
    pub fn is_unchanged(&self) -> bool {
        self.patches.is_empty()
    }

    /// Removes `[start, end)` from the patches, keeping what lies outside.
    fn cut(&mut self, start: u64, end: u64) {
        let touching: Vec<u64> = self
            .patches
            .range(..end)
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in touching {
            let (e, p) = self.patches.remove(&s).expect("listed");
            if s < start {
                self.patches.insert(s, (start, p.clone()));
            }
            if e > end {
                let rest = match p {
                    Patch::Bytes(b, at) => Patch::Bytes(b, at + (end - s) as usize),
                    Patch::Zero => Patch::Zero,
                };
                self.patches.insert(end, (e, rest));
            }
        }
    }

    /// Replaces `[offset, offset + bytes.len())` with `bytes`.
    pub fn put(&mut self, bytes: &[u8], offset: u64) {
        let end = offset + bytes.len() as u64;
        self.cut(offset, end);
        self.patches
            .insert(offset, (end, Patch::Bytes(bytes.into(), 0)));
        self.len = self.len.max(end);
    }

    /// Replaces `[offset, offset + len)` with zeroes.
    pub fn put_zeroes(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        self.cut(offset, end);
        self.patches.insert(offset, (end, Patch::Zero));
        self.len = self.len.max(end);
    }

    /// Makes the view at least `len` bytes long.
    pub fn grow(&mut self, len: u64) {
        self.len = self.len.max(len);
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl Storage for OverlayStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the overlay",
                )
            })?;
        let base_len = self.base.len()?;
        let inside = base_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.base.read_at(&mut buf[..inside], offset)?;
        buf[inside..].fill(0);
        let from = self
            .patches
            .range(..offset)
            .next_back()
            .map_or(offset, |(s, _)| *s);
        for (&s, (e, p)) in self.patches.range(from..end) {
            if *e <= offset {
                continue;
            }
            let a = s.max(offset);
            let b = (*e).min(end);
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match p {
                Patch::Bytes(bytes, at) => {
                    let src = at + (a - s) as usize;
                    dst.copy_from_slice(&bytes[src..src + dst.len()]);
                }
                Patch::Zero => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn zero_range(&self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<(bool, u64)> {
        let end = offset.saturating_add(max_len);
        let patched = self
            .patches
            .range(..end)
            .next_back()
            .filter(|(s, (e, _))| **s <= offset && *e > offset)
            .map(|(_, (e, _))| *e);
        match patched {
            Some(e) => Ok((true, (e - offset).min(max_len))),
            None => {
                // Up to the next patch at most.
                let next = self
                    .patches
                    .range(offset..end)
                    .next()
                    .map_or(end, |(s, _)| *s);
                let (data, n) = self.base.extent(offset, next - offset)?;
                Ok((data, n.max(1)))
            }
        }
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.base.allocated_size()
    }

    fn as_file(&self) -> Option<RwLockReadGuard<'_, File>> {
        None
    }

    fn describe(&self) -> String {
        self.base.describe()
    }

    fn path(&self) -> Option<&std::path::Path> {
        self.base.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn patches_replace_ranges_without_touching_the_base() {
        let base = MemStorage::from_bytes(&[1u8; 100]);
        let mut o = OverlayStorage::new(Arc::new(base.clone())).unwrap();
        o.put(&[2u8; 10], 10);
        o.put(&[3u8; 10], 15);
        o.put_zeroes(12, 2);
        o.put(&[4u8; 4], 98);
        let mut b = vec![0u8; 102];
        o.read_at(&mut b, 0).unwrap();
        let mut want = vec![1u8; 102];
        want[10..15].fill(2);
        want[12..14].fill(0);
        want[15..25].fill(3);
        want[98..102].fill(4);
        assert_eq!(b, want);
        let mut part = [0u8; 6];
        o.read_at(&mut part, 11).unwrap();
        assert_eq!(part, want[11..17]);
        assert!(o.write_at(&[0], 0).is_err());
        assert_eq!(base.to_vec(), vec![1u8; 100]);
        assert_eq!(o.len().unwrap(), 102);
    }
}
