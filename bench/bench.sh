#!/usr/bin/env bash
# Benchmark: imgloop against qemu-img on a 1 GiB sparse raw image.
#
#   bash bench/bench.sh            # 3 timed repetitions per case
#   REPS=5 bash bench/bench.sh     # more repetitions
#
# Cases (each tool gets one untimed warm-up run, then REPS timed runs; the
# best, i.e. minimum, wall time is reported; ratio = imgloop / qemu-img):
#   raw->raw, raw->raw -S 64k, raw->raw -t writeback
#   raw->qcow2, qcow2->raw (the qcow2 source is qemu-img's copy of SRC)
#   raw->qcow2 -c zlib, raw->qcow2 -c zstd
#   compare raw raw, compare qcow2 raw
#   raw->vhdx, vhdx->raw (the vhdx source is qemu-img's copy of SRC),
#   compare vhdx raw
#   raw->parallels, parallels->raw (the source: qemu-img's copy of SRC)
#   map, convert -O raw and compare of a 4 TiB qcow2 holding 2 MiB of data
#   map, convert -O raw of a 256 GiB dynamic vhdx holding 2 MiB of data
# plus random 4 KiB reads through the library on 1 and 2 threads on a fully
# allocated 512 MiB qcow2 and dynamic vhdx against the raw file with the
# same bytes (imgloop only).
#
# Every convert output is checked with `qemu-img compare` against the source
# (and `qemu-img check` for qcow2), and the allocated size (`du -k`) of every
# output is printed.
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

# verify FMT OUT: OUT (format FMT) must read identical to the source.
verify() {
    if ! "$QEMU_IMG" compare -q -f raw -F "$1" "$SRC" "$2"; then
        die "verification failed: $2 differs from the source"
    fi
}

# bench_convert NAME IN_FMT IN OUT_FMT QEMU_ONLY_ARGS ARGS...
# Times `convert -f IN_FMT -O OUT_FMT ARGS IN DST` for both tools.
# QEMU_ONLY_ARGS (a word list, may be empty) goes to qemu-img only.
bench_convert() {
    local name=$1 in_fmt=$2 in=$3 out_fmt=$4
    local -a qonly
    read -r -a qonly <<<"$5"
    shift 5
    local tag=${name//[^A-Za-z0-9]/_}
    local dq=$WORK/dst-qemu-img_$tag.$out_fmt
    local di=$WORK/dst-imgloop_$tag.$out_fmt
    local best_q="" best_i="" t r
    msg "case '$name': warm-up"
    rm -f -- "$dq" "$di"
    run_timed "$QEMU_IMG" convert "${qonly[@]}" -f "$in_fmt" -O "$out_fmt" "$@" "$in" "$dq" >/dev/null
    run_timed "$IMGLOOP" convert -f "$in_fmt" -O "$out_fmt" "$@" "$in" "$di" >/dev/null
    for r in $(seq 1 "$REPS"); do
        rm -f -- "$dq" "$di"
        t=$(run_timed "$QEMU_IMG" convert "${qonly[@]}" -f "$in_fmt" -O "$out_fmt" "$@" "$in" "$dq")
        best_q=$(fmin "$best_q" "$t")
        t=$(run_timed "$IMGLOOP" convert -f "$in_fmt" -O "$out_fmt" "$@" "$in" "$di")
        best_i=$(fmin "$best_i" "$t")
        msg "case '$name': run $r/$REPS done"
    done
    verify "$out_fmt" "$dq"
    verify "$out_fmt" "$di"
    if [ "$out_fmt" = qcow2 ] || [ "$out_fmt" = vhdx ] || [ "$out_fmt" = parallels ]; then
        "$QEMU_IMG" check -q -f "$out_fmt" "$di" || die "qemu-img check failed on $di"
    fi
    RESULTS+=("$name|$best_q|$best_i")
    SIZES+=("qemu-img $name|$(alloc_kib "$dq")")
    SIZES+=("imgloop $name|$(alloc_kib "$di")")
}

# bench_compare NAME FMT_A A FMT_B B
bench_compare() {
    local name=$1 fa=$2 a=$3 fb=$4 b=$5
    local best_q="" best_i="" t r
    msg "case '$name': warm-up"
    run_timed "$QEMU_IMG" compare -f "$fa" -F "$fb" "$a" "$b" >/dev/null
    run_timed "$IMGLOOP" compare -f "$fa" -F "$fb" "$a" "$b" >/dev/null
    for r in $(seq 1 "$REPS"); do
        t=$(run_timed "$QEMU_IMG" compare -f "$fa" -F "$fb" "$a" "$b")
        best_q=$(fmin "$best_q" "$t")
        t=$(run_timed "$IMGLOOP" compare -f "$fa" -F "$fb" "$a" "$b")
        best_i=$(fmin "$best_i" "$t")
        msg "case '$name': run $r/$REPS done"
    done
    RESULTS+=("$name|$best_q|$best_i")
}

# bench_same NAME RM ARGS...: times `qemu-img ARGS` and `imgloop ARGS`
# (the same arguments), removing the file RM (if not empty) before each run.
bench_same() {
    local name=$1 rm_path=$2
    shift 2
    local best_q="" best_i="" t r
    msg "case '$name': warm-up"
    [ -z "$rm_path" ] || rm -f -- "$rm_path"
    run_timed "$QEMU_IMG" "$@" >/dev/null
    [ -z "$rm_path" ] || rm -f -- "$rm_path"
    run_timed "$IMGLOOP" "$@" >/dev/null
    for r in $(seq 1 "$REPS"); do
        [ -z "$rm_path" ] || rm -f -- "$rm_path"
        t=$(run_timed "$QEMU_IMG" "$@")
        best_q=$(fmin "$best_q" "$t")
        [ -z "$rm_path" ] || rm -f -- "$rm_path"
        t=$(run_timed "$IMGLOOP" "$@")
        best_i=$(fmin "$best_i" "$t")
        msg "case '$name': run $r/$REPS done"
    done
    RESULTS+=("$name|$best_q|$best_i")
}

bench_convert "raw->raw" raw "$SRC" raw ""
bench_convert "raw->raw -S 64k" raw "$SRC" raw "" -S 64k
bench_convert "raw->raw -t writeback" raw "$SRC" raw "" -t writeback
bench_convert "raw->qcow2" raw "$SRC" qcow2 ""
# A qcow2 copy of the source made by qemu-img is the input of qcow2->raw.
QSRC=$WORK/src.qcow2
"$QEMU_IMG" convert -f raw -O qcow2 "$SRC" "$QSRC"
bench_convert "qcow2->raw" qcow2 "$QSRC" raw ""
bench_convert "raw->qcow2 -c zlib" raw "$SRC" qcow2 "" -c
bench_convert "raw->qcow2 -c zstd" raw "$SRC" qcow2 "" -c -o compression_type=zstd
bench_compare "compare raw raw" raw "$SRC" raw "$WORK/dst-qemu-img_raw__raw.raw"
bench_compare "compare qcow2 raw" qcow2 "$QSRC" raw "$SRC"
bench_convert "raw->vhdx" raw "$SRC" vhdx ""
VSRC=$WORK/src.vhdx
"$QEMU_IMG" convert -f raw -O vhdx "$SRC" "$VSRC"
bench_convert "vhdx->raw" vhdx "$VSRC" raw ""
bench_compare "compare vhdx raw" vhdx "$VSRC" raw "$SRC"
bench_convert "raw->parallels" raw "$SRC" parallels ""
PSRC=$WORK/src.hds
"$QEMU_IMG" convert -f raw -O parallels "$SRC" "$PSRC"
bench_convert "parallels->raw" parallels "$PSRC" raw ""

# A 4 TiB qcow2 holding 2 MiB of data: walking it must cost what is
# allocated, not the virtual size.
SPARSE=$WORK/sparse.qcow2
SPARSE_RAW=$WORK/sparse.raw
"$QEMU_IMG" create -q -f qcow2 "$SPARSE" 4T
"$QEMU_IO" -f qcow2 -c "write -P 0x5a 0 1M" -c "write -P 0x6b 3T 1M" "$SPARSE" >/dev/null
"$QEMU_IMG" convert -f qcow2 -O raw "$SPARSE" "$SPARSE_RAW"
bench_same "map 4T sparse qcow2" "" map -f qcow2 "$SPARSE"
bench_same "convert 4T sparse" "$WORK/sparse-out.raw" convert -f qcow2 -O raw "$SPARSE" "$WORK/sparse-out.raw"
"$QEMU_IMG" compare -q -f qcow2 -F raw "$SPARSE" "$WORK/sparse-out.raw" \
    || die "verification failed: the sparse convert differs"
bench_same "compare 4T sparse" "" compare -f qcow2 -F raw "$SPARSE" "$SPARSE_RAW"
rm -f -- "$SPARSE_RAW" "$WORK/sparse-out.raw"

# A 256 GiB dynamic vhdx holding 2 MiB of data (qemu-img has no block
# status for vhdx: it reads every block of the virtual disk).
VSPARSE=$WORK/sparse.vhdx
"$QEMU_IMG" create -q -f vhdx "$VSPARSE" 256G
"$QEMU_IO" -f vhdx -c "write -P 0x5a 0 1M" -c "write -P 0x6b 200G 1M" "$VSPARSE" >/dev/null
bench_same "map 256G sparse vhdx" "" map --output=json -f vhdx "$VSPARSE"
bench_same "convert 256G sparse vhdx" "$WORK/vsparse-out.raw" convert -f vhdx -O raw "$VSPARSE" "$WORK/vsparse-out.raw"
rm -f -- "$WORK/vsparse-out.raw"

# Random 4 KiB reads through the library: a fully allocated qcow2 against
# the raw file holding the same bytes (imgloop only; ratio qcow2/raw time).
msg "random reads: building the example"
(cd "$ROOT" && cargo build --release -q -p imgloop --example randread) || die "cargo build failed"
RANDREAD=$TARGET_DIR/release/examples/randread
FULL=$WORK/full.raw
dd if=/dev/urandom of="$FULL" bs=1M count=512 status=none
"$QEMU_IMG" convert -S 0 -f raw -O qcow2 "$FULL" "$WORK/full.qcow2"
"$QEMU_IMG" convert -f raw -O vhdx "$FULL" "$WORK/full.vhdx"
# rr_best IMAGE FORMAT THREADS
rr_best() {
    local best="" t r
    for r in $(seq 1 "$REPS"); do
        t=$("$RANDREAD" "$1" "$2" 400000 "$3" | awk '{print $4}')
        best=$(fmin "$best" "$t")
    done
    echo "$best"
}
"$RANDREAD" "$FULL" raw 100000 1 >/dev/null
"$RANDREAD" "$WORK/full.qcow2" qcow2 100000 1 >/dev/null
RR_RAW=$(rr_best "$FULL" raw 1)
RR_QCOW2=$(rr_best "$WORK/full.qcow2" qcow2 1)
RR_RAW2=$(rr_best "$FULL" raw 2)
RR_QCOW22=$(rr_best "$WORK/full.qcow2" qcow2 2)
"$RANDREAD" "$WORK/full.vhdx" vhdx 100000 1 >/dev/null
RR_VHDX=$(rr_best "$WORK/full.vhdx" vhdx 1)
RR_VHDX2=$(rr_best "$WORK/full.vhdx" vhdx 2)

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
echo
echo "random 4 KiB reads through the library (400000 reads, 512 MiB fully allocated):"
printf '%-22s %12s %12s\n' "" "1 thread s" "2 threads s"
printf '%-22s %12s %12s\n' "raw file" "$RR_RAW" "$RR_RAW2"
printf '%-22s %12s %12s\n' "qcow2" "$RR_QCOW2" "$RR_QCOW22"
printf '%-22s %12s %12s\n' "vhdx (dynamic)" "$RR_VHDX" "$RR_VHDX2"
awk -v r="$RR_RAW" -v q="$RR_QCOW2" -v r2="$RR_RAW2" -v q2="$RR_QCOW22" \
    'BEGIN { printf "qcow2 speed vs raw: %.0f%% (1 thread), %.0f%% (2 threads)\n", 100 * r / q, 100 * r2 / q2 }'
awk -v r="$RR_RAW" -v q="$RR_VHDX" -v r2="$RR_RAW2" -v q2="$RR_VHDX2" \
    'BEGIN { printf "vhdx speed vs raw: %.0f%% (1 thread), %.0f%% (2 threads)\n", 100 * r / q, 100 * r2 / q2 }'
