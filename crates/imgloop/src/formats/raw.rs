//! The raw format: the virtual disk is the file, byte for byte.

use crate::driver::{
    BlockStatus, CreateOptions, DiscardAction, DiscardMapping, Driver, DriverInfo,
    DriverOpenOptions, Format, Mapping, OptionSpec, Preallocation, StorageId, WriteMapping,
    ZeroAction, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The raw format (`-f raw`).
pub struct RawFormat;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "size",
        kind: "size",
        help: "Virtual disk size",
    },
    OptionSpec {
        name: "preallocation",
        kind: "string",
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
];

impl Format for RawFormat {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _header: &[u8], _filename: &Path) -> u32 {
        // Anything can be raw; every real format outscores this.
        1
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        _opts: &DriverOpenOptions,
    ) -> Result<Box<dyn Driver>> {
        let size = storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        Ok(Box::new(RawDriver {
            storages: [storage],
            size: AtomicU64::new(size),
        }))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn measure(
        &self,
        opts: &CreateOptions,
        source: Option<&crate::Image>,
    ) -> Result<crate::driver::Measure> {
        opts.check_known(self)?;
        // A raw file is as large as the disk, whatever it holds.
        let size = match source {
            Some(s) => s.size(),
            None => opts.size.div_ceil(512) * 512,
        };
        Ok(crate::driver::Measure {
            bitmaps: None,
            required: size,
            fully_allocated: size,
        })
    }

    fn create(
        &self,
        storage: Arc<dyn Storage>,
        _path: Option<&Path>,
        opts: &CreateOptions,
    ) -> Result<()> {
        opts.check_known(self)?;
        if opts.backing_file.is_some() {
            return Err(Error::unsupported(
                "the raw format does not support backing files",
            ));
        }
        let prealloc: Preallocation = opts.get("preallocation")?.unwrap_or_default();
        grow(&*storage, 0, opts.size, prealloc)
    }
}

/// Extends `storage` from `old` to `new` bytes with the given preallocation.
fn grow(storage: &dyn Storage, old: u64, new: u64, prealloc: Preallocation) -> Result<()> {
    let io = |what: &'static str| move |e| Error::io(what, e);
    match prealloc {
        Preallocation::Off => storage.set_len(new).map_err(io("setting file size")),
        Preallocation::Metadata => Err(Error::invalid_argument(
            "preallocation mode 'metadata' is not supported by the raw format",
        )),
        Preallocation::Falloc => {
            storage.set_len(new).map_err(io("setting file size"))?;
            storage
                .allocate(old, new - old)
                .map_err(io("preallocating space"))
        }
        Preallocation::Full => {
            storage.set_len(new).map_err(io("setting file size"))?;
            storage
                .zero_range(old, new - old, false)
                .map_err(io("writing zeroes"))
        }
    }
}

/// An open raw image.
#[derive(Debug)]
pub struct RawDriver {
    /// The image file, the only storage.
    storages: [Arc<dyn Storage>; 1],
    size: AtomicU64,
}

impl RawDriver {
    fn storage(&self) -> &dyn Storage {
        &*self.storages[0]
    }
}

impl Driver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn storages(&self) -> &[Arc<dyn Storage>] {
        &self.storages
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        Ok((
            Mapping::Data {
                storage: StorageId::IMAGE,
                offset,
            },
            max_len,
        ))
    }

    fn fixed_data_layout(&self) -> bool {
        // Guest offset N is host offset N, always.
        true
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (data, len) = self
            .storage()
            .extent(offset, max_len)
            .map_err(|e| Error::io("querying allocation", e))?;
        let mut s = BlockStatus::of_mapping(
            Mapping::Data {
                storage: StorageId::IMAGE,
                offset,
            },
            len,
            None,
        );
        s.data = data;
        s.zero = !data;
        Ok(s)
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        Ok(WriteMapping::InPlace {
            storage: StorageId::IMAGE,
            offset,
            len,
        })
    }

    fn map_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<ZeroMapping> {
        Ok(ZeroMapping {
            len,
            action: ZeroAction::Host {
                storage: StorageId::IMAGE,
                offset,
            },
            commit: None,
        })
    }

    fn map_discard(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        Ok(DiscardMapping {
            len,
            action: DiscardAction::PunchHole {
                storage: StorageId::IMAGE,
                offset,
            },
            commit: None,
        })
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        let old = self.virtual_size();
        if new_size > old {
            grow(self.storage(), old, new_size, prealloc)?;
        } else {
            self.storage()
                .set_len(new_size)
                .map_err(|e| Error::io("truncating", e))?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn open(mem: &MemStorage) -> Box<dyn Driver> {
        RawFormat
            .open(Arc::new(mem.clone()), &DriverOpenOptions::default())
            .unwrap()
    }

    #[test]
    fn create_makes_a_sparse_file_of_the_given_size() {
        let mem = MemStorage::new();
        let opts = CreateOptions {
            size: 1 << 30,
            ..Default::default()
        };
        RawFormat
            .create(Arc::new(mem.clone()), None, &opts)
            .unwrap();
        assert_eq!(mem.len().unwrap(), 1 << 30);
        assert_eq!(mem.allocated_pages(), 0);
    }

    #[test]
    fn full_preallocation_allocates_every_page() {
        let mem = MemStorage::new();
        let mut opts = CreateOptions {
            size: 64 << 10,
            ..Default::default()
        };
        opts.options.insert("preallocation".into(), "full".into());
        RawFormat
            .create(Arc::new(mem.clone()), None, &opts)
            .unwrap();
        assert_eq!(mem.allocated_pages(), 16);
    }

    #[test]
    fn unknown_create_options_and_backing_files_are_refused() {
        let mem = MemStorage::new();
        let mut opts = CreateOptions {
            size: 4096,
            ..Default::default()
        };
        opts.options.insert("cluster_size".into(), "65536".into());
        assert!(RawFormat
            .create(Arc::new(mem.clone()), None, &opts)
            .is_err());
        let opts = CreateOptions {
            size: 4096,
            backing_file: Some("b".into()),
            ..Default::default()
        };
        assert!(RawFormat
            .create(Arc::new(mem.clone()), None, &opts)
            .is_err());
    }

    #[test]
    fn block_status_reports_holes_as_zero_and_written_pages_as_data() {
        let mem = MemStorage::new();
        mem.set_len(1 << 20).unwrap();
        mem.write_at(&[1u8; 4096], 65536).unwrap();
        let d = open(&mem);
        let s = d.block_status(0, 1 << 20).unwrap();
        assert_eq!((s.data, s.zero, s.len), (false, true, 65536));
        let s = d.block_status(65536, 1 << 20).unwrap();
        assert_eq!(
            (s.data, s.zero, s.len, s.offset),
            (true, false, 4096, Some(65536))
        );
    }

    #[test]
    fn discard_punches_a_hole() {
        let mem = MemStorage::from_bytes(&[1u8; 65536]);
        let img =
            crate::Image::open_storage(Arc::new(mem.clone()), Some("raw"), false, None).unwrap();
        img.discard(0, 32768).unwrap();
        assert_eq!(mem.allocated_pages(), 8);
        assert!(!img.block_status(0, 65536).unwrap().data);
    }

    #[test]
    fn resize_grows_and_shrinks_the_file() {
        let mem = MemStorage::from_bytes(&[1u8; 8192]);
        let d = open(&mem);
        d.resize(1 << 20, Preallocation::Off).unwrap();
        assert_eq!((d.virtual_size(), mem.len().unwrap()), (1 << 20, 1 << 20));
        d.resize(4096, Preallocation::Off).unwrap();
        assert_eq!(mem.to_vec(), vec![1u8; 4096]);
    }
}
