#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into seeds/<target>/ (then minimized into
corpus/<target>/, see README.md). The seeds are the traffic the tests produce: the JSON-RPC
messages of the tests' fixtures (copied from tests/ and src/ string literals), the frames and
handshake messages a relay and connect exchange, SSE streams as server-everything and the relay
write them, and the example configurations. Run from fuzz/: python3 seeds.py [OUT]"""

import base64
import glob
import hashlib
import json
import os
import re
import struct
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "seeds")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    folder = os.path.join(OUT, target)
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def fixture_messages():
    """JSON-RPC messages written as string literals in the tests and sources."""
    found = set()
    files = glob.glob(f"{REPO}/tests/**/*.rs", recursive=True)
    files += glob.glob(f"{REPO}/src/**/*.rs", recursive=True)
    files += glob.glob(f"{REPO}/benches/*.rs")
    for path in files:
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r'r#"(.*?)"#', text, re.S):
            if '"jsonrpc"' in m.group(1):
                found.add(m.group(1))
        for m in re.finditer(r'b?"((?:[^"\\]|\\.)*)"', text):
            if '\\"jsonrpc\\"' in m.group(1):
                try:
                    found.add(m.group(1).encode().decode("unicode_escape"))
                except UnicodeDecodeError:
                    pass
    out = []
    for t in sorted(found):
        t = t.replace("{{", "{").replace("}}", "}")
        t = re.sub(r"\{[a-z_]*(:[^}]*)?\}", "1", t)
        try:
            json.loads(t)
        except ValueError:
            continue
        out.append(t)
    return out


# Messages of a real session with server-everything (initialize, lists, calls, answers).
SESSION = [
    {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {"sampling": {}, "roots": {"listChanged": True}}, "clientInfo": {"name": "inspector", "version": "0.17.0"}}},
    {"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True}, "prompts": {}, "logging": {}}, "serverInfo": {"name": "mcp-servers/everything", "version": "1.0.0"}, "instructions": "Testing server"}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
    {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo", "description": "Echoes back the input", "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}}]}},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "hello"}, "_meta": {"progressToken": 2}}},
    {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 2, "progress": 1, "total": 5}},
    {"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "Echo: hello"}]}},
    {"jsonrpc": "2.0", "id": "r-3", "method": "resources/read", "params": {"uri": "test://static/resource/1"}},
    {"jsonrpc": "2.0", "id": 4, "method": "prompts/get", "params": {"name": "simple_prompt", "arguments": {}}},
    {"jsonrpc": "2.0", "id": 5, "method": "resources/subscribe", "params": {"uri": "test://static/resource/2"}},
    {"jsonrpc": "2.0", "id": 6, "error": {"code": -32602, "message": "Unknown tool: secret"}},
    {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "boom"}], "isError": True}},
    {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 10}},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2, "reason": "timeout"}},
]


def frame(kind, exchange, payload=b""):
    if isinstance(payload, str):
        payload = payload.encode()
    return struct.pack(">BQI", kind, exchange, len(payload)) + payload


CONTROL, OPEN, MESSAGE, END, CLOSE, REJECTED, STREAMING, IDENTITY, PART = range(1, 10)

HELLO = {"version": 1, "token": "mcpt_9f3c2a", "sources": [{"name": "everything"}, {"name": "db"}], "max_frame": 16777216, "agent": "mcp-tunnel/0.1.0"}
ASSERTION = {"header": "X-MCP-Tunnel-Identity", "token": "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"}
OPEN_SESSION = {"tenant": "acme", "source": "everything", "subject": "alice@acme.example", "era": "session", "protocol_version": "2025-06-18", "context": "4f1c0d2e"}
OPEN_STATELESS = {"tenant": "acme", "source": "everything", "subject": "alice@acme.example", "era": "stateless", "protocol_version": "2026-07-28", "context": "r-17", "mcp_headers": [["mcp-method", "tools/call"], ["mcp-name", "echo"]], "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "assertion": ASSERTION}
CONTROL_MESSAGES = [
    {"version": 1},
    HELLO,
    {"type": "welcome", "tenant": "acme", "max_frame": 16777216},
    {"type": "refused", "reason": "unknown tunnel token"},
    {"type": "drain", "reason": "relay shutting down"},
]


def sse(events, crlf=False):
    text = ""
    for fields in events:
        for name, value in fields:
            text += f"{name}: {value}\n" if name else f": {value}\n"
        text += "\n"
    return text.replace("\n", "\r\n") if crlf else text


def main():
    messages = fixture_messages() + [json.dumps(m, separators=(",", ":")) for m in SESSION]
    messages.append(json.dumps(SESSION[:3]))
    messages.append(json.dumps(SESSION[5], indent=2))
    for m in messages:
        put("mcp_classify", m)
        put("mcp_differential", m)

    # Frames: the streams of a handshake and of exchanges, as the relay and connect write them.
    put("frame", frame(CONTROL, 0, json.dumps(CONTROL_MESSAGES[0])) + frame(CONTROL, 0, json.dumps(HELLO)))
    put("frame", frame(CONTROL, 0, json.dumps(CONTROL_MESSAGES[2])) + frame(CONTROL, 0, json.dumps(CONTROL_MESSAGES[4])))
    put("frame", frame(OPEN, 0, json.dumps(OPEN_SESSION)) + b"".join(
        frame(MESSAGE, i + 1, json.dumps(m)) for i, m in enumerate(SESSION[:4])) + frame(END, 1))
    put("frame", frame(OPEN, 0, json.dumps(OPEN_STATELESS)) + frame(MESSAGE, 1, json.dumps(SESSION[5]))
        + frame(STREAMING, 1) + frame(MESSAGE, 1, json.dumps(SESSION[6])) + frame(PART, 1, '{"jsonrpc":"2.0",')
        + frame(PART, 1, '"id":2,"result":{}}') + frame(END, 1))
    put("frame", frame(REJECTED, 3, struct.pack(">H", 413)) + frame(IDENTITY, 0, json.dumps(ASSERTION)) + frame(CLOSE, 0, "session deleted"))

    for m in CONTROL_MESSAGES + [ASSERTION, OPEN_SESSION, OPEN_STATELESS]:
        put("handshake", json.dumps(m))

    # Non-ASCII text, as real names, headers and results carry it.
    put("handshake", json.dumps({"header": "X-Identité", "token": "eyJ.é.x"}, ensure_ascii=False))
    put("handshake", json.dumps(dict(HELLO, sources=[{"name": "données"}], agent="mcp-tunnel/0.1.0 ✓"), ensure_ascii=False))
    put("mcp_differential", json.dumps({"jsonrpc": "2.0", "id": "é-1", "method": "tools/call", "params": {"name": "résumé", "arguments": {"q": "😀"}}}, ensure_ascii=False))
    put("mcp_classify", json.dumps({"jsonrpc": "2.0", "id": "é-1", "result": {"content": [{"type": "text", "text": "😀\r\n"}], "isError": True}}, ensure_ascii=False))

    # Upstream SSE: Streamable HTTP answers (with ids and retry), the legacy endpoint event.
    answer = json.dumps(SESSION[7])
    put("sse_upstream", sse([[("id", "0"), ("retry", "3000"), ("data", "")], [("event", "message"), ("id", "1"), ("data", json.dumps(SESSION[6]))], [("event", "message"), ("id", "2"), ("data", answer)]]))
    put("sse_upstream", sse([[("event", "endpoint"), ("data", "/message?sessionId=2f6c1a")], [("", "ping")], [("event", "message"), ("data", json.dumps(SESSION[1]))]], crlf=True))
    put("sse_upstream", "event: message\ndata: {\"jsonrpc\":\"2.0\",\ndata: \"id\":1,\"result\":{}}\n\n")
    put("sse_upstream", "event: endpoint\rdata: http://127.0.0.1:8931/messages/?session_id=ab\r\r")

    # Agent-facing SSE: Last-Event-ID values, and messages the relay writes as events.
    for v in ["0-3", "17-2", "18446744073709551615-0", "3-", "x-1"]:
        put("sse_agent", v)
    put("sse_agent", json.dumps(SESSION[7]))
    put("sse_agent", json.dumps(SESSION[5], indent=2).replace("\n", "\r\n"))

    # Configurations.
    put("relay_config", open(f"{REPO}/examples/relay.toml").read())
    put("relay_config", open(f"{REPO}/examples/connect.toml").read())
    put("relay_config", open(f"{REPO}/examples/relay.toml").read().replace("# [[tenants.roles.conditions]]", "[[tenants.roles.conditions]]").replace("# match =", "match =").replace("# when =", "when =").replace("# [rate_limits]", "[rate_limits]").replace("# identity =", "identity =").replace("# source =", "source ="))
    put("relay_config", '[tunnel]\nlisten = "127.0.0.1:0"\ncert = "relay.pem"\nkey = "relay.key"\n\n[agents]\nlisten = "127.0.0.1:0"\n\n[[tenants]]\nname = "acme"\ntunnel_tokens = ["sha256:00000000000000000000000000000000000000000000000000000000000000aa"]\n\n[[tenants.keys]]\nsubject = "agent@acme.example"\nkey = "sha256:00000000000000000000000000000000000000000000000000000000000000bb"\n')

    # JWT: line 1 a JWKS, line 2 a token, then claims the target signs.
    fuzz_jwks = '{"keys":[{"kty":"EC","crv":"P-256","kid":"fuzz","alg":"ES256","use":"sig","x":"ApofIx7Y1gLrhLbdtB6T2eYx3sOADP0t3YDwRZzcqm0","y":"cysJR0g5CWyTWR7-O9M_B6EzfDIgbrnww7nx8t25suU"}]}'
    rsa_jwks = '{"keys":[{"kty":"RSA","kid":"r1","alg":"RS256","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},{"kty":"oct","k":"c2VjcmV0"}]}'
    claims = {"iss": "https://issuer.fuzz", "aud": "mcp-tunnel", "exp": 4102444800, "nbf": 0, "sub": "alice@acme.example", "tenant": "acme", "roles": "dev hr", "scope": "mcp openid"}
    hdr = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"fuzz","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    token = f"{hdr}.{body}.c2lnbmF0dXJl"
    put("jwt", f"{fuzz_jwks}\n{token}\n{json.dumps(claims)}")
    put("jwt", f"{rsa_jwks}\n{token}\n" + json.dumps(dict(claims, roles=["dev"], tenant="beta", scope=["mcp"])))
    put("jwt", f'{{"keys":[]}}\nnot.a.jwt\n' + json.dumps(dict(claims, exp=1)))

    # CEL: expression, glob, then a call.
    put("cel", 'args.table != "salaries" || "hr" in roles\ndb/*\n' + json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "query", "arguments": {"table": "orders", "limit": 100, "filters": {"region": "emea"}}}}))
    put("cel", 'args.startsWith("file:///public/")\n*\n' + json.dumps({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///public/a.txt"}}))
    put("cel", 'size(args.items) < 3 && args.items.all(i, i.n > 0) && subject.endsWith("@acme.example")\neverything/get-*\n' + json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get-sum", "arguments": {"items": [{"n": 1}, {"n": 2.5}], "x": [True, None, "s"]}}}]))
    put("cel", 'args.map(k, k).exists(k, k == "a") && name in ["echo", "query"]\n**\n' + json.dumps(SESSION[5]))


if __name__ == "__main__":
    main()
