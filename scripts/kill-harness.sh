#!/usr/bin/env bash
# The kill harness at benchmark scale: trials of TALLY_HARNESS_EVENTS events
# (default 1,000,000), each with TALLY_HARNESS_KILLS SIGKILLs (default 20) of
# `tally run` at random moments, checked against a batch reference and a
# failure-free run. Prints how many trials passed.
#
#   scripts/kill-harness.sh [TRIALS] [FIRST_SEED]   # default 5 trials, seeds 1..5
set -uo pipefail
cd "$(dirname "$0")/.."

trials=${1:-5}
first=${2:-1}
export TALLY_HARNESS_EVENTS=${TALLY_HARNESS_EVENTS:-1000000}
export TALLY_HARNESS_KILLS=${TALLY_HARNESS_KILLS:-20}
# A failed trial shows tally's own errors, not the test's backtrace.
export RUST_BACKTRACE=0
test_name=crash::kill_9_at_random_moments_stores_exactly_the_failure_free_results

cargo build --release --locked --bin tally --test integration || exit 1
passed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for seed in $(seq "$first" $((first + trials - 1))); do
    echo "trial with seed $seed: $TALLY_HARNESS_EVENTS events, $TALLY_HARNESS_KILLS kills"
    if TALLY_HARNESS_SEED=$seed cargo test --release --locked --test integration "$test_name" -- --exact --nocapture >"$log" 2>&1; then
        passed=$((passed + 1))
        grep -E "kill harness:|^test result" "$log"
    else
        # The whole end of a failed trial: tally's own errors come before the panic.
        tail -n 60 "$log"
    fi
done
echo "kill harness: $passed of $trials trials passed"
[ "$passed" -eq "$trials" ]
