//! Compressed clusters: raw deflate (4 KiB window, as QEMU) and zstd.

use super::entry::{self, Cluster};
use super::header::CompressionType;
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};

/// Why a compressed stream could not be decompressed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// The deflate stream is damaged.
    #[error("deflate stream is invalid: {0}")]
    Deflate(#[from] flate2::DecompressError),
    /// The zstd stream is damaged.
    #[error("zstd stream is invalid: {0}")]
    Zstd(std::io::Error),
    /// The stream ends before a whole cluster was produced.
    #[error("the stream gives {got} bytes, expected {want}")]
    Short {
        /// Bytes produced.
        got: usize,
        /// The cluster size.
        want: usize,
    },
}

/// Decompresses one cluster of `cs` bytes from `input` (which may carry
/// trailing bytes past the end of the stream).
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    cs: usize,
) -> std::result::Result<Vec<u8>, DecompressError> {
    let mut out = vec![0u8; cs];
    let got = match kind {
        CompressionType::Zlib => crate::formats::deflate::inflate_raw(input, &mut out)?,
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(DecompressError::Zstd)?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut out[..]);
            loop {
                let before = (inb.pos(), outb.pos());
                let hint = d.run(&mut inb, &mut outb).map_err(DecompressError::Zstd)?;
                if hint == 0 || outb.pos() == cs || (inb.pos(), outb.pos()) == before {
                    break;
                }
            }
            outb.pos()
        }
    };
    if got != cs {
        return Err(DecompressError::Short { got, want: cs });
    }
    Ok(out)
}

/// Compresses one cluster; `None` unless the result is smaller than the
/// cluster (as QEMU decides: compressed streams are packed byte by byte,
/// so any saving counts, and 512-byte clusters can be compressed too).
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let limit = input.len().saturating_sub(1);
    let out = match kind {
        CompressionType::Zlib => crate::formats::deflate::deflate_raw(input, limit)?,
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() <= limit).then_some(out)
}

/// Reads guest data of a compressed cluster.
pub(super) fn read_compressed(q: &Qcow2, buf: &mut [u8], offset: u64) -> Result<()> {
    let cs = q.cluster_size;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let in_cluster = (pos & (cs - 1)) as usize;
        let n = (cs as usize - in_cluster).min(buf.len() - done);
        let (c, _) = q.walk(|tables, fetched| q.lookup_cached(tables, pos, fetched))?;
        let Cluster::Compressed { host, len } = c else {
            return Err(Error::corrupt("L2 table", 0, "cluster is not compressed"));
        };
        let part = &mut buf[done..done + n];
        {
            let cache = q.decompressed.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((h, data)) = cache.as_ref() {
                if *h == host {
                    part.copy_from_slice(&data[in_cluster..in_cluster + n]);
                    done += n;
                    continue;
                }
            }
        }
        let file_len = q
            .file()
            .len()
            .map_err(|e| Error::io("reading image size", e))?;
        if host >= file_len {
            return Err(Error::corrupt(
                "compressed cluster",
                host,
                "compressed data lies past the end of the file",
            ));
        }
        let avail = len.min(file_len - host).min(2 * cs) as usize;
        let mut input = vec![0u8; avail];
        q.file()
            .read_at(&mut input, host)
            .map_err(|e| Error::io("reading compressed data", e))?;
        let data = decompress(q.compression, &input, cs as usize).map_err(|why| {
            Error::from_source(ErrorKind::Corrupt, why).at("compressed cluster", host)
        })?;
        part.copy_from_slice(&data[in_cluster..in_cluster + n]);
        *q.decompressed.lock().unwrap_or_else(|e| e.into_inner()) = Some((host, data.into()));
        done += n;
    }
    Ok(())
}

/// Compresses one guest cluster (the last cluster of an odd-sized disk
/// is padded with zeroes); `None` when it does not shrink.
pub(super) fn compress_unit(q: &Qcow2, unit: &[u8]) -> Result<Option<Vec<u8>>> {
    if q.external_data {
        return Err(Error::unsupported(
            "compression is not supported with an external data file",
        ));
    }
    let cs = q.cluster_size as usize;
    if unit.len() == cs {
        return Ok(compress(q.compression, unit));
    }
    let mut padded = vec![0u8; cs];
    padded[..unit.len()].copy_from_slice(unit);
    Ok(compress(q.compression, &padded))
}

/// Stores one cluster's compressed stream `packed`; false (nothing
/// stored) when the cluster already has storage.
pub(super) fn write_compressed(q: &Qcow2, packed: &[u8], offset: u64) -> Result<bool> {
    if q.external_data {
        return Err(Error::unsupported(
            "compression is not supported with an external data file",
        ));
    }
    if packed.is_empty() || packed.len() as u64 >= q.cluster_size {
        return Err(Error::invalid_argument(
            "a compressed stream must be shorter than a cluster, and not empty",
        ));
    }
    let _claim = q.units.lock(offset >> q.cluster_bits);
    let host = {
        let mut tables = q.tables_mut();
        if tables.corrupt || q.read_only() {
            return Err(Error::read_only("compressed write"));
        }
        let (c, _) = q.lookup(&mut tables, offset)?;
        if !matches!(c, Cluster::Unallocated | Cluster::Zero { host: None, .. }) {
            return Ok(false);
        }
        q.l2_for_write(&mut tables, offset)?;
        let len = packed.len() as u64;
        let host = q.alloc_bytes(&mut tables, len)?;
        // A descriptor holds the offset in 70 - cluster_bits bits: a
        // stream placed beyond that (an image of hundreds of TiB) is
        // stored plainly instead.
        let limit = 1u64 << entry::compressed_offset_bits(q.cluster_bits);
        if host + len > limit {
            let cs = q.cluster_size;
            for c in host / cs..=(host + len - 1) / cs {
                let r = q.refcount(&mut tables, c)?;
                q.set_refcount(&mut tables, c, r.saturating_sub(1))?;
            }
            tables.compressed_tail = 0;
            return Ok(false);
        }
        host
    };
    // Data first, without the lock; the L2 entry only after it is written.
    q.file()
        .write_at(packed, host)
        .map_err(|e| Error::io("writing compressed data", e))?;
    {
        let mut tables = q.tables_mut();
        *q.decompressed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let e = entry::encode_compressed(host, packed.len() as u64, q.cluster_bits);
        q.set_l2(&mut tables, offset, e, 0)?;
    }
    q.flush_if_over_capacity()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_round_trip_and_tolerate_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 97) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut packed = compress(kind, &data).expect("compressible");
            assert!(packed.len() < 65536 - 512);
            packed.extend_from_slice(&[0xee; 300]);
            assert_eq!(decompress(kind, &packed, 65536).unwrap(), data);
        }
    }

    #[test]
    fn a_512_byte_cluster_is_compressed_when_it_shrinks() {
        let data: Vec<u8> = (0..512u32).map(|i| (i / 64) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = compress(kind, &data).expect("compressible");
            assert!(packed.len() < 512);
            assert_eq!(decompress(kind, &packed, 512).unwrap(), data);
        }
    }

    #[test]
    fn random_data_is_not_compressed() {
        let mut rng = crate::testkit::Rng::new(5);
        let mut data = vec![0u8; 65536];
        rng.fill(&mut data);
        assert!(compress(CompressionType::Zlib, &data).is_none());
        assert!(compress(CompressionType::Zstd, &data).is_none());
    }

    #[test]
    fn garbage_streams_are_errors_not_panics() {
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 100], 4096).is_err());
            assert!(decompress(kind, &[], 4096).is_err());
        }
    }
}
