//! The in-process test harness: a relay, `connect` clients and upstream MCP servers, all on
//! loopback ports the OS picks, torn down when dropped.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod rmcp_upstream;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mcp_tunnel::client::{self, ClientError, ClientSettings};
use mcp_tunnel::config::LimitsSection;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::govern::{Identity, Keyring, Policy, SecretHash};
use mcp_tunnel::relay::{Governance, Relay, RelaySettings, RelayState};
use mcp_tunnel::transport::tls;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use axum::http::HeaderMap;
use axum::response::IntoResponse;

pub mod audit;
mod config_relay;
pub mod fleet;
pub mod peers;
pub mod postgres;
pub mod recording;
pub mod sse;
pub use config_relay::*;

/// Bound on any single wait in a test: generous for a loaded CI machine, finite.
pub const WAIT: Duration = Duration::from_secs(30);

/// Tracing on, and a token that stops a test's tasks: cancelled when the guard returned with
/// it drops, when the test ends, passing or failing.
pub fn stop_on_drop() -> (CancellationToken, tokio_util::sync::DropGuard) {
    init_tracing();
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    (stop, guard)
}

/// Routes `tracing` to the test writer (shown for failing tests only).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mcp_tunnel=debug,warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Credentials of one test tenant.
#[derive(Clone)]
pub struct TenantCreds {
    pub name: String,
    pub api_key: String,
    /// A second API key of the tenant, of another subject (`second@TENANT`) with the same roles.
    pub second_key: String,
    pub tunnel_token: String,
}

impl TenantCreds {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            api_key: new_secret("mcpt_key_"),
            second_key: new_secret("mcpt_key_"),
            tunnel_token: new_secret("mcpt_tok_"),
        }
    }
}

/// The keyring of `tenants`: each one's tunnel token and API keys (of subjects `agent@TENANT`
/// and `second@TENANT`), the API keys of `acme` holding `acme_roles`.
fn keyring(acme: &TenantCreds, tenants: [&TenantCreds; 3], acme_roles: &[String]) -> Keyring {
    let mut keyring = Keyring::default();
    for tenant in tenants {
        keyring.add_tunnel_token(
            SecretHash::of(&tenant.tunnel_token),
            tenant.name.as_str().into(),
        );
        let roles: Vec<String> = if tenant.name == acme.name {
            acme_roles.to_vec()
        } else {
            Vec::new()
        };
        for (key, subject) in [(&tenant.api_key, "agent"), (&tenant.second_key, "second")] {
            keyring.add_api_key(
                SecretHash::of(key),
                Identity {
                    tenant: tenant.name.as_str().into(),
                    subject: format!("{subject}@{}", tenant.name).into(),
                    roles: roles.clone().into(),
                },
            );
        }
    }
    keyring
}

/// Knobs of a harness relay.
#[derive(Clone, Default)]
pub struct Options {
    pub limits: LimitsSection,
    /// The tenants' credentials, to share them between relays; fresh ones when `None`.
    pub creds: Option<(TenantCreds, TenantCreds)>,
    /// The audit trail (`[audit]`), off when `None`.
    pub audit: Option<mcp_tunnel::govern::audit::AuditSettings>,
    /// Roles of tenant `acme` (its API key holds them all); none when empty, so everything is
    /// allowed.
    pub acme_roles: Vec<(String, mcp_tunnel::govern::policy::Role)>,
    /// `[fleet]`: the instance id, the drain delay and the sealing keys; a single relay (no
    /// delay, keys of its own) by default.
    pub fleet: mcp_tunnel::relay::FleetSettings,
    /// The relay's certificates, shared with other relays (so one `connect` trusts them all);
    /// fresh ones when `None`.
    pub certs: Option<Arc<mcp_tunnel::certs::DevCerts>>,
    /// Where the tunnel listens (QUIC and the fallback); `127.0.0.1:0` when `None`.
    pub tunnel_listen: Option<SocketAddr>,
}

/// What the relays of one test fleet share: the sealing keys and the certificates.
#[derive(Clone)]
pub struct Fleet {
    pub keys: Arc<mcp_tunnel::relay::fleet::FleetKeys>,
    pub certs: Arc<mcp_tunnel::certs::DevCerts>,
}

impl Fleet {
    /// A fresh fleet secret and certificates.
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        Self {
            keys: Arc::new(mcp_tunnel::relay::fleet::FleetKeys::from_secrets(
                &secret,
                &[],
            )),
            certs: Arc::new(mcp_tunnel::certs::generate(&[]).expect("dev certificates")),
        }
    }

    /// Options of a relay of this fleet.
    pub fn options(&self) -> Options {
        Options {
            fleet: mcp_tunnel::relay::FleetSettings {
                keys: self.keys.clone(),
                ..Default::default()
            },
            certs: Some(self.certs.clone()),
            ..Options::default()
        }
    }
}

impl Options {
    /// The default knobs but for `limits`.
    pub fn with_limits(limits: LimitsSection) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }
}

/// A running relay with three tenants, `acme`, `other` and `globex` (the third for tests that
/// need more than a pair, such as the isolation matrix).
pub struct Harness {
    pub state: Arc<RelayState>,
    pub agents: SocketAddr,
    pub admin: SocketAddr,
    pub tunnel: SocketAddr,
    pub ca_pem: String,
    pub acme: TenantCreds,
    pub other: TenantCreds,
    pub third: TenantCreds,
    pub shutdown: CancellationToken,
    /// Stops the relay alone (the `connect`s stay); a child of `shutdown`.
    relay_stop: CancellationToken,
    relay_task: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    /// Starts a relay on loopback.
    pub async fn start(options: Options) -> Self {
        Self::try_start(options).await.expect("relay binds")
    }

    /// Starts a relay on loopback; fails when its addresses cannot be bound (a fixed
    /// [`Options::tunnel_listen`] port that is taken).
    pub async fn try_start(options: Options) -> Result<Self, mcp_tunnel::relay::RelayError> {
        init_tracing();
        let certs = match &options.certs {
            Some(certs) => certs.clone(),
            None => Arc::new(mcp_tunnel::certs::generate(&[]).expect("dev certificates")),
        };
        let (acme, other) = options
            .creds
            .clone()
            .unwrap_or_else(|| (TenantCreds::new("acme"), TenantCreds::new("other")));
        let third = TenantCreds::new("globex");
        let mut policy = Policy::default();
        if !options.acme_roles.is_empty() {
            policy.set_roles(
                acme.name.as_str().into(),
                options.acme_roles.iter().cloned().collect(),
            );
        }
        let acme_roles: Vec<String> = options.acme_roles.iter().map(|(n, _)| n.clone()).collect();
        let keyring = keyring(&acme, [&acme, &other, &third], &acme_roles);
        let relay = Relay::bind(RelaySettings {
            tunnel_listen: options
                .tunnel_listen
                .unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal")),
            identity: tls::Identity::from_pem(&certs.relay_pem, &certs.relay_key)
                .expect("relay identity"),
            agents_listen: "127.0.0.1:0".parse().expect("literal"),
            admin_listen: Some("127.0.0.1:0".parse().expect("literal")),
            governance: Governance {
                keyring,
                policy,
                limiter: Default::default(),
                limits: Default::default(),
            },
            limits: options.limits,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            sse_keep_alive: std::time::Duration::from_secs(
                mcp_tunnel::config::DEFAULT_SSE_KEEP_ALIVE_SECS,
            ),
            audit: options.audit.clone(),
            fleet: options.fleet.clone(),
        })
        .await?;
        let shutdown = CancellationToken::new();
        let (state, agents, admin, tunnel) = (
            relay.state().clone(),
            relay.agents_addr(),
            relay.admin_addr().expect("admin enabled"),
            relay.tunnel_addr(),
        );
        let relay_stop = shutdown.child_token();
        let relay_task = tokio::spawn({
            let relay_stop = relay_stop.clone();
            async move { relay.serve(relay_stop).await.expect("relay serves") }
        });
        Ok(Self {
            state,
            agents,
            admin,
            tunnel,
            ca_pem: certs.ca_pem.clone(),
            acme,
            other,
            third,
            shutdown,
            relay_stop,
            relay_task,
        })
    }

    /// Client settings for `tenant` serving `sources` (name, URL).
    pub fn client_settings(
        &self,
        tenant: &TenantCreds,
        sources: &[(&str, &str)],
    ) -> ClientSettings {
        quic_settings(self.tunnel, &tenant.tunnel_token, &self.ca_pem, sources)
    }

    /// Runs a `connect` for `tenant` and waits until the relay routes all its sources.
    pub async fn connect(&self, tenant: &TenantCreds, sources: &[(&str, &str)]) -> Client {
        self.connect_with(tenant, self.client_settings(tenant, sources))
            .await
    }

    /// Runs a `connect` with explicit settings and waits until its sources are routed.
    pub async fn connect_with(&self, tenant: &TenantCreds, settings: ClientSettings) -> Client {
        let names: Vec<String> = settings.sources.iter().map(|s| s.name.clone()).collect();
        let shutdown = self.shutdown.child_token();
        let task = tokio::spawn(client::run(settings, shutdown.clone()));
        for name in &names {
            tokio::time::timeout(WAIT, self.state.registry.wait_for(&tenant.name, name))
                .await
                .expect("tunnel comes up");
        }
        Client {
            shutdown,
            task: Some(task),
        }
    }

    /// The agent URL of `source`.
    pub fn url(&self, source: &str) -> String {
        format!("http://{}/mcp/{source}", self.agents)
    }

    /// Connects acme serving `source` from `upstream`; returns that `connect` and an agent
    /// with acme's API key at `source` (no session yet).
    pub async fn acme_serving(&self, source: &str, upstream: &str) -> (Client, Agent) {
        let client = self.connect(&self.acme, &[(source, upstream)]).await;
        (client, Agent::new(&self.url(source), &self.acme.api_key))
    }

    /// Closes, from the relay's side, the connection of the tunnel serving acme's `source`
    /// (there must be one), saying `reason`; returns the tunnel's id.
    pub fn drop_acme_tunnel(&self, source: &str, reason: &str) -> u64 {
        let tunnel = self.state.registry.route("acme", source).expect("routed");
        tunnel.connection.close(reason);
        tunnel.id
    }

    /// Opens the HTTP+SSE stream (`GET /sse/SOURCE`) of `source` with `key`; no timeout, the
    /// stream stays open.
    pub async fn sse(&self, source: &str, key: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("http://{}/sse/{source}", self.agents))
            .bearer_auth(key)
            .send()
            .await
            .expect("GET /sse")
    }

    /// The admin URL of `path` (`/metrics`, `/api/tunnels`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The text of the relay's `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = reqwest::Client::new()
            .get(self.admin_url("/metrics"))
            .timeout(WAIT)
            .send()
            .await
            .expect("/metrics answers");
        assert_eq!(response.status(), 200);
        response.text().await.expect("/metrics body")
    }

    /// Tells the relay alone to stop, as SIGTERM does: its `connect`s keep running.
    pub fn stop_relay(&self) {
        self.relay_stop.cancel();
    }

    /// Waits (bounded by [`WAIT`]) for the relay to stop by itself once told to
    /// ([`Harness::stop_relay`]); panics if it does not, or if it failed.
    pub async fn stopped(mut self) {
        let task = std::mem::replace(&mut self.relay_task, tokio::spawn(async {}));
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the relay stops in time")
            .expect("the relay task does not panic");
    }

    /// Stops the relay and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = std::mem::replace(&mut self.relay_task, tokio::spawn(async {}));
        let _ = tokio::time::timeout(WAIT, task).await;
    }
}

/// A running `connect`.
pub struct Client {
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ClientError>>>,
}

impl Client {
    /// Stops it and returns how it ended.
    pub async fn stop(mut self) -> Result<(), ClientError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("connect stops")
            .expect("connect task does not panic")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The demo tools on the rmcp reference server on loopback, stopped when the guard is dropped.
pub async fn guarded_demo_upstream() -> (String, tokio_util::sync::DropGuard) {
    let stop = CancellationToken::new();
    let url = demo_upstream(&stop).await;
    (url, stop.drop_guard())
}

/// The demo tools on the rmcp reference server ([`rmcp_upstream`]) on loopback; stops when the
/// token is cancelled.
pub async fn demo_upstream(shutdown: &CancellationToken) -> String {
    let addr = rmcp_upstream::serve(
        "127.0.0.1:0".parse().expect("literal"),
        shutdown.child_token(),
    )
    .await
    .expect("demo upstream binds");
    format!("http://{addr}/mcp")
}

/// What an agent request got back: status, headers, and the JSON-RPC messages of the body
/// (one for JSON, every `data` event for SSE).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub messages: Vec<Value>,
}

impl Answer {
    /// The message of the response's JSON-RPC error, empty when there is none.
    pub fn error_message(&self) -> String {
        self.response()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The last message: the response, for a request.
    pub fn response(&self) -> &Value {
        self.messages
            .last()
            .unwrap_or_else(|| panic!("no message in the answer: {self:?}"))
    }
}

/// A raw Streamable HTTP agent: exact control over headers and bodies.
#[derive(Clone)]
pub struct Agent {
    pub http: reqwest::Client,
    pub url: String,
    pub key: Option<String>,
    pub session: Option<String>,
    pub version: Option<String>,
}

impl Agent {
    pub fn new(url: &str, key: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: url.into(),
            key: Some(key.into()),
            session: None,
            version: None,
        }
    }

    /// A GET of the agent's stream, resuming after the event `last_event_id` when given; panics
    /// when it cannot be sent (`what` names it).
    pub async fn get(&self, last_event_id: Option<&str>, what: &str) -> reqwest::Response {
        let mut request = self.request(reqwest::Method::GET);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send().await.expect(what)
    }

    pub fn request(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, &self.url)
            .header("accept", "application/json, text/event-stream")
            .timeout(WAIT);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        if let Some(version) = &self.version {
            request = request.header("mcp-protocol-version", version);
        }
        request
    }

    /// POSTs a JSON value; returns the response, its body unread.
    pub async fn send(&self, body: &Value) -> reqwest::Response {
        self.request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("agent request is sent")
    }

    /// POSTs raw bytes.
    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> Answer {
        let response = self
            .request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("agent request is sent");
        read_answer(response).await
    }

    /// POSTs a JSON value.
    pub async fn post(&self, body: &Value) -> Answer {
        self.post_raw(body.to_string()).await
    }

    /// Session era: `initialize` then `notifications/initialized`; keeps the session id.
    pub async fn initialize(&mut self) -> Answer {
        let answer = self
            .post(&json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"test","version":"0"}}}))
            .await;
        if let Some(session) = answer.headers.get("mcp-session-id") {
            self.session = Some(session.to_str().expect("ascii session id").to_owned());
            self.version = Some("2025-11-25".into());
            let note = self
                .post(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
                .await;
            assert_eq!(
                note.status, 202,
                "initialized notification accepted: {note:?}"
            );
        }
        answer
    }

    /// [`Agent::initialize`], which must answer 200; returns the initialize result.
    pub async fn initialize_result(&mut self) -> Value {
        let init = self.initialize().await;
        assert_eq!(init.status, 200, "{init:?}");
        init.response()["result"].clone()
    }

    /// Calls a tool in the session era and returns the answer.
    pub async fn call_tool(&self, id: u64, tool: &str, arguments: Value) -> Answer {
        self.post(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments}})).await
    }

    /// The tool names `tools/list` (request `id`) shows, sorted.
    pub async fn tool_names(&self, id: u64) -> Vec<String> {
        let answer = self
            .post(&json!({"jsonrpc":"2.0","id":id,"method":"tools/list"}))
            .await;
        tool_names(answer.response())
    }

    /// Ends the session (`DELETE`); returns the status.
    pub async fn delete(&self) -> u16 {
        self.request(reqwest::Method::DELETE)
            .send()
            .await
            .expect("DELETE")
            .status()
            .as_u16()
    }

    /// Calls `echo` with `message`; returns the text it answered.
    pub async fn echo(&self, id: u64, message: &str) -> String {
        let answer = self
            .call_tool(id, "echo", json!({"message": message}))
            .await;
        tool_text(answer.response()).to_owned()
    }

    /// A stateless-era `server/discover` request (id 1, protocol 2026-07-28), not yet sent.
    pub fn discover(&self) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .header("mcp-method", "server/discover")
            .body(json!({"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string())
    }
}

/// An echo in `agent`'s session answers 200 with `message`.
pub async fn assert_echo(agent: &Agent, id: u64, message: &str) {
    let answer = agent
        .call_tool(id, "echo", json!({"message": message}))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(tool_text(answer.response()), message);
}

/// The tool names of a `tools/list` answer, sorted.
pub fn tool_names(answer: &Value) -> Vec<String> {
    let mut names: Vec<String> = answer["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("a tools/list result: {answer}"))
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// A harness with the demo upstream behind tenant `acme`'s source `demo`; the upstream stops
/// when the returned token is cancelled.
pub async fn harness_with_demo(options: Options) -> (Harness, Client, CancellationToken) {
    let upstreams = CancellationToken::new();
    let url = demo_upstream(&upstreams).await;
    let harness = Harness::start(options).await;
    let client = harness
        .connect(&harness.acme.clone(), &[("demo", &url)])
        .await;
    (harness, client, upstreams)
}

/// A known mix of calls in `agent`'s session, each answer checked: `echoes` echoes of
/// `message`, then `tool_errors` overflowing `add`s (the tool runs and fails: `isError`), then
/// `denied` calls of `blob`, which the caller's role does not allow (an unknown tool, -32602).
/// Ids count from 1.
pub async fn mixed_calls(agent: &Agent, message: &str, echoes: u64, tool_errors: u64, denied: u64) {
    let mut id = 0;
    for _ in 0..echoes {
        id += 1;
        let answer = agent
            .call_tool(id, "echo", json!({"message": message}))
            .await;
        assert_eq!(tool_text(answer.response()), message);
    }
    for _ in 0..tool_errors {
        id += 1;
        let answer = agent
            .call_tool(id, "add", json!({"a": i64::MAX, "b": 1}))
            .await;
        assert_eq!(answer.response()["result"]["isError"], true);
    }
    for _ in 0..denied {
        id += 1;
        let answer = agent.call_tool(id, "blob", json!({"size": 1})).await;
        assert_eq!(answer.response()["error"]["code"], -32602);
    }
}

/// Reads a response as JSON or SSE.
pub async fn read_answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let is_sse = is_event_stream(&headers);
    let body = tokio::time::timeout(WAIT, response.bytes())
        .await
        .expect("answer arrives in time")
        .expect("body reads");
    let messages = if is_sse {
        sse_data(&body)
            .into_iter()
            .map(|d| serde_json::from_str(&d).expect("SSE data is JSON"))
            .collect()
    } else if body.is_empty() {
        Vec::new()
    } else {
        vec![
            serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("JSON body ({e}): {}", String::from_utf8_lossy(&body))),
        ]
    };
    Answer {
        status,
        headers,
        messages,
    }
}

/// Whether `headers` say the body is an event stream.
pub fn is_event_stream(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The `data` of every non-empty SSE event in `body`.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty() && data.iter().any(|d| !d.is_empty())).then(|| data.join("\n"))
        })
        .collect()
}

/// The value of the unlabelled counter `name` in a Prometheus text exposition (0 when absent).
pub fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The text of the first content block of a tool result.
pub fn tool_text(response: &Value) -> &str {
    response["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("a text tool result: {response}"))
}

/// A child process killed (by its PID) and reaped when dropped.
pub struct Child(pub tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Spawns `command` with piped stdout and stderr, killed on drop.
pub fn spawn(command: &mut tokio::process::Command) -> Child {
    Child(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn child process"),
    )
}

/// Runs `mcp-tunnel ARGS` to its end (bounded by [`WAIT`], killed if the wait ends) and
/// returns its output.
pub async fn run_cli(args: &[&str]) -> std::process::Output {
    run_cli_within(args, WAIT).await
}

/// Runs `mcp-tunnel ARGS` to its end (bounded by `bound`, killed if the wait ends) and returns
/// its output.
pub async fn run_cli_within(args: &[&str], bound: Duration) -> std::process::Output {
    tokio::time::timeout(
        bound,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command ends in time")
    .expect("the binary runs")
}

/// `GET url` without credentials (bounded by [`WAIT`]).
pub async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .timeout(WAIT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url} is sent: {e}"))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A long-running peer process: every output line is logged and offered to `wait_for_line`.
pub struct Peer {
    name: &'static str,
    /// The process (killed on drop).
    pub child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Peer {
    /// Spawns `command` (killed on drop) and starts draining its stdout and stderr.
    pub fn start(name: &'static str, command: &mut tokio::process::Command) -> Self {
        let mut child = spawn(command);
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.0.stdout.take().expect("stdout is piped");
        let stderr = child.0.stderr.take().expect("stderr is piped");
        tokio::spawn(Self::drain(stdout, tx.clone(), log.clone()));
        tokio::spawn(Self::drain(stderr, tx, log.clone()));
        Self {
            name,
            child,
            lines,
            log,
        }
    }

    async fn drain(
        pipe: impl tokio::io::AsyncRead + Unpin,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
        log: Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(pipe));
        while let Ok(Some(line)) = lines.next_line().await {
            let line = strip_ansi(&line);
            log.lock().expect("log lock").push(line.clone());
            let _ = tx.send(line);
        }
    }

    /// Everything the peer printed so far.
    pub fn output(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The rest of the first line starting with `prefix`, trimmed (the value it prints).
    pub async fn line_after(&mut self, prefix: &str) -> String {
        self.wait_for_line(prefix, |line| line.starts_with(prefix))
            .await
            .trim_start_matches(prefix)
            .trim()
            .to_owned()
    }

    /// Waits (bounded by `WAIT`) for the first line `matches` accepts and returns it.
    pub async fn wait_for_line(&mut self, what: &str, matches: impl FnMut(&str) -> bool) -> String {
        self.try_wait_for_line(what, matches)
            .await
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Peer::wait_for_line`], but an exit before the line (or no line within `WAIT`) is an
    /// error saying so, with the output, instead of a panic: for a caller that retries.
    pub async fn try_wait_for_line(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                if matches(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => Ok(line),
            Ok(None) => {
                let status = tokio::time::timeout(WAIT, self.child.0.wait()).await;
                Err(format!(
                    "{} exited ({status:?}) before printing {what}; output:\n{}",
                    self.name,
                    self.output()
                ))
            }
            Err(_) => Err(format!(
                "{} did not print {what} within {:?}; output:\n{}",
                self.name,
                WAIT,
                self.output()
            )),
        }
    }

    /// The process's PID.
    pub fn pid(&self) -> i32 {
        let pid = self.child.0.id().expect("the process has not been reaped");
        i32::try_from(pid).expect("a PID fits in pid_t")
    }

    /// Sends `signal` to the process by its PID.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the PID of our own unreaped child and a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits (until `deadline`) for the process to exit; kills it and panics with its output
    /// otherwise.
    pub async fn exit_status(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> std::process::ExitStatus {
        match tokio::time::timeout_at(deadline, self.child.0.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for {}: {e}", self.name),
            Err(_) => {
                let _ = self.child.0.start_kill();
                panic!(
                    "{} did not exit in time after a signal (killed); output:\n{}",
                    self.name,
                    self.output()
                )
            }
        }
    }

    /// Kills the process by its PID and reaps it.
    pub async fn stop(mut self) {
        let _ = self.child.0.start_kill();
        let status = tokio::time::timeout(WAIT, self.child.0.wait()).await;
        assert!(status.is_ok(), "{} was not reaped after a kill", self.name);
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), should a log be colored after all.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Serves `app` on a loopback port the OS picks until `shutdown` is cancelled; returns the
/// address.
pub async fn serve_axum(app: axum::Router, shutdown: &CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    addr
}

/// Asserts `headers` (of a request an upstream got; `what` names it) hold no Authorization
/// header and no value containing any of `secrets` (the caller's credentials).
pub fn assert_no_credentials(headers: &HeaderMap, secrets: &[&str], what: &str) {
    assert!(
        headers.get("authorization").is_none(),
        "{what}: no Authorization upstream"
    );
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            secrets.iter().all(|secret| !value.contains(secret)),
            "{what}: header {name} carries the agent's credentials"
        );
    }
}

/// Every request the scripted upstream saw: the JSON-RPC method, the headers, and when it
/// arrived.
pub type Seen = Arc<std::sync::Mutex<Vec<(String, HeaderMap, std::time::SystemTime)>>>;

/// The scripted upstreams' answer to `message` (of JSON-RPC `method`): `initialize` opens
/// session `upstream-1`, `tools/call` answers the text `tool_text`, anything else is accepted
/// (202).
fn scripted_answer(message: &Value, method: &str, tool_text: &str) -> axum::response::Response {
    let result = match method {
        "initialize" => {
            json!({"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"scripted","version":"1"}})
        }
        "tools/call" => json!({"content":[{"type":"text","text":tool_text}]}),
        _ => return axum::http::StatusCode::ACCEPTED.into_response(),
    };
    let mut response: axum::response::Response = (
        [("content-type", "application/json")],
        json!({"jsonrpc":"2.0","id":message["id"],"result":result}).to_string(),
    )
        .into_response();
    response.headers_mut().insert(
        "mcp-session-id",
        axum::http::HeaderValue::from_static("upstream-1"),
    );
    response
}

/// The gate of [`start_gated_upstream`]: calls of the tool `hold` wait at it until it opens.
#[derive(Clone, Default)]
pub struct Gate {
    arrived: Arc<tokio::sync::Notify>,
    open: CancellationToken,
    /// What goes out on the upstream's standalone GET streams.
    notes: Arc<tokio::sync::Mutex<Option<tokio::sync::broadcast::Sender<String>>>>,
}

impl Gate {
    /// Waits (bounded by [`WAIT`]) until a `hold` call reached the upstream.
    pub async fn held(&self) {
        tokio::time::timeout(WAIT, self.arrived.notified())
            .await
            .expect("a hold call reaches the upstream");
    }

    /// Lets every `hold` call, waiting or to come, answer.
    pub fn release(&self) {
        self.open.cancel();
    }

    /// Sends a `notifications/message` whose data is `text` on the upstream's GET stream,
    /// once one is open (waits for it, bounded by [`WAIT`]).
    pub async fn notify(&self, text: &str) {
        let note = json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":text}});
        let sent = async {
            loop {
                if let Some(notes) = self.notes.lock().await.as_ref()
                    && notes.receiver_count() > 0
                {
                    let _ = notes.send(note.to_string());
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(WAIT, sent)
            .await
            .expect("the upstream's GET stream opens");
    }
}

/// A minimal Streamable HTTP upstream whose `tools/call` of `hold` answers `released` only
/// once the returned [`Gate`] opens (or after [`WAIT`]); every other tool answers `served` at
/// once. It records every request (see [`Seen`]), settles `initialize` on the version the
/// client asked for, and serves a standalone GET stream on which [`Gate::notify`] sends.
pub async fn start_gated_upstream(shutdown: &CancellationToken) -> (String, Gate, Seen) {
    let gate = Gate::default();
    let seen = Seen::default();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post({
            let (gate, seen) = (gate.clone(), seen.clone());
            move |headers: HeaderMap, body: String| {
                let (gate, seen) = (gate.clone(), seen.clone());
                async move {
                    let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    let method = message["method"].as_str().unwrap_or_default();
                    seen.lock().expect("lock").push((
                        method.to_owned(),
                        headers,
                        std::time::SystemTime::now(),
                    ));
                    if message["params"]["name"] == "hold" {
                        gate.arrived.notify_one();
                        let _ = tokio::time::timeout(WAIT, gate.open.cancelled()).await;
                        return scripted_answer(&message, method, "released");
                    }
                    let mut answer = scripted_answer(&message, method, "served");
                    if method == "initialize" {
                        let asked = message["params"]["protocolVersion"].clone();
                        answer = (
                            [("content-type", "application/json"), ("mcp-session-id", "upstream-1")],
                            json!({"jsonrpc":"2.0","id":message["id"],"result":{"protocolVersion":asked,"capabilities":{"tools":{}},"serverInfo":{"name":"gated","version":"1"}}}).to_string(),
                        )
                            .into_response();
                    }
                    answer
                }
            }
        }),
    );
    let (notes, _) = tokio::sync::broadcast::channel::<String>(64);
    *gate.notes.try_lock().expect("nobody else holds it yet") = Some(notes.clone());
    let app = app.route(
        "/mcp",
        axum::routing::get(move |headers: HeaderMap| {
            let notes = notes.subscribe();
            async move {
                // Only a session's GET stream: a GET without one is how `connect` tells an
                // HTTP+SSE server from a Streamable HTTP one.
                if !headers.contains_key("mcp-session-id") {
                    return axum::http::StatusCode::METHOD_NOT_ALLOWED.into_response();
                }
                let events = futures_util::stream::unfold(notes, |mut notes| async move {
                    let note = notes.recv().await.ok()?;
                    let event = format!("event: message\ndata: {note}\n\n");
                    Some((Ok::<_, std::convert::Infallible>(event), notes))
                });
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::from_stream(events),
                )
                    .into_response()
            }
        }),
    );
    let addr = serve_axum(app, shutdown).await;
    (format!("http://{addr}/mcp"), gate, seen)
}

/// A minimal Streamable HTTP upstream that records the headers of every request.
pub async fn start_recording_upstream(shutdown: &CancellationToken) -> (String, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let record = record.clone();
            async move {
                let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let method = message["method"].as_str().unwrap_or_default().to_owned();
                record.lock().expect("lock").push((
                    method.clone(),
                    headers,
                    std::time::SystemTime::now(),
                ));
                scripted_answer(&message, &method, "recorded")
            }
        }),
    );
    let addr = serve_axum(app, shutdown).await;
    (format!("http://{addr}/mcp"), seen)
}

/// Nearest-rank percentile `p` (0-100) of `values`; `NaN` when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted
        .get(rank.min(sorted.len()).wrapping_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

/// User + system CPU time of process `pid` so far, in microseconds (`/proc/PID/stat`).
pub fn cpu_micros(pid: i32) -> u64 {
    stat_cpu_micros(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time in the `/proc` stat file at `path` (a process's, or a thread's under
/// `/proc/PID/task/TID/stat`), in microseconds; 0 when it cannot be read.
pub fn stat_cpu_micros(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after the last ')';
    // utime and stime are fields 14 and 15 of proc(5), so 12 and 13 after the name.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf with a valid name has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / per_sec
}

/// CPU time so far (µs) of this process's threads named `name` (`/proc/self/task/*/comm`).
pub fn thread_cpu_micros(name: &str) -> u64 {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .map(|task| stat_cpu_micros(&task.path().join("stat").display().to_string()))
        .sum()
}
