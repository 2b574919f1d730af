//! Steps 1 and 2 of a check: counting every reference, and comparing
//! the counts with the stored refcounts.

use super::*;

impl Pass<'_> {
    /// Step 1: counts every reference.
    pub(super) fn count(&mut self, m: &Tables) {
        let cs = self.cs;
        let h = m.header.clone();
        self.inc_or_report(0, cs);
        // An L1 table longer than the virtual size needs, whose extra part
        // runs a cluster or more past the end of the file or holds invalid
        // entries: nothing can use those entries, so `-r all` trims the
        // table to what is needed (the rest of its clusters become leaks).
        let needed = h.size.div_ceil(cs * self.q.l2_entries) as usize;
        let l1_end = h.l1_table_offset.saturating_add(h.l1_size as u64 * 8);
        let extra_bad = m.l1.len() > needed
            && (!self.in_file(h.l1_table_offset, h.l1_size as u64 * 8)
                || m.l1[needed..].iter().any(|&e| {
                    e & entry::L1_RESERVED != 0
                        || !(e & entry::L1_OFFSET_MASK).is_multiple_of(cs)
                        || (e & entry::L1_OFFSET_MASK) >= self.file_len
                }));
        let walk = if self.fix_entries && extra_bad && self.trim_l1.is_none() {
            self.trim_l1 = Some(needed);
            self.repaired(format!(
                "Repairing L1 table: {} entries, the virtual size needs {needed} and the rest (up to offset {l1_end:#x}) cannot be used; trimmed to {needed}",
                h.l1_size
            ));
            needed
        } else {
            self.trim_l1.unwrap_or(m.l1.len()).min(m.l1.len())
        };
        if let Some((off, len)) = h.crypto_header() {
            // The LUKS header and key material.
            self.inc_or_report(off, len);
        }
        self.inc_or_report(h.l1_table_offset, walk as u64 * 8);
        self.walk_l1(m, &m.l1[..walk], h.l1_table_offset, true);

        if h.nb_snapshots == 0 {
            if h.snapshots_offset != 0 && !h.snapshots_offset.is_multiple_of(cs) {
                // qemu-img refuses to open this; nothing uses the offset.
                if self.fix_entries {
                    self.fix_snapshots_offset = true;
                    self.repaired(
                        "Repairing snapshot table offset invalid (no snapshots): cleared".into(),
                    );
                } else {
                    self.error("ERROR snapshot table offset invalid".into());
                }
            }
        } else if !h.snapshots_offset.is_multiple_of(cs) {
            self.unknown("ERROR snapshot table offset invalid".into());
            self.pin(h.snapshots_offset, 64 << 20);
        } else {
            match snapshot::read_table(self.q.file(), h.snapshots_offset, h.nb_snapshots) {
                Ok(t) => {
                    self.inc_or_report(h.snapshots_offset, t.bytes);
                    for snap in &t.entries {
                        let l1_bytes = snap.l1_size as u64 * 8;
                        if !snap.l1_table_offset.is_multiple_of(cs)
                            || l1_bytes > header::MAX_L1_BYTES
                        {
                            self.pin(snap.l1_table_offset, l1_bytes.min(header::MAX_L1_BYTES));
                            self.unknown(format!(
                                "ERROR snapshot '{}' has an invalid L1 table (offset {:#x}, {} entries); snapshot table entry corrupted",
                                snap.id, snap.l1_table_offset, snap.l1_size
                            ));
                            continue;
                        }
                        self.inc_or_report(snap.l1_table_offset, l1_bytes);
                        match read_u64_table(
                            self.q.file(),
                            snap.l1_table_offset,
                            snap.l1_size as u64,
                            cs,
                            "snapshot L1 table",
                        ) {
                            Ok(sl1) => self.walk_l1(m, &sl1, snap.l1_table_offset, false),
                            Err(e) => {
                                self.res.check_errors += 1;
                                self.unknown(format!("ERROR reading a snapshot L1 table: {e}"));
                            }
                        }
                    }
                }
                Err(e) => {
                    self.pin(h.snapshots_offset, 64 << 20);
                    self.unknown(format!("ERROR snapshot table: {e}"));
                }
            }
        }

        if h.autoclear_features & header::autoclear::BITMAPS != 0 {
            if let Some(ext) = h.extension(header::ext::BITMAPS) {
                self.count_bitmaps(ext);
            }
        }

        self.inc_or_report(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        );
        let file_clusters = self.file_len.div_ceil(cs);
        for (i, &e) in m.rc_table.clone().iter().enumerate() {
            if e & RT_RESERVED != 0 {
                self.error(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if e == 0 {
                continue;
            }
            if !e.is_multiple_of(cs) {
                self.error(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if e / cs >= file_clusters {
                self.error(format!("ERROR refcount block {i} is outside image"));
                self.rebuild = true;
                continue;
            }
            self.inc(e, cs);
            let r = self.refs[(e / cs) as usize];
            if r != 1 {
                self.error(format!("ERROR refcount block {i} refcount={r}"));
                self.rebuild = true;
            }
        }
    }

    /// Walks one L1 table and its L2 tables; `active` collects statistics.
    pub(super) fn walk_l1(&mut self, m: &Tables, l1: &[u64], l1_off: u64, active: bool) {
        let cs = self.cs;
        let fix = self.fix_entries;
        for (i, &orig) in l1.iter().enumerate() {
            let mut e = orig;
            if e & entry::L1_RESERVED != 0 {
                if fix {
                    e &= !entry::L1_RESERVED;
                    self.repaired(format!(
                        "Repairing L1 entry {i} with reserved bits set: {orig:x}"
                    ));
                } else {
                    self.error(format!(
                        "ERROR found L1 entry with reserved bits set: {orig:x}"
                    ));
                }
            }
            let l2 = e & entry::L1_OFFSET_MASK;
            if l2 != 0 && (!l2.is_multiple_of(cs) || !self.in_file(l2, cs)) {
                let why = if l2.is_multiple_of(cs) {
                    format!("L2 table at {l2:#x} lies past the end of the file")
                } else {
                    format!("l2_offset={l2:x}: Table is not cluster aligned")
                };
                if fix {
                    self.repaired(format!("Repairing {why}; L1 entry {i} cleared"));
                    self.l1_fixes.push((l1_off, i as u32, 0, active));
                } else if l2.is_multiple_of(cs) {
                    self.inc_or_report(l2, cs);
                } else {
                    // QEMU goes on reading a table at the unaligned offset;
                    // imgloop does not trust what it would find there.
                    self.error(format!("ERROR {why}; L1 entry corrupted"));
                    self.inc_or_report(l2, cs);
                }
                continue;
            }
            if l2 == 0 && e != 0 {
                // Flags without a table: qemu-img takes cluster 0 for an
                // L2 table; nothing can be read there.
                if fix {
                    self.repaired(format!(
                        "Repairing L1 entry {i} with flags but no L2 table: {orig:x}"
                    ));
                    e = 0;
                } else {
                    self.error(format!(
                        "ERROR L1 entry {i} has flags set but no L2 table: {orig:x}"
                    ));
                }
            }
            if e != orig {
                self.l1_fixes.push((l1_off, i as u32, e, active));
            }
            if l2 == 0 {
                continue;
            }
            self.inc(l2, cs);
            let mut table = match self.read_l2(m, l2) {
                Ok(t) => t,
                Err(err) => {
                    self.res.check_errors += 1;
                    self.unknown(format!("ERROR reading the L2 table at {l2:#x}: {err}"));
                    continue;
                }
            };
            // Fragmentation counts breaks in host contiguity inside each
            // L2 table, as qemu-img does.
            self.next_contiguous = 0;
            let mut changed = false;
            for i2 in 0..self.q.l2_entries as usize {
                changed |= self.check_l2_entry(&mut table, i2, active);
            }
            if changed {
                self.l2_fixes.insert(l2, table);
            }
        }
    }

    /// Checks and counts one L2 entry; true when it was repaired in `table`.
    pub(super) fn check_l2_entry(&mut self, table: &mut [u8], i2: usize, active: bool) -> bool {
        let q = self.q;
        let cs = self.cs;
        let fix = self.fix_entries;
        let (orig, orig_bitmap) = q.l2_get(table, i2);
        let (mut raw, mut bitmap) = (orig, orig_bitmap);
        if raw & entry::COMPRESSED != 0 {
            if q.ext_l2 && bitmap != 0 {
                let msg = format!(
                    "compressed cluster {i2} with non-zero subcluster allocation bitmap, entry={raw:#x}"
                );
                if fix {
                    bitmap = 0;
                    self.repaired(format!("Repairing {msg}"));
                } else {
                    self.error(format!("ERROR {msg}"));
                }
            }
            let Ok(Cluster::Compressed { host, len }) =
                entry::decode(raw & !entry::COPIED, 0, q.cluster_bits, q.ext_l2, q.v3())
            else {
                unreachable!("compressed descriptors always decode")
            };
            if raw & entry::COPIED != 0 {
                let msg = format!(
                    "coffset={host:#x}: copied flag must never be set for compressed clusters"
                );
                if fix {
                    raw &= !entry::COPIED;
                    self.repaired(format!("Repairing {msg}"));
                } else {
                    self.error(format!("ERROR: {msg}"));
                }
            }
            if active {
                self.allocated += 1;
                self.compressed += 1;
                self.fragmented += 1;
            }
            if !self.inc(host, len) {
                if !fix {
                    self.error(Self::eof_message(host, len));
                } else if host < self.file_len {
                    // Keep the stream, cut its size at the end of the file.
                    let end = self.file_len.div_ceil(512) * 512;
                    let cut = end - host;
                    raw = entry::encode_compressed(host, cut, q.cluster_bits);
                    self.inc(host, cut);
                    self.repaired(format!(
                        "Repairing compressed cluster at {host:#x}: size {len:#x} reaches past the end of the file, cut to {cut:#x}"
                    ));
                } else {
                    (raw, bitmap) = self.zero_entry();
                    self.repaired(format!(
                        "Repairing compressed cluster at {host:#x} past the end of the file; the guest cluster now reads as zeroes"
                    ));
                }
            }
        } else {
            let reserved = if q.v3() || q.ext_l2 {
                entry::L2_RESERVED
            } else {
                entry::L2_RESERVED | entry::ZERO
            };
            if raw & reserved != 0 {
                if fix {
                    raw &= !reserved;
                    self.repaired(format!(
                        "Repairing L2 entry with reserved bits set: {orig:x}"
                    ));
                } else {
                    self.error(format!(
                        "ERROR found l2 entry with reserved bits set: {orig:x}"
                    ));
                }
            }
            let off = raw & entry::L2_OFFSET_MASK;
            // Offset 0 is a real location in an external data file when
            // COPIED is set.
            let has_host = off != 0 || (q.external_data && raw & entry::COPIED != 0);
            let zero_flag = !q.ext_l2 && raw & entry::ZERO != 0;
            if q.ext_l2 {
                if !has_host && bitmap & entry::ALL_ALLOC != 0 {
                    let msg = format!(
                        "unallocated cluster {i2} has allocated subclusters (bitmap {bitmap:#x})"
                    );
                    if fix {
                        bitmap &= !entry::ALL_ALLOC;
                        self.repaired(format!("Repairing {msg}"));
                    } else {
                        self.error(format!("ERROR {msg}"));
                    }
                }
                let both = bitmap & (bitmap >> 32) & entry::ALL_ALLOC;
                if both != 0 {
                    let msg = format!(
                        "cluster {i2} has subclusters marked both allocated and zero (bitmap {bitmap:#x})"
                    );
                    if fix {
                        bitmap &= !(both << 32);
                        self.repaired(format!("Repairing {msg}"));
                    } else {
                        self.error(format!("ERROR {msg}"));
                    }
                }
            }
            if has_host {
                if active {
                    self.allocated += 1;
                    if self.next_contiguous != 0 && off != self.next_contiguous {
                        self.fragmented += 1;
                    }
                    self.next_contiguous = off + cs;
                }
                let kind = if zero_flag { "Preallocated" } else { "Data" };
                let data_in_file = !q.external_data;
                if !off.is_multiple_of(cs) {
                    let msg =
                        format!("offset={off:x}: {kind} cluster is not properly aligned; L2 entry corrupted.");
                    if fix {
                        (raw, bitmap) = self.zero_entry();
                        self.repaired(format!("Repairing {msg}"));
                    } else {
                        self.error(format!("ERROR {msg}"));
                        if data_in_file {
                            self.inc_or_report(off, cs);
                        }
                    }
                } else if data_in_file && !self.inc(off, cs) {
                    if fix {
                        (raw, bitmap) = self.zero_entry();
                        self.repaired(format!(
                            "Repairing {kind} cluster at {off:#x} past the end of the file; the guest cluster now reads as zeroes"
                        ));
                    } else {
                        self.error(Self::eof_message(off, cs));
                    }
                }
            }
        }
        if (raw, bitmap) != (orig, orig_bitmap) {
            q.l2_set(table, i2, raw, bitmap);
            return true;
        }
        false
    }

    pub(super) fn count_bitmaps(&mut self, ext: &[u8]) {
        if ext.len() < 24 {
            self.unknown("ERROR bitmaps extension is too short".into());
            return;
        }
        let nb = u32::from_be_bytes(ext[0..4].try_into().expect("4")) as u64;
        let dir_size = u64::from_be_bytes(ext[8..16].try_into().expect("8"));
        let dir_off = u64::from_be_bytes(ext[16..24].try_into().expect("8"));
        if dir_size > 64 << 20 || nb > 65535 {
            self.unknown("ERROR bitmap directory is too large".into());
            return;
        }
        self.inc_or_report(dir_off, dir_size);
        if !self.in_file(dir_off, dir_size) {
            // Reported above; nothing to read (and nothing allocated).
            return;
        }
        let dir = match self.read_padded(dir_off, dir_size) {
            Ok(d) => d,
            Err(e) => {
                self.res.check_errors += 1;
                self.unknown(format!("ERROR reading the bitmap directory: {e}"));
                return;
            }
        };
        let bitmaps = match super::super::bitmap::parse_directory(&dir, nb as u32) {
            Ok(b) => b,
            Err(e) => {
                self.unknown(format!("ERROR bitmap directory: {e}"));
                return;
            }
        };
        for b in bitmaps {
            let table_size = b.table_size as u64;
            self.inc_or_report(b.table_offset, table_size * 8);
            if table_size <= (1 << 24) {
                match read_u64_table(
                    self.q.file(),
                    b.table_offset,
                    table_size,
                    self.cs,
                    "bitmap table",
                ) {
                    Ok(t) => {
                        for v in t {
                            let off = v & entry::L2_OFFSET_MASK;
                            if off > 1 {
                                self.inc_or_report(off, self.cs);
                            }
                        }
                    }
                    Err(e) => self.unknown(format!("ERROR bitmap '{}': {e}", b.name)),
                }
            }
        }
    }

    /// The stored refcount of cluster `c`: 0 where no block covers it (or
    /// the block lies past the end of the file, which reads as zeroes).
    pub(super) fn stored(&mut self, m: &Tables, c: u64) -> Result<u64> {
        let per = self.q.rc_per_block(m);
        let bits = m.header.refcount_bits();
        let b = c / per;
        let Some(&e) = m.rc_table.get(b as usize) else {
            return Ok(0);
        };
        let off = e & !RT_RESERVED;
        if off == 0 {
            return Ok(0);
        }
        if !off.is_multiple_of(self.cs) {
            return Err(Error::corrupt(
                "refcount table",
                m.header.refcount_table_offset,
                format!("refcount block {b} at {off:#x} is not cluster aligned"),
            ));
        }
        if let Some(block) = m.rc.peek(off) {
            return Ok(Qcow2::rc_entry(block, c % per, bits));
        }
        if !self.blocks.contains_key(&off) {
            let block = self.read_padded(off, self.cs).map_err(|e| {
                Error::io(format!("reading refcount block {b}"), e).at("refcount block", off)
            })?;
            self.blocks.insert(off, block);
        }
        Ok(Qcow2::rc_entry(&self.blocks[&off], c % per, bits))
    }

    /// Step 2: stored against counted refcounts. Sets `rebuild` when a
    /// referenced cluster has refcount 0.
    pub(super) fn compare(&mut self, m: &Tables) -> Vec<Mismatch> {
        let mut out = Vec::new();
        for c in 0..self.refs.len() as u64 {
            let stored = match self.stored(m, c) {
                Ok(r) => r,
                Err(why) => {
                    self.res.check_errors += 1;
                    self.say(format!(
                        "Can't get refcount for cluster {c}: {}",
                        why.message()
                    ));
                    continue;
                }
            };
            let want = self.refs[c as usize] as u64;
            if stored > 0 || want > 0 {
                self.highest = c;
            }
            if stored != want {
                if stored == 0 {
                    self.rebuild = true;
                }
                out.push((c, stored, want));
            }
        }
        out
    }

    pub(super) fn mismatch_message(&(c, stored, want): &Mismatch) -> String {
        let kind = if stored < want { "ERROR" } else { "Leaked" };
        format!("{kind} cluster {c} refcount={stored} reference={want}")
    }
}
