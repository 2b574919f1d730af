//! Random 4 KiB reads through the imgloop library, for benchmarks.
//!
//! ```text
//! cargo run --release -p imgloop --example randread -- IMAGE FORMAT [OPS] [THREADS]
//! ```
//!
//! Opens IMAGE read-only as FORMAT and reads OPS (default 200000) random
//! 4 KiB-aligned blocks spread over THREADS threads (default 1), with a
//! fixed seed so every format reads the same offsets. Prints one line:
//! `FORMAT OPS ops SECONDS s OPS_PER_SEC ops/s`.

use imgloop::testkit::Rng;
use imgloop::{Image, OpenOptions};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: randread IMAGE FORMAT [OPS] [THREADS]");
        std::process::exit(2);
    }
    let ops: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let threads: u64 = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let img = match Image::open(args[1].as_ref(), &OpenOptions::read_only(Some(&args[2]))) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("randread: {e}");
            std::process::exit(1);
        }
    };
    let blocks = img.size() / 4096;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let img = &img;
            s.spawn(move || {
                let mut rng = Rng::new(42 + t);
                let mut buf = vec![0u8; 4096];
                for _ in 0..ops / threads {
                    let off = rng.below(blocks) * 4096;
                    img.read(&mut buf, off).expect("read");
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} {} ops {:.3} s {:.0} ops/s",
        args[2],
        ops,
        secs,
        ops as f64 / secs
    );
}
