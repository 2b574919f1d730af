//! An `imgloop serve` process for the NBD tests, and the NBD client tools.

use super::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(sc: &Scratch, args: &[&str]) -> Server {
        let socket = sc.path(&format!("s{}.sock", std::process::id() ^ rand_tag()));
        let mut a = vec!["serve", "--socket", s(&socket)];
        a.extend_from_slice(args);
        let child = Command::new(imgloop_bin())
            .args(&a)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", s(&self.socket))
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rand_tag() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed) << 20
}

pub fn tool(program: &str, args: &[&str]) -> Run {
    run_program(program, args).ok()
}

/// The dirty ranges of bitmap `name` of a qcow2 image as qemu sees them:
/// exported read-only by qemu-nbd (`-B`) and mapped by nbdinfo.
pub fn qemu_bitmap_ranges(sc: &Scratch, img: &std::path::Path, name: &str) -> Vec<(u64, u64)> {
    let sock = sc.path(&format!("qb{}.sock", rand_tag()));
    let mut q = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k", s(&sock), s(img)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        if let Ok(Some(st)) = q.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            q.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("qemu-nbd -B {name} failed ({st}): {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "qemu-nbd did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let ranges = nbdinfo_dirty_ranges(&uri, name);
    let _ = q.kill();
    let _ = q.wait();
    ranges
}

/// The dirty ranges nbdinfo maps for `qemu:dirty-bitmap:NAME` at `uri`,
/// neighbours joined.
pub fn nbdinfo_dirty_ranges(uri: &str, name: &str) -> Vec<(u64, u64)> {
    let map = tool(
        "nbdinfo",
        &["--json", &format!("--map=qemu:dirty-bitmap:{name}"), uri],
    )
    .json();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["type"].as_u64().unwrap() & 1 == 0 {
            continue;
        }
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match out.last_mut() {
            Some(p) if p.0 + p.1 == o => p.1 += l,
            _ => out.push((o, l)),
        }
    }
    out
}
