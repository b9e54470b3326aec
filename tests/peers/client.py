"""Drives an MCP server with the official Python SDK (mcp 2.3.0), for tests/peers.rs.

Usage: client.py URL KEY MODE [TOOL ARGS_JSON]

MODE is an SDK connect mode: "legacy" (initialize handshake and sessions), "auto" (probe with
server/discover, fall back to initialize) or a protocol version such as "2026-07-28"; or "sse"
for the 2024-11-05 HTTP+SSE transport (URL is then the GET /sse URL).
TOOL and ARGS_JSON default to echo and {"message": "hi"}.

Prints one `key: value` line per fact, each value as JSON:
    negotiated: "<protocol version>"
    tools: [<tool names>]
    call: "<text of the first content block of the tool result>"
    is_error: <bool>
Exits non-zero, with the traceback on stderr, on any exception.
"""

import json
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from peerlib import emit, run_main


async def run(url: str, key: str, mode: str, tool: str, arguments: dict) -> None:
    timeout = httpx2.Timeout(30.0, read=60.0)
    with anyio.fail_after(120):
        await session(url, key, mode, tool, arguments, timeout)


async def session(url: str, key: str, mode: str, tool: str, arguments: dict, timeout: httpx2.Timeout) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    if mode == "sse":
        async with Client(sse_client(url, headers=headers), mode="legacy") as client:
            await exercise(client, tool, arguments)
        return
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            await exercise(client, tool, arguments)


async def exercise(client: Client, tool: str, arguments: dict) -> None:
    emit("negotiated", client.protocol_version)
    tools = await client.list_tools()
    emit("tools", [t.name for t in tools.tools])
    result = await client.call_tool(tool, arguments)
    first = result.content[0] if result.content else None
    emit("call", getattr(first, "text", None))
    emit("is_error", bool(result.is_error))


def main() -> int:
    def parse(argv: list[str]) -> tuple:
        url, key, mode = argv[1:4]
        tool, arguments = ("echo", {"message": "hi"}) if len(argv) == 4 else (argv[4], json.loads(argv[5]))
        return url, key, mode, tool, arguments

    return run_main(__doc__, run, parse, (4, 6))

if __name__ == "__main__":
    sys.exit(main())
