//! Tests of encrypted qcow2 images: random operations against a model
//! for every cipher combination, power cuts, what is on disk, and the
//! errors of a wrong or missing key.

use crate::driver::{CreateOptions, DriverOpenOptions};
use crate::error::ErrorKind;
use crate::storage::{MemStorage, Storage};
use crate::testkit::{run_model_test_with, run_power_cut_test, PowerCut};
use crate::{Image, Secret, Secrets};
use std::sync::Arc;

/// Create options for an encrypted image with passphrase `pass` in
/// secret `sec0` and the `-o` options `kv` (PBKDF2 at its minimum).
fn encrypted(size: u64, pass: &[u8], kv: &[(&str, &str)]) -> CreateOptions {
    let mut o = CreateOptions {
        size,
        ..Default::default()
    };
    o.options.insert("encrypt.key-secret".into(), "sec0".into());
    for (k, v) in kv {
        o.options.insert(k.to_string(), v.to_string());
    }
    if o.options.get("encrypt.format").map(String::as_str) == Some("luks") {
        o.options.insert("encrypt.iter-time".into(), "0".into());
    }
    let mut s = Secrets::new();
    s.insert("sec0", Secret::new(pass.to_vec()));
    o.secrets = s;
    o
}

fn make(opts: &CreateOptions) -> MemStorage {
    let mem = MemStorage::new();
    super::create::create(Arc::new(mem.clone()), None, opts).unwrap();
    mem
}

fn open(mem: &MemStorage, read_only: bool, pass: Option<&[u8]>) -> crate::Result<Image> {
    let mut d = DriverOpenOptions::new(read_only);
    if pass.is_none() {
        d.options
            .insert(super::OPEN_METADATA_ONLY.to_string(), "on".to_string());
    }
    if let Some(p) = pass {
        d.options.insert("encrypt.key-secret".into(), "sec0".into());
        let mut s = Secrets::new();
        s.insert("sec0", Secret::new(p.to_vec()));
        d.secrets = s;
    }
    Image::open_storage_with(Arc::new(mem.clone()), Some("qcow2"), &d, None)
}

const LUKS_VARIANTS: &[&[(&str, &str)]] = &[
    &[("encrypt.format", "luks")],
    &[
        ("encrypt.format", "luks"),
        ("encrypt.cipher-alg", "aes-128"),
        ("encrypt.cipher-mode", "cbc"),
        ("encrypt.ivgen-alg", "essiv"),
        ("encrypt.hash-alg", "sha1"),
    ],
    &[
        ("encrypt.format", "luks"),
        ("encrypt.cipher-alg", "aes-192"),
        ("encrypt.cipher-mode", "xts"),
        ("encrypt.ivgen-alg", "plain"),
        ("encrypt.hash-alg", "sha512"),
    ],
    &[
        ("encrypt.format", "luks"),
        ("encrypt.cipher-mode", "ctr"),
        ("cluster_size", "512"),
    ],
    &[
        ("encrypt.format", "luks"),
        ("extended_l2", "on"),
        ("cluster_size", "16k"),
    ],
    &[("encrypt.format", "luks"), ("compat", "0.10")],
    &[("encrypt.format", "aes"), ("cluster_size", "4k")],
];

#[test]
fn random_operations_on_encrypted_images_match_the_model() {
    for (i, kv) in LUKS_VARIANTS.iter().enumerate() {
        let opts = encrypted(1 << 20, b"correct horse", kv);
        for seed in 0..2 {
            run_model_test_with(
                "qcow2",
                &opts,
                &[("encrypt.key-secret", "sec0")],
                seed + i as u64,
                150,
            )
            .unwrap_or_else(|e| panic!("{kv:?}: {e}"));
        }
    }
}

#[test]
fn encrypted_images_survive_power_cuts() {
    for kv in [LUKS_VARIANTS[0], LUKS_VARIANTS[3], LUKS_VARIANTS[6]] {
        let t = PowerCut {
            format: "qcow2",
            create: encrypted(1 << 20, b"pw", kv),
            driver_options: vec![("encrypt.key-secret".into(), "sec0".into())],
            ops: 80,
            states: 3,
            backing: None,
            backing_format: "raw",
            prefixes: false,
        };
        run_power_cut_test(&t, 7).unwrap_or_else(|e| panic!("{kv:?}: {e}"));
    }
}

#[test]
fn the_file_holds_ciphertext_and_reads_need_the_right_key() {
    for kv in LUKS_VARIANTS {
        let mem = make(&encrypted(1 << 20, b"s3cret", kv));
        let img = open(&mem, false, Some(b"s3cret")).unwrap();
        let pattern = [0x5au8; 65536];
        img.write(&pattern, 65536).unwrap();
        img.write(&pattern[..100], 1000).unwrap();
        img.close().unwrap();
        drop(img);
        let file = mem.to_vec();
        // No run of the plaintext is in the file, nor the passphrase.
        assert!(
            !file.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)),
            "{kv:?}: plaintext on disk"
        );
        assert!(!file.windows(6).any(|w| w == b"s3cret"), "{kv:?}");
        let img = open(&mem, true, Some(b"s3cret")).unwrap();
        let mut back = vec![0u8; 65536];
        img.read(&mut back, 65536).unwrap();
        assert!(back == pattern, "{kv:?}");
        // Unaligned reads decrypt whole sectors around them.
        let mut b = [0u8; 7];
        img.read(&mut b, 1099).unwrap();
        assert_eq!(b, [0x5a, 0, 0, 0, 0, 0, 0], "{kv:?}");
        let luks = kv.contains(&("encrypt.format", "luks"));
        if luks {
            let e = open(&mem, true, Some(b"wrong")).unwrap_err();
            assert!(
                e.to_string()
                    .contains("Invalid password, cannot unlock any keyslot"),
                "{e}"
            );
        }
        // Without the key the image opens only for its metadata (info,
        // map, check); its data cannot be read or written.
        let plain_open = Image::open_storage(Arc::new(mem.clone()), Some("qcow2"), true, None);
        let Err(e) = plain_open else {
            panic!("{kv:?}: an open for data without the key succeeded");
        };
        assert!(
            e.to_string().contains("encrypt.key-secret' is required"),
            "{e}"
        );
        let img = open(&mem, true, None).unwrap();
        assert!(img.info().encrypted);
        assert!(img.block_status(65536, 65536).unwrap().data);
        let e = img.read(&mut back, 65536).unwrap_err();
        assert!(
            e.to_string().contains("encrypt.key-secret' is required"),
            "{e}"
        );
        assert_eq!(img.check(None).unwrap().corruptions, 0);
        drop(img);
        let img = open(&mem, false, None).unwrap();
        assert!(img.write(&[1u8; 512], 0).is_err());
    }
}

#[test]
fn compression_and_preallocation_are_refused_with_encryption() {
    let mem = make(&encrypted(1 << 20, b"x", &[("encrypt.format", "luks")]));
    let img = open(&mem, false, Some(b"x")).unwrap();
    let e = img.compress(&[1u8; 65536], 0).unwrap_err();
    assert!(e.to_string().contains("Compression and encryption"), "{e}");
    let o = encrypted(
        1 << 20,
        b"x",
        &[("encrypt.format", "luks"), ("preallocation", "metadata")],
    );
    assert!(super::create::create(Arc::new(MemStorage::new()), None, &o).is_err());
}

#[test]
fn create_options_are_checked_as_qemu_img_checks_them() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("encrypt.format", "aes"), ("encrypt.cipher-alg", "aes-128")],
            "Parameter 'encrypt.cipher-alg' is unexpected",
        ),
        (
            &[("encrypt.hash-alg", "sha1")],
            "Parameter 'encrypt.format' is missing",
        ),
        (
            &[("encrypt.format", "foo")],
            "Parameter 'format' does not accept value 'foo'",
        ),
        (
            &[("encrypt.format", "luks"), ("encryption", "on")],
            "can't be used at the same time",
        ),
        (
            &[("encrypt.format", "luks"), ("encrypt.cipher-mode", "gcm")],
            "does not accept value 'gcm'",
        ),
        (
            &[
                ("encrypt.format", "luks"),
                ("encrypt.cipher-alg", "twofish-128"),
            ],
            "cipher-alg",
        ),
        (
            &[
                ("encrypt.format", "luks"),
                ("encrypt.ivgen-alg", "essiv"),
                ("encrypt.ivgen-hash-alg", "sha1"),
            ],
            "No AES cipher with key size 20",
        ),
    ];
    for (kv, want) in cases {
        let mut o = encrypted(1 << 20, b"x", kv);
        if kv
            .iter()
            .all(|(k, _)| !k.starts_with("encrypt.format") && *k != "encryption")
        {
            o.options.remove("encrypt.key-secret");
        }
        let e = super::create::create(Arc::new(MemStorage::new()), None, &o).unwrap_err();
        assert!(e.to_string().contains(want), "{kv:?}: {e}");
    }
    // No secret: qemu's message.
    let mut o = encrypted(1 << 20, b"x", &[("encrypt.format", "luks")]);
    o.options.remove("encrypt.key-secret");
    let e = super::create::create(Arc::new(MemStorage::new()), None, &o).unwrap_err();
    assert!(
        e.to_string()
            .contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{e}"
    );
    // A secret ID that names nothing.
    let mut o = encrypted(1 << 20, b"x", &[("encrypt.format", "luks")]);
    o.options
        .insert("encrypt.key-secret".into(), "nosuch".into());
    let e = super::create::create(Arc::new(MemStorage::new()), None, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("No secret with id 'nosuch'"), "{e}");
}

#[test]
fn a_damaged_luks_header_is_a_clear_error_and_check_counts_its_clusters() {
    let mem = make(&encrypted(1 << 20, b"x", &[("encrypt.format", "luks")]));
    let img = open(&mem, false, Some(b"x")).unwrap();
    img.write(&[1u8; 4096], 0).unwrap();
    img.close().unwrap();
    drop(img);
    // The LUKS area's clusters are referenced: no leaks, no repair frees them.
    let img = open(&mem, false, None).unwrap();
    let r = img.check(Some(crate::RepairMode::All)).unwrap();
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{:?}", r.messages);
    drop(img);
    let h = super::header::Header::read(&mem).unwrap();
    let (off, len) = h.crypto_header().unwrap();
    assert_eq!(off % 65536, 0);
    assert_eq!(len, 2068480);
    let good = mem.to_vec();
    for (at, bytes, want) in [
        (off, b"LUKX".to_vec(), "not in LUKS format"),
        (
            off + 208 + 44,
            1u32.to_be_bytes().to_vec(),
            "stripes 1 != 4000",
        ),
        (off + 108, 1u32.to_be_bytes().to_vec(), "key size"),
    ] {
        let m = MemStorage::from_bytes(&good);
        m.write_at(&bytes, at).unwrap();
        let e = open(&m, true, Some(b"x")).unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    // The extension pointing past the end of the file.
    let m = MemStorage::from_bytes(&good);
    m.set_len(off + 1000).unwrap();
    let e = open(&m, true, Some(b"x")).unwrap_err();
    assert!(e.to_string().contains("LUKS"), "{e}");
}

#[test]
fn snapshots_of_encrypted_images_keep_their_data() {
    let mem = make(&encrypted(1 << 20, b"k", &[("encrypt.format", "luks")]));
    let img = open(&mem, false, Some(b"k")).unwrap();
    img.write(&[1u8; 131072], 0).unwrap();
    img.snapshot_create("s").unwrap();
    img.write(&[2u8; 4096], 4096).unwrap();
    img.snapshot_apply("s").unwrap();
    let mut b = vec![0u8; 131072];
    img.read(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 1));
}

#[test]
fn a_downgrade_that_would_write_plain_zeroes_into_an_encrypted_image_is_refused() {
    let mem = make(&encrypted(1 << 20, b"k", &[("encrypt.format", "luks")]));
    let img = open(&mem, false, Some(b"k")).unwrap();
    img.write(&[1u8; 65536], 0).unwrap();
    img.write_zeroes(0, 65536, false).unwrap();
    let mut o = crate::driver::AmendOptions::default();
    o.options.insert("compat".into(), "0.10".into());
    // The zero write kept its host cluster (a preallocated zero cluster).
    assert!(img.block_status(0, 65536).unwrap().offset.is_some());
    let e = img.amend(&o).unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");
    let mut b = vec![9u8; 65536];
    img.read(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
