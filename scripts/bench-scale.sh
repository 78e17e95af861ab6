#!/usr/bin/env bash
# Scale benchmark of `wsbridge serve` (issue 5 item 2), on 127.0.0.1 only:
#
#  * in-flight scale: N concurrent calls (N in $LEVELS) held by a worker that
#    answers after a fixed delay (examples/delay_worker.rs), sent at once by
#    examples/hold_load.rs, one connection per call. While all N are held,
#    300 sequential probe calls (answered at once) measure the latency of a
#    call through a bridge holding N others: flat from 10 to N if correlating
#    replies is O(1). The burst's own latency (minus the delay) is reported
#    too, for information: it is dominated by pushing N requests through two
#    cores at once. Also reports the bridge's RSS per in-flight
#    call: (VmRSS while all N are held - VmRSS just before) / N, sampled on
#    events (the bridge's fd count, the worker's held-call count), never
#    after a guessed sleep;
#  * the same over HTTP/2 (levels in $H2_LEVELS): the calls are streams,
#    $H2_STREAMS per caller connection, so the open-files limit does not
#    bound them and RSS per call is the call's own, the connection's share
#    being a thousandth;
#  * worker scale: $WORKERS worker connections from one process
#    (examples/many_workers.rs), RSS per connection once all are welcomed;
#  * idle RSS of `wsbridge serve` with no traffic.
#
# Prints a table (figure, target, PASS/FAIL) and writes bench/scale.json.
# Builds what it needs in release mode; installs nothing; stops by itself;
# kills every process it started on exit.
#
# Each held call needs one caller connection, so the bridge needs N open
# files: the script raises `ulimit -n` to the hard limit, and a level that
# cannot fit under it is reported as SKIP, with the largest level that fits
# measured instead (tagged "max").
#
# The worker holds each call for max(DELAY_MS, N/2 ms): sending N requests
# takes time (about 1.9 s for 10,000 on 2 shared cores), and all N must be
# held at once when memory is sampled (and the probes made).
#
# Environment: LEVELS ("10 1000 10000 100000"), H2_LEVELS (the same; "" to
# skip), H2_STREAMS (1000), WORKERS (1000), DELAY_MS
# (2000), HTTP_PORT (18080), WORKER_PORT (18443), CONTROL_PORT (19901),
# OUT (bench/scale.json), CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "$0")/.."

LEVELS=${LEVELS-"10 1000 10000 100000"}
H2_LEVELS=${H2_LEVELS-"10 1000 10000 100000"}
H2_STREAMS=${H2_STREAMS:-1000}
WORKERS=${WORKERS:-1000}
DELAY_MS=${DELAY_MS:-2000}
HTTP_PORT=${HTTP_PORT:-18080}
WORKER_PORT=${WORKER_PORT:-18443}
CONTROL_PORT=${CONTROL_PORT:-19901}
OUT=${OUT:-bench/scale.json}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
# Per-process file descriptors besides the caller connections.
FD_MARGIN=256
# Targets.
MAX_CALL_BYTES=2048
MAX_WORKER_KIB=64
MAX_IDLE_KIB=$((16 * 1024))
MAX_LATENCY_RATIO=1.5

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench-scale: %s\n' "$*" >&2; exit 1; }

# --- limits ------------------------------------------------------------------
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
ulimit -n "$hard"
NOFILE=$(ulimit -n)
read -r port_lo port_hi </proc/sys/net/ipv4/ip_local_port_range
# Connections per source address. bind() to port 0 searches only half of the
# ephemeral range cheaply (the other half is left to connect()); past it each
# bind scans the whole range, so 19,000 connections from one address took
# 60 s instead of 2. Stay at 3/8 of the range per address.
PER_SOURCE=$(((port_hi - port_lo + 1) * 3 / 8))
say "ulimit -n $NOFILE (hard $hard); ephemeral ports $port_lo-$port_hi, $PER_SOURCE connections per source address"

# --- build -------------------------------------------------------------------
say "cargo build --release"
cargo build --release --locked --bin wsbridge \
    --example delay_worker --example hold_load --example many_workers
BIN=$TARGET_DIR/release
EX=$TARGET_DIR/release/examples

# --- processes and cleanup ----------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-scale.XXXXXX")
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

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Waits (up to 30 s) for a line matching $2 in log file $1, or for $3 to die.
wait_for_log() {
    local log=$1 pattern=$2 pid=$3 i
    for ((i = 0; i < 300; i++)); do
        grep -q -- "$pattern" "$log" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "process $pid died"; }
        sleep 0.1
    done
    cat "$log" >&2
    die "timed out waiting for '$pattern' in $log"
}

# --- bridge ------------------------------------------------------------------
"$BIN/wsbridge" gen-cert --out "$TMP/certs" --host localhost --host 127.0.0.1 >/dev/null
CONFIG=$TMP/bench.toml
cat >"$CONFIG" <<EOF
# Generated by scripts/bench-scale.sh: nothing may queue or be refused.
default_service = "default"
shutdown_timeout = "1s"

[http]
listen = "127.0.0.1:$HTTP_PORT"
# One connection per held call.
max_connections = $((NOFILE + 1000))
# The worker's capacity covers every call, so the queue stays empty; a large
# limit makes sure a momentary backlog is never refused either.
queue_limit = 1000000
queue_timeout = "120s"
request_timeout = "300s"
# Connections are all opened before any request is sent.
header_read_timeout = "300s"
send_timeout = "60s"
# HTTP/2 levels carry this many calls per connection.
http2_max_streams = $H2_STREAMS

# One bridge per scenario: no admin listener (its default port would clash).
[admin]
enabled = false
[workers]
listen = "127.0.0.1:$WORKER_PORT"
tls_cert = "$TMP/certs/server.crt"
tls_key = "$TMP/certs/server.key"
tokens = ["bench-token"]
ping_interval = "15s"
handshake_timeout = "60s"
EOF
"$BIN/wsbridge" check-config "$CONFIG" >/dev/null

BRIDGE=
start_bridge() {
    local log=$TMP/bridge-$1.log
    "$BIN/wsbridge" serve --config "$CONFIG" 2>"$log" &
    BRIDGE=$!
    PIDS+=("$BRIDGE")
    wait_for_log "$log" "worker listener ready" "$BRIDGE"
}

# "key=value ..." -> value of key
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

# --- idle --------------------------------------------------------------------
say "idle RSS"
start_bridge idle
IDLE_KIB=$(rss_kib "$BRIDGE")
stop "$BRIDGE"

# --- in-flight scale ----------------------------------------------------------
# Connections in TIME_WAIT pin their local ports for 60 s: a level started
# right after a run that closed tens of thousands of connections (a previous
# run of this script, say) fails to bind. So a level waits (at most 70 s)
# until no more remain than one level of this script leaves (the 10,000
# level; the next one has room for that many, measured).
wait_time_wait() {
    command -v ss >/dev/null || return 0
    local deadline=$((SECONDS + 70)) n
    while n=$(ss -Htan state time-wait | wc -l) && ((n > 12000 && SECONDS < deadline)); do
        say "$n connections in TIME_WAIT: waiting for them to expire"
        sleep 5
    done
}

# Runs one level of $1 calls on a fresh bridge and worker, over HTTP/1.1
# or, with $2 = h2, HTTP/2; sets LEVEL_RESULT. (Not called in $(...): the
# processes must be known to this shell's cleanup.)
LEVEL_RESULT=
run_level() {
    local n=$1 mode=${2:-h1} conns max_inflight worker out delay h2=()
    [[ $mode == h2 ]] && h2=(--h2-streams "$H2_STREAMS")
    delay=$((n / 2 > DELAY_MS ? n / 2 : DELAY_MS))
    # The protocol caps one connection at 65,536 calls in flight.
    # 64 more slots for the probe calls made while all n are held.
    conns=$(((n + 64 + 65535) / 65536))
    max_inflight=$(((n + conns - 1) / conns + 64))
    wait_time_wait
    say "in-flight: $n calls over $mode ($conns worker connection(s) x max_inflight $max_inflight, delay $delay ms)"
    start_bridge "$mode-n$n"
    "$EX/delay_worker" --url "wss://127.0.0.1:$WORKER_PORT" --token bench-token \
        --ca "$TMP/certs/server.crt" --delay-ms "$delay" --connections "$conns" \
        --max-inflight "$max_inflight" --control "127.0.0.1:$CONTROL_PORT" \
        >"$TMP/worker-$n.log" 2>&1 &
    worker=$!
    PIDS+=("$worker")
    out=$TMP/load-$mode-$n.out
    if ! timeout 600 "$EX/hold_load" --target "127.0.0.1:$HTTP_PORT" --n "$n" \
        --delay-ms "$delay" --control "127.0.0.1:$CONTROL_PORT" --bridge-pid "$BRIDGE" \
        --per-source "$PER_SOURCE" "${h2[@]}" >"$out" 2>"$TMP/load-$mode-$n.err"; then
        cat "$TMP/load-$mode-$n.err" >&2
        die "hold_load failed at $n over $mode"
    fi
    cat "$TMP/load-$mode-$n.err" >&2
    LEVEL_RESULT=$(grep '^RESULT ' "$out" | sed 's/^RESULT //')
    stop "$worker"
    stop "$BRIDGE"
}

RESULTS=()   # "label result-line"
SKIPPED=()   # "n reason"
largest_run=0
largest_wanted=0
for n in $LEVELS; do
    ((n > largest_wanted)) && largest_wanted=$n
    if ((n + FD_MARGIN > NOFILE)); then
        SKIPPED+=("$n open-files limit $NOFILE (hard; cannot be raised here) < $n calls + $FD_MARGIN")
        say "SKIP $n: needs $((n + FD_MARGIN)) open files, the hard limit is $NOFILE"
        continue
    fi
    run_level "$n"
    RESULTS+=("$n $LEVEL_RESULT")
    largest_run=$n
done
if ((largest_wanted > largest_run)); then
    max=$(((NOFILE - FD_MARGIN) / 1000 * 1000))
    if ((max > largest_run)); then
        run_level "$max"
        RESULTS+=("$max(max) $LEVEL_RESULT")
        largest_run=$max
    fi
fi
# HTTP/2: n / H2_STREAMS connections, far below the open-files limit.
for n in $H2_LEVELS; do
    run_level "$n" h2
    RESULTS+=("h2:$n $LEVEL_RESULT")
done

# --- worker scale -------------------------------------------------------------
say "worker scale: $WORKERS worker connections"
start_bridge workers
if ! timeout 600 "$EX/many_workers" --url "wss://127.0.0.1:$WORKER_PORT" --token bench-token \
    --ca "$TMP/certs/server.crt" --m "$WORKERS" --bridge-pid "$BRIDGE" --exit \
    >"$TMP/many.out" 2>"$TMP/many.err"; then
    cat "$TMP/many.err" >&2
    die "many_workers failed"
fi
WRES=$(grep '^RESULT ' "$TMP/many.out" | sed 's/^RESULT //')
REGISTERED=$(grep -c "worker connected" "$TMP/bridge-workers.log" || true)
stop "$BRIDGE"

# --- report -------------------------------------------------------------------
verdict() { if awk "BEGIN { exit !($1) }"; then echo PASS; else echo FAIL; fi; }
ROWS=()
row() { ROWS+=("$(printf '%-46s %20s %12s  %s' "$1" "$2" "$3" "$4")"); }

row "idle RSS (no traffic)" "$((IDLE_KIB)) KiB" "< $MAX_IDLE_KIB KiB" "$(verdict "$IDLE_KIB < $MAX_IDLE_KIB")"

# Per protocol: the first level's probe latencies and the last one's.
declare -A base_p50 base_p99 base_label last_p50 last_p99 last_label
LEVEL_JSON=()
for entry in "${RESULTS[@]}"; do
    label=${entry%% *}
    r=${entry#* }
    mode=$([[ $label == h2:* ]] && echo h2 || echo h1)
    n=$(field "$r" n)
    before=$(field "$r" rss_before_kib)
    conn=$(field "$r" rss_connected_kib)
    held=$(field "$r" rss_held_kib)
    per_call=$(awk -v a="$held" -v b="$before" -v n="$n" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
    per_conn=$(awk -v a="$conn" -v b="$before" -v n="$n" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
    per_call_only=$(awk -v a="$held" -v b="$conn" -v n="$n" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
    p50=$(field "$r" probe_p50_ms)
    p99=$(field "$r" probe_p99_ms)
    ok=$(field "$r" ok)
    held_n=$(field "$r" held)
    errs=$(($(field "$r" errors) + $(field "$r" non200)))
    all_held=$([[ $held_n == "$n" ]] && echo PASS || echo FAIL)
    row "[$label] calls answered 200 / held at once" "$ok / $held_n" "$n / $n" \
        "$([[ $ok == "$n" && $all_held == PASS ]] && echo PASS || echo FAIL)"
    if ((n >= 1000)); then
        rss_verdict=$(verdict "$per_call < $MAX_CALL_BYTES")
    else
        rss_verdict="info (too few calls)"
    fi
    row "[$label] RSS per in-flight call (incl. conn)" "$per_call B" "< $MAX_CALL_BYTES B" "$rss_verdict"
    row "[$label]   of which idle caller connection" "$per_conn B" "" "info"
    row "[$label]   of which the call itself" "$per_call_only B" "" "info"
    row "[$label] probe call while all held, p50 / p99" "$p50 / $p99 ms" "" "info"
    row "[$label] burst: added latency p50 / p99" "$(field "$r" added_p50_ms) / $(field "$r" added_p99_ms) ms" "" "info"
    row "[$label] dispatch: go -> all held" "$(field "$r" dispatch_ms) ms" "" "info"
    if [[ -z ${base_p50[$mode]:-} ]]; then
        base_p50[$mode]=$p50 base_p99[$mode]=$p99 base_label[$mode]=$label
    fi
    last_p50[$mode]=$p50 last_p99[$mode]=$p99 last_label[$mode]=$label
    LEVEL_JSON+=("$(printf '{"label":"%s","protocol":"%s","n":%s,"ok":%s,"errors":%s,"held_at_once":%s,"delay_ms":%s,"connect_ms":%s,"dispatch_ms":%s,"latency_p50_ms":%s,"latency_p99_ms":%s,"latency_max_ms":%s,"added_p50_ms":%s,"added_p99_ms":%s,"probe_p50_ms":%s,"probe_p99_ms":%s,"rss_before_kib":%s,"rss_connected_kib":%s,"rss_held_kib":%s,"rss_per_call_bytes":%s,"rss_per_idle_connection_bytes":%s,"rss_per_call_beyond_connection_bytes":%s,"rss_per_call_target_bytes":%s}' \
        "$label" "$mode" "$n" "$ok" "$errs" "$held_n" "$(field "$r" delay_ms)" "$(field "$r" connect_ms)" "$(field "$r" dispatch_ms)" \
        "$(field "$r" p50_ms)" "$(field "$r" p99_ms)" "$(field "$r" max_ms)" "$(field "$r" added_p50_ms)" "$(field "$r" added_p99_ms)" "$p50" "$p99" \
        "$before" "$conn" "$held" "$per_call" "$per_conn" "$per_call_only" "$MAX_CALL_BYTES")")
done
for s in "${SKIPPED[@]}"; do
    row "[${s%% *}] in-flight level" "skipped" "" "SKIP (${s#* })"
done
RATIOS=()
for mode in h1 h2; do
    [[ -n ${base_p50[$mode]:-} && ${last_label[$mode]} != "${base_label[$mode]}" ]] || continue
    # The latency a call sees through a bridge holding n others, against the
    # same with 10 held: flat if correlation is O(1).
    from=${base_label[$mode]} to=${last_label[$mode]}
    r50=$(awk -v a="${last_p50[$mode]}" -v b="${base_p50[$mode]}" 'BEGIN { printf "%.2f", a / b }')
    r99=$(awk -v a="${last_p99[$mode]}" -v b="${base_p99[$mode]}" 'BEGIN { printf "%.2f", a / b }')
    row "probe p50 at [$to] / at [$from]" "${r50}x" "<= ${MAX_LATENCY_RATIO}x" "$(verdict "$r50 <= $MAX_LATENCY_RATIO")"
    row "probe p99 at [$to] / at [$from]" "${r99}x" "<= ${MAX_LATENCY_RATIO}x" "$(verdict "$r99 <= $MAX_LATENCY_RATIO")"
    RATIOS+=("$(printf '{"protocol":"%s","from":"%s","to":"%s","p50":%s,"p99":%s,"target":%s}' \
        "$mode" "$from" "$to" "$r50" "$r99" "$MAX_LATENCY_RATIO")")
done
ratio_json="[$(IFS=,; echo "${RATIOS[*]}")]"

m=$(field "$WRES" m)
per_worker=$(field "$WRES" per_worker_kib)
row "[$m workers] registered (bridge log lines)" "$REGISTERED" "$m" "$([[ $REGISTERED == "$m" ]] && echo PASS || echo FAIL)"
row "[$m workers] bridge RSS per worker connection" "$per_worker KiB" "< $MAX_WORKER_KIB KiB" "$(verdict "$per_worker < $MAX_WORKER_KIB")"
row "[$m workers] worker-process RSS per connection" "$(field "$WRES" own_per_worker_kib) KiB" "" "info"
row "[$m workers] time to connect all" "$(field "$WRES" connect_ms) ms" "" "info"

echo
printf '%-46s %20s %12s  %s\n' "figure" "value" "target" "result"
printf '%s\n' "${ROWS[@]}"
echo

mkdir -p "$(dirname "$OUT")"
skipped_json=$(for s in "${SKIPPED[@]}"; do printf '{"n":%s,"reason":"%s"},' "${s%% *}" "${s#* }"; done)
levels_json=$(IFS=,; echo "${LEVEL_JSON[*]}")
cat >"$OUT" <<EOF
{
  "generated_by": "scripts/bench-scale.sh",
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)",
  "host": {"cpus": $(nproc), "kernel": "$(uname -r)", "nofile": $NOFILE, "ephemeral_ports": "$port_lo-$port_hi"},
  "idle": {"rss_kib": $IDLE_KIB, "target_kib": $MAX_IDLE_KIB},
  "inflight": [$levels_json],
  "inflight_skipped": [${skipped_json%,}],
  "h2_streams_per_connection": $H2_STREAMS,
  "added_latency_ratio": $ratio_json,
  "workers": {"m": $m, "registered": $REGISTERED, "connect_ms": $(field "$WRES" connect_ms), "rss_before_kib": $(field "$WRES" rss_before_kib), "rss_after_kib": $(field "$WRES" rss_after_kib), "rss_per_worker_kib": $per_worker, "target_kib": $MAX_WORKER_KIB, "worker_process_rss_per_connection_kib": $(field "$WRES" own_per_worker_kib)},
  "rows": [$(for r in "${ROWS[@]}"; do printf '"%s",' "$(sed 's/  */ /g; s/"/\\"/g' <<<"$r")"; done | sed 's/,$//')]
}
EOF
say "wrote $OUT"
