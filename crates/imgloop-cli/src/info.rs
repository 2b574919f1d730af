//! `imgloop info`.

use crate::common::{fail, open, print_json, Output};
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
    let storage = img.driver().file_storage();
    let file = FileNode {
        children: Vec::new(),
        virtual_size: storage.len().unwrap_or(0),
        filename: info.filename.clone(),
        format: "file",
        actual_size: info.actual_size,
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
    if !i.format_specific_lines.is_empty() {
        println!("Format specific information:");
        for (k, v) in &i.format_specific_lines {
            println!("    {k}: {v}");
        }
    }
}

pub fn run(a: Args) -> u8 {
    let img = match open(&a.file, a.format.as_deref(), true, a.force_share) {
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
