//! Sessions and the streams they hold, over HTTP: caps per caller, tenant and source (counting
//! HTTP+SSE streams and stateless listen streams), HTTP+SSE streams audited and swept, listen
//! streams that end with their agent.

mod common;

use std::time::Duration;

use common::audit::{Trail, export};
use common::{Agent, Harness, Options, WAIT};
use futures_util::StreamExt;
use mcp_tunnel::config::LimitsSection;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Waits (bounded) until `done` holds, checking now and then.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The relay's limits with session caps of `per_key` per caller.
fn capped(per_key: usize) -> LimitsSection {
    LimitsSection {
        max_sessions_per_key: per_key,
        ..LimitsSection::default()
    }
}

/// A GET `/sse/{source}` by `key`, the response with its headers in.
async fn sse_open(harness: &Harness, source: &str, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{}/sse/{source}", harness.agents))
        .bearer_auth(key)
        .timeout(WAIT)
        .send()
        .await
        .expect("GET /sse is sent")
}

/// The JSON-RPC error message of a refused request.
async fn refusal(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON-RPC error body");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON-RPC error: {body}"))
        .to_owned();
    (status, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_callers_cap_are_refused_with_an_error_naming_the_cap() {
    let (harness, trail) = Trail::start(Options {
        limits: capped(3),
        ..Options::default()
    })
    .await;
    let (db, upstream) = (trail.db.clone(), trail.upstream.clone());
    let _client = harness.connect(&harness.acme, &[("demo", &upstream)]).await;

    // Two Streamable HTTP sessions and one HTTP+SSE stream (which never initializes): three.
    let mut first = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(first.initialize().await.status, 200);
    let mut second = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(second.initialize().await.status, 200);
    let stream = sse_open(&harness, "demo", &harness.acme.api_key).await;
    assert_eq!(stream.status(), 200, "the third is within the cap");

    // The fourth, of either transport, is refused before any tunnel stream opens.
    let mut fourth = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    let refused = fourth.initialize().await;
    assert_eq!(refused.status, 429, "{refused:?}");
    let message = refused.error_message();
    assert!(
        message.contains("too many open sessions") && message.contains("3"),
        "{message}"
    );
    assert_eq!(refused.response()["id"], 0, "the initialize's id is echoed");
    assert!(fourth.session.is_none());
    let (status, message) = refusal(sse_open(&harness, "demo", &harness.acme.api_key).await).await;
    assert_eq!(status, 429);
    assert!(message.contains("too many open sessions"), "{message}");
    let streams = harness
        .state
        .registry
        .route("acme", "demo")
        .expect("routed")
        .streams_active();
    assert_eq!(streams, 3, "refused sessions opened no tunnel stream");

    // Another tenant's caller is not counted with acme's.
    let _other = harness
        .connect(&harness.other, &[("demo", &upstream)])
        .await;
    let mut other = Agent::new(&harness.url("demo"), &harness.other.api_key);
    assert_eq!(other.initialize().await.status, 200);

    // Ending one (DELETE) makes room.
    let deleted = first.request(reqwest::Method::DELETE).send().await;
    assert_eq!(deleted.expect("DELETE is sent").status(), 200);
    let mut fifth = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(fifth.initialize().await.status, 200);

    // Every HTTP+SSE opening is in the trail, the refused one too.
    drop(stream);
    harness.stop().await;
    let rows = export(&db).await;
    let opens: Vec<&str> = rows
        .iter()
        .filter(|row| row["mcp.method.name"] == "sse/open")
        .map(|row| row["outcome"]["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(opens, vec!["ok", "error"], "{rows:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sse_stream_that_never_initializes_is_swept_and_its_stream_ends() {
    let harness = Harness::start(Options::with_limits(LimitsSection {
        request_timeout_secs: 0,
        ..LimitsSection::default()
    }))
    .await;
    let (upstream, _stop) = common::guarded_demo_upstream().await;
    let _client = harness.connect(&harness.acme, &[("demo", &upstream)]).await;
    let tunnel = harness
        .state
        .registry
        .route("acme", "demo")
        .expect("routed");

    let stream = sse_open(&harness, "demo", &harness.acme.api_key).await;
    assert_eq!(stream.status(), 200);
    let mut body = stream.bytes_stream();
    let endpoint = tokio::time::timeout(WAIT, body.next())
        .await
        .expect("the endpoint event arrives")
        .expect("a chunk")
        .expect("readable");
    assert!(String::from_utf8_lossy(&endpoint).contains("endpoint"));
    assert_eq!(tunnel.streams_active(), 1);

    // No initialize within the grace (here 0 s): the sweep ends it, and the agent's stream.
    assert_eq!(harness.state.sweep_sessions().await, 1);
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the agent's event stream ends with its session"
    );
    until("the tunnel stream closes", || tunnel.streams_active() == 0).await;
    assert_eq!(harness.state.sessions.len(), 0);
}

/// A Streamable HTTP upstream of 2026-07-28 whose `subscriptions/listen` answer is an event
/// stream that never ends by itself; `server/discover` names its version, anything else gets
/// an empty result.
async fn listening_upstream(shutdown: &CancellationToken) -> String {
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(|body: String| async move {
            let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if message["method"] == "server/discover" {
                let discovered = json!({"jsonrpc":"2.0","id":message["id"],"result":{
                    "supportedVersions":["2026-07-28"],"capabilities":{},
                    "serverInfo":{"name":"listening","version":"0"}}});
                return axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(discovered.to_string()))
                    .expect("a valid response");
            }
            if message["method"] == "subscriptions/listen" {
                let stream = futures_util::stream::pending::<Result<String, std::io::Error>>();
                return axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(axum::body::Body::from_stream(stream))
                    .expect("a valid response");
            }
            axum::response::Response::builder()
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    json!({"jsonrpc":"2.0","id":message["id"],"result":{}}).to_string(),
                ))
                .expect("a valid response")
        }),
    );
    let addr = common::serve_axum(app, shutdown).await;
    format!("http://{addr}/mcp")
}

/// A 2026-07-28 `subscriptions/listen` request.
fn listen(agent: &Agent, id: u64) -> reqwest::RequestBuilder {
    agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "subscriptions/listen")
        .body(json!({"jsonrpc":"2.0","id":id,"method":"subscriptions/listen","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_streams_count_against_the_cap_and_end_with_their_agent() {
    let harness = Harness::start(Options {
        limits: capped(1),
        ..Options::default()
    })
    .await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let upstream = listening_upstream(&stop).await;
    let _client = harness
        .connect(&harness.acme, &[("listen", &upstream)])
        .await;
    let tunnel = harness
        .state
        .registry
        .route("acme", "listen")
        .expect("routed");
    let agent = Agent::new(&harness.url("listen"), &harness.acme.api_key);

    let first = listen(&agent, 1).send().await.expect("listen is sent");
    assert_eq!(first.status(), 200);
    assert_eq!(harness.state.sessions.listens(), 1);
    let (status, message) = refusal(listen(&agent, 2).send().await.expect("sent")).await;
    assert_eq!(status, 429, "the second listen stream passes the cap of 1");
    assert!(message.contains("too many open sessions"), "{message}");

    // The agent goes away: the stream, its tunnel stream and its place under the cap end.
    drop(first);
    until("the listen stream ends", || {
        harness.state.sessions.listens() == 0 && tunnel.streams_active() == 0
    })
    .await;
    let again = listen(&agent, 3).send().await.expect("listen is sent");
    assert_eq!(again.status(), 200, "room again once the first is gone");
}

/// A Streamable HTTP upstream that never answers `tools/call` (as the spec allows once the
/// call is cancelled, and as a stuck server does); it records every method it sees.
async fn silent_upstream(
    shutdown: &CancellationToken,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |body: String| {
            let record = record.clone();
            async move {
                let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let method = message["method"].as_str().unwrap_or_default().to_owned();
                record.lock().expect("lock").push(method.clone());
                let result = match method.as_str() {
                    "initialize" => {
                        json!({"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"silent","version":"1"}})
                    }
                    "tools/call" => std::future::pending().await,
                    _ => {
                        return axum::response::Response::builder()
                            .status(202)
                            .body(axum::body::Body::empty())
                            .expect("a valid response");
                    }
                };
                axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(
                        json!({"jsonrpc":"2.0","id":message["id"],"result":result}).to_string(),
                    ))
                    .expect("a valid response")
            }
        }),
    );
    let addr = common::serve_axum(app, shutdown).await;
    (format!("http://{addr}/mcp"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_ends_its_post_though_the_upstream_never_answers() {
    let harness = Harness::start(Options::default()).await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (upstream, seen) = silent_upstream(&stop).await;
    let (_client, mut agent) = harness.acme_serving("silent", &upstream).await;
    assert_eq!(agent.initialize().await.status, 200);

    // The call hangs upstream (the request timeout is 300 s, past this test's WAIT).
    let call = tokio::spawn({
        let agent = agent.clone();
        async move { agent.call_tool(7, "hang", json!({})).await }
    });
    until("the upstream has the call", || {
        seen.lock().expect("lock").iter().any(|m| m == "tools/call")
    })
    .await;
    let cancel = agent
        .post(&json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7,"reason":"user"}}))
        .await;
    assert_eq!(cancel.status, 202);

    // The POST ends at once, with no answer (none is owed to a cancelled request).
    let answer = tokio::time::timeout(WAIT, call)
        .await
        .expect("the cancelled call's POST ends")
        .expect("call task");
    assert_eq!(answer.status, 200);
    assert!(
        answer.messages.iter().all(|m| m["id"] != 7),
        "no answer for a cancelled request: {answer:?}"
    );
    until("the upstream hears the cancellation", || {
        seen.lock()
            .expect("lock")
            .iter()
            .any(|m| m == "notifications/cancelled")
    })
    .await;
    // The session goes on.
    let ping = agent
        .post(&json!({"jsonrpc":"2.0","id":8,"method":"ping"}))
        .await;
    assert_eq!(ping.status, 200, "the session lives on: {ping:?}");
}
