#!/usr/bin/env bash
# Fuzzes tally's parsers of untrusted input with cargo-fuzz (libFuzzer):
# event bodies (JSON and NDJSON), history query strings, WebSocket
# messages and their topics, cluster.toml, and stored sketches.
#
#   scripts/fuzz.sh [SECONDS] [TARGET…]   each target for SECONDS (default 60)
#
# Each run starts from the seeds in fuzz/corpus/TARGET and keeps what it
# finds in fuzz/work/TARGET, outside version control. A crash stops the
# script with the input that caused it under fuzz/artifacts/TARGET; fix it,
# and add the input to the target's regression test.
#
# cargo-fuzz is installed when missing. It needs compiler flags of a
# nightly toolchain; on a stable one RUSTC_BOOTSTRAP=1 allows them.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(events records query subscribe config sketches)

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
    mkdir -p "fuzz/work/$target"
    echo "fuzz.sh: $target for ${seconds}s"
    log="fuzz/work/$target.log"
    if ! cargo fuzz run "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz.sh: $target failed; the input is under fuzz/artifacts/$target, the log in $log" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz.sh: $target ran ${runs:-?} inputs in ${seconds}s without a crash"
done
