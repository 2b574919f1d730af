//! `imgloop measure` prints what `qemu-img measure` prints, byte for
//! byte, for empty images of a size and for sources of several kinds
//! (sparse, zero clusters, compressed, bitmaps, raw), across the target
//! options that change the result.

mod common;
use common::*;

#[test]
fn measurements_equal_qemu_img_s() {
    let sc = Scratch::new();
    let q = sc.path("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "64M"]).ok();
    qemu_io(
        "qcow2",
        &q,
        &[
            "write -P 1 0 1M",
            "write -P 2 10M 100k",
            "write -z 20M 1M",
            "write -c -P 3 30M 256k",
        ],
    )
    .ok();
    let bm = sc.path("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&bm), "100M"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "4096", s(&bm), "bitmap-one"]).ok();
    qemu_img(&["bitmap", "--add", s(&bm), "b2"]).ok();
    let raw = sc.path("src.raw");
    qemu_img(&["convert", "-O", "raw", s(&q), s(&raw)]).ok();
    let v2 = sc.path("v2.qcow2");
    qemu_img(&["convert", "-O", "qcow2", "-o", "compat=0.10", s(&q), s(&v2)]).ok();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--size", "1G", "-O", "qcow2"],
        vec!["--size", "1G", "-O", "raw"],
        vec!["--size", "1000", "-O", "raw"],
        vec!["--size", "3G", "-O", "qcow2", "--output=json"],
        vec![
            "--size",
            "100G",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=2M",
        ],
        vec![
            "--size",
            "10G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
        ],
        vec![s(&q)],
        vec!["-O", "qcow2", s(&q)],
        vec![
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            s(&q),
        ],
        vec![
            "-O",
            "qcow2",
            "--output=json",
            "-o",
            "preallocation=full",
            s(&q),
        ],
        vec!["-O", "qcow2", "-o", "compat=0.10", s(&q)],
        vec!["-O", "qcow2", "-o", "backing_file=x,backing_fmt=raw", s(&q)],
        vec!["-O", "qcow2", s(&raw)],
        vec!["-O", "qcow2", s(&v2)],
        vec!["-O", "qcow2", s(&bm)],
        vec![
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "--output=json",
            s(&bm),
        ],
    ];
    for c in &cases {
        let mut a = vec!["measure"];
        a.extend(c.iter().copied());
        let qr = qemu_img(&a);
        let ir = imgloop(&a);
        assert_eq!(qr.code, 0, "{c:?}: {}", qr.stderr);
        assert_eq!(ir.code, 0, "{c:?}: {}", ir.stderr);
        assert_eq!(ir.stdout, qr.stdout, "{c:?}");
    }
    // With a LUKS target (qemu-img wants the secret to measure).
    let obj = "secret,id=s,data=x";
    for o in ["encrypt.format=luks,encrypt.key-secret=s", "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,cluster_size=512"] {
        let a = ["measure", "--object", obj, "-O", "qcow2", "--size", "64M", "-o", o];
        assert_eq!(imgloop(&a).ok().stdout, qemu_img(&a).ok().stdout, "{o}");
    }
    // Errors.
    for (args, want) in [
        (
            vec!["measure", "--size", "1G", s(&q)],
            "--size N cannot be used together with a filename",
        ),
        (
            vec!["measure"],
            "Either --size N or one filename must be specified",
        ),
        (
            vec!["measure", "-O", "vhdx", s(&q)],
            "does not support size measurement",
        ),
    ] {
        let ir = imgloop(&args);
        assert_eq!((ir.code, qemu_img(&args).code), (1, 1), "{args:?}");
        assert!(ir.stderr.contains(want), "{args:?}: {}", ir.stderr);
    }
}
