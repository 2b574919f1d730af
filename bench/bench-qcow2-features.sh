#!/usr/bin/env bash
# Benchmark: encrypted (LUKS) qcow2 and internal snapshots, imgloop against
# qemu-img in one run on the same data.
#
#   bash bench/bench-qcow2-features.sh          # 3 timed repetitions per case
#   REPS=5 bash bench/bench-qcow2-features.sh
#
# Cases (one untimed warm-up per tool, then REPS timed runs; the minimum
# wall time is reported; ratio = imgloop / qemu-img):
#   raw->luks    convert a 512 MiB raw image (random data) into a LUKS
#                qcow2 (aes-256-xts-plain64, encrypt.iter-time=10 so PBKDF2
#                does not dominate)
#   luks->raw    convert qemu-img's LUKS copy back to raw (sequential read
#                and decryption)
#   snapshot -c  take an internal snapshot of a 64 GiB qcow2 with 8 GiB of
#                allocated clusters (metadata preallocation), each run on a
#                fresh copy of the image
# Every output is checked with `qemu-img compare` / `qemu-img check`.
#
# Environment: REPS (default 3), BENCH_DIR (default /var/tmp), QEMU_IMG.

set -euo pipefail
REPS=${REPS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
QEMU_IMG=${QEMU_IMG:-qemu-img}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMGLOOP=${CARGO_TARGET_DIR:-$ROOT/target}/release/imgloop

die() { echo "bench-qcow2-features.sh: error: $*" >&2; exit 1; }
msg() { echo "== $*" >&2; }
case $REPS in '' | *[!0-9]*) die "REPS must be a positive integer" ;; esac

msg "building imgloop (release)"
(cd "$ROOT" && cargo build --release -q -p imgloop-cli) || die "cargo build failed"
WORK=$(mktemp -d "$BENCH_DIR/imgloop-bench-features.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
# timed CMD...: prints the wall time of CMD in seconds.
timed() {
    local t0 t1
    t0=$(now)
    "$@" >/dev/null 2>&1 || die "command failed: $*"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}
fmin() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b + 0 < a + 0) print b; else print a }'; }

OBJ="secret,id=sec0,data=bench-passphrase"
LUKS_OPTS="encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
RESULTS=()

SRC=$WORK/src.raw
msg "source: 512 MiB of random data"
dd if=/dev/urandom of="$SRC" bs=1M count=512 status=none

# raw->luks
bq="" bi=""
for r in $(seq 0 "$REPS"); do
    rm -f "$WORK/q.qcow2" "$WORK/i.qcow2"
    t=$(timed "$QEMU_IMG" convert --object "$OBJ" -f raw -O qcow2 -o "$LUKS_OPTS" "$SRC" "$WORK/q.qcow2")
    [ "$r" -gt 0 ] && bq=$(fmin "$bq" "$t")
    t=$(timed "$IMGLOOP" convert --object "$OBJ" -f raw -O qcow2 -o "$LUKS_OPTS" "$SRC" "$WORK/i.qcow2")
    [ "$r" -gt 0 ] && bi=$(fmin "$bi" "$t")
done
IO="driver=qcow2,file.filename=$WORK/i.qcow2,encrypt.key-secret=sec0"
"$QEMU_IMG" compare --object "$OBJ" --image-opts "$IO" "driver=raw,file.filename=$SRC" >/dev/null \
    || die "imgloop's LUKS image differs from the source"
"$QEMU_IMG" check --object "$OBJ" --image-opts "$IO" >/dev/null || die "qemu-img check failed"
RESULTS+=("raw->luks|$bq|$bi")

# luks->raw (qemu-img's LUKS image as the source)
QIO="driver=qcow2,file.filename=$WORK/q.qcow2,encrypt.key-secret=sec0"
bq="" bi=""
for r in $(seq 0 "$REPS"); do
    rm -f "$WORK/q.raw" "$WORK/i.raw"
    t=$(timed "$QEMU_IMG" convert --object "$OBJ" --image-opts "$QIO" -O raw "$WORK/q.raw")
    [ "$r" -gt 0 ] && bq=$(fmin "$bq" "$t")
    t=$(timed "$IMGLOOP" convert --object "$OBJ" --image-opts "$QIO" -O raw "$WORK/i.raw")
    [ "$r" -gt 0 ] && bi=$(fmin "$bi" "$t")
done
cmp -s "$WORK/i.raw" "$SRC" || die "imgloop's decrypted copy differs from the source"
RESULTS+=("luks->raw|$bq|$bi")
rm -f "$WORK"/*.raw "$WORK"/*.qcow2

# snapshot -c on 64 GiB with 8 GiB allocated
BASE=$WORK/base.qcow2
msg "snapshot source: 64 GiB, 8 GiB allocated"
"$QEMU_IMG" create -q -f qcow2 -o preallocation=metadata "$BASE" 8G
"$QEMU_IMG" resize -q "$BASE" 64G
bq="" bi=""
for r in $(seq 0 "$REPS"); do
    cp --sparse=always "$BASE" "$WORK/sq.qcow2"
    cp --sparse=always "$BASE" "$WORK/si.qcow2"
    t=$(timed "$QEMU_IMG" snapshot -c s1 "$WORK/sq.qcow2")
    [ "$r" -gt 0 ] && bq=$(fmin "$bq" "$t")
    t=$(timed "$IMGLOOP" snapshot -c s1 "$WORK/si.qcow2")
    [ "$r" -gt 0 ] && bi=$(fmin "$bi" "$t")
done
"$QEMU_IMG" check "$WORK/si.qcow2" >/dev/null || die "qemu-img check failed after imgloop's snapshot"
"$QEMU_IMG" snapshot -l "$WORK/si.qcow2" | grep -q ' s1 ' || die "qemu-img does not list imgloop's snapshot"
RESULTS+=("snapshot -c 64G/8G|$bq|$bi")

printf '%-22s %12s %12s %10s\n' "case" "qemu-img s" "imgloop s" "ratio"
for row in "${RESULTS[@]}"; do
    IFS='|' read -r name q i <<<"$row"
    awk -v n="$name" -v q="$q" -v i="$i" 'BEGIN { printf "%-22s %12.3f %12.3f %9.2fx\n", n, q, i, i / q }'
done
