#!/usr/bin/env bash
# Benchmark: `imgloop serve` against qemu-nbd (and nbdkit's file plugin
# for raw) serving the same images, driven by fio's nbd engine, in one
# run on the same data.
#
#   bash bench/bench-nbd.sh              # 10 s per fio job
#   RUNTIME=30 bash bench/bench-nbd.sh
#
# Jobs (one fio job each, one NBD connection, time-based):
#   randread   4 KiB random reads, queue depth 32
#   randwrite  4 KiB random writes, queue depth 32 (each server gets its own
#              fresh copy of the image)
#   seqread    1 MiB sequential reads, queue depth 8
# on a 1 GiB raw image of random data and its qcow2 copy (64 KiB
# clusters, fully allocated). Ratios: imgloop / qemu-nbd and imgloop /
# nbdkit (raw only; nbdkit here has no qcow2 filter).
# Then `nbdcopy` reads a sparse 64 GiB qcow2 (64 MiB of data) end to end
# from each server into null: (holes travel as hole chunks).
#
# Environment: RUNTIME (seconds, default 10), BENCH_DIR (default /var/tmp).

set -euo pipefail
RUNTIME=${RUNTIME:-10}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMGLOOP=${CARGO_TARGET_DIR:-$ROOT/target}/release/imgloop

die() { echo "bench-nbd.sh: error: $*" >&2; exit 1; }
msg() { echo "== $*" >&2; }
case $RUNTIME in '' | *[!0-9]*) die "RUNTIME must be a positive integer" ;; esac
for t in qemu-nbd qemu-img fio nbdcopy; do
    command -v "$t" >/dev/null || die "$t is not installed"
done
HAVE_NBDKIT=0
command -v nbdkit >/dev/null && HAVE_NBDKIT=1

msg "building imgloop (release)"
(cd "$ROOT" && cargo build --release -q -p imgloop-cli) || die "cargo build failed"
WORK=$(mktemp -d "$BENCH_DIR/imgloop-bench-nbd.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME FMT IMAGE: starts server NAME on $WORK/NAME.sock.
start() {
    local name=$1 fmt=$2 img=$3 sock=$WORK/$1.sock
    rm -f "$sock"
    case $name in
        imgloop) "$IMGLOOP" serve -t -e 8 -f "$fmt" --socket "$sock" "$img" & ;;
        qemu-nbd) qemu-nbd -t -e 8 -f "$fmt" -k "$sock" "$img" & ;;
        nbdkit) nbdkit -f -U "$sock" file "file=$img" & ;;
    esac
    PIDS+=($!)
    local i=0
    while [ ! -S "$sock" ]; do
        i=$((i + 1))
        [ $i -lt 500 ] || die "$name did not listen"
        sleep 0.02
    done
}
stop_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}

# fio_job NAME RW BS DEPTH: prints IOPS (4k jobs) or MiB/s (seqread).
fio_job() {
    local name=$1 rw=$2 bs=$3 depth=$4
    local out=$WORK/fio.json
    fio --name=b --ioengine=nbd "--uri=nbd+unix:///?socket=$WORK/$name.sock" \
        "--rw=$rw" "--bs=$bs" "--iodepth=$depth" --size=1G --time_based \
        "--runtime=$RUNTIME" --randrepeat=1 --norandommap --output-format=json \
        "--output=$out" >/dev/null || die "fio failed against $name"
    if [ "$rw" = read ]; then
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f" % (j["read"]["bw_bytes"] / 1048576))' <"$out"
    else
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; k="write" if j["write"]["iops"] > 0 else "read"; print("%.0f" % j[k]["iops"])' <"$out"
    fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

msg "images: 1 GiB of random data, raw and qcow2"
dd if=/dev/urandom of="$WORK/disk.raw" bs=1M count=1024 status=none
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"

ROWS=()
for fmt in raw qcow2; do
    servers="imgloop qemu-nbd"
    [ "$fmt" = raw ] && [ $HAVE_NBDKIT = 1 ] && servers="$servers nbdkit"
    declare -A R=()
    for job in "randread randread 4k 32" "randwrite randwrite 4k 32" "seqread read 1M 8"; do
        set -- $job
        for srv in $servers; do
            img=$WORK/disk.$fmt
            if [ "$1" = randwrite ]; then
                img=$WORK/w-$srv.$fmt
                cp --sparse=always "$WORK/disk.$fmt" "$img"
                # The copy's writeback must not land inside the next job.
                sync
            fi
            start "$srv" "$fmt" "$img"
            msg "$fmt $1 via $srv"
            R[$1,$srv]=$(fio_job "$srv" "$2" "$3" "$4")
            stop_all
        done
        unit=IOPS
        [ "$1" = seqread ] && unit=MiB/s
        row=$(printf '%-6s %-10s %-6s imgloop %8s  qemu-nbd %8s  ratio %5s' "$fmt" "$1" "$unit" \
            "${R[$1,imgloop]}" "${R[$1,qemu-nbd]}" "$(ratio "${R[$1,imgloop]}" "${R[$1,qemu-nbd]}")")
        if [ -n "${R[$1,nbdkit]:-}" ]; then
            row="$row  nbdkit $(printf '%8s' "${R[$1,nbdkit]}")  ratio $(ratio "${R[$1,imgloop]}" "${R[$1,nbdkit]}")"
        fi
        ROWS+=("$row")
    done
    unset R
done

msg "sparse 64 GiB qcow2 with 64 MiB of data, nbdcopy to null:"
qemu-img create -q -f qcow2 "$WORK/sparse.qcow2" 64G
qemu-io -f qcow2 -c "write -P 1 1G 32M" -c "write -P 2 40G 32M" "$WORK/sparse.qcow2" >/dev/null
declare -A T=()
for srv in imgloop qemu-nbd; do
    start "$srv" qcow2 "$WORK/sparse.qcow2"
    t0=$(date +%s.%N)
    nbdcopy "nbd+unix:///?socket=$WORK/$srv.sock" null: || die "nbdcopy failed against $srv"
    t1=$(date +%s.%N)
    T[$srv]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    stop_all
done
ROWS+=("$(printf '%-6s %-10s %-6s imgloop %8s  qemu-nbd %8s  ratio %5s' qcow2 nbdcopy-64G seconds \
    "${T[imgloop]}" "${T[qemu-nbd]}" "$(ratio "${T[qemu-nbd]}" "${T[imgloop]}")")")

echo
echo "imgloop serve vs qemu-nbd$([ $HAVE_NBDKIT = 1 ] && echo ' and nbdkit') (fio nbd engine, ${RUNTIME}s per job; ratio > 1: imgloop faster)"
for r in "${ROWS[@]}"; do echo "$r"; done
