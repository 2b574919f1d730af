//! `imgloop resize`.

use crate::common::{fail, open_image};
use imgloop::size::parse_size;
use imgloop::{Error, Preallocation};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop resize disk.img 20G
  imgloop resize disk.img +1G
  imgloop resize --shrink disk.img -512M")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Preallocation of the added space: off, falloc, full (metadata for some formats).
    #[arg(long, default_value = "off")]
    preallocation: String,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(a: Args) -> u8 {
    match resize(&a) {
        Ok(()) => {
            if !a.quiet {
                println!("Image resized.");
            }
            0
        }
        Err(e) => fail(&e),
    }
}

fn resize(a: &Args) -> imgloop::Result<()> {
    let prealloc: Preallocation = a.preallocation.parse()?;
    let (sign, text) = match a.size.strip_prefix('+') {
        Some(t) => (1, t),
        None => match a.size.strip_prefix('-') {
            Some(t) => (-1, t),
            None => (0, a.size.as_str()),
        },
    };
    let amount = parse_size(text)?;
    let img = open_image(&a.file, a.format.as_deref(), false, false, &a.objects)?;
    let cur = img.size();
    let new = match sign {
        1 => cur
            .checked_add(amount)
            .ok_or_else(|| Error::invalid_argument("new size is too large"))?,
        -1 => cur.checked_sub(amount).ok_or_else(|| {
            Error::invalid_argument("Image size cannot be negative").in_file(&a.file)
        })?,
        _ => amount,
    };
    if new < cur && !a.shrink {
        return Err(Error::invalid_argument(
            "Use the --shrink option to perform a shrink operation.",
        )
        .in_file(&a.file));
    }
    img.resize(new, prealloc, a.shrink)?;
    img.close()
}
