//! `imgloop detach`: stop an attached image's export and free its device.

use crate::attach::{as_device, read_states, AttachState};
use crate::common::report;
use imgloop::{Error, ErrorKind, Result};
use imgloop_fuse::process;
use imgloop_fuse::LoopDevice;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the export process gets to flush and stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
#[command(after_help = "\
Flushes the device and the image, unbinds the loop device, unmounts the
export and stops its process. A device that is still mounted (or otherwise
held exclusively) is refused: unmount it first. An export whose process
died (kill -9) is cleaned up: its dead mount is removed and its device
unbound.

Examples:
  imgloop detach /dev/loop0
  imgloop detach disk.qcow2
  imgloop detach --all")]
pub struct Args {
    /// Detach every attached image.
    #[arg(short = 'a', long, conflicts_with = "target")]
    all: bool,
    /// The loop device or the image file.
    #[arg(required_unless_present = "all")]
    target: Option<PathBuf>,
}

pub fn run(a: Args) -> u8 {
    if !process::is_root() {
        report(&Error::new(
            ErrorKind::InvalidArgument,
            "detach needs root: unbinding loop devices and unmounting FUSE are privileged",
        ));
        return 1;
    }
    let states = read_states();
    let chosen: Vec<AttachState> = if a.all {
        states
    } else {
        let Some(target) = a.target.as_deref() else {
            return 1;
        };
        match find(&states, target) {
            Ok(s) => vec![s],
            Err(e) => {
                report(&e);
                return 1;
            }
        }
    };
    let mut code = 0;
    for s in &chosen {
        if let Err(e) = detach(s) {
            report(&e);
            code = 1;
        }
    }
    code
}

fn find(states: &[AttachState], target: &Path) -> Result<AttachState> {
    let found = if let Some(dev) = as_device(target) {
        states.iter().find(|s| s.device == dev)
    } else {
        let image = std::fs::canonicalize(target)
            .map_err(|e| Error::io("could not open", e).in_file(target))?;
        let name = image.display().to_string();
        states.iter().find(|s| s.image == name)
    };
    found.cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            "not attached by imgloop (see imgloop list)",
        )
        .in_file(target)
    })
}

/// Detaches one image: asks a live export process to stop, or cleans up
/// after a dead one.
pub fn detach(s: &AttachState) -> Result<()> {
    if s.running() {
        if let Some(n) = s.loop_number() {
            if imgloop_fuse::is_claimed(n) {
                return Err(Error::new(
                    ErrorKind::InUse,
                    "device is in use (mounted?); unmount it first",
                )
                .in_file(&s.device));
            }
            let users = imgloop_fuse::loopdev::openers(n, &[s.pid, s.holder_pid]);
            if !users.is_empty() {
                let list: Vec<String> = users.iter().map(u32::to_string).collect();
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!(
                        "device is open in process {}; close it first",
                        list.join(", ")
                    ),
                )
                .in_file(&s.device));
            }
        }
        process::send_signal(s.pid, libc::SIGTERM).map_err(|e| {
            Error::io(format!("stopping export process {}", s.pid), e).in_file(&s.device)
        })?;
        let start = Instant::now();
        while s.running() && s.path().exists() {
            if start.elapsed() > STOP_TIMEOUT {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "export process {} did not stop within {} s: the device is still \
                         in use; the export ends once its last user closes it",
                        s.pid,
                        STOP_TIMEOUT.as_secs()
                    ),
                )
                .in_file(&s.device));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !s.path().exists() {
            return Ok(());
        }
    }
    clean_up_dead(s)
}

/// After an export process died without cleaning up: unbind its device if
/// it is still bound to the dead export, remove the dead mount and state.
fn clean_up_dead(s: &AttachState) -> Result<()> {
    let mountpoint = PathBuf::from(&s.mountpoint);
    if let Some(n) = s.loop_number() {
        let bound_here = imgloop_fuse::loop_state(n)
            .and_then(|st| st.backing_file)
            .is_some_and(|b| b == mountpoint);
        if bound_here {
            LoopDevice::open(n)?.clear()?;
        }
        if process::is_mount_point(&mountpoint) {
            process::unmount(&mountpoint, true)
                .map_err(|e| Error::io("unmounting the dead export", e).in_file(&mountpoint))?;
        }
        if bound_here {
            // The kernel unbinds once the last user closes the device (a
            // writer still failing on it, a mounted file system); give it
            // a moment, autoclear finishes the job later otherwise.
            let start = Instant::now();
            while imgloop_fuse::loop_state(n).is_some() && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    } else if process::is_mount_point(&mountpoint) {
        process::unmount(&mountpoint, true)
            .map_err(|e| Error::io("unmounting the dead export", e).in_file(&mountpoint))?;
    }
    let _ = std::fs::remove_file(&mountpoint);
    let _ = std::fs::remove_file(s.path());
    Ok(())
}
