//! The metadata state of an open qcow2 image and entry lookups.
//!
//! Lookups come in two kinds. The read path ([`Qcow2::lookup_cached`])
//! works on a shared borrow of [`Tables`] and reports an L2 table that is
//! not cached instead of reading it; the caller reads it without holding
//! the lock ([`Qcow2::fetch_l2`]) and tries again. The write path
//! ([`Qcow2::lookup`]) holds the exclusive lock and loads what it needs.

use super::entry::{self, Cluster};
use super::header::Header;
use super::{Qcow2, QcowError};
use crate::error::{Error, Result};
use crate::formats::table_cache::TableCache;
use std::collections::BTreeSet;

/// A host range whose last reference was dropped: it is unreferenced
/// (refcount decremented) once the metadata change that dropped it is
/// durable and no request that could still see it is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingFree {
    /// Byte offset in the image file.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// [`RequestTracker`](crate::inflight::RequestTracker) tag taken when
    /// the reference was dropped.
    pub(crate) tag: u64,
}

/// All metadata of an open image, behind [`Qcow2::tables`].
pub(crate) struct Tables {
    /// The header as last written.
    pub(crate) header: Header,
    /// The active L1 table.
    pub(crate) l1: Vec<u64>,
    /// L1 entries changed since the last flush.
    pub(crate) l1_dirty: BTreeSet<usize>,
    /// Cached L2 tables.
    pub(crate) l2: TableCache,
    /// The refcount table.
    pub(crate) rc_table: Vec<u64>,
    /// Refcount table entries changed since the last flush (new blocks).
    pub(crate) rc_table_dirty: BTreeSet<usize>,
    /// Cached refcount blocks.
    pub(crate) rc: TableCache,
    /// Lowest cluster index that may be free.
    pub(crate) free_hint: u64,
    /// Host ranges to unreference later (see [`PendingFree`]).
    pub(crate) pending_free: Vec<PendingFree>,
    /// Byte offset where the next compressed cluster may go (0: none).
    pub(crate) compressed_tail: u64,
    /// Metadata corruption was detected: no more writes.
    pub(crate) corrupt: bool,
}

/// The read path needs an L2 table that is not cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Miss(pub(crate) u64);

/// An L2 table read outside the lock, for a read that must not depend on
/// the cache keeping it.
pub(crate) type Fetched = Option<(u64, Box<[u8]>)>;

impl Qcow2 {
    /// The L2 table offset for an L1 index (0 when unallocated).
    pub(crate) fn l2_offset(&self, tables: &Tables, l1_index: usize) -> u64 {
        tables
            .l1
            .get(l1_index)
            .map(|e| e & entry::L1_OFFSET_MASK)
            .unwrap_or(0)
    }

    /// Raw (entry, bitmap) of an L2 slot in a table.
    pub(crate) fn l2_get(&self, table: &[u8], idx: usize) -> (u64, u64) {
        let w = if self.ext_l2 { 16 } else { 8 };
        let at = idx * w;
        let e = u64::from_be_bytes(table[at..at + 8].try_into().expect("8 bytes"));
        let b = if self.ext_l2 {
            u64::from_be_bytes(table[at + 8..at + 16].try_into().expect("8 bytes"))
        } else {
            0
        };
        (e, b)
    }

    pub(crate) fn l2_set(&self, table: &mut [u8], idx: usize, e: u64, bitmap: u64) {
        let w = if self.ext_l2 { 16 } else { 8 };
        let at = idx * w;
        table[at..at + 8].copy_from_slice(&e.to_be_bytes());
        if self.ext_l2 {
            table[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
        }
    }

    /// Decodes slot `i2` of the L2 table at `l2`.
    pub(crate) fn decode(&self, table: &[u8], l2: u64, i2: usize) -> Result<(Cluster, u64)> {
        let (e, bitmap) = self.l2_get(table, i2);
        let c = entry::decode_in(
            e,
            bitmap,
            self.cluster_bits,
            self.ext_l2,
            self.v3(),
            self.external_data,
        )
        .map_err(|why| {
            Error::from(QcowError::Entry {
                table: "L2 table",
                index: i2 as u64,
                offset: l2,
                why: why.describe(),
            })
        })?;
        Ok((c, bitmap))
    }

    /// The entry of `guest` from cached tables (or `fetched`), or the L2
    /// table offset to fetch.
    pub(crate) fn lookup_cached(
        &self,
        tables: &Tables,
        guest: u64,
        fetched: &Fetched,
    ) -> Result<std::result::Result<(Cluster, u64), Miss>> {
        let (i1, i2) = self.indices(guest);
        let l2 = self.l2_offset(tables, i1);
        if l2 == 0 {
            return Ok(Ok((Cluster::Unallocated, 0)));
        }
        let table = match tables.l2.get(l2) {
            Some(t) => t,
            None => match fetched {
                Some((off, t)) if *off == l2 => t,
                _ => return Ok(Err(Miss(l2))),
            },
        };
        self.decode(table, l2, i2).map(Ok)
    }

    /// Reads the L2 table at `off` without holding any lock and caches it
    /// (clean; a table someone cached meanwhile stays as it is). Returns
    /// the copy read, for the caller's retry.
    pub(crate) fn fetch_l2(&self, off: u64) -> Result<(u64, Box<[u8]>)> {
        let table = self.read_cluster(off, "L2 table")?;
        let mut tables = self.tables_mut();
        if !tables.l2.contains(off) {
            tables.l2.insert(off, table.clone(), false);
        }
        Ok((off, table))
    }

    /// The entry of `guest` for callers holding the exclusive lock: loads
    /// the L2 table when it is not cached.
    pub(crate) fn lookup(&self, tables: &mut Tables, guest: u64) -> Result<(Cluster, u64)> {
        let (i1, i2) = self.indices(guest);
        let l2 = self.l2_offset(tables, i1);
        if l2 == 0 {
            return Ok((Cluster::Unallocated, 0));
        }
        self.load_l2(tables, l2)?;
        let table = tables.l2.peek(l2).expect("just loaded");
        self.decode(table, l2, i2)
    }

    /// Makes sure the L2 table at `off` is cached.
    pub(crate) fn load_l2(&self, tables: &mut Tables, off: u64) -> Result<()> {
        if tables.l2.contains(off) {
            return Ok(());
        }
        let t = self.read_cluster(off, "L2 table")?;
        tables.l2.insert(off, t, false);
        Ok(())
    }

    /// Reads one metadata cluster.
    pub(crate) fn read_cluster(&self, offset: u64, what: &'static str) -> Result<Box<[u8]>> {
        let mut buf = vec![0u8; self.cluster_size as usize].into_boxed_slice();
        self.file().read_at(&mut buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(
                    what,
                    offset,
                    format!("{what} lies past the end of the file"),
                )
            } else {
                Error::io(format!("reading {what}"), e).at(what, offset)
            }
        })?;
        Ok(buf)
    }

    /// Writes the header cluster content.
    pub(crate) fn write_header(&self, tables: &Tables) -> Result<()> {
        let bytes = tables.header.to_bytes()?;
        self.file()
            .write_at(&bytes, 0)
            .map_err(|e| Error::io("writing the header", e))
    }
}
