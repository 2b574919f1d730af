//! `check`: the log, headers and region tables, and every BAT entry.
//!
//! Reported as corruptions: a log that needed replay (the open replayed
//! it: on disk with `-r`, in memory without), a damaged header or region
//! table copy, blocks and sector bitmaps in the header section, past the
//! end of the file or overlapping each other or the log and regions,
//! reserved states, partially present blocks without a sector bitmap.
//! `-r all` (and `-r leaks`, as qemu-img) repairs what can be repaired
//! without losing data: the log replay and damaged header and region
//! table copies, rewritten from the good ones; blocks past the end of the
//! file become zero blocks (they read as zeroes already); blocks sharing
//! bytes with another block or a structure get a copy of what they read
//! in a new block (so each reads as before and writes no longer spill);
//! entries in states that cannot be read become zero blocks.

use super::bat::{self, Payload, BITMAP_BLOCK, SB_PRESENT};
use super::header::{RegionTable, MIB, REGIONS_AT};
use super::{LogState, Vhdx};
use crate::driver::{CheckReport, RepairMode};
use crate::error::{Error, Result};

impl Vhdx {
    pub(super) fn check_image(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let fix = repair.is_some() && self.writable();
        let mut note = |r: &mut CheckReport, fixed: bool, msg: String| {
            if fixed {
                r.corruptions_fixed += 1;
                r.messages.push(format!("Repairing {msg}"));
            } else {
                r.corruptions += 1;
                r.messages.push(format!("ERROR {msg}"));
            }
        };
        match self.log_state {
            LogState::Replayed => note(&mut r, true, "the log, which needed replay (replayed)".into()),
            LogState::ReplayedInMemory => note(
                &mut r,
                false,
                "the log needs replay (read in memory; repair with -r all to replay it into the file)".into(),
            ),
            LogState::Clean => {}
        }
        // BAT entries first: a block sharing bytes with the header section
        // or a region table gets its copy of them before they are
        // rewritten below.
        self.check_bat(&mut r, fix, &mut note)?;
        let problems = self
            .open_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut rewrite_headers = false;
        let mut rewrite_regions = false;
        for p in problems {
            let header = p.starts_with("VHDX header");
            if header {
                rewrite_headers = true;
            } else {
                rewrite_regions = true;
            }
            note(&mut r, fix, p);
        }
        if fix && rewrite_headers {
            // Both slots get the current header again.
            self.start_session()?;
        }
        if fix && rewrite_regions {
            let (table, _) = RegionTable::read(self.file())?;
            let b = table.to_bytes();
            for at in REGIONS_AT {
                self.file().write_at(&b, at).map_err(|e| {
                    Error::io("rewriting a VHDX region table", e).at("VHDX region table", at)
                })?;
            }
            self.file()
                .sync()
                .map_err(|e| Error::io("syncing the image", e))?;
        }
        if fix {
            self.flush_metadata()?;
            // The headers and region tables were rewritten.
            self.open_problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        Ok(r)
    }

    fn check_bat(
        &self,
        r: &mut CheckReport,
        fix: bool,
        note: &mut dyn FnMut(&mut CheckReport, bool, String),
    ) -> Result<()> {
        let file_len = self
            .file()
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        let name = |index: u64| {
            if self.geo.is_bitmap_index(index) {
                format!("sector bitmap entry {index}")
            } else {
                format!(
                    "block {} (BAT entry {index})",
                    index - index / (self.geo.chunk_ratio + 1)
                )
            }
        };
        // (start, end, BAT index or u64::MAX for a structure).
        let mut spans: Vec<(u64, u64, u64)> = Vec::new();
        let bs = self.geo.block_size;
        for index in 0..self.geo.entries {
            let e = self.entry(index)?;
            let at = self.bat.offset + index * 8;
            let len = if self.geo.is_bitmap_index(index) {
                match e & 7 {
                    0 => continue,
                    SB_PRESENT if self.meta.has_parent => BITMAP_BLOCK,
                    s => {
                        // Without a parent, nothing reads sector bitmaps:
                        // the entry becomes "not present" as the
                        // specification requires.
                        let fixable = fix && !self.meta.has_parent;
                        note(r, fixable, format!("sector bitmap entry {index} (at {at}) has the state {s}, invalid in this image"));
                        if fixable {
                            self.set_entry_now(index, 0)?;
                        }
                        continue;
                    }
                }
            } else {
                let block = index - index / (self.geo.chunk_ratio + 1);
                match Payload::of(e) {
                    Payload::FullyPresent => {}
                    Payload::PartiallyPresent if self.meta.has_parent => {
                        if self.entry(self.geo.bitmap_index(block))? & 7 != SB_PRESENT {
                            note(r, false, format!("block {block} is partially present but its chunk has no sector bitmap"));
                        }
                    }
                    Payload::PartiallyPresent | Payload::Reserved(_) => {
                        // Reads of it fail; repaired, it reads as zeroes.
                        let fixable = fix && !self.meta.leave_allocated;
                        note(r, fixable, format!("BAT entry {index} (block {block}, at {at}) has the state {}, invalid in this image (partially present is valid only with a parent); it cannot be read", e & 7));
                        if fixable {
                            self.set_entry_now(index, bat::entry(Payload::Zero, 0))?;
                        }
                        continue;
                    }
                    _ => continue,
                }
                // The last block may stop at the end of the disk.
                bs.min(self.meta.size - block * bs)
            };
            let off = bat::offset_of(e);
            let Some(end) = off.checked_add(len) else {
                note(r, false, format!("{} offset overflow", name(index)));
                continue;
            };
            if off >= file_len {
                let fixable = fix && !self.geo.is_bitmap_index(index) && !self.meta.leave_allocated;
                note(r, fixable, format!("{} start offset {off} points after end of file ({file_len}); the image has probably been truncated", name(index)));
                if fixable {
                    self.set_entry_now(index, bat::entry(Payload::Zero, 0))?;
                }
                continue;
            }
            if end > file_len.next_multiple_of(MIB) {
                note(
                    r,
                    false,
                    format!(
                        "{} end offset {} points after end of file ({file_len})",
                        name(index),
                        end - 1
                    ),
                );
            }
            spans.push((off, end, index));
        }
        // Overlaps: blocks with each other and with the structures.
        let structures = [
            (0, MIB, "the header section"),
            (self.log.0, self.log.0 + self.log.1, "the log"),
            (self.bat.offset, self.bat.end(), "the BAT"),
            (
                self.metadata_region.offset,
                self.metadata_region.end(),
                "the metadata region",
            ),
        ];
        // Blocks that share bytes with a structure or an earlier block are
        // repaired by giving them a copy of what they read now, in a new
        // block: every block reads as before, and writes to one no longer
        // change another or the metadata.
        let mut relocate: Vec<(u64, u64, u64)> = Vec::new();
        for &(s, e, index) in &spans {
            if let Some((_, _, what)) = structures.iter().find(|(a, b, _)| s < *b && *a < e) {
                let fixable = fix && !self.geo.is_bitmap_index(index);
                note(
                    r,
                    fixable,
                    format!("{} at {s}-{e} overlaps {what}", name(index)),
                );
                if fixable {
                    relocate.push((index, s, e - s));
                }
            }
        }
        spans.sort_unstable();
        let mut reach: Option<(u64, u64)> = None;
        for &(s, e, index) in &spans {
            if let Some((end, other)) = reach {
                if s < end {
                    let fixable = fix && !self.geo.is_bitmap_index(index);
                    note(
                        r,
                        fixable,
                        format!(
                            "{} at {s}-{e} overlaps {} (also there)",
                            name(index),
                            name(other)
                        ),
                    );
                    if fixable && !relocate.iter().any(|&(i, _, _)| i == index) {
                        relocate.push((index, s, e - s));
                    }
                }
            }
            if reach.is_none_or(|(end, _)| e > end) {
                reach = Some((e, index));
            }
        }
        if !relocate.is_empty() {
            self.relocate_blocks(&relocate, file_len)?;
        }
        Ok(())
    }

    /// Copies each (BAT index, file offset, length) block to a new place
    /// at the end of the file, syncs, then points its entry there (the
    /// entries reach the file through the log at the next flush).
    fn relocate_blocks(&self, blocks: &[(u64, u64, u64)], file_len: u64) -> Result<()> {
        let mut moved = Vec::with_capacity(blocks.len());
        let mut buf = vec![0u8; MIB as usize];
        for &(index, from, len) in blocks {
            let to = self.append(self.geo.block_size)?;
            let mut done = 0;
            while done < len {
                let n = (len - done).min(MIB);
                let chunk = &mut buf[..n as usize];
                chunk.fill(0);
                let src = from + done;
                if src < file_len {
                    let avail = (file_len - src).min(n) as usize;
                    self.file().read_at(&mut chunk[..avail], src).map_err(|e| {
                        Error::io("reading a VHDX block to move it", e).at("VHDX block", src)
                    })?;
                }
                self.file().write_at(chunk, to + done).map_err(|e| {
                    Error::io("writing a moved VHDX block", e).at("VHDX block", to + done)
                })?;
                done += n;
            }
            let state = Payload::of(self.entry(index)?);
            moved.push((index, bat::entry(state, to)));
        }
        self.file()
            .sync()
            .map_err(|e| Error::io("syncing the image", e))?;
        for (index, entry) in moved {
            self.set_entry_now(index, entry)?;
        }
        Ok(())
    }
}
