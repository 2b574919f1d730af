//! Fuzz target: typed mutations of a valid qcow2 image.
//!
//! Byte-level fuzzing rarely hits the one value of a 64-bit header field
//! that overflows an offset computation. This target builds a small valid
//! qcow2 image with the library (options from the input), writes some
//! data (with persistent bitmaps for some inputs, so writes are recorded
//! in them), then sets chosen fields — header fields, the first L1, L2
//! and refcount table entries, the first header extension's length, the
//! bitmap extension, the first bitmap directory entry and its first
//! bitmap table entry — to
//! extreme values (0, 1, cluster-size edges, the file length, 2^31, 2^32,
//! 2^61 to 2^64 - 1, values near offsets already in use, or raw input
//! bytes). The result is opened read-only (walked, read, bitmaps read,
//! checked) and read-write (written, zeroed, discarded, bitmaps merged,
//! cleared, added and removed, flushed, checked). Errors are
//! expected; a panic (including an arithmetic overflow: the fuzz build has
//! overflow checks on), a hang or a huge allocation is a bug.

#![no_main]

use imgloop::driver::BitmapOp;
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

/// Type of the bitmaps header extension.
const BITMAPS_EXTENSION: u64 = 0x2385_2875;

/// Offset of the bitmaps header extension (its type field), if any.
fn bitmaps_extension(bytes: &[u8]) -> Option<u64> {
    if be(bytes, 4, 4) < 3 {
        return None;
    }
    let mut pos = be(bytes, 100, 4);
    for _ in 0..16 {
        let (kind, len) = (be(bytes, pos, 4), be(bytes, pos + 4, 4));
        match kind {
            0 => return None,
            BITMAPS_EXTENSION => return Some(pos),
            _ => pos += 8 + len.div_ceil(8) * 8,
        }
    }
    None
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
    let v3 = !opts.options.contains_key("compat");
    let bitmaps = if v3 { input.byte() % 3 } else { 0 };
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
        for b in 0..bitmaps {
            let _ = img.bitmap(&BitmapOp::Add {
                name: format!("b{b}"),
                granularity: Some(cluster_bits_granularity(cluster_bits, b)),
                enabled: b == 0,
            });
        }
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
    if let Some(ext) = bitmaps_extension(&bytes) {
        fields.push(("bitmaps: nb_bitmaps", ext + 8, 4));
        fields.push(("bitmaps: directory size", ext + 16, 8));
        fields.push(("bitmaps: directory offset", ext + 24, 8));
        let dir = be(&bytes, ext + 24, 8);
        fields.push(("bitmap 0: table offset", dir, 8));
        fields.push(("bitmap 0: table size", dir + 8, 4));
        fields.push(("bitmap 0: flags", dir + 12, 4));
        fields.push(("bitmap 0: type", dir + 16, 1));
        fields.push(("bitmap 0: granularity bits", dir + 17, 1));
        fields.push(("bitmap 0: name size", dir + 18, 2));
        fields.push(("bitmap 0: extra data size", dir + 20, 4));
        let table = be(&bytes, dir, 8);
        fields.push(("bitmap 0: table entry 0", table, 8));
    }

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
        for name in ["b0", "b1"] {
            let _ = img.bitmap_read(name);
            let _ = img.bitmap_status(name, 0, size);
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
            if let Ok(bits) = img.bitmap_read("b0") {
                let _ = img.bitmap(&BitmapOp::Merge {
                    target: "b1".into(),
                    source: bits,
                });
            }
            match input.byte() % 4 {
                0 => {
                    let _ = img.bitmap(&BitmapOp::Clear("b0".into()));
                }
                1 => {
                    let _ = img.bitmap(&BitmapOp::Remove("b1".into()));
                }
                2 => {
                    let _ = img.bitmap(&BitmapOp::Add {
                        name: "new".into(),
                        granularity: None,
                        enabled: true,
                    });
                }
                _ => {}
            }
            let _ = img.write(&[0x77; 512], off);
            let _ = img.flush();
            let _ = img.check(None);
        }
        let _ = img.close();
    }
});

/// The granularity of bitmap `b`: the cluster size, or a larger power of
/// two for the second one.
fn cluster_bits_granularity(cluster_bits: u8, b: u8) -> u64 {
    1u64 << (cluster_bits as u32 + 2 * b as u32).min(20)
}
