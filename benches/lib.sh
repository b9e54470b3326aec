# Shell helpers shared by the benchmark scripts (compare.sh, soak.sh): process start and stop by
# PID, free ports, readiness waits, /proc readings, fresh secrets and the demo upstream.
# Source it after setting LOG_TAG (the log prefix), READY_SECS (the bound on readiness waits)
# and, before make_secrets or start_upstream, BIN (the mcp-tunnel binary).

log() { printf '[%s %s] %s\n' "$LOG_TAG" "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mcp-$LOG_TAG.XXXXXX")
PIDS=()

# Stops one process by PID: SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    if [[ -n ${KEEP_WORK:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background, output in $WORK/NAME.log; sets $LAST_PID.
start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop_all: stops every process started so far (between paths, so each path starts fresh).
stop_all() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    PIDS=()
}

# A port free on TCP and UDP of 127.0.0.1 (the tunnel needs both).
free_port() {
    python3 - <<'EOF'
import socket
for _ in range(100):
    t = socket.socket(); t.bind(("127.0.0.1", 0)); port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
    except OSError:
        t.close(); continue
    u.close(); t.close(); print(port); break
EOF
}

# wait_until WHAT PID CMD...: polls CMD every 50 ms until it succeeds, for at most READY_SECS;
# fails at once if PID (the process being waited for) has exited.
wait_until() {
    local what=$1 pid=$2 deadline=$((SECONDS + READY_SECS))
    shift 2
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$what: process $pid exited (see $WORK)"
        ((SECONDS < deadline)) || die "$what: not ready within ${READY_SECS}s"
        sleep 0.05
    done
}

# http_answers URL: any HTTP status at all (the server or tunnel is there).
http_answers() { [[ $(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1") != 000 ]]; }
# tunnel_up ADMIN: /api/tunnels lists the demo source.
tunnel_up() { curl -sf -m 2 "http://$1/api/tunnels" | grep -q '"demo"'; }
# First line matching REGEX in FILE.
line_in() { grep -m1 -E "$2" "$1"; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)
# CPU time (user + system) a process has used so far, in ms; 0 for no PID.
cpu_ms() {
    [[ -n ${1:-} ]] || { echo 0; return; }
    local stat fields
    stat=$(<"/proc/$1/stat")
    read -ra fields <<<"${stat##*) }" # fields from the 3rd (state) on: utime is 14th, stime 15th
    echo $(((fields[11] + fields[12]) * 1000 / CLK_TCK))
}
calc() { awk "BEGIN { printf \"%.6g\", $* }"; }
num() { awk "BEGIN { printf \"$1\", $2 }"; }
has() { [[ -n ${R[$1]:-} ]]; }

# make_secrets: a dev CA and relay certificate in $WORK/certs, a tunnel token and an agent API
# key of tenant acme (subject bench@acme.example, role bench): sets TOKEN, TOKEN_HASH, KEY, KEY_HASH.
make_secrets() {
    "$BIN" certs --out "$WORK/certs" >/dev/null
    TOKEN_OUT=$("$BIN" token new --tenant acme)
    KEY_OUT=$("$BIN" key new --tenant acme --subject bench@acme.example --role bench)
    TOKEN=$(sed -n 's/^token: //p' <<<"$TOKEN_OUT")
    TOKEN_HASH=$(grep -o 'sha256:[0-9a-f]*' <<<"$TOKEN_OUT")
    KEY=$(sed -n 's/^key: //p' <<<"$KEY_OUT")
    KEY_HASH=$(grep -o 'sha256:[0-9a-f]*' <<<"$KEY_OUT")
    [[ -n $TOKEN && -n $KEY ]] || die "could not read the token or key"
}

# relay_listeners TUNNEL AGENTS ADMIN: the [tunnel], [agents] and [admin] tables of a relay config
# on those loopback ports, with the certificate make_secrets wrote.
relay_listeners() {
    cat <<EOF
[tunnel]
listen = "127.0.0.1:$1"
cert = "$WORK/certs/relay.pem"
key = "$WORK/certs/relay.key"

[agents]
listen = "127.0.0.1:$2"

[admin]
listen = "127.0.0.1:$3"
EOF
}

# bench_tenant ALLOW...: tenant acme of a relay config, with make_secrets' token and key, and the
# role bench allowing the tool patterns given (a `deny` line may follow, for the same role).
bench_tenant() {
    local allow
    allow=$(printf '"%s", ' "$@")
    cat <<EOF
[[tenants]]
name = "acme"
tunnel_tokens = ["$TOKEN_HASH"]

[[tenants.keys]]
subject = "bench@acme.example"
roles = ["bench"]
key = "$KEY_HASH"

[[tenants.roles]]
name = "bench"
allow = [${allow%, }]
EOF
}

# start_upstream: the lean demo MCP server on a free port; sets UPSTREAM_PID and UPSTREAM_URL.
# With UPSTREAM_SSE set, it answers each request with one SSE event instead of a JSON body.
start_upstream() {
    local port
    port=$(free_port)
    start upstream "$BIN" demo --upstream-only --listen "127.0.0.1:$port" ${UPSTREAM_SSE:+--sse-answers}
    UPSTREAM_PID=$LAST_PID
    UPSTREAM_URL=http://127.0.0.1:$port/mcp
    wait_until "upstream" "$UPSTREAM_PID" http_answers "$UPSTREAM_URL"
}

