#!/usr/bin/env python3
"""kill -9 crash campaign for imgloop.

For each option set, runs a sequence of `imgloop io` invocations with random
write/zero/discard/flush scripts on a fresh image and kills the running one
with SIGKILL at a random moment. Then qemu-img and imgloop must find the
image consistent, it must open read-write again, and every 512-byte sector
must hold content the model allows (read back with qemu-img convert, so
qemu-img is the oracle; for cow, which QEMU has no driver for, uml_moo and
imgloop read it back). See campaigns/README.md.
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
HERE = os.path.dirname(os.path.abspath(__file__))
DISK_SIZE = 8 * MiB
NSECT = DISK_SIZE // SECTOR
MAX_INVOCATIONS = 12
KILL_SPAN = 6           # the kill lands within about this many invocations
OP_LINE = re.compile(r"^(wrote|discard) \d+/\d+ bytes at offset \d+$")
BAD_KEYS = ("lost_write_trials", "impossible_trials", "corrupt_images", "imgloop_check_corrupt",
            "not_writable", "io_failures", "panics", "harness_errors", "imgloop_read_failures",
            "readers_differ", "backing_changed")
SECRET = "secret,id=sec0,data=abc"     # the key of the encrypted (qcow-aes) images
UML_MKCOW, UML_MOO = shutil.which("uml_mkcow"), shutil.which("uml_moo")


# ---------------------------------------------------------------- option sets

class Image:
    """The image of a trial and how the tools name it.

    backing: per-sector backing byte (None: no backing file). secret: encrypted with
    SECRET, so every imgloop and qemu command names it with --object/--image-opts.
    oracle: "qemu" (qemu-img/qemu-io read it) or "uml_moo" (cow; None when uml_moo is
    not installed). imgloop_reads: imgloop convert reads it back too, and must agree
    with the oracle. companion: a backing file that must stay unchanged (content and
    mtime)."""

    def __init__(self, main, fmt, backing=None, secret=False, oracle="qemu",
                 imgloop_reads=False, companion=None, made_by="qemu-img"):
        self.main, self.fmt, self.backing, self.secret = main, fmt, backing, secret
        self.oracle, self.imgloop_reads, self.companion = oracle, imgloop_reads, companion
        self.made_by = made_by

    def args(self, tool):
        """(options, image name) for imgloop or qemu (qemu gets -f FMT for a plain image)."""
        if self.secret:
            return (["--object", SECRET, "--image-opts"],
                    f"driver={self.fmt},file.filename={self.main},encrypt.key-secret=sec0")
        return (["-f", self.fmt] if tool == "qemu" else []), self.main


def backing_value(s):
    """Content of sector s of the raw backing file: one byte per 64 KiB, 0x80..0xbf."""
    return 0x80 + (s * SECTOR // (64 * KiB)) % 0x40


def write_backing(d):
    with open(os.path.join(d, "base.raw"), "wb") as f:
        for s in range(0, NSECT, 128):
            f.write(bytes([backing_value(s)]) * (128 * SECTOR))
    return [backing_value(s) for s in range(NSECT)]


def must(args, cwd):
    rc, _, err = run(args, cwd)
    if rc != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({rc}): {err.strip()[-300:]}")


def create_qcow2(opts):
    def create(d, trial, imgloop):
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
        run(cmd + ["disk.qcow2", str(DISK_SIZE)], d)
        return Image("disk.qcow2", "qcow2")
    return create


def create_raw(d, trial, imgloop):
    run(["qemu-img", "create", "-q", "-f", "raw", "disk.raw", str(DISK_SIZE)], d)
    return Image("disk.raw", "raw")


def create_overlay(d, trial, imgloop):
    backing = write_backing(d)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         "disk.qcow2", str(DISK_SIZE)], d)
    return Image("disk.qcow2", "qcow2", backing)


def create_qcow(kind):
    """qcow version 1: plain, over base.raw (512-byte clusters) or AES-encrypted. Even
    trials have qemu-img create the image, odd ones imgloop create."""
    def create(d, trial, imgloop):
        tool = "qemu-img" if trial % 2 == 0 else imgloop
        cmd, backing = [tool, "create", "-q", "-f", "qcow"], None
        if kind == "overlay":
            backing = write_backing(d)
            cmd += ["-b", "base.raw", "-F", "raw"]
        elif kind == "aes":
            cmd += ["--object", SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=sec0"]
        must(cmd + ["disk.qcow", str(DISK_SIZE)], d)
        return Image("disk.qcow", "qcow", backing, secret=kind == "aes", imgloop_reads=True,
                     companion="base.raw" if backing else None,
                     made_by="qemu-img" if trial % 2 == 0 else "imgloop")
    return create


def create_cow(d, trial, imgloop):
    """UML COW v3 over base.raw, made by uml_mkcow (imgloop create when it is not
    installed). uml_mkcow stores the backing path absolute; it is rewritten to
    'base.raw' so the copies of the dir (before-last, after-kill, kept cases) read
    their own backing file (imgloop resolves it next to the COW file, uml_moo from its
    cwd, the image dir)."""
    backing = write_backing(d)
    if UML_MKCOW:
        must([UML_MKCOW, "disk.cow", "base.raw"], d)
    else:
        must([imgloop, "create", "-q", "-f", "cow", "-b", "base.raw", "-F", "raw", "disk.cow"], d)
    with open(os.path.join(d, "disk.cow"), "r+b") as f:
        f.seek(32)
        f.write(b"base.raw".ljust(4096, b"\0"))
    return Image("disk.cow", "cow", backing, oracle="uml_moo" if UML_MOO else None,
                 imgloop_reads=True, companion="base.raw",
                 made_by="uml_mkcow" if UML_MKCOW else "imgloop")


def create_vhdx(opts):
    """VHDX, dynamic: even trials have qemu-img create the image, odd ones imgloop."""
    def create(d, trial, imgloop):
        tool = "qemu-img" if trial % 2 == 0 else imgloop
        cmd = [tool, "create", "-q", "-f", "vhdx"] + (["-o", opts] if opts else [])
        must(cmd + ["disk.vhdx", str(DISK_SIZE)], d)
        return Image("disk.vhdx", "vhdx", imgloop_reads=True,
                     made_by="qemu-img" if trial % 2 == 0 else "imgloop")
    return create


def create_parallels(opts):
    """Parallels: even trials have qemu-img create the image, odd ones imgloop. A kill
    leaves the in-use marker and a preallocated tail, which the next read-write open
    repairs (as qemu 10 does)."""
    def create(d, trial, imgloop):
        tool = "qemu-img" if trial % 2 == 0 else imgloop
        cmd = [tool, "create", "-q", "-f", "parallels"] + (["-o", opts] if opts else [])
        must(cmd + ["disk.hds", str(DISK_SIZE)], d)
        return Image("disk.hds", "parallels", imgloop_reads=True,
                     made_by="qemu-img" if trial % 2 == 0 else "imgloop")
    return create


OPTION_SETS = {
    "raw": create_raw,
    "qcow2-default": create_qcow2(""),
    "qcow2-cs512": create_qcow2("cluster_size=512"),
    "qcow2-extl2": create_qcow2("extended_l2=on"),
    "qcow2-lazy": create_qcow2("lazy_refcounts=on"),
    "qcow2-compat010": create_qcow2("compat=0.10"),
    "qcow2-overlay": create_overlay,
    "qcow-default": create_qcow("default"),
    "qcow-overlay": create_qcow("overlay"),
    "qcow-aes": create_qcow("aes"),
    "cow": create_cow,
    "vhdx-default": create_vhdx(""),
    "vhdx-bs1m-notpresent": create_vhdx("block_size=1M,block_state_zero=off"),
    "parallels-default": create_parallels(""),
    "parallels-cs64k": create_parallels("cluster_size=64k"),
}


def run(args, cwd, timeout=120):
    p = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                       encoding="utf-8", errors="replace", timeout=timeout)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------- workload

def gen_range(rng):
    ln = rng.choice([1, 1, 2, 7, 8, 16, 64, 128, 129, 256, 2048]) * SECTOR
    if rng.random() < 0.3:        # cluster aligned, sometimes straddling a boundary
        off = rng.randrange(0, DISK_SIZE, 64 * KiB) + rng.choice([0, 0, -SECTOR, SECTOR])
    else:
        off = rng.randrange(NSECT) * SECTOR
    off = max(0, min(off, DISK_SIZE - SECTOR))
    return off, min(ln, DISK_SIZE - off)


def gen_script(rng):
    """A list of commands: (kind, pattern, offset, length); kind write|zero|zerou|discard|flush."""
    cmds = []
    for _ in range(rng.randint(5, 120)):
        r = rng.random()
        if r < 0.07:
            cmds.append(("flush", None, 0, 0))
            continue
        off, ln = gen_range(rng)
        if r < 0.7:
            cmds.append(("write", rng.randrange(1, 0x80), off, ln))
        elif r < 0.8:
            cmds.append(("zero", 0, off, ln))
        elif r < 0.87:
            cmds.append(("zerou", 0, off, ln))
        else:
            cmds.append(("discard", None, off, ln))
    cmds.append(("flush", None, 0, 0))
    return cmds


def cmd_text(c):
    kind, pat, off, ln = c
    return {"write": f"write -P 0x{pat or 0:02x} {off} {ln}", "zero": f"write -z {off} {ln}",
            "zerou": f"write -z -u {off} {ln}", "discard": f"discard {off} {ln}",
            "flush": "flush"}[kind]


def io_argv(imgloop, script, img):
    opts, name = img.args("imgloop")
    argv = [imgloop, "io"] + opts
    for c in script:
        argv += ["-c", cmd_text(c)]
    return argv + [name]


# ---------------------------------------------------------------- model

class Model:
    """Per sector: the set of byte values it may hold (each sector is uniform), and history."""

    def __init__(self, backing):
        self.backing = backing or [0] * NSECT
        self.allowed = [{b} for b in self.backing]
        self.history = [{b} for b in self.backing]
        self.maybe = set()          # sectors the killed invocation may have been writing

    def values(self, c, s):
        kind, pat = c[0], c[1]
        if kind == "write":
            return {pat}
        if kind in ("zero", "zerou"):
            return {0}
        return {0, self.backing[s]}         # discard: zero or the backing file shows through

    def apply_durable(self, c):
        if c[0] == "flush":
            return
        for s in range(c[2] // SECTOR, (c[2] + c[3]) // SECTOR):
            v = self.values(c, s)
            self.allowed[s] = (self.allowed[s] | v) if c[0] == "discard" else v
            self.history[s] |= v

    def apply_maybe(self, c):
        if c[0] == "flush":
            return
        for s in range(c[2] // SECTOR, (c[2] + c[3]) // SECTOR):
            v = self.values(c, s)
            self.maybe.add(s)
            self.allowed[s] = self.allowed[s] | v
            self.history[s] |= v

    def apply_killed(self, script, stdout):
        """Commands before the last flush known to have returned are durable, the rest maybe."""
        done = sum(1 for line in stdout.splitlines() if OP_LINE.match(line))
        ops = [i for i, c in enumerate(script) if c[0] != "flush"]
        last_done = ops[done - 1] if done else -1
        flushes = [i for i, c in enumerate(script) if c[0] == "flush" and i < last_done]
        durable_end = flushes[-1] if flushes else -1
        for i, c in enumerate(script):
            (self.apply_durable if i <= durable_end else self.apply_maybe)(c)
        return {"ops_printed": done, "durable_prefix": durable_end + 1, "commands": len(script)}

    def compare(self, raw_bytes):
        """Return (lost, impossible, torn) lists of (sector, found, allowed).

        torn: a sector the killed invocation was writing that mixes allowed values
        byte by byte. A process killed inside pwrite can leave a short copy (the
        kernel gives no sector atomicity there), so this is counted, not failed."""
        lost, impossible, torn = [], [], []
        for s in range(NSECT):
            sec = raw_bytes[s * SECTOR:(s + 1) * SECTOR]
            v = sec[0] if len(sec) == SECTOR and sec.count(sec[0]) == SECTOR else None
            if v in self.allowed[s]:
                continue
            entry = (s, v if v is not None else "mixed", sorted(self.allowed[s]))
            if v is None and s in self.maybe and len(sec) == SECTOR and set(sec) <= self.allowed[s]:
                torn.append(entry)
            else:
                (lost if v in self.history[s] else impossible).append(entry)
        return lost, impossible, torn


# ---------------------------------------------------------------- one trial

def run_invocation(argv, cwd, budget):
    """Run one imgloop io; SIGKILL it after budget seconds. Return (rc, stdout, stderr, killed)."""
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    try:
        out, err = p.communicate(timeout=max(budget, 0))
        return p.returncode, out, err, False
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return p.returncode, out, err, p.returncode == -signal.SIGKILL


def copy_set(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def run_workload(rng, t, img_dir, img, model, mean):
    """Run invocations until the kill moment; return (invocation log, failure or None).

    The kill moment counts only the time imgloop runs, not the harness between runs."""
    delay = rng.uniform(0, mean * rng.uniform(1, KILL_SPAN))
    t["kill_delay"], ran = round(delay, 4), 0.0
    log = []
    for k in range(MAX_INVOCATIONS):
        script = gen_script(rng)
        copy_set(img_dir, img_dir + ".before-last")
        t0 = time.monotonic()
        rc, out, err, killed = run_invocation(io_argv(t["imgloop"], script, img), img_dir,
                                              delay - ran)
        ran += time.monotonic() - t0
        entry = {"script": [cmd_text(c) for c in script], "rc": rc, "killed": killed,
                 "secs": round(time.monotonic() - t0, 4), "stderr": err[-1000:]}
        log.append(entry)
        if "panicked" in err or rc == 101:
            return log, "panic"
        if killed:
            entry["progress"] = model.apply_killed(script, out)
            return log, None
        if rc != 0:
            return log, "io_failure"
        t["durations"].append(time.monotonic() - t0)
        for c in script:
            model.apply_durable(c)
    return log, None


def verify(t, img_dir, img, model, lazy):
    """Checks after the kill; returns a list of failure kinds and fills t with details."""
    fails = []
    qopts, qname = img.args("qemu")
    iopts, iname = img.args("imgloop")
    if img.fmt == "cow":        # QEMU has no cow driver: imgloop must open it, no checker
        rc, _, err = run([t["imgloop"], "info"] + iopts + [iname], img_dir)
        dirty, q_rc, q_out = False, None, ""
        if rc != 0:
            t["info_err"] = err[-500:]
    else:
        if img.fmt == "vhdx":
            fails += replay_log(t, img_dir, img)
        rc, js, _ = run(["qemu-img", "info"] + qopts + ["--output=json", qname], img_dir)
        dirty = rc == 0 and json.loads(js).get("dirty-flag", False)
        q_rc, q_out, _ = run(["qemu-img", "check"] + qopts + ["--output=json", qname], img_dir)
    if img.fmt == "parallels":      # the in-use marker: qemu-img info does not show it
        i_rc0, i_js, _ = run([t["imgloop"], "info", "--output=json"] + iopts + [iname], img_dir)
        try:
            dirty = i_rc0 == 0 and json.loads(i_js)["format-specific"]["data"]["in-use"]
        except (ValueError, KeyError, TypeError):
            dirty = False
    t["dirty"] = dirty
    # Lazy refcounts, and Parallels' in-use marker: the next read-write open repairs
    # the image (checked by reopen() below).
    excuse = (lazy or img.fmt == "parallels") and dirty
    i_rc, i_out, _ = run([t["imgloop"], "check"] + iopts + [iname], img_dir)
    t["qemu_check"], t["imgloop_check"] = q_rc, i_rc
    if rc != 0 or (q_rc is not None and q_rc not in (0, 3, 63) and not excuse):
        fails.append("corrupt")
        t["qemu_check_out"] = q_out[-2000:]
    if i_rc not in (0, 3, 63) and not excuse:
        fails.append("imgloop_check_corrupt")
        t["imgloop_check_out"] = i_out[-2000:]
    fails += read_back(t, img_dir, img, model)
    fails += reopen(t, img_dir, img)
    return fails


def replay_log(t, img_dir, img):
    """A kill can leave a VHDX log to replay (a legitimate state: the next read-write open
    replays it). qemu-img refuses such an image read-only, so: imgloop reads it as it is
    (replaying in memory, changing nothing), qemu-img check -r all replays it, and the
    disk must read the same before and after."""
    iopts, iname = img.args("imgloop")
    rc, js, _ = run([t["imgloop"], "info", "--output=json"] + iopts + [iname], img_dir)
    try:
        pending = rc == 0 and json.loads(js)["format-specific"]["data"]["log"] != "clean"
    except (ValueError, KeyError, TypeError):
        pending = False
    t["log_pending"] = pending
    if not pending:
        return []
    out = os.path.join(img_dir, "..", "before-replay.raw")
    c_rc, _, c_err = run([t["imgloop"], "convert"] + iopts + ["-O", "raw", iname, out], img_dir)
    qopts, qname = img.args("qemu")
    r_rc, _, r_err = run(["qemu-img", "check", "-r", "all"] + qopts + [qname], img_dir)
    if c_rc != 0 or r_rc not in (0, 3):
        t["replay_err"] = (c_err + r_err)[-500:]
        return ["imgloop_read_failure" if c_rc else "corrupt"]
    after = os.path.join(img_dir, "..", "after-replay.raw")
    run(["qemu-img", "convert"] + qopts + ["-O", "raw", qname, after], img_dir)
    same = os.path.exists(after) and file_state(out)[0] == file_state(after)[0]
    for p in (out, after):
        if os.path.exists(p):
            os.unlink(p)
    return [] if same else ["readers_differ"]


def read_back(t, img_dir, img, model):
    """Read the disk with the oracle (qemu-img convert, or uml_moo for cow) and, for
    imgloop_reads sets, with imgloop convert too. Every reader's sectors must be allowed
    by the model, and the readers must return the same bytes."""
    fails, reads = [], {}
    out = os.path.join(img_dir, "..", "readback.raw")
    qopts, qname = img.args("qemu")
    iopts, iname = img.args("imgloop")
    readers = []
    if img.oracle == "qemu":
        readers.append(("qemu-img", ["qemu-img", "convert"] + qopts + ["-O", "raw", qname, out],
                        "corrupt", "convert_err"))
    elif img.oracle == "uml_moo":
        readers.append(("uml_moo", [UML_MOO, img.main, out], "corrupt", "convert_err"))
    if img.imgloop_reads:
        readers.append(("imgloop", [t["imgloop"], "convert"] + iopts + ["-O", "raw", iname, out],
                        "imgloop_read_failure", "imgloop_read_err"))
    for reader, argv, kind, err_key in readers:
        if os.path.exists(out):
            os.unlink(out)
        c_rc, _, c_err = run(argv, img_dir)
        if c_rc != 0:
            fails.append(kind)
            t[err_key] = c_err[-500:]
            continue
        with open(out, "rb") as f:
            reads[reader] = f.read()
        os.unlink(out)
    worst = {"lost": [], "impossible": [], "torn": []}
    for reader, data in reads.items():
        lost, impossible, torn = model.compare(data)
        if len(reads) > 1:
            t.setdefault("readback", {})[reader] = {
                "lost_sectors": len(lost), "impossible_sectors": len(impossible),
                "torn_sectors": len(torn), "bad_sectors_sample": (lost + impossible)[:20]}
        for k, v in (("lost", lost), ("impossible", impossible), ("torn", torn)):
            if len(v) > len(worst[k]):
                worst[k] = v
    if reads:
        lost, impossible, torn = worst["lost"], worst["impossible"], worst["torn"]
        t["lost_sectors"], t["impossible_sectors"] = len(lost), len(impossible)
        t["torn_sectors"] = len(torn)
        t["bad_sectors_sample"] = (lost + impossible)[:20]
        t["torn_sectors_sample"] = torn[:5]
        fails += ["lost_write"] * bool(lost) + ["impossible"] * bool(impossible)
    if len(set(reads.values())) > 1:
        (a, da), (b, db) = list(reads.items())[:2]
        diff = [s for s in range(NSECT)
                if da[s * SECTOR:(s + 1) * SECTOR] != db[s * SECTOR:(s + 1) * SECTOR]]
        fails.append("readers_differ")
        t["readers_differ"] = {"readers": [a, b], "sizes": [len(da), len(db)],
                               "sectors": len(diff), "first": diff[:20]}
    return fails


def reopen(t, img_dir, img):
    """The image must open read-write, take a write, and check clean afterwards."""
    fails = []
    qopts, qname = img.args("qemu")
    iopts, iname = img.args("imgloop")
    w_rc, _, w_err = run([t["imgloop"], "io"] + iopts + ["-c", "write -P 0x11 0 512", "-c", "flush",
                                                         iname], img_dir)
    if img.fmt != "cow":
        r_rc, r_out, _ = run(["qemu-io"] + qopts + ["-r", "-c", "read -P 0x11 0 512", qname],
                             img_dir)
    else:       # no qemu-io for cow: imgloop reads it back, and uml_moo when installed
        r_rc, r_out, r_err = run([t["imgloop"], "io"] + iopts + ["-r", "-c", "read -P 0x11 0 512",
                                                                 iname], img_dir)
        r_out += r_err
        if img.oracle == "uml_moo":
            out = os.path.join(img_dir, "..", "reopen.raw")
            m_rc, _, m_err = run([UML_MOO, img.main, out], img_dir)
            if m_rc == 0:
                with open(out, "rb") as f:
                    if f.read(SECTOR) != b"\x11" * SECTOR:
                        r_rc, r_out = 1, r_out + "uml_moo: verification failed at sector 0"
            else:
                r_rc, r_out = m_rc, r_out + m_err
            if os.path.exists(out):
                os.unlink(out)
    if w_rc != 0 or r_rc != 0 or "verification failed" in r_out.lower():
        fails.append("not_writable")
        t["reopen_err"] = (w_err + r_out)[-500:]
    if img.fmt != "cow":
        q_rc, q_out, _ = run(["qemu-img", "check"] + qopts + ["--output=json", qname], img_dir)
    else:
        q_rc, q_out = None, ""
    i_rc, _, _ = run([t["imgloop"], "check"] + iopts + [iname], img_dir)
    t["qemu_check_after_reopen"], t["imgloop_check_after_reopen"] = q_rc, i_rc
    if q_rc is not None and q_rc not in (0, 3, 63):
        fails.append("corrupt")
        t["qemu_check_after_reopen_out"] = q_out[-2000:]
    if i_rc not in (0, 3, 63):
        fails.append("imgloop_check_corrupt")
    return fails


def file_state(path):
    """sha256 and mtime of a file: a COW header records its backing file's mtime."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return [h.hexdigest(), os.stat(path).st_mtime_ns]


def run_trial(name, idx, args, work, mean):
    rng = random.Random(f"{args.seed}/{name}/{idx}")
    top = os.path.join(work, f"{name}-{idx:04d}")
    img_dir = os.path.join(top, "img")
    os.makedirs(img_dir)
    t = {"option_set": name, "trial": idx, "seed": args.seed, "imgloop": args.imgloop,
         "durations": [], "failures": []}
    try:
        img = OPTION_SETS[name](img_dir, idx, args.imgloop)
        t["made_by"], t["image_args"] = img.made_by, img.args("imgloop")
        companion = img.companion and os.path.join(img_dir, img.companion)
        before = companion and file_state(companion)
        model = Model(img.backing)
        t["invocations"], fail = run_workload(rng, t, img_dir, img, model, mean)
        t["killed"] = any(e["killed"] for e in t["invocations"])
        copy_set(img_dir, os.path.join(top, "after-kill"))
        if fail:
            t["failures"].append(fail)
        t["failures"] += verify(t, img_dir, img, model, "lazy" in name)
        if companion and file_state(companion) != before:
            t["failures"].append("backing_changed")
    except Exception as e:
        t["failures"].append("harness_error")
        t["error"] = repr(e)
    if t["failures"]:
        keep_case(t, top, args.keep)
    shutil.rmtree(top, ignore_errors=True)
    return t


def keep_case(t, top, keep):
    dest = os.path.join(keep, f"{t['option_set']}-{t['trial']:04d}")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for sub in ("after-kill", "img.before-last"):
        if os.path.isdir(os.path.join(top, sub)):
            shutil.copytree(os.path.join(top, sub), os.path.join(dest, sub))
    with open(os.path.join(dest, "case.json"), "w") as f:
        json.dump({k: v for k, v in t.items() if k != "durations"}, f, indent=1)


# ---------------------------------------------------------------- campaign

def summarize(trials, secs, args):
    s = {"trials": len(trials), "killed": 0, "killed_mid_script": 0, "completed_invocations": 0,
         "lost_write_trials": 0, "lost_sectors": 0, "impossible_trials": 0,
         "impossible_sectors": 0, "corrupt_images": 0, "imgloop_check_corrupt": 0,
         "not_writable": 0, "io_failures": 0, "panics": 0, "harness_errors": 0,
         "imgloop_read_failures": 0, "readers_differ": 0, "backing_changed": 0,
         "torn_trials": 0, "torn_sectors": 0, "dirty_after_kill": 0, "leaks_after_kill": 0,
         "log_replays_after_kill": 0, "seconds": round(secs, 1), "seed": args.seed, "dir": args.dir, "keep": args.keep,
         "by_option_set": {}}
    key = {"lost_write": "lost_write_trials", "impossible": "impossible_trials",
           "corrupt": "corrupt_images", "imgloop_check_corrupt": "imgloop_check_corrupt",
           "not_writable": "not_writable", "io_failure": "io_failures", "panic": "panics",
           "harness_error": "harness_errors", "imgloop_read_failure": "imgloop_read_failures",
           "readers_differ": "readers_differ", "backing_changed": "backing_changed"}
    for t in trials:
        s["killed"] += bool(t.get("killed"))
        inv = t.get("invocations", [])
        s["completed_invocations"] += sum(1 for e in inv if e["rc"] == 0)
        s["killed_mid_script"] += any(e.get("progress", {}).get("ops_printed") for e in inv)
        s["lost_sectors"] += t.get("lost_sectors", 0)
        s["impossible_sectors"] += t.get("impossible_sectors", 0)
        s["torn_trials"] += bool(t.get("torn_sectors"))
        s["torn_sectors"] += t.get("torn_sectors", 0)
        s["dirty_after_kill"] += bool(t.get("dirty"))
        s["leaks_after_kill"] += t.get("qemu_check") == 3
        s["log_replays_after_kill"] += bool(t.get("log_pending"))
        for k in set(t["failures"]):
            s[key[k]] += 1
        b = s["by_option_set"].setdefault(t["option_set"], {"trials": 0, "failing": 0})
        b["trials"] += 1
        b["failing"] += bool(t["failures"])
    return s


def print_summary(s):
    print("\n== crash summary ==")
    for k in ("trials", "killed", "killed_mid_script", "completed_invocations",
              "lost_write_trials", "lost_sectors", "impossible_trials", "impossible_sectors",
              "corrupt_images", "imgloop_check_corrupt", "not_writable", "io_failures", "panics",
              "harness_errors", "imgloop_read_failures", "readers_differ", "backing_changed",
              "torn_trials", "torn_sectors", "dirty_after_kill",
              "leaks_after_kill", "log_replays_after_kill", "seconds", "seed", "dir"):
        print(f"  {k:24} {s[k]}")
    for name, b in s["by_option_set"].items():
        print(f"  {name:24} {b['trials']} trials, {b['failing']} failing")
    print(f"  kept cases in {s['keep']}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="trials per option set")
    p.add_argument("--sets", default=",".join(OPTION_SETS), help="option sets to run")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--imgloop", default=os.path.join(HERE, "..", "target", "release", "imgloop"))
    p.add_argument("--dir", default="/var/tmp", help="where the images live (e.g. /dev/shm)")
    p.add_argument("--keep", default=None, help="where failing cases go")
    p.add_argument("--smoke", action="store_true", help="tiny run: 3 trials per option set")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    a = p.parse_args(argv)
    a.sets = [x for x in a.sets.split(",") if x]
    for x in a.sets:
        if x not in OPTION_SETS:
            p.error(f"unknown option set {x!r} (known: {', '.join(OPTION_SETS)})")
    if a.smoke:
        a.trials = min(a.trials, 3)
    if a.seed is None:
        a.seed = int(time.time()) % 1000000
    a.imgloop = os.path.abspath(a.imgloop)
    a.keep = os.path.abspath(a.keep or f"/var/tmp/imgloop-crash-kept/seed{a.seed}")
    return a


def main(argv=None):
    args = parse_args(argv)
    if not os.access(args.imgloop, os.X_OK):
        sys.exit(f"crash.py: no imgloop binary at {args.imgloop}")
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="imgloop-crash-", dir=args.dir)
    print(f"crash: seed {args.seed}, {args.trials} trials per set, sets {args.sets}, dir {work}")
    t0, trials = time.monotonic(), []
    try:
        for name in args.sets:
            mean = 0.02                 # running mean of one invocation's duration
            for i in range(args.trials):
                t = run_trial(name, i, args, work, mean)
                for d in t["durations"]:
                    mean = 0.8 * mean + 0.2 * d
                trials.append(t)
                if t["failures"]:
                    print(f"  FAIL {name} trial {i}: {sorted(set(t['failures']))} "
                          f"{t.get('error', '')}")
            print(f"  {name}: {args.trials} trials, mean invocation {mean:.3f}s, "
                  f"{time.monotonic() - t0:.0f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = summarize(trials, time.monotonic() - t0, args)
    print_summary(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 1 if any(s[k] for k in BAD_KEYS) else 0


if __name__ == "__main__":
    sys.exit(main())
