//! Echo round-trip latency and large-result throughput: straight to the upstream, through the
//! tunnel over QUIC, through the tunnel over the HTTPS fallback, and through a second relay
//! that writes every call to its audit trail (default durability) over QUIC, in one process and
//! one run so the four are measured under the same conditions.
//!
//! ```text
//! cargo run --release --example echo_latency -- [CALLS_PER_ROUND] [ROUNDS] [BLOB_MIB] [BLOBS]
//! ```
//!
//! It starts the built-in MCP server, a relay and two `connect`s on loopback (one forced to
//! QUIC, one to HTTPS, each serving the same upstream under its own source name), opens one
//! session-era session per path, and alternates rounds of sequential `echo` calls between the
//! paths so that drift in machine load hits all alike. Then it fetches `blob` results.

use std::time::{Duration, Instant};

/// The upstream: the demo tools on the rmcp SDK server, as the figures in BENCHMARKS.md were
/// measured.
#[path = "../tests/common/rmcp_upstream.rs"]
mod rmcp_upstream;

use mcp_tunnel::client::{self, ClientSettings};
use mcp_tunnel::config::{LimitsSection, SourceConfig, SourceTarget, TransportChoice};
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::govern::{Identity, Keyring, Policy, SecretHash};
use mcp_tunnel::relay::{Governance, Relay, RelaySettings};
use mcp_tunnel::transport::tls;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Session {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
    id: Option<String>,
}

impl Session {
    async fn post(&self, body: &Value) -> anyhow::Result<(reqwest::header::HeaderMap, Value)> {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(id) = &self.id {
            request = request
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", "2025-11-25");
        }
        let response = request.send().await?;
        let headers = response.headers().clone();
        let text = response.text().await?;
        // JSON, or SSE whose last data line is the response.
        let json_text = if text.trim_start().starts_with('{') {
            text.as_str()
        } else {
            text.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .rfind(|d| !d.is_empty())
                .unwrap_or("null")
        };
        Ok((
            headers,
            serde_json::from_str(json_text).unwrap_or(Value::Null),
        ))
    }

    async fn open(url: &str, key: Option<String>) -> anyhow::Result<Self> {
        let mut session = Self {
            http: reqwest::Client::new(),
            url: url.into(),
            key,
            id: None,
        };
        let (headers, _) = session
            .post(&json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"echo_latency","version":"0"}}}))
            .await?;
        session.id = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        session
            .post(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
            .await?;
        Ok(session)
    }

    async fn call(
        &self,
        id: u64,
        tool: &str,
        arguments: Value,
    ) -> anyhow::Result<(Duration, Value)> {
        let started = Instant::now();
        let (_, response) = self.post(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments}})).await?;
        Ok((started.elapsed(), response))
    }

    async fn echo(&self, id: u64) -> anyhow::Result<Duration> {
        let (elapsed, response) = self.call(id, "echo", json!({"message": "ping"})).await?;
        anyhow::ensure!(
            response["result"]["content"][0]["text"] == "ping",
            "unexpected answer: {response}"
        );
        Ok(elapsed)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>());
    let per_round = args.next().transpose()?.unwrap_or(500);
    let rounds = args.next().transpose()?.unwrap_or(4);
    let blob_mib = args.next().transpose()?.unwrap_or(8);
    let blobs = args.next().transpose()?.unwrap_or(8);
    let shutdown = CancellationToken::new();

    let upstream = rmcp_upstream::serve("127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let upstream_url = format!("http://{upstream}/mcp");
    let certs = mcp_tunnel::certs::generate(&[])?;
    let (token, key) = (new_secret("mcpt_tok_"), new_secret("mcpt_key_"));
    let keyring = || {
        let mut keyring = Keyring::default();
        keyring.add_tunnel_token(SecretHash::of(&token), "bench".into());
        keyring.add_api_key(
            SecretHash::of(&key),
            Identity {
                tenant: "bench".into(),
                subject: "bench".into(),
                roles: Vec::new().into(),
            },
        );
        keyring
    };
    let audit_dir = tempfile::tempdir()?;
    let audit = mcp_tunnel::govern::audit::AuditSettings::new(audit_dir.path().join("audit.db"));
    let mut agents = Vec::new();
    // The plain relay serves the `quic` and `https` sources, the audited one `audited`.
    for (audit, sources) in [
        (
            None,
            &[
                ("quic", TransportChoice::Quic),
                ("https", TransportChoice::Https),
            ][..],
        ),
        (Some(audit), &[("audited", TransportChoice::Quic)][..]),
    ] {
        let relay = Relay::bind(RelaySettings {
            tunnel_listen: "127.0.0.1:0".parse()?,
            identity: tls::Identity::from_pem(&certs.relay_pem, &certs.relay_key)?,
            agents_listen: "127.0.0.1:0".parse()?,
            admin_listen: None,
            governance: Governance {
                keyring: keyring(),
                policy: Policy::default(),
                limiter: Default::default(),
                limits: Default::default(),
            },
            limits: LimitsSection::default(),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            sse_keep_alive: Duration::from_secs(20),
            audit,
            fleet: Default::default(),
        })
        .await?;
        let (tunnel, state) = (relay.tunnel_addr(), relay.state().clone());
        agents.push(relay.agents_addr());
        tokio::spawn(relay.serve(shutdown.clone()));
        for (name, transport) in sources {
            let source = SourceConfig {
                name: (*name).into(),
                target: SourceTarget::Http(upstream_url.clone()),
                follow_cross_origin_redirects: false,
            };
            let mut settings = ClientSettings::new(tunnel.to_string(), token.clone(), vec![source]);
            settings.ca_pem = Some(certs.ca_pem.clone());
            settings.transport = *transport;
            settings.connections = 1;
            tokio::spawn(client::run(settings, shutdown.clone()));
            tokio::time::timeout(
                Duration::from_secs(15),
                state.registry.wait_for("bench", name),
            )
            .await?;
        }
    }
    let (plain, audited) = (agents[0], agents[1]);

    let paths = [
        (
            "direct to upstream",
            Session::open(&upstream_url, None).await?,
        ),
        (
            "relay + QUIC tunnel",
            Session::open(&format!("http://{plain}/mcp/quic"), Some(key.clone())).await?,
        ),
        (
            "relay + HTTPS fallback",
            Session::open(&format!("http://{plain}/mcp/https"), Some(key.clone())).await?,
        ),
        (
            "relay + QUIC + audit",
            Session::open(&format!("http://{audited}/mcp/audited"), Some(key.clone())).await?,
        ),
    ];
    for (_, session) in &paths {
        for i in 0..200 {
            session.echo(i).await?;
        }
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    let mut id = 1_000;
    for _ in 0..rounds {
        for (i, (_, session)) in paths.iter().enumerate() {
            for _ in 0..per_round {
                id += 1;
                times[i].push(session.echo(id).await?);
            }
        }
    }
    let size = blob_mib * 1024 * 1024;
    let mut throughput = Vec::new();
    for (_, session) in &paths {
        session.call(1, "blob", json!({"size": size})).await?; // warm-up
        let started = Instant::now();
        for i in 0..blobs {
            let (_, response) = session.call(2 + i, "blob", json!({"size": size})).await?;
            let text = response["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default();
            anyhow::ensure!(
                text.len() as u64 == size,
                "blob of {} bytes, expected {size}",
                text.len()
            );
        }
        throughput.push((size * blobs) as f64 / started.elapsed().as_secs_f64() / 1e6);
    }
    println!(
        "echo round trip: {} sequential calls per path (session era, loopback); blob: {blobs} x {blob_mib} MiB sequential",
        rounds * per_round
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>12}",
        "path", "p50 ms", "p90 ms", "p99 ms", "blob MB/s"
    );
    for (i, (name, _)) in paths.iter().enumerate() {
        times[i].sort();
        println!(
            "{:<24} {:>9.3} {:>9.3} {:>9.3} {:>12.0}",
            name,
            percentile(&times[i], 0.5),
            percentile(&times[i], 0.9),
            percentile(&times[i], 0.99),
            throughput[i]
        );
    }
    for (i, (name, _)) in paths.iter().enumerate().skip(1) {
        println!(
            "added by {name}: p50 {:+.3} ms, p99 {:+.3} ms; throughput {:.2}x direct",
            percentile(&times[i], 0.5) - percentile(&times[0], 0.5),
            percentile(&times[i], 0.99) - percentile(&times[0], 0.99),
            throughput[i] / throughput[0]
        );
    }
    println!(
        "added by the audit trail (QUIC, audited vs plain relay): p50 {:+.3} ms ({:+.1}%), p99 {:+.3} ms",
        percentile(&times[3], 0.5) - percentile(&times[1], 0.5),
        (percentile(&times[3], 0.5) / percentile(&times[1], 0.5) - 1.0) * 100.0,
        percentile(&times[3], 0.99) - percentile(&times[1], 0.99),
    );
    shutdown.cancel();
    Ok(())
}
