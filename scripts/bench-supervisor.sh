#!/usr/bin/env bash
# Compares the footprint of `machine run` as a supervisor with PM2 and supervisord.
#
# Each supervisor runs 8 idle `sleep` services for $DURATION seconds (default 30); the script
# reads the supervisor process's resident memory (VmRSS) and CPU time (utime + stime) from
# /proc from the outside and prints them side by side, with ratios against ours. It then
# measures our crash-to-restart latency: the time from a crashing service's exit to its restart
# (its first restart, with the default 50 ms +-20% initial backoff), over $CRASHES crashes.
#
# PM2 (npm `pm2`) and supervisord (PyPI `supervisor`) are installed into target/bench-tools
# when they are not on PATH. Usage: scripts/bench-supervisor.sh   (DURATION=5 for a quick run)
set -euo pipefail

DURATION=${DURATION:-30}
SERVICES=8
CRASHES=${CRASHES:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${BENCH_TOOLS:-$ROOT/target/bench-tools}
WORK=$(mktemp -d)
CLK_TCK=$(getconf CLK_TCK)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [ -n "${PM2:-}" ]; then PM2_HOME="$WORK/pm2" "$PM2" kill >/dev/null 2>&1 || true; fi
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "bench: $*" >&2; }

# --- tools -------------------------------------------------------------------------------------
MACHINE=${MACHINE_BIN:-$ROOT/target/release/machine}
if [ -z "${MACHINE_BIN:-}" ]; then
    log "building the release binary"
    (cd "$ROOT" && cargo build --release --quiet)
fi

PM2=$(command -v pm2 || true)
if [ -z "$PM2" ]; then
    PM2="$TOOLS/npm/node_modules/.bin/pm2"
    if [ ! -x "$PM2" ]; then
        log "installing pm2 into $TOOLS/npm"
        mkdir -p "$TOOLS/npm"
        npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" pm2 >&2
    fi
fi

SUPERVISORD=$(command -v supervisord || true)
if [ -z "$SUPERVISORD" ]; then
    SUPERVISORD="$TOOLS/venv/bin/supervisord"
    if [ ! -x "$SUPERVISORD" ]; then
        log "installing supervisor into $TOOLS/venv"
        python3 -m venv "$TOOLS/venv"
        "$TOOLS/venv/bin/pip" install --quiet supervisor >&2
    fi
fi

# --- measuring ---------------------------------------------------------------------------------
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# CPU time in nanoseconds: the sum over the process's threads of /proc/.../schedstat (time on
# CPU, ns precision); without schedstat, utime + stime (fields 14 and 15, in clock ticks).
cpu_ns() {
    if [ -r "/proc/$1/schedstat" ]; then
        cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{t += $1} END {printf "%d", t}'
    else
        sed 's/.*) //' "/proc/$1/stat" | awk -v tck="$CLK_TCK" '{printf "%d", ($12 + $13) * 1e9 / tck}'
    fi
}
children_named() { pgrep -P "$1" -x "$2" | wc -l; }

wait_for() { # seconds, description, command...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then log "timed out waiting for $what"; exit 1; fi
        sleep 0.1
    done
}

has_sleepers() { [ "$(children_named "$1" sleep)" -ge "$SERVICES" ]; }

# measure NAME PID: waits until PID supervises all sleepers, then samples over DURATION.
measure() {
    local name=$1 pid=$2
    wait_for 60 "$name to start $SERVICES services" has_sleepers "$pid"
    sleep 1
    local c0 c1
    c0=$(cpu_ns "$pid")
    sleep "$DURATION"
    c1=$(cpu_ns "$pid")
    echo "$name $(rss_kib "$pid") $(hwm_kib "$pid") $((c1 - c0))" >>"$WORK/results"
    log "$name: done"
}

# --- machine -----------------------------------------------------------------------------------
{
    echo '[machine]'
    echo 'id = "bench"'
    for i in $(seq 1 $SERVICES); do
        printf '[services.sleep%d]\ncommand = ["sleep", "100000"]\n' "$i"
    done
} >"$WORK/machine.toml"
log "machine run: $SERVICES services for ${DURATION}s"
MACHINE_CONFIG="$WORK/machine.toml" MACHINE_WORKSPACE="$WORK/ws" RUST_LOG=warn \
    "$MACHINE" run >"$WORK/machine.out" 2>&1 &
MPID=$!
PIDS+=("$MPID")
measure machine "$MPID"
kill -TERM "$MPID"
wait "$MPID" || true

# --- PM2 ---------------------------------------------------------------------------------------
log "pm2: $SERVICES services for ${DURATION}s"
export PM2_HOME="$WORK/pm2"
for i in $(seq 1 $SERVICES); do
    "$PM2" start /bin/sleep --name "sleep$i" --interpreter none --no-autorestart -- 100000 >/dev/null
done
PM2PID=$(cat "$PM2_HOME/pm2.pid")
measure pm2 "$PM2PID"
"$PM2" kill >/dev/null 2>&1 || true
unset PM2_HOME

# --- supervisord -------------------------------------------------------------------------------
{
    printf '[supervisord]\nnodaemon=true\nlogfile=%s/supervisord.log\npidfile=%s/supervisord.pid\n' "$WORK" "$WORK"
    printf '[unix_http_server]\nfile=%s/supervisor.sock\n' "$WORK"
    for i in $(seq 1 $SERVICES); do
        printf '[program:sleep%d]\ncommand=/bin/sleep 100000\n' "$i"
    done
} >"$WORK/supervisord.conf"
log "supervisord: $SERVICES services for ${DURATION}s"
"$SUPERVISORD" -c "$WORK/supervisord.conf" >/dev/null 2>&1 &
SPID=$!
PIDS+=("$SPID")
measure supervisord "$SPID"
kill -TERM "$SPID"
wait "$SPID" || true

# --- our crash-to-restart latency ----------------------------------------------------------------
# Each run lasts longer than stable_after, so every restart is a *first* restart (the backoff
# starts again from backoff_initial = 50 ms, +-20% jitter): $CRASHES samples of the same thing.
cat >"$WORK/crash.toml" <<TOML
[machine]
id = "bench"
[supervisor]
stable_after = "100ms"
crash_loop_failures = 1000
[services.crasher]
command = ["/bin/sh", "-c", "date +%s%N >> $WORK/starts; sleep 0.15; date +%s%N >> $WORK/exits; exit 1"]
TOML
log "machine run: crash-to-restart latency over $CRASHES crashes"
MACHINE_CONFIG="$WORK/crash.toml" MACHINE_WORKSPACE="$WORK/ws2" RUST_LOG=info NO_COLOR=1 \
    "$MACHINE" run >"$WORK/crash.out" 2>&1 &
CPID=$!
PIDS+=("$CPID")
crashes_done() { [ -f "$WORK/starts" ] && [ "$(wc -l <"$WORK/starts")" -gt "$CRASHES" ]; }
wait_for 120 "$CRASHES crashes" crashes_done
kill -TERM "$CPID"
wait "$CPID" || true
# Latency of crash i: from its exit to start i+1, in ms, sorted.
paste <(head -n "$CRASHES" "$WORK/exits") <(sed -n "2,$((CRASHES + 1))p" "$WORK/starts") |
    awk '{printf "%.1f\n", ($2 - $1) / 1e6}' | sort -n >"$WORK/latency"
pick() { sed -n "$(($1 > 0 ? $1 : 1))p" "$WORK/latency"; }
FIRST_MS=$(paste <(head -n 1 "$WORK/exits") <(sed -n 2p "$WORK/starts") | awk '{printf "%.1f", ($2 - $1) / 1e6}')
MEDIAN_MS=$(pick $(((CRASHES + 1) / 2)))
P90_MS=$(pick $(((CRASHES * 9 + 9) / 10)))
MIN_MS=$(pick 1)
MAX_MS=$(pick "$CRASHES")
# The supervisor's own share, from its log: exit noticed -> next child spawned (backoff included).
INSIDE=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/crash.out" | awk '
    function ts(s, a) { split(substr(s, 12), a, ":"); return a[1] * 3600 + a[2] * 60 + a[3] }
    /service exited service=crasher/ { e = ts($1) }
    /service started service=crasher/ && e { printf "%.1f\n", (ts($1) - e) * 1000; e = 0 }' | sort -n)
INSIDE_MEDIAN=$(echo "$INSIDE" | sed -n "$(((CRASHES + 1) / 2))p")
INSIDE_MAX=$(echo "$INSIDE" | tail -n 1)

# --- table -------------------------------------------------------------------------------------
echo
echo "Supervisor footprint, $SERVICES idle sleep services, ${DURATION}s ($(nproc) CPUs, $(uname -r))"
awk '
    { name[NR] = $1; rss[NR] = $2 / 1024; hwm[NR] = $3 / 1024; cpu[NR] = $4 / 1e9 }
    END {
        printf "%-12s %9s %9s %10s %8s %8s\n", "supervisor", "RSS MiB", "peak MiB", "CPU s", "RSS x", "CPU x"
        for (i = 1; i <= NR; i++) {
            cx = cpu[1] > 0 ? sprintf("%.1f", cpu[i] / cpu[1]) : "-"
            printf "%-12s %9.1f %9.1f %10.4f %8.1f %8s\n", name[i], rss[i], hwm[i], cpu[i], rss[i] / rss[1], cx
        }
    }' "$WORK/results"
echo
echo "machine crash-to-restart latency (exit -> new process running; includes the 50ms +-20% backoff):"
echo "  first crash ${FIRST_MS} ms; over $CRASHES first restarts: min ${MIN_MS}, median ${MEDIAN_MS}, p90 ${P90_MS}, max ${MAX_MS} ms"
echo "  of which inside the supervisor (exit noticed -> child spawned): median ${INSIDE_MEDIAN}, max ${INSIDE_MAX} ms"
echo "  (load average during the run: $(cut -d' ' -f1-3 /proc/loadavg))"
