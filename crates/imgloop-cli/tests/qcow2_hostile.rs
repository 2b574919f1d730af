//! Hostile qcow2 images: every hand-broken image gives one clear error line
//! (`imgloop: FILE: ...` naming the file and, where there is one, the
//! structure and its offset), a non-zero exit and no panic, from `info`,
//! `map`, `check`, `convert` (as the source) and `io -r`, and none of them
//! changes a byte of the file. Header fields that size allocations are
//! refused before anything is allocated: the commands run under a 512 MiB
//! address-space limit.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Address-space limit for the commands, in KiB.
const MEMORY_LIMIT_KIB: u32 = 512 * 1024;

/// Runs `imgloop ARGS` under the memory limit.
fn imgloop_limited(args: &[&str]) -> Run {
    let script = format!("ulimit -v {MEMORY_LIMIT_KIB} && exec \"$0\" \"$@\"");
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(imgloop_bin())
        .args(args)
        .output()
        .expect("running imgloop");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// A small valid qcow2 image with some data (64 KiB clusters).
fn good_image(sc: &Scratch, name: &str) -> PathBuf {
    let p = sc.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "4M"]).ok();
    qemu_io("qcow2", &p, &["write -P 0x11 0 128k"]).ok();
    p
}

/// A copy of the good image with `patches` applied.
fn broken(sc: &Scratch, name: &str, patches: &[(u64, Vec<u8>)]) -> PathBuf {
    let p = good_image(sc, name);
    for (off, bytes) in patches {
        patch(&p, *off, bytes);
    }
    p
}

/// Byte patches: (file offset, new bytes).
type Patches = Vec<(u64, Vec<u8>)>;

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// Runs every read-only command on `img` and checks each fails cleanly
/// with all of `needles` in its message, leaving the file as it was.
fn assert_refused(sc: &Scratch, img: &Path, needles: &[&str]) {
    assert_refused_as(sc, img, needles, &["info"])
}

/// [`assert_refused`] for a broken backing chain: `info` shows the image
/// without opening its backing file (as qemu-img), so the chain is shown
/// with `--backing-chain`, which must fail.
fn assert_chain_refused(sc: &Scratch, img: &Path, needles: &[&str]) {
    let info = imgloop_limited(&["info", s(img)]);
    assert_eq!(info.code, 0, "info without the chain: {}", info.stderr);
    assert_refused_as(sc, img, needles, &["info", "--backing-chain"])
}

fn assert_refused_as(sc: &Scratch, img: &Path, needles: &[&str], info: &[&str]) {
    let before = std::fs::read(img).unwrap();
    let out = sc.path("converted.raw");
    let mut info_args = info.to_vec();
    info_args.push(s(img));
    let runs = [
        ("info", imgloop_limited(&info_args)),
        ("map", imgloop_limited(&["map", s(img)])),
        ("check", imgloop_limited(&["check", s(img)])),
        (
            "convert",
            imgloop_limited(&["convert", "-O", "raw", s(img), s(&out)]),
        ),
        (
            "io",
            imgloop_limited(&["io", "-r", "-c", "read 0 64k", s(img)]),
        ),
    ];
    for (cmd, r) in runs {
        let what = format!("{cmd} {}", img.display());
        assert_ne!(r.code, 0, "{what} succeeded: {}", r.stdout);
        assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{what}: not one line: {}",
            r.stderr
        );
        assert!(
            r.stderr
                .starts_with(&format!("imgloop: {}: ", img.display())),
            "{what}: does not name the file: {}",
            r.stderr
        );
        for n in needles {
            assert!(r.stderr.contains(n), "{what}: {n:?} missing: {}", r.stderr);
        }
        assert_eq!(
            std::fs::read(img).unwrap(),
            before,
            "{what} changed the file"
        );
        assert!(!out.exists(), "{what} left a half-made target");
    }
}

#[test]
fn the_memory_limit_lets_good_images_through() {
    // The control for the limit: a valid image works under it.
    let sc = Scratch::new();
    let img = good_image(&sc, "good.qcow2");
    imgloop_limited(&["info", s(&img)]).ok();
    imgloop_limited(&["check", s(&img)]).ok();
    imgloop_limited(&["convert", "-O", "raw", s(&img), s(&sc.path("o.raw"))]).ok();
    imgloop_limited(&["io", "-r", "-c", "read -P 0x11 0 64k", s(&img)]).ok();
}

#[test]
fn a_truncated_header_is_refused() {
    let sc = Scratch::new();
    let img = good_image(&sc, "trunc.qcow2");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(50).unwrap();
    assert_refused(&sc, &img, &["truncated header", "needs 72 bytes", "has 50"]);
}

/// An L1 table past the end of the file reads as zeroes, as qemu-img
/// reads it (a deliberate choice, see docs/RELIABILITY.md: the image
/// opens, so what it holds can be recovered), and check reports it as
/// qemu-img does.
#[test]
fn an_l1_table_past_the_end_of_the_file_opens_as_qemu_opens_it() {
    let sc = Scratch::new();
    let img = broken(&sc, "l1.qcow2", &[(40, be64(0x100_0000))]);
    let before = std::fs::read(&img).unwrap();
    assert_eq!(qemu_img(&["info", s(&img)]).code, 0);
    imgloop_limited(&["info", s(&img)]).ok();
    imgloop_limited(&["io", "-r", "-c", "read -P 0 0 64k", s(&img)]).ok();
    let q = qemu_img(&["check", s(&img)]);
    let i = imgloop_limited(&["check", s(&img)]);
    assert_eq!((i.code, q.code), (2, 2), "{}", i.stderr);
    assert!(
        i.stderr.contains("exceeding the end of the file"),
        "{}",
        i.stderr
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open changed it"
    );
}

#[test]
fn cluster_bits_outside_9_to_21_are_refused() {
    let sc = Scratch::new();
    for bits in [8u32, 22] {
        let img = broken(&sc, &format!("cb{bits}.qcow2"), &[(20, be32(bits))]);
        assert_refused(
            &sc,
            &img,
            &[&format!("cluster_bits = {bits}"), "header at offset 0x14"],
        );
    }
}

#[test]
fn a_refcount_table_overlapping_the_header_is_refused() {
    let sc = Scratch::new();
    let img = broken(&sc, "rt.qcow2", &[(48, be64(0))]);
    assert_refused(
        &sc,
        &img,
        &["refcount_table_offset = 0", "header at offset 0x30"],
    );
}

#[test]
fn huge_sizes_in_the_header_are_refused_before_allocating() {
    let sc = Scratch::new();
    // Where the first header extension (the feature name table) starts.
    let header_length = 112;
    let cases: &[(&str, Patches, &[&str])] = &[
        (
            "l1_size",
            vec![(36, be32(u32::MAX))],
            &["l1_size = 4294967295", "offset 0x24"],
        ),
        (
            "reftable",
            vec![(56, be32(u32::MAX))],
            &["refcount_table_clusters = 4294967295", "offset 0x38"],
        ),
        (
            "header_length",
            vec![(100, be32(u32::MAX))],
            &["header_length = 4294967295", "offset 0x64"],
        ),
        (
            "extension",
            vec![(header_length + 4, be32(0xffff_fff0))],
            &["header extension length", "offset 0x74"],
        ),
        (
            "backing_name",
            vec![(8, be64(0x200)), (16, be32(u32::MAX))],
            &["backing_file_size = 4294967295", "offset 0x10"],
        ),
        (
            "snapshots",
            vec![(60, be32(u32::MAX)), (64, be64(0x5_0000))],
            &["nb_snapshots = 4294967295", "offset 0x3c"],
        ),
    ];
    for (name, patches, needles) in cases {
        let img = broken(&sc, &format!("{name}.qcow2"), patches);
        assert_refused(&sc, &img, needles);
    }
}

#[test]
fn an_unknown_incompatible_feature_is_refused_by_its_table_name() {
    let sc = Scratch::new();
    let img = good_image(&sc, "feature.qcow2");
    // Rename the feature table's entry for incompatible bit 4 into one for
    // bit 9 called "frobnicated blocks", and set bit 9.
    let bytes = std::fs::read(&img).unwrap();
    let table = 112 + 8;
    let entry = (0..8)
        .map(|i| table + i * 48)
        .find(|&e| bytes[e] == 0 && bytes[e + 1] == 4)
        .expect("qemu writes a feature name table");
    let mut e = vec![0u8; 48];
    e[1] = 9;
    e[2..20].copy_from_slice(b"frobnicated blocks");
    patch(&img, entry as u64, &e);
    patch(&img, 72, &be64(1 << 9));
    assert_refused(&sc, &img, &["unsupported", "'frobnicated blocks'"]);
    // Without a name in the table, the bit number is given.
    let img = broken(&sc, "bit60.qcow2", &[(72, be64(1 << 60))]);
    assert_refused(&sc, &img, &["feature bit 60"]);
}

#[test]
fn an_image_that_is_its_own_backing_file_is_refused() {
    let sc = Scratch::new();
    let img = sc.path("self.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        s(&img),
        "4M",
    ])
    .ok();
    assert_chain_refused(&sc, &img, &["backing chain loop"]);
    // A loop through a second image too.
    let a = sc.path("a.qcow2");
    let b = sc.path("b.qcow2");
    for (top, below) in [(&a, "b.qcow2"), (&b, "a.qcow2")] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            below,
            "-F",
            "qcow2",
            s(top),
            "4M",
        ])
        .ok();
    }
    let r = imgloop_limited(&["info", "--backing-chain", s(&a)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("backing chain loop"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn a_missing_backing_file_is_refused_naming_it() {
    let sc = Scratch::new();
    let img = sc.path("orphan.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        s(&img),
        "4M",
    ])
    .ok();
    assert_chain_refused(&sc, &img, &["backing file", "gone.qcow2", "No such file"]);
}

#[test]
fn a_backing_chain_deeper_than_16_is_refused() {
    let sc = Scratch::new();
    let mut prev = sc.path("c0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&prev), "1M"]).ok();
    for i in 1..=17 {
        let p = sc.path(&format!("c{i}.qcow2"));
        let below = format!("c{}.qcow2", i - 1);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &below,
            "-F",
            "qcow2",
            s(&p),
            "1M",
        ])
        .ok();
        prev = p;
    }
    // 16 images below the top are fine; 17 are not.
    imgloop_limited(&["info", "--backing-chain", s(&sc.path("c16.qcow2"))]).ok();
    let before = std::fs::read(&prev).unwrap();
    for args in [
        vec!["info", "--backing-chain", s(&prev)],
        vec!["map", s(&prev)],
        vec!["io", "-r", "-c", "read 0 64k", s(&prev)],
    ] {
        let r = imgloop_limited(&args);
        assert_ne!(r.code, 0, "{args:?}");
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.starts_with("imgloop: "), "{}", r.stderr);
        assert!(r.stderr.contains("deeper than 16"), "{}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    let out = sc.path("o.raw");
    let r = imgloop_limited(&["convert", "-O", "raw", s(&prev), s(&out)]);
    assert!(
        r.code != 0 && r.stderr.contains("deeper than 16"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read(&prev).unwrap(), before);
}
