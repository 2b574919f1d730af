//! `imgloop attach`: an image as a loop device, through a FUSE export.
//!
//! `imgloop attach IMAGE` starts itself again as `imgloop attach
//! --foreground --daemon IMAGE`, the export process, and waits for it to
//! print the device path (or an error) on its stdout. The export process
//! opens the image (taking its lock), mounts the FUSE export on a private
//! file under the run directory, binds a free loop device to that file
//! with `LOOP_CONFIGURE`, records its state in `RUN_DIR/loopN.json` for
//! `list` and `detach`, reports readiness and serves until SIGTERM, SIGINT
//! or SIGHUP.
//!
//! The device is bound with autoclear: it unbinds itself on its last
//! close. Its one open descriptor that keeps it bound lives in a separate
//! holder process (`imgloop attach --loop-holder N`), never in the export
//! process: when a process closes the last descriptor of a block device,
//! the kernel writes the device's dirty cache out and waits for it, and if
//! the export process did that while dying (`kill -9`), it would wait for
//! itself to serve the writes, forever. The holder exits when the export
//! process asks it to (after flushing the device and unbinding it) or when
//! the export process is gone (its control pipe closes), and the export
//! process stops when the holder is gone.

use crate::common::{fail, open_export};
use imgloop::{Error, ErrorKind, Result};
use imgloop_fuse::loopdev::device_path;
use imgloop_fuse::process::{self, StopSignals};
use imgloop_fuse::{Export, ExportOptions, LoopDevice, LoopOptions};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

#[derive(clap::Args)]
#[command(after_help = "\
Prints the device path (/dev/loopN) once the device is usable. The export
runs in the background until `imgloop detach`; with --foreground it stays
in the foreground (for service managers) and stops on SIGTERM or SIGINT,
flushing the image and unbinding the device. Needs root, /dev/fuse and the
loop driver. An image attached read-write cannot be attached again.

Examples:
  dev=$(imgloop attach disk.qcow2) && mkfs.ext4 $dev && mount $dev /mnt
  imgloop attach -r -P disk.vmdk            # read-only, with partitions
  imgloop attach --sector-size 4096 disk.img
  imgloop list
  imgloop detach /dev/loop0")]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Attach read-only: the device refuses writes.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Attach an internal snapshot (ID or name, or
    /// `snapshot.id=ID,snapshot.name=NAME`) read-only instead of the
    /// current disk.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Scan the device for partitions (/dev/loopNpM).
    #[arg(short = 'P', long = "partscan")]
    partscan: bool,
    /// Logical sector size of the device (default: the image's, 512 for most formats).
    #[arg(long, value_parser = ["512", "1024", "2048", "4096"])]
    sector_size: Option<String>,
    /// Direct I/O from the loop device to the export: no second page cache
    /// and many requests in flight (much faster random I/O).
    #[arg(long)]
    direct_io: bool,
    /// Stay in the foreground until SIGTERM or SIGINT.
    #[arg(long)]
    foreground: bool,
    /// Internal: the background export process started by `attach`.
    #[arg(long, hide = true, requires = "foreground")]
    daemon: bool,
    /// Internal: hold loop device N (open on stdout) for an export process.
    #[arg(long, hide = true, value_name = "N")]
    loop_holder: Option<u32>,
    /// Threads serving the export.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// `--object` (secrets, e.g. the key of an encrypted image; the export
    /// process gets them through its environment, not its command line)
    /// and `--image-opts`.
    #[command(flatten)]
    objects: crate::objects::ObjectArgs,
    /// The image file (or image options with `--image-opts`).
    image: PathBuf,
}

/// The environment variable that hands `--object` definitions to the
/// export process (one per line).
const OBJECTS_ENV: &str = "IMGLOOP_ATTACH_OBJECTS";

/// What `RUN_DIR/loopN.json` records about one attached image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct AttachState {
    /// `/dev/loopN`.
    pub device: String,
    /// The image, as an absolute path.
    pub image: String,
    /// Its format.
    pub format: String,
    /// Attached read-only.
    pub read_only: bool,
    /// The export process.
    pub pid: u32,
    /// When the export process started (clock ticks since boot), so a
    /// reused pid is not mistaken for it.
    pub pid_start_time: u64,
    /// The FUSE-exported file the loop device is bound to.
    pub mountpoint: String,
    /// Logical sector size of the device.
    pub sector_size: u32,
    /// Partition scanning was asked for.
    pub partscan: bool,
    /// Direct I/O was asked for.
    pub direct_io: bool,
    /// The process holding the device open (see the module docs).
    #[serde(default)]
    pub holder_pid: u32,
}

impl AttachState {
    /// True while the export process that wrote this state still runs.
    pub fn running(&self) -> bool {
        process::process_alive(self.pid)
            && process::process_start_time(self.pid) == Some(self.pid_start_time)
    }

    /// The loop device number.
    pub fn loop_number(&self) -> Option<u32> {
        self.device
            .strip_prefix("/dev/loop")
            .and_then(|n| n.parse().ok())
    }

    /// Where this state is stored.
    pub fn path(&self) -> PathBuf {
        run_dir().join(format!(
            "{}.json",
            Path::new(&self.device)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    }
}

/// Where export state and mountpoints live: `$IMGLOOP_RUN_DIR`, or
/// `/run/imgloop`.
pub fn run_dir() -> PathBuf {
    match std::env::var_os("IMGLOOP_RUN_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            std::path::absolute(&d).unwrap_or(d)
        }
        _ => PathBuf::from("/run/imgloop"),
    }
}

/// Every recorded attachment, sorted by device number.
pub fn read_states() -> Vec<AttachState> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(run_dir()) else {
        return v;
    };
    for entry in dir.flatten() {
        let p = entry.path();
        let is_state = p.extension().is_some_and(|e| e == "json")
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("loop"));
        if !is_state {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Ok(s) = serde_json::from_str::<AttachState>(&text) {
                v.push(s);
            }
        }
    }
    v.sort_by_key(|s| s.loop_number().unwrap_or(u32::MAX));
    v
}

fn write_state(s: &AttachState) -> Result<()> {
    let path = s.path();
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(s)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding the attach state: {e}")))?;
    std::fs::write(&tmp, text + "\n")
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io("writing the attach state", e).in_file(&path))
}

fn needs_root() -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        "attach needs root: binding loop devices and mounting FUSE are privileged",
    )
}

pub fn run(mut a: Args) -> u8 {
    if let Some(n) = a.loop_holder {
        return hold_loop_device(n);
    }
    // A snapshot is attached read-only.
    a.read_only |= a.snapshot.is_some();
    // The export process gets the secrets through its environment.
    if a.daemon {
        if let Some(v) = std::env::var_os(OBJECTS_ENV) {
            std::env::remove_var(OBJECTS_ENV);
            a.objects
                .objects
                .extend(v.to_string_lossy().lines().map(str::to_string));
        }
    }
    let result = if a.foreground {
        serve(&a)
    } else {
        start_in_background(&a)
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// Checks that can fail before any process is started.
fn preflight(a: &Args) -> Result<PathBuf> {
    if !process::is_root() {
        return Err(needs_root());
    }
    let spec = a.objects.spec(&a.image, a.format.as_deref())?;
    let image = std::fs::canonicalize(&spec.path)
        .map_err(|e| Error::io("could not open", e).in_file(&spec.path))?;
    // A Parallels disk bundle (a directory) attaches as its top image.
    let bundle = imgloop::formats::parallels::bundle::Bundle::is_bundle(&image);
    if image.is_dir() && !bundle {
        return Err(Error::invalid_argument("is a directory, not an image file").in_file(&a.image));
    }
    if let Some(f) = &spec.format {
        imgloop::registry::find(f).map_err(|e| e.in_file(&a.image))?;
    }
    imgloop_fuse::check_fuse_available()?;
    imgloop_fuse::loopdev::check_loop_available()?;
    let name = image.display().to_string();
    for s in read_states() {
        if s.image == name && s.running() && (!s.read_only || !a.read_only) {
            let how = if s.read_only {
                "read-only"
            } else {
                "read-write"
            };
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "already attached {how} as {} (export process {}); detach it first",
                    s.device, s.pid
                ),
            )
            .in_file(&a.image));
        }
    }
    Ok(image)
}

/// `imgloop attach`: start the export process and relay its report.
fn start_in_background(a: &Args) -> Result<u8> {
    let image = preflight(a)?;
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the imgloop binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("attach").arg("--foreground").arg("--daemon");
    if let Some(f) = &a.format {
        cmd.arg("-f").arg(f);
    }
    if a.read_only {
        cmd.arg("-r");
    }
    if let Some(l) = &a.snapshot {
        cmd.arg("-l").arg(l);
    }
    if a.partscan {
        cmd.arg("-P");
    }
    if let Some(s) = &a.sector_size {
        cmd.arg("--sector-size").arg(s);
    }
    if a.direct_io {
        cmd.arg("--direct-io");
    }
    cmd.arg("--threads").arg(a.threads.to_string());
    if a.objects.image_opts {
        // The options as given, with the file name made absolute.
        cmd.arg("--image-opts");
        cmd.arg("--").arg(image_opts_with_path(&a.image, &image));
    } else {
        cmd.arg("--").arg(&image);
    }
    if !a.objects.objects.is_empty() {
        cmd.env(OBJECTS_ENV, a.objects.objects.join("\n"));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("starting the export process", e))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let device = line.trim();
    if !device.is_empty() {
        println!("{device}");
        // The export process runs on; it is nobody's child to wait for.
        return Ok(0);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("waiting for the export process", e))?;
    let err = err.trim_end();
    if err.is_empty() {
        eprintln!("imgloop: the export process ended without attaching ({status})");
    } else {
        eprintln!("{err}");
    }
    Ok(status.code().filter(|&c| c != 0).unwrap_or(1) as u8)
}

/// The export process: serve until a stop signal, then clean up.
fn serve(a: &Args) -> Result<u8> {
    // Before any thread starts, so the stop signals reach `wait` below.
    let signals = StopSignals::block()?;
    if a.daemon {
        process::new_session();
    }
    let image = preflight(a)?;
    // Memory reclaim in this process must not wait on the device it serves.
    process::set_io_flusher();
    // A write to a holder that died must fail, not kill this process.
    process::ignore_sigpipe();
    let arg = if a.objects.image_opts {
        a.image.clone()
    } else {
        image.clone()
    };
    let img = open_export(
        &arg,
        a.format.as_deref(),
        a.read_only,
        a.snapshot.as_deref(),
        &a.objects,
    )
    .map_err(|e| {
        if e.kind() == ErrorKind::InUse {
            Error::new(
                ErrorKind::InUse,
                "image is in use by another process (attached, or open in a VM or qemu tool)",
            )
            .in_file(&image)
        } else {
            e
        }
    })?;
    let sector_size = match &a.sector_size {
        Some(s) => s.parse::<u32>().unwrap_or(512),
        None => img.sector_size(),
    };
    let format = img.format().to_string();
    let img = Arc::new(img);

    let dir = run_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io("creating the run directory", e).in_file(&dir))?;
    let mountpoint = dir.join(format!("export-{}", process::pid()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&mountpoint)
        .map_err(|e| Error::io("creating the export mountpoint", e).in_file(&mountpoint))?;
    let cleanup_mountpoint = || {
        let _ = std::fs::remove_file(&mountpoint);
    };

    let opts = ExportOptions {
        read_only: a.read_only,
        allow_other: false,
        threads: usize::from(a.threads),
        fs_name: format!("imgloop:{}", image.display()),
    };
    let export = match Export::start(img.clone(), &mountpoint, &opts, StopSignals::raise) {
        Ok(e) => e,
        Err(e) => {
            cleanup_mountpoint();
            return Err(e);
        }
    };
    let holder = match bind_loop(a, &export, &image, sector_size) {
        Ok(h) => h,
        Err(e) => {
            let _ = export.stop();
            cleanup_mountpoint();
            return Err(e);
        }
    };
    let state = AttachState {
        device: device_path(holder.number).display().to_string(),
        image: image.display().to_string(),
        format,
        read_only: a.read_only,
        pid: process::pid(),
        pid_start_time: process::process_start_time(process::pid()).unwrap_or(0),
        mountpoint: mountpoint.display().to_string(),
        sector_size,
        partscan: a.partscan,
        direct_io: a.direct_io,
        holder_pid: holder.pid,
    };
    if let Err(e) = write_state(&state) {
        let _ = shut_down(holder, export);
        cleanup_mountpoint();
        return Err(e);
    }

    // Ready: report the device.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", state.device);
    let _ = out.flush();
    drop(out);
    if a.daemon {
        let _ = process::redirect_stdio_to_null();
        let _ = std::env::set_current_dir("/");
    }

    signals.wait();
    let result = shut_down(holder, export);
    let _ = std::fs::remove_file(state.path());
    cleanup_mountpoint();
    result.map(|_| 0)
}

/// The holder process of a bound device, seen from the export process.
struct Holder {
    number: u32,
    pid: u32,
    /// Writing a byte asks the holder to flush, unbind and exit; closing it
    /// (the export process dying) makes it exit at once.
    control: std::process::ChildStdin,
    /// Receives once the holder has exited.
    exited: std::sync::mpsc::Receiver<()>,
}

/// Binds a free loop device to the exported file and hands the device's
/// descriptor to a new holder process.
fn bind_loop(a: &Args, export: &Export, image: &Path, sector_size: u32) -> Result<Holder> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!a.read_only);
    if a.direct_io {
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o
        .open(export.file())
        .map_err(|e| Error::io("opening the exported file", e).in_file(export.file()))?;
    let opts = LoopOptions {
        read_only: a.read_only,
        partscan: a.partscan,
        autoclear: true,
        direct_io: a.direct_io,
        block_size: sector_size,
        file_name: image.display().to_string(),
    };
    // The device keeps its own reference to the file; ours closes here.
    let dev = LoopDevice::attach(&file, &opts)?;
    drop(file);
    let number = dev.number();
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the imgloop binary", e))?;
    // The device descriptor becomes the holder's stdout; ours is closed
    // once the holder has started. Should starting it fail, dropping the
    // descriptor unbinds the device (autoclear).
    let spawned = Command::new(exe)
        .arg("attach")
        .arg("--loop-holder")
        .arg(number.to_string())
        .arg("--")
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(dev.into_file()))
        .stderr(Stdio::null())
        .spawn();
    let mut child = spawned.map_err(|e| Error::io("starting the loop device holder process", e))?;
    let pid = child.id();
    let Some(control) = child.stdin.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::new(
            ErrorKind::Io,
            "the loop device holder has no control pipe",
        ));
    };
    let (tx, exited) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("loop-holder".to_string())
        .spawn(move || {
            let _ = child.wait();
            let _ = tx.send(());
            // Without the holder the device may be gone: stop serving.
            StopSignals::raise();
        })
        .map_err(|e| Error::io("starting the holder watcher", e))?;
    Ok(Holder {
        number,
        pid,
        control,
        exited,
    })
}

/// Flushes the device into the image, unbinds it, unmounts the export.
fn shut_down(mut holder: Holder, export: Export) -> Result<()> {
    // The holder flushes data cached for the device into the export (still
    // serving), unbinds the device and exits, closing the last descriptor
    // unless someone else (a mounted file system) still uses the device;
    // then it unbinds when they let go, and the export serves until then.
    let _ = holder.control.write_all(b"q");
    drop(holder.control);
    let _ = holder.exited.recv();
    export.stop()
}

/// `imgloop attach --loop-holder N`: keep loop device N (open on stdout)
/// bound until the export process on stdin says stop or goes away.
fn hold_loop_device(n: u32) -> u8 {
    use std::os::fd::AsFd;
    // Terminal signals are for the export process; it tells us when to go.
    let _signals = StopSignals::block();
    let dev = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => LoopDevice::from_file(n, std::fs::File::from(fd)),
        Err(_) => return 1,
    };
    let mut cmd = [0u8; 1];
    match std::io::stdin().read(&mut cmd) {
        Ok(1) => {
            let synced = dev.sync();
            let cleared = dev.clear();
            u8::from(synced.is_err() || cleared.is_err())
        }
        // The export process is gone: just let go of the device.
        _ => 1,
    }
}

/// The device path a `detach` argument names, when it names a device.
pub fn as_device(arg: &Path) -> Option<String> {
    let n = imgloop_fuse::loopdev::device_number(arg)?;
    let is_dev =
        arg.starts_with("/dev") || std::fs::canonicalize(arg).is_ok_and(|p| p.starts_with("/dev"));
    is_dev.then(|| device_path(n).display().to_string())
}

/// The `--image-opts` argument `opts` with its file name replaced by the
/// absolute `path` (the export process resolves nothing relative).
fn image_opts_with_path(opts: &std::path::Path, path: &std::path::Path) -> String {
    let text = opts.to_string_lossy();
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    // Split on single commas (",," is a literal comma).
    let mut cur = String::new();
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        if c == ',' {
            if rest.starts_with(',') {
                cur.push_str(",,");
                rest = &rest[1..];
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    let name = path.to_string_lossy().replace(',', ",,");
    out.iter()
        .map(|item| match item.split_once('=') {
            Some((k, _)) if matches!(k, "file.filename" | "filename" | "file") => {
                format!("{k}={name}")
            }
            _ => item.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}
