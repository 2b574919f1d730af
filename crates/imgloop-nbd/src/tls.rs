//! TLS for the NBD server (`NBD_OPT_STARTTLS`): X.509 credentials laid
//! out as qemu's `tls-creds-x509` directory (rustls), or pre-shared keys
//! as qemu's `tls-creds-psk` (OpenSSL, see [`crate::psk`]), and a TLS
//! stream that one reader thread and many reply writers share.
//!
//! Sharing: the TLS state sits in one mutex, the socket's write side in
//! another (`wire`). A writer takes `wire`, encrypts under the state lock,
//! and writes to the socket with the state lock released, so the reader
//! never waits on a writer blocked by a slow client. The reader reads the
//! socket with no lock held; when the TLS state has output of its own
//! (alerts) it sends it only if `wire` is free, else the writer holding
//! `wire` sends it: a writer releases `wire` only while holding the state
//! lock and after seeing nothing left to send.

use crate::psk::{PskCreds, PskSession};
use crate::Conn;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Longest a client may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Server TLS credentials.
#[derive(Clone)]
pub struct TlsCreds {
    kind: CredsKind,
    /// Only a client with this identity is let in (qemu's `--tls-authz`
    /// with an `authz-simple` identity): the certificate's subject, or the
    /// username of a pre-shared key.
    authz: Option<String>,
}

#[derive(Clone)]
enum CredsKind {
    X509(Arc<rustls::ServerConfig>),
    Psk(PskCreds),
}

/// The TLS state of one session, whichever library keeps it.
enum Engine {
    Rustls(Box<ServerConnection>),
    Psk(Box<PskSession>),
}

impl Engine {
    fn wants_write(&self) -> bool {
        match self {
            Engine::Rustls(s) => s.wants_write(),
            Engine::Psk(s) => s.wants_write(),
        }
    }

    /// Moves the ciphertext waiting to be sent into `out`.
    fn write_tls(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Engine::Rustls(s) => {
                while s.wants_write() {
                    s.write_tls(out)?;
                }
            }
            Engine::Psk(s) => s.write_tls(out),
        }
        Ok(())
    }

    fn write_plain(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Engine::Rustls(s) => s.writer().write_all(data),
            Engine::Psk(s) => s.write_plain(data),
        }
    }

    /// Takes ciphertext from the front of `input` (rustls: as much as
    /// its buffers hold, so the caller drains plaintext between calls;
    /// OpenSSL: all of it).
    fn read_tls(&mut self, input: &mut &[u8]) -> io::Result<()> {
        match self {
            Engine::Rustls(s) => {
                s.read_tls(input)?;
                s.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                Ok(())
            }
            Engine::Psk(s) => {
                s.read_tls(input);
                *input = &[];
                Ok(())
            }
        }
    }

    /// Plaintext: `Ok(0)` once the client closed, `WouldBlock` for none.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Engine::Rustls(s) => s.reader().read(buf),
            Engine::Psk(s) => s.read_plain(buf),
        }
    }

    fn close_notify(&mut self) {
        match self {
            Engine::Rustls(s) => s.send_close_notify(),
            Engine::Psk(s) => s.close_notify(),
        }
    }
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsCreds")
    }
}

fn creds_error(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("Unable to load TLS credentials {}: {what}", path.display()),
    )
}

impl TlsCreds {
    /// X.509 credentials from `dir` as qemu's `tls-creds-x509` reads it:
    /// `server-cert.pem` (the certificate, then its chain),
    /// `server-key.pem`, and for `verify_peer` `ca-cert.pem` (the CAs
    /// client certificates must chain to) with an optional `ca-crl.pem`.
    pub fn x509(dir: &Path, verify_peer: bool) -> io::Result<TlsCreds> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = dir.join("server-cert.pem");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| creds_error(&cert_path, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| creds_error(&cert_path, e))?;
        if certs.is_empty() {
            return Err(creds_error(&cert_path, "no certificate in the file"));
        }
        let key_path = dir.join("server-key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| creds_error(&key_path, e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?;
        let builder = if verify_peer {
            let ca_path = dir.join("ca-cert.pem");
            let mut roots = RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(&ca_path).map_err(|e| creds_error(&ca_path, e))?
            {
                roots
                    .add(c.map_err(|e| creds_error(&ca_path, e))?)
                    .map_err(|e| creds_error(&ca_path, e))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let crl_path = dir.join("ca-crl.pem");
            if crl_path.exists() {
                let crls = CertificateRevocationListDer::pem_file_iter(&crl_path)
                    .map_err(|e| creds_error(&crl_path, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| creds_error(&crl_path, e))?;
                verifier = verifier.with_crls(crls);
            }
            let verifier = verifier.build().map_err(|e| creds_error(&ca_path, e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| creds_error(&cert_path, e))?;
        // NBD clients do not resume sessions.
        config.send_tls13_tickets = 0;
        Ok(TlsCreds {
            kind: CredsKind::X509(Arc::new(config)),
            authz: None,
        })
    }

    /// Pre-shared keys from `file`, a `keys.psk` as qemu's
    /// `tls-creds-psk` reads it from its directory (`username:hexkey`
    /// lines, as GnuTLS's psktool writes them).
    pub fn psk(file: &Path) -> io::Result<TlsCreds> {
        Ok(TlsCreds {
            kind: CredsKind::Psk(PskCreds::from_file(file)?),
            authz: None,
        })
    }

    /// Lets in only clients whose certificate subject, written as GnuTLS
    /// and qemu write it (`C=GB,O=Example,CN=client1`: the names in
    /// certificate order), is `identity`; with pre-shared keys, whose
    /// username is `identity`.
    pub fn with_authz(mut self, identity: impl Into<String>) -> TlsCreds {
        self.authz = Some(identity.into());
        self
    }
}

/// Short names GnuTLS gives the attributes of a distinguished name.
const DN_NAMES: &[(&str, &str)] = &[
    ("2.5.4.6", "C"),
    ("2.5.4.8", "ST"),
    ("2.5.4.7", "L"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.3", "CN"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.12", "title"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
];

/// A DN value with GnuTLS's escapes: a backslash before `, + " \ < > ;`,
/// before a leading space or `#` and before a trailing space.
fn escape_dn_value(v: &str) -> String {
    let mut out = String::new();
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The subject of a DER certificate as GnuTLS writes it: relative names
/// in certificate order joined by ',', several values of one joined by
/// '+'; attributes without a short name as `OID=#hex`.
pub fn subject_dn(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let name = DN_NAMES.iter().find(|(o, _)| *o == oid).map(|(_, n)| *n);
            match (name, attr.as_str()) {
                (Some(n), Ok(v)) => parts.push(format!("{n}={}", escape_dn_value(v))),
                _ => {
                    let hex: String = attr.as_slice().iter().map(|b| format!("{b:02x}")).collect();
                    parts.push(format!("{oid}=#{hex}"));
                }
            }
        }
        rdns.push(parts.join("+"));
    }
    Some(rdns.join(","))
}

/// The TLS state and the socket's write side, shared by every handle.
struct Shared {
    state: Mutex<Engine>,
    wire: Mutex<Conn>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Sends whatever the TLS state has queued. Called with both locks;
    /// returns with neither, `wire` released while `state` is held.
    fn finish<'a>(
        &'a self,
        mut wire: MutexGuard<'a, Conn>,
        mut state: MutexGuard<'a, Engine>,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        loop {
            state.write_tls(&mut buf)?;
            if buf.is_empty() {
                drop(wire);
                return Ok(());
            }
            drop(state);
            wire.write_all(&buf)?;
            wire.flush()?;
            buf.clear();
            state = lock(&self.state);
        }
    }

    /// Encrypts and sends `data`.
    fn send(&self, data: &[u8]) -> io::Result<()> {
        let wire = lock(&self.wire);
        let mut state = lock(&self.state);
        state.write_plain(data)?;
        self.finish(wire, state)
    }
}

/// One handle on a TLS connection (the reader's or a writer's).
pub struct TlsConn {
    /// The socket, for reading.
    raw: Conn,
    shared: Arc<Shared>,
    /// Plaintext read and not yet handed out.
    plain: Vec<u8>,
    pos: usize,
    /// The client closed the session (close_notify).
    closed: bool,
    /// Ciphertext read from the socket (one TLS record and some).
    raw_buf: Vec<u8>,
}

impl TlsConn {
    /// Runs the server side of the TLS handshake on `raw`.
    pub(crate) fn accept(raw: Conn, creds: &TlsCreds) -> io::Result<TlsConn> {
        let mut sock = raw.try_clone()?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let (state, identity) = match &creds.kind {
            CredsKind::X509(config) => {
                let mut state = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
                state.set_buffer_limit(None);
                while state.is_handshaking() {
                    state.complete_io(&mut sock)?;
                }
                while state.wants_write() {
                    state.write_tls(&mut sock)?;
                }
                let dn = state
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| subject_dn(c.as_ref()));
                (Engine::Rustls(Box::new(state)), dn)
            }
            CredsKind::Psk(psk) => {
                let session = PskSession::accept(&mut sock, psk)?;
                let user = session.username().map(str::to_string);
                (Engine::Psk(Box::new(session)), user)
            }
        };
        sock.set_read_timeout(None)?;
        if let Some(want) = &creds.authz {
            if identity.as_deref() != Some(want.as_str()) {
                let kind = match creds.kind {
                    CredsKind::X509(_) => "x509",
                    CredsKind::Psk(_) => "psk",
                };
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "TLS {kind} authz check for {} is denied",
                        identity
                            .as_deref()
                            .unwrap_or("a client without an identity")
                    ),
                ));
            }
        }
        Ok(TlsConn {
            raw,
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                wire: Mutex::new(sock),
            }),
            plain: Vec::new(),
            pos: 0,
            closed: false,
            raw_buf: Vec::new(),
        })
    }

    /// Another handle on the same session (for writing).
    pub(crate) fn try_clone(&self) -> io::Result<TlsConn> {
        Ok(TlsConn {
            raw: self.raw.try_clone()?,
            shared: self.shared.clone(),
            plain: Vec::new(),
            pos: 0,
            closed: false,
            raw_buf: Vec::new(),
        })
    }

    /// The socket underneath.
    pub(crate) fn raw(&self) -> &Conn {
        &self.raw
    }

    /// Ends the session cleanly (close_notify), as NBD_CMD_DISC asks.
    pub(crate) fn close_notify(&self) -> io::Result<()> {
        let wire = lock(&self.shared.wire);
        let mut state = lock(&self.shared.state);
        state.close_notify();
        self.shared.finish(wire, state)
    }

    /// Moves the plaintext the TLS state holds into `plain`.
    fn drain(&mut self, state: &mut Engine) -> io::Result<()> {
        let mut tmp = [0u8; 16 << 10];
        loop {
            match state.read_plain(&mut tmp) {
                Ok(0) => {
                    self.closed = true;
                    return Ok(());
                }
                Ok(n) => self.plain.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if !self.plain.is_empty() => {
                    // Hand out what came before the unclean end first.
                    let _ = e;
                    self.closed = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends TLS output the reader caused (alerts), unless a writer holds
    /// the socket (it sends it then).
    fn send_own_output(&self, state: MutexGuard<'_, Engine>) -> io::Result<()> {
        if !state.wants_write() {
            return Ok(());
        }
        match self.shared.wire.try_lock() {
            Ok(wire) => self.shared.finish(wire, state),
            Err(std::sync::TryLockError::Poisoned(p)) => self.shared.finish(p.into_inner(), state),
            Err(std::sync::TryLockError::WouldBlock) => Ok(()),
        }
    }
}

impl Read for TlsConn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.plain.len() {
                let n = out.len().min(self.plain.len() - self.pos);
                out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            self.plain.clear();
            self.pos = 0;
            {
                let shared = self.shared.clone();
                let mut state = lock(&shared.state);
                self.drain(&mut state)?;
            }
            if !self.plain.is_empty() || self.closed {
                continue;
            }
            // No lock held while waiting for the client.
            let mut raw = std::mem::take(&mut self.raw_buf);
            raw.resize(18 << 10, 0);
            let n = self.raw.read(&mut raw)?;
            let shared = self.shared.clone();
            let mut state = lock(&shared.state);
            let mut input: &[u8] = &raw[..n];
            loop {
                if let Err(e) = state.read_tls(&mut input) {
                    let _ = self.send_own_output(state);
                    return Err(e);
                }
                self.drain(&mut state)?;
                if input.is_empty() {
                    break;
                }
            }
            self.raw_buf = raw;
            self.send_own_output(state)?;
            if n == 0 && self.plain.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.send(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_are_escaped_as_gnutls_does() {
        assert_eq!(escape_dn_value("Acme, Inc."), "Acme\\, Inc.");
        assert_eq!(
            escape_dn_value(" lead#x;y<z>\"q\\"),
            "\\ lead#x\\;y\\<z\\>\\\"q\\\\"
        );
        assert_eq!(escape_dn_value("#a b "), "\\#a b\\ ");
        assert_eq!(escape_dn_value("plain"), "plain");
    }
}
