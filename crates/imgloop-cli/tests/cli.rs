//! Errors, help and image locking of the imgloop command line.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every failure is one line on stderr naming what is wrong, a non-zero
/// exit, and never a panic.
fn assert_clean_error(r: &Run, needle: &str) {
    assert_ne!(r.code, 0, "expected failure, got success: {}", r.stdout);
    assert!(
        r.stderr.contains(needle),
        "stderr lacks {needle:?}: {}",
        r.stderr
    );
    assert_eq!(
        r.stderr.trim_end().lines().count(),
        1,
        "not one line: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.starts_with("imgloop: "), "{}", r.stderr);
}

#[test]
fn a_missing_file_is_a_one_line_error_naming_it() {
    let sc = Scratch::new();
    let p = sc.path("missing.img");
    for cmd in ["info", "map", "check"] {
        let r = imgloop(&[cmd, s(&p)]);
        assert_clean_error(&r, "missing.img");
        assert!(r.stderr.contains("No such file"), "{}", r.stderr);
    }
    assert_clean_error(&imgloop(&["io", "-c", "flush", s(&p)]), "missing.img");
    assert_clean_error(&imgloop(&["resize", s(&p), "1M"]), "missing.img");
    assert_clean_error(
        &imgloop(&["convert", "-O", "raw", s(&p), s(&sc.path("out"))]),
        "missing.img",
    );
}

#[test]
fn a_directory_is_refused_as_an_image() {
    let sc = Scratch::new();
    let dir = sc.path("d");
    std::fs::create_dir(&dir).unwrap();
    assert_clean_error(&imgloop(&["info", s(&dir)]), "is a directory");
    assert_clean_error(
        &imgloop(&["create", "-f", "raw", s(&dir), "1M"]),
        "is a directory",
    );
}

#[test]
fn an_unknown_format_name_is_refused() {
    let sc = Scratch::new();
    let img = sc.path("x.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    assert_clean_error(
        &imgloop(&["info", "-f", "foo", s(&img)]),
        "Unknown driver 'foo'",
    );
    assert_clean_error(
        &imgloop(&["create", "-f", "foo", s(&sc.path("y")), "1M"]),
        "Unknown driver 'foo'",
    );
    assert!(!sc.path("y").exists());
}

#[test]
fn bad_sizes_are_refused() {
    let sc = Scratch::new();
    let p = sc.path("z.raw");
    assert_clean_error(
        &imgloop(&["create", "-f", "raw", s(&p), "12Q"]),
        "Invalid image size specified: '12Q'",
    );
    assert!(!p.exists());
    assert_clean_error(&imgloop(&["create", "-f", "raw", s(&p)]), "size");
}

#[test]
fn an_unreadable_file_gives_permission_denied() {
    let sc = Scratch::new();
    let img = sc.path("secret.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    // Root reads anything, so run as an unprivileged user when we are root.
    let is_root = effective_uid() == 0;
    let out = if is_root {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                imgloop_bin(),
                "info",
            ])
            .arg(&img)
            .output()
            .unwrap()
    } else {
        Command::new(imgloop_bin())
            .arg("info")
            .arg(&img)
            .output()
            .unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("secret.raw"), "{stderr}");
}

fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
}

#[test]
fn every_subcommand_has_help_with_examples() {
    for cmd in [
        "info", "create", "convert", "compare", "map", "check", "resize", "io",
    ] {
        let r = imgloop(&[cmd, "--help"]).ok();
        assert!(
            r.stdout.contains("Examples:"),
            "{cmd} --help lacks examples"
        );
    }
    let top = imgloop(&["--help"]).ok();
    assert!(top.stdout.contains("convert"));
}

#[test]
fn io_commands_report_bad_input_cleanly() {
    let sc = Scratch::new();
    let img = sc.path("io.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    assert_clean_error(&imgloop_io("raw", &img, &["frobnicate"]), "unknown command");
    assert_clean_error(
        &imgloop_io("raw", &img, &["read 0"]),
        "expected OFFSET LENGTH",
    );
    assert_clean_error(
        &imgloop_io("raw", &img, &["read 1M 1"]),
        "outside the virtual disk",
    );
    assert_clean_error(&imgloop_io("raw", &img, &["write -P 300 0 1"]), "pattern");
    // Read-only opens refuse writes and leave the file alone.
    let before = std::fs::read(&img).unwrap();
    let r = imgloop(&["io", "-r", "-f", "raw", "-c", "write 0 4k", s(&img)]);
    assert_clean_error(&r, "read-only");
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// Starts `qemu-io` holding `file` open for a few seconds.
fn hold_with_qemu_io(file: &std::path::Path, read_only: bool) -> std::process::Child {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.extend(["-c", "sleep 4000", s(file)]);
    let child = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lock(file);
    child
}

/// Waits until some process holds an OFD lock on `file` (seen in
/// /proc/locks), without touching the file's locks ourselves.
fn wait_for_lock(file: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(file).unwrap().ino();
    let needle = format!(":{ino} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        if locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(&needle))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no lock appeared on {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_writer_is_refused_while_qemu_writes_the_image() {
    let sc = Scratch::new();
    let img = sc.path("locked.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let mut child = hold_with_qemu_io(&img, false);
    let w = imgloop(&["io", "-f", "raw", "-c", "write 0 512", s(&img)]);
    assert_clean_error(&w, "in use");
    // A shared read is refused too (the writer may change data under it)...
    assert_clean_error(&imgloop(&["info", s(&img)]), "in use");
    // ...but -U reads anyway.
    imgloop(&["info", "-U", s(&img)]).ok();
    child.kill().unwrap();
    child.wait().unwrap();
    imgloop(&["io", "-f", "raw", "-c", "write 0 512", s(&img)]).ok();
}

#[test]
fn readers_share_an_image_but_keep_writers_out() {
    let sc = Scratch::new();
    let img = sc.path("shared.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let mut reader = Command::new(imgloop_bin())
        .args(["io", "-r", "-f", "raw", "-c", "sleep 4000", s(&img)])
        .spawn()
        .unwrap();
    wait_for_lock(&img);
    // Other readers are welcome, imgloop's and qemu's...
    imgloop(&["info", s(&img)]).ok();
    imgloop(&["io", "-r", "-f", "raw", "-c", "read 0 512", s(&img)]).ok();
    qemu_img(&["info", s(&img)]).ok();
    // ...writers are not, imgloop's nor qemu's.
    assert_clean_error(
        &imgloop(&["io", "-f", "raw", "-c", "write 0 512", s(&img)]),
        "in use",
    );
    let q = qemu_io("raw", &img, &["write 0 512"]);
    assert_ne!(q.code, 0);
    assert!(q.stderr.contains("lock"), "{}", q.stderr);
    reader.kill().unwrap();
    reader.wait().unwrap();
}

#[test]
fn qemu_img_cannot_write_an_image_imgloop_has_open_read_write() {
    let sc = Scratch::new();
    let img = sc.path("ours.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let held = imgloop::Image::open(&img, &imgloop::OpenOptions::read_write(Some("raw"))).unwrap();
    let q = qemu_io("raw", &img, &["write 0 512"]);
    assert_ne!(q.code, 0);
    assert!(q.stderr.contains("lock"), "{}", q.stderr);
    // A second imgloop writer in this very process is refused as well.
    let second = imgloop::Image::open(&img, &imgloop::OpenOptions::read_write(Some("raw")));
    assert_eq!(second.unwrap_err().kind(), imgloop::ErrorKind::InUse);
    // Going read-only keeps writers out but lets readers in.
    held.reopen(true).unwrap();
    imgloop(&["info", s(&img)]).ok();
    assert_ne!(qemu_io("raw", &img, &["write 0 512"]).code, 0);
    held.close().unwrap();
    qemu_io("raw", &img, &["write 0 512"]).ok();
}
