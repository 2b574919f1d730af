//! Test helpers shared by every format: a seeded random generator and a
//! model-based test that runs random write / write-zeroes / discard /
//! flush / reopen sequences against an in-memory model of the disk.
//!
//! A format's tests call [`run_model_test`] with its name and create
//! options; the same sequences then check every driver.

use crate::driver::CreateOptions;
use crate::error::{Error, Result};
use crate::registry;
use crate::storage::MemStorage;
use crate::Image;
use std::sync::Arc;

/// A small deterministic random generator (xorshift64*), so a failing seed
/// reproduces.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The expected content of a disk. Bytes of a discarded range may read as
/// their old value or as zero (discard is advisory).
struct Model {
    data: Vec<u8>,
    loose: Vec<bool>,
}

impl Model {
    /// The first byte of `got` (read at `offset`) the model does not
    /// allow, described.
    fn mismatch(&self, got: &[u8], offset: u64) -> Option<String> {
        for (i, &g) in got.iter().enumerate() {
            let pos = offset as usize + i;
            let want = self.data[pos];
            if g != want && !(self.loose[pos] && g == 0) {
                return Some(format!(
                    "byte at offset {pos}: read {g:#04x}, expected {want:#04x}{}",
                    if self.loose[pos] {
                        " or 0 (discarded)"
                    } else {
                        ""
                    }
                ));
            }
        }
        None
    }

    fn set(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.data[o..o + bytes.len()].copy_from_slice(bytes);
        self.loose[o..o + bytes.len()].fill(false);
    }
}

/// Picks a request: offsets and lengths biased towards the edges of 512 B,
/// 4 KiB and 64 KiB units, so cluster boundaries are crossed often.
fn pick_range(rng: &mut Rng, size: u64) -> (u64, u64) {
    let unit = [1u64, 512, 4096, 65536][rng.below(4) as usize];
    let mut off = rng.below(size / unit) * unit;
    if rng.below(3) == 0 {
        off = (off + rng.below(unit.max(2))).min(size - 1);
    }
    let max = (size - off).min(4 * 65536);
    let len = match rng.below(4) {
        0 => 1 + rng.below(max.min(4096)),
        1 => (1 + rng.below(4)) * unit,
        _ => 1 + rng.below(max),
    }
    .min(size - off)
    .max(1);
    (off, len)
}

/// Runs `ops` random operations on a new image of `format` in memory and
/// compares every read (and the whole disk at the end and after each
/// reopen) with the model. Returns a description of the first mismatch,
/// including the operation log, so the failing seed can be replayed.
pub fn run_model_test(format: &str, create: &CreateOptions, seed: u64, ops: usize) -> Result<()> {
    run_model_test_with(format, create, &[], seed, ops)
}

/// [`run_model_test`] with driver open options (e.g. a tiny
/// `l2-cache-size`, so cache eviction is exercised).
pub fn run_model_test_with(
    format: &str,
    create: &CreateOptions,
    driver_options: &[(&str, &str)],
    seed: u64,
    ops: usize,
) -> Result<()> {
    let fmt = registry::find(format)?;
    let mem = MemStorage::new();
    fmt.create(Arc::new(mem.clone()), None, create)?;
    let options: std::collections::BTreeMap<String, String> = driver_options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let open = |ro: bool| {
        let dopts = crate::driver::DriverOpenOptions {
            options: options.clone(),
            ..crate::driver::DriverOpenOptions::new(ro)
        };
        Image::open_storage_with(Arc::new(mem.clone()), Some(format), &dopts, None)
    };
    let mut img = open(false)?;
    let size = img.size();
    if size == 0 {
        return Err(Error::invalid_argument("model test needs a non-empty disk"));
    }
    let mut model = Model {
        data: vec![0u8; size as usize],
        loose: vec![false; size as usize],
    };
    let mut rng = Rng::new(seed);
    let mut log: Vec<String> = Vec::new();
    let fail = |log: &[String], msg: String| {
        let tail: Vec<&String> = log.iter().rev().take(20).collect();
        Error::corrupt(
            "model test",
            0,
            format!(
                "{format} seed {seed}: {msg}\nlast operations (newest first):\n  {}",
                tail.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
        )
    };
    let verify_all = |img: &Image, model: &Model, log: &[String]| -> Result<()> {
        let mut buf = vec![0u8; size as usize];
        img.read(&mut buf, 0)?;
        model
            .mismatch(&buf, 0)
            .map_or(Ok(()), |m| Err(fail(log, m)))
    };
    for _ in 0..ops {
        let (off, len) = pick_range(&mut rng, size);
        match rng.below(20) {
            0..=6 => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                log.push(format!("write {off} {len}"));
                img.write(&buf, off)?;
                model.set(off, &buf);
            }
            7..=8 => {
                let unmap = rng.below(2) == 0;
                log.push(format!("write_zeroes {off} {len} unmap={unmap}"));
                img.write_zeroes(off, len, unmap)?;
                model.set(off, &vec![0u8; len as usize]);
            }
            9..=10 => {
                log.push(format!("discard {off} {len}"));
                img.discard(off, len)?;
                let o = off as usize;
                model.loose[o..o + len as usize].fill(true);
            }
            11 => {
                log.push("flush".into());
                img.flush()?;
            }
            12 => {
                log.push("close + reopen".into());
                img.close()?;
                drop(img);
                img = open(false)?;
                verify_all(&img, &model, &log)?;
            }
            13 => {
                log.push("reopen read-only, read-write".into());
                img.reopen(true)?;
                if img.write(&[0], 0).is_ok() {
                    return Err(fail(&log, "write accepted while read-only".into()));
                }
                img.reopen(false)?;
            }
            _ => {
                log.push(format!("read {off} {len}"));
                let mut buf = vec![0u8; len as usize];
                img.read(&mut buf, off)?;
                if let Some(m) = model.mismatch(&buf, off) {
                    return Err(fail(&log, m));
                }
            }
        }
    }
    verify_all(&img, &model, &log)?;
    img.close()?;
    drop(img);
    let img = open(true)?;
    verify_all(&img, &model, &log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_per_seed() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..5)
            .scan(Rng::new(8), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn the_model_notices_a_wrong_byte_and_accepts_zero_in_discarded_ranges() {
        let mut m = Model {
            data: vec![5u8; 16],
            loose: vec![false; 16],
        };
        assert!(m.mismatch(&[5, 5], 0).is_none());
        assert!(m.mismatch(&[5, 4], 0).is_some());
        m.loose[3] = true;
        assert!(m.mismatch(&[0], 3).is_none());
        assert!(m.mismatch(&[0], 2).is_some());
        m.set(3, &[9]);
        assert!(m.mismatch(&[0], 3).is_some());
    }

    #[test]
    fn raw_survives_random_operation_sequences() {
        let create = CreateOptions {
            size: 3 << 20,
            ..Default::default()
        };
        for seed in 0..8 {
            run_model_test("raw", &create, seed, 300).unwrap();
        }
    }

    #[test]
    fn raw_with_an_odd_size_survives_random_operation_sequences() {
        let create = CreateOptions {
            size: (1 << 20) + 1234,
            ..Default::default()
        };
        run_model_test("raw", &create, 99, 300).unwrap();
    }
}

#[cfg(test)]
mod qcow2_model_tests {
    use super::*;

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

    #[test]
    fn qcow2_v3_with_default_options_survives_random_sequences() {
        for seed in 0..6 {
            run_model_test("qcow2", &opts(3 << 20, &[]), seed, 250).unwrap();
        }
    }

    #[test]
    fn qcow2_v2_survives_random_sequences() {
        for seed in 0..4 {
            run_model_test("qcow2", &opts(3 << 20, &[("compat", "0.10")]), seed, 250).unwrap();
        }
    }

    #[test]
    fn qcow2_with_small_clusters_and_narrow_refcounts_survives_random_sequences() {
        let o = opts(
            (2 << 20) + 4096,
            &[("cluster_size", "4096"), ("refcount_bits", "1")],
        );
        for seed in 0..4 {
            run_model_test("qcow2", &o, seed, 250).unwrap();
        }
        let o = opts(1 << 20, &[("cluster_size", "512"), ("refcount_bits", "64")]);
        run_model_test("qcow2", &o, 77, 250).unwrap();
    }

    #[test]
    fn qcow2_with_extended_l2_survives_random_sequences() {
        let o = opts(3 << 20, &[("extended_l2", "on"), ("cluster_size", "64k")]);
        for seed in 0..4 {
            run_model_test("qcow2", &o, seed, 250).unwrap();
        }
    }

    #[test]
    fn qcow2_with_caches_of_two_tables_survives_random_sequences() {
        // 4 KiB clusters: one L2 table maps 2 MiB, so a 6 MiB disk needs
        // three; a two-table cache evicts (and writes back) all the time.
        let o = opts(6 << 20, &[("cluster_size", "4096")]);
        let small = [("l2-cache-size", "8k"), ("refcount-cache-size", "8k")];
        for seed in 0..4 {
            run_model_test_with("qcow2", &o, &small, seed, 300).unwrap();
        }
        let o = opts(6 << 20, &[("cluster_size", "16k"), ("extended_l2", "on")]);
        run_model_test_with("qcow2", &o, &small, 11, 300).unwrap();
    }

    #[test]
    fn qcow2_with_2m_clusters_survives_random_sequences() {
        let o = opts(5 << 20, &[("cluster_size", "2M")]);
        run_model_test("qcow2", &o, 3, 150).unwrap();
    }
}
