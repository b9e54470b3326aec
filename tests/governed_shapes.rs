//! Hardening of what the relay governs (issue 13): a governed message is judged on the field
//! its upstream acts on and an ambiguous one is refused; a request with a null id is refused and
//! audited; batches are filtered, counted and bounded like the single messages they hold.

mod common;

use common::audit::{Trail, audit_at, export};
use common::{Agent, Harness, Options, WAIT, cert_dir, quic_settings, tool_names, write_config};
use mcp_tunnel::client;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::govern::policy::Role;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Tenant `acme`'s one role: echo, and the public files of source `demo`.
fn reader_role() -> (String, Role) {
    (
        "reader".into(),
        Role {
            allow: vec!["demo/echo".into()],
            allow_resources: vec!["demo/file:///public/*".into()],
            ..Role::default()
        },
    )
}

/// Two fields of each audit row of `rows`, by key; "-" where one is not a string.
fn columns<'a>(
    rows: impl Iterator<Item = &'a Value>,
    [a, b]: [&str; 2],
) -> Vec<(&'a str, &'a str)> {
    rows.map(|r| (r[a].as_str().unwrap_or("-"), r[b].as_str().unwrap_or("-")))
        .collect()
}

fn read(id: u64, params: Value) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"resources/read","params":params})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_is_judged_on_its_uri_and_a_decoy_name_is_refused() {
    let (harness, trail) = Trail::with_roles(vec![reader_role()]).await;
    let (db, upstream) = (trail.db.clone(), trail.upstream.clone());
    let _acme = harness.connect(&harness.acme, &[("demo", &upstream)]).await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);

    // The review's decoy: the upstream reads `uri`; `name` must not decide (in either order).
    for (id, params) in [
        (
            1,
            json!({"uri":"file:///etc/secret","name":"file:///public/decoy"}),
        ),
        (
            2,
            json!({"name":"file:///public/decoy","uri":"file:///etc/secret"}),
        ),
        (3, json!({"name":"file:///public/decoy"})),
    ] {
        let answer = agent.post(&read(id, params.clone())).await;
        assert_eq!(answer.status, 400, "{params}: {answer:?}");
        assert_eq!(answer.response()["error"]["code"], -32600, "{answer:?}");
    }
    // The same key twice: which one would the upstream read? Refused too.
    let twice = agent
        .post_raw(r#"{"jsonrpc":"2.0","id":4,"method":"resources/read","params":{"uri":"file:///public/a","uri":"file:///etc/secret"}}"#)
        .await;
    assert_eq!(twice.status, 400, "{twice:?}");
    // Judged on `uri`: the secret is an unknown resource, the public file reaches the upstream
    // (which knows no resources at all: its own error proves the read got there).
    let secret = agent
        .post(&read(5, json!({"uri":"file:///etc/secret"})))
        .await;
    assert_eq!(secret.response()["error"]["code"], -32602, "{secret:?}");
    assert_eq!(
        secret.response()["error"]["message"],
        "Unknown resource: file:///etc/secret"
    );
    let public = agent
        .post(&read(6, json!({"uri":"file:///public/a"})))
        .await;
    assert_eq!(public.response()["error"]["code"], -32601, "{public:?}");
    // A tool is judged on its name, never on a `uri` beside it.
    let tool = agent
        .post(&json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","uri":"x","arguments":{"message":"m"}}}))
        .await;
    assert_eq!(tool.status, 400, "{tool:?}");
    harness.stop().await;

    let rows = export(&db).await;
    let reads = columns(
        rows.iter()
            .filter(|r| r["mcp.method.name"] == "resources/read"),
        ["mcp.resource.uri", "decision"],
    );
    assert_eq!(
        reads,
        [
            ("file:///etc/secret", "deny"),
            ("file:///public/a", "allow")
        ],
        "rows name the uri the upstream would read, never a decoy: {rows:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_null_id_is_refused_audited_and_never_forwarded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("audit.db");
    let harness = Harness::start(Options {
        audit: Some(audit_at(&db)),
        ..Options::default()
    })
    .await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (upstream, seen) = common::start_recording_upstream(&stop).await;
    let _acme = harness.connect(&harness.acme, &[("rec", &upstream)]).await;
    let mut agent = Agent::new(&harness.url("rec"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);

    let null = agent
        .post(&json!({"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"echo","arguments":{}}}))
        .await;
    assert_eq!(null.status, 200, "a JSON-RPC error, not 202: {null:?}");
    assert_eq!(null.response()["error"]["code"], -32600, "{null:?}");
    assert!(null.response()["id"].is_null());
    // A null id in a batch refuses the batch.
    let batch = agent
        .post(&json!([
            {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}},
            {"jsonrpc":"2.0","id":null,"method":"ping"}
        ]))
        .await;
    assert_eq!(batch.response()["error"]["code"], -32600, "{batch:?}");
    // The next call goes through: only it reaches the upstream.
    let call = agent.call_tool(2, "echo", json!({})).await;
    assert_eq!(call.response()["result"]["content"][0]["text"], "recorded");
    let methods: Vec<String> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|(m, _, _)| m.clone())
        .collect();
    assert_eq!(
        methods.iter().filter(|m| *m == "tools/call").count(),
        1,
        "refused messages never reached the upstream: {methods:?}"
    );
    harness.stop().await;

    let rows = export(&db).await;
    // One row per request: the null-id call and both messages of the refused batch end as
    // -32600; the null-id ones are denied by a rule naming the null id.
    let refused: Vec<&Value> = rows
        .iter()
        .filter(|r| r["outcome"]["code"] == -32600)
        .collect();
    assert_eq!(refused.len(), 3, "{rows:#?}");
    let denied = columns(
        refused.iter().copied().filter(|r| r["decision"] == "deny"),
        ["mcp.method.name", "rule"],
    );
    assert_eq!(
        denied,
        [
            ("tools/call", "a request id must not be null"),
            ("ping", "a request id must not be null")
        ],
        "{rows:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_in_a_batch_never_reveals_what_policy_hides() {
    let harness = Harness::start(Options {
        acme_roles: vec![reader_role()],
        ..Options::default()
    })
    .await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let upstream = batch_upstream(&stop).await;
    let _acme = harness.connect(&harness.acme, &[("demo", &upstream)]).await;
    let _other = harness
        .connect(&harness.other, &[("demo", &upstream)])
        .await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    let alone = agent
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .await;
    assert_eq!(tool_names(alone.response()), ["echo"]);
    let batch = agent
        .post(&json!([
            {"jsonrpc":"2.0","id":2,"method":"tools/list"},
            {"jsonrpc":"2.0","id":3,"method":"ping"}
        ]))
        .await;
    let text = serde_json::to_string(&batch.messages).expect("json");
    assert!(
        !text.contains("\"add\"") && !text.contains("\"sleep\""),
        "no hidden tool in a batched answer: {text}"
    );
    assert_eq!(batch.response()["error"]["code"], -32600, "{batch:?}");
    // A tenant without roles has nothing hidden: its batched lists pass.
    let mut free = Agent::new(&harness.url("demo"), &harness.other.api_key);
    assert_eq!(free.initialize().await.status, 200);
    let batch = free
        .post(&json!([{"jsonrpc":"2.0","id":2,"method":"tools/list"}]))
        .await;
    assert!(
        serde_json::to_string(&batch.messages)
            .expect("json")
            .contains("\"sleep\""),
        "{batch:?}"
    );
}

/// A relay from a config file for tenant `acme` (one key, no roles) with `extra` sections,
/// `connect` serving the batch upstream as `demo`; returns the agent URL, the key and the stop
/// guard.
async fn file_relay(
    extra: &str,
) -> (
    String,
    String,
    tempfile::TempDir,
    tokio_util::sync::DropGuard,
) {
    file_relay_with(extra, "").await
}

/// [`file_relay`], the key holding role `caller` and `roles` (TOML) appended to the tenant.
async fn file_relay_with(
    extra: &str,
    roles: &str,
) -> (
    String,
    String,
    tempfile::TempDir,
    tokio_util::sync::DropGuard,
) {
    common::init_tracing();
    let (token, key) = (new_secret("mcpt_tok_"), new_secret("mcpt_key_"));
    let mut tenant = common::acme_tenant(&token, &key);
    if !roles.is_empty() {
        tenant.push_str("roles = [\"caller\"]\n");
        tenant.push_str(roles);
    }
    let text = format!("{}\n{extra}\n{tenant}", common::LISTENERS);
    let (dir, certs) = cert_dir();
    let path = write_config(dir.path(), &text);
    let stop = CancellationToken::new();
    let (relay, _) = common::FileRelay::serve(&path, &stop).await;
    let upstream = batch_upstream(&stop).await;
    let settings = quic_settings(relay.tunnel, &token, &certs.ca_pem, &[("demo", &upstream)]);
    tokio::spawn(client::run(settings, stop.child_token()));
    tokio::time::timeout(WAIT, relay.state.registry.wait_for("acme", "demo"))
        .await
        .expect("the tunnel comes up");
    (
        format!("http://{}/mcp/demo", relay.agents),
        key,
        dir,
        stop.drop_guard(),
    )
}

/// The answer of the batch upstream to one message, if it is a request.
fn batch_answer(message: &Value) -> Option<Value> {
    let id = message.get("id")?.clone();
    let result = match message["method"].as_str()? {
        "initialize" => {
            json!({"protocolVersion":"2025-03-26","capabilities":{"tools":{}},"serverInfo":{"name":"batch","version":"1"}})
        }
        "tools/list" => json!({"tools":[
            {"name":"echo","inputSchema":{"type":"object"}},
            {"name":"add","inputSchema":{"type":"object"}},
            {"name":"sleep","inputSchema":{"type":"object"}}
        ]}),
        "tools/call" => json!({"content":[{"type":"text","text":"ok"}]}),
        _ => json!({}),
    };
    Some(json!({"jsonrpc":"2.0","id":id,"result":result}))
}

/// A 2025-03-26 upstream that answers batches (the demo upstream takes one message a POST).
async fn batch_upstream(stop: &CancellationToken) -> String {
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(|body: String| async move {
            let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let answer = match &value {
                Value::Array(items) => {
                    let answers: Vec<Value> = items.iter().filter_map(batch_answer).collect();
                    (!answers.is_empty()).then_some(Value::Array(answers))
                }
                one => batch_answer(one),
            };
            let Some(answer) = answer else {
                return axum::http::StatusCode::ACCEPTED.into_response();
            };
            (
                [
                    ("content-type", "application/json"),
                    ("mcp-session-id", "batch-1"),
                ],
                answer.to_string(),
            )
                .into_response()
        }),
    );
    let addr = common::serve_axum(app, stop).await;
    format!("http://{addr}/mcp")
}

fn echo(id: usize) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"echo","arguments":{"message":"b"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_a_batch_costs_a_token() {
    // Nine tokens, none refilled while the test runs: initialize and its notification take
    // two, a batch of five calls five; two are left, so a batch of three is refused (its HTTP
    // request still counts one, as any request the limiter sees).
    let (url, key, _dir, _stop) =
        file_relay("[rate_limits]\nidentity = { per_minute = 1, burst = 9 }\n").await;
    let mut agent = Agent::new(&url, &key);
    assert_eq!(agent.initialize().await.status, 200);
    let five: Vec<Value> = (1..=5).map(echo).collect();
    let answer = agent.post(&Value::Array(five)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let three: Vec<Value> = (6..=8).map(echo).collect();
    let refused = agent.post(&Value::Array(three)).await;
    assert_eq!(
        refused.status, 429,
        "two tokens for three calls: {refused:?}"
    );
    assert!(refused.headers.get("retry-after").is_some());
    // Its other two messages took nothing: one token is left.
    let one = agent.post(&echo(11)).await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(
        agent.post(&echo(12)).await.status,
        429,
        "the burst is spent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_configured_bound_is_refused_before_it_is_read() {
    let (url, key, _dir, _stop) = file_relay("[limits]\nmax_batch_messages = 3\n").await;
    let mut agent = Agent::new(&url, &key);
    assert_eq!(agent.initialize().await.status, 200);
    let answer = agent.post(&Value::Array((1..=3).map(echo).collect())).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let over = agent.post(&Value::Array((1..=4).map(echo).collect())).await;
    assert_eq!(over.status, 400, "{over:?}");
    assert_eq!(over.response()["error"]["code"], -32600);
    let message = over.response()["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("limit of 3"), "{message}");
}

/// Measures authorizing a large batch whose every call a condition applies to (issue 13 item 4:
/// 4,000 such messages took 4.2 s of one async worker, the body parsed once per message). Prints
/// the figures; asserts nothing about time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --test governed_shapes -- --ignored --nocapture"]
async fn measure_a_large_conditional_batch() {
    const MESSAGES: usize = 4000;
    let roles = r#"
[[tenants.roles]]
name = "caller"
allow = ["demo/*"]

[[tenants.roles.conditions]]
match = "demo/echo"
when = 'args.message != "salaries" || "hr" in roles'
"#;
    let (url, key, _dir, _stop) = file_relay_with(
        &format!("[limits]\nmax_batch_messages = {MESSAGES}\nmax_message_bytes = 67108864\n"),
        roles,
    )
    .await;
    let mut agent = Agent::new(&url, &key);
    assert_eq!(agent.initialize().await.status, 200);
    let padding = "x".repeat(200);
    let batch: Vec<Value> = (1..=MESSAGES)
        .map(|id| json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"echo","arguments":{"message":"b","pad":padding}}}))
        .collect();
    let body = Value::Array(batch).to_string();
    let mut other = Agent::new(&url, &key);
    let started = std::time::Instant::now();
    let (answer, (initialized, init_took)) = tokio::join!(agent.post_raw(body.clone()), async {
        let at = std::time::Instant::now();
        let answer = other.initialize().await;
        (answer, at.elapsed())
    });
    let took = started.elapsed();
    assert_eq!(answer.status, 200, "{:?}", answer.status);
    assert_eq!(initialized.status, 200);
    println!(
        "{MESSAGES} conditional calls ({} bytes): answered in {took:?}; a concurrent initialize took {init_took:?}",
        body.len()
    );
}

/// The `mcp_tunnel_calls_total` samples whose labels include every one of `labels` (each
/// `key="value"`), summed.
fn calls_with(text: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("mcp_tunnel_calls_total{"))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Made-up names per kind in `metric_labels_hold_only_names_policy_or_the_upstream_knows`.
const MADE_UP: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_labels_hold_only_names_policy_or_the_upstream_knows() {
    // The recorder is per process: this test's calls go to a source no other test uses.
    const SOURCE: &str = "labelled";
    let harness = Harness::start(Options {
        acme_roles: vec![(
            "caller".into(),
            Role {
                allow: vec![format!("{SOURCE}/echo")],
                ..Role::default()
            },
        )],
        ..Options::default()
    })
    .await;
    let (upstream, _stop) = common::guarded_demo_upstream().await;
    let _acme = harness.connect(&harness.acme, &[(SOURCE, &upstream)]).await;
    let _other = harness
        .connect(&harness.other, &[(SOURCE, &upstream)])
        .await;
    made_up_and_known_calls(&harness, SOURCE).await;
    assert_labels_are_known_names(&harness.metrics().await, SOURCE);
}

/// Made-up calls of `MADE_UP` tools and methods and of unknown sources, then a known tool of
/// each tenant, on `source`.
async fn made_up_and_known_calls(harness: &Harness, source: &str) {
    let mut acme = Agent::new(&harness.url(source), &harness.acme.api_key);
    assert_eq!(acme.initialize().await.status, 200);
    let mut other = Agent::new(&harness.url(source), &harness.other.api_key);
    assert_eq!(other.initialize().await.status, 200);

    let made_up = |i: u64| format!("madeup{i}-{}", "x".repeat(10_000));
    for i in 0..MADE_UP {
        // Denied (acme has roles), allowed and unknown upstream (other has none), and methods
        // MCP does not have.
        acme.call_tool(i, &made_up(i), json!({})).await;
        other.call_tool(i, &made_up(i), json!({})).await;
        acme.post(&json!({"jsonrpc":"2.0","id":i,"method":made_up(i)}))
            .await;
    }
    // Sources nobody registered.
    for i in 0..3 {
        let mut lost = Agent::new(&harness.url(&format!("nowhere{i}")), &harness.acme.api_key);
        assert_eq!(lost.initialize().await.status, 404);
    }
    // Known: echo by acme's policy; add once the upstream listed it to other.
    assert_eq!(
        acme.call_tool(100, "echo", json!({"message":"m"}))
            .await
            .status,
        200
    );
    other
        .post(&json!({"jsonrpc":"2.0","id":101,"method":"tools/list"}))
        .await;
    other.call_tool(102, "add", json!({"a":1,"b":2})).await;
}

/// Calls made up by agents are counted under `_other`, known names under their own.
fn assert_labels_are_known_names(text: &str, source: &str) {
    assert!(
        !text.contains("madeup") && !text.contains("nowhere"),
        "no made-up name is a label"
    );
    assert!(
        text.lines().all(|l| l.len() < 2_000),
        "no label is long: {} bytes of /metrics",
        text.len()
    );
    let source = format!("source=\"{source}\"");
    assert_eq!(
        calls_with(
            text,
            &[
                "tenant=\"acme\"",
                &source,
                "tool=\"_other\"",
                "decision=\"deny\""
            ]
        ),
        MADE_UP as f64,
        "made-up tools are counted, under one value:\n{text}"
    );
    assert_eq!(
        calls_with(text, &["tenant=\"acme\"", &source, "method=\"_other\""]),
        MADE_UP as f64,
        "made-up methods too"
    );
    assert_eq!(
        calls_with(text, &["tenant=\"other\"", &source, "tool=\"_other\""]),
        MADE_UP as f64
    );
    assert_eq!(
        calls_with(text, &["tenant=\"acme\"", "source=\"_other\""]),
        3.0,
        "unknown sources under one value"
    );
    assert_eq!(
        calls_with(text, &["tenant=\"acme\"", &source, "tool=\"echo\""]),
        1.0
    );
    assert_eq!(
        calls_with(text, &["tenant=\"other\"", &source, "tool=\"add\""]),
        1.0,
        "a listed tool is a label:\n{text}"
    );
}
