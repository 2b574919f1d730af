//! `amend`: changing the options of an existing qcow2 image, with
//! qemu-img's rules and messages: `compat` (1.1 ↔ 0.10), `lazy_refcounts`,
//! `refcount_bits` (the refcount structure rewritten at the new width),
//! `data_file` (renaming an external data file), LUKS key slots
//! (`encrypt.*`), and `size` (done by the generic layer).
//!
//! Each change ends in one header write, after everything the new header
//! names is durable: a crash leaves the old or the new image.

use super::entry::{self, Cluster};
use super::header::{self, compat, incompat};
use super::{crypt, Qcow2, Tables};
use crate::driver::AmendOptions;
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// Options only `create` takes.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "nocow",
    "extent_size_hint",
];

/// Options `amend` takes (besides the LUKS key slot ones).
const AMENDABLE: &[&str] = &[
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "size",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
];

/// What `qemu-img amend -o help` lists for qcow2.
pub const AMEND_HELP: &[(&str, &str)] = &[
    ("backing_file=<str>", "File name of a base image"),
    ("backing_fmt=<str>", "Image format of the base image"),
    (
        "compat=<str>",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    ("data_file=<str>", "File name of an external data file"),
    (
        "data_file_raw=<bool (on/off)>",
        "The external data file must stay valid as a raw image",
    ),
    (
        "encrypt.iter-time=<num>",
        "Time to spend in PBKDF in milliseconds",
    ),
    (
        "encrypt.keyslot=<num>",
        "Select a single keyslot to modify explicitly",
    ),
    (
        "encrypt.new-secret=<str>",
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    (
        "encrypt.old-secret=<str>",
        "Select all keyslots that match this password",
    ),
    (
        "encrypt.state=<str>",
        "Select new state of affected keyslots (active/inactive)",
    ),
    (
        "lazy_refcounts=<bool (on/off)>",
        "Postpone refcount updates",
    ),
    (
        "refcount_bits=<num>",
        "Width of a reference count entry in bits",
    ),
    ("size=<size>", "Virtual disk size"),
];

fn bool_opt(o: &AmendOptions, key: &str) -> Result<Option<bool>> {
    match o.options.get(key).map(String::as_str) {
        None => Ok(None),
        Some("on") | Some("true") | Some("yes") => Ok(Some(true)),
        Some("off") | Some("false") | Some("no") => Ok(Some(false)),
        Some(v) => Err(Error::invalid_argument(format!(
            "Parameter '{key}' expects 'on' or 'off', not '{v}'"
        ))),
    }
}

/// Changes the options `o` names (all but `size`).
pub(super) fn amend(img: &Qcow2, o: &AmendOptions) -> Result<()> {
    for k in o.options.keys() {
        if CREATE_ONLY.contains(&k.as_str()) {
            return Err(Error::invalid_argument(format!(
                "Invalid parameter '{k}': this option is only supported for image creation"
            )));
        }
        if !AMENDABLE.contains(&k.as_str()) && !crypt::AMEND_OPTIONS.contains(&k.as_str()) {
            return Err(Error::invalid_argument(format!("Invalid parameter '{k}'")));
        }
    }
    if o.options.contains_key("backing_file") || o.options.contains_key("backing_fmt") {
        return Err(Error::invalid_argument(
            "Cannot amend the backing file; you can use 'imgloop rebase' instead",
        ));
    }
    if o.options.contains_key("data_file_raw") {
        return Err(Error::invalid_argument(
            "data-file-raw cannot be set on existing images",
        ));
    }
    let target_v3 = match o.options.get("compat").map(String::as_str) {
        None => None,
        Some("1.1") | Some("v3") => Some(true),
        Some("0.10") | Some("v2") => Some(false),
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "Unknown compatibility level {v}"
            )))
        }
    };
    let lazy = bool_opt(o, "lazy_refcounts")?;
    let bits = match o.options.get("refcount_bits") {
        None => None,
        Some(v) => match v.parse::<u32>() {
            Ok(b) if b.is_power_of_two() && b <= 64 => Some(b),
            _ => {
                return Err(Error::invalid_argument(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ))
            }
        },
    };
    let _serial = img.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut tables = img.tables_mut();
    let t = &mut *tables;
    img.check_writable(t)?;
    img.flush_held(t)?;
    let v3_now = img.v3();
    let v3 = target_v3.unwrap_or(v3_now);
    let bits_after = bits.unwrap_or(t.header.refcount_bits());
    if !v3 {
        if bits_after != 16 {
            return Err(Error::invalid_argument(
                "compat=0.10 requires refcount_bits=16",
            ));
        }
        if lazy == Some(true) {
            return Err(Error::invalid_argument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
    }
    if o.options.contains_key("data_file") && !img.external_data {
        return Err(Error::invalid_argument(
            "data-file can only be set for images that use an external data file",
        ));
    }
    let keyslots = crypt::AMEND_OPTIONS
        .iter()
        .any(|k| o.options.contains_key(*k));
    if keyslots && img.crypt.is_none() {
        return Err(Error::invalid_argument(
            "Encryption options can only be amended on encrypted images",
        ));
    }
    if v3_now != v3 && !v3 {
        check_downgrade(img, t)?;
    }
    // Upgrades first, downgrades last, as qemu orders them.
    if v3 && !v3_now {
        t.header.version = 3;
        t.header.header_length = 112;
        t.header.set_extension(
            header::ext::FEATURE_TABLE,
            Some(header::default_feature_table()),
        );
        switch(img, t)?;
        img.v3.store(true, Ordering::Release);
    }
    if let Some(b) = bits {
        if b != t.header.refcount_bits() {
            rewrite_refcounts(img, t, b)?;
        }
    }
    if let Some(on) = lazy {
        if on {
            t.header.compatible_features |= compat::LAZY_REFCOUNTS;
        } else {
            t.header.compatible_features &= !compat::LAZY_REFCOUNTS;
            t.header.incompatible_features &= !incompat::DIRTY;
        }
        switch(img, t)?;
    }
    if let Some(name) = o.options.get("data_file") {
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::invalid_argument(
                "the data file name must be 1 to 1023 bytes",
            ));
        }
        t.header
            .set_extension(header::ext::DATA_FILE, Some(name.as_bytes().to_vec()));
        switch(img, t)?;
    }
    if keyslots {
        let c = img.crypt.as_ref().expect("checked above");
        c.amend_keyslots(img.file(), &o.options, &o.secrets, o.force)?;
    }
    if v3_now && !v3 {
        downgrade(img, t)?;
    }
    Ok(())
}

/// Writes the header and syncs.
fn switch(img: &Qcow2, t: &mut Tables) -> Result<()> {
    let r = img.write_header(t).and_then(|_| img.sync_file());
    if r.is_err() {
        // The header in memory may name structures the file does not:
        // no more writes through this handle.
        t.corrupt = true;
    }
    r
}

/// What a version 2 image cannot hold, refused before anything changes.
fn check_downgrade(img: &Qcow2, t: &mut Tables) -> Result<()> {
    let h = &t.header;
    if img.external_data {
        return Err(Error::invalid_argument(
            "Cannot downgrade an image with a data file",
        ));
    }
    let other = h.incompatible_features & !(incompat::DIRTY | incompat::COMPRESSION);
    if other != 0 {
        return Err(Error::invalid_argument(format!(
            "Cannot downgrade an image with incompatible features {other:#x} set"
        )));
    }
    if h.extension(header::ext::BITMAPS).is_some() {
        // qemu-img downgrades and leaks the bitmaps' clusters.
        return Err(Error::invalid_argument(
            "Cannot downgrade an image with persistent bitmaps (remove them first)",
        ));
    }
    let backing = h.backing_file.is_some();
    let zstd = h.compression_type != header::CompressionType::Zlib;
    let encrypted = img.crypt.is_some();
    let mut compressed = false;
    let mut zero_over_backing_in_snapshot = false;
    let mut zero_to_write = false;
    let mut zero_hosts = Vec::new();
    let mut data_hosts = HashSet::new();
    for_each_l2(img, t, &mut |_, active, c| {
        compressed |= matches!(c, Cluster::Compressed { .. });
        if let Cluster::Normal { host, .. } = c {
            data_hosts.insert(host);
        }
        match c {
            Cluster::Zero { host: None, .. } if backing => {
                zero_to_write = true;
                zero_over_backing_in_snapshot |= !active;
            }
            Cluster::Zero { host: Some(h), .. } => {
                zero_to_write = true;
                zero_hosts.push(h);
            }
            _ => {}
        }
        None
    })?;
    if encrypted && zero_to_write {
        // Zeroes written as data would have to be encrypted zeroes.
        return Err(Error::unsupported(
            "Cannot downgrade an encrypted image whose zero clusters would have to be written",
        ));
    }
    if zero_hosts.iter().any(|h| data_hosts.contains(h)) {
        // Zeroing it in place would change what a snapshot reads as data.
        return Err(Error::unsupported(
            "Cannot downgrade: a zero cluster shares its host cluster with a snapshot's data",
        ));
    }
    if zstd && compressed {
        return Err(Error::invalid_argument(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ));
    }
    if zero_over_backing_in_snapshot {
        return Err(Error::unsupported(
            "Cannot downgrade: a snapshot has zero clusters over a backing file",
        ));
    }
    Ok(())
}

/// Calls `f(table, active, cluster)` for every entry of every L2 table the
/// active and snapshot L1 tables name (each table once; `active` when
/// the active table names it); an entry `f` returns replaces the raw
/// entry in the table (in the cache, written by the next flush).
fn for_each_l2(
    img: &Qcow2,
    t: &mut Tables,
    f: &mut dyn FnMut(u64, bool, Cluster) -> Option<u64>,
) -> Result<()> {
    let mut l1s = vec![(t.l1.clone(), true)];
    for s in img.read_snapshots(t)? {
        l1s.push((img.snapshot_l1(&s)?, false));
    }
    let mut seen = HashSet::new();
    for (l1, active) in &l1s {
        for (i, &e) in l1.iter().enumerate() {
            let off = e & entry::L1_OFFSET_MASK;
            if off != 0 && (e & entry::L1_RESERVED != 0 || !off.is_multiple_of(img.cluster_size)) {
                return Err(Error::corrupt(
                    "L1 table",
                    i as u64,
                    "reserved bits set or L2 offset not cluster-aligned",
                ));
            }
        }
        let _ = active;
    }
    for (l1, active) in l1s {
        for e in l1 {
            let off = e & entry::L1_OFFSET_MASK;
            if off == 0 || !seen.insert(off) {
                continue;
            }
            img.load_l2(t, off)?;
            let table: Box<[u8]> = t.l2.peek(off).expect("loaded").into();
            let mut changes = Vec::new();
            for i2 in 0..img.l2_entries as usize {
                let (c, _) = img.decode(&table, off, i2)?;
                if let Some(new) = f(off, active, c) {
                    changes.push((i2, new));
                }
            }
            if !changes.is_empty() {
                let tbl = t.l2.get_mut(off).expect("loaded");
                for (i2, e) in changes {
                    img.l2_set(tbl, i2, e, 0);
                }
            }
            if t.l2.over_capacity() {
                img.flush_held(t)?;
            }
        }
    }
    Ok(())
}

/// compat=0.10: zero clusters become what version 2 can say (unallocated
/// without a backing file; allocated zeroed clusters over one), then the
/// header is written as version 2.
fn downgrade(img: &Qcow2, t: &mut Tables) -> Result<()> {
    let cs = img.cluster_size;
    let backing = t.header.backing_file.is_some();
    // Preallocated zero clusters are zeroed in place first.
    let mut to_zero = Vec::new();
    let mut need_new = Vec::new();
    for_each_l2(img, t, &mut |table, _, c| {
        match c {
            Cluster::Zero { host: Some(h), .. } => to_zero.push(h),
            Cluster::Zero { host: None, .. } if backing => need_new.push(table),
            _ => {}
        }
        None
    })?;
    let zeros = vec![0u8; cs as usize];
    for &h in &to_zero {
        img.file()
            .write_at(&zeros, h)
            .map_err(|e| Error::io("zeroing a preallocated zero cluster", e))?;
    }
    // Zero clusters over a backing file get zeroed clusters of their own.
    let mut fresh = Vec::new();
    for &table in &need_new {
        let c = img.alloc_clusters(t, 1)?;
        img.file()
            .write_at(&zeros, c)
            .map_err(|e| Error::io("writing a zeroed cluster", e))?;
        // One reference per path to it: as many as the table has.
        let paths = img.refcount(t, table / cs)?.max(1);
        if paths > 1 {
            img.set_refcount(t, c / cs, paths)?;
        }
        fresh.push(if paths == 1 { c | entry::COPIED } else { c });
    }
    img.flush_held(t)?;
    img.sync_file()?;
    let mut next = fresh.into_iter();
    for_each_l2(img, t, &mut |_, _, c| match c {
        Cluster::Zero {
            host: Some(h),
            copied,
        } => Some(h | if copied { entry::COPIED } else { 0 }),
        Cluster::Zero { host: None, .. } if backing => next.next(),
        Cluster::Zero { host: None, .. } => Some(0),
        _ => None,
    })?;
    img.flush_held(t)?;
    img.sync_file()?;
    let h = &mut t.header;
    h.version = 2;
    h.header_length = 72;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.compression_type = header::CompressionType::Zlib;
    h.set_extension(header::ext::FEATURE_TABLE, None);
    switch(img, t)?;
    img.v3.store(false, Ordering::Release);
    Ok(())
}

/// The refcount structure rewritten with `bits`-bit entries: new blocks
/// and table past every cluster in use, the header switched to them, the
/// old structure's clusters free in the new one.
fn rewrite_refcounts(img: &Qcow2, t: &mut Tables, bits: u32) -> Result<()> {
    let cs = img.cluster_size;
    let old_bits = t.header.refcount_bits();
    let old_per = img.rc_per_block(t);
    // One past the last cluster with a refcount.
    let mut end = 0u64;
    for b in 0..t.rc_table.len() as u64 {
        let off = t.rc_table[b as usize];
        if off == 0 {
            continue;
        }
        img.load_rc_block(t, off)?;
        let block = t.rc.peek(off).expect("loaded");
        if let Some(i) = (0..old_per)
            .rev()
            .find(|&i| Qcow2::rc_entry(block, i, old_bits) != 0)
        {
            end = end.max(b * old_per + i + 1);
        }
    }
    let new_max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    for c in 0..end {
        let r = img.refcount(t, c)?;
        if r > new_max {
            return Err(Error::invalid_argument(format!(
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {r}",
                c * cs
            )));
        }
    }
    let per = cs * 8 / bits as u64;
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = end + blocks + table;
        let nb = total.div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if nb == blocks && nt == table {
            break;
        }
        blocks = nb;
        table = nt;
    }
    if table * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::invalid_argument(
            "the refcount table at this width would exceed 8 MiB",
        ));
    }
    // The old structure is free in the new one.
    let mut old: HashSet<u64> = t
        .rc_table
        .iter()
        .filter(|&&o| o != 0)
        .map(|&o| o / cs)
        .collect();
    let old_table = t.header.refcount_table_offset / cs;
    old.extend(old_table..old_table + t.header.refcount_table_clusters as u64);
    let new_start = end;
    let new_end = end + blocks + table;
    let mut new_table = vec![0u64; (table * cs / 8) as usize];
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per {
            let c = b * per + i;
            let v = if (new_start..new_end).contains(&c) {
                1
            } else if c < end && !old.contains(&c) {
                img.refcount(t, c)?
            } else {
                0
            };
            if v != 0 {
                Qcow2::set_rc_entry(&mut block, i, bits, v);
            }
        }
        let at = (new_start + b) * cs;
        img.file()
            .write_at(&block, at)
            .map_err(|e| Error::io("writing a refcount block", e).at("refcount block", at))?;
        new_table[b as usize] = at;
    }
    let table_off = (new_start + blocks) * cs;
    let bytes: Vec<u8> = new_table.iter().flat_map(|e| e.to_be_bytes()).collect();
    img.file()
        .write_at(&bytes, table_off)
        .map_err(|e| Error::io("writing the refcount table", e))?;
    img.sync_file()?;
    t.header.refcount_order = bits.trailing_zeros();
    t.header.refcount_table_offset = table_off;
    t.header.refcount_table_clusters = table as u32;
    switch(img, t)?;
    t.rc_table = new_table;
    t.rc_table_dirty.clear();
    t.rc.clear();
    t.free_hint = 0;
    t.compressed_tail = 0;
    // The old structure's clusters are holes now.
    for c in old {
        let _ = img.file().punch_hole(c * cs, cs);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::mem_image;
    use crate::driver::AmendOptions;
    use crate::storage::{CrashStorage, Storage};
    use crate::Image;
    use std::sync::Arc;

    /// Every power-cut state of `amend -o opts` on an image with data,
    /// zero clusters and a snapshot opens, checks clean but for leaks,
    /// and reads as before.
    fn power_cuts_during(opts: &[(&str, &str)]) {
        let (mem, img) = mem_image(1 << 20, &[("cluster_size", "4096")]);
        img.write(&[1u8; 100_000], 3000).unwrap();
        img.snapshot_create("s").unwrap();
        img.write(&[2u8; 8192], 500_000).unwrap();
        img.write_zeroes(600_000, 70_000, false).unwrap();
        img.close().unwrap();
        drop(img);
        let crash = CrashStorage::from_bytes(&mem.to_vec());
        crash.sync().unwrap();
        let img = Image::open_storage(Arc::new(crash.clone()), Some("qcow2"), false, None).unwrap();
        let mut before = vec![0u8; 1 << 20];
        img.read(&mut before, 0).unwrap();
        crash.start_capture();
        let mut o = AmendOptions::default();
        for (k, v) in opts {
            o.options.insert(k.to_string(), v.to_string());
        }
        img.amend(&o).unwrap();
        img.close().unwrap();
        let states = crash.take_captured();
        assert!(states.len() > 3);
        for (i, s) in states.into_iter().enumerate() {
            let cut = Image::open_storage(Arc::new(s), Some("qcow2"), true, None)
                .unwrap_or_else(|e| panic!("{opts:?}: state {i} does not open: {e}"));
            let r = cut.check(None).unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "{opts:?}: state {i}: {:?}",
                r.messages
            );
            let mut got = vec![0u8; 1 << 20];
            cut.read(&mut got, 0).unwrap();
            assert!(got == before, "{opts:?}: state {i} reads differently");
        }
    }

    #[test]
    fn a_power_cut_during_amend_leaves_an_image_that_reads_as_before() {
        power_cuts_during(&[("refcount_bits", "64")]);
        power_cuts_during(&[("refcount_bits", "2")]);
        power_cuts_during(&[("compat", "0.10")]);
        power_cuts_during(&[("lazy_refcounts", "on")]);
    }
}

#[cfg(test)]
mod downgrade_tests {
    use super::super::testutil::mem_image;
    use crate::driver::AmendOptions;

    fn downgrade(img: &crate::Image) -> crate::Result<()> {
        let mut o = AmendOptions::default();
        o.options.insert("compat".into(), "0.10".into());
        img.amend(&o)
    }

    #[test]
    fn a_zero_cluster_shared_with_a_snapshot_is_not_zeroed_in_place() {
        let (_mem, img) = mem_image(1 << 20, &[]);
        img.write(&[1u8; 65536], 0).unwrap();
        img.snapshot_create("s").unwrap();
        // A zero write keeping the (shared) host cluster, as qemu leaves it.
        img.write_zeroes(0, 65536, false).unwrap();
        let st = img.block_status(0, 65536).unwrap();
        if st.offset.is_some() {
            let e = downgrade(&img).unwrap_err();
            assert!(e.to_string().contains("shares its host cluster"), "{e}");
        } else {
            // imgloop moved the zero cluster off the shared one: nothing
            // to refuse, and the snapshot keeps its data.
            downgrade(&img).unwrap();
        }
        let mut o = crate::driver::DriverOpenOptions::new(true);
        o.options.insert("snapshot".into(), "s".into());
        img.flush().unwrap();
        let v = crate::Image::open_storage_with(
            std::sync::Arc::new(_mem.clone()),
            Some("qcow2"),
            &o,
            None,
        )
        .unwrap();
        let mut b = vec![0u8; 65536];
        v.read(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 1), "the snapshot lost its data");
    }
}
