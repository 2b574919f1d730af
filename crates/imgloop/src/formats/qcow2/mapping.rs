//! The read side: where guest ranges live, and their block status.
//!
//! Both walk the L1/L2 tables under the shared lock, one acquisition per
//! request, merging neighbouring clusters of one kind. An unallocated L1
//! entry is skipped whole (it covers `cluster_size * l2_entries` bytes),
//! so walking a sparse image costs what is allocated, not the virtual
//! size.

use super::entry::{self, Cluster, Sub};
use super::tables::{Fetched, Miss, Tables};
use super::Qcow2;
use crate::driver::{BlockStatus, Mapping, StorageId};
use crate::error::{Error, Result};

/// One step of a walk: the mapping of a prefix of the range, its length,
/// and the host place a zero or unallocated range still has.
type Step = (Mapping, u64, Option<(StorageId, u64)>);

impl Qcow2 {
    /// Guest bytes one L1 entry covers.
    fn l1_span(&self) -> u64 {
        self.cluster_size * self.l2_entries
    }

    /// Where stored guest data at `offset` of `storage` is: plain, or
    /// encrypted for the generic layer to decrypt.
    fn data_mapping(&self, storage: StorageId, offset: u64) -> Mapping {
        if self.crypt.is_some() {
            Mapping::Encrypted { storage, offset }
        } else {
            Mapping::Data { storage, offset }
        }
    }

    /// What an entry says about `guest` (at most `max_len` bytes, within
    /// its cluster).
    pub(super) fn classify(&self, c: Cluster, bitmap: u64, guest: u64, max_len: u64) -> Step {
        let cs = self.cluster_size;
        let in_cluster = guest & (cs - 1);
        let len = max_len.min(cs - in_cluster);
        let data = self.data_id();
        let sub_run = |len: u64| {
            // Subclusters: the run of equal states from this one on.
            let sc = cs / entry::SUBCLUSTERS as u64;
            let first = (in_cluster / sc) as u32;
            let state = entry::subcluster(bitmap, first);
            let mut last = first + 1;
            while last < entry::SUBCLUSTERS && entry::subcluster(bitmap, last) == state {
                last += 1;
            }
            (state, len.min(last as u64 * sc - in_cluster))
        };
        match c {
            Cluster::Unallocated => (Mapping::Unallocated, len, None),
            Cluster::Compressed { .. } => (Mapping::Compressed, len, None),
            Cluster::Zero { host, .. } if !self.ext_l2 => {
                (Mapping::Zero, len, host.map(|h| (data, h + in_cluster)))
            }
            // Zero cluster without host: per subcluster zero or unallocated.
            Cluster::Zero { .. } => {
                let (state, len) = sub_run(len);
                let m = if state == Sub::Zero {
                    Mapping::Zero
                } else {
                    Mapping::Unallocated
                };
                (m, len, None)
            }
            Cluster::Normal { host, .. } if !self.ext_l2 => {
                (self.data_mapping(data, host + in_cluster), len, None)
            }
            Cluster::Normal { host, .. } => {
                let (state, len) = sub_run(len);
                let at = host + in_cluster;
                match state {
                    Sub::Data => (self.data_mapping(data, at), len, None),
                    Sub::Zero => (Mapping::Zero, len, Some((data, at))),
                    // Unallocated, but the host cluster exists: block
                    // status names its offset, as QEMU's does.
                    Sub::Unallocated => (Mapping::Unallocated, len, Some((data, at))),
                }
            }
        }
    }

    /// One step of a walk from cached tables.
    fn step(
        &self,
        tables: &Tables,
        guest: u64,
        max_len: u64,
        fetched: &Fetched,
    ) -> Result<std::result::Result<Step, Miss>> {
        let (i1, _) = self.indices(guest);
        if self.l2_offset(tables, i1) == 0 {
            // No L2 table: the rest of this L1 entry's range at once.
            let span = self.l1_span();
            let rest = span - (guest & (span - 1));
            return Ok(Ok((Mapping::Unallocated, max_len.min(rest), None)));
        }
        Ok(self
            .lookup_cached(tables, guest, fetched)?
            .map(|(c, bitmap)| self.classify(c, bitmap, guest, max_len)))
    }

    /// Runs `walk` under the shared lock, fetching missing L2 tables
    /// outside it and trying again.
    pub(super) fn walk<R>(
        &self,
        mut walk: impl FnMut(&Tables, &Fetched) -> Result<std::result::Result<R, Miss>>,
    ) -> Result<R> {
        let mut fetched: Fetched = None;
        loop {
            let miss = {
                let tables = self.tables();
                match walk(&tables, &fetched)? {
                    Ok(r) => return Ok(r),
                    Err(Miss(off)) => off,
                }
            };
            fetched = Some(self.fetch_l2(miss)?);
        }
    }

    /// Where the guest range at `offset` lives, merged over following
    /// clusters of one kind (contiguous ones, for data).
    pub(super) fn map_range(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        if let Some(hit) = self.map_plain_hit(offset, max_len) {
            return Ok(hit);
        }
        self.walk(|tables, fetched| {
            let (first, mut len, first_host) = match self.step(tables, offset, max_len, fetched)? {
                Ok(s) => s,
                Err(m) => return Ok(Err(m)),
            };
            while len < max_len && first != Mapping::Compressed {
                // A table that is not cached ends the run here.
                let Ok((next, n, host)) =
                    self.step(tables, offset + len, max_len - len, fetched)?
                else {
                    break;
                };
                let same = match (first, next) {
                    (
                        Mapping::Data {
                            storage: s1,
                            offset: a,
                        },
                        Mapping::Data {
                            storage: s2,
                            offset: b,
                        },
                    ) => s1 == s2 && a.checked_add(len) == Some(b),
                    (
                        Mapping::Encrypted {
                            storage: s1,
                            offset: a,
                        },
                        Mapping::Encrypted {
                            storage: s2,
                            offset: b,
                        },
                    ) => s1 == s2 && a.checked_add(len) == Some(b),
                    (a, b) => a == b && first_host.is_none() == host.is_none(),
                };
                if !same {
                    break;
                }
                len += n;
            }
            Ok(Ok((first, len)))
        })
    }

    /// The common case of a small read, checked first: the request lies in
    /// one cluster whose L2 table is cached and whose entry is a plain
    /// allocated cluster (standard entry, no flag but COPIED, aligned).
    /// Anything else goes the general way.
    fn map_plain_hit(&self, offset: u64, max_len: u64) -> Option<(Mapping, u64)> {
        if self.ext_l2 {
            return None;
        }
        let cs = self.cluster_size;
        let in_cluster = offset & (cs - 1);
        if max_len > cs - in_cluster {
            return None;
        }
        let (i1, i2) = self.indices(offset);
        let tables = self.tables();
        let l2 = self.l2_offset(&tables, i1);
        let table = tables.l2.get(l2)?;
        let (e, _) = self.l2_get(table, i2);
        let host = e & entry::L2_OFFSET_MASK;
        let plain =
            e & !(entry::COPIED | entry::L2_OFFSET_MASK) == 0 && host != 0 && host & (cs - 1) == 0;
        plain.then_some((
            self.data_mapping(self.data_id(), host + in_cluster),
            max_len,
        ))
    }

    /// Block status of the range at `offset`: the longest run with one
    /// status.
    pub(super) fn status_range(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let prealloc = self.metadata_preallocated()?;
        let mut s = self.walk(|tables, fetched| {
            let (m, len, host) = match self.step(tables, offset, max_len, fetched)? {
                Ok(s) => s,
                Err(miss) => return Ok(Err(miss)),
            };
            let mut s = BlockStatus::of_mapping(m, len, host);
            while s.len < max_len {
                let Ok((m, n, host)) =
                    self.step(tables, offset + s.len, max_len - s.len, fetched)?
                else {
                    break;
                };
                let t = BlockStatus::of_mapping(m, n, host);
                if !s.continues_with(&t) {
                    break;
                }
                s.len += n;
            }
            Ok(Ok(s))
        })?;
        if s.data && !s.compressed && prealloc {
            // Preallocated data clusters that were never written are holes
            // in the data file: they read as zeroes, and say so.
            if let Some(host) = s.offset {
                let (is_data, n) = self
                    .data()
                    .extent(host, s.len)
                    .map_err(|e| Error::io("querying allocation of the data file", e))?;
                if !is_data {
                    s.zero = true;
                }
                s.len = n.clamp(1, s.len);
            }
        }
        Ok(s)
    }

    /// Clusters below `limit` with a non-zero refcount, counted until
    /// `enough` are found. Walks the refcount table block by block, so the
    /// cost is bounded by the blocks there are, not by the apparent file
    /// size (a sparse hostile file); a block that repeats is read once.
    fn clusters_in_use(&self, limit: u64, enough: u64) -> Result<u64> {
        let mut tables = self.tables_mut();
        let per = self.rc_per_block(&tables);
        let bits = tables.header.refcount_bits();
        let mut empty = std::collections::HashSet::new();
        let mut in_use = 0;
        for b in 0..tables.rc_table.len() as u64 {
            let first = b * per;
            if first >= limit || in_use >= enough {
                break;
            }
            let off = tables.rc_table[b as usize];
            if off == 0 || empty.contains(&off) {
                continue;
            }
            self.load_rc_block(&mut tables, off)?;
            let block = tables.rc.peek(off).expect("just loaded");
            if crate::storage::is_zero(block) {
                empty.insert(off);
                continue;
            }
            let n = per.min(limit - first);
            in_use += (0..n)
                .filter(|&i| Self::rc_entry(block, i, bits) != 0)
                .count() as u64;
        }
        Ok(in_use)
    }

    /// Whether the image looks like `preallocation=metadata` made it: more
    /// clusters are in use by refcount than the file has allocated on the
    /// host (by a margin of 1/9, and at least 2 clusters). Decided once per
    /// open, as QEMU does; then block status looks for holes inside data
    /// clusters and reports them as zero.
    pub(crate) fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.metadata_prealloc.get() {
            return Ok(v);
        }
        let cs = self.cluster_size;
        let io = |e| Error::io("reading image size", e);
        let file_len = self.file().len().map_err(io)?;
        let v = match self.file().allocated_size().map_err(io)? {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                self.clusters_in_use(file_len.div_ceil(cs), threshold)? >= threshold
            }
        };
        let _ = self.metadata_prealloc.set(v);
        Ok(v)
    }
}
