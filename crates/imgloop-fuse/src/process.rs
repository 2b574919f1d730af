//! Process-level helpers for an export process: stop signals, the I/O
//! flusher flag, mounts, and looking at other processes.

use imgloop::{Error, Result};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// SIGTERM, SIGINT and SIGHUP, blocked so one thread can wait for them.
///
/// Create it in the main thread before any other thread starts: threads
/// inherit the blocked set, so the signals stay pending until
/// [`wait`](StopSignals::wait) takes them.
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    /// Blocks the stop signals in the calling thread (and in threads it
    /// creates afterwards).
    pub fn block() -> Result<StopSignals> {
        // SAFETY: sigset_t is plain data; sigemptyset initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset/sigaddset only write the set we own;
        // pthread_sigmask reads it and changes this thread's mask.
        let r = unsafe {
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(Error::io(
                "blocking signals",
                io::Error::from_raw_os_error(r),
            ));
        }
        Ok(StopSignals { set })
    }

    /// Waits for a stop signal and returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads the set and writes one int, both alive.
            let r = unsafe { libc::sigwait(&self.set, &mut sig) };
            if r == 0 {
                return sig;
            }
        }
    }

    /// Sends SIGTERM to this process, waking [`wait`](StopSignals::wait).
    pub fn raise() {
        // SAFETY: kill with our own pid and a valid signal number has no
        // memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    }
}

/// Ignores SIGPIPE, so writing to a pipe whose reader is gone fails with
/// `EPIPE` instead of killing the process.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety
    // preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Marks this process as part of the block I/O path (`PR_SET_IO_FLUSHER`),
/// so memory reclaim in it does not wait for I/O it must serve itself.
/// Needs CAP_SYS_RESOURCE; returns false when the kernel refused.
pub fn set_io_flusher() -> bool {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) == 0 }
}

/// True when the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// This process's id.
pub fn pid() -> u32 {
    std::process::id()
}

/// True while process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the command name in parentheses.
            let state = stat
                .rfind(')')
                .and_then(|p| stat[p + 1..].trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/PID/stat`): together with the pid it names one process, even
/// after the pid is reused.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Starts a new session, leaving the caller's terminal and process group
/// (what a daemon does so terminal signals no longer reach it).
pub fn new_session() {
    // SAFETY: setsid takes no arguments; failing (already a group leader)
    // leaves the process as it was.
    unsafe {
        libc::setsid();
    }
}

/// Points stdin, stdout and stderr at /dev/null (after a daemon has
/// reported readiness through them).
pub fn redirect_stdio_to_null() -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 on two valid descriptors; the old 0..2 are replaced
        // atomically and `null` stays open until after the loop.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends `signal` to process `pid`.
pub fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill takes plain integers and touches no memory of ours.
    let r = unsafe { libc::kill(pid, signal) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts `path`; with `lazy`, detaches it now and lets the kernel finish
/// when its last user goes away (`MNT_DETACH`).
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 reads the NUL-terminated path, which outlives the call.
    let r = unsafe { libc::umount2(c.as_ptr(), flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True when /proc/self/mountinfo lists `path` as a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .map(|mp| unescape_mount_path(mp) == want)
            .unwrap_or(false)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let d = &b[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mount_path("/a\\040b"), b"/a b".to_vec());
        assert_eq!(unescape_mount_path("/plain"), b"/plain".to_vec());
        assert_eq!(unescape_mount_path("/end\\"), b"/end\\".to_vec());
    }

    #[test]
    fn this_process_is_alive_and_a_bogus_one_is_not() {
        assert!(process_alive(pid()));
        assert!(process_start_time(pid()).is_some());
        assert_eq!(process_start_time(u32::MAX - 1), None);
        assert!(!process_alive(u32::MAX - 1));
    }

    #[test]
    fn the_root_directory_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/nonexistent-imgloop-dir")));
    }
}
