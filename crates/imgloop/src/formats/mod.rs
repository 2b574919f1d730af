//! The image format drivers, one module per format, and what several
//! formats share.

pub mod cow;
pub mod deflate;
pub mod header_table;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod raw;
pub mod table_cache;
pub mod vhdx;
