"""Per-tool policy and its hot reload seen by the official Python SDK client (mcp 2.3.0), for
tests/peers.rs.

Usage: policy_client.py URL KEY GO_FILE

Opens ONE session-era session (mode "legacy") and keeps it open throughout:
    phase 1: lists the tools, calls add {"a": 2, "b": 40} (expected to be denied: the JSON-RPC
             error surfaces as an MCPError, which is caught and reported), calls echo;
    then prints `ready: true` and waits (at most 60 s) for GO_FILE to exist (the test rewrites
    the relay's config and reloads it meanwhile);
    phase 2: lists the tools again (bypassing the SDK's listing cache) and calls add.

Prints one `key: value` line per fact, each value as JSON:
    negotiated: "<protocol version>"
    tools_before: [<tool names>]
    denied_code: <JSON-RPC error code of the add call, or null if it was not an error>
    denied_message: "<its message>"
    echo: "<text of the echo result>"
    ready: true
    tools_after: [<tool names>]
    add_after: "<text of the add result>"
    add_after_is_error: <bool>
    session_ids: [<distinct Mcp-Session-Id values the requests carried>]
Exits non-zero, with the traceback on stderr, on any exception.
"""

import os
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from peerlib import emit, run_main


def text_of(result) -> str | None:
    first = result.content[0] if result.content else None
    return getattr(first, "text", None)


async def run(url: str, key: str, go_file: str) -> None:
    session_ids: list[str] = []

    async def record(request: httpx2.Request) -> None:
        sid = request.headers.get("mcp-session-id")
        if sid and sid not in session_ids:
            session_ids.append(sid)

    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx2.Timeout(30.0, read=60.0)
    with anyio.fail_after(150):
        async with httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks={"request": [record]}) as http:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                emit("negotiated", client.protocol_version)
                tools = await client.list_tools(cache_mode="bypass")
                emit("tools_before", [t.name for t in tools.tools])
                try:
                    denied = await client.call_tool("add", {"a": 2, "b": 40})
                    emit("denied_code", None)
                    emit("denied_message", text_of(denied))
                except MCPError as e:
                    emit("denied_code", e.code)
                    emit("denied_message", e.message)
                echo = await client.call_tool("echo", {"message": "hi"})
                emit("echo", text_of(echo))
                emit("ready", True)
                with anyio.fail_after(60):
                    while not os.path.exists(go_file):
                        await anyio.sleep(0.05)
                tools = await client.list_tools(cache_mode="bypass")
                emit("tools_after", [t.name for t in tools.tools])
                added = await client.call_tool("add", {"a": 2, "b": 40})
                emit("add_after", text_of(added))
                emit("add_after_is_error", bool(added.is_error))
                emit("session_ids", session_ids)


def main() -> int:
    return run_main(__doc__, run, lambda argv: argv[1:4])

if __name__ == "__main__":
    sys.exit(main())
