#!/usr/bin/env python3
"""Mutation campaign for imgloop.

Builds base images with qemu-img/qemu-io (uml_mkcow for cow), mutates them
where their metadata lives (seeded, reproducible), runs imgloop's read-only
commands and a repair on each mutated image under a time and address-space
limit, and compares the result with an oracle: qemu-img, or uml_moo for cow
(QEMU has no cow driver). See campaigns/README.md.

A format plugs in with one entry in FORMATS: a base builder (scratch dir,
imgloop -> list of bases), a locator (image path -> regions and fields), the
weights of the mutation kinds it supports, and optionally an oracle and
whether the format has checks.
"""
import argparse
import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallels_format  # noqa: E402  (campaigns/parallels_format.py)
import vhdx_format  # noqa: E402  (campaigns/vhdx_format.py)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))
AS_LIMIT = 4 * GiB            # address-space cap for every imgloop process
RSS_WARN_KIB = 256 * 1024     # peak RSS above this is counted
QEMU_TIMEOUT = 60
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
MAX_COMPARE_SIZE = 512 * MiB  # virtual sizes above this are not converted for comparison
DOC_EXIT = {"info": {0, 1}, "map": {0, 1}, "convert": {0, 1},
            "check": {0, 1, 2, 3, 63}, "repair": {0, 1, 2, 3, 63},
            "info-nokey": {0, 1}, "convert-nokey": {0, 1}}
SECRET = "secret,id=sec0,data=abc"        # the key of the encrypted (qcow AES) bases
UML_MKCOW, UML_MOO = shutil.which("uml_mkcow"), shutil.which("uml_moo")
BAD_KEYS = ("panics", "signals", "hangs", "rss_over_256mib", "readonly_changed",
            "repair_worse", "bad_exit_codes", "harness_errors")


# ---------------------------------------------------------------- helpers

def qemu(args, cwd, timeout=QEMU_TIMEOUT, check=True):
    """Run a qemu tool; return (rc, stdout). rc None on timeout."""
    try:
        p = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                           encoding="utf-8", errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        if check:
            raise
        return None, ""
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.returncode, p.stdout


def sha256_file(path, size=None):
    """sha256 of a file; with size, of its first size bytes, zero-padded up to size."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while size is None or n < size:
            b = f.read(4 * MiB if size is None else min(4 * MiB, size - n))
            if not b:
                break
            h.update(b)
            n += len(b)
    if size is not None and size > n:
        h.update(bytes(size - n))
    return h.hexdigest()


def hash_dir(d):
    return {n: sha256_file(os.path.join(d, n)) for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n))}


def run_limited(argv, cwd, timeout):
    """Run argv with a timeout and an address-space cap; report rc, signal, peak RSS.

    The peak RSS comes from GNU time when present: the wait4 rusage of a child
    forked from Python includes the Python process's own pages before exec."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    tfd, tpath = tempfile.mkstemp(prefix="imgloop-time-")
    os.close(tfd)
    if GNU_TIME:
        argv = [GNU_TIME, "-o", tpath, "-f", "%M", "--"] + argv

    def pre():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                         preexec_fn=pre)
    lock, state = threading.Lock(), {"done": False, "timed_out": False}

    def kill():
        with lock:
            if not state["done"]:
                state["timed_out"] = True
                os.killpg(p.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    with lock:
        state["done"] = True
    timer.cancel()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    rss = ru.ru_maxrss
    with open(tpath) as f:
        report = f.read()
    os.unlink(tpath)
    if GNU_TIME and report.strip():
        rss = int(report.split()[-1])
        m = re.search(r"terminated by signal (\d+)", report)
        rc = -int(m.group(1)) if m else rc
    err.seek(0)
    stderr = err.read().decode("utf-8", "replace")
    out.close()
    err.close()
    return {"rc": rc, "signal": -rc if rc < 0 else None, "timed_out": state["timed_out"],
            "rss_kib": rss, "secs": round(time.monotonic() - t0, 3), "stderr": stderr[-2000:]}


# ---------------------------------------------------------------- bases

def default_writes(size_mib):
    """A few patterns at several offsets, a zeroed range, the last 64 KiB."""
    return [("0x11", 0, 64 * KiB), ("0x22", 1028 * KiB, 200 * KiB), ("0x33", 5 * MiB, MiB),
            ("0x44", 7 * MiB, 4 * KiB), ("0x55", 9 * MiB + 512, 3 * KiB),
            ("zero", 5 * MiB, 64 * KiB), ("0x66", size_mib * MiB - 64 * KiB, 64 * KiB)]


def write_cmds(writes):
    args = []
    for pat, off, ln in writes:
        args += ["-c", f"write -z {off} {ln}" if pat == "zero" else f"write -P {pat} {off} {ln}"]
    return args


def qemu_io_writes(path, fmt, writes, cwd, secret=False):
    if secret:
        qemu(["qemu-io", "--object", SECRET, "--image-opts"] + write_cmds(writes)
             + [image_opts(fmt, path)], cwd)
    else:
        qemu(["qemu-io", "-f", fmt] + write_cmds(writes) + [path], cwd)


def imgloop_io_writes(imgloop, path, fmt, writes, cwd):
    qemu([imgloop, "io", "-f", fmt] + write_cmds(writes) + [path], cwd)


def new_base(scratch, fmt, name, main, ro_companions=(), secret=False):
    """A base dir. secret: the image is encrypted with SECRET, so every command names it
    with --object/--image-opts."""
    d = os.path.join(scratch, "bases", fmt, name)
    os.makedirs(d)
    return {"fmt": fmt, "name": name, "dir": d, "main": main,
            "ro_companions": list(ro_companions), "secret": secret}


def image_opts(fmt, path):
    return f"driver={fmt},file.filename={path},encrypt.key-secret=sec0"


def image_args(base, tool):
    """(options, image name) naming a base's image on a command line: plain, or with
    --object/--image-opts for an encrypted one. qemu tools get -f FMT for a plain image."""
    if base.get("secret"):
        return ["--object", SECRET, "--image-opts"], image_opts(base["fmt"], base["main"])
    return (["-f", base["fmt"]] if tool == "qemu" else []), base["main"]


def build_raw_bases(scratch, imgloop=None):
    b = new_base(scratch, "raw", "raw", "disk.raw")
    qemu(["qemu-img", "create", "-f", "raw", b["main"], "12M"], b["dir"])
    qemu_io_writes(b["main"], "raw", default_writes(12), b["dir"])
    return [b]


QCOW2_SETS = [("default", ""), ("compat010", "compat=0.10"), ("cs512", "cluster_size=512"),
              ("cs2m", "cluster_size=2M"), ("extl2", "extended_l2=on"),
              ("rc1", "refcount_bits=1"), ("lazy", "lazy_refcounts=on"),
              ("zstd", "compression_type=zstd"), ("datafile", "data_file=data.bin"),
              ("datafile_raw", "data_file=data.bin,data_file_raw=on")]


def build_qcow2_bases(scratch, imgloop=None):
    bases = []
    for name, opts in QCOW2_SETS:
        b = new_base(scratch, "qcow2", name, "disk.qcow2")
        size = 64 if name == "cs2m" else 12
        cmd = ["qemu-img", "create", "-f", "qcow2"] + (["-o", opts] if opts else [])
        qemu(cmd + [b["main"], f"{size}M"], b["dir"])
        writes = default_writes(size)
        if name == "extl2":     # subcluster-sized writes
            writes += [("0x77", 2 * MiB + 4 * KiB, 4 * KiB), ("0x78", 2 * MiB + 12 * KiB, 2 * KiB)]
        qemu_io_writes(b["main"], "qcow2", writes, b["dir"])
        bases.append(b)
        if name in ("zstd", "default"):     # compressed copies
            c = new_base(scratch, "qcow2", f"{name}_compressed", "disk.qcow2")
            ct = "zstd" if name == "zstd" else "zlib"
            qemu(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ct}",
                  os.path.join(b["dir"], b["main"]), c["main"]], c["dir"])
            bases.append(c)
    # backing chain: qcow2 overlay over a raw base
    b = new_base(scratch, "qcow2", "backing", "disk.qcow2", ro_companions=["base.raw"])
    qemu(["qemu-img", "create", "-f", "raw", "base.raw", "12M"], b["dir"])
    qemu_io_writes("base.raw", "raw", default_writes(12), b["dir"])
    qemu(["qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", b["main"], "12M"],
         b["dir"])
    qemu_io_writes(b["main"], "qcow2", [("0x99", MiB, 64 * KiB), ("0x9a", 5 * MiB + 4096, 8 * KiB),
                                        ("zero", 0, 64 * KiB)], b["dir"])
    bases.append(b)
    # internal snapshot, then writes that share and COW clusters
    b = new_base(scratch, "qcow2", "snapshot", "disk.qcow2")
    qemu(["qemu-img", "create", "-f", "qcow2", b["main"], "12M"], b["dir"])
    qemu_io_writes(b["main"], "qcow2", default_writes(12), b["dir"])
    qemu(["qemu-img", "snapshot", "-c", "s1", b["main"]], b["dir"])
    qemu_io_writes(b["main"], "qcow2", [("0xa1", 0, 32 * KiB), ("0xa2", 5 * MiB, 4 * KiB),
                                        ("0xa3", 10 * MiB, 64 * KiB)], b["dir"])
    bases.append(b)
    # persistent dirty bitmaps, marked by later writes
    b = new_base(scratch, "qcow2", "bitmap", "disk.qcow2")
    qemu(["qemu-img", "create", "-f", "qcow2", b["main"], "12M"], b["dir"])
    qemu(["qemu-img", "bitmap", "--add", b["main"], "bm0"], b["dir"])
    qemu(["qemu-img", "bitmap", "--add", "-g", "4096", b["main"], "bm1"], b["dir"])
    qemu_io_writes(b["main"], "qcow2", default_writes(12), b["dir"])
    bases.append(b)
    return bases


def build_qcow_bases(scratch, imgloop):
    """qcow (version 1): qemu-img's default (4 KiB clusters), an overlay over base.raw
    (512-byte clusters), compressed clusters, AES encryption, and one imgloop created
    and wrote."""
    bases = []
    b = new_base(scratch, "qcow", "default", "disk.qcow")
    qemu(["qemu-img", "create", "-f", "qcow", b["main"], "12M"], b["dir"])
    qemu_io_writes(b["main"], "qcow", default_writes(12), b["dir"])
    bases.append(b)
    c = new_base(scratch, "qcow", "compressed", "disk.qcow")
    src = os.path.join(b["dir"], b["main"])
    # qemu-img 10 exits 1 without a message after a complete compressed qcow conversion
    # (its final empty compressed write is not supported): the copy must compare equal.
    qemu(["qemu-img", "convert", "-c", "-O", "qcow", src, c["main"]], c["dir"], check=False)
    qemu(["qemu-img", "compare", "-f", "qcow", "-F", "qcow", src, c["main"]], c["dir"])
    bases.append(c)
    b = new_base(scratch, "qcow", "backing", "disk.qcow", ro_companions=["base.raw"])
    qemu(["qemu-img", "create", "-f", "raw", "base.raw", "12M"], b["dir"])
    qemu_io_writes("base.raw", "raw", default_writes(12), b["dir"])
    qemu(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", b["main"], "12M"],
         b["dir"])
    qemu_io_writes(b["main"], "qcow", [("0x99", MiB, 64 * KiB), ("0x9a", 5 * MiB + 4096, 8 * KiB),
                                       ("zero", 0, 64 * KiB), ("0x9b", 7 * MiB + 512, 1536)],
                   b["dir"])
    bases.append(b)
    b = new_base(scratch, "qcow", "aes", "disk.qcow", secret=True)
    qemu(["qemu-img", "create", "-f", "qcow", "--object", SECRET, "-o",
          "encrypt.format=aes,encrypt.key-secret=sec0", b["main"], "12M"], b["dir"])
    qemu_io_writes(b["main"], "qcow", default_writes(12), b["dir"], secret=True)
    bases.append(b)
    b = new_base(scratch, "qcow", "imgloop", "disk.qcow")
    qemu([imgloop, "create", "-q", "-f", "qcow", b["main"], "12M"], b["dir"])
    imgloop_io_writes(imgloop, b["main"], "qcow", default_writes(12), b["dir"])
    bases.append(b)
    return bases


COW_PATH = {3: (32, 4096), 2: (8, 4096)}    # version -> (offset, length) of the backing name


def cow_relative_backing(path, version):
    """uml_mkcow (and imgloop) store the backing path absolute: make it 'base.raw', so a
    copy of the base dir (mutated image, kept case, replay) reads its own backing file.
    imgloop resolves it next to the COW file, uml_moo from its cwd (the image dir)."""
    off, ln = COW_PATH[version]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"base.raw".ljust(ln, b"\0"))


def cow_base(scratch, name, size, imgloop, version=3):
    """A cow base over base.raw (random content, seeded): made by uml_mkcow (v3; imgloop
    create when uml_mkcow is not installed) or by imgloop create -o version=2."""
    b = new_base(scratch, "cow", name, "disk.cow", ro_companions=["base.raw"])
    with open(os.path.join(b["dir"], "base.raw"), "wb") as f:
        f.write(random.Random(f"cow-base/{name}").randbytes(size))
    if version == 3 and UML_MKCOW:
        qemu([UML_MKCOW, b["main"], "base.raw"], b["dir"])
        b["made_by"] = "uml_mkcow"
    else:
        qemu([imgloop, "create", "-q", "-f", "cow", "-b", "base.raw", "-F", "raw", "-o",
              f"version={version}", b["main"]], b["dir"])
        b["made_by"] = "imgloop create"
    cow_relative_backing(os.path.join(b["dir"], b["main"]), version)
    return b


def build_cow_bases(scratch, imgloop):
    """User-Mode-Linux COW: v3 over a 12 MiB backing file, v3 over one whose size is not a
    multiple of 4 KiB (the bitmap's last byte is partial), and v2 (imgloop create). No
    tool but imgloop writes COW data, so imgloop io writes patterns, single sectors
    included (bitmap bytes with some bits set)."""
    sectors = [("0x77", 3 * MiB + 512, 512), ("0x78", 3 * MiB + 2048, 1536),
               ("0x79", 11 * MiB + 7 * 512, 512)]
    bases = []
    for name, size, version in (("v3", 12 * MiB, 3), ("v3_odd", 12 * MiB - 1536, 3),
                                ("v2", 12 * MiB, 2)):
        b = cow_base(scratch, name, size, imgloop, version)
        writes = default_writes(12)[:-1] + sectors + [("0x66", size - 64 * KiB, 64 * KiB)]
        imgloop_io_writes(imgloop, b["main"], "cow", writes, b["dir"])
        bases.append(b)
    return bases


# ---------------------------------------------------------------- locators

def be(data, off, width):
    return int.from_bytes(data[off:off + width], "big")


def ceil_div(a, b):
    return -(-a // b)


def round_up(a, b):
    return ceil_div(a, b) * b


QCOW2_HDR = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
             ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
             ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
             ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
             ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8)]
QCOW2_HDR_V3 = [("incompatible_features", 72, 8), ("compatible_features", 80, 8),
                ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
                ("header_length", 100, 4)]
OFF_MASK = 0x00FFFFFFFFFFFE00
EXT_BITMAPS = 0x23852875


class Found:
    """Collects the regions, typed fields and offsets a locator finds."""

    def __init__(self, data):
        self.data, self.regions, self.fields, self.offsets = data, {}, [], set()
        self.order, self.seals = "big", {}   # byte order of fields; checksummed fields

    def region(self, name, off, length):
        if 0 <= off < len(self.data) and length > 0:
            self.regions.setdefault(name, []).append((off, min(length, len(self.data) - off)))
            self.offsets.add(off)

    def field(self, name, off, width, seal=None):
        """seal: (start, length) of the checksummed structure holding the field."""
        if off + width <= len(self.data):
            self.fields.append((name, off, width))
            if seal:
                self.seals[off] = seal

    def entries(self, name, off, count, stride, limit=24):
        """Fields for the non-zero entries of a table (plus the first); returns their values."""
        vals, n = [], 0
        for i in range(count):
            o = off + i * stride
            if o + 8 > len(self.data):
                break
            v = be(self.data, o, 8)
            if v or i == 0:
                if n < limit:
                    self.field(f"{name}[{i}]", o, 8)
                    if stride == 16:
                        self.field(f"{name}[{i}].bitmap", o + 8, 8)
                    n += 1
                vals.append(v)
        return vals

    def result(self, cluster_size):
        self.offsets.update({len(self.data), cluster_size})
        return {"size": len(self.data), "cluster_size": cluster_size, "regions": self.regions,
                "fields": self.fields, "offsets": sorted(self.offsets), "order": self.order,
                "seals": self.seals}


def locate_raw(path):
    with open(path, "rb") as f:
        data = f.read()
    fd = Found(data)
    fd.region("data", 0, len(data))
    return fd.result(512)


def qcow2_extensions(fd, start, cs):
    data, off, bitmap_ext = fd.data, start, None
    while off + 8 <= min(cs, len(data)):
        t, ln = be(data, off, 4), be(data, off + 4, 4)
        fd.field(f"ext@{off}.type", off, 4)
        fd.field(f"ext@{off}.len", off + 4, 4)
        if t == 0:
            break
        fd.region("extensions", off, 8 + ln)
        if t == EXT_BITMAPS:
            fd.field("bitmaps.nb", off + 8, 4)
            fd.field("bitmaps.dir_size", off + 16, 8)
            fd.field("bitmaps.dir_offset", off + 24, 8)
            bitmap_ext = (be(data, off + 8, 4), be(data, off + 16, 8), be(data, off + 24, 8))
        off += 8 + ((ln + 7) & ~7)
    fd.region("header", 0, off + 8)
    return bitmap_ext


def qcow2_l1(fd, name, off, count, cs, ext_l2):
    fd.region(name, off, count * 8)
    for v in fd.entries(name, off, count, 8):
        l2 = v & OFF_MASK
        if l2 and ("l2", l2, cs) not in fd.seen:
            fd.seen.add(("l2", l2, cs))
            fd.region("l2", l2, cs)
            stride = 16 if ext_l2 else 8
            for e in fd.entries(f"l2@{l2}", l2, cs // stride, stride, limit=12):
                if e & OFF_MASK and not e & (1 << 62) and not fd.data_file:
                    fd.region("data", e & OFF_MASK, min(cs, 4096))


def qcow2_snapshots(fd, off, nb, cs, ext_l2):
    data, start = fd.data, off
    for i in range(min(nb, 64)):
        if off + 40 > len(data):
            break
        fd.field(f"snap{i}.l1_table_offset", off, 8)
        fd.field(f"snap{i}.l1_size", off + 8, 4)
        fd.field(f"snap{i}.id_str_size", off + 12, 2)
        fd.field(f"snap{i}.name_size", off + 14, 2)
        fd.field(f"snap{i}.vm_state_size", off + 32, 4)
        fd.field(f"snap{i}.extra_data_size", off + 36, 4)
        l1o, l1n = be(data, off, 8), be(data, off + 8, 4)
        ids, names, extra = be(data, off + 12, 2), be(data, off + 14, 2), be(data, off + 36, 4)
        if extra >= 16:
            fd.field(f"snap{i}.disk_size", off + 48, 8)
        qcow2_l1(fd, "snapshot_l1", l1o, l1n, cs, ext_l2)
        off += (40 + extra + ids + names + 7) & ~7
    fd.region("snapshot_table", start, off - start)


def qcow2_bitmaps(fd, nb, dir_size, dir_off):
    data, off = fd.data, dir_off
    fd.region("bitmap_dir", dir_off, dir_size)
    for i in range(min(nb, 64)):
        if off + 24 > len(data):
            break
        for name, o, w in (("table_offset", 0, 8), ("table_size", 8, 4), ("flags", 12, 4),
                           ("type", 16, 1), ("granularity_bits", 17, 1), ("name_size", 18, 2),
                           ("extra_data_size", 20, 4)):
            fd.field(f"bitmap{i}.{name}", off + o, w)
        to, ts = be(data, off, 8), be(data, off + 8, 4)
        fd.region("bitmap_table", to, ts * 8)
        for v in fd.entries(f"bitmap{i}.table", to, ts, 8, limit=8):
            if v & OFF_MASK:
                fd.region("bitmap_data", v & OFF_MASK, 512)
        off += (24 + be(data, off + 20, 4) + be(data, off + 18, 2) + 7) & ~7


def locate_qcow2(path):
    with open(path, "rb") as f:
        data = f.read()
    fd = Found(data)
    fd.seen, fd.data_file = set(), False
    h = dict(zip([n for n, _, _ in QCOW2_HDR], struct.unpack_from(">IIQIIQIIQQIIQ", data, 0)))
    fd.fields += QCOW2_HDR
    cs = 1 << h["cluster_bits"]
    hdr_len, ext_l2 = 72, False
    if h["version"] >= 3:
        fd.fields += QCOW2_HDR_V3
        incompat, _, _, _, hdr_len = struct.unpack_from(">QQQII", data, 72)
        ext_l2, fd.data_file = bool(incompat & 16), bool(incompat & 4)
        if hdr_len > 104:
            fd.field("compression_type", 104, 1)
    bitmap_ext = qcow2_extensions(fd, hdr_len, cs)
    if h["backing_file_offset"]:
        fd.region("backing_name", h["backing_file_offset"], h["backing_file_size"])
    qcow2_l1(fd, "l1", h["l1_table_offset"], h["l1_size"], cs, ext_l2)
    rto, rtc = h["refcount_table_offset"], h["refcount_table_clusters"]
    fd.region("refcount_table", rto, rtc * cs)
    for v in fd.entries("refcount_table", rto, rtc * cs // 8, 8):
        if v & ~0x1FF:
            fd.region("refblock", v & ~0x1FF, cs)
    if h["nb_snapshots"]:
        qcow2_snapshots(fd, h["snapshots_offset"], h["nb_snapshots"], cs, ext_l2)
    if bitmap_ext:
        qcow2_bitmaps(fd, *bitmap_ext)
    return fd.result(cs)


QCOW_HDR = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
            ("backing_file_size", 16, 4), ("mtime", 20, 4), ("size", 24, 8),
            ("cluster_bits", 32, 1), ("l2_bits", 33, 1), ("crypt_method", 36, 4),
            ("l1_table_offset", 40, 8)]


def locate_qcow(path):
    """qcow version 1: the 48-byte header, the backing name, the L1 table, the L2 tables
    it points to (2^l2_bits entries each) and the clusters their entries point to: plain
    (bit 63 clear) or compressed (offset in the low 63-cluster_bits bits, length in the
    cluster_bits bits above)."""
    with open(path, "rb") as f:
        data = f.read()
    fd = Found(data)
    h = dict(zip([n for n, _, _ in QCOW_HDR], struct.unpack_from(">IIQIIQBBxxIQ", data, 0)))
    fd.fields += QCOW_HDR
    fd.region("header", 0, 48)
    if h["backing_file_offset"]:
        fd.region("backing_name", h["backing_file_offset"], h["backing_file_size"])
    cb, l2n = h["cluster_bits"], 1 << h["l2_bits"]
    cs = 1 << cb
    l1n = ceil_div(h["size"], cs * l2n)
    fd.region("l1", h["l1_table_offset"], l1n * 8)
    seen = set()
    for v in fd.entries("l1", h["l1_table_offset"], l1n, 8):
        if not v or v in seen:
            continue
        seen.add(v)
        fd.region("l2", v, l2n * 8)
        for e in fd.entries(f"l2@{v}", v, l2n, 8, limit=12):
            if e >> 63:
                shift = 63 - cb
                fd.region("compressed", e & ((1 << shift) - 1), (e >> shift) & (cs - 1))
            elif e:
                fd.region("data", e, min(cs, 4096))
    return fd.result(cs)


def locate_cow(path):
    """User-Mode-Linux COW, v3 or v2 (big-endian): the header fields, the backing name,
    the bitmap (whole, and the span with bits set), typed fields for its interesting
    bytes (the first and last, partial ones, the ends of runs of set bits), and the
    data of some stored sectors."""
    with open(path, "rb") as f:
        data = f.read()
    fd = Found(data)
    fields = [("magic", 0, 4), ("version", 4, 4)]
    if be(data, 4, 4) == 3:
        fields += [("mtime", 8, 4), ("size", 12, 8), ("sectorsize", 20, 4), ("alignment", 24, 4),
                   ("cow_format", 28, 4)]
        size, align = be(data, 12, 8), be(data, 24, 4)
        name_at, bm = 32, round_up(4128, align)
        bm_len = ceil_div(ceil_div(size, 512), 8)
        do = round_up(bm + bm_len, align)
        fd.region("header", 0, 32)
    else:       # v2: path at 8, the other fields after it; bitmap length rounded UML's way
        fields += [("mtime", 4104, 4), ("size", 4108, 8), ("sectorsize", 4116, 4)]
        size, align, name_at, bm = be(data, 4108, 8), 512, 8, 4120
        bm_len = (size + 511) // 4096
        do = round_up(bm + bm_len, 512)
        fd.region("header", 0, 8)
        fd.region("header", 4104, 16)
    fd.fields += fields
    fd.region("backing_name", name_at, data.index(b"\0", name_at) - name_at + 1)
    fd.region("bitmap", bm, bm_len)
    bitmap = data[bm:bm + bm_len]
    set_bytes = [i for i, b in enumerate(bitmap) if b]
    picks = {0, bm_len - 1}
    if set_bytes:
        fd.region("bitmap_set", bm + set_bytes[0], set_bytes[-1] - set_bytes[0] + 1)
        picks |= {i for i, b in enumerate(bitmap) if b not in (0, 0xff)}
        picks |= {i for i in set_bytes if i == 0 or not bitmap[i - 1]}
        picks |= {i for i in set_bytes if i + 1 == bm_len or not bitmap[i + 1]}
    for i in sorted(picks)[:32]:
        fd.field(f"bitmap[{i}]", bm + i, 1)
    stored = [8 * i + k for i in set_bytes for k in range(8) if bitmap[i] >> k & 1]
    for s in stored[::max(1, len(stored) // 24)]:
        fd.region("data", do + 512 * s, 512)
    fd.offsets.update({bm, do, bm + bm_len})
    return fd.result(align)


# ---------------------------------------------------------------- mutations

def mut_bitflip(rng, info):
    name = rng.choice(sorted(info["regions"]))
    off, ln = rng.choice(info["regions"][name])
    edits = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        edits.append({"op": "xor", "offset": off + rng.randrange(ln), "mask": 1 << rng.randrange(8)})
    return {"kind": "bitflip", "target": name, "edits": edits}


def extreme_value(rng, width, info, old):
    cs, size = info["cluster_size"], info["size"]
    near = rng.choice(info["offsets"]) + rng.choice([0, 0, 1, -1, 8, -8, 512, -512, cs, -cs])
    vals = [0, 1, 2 ** 31, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 62,
            size, size - 1, size + cs, near, near | (old & ~OFF_MASK), old ^ (1 << rng.randrange(64)),
            old + rng.choice([1, -1, cs, -cs]), rng.getrandbits(64)]
    return rng.choice(vals) & ((1 << (8 * width)) - 1)


def mut_field(rng, info):
    fields = info["fields"]
    header = [f for f in fields if "[" not in f[0] and "." not in f[0]]
    pool = header if header and rng.random() < 0.5 else fields
    name, off, width = rng.choice(pool)
    old = info["values"].get(off, 0)
    v = extreme_value(rng, width, info, old)
    edits = [{"op": "set", "offset": off, "width": width, "value": v,
              "order": info.get("order", "big")}]
    if off in info.get("seals", {}) and rng.random() < 0.85:
        start, length = info["seals"][off]
        edits.append({"op": "seal", "start": start, "length": length})
    return {"kind": "field", "target": name, "edits": edits}


def mut_truncate(rng, info):
    if rng.random() < 0.5 and info["regions"]:
        name = rng.choice(sorted(info["regions"]))
        off, ln = rng.choice(info["regions"][name])
        size = off + rng.randrange(ln)
    else:
        name, size = "file", rng.randrange(max(info["size"], 1))
    return {"kind": "truncate", "target": name, "edits": [{"op": "truncate", "size": size}]}


MUTATORS = {"bitflip": mut_bitflip, "field": mut_field, "truncate": mut_truncate}

FORMATS = {
    "raw": {"build": build_raw_bases, "locate": locate_raw,
            "weights": {"bitflip": 6, "truncate": 4}},
    "qcow2": {"build": build_qcow2_bases, "locate": locate_qcow2,
              "weights": {"bitflip": 45, "field": 40, "truncate": 15}},
    "qcow": {"build": build_qcow_bases, "locate": locate_qcow, "checks": False,
             "weights": {"bitflip": 45, "field": 40, "truncate": 15}},
    "cow": {"build": build_cow_bases, "locate": locate_cow, "checks": False,
            "oracle": lambda d, base, out: moo_probe(d, base, out),
            "weights": {"bitflip": 40, "field": 45, "truncate": 15}},
    "vhdx": {"build": lambda scratch, imgloop: vhdx_format.build_vhdx_bases(
                 scratch, imgloop, new_base, qemu, qemu_io_writes, imgloop_io_writes,
                 default_writes),
             "locate": lambda path: vhdx_format.locate_vhdx(path, Found),
             "weights": {"bitflip": 35, "field": 50, "truncate": 15}},
    "parallels": {"build": lambda scratch, imgloop: parallels_format.build_parallels_bases(
                      scratch, imgloop, new_base, qemu, qemu_io_writes, imgloop_io_writes,
                      default_writes),
                  "locate": lambda path: parallels_format.locate_parallels(path, Found),
                  "weights": {"bitflip": 35, "field": 50, "truncate": 15}},
}


def gen_mutations(rng, fmt, info):
    weights = FORMATS[fmt]["weights"]
    kinds = sorted(weights)
    n = 1 if rng.random() < 0.6 else rng.randint(2, 4)
    muts = [MUTATORS[k](rng, info)
            for k in rng.choices(kinds, [weights[k] for k in kinds], k=n)]
    muts.sort(key=lambda m: m["kind"] == "truncate")   # truncations last
    return muts


def apply_mutations(path, muts):
    with open(path, "r+b") as f:
        for m in muts:
            for e in m["edits"]:
                size = os.fstat(f.fileno()).st_size
                if e["op"] == "truncate":
                    f.truncate(e["size"])
                elif e["op"] == "xor" and e["offset"] < size:
                    f.seek(e["offset"])
                    b = f.read(1)[0] ^ e["mask"]
                    f.seek(e["offset"])
                    f.write(bytes([b]))
                elif e["op"] == "set" and e["offset"] + e["width"] <= size:
                    f.seek(e["offset"])
                    f.write(e["value"].to_bytes(e["width"], e.get("order", "big")))
                elif e["op"] == "seal" and e["start"] + e["length"] <= size:
                    f.seek(e["start"])
                    buf = bytearray(f.read(e["length"]))
                    vhdx_format.seal(buf, 0, len(buf))
                    f.seek(e["start"])
                    f.write(buf)


# ---------------------------------------------------------------- one image

def qemu_probe(d, base, out):
    """qemu-img's view of an image: info/check exit codes, sha256 of its raw conversion."""
    opts, name = image_args(base, "qemu")
    rc_info, js = qemu(["qemu-img", "info"] + opts + ["--output=json", name], d, check=False)
    rc_check, _ = qemu(["qemu-img", "check"] + opts + ["--output=json", name], d, check=False)
    sha, raw_size = None, None
    if rc_info == 0:
        try:
            vsize = json.loads(js)["virtual-size"]
        except (ValueError, KeyError):
            vsize = None
        if vsize is not None and vsize <= MAX_COMPARE_SIZE:
            rc, _ = qemu(["qemu-img", "convert"] + opts + ["-O", "raw", name, out], d, check=False)
            if rc == 0:
                sha, raw_size = sha256_file(out), os.path.getsize(out)
        if os.path.exists(out):
            os.unlink(out)
    return {"info": rc_info, "check": rc_check, "raw_sha": sha, "raw_size": raw_size}


def moo_probe(d, base, out):
    """uml_moo's view of a COW file (QEMU has no cow driver): uml_moo merges it with its
    backing file into out, whole 512-byte sectors. It succeeding stands for "opens";
    there is no checker (check 63). A uml_moo failure or crash means no oracle. The
    output is capped at MAX_COMPARE_SIZE (RLIMIT_FSIZE) and the run at QEMU_TIMEOUT."""
    res = {"info": None, "check": 63, "raw_sha": None, "raw_size": None}
    if not UML_MOO:
        return res

    def pre():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_COMPARE_SIZE, MAX_COMPARE_SIZE))
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    if os.path.exists(out):
        os.unlink(out)
    p = subprocess.Popen([UML_MOO, base["main"], out], cwd=d, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pre)
    try:
        rc = p.wait(timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = None
    res["info"], res["oracle_rc"] = (0 if rc == 0 else 1), rc
    if rc == 0 and os.path.exists(out):
        res["raw_sha"], res["raw_size"] = sha256_file(out), os.path.getsize(out)
    if os.path.exists(out):
        os.unlink(out)
    return res


def oracle_probe(d, base, out):
    return FORMATS[base["fmt"]].get("oracle", qemu_probe)(d, base, out)


def imgloop_commands(base, out):
    """The imgloop commands run on each image, by name (read-only ones first)."""
    opts, name = image_args(base, "imgloop")
    cmds = {"info": ["info", "--output", "json"] + opts + [name],
            "map": ["map", "--output", "json"] + opts + [name],
            "convert": ["convert"] + opts + ["-O", "raw", name, out],
            "check": ["check"] + opts + [name]}
    if base.get("secret"):      # without the key: info works, encrypted data does not read
        cmds["info-nokey"] = ["info", "--output", "json", base["main"]]
        cmds["convert-nokey"] = ["convert", "-O", "raw", base["main"], out]
    cmds["repair"] = ["check", "-r", "all"] + opts + [name]
    return cmds


def judge(res, name, argv, r):
    """Count one imgloop run; append its failures to res."""
    res["commands"] += 1
    if r["rss_kib"] > res["rss_max_kib"]:
        res["rss_max_kib"], res["rss_max_cmd"] = r["rss_kib"], name
    codes = res["exit_codes"].setdefault(name, {})
    codes[str(r["rc"])] = codes.get(str(r["rc"]), 0) + 1

    def fail(kind):
        res["failures"].append({"kind": kind, "command": name, "argv": argv, "rc": r["rc"],
                                "secs": r["secs"], "rss_kib": r["rss_kib"],
                                "stderr": r["stderr"][-600:]})
    if r["timed_out"]:
        fail("hang")
        return
    if "panicked" in r["stderr"] or r["signal"] or r["rc"] == 101:
        fail("panic")
        if r["signal"]:
            fail("signal")
    elif r["rc"] not in DOC_EXIT[name]:
        fail("bad_exit_code")
    if r["rss_kib"] > RSS_WARN_KIB:
        fail("rss_over_256mib")


def compare_convert(res, conv, q):
    """Informational: imgloop's raw conversion against qemu-img's (both succeeded).

    The hash is of imgloop's output cut or zero-padded to qemu-img's size, so a
    virtual size rounded differently counts as a size difference only."""
    if not conv or not q["raw_sha"]:
        return
    res["notes"].append("convert-compared")
    size, padded_sha = conv
    if padded_sha != q["raw_sha"]:
        res["notes"].append("convert-content-differs")
    elif size != q["raw_size"]:
        res["notes"].append("convert-size-differs")


def repair_worse(before, after):
    kinds = []
    if before["check"] == 0 and after["check"] not in (0, 3):
        kinds.append("check-clean-to-unclean")
    if before["info"] == 0 and after["info"] != 0:
        kinds.append("open-lost")
    if before["raw_sha"] and after["raw_sha"] != before["raw_sha"]:
        if before["check"] in (0, 63):
            kinds.append("guest-data-changed")
        elif before["check"] == 3:
            kinds.append("guest-data-changed-leaks-only")
    return kinds


def run_image(task):
    """Worker: mutate one copy of a base, run everything, return the counts."""
    base, imgloop, timeout = task["base"], task["imgloop"], task["timeout"]
    res = {"id": task["id"], "fmt": base["fmt"], "base": base["name"], "commands": 0,
           "rss_max_kib": 0, "exit_codes": {}, "failures": [], "notes": []}
    top = os.path.join(task["work"], "img", task["id"])
    img, rep = os.path.join(top, "img"), os.path.join(top, "repair")
    try:
        shutil.copytree(base["dir"], img)
        main = base["main"]
        apply_mutations(os.path.join(img, main), task["mutations"])
        shutil.copytree(img, rep)
        out = os.path.join(top, "out.raw")
        q_before = oracle_probe(img, base, out)
        hashes = hash_dir(img)
        cmds = imgloop_commands(base, out)
        conv = None
        for name in [c for c in cmds if c != "repair"]:
            argv = [imgloop] + cmds[name]
            r = run_limited(argv, img, timeout)
            judge(res, name, argv, r)
            now = hash_dir(img)
            if now != hashes:
                res["failures"].append({"kind": "readonly_changed", "command": name, "argv": argv,
                                        "changed": sorted(k for k in now if now[k] != hashes.get(k))})
                hashes = now
            if name in ("convert", "convert-nokey") and os.path.exists(out):
                if name == "convert" and r["rc"] == 0 and os.path.getsize(out) <= MAX_COMPARE_SIZE:
                    conv = (os.path.getsize(out), sha256_file(out, q_before["raw_size"]))
                os.unlink(out)
        compare_convert(res, conv, q_before)
        companions = {n: sha256_file(os.path.join(rep, n)) for n in base["ro_companions"]}
        no_checks = not FORMATS[base["fmt"]].get("checks", True)
        rep_before = hash_dir(rep) if no_checks else None
        argv = [imgloop] + cmds["repair"]
        r = run_limited(argv, rep, timeout)
        judge(res, "repair", argv, r)
        if any(sha256_file(os.path.join(rep, n)) != s for n, s in companions.items()):
            res["failures"].append({"kind": "repair_worse", "worse": "backing-file-changed",
                                    "command": "repair", "argv": argv})
        if no_checks and hash_dir(rep) != rep_before:   # a format without checks repairs nothing
            res["failures"].append({"kind": "repair_worse", "worse": "no-checks-but-changed",
                                    "command": "repair", "argv": argv, "repair_rc": r["rc"]})
        q_after = oracle_probe(rep, base, out)
        for kind in repair_worse(q_before, q_after):
            res["failures"].append({"kind": "repair_worse", "worse": kind, "command": "repair",
                                    "argv": argv, "qemu_before": q_before, "qemu_after": q_after,
                                    "repair_rc": r["rc"]})
    except Exception as e:   # a harness problem, not an imgloop finding
        res["failures"].append({"kind": "harness_error", "error": repr(e),
                                "traceback": traceback.format_exc()[-1500:]})
    if res["failures"] or "convert-content-differs" in res["notes"] or task.get("keep_always"):
        keep_case(task, res)
    shutil.rmtree(top, ignore_errors=True)
    return res


def keep_case(task, res):
    """Rebuild the mutated image set from its base into the keep dir, with a description."""
    sub = "" if res["failures"] or task.get("keep_always") else "notes"
    dest = os.path.join(task["keep"], sub, task["id"])
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(task["base"]["dir"], dest)
    apply_mutations(os.path.join(dest, task["base"]["main"]), task["mutations"])
    desc = {"id": task["id"], "seed": task["seed"], "format": task["base"]["fmt"],
            "base": task["base"]["name"], "image": task["base"]["main"],
            "mutations": task["mutations"], "failures": res["failures"], "notes": res["notes"]}
    with open(os.path.join(dest, "mutation.json"), "w") as f:
        json.dump(desc, f, indent=1)
    il = task["imgloop"]
    cmds = imgloop_commands(task["base"], "/tmp/replay.out.raw")
    order = [c for c in cmds if "convert" not in c] + [c for c in cmds if "convert" in c]
    with open(os.path.join(dest, "replay.sh"), "w") as f:
        # cp -a keeps the backing file's mtime, which a COW header records
        f.write(f"#!/bin/sh -x\n# replay {task['id']} on a copy of this dir\nrm -rf /tmp/replay && "
                f"cp -a \"$(dirname \"$0\")\" /tmp/replay && cd /tmp/replay || exit 1\n"
                + "".join(" ".join([il] + [shlex.quote(a) for a in cmds[c]]) + "\n" for c in order))


# ---------------------------------------------------------------- campaign

def make_tasks(args, bases, keep):
    tasks = []
    for fmt in args.formats:
        fb = bases[fmt]
        for i in range(args.count):
            b = fb[i % len(fb)]
            rng = random.Random(f"{args.seed}/{fmt}/{i}")
            muts = gen_mutations(rng, fmt, b["info"])
            tasks.append({"id": f"{fmt}-{b['name']}-{i:05d}", "seed": args.seed,
                          "base": {k: v for k, v in b.items() if k != "info"},
                          "mutations": muts, "imgloop": args.imgloop, "timeout": args.timeout,
                          "work": args.work, "keep": keep})
    return tasks


def build_bases(args):
    bases = {}
    for fmt in args.formats:
        bases[fmt] = FORMATS[fmt]["build"](args.work, args.imgloop)
        for b in bases[fmt]:
            info = FORMATS[fmt]["locate"](os.path.join(b["dir"], b["main"]))
            with open(os.path.join(b["dir"], b["main"]), "rb") as f:
                data = f.read()
            info["values"] = {o: int.from_bytes(data[o:o + w], info["order"])
                              for _, o, w in info["fields"]}
            b["info"] = info
            print(f"base {fmt}/{b['name']}: {info['size']} bytes, regions "
                  + ", ".join(f"{k}:{len(v)}" for k, v in sorted(info["regions"].items()))
                  + (f" (made by {b['made_by']})" if "made_by" in b else ""))
    return bases


SUMMARY_KEYS = ("images", "commands", "panics", "signals", "hangs", "rss_max_mib", "rss_max_where",
                "rss_over_256mib", "readonly_changed", "repair_worse", "bad_exit_codes",
                "harness_errors", "convert_compared", "convert_content_differs",
                "convert_size_differs", "failing_images", "seconds", "seed")
KIND_KEY = {"panic": "panics", "signal": "signals", "hang": "hangs",
            "bad_exit_code": "bad_exit_codes", "harness_error": "harness_errors"}


def summarize(results, secs, args, keep):
    s = dict.fromkeys(SUMMARY_KEYS, 0)
    s.update(images=len(results), rss_max_where="", seconds=round(secs, 1), seed=args.seed,
             keep=keep, repair_worse_by_kind={}, exit_codes={}, by_base={})
    for r in results:
        s["commands"] += r["commands"]
        if r["rss_max_kib"] / 1024 > s["rss_max_mib"]:
            s["rss_max_mib"] = round(r["rss_max_kib"] / 1024, 1)
            s["rss_max_where"] = f"{r['id']} {r.get('rss_max_cmd')}"
        s["convert_compared"] += "convert-compared" in r["notes"]
        s["convert_content_differs"] += "convert-content-differs" in r["notes"]
        s["convert_size_differs"] += "convert-size-differs" in r["notes"]
        s["failing_images"] += bool(r["failures"])
        bb = s["by_base"].setdefault(f"{r['fmt']}/{r['base']}", {"images": 0, "failing": 0})
        bb["images"] += 1
        bb["failing"] += bool(r["failures"])
        for f in r["failures"]:
            s[KIND_KEY.get(f["kind"], f["kind"])] += 1
            if f["kind"] == "repair_worse":
                w = s["repair_worse_by_kind"]
                w[f["worse"]] = w.get(f["worse"], 0) + 1
        for cmd, codes in r["exit_codes"].items():
            d = s["exit_codes"].setdefault(cmd, {})
            for c, n in codes.items():
                d[c] = d.get(c, 0) + n
    return s


def print_summary(s):
    print("\n== mutate summary ==")
    for k in SUMMARY_KEYS:
        print(f"  {k:28} {s[k]}")
    for k, v in sorted(s["repair_worse_by_kind"].items()):
        print(f"    repair worse: {k:24} {v}")
    for cmd, codes in sorted(s["exit_codes"].items()):
        print(f"  exit codes {cmd:8} " + " ".join(f"{c}:{n}" for c, n in sorted(codes.items())))
    print(f"  kept cases in {s['keep']}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=200, help="mutated images per format")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated (default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per imgloop command")
    p.add_argument("--imgloop", default=os.path.join(HERE, "..", "target", "release", "imgloop"))
    p.add_argument("--work", default=None, help="scratch dir (default: new dir under /var/tmp)")
    p.add_argument("--keep-work", action="store_true", help="do not remove the scratch dir")
    p.add_argument("--keep", default=None, help="where failing cases go")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny run: 20 images per format, 5 s timeout")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    p.add_argument("--only", default=None, help="run (and keep) only these image ids, comma-separated")
    a = p.parse_args(argv)
    a.formats = [f for f in a.formats.split(",") if f]
    for f in a.formats:
        if f not in FORMATS:
            p.error(f"unknown format {f!r} (known: {', '.join(FORMATS)})")
    if a.smoke:
        a.count, a.timeout = min(a.count, 20), min(a.timeout, 5.0)
    if a.seed is None:
        a.seed = int(time.time()) % 1000000
    a.imgloop = os.path.abspath(a.imgloop)
    return a


def main(argv=None):
    args = parse_args(argv)
    if not os.access(args.imgloop, os.X_OK):
        sys.exit(f"mutate.py: no imgloop binary at {args.imgloop}")
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="imgloop-mutate-",
                                                              dir="/var/tmp"))
    os.makedirs(args.work, exist_ok=True)
    keep = os.path.abspath(args.keep or f"/var/tmp/imgloop-mutate-kept/seed{args.seed}")
    print(f"mutate: seed {args.seed}, {args.count} images per format, formats {args.formats}, "
          f"timeout {args.timeout}s, jobs {args.jobs}, work {args.work}")
    if "cow" in args.formats and not (UML_MKCOW and UML_MOO):
        print("mutate: uml-utilities missing: cow bases made by imgloop create only"
              if UML_MOO else "mutate: no uml_moo: cow images get no content oracle")
    t0 = time.monotonic()
    try:
        bases = build_bases(args)
        tasks = make_tasks(args, bases, keep)
        if args.only:
            tasks = [dict(t, keep_always=True) for t in tasks if t["id"] in args.only.split(",")]
        results = []
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futs = [pool.submit(run_image, t) for t in tasks]
            for n, fut in enumerate(as_completed(futs), 1):
                r = fut.result()
                results.append(r)
                for f in r["failures"]:
                    print(f"  FAIL {r['id']}: {f['kind']} {f.get('worse', '')} in {f.get('command')}"
                          f" {f.get('stderr', f.get('error', ''))[-200:].strip()}")
                if n % 50 == 0 or n == len(tasks):
                    print(f"  {n}/{len(tasks)} images, {time.monotonic() - t0:.0f}s")
    finally:
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    s = summarize(results, time.monotonic() - t0, args, keep)
    print_summary(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 1 if any(s[k] for k in BAD_KEYS) else 0


if __name__ == "__main__":
    sys.exit(main())
