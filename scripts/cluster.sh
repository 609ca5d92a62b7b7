#!/usr/bin/env bash
# Runs a whole tally cluster on this machine: N `tally worker` processes, which
# form one timely computation, and M `tally gateway` processes in front of
# them, against the services that scripts/services.sh starts.
#
#   scripts/cluster.sh start [--workers N] [--threads T] [--gateways M] [--config BASE.toml] [--lb]
#       Defaults: 2 workers of 2 threads each, 2 gateways, ./cluster.toml.
#       Starts the services (scripts/services.sh start) unless KAFKA_BROKERS,
#       CLICKHOUSE_URL and REDIS_URL are all set already, writes BASE with a
#       [cluster] section of free loopback ports to the run directory, starts
#       the processes there and prints their status once every gateway is
#       listening. With --lb, HAProxy (installed from Debian's packages when
#       missing) also runs in front of the gateways, as a TCP proxy for HTTP
#       and WebSocket alike that sends new connections only to gateways whose
#       /readyz answers 200; its configuration is haproxy.cfg in the run
#       directory.
#   scripts/cluster.sh status
#       One line per process (the load balancer's first); exits non-zero if
#       any has exited.
#   scripts/cluster.sh stop
#       Stops the load balancer, the gateways, then the workers. The services
#       keep running: scripts/services.sh stop stops them.
#
# The binary is ${TALLY_BIN:-target/release/tally}, built when missing. The run
# directory is ${TALLY_CLUSTER_DIR:-${TMPDIR:-/tmp}/tally-cluster}: tally.toml,
# and KIND-I.pid and KIND-I.log for each process. The processes run in it, so
# relative paths in the configuration (such as storage.data_dir) land there.
set -euo pipefail

# shellcheck source=scripts/common.sh
. "$(dirname "$0")/common.sh"

root=$(cd "$(dirname "$0")/.." && pwd)
run=$(realpath -m "${TALLY_CLUSTER_DIR:-${TMPDIR:-/tmp}/tally-cluster}")
timeout=60

log() { echo "cluster.sh: $*" >&2; }

usage() {
    help >&2
    exit 2
}

# The pid files of one kind of process, in order: KIND-0.pid, KIND-1.pid, …
pid_files() {
    local i=0
    while [ -f "$run/$1-$i.pid" ]; do
        echo "$run/$1-$i.pid"
        i=$((i + 1))
    done
}

# Starts `tally ARGS…` as process NAME (KIND-I) in the background, in its own
# session, with its output in NAME.log (without terminal colour codes).
launch() {
    local name=$1
    shift
    (cd "$run" && NO_COLOR=1 exec setsid "$bin" "$@" </dev/null >"$run/$name.log" 2>&1) &
    echo $! >"$run/$name.pid"
}

# The address a gateway printed on start-up, if it has yet.
gateway_url() {
    grep -m1 -o 'listening on http://[^[:space:]]*' "$run/gateway-$1.log" 2>/dev/null | cut -d' ' -f3 || true
}

# Where a worker serves its /metrics, once it has said; nothing before.
worker_url() {
    grep -m1 -o 'metrics on http://[^[:space:]]*' "$run/worker-$1.log" 2>/dev/null | cut -d' ' -f3 || true
}

status() {
    local file name url pid line dead=0
    if [ ! -f "$run/worker-0.pid" ]; then
        log "no cluster is running in $run"
        return 1
    fi
    if [ -f "$run/lb.pid" ]; then
        pid=$(cat "$run/lb.pid")
        line="lb http://127.0.0.1:$(cat "$run/lb.port") pid $pid"
        if alive "$pid"; then echo "$line"; else echo "$line (exited)"; dead=1; fi
    fi
    for file in $(pid_files gateway) $(pid_files worker); do
        name=$(basename "$file" .pid)
        pid=$(cat "$file")
        if [[ $name == gateway-* ]]; then
            url=$(gateway_url "${name#gateway-}")
            line="gateway ${name#gateway-} ${url:-(no address)} pid $pid"
        else
            url=$(worker_url "${name#worker-}")
            line="worker ${name#worker-} ${url:+$url/metrics }pid $pid"
        fi
        if alive "$pid"; then
            echo "$line"
        else
            echo "$line (exited)"
            dead=1
        fi
    done
    return $dead
}

# Sends SIGTERM to every process of KIND, waits up to 10 s for them to exit,
# then sends SIGKILL to those left.
stop_kind() {
    local file pid pids=()
    for file in $(pid_files "$1"); do
        pid=$(cat "$file")
        alive "$pid" && pids+=("$pid")
        rm -f "$file"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    log "stopping ${#pids[@]} $1 process(es)"
    terminate "${pids[@]}"
}

stop() {
    if [ -f "$run/lb.pid" ]; then
        local pid
        pid=$(cat "$run/lb.pid")
        rm -f "$run/lb.pid" "$run/lb.port"
        if alive "$pid"; then
            log "stopping the load balancer"
            terminate "$pid"
        fi
    fi
    stop_kind gateway
    stop_kind worker
}

# Starts HAProxy in front of the gateways, on a free loopback port. L4: it
# passes each TCP connection through whole, so a WebSocket is one long
# connection to one gateway. Health checks ask each gateway's /readyz every
# second; two failures take it out, two successes put it back. When a
# gateway dies, its connections close and its clients reconnect through the
# proxy to the others.
start_lb() {
    local gateways=$1 port i url
    if ! command -v haproxy >/dev/null; then
        log "installing haproxy from Debian's packages"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >&2
    fi
    port=$(free_ports 1)
    {
        echo "# Written by scripts/cluster.sh: HAProxy in front of the gateways."
        echo "global"
        echo "    # Two descriptors per connection (client and gateway), within the"
        echo "    # open-file limit of $(ulimit -n), less some for listeners and checks."
        echo "    maxconn $((($(ulimit -n) - 100) / 2))"
        echo "defaults"
        echo "    mode tcp"
        echo "    timeout connect 5s"
        echo "    # A connection refused by a gateway that has just died is tried"
        echo "    # again at once on another (on the same one, HAProxy would wait"
        echo "    # a second first), before the health checks have seen it go."
        echo "    retries 2"
        echo "    option redispatch 1"
        echo "    # A WebSocket may stay quiet between the server's pings."
        echo "    timeout client 1h"
        echo "    timeout server 1h"
        echo "frontend tally"
        echo "    bind 127.0.0.1:$port"
        echo "    default_backend gateways"
        echo "backend gateways"
        echo "    balance leastconn"
        echo "    option httpchk GET /readyz"
        echo "    http-check expect status 200"
        echo "    # A refused connection takes a gateway out at once; two passed"
        echo "    # checks put it back."
        for ((i = 0; i < gateways; i++)); do
            url=$(gateway_url "$i")
            echo "    server gateway-$i ${url#http://} check inter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down"
        done
    } >"$run/haproxy.cfg"
    haproxy -c -q -f "$run/haproxy.cfg" || { log "haproxy refuses $run/haproxy.cfg"; stop; exit 1; }
    (cd "$run" && exec setsid haproxy -db -f "$run/haproxy.cfg" </dev/null >"$run/lb.log" 2>&1) &
    echo $! >"$run/lb.pid"
    echo "$port" >"$run/lb.port"
    local deadline=$((SECONDS + timeout))
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
        if ! alive "$(cat "$run/lb.pid")" || [ "$SECONDS" -ge "$deadline" ]; then
            log "the load balancer did not start; the end of $run/lb.log:"
            tail -n 30 "$run/lb.log" >&2 || true
            stop
            exit 1
        fi
        sleep 0.2
    done
}

start() {
    local workers=2 threads=2 gateways=2 base=$root/cluster.toml file lb=
    while [ $# -gt 0 ]; do
        if [ "$1" = --lb ]; then
            lb=yes
            shift
            continue
        fi
        [ $# -ge 2 ] || usage
        case $1 in
            --workers) workers=$2 ;;
            --threads) threads=$2 ;;
            --gateways) gateways=$2 ;;
            --config) base=$(realpath "$2") ;;
            *) usage ;;
        esac
        shift 2
    done
    if [ -n "$lb" ] && [ "$gateways" -lt 1 ]; then
        log "--lb needs a gateway"
        exit 2
    fi
    [[ $workers =~ ^[1-9][0-9]*$ && $threads =~ ^[0-9]+$ && $gateways =~ ^[0-9]+$ ]] || usage
    [ -f "$base" ] || { log "no configuration file $base"; exit 1; }

    mkdir -p "$run"
    for file in $(pid_files gateway) $(pid_files worker) $(ls "$run/lb.pid" 2>/dev/null); do
        if alive "$(cat "$file")"; then
            log "a cluster is already running in $run; scripts/cluster.sh stop stops it"
            status || true
            exit 1
        fi
    done
    rm -f "$run"/gateway-*.pid "$run"/worker-*.pid "$run"/gateway-*.log "$run"/worker-*.log "$run"/lb.*

    bin=$(realpath -m "${TALLY_BIN:-$root/target/release/tally}")
    if [ ! -x "$bin" ]; then
        [ -z "${TALLY_BIN:-}" ] || { log "TALLY_BIN=$TALLY_BIN does not exist"; exit 1; }
        log "building $bin"
        (cd "$root" && cargo build --release --locked) >&2
    fi

    # The services' addresses, from the environment or from services.sh.
    if [ -z "${KAFKA_BROKERS:-}" ] || [ -z "${CLICKHOUSE_URL:-}" ] || [ -z "${REDIS_URL:-}" ]; then
        local lines name value
        lines=$("$root/scripts/services.sh" start)
        while IFS='=' read -r name value; do
            case $name in
                KAFKA_BROKERS | CLICKHOUSE_URL | REDIS_URL) printf -v "$name" '%s' "$value" ;;
            esac
        done <<<"$lines"
    fi
    export TALLY__KAFKA__BROKERS=$KAFKA_BROKERS
    export TALLY__CLICKHOUSE__URL=$CLICKHOUSE_URL
    export TALLY__REDIS__URL=$REDIS_URL

    # Checkpoints name offsets in one Kafka: against other services (such
    # as ones started afresh by services.sh), they are another cluster's.
    local services="$KAFKA_BROKERS $CLICKHOUSE_URL $REDIS_URL"
    if [ -d "$run/data" ] && [ "$(cat "$run/services" 2>/dev/null)" != "$services" ]; then
        log "the services are not the ones this cluster last ran on; deleting its checkpoints in $run/data"
        rm -rf "$run/data"
    fi
    echo "$services" >"$run/services"

    # The base configuration without its [cluster] section, then ours.
    local config=$run/tally.toml addresses i
    # shellcheck disable=SC2046 # one argument per port
    addresses=$(printf ', "127.0.0.1:%s"' $(free_ports "$workers"))
    {
        echo "# Written by scripts/cluster.sh from $base. The services' addresses"
        echo "# come from the environment and override this file:"
        echo "#   TALLY__KAFKA__BROKERS=$KAFKA_BROKERS"
        echo "#   TALLY__CLICKHOUSE__URL=$CLICKHOUSE_URL"
        echo "#   TALLY__REDIS__URL=$REDIS_URL"
        echo
        awk '/^[[:space:]]*\[/ { skip = /^[[:space:]]*\[cluster\]/ } !skip' "$base"
        echo
        echo "[cluster]"
        echo "processes = $workers"
        echo "threads = $threads"
        echo "addresses = [${addresses:2}]"
    } >"$config"

    log "starting $workers workers and $gateways gateways in $run"
    for ((i = 0; i < workers; i++)); do
        launch "worker-$i" worker --config "$config" --process "$i" --metrics-listen 127.0.0.1:0
    done
    for ((i = 0; i < gateways; i++)); do
        launch "gateway-$i" gateway --config "$config" --listen 127.0.0.1:0
    done

    # Wait for every gateway to print its address and to be ready: the
    # topics and tables exist.
    local deadline=$((SECONDS + timeout))
    for ((i = 0; i < gateways; i++)); do
        until [ -n "$(gateway_url "$i")" ]; do
            if ! alive "$(cat "$run/gateway-$i.pid")" || [ "$SECONDS" -ge "$deadline" ]; then
                log "gateway $i did not start; the end of $run/gateway-$i.log:"
                tail -n 30 "$run/gateway-$i.log" >&2 || true
                stop
                exit 1
            fi
            sleep 0.2
        done
        until curl -sf "$(gateway_url "$i")/readyz" >/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "gateway $i is not ready; the end of $run/gateway-$i.log:"
                tail -n 30 "$run/gateway-$i.log" >&2 || true
                stop
                exit 1
            fi
            sleep 0.2
        done
    done
    [ -z "$lb" ] || start_lb "$gateways"
    status
}

case ${1:-} in
    start)
        shift
        start "$@"
        ;;
    status) status ;;
    stop) stop ;;
    -h | --help | help) help ;;
    *) usage ;;
esac
