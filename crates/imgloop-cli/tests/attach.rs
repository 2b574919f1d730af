//! `imgloop attach`, `detach`, `list` and `fuse`: images as Linux block
//! devices through the FUSE export and a loop device.
//!
//! These tests need root, /dev/fuse and the loop driver; without them each
//! test prints why and passes without running. They also use mkfs.ext4,
//! fstrim, sfdisk, losetup, blockdev, mount, unshare and setpriv (installed
//! by `.ci/run`). Tests in this file run one at a time (they share the
//! machine's loop devices), each with its own run directory
//! (`IMGLOOP_RUN_DIR`) so `detach --all` only sees its own attachments, and
//! a guard that unmounts and detaches everything even when a test fails.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if uid != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control is missing (no loop driver)".into());
    }
    None
}

/// One test's world: a scratch directory, a private run directory, and
/// everything to undo at the end (mounts, attachments, processes).
struct Env {
    sc: Scratch,
    run_dir: PathBuf,
    mounts: Vec<PathBuf>,
    children: Vec<Child>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

macro_rules! env_or_skip {
    () => {
        match Env::new() {
            Some(e) => e,
            None => return,
        }
    };
}

impl Env {
    fn new() -> Option<Env> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return None;
        }
        let sc = Scratch::new();
        let run_dir = sc.path("run");
        Some(Env {
            sc,
            run_dir,
            mounts: Vec::new(),
            children: Vec::new(),
            _serial: serial,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.sc.path(name)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(imgloop_bin());
        c.env("IMGLOOP_RUN_DIR", &self.run_dir);
        c
    }

    /// Runs `imgloop ARGS` with this test's run directory.
    fn il(&self, args: &[&str]) -> Run {
        let out = self.cmd().args(args).output().expect("run imgloop");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `imgloop attach ARGS`, returning the device path.
    fn attach(&self, args: &[&str]) -> String {
        let mut v = vec!["attach"];
        v.extend_from_slice(args);
        let r = self.il(&v).ok();
        let dev = r.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "attach printed {dev:?}");
        assert!(
            std::fs::metadata(&dev)
                .unwrap()
                .file_type()
                .is_block_device(),
            "{dev} is not a block device"
        );
        dev
    }

    fn list(&self) -> Vec<serde_json::Value> {
        match self.il(&["list", "--output", "json"]).ok().json() {
            serde_json::Value::Array(v) => v,
            other => panic!("list is not an array: {other}"),
        }
    }

    fn entry(&self, dev: &str) -> serde_json::Value {
        self.list()
            .into_iter()
            .find(|e| e["device"] == dev)
            .unwrap_or_else(|| panic!("{dev} not listed"))
    }

    fn pid_of(&self, dev: &str) -> u32 {
        self.entry(dev)["pid"].as_u64().unwrap() as u32
    }

    /// Mounts `dev` at a new directory `name` (unmounted by the guard).
    fn mount(&mut self, dev: &str, name: &str, opts: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        tool("mount", &["-o", opts, dev, s(&dir)]);
        self.mounts.push(dir.clone());
        dir
    }

    /// Waits until `dev` is no longer bound to one of this test's exports
    /// (another process may already have bound it to something else).
    fn released(&self, dev: &str) -> bool {
        let ours = self.run_dir.to_str().unwrap().to_string();
        wait_for(10, || {
            sysfs(dev, "loop/backing_file").is_none_or(|b| !b.starts_with(&ours) && b != "/")
        })
    }

    fn umount(&mut self, dir: &Path) {
        tool("umount", &[s(dir)]);
        self.mounts.retain(|m| m != dir);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.cmd().args(["detach", "--all"]).output();
        // Anything still left: kill its export and unbind its device.
        if let Ok(dir) = std::fs::read_dir(&self.run_dir) {
            for e in dir.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "json") {
                    if let Ok(v) = std::fs::read_to_string(&p)
                        .map_err(|_| ())
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|_| ()))
                    {
                        if let Some(pid) = v["pid"].as_u64() {
                            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
                        }
                        if let Some(dev) = v["device"].as_str() {
                            let _ = Command::new("losetup").args(["-d", dev]).output();
                        }
                    }
                } else {
                    let _ = Command::new("umount").arg("-l").arg(&p).output();
                }
            }
        }
    }
}

/// Runs a system tool and panics with its output when it fails.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn loop_name(dev: &str) -> &str {
    dev.strip_prefix("/dev/").unwrap()
}

fn sysfs(dev: &str, rel: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{}/{rel}", loop_name(dev)))
        .ok()
        .map(|s| s.trim().to_string())
}

fn is_bound(dev: &str) -> bool {
    sysfs(dev, "loop/backing_file").is_some()
}

/// Polls `cond` for up to `secs` seconds.
fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == p))
}

/// A 64-bit FNV-1a hash: checksums for comparing file contents.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn file_hash(p: &Path) -> u64 {
    fnv(&std::fs::read(p).unwrap())
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes a tree of files under `root`; returns (relative path, checksum).
fn write_tree(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for d in 0..4 {
        let dir = root.join(format!("dir{d}")).join(format!("sub{}", d % 2));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..10u64 {
            let seed = d * 100 + f;
            let len = 1 + (seed * 7919 % 300) as usize * 1024 + (seed as usize % 777);
            let data = noise(seed, len);
            let rel = dir.strip_prefix(root).unwrap().join(format!("f{f}.bin"));
            std::fs::write(root.join(&rel), &data).unwrap();
            files.push((rel, fnv(&data)));
        }
    }
    std::fs::write(root.join("empty"), b"").unwrap();
    files.push((PathBuf::from("empty"), fnv(b"")));
    files
}

/// Formats whose images imgloop can create, with a note for the others.
fn creatable_formats(env: &Env) -> Vec<&'static str> {
    let mut v = Vec::new();
    for fmt in [
        "raw",
        "qcow2",
        "qcow",
        "vhdx",
        "vpc",
        "vmdk",
        "vdi",
        "parallels",
    ] {
        let p = env.path(&format!("probe.{fmt}"));
        let r = env.il(&["create", "-q", "-f", fmt, s(&p), "1M"]);
        let _ = std::fs::remove_file(&p);
        if r.code == 0 {
            v.push(fmt);
        } else {
            eprintln!("format {fmt}: not tested ({})", r.stderr.trim());
        }
    }
    v
}

/// The round trip every format must pass: attach, mkfs.ext4, mount, write
/// a tree of files, sync, umount, detach; `qemu-img check` is clean; a
/// read-only re-attach shows the same files, and leaves the image file
/// unchanged byte for byte.
fn filesystem_round_trip(env: &mut Env, fmt: &str) {
    let img = env.path(&format!("fs.{fmt}"));
    env.il(&["create", "-q", "-f", fmt, s(&img), "256M"]).ok();
    let dev = env.attach(&["-f", fmt, s(&img)]);
    let e = env.entry(&dev);
    assert_eq!(e["format"], fmt);
    assert_eq!(e["read-only"], false);
    assert_eq!(e["running"], true);
    assert_eq!(e["image"], s(&std::fs::canonicalize(&img).unwrap()));

    tool("mkfs.ext4", &["-q", "-F", &dev]);
    let mnt = env.mount(&dev, "mnt", "rw");
    let files = write_tree(&mnt);
    tool("sync", &[]);
    env.umount(&mnt);
    env.il(&["detach", &dev]).ok();
    assert!(env.list().is_empty(), "still listed after detach");
    assert!(env.released(&dev), "{dev} still bound to the export");

    let c = qemu_img(&["check", "-f", fmt, s(&img)]);
    let no_checks = c.code == 63 && c.stderr.contains("does not support checks");
    assert!(
        c.code == 0 || no_checks,
        "qemu-img check {fmt}: exit {}\n{}{}",
        c.code,
        c.stdout,
        c.stderr
    );
    // The filesystem as qemu-img reads the image is clean.
    let exported = env.path(&format!("fs-{fmt}.raw"));
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(&img), s(&exported)]).ok();
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&exported)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{fmt}: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let _ = std::fs::remove_file(&exported);

    let before = file_hash(&img);
    let dev = env.attach(&["-r", "-f", fmt, s(&img)]);
    assert_eq!(env.entry(&dev)["read-only"], true);
    assert_eq!(sysfs(&dev, "ro").as_deref(), Some("1"));
    let mnt = env.mount(&dev, "mnt-ro", "ro,noload");
    for (rel, sum) in &files {
        assert_eq!(
            file_hash(&mnt.join(rel)),
            *sum,
            "{fmt}: {} differs",
            rel.display()
        );
    }
    env.umount(&mnt);
    // Writes to the read-only device fail.
    let w = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=4k",
            "count=1",
            "oflag=direct",
        ])
        .output()
        .unwrap();
    assert!(
        !w.status.success(),
        "a write to the read-only device succeeded"
    );
    env.il(&["detach", s(&img)]).ok();
    assert_eq!(
        file_hash(&img),
        before,
        "{fmt}: a read-only attach changed the image"
    );
}

#[test]
fn every_format_survives_a_filesystem_round_trip() {
    let mut env = env_or_skip!();
    let formats = creatable_formats(&env);
    assert!(formats.contains(&"raw"));
    for fmt in formats {
        filesystem_round_trip(&mut env, fmt);
    }
}

#[test]
fn partscan_shows_the_partitions_of_a_gpt_image() {
    let env = env_or_skip!();
    let img = env.path("gpt.raw");
    env.il(&["create", "-q", "-f", "raw", s(&img), "64M"]).ok();
    let script = "label: gpt\n,16M\n,16M\n";
    let mut sf = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sfdisk (package fdisk) is needed");
    sf.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(sf.wait().unwrap().success());

    // The kernel's own loop setup with partition scanning is the oracle
    // for which partitions show up (none when the kernel lacks GPT support).
    let oracle = tool("losetup", &["-r", "-P", "-f", "--show", s(&img)]);
    let oracle = oracle.trim().to_string();
    let parts = |dev: &str| -> Vec<(String, String)> {
        let name = loop_name(dev).to_string();
        let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/sys/block/{name}"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let rest = n.strip_prefix(&format!("{name}p"))?.to_string();
                let size = std::fs::read_to_string(e.path().join("size")).ok()?;
                Some((rest, size.trim().to_string()))
            })
            .collect();
        v.sort();
        v
    };
    wait_for(2, || !parts(&oracle).is_empty());
    let expected = parts(&oracle);
    tool("losetup", &["-d", &oracle]);

    let dev = env.attach(&["-r", "-P", s(&img)]);
    assert_eq!(sysfs(&dev, "loop/partscan").as_deref(), Some("1"));
    assert_eq!(env.entry(&dev)["partscan"], true);
    wait_for(2, || parts(&dev).len() >= expected.len());
    assert_eq!(parts(&dev), expected);
    if expected.is_empty() {
        eprintln!("note: this kernel shows no GPT partitions on loop devices; checked the partscan flag only");
    } else {
        assert_eq!(expected.len(), 2);
        for (n, _) in &expected {
            let p = format!("{dev}p{n}");
            assert!(wait_for(2, || Path::new(&p).exists()), "{p} missing");
        }
    }
    // Without -P the flag is off.
    env.il(&["detach", &dev]).ok();
    let dev = env.attach(&["-r", s(&img)]);
    assert_eq!(sysfs(&dev, "loop/partscan").as_deref(), Some("0"));
}

#[test]
fn a_parallels_disk_bundle_attaches_as_its_top_image() {
    let env = env_or_skip!();
    let dir = env.path("disk.hdd");
    std::fs::create_dir(&dir).unwrap();
    let (base, top) = (dir.join("base.hds"), dir.join("top.hds"));
    for f in [&base, &top] {
        env.il(&["create", "-q", "-f", "parallels", s(f), "8M"])
            .ok();
    }
    env.il(&["io", "-c", "write -P 0x61 0 2M", s(&base)]).ok();
    std::fs::write(
        dir.join("DiskDescriptor.xml"),
        r#"<Parallels_disk_image Version="1.0"><Disk_Parameters><Disk_size>16384</Disk_size></Disk_Parameters>
<StorageData><Storage><Start>0</Start><End>16384</End><Blocksize>2048</Blocksize>
<Image><GUID>{00000000-0000-0000-0000-0000000000aa}</GUID><Type>Compressed</Type><File>base.hds</File></Image>
<Image><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><Type>Compressed</Type><File>top.hds</File></Image>
</Storage></StorageData><Snapshots>
<Shot><GUID>{00000000-0000-0000-0000-0000000000aa}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
<Shot><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><ParentGUID>{00000000-0000-0000-0000-0000000000aa}</ParentGUID></Shot>
</Snapshots></Parallels_disk_image>"#,
    )
    .unwrap();
    let dev = env.attach(&[s(&dir)]);
    let data = noise(12, 4096);
    std::fs::write(env.path("in.bin"), &data).unwrap();
    tool(
        "dd",
        &[
            &format!("if={}", s(&env.path("in.bin"))),
            &format!("of={dev}"),
            "bs=4k",
            "seek=1",
            "conv=fsync",
            "status=none",
        ],
    );
    let mut head = vec![0u8; 8192];
    use std::io::Read;
    std::fs::File::open(&dev)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    env.il(&["detach", &dev]).ok();
    assert!(head[..4096].iter().all(|&b| b == 0x61), "the parent's data");
    assert!(
        head[4096..] == data[..],
        "the data written through the device"
    );
    // The write went to the top image; the parent is as it was.
    env.il(&["io", "-r", "-c", "read -P 0x61 0 2M", s(&base)])
        .ok();
    let top_info = env.il(&["info", "--output=json", s(&top)]).ok();
    assert!(
        top_info.stdout.contains("\"bundle-guid\""),
        "{}",
        top_info.stdout
    );
}

#[test]
fn a_4k_sector_vhdx_attaches_with_4k_logical_blocks() {
    let env = env_or_skip!();
    let img = env.path("4k.vhdx");
    env.il(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "logical_sector_size=4096,block_size=1M",
        s(&img),
        "16M",
    ])
    .ok();
    let dev = env.attach(&[s(&img)]);
    assert_eq!(
        sysfs(&dev, "queue/logical_block_size").as_deref(),
        Some("4096")
    );
    let data = noise(11, 64 << 10);
    std::fs::write(env.path("in.bin"), &data).unwrap();
    tool(
        "dd",
        &[
            &format!("if={}", s(&env.path("in.bin"))),
            &format!("of={dev}"),
            "bs=64k",
            "seek=3",
            "conv=fsync",
            "status=none",
        ],
    );
    env.il(&["detach", &dev]).ok();
    let out = env.path("out.raw");
    env.il(&["convert", "-O", "raw", s(&img), s(&out)]).ok();
    let raw = std::fs::read(&out).unwrap();
    assert!(
        raw[3 << 16..4 << 16] == data[..],
        "the data written through the device"
    );
}

#[test]
fn sector_size_and_direct_io_reach_the_device() {
    let env = env_or_skip!();
    let img = env.path("ss.raw");
    env.il(&["create", "-q", "-f", "raw", s(&img), "32M"]).ok();
    let dev = env.attach(&[s(&img)]);
    assert_eq!(
        sysfs(&dev, "queue/logical_block_size").as_deref(),
        Some("512")
    );
    assert_eq!(sysfs(&dev, "loop/dio").as_deref(), Some("0"));
    assert_eq!(sysfs(&dev, "loop/autoclear").as_deref(), Some("1"));
    env.il(&["detach", &dev]).ok();

    let dev = env.attach(&["--sector-size", "4096", "--direct-io", s(&img)]);
    assert_eq!(
        sysfs(&dev, "queue/logical_block_size").as_deref(),
        Some("4096")
    );
    assert_eq!(tool("blockdev", &["--getss", &dev]).trim(), "4096");
    assert_eq!(sysfs(&dev, "loop/dio").as_deref(), Some("1"));
    // Data goes through in both directions.
    let data = noise(7, 1 << 20);
    std::fs::write(env.path("in.bin"), &data).unwrap();
    tool(
        "dd",
        &[
            &format!("if={}", s(&env.path("in.bin"))),
            &format!("of={dev}"),
            "bs=64k",
            "seek=16",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
    );
    let mut back = vec![0u8; data.len()];
    let mut f = std::fs::File::open(&dev).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1 << 20)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back == data, "read back differs");
    // Open elsewhere: detach refuses rather than wait.
    let r = env.il(&["detach", &dev]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains(&format!("open in process {}", std::process::id())),
        "{}",
        r.stderr
    );
    drop(f);
    env.il(&["detach", &dev]).ok();
    let img_bytes = std::fs::read(&img).unwrap();
    assert!(
        img_bytes[1 << 20..2 << 20] == data[..],
        "image content differs"
    );
}

#[test]
fn fstrim_frees_space_in_the_image() {
    let mut env = env_or_skip!();
    for fmt in ["raw", "qcow2"] {
        fstrim_frees_space(&mut env, fmt);
    }
}

fn fstrim_frees_space(env: &mut Env, fmt: &str) {
    let img = env.path(&format!("trim.{fmt}"));
    env.il(&["create", "-q", "-f", fmt, s(&img), "256M"]).ok();
    let dev = env.attach(&["-f", fmt, s(&img)]);
    tool("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &dev]);
    let mnt = env.mount(&dev, &format!("mnt-{fmt}"), "rw");
    std::fs::write(mnt.join("big"), noise(3, 64 << 20)).unwrap();
    tool("sync", &[]);
    let full = allocated(&img);
    std::fs::remove_file(mnt.join("big")).unwrap();
    tool("sync", &[]);
    tool("fstrim", &[s(&mnt)]);
    // qcow2 returns freed clusters to the file once the discarding L2
    // updates are durable, at the next flush.
    tool("sync", &[]);
    let trimmed = allocated(&img);
    assert!(
        trimmed + (48 << 20) < full,
        "{fmt}: fstrim did not free space: {full} -> {trimmed} bytes allocated"
    );
    env.umount(&mnt);
    env.il(&["detach", &dev]).ok();
    let c = qemu_img(&["check", "-f", fmt, s(&img)]);
    assert!(
        c.code == 0 || c.code == 63,
        "{fmt}: {}{}",
        c.stdout,
        c.stderr
    );
    if fmt == "raw" {
        tool("e2fsck", &["-fn", s(&img)]);
    }
}

#[test]
fn kill_9_keeps_the_data_acknowledged_by_fsync() {
    let mut env = env_or_skip!();
    for fmt in ["raw", "qcow2"] {
        kill_9_keeps_acknowledged_data(&mut env, fmt);
    }
}

fn kill_9_keeps_acknowledged_data(env: &mut Env, fmt: &str) {
    let img = env.path(&format!("crash.{fmt}"));
    env.il(&["create", "-q", "-f", fmt, s(&img), "128M"]).ok();
    let dev = env.attach(&["-f", fmt, s(&img)]);
    let pid = env.pid_of(&dev);
    let acked = noise(11, 4 << 20);
    std::fs::write(env.path("acked.bin"), &acked).unwrap();
    tool(
        "dd",
        &[
            &format!("if={}", s(&env.path("acked.bin"))),
            &format!("of={dev}"),
            "bs=1M",
            "conv=fsync",
            "status=none",
        ],
    );
    // More writes in flight (never acknowledged) when the export dies.
    let mut writer = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=1M",
            "seek=8",
            "count=100",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tool("kill", &["-9", &pid.to_string()]);
    // The writer fails rather than hangs (its data, still cached for the
    // device, can no longer reach the image).
    assert!(
        wait_for(30, || writer.try_wait().unwrap().is_some()),
        "the writer hangs after the export died"
    );

    // The dead export is listed as such and detach cleans up after it.
    assert!(wait_for(5, || env.entry(&dev)["running"] == false));
    env.il(&["detach", &dev]).ok();
    assert!(env.list().is_empty());
    assert!(env.released(&dev), "{dev} still bound");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(s(&env.run_dir)),
        "dead export still mounted"
    );

    // qemu-img may find leaked clusters (exit 3), never corruption.
    let c = qemu_img(&["check", "-f", fmt, s(&img)]);
    assert!(
        matches!(c.code, 0 | 3 | 63),
        "{fmt}: {}{}",
        c.stdout,
        c.stderr
    );
    let exported = env.path(&format!("crash-{fmt}.raw"));
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(&img), s(&exported)]).ok();
    let data = std::fs::read(&exported).unwrap();
    assert!(
        data[..acked.len()] == acked[..],
        "{fmt}: fsync-acknowledged data lost"
    );
}

/// Starts `imgloop attach --foreground` and reads the device it reports.
fn attach_foreground(env: &mut Env, img: &Path) -> (String, usize) {
    let mut child = env
        .cmd()
        .args(["attach", "--foreground", "-f", "raw"])
        .arg(img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let dev = line.trim().to_string();
    assert!(
        dev.starts_with("/dev/loop"),
        "foreground attach printed {dev:?}"
    );
    env.children.push(child);
    (dev, env.children.len() - 1)
}

#[test]
fn sigterm_and_sigint_flush_and_detach_cleanly() {
    let mut env = env_or_skip!();
    let img = env.path("sig.raw");
    env.il(&["create", "-q", "-f", "raw", s(&img), "16M"]).ok();
    for signal in ["-TERM", "-INT"] {
        let (dev, idx) = attach_foreground(&mut env, &img);
        assert!(is_bound(&dev));
        let data = noise(5, 65536);
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all(&data).unwrap();
        drop(f); // buffered in the device's page cache until the export flushes it
        let pid = env.children[idx].id();
        tool("kill", &[signal, &pid.to_string()]);
        let status = env.children[idx].wait().unwrap();
        assert!(status.success(), "{signal}: export exited with {status}");
        assert!(env.released(&dev), "{dev} still bound after {signal}");
        assert!(env.list().is_empty(), "state left after {signal}");
        let on_disk = std::fs::read(&img).unwrap();
        assert!(on_disk[..65536] == data[..], "{signal}: data not flushed");
        let mut stderr = String::new();
        env.children[idx]
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(stderr.is_empty(), "{stderr}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&env.run_dir).unwrap().flatten().collect();
    assert!(leftovers.is_empty(), "run dir not cleaned: {leftovers:?}");
}

#[test]
fn list_detach_and_locking() {
    let mut env = env_or_skip!();
    let a = env.path("a.raw");
    let b = env.path("b.raw");
    env.il(&["create", "-q", "-f", "raw", s(&a), "16M"]).ok();
    env.il(&["create", "-q", "-f", "raw", s(&b), "16M"]).ok();
    let da = env.attach(&["-f", "raw", s(&a)]);
    let db = env.attach(&["-r", s(&b)]);
    let l = env.list();
    assert_eq!(l.len(), 2);
    assert_eq!(env.entry(&db)["read-only"], true);
    assert_eq!(env.entry(&db)["format"], "raw");
    let human = env.il(&["list"]).ok().stdout;
    assert!(human.starts_with("DEVICE"), "{human}");
    assert!(human.contains(&da) && human.contains(s(&b)), "{human}");

    // Attached read-write: a second attach is refused, read-only or not.
    for args in [vec!["attach", s(&a)], vec!["attach", "-r", s(&a)]] {
        let r = env.il(&args);
        assert_ne!(r.code, 0);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("already attached read-write as {da}")),
            "{}",
            r.stderr
        );
    }
    // Without the state record, the image lock still refuses it.
    let r = Command::new(imgloop_bin())
        .env("IMGLOOP_RUN_DIR", env.path("other-run"))
        .args(["attach", s(&a)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.starts_with("imgloop: ") && err.contains("in use"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // qemu sees the lock too.
    let q = qemu_io("raw", &a, &["read 0 512"]);
    assert_ne!(q.code, 0, "qemu-io opened an attached image");
    // A read-only image may be attached read-only twice, not read-write.
    let db2 = env.attach(&["-r", s(&b)]);
    assert_ne!(db, db2);
    let r = env.il(&["attach", s(&b)]);
    assert!(
        r.stderr.contains("already attached read-only"),
        "{}",
        r.stderr
    );

    // A mounted device is not detached.
    tool("mkfs.ext4", &["-q", "-F", &da]);
    let mnt = env.mount(&da, "mnt", "rw");
    let r = env.il(&["detach", &da]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
    env.umount(&mnt);

    // By image path, then everything else.
    env.il(&["detach", s(&a)]).ok();
    assert_eq!(env.list().len(), 2);
    let r = env.il(&["detach", s(&a)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not attached"), "{}", r.stderr);
    env.il(&["detach", "--all"]).ok();
    assert!(env.list().is_empty());
    assert!(env.il(&["list"]).ok().stdout.is_empty());
    for d in [&da, &db, &db2] {
        assert!(env.released(d), "{d} still bound to the export");
    }
}

/// `imgloop fuse IMAGE MOUNTPOINT` in the background until the file has
/// the virtual size.
fn start_fuse(env: &mut Env, args: &[&str], mountpoint: &Path, file: &Path, size: u64) -> usize {
    let child = env
        .cmd()
        .arg("fuse")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.children.push(child);
    env.mounts.push(mountpoint.to_path_buf());
    assert!(
        wait_for(10, || mounted(mountpoint)
            && std::fs::metadata(file).is_ok_and(|m| m.len() == size)),
        "the FUSE export did not appear"
    );
    env.children.len() - 1
}

fn stop_fuse(env: &mut Env, idx: usize, mountpoint: &Path) {
    let pid = env.children[idx].id();
    tool("kill", &["-TERM", &pid.to_string()]);
    let status = env.children[idx].wait().unwrap();
    assert!(status.success(), "fuse exited with {status}");
    assert!(!mounted(mountpoint), "still mounted after SIGTERM");
    env.mounts.retain(|m| m != mountpoint);
}

fn seek(f: &std::fs::File, offset: i64, whence: i32) -> Option<i64> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek takes plain integers and an fd that `f` keeps open.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    (r >= 0).then_some(r)
}

#[test]
fn the_fuse_export_serves_sparse_copies_discard_and_seek() {
    let mut env = env_or_skip!();
    let img = env.path("f.raw");
    let size = 64u64 << 20;
    env.il(&["create", "-q", "-f", "raw", s(&img), "64M"]).ok();
    imgloop_io(
        "raw",
        &img,
        &["write -P 0xab 1M 64k", "write -P 0xcd 10M 1M"],
    )
    .ok();
    let file = env.path("export.raw");
    std::fs::write(&file, b"").unwrap();
    let idx = start_fuse(
        &mut env,
        &["-f", "raw", s(&img), s(&file)],
        &file,
        &file,
        size,
    );

    // SEEK_DATA / SEEK_HOLE follow the image's allocation.
    let f = std::fs::File::open(&file).unwrap();
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Some(1 << 20));
    assert_eq!(seek(&f, 1 << 20, libc::SEEK_HOLE), Some((1 << 20) + 65536));
    assert_eq!(seek(&f, 2 << 20, libc::SEEK_DATA), Some(10 << 20));
    assert_eq!(seek(&f, 10 << 20, libc::SEEK_HOLE), Some(11 << 20));
    assert_eq!(seek(&f, 12 << 20, libc::SEEK_DATA), None);
    drop(f);

    // A sparse copy out is exact and sparse.
    let copy = env.path("copy.raw");
    tool("cp", &["--sparse=always", s(&file), s(&copy)]);
    assert_eq!(file_hash(&copy), file_hash(&img));
    assert!(
        allocated(&copy) <= 2 << 20,
        "copy not sparse: {}",
        allocated(&copy)
    );

    // Punch-hole and zero-range reach the image.
    let before = allocated(&img);
    tool("fallocate", &["-p", "-o", "10M", "-l", "512k", s(&file)]);
    tool("fallocate", &["-z", "-o", "1M", "-l", "4k", s(&file)]);
    assert!(
        allocated(&img) + (400 << 10) <= before,
        "punch-hole freed nothing"
    );
    let now = std::fs::read(&img).unwrap();
    assert!(now[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0));
    assert!(now[10 << 20..(10 << 20) + (512 << 10)]
        .iter()
        .all(|&b| b == 0));
    assert!(now[(10 << 20) + (512 << 10)..11 << 20]
        .iter()
        .all(|&b| b == 0xcd));

    // dd conv=sparse and cp --sparse into the export write the data back.
    tool(
        "dd",
        &[
            &format!("if={}", s(&copy)),
            &format!("of={}", s(&file)),
            "bs=64k",
            "conv=sparse,notrunc",
            "status=none",
        ],
    );
    assert_eq!(file_hash(&img), file_hash(&copy));
    let other = env.path("other.raw");
    env.il(&["create", "-q", "-f", "raw", s(&other), "64M"])
        .ok();
    imgloop_io("raw", &other, &["write -P 0x5a 3M 128k"]).ok();
    tool("cp", &["--sparse=always", s(&other), s(&file)]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
    assert_eq!(file_hash(&img), file_hash(&other));
    // Writing past the end of the disk fails; the size never changes.
    let w = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", s(&file)),
            "bs=4k",
            "count=1",
            "seek=16384",
            "conv=notrunc",
        ])
        .output()
        .unwrap();
    assert!(!w.status.success());
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
    stop_fuse(&mut env, idx, &file);

    // A directory mountpoint holds one file, `disk`; -r refuses writes.
    let dir = env.path("exportdir");
    std::fs::create_dir(&dir).unwrap();
    let disk = dir.join("disk");
    let before = file_hash(&img);
    let idx = start_fuse(&mut env, &["-r", s(&img), s(&dir)], &dir, &disk, size);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["disk".to_string()]);
    assert_eq!(file_hash(&disk), before);
    assert!(std::fs::OpenOptions::new().write(true).open(&disk).is_err());
    assert!(
        Command::new("fallocate")
            .args(["-p", "-o", "0", "-l", "4096"])
            .arg(&disk)
            .output()
            .unwrap()
            .status
            .code()
            != Some(0)
    );
    stop_fuse(&mut env, idx, &dir);
    assert_eq!(file_hash(&img), before);
}

fn assert_one_line_error(r: &Run, needle: &str) {
    assert_ne!(r.code, 0, "expected failure: {}", r.stdout);
    assert!(r.stderr.starts_with("imgloop: "), "{}", r.stderr);
    assert_eq!(
        r.stderr.trim_end().lines().count(),
        1,
        "not one line: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains(needle),
        "stderr lacks {needle:?}: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

/// Runs `imgloop ARGS` in a private mount namespace whose /dev is a fresh
/// tmpfs holding only the given character devices (name, major, minor).
fn in_bare_dev(env: &Env, nodes: &[(&str, u32, u32)], args: &[&str]) -> Run {
    let mut script = String::from("mount -t tmpfs none /dev && ");
    for (name, major, minor) in nodes {
        script.push_str(&format!("mknod /dev/{name} c {major} {minor} && "));
    }
    script.push_str("exec \"$@\"");
    let out = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
            imgloop_bin(),
        ])
        .args(args)
        .env("IMGLOOP_RUN_DIR", &env.run_dir)
        .output()
        .expect("unshare (util-linux) is needed");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn attach_errors_are_one_line() {
    let env = env_or_skip!();
    let img = env.path("e.raw");
    env.il(&["create", "-q", "-f", "raw", s(&img), "16M"]).ok();

    let missing = env.path("missing.img");
    assert_one_line_error(&env.il(&["attach", s(&missing)]), "No such file");
    assert_one_line_error(
        &env.il(&["attach", "-f", "foo", s(&img)]),
        "Unknown driver 'foo'",
    );
    assert_one_line_error(&env.il(&["fuse", s(&missing), s(&img)]), "No such file");
    assert_one_line_error(&env.il(&["detach", "/dev/loop250"]), "not attached");

    let r = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            imgloop_bin(),
            "attach",
        ])
        .arg(&img)
        .output()
        .unwrap();
    let r = Run {
        code: r.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
    };
    assert_one_line_error(&r, "needs root");

    let r = in_bare_dev(&env, &[("null", 1, 3)], &["attach", s(&img)]);
    assert_one_line_error(&r, "/dev/fuse not found");
    let r = in_bare_dev(&env, &[("null", 1, 3)], &["fuse", s(&img), s(&img)]);
    assert_one_line_error(&r, "/dev/fuse not found");
    let r = in_bare_dev(
        &env,
        &[("null", 1, 3), ("fuse", 10, 229)],
        &["attach", s(&img)],
    );
    assert_one_line_error(&r, "no free loop device");
    // Nothing was left behind by the failed attempts.
    assert!(env.list().is_empty());
    let left: Vec<_> = std::fs::read_dir(&env.run_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A COW file over a raw disk holding a filesystem: the filesystem shows
/// through, files written on the attached COW device land only in the COW
/// file, and `uml_moo` (UML's own merge) sees the same filesystem.
#[test]
fn a_cow_file_over_a_filesystem_attaches_and_uml_moo_merges_what_was_written() {
    let mut env = env_or_skip!();
    let base = env.path("base.img");
    env.il(&["create", "-q", "-f", "raw", s(&base), "128M"])
        .ok();
    let dev = env.attach(&["-f", "raw", s(&base)]);
    tool("mkfs.ext4", &["-q", "-F", &dev]);
    let mnt = env.mount(&dev, "mnt-base", "rw");
    let first = write_tree(&mnt);
    tool("sync", &[]);
    env.umount(&mnt);
    env.il(&["detach", &dev]).ok();
    let base_hash = file_hash(&base);

    let cow = env.path("over.cow");
    env.il(&[
        "create",
        "-q",
        "-f",
        "cow",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&cow),
    ])
    .ok();
    let dev = env.attach(&["-f", "cow", s(&cow)]);
    assert_eq!(env.entry(&dev)["format"], "cow");
    let mnt = env.mount(&dev, "mnt-cow", "rw");
    for (rel, sum) in &first {
        assert_eq!(file_hash(&mnt.join(rel)), *sum, "{} differs", rel.display());
    }
    std::fs::create_dir(mnt.join("more")).unwrap();
    let more = write_tree(&mnt.join("more"));
    tool("sync", &[]);
    env.umount(&mnt);
    env.il(&["detach", &dev]).ok();
    assert_eq!(file_hash(&base), base_hash, "the backing file changed");

    let merged = env.path("merged.img");
    tool("uml_moo", &[s(&cow), s(&merged)]);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dev = env.attach(&["-r", "-f", "raw", s(&merged)]);
    let mnt = env.mount(&dev, "mnt-merged", "ro,noload");
    for (rel, sum) in &first {
        assert_eq!(
            file_hash(&mnt.join(rel)),
            *sum,
            "merged: {} differs",
            rel.display()
        );
    }
    for (rel, sum) in &more {
        let p = mnt.join("more").join(rel);
        assert_eq!(file_hash(&p), *sum, "merged: {} differs", p.display());
    }
    env.umount(&mnt);
    env.il(&["detach", &dev]).ok();
}

#[test]
fn an_internal_snapshot_attaches_and_exports_read_only_as_it_was() {
    let mut env = env_or_skip!();
    let img = env.path("snap.qcow2");
    env.il(&["create", "-q", "-f", "qcow2", s(&img), "16M"])
        .ok();
    imgloop_io("qcow2", &img, &["write -P 0x11 0 4M"]).ok();
    env.il(&["snapshot", "-c", "before", s(&img)]).ok();
    imgloop_io("qcow2", &img, &["write -P 0x22 1M 1M"]).ok();
    let want = {
        let out = env.path("want.raw");
        qemu_img(&["convert", "-l", "before", "-O", "raw", s(&img), s(&out)]).ok();
        std::fs::read(&out).unwrap()
    };
    let image_before = std::fs::read(&img).unwrap();
    // attach -l: the snapshot as a read-only block device.
    let dev = env.attach(&["-l", "before", s(&img)]);
    assert_eq!(sysfs(&dev, "ro").as_deref(), Some("1"));
    assert!(
        std::fs::read(&dev).unwrap() == want,
        "attach -l reads differ"
    );
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &[0u8; 4096]).and_then(|_| f.sync_all())
        });
    assert!(refused.is_err(), "a write to the snapshot device succeeded");
    assert_eq!(env.entry(&dev)["read-only"], true);
    env.il(&["detach", &dev]).ok();
    // fuse -l, by ID.
    let file = env.path("snap-export.raw");
    std::fs::write(&file, b"").unwrap();
    let idx = start_fuse(
        &mut env,
        &["-l", "1", s(&img), s(&file)],
        &file,
        &file,
        16 << 20,
    );
    assert!(
        std::fs::read(&file).unwrap() == want,
        "fuse -l reads differ"
    );
    assert!(std::fs::OpenOptions::new().write(true).open(&file).is_err());
    stop_fuse(&mut env, idx, &file);
    assert!(
        std::fs::read(&img).unwrap() == image_before,
        "a snapshot export changed the image"
    );
    // A snapshot that is not there: a one-line error, nothing attached.
    let r = env.il(&["attach", "-l", "nope", s(&img)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
    assert!(env.list().is_empty());
}

#[test]
fn an_encrypted_image_attaches_with_its_secret_given_once() {
    let env = env_or_skip!();
    let img = env.path("enc.qcow2");
    let pass = "attach-Secret-9";
    let obj = format!("secret,id=sec0,data={pass}");
    env.il(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &obj,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&img),
        "16M",
    ])
    .ok();
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(&img)
    );
    let r = std::process::Command::new("qemu-io")
        .args([
            "--object",
            &obj,
            "--image-opts",
            "-c",
            "write -P 0x77 1M 1M",
            &opts,
        ])
        .output()
        .unwrap();
    assert!(r.status.success());
    // Without the secret: a one-line error, nothing attached.
    let r = env.il(&["attach", s(&img)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("encrypt.key-secret"), "{}", r.stderr);
    let dev = env.attach(&["--object", &obj, "--image-opts", &opts]);
    // The secret is not on the export process's command line.
    let pid = env.pid_of(&dev);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!cmdline.windows(pass.len()).any(|w| w == pass.as_bytes()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    let mut back = vec![0u8; 1 << 20];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1 << 20)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x77), "decrypted data differs");
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(4 << 20)).unwrap();
    std::io::Write::write_all(&mut f, &[0x88u8; 65536]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    env.il(&["detach", &dev]).ok();
    let r = std::process::Command::new("qemu-io")
        .args([
            "--object",
            &obj,
            "--image-opts",
            "-c",
            "read -P 0x88 4M 64k",
            &opts,
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
    assert!(!String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"));
    let file = std::fs::read(&img).unwrap();
    assert!(
        !file.windows(64).any(|w| w.iter().all(|&b| b == 0x88)),
        "plaintext on disk"
    );
}
