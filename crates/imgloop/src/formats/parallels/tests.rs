//! Tests of the Parallels driver through the generic layer.

use super::extension::build_bitmap_extension;
use super::header::{Header, WireHeader, IN_USE, MAGIC_V1};
use crate::driver::{CreateOptions, DriverOpenOptions, FormatSpecific, Mapping, RepairMode};
use crate::storage::{MemStorage, Storage};
use crate::testkit::{run_model_test_with, run_power_cut_test, PowerCut};
use crate::{ErrorKind, Image};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn opts(size: u64, kv: &[(&str, &str)]) -> CreateOptions {
    let mut o = CreateOptions {
        size,
        ..Default::default()
    };
    for (k, v) in kv {
        o.options.insert(k.to_string(), v.to_string());
    }
    o
}

fn new_image(o: &CreateOptions) -> MemStorage {
    let mem = MemStorage::new();
    crate::registry::find("parallels")
        .unwrap()
        .create(Arc::new(mem.clone()), None, o)
        .unwrap();
    mem
}

fn open_with(mem: &MemStorage, read_only: bool, kv: &[(&str, &str)]) -> crate::Result<Image> {
    let mut d = DriverOpenOptions::new(read_only);
    for (k, v) in kv {
        d.options.insert(k.to_string(), v.to_string());
    }
    Image::open_storage_with(Arc::new(mem.clone()), Some("parallels"), &d, None)
}

fn open(mem: &MemStorage, read_only: bool) -> crate::Result<Image> {
    open_with(mem, read_only, &[("prealloc-size", "0")])
}

fn wire(mem: &MemStorage) -> WireHeader {
    WireHeader::parse(&mem.to_vec()).unwrap()
}

#[test]
fn a_new_image_is_laid_out_as_qemu_img_lays_it_out() {
    let mem = new_image(&opts(64 * MIB, &[]));
    let w = wire(&mem);
    assert_eq!(
        (
            w.heads,
            w.cylinders,
            w.tracks,
            w.bat_entries,
            w.nb_sectors,
            w.data_off
        ),
        (16, 256, 2048, 64, 131072, 2048)
    );
    assert_eq!(mem.len().unwrap(), MIB);
    // 4 KiB clusters: data at 68 KiB; odd sizes round up to a sector.
    let mem = new_image(&opts(1_000_000, &[("cluster_size", "4k")]));
    let w = wire(&mem);
    assert_eq!((w.tracks, w.bat_entries, w.nb_sectors), (8, 245, 1954));
    assert_eq!(w.data_off, 8);
    let img = open(&mem, true).unwrap();
    assert_eq!(img.size(), 1954 * 512);
    let s = img.block_status(0, img.size()).unwrap();
    assert!(!s.allocated && !s.data && s.len == img.size(), "{s:?}");
}

#[test]
fn writes_allocate_clusters_at_the_data_end_and_a_clean_close_trims_the_file() {
    let mem = new_image(&opts(64 * MIB, &[]));
    let img = open_with(&mem, false, &[]).unwrap();
    img.write(&[7u8; 4096], 10 * MIB + 512).unwrap();
    // The in-use marker is on disk before the data.
    assert_eq!(wire(&mem).inuse, IN_USE);
    // Preallocated: 128 MiB past the new cluster.
    assert_eq!(mem.len().unwrap(), 2 * MIB + (128 << 20));
    img.write(&[8u8; 4096], 0).unwrap();
    let (m, len) = img.driver().map(10 * MIB, MIB).unwrap();
    assert_eq!(
        (m, len),
        (
            Mapping::Data {
                storage: crate::StorageId::IMAGE,
                offset: MIB
            },
            MIB
        )
    );
    img.close().unwrap();
    let w = wire(&mem);
    assert_eq!(w.inuse, 0);
    assert_eq!(mem.len().unwrap(), 3 * MIB);
    let bytes = mem.to_vec();
    // Entries count clusters in version 2.
    assert_eq!(&bytes[64 + 40..64 + 44], &1u32.to_le_bytes());
    assert_eq!(&bytes[64..68], &2u32.to_le_bytes());
    let img = open(&mem, true).unwrap();
    let mut b = vec![0u8; 5000];
    img.read(&mut b, 10 * MIB).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0) && b[512..4608].iter().all(|&x| x == 7));
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    assert_eq!(r.allocated_clusters, Some(2));
}

#[test]
fn random_operations_match_the_model() {
    type Options = &'static [(&'static str, &'static str)];
    let cases: [(u64, Options, Options); 3] = [
        (24 * MIB, &[], &[("prealloc-size", "1M")]),
        (
            6 * MIB,
            &[("cluster_size", "64k")],
            &[("prealloc-mode", "truncate"), ("prealloc-size", "0")],
        ),
        (3 * MIB + 512, &[("cluster_size", "4k")], &[]),
    ];
    for (i, (size, kv, driver)) in cases.iter().enumerate() {
        for seed in 0..2 {
            run_model_test_with(
                "parallels",
                &opts(*size, kv),
                driver,
                seed + 10 * i as u64,
                250,
            )
            .unwrap();
        }
    }
}

#[test]
fn synced_writes_survive_power_cuts_at_every_point_of_the_write_stream() {
    for (create, prefixes) in [
        (opts(4 * MIB, &[("cluster_size", "64k")]), true),
        (opts(4 * MIB, &[("cluster_size", "256k")]), false),
    ] {
        let t = PowerCut {
            format: "parallels",
            create,
            driver_options: vec![("prealloc-size".into(), "128k".into())],
            ops: if prefixes { 40 } else { 80 },
            states: 4,
            backing: None,
            backing_format: "raw",
            prefixes,
        };
        for seed in 0..2 {
            run_power_cut_test(&t, seed).unwrap();
        }
    }
}

/// A version-1 image laid out by hand as Parallels wrote them: entries
/// in sectors, `data_off` 0 (data right after the BAT), 32 KiB clusters.
fn version1_image() -> MemStorage {
    let w = WireHeader {
        magic: *MAGIC_V1,
        version: 2,
        heads: 16,
        cylinders: 8,
        tracks: 64,
        bat_entries: 128,
        nb_sectors: 8192,
        inuse: 0,
        data_off: 0,
        flags: 0,
        ext_off: 0,
    };
    let mem = MemStorage::new();
    mem.write_at(&w.to_bytes(), 0).unwrap();
    // Clusters at sectors 64 and 128 (the BAT ends inside sector 1).
    mem.write_at(&64u32.to_le_bytes(), 64 + 4 * 3).unwrap();
    mem.write_at(&128u32.to_le_bytes(), 64 + 4 * 100).unwrap();
    mem.write_at(&[0x33; 32768], 64 * 512).unwrap();
    mem.write_at(&[0x44; 32768], 128 * 512).unwrap();
    mem
}

#[test]
fn version_1_images_count_entries_in_sectors_and_take_writes() {
    let mem = version1_image();
    let img = open(&mem, true).unwrap();
    assert_eq!(img.size(), 4 * MIB);
    let mut b = vec![0u8; 32768];
    img.read(&mut b, 3 * 32768).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    img.read(&mut b, 100 * 32768).unwrap();
    assert!(b.iter().all(|&x| x == 0x44));
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(img);
    let img = open(&mem, false).unwrap();
    img.write(&[0x55; 1000], 5 * 32768 + 10).unwrap();
    img.close().unwrap();
    // The new cluster went after the last one, at sector 192.
    assert_eq!(&mem.to_vec()[64 + 20..64 + 24], &192u32.to_le_bytes());
    let img = open(&mem, true).unwrap();
    img.read(&mut b[..1000], 5 * 32768 + 10).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0x55));
}

#[test]
fn an_image_left_in_use_reads_read_only_and_is_repaired_by_a_read_write_open() {
    let mem = new_image(&opts(8 * MIB, &[]));
    {
        let img = open_with(&mem, false, &[]).unwrap();
        img.write(&[9u8; 4096], 0).unwrap();
        img.flush().unwrap();
        // No close: as a killed writer leaves it (128 MiB preallocated).
        std::mem::forget(img);
    }
    let before = mem.to_vec();
    assert_eq!(wire(&mem).inuse, IN_USE);
    let img = open(&mem, true).unwrap();
    let mut b = [0u8; 4096];
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, [9u8; 4096]);
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (1, 128), "{:?}", r.messages);
    assert!(r.messages[0].contains("not closed correctly"));
    drop(img);
    assert!(mem.to_vec() == before, "a read-only open changed the image");
    let img = open(&mem, false).unwrap();
    let warned: Vec<String> = img
        .driver()
        .warnings()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        warned
            .iter()
            .any(|w| w.contains("Repairing image was not closed correctly")),
        "{warned:?}"
    );
    assert_eq!(mem.len().unwrap(), 2 * MIB);
    img.close().unwrap();
    let img = open(&mem, true).unwrap();
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn check_finds_and_repairs_what_qemu_img_does() {
    let mem = new_image(&opts(8 * MIB, &[]));
    {
        let img = open(&mem, false).unwrap();
        for c in 0..4u64 {
            img.write(&[c as u8 + 1; 4096], c * MIB).unwrap();
        }
        img.close().unwrap();
    }
    // Entry 1 shares entry 0's cluster; entry 2 points past the end; a
    // leaked megabyte at the end.
    mem.write_at(&1u32.to_le_bytes(), 64 + 4).unwrap();
    mem.write_at(&1000u32.to_le_bytes(), 64 + 8).unwrap();
    mem.set_len(7 * MIB).unwrap();
    let img = open_with(
        &mem,
        false,
        &[(crate::formats::qcow2::OPEN_FOR_CHECK, "on")],
    )
    .unwrap();
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (2, 2), "{:?}", r.messages);
    assert!(r
        .messages
        .iter()
        .any(|m| m == "ERROR duplicate offset in BAT entry 1"));
    assert!(r
        .messages
        .iter()
        .any(|m| m == "ERROR cluster 2 is outside image"));
    // The copy of the shared cluster takes the free slot entry 1 left (as
    // qemu's repair does); the leaked tail is cut.
    let r = img.check(Some(RepairMode::All)).unwrap();
    assert_eq!(
        (r.corruptions_fixed, r.leaks_fixed),
        (2, 2),
        "{:?}",
        r.messages
    );
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    img.close().unwrap();
    let img = open(&mem, true).unwrap();
    let mut b = [0u8; 4096];
    // Entry 1 has its own copy of the shared cluster; entry 2 reads zeroes.
    img.read(&mut b, MIB).unwrap();
    assert_eq!(b, [1u8; 4096]);
    img.read(&mut b, 2 * MIB).unwrap();
    assert_eq!(b, [0u8; 4096]);
    img.read(&mut b, 3 * MIB).unwrap();
    assert_eq!(b, [4u8; 4096]);
}

#[test]
fn hostile_headers_are_clear_errors() {
    let good = new_image(&opts(8 * MIB, &[]));
    type Edit = (fn(&mut WireHeader), &'static str);
    let edits: [Edit; 4] = [
        (|w| w.bat_entries = 0x1fff_ffff, "past the end of the file"),
        (|w| w.nb_sectors = u64::MAX / 512, "covers only"),
        (|w| w.tracks = u32::MAX, "Too big cluster"),
        (|w| w.version = 1, "not in Parallels format"),
    ];
    for (edit, msg) in edits {
        let mem = MemStorage::from_bytes(&good.to_vec());
        let mut w = wire(&mem);
        edit(&mut w);
        mem.write_at(&w.to_bytes(), 0).unwrap();
        let e = open(&mem, true).unwrap_err();
        assert!(e.to_string().contains(msg), "{e}");
        assert!(e.structure().is_some(), "{e}");
    }
    // A short file.
    let mem = MemStorage::from_bytes(&good.to_vec()[..40]);
    assert_eq!(
        open(&mem, true).unwrap_err().kind(),
        ErrorKind::InvalidFormat
    );
    // An entry pointing before the data area (into the header and BAT):
    // reads work (they show those bytes, as in qemu), in-place writes are
    // refused.
    let mem = version1_image();
    let mut w = wire(&mem);
    w.data_off = 64;
    mem.write_at(&w.to_bytes(), 0).unwrap();
    mem.write_at(&1u32.to_le_bytes(), 64 + 4 * 5).unwrap();
    let img = open(&mem, true).unwrap();
    let mut b = [0u8; 512];
    img.read(&mut b, 5 * 32768).unwrap();
    assert_eq!(&b[..], &mem.to_vec()[512..1024]);
    drop(img);
    let img = open_with(
        &mem,
        false,
        &[(crate::formats::qcow2::OPEN_FOR_CHECK, "on")],
    )
    .unwrap();
    let e = img.write(&[1u8; 512], 5 * 32768).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("before the data area"), "{e}");
}

#[test]
fn a_dirty_bitmap_extension_is_listed_kept_and_detached_on_write() {
    let mem = new_image(&opts(8 * MIB, &[]));
    let h = Header::validate(wire(&mem)).unwrap();
    // The extension at 1 MiB; one L1 entry, all bits set.
    let ext = build_bitmap_extension(&h, [0x11; 16], 128, &[1]);
    mem.write_at(&ext, MIB).unwrap();
    let mut w = wire(&mem);
    w.ext_off = 2048;
    mem.write_at(&w.to_bytes(), 0).unwrap();
    let img = open(&mem, true).unwrap();
    let Some(FormatSpecific::Parallels(p)) = img.info().format_specific else {
        panic!()
    };
    assert_eq!(p.bitmaps.len(), 1);
    assert_eq!(p.bitmaps[0].name, "11111111-1111-1111-1111-111111111111");
    assert_eq!(p.bitmaps[0].granularity, 65536);
    let r = img.check(None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(img);
    // A write lands after the extension and detaches it.
    let img = open(&mem, false).unwrap();
    img.write(&[1u8; 512], 0).unwrap();
    let (m, _) = img.driver().map(0, 512).unwrap();
    assert!(
        matches!(m, Mapping::Data { offset, .. } if offset == 2 * MIB),
        "{m:?}"
    );
    img.close().unwrap();
    assert_eq!(wire(&mem).ext_off, 0);
    // A damaged extension is reported, and data still reads.
    let mem = new_image(&opts(8 * MIB, &[]));
    let mut bad = ext.clone();
    bad[40] ^= 1;
    mem.write_at(&bad, MIB).unwrap();
    mem.write_at(&w.to_bytes(), 0).unwrap();
    let img = open(&mem, true).unwrap();
    assert!(img.driver().warnings()[0].to_string().contains("checksum"));
    assert_eq!(img.check(None).unwrap().corruptions, 1);
}
