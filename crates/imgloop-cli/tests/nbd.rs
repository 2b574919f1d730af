//! `imgloop serve` with real NBD clients: qemu-img and qemu-io over Unix
//! sockets and TCP, nbdinfo (`--list`, `--map`, the allocation-depth
//! context) and nbdcopy in both directions with several connections;
//! the same maps as qemu-nbd gives for the same image; read-only exports;
//! hostile clients that break the protocol while others go on being
//! served; durability at SIGTERM; exit after the last client.

mod common;
use common::nbd::*;
use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn image(sc: &Scratch, name: &str) -> PathBuf {
    let img = sc.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]).ok();
    qemu_io(
        "qcow2",
        &img,
        &["write -P 7 1M 1M", "write -z 8M 1M", "write -P 8 20M 100k"],
    )
    .ok();
    img
}

#[test]
fn qemu_tools_read_write_and_map_through_the_server() {
    let sc = Scratch::new();
    let img = image(&sc, "a.qcow2");
    let expect = sc.path("expect.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&expect)]).ok();
    let srv = Server::start(&sc, &["-t", "-e", "4", "--discard=unmap", s(&img)]);
    let uri = srv.uri("");
    let info = qemu_img(&["info", "--output=json", &uri]).ok().json();
    assert_eq!(info["virtual-size"], 64 << 20);
    let out = sc.path("out.raw");
    qemu_img(&["convert", "-O", "raw", &uri, s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&expect).unwrap());
    let r = qemu_img(&["compare", "-f", "raw", "-F", "raw", &uri, s(&expect)]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // Writes, zeroes, discards and flushes through qemu-io.
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 0 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 20M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 9 0 64k",
            "-c",
            "read -P 0 1M 64k",
            &uri,
        ],
    );
    qemu_io(
        "raw",
        &expect,
        &["write -P 9 0 64k", "write -z 1M 64k", "write -z 20M 64k"],
    )
    .ok();
    let map = qemu_img(&["map", "--output=json", &uri]).ok();
    assert!(srv.stop().success());
    // After SIGTERM everything acknowledged is in the image.
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    let r = qemu_img(&["compare", "-F", "raw", s(&img), s(&expect)]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // The same map as qemu-nbd serving the same image.
    let qsock = sc.path("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args(["-r", "-k", s(&qsock), "-f", "qcow2", "-t", s(&img)])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !qsock.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let quri = format!("nbd+unix:///?socket={}", s(&qsock));
    let qmap = qemu_img(&["map", "--output=json", &quri]).ok();
    let srv = Server::start(&sc, &["-r", "-t", s(&img)]);
    let imap = qemu_img(&["map", "--output=json", &srv.uri("")]).ok();
    let _ = q.kill();
    let _ = q.wait();
    assert_eq!(imap.stdout, qmap.stdout, "maps differ from qemu-nbd's");
    drop(srv);
    let _ = map;
}

#[test]
fn nbdinfo_and_nbdcopy_see_every_export_and_copy_both_ways() {
    let sc = Scratch::new();
    let a = image(&sc, "a.qcow2");
    let b = sc.path("b.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&b), "8M"]).ok();
    let b_arg = format!("second={}", s(&b));
    let srv = Server::start(&sc, &["-t", "-e", "8", "-D", "first export", s(&a), &b_arg]);
    let list = tool("nbdinfo", &["--list", &srv.uri("")]).stdout;
    assert!(
        list.contains("export=\"\":") && list.contains("export=\"second\":"),
        "{list}"
    );
    assert!(list.contains("description: first export"));
    assert!(list.contains("base:allocation") && list.contains("qemu:allocation-depth"));
    let map = tool("nbdinfo", &["--map", &srv.uri("")]).stdout;
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
    let depth = tool("nbdinfo", &["--map=qemu:allocation-depth", &srv.uri("")]).stdout;
    assert!(
        depth.contains("local") && depth.contains("absent"),
        "{depth}"
    );
    // nbdcopy out with several connections and requests, then in.
    let out = sc.path("copy.raw");
    tool(
        "nbdcopy",
        &["--connections=4", "--requests=16", &srv.uri(""), s(&out)],
    );
    let direct = sc.path("direct.raw");
    qemu_img(&["convert", "-U", "-O", "raw", s(&a), s(&direct)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&direct).unwrap());
    let src = sc.path("src8.raw");
    std::fs::write(
        &src,
        (0..8u32 << 20)
            .map(|i| (i / 4096) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    tool("nbdcopy", &["--connections=2", s(&src), &srv.uri("second")]);
    assert!(srv.stop().success());
    assert!(std::fs::read(&b).unwrap() == std::fs::read(&src).unwrap());
}

#[test]
fn read_only_exports_refuse_writes_and_tcp_works() {
    let sc = Scratch::new();
    let img = image(&sc, "ro.qcow2");
    let before = std::fs::read(&img).unwrap();
    // A free port: bind, note, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let pid_file = sc.path("serve.pid");
    let mut child = Command::new(imgloop_bin())
        .args([
            "serve",
            "-r",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            &port_s,
            "--pid-file",
            s(&pid_file),
            s(&img),
        ])
        .spawn()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/");
    // The pid file appears once the server listens (a probing connection
    // would take the one client slot).
    let t = Instant::now();
    while !pid_file.exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = tool("nbdinfo", &[&uri]).stdout;
    assert!(info.contains("is_read_only: true"), "{info}");
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || !w.status.success(),
        "{text}"
    );
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 7 1M 1M", &uri],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only export changed the image"
    );
}

/// Reads one option reply: its type and payload.
fn read_reply(c: &mut std::os::unix::net::UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        0x0003_e889_0455_65a9
    );
    let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    c.read_exact(&mut p).unwrap();
    (u32::from_be_bytes(h[12..16].try_into().unwrap()), p)
}

/// Opens a raw connection and reads the server's greeting.
fn connect(sock: &Path) -> std::os::unix::net::UnixStream {
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    c
}

#[test]
fn hostile_clients_are_cut_off_and_others_are_still_served() {
    let sc = Scratch::new();
    let img = image(&sc, "h.qcow2");
    let srv = Server::start(&sc, &["-t", "-e", "16", s(&img)]);
    // 1: a bad option magic.
    let mut c = connect(&srv.socket);
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "not disconnected");
    // 2: an option of 4 GiB: an error reply, then the end.
    let mut c = connect(&srv.socket);
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(b"IHAVEOPT").unwrap();
    c.write_all(&7u32.to_be_bytes()).unwrap();
    c.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).0, (1 << 31) | 9);
    // 3: an unknown option: NBD_REP_ERR_UNSUP, and the client may go on.
    let mut c = connect(&srv.socket);
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(b"IHAVEOPT").unwrap();
    c.write_all(&99u32.to_be_bytes()).unwrap();
    c.write_all(&0u32.to_be_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).0, (1 << 31) | 1);
    // ... then asks for an export that does not exist, then leaves.
    c.write_all(b"IHAVEOPT").unwrap();
    c.write_all(&7u32.to_be_bytes()).unwrap();
    let name = b"nope";
    c.write_all(&(4 + name.len() as u32 + 2).to_be_bytes())
        .unwrap();
    c.write_all(&(name.len() as u32).to_be_bytes()).unwrap();
    c.write_all(name).unwrap();
    c.write_all(&0u16.to_be_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).0, (1 << 31) | 6);
    drop(c);
    // 4: in transmission, a write larger than the maximum: refused before
    // its payload is read, and the connection ends.
    let mut c = connect(&srv.socket);
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(b"IHAVEOPT").unwrap();
    c.write_all(&1u32.to_be_bytes()).unwrap();
    c.write_all(&0u32.to_be_bytes()).unwrap();
    let mut tx = [0u8; 10];
    c.read_exact(&mut tx).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&42u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&(1u32 << 31).to_be_bytes());
    c.write_all(&req).unwrap();
    let mut simple = [0u8; 16];
    c.read_exact(&mut simple).unwrap();
    assert_eq!(
        u32::from_be_bytes(simple[4..8].try_into().unwrap()),
        75,
        "EOVERFLOW"
    );
    assert_eq!(u64::from_be_bytes(simple[8..16].try_into().unwrap()), 42);
    // 5: a read past the end: EINVAL, the connection stays.
    let mut c = connect(&srv.socket);
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(b"IHAVEOPT").unwrap();
    c.write_all(&1u32.to_be_bytes()).unwrap();
    c.write_all(&0u32.to_be_bytes()).unwrap();
    c.read_exact(&mut tx).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&(64u64 << 20).to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    c.write_all(&req).unwrap();
    c.read_exact(&mut simple).unwrap();
    assert_eq!(
        u32::from_be_bytes(simple[4..8].try_into().unwrap()),
        22,
        "EINVAL"
    );
    // 6: a client that disconnects in the middle of a write payload.
    let mut d = connect(&srv.socket);
    d.write_all(&3u32.to_be_bytes()).unwrap();
    d.write_all(b"IHAVEOPT\0\0\0\x01\0\0\0\0").unwrap();
    d.read_exact(&mut tx).unwrap();
    let mut req = req.clone();
    req[6..8].copy_from_slice(&1u16.to_be_bytes());
    req[16..24].copy_from_slice(&0u64.to_be_bytes());
    d.write_all(&req).unwrap();
    d.write_all(&[1u8; 100]).unwrap();
    drop(d);
    // Meanwhile a well-behaved client is served normally.
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 7 1M 1M", &srv.uri("")],
    );
    drop(c);
    assert!(srv.stop().success());
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
}

#[test]
fn without_persistent_the_server_ends_after_its_client() {
    let sc = Scratch::new();
    let img = image(&sc, "p.qcow2");
    let mut srv = Server::start(&sc, &[s(&img)]);
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 3 0 4k", &srv.uri("")],
    );
    let t = Instant::now();
    loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!srv.socket.exists(), "the socket was left behind");
    qemu_io("qcow2", &img, &["read -P 3 0 4k"]).ok();
}
