//! Writing cached metadata back, in crash-safe order, without holding the
//! metadata lock across I/O or syncs.
//!
//! A flush copies what is dirty under the lock (a [`Writeback`]), writes
//! and syncs the copies with no lock held, then marks clean what did not
//! change meanwhile. The order on disk:
//!
//! 1. refcount blocks (increments for new clusters, new blocks);
//! 2. sync every storage: guest data and refcounts are durable before
//!    anything points at them;
//! 3. refcount table entries of new blocks, and a sync;
//! 4. L2 tables; sync (when L1 entries follow);
//! 5. L1 entries;
//! 6. for clusters whose references those tables dropped: sync, then
//!    decrement their refcounts, once no request in flight can still
//!    see them, and write the refcount blocks again.
//!
//! Only this code writes cached tables, so the cache never holds a table
//! whose newer copy another writer put on disk. Flushes are serialized by
//! [`Qcow2::flush_lock`].

use super::tables::Tables;
use super::{header, Qcow2};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::table_cache::DirtyCopy;

/// Copies of dirty metadata taken under the lock.
#[derive(Default)]
struct Writeback {
    rc: Vec<DirtyCopy>,
    rc_table: Vec<(usize, u64)>,
    rc_table_offset: u64,
    l2: Vec<DirtyCopy>,
    l1: Vec<(usize, u64)>,
    l1_offset: u64,
    /// How many pending frees existed when the copies were taken: their
    /// dropped references are in these copies (or on disk already).
    frees: usize,
}

impl Writeback {
    fn take(tables: &mut Tables) -> Writeback {
        let l1: Vec<(usize, u64)> = std::mem::take(&mut tables.l1_dirty)
            .into_iter()
            .map(|i| (i, tables.l1[i]))
            .collect();
        let rc_table: Vec<(usize, u64)> = std::mem::take(&mut tables.rc_table_dirty)
            .into_iter()
            .map(|i| (i, tables.rc_table[i]))
            .collect();
        Writeback {
            rc: tables.rc.dirty_copies(),
            rc_table,
            rc_table_offset: tables.header.refcount_table_offset,
            l2: tables.l2.dirty_copies(),
            l1,
            l1_offset: tables.header.l1_table_offset,
            frees: tables.pending_free.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.rc.is_empty()
            && self.rc_table.is_empty()
            && self.l2.is_empty()
            && self.l1.is_empty()
            && self.frees == 0
    }

    /// Puts the table entries back as dirty after a failed write.
    fn restore(&self, tables: &mut Tables) {
        tables.l1_dirty.extend(self.l1.iter().map(|&(i, _)| i));
        tables
            .rc_table_dirty
            .extend(self.rc_table.iter().map(|&(i, _)| i));
    }

    /// Marks clean what was written and has not changed since.
    fn finish(&self, tables: &mut Tables) {
        for (off, generation, _) in &self.rc {
            tables.rc.mark_clean_if(*off, *generation);
        }
        for (off, generation, _) in &self.l2 {
            tables.l2.mark_clean_if(*off, *generation);
        }
        tables.rc.trim();
        tables.l2.trim();
    }
}

/// How a flush reaches the tables: taking the lock for each step, or
/// through a borrow its caller holds.
trait TablesAccess {
    fn with<R>(&mut self, f: impl FnOnce(&mut Tables) -> R) -> R;
}

/// Takes the exclusive lock for each step.
struct Locking<'a>(&'a Qcow2);

impl TablesAccess for Locking<'_> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Tables) -> R) -> R {
        f(&mut self.0.tables_mut())
    }
}

/// The caller holds the exclusive lock.
struct Held<'a>(&'a mut Tables);

impl TablesAccess for Held<'_> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Tables) -> R) -> R {
        f(self.0)
    }
}

impl Qcow2 {
    /// Writes every dirty table out in crash-safe order.
    pub(crate) fn flush_meta(&self) -> Result<()> {
        if self.read_only() {
            return Ok(());
        }
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_using(&mut Locking(self))
    }

    /// [`flush_meta`](Qcow2::flush_meta) for callers that hold the
    /// exclusive lock and the flush lock (repairs, resize): the same
    /// order, with the lock held throughout.
    pub(crate) fn flush_held(&self, tables: &mut Tables) -> Result<()> {
        self.flush_using(&mut Held(tables))
    }

    fn flush_using(&self, access: &mut impl TablesAccess) -> Result<()> {
        let wb = access.with(Writeback::take);
        if wb.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.write_tables(&wb) {
            access.with(|tables| wb.restore(tables));
            return Err(e);
        }
        access.with(|tables| wb.finish(tables));
        if wb.frees > 0 {
            self.sync_file()?;
            let decrements = access.with(|tables| {
                self.apply_pending_frees(tables, wb.frees)
                    .map(|_| Writeback {
                        rc: tables.rc.dirty_copies(),
                        ..Default::default()
                    })
            })?;
            self.write_copies(&decrements.rc, "refcount block")?;
            access.with(|tables| decrements.finish(tables));
        }
        Ok(())
    }

    /// Steps 1 to 5 of the module documentation.
    fn write_tables(&self, wb: &Writeback) -> Result<()> {
        self.write_copies(&wb.rc, "refcount block")?;
        if !wb.l2.is_empty() || !wb.l1.is_empty() || !wb.rc_table.is_empty() {
            // Data and refcount increases are durable before any new
            // reference to them.
            self.sync_storages()?;
        }
        if !wb.rc_table.is_empty() {
            for &(i, e) in &wb.rc_table {
                let at = wb.rc_table_offset + i as u64 * 8;
                self.file().write_at(&e.to_be_bytes(), at).map_err(|err| {
                    Error::io("writing the refcount table", err)
                        .at("refcount table", wb.rc_table_offset)
                })?;
            }
            // The new blocks are reachable before anything they count is
            // referenced.
            self.sync_file()?;
        }
        self.write_copies(&wb.l2, "L2 table")?;
        if !wb.l1.is_empty() {
            if !wb.l2.is_empty() {
                self.sync_file()?;
            }
            for &(i, e) in &wb.l1 {
                self.file()
                    .write_at(&e.to_be_bytes(), wb.l1_offset + i as u64 * 8)
                    .map_err(|err| {
                        Error::io("writing the L1 table", err).at("L1 table", wb.l1_offset)
                    })?;
            }
        }
        Ok(())
    }

    fn write_copies(&self, copies: &[DirtyCopy], what: &'static str) -> Result<()> {
        for (off, _, data) in copies {
            self.file()
                .write_at(data, *off)
                .map_err(|e| Error::io(format!("writing a {what}"), e).at(what, *off))?;
        }
        Ok(())
    }

    /// Flushes when dirty tables keep a cache past its capacity (called
    /// after a metadata change, with no lock held).
    pub(crate) fn flush_if_over_capacity(&self) -> Result<()> {
        let over = {
            let tables = self.tables();
            tables.l2.over_capacity() || tables.rc.over_capacity()
        };
        if over {
            self.flush_meta()?;
        }
        Ok(())
    }

    /// Marks the image corrupt on disk and refuses further writes; returns
    /// `cause` (the damage found) saying so.
    pub(crate) fn mark_corrupt(&self, tables: &mut Tables, cause: Error) -> Error {
        tables.corrupt = true;
        if self.v3() && !self.read_only() {
            tables.header.incompatible_features |= header::incompat::CORRUPT;
            let _ = self.write_header(tables);
            let _ = self.sync_file();
        }
        cause
            .with_kind(ErrorKind::Corrupt)
            .noting("the image is now marked corrupt")
            .with_condition(crate::error::Condition::MarkedCorrupt)
    }
}
