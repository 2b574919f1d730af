//! Guest ranges that lie as-is in plain files, for readers that hand host
//! pages to the kernel (`splice`, `sendfile`) instead of copying them
//! through a buffer.

use super::Image;
use crate::driver::{Mapping, StorageId};
use crate::error::Result;
use crate::inflight::Ticket;
use std::fs::File;
use std::sync::RwLockReadGuard;

/// Most file ranges one [`FileRanges`] answer holds; a range more broken
/// up than that is read through a buffer.
const MAX_PIECES: usize = 16;

/// A guest range stored as-is in one or more plain files, in guest
/// order. Holds the image's request ticket and the files' handles for as
/// long as it lives.
pub struct FileRanges<'a> {
    /// The files, one guard per storage named.
    files: Vec<(StorageId, RwLockReadGuard<'a, File>)>,
    /// (index into `files`, host offset, length), covering the guest range
    /// from its start.
    pieces: Vec<(usize, u64, u64)>,
    _ticket: Ticket<'a>,
}

impl FileRanges<'_> {
    /// The pieces in guest order: the file, the byte offset in it and the
    /// length. Their lengths add up to the guest range asked for.
    pub fn iter(&self) -> impl Iterator<Item = (&File, u64, u64)> + '_ {
        self.pieces
            .iter()
            .map(|&(i, offset, len)| (&*self.files[i].1, offset, len))
    }
}

impl Image {
    /// Where guest range `[offset, offset + len)` lies, when all of it is
    /// stored as-is inside plain files (not past their ends) and the format
    /// never moves data while the image is open
    /// ([`Driver::fixed_data_layout`](crate::driver::Driver::fixed_data_layout)):
    /// a reader may then pass those file ranges to the kernel and let its
    /// reader take the pages later. `None` when any part is zeroes,
    /// unallocated, compressed or encrypted, in storage that is not a
    /// plain file, or the layout can change: read it with
    /// [`read`](Image::read).
    pub fn file_ranges(&self, offset: u64, len: u64) -> Result<Option<FileRanges<'_>>> {
        self.check_open()?;
        self.check_bounds(offset, len)?;
        if !self.driver.fixed_data_layout() || len == 0 {
            return Ok(None);
        }
        let ticket = self.state.requests().enter();
        let mut files: Vec<(StorageId, RwLockReadGuard<'_, File>)> = Vec::new();
        let mut ends: Vec<u64> = Vec::new();
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            if pieces.len() == MAX_PIECES {
                return Ok(None);
            }
            let want = offset + len - pos;
            let (mapping, n) = self.driver.map(pos, want).map_err(|e| self.err(e))?;
            let Mapping::Data {
                storage,
                offset: host,
            } = mapping
            else {
                return Ok(None);
            };
            let n = n.min(want);
            if n == 0 {
                return Ok(None);
            }
            let i = match files.iter().position(|(id, _)| *id == storage) {
                Some(i) => i,
                None => {
                    let Some(file) = self.storage(storage)?.as_file() else {
                        return Ok(None);
                    };
                    let end = match file.metadata() {
                        Ok(m) => m.len(),
                        Err(_) => return Ok(None),
                    };
                    files.push((storage, file));
                    ends.push(end);
                    files.len() - 1
                }
            };
            // Past the end of the file the range reads as zeroes: that is
            // for `read` to fill in.
            if host.checked_add(n).is_none_or(|e| e > ends[i]) {
                return Ok(None);
            }
            match pieces.last_mut() {
                Some((j, h, l)) if *j == i && *h + *l == host => *l += n,
                _ => pieces.push((i, host, n)),
            }
            pos += n;
        }
        Ok(Some(FileRanges {
            files,
            pieces,
            _ticket: ticket,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::MemStorage;
    use crate::{registry, CreateOptions, Image, OpenOptions};
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    /// Reads what `file_ranges` names, from the files themselves.
    fn gather(img: &Image, offset: u64, len: u64) -> Option<Vec<u8>> {
        let ranges = img.file_ranges(offset, len).expect("file_ranges")?;
        let mut out = Vec::new();
        for (file, at, n) in ranges.iter() {
            let mut b = vec![0u8; n as usize];
            file.read_exact_at(&mut b, at)
                .expect("read the named range");
            out.extend_from_slice(&b);
        }
        Some(out)
    }

    #[test]
    fn a_raw_file_names_its_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let img = Image::open(&path, &OpenOptions::read_only(Some("raw"))).unwrap();
        let got = gather(&img, 4096, 100_000).expect("raw data lies in the file");
        assert_eq!(got, &data[4096..104_096]);
        // The whole disk, and bounds like read's.
        assert_eq!(gather(&img, 0, data.len() as u64).unwrap(), data);
        assert!(img.file_ranges(data.len() as u64 - 10, 11).is_err());
        assert!(img.file_ranges(u64::MAX, 2).is_err());
        let mut f = std::fs::File::open(&path).unwrap();
        let mut whole = Vec::new();
        f.read_to_end(&mut whole).unwrap();
        assert_eq!(whole, data, "nothing changed the file");
    }

    #[test]
    fn formats_that_move_data_and_memory_storage_say_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        let opts = CreateOptions {
            size: 1 << 20,
            ..Default::default()
        };
        crate::create(&path, "qcow2", &opts).unwrap();
        let img = Image::open(&path, &OpenOptions::default()).unwrap();
        img.write(&[9u8; 65536], 0).unwrap();
        // Allocated qcow2 data could be discarded and its cluster reused.
        assert!(gather(&img, 0, 65536).is_none());
        // Raw in memory has no file to name.
        let mem = MemStorage::from_bytes(&[5u8; 8192]);
        let raw = Image::open_storage(Arc::new(mem), Some("raw"), true, None).unwrap();
        assert!(gather(&raw, 0, 4096).is_none());
        let mut b = [0u8; 4096];
        raw.read(&mut b, 0).unwrap();
        assert_eq!(b, [5u8; 4096]);
        let _ = registry::find("raw").expect("raw is registered");
    }

    #[test]
    fn a_range_past_the_end_of_a_shorter_file_is_left_to_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![3u8; 8192]).unwrap();
        let img = Image::open(&path, &OpenOptions::read_only(Some("raw"))).unwrap();
        // The file shrinks under the open image (another process).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(gather(&img, 0, 8192).is_none());
        assert_eq!(gather(&img, 0, 4096).unwrap(), vec![3u8; 4096]);
        let mut b = vec![1u8; 8192];
        img.read(&mut b, 0).unwrap();
        assert_eq!(&b[..4096], &[3u8; 4096][..]);
        assert_eq!(
            &b[4096..],
            &[0u8; 4096][..],
            "read fills the rest with zeroes"
        );
    }
}
