//! TLS with pre-shared keys, the way qemu's `tls-creds-psk` offers it.
//! rustls has no external PSKs, so this part uses OpenSSL (the `openssl`
//! crate over the system library), driven through memory buffers: the
//! same sans-I/O shape as rustls, so [`crate::tls`] shares one reader and
//! many writers over it in the same way.
//!
//! Keys come from a `keys.psk` file as GnuTLS's `psktool` writes it: one
//! `username:hexkey` per line. TLS 1.3 and the TLS 1.2 PSK and ECDHE-PSK
//! suites are offered, which is what qemu's and libnbd's GnuTLS clients
//! ask for.

use openssl::ex_data::Index;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslStream, SslVersion};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Longest username and key accepted from a `keys.psk` line.
const MAX_FIELD: usize = 1024;

/// Pre-shared keys and the OpenSSL context that serves them.
#[derive(Clone)]
pub struct PskCreds {
    context: SslContext,
}

/// Where a connection keeps the username its client presented.
fn identity_index() -> Index<Ssl, String> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an OpenSSL ex_data index"))
}

fn bad_file(path: &Path, line: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "Unable to load TLS credentials {}: line {line}: {what}",
            path.display()
        ),
    )
}

/// Parses `keys.psk`: `username:hexkey` lines (blank lines skipped).
pub fn parse_keys(path: &Path, text: &str) -> io::Result<HashMap<String, Vec<u8>>> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (user, hex) = line
            .split_once(':')
            .ok_or_else(|| bad_file(path, i + 1, "expected username:hexkey"))?;
        if user.is_empty() || user.len() > MAX_FIELD || hex.len() > 2 * MAX_FIELD {
            return Err(bad_file(path, i + 1, "username or key of a bad length"));
        }
        if hex.len() % 2 != 0 || hex.is_empty() {
            return Err(bad_file(
                path,
                i + 1,
                "the key is not whole hexadecimal bytes",
            ));
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|j| u8::from_str_radix(&hex[j..j + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad_file(path, i + 1, "the key is not hexadecimal"))?;
        keys.insert(user.to_string(), key);
    }
    if keys.is_empty() {
        return Err(bad_file(path, 0, "no keys in the file"));
    }
    Ok(keys)
}

impl PskCreds {
    /// The keys of `file` (a `keys.psk`).
    pub fn from_file(file: &Path) -> io::Result<PskCreds> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Unable to load TLS credentials {}: {e}", file.display()),
            )
        })?;
        let keys = Arc::new(parse_keys(file, &text)?);
        let mut b = SslContext::builder(SslMethod::tls_server()).map_err(io::Error::other)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(io::Error::other)?;
        b.set_cipher_list("ECDHE-PSK:PSK:!aNULL:!eNULL:!MD5:!RC4:!3DES")
            .map_err(io::Error::other)?;
        // NBD clients do not resume sessions.
        b.set_num_tickets(0).map_err(io::Error::other)?;
        let index = identity_index();
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some(user) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                return Ok(0);
            };
            let Some(key) = keys.get(user) else {
                // An unknown user: no key, the handshake fails.
                return Ok(0);
            };
            if key.len() > out.len() {
                return Ok(0);
            }
            out[..key.len()].copy_from_slice(key);
            ssl.set_ex_data(index, user.to_string());
            Ok(key.len())
        });
        Ok(PskCreds { context: b.build() })
    }
}

/// Ciphertext in from the socket and out to it, held in memory.
#[derive(Default)]
struct Pipe {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One PSK session's TLS state.
pub struct PskSession {
    stream: SslStream<Pipe>,
}

fn tls_error(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

impl PskSession {
    /// Runs the server side of the handshake over `sock` (whose read
    /// timeout bounds how long the client may take).
    pub fn accept<S: Read + Write>(sock: &mut S, creds: &PskCreds) -> io::Result<PskSession> {
        let ssl = Ssl::new(&creds.context).map_err(io::Error::other)?;
        let mut stream = SslStream::new(ssl, Pipe::default()).map_err(io::Error::other)?;
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let result = stream.accept();
            let out = std::mem::take(&mut stream.get_mut().output);
            sock.write_all(&out)?;
            match result {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    let n = sock.read(&mut buf)?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    stream.get_mut().input.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.code() == ErrorCode::WANT_WRITE => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("TLS handshake failed: {e}"),
                    ))
                }
            }
        }
        sock.flush()?;
        Ok(PskSession { stream })
    }

    /// The username the client's key belongs to.
    pub fn username(&self) -> Option<&str> {
        self.stream
            .ssl()
            .ex_data(identity_index())
            .map(String::as_str)
    }

    /// Whether ciphertext waits to be sent.
    pub fn wants_write(&self) -> bool {
        !self.stream.get_ref().output.is_empty()
    }

    /// Moves the ciphertext waiting to be sent into `out`.
    pub fn write_tls(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.stream.get_mut().output);
    }

    /// Encrypts `data` (the ciphertext then waits in the session).
    pub fn write_plain(&mut self, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            done += self.stream.ssl_write(&data[done..]).map_err(tls_error)?;
        }
        Ok(())
    }

    /// Takes ciphertext read from the socket.
    pub fn read_tls(&mut self, input: &[u8]) {
        self.stream.get_mut().input.extend_from_slice(input);
    }

    /// Plaintext the session holds: `Ok(0)` once the client closed the
    /// session, `WouldBlock` when more ciphertext is needed.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.stream.ssl_read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
            Err(e) if e.code() == ErrorCode::WANT_READ => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(tls_error(e)),
        }
    }

    /// Queues a close_notify alert.
    pub fn close_notify(&mut self) {
        let _ = self.stream.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_read_as_psktool_writes_them() {
        let p = Path::new("keys.psk");
        let keys = parse_keys(p, "qemu:00ff10\n\nother:ABCD\r\n").unwrap();
        assert_eq!(keys["qemu"], [0, 0xff, 0x10]);
        assert_eq!(keys["other"], [0xab, 0xcd]);
        for bad in ["", "nocolon\n", "u:abc\n", "u:zz\n", ":00\n", "u:\n"] {
            let e = parse_keys(p, bad).unwrap_err().to_string();
            assert!(e.contains("keys.psk"), "{bad:?}: {e}");
        }
    }
}
