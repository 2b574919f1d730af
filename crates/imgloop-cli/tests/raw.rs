//! Raw format: interop with qemu-img/qemu-io in both directions, and the
//! CLI commands on raw images.

mod common;
use common::*;

fn write_patterns_with_qemu_io(file: &std::path::Path) {
    for (p, off, len) in PATTERN_WRITES {
        qemu_io("raw", file, &[&format!("write -P {p:#x} {off} {len}")]).ok();
    }
}

fn write_patterns_with_imgloop(file: &std::path::Path) {
    for (p, off, len) in PATTERN_WRITES {
        imgloop_io("raw", file, &[&format!("write -P {p:#x} {off} {len}")]).ok();
    }
}

#[test]
fn images_written_by_qemu_io_read_identically_and_verify_patterns() {
    let sc = Scratch::new();
    let img = sc.path("q.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&img), "8M"]).ok();
    write_patterns_with_qemu_io(&img);
    assert_reads_like_qemu(&sc, "raw", &img);
    for (p, off, len) in PATTERN_WRITES {
        imgloop_io("raw", &img, &[&format!("read -P {p:#x} {off} {len}")]).ok();
    }
    // A wrong pattern is a failure with a message and non-zero exit.
    let bad = imgloop_io("raw", &img, &["read -P 0x12 64k 64k"]);
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr
            .contains("Pattern verification failed at offset 65536"),
        "{}",
        bad.stderr
    );
}

#[test]
fn images_created_and_written_by_imgloop_equal_the_qemu_written_twin() {
    let sc = Scratch::new();
    let ours = sc.path("ours.raw");
    let theirs = sc.path("theirs.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&ours), "8M"]).ok();
    qemu_img(&["create", "-q", "-f", "raw", s(&theirs), "8M"]).ok();
    write_patterns_with_imgloop(&ours);
    write_patterns_with_qemu_io(&theirs);
    assert_qemu_accepts("raw", &ours, &theirs, "raw");
    // Zeroes and discards written by both tools agree too.
    imgloop_io(
        "raw",
        &ours,
        &["write -z 64k 16k", "discard 3M 256k", "flush"],
    )
    .ok();
    qemu_io("raw", &theirs, &["write -z 64k 16k", "discard 3M 256k"]).ok();
    assert_qemu_accepts("raw", &ours, &theirs, "raw");
}

#[test]
fn unaligned_writes_land_on_the_exact_bytes() {
    let sc = Scratch::new();
    let img = sc.path("u.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    imgloop_io("raw", &img, &["write -P 0x5a 1001 3", "write -z 1002 1"]).ok();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[1000..1004], &[0, 0x5a, 0, 0x5a]);
}

#[test]
fn sparse_maps_equal_qemu_img_map_json() {
    let sc = Scratch::new();
    let img = sc.path("m.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&img), "16M"]).ok();
    write_patterns_with_qemu_io(&img);
    qemu_io("raw", &img, &["write -P 0 8M 64k", "discard 3M 64k"]).ok();
    let theirs = qemu_img(&["map", "--output=json", "-f", "raw", s(&img)])
        .ok()
        .json();
    let ours = imgloop(&["map", "--output", "json", "-f", "raw", s(&img)])
        .ok()
        .json();
    assert_eq!(ours, theirs);
    // Start offset and maximum length narrow the map like qemu-img's.
    let theirs = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "raw",
        "--start-offset",
        "100k",
        "--max-length",
        "2M",
        s(&img),
    ])
    .ok()
    .json();
    let ours = imgloop(&[
        "map",
        "--output",
        "json",
        "-f",
        "raw",
        "--start-offset",
        "100k",
        "--max-length",
        "2M",
        s(&img),
    ])
    .ok()
    .json();
    assert_eq!(ours, theirs);
    // Human output lists the data extents with hex offsets.
    let human = imgloop(&["map", s(&img)]).ok().stdout;
    assert!(human.starts_with("Offset          Length          Mapped to       File"));
    assert!(
        human.contains("0x10000         0x10000         0x10000"),
        "{human}"
    );
}

#[test]
fn converting_a_sparse_1g_raw_stays_sparse_and_identical() {
    let sc = Scratch::new();
    let src = sc.path("big.raw");
    let dst = sc.path("big-copy.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&src), "1G"]).ok();
    imgloop_io(
        "raw",
        &src,
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 300M 3M",
            "write -P 0x63 1023M 1M",
        ],
    )
    .ok();
    let r = imgloop(&["convert", "-p", "-f", "raw", "-O", "raw", s(&src), s(&dst)]).ok();
    assert!(r.stdout.contains("(100.00/100%)"), "{}", r.stdout);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 30);
    assert!(
        allocated(&dst) <= 6 << 20,
        "copy allocates {} bytes",
        allocated(&dst)
    );
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst)]).code,
        0
    );
    // The same holds for the read/scan path (explicit -S) with zero runs
    // inside allocated data: they are detected and not written.
    imgloop_io("raw", &src, &["write -P 0 500M 8M"]).ok();
    let dst2 = sc.path("big-copy2.raw");
    imgloop(&[
        "convert",
        "-q",
        "-S",
        "64k",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        s(&dst2),
    ])
    .ok();
    assert!(allocated(&src) >= 13 << 20);
    assert!(
        allocated(&dst2) <= 6 << 20,
        "copy allocates {} bytes",
        allocated(&dst2)
    );
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst2)]).code,
        0
    );
    // The default (-S 4k, like qemu-img) detects them as well, and so does
    // a target made durable with -t writeback.
    let dst3 = sc.path("big-copy3.raw");
    imgloop(&[
        "convert",
        "-q",
        "-t",
        "writeback",
        "-O",
        "raw",
        s(&src),
        s(&dst3),
    ])
    .ok();
    assert!(
        allocated(&dst3) <= 6 << 20,
        "copy allocates {} bytes",
        allocated(&dst3)
    );
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst3)]).code,
        0
    );
    let r = imgloop(&[
        "convert",
        "-t",
        "bogus",
        "-O",
        "raw",
        s(&src),
        s(&sc.path("x")),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("cache mode"), "{}", r.stderr);
}

#[test]
fn convert_with_s0_allocates_the_whole_target_and_n_writes_into_an_existing_one() {
    let sc = Scratch::new();
    let src = sc.path("s.raw");
    let full = sc.path("full.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&src), "4M"]).ok();
    imgloop_io("raw", &src, &["write -P 0x70 1M 4k"]).ok();
    imgloop(&["convert", "-q", "-S", "0", "-O", "raw", s(&src), s(&full)]).ok();
    assert!(allocated(&full) >= 4 << 20);
    // -n: the target exists and has other data; zero ranges must be zeroed.
    let existing = sc.path("existing.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&existing), "4M"]).ok();
    imgloop_io("raw", &existing, &["write -P 0x99 0 4M"]).ok();
    imgloop(&[
        "convert",
        "-q",
        "-n",
        "-m",
        "3",
        "-W",
        "-O",
        "raw",
        s(&src),
        s(&existing),
    ])
    .ok();
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&existing)]).code,
        0
    );
    // A target smaller than the source is refused.
    let small = sc.path("small.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&small), "1M"]).ok();
    let r = imgloop(&["convert", "-n", "-O", "raw", s(&src), s(&small)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("smaller"), "{}", r.stderr);
    // Raw cannot hold compressed data.
    let r = imgloop(&["convert", "-c", "-O", "raw", s(&src), s(&sc.path("c.raw"))]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("Compression not supported"),
        "{}",
        r.stderr
    );
}

#[test]
fn compare_exit_codes_and_messages_follow_qemu_img() {
    let sc = Scratch::new();
    let a = sc.path("a.raw");
    let b = sc.path("b.raw");
    let big = sc.path("big.raw");
    for (p, size) in [(&a, "2M"), (&b, "2M"), (&big, "3M")] {
        imgloop(&["create", "-q", "-f", "raw", s(p), size]).ok();
    }
    let r = imgloop(&["compare", s(&a), s(&b)]);
    assert_eq!((r.code, r.stdout.trim()), (0, "Images are identical."));

    imgloop_io("raw", &b, &["write -P 1 1000 1"]).ok();
    let r = imgloop(&["compare", s(&a), s(&b)]);
    let q = qemu_img(&["compare", s(&a), s(&b)]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, q.stdout);
    assert_eq!(r.stdout.trim(), "Content mismatch at offset 512!");

    // Different sizes: equal when the extra part is zero, unless strict.
    let r = imgloop(&["compare", s(&a), s(&big)]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Warning: Image size mismatch!"));
    let r = imgloop(&["compare", "-s", s(&a), s(&big)]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("Strict mode: Image size mismatch!"));
    imgloop_io("raw", &big, &["write -P 7 2560k 512"]).ok();
    let r = imgloop(&["compare", s(&a), s(&big)]);
    let q = qemu_img(&["compare", s(&a), s(&big)]);
    assert_eq!((r.code, &r.stdout), (q.code, &q.stdout));

    let r = imgloop(&["compare", s(&a), s(&sc.path("missing.raw"))]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("missing.raw"), "{}", r.stderr);
}

#[test]
fn info_json_has_qemu_img_keys_and_values() {
    let sc = Scratch::new();
    let img = sc.path("i.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "10M"]).ok();
    imgloop_io("raw", &img, &["write 1M 64k"]).ok();
    let ours = imgloop(&["info", "--output", "json", s(&img)]).ok().json();
    let theirs = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
    for key in [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
    ] {
        assert_eq!(ours[key], theirs[key], "key {key}");
    }
    assert_eq!(ours["children"][0]["info"]["format"], "file");
    let human = imgloop(&["info", s(&img)]).ok().stdout;
    assert!(human.contains("file format: raw"));
    assert!(
        human.contains("virtual size: 10 MiB (10485760 bytes)"),
        "{human}"
    );
    // --backing-chain gives a list, one entry for a raw image.
    let chain = imgloop(&["info", "--backing-chain", "--output", "json", s(&img)])
        .ok()
        .json();
    assert_eq!(chain.as_array().map(|a| a.len()), Some(1));
}

#[test]
fn create_preallocation_modes_reserve_space() {
    let sc = Scratch::new();
    for (mode, min) in [("off", 0), ("falloc", 4 << 20), ("full", 4 << 20)] {
        let img = sc.path(&format!("{mode}.raw"));
        imgloop(&[
            "create",
            "-q",
            "-f",
            "raw",
            "-o",
            &format!("preallocation={mode}"),
            s(&img),
            "4M",
        ])
        .ok();
        let info = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
        assert_eq!(info["virtual-size"], 4 << 20);
        let actual = info["actual-size"].as_u64().unwrap();
        assert!(actual >= min, "{mode}: {actual}");
        if mode == "off" {
            assert!(actual < 1 << 20, "off allocates {actual}");
        }
    }
    let r = imgloop(&[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=bogus",
        s(&sc.path("x")),
        "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("preallocation"), "{}", r.stderr);
    let r = imgloop(&[
        "create",
        "-f",
        "raw",
        "-o",
        "cluster_size=64k",
        s(&sc.path("y")),
        "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("cluster_size"), "{}", r.stderr);
    assert!(!sc.path("y").exists());
    let help = imgloop(&["create", "-f", "raw", "-o", "help"]).ok().stdout;
    assert!(help.contains("preallocation"));
}

#[test]
fn resize_grows_shrinks_only_when_asked_and_qemu_sees_the_size() {
    let sc = Scratch::new();
    let img = sc.path("r.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    imgloop_io("raw", &img, &["write -P 3 0 1M"]).ok();
    let r = imgloop(&["resize", "-f", "raw", s(&img), "+1M"]).ok();
    assert_eq!(r.stdout.trim(), "Image resized.");
    let size = |p: &std::path::Path| {
        qemu_img(&["info", "--output=json", "-f", "raw", s(p)])
            .ok()
            .json()["virtual-size"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(size(&img), 2 << 20);
    imgloop_io("raw", &img, &["read -P 3 0 1M", "read -P 0 1M 1M"]).ok();
    let r = imgloop(&["resize", "-f", "raw", s(&img), "512k"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--shrink"));
    imgloop(&["resize", "-f", "raw", "--shrink", s(&img), "-1536k"]).ok();
    assert_eq!(size(&img), 512 << 10);
    imgloop(&[
        "resize",
        "-f",
        "raw",
        "--preallocation",
        "full",
        s(&img),
        "4M",
    ])
    .ok();
    assert!(allocated(&img) >= 4 << 20);
}

#[test]
fn check_on_raw_reports_unsupported_with_exit_63() {
    let sc = Scratch::new();
    let img = sc.path("c.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let r = imgloop(&["check", "-f", "raw", s(&img)]);
    let q = qemu_img(&["check", "-f", "raw", s(&img)]);
    assert_eq!(r.code, 63);
    assert_eq!(r.code, q.code);
    assert!(r.stderr.contains("does not support checks"));
}

#[test]
fn discard_and_write_zeroes_change_the_allocation_map() {
    let sc = Scratch::new();
    let img = sc.path("d.raw");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "4M"]).ok();
    imgloop_io("raw", &img, &["write -P 1 0 4M"]).ok();
    imgloop_io(
        "raw",
        &img,
        &["discard 1M 1M", "write -z -u 2M 1M", "write -z 3M 64k"],
    )
    .ok();
    let map = qemu_img(&["map", "--output=json", "-f", "raw", s(&img)])
        .ok()
        .json();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(0, 1 << 20), (3 << 20, 1 << 20)]);
    imgloop_io(
        "raw",
        &img,
        &[
            "read -P 0 1M 2M",
            "read -P 0 3M 64k",
            "read -P 1 3136k 960k",
        ],
    )
    .ok();
}

#[test]
fn probing_picks_raw_and_reading_a_probed_raw_image_works() {
    let sc = Scratch::new();
    let img = sc.path("p.img");
    imgloop(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let info = imgloop(&["info", "--output", "json", s(&img)]).ok().json();
    assert_eq!(info["format"], "raw");
    imgloop(&[
        "io",
        "-c",
        "write -P 9 0 512",
        "-c",
        "read -P 9 0 512",
        s(&img),
    ])
    .ok();
}
