//! Tests of the generic layer.

use super::*;
use crate::driver::Driver;
use crate::storage::MemStorage;

fn mem_raw(size: u64) -> (MemStorage, Image) {
    let mem = MemStorage::new();
    mem.set_len(size).unwrap();
    let img = Image::open_storage(Arc::new(mem.clone()), Some("raw"), false, None).unwrap();
    (mem, img)
}

#[test]
fn reads_and_writes_outside_the_disk_are_refused() {
    let (_m, img) = mem_raw(4096);
    let mut b = [0u8; 10];
    assert_eq!(
        img.read(&mut b, 4090).unwrap_err().kind(),
        ErrorKind::OutOfBounds
    );
    assert_eq!(
        img.write(&b, u64::MAX - 2).unwrap_err().kind(),
        ErrorKind::OutOfBounds
    );
    assert_eq!(
        img.write_zeroes(4000, 100, false).unwrap_err().kind(),
        ErrorKind::OutOfBounds
    );
    img.read(&mut b, 4086).unwrap();
}

#[test]
fn a_read_only_image_refuses_every_kind_of_write() {
    let mem = MemStorage::from_bytes(&[1u8; 8192]);
    let img = Image::open_storage(Arc::new(mem.clone()), Some("raw"), true, None).unwrap();
    assert_eq!(img.write(&[0], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(
        img.write_zeroes(0, 10, true).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        img.discard(0, 4096).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        img.resize(0, Preallocation::Off, true).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(mem.to_vec(), vec![1u8; 8192]);
}

#[test]
fn a_closed_image_refuses_io_with_a_state_error() {
    let (_m, img) = mem_raw(4096);
    img.close().unwrap();
    let mut b = [0u8; 1];
    assert_eq!(img.read(&mut b, 0).unwrap_err().kind(), ErrorKind::State);
    assert_eq!(img.write(&b, 0).unwrap_err().kind(), ErrorKind::State);
    assert_eq!(img.flush().unwrap_err().kind(), ErrorKind::State);
    img.close().unwrap();
}

#[test]
fn a_probed_raw_image_refuses_a_format_header_in_sector_0_only_when_a_format_claims_it() {
    let mem = MemStorage::new();
    mem.set_len(65536).unwrap();
    let img = Image::open_storage(Arc::new(mem.clone()), None, false, None).unwrap();
    assert!(img.probed_raw());
    // No non-raw format claims plain data, so writes pass.
    img.write(b"hello", 0).unwrap();
    // A qcow2 magic and version in the first sector is refused, also
    // when it is completed by a write that does not start at 0.
    let qcow2 = [b'Q', b'F', b'I', 0xfb, 0, 0, 0, 3];
    let e = img.write(&qcow2, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    img.write(&[0u8; 8], 0).unwrap();
    // The magic alone (version 0) is no qcow2 header yet.
    img.write(&qcow2[..4], 0).unwrap();
    assert_eq!(
        img.write(&qcow2[4..], 4).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    let mut head = [0u8; 8];
    img.read(&mut head, 0).unwrap();
    assert_eq!(&head[..4], b"QFI\xfb");
    let explicit = Image::open_storage(Arc::new(mem), Some("raw"), false, None).unwrap();
    assert!(!explicit.probed_raw());
    explicit.write(&qcow2, 0).unwrap();
}

#[test]
fn shrinking_needs_explicit_permission() {
    let (_m, img) = mem_raw(8192);
    let e = img.resize(4096, Preallocation::Off, false).unwrap_err();
    assert_eq!(
        e.condition(),
        Some(crate::error::Condition::ShrinkNotAllowed)
    );
    img.resize(4096, Preallocation::Off, true).unwrap();
    assert_eq!(img.size(), 4096);
}

#[test]
fn zero_extended_reads_pad_past_the_end() {
    let mem = MemStorage::from_bytes(&[7u8; 100]);
    let img = Image::open_storage(Arc::new(mem), Some("raw"), true, None).unwrap();
    let mut b = [1u8; 200];
    img.read_zero_extended(&mut b, 50).unwrap();
    assert!(b[..50].iter().all(|&x| x == 7));
    assert!(b[50..].iter().all(|&x| x == 0));
}

#[test]
fn backing_names_resolve_relative_to_the_image_directory() {
    assert_eq!(
        resolve_backing(Path::new("/a/b/top.qcow2"), "base.raw"),
        PathBuf::from("/a/b/base.raw")
    );
    assert_eq!(
        resolve_backing(Path::new("top.qcow2"), "base.raw"),
        PathBuf::from("base.raw")
    );
    assert_eq!(
        resolve_backing(Path::new("/a/top"), "/abs/base"),
        PathBuf::from("/abs/base")
    );
}

/// raw with a 4 KiB request alignment, as a format with transformed
/// sectors would report.
struct Aligned(Box<dyn Driver>);

impl Driver for Aligned {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn request_alignment(&self) -> u32 {
        4096
    }
    fn storages(&self) -> &[Arc<dyn Storage>] {
        self.0.storages()
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<(crate::Mapping, u64)> {
        self.0.map(offset, max_len)
    }
    fn map_write(&self, offset: u64, len: u64) -> Result<crate::driver::WriteMapping> {
        assert!(
            offset.is_multiple_of(4096) && len.is_multiple_of(4096),
            "unaligned write {offset}+{len} reached the driver"
        );
        self.0.map_write(offset, len)
    }
}

#[test]
fn unaligned_writes_to_the_same_units_from_many_threads_lose_nothing() {
    let mem = MemStorage::new();
    mem.set_len(64 << 10).unwrap();
    let raw = crate::registry::find("raw")
        .unwrap()
        .open(
            Arc::new(mem.clone()),
            &crate::driver::DriverOpenOptions::new(false),
        )
        .unwrap();
    let img = Image {
        driver: Box::new(Aligned(raw)),
        state: crate::state::OpenState::new(false),
        backing: None,
        backing_ref: None,
        full_backing: None,
        name: "aligned".into(),
        path: None,
        probed_raw: false,
        locks: Mutex::new(Vec::new()),
        ranges: RangeLocks::new(),
        gate: RwLock::new(()),
    };
    // Thread t owns bytes [t*100, t*100+100) of every 4 KiB unit: every
    // write is a read-modify-write of a unit others modify too.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let img = &img;
            s.spawn(move || {
                for round in 0..20u8 {
                    for unit in 0..16u64 {
                        let v = [(t as u8) << 4 | (round & 0xf); 100];
                        img.write(&v, unit * 4096 + t * 100).unwrap();
                    }
                }
            });
        }
    });
    let bytes = mem.to_vec();
    for unit in 0..16usize {
        for t in 0..8usize {
            let at = unit * 4096 + t * 100;
            assert!(
                bytes[at..at + 100].iter().all(|&b| b == (t as u8) << 4 | 3),
                "unit {unit}, thread {t}: a write was lost"
            );
        }
    }
    // A write spanning units: head and tail go through read-modify-write,
    // the aligned middle straight to the driver.
    img.write(&[0xaa; 10000], 1000).unwrap();
    let bytes = mem.to_vec();
    assert!(bytes[1000..11000].iter().all(|&b| b == 0xaa));
    assert_eq!(bytes[999], 0, "the byte before the write kept its value");
    assert_eq!(bytes[799], 0x73);
}
