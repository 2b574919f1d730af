//! `imgloop dd`: copy part of an image into a new image, with qemu-img
//! dd's operands (`if=`, `of=`, `bs=`, `count=`, `skip=`), sizes and
//! messages.

use crate::common::{fail, open_image};
use crate::progress::Progress;
use imgloop::{CreateOptions, Error, OpenOptions, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Operands (as dd's):
  if=INPUT        the image to read
  of=OUTPUT       the image to create (format -O, default raw)
  bs=SIZE         block size (default 512; suffixes k, M, G, T, P)
  count=N         copy at most N blocks (default: the whole input)
  skip=N          start N blocks into the input

The output holds min(count * bs, input size) - skip * bs bytes (rounded up
to a sector), as qemu-img dd gives it; every block is written, zeroes
included.

Examples:
  imgloop dd if=disk.qcow2 of=first-mib.raw bs=1M count=1
  imgloop dd -f qcow2 -O qcow2 if=disk.qcow2 of=tail.qcow2 bs=1M skip=1024")]
pub struct Args {
    /// Format of the input (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Format of the output (default raw).
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    output_format: String,
    /// Open the input without taking locks (it may be in use).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Show progress (an addition: qemu-img dd has no `-p`).
    #[arg(short = 'p')]
    progress: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// `if=`, `of=`, `bs=`, `count=`, `skip=`.
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// The operands after parsing.
struct Operands {
    input: PathBuf,
    output: PathBuf,
    block: u64,
    count: Option<u64>,
    skip: u64,
}

fn parse_operands(ops: &[String]) -> Result<Operands> {
    let (mut input, mut output, mut block, mut count, mut skip) = (None, None, 512, None, 0);
    let number = |what: &str, v: &str, max: u64| -> Result<u64> {
        let n = if what == "bs" {
            imgloop::size::parse_size(v).ok()
        } else {
            v.parse::<u64>().ok()
        };
        let min = u64::from(what == "bs");
        n.filter(|n| (min..=max).contains(n)).ok_or_else(|| {
            Error::invalid_argument(format!(
                "Invalid {what} specified. Must be between {min} and {max}."
            ))
        })
    };
    for op in ops {
        let (key, value) = op
            .split_once('=')
            .ok_or_else(|| Error::invalid_argument(format!("unrecognized operand {op}")))?;
        match key {
            "if" => input = Some(PathBuf::from(value)),
            "of" => output = Some(PathBuf::from(value)),
            "bs" => block = number("bs", value, i32::MAX as u64)?,
            "count" => count = Some(number("count", value, i64::MAX as u64)?),
            "skip" => skip = number("skip", value, i64::MAX as u64)?,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unrecognized operand {key}"
                )))
            }
        }
    }
    match (input, output) {
        (Some(input), Some(output)) => Ok(Operands {
            input,
            output,
            block,
            count,
            skip,
        }),
        _ => Err(Error::invalid_argument(
            "Must specify both input and output files",
        )),
    }
}

pub fn run(a: Args) -> u8 {
    match dd(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn dd(a: &Args) -> Result<()> {
    let ops = parse_operands(&a.operands)?;
    let input = open_image(
        &ops.input,
        a.format.as_deref(),
        true,
        a.force_share,
        &a.objects,
    )?;
    let in_size = input.size();
    let wanted = ops
        .count
        .map_or(in_size, |c| c.saturating_mul(ops.block).min(in_size));
    let offset = ops.skip.saturating_mul(ops.block);
    if offset > wanted {
        return Err(Error::invalid_argument("cannot skip to specified offset").in_file(&ops.input));
    }
    let len = wanted - offset;
    let out_size = len.next_multiple_of(512);
    if let (Some(i), Ok(o)) = (input.path(), std::fs::canonicalize(&ops.output)) {
        if std::fs::canonicalize(i).is_ok_and(|i| i == o) {
            return Err(Error::invalid_argument(
                "the output is the input file; refusing to overwrite it",
            )
            .in_file(&ops.output));
        }
    }
    imgloop::create(
        &ops.output,
        &a.output_format,
        &CreateOptions {
            size: out_size,
            ..Default::default()
        },
    )?;
    let out = imgloop::Image::open(
        &ops.output,
        &OpenOptions::read_write(Some(&a.output_format)),
    )?;
    let progress = Progress::new(a.progress, len);
    copy(&input, &out, offset, len, &progress)?;
    progress.finish();
    out.close()
}

/// Copies `len` bytes of `from` at `offset` to the start of `to`, every
/// block written (as qemu-img dd writes them).
fn copy(
    from: &imgloop::Image,
    to: &imgloop::Image,
    offset: u64,
    len: u64,
    progress: &Progress,
) -> Result<()> {
    const CHUNK: u64 = 4 << 20;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        from.read(&mut buf[..n], offset + done)?;
        to.write(&buf[..n], done)?;
        done += n as u64;
        progress.set(done);
    }
    Ok(())
}
