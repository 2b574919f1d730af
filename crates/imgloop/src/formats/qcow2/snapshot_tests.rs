//! Tests of internal snapshots: random sequences against a model of every
//! snapshot's content, power cuts during create, apply and delete, and
//! damaged snapshot tables.

use super::testutil::{mem_image, reopen};
use crate::driver::{DriverOpenOptions, SnapshotSelector};
use crate::error::ErrorKind;
use crate::storage::{CrashStorage, MemStorage, Storage};
use crate::testkit::Rng;
use crate::{Image, Preallocation};
use std::sync::Arc;

/// The disk and every snapshot, as the operations so far leave them.
struct Model {
    disk: Vec<u8>,
    /// (ID, name, content) in table order.
    snaps: Vec<(String, String, Vec<u8>)>,
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.size() as usize];
    img.read(&mut b, 0).unwrap();
    b
}

/// `content` as a snapshot view shows it on a disk now `size` bytes long
/// (cut, or zero-extended), as qemu-img's -l shows it.
fn at_size(content: &[u8], size: u64) -> Vec<u8> {
    let mut v = content.to_vec();
    v.resize(size as usize, 0);
    v
}

/// Opens the snapshot `key` (ID or name) of the image in `storage`.
fn view(storage: Arc<dyn Storage>, key: &str) -> crate::Result<Image> {
    let mut o = DriverOpenOptions::new(true);
    o.options.insert("snapshot".into(), key.into());
    Image::open_storage_with(storage, Some("qcow2"), &o, None)
}

fn assert_clean(img: &Image, what: &str) {
    img.flush().unwrap();
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{what}: {:?}",
        r.messages
    );
}

fn run_model(seed: u64, opts: &[(&str, &str)], ops: usize) {
    let cs: u64 = opts
        .iter()
        .find(|(k, _)| *k == "cluster_size")
        .map_or(65536, |(_, v)| v.parse().unwrap());
    let (mem, mut img) = mem_image(48 * cs, opts);
    let mut m = Model {
        disk: vec![0u8; img.size() as usize],
        snaps: Vec::new(),
    };
    let mut rng = Rng::new(seed);
    let mut log = Vec::new();
    for step in 0..ops {
        let size = m.disk.len() as u64;
        let off = rng.below(size / 512) * 512;
        let len = ((1 + rng.below(3 * cs / 512)) * 512).min(size - off);
        let op = rng.below(20);
        log.push(format!("{step}: op {op} at {off} len {len}"));
        let ctx = || format!("seed {seed} {opts:?}: {}", log.join("; "));
        match op {
            0..=6 => {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                img.write(&b, off).unwrap();
                m.disk[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            7 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                m.disk[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                // Discarded ranges read as zeroes here (v3, no backing) or
                // keep their data (partial clusters): read what it is.
                img.discard(off, len).unwrap();
                let mut b = vec![0u8; len as usize];
                img.read(&mut b, off).unwrap();
                // Cluster by cluster: each piece reads as zeroes or as before.
                let mut pos = off;
                while pos < off + len {
                    let end = ((pos / cs + 1) * cs).min(off + len);
                    let got = &b[(pos - off) as usize..(end - off) as usize];
                    let was = &m.disk[pos as usize..end as usize];
                    assert!(got.iter().all(|&x| x == 0) || got == was, "{}", ctx());
                    pos = end;
                }
                m.disk[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            9 => {
                let c = off / cs * cs;
                if c + cs <= size {
                    let mut b = vec![(step % 251) as u8; cs as usize];
                    b[..64].fill(7);
                    img.write_compressed(&b, c).unwrap();
                    m.disk[c as usize..(c + cs) as usize].copy_from_slice(&b);
                }
            }
            10..=12 => {
                let name = format!("n{}", rng.below(6));
                img.snapshot_create(&name).unwrap();
                // QEMU's rule: one more than the largest ID there is.
                let id = m
                    .snaps
                    .iter()
                    .map(|s| s.0.parse::<u64>().unwrap())
                    .max()
                    .unwrap_or(0)
                    + 1;
                m.snaps.push((id.to_string(), name, m.disk.clone()));
            }
            13 | 14 if !m.snaps.is_empty() => {
                let i = rng.below(m.snaps.len() as u64) as usize;
                // By ID or by name (names never look like IDs): the first
                // snapshot with that name is the one applied.
                let (key, j) = if rng.below(2) == 0 {
                    (m.snaps[i].0.clone(), i)
                } else {
                    let n = m.snaps[i].1.clone();
                    let j = m.snaps.iter().position(|s| s.1 == n).unwrap();
                    (n, j)
                };
                img.snapshot_apply(&key).unwrap();
                m.disk = m.snaps[j].2.clone();
                assert_eq!(img.size(), m.disk.len() as u64, "{}", ctx());
            }
            15 if !m.snaps.is_empty() => {
                let i = rng.below(m.snaps.len() as u64) as usize;
                let name = m.snaps[i].1.clone();
                let j = m.snaps.iter().position(|s| s.1 == name).unwrap();
                img.snapshot_delete(&SnapshotSelector::by_name(&name))
                    .unwrap();
                m.snaps.remove(j);
            }
            16 if size < 64 * cs => {
                let new = size + (1 + rng.below(3)) * cs;
                let v2 = opts.contains(&("compat", "0.10"));
                if v2 && !img.info().snapshots.is_empty() {
                    // As qemu-img: version 2 images with snapshots keep their size.
                    let e = img.resize(new, Preallocation::Off, false).unwrap_err();
                    assert!(e.to_string().contains("v2 image"), "{e}");
                } else {
                    img.resize(new, Preallocation::Off, false).unwrap();
                    m.disk.resize(new as usize, 0);
                }
            }
            17 => {
                img.close().unwrap();
                drop(img);
                img = reopen(&mem);
            }
            18 => assert_clean(&img, &ctx()),
            _ => {}
        }
        assert!(read_all(&img) == m.disk, "disk differs: {}", ctx());
        if op == 19 || step + 1 == ops {
            img.flush().unwrap();
            let info = img.info();
            let listed: Vec<(String, String)> = info
                .snapshots
                .iter()
                .map(|s| (s.id.clone(), s.name.clone()))
                .collect();
            let want: Vec<(String, String)> =
                m.snaps.iter().map(|s| (s.0.clone(), s.1.clone())).collect();
            assert_eq!(listed, want, "{}", ctx());
            for (id, _, content) in &m.snaps {
                let v = view(Arc::new(mem.clone()), id).unwrap();
                let want = at_size(content, m.disk.len() as u64);
                assert!(read_all(&v) == want, "snapshot {id} differs: {}", ctx());
            }
            assert_clean(&img, &ctx());
        }
    }
}

#[test]
fn random_snapshot_sequences_keep_every_snapshot_and_the_disk_intact() {
    run_model(1, &[("cluster_size", "512")], 260);
    run_model(2, &[("cluster_size", "4096")], 200);
    run_model(3, &[("cluster_size", "512"), ("compat", "0.10")], 200);
    run_model(4, &[("cluster_size", "16384"), ("extended_l2", "on")], 150);
    run_model(5, &[("cluster_size", "1024"), ("refcount_bits", "64")], 200);
}

/// Runs `op` on an image with two snapshots whose file is a
/// [`CrashStorage`], and checks every state a power cut during it can
/// leave: it opens, has no corruption (leaks are allowed), and reads
/// either the state before or the state after, its snapshot list
/// matching.
fn power_cuts_during(op: &str) {
    let cs = 512u64;
    let (mem, img) = mem_image(40 * cs, &[("cluster_size", "512")]);
    let mut rng = Rng::new(77);
    let mut fill = |img: &Image, n: usize| {
        for _ in 0..n {
            let off = rng.below(40) * cs;
            let mut b = vec![0u8; cs as usize * 2];
            rng.fill(&mut b);
            let len = b.len().min((40 * cs - off) as usize);
            img.write(&b[..len], off).unwrap();
        }
    };
    fill(&img, 10);
    img.snapshot_create("a").unwrap();
    fill(&img, 6);
    img.resize(44 * cs, Preallocation::Off, false).unwrap();
    img.snapshot_create("b").unwrap();
    fill(&img, 6);
    img.close().unwrap();
    drop(img);
    let crash = CrashStorage::from_bytes(&mem.to_vec());
    crash.sync().unwrap();
    let img = Image::open_storage(Arc::new(crash.clone()), Some("qcow2"), false, None).unwrap();
    let state = |img: &Image| {
        let names: Vec<String> = img
            .info()
            .snapshots
            .iter()
            .map(|s| s.name.clone())
            .collect();
        (read_all(img), names)
    };
    let before = state(&img);
    img.flush().unwrap();
    let snap_b = read_all(&view(Arc::new(crash.clone()), "b").unwrap());
    crash.start_capture();
    match op {
        "create" => img.snapshot_create("c").unwrap(),
        "apply" => img.snapshot_apply("a").unwrap(),
        "delete" => img
            .snapshot_delete(&SnapshotSelector::by_name("a"))
            .unwrap(),
        _ => unreachable!(),
    }
    img.flush().unwrap();
    img.sync().unwrap();
    let after = state(&img);
    assert_ne!(before, after, "{op} changed nothing");
    let states = crash.take_captured();
    assert!(states.len() > 5, "{op}: only {} states", states.len());
    for (i, s) in states.into_iter().enumerate() {
        let bytes = s.to_vec();
        let cut = Image::open_storage(Arc::new(s), Some("qcow2"), true, None)
            .unwrap_or_else(|e| panic!("{op}: state {i} does not open: {e}"));
        let r = cut.check(None).unwrap();
        assert_eq!(
            (r.corruptions, r.check_errors),
            (0, 0),
            "{op}: state {i}: {:?}",
            r.messages
        );
        let got = state(&cut);
        assert!(
            got == before || got == after,
            "{op}: state {i} is neither the state before nor after (snapshots {:?})",
            got.1
        );
        // Each snapshot listed still reads as what it was taken of.
        if got.1.contains(&"b".to_string()) {
            let b = view(Arc::new(MemStorage::from_bytes(&bytes)), "b").unwrap();
            let want = at_size(&snap_b, got.0.len() as u64);
            assert!(
                read_all(&b) == want,
                "{op}: state {i}: snapshot b reads wrong"
            );
        }
        // And the state can be written again, leaks repaired.
        let rw = Image::open_storage(
            Arc::new(MemStorage::from_bytes(&bytes)),
            Some("qcow2"),
            false,
            None,
        )
        .unwrap();
        rw.check(Some(crate::RepairMode::All)).unwrap();
        rw.write(&[9u8; 512], 0).unwrap();
        assert_clean(&rw, &format!("{op}: state {i} after repair and a write"));
    }
}

#[test]
fn a_power_cut_during_snapshot_create_leaves_the_old_or_the_new_state() {
    power_cuts_during("create");
}

#[test]
fn a_power_cut_during_snapshot_apply_leaves_the_old_or_the_new_state() {
    power_cuts_during("apply");
}

#[test]
fn a_power_cut_during_snapshot_delete_leaves_the_old_or_the_new_state() {
    power_cuts_during("delete");
}

#[test]
fn writes_after_a_snapshot_copy_shared_clusters_and_leave_the_snapshot_as_it_was() {
    let (mem, img) = mem_image(1 << 20, &[]);
    img.write(&[1u8; 65536 * 2], 0).unwrap();
    img.snapshot_create("s").unwrap();
    let q = super::testutil::qcow2(&img);
    let host = img.block_status(0, 65536).unwrap().offset.unwrap();
    // Shared: refcount 2, so the write goes elsewhere.
    assert_eq!(q.refcount(&mut q.tables_mut(), host / 65536).unwrap(), 2);
    img.write(&[2u8; 4096], 4096).unwrap();
    let moved = img.block_status(0, 65536).unwrap().offset.unwrap();
    assert_ne!(moved, host);
    img.flush().unwrap();
    let v = view(Arc::new(mem.clone()), "s").unwrap();
    assert!(read_all(&v)[..131072].iter().all(|&b| b == 1));
    let now = read_all(&img);
    assert!(now[4096..8192].iter().all(|&b| b == 2) && now[0..4096].iter().all(|&b| b == 1));
    // The second write to the copied cluster goes in place.
    img.write(&[3u8; 512], 0).unwrap();
    assert_eq!(img.block_status(0, 65536).unwrap().offset, Some(moved));
    assert_clean(&img, "after copy-on-write");
}

#[test]
fn ids_are_one_more_than_the_largest_and_names_may_repeat() {
    let (mem, img) = mem_image(1 << 20, &[]);
    for n in ["x", "x", "y"] {
        img.snapshot_create(n).unwrap();
    }
    img.snapshot_delete(&SnapshotSelector::by_name("x"))
        .unwrap();
    img.snapshot_create("z").unwrap();
    let ids: Vec<(String, String)> = img
        .info()
        .snapshots
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    let want = [("2", "x"), ("3", "y"), ("4", "z")];
    assert_eq!(
        ids,
        want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
    );
    let e = img
        .snapshot_delete(&SnapshotSelector::by_name("nope"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("snapshot not found"), "{e}");
    let e = img.snapshot_apply("nope").unwrap_err();
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    img.flush().unwrap();
    let e = view(Arc::new(mem.clone()), "nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    // A snapshot view is read-only.
    let mut o = DriverOpenOptions::new(false);
    o.options.insert("snapshot".into(), "2".into());
    assert!(Image::open_storage_with(Arc::new(mem.clone()), Some("qcow2"), &o, None).is_err());
}

#[test]
fn the_snapshot_table_is_rewritten_with_unknown_extra_data_kept() {
    let (mem, img) = mem_image(1 << 20, &[]);
    img.snapshot_create("keep").unwrap();
    img.close().unwrap();
    drop(img);
    // Give the entry 8 more bytes of extra data that imgloop does not
    // know: a table of one entry, rewritten in place.
    let h = super::header::Header::read(&mem).unwrap();
    let mut t = super::snapshot::read_table(&mem, h.snapshots_offset, 1).unwrap();
    t.entries[0].extra.extend_from_slice(b"UNKNOWN!");
    let bytes = super::snapshot::encode_table(&t.entries).unwrap();
    mem.write_at(&bytes, h.snapshots_offset).unwrap();
    let img = reopen(&mem);
    img.check(Some(crate::RepairMode::All)).unwrap();
    img.snapshot_create("new").unwrap();
    img.close().unwrap();
    let h = super::header::Header::read(&mem).unwrap();
    let t = super::snapshot::read_table(&mem, h.snapshots_offset, 2).unwrap();
    assert_eq!(&t.entries[0].extra[24..], b"UNKNOWN!");
    assert_eq!(t.entries[0].name, "keep");
    assert_eq!(t.entries[1].extra.len(), super::snapshot::EXTRA_BYTES);
    assert_eq!(t.entries[1].disk_size, Some(1 << 20));
    // Encoding what was read gives the bytes back.
    let raw_len = t.bytes as usize;
    let mut raw = vec![0u8; raw_len];
    mem.read_at(&mut raw, h.snapshots_offset).unwrap();
    assert_eq!(super::snapshot::encode_table(&t.entries).unwrap(), raw);
}

#[test]
fn damaged_snapshot_entries_give_errors_and_change_nothing() {
    let (mem, img) = mem_image(1 << 20, &[]);
    img.write(&[5u8; 65536], 0).unwrap();
    img.snapshot_create("s").unwrap();
    img.close().unwrap();
    drop(img);
    let h = super::header::Header::read(&mem).unwrap();
    let good = mem.to_vec();
    let cases: [(&str, u64, Vec<u8>); 4] = [
        // L1 offset far past the end of the file.
        ("l1 past eof", 0, (1u64 << 50).to_be_bytes().to_vec()),
        // L1 offset not aligned.
        ("l1 unaligned", 0, 0x10200u64.to_be_bytes().to_vec()),
        // An L1 size over 32 MiB.
        ("l1 size huge", 8, u32::MAX.to_be_bytes().to_vec()),
        // An L1 size of zero for a 1 MiB disk.
        ("l1 size zero", 8, 0u32.to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        let m = MemStorage::from_bytes(&good);
        m.write_at(&bytes, h.snapshots_offset + at).unwrap();
        let before = m.to_vec();
        let img = reopen(&m);
        let e = img.snapshot_apply("s").unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidFormat),
            "{what}: {e}"
        );
        if what == "l1 size zero" {
            // Read as qemu-img reads it: all zeroes.
            let v = view(Arc::new(m.clone()), "s").unwrap();
            assert!(read_all(&v).iter().all(|&b| b == 0));
            // An empty table references nothing: deleting the snapshot is
            // the way out, and leaves only leaks.
            img.snapshot_delete(&SnapshotSelector::by_name("s"))
                .unwrap();
            img.flush().unwrap();
            let r = img.check(None).unwrap();
            assert_eq!((r.corruptions, r.check_errors), (0, 0), "{:?}", r.messages);
            assert!(r.leaks > 0);
            continue;
        }
        assert!(view(Arc::new(m.clone()), "s").is_err(), "{what}");
        let e2 = img.snapshot_delete(&SnapshotSelector::by_name("s"));
        assert!(e2.is_err(), "{what}: deleted");
        img.close().unwrap();
        drop(img);
        assert!(
            m.to_vec() == before,
            "{what}: the failed operations changed the file"
        );
    }
    // A count that runs the table past the end of what can be read: no
    // snapshot can be created over it, and nothing changes.
    let m = MemStorage::from_bytes(&good);
    m.write_at(&60000u32.to_be_bytes(), 60).unwrap();
    let before = m.to_vec();
    if let Ok(img) = Image::open_storage(Arc::new(m.clone()), Some("qcow2"), false, None) {
        assert!(img.snapshot_create("x").is_err());
        drop(img);
    }
    assert!(m.to_vec() == before);
}

#[test]
fn duplicate_ids_resolve_to_the_first_and_new_ids_stay_unique() {
    // Another tool may leave two entries with one ID: qemu takes the
    // first for `-a ID`; imgloop too, and the next ID is still new.
    let (mem, img) = mem_image(1 << 20, &[]);
    img.write(&[1u8; 65536], 0).unwrap();
    img.snapshot_create("first").unwrap();
    img.write(&[2u8; 65536], 0).unwrap();
    img.snapshot_create("second").unwrap();
    img.close().unwrap();
    drop(img);
    let h = super::header::Header::read(&mem).unwrap();
    let mut t = super::snapshot::read_table(&mem, h.snapshots_offset, 2).unwrap();
    t.entries[1].raw_id = b"1".to_vec();
    t.entries[1].id = "1".into();
    let bytes = super::snapshot::encode_table(&t.entries).unwrap();
    mem.write_at(&bytes, h.snapshots_offset).unwrap();
    let img = reopen(&mem);
    let ids: Vec<String> = img.info().snapshots.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, ["1", "1"]);
    img.snapshot_apply("1").unwrap();
    assert!(
        read_all(&img)[..65536].iter().all(|&b| b == 1),
        "not the first"
    );
    img.snapshot_create("third").unwrap();
    let ids: Vec<String> = img.info().snapshots.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, ["1", "1", "2"]);
    img.snapshot_delete(&SnapshotSelector::by_name("second"))
        .unwrap();
    assert_clean(&img, "after deleting one of the twins");
}
