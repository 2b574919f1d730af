//! Parallels: interop with qemu-img/qemu-io in both directions (cluster
//! sizes 512 B to 2 MiB, convert both ways), `map`/`check` JSON against
//! qemu-img's, version-1 images laid out as Parallels wrote them, images
//! left in use by a killed writer, images damaged the ways `qemu-img
//! check` finds (and the one where qemu-img 10 aborts), a dirty-bitmap
//! extension, and hostile headers.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Writes across cluster edges, whole clusters, zeroes and the disk's end
/// (16 MiB).
const WRITES: &[&str] = &[
    "write -P 0x41 1000 5000",
    "write -P 0x42 1M 64k",
    "write -P 0x43 3145216 1024",
    "write -P 0x44 9M 2M",
    "write -z 9500000 70000",
    "write -P 0x45 16776704 512",
];

fn twin(sc: &Scratch, name: &str, cmds: &[&str]) -> PathBuf {
    let t = sc.path(name);
    qemu_img(&["create", "-q", "-f", "raw", s(&t), "16M"]).ok();
    qemu_io("raw", &t, cmds).ok();
    t
}

fn create(tool: fn(&[&str]) -> Run, img: &Path, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "parallels"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(img), "16M"]);
    tool(&args).ok();
}

/// The two tools' JSON outputs are equal (file names aside).
fn json_eq(a: &Run, b: &Run, what: &str) {
    let strip = |r: &Run| {
        let mut v = r.json();
        if let Some(o) = v.as_object_mut() {
            o.remove("filename");
        }
        v
    };
    assert_eq!(
        strip(a),
        strip(b),
        "{what}\nqemu-img:\n{}\nimgloop:\n{}",
        a.stdout,
        b.stdout
    );
}

#[test]
fn images_qemu_img_makes_and_writes_read_identically_and_map_and_check_alike() {
    for opts in [
        "",
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=64k",
        "cluster_size=2M",
    ] {
        let sc = Scratch::new();
        let img = sc.path("q.prl");
        create(qemu_img, &img, opts);
        qemu_io("parallels", &img, WRITES).ok();
        assert_reads_like_qemu(&sc, "parallels", &img);
        let q = qemu_img(&["map", "--output=json", "-f", "parallels", s(&img)]).ok();
        let i = imgloop(&["map", "--output=json", "-f", "parallels", s(&img)]).ok();
        json_eq(&q, &i, opts);
        let q = qemu_img(&["check", "--output=json", "-f", "parallels", s(&img)]).ok();
        let i = imgloop(&["check", "--output=json", "-f", "parallels", s(&img)]).ok();
        json_eq(&q, &i, opts);
        let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
        assert_eq!(info["format"], "parallels");
        assert_eq!(info["virtual-size"], 16 << 20);
        imgloop(&["compare", s(&img), s(&twin(&sc, "t.raw", WRITES))]).ok();
    }
}

#[test]
fn images_imgloop_makes_and_writes_pass_qemu_img_check_and_compare() {
    for opts in [
        "",
        "cluster_size=512",
        "cluster_size=64k",
        "cluster_size=2M",
    ] {
        let sc = Scratch::new();
        let (ours, theirs) = (sc.path("i.prl"), sc.path("q.prl"));
        create(imgloop, &ours, opts);
        create(qemu_img, &theirs, opts);
        // The same header and the same file.
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{opts}"
        );
        imgloop_io("parallels", &ours, WRITES).ok();
        let t = twin(&sc, "t.raw", WRITES);
        assert_qemu_accepts("parallels", &ours, &t, "raw");
        // Closed cleanly: not in use, no preallocated tail left.
        let c = qemu_img(&["check", "--output=json", "-f", "parallels", s(&ours)])
            .ok()
            .json();
        assert_eq!(c["leaks"], serde_json::Value::Null, "{c}");
        assert_eq!(
            std::fs::metadata(&ours).unwrap().len(),
            c["image-end-offset"].as_u64().unwrap()
        );
        // qemu-io writes on top; both tools agree.
        qemu_io(
            "parallels",
            &ours,
            &["write -P 0x51 5M 4k", "write -P 0x52 15M 1M"],
        )
        .ok();
        assert_reads_like_qemu(&sc, "parallels", &ours);
        let c = imgloop(&["check", s(&ours)]);
        assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    }
}

#[test]
fn convert_to_and_from_parallels_matches_qemu_img() {
    let sc = Scratch::new();
    let src = twin(
        &sc,
        "src.raw",
        &["write -P 0x61 0 3M", "write -P 0x62 10M 2M"],
    );
    let ours = sc.path("ours.prl");
    imgloop(&["convert", "-O", "parallels", s(&src), s(&ours)]).ok();
    assert_qemu_accepts("parallels", &ours, &src, "raw");
    assert!(allocated(&ours) < 7 * MIB, "{} allocated", allocated(&ours));
    let theirs = sc.path("theirs.prl");
    qemu_img(&["convert", "-O", "parallels", s(&src), s(&theirs)]).ok();
    imgloop(&["compare", s(&theirs), s(&src)]).ok();
    let back = sc.path("back.raw");
    imgloop(&["convert", "-O", "raw", s(&theirs), s(&back)]).ok();
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
}

/// A version-1 image (`WithoutFreeSpace`: entries count sectors) as old
/// Parallels versions wrote it: 32 KiB clusters, data right after the BAT
/// (`data_off` 0), clusters written in the order the guest touched them.
fn version1(sc: &Scratch) -> (PathBuf, PathBuf) {
    let img = sc.path("v1.hdd");
    let mut b = vec![0u8; 64 + 4 * 512];
    b[0..16].copy_from_slice(b"WithoutFreeSpace");
    for (at, v) in [(16, 2u32), (20, 16), (24, 32), (28, 64), (32, 512)] {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[36..44].copy_from_slice(&32768u64.to_le_bytes());
    // Clusters 7, 2 and 511, at sectors 64, 128, 192.
    let raw = sc.path("v1.raw");
    let mut disk = vec![0u8; 16 << 20];
    let mut data = Vec::new();
    for (n, (cluster, byte)) in [(7usize, 0x71u8), (2, 0x72), (511, 0x73)]
        .iter()
        .enumerate()
    {
        let sector = 64 * (n as u32 + 1);
        b[64 + 4 * cluster..68 + 4 * cluster].copy_from_slice(&sector.to_le_bytes());
        disk[cluster * 32768..(cluster + 1) * 32768].fill(*byte);
        data.push(vec![*byte; 32768]);
    }
    b.resize(64 * 512, 0);
    for d in data {
        b.extend_from_slice(&d);
    }
    std::fs::write(&img, &b).unwrap();
    std::fs::write(&raw, &disk).unwrap();
    (img, raw)
}

#[test]
fn version_1_images_read_like_qemu_and_take_writes_qemu_reads() {
    let sc = Scratch::new();
    let (img, raw) = version1(&sc);
    assert_reads_like_qemu(&sc, "parallels", &img);
    imgloop(&["compare", s(&img), s(&raw)]).ok();
    let q = qemu_img(&["check", "--output=json", "-f", "parallels", s(&img)]).ok();
    let i = imgloop(&["check", "--output=json", "-f", "parallels", s(&img)]).ok();
    json_eq(&q, &i, "version 1");
    imgloop_io(
        "parallels",
        &img,
        &["write -P 0x74 100000 1000", "write -P 0x75 2M 64k"],
    )
    .ok();
    qemu_io(
        "parallels",
        &img,
        &[
            "read -P 0x74 100000 1000",
            "read -P 0x75 2M 64k",
            "read -P 0x72 65536 1000",
        ],
    )
    .ok();
    qemu_img(&["check", "-f", "parallels", s(&img)]).ok();
    let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    assert_eq!(info["format-specific"]["data"]["version"], 1);
}

/// qemu-io writes, then the image is left as a killed writer leaves it:
/// in use, with a preallocated tail.
fn left_in_use(sc: &Scratch) -> PathBuf {
    let img = sc.path("inuse.prl");
    create(qemu_img, &img, "");
    qemu_io(
        "parallels",
        &img,
        &["write -P 0x21 0 4k", "write -P 0x22 5M 64k"],
    )
    .ok();
    let mut b = std::fs::read(&img).unwrap();
    b[44..48].copy_from_slice(&0x746f_6e59u32.to_le_bytes());
    b.resize(b.len() + 8 * MIB as usize, 0);
    std::fs::write(&img, &b).unwrap();
    img
}

#[test]
fn an_image_left_in_use_reads_read_only_unchanged_and_a_read_write_open_repairs_it() {
    let sc = Scratch::new();
    let img = left_in_use(&sc);
    let before = std::fs::read(&img).unwrap();
    imgloop(&["io", "-r", "-c", "read -P 0x22 5M 64k", s(&img)]).ok();
    imgloop(&["convert", "-O", "raw", s(&img), s(&sc.path("out.raw"))]).ok();
    let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    assert_eq!(info["format-specific"]["data"]["in-use"], true);
    // check: the same findings, counts and exit code as qemu-img.
    let q = qemu_img(&["check", "--output=json", "-f", "parallels", s(&img)]);
    let i = imgloop(&["check", "--output=json", "-f", "parallels", s(&img)]);
    assert_eq!((i.code, q.code), (2, 2), "{}{}", i.stdout, i.stderr);
    json_eq(&q, &i, "in use");
    assert!(
        i.stderr.contains("ERROR image was not closed correctly"),
        "{}",
        i.stderr
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only command changed the image"
    );
    // A read-write open repairs first and says so.
    let w = imgloop(&["io", "-c", "write -P 0x23 1M 4k", s(&img)]).ok();
    assert!(
        w.stderr
            .contains("Repairing image was not closed correctly"),
        "{}",
        w.stderr
    );
    assert!(
        w.stderr
            .contains("Repairing space leaked at the end of the image"),
        "{}",
        w.stderr
    );
    qemu_img(&["check", "-f", "parallels", s(&img)]).ok();
    qemu_io(
        "parallels",
        &img,
        &["read -P 0x21 0 4k", "read -P 0x23 1M 4k"],
    )
    .ok();
}

#[test]
fn check_and_repair_match_qemu_img_on_damaged_images() {
    type Damage = fn(&mut Vec<u8>);
    // (what, damage, qemu-img's exit code for check, for check -r all)
    let cases: [(&str, Damage, i32); 4] = [
        (
            "duplicate",
            |b| b[64 + 4..64 + 8].copy_from_slice(&1u32.to_le_bytes()),
            2,
        ),
        ("leak", |b| b.resize(b.len() + 3 * MIB as usize, 0), 3),
        ("short leak", |b| b.resize(b.len() + 1000, 0), 3),
        (
            "data_off",
            |b| b[48..52].copy_from_slice(&u32::MAX.to_le_bytes()),
            2,
        ),
    ];
    for (what, damage, rc) in cases {
        let sc = Scratch::new();
        let img = sc.path("d.prl");
        create(qemu_img, &img, "");
        qemu_io(
            "parallels",
            &img,
            &[
                "write -P 1 0 4k",
                "write -P 2 1M 4k",
                "write -P 3 2M 4k",
                "write -P 4 3M 4k",
            ],
        )
        .ok();
        let mut b = std::fs::read(&img).unwrap();
        damage(&mut b);
        std::fs::write(&img, &b).unwrap();
        let q = qemu_img(&["check", "--output=json", "-f", "parallels", s(&img)]);
        let i = imgloop(&["check", "--output=json", "-f", "parallels", s(&img)]);
        assert_eq!(
            (q.code, i.code),
            (rc, rc),
            "{what}: {}{}",
            i.stdout,
            i.stderr
        );
        json_eq(&q, &i, what);
        let (qc, ic) = (sc.path("q.prl"), sc.path("i.prl"));
        std::fs::copy(&img, &qc).unwrap();
        std::fs::copy(&img, &ic).unwrap();
        let q = qemu_img(&[
            "check",
            "-r",
            "all",
            "--output=json",
            "-f",
            "parallels",
            s(&qc),
        ]);
        let i = imgloop(&[
            "check",
            "-r",
            "all",
            "--output=json",
            "-f",
            "parallels",
            s(&ic),
        ]);
        assert_eq!((q.code, i.code), (0, 0), "{what}: {}{}", i.stdout, i.stderr);
        json_eq(&q, &i, what);
        qemu_img(&["check", "-f", "parallels", s(&ic)]).ok();
        qemu_img(&[
            "compare",
            "-f",
            "parallels",
            "-F",
            "parallels",
            s(&ic),
            s(&qc),
        ])
        .ok();
    }
}

#[test]
fn an_entry_past_the_end_is_reported_and_repaired_where_qemu_img_aborts() {
    let sc = Scratch::new();
    let img = sc.path("eof.prl");
    create(qemu_img, &img, "");
    qemu_io("parallels", &img, &["write -P 1 0 4k", "write -P 2 1M 4k"]).ok();
    let mut b = std::fs::read(&img).unwrap();
    b[64 + 8..64 + 12].copy_from_slice(&1000u32.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    // qemu-img 10 stops on an assertion here (exit 134).
    let q = qemu_img(&["check", "-f", "parallels", s(&img)]);
    assert_ne!(q.code, 0);
    let i = imgloop(&["check", "--output=json", s(&img)]);
    assert_eq!(i.code, 2, "{}{}", i.stdout, i.stderr);
    assert_eq!(i.json()["corruptions"], 1);
    assert!(
        i.stderr.contains("ERROR cluster 2 is outside image"),
        "{}",
        i.stderr
    );
    imgloop(&["check", "-r", "all", s(&img)]).ok();
    qemu_img(&["check", "-f", "parallels", s(&img)]).ok();
    qemu_io(
        "parallels",
        &img,
        &["read -P 1 0 4k", "read -P 2 1M 4k", "read -P 0 2M 4k"],
    )
    .ok();
}

#[test]
fn a_dirty_bitmap_extension_is_listed_and_detached_by_a_write() {
    let sc = Scratch::new();
    let img = sc.path("bm.prl");
    create(qemu_img, &img, "");
    let mut b = std::fs::read(&img).unwrap();
    // The extension cluster at 1 MiB: magic, MD5 of the rest, one bitmap
    // feature (64 KiB granules, one L1 entry: all bits set), end marker.
    let mut c = vec![0u8; MIB as usize];
    c[0..8].copy_from_slice(&0xab23_4cef_23dc_ea87u64.to_le_bytes());
    c[24..32].copy_from_slice(&0x2038_5fae_252c_b34au64.to_le_bytes());
    c[40..44].copy_from_slice(&40u32.to_le_bytes());
    c[48..56].copy_from_slice(&32768u64.to_le_bytes());
    c[56..72].copy_from_slice(&[0xab; 16]);
    c[72..76].copy_from_slice(&128u32.to_le_bytes());
    c[76..80].copy_from_slice(&1u32.to_le_bytes());
    c[80..88].copy_from_slice(&1u64.to_le_bytes());
    let sum = md5_of(&c[24..]);
    c[8..24].copy_from_slice(&sum);
    b.extend_from_slice(&c);
    b[56..64].copy_from_slice(&2048u64.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    // qemu-img reads it (read-only), but counts the extension's cluster
    // as leaked space (and `-r leaks` would cut it off); imgloop keeps it.
    assert_eq!(qemu_img(&["check", "-f", "parallels", s(&img)]).code, 3);
    let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(
        bitmaps[0]["name"], "abababab-abab-abab-abab-abababababab",
        "{info}"
    );
    assert_eq!(bitmaps[0]["granularity"], 65536);
    imgloop(&["check", s(&img)]).ok();
    imgloop_io("parallels", &img, &["write -P 9 0 4k"]).ok();
    let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    assert!(
        info["format-specific"]["data"]["bitmaps"].is_null(),
        "{info}"
    );
    qemu_img(&["check", "-f", "parallels", s(&img)]).ok();
    qemu_io("parallels", &img, &["read -P 9 0 4k"]).ok();
}

/// MD5 through coreutils' md5sum (the test needs no crate for it).
fn md5_of(data: &[u8]) -> [u8; 16] {
    use std::io::Write;
    let mut p = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(data).unwrap();
    let out = p.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    let mut sum = [0u8; 16];
    for (i, b) in sum.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    sum
}

#[test]
fn hostile_headers_give_clear_errors_and_change_nothing() {
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, Edit, &str); 6] = [
        (
            "tracks 0",
            |b| b[28..32].copy_from_slice(&0u32.to_le_bytes()),
            "Zero sectors per track",
        ),
        (
            "huge cluster",
            |b| b[28..32].copy_from_slice(&u32::MAX.to_le_bytes()),
            "Too big cluster",
        ),
        (
            "huge BAT",
            |b| b[32..36].copy_from_slice(&0x1fff_ffffu32.to_le_bytes()),
            "BAT",
        ),
        (
            "huge catalog",
            |b| b[32..36].copy_from_slice(&u32::MAX.to_le_bytes()),
            "Catalog too large",
        ),
        (
            "size past the BAT",
            |b| b[36..44].copy_from_slice(&(u64::MAX / 512).to_le_bytes()),
            "covers only",
        ),
        (
            "ext_off",
            |b| b[56..64].copy_from_slice(&u64::MAX.to_le_bytes()),
            "Too big offset",
        ),
    ];
    for (what, edit, msg) in cases {
        let sc = Scratch::new();
        let img = sc.path("h.prl");
        create(qemu_img, &img, "");
        let mut b = std::fs::read(&img).unwrap();
        edit(&mut b);
        std::fs::write(&img, &b).unwrap();
        for args in [
            vec!["info", "-f", "parallels", s(&img)],
            vec!["check", "-f", "parallels", s(&img)],
            vec![
                "convert",
                "-f",
                "parallels",
                "-O",
                "raw",
                s(&img),
                "/dev/null",
            ],
        ] {
            let r = imgloop(&args);
            assert_eq!(r.code, 1, "{what}: {args:?}: {}", r.stderr);
            assert!(
                r.stderr.contains(msg) && r.stderr.contains("h.prl"),
                "{what}: {}",
                r.stderr
            );
        }
        assert!(std::fs::read(&img).unwrap() == b, "{what}: changed");
    }
}

/// qemu's name for image `top` over parallels image `base` (qemu has no
/// bundle support: the chain is spelled out).
fn qemu_chain(top: &Path, base: &Path) -> String {
    format!(
        r#"json:{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}},"backing":{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}}}}}}"#,
        s(top),
        s(base)
    )
}

const TOP: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
const BASE: &str = "{8e0b4a36-2c4b-4d7b-9a43-6a1fe0c1a001}";

/// A DiskDescriptor.xml for `base.hds` and its snapshot `snap.hds` (the
/// top image), 16 MiB, 1 MiB clusters, as Parallels Desktop writes one.
fn descriptor(base_file: &str) -> String {
    format!(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>32768</Disk_size>
        <Cylinders>32</Cylinders>
        <Heads>16</Heads>
        <Sectors>64</Sectors>
        <Padding>0</Padding>
        <Miscellaneous><CompatLevel>level2</CompatLevel><Bootable>1</Bootable><SuspendState>0</SuspendState></Miscellaneous>
        <Name>disk</Name>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>32768</End>
            <Blocksize>2048</Blocksize>
            <Image><GUID>{BASE}</GUID><Type>Compressed</Type><File>{base_file}</File></Image>
            <Image><GUID>{TOP}</GUID><Type>Compressed</Type><File>snap.hds</File></Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <TopGUID>{TOP}</TopGUID>
        <Shot><GUID>{BASE}</GUID><ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID></Shot>
        <Shot><GUID>{TOP}</GUID><ParentGUID>{BASE}</ParentGUID></Shot>
    </Snapshots>
</Parallels_disk_image>
"#
    )
}

#[test]
fn a_disk_bundle_opens_as_its_top_image_over_its_parent_like_qemus_explicit_chain() {
    let sc = Scratch::new();
    let dir = sc.path("disk.hdd");
    std::fs::create_dir(&dir).unwrap();
    let (base, snap) = (dir.join("base.hds"), dir.join("snap.hds"));
    create(qemu_img, &base, "");
    qemu_io(
        "parallels",
        &base,
        &["write -P 0x11 0 3M", "write -P 0x12 9M 1M"],
    )
    .ok();
    create(qemu_img, &snap, "");
    std::fs::write(dir.join("DiskDescriptor.xml"), descriptor("base.hds")).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    // qemu writes into the snapshot through an explicit chain.
    let chain = qemu_chain(&snap, &base);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x21 1M 4k",
            "-c",
            "write -P 0x22 9M 512",
            &chain,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let theirs = sc.path("theirs.raw");
    qemu_img(&["convert", "-O", "raw", &chain, s(&theirs)]).ok();
    // imgloop opens the directory: the top image over its parent.
    let ours = sc.path("ours.raw");
    imgloop(&["convert", "-O", "raw", s(&dir), s(&ours)]).ok();
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    let info = imgloop(&["info", "--output=json", "--backing-chain", s(&dir)])
        .ok()
        .json();
    let chain_info = info.as_array().unwrap();
    assert_eq!(chain_info.len(), 2, "{info}");
    assert_eq!(chain_info[0]["backing-filename"], "base.hds");
    assert_eq!(chain_info[0]["format-specific"]["data"]["bundle-guid"], TOP);
    // imgloop writes through the bundle (copying the rest of a cluster from
    // the parent); qemu's chain reads the same; the parent is unchanged.
    imgloop_io(
        "parallels",
        &dir,
        &["write -P 0x31 2M 4k", "write -z 9M 4k"],
    )
    .ok();
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the parent changed"
    );
    let check = qemu_img(&["check", "-f", "parallels", s(&snap)]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    imgloop(&["convert", "-O", "raw", s(&dir), s(&ours)]).ok();
    qemu_img(&["convert", "-O", "raw", &chain, s(&theirs)]).ok();
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    qemu_io(
        "raw",
        &ours,
        &[
            "read -P 0x11 2101248 1044480",
            "read -P 0x31 2M 4k",
            "read -P 0 9M 4k",
            "read -P 0x12 9441280 1044480",
        ],
    )
    .ok();
    // Names in the descriptor cannot leave the bundle; bad XML is an error.
    for (text, msg) in [
        (descriptor("../base.hds"), "outside the bundle directory"),
        (
            descriptor("base.hds").replace("</Snapshots>", ""),
            "not valid XML",
        ),
    ] {
        std::fs::write(dir.join("DiskDescriptor.xml"), text).unwrap();
        let r = imgloop(&["info", s(&dir)]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains(msg) && r.stderr.contains("DiskDescriptor.xml"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn create_with_a_backing_file_makes_a_bundle_snapshot_that_qemu_reads_through_the_chain() {
    let sc = Scratch::new();
    let dir = sc.path("disk.hdd");
    std::fs::create_dir(&dir).unwrap();
    let (base, snap, snap2) = (
        dir.join("base.hds"),
        dir.join("snap.hds"),
        dir.join("snap2.hds"),
    );
    create(qemu_img, &base, "cluster_size=64k");
    qemu_io("parallels", &base, &["write -P 0x11 0 3M"]).ok();
    let base_bytes = std::fs::read(&base).unwrap();
    // The descriptor is made, then extended.
    for (child, parent) in [(&snap, "base.hds"), (&snap2, "snap.hds")] {
        imgloop(&[
            "create",
            "-q",
            "-f",
            "parallels",
            "-b",
            parent,
            "-F",
            "parallels",
            s(child),
        ])
        .ok();
    }
    let text = std::fs::read_to_string(dir.join("DiskDescriptor.xml")).unwrap();
    assert_eq!(text.matches("<Image>").count(), 3, "{text}");
    // The new images take the parent's cluster size and size.
    let info = imgloop(&["info", "--output=json", "--backing-chain", s(&dir)])
        .ok()
        .json();
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 3, "{info}");
    assert!(chain[0]["filename"]
        .as_str()
        .unwrap()
        .ends_with("snap2.hds"));
    assert_eq!(chain[0]["cluster-size"], 65536);
    assert_eq!(chain[0]["virtual-size"], 16 << 20);
    imgloop_io(
        "parallels",
        &dir,
        &["write -P 0x22 1M 4k", "write -P 0x23 5M 64k"],
    )
    .ok();
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
    // qemu, given the chain explicitly, reads what imgloop reads.
    let chain = format!(
        r#"json:{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}},"backing":{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}},"backing":{{"driver":"parallels","file":{{"driver":"file","filename":"{}"}}}}}}}}"#,
        s(&snap2),
        s(&snap),
        s(&base)
    );
    let (theirs, ours) = (sc.path("theirs.raw"), sc.path("ours.raw"));
    qemu_img(&["convert", "-O", "raw", &chain, s(&theirs)]).ok();
    imgloop(&["convert", "-O", "raw", s(&dir), s(&ours)]).ok();
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    qemu_io(
        "raw",
        &ours,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 4k",
            "read -P 0x11 1052672 1044480",
            "read -P 0x23 5M 64k",
        ],
    )
    .ok();
    // A backing file in another directory cannot be recorded.
    let other = sc.path("elsewhere.hds");
    let r = imgloop(&[
        "create",
        "-q",
        "-f",
        "parallels",
        "-b",
        s(&base),
        "-F",
        "parallels",
        s(&other),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("disk bundle"), "{}", r.stderr);
}
