//! What `info` shows of a qcow2 image.

use super::{bitmap, header, snapshot, Qcow2};
use crate::driver::DriverInfo;
use header::Header;

impl Qcow2 {
    /// Format details for `info`.
    pub(super) fn driver_info(&self) -> DriverInfo {
        let tables = self.tables();
        let h = &tables.header;
        let mut data = serde_json::Map::new();
        let compat = if h.version >= 3 { "1.1" } else { "0.10" };
        data.insert("compat".into(), compat.into());
        let mut lines = vec![("compat".to_string(), compat.to_string())];
        if h.version >= 3 {
            data.insert("compression-type".into(), h.compression_type.name().into());
            lines.push(("compression type".into(), h.compression_type.name().into()));
            let lazy = h.compatible_features & header::compat::LAZY_REFCOUNTS != 0;
            data.insert("lazy-refcounts".into(), lazy.into());
            lines.push(("lazy refcounts".into(), lazy.to_string()));
        } else {
            data.insert("compression-type".into(), h.compression_type.name().into());
            lines.push(("compression type".into(), h.compression_type.name().into()));
        }
        if let Some(list) = self.consistent_bitmaps(h) {
            let mut human = Vec::new();
            let json: Vec<serde_json::Value> = list
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & bitmap::FLAG_IN_USE != 0 {
                        flags.push("in-use");
                    }
                    if b.flags & bitmap::FLAG_AUTO != 0 {
                        flags.push("auto");
                    }
                    let granularity = 1u64 << b.granularity_bits.min(63);
                    human.push(format!(
                        "{} (granularity {granularity}{}{})",
                        b.name,
                        if flags.is_empty() { "" } else { ", " },
                        flags.join(", ")
                    ));
                    serde_json::json!({
                        "flags": flags,
                        "name": b.name,
                        "granularity": granularity,
                    })
                })
                .collect();
            data.insert("bitmaps".into(), json.into());
            lines.push(("bitmaps".into(), human.join("; ")));
        }
        data.insert("refcount-bits".into(), h.refcount_bits().into());
        lines.push(("refcount bits".into(), h.refcount_bits().to_string()));
        let corrupt = h.incompatible_features & header::incompat::CORRUPT != 0;
        if h.version >= 3 {
            data.insert("corrupt".into(), corrupt.into());
            lines.push(("corrupt".into(), corrupt.to_string()));
            data.insert("extended-l2".into(), h.extended_l2().into());
            lines.push(("extended l2".into(), h.extended_l2().to_string()));
        }
        if let Some(df) = &self.data_file_name {
            data.insert("data-file".into(), df.clone().into());
            data.insert("data-file-raw".into(), h.data_file_raw().into());
            lines.push(("data file".into(), df.clone()));
            lines.push(("data file raw".into(), h.data_file_raw().to_string()));
        }
        DriverInfo {
            cluster_size: Some(self.cluster_size),
            dirty: h.incompatible_features & header::incompat::DIRTY != 0,
            format_specific: Some(serde_json::json!({"type": "qcow2", "data": data})),
            human_lines: lines,
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
