#!/usr/bin/env bash
# Installs what the tests need, then runs them all.
#
# The embedded mode needs nothing but a Rust toolchain: SQLite is compiled in
# (rusqlite's bundled build) and the event log is tally's own. The tests start
# `tally run` themselves, on 127.0.0.1 port 0, in temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo is missing; install Rust (https://rustup.rs) and run again" >&2
    exit 1
fi
# A C compiler builds the bundled SQLite.
if ! command -v cc >/dev/null; then
    echo "test.sh: installing a C compiler for the bundled SQLite"
    apt-get update -qq && apt-get install -y -qq build-essential
fi

cargo build --locked --workspace --all-targets
cargo test --locked --workspace
