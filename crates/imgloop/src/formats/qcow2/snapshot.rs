//! The internal snapshot table (read side: for check and info).

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Largest snapshot table imgloop reads (QEMU's limit).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data per snapshot.
const MAX_EXTRA: u32 = 1024;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Instruction count at creation (extra data bytes 16..24), if recorded.
    pub icount: Option<u64>,
}

/// Byte range of the table plus the parsed entries.
pub struct SnapshotTable {
    /// Bytes the table occupies from `snapshots_offset`.
    pub bytes: u64,
    /// The entries.
    pub entries: Vec<Snapshot>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2"))
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8"))
}

/// Reads `count` snapshot entries at `offset`.
pub fn read_table(storage: &dyn Storage, offset: u64, count: u32) -> Result<SnapshotTable> {
    let mut entries = Vec::new();
    let mut pos = offset;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    let read = |at: u64, len: usize| -> Result<Vec<u8>> {
        if at.checked_add(len as u64).is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(
                "snapshot table",
                at,
                "snapshot table lies past the end of the file",
            ));
        }
        let mut b = vec![0u8; len];
        storage
            .read_at(&mut b, at)
            .map_err(|e| Error::io("reading the snapshot table", e).at("snapshot table", at))?;
        Ok(b)
    };
    for _ in 0..count {
        let h = read(pos, 40)?;
        let extra = be32(&h, 36);
        if extra > MAX_EXTRA {
            return Err(Error::corrupt(
                "snapshot table",
                pos,
                "snapshot extra data is too large",
            ));
        }
        let id_len = be16(&h, 12) as usize;
        let name_len = be16(&h, 14) as usize;
        let rest = read(pos + 40, extra as usize + id_len + name_len)?;
        let ex = &rest[..extra as usize];
        let mut vm_state_size = be32(&h, 32) as u64;
        if extra >= 8 {
            vm_state_size = be64(ex, 0);
        }
        let id =
            String::from_utf8_lossy(&rest[extra as usize..extra as usize + id_len]).into_owned();
        let name = String::from_utf8_lossy(&rest[extra as usize + id_len..]).into_owned();
        entries.push(Snapshot {
            l1_table_offset: be64(&h, 0),
            l1_size: be32(&h, 8),
            id,
            name,
            date_sec: be32(&h, 16),
            date_nsec: be32(&h, 20),
            vm_clock_nsec: be64(&h, 24),
            vm_state_size,
            icount: (extra >= 24)
                .then(|| be64(ex, 16))
                .filter(|&v| v != u64::MAX),
        });
        let len = 40 + rest.len() as u64;
        pos += len.div_ceil(8) * 8;
        if pos - offset > MAX_TABLE_BYTES {
            return Err(Error::corrupt(
                "snapshot table",
                offset,
                "snapshot table is too large",
            ));
        }
    }
    Ok(SnapshotTable {
        bytes: pos - offset,
        entries,
    })
}
