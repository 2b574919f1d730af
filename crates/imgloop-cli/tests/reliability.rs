//! Regression tests for repairs that must never make an image worse and
//! commands that must never destroy their own inputs (qemu-img is the
//! oracle for what an image holds).

mod common;
use common::*;
use std::path::Path;

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let mut d = std::fs::read(p).unwrap();
    d[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, d).unwrap();
}

fn be64(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
}

fn be32(d: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(d[at..at + 4].try_into().unwrap())
}

/// A 4 MiB qcow2 image with 256 KiB of 0x33 at 0 and an internal
/// snapshot `s1` of it (the snapshot table is the last thing in the file).
fn image_with_snapshot(sc: &Scratch, name: &str) -> std::path::PathBuf {
    let img = sc.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x33 0 256k"]).ok();
    qemu_img(&["snapshot", "-c", "s1", s(&img)]).ok();
    img
}

/// The guest content of snapshot `s1`, as qemu-img reads it.
fn snapshot_content(sc: &Scratch, img: &Path) -> Vec<u8> {
    let out = sc.path("snap-content.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        s(img),
        s(&out),
    ])
    .ok();
    std::fs::read(&out).unwrap()
}

/// A snapshot name that runs past the end of the file reads as qemu-img
/// reads it (zeroes past the end), and a repair keeps the snapshot's
/// references: a later write does not overwrite the snapshot's data.
#[test]
fn a_snapshot_table_qemu_accepts_is_read_alike_and_repair_keeps_its_data() {
    let sc = Scratch::new();
    let img = image_with_snapshot(&sc, "sn.qcow2");
    let d = std::fs::read(&img).unwrap();
    let table = be64(&d, 64);
    assert!(table + 40 <= d.len() as u64);
    // name_size 1000: far past the end of the file.
    patch(&img, table + 14, &1000u16.to_be_bytes());
    let q = qemu_img(&["check", s(&img)]);
    assert_eq!(q.code, 0, "{}", q.stdout);
    let theirs = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
    let ours = imgloop(&["info", "--output", "json", s(&img)]).ok().json();
    assert_eq!(theirs["snapshots"][0]["name"], "s1");
    assert_eq!(ours["snapshots"][0]["name"], theirs["snapshots"][0]["name"]);
    let before = snapshot_content(&sc, &img);
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    imgloop_io("qcow2", &img, &["write -P 0x44 0 64k"]).ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    assert!(
        snapshot_content(&sc, &img) == before,
        "a write after the repair changed the snapshot's data"
    );
}

/// Metadata that cannot be walked (a snapshot whose L1 table offset is
/// not aligned) leaves its clusters' references unknown: the repair must
/// not lower their refcounts, so the shared cluster is still copied on
/// write and its old bytes stay where they were.
#[test]
fn a_repair_never_lowers_refcounts_because_of_metadata_it_could_not_read() {
    let sc = Scratch::new();
    let img = image_with_snapshot(&sc, "bad-snap.qcow2");
    let map = qemu_img(&["map", "--output=json", s(&img)]).ok().json();
    let host = map[0]["offset"].as_u64().expect("cluster 0 is allocated");
    let d = std::fs::read(&img).unwrap();
    let table = be64(&d, 64) as usize;
    let l1 = be64(&d, table);
    patch(&img, table as u64, &(l1 + 8).to_be_bytes());
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert!(
        !r.stdout.contains(&format!(
            "Repairing cluster {} refcount=2 reference=1",
            host / 65536
        )),
        "{}",
        r.stdout
    );
    imgloop_io("qcow2", &img, &["write -P 0x44 0 64k"]).ok();
    let d = std::fs::read(&img).unwrap();
    assert!(
        d[host as usize..host as usize + 65536]
            .iter()
            .all(|&b| b == 0x33),
        "the cluster the snapshot shares was overwritten in place"
    );
}

/// An L1 entry with flags but no table: qemu-img calls the image corrupt;
/// imgloop says so too, and its repair leaves an image qemu-img calls
/// clean.
#[test]
fn an_l1_entry_with_flags_but_no_table_is_found_and_repaired_into_what_qemu_accepts() {
    let sc = Scratch::new();
    let img = sc.path("l1flag.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "2G"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x55 0 64k"]).ok();
    let d = std::fs::read(&img).unwrap();
    let l1 = be64(&d, 40);
    // Entry 1 (guest 512 MiB..1 GiB) is unallocated: set COPIED only.
    patch(&img, l1 + 8, &0x8000_0000_0000_0000u64.to_be_bytes());
    assert_ne!(qemu_img(&["check", s(&img)]).code, 0);
    let ours = imgloop(&["check", s(&img)]);
    assert_eq!(ours.code, 2, "{}", ours.stdout);
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let q = qemu_img(&["check", s(&img)]);
    assert_eq!(q.code, 0, "qemu-img still finds corruption: {}", q.stdout);
    imgloop(&["io", "-r", "-c", "read -P 0x55 0 64k", s(&img)]).ok();
}

/// A garbage snapshot table offset with no snapshots: qemu-img refuses to
/// open the image; imgloop opens it (nothing uses the offset), reports it,
/// and its repair fixes the header so qemu-img opens it again.
#[test]
fn a_garbage_snapshot_offset_without_snapshots_is_reported_and_repaired() {
    let sc = Scratch::new();
    let img = sc.path("snapoff.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x66 0 4k"]).ok();
    patch(&img, 64, &0x1234u64.to_be_bytes());
    assert_ne!(qemu_img(&["info", s(&img)]).code, 0);
    imgloop(&["info", s(&img)]).ok();
    imgloop(&["io", "-r", "-c", "read -P 0x66 0 4k", s(&img)]).ok();
    assert_eq!(imgloop(&["check", s(&img)]).code, 2);
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(imgloop(&["check", s(&img)]).code, 0);
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    assert_eq!(be64(&std::fs::read(&img).unwrap(), 64), 0);
}

/// A crafted huge l1_size: the repair must not write its new structures
/// over the snapshot table or the bitmap directory, and qemu-img must
/// still open the image and list both afterwards.
#[test]
fn a_repair_writes_only_where_nothing_reachable_from_the_header_lies() {
    let sc = Scratch::new();
    let img = image_with_snapshot(&sc, "hugel1.qcow2");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]).ok();
    let d = std::fs::read(&img).unwrap();
    let l1_size = be32(&d, 36);
    assert!(l1_size >= 1);
    // 1 Mi entries (8 MiB): the table now runs far past the end of the file.
    patch(&img, 36, &(1u32 << 20).to_be_bytes());
    let before = qemu_img(&["info", "--output=json", s(&img)]);
    assert_eq!(before.code, 0, "{}", before.stderr);
    let _ = imgloop(&["check", "-r", "all", s(&img)]);
    let after = qemu_img(&["info", "--output=json", s(&img)]);
    assert_eq!(
        after.code, 0,
        "qemu-img cannot open the repaired image: {}",
        after.stderr
    );
    let info = after.json();
    assert_eq!(info["snapshots"][0]["name"], "s1");
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["name"], "b0",
        "{info}"
    );
    assert_ne!(qemu_img(&["check", s(&img)]).code, 1);
}

#[test]
fn create_refuses_an_image_that_is_its_own_backing_file() {
    let sc = Scratch::new();
    let img = sc.path("self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x77 0 4k"]).ok();
    let before = std::fs::read(&img).unwrap();
    let r = imgloop(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&img),
        "-F",
        "qcow2",
        s(&img),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Trying to create an image with the same filename as the backing file"),
        "{}",
        r.stderr
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the backing file was changed"
    );
    // The same file under another name (a relative name from another
    // directory) is refused too.
    let sub = sc.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let other = sub.join("link.qcow2");
    std::os::unix::fs::symlink(&img, &other).unwrap();
    let r = imgloop(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "../self.qcow2",
        "-F",
        "qcow2",
        s(&other),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn convert_refuses_to_write_over_its_own_source_or_its_backing_file() {
    let sc = Scratch::new();
    let base = sc.path("base.raw");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
    let top = sc.path("top.qcow2");
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
    let (b0, t0) = (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap());
    for target in [&base, &top] {
        for extra in [&[][..], &["-n"][..]] {
            let mut args = vec!["convert", "-O", "raw"];
            args.extend(extra);
            args.extend([s(&top), s(target)]);
            let r = imgloop(&args);
            assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
            assert!(r.stderr.contains("same file"), "{}", r.stderr);
        }
    }
    assert!(std::fs::read(&base).unwrap() == b0 && std::fs::read(&top).unwrap() == t0);
}

#[test]
fn create_refuses_a_data_file_that_is_the_image_or_its_backing_file() {
    let sc = Scratch::new();
    let base = sc.path("b.raw");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
    let b0 = std::fs::read(&base).unwrap();
    let img = sc.path("d.qcow2");
    let r = imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&base)),
        "-b",
        "b.raw",
        "-F",
        "raw",
        s(&img),
        "1M",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(std::fs::read(&base).unwrap() == b0);
    // An existing image of another format: creating would wipe it.
    let other = sc.path("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "1M"]).ok();
    let o0 = std::fs::read(&other).unwrap();
    let r = imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&other)),
        s(&img),
        "1M",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("existing qcow2 image"), "{}", r.stderr);
    assert!(std::fs::read(&other).unwrap() == o0);
    assert!(!img.exists());
}

#[test]
fn sizes_out_of_range_are_refused_with_qemu_imgs_words() {
    let sc = Scratch::new();
    let img = sc.path("big.raw");
    for size in ["18446744073709551615", "8E", "99999999999999999999"] {
        let q = qemu_img(&["create", "-q", "-f", "raw", s(&img), size]);
        let i = imgloop(&["create", "-q", "-f", "raw", s(&img), size]);
        assert_eq!((i.code, q.code), (1, 1), "{size}");
        let want = "Invalid image size specified. Must be between 0 and 9223372036854775807.";
        assert!(q.stderr.contains(want), "qemu-img: {}", q.stderr);
        assert!(i.stderr.contains(want), "{size}: {}", i.stderr);
    }
}

/// Peak resident memory of the largest child process so far, in bytes.
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we pass; no other effect.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

/// A crafted `l1_size` (4 Mi entries, far past the end of a 1 MiB file,
/// the extra part reading the file's data as entries): qemu-img opens the
/// image; imgloop opens it too, reads its data, checks it in bounded
/// memory, and its repair trims the table into an image qemu-img calls
/// clean, data intact.
#[test]
fn a_crafted_l1_size_opens_checks_in_bounded_memory_and_is_repaired() {
    let sc = Scratch::new();
    let img = sc.path("l1size.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "2G"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x55 0 1M"]).ok();
    patch(&img, 36, &(4u32 << 20).to_be_bytes());
    assert_eq!(qemu_img(&["info", s(&img)]).code, 0);
    imgloop(&["io", "-r", "-c", "read -P 0x55 0 1M", s(&img)]).ok();
    let r = imgloop(&["check", s(&img)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.lines().count() < 20_000, "findings are bounded");
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(
        children_peak_rss() < 256 << 20,
        "a child used {} MiB",
        children_peak_rss() >> 20
    );
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    imgloop(&["io", "-r", "-c", "read -P 0x55 0 1M", s(&img)]).ok();
}

/// A snapshot whose L1 table offset is 0 (the table lies over the
/// header): the "repair" of its entries would be written over the qcow2
/// magic. The repair must leave every byte of other metadata alone.
#[test]
fn a_repair_never_writes_through_a_table_that_lies_over_other_metadata() {
    let sc = Scratch::new();
    let img = image_with_snapshot(&sc, "over.qcow2");
    let d = std::fs::read(&img).unwrap();
    let table = be64(&d, 64);
    patch(&img, table, &0u64.to_be_bytes());
    let header = std::fs::read(&img).unwrap()[..104].to_vec();
    let _ = imgloop(&["check", "-r", "all", s(&img)]);
    assert!(
        std::fs::read(&img).unwrap()[..104] == header[..],
        "the repair changed the header"
    );
    assert_eq!(qemu_img(&["info", "-f", "qcow2", s(&img)]).code, 0);
}
