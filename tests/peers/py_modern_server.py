"""An MCP server that speaks only 2026-07-28, for tests/peers.rs: the official Python SDK
(mcp 2.3.0) `MCPServer` behind a thin ASGI wrapper that refuses the session era.

Usage: py_modern_server.py PORT

No SDK ships a 2026-07-28-only server; this one refuses `initialize` and any request whose
MCP-Protocol-Version header names another version (HTTP 400 with a JSON-RPC error), and the
GET and DELETE of sessions (405). Everything else is the SDK's own stateless serving.
Serves http://127.0.0.1:PORT/mcp; Uvicorn prints "Uvicorn running on
http://127.0.0.1:PORT" to stderr once it listens.

Tools: echo(message), add(a, b), count(steps) (reports progress after each step), and three
that answer like server-everything's tools of the same names, so tests/peers/callbacks_client.py
and its assertions work unchanged: trigger-sampling-request(prompt, maxTokens) and
trigger-elicitation-request() ask the client for input the 2026-07-28 way (an input_required
answer, then the retry), trigger-long-running-operation(duration, steps) reports progress.
Resource: text://hello. Prompt: greet(name).
"""

import asyncio
import json
import sys
from typing import Annotated

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import (
    CreateMessageRequest,
    CreateMessageRequestParams,
    ElicitRequest,
    ElicitRequestFormParams,
    InputRequiredResult,
    SamplingMessage,
    TextContent,
)
from pydantic import Field

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


@mcp.tool(name="trigger-sampling-request")
async def trigger_sampling_request(
    prompt: str, ctx: Context, maxTokens: int = 100
) -> str | InputRequiredResult:
    """Ask the client to sample PROMPT (input_required), then return what it sampled."""
    answers = ctx.input_responses or {}
    if "sample" not in answers:
        request = CreateMessageRequest(params=CreateMessageRequestParams(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text=f"Resource sampleLLM context: {prompt}"))],
            max_tokens=maxTokens,
        ))
        return InputRequiredResult(input_requests={"sample": request}, request_state="sampling")
    sampled = answers["sample"]
    return "LLM sampling result: \n" + json.dumps(sampled.model_dump(by_alias=True, exclude_none=True), indent=2)


@mcp.tool(name="trigger-elicitation-request")
async def trigger_elicitation_request(ctx: Context) -> list[str] | InputRequiredResult:
    """Ask the client to fill a form (input_required), then report what it gave."""
    answers = ctx.input_responses or {}
    if "form" not in answers:
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "title": "String", "description": "Your full, legal name"},
                "check": {"type": "boolean", "title": "Boolean", "description": "Agree to the terms and conditions"},
                "integer": {"type": "integer", "title": "Integer", "description": "Your favorite integer"},
            },
            "required": ["name"],
        }
        request = ElicitRequest(params=ElicitRequestFormParams(
            message="Please provide inputs for the following fields:", requested_schema=schema,
        ))
        return InputRequiredResult(input_requests={"form": request}, request_state="elicitation")
    result = answers["form"]
    content = result.content or {}
    lines = [
        "✅ User provided the requested information!",
        "User inputs:\n- Name: {}".format(content.get("name")),
        "\nRaw result: " + json.dumps(result.model_dump(by_alias=True, exclude_none=True), indent=2),
    ]
    return lines


@mcp.tool(name="trigger-long-running-operation")
async def trigger_long_running_operation(
    ctx: Context,
    duration: Annotated[float, Field(description="seconds")] = 10,
    steps: int = 5,
) -> str:
    """Report progress STEPS times over DURATION seconds."""
    for step in range(1, steps + 1):
        await asyncio.sleep(duration / steps)
        await ctx.report_progress(step, steps)
    return f"Long running operation completed. Duration: {duration:g} seconds, Steps: {steps}."


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
