//! `imgloop create`.

use crate::common::{fail, parse_options};
use imgloop::size::parse_image_size;
use imgloop::{registry, CreateOptions, Error};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop create -f raw disk.img 10G
  imgloop create -f raw -o preallocation=falloc disk.img 512M
  imgloop create -f raw -o help")]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format", default_value = "raw")]
    format: String,
    /// Format options, `key=value[,key=value...]`; `-o help` lists them.
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Unsafe: do not open the backing file (the size must be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// `--object` (secrets named by `-o encrypt.key-secret=ID`).
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file to create.
    file: Option<PathBuf>,
    /// Virtual size, with an optional suffix k, M, G, T, P (1024-based).
    size: Option<String>,
}

pub fn run(a: Args) -> u8 {
    match create(a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn create(a: Args) -> imgloop::Result<()> {
    let fmt = registry::find(&a.format)?;
    let mut options = parse_options(&a.options)?;
    if options.contains_key("help") || options.contains_key("?") {
        println!("Supported options:");
        for o in fmt.create_options() {
            println!("  {:<24} - {}", format!("{}=<{}>", o.name, o.kind), o.help);
        }
        return Ok(());
    }
    let file = a
        .file
        .ok_or_else(|| Error::invalid_argument("Expecting image file name"))?;
    let mut size = match options.remove("size") {
        Some(s) => Some(parse_image_size(&s)?),
        None => None,
    };
    if let Some(s) = &a.size {
        size = Some(parse_image_size(s)?);
    }
    let backing = a.backing.or_else(|| options.remove("backing_file"));
    let backing_fmt = a.backing_format.or_else(|| options.remove("backing_fmt"));
    if a.objects.image_opts {
        return Err(Error::invalid_argument("create does not take --image-opts"));
    }
    let new = NewImage {
        size,
        options,
        backing,
        backing_format: backing_fmt,
        secrets: a.objects.secrets()?,
        unsafe_backing: a.unsafe_backing,
    };
    create_with(file, &a.format, new, a.quiet)
}

/// What `create` makes.
struct NewImage {
    size: Option<u64>,
    options: std::collections::BTreeMap<String, String>,
    backing: Option<String>,
    backing_format: Option<String>,
    secrets: imgloop::Secrets,
    unsafe_backing: bool,
}

fn create_with(file: PathBuf, format: &str, new: NewImage, quiet: bool) -> imgloop::Result<()> {
    let NewImage {
        size,
        options,
        backing,
        backing_format,
        secrets,
        unsafe_backing,
    } = new;
    if size.is_none() && (backing.is_none() || unsafe_backing) {
        return Err(
            Error::invalid_argument("Image creation needs a size parameter").in_file(&file),
        );
    }
    // qemu-img 10 no longer probes the format of a new image's backing
    // file: probing raw data is how images get misread.
    if backing.is_some() && backing_format.is_none() {
        return Err(
            Error::invalid_argument("Backing file specified without backing format").in_file(&file),
        );
    }
    // Sizes are whole 512-byte sectors, rounded up as qemu-img does.
    let size = match size {
        Some(s) => Some(
            s.checked_next_multiple_of(512)
                .filter(|&r| r <= imgloop::size::MAX_IMAGE_SIZE)
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "Invalid image size specified. Must be between 0 and {}.",
                        imgloop::size::MAX_IMAGE_SIZE
                    ))
                })?,
        ),
        None => None,
    };
    let opts = CreateOptions {
        size: size.unwrap_or(0),
        options,
        backing_file: backing,
        backing_format,
        secrets,
        unsafe_backing,
    };
    if !quiet {
        let mut line = format!("Formatting '{}', fmt={format}", file.display());
        if let Some(b) = &opts.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(b) = &opts.backing_format {
            line.push_str(&format!(" backing_fmt={b}"));
        }
        for (k, v) in &opts.options {
            line.push_str(&format!(" {k}={v}"));
        }
        if size.is_some() {
            line.push_str(&format!(" size={}", opts.size));
        }
        println!("{line}");
    }
    imgloop::create(&file, format, &opts)
}
