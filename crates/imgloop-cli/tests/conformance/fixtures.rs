//! The fixtures of the conformance suite: images made by qemu-img and
//! qemu-io only.

use crate::common::*;
use std::path::Path;

/// The secret of the encrypted fixture.
pub const SECRET: &str = "secret,id=sec0,data=abc";

/// The fixtures: images made by qemu-img and qemu-io (never by imgloop), so
/// both tools start from the same bytes.
pub fn make_fixtures(dir: &Path) {
    let p = |n: &str| dir.join(n);
    let writes = |fmt: &str, file: &Path, shift: &str| {
        let mut cmds = Vec::new();
        for (pat, off, len) in PATTERN_WRITES {
            cmds.push(format!("write -P {pat} {off} {len}"));
        }
        cmds.push(format!("write -z {shift} 64k"));
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(fmt, file, &cmds).ok();
    };
    for (name, fmt, opts) in [
        ("disk.raw", "raw", ""),
        ("disk.qcow2", "qcow2", ""),
        ("ext.qcow2", "qcow2", "extended_l2=on,cluster_size=128k"),
        ("v2.qcow2", "qcow2", "compat=0.10,cluster_size=4k"),
        ("disk.vhdx", "vhdx", ""),
        ("disk.parallels", "parallels", ""),
        ("disk.qcow", "qcow", ""),
    ] {
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let f = p(name);
        args.extend([s(&f), "8M"]);
        qemu_img(&args).ok();
        writes(fmt, &f, "5M");
    }
    // A compressed copy, a backing chain with a relative backing name, and
    // an image with persistent bitmaps.
    let (src, comp) = (p("disk.qcow2"), p("comp.qcow2"));
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(&comp)]).ok();
    std::fs::copy(p("disk.qcow2"), p("base.qcow2")).unwrap();
    let top = p("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ])
    .ok();
    qemu_io("qcow2", &top, &["write -P 0x77 2M 128k", "write -z 0 4k"]).ok();
    let bm = p("bitmaps.qcow2");
    std::fs::copy(p("disk.qcow2"), &bm).unwrap();
    qemu_img(&["bitmap", "--add", s(&bm), "b0"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "512k", s(&bm), "b1"]).ok();
    qemu_img(&["bitmap", "--disable", s(&bm), "b1"]).ok();
    let inuse = p("inuse.qcow2");
    std::fs::copy(&bm, &inuse).unwrap();
    leave_bitmaps_in_use(&inuse);
    // A damaged image: a leaked cluster (check exits 3) and one with an
    // L2 entry pointing past the end of the file (check exits 2).
    let leak = p("leak.qcow2");
    std::fs::copy(p("disk.qcow2"), &leak).unwrap();
    let len = std::fs::metadata(&leak).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&leak).unwrap();
    f.set_len(len + 65536).unwrap();
    drop(f);
    set_refcount_of_last_cluster(&leak);
    // Not an image at all for formats that need a header.
    std::fs::write(p("junk.bin"), vec![0x5a; 4096]).unwrap();
    // A raw file whose length is not whole sectors.
    std::fs::write(p("odd.raw"), vec![0x3c; 1000]).unwrap();
    // A LUKS-encrypted qcow2 (secret "abc", as SECRET below).
    let luks = p("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&luks),
        "8M",
    ])
    .ok();
    let luks_opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(&luks)
    );
    run_program(
        "qemu-io",
        &[
            "--object",
            SECRET,
            "--image-opts",
            &luks_opts,
            "-c",
            "write -P 0x42 1M 200k",
        ],
    )
    .ok();
    // Internal snapshots: s1, then more data.
    let snap = p("snap.qcow2");
    std::fs::copy(p("disk.qcow2"), &snap).unwrap();
    qemu_img(&["snapshot", "-c", "s1", s(&snap)]).ok();
    qemu_io("qcow2", &snap, &["write -P 0x99 0 1M"]).ok();
}

/// Leaves the enabled bitmaps of `img` marked in use, as a qemu that dies
/// with the image open does: qemu-io opens it (setting the flag on disk),
/// writes, and is killed before it can close.
fn leave_bitmaps_in_use(img: &Path) {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", s(img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "write -P 0x66 6M 64k").unwrap();
    stdin.flush().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "qemu-io ended early");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let info = qemu_img(&["info", "--output=json", "-U", s(img)])
        .ok()
        .stdout;
    assert!(info.contains("in-use"), "{info}");
}

/// Gives the last cluster of a qcow2 file (appended by the caller, and
/// referenced by nothing) a refcount of 1, making it a leak.
fn set_refcount_of_last_cluster(img: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut header = [0u8; 104];
    f.read_exact(&mut header).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().unwrap());
    let be32 = |o: usize| u32::from_be_bytes(header[o..o + 4].try_into().unwrap());
    let cluster_bits = be32(20);
    let cluster = 1u64 << cluster_bits;
    let rt_offset = be64(48);
    let order = be32(96);
    let entry_bytes = (1u64 << order) / 8;
    assert_eq!(entry_bytes, 2, "the default 16-bit refcounts");
    let last = f.metadata().unwrap().len() / cluster - 1;
    let per_block = cluster / entry_bytes;
    let mut rt_entry = [0u8; 8];
    f.seek(SeekFrom::Start(rt_offset + (last / per_block) * 8))
        .unwrap();
    f.read_exact(&mut rt_entry).unwrap();
    let block = u64::from_be_bytes(rt_entry);
    assert_ne!(block, 0, "the refcount block covering the end exists");
    f.seek(SeekFrom::Start(block + (last % per_block) * entry_bytes))
        .unwrap();
    f.write_all(&1u16.to_be_bytes()).unwrap();
}

/// Copies `from` to `to` writing only non-zero 4 KiB blocks, so both
/// copies of a fixture have the same allocation whatever the filesystem.
pub fn sparse_copy(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    let data = std::fs::read(from).unwrap();
    let f = std::fs::File::create(to).unwrap();
    for (i, block) in data.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096).unwrap();
        }
    }
    f.set_len(data.len() as u64).unwrap();
}
