#!/usr/bin/env bash
# Benchmark: imgloop against qemu-img on a 1 GiB sparse raw image.
#
#   bash bench/bench.sh            # 3 timed repetitions per case
#   REPS=5 bash bench/bench.sh     # more repetitions
#
# Cases (each tool gets one untimed warm-up run, then REPS timed runs; the
# best, i.e. minimum, wall time is reported):
#   convert        convert -f raw -O raw SRC DST
#   convert -S 64k convert -f raw -O raw -S 64k SRC DST
#   convert (qemu -t wb)
#                  as `convert`, but qemu-img gets `-t writeback` so that it
#                  flushes the target at the end like imgloop always does
#   compare        compare -f raw -F raw SRC DST (the same pair for both tools)
#
# Every convert output is checked with `qemu-img compare` against the source,
# and the allocated size (`du -k`) of every output is printed.
#
# Environment:
#   REPS      timed repetitions per case and tool (default 3)
#   BENCH_DIR parent of the scratch directory (default /var/tmp)
#   QEMU_IMG  qemu-img binary (default: qemu-img from PATH)
#   QEMU_IO   qemu-io binary (default: qemu-io from PATH)

set -euo pipefail

REPS=${REPS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}

die() {
    echo "bench.sh: error: $*" >&2
    exit 1
}

msg() {
    echo "== $*" >&2
}

case $REPS in
    '' | *[!0-9]*) die "REPS must be a positive integer (got '$REPS')" ;;
esac
[ "$REPS" -ge 1 ] || die "REPS must be at least 1"

for tool in "$QEMU_IMG" "$QEMU_IO" cargo date awk dd du seq base64 head truncate mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found in PATH"
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
IMGLOOP=$TARGET_DIR/release/imgloop

msg "building imgloop (release)"
(cd "$ROOT" && cargo build --release -p imgloop-cli) || die "cargo build failed"
[ -x "$IMGLOOP" ] || die "binary not found at $IMGLOOP"

[ -d "$BENCH_DIR" ] || die "BENCH_DIR '$BENCH_DIR' is not a directory"
WORK=$(mktemp -d "$BENCH_DIR/imgloop-bench.XXXXXX")
cleanup() {
    rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MIB=$((1 << 20))
SRC=$WORK/src.raw

# ---------------------------------------------------------------------------
# Source image: 1 GiB virtual, about 330 MiB allocated.
#   12 big extents of 25 MiB, one every 80 MiB (starting at +3 MiB):
#     8 of them random bytes (200 MiB), 4 of them text (100 MiB)
#   240 scattered 64 KiB pattern writes (qemu-io, 15 MiB), 4 KiB-misaligned
#     against the 64 KiB grid
#   6 extents of 2 MiB written zeroes (allocated, but all-zero: 12 MiB)
#   everything else: holes
# ---------------------------------------------------------------------------
msg "creating the source image in $WORK"
truncate -s 1G "$SRC"

text_extent=0
for k in $(seq 0 11); do
    off_mib=$((k * 80 + 3))
    if [ $((k % 3)) -eq 2 ]; then
        # Text-like data: numbers and base64 lines, distinct per extent.
        text_extent=$((text_extent + 1))
        # (Built in a file first: cutting a pipe short would SIGPIPE the
        # producers and trip pipefail.)
        {
            seq $((text_extent * 10000000)) $((text_extent * 10000000 + 1500000))
            head -c $((12 * MIB)) /dev/urandom | base64 -w 76
        } >"$WORK/text.tmp"
        dd if="$WORK/text.tmp" of="$SRC" bs=1M count=25 seek="$off_mib" conv=notrunc \
            iflag=fullblock status=none
        rm -f -- "$WORK/text.tmp"
    else
        dd if=/dev/urandom of="$SRC" bs=1M count=25 seek="$off_mib" conv=notrunc \
            iflag=fullblock status=none
    fi
done

qemu_io_args=()
for k in $(seq 0 11); do
    for j in $(seq 0 19); do
        off=$(((k * 80 + 40 + j) * MIB + 12 * 1024))
        pat=$(((k * 20 + j) % 255 + 1))
        qemu_io_args+=(-c "write -P $pat $off 64k")
    done
done
"$QEMU_IO" -f raw "${qemu_io_args[@]}" "$SRC" >/dev/null || die "qemu-io failed"

for k in 0 2 4 6 8 10; do
    dd if=/dev/zero of="$SRC" bs=1M count=2 seek=$((k * 80 + 60)) conv=notrunc status=none
done
sync "$SRC" 2>/dev/null || sync

alloc_kib() {
    du -k -- "$1" | awk '{print $1}'
}

msg "source: $(du -k --apparent-size -- "$SRC" | awk '{print $1}') KiB virtual, $(alloc_kib "$SRC") KiB allocated"

# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------
now() {
    date +%s.%N
}

# elapsed START END -> seconds with millisecond precision
elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'
}

# min A B
fmin() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b + 0 < a + 0) print b; else print a }'
}

# run_timed CMD... : runs CMD, prints the wall time in seconds on stdout.
# The command's own output goes to stderr; a failure aborts the benchmark.
run_timed() {
    local t0 t1
    t0=$(now)
    if ! "$@" >&2; then
        die "command failed: $*"
    fi
    t1=$(now)
    elapsed "$t0" "$t1"
}

RESULTS=()   # "case|qemu|imgloop"
SIZES=()     # "output|KiB"

verify() {
    local out=$1
    if ! "$QEMU_IMG" compare -q -f raw -F raw "$SRC" "$out"; then
        die "verification failed: $out differs from the source"
    fi
}

# bench_convert NAME QEMU_ONLY_ARGS EXTRA_ARGS...
# QEMU_ONLY_ARGS (a word list, may be empty) goes to qemu-img only.
bench_convert() {
    local name=$1
    local -a qonly
    read -r -a qonly <<<"$2"
    shift 2
    local tag=${name//[^A-Za-z0-9]/_}
    local dq=$WORK/dst-qemu-img$tag.raw
    local di=$WORK/dst-imgloop$tag.raw
    local best_q="" best_i="" t r
    msg "case 'convert$name': warm-up"
    rm -f -- "$dq" "$di"
    run_timed "$QEMU_IMG" convert "${qonly[@]}" -f raw -O raw "$@" "$SRC" "$dq" >/dev/null
    run_timed "$IMGLOOP" convert -f raw -O raw "$@" "$SRC" "$di" >/dev/null
    for r in $(seq 1 "$REPS"); do
        rm -f -- "$dq" "$di"
        t=$(run_timed "$QEMU_IMG" convert "${qonly[@]}" -f raw -O raw "$@" "$SRC" "$dq")
        best_q=$(fmin "$best_q" "$t")
        t=$(run_timed "$IMGLOOP" convert -f raw -O raw "$@" "$SRC" "$di")
        best_i=$(fmin "$best_i" "$t")
        msg "case 'convert$name': run $r/$REPS done"
    done
    verify "$dq"
    verify "$di"
    RESULTS+=("convert$name|$best_q|$best_i")
    SIZES+=("qemu-img convert$name|$(alloc_kib "$dq")")
    SIZES+=("imgloop convert$name|$(alloc_kib "$di")")
}

bench_compare() {
    local other=$1
    local best_q="" best_i="" t r
    msg "case 'compare': warm-up"
    run_timed "$QEMU_IMG" compare -f raw -F raw "$SRC" "$other" >/dev/null
    run_timed "$IMGLOOP" compare -f raw -F raw "$SRC" "$other" >/dev/null
    for r in $(seq 1 "$REPS"); do
        t=$(run_timed "$QEMU_IMG" compare -f raw -F raw "$SRC" "$other")
        best_q=$(fmin "$best_q" "$t")
        t=$(run_timed "$IMGLOOP" compare -f raw -F raw "$SRC" "$other")
        best_i=$(fmin "$best_i" "$t")
        msg "case 'compare': run $r/$REPS done"
    done
    RESULTS+=("compare|$best_q|$best_i")
}

bench_convert "" ""
bench_convert " -S 64k" "" -S 64k
# qemu-img convert writes the target with cache=unsafe by default and never
# flushes it; imgloop always ends with fdatasync. This row makes qemu-img
# flush too (-t writeback), to show how much of the gap is that flush.
bench_convert " (qemu -t wb)" "-t writeback"
# Both tools compare the same pair: the source and qemu-img's default copy.
bench_compare "$WORK/dst-qemu-img.raw"

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
echo
echo "imgloop benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(nproc) CPUs, kernel $(uname -r), $BENCH_DIR on $(df -T "$BENCH_DIR" | awk 'NR == 2 {print $2}')"
echo "qemu-img: $("$QEMU_IMG" --version | head -n 1)"
echo "source: 1 GiB virtual, $(alloc_kib "$SRC") KiB allocated; best of $REPS runs (after one warm-up)"
echo
printf '%-22s %12s %12s %10s\n' "case" "qemu-img s" "imgloop s" "ratio"
printf '%-22s %12s %12s %10s\n' "----" "----------" "---------" "-----"
for row in "${RESULTS[@]}"; do
    IFS='|' read -r name q i <<<"$row"
    ratio=$(awk -v q="$q" -v i="$i" 'BEGIN { if (q + 0 > 0) printf "%.2f", i / q; else print "n/a" }')
    printf '%-22s %12s %12s %10s\n' "$name" "$q" "$i" "$ratio"
done
echo
printf '%-32s %12s\n' "output (du -k)" "KiB"
printf '%-32s %12s\n' "source" "$(alloc_kib "$SRC")"
for row in "${SIZES[@]}"; do
    IFS='|' read -r name kib <<<"$row"
    printf '%-32s %12s\n' "$name" "$kib"
done
echo
echo "all convert outputs verified identical to the source with qemu-img compare"
