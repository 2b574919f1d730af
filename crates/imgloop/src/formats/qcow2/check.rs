//! Consistency check and repair, with the findings, counts and repairs of
//! `qemu-img check`.
//!
//! One call is one pass, like the driver-level check of QEMU; after a
//! repair the caller runs a second, read-only pass to report what is left
//! (the CLI prints "Double checking the fixed image now...").
//!
//! A pass:
//! 1. counts the references to every host cluster: the header, the active
//!    and the snapshot L1 and L2 tables, the snapshot table, bitmaps, the
//!    refcount table and refcount blocks. Invalid entries are reported. A
//!    reference that reaches a cluster or more past the end of the file is
//!    a corruption and is not counted.
//! 2. compares the counts with the stored refcounts: stored higher is a
//!    leak, stored lower a corruption. A stored 0 under a reference, or a
//!    broken refcount table entry or block, means the refcount structure
//!    has to be rebuilt.
//! 3. repairs: `-r leaks` lowers leaked refcounts (it refuses when a rebuild
//!    is needed); `-r all` also raises refcounts that are too low, or
//!    rebuilds the whole refcount structure (blocks, then the table, each in
//!    the first free clusters) and then frees the old one.
//! 4. checks the COPIED flags of the active tables against the (repaired)
//!    refcounts: set exactly when the refcount is 1.
//!
//! A repair that leaves no corruption clears the dirty and corrupt bits.
//!
//! Repairs never make things worse:
//! - when part of the metadata could not be read or walked (a snapshot
//!   table or L1 table that is invalid, an L2 table that cannot be read, a
//!   bitmap directory that does not parse), the references it holds are
//!   unknown, so no refcount is lowered: leaks are left, and a rebuild
//!   keeps every stored refcount that is higher than the count;
//! - new structures of a rebuild go only into clusters nothing reachable
//!   from the header occupies, valid or not (the snapshot table and
//!   bitmap directory as far as the file holds them, every table an entry
//!   names), so nothing that qemu-img could still read is overwritten.
//!
//! Beyond QEMU, `-r all` also repairs what QEMU only reports, so that a
//! repaired image is clean: reserved bits are cleared, an unaligned data
//! cluster or a data cluster or L2 table past the end of the file is
//! dropped (the guest cluster then reads as zeroes, as QEMU reads it), a
//! compressed cluster whose size reaches past the end of the file is cut
//! at the end of the file, and COPIED is cleared on compressed clusters.

use super::entry::{self, Cluster};
use super::open::read_u64_table;
use super::{header, snapshot, Qcow2, Tables};
use crate::driver::{CheckReport, RepairMode};
use crate::error::{Error, ErrorKind, Result};
use std::collections::{BTreeMap, HashMap};

/// Driver option (`DriverOpenOptions::options` key) for opens made to check
/// or repair an image: a read-write open is allowed on an image marked
/// corrupt, a dirty image is not repaired on open (the check does it), and
/// L1 and refcount table entries are not validated up front (the check
/// reports them).
pub const OPEN_FOR_CHECK: &str = "x-check";

/// Most clusters a check tracks (512 MiB of counters).
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;

/// Reserved low bits of a refcount table entry.
const RT_RESERVED: u64 = 0x1ff;

/// Checks (and with `repair`, repairs) `q` in one pass.
pub(super) fn check(q: &Qcow2, repair: Option<RepairMode>) -> Result<CheckReport> {
    // A check reads and a repair writes the tables directly: no flush
    // may run meanwhile.
    let _serial = q.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = q.tables_mut();
    let mut p = Pass::new(q, repair)?;
    p.run(&mut m)?;
    Ok(p.res)
}

/// Repaired L1 entry: (table offset, index, new value, is the active table).
type L1Fix = (u64, u32, u64, bool);

/// Findings kept word for word; past this many, only counted (a crafted
/// table can hold millions of bad entries, and each message costs memory).
const MAX_MESSAGES: usize = 10_000;

struct Pass<'a> {
    q: &'a Qcow2,
    cs: u64,
    file_len: u64,
    repair: Option<RepairMode>,
    /// Repair invalid L1/L2 entries while walking (`-r all`, first count).
    fix_entries: bool,
    res: CheckReport,
    /// References counted per host cluster.
    refs: Vec<u32>,
    rebuild: bool,
    /// Highest cluster with a stored refcount or a reference.
    highest: u64,
    /// Repaired L2 tables, written after the comparison (and rebuild).
    l2_fixes: BTreeMap<u64, Box<[u8]>>,
    l1_fixes: Vec<L1Fix>,
    /// Refcount blocks read during this pass (cleared on every change).
    blocks: HashMap<u64, Box<[u8]>>,
    /// Some metadata could not be read or walked: its references are not
    /// counted, so no refcount may be lowered.
    incomplete: bool,
    /// `-r all`: clear a garbage snapshot table offset (no snapshots).
    fix_snapshots_offset: bool,
    /// `-r all`: the active L1 table is cut to this many entries.
    trim_l1: Option<usize>,
    /// Clusters something reachable from the header occupies, counted or
    /// not: a rebuild never writes there.
    pinned: Vec<bool>,
    /// Statistics of the active image.
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    next_contiguous: u64,
}

/// Differences between stored and counted refcounts: (cluster, stored, counted).
type Mismatch = (u64, u64, u64);

impl<'a> Pass<'a> {
    fn new(q: &'a Qcow2, repair: Option<RepairMode>) -> Result<Self> {
        let cs = q.cluster_size;
        let file_len = q
            .file()
            .len()
            .map_err(|e| Error::io("reading image size", e))?;
        if file_len.div_ceil(cs) > MAX_CHECK_CLUSTERS {
            return Err(Error::unsupported(format!(
                "checking images of more than {MAX_CHECK_CLUSTERS} clusters"
            )));
        }
        Ok(Pass {
            q,
            cs,
            file_len,
            repair,
            fix_entries: repair == Some(RepairMode::All),
            res: CheckReport::default(),
            refs: vec![0; file_len.div_ceil(cs) as usize],
            rebuild: false,
            highest: 0,
            l2_fixes: BTreeMap::new(),
            l1_fixes: Vec::new(),
            blocks: HashMap::new(),
            incomplete: false,
            fix_snapshots_offset: false,
            trim_l1: None,
            pinned: vec![false; file_len.div_ceil(cs) as usize],
            allocated: 0,
            fragmented: 0,
            compressed: 0,
            next_contiguous: 0,
        })
    }

    fn say(&mut self, msg: String) {
        match self.res.messages.len() {
            n if n < MAX_MESSAGES => self.res.messages.push(msg),
            n if n == MAX_MESSAGES => self.res.messages.push(
                "(more findings are counted but not listed: the image is badly damaged)".into(),
            ),
            _ => {}
        }
    }

    /// A corruption left as it is.
    fn error(&mut self, msg: String) {
        self.res.corruptions += 1;
        self.say(msg);
    }

    /// A corruption repaired.
    fn repaired(&mut self, msg: String) {
        self.res.corruptions_fixed += 1;
        self.say(msg);
    }

    /// True when `[off, off+len)` ends less than a cluster past the end of
    /// the file (the last cluster of an image may be partly written).
    fn in_file(&self, off: u64, len: u64) -> bool {
        off.saturating_add(len).saturating_sub(self.file_len) < self.cs
    }

    /// Counts one reference to every cluster of `[off, off+len)`; false
    /// (nothing counted) when the range reaches too far past the file.
    fn inc(&mut self, off: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        self.pin(off, len);
        if !self.in_file(off, len) {
            return false;
        }
        let first = (off / self.cs) as usize;
        let last = ((off + len - 1) / self.cs) as usize;
        if last >= self.refs.len() {
            self.refs.resize(last + 1, 0);
        }
        for r in &mut self.refs[first..=last] {
            *r = r.saturating_add(1);
        }
        true
    }

    /// Marks the clusters of `[off, off+len)` that lie in the file as
    /// occupied (for the rebuild's allocation; not a reference).
    fn pin(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.file_len {
            return;
        }
        let end = off.saturating_add(len).min(self.file_len);
        let first = (off / self.cs) as usize;
        let last = ((end - 1) / self.cs) as usize;
        let last = last.min(self.pinned.len().saturating_sub(1));
        for p in self.pinned.iter_mut().take(last + 1).skip(first) {
            *p = true;
        }
    }

    /// Notes that some metadata could not be read or walked.
    fn unknown(&mut self, msg: String) {
        self.incomplete = true;
        self.error(msg);
    }

    fn eof_message(off: u64, len: u64) -> String {
        format!(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
        )
    }

    /// [`inc`](Self::inc), reporting a range past the end of the file.
    fn inc_or_report(&mut self, off: u64, len: u64) {
        if !self.inc(off, len) {
            self.error(Self::eof_message(off, len));
        }
    }

    /// Reads `len` bytes at `off`; the part past the end of the file reads
    /// as zeroes (as QEMU reads it).
    fn read_padded(&self, off: u64, len: u64) -> std::io::Result<Box<[u8]>> {
        let mut buf = vec![0u8; len as usize].into_boxed_slice();
        if off < self.file_len {
            let n = (self.file_len - off).min(len) as usize;
            self.q.file().read_at(&mut buf[..n], off)?;
        }
        Ok(buf)
    }

    /// An L2 table, from the cache when it is there.
    fn read_l2(&self, m: &Tables, off: u64) -> std::io::Result<Box<[u8]>> {
        match m.l2.peek(off) {
            Some(t) => Ok(t.into()),
            None => self.read_padded(off, self.cs),
        }
    }

    /// The entry that makes a guest cluster read as zeroes (unallocated in
    /// version 2, which has no zero flag).
    fn zero_entry(&self) -> (u64, u64) {
        if self.q.ext_l2 {
            (0, entry::ALL_ZERO)
        } else if self.q.v3 {
            (entry::ZERO, 0)
        } else {
            (0, 0)
        }
    }

    fn run(&mut self, m: &mut Tables) -> Result<()> {
        let size = self.q.size.load(std::sync::atomic::Ordering::Acquire);
        self.res.total_clusters = Some(size.div_ceil(self.cs));
        self.count(m);
        let mismatches = self.compare(m);
        match self.repair {
            Some(RepairMode::All) if self.rebuild => self.rebuild_and_recount(m, &mismatches)?,
            Some(RepairMode::Leaks) if self.rebuild => {
                self.report(&mismatches);
                self.say("ERROR need to rebuild refcount structures".into());
                self.res.check_errors += 1;
                self.finish_stats();
                return Ok(());
            }
            Some(mode) => {
                self.apply_entry_fixes(m)?;
                self.fix_refcounts(m, &mismatches, mode)?;
            }
            None => self.report(&mismatches),
        }
        if let Some(n) = self.trim_l1.filter(|&n| n < m.l1.len()) {
            // Before the COPIED pass: nothing past the needed entries is
            // an L1 entry any more, and nothing may be written there.
            m.l1.truncate(n);
            m.l1_dirty.retain(|&i| i < n);
            m.header.l1_size = n as u32;
            self.q.write_header(m)?;
            self.q.sync_file()?;
        }
        self.check_copied(m)?;
        self.finish_stats();
        self.res.image_end_offset = Some((self.highest + 1) * self.cs);
        if self.fix_snapshots_offset {
            m.header.snapshots_offset = 0;
            self.q.write_header(m)?;
        }

        if self.repair.is_some() {
            if self.res.check_errors == 0 && self.res.corruptions == 0 {
                let flags = header::incompat::DIRTY | header::incompat::CORRUPT;
                if m.header.incompatible_features & flags != 0 {
                    m.header.incompatible_features &= !flags;
                    self.q.write_header(m)?;
                }
                m.corrupt = false;
            }
            self.q.flush_held(m)?;
            self.q.sync_file()?;
        }
        Ok(())
    }

    fn finish_stats(&mut self) {
        self.res.allocated_clusters = Some(self.allocated);
        self.res.fragmented_clusters = Some(self.fragmented);
        self.res.compressed_clusters = Some(self.compressed);
    }

    /// Step 1: counts every reference.
    fn count(&mut self, m: &Tables) {
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
    fn walk_l1(&mut self, m: &Tables, l1: &[u64], l1_off: u64, active: bool) {
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
    fn check_l2_entry(&mut self, table: &mut [u8], i2: usize, active: bool) -> bool {
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
                entry::decode(raw & !entry::COPIED, 0, q.cluster_bits, q.ext_l2, q.v3)
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
            let reserved = if q.v3 || q.ext_l2 {
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

    fn count_bitmaps(&mut self, ext: &[u8]) {
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
        let bitmaps = match super::bitmap::parse_directory(&dir, nb as u32) {
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
    fn stored(&mut self, m: &Tables, c: u64) -> Result<u64> {
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
    fn compare(&mut self, m: &Tables) -> Vec<Mismatch> {
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

    fn mismatch_message(&(c, stored, want): &Mismatch) -> String {
        let kind = if stored < want { "ERROR" } else { "Leaked" };
        format!("{kind} cluster {c} refcount={stored} reference={want}")
    }

    /// Reports differences without repairing them.
    fn report(&mut self, mismatches: &[Mismatch]) {
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
    fn fix_refcounts(
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
    fn rebuild_and_recount(&mut self, m: &mut Tables, mismatches: &[Mismatch]) -> Result<()> {
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
    fn writable(&self, off: u64) -> bool {
        let c = (off / self.cs) as usize;
        c != 0 && self.refs.get(c).is_some_and(|&r| r <= 1)
    }

    fn apply_entry_fixes(&mut self, m: &mut Tables) -> Result<()> {
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
    fn write_new_refcounts(&mut self, m: &mut Tables) -> Result<()> {
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
    fn check_copied(&mut self, m: &mut Tables) -> Result<()> {
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
