//! `imgloop map`.

use crate::common::{fail, open_image, Output};
use imgloop::size::parse_size;
use imgloop::MapEntry;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop map disk.img
  imgloop map --output json overlay.qcow2
  imgloop map --output json --start-offset 1G --max-length 64M disk.img")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// First guest offset to map.
    #[arg(long = "start-offset", short = 's', value_parser = size_arg)]
    start_offset: Option<u64>,
    /// Map at most this many bytes.
    #[arg(long = "max-length", short = 'l', value_parser = size_arg)]
    max_length: Option<u64>,
    /// Open without taking locks (the image may be in use).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    file: PathBuf,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// One entry as `qemu-img map --output=json` prints it (one line each).
pub fn json_line(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

pub fn run(a: Args) -> u8 {
    let img = match open_image(
        &a.file,
        a.format.as_deref(),
        true,
        a.force_share,
        &a.objects,
    ) {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    let start = a.start_offset.unwrap_or(0);
    let len = a.max_length.unwrap_or(u64::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let chain = img.chain();
    /// Why the walk stopped early.
    enum Stop {
        Failed(imgloop::Error),
        Transformed,
    }
    let mut first = true;
    let mut stop = None;
    if a.output == Output::Human {
        let _ = writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        );
    } else {
        let _ = write!(out, "[");
    }
    // Extents are printed as the walk finds them, so memory stays
    // bounded however fragmented the image is.
    let walked = img.map_each(start, len, |e| {
        match a.output {
            Output::Json => {
                let sep = if first { "" } else { ",\n" };
                first = false;
                let _ = write!(out, "{sep}{}", json_line(&e));
            }
            // As qemu-img: only data that does not read as zeroes is listed
            // (a data cluster over a hole in the file reads as zeroes).
            Output::Human if !e.data || e.zero => {}
            Output::Human if e.compressed || e.encrypted => {
                // As qemu-img: such data has no place to show.
                stop = Some(Stop::Transformed);
                return Err(imgloop::Error::unsupported("transformed data"));
            }
            Output::Human => {
                if let Some(o) = e.offset {
                    let file = e
                        .file
                        .clone()
                        .unwrap_or_else(|| chain[e.depth].name().to_string());
                    let _ = writeln!(
                        out,
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(o),
                        file
                    );
                }
            }
        }
        Ok(())
    });
    if let Err(e) = walked {
        stop.get_or_insert(Stop::Failed(e));
    }
    match stop {
        Some(Stop::Transformed) => {
            let _ = out.flush();
            eprintln!("imgloop: File contains external, encrypted or compressed clusters.");
            return 1;
        }
        Some(Stop::Failed(e)) => {
            let _ = out.flush();
            return fail(&e);
        }
        None => {}
    }
    if a.output == Output::Json {
        let _ = writeln!(out, "]");
    }
    let _ = out.flush();
    0
}
