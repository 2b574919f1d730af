//! The FUSE export: an image's virtual disk as one regular file.
//!
//! The file has the virtual size; reads and writes go through the generic
//! block layer ([`imgloop::Image`]), so every format imgloop opens can be
//! exported. Besides read and write it serves:
//!
//! - `fsync` (flush, then sync: durable on return),
//! - `fallocate` punch-hole (zeroes that may free space: discard) and
//!   zero-range (write zeroes),
//! - `lseek` `SEEK_DATA`/`SEEK_HOLE` from the image's block status,
//! - `truncate`: the size never changes; truncating to a smaller size makes
//!   everything past it read as zeroes (so `cp --sparse=always` into the
//!   export gives an exact, sparse copy), growing it is refused.
//!
//! The file is opened in the kernel's direct-I/O mode: requests reach this
//! server as issued, nothing is cached twice (a loop device on top has its
//! own cache), and several writes to the file may be in flight at once.
//! Requests are served by several threads in parallel.

use crate::process;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};
use imgloop::{Error, ErrorKind, Image, Result};
use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// `/dev/fuse`: the kernel's FUSE device.
pub const FUSE_DEVICE: &str = "/dev/fuse";

/// Name of the one file when the mountpoint is a directory.
pub const FILE_NAME: &str = "disk";

/// Largest read or write request the kernel is asked to send.
const MAX_REQUEST: u32 = 1 << 20;

/// Attribute and entry cache time. Only this server changes the file, so
/// the attributes stay right; `blocks` may lag by this much.
const TTL: Duration = Duration::from_secs(1);

const DIR_INO: INodeNo = INodeNo::ROOT;
const FILE_IN_DIR_INO: INodeNo = INodeNo(2);

/// Options of an export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Export read-only (the image must be open read-only too, or writes are
    /// refused by the server as well as by the read-only mount).
    pub read_only: bool,
    /// Let users other than the one who mounted access the file
    /// (`allow_other`; normal permission checks still apply).
    pub allow_other: bool,
    /// Threads serving requests.
    pub threads: usize,
    /// The source name shown in the mount table.
    pub fs_name: String,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            read_only: false,
            allow_other: false,
            threads: 8,
            fs_name: "imgloop".to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// The mountpoint is a regular file: it becomes the disk.
    File,
    /// The mountpoint is a directory holding one file, [`FILE_NAME`].
    Dir,
}

struct ImageFs {
    image: Arc<Image>,
    layout: Layout,
    read_only: bool,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

thread_local! {
    /// Per-thread read buffer, reused so large reads do not map fresh
    /// memory every time.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn errno_of(code: i32) -> Errno {
    Errno::from_i32(code)
}

impl ImageFs {
    fn file_ino(&self) -> INodeNo {
        match self.layout {
            Layout::File => INodeNo::ROOT,
            Layout::Dir => FILE_IN_DIR_INO,
        }
    }

    fn is_file(&self, ino: INodeNo) -> bool {
        ino == self.file_ino()
    }

    fn is_dir(&self, ino: INodeNo) -> bool {
        self.layout == Layout::Dir && ino == DIR_INO
    }

    fn file_attr(&self) -> FileAttr {
        let size = self.image.size();
        let allocated = self
            .image
            .file_storage()
            .allocated_size()
            .ok()
            .flatten()
            .unwrap_or(size);
        FileAttr {
            ino: self.file_ino(),
            size,
            blocks: allocated.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o444 } else { 0o644 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: DIR_INO,
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if self.is_file(ino) {
            Some(self.file_attr())
        } else if self.is_dir(ino) {
            Some(self.dir_attr())
        } else {
            None
        }
    }

    /// Makes `[start, size)` read as zeroes: what truncating to `start`
    /// and growing back would leave.
    fn zero_tail(&self, start: u64) -> Result<()> {
        let size = self.image.size();
        if start < size {
            self.image.write_zeroes(start, size - start, true)?;
        }
        Ok(())
    }

    fn do_fallocate(&self, offset: u64, length: u64, mode: i32) -> std::result::Result<(), i32> {
        if self.read_only {
            return Err(libc::EROFS);
        }
        let size = self.image.size();
        let end = offset.checked_add(length).ok_or(libc::EINVAL)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
        if end > size && !keep_size {
            // The disk cannot grow.
            return Err(libc::ENOSPC);
        }
        let end = end.min(size);
        let len = end.saturating_sub(offset);
        let run = |may_unmap: bool| -> std::result::Result<(), i32> {
            if len > 0 {
                self.image
                    .write_zeroes(offset, len, may_unmap)
                    .map_err(|e| e.errno())?;
            }
            Ok(())
        };
        match rest {
            // Allocation inside the disk: the format decides where data
            // lives, so there is nothing to reserve.
            0 => Ok(()),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => run(true),
            libc::FALLOC_FL_ZERO_RANGE => run(false),
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    fn do_lseek(&self, offset: i64, whence: i32) -> std::result::Result<i64, i32> {
        let size = self.image.size();
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(libc::EINVAL),
        };
        let mut pos = u64::try_from(offset).map_err(|_| libc::ENXIO)?;
        if pos >= size {
            return Err(libc::ENXIO);
        }
        while pos < size {
            let (status, _) = self
                .image
                .block_status_chain(pos, size - pos)
                .map_err(|e| e.errno())?;
            if status.zero != want_data {
                return i64::try_from(pos).map_err(|_| libc::EOVERFLOW);
            }
            pos += status.len.max(1);
        }
        if want_data {
            Err(libc::ENXIO)
        } else {
            // The end of the file counts as a hole.
            i64::try_from(size).map_err(|_| libc::EOVERFLOW)
        }
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        if let Err(max) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(max);
        }
        // Asynchronous direct I/O lets a loop device in direct-I/O mode keep
        // several requests in flight; more background requests go with it.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.is_dir(parent) && name == FILE_NAME {
            reply.entry(&TTL, &self.file_attr(), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if let Some(new_size) = size {
            if !self.is_file(ino) {
                reply.error(Errno::EISDIR);
                return;
            }
            if self.read_only {
                reply.error(errno_of(libc::EROFS));
                return;
            }
            if new_size > self.image.size() {
                reply.error(errno_of(libc::EFBIG));
                return;
            }
            if let Err(e) = self.zero_tail(new_size) {
                reply.error(errno(&e));
                return;
            }
            reply.attr(&TTL, &self.file_attr());
            return;
        }
        // Mode, owner and times are fixed; accept and ignore changes so
        // tools like `cp -p` do not fail.
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.is_file(ino) {
            reply.error(if self.is_dir(ino) {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
            return;
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(errno_of(libc::EROFS));
            return;
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let disk = self.image.size();
        if offset >= disk {
            reply.data(&[]);
            return;
        }
        let n = (disk - offset).min(u64::from(size)) as usize;
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            match self.image.read(&mut buf[..n], offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            reply.error(errno_of(libc::EROFS));
            return;
        }
        let disk = self.image.size();
        if offset >= disk {
            // Past the end of a disk, like a block device.
            reply.error(errno_of(libc::ENOSPC));
            return;
        }
        let n = (disk - offset).min(data.len() as u64) as usize;
        match self.image.write(&data[..n], offset) {
            // n <= data.len(), which the kernel keeps below MAX_REQUEST.
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called on every close(): push metadata out, without a full sync.
        match self.image.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.image.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.is_dir(ino) {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if !self.is_dir(ino) {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (DIR_INO, FileType::Directory, "."),
            (DIR_INO, FileType::Directory, ".."),
            (FILE_IN_DIR_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.image.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.read_only && mask.contains(AccessFlags::W_OK) {
            reply.error(errno_of(libc::EROFS));
        } else {
            reply.ok();
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.is_file(ino) {
            reply.error(Errno::EISDIR);
            return;
        }
        match self.do_fallocate(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(code) => reply.error(errno_of(code)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.do_lseek(offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(code) => reply.error(errno_of(code)),
        }
    }
}

/// A running export. Dropping it without [`stop`](Export::stop) leaves the
/// serving threads running until the mount goes away.
pub struct Export {
    image: Arc<Image>,
    mountpoint: PathBuf,
    file: PathBuf,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("image", &self.image.name())
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

/// Checks that FUSE can be used here: `/dev/fuse` exists.
pub fn check_fuse_available() -> Result<()> {
    match std::fs::metadata(FUSE_DEVICE) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::new(
            ErrorKind::NotFound,
            format!("{FUSE_DEVICE} not found: FUSE is not available here (load the fuse module)"),
        )),
        Err(e) => Err(Error::io("", e).in_file(FUSE_DEVICE)),
    }
}

impl Export {
    /// Mounts `image` at `mountpoint` (an existing regular file, which
    /// becomes the disk, or a directory, which gets one file named
    /// [`FILE_NAME`]) and serves it on `opts.threads` threads.
    ///
    /// `on_end` runs once the session ends, whoever ended it (this export's
    /// [`stop`](Export::stop), an external `umount`, or the kernel).
    pub fn start(
        image: Arc<Image>,
        mountpoint: &Path,
        opts: &ExportOptions,
        on_end: impl FnOnce() + Send + 'static,
    ) -> Result<Export> {
        if !opts.read_only && image.is_read_only() {
            return Err(Error::invalid_argument(
                "a read-write export needs an image opened read-write",
            )
            .in_file(image.name()));
        }
        check_fuse_available()?;
        let meta = std::fs::metadata(mountpoint)
            .map_err(|e| Error::io("could not open", e).in_file(mountpoint))?;
        let layout = if meta.is_file() {
            Layout::File
        } else if meta.is_dir() {
            Layout::Dir
        } else {
            return Err(Error::invalid_argument(
                "the mountpoint must be a regular file or a directory",
            )
            .in_file(mountpoint));
        };
        let mountpoint = std::fs::canonicalize(mountpoint)
            .map_err(|e| Error::io("could not open", e).in_file(mountpoint))?;
        let fs = ImageFs {
            image: image.clone(),
            layout,
            read_only: opts.read_only,
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            started: SystemTime::now(),
        };
        let mut options = vec![
            // Commas would split the mount option string.
            MountOption::FSName(opts.fs_name.replace(',', "_")),
            MountOption::Subtype("imgloop".to_string()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        if opts.read_only {
            options.push(MountOption::RO);
        }
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads.clamp(1, 64));
        config.clone_fd = true;
        let session = Session::new(fs, &mountpoint, &config).map_err(|e| {
            if !process::is_root() && e.kind() == io::ErrorKind::NotFound {
                // Without root, fuser mounts through the fusermount3 helper.
                Error::new(
                    ErrorKind::NotFound,
                    "mounting the FUSE export: fusermount3 not found \
                     (install the fuse3 package, or run as root)",
                )
                .in_file(&mountpoint)
            } else {
                Error::io("mounting the FUSE export", e).in_file(&mountpoint)
            }
        })?;
        let thread = std::thread::Builder::new()
            .name("fuse-session".to_string())
            .spawn(move || {
                let r = session.run();
                on_end();
                r
            })
            .map_err(|e| Error::io("starting the export threads", e))?;
        let file = match layout {
            Layout::File => mountpoint.clone(),
            Layout::Dir => mountpoint.join(FILE_NAME),
        };
        Ok(Export {
            image,
            mountpoint,
            file,
            thread: Some(thread),
        })
    }

    /// The exported file (the mountpoint itself, or `MOUNTPOINT/disk`).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The exported image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// True while the serving threads run.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Makes every write so far durable, unmounts and waits for the
    /// serving threads. When the file is still in use (a loop device is
    /// bound to it and mounted), the mount is detached lazily and this
    /// waits until the last user lets go, serving its requests meanwhile.
    pub fn stop(mut self) -> Result<()> {
        let synced = self.image.sync();
        if self.is_running() {
            match process::unmount(&self.mountpoint, false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    process::unmount(&self.mountpoint, true).map_err(|e| {
                        Error::io("unmounting the FUSE export", e).in_file(&self.mountpoint)
                    })?;
                }
                // Already unmounted by someone else.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => {
                    return Err(Error::io("unmounting the FUSE export", e).in_file(&self.mountpoint))
                }
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Writes that arrived after the first sync (a busy device draining).
        synced.and(self.image.sync())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgloop::storage::{MemStorage, Storage};

    fn fs_over(bytes: &[u8], read_only: bool) -> ImageFs {
        let mem = MemStorage::from_bytes(bytes);
        let img = Image::open_storage(Arc::new(mem), Some("raw"), read_only, None).unwrap();
        ImageFs {
            image: Arc::new(img),
            layout: Layout::File,
            read_only,
            uid: 0,
            gid: 0,
            started: SystemTime::now(),
        }
    }

    #[test]
    fn seek_data_and_hole_follow_block_status() {
        let mut bytes = vec![0u8; 1 << 20];
        bytes[65536..65536 + 4096].fill(7);
        let mem = MemStorage::new();
        mem.set_len(1 << 20).unwrap();
        mem.write_at(&bytes[65536..69632], 65536).unwrap();
        let img = Image::open_storage(Arc::new(mem), Some("raw"), false, None).unwrap();
        let fs = ImageFs {
            image: Arc::new(img),
            layout: Layout::File,
            read_only: false,
            uid: 0,
            gid: 0,
            started: SystemTime::now(),
        };
        assert_eq!(fs.do_lseek(0, libc::SEEK_DATA), Ok(65536));
        assert_eq!(fs.do_lseek(65536, libc::SEEK_HOLE), Ok(69632));
        assert_eq!(fs.do_lseek(0, libc::SEEK_HOLE), Ok(0));
        assert_eq!(fs.do_lseek(69632, libc::SEEK_DATA), Err(libc::ENXIO));
        assert_eq!(fs.do_lseek(1 << 20, libc::SEEK_HOLE), Err(libc::ENXIO));
        assert_eq!(fs.do_lseek(-1, libc::SEEK_DATA), Err(libc::ENXIO));
        assert_eq!(fs.do_lseek(0, libc::SEEK_SET), Err(libc::EINVAL));
    }

    #[test]
    fn fallocate_modes_zero_punch_or_refuse() {
        let fs = fs_over(&[9u8; 65536], false);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fs.do_fallocate(0, 4096, punch).unwrap();
        fs.do_fallocate(8192, 4096, libc::FALLOC_FL_ZERO_RANGE)
            .unwrap();
        // Reaching past the end: clipped with KEEP_SIZE, refused without.
        fs.do_fallocate(61440, 8192, punch).unwrap();
        assert_eq!(
            fs.do_fallocate(61440, 8192, libc::FALLOC_FL_ZERO_RANGE),
            Err(libc::ENOSPC)
        );
        assert_eq!(fs.do_fallocate(0, 4096, 0), Ok(()));
        assert_eq!(
            fs.do_fallocate(0, 4096, libc::FALLOC_FL_COLLAPSE_RANGE),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(fs.do_fallocate(u64::MAX, 2, punch), Err(libc::EINVAL));
        let mut buf = vec![1u8; 65536];
        fs.image.read(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 9));
        assert!(buf[8192..12288].iter().all(|&b| b == 0));
        assert!(buf[61440..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_read_only_export_refuses_fallocate_and_truncate() {
        let fs = fs_over(&[1u8; 4096], true);
        assert_eq!(
            fs.do_fallocate(0, 512, libc::FALLOC_FL_ZERO_RANGE),
            Err(libc::EROFS)
        );
        let mut b = [0u8; 4096];
        fs.image.read(&mut b, 0).unwrap();
        assert_eq!(b, [1u8; 4096]);
    }

    #[test]
    fn truncating_zeroes_the_tail_but_keeps_the_size() {
        let fs = fs_over(&[5u8; 8192], false);
        fs.zero_tail(1000).unwrap();
        assert_eq!(fs.file_attr().size, 8192);
        let mut b = vec![0u8; 8192];
        fs.image.read(&mut b, 0).unwrap();
        assert!(b[..1000].iter().all(|&x| x == 5));
        assert!(b[1000..].iter().all(|&x| x == 0));
    }
}
