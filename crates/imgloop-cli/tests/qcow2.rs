//! qcow2: interop with qemu-img/qemu-io in both directions, across the
//! format's options (versions, cluster sizes, refcount widths, extended L2,
//! compression types, preallocation, external data files, backing chains).
//!
//! Direction (a): qemu-img creates, qemu-io writes; imgloop must read the
//! same bytes, map and describe the image like qemu-img, and never change a
//! byte of it when opening read-only. Direction (b): imgloop creates and
//! writes; `qemu-img check` must find the image clean and `qemu-img compare`
//! must find it equal to a twin qemu-io wrote with the same commands.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Virtual size of the matrix images.
const SIZE: u64 = 4 << 20;

/// The option sets of the matrix: a name for messages and the `-o` string,
/// where `@` stands for the absolute path of the case's external data file.
const CASES: &[(&str, &str)] = &[
    ("v2", "compat=0.10"),
    ("v2-512", "compat=0.10,cluster_size=512"),
    ("v3", "compat=1.1"),
    ("512", "cluster_size=512"),
    ("4k-rc1", "cluster_size=4k,refcount_bits=1"),
    ("2M", "cluster_size=2M"),
    ("rc2", "refcount_bits=2"),
    ("rc4", "refcount_bits=4"),
    ("rc8", "refcount_bits=8"),
    ("rc32", "refcount_bits=32"),
    ("1k-rc64", "cluster_size=1k,refcount_bits=64"),
    ("lazy", "lazy_refcounts=on"),
    ("extl2", "extended_l2=on"),
    ("extl2-16k", "extended_l2=on,cluster_size=16k"),
    ("zstd", "compression_type=zstd"),
    ("prealloc-metadata", "preallocation=metadata"),
    ("prealloc-falloc", "preallocation=falloc,cluster_size=4k"),
    ("prealloc-full", "preallocation=full"),
    ("datafile", "data_file=@"),
    ("datafile-raw", "data_file=@,data_file_raw=on"),
    ("datafile-extl2", "data_file=@,extended_l2=on"),
    ("datafile-prealloc", "data_file=@,preallocation=metadata"),
];

/// The commands both tools run on matrix images: patterns, unaligned and
/// partial-cluster writes, zero writes with and without unmap, zero writes
/// on unallocated clusters, discards (whole and partial clusters), writes
/// into discarded space, and the last bytes of the disk.
const SCRIPT: &[&str] = &[
    "write -P 0x11 0 4k",
    "write -P 0x22 1000 3000",
    "write -P 0x33 64k 64k",
    "write -P 0x44 300k 300k",
    "write -P 0x55 1M 1M",
    "write -z 1100k 200k",
    "write -z -u 1536k 128k",
    "write -z 2560k 64k",
    "discard 64k 64k",
    "write -P 0x66 3M 1M",
    "discard 3200k 256k",
    "write -P 0x77 4092k 4k",
    "write -P 0x88 3300k 10k",
];

fn case_opts(opts: &str, sc: &Scratch, tag: &str) -> (String, Option<PathBuf>) {
    if opts.contains('@') {
        let data = sc.path(&format!("{tag}.data"));
        (opts.replace('@', s(&data)), Some(data))
    } else {
        (opts.to_string(), None)
    }
}

fn qemu_create(img: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(img), size]);
    qemu_img(&args).ok();
}

fn imgloop_create(img: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(img), size]);
    imgloop(&args).ok();
}

/// Expected guest content after `script` on a zeroed disk: `None` where a
/// discard left the content up to the image (zeroes or the old data).
fn model(script: &[&str], size: u64) -> Vec<Option<u8>> {
    let mut disk = vec![Some(0u8); size as usize];
    for cmd in script {
        let w: Vec<&str> = cmd.split_whitespace().collect();
        let num = |s: &str| imgloop::size::parse_size(s).unwrap() as usize;
        let (off, len) = (num(w[w.len() - 2]), num(w[w.len() - 1]));
        let v = match (w[0], w[1]) {
            ("write", "-P") => Some(u8::from_str_radix(&w[2][2..], 16).unwrap()),
            ("write", "-z") => Some(0),
            ("discard", _) => None,
            _ => panic!("model does not know '{cmd}'"),
        };
        disk[off..off + len].fill(v);
    }
    disk
}

/// `read -P` commands that verify every byte the model knows.
fn read_checks(model: &[Option<u8>]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < model.len() {
        let v = model[i];
        let mut j = i + 1;
        while j < model.len() && model[j] == v {
            j += 1;
        }
        if let Some(b) = v {
            out.push(format!("read -P {b:#04x} {i} {}", j - i));
        }
        i = j;
    }
    out
}

fn assert_reads_model(img: &Path, expect: &[Option<u8>], what: &str) {
    let checks = read_checks(expect);
    let cmds: Vec<&str> = checks.iter().map(String::as_str).collect();
    let mut args = vec!["io", "-q", "-r", "-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    let r = imgloop(&args);
    assert_eq!(r.code, 0, "{what}: pattern verification: {}", r.stderr);
}

fn qemu_map(img: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["map", "--output=json", "-f", "qcow2"];
    args.extend(extra);
    args.push(s(img));
    qemu_img(&args).ok().json()
}

fn our_map(img: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["map", "--output", "json", "-f", "qcow2"];
    args.extend(extra);
    args.push(s(img));
    imgloop(&args).ok().json()
}

fn assert_maps_like_qemu(img: &Path, extra: &[&str], what: &str) {
    let theirs = qemu_map(img, extra);
    let ours = our_map(img, extra);
    assert_eq!(
        ours, theirs,
        "{what}: imgloop map {extra:?} differs from qemu-img map"
    );
}

/// The map without host offsets, neighbours of one kind merged: what the
/// guest sees of allocation, independent of where data sits in the file.
fn map_shape(map: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for e in map.as_array().unwrap() {
        let mut e = e.clone();
        e.as_object_mut().unwrap().remove("offset");
        let same_kind = out.last().is_some_and(|l: &Value| {
            ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| l[k] == e[k])
        });
        if same_kind {
            let last = out.last_mut().unwrap();
            let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
            last["length"] = len.into();
        } else {
            out.push(e);
        }
    }
    out
}

/// The `info` fields both tools must agree on.
fn info_fields(v: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for k in [
        "virtual-size",
        "format",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
        "format-specific",
        "dirty-flag",
    ] {
        if let Some(x) = v.get(k) {
            out.insert(k.into(), x.clone());
        }
    }
    Value::Object(out)
}

fn qemu_info(img: &Path) -> Value {
    qemu_img(&["info", "--output=json", "-f", "qcow2", s(img)])
        .ok()
        .json()
}

fn our_info(img: &Path) -> Value {
    imgloop(&["info", "--output", "json", "-f", "qcow2", s(img)])
        .ok()
        .json()
}

fn assert_info_like_qemu(img: &Path, what: &str) {
    let theirs = info_fields(&qemu_info(img));
    let ours = info_fields(&our_info(img));
    assert_eq!(
        ours, theirs,
        "{what}: imgloop info differs from qemu-img info"
    );
}

fn qemu_check(img: &Path) -> Run {
    qemu_img(&["check", "-f", "qcow2", s(img)])
}

fn assert_qemu_check_clean(img: &Path, what: &str) {
    let c = qemu_check(img);
    assert_eq!(
        c.code, 0,
        "{what}: qemu-img check:\n{}{}",
        c.stdout, c.stderr
    );
}

fn assert_our_check_clean(img: &Path, what: &str) {
    let c = imgloop(&["check", "-f", "qcow2", s(img)]);
    assert_eq!(
        c.code, 0,
        "{what}: imgloop check:\n{}{}",
        c.stdout, c.stderr
    );
}

fn bytes_of(files: &[&Path]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

// ---------------------------------------------------------------------------
// Direction (a): qemu writes, imgloop reads.

#[test]
fn qemu_written_images_of_every_option_set_read_map_and_describe_like_qemu() {
    let sc = Scratch::new();
    let expect = model(SCRIPT, SIZE);
    for &(name, opts) in CASES {
        let what = format!("case {name} ({opts})");
        let img = sc.path(&format!("a-{name}.qcow2"));
        let (opts, data) = case_opts(opts, &sc, &format!("a-{name}"));
        qemu_create(&img, &opts, "4M");
        qemu_io("qcow2", &img, SCRIPT).ok();

        let mut files = vec![img.as_path()];
        if let Some(d) = &data {
            files.push(d);
        }
        let before = bytes_of(&files);

        assert_reads_like_qemu(&sc, "qcow2", &img);
        assert_reads_model(&img, &expect, &what);
        assert_maps_like_qemu(&img, &[], &what);
        assert_maps_like_qemu(
            &img,
            &["--start-offset", "100k", "--max-length", "1500k"],
            &what,
        );
        assert_info_like_qemu(&img, &what);
        assert_our_check_clean(&img, &what);
        let cmp = imgloop(&["compare", "-f", "qcow2", "-F", "qcow2", s(&img), s(&img)]);
        assert_eq!(cmp.code, 0, "{what}: {}", cmp.stderr);

        // None of that changed a byte of the image or its data file.
        assert!(
            bytes_of(&files) == before,
            "{what}: a read-only open changed the image"
        );
        assert_qemu_check_clean(&img, &what);
    }
}

// ---------------------------------------------------------------------------
// Direction (b): imgloop creates and writes, qemu checks and compares.

#[test]
fn imgloop_written_images_of_every_option_set_pass_qemu_check_and_equal_the_qemu_twin() {
    let sc = Scratch::new();
    let expect = model(SCRIPT, SIZE);
    for &(name, opts) in CASES {
        let what = format!("case {name} ({opts})");
        let ours = sc.path(&format!("b-{name}.qcow2"));
        let twin = sc.path(&format!("b-{name}-twin.qcow2"));
        let (our_opts, our_data) = case_opts(opts, &sc, &format!("b-{name}"));
        let (twin_opts, twin_data) = case_opts(opts, &sc, &format!("b-{name}-twin"));
        imgloop_create(&ours, &our_opts, "4M");
        qemu_create(&twin, &twin_opts, "4M");

        // The options are recorded as qemu-img records them.
        let mut ours_info = info_fields(&qemu_info(&ours));
        let mut twin_info = info_fields(&qemu_info(&twin));
        for v in [&mut ours_info, &mut twin_info] {
            v["format-specific"]["data"]
                .as_object_mut()
                .unwrap()
                .remove("data-file");
        }
        assert_eq!(
            ours_info, twin_info,
            "{what}: created image differs in info"
        );

        imgloop_io("qcow2", &ours, SCRIPT).ok();
        qemu_io("qcow2", &twin, SCRIPT).ok();

        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        assert_our_check_clean(&ours, &what);
        assert_reads_model(&ours, &expect, &what);
        // Allocation, zero flags and discards land where qemu puts them.
        assert_eq!(
            map_shape(&qemu_map(&ours, &[])),
            map_shape(&qemu_map(&twin, &[])),
            "{what}: allocation differs from qemu's"
        );
        // Both tools describe and map imgloop's image the same way.
        assert_maps_like_qemu(&ours, &[], &what);
        assert_info_like_qemu(&ours, &what);
        if opts.contains("data_file_raw=on") {
            // Both raw data files are the guest disk, byte for byte.
            let (a, b) = (our_data.as_ref().unwrap(), twin_data.as_ref().unwrap());
            let cmp = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(a), s(b)]);
            assert_eq!(cmp.code, 0, "{what}: raw data files differ: {}", cmp.stdout);
        }
    }
}

#[test]
fn preallocation_modes_allocate_like_qemu() {
    let sc = Scratch::new();
    for (mode, full_file) in [("metadata", false), ("falloc", true), ("full", true)] {
        let what = format!("preallocation={mode}");
        let ours = sc.path(&format!("p-{mode}.qcow2"));
        imgloop_create(&ours, &format!("preallocation={mode}"), "4M");
        assert_qemu_check_clean(&ours, &what);
        // Every guest cluster is mapped to a host cluster.
        let map = qemu_map(&ours, &[]);
        let all = map.as_array().unwrap();
        assert!(
            all.iter()
                .all(|e| e["present"] == true && e.get("offset").is_some()),
            "{what}: not every cluster is preallocated: {map}"
        );
        assert_maps_like_qemu(&ours, &[], &what);
        let size = std::fs::metadata(&ours).unwrap().len();
        assert!(size >= SIZE, "{what}: file is only {size} bytes");
        if full_file {
            assert!(allocated(&ours) >= SIZE, "{what}: space not reserved");
        } else {
            assert!(allocated(&ours) < SIZE, "{what}: data area allocated");
        }
        // The preallocated clusters are written in place and read back.
        imgloop_io("qcow2", &ours, &["write -P 0x5a 100k 200k"]).ok();
        assert_eq!(
            std::fs::metadata(&ours).unwrap().len(),
            size,
            "{what}: file grew"
        );
        imgloop_io(
            "qcow2",
            &ours,
            &["read -P 0x5a 100k 200k", "read -P 0 300k 100k"],
        )
        .ok();
        assert_qemu_check_clean(&ours, &what);
    }
}

// ---------------------------------------------------------------------------
// Compressed clusters.

/// A source disk with compressible text, an incompressible (random) cluster
/// run, zeroes, and a partial last run.
fn compressible_source(path: &Path) {
    let mut b = Vec::with_capacity(4 << 20);
    for i in 0..(3 << 20) / 16 {
        b.extend_from_slice(format!("line {i:>10}\n").as_bytes());
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..(256 << 10) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.push(x as u8);
    }
    b.resize((3 << 20) + (768 << 10), 0);
    b.extend(std::iter::repeat_n(0x3c, 256 << 10));
    std::fs::write(path, b).unwrap();
}

fn compressed_entries(map: &Value) -> usize {
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["compressed"] == true)
        .count()
}

#[test]
fn compressed_images_interoperate_for_zlib_and_zstd_at_every_cluster_size() {
    let sc = Scratch::new();
    let src = sc.path("src.raw");
    compressible_source(&src);
    const EDITS: &[&str] = &[
        "write -P 0x99 100k 10k",
        "write -z 200k 64k",
        "discard 1M 1M",
        "write -P 0x98 4000k 1000",
    ];
    for ct in ["zlib", "zstd"] {
        for cs in ["512", "4k", "64k", "2M", "32k,extended_l2=on"] {
            let what = format!("compression_type={ct},cluster_size={cs}");
            let opts = what.clone();

            // (a) qemu compresses, imgloop reads.
            let theirs = sc.path(&format!("c-{}-qemu.qcow2", opts.replace([',', '='], "-")));
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &opts,
                s(&src),
                s(&theirs),
            ])
            .ok();
            assert!(compressed_entries(&qemu_map(&theirs, &[])) > 0, "{what}");
            let before = std::fs::read(&theirs).unwrap();
            assert_reads_like_qemu(&sc, "qcow2", &theirs);
            assert_maps_like_qemu(&theirs, &[], &what);
            assert_info_like_qemu(&theirs, &what);
            assert!(
                std::fs::read(&theirs).unwrap() == before,
                "{what}: read-only open changed the image"
            );

            // (b) imgloop compresses, qemu checks and compares.
            let ours = sc.path(&format!("c-{}-ours.qcow2", opts.replace([',', '='], "-")));
            imgloop(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &opts,
                s(&src),
                s(&ours),
            ])
            .ok();
            assert_qemu_accepts("qcow2", &ours, &src, "raw");
            let map = qemu_map(&ours, &[]);
            assert!(
                compressed_entries(&map) > 0,
                "{what}: nothing compressed: {map}"
            );
            assert_eq!(
                qemu_info(&ours)["format-specific"]["data"]["compression-type"],
                ct,
                "{what}"
            );
            // Packed as densely as qemu packs it: the same deflate
            // parameters, streams spanning host cluster boundaries.
            let (ours_len, theirs_len) = (
                std::fs::metadata(&ours).unwrap().len(),
                std::fs::metadata(&theirs).unwrap().len(),
            );
            assert!(
                ours_len <= theirs_len,
                "{what}: imgloop's compressed image has {ours_len} bytes, qemu's {theirs_len}"
            );
            // The same image whatever the number of workers.
            let single = sc.path(&format!("c-{}-m1.qcow2", opts.replace([',', '='], "-")));
            imgloop(&[
                "convert",
                "-c",
                "-m",
                "1",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &opts,
                s(&src),
                s(&single),
            ])
            .ok();
            assert!(
                std::fs::read(&single).unwrap() == std::fs::read(&ours).unwrap(),
                "{what}: convert -c -m 1 and the default worker count give different images"
            );

            // Writes into compressed clusters (copy-on-write out of the
            // compressed stream), zeroes and discards, by both tools on
            // both images.
            let theirs_twin = sc.path(&format!(
                "c-{}-qemu-twin.qcow2",
                opts.replace([',', '='], "-")
            ));
            std::fs::copy(&theirs, &theirs_twin).unwrap();
            imgloop_io("qcow2", &theirs, EDITS).ok();
            qemu_io("qcow2", &theirs_twin, EDITS).ok();
            assert_qemu_accepts("qcow2", &theirs, &theirs_twin, "qcow2");
            let ours_twin = sc.path(&format!(
                "c-{}-ours-twin.qcow2",
                opts.replace([',', '='], "-")
            ));
            std::fs::copy(&ours, &ours_twin).unwrap();
            imgloop_io("qcow2", &ours, EDITS).ok();
            qemu_io("qcow2", &ours_twin, EDITS).ok();
            assert_qemu_accepts("qcow2", &ours, &ours_twin, "qcow2");
            assert_qemu_accepts("qcow2", &ours, &theirs, "qcow2");
            assert_our_check_clean(&ours, &what);
        }
    }
}

#[test]
fn convert_to_qcow2_with_options_gives_clean_equal_images() {
    let sc = Scratch::new();
    let src = sc.path("conv-src.qcow2");
    qemu_create(&src, "cluster_size=4k", "4M");
    qemu_io("qcow2", &src, SCRIPT).ok();
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=512,refcount_bits=1",
        "extended_l2=on",
        "cluster_size=2M",
        "preallocation=metadata",
        "lazy_refcounts=on,refcount_bits=64",
    ] {
        let dst = sc.path("conv-dst.qcow2");
        let _ = std::fs::remove_file(&dst);
        let mut args = vec!["convert", "-f", "qcow2", "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&dst)]);
        imgloop(&args).ok();
        assert_qemu_accepts("qcow2", &dst, &src, "qcow2");
        let c = qemu_img(&[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            s(&src),
            s(&dst),
        ]);
        assert_eq!(c.code, 0, "-o {opts}");
    }
}

// ---------------------------------------------------------------------------
// Backing chains.

/// raw base (6M) <- mid.qcow2 (8M, v3) <- top.qcow2 (8M, with `top_opts`),
/// all written by qemu-io. Returns the top image.
fn qemu_chain(sc: &Scratch, tag: &str, top_opts: &str) -> PathBuf {
    let base = sc.path(&format!("{tag}-base.raw"));
    let mid = sc.path(&format!("{tag}-mid.qcow2"));
    let top = sc.path(&format!("{tag}-top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "6M"]).ok();
    qemu_io("raw", &base, &["write -P 0x77 0 5M", "write -P 0x78 5M 1M"]).ok();
    let base_name = format!("{tag}-base.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &base_name,
        "-F",
        "raw",
        s(&mid),
        "8M",
    ])
    .ok();
    qemu_io(
        "qcow2",
        &mid,
        &[
            "write -P 0x12 1M 100k",
            "write -z 2M 64k",
            "discard 3M 64k",
            "write -P 0x13 7M 64k",
        ],
    )
    .ok();
    let mid_name = format!("{tag}-mid.qcow2");
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-b", &mid_name, "-F", "qcow2",
    ];
    if !top_opts.is_empty() {
        args.extend(["-o", top_opts]);
    }
    args.push(s(&top));
    qemu_img(&args).ok();
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x34 1030k 5k",
            "write -P 0x35 5M 1k",
            "write -z 2100k 4k",
            "write -P 0x36 4M 10k",
        ],
    )
    .ok();
    top
}

#[test]
fn qemu_written_backing_chains_read_map_and_describe_like_qemu() {
    let sc = Scratch::new();
    for (i, top_opts) in ["", "extended_l2=on", "compat=0.10", "cluster_size=4k"]
        .into_iter()
        .enumerate()
    {
        let what = format!("top -o '{top_opts}'");
        let top = qemu_chain(&sc, &format!("ch{i}"), top_opts);
        assert_reads_like_qemu(&sc, "qcow2", &top);
        // Mapped up to 6M, where the raw base ends (for what lies past it,
        // see `overlays_larger_than_their_backing_map_like_qemu`).
        assert_maps_like_qemu(&top, &["--max-length", "6M"], &what);
        assert_maps_like_qemu(
            &top,
            &["--start-offset", "1000k", "--max-length", "3M"],
            &what,
        );
        assert_info_like_qemu(&top, &what);
        // The whole chain, image by image.
        let theirs = qemu_img(&["info", "--output=json", "--backing-chain", s(&top)])
            .ok()
            .json();
        let ours = imgloop(&["info", "--output", "json", "--backing-chain", s(&top)])
            .ok()
            .json();
        let (theirs, ours) = (theirs.as_array().unwrap(), ours.as_array().unwrap());
        assert_eq!(ours.len(), 3, "{what}");
        for (a, b) in ours.iter().zip(theirs) {
            assert_eq!(info_fields(a), info_fields(b), "{what}: --backing-chain");
        }
        assert_eq!(ours[0]["backing-filename-format"], "qcow2");
        assert_eq!(ours[1]["backing-filename-format"], "raw");
        // Reads through the chain, verified per layer.
        let mut args = vec!["io", "-r", "-f", "qcow2"];
        for c in [
            "read -P 0x77 0 1M",
            "read -P 0x12 1M 6k",
            "read -P 0x34 1030k 5k",
            "read -P 0x12 1035k 89k",
            "read -P 0x77 1124k 924k",
            "read -P 0 2M 64k",
            "read -P 0 2100k 4k",
            "read -P 0x36 4M 10k",
            "read -P 0x35 5M 1k",
            "read -P 0x78 5121k 1023k",
            "read -P 0 6M 1M",
            "read -P 0x13 7M 64k",
        ] {
            args.extend(["-c", c]);
        }
        args.push(s(&top));
        let r = imgloop(&args);
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
    }
}

#[test]
fn overlays_larger_than_their_backing_map_like_qemu() {
    let sc = Scratch::new();
    let top = qemu_chain(&sc, "big", "");
    assert_maps_like_qemu(&top, &[], "overlay larger than its backing");
    let mid = sc.path("big-mid.qcow2");
    assert_maps_like_qemu(&mid, &[], "overlay larger than its backing");
}

#[test]
fn imgloop_written_overlays_copy_on_write_from_the_backing_image_like_qemu() {
    let sc = Scratch::new();
    let base = sc.path("cow-base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]).ok();
    qemu_io("raw", &base, &["write -P 0x61 0 4M"]).ok();
    let mid = sc.path("cow-mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "cow-base.raw",
        "-F",
        "raw",
        s(&mid),
    ])
    .ok();
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 0x62 64k 64k", "write -z 1M 128k"],
    )
    .ok();
    const EDITS: &[&str] = &[
        "write -P 0x01 1000 100",
        "write -P 0x02 70k 3k",
        "write -P 0x03 130k 64k",
        "write -P 0x04 1100k 2k",
        "write -z 2M 64k",
        "write -z 2200k 6k",
        "discard 3M 128k",
        "write -P 0x05 4000k 96k",
    ];
    // Every backing-file option form, over a qcow2 and over a raw backing.
    let forms = [
        "-b cow-mid.qcow2 -F qcow2",
        "-o backing_file=cow-mid.qcow2,backing_fmt=qcow2",
        "-b cow-mid.qcow2 -F qcow2 -o extended_l2=on",
        "-b cow-base.raw -F raw -o extended_l2=on,cluster_size=16k",
        "-b cow-base.raw -F raw -o compat=0.10,cluster_size=512",
    ];
    for (i, form) in forms.iter().enumerate() {
        let what = format!("overlay {form}");
        let ours = sc.path(&format!("cow-{i}.qcow2"));
        let twin = sc.path(&format!("cow-{i}-twin.qcow2"));
        for (img, tool) in [(&ours, imgloop as fn(&[&str]) -> Run), (&twin, qemu_img)] {
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            a.extend(form.split_whitespace());
            a.push(s(img));
            tool(&a).ok();
        }
        assert_eq!(
            info_fields(&qemu_info(&ours)),
            info_fields(&qemu_info(&twin)),
            "{what}: created image differs in info"
        );
        imgloop_io("qcow2", &ours, EDITS).ok();
        qemu_io("qcow2", &twin, EDITS).ok();
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        assert_our_check_clean(&ours, &what);
        // Copy-on-write copies what qemu copies, and no more: the same
        // ranges are allocated in the overlay (subclusters included).
        assert_eq!(
            map_shape(&qemu_map(&ours, &[])),
            map_shape(&qemu_map(&twin, &[])),
            "{what}: allocation differs from qemu's"
        );
        assert_maps_like_qemu(&ours, &[], &what);
        assert_info_like_qemu(&ours, &what);
    }
}

// ---------------------------------------------------------------------------
// Growth of metadata: L1 table (resize), refcount blocks and table.

fn header(img: &Path) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    b.truncate(4096);
    b
}

#[test]
fn resize_grows_the_l1_table_and_shrink_frees_clusters_like_qemu() {
    let sc = Scratch::new();
    for opts in [
        "cluster_size=512",
        "cluster_size=512,extended_l2=off,compat=0.10",
        "cluster_size=16k,extended_l2=on",
        "data_file=@,data_file_raw=on",
        "data_file=@,extended_l2=on",
    ] {
        let what = format!("-o {opts}");
        let ours = sc.path("rs.qcow2");
        let twin = sc.path("rs-twin.qcow2");
        let (our_opts, our_data) = case_opts(opts, &sc, "rs");
        let (twin_opts, twin_data) = case_opts(opts, &sc, "rs-twin");
        for f in [&ours, &twin] {
            let _ = std::fs::remove_file(f);
        }
        imgloop_create(&ours, &our_opts, "4M");
        qemu_create(&twin, &twin_opts, "4M");
        const BEFORE: &[&str] = &["write -P 0x21 0 1M", "write -P 0x22 3M 1M"];
        imgloop_io("qcow2", &ours, BEFORE).ok();
        qemu_io("qcow2", &twin, BEFORE).ok();
        let h0 = header(&ours);
        imgloop(&["resize", "-q", "-f", "qcow2", s(&ours), "40M"]).ok();
        qemu_img(&["resize", "-q", "-f", "qcow2", s(&twin), "40M"]).ok();
        let h1 = header(&ours);
        if opts.starts_with("cluster_size=512") {
            assert!(be32(&h1, 36) > be32(&h0, 36), "{what}: L1 did not grow");
            assert_ne!(be64(&h1, 40), be64(&h0, 40), "{what}: L1 table not moved");
        }
        assert_eq!(be64(&h1, 24), 40 << 20, "{what}: size field");
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        const AFTER: &[&str] = &[
            "write -P 0x23 39M 1M",
            "write -P 0x24 20M 64k",
            "write -P 0x25 3900k 200k",
        ];
        imgloop_io("qcow2", &ours, AFTER).ok();
        qemu_io("qcow2", &twin, AFTER).ok();
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        assert_our_check_clean(&ours, &what);
        // Shrinking frees every cluster past the new end: no leaks.
        imgloop(&["resize", "-q", "--shrink", "-f", "qcow2", s(&ours), "3M"]).ok();
        qemu_img(&["resize", "-q", "--shrink", "-f", "qcow2", s(&twin), "3M"]).ok();
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        assert_eq!(qemu_info(&ours)["virtual-size"], 3 << 20);
        if let (Some(a), Some(b)) = (our_data, twin_data) {
            // The data file follows the disk size; a raw one is the disk.
            assert_eq!(std::fs::metadata(&a).unwrap().len(), 3 << 20, "{what}");
            if opts.contains("data_file_raw=on") {
                let cmp = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&a), s(&b)]);
                assert_eq!(cmp.code, 0, "{what}: raw data files differ");
            }
        }
    }
    // imgloop resizes an image qemu made, and qemu keeps using it.
    let theirs = sc.path("rs-qemu.qcow2");
    qemu_create(&theirs, "cluster_size=512", "1M");
    qemu_io("qcow2", &theirs, &["write -P 0x31 0 1M"]).ok();
    imgloop(&["resize", "-q", "-f", "qcow2", s(&theirs), "+15M"]).ok();
    qemu_io(
        "qcow2",
        &theirs,
        &[
            "write -P 0x32 15M 1M",
            "read -P 0x31 0 1M",
            "read -P 0 1M 14M",
        ],
    )
    .ok();
    assert_qemu_check_clean(&theirs, "resized qemu image");
}

#[test]
fn writes_grow_the_refcount_table_and_new_refcount_blocks_cover_themselves() {
    let sc = Scratch::new();
    // (options, the refcount table must move): with 512-byte clusters and
    // 64-bit refcounts one block covers 32 KiB and the first table 2 MiB.
    for (opts, table_moves) in [
        ("cluster_size=512,refcount_bits=64", true),
        ("cluster_size=512,refcount_bits=32", true),
        ("cluster_size=512", false),
        ("cluster_size=4k,refcount_bits=64", false),
        (
            "cluster_size=512,refcount_bits=64,extended_l2=off,compat=1.1,lazy_refcounts=on",
            true,
        ),
    ] {
        let what = format!("-o {opts}");
        let ours = sc.path("rc.qcow2");
        let twin = sc.path("rc-twin.qcow2");
        for f in [&ours, &twin] {
            let _ = std::fs::remove_file(f);
        }
        imgloop_create(&ours, opts, "6M");
        qemu_create(&twin, opts, "6M");
        let h0 = header(&ours);
        const FILL: &[&str] = &[
            "write -P 0x41 0 2M",
            "write -P 0x42 2M 3M",
            "write -P 0x43 5200k 100k",
        ];
        imgloop_io("qcow2", &ours, FILL).ok();
        qemu_io("qcow2", &twin, FILL).ok();
        let h1 = header(&ours);
        if table_moves {
            assert_ne!(
                be64(&h1, 48),
                be64(&h0, 48),
                "{what}: refcount table did not move"
            );
            assert!(
                be32(&h1, 56) > be32(&h0, 56),
                "{what}: refcount table did not grow"
            );
        }
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        assert_our_check_clean(&ours, &what);

        // Discard frees clusters (refcounts drop: no leaks), and later
        // allocations reuse the space instead of growing the file.
        imgloop_io("qcow2", &ours, &["discard 2M 3M"]).ok();
        qemu_io("qcow2", &twin, &["discard 2M 3M"]).ok();
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        let len = std::fs::metadata(&ours).unwrap().len();
        imgloop_io("qcow2", &ours, &["write -P 0x44 2M 2M"]).ok();
        qemu_io("qcow2", &twin, &["write -P 0x44 2M 2M"]).ok();
        let grown = std::fs::metadata(&ours).unwrap().len().saturating_sub(len);
        assert!(
            grown < 256 << 10,
            "{what}: the file grew by {grown} bytes instead of reusing freed clusters"
        );
        assert_qemu_accepts("qcow2", &ours, &twin, "qcow2");
        assert_our_check_clean(&ours, &what);
    }
}

// ---------------------------------------------------------------------------
// Header extensions, feature bits, read-only safety.

/// A header cluster split into its parts, for editing.
struct HeaderParts {
    fixed: Vec<u8>,
    exts: Vec<(u32, Vec<u8>)>,
    backing: Option<Vec<u8>>,
    end: usize,
}

fn parse_header(b: &[u8]) -> HeaderParts {
    let version = be32(b, 4);
    let hlen = if version >= 3 {
        be32(b, 100) as usize
    } else {
        72
    };
    let mut pos = hlen;
    let mut exts = Vec::new();
    loop {
        let kind = be32(b, pos);
        let len = be32(b, pos + 4) as usize;
        if kind == 0 {
            pos += 8;
            break;
        }
        exts.push((kind, b[pos + 8..pos + 8 + len].to_vec()));
        pos = (pos + 8 + len).div_ceil(8) * 8;
    }
    let boff = be64(b, 8) as usize;
    let backing = (boff != 0).then(|| b[boff..boff + be32(b, 16) as usize].to_vec());
    let end = backing.as_ref().map_or(pos, |n| boff + n.len());
    HeaderParts {
        fixed: b[..hlen].to_vec(),
        exts,
        backing,
        end,
    }
}

fn write_header(img: &Path, h: &HeaderParts) {
    let mut b = h.fixed.clone();
    for (kind, data) in &h.exts {
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b.extend_from_slice(&[0; 8]);
    if let Some(n) = &h.backing {
        let off = b.len() as u64;
        b[8..16].copy_from_slice(&off.to_be_bytes());
        b.extend_from_slice(n);
    }
    let old_end = h.end;
    b.resize(b.len().max(old_end), 0);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&b, 0).unwrap();
}

const UNKNOWN_EXT: u32 = 0x1a2b_3c4d;

#[test]
fn header_extensions_are_read_and_unknown_ones_survive_header_rewrites() {
    let sc = Scratch::new();
    let base = sc.path("hx-base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]).ok();
    qemu_io("raw", &base, &["write -P 0x51 0 4M"]).ok();
    for opts in ["compat=1.1", "compat=0.10"] {
        let what = format!("-o {opts}");
        let img = sc.path("hx.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "hx-base.raw",
            "-F",
            "raw",
            s(&img),
        ])
        .ok();
        qemu_io("qcow2", &img, &["write -P 0x52 64k 4k"]).ok();
        let mut h = parse_header(&std::fs::read(&img).unwrap());
        h.exts
            .insert(0, (UNKNOWN_EXT, b"imgloop keeps this".to_vec()));
        write_header(&img, &h);
        assert_qemu_check_clean(&img, &what);
        assert_info_like_qemu(&img, &what);
        assert_reads_like_qemu(&sc, "qcow2", &img);

        // A resize and a write rewrite the header: every extension stays,
        // in order, with the backing file name after them.
        imgloop(&["resize", "-q", "-f", "qcow2", s(&img), "+1M"]).ok();
        imgloop_io("qcow2", &img, &["write -P 0x53 4M 64k"]).ok();
        let after = parse_header(&std::fs::read(&img).unwrap());
        let kinds = |p: &HeaderParts| p.exts.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(kinds(&after), kinds(&h), "{what}: extensions changed");
        assert_eq!(after.exts, h.exts, "{what}: extension data changed");
        assert_eq!(
            after.backing.as_deref(),
            Some(&b"hx-base.raw"[..]),
            "{what}"
        );
        assert_qemu_check_clean(&img, &what);
        assert_info_like_qemu(&img, &what);
        qemu_io(
            "qcow2",
            &img,
            &[
                "read -P 0x51 0 64k",
                "read -P 0x52 64k 4k",
                "read -P 0x53 4M 64k",
            ],
        )
        .ok();
    }
}

#[test]
fn the_feature_name_table_names_unknown_incompatible_features_and_they_are_refused() {
    let sc = Scratch::new();
    let img = sc.path("feat.qcow2");
    qemu_create(&img, "", "1M");
    let mut h = parse_header(&std::fs::read(&img).unwrap());
    let table = h
        .exts
        .iter_mut()
        .find(|e| e.0 == 0x6803_f857)
        .expect("feature table");
    let mut entry = [0u8; 48];
    entry[1] = 13;
    entry[2..22].copy_from_slice(b"imgloop test feature");
    table.1.extend_from_slice(&entry);
    h.fixed[72..80].copy_from_slice(&(1u64 << 13).to_be_bytes());
    write_header(&img, &h);
    let before = std::fs::read(&img).unwrap();
    let q = qemu_img(&["info", s(&img)]);
    assert_ne!(q.code, 0);
    assert!(q.stderr.contains("imgloop test feature"), "{}", q.stderr);
    for args in [
        vec!["info", s(&img)],
        vec!["io", "-c", "read 0 512", s(&img)],
    ] {
        let r = imgloop(&args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(
            r.stderr.contains("'imgloop test feature'"),
            "{args:?}: {}",
            r.stderr
        );
    }
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn read_only_opens_never_change_a_byte_even_of_dirty_images() {
    let sc = Scratch::new();
    // A lazy-refcounts image left dirty by a crash (qemu-io's abort).
    let dirty = sc.path("dirty.qcow2");
    qemu_create(&dirty, "lazy_refcounts=on", "4M");
    let r = qemu_io(
        "qcow2",
        &dirty,
        &["write -P 0x42 0 1M", "write -P 0x43 3M 100k", "abort"],
    );
    assert_ne!(r.code, 0, "qemu-io abort should crash");
    assert_eq!(qemu_info(&dirty)["dirty-flag"], true);
    // An image with an autoclear bit imgloop does not know.
    let autoclear = sc.path("autoclear.qcow2");
    qemu_create(&autoclear, "", "4M");
    qemu_io("qcow2", &autoclear, &["write -P 0x44 0 64k"]).ok();
    let mut h = parse_header(&std::fs::read(&autoclear).unwrap());
    h.fixed[88..96].copy_from_slice(&(1u64 << 40).to_be_bytes());
    write_header(&autoclear, &h);

    let reads: [(&PathBuf, &[&str]); 2] = [
        (&dirty, &["read -P 0x42 0 1M", "read -P 0x43 3M 100k"]),
        (&autoclear, &["read -P 0x44 0 64k", "read -P 0 64k 64k"]),
    ];
    for (img, patterns) in reads {
        let what = img.display().to_string();
        let before = std::fs::read(img).unwrap();
        assert_info_like_qemu(img, &what);
        assert_maps_like_qemu(img, &[], &what);
        // The check finds what qemu-img's finds (the dirty image's
        // refcounts are behind), and repairs nothing.
        let ours = imgloop(&["check", "-f", "qcow2", s(img)]).code;
        assert_eq!(ours, qemu_check(img).code, "{what}: check result");
        imgloop(&["compare", "-f", "qcow2", "-F", "qcow2", s(img), s(img)]).ok();
        let raw = sc.path("ro.raw");
        imgloop(&["convert", "-f", "qcow2", "-O", "raw", s(img), s(&raw)]).ok();
        for flags in [&["-r"][..], &["-r", "-U"]] {
            let mut args = vec!["io", "-f", "qcow2"];
            args.extend(flags);
            for c in patterns {
                args.extend(["-c", c]);
            }
            args.push(s(img));
            imgloop(&args).ok();
        }
        assert!(
            std::fs::read(img).unwrap() == before,
            "{what}: a read-only open changed it"
        );
    }
    // A read-write open repairs the dirty image's refcounts.
    imgloop_io(
        "qcow2",
        &dirty,
        &["read -P 0x42 0 1M", "read -P 0x43 3M 100k"],
    )
    .ok();
    assert_eq!(qemu_info(&dirty)["dirty-flag"], false);
    assert_qemu_check_clean(&dirty, "repaired dirty image");
    // A read-write open clears the unknown autoclear bit, as the spec asks.
    imgloop_io("qcow2", &autoclear, &["read -P 0x44 0 64k"]).ok();
    assert_eq!(be64(&header(&autoclear), 88), 0);
    assert_qemu_check_clean(&autoclear, "autoclear");
}

#[test]
fn bitmaps_are_listed_like_qemu_and_writes_are_recorded_in_enabled_ones() {
    let sc = Scratch::new();
    let img = sc.path("bm.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io("qcow2", &img, &["write -P 0x61 0 1M"]).ok();
    qemu_img(&["bitmap", "--add", s(&img), "bm0"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "128k", s(&img), "second"]).ok();
    qemu_img(&["bitmap", "--disable", s(&img), "second"]).ok();
    qemu_io("qcow2", &img, &["write -P 0x62 2M 64k"]).ok();
    let before = std::fs::read(&img).unwrap();
    assert_info_like_qemu(&img, "two bitmaps");
    assert_reads_like_qemu(&sc, "qcow2", &img);
    assert_maps_like_qemu(&img, &[], "bitmaps");
    assert!(std::fs::read(&img).unwrap() == before);
    // imgloop records guest writes in the enabled bitmap, as qemu does;
    // the disabled one stays as it was.
    imgloop_io("qcow2", &img, &["write -P 0x63 3M 64k"]).ok();
    let h = header(&img);
    assert_eq!(be64(&h, 88) & 1, 1, "bitmaps autoclear bit cleared");
    assert_qemu_check_clean(&img, "bitmaps after an imgloop write");
    assert_eq!(
        common::nbd::qemu_bitmap_ranges(&sc, &img, "bm0"),
        vec![(2 << 20, 64 << 10), (3 << 20, 64 << 10)]
    );
    assert!(common::nbd::qemu_bitmap_ranges(&sc, &img, "second").is_empty());
    qemu_io(
        "qcow2",
        &img,
        &[
            "read -P 0x61 0 1M",
            "read -P 0x62 2M 64k",
            "read -P 0x63 3M 64k",
        ],
    )
    .ok();
}

#[test]
fn imgloop_check_counts_the_clusters_of_every_bitmap() {
    let sc = Scratch::new();
    let img = sc.path("bmc.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io("qcow2", &img, &["write -P 0x61 0 4M"]).ok();
    qemu_img(&["bitmap", "--add", s(&img), "bm0"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "128k", s(&img), "second"]).ok();
    assert_qemu_check_clean(&img, "two bitmaps");
    assert_our_check_clean(&img, "two bitmaps");
}

#[test]
fn imgloop_check_accepts_guest_cluster_0_in_an_external_data_file_with_extended_l2() {
    let sc = Scratch::new();
    let img = sc.path("dfx.qcow2");
    let data = sc.path("dfx.data");
    qemu_create(
        &img,
        &format!("data_file={},extended_l2=on", s(&data)),
        "1M",
    );
    qemu_io("qcow2", &img, &["write -P 0x71 0 4k"]).ok();
    assert_qemu_check_clean(&img, "data file");
    assert_our_check_clean(&img, "data file");
}

// ---------------------------------------------------------------------------
// Concurrency: several threads writing to one open image.

#[test]
fn concurrent_writers_on_one_image_leave_it_clean_and_correct() {
    use imgloop::{Image, OpenOptions};
    let sc = Scratch::new();
    let base = sc.path("mt-base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "8M"]).ok();
    qemu_io("raw", &base, &["write -P 0xb0 0 8M"]).ok();
    let base_content = vec![0xb0u8; 8 << 20];
    const THREADS: usize = 4;
    for (opts, backing) in [
        ("", false),
        ("cluster_size=512,refcount_bits=64", false),
        ("cluster_size=16k,extended_l2=on", true),
        ("compat=0.10,cluster_size=4k", true),
        ("cluster_size=4k", true),
    ] {
        let what = format!("-o '{opts}' backing={backing}");
        let img = sc.path("mt.qcow2");
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        if backing {
            args.extend(["-b", "mt-base.raw", "-F", "raw"]);
        }
        args.extend([s(&img), "8M"]);
        imgloop(&args).ok();
        let cs = qemu_info(&img)["cluster-size"].as_u64().unwrap();
        let mut expect = if backing {
            base_content.clone()
        } else {
            vec![0u8; 8 << 20]
        };

        let image = Image::open(
            &img,
            &OpenOptions::read_write(Some("qcow2"))
                .with_policy(imgloop::FilePolicy::like_qemu_img()),
        )
        .unwrap();
        // Distinct ranges: thread t owns [t MiB, t+1 MiB) and writes runs
        // that straddle clusters, then zeroes and discards parts of them.
        let own = |t: usize| (t as u64) << 20;
        // Overlapping clusters: 6M..7M, where every thread writes its
        // quarter of each cluster (all four race to allocate it), and
        // 7M..7.5M, which every thread writes with the same bytes.
        let shared = 6u64 << 20;
        let same = 7u64 << 20;
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let image = &image;
                scope.spawn(move || {
                    let pat = 0x10 + t as u8;
                    let mut off = own(t) + 100;
                    while off + 3000 < own(t) + (1 << 20) {
                        image.write(&vec![pat; 3000], off).unwrap();
                        off += 3000 + cs / 2;
                    }
                    image
                        .write_zeroes(own(t) + (256 << 10), 64 << 10, t % 2 == 0)
                        .unwrap();
                    image.discard(own(t) + (512 << 10), 128 << 10).unwrap();
                    image
                        .write(&vec![pat ^ 0xff; 4096], own(t) + (520 << 10))
                        .unwrap();
                    let q = cs / THREADS as u64;
                    let mut c = shared;
                    while c < shared + (1 << 20) {
                        image
                            .write(&vec![0x80 | t as u8; q as usize], c + t as u64 * q)
                            .unwrap();
                        c += cs;
                    }
                    for k in 0..8u64 {
                        image
                            .write(&vec![0xee; 64 << 10], same + k * (64 << 10))
                            .unwrap();
                    }
                    image.flush().unwrap();
                });
            }
        });
        let report = image.check(None).unwrap();
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "{what}: {:?}",
            report.messages
        );
        image.close().unwrap();

        // The expected content, built sequentially.
        for t in 0..THREADS {
            let pat = 0x10 + t as u8;
            let mut off = own(t) + 100;
            while off + 3000 < own(t) + (1 << 20) {
                expect[off as usize..off as usize + 3000].fill(pat);
                off += 3000 + cs / 2;
            }
            let z = (own(t) + (256 << 10)) as usize;
            expect[z..z + (64 << 10)].fill(0);
            // Discarded whole clusters read as zeroes (v3), or from the
            // backing image (v2); partial clusters at the edges keep data.
            let d0 = (own(t) + (512 << 10)).div_ceil(cs) * cs;
            let d1 = (own(t) + (640 << 10)) / cs * cs;
            let fill = if backing && opts.contains("compat=0.10") {
                None
            } else {
                Some(0u8)
            };
            for i in d0..d1 {
                expect[i as usize] = fill.unwrap_or(base_content[i as usize]);
            }
            let w = (own(t) + (520 << 10)) as usize;
            expect[w..w + 4096].fill(pat ^ 0xff);
            let q = cs / THREADS as u64;
            let mut c = shared;
            while c < shared + (1 << 20) {
                let a = (c + t as u64 * q) as usize;
                expect[a..a + q as usize].fill(0x80 | t as u8);
                c += cs;
            }
        }
        expect[same as usize..same as usize + (512 << 10)].fill(0xee);
        let raw = sc.path("mt-expect.raw");
        std::fs::write(&raw, &expect).unwrap();
        assert_qemu_accepts("qcow2", &img, &raw, "raw");
        assert_our_check_clean(&img, &what);
    }
}

#[test]
fn a_tiny_l2_cache_set_by_open_option_still_writes_a_clean_image() {
    let sc = Scratch::new();
    let img = sc.path("tiny-cache.qcow2");
    // 4 KiB clusters: an L2 table maps 2 MiB, so 8 regions 3 MiB apart
    // need 8 tables while the cache holds 2.
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "32M",
    ])
    .ok();
    let writes: Vec<String> = (0..8)
        .map(|i| format!("write -P {} {}M 12k", i + 1, i * 3 + 1))
        .collect();
    let reads: Vec<String> = (0..8)
        .map(|i| format!("read -P {} {}M 12k", i + 1, i * 3 + 1))
        .collect();
    let mut args = vec![
        "io",
        "-f",
        "qcow2",
        "-o",
        "l2-cache-size=8k,refcount-cache-size=8k",
    ];
    for c in writes.iter().chain(reads.iter()) {
        args.push("-c");
        args.push(c);
    }
    args.push(s(&img));
    imgloop(&args).ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    for r in &reads {
        qemu_io("qcow2", &img, &[r]).ok();
    }
    let bad = imgloop(&["io", "-o", "l2-cache-size=lots", "-c", "read 0 1", s(&img)]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("l2-cache-size"), "{}", bad.stderr);
}

#[test]
fn compressed_convert_of_data_that_is_not_cluster_aligned_is_clean_and_equal() {
    let sc = Scratch::new();
    let src = sc.path("unaligned.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&src), "8M"]).ok();
    // Data extents start and end inside 64 KiB clusters (4 KiB granular).
    imgloop_io(
        "raw",
        &src,
        &[
            "write -P 0x31 12k 20k",
            "write -P 0x32 1028k 8k",
            "write -P 0x33 8188k 4k",
        ],
    )
    .ok();
    for ctype in ["zlib", "zstd"] {
        let dst = sc.path(&format!("unaligned-{ctype}.qcow2"));
        let opt = format!("compression_type={ctype}");
        imgloop(&["convert", "-c", "-O", "qcow2", "-o", &opt, s(&src), s(&dst)]).ok();
        assert_eq!(qemu_img(&["check", s(&dst)]).code, 0, "{ctype}");
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&dst)]);
        assert_eq!(cmp.code, 0, "{ctype}: {}", cmp.stdout);
        let map = qemu_img(&["map", "--output=json", s(&dst)]).ok().json();
        assert!(
            map.as_array()
                .unwrap()
                .iter()
                .any(|e| e["compressed"] == true),
            "{ctype}: nothing compressed"
        );
    }
}

#[test]
fn internal_snapshots_are_listed_like_qemu_and_survive_writes_to_the_active_layer() {
    let sc = Scratch::new();
    let img = sc.path("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).ok();
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x41 0 256k", "write -P 0x42 1M 64k"],
    )
    .ok();
    qemu_img(&["snapshot", "-c", "first", s(&img)]).ok();
    qemu_img(&["snapshot", "-c", "second", s(&img)]).ok();
    let ours = imgloop(&["info", "--output", "json", s(&img)]).ok().json();
    let theirs = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
    assert_eq!(ours["snapshots"], theirs["snapshots"]);
    assert_eq!(ours["snapshots"].as_array().map(|a| a.len()), Some(2));
    let list = |out: &str| -> Vec<String> {
        out.lines()
            .skip_while(|l| *l != "Snapshot list:")
            .take(4)
            .map(str::to_string)
            .collect()
    };
    let human = imgloop(&["info", s(&img)]).ok().stdout;
    assert_eq!(
        list(&human),
        list(&qemu_img(&["info", s(&img)]).ok().stdout)
    );
    // Clusters shared with the snapshots are copied on write; the
    // snapshots keep their data.
    imgloop_io(
        "qcow2",
        &img,
        &[
            "write -P 0x43 100k 8k",
            "write -z 1M 64k",
            "discard 192k 64k",
        ],
    )
    .ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    imgloop_io(
        "qcow2",
        &img,
        &[
            "read -P 0x41 0 100k",
            "read -P 0x43 100k 8k",
            "read -P 0 1M 64k",
        ],
    )
    .ok();
    let snap = sc.path("first.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=first",
        "-O",
        "raw",
        s(&img),
        s(&snap),
    ])
    .ok();
    let bytes = std::fs::read(&snap).unwrap();
    assert!(
        bytes[..256 << 10].iter().all(|&b| b == 0x41),
        "snapshot data changed"
    );
    assert!(bytes[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x42));
}
