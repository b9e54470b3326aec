//! What `connect` does with an upstream's HTTP answers: SSE with priming events and CRLF,
//! streams that stay open after the response, HTTP errors passed through with their status,
//! the upstream's session id kept on its side, and the agent's credential never forwarded.
//! The upstream here is scripted, so each answer shape is exact.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{Agent, Harness, Options, tool_text};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Every request the scripted upstream saw: method, headers.
type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// The scripted upstream's shared state.
#[derive(Clone, Default)]
struct Script {
    seen: Seen,
    /// Lets the `slow` tool's answer continue.
    release: Arc<tokio::sync::Notify>,
}

fn event(message: &Value) -> String {
    format!("event: message\ndata: {message}\n\n")
}

async fn scripted(script: Script, headers: HeaderMap, body: String) -> Response {
    let seen = script.seen.clone();
    let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let method = message["method"].as_str().unwrap_or("response").to_owned();
    seen.lock().expect("lock").push((method.clone(), headers));
    let id = message["id"].clone();
    match method.as_str() {
        "initialize" => {
            let result = json!({"jsonrpc":"2.0","id":id,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"scripted","version":"1"}}});
            (
                [
                    ("mcp-session-id", "upstream-session-1"),
                    ("content-type", "application/json"),
                ],
                result.to_string(),
            )
                .into_response()
        }
        "tools/call" => match message["params"]["name"].as_str() {
            Some("sse") => {
                // A priming event with empty data, CRLF line ends, a notification before the
                // response, and a stream that never closes on its own.
                let head = format!(
                    "id: p1\r\ndata: \r\n\r\nevent: message\r\ndata: {}\r\n\r\nevent: message\r\ndata: {}\r\n\r\n",
                    json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}}),
                    json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":"streamed"}]}}),
                );
                let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(head)])
                    .chain(futures_util::stream::pending());
                (
                    [("content-type", "text/event-stream")],
                    Body::from_stream(stream),
                )
                    .into_response()
            }
            Some("slow") => {
                // One notification, then (once the test says so) another and the response.
                let first = event(
                    &json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"s","progress":1}}),
                );
                let rest = event(
                    &json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"s","progress":2}}),
                ) + &event(
                    &json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":"slow done"}]}}),
                );
                let release = script.release.clone();
                let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(first)])
                    .chain(futures_util::stream::once(async move {
                        release.notified().await;
                        Ok(rest)
                    }));
                (
                    [("content-type", "text/event-stream")],
                    Body::from_stream(stream),
                )
                    .into_response()
            }
            Some("reject") => {
                let error = json!({"jsonrpc":"2.0","id":id,"error":{"code":-32602,"message":"bad arguments"}});
                (
                    StatusCode::BAD_REQUEST,
                    [("content-type", "application/json")],
                    error.to_string(),
                )
                    .into_response()
            }
            _ => (StatusCode::MISDIRECTED_REQUEST, "Invalid Host header").into_response(),
        },
        _ => StatusCode::ACCEPTED.into_response(),
    }
}

/// The upstream's standalone stream: one server-initiated notification, then quiet.
async fn standalone() -> Response {
    let note = event(
        &json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"from the server"}}),
    );
    let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(note)])
        .chain(futures_util::stream::pending());
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn start_scripted(shutdown: &CancellationToken) -> (String, Script) {
    let script = Script::default();
    let seen = script.seen.clone();
    let state = script.clone();
    let app = axum::Router::new().route(
        "/mcp",
        post(move |headers: HeaderMap, body: String| scripted(state.clone(), headers, body))
            .get(standalone)
            .delete({
                let seen = seen.clone();
                move |headers: HeaderMap| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().expect("lock").push(("DELETE".into(), headers));
                        StatusCode::OK
                    }
                }
            }),
    );
    let addr = common::serve_axum(app, shutdown).await;
    (format!("http://{addr}/mcp"), script)
}

/// The scripted upstream behind tenant `acme`'s source `scripted`, and an agent that sent
/// `initialize` (its answer in `init`).
struct Scripted {
    script: Script,
    _harness: Harness,
    _client: common::Client,
    agent: Agent,
    init: common::Answer,
    _upstreams: CancellationToken,
}

impl Scripted {
    async fn start() -> Self {
        let upstreams = CancellationToken::new();
        let (url, script) = start_scripted(&upstreams).await;
        let harness = Harness::start(Options::default()).await;
        let (client, mut agent) = harness.acme_serving("scripted", &url).await;
        let init = agent.initialize().await;
        Self {
            script,
            _harness: harness,
            _client: client,
            agent,
            init,
            _upstreams: upstreams,
        }
    }
}

/// An SSE answer, an upstream JSON-RPC error and a non-JSON HTTP error reach the agent
/// faithfully.
async fn scripted_answers_pass_through(agent: &Agent) {
    // SSE answer: the notification and the response, in order; the answer ends after the
    // response although the upstream keeps its stream open.
    let streamed = agent.call_tool(1, "sse", json!({})).await;
    assert_eq!(streamed.status, 200);
    assert!(
        streamed.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    assert_eq!(streamed.messages.len(), 2, "{streamed:?}");
    assert_eq!(streamed.messages[0]["method"], "notifications/progress");
    assert_eq!(tool_text(&streamed.messages[1]), "streamed");

    // A JSON-RPC error from the upstream passes through with its HTTP status and body.
    let rejected = agent.call_tool(2, "reject", json!({})).await;
    assert_eq!(rejected.status, 400);
    assert_eq!(
        rejected.response(),
        &json!({"jsonrpc":"2.0","id":2,"error":{"code":-32602,"message":"bad arguments"}})
    );

    // A non-JSON HTTP error becomes a JSON-RPC error naming the source, same status.
    let misdirected = agent.call_tool(3, "other", json!({})).await;
    assert_eq!(misdirected.status, 421);
    let message = misdirected.response()["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(
        message.contains("source scripted answered HTTP 421")
            && message.contains("Invalid Host header"),
        "{message}"
    );
    assert_eq!(misdirected.response()["id"], 3);
}

/// Every request the upstream saw (`seen`) carried no agent credential and, after
/// `initialize`, the upstream's own session id and the negotiated version.
fn assert_upstream_saw_its_own_session(seen: &[(String, HeaderMap)]) {
    for (method, headers) in seen.iter() {
        assert!(
            headers.get("authorization").is_none(),
            "{method}: the agent's credential never goes upstream"
        );
        if method != "initialize" {
            assert_eq!(
                headers["mcp-session-id"], "upstream-session-1",
                "{method} carries the upstream's own session id"
            );
        }
    }
    let calls: Vec<&str> = seen.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(calls.iter().filter(|m| **m == "tools/call").count(), 3);
    assert_eq!(calls.first(), Some(&"initialize"));
    assert_eq!(calls[1], "notifications/initialized");
    let versioned = seen
        .iter()
        .find(|(m, _)| m == "tools/call")
        .expect("a call");
    assert_eq!(
        versioned.1["mcp-protocol-version"], "2025-06-18",
        "the negotiated version goes upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_reach_the_agent_faithfully() {
    let Scripted {
        script,
        _harness,
        _client,
        agent,
        init,
        _upstreams,
    } = Scripted::start().await;
    let seen = script.seen.clone();
    assert_eq!(init.status, 200);
    let relay_session = agent.session.clone().expect("relay session id");
    assert_ne!(
        relay_session, "upstream-session-1",
        "the upstream's session id stays on connect's side"
    );

    scripted_answers_pass_through(&agent).await;

    assert_eq!(agent.delete().await, 200);
    // connect deletes the upstream session when the agent's session ends.
    tokio::time::timeout(common::WAIT, async {
        while !seen
            .lock()
            .expect("lock")
            .iter()
            .any(|(m, _)| m == "DELETE")
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("upstream session deleted");

    assert_upstream_saw_its_own_session(&seen.lock().expect("lock"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_messages_wait_for_the_get_stream() {
    let scripted = Scripted::start().await;
    let agent = &scripted.agent;
    // The upstream sent its notification before the agent opened a GET stream: it was held.
    let mut get = agent.get(None, "GET").await;
    let mut seen = String::new();
    common::sse::read_until(&mut get, &mut seen, "from the server").await;
    // `<stream>-<seq>`: the standalone stream's number is even (answers' odd), and random per
    // relay (see `session::sessions::STREAM_BLOCK`).
    let id = seen
        .lines()
        .find_map(|line| line.strip_prefix("id: "))
        .unwrap_or_default();
    let (stream, seq) = id.split_once('-').unwrap_or_default();
    assert!(
        stream.parse::<u64>().is_ok_and(|n| n.is_multiple_of(2)) && seq == "1",
        "standalone stream events carry resumable ids: {seen}"
    );
    assert!(
        seen.contains(&format!("id: {id}\nevent: message")),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_answer_stream_resumes_with_last_event_id() {
    let scripted = Scripted::start().await;
    let (script, agent) = (&scripted.script, &scripted.agent);

    // Read the answer stream up to its first event, then drop the connection.
    let mut answer = agent.send(&json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"slow","arguments":{}}})).await;
    let mut head = String::new();
    common::sse::read_until(&mut answer, &mut head, "\n\n").await;
    let last_id = head
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("events carry ids")
        .to_owned();
    assert!(head.contains("\"progress\":1"), "{head}");
    drop(answer);

    // The upstream goes on while the agent is away; the agent comes back with Last-Event-ID.
    script.release.notify_one();
    let resumed = agent.get(Some(&last_id), "GET resume").await;
    let resumed = common::read_answer(resumed).await;
    assert_eq!(resumed.status, 200);
    assert_eq!(
        resumed.messages.len(),
        2,
        "exactly the missing events: {:?}",
        resumed.messages
    );
    assert_eq!(resumed.messages[0]["params"]["progress"], 2);
    assert_eq!(tool_text(&resumed.messages[1]), "slow done");
    assert_eq!(resumed.messages[1]["id"], 7);
}
