//! What `info` shows of a qcow2 image.

use super::{bitmap, header, snapshot, Qcow2};
use crate::driver::{BitmapSpecific, DriverInfo, FormatSpecific, Qcow2Specific};
use header::Header;

impl Qcow2 {
    /// Format details for `info`.
    pub(super) fn driver_info(&self) -> DriverInfo {
        let tables = self.tables();
        let h = &tables.header;
        let v3 = h.version >= 3;
        let bitmaps = self.consistent_bitmaps(h).map(|list| {
            list.iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & bitmap::FLAG_IN_USE != 0 {
                        flags.push("in-use".to_string());
                    }
                    if b.flags & bitmap::FLAG_AUTO != 0 {
                        flags.push("auto".to_string());
                    }
                    BitmapSpecific {
                        flags,
                        name: b.name.clone(),
                        granularity: 1u64 << b.granularity_bits.min(63),
                    }
                })
                .collect()
        });
        let facts = Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" }.to_string(),
            compression_type: h.compression_type.name().to_string(),
            lazy_refcounts: v3
                .then_some(h.compatible_features & header::compat::LAZY_REFCOUNTS != 0),
            bitmaps,
            refcount_bits: h.refcount_bits(),
            encrypt: self.crypt.as_ref().map(|c| c.specific()),
            data_file: self.data_file_name.clone(),
            data_file_raw: self.data_file_name.as_ref().map(|_| h.data_file_raw()),
            corrupt: v3.then_some(h.incompatible_features & header::incompat::CORRUPT != 0),
            extended_l2: v3.then_some(h.extended_l2()),
        };
        DriverInfo {
            cluster_size: Some(self.cluster_size),
            dirty: h.incompatible_features & header::incompat::DIRTY != 0,
            encrypted: h.crypt_method != 0,
            format_specific: Some(FormatSpecific::Qcow2(facts)),
            snapshots: self.snapshot_infos(h),
        }
    }

    pub(super) fn consistent_bitmaps(&self, h: &Header) -> Option<Vec<bitmap::Bitmap>> {
        if h.autoclear_features & header::autoclear::BITMAPS == 0 {
            return None;
        }
        let ext = h.extension(header::ext::BITMAPS)?;
        bitmap::read_directory(self.file(), ext).ok()
    }
    pub(super) fn snapshot_infos(&self, h: &Header) -> Vec<crate::driver::SnapshotInfo> {
        if h.nb_snapshots == 0 {
            return Vec::new();
        }
        let Ok(t) = snapshot::read_table(self.file(), h.snapshots_offset, h.nb_snapshots) else {
            return Vec::new();
        };
        t.entries
            .into_iter()
            .map(|s| crate::driver::SnapshotInfo {
                id: s.id,
                name: s.name,
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec as u64,
                date_nsec: s.date_nsec as u64,
                vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
                vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
                icount: s.icount,
            })
            .collect()
    }
}
