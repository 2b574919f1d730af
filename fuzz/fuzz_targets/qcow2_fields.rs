//! Fuzz target: typed mutations of a valid qcow2 image.
//!
//! Byte-level fuzzing rarely hits the one value of a 64-bit header field
//! that overflows an offset computation. This target builds a small valid
//! qcow2 image with the library (options from the input), writes some
//! data, then sets chosen fields — header fields, the first L1, L2 and
//! refcount table entries, the first header extension's length — to
//! extreme values (0, 1, cluster-size edges, the file length, 2^31, 2^32,
//! 2^61 to 2^64 - 1, values near offsets already in use, or raw input
//! bytes). The result is opened read-only (walked, read, checked) and
//! read-write (written, zeroed, discarded, flushed, checked). Errors are
//! expected; a panic (including an arithmetic overflow: the fuzz build has
//! overflow checks on), a hang or a huge allocation is a bug.

#![no_main]

use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

#[path = "fields.rs"]
mod fields;
use fields::{get, mutate, Input, Order};

/// Where a field lives: (name for the crash report, byte offset, width).
type Field = (&'static str, u64, u8);

/// Fixed header fields of qcow2 (version 3 layout).
const HEADER: &[Field] = &[
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
];

fn be(bytes: &[u8], at: u64, width: u8) -> u64 {
    get(bytes, at, width, Order::Big)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    // A valid image first.
    let cluster_bits = 9 + input.byte() % 8; // 512 B .. 64 KiB
    let mut opts = CreateOptions {
        size: ((input.byte() as u64 % 64) + 1) << 16,
        ..Default::default()
    };
    opts.options
        .insert("cluster_size".into(), (1u64 << cluster_bits).to_string());
    match input.byte() % 4 {
        0 => {
            opts.options.insert("compat".into(), "0.10".into());
        }
        1 if cluster_bits >= 14 => {
            opts.options.insert("extended_l2".into(), "on".into());
        }
        2 => {
            opts.options.insert("refcount_bits".into(), "1".into());
        }
        _ => {}
    }
    let mem = MemStorage::new();
    if registry::find("qcow2")
        .expect("qcow2")
        .create(Arc::new(mem.clone()), None, &opts)
        .is_err()
    {
        return;
    }
    {
        let img = Image::open_storage(Arc::new(mem.clone()), Some("qcow2"), false, None)
            .expect("a new image opens");
        for i in 0..4u64 {
            let _ = img.write(&[0x40 + i as u8; 3000], i * 70_000 % opts.size);
        }
        let _ = img.close();
    }
    let mut bytes = mem.to_vec();
    let cluster = 1u64 << cluster_bits;

    // Where the first entries of the tables are.
    let l1 = be(&bytes, 40, 8);
    let l2 = be(&bytes, l1, 8) & 0x00ff_ffff_ffff_fe00;
    let rt = be(&bytes, 48, 8);
    let mut fields: Vec<Field> = HEADER.to_vec();
    fields.push(("L1 entry 0", l1, 8));
    fields.push(("L2 entry 0", l2, 8));
    fields.push(("L2 entry 1", l2 + 8, 8));
    fields.push(("refcount table entry 0", rt, 8));
    fields.push(("first extension length", 112 + 4, 4));

    // A few typed mutations.
    let count = 1 + input.byte() % 4;
    for _ in 0..count {
        let (_, at, width) = fields[input.byte() as usize % fields.len()];
        if at == 0 {
            continue;
        }
        mutate(&mut input, &mut bytes, (at, width), cluster, Order::Big);
    }

    // Read-only: walk, read, check; nothing may change.
    let ro = MemStorage::from_bytes(&bytes);
    if let Ok(img) = Image::open_storage(Arc::new(ro.clone()), None, true, None) {
        let size = img.size().min(8 << 20);
        let mut pos = 0;
        let mut calls = 0;
        while pos < size && calls < 4096 {
            calls += 1;
            match img.block_status(pos, size - pos) {
                Ok(s) => pos += s.len,
                Err(_) => break,
            }
        }
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < size.min(2 << 20) {
            let n = (size - pos).min(65536) as usize;
            let _ = img.read(&mut buf[..n], pos);
            pos += n as u64;
        }
        let _ = img.check(None);
        let _ = img.info();
        let _ = img.close();
        assert!(ro.to_vec() == bytes, "a read-only open changed the image");
    }

    // Read-write: writes, zeroes, discards and a flush on the damaged
    // image fail cleanly or work.
    let rw = MemStorage::from_bytes(&bytes);
    if let Ok(img) = Image::open_storage(Arc::new(rw), Some("qcow2"), false, None) {
        let size = img.size();
        if size > 0 {
            let off = input.u64() % size;
            let len = (input.byte() as u64 * 512 + 1).min(size - off);
            let _ = img.write(&vec![0x5a; len as usize], off);
            let _ = img.write_zeroes(off, len, input.byte() % 2 == 0);
            let _ = img.discard(off, len);
            let _ = img.flush();
            let _ = img.check(None);
        }
        let _ = img.close();
    }
});
