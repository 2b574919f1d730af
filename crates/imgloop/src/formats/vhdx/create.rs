//! New images: fixed, dynamic and differencing.
//!
//! The layout is the one Windows writes: the header section, the log at
//! 1 MiB, the metadata region (1 MiB) after it, then the BAT, then the
//! blocks. Options and defaults follow `qemu-img create -f vhdx`: the
//! block size picked from the disk size when not given, a 1 MiB log, and
//! `block_state_zero=on` (unallocated blocks of a dynamic image are zero
//! blocks). A differencing image (`-b PARENT`) gets the parent's size and
//! sector size, 2 MiB blocks (as Hyper-V's), and a parent locator with the
//! parent's data-write GUID and its path relative to the child.

use super::bat::{self, Geometry, Payload};
use super::guid::Guid;
use super::header::{
    Header, Region, RegionTable, BAT_REGION, HEADER_AT, METADATA_REGION, MIB, REGIONS_AT,
};
use super::metadata::{Metadata, ParentLocator, MAX_SIZE};
use super::Vhdx;
use crate::driver::CreateOptions;
use crate::error::{Error, Result};
use crate::policy::FilePolicy;
use crate::storage::Storage;
use std::path::{Component, Path, PathBuf};

fn invalid(why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::invalid_argument(why)
}

/// qemu-img's block size for a disk of `size` bytes.
fn auto_block_size(size: u64) -> u64 {
    match size {
        s if s > 32 << 40 => 64 * MIB,
        s if s > 100 << 30 => 32 * MIB,
        s if s > 1 << 30 => 16 * MIB,
        _ => 8 * MIB,
    }
}

/// `path` relative to `dir`, with Windows separators.
fn relative_windows_path(dir: &Path, path: &Path) -> String {
    let (d, p): (Vec<Component>, Vec<Component>) =
        (dir.components().collect(), path.components().collect());
    let common = d.iter().zip(&p).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); d.len() - common];
    parts.extend(
        p[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    if parts.first().is_none_or(|f| f != "..") {
        parts.insert(0, ".".into());
    }
    parts.join("\\")
}

/// The parent of a new differencing image: its metadata, data-write GUID
/// and the locator naming it.
fn parent_of(
    child: Option<&Path>,
    name: &str,
    opts: &CreateOptions,
) -> Result<(Metadata, ParentLocator)> {
    if let Some(f) = opts.backing_format.as_deref().filter(|f| *f != "vhdx") {
        return Err(Error::unsupported(format!(
            "the parent of a differencing VHDX must be a VHDX image, not {f}"
        )));
    }
    let full = FilePolicy::resolve(child, name);
    let parent = crate::Image::open(&full, &crate::OpenOptions::read_only(Some("vhdx")))
        .map_err(|e| e.context(format!("could not open the parent '{}'", full.display())))?;
    let p = parent
        .driver()
        .as_any()
        .downcast_ref::<Vhdx>()
        .expect("opened as vhdx");
    let mut loc = ParentLocator::default();
    loc.entries
        .insert("parent_linkage".into(), p.data_write_guid().to_string());
    let abs = std::fs::canonicalize(&full).map_err(|e| {
        Error::io(
            format!("could not resolve the parent '{}'", full.display()),
            e,
        )
    })?;
    let dir = match child.and_then(Path::parent) {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    loc.entries
        .insert("relative_path".into(), relative_windows_path(&dir, &abs));
    // This system's absolute path, with Windows separators: Windows tries
    // the relative path first; readers that take the file name after the
    // last separator find the parent next to the child.
    loc.entries.insert(
        "absolute_win32_path".into(),
        abs.display().to_string().replace('/', "\\"),
    );
    Ok((p.metadata().clone(), loc))
}

pub(super) fn create(
    storage: &dyn Storage,
    path: Option<&Path>,
    opts: &CreateOptions,
) -> Result<()> {
    let parent = match opts.backing_file.as_deref() {
        Some(name) => Some(parent_of(path, name, opts)?),
        None => None,
    };
    let subformat = opts
        .options
        .get("subformat")
        .map(String::as_str)
        .unwrap_or("dynamic");
    let fixed = match subformat {
        "dynamic" => false,
        "fixed" if parent.is_none() => true,
        "fixed" => return Err(invalid("a differencing image cannot be fixed")),
        other => {
            return Err(invalid(format!(
                "Parameter 'subformat' does not accept value '{other}' (dynamic or fixed)"
            )))
        }
    };
    let logical = match (opts.get::<u32>("logical_sector_size")?, &parent) {
        (Some(s @ (512 | 4096)), None) => s,
        (Some(s), Some((p, _))) if s == p.logical_sector => s,
        (Some(s), Some(_)) => {
            return Err(invalid(format!(
                "logical sector size {s} differs from the parent's"
            )))
        }
        (Some(s), None) => return Err(invalid(format!("logical sector size {s} (512 or 4096)"))),
        (None, Some((p, _))) => p.logical_sector,
        (None, None) => 512,
    };
    let physical = match opts.get::<u32>("physical_sector_size")? {
        Some(s @ (512 | 4096)) => s,
        Some(s) => return Err(invalid(format!("physical sector size {s} (512 or 4096)"))),
        None => parent.as_ref().map_or(4096, |(p, _)| p.physical_sector),
    };
    let size = match &parent {
        Some((p, _)) if opts.size != 0 && opts.size != p.size => {
            return Err(invalid(format!(
                "a differencing image has its parent's size ({} bytes), not {}",
                p.size, opts.size
            )))
        }
        Some((p, _)) => p.size,
        None => opts.size.next_multiple_of(logical as u64),
    };
    if size > MAX_SIZE {
        return Err(invalid("Image size too large; max of 64TB"));
    }
    let log_size = opts.get_size("log_size")?.unwrap_or(MIB);
    if log_size == 0 {
        return Err(invalid("Log size must be a multiple of 1 MB"));
    }
    let log_size = log_size.next_multiple_of(MIB);
    if log_size >= 4 << 30 {
        return Err(invalid("Log size must be smaller than 4 GB"));
    }
    let block_size = match opts.get_size("block_size")?.unwrap_or(0) {
        0 if parent.is_some() => 2 * MIB,
        0 => auto_block_size(size),
        b => b.next_multiple_of(MIB).min(256 * MIB),
    };
    if !block_size.is_power_of_two() {
        return Err(invalid("Block size must be a power of two"));
    }
    let zero_state = match opts.options.get("block_state_zero") {
        None => true,
        Some(_) => opts.get_bool("block_state_zero")?,
    };
    let meta = Metadata {
        block_size: block_size as u32,
        leave_allocated: fixed,
        has_parent: parent.is_some(),
        size,
        disk_id: parent
            .as_ref()
            .map_or_else(Guid::random, |(p, _)| p.disk_id),
        logical_sector: logical,
        physical_sector: physical,
        parent: parent.as_ref().map(|(_, l)| l.clone()),
    };
    let geo = Geometry::new(size, block_size, logical as u64, parent.is_some());
    let log_at = MIB;
    let meta_at = log_at + log_size;
    let bat_at = meta_at + MIB;
    let bat_len = geo.bat_bytes().max(1).next_multiple_of(MIB);
    let data_at = bat_at + bat_len;
    let io = |what: &'static str| move |e| Error::io(what, e);

    // File type identifier.
    let mut ident = vec![0u8; 520];
    ident[0..8].copy_from_slice(super::header::FILE_SIGNATURE);
    let creator: Vec<u8> = format!("imgloop v{}", env!("CARGO_PKG_VERSION"))
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    ident[8..8 + creator.len()].copy_from_slice(&creator);
    storage
        .write_at(&ident, 0)
        .map_err(io("writing the VHDX file identifier"))?;
    // Regions, metadata, BAT.
    let table = RegionTable {
        entries: vec![
            Region {
                guid: BAT_REGION,
                offset: bat_at,
                length: bat_len,
                required: true,
            },
            Region {
                guid: METADATA_REGION,
                offset: meta_at,
                length: MIB,
                required: true,
            },
        ],
    };
    let t = table.to_bytes();
    for at in REGIONS_AT {
        storage
            .write_at(&t, at)
            .map_err(io("writing the VHDX region table"))?;
    }
    storage
        .write_at(&meta.to_region(), meta_at)
        .map_err(io("writing the VHDX metadata"))?;
    let entry_of = |block: u64| -> u64 {
        if fixed {
            bat::entry(Payload::FullyPresent, data_at + block * block_size)
        } else if zero_state && parent.is_none() {
            bat::entry(Payload::Zero, 0)
        } else {
            0
        }
    };
    if fixed || (zero_state && parent.is_none()) {
        // In pieces, so a large BAT never sits in memory whole.
        let per_piece = (MIB / 8) as usize;
        let mut buf = Vec::with_capacity(per_piece * 8);
        let mut written = 0u64;
        for index in 0..geo.entries {
            let e = if geo.is_bitmap_index(index) {
                0
            } else {
                entry_of(index - index / (geo.chunk_ratio + 1))
            };
            buf.extend_from_slice(&e.to_le_bytes());
            if buf.len() == per_piece * 8 || index + 1 == geo.entries {
                storage
                    .write_at(&buf, bat_at + written)
                    .map_err(io("writing the VHDX BAT"))?;
                written += buf.len() as u64;
                buf.clear();
            }
        }
    }
    let end = if fixed {
        data_at + geo.payload_blocks * block_size
    } else {
        data_at
    };
    storage.set_len(end).map_err(io("sizing the VHDX file"))?;
    // Headers last: until they are written the file is no VHDX.
    let guid = Guid::random();
    let mut h = Header {
        sequence: 1,
        file_write: guid,
        data_write: Guid::random(),
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: log_size as u32,
        log_offset: log_at,
    };
    for at in HEADER_AT {
        storage
            .write_at(&h.to_bytes(), at)
            .map_err(io("writing a VHDX header"))?;
        h.sequence += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_use_windows_separators() {
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/b/p.vhdx")),
            ".\\p.vhdx"
        );
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/c/p.vhdx")),
            "..\\c\\p.vhdx"
        );
        assert_eq!(auto_block_size(1 << 30), 8 * MIB);
        assert_eq!(auto_block_size((1 << 30) + 1), 16 * MIB);
        assert_eq!(auto_block_size(101 << 30), 32 * MIB);
        assert_eq!(auto_block_size(33 << 40), 64 * MIB);
    }
}
