//! The differences from qemu-img kept on purpose (each is a row of the
//! tables, and in docs/QEMU-IMG.md), and the fixture list.

pub const EXTRA_INFO: &str = "imgloop adds a format-specific section (and, for parallels, the \
     cluster size and dirty flag) where qemu's driver reports none; qemu-img's keys and \
     values are all there";
pub const RAW_SIZE: &str = "qemu-img rounds a raw file's size up to whole sectors; imgloop \
     keeps the exact file length, so a copy has the same bytes as the file";
pub const CHECK_NO_KEY: &str = "qemu-img refuses to check an encrypted image without its key; \
     imgloop's check reads only metadata and needs none";
pub const MEASURE_NO_SECRET: &str = "qemu-img wants the secret to measure a LUKS target; the \
     sizes do not depend on the key, so imgloop measures without it";
pub const AMEND_BITMAPS: &str = "qemu-img downgrades to compat=0.10 and leaks the persistent \
     bitmaps' clusters; imgloop refuses until the bitmaps are removed";
pub const QCOW_COMPRESSED: &str = "qemu-img 10's `convert -c -O qcow` exits 1 without a \
     message; imgloop writes the compressed qcow image, which qemu-img reads back identically";
pub const DD_SKIP: &str = "qemu-img dd prints the error of a skip past the end but exits 0; \
     imgloop exits 1";
pub const VHDX_MAP: &str = "qemu's vhdx driver has no block status and reports every byte as \
     data without an offset; imgloop reports the block allocation table, offsets included";

pub const ALL: &[&str] = &[
    "disk.raw",
    "disk.qcow2",
    "ext.qcow2",
    "v2.qcow2",
    "disk.vhdx",
    "disk.parallels",
    "disk.qcow",
    "comp.qcow2",
    "base.qcow2",
    "top.qcow2",
    "bitmaps.qcow2",
    "inuse.qcow2",
    "leak.qcow2",
    "junk.bin",
    "odd.raw",
    "luks.qcow2",
    "snap.qcow2",
];
