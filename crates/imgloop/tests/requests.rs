//! Request semantics of the generic layer on real drivers: parallel reads
//! racing discards and rewrites, FUA, fast zeroing, alignment.

use imgloop::storage::{CrashStorage, MemStorage, Storage};
use imgloop::{registry, CreateOptions, ErrorKind, Image, WriteFlags, ZeroFlags};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn create(format: &str, storage: Arc<dyn Storage>, size: u64, kv: &[(&str, &str)]) {
    let mut opts = CreateOptions {
        size,
        ..Default::default()
    };
    for (k, v) in kv {
        opts.options.insert(k.to_string(), v.to_string());
    }
    registry::find(format)
        .unwrap()
        .create(storage, None, &opts)
        .unwrap();
}

/// Memory whose reads of guest data take a while (as a disk's do), so a
/// request is in flight long after it mapped its range.
#[derive(Debug)]
struct SlowReads(MemStorage);

impl Storage for SlowReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Data-sized reads wait first: the bytes returned are those at
        // the end of a long window after the range was mapped, which is
        // when a freed and reused cluster would show another block.
        if buf.len() == 4096 {
            std::thread::sleep(std::time::Duration::from_micros(300));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.0.zero_range(offset, len, may_unmap)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.allocate(offset, len)
    }
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<(bool, u64)> {
        self.0.extent(offset, max_len)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.0.allocated_size()
    }
    fn describe(&self) -> String {
        "slow memory".into()
    }
}

/// A 4 KiB block that names its guest offset in every 8-byte word.
fn stamp(guest: u64) -> Vec<u8> {
    guest.to_le_bytes().repeat(512)
}

/// Readers never see another guest offset's bytes while other threads
/// discard clusters, flush (which frees them) and rewrite other blocks
/// (which may take the freed clusters).
#[test]
fn a_read_never_returns_bytes_of_another_guest_range_while_clusters_are_freed_and_reused() {
    const BLOCKS: u64 = 32;
    let mem = MemStorage::new();
    create(
        "qcow2",
        Arc::new(mem.clone()),
        BLOCKS * 4096,
        &[("cluster_size", "4k")],
    );
    let img = Image::open_storage(Arc::new(SlowReads(mem)), Some("qcow2"), false, None).unwrap();
    for b in 0..BLOCKS {
        img.write(&stamp(b * 4096), b * 4096).unwrap();
    }
    img.flush().unwrap();
    let done = AtomicBool::new(false);
    let bad = AtomicBool::new(false);
    std::thread::scope(|s| {
        for r in 0..4u64 {
            let (img, done, bad) = (&img, &done, &bad);
            s.spawn(move || {
                let mut rng = imgloop::testkit::Rng::new(100 + r);
                let mut buf = vec![0u8; 4096];
                let mut reads = 0;
                while !done.load(Ordering::Relaxed) || reads < 50 {
                    let b = rng.below(BLOCKS);
                    img.read(&mut buf, b * 4096).unwrap();
                    for w in buf.chunks_exact(8) {
                        let v = u64::from_le_bytes(w.try_into().unwrap());
                        // Discarded blocks read as zeroes; anything else
                        // must be this block's own stamp.
                        if v != 0 && v != b * 4096 {
                            bad.store(true, Ordering::Relaxed);
                        }
                    }
                    reads += 1;
                }
            });
        }
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let img = &img;
                s.spawn(move || {
                    let mut rng = imgloop::testkit::Rng::new(7 + w);
                    for _ in 0..200 {
                        // Each writer owns half of the blocks. Two are
                        // discarded and freed, then written back in the
                        // other order, so each takes the other's cluster
                        // while readers may still be reading the old one.
                        let a = rng.below(BLOCKS / 2) * 2 + w;
                        let b = (a + 2 + 2 * rng.below(3)) % BLOCKS;
                        img.discard(a * 4096, 4096).unwrap();
                        img.discard(b * 4096, 4096).unwrap();
                        img.flush().unwrap();
                        img.write(&stamp(b * 4096), b * 4096).unwrap();
                        img.write(&stamp(a * 4096), a * 4096).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(
        !bad.load(Ordering::Relaxed),
        "a read returned the stamp of another guest offset"
    );
    assert_eq!(img.state().requests().in_flight(), 0);
    // With nothing in flight, everything freed is reusable: no leaks.
    img.flush().unwrap();
    let report = img.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
}

/// A FUA write is durable when it returns: a power cut right after it
/// keeps it. Without FUA (and without a flush) it may be lost.
#[test]
fn a_fua_write_survives_a_power_cut_and_a_plain_one_may_not() {
    for format in ["raw", "qcow2"] {
        let disk = CrashStorage::new();
        create(format, Arc::new(disk.clone()), 1 << 20, &[]);
        disk.sync().unwrap();
        let img = Image::open_storage(Arc::new(disk.clone()), Some(format), false, None).unwrap();
        img.write(&[0x11; 4096], 0).unwrap();
        img.write_with(&[0x22; 4096], 65536, WriteFlags { fua: true })
            .unwrap();
        let after = disk.crash();
        let back = Image::open_storage(Arc::new(after), Some(format), true, None).unwrap();
        let mut b = vec![0u8; 4096];
        back.read(&mut b, 65536).unwrap();
        assert_eq!(b, vec![0x22; 4096], "{format}: the FUA write was lost");
        // The plain write before it was made durable by the same sync
        // (FUA syncs the image); the point of the next case is one
        // written after.
        img.write(&[0x33; 4096], 8192).unwrap();
        let after = disk.crash();
        let back = Image::open_storage(Arc::new(after), Some(format), true, None).unwrap();
        back.read(&mut b, 8192).unwrap();
        assert_ne!(
            b,
            vec![0x33; 4096],
            "{format}: nothing was synced, yet it survived"
        );
        // A rewrite in place with FUA syncs the data too.
        img.write_with(&[0x44; 4096], 65536, WriteFlags { fua: true })
            .unwrap();
        let back = Image::open_storage(Arc::new(disk.crash()), Some(format), true, None).unwrap();
        back.read(&mut b, 65536).unwrap();
        assert_eq!(
            b,
            vec![0x44; 4096],
            "{format}: the in-place FUA write was lost"
        );
    }
}

/// Fast zeroing fails with a distinct error where the format would have
/// to write zero buffers, and changes nothing then; where metadata or
/// the host can zero, it works.
#[test]
fn fast_zero_fails_distinctly_instead_of_writing_buffers() {
    let fast = ZeroFlags {
        no_fallback: true,
        ..Default::default()
    };
    // qcow2 version 2 over a backing image: no zero flag, so only zero
    // buffers would do.
    let base = MemStorage::new();
    create("raw", Arc::new(base.clone()), 1 << 20, &[]);
    base.write_at(&[0x5a; 1 << 20], 0).unwrap();
    let backing = Arc::new(Image::open_storage(Arc::new(base), Some("raw"), true, None).unwrap());
    let top = MemStorage::new();
    let opts = CreateOptions {
        size: 1 << 20,
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        options: [("compat".to_string(), "0.10".to_string())].into(),
        ..Default::default()
    };
    registry::find("qcow2")
        .unwrap()
        .create(Arc::new(top.clone()), None, &opts)
        .unwrap();
    let img =
        Image::open_storage(Arc::new(top.clone()), Some("qcow2"), false, Some(backing)).unwrap();
    let before = top.to_vec();
    let e = img.write_zeroes_with(0, 65536, fast).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoFastZero, "{e}");
    assert_eq!(top.to_vec(), before, "a refused fast zero wrote something");
    let mut b = vec![0u8; 16];
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, vec![0x5a; 16]);
    // The same request without the flag writes zero buffers.
    img.write_zeroes(0, 65536, false).unwrap();
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, vec![0; 16]);

    // qcow2 version 3 and raw zero whole clusters cheaply; qcow2's
    // partial clusters need buffers.
    for format in ["qcow2", "raw"] {
        let mem = MemStorage::new();
        create(format, Arc::new(mem.clone()), 1 << 20, &[]);
        let img = Image::open_storage(Arc::new(mem), Some(format), false, None).unwrap();
        img.write(&[7; 1 << 17], 0).unwrap();
        img.write_zeroes_with(0, 65536, fast).unwrap();
        img.read(&mut b, 0).unwrap();
        assert_eq!(b, vec![0; 16], "{format}");
        let partial = img.write_zeroes_with(65536, 100, fast);
        if format == "qcow2" {
            assert_eq!(partial.unwrap_err().kind(), ErrorKind::NoFastZero);
        } else {
            partial.unwrap();
        }
    }
}

/// A discard or zeroing with FUA set is durable on return too.
#[test]
fn fua_write_zeroes_survive_a_power_cut() {
    let disk = CrashStorage::new();
    create("qcow2", Arc::new(disk.clone()), 1 << 20, &[]);
    let img = Image::open_storage(Arc::new(disk.clone()), Some("qcow2"), false, None).unwrap();
    img.write(&[9; 65536], 0).unwrap();
    img.flush().unwrap();
    img.sync().unwrap();
    img.write_zeroes_with(
        0,
        65536,
        ZeroFlags {
            fua: true,
            ..Default::default()
        },
    )
    .unwrap();
    let back = Image::open_storage(Arc::new(disk.crash()), Some("qcow2"), true, None).unwrap();
    let mut b = vec![1u8; 65536];
    back.read(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
