//! `imgloop serve` modes beyond the basics: zero detection, `--fork`,
//! systemd socket activation, dirty bitmaps exported as meta contexts and
//! extended headers, each checked with real clients (qemu-img, qemu-io,
//! nbdinfo).

mod common;
use common::nbd::*;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn qcow2(sc: &Scratch, name: &str) -> std::path::PathBuf {
    let img = sc.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    img
}

/// qemu-img's JSON map of a local image: (start, length, data) triples.
fn data_map(img: &Path) -> Vec<(u64, u64, bool)> {
    let map = qemu_img(&["map", "--output=json", s(img)]).ok().json();
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn is_data(map: &[(u64, u64, bool)], at: u64) -> bool {
    map.iter()
        .find(|(s, l, _)| *s <= at && at < s + l)
        .is_some_and(|e| e.2)
}

#[test]
fn detect_zeroes_turns_zero_writes_into_unallocated_space() {
    let sc = Scratch::new();
    for (mode, discard, expect_data) in [
        ("off", "unmap", true),
        ("on", "ignore", false),
        ("unmap", "unmap", false),
    ] {
        let img = qcow2(&sc, &format!("{mode}.qcow2"));
        // Data first, so "unmap" has something to free.
        qemu_io("qcow2", &img, &["write -P 5 1M 1M"]).ok();
        let srv = Server::start(
            &sc,
            &[
                "-t",
                &format!("--detect-zeroes={mode}"),
                &format!("--discard={discard}"),
                s(&img),
            ],
        );
        tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0 4M 1M",
                "-c",
                "write -P 0 1M 1M",
                "-c",
                "write -P 6 8M 64k",
                &srv.uri(""),
            ],
        );
        assert!(srv.stop().success());
        qemu_io(
            "qcow2",
            &img,
            &["read -P 0 1M 1M", "read -P 0 4M 1M", "read -P 6 8M 64k"],
        )
        .ok();
        assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
        let map = data_map(&img);
        assert_eq!(is_data(&map, 4 << 20), expect_data, "{mode}: {map:?}");
        // "on" keeps what was allocated (as zero clusters), "unmap" frees it.
        assert!(is_data(&map, 8 << 20), "{mode}: {map:?}");
        if mode != "off" {
            let zero_cluster_data = is_data(&map, 1 << 20);
            assert!(!zero_cluster_data, "{mode}: {map:?}");
        }
    }
    // unmap needs discard=unmap, as in qemu-nbd.
    let img = qcow2(&sc, "x.qcow2");
    let r = imgloop(&[
        "serve",
        "--socket",
        s(&sc.path("x.sock")),
        "--detect-zeroes=unmap",
        s(&img),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--detect-zeroes=unmap"), "{}", r.stderr);
}

fn wait_gone(pid: u32) {
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie of ours would stay; this process is not our child.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `imgloop serve --fork ARGS`, its standard error into a file (the
/// background server keeps it, as qemu-nbd's does, so a pipe would stay
/// open until the server ends).
fn forked(sc: &Scratch, args: &[&str]) -> Run {
    let err_path = sc.path(&format!("fork{}.err", rand_tag()));
    let err = std::fs::File::create(&err_path).unwrap();
    let mut a = vec!["serve", "--fork"];
    a.extend_from_slice(args);
    let out = Command::new(imgloop_bin())
        .args(&a)
        .stderr(err)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

#[test]
fn fork_returns_once_the_server_listens_and_reports_errors_before() {
    let sc = Scratch::new();
    let img = qcow2(&sc, "f.qcow2");
    let sock = sc.path("f.sock");
    let pid_file = sc.path("f.pid");
    let r = forked(
        &sc,
        &[
            "-t",
            "--socket",
            s(&sock),
            "--pid-file",
            s(&pid_file),
            s(&img),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Returned only after the server listens: the socket and the pid file
    // are there already.
    assert!(sock.exists());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    tool("qemu-io", &["-f", "raw", "-c", "write -P 4 0 64k", &uri]);
    let info = qemu_img(&["info", "--output=json", &uri]).ok().json();
    assert_eq!(info["virtual-size"], 16 << 20);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_gone(pid);
    assert!(!sock.exists());
    qemu_io("qcow2", &img, &["read -P 4 0 64k"]).ok();
    // An error before listening is the command's error.
    let r = forked(
        &sc,
        &[
            "--socket",
            s(&sc.path("g.sock")),
            s(&sc.path("missing.qcow2")),
        ],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("missing.qcow2"), "{}", r.stderr);
}

/// Runs `imgloop serve ARGS` as systemd would: a listening Unix socket
/// on descriptor 3, LISTEN_PID and LISTEN_FDS set.
fn activated(sock: &Path, args: &[&str]) -> std::process::Child {
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1] + ".tmp")
s.listen(8)
# Appears under its name only once it listens.
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], [sys.argv[2]] + sys.argv[3:])
"#;
    let mut a = vec!["-c", script, s(sock), imgloop_bin()];
    a.push("serve");
    a.extend_from_slice(args);
    Command::new("python3")
        .args(&a)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn socket_activation_serves_the_inherited_socket() {
    let sc = Scratch::new();
    let img = qcow2(&sc, "a.qcow2");
    qemu_io("qcow2", &img, &["write -P 2 64k 64k"]).ok();
    let sock = sc.path("a.sock");
    let mut child = activated(&sock, &["-f", "qcow2", s(&img)]);
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    tool("qemu-io", &["-f", "raw", "-c", "read -P 2 64k 64k", &uri]);
    // Not persistent: the server ends after its client.
    let st = child.wait().unwrap();
    assert!(st.success());
    // With an explicit socket as well, it refuses (as qemu-nbd does).
    let sock2 = sc.path("b.sock");
    let child = activated(&sock2, &["--socket", s(&sc.path("c.sock")), s(&img)]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("socket activation"), "{err}");
}
