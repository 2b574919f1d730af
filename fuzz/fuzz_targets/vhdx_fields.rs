//! Fuzz target: typed mutations of a valid VHDX image.
//!
//! The input picks the block size, fixed or dynamic, ZERO or NOT_PRESENT
//! new blocks, 512 B or 4 KiB sectors and a virtual size; data is written
//! and flushed (so the BAT has present blocks), and sometimes a log entry
//! is left for replay. Then one to four typed fields are set to extreme
//! values (0, 1, unit edges, the file length, 2^31, 2^32, 2^61 to
//! 2^64 - 1, values near the old one, raw input bytes): header fields
//! (sequence, log GUID, versions, log offset and length), region table
//! fields (count, offsets, lengths, required bits), metadata table and
//! item fields (count, item offsets, lengths and flags, block size, file
//! flags, virtual size, sector sizes), the first BAT entries and the log
//! entry's fields (length, tail, sequence, descriptor count, file sizes,
//! descriptor targets). Checksums are recomputed after the edit unless
//! the input says not to, so the damage reaches the structures behind
//! them. The result is opened read-only (walked, read, checked; nothing
//! may change) and read-write (written, zeroed, discarded, flushed,
//! checked). Errors are expected; a panic (including arithmetic overflow:
//! the fuzz build has overflow checks on), a hang or a huge allocation is
//! a bug.

#![no_main]

use imgloop::driver::DriverOpenOptions;
use imgloop::formats::vhdx::guid::Guid;
use imgloop::formats::vhdx::header::{seal, HEADER_AT, REGIONS_AT};
use imgloop::formats::vhdx::log::build_entry;
use imgloop::storage::MemStorage;
use imgloop::{registry, CreateOptions, Image};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

#[path = "fields.rs"]
mod fields;
use fields::{exercise_read_only, get, mutate, Input, Order};

const MIB: u64 = 1 << 20;
const LE: Order = Order::Little;

fn open(mem: &MemStorage, read_only: bool) -> Option<Image> {
    let d = DriverOpenOptions::new(read_only);
    Image::open_storage_with(Arc::new(mem.clone()), Some("vhdx"), &d, None).ok()
}

/// The slot (0 or 1) of the header with the larger sequence number.
fn current_slot(bytes: &[u8]) -> usize {
    let seq = |i: usize| get(bytes, HEADER_AT[i] + 8, 8, LE);
    usize::from(seq(1) > seq(0))
}

/// (BAT offset, metadata offset) from the first region table.
fn regions(bytes: &[u8]) -> (u64, u64) {
    let t = REGIONS_AT[0];
    let (mut bat, mut meta) = (0, 0);
    for i in 0..2 {
        let e = t + 16 + 32 * i;
        match bytes.get(e as usize) {
            Some(0x66) => bat = get(bytes, e + 16, 8, LE),
            Some(0x06) => meta = get(bytes, e + 16, 8, LE),
            _ => {}
        }
    }
    (bat, meta)
}

/// Where an edit happened, so the right checksum can be recomputed.
enum Sealed {
    Header(u64),
    Regions,
    Log(u64, u64),
    None,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let block = MIB << (input.byte() % 3);
    let sector: u64 = if input.byte() % 4 == 0 { 4096 } else { 512 };
    let fixed = input.byte() % 4 == 0;
    let mut opts = CreateOptions {
        size: ((input.byte() as u64 % 8) + 1) * MIB / 2,
        ..Default::default()
    };
    opts.options.insert("block_size".into(), block.to_string());
    opts.options
        .insert("logical_sector_size".into(), sector.to_string());
    if fixed {
        opts.options.insert("subformat".into(), "fixed".into());
    }
    if input.byte() % 2 == 0 {
        opts.options.insert("block_state_zero".into(), "off".into());
    }
    let mem = MemStorage::new();
    if registry::find("vhdx")
        .expect("vhdx")
        .create(Arc::new(mem.clone()), None, &opts)
        .is_err()
    {
        return;
    }
    let before_writes = mem.to_vec();
    {
        let img = open(&mem, false).expect("a new image opens");
        for i in 0..3u64 {
            let _ = img.write(
                &[0x40 + i as u8; 4096],
                i * 1_200_000 % opts.size / 4096 * 4096,
            );
        }
        let _ = img.close();
    }
    let mut bytes = mem.to_vec();
    let (bat, meta) = regions(&bytes);

    // Sometimes leave the last BAT change in the log, as a crash would.
    let mut log_entry: Option<(u64, u64)> = None;
    if input.byte() % 3 == 0 && bat + 4096 <= bytes.len() as u64 {
        let b = bat as usize;
        let new_sector = bytes[b..b + 4096].to_vec();
        bytes[b..b + 4096].copy_from_slice(&before_writes[b..b + 4096]);
        let g = Guid::random();
        let entry = build_entry(
            g,
            1 + input.byte() as u64,
            0,
            bytes.len() as u64,
            &[(bat, &new_sector)],
        );
        let slot = current_slot(&bytes);
        let h = HEADER_AT[slot] as usize;
        let log = get(&bytes, h as u64 + 72, 8, LE) as usize;
        bytes[log..log + entry.len()].copy_from_slice(&entry);
        log_entry = Some((log as u64, entry.len() as u64));
        let other = HEADER_AT[1 - slot] as usize;
        let mut header = bytes[h..h + 4096].to_vec();
        let seq = get(&header, 8, 8, LE) + 1;
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        header[48..64].copy_from_slice(&g.0);
        seal(&mut header, 4);
        bytes[other..other + 4096].copy_from_slice(&header);
    }

    let slot = current_slot(&bytes);
    let h = HEADER_AT[slot];
    let r = REGIONS_AT[0];
    // (offset, width, checksum to recompute, unit for extreme values).
    let mut fields: Vec<(u64, u8, u8, u64)> = vec![
        (h + 8, 8, 0, 1),
        (h + 48, 8, 0, 1),
        (h + 64, 2, 0, 1),
        (h + 66, 2, 0, 1),
        (h + 68, 4, 0, MIB),
        (h + 72, 8, 0, MIB),
        (r + 8, 4, 1, 1),
        (r + 12, 4, 1, 1),
    ];
    for i in 0..2 {
        let e = r + 16 + 32 * i;
        fields.extend([(e + 16, 8, 1, MIB), (e + 24, 4, 1, MIB), (e + 28, 4, 1, 1)]);
    }
    fields.push((meta + 10, 2, 2, 1));
    let count = get(&bytes, meta + 10, 2, LE).min(8);
    for i in 0..count {
        let e = meta + 32 + 32 * i;
        fields.extend([(e + 16, 4, 2, 4096), (e + 20, 4, 2, 8), (e + 24, 4, 2, 1)]);
        let item = meta + get(&bytes, e + 16, 4, LE);
        let len = get(&bytes, e + 20, 4, LE).min(8) as u8;
        if len >= 4 {
            fields.push((item, len.min(8), 2, sector));
            fields.push((item + 4, 4, 2, 1));
        }
    }
    for i in 0..4 {
        fields.push((bat + 8 * i, 8, 2, MIB));
    }
    if let Some((log, _)) = log_entry {
        for (off, width) in [
            (8, 4),
            (12, 4),
            (16, 8),
            (24, 4),
            (48, 8),
            (56, 8),
            (64 + 16, 8),
            (64 + 24, 8),
        ] {
            fields.push((log + off, width, 3, 4096));
        }
    }
    let reseal = input.byte() % 8 != 0;
    for _ in 0..1 + input.byte() % 4 {
        let (at, width, kind, unit) = fields[input.byte() as usize % fields.len()];
        mutate(&mut input, &mut bytes, (at, width), unit, LE);
        let target = match kind {
            0 => Sealed::Header(h),
            1 => Sealed::Regions,
            3 => {
                let (log, len) = log_entry.expect("a log entry");
                Sealed::Log(log, len)
            }
            _ => Sealed::None,
        };
        if !reseal {
            continue;
        }
        match target {
            Sealed::Header(at) => seal(&mut bytes[at as usize..at as usize + 4096], 4),
            Sealed::Regions => {
                let t = REGIONS_AT[0] as usize;
                seal(&mut bytes[t..t + 65536], 4);
                let copy = bytes[t..t + 65536].to_vec();
                let t2 = REGIONS_AT[1] as usize;
                bytes[t2..t2 + 65536].copy_from_slice(&copy);
            }
            Sealed::Log(at, len) => seal(&mut bytes[at as usize..(at + len) as usize], 4),
            Sealed::None => {}
        }
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
            let _ = img.write(&pattern, off);
            let _ = img.write_zeroes(off, len, input.byte() % 2 == 0);
            let _ = img.discard(off, len);
            let _ = img.flush();
            let _ = img.check(Some(imgloop::RepairMode::All));
        }
        let _ = img.close();
    }
});
