//! `mcp-tunnel bench`, the real binary, against `mcp-tunnel demo --upstream-only` (a child
//! process, stopped by its PID) and through the in-process relay, in both protocol eras.
//!
//! The contract checked here: `--json` prints one object whose `calls` is exactly the number
//! asked for; failures (a bad key, a dead URL) are counted by kind in `errors_by_kind`, the
//! report is still printed, and the process exits non-zero with a message on stderr.

mod common;

use std::process::Stdio;

use common::{Harness, Options, Peer, WAIT};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
const CALLS: u64 = 200;

/// Starts `demo --upstream-only` on a free loopback port and returns it with its URL.
async fn upstream() -> (Peer, String) {
    let mut peer = Peer::start(
        "demo --upstream-only",
        tokio::process::Command::new(BIN).args([
            "demo",
            "--upstream-only",
            "--listen",
            "127.0.0.1:0",
        ]),
    );
    let line = peer
        .wait_for_line("its URL", |l| l.contains("http://"))
        .await;
    let url = line[line.find("http://").expect("a URL in the line")..]
        .trim()
        .to_owned();
    (peer, url)
}

/// What one bench run gave: its exit success, its JSON report and its stderr.
struct Run {
    success: bool,
    report: Value,
    stderr: String,
}

/// Runs `mcp-tunnel bench --json ARGS` to completion (bounded by `WAIT`).
async fn bench(args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("bench")
        .arg("--json")
        .args(args)
        .env_remove("MCP_TUNNEL_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("bench finishes in time")
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {stdout}\nstderr: {stderr}"));
    Run {
        success: output.status.success(),
        report,
        stderr,
    }
}

impl Run {
    /// A failed run: it exits non-zero, with `calls` calls and `count` errors of `kind`.
    fn assert_failed(&self, calls: u64, kind: &str, count: u64) {
        assert!(
            !self.success,
            "a failed run exits non-zero: {}",
            self.report
        );
        assert_eq!(self.report["calls"], calls, "{}", self.report);
        assert_eq!(
            self.report["errors_by_kind"][kind], count,
            "{}",
            self.report
        );
    }
}

fn number(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is a number: {report}"))
}

/// A clean run: exactly `CALLS` calls, none failed, and figures that hang together.
fn assert_clean(run: &Run, era: &str) {
    let report = &run.report;
    assert!(run.success, "exit status: {}\n{report}", run.stderr);
    assert_eq!(report["era"], era, "{report}");
    assert_eq!(report["calls"], CALLS, "{report}");
    assert_eq!(report["ok"], CALLS, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["errors_by_kind"], serde_json::json!({}), "{report}");
    let (p50, p90, p99, max) = (
        number(report, "p50_ms"),
        number(report, "p90_ms"),
        number(report, "p99_ms"),
        number(report, "max_ms"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{report}"
    );
    assert!(number(report, "calls_per_sec") > 0.0, "{report}");
    assert!(number(report, "mb_per_sec") > 0.0, "{report}");
    assert!(number(report, "response_bytes") > 0.0, "{report}");
}

/// A clean run of `CALLS` calls in `era` against `url` by 8 workers, with `extra` arguments.
async fn clean_run(url: &str, era: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--url",
        url,
        "--era",
        era,
        "--calls",
        "200",
        "--concurrency",
        "8",
    ];
    args.extend_from_slice(extra);
    let run = bench(&args).await;
    assert_clean(&run, era);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_eras_against_the_upstream_directly() {
    let (upstream, url) = upstream().await;
    for era in ["legacy", "stateless"] {
        let run = clean_run(&url, era, &[]).await;
        if era == "legacy" {
            assert_eq!(run.report["sessions"], 8, "one session per worker");
        }
    }
    // A payload asked of `blob` comes back whole: every answer carries at least its bytes.
    let run = clean_run(&url, "legacy", &["--tool", "blob", "--payload", "100000"]).await;
    assert!(number(&run.report, "response_bytes") >= (CALLS * 100_000) as f64);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_eras_through_the_relay_and_a_bad_key_is_counted() {
    let (upstream, url) = upstream().await;
    let harness = Harness::start(Options::default()).await;
    let _client = harness
        .connect(&harness.acme.clone(), &[("demo", &url)])
        .await;
    let agent_url = harness.url("demo");
    for era in ["legacy", "stateless"] {
        clean_run(
            &agent_url,
            era,
            &["--key", &harness.acme.api_key, "--sessions", "4"],
        )
        .await;
    }

    // Stateless: every call is refused with 401 and counted as such.
    let run = bench(&[
        "--url",
        &agent_url,
        "--key",
        "mcpt_key_wrong",
        "--era",
        "stateless",
        "--calls",
        "20",
    ])
    .await;
    run.assert_failed(20, "http 401", 20);
    assert_eq!(run.report["errors"], 20, "{}", run.report);
    assert!(
        run.stderr.contains("20 of 20 requests failed"),
        "{}",
        run.stderr
    );

    // Legacy: no session opens, so no call is made; the failed initializes are the errors.
    let run = bench(&[
        "--url",
        &agent_url,
        "--key",
        "mcpt_key_wrong",
        "--calls",
        "20",
        "--concurrency",
        "2",
    ])
    .await;
    run.assert_failed(0, "initialize: http 401", 2);
    harness.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_url_is_counted_as_transport_errors() {
    let dead = format!("http://127.0.0.1:{}/mcp", common::free_port());
    let run = bench(&[
        "--url",
        &dead,
        "--era",
        "stateless",
        "--calls",
        "10",
        "--timeout",
        "5",
    ])
    .await;
    run.assert_failed(10, "transport: connect", 10);
    assert!(run.stderr.contains("requests failed"), "{}", run.stderr);
}
