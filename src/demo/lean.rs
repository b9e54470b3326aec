//! The lean built-in MCP server: the demo tools (`echo`, `add`, `blob`, `sleep`) on plain
//! axum, answering with one JSON body per request, so that measurements through the tunnel
//! measure the tunnel and not the server.
//!
//! It speaks both Streamable HTTP eras:
//! - sessions (2025-03-26 .. 2025-11-25): `initialize` issues an `Mcp-Session-Id`, later
//!   requests must carry it (400 without, 404 when unknown), DELETE ends it;
//! - stateless (2026-07-28, chosen by the `MCP-Protocol-Version` header): no session, and the
//!   `Mcp-Method` / `Mcp-Name` headers must repeat the body (400 with JSON-RPC -32020 if not);
//!   `server/discover` describes the server.
//!
//! Notifications and client responses get 202. GET gets 405: the server never speaks first, and
//! the transport lets a server decline the standalone stream.
//!
//! With [`Answers::Sse`] each answer is one SSE event instead (`text/event-stream`), as the
//! Python and TypeScript SDK servers answer by default: what the benchmarks measure that path
//! with.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::mcp::era::{
    LATEST_SESSION_VERSION, METHOD_HEADER, NAME_HEADER, SESSION_HEADER, SESSION_VERSIONS,
    STATELESS_SINCE, VERSION_HEADER,
};
use crate::mcp::jsonrpc::codes;

use super::tools::{blob_size, sleep_time, slept};

/// Largest request body: room for a 64 MiB `echo`; larger bodies get 413.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Most sessions open at once: bounds the server's memory (an id is ~40 bytes) well above the
/// 10,000 idle sessions the benchmarks hold.
pub const MAX_SESSIONS: usize = 100_000;
/// The newest session-era version, answered to clients that ask for an unknown one.
/// What the server says of itself.
const INSTRUCTIONS: &str = "mcp-tunnel demo server: echo, add, blob, sleep";
/// `serverInfo.name`.
const SERVER_NAME: &str = "mcp-tunnel-demo";

/// The `tools/list` result, fixed.
const TOOLS: &str = r#"{"tools":[{"name":"add","description":"Add two integers","inputSchema":{"type":"object","properties":{"a":{"description":"Left operand.","type":"integer","format":"int64"},"b":{"description":"Right operand.","type":"integer","format":"int64"}},"required":["a","b"]}},{"name":"blob","description":"Return SIZE bytes of text (for throughput tests)","inputSchema":{"type":"object","properties":{"size":{"description":"How many bytes of text to return.","type":"integer","format":"uint64","minimum":0}},"required":["size"]}},{"name":"echo","description":"Echo the message back unchanged","inputSchema":{"type":"object","properties":{"message":{"description":"The text to send back.","type":"string"}},"required":["message"]}},{"name":"sleep","description":"Wait MS milliseconds, then answer (a slow tool for tests)","inputSchema":{"type":"object","properties":{"ms":{"description":"Milliseconds to wait before answering.","type":"integer","format":"uint64","minimum":0}},"required":["ms"]}}]}"#;

/// How the server answers a request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// One JSON body (`application/json`).
    #[default]
    Json,
    /// One SSE event carrying the JSON (`text/event-stream`), then the end of the body.
    Sse,
}

/// The server's state: the open sessions.
#[derive(Debug, Default)]
struct Server {
    sessions: Mutex<HashSet<String>>,
    answers: Answers,
}

/// Serves the lean demo server at `/mcp` on `addr` until `shutdown`, answering as `answers`
/// says; returns the bound address once it accepts connections.
pub async fn serve(
    addr: SocketAddr,
    answers: Answers,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let server = Server {
        answers,
        ..Server::default()
    };
    let router = axum::Router::new()
        .route("/mcp", post(on_post).get(on_get).delete(on_delete))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(Arc::new(server));
    super::spawn_server(addr, router, shutdown).await
}

/// `response`, a JSON answer, as one SSE event: its body (JSON has no raw line breaks, so it
/// is one `data` line) streamed between the event's head and end, never held whole.
fn as_sse_event(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    let head =
        futures_util::stream::once(async { Ok(Bytes::from_static(b"event: message\ndata: ")) });
    let end = futures_util::stream::once(async { Ok(Bytes::from_static(b"\n\n")) });
    let data = body.into_data_stream();
    let event = futures_util::StreamExt::chain(futures_util::StreamExt::chain(head, data), end);
    Response::from_parts(parts, Body::from_stream(event))
}

/// The fields of a JSON-RPC message the server reads.
#[derive(Deserialize)]
struct Message<'a> {
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

/// `params` of the requests that name something (`tools/call`, and in `initialize` the
/// version).
#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(rename = "protocolVersion", borrow)]
    protocol_version: Option<Cow<'a, str>>,
}

/// A tool's result: one text block.
#[derive(Serialize)]
struct ToolResult<'a> {
    content: [TextBlock<'a>; 1],
    #[serde(rename = "isError")]
    is_error: bool,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// What a request produced: a result (raw JSON), a `blob` result (streamed, never built whole:
/// the server must not be what a 100 MiB measurement measures), or a JSON-RPC error.
enum Outcome {
    Result(Vec<u8>),
    Blob {
        size: u64,
        /// With the 2026-07-28 `resultType`.
        tagged: bool,
    },
    Error(i64, String),
}

impl Outcome {
    fn tool(text: &str, is_error: bool) -> Self {
        let result = ToolResult {
            content: [TextBlock { kind: "text", text }],
            is_error,
        };
        Outcome::Result(serde_json::to_vec(&result).expect("a tool result is strings and a bool"))
    }

    fn fixed(json: &str) -> Self {
        Outcome::Result(json.as_bytes().to_vec())
    }

    /// The 2026-07-28 shape of a result: `resultType` is required, and cacheable results
    /// (`tools/list`) carry `ttlMs` and `cacheScope` too. Results here are JSON objects written
    /// by this module, so the fields go right after the opening brace.
    fn tagged_complete(self, cacheable: bool) -> Self {
        let json = match self {
            Outcome::Result(json) => json,
            Outcome::Blob { size, .. } => return Outcome::Blob { size, tagged: true },
            Outcome::Error(..) => return self,
        };
        let fields: &[u8] = if cacheable {
            br#""resultType":"complete","ttlMs":0,"cacheScope":"private""#
        } else {
            br#""resultType":"complete""#
        };
        let rest = json.strip_prefix(b"{").unwrap_or(&json);
        let mut out = Vec::with_capacity(json.len() + fields.len() + 2);
        out.push(b'{');
        out.extend_from_slice(fields);
        if rest.first() != Some(&b'}') {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        Outcome::Result(out)
    }
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.into(),
    )
        .into_response()
}

/// A JSON-RPC response body for `id`. Results are written in place, never re-parsed: they are
/// serde_json output or fixed JSON made here; a `blob` result streams in pieces, its length
/// known up front.
fn reply(id: &RawValue, outcome: Outcome) -> Response {
    const HEAD: &[u8] = br#"{"jsonrpc":"2.0","id":"#;
    const MIDDLE: &[u8] = br#","result":"#;
    match outcome {
        Outcome::Result(result) => {
            let mut out =
                Vec::with_capacity(HEAD.len() + id.get().len() + MIDDLE.len() + result.len() + 1);
            out.extend_from_slice(HEAD);
            out.extend_from_slice(id.get().as_bytes());
            out.extend_from_slice(MIDDLE);
            out.extend_from_slice(&result);
            out.push(b'}');
            json_response(StatusCode::OK, out)
        }
        Outcome::Blob { size, tagged } => {
            let tag = if tagged {
                r#""resultType":"complete","#
            } else {
                ""
            };
            let head = format!(
                r#"{{"jsonrpc":"2.0","id":{},"result":{{{tag}"content":[{{"type":"text","text":""#,
                id.get()
            );
            const TAIL: &str = r#""}],"isError":false}}"#;
            let length = head.len() as u64 + size + TAIL.len() as u64;
            let pieces = std::iter::once(Bytes::from(head))
                .chain(super::tools::blob_pieces(size))
                .chain(std::iter::once(Bytes::from_static(TAIL.as_bytes())))
                .map(Ok::<_, std::convert::Infallible>);
            let mut response = json_response(
                StatusCode::OK,
                Body::from_stream(futures_util::stream::iter(pieces)),
            );
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            response
        }
        Outcome::Error(code, message) => json_response(
            StatusCode::OK,
            crate::mcp::jsonrpc::error_body(Some(id), code, &message),
        ),
    }
}

/// An error answer with no request to tie it to (`id: null`).
fn error_response(status: StatusCode, code: i64, message: &str) -> Response {
    json_response(status, crate::mcp::jsonrpc::error_body(None, code, message))
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn on_post(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Message<'_>>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            codes::PARSE_ERROR,
            "the body must be one JSON-RPC message",
        );
    };
    if message.jsonrpc.as_deref() != Some("2.0") {
        return error_response(
            StatusCode::BAD_REQUEST,
            codes::INVALID_REQUEST,
            "\"jsonrpc\" must be \"2.0\"",
        );
    }
    let params: Params<'_> = match message.params {
        Some(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
        None => Params::default(),
    };
    let stateless = header_str(&headers, VERSION_HEADER)
        .is_some_and(|v| crate::mcp::era_of(v) == crate::wire::Era::Stateless);
    let mut session_id = None;
    if stateless {
        if let Err(mismatch) = check_routing_headers(&headers, &message, &params) {
            return error_response(StatusCode::BAD_REQUEST, codes::HEADER_MISMATCH, &mismatch);
        }
    } else if message.method.as_deref() == Some("initialize") {
        let mut sessions = server.sessions.lock();
        if sessions.len() >= MAX_SESSIONS {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::INTERNAL_ERROR,
                "too many sessions",
            );
        }
        let id = new_session_id();
        sessions.insert(id.clone());
        session_id = Some(id);
    } else {
        match header_str(&headers, SESSION_HEADER) {
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    "Bad Request: Session ID is required",
                )
                    .into_response();
            }
            Some(id) if !server.sessions.lock().contains(id) => {
                return error_response(
                    StatusCode::NOT_FOUND,
                    codes::INVALID_REQUEST,
                    "unknown or ended session",
                );
            }
            Some(_) => {}
        }
    }
    // Notifications and responses to the server's (never sent) requests: accepted.
    let (Some(id), Some(method)) = (message.id.filter(|id| id.get() != "null"), &message.method)
    else {
        return StatusCode::ACCEPTED.into_response();
    };
    let mut outcome = answer(method, &params, session_id.is_some()).await;
    if stateless && method != "server/discover" {
        outcome = outcome.tagged_complete(method == "tools/list");
    }
    let mut response = reply(id, outcome);
    if server.answers == Answers::Sse {
        response = as_sse_event(response);
    }
    if let Some(session) = session_id.and_then(|s| HeaderValue::try_from(s).ok()) {
        response.headers_mut().insert(SESSION_HEADER, session);
    }
    response
}

/// 2026-07-28: `Mcp-Method` must equal the body's method, and `Mcp-Name` the name it targets.
fn check_routing_headers(
    headers: &HeaderMap,
    message: &Message<'_>,
    params: &Params<'_>,
) -> Result<(), String> {
    let Some(method) = message.method.as_deref() else {
        return Ok(());
    };
    let declared = header_str(headers, METHOD_HEADER);
    if declared != Some(method) {
        return Err(format!(
            "Mcp-Method header {declared:?} does not match body method {method:?}"
        ));
    }
    if method == "tools/call" {
        let declared = header_str(headers, NAME_HEADER);
        let name = params.name.as_deref();
        if declared != name {
            return Err(format!(
                "Mcp-Name header {declared:?} does not match body value {name:?}"
            ));
        }
    }
    Ok(())
}

/// A fresh session id: 128 random bits in hex.
fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The answer to request `method`.
async fn answer(method: &str, params: &Params<'_>, initializing: bool) -> Outcome {
    match method {
        "initialize" if initializing => {
            let asked = params.protocol_version.as_deref().unwrap_or_default();
            let version = if SESSION_VERSIONS.contains(&asked) {
                asked
            } else {
                LATEST_SESSION_VERSION
            };
            Outcome::Result(
                serde_json::to_vec(&serde_json::json!({
                    "protocolVersion": version,
                    "capabilities": { "tools": {} },
                    "serverInfo": { "name": SERVER_NAME, "version": env!("CARGO_PKG_VERSION") },
                    "instructions": INSTRUCTIONS,
                }))
                .expect("plain JSON"),
            )
        }
        "server/discover" => {
            let mut versions: Vec<&str> = SESSION_VERSIONS.to_vec();
            versions.push(STATELESS_SINCE);
            Outcome::Result(
                serde_json::to_vec(&serde_json::json!({
                    "resultType": "complete",
                    "supportedVersions": versions,
                    "capabilities": { "tools": {} },
                    "instructions": INSTRUCTIONS,
                    "ttlMs": 0,
                    "cacheScope": "private",
                    "_meta": { "io.modelcontextprotocol/serverInfo": {
                        "name": SERVER_NAME, "version": env!("CARGO_PKG_VERSION") } },
                }))
                .expect("plain JSON"),
            )
        }
        "ping" => Outcome::fixed("{}"),
        "tools/list" => Outcome::fixed(TOOLS),
        "tools/call" => call_tool(params).await,
        _ => Outcome::Error(codes::METHOD_NOT_FOUND, format!("unknown method {method}")),
    }
}

#[derive(Deserialize)]
struct EchoArgs<'a> {
    #[serde(borrow)]
    message: Cow<'a, str>,
}

#[derive(Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct BlobArgs {
    size: u64,
}

#[derive(Deserialize)]
struct SleepArgs {
    ms: u64,
}

/// Parses a tool's arguments, or says why they do not fit (JSON-RPC -32602).
fn args<'a, T: Deserialize<'a>>(params: &'a Params<'_>) -> Result<T, Outcome> {
    let raw = params.arguments.map_or("{}", RawValue::get);
    serde_json::from_str(raw)
        .map_err(|e| Outcome::Error(codes::INVALID_PARAMS, format!("invalid arguments: {e}")))
}

/// Runs one tool call.
async fn call_tool(params: &Params<'_>) -> Outcome {
    let run = async {
        Ok(match params.name.as_deref() {
            Some("echo") => {
                let EchoArgs { message } = args(params)?;
                Outcome::tool(&message, false)
            }
            Some("add") => {
                let AddArgs { a, b } = args(params)?;
                match a.checked_add(b) {
                    Some(sum) => Outcome::tool(&sum.to_string(), false),
                    None => Outcome::tool("integer overflow", true),
                }
            }
            Some("blob") => {
                let BlobArgs { size } = args(params)?;
                match blob_size(size) {
                    Ok(size) => Outcome::Blob {
                        size,
                        tagged: false,
                    },
                    Err(text) => Outcome::tool(&text, true),
                }
            }
            Some("sleep") => {
                let SleepArgs { ms } = args(params)?;
                match sleep_time(ms) {
                    Ok(time) => {
                        tokio::time::sleep(time).await;
                        Outcome::tool(&slept(ms), false)
                    }
                    Err(text) => Outcome::tool(&text, true),
                }
            }
            Some(other) => Outcome::Error(codes::INVALID_PARAMS, format!("unknown tool {other}")),
            None => Outcome::Error(codes::INVALID_PARAMS, "tools/call needs a name".into()),
        })
    };
    run.await.unwrap_or_else(|e: Outcome| e)
}

async fn on_get() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, HeaderValue::from_static("POST, DELETE"))],
    )
        .into_response()
}

async fn on_delete(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    let Some(id) = header_str(&headers, SESSION_HEADER) else {
        return (
            StatusCode::BAD_REQUEST,
            "Bad Request: Session ID is required",
        )
            .into_response();
    };
    if server.sessions.lock().remove(id) {
        StatusCode::ACCEPTED.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;

    struct Peer {
        http: reqwest::Client,
        url: String,
    }

    impl Peer {
        async fn post(&self, headers: &[(&str, &str)], body: Value) -> (u16, HeaderMap, Value) {
            let mut request = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .timeout(Duration::from_secs(10));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request
                .body(body.to_string())
                .send()
                .await
                .expect("request sent");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let bytes = response.bytes().await.expect("body");
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, headers, value)
        }
    }

    /// The server on a free port, answering as `answers` says, until the token is cancelled.
    async fn start(answers: Answers) -> (SocketAddr, CancellationToken) {
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().expect("literal"),
            answers,
            shutdown.clone(),
        )
        .await
        .expect("binds");
        (addr, shutdown)
    }

    fn call(tool: &str, arguments: Value) -> Value {
        json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":tool,"arguments":arguments}})
    }

    #[tokio::test]
    async fn answers_as_one_sse_event_when_asked_to() {
        let (addr, shutdown) = start(Answers::Sse).await;
        let http = reqwest::Client::new();
        let post = |body: Value, session: Option<String>| {
            let mut request = http
                .post(format!("http://{addr}/mcp"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .timeout(Duration::from_secs(10));
            if let Some(session) = session {
                request = request.header(SESSION_HEADER, session);
            }
            request.body(body.to_string()).send()
        };
        let init = post(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}), None)
            .await
            .expect("initialize");
        let session = init.headers()[SESSION_HEADER]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(init.headers()["content-type"], "text/event-stream");
        for (arguments, tool) in [
            (json!({"message":"hé"}), "echo"),
            (json!({"size":100_000}), "blob"),
        ] {
            let answer = post(call(tool, arguments), Some(session.clone()))
                .await
                .expect("called");
            assert_eq!(answer.headers()["content-type"], "text/event-stream");
            let text = answer.text().await.expect("body");
            let data = text
                .strip_prefix("event: message\ndata: ")
                .and_then(|rest| rest.strip_suffix("\n\n"))
                .expect("one event");
            let message: Value = serde_json::from_str(data).expect("the event carries JSON");
            assert_eq!(message["id"], 5, "{tool}");
            assert_eq!(message["result"]["isError"], false, "{tool}");
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn speaks_both_eras() {
        let (addr, shutdown) = start(Answers::Json).await;
        let peer = Peer {
            http: reqwest::Client::new(),
            url: format!("http://{addr}/mcp"),
        };

        // Session era.
        let (status, headers, init) = peer
            .post(&[], json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
        let session = headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .expect("a session id")
            .to_owned();
        let with = [(SESSION_HEADER, session.as_str())];
        let (status, _, _) = peer
            .post(
                &with,
                json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
            )
            .await;
        assert_eq!(status, 202);
        let (_, _, list) = peer
            .post(&with, json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
            .await;
        let names: Vec<&str> = list["result"]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert_eq!(names, ["add", "blob", "echo", "sleep"]);
        let (_, _, echo) = peer
            .post(&with, call("echo", json!({"message":"hé \"x\""})))
            .await;
        assert_eq!(echo["id"], 5);
        assert_eq!(echo["result"]["content"][0]["text"], "hé \"x\"");
        assert_eq!(echo["result"]["isError"], false);
        let (_, _, sum) = peer.post(&with, call("add", json!({"a":2,"b":3}))).await;
        assert_eq!(sum["result"]["content"][0]["text"], "5");
        let (_, _, overflow) = peer
            .post(&with, call("add", json!({"a":i64::MAX,"b":1})))
            .await;
        assert_eq!(overflow["result"]["isError"], true);
        let (_, _, blob) = peer.post(&with, call("blob", json!({"size":40}))).await;
        assert_eq!(
            blob["result"]["content"][0]["text"],
            super::super::tools::blob_text(40)
        );
        let (_, _, unknown) = peer.post(&with, call("nope", json!({}))).await;
        assert_eq!(unknown["error"]["code"], codes::INVALID_PARAMS);
        let (_, _, bad_args) = peer.post(&with, call("add", json!({"a":"x"}))).await;
        assert_eq!(bad_args["error"]["code"], codes::INVALID_PARAMS);
        let (status, _, _) = peer.post(&[], call("echo", json!({"message":"x"}))).await;
        assert_eq!(status, 400, "no session id");
        let (status, _, _) = peer
            .post(
                &[(SESSION_HEADER, "unknown")],
                call("echo", json!({"message":"x"})),
            )
            .await;
        assert_eq!(status, 404, "unknown session");
        let get = peer.http.get(&peer.url).send().await.expect("GET");
        assert_eq!(get.status().as_u16(), 405);
        let delete = |id: String| {
            peer.http
                .delete(&peer.url)
                .header(SESSION_HEADER, id)
                .send()
        };
        assert_eq!(
            delete(session.clone())
                .await
                .expect("DELETE")
                .status()
                .as_u16(),
            202
        );
        assert_eq!(
            delete(session).await.expect("DELETE").status().as_u16(),
            404
        );

        // Stateless era.
        let stateless = |method: &'static str, name: Option<&'static str>| {
            let mut headers = vec![(VERSION_HEADER, STATELESS_SINCE), (METHOD_HEADER, method)];
            if let Some(name) = name {
                headers.push((NAME_HEADER, name));
            }
            headers
        };
        let (status, headers, discover) = peer
            .post(
                &stateless("server/discover", None),
                json!({"jsonrpc":"2.0","id":1,"method":"server/discover"}),
            )
            .await;
        assert_eq!(status, 200);
        assert!(headers.get(SESSION_HEADER).is_none());
        assert!(
            discover["result"]["supportedVersions"]
                .as_array()
                .expect("versions")
                .iter()
                .any(|v| v == STATELESS_SINCE)
        );
        let (status, _, echo) = peer
            .post(
                &stateless("tools/call", Some("echo")),
                call("echo", json!({"message":"hi"})),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(echo["result"]["content"][0]["text"], "hi");
        assert_eq!(echo["result"]["resultType"], "complete");
        // A blob of two whole pieces and a part, streamed with its length declared.
        let size = 2 * 262_152 + 5;
        let (status, headers, blob) = peer
            .post(
                &stateless("tools/call", Some("blob")),
                call("blob", json!({ "size": size })),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(blob["result"]["resultType"], "complete");
        assert_eq!(blob["result"]["isError"], false);
        let text = blob["result"]["content"][0]["text"].as_str().expect("text");
        assert!(text == super::super::tools::blob_text(size), "blob text");
        let declared: usize = headers[header::CONTENT_LENGTH]
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("content-length");
        assert_eq!(declared, blob.to_string().len());
        let (_, _, list) = peer
            .post(
                &stateless("tools/list", None),
                json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}),
            )
            .await;
        assert_eq!(list["result"]["resultType"], "complete");
        assert_eq!(list["result"]["ttlMs"], 0);
        assert_eq!(list["result"]["cacheScope"], "private");
        assert_eq!(list["result"]["tools"].as_array().map(Vec::len), Some(4));
        let (_, _, ping) = peer
            .post(
                &stateless("ping", None),
                json!({"jsonrpc":"2.0","id":3,"method":"ping"}),
            )
            .await;
        assert_eq!(ping["result"], json!({"resultType": "complete"}));
        // Session-era results stay as they were.
        assert!(sum["result"].get("resultType").is_none());
        for headers in [
            stateless("tools/call", Some("add")),
            stateless("tools/call", None),
            stateless("tools/list", Some("echo")),
        ] {
            let (status, _, mismatch) = peer
                .post(&headers, call("echo", json!({"message":"hi"})))
                .await;
            assert_eq!(status, 400, "{headers:?}");
            assert_eq!(mismatch["error"]["code"], codes::HEADER_MISMATCH);
        }
        shutdown.cancel();
    }
}
