//! `imgloop compare`, with qemu-img's messages and exit codes.

use crate::common::{open_image, report};
use crate::progress::Progress;
use imgloop::storage::is_zero;
use imgloop::{Image, Result};
use std::path::PathBuf;

/// Exit code: the images differ.
const EXIT_DIFFERENT: u8 = 1;
/// Exit code: an error kept the comparison from finishing.
const EXIT_ERROR: u8 = 2;

/// Bytes compared per step.
const CHUNK: u64 = 4 << 20;

#[derive(clap::Args)]
#[command(
    after_help = "Exit codes: 0 the images are identical, 1 they differ (the first
differing sector's offset is printed), 2 an error occurred.
Images of different sizes compare equal when the longer one holds only
zeroes past the end of the shorter, unless -s (strict) is given.

Examples:
  imgloop compare disk.img copy.img
  imgloop compare -f qcow2 -F raw disk.qcow2 disk.raw"
)]
pub struct Args {
    /// Format of the first image (probed when not given).
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image (probed when not given).
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Strict: fail on different sizes or different allocation status.
    #[arg(short = 's', long)]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p', long)]
    progress: bool,
    /// Source cache mode (accepted for qemu-img compatibility; imgloop
    /// reads through the page cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Open without taking locks (the images may be in use).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Print nothing; only the exit code tells.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

enum Outcome {
    Identical,
    Different(String),
}

pub fn run(a: Args) -> u8 {
    let open = |file: &PathBuf, format: &Option<String>| {
        open_image(file, format.as_deref(), true, a.force_share, &a.objects)
    };
    let cache_ok = match &a.source_cache {
        Some(c) => crate::common::check_cache_mode(c, true),
        None => Ok(()),
    };
    let result = cache_ok
        .and_then(|_| open(&a.a, &a.format_a))
        .and_then(|ia| Ok((ia, open(&a.b, &a.format_b)?)))
        .and_then(|(ia, ib)| compare(&ia, &ib, &a));
    match result {
        Ok(Outcome::Identical) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            0
        }
        Ok(Outcome::Different(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            EXIT_DIFFERENT
        }
        Err(e) => {
            report(&e);
            EXIT_ERROR
        }
    }
}

fn mismatch(offset: u64) -> Outcome {
    // qemu-img reports the start of the first differing 512-byte sector.
    Outcome::Different(format!(
        "Content mismatch at offset {}!",
        offset / 512 * 512
    ))
}

fn compare(ia: &Image, ib: &Image, a: &Args) -> Result<Outcome> {
    let (sa, sb) = (ia.size(), ib.size());
    if sa != sb {
        if a.strict {
            return Ok(Outcome::Different(
                "Strict mode: Image size mismatch!".into(),
            ));
        }
        if !a.quiet {
            println!("Warning: Image size mismatch!");
        }
    }
    let common = sa.min(sb);
    let progress = Progress::new(a.progress && !a.quiet, sa.max(sb));
    let bufsize = CHUNK.min(sa.max(sb)) as usize;
    let mut buf_a = vec![0u8; bufsize];
    let mut buf_b = vec![0u8; bufsize];
    let mut pos = 0;
    while pos < common {
        // Block status over all that is left (a sparse image answers in a
        // few long runs); only data is read, in pieces of CHUNK.
        let (st_a, _) = ia.block_status_chain(pos, common - pos)?;
        let (st_b, _) = ib.block_status_chain(pos, common - pos)?;
        let mut n = st_a.len.min(st_b.len);
        // As qemu-img, strict mode compares the whole status: allocation,
        // data and reads-as-zero.
        let status = |s: &imgloop::BlockStatus| (s.allocated, s.data, s.zero);
        if a.strict && status(&st_a) != status(&st_b) {
            return Ok(Outcome::Different(format!(
                "Strict mode: Offset {pos} block status mismatch!"
            )));
        }
        let zero_a = st_a.zero;
        let zero_b = st_b.zero;
        if !(zero_a && zero_b) {
            n = n.min(CHUNK);
            let len = n as usize;
            let (part_a, part_b) = (&mut buf_a[..len], &mut buf_b[..len]);
            match (zero_a, zero_b) {
                (true, _) => ib.read(part_b, pos)?,
                (_, true) => ia.read(part_a, pos)?,
                _ => {
                    // Both hold data: read them at the same time.
                    std::thread::scope(|s| {
                        let other = s.spawn(|| ib.read(part_b, pos));
                        let mine = ia.read(part_a, pos);
                        mine.and(other.join().expect("reader thread"))
                    })?;
                }
            }
            let diff = match (zero_a, zero_b) {
                (true, _) => first_nonzero(&buf_b[..len]),
                (_, true) => first_nonzero(&buf_a[..len]),
                _ if buf_a[..len] == buf_b[..len] => None,
                _ => buf_a[..len]
                    .iter()
                    .zip(&buf_b[..len])
                    .position(|(x, y)| x != y),
            };
            if let Some(d) = diff {
                return Ok(mismatch(pos + d as u64));
            }
        }
        pos += n;
        progress.add(n);
    }
    // The longer image must hold only zeroes past the shorter one's end.
    let longer = if sa > sb { ia } else { ib };
    let mut buf = buf_a;
    while pos < longer.size() {
        let (st, _) = longer.block_status_chain(pos, longer.size() - pos)?;
        let mut n = st.len;
        if !st.zero {
            n = n.min(CHUNK);
            let len = n as usize;
            longer.read(&mut buf[..len], pos)?;
            if let Some(d) = first_nonzero(&buf[..len]) {
                return Ok(mismatch(pos + d as u64));
            }
        }
        pos += n;
        progress.add(n);
    }
    progress.finish();
    Ok(Outcome::Identical)
}

fn first_nonzero(buf: &[u8]) -> Option<usize> {
    if is_zero(buf) {
        None
    } else {
        buf.iter().position(|&b| b != 0)
    }
}
