#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a set time each, with overflow
# checks and debug assertions on and a memory limit, keeping the corpus in
# fuzz/corpus/TARGET (crashes land in fuzz/artifacts/TARGET). Builds with
# the machine's toolchain: the libFuzzer instrumentation flags it needs
# are all stable.
#
#   bash campaigns/fuzz.sh                 # 60 s per target
#   SECONDS_PER_TARGET=600 bash campaigns/fuzz.sh
#   TARGETS="qcow2_fields" bash campaigns/fuzz.sh
#
# Prints one line per target: executions, seconds, and whether it found
# anything; exits 1 when a target crashed, leaked past the memory limit or
# timed out on an input.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-60}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-2048}
TARGET_TRIPLE=${TARGET_TRIPLE:-x86_64-unknown-linux-gnu}
ALL="open_read raw_ops qcow2_fields cow_fields qcow_fields vhdx_fields parallels_fields luks_fields nbd_server"
TARGETS=${TARGETS:-$ALL}

max_len() {
    case $1 in
        open_read) echo 131072 ;;
        raw_ops) echo 4096 ;;
        qcow2_fields) echo 256 ;;
        cow_fields) echo 128 ;;
        qcow_fields) echo 128 ;;
        vhdx_fields) echo 128 ;;
        parallels_fields) echo 128 ;;
        luks_fields) echo 128 ;;
        nbd_server) echo 4096 ;;
        *) echo 4096 ;;
    esac
}

cd "$ROOT/fuzz"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "== building the fuzz targets" >&2
cargo build --release --target "$TARGET_TRIPLE" >&2

failed=0
printf '%-14s %14s %8s  %s\n' target executions seconds result
for t in $TARGETS; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    status=0
    "target/$TARGET_TRIPLE/release/$t" \
        -max_total_time="$SECONDS_PER_TARGET" \
        -max_len="$(max_len "$t")" \
        -rss_limit_mb="$RSS_LIMIT_MB" \
        -timeout=25 \
        -artifact_prefix="artifacts/$t/" \
        "corpus/$t" >"$log" 2>&1 || status=$?
    runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' | tail -n 1 || true)
    secs=$(grep -Eo 'runs in [0-9]+ second' "$log" | grep -Eo '[0-9]+' | tail -n 1 || true)
    if [ "$status" -eq 0 ]; then
        result="no finding"
    else
        result="FINDING (exit $status): $(grep -E 'ERROR|panicked|SUMMARY' "$log" | head -n 2 | tr '\n' ' ')"
        failed=1
        cp "$log" "artifacts/$t/last-run.log"
    fi
    printf '%-14s %14s %8s  %s\n' "$t" "${runs:-?}" "${secs:-?}" "$result"
    rm -f "$log"
done
exit "$failed"
