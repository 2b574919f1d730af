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

mod count;
mod repair;

/// Driver option (`DriverOpenOptions::options` key) for opens made to check
/// or repair an image: a read-write open is allowed on an image marked
/// corrupt, a dirty image is not repaired on open (the check does it), and
/// L1 and refcount table entries are not validated up front (the check
/// reports them).
pub const OPEN_FOR_CHECK: &str = "x-check";

/// Driver option (any format accepts it): the image is opened for its
/// metadata only (`info`), so an encrypted image opens without its key,
/// as qemu-img's `info` opens it. Other opens of an encrypted qcow2 image
/// need the key.
pub const OPEN_METADATA_ONLY: &str = "x-metadata-only";

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
        } else if self.q.v3() {
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
}
