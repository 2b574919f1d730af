//! `imgloop bench`: a simple I/O benchmark of an image, as `qemu-img
//! bench`: COUNT requests of BUFFER_SIZE bytes, DEPTH in parallel, from
//! OFFSET on in steps of STEP_SIZE (wrapping at the end of the disk).

use crate::common::{fail, open_image};
use imgloop::size::parse_size;
use imgloop::{Error, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop bench -c 100000 -d 64 disk.qcow2
  imgloop bench -w -s 64k -c 10000 --pattern 0xab --flush-interval 100 disk.qcow2")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value_t = 75000)]
    count: u64,
    /// Requests in parallel.
    #[arg(short = 'd', long = "depth", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    depth: u64,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", default_value = "0")]
    offset: String,
    /// Bytes per request.
    #[arg(short = 's', long = "buffer-size", default_value = "4096")]
    buffer_size: String,
    /// Offset increment between requests (default: the buffer size).
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// The byte written (with -w).
    #[arg(long, default_value = "0")]
    pattern: String,
    /// Flush after this many requests (with -w).
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// Do not wait for requests in flight before a flush (accepted; imgloop's
    /// flush covers every completed request).
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Cache mode (accepted for qemu-img compatibility).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// AIO backend (accepted for qemu-img compatibility).
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Native AIO (accepted for qemu-img compatibility).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Quiet (qemu-img prints its two lines anyway; so does imgloop).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image.
    file: PathBuf,
}

pub fn run(a: Args) -> u8 {
    match bench(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

fn parse_pattern(p: &str) -> Result<u8> {
    let v = match p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => p.parse::<u64>(),
    };
    v.ok()
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| Error::invalid_argument(format!("Invalid pattern byte specified: '{p}'")))
}

fn bench(a: &Args) -> Result<()> {
    if (a.flush_interval.is_some() || a.no_drain || a.pattern != "0") && !a.write {
        return Err(Error::invalid_argument(
            "--pattern, --flush-interval and --no-drain are only for write tests (-w)",
        ));
    }
    if a.flush_interval.is_some_and(|n| n < a.depth) {
        return Err(Error::invalid_argument(
            "Flush interval can't be smaller than depth",
        ));
    }
    if let Some(c) = &a.cache {
        crate::common::check_cache_mode(c, false)?;
    }
    let size = parse_size(&a.buffer_size)?;
    if size == 0 || size > (1 << 30) {
        return Err(Error::invalid_argument("Invalid buffer size specified"));
    }
    let step = match &a.step {
        Some(s) => parse_size(s)?,
        None => size,
    };
    let start = parse_size(&a.offset)?;
    let pattern = parse_pattern(&a.pattern)?;
    let img = open_image(&a.file, a.format.as_deref(), !a.write, false, &a.objects)?;
    let disk = img.size();
    let kind = if a.write { "write" } else { "read" };
    println!(
        "Sending {} {kind} requests, {size} bytes each, {} in parallel (starting at offset {start}, step size {step})",
        a.count, a.depth
    );
    if let Some(n) = a.flush_interval {
        println!("Sending flush every {n} requests");
    }
    let next = AtomicU64::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.depth.min(a.count.max(1)) {
            s.spawn(|| {
                let mut buf = vec![pattern; size as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.count || failure.lock().is_ok_and(|f| f.is_some()) {
                        return;
                    }
                    let off = if disk == 0 {
                        0
                    } else {
                        (start as u128 + i as u128 * step as u128) as u64 % disk
                    };
                    let r = if a.write {
                        img.write(&buf, off)
                    } else {
                        img.read(&mut buf, off)
                    };
                    let r = r.and_then(|_| match a.flush_interval {
                        Some(n) if n > 0 && (i + 1).is_multiple_of(n) => img.flush(),
                        _ => Ok(()),
                    });
                    if let Err(e) = r {
                        let mut f = failure.lock().unwrap_or_else(|e| e.into_inner());
                        f.get_or_insert(Error::new(e.kind(), format!("Failed request: {e}")));
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if a.write {
        img.flush()?;
    }
    println!(
        "Run completed in {:.3} seconds.",
        t0.elapsed().as_secs_f64()
    );
    img.close()
}
