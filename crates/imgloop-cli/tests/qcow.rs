//! qcow version 1: interop with qemu-img/qemu-io in both directions (plain,
//! over a backing file, compressed, AES-encrypted with secrets given as
//! qemu-img takes them), `info`/`map` output, and hostile headers.

mod common;
use common::*;
use std::path::Path;

/// Writes that cross cluster edges, fill whole clusters, zero a range and
/// reach the end of an 8 MiB disk.
const WRITES: &[&str] = &[
    "write -P 0x41 1000 5000",
    "write -P 0x42 64k 64k",
    "write -P 0x43 1M 512",
    "write -P 0x44 1536k 300k",
    "write -z 2M 70000",
    "write -P 0x45 8380000 8608",
];

/// `--object` and `--image-opts` arguments for an encrypted image.
fn key_args(file: &Path, password: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!("secret,id=sec0,data={password}"),
        "--image-opts".into(),
        format!(
            "driver=qcow,file.filename={},encrypt.key-secret=sec0",
            s(file)
        ),
    ]
}

fn run_tool(program: &str, args: &[String]) -> Run {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tool io|qemu-io` on an encrypted image with `cmds`.
fn io_with_key(program: &str, file: &Path, cmds: &[&str]) -> Run {
    let mut args: Vec<String> = Vec::new();
    if program == imgloop_bin() {
        args.push("io".into());
    }
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.extend(key_args(file, "abc"));
    run_tool(program, &args)
}

/// The disk `WRITES` give on a zeroed raw twin (or a copy of `base`).
fn twin(sc: &Scratch, base: Option<&Path>) -> std::path::PathBuf {
    let t = sc.path("twin.raw");
    match base {
        Some(b) => {
            std::fs::copy(b, &t).unwrap();
        }
        None => {
            qemu_img(&["create", "-q", "-f", "raw", s(&t), "8M"]).ok();
        }
    }
    qemu_io("raw", &t, WRITES).ok();
    t
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn images_qemu_writes_read_identically() {
    let sc = Scratch::new();
    // Plain, 4 KiB clusters.
    let a = sc.path("a.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&a), "8M"]).ok();
    qemu_io("qcow", &a, WRITES).ok();
    assert_reads_like_qemu(&sc, "qcow", &a);
    // Over a raw backing file: 512-byte clusters.
    let base = sc.path("base.raw");
    random_file(&base, 8 << 20, 1);
    let o = sc.path("o.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&o),
    ])
    .ok();
    qemu_io("qcow", &o, WRITES).ok();
    assert_reads_like_qemu(&sc, "qcow", &o);
    // Compressed clusters (qemu-io stores one cluster per compressed
    // write; `qemu-img convert -c -O qcow` of qemu 10 fails with exit 1).
    let c = sc.path("c.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&c), "8M"]).ok();
    qemu_io(
        "qcow",
        &c,
        &[
            "write -c -P 0x51 0 4k",
            "write -c -P 0x52 64k 4k",
            "write -c -P 0x53 8188k 4k",
            "write -P 0x54 1M 512",
        ],
    )
    .ok();
    assert_reads_like_qemu(&sc, "qcow", &c);
    imgloop_io(
        "qcow",
        &c,
        &["read -P 0x52 64k 4k", "read -P 0x53 8188k 4k"],
    )
    .ok();
    // map JSON equals qemu-img's for all three.
    for img in [&a, &o, &c] {
        let ours = imgloop(&["map", "--output=json", s(img)]).ok().stdout;
        let theirs = qemu_img(&["map", "--output=json", s(img)]).ok().stdout;
        assert_eq!(ours.trim(), theirs.trim(), "map of {}", img.display());
    }
}

#[test]
fn images_imgloop_writes_pass_qemu_img_compare() {
    for opts in ["", "cluster_size=512", "cluster_size=65536"] {
        let sc = Scratch::new();
        let img = sc.path("i.qcow");
        let mut args = vec!["create", "-q", "-f", "qcow"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&img), "8M"]);
        imgloop(&args).ok();
        imgloop_io("qcow", &img, WRITES).ok();
        assert_qemu_accepts("qcow", &img, &twin(&sc, None), "raw");
        // And qemu-io verifies the patterns.
        qemu_io(
            "qcow",
            &img,
            &["read -P 0x41 1000 5000", "read -P 0 2M 70000"],
        )
        .ok();
    }
    // Over a backing file (imgloop copies the rest of a 4 KiB cluster).
    for opts in ["", "cluster_size=4096"] {
        let sc = Scratch::new();
        let base = sc.path("base.raw");
        random_file(&base, 8 << 20, 2);
        let img = sc.path("o.qcow");
        let mut args = vec!["create", "-q", "-f", "qcow", "-b", s(&base), "-F", "raw"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(s(&img));
        imgloop(&args).ok();
        imgloop_io("qcow", &img, WRITES).ok();
        assert_qemu_accepts("qcow", &img, &twin(&sc, Some(&base)), "raw");
    }
}

#[test]
fn the_new_header_is_laid_out_as_qemu_img_lays_it_out() {
    let sc = Scratch::new();
    let base = sc.path("b.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "10M"]).ok();
    for backing in [false, true] {
        let (q, ours) = (sc.path("q.qcow"), sc.path("i.qcow"));
        let mut tail = vec![];
        if backing {
            tail.extend(["-b", "b.raw", "-F", "raw"]);
        }
        let make = |tool: fn(&[&str]) -> Run, out: &Path| {
            let mut args = vec!["create", "-q", "-f", "qcow"];
            args.extend(&tail);
            args.push(s(out));
            if !backing {
                args.push("10M");
            }
            tool(&args).ok();
        };
        make(qemu_img, &q);
        make(imgloop, &ours);
        let (a, b) = (std::fs::read(&q).unwrap(), std::fs::read(&ours).unwrap());
        // Header, backing name and the (empty) L1 table.
        let n = if backing { 96 } else { 88 };
        assert_eq!(a[..n], b[..n], "backing {backing}");
        let qi = qemu_img(&["info", "--output=json", s(&q)]).ok().json();
        let ii = imgloop(&["info", "--output=json", s(&ours)]).ok().json();
        for k in ["virtual-size", "cluster-size", "format", "backing-filename"] {
            assert_eq!(qi[k], ii[k], "{k}");
        }
    }
}

#[test]
fn encrypted_images_round_trip_with_qemu_both_ways() {
    let sc = Scratch::new();
    // qemu makes and writes it; imgloop reads it with the key.
    let q = sc.path("q.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&q),
        "8M",
    ])
    .ok();
    io_with_key("qemu-io", &q, WRITES).ok();
    let info = imgloop(&["info", "--output=json", s(&q)]).ok().json();
    assert_eq!(info["encrypted"], true);
    assert!(imgloop(&["info", s(&q)])
        .ok()
        .stdout
        .contains("encrypted: yes"));
    let twin = twin(&sc, None);
    let mut cmp: Vec<String> = vec!["compare".into()];
    cmp.extend(key_args(&q, "abc"));
    cmp.push(format!("driver=raw,file.filename={}", s(&twin)));
    let r = run_tool(imgloop_bin(), &cmp);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // Without the key reads fail, as in qemu-img; a wrong key gives garbage.
    let r = imgloop(&["compare", s(&q), s(&twin)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("encrypt.key-secret"), "{}", r.stderr);
    let mut wrong: Vec<String> = vec!["compare".into()];
    wrong.extend(key_args(&q, "abd"));
    wrong.push(format!("driver=raw,file.filename={}", s(&twin)));
    assert_eq!(run_tool(imgloop_bin(), &wrong).code, 1);

    // imgloop makes and writes it; qemu reads it with the key.
    let i = sc.path("i.qcow");
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&i),
        "8M",
    ])
    .ok();
    io_with_key(imgloop_bin(), &i, WRITES).ok();
    let mut qcmp: Vec<String> = vec!["compare".into()];
    qcmp.extend(key_args(&i, "abc"));
    qcmp.push(format!("driver=raw,file.filename={}", s(&twin)));
    let r = run_tool("qemu-img", &qcmp);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // The header matches qemu's byte for byte.
    let (a, b) = (std::fs::read(&q).unwrap(), std::fs::read(&i).unwrap());
    assert_eq!(a[..48], b[..48]);
}

#[test]
fn an_old_encrypted_archive_converts_to_a_modern_image() {
    let sc = Scratch::new();
    let q = sc.path("old.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&q),
        "8M",
    ])
    .ok();
    io_with_key("qemu-io", &q, WRITES).ok();
    let out = sc.path("new.qcow2");
    let mut conv: Vec<String> = vec!["convert".into()];
    conv.extend(key_args(&q, "abc"));
    conv.extend(["-O".into(), "qcow2".into(), s(&out).into()]);
    let r = run_tool(imgloop_bin(), &conv);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_qemu_accepts("qcow2", &out, &twin(&sc, None), "raw");
    // And to an encrypted qcow with a key read from a file.
    let pw = sc.path("pw");
    std::fs::write(&pw, "from-a-file").unwrap();
    let enc = sc.path("re.qcow");
    let mut conv: Vec<String> = vec!["convert".into()];
    conv.extend(key_args(&q, "abc"));
    conv.extend([
        "--object".into(),
        format!("secret,id=k2,file={}", s(&pw)),
        "-O".into(),
        "qcow".into(),
        "-o".into(),
        "encrypt.format=aes,encrypt.key-secret=k2".into(),
        s(&enc).into(),
    ]);
    let r = run_tool(imgloop_bin(), &conv);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_tool(
        "qemu-img",
        &[
            "compare".into(),
            "--object".into(),
            "secret,id=k2,data=from-a-file".into(),
            "--image-opts".into(),
            format!(
                "driver=qcow,file.filename={},encrypt.key-secret=k2",
                s(&enc)
            ),
            format!("driver=raw,file.filename={}", s(&twin(&sc, None))),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

#[test]
fn secrets_never_appear_in_messages() {
    let sc = Scratch::new();
    let img = sc.path("e.qcow");
    // Encryption without a key, a missing secret, a secret for a plain image.
    let r = imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-o",
        "encrypt.format=aes",
        s(&img),
        "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{}",
        r.stderr
    );
    let r = imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "--object",
        "secret,id=a,data=Sup3rS3cret",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=b",
        s(&img),
        "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("No secret with id 'b'"), "{}", r.stderr);
    assert!(!r.stderr.contains("Sup3rS3cret"));
    for bad in [
        "secret,id=a,data=Sup3rS3cret,format=hex",
        "secret,data=Sup3rS3cret",
        "secret,id=a,data=Sup3rS3cret,wat=1",
    ] {
        let r = imgloop(&["info", "--object", bad, s(&img)]);
        assert_eq!(r.code, 1);
        assert!(!r.stderr.contains("Sup3rS3cret"), "{}", r.stderr);
        assert!(!r.stdout.contains("Sup3rS3cret"), "{}", r.stdout);
    }
}

#[test]
fn hostile_headers_are_clean_errors_naming_the_file_and_the_field() {
    let sc = Scratch::new();
    let good = sc.path("g.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow",
        "-b",
        "/nonexistent/b.raw",
        "-F",
        "raw",
        s(&good),
        "8M",
    ])
    .ok();
    let bytes = std::fs::read(&good).unwrap();
    let bad = sc.path("bad.qcow");
    let cases: &[(usize, &[u8], &str)] = &[
        (32, &[8], "Cluster size must be between 512 and 64k"),
        (32, &[17], "Cluster size must be between 512 and 64k"),
        (33, &[5], "L2 table size must be between 512 and 64k"),
        (33, &[14], "L2 table size must be between 512 and 64k"),
        (24, &[0xff; 8], "Image too large"),
        (24, &[0, 0x10, 0, 0, 0, 0, 0, 0], "Image too large"),
        (40, &[0xff; 8], "overflow"),
        (36, &[0, 0, 0, 2], "invalid encryption method"),
        (16, &[0, 0, 4, 0], "Backing file name too long"),
        (8, &[0xff; 8], "overflow"),
        (4, &[0, 0, 0, 9], "Unsupported qcow version 9"),
    ];
    for (at, patch, want) in cases {
        let mut b = bytes.clone();
        b[*at..*at + patch.len()].copy_from_slice(patch);
        std::fs::write(&bad, &b).unwrap();
        let r = imgloop(&["info", "-f", "qcow", s(&bad)]);
        assert_eq!(r.code, 1, "field at {at}: {}", r.stderr);
        assert!(r.stderr.contains(want), "field at {at}: {}", r.stderr);
        assert!(r.stderr.contains(s(&bad)), "{}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
    // Truncated, and a backing name running past the end of the file.
    std::fs::write(&bad, &bytes[..40]).unwrap();
    let r = imgloop(&["info", "-f", "qcow", s(&bad)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("too short"), "{}", r.stderr);
    let mut b = bytes.clone();
    b.truncate(60);
    std::fs::write(&bad, &b).unwrap();
    let r = imgloop(&["info", "-f", "qcow", s(&bad)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("past the end of the file"),
        "{}",
        r.stderr
    );
    // A read-only command never changes the file.
    std::fs::write(&bad, &bytes).unwrap();
    let _ = imgloop(&["map", "-f", "qcow", s(&bad)]);
    assert_eq!(std::fs::read(&bad).unwrap(), bytes);
}

#[test]
fn compressed_images_imgloop_writes_read_in_qemu_and_are_deterministic() {
    let sc = Scratch::new();
    let src = sc.path("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&src), "8M"]).ok();
    qemu_io("raw", &src, WRITES).ok();
    let mut outs = Vec::new();
    for m in ["1", "4"] {
        let c = sc.path(&format!("c{m}.qcow"));
        imgloop(&["convert", "-c", "-m", m, "-O", "qcow", s(&src), s(&c)]).ok();
        assert_qemu_accepts("qcow", &c, &src, "raw");
        outs.push(std::fs::read(&c).unwrap());
    }
    assert!(
        outs[0] == outs[1],
        "convert -c gives different bytes for -m 1 and -m 4"
    );
    let ours = imgloop(&["map", "--output=json", s(&sc.path("c1.qcow"))])
        .ok()
        .stdout;
    assert!(ours.contains("\"compressed\": true"), "{ours}");
    // Far smaller than the plain copy.
    let p = sc.path("p.qcow");
    imgloop(&["convert", "-O", "qcow", s(&src), s(&p)]).ok();
    assert!(
        (outs[0].len() as u64) * 4 < allocated(&p),
        "{} vs {}",
        outs[0].len(),
        allocated(&p)
    );
}
