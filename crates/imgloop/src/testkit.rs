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
    model_test(format, create, driver_options, None, "raw", seed, ops)
}

/// [`run_model_test`] on an image created over a raw backing file with
/// content `backing` (the model starts as that content).
pub fn run_model_test_over(
    format: &str,
    create: &CreateOptions,
    backing: &[u8],
    seed: u64,
    ops: usize,
) -> Result<()> {
    model_test(format, create, &[], Some(backing), "raw", seed, ops)
}

/// [`run_model_test_over`] with a backing file of `backing_format` (a
/// VHDX differencing image needs a VHDX parent).
pub fn run_model_test_over_format(
    format: &str,
    create: &CreateOptions,
    backing: &[u8],
    backing_format: &str,
    seed: u64,
    ops: usize,
) -> Result<()> {
    model_test(
        format,
        create,
        &[],
        Some(backing),
        backing_format,
        seed,
        ops,
    )
}

/// Makes a backing file of `format` at `path` holding `content`.
fn write_backing(path: &std::path::Path, content: &[u8], format: &str) -> Result<()> {
    if format == "raw" {
        return std::fs::write(path, content).map_err(|e| Error::io("writing the backing file", e));
    }
    let create = CreateOptions {
        size: content.len() as u64,
        ..Default::default()
    };
    crate::image::create(path, format, &create)?;
    let img = Image::open(path, &crate::OpenOptions::read_write(Some(format)))?;
    img.write(content, 0)?;
    img.close()
}

/// A new image for a test, in memory: its bytes, the bytes of the data
/// files it names, and its backing image.
struct Made {
    image: Vec<u8>,
    companions: Vec<(String, Vec<u8>)>,
    backing: Option<Arc<Image>>,
}

/// Creates an image of `format`: in memory, or (when it names a data file
/// or is made over `backing` content) in a scratch directory whose files
/// are then read into memory.
fn make_image(
    format: &str,
    create: &CreateOptions,
    backing: Option<(&[u8], &str)>,
    seed: u64,
) -> Result<Made> {
    let fmt = registry::find(format)?;
    let data_file = create.options.get("data_file");
    if data_file.is_none() && backing.is_none() {
        let mem = MemStorage::new();
        fmt.create(Arc::new(mem.clone()), None, create)?;
        return Ok(Made {
            image: mem.to_vec(),
            companions: Vec::new(),
            backing: None,
        });
    }
    // Unique per call: tests run in parallel threads of one process, often
    // with the same seed.
    static NEXT_DIR: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "imgloop-testkit-{}-{seed}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating a scratch directory", e))?;
    let made = (|| {
        let mut create = create.clone();
        // A relative data file name is relative to the working directory
        // (as in qemu-img): name it inside the scratch directory.
        if let Some(name) = data_file {
            create
                .options
                .insert("data_file".into(), dir.join(name).display().to_string());
        }
        let mut backing_image = None;
        if let Some((content, bfmt)) = backing {
            let bpath = dir.join("backing");
            write_backing(&bpath, content, bfmt)?;
            let bytes =
                std::fs::read(&bpath).map_err(|e| Error::io("reading the backing file", e))?;
            backing_image = Some(Arc::new(Image::open_storage(
                Arc::new(MemStorage::from_bytes(&bytes)),
                Some(bfmt),
                true,
                None,
            )?));
            create.backing_file = Some("backing".into());
            create.backing_format = Some(bfmt.into());
        }
        let path = dir.join("image");
        crate::image::create(&path, format, &create)?;
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::io("reading the new image", e))
        };
        let mut companions = Vec::new();
        if let Some(name) = data_file {
            let full = dir.join(name);
            companions.push((full.display().to_string(), read(&full)?));
        }
        Ok(Made {
            image: read(&path)?,
            companions,
            backing: backing_image,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    made
}

fn model_test(
    format: &str,
    create: &CreateOptions,
    driver_options: &[(&str, &str)],
    backing: Option<&[u8]>,
    backing_format: &str,
    seed: u64,
    ops: usize,
) -> Result<()> {
    let made = make_image(format, create, backing.map(|b| (b, backing_format)), seed)?;
    if !made.companions.is_empty() {
        return Err(Error::invalid_argument(
            "the model test does not run images with data files (the power-cut test does)",
        ));
    }
    let mem = MemStorage::from_bytes(&made.image);
    let options: std::collections::BTreeMap<String, String> = driver_options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let open = |ro: bool| {
        let dopts = crate::driver::DriverOpenOptions {
            options: options.clone(),
            secrets: create.secrets.clone(),
            ..crate::driver::DriverOpenOptions::new(ro)
        };
        Image::open_storage_with(
            Arc::new(mem.clone()),
            Some(format),
            &dopts,
            made.backing.clone(),
        )
    };
    let mut img = open(false)?;
    let size = img.size();
    if size == 0 {
        return Err(Error::invalid_argument("model test needs a non-empty disk"));
    }
    let mut data = backing.unwrap_or_default().to_vec();
    data.resize(size as usize, 0);
    let mut model = Model {
        data,
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

/// A cheap content hash of one 512-byte sector (FNV-1a), for the power-cut
/// model.
fn sector_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What each 512-byte sector may read after a power cut: its content at
/// the last completed sync, or any content written to it since.
struct SectorModel {
    current: Vec<u8>,
    allowed: Vec<Vec<u64>>,
}

impl SectorModel {
    fn new(size: u64) -> Self {
        let sectors = size.div_ceil(512) as usize;
        let zero = sector_hash(&[0u8; 512]);
        SectorModel {
            current: vec![0u8; size as usize],
            allowed: vec![vec![zero]; sectors],
        }
    }

    fn hash_of(&self, sector: usize) -> u64 {
        let start = sector * 512;
        let end = (start + 512).min(self.current.len());
        let mut s = [0u8; 512];
        s[..end - start].copy_from_slice(&self.current[start..end]);
        sector_hash(&s)
    }

    /// The disk starts as `img` reads now (its backing file's content).
    fn start_as(&mut self, img: &Image) -> Result<()> {
        self.synced(img)
    }

    /// `bytes` were written at `offset` (sector-aligned).
    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.current[o..o + bytes.len()].copy_from_slice(bytes);
        for sector in o / 512..(o + bytes.len()).div_ceil(512) {
            let h = self.hash_of(sector);
            if !self.allowed[sector].contains(&h) {
                self.allowed[sector].push(h);
            }
        }
    }

    /// A discard: the range may now read as zeroes as well as before.
    fn discard(&mut self, offset: u64, len: u64) {
        let zero = sector_hash(&[0u8; 512]);
        for sector in (offset / 512) as usize..(offset + len).div_ceil(512) as usize {
            if !self.allowed[sector].contains(&zero) {
                self.allowed[sector].push(zero);
            }
        }
    }

    /// After a completed sync only the current content is allowed (for
    /// discarded sectors: the current content, which the next read
    /// settles, or zero).
    fn synced(&mut self, img: &Image) -> Result<()> {
        img.read(&mut self.current, 0)?;
        for sector in 0..self.allowed.len() {
            let h = self.hash_of(sector);
            self.allowed[sector] = vec![h];
        }
        Ok(())
    }

    /// The first sector of `got` (the whole disk) the model does not
    /// allow.
    fn mismatch(&self, got: &[u8]) -> Option<usize> {
        (0..self.allowed.len()).find(|&sector| {
            let start = sector * 512;
            let end = (start + 512).min(got.len());
            let mut s = [0u8; 512];
            s[..end - start].copy_from_slice(&got[start..end]);
            !self.allowed[sector].contains(&sector_hash(&s))
        })
    }
}

/// Options for [`run_power_cut_test`].
#[derive(Clone, Debug)]
pub struct PowerCut {
    /// The format under test.
    pub format: &'static str,
    /// How the image is created (`data_file` is handled: the data file
    /// gets a crash-simulating storage of its own).
    pub create: CreateOptions,
    /// Driver open options (`l2-cache-size`, ...).
    pub driver_options: Vec<(String, String)>,
    /// Random operations to run.
    pub ops: usize,
    /// Crash states to explore at each crash point.
    pub states: u64,
    /// Content of a backing file to create the image over, if any (the
    /// disk starts as it).
    pub backing: Option<Vec<u8>>,
    /// The backing file's format ("raw" unless the format needs its own,
    /// as VHDX differencing images do).
    pub backing_format: &'static str,
    /// Explore every prefix of the write stream since the last sync at
    /// each crash point, instead of `states` sampled states.
    pub prefixes: bool,
}

/// Runs random writes, zero writes, discards and syncs on an image whose
/// files are [`CrashStorage`]s, and at random points (and after every
/// sync) explores `states` power-cut states: each must open, `check` must
/// find no corruption (leaks are allowed), and every 512-byte sector must
/// read as its content at the last completed sync or as something written
/// to it since. So an acknowledged sync is durable and metadata stays
/// consistent in every state the cut can leave, not only in the one a
/// `kill -9` leaves.
pub fn run_power_cut_test(t: &PowerCut, seed: u64) -> Result<()> {
    use crate::storage::{CrashStorage, Storage};
    let made = make_image(
        t.format,
        &t.create,
        t.backing.as_deref().map(|b| (b, t.backing_format)),
        seed,
    )?;
    let image = CrashStorage::from_bytes(&made.image);
    let companions: Vec<(String, CrashStorage)> = made
        .companions
        .iter()
        .map(|(name, bytes)| (name.clone(), CrashStorage::from_bytes(bytes)))
        .collect();
    image.sync()?;
    let options: std::collections::BTreeMap<String, String> =
        t.driver_options.iter().cloned().collect();
    let dopts =
        |ro: bool, storages: &[(String, Arc<dyn Storage>)]| crate::driver::DriverOpenOptions {
            options: options.clone(),
            companions: storages.iter().cloned().collect(),
            secrets: t.create.secrets.clone(),
            ..crate::driver::DriverOpenOptions::new(ro)
        };
    let live: Vec<(String, Arc<dyn Storage>)> = companions
        .iter()
        .map(|(n, s)| (n.clone(), Arc::new(s.clone()) as Arc<dyn Storage>))
        .collect();
    let img = Image::open_storage_with(
        Arc::new(image.clone()),
        Some(t.format),
        &dopts(false, &live),
        made.backing.clone(),
    )?;
    let size = img.size();
    let mut model = SectorModel::new(size);
    model.start_as(&img)?;
    let mut rng = Rng::new(seed);
    let mut log: Vec<String> = Vec::new();
    let fail = |log: &[String], msg: String| {
        let tail: Vec<&str> = log.iter().rev().take(12).map(|s| s.as_str()).collect();
        Error::corrupt(
            "power-cut test",
            0,
            format!(
                "{} seed {seed}: {msg}\nlast operations (newest first):\n  {}",
                t.format,
                tail.join("\n  ")
            ),
        )
    };
    let sectors = size / 512;
    for _ in 0..t.ops {
        let off = rng.below(sectors) * 512;
        let len = ((1 + rng.below(64)) * 512).min(size - off);
        match rng.below(10) {
            0..=4 => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                log.push(format!("write {off} {len}"));
                img.write(&buf, off)?;
                model.write(off, &buf);
            }
            5 => {
                log.push(format!("write_zeroes {off} {len}"));
                img.write_zeroes(off, len, rng.below(2) == 0)?;
                model.write(off, &vec![0u8; len as usize]);
            }
            6 => {
                log.push(format!("discard {off} {len}"));
                img.discard(off, len)?;
                model.discard(off, len);
            }
            _ => {
                log.push("sync".into());
                img.sync()?;
                model.synced(&img)?;
            }
        }
        if rng.below(4) != 0 && log.last().is_none_or(|l| l != "sync") {
            continue;
        }
        let cuts: Vec<(u64, MemStorage)> = if t.prefixes {
            (0..=image.pending())
                .map(|n| (n as u64, image.crash_prefix(n)))
                .collect()
        } else {
            (0..t.states)
                .map(|k| {
                    let state_seed = rng.next_u64() ^ k;
                    (state_seed, image.crash_sample(state_seed))
                })
                .collect()
        };
        for (state_seed, cut_image) in cuts {
            let cut_bytes = cut_image.to_vec();
            let cut: Vec<(String, Arc<dyn Storage>)> = companions
                .iter()
                .map(|(n, s)| {
                    (
                        n.clone(),
                        Arc::new(s.crash_sample(state_seed ^ 1)) as Arc<dyn Storage>,
                    )
                })
                .collect();
            let after = Image::open_storage_with(
                Arc::new(cut_image),
                Some(t.format),
                &dopts(true, &cut),
                made.backing.clone(),
            )
            .map_err(|e| fail(&log, format!("state {state_seed:#x} does not open: {e}")))?;
            match after.check(None) {
                // A journal that needs replay (VHDX) shows as a corruption
                // of the read-only open: after the replay a read-write
                // open does, the image must be clean and read the same.
                Ok(r) if r.corruptions > 0 && r.check_errors == 0 => {
                    let copy = MemStorage::from_bytes(&cut_bytes);
                    let rw = Image::open_storage_with(
                        Arc::new(copy),
                        Some(t.format),
                        &dopts(false, &cut),
                        made.backing.clone(),
                    )
                    .map_err(|e| {
                        fail(
                            &log,
                            format!("state {state_seed:#x} does not open read-write: {e}"),
                        )
                    })?;
                    let again = rw.check(None)?;
                    if again.corruptions > 0 || again.check_errors > 0 {
                        return Err(fail(
                            &log,
                            format!("state {state_seed:#x} is corrupt: {:?}", r.messages),
                        ));
                    }
                    let mut got = vec![0u8; size as usize];
                    rw.read(&mut got, 0)?;
                    if let Some(sector) = model.mismatch(&got) {
                        return Err(fail(
                            &log,
                            format!(
                                "state {state_seed:#x}: after replay, sector {sector} reads wrong"
                            ),
                        ));
                    }
                }
                Ok(r) if r.check_errors > 0 => {
                    return Err(fail(
                        &log,
                        format!("state {state_seed:#x} is corrupt: {:?}", r.messages),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == crate::ErrorKind::Unsupported => {}
                Err(e) => {
                    return Err(fail(
                        &log,
                        format!("state {state_seed:#x}: check failed: {e}"),
                    ))
                }
            }
            let mut got = vec![0u8; size as usize];
            after.read(&mut got, 0)?;
            if let Some(sector) = model.mismatch(&got) {
                return Err(fail(
                    &log,
                    format!(
                        "state {state_seed:#x}: sector {sector} (offset {}) reads neither its synced content nor anything written since",
                        sector * 512
                    ),
                ));
            }
        }
    }
    img.close()?;
    Ok(())
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

#[cfg(test)]
mod power_cut_tests {
    use super::*;

    fn case(
        format: &'static str,
        size: u64,
        kv: &[(&str, &str)],
        driver: &[(&str, &str)],
    ) -> PowerCut {
        let mut create = CreateOptions {
            size,
            ..Default::default()
        };
        for (k, v) in kv {
            create.options.insert(k.to_string(), v.to_string());
        }
        PowerCut {
            format,
            create,
            driver_options: driver
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ops: 120,
            states: 4,
            backing: None,
            backing_format: "raw",
            prefixes: false,
        }
    }

    #[test]
    fn raw_survives_every_explored_power_cut() {
        let t = case("raw", 1 << 20, &[], &[]);
        for seed in 0..3 {
            run_power_cut_test(&t, seed).unwrap();
        }
    }

    #[test]
    fn qcow2_survives_every_explored_power_cut() {
        let t = case("qcow2", 2 << 20, &[("cluster_size", "4k")], &[]);
        for seed in 0..3 {
            run_power_cut_test(&t, seed).unwrap();
        }
    }

    #[test]
    fn qcow2_with_tiny_caches_and_small_clusters_survives_power_cuts() {
        // A two-table cache flushes in the middle of requests.
        let t = case(
            "qcow2",
            2 << 20,
            &[("cluster_size", "1k"), ("refcount_bits", "8")],
            &[("l2-cache-size", "2k"), ("refcount-cache-size", "2k")],
        );
        for seed in 0..3 {
            run_power_cut_test(&t, seed).unwrap();
        }
    }

    #[test]
    fn qcow2_variants_survive_power_cuts() {
        for kv in [
            &[("extended_l2", "on"), ("cluster_size", "16k")][..],
            &[("lazy_refcounts", "on")][..],
            &[("compat", "0.10"), ("cluster_size", "4k")][..],
            &[("data_file", "data.raw"), ("cluster_size", "4k")][..],
        ] {
            let t = case("qcow2", 2 << 20, kv, &[]);
            for seed in 0..2 {
                run_power_cut_test(&t, seed).unwrap_or_else(|e| panic!("{kv:?}: {e}"));
            }
        }
    }
}
