//! `imgloop info`.

use crate::common::{fail, print_json, Output};
use imgloop::size::human_size;
use imgloop::{Image, ImageInfo};
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop info disk.img
  imgloop info --output json disk.qcow2
  imgloop info --backing-chain --output json overlay.qcow2")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Show every image of the backing chain.
    #[arg(long)]
    backing_chain: bool,
    /// Open without taking locks (the image may be in use).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file.
    file: PathBuf,
}

/// `info --output json` object: the image facts plus the `file` child node
/// qemu-img reports.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct JsonInfo {
    children: Vec<Child>,
    #[serde(flatten)]
    info: ImageInfo,
}

#[derive(Serialize)]
struct Child {
    name: &'static str,
    info: FileNode,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileNode {
    children: Vec<()>,
    virtual_size: u64,
    filename: String,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    format_specific: serde_json::Value,
    dirty_flag: bool,
}

fn json_info(img: &Image) -> JsonInfo {
    let info = img.info();
    let storage = img.file_storage();
    let file = FileNode {
        children: Vec::new(),
        // qemu's block layer counts a file in whole 512-byte sectors.
        virtual_size: storage.len().unwrap_or(0).div_ceil(512) * 512,
        filename: info.filename.clone(),
        format: "file",
        actual_size: storage.allocated_size().ok().flatten(),
        format_specific: serde_json::json!({"type": "file", "data": {}}),
        dirty_flag: false,
    };
    JsonInfo {
        children: vec![Child {
            name: "file",
            info: file,
        }],
        info,
    }
}

fn print_human(img: &Image) {
    let i = img.info();
    println!("image: {}", i.filename);
    println!("file format: {}", i.format);
    println!(
        "virtual size: {} ({} bytes)",
        human_size(i.virtual_size),
        i.virtual_size
    );
    if let Some(a) = i.actual_size {
        println!("disk size: {}", human_size(a));
    }
    if i.encrypted {
        println!("encrypted: yes");
    }
    if let Some(c) = i.cluster_size {
        println!("cluster_size: {c}");
    }
    if let Some(b) = &i.backing_filename {
        match &i.full_backing_filename {
            Some(full) if full != b => println!("backing file: {b} (actual path: {full})"),
            _ => println!("backing file: {b}"),
        }
    }
    if let Some(f) = &i.backing_filename_format {
        println!("backing file format: {f}");
    }
    if i.dirty_flag {
        println!("cleanly shut down: no");
    }
    if !i.snapshots.is_empty() {
        print_snapshot_list(&i.snapshots);
    }
    if let Some(fs) = &i.format_specific {
        let v = serde_json::to_value(fs).expect("plain data serializes");
        if let Some(data) = v.get("data").and_then(|d| d.as_object()) {
            println!("Format specific information:");
            let mut out = String::new();
            dump_object(data, 1, &mut out);
            print!("{out}");
        }
    }
    // The file node under the format, as qemu-img shows it.
    let storage = img.file_storage();
    let len = storage.len().unwrap_or(0).div_ceil(512) * 512;
    println!("Child node '/file':");
    println!("    filename: {}", i.filename);
    println!("    protocol type: file");
    println!("    file length: {} ({len} bytes)", human_size(len));
    if let Some(a) = storage.allocated_size().ok().flatten() {
        println!("    disk size: {}", human_size(a));
    }
}

/// Shows a JSON object the way qemu-img shows format-specific facts: one
/// `key: value` line per field (dashes in keys become spaces), nested
/// objects and lists indented by four spaces, list items as `[N]:`.
fn dump_object(obj: &serde_json::Map<String, serde_json::Value>, depth: usize, out: &mut String) {
    for (key, value) in obj {
        dump_value(&key.replace('-', " "), value, depth, out);
    }
}

fn dump_value(label: &str, value: &serde_json::Value, depth: usize, out: &mut String) {
    use serde_json::Value;
    let pad = "    ".repeat(depth);
    match value {
        Value::Object(o) => {
            out.push_str(&format!("{pad}{label}:\n"));
            dump_object(o, depth + 1, out);
        }
        Value::Array(items) => {
            out.push_str(&format!("{pad}{label}:\n"));
            for (n, item) in items.iter().enumerate() {
                dump_value(&format!("[{n}]"), item, depth + 1, out);
            }
        }
        Value::String(s) => out.push_str(&format!("{pad}{label}: {s}\n")),
        other => out.push_str(&format!("{pad}{label}: {other}\n")),
    }
}

pub fn run(a: Args) -> u8 {
    // As qemu-img, info opens the backing chain only to show it: a
    // missing backing file does not stop `info` of the image itself.
    let policy = if a.backing_chain {
        imgloop::FilePolicy::like_qemu_img()
    } else {
        imgloop::FilePolicy::like_qemu_img().without_backing()
    };
    // The metadata only: an encrypted image opens without its key, as
    // in qemu-img.
    let opened = a
        .objects
        .spec(&a.file, a.format.as_deref())
        .and_then(|mut spec| {
            spec.options.insert(
                imgloop::formats::qcow2::OPEN_METADATA_ONLY.to_string(),
                "on".to_string(),
            );
            let opts = imgloop::OpenOptions {
                format: spec.format,
                read_only: true,
                force_share: a.force_share,
                driver_options: spec.options,
                secrets: a.objects.secrets()?,
                policy,
                ..Default::default()
            };
            crate::common::open_with(&spec.path, &opts)
        });
    let img = match opened {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    let chain: Vec<&Image> = if a.backing_chain {
        img.chain()
    } else {
        vec![&img]
    };
    match a.output {
        Output::Json if a.backing_chain => {
            let v: Vec<JsonInfo> = chain.iter().map(|i| json_info(i)).collect();
            print_json(&v);
        }
        Output::Json => print_json(&json_info(&img)),
        Output::Human => {
            for (n, i) in chain.iter().enumerate() {
                if n > 0 {
                    println!();
                }
                print_human(i);
            }
        }
    }
    0
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch.
fn utc_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Prints "Snapshot list:" and the table, columns as qemu-img prints them.
pub fn print_snapshot_list(snapshots: &[imgloop::driver::SnapshotInfo]) {
    println!("Snapshot list:");
    println!(
        "{:<7} {:<17}{:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snapshots {
        let clock = sn.vm_clock_sec;
        println!(
            "{:<7} {:<17}{:>8} {:>19} {:>15} {:>10}",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            utc_date(sn.date_sec),
            format!(
                "{:04}:{:02}:{:02}.{:03}",
                clock / 3600,
                clock / 60 % 60,
                clock % 60,
                sn.vm_clock_nsec / 1_000_000
            ),
            sn.icount.map_or(String::new(), |c| c.to_string())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{dump_object, utc_date};

    #[test]
    fn format_specific_facts_are_shown_like_qemu_img() {
        let v = serde_json::json!({
            "compat": "1.1",
            "lazy-refcounts": false,
            "bitmaps": [{"flags": ["auto"], "name": "b0", "granularity": 65536}],
            "refcount-bits": 16
        });
        let mut out = String::new();
        dump_object(v.as_object().unwrap(), 1, &mut out);
        assert_eq!(
            out,
            "    compat: 1.1\n    lazy refcounts: false\n    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: b0\n            granularity: 65536\n    refcount bits: 16\n"
        );
    }

    #[test]
    fn dates_are_formatted_in_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_date(1_795_259_374), "2026-11-21 11:09:34");
    }
}
