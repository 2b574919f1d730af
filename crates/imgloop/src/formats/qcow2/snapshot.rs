//! The internal snapshot table: reading it (as QEMU reads it, for open,
//! check and info) and encoding a new one (for `snapshot_ops`).

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
    /// Virtual disk size when the snapshot was taken (extra data bytes
    /// 8..16), if recorded.
    pub disk_size: Option<u64>,
    /// The ID as stored (the table is rewritten from these bytes, so IDs
    /// that are not UTF-8 survive).
    pub raw_id: Vec<u8>,
    /// The name as stored.
    pub raw_name: Vec<u8>,
    /// The 32-bit VM state size field of the fixed part.
    pub vm_state_size_low: u32,
    /// The extra data as stored, known fields and all (kept, unknown
    /// parts included, when the table is rewritten).
    pub extra: Vec<u8>,
}

/// Bytes of the extra data imgloop writes for a new snapshot (VM state
/// size, disk size, instruction count), as QEMU writes it.
pub const EXTRA_BYTES: usize = 24;

impl Snapshot {
    /// A new entry for a snapshot of a disk of `disk_size` bytes whose L1
    /// copy of `l1_size` entries is at `l1_table_offset`, taken now.
    pub fn new(
        id: String,
        name: String,
        l1_table_offset: u64,
        l1_size: u32,
        disk_size: u64,
    ) -> Snapshot {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut extra = vec![0u8; EXTRA_BYTES];
        // VM state size 0 (no VM state: a disk-only snapshot), the disk
        // size, instruction count 0 (what qemu-img records).
        extra[8..16].copy_from_slice(&disk_size.to_be_bytes());
        Snapshot {
            l1_table_offset,
            l1_size,
            raw_id: id.as_bytes().to_vec(),
            raw_name: name.as_bytes().to_vec(),
            id,
            name,
            date_sec: now.as_secs().min(u32::MAX as u64) as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            icount: Some(0),
            disk_size: Some(disk_size),
            vm_state_size_low: 0,
            extra,
        }
    }

    /// Bytes of this entry in a table, padding to 8 included.
    pub fn encoded_len(&self) -> u64 {
        ((40 + self.extra.len() + self.raw_id.len() + self.raw_name.len()) as u64).div_ceil(8) * 8
    }
}

/// Encodes a snapshot table (entries padded to multiples of 8).
pub fn encode_table(entries: &[Snapshot]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for s in entries {
        let too_long = |what: &str| {
            Error::invalid_argument(format!("snapshot {what} is longer than 65535 bytes"))
        };
        let id_len = u16::try_from(s.raw_id.len()).map_err(|_| too_long("ID"))?;
        let name_len = u16::try_from(s.raw_name.len()).map_err(|_| too_long("name"))?;
        let start = out.len();
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_state_size_low.to_be_bytes());
        out.extend_from_slice(&(s.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&s.extra);
        out.extend_from_slice(&s.raw_id);
        out.extend_from_slice(&s.raw_name);
        out.resize(start + s.encoded_len() as usize, 0);
    }
    if out.len() as u64 > MAX_TABLE_BYTES {
        return Err(Error::invalid_argument(
            "the snapshot table would be larger than 64 MiB",
        ));
    }
    Ok(out)
}

/// Byte range of the table plus the parsed entries.
#[derive(Debug)]
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

/// Reads `count` snapshot entries at `offset`, as QEMU reads them: each
/// entry starts at the next multiple of 8, and the part of the table past
/// the end of the file reads as zeroes (an entry there has an empty ID and
/// name), so a name that runs past the end is cut at the end. Refused, as
/// QEMU refuses: extra data over 1024 bytes, a table over 64 MiB.
pub fn read_table(storage: &dyn Storage, offset: u64, count: u32) -> Result<SnapshotTable> {
    // As QEMU: the table must be addressable as a whole.
    if count > 0 && offset > i64::MAX as u64 - MAX_TABLE_BYTES {
        return Err(Error::corrupt(
            "snapshot table",
            offset,
            "Snapshot table offset invalid",
        ));
    }
    let mut entries = Vec::new();
    let mut pos = offset;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    // Reads `len` bytes at `at`, zeroes past the end of the file; `len`
    // is bounded by the table limit before this is called.
    let read = |at: u64, len: usize| -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        if at < file_len {
            let n = (file_len - at).min(len as u64) as usize;
            storage
                .read_at(&mut b[..n], at)
                .map_err(|e| Error::io("reading the snapshot table", e).at("snapshot table", at))?;
        }
        Ok(b)
    };
    let too_big = |i: u32| {
        Error::corrupt(
            "snapshot table",
            offset,
            format!("Snapshot table is too big (entry {i} ends past {MAX_TABLE_BYTES} bytes)"),
        )
    };
    for i in 0..count {
        let fixed_end = (pos - offset) + 40;
        if fixed_end > MAX_TABLE_BYTES {
            return Err(too_big(i));
        }
        let h = read(pos, 40)?;
        let extra = be32(&h, 36);
        if extra > MAX_EXTRA {
            return Err(Error::corrupt(
                "snapshot table",
                pos,
                format!("Too much extra metadata in snapshot table entry {i}"),
            ));
        }
        let id_len = be16(&h, 12) as usize;
        let name_len = be16(&h, 14) as usize;
        let rest_len = extra as usize + id_len + name_len;
        if fixed_end + rest_len as u64 > MAX_TABLE_BYTES {
            return Err(too_big(i));
        }
        let rest = read(pos + 40, rest_len)?;
        let ex = &rest[..extra as usize];
        let mut vm_state_size = be32(&h, 32) as u64;
        if extra >= 8 {
            vm_state_size = be64(ex, 0);
        }
        let text = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .trim_end_matches('\0')
                .to_string()
        };
        let raw_id = rest[extra as usize..extra as usize + id_len].to_vec();
        let raw_name = rest[extra as usize + id_len..].to_vec();
        let id = text(&raw_id);
        let name = text(&raw_name);
        entries.push(Snapshot {
            l1_table_offset: be64(&h, 0),
            l1_size: be32(&h, 8),
            id,
            name,
            raw_id,
            raw_name,
            vm_state_size_low: be32(&h, 32),
            disk_size: (extra >= 16).then(|| be64(ex, 8)),
            extra: ex.to_vec(),
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
    }
    Ok(SnapshotTable {
        bytes: pos - offset,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemStorage, Storage};

    #[test]
    fn a_table_offset_near_2_to_the_64_is_an_error_not_an_overflow() {
        // Found by the open_read fuzz target.
        let mem = MemStorage::from_bytes(&[0u8; 4096]);
        for off in [u64::MAX - 7, i64::MAX as u64, (i64::MAX as u64) - 100] {
            let e = read_table(&mem, off, 3).unwrap_err();
            assert!(e.to_string().contains("offset invalid"), "{e}");
        }
        assert!(read_table(&mem, u64::MAX - 7, 0)
            .unwrap()
            .entries
            .is_empty());
    }

    fn entry(id: &str, name: &str, name_len: u16, extra: u32) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x3_0000u64.to_be_bytes());
        e[8..12].copy_from_slice(&2u32.to_be_bytes());
        e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        e[14..16].copy_from_slice(&name_len.to_be_bytes());
        e[36..40].copy_from_slice(&extra.to_be_bytes());
        e.extend(std::iter::repeat_n(0, extra as usize));
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e
    }

    #[test]
    fn a_name_running_past_the_end_of_the_file_reads_as_qemu_reads_it() {
        // name_size says 1000, the file ends after "abc": the rest reads
        // as zeroes, and the name is "abc", as `qemu-img snapshot -l` shows.
        let mut file = vec![0u8; 4096];
        let e = entry("1", "abc", 1000, 16);
        file.extend_from_slice(&e);
        let mem = MemStorage::from_bytes(&file);
        let t = read_table(&mem, 4096, 1).unwrap();
        assert_eq!(t.entries[0].name, "abc");
        assert_eq!(t.entries[0].id, "1");
        assert_eq!(t.bytes, (40 + 16 + 1 + 1000u64).div_ceil(8) * 8);
        // A table wholly past the end reads as empty entries.
        let t = read_table(&mem, 1 << 20, 2).unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.entries[1].name, "");
    }

    #[test]
    fn too_much_extra_data_and_too_big_tables_are_refused_as_qemu_does() {
        let mut file = vec![0u8; 512];
        file.extend_from_slice(&entry("1", "x", 1, 1025));
        let mem = MemStorage::from_bytes(&file);
        let Err(e) = read_table(&mem, 512, 1) else {
            panic!("too much extra data was accepted");
        };
        assert!(e.to_string().contains("Too much extra metadata"), "{e}");
        // 65535-byte names: the table passes 64 MiB after about 1000 entries.
        let mut big = [0u8; 40];
        big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let mem = MemStorage::new();
        let step = (40 + 65535u64).div_ceil(8) * 8;
        for i in 0..1100 {
            mem.write_at(&big, i * step).unwrap();
        }
        let Err(e) = read_table(&mem, 0, 1100) else {
            panic!("a table of 1100 entries of 64 KiB was accepted");
        };
        assert!(e.to_string().contains("too big"), "{e}");
    }
}
