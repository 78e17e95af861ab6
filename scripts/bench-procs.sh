# Sourced by the benchmark scripts (scripts/bench-scale.sh,
# scripts/bench-fanout.sh): the processes they start, and their end.
# Needs TMP (a scratch directory, removed on exit) and die() defined first.
# Every process started goes into PIDS; on exit each gets TERM and is
# waited for, and TMP goes.

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops one process we started (TERM, then KILL after 5 s) and forgets it.
stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p != "$pid" ]] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# A /proc/PID/status figure in KiB: `status_kib PID VmRSS`.
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
rss_kib() { status_kib "$1" VmRSS; }

# Waits (up to $4 seconds, default 30) for a line matching $2 in file $1,
# or for process $3 to die.
wait_for_log() {
    local log=$1 pattern=$2 pid=$3 limit=$((${4:-30} * 10)) i
    for ((i = 0; i < limit; i++)); do
        grep -q -- "$pattern" "$log" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "process $pid died"; }
        sleep 0.1
    done
    cat "$log" >&2
    die "timed out waiting for '$pattern' in $log"
}
