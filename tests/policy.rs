//! Per-tool policy end to end: a caller sees only the tools their roles allow, a denied call is
//! an unknown tool (and never reaches the upstream), an allowed one works; in both eras and over
//! HTTP+SSE.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Agent, WAIT, identity, quic_settings, read_answer, tool_names, tool_text};
use mcp_tunnel::client;
use mcp_tunnel::config::LimitsSection;
use mcp_tunnel::govern::condition::Condition;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::govern::policy::{Kind, Role};
use mcp_tunnel::govern::{Keyring, Policy, SecretHash};
use mcp_tunnel::relay::{Governance, Relay, RelaySettings, RelayState};
use mcp_tunnel::transport::tls;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_see_and_call_only_what_their_roles_allow() {
    let (shutdown, _stop) = common::stop_on_drop();
    let upstream = common::demo_upstream(&shutdown).await;
    let certs = mcp_tunnel::certs::generate(&[]).expect("certs");
    let (token, analyst_key, admin_key) = (
        new_secret("mcpt_tok_"),
        new_secret("mcpt_key_"),
        new_secret("mcpt_key_"),
    );
    let mut keyring = Keyring::default();
    keyring.add_tunnel_token(SecretHash::of(&token), "acme".into());
    keyring.add_api_key(
        SecretHash::of(&analyst_key),
        identity("acme", "alice", &["analyst"]),
    );
    keyring.add_api_key(
        SecretHash::of(&admin_key),
        identity("acme", "root", &["admin"]),
    );
    let mut policy = Policy::default();
    policy.set_roles("acme".into(), acme_roles());
    let (agents, tunnel, state) = serve_relay(&certs, keyring, policy, &shutdown).await;
    let settings = quic_settings(tunnel, &token, &certs.ca_pem, &[("demo", &upstream)]);
    tokio::spawn(client::run(settings, shutdown.clone()));
    tokio::time::timeout(WAIT, state.registry.wait_for("acme", "demo"))
        .await
        .expect("tunnel up");
    let url = format!("http://{agents}/mcp/demo");

    analyst_session(&url, &analyst_key, &state).await;
    admin_session(&url, &admin_key).await;
    stateless_analyst(&url, &analyst_key).await;
}

/// acme's roles: `analyst` (echo under a condition, not add) and `admin` (everything).
fn acme_roles() -> HashMap<String, Role> {
    let mut roles = HashMap::new();
    roles.insert(
        "analyst".to_owned(),
        Role {
            allow: vec!["demo/echo".into(), "demo/a*".into()],
            deny: vec!["demo/add".into()],
            conditions: vec![Arc::new(
                Condition::compile(
                    Kind::Tool,
                    "demo/echo".into(),
                    r#"args.message != "salaries" || "hr" in roles"#,
                )
                .expect("the condition compiles"),
            )],
            ..Role::default()
        },
    );
    roles.insert(
        "admin".to_owned(),
        Role {
            allow: vec!["*".into()],
            ..Role::default()
        },
    );
    roles
}

/// A relay without admin or audit governed by `keyring` and `policy`, served until
/// `shutdown`; returns its agent and tunnel addresses and its state.
async fn serve_relay(
    certs: &mcp_tunnel::certs::DevCerts,
    keyring: Keyring,
    policy: Policy,
    shutdown: &CancellationToken,
) -> (SocketAddr, SocketAddr, Arc<RelayState>) {
    let relay = Relay::bind(RelaySettings {
        tunnel_listen: "127.0.0.1:0".parse().expect("literal"),
        identity: tls::Identity::from_pem(&certs.relay_pem, &certs.relay_key).expect("identity"),
        agents_listen: "127.0.0.1:0".parse().expect("literal"),
        admin_listen: None,
        governance: Governance {
            keyring,
            policy,
            limiter: Default::default(),
            limits: LimitsSection::default(),
        },
        limits: LimitsSection::default(),
        allowed_origins: Vec::new(),
        allowed_hosts: Vec::new(),
        sse_keep_alive: Duration::from_secs(20),
        audit: None,
        fleet: Default::default(),
    })
    .await
    .expect("relay");
    let (agents, tunnel, state) = (
        relay.agents_addr(),
        relay.tunnel_addr(),
        relay.state().clone(),
    );
    tokio::spawn(relay.serve(shutdown.clone()));
    (agents, tunnel, state)
}

/// Session era: the analyst sees echo only (add is denied, a* would allow it), calls echo;
/// denied calls never reach the tunnel of `state`.
async fn analyst_session(url: &str, analyst_key: &str, state: &RelayState) {
    let mut alice = Agent::new(url, analyst_key);
    alice.initialize().await;
    assert_eq!(
        alice.tool_names(1).await,
        ["echo"],
        "deny wins over a matching allow; unlisted tools are hidden"
    );
    assert_eq!(
        tool_text(
            alice
                .call_tool(2, "echo", json!({"message": "hi"}))
                .await
                .response()
        ),
        "hi"
    );
    let streams_before = state.registry.rows()[0].streams_opened;
    let denied = alice.call_tool(3, "add", json!({"a": 1, "b": 2})).await;
    assert_eq!(denied.status, 200);
    assert_eq!(
        denied.response()["error"]["code"],
        -32602,
        "a JSON-RPC error in the spec's shape, not an HTTP 403"
    );
    assert_eq!(
        denied.response()["error"]["message"],
        "Unknown tool: add",
        "a denied tool reads like an unknown one"
    );
    assert_eq!(denied.response()["id"], 3);
    let hidden = alice.call_tool(4, "blob", json!({"size": 1})).await;
    assert_eq!(hidden.response()["error"]["message"], "Unknown tool: blob");
    // The role's condition on echo: this argument is refused, like an unknown tool; so is a
    // call whose condition cannot be evaluated (no `message`); a batch is checked message by
    // message.
    let refused = alice
        .call_tool(40, "echo", json!({"message": "salaries"}))
        .await;
    assert_eq!(refused.response()["error"]["message"], "Unknown tool: echo");
    assert_eq!(refused.response()["id"], 40);
    let unevaluable = alice.call_tool(41, "echo", json!({})).await;
    assert_eq!(
        unevaluable.response()["error"]["message"],
        "Unknown tool: echo"
    );
    let batch = alice
        .post(&json!([
            {"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"echo","arguments":{"message":"fine"}}},
            {"jsonrpc":"2.0","id":43,"method":"tools/call","params":{"name":"echo","arguments":{"message":"salaries"}}}
        ]))
        .await;
    assert_eq!(
        batch.response()["error"]["message"],
        "Unknown tool: echo",
        "{batch:?}"
    );
    assert_eq!(batch.response()["id"], 43, "the second message is refused");
    assert_eq!(
        state.registry.rows()[0].streams_opened,
        streams_before,
        "denied calls never reached the tunnel"
    );
}

/// The admin role sees and calls everything.
async fn admin_session(url: &str, admin_key: &str) {
    let mut root = Agent::new(url, admin_key);
    root.initialize().await;
    assert_eq!(root.tool_names(1).await, ["add", "blob", "echo", "sleep"]);
    assert_eq!(
        tool_text(
            root.call_tool(2, "add", json!({"a": 1, "b": 2}))
                .await
                .response()
        ),
        "3"
    );
}

/// 2026-07-28: the same filter and the same denial.
async fn stateless_analyst(url: &str, analyst_key: &str) {
    let mut stateless = Agent::new(url, analyst_key);
    stateless.version = Some("2026-07-28".into());
    let meta = json!({"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}});
    let list = stateless
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/list")
        .body(
            json!({"jsonrpc":"2.0","id":5,"method":"tools/list","params":{"_meta":meta}})
                .to_string(),
        );
    let list = read_answer(list.send().await.expect("POST")).await;
    assert_eq!(tool_names(list.response()), ["echo"]);
    assert_eq!(
        list.response()["result"]["cacheScope"],
        "private",
        "a list policy decides by identity is no cache's to share"
    );
    let call = stateless
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "add")
        .body(json!({"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2},"_meta":meta}}).to_string());
    let call = read_answer(call.send().await.expect("POST")).await;
    assert_eq!(call.response()["error"]["message"], "Unknown tool: add");
}
