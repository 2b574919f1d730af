//! Fuzz target: the input is an image file.
//!
//! The bytes are put in memory, the format is probed and the image opened
//! read-only. When it opens, the whole (capped) disk is walked by block
//! status, read in 64 KiB pieces, and checked. Any error is an acceptable
//! answer to a broken image; a panic, a hang or a huge allocation is a bug.

#![no_main]

use imgloop::storage::MemStorage;
use imgloop::Image;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// Only this much of the virtual disk is walked and read, whatever size the
/// header claims.
const MAX_VIRTUAL: u64 = 64 << 20;
/// Bytes of data read at most.
const MAX_READ: u64 = 16 << 20;
/// Size of one read.
const PIECE: usize = 64 << 10;
/// Upper bound on block-status calls (each advances by at least one byte,
/// so this only matters for pathological extent lists).
const MAX_STATUS_CALLS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mem = MemStorage::from_bytes(data);
    let img = match Image::open_storage(Arc::new(mem), None, true, None) {
        Ok(img) => img,
        Err(_) => return,
    };
    let size = img.size();
    let walk_end = size.min(MAX_VIRTUAL);

    // Block status over the whole (capped) disk.
    let mut pos = 0u64;
    let mut calls = 0usize;
    while pos < walk_end && calls < MAX_STATUS_CALLS {
        calls += 1;
        match img.block_status(pos, walk_end - pos) {
            Ok(st) => {
                assert!(
                    st.len > 0 && st.len <= walk_end - pos,
                    "block status length {} out of range at {pos} (max {})",
                    st.len,
                    walk_end - pos
                );
                pos += st.len;
            }
            Err(_) => break,
        }
    }
    if walk_end > 0 {
        let _ = img.block_status_chain(0, walk_end);
    }

    // Data, in 64 KiB pieces.
    let read_end = walk_end.min(MAX_READ);
    let mut buf = vec![0u8; PIECE];
    let mut pos = 0u64;
    while pos < read_end {
        let n = (read_end - pos).min(PIECE as u64) as usize;
        // A failing piece does not stop the walk: later pieces may be fine.
        let _ = img.read(&mut buf[..n], pos);
        pos += n as u64;
    }

    // Requests outside the disk must fail cleanly.
    assert!(
        img.read(&mut buf[..1], size).is_err(),
        "read past the end succeeded"
    );
    assert!(
        img.read(&mut buf[..2], u64::MAX - 1).is_err(),
        "read at u64::MAX succeeded"
    );
    assert!(
        img.block_status(size, 1).is_err(),
        "block status past the end succeeded"
    );

    // Writes to a read-only image must be refused.
    if size > 0 {
        assert!(
            img.write(&[0u8], 0).is_err(),
            "write to a read-only image succeeded"
        );
    }

    let _ = img.check(None);
    let _ = img.info();
    let _ = img.close();
});
