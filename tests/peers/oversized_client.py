"""Sends request bodies over the relay's limit with async httpx and the official Python SDK
(mcp 2.3.0), for tests/edge.rs: every client must read its 413 and JSON-RPC error, never a
connection reset, and the SDK's session must carry on.

Usage: oversized_client.py URL KEY SIZE

SIZE is the number of bytes of the oversized echo message (over the relay's limit).

Prints one `key: value` line per fact, each value as JSON:
    raw_status: <HTTP status of a plain async httpx POST of the oversized body>
    raw_error: {<the JSON-RPC error object of its body>}
    sdk_error: "<message of the SDK's error for the oversized call>"
    after: "<text of an echo in the same session after it>"
Exits non-zero, with the traceback on stderr, on any exception other than the expected one.
"""

import json
import sys

import anyio
import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from peerlib import emit, run_main


def call_body(size: int) -> bytes:
    message = "x" * size
    return json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": message}}}
    ).encode()


async def run(url: str, key: str, size: int) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx2.Timeout(60.0)
    with anyio.fail_after(180):
        # A plain async httpx POST, stateless era, as fastmcp's transport sends it.
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
            response = await http.post(
                url,
                content=call_body(size),
                headers={
                    "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream",
                    "MCP-Protocol-Version": "2025-11-25",
                },
            )
            emit("raw_status", response.status_code)
            emit("raw_error", response.json().get("error"))
        # The SDK in a session: the oversized call fails alone, the session carries on.
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                try:
                    await client.call_tool("echo", {"message": "x" * size})
                    emit("sdk_error", None)
                except MCPError as e:
                    emit("sdk_error", str(e))
                result = await client.call_tool("echo", {"message": "after"})
                emit("after", getattr(result.content[0], "text", None))


def main() -> int:
    return run_main(__doc__, run, lambda argv: (argv[1], argv[2], int(argv[3])))

if __name__ == "__main__":
    sys.exit(main())
