"""Server-to-client traffic through the tunnel with the official Python SDK (mcp 2.3.0), for
tests/peers.rs: sampling and elicitation requests answered by this client's callbacks, and
progress notifications, all triggered by tools of server-everything.

Usage: callbacks_client.py URL KEY MODE [RESOURCE_URI PROMPT_NAME PROMPT_ARGUMENTS_JSON]

MODE is "legacy" (Streamable HTTP, initialize handshake and sessions), "auto" (probe with
server/discover, fall back to initialize), a protocol version such as "2026-07-28" (that era
only), or "sse" (the 2024-11-05 HTTP+SSE transport; URL is then the GET /sse URL).

The client declares sampling and elicitation (its callbacks), lists the tools, then calls
    echo                              {"message": "hi"}
    trigger-sampling-request          {"prompt": PROMPT, "maxTokens": 32}
    trigger-elicitation-request       {}
    trigger-long-running-operation    {"duration": 2, "steps": 4}   (with a progress callback)

Given a resource and a prompt, it also reads the one and gets the other.

Prints one `key: value` line per fact, each value as JSON:
    negotiated: "<protocol version>"
    tools: [<tool names>]
    echo: "<text of the echo result>"
    sampling_calls: <times the sampling callback ran>
    sampling_prompt: "<text of the first message the server asked to sample>"
    sampling_answer: "<the text the callback answered>"
    sampling_result: "<all text of the tool result>"
    sampling_is_error: <bool>
    elicitation_calls: <times the elicitation callback ran>
    elicitation_message: "<the message of the elicitation request>"
    elicitation_content: {<the content the callback accepted>}
    elicitation_result: "<all text of the tool result>"
    elicitation_is_error: <bool>
    progress: [[progress, total], ...]   (the notifications of the long-running call, in order)
    long_result: "<all text of the tool result>"
    long_is_error: <bool>
    resource: "<text of the resource>"           (with RESOURCE_URI)
    prompt: "<text of the prompt's first message>" (with PROMPT_NAME)
Exits non-zero, with the traceback on stderr, on any exception.
"""

import json
import sys
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import (
    CallToolResult,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequestParams,
    ElicitResult,
    TextContent,
)

from peerlib import emit, run_main

PROMPT = "tunnel-sampling-prompt"
SAMPLING_ANSWER = "sampled-through-the-tunnel"
ELICITED = {"name": "Ada Through-Tunnel", "check": True, "integer": 7}



class Recorder:
    """What the callbacks saw."""

    def __init__(self) -> None:
        self.sampling: list[CreateMessageRequestParams] = []
        self.elicitation: list[ElicitRequestParams] = []
        self.progress: list[list[Any]] = []

    async def sample(self, context: ClientRequestContext, params: CreateMessageRequestParams) -> CreateMessageResult:
        self.sampling.append(params)
        return CreateMessageResult(
            role="assistant",
            content=TextContent(type="text", text=SAMPLING_ANSWER),
            model="tunnel-test-model",
            stop_reason="endTurn",
        )

    async def elicit(self, context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        self.elicitation.append(params)
        return ElicitResult(action="accept", content=dict(ELICITED))

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append([progress, total])


def all_text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


async def run(url: str, key: str, mode: str, *reads: str) -> None:
    timeout = httpx2.Timeout(30.0, read=60.0)
    recorder = Recorder()
    callbacks = {"sampling_callback": recorder.sample, "elicitation_callback": recorder.elicit}
    headers = {"Authorization": f"Bearer {key}"}
    with anyio.fail_after(120):
        if mode == "sse":
            async with Client(sse_client(url, headers=headers), mode="legacy", **callbacks) as client:
                await exercise(client, recorder, reads)
            return
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
            async with Client(streamable_http_client(url, http_client=http), mode=mode, **callbacks) as client:
                await exercise(client, recorder, reads)


async def exercise(client: Client, recorder: Recorder, reads: tuple[str, ...]) -> None:
    emit("negotiated", client.protocol_version)
    tools = await client.list_tools()
    emit("tools", [t.name for t in tools.tools])

    echo = await client.call_tool("echo", {"message": "hi"})
    emit("echo", all_text(echo))

    sampled = await client.call_tool("trigger-sampling-request", {"prompt": PROMPT, "maxTokens": 32})
    emit("sampling_calls", len(recorder.sampling))
    if recorder.sampling:
        first = recorder.sampling[0].messages[0].content
        emit("sampling_prompt", getattr(first, "text", None))
    emit("sampling_answer", SAMPLING_ANSWER)
    emit("sampling_result", all_text(sampled))
    emit("sampling_is_error", bool(sampled.is_error))

    elicited = await client.call_tool("trigger-elicitation-request", {})
    emit("elicitation_calls", len(recorder.elicitation))
    if recorder.elicitation:
        emit("elicitation_message", getattr(recorder.elicitation[0], "message", None))
    emit("elicitation_content", ELICITED)
    emit("elicitation_result", all_text(elicited))
    emit("elicitation_is_error", bool(elicited.is_error))

    long = await client.call_tool(
        "trigger-long-running-operation",
        {"duration": 2, "steps": 4},
        progress_callback=recorder.on_progress,
    )
    emit("progress", recorder.progress)
    emit("long_result", all_text(long))
    emit("long_is_error", bool(long.is_error))

    if reads:
        uri, prompt, arguments = reads
        resource = await client.read_resource(uri)
        emit("resource", "".join(getattr(c, "text", "") for c in resource.contents))
        got = await client.get_prompt(prompt, json.loads(arguments))
        emit("prompt", getattr(got.messages[0].content, "text", None))


def main() -> int:
    return run_main(__doc__, run, lambda argv: argv[1:], arg_counts=(4, 7))

if __name__ == "__main__":
    sys.exit(main())
