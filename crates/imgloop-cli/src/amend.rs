//! `imgloop amend`: change options of an existing image in place, as
//! `qemu-img amend` does (`-o compat=0.10`, `refcount_bits=8`,
//! `lazy_refcounts=on`, `size=...`, LUKS key slots with
//! `encrypt.state=active|inactive`, ...).

use crate::common::{fail, open_image, parse_options};
use crate::progress::Progress;
use imgloop::driver::AmendOptions;
use imgloop::Error;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop amend -o compat=0.10 disk.qcow2
  imgloop amend -o refcount_bits=64,lazy_refcounts=on disk.qcow2
  imgloop amend --object secret,id=old,file=old.txt --object secret,id=new,file=new.txt \\
      -o encrypt.state=active,encrypt.new-secret=new \\
      --image-opts driver=qcow2,file.filename=disk.qcow2,encrypt.key-secret=old
  imgloop amend -o help -f qcow2 disk.qcow2")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Options to change, `key=value[,...]` (`help` lists them).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow changes that can lose data (overwriting an active key slot,
    /// erasing the last one).
    #[arg(long)]
    force: bool,
    /// Cache mode of the image (accepted for qemu-img compatibility; the
    /// changes are always synced).
    #[arg(short = 't')]
    cache: Option<String>,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    file: PathBuf,
}

pub fn run(a: Args) -> u8 {
    if a.options.is_empty() {
        eprintln!("imgloop: Must specify options (-o)");
        eprintln!("Try 'imgloop amend --help' for more info");
        return 1;
    }
    match amend(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn amend(a: &Args) -> imgloop::Result<()> {
    if let Some(c) = &a.cache {
        crate::common::check_cache_mode(c, false)?;
    }
    let options = parse_options(&a.options)?;
    if options.contains_key("help") || options.contains_key("?") {
        let img = open_image(&a.file, a.format.as_deref(), true, true, &a.objects)?;
        if img.format() != "qcow2" {
            return Err(Error::unsupported(format!(
                "Format driver '{}' does not support option amendment",
                img.format()
            )));
        }
        println!("Amend options for 'qcow2':");
        for (k, help) in imgloop::formats::qcow2::AMEND_HELP {
            if k.len() < 22 {
                println!("  {k:<22} - {help}");
            } else {
                println!("  {k} - {help}");
            }
        }
        return Ok(());
    }
    let img = open_image(&a.file, a.format.as_deref(), false, false, &a.objects)?;
    // One step, as qemu-img shows an amend that has no long rewrite.
    let progress = Progress::new(a.progress && !a.quiet, 1);
    img.amend(&AmendOptions {
        options,
        secrets: a.objects.secrets()?,
        force: a.force,
    })?;
    img.close()?;
    progress.finish();
    Ok(())
}
