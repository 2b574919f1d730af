//! Tests of the COW driver through the generic layer.

use super::header::{CowHeader, Layout, MAGIC};
use crate::driver::{CreateOptions, Mapping};
use crate::image::{create, Image, OpenOptions};
use crate::policy::FilePolicy;
use crate::testkit::{run_model_test_over, run_power_cut_test, PowerCut, Rng};
use crate::ErrorKind;
use std::path::{Path, PathBuf};

fn backing_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Rng::new(seed).fill(&mut b);
    b
}

/// A directory with a random `base.img` of `len` bytes and a COW file
/// `disk.cow` (of `version`) over it.
fn cow_over(len: usize, version: Option<u32>) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let base = backing_bytes(len, 11);
    std::fs::write(dir.path().join("base.img"), &base).unwrap();
    let mut opts = CreateOptions {
        backing_file: Some("base.img".into()),
        backing_format: Some("raw".into()),
        ..Default::default()
    };
    if let Some(v) = version {
        opts.options.insert("version".into(), v.to_string());
    }
    let path = dir.path().join("disk.cow");
    create(&path, "cow", &opts).unwrap();
    (dir, path, base)
}

fn open(path: &Path, read_only: bool) -> Image {
    let opts = if read_only {
        OpenOptions::read_only(None)
    } else {
        OpenOptions::read_write(None)
    };
    Image::open(path, &opts.with_policy(FilePolicy::like_qemu_img())).unwrap()
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read(&mut b, 0).unwrap();
    b
}

#[test]
fn a_new_file_reads_as_its_backing_file_and_records_it_like_uml() {
    let (dir, path, base) = cow_over(100 * 1024 + 300, None);
    let img = open(&path, true);
    assert_eq!(img.format(), "cow");
    assert_eq!(img.size(), base.len() as u64);
    assert!(
        read_all(&img) == base,
        "the disk differs from the expected content"
    );
    let bytes = std::fs::read(&path).unwrap();
    let h = CowHeader::read(&crate::storage::MemStorage::from_bytes(&bytes)).unwrap();
    assert_eq!(h.layout, Layout::V3);
    // An absolute path, as UML needs, and the backing file's mtime.
    let full = std::fs::canonicalize(dir.path().join("base.img")).unwrap();
    assert_eq!(h.backing_file, full.display().to_string());
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&full).unwrap();
    assert_eq!(h.mtime, meta.mtime() as u32);
    // Header, bitmap and data area; the bitmap is a hole.
    assert_eq!(bytes.len() as u64, h.data_offset + h.size);
    assert!(bytes[h.bitmap_offset as usize..h.data_offset as usize]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn partial_sector_writes_keep_the_rest_of_the_sector_from_the_backing_file() {
    let (_dir, path, mut base) = cow_over(1 << 20, None);
    let img = open(&path, false);
    img.write(b"hello", 1000).unwrap();
    img.write(&[7u8; 3000], 70_000).unwrap();
    base[1000..1005].copy_from_slice(b"hello");
    base[70_000..73_000].fill(7);
    assert!(
        read_all(&img) == base,
        "the disk differs from the expected content"
    );
    // Only the touched sectors are stored: 1000 is in sector 1.
    let (m, len) = img.driver().map(512, 4096).unwrap();
    assert!(matches!(m, Mapping::Data { .. }), "{m:?}");
    assert_eq!(len, 512);
    let (m, _) = img.driver().map(0, 512).unwrap();
    assert_eq!(m, Mapping::Unallocated);
    img.close().unwrap();
    drop(img);
    let img = open(&path, true);
    assert!(
        read_all(&img) == base,
        "the disk differs from the expected content"
    );
}

#[test]
fn version_2_files_are_written_and_read_back() {
    let (_dir, path, mut base) = cow_over(64 * 1024, Some(2));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[0..4], &MAGIC.to_be_bytes());
    assert_eq!(&bytes[4..8], &2u32.to_be_bytes());
    let img = open(&path, false);
    img.write(&[1u8; 600], 511).unwrap();
    base[511..1111].fill(1);
    img.close().unwrap();
    drop(img);
    assert!(
        read_all(&open(&path, true)) == base,
        "the disk differs after reopening"
    );
}

#[test]
fn discard_frees_stored_sectors_and_never_brings_backing_data_back() {
    let (_dir, path, mut base) = cow_over(256 * 1024, None);
    let img = open(&path, false);
    img.write(&[5u8; 8192], 8192).unwrap();
    img.discard(8192, 8192).unwrap();
    base[8192..16384].fill(0);
    // Unstored sectors keep reading from the backing file.
    img.discard(65536, 4096).unwrap();
    assert!(
        read_all(&img) == base,
        "the disk differs from the expected content"
    );
    img.write_zeroes(100_000, 5000, true).unwrap();
    base[100_000..105_000].fill(0);
    assert!(
        read_all(&img) == base,
        "the disk differs from the expected content"
    );
}

#[test]
fn a_changed_backing_file_is_a_warning_and_refuses_writes() {
    let (dir, path, base) = cow_over(64 * 1024, None);
    let backing = dir.path().join("base.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000))
        .unwrap();
    drop(f);
    let img = open(&path, false);
    let w = img.driver().warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].to_string().contains("mtime mismatch"), "{}", w[0]);
    assert!(
        read_all(&img) == base,
        "the disk differs from the expected content"
    );
    let e = img.write(&[1], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State);
    assert!(e.to_string().contains("writes refused"), "{e}");
}

#[test]
fn a_read_only_open_never_changes_the_file() {
    let (_dir, path, _base) = cow_over(64 * 1024, None);
    let before = std::fs::read(&path).unwrap();
    let img = open(&path, true);
    assert_eq!(img.write(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    img.close().unwrap();
    drop(img);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn the_cow_file_needs_a_raw_backing_file_of_its_size() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.img"), [0u8; 4096]).unwrap();
    let path = dir.path().join("x.cow");
    let e = create(&path, "cow", &CreateOptions::default()).unwrap_err();
    assert!(e.to_string().contains("backing file"), "{e}");
    let e = create(
        &path,
        "cow",
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("backing file's size"), "{e}");
    create(
        &dir.path().join("base.qcow2"),
        "qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let e = create(
        &path,
        "cow",
        &CreateOptions {
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(!path.exists());
}

#[test]
fn random_operations_over_a_backing_file_match_the_model() {
    // 20 MiB: the bitmap spans two cache chunks.
    let base = backing_bytes(20 << 20, 3);
    run_model_test_over("cow", &CreateOptions::default(), &base, 0, 200).unwrap();
    let small = backing_bytes(300 * 1024 + 512, 4);
    for seed in 3..8 {
        run_model_test_over("cow", &CreateOptions::default(), &small, seed, 300).unwrap();
    }
}

#[test]
fn synced_writes_survive_power_cuts_and_the_bitmap_never_runs_ahead_of_data() {
    let t = PowerCut {
        format: "cow",
        create: CreateOptions::default(),
        driver_options: Vec::new(),
        ops: 100,
        states: 4,
        backing: Some(backing_bytes(512 * 1024, 5)),
        backing_format: "raw",
        prefixes: false,
    };
    for seed in 0..4 {
        run_power_cut_test(&t, seed).unwrap();
    }
}

#[test]
fn without_its_backing_file_a_partial_write_is_refused_not_filled_with_zeroes() {
    let (_dir, path, _base) = cow_over(64 * 1024, None);
    let img = Image::open(&path, &OpenOptions::read_write(None)).unwrap();
    let e = img.write(&[1u8; 100], 50).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.to_string().contains("not opened"), "{e}");
    // Whole sectors need nothing from it.
    img.write(&[1u8; 512], 512).unwrap();
}

#[test]
fn block_status_of_a_huge_disk_costs_what_its_bitmap_holds() {
    // A 2^50-byte disk whose bitmap (256 GiB) lies almost all past the
    // end of a short file: its runs are found without walking it.
    let (_dir, path, _) = cow_over(1 << 20, None);
    let mut head = std::fs::read(&path).unwrap()[..4096].to_vec();
    head[12..20].copy_from_slice(&(1u64 << 50).to_be_bytes());
    // One stored sector (bit 3); the rest of the file is a hole, as
    // uml_mkcow leaves it.
    head.resize(8193, 0);
    head[8192] = 1 << 3;
    let huge = path.with_file_name("huge.cow");
    std::fs::write(&huge, &head).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&huge)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let img = Image::open(&huge, &OpenOptions::read_only(Some("cow"))).unwrap();
    assert_eq!(img.size(), 1 << 50);
    let mut calls = 0;
    let mut pos = 0;
    while pos < img.size() {
        let s = img.block_status(pos, img.size() - pos).unwrap();
        calls += 1;
        pos += s.len;
        assert!(calls < 100, "block status walks the virtual size");
    }
    let s = img.block_status(3 * 512, 4096).unwrap();
    assert!(s.allocated && s.len == 512, "{s:?}");
}
