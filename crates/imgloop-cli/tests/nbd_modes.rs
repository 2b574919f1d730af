//! `imgloop serve` modes beyond the basics: zero detection, `--fork`,
//! systemd socket activation, dirty bitmaps exported as meta contexts and
//! extended headers, each checked with real clients (qemu-img, qemu-io,
//! nbdinfo).

mod common;
use common::nbd::*;
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
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

/// Kills a server process (SIGKILL) when dropped; nothing if it is gone
/// (or its pid now names another program).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("imgloop") {
            return;
        }
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
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
    // The background server is not our child: if an assertion fails
    // before it is stopped, it is killed on the way out.
    let _guard = KillOnDrop(pid);
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

#[test]
fn dirty_bitmaps_are_served_as_qemu_nbd_serves_them_and_record_writes() {
    let sc = Scratch::new();
    let img = qcow2(&sc, "b.qcow2");
    qemu_io("qcow2", &img, &["write -P 1 0 1M"]).ok();
    qemu_img(&["bitmap", "--add", s(&img), "b0"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "4k", s(&img), "fine"]).ok();
    qemu_io("qcow2", &img, &["write -P 2 3M 10k", "write -z 9M 1M"]).ok();
    qemu_img(&["bitmap", "--disable", s(&img), "fine"]).ok();
    let want_b0 = qemu_bitmap_ranges(&sc, &img, "b0");
    let want_fine = qemu_bitmap_ranges(&sc, &img, "fine");
    assert_eq!(want_fine, vec![(3 << 20, 12 << 10), (9 << 20, 1 << 20)]);
    let srv = Server::start(&sc, &["-t", "-e", "4", "-B", "b0", "-B", "fine", s(&img)]);
    let uri = srv.uri("");
    assert_eq!(nbdinfo_dirty_ranges(&uri, "b0"), want_b0);
    assert_eq!(nbdinfo_dirty_ranges(&uri, "fine"), want_fine);
    // Only the bitmaps named with -B are offered.
    let list = tool("nbdinfo", &["--list", "--json", &uri]).json();
    let contexts: Vec<String> = list["exports"][0]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert!(
        contexts.contains(&"qemu:dirty-bitmap:b0".to_string()),
        "{contexts:?}"
    );
    assert!(
        contexts.contains(&"qemu:dirty-bitmap:fine".to_string()),
        "{contexts:?}"
    );
    // A write through the server is recorded in the enabled bitmap, live
    // and after the server stops.
    tool("qemu-io", &["-f", "raw", "-c", "write -P 3 12M 4k", &uri]);
    let mut want = want_b0.clone();
    want.push((12 << 20, 64 << 10));
    want.sort();
    assert_eq!(nbdinfo_dirty_ranges(&uri, "b0"), want);
    assert_eq!(nbdinfo_dirty_ranges(&uri, "fine"), want_fine);
    // qemu's own client reads the bitmap the way it does from qemu-nbd.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
        s(&srv.socket)
    );
    let map = qemu_img(&["map", "--output=json", "--image-opts", &opts])
        .ok()
        .json();
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["data"].as_bool().unwrap())
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, want);
    assert!(srv.stop().success());
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    assert_eq!(qemu_bitmap_ranges(&sc, &img, "b0"), want);
    // A missing bitmap is an error at start, as in qemu-nbd.
    let r = imgloop(&[
        "serve",
        "--socket",
        s(&sc.path("m.sock")),
        "-B",
        "nope",
        s(&img),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("'nope' not found"), "{}", r.stderr);
}

/// A raw client speaking extended headers.
struct RawClient(std::os::unix::net::UnixStream);

impl RawClient {
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Reads option replies up to the final one: (types, last payload).
    fn replies(&mut self) -> (Vec<u32>, Vec<u8>) {
        let mut kinds = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            self.0.read_exact(&mut p).unwrap();
            kinds.push(kind);
            // Only ACK and errors end a reply list (INFO/META/SERVER go on).
            if kind == 1 || kind & 0x8000_0000 != 0 {
                return (kinds, p);
            }
        }
    }

    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = 0x21e4_1c71u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
    }

    /// One extended reply chunk: (flags, type, cookie, offset, payload).
    fn chunk(&mut self) -> (u16, u16, u64, u64, Vec<u8>) {
        let mut h = [0u8; 32];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6e8a_278c);
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.0.read_exact(&mut p).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u64::from_be_bytes(h[16..24].try_into().unwrap()),
            p,
        )
    }
}

fn str_field(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

#[test]
fn extended_headers_carry_64_bit_lengths_and_the_block_status_filter() {
    let sc = Scratch::new();
    let img = qcow2(&sc, "e.qcow2");
    qemu_io("qcow2", &img, &["write -P 7 1M 64k"]).ok();
    let srv = Server::start(&sc, &["-t", "-e", "2", s(&img)]);
    // qemu's client negotiates them: 64-bit transactions.
    let l = tool("qemu-nbd", &["-L", "-k", s(&srv.socket)]);
    assert!(
        l.stdout.contains("transaction size: 64-bit"),
        "{}",
        l.stdout
    );
    assert!(l.stdout.contains("block-status-payload"), "{}", l.stdout);
    let mut c = RawClient(std::os::unix::net::UnixStream::connect(&srv.socket).unwrap());
    c.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    c.0.read_exact(&mut hello).unwrap();
    c.0.write_all(&3u32.to_be_bytes()).unwrap();
    c.option(11, &[]);
    assert_eq!(c.replies().0, vec![1]);
    // Structured replies after extended headers: refused (EXT_HEADER_REQD).
    c.option(8, &[]);
    assert_eq!(c.replies().0, vec![0x8000_000a]);
    let mut set = str_field("");
    set.extend_from_slice(&2u32.to_be_bytes());
    set.extend_from_slice(&str_field("base:allocation"));
    set.extend_from_slice(&str_field("qemu:allocation-depth"));
    c.option(10, &set);
    let (kinds, _) = c.replies();
    assert_eq!(kinds, vec![4, 4, 1]);
    let mut go = str_field("");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(7, &go);
    let (kinds, _) = c.replies();
    assert_eq!(*kinds.last().unwrap(), 1);
    // A write with its payload length, then a flush: one NONE chunk each
    // (no simple replies), carrying the request's offset.
    c.request(0x20, 1, 1, 4096, 512, &[9u8; 512]);
    let (flags, kind, cookie, offset, p) = c.chunk();
    assert_eq!((flags, kind, cookie, offset, p.len()), (1, 0, 1, 4096, 0));
    c.request(0, 3, 2, 0, 0, &[]);
    assert_eq!(c.chunk().1, 0);
    // Block status over the whole 16 MiB: 64-bit descriptors (type 6).
    c.request(0, 7, 3, 0, 16 << 20, &[]);
    let mut ids = Vec::new();
    loop {
        let (flags, kind, cookie, _, p) = c.chunk();
        assert_eq!((kind, cookie), (6, 3));
        let n = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
        assert_eq!(p.len(), 8 + 16 * n);
        let total: u64 = (0..n)
            .map(|i| u64::from_be_bytes(p[8 + 16 * i..16 + 16 * i].try_into().unwrap()))
            .sum();
        assert_eq!(total, 16 << 20);
        ids.push(u32::from_be_bytes(p[0..4].try_into().unwrap()));
        if flags & 1 == 1 {
            break;
        }
    }
    assert_eq!(ids.len(), 2);
    // The payload filter: only the context asked for.
    let mut filter = (1u64 << 20).to_be_bytes().to_vec();
    filter.extend_from_slice(&ids[1].to_be_bytes());
    c.request(0x20, 7, 4, 1 << 20, filter.len() as u64, &filter);
    let (flags, kind, _, offset, p) = c.chunk();
    assert_eq!((flags, kind, offset), (1, 6, 1 << 20));
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), ids[1]);
    // An unknown context in the filter: EINVAL, and the connection goes on.
    let mut bad = (1u64 << 20).to_be_bytes().to_vec();
    bad.extend_from_slice(&999u32.to_be_bytes());
    c.request(0x20, 7, 5, 0, bad.len() as u64, &bad);
    let (_, kind, cookie, _, p) = c.chunk();
    assert_eq!((kind, cookie), (0x8001, 5));
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), 22);
    // PAYLOAD_LEN on a command without a payload form: read, then EINVAL.
    c.request(0x20, 4, 6, 0, 16, &[0u8; 16]);
    let (_, kind, cookie, _, _) = c.chunk();
    assert_eq!((kind, cookie), (0x8001, 6));
    // A read (64 KiB or more, so holes are looked for): hole and data
    // chunks, all carrying the request's offset.
    c.request(0, 0, 7, (1 << 20) - 65536, 131072, &[]);
    let mut got = Vec::new();
    loop {
        let (flags, kind, _, offset, p) = c.chunk();
        assert_eq!(offset, (1 << 20) - 65536);
        got.push(kind);
        if kind == 1 {
            assert!(p[8..].iter().all(|&b| b == 7));
        }
        if flags & 1 == 1 {
            break;
        }
    }
    assert_eq!(got, vec![2, 1]);
    c.request(0, 2, 8, 0, 0, &[]);
    drop(c);
    assert!(srv.stop().success());
    qemu_io("qcow2", &img, &["read -P 9 4096 512"]).ok();
}

#[test]
fn clients_past_the_shared_limit_wait_their_turn_instead_of_being_refused() {
    let sc = Scratch::new();
    let img = qcow2(&sc, "w.qcow2");
    let srv = Server::start(&sc, &["-t", s(&img)]);
    let uri = srv.uri("");
    // Clients one after the other, each connecting as soon as the one
    // before has gone (while the server may still be closing it).
    for i in 0..20 {
        let r = qemu_img(&["info", "--output=json", &uri]);
        assert_eq!(r.code, 0, "client {i}: {}", r.stderr);
    }
    // A client holding the only slot makes the next one wait, not fail.
    let release = sc.path("release");
    let script = format!(
        "import os, time\nh.connect_uri({uri:?})\nprint('connected', flush=True)\n\
         while not os.path.exists({rel:?}):\n    time.sleep(0.02)\nh.shutdown()\n",
        rel = s(&release)
    );
    let mut holder = Command::new("nbdsh")
        .args(["-c", &script])
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "connected\n");
    let mut waiting = Command::new("qemu-img")
        .args(["info", "--output=json", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the second client was answered while the first held the only slot"
    );
    std::fs::write(&release, b"").unwrap();
    assert!(holder.wait().unwrap().success());
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("virtual-size"));
    srv.stop();
}
