# Shell functions shared by scripts/services.sh and scripts/cluster.sh.

# The calling script's usage: its opening comment.
help() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# True when PID is a live process. An exited one may stay a zombie for a while
# after its parent is gone, until something reaps it, so /proc is read rather
# than trusting kill -0.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) && stat=${stat##*) } && [ "${stat%% *}" != Z ]
}

# COUNT free loopback ports, below the ephemeral range so that no outgoing
# connection takes one before its process binds it.
free_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
held = []
while len(held) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randint(20000, 32000)))
        held.append(s)
    except OSError:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
}

# Sends SIGTERM to every PID given, waits up to 10 s for them all to exit,
# then sends SIGKILL to those left (saying so through the caller's `log`).
terminate() {
    local pid deadline=$((SECONDS + 10))
    for pid in "$@"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
        if alive "$pid"; then
            log "pid $pid did not stop within 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}
