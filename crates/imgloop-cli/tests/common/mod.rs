//! Test harness shared by the CLI and interop tests of every format:
//! running `imgloop`, `qemu-img` and `qemu-io`, and the round-trip checks
//! that treat qemu-img as the oracle.
#![allow(dead_code)]

pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory removed at the end of the test.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        // /var/tmp is disk-backed (tmpfs may lack SEEK_DATA details we test).
        let dir = tempfile::Builder::new()
            .prefix("imgloop-test-")
            .tempdir_in("/var/tmp")
            .expect("scratch dir");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Result of running a tool.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the tool's output unless it exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `program ARGS` (any tool) and collects its output.
pub fn run_program(program: &str, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run::from(out)
}

/// Path of the `imgloop` binary under test.
pub fn imgloop_bin() -> &'static str {
    env!("CARGO_BIN_EXE_imgloop")
}

/// Runs `imgloop ARGS`.
pub fn imgloop(args: &[&str]) -> Run {
    run_program(imgloop_bin(), args)
}

/// Runs `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> Run {
    run_program("qemu-img", args)
}

/// Runs `qemu-io -f FMT -c CMD... FILE`.
pub fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) -> Run {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let f = file.to_str().unwrap();
    args.push(f);
    run_program("qemu-io", &args)
}

/// Runs `imgloop io -f FMT -c CMD... FILE`.
pub fn imgloop_io(fmt: &str, file: &Path, cmds: &[&str]) -> Run {
    let mut args = vec!["io", "-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let f = file.to_str().unwrap();
    args.push(f);
    imgloop(&args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Bytes the host allocated for a file.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Oracle check, direction qemu → imgloop: the guest content of `image`
/// (format `fmt`) as exported to raw by qemu-img and by imgloop is
/// byte-identical.
pub fn assert_reads_like_qemu(sc: &Scratch, fmt: &str, image: &Path) {
    let by_qemu = sc.path("oracle-qemu.raw");
    let by_us = sc.path("oracle-imgloop.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(image), s(&by_qemu)]).ok();
    imgloop(&["convert", "-f", fmt, "-O", "raw", s(image), s(&by_us)]).ok();
    let a = std::fs::read(&by_qemu).unwrap();
    let b = std::fs::read(&by_us).unwrap();
    assert_eq!(
        a.len(),
        b.len(),
        "exported sizes differ for {}",
        image.display()
    );
    if let Some(pos) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{}: imgloop reads differ from qemu-img at byte {pos}",
            image.display()
        );
    }
    std::fs::remove_file(by_qemu).unwrap();
    std::fs::remove_file(by_us).unwrap();
}

/// Oracle check, direction imgloop → qemu: `qemu-img check` finds nothing
/// wrong (or the format has no check) and `qemu-img compare` sees the same
/// content as in `reference`.
pub fn assert_qemu_accepts(fmt: &str, image: &Path, reference: &Path, ref_fmt: &str) {
    let c = qemu_img(&["check", "-f", fmt, s(image)]);
    assert!(
        c.code == 0 || c.code == 63,
        "qemu-img check of {} failed ({}):\n{}{}",
        image.display(),
        c.code,
        c.stdout,
        c.stderr
    );
    let cmp = qemu_img(&["compare", "-f", fmt, "-F", ref_fmt, s(image), s(reference)]);
    assert_eq!(
        cmp.code,
        0,
        "qemu-img compare {} {}: {}{}",
        image.display(),
        reference.display(),
        cmp.stdout,
        cmp.stderr
    );
}

/// The write pattern both tools apply in round-trip tests: (pattern, offset, length).
pub const PATTERN_WRITES: &[(u8, &str, &str)] = &[
    (0xab, "0", "4k"),
    (0x11, "64k", "64k"),
    (0x22, "1M", "512"),
    (0x33, "1536k", "300k"),
    (0x44, "3M", "1M"),
];
