//! Fuzz target: typed mutations of an encrypted qcow2 image (LUKS).
//!
//! One valid LUKS qcow2 image is made once (PBKDF2 at its minimum); each
//! input picks fields of the qcow2 header, the full disk encryption
//! header extension and the LUKS header (payload offset, key size,
//! master key digest iterations, every key slot's state, iterations, key
//! offset and stripes, the cipher, mode and hash names) and sets them to
//! extreme values. The result is opened for its metadata (info, check)
//! and, when no PBKDF2 iteration count is absurd, with its passphrase
//! (read, write, flush). Errors are expected; a panic, an overflow, a
//! hang or a huge allocation is a bug.

#![no_main]

use imgloop::driver::DriverOpenOptions;
use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image, Secret, Secrets};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

#[path = "fields.rs"]
mod fields;
use fields::{exercise_read_only, get, mutate, Input, Order};

const PASS: &[u8] = b"fuzz";

fn secrets() -> Secrets {
    let mut s = Secrets::new();
    s.insert("k", Secret::new(PASS.to_vec()));
    s
}

/// The valid image: 1 MiB, 4 KiB clusters, some data written.
fn seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let mem = MemStorage::new();
        let mut o = CreateOptions {
            size: 1 << 20,
            secrets: secrets(),
            ..Default::default()
        };
        for (k, v) in [
            ("encrypt.format", "luks"),
            ("encrypt.key-secret", "k"),
            ("encrypt.iter-time", "0"),
            ("cluster_size", "4096"),
        ] {
            o.options.insert(k.into(), v.into());
        }
        registry::find("qcow2")
            .unwrap()
            .create(Arc::new(mem.clone()), None, &o)
            .unwrap();
        let img = open(&mem, false, true).unwrap();
        img.write(&[0x5a; 20000], 3000).unwrap();
        img.close().unwrap();
        mem.to_vec()
    })
}

fn open(mem: &MemStorage, read_only: bool, key: bool) -> imgloop::Result<Image> {
    let mut d = DriverOpenOptions::new(read_only);
    if key {
        d.options.insert("encrypt.key-secret".into(), "k".into());
        d.secrets = secrets();
    } else {
        d.options.insert(
            imgloop::formats::qcow2::OPEN_METADATA_ONLY.into(),
            "on".into(),
        );
    }
    Image::open_storage_with(Arc::new(mem.clone()), Some("qcow2"), &d, None)
}

/// Where the FDE extension's payload is (after the 112-byte header).
fn crypto_ext(bytes: &[u8]) -> Option<u64> {
    let mut at = 112u64;
    while at + 8 <= 4096 {
        let kind = get(bytes, at, 4, Order::Big);
        let len = get(bytes, at + 4, 4, Order::Big);
        if kind == 0 {
            return None;
        }
        if kind == 0x0537_be77 {
            return Some(at + 8);
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    None
}

const NAMES: &[&[u8]] = &[b"aes", b"twofish", b"", b"aes\0x", b"des"];
const MODES: &[&[u8]] = &[
    b"xts-plain64",
    b"cbc-essiv:sha256",
    b"cbc-essiv:sha1",
    b"ctr-plain",
    b"ecb-plain64",
    b"xts",
    b"cbc-essiv",
    b"gcm-plain64",
    b"xts-plain64:",
];
const HASHES: &[&[u8]] = &[b"sha256", b"sha1", b"md5", b"ripemd160", b"sha3", b""];

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut bytes = seed().to_vec();
    let ext = crypto_ext(&bytes).expect("the seed has the extension");
    let luks = get(&bytes, ext, 8, Order::Big);
    let mut fields: Vec<(u64, u8)> = vec![(32, 4), (ext, 8), (ext + 8, 8)];
    for (off, w) in [(104u64, 4u8), (108, 4), (164, 4), (6, 2)] {
        fields.push((luks + off, w));
    }
    for slot in 0..8u64 {
        for (off, w) in [(0u64, 4u8), (4, 4), (40, 4), (44, 4)] {
            fields.push((luks + 208 + 48 * slot + off, w));
        }
    }
    let n = input.byte() % 6;
    for _ in 0..n {
        let f = fields[input.byte() as usize % fields.len()];
        mutate(&mut input, &mut bytes, f, 512, Order::Big);
    }
    // The names.
    for (at, list) in [(8u64, NAMES), (40, MODES), (72, HASHES)] {
        if input.byte() % 4 == 0 {
            let s: &[u8] = list[input.byte() as usize % list.len()];
            let at = (luks + at) as usize;
            if let Some(dst) = bytes.get_mut(at..at + 32) {
                dst.fill(0);
                dst[..s.len().min(32)].copy_from_slice(&s[..s.len().min(32)]);
            }
        }
    }
    let mem = MemStorage::from_bytes(&bytes);
    if let Ok(img) = open(&mem, true, false) {
        exercise_read_only(&img, 1 << 20, 0, true);
    }
    // Unlocking costs what the iteration counts say: only sane ones.
    let slots_sane =
        (0..8u64).all(|s| get(&bytes, luks + 208 + 48 * s + 4, 4, Order::Big) <= 20_000);
    let mk_sane = get(&bytes, luks + 164, 4, Order::Big) <= 20_000;
    if !(slots_sane && mk_sane) {
        return;
    }
    if let Ok(img) = open(&mem, true, true) {
        exercise_read_only(&img, 1 << 20, 1 << 20, false);
    }
    let rw = MemStorage::from_bytes(&bytes);
    if let Ok(img) = open(&rw, false, true) {
        let _ = img.write(&[1u8; 5000], 1000);
        let _ = img.write_zeroes(8192, 4096, true);
        let _ = img.flush();
        let mut b = vec![0u8; 16384];
        let _ = img.read(&mut b, 0);
        let _ = img.close();
    }
});
