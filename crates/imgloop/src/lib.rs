//! imgloop: virtual-disk image formats behind one driver API.
//!
//! - [`Storage`](storage::Storage): positional byte storage (a file, memory).
//! - [`Format`](driver::Format) and [`Driver`](driver::Driver): what each
//!   image format implements.
//! - [`Image`]: the generic block layer every user goes through.
//! - [`registry`]: format lookup by name and probing.
//!
//! ```
//! use imgloop::{Image, storage::MemStorage};
//! use std::sync::Arc;
//!
//! let mem = MemStorage::new();
//! let opts = imgloop::CreateOptions { size: 1 << 20, ..Default::default() };
//! imgloop::registry::find("raw")?.create(Arc::new(mem.clone()), None, &opts)?;
//! let img = Image::open_storage(Arc::new(mem), Some("raw"), false, None)?;
//! img.write(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! img.read(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), imgloop::Error>(())
//! ```

pub mod crypto;
pub mod dirty_bitmap;
pub mod driver;
pub mod error;
pub mod formats;
pub mod image;
pub mod inflight;
pub mod lock;
pub mod map;
pub mod policy;
pub mod registry;
pub mod secret;
pub mod size;
pub mod state;
pub mod storage;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use dirty_bitmap::DirtyBitmap;
pub use driver::{
    BlockStatus, CheckReport, CreateOptions, Driver, Format, Mapping, Preallocation, RepairMode,
    SnapshotSelector, StorageId, WriteFlags, ZeroFlags,
};
pub use error::{Condition, Error, ErrorKind, Result};
pub use image::{create, Image, ImageInfo, OpenOptions};
pub use map::MapEntry;
pub use policy::FilePolicy;
pub use secret::{Secret, Secrets};
