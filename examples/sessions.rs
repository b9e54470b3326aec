//! Session workloads for `benches/compare.sh` that `mcp-tunnel bench` does not cover: many
//! open idle sessions, and the time a new session takes to its first answer.
//!
//! ```text
//! sessions hold --url URL [--key KEY] --counts 1000,10000 [--concurrency 64]
//!     opens session-era sessions (initialize + notifications/initialized) until COUNT are
//!     open, prints `held COUNT failed F secs S`, and waits for a line on stdin before going
//!     on to the next count; after the last, one more line makes it DELETE every session and
//!     print `closed N`. A closed stdin (or no line within 10 minutes) ends the wait too.
//! sessions first-call --url URL [--key KEY] [--count 200]
//!     on an established HTTP connection, alternately: a new session and its first `echo` call
//!     (initialize, notifications/initialized, tools/call, timed as one), and one `echo` call on
//!     an already open session. Prints one JSON line with both latencies (p50, p99, ms).
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use mcp_tunnel::bench::{McpClient, Session};
use mcp_tunnel::wire::Era;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Bound on each request.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on an answer's body (these are small).
const MAX_ANSWER: usize = 1 << 20;
/// How long `hold` waits for the go-ahead on stdin.
const STEP_WAIT: Duration = Duration::from_secs(600);
/// The echo call's body; the id is irrelevant to the server.
const ECHO: &[u8] =
    br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello"}}}"#;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Open and hold idle sessions, step by step.
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long)]
        key: Option<String>,
        /// Totals to reach, in increasing order.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        counts: Vec<usize>,
        /// Sessions opened at once (and HTTP connections).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Time a new session's first call against a call on an open session.
    FirstCall {
        #[arg(long)]
        url: String,
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Hold {
            url,
            key,
            counts,
            concurrency,
        } => hold(&url, key.as_deref(), &counts, concurrency.max(1)).await,
        Mode::FirstCall { url, key, count } => first_call(&url, key.as_deref(), count).await,
    }
}

async fn hold(
    url: &str,
    key: Option<&str>,
    counts: &[usize],
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = McpClient::new(url, key, Era::Session, concurrency, TIMEOUT, MAX_ANSWER)?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut sessions: Vec<Session> = Vec::new();
    for &count in counts {
        let started = Instant::now();
        let wanted = count.saturating_sub(sessions.len());
        let opened: Vec<_> = futures_util::stream::iter(0..wanted)
            .map(|_| client.open_session())
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut failed = 0;
        for result in opened {
            match result {
                Ok(session) => sessions.push(session),
                Err(_) => failed += 1,
            }
        }
        println!(
            "held {} failed {failed} secs {:.2}",
            sessions.len(),
            started.elapsed().as_secs_f64()
        );
        let _ = tokio::time::timeout(STEP_WAIT, stdin.next_line()).await;
    }
    futures_util::stream::iter(&sessions)
        .for_each_concurrent(concurrency, |session| client.close_session(session))
        .await;
    println!("closed {}", sessions.len());
    Ok(())
}

async fn first_call(url: &str, key: Option<&str>, count: usize) -> anyhow::Result<()> {
    let client = McpClient::new(url, key, Era::Session, 1, TIMEOUT, MAX_ANSWER)?;
    // Establishes the HTTP connection (and, through a tunnel, proves it up) before timing.
    let open = client
        .open_session()
        .await
        .map_err(|f| anyhow::anyhow!("{f}"))
        .context("first session")?;
    let call_headers = client.headers(&open, "tools/call", Some("echo"));
    let mut new_session = Histogram::<u64>::new(3)?;
    let mut on_open = Histogram::<u64>::new(3)?;
    for _ in 0..count.max(1) {
        let started = Instant::now();
        let session = client
            .open_session()
            .await
            .map_err(|f| anyhow::anyhow!("{f}"))
            .context("new session")?;
        let outcome = client
            .call(
                client.headers(&session, "tools/call", Some("echo")),
                Bytes::from_static(ECHO),
            )
            .await;
        let elapsed = started.elapsed();
        if let Err(f) = outcome.result {
            bail!("first call failed: {f}");
        }
        new_session.record(micros(elapsed))?;
        client.close_session(&session).await;

        let started = Instant::now();
        let outcome = client
            .call(call_headers.clone(), Bytes::from_static(ECHO))
            .await;
        if let Err(f) = outcome.result {
            bail!("call failed: {f}");
        }
        on_open.record(micros(started.elapsed()))?;
    }
    client.close_session(&open).await;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "count": new_session.len(),
            "first_call_p50_ms": ms(&new_session, 0.5),
            "first_call_p99_ms": ms(&new_session, 0.99),
            "call_p50_ms": ms(&on_open, 0.5),
            "call_p99_ms": ms(&on_open, 0.99),
        })
    );
    Ok(())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
