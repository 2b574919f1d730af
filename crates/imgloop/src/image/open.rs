//! Opening images: on any storage, or as a file with its backing chain
//! (every backing file through the [`FilePolicy`]), and creating image
//! files.

use super::{Image, OpenOptions, PROBE_BYTES};
use crate::driver::{CreateOptions, DriverOpenOptions, Format};
use crate::error::{Error, ErrorKind, Result};
use crate::inflight::RangeLocks;
use crate::lock::{ImageLock, LockMode};
use crate::policy::{FilePolicy, FileRole};
use crate::registry;
use crate::state::OpenState;
use crate::storage::{FileStorage, Storage};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Identity of a host file (device, inode), for loop detection.
pub type FileId = (u64, u64);

impl Image {
    /// Opens the image file at `path` and, as `opts.policy` allows, its
    /// backing chain and data files.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        if opts.force_share && !opts.read_only {
            return Err(Error::invalid_argument(
                "force-share (-U) is only allowed for read-only opens",
            )
            .in_file(path));
        }
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("could not open", e).in_file(path))?;
        if meta.is_dir() {
            // A Parallels disk bundle opens as its top image (whose chain
            // the descriptor gives).
            use crate::formats::parallels::bundle::Bundle;
            if Bundle::is_bundle(path) {
                let top = Bundle::read(path)?.top_file();
                if std::fs::metadata(&top).is_ok_and(|m| m.is_dir()) {
                    return Err(
                        Error::invalid_argument("the bundle's top image is a directory")
                            .in_file(&top),
                    );
                }
                return Image::open(&top, opts);
            }
            return Err(Error::invalid_argument("is a directory, not an image file").in_file(path));
        }
        if let Some(f) = &opts.format {
            // Fail on an unknown format name before touching the file.
            registry::find(f).map_err(|e| e.in_file(path))?;
        }
        let file = FileStorage::open(path, !opts.read_only)
            .map_err(|e| Error::io("could not open", e).in_file(path))?;
        let mut seen = Vec::new();
        Self::open_chain(path, file, opts, 0, &mut seen)
    }

    /// Opens an image on any storage (memory, another image). No locking
    /// and no named files: `backing`, when given, serves as the backing
    /// image.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        format: Option<&str>,
        read_only: bool,
        backing: Option<Arc<Image>>,
    ) -> Result<Image> {
        Self::open_storage_with(storage, format, &DriverOpenOptions::new(read_only), backing)
    }

    /// Like [`open_storage`](Image::open_storage), with driver options
    /// (e.g. `l2-cache-size` for qcow2) and the state the image shares
    /// with its driver.
    pub fn open_storage_with(
        storage: Arc<dyn Storage>,
        format: Option<&str>,
        dopts: &DriverOpenOptions,
        backing: Option<Arc<Image>>,
    ) -> Result<Image> {
        let name = storage.describe();
        let (fmt, probed) = pick_format(&*storage, format, Path::new(&name))?;
        let driver = fmt.open(storage, dopts)?;
        check_snapshot_view(&*driver, dopts)?;
        let backing_ref = driver.backing();
        Ok(Image {
            driver,
            state: dopts.state.clone(),
            backing,
            backing_ref,
            full_backing: None,
            name,
            path: None,
            probed_raw: probed && fmt.name() == "raw",
            locks: Mutex::new(Vec::new()),
            ranges: RangeLocks::new(),
            gate: RwLock::new(()),
        })
    }

    fn open_chain(
        path: &Path,
        mut file: FileStorage,
        opts: &OpenOptions,
        depth: usize,
        seen: &mut Vec<FileId>,
    ) -> Result<Image> {
        let id = {
            let f = file.as_file().expect("a file storage has a file");
            let meta = f
                .metadata()
                .map_err(|e| Error::io("could not open", e).in_file(path))?;
            (meta.dev(), meta.ino())
        };
        if seen.contains(&id) {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                "backing chain loop: this file is already part of the chain",
            )
            .in_file(path));
        }
        seen.push(id);
        if opts.unsafe_cache {
            file = file.ignore_syncs();
        }
        let storage: Arc<dyn Storage> = Arc::new(file);
        let lock_mode = if opts.force_share {
            LockMode::None
        } else if opts.read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let mut locks = vec![ImageLock::acquire(path, lock_mode)?];
        let (fmt, probed) =
            pick_format(&*storage, opts.format.as_deref(), path).map_err(|e| e.in_file(path))?;
        let dopts = DriverOpenOptions {
            state: OpenState::new(opts.read_only),
            path: Some(path.to_path_buf()),
            options: opts.driver_options.clone(),
            policy: opts.policy.clone(),
            companions: BTreeMap::new(),
            secrets: opts.secrets.clone(),
        };
        let driver = fmt.open(storage, &dopts).map_err(|e| e.in_file(path))?;
        check_snapshot_view(&*driver, &dopts).map_err(|e| e.in_file(path))?;
        // The other files of the image (data files) are locked like it.
        for s in &driver.storages()[1..] {
            if let Some(p) = s.path() {
                if !locks.iter().any(|l| l.path() == p) {
                    locks.push(ImageLock::acquire(p, lock_mode)?);
                }
            }
        }
        let backing_ref = driver.backing();
        let mut full_backing = None;
        let mut backing = None;
        if let Some(b) = &backing_ref {
            let full = FilePolicy::resolve(Some(path), &b.filename);
            if opts.policy.backing_files {
                let parent = Self::open_backing(path, &full, b, opts, depth, seen)?;
                driver.check_backing(&parent).map_err(|e| e.in_file(path))?;
                backing = Some(Arc::new(parent));
            }
            full_backing = Some(full);
        }
        Ok(Image {
            driver,
            state: dopts.state,
            backing,
            backing_ref,
            full_backing,
            name: path.display().to_string(),
            path: Some(path.to_path_buf()),
            probed_raw: probed && fmt.name() == "raw",
            locks: Mutex::new(locks),
            ranges: RangeLocks::new(),
            gate: RwLock::new(()),
        })
    }

    /// Opens the backing image `full` named by the image at `path`.
    fn open_backing(
        path: &Path,
        full: &Path,
        b: &crate::driver::BackingRef,
        opts: &OpenOptions,
        depth: usize,
        seen: &mut Vec<FileId>,
    ) -> Result<Image> {
        if depth + 1 > opts.policy.max_depth {
            return Err(Error::new(
                ErrorKind::InvalidFormat,
                format!(
                    "backing chain is deeper than {} images",
                    opts.policy.max_depth
                ),
            )
            .in_file(path));
        }
        if b.format.is_none() && !opts.policy.probe_backing {
            return Err(Error::invalid_argument(format!(
                "backing file '{}' has no format recorded and probing is disabled",
                b.filename
            ))
            .in_file(path));
        }
        let file = opts
            .policy
            .open(FileRole::Backing, Some(path), &b.filename, false)
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "could not open backing file '{}': No such file or directory",
                            full.display()
                        ),
                    )
                    .in_file(path)
                } else {
                    e.in_file(path)
                }
            })?;
        let bopts = OpenOptions {
            format: b.format.clone(),
            read_only: true,
            force_share: opts.force_share,
            policy: opts.policy.clone(),
            driver_options: BTreeMap::new(),
            secrets: opts.secrets.clone(),
            unsafe_cache: false,
        };
        Self::open_chain(full, file, &bopts, depth + 1, seen)
    }
}

/// Chooses the format: the named one, or the best probe. The bool says
/// whether it was probed.
fn pick_format(
    storage: &dyn Storage,
    format: Option<&str>,
    name: &Path,
) -> Result<(&'static dyn Format, bool)> {
    if let Some(f) = format {
        return Ok((registry::find(f)?, false));
    }
    let len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    let mut head = vec![0u8; (PROBE_BYTES as u64).min(len) as usize];
    storage
        .read_at(&mut head, 0)
        .map_err(|e| Error::io("reading the header for probing", e))?;
    Ok((registry::probe(&head, name), true))
}

/// Creates a new image file of `format` at `path`.
///
/// When `opts.size` is 0 and a backing file is given, the size is taken from
/// the backing image. A half-made file is removed on failure.
pub fn create(path: &Path, format: &str, opts: &CreateOptions) -> Result<()> {
    let fmt = registry::find(format).map_err(|e| e.in_file(path))?;
    // Options of the file itself, which qemu-img takes for every format:
    // `nocow` (no copy-on-write on btrfs) and `extent_size_hint` (XFS);
    // both best effort, as in qemu.
    let mut file_opts = opts.clone();
    let nocow = file_opts.get_bool("nocow").map_err(|e| e.in_file(path))?;
    if file_opts
        .get_size("extent_size_hint")
        .map_err(|e| e.in_file(path))?
        .is_some_and(|h| h > u32::MAX as u64)
    {
        return Err(Error::invalid_argument("extent_size_hint must be below 4 GiB").in_file(path));
    }
    file_opts.options.remove("nocow");
    file_opts.options.remove("extent_size_hint");
    let opts = &file_opts;
    opts.check_known(fmt).map_err(|e| e.in_file(path))?;
    if opts.size > crate::size::MAX_IMAGE_SIZE {
        return Err(Error::invalid_argument(format!(
            "Invalid image size specified. Must be between 0 and {}.",
            crate::size::MAX_IMAGE_SIZE
        ))
        .in_file(path));
    }
    let mut opts = opts.clone();
    // Never truncate a file the new image is to use: its backing file or
    // its data file (compared as files, after resolving the names the
    // way the new image will).
    let backing_path = opts
        .backing_file
        .as_deref()
        .map(|b| FilePolicy::resolve(Some(path), b));
    if let Some(full) = &backing_path {
        if same_file(path, full) {
            return Err(Error::invalid_argument(
                "Trying to create an image with the same filename as the backing file",
            )
            .in_file(path));
        }
    }
    if let Some(d) = opts.options.get("data_file") {
        // Created where qemu-img creates it: relative to the working
        // directory.
        let data = PathBuf::from(d);
        if same_file(path, &data) || backing_path.as_deref().is_some_and(|b| same_file(b, &data)) {
            return Err(Error::invalid_argument(format!(
                "the data file '{}' is the image itself or its backing file",
                data.display()
            ))
            .in_file(path));
        }
        // A new data file starts empty: creating the image would wipe an
        // existing image named as data file (qemu-img does, silently). A
        // plain (raw) file is recreated, as qemu-img does.
        if let Some(fmt) = probe_file(&data) {
            return Err(Error::invalid_argument(format!(
                "the data file '{}' is an existing {fmt} image; creating the image would overwrite it",
                data.display()
            ))
            .in_file(path));
        }
    }
    if let Some(b) = opts.backing_file.as_ref().filter(|_| !opts.unsafe_backing) {
        // Named by the caller, not by an untrusted image: open it (alone,
        // without its own chain) for its size and format.
        let full: PathBuf = FilePolicy::resolve(Some(path), b);
        let bopts = OpenOptions {
            format: opts.backing_format.clone(),
            read_only: true,
            force_share: true,
            ..Default::default()
        };
        let backing = Image::open(&full, &bopts)
            .map_err(|e| e.context(format!("could not open backing file '{}'", full.display())))
            .map_err(|e| e.in_file(path))?;
        if opts.size == 0 {
            opts.size = backing.size();
        }
        if opts.backing_format.is_none() {
            opts.backing_format = Some(backing.format().to_string());
        }
    }
    if path.is_dir() {
        return Err(Error::invalid_argument("is a directory, not an image file").in_file(path));
    }
    let existed = path.exists();
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::create(path).map_err(|e| Error::io("could not create", e).in_file(path))?,
    );
    let _lock = ImageLock::acquire(path, LockMode::Exclusive)?;
    if nocow {
        if let Some(f) = storage.as_file() {
            set_nocow(&f);
        }
    }
    let result = fmt
        .create(storage.clone(), Some(path), &opts)
        .and_then(|_| storage.sync().map_err(|e| Error::io("syncing", e)));
    if let Err(e) = result {
        if !existed {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.in_file(path));
    }
    Ok(())
}

/// The format of the existing file at `path` when one other than raw
/// claims it.
fn probe_file(path: &Path) -> Option<&'static str> {
    let f = FileStorage::open(path, false).ok()?;
    let len = f.len().ok()?;
    let mut head = vec![0u8; (PROBE_BYTES as u64).min(len) as usize];
    f.read_at(&mut head, 0).ok()?;
    registry::probe_non_raw(&head)
}

/// Identity of an existing file: (device, inode).
pub fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// True when `a` and `b` both exist and are the same file (hard links and
/// symlinks included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    matches!((file_id(a), file_id(b)), (Some(x), Some(y)) if x == y)
}

impl Image {
    /// Every host file this image and its backing chain read or write:
    /// image files and the files their drivers keep data in.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for img in self.chain() {
            for s in img.driver().storages() {
                if let Some(p) = s.path() {
                    if !out.iter().any(|o| o == p) {
                        out.push(p.to_path_buf());
                    }
                }
            }
        }
        out
    }
}

/// Sets the no-copy-on-write attribute (`chattr +C`) on a new, empty file.
/// Filesystems without it (ext4, tmpfs) refuse; that is ignored, as
/// qemu-img ignores it.
fn set_nocow(file: &std::fs::File) {
    use std::os::unix::io::AsRawFd;
    const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
    let fd = file.as_raw_fd();
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long through the pointer, which
    // points at a live local; the fd is open for the call's duration.
    if unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return;
    }
    flags |= FS_NOCOW_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one long through the pointer, a live
    // local; the result is only advisory.
    let _ = unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) };
}

/// A request to open an internal snapshot that the format does not
/// understand is an error, not the current disk shown instead.
fn check_snapshot_view(driver: &dyn crate::Driver, dopts: &DriverOpenOptions) -> Result<()> {
    let asked = ["snapshot", "snapshot.id", "snapshot.name"]
        .iter()
        .any(|k| dopts.options.contains_key(*k));
    if asked && !driver.shows_snapshot() {
        return Err(Error::unsupported(
            "Failed to load snapshot: Operation not supported",
        ));
    }
    Ok(())
}
