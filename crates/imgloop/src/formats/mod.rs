//! The image format drivers, one module per format.

pub mod raw;
