#!/usr/bin/env bash
# Fuzzes the HTTP API of a running `tally run` from its own OpenAPI
# document (GET /v1/openapi.json) with schemathesis, which is installed
# from PyPI when missing. Every request it makes, with an admin key and
# without, must get an answer the document allows, none of them a 5xx, each
# within 5 s, and the server must still answer /healthz at the end.
#
#   scripts/fuzz-api.sh [EXAMPLES]   examples per operation (default 200)
#
# It uses target/debug/tally (or TALLY_BIN), building it when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

examples=${1:-200}
bin=${TALLY_BIN:-target/debug/tally}
[ -x "$bin" ] || cargo build --locked --bin tally
command -v schemathesis >/dev/null || python3 -m pip install --quiet schemathesis

dir=$(mktemp -d)
admin=ak_fuzz_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
cp cluster.toml "$dir/cluster.toml"
cat >>"$dir/cluster.toml" <<TOML

[[auth.keys]]
name = "fuzz"
secret = "$admin"
scopes = ["admin"]
TOML
"$bin" run --listen 127.0.0.1:0 --data-dir "$dir/data" --config "$dir/cluster.toml" >"$dir/stdout" 2>"$dir/stderr" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
    url=$(sed -n 's/^listening on //p' "$dir/stdout")
    [ -n "$url" ] && break
    sleep 0.1
done
[ -n "$url" ] || { cat "$dir/stderr" >&2; echo "fuzz-api.sh: tally did not start" >&2; exit 1; }

status=0
total=0
for with_key in yes no; do
    headers=()
    if [ "$with_key" = yes ]; then
        headers=(-H "Authorization: Bearer $admin")
        echo "fuzz-api.sh: with an admin key, $examples examples per operation"
    else
        echo "fuzz-api.sh: without a key, $examples examples per operation"
    fi
    # From the temporary directory, where schemathesis keeps its cache.
    (cd "$dir" && schemathesis run "$url/v1/openapi.json" --url "$url" "${headers[@]}" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --max-response-time 5 --request-timeout 10 -n "$examples" --no-color) >"$dir/run.log" 2>&1 || status=1
    grep -E 'generated|failed|Server error|not_a_server_error|conformance' "$dir/run.log" || true
    [ "$status" -eq 0 ] || tail -n 60 "$dir/run.log" >&2
    cases=$(sed -n 's/^ *\([0-9][0-9]*\) generated.*/\1/p' "$dir/run.log" | head -n 1)
    total=$((total + ${cases:-0}))
done
echo "fuzz-api.sh: $total test cases in all"
curl -sf "$url/healthz" >/dev/null || { echo "fuzz-api.sh: tally stopped answering" >&2; exit 1; }
kill -0 "$pid" || { echo "fuzz-api.sh: tally exited" >&2; exit 1; }
exit "$status"
