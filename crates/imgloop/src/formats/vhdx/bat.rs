//! The block allocation table: u64 little-endian entries, the state in
//! bits 0-2 and the file offset in MiB in bits 20-63. After every
//! `chunk_ratio` payload entries comes the sector-bitmap entry of that
//! chunk (a chunk is 2^23 logical sectors); a sector bitmap block (1 MiB)
//! has one bit per logical sector of its chunk, set when the sector's data
//! is in this file rather than the parent.

use super::header::MIB;

/// Logical sectors per chunk.
pub const SECTORS_PER_CHUNK: u64 = 1 << 23;
/// Bytes of a sector bitmap block.
pub const BITMAP_BLOCK: u64 = MIB;

/// A payload block's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// 0: not in this file (the parent's data, or undefined without one).
    NotPresent,
    /// 1: undefined content.
    Undefined,
    /// 2: reads as zeroes.
    Zero,
    /// 3 (and 5, the 0.95 draft's value): unmapped by the guest.
    Unmapped,
    /// 6: all of the block is at the offset.
    FullyPresent,
    /// 7 (differencing only): the sector bitmap says, per sector, this
    /// file or the parent.
    PartiallyPresent,
    /// 4: reserved.
    Reserved(u8),
}

impl Payload {
    /// The state bits of `entry`.
    pub fn of(entry: u64) -> Payload {
        match entry & 7 {
            0 => Payload::NotPresent,
            1 => Payload::Undefined,
            2 => Payload::Zero,
            3 | 5 => Payload::Unmapped,
            6 => Payload::FullyPresent,
            7 => Payload::PartiallyPresent,
            s => Payload::Reserved(s as u8),
        }
    }

    /// The state's value.
    pub fn bits(self) -> u64 {
        match self {
            Payload::NotPresent => 0,
            Payload::Undefined => 1,
            Payload::Zero => 2,
            Payload::Unmapped => 3,
            Payload::FullyPresent => 6,
            Payload::PartiallyPresent => 7,
            Payload::Reserved(s) => s as u64,
        }
    }
}

/// Sector bitmap entry state: present.
pub const SB_PRESENT: u64 = 6;

/// The byte offset an entry names.
pub fn offset_of(entry: u64) -> u64 {
    entry & !(MIB - 1)
}

/// An entry of `state` at `offset` (a multiple of 1 MiB).
pub fn entry(state: Payload, offset: u64) -> u64 {
    offset | state.bits()
}

/// Where things are in the BAT of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per payload block.
    pub block_size: u64,
    /// Logical sector size.
    pub sector: u64,
    /// Payload blocks per chunk.
    pub chunk_ratio: u64,
    /// Payload blocks of the disk.
    pub payload_blocks: u64,
    /// Entries in the BAT.
    pub entries: u64,
}

impl Geometry {
    /// The geometry of a disk of `size` bytes; `differencing` images also
    /// have the sector-bitmap entry of the last chunk.
    pub fn new(size: u64, block_size: u64, sector: u64, differencing: bool) -> Geometry {
        let chunk_ratio = SECTORS_PER_CHUNK * sector / block_size;
        let payload_blocks = size.div_ceil(block_size);
        let entries = if differencing {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size,
            sector,
            chunk_ratio,
            payload_blocks,
            entries,
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector-bitmap entry of the chunk holding `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// True when BAT index `i` is a sector-bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Byte offset in the chunk's sector bitmap block of the bit of the
    /// logical sector at guest offset `guest`, and the bit.
    pub fn bitmap_bit(&self, guest: u64) -> (u64, u8) {
        let s = (guest / self.sector) % SECTORS_PER_CHUNK;
        (s / 8, (s % 8) as u8)
    }

    /// Bytes of BAT the entries take.
    pub fn bat_bytes(&self) -> u64 {
        self.entries * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratios_and_entry_counts_follow_the_specification() {
        let g = Geometry::new(10 << 30, 32 << 20, 512, false);
        assert_eq!((g.chunk_ratio, g.payload_blocks), (128, 320));
        // Two sector-bitmap entries between the three chunks.
        assert_eq!(g.entries, 320 + 2);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(130), 257);
        assert!(g.is_bitmap_index(128) && !g.is_bitmap_index(129));
        let d = Geometry::new(10 << 30, 32 << 20, 512, true);
        assert_eq!(d.entries, 3 * 129);
        let k = Geometry::new(1 << 30, 1 << 20, 4096, false);
        assert_eq!(k.chunk_ratio, 32768);
        assert_eq!(Geometry::new(0, 1 << 20, 512, false).entries, 0);
        assert_eq!(
            Payload::of(entry(Payload::FullyPresent, 3 * MIB)),
            Payload::FullyPresent
        );
        assert_eq!(offset_of(entry(Payload::FullyPresent, 3 * MIB)), 3 * MIB);
        assert_eq!(Payload::of(5), Payload::Unmapped);
        assert_eq!(Payload::of(4), Payload::Reserved(4));
    }
}
