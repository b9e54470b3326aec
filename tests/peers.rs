//! The tunnel against real third-party MCP peers: the official Python SDK (client and
//! `MCPServer`), the reference `server-everything` and the Inspector CLI.
//!
//! The peers are pinned in `tests/peers/` and installed by `scripts/install-peers.sh`. A
//! missing peer fails the test (it is never skipped).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use common::peers::{INSTALL_HINT, peer_file, python, server_everything_script};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Bound on one run of a peer CLI (interpreter start-up included).
const RUN_WAIT: Duration = Duration::from_secs(60);

/// `node` from `PATH`, which must be there.
fn node() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("node"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!("node is not on PATH: install Node.js >= 20, then {INSTALL_HINT}")
    })
}

/// What a finished peer CLI run left behind.
struct Ran {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Asserts a zero exit status.
    fn succeeded(self) -> Self {
        assert!(
            self.status.success(),
            "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout parsed as one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.what, self.stdout, self.stderr
            )
        })
    }
}

/// Runs `command` to completion (bounded by `RUN_WAIT`; killed if it takes longer).
async fn run(what: String, command: &mut Command) -> Ran {
    let mut child = common::spawn(command);
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    let mut stderr = child.0.stderr.take().expect("stderr is piped");
    let finished = tokio::time::timeout(RUN_WAIT, async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (read_out, read_err) =
            tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        read_out.and(read_err)?;
        let status = child.0.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    })
    .await;
    match finished {
        Ok(Ok((status, out, err))) => Ran {
            what,
            status,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        },
        Ok(Err(e)) => panic!("{what}: reading its output failed: {e}"),
        Err(_) => panic!("{what} did not finish within {RUN_WAIT:?}"),
    }
}

/// The `key: value` lines (each value JSON) a finished peer script printed.
struct Facts {
    script: &'static str,
    ran: Ran,
    values: HashMap<String, Value>,
}

impl Facts {
    /// Parses every line of `ran`'s stdout that holds `: `.
    fn parse(script: &'static str, ran: Ran) -> Self {
        let values = ran
            .stdout
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(key, value)| {
                let value = serde_json::from_str(value).unwrap_or_else(|e| {
                    panic!("{script} printed {key} as non-JSON ({e}): {value}")
                });
                (key.to_owned(), value)
            })
            .collect();
        Self {
            script,
            ran,
            values,
        }
    }

    /// The value printed for `key`, which must be there.
    fn get(&self, key: &str) -> &Value {
        self.values.get(key).unwrap_or_else(|| {
            panic!(
                "{} printed no `{key}`:\nstdout:\n{}\nstderr:\n{}",
                self.script, self.ran.stdout, self.ran.stderr
            )
        })
    }

    /// The string printed for `key`.
    fn text(&self, key: &str) -> &str {
        self.get(key)
            .as_str()
            .unwrap_or_else(|| panic!("{}: `{key}` is a string: {}", self.script, self.get(key)))
    }
}

/// What `tests/peers/client.py` (the Python SDK client) reported.
struct PyClient {
    negotiated: String,
    tools: Vec<String>,
    call: String,
    is_error: bool,
}

impl PyClient {
    /// A session-era version was negotiated (`why` says how), echo is listed and echoed "hi".
    fn assert_session_era_echo(&self, why: &str) {
        assert!(
            self.negotiated.starts_with("2025-"),
            "{why}: {}",
            self.negotiated
        );
        self.assert_echo(why);
    }

    /// Echo is listed and echoed "hi" (`why` names the run).
    fn assert_echo(&self, why: &str) {
        self.assert_lists("echo", why);
        assert_eq!(self.call, "Echo: hi", "{why}");
    }

    /// `tool` is listed (`why` names the run).
    fn assert_lists(&self, tool: &str, why: &str) {
        assert!(
            self.tools.iter().any(|t| t == tool),
            "{tool} is listed ({why}): {:?}",
            self.tools
        );
    }
}

/// Runs the Python SDK client against `url` in `mode` (`legacy`, `auto` or a version) and
/// calls `echo` with `{"message": "hi"}`.
async fn python_client(url: &str, key: &str, mode: &str) -> PyClient {
    python_client_call(url, key, mode, None).await
}

/// Like [`python_client`], calling `tool` with `arguments` instead when given.
async fn python_client_call(
    url: &str,
    key: &str,
    mode: &str,
    tool: Option<(&str, &str)>,
) -> PyClient {
    let mut command = Command::new(python());
    command.arg(peer_file("client.py")).args([url, key, mode]);
    if let Some((name, arguments)) = tool {
        command.args([name, arguments]);
    }
    let ran = run(format!("client.py {url} {mode}"), &mut command)
        .await
        .succeeded();
    let facts = Facts::parse("client.py", ran);
    let fact = |key: &str| facts.get(key).clone();
    let parsed = PyClient {
        negotiated: serde_json::from_value(fact("negotiated")).expect("negotiated is a string"),
        tools: serde_json::from_value(fact("tools")).expect("tools is a list of names"),
        call: serde_json::from_value(fact("call")).expect("call is a string"),
        is_error: serde_json::from_value(fact("is_error")).expect("is_error is a bool"),
    };
    assert!(
        !parsed.is_error,
        "the tool call through {url} ({mode}) is not an error; stdout:\n{}",
        facts.ran.stdout
    );
    parsed
}

/// Runs `tests/peers/callbacks_client.py` (the Python SDK client with sampling and
/// elicitation callbacks) against server-everything at `url` in `mode` (`legacy`, `auto` or
/// `sse`), asserts everything it reports, and returns its facts.
async fn callbacks_client(url: &str, key: &str, mode: &str) -> Facts {
    callbacks_client_with(url, key, mode, &[]).await
}

/// [`callbacks_client`] with the script's optional arguments (a resource and a prompt).
async fn callbacks_client_with(url: &str, key: &str, mode: &str, reads: &[&str]) -> Facts {
    let mut command = Command::new(python());
    command
        .arg(peer_file("callbacks_client.py"))
        .args([url, key, mode])
        .args(reads);
    let ran = run(format!("callbacks_client.py {url} {mode}"), &mut command)
        .await
        .succeeded();
    let facts = Facts::parse("callbacks_client.py", ran);
    let context = format!("{url} ({mode}); stdout:\n{}", facts.ran.stdout);

    assert!(
        facts.text("negotiated").starts_with("20"),
        "a protocol version is negotiated through {context}"
    );
    let tools: Vec<String> =
        serde_json::from_value(facts.get("tools").clone()).expect("tools is a list of names");
    for tool in [
        "echo",
        "trigger-sampling-request",
        "trigger-elicitation-request",
        "trigger-long-running-operation",
    ] {
        // The first two are listed only to a client whose initialize declared the capability.
        assert!(
            tools.iter().any(|t| t == tool),
            "{tool} is listed through {context}"
        );
    }
    assert_eq!(facts.text("echo"), "Echo: hi", "echo through {context}");

    assert_sampling(&facts, &context);
    assert_elicitation(&facts, &context);
    assert_progress(&facts, &context);
    facts
}

/// The client's `callback` (`sampling`, `elicitation`) ran exactly once, and the tool that
/// asked for it did not fail.
fn assert_callback_ran_once(facts: &Facts, callback: &str, context: &str) {
    assert_eq!(
        facts.get(&format!("{callback}_calls")),
        &Value::from(1),
        "the {callback} callback ran exactly once through {context}"
    );
    assert_eq!(
        facts.get(&format!("{callback}_is_error")),
        &Value::Bool(false),
        "{context}"
    );
}

/// Sampling: the server's request reached the callback once, the answer got back to it.
fn assert_sampling(facts: &Facts, context: &str) {
    assert_callback_ran_once(facts, "sampling", context);
    assert!(
        facts
            .text("sampling_prompt")
            .contains("tunnel-sampling-prompt"),
        "the sampling request carries the tool's prompt through {context}"
    );
    let sampled = facts.text("sampling_result");
    let sampled: Value = serde_json::from_str(
        sampled
            .strip_prefix("LLM sampling result: \n")
            .unwrap_or_else(|| panic!("a sampling result through {context}")),
    )
    .unwrap_or_else(|e| panic!("the sampling result holds JSON ({e}) through {context}"));
    assert_eq!(
        sampled["content"]["text"],
        *facts.get("sampling_answer"),
        "the server got the callback's answer through {context}"
    );
    assert_eq!(sampled["model"], "tunnel-test-model", "{context}");
}

/// Elicitation: the callback's accepted content is what the server got.
fn assert_elicitation(facts: &Facts, context: &str) {
    assert_callback_ran_once(facts, "elicitation", context);
    assert_eq!(
        facts.text("elicitation_message"),
        "Please provide inputs for the following fields:",
        "{context}"
    );
    let elicited = facts.text("elicitation_result");
    assert!(
        elicited.contains("User provided the requested information!")
            && elicited.contains("- Name: Ada Through-Tunnel"),
        "the server saw an accepted elicitation through {context}"
    );
    let raw: Value = serde_json::from_str(
        elicited
            .split_once("Raw result: ")
            .unwrap_or_else(|| panic!("the raw elicitation result through {context}"))
            .1,
    )
    .unwrap_or_else(|e| panic!("the raw elicitation result is JSON ({e}) through {context}"));
    assert_eq!(raw["action"], "accept", "{context}");
    assert_eq!(
        raw["content"],
        *facts.get("elicitation_content"),
        "the server got the accepted content through {context}"
    );
}

/// Progress: every notification of the long-running call, once each, in order.
fn assert_progress(facts: &Facts, context: &str) {
    let progress: Vec<(f64, Option<f64>)> = serde_json::from_value(facts.get("progress").clone())
        .expect("progress is a list of [progress, total]");
    assert!(
        !progress.is_empty(),
        "progress notifications arrived through {context}"
    );
    assert_eq!(
        progress,
        [1.0, 2.0, 3.0, 4.0].map(|step| (step, Some(4.0))),
        "each of the 4 progress notifications arrived exactly once, in order, through {context}"
    );
    assert_eq!(facts.get("long_is_error"), &Value::Bool(false), "{context}");
    assert_eq!(
        facts.text("long_result"),
        "Long running operation completed. Duration: 2 seconds, Steps: 4.",
        "{context}"
    );
}

/// Runs the Inspector CLI with `args` against `url` and returns its `--format json` output.
async fn inspector(url: &str, key: &str, args: &[&str]) -> Value {
    let mut command = Command::new(node());
    command
        .arg(peer_file("node_modules/.bin/mcp-inspector"))
        .args(["--cli", url, "--transport", "http", "--header"])
        .arg(format!("Authorization: Bearer {key}"))
        .args(args)
        .args(["--format", "json"]);
    run(format!("mcp-inspector {}", args.join(" ")), &mut command)
        .await
        .succeeded()
        .json()
}

/// server-everything (Streamable HTTP, session era) on a free port; returns it and its URL.
async fn start_server_everything() -> (common::Peer, String) {
    common::peers::start_server_everything(node()).await
}

/// `tests/peers/py_server.py` (a Python SDK `MCPServer`) on a free port; returns it and its URL.
async fn start_python_server() -> (common::Peer, String) {
    common::peers::start_python_server("py_server.py").await
}

/// A harness whose tenant acme serves `upstream` as `source`; returns it, the `connect`, the
/// agent URL of the source and acme's API key.
async fn serving(
    source: &str,
    upstream: &str,
) -> (common::Harness, common::Client, String, String) {
    let harness = common::Harness::start(common::Options::default()).await;
    let client = harness.connect(&harness.acme, &[(source, upstream)]).await;
    let url = harness.url(source);
    let key = harness.acme.api_key.clone();
    (harness, client, url, key)
}

/// acme's registry row of `source` is over QUIC, and the traffic went through its streams;
/// then `client` (the `connect` of [`serving`]) and the relay stop, cleanly.
async fn assert_traffic_rode_quic_streams_then_stop(
    harness: common::Harness,
    client: common::Client,
    source: &str,
) {
    let rows = harness.state.registry.rows();
    let row = rows
        .iter()
        .find(|row| row.tenant == harness.acme.name && row.source == source)
        .unwrap_or_else(|| panic!("a registry row for acme/{source}: {rows:?}"));
    assert_eq!(row.transport, "quic");
    assert!(
        row.streams_opened > 0,
        "the traffic went through tunnel streams: {row:?}"
    );
    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
}

/// The Inspector CLI lists `echo` at `url` and calls it.
async fn inspector_lists_and_calls_echo(url: &str, key: &str) {
    let listed = inspector(url, key, &["--method", "tools/list"]).await;
    let names = common::tool_names(&listed);
    assert!(
        names.iter().any(|n| n == "echo"),
        "echo is listed: {names:?}"
    );

    let called = inspector(
        url,
        key,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "echo",
            "--tool-arg",
            "message=hi",
        ],
    )
    .await;
    assert_eq!(
        called["result"]["content"][0]["text"], "Echo: hi",
        "the inspector's echo result: {called}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_and_inspector_through_tunnel_to_server_everything() {
    let (everything, upstream) = start_server_everything().await;
    let (harness, client, url, key) = serving("everything", &upstream).await;

    let legacy = python_client(&url, &key, "legacy").await;
    legacy.assert_session_era_echo("legacy negotiates a session-era version");

    // server-everything speaks only the session era (no server/discover). `connect` answers
    // an agent's server/discover with the session version alone (server requests in mid-call
    // do not cross the bridge yet), so auto takes the handshake...
    let auto = python_client(&url, &key, "auto").await;
    auto.assert_session_era_echo("auto takes the session era the bridge advertises");
    // ...and a client pinned to 2026-07-28 is bridged to the session era.
    let modern = python_client(&url, &key, "2026-07-28").await;
    assert_eq!(modern.negotiated, "2026-07-28", "bridged");
    modern.assert_echo("a 2026-07-28 client bridged to a session-era upstream");
    modern.assert_lists("echo", "bridged");
    // Sampling, elicitation and progress of a 2026-07-28 client bridged to the session era:
    // each server request in mid-call is an input_required round, its retry answers it.
    let bridged = callbacks_client(&url, &key, "2026-07-28").await;
    assert_eq!(
        bridged.text("negotiated"),
        "2026-07-28",
        "bridged callbacks"
    );

    // The 2024-11-05 HTTP+SSE transport at /sse/{source}, to the same Streamable HTTP upstream.
    let sse_url = format!("http://{}/sse/everything", harness.agents);
    let over_sse = python_client(&sse_url, &key, "sse").await;
    over_sse.assert_echo("over HTTP+SSE");

    inspector_lists_and_calls_echo(&url, &key).await;
    assert_traffic_rode_quic_streams_then_stop(harness, client, "everything").await;
    everything.stop().await;
}

/// A stateless `tools/call` of `tool` with `arguments` (and `extra` params, such as a retry's),
/// declaring the elicitation capability, through `agent`.
async fn stateless_call(
    agent: &common::Agent,
    id: u64,
    tool: &str,
    arguments: Value,
    extra: Value,
) -> common::Answer {
    let mut params = json!({"name": tool, "arguments": arguments, "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
    }});
    if let (Some(params), Some(extra)) = (params.as_object_mut(), extra.as_object()) {
        params.extend(extra.clone());
    }
    let response = agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":params}).to_string())
        .send()
        .await
        .expect("the call is sent");
    common::read_answer(response).await
}

/// server-everything behind a relay that keeps an audit trail, and the `connect` serving it
/// as source `everything` to tenant acme; the trail's directory (kept while it lives) and file.
async fn audited_everything() -> (
    common::Peer,
    common::Harness,
    common::Client,
    (tempfile::TempDir, PathBuf),
) {
    let (everything, upstream) = start_server_everything().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("audit.db");
    let harness = common::Harness::start(common::Options {
        audit: Some(common::audit::audit_at(&db)),
        ..common::Options::default()
    })
    .await;
    let client = harness
        .connect(&harness.acme, &[("everything", &upstream)])
        .await;
    (everything, harness, client, (dir, db))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_elicitation_round_is_bound_to_its_call_and_spent_once() {
    let (everything, harness, client, (_dir, db)) = audited_everything().await;
    let (url, key) = (harness.url("everything"), harness.acme.api_key.clone());
    let mut agent = common::Agent::new(&url, &key);
    agent.version = Some("2026-07-28".into());
    let tool = "trigger-elicitation-request";

    let asked = stateless_call(&agent, 1, tool, json!({}), json!({})).await;
    let result = &asked.response()["result"];
    assert_eq!(result["resultType"], "input_required", "{asked:?}");
    let requests = result["inputRequests"].as_object().expect("input requests");
    assert_eq!(requests.len(), 1, "{result}");
    let (input_key, request) = requests.iter().next().expect("one input request");
    assert_eq!(request["method"], "elicitation/create", "{result}");
    let state = result["requestState"]
        .as_str()
        .expect("a request state")
        .to_owned();
    let answers = json!({input_key.clone(): {"action": "accept", "content": {"name": "Ada", "check": true, "integer": 7}}});
    let retry = |state: &str| json!({"requestState": state, "inputResponses": answers.clone()});

    // Forged: one character changed.
    let mut forged = state.clone().into_bytes();
    let at = forged.len() / 2;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ASCII");
    let refused = stateless_call(&agent, 2, tool, json!({}), retry(&forged)).await;
    assert_eq!(refused.response()["error"]["code"], -32602, "{refused:?}");
    assert!(
        refused
            .error_message()
            .contains("not one this relay issued"),
        "{refused:?}"
    );

    // Another call's arguments.
    let other = stateless_call(&agent, 3, tool, json!({"other": 1}), retry(&state)).await;
    assert!(
        other.error_message().contains("other arguments"),
        "{other:?}"
    );

    // The call's own retry: the answer reaches the waiting server, the result comes back.
    let done = stateless_call(&agent, 4, tool, json!({}), retry(&state)).await;
    let response = done.response();
    assert_eq!(response["id"], 4, "under the retry's id: {done:?}");
    assert_eq!(response["result"]["resultType"], "complete", "{done:?}");
    let text: String = response["result"]["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|block| block["text"].as_str())
        .collect();
    assert!(
        text.contains("User provided the requested information!") && text.contains("Name: Ada"),
        "the server got the retry's answer: {done:?}"
    );

    // Replayed.
    let replayed = stateless_call(&agent, 5, tool, json!({}), retry(&state)).await;
    assert!(
        replayed.error_message().contains("already used"),
        "{replayed:?}"
    );

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    everything.stop().await;

    // The trail: the first round and its retry are one call (one `mcp.call.id`), the first
    // recorded as input_required; the refused retries are rows of their own, unlinked.
    let rows: Vec<Value> = common::audit::export(&db)
        .await
        .into_iter()
        .filter(|row| row["gen_ai.tool.name"] == tool)
        .collect();
    let outcomes: Vec<(&Value, &Value)> = rows
        .iter()
        .map(|row| (&row["outcome"]["kind"], &row["mcp.call.id"]))
        .collect();
    assert_eq!(outcomes.len(), 5, "{rows:#?}");
    let call = outcomes[0].1;
    assert!(
        call.is_string(),
        "the first round names its call: {rows:#?}"
    );
    assert_eq!(outcomes[0].0, "input_required", "{rows:#?}");
    assert_eq!(
        (outcomes[3].0, outcomes[3].1),
        (&json!("ok"), call),
        "{rows:#?}"
    );
    for refused in [1, 2, 4] {
        assert_eq!(outcomes[refused].0, "error", "{rows:#?}");
        assert!(outcomes[refused].1.is_null(), "{rows:#?}");
    }
}

/// A JSON-RPC request of `method` with `params`, as one session-era message.
fn rpc(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// The task ids a `tasks/list` answer names.
fn listed_tasks(answer: &common::Answer) -> Vec<String> {
    answer.response()["result"]["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|task| task["taskId"].as_str().map(str::to_owned))
        .collect()
}

/// server-everything runs `simulate-research-query` as a task (2025-11-25 tasks). Through the
/// relay its id is bound to the caller that created it: the creator polls, lists and fetches
/// it; another caller of the same tenant, with the id it was shown or the upstream's own, gets
/// "Task not found" and an audit row, and does not see it listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_reachable_only_by_the_caller_that_created_it() {
    let (everything, harness, client, (_dir, db)) = audited_everything().await;
    let url = harness.url("everything");
    let mut alice = common::Agent::new(&url, &harness.acme.api_key);
    let mut bob = common::Agent::new(&url, &harness.acme.second_key);
    alice.initialize_result().await;
    bob.initialize_result().await;

    let created = alice
        .post(&rpc(
            1,
            "tools/call",
            json!({"name": "simulate-research-query", "arguments": {"topic": "tunnels"}, "task": {"ttl": 60000}}),
        ))
        .await;
    let task_id = created.response()["result"]["task"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("a task was created: {created:?}"))
        .to_owned();
    let (tag, raw) = task_id.split_once('.').expect("a bound id: TAG.RAW");
    assert_eq!(tag.len(), 22, "a 128-bit tag, base64url: {task_id}");

    let got = alice
        .post(&rpc(2, "tasks/get", json!({"taskId": task_id})))
        .await;
    assert_eq!(
        got.response()["result"]["taskId"],
        task_id.as_str(),
        "{got:?}"
    );
    let listed = alice.post(&rpc(3, "tasks/list", json!({}))).await;
    assert_eq!(
        listed_tasks(&listed),
        std::slice::from_ref(&task_id),
        "{listed:?}"
    );

    for (id, method, tried) in [
        (10, "tasks/get", task_id.as_str()),
        (11, "tasks/get", raw),
        (12, "tasks/cancel", task_id.as_str()),
        (13, "tasks/result", task_id.as_str()),
    ] {
        let refused = bob.post(&rpc(id, method, json!({"taskId": tried}))).await;
        assert_eq!(refused.response()["error"]["code"], -32602, "{refused:?}");
        assert!(
            refused.error_message().contains("Task not found"),
            "{refused:?}"
        );
    }
    let bobs = bob.post(&rpc(14, "tasks/list", json!({}))).await;
    assert!(listed_tasks(&bobs).is_empty(), "{bobs:?}");

    // The creator's task runs on, unharmed, to its result (four stages of a second each).
    let result = alice
        .post(&rpc(4, "tasks/result", json!({"taskId": task_id})))
        .await;
    let text = result.response()["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("Research Report"), "{result:?}");
    let related = &result.response()["result"]["_meta"]["io.modelcontextprotocol/related-task"];
    if !related.is_null() {
        assert_eq!(related["taskId"], task_id.as_str(), "{result:?}");
    }

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    everything.stop().await;
    let refused: Vec<(Value, Value)> = common::audit::export(&db)
        .await
        .into_iter()
        .filter(|row| row["decision"] == "deny")
        .map(|row| (row["mcp.method.name"].clone(), row["subject"].clone()))
        .collect();
    assert_eq!(
        refused,
        [
            (json!("tasks/get"), json!("second@acme")),
            (json!("tasks/get"), json!("second@acme")),
            (json!("tasks/cancel"), json!("second@acme")),
            (json!("tasks/result"), json!("second@acme")),
        ],
        "each refusal is an audit row"
    );
}

/// One upstream of the era matrix: what it speaks, and the resource and prompt every client
/// reads of it.
struct MatrixUpstream {
    name: &'static str,
    /// The client mode of its own era, for the direct baseline (`legacy` where the session era
    /// is spoken, and the Inspector CLI can connect directly too).
    own_era: &'static str,
    resource: &'static str,
    prompt: (&'static str, &'static str, &'static str),
}

/// A fact as it compares across the bridge: text that ends in a JSON object (a result that
/// quotes what the server got) is its prefix and the parsed object, whose keys the bridge may
/// have written in another order.
fn same_json(fact: &Value) -> Value {
    let Some(text) = fact.as_str() else {
        return fact.clone();
    };
    match text.find('{').map(|at| text.split_at(at)) {
        Some((prefix, object)) => match serde_json::from_str::<Value>(object) {
            Ok(object) => json!([prefix, object]),
            Err(_) => fact.clone(),
        },
        None => fact.clone(),
    }
}

/// Runs `tests/peers/callbacks_client.py` in `mode` against `url`, reading the upstream's
/// resource and prompt too (see [`callbacks_client`], whose assertions it makes).
async fn matrix_client(url: &str, key: &str, mode: &str, upstream: &MatrixUpstream) -> Facts {
    let (prompt, arguments, _) = upstream.prompt;
    callbacks_client_with(url, key, mode, &[upstream.resource, prompt, arguments]).await
}

/// One row of the era matrix: the Python SDK client in the session era and in 2026-07-28,
/// and the Inspector CLI, each through relay and `connect` to `upstream` (at `direct`), each
/// with the same tool list, tool call, resource, prompt, progress and (for the SDK clients)
/// sampling and elicitation results as a client of the upstream's own era connected directly.
async fn era_matrix_row(upstream: MatrixUpstream, server: common::Peer, direct: String) {
    let baseline = matrix_client(&direct, "unused-key", upstream.own_era, &upstream).await;
    let (harness, client, url, key) = serving(upstream.name, &direct).await;
    for mode in ["legacy", "2026-07-28"] {
        let through = matrix_client(&url, &key, mode, &upstream).await;
        let cell = format!("{mode} client, {} upstream", upstream.name);
        let era = through.text("negotiated");
        assert_eq!(mode == "legacy", era.starts_with("2025-"), "{cell}: {era}");
        for fact in [
            "tools",
            "resource",
            "prompt",
            "sampling_result",
            "elicitation_result",
            "progress",
            "long_result",
        ] {
            assert_eq!(
                same_json(through.get(fact)),
                same_json(baseline.get(fact)),
                "{cell}: {fact} as a direct client of the upstream's own era sees it"
            );
        }
    }

    // The Inspector CLI (session era; it cannot answer sampling or elicitation). Its tool
    // list is compared with its own direct one where it can connect directly (an upstream may
    // offer tools by the client's capabilities, and the Inspector's are not the SDK's).
    let listed = common::tool_names(&inspector(&url, &key, &["--method", "tools/list"]).await);
    let expected = if upstream.own_era == "legacy" {
        common::tool_names(&inspector(&direct, "unused-key", &["--method", "tools/list"]).await)
    } else {
        serde_json::from_value(baseline.get("tools").clone()).expect("tools is a list of names")
    };
    let sorted = |mut names: Vec<String>| {
        names.sort();
        names
    };
    assert_eq!(
        sorted(listed),
        sorted(expected),
        "Inspector tools/list, {} upstream",
        upstream.name
    );
    inspector_lists_and_calls_echo(&url, &key).await;
    let read = inspector(
        &url,
        &key,
        &["--method", "resources/read", "--uri", upstream.resource],
    )
    .await;
    let read = read.get("result").unwrap_or(&read);
    assert_eq!(
        read["contents"][0]["text"],
        *baseline.get("resource"),
        "Inspector resources/read, {} upstream: {read}",
        upstream.name
    );
    let (prompt, _, pair) = upstream.prompt;
    let got = inspector(
        &url,
        &key,
        &[
            "--method",
            "prompts/get",
            "--prompt-name",
            prompt,
            "--prompt-args",
            pair,
        ],
    )
    .await;
    let got = got.get("result").unwrap_or(&got);
    assert_eq!(
        got["messages"][0]["content"]["text"],
        *baseline.get("prompt"),
        "Inspector prompts/get, {} upstream: {got}",
        upstream.name
    );
    let progress = inspector(
        &url,
        &key,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "trigger-long-running-operation",
            "--tool-arg",
            "duration=1",
            "steps=2",
        ],
    )
    .await;
    let progress = progress.get("result").unwrap_or(&progress);
    assert!(
        progress["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("Long running operation completed")),
        "Inspector progress call, {} upstream: {progress}",
        upstream.name
    );

    assert_traffic_rode_quic_streams_then_stop(harness, client, upstream.name).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn era_matrix_to_an_upstream_of_the_session_era_only() {
    let (server, direct) = start_server_everything().await;
    let upstream = MatrixUpstream {
        name: "everything",
        own_era: "legacy",
        resource: "demo://resource/static/document/features.md",
        prompt: ("args-prompt", r#"{"city": "Paris"}"#, "city=Paris"),
    };
    era_matrix_row(upstream, server, direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn era_matrix_to_an_upstream_of_2026_07_28_only() {
    let (server, direct) =
        common::peers::start_python_server_with("py_server.py", &["--modern-only"]).await;
    // Connected directly, a session-era client is refused: the wrapper does what it says.
    let mut command = Command::new(python());
    command
        .arg(peer_file("client.py"))
        .args([direct.as_str(), "unused-key", "legacy"]);
    let refused = run(format!("client.py {direct} legacy"), &mut command).await;
    assert!(!refused.status.success(), "initialize is refused directly");
    let upstream = MatrixUpstream {
        name: "modern",
        own_era: "2026-07-28",
        resource: "text://hello",
        prompt: ("greet", r#"{"name": "Ada"}"#, "name=Ada"),
    };
    era_matrix_row(upstream, server, direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn era_matrix_to_an_upstream_of_both_eras() {
    let (server, direct) = start_python_server().await;
    let upstream = MatrixUpstream {
        name: "both",
        own_era: "2026-07-28",
        resource: "text://hello",
        prompt: ("greet", r#"{"name": "Ada"}"#, "name=Ada"),
    };
    era_matrix_row(upstream, server, direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_keeps_at_most_8_bridged_calls_waiting_for_input() {
    let (everything, upstream) = start_server_everything().await;
    let (harness, client, url, key) = serving("everything", &upstream).await;
    let mut agent = common::Agent::new(&url, &key);
    agent.version = Some("2026-07-28".into());
    let tool = "trigger-elicitation-request";
    let mut states = Vec::new();
    for id in 0..8 {
        let asked = stateless_call(&agent, id, tool, json!({}), json!({})).await;
        let result = &asked.response()["result"];
        assert_eq!(
            result["resultType"], "input_required",
            "call {id}: {asked:?}"
        );
        let key = result["inputRequests"]
            .as_object()
            .and_then(|r| r.keys().next().cloned())
            .expect("one input request");
        let state = result["requestState"].as_str().expect("a state").to_owned();
        states.push((key, state));
    }
    // The ninth cannot wait: the server's request is refused, and the call ends at once
    // (server-everything reports the refused elicitation as an error).
    let ninth = stateless_call(&agent, 8, tool, json!({}), json!({})).await;
    let response = ninth.response();
    assert_ne!(
        response["result"]["resultType"], "input_required",
        "a ninth waiting call is refused: {ninth:?}"
    );
    // The waiting ones still go on.
    let (input_key, state) = &states[0];
    let answers = json!({input_key.clone(): {"action": "decline"}});
    let done = stateless_call(
        &agent,
        9,
        tool,
        json!({}),
        json!({"requestState": state, "inputResponses": answers}),
    )
    .await;
    assert_eq!(done.response()["id"], 9, "{done:?}");
    assert_eq!(
        done.response()["result"]["resultType"],
        "complete",
        "{done:?}"
    );
    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    everything.stop().await;
}

/// The text of a tool result, or the error's message.
fn call_text(answer: &common::Answer) -> String {
    let response = answer.response();
    match response["result"]["content"][0]["text"].as_str() {
        Some(text) => text.to_owned(),
        None => format!("error: {}", answer.error_message()),
    }
}

/// `routed-echo` marks its `region` with `x-mcp-header`: the Python SDK's 2026-07-28 server
/// refuses a call whose `Mcp-Param-Region` header is missing or disagrees. A session-era agent
/// sends no such header, so `connect` adds it from the upstream's tool list; a 2026-07-28
/// agent's own goes through untouched (one without it is refused, as directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_param_headers_reach_a_2026_07_28_only_upstream_from_either_era() {
    let (modern, upstream) =
        common::peers::start_python_server_with("py_server.py", &["--modern-only"]).await;
    let harness = common::Harness::start(common::Options::default()).await;
    let client = harness
        .connect(&harness.acme, &[("modern", &upstream)])
        .await;
    let (url, key) = (harness.url("modern"), harness.acme.api_key.clone());

    let mut session = common::Agent::new(&url, &key);
    session.initialize_result().await;
    for (id, region) in [(1, "eu-west"), (2, "Zürich")] {
        let answer = session
            .call_tool(
                id,
                "routed-echo",
                json!({"region": region, "message": "hi"}),
            )
            .await;
        assert_eq!(call_text(&answer), format!("{region}: hi"), "{answer:?}");
    }

    let stateless = |region: Option<&str>| {
        let mut request = common::Agent::new(&url, &key)
            .request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "routed-echo");
        if let Some(region) = region {
            request = request.header("mcp-param-region", region);
        }
        let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "routed-echo", "arguments": {"region": "ap-south", "message": "hi"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}},
        }});
        async move {
            common::read_answer(request.body(body.to_string()).send().await.expect("sent")).await
        }
    };
    let own = stateless(Some("ap-south")).await;
    assert_eq!(call_text(&own), "ap-south: hi", "{own:?}");
    let missing = stateless(None).await;
    assert!(
        call_text(&missing).contains("Mcp-Param-Region"),
        "the upstream checks the header: {missing:?}"
    );

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    modern.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_agents_cancellation_stops_its_call_on_a_2026_07_28_only_upstream() {
    let (server, upstream) =
        common::peers::start_python_server_with("py_server.py", &["--modern-only"]).await;
    let (harness, client, url, key) = serving("modern", &upstream).await;
    let mut agent = common::Agent::new(&url, &key);
    assert_eq!(agent.initialize().await.status, 200, "bridged session");
    let slow = |id: u64, message: &str| {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"slow-echo",
            "arguments":{"message":message,"seconds":2},"_meta":{"progressToken":id}}})
    };
    // The call is running upstream once its first progress notification arrives.
    let mut running = agent.send(&slow(1, "cancelled")).await;
    let mut seen = String::new();
    while !seen.contains("notifications/progress") {
        let chunk = tokio::time::timeout(common::WAIT, running.chunk())
            .await
            .expect("progress within the wait")
            .expect("the answer stream reads")
            .expect("progress before the stream ends");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let cancel = agent
        .send(&json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}))
        .await;
    assert_eq!(cancel.status(), 202);
    // A call started after it, as long, ends after it would have.
    let control = agent
        .call_tool(2, "slow-echo", json!({"message":"finished","seconds":2}))
        .await;
    assert_eq!(common::tool_text(control.response()), "Echo: finished");
    let finished = agent.call_tool(3, "finished-calls", json!({})).await;
    assert_eq!(
        finished.response()["result"]["structuredContent"]["result"],
        json!(["finished"]),
        "the cancelled call was stopped upstream: {finished:?}"
    );
    drop(running);
    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_retry_on_another_relay_of_the_fleet_goes_on_with_its_call() {
    let (everything, upstream) = start_server_everything().await;
    let fleet = common::Fleet::new();
    let a = common::Harness::start(fleet.options()).await;
    let b = common::Harness::start(common::Options {
        creds: Some((a.acme.clone(), a.other.clone())),
        ..fleet.options()
    })
    .await;
    // One `connect`, attached to both relays.
    let mut settings = common::quic_settings(
        format!("{},{}", a.tunnel, b.tunnel),
        &a.acme.tunnel_token,
        &a.ca_pem,
        &[],
    );
    settings.sources = vec![
        mcp_tunnel::config::SourceConfig::parse_flag(&format!("everything={upstream}"))
            .expect("a valid source"),
    ];
    settings.connections = 2;
    let client = b.connect_with(&b.acme, settings).await;
    for relay in [&a, &b] {
        tokio::time::timeout(
            common::WAIT,
            relay.state.registry.wait_for("acme", "everything"),
        )
        .await
        .expect("every relay of the fleet gets a tunnel");
    }
    let agent = |relay: &common::Harness| {
        let mut agent = common::Agent::new(&relay.url("everything"), &relay.acme.api_key);
        agent.version = Some("2026-07-28".into());
        agent
    };
    let tool = "trigger-elicitation-request";
    let asked = stateless_call(&agent(&a), 1, tool, json!({}), json!({})).await;
    let result = &asked.response()["result"];
    assert_eq!(result["resultType"], "input_required", "{asked:?}");
    let input_key = result["inputRequests"]
        .as_object()
        .and_then(|r| r.keys().next().cloned())
        .expect("one input request");
    let state = result["requestState"].as_str().expect("a state").to_owned();
    let retry = json!({"requestState": state,
        "inputResponses": {input_key: {"action": "accept", "content": {"name": "Ada"}}}});

    // The retry reaches the other relay: the state routes it to the `connect` that keeps the
    // call, which goes on.
    let done = stateless_call(&agent(&b), 2, tool, json!({}), retry.clone()).await;
    assert_eq!(
        done.response()["result"]["resultType"],
        "complete",
        "{done:?}"
    );
    // Replayed on the first relay (which never saw it spent): the call is gone from its
    // `connect`, so the replay is refused all the same.
    let replayed = stateless_call(&agent(&a), 3, tool, json!({}), retry).await;
    assert!(
        replayed.error_message().contains("names no call waiting"),
        "{replayed:?}"
    );
    drop(client);
    a.stop().await;
    b.stop().await;
    everything.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_stateless_era_through_tunnel_to_mcpserver() {
    let (server, upstream) = start_python_server().await;
    let (harness, client, url, key) = serving("pysrv", &upstream).await;

    // The stateless era: server/discover, then plain POSTs with no session.
    let modern = python_client(&url, &key, "auto").await;
    assert_eq!(
        modern.negotiated, "2026-07-28",
        "auto negotiates the stateless era"
    );
    modern.assert_echo("stateless era");
    modern.assert_lists("add", "stateless era");

    let sum = python_client_call(&url, &key, "auto", Some(("add", r#"{"a": 2, "b": 40}"#))).await;
    assert_eq!(sum.negotiated, "2026-07-28");
    assert_eq!(sum.call, "42");

    // The session era against the same server: initialize, session id, GET stream, DELETE.
    let legacy = python_client(&url, &key, "legacy").await;
    assert_eq!(
        legacy.negotiated, "2025-11-25",
        "legacy negotiates the session era"
    );
    legacy.assert_echo("session era");

    assert_traffic_rode_quic_streams_then_stop(harness, client, "pysrv").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_command_answers_the_python_sdk() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"));
    command
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "mcp_tunnel=debug,warn");
    let mut demo = common::Peer::start("mcp-tunnel demo", &mut command);
    let url = demo.line_after("agent URL: ").await;
    let key = demo.line_after("API key: ").await;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp/demo"),
        "the demo's agent URL: {url}"
    );

    for mode in ["auto", "legacy"] {
        let answer = python_client(&url, &key, mode).await;
        answer.assert_lists("echo", mode);
        assert_eq!(answer.call, "hi", "the demo echoes unchanged ({mode})");
    }

    // Ctrl-C, as a user stops it: the demo removes its temporary folder (a kill would not).
    demo.signal(libc::SIGINT);
    let status = demo
        .exit_status(tokio::time::Instant::now() + common::WAIT)
        .await;
    assert!(
        status.success(),
        "the demo exits cleanly on Ctrl-C: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_callbacks_and_progress_through_tunnel_to_stdio_server_everything() {
    let harness = common::Harness::start(common::Options::default()).await;
    let source = format!(
        "stdio:{} {} stdio",
        node().display(),
        server_everything_script().display()
    );
    let client = harness
        .connect(&harness.acme, &[("everything", source.as_str())])
        .await;
    let key = harness.acme.api_key.clone();

    // The session era over Streamable HTTP: server-to-client requests and progress ride the
    // SSE stream of the tools/call, the answers come back as POSTs.
    let legacy = callbacks_client(&harness.url("everything"), &key, "legacy").await;
    assert!(
        legacy.text("negotiated").starts_with("2025-"),
        "legacy negotiates a session-era version: {}",
        legacy.text("negotiated")
    );

    // auto probes server/discover first (`connect` answers it for the bridged pooled process
    // with the session version alone), then takes the handshake and a session of its own.
    let auto = callbacks_client(&harness.url("everything"), &key, "auto").await;
    assert!(
        auto.text("negotiated").starts_with("2025-"),
        "auto falls back to a session-era version: {}",
        auto.text("negotiated")
    );

    // A 2026-07-28 client: its requests go to a process of its own, initialized with its
    // capabilities, where each server request in mid-call becomes an input_required round.
    let modern = callbacks_client(&harness.url("everything"), &key, "2026-07-28").await;
    assert_eq!(
        modern.text("negotiated"),
        "2026-07-28",
        "bridged callbacks over stdio"
    );

    // The 2024-11-05 HTTP+SSE transport at /sse/{source}, to the same stdio upstream: echo,
    // and the same callbacks and progress on the one GET stream.
    let sse_url = format!("http://{}/sse/everything", harness.agents);
    callbacks_client(&sse_url, &key, "sse").await;

    let rows = harness.state.registry.rows();
    let row = rows
        .iter()
        .find(|row| row.tenant == harness.acme.name && row.source == "everything")
        .unwrap_or_else(|| panic!("a registry row for acme/everything: {rows:?}"));
    assert!(
        row.streams_opened >= 3,
        "each session rode its own tunnel stream: {row:?}"
    );

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
}

/// A relay config on loopback ports for tenant `acme`: its tunnel token, and one agent key
/// (subject `ana`) with the role `analyst`, which allows `allow`.
fn analyst_config(token: &str, key: &str, allow: &[&str]) -> String {
    let tenant = common::tenant_block(
        token,
        "",
        &[("ana", key, &["analyst"])],
        &[("analyst", allow)],
    );
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n{tenant}",
        common::LISTENERS
    )
}

/// What `policy_client.py` printed (`output`): only echo before the reload, a denied add, add
/// after it, and one session throughout.
fn assert_policy_client_facts(output: &str) {
    let facts: HashMap<&str, Value> = output
        .lines()
        .filter_map(|line| line.split_once(": "))
        .filter_map(|(k, v)| serde_json::from_str(v).ok().map(|v| (k, v)))
        .collect();
    let fact = |name: &str| {
        facts
            .get(name)
            .unwrap_or_else(|| panic!("policy_client.py printed no `{name}`:\n{output}"))
    };

    assert!(
        fact("negotiated")
            .as_str()
            .is_some_and(|v| v.starts_with("2025-")),
        "a session-era version: {output}"
    );
    assert_eq!(
        fact("tools_before"),
        &json!(["echo"]),
        "only echo is listed"
    );
    assert_eq!(
        fact("denied_code"),
        &json!(-32602),
        "the denied add is a JSON-RPC error: {output}"
    );
    assert!(
        fact("denied_message")
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "the denial has a message: {output}"
    );
    assert_eq!(fact("echo"), &json!("hi"), "the allowed echo works");
    let mut after: Vec<String> =
        serde_json::from_value(fact("tools_after").clone()).expect("a list of names");
    after.sort();
    assert_eq!(after, ["add", "echo"], "the reloaded role lists add too");
    assert_eq!(
        fact("add_after"),
        &json!("42"),
        "add works after the reload"
    );
    assert_eq!(fact("add_after_is_error"), &json!(false));
    let ids = fact("session_ids").as_array().expect("a list of ids");
    assert_eq!(
        ids.len(),
        1,
        "one session throughout, never dropped: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_analyst_sees_only_allowed_tools_and_a_hot_reloaded_role_applies_in_session() {
    use mcp_tunnel::govern::identity::new_secret;
    use mcp_tunnel::relay::reload::Reloader;
    use tokio_util::sync::CancellationToken;

    common::init_tracing();
    let token = new_secret("mcpt_tok_");
    let key = new_secret("mcpt_key_");
    let (dir, certs) = common::cert_dir();
    let path = common::write_config(dir.path(), &analyst_config(&token, &key, &["demo/echo"]));

    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let (relay, loaded) = common::FileRelay::serve(&path, &stop).await;
    let upstream = common::demo_upstream(&stop).await;
    let connect = relay
        .connect(
            &token,
            &certs.ca_pem,
            &[("demo", &upstream)],
            stop.child_token(),
        )
        .await;
    let (state, agents, served) = (relay.state, relay.agents, relay.served);
    let mut reloader = Reloader::new(&path, state.clone(), loaded);

    let url = format!("http://{agents}/mcp/demo");
    let go = dir.path().join("go");
    let mut command = Command::new(python());
    command
        .arg(peer_file("policy_client.py"))
        .arg(&url)
        .arg(&key)
        .arg(&go)
        .env("PYTHONUNBUFFERED", "1");
    let mut script = common::Peer::start("policy_client.py", &mut command);
    script
        .wait_for_line("`ready: true`", |line| line == "ready: true")
        .await;
    assert_eq!(state.sessions.len(), 1, "the script's session is open");

    // The role now allows add too: rewrite the file, reload it, let the script go on.
    std::fs::write(
        &path,
        analyst_config(&token, &key, &["demo/echo", "demo/add"]),
    )
    .expect("rewrite config");
    let summary = reloader.reload().await.expect("the new config reloads");
    assert!(summary.restart_needed.is_empty(), "{summary:?}");
    std::fs::write(&go, "").expect("write the go file");

    let status = tokio::time::timeout(RUN_WAIT, script.child.0.wait())
        .await
        .expect("policy_client.py finishes")
        .expect("policy_client.py is reaped");
    // The drain tasks see EOF once the process is gone; give them a bounded moment.
    tokio::time::timeout(common::WAIT, async {
        while !script.output().contains("session_ids: ") && status.success() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the last line is drained");
    let output = script.output();
    assert!(
        status.success(),
        "policy_client.py failed ({status}):\n{output}"
    );
    assert_policy_client_facts(&output);

    stop.cancel();
    let _ = tokio::time::timeout(common::WAIT, connect).await;
    tokio::time::timeout(common::WAIT, served)
        .await
        .expect("the relay stops")
        .expect("the relay task does not panic: it serves cleanly");
}

// ---------------------------------------------------------------------------------------------
// A 100 MiB tool result from a Python SDK `MCPServer`, through the relay and connect binaries,
// in both eras (issue 13, item 16). The SDK repeats a string result in `content` and
// `structuredContent`, so the answer is a message of about 200 MiB: over the 16 MiB request
// limit, within the 256 MiB default answer limit.

/// The string the tool returns: 100 MiB.
const BIG_RESULT: usize = 100 * 1024 * 1024;

/// Peak resident memory of process `pid` (`VmHWM`), in MiB.
fn peak_rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .expect("VmHWM in /proc status")
}

/// Reads a tools/call answer (JSON or SSE) and returns the response to `id`.
async fn big_answer(response: reqwest::Response, id: u64) -> Value {
    let status = response.status();
    let is_sse = common::is_event_stream(response.headers());
    let body = response.bytes().await.expect("the whole answer arrives");
    assert_eq!(status, 200, "HTTP status of the big answer");
    let messages: Vec<Value> = if is_sse {
        common::sse_data(&body)
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    } else {
        serde_json::from_slice(&body).into_iter().collect()
    };
    messages
        .into_iter()
        .find(|m| m.get("id") == Some(&json!(id)))
        .unwrap_or_else(|| {
            panic!(
                "no response to id {id} in {} bytes starting {:?}",
                body.len(),
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )
        })
}

/// Checks that the answer carries the whole string, in both places.
fn assert_big_result(answer: &Value, era: &str) {
    let result = answer
        .get("result")
        .unwrap_or_else(|| panic!("{era}: an error instead of the result: {}", answer["error"]));
    let text = result["content"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(text.len(), BIG_RESULT, "{era}: the text arrives whole");
    assert!(text.bytes().all(|b| b == b'x'), "{era}: the text is intact");
    let structured = result["structuredContent"]["result"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        structured.len(),
        BIG_RESULT,
        "{era}: the structured copy arrives whole"
    );
}

/// A `big` call of `BIG_RESULT` bytes in each era at `url`, each result checked.
async fn big_calls_in_both_eras(url: &str, api_key: &str) {
    let arguments = json!({ "size": BIG_RESULT });
    // The session era (2025-11-25).
    let mut agent = common::Agent::new(url, api_key);
    let opened = agent.initialize().await;
    assert!(
        opened.status == 200 && agent.session.is_some(),
        "session opens: {opened:?}"
    );
    let response = agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(300))
        .body(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"big","arguments":arguments}}).to_string())
        .send()
        .await
        .expect("the call is answered");
    assert_big_result(&big_answer(response, 1).await, "session era");

    // The stateless era (2026-07-28).
    let mut stateless = common::Agent::new(url, api_key);
    stateless.version = Some("2026-07-28".into());
    let response = stateless
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "big")
        .timeout(Duration::from_secs(300))
        .body(json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"big","arguments":arguments,"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string())
        .send()
        .await
        .expect("the call is answered");
    assert_big_result(&big_answer(response, 2).await, "stateless era");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_python_sdk_result_crosses_relay_and_connect_in_both_eras() {
    let (server, upstream) = start_python_server().await;
    let relay_process = common::AcmeRelay::start("").await;
    let connect = common::Peer::start(
        "connect",
        common::serving_one(
            &mut relay_process.connect_command(),
            ["--connections", "1"],
            ("pysrv", &upstream),
            "info",
        ),
    );
    let common::AcmeRelay {
        dir: _dir,
        api_key,
        relay:
            common::RelayProcess {
                peer: mut relay,
                agents,
                ..
            },
        ..
    } = relay_process;
    relay
        .wait_for_line("\"tunnel connected\"", |l| l.contains("tunnel connected"))
        .await;
    let (relay_before, connect_before) = (peak_rss_mib(relay.pid()), peak_rss_mib(connect.pid()));
    let url = format!("http://{agents}/mcp/pysrv");
    big_calls_in_both_eras(&url, &api_key).await;

    let (relay_peak, connect_peak) = (peak_rss_mib(relay.pid()), peak_rss_mib(connect.pid()));
    eprintln!(
        "peak RSS: relay {relay_peak} MiB (before the calls {relay_before} MiB), connect {connect_peak} MiB (before {connect_before} MiB), for answers of about {} MiB each",
        (2 * BIG_RESULT) >> 20
    );
    // Neither side held an answer whole (each is about 200 MiB): memory follows the pieces.
    for (name, peak) in [("relay", relay_peak), ("connect", connect_peak)] {
        assert!(
            peak < 160,
            "{name} peaked at {peak} MiB: it held an answer of about 200 MiB whole"
        );
    }
    connect.stop().await;
    relay.stop().await;
    server.stop().await;
}

/// Calls `echo` `CALLS` times in a row through `agent` (the session era when it has a session,
/// else 2026-07-28) and returns the p50 and p99 round trip in microseconds.
async fn echo_latency(agent: &common::Agent) -> (u128, u128) {
    const CALLS: u64 = 400;
    let mut micros = Vec::with_capacity(CALLS as usize);
    for id in 0..CALLS + 20 {
        let started = std::time::Instant::now();
        let answer = if agent.session.is_some() {
            agent.call_tool(id, "echo", json!({"message": "hi"})).await
        } else {
            stateless_call(agent, id, "echo", json!({"message": "hi"}), json!({})).await
        };
        assert!(
            common::tool_text(answer.response()).contains("hi"),
            "{answer:?}"
        );
        // The first calls warm connections and pools up.
        if id >= 20 {
            micros.push(started.elapsed().as_micros());
        }
    }
    micros.sort_unstable();
    (micros[micros.len() / 2], micros[micros.len() * 99 / 100])
}

/// The latency a bridged call adds over a same-era call through the tunnel, against the
/// same upstream: a 2026-07-28 agent of a session-era upstream (server-everything) against a
/// session-era agent of it, and a session-era agent of a 2026-07-28-only upstream against a
/// 2026-07-28 agent of it. A measurement, never a pass or fail on speed:
/// `cargo test --release --test peers bridged_call_latency -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo test --release --test peers bridged_call_latency -- --ignored --nocapture"]
async fn bridged_call_latency() {
    let (everything, session_only) = start_server_everything().await;
    let (modern, stateless_only) =
        common::peers::start_python_server_with("py_server.py", &["--modern-only"]).await;
    let harness = common::Harness::start(common::Options::default()).await;
    let client = harness
        .connect(
            &harness.acme,
            &[("everything", &session_only), ("modern", &stateless_only)],
        )
        .await;
    let key = harness.acme.api_key.clone();
    let mut report = Vec::new();
    for (source, own_era_is_session) in [("everything", true), ("modern", false)] {
        let url = harness.url(source);
        let mut session = common::Agent::new(&url, &key);
        assert_eq!(session.initialize().await.status, 200);
        let mut stateless = common::Agent::new(&url, &key);
        stateless.version = Some("2026-07-28".into());
        let session_era = echo_latency(&session).await;
        let stateless_era = echo_latency(&stateless).await;
        let (same, bridged) = if own_era_is_session {
            (session_era, stateless_era)
        } else {
            (stateless_era, session_era)
        };
        report.push(format!(
            "{source}: same era p50 {} us p99 {} us; bridged p50 {} us p99 {} us; added p50 {:+} us",
            same.0,
            same.1,
            bridged.0,
            bridged.1,
            bridged.0 as i128 - same.0 as i128
        ));
    }
    for line in &report {
        println!("{line}");
    }
    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    everything.stop().await;
    modern.stop().await;
}
