"""An MCP server on the official Python SDK (mcp 2.3.0) `MCPServer`, for tests/peers.rs.

Usage: py_server.py PORT

Serves Streamable HTTP on http://127.0.0.1:PORT/mcp, both eras: the session era (initialize,
2025-11-25 and older) and the stateless era (server/discover, 2026-07-28). Uvicorn prints
"Uvicorn running on http://127.0.0.1:PORT" to stderr once it listens.
"""

import sys

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("py-peer")


@mcp.tool()
def echo(message: str) -> str:
    """Echo the message back."""
    return f"Echo: {message}"


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
def big(size: int) -> str:
    """Return a string of SIZE characters (for large-answer tests)."""
    return "x" * size


if __name__ == "__main__":
    mcp.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
