//! `create -f parallels`: the layout qemu-img writes (version 2, heads 16,
//! the data area at the first cluster boundary after the BAT, nothing
//! allocated).

use super::header::{Header, WireHeader, MAGIC_V2, MAX_TRACKS, SECTOR, VERSION};
use crate::driver::CreateOptions;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Default cluster size, as qemu-img's.
pub const DEFAULT_CLUSTER: u64 = 1 << 20;

pub(super) fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    match opts.options.get("preallocation").map(String::as_str) {
        None | Some("off") | Some("falloc") | Some("full") | Some("metadata") => {}
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "Invalid parameter 'preallocation': '{v}' (off, metadata, falloc or full)"
            )))
        }
    }
    // qemu-img rounds both up to whole sectors.
    let cs = opts
        .get_size("cluster_size")?
        .unwrap_or(DEFAULT_CLUSTER)
        .div_ceil(SECTOR)
        .max(1)
        * SECTOR;
    let tracks = cs / SECTOR;
    if tracks > MAX_TRACKS as u64 {
        return Err(Error::invalid_argument(format!(
            "Cluster size is too large (at most {} bytes)",
            MAX_TRACKS as u64 * SECTOR
        )));
    }
    let size = opts.size.div_ceil(SECTOR) * SECTOR;
    let clusters = size.div_ceil(cs);
    // Entries count clusters in 32 bits; qemu's limit.
    if clusters >= 1 << 32 || size >= (1u64 << 32).saturating_mul(cs) {
        return Err(Error::invalid_argument(
            "Image size is too large for this cluster size",
        ));
    }
    let bat_entries = u32::try_from(clusters)
        .ok()
        .filter(|&n| n <= super::header::MAX_BAT_ENTRIES)
        .ok_or_else(|| Error::invalid_argument("Image size is too large for this cluster size"))?;
    let table = 64 + 4 * bat_entries as u64;
    let data_off = table.div_ceil(cs).max(1) * tracks;
    let wire = WireHeader {
        magic: *MAGIC_V2,
        version: VERSION,
        heads: 16,
        cylinders: u32::try_from(size / SECTOR / 16 / 32).unwrap_or(u32::MAX),
        tracks: tracks as u32,
        bat_entries,
        nb_sectors: size / SECTOR,
        inuse: 0,
        data_off: u32::try_from(data_off).map_err(|_| {
            Error::invalid_argument("Image size is too large for this cluster size")
        })?,
        flags: 0,
        ext_off: 0,
    };
    Header::validate(wire)?;
    let io = |what: &'static str| move |e| Error::io(what, e);
    storage
        .set_len(0)
        .and_then(|_| storage.write_at(&wire.to_bytes(), 0))
        .map_err(io("writing the Parallels header"))?;
    storage
        .set_len(data_off * SECTOR)
        .map_err(io("writing the Parallels BAT"))
}
