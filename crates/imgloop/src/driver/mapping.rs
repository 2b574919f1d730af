//! What drivers answer: where guest bytes live for reads, where they go
//! for writes, and what a range becomes on write-zeroes and discard.

use std::any::Any;
use std::fmt;

/// Which of a driver's storages a mapping points into: an index into
/// [`Driver::storages`](super::Driver::storages). Index 0 is always the
/// image file itself; a qcow2 external data file, VMDK extents or other
/// files a format keeps data in follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageId(pub u16);

impl StorageId {
    /// The image file.
    pub const IMAGE: StorageId = StorageId(0);
}

/// Where a guest range lives, as told by [`Driver::map`](super::Driver::map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mapping {
    /// Stored as-is at `offset` of `storage`.
    Data {
        /// The storage holding the bytes.
        storage: StorageId,
        /// Byte offset in that storage.
        offset: u64,
    },
    /// Reads as zeroes; this layer says so (the backing image is not consulted).
    Zero,
    /// Not stored in this layer: read from the backing image, or zeroes.
    Unallocated,
    /// Stored compressed: only the driver can read it, through
    /// [`Driver::read_transformed`](super::Driver::read_transformed).
    Compressed,
    /// Stored encrypted at `offset` of `storage`: read through
    /// [`Driver::read_transformed`](super::Driver::read_transformed).
    Encrypted {
        /// The storage holding the ciphertext.
        storage: StorageId,
        /// Byte offset in that storage.
        offset: u64,
    },
}

impl Mapping {
    /// True for ranges only the driver can read.
    pub fn is_transformed(&self) -> bool {
        matches!(self, Mapping::Compressed | Mapping::Encrypted { .. })
    }
}

/// Block status of a guest range in one layer, as `qemu-img map` and NBD
/// `base:allocation` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BlockStatus {
    /// Length of the range that shares this status (never 0).
    pub len: u64,
    /// The range is stored in this layer (otherwise it comes from the backing image).
    pub allocated: bool,
    /// The range holds data (it may still happen to be zero).
    pub data: bool,
    /// The range is known to read as zeroes.
    pub zero: bool,
    /// The range is stored compressed.
    pub compressed: bool,
    /// The range is stored encrypted.
    pub encrypted: bool,
    /// Where the range is stored plainly (or, for zero and unallocated
    /// ranges of preallocated space, where its storage sits).
    pub offset: Option<u64>,
    /// The storage `offset` points into.
    pub storage: Option<StorageId>,
}

impl BlockStatus {
    /// The status a [`Mapping`] of `len` bytes implies. `host` is the host
    /// place a zero or unallocated range still has (preallocated space, an
    /// unallocated subcluster of an allocated cluster), shown by `map`.
    pub fn of_mapping(mapping: Mapping, len: u64, host: Option<(StorageId, u64)>) -> BlockStatus {
        let mut s = BlockStatus {
            len,
            ..Default::default()
        };
        match mapping {
            Mapping::Data { storage, offset } => {
                s.allocated = true;
                s.data = true;
                s.storage = Some(storage);
                s.offset = Some(offset);
            }
            Mapping::Zero => {
                s.allocated = true;
                s.zero = true;
                s.storage = host.map(|h| h.0);
                s.offset = host.map(|h| h.1);
            }
            Mapping::Unallocated => {
                s.storage = host.map(|h| h.0);
                s.offset = host.map(|h| h.1);
            }
            Mapping::Compressed => {
                s.allocated = true;
                s.data = true;
                s.compressed = true;
            }
            Mapping::Encrypted { storage, offset } => {
                s.allocated = true;
                s.data = true;
                s.encrypted = true;
                s.storage = Some(storage);
                s.offset = Some(offset);
            }
        }
        s
    }

    /// True when `next` (the range right after this one) has the same
    /// status, so the two can be reported as one extent.
    pub fn continues_with(&self, next: &BlockStatus) -> bool {
        self.allocated == next.allocated
            && self.data == next.data
            && self.zero == next.zero
            && self.compressed == next.compressed
            && self.encrypted == next.encrypted
            && self.storage == next.storage
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.len) == Some(b),
                _ => false,
            }
    }
}

/// What the driver will publish once the data of a write (or the zeroing
/// of a range) is in place: an L2 entry, a BAT entry, a bitmap bit. Only
/// the driver that made it can read it; the generic layer hands it back
/// through [`Driver::commit`](super::Driver::commit) or
/// [`Driver::abort`](super::Driver::abort). Dropping it without either
/// must release whatever it holds (claims, reserved space is leaked at
/// worst).
pub struct Commit(Box<dyn Any + Send + Sync>);

impl Commit {
    /// Wraps a driver's own record.
    pub fn new<T: Any + Send + Sync>(record: T) -> Commit {
        Commit(Box::new(record))
    }

    /// The driver's record back, when it is a `T`.
    pub fn into_inner<T: Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Commit(..)")
    }
}

/// A part of an [`Allocation`] that the write does not cover, and where
/// its current content is: the generic layer copies it into the new place
/// first (copy-on-write from the backing image, from old data of a shared
/// or compressed cluster, or zeroes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Guest offset of the part.
    pub guest: u64,
    /// Its length.
    pub len: u64,
    /// Where its content is now (a [`Mapping::Unallocated`] part reads
    /// from the backing image).
    pub from: Mapping,
}

/// New storage a driver reserved for a write: the generic layer writes
/// `[guest, guest + len)` to `offset` of `storage` (the request's bytes
/// where it covers the range, the [`fills`](Allocation::fills)
/// elsewhere), and only then hands `commit` back to be published.
#[derive(Debug)]
pub struct Allocation {
    /// First guest byte of the range written (at or before the request's
    /// offset).
    pub guest: u64,
    /// Bytes in the range (it may stop before the request ends, or reach
    /// past it; it always contains the request's first byte).
    pub len: u64,
    /// Storage of the new place.
    pub storage: StorageId,
    /// Byte offset of `guest` in that storage.
    pub offset: u64,
    /// The parts of the range outside the request, in guest order.
    pub fills: Vec<Fill>,
    /// The new place reads as zeroes already (fresh space at the end of
    /// the file): fills of zeroes need not be written, so a small write
    /// into a large new block writes only its own bytes.
    pub zeroed: bool,
    /// What to publish after the data is written.
    pub commit: Commit,
}

/// A driver's answer to "where do the bytes of this write go".
#[derive(Debug)]
#[non_exhaustive]
pub enum WriteMapping {
    /// The first `len` bytes of the request go to `offset` of `storage`:
    /// allocated and writable already, no metadata changes.
    InPlace {
        /// Storage of the place.
        storage: StorageId,
        /// Byte offset of the request's first byte.
        offset: u64,
        /// Bytes covered (at least 1).
        len: u64,
    },
    /// New storage was reserved (see [`Allocation`]).
    Allocate(Allocation),
    /// The driver stores the first `len` bytes itself, transformed
    /// (encryption), through
    /// [`Driver::write_transformed`](super::Driver::write_transformed).
    Transformed {
        /// Bytes covered (at least 1).
        len: u64,
    },
}

/// Flags of a write request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it returns.
    pub fua: bool,
}

/// Flags for write-zeroes requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (like `fallocate` punch-hole).
    pub may_unmap: bool,
    /// Fail with [`ErrorKind::NoFastZero`](crate::ErrorKind::NoFastZero)
    /// instead of writing zero buffers when the format cannot zero the
    /// range cheaply (NBD's `FAST_ZERO`).
    pub no_fallback: bool,
    /// Force unit access: durable when the request returns.
    pub fua: bool,
}

/// How a range becomes zero, as a driver answers write-zeroes.
#[derive(Debug)]
#[non_exhaustive]
pub enum ZeroAction {
    /// Metadata alone makes the range read as zeroes (the driver changed
    /// it, or `commit` does).
    Metadata,
    /// Zero the host range at `offset` of `storage` (punching a hole when
    /// the request may unmap), then publish `commit` if any.
    Host {
        /// Storage of the range.
        storage: StorageId,
        /// Byte offset of the request's first byte.
        offset: u64,
    },
    /// The format cannot zero this part cheaply: the generic layer writes
    /// zero buffers through the write path (or fails for a fast-zero
    /// request).
    Buffers,
}

/// A driver's answer to write-zeroes for a prefix of the request.
#[derive(Debug)]
pub struct ZeroMapping {
    /// Bytes of the request this answer covers (at least 1).
    pub len: u64,
    /// What the generic layer does for them.
    pub action: ZeroAction,
    /// Metadata to publish after the generic layer's part is done.
    pub commit: Option<Commit>,
}

/// How a discarded range is released, as a driver answers discard.
#[derive(Debug)]
#[non_exhaustive]
pub enum DiscardAction {
    /// Nothing to do here (too small to free, or not allocated).
    Nothing,
    /// Metadata alone released it (the driver changed it, or `commit` does).
    Metadata,
    /// Punch a hole in `storage` at `offset`, then publish `commit` if any.
    PunchHole {
        /// Storage of the range.
        storage: StorageId,
        /// Byte offset of the request's first byte.
        offset: u64,
    },
}

/// A driver's answer to discard for a prefix of the request.
#[derive(Debug)]
pub struct DiscardMapping {
    /// Bytes of the request this answer covers (at least 1).
    pub len: u64,
    /// What the generic layer does for them.
    pub action: DiscardAction,
    /// Metadata to publish after the generic layer's part is done.
    pub commit: Option<Commit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_status_says_what_a_range_is() {
        let c = BlockStatus::of_mapping(Mapping::Compressed, 10, None);
        assert!(c.compressed && !c.encrypted && c.data && c.offset.is_none());
        let e = BlockStatus::of_mapping(
            Mapping::Encrypted {
                storage: StorageId::IMAGE,
                offset: 4096,
            },
            10,
            None,
        );
        assert!(e.encrypted && !e.compressed && e.offset == Some(4096));
        let z = BlockStatus::of_mapping(Mapping::Zero, 5, Some((StorageId(1), 512)));
        assert_eq!(
            (z.zero, z.storage, z.offset),
            (true, Some(StorageId(1)), Some(512))
        );
    }

    #[test]
    fn extents_continue_only_when_contiguous_in_the_same_storage() {
        let at = |storage, offset, len| {
            BlockStatus::of_mapping(Mapping::Data { storage, offset }, len, None)
        };
        let a = at(StorageId(0), 0, 100);
        assert!(a.continues_with(&at(StorageId(0), 100, 5)));
        assert!(!a.continues_with(&at(StorageId(0), 101, 5)));
        assert!(!a.continues_with(&at(StorageId(1), 100, 5)));
        let near_end = at(StorageId(0), u64::MAX - 1, 100);
        assert!(!near_end.continues_with(&at(StorageId(0), 0, 1)));
    }

    #[test]
    fn a_commit_gives_back_only_its_own_type() {
        let c = Commit::new(42u32);
        assert_eq!(c.into_inner::<u32>(), Some(42));
        assert!(Commit::new(1u8).into_inner::<u32>().is_none());
    }
}
