//! Large answers stream through `connect` and the relay in pieces (issue 7): they arrive
//! byte-identical over both transports, stay within the per-message limit without anyone
//! buffering them whole, and end in an aborted body (never a truncated one that looks
//! complete) when the tunnel or the upstream breaks off, with the audit row saying what
//! happened.
//!
//! The upstream here is a small axum server whose `big` tool answers with a result of a given
//! size, as one body with a length, chunked, or breaking off midway, so every path is
//! exercised on purpose.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::audit::{audit_at, export, outcome};
use common::{Agent, Harness, Options, WAIT};
use futures_util::StreamExt;
use mcp_tunnel::config::{LimitsSection, TransportChoice};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The size of the chunks the test upstream writes a streamed body in.
const CHUNK: usize = 64 * 1024;

/// Larger than several of `connect`'s 256 KiB pieces.
const LARGE: usize = 3 * 1024 * 1024 + 12_345;

/// The text of a `big` result of about `size` bytes: escapes of every kind and multi-byte
/// characters, so piece boundaries fall inside them.
fn big_text(size: usize) -> String {
    let pattern = "line \"quoted\" \\ tab\t é ✓ 😀\n";
    pattern.chars().cycle().take(size / 2).collect()
}

/// The exact JSON text the upstream answers `big` with: a tool result (its `isError` after
/// the large text, as serde_json orders keys), or with `error`, a JSON-RPC error carrying the
/// text as data.
fn big_answer(id: &Value, size: usize, error: bool, tool_error: bool) -> Vec<u8> {
    let text = big_text(size);
    let answer = if error {
        json!({"jsonrpc":"2.0","id":id,"error":{"code":-32099,"message":"big failure","data":text}})
    } else {
        json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":text}],"isError":tool_error}})
    };
    serde_json::to_vec(&answer).expect("a JSON value serializes")
}

/// What the test upstream counts: bytes of streamed bodies produced, and bodies dropped
/// unfinished (their reader went away).
#[derive(Default)]
struct Upstream {
    produced: AtomicUsize,
    dropped: tokio::sync::Notify,
}

/// Notifies when a streamed body is dropped (finished or not).
struct DropSignal(Arc<Upstream>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.dropped.notify_one();
    }
}

/// A body of `bytes` in [`CHUNK`]s, counted into `upstream.produced`; then, by `tail`: the
/// end, an error (`"break"`), or nothing ever again (`"stall"`).
fn streamed(upstream: Arc<Upstream>, bytes: Vec<u8>, tail: &'static str) -> Body {
    let signal = DropSignal(upstream.clone());
    let stream = async_stream(bytes, upstream, tail, signal);
    Body::from_stream(stream)
}

fn async_stream(
    bytes: Vec<u8>,
    upstream: Arc<Upstream>,
    tail: &'static str,
    signal: DropSignal,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let bytes = Bytes::from(bytes);
    let chunks: Vec<Bytes> = (0..bytes.len())
        .step_by(CHUNK)
        .map(|at| bytes.slice(at..(at + CHUNK).min(bytes.len())))
        .collect();
    futures_util::stream::unfold(
        (chunks.into_iter(), upstream, tail, signal, false),
        |(mut chunks, upstream, tail, signal, ended)| async move {
            if ended {
                return None;
            }
            match chunks.next() {
                Some(chunk) => {
                    // Let the reader's pace drive production, as a real server's would.
                    tokio::task::yield_now().await;
                    upstream.produced.fetch_add(chunk.len(), Ordering::SeqCst);
                    Some((Ok(chunk), (chunks, upstream, tail, signal, false)))
                }
                None => match tail {
                    "break" => Some((
                        Err(std::io::Error::other("upstream broke off")),
                        (chunks, upstream, tail, signal, true),
                    )),
                    "stall" => {
                        std::future::pending::<()>().await;
                        None
                    }
                    _ => None,
                },
            }
        },
    )
}

/// The answer to `initialize`: session `big-session`.
fn initialized(id: &Value) -> Response {
    let answer = json!({"jsonrpc":"2.0","id":id,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"big","version":"0"}}});
    let mut response = axum::Json(answer).into_response();
    response
        .headers_mut()
        .insert("mcp-session-id", HeaderValue::from_static("big-session"));
    response
}

/// The start of a result whose text runs on for `size` bytes, made as it is read: nobody may
/// hold it whole.
fn endless(id: &Value, size: usize, upstream: Arc<Upstream>) -> Body {
    let head =
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":""#);
    let filler = Bytes::from(vec![b'x'; CHUNK]);
    let signal = DropSignal(upstream.clone());
    let chunks = (0..size / CHUNK).map(move |_| filler.clone());
    let stream = futures_util::stream::iter(std::iter::once(Bytes::from(head)).chain(chunks)).then(
        move |chunk| {
            let upstream = upstream.clone();
            let _signal = &signal;
            async move {
                tokio::task::yield_now().await;
                upstream.produced.fetch_add(chunk.len(), Ordering::SeqCst);
                Ok::<_, std::io::Error>(chunk)
            }
        },
    );
    Body::from_stream(stream)
}

/// An event stream: a progress notification, then `answer` as one event.
fn progress_then_answer(upstream: Arc<Upstream>, answer: Vec<u8>) -> Response {
    let mut events = format!(
        "event: message\ndata: {}\n\nevent: message\ndata: ",
        json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}})
    )
    .into_bytes();
    events.extend_from_slice(&answer);
    events.extend_from_slice(b"\n\n");
    let mut response = Response::new(streamed(upstream, events, "end"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// The upstream's one endpoint: sessions, notifications, and the `big` tool.
async fn mcp(
    axum::extract::State(upstream): axum::extract::State<Arc<Upstream>>,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).expect("connect forwards JSON");
    let id = request["id"].clone();
    match request["method"].as_str() {
        Some("initialize") => initialized(&id),
        Some("tools/call") if !id.is_null() => {
            let args = &request["params"]["arguments"];
            let size = args["size"].as_u64().expect("size") as usize;
            let mode = args["mode"].as_str().unwrap_or("length");
            let answer = big_answer(
                &id,
                if mode == "endless" { 0 } else { size },
                args["error"].as_bool().unwrap_or(false),
                args["tool_error"].as_bool().unwrap_or(false),
            );
            let body = match mode {
                // The start of a result whose text runs on for `size` bytes, made as it is
                // read: nobody may hold it whole.
                "endless" => endless(&id, size, upstream),
                "length" => Body::from(answer),
                // An event stream: a progress notification, then the answer as one event.
                "sse" => return progress_then_answer(upstream, answer),
                "chunked" => streamed(upstream, answer, "end"),
                // The first half of the answer, then the upstream breaks off or stalls.
                "break" | "stall" => {
                    let half = answer[..answer.len() / 2].to_vec();
                    streamed(
                        upstream,
                        half,
                        if mode == "break" { "break" } else { "stall" },
                    )
                }
                other => panic!("unknown mode {other}"),
            };
            let mut response = Response::new(body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => StatusCode::ACCEPTED.into_response(),
    }
}

/// Starts the test upstream; returns its URL and its counters.
async fn big_upstream(stop: &CancellationToken) -> (String, Arc<Upstream>) {
    let upstream = Arc::new(Upstream::default());
    let app = axum::Router::new()
        .route(
            "/mcp",
            axum::routing::post(mcp)
                .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
                .delete(|| async { StatusCode::OK }),
        )
        .with_state(upstream.clone());
    let addr = common::serve_axum(app, stop).await;
    (format!("http://{addr}/mcp"), upstream)
}

/// The `tools/call` rows of the trail at `db`, through `audit export`.
async fn call_rows(db: &Path) -> Vec<Value> {
    export(db)
        .await
        .into_iter()
        .filter(|row: &Value| row["mcp.method.name"] == "tools/call")
        .collect()
}

/// The outcomes of the `tools/call` rows of requests `ids`, in that order.
async fn outcomes(db: &Path, ids: &[u64]) -> Vec<String> {
    let rows = call_rows(db).await;
    ids.iter().map(|id| outcome(row_of(&rows, *id))).collect()
}

/// The row of request `id`.
fn row_of(rows: &[Value], id: u64) -> &Value {
    rows.iter()
        .find(|row| row["jsonrpc.request.id"].as_str() == Some(id.to_string().as_str()))
        .unwrap_or_else(|| panic!("a row for request {id}: {rows:?}"))
}

/// POSTs a `big` call in `agent`'s session and returns the raw response (body unread).
async fn call_big(agent: &Agent, id: u64, arguments: Value) -> reqwest::Response {
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"big","arguments":arguments}});
    agent.send(&body).await
}

/// A scratch directory with the trail at `db`, and the token that stops the test upstream;
/// both go when this is dropped.
struct Scratch {
    db: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

/// A relay with an audit trail and a `connect` over `transport` serving the test upstream;
/// returns them with an agent in a fresh session, and the scratch holding the trail.
async fn setup(
    limits: LimitsSection,
    transport: TransportChoice,
) -> (Harness, common::Client, Agent, Arc<Upstream>, Scratch) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("audit.db");
    let stop = CancellationToken::new();
    let max_answer_bytes = limits.max_answer_bytes;
    let harness = Harness::start(Options {
        audit: Some(audit_at(&db)),
        limits,
        ..Options::default()
    })
    .await;
    let (url, upstream) = big_upstream(&stop).await;
    let mut settings = harness.client_settings(&harness.acme, &[("big", &url)]);
    settings.transport = transport;
    // connect's answer limit as the relay's.
    settings.max_answer_bytes = max_answer_bytes;
    let client = harness.connect_with(&harness.acme, settings).await;
    let mut agent = Agent::new(&harness.url("big"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    let scratch = Scratch {
        db,
        _dir: dir,
        _stop: stop.drop_guard(),
    };
    (harness, client, agent, upstream, scratch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_arrive_byte_identical_over_quic_and_https_and_are_audited() {
    for transport in [TransportChoice::Quic, TransportChoice::Https] {
        let (_harness, _client, agent, _, scratch) =
            setup(LimitsSection::default(), transport).await;

        // (id, arguments, expected outcome): a length-delimited and a chunked result, a tool
        // error whose `isError` comes after the large text, and a large JSON-RPC error.
        let cases = [
            (1, json!({"size": LARGE, "mode": "length"}), "ok"),
            (2, json!({"size": LARGE, "mode": "chunked"}), "ok"),
            (
                3,
                json!({"size": LARGE, "mode": "chunked", "tool_error": true}),
                "tool_error",
            ),
            (
                4,
                json!({"size": LARGE, "mode": "length", "error": true}),
                "error:-32099",
            ),
        ];
        let mut sizes = Vec::new();
        for (id, arguments, _) in &cases {
            let response = call_big(&agent, *id, arguments.clone()).await;
            assert_eq!(response.status(), 200, "{transport:?} call {id}");
            assert!(
                response.headers().get("content-length").is_none(),
                "{transport:?} call {id}: a large answer is streamed, not buffered whole"
            );
            let body = tokio::time::timeout(WAIT, response.bytes())
                .await
                .expect("the answer arrives in time")
                .expect("the body is complete");
            let expected = big_answer(
                &json!(id),
                LARGE,
                arguments["error"] == true,
                arguments["tool_error"] == true,
            );
            assert!(
                body[..] == expected[..],
                "{transport:?} call {id}: {} bytes arrived, {} expected",
                body.len(),
                expected.len()
            );
            sizes.push(expected.len());
        }
        // A small answer still goes whole, with its length.
        let small = call_big(&agent, 5, json!({"size": 1000, "mode": "chunked"})).await;
        assert!(small.headers().get("content-length").is_some());
        let small = small.bytes().await.expect("small body");
        assert_eq!(&small[..], &big_answer(&json!(5), 1000, false, false)[..]);

        let rows = call_rows(&scratch.db).await;
        for ((id, _, expected), size) in cases.iter().zip(sizes) {
            let row = row_of(&rows, *id);
            assert_eq!(outcome(row), *expected, "{transport:?} call {id}: {row}");
            assert_eq!(row["bytes_out"], size, "{transport:?} call {id}: bytes out");
            assert_eq!(row["network.transport"], transport_label(transport));
        }
        assert_eq!(outcome(row_of(&rows, 5)), "ok");
    }
}

fn transport_label(transport: TransportChoice) -> &'static str {
    match transport {
        TransportChoice::Https => "https",
        _ => "quic",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_answer_limit_fails_without_being_read_whole() {
    let limit = 1024 * 1024;
    // Upstream answers are bounded by max_answer_bytes (max_message_bytes bounds what agents
    // send): both at 1 MiB here.
    let limits = LimitsSection {
        max_message_bytes: limit,
        max_answer_bytes: limit,
        ..LimitsSection::default()
    };
    let (_harness, _client, agent, upstream, scratch) = setup(limits, TransportChoice::Quic).await;
    let huge = 128 * 1024 * 1024;

    // With a declared length, connect refuses before reading: a clear JSON-RPC error.
    let response = call_big(&agent, 1, json!({"size": 8 * limit, "mode": "length"})).await;
    let answer = common::read_answer(response).await;
    assert_eq!(answer.response()["error"]["code"], -32002, "{answer:?}");

    // Without one, connect streams until the limit, then abandons the answer: the agent's
    // body is aborted, and the upstream was not read much past the limit.
    let response = call_big(&agent, 2, json!({"size": huge, "mode": "endless"})).await;
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(WAIT, response.bytes())
        .await
        .expect("the answer ends in time");
    assert!(body.is_err(), "an aborted body, not a truncated 200");
    tokio::time::timeout(WAIT, upstream.dropped.notified())
        .await
        .expect("connect lets go of the upstream's body");
    let produced = upstream.produced.load(Ordering::SeqCst);
    assert!(
        produced < 32 * 1024 * 1024,
        "the upstream produced {produced} bytes of a {huge}-byte answer: it was read on, not refused"
    );

    assert_eq!(
        outcomes(&scratch.db, &[1, 2]).await,
        ["error:-32002", "tunnel_error"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_drop_mid_answer_aborts_the_body_and_records_a_tunnel_error() {
    let (harness, _client, agent, _, scratch) =
        setup(LimitsSection::default(), TransportChoice::Quic).await;
    // Half the answer, then the upstream stalls: the agent has its first bytes.
    let mut response = call_big(&agent, 1, json!({"size": LARGE, "mode": "stall"})).await;
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(WAIT, response.chunk())
        .await
        .expect("the first piece arrives")
        .expect("the body reads")
        .expect("a first chunk");
    assert!(first.starts_with(b"{"), "the answer's beginning");
    // The tunnel connection drops (the relay's end closes it, as a network failure would).
    harness
        .state
        .registry
        .route(&harness.acme.name, "big")
        .expect("the tunnel is up")
        .connection
        .close("test: the tunnel drops");
    let rest = tokio::time::timeout(WAIT, async {
        loop {
            match response.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the body ends in time");
    assert!(rest.is_err(), "an aborted body, not a truncated 200");

    assert_eq!(outcomes(&scratch.db, &[1]).await, ["tunnel_error"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_breaking_off_or_stalling_mid_answer_aborts_the_body() {
    let limits = LimitsSection {
        request_timeout_secs: 5,
        ..LimitsSection::default()
    };
    let (_harness, _client, agent, _, scratch) = setup(limits, TransportChoice::Quic).await;
    for (id, mode) in [(1, "break"), (2, "stall")] {
        let response = call_big(&agent, id, json!({"size": LARGE, "mode": mode})).await;
        assert_eq!(response.status(), 200, "{mode}");
        let body = tokio::time::timeout(WAIT, response.bytes())
            .await
            .expect("the answer ends in time");
        assert!(
            body.is_err(),
            "{mode}: an aborted body, not a truncated 200"
        );
    }
    assert_eq!(
        outcomes(&scratch.db, &[1, 2]).await,
        ["tunnel_error", "timeout"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_the_request_limit_within_the_answer_limit_arrive_whole_json_and_sse() {
    // Agents may send at most 1 MiB; upstreams answer up to the default answer limit.
    let limit = 1024 * 1024;
    let limits = LimitsSection {
        max_message_bytes: limit,
        ..LimitsSection::default()
    };
    let (_harness, _client, agent, _upstream, _scratch) =
        setup(limits, TransportChoice::Quic).await;
    let size = 8 * limit;
    let wanted = big_answer(&json!(1), size, false, false);
    for (id, mode) in [(1, "chunked"), (1, "sse")] {
        let response = call_big(&agent, id, json!({"size": size, "mode": mode})).await;
        assert_eq!(response.status(), 200, "{mode}");
        let is_sse = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = response.bytes().await.expect("the whole answer arrives");
        let answer = if is_sse {
            let data = common::sse_data(&body);
            let last = data.last().expect("events");
            assert!(
                data.iter().any(|d| d.contains("notifications/progress")),
                "the progress notification passes too ({mode})"
            );
            Bytes::from(last.clone())
        } else {
            body
        };
        assert_eq!(
            answer.len(),
            wanted.len(),
            "the {mode} answer arrives whole"
        );
        assert!(answer[..] == wanted[..], "the {mode} answer arrives intact");
    }
}
