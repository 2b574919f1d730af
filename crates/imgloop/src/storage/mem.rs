//! A sparse in-memory [`Storage`] for tests and fuzzing.

use super::Storage;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

const PAGE: u64 = 4096;

#[derive(Debug, Default)]
struct Inner {
    len: u64,
    /// Allocated pages by page index. A missing page reads as zeroes.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Upper bound on `len`; writes past it fail with ENOSPC.
    limit: u64,
}

/// A sparse in-memory disk: pages are allocated on first write, holes read
/// as zeroes and are reported as holes by [`Storage::extent`].
///
/// Cloning gives another handle on the same bytes, so a test can keep one
/// handle while a driver owns another, and reopen the image later.
#[derive(Debug, Clone)]
pub struct MemStorage {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStorage {
    /// An empty storage that may grow to 1 TiB (sparsely).
    pub fn new() -> Self {
        Self::with_limit(1 << 40)
    }

    /// An empty storage that refuses to grow beyond `limit` bytes.
    pub fn with_limit(limit: u64) -> Self {
        MemStorage {
            inner: Arc::new(Mutex::new(Inner {
                limit,
                ..Inner::default()
            })),
        }
    }

    /// A storage holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let s = Self::new();
        s.write_at(bytes, 0).expect("memory write within limit");
        s
    }

    /// The whole content as one vector (for test assertions).
    pub fn to_vec(&self) -> Vec<u8> {
        let len = self.lock().len as usize;
        let mut v = vec![0u8; len];
        self.read_at(&mut v, 0).expect("in-bounds read");
        v
    }

    /// Number of allocated pages.
    pub fn allocated_pages(&self) -> usize {
        self.lock().pages.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn zero(&mut self, offset: u64, len: u64, unmap: bool) {
        let end = (offset + len).min(self.len);
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE;
            let in_page = pos % PAGE;
            let n = (PAGE - in_page).min(end - pos);
            if in_page == 0 && n == PAGE && unmap {
                self.pages.remove(&idx);
            } else if let Some(p) = self.pages.get_mut(&idx) {
                p[in_page as usize..(in_page + n) as usize].fill(0);
            } else if !unmap {
                self.pages
                    .insert(idx, vec![0u8; PAGE as usize].into_boxed_slice());
            }
            pos += n;
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if end > g.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of memory storage",
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match g.pages.get(&idx) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if end > g.limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let page = g
                .pages
                .entry(idx)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            page[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        g.len = g.len.max(end);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        if len > g.limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if len < g.len {
            // Drop whole pages past the end and clear the tail of the last one.
            let first_gone = len.div_ceil(PAGE);
            let _ = g.pages.split_off(&first_gone);
            if !len.is_multiple_of(PAGE) {
                let cur = g.len;
                g.zero(len, cur - len, false);
                if let Some(p) = g.pages.get_mut(&(len / PAGE)) {
                    p[(len % PAGE) as usize..].fill(0);
                }
            }
        }
        g.len = len;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lock().zero(offset, len, true);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mut g = self.lock();
        let end = offset + len;
        if end > g.len {
            if end > g.limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            g.len = end;
        }
        g.zero(offset, len, may_unmap);
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range_keep(offset, len)
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<(bool, u64)> {
        let g = self.lock();
        if offset >= g.len {
            return Ok((false, max_len));
        }
        let end = g.len.min(offset.saturating_add(max_len));
        let first = offset / PAGE;
        let data = g.pages.contains_key(&first);
        let mut idx = first + 1;
        while idx * PAGE < end && g.pages.contains_key(&idx) == data {
            idx += 1;
        }
        Ok((data, (idx * PAGE).min(end) - offset))
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.lock().pages.len() as u64 * PAGE))
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }
}

impl MemStorage {
    /// Allocates pages over a range (keeping content), extending the length.
    fn zero_range_keep(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        let end = offset + len;
        if end > g.limit {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        g.len = g.len.max(end);
        let mut idx = offset / PAGE;
        while idx * PAGE < end {
            g.pages
                .entry(idx)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            idx += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_pages_are_holes_that_read_as_zero() {
        let s = MemStorage::new();
        s.set_len(1 << 20).unwrap();
        s.write_at(&[5u8; 10], 8192 + 100).unwrap();
        assert_eq!(s.extent(0, 1 << 20).unwrap(), (false, 8192));
        assert_eq!(s.extent(8192, 1 << 20).unwrap(), (true, 4096));
        let mut b = vec![1u8; 200];
        s.read_at(&mut b, 8192).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0));
        assert!(b[100..110].iter().all(|&x| x == 5));
        assert_eq!(s.allocated_pages(), 1);
    }

    #[test]
    fn shrinking_then_growing_reads_zeroes_in_the_regrown_part() {
        let s = MemStorage::from_bytes(&[9u8; 10000]);
        s.set_len(5000).unwrap();
        s.set_len(10000).unwrap();
        let v = s.to_vec();
        assert!(v[..5000].iter().all(|&x| x == 9));
        assert!(v[5000..].iter().all(|&x| x == 0));
    }

    #[test]
    fn writes_beyond_the_limit_fail_with_enospc() {
        let s = MemStorage::with_limit(4096);
        let e = s.write_at(&[1u8; 2], 4095).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn punch_hole_frees_whole_pages_and_zeroes_partial_ones() {
        let s = MemStorage::from_bytes(&[3u8; 16384]);
        s.punch_hole(2048, 8192).unwrap();
        assert_eq!(s.allocated_pages(), 3);
        let v = s.to_vec();
        assert!(v[2048..10240].iter().all(|&x| x == 0));
        assert!(v[10240..].iter().all(|&x| x == 3));
    }
}
