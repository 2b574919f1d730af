//! `imgloop serve`: export images over NBD, with `qemu-nbd`'s flags where
//! the concept is the same.

use crate::common::{fail, open_export};
use imgloop::{Error, Result};
use imgloop_fuse::process::StopSignals;
use imgloop_nbd::{serve_connection, Conn, DetectZeroes, Export, ServerConfig, TlsCreds};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

#[derive(clap::Args)]
#[command(after_help = "Examples:
  imgloop serve --socket /tmp/disk.sock disk.qcow2 &
  qemu-img info nbd+unix:///?socket=/tmp/disk.sock
  imgloop serve -t -r -p 10810 -x base base.vmdk
  imgloop serve --socket /tmp/s.sock -t a.qcow2 other=b.vhdx")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Name of the first image's export (default "").
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Description of the first image's export.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Listen on this Unix socket.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to listen on [default: 0.0.0.0].
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    /// TCP port to listen on [default: 10809].
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Clients served at once (others wait until one leaves).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// What TRIM does: ignore it, or unmap (free the space).
    #[arg(long, default_value = "ignore", value_parser = ["ignore", "unmap", "off", "on"])]
    discard: String,
    /// What writes of all-zero data become: data (off), a write-zeroes
    /// that keeps the space (on), or one that frees it (unmap; needs
    /// --discard=unmap).
    #[arg(long = "detect-zeroes", default_value = "off", value_parser = ["off", "on", "unmap"])]
    detect_zeroes: String,
    /// Offer the persistent dirty bitmap NAME of the first image as the
    /// meta context `qemu:dirty-bitmap:NAME` (repeatable).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
    /// Require TLS: the ID of an `--object tls-creds-x509,id=ID,dir=DIR`
    /// or `--object tls-creds-psk,id=ID,dir=DIR` (DIR/keys.psk), or a
    /// directory in the x509 layout (ca-cert.pem, server-cert.pem,
    /// server-key.pem).
    #[arg(long = "tls-creds", value_name = "ID|DIR")]
    tls_creds: Option<String>,
    /// Require TLS with pre-shared keys from FILE (`username:hexkey`
    /// lines, as psktool writes keys.psk).
    #[arg(long = "tls-psk", value_name = "FILE", conflicts_with = "tls_creds")]
    tls_psk: Option<PathBuf>,
    /// Let in only clients whose certificate subject (or, with pre-shared
    /// keys, username) is the identity of `--object
    /// authz-simple,id=ID,identity=DN` (DN as qemu writes it, e.g.
    /// `C=GB,,O=Example,,CN=client1` with commas doubled).
    #[arg(long = "tls-authz", value_name = "ID")]
    tls_authz: Option<String>,
    /// With --tls-creds DIR: require client certificates signed by
    /// DIR/ca-cert.pem (an --object says it with verify-peer, default on).
    #[arg(long = "tls-verify-peer")]
    tls_verify_peer: bool,
    /// Go to the background once the server listens (the command returns
    /// then, with 0; errors before that are printed and returned).
    #[arg(long)]
    fork: bool,
    /// Export an internal snapshot (read-only).
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Write the server's process ID here once it listens.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// `--object` and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image to export.
    image: PathBuf,
    /// More exports, `NAME=IMAGE`.
    more: Vec<String>,
}

/// Set in the environment of the background server `--fork` starts: its
/// standard output is a pipe to the waiting parent.
const FORKED_ENV: &str = "IMGLOOP_SERVE_FORKED";

pub fn run(a: Args) -> u8 {
    if a.fork && std::env::var_os(FORKED_ENV).is_none() {
        return fork_and_wait();
    }
    match serve(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// The listening socket.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    /// Passed by systemd (not removed at exit).
    Activated(Box<Listener>),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            Listener::Activated(l) => l.accept(),
        }
    }
}

/// A connected client: a handle on its socket (to cut it off at a stop
/// signal) and the thread serving it.
type Client = (Conn, std::thread::JoinHandle<()>);

/// Why the server stops.
enum Stop {
    Signal,
    LastClientLeft,
}

/// `--fork`: runs the same command again in the background (in a process
/// group of its own) and waits until it listens (its standard output says
/// so) or fails (it closes standard output without saying so; its errors
/// went to the shared standard error). Re-running the program instead of
/// calling fork() keeps a multi-threaded process from forking.
fn fork_and_wait() -> u8 {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return fail(&Error::io(
                "finding the program to run in the background",
                e,
            ))
        }
    };
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .collect();
    let child = Command::new(exe)
        .args(args)
        .env(FORKED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(&Error::io("starting the background server", e)),
    };
    let mut line = String::new();
    let ready = child
        .stdout
        .take()
        .map(|o| std::io::BufReader::new(o).read_line(&mut line).is_ok() && line == "ready\n")
        .unwrap_or(false);
    if ready {
        return 0;
    }
    match child.wait() {
        Ok(st) => st.code().map_or(1, |c| c.clamp(1, 255) as u8),
        Err(_) => 1,
    }
}

/// Tells the waiting `--fork` parent that the server listens, then points
/// standard output at /dev/null (the pipe closes, the parent exits).
fn notify_forked_parent() {
    use std::io::Write;
    if std::env::var_os(FORKED_ENV).is_none() {
        return;
    }
    let mut out = std::io::stdout();
    let _ = out.write_all(b"ready\n");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto descriptor 1 with a descriptor we own; no
        // memory is involved.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// The listening socket systemd passed (socket activation: `LISTEN_PID`
/// is this process, `LISTEN_FDS` is 1, the socket is descriptor 3).
fn activated_listener() -> Result<Option<Listener>> {
    use std::os::fd::FromRawFd;
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    if fds.trim() != "1" {
        return Err(Error::invalid_argument(format!(
            "unexpected value for LISTEN_FDS: '{fds}' (one listening socket is served)"
        )));
    }
    // SAFETY: sockaddr_storage is plain data; getsockname writes at most
    // `len` bytes into it and reads nothing else.
    let family = unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            3,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return Err(Error::io(
                "socket activation: descriptor 3 is not a socket",
                std::io::Error::last_os_error(),
            ));
        }
        addr.ss_family as libc::c_int
    };
    // SAFETY: descriptor 3 was handed to this process to own (LISTEN_PID
    // names it) and is a socket of the family checked above; nothing
    // else in the process uses it.
    let listener = unsafe {
        match family {
            libc::AF_UNIX => Listener::Activated(Box::new(Listener::Unix(
                UnixListener::from_raw_fd(3),
                PathBuf::new(),
            ))),
            libc::AF_INET | libc::AF_INET6 => {
                Listener::Activated(Box::new(Listener::Tcp(TcpListener::from_raw_fd(3))))
            }
            _ => {
                return Err(Error::invalid_argument(
                    "socket activation: descriptor 3 is neither a Unix nor a TCP socket",
                ))
            }
        }
    };
    // LISTEN_PID stays in the environment: it names this process only,
    // so nothing this process starts takes it for its own.
    Ok(Some(listener))
}

fn serve(a: &Args) -> Result<()> {
    let activated = activated_listener()?;
    if activated.is_some() && (a.socket.is_some() || a.bind.is_some() || a.port.is_some()) {
        return Err(Error::invalid_argument(
            "--socket, --bind and --port cannot be used with socket activation",
        ));
    }
    let unmap = matches!(a.discard.as_str(), "unmap" | "on");
    let detect_zeroes = match a.detect_zeroes.as_str() {
        "on" => DetectZeroes::On,
        "unmap" if !unmap => {
            return Err(Error::invalid_argument(
                "--detect-zeroes=unmap can only be used if discard is set to unmap",
            ))
        }
        "unmap" => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    // Before any thread starts, so every thread has them blocked.
    let signals = StopSignals::block()?;
    let loaded = |what: &std::path::Path, r: std::io::Result<TlsCreds>| {
        r.map_err(|e| Error::io("loading the TLS credentials", e).in_file(what))
    };
    let tls = match (&a.tls_creds, &a.tls_psk) {
        (None, None) => None,
        (_, Some(file)) => Some(loaded(file, TlsCreds::psk(file))?),
        (Some(id), None) => {
            let (dir, verify, psk) = match a.objects.tls_creds(id)? {
                Some(o) => (o.dir, o.verify_peer, o.psk),
                None => (PathBuf::from(id), a.tls_verify_peer, false),
            };
            if !dir.is_dir() {
                return Err(Error::invalid_argument(format!(
                    "No TLS credentials with id '{id}' (an --object tls-creds-x509 or \
                     tls-creds-psk, or a directory)"
                )));
            }
            Some(if psk {
                let file = dir.join("keys.psk");
                loaded(&file, TlsCreds::psk(&file))?
            } else {
                loaded(&dir, TlsCreds::x509(&dir, verify))?
            })
        }
    };
    let tls = match (tls, &a.tls_authz) {
        (Some(creds), Some(id)) => Some(creds.with_authz(a.objects.authz_identity(id)?)),
        (tls, _) => tls,
    };
    if a.tls_authz.is_some() && tls.is_none() {
        return Err(Error::invalid_argument(
            "--tls-authz is not permitted without --tls-creds",
        ));
    }
    let mut exports = Vec::new();
    let read_only = a.read_only || a.snapshot.is_some();
    let first = open_export(
        &a.image,
        a.format.as_deref(),
        read_only,
        a.snapshot.as_deref(),
        &a.objects,
    )?;
    exports.push(Export {
        name: a.export_name.clone(),
        description: a.description.clone(),
        image: Arc::new(first),
        read_only,
        unmap,
        detect_zeroes,
        bitmaps: a.bitmaps.clone(),
    });
    for b in &a.bitmaps {
        let img = &exports[0].image;
        // The bitmap is there and consistent.
        img.bitmap_status(b, 0, 1)
            .map_err(|e| Error::new(e.kind(), format!("Bitmap '{b}': {}", e.message())))?;
    }
    for m in &a.more {
        let (name, path) = m.split_once('=').ok_or_else(|| {
            Error::invalid_argument(format!("'{m}': more exports are given as NAME=IMAGE"))
        })?;
        if exports.iter().any(|e| e.name == name) {
            return Err(Error::invalid_argument(format!(
                "export '{name}' is named twice"
            )));
        }
        let img = open_export(
            std::path::Path::new(path),
            a.format.as_deref(),
            a.read_only,
            None,
            &crate::objects::ObjectArgs {
                objects: a.objects.objects.clone(),
                image_opts: false,
            },
        )?;
        exports.push(Export {
            name: name.to_string(),
            description: String::new(),
            image: Arc::new(img),
            read_only: a.read_only,
            unmap,
            detect_zeroes,
            bitmaps: Vec::new(),
        });
    }
    let listener = match (&a.socket, activated) {
        (_, Some(l)) => l,
        (Some(p), None) => Listener::Unix(
            UnixListener::bind(p)
                .map_err(|e| Error::io("could not listen on the socket", e).in_file(p))?,
            p.clone(),
        ),
        (None, None) => {
            let bind = a.bind.as_deref().unwrap_or("0.0.0.0");
            let port = a.port.unwrap_or(10809);
            Listener::Tcp(
                TcpListener::bind((bind, port))
                    .map_err(|e| Error::io(format!("could not listen on {bind}:{port}"), e))?,
            )
        }
    };
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io("writing the pid file", e).in_file(p))?;
    }
    notify_forked_parent();
    let config = Arc::new(ServerConfig {
        exports,
        workers: usize::from(a.threads),
        tls,
    });
    let (stop_tx, stop_rx) = mpsc::channel::<Stop>();
    {
        let tx = stop_tx.clone();
        std::thread::spawn(move || {
            signals.wait();
            let _ = tx.send(Stop::Signal);
        });
    }
    // Clients being served. At the `--shared` limit the listener is not
    // read: a new client waits in the kernel's backlog until one leaves,
    // as with qemu-nbd (refusing it would fail a client that connects
    // just as the previous one disconnects).
    let active: Arc<(Mutex<usize>, Condvar)> = Arc::default();
    let conns: Arc<Mutex<Vec<Client>>> = Arc::default();
    let listener = Arc::new(listener);
    {
        let (listener, config, active, conns) = (
            listener.clone(),
            config.clone(),
            active.clone(),
            conns.clone(),
        );
        let (shared, persistent) = (a.shared.max(1), a.persistent);
        std::thread::spawn(move || loop {
            {
                let (count, freed) = &*active;
                let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
                while *n >= shared {
                    n = freed.wait(n).unwrap_or_else(|e| e.into_inner());
                }
            }
            let Ok(conn) = listener.accept() else {
                continue;
            };
            let Ok(handle_conn) = conn.try_clone() else {
                continue;
            };
            *active.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            let (config, active, tx) = (config.clone(), active.clone(), stop_tx.clone());
            let t = std::thread::spawn(move || {
                if let Err(e) = serve_connection(conn, &config) {
                    use std::io::ErrorKind as K;
                    if !matches!(
                        e.kind(),
                        K::BrokenPipe | K::ConnectionReset | K::UnexpectedEof
                    ) {
                        eprintln!("imgloop: a client connection ended: {e}");
                    }
                }
                let (count, freed) = &*active;
                let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
                *n -= 1;
                freed.notify_one();
                if *n == 0 && !persistent {
                    let _ = tx.send(Stop::LastClientLeft);
                }
            });
            let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|(_, h)| !h.is_finished());
            list.push((handle_conn, t));
        });
    }
    let why = stop_rx.recv().unwrap_or(Stop::Signal);
    // Stop: no new clients; requests in flight finish (each connection's
    // workers drain before it ends), then everything is made durable.
    let list = std::mem::take(&mut *conns.lock().unwrap_or_else(|e| e.into_inner()));
    for (c, t) in list {
        if matches!(why, Stop::Signal) {
            c.shutdown();
        }
        let _ = t.join();
    }
    let mut result = Ok(());
    for e in &config.exports {
        if let Err(err) = e.image.sync().and_then(|_| e.image.close()) {
            result = Err(err);
        }
    }
    if let Listener::Unix(_, p) = &*listener {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result
}
