#!/usr/bin/env bash
# Runs the services that tally's cluster mode talks to, on this machine, for
# development and tests: a Kafka-protocol broker (tansu, SQLite storage),
# ClickHouse and Redis. Each listens on 127.0.0.1 only, on a free port chosen
# at start, and keeps its data in a state directory that `stop` removes.
#
#   scripts/services.sh [start]   install what is missing, start the services
#                                 (or find them running) and print their
#                                 addresses on stdout as NAME=VALUE lines:
#                                     KAFKA_BROKERS=127.0.0.1:PORT
#                                     CLICKHOUSE_URL=http://127.0.0.1:PORT
#                                     REDIS_URL=redis://127.0.0.1:PORT
#   scripts/services.sh stop      stop them and remove the state directory
#   scripts/services.sh stop NAME   stop one service (tansu, clickhouse or
#   scripts/services.sh start NAME  redis), and start it again on the same
#                                 port with the same data: an outage
#   scripts/services.sh env       print the path of the env file that holds
#                                 the same lines; load it with
#                                     set -a; . "$(scripts/services.sh env)"; set +a
#
# The state directory is ${TALLY_SERVICES_DIR:-${TMPDIR:-/tmp}/tally-services}:
# services.env, NAME.pid, NAME.log and data/NAME for each service. Progress
# goes to stderr, so `eval "$(scripts/services.sh)"` works too.
#
# Installs (as root, on Debian): redis-server, clickhouse-server and
# clickhouse-client, curl and python3-pip from apt; tansu with cargo (several
# minutes the first time); confluent-kafka from PyPI, for the tests that read
# the topic with a standard Kafka client.
set -euo pipefail

# shellcheck source=scripts/common.sh
. "$(dirname "$0")/common.sh"

state=$(realpath -m "${TALLY_SERVICES_DIR:-${TMPDIR:-/tmp}/tally-services}")
env_file=$state/services.env
services=(tansu clickhouse redis)
timeout=60
tansu_version=0.6.0

log() { echo "services.sh: $*" >&2; }

# True when NAME's pid file names a live process.
running() {
    local pid
    pid=$(cat "$state/$1.pid" 2>/dev/null) && [ -n "$pid" ] && alive "$pid"
}

# Waits until the command after NAME succeeds; gives up after $timeout seconds
# or as soon as NAME's process has exited, showing the end of its log.
wait_for() {
    local name=$1 deadline=$((SECONDS + timeout))
    shift
    until "$@" >/dev/null 2>&1; do
        if ! running "$name" || [ "$SECONDS" -ge "$deadline" ]; then
            log "$name did not come up; the end of $state/$name.log:"
            tail -n 30 "$state/$name.log" >&2 || true
            log "the others keep running; scripts/services.sh stop stops them"
            exit 1
        fi
        sleep 0.2
    done
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping)" = PONG ]; }
clickhouse_ping() { [ "$(curl -sf "http://127.0.0.1:$1/ping")" = Ok. ]; }

# The tansu binary, on PATH or where cargo installs it.
tansu_bin() { command -v tansu || { [ -x "$HOME/.cargo/bin/tansu" ] && echo "$HOME/.cargo/bin/tansu"; }; }

install_missing() {
    local packages=()
    command -v redis-server >/dev/null || packages+=(redis-server)
    command -v clickhouse-server >/dev/null || command -v clickhouse >/dev/null ||
        packages+=(clickhouse-server clickhouse-client)
    command -v curl >/dev/null || packages+=(curl)
    python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
    if [ ${#packages[@]} -gt 0 ]; then
        log "installing ${packages[*]}"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >&2
    fi
    if ! tansu_bin >/dev/null; then
        command -v cargo >/dev/null || { log "tansu is built with cargo; install Rust first"; exit 1; }
        log "installing tansu $tansu_version with cargo (this takes several minutes)"
        cargo install tansu --version "$tansu_version" --locked --features libsql >&2
    fi
    if ! python3 -c 'import confluent_kafka' 2>/dev/null; then
        log "installing confluent-kafka"
        # Debian's own python3 refuses pip installs unless told otherwise.
        python3 -m pip install --quiet confluent-kafka >&2 ||
            python3 -m pip install --quiet --break-system-packages confluent-kafka >&2
    fi
}

# ClickHouse's server and users configuration: its own ports, everything
# under the state directory, and a password-less `default` user for loopback.
# Kept to what the 18.16 server in Debian bookworm understands.
write_clickhouse_config() {
    local dir=$state/clickhouse data=$state/data/clickhouse
    mkdir -p "$dir"
    cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>$state/clickhouse.log</log>
        <errorlog>$state/clickhouse.err.log</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$1</http_port>
    <tcp_port>$2</tcp_port>
    <!-- No interserver_http_port: replication is not used. -->
    <path>$data/</path>
    <tmp_path>$data/tmp/</tmp_path>
    <user_files_path>$data/user_files/</user_files_path>
    <format_schema_path>$data/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
</yandex>
EOF
    cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default/>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default/>
    </quotas>
</yandex>
EOF
}

# Starts the command after NAME in the background, in NAME's data directory
# and in a session of its own so that closing the terminal does not stop it,
# with its output in NAME.log (opened for appending, as ClickHouse writes its
# own log to the same file).
launch() {
    local name=$1
    shift
    : >"$state/$name.log"
    (cd "$state/data/$name" && exec setsid "$@" </dev/null >>"$state/$name.log" 2>&1) &
    echo $! >"$state/$name.pid"
}

start() {
    local name
    if [ -f "$env_file" ] && running tansu && running clickhouse && running redis; then
        cat "$env_file"
        return
    fi
    # Some but not all of them: start again from nothing.
    for name in "${services[@]}"; do
        if running "$name"; then
            log "only some services are running; restarting them all"
            stop
            break
        fi
    done

    install_missing
    local kafka_port http_port tcp_port redis_port
    read -r kafka_port http_port tcp_port redis_port <<<"$(free_ports 4)"
    for name in "${services[@]}"; do
        mkdir -p "$state/data/$name"
    done
    log "starting in $state"

    write_clickhouse_config "$http_port" "$tcp_port"
    cat >"$env_file" <<EOF
KAFKA_BROKERS=127.0.0.1:$kafka_port
CLICKHOUSE_URL=http://127.0.0.1:$http_port
REDIS_URL=redis://127.0.0.1:$redis_port
EOF
    for name in "${services[@]}"; do
        start_one "$name"
    done
    log "up: tansu, ClickHouse $(curl -s --data-binary 'SELECT version()' "http://127.0.0.1:$http_port/"), Redis"
    cat "$env_file"
}

# The port in the env file's line NAME=...:PORT.
port_of() { sed -n "s/^$1=.*:\([0-9]*\)\$/\1/p" "$env_file"; }

# Starts one service on the port and data of the env file, and waits for it.
start_one() {
    local port
    running "$1" && return
    case $1 in
        tansu)
            port=$(port_of KAFKA_BROKERS)
            # The SQLite URL is relative to tansu's data directory. NO_COLOR
            # keeps terminal colour codes out of its log.
            launch tansu env NO_COLOR=1 "$(tansu_bin)" broker --storage-engine sqlite://tansu.db \
                --listener-url "tcp://127.0.0.1:$port" \
                --advertised-listener-url "tcp://127.0.0.1:$port"
            wait_for tansu tcp_open "$port"
            ;;
        clickhouse)
            port=$(port_of CLICKHOUSE_URL)
            # shellcheck disable=SC2046 # "clickhouse server" is two words
            launch clickhouse $(command -v clickhouse-server || echo "$(command -v clickhouse) server") \
                --config-file="$state/clickhouse/config.xml"
            wait_for clickhouse clickhouse_ping "$port"
            wait_for clickhouse curl -sf --data-binary 'SELECT version()' "http://127.0.0.1:$port/"
            ;;
        redis)
            port=$(port_of REDIS_URL)
            launch redis redis-server --bind 127.0.0.1 --port "$port" --dir "$state/data/redis" \
                --save '' --appendonly no --daemonize no
            wait_for redis redis_ping "$port"
            ;;
    esac
}

# Stops one service by PID: SIGTERM, then SIGKILL after 10 s. Its data stays.
stop_one() {
    local pid
    running "$1" || return 0
    pid=$(cat "$state/$1.pid")
    log "stopping $1 (pid $pid)"
    terminate "$pid"
    rm -f "$state/$1.pid"
}

# Insists that NAME is one of the services.
check_name() {
    case " ${services[*]} " in
        *" $1 "*) ;;
        *)
            log "unknown service '$1'; one of: ${services[*]}"
            exit 2
            ;;
    esac
}

stop() {
    local name
    for name in "${services[@]}"; do
        stop_one "$name"
    done
    # Only what this script made, in case the directory holds anything else.
    for name in "${services[@]}"; do
        rm -f "$state/$name.log"
    done
    rm -rf "$state/data" "$state/clickhouse"
    rm -f "$env_file" "$state/clickhouse.err.log"
    rmdir "$state" 2>/dev/null || true
}

case ${1:-start} in
    start)
        if [ -n "${2:-}" ]; then
            check_name "$2"
            [ -f "$env_file" ] || { log "not started; run scripts/services.sh start"; exit 1; }
            start_one "$2"
        else
            mkdir -p "$state"
            start
        fi
        ;;
    stop)
        if [ -n "${2:-}" ]; then
            check_name "$2"
            stop_one "$2"
        else
            stop
        fi
        ;;
    env)
        if [ ! -f "$env_file" ]; then
            log "not started; run scripts/services.sh start"
            exit 1
        fi
        echo "$env_file"
        ;;
    -h | --help | help) help ;;
    *)
        help >&2
        exit 2
        ;;
esac
