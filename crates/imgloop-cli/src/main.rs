//! `imgloop`: a qemu-img-compatible command line for virtual-disk images.

mod amend;
mod attach;
mod bench;
mod bitmap;
mod check;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod detach;
mod fuse;
mod info;
mod io;
mod list;
mod map;
mod measure;
mod objects;
mod progress;
mod rebase;
mod resize;
mod serve;
mod snapshot;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Create, inspect, convert, compare and edit virtual-disk images.
///
/// Subcommands and flags follow qemu-img, so scripts can switch tools.
#[derive(Parser)]
#[command(name = "imgloop", version, about, long_about = None, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  imgloop create -f raw disk.img 10G
  imgloop io -c 'write -P 0xab 1M 64k' disk.img
  imgloop info --output json disk.img
  imgloop map disk.img
  imgloop convert -p -O raw disk.img copy.img
  imgloop compare disk.img copy.img";

#[derive(Subcommand)]
enum Command {
    /// Show information about an image.
    Info(info::Args),
    /// Change options of an existing image in place.
    Amend(amend::Args),
    /// Compute how large a new image would be.
    Measure(measure::Args),
    /// Run a simple I/O benchmark on an image.
    Bench(bench::Args),
    /// Add, remove, clear, enable or disable persistent bitmaps.
    Bitmap(bitmap::Args),
    /// Give an image a new backing file (copying what differs).
    Rebase(rebase::Args),
    /// Write an image's data into its backing file.
    Commit(commit::Args),
    /// Create a new image.
    Create(create::Args),
    /// Copy an image, possibly into another format.
    Convert(convert::Args),
    /// Compare the guest-visible content of two images.
    Compare(compare::Args),
    /// Copy part of an image into a new image (dd-style operands).
    Dd(dd::Args),
    /// Show where the guest data of an image lives.
    Map(map::Args),
    /// Check an image's metadata for consistency and optionally repair it.
    Check(check::Args),
    /// Change the virtual size of an image.
    Resize(resize::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// Serve images over NBD (like qemu-nbd).
    Serve(serve::Args),
    /// Run scripted I/O commands on an image (like qemu-io).
    Io(io::Args),
    /// Export an image's virtual disk as a regular file over FUSE.
    Fuse(fuse::Args),
    /// Attach an image as a loop block device (/dev/loopN).
    Attach(attach::Args),
    /// Detach an attached image and free its loop device.
    Detach(detach::Args),
    /// List the images attached as loop devices.
    List(list::Args),
}

fn main() -> ExitCode {
    // A closed stdout (e.g. `imgloop map | head`) must end quietly, not panic.
    // SAFETY: setting SIGPIPE back to its default action has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let code = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Create(a) => create::run(a),
        Command::Dd(a) => dd::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Map(a) => map::run(a),
        Command::Check(a) => check::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Amend(a) => amend::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Bitmap(a) => bitmap::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Io(a) => io::run(a),
        Command::Fuse(a) => fuse::run(a),
        Command::Attach(a) => attach::run(a),
        Command::Detach(a) => detach::run(a),
        Command::List(a) => list::run(a),
    };
    ExitCode::from(code)
}

/// Handles what clap could not parse as qemu-img does: help and version go
/// to stdout with exit 0; a usage error is one line on stderr and exit 1
/// (exit 2 would mean "corruptions found" to a script calling `check`).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                1
            } else {
                0
            },
        );
    }
    eprintln!(
        "{}",
        usage_line(&e.to_string(), std::env::args().nth(1).as_deref())
    );
    ExitCode::from(1)
}

/// The one line for a clap error text: its first line without clap's
/// "error: " prefix, and where help is.
fn usage_line(clap_text: &str, subcommand: Option<&str>) -> String {
    let first = clap_text.lines().next().unwrap_or("invalid arguments");
    let msg = first.strip_prefix("error: ").unwrap_or(first);
    let help = match subcommand.filter(|s| !s.starts_with('-')) {
        Some(sub) if !msg.starts_with("unrecognized subcommand") => {
            format!("imgloop {sub} --help")
        }
        _ => "imgloop --help".to_string(),
    };
    format!("imgloop: {msg} (try '{help}')")
}

#[cfg(test)]
mod tests {
    use super::usage_line;

    #[test]
    fn usage_errors_become_one_line_naming_where_help_is() {
        let text =
            "error: unexpected argument '--bogus' found\n\n  tip: ...\n\nUsage: imgloop info";
        assert_eq!(
            usage_line(text, Some("info")),
            "imgloop: unexpected argument '--bogus' found (try 'imgloop info --help')"
        );
        assert_eq!(
            usage_line("error: unrecognized subcommand 'bogus'\n", Some("bogus")),
            "imgloop: unrecognized subcommand 'bogus' (try 'imgloop --help')"
        );
    }
}
