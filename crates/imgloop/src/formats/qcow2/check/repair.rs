//! Steps 3 and 4 of a check: repairing refcounts (or rebuilding the
//! refcount structure), writing entry repairs, and the COPIED flags.

use super::*;

impl Pass<'_> {
    /// Reports differences without repairing them.
    pub(super) fn report(&mut self, mismatches: &[Mismatch]) {
        for mm in mismatches {
            if mm.1 < mm.2 {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
            self.say(Self::mismatch_message(mm));
        }
    }

    /// Step 3 without a rebuild: leaks (and with `-r all`, too-low refcounts)
    /// are set to the counted value.
    pub(super) fn fix_refcounts(
        &mut self,
        m: &mut Tables,
        mismatches: &[Mismatch],
        mode: RepairMode,
    ) -> Result<()> {
        for mm in mismatches {
            let &(c, stored, want) = mm;
            self.say(Self::mismatch_message(mm));
            let leak = stored > want;
            if !leak && mode != RepairMode::All {
                self.res.corruptions += 1;
                continue;
            }
            if leak && self.incomplete {
                // What could not be read may reference this cluster.
                self.say(format!(
                    "Not repairing cluster {c} refcount={stored} reference={want}: part of the metadata could not be read, so its references are unknown"
                ));
                continue;
            }
            self.q.set_refcount(m, c, want)?;
            self.blocks.clear();
            self.say(format!(
                "Repairing cluster {c} refcount={stored} reference={want}"
            ));
            if leak {
                self.res.leaks_fixed += 1;
            } else {
                self.res.corruptions_fixed += 1;
            }
        }
        Ok(())
    }

    /// Step 3 with a rebuild: a new refcount structure from the counts, then
    /// the entry repairs, a recount, and the old structure freed.
    pub(super) fn rebuild_and_recount(
        &mut self,
        m: &mut Tables,
        mismatches: &[Mismatch],
    ) -> Result<()> {
        self.report(mismatches);
        let (old_corruptions, old_leaks) = (self.res.corruptions, self.res.leaks);
        self.say("Rebuilding refcount structure".into());
        self.write_new_refcounts(m)?;
        self.apply_entry_fixes(m)?;

        // Recount on the repaired image.
        self.file_len = self
            .q
            .file()
            .len()
            .map_err(|e| Error::io("reading image size", e))?;
        self.refs = vec![0; self.file_len.div_ceil(self.cs) as usize];
        self.res.corruptions = 0;
        self.res.leaks = 0;
        self.rebuild = false;
        self.fix_entries = false;
        (self.allocated, self.fragmented, self.compressed) = (0, 0, 0);
        self.count(m);
        let mismatches = self.compare(m);
        if self.rebuild {
            self.say("ERROR rebuilt refcount structure is still broken".into());
        }
        for mm in &mismatches {
            let &(c, stored, want) = mm;
            if stored > want && !self.incomplete {
                // The old structure, and anything counted twice.
                self.q.set_refcount(m, c, want)?;
                self.blocks.clear();
                self.say(format!(
                    "Repairing cluster {c} refcount={stored} reference={want}"
                ));
            } else {
                self.say(Self::mismatch_message(mm));
            }
        }
        self.res.corruptions_fixed += old_corruptions.saturating_sub(self.res.corruptions);
        self.res.leaks_fixed += old_leaks.saturating_sub(self.res.leaks);
        Ok(())
    }

    /// Writes the L1 and L2 entry repairs found while walking.
    /// True when a repair may write into the cluster at byte `off`: not
    /// the header, and not a cluster other metadata also occupies (a
    /// table lying over another structure is itself damage; writing its
    /// "repair" would destroy the other one).
    pub(super) fn writable(&self, off: u64) -> bool {
        let c = (off / self.cs) as usize;
        c != 0 && self.refs.get(c).is_some_and(|&r| r <= 1)
    }

    pub(super) fn apply_entry_fixes(&mut self, m: &mut Tables) -> Result<()> {
        let q = self.q;
        let io = |what: &'static str| move |e| Error::io(what, e);
        for (off, table) in std::mem::take(&mut self.l2_fixes) {
            if !self.writable(off) {
                // Its entries are another structure's bytes: drop the
                // table from the active L1 instead (the guest range then
                // reads as it would without it), never write into it.
                let l1_off = m.header.l1_table_offset;
                let users: Vec<usize> = (0..m.l1.len())
                    .filter(|&i| m.l1[i] & entry::L1_OFFSET_MASK == off)
                    .collect();
                for i in users {
                    self.repaired(format!(
                        "Repairing L1 entry {i}: its L2 table at {off:#x} lies over other metadata; entry cleared"
                    ));
                    self.l1_fixes
                        .retain(|&(o, j, _, _)| !(o == l1_off && j as usize == i));
                    self.l1_fixes.push((l1_off, i as u32, 0, true));
                }
                continue;
            }
            q.file()
                .write_at(&table, off)
                .map_err(io("writing a repaired L2 table"))?;
            if m.l2.remove(off).is_some() {
                m.l2.insert(off, table, false);
            }
        }
        for (l1_off, i, v, active) in std::mem::take(&mut self.l1_fixes) {
            let i = i as usize;
            let at = l1_off + i as u64 * 8;
            if !self.writable(at) {
                self.say(format!(
                    "Not repairing L1 entry {i} of the table at {l1_off:#x}: the table lies over other metadata"
                ));
                continue;
            }
            q.file()
                .write_at(&v.to_be_bytes(), l1_off + i as u64 * 8)
                .map_err(io("writing a repaired L1 entry"))?;
            if active {
                m.l1[i] = v;
            }
        }
        q.sync_file()
    }

    /// Builds a refcount structure for the counted references: blocks first,
    /// then the table, each in the first free clusters; switches the header
    /// to it. The old structure stays counted until the recount frees it.
    pub(super) fn write_new_refcounts(&mut self, m: &mut Tables) -> Result<()> {
        let q = self.q;
        let cs = self.cs;
        if self.incomplete {
            // Keep or raise, never drop: references in what could not be
            // read are unknown, so the stored refcount stands where it is
            // higher (and readable).
            self.say(
                "Part of the metadata could not be read: the rebuilt refcounts keep every higher stored refcount".into(),
            );
            for c in 0..self.refs.len() as u64 {
                if let Ok(stored) = self.stored(m, c) {
                    let r = &mut self.refs[c as usize];
                    *r = (*r).max(stored.min(u32::MAX as u64) as u32);
                }
            }
        }
        let bits = m.header.refcount_bits();
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let per = q.rc_per_block(m) as usize;
        let refs = &mut self.refs;
        let pinned = &self.pinned;
        let mut first_free = 0usize;
        let mut blocks: Vec<u64> = Vec::new();
        let mut table: Option<(usize, usize)> = None;
        loop {
            let mut added = false;
            let mut b = 0;
            while b * per < refs.len() {
                if blocks.len() <= b {
                    blocks.resize(b + 1, 0);
                }
                let end = ((b + 1) * per).min(refs.len());
                if blocks[b] == 0 && refs[b * per..end].iter().any(|&r| r != 0) {
                    blocks[b] = alloc_run(refs, pinned, &mut first_free, 1) as u64;
                    added = true;
                }
                b += 1;
            }
            let need = (blocks.len() * 8).div_ceil(cs as usize);
            match table {
                Some((_, n)) if n >= need => {
                    if !added {
                        break;
                    }
                }
                _ => {
                    if let Some((s, n)) = table {
                        refs[s..s + n].fill(0);
                        first_free = first_free.min(s);
                    }
                    table = Some((alloc_run(refs, pinned, &mut first_free, need), need));
                }
            }
        }
        let (table_start, table_clusters) = table.expect("allocated above");
        if table_clusters as u64 * cs > header::MAX_REFTABLE_BYTES {
            // Such a header would not open again: refuse before writing.
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cannot rebuild the refcount structure: its table would need {table_clusters} clusters, more than the 8 MiB a refcount table may have"
                ),
            ));
        }
        if let Some(c) = refs.iter().position(|&r| r as u64 > max) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "cannot rebuild the refcount structure: cluster {c} has {} references, more than {bits}-bit refcounts hold",
                    refs[c]
                ),
            ));
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        let mut entries = vec![0u64; table_clusters * cs as usize / 8];
        for (b, &c) in blocks.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            let end = ((b + 1) * per).min(refs.len());
            for (i, &r) in refs[b * per..end].iter().enumerate() {
                if r != 0 {
                    Qcow2::set_rc_entry(&mut block, i as u64, bits, r as u64);
                }
            }
            q.file()
                .write_at(&block, c * cs)
                .map_err(io("writing a refcount block"))?;
            entries[b] = c * cs;
        }
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        let table_off = table_start as u64 * cs;
        q.file()
            .write_at(&bytes, table_off)
            .map_err(io("writing the refcount table"))?;
        q.sync_file()?;
        m.header.refcount_table_offset = table_off;
        m.header.refcount_table_clusters = table_clusters as u32;
        q.write_header(m)?;
        q.sync_file()?;
        m.rc_table = entries;
        m.rc_table_dirty.clear();
        m.rc.clear();
        m.free_hint = 0;
        m.pending_free.clear();
        self.blocks.clear();
        Ok(())
    }

    /// Step 4: COPIED must be set exactly on active L1 and L2 entries whose
    /// cluster has refcount 1.
    pub(super) fn check_copied(&mut self, m: &mut Tables) -> Result<()> {
        let q = self.q;
        let cs = self.cs;
        let fix = self.repair == Some(RepairMode::All);
        let data_in_file = !q.external_data;
        let l1_off = m.header.l1_table_offset;
        for i1 in 0..m.l1.len() {
            let e = m.l1[i1];
            let l2 = e & entry::L1_OFFSET_MASK;
            if l2 == 0 || !l2.is_multiple_of(cs) {
                continue;
            }
            // An unreadable refcount was counted as a check error already.
            let Ok(r) = self.stored(m, l2 / cs) else {
                continue;
            };
            if (r == 1) != (e & entry::COPIED != 0) {
                let msg =
                    format!("OFLAG_COPIED L2 cluster: l1_index={i1} l1_entry={e:x} refcount={r}");
                if fix && self.writable(l1_off + i1 as u64 * 8) {
                    let v = e ^ entry::COPIED;
                    q.file()
                        .write_at(&v.to_be_bytes(), l1_off + i1 as u64 * 8)
                        .map_err(|e| Error::io("writing the L1 table", e))?;
                    m.l1[i1] = v;
                    self.repaired(format!("Repairing {msg}"));
                } else {
                    self.error(format!("ERROR {msg}"));
                }
            }
            if !data_in_file || !self.in_file(l2, cs) {
                continue;
            }
            let mut table = match self.read_l2(m, l2) {
                Ok(t) => t,
                Err(err) => {
                    self.res.check_errors += 1;
                    self.say(format!("ERROR reading the L2 table at {l2:#x}: {err}"));
                    continue;
                }
            };
            let mut changed = false;
            for i2 in 0..q.l2_entries as usize {
                let (raw, bitmap) = q.l2_get(&table, i2);
                let off = raw & entry::L2_OFFSET_MASK;
                if raw & entry::COMPRESSED != 0 || off == 0 {
                    continue;
                }
                let Ok(r) = self.stored(m, off / cs) else {
                    continue;
                };
                if (r == 1) != (raw & entry::COPIED != 0) {
                    let msg = format!("OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={r}");
                    if fix {
                        q.l2_set(&mut table, i2, raw ^ entry::COPIED, bitmap);
                        changed = true;
                        self.repaired(format!("Repairing {msg}"));
                    } else {
                        self.error(format!("ERROR {msg}"));
                    }
                }
            }
            if changed {
                self.l2_fixes.insert(l2, table);
            }
        }
        if !self.l2_fixes.is_empty() {
            self.apply_entry_fixes(m)?;
        }
        Ok(())
    }
}

/// First-fit allocation of `n` free clusters in the counts (growing them at
/// the end); marks them used and returns the first. `first_free` is a lower
/// bound of the first free cluster.
fn alloc_run(refs: &mut Vec<u32>, pinned: &[bool], first_free: &mut usize, n: usize) -> usize {
    let mut start = *first_free;
    let mut i = start;
    loop {
        if i >= refs.len() {
            refs.resize(i + 1, 0);
        }
        if refs[i] != 0 || pinned.get(i) == Some(&true) {
            start = i + 1;
        } else if i + 1 - start == n {
            break;
        }
        i += 1;
    }
    refs[start..start + n].fill(1);
    if start == *first_free {
        *first_free = start + n;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_takes_the_first_hole_that_is_large_enough() {
        let mut refs = vec![1, 0, 1, 0, 0, 1];
        let mut ff = 0;
        assert_eq!(alloc_run(&mut refs, &[], &mut ff, 2), 3);
        assert_eq!(refs, vec![1, 0, 1, 1, 1, 1]);
        assert_eq!(alloc_run(&mut refs, &[], &mut ff, 1), 1);
        assert_eq!(alloc_run(&mut refs, &[], &mut ff, 2), 6);
        assert_eq!(refs.len(), 8);
    }
}
