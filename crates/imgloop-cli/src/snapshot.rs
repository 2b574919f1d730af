//! `imgloop snapshot`: list, create, apply and delete internal snapshots
//! (qcow2), with qemu-img's flags, messages and exit codes.

use crate::common::{fail, open_image};
use imgloop::{Error, SnapshotSelector};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop snapshot -l disk.qcow2
  imgloop snapshot -c before-upgrade disk.qcow2
  imgloop snapshot -a before-upgrade disk.qcow2
  imgloop snapshot -d before-upgrade disk.qcow2")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Create a snapshot with this name.
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Revert the disk to this snapshot (ID or name).
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete the snapshot with this name.
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Open without taking locks (listing only; the image may be in use).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    file: PathBuf,
}

/// The one operation a command line asks for.
enum Op<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

pub fn run(a: Args) -> u8 {
    let ops = [
        a.list.then_some(Op::List),
        a.create.as_deref().map(Op::Create),
        a.apply.as_deref().map(Op::Apply),
        a.delete.as_deref().map(Op::Delete),
    ];
    let mut chosen = ops.into_iter().flatten();
    let op = chosen.next().unwrap_or(Op::List);
    if chosen.next().is_some() {
        eprintln!("imgloop: Cannot mix '-l', '-a', '-c', '-d'");
        eprintln!("Try 'imgloop snapshot --help' for more info");
        return 1;
    }
    match snapshot(&a, op) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn snapshot(a: &Args, op: Op) -> imgloop::Result<()> {
    let read_only = matches!(op, Op::List);
    if a.force_share && !read_only {
        return Err(Error::invalid_argument(
            "force-share (-U) is only allowed for listing snapshots",
        ));
    }
    let img = open_image(
        &a.file,
        a.format.as_deref(),
        read_only,
        a.force_share,
        &a.objects,
    )?;
    match op {
        Op::List => {
            let info = img.info();
            if !info.snapshots.is_empty() {
                crate::info::print_snapshot_list(&info.snapshots);
            }
        }
        Op::Create(name) => img.snapshot_create(name)?,
        Op::Apply(key) => img.snapshot_apply(key)?,
        Op::Delete(name) => img.snapshot_delete(&SnapshotSelector::by_name(name))?,
    }
    img.close()
}
