//! The data path of the generic layer. Every request holds a ticket of
//! the image's [`RequestTracker`](crate::inflight::RequestTracker) from
//! before it maps a range until its data I/O is done, so a driver never
//! reuses host space a request may still read or write.
//!
//! Writes: the driver answers where the bytes go ([`Driver::map_write`]);
//! for new storage this layer copies the parts of the allocation unit the
//! request does not cover (from the backing image, old data, or zeroes),
//! writes the data, and only then lets the driver publish the metadata
//! ([`Driver::commit`]). Write-zeroes and discard follow the same split.

use super::{round_down, round_up, Image, MAX_REQUEST};
use crate::driver::{
    Allocation, BlockStatus, DiscardAction, IoCtx, Mapping, StorageId, WriteFlags, WriteMapping,
    ZeroAction, ZeroFlags,
};
use crate::error::{Condition, Error, ErrorKind, Result};
use crate::registry;
use crate::storage::Storage;

/// What a write changed, for FUA: the storages data went to, and whether
/// metadata changed too.
#[derive(Default)]
struct Touched {
    storages: Vec<StorageId>,
    metadata: bool,
}

impl Touched {
    fn data(&mut self, id: StorageId) {
        if !self.storages.contains(&id) {
            self.storages.push(id);
        }
    }
}

/// Zero buffers are written in pieces of at most this size.
const ZERO_CHUNK: u64 = 1 << 20;

impl Image {
    pub(super) fn storage(&self, id: StorageId) -> Result<&dyn Storage> {
        self.driver
            .storages()
            .get(id.0 as usize)
            .map(|s| &**s)
            .ok_or_else(|| {
                self.err(Error::new(
                    ErrorKind::State,
                    format!("the driver mapped storage {} that it does not have", id.0),
                ))
            })
    }

    fn ctx(&self) -> IoCtx<'_> {
        IoCtx {
            backing: self.backing.as_deref(),
            closed_backing: match (&self.backing, &self.backing_ref) {
                (None, Some(b)) => Some(b.filename.as_str()),
                _ => None,
            },
        }
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_open()?;
        self.check_bounds(offset, buf.len() as u64)?;
        let _ticket = self.state.requests().enter();
        self.read_unchecked(buf, offset)
    }

    pub(super) fn read_unchecked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (mapping, n) = self.driver.map(pos, want).map_err(|e| self.err(e))?;
            if n == 0 {
                return Err(self.err(Error::corrupt(
                    "mapping",
                    pos,
                    "driver mapped an empty range",
                )));
            }
            let n = n.min(want) as usize;
            self.read_mapped(&mut buf[done..done + n], pos, mapping)?;
            done += n;
        }
        Ok(())
    }

    /// Reads guest range `[guest, guest + buf.len())`, which `mapping`
    /// says where it lives.
    fn read_mapped(&self, buf: &mut [u8], guest: u64, mapping: Mapping) -> Result<()> {
        match mapping {
            Mapping::Data { storage, offset } => {
                let st = self.storage(storage)?;
                let fail = |e| {
                    self.err(Error::io(
                        format!("reading data at host offset {offset}"),
                        e,
                    ))
                };
                match st.read_at(buf, offset) {
                    // Past the end of the file the data reads as zeroes, as
                    // qemu's file protocol reads it (a truncated image).
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        let len = st.len().map_err(fail)?;
                        let inside = len.saturating_sub(offset).min(buf.len() as u64) as usize;
                        buf[inside..].fill(0);
                        if inside == 0 {
                            return Ok(());
                        }
                        st.read_at(&mut buf[..inside], offset).map_err(fail)
                    }
                    r => r.map_err(fail),
                }
            }
            Mapping::Zero => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => match &self.backing {
                Some(b) => b.read_zero_extended(buf, guest),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Mapping::Encrypted { storage, offset } => {
                match self.driver.data_cipher().map_err(|e| self.err(e))? {
                    Some(c) => self.read_decrypted(buf, guest, storage, offset, c),
                    None => self
                        .driver
                        .read_transformed(buf, guest)
                        .map_err(|e| self.err(e)),
                }
            }
            Mapping::Compressed => self
                .driver
                .read_transformed(buf, guest)
                .map_err(|e| self.err(e)),
        }
    }

    /// Reads ciphertext of guest range `[guest, guest + buf.len())` at
    /// `offset` of `storage` and decrypts it, whole sectors at a time.
    fn read_decrypted(
        &self,
        buf: &mut [u8],
        guest: u64,
        storage: StorageId,
        offset: u64,
        cipher: &dyn crate::driver::DataCipher,
    ) -> Result<()> {
        let head = offset % 512;
        let start = offset - head;
        let len = round_up(head + buf.len() as u64, 512);
        let mut sectors = vec![0u8; len as usize];
        self.read_mapped(
            &mut sectors,
            guest - head,
            Mapping::Data {
                storage,
                offset: start,
            },
        )?;
        cipher.decrypt(&mut sectors, start, guest - head);
        buf.copy_from_slice(&sectors[head as usize..head as usize + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `host` of `storage` (guest offset `guest`),
    /// encrypted first when the driver stores encrypted data.
    fn store(&self, storage: &dyn Storage, data: &[u8], host: u64, guest: u64) -> Result<()> {
        let io = |e| self.err(Error::io("writing guest data", e));
        match self.driver.data_cipher().map_err(|e| self.err(e))? {
            None => storage.write_at(data, host).map_err(io),
            Some(c) => {
                if !host.is_multiple_of(512) || !data.len().is_multiple_of(512) {
                    return Err(self.err(Error::new(
                        ErrorKind::State,
                        format!("an encrypted write at host offset {host} is not in whole sectors"),
                    )));
                }
                let mut sealed = data.to_vec();
                c.encrypt(&mut sealed, host, guest);
                storage.write_at(&sealed, host).map_err(io)
            }
        }
    }

    /// Reads like [`read`](Image::read), but the part of the request past
    /// the end of the disk reads as zeroes (how a shorter backing image looks
    /// from above).
    pub fn read_zero_extended(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_open()?;
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if !head.is_empty() {
            let _ticket = self.state.requests().enter();
            self.read_unchecked(head, offset)?;
        }
        Ok(())
    }

    /// Writes `buf` to the virtual disk at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, WriteFlags::default())
    }

    /// Writes `buf` at `offset` with request flags (FUA: durable on return).
    pub fn write_with(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.check_writable("write")?;
        self.check_bounds(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.guard_sector0(buf, offset)?;
        let _ticket = self.state.requests().enter();
        let mut touched = Touched::default();
        let align = self.driver.request_alignment() as u64;
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if align <= 1 {
            self.write_mapped(buf, offset, &mut touched)?;
        } else {
            self.write_unaligned(buf, offset, align, &mut touched)?;
        }
        if flags.fua {
            self.make_durable(&touched)?;
        }
        Ok(())
    }

    /// After a FUA request: what it wrote is durable. Metadata changes
    /// need the driver's full sync; data alone needs its storages synced.
    fn make_durable(&self, touched: &Touched) -> Result<()> {
        if touched.metadata {
            return self.driver.sync().map_err(|e| self.err(e));
        }
        for &id in &touched.storages {
            let s = self.storage(id)?;
            s.sync()
                .map_err(|e| self.err(Error::io("syncing written data", e)))?;
        }
        Ok(())
    }

    /// A write that does not start or end on the driver's alignment: the
    /// partial units go through read-modify-write under an exclusive lock
    /// of that unit, so only requests overlapping it wait.
    fn write_unaligned(
        &self,
        buf: &[u8],
        offset: u64,
        align: u64,
        touched: &mut Touched,
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let head_end = round_up(offset, align).min(end);
        let tail_start = round_down(end, align).max(head_end);
        if offset != head_end {
            self.rmw_unit(&buf[..(head_end - offset) as usize], offset, align, touched)?;
        }
        if tail_start > head_end {
            let _shared = self.ranges.lock(head_end, tail_start, false);
            let s = (head_end - offset) as usize;
            let e = (tail_start - offset) as usize;
            self.write_mapped(&buf[s..e], head_end, touched)?;
        }
        if end != tail_start {
            self.rmw_unit(
                &buf[(tail_start - offset) as usize..],
                tail_start,
                align,
                touched,
            )?;
        }
        Ok(())
    }

    /// Writes `buf` (inside one alignment unit) by reading the whole unit,
    /// patching it and writing it back.
    fn rmw_unit(&self, buf: &[u8], offset: u64, align: u64, touched: &mut Touched) -> Result<()> {
        let start = round_down(offset, align);
        let end = round_up(offset + buf.len() as u64, align).min(self.size());
        let _unit = self.ranges.lock(start, end, true);
        let mut unit = vec![0u8; (end - start) as usize];
        self.read_unchecked(&mut unit, start)?;
        let s = (offset - start) as usize;
        unit[s..s + buf.len()].copy_from_slice(buf);
        self.write_mapped(&unit, start, touched)
    }

    /// The write loop: asks the driver where each piece goes and does the
    /// data I/O (and the copy-on-write around new allocations).
    fn write_mapped(&self, buf: &[u8], offset: u64, touched: &mut Touched) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = &buf[done..(done + MAX_REQUEST as usize).min(buf.len())];
            let mapping = self
                .driver
                .map_write(pos, rest.len() as u64)
                .map_err(|e| self.err(e))?;
            let n = match mapping {
                WriteMapping::InPlace {
                    storage,
                    offset: host,
                    len,
                } => {
                    let n = self.covered(pos, len, rest.len())?;
                    self.store(self.storage(storage)?, &rest[..n], host, pos)?;
                    touched.data(storage);
                    n
                }
                WriteMapping::Allocate(a) => {
                    touched.data(a.storage);
                    touched.metadata = true;
                    self.write_allocation(rest, pos, a)?
                }
                WriteMapping::Transformed { len } => {
                    let n = self.covered(pos, len, rest.len())?;
                    touched.metadata = true;
                    self.driver
                        .write_transformed(&self.ctx(), &rest[..n], pos)
                        .map_err(|e| self.err(e))?;
                    n
                }
            };
            done += n;
        }
        Ok(())
    }

    /// Bytes of a `want`-byte request a driver answer of `len` covers.
    fn covered(&self, pos: u64, len: u64, want: usize) -> Result<usize> {
        if len == 0 {
            return Err(self.err(Error::corrupt(
                "mapping",
                pos,
                "driver mapped an empty range for a write",
            )));
        }
        Ok(len.min(want as u64) as usize)
    }

    /// Fills and writes one [`Allocation`] for the request `data` at
    /// guest `pos`, then publishes it. Returns the request bytes covered.
    fn write_allocation(&self, data: &[u8], pos: u64, a: Allocation) -> Result<usize> {
        let a_end = a.guest.checked_add(a.len);
        let valid = a.guest <= pos
            && a_end.is_some_and(|e| e > pos)
            && a.fills.iter().all(|f| {
                f.guest >= a.guest
                    && f.guest.checked_add(f.len).is_some_and(|e| Some(e) <= a_end)
                    && (f.guest + f.len <= pos || f.guest >= pos + data.len() as u64)
            });
        if !valid {
            self.driver.abort(a.commit);
            return Err(self.err(Error::new(
                ErrorKind::State,
                format!("the driver's allocation for guest offset {pos} does not cover it"),
            )));
        }
        let covered_end = (a.guest + a.len).min(pos + data.len() as u64);
        let n = (covered_end - pos) as usize;
        let written = self.fill_and_write(data, pos, n, &a);
        self.publish(written, Some(a.commit))?;
        Ok(n)
    }

    /// After the generic layer's part of a mapping (`done`): lets the
    /// driver publish what it reserved, or give it up when that part failed.
    fn publish(&self, done: Result<()>, commit: Option<crate::driver::Commit>) -> Result<()> {
        match (done, commit) {
            (Ok(()), Some(c)) => self.driver.commit(c).map_err(|e| self.err(e)),
            (Ok(()), None) => Ok(()),
            (Err(e), c) => {
                if let Some(c) = c {
                    self.driver.abort(c);
                }
                Err(e)
            }
        }
    }

    /// The data part of [`write_allocation`](Image::write_allocation):
    /// copy-on-write of the fills, then one write of the whole range.
    fn fill_and_write(&self, data: &[u8], pos: u64, n: usize, a: &Allocation) -> Result<()> {
        let storage = self.storage(a.storage)?;
        let io = |e| self.err(Error::io("writing guest data", e));
        if a.fills.is_empty() && a.guest == pos && a.len as usize == n {
            return self.store(storage, &data[..n], a.offset, a.guest);
        }
        // Encrypted data: the whole unit is built and sealed (zeroes are
        // not zero bytes there).
        let encrypted = self
            .driver
            .data_cipher()
            .map_err(|e| self.err(e))?
            .is_some();
        // Fresh space already reads as zeroes: only the request's bytes
        // need writing when every fill is zeroes.
        let zero_fill = |f: &crate::driver::Fill| {
            f.from == Mapping::Zero
                || (f.from == Mapping::Unallocated
                    && self.backing.is_none()
                    && self.backing_ref.is_none())
        };
        if a.zeroed && !encrypted && a.fills.iter().all(zero_fill) {
            return storage
                .write_at(&data[..n], a.offset + (pos - a.guest))
                .map_err(io);
        }
        // Zero fills of a large unit (a Parallels cluster can be 2 GiB) are
        // written from one bounded buffer, not a buffer of the whole unit.
        const CHUNK: u64 = 4 << 20;
        if a.len > CHUNK && !encrypted && a.fills.iter().all(zero_fill) {
            let zeroes = vec![0u8; CHUNK as usize];
            for f in &a.fills {
                let mut done = 0;
                while done < f.len {
                    let k = (f.len - done).min(CHUNK);
                    storage
                        .write_at(&zeroes[..k as usize], a.offset + (f.guest - a.guest) + done)
                        .map_err(io)?;
                    done += k;
                }
            }
            return storage
                .write_at(&data[..n], a.offset + (pos - a.guest))
                .map_err(io);
        }
        // Copying from a backing file the open policy left closed would
        // write zeroes where the guest sees backing data.
        if self.backing.is_none()
            && self.backing_ref.is_some()
            && a.fills.iter().any(|f| f.from == Mapping::Unallocated)
        {
            let name = self
                .backing_ref
                .as_ref()
                .map_or("", |b| b.filename.as_str());
            return Err(self.err(Error::new(
                ErrorKind::Refused,
                format!(
                    "this write needs data from the backing file '{name}', which was not \
                     opened (the open policy does not follow backing files)"
                ),
            )));
        }
        let mut unit = vec![0u8; a.len as usize];
        for f in &a.fills {
            let at = (f.guest - a.guest) as usize;
            self.read_mapped(&mut unit[at..at + f.len as usize], f.guest, f.from)?;
        }
        let at = (pos - a.guest) as usize;
        unit[at..at + n].copy_from_slice(&data[..n]);
        self.store(storage, &unit, a.offset, a.guest)
    }

    /// QEMU's protection for probed raw images: refuse writing a first
    /// sector that another format would recognise, because the next open
    /// would then interpret the guest's data as image metadata.
    fn guard_sector0(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.probed_raw || offset >= 512 {
            return Ok(());
        }
        let mut sector = vec![0u8; 512.min(self.size()) as usize];
        self.read_unchecked(&mut sector, 0)?;
        let start = offset as usize;
        let n = (sector.len() - start).min(buf.len());
        sector[start..start + n].copy_from_slice(&buf[..n]);
        if let Some(fmt) = registry::probe_non_raw(&sector) {
            return Err(self.err(
                Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "write to sector 0 refused: the format was probed as raw and the new \
                         data looks like a {fmt} header"
                    ),
                )
                .with_condition(Condition::ProbedRawHeader),
            ));
        }
        Ok(())
    }

    /// Size of the units [`write_compressed`](Image::write_compressed)
    /// takes, or `None` when the format cannot compress.
    pub fn compression_unit(&self) -> Option<u64> {
        self.driver.compression_unit()
    }

    fn check_compressed_unit(&self, len: u64, offset: u64) -> Result<u64> {
        self.check_bounds(offset, len)?;
        let unit = self.driver.compression_unit().ok_or_else(|| {
            self.err(Error::unsupported(
                "Compression not supported for this file format",
            ))
        })?;
        if !offset.is_multiple_of(unit) || (len != unit && offset + len != self.size()) {
            return Err(self.err(Error::invalid_argument(format!(
                "compressed writes must cover whole {unit}-byte units"
            ))));
        }
        Ok(unit)
    }

    /// Compresses one unit of guest data at `offset` for
    /// [`write_packed`](Image::write_packed): `None` when it does not
    /// shrink. Only computes, so many threads can compress at once while
    /// one writes the results in guest order (deterministic images).
    pub fn compress(&self, buf: &[u8], offset: u64) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        self.check_compressed_unit(buf.len() as u64, offset)?;
        self.driver.compress(buf).map_err(|e| self.err(e))
    }

    /// Stores one unit `buf` at `offset` as [`compress`](Image::compress)
    /// packed it (`packed`), or plainly when `packed` is `None` or the unit
    /// already has storage.
    pub fn write_packed(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        self.check_writable("compressed write")?;
        self.check_compressed_unit(buf.len() as u64, offset)?;
        if let Some(packed) = packed {
            let _ticket = self.state.requests().enter();
            let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
            if self
                .driver
                .write_compressed(packed, offset)
                .map_err(|e| self.err(e))?
            {
                return Ok(());
            }
        }
        self.write(buf, offset)
    }

    /// Writes one unit compressed (stored plainly when it does not shrink).
    /// The last unit of the disk may be shorter.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("compressed write")?;
        let packed = self.compress(buf, offset)?;
        self.write_packed(buf, packed.as_deref(), offset)
    }

    /// Makes a range read as zeroes. With `may_unmap` the space may be freed.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.write_zeroes_with(
            offset,
            len,
            ZeroFlags {
                may_unmap,
                ..Default::default()
            },
        )
    }

    /// Makes a range read as zeroes, with request flags: `may_unmap` lets
    /// the space be freed, `no_fallback` fails with
    /// [`ErrorKind::NoFastZero`] rather than writing zero buffers, `fua`
    /// makes it durable on return.
    pub fn write_zeroes_with(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable("write zeroes")?;
        self.check_bounds(offset, len)?;
        let _ticket = self.state.requests().enter();
        let mut touched = Touched::default();
        let align = self.driver.request_alignment() as u64;
        let end = offset + len;
        let head_end = round_up(offset, align).min(end);
        let tail_start = round_down(end, align).max(head_end);
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if offset != head_end {
            self.zero_buffers(offset, head_end - offset, flags, false, &mut touched)?;
        }
        if tail_start > head_end {
            let _shared = (align > 1).then(|| self.ranges.lock(head_end, tail_start, false));
            self.zero_mapped(head_end, tail_start - head_end, flags, &mut touched)?;
        }
        if end != tail_start {
            self.zero_buffers(tail_start, end - tail_start, flags, false, &mut touched)?;
        }
        if flags.fua {
            self.make_durable(&touched)?;
        }
        Ok(())
    }

    /// The write-zeroes loop over an aligned range.
    fn zero_mapped(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        touched: &mut Touched,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let want = (end - pos).min(MAX_REQUEST);
            let zm = self
                .driver
                .map_zeroes(pos, want, flags)
                .map_err(|e| self.err(e))?;
            let n = self.covered(pos, zm.len, want as usize)? as u64;
            let done = match zm.action {
                ZeroAction::Metadata => {
                    touched.metadata = true;
                    Ok(())
                }
                ZeroAction::Host { storage, offset } => {
                    touched.data(storage);
                    self.storage(storage).and_then(|s| {
                        s.zero_range(offset, n, flags.may_unmap)
                            .map_err(|e| self.err(Error::io("writing zeroes", e)))
                    })
                }
                // The driver changed nothing for this part.
                ZeroAction::Buffers => self.zero_buffers(pos, n, flags, true, touched),
            };
            touched.metadata |= zm.commit.is_some();
            self.publish(done, zm.commit)?;
            pos += n;
        }
        Ok(())
    }

    /// Zeroes a range by writing zero buffers through the write path
    /// (with read-modify-write unless the range is `aligned`), unless the
    /// request wants only fast zeroing.
    fn zero_buffers(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        aligned: bool,
        touched: &mut Touched,
    ) -> Result<()> {
        if flags.no_fallback {
            return Err(self.err(no_fast_zero(offset, len)));
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let align = self.driver.request_alignment() as u64;
        let mut done = 0;
        while done < len {
            let n = ZERO_CHUNK.min(len - done);
            let pos = offset + done;
            if aligned || align <= 1 {
                self.write_mapped(&zeros[..n as usize], pos, touched)?;
            } else {
                self.write_unaligned(&zeros[..n as usize], pos, align, touched)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Tells the image a range is unused. Advisory: afterwards the range
    /// reads as its old content, zeroes, or the backing image's content.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        self.check_bounds(offset, len)?;
        let _ticket = self.state.requests().enter();
        let align = self.driver.request_alignment() as u64;
        let start = round_up(offset, align);
        let end = round_down(offset + len, align);
        if end <= start {
            return Ok(());
        }
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let _shared = (align > 1).then(|| self.ranges.lock(start, end, false));
        let mut pos = start;
        while pos < end {
            let want = (end - pos).min(MAX_REQUEST);
            let dm = self
                .driver
                .map_discard(pos, want)
                .map_err(|e| self.err(e))?;
            let n = self.covered(pos, dm.len, want as usize)? as u64;
            let done = match dm.action {
                DiscardAction::Nothing | DiscardAction::Metadata => Ok(()),
                DiscardAction::PunchHole { storage, offset } => {
                    self.storage(storage).and_then(|s| {
                        s.punch_hole(offset, n)
                            .map_err(|e| self.err(Error::io("discarding", e)))
                    })
                }
            };
            self.publish(done, dm.commit)?;
            pos += n;
        }
        Ok(())
    }

    /// Block status of one layer (this image only) at `offset`.
    pub fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        self.check_open()?;
        let size = self.size();
        if offset >= size || max_len == 0 {
            return Err(self.err(Error::out_of_bounds(offset, max_len, size)));
        }
        let max_len = max_len.min(size - offset);
        let mut s = self
            .driver
            .block_status(offset, max_len)
            .map_err(|e| self.err(e))?;
        if s.len == 0 {
            return Err(self.err(Error::corrupt(
                "block status",
                offset,
                "driver reported an empty range",
            )));
        }
        s.len = s.len.min(max_len);
        Ok(s)
    }

    /// Block status through the backing chain: the status of the first layer
    /// that has the range allocated, and that layer's depth (0 = this image).
    /// A range allocated nowhere comes back unallocated and zero, with the
    /// depth of the bottom layer.
    pub fn block_status_chain(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, usize)> {
        let mut s = self.block_status(offset, max_len)?;
        if s.allocated {
            return Ok((s, 0));
        }
        match &self.backing {
            Some(b) if offset < b.size() => {
                let (bs, depth) = b.block_status_chain(offset, s.len)?;
                Ok((bs, depth + 1))
            }
            // Past the end of a shorter backing image, or no backing
            // image: zeroes, reported at this layer as qemu-img does.
            _ => {
                s.zero = true;
                Ok((s, 0))
            }
        }
    }
}

fn no_fast_zero(offset: u64, len: u64) -> Error {
    Error::new(
        ErrorKind::NoFastZero,
        format!(
            "the range at offset {offset} length {len} cannot be zeroed without writing zero buffers"
        ),
    )
}
