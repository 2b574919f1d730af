//! `imgloop commit`: write the data an image holds into its backing file,
//! then (unless `-d`) empty the image so it reads as the backing file
//! again, as `qemu-img commit` does.

use crate::common::{fail, open_with};
use imgloop::size::parse_size;
use imgloop::{Error, Image, OpenOptions, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop commit overlay.qcow2          # into its backing file, overlay emptied
  imgloop commit -d -p overlay.qcow2    # keep the overlay's data")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The backing file to commit into (imgloop: the image's own backing file).
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
    let spec = a.objects.spec(&a.file, a.format.as_deref())?;
    // The image without its chain (the backing file is opened for writing
    // below, and two opens of one file would conflict).
    let img = open_with(
        &spec.path,
        &OpenOptions {
            format: spec.format,
            read_only: a.keep,
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
            return Err(Error::unsupported(format!(
                "'{}' is not the image's backing file ('{}'); imgloop commits into the direct backing file only",
                b.display(),
                base_path.display()
            )));
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
    let size = img.size();
    let start = Instant::now();
    let mut done = 0u64;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        let st = img.block_status(pos, size - pos)?;
        let end = pos + st.len.max(1);
        if st.allocated {
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
        if a.progress && !a.quiet {
            print!("    ({:.2}/100%)\r", pos as f64 * 100.0 / size as f64);
        }
    }
    if a.progress && !a.quiet {
        println!("    (100.00/100%)");
    }
    // The data is durable in the base before the image lets go of it.
    base.sync()?;
    base.close()?;
    if !a.keep {
        img.make_empty()?;
    }
    img.close()
}
