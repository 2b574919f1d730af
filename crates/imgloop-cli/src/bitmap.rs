//! `imgloop bitmap`: add, remove, clear, enable and disable persistent
//! dirty bitmaps of a qcow2 image, as `qemu-img bitmap` does.

use crate::common::{fail, open_image};
use imgloop::driver::BitmapOp;
use imgloop::size::parse_size;
use imgloop::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop bitmap --add disk.qcow2 backup-1
  imgloop bitmap --add -g 1M --disable disk.qcow2 frozen
  imgloop bitmap --remove disk.qcow2 backup-1")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Create BITMAP, recording future writes.
    #[arg(long)]
    add: bool,
    /// Granularity of a new bitmap (bytes of disk per bit).
    #[arg(short = 'g', long = "granularity")]
    granularity: Option<String>,
    /// Remove BITMAP.
    #[arg(long)]
    remove: bool,
    /// Clear every bit of BITMAP.
    #[arg(long)]
    clear: bool,
    /// Start recording writes in BITMAP.
    #[arg(long)]
    enable: bool,
    /// Stop recording writes in BITMAP.
    #[arg(long)]
    disable: bool,
    /// Merge the bitmap SOURCE into BITMAP (not yet supported).
    #[arg(long, value_name = "SOURCE")]
    merge: Option<String>,
    /// The file of the --merge source bitmap.
    #[arg(short = 'b', long = "source-file")]
    source_file: Option<PathBuf>,
    /// Format of the --merge source file.
    #[arg(short = 'F', long = "source-format")]
    source_format: Option<String>,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image.
    file: PathBuf,
    /// The bitmap.
    bitmap: String,
}

pub fn run(a: Args) -> u8 {
    match bitmap(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn bitmap(a: &Args) -> Result<()> {
    let mut ops = Vec::new();
    let name = a.bitmap.clone();
    if a.add {
        let granularity = match &a.granularity {
            Some(g) => Some(parse_size(g)?),
            None => None,
        };
        ops.push((
            "add",
            BitmapOp::Add {
                name: name.clone(),
                granularity,
                enabled: true,
            },
        ));
    } else if a.granularity.is_some() {
        return Err(Error::invalid_argument(
            "granularity only supported with --add",
        ));
    }
    if a.clear {
        ops.push(("clear", BitmapOp::Clear(name.clone())));
    }
    if a.enable {
        ops.push(("enable", BitmapOp::Enable(name.clone())));
    }
    if a.disable {
        ops.push(("disable", BitmapOp::Disable(name.clone())));
    }
    if a.merge.is_some() || a.source_file.is_some() || a.source_format.is_some() {
        return Err(Error::unsupported("bitmap --merge is not supported yet"));
    }
    if a.remove {
        ops.push(("remove", BitmapOp::Remove(name.clone())));
    }
    if ops.is_empty() {
        return Err(Error::invalid_argument(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let img = open_image(&a.file, a.format.as_deref(), false, false, &a.objects)?;
    for (what, op) in &ops {
        img.bitmap(op).map_err(|e| {
            let err = Error::new(
                e.kind(),
                format!("Operation {what} on bitmap {name} failed: {}", e.message()),
            );
            match e.file() {
                Some(f) => err.in_file(f),
                None => err,
            }
        })?;
    }
    img.close()
}
