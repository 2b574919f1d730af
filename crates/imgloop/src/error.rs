//! The one public error type of imgloop.
//!
//! Every error carries an [`ErrorKind`] (what class of failure it is), a
//! message saying what went wrong, optional context (the file it concerns,
//! the on-disk structure that was being read and that structure's byte
//! offset), an optional typed [`Condition`] a caller can act on, and the
//! typed source error (an [`std::io::Error`], a format's own error type)
//! reachable through [`std::error::Error::source`] and
//! [`Error::source_as`]. Messages state facts; advice for a user of a
//! command line ("run check -r all") is the command line's business,
//! keyed on [`Error::condition`]. [`Error::errno`] maps the error to the
//! errno an NBD or FUSE export sends back to its client.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What class of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
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
    /// A file named inside an image (backing file, data file) was not
    /// opened because the open policy forbids it.
    Refused,
    /// A fast zero request (no fallback) cannot be done without writing
    /// zero buffers.
    NoFastZero,
}

/// A state the caller may want to act on, beyond the error's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Condition {
    /// The image is marked corrupt: writes are refused until a repair.
    MarkedCorrupt,
    /// A resize would shrink the disk and shrinking was not allowed.
    ShrinkNotAllowed,
    /// A write would put another format's header into sector 0 of an
    /// image whose format was probed as raw.
    ProbedRawHeader,
}

/// The error type of every fallible imgloop call.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    file: Option<PathBuf>,
    structure: Option<Cow<'static, str>>,
    offset: Option<u64>,
    condition: Option<Condition>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Shorthand for `std::result::Result<T, imgloop::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message` and no context yet.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            file: None,
            structure: None,
            offset: None,
            condition: None,
            source: None,
        }
    }

    /// An error of `kind` caused by the typed error `source`; the message
    /// is the source's own.
    pub fn from_source<E>(kind: ErrorKind, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut e = Self::new(kind, source.to_string());
        e.source = Some(Box::new(source));
        e
    }

    /// An I/O error with a short description of what was being done.
    pub fn io(what: impl Into<Cow<'static, str>>, err: io::Error) -> Self {
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
        let mut e = Self::new(kind, message);
        e.source = Some(Box::new(err));
        e
    }

    /// Shorthand for an [`ErrorKind::InvalidArgument`] error.
    pub fn invalid_argument(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for an [`ErrorKind::InvalidFormat`] error about `structure` at `offset`.
    pub fn invalid_format(
        structure: &'static str,
        offset: u64,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::new(ErrorKind::InvalidFormat, message).at(structure, offset)
    }

    /// Shorthand for an [`ErrorKind::Corrupt`] error about `structure` at `offset`.
    pub fn corrupt(
        structure: &'static str,
        offset: u64,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
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

    /// An arithmetic overflow on values read from `structure` at `offset`
    /// (a crafted or damaged image).
    pub fn overflow(structure: &'static str, offset: u64, what: &'static str) -> Self {
        Self::new(
            ErrorKind::InvalidFormat,
            format!("{what} overflows 64 bits"),
        )
        .at(structure, offset)
    }

    /// Adds the file this error concerns, unless one is already set.
    pub fn in_file(mut self, file: impl AsRef<Path>) -> Self {
        if self.file.is_none() {
            self.file = Some(file.as_ref().to_path_buf());
        }
        self
    }

    /// Adds the structure and its byte offset in the file.
    pub fn at(mut self, structure: impl Into<Cow<'static, str>>, offset: u64) -> Self {
        self.structure = Some(structure.into());
        self.offset = Some(offset);
        self
    }

    /// Records a [`Condition`] the caller can act on.
    pub fn with_condition(mut self, condition: Condition) -> Self {
        self.condition = Some(condition);
        self
    }

    /// Sets the typed source (cause) of this error.
    pub fn with_source<E>(mut self, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        self.source = Some(Box::new(source));
        self
    }

    /// The same error with `prefix: ` put before its message (the
    /// kind, context and source stay).
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message).into();
        self
    }

    /// The same error with `; fact` added after its message.
    pub fn noting(mut self, fact: impl fmt::Display) -> Self {
        self.message = format!("{}; {fact}", self.message).into();
        self
    }

    /// The same error with another kind.
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
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

    /// The condition recorded on this error, if any.
    pub fn condition(&self) -> Option<Condition> {
        self.condition
    }

    /// The typed source error, when it is a `T` (for example a format's
    /// own error type, or [`std::io::Error`]).
    pub fn source_as<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.source.as_deref().and_then(|s| s.downcast_ref::<T>())
    }

    /// The errno an NBD or FUSE export replies with for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => self
                .source_as::<io::Error>()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            ErrorKind::InvalidFormat | ErrorKind::Corrupt | ErrorKind::State => libc::EIO,
            ErrorKind::Unsupported | ErrorKind::NoFastZero => libc::EOPNOTSUPP,
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::ReadOnly | ErrorKind::Refused => libc::EPERM,
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
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::io("", err)
    }
}

/// Checked arithmetic on values read from an image: each method names the
/// structure and offset the values came from, so an overflow is an
/// [`ErrorKind::InvalidFormat`] error that says where, not a panic or a
/// silent wrap.
#[derive(Clone, Copy, Debug)]
pub struct Checked {
    /// The structure the values come from.
    pub structure: &'static str,
    /// Its byte offset in the file.
    pub offset: u64,
}

impl Checked {
    /// Values from `structure` at `offset`.
    pub fn of(structure: &'static str, offset: u64) -> Checked {
        Checked { structure, offset }
    }

    /// `a + b`.
    pub fn add(self, a: u64, b: u64, what: &'static str) -> Result<u64> {
        a.checked_add(b)
            .ok_or_else(|| Error::overflow(self.structure, self.offset, what))
    }

    /// `a * b`.
    pub fn mul(self, a: u64, b: u64, what: &'static str) -> Result<u64> {
        a.checked_mul(b)
            .ok_or_else(|| Error::overflow(self.structure, self.offset, what))
    }

    /// `a << bits`, refusing bits shifted out.
    pub fn shl(self, a: u64, bits: u32, what: &'static str) -> Result<u64> {
        if bits >= 64 || (a << bits) >> bits != a {
            return Err(Error::overflow(self.structure, self.offset, what));
        }
        Ok(a << bits)
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
        assert_eq!(
            nf.source_as::<io::Error>().and_then(|e| e.raw_os_error()),
            Some(libc::ENOENT)
        );
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
        assert_eq!(
            Error::new(ErrorKind::NoFastZero, "x").errno(),
            libc::EOPNOTSUPP
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("inner failure {0}")]
    struct Inner(u32);

    #[test]
    fn a_typed_source_stays_inspectable() {
        let e = Error::from_source(ErrorKind::Corrupt, Inner(7)).at("L2 table", 512);
        assert_eq!(e.source_as::<Inner>().map(|i| i.0), Some(7));
        assert!(e.source_as::<io::Error>().is_none());
        assert_eq!(e.to_string(), "inner failure 7 (L2 table at offset 0x200)");
        let e = e.with_condition(Condition::MarkedCorrupt);
        assert_eq!(e.condition(), Some(Condition::MarkedCorrupt));
    }

    #[test]
    fn checked_arithmetic_names_the_structure_instead_of_wrapping() {
        let c = Checked::of("header", 8);
        assert_eq!(c.add(1, 2, "x").unwrap(), 3);
        let e = c.add(u64::MAX, 1, "backing file name end").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat);
        assert_eq!(e.offset(), Some(8));
        assert!(e.to_string().contains("backing file name end"), "{e}");
        assert!(c.mul(1 << 40, 1 << 30, "x").is_err());
        assert!(c.shl(1 << 60, 8, "x").is_err());
        assert_eq!(c.shl(3, 4, "x").unwrap(), 48);
        assert!(c.shl(1, 64, "x").is_err());
    }
}
