//! `imgloop create`.

use crate::common::{fail, parse_options};
use imgloop::size::parse_image_size;
use imgloop::{registry, CreateOptions, Error};
use std::path::{Path, PathBuf};

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
    // Sizes are whole 512-byte sectors, rounded up as qemu-img does (its
    // `Formatting` line still shows the size as given).
    let requested = size;
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
        // As qemu-img, the size of an image made over a backing file is
        // the backing file's when none is given.
        let shown = match requested {
            Some(s) => Some(s),
            None => opts.backing_file.as_deref().and_then(|b| {
                let full = imgloop::FilePolicy::resolve(Some(&file), b);
                let o = imgloop::OpenOptions {
                    format: opts.backing_format.clone(),
                    read_only: true,
                    force_share: true,
                    ..Default::default()
                };
                imgloop::Image::open(&full, &o).ok().map(|i| i.size())
            }),
        };
        println!("{}", formatting_line(&file, format, &opts, shown));
    }
    imgloop::create(&file, format, &opts)
}

/// A create option as the `Formatting` line shows it: name, default
/// (shown when the option is not given), and whether it is a size (shown
/// in bytes).
type Shown = (&'static str, Option<&'static str>, bool);

/// The options of each format in the order qemu-img 10 prints them
/// (`size`, `backing_file` and `backing_fmt` included); options imgloop
/// adds come after, then the file options, then anything else.
fn format_order(format: &str) -> &'static [Shown] {
    const QCOW2: &[Shown] = &[
        ("encryption", None, false),
        ("encrypt.format", None, false),
        ("encrypt.key-secret", None, false),
        ("encrypt.cipher-alg", None, false),
        ("encrypt.cipher-mode", None, false),
        ("encrypt.ivgen-alg", None, false),
        ("encrypt.ivgen-hash-alg", None, false),
        ("encrypt.hash-alg", None, false),
        ("encrypt.iter-time", None, false),
        ("cluster_size", Some("65536"), true),
        ("extended_l2", Some("off"), false),
        ("preallocation", None, false),
        ("compression_type", Some("zlib"), false),
        ("size", None, true),
        ("compat", None, false),
        ("backing_file", None, false),
        ("backing_fmt", None, false),
        ("data_file", None, false),
        ("data_file_raw", None, false),
        ("lazy_refcounts", Some("off"), false),
        ("refcount_bits", Some("16"), false),
    ];
    const RAW: &[Shown] = &[("size", None, true), ("preallocation", None, false)];
    const VHDX: &[Shown] = &[
        ("size", None, true),
        ("log_size", Some("1048576"), true),
        ("block_size", Some("0"), true),
        ("subformat", None, false),
        ("block_state_zero", None, false),
    ];
    const QCOW: &[Shown] = &[
        ("size", None, true),
        ("backing_file", None, false),
        ("backing_fmt", None, false),
        ("encryption", None, false),
        ("encrypt.format", None, false),
        ("encrypt.key-secret", None, false),
    ];
    const PARALLELS: &[Shown] = &[
        ("size", None, true),
        ("cluster_size", Some("1048576"), true),
        ("preallocation", None, false),
    ];
    const OTHER: &[Shown] = &[
        ("size", None, true),
        ("backing_file", None, false),
        ("backing_fmt", None, false),
    ];
    match format {
        "qcow2" => QCOW2,
        "raw" => RAW,
        "vhdx" => VHDX,
        "qcow" => QCOW,
        "parallels" => PARALLELS,
        _ => OTHER,
    }
}

/// qemu-img's `Formatting 'FILE', fmt=FMT key=value ...` line: every
/// option given or with a default, sizes in bytes, on/off spelled so.
fn formatting_line(file: &Path, format: &str, opts: &CreateOptions, size: Option<u64>) -> String {
    let mut given: std::collections::BTreeMap<&str, String> = opts
        .options
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    if let Some(s) = size {
        given.insert("size", s.to_string());
    }
    if let Some(b) = &opts.backing_file {
        given.insert("backing_file", b.clone());
    }
    if let Some(b) = &opts.backing_format {
        given.insert("backing_fmt", b.clone());
    }
    let show = |key: &str, value: &str, is_size: bool| -> String {
        let v = match value {
            "true" | "yes" => "on".to_string(),
            "false" | "no" => "off".to_string(),
            v if is_size => imgloop::size::parse_size(v).map_or(v.to_string(), |n| n.to_string()),
            v => v.to_string(),
        };
        format!(" {key}={v}")
    };
    let mut line = format!("Formatting '{}', fmt={format}", file.display());
    for &(key, default, is_size) in format_order(format) {
        match (given.remove(key), default) {
            (Some(v), _) => line.push_str(&show(key, &v, is_size)),
            (None, Some(d)) => line.push_str(&show(key, d, is_size)),
            (None, None) => {}
        }
    }
    let file_opts: [(&str, bool); 2] = [("nocow", false), ("extent_size_hint", true)];
    let (file_given, rest): (Vec<_>, Vec<_>) = given
        .into_iter()
        .partition(|(k, _)| file_opts.iter().any(|(f, _)| f == k));
    for (k, v) in rest {
        line.push_str(&show(k, &v, false));
    }
    for (key, is_size) in file_opts {
        if let Some((_, v)) = file_given.iter().find(|(k, _)| *k == key) {
            line.push_str(&show(key, v, is_size));
        }
    }
    line
}
