//! A Network Block Device server (NetworkBlockDevice `doc/proto.md`,
//! fixed newstyle) for images opened by the imgloop core: several named
//! exports, structured replies (reads answer holes without reading them),
//! `base:allocation` and `qemu:allocation-depth` block status, many
//! requests in flight per connection served in parallel and answered out
//! of order, flush/FUA/trim/write-zeroes/fast-zero/cache.
//!
//! The protocol code knows nothing of formats: an export is an
//! [`imgloop::Image`].

mod handshake;
pub mod proto;
mod psk;
mod splice;
mod tls;
mod transmission;

pub use tls::TlsCreds;

use imgloop::Image;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// One named export.
pub struct Export {
    /// The name clients ask for ("" is the default export).
    pub name: String,
    /// A description `LIST` and `INFO` show.
    pub description: String,
    /// The image served.
    pub image: Arc<Image>,
    /// Writes are refused (`EPERM`).
    pub read_only: bool,
    /// `TRIM` frees space (`--discard=unmap`); otherwise it is ignored.
    pub unmap: bool,
    /// What writes of all-zero data become (`--detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
    /// Persistent dirty bitmaps of the image offered as
    /// `qemu:dirty-bitmap:NAME` meta contexts (qemu-nbd's `-B`).
    pub bitmaps: Vec<String>,
}

/// What a write of all-zero data becomes (qemu-nbd's `--detect-zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Written as data.
    #[default]
    Off,
    /// A write-zeroes that keeps the space allocated.
    On,
    /// A write-zeroes that may free the space (needs `unmap`).
    Unmap,
}

impl Export {
    /// A read-write export of `image` called `name`, TRIM ignored, zero
    /// detection off.
    pub fn new(name: impl Into<String>, image: Arc<Image>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            image,
            read_only: false,
            unmap: false,
            detect_zeroes: DetectZeroes::Off,
            bitmaps: Vec::new(),
        }
    }
}

/// What a server serves, and how.
pub struct ServerConfig {
    /// The exports.
    pub exports: Vec<Export>,
    /// Requests one connection may have in flight (and threads serving them).
    pub workers: usize,
    /// TLS credentials: when set, clients must start TLS before anything
    /// else (qemu-nbd's `--tls-creds`).
    pub tls: Option<TlsCreds>,
}

impl ServerConfig {
    /// The export called `name`.
    pub(crate) fn export(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.name == name)
    }
}

/// Largest request length served (and advertised as the maximum block
/// size): a larger one is refused before its payload is read.
pub const MAX_REQUEST: u32 = 32 << 20;

/// A client connection: a Unix or TCP stream, or TLS over one.
pub enum Conn {
    /// A Unix socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
    /// TLS over a Unix or TCP socket.
    Tls(Box<tls::TlsConn>),
}

impl Conn {
    /// A second handle on the same socket (for the reply writer).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(Box::new(t.try_clone()?)),
        })
    }

    /// Closes both directions.
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tls(t) => {
                t.raw().shutdown();
                Ok(())
            }
        };
    }

    /// The socket itself, when nothing (TLS) stands between this process
    /// and the client: replies may then be spliced into it.
    fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Conn::Unix(s) => Some(s.as_fd()),
            Conn::Tcp(s) => Some(s.as_fd()),
            Conn::Tls(_) => None,
        }
    }

    fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Tls(c) => c.raw().set_read_timeout(t),
        }
    }

    /// Starts TLS on a plain connection (after STARTTLS was accepted).
    fn start_tls(&mut self, creds: &TlsCreds) -> io::Result<()> {
        if matches!(self, Conn::Tls(_)) {
            return Err(io::Error::other("TLS is already on"));
        }
        let raw = self.try_clone()?;
        *self = Conn::Tls(Box::new(tls::TlsConn::accept(raw, creds)?));
        Ok(())
    }

    /// Ends a TLS session cleanly; nothing for a plain connection.
    fn close_notify(&self) {
        if let Conn::Tls(t) = self {
            let _ = t.close_notify();
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// Serves one client until it disconnects (or breaks the protocol):
/// the handshake, then requests. Errors of the connection end it and are
/// returned; they never affect other connections.
pub fn serve_connection(conn: Conn, config: &Arc<ServerConfig>) -> io::Result<()> {
    let mut conn = conn;
    if let Conn::Tcp(s) = &conn {
        let _ = s.set_nodelay(true);
    }
    // Whoever else holds a handle on the socket, the client sees it close
    // when this connection is done.
    let closer = conn.try_clone()?;
    let result = match handshake::negotiate(&mut conn, config) {
        Ok(None) => {
            conn.close_notify();
            Ok(())
        }
        Ok(Some(session)) => transmission::run(conn, config.clone(), session),
        Err(e) => Err(e),
    };
    closer.shutdown();
    result
}
