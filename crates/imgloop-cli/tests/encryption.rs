//! Encrypted qcow2 (LUKS and legacy AES) against qemu-img and qemu-io in
//! both directions, for the cipher combinations qemu-img offers; convert
//! between plain and encrypted; info as qemu-img shows it; the errors of
//! a missing or wrong secret; secrets never printed.

mod common;
use common::*;
use std::path::Path;

/// A passphrase no output may contain.
const PASS: &str = "Tr0ub4dor&3-unique";

fn object() -> String {
    format!("secret,id=sec0,data={PASS}")
}

fn opts_for(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(img)
    )
}

/// `TOOL ARGS...` with the secret object and the image as image options.
fn with_key(tool: fn(&[&str]) -> Run, sub: &[&str], img: &Path, rest: &[&str]) -> Run {
    let obj = object();
    let io = opts_for(img);
    let mut a: Vec<&str> = sub.to_vec();
    a.extend(["--object", &obj, "--image-opts", &io]);
    a.extend_from_slice(rest);
    tool(&a)
}

fn io_with_key(program: &str, img: &Path, cmds: &[&str]) -> Run {
    let obj = object();
    let io = opts_for(img);
    let mut a = vec!["--object", obj.as_str(), "--image-opts"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(&io);
    let r = if program == "qemu-io" {
        run_program("qemu-io", &a)
    } else {
        let mut v = vec!["io"];
        v.extend(a);
        imgloop(&v)
    };
    assert_eq!(r.code, 0, "{program} {cmds:?}:\n{}{}", r.stdout, r.stderr);
    r
}

fn create(tool: fn(&[&str]) -> Run, img: &Path, opts: &str, size: &str) -> Run {
    let obj = object();
    let o = if opts.contains("luks") {
        format!("encrypt.key-secret=sec0,encrypt.iter-time=10,{opts}")
    } else {
        format!("encrypt.key-secret=sec0,{opts}")
    };
    let r = tool(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &obj,
        "-o",
        &o,
        s(img),
        size,
    ]);
    assert_eq!(r.code, 0, "create {opts}: {}", r.stderr);
    r
}

/// The decrypted disk, exported to raw by `tool`.
fn export(sc: &Scratch, tool: fn(&[&str]) -> Run, img: &Path) -> Vec<u8> {
    let out = sc.path("plain.raw");
    let _ = std::fs::remove_file(&out);
    with_key(tool, &["convert", "-O", "raw"], img, &[s(&out)]).ok();
    std::fs::read(&out).unwrap()
}

fn assert_qemu_check_clean(img: &Path, what: &str) {
    let r = with_key(qemu_img, &["check"], img, &[]);
    assert_eq!(r.code, 0, "{what}: {}{}", r.stdout, r.stderr);
}

const VARIANTS: &[&str] = &[
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    "encrypt.format=luks,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha1",
    "encrypt.format=luks,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
    "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ctr,encrypt.hash-alg=sha384",
    "encrypt.format=luks,cluster_size=512",
    "encrypt.format=luks,extended_l2=on",
    "encrypt.format=luks,compat=0.10",
    "encrypt.format=aes",
    "encrypt.format=aes,cluster_size=4096",
];

const WRITES: &[&str] = &[
    "write -P 0x41 1000 5000",
    "write -P 0x42 1M 64k",
    "write -P 0x43 3145216 1024",
    "write -z 2M 70000",
    "write -P 0x44 4193792 512",
];

#[test]
fn encrypted_images_qemu_img_makes_read_and_write_identically() {
    for v in VARIANTS {
        let sc = Scratch::new();
        let img = sc.path("q.qcow2");
        create(qemu_img, &img, v, "4M");
        io_with_key("qemu-io", &img, WRITES);
        assert!(
            export(&sc, imgloop, &img) == export(&sc, qemu_img, &img),
            "{v}: reads differ"
        );
        // imgloop writes; qemu reads the same.
        io_with_key(
            "imgloop",
            &img,
            &[
                "write -P 0x55 60000 10000",
                "write -P 0x56 511 3",
                "discard 1M 64k",
            ],
        );
        assert!(
            export(&sc, imgloop, &img) == export(&sc, qemu_img, &img),
            "{v}: after imgloop's writes"
        );
        assert_qemu_check_clean(&img, v);
        let c = imgloop(&["check", s(&img)]);
        assert_eq!(c.code, 0, "{v}: {}", c.stdout);
        // info shows the encryption as qemu-img does.
        let q = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
        let i = imgloop(&["info", "--output=json", s(&img)]).ok().json();
        assert_eq!(i["encrypted"], true);
        assert_eq!(i["format-specific"], q["format-specific"], "{v}");
    }
}

#[test]
fn encrypted_images_imgloop_makes_are_read_and_checked_by_qemu() {
    for v in VARIANTS {
        let sc = Scratch::new();
        let img = sc.path("i.qcow2");
        create(imgloop, &img, v, "4M");
        // The same writes to a raw twin, by qemu-io.
        let twin = sc.path("twin.raw");
        qemu_img(&["create", "-q", "-f", "raw", s(&twin), "4M"]).ok();
        qemu_io("raw", &twin, WRITES).ok();
        io_with_key("imgloop", &img, WRITES);
        assert_qemu_check_clean(&img, v);
        let obj = object();
        let r = qemu_img(&[
            "compare",
            "--object",
            &obj,
            "--image-opts",
            &opts_for(&img),
            &format!("driver=raw,file.filename={}", s(&twin)),
        ]);
        assert_eq!(r.code, 0, "{v}: {}{}", r.stdout, r.stderr);
        io_with_key("qemu-io", &img, &["write -P 0x66 100000 70000"]);
        qemu_io("raw", &twin, &["write -P 0x66 100000 70000"]).ok();
        assert!(
            export(&sc, imgloop, &img) == std::fs::read(&twin).unwrap(),
            "{v}"
        );
        let human = imgloop(&["info", s(&img)]).ok();
        assert!(human.stdout.contains("encrypted: yes"), "{}", human.stdout);
        let qh = qemu_img(&["info", s(&img)]).ok();
        let section = |t: &str| {
            t.lines()
                .skip_while(|l| !l.starts_with("Format specific information:"))
                .take_while(|l| !l.starts_with("Child node"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            section(&human.stdout),
            section(&qh.stdout),
            "{v}: human info"
        );
    }
}

#[test]
fn convert_between_plain_and_encrypted_images_both_ways() {
    let sc = Scratch::new();
    let plain = sc.path("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&plain), "8M"]).ok();
    qemu_io("qcow2", &plain, &["write -P 7 0 3M", "write -P 9 5M 100k"]).ok();
    let enc = sc.path("enc.qcow2");
    let obj = object();
    imgloop(&[
        "convert",
        "--object",
        &obj,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&plain),
        s(&enc),
    ])
    .ok();
    let r = qemu_img(&[
        "compare",
        "--object",
        &obj,
        "--image-opts",
        &opts_for(&enc),
        &format!("driver=qcow2,file.filename={}", s(&plain)),
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_qemu_check_clean(&enc, "converted to LUKS");
    let back = sc.path("back.raw");
    with_key(imgloop, &["convert", "-O", "raw"], &enc, &[s(&back)]).ok();
    let r = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&back), s(&plain)]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // Compression and encryption do not mix, as in qemu-img.
    let c = sc.path("c.qcow2");
    let r = imgloop(&[
        "convert",
        "-c",
        "--object",
        &obj,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&plain),
        s(&c),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Compression and encryption not supported at the same time"),
        "{}",
        r.stderr
    );
}

#[test]
fn missing_and_wrong_secrets_give_qemu_img_s_errors_and_secrets_are_never_shown() {
    let sc = Scratch::new();
    let img = sc.path("e.qcow2");
    create(qemu_img, &img, "encrypt.format=luks", "1M");
    io_with_key("qemu-io", &img, &["write -P 1 0 4096"]);
    let out = sc.path("o.raw");
    // No secret: info works; reading needs the key.
    let i = imgloop(&["info", s(&img)]);
    assert_eq!(i.code, 0);
    let r = imgloop(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{}",
        r.stderr
    );
    // A secret ID with no object.
    let r = imgloop(&[
        "convert",
        "--image-opts",
        &opts_for(&img),
        "-O",
        "raw",
        s(&out),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("No secret with id 'sec0'"),
        "{}",
        r.stderr
    );
    // The wrong passphrase.
    let wrong = "secret,id=sec0,data=wrong";
    for tool in [qemu_img, imgloop] {
        let r = tool(&[
            "convert",
            "--object",
            wrong,
            "--image-opts",
            &opts_for(&img),
            "-O",
            "raw",
            s(&out),
        ]);
        assert_eq!(r.code, 1);
        assert!(
            r.stderr
                .contains("Invalid password, cannot unlock any keyslot"),
            "{}",
            r.stderr
        );
    }
    // create without the secret.
    let r = imgloop(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks",
        s(&sc.path("n.qcow2")),
        "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(r
        .stderr
        .contains("Parameter 'encrypt.key-secret' is required for cipher"));
    // The passphrase appears nowhere.
    let obj = object();
    let runs = [
        imgloop(&["info", "--output=json", s(&img)]),
        imgloop(&["info", s(&img)]),
        with_key(imgloop, &["check"], &img, &[]),
        with_key(imgloop, &["map", "--output=json"], &img, &[]),
        imgloop(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            &obj,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            s(&sc.path("x.qcow2")),
            "1M",
        ]),
        imgloop(&[
            "create",
            "-f",
            "qcow2",
            "--object",
            &obj,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=nosuch",
            s(&sc.path("y.qcow2")),
            "1M",
        ]),
    ];
    for r in runs {
        assert!(
            !r.stdout.contains(PASS) && !r.stderr.contains(PASS),
            "secret shown:\n{}{}",
            r.stdout,
            r.stderr
        );
    }
    let file = std::fs::read(sc.path("x.qcow2")).unwrap();
    assert!(!file.windows(PASS.len()).any(|w| w == PASS.as_bytes()));
}
