//! `imgloop commit`: write the data an image holds into its backing file,
//! then (unless `-d`) empty the image so it reads as the backing file
//! again, as `qemu-img commit` does.

use crate::common::{fail, open_with};
use crate::progress::Progress;
use imgloop::size::parse_size;
use imgloop::{Error, Image, OpenOptions, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop commit overlay.qcow2          # into its backing file, overlay emptied
  imgloop commit -d -p overlay.qcow2    # keep the overlay's data
  imgloop commit -b base.qcow2 top.qcow2   # every layer above base.qcow2 into it")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image of the backing chain to commit into (default: the backing
    /// file); implies `-d`.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Do not empty the image after committing.
    #[arg(short = 'd')]
    keep: bool,
    /// Rate limit in bytes per second (suffixes k, M, G).
    #[arg(short = 'r', value_name = "RATE")]
    rate: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted for qemu-img compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image.
    file: PathBuf,
}

pub fn run(a: Args) -> u8 {
    match commit(&a) {
        Ok(()) => {
            if !a.quiet {
                println!("Image committed.");
            }
            0
        }
        Err(e) => fail(&e),
    }
}

fn commit(a: &Args) -> Result<()> {
    if let Some(c) = &a.cache {
        crate::common::check_cache_mode(c, false)?;
    }
    let rate = match &a.rate {
        Some(r) => Some(parse_size(r)?.max(1)),
        None => None,
    };
    // As in qemu-img, naming the base (`-b`) implies `-d`.
    let keep = a.keep || a.base.is_some();
    let spec = a.objects.spec(&a.file, a.format.as_deref())?;
    // The image without its chain (the backing file is opened for writing
    // below, and two opens of one file would conflict).
    let img = open_with(
        &spec.path,
        &OpenOptions {
            format: spec.format,
            read_only: keep,
            driver_options: spec.options,
            secrets: a.objects.secrets()?,
            policy: imgloop::FilePolicy::like_qemu_img().without_backing(),
            ..Default::default()
        },
    )?;
    let Some(backing) = img.backing_ref() else {
        return Err(Error::invalid_argument("Image does not have a backing file").in_file(&a.file));
    };
    let path = img
        .path()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| a.file.clone());
    let base_path = imgloop::FilePolicy::resolve(Some(&path), &backing.filename);
    if let Some(b) = &a.base {
        if !imgloop::image::same_file(b, &base_path) {
            drop(img);
            return commit_deeper(a, b, rate);
        }
    }
    let base = Image::open(
        &base_path,
        &OpenOptions {
            format: backing.format.clone(),
            policy: imgloop::FilePolicy::like_qemu_img(),
            secrets: a.objects.secrets()?,
            ..OpenOptions::read_write(None)
        },
    )
    .map_err(|e| Error::new(e.kind(), format!("Could not open the backing file: {e}")))?;
    if base.size() < img.size() {
        // The base grows to hold everything, as qemu-img's commit does.
        base.resize(img.size(), imgloop::Preallocation::Off, false)?;
    }
    copy_above(a, &img, 1, &base, rate)?;
    // The data is durable in the base before the image lets go of it.
    base.sync()?;
    base.close()?;
    if !keep {
        img.make_empty()?;
    }
    img.close()
}

/// `commit -b BASE` with BASE deeper in the chain than the backing file:
/// everything the layers above BASE hold is written into BASE, and nothing
/// else changes (as in qemu-img, `-b` implies `-d`: the image keeps its
/// data, and the layers between it and BASE now hold data BASE has too).
fn commit_deeper(a: &Args, base_name: &Path, rate: Option<u64>) -> Result<()> {
    let spec = a.objects.spec(&a.file, a.format.as_deref())?;
    // The whole chain, read-only and without locks: BASE is opened for
    // writing below, and only ranges held above it are read.
    let top = open_with(
        &spec.path,
        &OpenOptions {
            format: spec.format,
            read_only: true,
            force_share: true,
            driver_options: spec.options,
            secrets: a.objects.secrets()?,
            policy: imgloop::FilePolicy::like_qemu_img(),
            ..Default::default()
        },
    )?;
    let Some((depth, layer)) = top.chain().into_iter().enumerate().skip(1).find(|(_, l)| {
        l.path()
            .is_some_and(|p| imgloop::image::same_file(p, base_name))
    }) else {
        return Err(Error::invalid_argument(format!(
            "Did not find '{}' in the backing chain of '{}'",
            base_name.display(),
            a.file.display()
        )));
    };
    let base_path = layer.path().map(Path::to_path_buf).unwrap_or_default();
    let base = Image::open(
        &base_path,
        &OpenOptions {
            format: Some(layer.format().to_string()),
            policy: imgloop::FilePolicy::like_qemu_img(),
            secrets: a.objects.secrets()?,
            ..OpenOptions::read_write(None)
        },
    )
    .map_err(|e| Error::new(e.kind(), format!("Could not open the base image: {e}")))?;
    if base.size() < top.size() {
        base.resize(top.size(), imgloop::Preallocation::Off, false)?;
    }
    copy_above(a, &top, depth, &base, rate)?;
    base.sync()?;
    base.close()
}

/// Writes into `base` every range that a layer of `img`'s chain above
/// depth `limit` holds (data, or zeroes it stores as such), read through
/// `img`; `-r` and `-p` apply.
fn copy_above(a: &Args, img: &Image, limit: usize, base: &Image, rate: Option<u64>) -> Result<()> {
    let size = img.size();
    let start = Instant::now();
    let mut done = 0u64;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let progress = Progress::new(a.progress && !a.quiet, size);
    while pos < size {
        let (st, depth) = img.block_status_chain(pos, size - pos)?;
        let end = pos + st.len.max(1);
        if st.allocated && depth < limit {
            if st.zero {
                base.write_zeroes(pos, end - pos, false)?;
                done += end - pos;
            } else {
                let mut p = pos;
                while p < end {
                    let n = ((end - p) as usize).min(buf.len());
                    img.read(&mut buf[..n], p)?;
                    base.write(&buf[..n], p)?;
                    p += n as u64;
                    done += n as u64;
                    if let Some(r) = rate {
                        // No faster than `r` bytes per second on average.
                        let due = Duration::from_secs_f64(done as f64 / r as f64);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            }
        }
        pos = end;
        progress.set(pos);
    }
    progress.finish();
    Ok(())
}
