#!/usr/bin/env bash
# Side-by-side benchmark of wsbridge against its peers (issue 5 item 1).
# See docs/PERFORMANCE.md for the method. In one run, with the same load
# generator (wrk + scripts/bench_post.lua) and the same POST bodies:
#
#   a-nginx  wrk -> nginx `return 200`                         (ceiling)
#   a-echo   wrk -> hyper echo server (examples/bench_echo.rs)  (ceiling)
#   b        wrk -> nginx proxy_pass, upstream keepalive -> nginx `return 200`
#   b-echo   wrk -> nginx proxy_pass, upstream keepalive -> the hyper echo (moves
#            the body both ways, as the echo worker does: the fair peer of c)
#   c        wrk -> wsbridge ==wss==> `wsbridge worker --echo`, default settings:
#            no flags, no tuning, tokio's default thread count (as users run it)
#   c1       as c, WSB_THREADS tokio threads per process and limits above any
#            concurrency (what every run before issue 21 measured as c-ng)
#   c-g      as c1, with the start gate on (`[http] start_gate = true`)
#   d        wrk -> wsbridge ==wss==> `wsbridge worker --upstream` -> nginx `return 200`,
#            default settings
#   d1       as d, tuned as c1
#   e        wrk -> rathole server <-tcp- rathole client -> nginx `return 200`
#   x        wrk -> wsbridge A -> NATS -> wsbridge B ==wss==> `wsbridge worker --echo`
#            (a cross-node call: A has no worker; one nats-server, scripts/nats-server;
#            compared with c, the same call to a local worker)
#
# Env knobs:
#   DURATION=10s   wrk duration of each measured run
#   ROUNDS=3       runs per scenario and point, interleaved A/B/A/B; medians reported
#   WARMUP=2s      unmeasured run before the first round of each scenario and point (0: none)
#   QUICK=1        smoke run: DURATION=2s ROUNDS=1 WARMUP=0 unless set explicitly
#   CONCS="1 64 1024"  SIZES="64 16384"  SCENARIOS="a-nginx a-echo b b-echo c c1 c-g d d1 e x"
#   OUT=bench/results.json   (relative to the repository root)
#   KEEP_TMP=1     keep the temp directory (configs, logs) after the run
#   WSB_THREADS=1  tokio worker threads of each wsbridge process in c1, c-g, d1
#                  and x (default 1:
#                  on two cores shared with wrk and the origin, one thread per
#                  process beats two - fewer cross-thread wake-ups - see
#                  docs/PERFORMANCE.md; empty = tokio's default, one per core).
#                  This is a multi-thread runtime with one worker, as in every
#                  run so far; `wsbridge --threads 1` (a current-thread runtime)
#                  trades some peak req/s at c=1024 for a lower p99, see there)
#   X_THREADS=     `wsbridge --threads N` for x's two bridges (unset: as c1,
#                  WSB_THREADS tokio threads); X_THREADS=1 runs each on one
#                  current-thread runtime, which batches NATS writes (see
#                  docs/CLUSTER.md, "Benchmark")
#   CARGO_TARGET_DIR  where wsbridge is built (default: target/)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-2s}
    ROUNDS=${ROUNDS:-1}
    WARMUP=${WARMUP:-0}
fi
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
CONCS=${CONCS:-"1 64 1024"}
SIZES=${SIZES:-"64 16384"}
SCENARIOS=${SCENARIOS:-"a-nginx a-echo b b-echo c c1 c-g d d1 e x"}
WSB_THREADS=${WSB_THREADS-1}
OUT=${OUT:-bench/results.json}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# Calls the worker takes at once, and bridge limits: well above the highest
# concurrency, so nothing queues inside wsbridge (wrk keeps at most one
# request in flight per connection).
WORKER_INFLIGHT=2048
START_TIMEOUT=30 # seconds any one server may take to become ready

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf 'bench.sh: %s\n' "$*" >&2
    exit 1
}
has() { command -v "$1" >/dev/null 2>&1; }
want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools ----
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"
APT_UPDATED=0
apt_install() {
    has apt-get || die "$1 is missing and there is no apt-get to install it"
    log "installing $* (apt-get)"
    if ! apt-get install -y "$@" >/dev/null 2>&1; then
        [[ $APT_UPDATED == 1 ]] || { apt-get update >/dev/null 2>&1 || true; APT_UPDATED=1; }
        apt-get install -y "$@" >/dev/null || die "apt-get install $* failed"
    fi
}
has wrk || apt_install wrk
has nginx || apt_install nginx
has curl || apt_install curl
has python3 || apt_install python3
RATHOLE_NOTE="cargo install rathole --locked"
if want e && ! has rathole; then
    log "installing rathole: cargo install rathole --locked"
    if ! cargo install rathole --locked; then
        # rathole 0.5.0's lock file pins time 0.3.29, which no longer compiles
        # on current rustc (E0282 in time's format_description). Fall back to
        # the same pinned release with fresh semver-compatible dependencies;
        # only the TCP transport is needed, so skip the TLS/noise/ws features.
        RATHOLE_NOTE="cargo install rathole --locked failed; used cargo install rathole --version 0.5.0 --no-default-features --features server,client"
        log "$RATHOLE_NOTE"
        cargo install rathole --version 0.5.0 --no-default-features --features server,client ||
            die "could not build rathole"
    fi
elif has rathole; then
    RATHOLE_NOTE="rathole found at $(command -v rathole)"
fi
has rathole || ! want e || die "rathole not found after install"

log "building wsbridge (release) and examples/bench_echo.rs"
# Two invocations: building an example turns on the dev-dependencies' features
# (tokio "full", "test-util"), which must not leak into the measured binary.
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --locked --bin wsbridge >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --locked --example bench_echo >&2
WSB=$TARGET_DIR/release/wsbridge
ECHO_BIN=$TARGET_DIR/release/examples/bench_echo

# --------------------------------------------------------------- limits ----
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
(($(ulimit -n) >= 8192)) || die "ulimit -n is $(ulimit -n); need at least 8192 for c=1024"
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------- process control ----
TMP=$(mktemp -d /tmp/wsbridge-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [[ ${KEEP_TMP:-0} == 1 || $rc != 0 ]]; then
        echo "bench.sh: logs and configs kept in $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports, all picked at once so they differ from each other.
read -r P_ORIGIN P_PROXY P_ECHO P_BR_C P_BRW_C P_BR_D P_BRW_D P_RH_CTL P_RH_PUB \
    P_BR_C1 P_BRW_C1 P_BR_D1 P_BRW_D1 P_NATS P_BR_XA P_BRW_XA P_BR_XB P_BRW_XB \
    P_BR_CG P_BRW_CG P_PROXY_ECHO < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(21):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

# start NAME CMD...: runs CMD in the background, logs to $TMP/NAME.log.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${name//-/_}=$!"
}

# wait_http NAME "PID..." URL: bounded wait until a POST to URL answers 200;
# fails at once if one of the processes exits.
wait_http() {
    local name=$1 pids=$2 url=$3 deadline=$((SECONDS + START_TIMEOUT)) pid
    while ((SECONDS < deadline)); do
        for pid in $pids; do
            kill -0 "$pid" 2>/dev/null || { tail -n 20 "$TMP"/*.log >&2; die "a process of $name exited during start-up"; }
        done
        if [[ $(curl -s -o /dev/null -m 5 -w '%{http_code}' -d probe "$url" || true) == 200 ]]; then
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$TMP/$name.log" >&2
    die "$name did not answer 200 at $url within ${START_TIMEOUT}s"
}

# nginx_conf DIR PORT LOCATION-BODY [HTTP-EXTRA]
nginx_conf() {
    local dir=$1 port=$2 location=$3 extra=${4:-}
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
# Generated by scripts/bench.sh. One worker process per core (2 on the
# reference machine), the same as tokio's default worker threads in wsbridge.
worker_processes auto;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    # 16 KiB bodies stay in memory (the default buffer is 8 KiB on x86-64).
    client_body_buffer_size 64k;
    client_max_body_size 1m;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    default_type text/plain;
    $extra
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / { $location }
    }
}
EOF
}

# Pids of a process and its children (nginx master + workers), from the
# parent pid in /proc/*/stat (no /proc/PID/task/*/children on every kernel).
with_children() {
    local pid=$1 f stat out=$1
    for f in /proc/[0-9]*/stat; do
        { stat=$(<"$f"); } 2>/dev/null || continue
        stat=${stat##*) }
        read -ra fields <<<"$stat"
        if [[ ${fields[1]} == "$pid" ]]; then out+=" ${f//[^0-9]/}"; fi
    done
    echo "$out"
}

# Sum of utime+stime (clock ticks) over the given pids.
cpu_ticks() {
    local total=0 pid stat
    for pid in "$@"; do
        { stat=$(<"/proc/$pid/stat"); } 2>/dev/null || continue
        stat=${stat##*) }
        read -ra f <<<"$stat"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# ---------------------------------------------------------------- servers ----
log "starting servers on 127.0.0.1 (temp dir $TMP)"
NEED_ORIGIN=0
for s in a-nginx b d d1 e; do want "$s" && NEED_ORIGIN=1; done

if ((NEED_ORIGIN)); then
    nginx_conf "$TMP/nginx-origin" "$P_ORIGIN" 'return 200 "ok\n";'
    start nginx-origin nginx -p "$TMP/nginx-origin" -c "$TMP/nginx-origin/nginx.conf" -e "$TMP/nginx-origin/logs/error.log"
    wait_http nginx-origin "$PID_nginx_origin" "http://127.0.0.1:$P_ORIGIN/"
fi
if want b; then
    nginx_conf "$TMP/nginx-proxy" "$P_PROXY" \
        'proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";' \
        "upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 1024; keepalive_requests 1000000; keepalive_timeout 120s; }"
    start nginx-proxy nginx -p "$TMP/nginx-proxy" -c "$TMP/nginx-proxy/nginx.conf" -e "$TMP/nginx-proxy/logs/error.log"
    wait_http nginx-proxy "$PID_nginx_proxy" "http://127.0.0.1:$P_PROXY/"
fi
if want a-echo || want b-echo; then
    start echo "$ECHO_BIN" "127.0.0.1:$P_ECHO"
    wait_http echo "$PID_echo" "http://127.0.0.1:$P_ECHO/"
fi
if want b-echo; then
    nginx_conf "$TMP/nginx-proxy-echo" "$P_PROXY_ECHO" \
        'proxy_pass http://echo; proxy_http_version 1.1; proxy_set_header Connection "";' \
        "upstream echo { server 127.0.0.1:$P_ECHO; keepalive 1024; keepalive_requests 1000000; keepalive_timeout 120s; }"
    start nginx-proxy-echo nginx -p "$TMP/nginx-proxy-echo" -c "$TMP/nginx-proxy-echo/nginx.conf" -e "$TMP/nginx-proxy-echo/logs/error.log"
    wait_http nginx-proxy-echo "$PID_nginx_proxy_echo" "http://127.0.0.1:$P_PROXY_ECHO/"
fi

# wsbridge: self-signed certificate, one bridge per scenario (so CPU is
# attributed cleanly), TLS on, access lines off (RUST_LOG=warn).
# bridge_conf FILE HTTP-PORT WORKER-PORT PROFILE [TAIL]. PROFILE `default`:
# the addresses, TLS and the token, nothing else (wsbridge's defaults);
# `tuned`: limits above any concurrency measured, so nothing queues inside
# wsbridge; `gate`: tuned, with the start gate on.
bridge_conf() {
    local file=$1 http=$2 wport=$3 profile=$4 tail=${5:-} limits=""
    if [[ $profile != default ]]; then
        limits=$'max_connections = 65536\nqueue_limit = 65536\nqueue_timeout = "30s"\nrequest_timeout = "60s"'
    fi
    if [[ $profile == gate ]]; then limits+=$'\nstart_gate = true'; fi
    cat >"$file" <<EOF
# Generated by scripts/bench.sh (profile $profile)
default_service = "default"
shutdown_timeout = "1s"
[http]
listen = "127.0.0.1:$http"
$limits
# One bridge per scenario: no admin listener (its default port would clash).
[admin]
enabled = false
[workers]
listen = "127.0.0.1:$wport"
tls = true
tls_cert = "$TMP/certs/server.crt"
tls_key = "$TMP/certs/server.key"
tokens = ["bench-token"]
$tail
EOF
    "$WSB" check-config "$file" >/dev/null
}
if want c || want c1 || want c-g || want d || want d1 || want x; then
    "$WSB" gen-cert --out "$TMP/certs" >/dev/null 2>&1
    export WSBRIDGE_TOKEN=bench-token
fi
# The environment of a tuned process: WSB_THREADS tokio threads.
tuned_env() { echo "TOKIO_WORKER_THREADS=${WSB_THREADS:-$(nproc)}"; }
start_bridge() { # LETTER HTTP-PORT WORKER-PORT PROFILE WORKER-MODE...
    local x=$1 http=$2 wport=$3 profile=$4 threads
    shift 4
    bridge_conf "$TMP/bridge-$x.toml" "$http" "$wport" "$profile"
    # default: no thread count and no worker flags but the mode; tokio's
    # own default (one thread per core) even if the caller's shell sets one.
    local -a tune=(--max-inflight "$WORKER_INFLIGHT")
    threads=$(tuned_env)
    [[ $profile == default ]] && { tune=(); threads=RUST_LOG=warn; }
    start "bridge-$x" env -u TOKIO_WORKER_THREADS RUST_LOG=warn "$threads" "$WSB" serve --config "$TMP/bridge-$x.toml"
    start "worker-$x" env -u TOKIO_WORKER_THREADS RUST_LOG=warn "$threads" "$WSB" worker --connect "wss://127.0.0.1:$wport" \
        --ca "$TMP/certs/server.crt" --service default "${tune[@]}" --id "bench-$x" "$@"
    local pid_var="PID_bridge_$x" wpid_var="PID_worker_$x"
    wait_http "bridge-$x" "${!pid_var} ${!wpid_var}" "http://127.0.0.1:$http/"
}
want c && start_bridge c "$P_BR_C" "$P_BRW_C" default --echo
want d && start_bridge d "$P_BR_D" "$P_BRW_D" default --upstream "http://127.0.0.1:$P_ORIGIN"
want c1 && start_bridge c1 "$P_BR_C1" "$P_BRW_C1" tuned --echo
want d1 && start_bridge d1 "$P_BR_D1" "$P_BRW_D1" tuned --upstream "http://127.0.0.1:$P_ORIGIN"
# The start gate (PROTOCOL 3.7): one more bridge-worker round trip per POST,
# so that a POST its worker never started can go to another worker.
want c-g && start_bridge cg "$P_BR_CG" "$P_BRW_CG" gate --echo

if want x; then
    NATS_BIN=$("$ROOT/scripts/nats-server")
    start nats "$NATS_BIN" -a 127.0.0.1 -p "$P_NATS"
    cluster_toml() { printf '[cluster]\nnats = ["nats://127.0.0.1:%s"]\nnode = "%s"\nname = "bench"\n' "$P_NATS" "$1"; }
    # A: the bridge wrk calls; no worker of its own.
    bridge_conf "$TMP/bridge-xa.toml" "$P_BR_XA" "$P_BRW_XA" tuned "$(cluster_toml node-a)"
    xthreads=()
    [[ -n ${X_THREADS:-} ]] && xthreads=(--threads "$X_THREADS")
    RUST_LOG=warn TOKIO_WORKER_THREADS=${WSB_THREADS:-$(nproc)} start bridge-xa "$WSB" "${xthreads[@]}" serve --config "$TMP/bridge-xa.toml"
    # B: the echo worker's bridge.
    bridge_conf "$TMP/bridge-xb.toml" "$P_BR_XB" "$P_BRW_XB" tuned "$(cluster_toml node-b)"
    RUST_LOG=warn TOKIO_WORKER_THREADS=${WSB_THREADS:-$(nproc)} start bridge-xb "$WSB" "${xthreads[@]}" serve --config "$TMP/bridge-xb.toml"
    RUST_LOG=warn TOKIO_WORKER_THREADS=${WSB_THREADS:-$(nproc)} start worker-xb "$WSB" worker --connect "wss://127.0.0.1:$P_BRW_XB" \
        --ca "$TMP/certs/server.crt" --service default --max-inflight "$WORKER_INFLIGHT" --id bench-xb --echo
    wait_http bridge-x "$PID_bridge_xa $PID_bridge_xb $PID_worker_xb $PID_nats" "http://127.0.0.1:$P_BR_XA/"
fi

if want e; then
    cat >"$TMP/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$P_RH_CTL"
[server.transport]
type = "tcp"
[server.services.bench]
token = "bench-token"
bind_addr = "127.0.0.1:$P_RH_PUB"
EOF
    cat >"$TMP/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$P_RH_CTL"
[client.transport]
type = "tcp"
[client.services.bench]
token = "bench-token"
local_addr = "127.0.0.1:$P_ORIGIN"
EOF
    RUST_LOG=warn start rathole-server rathole --server "$TMP/rathole-server.toml"
    RUST_LOG=warn start rathole-client rathole --client "$TMP/rathole-client.toml"
    wait_http rathole "$PID_rathole_server $PID_rathole_client" "http://127.0.0.1:$P_RH_PUB/"
fi

# Sanity: the echo paths really echo.
for url in ${PID_echo:+http://127.0.0.1:$P_ECHO/} ${PID_bridge_c:+http://127.0.0.1:$P_BR_C/} \
    ${PID_bridge_c1:+http://127.0.0.1:$P_BR_C1/} ${PID_bridge_cg:+http://127.0.0.1:$P_BR_CG/} \
    ${PID_nginx_proxy_echo:+http://127.0.0.1:$P_PROXY_ECHO/} ${PID_bridge_xa:+http://127.0.0.1:$P_BR_XA/}; do
    [[ $(curl -s -m 5 -d sanity-check "$url") == sanity-check ]] || die "$url does not echo"
done

# Scenario table: URL, the processes doing the hop being compared, and the
# origin processes behind it (CPU is reported for both).
declare -A URL HOP ORIGIN
origin_pids() { with_children "$PID_nginx_origin"; }
URL[a-nginx]=http://127.0.0.1:$P_ORIGIN/
URL[a-echo]=http://127.0.0.1:$P_ECHO/
URL[b]=http://127.0.0.1:$P_PROXY/
URL[c]=http://127.0.0.1:$P_BR_C/
URL[d]=http://127.0.0.1:$P_BR_D/
URL[b-echo]=http://127.0.0.1:$P_PROXY_ECHO/
URL[c1]=http://127.0.0.1:$P_BR_C1/
URL[c-g]=http://127.0.0.1:$P_BR_CG/
URL[d1]=http://127.0.0.1:$P_BR_D1/
URL[e]=http://127.0.0.1:$P_RH_PUB/
URL[x]=http://127.0.0.1:$P_BR_XA/
want a-nginx && { HOP[a-nginx]=""; ORIGIN[a-nginx]=$(origin_pids); }
want a-echo && { HOP[a-echo]=""; ORIGIN[a-echo]=$PID_echo; }
want b && { HOP[b]=$(with_children "$PID_nginx_proxy"); ORIGIN[b]=$(origin_pids); }
want c && { HOP[c]="$PID_bridge_c $PID_worker_c"; ORIGIN[c]=""; }
want d && { HOP[d]="$PID_bridge_d $PID_worker_d"; ORIGIN[d]=$(origin_pids); }
want b-echo && { HOP[b-echo]=$(with_children "$PID_nginx_proxy_echo"); ORIGIN[b-echo]=$PID_echo; }
want c1 && { HOP[c1]="$PID_bridge_c1 $PID_worker_c1"; ORIGIN[c1]=""; }
want c-g && { HOP[c-g]="$PID_bridge_cg $PID_worker_cg"; ORIGIN[c-g]=""; }
want d1 && { HOP[d1]="$PID_bridge_d1 $PID_worker_d1"; ORIGIN[d1]=$(origin_pids); }
want e && { HOP[e]="$PID_rathole_server $PID_rathole_client"; ORIGIN[e]=$(origin_pids); }
want x && { HOP[x]="$PID_bridge_xa $PID_nats $PID_bridge_xb $PID_worker_xb"; ORIGIN[x]=""; }

# ------------------------------------------------------------------- runs ----
RUNS=$TMP/runs.jsonl
: >"$RUNS"
n_scen=$(wc -w <<<"$SCENARIOS")
n_runs=$((n_scen * $(wc -w <<<"$CONCS") * $(wc -w <<<"$SIZES") * ROUNDS))
log "logging: nginx access_log off; wsbridge bridge and worker RUST_LOG=warn (no access lines)"
log "threads: nginx worker_processes auto ($(nproc)) per instance; wsbridge c and d tokio's default (one per core), c1, c-g, d1 and x TOKIO_WORKER_THREADS=${WSB_THREADS:-default (one per core)} per process"
log "$n_runs measured runs of $DURATION (ROUNDS=$ROUNDS, WARMUP=$WARMUP), scenarios interleaved per point"

run_wrk() { # URL CONC SIZE DURATION -> wrk output
    local threads=2
    (($2 < 2)) && threads=1
    BENCH_BODY_BYTES=$3 wrk -t"$threads" -c"$2" -d"$4" --timeout 10s \
        -s "$ROOT/scripts/bench_post.lua" "$1"
}

# Connections in TIME_WAIT. Every run closes C connections, and a path that
# opens a connection per call (a pool too small for C) leaves thousands more;
# on loopback they pin ephemeral ports for 60 s, and once a destination runs
# out, connects fail (wrk counts them as connect errors). So a run does not
# start while more than half of the port range is pinned.
read -r PORT_LO PORT_HI </proc/sys/net/ipv4/ip_local_port_range
TW_LIMIT=$(((PORT_HI - PORT_LO) / 2))
tw_count() { if has ss; then ss -Htan state time-wait | wc -l; else echo 0; fi; }
wait_tw() {
    local deadline=$((SECONDS + 70)) n
    while n=$(tw_count) && ((n > TW_LIMIT && SECONDS < deadline)); do
        log "$n connections in TIME_WAIT (limit $TW_LIMIT): waiting for them to expire"
        sleep 5
    done
}

i=0
for conc in $CONCS; do
    for size in $SIZES; do
        for round in $(seq "$ROUNDS"); do
            # Alternate the order every round (A B .. / .. B A) as well, so a
            # scenario is not always the one that runs right after another.
            order=$SCENARIOS
            ((round % 2 == 0)) && order=$(tr ' ' '\n' <<<"$SCENARIOS" | tac | tr '\n' ' ')
            for s in $order; do
                if ((round == 1)) && [[ $WARMUP != 0 ]]; then
                    run_wrk "${URL[$s]}" "$conc" "$size" "$WARMUP" >/dev/null
                fi
                i=$((i + 1))
                wait_tw
                hop0=$(cpu_ticks ${HOP[$s]})
                org0=$(cpu_ticks ${ORIGIN[$s]})
                out=$(run_wrk "${URL[$s]}" "$conc" "$size" "$DURATION")
                sleep 0.3 # let the servers finish closing wrk's connections
                hop1=$(cpu_ticks ${HOP[$s]})
                org1=$(cpu_ticks ${ORIGIN[$s]})
                json=$(grep '^BENCHJSON ' <<<"$out" | sed 's/^BENCHJSON //') ||
                    die "no result from wrk for $s c=$conc size=$size: $out"
                printf '{"scenario":"%s","conc":%d,"size":%d,"round":%d,"hop_ticks":%d,"origin_ticks":%d,"clk_tck":%d,"wrk":%s}\n' \
                    "$s" "$conc" "$size" "$round" $((hop1 - hop0)) $((org1 - org0)) "$CLK_TCK" "$json" >>"$RUNS"
                printf '   [%d/%d] %-8s c=%-4d %5dB round %d: %s req/s\n' "$i" "$n_runs" "$s" "$conc" "$size" "$round" \
                    "$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["rps"]))' "$json")" >&2
            done
        done
    done
done

# ----------------------------------------------------------------- report ----
mkdir -p "$(dirname "$OUT")"
export BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS BENCH_WARMUP=$WARMUP BENCH_QUICK=$QUICK BENCH_WSB_THREADS=$WSB_THREADS BENCH_X_THREADS=${X_THREADS:-}
export BENCH_RATHOLE_NOTE=$RATHOLE_NOTE BENCH_WORKER_INFLIGHT=$WORKER_INFLIGHT
export BENCH_NGINX_VERSION="$(nginx -v 2>&1)" BENCH_WRK_VERSION="$(wrk -v 2>&1 | head -n 1)"
export BENCH_RATHOLE_VERSION="$(has rathole && rathole -V 2>&1 | head -n 1 || true)"
export BENCH_GIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
python3 "$ROOT/scripts/bench_report.py" "$RUNS" "$OUT"
