//! qcow2 `check` and `check -r leaks|all` against `qemu-img check`, on
//! images damaged on purpose: both tools run on copies of the same damaged
//! image and must agree on exit codes, JSON fields and findings; repairs by
//! imgloop must leave images `qemu-img check` calls clean, with the guest
//! data qemu's own repair keeps. Also the dirty bit (lazy refcounts) and
//! the corrupt bit.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

// Layout of the base image as qemu lays it out (64 KiB clusters), checked
// by `base_image`: header in cluster 0, refcount table in 1, refcount block
// (16-bit refcounts) in 2, L1 table in 3, the L2 table in 4, data clusters
// 5-7 (0x11 at guest 0..128k, 0x22 at 1M), and a compressed cluster of 0x33
// (guest 2M) in one sector at 0x80000; the file ends inside cluster 8.
const REFTABLE: u64 = 0x1_0000;
const REFBLOCK: u64 = 0x2_0000;
const L1: u64 = 0x3_0000;
const L2: u64 = 0x4_0000;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be16(v: u16) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn read_u64(p: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Refcount block entry of cluster `c` in the base layout.
fn refcount_at(c: u64) -> u64 {
    REFBLOCK + 2 * c
}

/// The base image, with its layout verified (the damage relies on it).
fn base_image(sc: &Scratch, name: &str) -> PathBuf {
    let p = sc.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "4M"]).ok();
    qemu_io(
        "qcow2",
        &p,
        &[
            "write -P 0x11 0 128k",
            "write -P 0x22 1M 64k",
            "write -c -P 0x33 2M 64k",
        ],
    )
    .ok();
    assert_eq!(read_u64(&p, 40), L1, "l1_table_offset");
    assert_eq!(read_u64(&p, 48), REFTABLE, "refcount_table_offset");
    assert_eq!(read_u64(&p, REFTABLE), REFBLOCK);
    assert_eq!(read_u64(&p, L1), COPIED | L2);
    for (i, host) in [(0, 0x5_0000), (1, 0x6_0000), (16, 0x7_0000)] {
        assert_eq!(read_u64(&p, L2 + i * 8), COPIED | host, "L2 entry {i}");
    }
    assert_eq!(read_u64(&p, L2 + 32 * 8), COMPRESSED | 0x8_0000);
    p
}

/// `qemu-io -r -f qcow2 -c CMD FILE`: exit code and output.
fn qemu_io_ro(img: &Path, cmd: &str) -> (i32, String) {
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", cmd, s(img)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// qemu-io reads `pattern` at `off` for `len` bytes of `img`.
fn assert_qemu_reads(img: &Path, pattern: u8, off: &str, len: &str) {
    let cmd = format!("read -P {pattern:#x} {off} {len}");
    let (code, out) = qemu_io_ro(img, &cmd);
    assert!(
        code == 0 && !out.contains("verification failed") && !out.contains("error"),
        "{}: {cmd}: {out}",
        img.display()
    );
}

fn copy(sc: &Scratch, from: &Path, name: &str) -> PathBuf {
    let p = sc.path(name);
    std::fs::copy(from, &p).unwrap();
    p
}

/// One run of a check: exit code, JSON (without the file name fields),
/// finding lines from stderr (without the tools' own error lines), stdout.
struct Check {
    code: i32,
    json: Option<Value>,
    findings: Vec<String>,
    stdout: String,
}

#[derive(Clone, Copy)]
enum Tool {
    Qemu,
    Imgloop,
}

fn check_with(tool: Tool, img: &Path, repair: Option<&str>, json: bool) -> Check {
    let mut args = vec!["check"];
    if json {
        args.extend(match tool {
            Tool::Qemu => vec!["--output=json"],
            Tool::Imgloop => vec!["--output", "json"],
        });
    }
    if let Some(r) = repair {
        args.extend(["-r", r]);
    }
    args.push(s(img));
    let r = match tool {
        Tool::Qemu => qemu_img(&args),
        Tool::Imgloop => imgloop(&args),
    };
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let json = (json && !r.stdout.trim().is_empty()).then(|| {
        let mut v = r.json();
        let o = v.as_object_mut().unwrap();
        assert_eq!(o.remove("format"), Some("qcow2".into()));
        assert!(o.remove("filename").is_some());
        v
    });
    let findings = r
        .stderr
        .lines()
        .filter(|l| !l.starts_with("qemu-img:") && !l.starts_with("qcow2:"))
        .filter(|l| !l.starts_with("imgloop:"))
        // The reason a refcount cannot be read is worded differently.
        .map(
            |l| match l.strip_prefix("Can't get refcount for cluster ") {
                Some(rest) => format!(
                    "Can't get refcount for cluster {}",
                    rest.split(':').next().unwrap()
                ),
                None => l.to_string(),
            },
        )
        .collect();
    Check {
        code: r.code,
        json,
        findings,
        stdout: r.stdout,
    }
}

fn check(tool: Tool, img: &Path, repair: Option<&str>) -> Check {
    check_with(tool, img, repair, true)
}

fn field(j: &Value, name: &str) -> u64 {
    j.get(name).and_then(Value::as_u64).unwrap_or(0)
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// `qemu-img check` finds nothing wrong.
fn assert_clean_by_qemu(img: &Path) {
    let c = check(Tool::Qemu, img, None);
    assert_eq!(
        c.code,
        0,
        "{} not clean: {:?} {:?}",
        img.display(),
        c.json,
        c.findings
    );
}

fn assert_same_guest_data(a: &Path, b: &Path) {
    let r = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(a), s(b)]);
    assert_eq!(
        r.code,
        0,
        "{} vs {}: {}{}",
        a.display(),
        b.display(),
        r.stdout,
        r.stderr
    );
}

/// What `qemu-img check -r all` achieves on the damaged image.
#[derive(Clone, Copy, PartialEq, Debug)]
enum QemuRepair {
    /// A clean image: imgloop's repair must report exactly the same.
    Clean,
    /// A clean image, but qemu first grows the file to cover a refcount
    /// block past its end and then counts that block's cluster as one more
    /// fixed corruption; imgloop rebuilds without growing the file, so its
    /// `corruptions-fixed` is one lower. Everything else is equal.
    CleanCountingAGrownFile,
    /// Corruptions remain: qemu only reports these (entries past the end
    /// of the file, unaligned data clusters, reserved bits, COPIED on a
    /// compressed cluster). imgloop also repairs them, so its repaired
    /// image is clean; its counts are then those of a clean image.
    LeavesCorruptions,
    /// qemu's repair fails (its metadata overlap check refuses to write the
    /// rebuilt refcount structure, or an unreadable refcount block makes
    /// it give up); imgloop rebuilds the structure.
    Fails,
}

/// How to verify the guest data of imgloop's `-r all` repair.
#[derive(Clone, Copy, Debug)]
enum Data {
    /// Equal to qemu's repaired copy (`qemu-img compare`).
    AsQemuRepair,
    /// The damage did not touch guest data: equal to the undamaged image.
    AsBase,
    /// qemu cannot read its own repaired copy (it marks the image corrupt
    /// or fails to decompress): the repaired image reads these patterns
    /// (pattern, offset, length) through qemu-io.
    Reads(&'static [(u8, &'static str, &'static str)]),
}

struct Case {
    damage: Vec<(u64, Vec<u8>)>,
    /// Exit code of a plain check (the same for both tools).
    code: i32,
    /// Lines both tools print (a subset of the findings).
    findings: &'static [&'static str],
    /// qemu's `-r leaks` refuses: the refcount structure must be rebuilt.
    leaks_needs_rebuild: bool,
    qemu_repair: QemuRepair,
    data: Data,
}

fn run_case(case: Case) {
    let sc = Scratch::new();
    let base = base_image(&sc, "base.qcow2");
    let img = copy(&sc, &base, "damaged.qcow2");
    for (off, bytes) in &case.damage {
        patch(&img, *off, bytes);
    }
    let damaged = std::fs::read(&img).unwrap();

    // 1. A plain check: same exit code, JSON, findings and human summary;
    //    the image is not touched.
    let q = check(Tool::Qemu, &copy(&sc, &img, "q0.qcow2"), None);
    let i = check(Tool::Imgloop, &img, None);
    assert_eq!(q.code, case.code, "qemu-img exit code: {:?}", q.findings);
    assert_eq!(i.code, q.code, "exit code: {:?}", i.findings);
    assert_eq!(i.json, q.json);
    assert_eq!(sorted(&i.findings), sorted(&q.findings));
    for f in case.findings {
        assert!(
            i.findings.iter().any(|l| l == f),
            "{f:?} in {:?}",
            i.findings
        );
    }
    let qh = check_with(Tool::Qemu, &copy(&sc, &img, "q1.qcow2"), None, false);
    let ih = check_with(Tool::Imgloop, &img, None, false);
    assert_eq!(ih.stdout, qh.stdout);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        damaged,
        "check changed the image"
    );

    // 2. -r leaks.
    let ql = copy(&sc, &img, "ql.qcow2");
    let il = copy(&sc, &img, "il.qcow2");
    let q = check(Tool::Qemu, &ql, Some("leaks"));
    let i = check(Tool::Imgloop, &il, Some("leaks"));
    assert_eq!(i.code, q.code, "-r leaks: {:?}", i.findings);
    let need = "ERROR need to rebuild refcount structures".to_string();
    if case.leaks_needs_rebuild {
        // qemu-img prints no report at all ("Check failed: Input/output
        // error"); imgloop prints its report with the check error counted.
        assert!(q.json.is_none() && q.findings.contains(&need));
        assert!(i.findings.contains(&need), "{:?}", i.findings);
        assert!(field(i.json.as_ref().unwrap(), "check-errors") >= 1);
        assert_eq!(std::fs::read(&il).unwrap(), damaged, "-r leaks wrote");
    } else {
        assert_eq!(i.json, q.json, "-r leaks report");
        // Both repaired copies now check the same.
        let (qa, ia) = (check(Tool::Qemu, &ql, None), check(Tool::Qemu, &il, None));
        assert_eq!((ia.code, ia.json), (qa.code, qa.json));
    }

    // 3. -r all: imgloop's repair always ends clean.
    let qa = copy(&sc, &img, "qa.qcow2");
    let ia = copy(&sc, &img, "ia.qcow2");
    let q = check(Tool::Qemu, &qa, Some("all"));
    let i = check(Tool::Imgloop, &ia, Some("all"));
    assert_eq!(i.code, 0, "imgloop -r all: {:?} {:?}", i.json, i.findings);
    assert_clean_by_qemu(&ia);
    let ij = i.json.unwrap();
    assert!(field(&ij, "corruptions-fixed") + field(&ij, "leaks-fixed") > 0);
    match case.qemu_repair {
        QemuRepair::Clean => {
            assert_eq!(q.code, 0, "qemu-img -r all: {:?}", q.findings);
            assert_eq!(Some(ij), q.json, "-r all report");
        }
        QemuRepair::CleanCountingAGrownFile => {
            assert_eq!(q.code, 0);
            let mut qj = q.json.unwrap();
            let fixed = field(&qj, "corruptions-fixed");
            qj["corruptions-fixed"] = (fixed - 1).into();
            assert_eq!(ij, qj);
        }
        QemuRepair::LeavesCorruptions => {
            let qj = q.json.unwrap();
            assert_eq!(q.code, 2);
            assert!(field(&qj, "corruptions") > 0);
            assert_eq!(field(&ij, "corruptions"), 0);
            assert!(field(&ij, "corruptions-fixed") > 0);
        }
        QemuRepair::Fails => assert_eq!(q.code, 1, "{:?}", q.findings),
    }

    // 4. Guest data, and imgloop reads its repaired image as qemu does.
    match case.data {
        Data::AsQemuRepair => assert_same_guest_data(&ia, &qa),
        Data::AsBase => assert_same_guest_data(&ia, &base),
        Data::Reads(patterns) => {
            for &(p, off, len) in patterns {
                assert_qemu_reads(&ia, p, off, len);
            }
        }
    }
    assert_reads_like_qemu(&sc, "qcow2", &ia);
}

/// The guest content of the base image except the first cluster.
const BASE_BUT_CLUSTER_0: &[(u8, &str, &str)] = &[
    (0, "0", "64k"),
    (0x11, "64k", "64k"),
    (0, "128k", "896k"),
    (0x22, "1M", "64k"),
    (0x33, "2M", "64k"),
];

#[test]
fn a_leaked_cluster_from_a_raised_refcount() {
    run_case(Case {
        damage: vec![(refcount_at(0), be16(2))],
        code: 3,
        findings: &["Leaked cluster 0 refcount=2 reference=1"],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsQemuRepair,
    });
}

#[test]
fn a_leaked_cluster_past_the_used_area_counts_in_the_image_end() {
    run_case(Case {
        // Refcount 1 on cluster 9, and the file grown to hold it.
        damage: vec![(refcount_at(9), be16(1)), (0x9_ffff, vec![0])],
        code: 3,
        findings: &["Leaked cluster 9 refcount=1 reference=0"],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsBase,
    });
}

#[test]
fn a_zeroed_refcount_is_a_corruption_that_needs_a_rebuild() {
    run_case(Case {
        damage: vec![(refcount_at(5), be16(0))],
        code: 2,
        findings: &[
            "ERROR cluster 5 refcount=0 reference=1",
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0",
        ],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsBase,
    });
}

#[test]
fn a_raised_data_refcount_is_a_leak_and_a_copied_flag_error() {
    run_case(Case {
        damage: vec![(refcount_at(5), be16(2))],
        code: 2,
        findings: &[
            "Leaked cluster 5 refcount=2 reference=1",
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsBase,
    });
}

#[test]
fn two_l2_entries_pointing_at_one_cluster() {
    run_case(Case {
        // Guest 1M now maps to the cluster of guest 0; its own one leaks.
        damage: vec![(L2 + 16 * 8, be64(COPIED | 0x5_0000))],
        code: 2,
        findings: &[
            "ERROR cluster 5 refcount=1 reference=2",
            "Leaked cluster 7 refcount=1 reference=0",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsQemuRepair,
    });
}

#[test]
fn an_unaligned_l2_entry() {
    run_case(Case {
        damage: vec![(L2, be64(COPIED | 0x5_0200))],
        code: 2,
        findings: &[
            "ERROR offset=50200: Data cluster is not properly aligned; L2 entry corrupted.",
            "ERROR cluster 6 refcount=1 reference=2",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        // The unaligned guest cluster reads as zeroes after the repair.
        data: Data::Reads(BASE_BUT_CLUSTER_0),
    });
}

#[test]
fn an_l2_entry_with_reserved_bits() {
    run_case(Case {
        damage: vec![(L2, be64(COPIED | 0x5_0000 | 2))],
        code: 2,
        findings: &["ERROR found l2 entry with reserved bits set: 8000000000050002"],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        // The bits are cleared; the data stays.
        data: Data::AsBase,
    });
}

#[test]
fn an_l2_entry_past_the_end_of_the_file() {
    run_case(Case {
        damage: vec![(L2, be64(COPIED | 0x1000_0000))],
        code: 2,
        findings: &[
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x10000000 size 0x10000",
            "Leaked cluster 5 refcount=1 reference=0",
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000010000000 refcount=0",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        // qemu reads the cluster past the end as zeroes; so does the repair.
        data: Data::AsQemuRepair,
    });
}

#[test]
fn an_l1_entry_past_the_end_of_the_file() {
    run_case(Case {
        damage: vec![(L1, be64(COPIED | 0x1000_0000))],
        code: 2,
        findings: &[
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x10000000 size 0x10000",
            "Leaked cluster 4 refcount=1 reference=0",
            "Leaked cluster 8 refcount=1 reference=0",
            "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=8000000010000000 refcount=0",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        data: Data::AsQemuRepair,
    });
}

#[test]
fn an_l2_table_overlapping_the_refcount_block() {
    run_case(Case {
        // The L1 entry points at the refcount block, whose refcounts then
        // read as L2 entries (zero clusters far past the end of the file).
        damage: vec![(L1, be64(COPIED | REFBLOCK))],
        code: 2,
        findings: &[
            "ERROR refcount block 0 refcount=2",
            "ERROR cluster 2 refcount=1 reference=2",
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x1000100010000 size 0x10000",
            "Leaked cluster 7 refcount=1 reference=0",
        ],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::LeavesCorruptions,
        data: Data::AsQemuRepair,
    });
}

#[test]
fn a_compressed_descriptor_past_the_end_of_the_file() {
    run_case(Case {
        damage: vec![(L2 + 32 * 8, be64(COMPRESSED | 0x80_0000))],
        code: 2,
        findings: &[
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x800000 size 0x200",
            "Leaked cluster 8 refcount=1 reference=0",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        // qemu cannot decompress it; after imgloop's repair it reads zeroes.
        data: Data::Reads(&[
            (0x11, "0", "128k"),
            (0x22, "1M", "64k"),
            (0, "2M", "64k"),
        ]),
    });
}

#[test]
fn a_compressed_descriptor_whose_size_reaches_past_the_end() {
    run_case(Case {
        // 201 sectors from 0x80000: far past the end of the file.
        damage: vec![(L2 + 32 * 8, be64(COMPRESSED | (200 << 54) | 0x8_0000))],
        code: 2,
        findings: &["ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x80000 size 0x19200"],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        // qemu fails to read it even after its repair; imgloop's repair
        // cuts the size at the end of the file and keeps the data.
        data: Data::Reads(&[(0x11, "0", "128k"), (0x33, "2M", "64k")]),
    });
}

#[test]
fn a_compressed_descriptor_with_the_copied_flag() {
    run_case(Case {
        damage: vec![(L2 + 32 * 8, be64(COPIED | COMPRESSED | 0x8_0000))],
        code: 2,
        findings: &[
            "ERROR: coffset=0x80000: copied flag must never be set for compressed clusters",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        data: Data::AsBase,
    });
}

#[test]
fn an_unaligned_refcount_table_entry() {
    run_case(Case {
        damage: vec![(REFTABLE, be64(REFBLOCK + 0x200))],
        // No refcount can be read: the check is not complete.
        code: 1,
        findings: &[
            "ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted",
            "Can't get refcount for cluster 8",
        ],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::Fails,
        data: Data::AsBase,
    });
}

#[test]
fn a_refcount_table_entry_past_the_end_of_the_file() {
    run_case(Case {
        damage: vec![(REFTABLE, be64(0x1000_0000))],
        code: 2,
        findings: &[
            "ERROR refcount block 0 is outside image",
            "ERROR cluster 0 refcount=0 reference=1",
            "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=8000000000040000 refcount=0",
        ],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::CleanCountingAGrownFile,
        data: Data::AsBase,
    });
}

#[test]
fn a_zeroed_refcount_table_entry() {
    run_case(Case {
        damage: vec![(REFTABLE, be64(0))],
        code: 2,
        findings: &["ERROR cluster 8 refcount=0 reference=1"],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsBase,
    });
}

#[test]
fn a_refcount_table_entry_with_reserved_bits() {
    run_case(Case {
        damage: vec![(REFTABLE, be64(REFBLOCK | 1))],
        code: 2,
        findings: &[
            "ERROR refcount table entry 0 has reserved bits set",
            "Leaked cluster 2 refcount=1 reference=0",
        ],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::Fails,
        data: Data::AsBase,
    });
}

#[test]
fn two_refcount_table_entries_sharing_a_block() {
    run_case(Case {
        damage: vec![(REFTABLE + 8, be64(REFBLOCK))],
        code: 2,
        findings: &[
            "ERROR refcount block 1 refcount=2",
            "ERROR cluster 2 refcount=1 reference=2",
        ],
        leaks_needs_rebuild: true,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsBase,
    });
}

#[test]
fn an_l1_entry_with_reserved_bits() {
    run_case(Case {
        damage: vec![(L1, be64(COPIED | L2 | 1))],
        code: 2,
        findings: &["ERROR found L1 entry with reserved bits set: 8000000000040001"],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::LeavesCorruptions,
        data: Data::AsBase,
    });
}

#[test]
fn an_unaligned_preallocated_zero_cluster() {
    run_case(Case {
        // Zero flag plus an unaligned host offset: both tools turn it into
        // a plain zero cluster.
        damage: vec![(L2 + 8, be64(COPIED | 0x6_0200 | 1))],
        code: 2,
        findings: &[
            "ERROR offset=60200: Preallocated cluster is not properly aligned; L2 entry corrupted.",
            "ERROR cluster 7 refcount=1 reference=2",
        ],
        leaks_needs_rebuild: false,
        qemu_repair: QemuRepair::Clean,
        data: Data::AsQemuRepair,
    });
}

#[test]
fn repair_output_reads_like_qemu_img() {
    let sc = Scratch::new();
    let img = base_image(&sc, "dup.qcow2");
    patch(&img, L2 + 16 * 8, &be64(COPIED | 0x5_0000));
    let q = check_with(Tool::Qemu, &copy(&sc, &img, "q.qcow2"), Some("all"), false);
    let i = check_with(Tool::Imgloop, &img, Some("all"), false);
    assert_eq!(i.code, 0);
    assert_eq!(i.stdout, q.stdout);
    assert!(
        i.stdout.contains("The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    3 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image."),
        "{}",
        i.stdout
    );
    for line in [
        "Repairing cluster 5 refcount=1 reference=2",
        "Repairing cluster 7 refcount=1 reference=0",
        "Repairing OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2",
    ] {
        assert!(
            i.findings.iter().any(|l| l == line),
            "{line:?} in {:?}",
            i.findings
        );
    }
    // -q prints nothing on stdout, the exit code still tells.
    let r = imgloop(&["check", "-q", s(&img)]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
}

/// Every qcow2 flavour: a clean image checks like qemu's, and a refcount
/// zeroed by hand is rebuilt by `-r all` exactly as qemu-img rebuilds it
/// (same report, same image end, same guest data).
#[test]
fn image_flavours_check_and_rebuild_like_qemu() {
    let sc = Scratch::new();
    let data_file = format!("data_file={}", s(&sc.path("datafile.raw")));
    let flavours: &[(&str, &str, bool)] = &[
        ("v2", "compat=0.10", true),
        ("extl2", "extended_l2=on", true),
        ("rc1", "refcount_bits=1", false),
        ("rc64", "refcount_bits=64", false),
        ("cs512", "cluster_size=512", true),
        ("zstd", "compression_type=zstd", false),
        ("datafile", &data_file, false),
    ];
    for &(name, opts, snapshot) in flavours {
        let img = sc.path(&format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "8M"]).ok();
        let mut writes = vec![
            "write -P 0x11 0 100k",
            "write -P 0x22 1M 64k",
            "write -z 2M 64k",
            "write -P 5 5M 3k",
        ];
        if name != "datafile" {
            writes.push("write -c -P 0x33 3M 64k");
        }
        qemu_io("qcow2", &img, &writes).ok();
        if snapshot {
            qemu_img(&["snapshot", "-c", "s1", s(&img)]).ok();
            qemu_io("qcow2", &img, &["write -P 0x44 0 64k"]).ok();
        }
        if name == "rc64" {
            qemu_img(&["bitmap", "--add", s(&img), "b0"]).ok();
        }
        let q = check(Tool::Qemu, &img, None);
        let i = check(Tool::Imgloop, &img, None);
        assert_eq!((i.code, &i.json), (0, &q.json), "{name}: {:?}", i.findings);
        assert_eq!(q.code, 0, "{name}");

        // Zero the refcount of the L1 table's cluster.
        let bytes = std::fs::read(&img).unwrap();
        let b64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let b32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let cs = 1u64 << b32(20);
        let order = if b32(4) == 3 { b32(96) } else { 4 };
        let bits = 1u64 << order;
        let c = b64(40) / cs;
        let per = cs * 8 / bits;
        let block = b64((b64(48) + c / per * 8) as usize);
        let bit = (c % per) * bits;
        let byte = block + bit / 8;
        let width = bits.div_ceil(8) as usize;
        let mut v = bytes[byte as usize..byte as usize + width].to_vec();
        if bits < 8 {
            v[0] &= !((((1u16 << bits) - 1) << (bit % 8)) as u8);
        } else {
            v.fill(0);
        }
        patch(&img, byte, &v);
        let qa = copy(&sc, &img, &format!("{name}-q.qcow2"));
        let q = check(Tool::Qemu, &qa, None);
        let i = check(Tool::Imgloop, &img, None);
        assert_eq!(q.code, 2, "{name}");
        assert_eq!((i.code, &i.json), (q.code, &q.json), "{name}");
        let q = check(Tool::Qemu, &qa, Some("all"));
        let i = check(Tool::Imgloop, &img, Some("all"));
        assert_eq!(q.code, 0, "{name}: {:?}", q.findings);
        assert_eq!(
            (i.code, &i.json),
            (q.code, &q.json),
            "{name}: {:?}",
            i.findings
        );
        assert_clean_by_qemu(&img);
        assert_same_guest_data(&img, &qa);
    }
}

/// Lazy refcounts: qemu-io killed after writing leaves the dirty bit and
/// refcounts that were never written. Both tools report the same; the next
/// read-write open by imgloop repairs the image and clears the bit.
#[test]
fn a_dirty_image_from_a_killed_writer_is_repaired_on_the_next_open() {
    let sc = Scratch::new();
    let img = sc.path("lazy.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&img),
        "4M",
    ])
    .ok();
    let r = qemu_io(
        "qcow2",
        &img,
        &["write -P 0x5a 0 128k", "write -P 0x6b 1M 64k", "abort"],
    );
    assert_ne!(r.code, 0, "qemu-io abort must kill it");
    let dirty =
        |p: &Path| qemu_img(&["info", "--output=json", s(p)]).ok().json()["dirty-flag"].clone();
    assert_eq!(dirty(&img), true);

    let q = check(Tool::Qemu, &copy(&sc, &img, "q0.qcow2"), None);
    let i = check(Tool::Imgloop, &img, None);
    assert_eq!(q.code, 2);
    assert_eq!((i.code, &i.json), (q.code, &q.json));
    assert_eq!(field(i.json.as_ref().unwrap(), "corruptions"), 6);

    // check -r all repairs it as qemu-img does, dirty bit included.
    let qa = copy(&sc, &img, "qa.qcow2");
    let ia = copy(&sc, &img, "ia.qcow2");
    let q = check(Tool::Qemu, &qa, Some("all"));
    let i = check(Tool::Imgloop, &ia, Some("all"));
    assert_eq!((i.code, &i.json), (q.code, &q.json));
    assert_eq!(dirty(&ia), false);

    // A plain read-write open repairs it first, as qemu-io does.
    let ours = copy(&sc, &img, "ours.qcow2");
    let theirs = copy(&sc, &img, "theirs.qcow2");
    imgloop_io("qcow2", &ours, &["write -P 0x7c 2M 64k"]).ok();
    qemu_io("qcow2", &theirs, &["write -P 0x7c 2M 64k"]).ok();
    assert_eq!(dirty(&ours), false);
    assert_clean_by_qemu(&ours);
    assert_same_guest_data(&ours, &theirs);
    imgloop_io(
        "qcow2",
        &ours,
        &["read -P 0x5a 0 128k", "read -P 0x6b 1M 64k"],
    )
    .ok();

    // The dirty bit set by hand over a leaked cluster: the open drops the leak.
    let hand = base_image(&sc, "hand.qcow2");
    patch(&hand, 72, &be64(1));
    patch(&hand, refcount_at(0), &be16(2));
    assert_eq!(dirty(&hand), true);
    assert_eq!(check(Tool::Qemu, &hand, None).code, 3);
    imgloop_io("qcow2", &hand, &["write -P 0x7d 3M 4k"]).ok();
    assert_eq!(dirty(&hand), false);
    assert_clean_by_qemu(&hand);
    assert_qemu_reads(&hand, 0x11, "0", "128k");
    assert_qemu_reads(&hand, 0x7d, "3M", "4k");
}

/// Metadata found invalid while writing marks the image corrupt and stops
/// writes; read-write opens are refused until `check -r all` repairs it.
#[test]
fn invalid_metadata_found_by_a_write_marks_the_image_corrupt() {
    let sc = Scratch::new();
    let corrupt = |p: &Path| {
        qemu_img(&["info", "--output=json", s(p)]).ok().json()["format-specific"]["data"]["corrupt"]
            .clone()
    };
    for (name, entry) in [
        ("reserved", COPIED | 0x5_0000 | 2),
        ("unaligned", COPIED | 0x5_0200),
    ] {
        let img = base_image(&sc, &format!("{name}.qcow2"));
        patch(&img, L2, &be64(entry));
        assert_eq!(corrupt(&img), false);
        let r = imgloop_io("qcow2", &img, &["write -P 0x44 0 4k"]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.starts_with("imgloop: "), "{}", r.stderr);
        assert!(
            r.stderr.contains("L2 table") && r.stderr.contains("marked corrupt"),
            "{}",
            r.stderr
        );
        assert_eq!(corrupt(&img), true, "{name}");
        // Nothing else is written either, and the next open is refused.
        let r = imgloop_io("qcow2", &img, &["write -P 0x44 1M 4k"]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains("imgloop check -r all"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        // Reading still works, and qemu agrees on what is wrong.
        imgloop(&["io", "-r", "-c", "read -P 0x22 1M 64k", s(&img)]).ok();
        let q = check(Tool::Qemu, &copy(&sc, &img, "q.qcow2"), None);
        let i = check(Tool::Imgloop, &img, None);
        assert_eq!((i.code, &i.json), (q.code, &q.json));
        assert_eq!(i.code, 2);
        // The repair clears the bit; writes work again.
        let i = check(Tool::Imgloop, &img, Some("all"));
        assert_eq!(i.code, 0, "{:?}", i.findings);
        assert_eq!(corrupt(&img), false);
        assert_clean_by_qemu(&img);
        imgloop_io(
            "qcow2",
            &img,
            &["write -P 0x44 1M 4k", "read -P 0x44 1M 4k"],
        )
        .ok();
        imgloop_io("qcow2", &img, &["read -P 0x11 64k 64k"]).ok();
        assert_clean_by_qemu(&img);
    }
}
