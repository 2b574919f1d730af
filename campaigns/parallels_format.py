"""Parallels for the mutation campaign (campaigns/mutate.py): the bases and the locator.

Parallels is little-endian: a 64-byte header, a BAT of 32-bit entries (version 2:
cluster numbers; version 1: sector numbers) and the data clusters.
"""
import os
import struct

KiB, MiB = 1 << 10, 1 << 20
HEADER = [("version", 16, 4), ("heads", 20, 4), ("cylinders", 24, 4), ("tracks", 28, 4),
          ("bat_entries", 32, 4), ("nb_sectors", 36, 8), ("inuse", 44, 4), ("data_off", 48, 4),
          ("flags", 52, 4), ("ext_off", 56, 8)]


def le(data, off, width):
    return int.from_bytes(data[off:off + width], "little")


def write_v1(path, writes):
    """A version-1 image laid out by hand (qemu-img only makes version 2): 32 KiB
    clusters, data_off 0, clusters in the order the writes touch them."""
    cs, entries = 32 * KiB, 384          # 12 MiB
    bat = [0] * entries
    data = []
    for pattern, off, length in writes:
        for c in range(off // cs, (off + length - 1) // cs + 1):
            if not bat[c]:
                data.append(c)
                bat[c] = 64 * len(data)  # sectors: after the header and BAT (sector 64+)
    clusters = {c: bytearray(cs) for c in data}
    for pattern, off, length in writes:
        for pos in range(off, off + length):
            clusters[pos // cs][pos % cs] = 0 if pattern == "zero" else int(pattern, 16)
    head = b"WithoutFreeSpace" + struct.pack("<IIIIIQIIIQ", 2, 16, 24, 64, entries,
                                             entries * 64, 0, 0, 0, 0)
    body = head + b"".join(struct.pack("<I", e) for e in bat)
    body = body.ljust(64 * 512, b"\0")
    with open(path, "wb") as f:
        f.write(body + b"".join(bytes(clusters[c]) for c in data))


def build_parallels_bases(scratch, imgloop, new_base, qemu, qemu_io_writes, imgloop_io_writes,
                          default_writes):
    """qemu-img's default (1 MiB clusters), 64 KiB and 4 KiB clusters written by qemu-io;
    imgloop-made and -written; and a hand-laid version-1 image."""
    bases = []
    for name, opts in [("default", ""), ("cs64k", "cluster_size=64k"), ("cs4k", "cluster_size=4k")]:
        b = new_base(scratch, "parallels", name, "disk.hds")
        qemu(["qemu-img", "create", "-f", "parallels"] + (["-o", opts] if opts else [])
             + [b["main"], "12M"], b["dir"])
        qemu_io_writes(b["main"], "parallels", default_writes(12), b["dir"])
        bases.append(b)
    b = new_base(scratch, "parallels", "imgloop", "disk.hds")
    qemu([imgloop, "create", "-q", "-f", "parallels", "-o", "cluster_size=256k", b["main"], "12M"],
         b["dir"])
    imgloop_io_writes(imgloop, b["main"], "parallels", default_writes(12), b["dir"])
    b["made_by"] = "imgloop"
    bases.append(b)
    b = new_base(scratch, "parallels", "v1", "disk.hdd")
    write_v1(os.path.join(b["dir"], b["main"]), default_writes(12))
    b["made_by"] = "campaign script (version 1)"
    bases.append(b)
    return bases


def locate_parallels(path, found_cls):
    """The header fields, the BAT (a field per non-zero entry, up to 32), and the data
    of some allocated clusters."""
    with open(path, "rb") as f:
        data = f.read()
    fd = found_cls(data)
    fd.order = "little"
    fd.region("header", 0, 64)
    for name, off, width in HEADER:
        fd.field(name, off, width)
    tracks, entries = le(data, 28, 4), le(data, 32, 4)
    cs = max(tracks, 1) * 512
    unit = 512 if data[:16] == b"WithoutFreeSpace" else cs
    fd.region("bat", 64, 4 * entries)
    n = 0
    for i in range(min(entries, 1 << 16)):
        e = le(data, 64 + 4 * i, 4)
        if e or i == 0:
            if n < 32:
                fd.field(f"bat[{i}]", 64 + 4 * i, 4)
                n += 1
            if e and n < 12:
                fd.region("data", e * unit, min(cs, 4096))
    fd.offsets.update({64 + 4 * entries, le(data, 48, 4) * 512})
    return fd.result(cs)
