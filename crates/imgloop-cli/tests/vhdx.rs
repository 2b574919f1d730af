//! VHDX: interop with qemu-img/qemu-io in both directions (dynamic and
//! fixed, every block size class, ZERO or NOT_PRESENT new blocks, a larger
//! log, disks with sector-bitmap entries), with libvhdi's `vhdiinfo` and
//! `vhdimount` (also for differencing chains and 4 KiB sectors, which qemu
//! does not open), images laid out as Windows tools lay them out (Disk2VHD's
//! identical headers, a log left for replay by Hyper-V, a log holding only
//! an empty entry), and hostile headers, regions, metadata, BATs and logs.

mod common;
use common::*;
use imgloop::formats::vhdx::guid::Guid;
use imgloop::formats::vhdx::header::{seal, Header, HEADER_AT, MIB, REGIONS_AT};
use imgloop::formats::vhdx::log::build_entry;
use std::path::{Path, PathBuf};

/// Writes that cross sector and block edges, zero a range, and reach the
/// end of a 16 MiB disk.
const WRITES: &[&str] = &[
    "write -P 0x41 1000 5000",
    "write -P 0x42 1M 64k",
    "write -P 0x43 3145216 1024",
    "write -P 0x44 9M 2M",
    "write -z 9500000 70000",
    "write -P 0x45 16776704 512",
];

/// A raw disk of `size` with `cmds` applied by qemu-io: what the image
/// must read as.
fn twin(sc: &Scratch, name: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let t = sc.path(name);
    qemu_img(&["create", "-q", "-f", "raw", s(&t), size]).ok();
    qemu_io("raw", &t, cmds).ok();
    t
}

fn create(tool: fn(&[&str]) -> Run, img: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(img), size]);
    tool(&args).ok();
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// (BAT offset, metadata offset) from the first region table.
fn regions(file: &[u8]) -> (u64, u64) {
    let t = REGIONS_AT[0] as usize;
    let (mut bat, mut meta) = (0, 0);
    for i in 0..le32(file, t + 8) as usize {
        let e = t + 16 + 32 * i;
        let guid = &file[e..e + 16];
        if guid[..4] == [0x66, 0x77, 0xc2, 0x2d] {
            bat = le64(file, e + 16);
        } else if guid[..4] == [0x06, 0xa2, 0x7c, 0x8b] {
            meta = le64(file, e + 16);
        }
    }
    (bat, meta)
}

/// File offset of the payload of metadata item `first_guid_byte..`.
fn metadata_item(file: &[u8], first4: [u8; 4]) -> usize {
    let (_, meta) = regions(file);
    let m = meta as usize;
    assert_eq!(&file[m..m + 8], b"metadata");
    for i in 0..u16::from_le_bytes([file[m + 10], file[m + 11]]) as usize {
        let e = m + 32 + 32 * i;
        if file[e..e + 4] == first4 {
            return m + le32(file, e + 16) as usize;
        }
    }
    panic!("metadata item not found");
}

const FILE_PARAMETERS: [u8; 4] = [0x37, 0x67, 0xa1, 0xca];
const VIRTUAL_DISK_SIZE: [u8; 4] = [0x24, 0x42, 0xa5, 0x2f];

/// The current header (by sequence number) and its slot.
fn current_header(file: &[u8]) -> (usize, Header) {
    let h: Vec<Option<Header>> = HEADER_AT
        .iter()
        .map(|&at| Header::parse(&file[at as usize..at as usize + 4096]))
        .collect();
    match (h[0], h[1]) {
        (Some(a), Some(b)) if b.sequence > a.sequence => (1, b),
        (Some(a), _) => (0, a),
        (None, Some(b)) => (1, b),
        (None, None) => panic!("no valid header"),
    }
}

#[test]
fn images_qemu_img_makes_and_writes_read_identically() {
    for opts in [
        "",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M",
        "block_size=256M",
        "block_state_zero=off",
        "log_size=4M,block_size=2M",
    ] {
        let sc = Scratch::new();
        let img = sc.path("q.vhdx");
        create(qemu_img, &img, opts, "16M");
        // Fresh, then written by qemu-io (qemu's log entries are replayed
        // and cleared at each allocation).
        assert_reads_like_qemu(&sc, "vhdx", &img);
        qemu_io("vhdx", &img, WRITES).ok();
        assert_reads_like_qemu(&sc, "vhdx", &img);
        let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
        let qinfo = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
        for k in ["format", "virtual-size", "cluster-size"] {
            assert_eq!(info[k], qinfo[k], "{opts}: {k}");
        }
        let c = imgloop(&["check", s(&img)]);
        assert_eq!(c.code, 0, "{opts}: {}{}", c.stdout, c.stderr);
        imgloop(&["compare", s(&img), s(&twin(&sc, "t.raw", "16M", WRITES))]).ok();
    }
}

#[test]
fn images_imgloop_makes_and_writes_pass_qemu_img_check_and_compare() {
    for opts in [
        "",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M",
        "block_size=256M",
        "block_state_zero=off",
        "log_size=4M,block_size=2M",
        "physical_sector_size=512",
    ] {
        let sc = Scratch::new();
        let img = sc.path("i.vhdx");
        create(imgloop, &img, opts, "16M");
        let zero = twin(&sc, "zero.raw", "16M", &["read 0 512"]);
        assert_qemu_accepts("vhdx", &img, &zero, "raw");
        imgloop_io("vhdx", &img, WRITES).ok();
        let t = twin(&sc, "t.raw", "16M", WRITES);
        assert_qemu_accepts("vhdx", &img, &t, "raw");
        // qemu-io writes on top (allocating through its own log); both
        // tools still agree and qemu's check stays clean.
        qemu_io(
            "vhdx",
            &img,
            &["write -P 0x51 5M 4k", "write -P 0x52 15M 1M"],
        )
        .ok();
        assert_reads_like_qemu(&sc, "vhdx", &img);
        let c = qemu_img(&["check", "-f", "vhdx", s(&img)]);
        assert_eq!(c.code, 0, "{opts}: {}{}", c.stdout, c.stderr);
        let qinfo = qemu_img(&["info", "--output=json", s(&img)]).ok().json();
        assert_eq!(qinfo["virtual-size"], 16 << 20);
    }
}

#[test]
fn new_images_use_the_windows_layout_and_qemu_block_size_defaults() {
    let sc = Scratch::new();
    for (size, block) in [("16M", 8u64 << 20), ("2G", 16 << 20), ("101G", 32 << 20)] {
        let img = sc.path(&format!("{size}.vhdx"));
        create(imgloop, &img, "", size);
        let q = sc.path(&format!("{size}-q.vhdx"));
        create(qemu_img, &q, "", size);
        let ours = imgloop(&["info", "--output=json", s(&img)]).ok().json();
        let theirs = qemu_img(&["info", "--output=json", s(&q)]).ok().json();
        assert_eq!(ours["cluster-size"], block, "{size}");
        assert_eq!(theirs["cluster-size"], block, "{size}");
        let file = std::fs::read(&img).unwrap();
        assert_eq!(&file[0..8], b"vhdxfile");
        // Log at 1 MiB, metadata before the BAT, both regions Required
        // (as Windows writes them).
        let (_, h) = current_header(&file);
        assert_eq!((h.log_offset, h.log_length), (MIB, MIB as u32));
        let (bat, meta) = regions(&file);
        assert!(meta < bat, "metadata at {meta}, BAT at {bat}");
        let t = REGIONS_AT[0] as usize;
        for i in 0..2 {
            assert_eq!(le32(&file, t + 16 + 32 * i + 28), 1, "Required bit");
        }
        // Both region table copies are the same.
        let (a, b) = (REGIONS_AT[0] as usize, REGIONS_AT[1] as usize);
        assert_eq!(file[a..a + 65536], file[b..b + 65536]);
        // And the table reads as qemu expects (it reads the first copy only).
        qemu_img(&["check", "-f", "vhdx", s(&img)]).ok();
    }
    // The same options give the same image, except for the random GUIDs
    // (file/data write GUIDs, disk ID): everything else is byte-identical.
    let (a, b) = (sc.path("a.vhdx"), sc.path("b.vhdx"));
    for p in [&a, &b] {
        create(imgloop, p, "", "16M");
        imgloop_io("vhdx", p, WRITES).ok();
    }
    let (fa, fb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(fa.len(), fb.len());
    let (_, meta) = regions(&fa);
    let differing: Vec<usize> = (0..fa.len()).filter(|&i| fa[i] != fb[i]).collect();
    let page83 = metadata_item(&fa, [0xab, 0x12, 0xca, 0xbe]);
    for &i in &differing {
        let in_header = HEADER_AT
            .iter()
            .any(|&h| (h as usize..h as usize + 4096).contains(&i));
        let in_disk_id = (page83..page83 + 16).contains(&i);
        // Log entries carry the (random) log GUID and their checksum.
        let in_log = (MIB as usize..2 * MIB as usize).contains(&i);
        assert!(
            in_header || in_disk_id || in_log,
            "byte {i} differs (metadata at {meta})"
        );
    }
}

#[test]
fn convert_to_and_from_vhdx_matches_qemu_img() {
    let sc = Scratch::new();
    let src = twin(
        &sc,
        "src.raw",
        "40M",
        &["write -P 0x61 0 3M", "write -P 0x62 20M 9M"],
    );
    for opts in ["", "subformat=fixed", "block_size=1M"] {
        let ours = sc.path("ours.vhdx");
        let _ = std::fs::remove_file(&ours);
        let mut args = vec!["convert", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&ours)]);
        imgloop(&args).ok();
        assert_qemu_accepts("vhdx", &ours, &src, "raw");
        // Sparse: only blocks that hold data are allocated (dynamic).
        if opts != "subformat=fixed" {
            assert!(
                allocated(&ours) < 20 << 20,
                "{opts}: {} bytes allocated",
                allocated(&ours)
            );
        }
        let theirs = sc.path("theirs.vhdx");
        let _ = std::fs::remove_file(&theirs);
        let mut args = vec!["convert", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&theirs)]);
        qemu_img(&args).ok();
        imgloop(&["compare", s(&theirs), s(&src)]).ok();
        // Back to raw through imgloop from qemu's image.
        assert_reads_like_qemu(&sc, "vhdx", &theirs);
    }
    // Map of a converted image: data where the source had data.
    let ours = sc.path("ours.vhdx");
    let map = imgloop(&["map", "--output=json", s(&ours)]).ok().json();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 12 << 20, "1 MiB blocks holding 3 + 9 MiB of data");
}

#[test]
fn disks_past_four_gib_use_sector_bitmap_entries_like_qemu() {
    // With 1 MiB blocks a chunk is 4 GiB: the BAT interleaves a
    // sector-bitmap entry after 4096 payload entries.
    let cmds = &[
        "write -P 0x71 4095M 2M",
        "write -P 0x72 4100M 4k",
        "write -P 0x73 4159M 1M",
    ];
    let sc = Scratch::new();
    let q = sc.path("q.vhdx");
    create(qemu_img, &q, "block_size=1M", "4160M");
    qemu_io("vhdx", &q, cmds).ok();
    let ours = sc.path("i.vhdx");
    create(imgloop, &ours, "block_size=1M", "4160M");
    imgloop_io("vhdx", &ours, cmds).ok();
    let t = twin(&sc, "t.raw", "4160M", cmds);
    imgloop(&["compare", s(&q), s(&t)]).ok();
    qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&ours), s(&t)]).ok();
    qemu_img(&["check", "-f", "vhdx", s(&ours)]).ok();
    imgloop_io(
        "vhdx",
        &q,
        &[
            "read -P 0x71 4095M 2M",
            "read -P 0x72 4100M 4k",
            "read -P 0 4101M 1M",
        ],
    )
    .ok();
}

#[test]
fn libvhdi_reads_images_imgloop_writes() {
    let sc = Scratch::new();
    for opts in [
        "",
        "subformat=fixed",
        "logical_sector_size=4096,block_size=1M",
    ] {
        let img = sc.path("i.vhdx");
        let _ = std::fs::remove_file(&img);
        create(imgloop, &img, opts, "16M");
        let cmds: Vec<&str> = if opts.contains("4096") {
            vec![
                "write -P 0x41 0 8k",
                "write -P 0x42 1M 64k",
                "write -z 9M 1M",
                "write -P 0x45 16773120 4096",
            ]
        } else {
            WRITES.to_vec()
        };
        imgloop_io("vhdx", &img, &cmds).ok();
        let info = std::process::Command::new("vhdiinfo")
            .arg(s(&img))
            .output()
            .expect("vhdiinfo (libvhdi-utils) is installed");
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(info.status.success(), "{opts}: {text}");
        assert!(text.contains("VHDX (version 2)"), "{text}");
        assert!(text.contains("(16777216 bytes)"), "{text}");
        let sector = if opts.contains("4096") { "4096" } else { "512" };
        assert!(
            text.contains(&format!("Bytes per sector\t: {sector} bytes")),
            "{text}"
        );
        let t = twin(&sc, "t.raw", "16M", &cmds);
        let mounted = vhdimount(&sc, &img);
        assert_same(opts, &mounted[0], &std::fs::read(&t).unwrap());
        // qemu does not open 4 KiB logical sectors; imgloop says so plainly
        // through qemu's own refusal, and reads them itself.
        if opts.contains("4096") {
            let q = qemu_img(&["info", "-f", "vhdx", s(&img)]);
            assert_ne!(q.code, 0);
            imgloop(&["compare", s(&img), s(&t)]).ok();
        }
    }
}

/// What `vhdimount` exposes for `image`: one disk per layer, base first.
fn vhdimount(sc: &Scratch, image: &Path) -> Vec<Vec<u8>> {
    let mnt = sc.path("mnt");
    let _ = std::fs::create_dir(&mnt);
    let out = std::process::Command::new("vhdimount")
        .args([s(image), s(&mnt)])
        .output()
        .expect("vhdimount (libvhdi-utils) is installed");
    assert!(out.status.success(), "vhdimount failed: {out:?}");
    let mut layers = Vec::new();
    for i in 1.. {
        let p = mnt.join(format!("vhdi{i}"));
        if !p.exists() {
            break;
        }
        layers.push(std::fs::read(&p).unwrap());
    }
    let u = std::process::Command::new("umount")
        .arg(s(&mnt))
        .output()
        .unwrap();
    assert!(u.status.success(), "umount: {u:?}");
    assert!(!layers.is_empty(), "vhdimount showed no disk");
    layers
}

fn assert_same(what: &str, a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(pos) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {pos}");
    }
}

#[test]
fn differencing_chains_read_as_flat_copies_for_imgloop_and_libvhdi() {
    let sc = Scratch::new();
    let dir = sc.path("chain");
    std::fs::create_dir(&dir).unwrap();
    let base = dir.join("base.vhdx");
    let mid = dir.join("mid.vhdx");
    let top = dir.join("top.vhdx");
    let layers: [&[&str]; 3] = [
        &["write -P 0x11 0 3M", "write -P 0x12 10M 2M"],
        &[
            "write -P 0x21 1000 5000",
            "write -z 10M 4k",
            "write -P 0x22 15M 512",
        ],
        &[
            "write -P 0x31 2M 1536k",
            "write -P 0x32 10M 512",
            "write -z 0 512",
        ],
    ];
    create(imgloop, &base, "", "16M");
    imgloop_io("vhdx", &base, layers[0]).ok();
    // Each layer is written before its child is made: a write to a parent
    // changes its data write GUID and so breaks the children's linkage.
    for (n, (child, parent)) in [(&mid, "base.vhdx"), (&top, "mid.vhdx")]
        .into_iter()
        .enumerate()
    {
        imgloop(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-b",
            parent,
            "-F",
            "vhdx",
            s(child),
        ])
        .ok();
        imgloop_io("vhdx", child, layers[n + 1]).ok();
    }

    // The flat copies: each layer's writes applied in order on raw.
    let flat: Vec<Vec<u8>> = (1..=3)
        .map(|n| {
            let all: Vec<&str> = layers[..n].iter().flat_map(|l| l.iter().copied()).collect();
            std::fs::read(twin(&sc, &format!("flat{n}.raw"), "16M", &all)).unwrap()
        })
        .collect();
    let info = imgloop(&["info", "--output=json", s(&top)]).ok().json();
    assert_eq!(info["backing-filename"], "mid.vhdx");
    assert_eq!(info["format-specific"]["data"]["subformat"], "differencing");
    let out = sc.path("top.raw");
    imgloop(&["convert", "-O", "raw", s(&top), s(&out)]).ok();
    assert_same("imgloop top", &std::fs::read(&out).unwrap(), &flat[2]);

    // libvhdi follows the parent locators on its own.
    let mounted = vhdimount(&sc, &top);
    assert_eq!(mounted.len(), 3, "vhdimount layers");
    for (n, layer) in mounted.iter().enumerate() {
        assert_same(&format!("vhdimount layer {n}"), layer, &flat[n]);
    }

    // The relative path keeps the chain together when it moves.
    let moved = sc.path("moved");
    std::fs::rename(&dir, &moved).unwrap();
    let out2 = sc.path("moved.raw");
    imgloop(&["convert", "-O", "raw", s(&moved.join("top.vhdx")), s(&out2)]).ok();
    assert_same("moved chain", &std::fs::read(&out2).unwrap(), &flat[2]);

    // A parent that is a different image (its data write GUID does not
    // match the child's linkage) is refused, naming the files.
    let mid = moved.join("mid.vhdx");
    std::fs::rename(&mid, moved.join("mid.orig")).unwrap();
    create(imgloop, &mid, "", "16M");
    let r = imgloop(&["info", "--backing-chain", s(&moved.join("top.vhdx"))]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("mid.vhdx"), "{}", r.stderr);
    assert!(r.stderr.contains("linkage"), "{}", r.stderr);
    let r = imgloop(&["convert", "-O", "raw", s(&moved.join("top.vhdx")), s(&out2)]);
    assert_ne!(r.code, 0, "read through the wrong parent");
    // A missing parent is an error too, unless asked to ignore it.
    std::fs::remove_file(&mid).unwrap();
    let r = imgloop(&["convert", "-O", "raw", s(&moved.join("top.vhdx")), s(&out2)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("mid.vhdx"), "{}", r.stderr);
}

#[test]
fn disk2vhd_images_with_two_identical_headers_open() {
    // Disk2VHD writes both headers with the same sequence number and the
    // same contents; that is a valid image (qemu accepts it too).
    let sc = Scratch::new();
    let img = sc.path("d2v.vhdx");
    create(imgloop, &img, "block_size=2M", "16M");
    imgloop_io("vhdx", &img, WRITES).ok();
    let mut file = std::fs::read(&img).unwrap();
    let (slot, _) = current_header(&file);
    let (from, to) = (HEADER_AT[slot] as usize, HEADER_AT[1 - slot] as usize);
    let copy = file[from..from + 4096].to_vec();
    file[to..to + 4096].copy_from_slice(&copy);
    std::fs::write(&img, &file).unwrap();
    let t = twin(&sc, "t.raw", "16M", WRITES);
    imgloop(&["compare", s(&img), s(&t)]).ok();
    qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&t)]).ok();
    let c = imgloop(&["check", s(&img)]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    // Writing to it moves to the other slot as usual.
    imgloop_io("vhdx", &img, &["write -P 0x66 12M 4k"]).ok();
    qemu_img(&["check", "-f", "vhdx", s(&img)]).ok();
    qemu_io("vhdx", &img, &["read -P 0x66 12M 4k"]).ok();

    // Equal sequence numbers with different contents: neither is known to
    // be newer, so the image is refused with a message naming the headers.
    let mut file = std::fs::read(&img).unwrap();
    let (slot, h) = current_header(&file);
    let other = Header {
        sequence: h.sequence,
        log_offset: h.log_offset,
        file_write: Guid::random(),
        ..h
    };
    let at = HEADER_AT[1 - slot] as usize;
    file[at..at + 4096].copy_from_slice(&other.to_bytes());
    std::fs::write(&img, &file).unwrap();
    let r = imgloop(&["info", s(&img)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("header"), "{}", r.stderr);
    assert!(r.stderr.contains("d2v.vhdx"), "{}", r.stderr);
}

/// A copy of `img` as Hyper-V leaves it after a crash: the last BAT
/// change is only in the log (the header names the log), `sectors` lists
/// the changed 4 KiB sectors with their new bytes.
fn leave_in_log(img: &Path, before: &[u8]) {
    let now = std::fs::read(img).unwrap();
    let (bat, _) = regions(&now);
    let at = bat as usize;
    let new_sector = now[at..at + 4096].to_vec();
    let mut file = now.clone();
    file[at..at + 4096].copy_from_slice(&before[at..at + 4096]);
    let g = Guid::random();
    let entry = build_entry(g, 7, 0, file.len() as u64, &[(bat, &new_sector)]);
    let (slot, h) = current_header(&file);
    let log = h.log_offset as usize;
    file[log..log + entry.len()].copy_from_slice(&entry);
    let dirty = Header {
        sequence: h.sequence + 1,
        log_guid: g,
        ..h
    };
    let at = HEADER_AT[1 - slot] as usize;
    file[at..at + 4096].copy_from_slice(&dirty.to_bytes());
    std::fs::write(img, &file).unwrap();
}

#[test]
fn a_log_left_for_replay_reads_like_qemu_after_its_replay_and_read_only_opens_change_nothing() {
    let sc = Scratch::new();
    let img = sc.path("hyperv.vhdx");
    create(imgloop, &img, "block_size=1M", "16M");
    let before = std::fs::read(&img).unwrap();
    imgloop_io(
        "vhdx",
        &img,
        &["write -P 0x77 3M 1M", "write -P 0x78 7M 4k"],
    )
    .ok();
    leave_in_log(&img, &before);
    let dirty = std::fs::read(&img).unwrap();

    // qemu refuses it read-only; imgloop reads it (replaying in memory).
    let q = qemu_img(&["info", "-f", "vhdx", s(&img)]);
    assert_ne!(q.code, 0);
    assert!(q.stderr.contains("needs to be replayed"), "{}", q.stderr);
    let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    assert_eq!(info["format-specific"]["data"]["log"], "replayed in memory");
    let ours = sc.path("ours.raw");
    imgloop(&["convert", "-O", "raw", s(&img), s(&ours)]).ok();
    imgloop(&["map", s(&img)]).ok();
    imgloop(&["io", "-r", "-c", "read -P 0x77 3M 1M", s(&img)]).ok();
    // check without -r reports the pending replay as a corruption
    // (exit 2, as qemu-img does for one it finds), and changes nothing.
    let c = imgloop(&["check", s(&img)]);
    assert_eq!(c.code, 2, "{}{}", c.stdout, c.stderr);
    assert!(c.stdout.contains("log") || c.stderr.contains("log"));
    assert!(
        std::fs::read(&img).unwrap() == dirty,
        "a read-only command changed the image"
    );

    // qemu replays it on a copy; the same disk.
    let copy = sc.path("copy.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["check", "-r", "all", "-f", "vhdx", s(&copy)]).ok();
    let theirs = sc.path("theirs.raw");
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&copy), s(&theirs)]).ok();
    assert_same(
        "in-memory replay vs qemu's replay",
        &std::fs::read(&ours).unwrap(),
        &std::fs::read(&theirs).unwrap(),
    );

    // imgloop's repair replays it in the file: qemu then opens it read-only.
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 corruptions"), "{}", r.stdout);
    qemu_img(&["check", "-f", "vhdx", s(&img)]).ok();
    qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&theirs)]).ok();
    let info = imgloop(&["info", "--output=json", s(&img)]).ok().json();
    assert_eq!(info["format-specific"]["data"]["log"], "clean");
}

#[test]
fn a_log_holding_only_an_empty_entry_is_replayed_harmlessly() {
    // Windows leaves logs whose only entry has no descriptors.
    let sc = Scratch::new();
    let img = sc.path("empty-log.vhdx");
    create(imgloop, &img, "", "16M");
    imgloop_io("vhdx", &img, WRITES).ok();
    let mut file = std::fs::read(&img).unwrap();
    let g = Guid::random();
    let entry = build_entry(g, 1, 0, file.len() as u64, &[]);
    let (slot, h) = current_header(&file);
    let log = h.log_offset as usize;
    file[log..log + entry.len()].copy_from_slice(&entry);
    let dirty = Header {
        sequence: h.sequence + 1,
        log_guid: g,
        ..h
    };
    let at = HEADER_AT[1 - slot] as usize;
    file[at..at + 4096].copy_from_slice(&dirty.to_bytes());
    std::fs::write(&img, &file).unwrap();
    let t = twin(&sc, "t.raw", "16M", WRITES);
    imgloop(&["compare", s(&img), s(&t)]).ok();
    // A write opens read-write, replays, and clears the log.
    imgloop_io("vhdx", &img, &["write -P 0x99 13M 4k"]).ok();
    let file = std::fs::read(&img).unwrap();
    assert!(current_header(&file).1.log_guid == Guid::default());
    qemu_img(&["check", "-f", "vhdx", s(&img)]).ok();
    qemu_io(
        "vhdx",
        &img,
        &["read -P 0x99 13M 4k", "read -P 0x41 1000 5000"],
    )
    .ok();
}

/// A hostile variant of a valid image; `fix` re-seals what it changes so
/// the damage reaches the structure under test.
struct Hostile {
    name: &'static str,
    damage: fn(&mut Vec<u8>),
    /// Words the error must contain (besides the file name).
    words: &'static [&'static str],
}

fn reseal_header(file: &mut [u8], edit: impl Fn(&mut Header)) {
    let (slot, mut h) = current_header(file);
    edit(&mut h);
    h.sequence += 1;
    let at = HEADER_AT[1 - slot] as usize;
    file[at..at + 4096].copy_from_slice(&h.to_bytes());
}

fn edit_region_tables(file: &mut [u8], edit: impl Fn(&mut [u8])) {
    for at in REGIONS_AT {
        let t = &mut file[at as usize..at as usize + 65536];
        edit(t);
        seal(t, 4);
    }
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        name: "both headers torn",
        damage: |f| {
            for at in HEADER_AT {
                f[at as usize + 40] ^= 0xff;
            }
        },
        words: &["header"],
    },
    Hostile {
        name: "log offset past 2^63",
        damage: |f| reseal_header(f, |h| h.log_offset = !(MIB - 1)),
        words: &["log"],
    },
    Hostile {
        name: "BAT region overlapping the metadata region",
        damage: |f| {
            let (_, meta) = regions(f);
            edit_region_tables(f, |t| {
                for i in 0..2 {
                    let e = 16 + 32 * i;
                    if t[e] == 0x66 {
                        t[e + 16..e + 24].copy_from_slice(&meta.to_le_bytes());
                    }
                }
            })
        },
        words: &["region", "overlap"],
    },
    Hostile {
        name: "BAT region far past 2^63",
        damage: |f| {
            edit_region_tables(f, |t| {
                for i in 0..2 {
                    let e = 16 + 32 * i;
                    if t[e] == 0x66 {
                        t[e + 16..e + 24].copy_from_slice(&(u64::MAX - MIB + 1).to_le_bytes());
                    }
                }
            })
        },
        words: &["region"],
    },
    Hostile {
        name: "region count 2^32-1",
        damage: |f| edit_region_tables(f, |t| t[8..12].copy_from_slice(&u32::MAX.to_le_bytes())),
        words: &["region"],
    },
    Hostile {
        name: "block size 3 MiB",
        damage: |f| {
            let at = metadata_item(f, FILE_PARAMETERS);
            f[at..at + 4].copy_from_slice(&(3u32 << 20).to_le_bytes());
        },
        words: &["block size"],
    },
    Hostile {
        name: "virtual size 2^64-512",
        damage: |f| {
            let at = metadata_item(f, VIRTUAL_DISK_SIZE);
            f[at..at + 8].copy_from_slice(&(u64::MAX - 511).to_le_bytes());
        },
        words: &["size"],
    },
    Hostile {
        name: "virtual size larger than the BAT region covers",
        damage: |f| {
            let at = metadata_item(f, VIRTUAL_DISK_SIZE);
            f[at..at + 8].copy_from_slice(&(60u64 << 40).to_le_bytes());
        },
        words: &["BAT"],
    },
    Hostile {
        name: "metadata item offset past the region",
        damage: |f| {
            let (_, meta) = regions(f);
            let e = meta as usize + 32;
            f[e + 16..e + 20].copy_from_slice(&u32::MAX.to_le_bytes());
        },
        words: &["metadata"],
    },
    Hostile {
        name: "metadata entry count 65535",
        damage: |f| {
            let (_, meta) = regions(f);
            let m = meta as usize;
            f[m + 10..m + 12].copy_from_slice(&u16::MAX.to_le_bytes());
        },
        words: &["metadata"],
    },
    Hostile {
        name: "unknown required metadata item",
        damage: |f| {
            let (_, meta) = regions(f);
            let e = meta as usize + 32;
            f[e..e + 4].copy_from_slice(&[1, 2, 3, 4]);
        },
        words: &["metadata"],
    },
    Hostile {
        name: "log entry writing into the header section",
        damage: |f| {
            let g = Guid::random();
            let entry = build_entry(g, 1, 0, f.len() as u64, &[(HEADER_AT[0], &[0u8; 4096])]);
            let (_, h) = current_header(f);
            let log = h.log_offset as usize;
            f[log..log + entry.len()].copy_from_slice(&entry);
            reseal_header(f, |h| h.log_guid = g);
        },
        words: &["log"],
    },
    Hostile {
        name: "log entry longer than the file can hold",
        damage: |f| {
            let g = Guid::random();
            let entry = build_entry(g, 1, 0, u64::MAX, &[(4 * MIB, &[0u8; 4096])]);
            let (_, h) = current_header(f);
            let log = h.log_offset as usize;
            f[log..log + entry.len()].copy_from_slice(&entry);
            reseal_header(f, |h| h.log_guid = g);
        },
        words: &["log"],
    },
    Hostile {
        name: "file cut inside the metadata region",
        damage: |f| {
            let (_, meta) = regions(f);
            f.truncate(meta as usize + 100);
        },
        words: &["metadata", "truncated"],
    },
];

#[test]
fn hostile_images_give_clear_errors_and_read_only_commands_never_change_them() {
    let sc = Scratch::new();
    let good = sc.path("good.vhdx");
    create(imgloop, &good, "block_size=1M", "16M");
    imgloop_io("vhdx", &good, WRITES).ok();
    let pristine = std::fs::read(&good).unwrap();
    for case in HOSTILE {
        let img = sc.path("hostile.vhdx");
        let mut file = pristine.clone();
        (case.damage)(&mut file);
        std::fs::write(&img, &file).unwrap();
        for args in [
            vec!["info", s(&img)],
            vec!["info", "-f", "vhdx", s(&img)],
            vec!["check", "-f", "vhdx", s(&img)],
            vec!["map", "-f", "vhdx", s(&img)],
            vec!["convert", "-f", "vhdx", "-O", "raw", s(&img), "/dev/null"],
        ] {
            let r = imgloop(&args);
            assert_ne!(r.code, 0, "{}: {args:?} succeeded", case.name);
            assert_ne!(
                r.code, 101,
                "{}: {args:?} panicked: {}",
                case.name, r.stderr
            );
            assert!(
                r.stderr.contains("hostile.vhdx"),
                "{}: {args:?}: {}",
                case.name,
                r.stderr
            );
            for w in case.words {
                assert!(
                    r.stderr.to_lowercase().contains(&w.to_lowercase()),
                    "{}: {args:?}: no '{w}' in {}",
                    case.name,
                    r.stderr
                );
            }
            assert!(
                std::fs::read(&img).unwrap() == file,
                "{}: {args:?} changed the image",
                case.name
            );
        }
    }
}

#[test]
fn bad_bat_entries_are_reported_and_repaired_into_images_qemu_accepts() {
    let sc = Scratch::new();
    let img = sc.path("bat.vhdx");
    create(imgloop, &img, "block_size=1M", "16M");
    imgloop_io("vhdx", &img, WRITES).ok();
    let pristine = std::fs::read(&img).unwrap();
    let (bat, _) = regions(&pristine);
    let bat = bat as usize;
    // Block 5 points past the end of the file; block 6 points at the
    // same place as block 1; block 7 is "partially present" in an image
    // without a parent.
    let mut file = pristine.clone();
    let b1 = le64(&file, bat + 8);
    assert_eq!(b1 & 7, 6, "block 1 is allocated");
    file[bat + 40..bat + 48].copy_from_slice(&((1u64 << 43) | 6).to_le_bytes());
    file[bat + 48..bat + 56].copy_from_slice(&b1.to_le_bytes());
    file[bat + 56..bat + 64].copy_from_slice(&7u64.to_le_bytes());
    std::fs::write(&img, &file).unwrap();

    let c = imgloop(&["check", "--output=json", s(&img)]);
    assert_eq!(c.code, 2, "{}{}", c.stdout, c.stderr);
    assert!(
        c.json()["corruptions"].as_u64().unwrap() >= 3,
        "{}",
        c.stdout
    );
    let human = imgloop(&["check", s(&img)]);
    for word in ["after end of file", "overlaps block 1", "partially present"] {
        assert!(
            human.stdout.contains(word) || human.stderr.contains(word),
            "no '{word}':\n{}{}",
            human.stdout,
            human.stderr
        );
    }
    // A block in a state that cannot be read fails with an error naming
    // the BAT; a block past the end of the file reads as zeroes (as in
    // qemu); block 6 reads block 1's bytes; the others read as before.
    let r = imgloop_io("vhdx", &img, &["read 7M 4k"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("BAT"), "{}", r.stderr);
    imgloop_io(
        "vhdx",
        &img,
        &[
            "read -P 0 5M 4k",
            "read -P 0x42 6M 64k",
            "read -P 0x42 1M 64k",
        ],
    )
    .ok();
    assert!(
        std::fs::read(&img).unwrap() == file,
        "check without -r changed the image"
    );

    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    imgloop(&["check", s(&img)]).ok();
    qemu_img(&["check", "-f", "vhdx", s(&img)]).ok();
    // Every block reads as before the repair (block 6 has its own copy of
    // block 1's bytes now); the unreadable block reads as zeroes.
    let t = twin(
        &sc,
        "t.raw",
        "16M",
        &[WRITES, &["write -P 0x42 6M 64k"]].concat(),
    );
    imgloop(&["compare", s(&img), s(&t)]).ok();
    qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&t)]).ok();
    // And a write to block 6 no longer changes block 1.
    imgloop_io("vhdx", &img, &["write -P 0x43 6M 4k"]).ok();
    imgloop_io("vhdx", &img, &["read -P 0x42 1M 64k", "read -P 0x43 6M 4k"]).ok();
}

#[test]
fn a_block_aliasing_the_header_section_keeps_its_bytes_through_a_repair_that_rewrites_the_headers()
{
    // Found by the mutation campaign: the repair rewrote a damaged region
    // table copy before copying the block that reads those bytes.
    let sc = Scratch::new();
    let img = sc.path("alias.vhdx");
    create(qemu_img, &img, "block_size=1M,block_state_zero=off", "12M");
    qemu_io("vhdx", &img, &["write -P 0x55 2M 1M"]).ok();
    let mut file = std::fs::read(&img).unwrap();
    let (bat, _) = regions(&file);
    let bat = bat as usize;
    // Block 9: fully present at file offset 0 (the header section).
    file[bat + 72..bat + 80].copy_from_slice(&6u64.to_le_bytes());
    // The second region table copy differs from the first.
    let t = REGIONS_AT[1] as usize;
    file[t + 12] ^= 1;
    seal(&mut file[t..t + 65536], 4);
    std::fs::write(&img, &file).unwrap();
    let before = sc.path("before.raw");
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&img), s(&before)]).ok();
    let r = imgloop(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    imgloop(&["check", s(&img)]).ok();
    qemu_img(&["check", "-f", "vhdx", s(&img)]).ok();
    qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&before)]).ok();
}
