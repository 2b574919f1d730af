//! Tests of the VHDX driver through the generic layer.

use super::bat::{self, Geometry, Payload};
use super::guid::Guid;
use super::header::{Header, Headers, RegionTable, HEADER_AT, MIB};
use super::log::build_entry;
use super::{LogState, Vhdx};
use crate::driver::{CreateOptions, DriverOpenOptions, Mapping, RepairMode};
use crate::storage::{MemStorage, Storage};
use crate::testkit::{
    run_model_test_over_format, run_model_test_with, run_power_cut_test, PowerCut, Rng,
};
use crate::{ErrorKind, Image};
use std::sync::Arc;

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
    crate::registry::find("vhdx")
        .unwrap()
        .create(Arc::new(mem.clone()), None, o)
        .unwrap();
    mem
}

fn open(mem: &MemStorage, read_only: bool) -> crate::Result<Image> {
    Image::open_storage(Arc::new(mem.clone()), Some("vhdx"), read_only, None)
}

fn vhdx(img: &Image) -> &Vhdx {
    img.driver().as_any().downcast_ref::<Vhdx>().unwrap()
}

#[test]
fn a_new_image_has_windows_layout_and_reads_as_zeroes() {
    let mem = new_image(&opts(3 << 30, &[]));
    let img = open(&mem, true).unwrap();
    let v = vhdx(&img);
    assert_eq!(v.meta.block_size, 16 << 20);
    assert_eq!((v.meta.logical_sector, v.meta.physical_sector), (512, 4096));
    assert_eq!(
        (v.log, v.metadata_region.offset, v.bat.offset),
        ((MIB, MIB), 2 * MIB, 3 * MIB)
    );
    assert_eq!(img.sector_size(), 512);
    let s = img.block_status(0, img.size()).unwrap();
    assert!(s.zero && s.len == img.size(), "{s:?}");
    // Both headers valid, the second current.
    let h = Headers::read(&mem).unwrap();
    assert!(h.slots[0].is_some() && h.current == 1);
}

#[test]
fn writes_allocate_whole_blocks_at_the_end_of_the_file_and_write_only_their_bytes() {
    let mem = new_image(&opts(64 << 20, &[("block_size", "8M")]));
    let img = open(&mem, false).unwrap();
    img.write(&[7u8; 4096], 9 << 20).unwrap();
    let (m, len) = img.driver().map(9 << 20, 4096).unwrap();
    let Mapping::Data { offset, .. } = m else {
        panic!("{m:?}")
    };
    // The block right after the BAT (4 MiB), 1 MiB into it.
    assert_eq!(offset, 5 * MIB);
    assert_eq!(len, 4096);
    // Only the written bytes are allocated in the new 8 MiB block.
    assert!(mem.allocated_size().unwrap().unwrap() < (4 << 20) + (1 << 20));
    img.close().unwrap();
    let img = open(&mem, true).unwrap();
    let mut b = vec![0u8; 8192];
    img.read(&mut b, (9 << 20) - 4096).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 7));
    assert_eq!(vhdx(&img).log_state(), LogState::Clean);
}

/// Virtual size, create options and open options of one model-test case.
type ModelCase = (
    u64,
    Vec<(&'static str, &'static str)>,
    Vec<(&'static str, &'static str)>,
);

#[test]
fn random_operations_match_the_model() {
    let cases: Vec<ModelCase> = vec![
        (20 << 20, vec![("block_size", "1M")], vec![]),
        (
            20 << 20,
            vec![("block_size", "1M"), ("block_state_zero", "off")],
            vec![("cache-size", "16k")],
        ),
        (
            12 << 20,
            vec![("subformat", "fixed"), ("block_size", "2M")],
            vec![],
        ),
        (
            12 << 20,
            vec![("logical_sector_size", "4096"), ("block_size", "1M")],
            vec![],
        ),
    ];
    for (i, (size, kv, driver)) in cases.iter().enumerate() {
        for seed in 0..2 {
            run_model_test_with("vhdx", &opts(*size, kv), driver, seed + 10 * i as u64, 250)
                .unwrap();
        }
    }
}

#[test]
fn differencing_images_match_the_model_over_a_vhdx_parent() {
    let mut base = vec![0u8; 12 << 20];
    Rng::new(3).fill(&mut base);
    for seed in 0..3 {
        run_model_test_over_format(
            "vhdx",
            &opts(0, &[("block_size", "1M")]),
            &base,
            "vhdx",
            seed,
            250,
        )
        .unwrap();
    }
}

#[test]
fn synced_writes_survive_power_cuts_at_every_point_of_the_write_stream() {
    let mut base = vec![0u8; 4 << 20];
    Rng::new(4).fill(&mut base);
    let cases = [
        (opts(4 << 20, &[("block_size", "1M")]), None, true),
        (opts(4 << 20, &[("block_size", "1M")]), None, false),
        (
            opts(4 << 20, &[("block_size", "1M"), ("subformat", "fixed")]),
            None,
            false,
        ),
        (opts(0, &[("block_size", "1M")]), Some(base.clone()), true),
    ];
    for (create, backing, prefixes) in cases {
        let t = PowerCut {
            format: "vhdx",
            create,
            driver_options: Vec::new(),
            ops: if prefixes { 40 } else { 80 },
            states: 4,
            backing,
            backing_format: "vhdx",
            prefixes,
        };
        for seed in 0..2 {
            run_power_cut_test(&t, seed).unwrap();
        }
    }
}

/// An image whose last flush wrote its log entry but not the BAT sector
/// it describes (the state a crash in the middle of a flush leaves), and
/// the same image after a clean flush.
fn dirty_and_clean() -> (MemStorage, MemStorage) {
    let before = new_image(&opts(8 << 20, &[("block_size", "1M")]));
    let clean = MemStorage::from_bytes(&before.to_vec());
    {
        let img = open(&clean, false).unwrap();
        img.write(&[0x5a; 1 << 20], 2 << 20).unwrap();
        img.close().unwrap();
    }
    let bytes = clean.to_vec();
    let bat_at = 3 * MIB;
    let new_sector = &bytes[bat_at as usize..bat_at as usize + 4096];
    let dirty = MemStorage::from_bytes(&bytes);
    // The BAT sector as it was, the change only in the log.
    dirty
        .write_at(
            &before.to_vec()[bat_at as usize..bat_at as usize + 4096],
            bat_at,
        )
        .unwrap();
    let g = Guid::random();
    let entry = build_entry(g, 1, 0, bytes.len() as u64, &[(bat_at, new_sector)]);
    dirty.write_at(&entry, MIB).unwrap();
    let h = *Headers::read(&dirty).unwrap().current();
    let dirty_header = Header {
        sequence: h.sequence + 1,
        log_guid: g,
        ..h
    };
    dirty
        .write_at(&dirty_header.to_bytes(), HEADER_AT[0])
        .unwrap();
    (dirty, clean)
}

#[test]
fn a_read_only_open_replays_a_dirty_log_in_memory_without_changing_a_byte() {
    let (dirty, clean) = dirty_and_clean();
    let before = dirty.to_vec();
    let img = open(&dirty, true).unwrap();
    assert_eq!(vhdx(&img).log_state(), LogState::ReplayedInMemory);
    let mut got = vec![0u8; 8 << 20];
    img.read(&mut got, 0).unwrap();
    let clean_img = open(&clean, true).unwrap();
    let mut want = vec![0u8; 8 << 20];
    clean_img.read(&mut want, 0).unwrap();
    assert!(got == want, "the in-memory replay reads differently");
    let r = img.check(None).unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
    assert_eq!(img.write(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    img.close().unwrap();
    assert!(
        dirty.to_vec() == before,
        "a read-only open changed the file"
    );
    // A read-write open replays it into the file: the same view.
    let img = open(&dirty, false).unwrap();
    assert_eq!(vhdx(&img).log_state(), LogState::Replayed);
    img.read(&mut got, 0).unwrap();
    assert!(got == want);
    let r = img.check(Some(RepairMode::All)).unwrap();
    assert_eq!(
        (r.corruptions, r.corruptions_fixed),
        (0, 1),
        "{:?}",
        r.messages
    );
    img.close().unwrap();
    let h = Headers::read(&dirty).unwrap();
    assert!(h.current().log_guid.is_zero());
    assert_eq!(
        vhdx(&open(&dirty, true).unwrap()).log_state(),
        LogState::Clean
    );
}

#[test]
fn a_torn_header_is_ignored_and_check_repairs_it() {
    let mem = new_image(&opts(8 << 20, &[("block_size", "1M")]));
    mem.write_at(&[0xee; 64], HEADER_AT[1] + 200).unwrap();
    let img = open(&mem, false).unwrap();
    let r = img.check(None).unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
    let r = img.check(Some(RepairMode::All)).unwrap();
    assert_eq!(r.corruptions_fixed, 1, "{:?}", r.messages);
    img.close().unwrap();
    let h = Headers::read(&mem).unwrap();
    assert!(h.slots[0].is_some() && h.slots[1].is_some());
    // Both headers torn: a clear error.
    mem.write_at(&[0xee; 64], HEADER_AT[0] + 200).unwrap();
    mem.write_at(&[0xee; 64], HEADER_AT[1] + 200).unwrap();
    let e = open(&mem, true).unwrap_err();
    assert!(e.to_string().contains("No valid VHDX header"), "{e}");
}

#[test]
fn hostile_bat_entries_are_errors_or_reported_and_never_panic() {
    let mem = new_image(&opts(8 << 20, &[("block_size", "1M")]));
    let bat_at = 3 * MIB;
    let set = |e: u64| {
        let m = MemStorage::from_bytes(&mem.to_vec());
        m.write_at(&e.to_le_bytes(), bat_at).unwrap();
        m
    };
    let mut b = [0u8; 512];
    // In the header section.
    let img = open(&set(bat::entry(Payload::FullyPresent, 0)), true).unwrap();
    assert_eq!(img.read(&mut b, 0).unwrap_err().kind(), ErrorKind::Corrupt);
    // Reserved state, and partially present without a parent.
    for e in [4u64, bat::entry(Payload::PartiallyPresent, 5 * MIB)] {
        let img = open(&set(e), true).unwrap();
        assert_eq!(img.read(&mut b, 0).unwrap_err().kind(), ErrorKind::Corrupt);
        assert!(img.check(None).unwrap().corruptions >= 1);
    }
    // Past the end of the file: reads as zeroes; check reports it and the
    // repair turns it into a zero block.
    let m = set(bat::entry(Payload::FullyPresent, 1 << 40));
    let img = open(&m, false).unwrap();
    b.fill(1);
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 512]);
    assert_eq!(img.check(None).unwrap().corruptions, 1);
    assert_eq!(
        img.check(Some(RepairMode::All)).unwrap().corruptions_fixed,
        1
    );
    assert_eq!(img.check(None).unwrap().corruptions, 0);
    // Two blocks at the same place.
    let m = set(bat::entry(Payload::FullyPresent, 5 * MIB));
    m.write_at(
        &bat::entry(Payload::FullyPresent, 5 * MIB).to_le_bytes(),
        bat_at + 8,
    )
    .unwrap();
    m.set_len(8 * MIB).unwrap();
    let r = open(&m, true).unwrap().check(None).unwrap();
    assert!(
        r.messages.iter().any(|m| m.contains("overlaps block 0")),
        "{:?}",
        r.messages
    );
    // A BAT region too small for the disk.
    let (mut t, _) = RegionTable::read(&mem).unwrap();
    for r in &mut t.entries {
        if r.guid == super::header::BAT_REGION {
            r.length = MIB;
        }
    }
    let g = Geometry::new(8 << 20, MIB, 512, false);
    assert!(g.bat_bytes() < MIB);
}

#[test]
fn the_log_entry_of_a_flush_is_replayable_and_every_metadata_change_goes_through_it() {
    // After a write and a flush the log holds the entry of the BAT
    // change, with the session's log GUID in the headers.
    let mem = new_image(&opts(8 << 20, &[("block_size", "1M")]));
    let img = open(&mem, false).unwrap();
    img.write(&[9u8; 4096], 0).unwrap();
    img.flush().unwrap();
    let h = *Headers::read(&mem).unwrap().current();
    assert!(!h.log_guid.is_zero());
    let log = super::log::Log::new(&mem, &h).unwrap();
    let act = log.active().unwrap();
    assert_eq!(act.len(), 1);
    assert!(act[0]
        .ops
        .iter()
        .any(|op| matches!(op, super::log::Op::Data { at, .. } if *at == 3 * MIB)));
    img.close().unwrap();
    assert!(Headers::read(&mem).unwrap().current().log_guid.is_zero());
    let dopts = DriverOpenOptions::new(true);
    let again =
        Image::open_storage_with(Arc::new(mem.clone()), Some("vhdx"), &dopts, None).unwrap();
    let mut b = vec![0u8; 4096];
    again.read(&mut b, 0).unwrap();
    assert_eq!(b, vec![9u8; 4096]);
}
