//! Fuzz target: typed mutations of a valid qcow (version 1) image.
//!
//! The input picks the cluster size, whether the image is encrypted, and
//! what is written (plain and compressed clusters), then sets header
//! fields and the first L1 and L2 entries to extreme values (0, 1,
//! cluster-size edges, the file length, 2^31, 2^32, 2^61 to 2^64 - 1,
//! values near the old one, raw input bytes). The result is opened
//! read-only (walked, read; nothing may change) and read-write (written,
//! zeroed, discarded, flushed). Errors are expected; a panic (including
//! arithmetic overflow: the fuzz build has overflow checks on), a hang or
//! a huge allocation is a bug.

#![no_main]

use imgloop::driver::DriverOpenOptions;
use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image, Secret, Secrets};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

#[path = "fields.rs"]
mod fields;
use fields::{exercise_read_only, get, mutate, Input, Order};

/// Header fields: (offset, width).
const HEADER: &[(u64, u8)] = &[
    (4, 4),
    (8, 8),
    (16, 4),
    (24, 8),
    (32, 1),
    (33, 1),
    (36, 4),
    (40, 8),
];

fn open(mem: &MemStorage, read_only: bool, secrets: &Secrets, encrypted: bool) -> Option<Image> {
    let mut d = DriverOpenOptions::new(read_only);
    if encrypted {
        d.options.insert("encrypt.key-secret".into(), "k".into());
        d.secrets = secrets.clone();
    }
    Image::open_storage_with(Arc::new(mem.clone()), Some("qcow"), &d, None).ok()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cluster_bits = 9 + input.byte() % 8;
    let encrypted = input.byte() % 4 == 0;
    let mut opts = CreateOptions {
        size: ((input.byte() as u64 % 64) + 1) << 16,
        ..Default::default()
    };
    opts.options
        .insert("cluster_size".into(), (1u64 << cluster_bits).to_string());
    let mut secrets = Secrets::new();
    if encrypted {
        secrets.insert("k", Secret::new(b"fuzz".to_vec()));
        opts.options.insert("encrypt.format".into(), "aes".into());
        opts.options.insert("encrypt.key-secret".into(), "k".into());
        opts.secrets = secrets.clone();
    }
    let mem = MemStorage::new();
    if registry::find("qcow")
        .expect("qcow")
        .create(Arc::new(mem.clone()), None, &opts)
        .is_err()
    {
        return;
    }
    let cluster = 1u64 << cluster_bits;
    {
        let img = open(&mem, false, &secrets, encrypted).expect("a new image opens");
        for i in 0..4u64 {
            let _ = img.write(&[0x40 + i as u8; 3000], i * 70_000 % opts.size);
        }
        if !encrypted && input.byte() % 2 == 0 {
            let unit = vec![0x11u8; cluster as usize];
            if let Ok(Some(packed)) = img.driver().compress(&unit) {
                let at = (input.byte() as u64 * cluster) % opts.size / cluster * cluster;
                let _ = img.driver().write_compressed(&packed, at);
            }
        }
        let _ = img.close();
    }
    let mut bytes = mem.to_vec();

    // The first L1 and L2 entries.
    let l1 = get(&bytes, 40, 8, Order::Big);
    let l2 = get(&bytes, l1, 8, Order::Big);
    let mut fields: Vec<(u64, u8)> = HEADER.to_vec();
    fields.push((l1, 8));
    fields.push((l2, 8));
    fields.push((l2 + 8, 8));
    for _ in 0..1 + input.byte() % 4 {
        let f = fields[input.byte() as usize % fields.len()];
        mutate(&mut input, &mut bytes, f, cluster, Order::Big);
    }

    let ro = MemStorage::from_bytes(&bytes);
    if let Some(img) = open(&ro, true, &secrets, encrypted) {
        exercise_read_only(&img, 8 << 20, 2 << 20, false);
        assert!(ro.to_vec() == bytes, "a read-only open changed the image");
    }

    let rw = MemStorage::from_bytes(&bytes);
    if let Some(img) = open(&rw, false, &secrets, encrypted) {
        let size = img.size();
        if size > 0 {
            let off = input.u64() % size;
            let len = (input.byte() as u64 * 512 + 1).min(size - off).min(1 << 20);
            let pattern = vec![0x5a; len as usize];
            // A write inside one cluster reads back, whatever the damage
            // (across clusters, a damaged table may map two guest clusters
            // to overlapping host places).
            let one_cluster = off / cluster == (off + len - 1) / cluster;
            if img.write(&pattern, off).is_ok() && one_cluster {
                let mut back = vec![0u8; len as usize];
                if img.read(&mut back, off).is_ok() {
                    assert!(back == pattern, "a write did not read back");
                }
            }
            let _ = img.write_zeroes(off, len, input.byte() % 2 == 0);
            let _ = img.discard(off, len);
            let _ = img.flush();
        }
        let _ = img.close();
    }
});
