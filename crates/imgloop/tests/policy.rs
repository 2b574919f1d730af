//! Files named inside images open only as the open policy allows.

use imgloop::{create, CreateOptions, ErrorKind, FilePolicy, Image, OpenOptions};
use std::path::Path;

fn make(path: &Path, format: &str, size: u64, backing: Option<(&str, &str)>, kv: &[(&str, &str)]) {
    let mut opts = CreateOptions {
        size,
        backing_file: backing.map(|b| b.0.to_string()),
        backing_format: backing.map(|b| b.1.to_string()),
        ..Default::default()
    };
    for (k, v) in kv {
        opts.options.insert(k.to_string(), v.to_string());
    }
    create(path, format, &opts).unwrap();
}

fn follow() -> FilePolicy {
    FilePolicy::like_qemu_img()
}

#[test]
fn by_default_a_backing_file_is_not_opened_and_reads_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x77u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    make(&top, "qcow2", 1 << 20, Some(("base.raw", "raw")), &[]);
    let mut b = [0u8; 4];
    let safe = Image::open(&top, &OpenOptions::read_only(Some("qcow2"))).unwrap();
    assert!(safe.backing().is_none());
    safe.read(&mut b, 0).unwrap();
    assert_eq!(b, [0; 4]);
    // The name is still reported.
    assert_eq!(safe.info().backing_filename.as_deref(), Some("base.raw"));
    let followed = Image::open(
        &top,
        &OpenOptions::read_only(Some("qcow2")).with_policy(follow()),
    )
    .unwrap();
    followed.read(&mut b, 0).unwrap();
    assert_eq!(b, [0x77; 4]);
    let opted_out = Image::open(
        &top,
        &OpenOptions::read_only(Some("qcow2")).with_policy(follow().without_backing()),
    )
    .unwrap();
    assert!(opted_out.backing().is_none());
}

#[test]
fn by_default_an_image_that_needs_a_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    // A relative data file name is relative to the working directory when
    // creating (as in qemu-img): name it in the scratch directory.
    let data_name = dir.path().join("d.data").display().to_string();
    make(&img, "qcow2", 1 << 20, None, &[("data_file", &data_name)]);
    let e = Image::open(&img, &OpenOptions::read_only(Some("qcow2"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("d.data"), "{e}");
    Image::open(
        &img,
        &OpenOptions::read_only(Some("qcow2")).with_policy(follow()),
    )
    .unwrap();
}

#[test]
fn the_data_file_of_a_read_only_image_is_opened_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    // A relative data file name is relative to the working directory when
    // creating (as in qemu-img): name it in the scratch directory.
    let data_name = dir.path().join("d.data").display().to_string();
    make(&img, "qcow2", 1 << 20, None, &[("data_file", &data_name)]);
    let ro = Image::open(
        &img,
        &OpenOptions::read_only(Some("qcow2")).with_policy(follow()),
    )
    .unwrap();
    let data = &ro.driver().storages()[1];
    assert_eq!(data.path(), Some(dir.path().join("d.data").as_path()));
    let e = data.write_at(b"x", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    // Reopened read-write, it can be written, and read-only again not.
    ro.reopen(false).unwrap();
    ro.write(b"y", 0).unwrap();
    ro.reopen(true).unwrap();
    assert!(ro.driver().storages()[1].write_at(b"z", 0).is_err());
}

#[test]
fn named_files_that_are_fifos_devices_or_in_proc_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (i, target) in [fifo.to_str().unwrap(), "/dev/zero", "/proc/self/mem"]
        .iter()
        .enumerate()
    {
        // Made against a harmless file, which is then swapped for a
        // symlink to the target: what a hostile image would name.
        let named = dir.path().join(format!("evil{i}.raw"));
        std::fs::write(&named, vec![0u8; 1 << 20]).unwrap();
        let top = dir.path().join(format!("top{i}.qcow2"));
        make(
            &top,
            "qcow2",
            1 << 20,
            Some((&format!("evil{i}.raw"), "raw")),
            &[],
        );
        std::fs::remove_file(&named).unwrap();
        std::os::unix::fs::symlink(target, &named).unwrap();
        let e = Image::open(
            &top,
            &OpenOptions::read_only(Some("qcow2")).with_policy(follow()),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{target}: {e}");
    }
}

#[test]
fn backing_chains_deeper_than_the_policy_allows_and_loops_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("l0.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let mut prev = ("l0.raw".to_string(), "raw");
    for i in 1..=3 {
        let p = dir.path().join(format!("l{i}.qcow2"));
        make(&p, "qcow2", 1 << 20, Some((&prev.0, prev.1)), &[]);
        prev = (format!("l{i}.qcow2"), "qcow2");
    }
    let top = dir.path().join("l3.qcow2");
    let mut shallow = follow();
    shallow.max_depth = 2;
    let e = Image::open(&top, &OpenOptions::read_only(None).with_policy(shallow)).unwrap_err();
    assert!(e.to_string().contains("deeper than 2"), "{e}");
    Image::open(&top, &OpenOptions::read_only(None).with_policy(follow())).unwrap();
    // A loop: x names y, y names x.
    let (x, y) = (dir.path().join("x.qcow2"), dir.path().join("y.qcow2"));
    make(&x, "qcow2", 1 << 20, None, &[]);
    make(&y, "qcow2", 1 << 20, Some(("x.qcow2", "qcow2")), &[]);
    make(&x, "qcow2", 1 << 20, Some(("y.qcow2", "qcow2")), &[]);
    let e = Image::open(&x, &OpenOptions::read_only(None).with_policy(follow())).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
}
