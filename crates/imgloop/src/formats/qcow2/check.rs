//! Consistency check and repair.
//!
//! The check walks every structure that references clusters (header, L1
//! and L2 tables of the active image and of each snapshot, the snapshot
//! table, the refcount structure, bitmaps), counts the references per host
//! cluster and compares them with the stored refcounts. Stored refcounts
//! that are too high are leaks; too low (including two structures using
//! one cluster) are corruptions. `-r leaks` lowers leaked refcounts;
//! `-r all` also zeroes invalid L2 entries, rebuilds the whole refcount
//! structure at the end of the file when any refcount is too low, and
//! fixes COPIED flags.

use super::entry::{self, Cluster};
use super::{header, read_u64_table, snapshot, Meta, Qcow2};
use crate::driver::{CheckReport, RepairMode};
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

/// Most clusters a check tracks (512 MiB of counters).
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;

struct Scan {
    cs: u64,
    refs: Vec<u32>,
    report: CheckReport,
    /// Invalid L2 entries: (table offset, index).
    bad_entries: Vec<(u64, usize)>,
    /// Corruptions of refcounts (stored too low).
    rc_corruptions: u64,
    /// Other corruptions that a refcount rebuild does not fix.
    other_corruptions: u64,
}

impl Scan {
    /// Counts one reference to every cluster of `[off, off+len)`.
    fn add(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        if last >= self.refs.len() as u64 {
            self.report.corruptions += 1;
            self.other_corruptions += 1;
            self.report.messages.push(format!(
                "ERROR {what} at offset {off:#x} lies past the end of the image file"
            ));
            return;
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.other_corruptions += 1;
        self.report.messages.push(msg);
    }
}

/// Checks (and repairs) `q`.
pub(super) fn check(q: &Qcow2, repair: Option<RepairMode>) -> Result<CheckReport> {
    let first = scan(q, repair)?;
    if repair.is_some() && (first.report.corruptions_fixed > 0 || first.report.leaks_fixed > 0) {
        let mut second = scan(q, None)?.report;
        second.corruptions_fixed = first.report.corruptions_fixed;
        second.leaks_fixed = first.report.leaks_fixed;
        let mut msgs = first.report.messages;
        msgs.push("Double checking the fixed image now...".into());
        msgs.extend(second.messages);
        second.messages = msgs;
        return Ok(second);
    }
    Ok(first.report)
}

fn read_l2(q: &Qcow2, off: u64) -> Result<Box<[u8]>> {
    q.read_cluster(off, "L2 table")
}

/// Walks one L1 table; `active` collects statistics.
fn walk_l1(q: &Qcow2, s: &mut Scan, m: &mut Meta, l1: &[u64], l1_off: u64, active: bool) {
    let cs = s.cs;
    let data_in_file = Arc::ptr_eq(&q.file, &q.data);
    let mut prev_host = None::<u64>;
    for (i1, &e) in l1.iter().enumerate() {
        let l2 = e & entry::L1_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if e & entry::L1_RESERVED != 0 || !l2.is_multiple_of(cs) {
            s.corrupt(format!(
                "ERROR L1 entry {i1} of the L1 table at {l1_off:#x} is invalid ({e:#x})"
            ));
            continue;
        }
        s.add(l2, cs, "L2 table");
        if l2 / cs >= s.refs.len() as u64 {
            continue;
        }
        // Prefer the cached copy: it may hold changes not yet written.
        let table: Box<[u8]> = match m.l2.peek(l2) {
            Some(t) => t.into(),
            None => match read_l2(q, l2) {
                Ok(t) => t,
                Err(_) => {
                    s.report.check_errors += 1;
                    continue;
                }
            },
        };
        for i2 in 0..q.l2_entries as usize {
            let (raw, bitmap) = q.l2_get(&table, i2);
            let guest = (i1 as u64 * q.l2_entries + i2 as u64) * cs;
            match entry::decode(raw, bitmap, q.cluster_bits, q.ext_l2, q.v3) {
                Err(why) => {
                    s.corrupt(format!(
                        "ERROR L2 entry {i2} of the L2 table at {l2:#x} (guest offset {guest:#x}): {}",
                        why.describe()
                    ));
                    s.bad_entries.push((l2, i2));
                }
                Ok(Cluster::Unallocated) | Ok(Cluster::Zero { host: None, .. }) => {}
                Ok(Cluster::Normal { host, .. })
                | Ok(Cluster::Zero {
                    host: Some(host), ..
                }) => {
                    let is_zero = matches!(
                        entry::decode(raw, bitmap, q.cluster_bits, q.ext_l2, q.v3),
                        Ok(Cluster::Zero { .. })
                    );
                    if data_in_file {
                        if host / cs >= s.refs.len() as u64 {
                            s.corrupt(format!(
                                "ERROR data cluster of guest offset {guest:#x} at host offset {host:#x} lies past the end of the image file"
                            ));
                            s.bad_entries.push((l2, i2));
                            continue;
                        }
                        s.add(host, cs, "data cluster");
                    }
                    if active && !is_zero {
                        s.report.allocated_clusters =
                            Some(s.report.allocated_clusters.unwrap_or(0) + 1);
                        if prev_host.is_some_and(|p| p + cs != host) {
                            s.report.fragmented_clusters =
                                Some(s.report.fragmented_clusters.unwrap_or(0) + 1);
                        }
                        prev_host = Some(host);
                    }
                }
                Ok(Cluster::Compressed { host, len }) => {
                    let file_end = s.refs.len() as u64 * cs;
                    if host >= file_end {
                        s.corrupt(format!(
                            "ERROR compressed cluster of guest offset {guest:#x} at host offset {host:#x} lies past the end of the image file"
                        ));
                        s.bad_entries.push((l2, i2));
                        continue;
                    }
                    s.add(host, len.min(file_end - host), "compressed cluster");
                    if active {
                        s.report.allocated_clusters =
                            Some(s.report.allocated_clusters.unwrap_or(0) + 1);
                        s.report.compressed_clusters =
                            Some(s.report.compressed_clusters.unwrap_or(0) + 1);
                        prev_host = None;
                    }
                }
            }
        }
    }
}

struct ScanResult {
    report: CheckReport,
}

fn scan(q: &Qcow2, repair: Option<RepairMode>) -> Result<ScanResult> {
    let mut m = q.lock();
    let cs = q.cluster_size;
    let file_len = q
        .file
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    let nclusters = file_len.div_ceil(cs);
    if nclusters > MAX_CHECK_CLUSTERS {
        return Err(Error::unsupported(format!(
            "checking images of more than {MAX_CHECK_CLUSTERS} clusters"
        )));
    }
    let mut s = Scan {
        cs,
        refs: vec![0u32; nclusters as usize],
        report: CheckReport::default(),
        bad_entries: Vec::new(),
        rc_corruptions: 0,
        other_corruptions: 0,
    };
    let size = q.size.load(std::sync::atomic::Ordering::Acquire);
    s.report.total_clusters = Some(size.div_ceil(cs));
    s.add(0, cs, "header");

    let h = m.header.clone();
    s.add(h.l1_table_offset, h.l1_size as u64 * 8, "L1 table");
    let l1 = m.l1.clone();
    walk_l1(q, &mut s, &mut m, &l1, h.l1_table_offset, true);

    if h.nb_snapshots > 0 {
        match snapshot::read_table(&*q.file, h.snapshots_offset, h.nb_snapshots) {
            Ok(t) => {
                s.add(h.snapshots_offset, t.bytes, "snapshot table");
                for snap in &t.entries {
                    if snap.l1_table_offset % cs != 0
                        || snap.l1_size as u64 * 8 > header::MAX_L1_BYTES
                    {
                        s.corrupt(format!(
                            "ERROR snapshot '{}' has an invalid L1 table",
                            snap.id
                        ));
                        continue;
                    }
                    s.add(
                        snap.l1_table_offset,
                        snap.l1_size as u64 * 8,
                        "snapshot L1 table",
                    );
                    match read_u64_table(
                        &*q.file,
                        snap.l1_table_offset,
                        snap.l1_size as u64,
                        "snapshot L1 table",
                    ) {
                        Ok(sl1) => walk_l1(q, &mut s, &mut m, &sl1, snap.l1_table_offset, false),
                        Err(_) => s.report.check_errors += 1,
                    }
                }
            }
            Err(e) => {
                s.corrupt(format!("ERROR snapshot table: {e}"));
            }
        }
    }

    if h.autoclear_features & header::autoclear::BITMAPS != 0 {
        if let Some(ext) = h.extension(header::ext::BITMAPS) {
            count_bitmaps(q, &mut s, ext);
        }
    }

    // References without the refcount structure (for a rebuild).
    let refs_without_rc = s.refs.clone();
    s.add(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
        "refcount table",
    );
    let mut rc_structure_broken = false;
    for (i, &b) in m.rc_table.clone().iter().enumerate() {
        if b == 0 {
            continue;
        }
        if b % cs != 0 || b / cs >= nclusters {
            rc_structure_broken = true;
            s.corrupt(format!(
                "ERROR refcount block {i} at {b:#x} is invalid or past the end of the file"
            ));
            continue;
        }
        s.add(b, cs, "refcount block");
    }

    // Compare.
    let mut fix: Vec<(u64, u64)> = Vec::new();
    for c in 0..nclusters {
        let stored = match q.refcount(&mut m, c) {
            Ok(r) => r,
            Err(_) => {
                rc_structure_broken = true;
                s.report.check_errors += 1;
                continue;
            }
        };
        let want = s.refs[c as usize] as u64;
        if stored == want {
            continue;
        }
        if stored < want {
            s.report.corruptions += 1;
            s.rc_corruptions += 1;
            s.report.messages.push(format!(
                "ERROR cluster {c} refcount={stored} reference={want}"
            ));
        } else {
            s.report.leaks += 1;
            s.report.messages.push(format!(
                "Leaked cluster {c} refcount={stored} reference={want}"
            ));
        }
        fix.push((c, want));
    }
    let highest = s
        .refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(0, |i| i as u64 + 1);
    s.report.image_end_offset = Some(highest * cs);

    // COPIED flags of the active tables.
    let mut copied_fixes: Vec<(usize, Option<usize>)> = Vec::new();
    if !rc_structure_broken {
        for (i1, &e) in m.l1.clone().iter().enumerate() {
            let l2 = e & entry::L1_OFFSET_MASK;
            if l2 == 0 || !l2.is_multiple_of(cs) || l2 / cs >= nclusters {
                continue;
            }
            let want_copied = s.refs[(l2 / cs) as usize] == 1;
            if (e & entry::COPIED != 0) != want_copied {
                s.corrupt(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i1} l1_entry={e:x} refcount={}",
                    s.refs[(l2 / cs) as usize]
                ));
                copied_fixes.push((i1, None));
            }
        }
    }

    let Some(mode) = repair else {
        return Ok(ScanResult { report: s.report });
    };
    drop(m);
    repair_image(
        q,
        &mut s,
        mode,
        &fix,
        &refs_without_rc,
        rc_structure_broken,
        &copied_fixes,
    )?;
    Ok(ScanResult { report: s.report })
}

fn count_bitmaps(q: &Qcow2, s: &mut Scan, ext: &[u8]) {
    if ext.len() < 24 {
        s.corrupt("ERROR bitmaps extension is too short".into());
        return;
    }
    let nb = u32::from_be_bytes(ext[0..4].try_into().expect("4")) as u64;
    let dir_size = u64::from_be_bytes(ext[8..16].try_into().expect("8"));
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().expect("8"));
    if dir_size > 64 << 20 || nb > 65535 {
        s.corrupt("ERROR bitmap directory is too large".into());
        return;
    }
    s.add(dir_off, dir_size, "bitmap directory");
    let mut dir = vec![0u8; dir_size as usize];
    if q.file.read_at(&mut dir, dir_off).is_err() {
        s.report.check_errors += 1;
        return;
    }
    let mut pos = 0usize;
    for _ in 0..nb {
        if pos + 24 > dir.len() {
            s.corrupt("ERROR bitmap directory entry is truncated".into());
            return;
        }
        let e = &dir[pos..];
        let table_off = u64::from_be_bytes(e[0..8].try_into().expect("8"));
        let table_size = u32::from_be_bytes(e[8..12].try_into().expect("4")) as u64;
        let name_size = u16::from_be_bytes(e[14..16].try_into().expect("2")) as usize;
        let extra = u32::from_be_bytes(e[16..20].try_into().expect("4")) as usize;
        s.add(table_off, table_size * 8, "bitmap table");
        if table_size <= (1 << 24) {
            if let Ok(t) = read_u64_table(&*q.file, table_off, table_size, "bitmap table") {
                for v in t {
                    let off = v & entry::L2_OFFSET_MASK;
                    if off > 1 {
                        s.add(off, s.cs, "bitmap data");
                    }
                }
            }
        }
        pos += (24 + extra + name_size).div_ceil(8) * 8;
    }
}

fn repair_image(
    q: &Qcow2,
    s: &mut Scan,
    mode: RepairMode,
    fix: &[(u64, u64)],
    refs_without_rc: &[u32],
    rc_broken: bool,
    copied_fixes: &[(usize, Option<usize>)],
) -> Result<()> {
    let mut m = q.lock();
    let cs = s.cs;
    if mode == RepairMode::All {
        // Invalid L2 entries become unallocated.
        for &(table, idx) in &s.bad_entries {
            q.load_l2(&mut m, table)?;
            let t = m.l2.get_mut(table).expect("loaded");
            q.l2_set(t, idx, 0, 0);
            s.report.corruptions_fixed += 1;
            s.report.corruptions = s.report.corruptions.saturating_sub(1);
        }
        q.flush_meta(&mut m)?;
    }
    if mode == RepairMode::All && (s.rc_corruptions > 0 || rc_broken || !s.bad_entries.is_empty()) {
        // Rebuild: recount without the dropped entries' clusters is not
        // needed: freed references become leaks the rebuild drops anyway.
        rebuild_refcounts(q, &mut m, refs_without_rc)?;
        s.report.corruptions_fixed += s.rc_corruptions;
        s.report.leaks_fixed += s.report.leaks;
        s.report.corruptions = s.report.corruptions.saturating_sub(s.rc_corruptions);
        s.report.leaks = 0;
    } else {
        for &(c, want) in fix {
            let stored = q.refcount(&mut m, c)?;
            if stored > want {
                q.set_refcount(&mut m, c, want)?;
                s.report.leaks_fixed += 1;
                s.report.leaks -= 1;
            } else if mode == RepairMode::All {
                q.set_refcount(&mut m, c, want)?;
                s.report.corruptions_fixed += 1;
                s.report.corruptions -= 1;
            }
        }
        q.flush_refcounts(&mut m)?;
    }
    if mode == RepairMode::All {
        for &(i1, _) in copied_fixes {
            let e = m.l1[i1];
            let l2 = e & entry::L1_OFFSET_MASK;
            let rc = q.refcount(&mut m, l2 / cs)?;
            m.l1[i1] = if rc == 1 {
                e | entry::COPIED
            } else {
                e & !entry::COPIED
            };
            m.l1_dirty.insert(i1);
            s.report.corruptions_fixed += 1;
            s.report.corruptions = s.report.corruptions.saturating_sub(1);
        }
        fix_data_copied_flags(q, &mut m)?;
    }
    if m.header.incompatible_features & header::incompat::CORRUPT != 0 && s.report.corruptions == 0
    {
        m.header.incompatible_features &= !header::incompat::CORRUPT;
        m.corrupt = false;
        q.write_header(&m)?;
    }
    q.flush_meta(&mut m)?;
    q.sync_file()
}

/// Sets COPIED on data clusters with refcount 1 and clears it elsewhere.
fn fix_data_copied_flags(q: &Qcow2, m: &mut Meta) -> Result<()> {
    let cs = q.cluster_size;
    if !Arc::ptr_eq(&q.file, &q.data) {
        return Ok(());
    }
    for i1 in 0..m.l1.len() {
        let l2 = m.l1[i1] & entry::L1_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        q.load_l2(m, l2)?;
        for i2 in 0..q.l2_entries as usize {
            let (e, b) = q.l2_get(m.l2.get(l2).expect("loaded"), i2);
            let host = match entry::decode(e, b, q.cluster_bits, q.ext_l2, q.v3) {
                Ok(c) => match c.host_cluster() {
                    Some(h) => h,
                    None => continue,
                },
                Err(_) => continue,
            };
            let rc = q.refcount(m, host / cs)?;
            let want = if rc == 1 {
                e | entry::COPIED
            } else {
                e & !entry::COPIED
            };
            if want != e {
                q.load_l2(m, l2)?;
                let t = m.l2.get_mut(l2).expect("loaded");
                q.l2_set(t, i2, want, b);
            }
        }
    }
    Ok(())
}

/// Writes a new refcount structure after the end of the file holding the
/// counted references, and switches the header to it.
fn rebuild_refcounts(q: &Qcow2, m: &mut Meta, refs: &[u32]) -> Result<()> {
    let cs = q.cluster_size;
    let bits = m.header.refcount_bits();
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if refs.iter().any(|&r| r as u64 > max) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "cannot rebuild refcounts: a reference count overflows the refcount width",
        ));
    }
    let per = q.rc_per_block(m);
    let start = refs.len() as u64;
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = start + blocks + table;
        let nb = total.div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if nb == blocks && nt == table {
            break;
        }
        blocks = nb;
        table = nt;
    }
    if table * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::new(
            ErrorKind::NoSpace,
            "rebuilt refcount table would exceed 8 MiB",
        ));
    }
    let total = start + blocks + table;
    let mut all = vec![0u8; (blocks * cs) as usize];
    for c in 0..total {
        let r = if c < start {
            refs[c as usize] as u64
        } else {
            1
        };
        if r > 0 {
            Qcow2::set_rc_entry(&mut all, c, bits, r);
        }
    }
    let blocks_off = start * cs;
    let table_off = blocks_off + blocks * cs;
    let mut t = vec![0u64; (table * cs / 8) as usize];
    for b in 0..blocks {
        t[b as usize] = blocks_off + b * cs;
    }
    let tbytes: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
    let io = |what: &'static str| move |e| Error::io(what, e);
    q.file
        .write_at(&all, blocks_off)
        .map_err(io("writing refcount blocks"))?;
    q.file
        .write_at(&tbytes, table_off)
        .map_err(io("writing the refcount table"))?;
    q.sync_file()?;
    m.header.refcount_table_offset = table_off;
    m.header.refcount_table_clusters = table as u32;
    q.write_header(m)?;
    q.sync_file()?;
    m.rc_table = t;
    m.rc.clear();
    m.free_hint = 0;
    m.pending_free.clear();
    Ok(())
}
