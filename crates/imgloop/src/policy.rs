//! Which files an image may make imgloop open.
//!
//! An image names other files: a backing file, an external data file,
//! later VMDK extents and VHDX parent locators. Opening whatever a
//! downloaded image names is how a hostile image reads `/etc/shadow` into
//! a guest or hangs a tool on a FIFO. Every such file opens through one
//! [`FilePolicy`]: it says which roles may be opened at all, and the open
//! itself refuses anything that is not a regular file (or, when allowed, a
//! block device) and anything inside `/proc` or `/sys`, checked on the
//! opened descriptor so a symlink swap cannot slip past.
//!
//! The library default ([`FilePolicy::default`]) is safe for untrusted
//! images: no backing or data files at all unless the caller allows them.
//! [`FilePolicy::like_qemu_img`] is what the command line uses: follow
//! what the image names, as qemu-img does.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::FileStorage;
use std::path::{Path, PathBuf};

/// What a named file is to the image that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileRole {
    /// The backing (parent) image of a copy-on-write layer.
    Backing,
    /// A file holding the guest data of an image that keeps only metadata
    /// (qcow2 `data_file`, VMDK extents).
    DataFile,
}

impl FileRole {
    fn name(self) -> &'static str {
        match self {
            FileRole::Backing => "backing file",
            FileRole::DataFile => "data file",
        }
    }
}

/// Rules for opening files named inside images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePolicy {
    /// Open backing files. When false, an image with a backing file still
    /// opens, and its unallocated ranges read as zeroes.
    pub backing_files: bool,
    /// Open external data files. When false, an image that needs one
    /// fails to open with [`ErrorKind::Refused`].
    pub data_files: bool,
    /// Longest allowed chain below the top image.
    pub max_depth: usize,
    /// Probe the format of a backing file whose header does not name one.
    /// When false, such a backing file is an error.
    pub probe_backing: bool,
    /// A named file may be a block device (an LVM volume as backing file).
    pub block_devices: bool,
}

impl Default for FilePolicy {
    /// Safe for untrusted images: opens no named file.
    fn default() -> Self {
        FilePolicy {
            backing_files: false,
            data_files: false,
            max_depth: 16,
            probe_backing: false,
            block_devices: false,
        }
    }
}

impl FilePolicy {
    /// Follows backing and data files as qemu-img does (regular files and
    /// block devices, probing a backing format that is not recorded).
    pub fn like_qemu_img() -> Self {
        FilePolicy {
            backing_files: true,
            data_files: true,
            max_depth: 16,
            probe_backing: true,
            block_devices: true,
        }
    }

    /// This policy with backing files off (`--no-backing`-style opt-out).
    pub fn without_backing(mut self) -> Self {
        self.backing_files = false;
        self
    }

    /// True when files of `role` may be opened at all.
    pub fn allows(&self, role: FileRole) -> bool {
        match role {
            FileRole::Backing => self.backing_files,
            FileRole::DataFile => self.data_files,
        }
    }

    /// Where `name`, as stored in the image at `image` (if the image is a
    /// file), lives: relative names are relative to the image's directory.
    pub fn resolve(image: Option<&Path>, name: &str) -> PathBuf {
        let n = Path::new(name);
        if n.is_absolute() {
            return n.to_path_buf();
        }
        match image.and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(n),
            _ => n.to_path_buf(),
        }
    }

    /// Opens the file `name` that the image at `image` names in `role`,
    /// with write access when `writable`. Refused (with
    /// [`ErrorKind::Refused`]) when the policy does not allow the role,
    /// or the file is a device node other than an allowed block device, a
    /// FIFO, a socket, or lies in `/proc` or `/sys`.
    pub fn open(
        &self,
        role: FileRole,
        image: Option<&Path>,
        name: &str,
        writable: bool,
    ) -> Result<FileStorage> {
        let mut path = Self::resolve(image, name);
        // qemu resolves a data file's relative name against its working
        // directory (where qemu-img create puts it); imgloop looks next to
        // the image first, then there.
        if role == FileRole::DataFile && !path.exists() && Path::new(name).exists() {
            path = PathBuf::from(name);
        }
        if !self.allows(role) {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "the image names the {} '{}' and the open policy does not allow opening it",
                    role.name(),
                    path.display()
                ),
            ));
        }
        let what = || format!("could not open {} '{}'", role.name(), path.display());
        let file = open_checked(&path, writable, self.block_devices).map_err(|e| match e {
            Refusal::Io(e) => Error::io(what(), e),
            Refusal::Kind(why) => Error::new(ErrorKind::Refused, format!("{}: {why}", what())),
        })?;
        Ok(FileStorage::from_file(&path, file))
    }
}

/// Why [`open_checked`] did not give a file.
enum Refusal {
    Io(std::io::Error),
    Kind(&'static str),
}

/// Opens `path` without blocking (a FIFO would block a plain open) and
/// checks what the descriptor is: a regular file, or a block device when
/// `block_devices`; never anything on procfs or sysfs.
fn open_checked(
    path: &Path,
    writable: bool,
    block_devices: bool,
) -> std::result::Result<std::fs::File, Refusal> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(Refusal::Io)?;
    let kind = file.metadata().map_err(Refusal::Io)?.file_type();
    if kind.is_dir() {
        return Err(Refusal::Kind("it is a directory"));
    }
    if kind.is_block_device() && !block_devices {
        return Err(Refusal::Kind("it is a block device"));
    }
    if !kind.is_file() && !kind.is_block_device() {
        return Err(Refusal::Kind(
            "it is not a regular file (a device node, FIFO or socket)",
        ));
    }
    // SAFETY: fstatfs writes into the zeroed struct we own; the fd is
    // owned by `file`.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(Refusal::Io(std::io::Error::last_os_error()));
    }
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    let magic = fs.f_type as i64;
    if magic == PROC_SUPER_MAGIC || magic == SYSFS_MAGIC {
        return Err(Refusal::Kind("it lies in /proc or /sys"));
    }
    // Back to blocking I/O for the regular file or device.
    // SAFETY: F_GETFL/F_SETFL take and return plain flag words.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(Refusal::Io(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_relative_to_the_image_directory() {
        assert_eq!(
            FilePolicy::resolve(Some(Path::new("/a/b/top.qcow2")), "base.raw"),
            PathBuf::from("/a/b/base.raw")
        );
        assert_eq!(
            FilePolicy::resolve(Some(Path::new("top.qcow2")), "base.raw"),
            PathBuf::from("base.raw")
        );
        assert_eq!(
            FilePolicy::resolve(Some(Path::new("/a/top")), "/abs/base"),
            PathBuf::from("/abs/base")
        );
        assert_eq!(FilePolicy::resolve(None, "x"), PathBuf::from("x"));
    }

    #[test]
    fn the_default_opens_no_named_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data");
        std::fs::write(&f, b"x").unwrap();
        for role in [FileRole::Backing, FileRole::DataFile] {
            let e = FilePolicy::default()
                .open(role, None, f.to_str().unwrap(), false)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        }
        FilePolicy::like_qemu_img()
            .open(FileRole::DataFile, None, f.to_str().unwrap(), false)
            .unwrap();
    }

    #[test]
    fn devices_fifos_and_proc_are_refused_even_when_files_are_allowed() {
        let p = FilePolicy::like_qemu_img();
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A symlink to the FIFO does not help.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        for name in [
            fifo.to_str().unwrap(),
            link.to_str().unwrap(),
            "/dev/null",
            "/proc/self/environ",
            "/sys/kernel/mm/transparent_hugepage/enabled",
        ] {
            if !Path::new(name).exists() {
                continue;
            }
            let e = p.open(FileRole::Backing, None, name, false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{name}: {e}");
        }
    }
}
