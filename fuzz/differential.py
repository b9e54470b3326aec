#!/usr/bin/env python3
"""Differential check of the relay's JSON-RPC classification against the official Python MCP
SDK's parser, over a corpus (default: corpus/mcp_differential and corpus/mcp_classify).

The relay's reading of each input comes from `replay --classify` (one JSON line per file); the
SDK's from `mcp.types.jsonrpc_message_adapter`, applied as its Streamable HTTP server does
(json.loads, then each message of a batch validated on its own).

Where both accept a message they must agree on its kind, id, method and tool name / resource
URI: a mismatch is a finding, reported and counted in the exit code. Where only one side accepts
a message, the difference is counted and listed with --verbose, not failed: the relay refuses
some messages the SDK takes (duplicate keys, escaped "jsonrpc") and forwards some the SDK
refuses (ids that are neither strings nor integers), and the upstream answers those itself.

Usage, from fuzz/: tests/peers/.venv/bin/python differential.py --replay target/debug/replay [--verbose] [DIR|FILE]...
"""

import argparse
import json
import os
import subprocess
import sys

from mcp.types import (
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETED = {"tools/call", "prompts/get", "resources/read", "resources/subscribe", "resources/unsubscribe"}


def sdk_reading(data):
    """The SDK's reading: a list of (kind, id, method, target), or an error string."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return f"json: {e}"
    items = value if isinstance(value, list) else [value]
    if not items:
        return "empty batch"
    out = []
    for item in items:
        try:
            message = jsonrpc_message_adapter.validate_python(item, by_name=False)
        except Exception as e:  # pydantic.ValidationError and anything it raises
            return f"sdk: {type(e).__name__}"
        if isinstance(message, JSONRPCRequest):
            kind, ident, method = "request", message.id, message.method
        elif isinstance(message, JSONRPCNotification):
            kind, ident, method = "notification", None, message.method
        elif isinstance(message, (JSONRPCResponse, JSONRPCError)):
            kind, ident, method = "response", message.id, None
        else:
            return f"sdk: unknown {type(message).__name__}"
        target = None
        params = getattr(message, "params", None)
        if method in TARGETED and isinstance(params, dict):
            name, uri = params.get("name"), params.get("uri")
            target = name if isinstance(name, str) else uri if isinstance(uri, str) else None
        out.append((kind, ident, method, target))
    return out


def relay_reading(line):
    if not line["ok"]:
        return f"relay: {line['error']}"
    out = []
    for m in line["messages"]:
        if m["kind"] == "request" and m["id"] is None:
            # `"id": null`: a request the relay refuses (MCP forbids null ids), where the SDK
            # reads a notification. Counted as a refusal by the relay.
            return "relay: a request id must not be null"
        ident = json.loads(m["id"]) if m["id"] is not None else None
        out.append((m["kind"], ident, m["method"], m["target"]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay", default=os.path.join(HERE, "target", "debug", "replay"))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_args()
    paths = args.paths or [os.path.join(HERE, "corpus", t) for t in ("mcp_differential", "mcp_classify")]
    lines = subprocess.run([args.replay, "--classify", *paths], check=True, capture_output=True, text=True).stdout
    counts = {"agree": 0, "both_refuse": 0, "relay_only": 0, "sdk_only": 0, "mismatch": 0}
    for text in lines.splitlines():
        line = json.loads(text)
        with open(line["file"], "rb") as f:
            data = f.read()
        relay, sdk = relay_reading(line), sdk_reading(data)
        if isinstance(relay, str) and isinstance(sdk, str):
            counts["both_refuse"] += 1
        elif isinstance(relay, str):
            counts["sdk_only"] += 1
            if args.verbose:
                print(f"sdk only   {line['file']}: {relay}")
        elif isinstance(sdk, str):
            counts["relay_only"] += 1
            if args.verbose:
                print(f"relay only {line['file']}: {sdk}")
        elif [tuple(r) for r in relay] != sdk:
            # bool is an int to Python: an id `true` is caught by the SDK's strict int first.
            counts["mismatch"] += 1
            print(f"MISMATCH   {line['file']}: relay {relay} sdk {sdk}")
        else:
            counts["agree"] += 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
