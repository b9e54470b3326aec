#!/usr/bin/env bash
# mcp-tunnel against raw tunnels, in one run on loopback (issue 7, item 4).
#
# Measures the same MCP workloads over four paths, each with its own fresh processes:
#   direct   the bench straight to the lean demo upstream (`demo --upstream-only`)
#   quic     relay + connect binaries over QUIC (policy and audit on)
#   https    the same over the HTTPS fallback (`connect --transport https`)
#   rathole  rathole server + client (noise transport) forwarding the upstream's HTTP port
# and the raw ceilings (examples/raw.rs): one quinn stream and one TLS-over-TCP connection, each
# between two processes: a bulk transfer, and the round trip of a small message on an open stream.
#
# Workloads: echo latency at concurrency 1 (p50, p99); calls/s with 64 concurrent sessions; a
# 100 MiB `blob` result (MB/s, MB = 10^6 bytes); 1,000 and 10,000 open idle sessions (KiB of
# VmRSS per session on each side); time to first answer for a new session (initialize +
# notifications/initialized + tools/call) on an established connection.
#
# Prints a Markdown table on stdout (progress on stderr). Usage:
#   benches/compare.sh                        # from the crate root; CARGO_TARGET_DIR is honoured
#   DURATION=5 IDLE_COUNTS=1000,10000 BLOB_BYTES=104857600 BLOB_CALLS=3 PATHS="direct quic https rathole" benches/compare.sh
#   WORKERS=1 benches/compare.sh           # the tunnels' processes (ours and rathole's) on one tokio worker
#   SSE=1 benches/compare.sh               # the upstream answers in SSE events (the SDK servers' default)
#   BASELINE=/tmp/old/mcp-tunnel benches/compare.sh
#       # before/after in one run: the path "base" is the QUIC tunnel of that older binary,
#       # measured like "quic" and printed beside it with the ratios new/old
#   PROFILE=/tmp/prof PATHS="quic rathole" IDLE_COUNTS=10 benches/compare.sh
#       # perf profiles of both sides of each tunnel at saturation: /tmp/prof/PATH-{server,client}.data,
#       # read with `perf report -i FILE --no-children`; software cpu-clock events, so they work
#       # on VMs without hardware counters (the figures of that run carry perf's own cost)
# rathole is installed with `cargo install rathole` under $CARGO_TARGET_DIR/tools (never committed).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-5}              # seconds of each rate workload
IDLE_COUNTS=${IDLE_COUNTS:-1000,10000}
BLOB_BYTES=${BLOB_BYTES:-104857600}  # 100 MiB
BLOB_CALLS=${BLOB_CALLS:-3}
FIRST_CALLS=${FIRST_CALLS:-200}
ECHO_ROUNDS=${ECHO_ROUNDS:-5000}     # round trips of the raw ceilings' echo
SATURATION=${SATURATION:-64}
BASELINE=${BASELINE:-}               # an older mcp-tunnel binary: its relay and connect over QUIC are measured too (path "base")
PATHS=${PATHS:-direct quic https rathole${BASELINE:+ base}}
AUDIT=${AUDIT:-1}                    # 0: the relay runs without [audit] (to see what auditing costs)
SSE=${SSE:-0}                        # 1: the upstream answers with one SSE event per request (as the SDK servers do), not JSON
WORKERS=${WORKERS:-}                 # tokio worker threads of relay, connect and rathole (empty: one per core)
PROFILE=${PROFILE:-}                 # a directory: perf profiles (cpu-clock, call graphs) of each tunnel's two processes during the saturation workload
READY_SECS=${READY_SECS:-60}         # bound on every readiness wait
MAX_MESSAGE=$((128 * 1024 * 1024))   # relay and connect frame limit: room for the 100 MiB result
# Relay session caps: room for the largest idle count (and the warm-up's sessions) from one key.
SESSION_CAP=$((2 * $(tr ',' '\n' <<<"$IDLE_COUNTS" | sort -n | tail -1) + 1000))
RATHOLE_ROOT=$TARGET/tools/rathole
RATHOLE=$RATHOLE_ROOT/bin/rathole

# How the tunnels' processes start: with TOKIO_WORKER_THREADS when WORKERS is set.
TUNNEL_ENV=(env)
[[ -n $WORKERS ]] && TUNNEL_ENV+=("TOKIO_WORKER_THREADS=$WORKERS")

LOG_TAG=compare
UPSTREAM_SSE=
[[ $SSE == 1 ]] && UPSTREAM_SSE=1
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ------------------------------------------------------------------------------------------
# Build.

cd "$ROOT"
log "building release (target dir $TARGET)"
cargo build --release --quiet --bin mcp-tunnel --example raw --example sessions
BIN=$TARGET/release/mcp-tunnel
EX=$TARGET/release/examples

if [[ " $PATHS " == *" rathole "* && ! -x $RATHOLE ]]; then
    log "installing rathole under $RATHOLE_ROOT"
    if ! CARGO_TARGET_DIR=$TARGET/rathole-build cargo install rathole --locked --root "$RATHOLE_ROOT" \
        >"$WORK/rathole-install-locked.log" 2>&1; then
        # rathole 0.5.0's lock file pins time 0.3.29, which newer rustc (1.80+) rejects
        # (E0282 in time's format_description); the same versions' semver-latest patches build.
        log "cargo install rathole --locked failed: $(grep -m1 -E '^error' "$WORK/rathole-install-locked.log" || true)"
        log "retrying without --locked (semver-compatible updates of its dependencies)"
        CARGO_TARGET_DIR=$TARGET/rathole-build cargo install rathole --root "$RATHOLE_ROOT" \
            >"$WORK/rathole-install.log" 2>&1 || die "rathole does not build: see $WORK/rathole-install.log"
    fi
fi

make_secrets

# ------------------------------------------------------------------------------------------
# Processes of each path.

# start_tunnel TRANSPORT [BINARY NAME]: relay (policy: a role allowing demo/*; audit on) and
# connect, of BINARY (default: this tree's), their files under $WORK/NAME (default: TRANSPORT).
start_tunnel() {
    local transport=$1 bin=${2:-$BIN} tunnel agents admin dir=$WORK/${3:-$1}
    mkdir -p "$dir"
    tunnel=$(free_port) agents=$(free_port) admin=$(free_port)
    cat >"$dir/relay.toml" <<EOF
$(relay_listeners "$tunnel" "$agents" "$admin")

$( ((AUDIT)) && printf '[audit]\npath = "%s"\n' "$dir/audit.db")

[limits]
max_message_bytes = $MAX_MESSAGE
# Room for the idle-session workload (one key opens them all), past the per-caller defaults.
max_sessions_per_key = $SESSION_CAP
max_sessions_per_tenant = $SESSION_CAP
max_sessions_per_source = $SESSION_CAP

$(bench_tenant "demo/*")
EOF
    cat >"$dir/connect.toml" <<EOF
relay = "localhost:$tunnel"
ca = "$WORK/certs/ca.pem"
token = "$TOKEN"
transport = "$transport"
max_message_bytes = $MAX_MESSAGE

[[sources]]
name = "demo"
url = "$UPSTREAM_URL"
EOF
    start "relay-${3:-$1}" "${TUNNEL_ENV[@]}" "$bin" relay --config "$dir/relay.toml"
    SERVER_PID=$LAST_PID
    wait_until "relay" "$SERVER_PID" curl -sf -m 2 "http://127.0.0.1:$admin/healthz"
    start "connect-${3:-$1}" "${TUNNEL_ENV[@]}" "$bin" connect --config "$dir/connect.toml"
    CLIENT_PID=$LAST_PID
    wait_until "connect ($transport)" "$CLIENT_PID" tunnel_up "127.0.0.1:$admin"
    URL=http://127.0.0.1:$agents/mcp/demo
    URL_KEY=$KEY
}

# rathole_toml SIDE ADDR_KEY CTRL_PORT NOISE_KEY NOISE SERVICE_ADDR_KEY SERVICE_PORT: the
# config of rathole's server or client (SIDE), on loopback: the control channel at CTRL_PORT,
# noise with the key NOISE, and service mcp (token $TOKEN) at SERVICE_PORT.
rathole_toml() {
    cat <<EOF
[$1]
$2 = "127.0.0.1:$3"
[$1.transport]
type = "noise"
[$1.transport.noise]
$4 = "$5"
[$1.services.mcp]
token = "$TOKEN"
$6 = "127.0.0.1:$7"
EOF
}

start_rathole() {
    local ctrl visit keys private public dir=$WORK/rathole upstream_port
    mkdir -p "$dir"
    ctrl=$(free_port) visit=$(free_port)
    upstream_port=${UPSTREAM_URL#http://127.0.0.1:}
    upstream_port=${upstream_port%/mcp}
    keys=$("$RATHOLE" --genkey)
    private=$(awk '/Private Key/ {getline; print}' <<<"$keys")
    public=$(awk '/Public Key/ {getline; print}' <<<"$keys")
    rathole_toml server bind_addr "$ctrl" local_private_key "$private" bind_addr "$visit" \
        >"$dir/server.toml"
    rathole_toml client remote_addr "$ctrl" remote_public_key "$public" local_addr "$upstream_port" \
        >"$dir/client.toml"
    start rathole-server "${TUNNEL_ENV[@]}" "$RATHOLE" --server "$dir/server.toml"
    SERVER_PID=$LAST_PID
    start rathole-client "${TUNNEL_ENV[@]}" "$RATHOLE" --client "$dir/client.toml"
    CLIENT_PID=$LAST_PID
    URL=http://127.0.0.1:$visit/mcp
    URL_KEY=
    wait_until "rathole" "$SERVER_PID" http_answers "$URL"
}

# ------------------------------------------------------------------------------------------
# Workloads. Results go to R[path.metric].

declare -A R

# bench_json ARGS...: one bench run's JSON (fails the script on any error); the bench's own CPU
# time goes to $WORK/bench.time as "user system" seconds when /usr/bin/time is there.
bench_json() {
    local out timer=()
    [[ -x /usr/bin/time ]] && timer=(/usr/bin/time -f '%U %S' -o "$WORK/bench.time")
    out=$("${timer[@]}" "$BIN" bench --url "$URL" ${URL_KEY:+--key "$URL_KEY"} --json "$@" 2>/dev/null) || true
    [[ -n $out ]] || die "bench $* on $URL printed nothing"
    local errors
    errors=$(jq -r '.errors' <<<"$out")
    [[ $errors == 0 ]] || die "bench $* on $URL: $errors errors: $(jq -c '.errors_by_kind' <<<"$out")"
    printf '%s' "$out"
}

# Opens IDLE_COUNTS sessions step by step and reads both sides' VmRSS around each step.
measure_idle() {
    local p=$1 server=$2 client=$3 line count
    local base_s base_c
    base_s=$(rss_kib "$server")
    base_c=$( [[ -n $client ]] && rss_kib "$client" || echo 0)
    coproc HOLD { exec "$EX/sessions" hold --url "$URL" ${URL_KEY:+--key "$URL_KEY"} --counts "$IDLE_COUNTS" 2>"$WORK/hold-$p.log"; }
    local hold_pid=$HOLD_PID
    PIDS+=("$hold_pid")
    local steps
    IFS=, read -ra steps <<<"$IDLE_COUNTS"
    for count in "${steps[@]}"; do
        read -r -t 300 line <&"${HOLD[0]}" || die "$p: holding $count sessions: no answer within 300 s"
        [[ $line =~ ^held\ ([0-9]+)\ failed\ ([0-9]+) ]] || die "$p: unexpected: $line"
        [[ ${BASH_REMATCH[1]} == "$count" && ${BASH_REMATCH[2]} == 0 ]] || die "$p: $line (wanted $count)"
        R[$p.idle$count.server]=$(calc "($(rss_kib "$server") - $base_s) / $count")
        [[ -n $client ]] && R[$p.idle$count.client]=$(calc "($(rss_kib "$client") - $base_c) / $count")
        R[$p.idle$count.open_secs]=$(awk '{print $6}' <<<"$line")
        log "$p: $line; server +${R[$p.idle$count.server]} KiB/session${client:+, client +${R[$p.idle$count.client]:-} KiB/session}"
        echo go >&"${HOLD[1]}"
    done
    read -r -t 300 line <&"${HOLD[0]}" || die "$p: closing sessions: no answer within 300 s"
    log "$p: $line"
    stop_pid "$hold_pid" # it exits by itself after `closed`; this bounds the wait
}

# CPU accounting around one workload: cpu_start SERVER CLIENT, then
# cpu_per PATH METRIC SERVER CLIENT CALLS SCALE sets R[PATH.METRIC.cpu_{server,client,upstream,bench}]
# to CPU seconds * SCALE / CALLS (SCALE 10^6: µs per call; 10^3: ms per call).
cpu_start() { CPU0=("$(cpu_ms "${1:-}")" "$(cpu_ms "${2:-}")" "$(cpu_ms "$UPSTREAM_PID")"); }
cpu_per() {
    local p=$1 m=$2 calls=$5 scale=$6
    ((calls > 0)) || return 0
    local now=("$(cpu_ms "${3:-}")" "$(cpu_ms "${4:-}")" "$(cpu_ms "$UPSTREAM_PID")")
    if [[ $p != direct ]]; then
        R[$p.$m.cpu_server]=$(calc "(${now[0]} - ${CPU0[0]}) / 1000 * $scale / $calls")
        R[$p.$m.cpu_client]=$(calc "(${now[1]} - ${CPU0[1]}) / 1000 * $scale / $calls")
    fi
    R[$p.$m.cpu_upstream]=$(calc "(${now[2]} - ${CPU0[2]}) / 1000 * $scale / $calls")
    [[ -s $WORK/bench.time ]] &&
        R[$p.$m.cpu_bench]=$(awk -v s="$scale" -v c="$calls" '{ printf "%.6g", ($1 + $2) * s / c }' "$WORK/bench.time")
    return 0
}

# profile_start PATH SERVER CLIENT: perf records both processes (software cpu-clock samples, DWARF
# call graphs) into $PROFILE/PATH-{server,client}.data until profile_stop.
PERF_PIDS=()
profile_start() {
    local p=$1 side pid
    command -v perf >/dev/null || die "PROFILE needs perf (apt-get install linux-perf)"
    mkdir -p "$PROFILE"
    for side in server client; do
        pid=$2
        [[ $side == client ]] && pid=$3
        perf record -q -e cpu-clock -F 999 --call-graph dwarf -p "$pid" -o "$PROFILE/$p-$side.data" \
            >"$WORK/perf-$p-$side.log" 2>&1 &
        PERF_PIDS+=("$!")
    done
    sleep 0.5 # perf attaches asynchronously; a half second of saturation unprofiled is fine
}
profile_stop() {
    local pid
    for pid in "${PERF_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PERF_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PERF_PIDS=()
}

measure_path() {
    local p=$1 server=${2:-} client=${3:-} out
    log "$p: warm-up"
    bench_json --concurrency 4 --calls 2000 >/dev/null

    if [[ -n $server ]]; then
        measure_idle "$p" "$server" "$client"
    fi

    log "$p: first call of new sessions"
    out=$("$EX/sessions" first-call --url "$URL" ${URL_KEY:+--key "$URL_KEY"} --count "$FIRST_CALLS")
    R[$p.first_p50]=$(jq -r .first_call_p50_ms <<<"$out")
    R[$p.first_p99]=$(jq -r .first_call_p99_ms <<<"$out")
    R[$p.first_call_p50]=$(jq -r .call_p50_ms <<<"$out")

    log "$p: echo latency, concurrency 1"
    out=$(bench_json --concurrency 1 --sessions 1 --duration "$DURATION")
    R[$p.p50]=$(jq -r .p50_ms <<<"$out")
    R[$p.p99]=$(jq -r .p99_ms <<<"$out")

    log "$p: saturation, $SATURATION sessions"
    [[ -n $PROFILE && $p != direct ]] && profile_start "$p" "$server" "$client"
    cpu_start "$server" "$client"
    out=$(bench_json --concurrency "$SATURATION" --sessions "$SATURATION" --duration "$DURATION")
    [[ -n $PROFILE && $p != direct ]] && profile_stop
    R[$p.cps]=$(jq -r .calls_per_sec <<<"$out")
    cpu_per "$p" cps "$server" "$client" "$(jq -r .calls <<<"$out")" 1000000

    log "$p: blob of $BLOB_BYTES bytes x $BLOB_CALLS"
    cpu_start "$server" "$client"
    out=$(bench_json --tool blob --payload "$BLOB_BYTES" --concurrency 1 --sessions 1 --calls "$BLOB_CALLS" --timeout 120)
    R[$p.blob]=$(jq -r .mb_per_sec <<<"$out")
    cpu_per "$p" blob "$server" "$client" "$(jq -r .calls <<<"$out")" 1000
    log "$p: p50 ${R[$p.p50]} ms, p99 ${R[$p.p99]} ms, $(num %.0f "${R[$p.cps]}") calls/s, $(num %.1f "${R[$p.blob]}") MB/s, first call ${R[$p.first_p50]} ms"
}

raw_ceiling() {
    local name=$1 addr out
    start "raw-$name-server" "$EX/raw" --transport "$name" server --cert "$WORK/certs/relay.pem" --key "$WORK/certs/relay.key"
    local pid=$LAST_PID
    wait_until "raw $name server" "$pid" line_in "$WORK/raw-$name-server.log" '^listening '
    addr=$(line_in "$WORK/raw-$name-server.log" '^listening ' | awk '{print $2}')
    out=$("$EX/raw" --transport "$name" client --addr "$addr" --ca "$WORK/certs/ca.pem" bulk --bytes "$BLOB_BYTES" --rounds "$BLOB_CALLS")
    R[raw_$name.blob]=$(jq -r .median_mb_per_sec <<<"$out")
    out=$("$EX/raw" --transport "$name" client --addr "$addr" --ca "$WORK/certs/ca.pem" echo --rounds "$ECHO_ROUNDS")
    R[raw_$name.p50]=$(jq -r .p50_ms <<<"$out")
    R[raw_$name.p99]=$(jq -r .p99_ms <<<"$out")
    log "raw $name: $(num %.1f "${R[raw_$name.blob]}") MB/s (median of $BLOB_CALLS); echo of 200 bytes p50 ${R[raw_$name.p50]} ms, p99 ${R[raw_$name.p99]} ms"
    stop_all
}

# ------------------------------------------------------------------------------------------
# Run.

log "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load before: $LOAD_BEFORE"

for p in $PATHS; do
    start_upstream
    case $p in
        direct) URL=$UPSTREAM_URL URL_KEY=; measure_path direct "$UPSTREAM_PID" "" ;;
        quic | https) start_tunnel "$p"; measure_path "$p" "$SERVER_PID" "$CLIENT_PID" ;;
        base)
            [[ -x $BASELINE ]] || die "path base needs BASELINE, an mcp-tunnel binary"
            start_tunnel quic "$BASELINE" base
            measure_path base "$SERVER_PID" "$CLIENT_PID"
            ;;
        rathole) start_rathole; measure_path rathole "$SERVER_PID" "$CLIENT_PID" ;;
        *) die "unknown path $p" ;;
    esac
    stop_all
done
raw_ceiling quic
raw_ceiling tls
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
log "load after: $LOAD_AFTER"

# ------------------------------------------------------------------------------------------
# Report.

# ratio A B: A/B to two places, or empty.
ratio() { has "$1" && has "$2" && awk "BEGIN { b = ${R[$2]}; if (b > 0) printf \"%.2f\", ${R[$1]} / b }"; }
added() { [[ $1 != direct.* ]] && has "$1" && has "$2" && awk "BEGIN { printf \"%+.3f ms\", ${R[$1]} - ${R[$2]} }"; }

declare -A NAME=([direct]="direct" [quic]="mcp-tunnel QUIC" [https]="mcp-tunnel HTTPS" [base]="baseline QUIC"
    [rathole]="rathole (noise)" [raw_quic]="raw quinn, 1 stream" [raw_tls]="raw TLS over TCP")

row() { # row WORKLOAD PATH METRIC FORMAT NOTE
    local w=$1 p=$2 m=$3 f=$4 note=${5:-} key=$2.$3
    has "$key" || return 0
    local vd="" vr=""
    # Idle sessions: the direct row is the upstream's own cost, not a path to compare with.
    [[ $m != idle* ]] && vd=$(ratio "$key" "direct.$m" || true)
    [[ $p == quic || $p == https || $p == base ]] && vr=$(ratio "$key" "rathole.$m" || true)
    printf '| %s | %s | %s | %s | %s | %s |\n' "$w" "${NAME[$p]}" "$(num "$f" "${R[$key]}")" \
        "${vd:+${vd}x}" "${vr:+${vr}x}" "$note"
}

cpu_note() { # cpu_note PATH METRIC: each process's share of the CPU per call
    local p=$1 m=$2 side client
    side="relay"; client="connect"
    [[ $p == rathole ]] && side="server" client="client"
    has "$p.$m.cpu_upstream" || return 0
    if [[ $p != direct ]]; then
        printf '%s %s, %s %s, ' "$side" "$(num %.0f "${R[$p.$m.cpu_server]}")" "$client" "$(num %.0f "${R[$p.$m.cpu_client]}")"
    fi
    printf 'upstream %s' "$(num %.0f "${R[$p.$m.cpu_upstream]}")"
    has "$p.$m.cpu_bench" && printf ', bench %s' "$(num %.0f "${R[$p.$m.cpu_bench]}")"
}

echo
echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r); load average before $LOAD_BEFORE, after $LOAD_AFTER."
[[ -x $RATHOLE ]] && echo "rathole $("$RATHOLE" --version | awk '/Build Version/ {print $3}'), noise transport; relay audit: $( ((AUDIT)) && echo on || echo off); upstream answers: $([[ -n $UPSTREAM_SSE ]] && echo "one SSE event" || echo JSON); tokio workers of the tunnels: ${WORKERS:-one per core}; $DURATION s per rate workload, $BLOB_CALLS blob results, $FIRST_CALLS new sessions."
echo
echo "| workload | path | figure | vs direct | vs rathole | note |"
echo "|---|---|---|---|---|---|"
for q in p50 p99; do
    for p in direct quic https base rathole; do
        row "echo $q latency, c=1 (ms)" "$p" $q "%.3f" "$(added "$p.$q" direct.$q || true)"
    done
    # The transports alone: one round trip of a 200-byte message on an open stream.
    for p in raw_quic raw_tls; do
        row "echo $q latency, c=1 (ms)" "$p" $q "%.3f" "one round trip on an open stream, no HTTP"
    done
done
for p in direct quic https base rathole; do
    row "calls/s, $SATURATION sessions" "$p" cps "%.0f" "CPU µs per call: $(cpu_note "$p" cps)"
done
for p in direct quic https base rathole raw_quic raw_tls; do
    note=""
    [[ $p != raw_quic ]] && has raw_quic.blob && has "$p.blob" &&
        note="$(awk "BEGIN { printf \"%.0f%%\", 100 * ${R[$p.blob]} / ${R[raw_quic.blob]} }") of raw quinn"
    has "$p.blob.cpu_upstream" && note="$note; CPU ms per result: $(cpu_note "$p" blob)"
    row "$((BLOB_BYTES / 1048576)) MiB blob result (MB/s)" "$p" blob "%.1f" "${note#; }"
done
IFS=, read -ra STEPS <<<"$IDLE_COUNTS"
for n in "${STEPS[@]}"; do
    for p in direct quic https base rathole; do
        side="relay"; [[ $p == rathole ]] && side="server"; [[ $p == direct ]] && side="upstream"
        row "$n idle sessions: $side KiB/session" "$p" "idle$n.server" "%.2f" "opened in ${R[$p.idle$n.open_secs]:-?} s"
    done
    for p in quic https base rathole; do
        side="connect"; [[ $p == rathole ]] && side="client"
        row "$n idle sessions: $side KiB/session" "$p" "idle$n.client" "%.2f"
    done
done
for p in direct quic https base rathole; do
    row "new session to first answer, p50 (ms)" "$p" first_p50 "%.3f" \
        "$(has "$p.first_call_p50" && num '%.3f' "${R[$p.first_call_p50]}") ms per call on an open session"
done
for p in direct quic https base rathole; do
    row "new session to first answer, p99 (ms)" "$p" first_p99 "%.3f"
done

# Targets of issue 18 (for mcp-tunnel over QUIC; HTTPS in brackets). The p50/p99 lines compare
# with rathole directly; issue 18 allows QUIC what QUIC itself costs here on top (the raw quinn
# round trip minus the raw TLS one), printed beside them.
target() { printf -- '- %s: %s\n' "$1" "$2"; }
met() { awk "BEGIN { exit !($1) }" && echo "met" || echo "not met"; }
if has quic.p50 && has rathole.p50 && has direct.p50; then
    echo
    echo "Targets (mcp-tunnel over QUIC, HTTPS fallback in brackets):"
    for q in p50 p99; do
        target "latency added over direct at $q <= rathole's (+$(num %.3f "${R[rathole.$q]} - ${R[direct.$q]}") ms)" \
            "$(met "${R[quic.$q]} <= ${R[rathole.$q]}") (+$(num %.3f "${R[quic.$q]} - ${R[direct.$q]}") ms) [$(met "${R[https.$q]:-1e9} <= ${R[rathole.$q]}")]"
    done
    has raw_quic.p50 && has raw_tls.p50 &&
        target "what QUIC itself costs here (raw quinn minus raw TLS round trip, p50)" \
            "$(num %.3f "${R[raw_quic.p50]} - ${R[raw_tls.p50]}") ms"
    if has quic.cps.cpu_server && has rathole.cps.cpu_server; then
        ours="${R[quic.cps.cpu_server]} + ${R[quic.cps.cpu_client]}"
        theirs="${R[rathole.cps.cpu_server]} + ${R[rathole.cps.cpu_client]}"
        target "relay + connect CPU per call at saturation <= rathole server + client ($(num %.0f "$theirs") µs)" \
            "$(met "$ours <= $theirs") ($(num %.0f "$ours") µs, $(num %.2f "($ours) / ($theirs)")x) [$(met "${R[https.cps.cpu_server]:-1e9} + ${R[https.cps.cpu_client]:-1e9} <= $theirs")]"
    fi
    target "calls/s at saturation >= rathole's ($(num %.0f "${R[rathole.cps]}"))" \
        "$(met "${R[quic.cps]} >= ${R[rathole.cps]}") ($(num %.0f "${R[quic.cps]}")) [$(met "${R[https.cps]:-0} >= ${R[rathole.cps]}")]"
    target "blob MB/s >= rathole's ($(num %.1f "${R[rathole.blob]}"))" \
        "$(met "${R[quic.blob]} >= ${R[rathole.blob]}") ($(num %.1f "${R[quic.blob]}")) [$(met "${R[https.blob]:-0} >= ${R[rathole.blob]}")]"
    has raw_quic.blob && target "blob MB/s >= 90% of raw quinn ($(num %.1f "0.9 * ${R[raw_quic.blob]}"))" \
        "$(met "${R[quic.blob]} >= 0.9 * ${R[raw_quic.blob]}") [$(met "${R[https.blob]:-0} >= 0.9 * ${R[raw_quic.blob]}")]"
    last=${STEPS[${#STEPS[@]} - 1]}
    for side in server client; do
        name="relay"; [[ $side == client ]] && name="connect"
        has "quic.idle$last.$side" && target "$last idle sessions <= 16 KiB $name RSS each" \
            "$(met "${R[quic.idle$last.$side]} <= 16") ($(num %.2f "${R[quic.idle$last.$side]}") KiB) [$(met "${R[https.idle$last.$side]:-1e9} <= 16")]"
    done
    # A new session is initialize + notifications/initialized + tools/call: three requests. If
    # opening a tunnel stream cost a round trip, the first answer would take more than three
    # tunneled calls' worth of added time; "extra" is what is left over.
    extra=$(num %.3f "(${R[quic.first_p50]} - ${R[direct.first_p50]}) - 3 * (${R[quic.first_call_p50]} - ${R[direct.first_call_p50]})")
    target "new session: time added over direct beyond 3 tunneled requests' added time (p50)" \
        "$extra ms (QUIC), $(num %.3f "(${R[https.first_p50]:-0} - ${R[direct.first_p50]}) - 3 * (${R[https.first_call_p50]:-0} - ${R[direct.first_call_p50]})") ms (HTTPS)"
fi

# Before/after: this tree's QUIC tunnel against the baseline binary's, in this run.
if has base.p50 && has quic.p50 && has direct.p50; then
    echo
    echo "This tree against the baseline ($BASELINE), both over QUIC (new / old):"
    target "echo p50 added over direct" "+$(num %.3f "${R[quic.p50]} - ${R[direct.p50]}") ms against +$(num %.3f "${R[base.p50]} - ${R[direct.p50]}") ms"
    has quic.cps.cpu_server && has base.cps.cpu_server &&
        target "relay + connect CPU per call at saturation" \
            "$(num %.0f "${R[quic.cps.cpu_server]} + ${R[quic.cps.cpu_client]}") µs against $(num %.0f "${R[base.cps.cpu_server]} + ${R[base.cps.cpu_client]}") µs ($(num %.2f "(${R[quic.cps.cpu_server]} + ${R[quic.cps.cpu_client]}) / (${R[base.cps.cpu_server]} + ${R[base.cps.cpu_client]})")x)"
    target "calls/s at saturation" "$(num %.0f "${R[quic.cps]}") against $(num %.0f "${R[base.cps]}") ($(num %.2f "${R[quic.cps]} / ${R[base.cps]}")x)"
    last=${STEPS[${#STEPS[@]} - 1]}
    has "base.idle$last.client" && target "connect KiB per idle session at $last" \
        "$(num %.2f "${R[quic.idle$last.client]}") against $(num %.2f "${R[base.idle$last.client]}")"
fi
