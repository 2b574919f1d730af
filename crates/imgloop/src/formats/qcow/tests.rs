//! Tests of the qcow driver through the generic layer.

use super::header::{CryptMethod, QcowHeader, COMPRESSED};
use crate::driver::{CreateOptions, Mapping};
use crate::storage::{MemStorage, Storage};
use crate::testkit::{run_model_test_over, run_model_test_with, run_power_cut_test, PowerCut, Rng};
use crate::{Error, ErrorKind, Image, Secret, Secrets};
use std::sync::Arc;

fn create(size: u64, kv: &[(&str, &str)]) -> CreateOptions {
    let mut o = CreateOptions {
        size,
        ..Default::default()
    };
    for (k, v) in kv {
        o.options.insert(k.to_string(), v.to_string());
    }
    o
}

fn encrypted(size: u64, password: &[u8]) -> CreateOptions {
    let mut o = create(
        size,
        &[("encrypt.format", "aes"), ("encrypt.key-secret", "sec0")],
    );
    let mut s = Secrets::new();
    s.insert("sec0", Secret::new(password.to_vec()));
    o.secrets = s;
    o
}

fn new_image(opts: &CreateOptions) -> MemStorage {
    let mem = MemStorage::new();
    crate::registry::find("qcow")
        .unwrap()
        .create(Arc::new(mem.clone()), None, opts)
        .unwrap();
    mem
}

fn open(mem: &MemStorage, read_only: bool, key: Option<&CreateOptions>) -> crate::Result<Image> {
    let mut d = crate::driver::DriverOpenOptions::new(read_only);
    if let Some(c) = key {
        d.options.insert("encrypt.key-secret".into(), "sec0".into());
        d.secrets = c.secrets.clone();
    }
    Image::open_storage_with(Arc::new(mem.clone()), Some("qcow"), &d, None)
}

#[test]
fn a_new_image_has_qemus_layout_and_reads_as_zeroes() {
    let mem = new_image(&create(10 << 20, &[]));
    let h = QcowHeader::read(&mem).unwrap();
    assert_eq!((h.cluster_bits, h.l2_bits, h.l1_size), (12, 9, 5));
    assert_eq!(h.l1_table_offset, 48);
    let img = open(&mem, true, None).unwrap();
    let mut b = vec![1u8; 8192];
    img.read(&mut b, 4 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let s = img.block_status(0, 10 << 20).unwrap();
    assert!(!s.allocated && s.len == 10 << 20, "{s:?}");
}

#[test]
fn written_clusters_map_to_appended_host_clusters_and_survive_reopening() {
    let mem = new_image(&create(4 << 20, &[]));
    {
        let img = open(&mem, false, None).unwrap();
        img.write(&[7u8; 5000], 1000).unwrap();
        img.close().unwrap();
    }
    let img = open(&mem, true, None).unwrap();
    let mut b = vec![0u8; 8192];
    img.read(&mut b, 0).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0));
    assert!(b[1000..6000].iter().all(|&x| x == 7));
    assert!(b[6000..].iter().all(|&x| x == 0));
    // Two clusters, contiguous after the L2 table at 4096.
    let (m, len) = img.driver().map(0, 8192).unwrap();
    assert_eq!(
        m,
        Mapping::Data {
            storage: crate::StorageId::IMAGE,
            offset: 8192
        }
    );
    assert_eq!(len, 8192);
}

#[test]
fn compressed_clusters_read_back_and_are_rewritten_on_partial_writes() {
    let mem = new_image(&create(1 << 20, &[]));
    let img = open(&mem, false, None).unwrap();
    let unit: Vec<u8> = (0..4096u32).map(|i| (i / 64) as u8).collect();
    let packed = img.driver().compress(&unit).unwrap().expect("compressible");
    assert!(img.driver().write_compressed(&packed, 8192).unwrap());
    assert_eq!(img.driver().map(8192, 4096).unwrap().0, Mapping::Compressed);
    let mut b = vec![0u8; 4096];
    img.read(&mut b, 8192).unwrap();
    assert_eq!(b, unit);
    // A partial write copies the rest of the old data into a new cluster.
    img.write(&[0xee; 100], 8192 + 1000).unwrap();
    assert!(matches!(
        img.driver().map(8192, 4096).unwrap().0,
        Mapping::Data { .. }
    ));
    img.read(&mut b, 8192).unwrap();
    let mut want = unit.clone();
    want[1000..1100].fill(0xee);
    assert_eq!(b, want);
    // An allocated cluster is not stored compressed again.
    assert!(!img.driver().write_compressed(&packed, 8192).unwrap());
}

#[test]
fn random_operations_match_the_model() {
    for (i, kv) in [
        vec![],
        vec![("cluster_size", "512")],
        vec![("cluster_size", "65536")],
    ]
    .iter()
    .enumerate()
    {
        for seed in 0..3 {
            run_model_test_with("qcow", &create(3 << 20, kv), &[], seed + 10 * i as u64, 300)
                .unwrap();
        }
    }
    // A cache of two L2 tables: evictions and flushes on a full cache.
    run_model_test_with(
        "qcow",
        &create(6 << 20, &[]),
        &[("l2-cache-size", "8k")],
        7,
        400,
    )
    .unwrap();
}

#[test]
fn random_operations_over_a_backing_file_match_the_model() {
    let mut base = vec![0u8; (3 << 20) + 512];
    Rng::new(9).fill(&mut base);
    for seed in 0..3 {
        run_model_test_over("qcow", &create(0, &[]), &base, seed, 300).unwrap();
    }
    // 4 KiB clusters over a backing file: partial writes copy the rest.
    run_model_test_over(
        "qcow",
        &create(0, &[("cluster_size", "4096")]),
        &base,
        5,
        300,
    )
    .unwrap();
}

#[test]
fn encrypted_images_store_ciphertext_and_read_back_with_the_key() {
    let opts = encrypted(1 << 20, b"passw0rd");
    let mem = new_image(&opts);
    assert_eq!(QcowHeader::read(&mem).unwrap().crypt, CryptMethod::Aes);
    {
        let img = open(&mem, false, Some(&opts)).unwrap();
        img.write(&[0x5a; 3000], 700).unwrap();
        img.close().unwrap();
    }
    // The plaintext is nowhere in the file.
    let raw = mem.to_vec();
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)));
    let img = open(&mem, true, Some(&opts)).unwrap();
    let mut b = vec![0u8; 4096];
    img.read(&mut b, 0).unwrap();
    assert!(b[..700].iter().all(|&x| x == 0));
    assert!(b[700..3700].iter().all(|&x| x == 0x5a));
    assert!(b[3700..].iter().all(|&x| x == 0));
    let s = img.block_status(0, 4096).unwrap();
    assert!(s.encrypted && s.data, "{s:?}");
    // No compression for encrypted images.
    assert!(img.driver().compression_unit().is_none());
}

#[test]
fn an_encrypted_image_opens_without_its_key_but_reads_of_data_fail() {
    let opts = encrypted(1 << 20, b"k");
    let mem = new_image(&opts);
    {
        let img = open(&mem, false, Some(&opts)).unwrap();
        img.write(&[1u8; 512], 0).unwrap();
        img.close().unwrap();
    }
    let img = open(&mem, true, None).unwrap();
    assert!(img.info().encrypted);
    let mut b = [0u8; 512];
    let e = img.read(&mut b, 0).unwrap_err();
    assert!(e.to_string().contains("encrypt.key-secret"), "{e}");
    // Unallocated ranges need no key.
    img.read(&mut b, 4096).unwrap();
    // A wrong key cannot be detected: the data decrypts to garbage.
    let wrong = encrypted(1 << 20, b"other");
    let img = open(&mem, true, Some(&wrong)).unwrap();
    img.read(&mut b, 0).unwrap();
    assert_ne!(b, [1u8; 512]);
    // A key for an image that is not encrypted is an error.
    let plain = new_image(&create(1 << 20, &[]));
    assert_eq!(
        open(&plain, true, Some(&opts)).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn encrypted_random_operations_match_the_model() {
    for seed in 0..3 {
        run_model_test_with(
            "qcow",
            &encrypted(2 << 20, b"model"),
            &[("encrypt.key-secret", "sec0")],
            seed,
            250,
        )
        .unwrap();
    }
}

#[test]
fn synced_writes_survive_power_cuts() {
    let mut base = vec![0u8; 1 << 20];
    Rng::new(4).fill(&mut base);
    let cases = [
        (create(1 << 20, &[]), vec![], None),
        (
            create(1 << 20, &[("cluster_size", "512")]),
            vec![("l2-cache-size", "4k")],
            None,
        ),
        (create(0, &[]), vec![], Some(base.clone())),
        (
            encrypted(1 << 20, b"cut"),
            vec![("encrypt.key-secret", "sec0")],
            None,
        ),
    ];
    for (create, driver, backing) in cases {
        let t = PowerCut {
            format: "qcow",
            create,
            driver_options: driver
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ops: 100,
            states: 4,
            backing,
            backing_format: "raw",
            prefixes: false,
        };
        for seed in 0..3 {
            run_power_cut_test(&t, seed).unwrap();
        }
    }
}

/// An image whose first L2 entry is set to `raw`.
fn with_l2_entry(raw: u64) -> MemStorage {
    let mem = new_image(&create(1 << 20, &[]));
    {
        let img = open(&mem, false, None).unwrap();
        img.write(&[3u8; 4096], 0).unwrap();
        img.close().unwrap();
    }
    // L2 table at 4096 (the first cluster after the header).
    mem.write_at(&raw.to_be_bytes(), 4096).unwrap();
    mem
}

#[test]
fn hostile_entries_are_errors_and_never_writes_over_metadata() {
    let mut b = [0u8; 512];
    // A cluster offset near 2^64.
    let img = open(&with_l2_entry(u64::MAX >> 1), false, None).unwrap();
    let e = img.read(&mut b, 0).unwrap_err();
    assert!(e.to_string().contains("beyond"), "{e}");
    // A cluster over the header: reads work, writes are refused.
    let img = open(&with_l2_entry(16), false, None).unwrap();
    img.read(&mut b, 0).unwrap();
    let e = img.write(&[9u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    // An unaligned cluster (it overlaps the next one): read, not written.
    let img = open(&with_l2_entry(8192 + 5), false, None).unwrap();
    img.read(&mut b, 0).unwrap();
    let e = img.write(&[9u8; 512], 0).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    // A compressed entry of length 0, and one with garbage data.
    let img = open(&with_l2_entry(COMPRESSED | 8192), true, None).unwrap();
    assert!(img.read(&mut b, 0).is_err());
    let img = open(
        &with_l2_entry(COMPRESSED | (100u64 << 51) | 8192),
        true,
        None,
    )
    .unwrap();
    let e: Error = img.read(&mut b, 0).unwrap_err();
    assert!(e.to_string().contains("compressed"), "{e}");
    // A data cluster past the end of the file reads as zeroes, as in qemu.
    let img = open(&with_l2_entry(1 << 30), true, None).unwrap();
    b.fill(1);
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 512]);
    // An L1 entry pointing past the end of the file reads as unallocated.
    let mem = new_image(&create(1 << 20, &[]));
    mem.write_at(&(1u64 << 40).to_be_bytes(), 48).unwrap();
    let img = open(&mem, true, None).unwrap();
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 512]);
    // An L1 entry near 2^64 is an error, not an overflow.
    mem.write_at(&(u64::MAX - 100).to_be_bytes(), 48).unwrap();
    let img = open(&mem, true, None).unwrap();
    assert!(img.read(&mut b, 0).is_err());
}

#[test]
fn a_read_only_open_never_changes_the_image() {
    let mem = with_l2_entry(8192);
    let before = mem.to_vec();
    let img = open(&mem, true, None).unwrap();
    let mut b = vec![0u8; 1 << 20];
    img.read(&mut b, 0).unwrap();
    assert_eq!(img.write(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    img.close().unwrap();
    assert!(mem.to_vec() == before);
}
