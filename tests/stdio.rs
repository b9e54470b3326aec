//! stdio sources in `connect`: real MCP servers as child processes behind the tunnel, in both
//! protocol eras, and process hygiene counted in the operating system's own process table.
//!
//! The tests of this file run one at a time: they count the child processes of the test
//! process, which every test here shares.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{Agent, Harness, Options, WAIT, tool_text};
use futures_util::StreamExt;
use mcp_tunnel::client::ClientSettings;
use mcp_tunnel::config::{SourceConfig, SourceTarget};
use serde_json::{Value, json};

/// Serializes the tests of this binary (see the module comment).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Python of the test peers (stdlib only is used here).
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/.venv/bin/python");

/// A minimal stdio MCP server on the Python standard library: starts in milliseconds, answers
/// `initialize`, `ping` and `tools/call` (echo; the tool `crash` exits with status 5), and
/// exits when its stdin closes.
const MINI_SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    method, id = msg.get("method"), msg.get("id")
    if method is None or id is None:
        continue
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}}, "serverInfo": {"name": "mini", "version": "1"}}
    elif method == "ping":
        result = {}
    elif method == "tools/call" and msg["params"]["name"] == "crash":
        sys.exit(5)
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": msg["params"]["arguments"]["message"]}]}
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "Method not found"}}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": id, "result": result}), flush=True)
"#;

fn everything() -> Vec<String> {
    vec![
        "node".into(),
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
        )
        .into(),
        "stdio".into(),
    ]
}

fn mini() -> Vec<String> {
    vec![PYTHON.into(), "-u".into(), "-c".into(), MINI_SERVER.into()]
}

/// Client settings for the `acme` tenant serving stdio `sources` (name, command).
fn stdio_settings(harness: &Harness, sources: &[(&str, Vec<String>)]) -> ClientSettings {
    let mut settings = harness.client_settings(&harness.acme, &[]);
    settings.sources = sources
        .iter()
        .map(|(name, command)| SourceConfig {
            name: (*name).into(),
            target: SourceTarget::Stdio(command.clone()),
            follow_cross_origin_redirects: false,
        })
        .collect();
    settings
}

/// A 2026-07-28 request: no session, routing headers repeating the body.
fn stateless_call(
    agent: &Agent,
    id: u64,
    tool: &str,
    args: Value,
    meta: Value,
) -> reqwest::RequestBuilder {
    let mut meta = meta;
    meta["io.modelcontextprotocol/protocolVersion"] = json!("2026-07-28");
    meta["io.modelcontextprotocol/clientCapabilities"] = json!({});
    agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":args,"_meta":meta}}).to_string())
}

async fn stateless(agent: &Agent, id: u64, tool: &str, args: Value, meta: Value) -> common::Answer {
    let response = stateless_call(agent, id, tool, args, meta)
        .send()
        .await
        .expect("stateless request is sent");
    common::read_answer(response).await
}

/// One process as `/proc/PID/stat` describes it.
#[derive(Debug)]
struct Proc {
    pid: u32,
    state: char,
    ppid: u32,
    pgrp: u32,
}

/// Every process in the system now.
fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        panic!("/proc is readable");
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            // The command name may hold spaces and parentheses: fields start after the last ')'.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid = fields.next()?.parse().ok()?;
            let pgrp = fields.next()?.parse().ok()?;
            Some(Proc {
                pid,
                state,
                ppid,
                pgrp,
            })
        })
        .collect()
}

/// Children of this test process (zombies included: an unreaped child is a leak too), minus
/// those in `baseline`.
fn children(baseline: &HashSet<u32>) -> Vec<u32> {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|p| p.ppid == me && !baseline.contains(&p.pid))
        .map(|p| p.pid)
        .collect()
}

/// Live members of the process groups `groups` (grandchildren included). A zombie that
/// another parent (init) has yet to reap is dead already and not counted.
fn group_members(groups: &HashSet<u32>) -> Vec<(u32, u32)> {
    processes()
        .into_iter()
        .filter(|p| groups.contains(&p.pgrp) && p.state != 'Z')
        .map(|p| (p.pid, p.pgrp))
        .collect()
}

/// Polls until `leftovers` is empty, bounded by [`WAIT`]; panics with what is left.
async fn until_none_left<T: std::fmt::Debug>(what: &str, leftovers: impl Fn() -> Vec<T>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = leftovers();
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still alive after {WAIT:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Process ids the wrapper script recorded, one per line.
fn recorded_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| line.trim().parse().expect("a pid per line"))
        .collect()
}

/// A stateless-era echo of `message`, no `_meta` beyond the version's.
async fn stateless_echo(agent: &Agent, id: u64, message: &str) -> common::Answer {
    stateless(agent, id, "echo", json!({"message": message}), json!({})).await
}

fn error_message(answer: &common::Answer) -> String {
    answer.response()["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON-RPC error: {answer:?}"))
        .to_owned()
}

/// Session era through server-everything over stdio: one child for the session, speaking
/// newline-delimited JSON; returns the agent, its session open.
async fn session_era_over_stdio(harness: &Harness) -> Agent {
    // Session era: one child for the session, speaking newline-delimited JSON.
    let mut agent = Agent::new(&harness.url("everything"), &harness.acme.api_key);
    let result = agent.initialize_result().await;
    assert!(
        result["serverInfo"]["name"]
            .as_str()
            .is_some_and(|name| name.contains("everything")),
        "{result}"
    );
    assert!(agent.session.is_some(), "a session is open");
    let tools = agent.tool_names(1).await;
    assert!(tools.iter().any(|t| t == "echo"), "{tools:?}");
    let echo = agent
        .call_tool(2, "echo", json!({"message": "hello stdio"}))
        .await;
    assert_eq!(tool_text(echo.response()), "Echo: hello stdio");
    assert_eq!(echo.response()["id"], 2);

    // A pretty-printed body (raw line breaks) still reaches the child as one line.
    let pretty = serde_json::to_string_pretty(&json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{"message":"two\nlines"}}})).expect("json");
    assert!(pretty.contains('\n'));
    let answer = agent.post_raw(pretty).await;
    assert_eq!(tool_text(answer.response()), "Echo: two\nlines");

    // Progress notifications ride on the request's own answer, before its response.
    let long = agent
        .post(&json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"trigger-long-running-operation","arguments":{"duration":0.3,"steps":3},"_meta":{"progressToken":"p-4"}}}))
        .await;
    let progress: Vec<&Value> = long
        .messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{long:?}");
    assert!(
        progress
            .iter()
            .all(|m| m["params"]["progressToken"] == "p-4")
    );
    assert_eq!(long.response()["id"], 4);
    assert!(tool_text(long.response()).contains("completed"), "{long:?}");
    agent
}

/// Stateless era through server-everything over stdio.
async fn stateless_era_over_stdio(harness: &Harness) {
    // Stateless era: server-everything does not speak 2026-07-28; connect's pooled process
    // does it in the session era. Three agents use the same id and progress token at once,
    // and each gets exactly its own answer and progress.
    let mut stateless_agent = Agent::new(&harness.url("everything"), &harness.acme.api_key);
    stateless_agent.version = Some("2026-07-28".into());
    let calls = (0..3).map(|n| {
        let agent = stateless_agent.clone();
        async move {
            if n == 0 {
                stateless(
                    &agent,
                    7,
                    "trigger-long-running-operation",
                    json!({"duration": 0.3, "steps": 3}),
                    json!({"progressToken": "same"}),
                )
                .await
            } else {
                stateless(
                    &agent,
                    7,
                    "echo",
                    json!({"message": format!("stateless {n}")}),
                    json!({"progressToken": "same"}),
                )
                .await
            }
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    for (n, answer) in answers.iter().enumerate() {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.response()["id"], 7, "{answer:?}");
        let progress: Vec<&Value> = answer
            .messages
            .iter()
            .filter(|m| m["method"] == "notifications/progress")
            .collect();
        if n == 0 {
            assert!(tool_text(answer.response()).contains("completed"));
            assert_eq!(progress.len(), 3, "{answer:?}");
            assert!(
                progress
                    .iter()
                    .all(|m| m["params"]["progressToken"] == "same")
            );
        } else {
            assert_eq!(tool_text(answer.response()), format!("Echo: stateless {n}"));
            assert!(progress.is_empty(), "{answer:?}");
        }
    }
    let again = stateless_echo(&stateless_agent, 8, "again").await;
    assert_eq!(tool_text(again.response()), "Echo: again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_stdio_in_both_eras() {
    let _serial = SERIAL.lock().await;
    let baseline: HashSet<u32> = children(&HashSet::new()).into_iter().collect();
    let harness = Harness::start(Options::default()).await;
    let client = harness
        .connect_with(
            &harness.acme.clone(),
            stdio_settings(&harness, &[("everything", everything())]),
        )
        .await;

    let agent = session_era_over_stdio(&harness).await;
    stateless_era_over_stdio(&harness).await;

    // One child for the session, one pooled child for every stateless request.
    assert_eq!(children(&baseline).len(), 2, "{:?}", children(&baseline));
    assert_eq!(agent.delete().await, 200);
    until_none_left("the session's child", || {
        let left = children(&baseline);
        if left.len() > 1 { left } else { Vec::new() }
    })
    .await;

    client.stop().await.expect("connect stops cleanly");
    assert_eq!(
        children(&baseline),
        Vec::<u32>::new(),
        "connect's run returned with a child left"
    );
    harness.stop().await;
}

/// `count` sessions on `url`, 8 at a time: initialize, a request, DELETE, each checked.
async fn short_sessions(url: &str, key: &str, count: u64) -> Vec<()> {
    futures_util::stream::iter(0..count)
        .map(|n| {
            let mut agent = Agent::new(url, key);
            async move {
                let init = agent.initialize().await;
                assert_eq!(init.status, 200, "session {n}: {init:?}");
                assert!(agent.session.is_some(), "session {n}: {init:?}");
                let ping = agent
                    .post(&json!({"jsonrpc":"2.0","id":1,"method":"ping"}))
                    .await;
                assert_eq!(
                    ping.response()["result"],
                    json!({}),
                    "session {n}: {ping:?}"
                );
                assert_eq!(agent.delete().await, 200, "session {n}");
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_child_outlives_its_session_or_connect() {
    let _serial = SERIAL.lock().await;
    let baseline: HashSet<u32> = children(&HashSet::new()).into_iter().collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let pid_file = dir.path().join("pids");
    // The wrapper records its pid (which leads the process group), leaves a grandchild that
    // would outlive it without a group kill, then becomes the server.
    let command: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        r#"echo $$ >> "$0"; sleep 600 & exec "$1" -u -c "$2""#.into(),
        pid_file.to_string_lossy().into_owned(),
        PYTHON.into(),
        MINI_SERVER.into(),
    ];
    let harness = Harness::start(Options::default()).await;
    let client = harness
        .connect_with(
            &harness.acme.clone(),
            stdio_settings(&harness, &[("mini", command)]),
        )
        .await;
    let url = harness.url("mini");
    let key = harness.acme.api_key.clone();

    // 200 sessions, 8 at a time: initialize, a request, DELETE.
    let sessions = short_sessions(&url, &key, 200).await;
    assert_eq!(sessions.len(), 200);
    let started = recorded_pids(&pid_file);
    assert_eq!(started.len(), 200, "one process per session");
    let groups: HashSet<u32> = started.into_iter().collect();
    assert_eq!(groups.len(), 200, "each session had its own process");
    until_none_left("children after 200 sessions", || children(&baseline)).await;
    until_none_left("process groups after 200 sessions", || {
        group_members(&groups)
    })
    .await;

    // connect stops while sessions are open: run() returns with every child reaped.
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut agent = Agent::new(&url, &key);
        assert_eq!(agent.initialize().await.status, 200);
        open.push(agent);
    }
    assert_eq!(
        children(&baseline).len(),
        6,
        "the scan sees each open session's child"
    );
    let groups: HashSet<u32> = recorded_pids(&pid_file).into_iter().collect();
    assert_eq!(groups.len(), 206);
    assert!(
        !group_members(&groups).is_empty(),
        "the open sessions' groups are alive"
    );
    client.stop().await.expect("connect stops cleanly");
    assert_eq!(
        children(&baseline),
        Vec::<u32>::new(),
        "connect's run returned with a child left"
    );
    until_none_left("process groups after connect stopped", || {
        group_members(&groups)
    })
    .await;
    drop(open);
    harness.stop().await;
}

/// `crashy` exits right after reading initialize, `missing` cannot start: errors naming the
/// source, and no session.
async fn failed_starts_answer_with_an_error(harness: &Harness) {
    // Exits right after reading initialize: the agent gets an error, and no session.
    let mut agent = Agent::new(&harness.url("crashy"), &harness.acme.api_key);
    let init = agent.initialize().await;
    assert_eq!(init.status, 200, "{init:?}");
    assert_eq!(init.response()["error"]["code"], -32000, "{init:?}");
    assert_eq!(init.response()["id"], 0);
    let message = error_message(&init);
    assert!(
        message.contains("source crashy exited") && message.contains("exit status: 3"),
        "{message}"
    );
    assert!(agent.session.is_none(), "no session for a dead server");

    // A command that cannot start.
    let mut agent = Agent::new(&harness.url("missing"), &harness.acme.api_key);
    let init = agent.initialize().await;
    let message = error_message(&init);
    assert!(
        message.contains("source missing could not start"),
        "{message}"
    );
}

/// A crash in the middle of a session answers the pending request and ends the session.
async fn a_crash_mid_session_ends_it(harness: &Harness) {
    let mut agent = Agent::new(&harness.url("mini"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    let echo = agent
        .call_tool(1, "echo", json!({"message": "alive"}))
        .await;
    assert_eq!(tool_text(echo.response()), "alive");
    let crash = agent.call_tool(2, "crash", json!({})).await;
    assert_eq!(crash.response()["id"], 2);
    let message = error_message(&crash);
    assert!(
        message.contains("source mini exited: exit status: 5"),
        "{message}"
    );
    let after = agent.call_tool(3, "echo", json!({"message": "late"})).await;
    assert!(
        after.status == 404 || error_message(&after).contains("exited"),
        "the session is over: {after:?}"
    );
}

/// Stateless: a pooled process that dies answers with the same error, and the next request
/// starts a fresh one.
async fn a_crashed_pooled_process_is_replaced(harness: &Harness) {
    let mut stateless_agent = Agent::new(&harness.url("mini"), &harness.acme.api_key);
    stateless_agent.version = Some("2026-07-28".into());
    let first = stateless_echo(&stateless_agent, 1, "pooled").await;
    assert_eq!(tool_text(first.response()), "pooled");
    let crash = stateless(&stateless_agent, 2, "crash", json!({}), json!({})).await;
    assert_eq!(crash.response()["id"], 2);
    assert!(
        error_message(&crash).contains("source mini exited: exit status: 5"),
        "{crash:?}"
    );
    let restarted = stateless_echo(&stateless_agent, 3, "again").await;
    assert_eq!(tool_text(restarted.response()), "again");
    let mut crashy_stateless = Agent::new(&harness.url("crashy"), &harness.acme.api_key);
    crashy_stateless.version = Some("2026-07-28".into());
    let failed = stateless_echo(&crashy_stateless, 4, "x").await;
    assert!(
        error_message(&failed).contains("source crashy exited: exit status: 3"),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_or_a_failed_start_answers_with_an_error_naming_the_source() {
    let _serial = SERIAL.lock().await;
    let baseline: HashSet<u32> = children(&HashSet::new()).into_iter().collect();
    let crashy = vec![
        PYTHON.into(),
        "-c".into(),
        "import sys; sys.stdin.readline(); sys.exit(3)".into(),
    ];
    let harness = Harness::start(Options::default()).await;
    let client = harness
        .connect_with(
            &harness.acme.clone(),
            stdio_settings(
                &harness,
                &[
                    ("crashy", crashy),
                    ("missing", vec!["/nonexistent/mcp-server".into()]),
                    ("mini", mini()),
                ],
            ),
        )
        .await;

    failed_starts_answer_with_an_error(&harness).await;
    a_crash_mid_session_ends_it(&harness).await;
    a_crashed_pooled_process_is_replaced(&harness).await;

    client.stop().await.expect("connect stops cleanly");
    assert_eq!(children(&baseline), Vec::<u32>::new());
    harness.stop().await;
}

/// A stdio MCP server that holds every `tools/call` until the agent sends
/// `notifications/release`, then answers them all; it echoes the protocol version asked for.
const HOLDING_SERVER: &str = r#"
import json, sys
held = []
for line in sys.stdin:
    msg = json.loads(line)
    method, id = msg.get("method"), msg.get("id")
    if method == "notifications/release":
        for h in held:
            print(json.dumps({"jsonrpc": "2.0", "id": h, "result": {"content": [{"type": "text", "text": "released"}]}}), flush=True)
        held = []
        continue
    if method is None or id is None:
        continue
    if method == "initialize":
        print(json.dumps({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}}, "serverInfo": {"name": "holding", "version": "1"}}}), flush=True)
    elif method == "tools/call":
        held.append(id)
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": id, "result": {}}), flush=True)
"#;

/// Reads SSE `body` until an event whose data is a JSON-RPC message with `id`; returns the
/// text read. Bounded by `WAIT`.
async fn read_until_id(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    id: u64,
) -> String {
    let mut text = String::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if common::sse_data(text.as_bytes())
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .any(|m| m["id"] == id)
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "message {id} on the stream; got:\n{text}");
    text
}

/// POSTs the `held` call; its headers and priming event come at once, though the child holds
/// the call. Returns the open body and the priming event's id.
async fn post_held_call_until_primed(
    agent: &Agent,
) -> (
    impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>,
    String,
) {
    let post = agent.send(&json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"held","arguments":{}}})).await;
    assert_eq!(post.status(), 200);
    let content_type = post
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut body = post.bytes_stream();
    let mut primed = String::new();
    let prime_id = tokio::time::timeout(WAIT, async {
        loop {
            let chunk = body.next().await?.ok()?;
            primed.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(id) = primed
                .lines()
                .find_map(|line| line.strip_prefix("id: "))
                .map(str::to_owned)
            {
                return Some(id);
            }
        }
    })
    .await
    .expect("the priming event comes before the answer")
    .expect("the priming event has an id");
    (body, prime_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_answer_stream_is_primed_at_once_and_its_answer_resumable_only() {
    let _serial = SERIAL.lock().await;
    let harness = Harness::start(Options::default()).await;
    let holding = vec![
        PYTHON.into(),
        "-u".into(),
        "-c".into(),
        HOLDING_SERVER.into(),
    ];
    let _client = harness
        .connect_with(
            &harness.acme.clone(),
            stdio_settings(&harness, &[("holding", holding)]),
        )
        .await;
    let mut agent = Agent::new(&harness.url("holding"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);

    // The child holds the call; the POST's headers and priming event come at once anyway.
    let (body, prime_id) = post_held_call_until_primed(&agent).await;
    // The agent's connection drops before the answer.
    drop(body);

    // A plain GET stream is open when the answer comes.
    let plain = agent.get(None, "GET is sent").await;
    assert_eq!(plain.status(), 200);
    let mut plain = plain.bytes_stream();
    let release = agent
        .post(&json!({"jsonrpc":"2.0","method":"notifications/release"}))
        .await;
    assert_eq!(release.status, 202);

    // Resuming from the priming event's id gets the answer.
    let resumed = agent.get(Some(&prime_id), "resuming GET is sent").await;
    assert_eq!(resumed.status(), 200);
    let mut resumed = resumed.bytes_stream();
    let text = read_until_id(&mut resumed, 5).await;
    assert!(text.contains("released"), "{text}");

    // The plain GET stream never carries it (2025-11-25: only a resuming stream may). The
    // answer has crossed the relay by now; what the plain stream holds is read without waiting
    // for more than a short pause between chunks.
    let mut seen = String::new();
    while let Ok(Some(Ok(chunk))) =
        tokio::time::timeout(Duration::from_millis(200), plain.next()).await
    {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        !common::sse_data(seen.as_bytes())
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .any(|m| m["id"] == 5),
        "the orphaned answer reached a plain GET stream:\n{seen}"
    );
}

/// A relay, and a `connect` serving the mini server as `mini` under `max_processes` and
/// `idle`.
async fn limited_mini(max_processes: usize, idle: Duration) -> (Harness, common::Client) {
    let harness = Harness::start(Options::default()).await;
    let mut settings = stdio_settings(&harness, &[("mini", mini())]);
    settings.stdio = mcp_tunnel::client::StdioLimits {
        max_processes,
        idle,
    };
    let client = harness.connect_with(&harness.acme.clone(), settings).await;
    (harness, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_never_end_cannot_lock_a_stdio_source() {
    let _serial = SERIAL.lock().await;
    let baseline: HashSet<u32> = children(&HashSet::new()).into_iter().collect();
    // A cap of 3 stands for the default 64; the idle time is out of the way.
    let (harness, _client) = limited_mini(3, Duration::from_secs(3600)).await;

    // Clients restart without a DELETE, twice as many times as the cap: every new session
    // opens, each taking the place of the least recently used idle one.
    let mut agents = Vec::new();
    for n in 0..6u64 {
        let mut agent = Agent::new(&harness.url("mini"), &harness.acme.api_key);
        let init = agent.initialize().await;
        assert_eq!(init.status, 200, "session {n}: {init:?}");
        assert!(agent.session.is_some(), "session {n} opens: {init:?}");
        let echo = agent
            .call_tool(1, "echo", json!({"message": format!("s{n}")}))
            .await;
        assert_eq!(tool_text(echo.response()), format!("s{n}"));
        assert!(
            children(&baseline).len() <= 3,
            "never more processes than the cap"
        );
        agents.push(agent);
    }

    // The three oldest lost their process: their next call says so, in a JSON-RPC error.
    for (n, agent) in agents[..3].iter().enumerate() {
        let answer = agent
            .call_tool(2, "echo", json!({"message": "again"}))
            .await;
        let message = error_message(&answer);
        assert!(
            message.contains("source mini stopped this session's process")
                && message.contains("limit of 3")
                && message.contains("start a new session"),
            "session {n}: {message}"
        );
        assert_eq!(answer.response()["id"], 2);
    }
    // The three newest go on.
    for (n, agent) in agents[3..].iter().enumerate() {
        let echo = agent
            .call_tool(2, "echo", json!({"message": format!("t{n}")}))
            .await;
        assert_eq!(tool_text(echo.response()), format!("t{n}"));
    }
    drop(agents);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sessions_process_is_stopped_and_its_next_call_says_why() {
    let _serial = SERIAL.lock().await;
    let baseline: HashSet<u32> = children(&HashSet::new()).into_iter().collect();
    let (harness, _client) = limited_mini(3, Duration::from_millis(300)).await;
    let mut agent = Agent::new(&harness.url("mini"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    let echo = agent.call_tool(1, "echo", json!({"message": "hi"})).await;
    assert_eq!(tool_text(echo.response()), "hi");

    // Nothing happens in the session: its process is stopped and reaped.
    until_none_left("the idle session's process", || children(&baseline)).await;
    let answer = agent.call_tool(2, "echo", json!({"message": "late"})).await;
    let message = error_message(&answer);
    assert!(
        message.contains("stopped this session's process") && message.contains("idle"),
        "{message}"
    );
    harness.stop().await;
}
