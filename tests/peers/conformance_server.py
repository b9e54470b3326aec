"""The upstream `@modelcontextprotocol/conformance server` expects, on the official Python SDK
(mcp 2.3.0) `MCPServer`, for tests/conformance.rs.

Usage: conformance_server.py PORT

Serves Streamable HTTP on http://127.0.0.1:PORT/mcp with every tool, resource, prompt and
utility the suite's server scenarios name (see `conformance list --server`). It keeps the
SDK's defaults for a loopback server: DNS-rebinding protection (Host and Origin must be
localhost, 127.0.0.1 or [::1] with a port), sessions, and an in-memory event store so POST SSE
streams carry a priming event and can be resumed with Last-Event-ID (the SEP-1699 scenarios).
Uvicorn prints "Uvicorn running on http://127.0.0.1:PORT" to stderr once it listens.
"""

import asyncio
import base64
import json
import sys
import warnings

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.types import (
    AudioContent,
    Completion,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)

# Logging, sampling and elicitation are deprecated as of 2026-07-28, but the suite drives the
# session era (2025-11-25), where they are current.
warnings.simplefilter("ignore")

# A 1x1 PNG and a minimal (empty) WAV.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="


class MemoryEventStore(EventStore):
    """Every SSE event of every stream, in order, so a stream resumes after Last-Event-ID."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    async def store_event(self, stream_id, message):
        event_id = str(len(self.events) + 1)
        self.events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback: EventCallback):
        stream = next((s for s, e, _ in self.events if e == last_event_id), None)
        if stream is None:
            return None
        for stream_id, event_id, message in self.events:
            if stream_id == stream and int(event_id) > int(last_event_id) and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


mcp = MCPServer("mcp-tunnel-conformance-upstream", version="1.0.0")
subscriptions: set[str] = set()


def related(ctx: Context):
    """The id of the request a server-to-client message belongs to (its POST stream)."""
    return ctx.request_context.request_id


# Tools


@mcp.tool()
def test_simple_text() -> str:
    """Returns one text block."""
    return "This is a simple text response for testing."


@mcp.tool()
def test_image_content() -> list[ImageContent]:
    """Returns one image block."""
    return [ImageContent(type="image", data=PNG, mime_type="image/png")]


@mcp.tool()
def test_audio_content() -> list[AudioContent]:
    """Returns one audio block."""
    return [AudioContent(type="audio", data=WAV, mime_type="audio/wav")]


@mcp.tool()
def test_embedded_resource() -> list[EmbeddedResource]:
    """Returns one embedded text resource."""
    return [
        EmbeddedResource(
            type="resource",
            resource=TextResourceContents(
                uri="test://embedded-resource",
                mime_type="text/plain",
                text="This is an embedded resource content.",
            ),
        )
    ]


@mcp.tool()
def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Returns text, an image and an embedded resource."""
    return [
        TextContent(type="text", text="Multiple content types test:"),
        ImageContent(type="image", data=PNG, mime_type="image/png"),
        EmbeddedResource(
            type="resource",
            resource=TextResourceContents(
                uri="test://mixed-content-resource",
                mime_type="application/json",
                text=json.dumps({"test": "data", "value": 123}),
            ),
        ),
    ]


@mcp.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three info log notifications, 50 ms apart."""
    for i, text in enumerate(["Tool execution started", "Tool processing data", "Tool execution completed"]):
        if i:
            await asyncio.sleep(0.05)
        await ctx.request_context.session.send_log_message(
            level="info", data=text, related_request_id=related(ctx)
        )
    return "Tool with logging executed successfully"


@mcp.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50 and 100 of 100, 50 ms apart."""
    for i, step in enumerate([0, 50, 100]):
        if i:
            await asyncio.sleep(0.05)
        await ctx.report_progress(step, 100, f"Completed step {step} of 100")
    return "Tool with progress executed successfully"


@mcp.tool()
def test_error_handling() -> str:
    """Always fails (an isError result)."""
    raise RuntimeError("This tool intentionally returns an error for testing")


@mcp.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's LLM (sampling/createMessage) and returns its answer."""
    result = await ctx.request_context.session.create_message(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=100,
        related_request_id=related(ctx),
    )
    text = result.content.text if result.content.type == "text" else "(no text)"
    return f"LLM response: {text}"


async def elicit(ctx: Context, message: str, schema: dict) -> str:
    result = await ctx.request_context.session.elicit_form(
        message=message, requested_schema=schema, related_request_id=related(ctx)
    )
    return f"action={result.action}, content={json.dumps(result.content)}"


@mcp.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Asks the user (elicitation/create) for a username and an email."""
    schema = {
        "type": "object",
        "properties": {
            "username": {"type": "string", "description": "User's response"},
            "email": {"type": "string", "description": "User's email address"},
        },
        "required": ["username", "email"],
    }
    return "User response: " + await elicit(ctx, message, schema)


@mcp.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Elicits with a default for every primitive type (SEP-1034)."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "User name", "default": "John Doe"},
            "age": {"type": "integer", "description": "User age", "default": 30},
            "score": {"type": "number", "description": "User score", "default": 95.5},
            "status": {
                "type": "string",
                "description": "User status",
                "enum": ["active", "inactive", "pending"],
                "default": "active",
            },
            "verified": {"type": "boolean", "description": "Verified", "default": True},
        },
    }
    return "Elicitation completed: " + await elicit(ctx, "Please provide user information", schema)


@mcp.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Elicits with the five enum schema variants (SEP-1330)."""
    schema = {
        "type": "object",
        "properties": {
            "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
            "titledSingle": {
                "type": "string",
                "oneOf": [
                    {"const": "value1", "title": "First Option"},
                    {"const": "value2", "title": "Second Option"},
                    {"const": "value3", "title": "Third Option"},
                ],
            },
            "legacyEnum": {
                "type": "string",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            },
            "untitledMulti": {
                "type": "array",
                "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
            },
            "titledMulti": {
                "type": "array",
                "items": {
                    "anyOf": [
                        {"const": "value1", "title": "First Choice"},
                        {"const": "value2", "title": "Second Choice"},
                        {"const": "value3", "title": "Third Choice"},
                    ]
                },
            },
        },
    }
    return "Elicitation completed: " + await elicit(ctx, "Please choose", schema)


@mcp.tool()
def json_schema_2020_12_tool(name: str = "", address: dict | None = None) -> str:
    """Tool with JSON Schema 2020-12 features"""
    return f"name={name}, address={json.dumps(address)}"


# The suite checks that `$schema`, `$defs` and `additionalProperties` survive tools/list.
mcp._tool_manager.get_tool("json_schema_2020_12_tool").parameters = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}


@mcp.tool()
async def test_reconnection(ctx: Context) -> str:
    """Closes its POST SSE stream mid-call; the answer arrives after a Last-Event-ID resume."""
    await ctx.request_context.session.send_log_message(
        level="info", data="Before disconnect", related_request_id=related(ctx)
    )
    await ctx.close_sse_stream()
    await asyncio.sleep(0.2)
    await ctx.request_context.session.send_log_message(
        level="info", data="After reconnect", related_request_id=related(ctx)
    )
    return "Reconnection test completed"


# Resources


@mcp.resource("test://static-text", mime_type="text/plain", description="A static text resource")
def static_text() -> str:
    return "This is the content of the static text resource."


@mcp.resource("test://static-binary", mime_type="image/png", description="A static binary resource")
def static_binary() -> bytes:
    return base64.b64decode(PNG)


@mcp.resource("test://template/{id}/data", mime_type="application/json", description="A resource template")
def template_data(id: str) -> str:
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@mcp.resource("test://watched-resource", mime_type="text/plain", description="A subscribable resource")
def watched() -> str:
    return "Watched resource content"


# Prompts


@mcp.prompt()
def test_simple_prompt() -> list[UserMessage]:
    """A prompt without arguments."""
    return [UserMessage("This is a simple prompt for testing.")]


@mcp.prompt()
def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
    """A prompt with two required arguments."""
    return [UserMessage(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")]


@mcp.prompt()
def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    """A prompt that embeds a resource."""
    return [
        UserMessage(
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
                ),
            )
        ),
        UserMessage("Please process the embedded resource above."),
    ]


@mcp.prompt()
def test_prompt_with_image() -> list[UserMessage]:
    """A prompt with an image."""
    return [
        UserMessage(ImageContent(type="image", data=PNG, mime_type="image/png")),
        UserMessage("Please analyze the image above."),
    ]


# Utilities: completion, logging/setLevel, resources/subscribe and unsubscribe.


@mcp.completion()
async def complete(ref, argument, context) -> Completion:
    values = [v for v in ["paris", "park", "party"] if v.startswith(argument.value)]
    return Completion(values=values, total=len(values), has_more=False)


async def set_level(ctx, params: SetLevelRequestParams) -> EmptyResult:
    return EmptyResult()


async def subscribe(ctx, params: SubscribeRequestParams) -> EmptyResult:
    subscriptions.add(str(params.uri))
    return EmptyResult()


async def unsubscribe(ctx, params: UnsubscribeRequestParams) -> EmptyResult:
    subscriptions.discard(str(params.uri))
    return EmptyResult()


mcp._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
mcp._lowlevel_server.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
mcp._lowlevel_server.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


def raise_old_version(app):
    """The suite's SEP-1699 scenario (server-sse-polling) sends `MCP-Protocol-Version:
    2025-03-26` inside a session it negotiated at 2025-11-25, and the SDK keys priming events and
    `close_sse_stream` on that header: present the negotiated version instead, so the scenario
    exercises the close-and-resume path (the part a relay has to carry)."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            headers = [
                (name, b"2025-11-25" if name == b"mcp-protocol-version" and value == b"2025-03-26" else value)
                for name, value in scope["headers"]
            ]
            scope = dict(scope, headers=headers)
        await app(scope, receive, send)

    return wrapped


if __name__ == "__main__":
    app = mcp.streamable_http_app(host="127.0.0.1", event_store=MemoryEventStore(), retry_interval=100)
    uvicorn.run(raise_old_version(app), host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
