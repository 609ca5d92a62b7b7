#!/usr/bin/env bash
# The kill harness at benchmark scale: trials of TALLY_HARNESS_EVENTS events
# (default 1,000,000), each with TALLY_HARNESS_KILLS SIGKILLs (default 20) of
# `tally run` at random moments, checked against a batch reference and a
# failure-free run. Prints how many trials passed.
#
# With --cluster, the same on a cluster of 2 worker processes of 2 threads
# and 2 gateways on the services of scripts/services.sh (started if
# KAFKA_BROKERS, CLICKHOUSE_URL and REDIS_URL are not all set, and stopped
# after): TALLY_CLUSTER_HARNESS_EVENTS events (default 200,000) and
# TALLY_CLUSTER_HARNESS_KILLS SIGKILLs of a worker process (default 20), and
# one of a gateway, per trial.
#
#   scripts/kill-harness.sh [--cluster] [TRIALS] [FIRST_SEED]   # default 5 trials, seeds 1..5
set -uo pipefail
cd "$(dirname "$0")/.."

started_services=
test_name=crash::kill_9_at_random_moments_stores_exactly_the_failure_free_results
if [ "${1:-}" = --cluster ]; then
    shift
    test_name=cluster::killed_worker_processes_and_a_killed_gateway_store_exactly_the_batch_results
    export TALLY_CLUSTER_HARNESS_EVENTS=${TALLY_CLUSTER_HARNESS_EVENTS:-200000}
    export TALLY_CLUSTER_HARNESS_KILLS=${TALLY_CLUSTER_HARNESS_KILLS:-20}
    if [ -z "${KAFKA_BROKERS:-}" ] || [ -z "${CLICKHOUSE_URL:-}" ] || [ -z "${REDIS_URL:-}" ]; then
        export TALLY_SERVICES_DIR=${TMPDIR:-/tmp}/tally-harness-services
        started_services=yes
        trap 'scripts/services.sh stop' EXIT
        eval "$(scripts/services.sh start)" || exit 1
        export KAFKA_BROKERS CLICKHOUSE_URL REDIS_URL
    fi
fi
trials=${1:-5}
first=${2:-1}
export TALLY_HARNESS_EVENTS=${TALLY_HARNESS_EVENTS:-1000000}
export TALLY_HARNESS_KILLS=${TALLY_HARNESS_KILLS:-20}
# A failed trial shows tally's own errors, not the test's backtrace.
export RUST_BACKTRACE=0

cargo build --release --locked --bin tally --test integration || exit 1
passed=0
log=$(mktemp)
trap 'rm -f "$log"; [ -z "$started_services" ] || scripts/services.sh stop' EXIT
for seed in $(seq "$first" $((first + trials - 1))); do
    echo "trial with seed $seed"
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
