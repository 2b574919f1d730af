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
    /// Set in BITMAP every bit of the bitmap SOURCE (of this image, or of
    /// the -b file).
    #[arg(long, value_name = "SOURCE")]
    merge: Vec<String>,
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

/// Where each operation flag stands on the command line (qemu-img runs
/// the operations in that order).
fn positions(flag: &str) -> Vec<usize> {
    let eq = format!("{flag}=");
    std::env::args()
        .enumerate()
        .filter(|(_, a)| a == flag || a.starts_with(&eq))
        .map(|(i, _)| i)
        .collect()
}

/// One operation, before the image is open (a merge's source is read then).
enum Step {
    Op(&'static str, BitmapOp),
    Merge(String),
}

fn bitmap(a: &Args) -> Result<()> {
    let name = a.bitmap.clone();
    // (position on the command line, operation)
    let mut steps: Vec<(usize, Step)> = Vec::new();
    let first = |flag: &str, fallback: usize| positions(flag).first().copied().unwrap_or(fallback);
    if a.add {
        let granularity = match &a.granularity {
            Some(g) => Some(parse_size(g)?),
            None => None,
        };
        steps.push((
            first("--add", 0),
            Step::Op(
                "add",
                BitmapOp::Add {
                    name: name.clone(),
                    granularity,
                    enabled: true,
                },
            ),
        ));
    } else if a.granularity.is_some() {
        return Err(Error::invalid_argument(
            "granularity only supported with --add",
        ));
    }
    if a.clear {
        steps.push((
            first("--clear", 1),
            Step::Op("clear", BitmapOp::Clear(name.clone())),
        ));
    }
    if a.enable {
        steps.push((
            first("--enable", 2),
            Step::Op("enable", BitmapOp::Enable(name.clone())),
        ));
    }
    if a.disable {
        steps.push((
            first("--disable", 3),
            Step::Op("disable", BitmapOp::Disable(name.clone())),
        ));
    }
    let merge_at = positions("--merge");
    for (i, src) in a.merge.iter().enumerate() {
        steps.push((
            merge_at.get(i).copied().unwrap_or(4 + i),
            Step::Merge(src.clone()),
        ));
    }
    if a.merge.is_empty() && (a.source_file.is_some() || a.source_format.is_some()) {
        return Err(Error::invalid_argument(
            "-b and -F are only used with --merge",
        ));
    }
    if a.remove {
        steps.push((
            first("--remove", usize::MAX),
            Step::Op("remove", BitmapOp::Remove(name.clone())),
        ));
    }
    if steps.is_empty() {
        return Err(Error::invalid_argument(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    steps.sort_by_key(|(at, _)| *at);
    let img = open_image(&a.file, a.format.as_deref(), false, false, &a.objects)?;
    let source_img = match &a.source_file {
        Some(f) if !a.merge.is_empty() => Some(open_image(
            f,
            a.source_format.as_deref(),
            true,
            true,
            &a.objects,
        )?),
        _ => None,
    };
    for (_, step) in steps {
        let (what, result) = match step {
            Step::Op(what, op) => (what, img.bitmap(&op)),
            Step::Merge(src) => {
                let from = source_img.as_ref().unwrap_or(&img);
                let r = from.bitmap_read(&src).and_then(|bits| {
                    if bits.size() != img.size() {
                        return Err(Error::invalid_argument(format!(
                            "Bitmaps are of different sizes: '{src}' covers {} bytes, the \
                             image {}",
                            bits.size(),
                            img.size()
                        )));
                    }
                    img.bitmap(&BitmapOp::Merge {
                        target: name.clone(),
                        source: bits,
                    })
                });
                ("merge", r)
            }
        };
        result.map_err(|e| {
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
