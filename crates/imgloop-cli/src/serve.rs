//! `imgloop serve`: export images over NBD, with `qemu-nbd`'s flags where
//! the concept is the same.

use crate::common::{fail, open_export};
use imgloop::{Error, Result};
use imgloop_fuse::process::StopSignals;
use imgloop_nbd::{serve_connection, Conn, Export, ServerConfig};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

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
    /// TCP address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    bind: String,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Clients served at once (others are refused).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// What TRIM does: ignore it, or unmap (free the space).
    #[arg(long, default_value = "ignore", value_parser = ["ignore", "unmap", "off", "on"])]
    discard: String,
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

pub fn run(a: Args) -> u8 {
    match serve(&a) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// The listening socket.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
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

fn serve(a: &Args) -> Result<()> {
    // Before any thread starts, so every thread has them blocked.
    let signals = StopSignals::block()?;
    let unmap = matches!(a.discard.as_str(), "unmap" | "on");
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
    });
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
        });
    }
    let listener = match &a.socket {
        Some(p) => Listener::Unix(
            UnixListener::bind(p)
                .map_err(|e| Error::io("could not listen on the socket", e).in_file(p))?,
            p.clone(),
        ),
        None => Listener::Tcp(
            TcpListener::bind((a.bind.as_str(), a.port))
                .map_err(|e| Error::io(format!("could not listen on {}:{}", a.bind, a.port), e))?,
        ),
    };
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io("writing the pid file", e).in_file(p))?;
    }
    let config = Arc::new(ServerConfig {
        exports,
        workers: usize::from(a.threads),
    });
    let (stop_tx, stop_rx) = mpsc::channel::<Stop>();
    {
        let tx = stop_tx.clone();
        std::thread::spawn(move || {
            signals.wait();
            let _ = tx.send(Stop::Signal);
        });
    }
    let active = Arc::new(AtomicUsize::new(0));
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
            let Ok(conn) = listener.accept() else {
                continue;
            };
            if active.load(Ordering::Acquire) >= shared {
                // At the limit: refused, as qemu-nbd's --shared does.
                conn.shutdown();
                continue;
            }
            active.fetch_add(1, Ordering::AcqRel);
            let Ok(handle_conn) = conn.try_clone() else {
                active.fetch_sub(1, Ordering::AcqRel);
                continue;
            };
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
                if active.fetch_sub(1, Ordering::AcqRel) == 1 && !persistent {
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
