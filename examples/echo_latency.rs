//! Echo round-trip latency through the tunnel next to the same calls straight to the upstream,
//! in one process and one run, so the two are measured under the same conditions.
//!
//! ```text
//! cargo run --release --example echo_latency -- [CALLS_PER_ROUND] [ROUNDS]
//! ```
//!
//! It starts the demo (relay, connect and the built-in MCP server on loopback), opens one
//! session-era session on each path, and alternates rounds of sequential `echo` calls between
//! them so that drift in machine load hits both alike.

use std::time::{Duration, Instant};

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

    async fn echo(&self, id: u64) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let (_, response) = self.post(&json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"echo","arguments":{"message":"ping"}}})).await?;
        let elapsed = started.elapsed();
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
    let mut args = std::env::args().skip(1);
    let per_round: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500);
    let rounds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let shutdown = CancellationToken::new();
    let demo = mcp_tunnel::demo::start("127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let direct = Session::open(&demo.upstream_url, None).await?;
    let tunnel = Session::open(&demo.agent_url, Some(demo.api_key.clone())).await?;
    for i in 0..200 {
        direct.echo(i).await?;
        tunnel.echo(i).await?;
    }
    let (mut direct_times, mut tunnel_times) = (Vec::new(), Vec::new());
    let mut id = 1_000;
    for _ in 0..rounds {
        for _ in 0..per_round {
            id += 1;
            direct_times.push(direct.echo(id).await?);
        }
        for _ in 0..per_round {
            id += 1;
            tunnel_times.push(tunnel.echo(id).await?);
        }
    }
    direct_times.sort();
    tunnel_times.sort();
    println!(
        "echo round trip, {} sequential calls per path, session era, loopback",
        direct_times.len()
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "path", "p50 ms", "p90 ms", "p99 ms"
    );
    for (name, times) in [
        ("direct to upstream", &direct_times),
        ("relay + QUIC tunnel", &tunnel_times),
    ] {
        println!(
            "{:<28} {:>9.3} {:>9.3} {:>9.3}",
            name,
            percentile(times, 0.5),
            percentile(times, 0.9),
            percentile(times, 0.99)
        );
    }
    println!(
        "added by the tunnel: p50 {:+.3} ms, p99 {:+.3} ms",
        percentile(&tunnel_times, 0.5) - percentile(&direct_times, 0.5),
        percentile(&tunnel_times, 0.99) - percentile(&direct_times, 0.99)
    );
    shutdown.cancel();
    Ok(())
}
