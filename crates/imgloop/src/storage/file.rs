//! A host file (or block device) as [`Storage`].

use super::Storage;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

/// A host file accessed with positional I/O (`pread`/`pwrite`).
///
/// The file handle sits behind a read-write lock only so that a read-only
/// image can be reopened read-write; I/O takes the lock shared. Whether
/// the image is writable is not kept here: the image's open state says,
/// and [`Storage::reopen`] makes the descriptor match it.
#[derive(Debug)]
pub struct FileStorage {
    path: PathBuf,
    file: RwLock<File>,
    /// Cache mode "unsafe": sync requests are ignored.
    no_sync: bool,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = open_file(path, writable, false)?;
        Ok(Self::from_file(path, file))
    }

    /// Wraps a file already opened (and checked) by the caller.
    pub fn from_file(path: &Path, file: File) -> Self {
        FileStorage {
            path: path.to_path_buf(),
            file: RwLock::new(file),
            no_sync: false,
        }
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = open_file(path, true, true)?;
        Ok(Self::from_file(path, file))
    }

    /// Cache mode "unsafe": makes [`Storage::sync`] a no-op, trading crash
    /// safety for speed (for scratch copies, as `qemu-img convert` does).
    pub fn ignore_syncs(mut self) -> Self {
        self.no_sync = true;
        self
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> RwLockReadGuard<'_, File> {
        self.file.read().unwrap_or_else(|e| e.into_inner())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let f = self.file();
        let off = to_off(offset)?;
        let l = to_off(len)?;
        loop {
            // SAFETY: fallocate only reads its scalar arguments; the fd is
            // owned by `f`, which outlives the call.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, l) };
            if r == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let f = self.file();
        // SAFETY: lseek only reads its scalar arguments. Moving the shared file
        // position is harmless: all other I/O here is positional.
        let r = unsafe { libc::lseek(f.as_raw_fd(), to_off(offset)?, whence) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(r as u64))
    }

    /// Writes zeroes by plain writes (fallback when fallocate is unsupported).
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn is_block_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.file()
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false)
    }
}

fn open_file(path: &Path, writable: bool, create: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(writable).custom_flags(libc::O_CLOEXEC);
    if create {
        o.create(true).truncate(true);
    }
    let f = o.open(path)?;
    let meta = f.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory, not an image file",
        ));
    }
    Ok(f)
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file().read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file().write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        let f = self.file();
        let meta = f.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        drop(f);
        // Block devices report their size through SEEK_END.
        Ok(self.lseek(0, libc::SEEK_END)?.unwrap_or(0))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.is_block_device() {
            if len > self.len()? {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            return Ok(());
        }
        self.file().set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if self.no_sync {
            return Ok(());
        }
        self.file().sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.len()?;
        if offset >= size {
            return Ok(());
        }
        let len = len.min(size - offset);
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            r => r,
        }
    }

    fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let size = self.len()?;
        if may_unmap && offset + len <= size {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            r => r,
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(0, offset, len) {
            Err(e) if unsupported(&e) => {
                // No fallocate: extend sparsely; the space is not reserved.
                let end = offset + len;
                if end > self.len()? {
                    self.set_len(end)?;
                }
                Ok(())
            }
            r => r,
        }
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<(bool, u64)> {
        let size = self.len()?;
        if offset >= size {
            return Ok((false, max_len));
        }
        let end = size.min(offset.saturating_add(max_len));
        let data = match self.lseek(offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // No SEEK_DATA support (e.g. a block device): all data.
            Err(e) if unsupported(&e) => return Ok((true, end - offset)),
            Err(e) => return Err(e),
        };
        match data {
            Some(d) if d <= offset => {
                let hole = self.lseek(offset, libc::SEEK_HOLE)?.unwrap_or(size);
                Ok((true, hole.min(end) - offset))
            }
            Some(d) => Ok((false, d.min(end) - offset)),
            None => Ok((false, end - offset)),
        }
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        let meta = self.file().metadata()?;
        Ok(Some(meta.blocks() * 512))
    }

    fn reopen(&self, writable: bool) -> io::Result<()> {
        let new = open_file(&self.path, writable, false)?;
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn as_file(&self) -> Option<RwLockReadGuard<'_, File>> {
        Some(self.file())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Copies `len` bytes between two host files in the kernel
/// (`copy_file_range`), falling back to read/write where unsupported.
pub fn copy_file_range_all(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut so = to_off(src_off + done)?;
        let mut d_o = to_off(dst_off + done)?;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both fds are valid for the call; the offset pointers point
        // to live locals, so the kernel neither reads nor moves file positions.
        let r = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d_o, want, 0)
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::EINVAL) => {
                    return copy_by_buffer(src, src_off + done, dst, dst_off + done, len - done)
                }
                _ => return Err(err),
            }
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source ended during copy",
            ));
        }
        done += r as u64;
    }
    Ok(())
}

fn copy_by_buffer(src: &File, so: u64, dst: &File, d_o: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (1u64 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (buf.len() as u64).min(len - done) as usize;
        src.read_exact_at(&mut buf[..n], so + done)?;
        dst.write_all_at(&buf[..n], d_o + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        (dir, p)
    }

    #[test]
    fn holes_and_data_are_told_apart_by_seek_data() {
        let (_d, p) = tmp();
        let s = FileStorage::create(&p).unwrap();
        s.set_len(8 << 20).unwrap();
        s.write_at(&[1u8; 65536], 4 << 20).unwrap();
        let (data, len) = s.extent(0, 8 << 20).unwrap();
        assert!(!data);
        assert_eq!(len, 4 << 20);
        let (data, len) = s.extent(4 << 20, 8 << 20).unwrap();
        assert!(data);
        assert_eq!(len, 65536);
        // Past the end everything is a hole.
        assert_eq!(s.extent(9 << 20, 10).unwrap(), (false, 10));
    }

    #[test]
    fn punch_hole_reads_back_zero_and_keeps_the_size() {
        let (_d, p) = tmp();
        let s = FileStorage::create(&p).unwrap();
        s.write_at(&[7u8; 1 << 20], 0).unwrap();
        s.punch_hole(4096, 65536).unwrap();
        let mut b = vec![9u8; 65536];
        s.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(s.len().unwrap(), 1 << 20);
        let mut one = [0u8; 1];
        s.read_at(&mut one, 4095).unwrap();
        assert_eq!(one[0], 7);
    }

    #[test]
    fn zero_range_without_unmap_keeps_data_allocated() {
        let (_d, p) = tmp();
        let s = FileStorage::create(&p).unwrap();
        s.write_at(&[7u8; 1 << 20], 0).unwrap();
        s.zero_range(0, 1 << 20, false).unwrap();
        let mut b = vec![9u8; 1 << 20];
        s.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(s.extent(0, 1 << 20).unwrap().0);
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let (_d, p) = tmp();
        let s = FileStorage::create(&p).unwrap();
        s.write_at(&[1u8; 10], 0).unwrap();
        let mut b = [0u8; 20];
        let e = s.read_at(&mut b, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_read_only_storage_can_be_reopened_writable() {
        let (_d, p) = tmp();
        FileStorage::create(&p)
            .unwrap()
            .write_at(b"abc", 0)
            .unwrap();
        let s = FileStorage::open(&p, false).unwrap();
        assert!(s.write_at(b"x", 0).is_err());
        s.reopen(true).unwrap();
        s.write_at(b"x", 0).unwrap();
        let mut b = [0u8; 3];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"xbc");
    }

    #[test]
    fn copy_file_range_copies_exact_bytes() {
        let (_d, p) = tmp();
        let a = FileStorage::create(&p).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        a.write_at(&data, 0).unwrap();
        let q = p.with_extension("b");
        let b = FileStorage::create(&q).unwrap();
        copy_file_range_all(&a.file(), 1000, &b.file(), 5, 200_000).unwrap();
        let mut out = vec![0u8; 200_000];
        b.read_at(&mut out, 5).unwrap();
        assert_eq!(&out[..], &data[1000..201_000]);
    }
}
