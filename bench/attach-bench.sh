#!/usr/bin/env bash
# Benchmark: an image as a loop device, attached by `imgloop attach` and by
# qemu-storage-daemon's FUSE export with `losetup` on top, measured with fio
# on the loop device in one run.
#
#   sudo bash bench/attach-bench.sh                  # raw, 1 GiB, 10 s per job
#   sudo FORMAT=qcow2 RUNTIME=20 bash bench/attach-bench.sh
#
# Jobs (fio, libaio, O_DIRECT on the loop device, time based):
#   randread  4 KiB random reads,  queue depth 32
#   randwrite 4 KiB random writes, queue depth 32
#   read      1 MiB sequential reads,  queue depth 8
#   write     1 MiB sequential writes, queue depth 8
#
# Every job runs in two loop modes, the same for both stacks:
#   buffered  the loop device does buffered I/O on the exported file
#             (imgloop attach; losetup)
#   dio       the loop device does direct I/O on the exported file
#             (imgloop attach --direct-io; losetup --direct-io=on)
#
# The two stacks serve two identical, fully written copies of the image (an
# image can be opened read-write by one process only), both attached at the
# same time. Each job runs REPS times per stack, the stacks taking turns
# (and turns at going first), each run after a `sync`, so both see the same
# host page cache conditions; the best run of each stack is reported, in
# MiB/s and IOPS, with the ratio imgloop / qemu-storage-daemon (above 1:
# imgloop is faster).
#
# Environment:
#   RUNTIME   seconds per job (default 10), after 2 s of ramp-up
#   REPS      runs per job and stack (default 2)
#   SIZE      image size in MiB (default 1024)
#   FORMAT    image format, raw or qcow2 (default raw)
#   MODES     loop modes to run (default "buffered dio")
#   BENCH_DIR parent of the scratch directory (default /var/tmp)
#   QSD       qemu-storage-daemon binary (default: from PATH)

set -euo pipefail

RUNTIME=${RUNTIME:-10}
REPS=${REPS:-2}
SIZE=${SIZE:-1024}
FORMAT=${FORMAT:-raw}
MODES=${MODES:-buffered dio}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
QSD=${QSD:-qemu-storage-daemon}

die() {
    echo "attach-bench.sh: error: $*" >&2
    exit 1
}

msg() {
    echo "== $*" >&2
}

[ "$(id -u)" = 0 ] || die "needs root (loop devices and FUSE mounts)"
for v in RUNTIME REPS SIZE; do
    case ${!v} in
        '' | *[!0-9]*) die "$v must be a positive integer" ;;
    esac
done
case $FORMAT in
    raw | qcow2) ;;
    *) die "FORMAT must be raw or qcow2 (got '$FORMAT')" ;;
esac
for tool in fio "$QSD" qemu-img losetup cargo dd awk sync mountpoint; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found in PATH (fio: apt-get install fio; qemu-storage-daemon: qemu-utils)"
done
[ -e /dev/fuse ] || die "/dev/fuse is missing"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
IMGLOOP=$TARGET_DIR/release/imgloop

msg "building imgloop (release)"
(cd "$ROOT" && cargo build --release -q -p imgloop-cli) || die "cargo build failed"
[ -x "$IMGLOOP" ] || die "binary not found at $IMGLOOP"

WORK=$(mktemp -d "$BENCH_DIR/imgloop-attach-bench.XXXXXX")
export IMGLOOP_RUN_DIR=$WORK/run
IL_DEV=
QSD_DEV=
QSD_PID=
cleanup() {
    set +e
    [ -n "$IL_DEV" ] && "$IMGLOOP" detach "$IL_DEV" 2>/dev/null
    stop_qsd
    "$IMGLOOP" detach --all 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

stop_qsd() {
    if [ -n "$QSD_DEV" ]; then
        losetup -d "$QSD_DEV" 2>/dev/null || true
        QSD_DEV=
    fi
    if [ -n "$QSD_PID" ]; then
        # The loop device lets go of the export asynchronously.
        for _ in $(seq 50); do
            kill "$QSD_PID" 2>/dev/null || break
            kill -0 "$QSD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$QSD_PID" 2>/dev/null || true
        wait "$QSD_PID" 2>/dev/null || true
        QSD_PID=
        umount -l "$WORK/qsd.export" 2>/dev/null || true
    fi
}

msg "creating two ${SIZE} MiB $FORMAT images with random data"
dd if=/dev/urandom of="$WORK/data.raw" bs=1M count="$SIZE" status=none
if [ "$FORMAT" = raw ]; then
    mv "$WORK/data.raw" "$WORK/source.img"
else
    qemu-img convert -f raw -O "$FORMAT" "$WORK/data.raw" "$WORK/source.img"
    rm "$WORK/data.raw"
fi
# Both images are made the same way, because how a file was written
# matters: here 4 KiB random writes into a file just written with 1 MiB
# writes (dd) ran 2-5 times slower, through either stack, than into a `cp`
# copy of it (probably the page cache's large folios).
cp "$WORK/source.img" "$WORK/imgloop.img"
cp "$WORK/source.img" "$WORK/qsd.img"
rm "$WORK/source.img"
sync

attach_imgloop() { # MODE
    local extra=()
    [ "$1" = dio ] && extra=(--direct-io)
    IL_DEV=$("$IMGLOOP" attach -f "$FORMAT" "${extra[@]}" "$WORK/imgloop.img")
}

attach_qsd() { # MODE
    : >"$WORK/qsd.export"
    "$QSD" \
        --blockdev "node-name=file0,driver=file,filename=$WORK/qsd.img,aio=threads" \
        --blockdev "node-name=fmt0,driver=$FORMAT,file=file0" \
        --export "type=fuse,id=exp0,node-name=fmt0,mountpoint=$WORK/qsd.export,writable=on" \
        >"$WORK/qsd.log" 2>&1 &
    QSD_PID=$!
    for _ in $(seq 100); do
        mountpoint -q "$WORK/qsd.export" && break
        kill -0 "$QSD_PID" 2>/dev/null || die "qemu-storage-daemon failed: $(cat "$WORK/qsd.log")"
        sleep 0.05
    done
    mountpoint -q "$WORK/qsd.export" || die "qemu-storage-daemon export did not appear"
    local dio=off
    [ "$1" = dio ] && dio=on
    QSD_DEV=$(losetup -f --show --direct-io="$dio" "$WORK/qsd.export")
}

# fio on DEV; prints "MiB/s IOPS" of the job's direction.
run_fio() { # DEV RW BS DEPTH
    local line
    sync
    line=$(fio --name=bench --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --ioengine=libaio --direct=1 --time_based --runtime="$RUNTIME" --ramp_time=2 \
        --size="${SIZE}M" --output-format=terse --terse-version=3 2>/dev/null)
    case $2 in
        *read) echo "$line" | awk -F';' '{ printf "%.1f %d\n", $7 / 1024, $8 }' ;;
        *) echo "$line" | awk -F';' '{ printf "%.1f %d\n", $48 / 1024, $49 }' ;;
    esac
}

msg "imgloop $("$IMGLOOP" --version | awk '{print $2}'), $("$QSD" --version | head -n1), $(fio --version), kernel $(uname -r), $(nproc) CPUs"
printf '\n%-9s %-10s %18s %18s %8s\n' mode job "imgloop MiB/s" "qsd MiB/s" ratio
printf '%-9s %-10s %18s %18s %8s\n' "" "" "(IOPS)" "(IOPS)" ""
for mode in $MODES; do
    case $mode in
        buffered | dio) ;;
        *) die "unknown mode '$mode' (buffered or dio)" ;;
    esac
    attach_imgloop "$mode"
    attach_qsd "$mode"
    for job in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
        set -- $job
        il_bw=0 il_iops=0 q_bw=0 q_iops=0
        for rep in $(seq "$REPS"); do
            # Alternate which stack goes first; keep each stack's best run.
            if [ $((rep % 2)) = 1 ]; then order="il qsd"; else order="qsd il"; fi
            for who in $order; do
                if [ "$who" = il ]; then
                    read -r bw iops < <(run_fio "$IL_DEV" "$1" "$2" "$3")
                    if awk -v a="$bw" -v b="$il_bw" 'BEGIN { exit !(a > b) }'; then
                        il_bw=$bw il_iops=$iops
                    fi
                else
                    read -r bw iops < <(run_fio "$QSD_DEV" "$1" "$2" "$3")
                    if awk -v a="$bw" -v b="$q_bw" 'BEGIN { exit !(a > b) }'; then
                        q_bw=$bw q_iops=$iops
                    fi
                fi
            done
        done
        ratio=$(awk -v a="$il_bw" -v b="$q_bw" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
        printf '%-9s %-10s %18s %18s %8s\n' "$mode" "$1 $2" "$il_bw" "$q_bw" "$ratio"
        printf '%-9s %-10s %18s %18s %8s\n' "" "" "($il_iops)" "($q_iops)" ""
    done
    "$IMGLOOP" detach "$IL_DEV"
    IL_DEV=
    stop_qsd
done

msg "checking both images after the writes"
if [ "$FORMAT" = qcow2 ]; then
    qemu-img check -q -f qcow2 "$WORK/imgloop.img" || die "qemu-img check failed on the imgloop-served image"
fi
msg "done"
