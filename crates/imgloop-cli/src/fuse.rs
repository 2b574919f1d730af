//! `imgloop fuse`: export an image's virtual disk as one regular file.

use crate::common::{fail, open_export};
use imgloop::Result;
use imgloop_fuse::process::StopSignals;
use imgloop_fuse::{Export, ExportOptions};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
#[command(after_help = "\
The virtual disk appears as one regular file of the virtual size: at
MOUNTPOINT itself when it is an existing regular file (as with
qemu-storage-daemon's FUSE export), or as MOUNTPOINT/disk when it is a
directory. It serves read, write, fsync, fallocate punch-hole (discard) and
zero-range, and SEEK_DATA/SEEK_HOLE, so `cp --sparse`, `fallocate` and
`dd conv=sparse` work. Truncating the file keeps its size and zeroes
everything past the new end. The export runs in the foreground until
SIGTERM or SIGINT, which flush the image and unmount.

Examples:
  touch /tmp/disk.raw && imgloop fuse disk.qcow2 /tmp/disk.raw &
  imgloop fuse -r disk.vmdk /mnt/export      # /mnt/export/disk, read-only
  cp --sparse=always /tmp/disk.raw copy.raw")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Export an internal snapshot (ID or name, or
    /// `snapshot.id=ID,snapshot.name=NAME`) read-only instead of the
    /// current disk.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Let other users access the file (FUSE allow_other).
    #[arg(long)]
    allow_other: bool,
    /// Threads serving requests.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    image: PathBuf,
    /// Where the file appears: an existing regular file or directory.
    mountpoint: PathBuf,
}

pub fn run(a: Args) -> u8 {
    match serve(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn serve(a: &Args) -> Result<()> {
    // Before any thread starts, so the stop signals reach `wait` below.
    let signals = StopSignals::block()?;
    imgloop_fuse::check_fuse_available()?;
    let read_only = a.read_only || a.snapshot.is_some();
    let img = Arc::new(open_export(
        &a.image,
        a.format.as_deref(),
        read_only,
        a.snapshot.as_deref(),
        &a.objects,
    )?);
    let opts = ExportOptions {
        read_only,
        allow_other: a.allow_other,
        threads: usize::from(a.threads),
        fs_name: format!("imgloop:{}", a.image.display()),
    };
    let export = Export::start(img, &a.mountpoint, &opts, StopSignals::raise)?;
    signals.wait();
    export.stop()
}
