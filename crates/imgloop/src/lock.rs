//! Image locking compatible with QEMU's.
//!
//! QEMU marks the permissions an opener *holds* with shared OFD byte locks
//! at offset 100 + bit, and the permissions it *refuses to share* at offset
//! 200 + bit (bit 0 consistent read, 1 write, 2 write-unchanged, 3 resize).
//! Using the same bytes makes imgloop and QEMU tools see each other: a
//! running VM keeps `imgloop` from writing its disk, and an `imgloop` writer
//! keeps `qemu-img` out. Locks live on a private file descriptor, so they
//! vanish when the image is closed or the process dies.

use crate::error::{Error, ErrorKind, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// The permissions QEMU's lock bytes stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Perm {
    /// Reads see a consistent image.
    ConsistentRead = 0,
    /// Guest-visible content may change.
    Write = 1,
    /// Writes that do not change content.
    WriteUnchanged = 2,
    /// The image may be resized.
    Resize = 3,
}

const ALL_PERMS: [Perm; 4] = [
    Perm::ConsistentRead,
    Perm::Write,
    Perm::WriteUnchanged,
    Perm::Resize,
];

impl Perm {
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// How an image is to be locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Read-only use that forbids concurrent writers.
    Shared,
    /// Read-write use: no other writer, no other consistent reader.
    Exclusive,
    /// No locks at all (`-U`, `--force-share`): read-only use that tolerates writers.
    None,
}

impl LockMode {
    /// (held, unshared) permission bit sets.
    fn perms(self) -> (u8, u8) {
        let w = Perm::Write.bit() | Perm::Resize.bit();
        match self {
            LockMode::Shared => (Perm::ConsistentRead.bit(), w),
            LockMode::Exclusive => (
                Perm::ConsistentRead.bit() | Perm::Write.bit() | Perm::Resize.bit(),
                w,
            ),
            LockMode::None => (0, 0),
        }
    }
}

/// The locks an open image holds. Dropping it releases them.
#[derive(Debug)]
pub struct ImageLock {
    path: PathBuf,
    fd: Option<File>,
    mode: LockMode,
}

impl ImageLock {
    /// Takes the locks for `mode` on `path`, failing with
    /// [`ErrorKind::InUse`] when another process holds conflicting ones.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock> {
        let mut lock = ImageLock {
            path: path.to_path_buf(),
            fd: None,
            mode: LockMode::None,
        };
        lock.change(mode)?;
        Ok(lock)
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current mode.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Switches to another mode (e.g. shared → exclusive on reopen).
    pub fn change(&mut self, mode: LockMode) -> Result<()> {
        if mode == self.mode {
            return Ok(());
        }
        if mode == LockMode::None {
            self.fd = None;
            self.mode = mode;
            return Ok(());
        }
        if self.fd.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&self.path)
                .map_err(|e| Error::io("opening for locking", e).in_file(&self.path))?;
            self.fd = Some(f);
        }
        let fd = self.fd.as_ref().expect("set above");
        let (held, unshared) = mode.perms();
        // Check before taking anything, so a refused upgrade leaves the old
        // locks as they were.
        for p in ALL_PERMS {
            if held & p.bit() != 0 && locked_by_other(fd, SHARED_BASE + p as i64)? {
                return Err(self.in_use(format!("failed to get \"{}\" lock", p.name())));
            }
            if unshared & p.bit() != 0 && locked_by_other(fd, PERM_BASE + p as i64)? {
                return Err(self.in_use(format!("failed to get shared \"{}\" lock", p.name())));
            }
        }
        for p in ALL_PERMS {
            set_lock(fd, PERM_BASE + p as i64, held & p.bit() != 0)?;
            set_lock(fd, SHARED_BASE + p as i64, unshared & p.bit() != 0)?;
        }
        self.mode = mode;
        Ok(())
    }

    fn in_use(&self, detail: String) -> Error {
        Error::new(
            ErrorKind::InUse,
            format!(
                "image is in use by another process ({detail}); use -U (--force-share) to open it read-only anyway"
            ),
        )
        .in_file(&self.path)
    }
}

fn flock_for(kind: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl.l_pid = 0;
    fl
}

fn locked_by_other(fd: &File, byte: i64) -> Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass, which
    // lives for the whole call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(Error::io("testing image lock", io::Error::last_os_error()));
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn set_lock(fd: &File, byte: i64, on: bool) -> Result<()> {
    let kind = if on { libc::F_RDLCK } else { libc::F_UNLCK };
    let mut fl = flock_for(kind as libc::c_short, byte);
    // SAFETY: F_OFD_SETLK only reads the flock struct, which outlives the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            return Err(Error::new(
                ErrorKind::InUse,
                "image is in use by another process",
            ));
        }
        return Err(Error::io("setting image lock", err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        (d, p)
    }

    #[test]
    fn two_readers_share_but_a_writer_is_refused() {
        let (_d, p) = file();
        let r1 = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let _r2 = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let e = ImageLock::acquire(&p, LockMode::Exclusive).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse);
        assert!(e.to_string().contains("in use"), "{e}");
        drop(r1);
    }

    #[test]
    fn a_writer_keeps_out_readers_but_not_force_share() {
        let (_d, p) = file();
        let w = ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        assert_eq!(
            ImageLock::acquire(&p, LockMode::Shared).unwrap_err().kind(),
            ErrorKind::InUse
        );
        ImageLock::acquire(&p, LockMode::None).unwrap();
        drop(w);
        ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn upgrade_from_shared_to_exclusive_fails_while_another_reader_is_there() {
        let (_d, p) = file();
        let mut a = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let b = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        assert!(a.change(LockMode::Exclusive).is_err());
        assert_eq!(a.mode(), LockMode::Shared);
        drop(b);
        a.change(LockMode::Exclusive).unwrap();
    }
}
