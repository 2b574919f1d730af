//! `imgloop io`: scripted I/O in the spirit of qemu-io.

use crate::common::{fail, parse_options};
use imgloop::size::{human_size, parse_size};
use imgloop::{Error, Image, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
#[command(
    after_help = "Commands (-c, repeatable, run in order; the first failure stops the run):
  read [-P PATTERN] OFFSET LENGTH     read; with -P verify every byte equals PATTERN
  write [-P PATTERN] [-z [-u]] OFFSET LENGTH
                                      write PATTERN (default 0xcd) or, with -z, zeroes
                                      (-u lets zeroed space be deallocated)
  discard OFFSET LENGTH               discard (deallocate) a range
  flush                               make all writes durable
  map                                 show which ranges are allocated in the image
  sleep MILLISECONDS                  pause (keeps the image open and locked)
Offsets and lengths take suffixes k, M, G, T (1024-based).

Examples:
  imgloop io -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' disk.img
  imgloop io -f raw -c 'write -z 1M 1M' -c flush disk.img
  imgloop io -r -c map disk.img"
)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Open without taking locks (read-only use only).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Driver open options, `key=value[,...]` (qcow2: `l2-cache-size`,
    /// `refcount-cache-size`).
    #[arg(short = 'o', long = "open-options")]
    open_options: Vec<String>,
    /// A command to run.
    #[arg(short = 'c', long = "cmd", required = true)]
    commands: Vec<String>,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    file: PathBuf,
}

pub fn run(a: Args) -> u8 {
    let opened = parse_options(&a.open_options).and_then(|mut driver_options| {
        let spec = a.objects.spec(&a.file, a.format.as_deref())?;
        driver_options.extend(spec.options);
        crate::common::open_with(
            &spec.path,
            &imgloop::OpenOptions {
                format: spec.format,
                read_only: a.read_only,
                force_share: a.force_share,
                driver_options,
                secrets: a.objects.secrets()?,
                policy: imgloop::FilePolicy::like_qemu_img(),
                ..Default::default()
            },
        )
    });
    let img = match opened {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    for cmd in &a.commands {
        if let Err(e) = run_one(&img, cmd, a.quiet) {
            let _ = img.close();
            return fail(&e);
        }
    }
    match img.close() {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// A parsed command line: flags with optional values, then positionals.
struct Parsed<'a> {
    pattern: Option<u8>,
    zero: bool,
    unmap: bool,
    pos: Vec<&'a str>,
}

fn parse<'a>(words: &[&'a str]) -> Result<Parsed<'a>> {
    let mut p = Parsed {
        pattern: None,
        zero: false,
        unmap: false,
        pos: Vec::new(),
    };
    let mut i = 0;
    while i < words.len() {
        match words[i] {
            "-P" => {
                let v = words
                    .get(i + 1)
                    .ok_or_else(|| Error::invalid_argument("-P needs a pattern"))?;
                p.pattern = Some(parse_pattern(v)?);
                i += 1;
            }
            "-z" => p.zero = true,
            "-u" => p.unmap = true,
            "-q" => {}
            w if w.starts_with('-') && w.len() > 1 => {
                return Err(Error::invalid_argument(format!("unknown flag '{w}'")))
            }
            w => p.pos.push(w),
        }
        i += 1;
    }
    Ok(p)
}

fn parse_pattern(v: &str) -> Result<u8> {
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse::<u64>(),
    }
    .map_err(|_| Error::invalid_argument(format!("invalid pattern '{v}'")))?;
    u8::try_from(n).map_err(|_| Error::invalid_argument(format!("pattern '{v}' is not a byte")))
}

fn range(p: &Parsed, cmd: &str) -> Result<(u64, u64)> {
    if p.pos.len() != 2 {
        return Err(Error::invalid_argument(format!(
            "{cmd}: expected OFFSET LENGTH"
        )));
    }
    Ok((parse_size(p.pos[0])?, parse_size(p.pos[1])?))
}

fn stats(len: u64, start: Instant) -> String {
    let secs = start.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        len as f64 / secs / (1 << 20) as f64
    } else {
        0.0
    };
    format!(
        "{}, 1 ops; {:05.2} sec ({rate:.3} MiB/sec and {:.4} ops/sec)",
        human_size(len),
        secs,
        if secs > 0.0 { 1.0 / secs } else { 0.0 }
    )
}

/// Largest buffer one read or write command uses at a time.
const IO_CHUNK: u64 = 16 << 20;

fn run_one(img: &Image, cmd: &str, quiet: bool) -> Result<()> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Ok(());
    };
    let p = parse(rest)?;
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let start = Instant::now();
    match name {
        "read" | "r" => {
            let (off, len) = range(&p, name)?;
            let mut buf = vec![0u8; IO_CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = (buf.len() as u64).min(len - done) as usize;
                img.read(&mut buf[..n], off + done)?;
                if let Some(pat) = p.pattern {
                    if let Some(bad) = buf[..n].iter().position(|&b| b != pat) {
                        return Err(Error::new(
                            imgloop::ErrorKind::Corrupt,
                            format!(
                                "Pattern verification failed at offset {}, {} bytes (read {:#04x}, expected {pat:#04x})",
                                off + done + bad as u64,
                                len,
                                buf[bad]
                            ),
                        )
                        .in_file(img.name()));
                    }
                }
                done += n as u64;
            }
            say(format!("read {len}/{len} bytes at offset {off}"));
            say(stats(len, start));
        }
        "write" | "w" => {
            let (off, len) = range(&p, name)?;
            if p.zero {
                if p.pattern.is_some() {
                    return Err(Error::invalid_argument(
                        "write: -z and -P exclude each other",
                    ));
                }
                img.write_zeroes(off, len, p.unmap)?;
            } else {
                let buf = vec![p.pattern.unwrap_or(0xcd); IO_CHUNK.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = (buf.len() as u64).min(len - done) as usize;
                    img.write(&buf[..n], off + done)?;
                    done += n as u64;
                }
            }
            say(format!("wrote {len}/{len} bytes at offset {off}"));
            say(stats(len, start));
        }
        "discard" | "d" => {
            let (off, len) = range(&p, name)?;
            img.discard(off, len)?;
            say(format!("discard {len}/{len} bytes at offset {off}"));
            say(stats(len, start));
        }
        "flush" | "f" => img.sync()?,
        "sleep" => {
            let ms: u64 = p
                .pos
                .first()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::invalid_argument("sleep: expected MILLISECONDS"))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        "map" => {
            let mut pos = 0;
            while pos < img.size() {
                let s = img.block_status(pos, img.size() - pos)?;
                say(format!(
                    "{} ({:#x}) bytes {:>13} at offset {} ({:#x})",
                    human_size(s.len),
                    s.len,
                    if s.allocated {
                        "allocated"
                    } else {
                        "not allocated"
                    },
                    human_size(pos),
                    pos
                ));
                pos += s.len;
            }
        }
        other => {
            return Err(Error::invalid_argument(format!(
                "unknown command '{other}' (known: read, write, discard, flush, map, sleep)"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_accept_hex_and_decimal_but_not_values_above_a_byte() {
        assert_eq!(parse_pattern("0xab").unwrap(), 0xab);
        assert_eq!(parse_pattern("17").unwrap(), 17);
        assert!(parse_pattern("256").is_err());
        assert!(parse_pattern("zz").is_err());
    }

    #[test]
    fn flags_and_positionals_are_separated() {
        let p = parse(&["-P", "5", "-z", "1k", "2"]).unwrap();
        assert_eq!(p.pattern, Some(5));
        assert!(p.zero);
        assert_eq!(p.pos, vec!["1k", "2"]);
        assert!(parse(&["-x"]).is_err());
    }
}
