//! Internal snapshots (qcow2) against qemu-img in both directions:
//! snapshot tables qemu-img writes are listed, read (`convert -l`),
//! applied and deleted by imgloop, and the other way round; `qemu-img
//! check` is clean after every step of a random sequence that mixes both
//! tools; the command line's messages and exit codes match qemu-img's.

mod common;
use common::*;
use std::path::Path;

/// Exports `img` (optionally its snapshot `snap`) to raw with `tool`
/// and returns the bytes.
fn export(sc: &Scratch, tool: fn(&[&str]) -> Run, img: &Path, snap: Option<&str>) -> Vec<u8> {
    let out = sc.path("export.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    if let Some(l) = snap {
        args.extend(["-l", l]);
    }
    args.extend([s(img), s(&out)]);
    tool(&args).ok();
    std::fs::read(&out).unwrap()
}

fn assert_qemu_check_clean(img: &Path, what: &str) {
    let c = qemu_img(&["check", "-f", "qcow2", s(img)]);
    assert_eq!(
        c.code, 0,
        "{what}: qemu-img check:\n{}{}",
        c.stdout, c.stderr
    );
}

/// `snapshot -l` output of both tools.
fn listings(img: &Path) -> (Run, Run) {
    (
        qemu_img(&["snapshot", "-l", s(img)]),
        imgloop(&["snapshot", "-l", s(img)]),
    )
}

#[test]
fn snapshots_qemu_img_takes_are_listed_read_applied_and_deleted_by_imgloop() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=512",
        "compat=0.10",
        "extended_l2=on",
        "cluster_size=4096,refcount_bits=1",
    ] {
        let sc = Scratch::new();
        let img = sc.path("q.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "8M"]).ok();
        qemu_io("qcow2", &img, &["write -P 1 0 3M", "write -c -P 5 4M 128k"]).ok();
        let refcount_1 = opts.contains("refcount_bits=1");
        if refcount_1 {
            // One-bit refcounts cannot count a second reference: both
            // tools refuse, and the image stays clean.
            let i = imgloop(&["snapshot", "-c", "a", s(&img)]);
            assert_eq!(i.code, 1, "{opts}: {}", i.stderr);
            assert!(i.stderr.contains("Invalid argument"), "{}", i.stderr);
            // (qemu-img leaks a cluster when it fails here; imgloop
            // checks before it allocates anything.)
            assert_qemu_check_clean(&img, opts);
            let q = qemu_img(&["snapshot", "-c", "a", s(&img)]);
            assert_eq!(q.code, 1);
            continue;
        }
        qemu_img(&["snapshot", "-c", "a", s(&img)]).ok();
        qemu_io("qcow2", &img, &["write -P 2 1M 1M", "write -z 2M 512k"]).ok();
        let v2 = opts.contains("compat=0.10");
        if v2 {
            // Neither tool resizes a version 2 image with snapshots.
            let q = qemu_img(&["resize", "-q", s(&img), "12M"]);
            let i = imgloop(&["resize", "-q", s(&img), "12M"]);
            assert_eq!((q.code, i.code), (1, 1), "{}", i.stderr);
            assert!(i
                .stderr
                .contains("Can't resize a v2 image which has snapshots"));
        } else {
            qemu_img(&["resize", "-q", s(&img), "12M"]).ok();
        }
        qemu_img(&["snapshot", "-c", "b", s(&img)]).ok();
        qemu_io("qcow2", &img, &["write -P 3 0 64k", "discard 2M 1M"]).ok();
        let (q, i) = listings(&img);
        assert_eq!(i.stdout, q.stdout, "{opts}: snapshot -l differs");
        assert_eq!(i.code, 0);
        // Reading a snapshot without applying it, by name and by ID.
        for l in [
            "a",
            "b",
            "1",
            "snapshot.id=2",
            "snapshot.name=a,snapshot.id=1",
        ] {
            assert!(
                export(&sc, imgloop, &img, Some(l)) == export(&sc, qemu_img, &img, Some(l)),
                "{opts}: convert -l {l} differs"
            );
        }
        let a = export(&sc, qemu_img, &img, Some("a"));
        let b = export(&sc, qemu_img, &img, Some("b"));
        // Apply: the disk and its size become the snapshot's.
        imgloop(&["snapshot", "-a", "a", s(&img)]).ok();
        assert_qemu_check_clean(&img, &format!("{opts}: after apply"));
        // (-l showed `a` at the 12 MiB the disk had; applying it brings
        // back its own 8 MiB.)
        let a = &a[..8 << 20];
        let b = if v2 { &b[..8 << 20] } else { &b[..] };
        assert!(export(&sc, qemu_img, &img, None) == a, "{opts}: apply a");
        imgloop_io("qcow2", &img, &["write -P 7 512k 1M"]).ok();
        assert!(
            export(&sc, qemu_img, &img, Some("a")) == a,
            "{opts}: a changed"
        );
        imgloop(&["snapshot", "-a", "2", s(&img)]).ok();
        assert!(
            export(&sc, qemu_img, &img, None) == b,
            "{opts}: apply b by ID"
        );
        // Delete, by name.
        imgloop(&["snapshot", "-d", "a", s(&img)]).ok();
        assert_qemu_check_clean(&img, &format!("{opts}: after delete"));
        let (q, i) = listings(&img);
        assert_eq!(i.stdout, q.stdout);
        assert!(!q.stdout.contains(" a "), "{opts}: a still listed");
        assert!(
            export(&sc, qemu_img, &img, Some("b")) == b,
            "{opts}: b changed"
        );
        imgloop(&["snapshot", "-d", "b", s(&img)]).ok();
        assert_qemu_check_clean(&img, &format!("{opts}: after the last delete"));
        assert_eq!(qemu_img(&["snapshot", "-l", s(&img)]).stdout, "");
    }
}

#[test]
fn snapshots_imgloop_takes_are_listed_read_applied_and_deleted_by_qemu_img() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=1024,compat=0.10",
        "extended_l2=on",
    ] {
        let sc = Scratch::new();
        let img = sc.path("i.qcow2");
        imgloop(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "8M"]).ok();
        imgloop_io("qcow2", &img, &["write -P 1 0 3M"]).ok();
        imgloop(&["snapshot", "-c", "first", s(&img)]).ok();
        assert_qemu_check_clean(&img, opts);
        imgloop_io("qcow2", &img, &["write -P 2 1M 1M", "write -z 2M 64k"]).ok();
        let v2 = opts.contains("compat=0.10");
        if !v2 {
            imgloop(&["resize", "-q", s(&img), "10M"]).ok();
        }
        imgloop(&["snapshot", "-c", "second", s(&img)]).ok();
        imgloop_io("qcow2", &img, &["write -P 3 0 64k"]).ok();
        assert_qemu_check_clean(&img, opts);
        let (q, i) = listings(&img);
        assert_eq!(i.stdout, q.stdout, "{opts}");
        assert!(q.stdout.contains("first") && q.stdout.contains("second"));
        // info (human and JSON) lists them as qemu-img does.
        let qi = qemu_img(&["info", "--output=json", s(&img)]).json();
        let ii = imgloop(&["info", "--output=json", s(&img)]).json();
        assert_eq!(
            ii["snapshots"], qi["snapshots"],
            "{opts}: info JSON snapshots"
        );
        for l in ["first", "second", "snapshot.id=1"] {
            assert!(
                export(&sc, imgloop, &img, Some(l)) == export(&sc, qemu_img, &img, Some(l)),
                "{opts}: convert -l {l}"
            );
        }
        // -l shows a snapshot at the disk's current size, as qemu-img does.
        let first = export(&sc, imgloop, &img, Some("first"));
        assert_eq!(first.len(), if v2 { 8 << 20 } else { 10 << 20 });
        assert!(first[..1 << 20].iter().all(|&b| b == 1));
        qemu_img(&["snapshot", "-a", "first", s(&img)]).ok();
        let first = &first[..8 << 20];
        assert!(
            export(&sc, imgloop, &img, None) == first,
            "{opts}: qemu applied first"
        );
        qemu_io("qcow2", &img, &["write -P 9 0 2M"]).ok();
        qemu_img(&["snapshot", "-d", "second", s(&img)]).ok();
        assert_qemu_check_clean(&img, opts);
        assert!(export(&sc, imgloop, &img, Some("first")) == first);
        assert_eq!(
            qemu_img(&["info", "--output=json", s(&img)]).json()["virtual-size"],
            8 << 20
        );
        let c = imgloop(&["check", s(&img)]);
        assert_eq!(c.code, 0, "{}", c.stdout);
    }
}

#[test]
fn a_random_sequence_mixing_both_tools_stays_clean_and_matches_a_model() {
    let sc = Scratch::new();
    let img = sc.path("mix.qcow2");
    imgloop(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        "4M",
    ])
    .ok();
    let mut model: Vec<(String, Vec<u8>)> = Vec::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut current = vec![0u8; 4 << 20];
    for step in 0..40 {
        let by_qemu = next(2) == 0;
        let what = format!("step {step} ({})", if by_qemu { "qemu" } else { "imgloop" });
        match next(6) {
            0 | 1 => {
                let off = next(1000) * 4096;
                let len = (1 + next(40)) * 4096;
                let len = len.min((4 << 20) - off);
                let pat = (step % 200 + 1) as u8;
                let cmd = format!("write -P {pat} {off} {len}");
                if by_qemu {
                    qemu_io("qcow2", &img, &[&cmd]).ok();
                } else {
                    imgloop_io("qcow2", &img, &[&cmd]).ok();
                }
                current[off as usize..(off + len) as usize].fill(pat);
            }
            2 | 3 => {
                let name = format!("s{step}");
                let tool = if by_qemu { qemu_img } else { imgloop };
                tool(&["snapshot", "-c", &name, s(&img)]).ok();
                model.push((name, current.clone()));
            }
            4 if !model.is_empty() => {
                let i = next(model.len() as u64) as usize;
                let tool = if by_qemu { qemu_img } else { imgloop };
                tool(&["snapshot", "-a", &model[i].0, s(&img)]).ok();
                current = model[i].1.clone();
            }
            5 if !model.is_empty() => {
                let i = next(model.len() as u64) as usize;
                let tool = if by_qemu { qemu_img } else { imgloop };
                tool(&["snapshot", "-d", &model[i].0, s(&img)]).ok();
                model.remove(i);
            }
            _ => {}
        }
        assert_qemu_check_clean(&img, &what);
        assert!(export(&sc, imgloop, &img, None) == current, "{what}: disk");
    }
    for (name, content) in &model {
        assert!(export(&sc, imgloop, &img, Some(name)) == *content, "{name}");
        assert!(
            export(&sc, qemu_img, &img, Some(name)) == *content,
            "{name}"
        );
    }
}

#[test]
fn snapshot_messages_and_exit_codes_match_qemu_img() {
    let sc = Scratch::new();
    let img = sc.path("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    qemu_img(&["snapshot", "-c", "x", s(&img)]).ok();
    let both = |args: &[&str]| {
        let mut a = vec!["snapshot"];
        a.extend_from_slice(args);
        a.push(s(&img));
        (qemu_img(&a), imgloop(&a))
    };
    for args in [
        &["-l", "-c", "y"][..],
        &["-a", "x", "-d", "x"],
        &["-a", "nope"],
        &["-d", "nope"],
        // -d takes a name, not an ID, in qemu-img.
        &["-d", "1"],
    ] {
        let (q, i) = both(args);
        assert_eq!((i.code, q.code), (1, 1), "{args:?}: {}", i.stderr);
        let first_line = |r: &Run| {
            r.stderr
                .lines()
                .next()
                .unwrap_or("")
                .split_once(": ")
                .map(|(_, m)| m.to_string())
                .unwrap_or_default()
        };
        // Same message after the program (and file) prefix.
        let qm = first_line(&q);
        assert!(
            i.stderr.contains(&qm),
            "{args:?}: qemu-img said {qm:?}, imgloop {:?}",
            i.stderr
        );
    }
    // -q changes nothing for -l; a list of none prints nothing.
    let (q, i) = both(&["-q", "-l"]);
    assert_eq!(i.stdout, q.stdout);
    let raw = sc.path("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]).ok();
    let i = imgloop(&["snapshot", "-f", "raw", "-l", s(&raw)]);
    assert_eq!((i.code, i.stdout.as_str()), (0, ""));
    for args in [["-c", "x"], ["-a", "x"], ["-d", "x"]] {
        let q = qemu_img(&["snapshot", "-f", "raw", args[0], args[1], s(&raw)]);
        let i = imgloop(&["snapshot", "-f", "raw", args[0], args[1], s(&raw)]);
        assert_eq!((i.code, q.code), (1, 1), "{args:?}");
        assert!(i.stderr.contains("Operation not supported"), "{}", i.stderr);
    }
    // External data files and internal snapshots do not mix.
    let d = sc.path("d.qcow2");
    qemu_img(&[
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
    let q = qemu_img(&["snapshot", "-c", "x", s(&d)]);
    let i = imgloop(&["snapshot", "-c", "x", s(&d)]);
    assert_eq!((i.code, q.code), (1, 1));
    assert!(i.stderr.contains("Operation not supported"), "{}", i.stderr);
    // convert -l of a snapshot that is not there fails before creating
    // the target.
    let out = sc.path("out.raw");
    let r = imgloop(&["convert", "-l", "nope", "-O", "raw", s(&img), s(&out)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
    assert!(!out.exists());
    // A listing with -U works on an image another process holds.
    let i = imgloop(&["snapshot", "-U", "-l", s(&img)]);
    assert_eq!(i.code, 0);
    assert!(i.stdout.contains(" x "), "{}", i.stdout);
}
