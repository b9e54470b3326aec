//! `mcp-tunnel bench`: an MCP load generator over Streamable HTTP, in both protocol eras.
//!
//! A run opens `sessions` sessions (session era: `initialize`, `Mcp-Session-Id`,
//! `notifications/initialized`; the stateless 2026-07-28 era needs none), then keeps
//! `concurrency` `tools/call` requests in flight, spread round-robin over the sessions, until
//! `calls` calls have finished or `duration` has passed. Every request has a timeout; every
//! failure is counted by kind, never raised. All sessions share one keep-alive connection pool
//! (HTTP/1.1), so the generator costs little next to what it measures.

mod client;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::wire::Era;

pub use client::{ClientError, Failure, McpClient, Session};
pub use report::{Report, Shape, Tally};

/// Default time one request (and its whole answer) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on one answer's body: room for a 256 MiB `blob` (the demo server's maximum)
/// and its JSON framing, while a runaway server cannot exhaust memory.
pub const DEFAULT_MAX_ANSWER: usize = 300 * 1024 * 1024;
/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// The message `echo` sends when neither `--args` nor `--payload` is given.
const DEFAULT_ECHO: &str = "hello";
/// The size `blob` is asked for when neither `--args` nor `--payload` is given.
const DEFAULT_BLOB: usize = 1024;

/// The names `bench --era` takes and its reports print, in the contract's words: `legacy` for
/// the session era (`initialize`, `Mcp-Session-Id`), `stateless` for 2026-07-28 (no
/// `initialize`; `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` on every request).
pub const ERA_NAMES: [&str; 2] = ["legacy", "stateless"];

/// The name of an era in `--era` and in reports (see [`ERA_NAMES`]).
pub fn era_name(era: Era) -> &'static str {
    match era {
        Era::Session => ERA_NAMES[0],
        Era::Stateless => ERA_NAMES[1],
    }
}

/// The era one of [`ERA_NAMES`] names; any other text is the session era, the default.
pub fn era_named(name: String) -> Era {
    if name == ERA_NAMES[1] {
        Era::Stateless
    } else {
        Era::Session
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After exactly this many calls.
    Calls(u64),
    /// Once this much time has passed (calls in flight then still finish).
    Duration(Duration),
}

/// A run's configuration.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The MCP endpoint (Streamable HTTP).
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub key: Option<String>,
    /// Sessions to open (session era); workers share them round-robin.
    pub sessions: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// When to stop.
    pub stop: Stop,
    /// The tool to call.
    pub tool: String,
    /// Its arguments.
    pub arguments: Value,
    /// The protocol era.
    pub era: Era,
    /// Bound on each request, answer included.
    pub timeout: Duration,
    /// Bound on each answer's body.
    pub max_answer: usize,
    /// Show a live progress bar on stderr.
    pub progress: bool,
}

/// Why a run could not start (failures during a run are counted instead).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The arguments do not fit the tool.
    #[error("{0}")]
    Arguments(String),
    /// A count that must be positive is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// The arguments for `tool`: `args` as given, or a payload of `payload` bytes (a string of that
/// size for `echo`, the `size` asked of `blob`), or a small default for the demo tools.
pub fn arguments(
    tool: &str,
    args: Option<Value>,
    payload: Option<usize>,
) -> Result<Value, BenchError> {
    match (args, payload, tool) {
        (Some(_), Some(_), _) => Err(BenchError::Arguments(
            "give --args or --payload, not both".into(),
        )),
        (Some(args), None, _) => Ok(args),
        (None, Some(n), "echo") => Ok(json!({ "message": "x".repeat(n) })),
        (None, Some(n), "blob") => Ok(json!({ "size": n })),
        (None, Some(_), other) => Err(BenchError::Arguments(format!(
            "--payload works with the echo and blob tools; give {other} its --args"
        ))),
        (None, None, "echo") => Ok(json!({ "message": DEFAULT_ECHO })),
        (None, None, "blob") => Ok(json!({ "size": DEFAULT_BLOB })),
        (None, None, "add") => Ok(json!({ "a": 1, "b": 2 })),
        (None, None, "sleep") => Ok(json!({ "ms": 1 })),
        (None, None, _) => Ok(json!({})),
    }
}

/// The body of every call, built once: only the id changes between calls.
struct CallBody {
    head: Vec<u8>,
}

impl CallBody {
    fn new(tool: &str, arguments: &Value, era: Era) -> Self {
        let mut params = json!({ "name": tool, "arguments": arguments });
        if era == Era::Stateless {
            params["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": crate::mcp::era::STATELESS_SINCE,
                "io.modelcontextprotocol/clientCapabilities": {},
            });
        }
        let head = format!(r#"{{"jsonrpc":"2.0","method":"tools/call","params":{params},"id":"#);
        Self {
            head: head.into_bytes(),
        }
    }

    fn with_id(&self, id: u64) -> Bytes {
        let id = id.to_string();
        let mut body = Vec::with_capacity(self.head.len() + id.len() + 1);
        body.extend_from_slice(&self.head);
        body.extend_from_slice(id.as_bytes());
        body.push(b'}');
        Bytes::from(body)
    }
}

/// Hands out calls until the run's end; shared by the workers.
struct Plan {
    stop: Stop,
    started: Instant,
    issued: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
}

impl Plan {
    /// The next call's number, or `None` when the run is over.
    fn next(&self) -> Option<u64> {
        match self.stop {
            Stop::Calls(n) => {
                let id = self.issued.fetch_add(1, Ordering::Relaxed);
                (id < n).then_some(id + 1)
            }
            Stop::Duration(d) => (self.started.elapsed() < d)
                .then(|| self.issued.fetch_add(1, Ordering::Relaxed) + 1),
        }
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(config: BenchConfig) -> Result<Report, BenchError> {
    if config.concurrency == 0 {
        return Err(BenchError::Zero("--concurrency"));
    }
    if config.sessions == 0 && config.era == Era::Session {
        return Err(BenchError::Zero("--sessions"));
    }
    let client = McpClient::new(
        &config.url,
        config.key.as_deref(),
        config.era,
        config.concurrency.max(config.sessions),
        config.timeout,
        config.max_answer,
    )?;
    let mut tally = Tally::default();

    // Session setup, `concurrency` at a time.
    let wanted = if config.era == Era::Session {
        config.sessions
    } else {
        1
    };
    let opened: Vec<Result<Session, Failure>> = futures_util::stream::iter(0..wanted)
        .map(|_| client.open_session())
        .buffer_unordered(config.concurrency)
        .collect()
        .await;
    let mut sessions = Vec::with_capacity(opened.len());
    for result in opened {
        match result {
            Ok(session) => sessions.push(session),
            Err(failure) => tally.setup_error(failure),
        }
    }
    let shape = Shape {
        era: era_name(config.era),
        tool: config.tool.clone(),
        sessions: if config.era == Era::Session {
            sessions.len()
        } else {
            0
        },
        concurrency: config.concurrency,
    };
    if sessions.is_empty() {
        return Ok(Report::new(shape, &tally, Duration::ZERO));
    }

    let body = Arc::new(CallBody::new(&config.tool, &config.arguments, config.era));
    let plan = Arc::new(Plan {
        stop: config.stop,
        started: Instant::now(),
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let progress = config
        .progress
        .then(|| progress_bar(config.stop, plan.clone()));
    let workers: Vec<_> = (0..config.concurrency)
        .map(|w| {
            let headers = client.headers(
                &sessions[w % sessions.len()],
                "tools/call",
                Some(&config.tool),
            );
            let (client, body, plan) = (client.clone(), body.clone(), plan.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while let Some(id) = plan.next() {
                    let started = Instant::now();
                    let outcome = client.call(headers.clone(), body.with_id(id)).await;
                    if outcome.result.is_err() {
                        plan.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    plan.done.fetch_add(1, Ordering::Relaxed);
                    tally.call(started.elapsed(), outcome.bytes, outcome.result);
                }
                tally
            })
        })
        .collect();
    for worker in workers {
        match worker.await {
            Ok(worker_tally) => tally.merge(worker_tally),
            // A worker only panics on a bug; its calls are lost, the run's report is not.
            Err(e) => tracing::error!(error = %e, "bench worker failed"),
        }
    }
    let elapsed = plan.started.elapsed();
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    futures_util::stream::iter(&sessions)
        .for_each_concurrent(config.concurrency, |session| client.close_session(session))
        .await;
    Ok(Report::new(shape, &tally, elapsed))
}

/// A progress bar on stderr redrawn from the plan's counters, and the task that redraws it.
fn progress_bar(stop: Stop, plan: Arc<Plan>) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let (length, template) = match stop {
        Stop::Calls(n) => (
            n,
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} calls {msg}",
        ),
        Stop::Duration(d) => (
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
    };
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    let ticker = tokio::spawn({
        let bar = bar.clone();
        async move {
            let mut interval = tokio::time::interval(PROGRESS_TICK);
            loop {
                interval.tick().await;
                let done = plan.done.load(Ordering::Relaxed);
                let failed = plan.failed.load(Ordering::Relaxed);
                let secs = plan.started.elapsed().as_secs_f64().max(f64::EPSILON);
                match stop {
                    Stop::Calls(_) => bar.set_position(done),
                    Stop::Duration(_) => bar.set_position(
                        u64::try_from(plan.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    ),
                }
                bar.set_message(format!(
                    "{done} calls, {:.0}/s, {failed} errors",
                    done as f64 / secs
                ));
            }
        }
    });
    (bar, ticker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_for_the_demo_tools() {
        assert_eq!(
            arguments("echo", None, Some(3)).expect("echo payload"),
            json!({"message": "xxx"})
        );
        assert_eq!(
            arguments("blob", None, Some(10)).expect("blob payload"),
            json!({"size": 10})
        );
        assert!(arguments("add", None, Some(1)).is_err());
        assert!(arguments("echo", Some(json!({})), Some(1)).is_err());
        assert_eq!(
            arguments("x", Some(json!({"k": 1})), None).expect("args"),
            json!({"k": 1})
        );
    }

    #[test]
    fn call_bodies_are_json_rpc_with_distinct_ids() {
        let body = CallBody::new("echo", &json!({"message": "hi"}), Era::Stateless);
        let value: Value = serde_json::from_slice(&body.with_id(42)).expect("JSON");
        assert_eq!(value["id"], 42);
        assert_eq!(value["method"], "tools/call");
        assert_eq!(value["params"]["name"], "echo");
        assert_eq!(value["params"]["arguments"]["message"], "hi");
        assert_eq!(
            value["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
    }

    #[test]
    fn a_plan_of_calls_hands_out_exactly_that_many() {
        let plan = Plan {
            stop: Stop::Calls(3),
            started: Instant::now(),
            issued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        };
        let ids: Vec<_> = std::iter::from_fn(|| plan.next()).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(plan.next(), None);
    }
}
