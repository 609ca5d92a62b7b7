#!/usr/bin/env bash
# Installs what the tests need, then runs them all.
#
# The embedded mode needs nothing but a Rust toolchain: SQLite is compiled in
# (rusqlite's bundled build) and the event log is tally's own. The tests start
# `tally run` themselves, on 127.0.0.1 port 0, in temporary directories.
#
# The cluster tests run against real services, which scripts/services.sh
# installs when missing (Redis and ClickHouse from apt, tansu with cargo) and
# starts on private loopback ports, with data in a state directory of their
# own that is removed afterwards.
#
# The dashboard and SDK tests need Node.js (with npm) and Chromium, which are
# installed from Debian's packages when missing, and playwright-core from npm.
#
# The fuzz targets run briefly through scripts/fuzz.sh, which installs
# cargo-fuzz with cargo when missing. Formatting and clippy's lints are
# checked first (rustup adds the components when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo is missing; install Rust (https://rustup.rs) and run again" >&2
    exit 1
fi
packages=()
# A C compiler builds the bundled SQLite.
command -v cc >/dev/null || packages+=(build-essential)
command -v node >/dev/null || packages+=(nodejs npm)
[ -x /usr/bin/chromium ] || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
    echo "test.sh: installing ${packages[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi

cargo build --locked --workspace --all-targets

# The code as the project keeps it: formatted, and without clippy's warnings.
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings

# Kafka (tansu), ClickHouse and Redis for the cluster tests; their addresses
# reach the tests as KAFKA_BROKERS, CLICKHOUSE_URL and REDIS_URL.
export TALLY_SERVICES_DIR=${TMPDIR:-/tmp}/tally-test-services
trap 'scripts/services.sh stop' EXIT
set -a
eval "$(scripts/services.sh start)"
set +a

cargo test --locked --workspace

# A short run of each fuzz target (scripts/fuzz.sh), from its seeds.
scripts/fuzz.sh 10

# The cluster as a user starts it: two workers of two threads, two gateways.
export TALLY_BIN=target/debug/tally TALLY_CLUSTER_DIR=${TMPDIR:-/tmp}/tally-test-cluster
trap 'scripts/cluster.sh stop || true; scripts/services.sh stop' EXIT
scripts/cluster.sh start --workers 2 --threads 2 --gateways 2
gateway=$(scripts/cluster.sh status | awk '$1 == "gateway" { print $3; exit }')
if ! curl -sS --fail-with-body -H 'content-type: application/json' -d '{"eventType":"ad_click","dimensions":{"campaignId":"c1"}}' "$gateway/v1/events"; then
    echo; echo "the cluster refused an event; the end of each process's log:"
    tail -n 30 "$TALLY_CLUSTER_DIR"/*.log
    exit 1
fi
echo
scripts/cluster.sh status
scripts/cluster.sh stop

# The SDK (node) and the dashboard (headless Chromium, against target/debug/tally),
# and the SDK's clients across a gateway's death on the cluster.
(cd tests/js && npm ci --no-audit --no-fund --silent)
node --test tests/js/sdk.test.mjs
TALLY_BIN=target/debug/tally node tests/js/retries.mjs
TALLY_BIN=target/debug/tally node tests/js/resume.mjs
TALLY_BIN=target/debug/tally node tests/js/dashboard.mjs
# 8,000 SDK clients through HAProxy (scripts/cluster.sh --lb); a gateway killed.
TALLY_BIN=target/debug/tally node tests/js/failover.mjs
