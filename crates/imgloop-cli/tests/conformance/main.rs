//! The qemu-img conformance suite: a table of invocations, each run through
//! `qemu-img` and `imgloop` on copies of the same images, comparing exit
//! codes, standard output (JSON as values, key order ignored; human output
//! where qemu-img's is stable) and the images the command leaves behind
//! (`qemu-img compare` between the two results, `qemu-img check` of
//! imgloop's, and the image properties `qemu-img info` reports).
//!
//! A difference imgloop keeps on purpose is listed in its row with the
//! reason (the same list is in `docs/QEMU-IMG.md`); such a row asserts that
//! the difference is still there, so the list stays true.

mod change;
#[path = "../common/mod.rs"]
mod common;
mod differences;
mod fixtures;
mod inspect;
mod make;

use common::*;
use fixtures::{make_fixtures, sparse_copy};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How the standard output of the two tools is compared.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    /// Not compared (timings, dates, progress).
    Ignore,
    /// Parsed as JSON and compared as values.
    Json,
    /// Compared as text.
    Text,
}

/// What a row accepts to differ.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Aspect {
    /// The exit code.
    Exit,
    /// The standard output.
    Stdout,
    /// A resulting image.
    Image,
}

/// One row of the table.
struct Case {
    /// Arguments after the tool's name. `@NAME` stands for the path of
    /// file NAME in the row's directory.
    args: &'static [&'static str],
    /// Fixtures copied into the row's directory first.
    inputs: &'static [&'static str],
    /// How stdout is compared.
    out: Out,
    /// Images the command writes or changes, with their format; compared
    /// when both tools exited 0.
    writes: &'static [(&'static str, &'static str)],
    /// A difference kept on purpose, with its reason.
    differs: Option<(Aspect, &'static str)>,
}

const fn case(args: &'static [&'static str], inputs: &'static [&'static str], out: Out) -> Case {
    Case {
        args,
        inputs,
        out,
        writes: &[],
        differs: None,
    }
}

const fn writes(
    args: &'static [&'static str],
    inputs: &'static [&'static str],
    out: Out,
    writes: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        args,
        inputs,
        out,
        writes,
        differs: None,
    }
}

impl Case {
    /// The row with a difference kept on purpose.
    const fn differs(self, aspect: Aspect, reason: &'static str) -> Case {
        Case {
            differs: Some((aspect, reason)),
            ..self
        }
    }
}

/// The row's directory for one tool, with its inputs copied in.
fn prepare(root: &Path, fixtures: &Path, tool: &str, row: usize, case: &Case) -> PathBuf {
    let dir = root.join(format!("{row:03}-{tool}"));
    std::fs::create_dir(&dir).unwrap();
    for name in case.inputs {
        sparse_copy(&fixtures.join(name), &dir.join(name));
    }
    dir
}

fn expand(args: &[&str], dir: &Path) -> Vec<String> {
    args.iter()
        .map(|a| {
            let mut out = String::new();
            let mut rest = *a;
            // `@NAME` anywhere in an argument (`if=@x`, `-o backing_file=@b`).
            while let Some(at) = rest.find('@') {
                out.push_str(&rest[..at]);
                let tail = &rest[at + 1..];
                let end = tail.find([',', ' ']).unwrap_or(tail.len());
                out.push_str(dir.join(&tail[..end]).to_str().unwrap());
                rest = &tail[end..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// Output with the row's directory replaced by `DIR`, so the two tools'
/// outputs can be compared.
fn normalize(text: &str, dir: &Path) -> String {
    text.replace(dir.to_str().unwrap(), "DIR")
}

/// What `qemu-img info` says of an image that matters for equality: the
/// properties a command chose, not the bytes it happened to allocate.
fn properties(img: &Path, fmt: &str, dir: &Path) -> Value {
    let r = qemu_img(&["info", "-f", fmt, "--output=json", s(img)]);
    assert_eq!(r.code, 0, "qemu-img info {}: {}", img.display(), r.stderr);
    let v: Value = serde_json::from_str(&normalize(&r.stdout, dir)).unwrap();
    let mut keep = serde_json::Map::new();
    for key in [
        "virtual-size",
        "format",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
        "encrypted",
        "format-specific",
    ] {
        if let Some(x) = v.get(key) {
            keep.insert(key.into(), x.clone());
        }
    }
    Value::Object(keep)
}

/// The bytes a file occupies depend on how the filesystem laid out the
/// copy (an extent tree block more or less), not on the tool: `disk size`
/// lines are compared for presence only.
fn without_disk_size(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("disk size: ") {
            Some(at) if l[..at].trim().is_empty() => &l[..at + 10],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// JSON equality, except that `actual-size` values (see
/// [`without_disk_size`]) may differ by a few filesystem blocks.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, va)| match (k.as_str(), y.get(k)) {
                    ("actual-size", Some(vb)) => match (va.as_u64(), vb.as_u64()) {
                        (Some(m), Some(n)) => m.abs_diff(n) <= 64 * 1024,
                        _ => va == vb,
                    },
                    (_, Some(vb)) => same_json(va, vb),
                    (_, None) => false,
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q))
        }
        _ => a == b,
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_tool(program: &str, args: &[String], dir: &Path) -> Outcome {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_program(program, &refs);
    Outcome {
        code: r.code,
        stdout: normalize(&r.stdout, dir),
        stderr: normalize(&r.stderr, dir),
    }
}

/// Runs one row; returns the aspects that differ, with a description.
fn run_case(root: &Path, fixtures: &Path, row: usize, case: &Case) -> Vec<(Aspect, String)> {
    let dq = prepare(root, fixtures, "qemu", row, case);
    let di = prepare(root, fixtures, "imgloop", row, case);
    let q = run_tool("qemu-img", &expand(case.args, &dq), &dq);
    let i = run_tool(imgloop_bin(), &expand(case.args, &di), &di);
    let mut diffs = Vec::new();
    if q.code != i.code {
        diffs.push((
            Aspect::Exit,
            format!(
                "exit {} (qemu-img) vs {} (imgloop)\nqemu-img: {}{}\nimgloop: {}{}",
                q.code, i.code, q.stdout, q.stderr, i.stdout, i.stderr
            ),
        ));
    }
    if i.code != 0 && !q.stderr.trim().is_empty() && i.stderr.trim().is_empty() {
        diffs.push((Aspect::Exit, "imgloop failed without a message".into()));
    }
    if i.stderr.contains("panicked") {
        diffs.push((Aspect::Exit, format!("imgloop panicked: {}", i.stderr)));
    }
    match case.out {
        Out::Ignore => {}
        Out::Text => {
            if without_disk_size(&q.stdout) != without_disk_size(&i.stdout) {
                diffs.push((
                    Aspect::Stdout,
                    format!("qemu-img:\n{}\nimgloop:\n{}", q.stdout, i.stdout),
                ));
            }
        }
        Out::Json if q.code == 0 || !q.stdout.trim().is_empty() => {
            let parse = |t: &str| serde_json::from_str::<Value>(t).ok();
            let (jq, ji) = (parse(&q.stdout), parse(&i.stdout));
            if jq.is_none() || !same_json(jq.as_ref().unwrap(), ji.as_ref().unwrap_or(&Value::Null))
            {
                diffs.push((
                    Aspect::Stdout,
                    format!("qemu-img:\n{}\nimgloop:\n{}", q.stdout, i.stdout),
                ));
            }
        }
        Out::Json => {}
    }
    if q.code == 0 && i.code == 0 {
        for (name, fmt) in case.writes {
            let (a, b) = (dq.join(name), di.join(name));
            let cmp = qemu_img(&["compare", "-f", fmt, "-F", fmt, s(&a), s(&b)]);
            if cmp.code != 0 {
                diffs.push((
                    Aspect::Image,
                    format!("{name}: qemu-img compare: {}{}", cmp.stdout, cmp.stderr),
                ));
            }
            let check = qemu_img(&["check", "-f", fmt, s(&b)]);
            if check.code != 0 && check.code != 63 {
                diffs.push((
                    Aspect::Image,
                    format!(
                        "{name}: qemu-img check of imgloop's image exits {}: {}",
                        check.code, check.stdout
                    ),
                ));
            }
            let (pa, pb) = (properties(&a, fmt, &dq), properties(&b, fmt, &di));
            if pa != pb {
                diffs.push((
                    Aspect::Image,
                    format!("{name}: properties differ\nqemu-img: {pa}\nimgloop:  {pb}"),
                ));
            }
        }
    }
    diffs
}

/// Runs a table; fails with every row that differs other than as listed.
fn run_table(table: &[Case]) {
    let sc = Scratch::new();
    let fixtures = sc.path("fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    make_fixtures(&fixtures);
    let root = sc.path("rows");
    std::fs::create_dir(&root).unwrap();
    let mut failures = Vec::new();
    for (row, case) in table.iter().enumerate() {
        let diffs = run_case(&root, &fixtures, row, case);
        let what = format!("{:?}", case.args);
        match case.differs {
            None => {
                for (_, d) in diffs {
                    failures.push(format!("{what}: {d}"));
                }
            }
            Some((aspect, reason)) => {
                // A different exit code brings different output with it.
                let covers =
                    |a: Aspect| a == aspect || (aspect == Aspect::Exit && a == Aspect::Stdout);
                if !diffs.iter().any(|(a, _)| *a == aspect) {
                    failures.push(format!(
                        "{what}: listed as differing in {aspect:?} ({reason}), but it no longer does"
                    ));
                }
                for (a, d) in diffs.into_iter().filter(|(a, _)| !covers(*a)) {
                    failures.push(format!("{what}: {a:?}: {d}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ from qemu-img:\n\n{}",
        failures.len(),
        table.len(),
        failures.join("\n\n")
    );
}

#[test]
fn inspecting_commands_behave_as_qemu_img() {
    run_table(inspect::INSPECT);
}

#[test]
fn commands_that_make_images_behave_as_qemu_img() {
    run_table(make::MAKE);
}

#[test]
fn commands_that_change_images_behave_as_qemu_img() {
    run_table(change::CHANGE);
}

#[test]
fn usage_errors_behave_as_qemu_img() {
    run_table(change::USAGE);
}
