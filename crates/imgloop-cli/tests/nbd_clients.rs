//! `imgloop serve` against more NBD clients: fio's nbd engine writing
//! and verifying at queue depth 16 over several connections, and nbdsh
//! (libnbd's Python shell) driving the odd corners of the protocol
//! directly: FAST_ZERO, CACHE, REQ_ONE block status, DF reads, the
//! errors for out-of-range and read-only requests; nbdcopy filling and
//! reading back every format; the kernel client where the kernel has nbd.

mod common;
use common::nbd::*;
use common::*;
use std::process::Command;

/// Runs an nbdsh script (`h` is a handle not yet connected, `uri` the
/// export); its failures (assertions, unexpected errors) fail the test.
fn nbdsh(uri: &str, script: &str) -> String {
    let full = format!("uri = {uri:?}\n{script}");
    // nbdsh runs `python3 -m nbd`: the system Python has the module.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-c", &full])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdsh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fio_writes_and_verifies_through_the_nbd_engine() {
    let sc = Scratch::new();
    for fmt in ["qcow2", "raw"] {
        let img = sc.path(&format!("f.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&img), "32M"]).ok();
        let srv = Server::start(&sc, &["-t", "-e", "8", "-f", fmt, s(&img)]);
        for (rw, bs) in [("randwrite", "4k"), ("write", "1M"), ("randrw", "64k")] {
            let r = run_program(
                "fio",
                &[
                    "--name=verify",
                    "--ioengine=nbd",
                    &format!("--uri={}", srv.uri("")),
                    &format!("--rw={rw}"),
                    &format!("--bs={bs}"),
                    "--size=16M",
                    "--iodepth=16",
                    "--numjobs=2",
                    "--offset_increment=16M",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--do_verify=1",
                    "--randrepeat=1",
                ],
            );
            assert_eq!(r.code, 0, "fio {fmt} {rw}: {}{}", r.stdout, r.stderr);
            assert!(!r.stdout.contains("verify: bad"), "{}", r.stdout);
        }
        assert!(srv.stop().success());
        if fmt == "qcow2" {
            assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
        }
    }
}

#[test]
fn nbdsh_drives_fast_zero_cache_req_one_and_the_error_replies() {
    let sc = Scratch::new();
    let img = sc.path("n.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]).ok();
    qemu_io("qcow2", &img, &["write -P 3 1M 64k"]).ok();
    let srv = Server::start(&sc, &["-t", "-e", "4", s(&img)]);
    let out = nbdsh(
        &srv.uri(""),
        r#"
import errno
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(uri)
assert h.can_fast_zero() and h.can_cache() and h.can_df() and h.can_multi_conn()
assert h.can_meta_context("base:allocation")
# FAST_ZERO on qcow2 is metadata only: it succeeds and reads as zeroes.
h.pwrite(b"\x01" * 65536, 0)
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 0) == bytes(65536)
# Without NO_HOLE the data cluster may go; with it, zeroes either way.
h.zero(4096, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 1 << 20) == bytes(4096)
assert h.pread(4096, (1 << 20) + 4096) == b"\x03" * 4096
h.cache(1 << 20, 0)
# REQ_ONE: one extent per context, not longer than asked.
seen = {}
def cb(ctx, off, entries, err):
    seen[ctx] = list(entries)
    return 0
h.block_status(2 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert set(seen) == {"base:allocation", "qemu:allocation-depth"}, seen
for ctx, e in seen.items():
    assert len(e) == 2 and 0 < e[0] <= 2 << 20, (ctx, e)
# Without it, the extents cover the range.
seen.clear()
h.block_status(8 << 20, 0, cb)
assert sum(seen["base:allocation"][0::2]) >= 8 << 20, seen
# DF: the data in one chunk.
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, status))
    return 0
buf = h.pread_structured(2 << 20, 0, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][1] == nbd.READ_DATA, chunks
# Past the end: EINVAL, and the connection goes on.
try:
    h.pread(4096, 8 << 20)
    raise AssertionError("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
h.flush()
assert h.pread(4096, (1 << 20) + 8192) == b"\x03" * 4096
print("ok")
"#,
    );
    assert!(out.contains("ok"), "{out}");
    assert!(srv.stop().success());
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    // A read-only export: writes get EPERM, reads work.
    let srv = Server::start(&sc, &["-t", "-r", s(&img)]);
    let out = nbdsh(
        &srv.uri(""),
        r#"
import errno
h.connect_uri(uri)
assert h.is_read_only() and not h.can_trim() and not h.can_zero()
try:
    h.pwrite(b"x" * 512, 0)
    raise AssertionError("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
assert h.pread(4096, (1 << 20) + 8192) == b"\x03" * 4096
print("ok")
"#,
    );
    assert!(out.contains("ok"), "{out}");
    drop(srv);
}

/// A 24 MiB raw source with data, zero runs and holes at varied offsets.
fn mixed_source(sc: &Scratch) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let src = sc.path("mixed.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(24 << 20).unwrap();
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (65536, 200_000),
        (3 << 20, 1 << 20),
        (9 << 20, 512),
        (13 << 20, 3 << 20),
        ((24 << 20) - 8192, 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 * 7 + 1))
            .collect();
        f.write_all_at(&data, off).unwrap();
    }
    src
}

#[test]
fn every_format_round_trips_through_nbdcopy_and_stays_clean() {
    let sc = Scratch::new();
    let src = mixed_source(&sc);
    let want = std::fs::read(&src).unwrap();
    for (fmt, opts) in [
        ("raw", ""),
        ("qcow2", ""),
        ("qcow2", "extended_l2=on,cluster_size=128k"),
        ("qcow2", "compat=0.10"),
        ("vhdx", ""),
        ("vhdx", "block_size=1M,subformat=fixed"),
        ("parallels", ""),
        ("qcow", ""),
        ("cow", ""),
    ] {
        let what = format!("{fmt} {opts}");
        let img = sc.path(&format!("rt-{fmt}-{}.img", opts.len()));
        let mut create = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            create.extend(["-o", opts]);
        }
        // A UML COW file always sits over a backing file: an empty one here.
        let base = sc.path("rt-cow-base.raw");
        if fmt == "cow" {
            std::fs::File::create(&base)
                .unwrap()
                .set_len(24 << 20)
                .unwrap();
            create.extend(["-b", s(&base), "-F", "raw"]);
        }
        create.extend([s(&img), "24M"]);
        imgloop(&create).ok();
        // In with several connections, then out again.
        let srv = Server::start(&sc, &["-t", "-e", "4", "-f", fmt, s(&img)]);
        let r = tool(
            "nbdcopy",
            &["--connections=4", "--requests=8", s(&src), &srv.uri("")],
        );
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        let out = sc.path("rt-out.raw");
        let _ = std::fs::remove_file(&out);
        let r = tool("nbdcopy", &["--connections=2", &srv.uri(""), s(&out)]);
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert!(srv.stop().success(), "{what}: the server exits cleanly");
        assert!(std::fs::read(&out).unwrap() == want, "{what}: read back");
        if fmt == "cow" {
            // qemu has no UML COW driver: uml-utilities' uml_moo merges the
            // file with its backing file, as UML would read it.
            let merged = sc.path("rt-merged.raw");
            let _ = std::fs::remove_file(&merged);
            let r = run_program("uml_moo", &[s(&img), s(&merged)]);
            assert_eq!(r.code, 0, "{what}: uml_moo: {}{}", r.stdout, r.stderr);
            assert!(std::fs::read(&merged).unwrap() == want, "{what}");
        } else {
            let check = qemu_img(&["check", "-f", fmt, s(&img)]);
            assert!(
                // 63: qemu has no check for raw and qcow.
                check.code == 0 || (matches!(fmt, "raw" | "qcow") && check.code == 63),
                "{what}: qemu-img check: {}{}",
                check.stdout,
                check.stderr
            );
            let cmp = qemu_img(&["compare", "-f", fmt, "-F", "raw", s(&img), s(&src)]);
            assert_eq!(cmp.code, 0, "{what}: {}{}", cmp.stdout, cmp.stderr);
        }
    }
}

/// Whether this kernel can give an NBD export a block device, and if not,
/// why.
fn kernel_nbd() -> Result<(), String> {
    if !std::path::Path::new("/sys/module/nbd").exists() {
        let loaded = ["/usr/sbin/modprobe", "/sbin/modprobe"]
            .iter()
            .filter(|p| std::path::Path::new(p).exists())
            .any(|p| {
                Command::new(p)
                    .arg("nbd")
                    .status()
                    .is_ok_and(|s| s.success())
            });
        if !loaded {
            return Err(
                "this kernel has no nbd module (no /sys/module/nbd, modprobe nbd failed)".into(),
            );
        }
    }
    if !std::path::Path::new("/dev/nbd0").exists() {
        return Err("no /dev/nbd0".into());
    }
    if Command::new("nbd-client").arg("-V").output().is_err() {
        return Err("nbd-client is not installed".into());
    }
    Ok(())
}

#[test]
fn the_kernel_client_reads_and_writes_an_export_where_the_kernel_has_nbd() {
    if let Err(why) = kernel_nbd() {
        eprintln!("skipped: the kernel NBD client is not tested here: {why}");
        return;
    }
    let sc = Scratch::new();
    let img = sc.path("k.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "32M"]).ok();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let pid_file = sc.path("k.pid");
    let mut server = Command::new(imgloop_bin())
        .args([
            "serve",
            "-t",
            "-e",
            "4",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            "--pid-file",
            s(&pid_file),
            s(&img),
        ])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !pid_file.exists() {
        assert!(t.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dev = "/dev/nbd0";
    let r = run_program(
        "nbd-client",
        &["-N", "disk", "127.0.0.1", &port, dev, "-b", "4096"],
    );
    assert_eq!(r.code, 0, "nbd-client: {}{}", r.stdout, r.stderr);
    let src = mixed_source(&sc);
    let r = run_program(
        "dd",
        &[
            &format!("if={}", s(&src)),
            &format!("of={dev}"),
            "bs=1M",
            "count=24",
            "oflag=direct",
            "conv=fsync",
        ],
    );
    assert_eq!(r.code, 0, "dd to {dev}: {}", r.stderr);
    let back = sc.path("k-back.raw");
    let r = run_program(
        "dd",
        &[
            &format!("if={dev}"),
            &format!("of={}", s(&back)),
            "bs=1M",
            "count=24",
            "iflag=direct",
        ],
    );
    assert_eq!(r.code, 0, "dd from {dev}: {}", r.stderr);
    let disconnected = run_program("nbd-client", &["-d", dev]);
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    assert_eq!(
        disconnected.code, 0,
        "nbd-client -d: {}",
        disconnected.stderr
    );
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&src)]);
    assert_eq!(cmp.code, 0, "{}", cmp.stdout);
    qemu_img(&["check", s(&img)]).ok();
}

/// Reads of raw exports over plain sockets are spliced from the file
/// (no copy through the server); every kind of read reply must still
/// carry the file's bytes: structured and simple replies, DF, data with
/// holes, reads larger than the pipe, unaligned ranges, reads after
/// writes through the server, and ranges past the end of a file that
/// shrank under the server (zeroes, as qemu's file protocol reads them).
#[test]
fn spliced_read_replies_carry_the_file_bytes() {
    let sc = Scratch::new();
    let img = sc.path("splice.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&img).unwrap();
        let mut x = 0x2545_f491_u32;
        // 8 MiB: data, a 1 MiB hole at 3 MiB, data again.
        for mib in 0..8u64 {
            let block: Vec<u8> = (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            f.seek(SeekFrom::Start(mib << 20)).unwrap();
            if mib != 3 {
                f.write_all(&block).unwrap();
            }
        }
        f.set_len(8 << 20).unwrap();
    }
    let srv = Server::start(&sc, &["-t", "-e", "4", "-f", "raw", s(&img)]);
    let script = format!(
        r#"
import os
path = {path:?}
def file_bytes(off, n):
    with open(path, "rb") as f:
        f.seek(off)
        b = f.read(n)
    return b + bytes(n - len(b))
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
ranges = [(0, 1 << 20), (4097, 65536), (1 << 20, (1 << 20) + 4097),
          (2 << 20, 3 << 20), (7 << 20, 1 << 20), (12345, 200000),
          (3 << 20, 1 << 20), (0, 8 << 20)]
for off, n in ranges:
    assert h.pread(n, off) == file_bytes(off, n), (off, n)
    chunks = []
    def chunk(sub, off2, status, err):
        chunks.append((off2, len(sub)))
        return 0
    got = h.pread_structured(n, off, chunk, nbd.CMD_FLAG_DF)
    assert got == file_bytes(off, n), ("DF", off, n)
    assert chunks == [(off, n)], ("DF: one data chunk", chunks)
# Writes through the server read back at once, spliced.
h.pwrite(b"\xab" * 300000, (5 << 20) + 7)
h.flush()
assert h.pread(1 << 20, 5 << 20) == file_bytes(5 << 20, 1 << 20)
assert h.pread(1 << 20, 5 << 20)[7:300007] == b"\xab" * 300000
# Simple replies.
g = nbd.NBD()
g.set_request_structured_replies(False)
g.connect_uri(uri)
assert not g.get_structured_replies_negotiated()
for off, n in ranges:
    assert g.pread(n, off) == file_bytes(off, n), ("simple", off, n)
# The file shrinks under the server: the part past its end reads as zeroes.
os.truncate(path, (6 << 20) + 100)
for c in (h, g):
    got = c.pread(1 << 20, (6 << 20) - 4096)
    assert got == file_bytes((6 << 20) - 4096, 1 << 20), "shrunk"
    assert got[4196:] == bytes((1 << 20) - 4196)
g.shutdown()
h.shutdown()
print("ok")
"#,
        path = s(&img)
    );
    let out = nbdsh(&srv.uri(""), &script);
    assert!(out.contains("ok"), "{out}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), (6 << 20) + 100);
}
