//! imgloop-fuse: any image imgloop can open, as a Linux block device.
//!
//! Two parts, used together by `imgloop attach`:
//!
//! - [`Export`]: a FUSE file system serving an image's virtual disk as one
//!   regular file of the virtual size (read, write, fsync, discard,
//!   write-zeroes, `SEEK_DATA`/`SEEK_HOLE`), on several threads;
//! - [`LoopDevice`]: loop device control through `/dev/loop-control` and
//!   `LOOP_CONFIGURE`, which binds `/dev/loopN` to that file.
//!
//! The kernel's loop driver then turns block I/O on `/dev/loopN` into file
//! I/O on the exported file, which this process serves from the image: a
//! userspace "loop file format" that works on any kernel with FUSE.
//!
//! ```no_run
//! use imgloop::{Image, OpenOptions};
//! use imgloop_fuse::{Export, ExportOptions, LoopDevice, LoopOptions};
//! use std::sync::Arc;
//!
//! let img = Arc::new(Image::open("disk.qcow2".as_ref(), &OpenOptions::read_write(None))?);
//! std::fs::File::create("/run/disk.raw").map_err(|e| imgloop::Error::io("", e))?;
//! let export = Export::start(img, "/run/disk.raw".as_ref(), &ExportOptions::default(), || {})?;
//! let file = std::fs::OpenOptions::new().read(true).write(true).open(export.file())
//!     .map_err(|e| imgloop::Error::io("", e))?;
//! let dev = LoopDevice::attach(&file, &LoopOptions { autoclear: true, ..Default::default() })?;
//! println!("{}", dev.path().display());
//! # Ok::<(), imgloop::Error>(())
//! ```

pub mod export;
pub mod loopdev;
pub mod process;

pub use export::{check_fuse_available, Export, ExportOptions, FILE_NAME, FUSE_DEVICE};
pub use loopdev::{
    check_loop_available, is_claimed, loop_state, LoopDevice, LoopOptions, LoopState, LOOP_CONTROL,
};
