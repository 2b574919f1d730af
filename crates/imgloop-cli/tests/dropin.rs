//! qemu-img drop-in behaviour: the same command lines through both tools
//! give the same exit codes and results.

mod common;
use common::*;

#[test]
fn usage_errors_exit_1_with_one_line_as_qemu_img_does() {
    let sc = Scratch::new();
    let img = sc.path("u.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let cases: &[&[&str]] = &[
        &["info", "--bogus", s(&img)],
        &["bogus"],
        &["info", "--output", "xml", s(&img)],
        &["check", "--bogus", s(&img)],
        &["map", "-Z", s(&img)],
    ];
    for args in cases {
        let q = qemu_img(args);
        let i = imgloop(args);
        assert_eq!((i.code, q.code), (1, 1), "{args:?}: {}", i.stderr);
        assert_eq!(
            i.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            i.stderr
        );
        assert!(i.stderr.starts_with("imgloop: "), "{}", i.stderr);
    }
    // Help and version are not errors.
    assert_eq!(imgloop(&["info", "--help"]).code, 0);
    assert_eq!(imgloop(&["--version"]).code, 0);
}

#[test]
fn create_rounds_sizes_up_to_whole_sectors_as_qemu_img_does() {
    let sc = Scratch::new();
    for size in ["1000", "10b", "1", "511", "513", "1k"] {
        for fmt in ["raw", "qcow2"] {
            let q = sc.path(&format!("q-{size}.{fmt}"));
            let i = sc.path(&format!("i-{size}.{fmt}"));
            qemu_img(&["create", "-q", "-f", fmt, s(&q), size]).ok();
            imgloop(&["create", "-q", "-f", fmt, s(&i), size]).ok();
            let vs =
                |p| qemu_img(&["info", "--output=json", s(p)]).ok().json()["virtual-size"].clone();
            assert_eq!(vs(&i), vs(&q), "{fmt} {size}");
        }
    }
}

#[test]
fn create_with_a_backing_file_needs_its_format_as_in_qemu_img_10() {
    let sc = Scratch::new();
    let base = sc.path("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let (q, i) = (sc.path("q.qcow2"), sc.path("i.qcow2"));
    let qr = qemu_img(&["create", "-f", "qcow2", "-b", "base.raw", s(&q)]);
    let ir = imgloop(&["create", "-f", "qcow2", "-b", "base.raw", s(&i)]);
    assert_eq!((ir.code, qr.code), (1, 1));
    let msg = "Backing file specified without backing format";
    assert!(qr.stderr.contains(msg), "{}", qr.stderr);
    assert!(ir.stderr.contains(msg), "{}", ir.stderr);
    assert!(!i.exists(), "nothing is created");
}

#[test]
fn a_human_map_of_compressed_data_fails_as_qemu_img_does() {
    let sc = Scratch::new();
    let src = sc.path("text.raw");
    std::fs::write(&src, "compressible line\n".repeat(60_000)).unwrap();
    let img = sc.path("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&img),
    ])
    .ok();
    let q = qemu_img(&["map", s(&img)]);
    let i = imgloop(&["map", s(&img)]);
    assert_eq!((i.code, q.code), (1, 1));
    assert_eq!(i.stdout, q.stdout, "the header line, as qemu-img prints it");
    let msg = "File contains external, encrypted or compressed clusters.";
    assert!(
        q.stderr.contains(msg) && i.stderr.contains(msg),
        "{}",
        i.stderr
    );
    // JSON maps show compressed data.
    imgloop(&["map", "--output", "json", s(&img)]).ok();
}

#[test]
fn a_human_map_names_the_external_data_file_as_qemu_img_does() {
    let sc = Scratch::new();
    // qemu-img takes a relative data file name from the current
    // directory: everything runs in the scratch directory.
    let run = |bin: &str, args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .current_dir(sc.path(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.data",
            "df.qcow2",
            "4M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 64k",
            "df.qcow2",
        ],
    );
    let ours = run(imgloop_bin(), &["map", "df.qcow2"]);
    assert_eq!(ours, run("qemu-img", &["map", "df.qcow2"]));
    assert!(ours.contains("df.data"), "{ours}");
}

#[test]
fn create_u_skips_the_backing_file_and_info_shows_an_image_whose_backing_is_missing() {
    let sc = Scratch::new();
    for (tool, name) in [("qemu-img", "q.qcow2"), (imgloop_bin(), "i.qcow2")] {
        let img = sc.path(name);
        let base = "/nonexistent/base.raw";
        let args = ["create", "-q", "-u", "-f", "qcow2", "-b", base, "-F", "raw"];
        // Without the backing file's size, the size must be given.
        let r = std::process::Command::new(tool)
            .args(args)
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(1), "{tool}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("Image creation needs a size parameter")
        );
        let r = std::process::Command::new(tool)
            .args(args)
            .arg(&img)
            .arg("1M")
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let q = qemu_img(&["info", "--output=json", s(&sc.path("i.qcow2"))])
        .ok()
        .json();
    let i = imgloop(&["info", "--output=json", s(&sc.path("q.qcow2"))])
        .ok()
        .json();
    for k in [
        "virtual-size",
        "backing-filename",
        "backing-filename-format",
        "cluster-size",
    ] {
        assert_eq!(q[k], i[k], "{k}");
    }
    // Reading data needs the backing file, in both tools.
    assert_eq!(imgloop(&["map", s(&sc.path("q.qcow2"))]).code, 1);
    assert_eq!(qemu_img(&["map", s(&sc.path("i.qcow2"))]).code, 1);
}

#[test]
fn convert_s0_allocates_the_whole_target_as_qemu_img_does() {
    let sc = Scratch::new();
    let src = sc.path("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&src), "16M"]).ok();
    qemu_io("raw", &src, &["write -P 1 0 1M"]).ok();
    for fmt in ["qcow2", "vhdx", "raw"] {
        let (q, i) = (sc.path(&format!("q.{fmt}")), sc.path(&format!("i.{fmt}")));
        qemu_img(&["convert", "-S", "0", "-O", fmt, s(&src), s(&q)]).ok();
        imgloop(&["convert", "-S", "0", "-O", fmt, s(&src), s(&i)]).ok();
        assert!(
            allocated(&i) >= 16 << 20,
            "{fmt}: {} bytes allocated (qemu-img: {})",
            allocated(&i),
            allocated(&q)
        );
        // The map shows data everywhere, as qemu-img's does.
        let map = imgloop(&["map", "--output=json", s(&i)]).ok().json();
        for e in map.as_array().unwrap() {
            assert_eq!(e["data"], true, "{fmt}: {e}");
        }
        qemu_img(&["compare", "-F", "raw", s(&i), s(&src)]).ok();
    }
    // Without -S 0 the holes stay holes.
    let sparse = sc.path("sparse.qcow2");
    imgloop(&["convert", "-O", "qcow2", s(&src), s(&sparse)]).ok();
    assert!(allocated(&sparse) < 4 << 20);
}

#[test]
fn create_takes_the_file_options_nocow_and_extent_size_hint_as_qemu_img_does() {
    let sc = Scratch::new();
    for fmt in ["raw", "qcow2", "vhdx"] {
        let img = sc.path(&format!("n.{fmt}"));
        let opts = "nocow=on,extent_size_hint=1M";
        qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            opts,
            s(&sc.path("q")),
            "1M",
        ])
        .ok();
        imgloop(&["create", "-q", "-f", fmt, "-o", opts, s(&img), "1M"]).ok();
        let info = qemu_img(&["info", "--output=json", "-f", fmt, s(&img)])
            .ok()
            .json();
        assert_eq!(info["virtual-size"], 1 << 20, "{fmt}");
    }
    // Bad values fail as other options do.
    let r = imgloop(&[
        "create",
        "-f",
        "raw",
        "-o",
        "nocow=maybe",
        s(&sc.path("x")),
        "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(!sc.path("x").exists());
}

#[test]
fn info_json_counts_the_file_node_in_whole_sectors_as_qemu_img_does() {
    let sc = Scratch::new();
    let img = sc.path("odd.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    // A file length that is not a multiple of 512.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(197_121).unwrap();
    let q = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
    let i = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    let child = |v: &serde_json::Value| v["children"][0]["info"]["virtual-size"].clone();
    assert_eq!(child(&i), child(&q));
    assert_eq!(child(&i), 197_632);
}

#[test]
fn the_formatting_line_of_create_is_qemu_imgs() {
    let sc = Scratch::new();
    qemu_img(&["create", "-q", "-f", "raw", s(&sc.path("base.raw")), "1M"]).ok();
    let cases: &[&[&str]] = &[
        &["-f", "qcow2"],
        &["-f", "qcow2", "-o", "cluster_size=4k,compat=0.10,lazy_refcounts=off"],
        &["-f", "qcow2", "-o", "compression_type=zstd,extended_l2=on,cluster_size=128k,preallocation=metadata,nocow=on"],
        &["-f", "qcow2", "-o", "data_file=/var/tmp/imgloop-formatting-line.data,data_file_raw=on,refcount_bits=64"],
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        &["-f", "raw", "-o", "preallocation=falloc,extent_size_hint=1M"],
        &["-f", "vhdx"],
        &["-f", "vhdx", "-o", "subformat=fixed,block_state_zero=off,log_size=2M,block_size=1M"],
        &["-f", "qcow", "-b", "base.raw", "-F", "raw"],
        &["-f", "parallels", "-o", "cluster_size=4k"],
    ];
    for (n, args) in cases.iter().enumerate() {
        let line = |tool: fn(&[&str]) -> Run, name: &str| {
            let img = sc.path(name);
            let mut v = vec!["create"];
            v.extend_from_slice(args);
            v.push(s(&img));
            if !args.contains(&"-b") {
                v.push("2M");
            }
            let out = tool(&v).ok().stdout;
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file("/var/tmp/imgloop-formatting-line.data");
            out.replace(s(&img), "IMG")
        };
        let q = line(qemu_img, &format!("q{n}"));
        let i = line(imgloop, &format!("i{n}"));
        assert_eq!(i, q, "{args:?}");
    }
}

#[test]
fn human_info_is_laid_out_as_qemu_imgs_child_node_included() {
    let sc = Scratch::new();
    let base = sc.path("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "1M"]).ok();
    let over = sc.path("over.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&over),
    ])
    .ok();
    qemu_io("qcow2", &over, &["write -P 1 0 64k"]).ok();
    let data = sc.path("ext.qcow2");
    // qemu-img resolves a relative data file name against its working
    // directory: give it absolute.
    let opt = format!("data_file={}", s(&sc.path("ext.bin")));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, s(&data), "1M"]).ok();
    for (img, chain) in [
        (&over, true),
        (&over, false),
        (&data, false),
        (&base, false),
    ] {
        let mut args = vec!["info"];
        if chain {
            args.push("--backing-chain");
        }
        args.push(s(img));
        let q = qemu_img(&args).ok().stdout;
        let i = imgloop(&args).ok().stdout;
        assert!(q.contains("Child node '/file':"), "{q}");
        assert_eq!(i, q, "{args:?}");
    }
}

#[test]
fn a_relative_data_file_name_means_what_it_means_to_qemu_img() {
    // qemu-img creates (and opens) a relative data file name against its
    // working directory, not the image's; scripts rely on where it lands.
    let sc = Scratch::new();
    for (tool, dir) in [("qemu-img", "q"), (imgloop_bin(), "i")] {
        let cwd = sc.path(dir);
        std::fs::create_dir_all(cwd.join("sub")).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new(tool)
                .args(args)
                .current_dir(&cwd)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.bin",
            "sub/c.qcow2",
            "1M",
        ]);
        assert!(
            cwd.join("d.bin").exists() && !cwd.join("sub/d.bin").exists(),
            "{tool}"
        );
        std::fs::write(cwd.join("src.raw"), vec![7u8; 1 << 20]).unwrap();
        run(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "data_file=e.bin",
            "src.raw",
            "sub/v.qcow2",
        ]);
        assert!(cwd.join("e.bin").exists(), "{tool}");
        // Both tools open either image from that directory.
        let q = std::process::Command::new("qemu-img")
            .args(["compare", "sub/v.qcow2", "src.raw"])
            .current_dir(&cwd)
            .output()
            .unwrap();
        assert!(q.status.success(), "{tool}: {q:?}");
        let i = std::process::Command::new(imgloop_bin())
            .args(["compare", "sub/v.qcow2", "src.raw"])
            .current_dir(&cwd)
            .output()
            .unwrap();
        assert!(i.status.success(), "{tool}: {i:?}");
    }
}

#[test]
fn dd_copies_what_qemu_img_dd_copies_with_its_messages() {
    let sc = Scratch::new();
    let src = sc.path("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "8M"]).ok();
    qemu_io(
        "qcow2",
        &src,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 64k",
            "write -P 0x33 8323072 65536",
        ],
    )
    .ok();
    let cases: &[&[&str]] = &[
        &["bs=64k", "count=3", "skip=1"],
        &["-O", "qcow2", "bs=1M", "skip=2"],
        &["bs=1000", "count=1"],
        &["bs=64k", "count=100000"],
        &["bs=1k", "skip=8192"],
        &["-O", "vhdx", "bs=4k", "count=1000", "skip=700"],
    ];
    for args in cases {
        let (q, i) = (sc.path("q.out"), sc.path("i.out"));
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&i);
        let with = |out: &std::path::Path| -> Vec<String> {
            let mut v: Vec<String> = vec!["dd".into(), "-f".into(), "qcow2".into()];
            v.extend(args.iter().map(|a| a.to_string()));
            v.push(format!("if={}", s(&src)));
            v.push(format!("of={}", s(out)));
            v
        };
        let (qa, ia) = (with(&q), with(&i));
        qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        imgloop(&ia.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        let qi = qemu_img(&["info", "--output=json", s(&q)]).ok().json();
        let ii = qemu_img(&["info", "--output=json", s(&i)]).ok().json();
        assert_eq!(qi["format"], ii["format"], "{args:?}");
        assert_eq!(qi["virtual-size"], ii["virtual-size"], "{args:?}");
        qemu_img(&["compare", s(&q), s(&i)]).ok();
    }
    for (args, msg) in [
        (
            &["bs=0"][..],
            "Invalid bs specified. Must be between 1 and 2147483647.",
        ),
        (
            &["count=-1"][..],
            "Invalid count specified. Must be between 0 and 9223372036854775807.",
        ),
        (&["foo=1"][..], "unrecognized operand foo"),
        (&[][..], "Must specify both input and output files"),
    ] {
        let mut v = vec!["dd"];
        v.extend_from_slice(args);
        let src_arg = format!("if={}", s(&src));
        let out_arg = format!("of={}", s(&sc.path("x.out")));
        v.push(&src_arg);
        if !args.is_empty() {
            v.push(&out_arg);
        }
        let q = qemu_img(&v);
        let i = imgloop(&v);
        assert_eq!((q.code, i.code), (1, 1), "{args:?}");
        assert!(
            q.stderr.contains(msg) && i.stderr.contains(msg),
            "{args:?}: {}",
            i.stderr
        );
    }
}

#[test]
fn convert_backing_target_is_zero_and_cache_flags_behave_as_in_qemu_img() {
    let sc = Scratch::new();
    let base = sc.path("cb.raw");
    let src = sc.path("cs.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]).ok();
    qemu_io("raw", &base, &["write -P 1 0 4M"]).ok();
    std::fs::copy(&base, &src).unwrap();
    qemu_io("raw", &src, &["write -P 2 1M 1M"]).ok();
    // -B with -F: the target names the backing file and reads as the source.
    let out = sc.path("co.qcow2");
    imgloop(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        s(&base),
        "-F",
        "raw",
        s(&src),
        s(&out),
    ])
    .ok();
    let info = qemu_img(&["info", "--output=json", s(&out)]).json();
    assert_eq!(info["backing-filename"], s(&base));
    assert_eq!(info["backing-filename-format"], "raw");
    let r = qemu_img(&["compare", "-F", "raw", s(&out), s(&src)]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // Refusals with qemu-img's words and codes.
    let x = sc.path("x.raw");
    let cases: [(&[&str], &str); 4] = [
        (
            &["convert", "-O", "qcow2", "-B", s(&base), s(&src), s(&out)],
            "requires explicit backing format",
        ),
        (
            &["convert", "--target-is-zero", "-O", "raw", s(&src), s(&x)],
            "--target-is-zero requires use of -n flag",
        ),
        (
            &["convert", "-T", "bogus", "-O", "raw", s(&src), s(&x)],
            "Invalid source cache option: bogus",
        ),
        (
            &["check", "-T", "bogus", s(&out)],
            "Invalid source cache option: bogus",
        ),
    ];
    for (args, want) in cases {
        let q = qemu_img(args);
        let i = imgloop(args);
        assert_eq!((i.code, q.code), (1, 1), "{args:?}: {}", i.stderr);
        assert!(i.stderr.contains(want), "{args:?}: {}", i.stderr);
    }
    // -t on the other subcommands, qemu-img's words.
    for args in [
        &["amend", "-t", "bogus", "-o", "compat=1.1", s(&out)][..],
        &["commit", "-t", "bogus", s(&out)],
        &[
            "rebase",
            "-u",
            "-t",
            "bogus",
            "-b",
            "x",
            "-F",
            "raw",
            s(&out),
        ],
    ] {
        let (q, i) = (qemu_img(args), imgloop(args));
        assert_eq!((i.code, q.code), (1, 1), "{args:?}");
        assert!(
            i.stderr.contains("Invalid cache option: bogus"),
            "{args:?}: {}",
            i.stderr
        );
    }
    let q = qemu_img(&["compare", "-T", "bogus", s(&out), s(&src)]);
    let i = imgloop(&["compare", "-T", "bogus", s(&out), s(&src)]);
    assert_eq!((i.code, q.code), (2, 2));
    // -T with a valid mode changes nothing.
    assert_eq!(
        imgloop(&["compare", "-T", "none", "-F", "raw", s(&out), s(&src)]).code,
        0
    );
    assert_eq!(imgloop(&["check", "-T", "writeback", s(&out)]).code, 0);
    // --target-is-zero with -n into a new qcow2 (which reads as zeroes).
    let t = sc.path("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&t), "4M"]).ok();
    imgloop(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "qcow2",
        "-T",
        "none",
        s(&src),
        s(&t),
    ])
    .ok();
    let r = qemu_img(&["compare", "-F", "raw", s(&t), s(&src)]);
    assert_eq!(r.code, 0, "{}", r.stdout);
}

#[test]
fn bench_runs_what_qemu_img_bench_runs_and_says_so_alike() {
    let sc = Scratch::new();
    let img = sc.path("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).ok();
    for args in [
        &["bench", "-c", "1000", "-d", "8", "-f", "qcow2"][..],
        &[
            "bench",
            "-w",
            "-c",
            "20",
            "-s",
            "64k",
            "-S",
            "128k",
            "-o",
            "1M",
            "--pattern",
            "0xab",
            "-d",
            "4",
            "--flush-interval",
            "5",
            "-f",
            "qcow2",
        ],
    ] {
        let mut a = args.to_vec();
        a.push(s(&img));
        let q = qemu_img(&a).ok();
        let i = imgloop(&a).ok();
        let lines = |r: &Run| r.stdout.lines().map(str::to_string).collect::<Vec<_>>();
        let (ql, il) = (lines(&q), lines(&i));
        assert_eq!(ql.len(), il.len(), "{args:?}");
        // Everything but the time is the same.
        assert_eq!(ql[..ql.len() - 1], il[..il.len() - 1], "{args:?}");
        assert!(
            il.last().unwrap().starts_with("Run completed in ")
                && il.last().unwrap().ends_with(" seconds.")
        );
    }
    let bad = ["bench", "-w", "--flush-interval", "5", s(&img)];
    assert_eq!((imgloop(&bad).code, qemu_img(&bad).code), (1, 1));
    assert!(imgloop(&bad)
        .stderr
        .contains("Flush interval can't be smaller than depth"));
    // The writes landed where the requests said: 20 × 64 KiB from 1 MiB
    // in steps of 128 KiB, wrapping at the end of the 4 MiB disk.
    for k in 0..20u64 {
        let off = (1048576 + k * 131072) % (4 << 20);
        qemu_io("qcow2", &img, &[&format!("read -P 0xab {off} 64k")]).ok();
    }
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
}

#[test]
fn qcow2_resize_preallocates_the_added_part_as_qemu_img_does() {
    let sc = Scratch::new();
    for mode in ["metadata", "falloc", "full"] {
        let q = sc.path(&format!("q-{mode}.qcow2"));
        let i = sc.path(&format!("i-{mode}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "1M"]).ok();
        qemu_io("qcow2", &q, &["write -P 5 0 100k"]).ok();
        std::fs::copy(&q, &i).unwrap();
        let opt = format!("--preallocation={mode}");
        qemu_img(&["resize", "-q", &opt, s(&q), "+3M"]).ok();
        imgloop(&["resize", "-q", &opt, s(&i), "+3M"]).ok();
        assert_eq!(qemu_img(&["check", s(&i)]).code, 0, "{mode}");
        let strip = |p: &std::path::Path| {
            let v = qemu_img(&["map", "--output=json", s(p)]).ok().json();
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.as_object_mut().unwrap().remove("offset");
                    e
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(&i),
            strip(&q),
            "{mode}: allocation differs from qemu-img's"
        );
        let r = qemu_img(&["compare", s(&i), s(&q)]);
        assert_eq!(r.code, 0, "{mode}: {}", r.stdout);
        if mode != "metadata" {
            // The added clusters take space on the host, as qemu-img's do.
            assert!(allocated(&i) + (64 << 10) >= allocated(&q), "{mode}");
        }
    }
}

#[test]
fn bitmaps_are_added_removed_and_kept_through_resize_as_qemu_img_does() {
    let sc = Scratch::new();
    let img = sc.path("bm.qcow2");
    imgloop(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).ok();
    imgloop(&["bitmap", "--add", s(&img), "x"]).ok();
    imgloop(&["bitmap", "--add", "-g", "4096", "--disable", s(&img), "z"]).ok();
    let bitmaps = |p: &std::path::Path| {
        qemu_img(&["info", "--output=json", s(p)]).ok().json()["format-specific"]["data"]["bitmaps"]
            .clone()
    };
    let want = serde_json::json!([
        {"flags": ["auto"], "name": "x", "granularity": 65536},
        {"flags": [], "name": "z", "granularity": 4096},
    ]);
    assert_eq!(bitmaps(&img), want);
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    // Errors with qemu-img's words.
    for (args, msg) in [
        (
            vec!["bitmap", "--add", s(&img), "x"],
            "Operation add on bitmap x failed",
        ),
        (
            vec!["bitmap", "--remove", s(&img), "nope"],
            "Dirty bitmap 'nope' not found",
        ),
        (
            vec!["bitmap", "--add", "-g", "100", s(&img), "y"],
            "Granularity must be power of 2",
        ),
        (
            vec!["bitmap", s(&img), "x"],
            "Need at least one of --add, --remove",
        ),
    ] {
        let (q, i) = (qemu_img(&args), imgloop(&args));
        assert_eq!((i.code, q.code), (1, 1), "{args:?}");
        assert!(i.stderr.contains(msg), "{args:?}: {}", i.stderr);
    }
    // qemu-img works on imgloop's bitmaps and the other way round.
    qemu_img(&["bitmap", "--disable", s(&img), "x"]).ok();
    qemu_img(&["bitmap", "--add", s(&img), "from-qemu"]).ok();
    imgloop(&["bitmap", "--enable", s(&img), "x"]).ok();
    imgloop(&["bitmap", "--clear", s(&img), "from-qemu"]).ok();
    imgloop(&["bitmap", "--remove", s(&img), "z"]).ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    let names: Vec<String> = bitmaps(&img)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["x", "from-qemu"]);
    // Resize keeps them valid, as qemu-img's resize does.
    imgloop(&["resize", "-q", s(&img), "64M"]).ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    assert_eq!(bitmaps(&img).as_array().unwrap().len(), 2);
    imgloop(&["resize", "-q", "--shrink", s(&img), "2M"]).ok();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    // After the last one goes, the extension goes too.
    imgloop(&["bitmap", "--remove", s(&img), "x"]).ok();
    imgloop(&["bitmap", "--remove", s(&img), "from-qemu"]).ok();
    assert!(bitmaps(&img).is_null());
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    // Guest writes are recorded in enabled bitmaps only, as in qemu.
    imgloop(&["bitmap", "--add", "--disable", s(&img), "frozen"]).ok();
    imgloop(&["bitmap", "--add", s(&img), "live"]).ok();
    imgloop_io("qcow2", &img, &["write -P 2 0 64k", "write -z 1M 4k"]).ok();
    let c = qemu_img(&["check", s(&img)]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(!c.stderr.contains("inconsistent"), "{}", c.stderr);
    assert_eq!(
        common::nbd::qemu_bitmap_ranges(&sc, &img, "live"),
        vec![(0, 64 << 10), (1 << 20, 64 << 10)]
    );
    assert!(common::nbd::qemu_bitmap_ranges(&sc, &img, "frozen").is_empty());
}

#[test]
fn bitmap_merge_and_operations_run_in_command_line_order_as_in_qemu_img() {
    let sc = Scratch::new();
    let (a, b) = (sc.path("a.qcow2"), sc.path("b.qcow2"));
    for p in [&a, &b] {
        qemu_img(&["create", "-q", "-f", "qcow2", s(p), "8M"]).ok();
    }
    // qemu records writes in b's bitmap "src" and in a's "own".
    qemu_img(&["bitmap", "--add", "-g", "512", s(&b), "src"]).ok();
    qemu_io("qcow2", &b, &["write 4M 1k"]).ok();
    qemu_img(&["bitmap", "--add", s(&a), "own"]).ok();
    qemu_io("qcow2", &a, &["write 0 4k"]).ok();
    let (qa, ia) = (sc.path("qa.qcow2"), a.clone());
    std::fs::copy(&a, &qa).unwrap();
    // --add then --merge from another file, then --disable, in one
    // command: the same result as qemu-img's on a copy.
    // (-b names the file of every --merge source of the command.)
    for (tool, img) in [("qemu-img", &qa), ("imgloop", &ia)] {
        let args = [
            "bitmap",
            "--add",
            "-g",
            "128k",
            "--merge",
            "src",
            "-b",
            s(&b),
            "-F",
            "qcow2",
            "--disable",
            s(img),
            "merged",
        ];
        let r = if tool == "qemu-img" {
            qemu_img(&args)
        } else {
            imgloop(&args)
        };
        assert_eq!(r.code, 0, "{tool}: {}", r.stderr);
        let args = ["bitmap", "--merge", "own", s(img), "merged"];
        let r = if tool == "qemu-img" {
            qemu_img(&args)
        } else {
            imgloop(&args)
        };
        assert_eq!(r.code, 0, "{tool}: {}", r.stderr);
        assert_eq!(qemu_img(&["check", s(img)]).code, 0);
    }
    let merged = |p: &std::path::Path| common::nbd::qemu_bitmap_ranges(&sc, p, "merged");
    assert_eq!(merged(&ia), vec![(0, 128 << 10), (4 << 20, 128 << 10)]);
    assert_eq!(merged(&ia), merged(&qa));
    let info = |p: &std::path::Path| {
        qemu_img(&["info", "--output=json", s(p)]).ok().json()["format-specific"]["data"]["bitmaps"]
            .clone()
    };
    assert_eq!(info(&ia), info(&qa));
    // Order matters: --disable before --add fails (no such bitmap yet),
    // as in qemu-img.
    for tool in ["qemu-img", "imgloop"] {
        let args = ["bitmap", "--disable", "--add", s(&ia), "later"];
        let r = if tool == "qemu-img" {
            qemu_img(&args)
        } else {
            imgloop(&args)
        };
        assert_eq!(r.code, 1, "{tool}");
        assert!(
            r.stderr.contains("'later' not found"),
            "{tool}: {}",
            r.stderr
        );
    }
    // A bitmap of a disk of another size does not merge.
    let c = sc.path("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&c), "4M"]).ok();
    qemu_img(&["bitmap", "--add", s(&c), "small"]).ok();
    let r = imgloop(&["bitmap", "--merge", "small", "-b", s(&c), s(&ia), "merged"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("different sizes"), "{}", r.stderr);
}

#[test]
fn convert_salvage_and_rate_limit_behave_as_in_qemu_img() {
    let sc = Scratch::new();
    let img = sc.path("sv.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 64k",
            "write -c -P 2 64k 64k",
            "write -P 3 128k 64k",
        ],
    )
    .ok();
    // Break the compressed cluster's deflate stream (L1[0] -> L2[1]).
    let mut f = std::fs::read(&img).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&f, 40) as usize;
    let l2 = (be(&f, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let host = (be(&f, l2 + 8) & ((1 << 54) - 1)) as usize;
    f[host..host + 32].fill(0xff);
    std::fs::write(&img, &f).unwrap();
    let (a, b) = (sc.path("q.raw"), sc.path("i.raw"));
    // Without --salvage both fail; with it both copy, zeroes for the bad part.
    assert_eq!(qemu_img(&["convert", "-O", "raw", s(&img), s(&a)]).code, 1);
    assert_eq!(imgloop(&["convert", "-O", "raw", s(&img), s(&b)]).code, 1);
    let _ = std::fs::remove_file(&b);
    qemu_img(&["convert", "--salvage", "-O", "raw", s(&img), s(&a)]).ok();
    let r = imgloop(&["convert", "--salvage", "-O", "raw", s(&img), s(&b)]).ok();
    assert!(
        r.stderr.contains("warning: error while reading"),
        "{}",
        r.stderr
    );
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    // -r: 4 MiB at 8 MiB/s takes at least about half a second (a slower
    // machine only makes it longer).
    let src = sc.path("r.raw");
    std::fs::write(&src, vec![7u8; 4 << 20]).unwrap();
    let t = std::time::Instant::now();
    imgloop(&[
        "convert",
        "-r",
        "8M",
        "-O",
        "raw",
        s(&src),
        s(&sc.path("r2.raw")),
    ])
    .ok();
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        std::fs::read(sc.path("r2.raw")).unwrap(),
        vec![7u8; 4 << 20]
    );
}

/// Checks that `out` is qemu-img's progress form: `    (P/100%)` pieces
/// ended by `\r`, from 0.00 up to 100.00 without going back, then `\n`.
fn assert_qemu_progress(what: &str, out: &str) {
    let body = out
        .strip_suffix("\r\n")
        .unwrap_or_else(|| panic!("{what}: progress ends with \\r\\n: {out:?}"));
    let mut last = -1.0f64;
    let pieces: Vec<&str> = body.split('\r').collect();
    for piece in &pieces {
        let pct = piece
            .strip_prefix("    (")
            .and_then(|p| p.strip_suffix("/100%)"))
            .unwrap_or_else(|| panic!("{what}: not a progress piece: {piece:?}"));
        assert_eq!(
            pct.split('.').nth(1).map(str::len),
            Some(2),
            "{what}: {piece:?}"
        );
        let pct: f64 = pct.parse().unwrap();
        assert!(pct >= last, "{what}: progress went back: {out:?}");
        last = pct;
    }
    assert_eq!(pieces[0], "    (0.00/100%)", "{what}");
    assert_eq!(last, 100.0, "{what}");
}

#[test]
fn progress_is_drawn_in_qemu_imgs_form_by_every_long_command() {
    let sc = Scratch::new();
    let img = sc.path("p.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]).ok();
    qemu_io("qcow2", &img, &["write -P 7 0 40M"]).ok();
    let top = sc.path("top.qcow2");
    let mk_top = || {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "p.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ])
        .ok();
        qemu_io("qcow2", &top, &["write -P 9 1M 10M"]).ok();
    };
    let (raw, copy) = (sc.path("p.raw"), sc.path("copy.raw"));
    let runs: Vec<(&str, Vec<String>)> = vec![
        (
            "convert",
            vec!["convert", "-p", "-O", "raw", s(&img), s(&raw)],
        ),
        ("compare", vec!["compare", "-p", s(&img), s(&raw)]),
        (
            "dd",
            vec![
                "dd",
                "-p",
                &format!("if={}", s(&img)),
                &format!("of={}", s(&copy)),
                "bs=1M",
            ],
        ),
        ("rebase", vec!["rebase", "-p", "-b", "", s(&top)]),
        ("commit", vec!["commit", "-p", s(&top)]),
        (
            "amend",
            vec!["amend", "-p", "-o", "lazy_refcounts=on", s(&img)],
        ),
    ]
    .into_iter()
    .map(|(n, v)| (n, v.into_iter().map(|x| x.to_string()).collect()))
    .collect();
    for (what, args) in &runs {
        if matches!(*what, "rebase" | "commit") {
            mk_top();
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = imgloop(&argv).ok();
        let out = r
            .stdout
            .replace("Images are identical.\n", "")
            .replace("Image committed.\n", "");
        assert_qemu_progress(what, &out);
        // -q silences it (dd has no -q).
        if *what != "dd" && *what != "commit" && *what != "rebase" {
            let mut quiet = argv.clone();
            quiet.insert(1, "-q");
            assert_eq!(imgloop(&quiet).ok().stdout, "", "{what} -q");
        }
    }
    // qemu-img's own output passes the same check (the checker is right).
    let q = qemu_img(&["convert", "-p", "-O", "raw", s(&img), s(&raw)]).ok();
    assert_qemu_progress("qemu-img convert", &q.stdout);
}

#[test]
fn convert_bitmaps_copies_every_bit_of_every_persistent_bitmap() {
    let sc = Scratch::new();
    let src = sc.path("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "16M"]).ok();
    qemu_img(&["bitmap", "--add", s(&src), "live"]).ok();
    qemu_io("qcow2", &src, &["write 1M 64k", "write 5M 200k"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "1M", s(&src), "frozen"]).ok();
    qemu_io("qcow2", &src, &["write 9M 4k"]).ok();
    qemu_img(&["bitmap", "--disable", s(&src), "frozen"]).ok();
    qemu_io("qcow2", &src, &["write 12M 4k"]).ok();
    let (q, i) = (sc.path("q.qcow2"), sc.path("i.qcow2"));
    qemu_img(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&q)]).ok();
    imgloop(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&i)]).ok();
    for name in ["live", "frozen"] {
        let want = common::nbd::qemu_bitmap_ranges(&sc, &src, name);
        assert_eq!(
            common::nbd::qemu_bitmap_ranges(&sc, &q, name),
            want,
            "{name}: qemu-img's copy"
        );
        assert_eq!(
            common::nbd::qemu_bitmap_ranges(&sc, &i, name),
            want,
            "{name}: imgloop's copy"
        );
    }
    assert_eq!(
        common::nbd::qemu_bitmap_ranges(&sc, &src, "frozen"),
        [(9 << 20, 1 << 20)],
        "the source as built"
    );
    assert_eq!(common::nbd::qemu_bitmap_ranges(&sc, &src, "live").len(), 4);
    let info = qemu_img(&["info", "--output=json", s(&i)]).ok().json();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"],
        serde_json::json!([
            {"flags": ["auto"], "name": "live", "granularity": 65536},
            {"flags": [], "name": "frozen", "granularity": 1048576},
        ])
    );
    qemu_img(&["check", s(&i)]).ok();
    // Without --bitmaps nothing is copied, as in qemu-img.
    let plain = sc.path("plain.qcow2");
    imgloop(&["convert", "-O", "qcow2", s(&src), s(&plain)]).ok();
    let info = qemu_img(&["info", "--output=json", s(&plain)]).ok().json();
    assert!(
        info["format-specific"]["data"].get("bitmaps").is_none(),
        "{info}"
    );
}
