//! `imgloop measure`: how large a new image would be, as `qemu-img
//! measure` computes it (for raw and qcow2 targets).

use crate::common::{fail, parse_options, print_json, Output};
use imgloop::size::parse_size;
use imgloop::{CreateOptions, Error};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop measure --size 100G -O qcow2
  imgloop measure -O qcow2 -o cluster_size=2M disk.raw
  imgloop measure --output=json -O qcow2 disk.vmdk")]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Format of the image to measure for.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Its create options, `key=value[,...]`.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure an empty image of this size instead of a source image.
    #[arg(long)]
    size: Option<String>,
    /// Source format (probed when not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Measure an internal snapshot of the source.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Open the source without taking locks.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The source image.
    file: Option<PathBuf>,
}

pub fn run(a: Args) -> u8 {
    match measure(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn measure(a: &Args) -> imgloop::Result<()> {
    let size = match (&a.size, &a.file) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid_argument(
                "--size N cannot be used together with a filename.",
            ))
        }
        (None, None) => {
            return Err(Error::invalid_argument(
                "Either --size N or one filename must be specified.",
            ))
        }
        (Some(s), None) => Some(parse_size(s)?),
        (None, Some(_)) => None,
    };
    let format = imgloop::registry::find(&a.out_format)?;
    let options = parse_options(&a.options)?;
    let source = match &a.file {
        None => None,
        Some(f) => {
            let mut spec = a.objects.spec(f, a.format.as_deref())?;
            if let Some(l) = &a.snapshot {
                spec.options.extend(crate::common::snapshot_options(l)?);
            }
            let opts = imgloop::OpenOptions {
                format: spec.format,
                read_only: true,
                force_share: a.force_share,
                driver_options: spec.options,
                secrets: a.objects.secrets()?,
                policy: imgloop::FilePolicy::like_qemu_img(),
                ..Default::default()
            };
            Some(crate::common::open_with(&spec.path, &opts)?)
        }
    };
    let create = CreateOptions {
        size: size.unwrap_or(0),
        options,
        secrets: a.objects.secrets()?,
        ..Default::default()
    };
    let m = format.measure(&create, source.as_ref())?;
    match a.output {
        Output::Json => print_json(&m),
        Output::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(())
}
