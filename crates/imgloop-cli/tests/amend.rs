//! `imgloop amend` against qemu-img: every amendable qcow2 option, the
//! image read by qemu-img afterwards (`check`, `compare`, `info`), LUKS
//! key slots added and erased with qemu-io unlocking the result, and
//! qemu-img's messages for what cannot be amended.

mod common;
use common::*;
use std::path::Path;

fn make(sc: &Scratch, opts: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = sc.path("a.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&img), "8M"]);
    imgloop(&args).ok();
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 1M",
            "write -z 2M 1M",
            "write -P 2 4M 64k",
            "write -z 4M 64k",
            "write -c -P 3 6M 64k",
        ],
    )
    .ok();
    let reference = sc.path("ref.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&reference)]).ok();
    (img, reference)
}

fn assert_same_and_clean(img: &Path, reference: &Path, what: &str) {
    let c = qemu_img(&["check", s(img)]);
    assert_eq!(c.code, 0, "{what}: {}{}", c.stdout, c.stderr);
    let r = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(img), s(reference)]);
    assert_eq!(r.code, 0, "{what}: {}", r.stdout);
}

fn specific(img: &Path) -> serde_json::Value {
    qemu_img(&["info", "--output=json", s(img)]).ok().json()["format-specific"]["data"].clone()
}

#[test]
fn amended_options_are_what_qemu_img_reads_and_the_data_stays() {
    let sc = Scratch::new();
    let (img, reference) = make(&sc, "cluster_size=4096");
    imgloop(&["snapshot", "-c", "s", s(&img)]).ok();
    for bits in [8u64, 32, 64, 16] {
        imgloop(&["amend", "-o", &format!("refcount_bits={bits}"), s(&img)]).ok();
        assert_same_and_clean(&img, &reference, &format!("refcount_bits={bits}"));
        assert_eq!(specific(&img)["refcount-bits"], bits);
    }
    // Narrow refcounts cannot count the snapshot's second references (nor
    // the 32 compressed streams sharing a cluster).
    let r = imgloop(&["amend", "-o", "refcount_bits=1", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Cannot decrease refcount entry width to 1 bits"),
        "{}",
        r.stderr
    );
    imgloop(&["amend", "-o", "lazy_refcounts=on", s(&img)]).ok();
    assert_eq!(specific(&img)["lazy-refcounts"], true);
    assert_same_and_clean(&img, &reference, "lazy on");
    // Downgrade: lazy refcounts go, zero clusters become unallocated.
    imgloop(&["amend", "-o", "compat=0.10", s(&img)]).ok();
    assert_eq!(specific(&img)["compat"], "0.10");
    assert_same_and_clean(&img, &reference, "compat=0.10");
    let snap = sc.path("snap.raw");
    qemu_img(&["convert", "-l", "s", "-O", "raw", s(&img), s(&snap)]).ok();
    assert!(std::fs::read(&snap).unwrap() == std::fs::read(&reference).unwrap());
    imgloop(&["amend", "-p", "-o", "compat=1.1", s(&img)]).ok();
    assert_eq!(specific(&img)["compat"], "1.1");
    assert_same_and_clean(&img, &reference, "compat=1.1");
    // size, both ways.
    imgloop(&["amend", "-o", "size=16M", s(&img)]).ok();
    assert_eq!(
        qemu_img(&["info", "--output=json", s(&img)]).json()["virtual-size"],
        16 << 20
    );
    imgloop(&["amend", "-o", "size=8M", s(&img)]).ok();
    assert_same_and_clean(&img, &reference, "size back to 8M");
}

#[test]
fn a_downgrade_over_a_backing_file_keeps_zeroes_zero() {
    let sc = Scratch::new();
    let base = sc.path("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]).ok();
    qemu_io("raw", &base, &["write -P 0x5a 0 4M"]).ok();
    let top = sc.path("top.qcow2");
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&top),
    ])
    .ok();
    qemu_io("qcow2", &top, &["write -z 1M 128k", "write -P 7 2M 64k"]).ok();
    let before = sc.path("before.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&before)]).ok();
    imgloop(&["amend", "-o", "compat=0.10", s(&top)]).ok();
    assert_same_and_clean(&top, &before, "downgrade over a backing file");
}

#[test]
fn amend_refuses_what_qemu_img_refuses() {
    let sc = Scratch::new();
    let (img, _) = make(&sc, "");
    for (opts, want) in [
        ("cluster_size=4096", "only supported for image creation"),
        ("foo=1", "Invalid parameter 'foo'"),
        ("compat=1.2", "Unknown compatibility level 1.2"),
        ("refcount_bits=3", "Refcount width must be a power of two"),
        (
            "compat=0.10,refcount_bits=8",
            "compat=0.10 requires refcount_bits=16",
        ),
        (
            "compat=0.10,lazy_refcounts=on",
            "Lazy refcounts only supported",
        ),
        ("backing_file=x.qcow2", "Cannot amend the backing file"),
        (
            "data_file=x.raw",
            "data-file can only be set for images that use an external data file",
        ),
        (
            "data_file_raw=on",
            "data-file-raw cannot be set on existing images",
        ),
    ] {
        let q = qemu_img(&["amend", "-o", opts, s(&img)]);
        let i = imgloop(&["amend", "-o", opts, s(&img)]);
        assert_eq!((q.code, i.code), (1, 1), "{opts}: {}", i.stderr);
        assert!(i.stderr.contains(want), "{opts}: {}", i.stderr);
    }
    let r = imgloop(&["amend", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("Must specify options (-o)"));
    let raw = sc.path("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]).ok();
    let r = imgloop(&["amend", "-f", "raw", "-o", "size=2M", s(&raw)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Format driver 'raw' does not support option amendment"),
        "{}",
        r.stderr
    );
    // -o help lists what qemu-img lists.
    let q = qemu_img(&["amend", "-o", "help", "-f", "qcow2", s(&img)]);
    let i = imgloop(&["amend", "-o", "help", "-f", "qcow2", s(&img)]);
    assert_eq!(i.stdout, q.stdout);
    // A data file is renamed; zstd without compressed clusters downgrades.
    let d = sc.path("d.qcow2");
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&sc.path("d.raw"))),
        s(&d),
        "1M",
    ])
    .ok();
    imgloop(&[
        "amend",
        "-o",
        &format!("data_file={}", s(&sc.path("e.raw"))),
        s(&d),
    ])
    .ok();
    std::fs::rename(sc.path("d.raw"), sc.path("e.raw")).unwrap();
    assert_eq!(specific(&d)["data-file"], s(&sc.path("e.raw")));
    assert_eq!(qemu_img(&["check", s(&d)]).code, 0);
    let r = imgloop(&["amend", "-o", "compat=0.10", s(&d)]);
    assert!(
        r.stderr
            .contains("Cannot downgrade an image with a data file"),
        "{}",
        r.stderr
    );
    let z = sc.path("z.qcow2");
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&z),
        "1M",
    ])
    .ok();
    imgloop(&["amend", "-o", "compat=0.10", s(&z)]).ok();
    assert_eq!(specific(&z)["compression-type"], "zlib");
    let c = qemu_img(&["check", s(&z)]);
    assert_eq!(c.code, 0);
    let z2 = sc.path("z2.qcow2");
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&z2),
        "1M",
    ])
    .ok();
    qemu_io("qcow2", &z2, &["write -c -P 1 0 64k"]).ok();
    let r = imgloop(&["amend", "-o", "compat=0.10", s(&z2)]);
    assert!(
        r.stderr
            .contains("zstd compression type and existing compressed clusters"),
        "{}",
        r.stderr
    );
}

#[test]
fn luks_key_slots_are_added_and_erased_as_qemu_img_does() {
    let sc = Scratch::new();
    let img = sc.path("k.qcow2");
    let one = "secret,id=s1,data=first-pass";
    let two = "secret,id=s2,data=second-pass";
    let opts = |id: &str| {
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret={id}",
            s(&img)
        )
    };
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        one,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10",
        s(&img),
        "1M",
    ])
    .ok();
    let read_with = |obj: &str, id: &str| {
        std::process::Command::new("qemu-io")
            .args([
                "--object",
                obj,
                "--image-opts",
                "-c",
                "read -P 9 0 64k",
                &opts(id),
            ])
            .output()
            .unwrap()
    };
    let r = std::process::Command::new("qemu-io")
        .args([
            "--object",
            one,
            "--image-opts",
            "-c",
            "write -P 9 0 64k",
            &opts("s1"),
        ])
        .output()
        .unwrap();
    assert!(r.status.success());
    // Add slot 1 with the second passphrase; qemu-io unlocks with it.
    imgloop(&[
        "amend",
        "--object",
        one,
        "--object",
        two,
        "-o",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=10",
        "--image-opts",
        &opts("s1"),
    ])
    .ok();
    let r = read_with(two, "s2");
    assert!(
        r.status.success() && !String::from_utf8_lossy(&r.stdout).contains("verification failed")
    );
    let info = qemu_img(&["info", "--output=json", s(&img)]).json();
    let slots = &info["format-specific"]["data"]["encrypt"]["slots"];
    assert_eq!(
        (slots[0]["active"].clone(), slots[1]["active"].clone()),
        (true.into(), true.into())
    );
    // Refusals, with qemu's words.
    for (o, want) in [
        (
            "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=0",
            "Refusing to overwrite active keyslot 0",
        ),
        (
            "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=9",
            "Invalid keyslot 9 specified",
        ),
        (
            "encrypt.state=active",
            "'new-secret' is required to activate a keyslot",
        ),
        (
            "encrypt.state=inactive",
            "either explicit keyslot index or the password",
        ),
        (
            "encrypt.state=inactive,encrypt.keyslot=5",
            "Given keyslot 5 is already erased",
        ),
    ] {
        let r = imgloop(&[
            "amend",
            "--object",
            one,
            "--object",
            two,
            "-o",
            o,
            "--image-opts",
            &opts("s1"),
        ]);
        assert_eq!(r.code, 1, "{o}");
        assert!(r.stderr.contains(want), "{o}: {}", r.stderr);
    }
    // Erase slot 0 by its passphrase: the first no longer opens.
    imgloop(&[
        "amend",
        "--object",
        one,
        "--object",
        two,
        "-o",
        "encrypt.state=inactive,encrypt.old-secret=s1",
        "--image-opts",
        &opts("s2"),
    ])
    .ok();
    let r = read_with(one, "s1");
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("Invalid password"));
    // The last slot is not erased without --force.
    let r = imgloop(&[
        "amend",
        "--object",
        two,
        "-o",
        "encrypt.state=inactive,encrypt.keyslot=1",
        "--image-opts",
        &opts("s2"),
    ]);
    assert!(
        r.stderr
            .contains("Attempt to erase the only active keyslot 1"),
        "{}",
        r.stderr
    );
    let c = std::process::Command::new("qemu-img")
        .args(["check", "--object", two, "--image-opts", &opts("s2")])
        .output()
        .unwrap();
    assert!(c.status.success());
}
