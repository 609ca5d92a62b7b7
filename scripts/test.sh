#!/usr/bin/env bash
# Installs what the tests need, then runs them all.
#
# The embedded mode needs nothing but a Rust toolchain: SQLite is compiled in
# (rusqlite's bundled build) and the event log is tally's own. The tests start
# `tally run` themselves, on 127.0.0.1 port 0, in temporary directories.
#
# The dashboard and SDK tests need Node.js (with npm) and Chromium, which are
# installed from Debian's packages when missing, and playwright-core from npm.
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
cargo test --locked --workspace

# The SDK (node) and the dashboard (headless Chromium, against target/debug/tally).
(cd tests/js && npm ci --no-audit --no-fund --silent)
node --test tests/js/sdk.test.mjs
TALLY_BIN=target/debug/tally node tests/js/dashboard.mjs
