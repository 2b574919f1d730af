//! The qemu-img conformance suite: a table of invocations, each run through
//! `qemu-img` and `imgloop` on copies of the same images, comparing exit
//! codes, standard output (JSON as values, key order ignored; human output
//! where qemu-img's is stable) and the images the command leaves behind
//! (`qemu-img compare` between the two results, `qemu-img check` of
//! imgloop's, and the image properties `qemu-img info` reports).
//!
//! A difference imgloop keeps on purpose is listed in its row with the
//! reason (the same list is in `docs/QEMU-IMG.md`); such a row asserts that
//! the difference is still there, so the list stays true.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How the standard output of the two tools is compared.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    /// Not compared (timings, dates, progress).
    Ignore,
    /// Parsed as JSON and compared as values.
    Json,
    /// Compared as text.
    Text,
}

/// What a row accepts to differ.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Aspect {
    /// The exit code.
    Exit,
    /// The standard output.
    Stdout,
    /// A resulting image.
    Image,
}

/// One row of the table.
struct Case {
    /// Arguments after the tool's name. `@NAME` stands for the path of
    /// file NAME in the row's directory.
    args: &'static [&'static str],
    /// Fixtures copied into the row's directory first.
    inputs: &'static [&'static str],
    /// How stdout is compared.
    out: Out,
    /// Images the command writes or changes, with their format; compared
    /// when both tools exited 0.
    writes: &'static [(&'static str, &'static str)],
    /// A difference kept on purpose, with its reason.
    differs: Option<(Aspect, &'static str)>,
}

const fn case(args: &'static [&'static str], inputs: &'static [&'static str], out: Out) -> Case {
    Case {
        args,
        inputs,
        out,
        writes: &[],
        differs: None,
    }
}

const fn writes(
    args: &'static [&'static str],
    inputs: &'static [&'static str],
    out: Out,
    writes: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        args,
        inputs,
        out,
        writes,
        differs: None,
    }
}

impl Case {
    /// The row with a difference kept on purpose.
    const fn differs(self, aspect: Aspect, reason: &'static str) -> Case {
        Case {
            differs: Some((aspect, reason)),
            ..self
        }
    }
}

/// The fixtures: images made by qemu-img and qemu-io (never by imgloop), so
/// both tools start from the same bytes.
fn make_fixtures(dir: &Path) {
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
fn sparse_copy(from: &Path, to: &Path) {
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

/// The row's directory for one tool, with its inputs copied in.
fn prepare(root: &Path, fixtures: &Path, tool: &str, row: usize, case: &Case) -> PathBuf {
    let dir = root.join(format!("{row:03}-{tool}"));
    std::fs::create_dir(&dir).unwrap();
    for name in case.inputs {
        sparse_copy(&fixtures.join(name), &dir.join(name));
    }
    dir
}

fn expand(args: &[&str], dir: &Path) -> Vec<String> {
    args.iter()
        .map(|a| {
            let mut out = String::new();
            let mut rest = *a;
            // `@NAME` anywhere in an argument (`if=@x`, `-o backing_file=@b`).
            while let Some(at) = rest.find('@') {
                out.push_str(&rest[..at]);
                let tail = &rest[at + 1..];
                let end = tail.find([',', ' ']).unwrap_or(tail.len());
                out.push_str(dir.join(&tail[..end]).to_str().unwrap());
                rest = &tail[end..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// Output with the row's directory replaced by `DIR`, so the two tools'
/// outputs can be compared.
fn normalize(text: &str, dir: &Path) -> String {
    text.replace(dir.to_str().unwrap(), "DIR")
}

/// What `qemu-img info` says of an image that matters for equality: the
/// properties a command chose, not the bytes it happened to allocate.
fn properties(img: &Path, fmt: &str, dir: &Path) -> Value {
    let r = qemu_img(&["info", "-f", fmt, "--output=json", s(img)]);
    assert_eq!(r.code, 0, "qemu-img info {}: {}", img.display(), r.stderr);
    let v: Value = serde_json::from_str(&normalize(&r.stdout, dir)).unwrap();
    let mut keep = serde_json::Map::new();
    for key in [
        "virtual-size",
        "format",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
        "encrypted",
        "format-specific",
    ] {
        if let Some(x) = v.get(key) {
            keep.insert(key.into(), x.clone());
        }
    }
    Value::Object(keep)
}

/// The bytes a file occupies depend on how the filesystem laid out the
/// copy (an extent tree block more or less), not on the tool: `disk size`
/// lines are compared for presence only.
fn without_disk_size(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("disk size: ") {
            Some(at) if l[..at].trim().is_empty() => &l[..at + 10],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// JSON equality, except that `actual-size` values (see
/// [`without_disk_size`]) may differ by a few filesystem blocks.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, va)| match (k.as_str(), y.get(k)) {
                    ("actual-size", Some(vb)) => match (va.as_u64(), vb.as_u64()) {
                        (Some(m), Some(n)) => m.abs_diff(n) <= 64 * 1024,
                        _ => va == vb,
                    },
                    (_, Some(vb)) => same_json(va, vb),
                    (_, None) => false,
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q))
        }
        _ => a == b,
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_tool(program: &str, args: &[String], dir: &Path) -> Outcome {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_program(program, &refs);
    Outcome {
        code: r.code,
        stdout: normalize(&r.stdout, dir),
        stderr: normalize(&r.stderr, dir),
    }
}

/// Runs one row; returns the aspects that differ, with a description.
fn run_case(root: &Path, fixtures: &Path, row: usize, case: &Case) -> Vec<(Aspect, String)> {
    let dq = prepare(root, fixtures, "qemu", row, case);
    let di = prepare(root, fixtures, "imgloop", row, case);
    let q = run_tool("qemu-img", &expand(case.args, &dq), &dq);
    let i = run_tool(imgloop_bin(), &expand(case.args, &di), &di);
    let mut diffs = Vec::new();
    if q.code != i.code {
        diffs.push((
            Aspect::Exit,
            format!(
                "exit {} (qemu-img) vs {} (imgloop)\nqemu-img: {}{}\nimgloop: {}{}",
                q.code, i.code, q.stdout, q.stderr, i.stdout, i.stderr
            ),
        ));
    }
    if i.code != 0 && !q.stderr.trim().is_empty() && i.stderr.trim().is_empty() {
        diffs.push((Aspect::Exit, "imgloop failed without a message".into()));
    }
    if i.stderr.contains("panicked") {
        diffs.push((Aspect::Exit, format!("imgloop panicked: {}", i.stderr)));
    }
    match case.out {
        Out::Ignore => {}
        Out::Text => {
            if without_disk_size(&q.stdout) != without_disk_size(&i.stdout) {
                diffs.push((
                    Aspect::Stdout,
                    format!("qemu-img:\n{}\nimgloop:\n{}", q.stdout, i.stdout),
                ));
            }
        }
        Out::Json if q.code == 0 || !q.stdout.trim().is_empty() => {
            let parse = |t: &str| serde_json::from_str::<Value>(t).ok();
            let (jq, ji) = (parse(&q.stdout), parse(&i.stdout));
            if jq.is_none() || !same_json(jq.as_ref().unwrap(), ji.as_ref().unwrap_or(&Value::Null))
            {
                diffs.push((
                    Aspect::Stdout,
                    format!("qemu-img:\n{}\nimgloop:\n{}", q.stdout, i.stdout),
                ));
            }
        }
        Out::Json => {}
    }
    if q.code == 0 && i.code == 0 {
        for (name, fmt) in case.writes {
            let (a, b) = (dq.join(name), di.join(name));
            let cmp = qemu_img(&["compare", "-f", fmt, "-F", fmt, s(&a), s(&b)]);
            if cmp.code != 0 {
                diffs.push((
                    Aspect::Image,
                    format!("{name}: qemu-img compare: {}{}", cmp.stdout, cmp.stderr),
                ));
            }
            let check = qemu_img(&["check", "-f", fmt, s(&b)]);
            if check.code != 0 && check.code != 63 {
                diffs.push((
                    Aspect::Image,
                    format!(
                        "{name}: qemu-img check of imgloop's image exits {}: {}",
                        check.code, check.stdout
                    ),
                ));
            }
            let (pa, pb) = (properties(&a, fmt, &dq), properties(&b, fmt, &di));
            if pa != pb {
                diffs.push((
                    Aspect::Image,
                    format!("{name}: properties differ\nqemu-img: {pa}\nimgloop:  {pb}"),
                ));
            }
        }
    }
    diffs
}

/// Runs a table; fails with every row that differs other than as listed.
fn run_table(table: &[Case]) {
    let sc = Scratch::new();
    let fixtures = sc.path("fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    make_fixtures(&fixtures);
    let root = sc.path("rows");
    std::fs::create_dir(&root).unwrap();
    let mut failures = Vec::new();
    for (row, case) in table.iter().enumerate() {
        let diffs = run_case(&root, &fixtures, row, case);
        let what = format!("{:?}", case.args);
        match case.differs {
            None => {
                for (_, d) in diffs {
                    failures.push(format!("{what}: {d}"));
                }
            }
            Some((aspect, reason)) => {
                // A different exit code brings different output with it.
                let covers = |a: Aspect| a == aspect || (aspect == Aspect::Exit && a == Stdout);
                if !diffs.iter().any(|(a, _)| *a == aspect) {
                    failures.push(format!(
                        "{what}: listed as differing in {aspect:?} ({reason}), but it no longer does"
                    ));
                }
                for (a, d) in diffs.into_iter().filter(|(a, _)| !covers(*a)) {
                    failures.push(format!("{what}: {a:?}: {d}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ from qemu-img:\n\n{}",
        failures.len(),
        table.len(),
        failures.join("\n\n")
    );
}

use Aspect::Stdout;
use Out::{Ignore, Json, Text};

const EXTRA_INFO: &str = "imgloop adds a format-specific section (and, for parallels, the \
     cluster size and dirty flag) where qemu's driver reports none; qemu-img's keys and \
     values are all there";
const RAW_SIZE: &str = "qemu-img rounds a raw file's size up to whole sectors; imgloop \
     keeps the exact file length, so a copy has the same bytes as the file";
const CHECK_NO_KEY: &str = "qemu-img refuses to check an encrypted image without its key; \
     imgloop's check reads only metadata and needs none";
const MEASURE_NO_SECRET: &str = "qemu-img wants the secret to measure a LUKS target; the \
     sizes do not depend on the key, so imgloop measures without it";
const AMEND_BITMAPS: &str = "qemu-img downgrades to compat=0.10 and leaks the persistent \
     bitmaps' clusters; imgloop refuses until the bitmaps are removed";
const QCOW_COMPRESSED: &str = "qemu-img 10's `convert -c -O qcow` exits 1 without a \
     message; imgloop writes the compressed qcow image, which qemu-img reads back identically";
const DD_SKIP: &str = "qemu-img dd prints the error of a skip past the end but exits 0; \
     imgloop exits 1";
const VHDX_MAP: &str = "qemu's vhdx driver has no block status and reports every byte as \
     data without an offset; imgloop reports the block allocation table, offsets included";

const ALL: &[&str] = &[
    "disk.raw",
    "disk.qcow2",
    "ext.qcow2",
    "v2.qcow2",
    "disk.vhdx",
    "disk.parallels",
    "disk.qcow",
    "comp.qcow2",
    "base.qcow2",
    "top.qcow2",
    "bitmaps.qcow2",
    "inuse.qcow2",
    "leak.qcow2",
    "junk.bin",
    "odd.raw",
    "luks.qcow2",
    "snap.qcow2",
];

/// The secret of the encrypted fixture.
const SECRET: &str = "secret,id=sec0,data=abc";

/// Commands that only look: info, map, check, compare, measure, bitmap
/// listings.
const INSPECT: &[Case] = &[
    case(&["info", "--output=json", "@disk.raw"], ALL, Json),
    case(&["info", "--output=json", "@disk.qcow2"], ALL, Json),
    case(&["info", "--output=json", "@ext.qcow2"], ALL, Json),
    case(&["info", "--output=json", "@v2.qcow2"], ALL, Json),
    case(&["info", "--output=json", "@disk.vhdx"], ALL, Json).differs(Stdout, EXTRA_INFO),
    case(&["info", "--output=json", "@disk.parallels"], ALL, Json).differs(Stdout, EXTRA_INFO),
    case(&["info", "--output=json", "@disk.qcow"], ALL, Json),
    case(&["info", "--output=json", "@comp.qcow2"], ALL, Json),
    case(&["info", "--output=json", "@top.qcow2"], ALL, Json),
    case(
        &["info", "--output=json", "--backing-chain", "@top.qcow2"],
        ALL,
        Json,
    ),
    case(&["info", "--output=json", "@bitmaps.qcow2"], ALL, Json),
    case(
        &["info", "-f", "raw", "--output=json", "@disk.qcow2"],
        ALL,
        Json,
    ),
    case(&["info", "@disk.raw"], ALL, Text),
    case(&["info", "@disk.qcow2"], ALL, Text),
    case(&["info", "@top.qcow2"], ALL, Text),
    case(&["info", "@bitmaps.qcow2"], ALL, Text),
    case(&["info", "--backing-chain", "@top.qcow2"], ALL, Text),
    case(&["info", "@ext.qcow2"], ALL, Text),
    case(&["info", "@v2.qcow2"], ALL, Text),
    case(&["info", "@comp.qcow2"], ALL, Text),
    case(&["info", "@disk.vhdx"], ALL, Text).differs(Stdout, EXTRA_INFO),
    case(&["info", "@disk.parallels"], ALL, Text).differs(Stdout, EXTRA_INFO),
    case(&["info", "@disk.qcow"], ALL, Text),
    case(&["info", "-U", "--output=json", "@disk.qcow2"], ALL, Json),
    case(&["info", "-f", "qcow2", "@disk.raw"], ALL, Ignore),
    case(&["info", "@missing.qcow2"], ALL, Ignore),
    case(&["map", "--output=json", "@disk.raw"], ALL, Json),
    case(&["map", "--output=json", "@disk.qcow2"], ALL, Json),
    case(&["map", "--output=json", "@ext.qcow2"], ALL, Json),
    case(&["map", "--output=json", "@v2.qcow2"], ALL, Json),
    case(&["map", "--output=json", "@disk.vhdx"], ALL, Json).differs(Stdout, VHDX_MAP),
    case(&["map", "--output=json", "@disk.parallels"], ALL, Json),
    case(&["map", "--output=json", "@disk.qcow"], ALL, Json),
    case(&["map", "--output=json", "@comp.qcow2"], ALL, Json),
    case(&["map", "--output=json", "@top.qcow2"], ALL, Json),
    case(
        &[
            "map",
            "--output=json",
            "--start-offset",
            "1M",
            "--max-length",
            "2M",
            "@top.qcow2",
        ],
        ALL,
        Json,
    ),
    case(&["map", "@disk.qcow2"], ALL, Text),
    case(&["map", "@top.qcow2"], ALL, Text),
    case(&["map", "@comp.qcow2"], ALL, Text),
    case(&["map", "@disk.raw"], ALL, Text),
    case(&["map", "@ext.qcow2"], ALL, Text),
    case(&["map", "@disk.parallels"], ALL, Text),
    case(&["map", "@disk.qcow"], ALL, Text),
    case(&["map", "--output=json", "@bitmaps.qcow2"], ALL, Json),
    case(&["check", "@disk.qcow2"], ALL, Text),
    case(&["check", "--output=json", "@disk.qcow2"], ALL, Json),
    case(&["check", "--output=json", "@comp.qcow2"], ALL, Json),
    case(&["check", "--output=json", "@ext.qcow2"], ALL, Json),
    case(&["check", "--output=json", "@v2.qcow2"], ALL, Json),
    case(&["check", "--output=json", "@bitmaps.qcow2"], ALL, Json),
    case(&["check", "--output=json", "@leak.qcow2"], ALL, Json),
    case(&["check", "@leak.qcow2"], ALL, Text),
    case(&["check", "-q", "@leak.qcow2"], ALL, Text),
    case(&["check", "@disk.vhdx"], ALL, Text),
    case(&["check", "@disk.parallels"], ALL, Text),
    case(&["check", "@disk.raw"], ALL, Text),
    case(&["check", "@disk.qcow"], ALL, Text),
    case(&["check", "--output=json", "@disk.vhdx"], ALL, Json),
    case(&["check", "--output=json", "@disk.parallels"], ALL, Json),
    case(&["check", "--output=json", "@top.qcow2"], ALL, Json),
    case(&["check", "-f", "qcow2", "@junk.bin"], ALL, Text),
    case(&["compare", "@disk.raw", "@disk.qcow2"], ALL, Text),
    case(&["compare", "@disk.raw", "@disk.vhdx"], ALL, Text),
    case(&["compare", "@disk.qcow2", "@comp.qcow2"], ALL, Text),
    case(&["compare", "@disk.qcow2", "@top.qcow2"], ALL, Text),
    case(&["compare", "-s", "@disk.qcow2", "@ext.qcow2"], ALL, Text),
    case(&["compare", "-q", "@base.qcow2", "@top.qcow2"], ALL, Text),
    case(
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "@disk.raw",
            "@disk.qcow2",
        ],
        ALL,
        Text,
    ),
    case(&["compare", "@disk.raw", "@missing.raw"], ALL, Ignore),
    case(
        &["measure", "--output=json", "--size", "1G", "-O", "qcow2"],
        &[],
        Json,
    ),
    case(
        &[
            "measure",
            "--output=json",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
        ],
        &[],
        Json,
    ),
    case(
        &["measure", "--output=json", "-O", "qcow2", "@disk.raw"],
        ALL,
        Json,
    ),
    case(
        &["measure", "--output=json", "-O", "qcow2", "@top.qcow2"],
        ALL,
        Json,
    ),
    case(
        &["measure", "--output=json", "-O", "raw", "@disk.qcow2"],
        ALL,
        Json,
    ),
    case(
        &["measure", "--output=json", "-O", "qcow2", "@bitmaps.qcow2"],
        ALL,
        Json,
    ),
    case(&["measure", "--size", "1G", "-O", "qcow2"], &[], Text),
    case(&["snapshot", "-l", "@disk.qcow2"], ALL, Text),
    case(&["snapshot", "-l", "@disk.raw"], ALL, Text),
    case(&["compare", "@disk.qcow2", "@disk.vhdx"], ALL, Text),
    case(
        &["compare", "-s", "@disk.raw", "@disk.parallels"],
        ALL,
        Text,
    ),
    case(&["compare", "@disk.qcow", "@v2.qcow2"], ALL, Text),
    case(&["bench", "-c", "16", "-q", "@disk.qcow2"], ALL, Ignore),
    case(
        &["bench", "-c", "16", "-w", "-q", "@disk.qcow2"],
        ALL,
        Ignore,
    ),
    case(&["info", "--output=json", "@odd.raw"], ALL, Json).differs(Stdout, RAW_SIZE),
    case(&["info", "--output=json", "@luks.qcow2"], ALL, Json),
    case(&["info", "@luks.qcow2"], ALL, Text),
    case(&["check", "@luks.qcow2"], ALL, Text).differs(Aspect::Exit, CHECK_NO_KEY),
    case(
        &[
            "check",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
        ],
        ALL,
        Json,
    ),
    case(
        &[
            "map",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
        ],
        ALL,
        Json,
    ),
    case(
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
            "driver=raw,file.filename=@disk.raw",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "--size",
            "1G",
        ],
        &[],
        Json,
    ),
    case(
        &[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            "--size",
            "1G",
        ],
        &[],
        Json,
    )
    .differs(Aspect::Exit, MEASURE_NO_SECRET),
    case(&["info", "--output=json", "@snap.qcow2"], ALL, Json),
    case(&["info", "@snap.qcow2"], ALL, Text),
    case(&["snapshot", "-l", "@snap.qcow2"], ALL, Text),
    case(
        &[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-l",
            "s1",
            "@snap.qcow2",
        ],
        ALL,
        Json,
    ),
];

/// Commands that write a new image.
const MAKE: &[Case] = &[
    writes(
        &["create", "-f", "raw", "@new.raw", "1000"],
        &[],
        Text,
        &[("new.raw", "raw")],
    ),
    writes(
        &["create", "-f", "qcow2", "@new.qcow2", "1G"],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,lazy_refcounts=on",
            "@new.qcow2",
            "64M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,compression_type=zstd",
            "@new.qcow2",
            "64M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=16",
            "@new.qcow2",
            "10M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "@new.qcow2",
        ],
        ALL,
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "@new.qcow2",
            "16M",
        ],
        ALL,
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &["create", "-f", "vhdx", "@new.vhdx", "64M"],
        &[],
        Ignore,
        &[("new.vhdx", "vhdx")],
    ),
    writes(
        &["create", "-f", "parallels", "@new.parallels", "64M"],
        &[],
        Text,
        &[("new.parallels", "parallels")],
    ),
    writes(
        &["create", "-f", "qcow", "@new.qcow", "64M"],
        &[],
        Text,
        &[("new.qcow", "qcow")],
    ),
    case(&["create", "-f", "qcow2", "@new.qcow2"], &[], Ignore),
    case(&["create", "-f", "qcow2", "@new.qcow2", "-5"], &[], Ignore),
    case(&["create", "-f", "qcow2", "@new.qcow2", "1Z"], &[], Ignore),
    case(
        &["create", "-f", "nosuchformat", "@new.img", "1M"],
        &[],
        Ignore,
    ),
    case(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "@new.qcow2",
            "1M",
        ],
        &[],
        Ignore,
    ),
    case(
        &["create", "-f", "qcow2", "-o", "bogus=1", "@new.qcow2", "1M"],
        &[],
        Ignore,
    ),
    case(
        &["create", "-f", "qcow2", "-b", "base.qcow2", "@new.qcow2"],
        ALL,
        Ignore,
    ),
    writes(
        &["convert", "-O", "raw", "@disk.qcow2", "@out.raw"],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &["convert", "-O", "qcow2", "@disk.raw", "@out.qcow2"],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16k,extended_l2=on",
            "@disk.vhdx",
            "@out.qcow2",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &["convert", "-O", "vhdx", "@disk.qcow2", "@out.vhdx"],
        ALL,
        Text,
        &[("out.vhdx", "vhdx")],
    ),
    writes(
        &[
            "convert",
            "-O",
            "parallels",
            "@disk.qcow2",
            "@out.parallels",
        ],
        ALL,
        Text,
        &[("out.parallels", "parallels")],
    ),
    writes(
        &["convert", "-O", "qcow", "@disk.parallels", "@out.qcow"],
        ALL,
        Text,
        &[("out.qcow", "qcow")],
    ),
    writes(
        &["convert", "-O", "qcow2", "@top.qcow2", "@out.qcow2"],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "@top.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &["convert", "-c", "-O", "qcow2", "@disk.raw", "@out.qcow2"],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &["convert", "-S", "0", "-O", "raw", "@disk.qcow", "@out.raw"],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &[
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "@comp.qcow2",
            "@out.raw",
        ],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    case(
        &["convert", "-O", "raw", "@missing.qcow2", "@out.raw"],
        ALL,
        Ignore,
    ),
    case(
        &["convert", "-O", "nosuchformat", "@disk.raw", "@out.raw"],
        ALL,
        Ignore,
    ),
    case(
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "@junk.bin",
            "@out.raw",
        ],
        ALL,
        Ignore,
    ),
    writes(
        &[
            "dd",
            "-O",
            "raw",
            "if=@disk.qcow2",
            "of=@out.raw",
            "bs=64k",
            "count=20",
            "skip=2",
        ],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &[
            "dd",
            "-f",
            "vhdx",
            "-O",
            "qcow2",
            "if=@disk.vhdx",
            "of=@out.qcow2",
            "bs=1M",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    case(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "raw",
            "@new.qcow2",
        ],
        ALL,
        Ignore,
    ),
    case(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "@new.qcow2",
            "-F",
            "qcow2",
            "@new.qcow2",
        ],
        ALL,
        Ignore,
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=@data.raw,data_file_raw=on",
            "@new.qcow2",
            "4M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=fixed,block_size=1M",
            "@new.vhdx",
            "4M",
        ],
        &[],
        Text,
        &[("new.vhdx", "vhdx")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "@new.qcow2",
            "4M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "@new.raw",
            "1M",
        ],
        &[],
        Text,
        &[("new.raw", "raw")],
    ),
    writes(
        &[
            "convert",
            "-O",
            "raw",
            "--target-is-zero",
            "-n",
            "@disk.qcow2",
            "@disk.raw",
        ],
        ALL,
        Text,
        &[("disk.raw", "raw")],
    ),
    writes(
        &["convert", "-O", "qcow2", "@bitmaps.qcow2", "@out.qcow2"],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &[
            "convert",
            "-m",
            "1",
            "-W",
            "-O",
            "qcow2",
            "@ext.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    case(
        &["convert", "-O", "raw", "@disk.qcow2", "@disk.qcow2"],
        ALL,
        Ignore,
    ),
    writes(
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "@bitmaps.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "@inuse.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    case(
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "@inuse.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "@bitmaps.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "@disk.raw",
            "@out.qcow2",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "convert",
            "--bitmaps",
            "-O",
            "raw",
            "@bitmaps.qcow2",
            "@out.raw",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "@bitmaps.qcow2",
            "@out.qcow2",
        ],
        ALL,
        Text,
    ),
    writes(
        &["convert", "-C", "-O", "raw", "@disk.raw", "@out.raw"],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &["convert", "-C", "-O", "qcow2", "@disk.vhdx", "@out.qcow2"],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    case(
        &[
            "convert",
            "-C",
            "-c",
            "-O",
            "qcow2",
            "@disk.raw",
            "@out.qcow2",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "convert",
            "-C",
            "-S",
            "64k",
            "-O",
            "raw",
            "@disk.raw",
            "@out.raw",
        ],
        ALL,
        Text,
    ),
    case(
        &[
            "convert",
            "-C",
            "--salvage",
            "-O",
            "raw",
            "@disk.raw",
            "@out.raw",
        ],
        ALL,
        Text,
    ),
    case(&["info", "--output=json", "-U", "@inuse.qcow2"], ALL, Json),
    case(&["check", "--output=json", "@inuse.qcow2"], ALL, Json),
    // The copies differ in length (see RAW_SIZE), but qemu-img, rounding
    // both up, sees the same image.
    writes(
        &["convert", "-O", "raw", "@odd.raw", "@out.raw"],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
            "-O",
            "raw",
            "@out.raw",
        ],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &[
            "convert",
            "-l",
            "s1",
            "-O",
            "raw",
            "@snap.qcow2",
            "@out.raw",
        ],
        ALL,
        Text,
        &[("out.raw", "raw")],
    ),
    writes(
        &["convert", "-O", "qcow2", "@snap.qcow2", "@out.qcow2"],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    case(
        &["dd", "if=@disk.raw", "of=@out.raw", "bs=1M", "skip=100"],
        ALL,
        Text,
    )
    .differs(Aspect::Exit, DD_SKIP),
    writes(
        &[
            "create",
            "-f",
            "parallels",
            "-o",
            "cluster_size=64k",
            "@new.parallels",
            "8M",
        ],
        &[],
        Text,
        &[("new.parallels", "parallels")],
    ),
    writes(
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "log_size=2M,block_state_zero=off",
            "@new.vhdx",
            "8M",
        ],
        &[],
        Text,
        &[("new.vhdx", "vhdx")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow",
            "-b",
            "disk.raw",
            "-F",
            "raw",
            "@new.qcow",
        ],
        ALL,
        Text,
        &[("new.qcow", "qcow")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "@new.qcow2",
            "4M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=falloc",
            "@new.raw",
            "4M",
        ],
        &[],
        Text,
        &[("new.raw", "raw")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "@new.qcow2",
            "64M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    writes(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=64",
            "@new.qcow2",
            "64M",
        ],
        &[],
        Text,
        &[("new.qcow2", "qcow2")],
    ),
    case(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "@new.qcow2",
            "1M",
        ],
        &[],
        Ignore,
    ),
    case(
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=bogus",
            "@new.vhdx",
            "1M",
        ],
        &[],
        Ignore,
    ),
    case(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=256",
            "@new.qcow2",
            "1M",
        ],
        &[],
        Ignore,
    ),
    writes(
        &[
            "convert",
            "-O",
            "vhdx",
            "-o",
            "subformat=fixed",
            "@disk.qcow2",
            "@out.vhdx",
        ],
        ALL,
        Text,
        &[("out.vhdx", "vhdx")],
    ),
    writes(
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "@disk.vhdx",
            "@out.qcow2",
        ],
        ALL,
        Text,
        &[("out.qcow2", "qcow2")],
    ),
    writes(
        &["convert", "-c", "-O", "qcow", "@disk.raw", "@out.qcow"],
        ALL,
        Text,
        &[("out.qcow", "qcow")],
    )
    .differs(Aspect::Exit, QCOW_COMPRESSED),
];

/// Commands that change an image in place.
const CHANGE: &[Case] = &[
    writes(
        &["resize", "@disk.raw", "+1M"],
        ALL,
        Text,
        &[("disk.raw", "raw")],
    ),
    writes(
        &["resize", "@disk.qcow2", "16M"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["resize", "--shrink", "@disk.qcow2", "4M"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    case(&["resize", "@disk.qcow2", "4M"], ALL, Ignore),
    writes(
        &["resize", "@bitmaps.qcow2", "20M"],
        ALL,
        Text,
        &[("bitmaps.qcow2", "qcow2")],
    ),
    writes(
        &["check", "-r", "leaks", "@leak.qcow2"],
        ALL,
        Text,
        &[("leak.qcow2", "qcow2")],
    ),
    writes(
        &["check", "-r", "all", "--output=json", "@leak.qcow2"],
        ALL,
        Json,
        &[("leak.qcow2", "qcow2")],
    ),
    writes(
        &["amend", "-o", "compat=0.10", "@disk.qcow2"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["amend", "-o", "lazy_refcounts=on", "@disk.qcow2"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["amend", "-o", "refcount_bits=4", "@v2.qcow2"],
        ALL,
        Text,
        &[("v2.qcow2", "qcow2")],
    ),
    case(
        &["amend", "-o", "cluster_size=4k", "@disk.qcow2"],
        ALL,
        Ignore,
    ),
    writes(
        &["bitmap", "--add", "-g", "128k", "@disk.qcow2", "new"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["bitmap", "--remove", "@bitmaps.qcow2", "b0"],
        ALL,
        Text,
        &[("bitmaps.qcow2", "qcow2")],
    ),
    writes(
        &["bitmap", "--enable", "@bitmaps.qcow2", "b1"],
        ALL,
        Text,
        &[("bitmaps.qcow2", "qcow2")],
    ),
    case(
        &["bitmap", "--remove", "@bitmaps.qcow2", "nosuch"],
        ALL,
        Ignore,
    ),
    writes(
        &["snapshot", "-c", "s1", "@disk.qcow2"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    case(&["snapshot", "-d", "nosuch", "@disk.qcow2"], ALL, Ignore),
    case(&["snapshot", "-a", "nosuch", "@disk.qcow2"], ALL, Ignore),
    writes(
        &["commit", "@top.qcow2"],
        ALL,
        Text,
        &[("base.qcow2", "qcow2")],
    ),
    writes(
        &["commit", "-d", "@top.qcow2"],
        ALL,
        Text,
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    ),
    writes(
        &["rebase", "-b", "", "@top.qcow2"],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    writes(
        &[
            "rebase",
            "-u",
            "-b",
            "disk.qcow2",
            "-F",
            "qcow2",
            "@top.qcow2",
        ],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    writes(
        &["rebase", "-b", "ext.qcow2", "-F", "qcow2", "@top.qcow2"],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    case(
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "@top.qcow2"],
        ALL,
        Ignore,
    ),
    writes(
        &["rebase", "-c", "-b", "", "@top.qcow2"],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    case(&["rebase", "-c", "-u", "-b", "", "@disk.vhdx"], ALL, Text),
    writes(
        &["commit", "-b", "@base.qcow2", "@top.qcow2"],
        ALL,
        Text,
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    ),
    case(&["commit", "-b", "@disk.qcow2", "@top.qcow2"], ALL, Text),
    case(&["commit", "@disk.qcow2"], ALL, Text),
    writes(
        &["snapshot", "-a", "s1", "@snap.qcow2"],
        ALL,
        Text,
        &[("snap.qcow2", "qcow2")],
    ),
    writes(
        &["snapshot", "-d", "s1", "@snap.qcow2"],
        ALL,
        Text,
        &[("snap.qcow2", "qcow2")],
    ),
    case(&["snapshot", "-c", "s1", "@snap.qcow2"], ALL, Text),
    case(&["amend", "-o", "compat=0.10", "@bitmaps.qcow2"], ALL, Text)
        .differs(Aspect::Exit, AMEND_BITMAPS),
    writes(
        &[
            "amend",
            "--object",
            SECRET,
            "--object",
            "secret,id=sec1,data=def",
            "-o",
            "encrypt.new-secret=sec1,encrypt.keyslot=1,encrypt.state=active,encrypt.iter-time=10",
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
        ],
        ALL,
        Text,
        &[],
    ),
    writes(
        &[
            "resize",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
            "+1M",
        ],
        ALL,
        Text,
        &[],
    ),
];

/// Usage errors and bad arguments.
const USAGE: &[Case] = &[
    case(&["info", "--bogus", "@disk.raw"], ALL, Text),
    case(&["bogus"], &[], Text),
    case(&[], &[], Text),
    case(&["info"], &[], Text),
    case(&["info", "--output", "xml", "@disk.raw"], ALL, Text),
    case(&["check", "-r", "some", "@disk.qcow2"], ALL, Text),
    case(&["convert", "@disk.raw"], ALL, Text),
    case(&["compare", "@disk.raw"], ALL, Text),
    case(&["map", "--start-offset", "x", "@disk.raw"], ALL, Text),
    case(&["resize", "@disk.raw"], ALL, Text),
    case(&["create", "-f", "qcow2"], &[], Text),
    case(&["dd", "if=@disk.raw"], ALL, Text),
    case(&["dd", "bs=0", "if=@disk.raw", "of=@out.raw"], ALL, Text),
    case(&["measure", "-O", "qcow2"], &[], Text),
    case(&["bitmap", "@disk.qcow2", "b"], ALL, Text),
    case(&["snapshot", "@disk.qcow2"], ALL, Text),
];

#[test]
fn inspecting_commands_behave_as_qemu_img() {
    run_table(INSPECT);
}

#[test]
fn commands_that_make_images_behave_as_qemu_img() {
    run_table(MAKE);
}

#[test]
fn commands_that_change_images_behave_as_qemu_img() {
    run_table(CHANGE);
}

#[test]
fn usage_errors_behave_as_qemu_img() {
    run_table(USAGE);
}
