//! `imgloop check`, with qemu-img's exit codes.

use crate::common::{print_json, report, Output};
use imgloop::formats::qcow2::OPEN_FOR_CHECK;
use imgloop::{CheckReport, ErrorKind, OpenOptions, RepairMode};
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
    /// Source cache mode (accepted for qemu-img compatibility; imgloop
    /// reads through the page cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Open without taking locks (only without -r).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Quiet: print nothing.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
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

/// Prints the findings of one pass, on stderr as qemu-img does.
fn print_messages(r: &CheckReport) {
    for m in &r.messages {
        eprintln!("{m}");
    }
}

fn print_human(r: &CheckReport) {
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
    if let Some(end) = r.image_end_offset.filter(|&e| e > 0) {
        println!("Image end offset: {end}");
    }
}

fn fail(e: &imgloop::Error) -> u8 {
    report(e);
    if e.kind() == ErrorKind::Unsupported {
        EXIT_UNSUPPORTED
    } else {
        EXIT_NOT_COMPLETED
    }
}

pub fn run(a: Args) -> u8 {
    if let Some(c) = &a.source_cache {
        if let Err(e) = crate::common::check_cache_mode(c, true) {
            return crate::common::fail(&e);
        }
    }
    let repair = a.repair.map(|r| match r {
        Repair::Leaks => RepairMode::Leaks,
        Repair::All => RepairMode::All,
    });
    // A check may open a damaged image that a normal open refuses: marked
    // corrupt (to repair it), or dirty (the check repairs it, not the open).
    let opened = a
        .objects
        .spec(&a.file, a.format.as_deref())
        .and_then(|spec| {
            let mut driver_options = spec.options;
            driver_options.insert(OPEN_FOR_CHECK.to_string(), "on".to_string());
            let opts = OpenOptions {
                format: spec.format,
                read_only: repair.is_none(),
                force_share: a.force_share,
                driver_options,
                secrets: a.objects.secrets()?,
                policy: imgloop::FilePolicy::like_qemu_img(),
                ..Default::default()
            };
            crate::common::open_with(&spec.path, &opts)
        });
    let img = match opened {
        Ok(i) => i,
        Err(e) => {
            report(&e);
            return EXIT_NOT_COMPLETED;
        }
    };
    let human = a.output == Output::Human && !a.quiet;
    let first = match img.check(repair) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    print_messages(&first);
    let r = if repair.is_some() && (first.corruptions_fixed > 0 || first.leaks_fixed > 0) {
        // As qemu-img: report what a fresh check of the repaired image finds.
        if human {
            println!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                first.leaks_fixed, first.corruptions_fixed
            );
        }
        let mut second = match img.check(None) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        print_messages(&second);
        second.leaks_fixed = first.leaks_fixed;
        second.corruptions_fixed = first.corruptions_fixed;
        second
    } else {
        first
    };
    if !a.quiet {
        match a.output {
            Output::Json => print_json(&JsonCheck {
                report: &r,
                // As qemu-img: the argument as given (with --image-opts,
                // the option string).
                filename: if a.objects.image_opts {
                    a.file.display().to_string()
                } else {
                    img.name().to_string()
                },
                format: img.format(),
            }),
            Output::Human => print_human(&r),
        }
    }
    if let Err(e) = img.close() {
        report(&e);
        return EXIT_NOT_COMPLETED;
    }
    if r.check_errors > 0 {
        eprintln!("imgloop: {}: Check failed", img.name());
    }
    exit_code(&r)
}
