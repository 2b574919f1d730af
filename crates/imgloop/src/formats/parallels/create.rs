//! `create -f parallels`: the layout qemu-img writes (version 2, heads 16,
//! the data area at the first cluster boundary after the BAT, nothing
//! allocated).

use super::header::{Header, WireHeader, MAGIC_V2, MAX_TRACKS, SECTOR, VERSION};
use crate::driver::CreateOptions;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Default cluster size, as qemu-img's.
pub const DEFAULT_CLUSTER: u64 = 1 << 20;

pub(super) fn create(
    storage: &dyn Storage,
    path: Option<&std::path::Path>,
    opts: &CreateOptions,
) -> Result<()> {
    // A backing file: the new image becomes a snapshot over it in the
    // directory's disk bundle, with the parent's cluster size.
    let parent = match &opts.backing_file {
        Some(b) => Some(parent_of(path, b, opts)?),
        None => None,
    };
    match opts.options.get("preallocation").map(String::as_str) {
        None | Some("off") | Some("falloc") | Some("full") | Some("metadata") => {}
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "Invalid parameter 'preallocation': '{v}' (off, metadata, falloc or full)"
            )))
        }
    }
    // qemu-img rounds both up to whole sectors.
    let given = opts.get_size("cluster_size")?;
    if let (Some(g), Some(p)) = (given, &parent) {
        if g.div_ceil(SECTOR) != p.tracks {
            return Err(Error::invalid_argument(format!(
                "the cluster size must be the backing image's ({} bytes)",
                p.tracks * SECTOR
            )));
        }
    }
    let cs = given
        .or(parent.as_ref().map(|p| p.tracks * SECTOR))
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
        .map_err(io("writing the Parallels BAT"))?;
    if let (Some(p), Some(path)) = (parent, path) {
        super::bundle::add_snapshot(&p.dir, &p.path, p.expandable, path, size / SECTOR, tracks)?;
    }
    Ok(())
}

/// The backing image of a new image, as the bundle needs it.
struct Parent {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    expandable: bool,
    tracks: u64,
}

fn parent_of(path: Option<&std::path::Path>, name: &str, opts: &CreateOptions) -> Result<Parent> {
    let path = path.ok_or_else(|| {
        Error::invalid_argument("a Parallels image with a backing file needs a file name")
    })?;
    let expandable = match opts.backing_format.as_deref() {
        Some("parallels") | None => true,
        Some("raw") => false,
        Some(f) => {
            return Err(Error::invalid_argument(format!(
                "a Parallels image's backing file is a parallels or raw image, not {f}"
            )))
        }
    };
    let full = crate::policy::FilePolicy::resolve(Some(path), name);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tracks = if expandable {
        let mut head = [0u8; 64];
        let f = crate::storage::FileStorage::open(&full, false).map_err(|e| {
            Error::io(
                format!("could not open backing file '{}'", full.display()),
                e,
            )
        })?;
        f.read_at(&mut head, 0)
            .map_err(|e| Error::io("reading the backing file's header", e))?;
        let w = WireHeader::parse(&head).expect("64 bytes");
        Header::validate(w)
            .map_err(|e| e.in_file(&full))?
            .wire
            .tracks as u64
    } else {
        DEFAULT_CLUSTER / SECTOR
    };
    Ok(Parent {
        dir,
        path: full,
        expandable,
        tracks,
    })
}
