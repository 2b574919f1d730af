//! Tests of recorded dirty bitmaps: writes land in enabled bitmaps only,
//! the bits survive close and reopen, and no state a power cut can leave
//! has a bitmap that claims to be valid yet misses a write.

use super::testutil::{mem_image, reopen};
use crate::driver::BitmapOp;
use crate::storage::{CrashStorage, Storage};
use crate::{DirtyBitmap, Image};
use std::sync::Arc;

fn add(img: &Image, name: &str, granularity: u64, enabled: bool) {
    img.bitmap(&BitmapOp::Add {
        name: name.into(),
        granularity: Some(granularity),
        enabled,
    })
    .unwrap();
}

fn ranges(b: &DirtyBitmap) -> Vec<(u64, u64)> {
    b.dirty_ranges()
}

#[test]
fn writes_zeroes_and_discards_are_recorded_in_enabled_bitmaps_and_kept_at_close() {
    let (mem, img) = mem_image(4 << 20, &[("cluster_size", "4096")]);
    add(&img, "live", 65536, true);
    add(&img, "frozen", 512, false);
    img.write(&[1u8; 100], 70_000).unwrap();
    img.write_zeroes(1 << 20, 4096, false).unwrap();
    img.discard(2 << 20, 131072).unwrap();
    let want = vec![(65536, 65536), (1 << 20, 65536), (2 << 20, 131072)];
    // Read from memory while recording...
    assert_eq!(ranges(&img.bitmap_read("live").unwrap()), want);
    assert!(img.bitmap_read("frozen").unwrap().is_clean());
    img.close().unwrap();
    drop(img);
    // ...and from the image after close.
    let img = reopen(&mem);
    assert_eq!(ranges(&img.bitmap_read("live").unwrap()), want);
    assert!(img.bitmap_read("frozen").unwrap().is_clean());
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    // A second session adds to the bits; a merge sets the frozen ones.
    img.write(&[2u8; 512], 0).unwrap();
    let live = img.bitmap_read("live").unwrap();
    img.bitmap(&BitmapOp::Merge {
        target: "frozen".into(),
        source: live,
    })
    .unwrap();
    img.close().unwrap();
    drop(img);
    let img = reopen(&mem);
    let mut want2 = vec![(0, 65536 * 2)];
    want2.extend_from_slice(&want[1..]);
    assert_eq!(ranges(&img.bitmap_read("live").unwrap()), want2);
    assert_eq!(ranges(&img.bitmap_read("frozen").unwrap()), want2);
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn an_open_that_changes_nothing_leaves_the_bitmaps_untouched() {
    let (mem, img) = mem_image(1 << 20, &[]);
    add(&img, "live", 65536, true);
    img.close().unwrap();
    drop(img);
    let before = mem.to_vec();
    let img = reopen(&mem);
    let mut b = vec![0u8; 4096];
    img.read(&mut b, 0).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    assert!(mem.to_vec() == before);
}

/// Every state a power cut can leave while writes are recorded: it opens
/// without corruption, and a bitmap that is not marked in use either is
/// the clean one from before with the disk unchanged, or holds every
/// write.
#[test]
fn a_power_cut_while_recording_never_leaves_a_valid_bitmap_missing_a_write() {
    let (mem, img) = mem_image(1 << 20, &[("cluster_size", "512")]);
    add(&img, "live", 4096, true);
    img.close().unwrap();
    drop(img);
    let crash = CrashStorage::from_bytes(&mem.to_vec());
    crash.sync().unwrap();
    let img = Image::open_storage(Arc::new(crash.clone()), Some("qcow2"), false, None).unwrap();
    crash.start_capture();
    let writes = [(8192u64, 1000usize), (300_000, 5000), (900_000, 512)];
    for (i, &(off, len)) in writes.iter().enumerate() {
        img.write(&vec![i as u8 + 1; len], off).unwrap();
        if i == 1 {
            img.flush().unwrap();
        }
    }
    img.close().unwrap();
    let states = crash.take_captured();
    assert!(states.len() > 5, "only {} states", states.len());
    let mut valid_after = 0;
    for (i, s) in states.into_iter().enumerate() {
        let cut = Image::open_storage(Arc::new(s), Some("qcow2"), true, None)
            .unwrap_or_else(|e| panic!("state {i} does not open: {e}"));
        let r = cut.check(None).unwrap();
        assert_eq!(r.corruptions, 0, "state {i}: {:?}", r.messages);
        let mut disk = vec![0u8; 1 << 20];
        cut.read(&mut disk, 0).unwrap();
        match cut.bitmap_read("live") {
            Err(e) => assert!(e.to_string().contains("inconsistent"), "state {i}: {e}"),
            Ok(bits) if bits.is_clean() => {
                assert!(
                    disk.iter().all(|&b| b == 0),
                    "state {i}: a clean bitmap misses writes"
                )
            }
            Ok(bits) => {
                for &(off, len) in &writes {
                    let (dirty, n) = bits.status(off, len as u64);
                    assert!(
                        dirty && n == len as u64,
                        "state {i}: write at {off} missing"
                    );
                }
                valid_after += 1;
            }
        }
    }
    assert!(valid_after > 0, "no state had the stored bitmap");
}

/// Every state a power cut can leave during bitmap operations (merge,
/// clear, remove, add) opens without corruption, and each bitmap is in a
/// state of the sequence: before or after each operation, never a mix.
#[test]
fn a_power_cut_during_bitmap_operations_leaves_each_bitmap_before_or_after() {
    let (mem, img) = mem_image(1 << 20, &[("cluster_size", "512")]);
    add(&img, "a", 4096, true);
    add(&img, "b", 4096, false);
    img.write(&[7u8; 3000], 20_000).unwrap();
    img.write(&[8u8; 512], 700_000).unwrap();
    img.close().unwrap();
    drop(img);
    let crash = CrashStorage::from_bytes(&mem.to_vec());
    crash.sync().unwrap();
    let img = Image::open_storage(Arc::new(crash.clone()), Some("qcow2"), false, None).unwrap();
    let a_bits = ranges(&img.bitmap_read("a").unwrap());
    assert_eq!(a_bits.len(), 2);
    crash.start_capture();
    let a = img.bitmap_read("a").unwrap();
    img.bitmap(&BitmapOp::Merge {
        target: "b".into(),
        source: a,
    })
    .unwrap();
    img.bitmap(&BitmapOp::Clear("a".into())).unwrap();
    img.bitmap(&BitmapOp::Remove("a".into())).unwrap();
    add(&img, "c", 65536, true);
    img.close().unwrap();
    let states = crash.take_captured();
    assert!(states.len() > 5, "only {} states", states.len());
    let (mut merged, mut removed, mut added) = (0, 0, 0);
    for (i, s) in states.into_iter().enumerate() {
        let cut = Image::open_storage(Arc::new(s), Some("qcow2"), true, None)
            .unwrap_or_else(|e| panic!("state {i} does not open: {e}"));
        let r = cut.check(None).unwrap();
        assert_eq!(r.corruptions, 0, "state {i}: {:?}", r.messages);
        let bits = |name: &str| cut.bitmap_read(name).map(|b| ranges(&b));
        // b: clean, or holding a's bits.
        match bits("b") {
            Ok(b) if b.is_empty() => {}
            Ok(b) => {
                assert_eq!(b, a_bits, "state {i}: b half merged");
                merged += 1;
            }
            Err(e) => panic!("state {i}: b unreadable: {e}"),
        }
        // a: its bits, clean, or gone.
        match bits("a") {
            Ok(b) => assert!(b.is_empty() || b == a_bits, "state {i}: a half cleared"),
            Err(e) if e.to_string().contains("not found") => removed += 1,
            Err(e) => panic!("state {i}: a unreadable: {e}"),
        }
        // c: absent or clean.
        match bits("c") {
            Ok(b) => {
                assert!(b.is_empty(), "state {i}: a new bitmap with bits");
                added += 1;
            }
            Err(e) => assert!(e.to_string().contains("not found"), "state {i}: {e}"),
        }
    }
    assert!(
        merged > 0 && removed > 0 && added > 0,
        "{merged} {removed} {added}"
    );
}

#[test]
fn switching_to_read_only_stores_the_recorded_bitmaps() {
    let (mem, img) = mem_image(1 << 20, &[]);
    add(&img, "live", 65536, true);
    img.write(&[3u8; 512], 200_000).unwrap();
    img.reopen(true).unwrap();
    // Stored now: another open sees the bits and a consistent bitmap.
    let other = Image::open_storage(Arc::new(mem.clone()), Some("qcow2"), true, None).unwrap();
    assert_eq!(
        ranges(&other.bitmap_read("live").unwrap()),
        [(196_608, 65536)]
    );
    drop(other);
    // Writable again: recording starts over and close stores it.
    img.reopen(false).unwrap();
    img.write(&[4u8; 512], 900_000).unwrap();
    img.close().unwrap();
    drop(img);
    let img = reopen(&mem);
    assert_eq!(
        ranges(&img.bitmap_read("live").unwrap()),
        [(196_608, 65536), (851_968, 65536)]
    );
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}
