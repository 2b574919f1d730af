//! The one public error type of imgloop.
//!
//! Every error carries a [`ErrorKind`] (what class of failure it is), a
//! human-readable message, and optional context: the file it concerns, the
//! on-disk structure that was being read, and the byte offset of that
//! structure. [`Error::errno`] maps the error to the errno value an NBD or
//! FUSE export sends back to its client.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What class of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The operating system reported an I/O error.
    Io,
    /// The file is not a valid image of the format it was opened as.
    InvalidFormat,
    /// The image uses a feature imgloop does not implement.
    Unsupported,
    /// Image metadata is inconsistent (a damaged image).
    Corrupt,
    /// A request reaches outside the virtual disk (or a structure outside the file).
    OutOfBounds,
    /// A write-type request on an image opened read-only.
    ReadOnly,
    /// A caller passed an argument that makes no sense (bad option, bad size).
    InvalidArgument,
    /// A file, format or driver that was named does not exist.
    NotFound,
    /// Another process holds a conflicting lock on the image.
    InUse,
    /// The operation is not allowed in the image's current state (e.g. closed).
    State,
    /// No space is left, or a configured limit was reached.
    NoSpace,
}

/// The error type of every fallible imgloop call.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    file: Option<PathBuf>,
    structure: Option<String>,
    offset: Option<u64>,
    source: Option<io::Error>,
}

/// Shorthand for `std::result::Result<T, imgloop::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message` and no context yet.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            file: None,
            structure: None,
            offset: None,
            source: None,
        }
    }

    /// An I/O error with a short description of what was being done.
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        let what = what.into();
        let message = if what.is_empty() {
            strip_os_suffix(&err)
        } else {
            format!("{what}: {}", strip_os_suffix(&err))
        };
        Error {
            kind,
            message,
            file: None,
            structure: None,
            offset: None,
            source: Some(err),
        }
    }

    /// Shorthand for an [`ErrorKind::InvalidArgument`] error.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for an [`ErrorKind::InvalidFormat`] error about `structure` at `offset`.
    pub fn invalid_format(structure: &str, offset: u64, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidFormat, message).at(structure, offset)
    }

    /// Shorthand for an [`ErrorKind::Corrupt`] error about `structure` at `offset`.
    pub fn corrupt(structure: &str, offset: u64, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message).at(structure, offset)
    }

    /// Shorthand for an [`ErrorKind::OutOfBounds`] request error.
    pub fn out_of_bounds(offset: u64, len: u64, size: u64) -> Self {
        Self::new(
            ErrorKind::OutOfBounds,
            format!("request at offset {offset} length {len} is outside the virtual disk of {size} bytes"),
        )
    }

    /// Shorthand for an [`ErrorKind::ReadOnly`] error.
    pub fn read_only(what: &str) -> Self {
        Self::new(
            ErrorKind::ReadOnly,
            format!("{what} refused: the image is open read-only"),
        )
    }

    /// Adds the file this error concerns, unless one is already set.
    pub fn in_file(mut self, file: impl AsRef<Path>) -> Self {
        if self.file.is_none() {
            self.file = Some(file.as_ref().to_path_buf());
        }
        self
    }

    /// Adds the structure and its byte offset in the file.
    pub fn at(mut self, structure: &str, offset: u64) -> Self {
        self.structure = Some(structure.to_string());
        self.offset = Some(offset);
        self
    }

    /// What class of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The file this error concerns, if known.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The on-disk structure this error concerns, if any.
    pub fn structure(&self) -> Option<&str> {
        self.structure.as_deref()
    }

    /// The byte offset of that structure in the file, if any.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The errno an NBD or FUSE export replies with for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            ErrorKind::InvalidFormat | ErrorKind::Corrupt | ErrorKind::State => libc::EIO,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::InUse => libc::EBUSY,
            ErrorKind::NoSpace => libc::ENOSPC,
        }
    }
}

/// `io::Error`'s Display appends " (os error N)"; users want the plain text.
fn strip_os_suffix(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        f.write_str(&self.message)?;
        match (&self.structure, self.offset) {
            (Some(s), Some(o)) => write!(f, " ({s} at offset {o:#x})"),
            (Some(s), None) => write!(f, " ({s})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::io("", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_structure_and_offset() {
        let e = Error::invalid_format("header", 0x48, "bad magic").in_file("/tmp/x.img");
        assert_eq!(
            e.to_string(),
            "/tmp/x.img: bad magic (header at offset 0x48)"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidFormat);
    }

    #[test]
    fn io_errors_keep_their_errno_and_lose_the_os_error_suffix() {
        let e = Error::io("reading", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(!e.to_string().contains("os error"), "{e}");
        let nf = Error::from(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(nf.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn first_file_context_wins() {
        let e = Error::unsupported("x").in_file("inner").in_file("outer");
        assert_eq!(e.file(), Some(Path::new("inner")));
    }

    #[test]
    fn read_only_maps_to_eperm_and_bounds_to_einval() {
        assert_eq!(Error::read_only("write").errno(), libc::EPERM);
        assert_eq!(Error::out_of_bounds(10, 10, 5).errno(), libc::EINVAL);
    }
}
