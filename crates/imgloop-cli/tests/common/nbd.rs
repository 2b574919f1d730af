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
