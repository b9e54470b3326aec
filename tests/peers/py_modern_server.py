"""An MCP server that speaks only 2026-07-28, for tests/peers.rs: the official Python SDK
(mcp 2.3.0) `MCPServer` behind a thin ASGI wrapper that refuses the session era.

Usage: py_modern_server.py PORT

No SDK ships a 2026-07-28-only server; this one refuses `initialize` and any request whose
MCP-Protocol-Version header names another version (HTTP 400 with a JSON-RPC error), and the
GET and DELETE of sessions (405). Everything else is the SDK's own stateless serving.
Serves http://127.0.0.1:PORT/mcp; Uvicorn prints "Uvicorn running on
http://127.0.0.1:PORT" to stderr once it listens.

Tools: echo(message), add(a, b), count(steps) (reports progress after each step). Resource:
text://hello. Prompt: greet(name).
"""

import json
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

MODERN = "2026-07-28"

mcp = MCPServer("py-modern-peer", instructions="Speaks 2026-07-28 only.")


@mcp.tool()
def echo(message: str) -> str:
    """Echo the message back."""
    return f"Echo: {message}"


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
async def count(steps: int, ctx: Context) -> str:
    """Count to STEPS, reporting progress after each step."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps)
    return f"Counted to {steps}."


@mcp.resource("text://hello")
def hello() -> str:
    """A greeting."""
    return "Hello from the 2026-07-28 server."


@mcp.prompt()
def greet(name: str) -> str:
    """Greet someone."""
    return f"Please greet {name} warmly."


def refuse(status: int, message: str):
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}).encode()

    async def send_refusal(send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return send_refusal


def modern_only(app):
    """Refuses the session era before the SDK sees the request."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["method"] in ("GET", "DELETE"):
            return await refuse(405, "this server speaks only 2026-07-28: no sessions")(send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        version = headers.get("mcp-protocol-version")
        if version is not None and version != MODERN:
            return await refuse(400, f"unsupported protocol version {version}: this server speaks only {MODERN}")(send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            method = json.loads(body).get("method")
        except (ValueError, AttributeError):
            method = None
        if method == "initialize":
            return await refuse(400, f"initialize is not supported: this server speaks only {MODERN}")(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await app(scope, replay, send)

    return wrapped


if __name__ == "__main__":
    app = mcp.streamable_http_app(host="127.0.0.1")
    uvicorn.run(modern_only(app), host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
