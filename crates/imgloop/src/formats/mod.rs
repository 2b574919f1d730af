//! The image format drivers, one module per format.

pub mod qcow2;
pub mod raw;
