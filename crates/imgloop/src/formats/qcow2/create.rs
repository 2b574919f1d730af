//! Creating new qcow2 images.
//!
//! Layout: header cluster, refcount table, refcount blocks, L1 table, each
//! cluster-aligned, all with refcount 1 (QEMU's layout for small images).

use super::header::{self, autoclear, compat, incompat, CompressionType, Extension, Header};
use super::Qcow2;
use crate::driver::{CreateOptions, DriverOpenOptions, Preallocation};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// Validated create options.
struct Plan {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    lazy: bool,
    ext_l2: bool,
    compression: CompressionType,
    prealloc: Preallocation,
    backing: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    encryption: Option<super::crypt::CreateEncryption>,
}

fn plan(opts: &CreateOptions) -> Result<Plan> {
    let version = match opts.options.get("compat").map(String::as_str) {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "invalid compat value '{v}' (expected 0.10 or 1.1)"
            )))
        }
    };
    let cs = match opts.options.get("cluster_size") {
        Some(v) => crate::size::parse_size(v)?,
        None => 65536,
    };
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid_argument(format!(
            "cluster size must be a power of two between 512 and 2M, not {cs}"
        )));
    }
    let refcount_bits: u32 = opts.get("refcount_bits")?.unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::invalid_argument(format!(
            "refcount_bits must be a power of two up to 64, not {refcount_bits}"
        )));
    }
    let lazy = opts.get_bool("lazy_refcounts")?;
    let ext_l2 = opts.get_bool("extended_l2")?;
    let compression = match opts.options.get("compression_type").map(String::as_str) {
        None | Some("zlib") => CompressionType::Zlib,
        Some("zstd") => CompressionType::Zstd,
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "invalid compression_type '{v}' (expected zlib or zstd)"
            )))
        }
    };
    let mut prealloc: Preallocation = opts.get("preallocation")?.unwrap_or_default();
    let data_file = opts.options.get("data_file").cloned();
    let data_file_raw = opts.get_bool("data_file_raw")?;
    if data_file_raw && prealloc == Preallocation::Off {
        // Every guest cluster must map to its place in the raw data file,
        // or data put there by other tools would not show through.
        prealloc = Preallocation::Metadata;
    }
    let encryption = super::crypt::CreateEncryption::from_options(&opts.options, &opts.secrets)?;
    if encryption.is_some() {
        if data_file_raw {
            return Err(Error::invalid_argument(
                "data_file_raw cannot be used with encryption (the data file would not be a raw image)",
            ));
        }
        if prealloc != Preallocation::Off {
            return Err(Error::unsupported(
                "preallocation of encrypted images (preallocated clusters would not decrypt to zeroes)",
            ));
        }
    }
    if version == 2 {
        let v3_only = [
            (refcount_bits != 16, "refcount_bits other than 16"),
            (lazy, "lazy_refcounts"),
            (ext_l2, "extended_l2"),
            (
                compression != CompressionType::Zlib,
                "compression_type=zstd",
            ),
            (data_file.is_some(), "data_file"),
        ];
        if let Some((_, what)) = v3_only.iter().find(|(bad, _)| *bad) {
            return Err(Error::invalid_argument(format!(
                "{what} requires compat=1.1 or later"
            )));
        }
    }
    if ext_l2 && cs < 16384 {
        return Err(Error::invalid_argument(
            "extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if data_file_raw && data_file.is_none() {
        return Err(Error::invalid_argument("data_file_raw requires data_file"));
    }
    if data_file_raw && opts.backing_file.is_some() {
        return Err(Error::invalid_argument(
            "data_file_raw cannot be used with a backing file",
        ));
    }
    let backing = opts
        .backing_file
        .clone()
        .or_else(|| opts.options.get("backing_file").cloned());
    let backing_fmt = opts
        .backing_format
        .clone()
        .or_else(|| opts.options.get("backing_fmt").cloned());
    if backing
        .as_ref()
        .is_some_and(|b| b.len() > header::MAX_BACKING_NAME as usize)
    {
        return Err(Error::invalid_argument("backing file name is too long"));
    }
    Ok(Plan {
        version,
        cluster_bits: cs.trailing_zeros(),
        refcount_order: refcount_bits.trailing_zeros(),
        lazy,
        ext_l2,
        compression,
        prealloc,
        backing,
        backing_fmt,
        data_file,
        data_file_raw,
        encryption,
    })
}

/// Writes a new image on `storage` (empty) per `opts`.
pub(super) fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    opts: &CreateOptions,
) -> Result<()> {
    opts.check_known(&super::Qcow2Format)?;
    let p = plan(opts)?;
    if opts.size > header::MAX_VIRTUAL_SIZE {
        return Err(Error::invalid_argument("image size is too large for qcow2"));
    }
    let cs = 1u64 << p.cluster_bits;
    let entry_size = if p.ext_l2 { 16 } else { 8 };
    let per_l1 = cs * (cs / entry_size);
    let l1_size = opts.size.div_ceil(per_l1);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(Error::invalid_argument(
            "image size is too large for this cluster size",
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let refcount_bits = 1u64 << p.refcount_order;
    let per_block = cs * 8 / refcount_bits;
    // Refcount table and blocks must cover the metadata, themselves included.
    // The LUKS header and key material follow the L1 table, as QEMU
    // places them.
    let area_len = p.encryption.as_ref().map_or(0, |e| e.area_len());
    let area_clusters = area_len.div_ceil(cs);
    let (mut table, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + table + blocks + l1_clusters + area_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_table == table {
            break;
        }
        blocks = need_blocks;
        table = need_table;
    }
    let table_off = cs;
    let blocks_off = table_off + table * cs;
    let l1_off = blocks_off + blocks * cs;
    let area_off = l1_off + l1_clusters * cs;
    let total = 1 + table + blocks + l1_clusters + area_clusters;

    let mut incompatible = 0;
    let mut autoclear_bits = 0;
    let mut extensions = Vec::new();
    if let Some(f) = &p.backing_fmt {
        extensions.push(Extension {
            kind: header::ext::BACKING_FORMAT,
            data: f.as_bytes().to_vec(),
        });
    }
    if let Some(d) = &p.data_file {
        incompatible |= incompat::DATA_FILE;
        extensions.push(Extension {
            kind: header::ext::DATA_FILE,
            data: d.as_bytes().to_vec(),
        });
        if p.data_file_raw {
            autoclear_bits |= autoclear::DATA_FILE_RAW;
        }
    }
    if area_len > 0 {
        let mut d = area_off.to_be_bytes().to_vec();
        d.extend_from_slice(&area_len.to_be_bytes());
        extensions.push(Extension {
            kind: header::ext::CRYPTO,
            data: d,
        });
    }
    if p.compression != CompressionType::Zlib {
        incompatible |= incompat::COMPRESSION;
    }
    if p.ext_l2 {
        incompatible |= incompat::EXTL2;
    }
    if p.version >= 3 {
        extensions.push(Extension {
            kind: header::ext::FEATURE_TABLE,
            data: header::default_feature_table(),
        });
    }
    let h = Header {
        version: p.version,
        backing_file_offset: 0,
        backing_file_size: p.backing.as_ref().map_or(0, |b| b.len() as u32),
        cluster_bits: p.cluster_bits,
        size: opts.size,
        crypt_method: p.encryption.as_ref().map_or(0, |e| e.method()),
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: table_off,
        refcount_table_clusters: table as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if p.lazy { compat::LAZY_REFCOUNTS } else { 0 },
        autoclear_features: autoclear_bits,
        refcount_order: p.refcount_order,
        header_length: if p.version >= 3 { 112 } else { 72 },
        compression_type: p.compression,
        extensions,
        backing_file: p.backing.clone(),
    };
    let io = |what: &'static str| move |e| Error::io(what, e);
    // Refcount blocks: clusters 0..total are in use.
    let mut block_bytes = vec![0u8; (blocks * cs) as usize];
    for c in 0..total {
        Qcow2::set_rc_entry(&mut block_bytes, c, refcount_bits as u32, 1);
    }
    let mut table_bytes = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        table_bytes[(b * 8) as usize..(b * 8 + 8) as usize]
            .copy_from_slice(&(blocks_off + b * cs).to_be_bytes());
    }
    storage
        .write_at(&table_bytes, table_off)
        .map_err(io("writing the refcount table"))?;
    storage
        .write_at(&block_bytes, blocks_off)
        .map_err(io("writing refcount blocks"))?;
    storage
        .write_at(&vec![0u8; (l1_clusters * cs) as usize], l1_off)
        .map_err(io("writing the L1 table"))?;
    if let Some(e) = &p.encryption {
        let mut area = e.format_area()?;
        area.resize((area_clusters * cs) as usize, 0);
        storage
            .write_at(&area, area_off)
            .map_err(io("writing the LUKS header"))?;
    }
    storage
        .write_at(&h.to_bytes()?, 0)
        .map_err(io("writing the header"))?;

    // The external data file.
    if let Some(d) = &p.data_file {
        // As qemu-img: a relative name is relative to the working
        // directory (the header stores it as given).
        let _ = path;
        let dpath = Path::new(d).to_path_buf();
        let ds = FileStorage::create(&dpath).map_err(|e| {
            Error::io(
                format!("could not create data file '{}'", dpath.display()),
                e,
            )
        })?;
        // Sized (sparsely) to the disk, as QEMU does.
        ds.set_len(opts.size).map_err(io("sizing the data file"))?;
    }
    if p.prealloc != Preallocation::Off {
        preallocate(storage, path, opts.size, p.prealloc)?;
    }
    Ok(())
}

/// Allocates L2 tables and data clusters for the whole disk; with falloc
/// or full, also reserves or zeroes the data area.
fn preallocate(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    mode: Preallocation,
) -> Result<()> {
    let opts = DriverOpenOptions {
        path: path.map(Path::to_path_buf),
        // The data file was just named by the caller and created here.
        policy: crate::policy::FilePolicy::like_qemu_img(),
        ..DriverOpenOptions::new(false)
    };
    let q = Qcow2::open(storage, &opts)?;
    let cs = q.cluster_size;
    let mut end = 0;
    let mut g = 0;
    while g < size {
        let mut tables = q.tables_mut();
        // The L2 table first, so tables sit before the data they map and
        // the data clusters are contiguous.
        q.l2_for_write(&mut tables, g)?;
        let host = if q.external_data {
            g
        } else {
            q.alloc_clusters(&mut tables, 1)?
        };
        let bitmap = if q.ext_l2 { super::entry::ALL_ALLOC } else { 0 };
        q.set_l2(&mut tables, g, host | super::entry::COPIED, bitmap)?;
        end = end.max(host + cs);
        g += cs;
        if tables.l2.over_capacity() {
            drop(tables);
            q.flush_meta()?;
        }
    }
    q.flush_meta()?;
    let data = q.data();
    let io = |what: &'static str| move |e| Error::io(what, e);
    let end = end.max(data.len().map_err(io("reading file size"))?);
    match mode {
        Preallocation::Metadata => data.set_len(end).map_err(io("extending")),
        Preallocation::Falloc => data.allocate(0, end).map_err(io("preallocating")),
        Preallocation::Full => {
            data.set_len(end).map_err(io("extending"))?;
            // Zero only the holes: the metadata already written stays.
            let mut pos = 0;
            while pos < end {
                let (is_data, n) = data.extent(pos, end - pos).map_err(io("probing"))?;
                if !is_data {
                    data.zero_range(pos, n, false)
                        .map_err(io("writing zeroes"))?;
                }
                pos += n;
            }
            Ok(())
        }
        Preallocation::Off => Ok(()),
    }
}

/// Refcount table and block bytes that cover `clusters` clusters and
/// themselves.
fn refcount_metadata(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_block = cs * 8 / (1u64 << refcount_order);
    let per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let b = (clusters + table + blocks).div_ceil(per_block);
        let t = b.div_ceil(per_table_cluster);
        if b == blocks && t == table {
            return (blocks + table) * cs;
        }
        blocks = b;
        table = t;
    }
}

/// Bytes of a fully allocated image of `size` bytes (cluster-aligned):
/// header, L2 and L1 tables for the whole disk, refcounts, data (QEMU's
/// estimate, which `qemu-img measure` prints).
fn fully_allocated(size: u64, cs: u64, refcount_order: u32, ext_l2: bool) -> u64 {
    let entry = if ext_l2 { 16 } else { 8 };
    let per_l2 = cs / entry;
    let l2_entries = (size / cs).div_ceil(per_l2) * per_l2;
    let l1_entries = (l2_entries * entry / cs).div_ceil(cs / 8) * (cs / 8);
    let meta = cs + l2_entries * entry + l1_entries * 8;
    meta + refcount_metadata((meta + size) / cs, cs, refcount_order) + size
}

/// `qemu-img measure -O qcow2`: the sizes a new image with `opts` would
/// need, empty (`opts.size`) or holding `source`'s data.
pub(super) fn measure(
    opts: &CreateOptions,
    source: Option<&crate::Image>,
) -> Result<crate::driver::Measure> {
    opts.check_known(&super::Qcow2Format)?;
    let p = plan_for_measure(opts)?;
    let cs = 1u64 << p.cluster_bits;
    let luks = p.encryption_area.div_ceil(cs) * cs;
    let (virtual_size, data) = match source {
        None => (opts.size.div_ceil(cs) * cs, 0),
        Some(src) => {
            let size = src.size();
            let virtual_size = size.div_ceil(cs) * cs;
            let data = if p.backing.is_some() {
                // What the new backing file shares is unknown: all of it.
                virtual_size
            } else {
                let mut data = 0u64;
                let mut pos = 0u64;
                while pos < size {
                    let (st, _) = src.block_status_chain(pos, size - pos)?;
                    let mut n = st.len.max(1);
                    if !st.zero && st.data && st.allocated {
                        // To the end of the target cluster.
                        n = (pos + n).div_ceil(cs) * cs - pos;
                        data += pos % cs + n;
                    }
                    pos += n;
                }
                data
            };
            (virtual_size, data)
        }
    };
    let data = if matches!(p.prealloc, Preallocation::Full | Preallocation::Falloc) {
        virtual_size
    } else {
        data
    };
    let full = luks + fully_allocated(virtual_size, cs, p.refcount_order, p.ext_l2);
    let bitmaps = match source {
        Some(src) if p.version >= 3 => src.persistent_bitmaps_size(cs),
        _ => None,
    };
    Ok(crate::driver::Measure {
        bitmaps,
        required: full - virtual_size + data,
        fully_allocated: full,
    })
}

/// The parts of the create options `measure` needs.
struct MeasurePlan {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    ext_l2: bool,
    prealloc: Preallocation,
    backing: Option<String>,
    /// Bytes of the LUKS area an encrypted image would have.
    encryption_area: u64,
}

fn plan_for_measure(opts: &CreateOptions) -> Result<MeasurePlan> {
    // The key is not needed to know the sizes.
    let mut o = opts.clone();
    let luks = o.options.get("encrypt.format").map(String::as_str) == Some("luks");
    if luks {
        o.options
            .insert("encrypt.key-secret".into(), "measure".into());
        o.secrets
            .insert("measure", crate::secret::Secret::new(b"measure".to_vec()));
    }
    let p = plan(&o)?;
    Ok(MeasurePlan {
        version: p.version,
        cluster_bits: p.cluster_bits,
        refcount_order: p.refcount_order,
        ext_l2: p.ext_l2,
        prealloc: p.prealloc,
        backing: p.backing,
        encryption_area: p.encryption.as_ref().map_or(0, |e| e.area_len()),
    })
}
