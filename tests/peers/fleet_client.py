"""Load through a fleet of relays with the official Python SDK (mcp 2.3.0), for tests/fleet.rs.

Usage: fleet_client.py URL KEY MODE SESSIONS CALLS SECONDS PREFIX

Opens SESSIONS clients of URL at once, each with its own HTTP client (so its own connections to
the load balancer), and has each call `echo` in a loop with a unique message,
"PREFIX-sSESSION-cCALL", until it has made CALLS calls (0: no bound) or SECONDS have passed
since the start, or the file named by env FLEET_CLIENT_STOP_FILE exists. MODE is the SDK's
connect mode: "legacy" (the session era: initialize,
Mcp-Session-Id, GET stream, DELETE at the end) or a stateless protocol version such as
"2026-07-28" (no handshake, every call a request of its own); "auto" works too.

A failed call (an exception, a JSON-RPC error, an `isError` result, a wrong echo, or no answer
within the call timeout: 10 s, or env FLEET_CLIENT_CALL_TIMEOUT) is recorded and the loop goes on with the next call. When the
SDK's client itself breaks (an exception out of its own tasks ends it: the SDK 2.3.0 does that
on a connection closed without a response), the call in flight is recorded as failed, a
`session_error` line says so, and the session opens a new client (in the session era, a new
session) for its next calls. Nothing waits unbounded: opening a session, each call and
closing each session have their own bounds, and the whole run is bounded by SECONDS + 60 s (then the summary is printed all the same).

Prints `key: value` lines (values as JSON), the summary last:
    open: {"session", "ok", "session_id", "error", "at"}    once per client opened
    call: {"session", "n", "message", "ok", "error", "session_id", "relay",
           "started", "ended"}                                       once per call, as it ends
    close: {"session", "ok", "error"}                       once per client closed cleanly
    session_error: {"session", "error", "at"}   a client that broke (then reopened)
    summary: {"calls", "ok", "failed", "errors", "sessions", "opened", "session_ids"}
`session_id` is the Mcp-Session-Id the call's request carried (null in the stateless era),
`relay` the X-Fleet-Relay header the load balancer put on the answer (which relay served it),
`started`/`ended` Unix times in seconds, `errors` the count of each error text, `session_ids`
each session's clients' session ids in order.
Exits 0 once the summary is printed, whatever the calls did; 1 with a traceback on a bug.
"""

import os
import sys
import time
from contextlib import AsyncExitStack

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from peerlib import emit, run_main

CALL_TIMEOUT = float(os.environ.get("FLEET_CLIENT_CALL_TIMEOUT", "10"))
OPEN_TIMEOUT = 15.0
# When this file exists, every session ends after its call in flight (the test's "stop now").
STOP_FILE = os.environ.get("FLEET_CLIENT_STOP_FILE")


class Tally:
    """The outcomes so far, for the summary."""

    def __init__(self) -> None:
        self.calls = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.opened = 0
        self.session_ids: dict[str, list[str | None]] = {}

    def call(self, ok: bool, error: str | None) -> None:
        self.calls += 1
        if ok:
            self.ok += 1
        else:
            self.errors[error or "?"] = self.errors.get(error or "?", 0) + 1


def describe(error: BaseException) -> str:
    """One line naming an exception, and the leaves of an exception group."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe(e) for e in error.exceptions)
    text = str(error).replace("\n", " ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def one_session(
    index: int, url: str, key: str, mode: str, calls: int, deadline: float, prefix: str, tally: Tally
) -> None:
    """Session `index`: opens a client and calls in a loop. When the SDK's client breaks (an
    exception out of its own tasks, which ends the client), the call in flight is recorded as
    failed with that error, a `session_error` line says so, and a new client is opened for the
    next calls (in the session era that is a new session: its calls carry another session id)."""
    n = 0

    def more() -> bool:
        stopped = STOP_FILE is not None and os.path.exists(STOP_FILE)
        return (calls == 0 or n < calls) and time.time() < deadline and not stopped

    while more():
        in_flight: dict | None = None
        try:
            in_flight = None
            async with AsyncExitStack() as stack:
                client, seen = await open_client(index, url, key, mode, tally, stack)
                if client is None:
                    return
                while more():
                    message = f"{prefix}-s{index}-c{n}"
                    seen["relay"] = None
                    in_flight = {"message": message, "n": n, "started": time.time(), "seen": seen}
                    n += 1
                    ok, error = False, None
                    try:
                        with anyio.fail_after(CALL_TIMEOUT):
                            result = await client.call_tool("echo", {"message": message})
                        first = result.content[0] if result.content else None
                        text = getattr(first, "text", None)
                        if result.is_error:
                            error = f"isError result: {text}"
                        elif text != message:
                            error = f"wrong echo: {text!r}"
                        else:
                            ok = True
                    except Exception as failure:  # noqa: BLE001 - recorded, the loop goes on
                        error = describe(failure)
                    record_call(index, in_flight, ok, error, tally)
                    in_flight = None
                # Closing (the session era's DELETE) is bounded by the HTTP client's timeout
                # (an anyio scope around it would break the nesting of the Client's task
                # group) and by the run's bound; a failure here is reported below.
            emit("close", {"session": index, "ok": True, "error": None})
        except Exception as failure:  # noqa: BLE001 - the client broke: record, reopen
            error = describe(failure)
            if in_flight is not None:
                record_call(index, in_flight, False, error, tally)
            emit("session_error", {"session": index, "error": error, "at": time.time()})


def record_call(index: int, call: dict, ok: bool, error: str | None, tally: Tally) -> None:
    """Counts a call's outcome and prints its `call` line."""
    tally.call(ok, error)
    emit(
        "call",
        {
            "session": index,
            "n": call["n"],
            "message": call["message"],
            "ok": ok,
            "error": error,
            "session_id": call["seen"]["session_id"],
            "relay": call["seen"]["relay"],
            "started": call["started"],
            "ended": time.time(),
        },
    )


async def open_client(
    index: int, url: str, key: str, mode: str, tally: Tally, stack: AsyncExitStack
) -> tuple[Client | None, dict[str, str | None]]:
    """Opens a client of session `index` on `stack` and prints its `open` line; returns it (None
    when it could not open) and what its transport did last: the session id its last request
    carried, the relay that answered it."""
    seen: dict[str, str | None] = {"session_id": None, "relay": None}

    async def on_request(request: httpx2.Request) -> None:
        if request.method == "POST":
            seen["session_id"] = request.headers.get("mcp-session-id")

    async def on_response(response: httpx2.Response) -> None:
        if response.request.method == "POST":
            seen["relay"] = response.headers.get("x-fleet-relay")
            issued = response.headers.get("mcp-session-id")
            if issued and not seen["session_id"]:
                seen["session_id"] = issued

    http = await stack.enter_async_context(
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx2.Timeout(CALL_TIMEOUT, read=CALL_TIMEOUT),
            event_hooks={"request": [on_request], "response": [on_response]},
        )
    )
    # Opening is bounded by the SDK's own request timeout (an anyio scope around it would
    # break the nesting of the Client's task group, which outlives this statement).
    try:
        client = await stack.enter_async_context(
            Client(streamable_http_client(url, http_client=http), mode=mode, read_timeout_seconds=max(OPEN_TIMEOUT, CALL_TIMEOUT))
        )
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        emit("open", {"session": index, "ok": False, "session_id": None, "error": describe(error), "at": time.time()})
        tally.session_ids.setdefault(str(index), []).append(None)
        return None, seen
    tally.opened += 1
    tally.session_ids.setdefault(str(index), []).append(seen["session_id"])
    emit("open", {"session": index, "ok": True, "session_id": seen["session_id"], "error": None, "at": time.time()})
    return client, seen


async def guarded_session(index: int, *args: object) -> None:
    """`one_session`, whose failure outside a call (the SDK's own tasks, say) is reported as a
    `session_error` line instead of ending the other sessions."""
    try:
        await one_session(index, *args)  # type: ignore[arg-type]
    except Exception as failure:  # noqa: BLE001
        emit("session_error", {"session": index, "error": describe(failure)})


async def run(url: str, key: str, mode: str, sessions: int, calls: int, seconds: float, prefix: str) -> None:
    tally = Tally()
    deadline = time.time() + seconds
    try:
        with anyio.move_on_after(seconds + 60):
            async with anyio.create_task_group() as group:
                for index in range(sessions):
                    group.start_soon(guarded_session, index, url, key, mode, calls, deadline, prefix, tally)
    finally:
        emit(
            "summary",
            {
                "calls": tally.calls,
                "ok": tally.ok,
                "failed": tally.calls - tally.ok,
                "errors": tally.errors,
                "sessions": sessions,
                "opened": tally.opened,
                "session_ids": tally.session_ids,
            },
        )


def main() -> int:
    def parse(argv: list[str]) -> tuple:
        url, key, mode, sessions, calls, seconds, prefix = argv[1:8]
        return url, key, mode, int(sessions), int(calls), float(seconds), prefix

    return run_main(__doc__, run, parse, (8,))


if __name__ == "__main__":
    sys.exit(main())
