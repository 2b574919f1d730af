//! Fuzz target: a sequence of operations on a small raw image in memory,
//! checked against a plain byte-vector model.
//!
//! Input layout: two bytes of initial size, then operations, each an opcode
//! byte followed by its arguments (see `Op`). Decoding stops quietly when the
//! input runs out.
//!
//! The model keeps, besides the expected bytes, which bytes were discarded
//! and not written since: those may read back either as their old value or
//! as zero. The first read of such a byte settles it.

#![no_main]

use imgloop::storage::MemStorage;
use imgloop::{CreateOptions, Image, Preallocation};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// Largest image the operations create.
const MAX_SIZE: u64 = 256 << 10;
/// Requests may reach this far past the end (to exercise bounds checks).
const SLACK: u64 = 8192;
/// Longest single request.
const MAX_LEN: u64 = 128 << 10;
/// Operations run at most.
const MAX_OPS: usize = 4096;

/// A cursor over the fuzz input.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    /// A little-endian number of `n` bytes.
    fn num(&mut self, n: usize) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.byte()?) << (8 * i);
        }
        Some(v)
    }

    /// An offset, mostly inside the disk, sometimes a little past it.
    fn offset(&mut self, size: u64) -> Option<u64> {
        Some(self.num(3)? % (size + SLACK))
    }

    /// A request length; small lengths and page multiples are common.
    fn len(&mut self) -> Option<u64> {
        let sel = self.byte()?;
        let raw = self.num(2)?;
        Some(match sel % 4 {
            0 => raw % 64,
            1 => (raw % 32) * 4096,
            2 => raw % MAX_LEN,
            _ => raw * 2 % MAX_LEN,
        })
    }
}

struct Model {
    bytes: Vec<u8>,
    /// Discarded and not rewritten since: reads back as the old value or zero.
    maybe_zero: Vec<bool>,
}

impl Model {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }

    fn write(&mut self, data: &[u8], offset: u64) {
        let r = Self::range(offset, data.len() as u64);
        self.bytes[r.clone()].copy_from_slice(data);
        self.maybe_zero[r].fill(false);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let r = Self::range(offset, len);
        self.bytes[r.clone()].fill(0);
        self.maybe_zero[r].fill(false);
    }

    fn discard(&mut self, offset: u64, len: u64) {
        let r = Self::range(offset, len);
        self.maybe_zero[r].fill(true);
    }

    fn resize(&mut self, new_size: u64) {
        self.bytes.resize(new_size as usize, 0);
        self.maybe_zero.resize(new_size as usize, false);
    }

    /// Checks what a read returned and settles discarded bytes.
    fn check_read(&mut self, got: &[u8], offset: u64) {
        let r = Self::range(offset, got.len() as u64);
        if !self.maybe_zero[r.clone()].contains(&true) {
            // Fast path: nothing uncertain, the bytes must match exactly.
            if got != &self.bytes[r] {
                let i = got
                    .iter()
                    .zip(&self.bytes[offset as usize..])
                    .position(|(g, w)| g != w)
                    .unwrap_or(0);
                panic!(
                    "byte at {} reads {:#04x}, the model has {:#04x}",
                    offset as usize + i,
                    got[i],
                    self.bytes[offset as usize + i]
                );
            }
            return;
        }
        for (i, &g) in got.iter().enumerate() {
            let at = offset as usize + i;
            let want = self.bytes[at];
            if self.maybe_zero[at] {
                assert!(
                    g == want || g == 0,
                    "discarded byte at {at} reads {g:#04x}, expected {want:#04x} or zero"
                );
                self.bytes[at] = g;
                self.maybe_zero[at] = false;
            } else {
                assert_eq!(g, want, "byte at {at} differs from the model");
            }
        }
    }

    /// True when every byte of the range may read as zero.
    fn may_be_zero(&self, offset: u64, len: u64) -> bool {
        Self::range(offset, len).all(|i| self.bytes[i] == 0 || self.maybe_zero[i])
    }
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(0x9d)) | 1)
        .collect()
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read(&mut buf, 0).expect("reading the whole image");
    buf
}

fn run(input: &mut Input) -> Option<()> {
    let initial = input.num(2)? * 16 % (MAX_SIZE + 1);
    let mem = MemStorage::new();
    let opts = CreateOptions {
        size: initial,
        ..Default::default()
    };
    imgloop::registry::find("raw")
        .expect("raw format")
        .create(Arc::new(mem.clone()), None, &opts)
        .expect("creating a raw image in memory");
    let img = Image::open_storage(Arc::new(mem.clone()), Some("raw"), false, None)
        .expect("opening the new raw image");
    let mut model = Model {
        bytes: vec![0u8; initial as usize],
        maybe_zero: vec![false; initial as usize],
    };

    for _ in 0..MAX_OPS {
        // Running out of input ends the sequence; the final checks still run.
        if step(input, &img, &mut model).is_none() {
            break;
        }
        assert_eq!(
            img.size(),
            model.size(),
            "image size differs from the model"
        );
    }

    // The whole disk, then again after closing and reopening the storage.
    let all = read_all(&img);
    model.check_read(&all, 0);
    img.close().expect("close");
    let again = Image::open_storage(Arc::new(mem), Some("raw"), true, None).expect("reopen");
    assert_eq!(again.size(), model.size(), "size changed across reopen");
    assert_eq!(
        read_all(&again),
        model.bytes,
        "content changed across reopen"
    );
    Some(())
}

/// Decodes and runs one operation; `None` when the input ran out.
fn step(input: &mut Input, img: &Image, model: &mut Model) -> Option<()> {
    let op = input.byte()?;
    let size = model.size();
    match op % 7 {
        // write
        0 => {
            let offset = input.offset(size)?;
            let len = input.len()?;
            let data = pattern(input.byte()?, len);
            let r = img.write(&data, offset);
            if model.in_bounds(offset, len) {
                r.unwrap_or_else(|e| panic!("write {offset}+{len} failed: {e}"));
                model.write(&data, offset);
            } else {
                assert!(r.is_err(), "write {offset}+{len} past {size} succeeded");
            }
        }
        // write_zeroes
        1 => {
            let offset = input.offset(size)?;
            let len = input.len()?;
            let may_unmap = input.byte()? & 1 == 1;
            let r = img.write_zeroes(offset, len, may_unmap);
            if model.in_bounds(offset, len) {
                r.unwrap_or_else(|e| panic!("write_zeroes {offset}+{len} failed: {e}"));
                model.zero(offset, len);
            } else {
                assert!(
                    r.is_err(),
                    "write_zeroes {offset}+{len} past {size} succeeded"
                );
            }
        }
        // discard
        2 => {
            let offset = input.offset(size)?;
            let len = input.len()?;
            let r = img.discard(offset, len);
            if model.in_bounds(offset, len) {
                r.unwrap_or_else(|e| panic!("discard {offset}+{len} failed: {e}"));
                model.discard(offset, len);
            } else {
                assert!(r.is_err(), "discard {offset}+{len} past {size} succeeded");
            }
        }
        // read
        3 => {
            let offset = input.offset(size)?;
            let len = input.len()?;
            let mut buf = vec![0u8; len as usize];
            let r = img.read(&mut buf, offset);
            if model.in_bounds(offset, len) {
                r.unwrap_or_else(|e| panic!("read {offset}+{len} failed: {e}"));
                model.check_read(&buf, offset);
            } else {
                assert!(r.is_err(), "read {offset}+{len} past {size} succeeded");
            }
        }
        // flush
        4 => {
            img.flush().expect("flush");
        }
        // resize
        5 => {
            let new_size = input.num(3)? % (MAX_SIZE + 1);
            let flags = input.byte()?;
            let allow_shrink = flags & 1 == 1;
            let prealloc = match (flags >> 1) % 4 {
                0 => Preallocation::Off,
                1 => Preallocation::Falloc,
                2 => Preallocation::Full,
                _ => Preallocation::Metadata,
            };
            let r = img.resize(new_size, prealloc, allow_shrink);
            let should_work = (new_size >= size || allow_shrink)
                && (prealloc != Preallocation::Metadata || new_size <= size);
            match r {
                Ok(()) => {
                    assert!(
                        new_size >= size || allow_shrink,
                        "shrink from {size} to {new_size} without allow_shrink succeeded"
                    );
                    model.resize(new_size);
                }
                Err(e) => {
                    assert!(
                        !should_work,
                        "resize {size} -> {new_size} ({prealloc:?}) failed: {e}"
                    );
                }
            }
        }
        // block status: ranges reported as zero must be zero in the model
        _ => {
            if size == 0 {
                assert!(img.block_status(0, 1).is_err());
                return Some(());
            }
            let offset = input.num(3)? % size;
            let max = input.len()?.max(1);
            let st = img
                .block_status(offset, max)
                .unwrap_or_else(|e| panic!("block status at {offset} failed: {e}"));
            assert!(st.len >= 1 && st.len <= max.min(size - offset));
            assert!(st.allocated, "raw reports every range allocated");
            if st.zero {
                assert!(
                    model.may_be_zero(offset, st.len),
                    "block status says {offset}+{} is zero, the model disagrees",
                    st.len
                );
            }
        }
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let _ = run(&mut input);
});
