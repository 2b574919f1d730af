//! Positional byte storage under the format drivers.
//!
//! A driver never touches a file directly: it reads and writes a
//! [`Storage`]. [`FileStorage`] is a host file (or block device),
//! [`MemStorage`] a sparse in-memory disk used by tests and fuzzing, so the
//! same driver code runs on both.

mod crash;
mod file;
mod mem;
mod overlay;

pub use crash::CrashStorage;
pub use file::{copy_file_range_all, FileStorage};
pub use mem::MemStorage;
pub use overlay::OverlayStorage;

use std::fmt::Debug;
use std::fs::File;
use std::io;

/// Positional I/O on a byte container (a file, memory, another image).
///
/// All calls take `&self` and are safe to issue from several threads at once.
pub trait Storage: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `offset`. Reading past the end is
    /// an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// True when the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (sparsely) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Pushes buffered writes down to the operating system. The file backend
    /// has no user-space buffer, so this is a no-op there.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Makes all completed writes durable (fdatasync).
    fn sync(&self) -> io::Result<()>;

    /// Deallocates a range; afterwards it reads as zeroes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes a range read as zeroes, deallocating it when `may_unmap`, and
    /// otherwise keeping (or making) it allocated.
    fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;

    /// Allocates a range without changing its content (fallocate mode 0),
    /// growing the storage if the range reaches past its end.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Describes the range starting at `offset`: whether it holds data
    /// (`true`) or is a hole (`false`), and how many bytes, at most `max_len`,
    /// share that state. Beyond the end, everything is a hole.
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<(bool, u64)>;

    /// Bytes actually allocated on the host (`actual-size` in `info`).
    fn allocated_size(&self) -> io::Result<Option<u64>>;

    /// Reopens the underlying file with or without write access.
    fn reopen(&self, _writable: bool) -> io::Result<()> {
        Ok(())
    }

    /// The host file, when this storage is one (for copy_file_range).
    fn as_file(&self) -> Option<std::sync::RwLockReadGuard<'_, File>> {
        None
    }

    /// A short description (the path, or "memory").
    fn describe(&self) -> String;

    /// The host file's path, when this storage is one (for locking).
    fn path(&self) -> Option<&std::path::Path> {
        None
    }
}

/// True when every byte of `buf` is zero (fast path for sparse detection).
pub fn is_zero(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(64);
    let tail = chunks.remainder();
    chunks
        .map(|c| c.iter().fold(0u8, |acc, &b| acc | b))
        .all(|x| x == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for pos in [0usize, 1, 15, 16, 2048, 4097, 4098] {
            buf[pos] = 1;
            assert!(!is_zero(&buf), "byte {pos}");
            buf[pos] = 0;
        }
        assert!(is_zero(&[]));
    }
}
