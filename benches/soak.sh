#!/usr/bin/env bash
# Soak run (issue 13): SOAK_SECS (default 30 minutes) of mixed load through the relay and connect
# binaries, with faults, watching for anything that grows without bound.
#
#   sources   demo        HTTP: the lean demo upstream (`demo --upstream-only`)
#             everything  stdio: server-everything (tests/peers), one process per agent session
#   load      loops of `mcp-tunnel bench` runs, so sessions open and close all the time:
#             echo over sessions, echo stateless (2026-07-28), stdio echo over sessions, and a
#             10 MiB `blob` result
#   faults    connect is killed (-9: the tunnel drops) every DROP_SECS and started again, on QUIC
#             (`--transport auto`) and on the HTTPS fallback (`--transport https`) by turns; the
#             relay's configuration is rewritten (a role's deny list changes) every RELOAD_SECS;
#             after each kill it measures the seconds until a new session is served again
#
# Every SAMPLE_SECS it records relay and connect RSS and open file descriptors, the relay's live
# tasks (/metrics `mcp_tunnel_runtime_tasks`) and sessions, and the audit rows, to
# $OUT/samples.tsv. At the end the load stops, the relay settles (idle), and the script prints
# start-versus-end figures, the failed calls by cause, and runs `audit verify --public-key`.
#
# Exits non-zero when the relay dies, `audit verify` fails, or an idle figure at the end exceeds
# its idle figure at the start by more than the slack below (tasks, descriptors) or RSS at the
# end of the load exceeds RSS at a third of the run by more than RSS_GROWTH_PCT percent. Failed
# calls are reported, not fatal: a dropped tunnel fails the calls that were on it.
#
# Usage (from the crate root; needs the test peers: scripts/install-peers.sh; curl, jq, python3):
#   benches/soak.sh                                   # 30 minutes
#   SOAK_SECS=300 DROP_SECS=60 RELOAD_SECS=30 benches/soak.sh   # a short run
#   SOAK_BIN=target/debug/mcp-tunnel benches/soak.sh                # this binary, no release build
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SOAK_SECS=${SOAK_SECS:-1800}
DROP_SECS=${DROP_SECS:-120}
RELOAD_SECS=${RELOAD_SECS:-60}
SAMPLE_SECS=${SAMPLE_SECS:-30}
RUN_SECS=${RUN_SECS:-20}           # length of one bench run in each load loop
BLOB_BYTES=${BLOB_BYTES:-10485760} # 10 MiB
SETTLE_SECS=${SETTLE_SECS:-60}     # bound on waiting for the relay to go idle at the end
TASK_SLACK=${TASK_SLACK:-50}       # idle live tasks allowed above the start's
FD_SLACK=${FD_SLACK:-20}           # idle descriptors allowed above the start's
RSS_GROWTH_PCT=${RSS_GROWTH_PCT:-50}
READY_SECS=${READY_SECS:-60}
OUT=${OUT:-$ROOT/target/soak}
EVERYTHING=$ROOT/tests/peers/node_modules/@modelcontextprotocol/server-everything/dist/index.js

LOG_TAG=soak
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

[[ -f $EVERYTHING ]] || die "server-everything is missing: run scripts/install-peers.sh"
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/samples.tsv

cd "$ROOT"
if [[ -z ${SOAK_BIN:-} ]]; then
    log "building release (target dir $TARGET)"
    cargo build --release --quiet --bin mcp-tunnel
fi
BIN=${SOAK_BIN:-$TARGET/release/mcp-tunnel}
make_secrets
start_upstream

TUNNEL=$(free_port) AGENTS=$(free_port) ADMIN=$(free_port)
DB=$WORK/audit.db

# write_relay_config N: the relay's configuration, generation N (the deny list names N, so
# every generation differs from the one before).
write_relay_config() {
    cat >"$WORK/relay.toml.new" <<EOF
$(relay_listeners "$TUNNEL" "$AGENTS" "$ADMIN")

[audit]
path = "$DB"
checkpoint_secs = 10

$(bench_tenant "demo/*" "everything/*")
deny = ["demo/generation-$1"]
EOF
    mv "$WORK/relay.toml.new" "$WORK/relay.toml"
}

# start_connect TRANSPORT: connect with both sources; waits until both are announced.
start_connect() {
    start "connect-$1-$(date +%s)" "$BIN" connect --relay "localhost:$TUNNEL" --ca "$WORK/certs/ca.pem" \
        --token "$TOKEN" --transport "$1" --source "demo=$UPSTREAM_URL" \
        --source "everything=stdio:node $EVERYTHING stdio"
    CONNECT_PID=$LAST_PID
    wait_until "connect ($1)" "$CONNECT_PID" sources_up
}
sources_up() {
    local rows
    rows=$(curl -sf -m 2 "http://127.0.0.1:$ADMIN/api/tunnels") || return 1
    grep -q '"demo"' <<<"$rows" && grep -q '"everything"' <<<"$rows"
}

write_relay_config 0
start relay "$BIN" relay --config "$WORK/relay.toml"
RELAY_PID=$LAST_PID
wait_until "relay" "$RELAY_PID" curl -sf -m 2 "http://127.0.0.1:$ADMIN/healthz"
start_connect auto

# ------------------------------------------------------------------------------------------
# Readings.

fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
# metric NAME: the relay's value of an unlabelled series (0 when absent).
metric() {
    curl -sf -m 5 "http://127.0.0.1:$ADMIN/metrics" | awk -v n="$1" '$1 == n {print $2; f=1} END {if (!f) print 0}'
}
audit_rows() {
    python3 -c 'import sqlite3,sys; print(sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True).execute("select count(*) from records").fetchone()[0])' "$DB"
}
# sample LABEL: one line of readings to samples.tsv (and the log).
sample() {
    local line
    line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$1" "$SECONDS" "$(rss_kib "$RELAY_PID")" "$(fds "$RELAY_PID")" \
        "$(metric mcp_tunnel_runtime_tasks)" "$(metric mcp_tunnel_sessions_active)" \
        "$(rss_kib "$CONNECT_PID" 2>/dev/null || echo 0)" "$(fds "$CONNECT_PID")" "$(audit_rows)")
    printf '%s\n' "$line" >>"$OUT/samples.tsv"
    log "sample $line"
}
printf 'label\tsecs\trelay_rss_kib\trelay_fds\trelay_tasks\tsessions\tconnect_rss_kib\tconnect_fds\taudit_rows\n' >"$OUT/samples.tsv"

# One bench call that must work before the load starts (both sources reachable).
"$BIN" bench --url "http://127.0.0.1:$AGENTS/mcp/demo" --key "$KEY" --calls 20 --json >/dev/null \
    || die "a first bench against demo failed"
"$BIN" bench --url "http://127.0.0.1:$AGENTS/mcp/everything" --key "$KEY" --calls 5 --concurrency 1 \
    --json >/dev/null || die "a first bench against everything failed"
sample start

# ------------------------------------------------------------------------------------------
# Load: each loop runs bench for RUN_SECS at a time until the end, keeping every JSON report.

END=$((SECONDS + SOAK_SECS))
LOAD_PIDS=()
# load NAME BENCH-ARGS...: a loop of bench runs in the background.
load() {
    local name=$1
    shift
    (
        local n=0
        while ((SECONDS < END)); do
            n=$((n + 1))
            "$BIN" bench --key "$KEY" --duration "$RUN_SECS" --json "$@" >"$OUT/$name-$n.json" 2>/dev/null || true
        done
    ) &
    LOAD_PIDS+=("$!")
}
load echo --url "http://127.0.0.1:$AGENTS/mcp/demo" --sessions 16 --concurrency 8
load stateless --url "http://127.0.0.1:$AGENTS/mcp/demo" --era stateless --concurrency 4
load stdio --url "http://127.0.0.1:$AGENTS/mcp/everything" --sessions 4 --concurrency 4
load blob --url "http://127.0.0.1:$AGENTS/mcp/demo" --tool blob --payload "$BLOB_BYTES" --concurrency 1

# Faults and readings until the end.
next_drop=$((SECONDS + DROP_SECS)) next_reload=$((SECONDS + RELOAD_SECS)) next_sample=$((SECONDS + SAMPLE_SECS))
third_sampled=0 drops=0 reloads=0
RECOVERY=()
while ((SECONDS < END)); do
    kill -0 "$RELAY_PID" 2>/dev/null || die "the relay exited (see $WORK/relay.log)"
    if ((SECONDS >= next_drop)); then
        drops=$((drops + 1))
        transport=$( ((drops % 2)) && echo https || echo auto)
        log "dropping the tunnel (kill -9 connect $CONNECT_PID); the next one runs --transport $transport"
        killed_at=$SECONDS
        kill -KILL "$CONNECT_PID" 2>/dev/null || true
        wait "$CONNECT_PID" 2>/dev/null || true
        start_connect "$transport"
        # Recovery: seconds from the kill until a new session is served (each try bounded at 3 s).
        until timeout 3 "$BIN" bench --url "http://127.0.0.1:$AGENTS/mcp/demo" --key "$KEY" \
            --calls 1 --sessions 1 --concurrency 1 --json >/dev/null 2>&1; do
            ((SECONDS - killed_at < 120)) || break
        done
        RECOVERY+=("$((SECONDS - killed_at))")
        log "a new session was served $((SECONDS - killed_at)) s after the kill"
        next_drop=$((SECONDS + DROP_SECS))
    fi
    if ((SECONDS >= next_reload)); then
        reloads=$((reloads + 1))
        write_relay_config "$reloads"
        kill -HUP "$RELAY_PID"
        next_reload=$((SECONDS + RELOAD_SECS))
    fi
    if ((SECONDS >= next_sample)); then
        sample load
        if ((!third_sampled && SECONDS >= END - SOAK_SECS * 2 / 3)); then
            THIRD_RSS=$(rss_kib "$RELAY_PID")
            third_sampled=1
        fi
        next_sample=$((SECONDS + SAMPLE_SECS))
    fi
    sleep 1
done
END_RSS=$(rss_kib "$RELAY_PID")
sample end-of-load
log "waiting for the load loops to finish their last runs"
for pid in "${LOAD_PIDS[@]}"; do wait "$pid" || true; done

# Settle: every bench closed its sessions; wait (bounded) until the relay counts none.
deadline=$((SECONDS + SETTLE_SECS))
while (($(metric mcp_tunnel_sessions_active | cut -d. -f1) > 0 && SECONDS < deadline)); do sleep 1; done
sample idle-end

# ------------------------------------------------------------------------------------------
# Report.

stop_pid "$CONNECT_PID"
stop_pid "$RELAY_PID"
# The checkpoint key is audit.key next to the database; its public half is audit.key.pub.
verify_out=$("$BIN" audit verify --db "$DB" --public-key "$WORK/audit.key.pub" 2>&1) && verified=1 || verified=0

reports=("$OUT"/*.json)
ok=$(cat "${reports[@]}" | jq -s 'map(.ok // 0) | add')
failed=$(cat "${reports[@]}" | jq -s 'map(.errors // 0) | add')
causes=$(cat "${reports[@]}" | jq -s -r 'map(.errors_by_kind // {} | to_entries) | add | group_by(.key)
    | map({key: .[0].key, value: (map(.value) | add)}) | sort_by(-.value) | .[] | "  \(.value)\t\(.key)"')

start_row=$(awk -F'\t' '$1 == "start"' "$OUT/samples.tsv")
end_row=$(awk -F'\t' '$1 == "idle-end"' "$OUT/samples.tsv")
field() { cut -f"$2" <<<"$1"; }
{
    echo "soak: ${SOAK_SECS}s, $drops tunnel drops, $reloads reloads, $(nproc) cores"
    printf '%-22s %12s %12s\n' "" start "end (idle)"
    printf '%-22s %12s %12s\n' "relay RSS KiB" "$(field "$start_row" 3)" "$(field "$end_row" 3)"
    printf '%-22s %12s %12s\n' "relay fds" "$(field "$start_row" 4)" "$(field "$end_row" 4)"
    printf '%-22s %12s %12s\n' "relay tasks" "$(field "$start_row" 5)" "$(field "$end_row" 5)"
    printf '%-22s %12s %12s\n' "relay sessions" "$(field "$start_row" 6)" "$(field "$end_row" 6)"
    printf '%-22s %12s %12s\n' "connect RSS KiB" "$(field "$start_row" 7)" "$(field "$end_row" 7)"
    printf '%-22s %12s %12s\n' "connect fds" "$(field "$start_row" 8)" "$(field "$end_row" 8)"
    printf '%-22s %12s %12s\n' "audit rows" "$(field "$start_row" 9)" "$(field "$end_row" 9)"
    echo "relay RSS under load: ${THIRD_RSS:-?} KiB at a third of the run, $END_RSS KiB at its end"
    echo "seconds from each tunnel kill to a new session served: ${RECOVERY[*]:-none}"
    echo "calls: $ok ok, $failed failed; by cause:"
    [[ -n $causes ]] && echo "$causes"
    echo "audit verify: $([[ $verified == 1 ]] && echo passed || echo FAILED)"
    echo "$verify_out" | sed 's/^/  /'
    echo "samples: $OUT/samples.tsv"
} | tee "$OUT/report.txt"

status=0
((verified)) || { log "audit verify failed"; status=1; }
(($(field "$end_row" 5) <= $(field "$start_row" 5) + TASK_SLACK)) || { log "relay tasks grew"; status=1; }
(($(field "$end_row" 4) <= $(field "$start_row" 4) + FD_SLACK)) || { log "relay descriptors grew"; status=1; }
if [[ -n ${THIRD_RSS:-} ]] && ((END_RSS * 100 > THIRD_RSS * (100 + RSS_GROWTH_PCT))); then
    log "relay RSS grew by more than $RSS_GROWTH_PCT% over the last two thirds of the run"
    status=1
fi
exit "$status"
