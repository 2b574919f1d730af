//! Headers and the write-back of metadata through the log.
//!
//! Headers change by the alternating protocol: the new header goes into
//! the slot that is not current with the next sequence number and is
//! synced, then into the other slot with the one after, so one valid
//! header survives any torn write. The first change of an open renews the
//! file-write and data-write GUIDs; the first flush with metadata sets a
//! new log GUID; closing clears it again.

use super::guid::Guid;
use super::header::{Header, Headers, HEADER_AT};
use super::log::{build_entry, descriptor_sectors, SECTOR};
use super::{Session, Vhdx};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Writes `new` (its sequence number replaced) into both header slots,
/// the non-current one first, syncing after each.
pub(super) fn write_headers(
    storage: &dyn Storage,
    headers: &mut Headers,
    new: Header,
) -> Result<()> {
    let mut seq = headers.current().sequence;
    for _ in 0..2 {
        let slot = 1 - headers.current;
        seq = seq.wrapping_add(1);
        let h = Header {
            sequence: seq,
            ..new
        };
        let at = HEADER_AT[slot];
        storage
            .write_at(&h.to_bytes(), at)
            .map_err(|e| Error::io("writing a VHDX header", e).at("VHDX header", at))?;
        storage
            .sync()
            .map_err(|e| Error::io("syncing the VHDX header", e))?;
        headers.slots[slot] = Some(h);
        headers.current = slot;
    }
    Ok(())
}

impl Vhdx {
    /// Before the first change of this open: new file-write and
    /// data-write GUIDs in both headers (and a stale log GUID cleared:
    /// a log with entries was replayed at open).
    pub(super) fn start_session(&self) -> Result<()> {
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if session.started {
            return Ok(());
        }
        let mut headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        let new = Header {
            file_write: Guid::random(),
            data_write: Guid::random(),
            log_guid: Guid::ZERO,
            ..*headers.current()
        };
        write_headers(self.file(), &mut headers, new)?;
        session.started = true;
        Ok(())
    }

    /// A log GUID for this session's entries, set in the headers once.
    fn ensure_log(&self, session: &mut Session) -> Result<()> {
        if !session.log_guid.is_zero() {
            return Ok(());
        }
        let guid = Guid::random();
        let mut headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        let new = Header {
            log_guid: guid,
            ..*headers.current()
        };
        write_headers(self.file(), &mut headers, new)?;
        session.log_guid = guid;
        session.log_pos = 0;
        session.next_sequence = 1;
        Ok(())
    }

    /// Most sectors one entry can carry in this log.
    fn sectors_per_entry(&self) -> usize {
        let log_sectors = self.log.1 / SECTOR;
        let mut n = log_sectors.saturating_sub(1);
        while n > 0 && descriptor_sectors(n) + n > log_sectors {
            n -= 1;
        }
        n as usize
    }

    /// Writes the dirty metadata sectors: data synced, then each batch as
    /// a log entry (synced), then in place (synced).
    pub(super) fn flush_metadata(&self) -> Result<()> {
        if !self.writable() {
            return Ok(());
        }
        let _serial = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let dirty = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dirty_copies();
        if dirty.is_empty() {
            return Ok(());
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        self.file().sync().map_err(io("syncing the image"))?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        self.ensure_log(&mut session)?;
        let per_entry = self.sectors_per_entry();
        if per_entry == 0 {
            return Err(Error::invalid_format(
                "VHDX header",
                HEADER_AT[0],
                "the log is too small for any entry",
            ));
        }
        let file_len = self.file().len().map_err(io("reading the image size"))?;
        for batch in dirty.chunks(per_entry) {
            let sectors: Vec<(u64, &[u8])> = batch.iter().map(|(o, _, d)| (*o, &d[..])).collect();
            let len = (descriptor_sectors(sectors.len() as u64) + sectors.len() as u64) * SECTOR;
            if session.log_pos + len > self.log.1 {
                session.log_pos = 0;
            }
            let entry = build_entry(
                session.log_guid,
                session.next_sequence,
                session.log_pos,
                file_len,
                &sectors,
            );
            let at = self.log.0 + session.log_pos;
            self.file()
                .write_at(&entry, at)
                .map_err(|e| Error::io("writing the VHDX log", e).at("VHDX log", at))?;
            self.file().sync().map_err(io("syncing the VHDX log"))?;
            for (off, data) in &sectors {
                self.file().write_at(data, *off).map_err(|e| {
                    Error::io("writing VHDX metadata", e).at("VHDX metadata sector", *off)
                })?;
            }
            self.file().sync().map_err(io("syncing VHDX metadata"))?;
            session.log_pos += len;
            session.next_sequence += 1;
        }
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        for (off, generation, _) in &dirty {
            cache.mark_clean_if(*off, *generation);
        }
        cache.trim();
        Ok(())
    }

    /// Flushes, then marks the log empty again.
    pub(super) fn close_session(&self) -> Result<()> {
        self.flush_metadata()?;
        if !self.writable() {
            return Ok(());
        }
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if session.log_guid.is_zero() {
            return Ok(());
        }
        let mut headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        let new = Header {
            log_guid: Guid::ZERO,
            ..*headers.current()
        };
        write_headers(self.file(), &mut headers, new)?;
        session.log_guid = Guid::ZERO;
        Ok(())
    }
}
