//! `imgloop rebase` and `imgloop commit` against qemu-img on twin images:
//! the same guest content, the same ranges allocated in the overlay (map
//! without host offsets), clean `qemu-img check`, and qemu-img's messages.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A base (raw, 0x01 everywhere), a new base (0x01, 0x02, zeroes) and a
/// qcow2 overlay over the base with its own 64 KiB at 3 MiB, in `dir`.
fn setup(sc: &Scratch, tag: &str) -> (PathBuf, PathBuf) {
    let base = sc.path(&format!("{tag}-base.raw"));
    let new = sc.path(&format!("{tag}-new.raw"));
    let top = sc.path(&format!("{tag}-top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]).ok();
    qemu_io("raw", &base, &["write -P 1 0 4M"]).ok();
    qemu_img(&["create", "-q", "-f", "raw", s(&new), "4M"]).ok();
    qemu_io("raw", &new, &["write -P 1 0 1M", "write -P 2 1M 1M"]).ok();
    qemu_img(&[
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
    qemu_io("qcow2", &top, &["write -P 9 3M 64k", "write -z 512k 64k"]).ok();
    (top, new)
}

fn content(sc: &Scratch, img: &Path) -> Vec<u8> {
    let out = sc.path("content.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-O", "raw", s(img), s(&out)]).ok();
    std::fs::read(&out).unwrap()
}

/// `map --output=json` of the overlay, host offsets left out.
fn layout(img: &Path) -> Vec<serde_json::Value> {
    let v = qemu_img(&["map", "--output=json", s(img)]).ok().json();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("offset");
            e
        })
        .collect()
}

#[test]
fn rebase_copies_what_differs_as_qemu_img_does() {
    let sc = Scratch::new();
    for (tag, new_arg) in [("to-new", true), ("flatten", false)] {
        let (q, qnew) = setup(&sc, &format!("q-{tag}"));
        let (i, inew) = setup(&sc, &format!("i-{tag}"));
        let before = content(&sc, &i);
        let (qb, ib) = if new_arg {
            (s(&qnew).to_string(), s(&inew).to_string())
        } else {
            (String::new(), String::new())
        };
        let mut qa = vec!["rebase", "-b", &qb];
        let mut ia = vec!["rebase", "-b", &ib];
        if new_arg {
            qa.extend(["-F", "raw"]);
            ia.extend(["-F", "raw"]);
        }
        qa.push(s(&q));
        ia.push(s(&i));
        qemu_img(&qa).ok();
        imgloop(&ia).ok();
        assert!(content(&sc, &i) == before, "{tag}: the guest disk changed");
        assert_eq!(
            layout(&i),
            layout(&q),
            "{tag}: allocation differs from qemu-img's"
        );
        assert_eq!(qemu_img(&["check", s(&i)]).code, 0, "{tag}");
        let info = qemu_img(&["info", "--output=json", s(&i)]).json();
        if new_arg {
            assert_eq!(info["backing-filename"], s(&inew));
            assert_eq!(info["backing-filename-format"], "raw");
        } else {
            assert!(info.get("backing-filename").is_none());
        }
    }
}

#[test]
fn unsafe_rebase_changes_only_the_name_and_errors_match_qemu_img() {
    let sc = Scratch::new();
    let (i, _) = setup(&sc, "u");
    let before = std::fs::read(&i).unwrap();
    imgloop(&["rebase", "-u", "-b", "elsewhere.raw", "-F", "raw", s(&i)]).ok();
    let info = qemu_img(&["info", "--output=json", s(&i)]).json();
    assert_eq!(info["backing-filename"], "elsewhere.raw");
    let after = std::fs::read(&i).unwrap();
    // Only the header cluster changed.
    assert!(before[65536..] == after[65536..]);
    let base = sc.path("u-base.raw");
    let cases: [(&[&str], &str); 4] = [
        (
            &["rebase", s(&i)],
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ),
        (
            &["rebase", "-b", "x.raw", s(&i)],
            "backing format must be specified",
        ),
        (
            &["rebase", "-b", "nothere.raw", "-F", "raw", s(&i)],
            "Could not open new backing file 'nothere.raw'",
        ),
        (
            &[
                "rebase",
                "-u",
                "-b",
                "x.raw",
                "-F",
                "raw",
                "-f",
                "raw",
                s(&base),
            ],
            "Operation not supported",
        ),
    ];
    // (The first three are checked with the old backing file back.)
    imgloop(&["rebase", "-u", "-b", s(&base), "-F", "raw", s(&i)]).ok();
    for (args, want) in cases {
        let q = qemu_img(args);
        let r = imgloop(args);
        assert_eq!((r.code, q.code), (1, 1), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn commit_writes_the_overlay_into_its_base_as_qemu_img_does() {
    let sc = Scratch::new();
    for keep in [false, true] {
        let mk = |tag: &str| {
            let base = sc.path(&format!("{tag}-base.qcow2"));
            let top = sc.path(&format!("{tag}-top.qcow2"));
            qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]).ok();
            qemu_io("qcow2", &base, &["write -P 1 0 4M"]).ok();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(&base),
                "-F",
                "qcow2",
                s(&top),
                "6M",
            ])
            .ok();
            qemu_io(
                "qcow2",
                &top,
                &["write -P 5 1M 100k", "write -z 2M 64k", "write -P 6 5M 4k"],
            )
            .ok();
            (base, top)
        };
        let (qb, qt) = mk(&format!("q{keep}"));
        let (ib, it) = mk(&format!("i{keep}"));
        let want = content(&sc, &it);
        let mut qa = vec!["commit"];
        let mut ia = vec!["commit"];
        if keep {
            qa.push("-d");
            ia.push("-d");
        }
        qa.push(s(&qt));
        ia.push(s(&it));
        let q = qemu_img(&qa).ok();
        let r = imgloop(&ia).ok();
        assert_eq!(r.stdout, q.stdout);
        assert!(
            content(&sc, &ib) == want,
            "keep={keep}: the base does not hold the overlay's disk"
        );
        assert!(
            content(&sc, &it) == want,
            "keep={keep}: the overlay reads differently"
        );
        assert_eq!(content(&sc, &ib), content(&sc, &qb));
        assert_eq!(layout(&it), layout(&qt), "keep={keep}: overlay allocation");
        for f in [&ib, &it] {
            assert_eq!(qemu_img(&["check", s(f)]).code, 0);
        }
    }
    let sc2 = Scratch::new();
    let lone = sc2.path("lone.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&lone), "1M"]).ok();
    let r = imgloop(&["commit", s(&lone)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("does not have a backing file"),
        "{}",
        r.stderr
    );
}

#[test]
fn commit_into_a_deeper_base_writes_every_layer_above_it_as_qemu_img_does() {
    let sc = Scratch::new();
    // base <- mid <- top, each holding data of its own, made twice.
    let mk = |tag: &str| {
        let p = |n: &str| sc.path(&format!("{tag}-{n}.qcow2"));
        let (base, mid, top) = (p("base"), p("mid"), p("top"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]).ok();
        qemu_io("qcow2", &base, &["write -P 1 0 1M", "write -P 4 3M 1M"]).ok();
        for (over, under) in [(&mid, &base), (&top, &mid)] {
            let under = under.file_name().unwrap().to_str().unwrap();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                under,
                "-F",
                "qcow2",
                s(over),
            ])
            .ok();
        }
        qemu_io("qcow2", &mid, &["write -P 2 512k 1M", "write -z 3M 64k"]).ok();
        qemu_io("qcow2", &top, &["write -P 3 1M 1M", "write -z 3584k 4k"]).ok();
        (base, mid, top)
    };
    let (qb, qm, qt) = mk("q");
    let (ib, im, it) = mk("i");
    let view = content(&sc, &it);
    qemu_img(&["commit", "-b", s(&qb), s(&qt)]).ok();
    let r = imgloop(&["commit", "-b", s(&ib), s(&it)]).ok();
    assert_eq!(r.stdout, "Image committed.\n");
    assert!(content(&sc, &ib) == view, "the base holds the whole view");
    assert!(content(&sc, &it) == view, "the top still reads the same");
    // The middle layer is not written (it reads the changed base where it
    // holds nothing: qemu calls it invalidated), as with qemu-img.
    assert!(content(&sc, &im) == content(&sc, &qm));
    assert_eq!(
        layout(&it),
        layout(&qt),
        "-b implies -d: the top keeps its data"
    );
    assert_eq!(layout(&im), layout(&qm));
    assert_eq!(content(&sc, &ib), content(&sc, &qb));
    for f in [&ib, &im, &it] {
        assert_eq!(qemu_img(&["check", s(f)]).code, 0);
    }
    // A base that is not in the chain is refused by both.
    let other = sc.path("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "4M"]).ok();
    let q = qemu_img(&["commit", "-b", s(&other), s(&qt)]);
    let r = imgloop(&["commit", "-b", s(&other), s(&it)]);
    assert_eq!((r.code, q.code), (1, 1));
    assert!(r.stderr.contains("Did not find"), "{}", r.stderr);
    // Naming the direct backing file also keeps the top's data.
    let (jb, jm, _) = mk("j");
    let before = layout(&jm);
    imgloop(&["commit", "-q", "-b", s(&jb), s(&jm)]).ok();
    assert_eq!(layout(&jm), before);
}

#[test]
fn rebase_c_compresses_what_it_copies_as_qemu_img_does() {
    let sc = Scratch::new();
    let base = sc.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]).ok();
    qemu_io("qcow2", &base, &["write -P 1 0 3M", "write -P 9 7M 64k"]).ok();
    let mk = |tag: &str| {
        let top = sc.path(&format!("{tag}.qcow2"));
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
        qemu_io("qcow2", &top, &["write -P 2 1M 100k"]).ok();
        top
    };
    let (q, i) = (mk("q"), mk("i"));
    let want = content(&sc, &i);
    qemu_img(&["rebase", "-c", "-b", "", s(&q)]).ok();
    imgloop(&["rebase", "-c", "-b", "", s(&i)]).ok();
    assert!(content(&sc, &i) == want, "the image reads as before");
    let map = |p: &Path| qemu_img(&["map", "--output=json", s(p)]).ok().json();
    assert_eq!(
        map(&i),
        map(&q),
        "the same clusters compressed as qemu-img's"
    );
    assert!(
        map(&i)
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true),
        "{}",
        map(&i)
    );
    assert_eq!(qemu_img(&["check", s(&i)]).code, 0);
    assert_eq!(
        std::fs::metadata(&i).unwrap().len(),
        std::fs::metadata(&q).unwrap().len()
    );
    // A format without compression is refused, in either mode.
    let vhdx = sc.path("v.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&vhdx), "8M"]).ok();
    for args in [
        vec!["rebase", "-c", "-u", "-b", "", s(&vhdx)],
        vec!["rebase", "-c", "-b", "", s(&vhdx)],
    ] {
        let (qr, ir) = (qemu_img(&args), imgloop(&args));
        assert_eq!((ir.code, qr.code), (1, 1), "{args:?}");
        let msg = "Compression not supported for this file format";
        assert!(ir.stderr.contains(msg), "{}", ir.stderr);
    }
}
