//! Zero-copy read replies: file pages go into a pipe and from the pipe
//! into the socket with `splice(2)`, so the data of a READ is never
//! copied through this process (the client's receive is the only copy).
//! Used for plain (not TLS) connections and ranges the image says lie
//! as-is in a file whose layout never changes ([`imgloop::Image::file_ranges`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Pipe size asked for: one 1 MiB read (a common client request size)
/// fits whole.
const WANTED: usize = 1 << 20;

/// One worker's pipe, holding the data of the reply being built.
pub struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
    /// Bytes the pipe holds at most.
    capacity: usize,
    /// Bytes it holds now.
    held: usize,
}

impl Pipe {
    /// A new, empty pipe as large as the system lets it be (up to 1 MiB).
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the 2-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and ours alone.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; a failure leaves the
        // default size, read back below.
        unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, WANTED as i32) };
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read_end,
            write_end,
            capacity: size as usize,
            held: 0,
        })
    }

    /// Bytes the pipe can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes it holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves `len` bytes of `file` at `offset` into the pipe (references
    /// to the page cache, not copies). Fails if the file ends first or the
    /// pipe has no room; what was moved stays held (see [`drain_to`](Self::drain_to)).
    pub fn fill(&mut self, file: &File, offset: u64, len: usize) -> io::Result<()> {
        if self.held + len > self.capacity {
            return Err(io::Error::other("the pipe has no room for the range"));
        }
        let mut off = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let mut left = len;
        while left > 0 {
            // SAFETY: both descriptors are open for the call; `off` is a
            // valid i64 the kernel advances.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    self.write_end.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            match n {
                n if n > 0 => {
                    left -= n as usize;
                    self.held += n as usize;
                }
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ended inside the range",
                    ))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves `len` held bytes into `socket` (blocking until it takes them).
    pub fn drain_to(&mut self, socket: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        let mut left = len.min(self.held);
        while left > 0 {
            // SAFETY: both descriptors are open for the call; no offsets
            // (a pipe and a socket have none).
            let n = unsafe {
                libc::splice(
                    self.read_end.as_raw_fd(),
                    std::ptr::null_mut(),
                    socket.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
                )
            };
            match n {
                n if n > 0 => {
                    left -= n as usize;
                    self.held -= n as usize;
                }
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn file_bytes_reach_the_socket_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut pipe = Pipe::new().unwrap();
        assert!(pipe.capacity() >= 4096);
        let n = pipe.capacity().min(100_000);
        pipe.fill(&file, 1234, n).unwrap();
        assert_eq!(pipe.held(), n);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            b.read_exact(&mut got).unwrap();
            got
        });
        pipe.drain_to(a.as_fd(), n).unwrap();
        assert_eq!(pipe.held(), 0);
        assert_eq!(reader.join().unwrap(), &data[1234..1234 + n]);
    }

    #[test]
    fn a_range_past_the_end_of_the_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 1000]).unwrap();
        let file = File::open(&path).unwrap();
        let mut pipe = Pipe::new().unwrap();
        let e = pipe.fill(&file, 900, 200).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(pipe.held(), 100, "what the file had is held");
        let cap = pipe.capacity();
        assert!(
            pipe.fill(&file, 0, cap).is_err(),
            "no room past the capacity"
        );
    }
}
