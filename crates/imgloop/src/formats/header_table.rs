//! Tables a header points at, read whole at open (qcow2's L1 and refcount
//! tables, qcow's L1 table): big-endian u64 entries, the part past the end
//! of the file reading as zeroes, as QEMU reads them.

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Reads a header table (the L1 or refcount table) of `count` entries at
/// `offset`; the part past the end of the file reads as zeroes. `count`
/// must be bounded by the caller (the header's limits).
pub fn read_header_table(
    storage: &dyn Storage,
    offset: u64,
    count: u64,
    what: &'static str,
) -> Result<Vec<u64>> {
    let bytes = count
        .checked_mul(8)
        .ok_or_else(|| Error::overflow(what, offset, "table size"))?;
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading image size", e))?;
    let mut buf = vec![0u8; bytes as usize];
    if offset < file_len {
        let avail = (file_len - offset).min(bytes) as usize;
        storage
            .read_at(&mut buf[..avail], offset)
            .map_err(|e| Error::io(format!("reading {what}"), e).at(what, offset))?;
    }
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}
