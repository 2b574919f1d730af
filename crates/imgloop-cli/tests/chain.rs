//! Backing chains and the open policy: relative names, depth limit, loop
//! detection, missing files, read-only backing, and the probed-raw guard.

mod common;
use common::*;
use std::path::Path;

fn qcow2_over(base: &Path, base_fmt: &str, top: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(base),
        "-F",
        base_fmt,
        s(top),
    ])
    .ok();
}

#[test]
fn reads_fall_through_to_the_backing_image_and_cow_keeps_the_rest() {
    let sc = Scratch::new();
    let base = sc.path("base.raw");
    let top = sc.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]).ok();
    qemu_io("raw", &base, &["write -P 0x11 0 4M"]).ok();
    qcow2_over(&base, "raw", &top);
    let base_before = std::fs::read(&base).unwrap();
    // A partial-cluster write in the overlay must copy the rest of the
    // cluster from the backing image.
    imgloop_io(
        "qcow2",
        &top,
        &["write -P 0x22 70000 1000", "write -P 0x33 1M 64k"],
    )
    .ok();
    imgloop_io(
        "qcow2",
        &top,
        &[
            "read -P 0x11 65536 4464",
            "read -P 0x22 70000 1000",
            "read -P 0x11 71000 60072",
            "read -P 0x33 1M 64k",
            "read -P 0x11 2M 2M",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "backing file changed"
    );
    assert_reads_like_qemu(&sc, "qcow2", &top);
    assert_eq!(qemu_img(&["check", s(&top)]).code, 0);
    // Map depths follow qemu-img's.
    let ours = imgloop(&["map", "--output", "json", s(&top)]).ok().json();
    let theirs = qemu_img(&["map", "--output=json", s(&top)]).ok().json();
    assert_eq!(ours, theirs);
}

#[test]
fn relative_backing_names_resolve_against_the_image_directory() {
    let sc = Scratch::new();
    let base = sc.path("base.qcow2");
    let top = sc.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]).ok();
    qemu_io("qcow2", &base, &["write -P 0x44 0 64k"]).ok();
    // Stored name is relative: "base.qcow2".
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ])
    .ok();
    let out = std::process::Command::new(imgloop_bin())
        .args(["io", "-r", "-c", "read -P 0x44 0 64k", s(&top)])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = imgloop(&["info", "--output", "json", s(&top)]).ok().json();
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["full-backing-filename"], s(&base));
    assert_eq!(info["backing-filename-format"], "qcow2");
    let chain = imgloop(&["info", "--backing-chain", "--output", "json", s(&top)])
        .ok()
        .json();
    let names: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![s(&top), s(&base)]);
}

#[test]
fn a_missing_backing_file_is_a_clear_error_naming_it() {
    let sc = Scratch::new();
    let base = sc.path("gone.raw");
    let top = sc.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "1M"]).ok();
    qcow2_over(&base, "raw", &top);
    std::fs::remove_file(&base).unwrap();
    // info shows the image without opening its backing file, as qemu-img;
    // with --backing-chain (and every command that reads data) it fails.
    let info = imgloop(&["info", "--output=json", s(&top)]).ok().json();
    assert_eq!(info["backing-filename"], s(&base));
    assert_eq!(imgloop(&["info", "--backing-chain", s(&top)]).code, 1);
    let r = imgloop(&["map", s(&top)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("could not open backing file"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("gone.raw"), "{}", r.stderr);
    assert!(r.stderr.contains("top.qcow2"), "{}", r.stderr);
    assert_eq!(r.stderr.trim_end().lines().count(), 1);
}

#[test]
fn an_image_that_is_its_own_backing_file_is_refused() {
    let sc = Scratch::new();
    let top = sc.path("self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&top), "1M"]).ok();
    qemu_img(&["rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", s(&top)]).ok();
    let before = std::fs::read(&top).unwrap();
    let r = imgloop(&["info", "--backing-chain", s(&top)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("loop"), "{}", r.stderr);
    // Two images pointing at each other.
    let a = sc.path("a.qcow2");
    let b = sc.path("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]).ok();
    qcow2_over(&a, "qcow2", &b);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]).ok();
    let r = imgloop(&["map", s(&b)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("loop"), "{}", r.stderr);
    assert_eq!(std::fs::read(&top).unwrap(), before);
}

#[test]
fn chains_deeper_than_16_are_refused_and_16_is_fine() {
    let sc = Scratch::new();
    let mut prev = sc.path("l0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&prev), "1M"]).ok();
    qemu_io("qcow2", &prev, &["write -P 0x55 0 512"]).ok();
    for i in 1..=17 {
        let next = sc.path(&format!("l{i}.qcow2"));
        qcow2_over(&prev, "qcow2", &next);
        prev = next;
    }
    // l16 has 16 images below it: allowed.
    imgloop_io("qcow2", &sc.path("l16.qcow2"), &["read -P 0x55 0 512"]).ok();
    let r = imgloop(&["map", s(&sc.path("l17.qcow2"))]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("deeper than 16"), "{}", r.stderr);
}

#[test]
fn create_with_a_backing_file_takes_its_size_and_records_its_format() {
    let sc = Scratch::new();
    let base = sc.path("base.raw");
    let top = sc.path("top.qcow2");
    imgloop(&["create", "-q", "-f", "raw", s(&base), "3M"]).ok();
    imgloop_io("raw", &base, &["write -P 0x66 1M 1M"]).ok();
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top),
    ])
    .ok();
    let info = qemu_img(&["info", "--output=json", s(&top)]).ok().json();
    assert_eq!(info["virtual-size"], 3 << 20);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    imgloop_io("qcow2", &top, &["read -P 0x66 1M 1M", "read -P 0 0 1M"]).ok();
    // A missing backing file at create time is refused and leaves no file.
    let r = imgloop(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "nope.raw",
        "-F",
        "raw",
        s(&sc.path("x.qcow2")),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("nope.raw"), "{}", r.stderr);
    assert!(!sc.path("x.qcow2").exists());
}

#[test]
fn a_probed_raw_image_refuses_a_qcow2_header_in_sector_0() {
    let sc = Scratch::new();
    let img = sc.path("guest.img");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let mut header = vec![0u8; 512];
    header[..8].copy_from_slice(&[b'Q', b'F', b'I', 0xfb, 0, 0, 0, 3]);
    // Probed: the write would turn the guest's disk into a qcow2 image.
    let probed = imgloop::Image::open(&img, &imgloop::OpenOptions::read_write(None)).unwrap();
    assert!(probed.probed_raw());
    let e = probed.write(&header, 0).unwrap_err();
    assert_eq!(e.kind(), imgloop::ErrorKind::ReadOnly);
    assert_eq!(e.condition(), Some(imgloop::Condition::ProbedRawHeader));
    // A write that leaves sector 0 harmless, or one past it, is fine.
    probed.write(b"plain data", 0).unwrap();
    probed.write(&header, 4096).unwrap();
    probed.close().unwrap();
    // With the format named explicitly the user takes responsibility.
    let named = imgloop::Image::open(&img, &imgloop::OpenOptions::read_write(Some("raw"))).unwrap();
    named.write(&header, 0).unwrap();
    named.close().unwrap();
    let info = qemu_img(&["info", "--output=json", "-f", "raw", s(&img)])
        .ok()
        .json();
    assert_eq!(info["format"], "raw");
}
