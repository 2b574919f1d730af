//! `imgloop convert`: copy an image, possibly into another format.
//!
//! The source is walked by block status first: ranges that read as zeroes
//! anywhere in the chain are never read, and are not written to a new
//! target. Data is copied by `-m` worker threads in chunks; zero runs of at
//! least `-S` bytes inside data are detected and skipped too. Raw to raw
//! writes the non-zero runs with `copy_file_range`, so the kernel moves the
//! bytes (and reflinks them where the filesystem can); with `-S 0` whole
//! allocated extents go that way without being read into user space.

use crate::common::{fail, parse_options};
use crate::progress::Progress;
use imgloop::size::parse_size;
use imgloop::storage::{copy_file_range_all, is_zero};
use imgloop::{CreateOptions, Error, Image, Mapping, OpenOptions, Result, StorageId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Largest piece one worker copies at a time.
const CHUNK: u64 = 2 << 20;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop convert -O raw disk.img copy.img
  imgloop convert -p -f raw -O raw -S 64k big.img sparse-copy.img
  imgloop convert -n -O raw disk.img /dev/sdX")]
pub struct Args {
    /// Source format (probed when not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Target format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Target format options, `key=value[,...]`.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Write compressed data (formats that support it).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Minimum run of zero bytes treated as sparse (default 4k; 0 writes
    /// everything, fully allocating the target).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Do not create the target; it must exist and be large enough.
    #[arg(short = 'n')]
    no_create: bool,
    /// Number of parallel workers (default: the number of CPUs, 2 to 8).
    #[arg(short = 'm', value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: Option<u32>,
    /// Allow out-of-order writes to the target (faster; the target's
    /// layout then depends on thread timing).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Copy an internal snapshot of the source instead of its current
    /// disk: `snapshot.id=ID,snapshot.name=NAME`, or an ID or name.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Create the target with this backing file (as `-o backing_file=`):
    /// only what differs from it is written.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the `-B` backing file.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// The existing target (`-n`) already reads as zeroes: zero ranges
    /// are not written.
    #[arg(long)]
    target_is_zero: bool,
    /// Source cache mode (accepted for qemu-img compatibility; imgloop
    /// reads through the page cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Unreadable ranges of the source are written as zeroes (with a
    /// warning each) instead of ending the copy.
    #[arg(long)]
    salvage: bool,
    /// Rate limit in bytes per second (suffixes k, M, G).
    #[arg(short = 'r', value_name = "RATE")]
    rate: Option<String>,
    /// Copy offloading (`copy_file_range`, which also reflinks where the
    /// filesystem can): used wherever source and target store data
    /// plainly (raw to raw today), with or without this flag; refused with
    /// `-c`, `-S` and `--salvage`, as qemu-img does.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// Also copy the persistent dirty bitmaps of the source (qcow2 to
    /// qcow2), with their granularity and enabled state.
    #[arg(long)]
    bitmaps: bool,
    /// With `--bitmaps`: skip inconsistent (in-use) bitmaps with a
    /// warning instead of failing.
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// Open the source without taking locks.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Target cache mode: `unsafe` (default, as qemu-img convert: no final
    /// sync), or `writeback`, `none`, `writethrough`, `directsync` (all make
    /// the target durable before exiting).
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// `--object` and `--image-opts` (which applies to the source).
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// Source image.
    source: PathBuf,
    /// Target image.
    target: PathBuf,
}

/// One unit of work: a range that is either all zero or holds data.
#[derive(Clone, Copy, Debug)]
struct Job {
    offset: u64,
    len: u64,
    zero: bool,
}

pub fn run(a: Args) -> u8 {
    match convert(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn plan(src: &Image) -> Result<Vec<Job>> {
    let size = src.size();
    let mut jobs = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (st, _) = src.block_status_chain(pos, size - pos)?;
        let zero = st.zero;
        let end = pos + st.len;
        if zero {
            match jobs.last_mut() {
                Some(Job {
                    zero: true,
                    offset,
                    len,
                }) if *offset + *len == pos => *len += st.len,
                _ => jobs.push(Job {
                    offset: pos,
                    len: st.len,
                    zero: true,
                }),
            }
            pos = end;
            continue;
        }
        // Data: cut on the CHUNK grid so pieces line up with target clusters.
        while pos < end {
            let next = ((pos / CHUNK) + 1) * CHUNK;
            let piece_end = next.min(end);
            jobs.push(Job {
                offset: pos,
                len: piece_end - pos,
                zero: false,
            });
            pos = piece_end;
        }
    }
    Ok(jobs)
}

/// Jobs of exactly `grid` bytes (the last one may be shorter): a piece is
/// a zero job only when all of it reads as zeroes.
fn plan_aligned(src: &Image, grid: u64) -> Result<Vec<Job>> {
    let size = src.size();
    let mut jobs: Vec<Job> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let end = (pos + grid).min(size);
        let mut zero = true;
        let mut p = pos;
        while p < end && zero {
            let (st, _) = src.block_status_chain(p, end - p)?;
            zero = st.zero;
            p += st.len;
        }
        match jobs.last_mut() {
            Some(j) if zero && j.zero => j.len += end - pos,
            _ => jobs.push(Job {
                offset: pos,
                len: end - pos,
                zero,
            }),
        }
        pos = end;
    }
    Ok(jobs)
}

/// The flag combinations qemu-img refuses before opening anything.
fn check_flags(a: &Args) -> Result<()> {
    let refuse = |msg: &'static str| Err(Error::invalid_argument(msg));
    if a.skip_broken_bitmaps && !a.bitmaps {
        return refuse("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if a.copy_range && a.compress {
        return refuse("Cannot enable copy offloading when -c is used");
    }
    if a.copy_range && a.sparse.is_some() {
        return refuse("Cannot enable copy offloading when -S is used");
    }
    if a.copy_range && a.salvage {
        return refuse("Cannot use copy offloading in salvaging mode");
    }
    Ok(())
}

/// The persistent bitmaps of `src` that `--bitmaps` copies: (name,
/// granularity, enabled). An inconsistent one fails the command, or is
/// left out with a warning under `--skip-broken-bitmaps`.
fn bitmaps_to_copy(a: &Args, src: &Image) -> Result<Vec<(String, u64, bool)>> {
    let Some(q) = bitmap_capable(src) else {
        return Err(Error::unsupported("Source lacks bitmap support").in_file(&a.source));
    };
    let mut out = Vec::new();
    for b in q.bitmaps.unwrap_or_default() {
        let flag = |f: &str| b.flags.iter().any(|x| x == f);
        if flag("in-use") {
            if a.skip_broken_bitmaps {
                eprintln!(
                    "imgloop: warning: Skipping inconsistent bitmap '{}'",
                    b.name
                );
                continue;
            }
            return Err(Error::invalid_argument(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use \
                 'qemu-img bitmap --remove' to delete it",
                b.name
            )));
        }
        out.push((b.name, b.granularity, flag("auto")));
    }
    Ok(out)
}

/// The qcow2 facts of an image that keeps persistent bitmaps (qcow2
/// version 3); `None` for any other.
fn bitmap_capable(img: &Image) -> Option<imgloop::driver::Qcow2Specific> {
    match img.info().format_specific {
        Some(imgloop::driver::FormatSpecific::Qcow2(q)) if q.compat == "1.1" => Some(q),
        _ => None,
    }
}

/// Adds each bitmap to `dst` and sets the bits `src` has.
fn copy_bitmaps(src: &Image, dst: &Image, list: &[(String, u64, bool)]) -> Result<()> {
    for (name, granularity, enabled) in list {
        let bits = src.bitmap_read(name)?;
        dst.bitmap(&imgloop::driver::BitmapOp::Add {
            name: name.clone(),
            granularity: Some(*granularity),
            enabled: *enabled,
        })?;
        dst.bitmap(&imgloop::driver::BitmapOp::Merge {
            target: name.clone(),
            source: bits,
        })?;
    }
    Ok(())
}

fn convert(a: &Args) -> Result<()> {
    check_flags(a)?;
    let secrets = a.objects.secrets()?;
    let mut spec = a.objects.spec(&a.source, a.format.as_deref())?;
    if let Some(l) = &a.snapshot {
        spec.options.extend(crate::common::snapshot_options(l)?);
    }
    let src = crate::common::open_with(
        &spec.path,
        &OpenOptions {
            format: spec.format,
            read_only: true,
            force_share: a.force_share,
            driver_options: spec.options,
            secrets: secrets.clone(),
            policy: imgloop::FilePolicy::like_qemu_img(),
            ..Default::default()
        },
    )?;
    let sync_at_end = match a.cache.as_str() {
        "unsafe" => false,
        "writeback" | "none" | "writethrough" | "directsync" => true,
        other => {
            return Err(Error::invalid_argument(format!(
                "invalid cache mode '{other}' (expected unsafe, writeback, none, writethrough or directsync)"
            )))
        }
    };
    let sparse = match &a.sparse {
        Some(s) => parse_size(s)?,
        None => 4096,
    };
    let mut options = parse_options(&a.options)?;
    if let Some(c) = &a.source_cache {
        crate::common::check_cache_mode(c, true)?;
    }
    if let Some(b) = &a.backing {
        options.insert("backing_file".into(), b.clone());
        match &a.backing_format {
            Some(f) => {
                options.insert("backing_fmt".into(), f.clone());
            }
            None if !options.contains_key("backing_fmt") => {
                return Err(Error::invalid_argument(
                    "Use of backing file requires explicit backing format",
                ))
            }
            None => {}
        }
    } else if a.backing_format.is_some() {
        options.insert(
            "backing_fmt".into(),
            a.backing_format.clone().unwrap_or_default(),
        );
    }
    if a.target_is_zero && !a.no_create {
        return Err(Error::invalid_argument(
            "--target-is-zero requires use of -n flag",
        ));
    }
    // The target must not be a file the source reads: creating it would
    // truncate the source (or its backing or data file), and writing it
    // would overwrite data still to be copied.
    if let Some(f) = src
        .files()
        .iter()
        .find(|f| imgloop::image::same_file(f, &a.target))
    {
        return Err(Error::invalid_argument(format!(
            "the target is the same file as '{}', which the source reads",
            f.display()
        ))
        .in_file(&a.target));
    }
    let bitmaps = if a.bitmaps {
        let list = bitmaps_to_copy(a, &src)?;
        // Refused before the target is made (qemu-img creates it first).
        let v2 = options
            .get("compat")
            .is_some_and(|c| matches!(c.as_str(), "0.10" | "v2"));
        if !a.no_create && (a.out_format != "qcow2" || v2) {
            return Err(Error::unsupported(format!(
                "Format driver '{}' does not support bitmaps",
                a.out_format
            ))
            .in_file(&a.target));
        }
        list
    } else {
        Vec::new()
    };
    // The target is opened with the key it is created with.
    let mut target_options = BTreeMap::new();
    if let Some(id) = options.get("encrypt.key-secret") {
        target_options.insert("encrypt.key-secret".to_string(), id.clone());
    }
    if !a.no_create {
        let opts = CreateOptions {
            size: src.size(),
            options,
            secrets: secrets.clone(),
            ..Default::default()
        };
        imgloop::create(&a.target, &a.out_format, &opts)?;
    } else if !options.is_empty() {
        return Err(Error::invalid_argument(
            "-o cannot be used with -n (the target is not created)",
        ));
    }
    let dst = crate::common::open_with(
        &a.target,
        &OpenOptions {
            unsafe_cache: !sync_at_end,
            policy: imgloop::FilePolicy::like_qemu_img(),
            driver_options: target_options,
            secrets,
            ..OpenOptions::read_write(Some(&a.out_format))
        },
    )?;
    if dst.size() < src.size() {
        return Err(Error::invalid_argument(format!(
            "target is smaller ({} bytes) than the source ({} bytes)",
            dst.size(),
            src.size()
        ))
        .in_file(&a.target));
    }
    if a.bitmaps && bitmap_capable(&dst).is_none() {
        return Err(Error::unsupported(format!(
            "Format driver '{}' does not support bitmaps",
            dst.format()
        ))
        .in_file(&a.target));
    }
    if a.compress && dst.compression_unit().is_none() {
        return Err(
            Error::unsupported("Compression not supported for this file format").in_file(&a.target),
        );
    }
    // A freshly created image reads as zeroes: zero ranges need no writes.
    let target_zero = (!a.no_create || a.target_is_zero) && dst.backing().is_none();
    let copy_offload = src.format() == "raw"
        && dst.format() == "raw"
        && !a.compress
        && src.file_storage().as_file().is_some()
        && dst.file_storage().as_file().is_some();

    let jobs = if a.compress {
        // Compressed clusters are written whole: plan on a grid of whole
        // clusters, reading the zero parts of partly used ones too.
        let unit = dst.compression_unit().unwrap_or(CHUNK);
        plan_aligned(&src, CHUNK.max(unit) / unit * unit)?
    } else {
        plan(&src)?
    };
    let progress = Progress::new(a.progress && !a.quiet, src.size());
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let wanted = a.workers.map_or(cpus.clamp(2, 8), |w| w as usize);
    let workers = wanted.min(jobs.len()).max(1);
    let ctx = Copier {
        // Finished pieces waiting for their turn, at most this many (memory).
        max_waiting: 2 * workers,
        src: &src,
        dst: &dst,
        sparse,
        target_zero,
        copy_offload,
        compress: a.compress,
        // Workers read and compress in parallel; the writes (and with
        // them the allocation of host space) happen in guest order, so
        // the target is the same whatever the number of workers.
        ordered: !a.out_of_order,
        next_job: AtomicUsize::new(0),
        queue: Mutex::new(Queue::default()),
        turn: Condvar::new(),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        salvage: a.salvage,
        rate: match &a.rate {
            Some(r) => Some(parse_size(r)?.max(1)),
            None => None,
        },
        start: std::time::Instant::now(),
        copied: std::sync::atomic::AtomicU64::new(0),
        progress: &progress,
        jobs: &jobs,
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| ctx.worker());
        }
    });
    if let Some(e) = ctx.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    copy_bitmaps(&src, &dst, &bitmaps)?;
    progress.finish();
    dst.sync()?;
    dst.close()?;
    Ok(())
}

struct Copier<'a> {
    src: &'a Image,
    dst: &'a Image,
    sparse: u64,
    target_zero: bool,
    copy_offload: bool,
    compress: bool,
    ordered: bool,
    next_job: AtomicUsize,
    queue: Mutex<Queue>,
    /// Signalled when the queue's writer moved on or a worker failed.
    turn: Condvar,
    max_waiting: usize,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    progress: &'a Progress,
    jobs: &'a [Job],
    /// `--salvage`: unreadable source ranges become zeroes (with a warning).
    salvage: bool,
    /// `-r`: at most this many bytes per second, counted from `start`.
    rate: Option<u64>,
    start: std::time::Instant,
    copied: std::sync::atomic::AtomicU64,
}

/// Pieces read (and compressed) ahead, waiting to be written in job order.
#[derive(Default)]
struct Queue {
    /// The job whose write is next.
    next: usize,
    /// Finished jobs after `next`.
    ready: BTreeMap<usize, Work>,
    /// A worker is writing queued pieces right now.
    writing: bool,
}

/// A job read and prepared, to be written.
enum Work {
    /// All zeroes.
    Zero(Job),
    /// Copied in the kernel from the raw source at this host offset.
    Offload(Job, u64),
    /// Plain data (with the raw source's host offset for copy offload).
    Data(Job, Vec<u8>, Option<u64>),
    /// Data compressed unit by unit.
    Packed(Job, Vec<u8>, Vec<Packed>),
}

impl Copier<'_> {
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(e);
        self.turn.notify_all();
    }

    fn worker(&self) {
        loop {
            if self.ordered && !self.wait_for_room() {
                return;
            }
            let i = self.next_job.fetch_add(1, Ordering::Relaxed);
            if i >= self.jobs.len() || self.failed.load(Ordering::Relaxed) {
                return;
            }
            let job = self.jobs[i];
            match self.prepare(job) {
                Ok(work) => self.deliver(i, work),
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Waits while too many finished pieces wait for their turn; false
    /// when the copy failed.
    fn wait_for_room(&self) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while q.ready.len() >= self.max_waiting && !self.failed.load(Ordering::Relaxed) {
            q = self.turn.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        !self.failed.load(Ordering::Relaxed)
    }

    /// Hands a finished piece over. Without -W it is queued, and whoever
    /// finds the next piece ready writes the queue out in job order, so
    /// the target's layout does not depend on which thread was faster.
    fn deliver(&self, i: usize, work: Work) {
        if !self.ordered {
            let len = work.job().len;
            return match self.write(work) {
                Ok(()) => self.progress.add(len),
                Err(e) => self.fail(e),
            };
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.ready.insert(i, work);
        if q.writing {
            return;
        }
        q.writing = true;
        loop {
            let next = q.next;
            let Some(work) = q.ready.remove(&next) else {
                q.writing = false;
                return;
            };
            drop(q);
            let len = work.job().len;
            let result = self.write(work);
            q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.next += 1;
            self.turn.notify_all();
            match result {
                Ok(()) => self.progress.add(len),
                Err(e) => {
                    q.writing = false;
                    drop(q);
                    return self.fail(e);
                }
            }
        }
    }

    /// Reads (and compresses) one job; no writes.
    fn prepare(&self, job: Job) -> Result<Work> {
        if job.zero {
            return Ok(Work::Zero(job));
        }
        // Raw to raw: the source bytes sit at a host offset of a plain
        // file, so the kernel can copy them (and reflink where it can).
        let src_host = match self.copy_offload {
            true => match self.src.driver().map(job.offset, job.len)? {
                (
                    Mapping::Data {
                        storage: StorageId::IMAGE,
                        offset,
                    },
                    n,
                ) if n >= job.len => Some(offset),
                _ => None,
            },
            false => None,
        };
        if let (Some(h), 0) = (src_host, self.sparse) {
            return Ok(Work::Offload(job, h));
        }
        let mut data = vec![0u8; job.len as usize];
        match self.src.read(&mut data, job.offset) {
            Ok(()) => {}
            Err(e) if self.salvage => self.salvage_read(&mut data, job.offset, e),
            Err(e) => return Err(e),
        }
        if self.compress {
            let packed = self.compress_units(&data, job.offset)?;
            return Ok(Work::Packed(job, data, packed));
        }
        Ok(Work::Data(job, data, src_host))
    }

    /// `--salvage`: reads `data` (guest `offset`) in 64 KiB pieces; the
    /// pieces that fail read as zeroes, each with a warning.
    fn salvage_read(&self, data: &mut [u8], offset: u64, first: Error) {
        eprintln!("imgloop: warning: error while reading at offset {offset}: {first}; salvaging");
        const PIECE: usize = 65536;
        for (i, piece) in data.chunks_mut(PIECE).enumerate() {
            let at = offset + (i * PIECE) as u64;
            if let Err(e) = self.src.read(piece, at) {
                eprintln!(
                    "imgloop: warning: error while reading offset {at}: {e}; written as zeroes"
                );
                piece.fill(0);
            }
        }
    }

    fn write(&self, work: Work) -> Result<()> {
        let len = work.job().len;
        let r = self.write_unthrottled(work);
        if let Some(rate) = self.rate {
            // No faster than `rate` bytes per second on average.
            let done = self
                .copied
                .fetch_add(len, std::sync::atomic::Ordering::AcqRel)
                + len;
            let due = std::time::Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        r
    }

    fn write_unthrottled(&self, work: Work) -> Result<()> {
        match work {
            Work::Zero(job) => self.write_zero(job.offset, job.len),
            Work::Offload(job, h) => self.offload(h, job.offset, job.len),
            Work::Data(job, data, src_host) => self.write_data(&data, job.offset, src_host),
            Work::Packed(job, data, packed) => self.write_packed(&data, job.offset, &packed),
        }
    }

    fn offload(&self, src_off: u64, dst_off: u64, len: u64) -> Result<()> {
        let src = self.src.file_storage();
        let dst = self.dst.file_storage();
        let (Some(sf), Some(df)) = (src.as_file(), dst.as_file()) else {
            return Err(Error::unsupported("copy offload needs host files"));
        };
        copy_file_range_all(&sf, src_off, &df, dst_off, len)
            .map_err(|e| Error::io("copying", e).in_file(self.dst.name()))
    }

    fn write_zero(&self, offset: u64, len: u64) -> Result<()> {
        if self.target_zero && self.sparse > 0 {
            return Ok(());
        }
        // -S 0 asks for a fully allocated target, as qemu-img gives it: the
        // zeroes are written as data.
        if self.sparse == 0 {
            let chunk = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(chunk.len() as u64);
                self.dst.write(&chunk[..n as usize], offset + done)?;
                done += n;
            }
            return Ok(());
        }
        self.dst.write_zeroes(offset, len, self.sparse > 0)
    }

    /// Writes `data` (guest `offset`), skipping zero runs; `src_host` is
    /// where the same bytes sit in the raw source file, for copy offload.
    fn write_data(&self, data: &[u8], offset: u64, src_host: Option<u64>) -> Result<()> {
        if self.sparse == 0 {
            return self.dst.write(data, offset);
        }
        // Split into runs of zero and non-zero granules of `sparse` bytes.
        let g = self.sparse as usize;
        let mut pos = 0usize;
        while pos < data.len() {
            let first_end = (pos + g).min(data.len());
            let zero = is_zero(&data[pos..first_end]);
            let mut end = first_end;
            while end < data.len() {
                let next = (end + g).min(data.len());
                if is_zero(&data[end..next]) != zero {
                    break;
                }
                end = next;
            }
            let off = offset + pos as u64;
            if zero {
                self.write_zero(off, (end - pos) as u64)?;
            } else if let Some(h) = src_host {
                self.offload(h + pos as u64, off, (end - pos) as u64)?;
            } else {
                self.dst.write(&data[pos..end], off)?;
            }
            pos = end;
        }
        Ok(())
    }

    /// Compresses each unit of `data` (guest `offset`) that is not all
    /// zeroes; runs in the worker, outside the write turn.
    fn compress_units(&self, data: &[u8], offset: u64) -> Result<Vec<Packed>> {
        let unit = self.dst.compression_unit().unwrap_or(data.len() as u64) as usize;
        data.chunks(unit)
            .enumerate()
            .map(|(k, piece)| {
                if is_zero(piece) {
                    Ok(Packed::Zero)
                } else {
                    let off = offset + (k * unit) as u64;
                    Ok(Packed::Data(self.dst.compress(piece, off)?))
                }
            })
            .collect()
    }

    /// Stores the units [`compress_units`] made, in guest order.
    fn write_packed(&self, data: &[u8], offset: u64, packed: &[Packed]) -> Result<()> {
        let unit = self.dst.compression_unit().unwrap_or(data.len() as u64) as usize;
        for (k, (piece, p)) in data.chunks(unit).zip(packed).enumerate() {
            let off = offset + (k * unit) as u64;
            match p {
                Packed::Zero => self.write_zero(off, piece.len() as u64)?,
                Packed::Data(stream) => self.dst.write_packed(piece, stream.as_deref(), off)?,
            }
        }
        Ok(())
    }
}

impl Work {
    fn job(&self) -> Job {
        match self {
            Work::Zero(j) | Work::Offload(j, _) | Work::Data(j, _, _) | Work::Packed(j, _, _) => *j,
        }
    }
}

/// One unit of `convert -c` output, compressed ahead of its write turn.
enum Packed {
    /// All zeroes: nothing to store in a new target.
    Zero,
    /// The compressed stream, or `None` when the unit is stored plainly.
    Data(Option<Vec<u8>>),
}
