//! `imgloop serve` against more NBD clients: fio's nbd engine writing
//! and verifying at queue depth 16 over several connections, and nbdsh
//! (libnbd's Python shell) driving the odd corners of the protocol
//! directly: FAST_ZERO, CACHE, REQ_ONE block status, DF reads, the
//! errors for out-of-range and read-only requests.

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
