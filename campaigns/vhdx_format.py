"""VHDX for the mutation campaign (campaigns/mutate.py): the bases and the locator.

VHDX is little-endian and checksums its headers, region tables and log entries
(CRC-32C). A field mutation of a checksummed structure carries a "seal" edit most of
the time (the checksum recomputed after the change), so the damage reaches the
structure behind the checksum instead of stopping at "bad checksum".
"""
import struct
import uuid

KiB, MiB = 1 << 10, 1 << 20
HEADERS = (64 * KiB, 128 * KiB)
REGIONS = (192 * KiB, 256 * KiB)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
META_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le

_CRC32C = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _CRC32C.append(_c)


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def seal(buf, start, length, at=4):
    """Recomputes the CRC-32C of buf[start:start+length] (its field at start+at zeroed)."""
    if start + length > len(buf):
        return
    buf[start + at:start + at + 4] = b"\0\0\0\0"
    struct.pack_into("<I", buf, start + at, crc32c(bytes(buf[start:start + length])))


def le(data, off, width):
    return int.from_bytes(data[off:off + width], "little")


def build_vhdx_bases(scratch, imgloop, new_base, qemu, qemu_io_writes, imgloop_io_writes,
                     default_writes):
    """qemu-img's default (8 MiB blocks, ZERO new blocks), fixed with allocated blocks,
    1 MiB blocks with NOT_PRESENT new blocks, imgloop's Windows layout (metadata before
    the BAT, required regions, 4 KiB physical sectors), and an imgloop differencing image
    over an imgloop parent (qemu does not open those: imgloop alone is judged on it)."""
    bases = []
    for name, opts in [("default", ""), ("fixed", "subformat=fixed,block_state_zero=off"),
                       ("bs1m", "block_size=1M,block_state_zero=off")]:
        b = new_base(scratch, "vhdx", name, "disk.vhdx")
        qemu(["qemu-img", "create", "-f", "vhdx"] + (["-o", opts] if opts else [])
             + [b["main"], "12M"], b["dir"])
        qemu_io_writes(b["main"], "vhdx", default_writes(12), b["dir"])
        bases.append(b)
    b = new_base(scratch, "vhdx", "imgloop", "disk.vhdx")
    qemu([imgloop, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", b["main"], "12M"],
         b["dir"])
    imgloop_io_writes(imgloop, b["main"], "vhdx", default_writes(12), b["dir"])
    b["made_by"] = "imgloop"
    bases.append(b)
    b = new_base(scratch, "vhdx", "differencing", "disk.vhdx", ro_companions=["parent.vhdx"])
    qemu([imgloop, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", "parent.vhdx", "12M"],
         b["dir"])
    imgloop_io_writes(imgloop, "parent.vhdx", "vhdx", default_writes(12), b["dir"])
    qemu([imgloop, "create", "-q", "-f", "vhdx", "-b", "parent.vhdx", "-F", "vhdx", b["main"]],
         b["dir"])
    imgloop_io_writes(imgloop, b["main"], "vhdx",
                      [("0x5a", 1000, 5000), ("0x5b", 3 * MiB, 1 * MiB), ("0x5c", 8 * MiB, 512)],
                      b["dir"])
    b["made_by"] = "imgloop"
    bases.append(b)
    return bases


def locate_vhdx(path, found_cls):
    """The file identifier, both headers, both region tables, the metadata table, its
    items and the parent locator, the BAT (and the fields of its present entries), the
    log, and the data of some present blocks. Header and region-table fields carry a seal
    (their checksum recomputed after the edit)."""
    with open(path, "rb") as f:
        data = f.read()
    fd = found_cls(data)
    fd.order = "little"
    fd.region("identifier", 0, 8)
    for i, h in enumerate(HEADERS):
        fd.region("header", h, 80)
        for name, off, width in [("sequence", 8, 8), ("file_write", 16, 8), ("data_write", 32, 8),
                                 ("log_guid", 48, 8), ("log_version", 64, 2), ("version", 66, 2),
                                 ("log_length", 68, 4), ("log_offset", 72, 8)]:
            fd.field(f"header{i + 1}.{name}", h + off, width, seal=(h, 4096))
    seqs = [le(data, h + 8, 8) for h in HEADERS]
    cur = HEADERS[1] if seqs[1] > seqs[0] else HEADERS[0]
    log_off, log_len = le(data, cur + 72, 8), le(data, cur + 68, 4)
    fd.region("log", log_off, min(log_len, 64 * KiB))
    bat = meta = bat_len = 0
    for i, t in enumerate(REGIONS):
        fd.region("region_table", t, 16 + 32 * 2)
        fd.field(f"regions{i + 1}.count", t + 8, 4, seal=(t, 64 * KiB))
        for k in range(min(le(data, t + 8, 4), 4)):
            e = t + 16 + 32 * k
            guid = data[e:e + 16]
            tag = "bat" if guid == BAT_GUID else "metadata" if guid == META_GUID else f"r{k}"
            for name, off, width in [("offset", 16, 8), ("length", 24, 4), ("required", 28, 4)]:
                fd.field(f"regions{i + 1}.{tag}.{name}", e + off, width, seal=(t, 64 * KiB))
            if i == 0 and guid == BAT_GUID:
                bat, bat_len = le(data, e + 16, 8), le(data, e + 24, 4)
            elif i == 0 and guid == META_GUID:
                meta = le(data, e + 16, 8)
    if meta:
        fd.region("metadata_table", meta, 32 + 32 * 6)
        fd.field("metadata.count", meta + 10, 2)
        for k in range(min(le(data, meta + 10, 2), 8)):
            e = meta + 32 + 32 * k
            for name, off, width in [("offset", 16, 4), ("length", 20, 4), ("flags", 24, 4)]:
                fd.field(f"metadata[{k}].{name}", e + off, width)
            item, length = meta + le(data, e + 16, 4), le(data, e + 20, 4)
            fd.region("metadata_items", item, min(length, 4096))
            if length in (4, 8):
                fd.field(f"metadata[{k}].value", item, length)
                if length == 8:
                    fd.field(f"metadata[{k}].value.high", item + 4, 4)
            elif length > 20:       # the parent locator: its count and key/value entries
                fd.field("locator.count", item + 18, 2)
                for j in range(min(le(data, item + 18, 2), 6)):
                    kv = item + 20 + 12 * j
                    for name, off, width in [("key_offset", 0, 4), ("value_offset", 4, 4),
                                             ("key_length", 8, 2), ("value_length", 10, 2)]:
                        fd.field(f"locator[{j}].{name}", kv + off, width)
    if bat:
        fd.region("bat", bat, min(bat_len, 4096))
        present = []
        for k in range(min(bat_len // 8, 4096)):
            v = le(data, bat + 8 * k, 8)
            if v or k < 2:
                if len(present) < 24:
                    fd.field(f"bat[{k}]", bat + 8 * k, 8)
                if v & 7 == 6:
                    present.append(v & ~(MiB - 1))
        for p in present[:12]:
            fd.region("data", p, 4096)
    fd.offsets.update({MiB, log_off, bat, meta})
    return fd.result(MiB)
