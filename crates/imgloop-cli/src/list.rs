//! `imgloop list`: the images attached as loop devices.

use crate::attach::read_states;
use crate::common::{print_json, Output};
use serde::Serialize;

#[derive(clap::Args)]
#[command(after_help = "\
A dead export (its process was killed) is listed as not running; clean it
up with `imgloop detach DEVICE`.

Examples:
  imgloop list
  imgloop list --output json")]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Entry {
    device: String,
    image: String,
    format: String,
    read_only: bool,
    pid: u32,
    running: bool,
    sector_size: u32,
    partscan: bool,
    direct_io: bool,
}

pub fn run(a: Args) -> u8 {
    let entries: Vec<Entry> = read_states()
        .into_iter()
        .map(|s| Entry {
            running: s.running(),
            device: s.device,
            image: s.image,
            format: s.format,
            read_only: s.read_only,
            pid: s.pid,
            sector_size: s.sector_size,
            partscan: s.partscan,
            direct_io: s.direct_io,
        })
        .collect();
    match a.output {
        Output::Json => print_json(&entries),
        Output::Human => {
            if entries.is_empty() {
                return 0;
            }
            let w = entries
                .iter()
                .map(|e| e.device.len())
                .max()
                .unwrap_or(6)
                .max(6);
            println!(
                "{:<w$}  {:<6}  {:<3}  {:>7}  IMAGE",
                "DEVICE", "FORMAT", "RO", "PID"
            );
            for e in &entries {
                let pid = if e.running {
                    e.pid.to_string()
                } else {
                    "dead".to_string()
                };
                println!(
                    "{:<w$}  {:<6}  {:<3}  {:>7}  {}",
                    e.device,
                    e.format,
                    if e.read_only { "yes" } else { "no" },
                    pid,
                    e.image
                );
            }
        }
    }
    0
}
