"""An MCP server on the official Python SDK (mcp 2.3.0) `MCPServer`, for tests/peers.rs.

Usage: py_server.py PORT [--modern-only]

Serves Streamable HTTP on http://127.0.0.1:PORT/mcp, both eras: the session era (initialize,
2025-11-25 and older) and the stateless era (server/discover, 2026-07-28). Uvicorn prints
"Uvicorn running on http://127.0.0.1:PORT" to stderr once it listens.

With --modern-only it speaks only 2026-07-28 (no SDK ships such a server): a thin ASGI wrapper
refuses `initialize` and any request whose MCP-Protocol-Version header names another version
(HTTP 400 with a JSON-RPC error), and the GET and DELETE of sessions (405).

Tools: echo(message), add(a, b), routed-echo(region, message) (region marked x-mcp-header,
so a 2026-07-28 request must repeat it in Mcp-Param-Region), big(size), slow-echo(message, seconds) and finished-calls()
(which slow-echo calls ran to the end: a cancelled one does not), and three that answer like server-everything's tools
of the same names, so tests/peers/callbacks_client.py and its assertions work on every server:
trigger-sampling-request(prompt, maxTokens) and trigger-elicitation-request() ask the client for
input the way the request's era does (a request in mid-call in the session era; an
input_required answer, then the retry, in 2026-07-28), and
trigger-long-running-operation(duration, steps) reports progress. Resource: text://hello.
Prompt: greet(name).
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

mcp = MCPServer("py-peer", instructions="A test peer.")


@mcp.tool()
def echo(message: str) -> str:
    """Echo the message back."""
    return f"Echo: {message}"


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool(name="routed-echo")
def routed_echo(
    region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
    message: str,
) -> str:
    """Echo the message with its region, which 2026-07-28 clients repeat in Mcp-Param-Region."""
    return f"{region}: {message}"


@mcp.tool()
def big(size: int) -> str:
    """Return a string of SIZE characters (for large-answer tests)."""
    return "x" * size


FINISHED: list[str] = []


@mcp.tool(name="slow-echo")
async def slow_echo(message: str, seconds: float, ctx: Context) -> str:
    """Echo MESSAGE after SECONDS (reporting progress 0 at once); a call cancelled before
    then never finishes."""
    await ctx.report_progress(0, 1)
    await asyncio.sleep(seconds)
    FINISHED.append(message)
    return f"Echo: {message}"


@mcp.tool(name="finished-calls")
def finished_calls() -> list[str]:
    """The messages of the slow-echo calls that finished, in order."""
    return list(FINISHED)


def session_era(ctx: Context) -> bool:
    """Whether the request is of the session era (its server requests go in mid-call)."""
    return (ctx.protocol_version or "") < MODERN


@mcp.tool(name="trigger-sampling-request")
async def trigger_sampling_request(
    prompt: str, ctx: Context, maxTokens: int = 100
) -> str | InputRequiredResult:
    """Ask the client to sample PROMPT, then return what it sampled."""
    messages = [SamplingMessage(role="user", content=TextContent(type="text", text=f"Resource sampleLLM context: {prompt}"))]
    answers = ctx.input_responses or {}
    if session_era(ctx):
        sampled = await ctx.session.create_message(messages=messages, max_tokens=maxTokens, related_request_id=ctx.request_context.request_id)
    elif "sample" not in answers:
        request = CreateMessageRequest(params=CreateMessageRequestParams(messages=messages, max_tokens=maxTokens))
        return InputRequiredResult(input_requests={"sample": request}, request_state="sampling")
    else:
        sampled = answers["sample"]
    return "LLM sampling result: \n" + json.dumps(sampled.model_dump(by_alias=True, exclude_none=True), indent=2)


@mcp.tool(name="trigger-elicitation-request")
async def trigger_elicitation_request(ctx: Context) -> list[str] | InputRequiredResult:
    """Ask the client to fill a form, then report what it gave."""
    message = "Please provide inputs for the following fields:"
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "title": "String", "description": "Your full, legal name"},
            "check": {"type": "boolean", "title": "Boolean", "description": "Agree to the terms and conditions"},
            "integer": {"type": "integer", "title": "Integer", "description": "Your favorite integer"},
        },
        "required": ["name"],
    }
    answers = ctx.input_responses or {}
    if session_era(ctx):
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_context.request_id)
    elif "form" not in answers:
        request = ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=schema))
        return InputRequiredResult(input_requests={"form": request}, request_state="elicitation")
    else:
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
    return "Hello from the Python SDK peer."


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
    if "--modern-only" in sys.argv[2:]:
        app = modern_only(app)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
