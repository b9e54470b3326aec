//! The isolation matrix: three tenants, each with a `connect` announcing the same two source
//! names (`db`, `files`) plus one of its own (`{tenant}-crm`), each source on its own demo
//! upstream. Every tenant reaches its own sources (its tunnel, and only its tunnel, opens a
//! stream); every cross-tenant attempt, in every transport and era, gets exactly the answer a
//! source or session that does not exist gets (same status, same content type, same body) and
//! reaches no tunnel.

mod common;

use std::collections::BTreeMap;

use common::sse::next_event;
use common::{Agent, Harness, Options, TenantCreds, WAIT, tool_text};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The source names every tenant has.
const SHARED: [&str; 2] = ["db", "files"];
/// A source name no tenant has.
const TYPO: &str = "dbx";
/// A session id no session has (the relay's ids are 48 hex digits).
const NO_SESSION: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

/// The source only `tenant` has.
fn own_source(tenant: &TenantCreds) -> String {
    format!("{}-crm", tenant.name)
}

struct Setup {
    harness: Harness,
    tenants: Vec<TenantCreds>,
    _clients: Vec<common::Client>,
    _upstreams: tokio_util::sync::DropGuard,
}

/// A relay, and per tenant a demo upstream for each of its three sources and one `connect`
/// announcing all three.
async fn setup() -> Setup {
    let upstreams = CancellationToken::new();
    let harness = Harness::start(Options::default()).await;
    let tenants = vec![
        harness.acme.clone(),
        harness.other.clone(),
        harness.third.clone(),
    ];
    let mut clients = Vec::new();
    for tenant in &tenants {
        let own = own_source(tenant);
        let mut urls = Vec::new();
        for _ in 0..3 {
            urls.push(common::demo_upstream(&upstreams).await);
        }
        let sources = [
            (SHARED[0], urls[0].as_str()),
            (SHARED[1], urls[1].as_str()),
            (own.as_str(), urls[2].as_str()),
        ];
        clients.push(harness.connect(tenant, &sources).await);
    }
    Setup {
        harness,
        tenants,
        _clients: clients,
        _upstreams: upstreams.drop_guard(),
    }
}

/// Streams opened so far by each tenant's tunnels.
fn streams_by_tenant(harness: &Harness) -> BTreeMap<String, u64> {
    let mut by_tunnel = BTreeMap::new();
    for row in harness.state.registry.rows() {
        by_tunnel.insert(row.id, (row.tenant, row.streams_opened));
    }
    let mut by_tenant = BTreeMap::new();
    for (tenant, opened) in by_tunnel.into_values() {
        *by_tenant.entry(tenant).or_insert(0) += opened;
    }
    by_tenant
}

/// Everything an agent can observe of an answer: status, content type and the exact body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: u16,
    content_type: Option<String>,
    body: String,
}

async fn seen(request: reqwest::RequestBuilder) -> Seen {
    let response = request.timeout(WAIT).send().await.expect("request is sent");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("ascii content type").to_owned());
    let body = tokio::time::timeout(WAIT, response.text())
        .await
        .expect("answer arrives in time")
        .expect("body reads");
    Seen {
        status,
        content_type,
        body,
    }
}

/// A raw HTTP agent of one tenant.
struct Caller<'a> {
    harness: &'a Harness,
    key: String,
    http: reqwest::Client,
}

impl<'a> Caller<'a> {
    fn new(harness: &'a Harness, tenant: &TenantCreds) -> Self {
        Self {
            harness,
            key: tenant.api_key.clone(),
            http: reqwest::Client::new(),
        }
    }

    fn mcp(&self, method: Method, source: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.harness.url(source))
            .bearer_auth(&self.key)
            .header("accept", "application/json, text/event-stream")
    }

    /// Session era: `initialize` on `source`.
    async fn initialize(&self, source: &str) -> Seen {
        seen(self.mcp(Method::POST, source)
            .header("content-type", "application/json")
            .body(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"isolation","version":"0"}}}).to_string()))
        .await
    }

    /// Session era: a request on `session` of `source`.
    async fn in_session(&self, source: &str, session: &str, body: Value) -> Seen {
        seen(
            self.mcp(Method::POST, source)
                .header("content-type", "application/json")
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", "2025-11-25")
                .body(body.to_string()),
        )
        .await
    }

    /// Session era: GET (the standalone stream) or DELETE on `session` of `source`.
    async fn session_verb(&self, method: Method, source: &str, session: &str) -> Seen {
        seen(
            self.mcp(method, source)
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", "2025-11-25"),
        )
        .await
    }

    /// Stateless era (2026-07-28): `tools/list`.
    async fn stateless_list(&self, source: &str) -> Seen {
        seen(self.mcp(Method::POST, source)
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/list")
            .body(json!({"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string()))
        .await
    }

    /// Stateless era (2026-07-28): `tools/call` of `echo`.
    async fn stateless_call(&self, source: &str, message: &str) -> Seen {
        seen(self.mcp(Method::POST, source)
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "echo")
            .body(json!({"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"echo","arguments":{"message":message},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string()))
        .await
    }

    /// HTTP+SSE (2024-11-05): the GET that opens a session; only for answers that end (a 404).
    async fn sse_open(&self, source: &str) -> Seen {
        seen(
            self.http
                .get(format!("http://{}/sse/{source}", self.harness.agents))
                .bearer_auth(&self.key),
        )
        .await
    }

    /// HTTP+SSE (2024-11-05): a POST to the message endpoint of `session` of `source`.
    async fn sse_post(&self, source: &str, session: &str, body: Value) -> Seen {
        seen(
            self.http
                .post(format!(
                    "http://{}/sse/{source}/messages?sessionId={session}",
                    self.harness.agents
                ))
                .bearer_auth(&self.key)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }
}

fn echo(id: u64, message: &str) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"echo","arguments":{"message":message}}})
}

fn tools_list(id: u64) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/list"})
}

/// An open HTTP+SSE session: the event stream and its session id.
struct LegacySession {
    stream: reqwest::Response,
    buffer: String,
    id: String,
}

async fn open_legacy(caller: &Caller<'_>, source: &str) -> LegacySession {
    let mut stream = caller
        .http
        .get(format!("http://{}/sse/{source}", caller.harness.agents))
        .bearer_auth(&caller.key)
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(stream.status(), 200, "own /sse/{source} opens");
    let mut buffer = String::new();
    let endpoint = next_event(&mut stream, &mut buffer).await;
    let id = endpoint
        .split_once("sessionId=")
        .map(|(_, id)| id.to_owned())
        .unwrap_or_else(|| panic!("endpoint event names the session: {endpoint}"));
    LegacySession { stream, buffer, id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_reaches_its_own_sources_through_its_own_tunnel_only() {
    let setup = setup().await;
    let harness = &setup.harness;
    for tenant in &setup.tenants {
        let caller = Caller::new(harness, tenant);
        let sources = [
            SHARED[0].to_owned(),
            SHARED[1].to_owned(),
            own_source(tenant),
        ];
        for source in sources.iter().map(String::as_str) {
            // Session era: initialize opens one stream, on this tenant's tunnel.
            let before = streams_by_tenant(harness);
            let mut agent = Agent::new(&harness.url(source), &tenant.api_key);
            assert_eq!(agent.initialize().await.status, 200, "{source}");
            let message = format!("{}:{source}", tenant.name);
            let answer = agent
                .call_tool(1, "echo", json!({"message": message}))
                .await;
            assert_eq!(tool_text(answer.response()), message);
            let mut expected = before.clone();
            *expected.get_mut(&tenant.name).expect("tenant has a tunnel") += 1;
            assert_eq!(
                streams_by_tenant(harness),
                expected,
                "{} {source}: only its own tunnel opened a stream",
                tenant.name
            );

            // Stateless era: one stream per request, on this tenant's tunnel.
            let call = caller.stateless_call(source, &message).await;
            assert_eq!(call.status, 200, "{call:?}");
            assert!(call.body.contains(&message), "{call:?}");
            *expected.get_mut(&tenant.name).expect("tenant has a tunnel") += 1;
            assert_eq!(streams_by_tenant(harness), expected);

            // HTTP+SSE: the GET opens the session's stream, on this tenant's tunnel.
            let mut legacy = open_legacy(&caller, source).await;
            let accepted = caller
                .sse_post(source, &legacy.id, json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}))
                .await;
            assert_eq!(accepted.status, 202, "{accepted:?}");
            let init: Value =
                serde_json::from_str(&next_event(&mut legacy.stream, &mut legacy.buffer).await)
                    .expect("JSON");
            assert!(init["result"]["serverInfo"].is_object(), "{init}");
            *expected.get_mut(&tenant.name).expect("tenant has a tunnel") += 1;
            assert_eq!(streams_by_tenant(harness), expected);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cross_tenant_attempt_reads_exactly_like_a_source_that_does_not_exist() {
    let setup = setup().await;
    let harness = &setup.harness;

    // Every tenant opens sessions on its own `db` and its own source: Streamable HTTP and
    // HTTP+SSE. These are what the other tenants will try to reuse.
    let owned = open_owned_sessions(harness, &setup.tenants).await;
    let sessions_before = harness.state.sessions.len();
    let streams_before = streams_by_tenant(harness);

    let mut attempts = 0;
    for caller_tenant in &setup.tenants {
        let caller = Caller::new(harness, caller_tenant);
        // What a source and a session that do not exist look like to this caller.
        let typo_initialize = caller.initialize(TYPO).await;
        assert_eq!(typo_initialize.status, 404, "{typo_initialize:?}");
        let typo_list = caller.stateless_list(TYPO).await;
        assert_eq!(typo_list.status, 404, "{typo_list:?}");
        let typo_call = caller.stateless_call(TYPO, "x").await;
        assert_eq!(typo_call.status, 404, "{typo_call:?}");
        let typo_sse = caller.sse_open(TYPO).await;
        assert_eq!(typo_sse.status, 404, "{typo_sse:?}");

        for owner in owned.iter().filter(|o| o.tenant.name != caller_tenant.name) {
            let foreign = own_source(&owner.tenant);
            let who = format!("{} -> {}", caller_tenant.name, owner.tenant.name);

            // Another tenant's source, by name, in every era and transport.
            assert_eq!(
                caller.initialize(&foreign).await,
                typo_initialize,
                "{who}: initialize"
            );
            assert_eq!(
                caller.stateless_list(&foreign).await,
                typo_list,
                "{who}: stateless list"
            );
            assert_eq!(
                caller.stateless_call(&foreign, "x").await,
                typo_call,
                "{who}: stateless call"
            );
            assert_eq!(caller.sse_open(&foreign).await, typo_sse, "{who}: GET /sse");
            attempts += 4;

            attempts += stolen_sessions_read_like_missing_ones(&caller, &who, owner).await;
        }
    }
    assert_eq!(attempts, 3 * 2 * (4 + 2 * 2 * 4 + 2));
    assert_eq!(
        streams_by_tenant(harness),
        streams_before,
        "no cross-tenant attempt reached any tunnel"
    );
    assert_eq!(
        harness.state.sessions.len(),
        sessions_before,
        "no session was created or ended by another tenant"
    );

    // Every owner's sessions still work after all that.
    owners_sessions_still_work(harness, owned).await;
}

/// A tenant's own sessions: Streamable HTTP on `db` and on its own source, and HTTP+SSE.
struct Owned {
    tenant: TenantCreds,
    streamable: Vec<(String, Agent)>,
    legacy: LegacySession,
}

/// Every tenant opens sessions on its own `db` and its own source: Streamable HTTP and
/// HTTP+SSE.
async fn open_owned_sessions(harness: &Harness, tenants: &[TenantCreds]) -> Vec<Owned> {
    let mut owned = Vec::new();
    for tenant in tenants {
        let mut streamable = Vec::new();
        for source in [SHARED[0].to_owned(), own_source(tenant)] {
            let mut agent = Agent::new(&harness.url(&source), &tenant.api_key);
            assert_eq!(agent.initialize().await.status, 200);
            streamable.push((source, agent));
        }
        let legacy = open_legacy(&Caller::new(harness, tenant), SHARED[0]).await;
        owned.push(Owned {
            tenant: tenant.clone(),
            streamable,
            legacy,
        });
    }
    owned
}

/// Another tenant's session ids, on the source they belong to and on the caller's own source
/// of the same name, read like a session id that does not exist there; so do posts into its
/// HTTP+SSE session. Returns the attempts.
async fn stolen_sessions_read_like_missing_ones(
    caller: &Caller<'_>,
    who: &str,
    owner: &Owned,
) -> usize {
    let mut attempts = 0;
    // Another tenant's session ids: on the source they belong to and on the caller's
    // own source of the same name; against a session id that does not exist there.
    for (source, agent) in &owner.streamable {
        let stolen = agent.session.as_deref().expect("session id");
        for target in [source.as_str(), SHARED[1]] {
            for body in [echo(3, "stolen"), tools_list(4)] {
                assert_eq!(
                    caller.in_session(target, stolen, body.clone()).await,
                    caller.in_session(target, NO_SESSION, body).await,
                    "{who}: POST /mcp/{target} with a session of {source}"
                );
            }
            for verb in [Method::GET, Method::DELETE] {
                assert_eq!(
                    caller.session_verb(verb.clone(), target, stolen).await,
                    caller.session_verb(verb.clone(), target, NO_SESSION).await,
                    "{who}: {verb} /mcp/{target} with a session of {source}"
                );
            }
            attempts += 4;
        }
    }
    let stolen = owner.legacy.id.as_str();
    for body in [echo(5, "stolen"), tools_list(6)] {
        let attempt = caller.sse_post(SHARED[0], stolen, body.clone()).await;
        assert_eq!(attempt.status, 404, "{who}: {attempt:?}");
        assert_eq!(
            attempt,
            caller.sse_post(SHARED[0], NO_SESSION, body).await,
            "{who}: POST to the HTTP+SSE endpoint of another tenant's session"
        );
        attempts += 1;
    }
    attempts
}

/// Every owner's sessions still work.
async fn owners_sessions_still_work(harness: &Harness, owned: Vec<Owned>) {
    for mut owner in owned {
        for (source, agent) in &owner.streamable {
            let answer = agent
                .call_tool(9, "echo", json!({"message": "still mine"}))
                .await;
            assert_eq!(tool_text(answer.response()), "still mine", "{source}");
        }
        let caller = Caller::new(harness, &owner.tenant);
        let accepted = caller
            .sse_post(SHARED[0], &owner.legacy.id, json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}))
            .await;
        assert_eq!(accepted.status, 202, "{accepted:?}");
        let init: Value = serde_json::from_str(
            &next_event(&mut owner.legacy.stream, &mut owner.legacy.buffer).await,
        )
        .expect("JSON");
        assert_eq!(init["id"], 1, "{init}");
    }
}
