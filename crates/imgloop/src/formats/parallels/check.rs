//! `check`: what `qemu-img check` finds in a Parallels image, with its
//! messages and counts, and the repairs.
//!
//! Corruptions: the in-use marker (not closed cleanly), an invalid
//! `data_off`, clusters outside the file, clusters before the data area
//! (inside the header or BAT; qemu 10 does not look), two entries sharing
//! a cluster, a format extension that cannot be read. Leaks: space past
//! the last used cluster. `-r all` clears the marker, fixes `data_off`,
//! drops the entries outside the file or before the data (their clusters
//! read as zeroes already, or are the image's own metadata), gives each
//! shared cluster's later entry a copy of it (both read as before), and
//! cuts the leaked tail; `-r leaks` only cuts the tail.

use super::header::{IN_USE, SECTOR};
use super::Parallels;
use crate::driver::{CheckReport, RepairMode};
use crate::error::{Error, Result};
use crate::state::Mode;

/// A repair of a header field, applied when the header is rewritten.
type HeaderEdit = Box<dyn FnOnce(&mut super::WireHeader)>;

impl Parallels {
    pub(super) fn check_image(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let writable = self.state.mode() != Mode::ReadOnly;
        let fix_errors = writable && repair == Some(RepairMode::All);
        let fix_leaks = writable && repair.is_some();
        let mut r = CheckReport::default();
        let note = |r: &mut CheckReport, fixed: bool, leak: bool, msg: String| {
            r.messages.push(format!(
                "{} {msg}",
                if fixed { "Repairing" } else { "ERROR" }
            ));
            match (leak, fixed) {
                (false, false) => r.corruptions += 1,
                (false, true) => r.corruptions_fixed += 1,
                _ => {}
            }
        };
        let io = |what: &'static str| move |e| Error::io(what, e);
        let file_len = self.file().len().map_err(io("reading the image size"))?;
        let cs = self.cluster_size();
        let marked = *self.marked.lock().unwrap_or_else(|e| e.into_inner());
        let wire = self.table.read().unwrap_or_else(|e| e.into_inner()).wire();
        let mut header_edits: Vec<HeaderEdit> = Vec::new();
        if wire.inuse == IN_USE && !marked {
            note(
                &mut r,
                fix_errors,
                false,
                "image was not closed correctly".into(),
            );
            if fix_errors {
                header_edits.push(Box::new(|w| w.inuse = 0));
            }
        }
        let current = super::Header {
            wire,
            ..self.header
        };
        if !current.data_off_valid(file_len) {
            note(
                &mut r,
                fix_errors,
                false,
                "data_off field has incorrect value".into(),
            );
            if fix_errors {
                let min = self.header.min_data_off() as u32;
                header_edits.push(Box::new(move |w| w.data_off = min));
            }
        }
        if let Some(p) = self
            .extension_problem
            .as_ref()
            .filter(|_| wire.ext_off != 0)
        {
            // Detaching it loses nothing readable.
            note(&mut r, fix_errors, false, format!("format extension: {p}"));
            if fix_errors {
                header_edits.push(Box::new(|w| w.ext_off = 0));
            }
        }
        // Entries outside the file or before the data area.
        let entries = self.header.wire.bat_entries as u64;
        let mut used: Vec<(u64, u64)> = Vec::new();
        for i in 0..entries {
            let e = self
                .table
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .entry(i);
            if e == 0 {
                continue;
            }
            let host = self.host_of(e);
            let problem = if host + cs > file_len {
                Some(format!("cluster {i} is outside image"))
            } else if host < self.data_start {
                Some(format!(
                    "cluster {i} at byte {host} lies before the data area (byte {})",
                    self.data_start
                ))
            } else {
                None
            };
            match problem {
                Some(msg) => {
                    note(&mut r, fix_errors, false, msg);
                    if fix_errors {
                        self.table
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .set_entry(i, 0);
                    }
                }
                None => used.push((host, i)),
            }
        }
        // Shared clusters: the later entries of each get a copy.
        used.sort_unstable();
        let mut reach = 0u64;
        let mut copies = Vec::new();
        for &(host, i) in &used {
            if host < reach {
                note(
                    &mut r,
                    fix_errors,
                    false,
                    format!("duplicate offset in BAT entry {i}"),
                );
                if fix_errors {
                    copies.push((i, host));
                }
            }
            reach = reach.max(host + cs);
        }
        if !copies.is_empty() {
            let mut buf = vec![0u8; cs.min(1 << 20) as usize];
            let mut moved = Vec::new();
            // Free slots inside the data area first (clusters no entry
            // uses, as qemu reuses them), then the end of the data.
            let mut taken: std::collections::BTreeSet<u64> = used.iter().map(|&(h, _)| h).collect();
            if let Some(x) = self.extension.as_ref().filter(|_| wire.ext_off != 0) {
                taken.extend(x.clusters.iter().map(|&(at, _)| at));
            }
            let data_end = self
                .space
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .data_end;
            let unit = self.header.entry_unit();
            let mut slot = self.data_start.next_multiple_of(unit);
            for &(i, from) in &copies {
                while slot + cs <= data_end
                    && taken
                        .range(slot.saturating_sub(cs - 1)..slot + cs)
                        .next()
                        .is_some()
                {
                    slot += cs;
                }
                let to = if slot + cs <= data_end {
                    taken.insert(slot);
                    slot
                } else {
                    self.append_unpreallocated()?
                };
                let mut done = 0;
                while done < cs {
                    let n = (cs - done).min(buf.len() as u64) as usize;
                    self.file()
                        .read_at(&mut buf[..n], from + done)
                        .map_err(io("reading a shared cluster"))?;
                    self.file()
                        .write_at(&buf[..n], to + done)
                        .map_err(io("writing a copy of a shared cluster"))?;
                    done += n as u64;
                }
                moved.push((i, (to / self.header.entry_unit()) as u32));
            }
            self.file().sync().map_err(io("syncing the image"))?;
            let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
            for (i, e) in moved {
                t.set_entry(i, e);
            }
        }
        if fix_errors {
            self.flush_table()?;
            if !header_edits.is_empty() {
                self.write_header(|w| {
                    for edit in header_edits {
                        edit(w);
                    }
                })?;
            }
        }
        // Leaked space at the end (after repairs, against the file now).
        let file_len = self.file().len().map_err(io("reading the image size"))?;
        let end = self.used_end(file_len);
        let rounded = file_len.div_ceil(SECTOR) * SECTOR;
        if rounded > end && !marked {
            let leaked = rounded - end;
            let clusters = leaked.div_ceil(cs);
            note(
                &mut r,
                fix_leaks,
                true,
                format!("space leaked at the end of the image {leaked}"),
            );
            if fix_leaks {
                self.file()
                    .set_len(end)
                    .and_then(|_| self.file().sync())
                    .map_err(io("cutting the leaked space off the file"))?;
                let mut s = self.space.lock().unwrap_or_else(|e| e.into_inner());
                s.file_len = end;
                s.data_end = s.data_end.min(end).max(self.data_start);
                r.leaks_fixed += clusters;
            } else {
                r.leaks += clusters;
            }
        }
        // Statistics, as qemu-img computes them.
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let (mut allocated, mut fragmented, mut prev) = (0u64, 0u64, 0u64);
        for i in 0..entries {
            let e = t.entry(i);
            if e == 0 {
                prev = 0;
                continue;
            }
            let host = self.host_of(e);
            allocated += 1;
            if prev != 0 && prev + cs != host {
                fragmented += 1;
            }
            prev = host;
        }
        r.total_clusters = Some(entries);
        r.allocated_clusters = Some(allocated);
        r.fragmented_clusters = Some(fragmented);
        r.image_end_offset = Some(end);
        Ok(r)
    }
}
