//! The tunnel core end to end, in-process: relay + connect + the built-in MCP server, driven by
//! a raw Streamable HTTP agent so every status and header is visible.

mod common;

use common::sse::read_events;
use common::{Agent, Harness, Options, WAIT, harness_with_demo, tool_text};
use mcp_tunnel::config::LimitsSection;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn tunnel_row(harness: &Harness) -> mcp_tunnel::relay::TunnelRow {
    harness
        .state
        .registry
        .rows()
        .into_iter()
        .find(|r| r.tenant == "acme" && r.source == "demo")
        .expect("acme/demo is routed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lifecycle_initialize_call_stream_delete() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    let result = agent.initialize_result().await;
    assert!(result["protocolVersion"].is_string(), "{result}");
    let session = agent
        .session
        .clone()
        .expect("the relay issued a session id");
    assert!(
        session.len() < 512 && session.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "relay-issued id: sealed, visible ASCII: {session}"
    );

    let names = agent.tool_names(1).await;
    for tool in ["echo", "add", "blob"] {
        assert!(names.iter().any(|n| n == tool), "{tool} listed: {names:?}");
    }
    let echo = agent.call_tool(2, "echo", json!({"message": "hi"})).await;
    assert_eq!(tool_text(echo.response()), "hi");
    assert_eq!(echo.response()["id"], 2);
    let add = agent.call_tool(3, "add", json!({"a": 40, "b": 2})).await;
    assert_eq!(tool_text(add.response()), "42");

    // The GET stream opens as SSE; a second one takes over from the first, which ends.
    let get = agent.get(None, "GET").await;
    assert_eq!(get.status(), 200);
    assert!(
        get.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    assert_eq!(get.headers()["x-accel-buffering"], "no");
    let second = agent.get(None, "second GET").await;
    assert_eq!(second.status(), 200, "a new GET takes over the stream");
    let first_body = tokio::time::timeout(WAIT, get.bytes())
        .await
        .expect("the older GET stream ends");
    assert!(first_body.is_ok());
    drop(second);

    assert_eq!(
        tunnel_row(&harness).streams_active,
        1,
        "one stream for the whole session"
    );
    assert_eq!(tunnel_row(&harness).streams_opened, 1);
    assert_eq!(agent.delete().await, 200);
    let after = agent.call_tool(4, "echo", json!({"message": "late"})).await;
    assert_eq!(after.status, 404, "a deleted session is gone: {after:?}");
    assert_eq!(harness.state.sessions.len(), 0);
    assert_eq!(
        tunnel_row(&harness).streams_opened,
        2,
        "the late call's resume was refused by connect, which remembers the deletion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_sessions_each_on_its_own_stream() {
    const SESSIONS: usize = 100;
    const CALLS: usize = 5;
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let url = harness.url("demo");
    let mut agents = Vec::new();
    let mut opened = tokio::task::JoinSet::new();
    for _ in 0..SESSIONS {
        let mut agent = Agent::new(&url, &harness.acme.api_key);
        opened.spawn(async move {
            assert_eq!(agent.initialize().await.status, 200);
            agent
        });
    }
    while let Some(agent) = opened.join_next().await {
        agents.push(agent.expect("session opens"));
    }
    let row = tunnel_row(&harness);
    assert_eq!(
        row.streams_active, SESSIONS,
        "every session holds its own QUIC stream"
    );
    assert_eq!(row.streams_opened, SESSIONS as u64);
    assert_eq!(harness.state.sessions.len(), SESSIONS);

    // Interleave calls across all sessions; every answer must come back to its asker.
    let mut calls = tokio::task::JoinSet::new();
    for (s, agent) in agents.iter().enumerate() {
        for c in 0..CALLS {
            let agent = agent.clone();
            calls.spawn(async move {
                let message = format!(
                    "session {s} call {c} via {}",
                    agent.session.as_deref().unwrap_or_default()
                );
                let answer = agent
                    .call_tool(c as u64 + 10, "echo", json!({"message": message}))
                    .await;
                assert_eq!(answer.status, 200);
                assert_eq!(answer.response()["id"], c as u64 + 10);
                assert_eq!(
                    tool_text(answer.response()),
                    message,
                    "the answer reached the session that asked"
                );
            });
        }
    }
    let mut done = 0;
    while let Some(result) = calls.join_next().await {
        result.expect("call task");
        done += 1;
    }
    assert_eq!(done, SESSIONS * CALLS);
    assert_eq!(
        tunnel_row(&harness).streams_opened,
        SESSIONS as u64,
        "calls reuse their session's stream"
    );

    for agent in &agents {
        assert_eq!(agent.delete().await, 200);
    }
    assert_eq!(harness.state.sessions.len(), 0);
}

fn stateless_call(agent: &Agent, id: u64, tool: &str, args: Value) -> reqwest::RequestBuilder {
    agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":args,"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_era_one_stream_per_request_and_headers_checked() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    agent.version = Some("2026-07-28".into());

    let discover = agent.discover().send().await.expect("discover");
    let discover = common::read_answer(discover).await;
    assert_eq!(discover.status, 200, "{discover:?}");
    assert!(
        discover.response()["result"]["supportedVersions"]
            .as_array()
            .expect("versions")
            .iter()
            .any(|v| v == "2026-07-28"),
        "{discover:?}"
    );
    assert!(
        discover.headers.get("mcp-session-id").is_none(),
        "no sessions in 2026-07-28"
    );

    for id in 2..5 {
        let answer = common::read_answer(
            stateless_call(&agent, id, "echo", json!({"message": format!("m{id}")}))
                .send()
                .await
                .expect("call"),
        )
        .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(tool_text(answer.response()), format!("m{id}"));
    }
    let row = tunnel_row(&harness);
    assert_eq!(
        row.streams_opened, 4,
        "each stateless request rode its own stream"
    );
    // A stream is released once its answer is complete, which may be just after the agent read
    // the last byte of it: wait (bounded) for the count to settle.
    let settled = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while tunnel_row(&harness).streams_active != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "and closed it when answered");

    // Headers that disagree with the body never reach the tunnel.
    headers_that_disagree_with_the_body_are_refused(&agent).await;
    assert_eq!(tunnel_row(&harness).streams_opened, 4);
}

/// Headers that disagree with the body (a repeated or wrong `Mcp-Name`, no `Mcp-Method`) are
/// refused with -32020.
async fn headers_that_disagree_with_the_body_are_refused(agent: &Agent) {
    let mismatch =
        stateless_call(agent, 9, "add", json!({"a": 1, "b": 2})).header("mcp-name", "echo");
    let mismatch = common::read_answer(mismatch.send().await.expect("repeated header")).await;
    assert_eq!(mismatch.status, 400);
    assert_eq!(mismatch.response()["error"]["code"], -32020);
    assert_eq!(mismatch.response()["id"], 9);
    let wrong_name = agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "add")
        .body(json!({"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"echo","arguments":{"message":"x"}}}).to_string());
    let wrong_name = common::read_answer(wrong_name.send().await.expect("wrong name")).await;
    assert_eq!(
        (
            wrong_name.status,
            wrong_name.response()["error"]["code"].clone()
        ),
        (400, json!(-32020))
    );
    let no_method = agent
        .send(&json!({"jsonrpc":"2.0","id":10,"method":"tools/list"}))
        .await;
    let no_method = common::read_answer(no_method).await;
    assert_eq!(no_method.response()["error"]["code"], -32020);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_credentials_are_required() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    agent.key = None;
    let missing = agent.initialize().await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    agent.key = Some("mcpt_key_not-a-real-key".into());
    assert_eq!(agent.initialize().await.status, 401);
    agent.key = Some(harness.acme.tunnel_token.clone());
    assert_eq!(
        agent.initialize().await.status,
        401,
        "a tunnel token is not an agent key"
    );
    assert_eq!(
        tunnel_row(&harness).streams_opened,
        0,
        "nothing reached the tunnel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_offline_and_foreign_sources_and_sessions_all_read_404() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let typo = Agent::new(&harness.url("demoo"), &harness.acme.api_key)
        .clone()
        .initialize()
        .await;
    assert_eq!(typo.status, 404);
    let foreign = Agent::new(&harness.url("demo"), &harness.other.api_key)
        .clone()
        .initialize()
        .await;
    assert_eq!(foreign.status, 404);
    assert_eq!(
        typo.messages, foreign.messages,
        "another tenant's source is indistinguishable from a typo"
    );

    let mut owner = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(owner.initialize().await.status, 200);
    let mut thief = Agent::new(&harness.url("demo"), &harness.other.api_key);
    thief.session = owner.session.clone();
    assert_eq!(
        thief
            .call_tool(1, "echo", json!({"message": "x"}))
            .await
            .status,
        404,
        "a session id is bound to its caller"
    );
    let mut guesser = owner.clone();
    guesser.session = Some("00".repeat(24));
    assert_eq!(
        guesser
            .call_tool(1, "echo", json!({"message": "x"}))
            .await
            .status,
        404
    );
    assert_eq!(guesser.delete().await, 404);
    assert_eq!(owner.echo(2, "still mine").await, "still mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_with_parse_error() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    let answer = agent
        .post_raw("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ")
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.response()["error"]["code"], -32700);
    let invalid = agent.post_raw("{\"id\": 1}").await;
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.response()["error"]["code"], -32600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_and_oversized_result_fails_cleanly() {
    const LIMIT: usize = 64 * 1024;
    // Agents may send LIMIT bytes; an upstream's answer may be four times that.
    const ANSWER_LIMIT: usize = 4 * LIMIT;
    let options = Options::with_limits(LimitsSection {
        max_message_bytes: LIMIT,
        max_answer_bytes: ANSWER_LIMIT,
        ..LimitsSection::default()
    });
    let (harness, _client, _upstreams) = harness_with_demo(options).await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);

    let big = "x".repeat(LIMIT + 1);
    let answer = agent.call_tool(1, "echo", json!({"message": big})).await;
    assert_eq!(answer.status, 413);
    let message = answer.response()["error"]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains(&LIMIT.to_string()),
        "the limit is stated: {message}"
    );

    // A result over the request limit (and the frame) but within the answer limit arrives.
    let answer = agent.call_tool(2, "blob", json!({"size": LIMIT * 2})).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        tool_text(answer.response()).len(),
        LIMIT * 2,
        "the result arrives whole"
    );

    // A result over the answer limit fails that call only: an error naming the limit, or,
    // once the answer has begun to stream, an aborted body (never a truncated message).
    let response = agent.send(&json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"blob","arguments":{"size":ANSWER_LIMIT * 2}}})).await;
    assert_eq!(response.status(), 200);
    match response.bytes().await {
        Err(aborted) => assert!(aborted.is_body() || aborted.is_decode(), "{aborted}"),
        Ok(body) => {
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.contains(&ANSWER_LIMIT.to_string()) && text.contains("\"id\":4"),
                "an error naming the limit: {}",
                &text[..text.len().min(500)]
            );
        }
    }
    // ... and the session carries on.
    assert_eq!(agent.echo(3, "after").await, "after");
}

fn sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_result_arrives_intact_in_every_transport() {
    const SIZE: u64 = 10 * 1024 * 1024;
    let expected = sha256(&mcp_tunnel::demo::tools::blob_text(SIZE));
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;

    // Session era.
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    agent.initialize().await;
    let answer = agent.call_tool(1, "blob", json!({"size": SIZE})).await;
    assert_eq!(
        sha256(tool_text(answer.response())),
        expected,
        "session era"
    );

    // 2026-07-28.
    let mut stateless = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    stateless.version = Some("2026-07-28".into());
    let answer = common::read_answer(
        stateless_call(&stateless, 2, "blob", json!({"size": SIZE}))
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!(sha256(tool_text(answer.response())), expected, "2026-07-28");

    // HTTP+SSE.
    let mut sse = SseSession::open(&harness).await;
    sse.post(json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"0"}}})).await;
    sse.next().await;
    sse.post(json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
        .await;
    sse.post(json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"blob","arguments":{"size":SIZE}}})).await;
    let result = sse.next().await;
    assert_eq!(sha256(tool_text(&result)), expected, "HTTP+SSE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_json_rpc_error_naming_the_source() {
    let harness = Harness::start(Options::default()).await;
    // Bind then drop: nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (_client, mut agent) = harness
        .acme_serving("db", &format!("http://127.0.0.1:{port}/mcp"))
        .await;
    let answer = tokio::time::timeout(WAIT, agent.initialize())
        .await
        .expect("no hang");
    assert_eq!(answer.status, 200);
    let error = &answer.response()["error"];
    assert_eq!(error["code"], -32000);
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("source db is unreachable"),
        "{error}"
    );
    assert!(
        answer.headers.get("mcp-session-id").is_none(),
        "a failed initialize creates no session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tunnel_keeps_its_sessions_and_connect_reconnects() {
    let upstreams = CancellationToken::new();
    let url = common::demo_upstream(&upstreams).await;
    let harness = Harness::start(Options::default()).await;
    let (client, mut agent) = harness.acme_serving("demo", &url).await;
    agent.initialize().await;
    client.stop().await.expect("connect stops cleanly");
    // Wait on readiness: the relay notices the closed connection and drops the route.
    tokio::time::timeout(WAIT, async {
        while harness.state.registry.route("acme", "demo").is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("route removed");
    let answer = tokio::time::timeout(WAIT, agent.call_tool(1, "echo", json!({"message": "x"})))
        .await
        .expect("no hang");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.error_message().contains("not connected"),
        "the session outlives its tunnel, and its calls meanwhile say why they fail: {answer:?}"
    );
    let offline = Agent::new(&harness.url("demo"), &harness.acme.api_key)
        .initialize()
        .await;
    assert_eq!(
        offline.status, 404,
        "an offline source reads like any unknown one"
    );

    let _again = harness
        .connect(&harness.acme.clone(), &[("demo", &url)])
        .await;
    assert_eq!(
        agent.echo(2, "continued").await,
        "continued",
        "the same session, resumed"
    );
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    agent.initialize().await;
    assert_eq!(agent.echo(1, "back").await, "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tunnel_token_is_refused_with_a_reason() {
    let harness = Harness::start(Options::default()).await;
    let mut settings =
        harness.client_settings(&harness.acme, &[("demo", "http://127.0.0.1:9/mcp")]);
    settings.token = "mcpt_tok_wrong".into();
    let result = tokio::time::timeout(
        WAIT,
        mcp_tunnel::client::run(settings, CancellationToken::new()),
    )
    .await
    .expect("refusal is final, not retried forever");
    let error = result.expect_err("refused").to_string();
    assert!(error.contains("unknown tunnel token"), "{error}");
    assert!(harness.state.registry.rows().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_binary_prints_the_refusal_and_exits() {
    let harness = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &harness.ca_pem).expect("write CA");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
        .args([
            "connect",
            "--relay",
            &harness.tunnel.to_string(),
            "--transport",
            "quic",
            "--source",
            "demo=http://127.0.0.1:9/mcp",
        ])
        .arg("--ca")
        .arg(&ca)
        .env("MCP_TUNNEL_TOKEN", "mcpt_tok_wrong")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output)
        .await
        .expect("connect exits")
        .expect("connect runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the relay refused this tunnel: unknown tunnel token"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("mcpt_tok_wrong"),
        "the token is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_tunnels() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let rows: Value = reqwest::get(format!("http://{}/api/tunnels", harness.admin))
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    let row = &rows[0];
    assert_eq!(row["tenant"], "acme");
    assert_eq!(row["source"], "demo");
    assert_eq!(row["transport"], "quic");
    assert!(
        row["connected_since"]
            .as_str()
            .expect("time")
            .ends_with('Z')
    );
    let health = reqwest::get(format!("http://{}/healthz", harness.admin))
        .await
        .expect("GET");
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reconnects_by_itself_when_the_relay_drops_it() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let first = harness.drop_acme_tunnel("demo", "test drops the connection");
    // connect notices, backs off (the first retry is immediate) and registers again.
    tokio::time::timeout(WAIT, async {
        loop {
            match harness.state.registry.route("acme", "demo") {
                Some(tunnel) if tunnel.id != first => break,
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("connect reconnected");
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    agent.initialize().await;
    assert_eq!(agent.echo(1, "again").await, "again");
    assert_eq!(
        harness.state.registry.rows().len(),
        1,
        "the old tunnel is gone from the registry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sse_transport_carries_a_session() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let mut sse = SseSession::open(&harness).await;
    assert!(
        sse.path.starts_with("/sse/demo/messages?sessionId="),
        "{}",
        sse.path
    );

    let accepted = sse.post(json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"0"}}})).await;
    assert_eq!(accepted.status(), 202, "answers ride the event stream");
    let init = sse.next().await;
    assert_eq!(init["id"], 1);
    assert!(init["result"]["serverInfo"].is_object(), "{init}");
    let initialized = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
    assert_eq!(sse.post(initialized.clone()).await.status(), 202);
    assert_eq!(sse.post(json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"message":"over sse"}}})).await.status(), 202);
    let call = sse.next().await;
    assert_eq!(call["id"], 2);
    assert_eq!(tool_text(&call), "over sse");

    // Another tenant cannot post into the session; closing the stream ends the session.
    let foreign = sse
        .http
        .post(&sse.url)
        .bearer_auth(&harness.other.api_key)
        .body("{}")
        .send()
        .await
        .expect("POST");
    assert_eq!(foreign.status(), 404);
    sse.close();
    tokio::time::timeout(WAIT, async {
        while !harness.state.sessions.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the session ends with its stream");
    assert_eq!(sse.post(initialized).await.status(), 404);
}

/// An HTTP+SSE session of tenant acme on `demo`: its event stream and where its messages go.
struct SseSession {
    http: reqwest::Client,
    /// The event stream, until [`SseSession::close`].
    stream: Option<reqwest::Response>,
    buffer: String,
    /// The endpoint path the stream's first event named.
    path: String,
    /// The endpoint's URL.
    url: String,
    key: String,
}

impl SseSession {
    /// Opens the stream (200) and reads the endpoint from its first event.
    async fn open(harness: &Harness) -> Self {
        let key = harness.acme.api_key.clone();
        let mut stream = harness.sse("demo", &key).await;
        assert_eq!(stream.status(), 200);
        let mut buffer = String::new();
        let path = read_events(&mut stream, &mut buffer, |e| !e.is_empty())
            .await
            .remove(0);
        Self {
            http: reqwest::Client::new(),
            stream: Some(stream),
            buffer,
            url: format!("http://{}{path}", harness.agents),
            path,
            key,
        }
    }

    /// Closes the event stream (which ends the session).
    fn close(&mut self) {
        self.stream = None;
    }

    /// POSTs `body` to the session's endpoint.
    async fn post(&self, body: Value) -> reqwest::Response {
        self.http
            .post(&self.url)
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST")
    }

    /// The first message of the next events on the stream.
    async fn next(&mut self) -> Value {
        let stream = self.stream.as_mut().expect("the stream is open");
        let events = read_events(stream, &mut self.buffer, |e| !e.is_empty()).await;
        serde_json::from_str(&events[0]).expect("JSON")
    }
}

/// The status of POSTing `body` in `agent`'s session with one more header.
async fn post_with(agent: &Agent, (name, value): (&str, impl AsRef<str>), body: &str) -> u16 {
    agent
        .request(reqwest::Method::POST)
        .header(name, value.as_ref())
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("POST")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_host_and_origin_are_refused() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}).to_string();
    let rebound = post_with(
        &agent,
        ("host", format!("evil.example:{}", harness.agents.port())),
        &init,
    )
    .await;
    assert_eq!(
        rebound, 403,
        "a loopback relay answers only to loopback names"
    );
    let cross_site = post_with(&agent, ("origin", "http://evil.example"), &init).await;
    assert_eq!(cross_site, 403);
    let same_origin = post_with(
        &agent,
        ("origin", format!("http://{}", harness.agents)),
        &init,
    )
    .await;
    assert_eq!(same_origin, 200);
    assert_eq!(
        harness.state.registry.rows()[0].streams_opened,
        1,
        "refused requests never reached the tunnel"
    );
}
