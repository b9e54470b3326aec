"""The client the conformance suite's client scenarios drive (`conformance client --command
"... conformance_client.py MODE"`), for tests/conformance.rs: the official Python SDK (mcp
2.3.0), directly or through the tunnel.

Usage: conformance_client.py MODE URL    (the suite appends URL, the scenario's server)

MODE is the SDK client's mode: "legacy" (the session era) or a protocol version such as
"2026-07-28" (that era only: through the tunnel, `connect` bridges it to the session-era
scenario server).

With MCPT_VIA set, the client reaches URL through a relay, as an agent would: it starts
`mcp-tunnel connect` serving URL as a source of its own (`conf<pid>`), waits until the relay
lists that source, talks to the relay's agent URL for it, and stops `connect` by its PID at the
end. MCPT_VIA is a JSON object: {"bin": the mcp-tunnel binary, "relay": the tunnel address,
"token": the tenant's tunnel token, "ca": the CA file, "admin": the relay's admin base URL,
"agents": the agent base URL, "key": an API key of the tenant}.

The scenario (MCP_CONFORMANCE_SCENARIO) says what the client does, as the suite's reference
client does:
    initialize                            connect, list the tools
    tools_call                            call add_numbers {"a": 5, "b": 3}
    elicitation-sep1034-client-defaults   call test_client_elicitation_defaults, accepting
                                          the elicitation with the schema's defaults
    sse-retry                             call test_reconnection (the server closes the
                                          call's stream; the answer comes on a GET)
Exits non-zero, with the traceback on stderr, on any exception.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp_types import ElicitRequestParams, ElicitResult

from peerlib import run_main

#: Bound on the wait for the relay to list the source.
READY_WAIT = 30.0


async def accept_defaults(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
    """Accepts with every default the requested schema gives (SEP-1034)."""
    schema: dict[str, Any] = getattr(params, "requested_schema", None) or {}
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    content = {name: field["default"] for name, field in properties.items() if "default" in field}
    return ElicitResult(action="accept", content=content)


async def exercise(url: str, mode: str, headers: dict[str, str]) -> None:
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "initialize")
    timeout = httpx2.Timeout(30.0, read=60.0)
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, elicitation_callback=accept_defaults) as client:
            if scenario == "initialize":
                await client.list_tools()
            elif scenario == "tools_call":
                await client.call_tool("add_numbers", {"a": 5, "b": 3})
            elif scenario == "elicitation-sep1034-client-defaults":
                await client.call_tool("test_client_elicitation_defaults", {})
            elif scenario == "sse-retry":
                await client.call_tool("test_reconnection", {})
            else:
                raise SystemExit(f"unknown scenario {scenario}")


def wait_listed(admin: str, source: str, connect: subprocess.Popen[bytes]) -> None:
    """Polls the relay's tunnel list until `source` is in it."""
    deadline = time.monotonic() + READY_WAIT
    while time.monotonic() < deadline:
        if connect.poll() is not None:
            raise RuntimeError(f"connect exited with {connect.returncode} before its tunnel came up")
        with urllib.request.urlopen(f"{admin}/api/tunnels", timeout=5) as response:
            if any(row.get("source") == source for row in json.load(response)):
                return
        time.sleep(0.05)
    raise TimeoutError(f"the relay did not list {source} within {READY_WAIT} s")


async def run(mode: str, url: str) -> None:
    via = os.environ.get("MCPT_VIA")
    with anyio.fail_after(120):
        if not via:
            await exercise(url, mode, {})
            return
        via = json.loads(via)
        source = f"conf{os.getpid()}"
        connect = subprocess.Popen(
            [via["bin"], "connect", "--relay", via["relay"], "--ca", via["ca"],
             "--source", f"{source}={url}"],
            env={**os.environ, "MCP_TUNNEL_TOKEN": via["token"]},
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_listed(via["admin"], source, connect)
            headers = {"Authorization": f"Bearer {via['key']}"}
            await exercise(f"{via['agents']}/mcp/{source}", mode, headers)
        finally:
            connect.terminate()
            try:
                connect.wait(timeout=10)
            except subprocess.TimeoutExpired:
                connect.kill()
                connect.wait()


def main() -> int:
    return run_main(__doc__, run, lambda argv: argv[1:], arg_counts=(3,))


if __name__ == "__main__":
    sys.exit(main())
