//! `imgloop rebase`: give an image a new backing file, as `qemu-img
//! rebase` does. Safe mode (the default) first copies into the image
//! every range it does not hold itself whose content differs between the
//! old and the new backing chain, so the guest sees the same disk; `-u`
//! only changes the name; `-b ""` removes the backing file (copying all
//! of it in).

use crate::common::{fail, open_with};
use crate::progress::Progress;
use imgloop::{Error, Image, OpenOptions, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop rebase -b new-base.qcow2 -F qcow2 overlay.qcow2
  imgloop rebase -u -b moved/base.raw -F raw overlay.qcow2
  imgloop rebase -b \"\" overlay.qcow2     # flatten: no backing file")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The new backing file ("" for none), as it is to be stored.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Unsafe: change the name only (the new file need not exist).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Write the data a safe rebase copies into the image compressed
    /// (whole clusters; formats with compression only).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Open backing files without taking locks.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Cache mode of the image (accepted for qemu-img compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files (accepted for qemu-img compatibility).
    #[arg(short = 'T')]
    source_cache: Option<String>,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image.
    file: PathBuf,
}

pub fn run(a: Args) -> u8 {
    let Some(backing) = a.backing.clone() else {
        if !a.unsafe_mode {
            eprintln!("imgloop: Must specify backing file (-b) or use unsafe mode (-u)");
            eprintln!("Try 'imgloop rebase --help' for more info");
            return 1;
        }
        return match unsafe_rebase(&a, None) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        };
    };
    let result = if a.unsafe_mode {
        unsafe_rebase(&a, Some(&backing))
    } else {
        safe_rebase(&a, &backing)
    };
    match result {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// The image, read-write; `follow` opens its (old) backing chain too.
fn open_image(a: &Args, follow: bool) -> Result<Image> {
    let spec = a.objects.spec(&a.file, a.format.as_deref())?;
    let policy = if follow {
        imgloop::FilePolicy::like_qemu_img()
    } else {
        imgloop::FilePolicy::like_qemu_img().without_backing()
    };
    open_with(
        &spec.path,
        &OpenOptions {
            format: spec.format,
            driver_options: spec.options,
            secrets: a.objects.secrets()?,
            policy,
            ..OpenOptions::read_write(None)
        },
    )
}

fn cannot_change(name: &str, e: Error) -> Error {
    Error::new(
        e.kind(),
        format!("Could not change the backing file to '{name}': {e}"),
    )
}

fn name_and_format<'a>(
    a: &'a Args,
    name: Option<&'a str>,
) -> Result<Option<(&'a str, Option<&'a str>)>> {
    match name.filter(|n| !n.is_empty()) {
        None => Ok(None),
        Some(n) => {
            if a.backing_format.is_none() {
                return Err(cannot_change(
                    n,
                    Error::invalid_argument("backing format must be specified"),
                ));
            }
            Ok(Some((n, a.backing_format.as_deref())))
        }
    }
}

fn unsafe_rebase(a: &Args, name: Option<&str>) -> Result<()> {
    check_caches(a)?;
    let img = open_image(a, false)?;
    check_compression(a, &img)?;
    let new = name_and_format(a, name)?;
    img.set_backing(new)
        .map_err(|e| cannot_change(name.unwrap_or(""), e))?;
    img.close()
}

/// Where a backing file named `name` in the image at `image` is.
fn resolve(image: &Path, name: &str) -> PathBuf {
    imgloop::FilePolicy::resolve(Some(image), name)
}

/// The cache modes given are ones qemu-img knows.
fn check_caches(a: &Args) -> Result<()> {
    if let Some(c) = &a.cache {
        crate::common::check_cache_mode(c, false)?;
    }
    if let Some(c) = &a.source_cache {
        crate::common::check_cache_mode(c, true)?;
    }
    Ok(())
}

/// `-c` needs a format that stores compressed clusters (checked in both
/// modes, as qemu-img does).
fn check_compression(a: &Args, img: &Image) -> Result<()> {
    if a.compress && img.compression_unit().is_none() {
        return Err(Error::unsupported(
            "Compression not supported for this file format",
        ));
    }
    Ok(())
}

fn safe_rebase(a: &Args, name: &str) -> Result<()> {
    check_caches(a)?;
    let new = name_and_format(a, Some(name))?;
    let img = open_image(a, true)?;
    check_compression(a, &img)?;
    let path = img
        .path()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| a.file.clone());
    let new_backing = match new {
        None => None,
        Some((n, fmt)) => {
            let full = resolve(&path, n);
            if imgloop::image::same_file(&full, &path) {
                return Err(cannot_change(
                    n,
                    Error::invalid_argument("the new backing file is the image itself"),
                ));
            }
            let opened = Image::open(
                &full,
                &OpenOptions {
                    format: fmt.map(str::to_string),
                    read_only: true,
                    force_share: a.force_share,
                    policy: imgloop::FilePolicy::like_qemu_img(),
                    secrets: a.objects.secrets()?,
                    ..Default::default()
                },
            )
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("Could not open new backing file '{n}': {e}"),
                )
            })?;
            Some(opened)
        }
    };
    copy_differences(a, &img, new_backing.as_ref())?;
    img.flush()?;
    img.set_backing(new).map_err(|e| cannot_change(name, e))?;
    img.close()
}

/// Writes into `img` every range it does not hold whose old backing
/// content differs from `new`'s (zeroes without a new backing file).
fn copy_differences(a: &Args, img: &Image, new: Option<&Image>) -> Result<()> {
    let size = img.size();
    // Under -c the pieces are the compression units (clusters), so that
    // each can be written compressed.
    let unit = img.compression_unit().filter(|_| a.compress);
    let step = match unit {
        Some(u) => u,
        None => img.info().cluster_size.unwrap_or(65536).clamp(512, 1 << 20),
    };
    let old = img.backing().cloned();
    let mut old_buf = vec![0u8; step as usize];
    let mut new_buf = vec![0u8; step as usize];
    let mut pos = 0u64;
    let progress = Progress::new(a.progress && !a.quiet, size);
    while pos < size {
        let st = img.block_status(pos, size - pos)?;
        let run_end = pos + st.len.max(1);
        if st.allocated {
            pos = run_end;
            continue;
        }
        while pos < run_end {
            let n = (step - pos % step).min(run_end - pos) as usize;
            let o = &mut old_buf[..n];
            match &old {
                Some(b) => b.read_zero_extended(o, pos)?,
                None => o.fill(0),
            }
            let w = &mut new_buf[..n];
            match new {
                Some(b) => b.read_zero_extended(w, pos)?,
                None => w.fill(0),
            }
            if o != w {
                // A whole unit under -c goes compressed; a piece of one (an
                // allocated neighbour shares the cluster) goes plainly.
                let whole = unit.is_some_and(|u| {
                    pos.is_multiple_of(u) && (n as u64 == u || pos + n as u64 == size)
                });
                if whole {
                    img.write_compressed(o, pos)?;
                } else {
                    img.write(o, pos)?;
                }
            }
            pos += n as u64;
            progress.set(pos);
        }
        progress.set(pos);
    }
    progress.finish();
    Ok(())
}
