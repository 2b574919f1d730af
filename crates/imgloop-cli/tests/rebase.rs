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
