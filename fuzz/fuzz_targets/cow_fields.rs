//! Fuzz target: typed mutations of a valid UML COW file, in each header
//! layout (v1 little- and big-endian, UML's v2, old QEMU's v2, v3 and
//! the padded v3).
//!
//! The input picks the layout, the disk size and which sectors are
//! stored, then sets header fields (version, mtime, size, sector size,
//! alignment, format word) to extreme values. The result is opened over
//! an in-memory backing file, read-only (walked, read; nothing may
//! change) and read-write (written, zeroed, discarded, flushed, read
//! again). Errors are expected; a panic (including arithmetic overflow:
//! the fuzz build has overflow checks on), a hang or a huge allocation is
//! a bug.

#![no_main]

use imgloop::storage::MemStorage;
use imgloop::Image;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

#[path = "fields.rs"]
mod fields;
use fields::{exercise_read_only, mutate, put, Input, Order};

/// A layout: byte order, header length, where the path, mtime, size and
/// sector size live, and the other fields worth mutating.
struct Layout {
    order: Order,
    version: u32,
    header: usize,
    path: usize,
    mtime: u64,
    size: u64,
    sector: u64,
    more: &'static [(u64, u8)],
}

const LAYOUTS: &[Layout] = &[
    Layout {
        order: Order::Little,
        version: 1,
        header: 280,
        path: 8,
        mtime: 264,
        size: 268,
        sector: 276,
        more: &[],
    },
    Layout {
        order: Order::Big,
        version: 1,
        header: 280,
        path: 8,
        mtime: 264,
        size: 268,
        sector: 276,
        more: &[],
    },
    Layout {
        order: Order::Big,
        version: 2,
        header: 4120,
        path: 8,
        mtime: 4104,
        size: 4108,
        sector: 4116,
        more: &[],
    },
    Layout {
        order: Order::Big,
        version: 2,
        header: 1056,
        path: 8,
        mtime: 1032,
        size: 1040,
        sector: 1048,
        more: &[],
    },
    // v3: alignment at 24, format at 28.
    Layout {
        order: Order::Big,
        version: 3,
        header: 4128,
        path: 32,
        mtime: 8,
        size: 12,
        sector: 20,
        more: &[(24, 4), (28, 4)],
    },
    // v3 with the 64-bit padding: everything after mtime 4 bytes later.
    Layout {
        order: Order::Big,
        version: 3,
        header: 4136,
        path: 36,
        mtime: 8,
        size: 16,
        sector: 24,
        more: &[(28, 4), (32, 4), (12, 4)],
    },
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let layout = &LAYOUTS[input.byte() as usize % LAYOUTS.len()];
    let size = (input.byte() as u64 % 64 + 1) * 4096 - (input.byte() as u64 % 2) * 300;
    let sectors = size.div_ceil(512);

    // A valid file: header, bitmap with some bits set, data.
    let mut bytes = vec![0u8; layout.header];
    put(&mut bytes, 0, 4, 0x4f4f_4f4d, layout.order);
    put(&mut bytes, 4, 4, layout.version as u64, layout.order);
    bytes[layout.path..layout.path + 8].copy_from_slice(b"/backing");
    put(&mut bytes, layout.mtime, 4, 12345, layout.order);
    put(&mut bytes, layout.size, 8, size, layout.order);
    put(&mut bytes, layout.sector, 4, 512, layout.order);
    let v3 = layout.version == 3;
    if v3 {
        put(&mut bytes, layout.sector + 4, 4, 512, layout.order);
    }
    let bitmap_at = if v3 {
        layout.header.next_multiple_of(512)
    } else {
        layout.header
    };
    let bitmap_len = sectors.div_ceil(8) as usize;
    let data_at = (bitmap_at + bitmap_len).next_multiple_of(512);
    bytes.resize(data_at + size as usize, 0);
    for _ in 0..input.byte() % 8 {
        let s = (input.u64() % sectors) as usize;
        bytes[bitmap_at + s / 8] |= 1 << (s % 8);
        let end = (data_at + s * 512 + 512).min(bytes.len());
        bytes[data_at + s * 512..end].fill(0xa5);
    }

    // Typed mutations of the header fields.
    let mut fields: Vec<(u64, u8)> = vec![
        (4, 4),
        (layout.mtime, 4),
        (layout.size, 8),
        (layout.sector, 4),
    ];
    fields.extend_from_slice(layout.more);
    for _ in 0..1 + input.byte() % 3 {
        let f = fields[input.byte() as usize % fields.len()];
        mutate(&mut input, &mut bytes, f, 512, layout.order);
    }
    if input.byte() % 8 == 0 {
        // A short file.
        let keep = (input.u64() % bytes.len() as u64) as usize;
        bytes.truncate(keep);
    }

    let backing = || {
        let mut b = vec![0u8; size as usize];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 7 + 3) as u8;
        }
        Image::open_storage(
            Arc::new(MemStorage::from_bytes(&b)),
            Some("raw"),
            true,
            None,
        )
        .map(Arc::new)
        .ok()
    };

    // Read-only: walk, read; nothing may change.
    let ro = MemStorage::from_bytes(&bytes);
    if let Ok(img) = Image::open_storage(Arc::new(ro.clone()), Some("cow"), true, backing()) {
        exercise_read_only(&img, 8 << 20, 2 << 20, false);
        assert!(ro.to_vec() == bytes, "a read-only open changed the file");
    }

    // Read-write: writes, zeroes, discards and a flush work or fail
    // cleanly, and what was written reads back.
    let rw = MemStorage::from_bytes(&bytes);
    if let Ok(img) = Image::open_storage(Arc::new(rw), Some("cow"), false, backing()) {
        let size = img.size();
        if size > 0 {
            let off = input.u64() % size;
            let len = (input.byte() as u64 * 512 + 1).min(size - off).min(1 << 20);
            let pattern = vec![0x5a; len as usize];
            if img.write(&pattern, off).is_ok() {
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
