#!/usr/bin/env bash
# Fan-out and presence benchmark of `wsbridge serve` (issue 19), on
# 127.0.0.1 only:
#
#  * fan-out: $WORKERS echo workers (examples/many_workers.rs, one process)
#    of service `fan`; each round times one `Wsbridge-Fanout: all` call of a
#    64-byte body until every reply is gathered (curl's time_total; the
#    answer is checked: expected = responded = $WORKERS), the same as ndjson,
#    and, as the baseline measured in the same round, the same $WORKERS
#    calls made one by one with `Wsbridge-Worker`, 64 at a time (curl
#    --parallel). Also the bridge's peak RSS during the fan-outs (VmHWM,
#    reset through /proc/PID/clear_refs before them) over its RSS before;
#  * presence: $PRESENCE_WORKERS workers; each round times
#    `GET /_wsbridge/workers?service=fan` and its size, against the same
#    endpoint answering an empty list (`service=none`) as the floor.
#
# Rounds are interleaved; medians of $ROUNDS are reported. Prints a table and
# writes bench/fanout.json. Builds what it needs in release mode; installs
# nothing; stops by itself; kills every process it started on exit.
#
# Environment: WORKERS (1000), PRESENCE_WORKERS (10000), ROUNDS (5),
# HTTP_PORT (18180), WORKER_PORT (18543), OUT (bench/fanout.json),
# CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-1000}
PRESENCE_WORKERS=${PRESENCE_WORKERS:-10000}
ROUNDS=${ROUNDS:-5}
HTTP_PORT=${HTTP_PORT:-18180}
WORKER_PORT=${WORKER_PORT:-18543}
OUT=${OUT:-bench/fanout.json}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench-fanout: %s\n' "$*" >&2; exit 1; }
command -v curl >/dev/null || die "needs curl"
command -v python3 >/dev/null || die "needs python3"

hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
ulimit -n "$hard"

say "cargo build --release"
cargo build --release --locked --bin wsbridge --example many_workers
BIN=$TARGET_DIR/release
EX=$TARGET_DIR/release/examples

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-fanout.XXXXXX")
# shellcheck source=scripts/bench-procs.sh
source scripts/bench-procs.sh
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

"$BIN/wsbridge" gen-cert --out "$TMP/certs" --host localhost --host 127.0.0.1 >/dev/null
CONFIG=$TMP/bench.toml
cat >"$CONFIG" <<CONF
default_service = "fan"
shutdown_timeout = "1s"
[http]
listen = "127.0.0.1:$HTTP_PORT"
request_timeout = "120s"
queue_timeout = "60s"
max_connections = 100000
[admin]
enabled = false
[workers]
listen = "127.0.0.1:$WORKER_PORT"
tls_cert = "$TMP/certs/server.crt"
tls_key = "$TMP/certs/server.key"
tokens = ["bench-token"]
handshake_timeout = "120s"
[fanout]
max_workers = 100000
CONF
"$BIN/wsbridge" check-config "$CONFIG" >/dev/null

BRIDGE= HOLDER=
# Starts a bridge and $1 workers held open by many_workers (its stdin is a
# pipe the script keeps open).
start() {
    "$BIN/wsbridge" serve --config "$CONFIG" 2>"$TMP/bridge.log" &
    BRIDGE=$!
    PIDS+=("$BRIDGE")
    wait_for_log "$TMP/bridge.log" "worker listener ready" "$BRIDGE"
    mkfifo "$TMP/hold.$1"
    "$EX/many_workers" --url "wss://127.0.0.1:$WORKER_PORT" --token bench-token \
        --ca "$TMP/certs/server.crt" --service fan --m "$1" --bridge-pid "$BRIDGE" \
        <"$TMP/hold.$1" >"$TMP/many.$1.out" 2>"$TMP/many.$1.err" &
    HOLDER=$!
    PIDS+=("$HOLDER")
    exec 8>"$TMP/hold.$1"
    wait_for_log "$TMP/many.$1.out" '^RESULT ' "$HOLDER" 180
}
finish() { exec 8>&-; stop "$HOLDER"; stop "$BRIDGE"; }

URL=http://127.0.0.1:$HTTP_PORT/fan
BODY=$(head -c 48 /dev/zero | tr '\0' 'x')0123456789abcdef

# --- fan-out --------------------------------------------------------------------
say "fan-out to $WORKERS workers, $ROUNDS rounds"
start "$WORKERS"
RSS_BEFORE=$(status_kib "$BRIDGE" VmRSS)
# The baseline: one call per worker, each naming it, 64 at a time.
# (`next` resets every option: each call carries its own, silent included.)
for ((i = 0; i < WORKERS; i++)); do
    ((i == 0)) || echo next
    printf 'url = "%s"\nheader = "Wsbridge-Worker: many-%d"\ndata = "%s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\nsilent\n' "$URL" "$i" "$BODY"
done >"$TMP/calls.cfg"
FAN_MS=() NDJSON_MS=() EACH_MS=() PEAKS=()
for ((r = 1; r <= ROUNDS; r++)); do
    echo 5 >"/proc/$BRIDGE/clear_refs" 2>/dev/null || true
    t=$(curl -s -o "$TMP/fan.json" -w '%{time_total}' -H 'Wsbridge-Fanout: all' -d "$BODY" "$URL")
    PEAKS+=("$(status_kib "$BRIDGE" VmHWM)")
    python3 - "$TMP/fan.json" "$WORKERS" "$BODY" <<'PY' || die "fan-out round $r: wrong answer"
import json, sys
doc = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
ok = [r for r in doc["results"] if r["outcome"] == "ok" and r.get("body") == sys.argv[3]]
assert doc["expected"] == n and doc["responded"] == n and len(ok) == n, (doc["expected"], doc["responded"], len(ok))
assert len({r["worker_id"] for r in ok}) == n
PY
    FAN_MS+=("$(awk -v t="$t" 'BEGIN { printf "%.1f", t * 1000 }')")
    t=$(curl -s -o "$TMP/fan.ndjson" -w '%{time_total}' -H 'Wsbridge-Fanout: all' \
        -H 'Accept: application/x-ndjson' -d "$BODY" "$URL")
    lines=$(grep -c '"outcome":"ok"' "$TMP/fan.ndjson" || true)
    [[ $lines == "$WORKERS" ]] || die "ndjson round $r: $lines ok lines, not $WORKERS"
    NDJSON_MS+=("$(awk -v t="$t" 'BEGIN { printf "%.1f", t * 1000 }')")
    t0=$(date +%s%N)
    curl -s --no-progress-meter --parallel --parallel-max 64 -K "$TMP/calls.cfg" >"$TMP/codes"
    t1=$(date +%s%N)
    good=$(grep -c '^200$' "$TMP/codes" || true)
    [[ $good == "$WORKERS" ]] || die "baseline round $r: $good answers 200, not $WORKERS"
    EACH_MS+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')")
    say "round $r: fan-out ${FAN_MS[-1]} ms, ndjson ${NDJSON_MS[-1]} ms, one by one ${EACH_MS[-1]} ms, peak ${PEAKS[-1]} KiB"
done
FAN_SIZE=$(stat -c %s "$TMP/fan.json")
finish

# --- presence -------------------------------------------------------------------
say "presence with $PRESENCE_WORKERS workers, $ROUNDS rounds"
start "$PRESENCE_WORKERS"
LIST_MS=() EMPTY_MS=()
for ((r = 1; r <= ROUNDS; r++)); do
    read -r t size < <(curl -s -o "$TMP/list.json" -w '%{time_total} %{size_download}\n' \
        "http://127.0.0.1:$HTTP_PORT/_wsbridge/workers?service=fan")
    n=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["workers"]))' "$TMP/list.json")
    [[ $n == "$PRESENCE_WORKERS" ]] || die "presence round $r: $n workers listed, not $PRESENCE_WORKERS"
    LIST_MS+=("$(awk -v t="$t" 'BEGIN { printf "%.2f", t * 1000 }')")
    LIST_SIZE=$size
    t=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$HTTP_PORT/_wsbridge/workers?service=none")
    EMPTY_MS+=("$(awk -v t="$t" 'BEGIN { printf "%.2f", t * 1000 }')")
done
finish

# --- report -----------------------------------------------------------------------
fan=$(echo "${FAN_MS[*]}" | median)
ndjson=$(echo "${NDJSON_MS[*]}" | median)
each=$(echo "${EACH_MS[*]}" | median)
peak=$(echo "${PEAKS[*]}" | median)
list=$(echo "${LIST_MS[*]}" | median)
empty=$(echo "${EMPTY_MS[*]}" | median)
ratio=$(awk -v a="$fan" -v b="$each" 'BEGIN { printf "%.2f", a / b }')
growth=$(awk -v a="$peak" -v b="$RSS_BEFORE" 'BEGIN { printf "%.1f", (a - b) / 1024 }')
printf '\n%-58s %14s\n' "figure (median of $ROUNDS)" "value"
printf '%-58s %11s ms\n' "fan-out to $WORKERS workers, all replies gathered" "$fan"
printf '%-58s %11s ms\n' "the same, streamed as ndjson" "$ndjson"
printf '%-58s %11s ms\n' "baseline: $WORKERS addressed calls, 64 at a time" "$each"
printf '%-58s %14s\n' "fan-out / baseline" "${ratio}x"
printf '%-58s %10s KiB\n' "bridge RSS with $WORKERS workers, before" "$RSS_BEFORE"
printf '%-58s %10s KiB\n' "bridge peak RSS during the fan-outs (VmHWM)" "$peak"
printf '%-58s %10s MiB\n' "peak growth" "$growth"
printf '%-58s %11s B\n' "fan-out document size" "$FAN_SIZE"
printf '%-58s %11s ms\n' "presence, $PRESENCE_WORKERS workers listed" "$list"
printf '%-58s %11s ms\n' "floor: the same endpoint, empty list" "$empty"
printf '%-58s %11s B\n' "presence document size" "$LIST_SIZE"
mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<JSON
{"workers": $WORKERS, "rounds": $ROUNDS, "fanout_ms": $fan, "ndjson_ms": $ndjson,
 "addressed_calls_ms": $each, "fanout_over_addressed": $ratio,
 "rss_before_kib": $RSS_BEFORE, "peak_rss_kib": $peak, "fanout_bytes": $FAN_SIZE,
 "presence_workers": $PRESENCE_WORKERS, "presence_ms": $list, "presence_empty_ms": $empty,
 "presence_bytes": $LIST_SIZE}
JSON
say "wrote $OUT"
