//! `imgloop check`, with qemu-img's exit codes.

use crate::common::{open, print_json, report, Output};
use imgloop::{CheckReport, ErrorKind, RepairMode};
use serde::Serialize;
use std::path::PathBuf;

/// Exit code: the image is consistent.
pub const EXIT_CLEAN: u8 = 0;
/// Exit code: the check could not be completed.
pub const EXIT_NOT_COMPLETED: u8 = 1;
/// Exit code: corruptions found.
pub const EXIT_CORRUPT: u8 = 2;
/// Exit code: only leaks found.
pub const EXIT_LEAKS: u8 = 3;
/// Exit code: the format has no check.
pub const EXIT_UNSUPPORTED: u8 = 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Repair {
    /// Repair leaked clusters only.
    Leaks,
    /// Repair leaks and corruptions.
    All,
}

#[derive(clap::Args)]
#[command(
    after_help = "Exit codes: 0 no errors, 1 check not completed, 2 corruptions found,
3 leaks found (no corruptions), 63 the format does not support checks.

Examples:
  imgloop check disk.qcow2
  imgloop check -r leaks disk.qcow2
  imgloop check --output json disk.qcow2"
)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Repair what is found.
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<Repair>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Open without taking locks (only without -r).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Quiet: print nothing.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image file.
    file: PathBuf,
}

#[derive(Serialize)]
struct JsonCheck<'a> {
    #[serde(flatten)]
    report: &'a CheckReport,
    filename: String,
    format: &'static str,
}

/// The exit code qemu-img gives a finished check.
pub fn exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        EXIT_NOT_COMPLETED
    } else if r.corruptions > 0 {
        EXIT_CORRUPT
    } else if r.leaks > 0 {
        EXIT_LEAKS
    } else {
        EXIT_CLEAN
    }
}

fn print_human(r: &CheckReport) {
    for m in &r.messages {
        println!("{m}");
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        println!("The following inconsistencies were found and repaired:\n");
        println!("    {} leaked clusters", r.leaks_fixed);
        println!("    {} corruptions\n", r.corruptions_fixed);
    }
    if r.check_errors == 0 && r.corruptions == 0 && r.leaks == 0 {
        println!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        println!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        println!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    if r.check_errors > 0 {
        println!(
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters) {
        if total > 0 && alloc > 0 {
            let pct = |n: u64| n as f64 * 100.0 / total as f64;
            let frag = r.fragmented_clusters.unwrap_or(0) as f64 * 100.0 / alloc as f64;
            let comp = r.compressed_clusters.unwrap_or(0) as f64 * 100.0 / alloc as f64;
            println!(
                "{alloc}/{total} = {:.2}% allocated, {frag:.2}% fragmented, {comp:.2}% compressed clusters",
                pct(alloc)
            );
        }
    }
    if let Some(end) = r.image_end_offset {
        println!("Image end offset: {end}");
    }
}

pub fn run(a: Args) -> u8 {
    let repair = a.repair.map(|r| match r {
        Repair::Leaks => RepairMode::Leaks,
        Repair::All => RepairMode::All,
    });
    let img = match open(
        &a.file,
        a.format.as_deref(),
        repair.is_none(),
        a.force_share,
    ) {
        Ok(i) => i,
        Err(e) => {
            report(&e);
            return EXIT_NOT_COMPLETED;
        }
    };
    let r = match img.check(repair) {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            report(&e);
            return EXIT_UNSUPPORTED;
        }
        Err(e) => {
            report(&e);
            return EXIT_NOT_COMPLETED;
        }
    };
    if !a.quiet {
        match a.output {
            Output::Json => print_json(&JsonCheck {
                report: &r,
                filename: img.name().to_string(),
                format: img.format(),
            }),
            Output::Human => print_human(&r),
        }
    }
    if let Err(e) = img.close() {
        report(&e);
        return EXIT_NOT_COMPLETED;
    }
    exit_code(&r)
}
