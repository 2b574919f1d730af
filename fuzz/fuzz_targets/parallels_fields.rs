//! Fuzz target: typed mutations of a valid Parallels image.
//!
//! The input picks the cluster size, version 1 or 2 (version 1 entries
//! count sectors), a virtual size, whether a dirty-bitmap extension is
//! attached, and whether the image is left in use; data is written. Then
//! one to four typed fields are set to extreme values (0, 1, unit edges,
//! the file length, 2^31, 2^32, 2^61 to 2^64 - 1, values near the old
//! one, raw input bytes): every header field and the first BAT entries,
//! and sometimes the file is cut short. The result is opened read-only
//! (walked, read, checked; nothing may change) and read-write (which may
//! repair it first; then written, zeroed, discarded, flushed, checked and
//! repaired). Errors are expected; a panic (including arithmetic
//! overflow: the fuzz build has overflow checks on), a hang or a huge
//! allocation is a bug.

#![no_main]

use imgloop::driver::DriverOpenOptions;
use imgloop::formats::parallels::extension::build_bitmap_extension;
use imgloop::formats::parallels::header::{Header, WireHeader, MAGIC_V1};
use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image, RepairMode};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

#[path = "fields.rs"]
mod fields;
use fields::{exercise_read_only, mutate, Input, Order};

/// Header fields: (offset, width).
const HEADER: &[(u64, u8)] = &[
    (16, 4),
    (20, 4),
    (24, 4),
    (28, 4),
    (32, 4),
    (36, 8),
    (44, 4),
    (48, 4),
    (52, 4),
    (56, 8),
];

fn open(mem: &MemStorage, read_only: bool) -> Option<Image> {
    let mut d = DriverOpenOptions::new(read_only);
    d.options.insert("prealloc-size".into(), "64k".into());
    // Sparse growth: a hostile cluster size may reach 2 GiB, and
    // fallocate of in-memory storage would hold all of it.
    d.options.insert("prealloc-mode".into(), "truncate".into());
    Image::open_storage_with(Arc::new(mem.clone()), Some("parallels"), &d, None).ok()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cluster = 512u64 << (input.byte() % 8);
    let mut opts = CreateOptions {
        size: ((input.byte() as u64 % 32) + 1) * 65536,
        ..Default::default()
    };
    opts.options
        .insert("cluster_size".into(), cluster.to_string());
    let mem = MemStorage::new();
    if registry::find("parallels")
        .expect("parallels")
        .create(Arc::new(mem.clone()), None, &opts)
        .is_err()
    {
        return;
    }
    {
        let img = open(&mem, false).expect("a new image opens");
        for i in 0..3u64 {
            let _ = img.write(&[0x40 + i as u8; 3000], i * 70_000 % opts.size);
        }
        let _ = img.close();
    }
    let mut bytes = mem.to_vec();
    if input.byte() % 4 == 0 {
        // Left in use, as a killed writer leaves it (with a preallocated
        // tail).
        bytes[44..48].copy_from_slice(&0x746f_6e59u32.to_le_bytes());
        bytes.resize(bytes.len() + input.byte() as usize * 512, 0);
    }
    let Some(mut wire) = WireHeader::parse(&bytes) else {
        return;
    };
    if input.byte() % 3 == 0 {
        // Version 1: entries count sectors.
        let tracks = wire.tracks;
        wire.magic = *MAGIC_V1;
        for i in 0..wire.bat_entries as usize {
            let at = 64 + 4 * i;
            let e = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let v = e.wrapping_mul(tracks);
            bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    if input.byte() % 4 == 0 {
        if let Ok(h) = Header::validate(wire) {
            let at = bytes.len() as u64;
            let l1 = [input.byte() as u64 % 3];
            let ext = build_bitmap_extension(&h, [input.byte(); 16], 1 << (input.byte() % 8), &l1);
            bytes.extend_from_slice(&ext);
            wire.ext_off = at / 512;
        }
    }
    bytes[..64].copy_from_slice(&wire.to_bytes());
    let mut fields: Vec<(u64, u8)> = HEADER.to_vec();
    for i in 0..4 {
        fields.push((64 + 4 * i, 4));
    }
    for _ in 0..1 + input.byte() % 4 {
        let f = fields[input.byte() as usize % fields.len()];
        mutate(&mut input, &mut bytes, f, cluster, Order::Little);
    }
    if input.byte() % 16 == 0 {
        let cut = input.u64() % (bytes.len() as u64 + 1);
        bytes.truncate(cut as usize);
    }

    let ro = MemStorage::from_bytes(&bytes);
    if let Some(img) = open(&ro, true) {
        exercise_read_only(&img, 64 << 20, 2 << 20, true);
        assert!(ro.to_vec() == bytes, "a read-only open changed the image");
    }

    let rw = MemStorage::from_bytes(&bytes);
    if let Some(img) = open(&rw, false) {
        let size = img.size();
        if size > 0 {
            let off = input.u64() % size;
            let len = (input.byte() as u64 * 512 + 1).min(size - off).min(1 << 20);
            let pattern = vec![0x5a; len as usize];
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
            let _ = img.check(Some(RepairMode::All));
        }
        let _ = img.close();
    }
});
