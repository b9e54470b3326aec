//! A recording upstream: the product's lean demo server (`mcp_tunnel::demo::lean`, both
//! Streamable HTTP eras: sessions with `initialize`, and stateless 2026-07-28 with
//! `server/discover`) behind a thin recording proxy on its own loopback port, which counts what
//! reaches the server before passing it on: each `initialize` by the upstream session it opened,
//! and each `tools/call` by its tool and arguments, so a test can assert "each call exactly
//! once" and "one initialize per agent session".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Request headers not passed on to the demo server (hop by hop, or set by the HTTP client).
const SKIPPED_REQUEST_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "keep-alive",
];
/// Response headers not passed back (the body is re-framed here).
const SKIPPED_RESPONSE_HEADERS: [&str; 4] = [
    "content-length",
    "connection",
    "transfer-encoding",
    "keep-alive",
];

/// What the upstream received so far.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// `initialize` requests by the upstream session id the server answered them with
    /// (`""` when it answered none, e.g. an error).
    pub initializes: HashMap<String, u32>,
    /// `tools/call` requests by `TOOL ARGUMENTS-JSON` (see [`call_key`]).
    pub calls: HashMap<String, u32>,
    /// `tools/call` requests that carried an upstream session id (session era).
    pub calls_in_sessions: u64,
    /// `tools/call` requests without one (stateless 2026-07-28, or a bridged session).
    pub stateless_calls: u64,
    /// Every JSON-RPC request by method (notifications and responses are not counted).
    pub methods: HashMap<String, u32>,
    /// `DELETE`s (a session ended by its client).
    pub deletes: u32,
}

impl Received {
    /// How often the call of `tool` with `arguments` arrived.
    pub fn times_called(&self, tool: &str, arguments: &Value) -> u32 {
        self.calls
            .get(&call_key(tool, arguments))
            .copied()
            .unwrap_or(0)
    }

    /// How often `echo` of `message` arrived.
    pub fn times_echoed(&self, message: &str) -> u32 {
        self.times_called("echo", &serde_json::json!({ "message": message }))
    }

    /// Every call that arrived more than once, with its count (empty when none did).
    pub fn repeated_calls(&self) -> Vec<(String, u32)> {
        let mut repeated: Vec<(String, u32)> = self
            .calls
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        repeated.sort();
        repeated
    }

    /// Every upstream session that saw more than one `initialize` (empty when none did).
    pub fn repeated_initializes(&self) -> Vec<(String, u32)> {
        let mut repeated: Vec<(String, u32)> = self
            .initializes
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        repeated.sort();
        repeated
    }

    /// All `initialize` requests.
    pub fn initialize_total(&self) -> u32 {
        self.initializes.values().sum()
    }

    /// All `tools/call` requests.
    pub fn call_total(&self) -> u64 {
        self.calls.values().map(|n| u64::from(*n)).sum()
    }
}

/// The key of a call in [`Received::calls`]: the tool name, a space, the arguments as compact
/// JSON (object keys sorted, as `serde_json` keeps them).
pub fn call_key(tool: &str, arguments: &Value) -> String {
    format!("{tool} {arguments}")
}

/// A running recording upstream; stops when dropped.
pub struct RecordingUpstream {
    /// Its MCP endpoint (the proxy's `/mcp`): what `connect` is given.
    pub url: String,
    /// The demo server behind the proxy, reached directly (bypasses the recording).
    pub server_url: String,
    record: Arc<Mutex<Received>>,
    _stop: tokio_util::sync::DropGuard,
}

#[derive(Clone)]
struct Proxy {
    target: String,
    http: reqwest::Client,
    record: Arc<Mutex<Received>>,
    /// How long each `tools/call` waits before it goes on to the demo server.
    latency: std::time::Duration,
}

impl RecordingUpstream {
    /// Starts the demo server and the recording proxy in front of it, both on loopback ports
    /// the OS picks.
    pub async fn start() -> Self {
        Self::start_with_latency(std::time::Duration::ZERO).await
    }

    /// [`RecordingUpstream::start`], each `tools/call` taking at least `latency` (recorded
    /// as it arrives): calls are in flight for that long.
    pub async fn start_with_latency(latency: std::time::Duration) -> Self {
        let stop = CancellationToken::new();
        let server = mcp_tunnel::demo::lean::serve(
            "127.0.0.1:0".parse().expect("literal"),
            mcp_tunnel::demo::lean::Answers::Json,
            stop.child_token(),
        )
        .await
        .expect("the lean demo server binds");
        let server_url = format!("http://{server}/mcp");
        let record = Arc::new(Mutex::new(Received::default()));
        let proxy = Proxy {
            target: server_url.clone(),
            http: reqwest::Client::builder()
                .timeout(super::WAIT)
                .build()
                .expect("an HTTP client"),
            record: record.clone(),
            latency,
        };
        let app = axum::Router::new()
            .route("/mcp", axum::routing::any(forward))
            .with_state(proxy);
        let addr: SocketAddr = super::serve_axum(app, &stop).await;
        Self {
            url: format!("http://{addr}/mcp"),
            server_url,
            record,
            _stop: stop.drop_guard(),
        }
    }

    /// A copy of what it received so far.
    pub fn received(&self) -> Received {
        self.record.lock().expect("record lock").clone()
    }
}

/// Records the request, passes it to the demo server, records what `initialize` opened, and
/// passes the answer back.
async fn forward(
    State(proxy): State<Proxy>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let upstream_session = headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut initialize = false;
    let mut calls = false;
    if method == Method::DELETE {
        proxy.record.lock().expect("record lock").deletes += 1;
    }
    if method == Method::POST {
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let messages = match parsed {
            Value::Array(batch) => batch,
            one => vec![one],
        };
        let mut record = proxy.record.lock().expect("record lock");
        for message in &messages {
            let (Some(name), true) = (message["method"].as_str(), message.get("id").is_some())
            else {
                continue;
            };
            *record.methods.entry(name.to_owned()).or_default() += 1;
            match name {
                "initialize" => initialize = true,
                "tools/call" => {
                    calls = true;
                    let params = &message["params"];
                    let key = call_key(
                        params["name"].as_str().unwrap_or_default(),
                        params.get("arguments").unwrap_or(&Value::Null),
                    );
                    *record.calls.entry(key).or_default() += 1;
                    if upstream_session.is_some() {
                        record.calls_in_sessions += 1;
                    } else {
                        record.stateless_calls += 1;
                    }
                }
                _ => {}
            }
        }
    }
    if calls && !proxy.latency.is_zero() {
        tokio::time::sleep(proxy.latency).await;
    }
    let mut request = proxy.http.request(method, &proxy.target);
    for (name, value) in &headers {
        if !SKIPPED_REQUEST_HEADERS.contains(&name.as_str()) {
            request = request.header(name, value);
        }
    }
    let answer = match request.body(body).send().await {
        Ok(answer) => answer,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("recording upstream: the demo server failed: {e}\n"),
            )
                .into_response();
        }
    };
    if initialize {
        let opened = answer
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        *proxy
            .record
            .lock()
            .expect("record lock")
            .initializes
            .entry(opened)
            .or_default() += 1;
    }
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if !SKIPPED_RESPONSE_HEADERS.contains(&name.as_str()) {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .expect("a valid response")
}
