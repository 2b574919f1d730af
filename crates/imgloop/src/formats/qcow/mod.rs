//! qcow version 1 (`qcow`), the ancestor of qcow2: a two-level table (L1
//! in memory, L2 tables in a write-back cache) from guest clusters to host
//! clusters, optional zlib-compressed clusters, optional legacy AES
//! encryption, a backing file of any format. No refcounts: space is only
//! ever appended, as QEMU does.
//!
//! - [`header`]: the wire header and its validation.
//! - [`crypt`]: AES-128-CBC per sector.
//! - `tables`: lookups, the read side, and the flush.
//! - `write`: allocation, copy-on-write, encrypted and compressed writes,
//!   write-zeroes and discard.
//!
//! Crash ordering: new clusters and L2 tables are appended; an L2 entry is
//! set in the cache after the data is written, a new L1 entry in memory
//! when its (zeroed) L2 table is reserved. The flush syncs the data, writes
//! the dirty L2 tables, syncs, then writes the dirty L1 entries, so every
//! table on disk points only at durable data.

pub mod crypt;
pub mod header;
mod tables;
#[cfg(test)]
mod tests;
mod write;

use crate::driver::{
    BackingRef, BlockStatus, Commit, CreateOptions, DiscardMapping, Driver, DriverInfo,
    DriverOpenOptions, Format, Mapping, OptionSpec, WriteMapping, ZeroFlags, ZeroMapping,
};
use crate::error::{Error, ErrorKind, Result};
use crate::inflight::UnitLocks;
use crate::state::{Mode, OpenState};
use crate::storage::Storage;
use crypt::SectorCipher;
use header::{CryptMethod, QcowHeader, HEADER_LEN};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use tables::Tables;

/// The qcow format (`-f qcow`).
pub struct QcowFormat;

/// L2 tables kept cached while clean.
const CACHE_TABLES: usize = 512;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "size",
        kind: "size",
        help: "Virtual disk size",
    },
    OptionSpec {
        name: "backing_file",
        kind: "string",
        help: "File name of a base image",
    },
    OptionSpec {
        name: "backing_fmt",
        kind: "string",
        help: "Format of the backing image (not stored: qcow has no field for it)",
    },
    OptionSpec {
        name: "encrypt.format",
        kind: "string",
        help: "Encrypt the image, format choices: 'aes'",
    },
    OptionSpec {
        name: "encrypt.key-secret",
        kind: "string",
        help: "ID of the secret that provides the AES encryption key",
    },
    OptionSpec {
        name: "encryption",
        kind: "bool",
        help: "Encrypt the image with format 'aes' (deprecated: use encrypt.format=aes)",
    },
    OptionSpec {
        name: "cluster_size",
        kind: "size",
        help: "qcow cluster size, 512 to 65536 (an imgloop extension; qemu-img picks 4096, or 512 over a backing file)",
    },
];

/// The open option naming the secret with the AES password.
pub const KEY_SECRET: &str = "encrypt.key-secret";

impl Format for QcowFormat {
    fn name(&self) -> &'static str {
        "qcow"
    }

    fn probe(&self, head: &[u8], _filename: &Path) -> u32 {
        if QcowHeader::probe(head) {
            100
        } else {
            0
        }
    }

    fn open(&self, storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Box<dyn Driver>> {
        Ok(Box::new(Qcow::open(storage, opts)?))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn create(
        &self,
        storage: Arc<dyn Storage>,
        _path: Option<&Path>,
        opts: &CreateOptions,
    ) -> Result<()> {
        opts.check_known(self)?;
        let encrypt = match (
            opts.options.get("encrypt.format").map(String::as_str),
            opts.get_bool("encryption")?,
        ) {
            (Some("aes"), _) | (None, true) => true,
            (None, _) => false,
            (Some(f), _) => {
                return Err(Error::invalid_argument(format!(
                    "Invalid value '{f}' for encrypt.format: qcow supports 'aes'"
                )))
            }
        };
        if encrypt {
            // qemu-img needs the key at creation, although nothing derived
            // from it is stored.
            let id = opts.options.get(KEY_SECRET).ok_or_else(|| {
                Error::invalid_argument("Parameter 'encrypt.key-secret' is required for cipher")
            })?;
            SectorCipher::from_password(opts.secrets.get(id)?, id)?;
        }
        let name = opts.backing_file.as_deref().unwrap_or("");
        if name.len() > header::MAX_BACKING_NAME as usize {
            return Err(Error::invalid_argument(format!(
                "backing file name longer than {} bytes",
                header::MAX_BACKING_NAME
            )));
        }
        let (cluster_bits, l2_bits) = match opts.get_size("cluster_size")? {
            Some(cs) if cs.is_power_of_two() && (512..=65536).contains(&cs) => {
                (cs.trailing_zeros() as u8, 9)
            }
            Some(cs) => {
                return Err(Error::invalid_argument(format!(
                    "Cluster size must be a power of two between 512 and 64k, not {cs}"
                )))
            }
            // QEMU's choices: 512-byte clusters over a backing file (so a
            // sector write copies nothing), 32 KiB L2 tables; 4 KiB
            // clusters and tables otherwise.
            None if !name.is_empty() => (9, 12),
            None => (12, 9),
        };
        let crypt = if encrypt {
            CryptMethod::Aes
        } else {
            CryptMethod::None
        };
        let wire = QcowHeader::new_wire(opts.size, cluster_bits, l2_bits, crypt, name.len() as u32);
        let shift = cluster_bits as u32 + l2_bits as u32;
        let l1_bytes = opts.size.div_ceil(1 << shift) * 8;
        if l1_bytes > header::MAX_L1_BYTES {
            return Err(Error::invalid_argument(format!(
                "Image too large: its L1 table would take {l1_bytes} bytes"
            )));
        }
        let io = |what: &'static str| move |e| Error::io(what, e);
        let mut head = wire.to_bytes().to_vec();
        head.extend_from_slice(name.as_bytes());
        storage
            .write_at(&head, 0)
            .map_err(io("writing the qcow header"))?;
        let end = (wire.l1_table_offset + l1_bytes).next_multiple_of(512);
        storage
            .set_len(end)
            .map_err(io("writing the qcow L1 table"))
    }
}

/// An open qcow image.
pub struct Qcow {
    storages: [Arc<dyn Storage>; 1],
    header: QcowHeader,
    state: Arc<OpenState>,
    tables: RwLock<Tables>,
    /// Where the next cluster or table goes (the file only grows).
    next_free: Mutex<u64>,
    /// Claims on guest clusters being allocated.
    units: Arc<UnitLocks>,
    flush_lock: Mutex<()>,
    /// The AES cipher of an encrypted image opened with its key.
    cipher: Option<SectorCipher>,
}

impl Qcow {
    /// Opens a qcow image. An encrypted one needs `encrypt.key-secret`
    /// naming a secret of `opts.secrets`.
    pub fn open(storage: Arc<dyn Storage>, opts: &DriverOpenOptions) -> Result<Qcow> {
        for key in opts.options.keys() {
            let known = [
                KEY_SECRET,
                "l2-cache-size",
                crate::formats::qcow2::OPEN_FOR_CHECK,
                crate::formats::qcow2::OPEN_METADATA_ONLY,
            ];
            if !known.contains(&key.as_str()) {
                return Err(Error::invalid_argument(format!(
                    "Unknown open option '{key}' for format 'qcow'"
                )));
            }
        }
        let header = QcowHeader::read(&*storage)?;
        let cipher = match (header.crypt, opts.options.get(KEY_SECRET)) {
            (CryptMethod::Aes, Some(id)) => {
                Some(SectorCipher::from_password(opts.secrets.get(id)?, id)?)
            }
            (CryptMethod::Aes, None) => None,
            (CryptMethod::None, Some(_)) => {
                return Err(Error::invalid_argument(
                    "encrypt.key-secret given for an image that is not encrypted",
                ))
            }
            (CryptMethod::None, None) => None,
        };
        let l1 = crate::formats::header_table::read_header_table(
            &*storage,
            header.l1_table_offset,
            header.l1_size,
            "qcow L1 table",
        )?;
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the image size", e))?;
        let next = file_len.next_multiple_of(header.cluster_size());
        let capacity = match opts.options.get("l2-cache-size") {
            Some(v) => {
                let bytes = crate::size::parse_size(v)?;
                ((bytes / (8 << header.l2_bits)) as usize).max(2)
            }
            None => CACHE_TABLES,
        };
        Ok(Qcow {
            storages: [storage],
            state: opts.state.clone(),
            tables: RwLock::new(Tables::new(l1, capacity)),
            next_free: Mutex::new(next),
            units: UnitLocks::new(),
            flush_lock: Mutex::new(()),
            cipher,
            header,
        })
    }

    fn file(&self) -> &dyn Storage {
        &*self.storages[0]
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// True for an encrypted image (whether or not its key was given).
    fn encrypted(&self) -> bool {
        self.header.crypt == CryptMethod::Aes
    }

    /// The cipher, or qemu's error when the key was not given.
    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                "Parameter 'encrypt.key-secret' is required for cipher",
            )
        })
    }

    /// End of the header, backing name and L1 table: no cluster may be
    /// written in place there.
    fn metadata_end(&self) -> u64 {
        (self.header.l1_table_offset + self.header.l1_size * 8).max(HEADER_LEN)
    }

    fn check_writable(&self) -> Result<()> {
        if self.state.mode() == Mode::ReadOnly {
            return Err(Error::read_only("write"));
        }
        Ok(())
    }
}

impl Driver for Qcow {
    fn format_name(&self) -> &'static str {
        "qcow"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn request_alignment(&self) -> u32 {
        // Encryption works on whole sectors; the generic layer does the
        // read-modify-write of partial ones.
        if self.encrypted() {
            crypt::SECTOR as u32
        } else {
            1
        }
    }

    fn storages(&self) -> &[Arc<dyn Storage>] {
        &self.storages
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.map_run(offset, max_len)
    }

    fn read_transformed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_transformed_range(buf, offset)
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let (m, len) = self.map_run(offset, max_len)?;
        Ok(BlockStatus::of_mapping(m, len, None))
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<WriteMapping> {
        self.check_writable()?;
        self.map_write_range(offset, len)
    }

    fn commit(&self, commit: Commit) -> Result<()> {
        self.publish(commit)
    }

    fn write_transformed(&self, ctx: &crate::driver::IoCtx, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.write_encrypted(ctx, buf, offset)
    }

    fn compression_unit(&self) -> Option<u64> {
        // Compressed clusters are stored in plain text even in encrypted
        // images (QEMU's layout), so encrypted images get none.
        (!self.encrypted()).then(|| self.cluster_size())
    }

    fn compress(&self, unit: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(write::compress_cluster(unit, self.cluster_size()))
    }

    fn write_compressed(&self, packed: &[u8], offset: u64) -> Result<bool> {
        self.check_writable()?;
        self.store_compressed(packed, offset)
    }

    fn map_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<ZeroMapping> {
        self.check_writable()?;
        self.map_zero_range(offset, len)
    }

    fn map_discard(&self, offset: u64, len: u64) -> Result<DiscardMapping> {
        self.check_writable()?;
        self.map_discard_range(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_tables()
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(self.cluster_size()),
            encrypted: self.encrypted(),
            ..DriverInfo::default()
        }
    }

    fn backing(&self) -> Option<BackingRef> {
        self.header.backing_file.as_ref().map(|name| BackingRef {
            filename: name.clone(),
            // qcow stores no backing format: it is probed.
            format: None,
        })
    }

    fn close(&self) -> Result<()> {
        self.flush_tables()
    }
}
