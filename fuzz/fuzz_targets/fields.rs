//! Shared by the typed-field fuzz targets: reading the fuzzer's input as
//! choices, and the extreme values that break offset arithmetic.

// Each target uses part of it.
#![allow(dead_code)]

/// Reads the input a few bytes at a time; zeroes once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |v, _| (v << 8) | self.byte() as u64)
    }
}

/// Byte order of a format's fields.
#[derive(Clone, Copy)]
pub enum Order {
    Big,
    Little,
}

/// The `width`-byte field at `at` (0 when it lies outside `bytes`).
pub fn get(bytes: &[u8], at: u64, width: u8, order: Order) -> u64 {
    let at = at as usize;
    let Some(b) = bytes.get(at..at + width as usize) else {
        return 0;
    };
    match order {
        Order::Big => b.iter().fold(0u64, |v, &x| (v << 8) | x as u64),
        Order::Little => b.iter().rev().fold(0u64, |v, &x| (v << 8) | x as u64),
    }
}

/// Sets the `width`-byte field at `at` (nothing when outside `bytes`).
pub fn put(bytes: &mut [u8], at: u64, width: u8, value: u64, order: Order) {
    let at = at as usize;
    let Some(dst) = bytes.get_mut(at..at + width as usize) else {
        return;
    };
    for (i, d) in dst.iter_mut().enumerate() {
        let shift = match order {
            Order::Big => 8 * (width as usize - 1 - i),
            Order::Little => 8 * i,
        };
        *d = (value >> shift) as u8;
    }
}

/// A value chosen by the input among the extremes that break offset
/// math: 0, 1, edges of the format's `unit` (cluster, sector), the file
/// length, 2^31, 2^32, 2^61 to 2^64 - 1, values near `old`, or raw input
/// bytes.
pub fn extreme(input: &mut Input, unit: u64, file_len: u64, old: u64) -> u64 {
    let k = input.byte() as u64 % 16;
    match input.byte() % 20 {
        0 => 0,
        1 => 1,
        2 => unit - 1,
        3 => unit,
        4 => unit + 1,
        5 => file_len,
        6 => file_len.wrapping_sub(k),
        7 => file_len + k * unit,
        8 => (1 << 31) - 1 + k,
        9 => (1 << 32) - 1 + k,
        10 => (1 << 61) - k,
        11 => (1 << 62) + k,
        12 => (1 << 63) - 1 - k,
        13 => 1 << 63,
        14 => u64::MAX - k,
        15 => old.wrapping_add(k),
        16 => old.wrapping_sub(k),
        17 => old ^ (1 << (input.byte() % 64)),
        18 => old.wrapping_mul(unit),
        _ => input.u64(),
    }
}

/// Sets the field to an extreme value that fits its width.
pub fn mutate(input: &mut Input, bytes: &mut [u8], field: (u64, u8), unit: u64, order: Order) {
    let (at, width) = field;
    let old = get(bytes, at, width, order);
    let v = extreme(input, unit, bytes.len() as u64, old);
    let v = if width == 8 {
        v
    } else {
        v & ((1u64 << (8 * width as u32)) - 1)
    };
    put(bytes, at, width, v, order);
}

/// What every typed-field target does with a read-only open: walks block
/// status over at most `walk` bytes (4096 calls at most), reads the first
/// `read` bytes, asks for info (and a check when `check`), closes.
pub fn exercise_read_only(img: &imgloop::Image, walk: u64, read: u64, check: bool) {
    let size = img.size().min(walk);
    let mut pos = 0;
    let mut calls = 0;
    while pos < size && calls < 4096 {
        calls += 1;
        match img.block_status(pos, size - pos) {
            Ok(s) => pos += s.len,
            Err(_) => break,
        }
    }
    let mut buf = vec![0u8; 65536];
    let mut pos = 0;
    while pos < size.min(read) {
        let n = (size - pos).min(65536) as usize;
        let _ = img.read(&mut buf[..n], pos);
        pos += n as u64;
    }
    let _ = img.info();
    if check {
        let _ = img.check(None);
    }
    let _ = img.close();
}
