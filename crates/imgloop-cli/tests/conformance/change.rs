//! Rows: commands that change an image in place, and usage errors.

use super::differences::*;
use super::fixtures::SECRET;
use super::Aspect;
use super::Out::{Ignore, Json, Text};
use super::{case, writes, Case};

/// Commands that change an image in place.
pub const CHANGE: &[Case] = &[
    writes(
        &["resize", "@disk.raw", "+1M"],
        ALL,
        Text,
        &[("disk.raw", "raw")],
    ),
    writes(
        &["resize", "@disk.qcow2", "16M"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["resize", "--shrink", "@disk.qcow2", "4M"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    case(&["resize", "@disk.qcow2", "4M"], ALL, Ignore),
    writes(
        &["resize", "@bitmaps.qcow2", "20M"],
        ALL,
        Text,
        &[("bitmaps.qcow2", "qcow2")],
    ),
    writes(
        &["check", "-r", "leaks", "@leak.qcow2"],
        ALL,
        Text,
        &[("leak.qcow2", "qcow2")],
    ),
    writes(
        &["check", "-r", "all", "--output=json", "@leak.qcow2"],
        ALL,
        Json,
        &[("leak.qcow2", "qcow2")],
    ),
    writes(
        &["amend", "-o", "compat=0.10", "@disk.qcow2"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["amend", "-o", "lazy_refcounts=on", "@disk.qcow2"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["amend", "-o", "refcount_bits=4", "@v2.qcow2"],
        ALL,
        Text,
        &[("v2.qcow2", "qcow2")],
    ),
    case(
        &["amend", "-o", "cluster_size=4k", "@disk.qcow2"],
        ALL,
        Ignore,
    ),
    writes(
        &["bitmap", "--add", "-g", "128k", "@disk.qcow2", "new"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    writes(
        &["bitmap", "--remove", "@bitmaps.qcow2", "b0"],
        ALL,
        Text,
        &[("bitmaps.qcow2", "qcow2")],
    ),
    writes(
        &["bitmap", "--enable", "@bitmaps.qcow2", "b1"],
        ALL,
        Text,
        &[("bitmaps.qcow2", "qcow2")],
    ),
    case(
        &["bitmap", "--remove", "@bitmaps.qcow2", "nosuch"],
        ALL,
        Ignore,
    ),
    writes(
        &["snapshot", "-c", "s1", "@disk.qcow2"],
        ALL,
        Text,
        &[("disk.qcow2", "qcow2")],
    ),
    case(&["snapshot", "-d", "nosuch", "@disk.qcow2"], ALL, Ignore),
    case(&["snapshot", "-a", "nosuch", "@disk.qcow2"], ALL, Ignore),
    writes(
        &["commit", "@top.qcow2"],
        ALL,
        Text,
        &[("base.qcow2", "qcow2")],
    ),
    writes(
        &["commit", "-d", "@top.qcow2"],
        ALL,
        Text,
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    ),
    writes(
        &["rebase", "-b", "", "@top.qcow2"],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    writes(
        &[
            "rebase",
            "-u",
            "-b",
            "disk.qcow2",
            "-F",
            "qcow2",
            "@top.qcow2",
        ],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    writes(
        &["rebase", "-b", "ext.qcow2", "-F", "qcow2", "@top.qcow2"],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    case(
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "@top.qcow2"],
        ALL,
        Ignore,
    ),
    writes(
        &["rebase", "-c", "-b", "", "@top.qcow2"],
        ALL,
        Text,
        &[("top.qcow2", "qcow2")],
    ),
    case(&["rebase", "-c", "-u", "-b", "", "@disk.vhdx"], ALL, Text),
    writes(
        &["commit", "-b", "@base.qcow2", "@top.qcow2"],
        ALL,
        Text,
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
    ),
    case(&["commit", "-b", "@disk.qcow2", "@top.qcow2"], ALL, Text),
    case(&["commit", "@disk.qcow2"], ALL, Text),
    writes(
        &["snapshot", "-a", "s1", "@snap.qcow2"],
        ALL,
        Text,
        &[("snap.qcow2", "qcow2")],
    ),
    writes(
        &["snapshot", "-d", "s1", "@snap.qcow2"],
        ALL,
        Text,
        &[("snap.qcow2", "qcow2")],
    ),
    case(&["snapshot", "-c", "s1", "@snap.qcow2"], ALL, Text),
    case(&["amend", "-o", "compat=0.10", "@bitmaps.qcow2"], ALL, Text)
        .differs(Aspect::Exit, AMEND_BITMAPS),
    writes(
        &[
            "amend",
            "--object",
            SECRET,
            "--object",
            "secret,id=sec1,data=def",
            "-o",
            "encrypt.new-secret=sec1,encrypt.keyslot=1,encrypt.state=active,encrypt.iter-time=10",
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
        ],
        ALL,
        Text,
        &[],
    ),
    writes(
        &[
            "resize",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=@luks.qcow2,encrypt.key-secret=sec0",
            "+1M",
        ],
        ALL,
        Text,
        &[],
    ),
];

/// Usage errors and bad arguments.
pub const USAGE: &[Case] = &[
    case(&["info", "--bogus", "@disk.raw"], ALL, Text),
    case(&["bogus"], &[], Text),
    case(&[], &[], Text),
    case(&["info"], &[], Text),
    case(&["info", "--output", "xml", "@disk.raw"], ALL, Text),
    case(&["check", "-r", "some", "@disk.qcow2"], ALL, Text),
    case(&["convert", "@disk.raw"], ALL, Text),
    case(&["compare", "@disk.raw"], ALL, Text),
    case(&["map", "--start-offset", "x", "@disk.raw"], ALL, Text),
    case(&["resize", "@disk.raw"], ALL, Text),
    case(&["create", "-f", "qcow2"], &[], Text),
    case(&["dd", "if=@disk.raw"], ALL, Text),
    case(&["dd", "bs=0", "if=@disk.raw", "of=@out.raw"], ALL, Text),
    case(&["measure", "-O", "qcow2"], &[], Text),
    case(&["bitmap", "@disk.qcow2", "b"], ALL, Text),
    case(&["snapshot", "@disk.qcow2"], ALL, Text),
];
