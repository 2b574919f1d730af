//! Linux loop devices: find a free one, bind it to a file, unbind it.
//!
//! Everything goes through the loop driver's ioctls on `/dev/loop-control`
//! and `/dev/loopN` (constants from the kernel's `include/uapi/linux/loop.h`);
//! read-back of a device's state uses sysfs (`/sys/block/loopN/...`).

use imgloop::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `/dev/loop-control`: hands out free loop devices.
pub const LOOP_CONTROL: &str = "/dev/loop-control";

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// The device refuses writes.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// The device unbinds itself when its last user closes it.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// The kernel scans the device for a partition table.
pub const LO_FLAGS_PARTSCAN: u32 = 8;
/// The device does direct I/O on its backing file.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`, the argument of `LOOP_CONFIGURE`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// How to bind a loop device.
#[derive(Clone, Debug, Default)]
pub struct LoopOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Scan for partitions (`/dev/loopNpM`).
    pub partscan: bool,
    /// Unbind when the last user closes the device.
    pub autoclear: bool,
    /// Direct I/O on the backing file (open the backing file `O_DIRECT` too).
    pub direct_io: bool,
    /// Logical block size (512, 1024, 2048 or 4096); 0 lets the kernel choose.
    pub block_size: u32,
    /// Name recorded in the device (`lo_file_name`, shown by `losetup`);
    /// cut to 63 bytes.
    pub file_name: String,
}

impl LoopOptions {
    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.read_only {
            f |= LO_FLAGS_READ_ONLY;
        }
        if self.partscan {
            f |= LO_FLAGS_PARTSCAN;
        }
        if self.autoclear {
            f |= LO_FLAGS_AUTOCLEAR;
        }
        if self.direct_io {
            f |= LO_FLAGS_DIRECT_IO;
        }
        f
    }
}

/// An open loop device (`/dev/loopN`). Keeping it open keeps an
/// autoclear device bound.
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    file: File,
}

/// The path of loop device `n`.
pub fn device_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{n}"))
}

/// The loop device number of a path like `/dev/loop7` (symlinks resolved).
pub fn device_number(path: &Path) -> Option<u32> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = real.file_name()?.to_str()?;
    name.strip_prefix("loop")?.parse().ok()
}

fn ioctl_error(what: String, err: io::Error) -> Error {
    Error::io(what, err)
}

fn open_device(n: u32, writable: bool) -> io::Result<File> {
    let path = device_path(n);
    let mut tries = 0;
    loop {
        match OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            // A device just created by LOOP_CTL_GET_FREE may need a moment
            // before its node appears.
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl LoopDevice {
    /// Binds a free loop device to `backing` (opened read-write unless
    /// `opts.read_only`, and `O_DIRECT` when `opts.direct_io`).
    pub fn attach(backing: &File, opts: &LoopOptions) -> Result<LoopDevice> {
        if !matches!(opts.block_size, 0 | 512 | 1024 | 2048 | 4096) {
            return Err(Error::invalid_argument(format!(
                "invalid sector size {} (expected 512, 1024, 2048 or 4096)",
                opts.block_size
            )));
        }
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(LOOP_CONTROL)
            .map_err(|e| {
                Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "no free loop device: {LOOP_CONTROL}: {}",
                        plain(&e, "is the loop module loaded?")
                    ),
                )
            })?;
        let mut info = LoopInfo64::zeroed();
        info.lo_flags = opts.flags();
        let name = opts.file_name.as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let fd = u32::try_from(backing.as_raw_fd())
            .map_err(|_| Error::invalid_argument("invalid backing file descriptor"))?;
        let mut last_busy = None;
        for _ in 0..32 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a
            // device number or -1; the fd is valid for the call.
            let r = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("no free loop device: {}", plain(&e, "")),
                ));
            }
            let number = r as u32;
            let file = open_device(number, !opts.read_only).map_err(|e| {
                ioctl_error(format!("opening {}", device_path(number).display()), e)
            })?;
            let cfg = LoopConfig {
                fd,
                block_size: opts.block_size,
                info,
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
            // `cfg` is (same layout, checked by a test), alive for the call.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
            if r == 0 {
                return Ok(LoopDevice { number, file });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                // Another process bound this device first: take the next one.
                last_busy = Some(e);
                continue;
            }
            return Err(ioctl_error(
                format!("configuring {}", device_path(number).display()),
                e,
            ));
        }
        Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "no free loop device: {}",
                last_busy.map(|e| plain(&e, "")).unwrap_or_default()
            ),
        ))
    }

    /// Wraps an open file of loop device `number` (e.g. one inherited from
    /// another process).
    pub fn from_file(number: u32, file: File) -> LoopDevice {
        LoopDevice { number, file }
    }

    /// Gives up the open device file, e.g. to hand it to another process.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Opens an existing loop device (for unbinding it).
    pub fn open(number: u32) -> Result<LoopDevice> {
        let file = open_device(number, false)
            .map_err(|e| Error::io("could not open", e).in_file(device_path(number)))?;
        Ok(LoopDevice { number, file })
    }

    /// The device number N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        device_path(self.number)
    }

    /// Writes the device's cached data out and flushes it to the backing file.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("flushing", e).in_file(self.path()))
    }

    /// Unbinds the device from its backing file (`LOOP_CLR_FD`). While other
    /// processes keep the device open, the kernel only marks it and unbinds
    /// it on their last close. A device that is not bound is not an error.
    pub fn clear(&self) -> Result<()> {
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is valid.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), LOOP_CLR_FD) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENXIO) {
                return Err(Error::io("unbinding", e).in_file(self.path()));
            }
        }
        Ok(())
    }

    /// True while the device is bound to a backing file.
    pub fn is_bound(&self) -> bool {
        let mut info = LoopInfo64::zeroed();
        // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into
        // `info`, which has that layout and lives for the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                LOOP_GET_STATUS64,
                &mut info as *mut LoopInfo64,
            )
        };
        r == 0
    }
}

/// Checks that loop devices can be had here: `/dev/loop-control` exists.
pub fn check_loop_available() -> Result<()> {
    match std::fs::metadata(LOOP_CONTROL) {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "no free loop device: {LOOP_CONTROL}: {}",
                plain(&e, "is the loop module loaded?")
            ),
        )),
    }
}

/// True when something holds loop device `n` exclusively: a mounted file
/// system (on it or on one of its partitions), mkfs, a device mapper.
pub fn is_claimed(n: u32) -> bool {
    let r = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
        .open(device_path(n));
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// Processes not in `except` that have loop device `n` open, found by
/// looking at every process's open files (needs root to see them all).
pub fn openers(n: u32, except: &[u32]) -> Vec<u32> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata(device_path(n)) else {
        return Vec::new();
    };
    if !meta.file_type().is_block_device() {
        return Vec::new();
    }
    let rdev = meta.rdev();
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if except.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Facts about a bound loop device, from sysfs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoopState {
    /// The backing file's path.
    pub backing_file: Option<PathBuf>,
    /// Partition scanning is on.
    pub partscan: bool,
    /// Direct I/O is in use.
    pub direct_io: bool,
    /// The device unbinds on last close.
    pub autoclear: bool,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
    /// The device is read-only.
    pub read_only: bool,
}

fn sys_read(n: u32, rel: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{n}/{rel}"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The state of loop device `n`, or `None` when it is not bound.
pub fn loop_state(n: u32) -> Option<LoopState> {
    let backing = sys_read(n, "loop/backing_file")?;
    let flag = |rel: &str| sys_read(n, rel).as_deref() == Some("1");
    Some(LoopState {
        backing_file: Some(PathBuf::from(backing)),
        partscan: flag("loop/partscan"),
        direct_io: flag("loop/dio"),
        autoclear: flag("loop/autoclear"),
        logical_block_size: sys_read(n, "queue/logical_block_size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        read_only: flag("ro"),
    })
}

/// `io::Error` text without the "(os error N)" suffix, with a hint for
/// missing files.
fn plain(e: &io::Error, hint: &str) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(p) => text[..p].to_string(),
        None => text,
    };
    if e.kind() == io::ErrorKind::NotFound && !hint.is_empty() {
        format!("{text} ({hint})")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn device_numbers_come_from_paths() {
        assert_eq!(device_number(Path::new("/dev/loop12")), Some(12));
        assert_eq!(device_number(Path::new("/nonexistent/loopx")), None);
        assert_eq!(device_number(Path::new("/dev/sda")), None);
        assert_eq!(device_path(3), PathBuf::from("/dev/loop3"));
    }

    #[test]
    fn options_map_to_kernel_flags() {
        let o = LoopOptions {
            read_only: true,
            partscan: true,
            autoclear: true,
            direct_io: true,
            ..Default::default()
        };
        assert_eq!(o.flags(), 1 | 4 | 8 | 16);
        assert_eq!(LoopOptions::default().flags(), 0);
    }

    #[test]
    fn a_bad_block_size_is_refused_before_any_ioctl() {
        let f = tempfile::tempfile().unwrap();
        let o = LoopOptions {
            block_size: 3000,
            ..Default::default()
        };
        let e = LoopDevice::attach(&f, &o).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
}
