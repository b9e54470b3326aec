//! The tunnel against real third-party MCP peers: the official Python SDK (client and
//! `MCPServer`), the reference `server-everything` and the Inspector CLI.
//!
//! The peers are pinned in `tests/peers/` and installed by `scripts/install-peers.sh`. A
//! missing peer fails the test (it is never skipped).

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Bound on one run of a peer CLI (interpreter start-up included).
const RUN_WAIT: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "run scripts/install-peers.sh to install the test peers";

/// `tests/peers`.
fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("peers")
}

/// `path` under `tests/peers`, which must exist.
fn peer_file(relative: &str) -> PathBuf {
    let path = peers_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: {INSTALL_HINT}",
        path.display()
    );
    path
}

/// The venv's Python interpreter.
fn python() -> PathBuf {
    peer_file(".venv/bin/python")
}

/// `node` from `PATH`, which must be there.
fn node() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("node"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!("node is not on PATH: install Node.js >= 20, then {INSTALL_HINT}")
    })
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A long-running peer process: every output line is logged and offered to `wait_for_line`.
struct Peer {
    name: &'static str,
    child: common::Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    /// Spawns `command` (killed on drop) and starts draining its stdout and stderr.
    fn start(name: &'static str, command: &mut Command) -> Self {
        let mut child = common::spawn(command);
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
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
        pipe: impl AsyncRead + Unpin,
        tx: mpsc::UnboundedSender<String>,
        log: Arc<Mutex<Vec<String>>>,
    ) {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock().expect("log lock").push(line.clone());
            let _ = tx.send(line);
        }
    }

    /// Everything the peer printed so far.
    fn output(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits (bounded by `common::WAIT`) for the first line `matches` accepts and returns it.
    async fn wait_for_line(&mut self, what: &str, mut matches: impl FnMut(&str) -> bool) -> String {
        let found = tokio::time::timeout(common::WAIT, async {
            while let Some(line) = self.lines.recv().await {
                if matches(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = tokio::time::timeout(common::WAIT, self.child.0.wait()).await;
                panic!(
                    "{} exited ({status:?}) before printing {what}; output:\n{}",
                    self.name,
                    self.output()
                )
            }
            Err(_) => panic!(
                "{} did not print {what} within {:?}; output:\n{}",
                self.name,
                common::WAIT,
                self.output()
            ),
        }
    }

    /// Kills the process by its PID and reaps it.
    async fn stop(mut self) {
        let _ = self.child.0.start_kill();
        let status = tokio::time::timeout(common::WAIT, self.child.0.wait()).await;
        assert!(status.is_ok(), "{} was not reaped after a kill", self.name);
    }
}

/// What a finished peer CLI run left behind.
struct Ran {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Asserts a zero exit status.
    fn succeeded(self) -> Self {
        assert!(
            self.status.success(),
            "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout parsed as one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.what, self.stdout, self.stderr
            )
        })
    }
}

/// Runs `command` to completion (bounded by `RUN_WAIT`; killed if it takes longer).
async fn run(what: String, command: &mut Command) -> Ran {
    let mut child = common::spawn(command);
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    let mut stderr = child.0.stderr.take().expect("stderr is piped");
    let finished = tokio::time::timeout(RUN_WAIT, async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (read_out, read_err) =
            tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        read_out.and(read_err)?;
        let status = child.0.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    })
    .await;
    match finished {
        Ok(Ok((status, out, err))) => Ran {
            what,
            status,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        },
        Ok(Err(e)) => panic!("{what}: reading its output failed: {e}"),
        Err(_) => panic!("{what} did not finish within {RUN_WAIT:?}"),
    }
}

/// What `tests/peers/client.py` (the Python SDK client) reported.
struct PyClient {
    negotiated: String,
    tools: Vec<String>,
    call: String,
    is_error: bool,
}

/// Runs the Python SDK client against `url` in `mode` (`legacy`, `auto` or a version) and
/// calls `echo` with `{"message": "hi"}`.
async fn python_client(url: &str, key: &str, mode: &str) -> PyClient {
    python_client_call(url, key, mode, None).await
}

/// Like [`python_client`], calling `tool` with `arguments` instead when given.
async fn python_client_call(
    url: &str,
    key: &str,
    mode: &str,
    tool: Option<(&str, &str)>,
) -> PyClient {
    let mut command = Command::new(python());
    command.arg(peer_file("client.py")).args([url, key, mode]);
    if let Some((name, arguments)) = tool {
        command.args([name, arguments]);
    }
    let ran = run(format!("client.py {url} {mode}"), &mut command)
        .await
        .succeeded();
    let facts: HashMap<&str, Value> = ran
        .stdout
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(key, value)| {
            let value = serde_json::from_str(value)
                .unwrap_or_else(|e| panic!("client.py printed {key} as non-JSON ({e}): {value}"));
            (key, value)
        })
        .collect();
    let fact = |key: &str| {
        facts.get(key).cloned().unwrap_or_else(|| {
            panic!(
                "client.py printed no `{key}`:\nstdout:\n{}\nstderr:\n{}",
                ran.stdout, ran.stderr
            )
        })
    };
    let parsed = PyClient {
        negotiated: serde_json::from_value(fact("negotiated")).expect("negotiated is a string"),
        tools: serde_json::from_value(fact("tools")).expect("tools is a list of names"),
        call: serde_json::from_value(fact("call")).expect("call is a string"),
        is_error: serde_json::from_value(fact("is_error")).expect("is_error is a bool"),
    };
    assert!(
        !parsed.is_error,
        "the tool call through {url} ({mode}) is not an error; stdout:\n{}",
        ran.stdout
    );
    parsed
}

/// Runs the Inspector CLI with `args` against `url` and returns its `--format json` output.
async fn inspector(url: &str, key: &str, args: &[&str]) -> Value {
    let mut command = Command::new(node());
    command
        .arg(peer_file("node_modules/.bin/mcp-inspector"))
        .args(["--cli", url, "--transport", "http", "--header"])
        .arg(format!("Authorization: Bearer {key}"))
        .args(args)
        .args(["--format", "json"]);
    run(format!("mcp-inspector {}", args.join(" ")), &mut command)
        .await
        .succeeded()
        .json()
}

/// server-everything (Streamable HTTP, session era) on a free port; returns it and its URL.
async fn start_server_everything() -> (Peer, String) {
    let port = free_port();
    let mut command = Command::new(node());
    command
        .arg(peer_file(
            "node_modules/@modelcontextprotocol/server-everything/dist/index.js",
        ))
        .arg("streamableHttp")
        .env("PORT", port.to_string());
    let mut peer = Peer::start("server-everything", &mut command);
    peer.wait_for_line("its listening line", |line| {
        line.contains("listening on port")
    })
    .await;
    // It listens on every interface; traffic goes to loopback only.
    (peer, format!("http://127.0.0.1:{port}/mcp"))
}

/// `tests/peers/py_server.py` (a Python SDK `MCPServer`) on a free port; returns it and its URL.
async fn start_python_server() -> (Peer, String) {
    let port = free_port();
    let mut command = Command::new(python());
    command
        .arg(peer_file("py_server.py"))
        .arg(port.to_string())
        .env("PYTHONUNBUFFERED", "1");
    let mut peer = Peer::start("py_server.py", &mut command);
    peer.wait_for_line("\"Uvicorn running on\"", |line| {
        line.contains("Uvicorn running on")
    })
    .await;
    (peer, format!("http://127.0.0.1:{port}/mcp"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_and_inspector_through_tunnel_to_server_everything() {
    let (everything, upstream) = start_server_everything().await;
    let harness = common::Harness::start(common::Options::default()).await;
    let client = harness
        .connect(&harness.acme, &[("everything", upstream.as_str())])
        .await;
    let url = harness.url("everything");
    let key = harness.acme.api_key.clone();

    let legacy = python_client(&url, &key, "legacy").await;
    assert!(
        legacy.negotiated.starts_with("2025-"),
        "legacy negotiates a session-era version: {}",
        legacy.negotiated
    );
    assert!(
        legacy.tools.iter().any(|t| t == "echo"),
        "echo is listed: {:?}",
        legacy.tools
    );
    assert_eq!(legacy.call, "Echo: hi");

    // server-everything has no server/discover: auto falls back to the handshake.
    let auto = python_client(&url, &key, "auto").await;
    assert!(
        auto.negotiated.starts_with("2025-"),
        "auto falls back to a session-era version: {}",
        auto.negotiated
    );
    assert!(
        auto.tools.iter().any(|t| t == "echo"),
        "echo is listed: {:?}",
        auto.tools
    );
    assert_eq!(auto.call, "Echo: hi");

    // The 2024-11-05 HTTP+SSE transport at /sse/{source}, to the same Streamable HTTP upstream.
    let sse_url = format!("http://{}/sse/everything", harness.agents);
    let over_sse = python_client(&sse_url, &key, "sse").await;
    assert!(
        over_sse.tools.iter().any(|t| t == "echo"),
        "echo is listed over HTTP+SSE: {:?}",
        over_sse.tools
    );
    assert_eq!(over_sse.call, "Echo: hi");

    let listed = inspector(&url, &key, &["--method", "tools/list"]).await;
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("a tools/list result: {listed}"))
        .iter()
        .filter_map(|tool| tool["name"].as_str())
        .collect();
    assert!(names.contains(&"echo"), "echo is listed: {names:?}");

    let called = inspector(
        &url,
        &key,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "echo",
            "--tool-arg",
            "message=hi",
        ],
    )
    .await;
    assert_eq!(
        called["result"]["content"][0]["text"], "Echo: hi",
        "the inspector's echo result: {called}"
    );

    let rows = harness.state.registry.rows();
    let row = rows
        .iter()
        .find(|row| row.tenant == harness.acme.name && row.source == "everything")
        .unwrap_or_else(|| panic!("a registry row for acme/everything: {rows:?}"));
    assert_eq!(row.transport, "quic");
    assert!(
        row.streams_opened > 0,
        "the traffic went through tunnel streams: {row:?}"
    );

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    everything.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_stateless_era_through_tunnel_to_mcpserver() {
    let (server, upstream) = start_python_server().await;
    let harness = common::Harness::start(common::Options::default()).await;
    let client = harness
        .connect(&harness.acme, &[("pysrv", upstream.as_str())])
        .await;
    let url = harness.url("pysrv");
    let key = harness.acme.api_key.clone();

    // The stateless era: server/discover, then plain POSTs with no session.
    let modern = python_client(&url, &key, "auto").await;
    assert_eq!(
        modern.negotiated, "2026-07-28",
        "auto negotiates the stateless era"
    );
    assert!(
        modern.tools.iter().any(|t| t == "echo") && modern.tools.iter().any(|t| t == "add"),
        "echo and add are listed: {:?}",
        modern.tools
    );
    assert_eq!(modern.call, "Echo: hi");

    let sum = python_client_call(&url, &key, "auto", Some(("add", r#"{"a": 2, "b": 40}"#))).await;
    assert_eq!(sum.negotiated, "2026-07-28");
    assert_eq!(sum.call, "42");

    // The session era against the same server: initialize, session id, GET stream, DELETE.
    let legacy = python_client(&url, &key, "legacy").await;
    assert_eq!(
        legacy.negotiated, "2025-11-25",
        "legacy negotiates the session era"
    );
    assert!(
        legacy.tools.iter().any(|t| t == "echo"),
        "echo is listed: {:?}",
        legacy.tools
    );
    assert_eq!(legacy.call, "Echo: hi");

    let rows = harness.state.registry.rows();
    let row = rows
        .iter()
        .find(|row| row.tenant == harness.acme.name && row.source == "pysrv")
        .unwrap_or_else(|| panic!("a registry row for acme/pysrv: {rows:?}"));
    assert_eq!(row.transport, "quic");
    assert!(
        row.streams_opened > 0,
        "the traffic went through tunnel streams: {row:?}"
    );

    client.stop().await.expect("connect stops cleanly");
    harness.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_command_answers_the_python_sdk() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"));
    command
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "mcp_tunnel=debug,warn");
    let mut demo = Peer::start("mcp-tunnel demo", &mut command);
    let url = demo
        .wait_for_line("`agent URL: ...`", |line| line.starts_with("agent URL: "))
        .await
        .trim_start_matches("agent URL: ")
        .trim()
        .to_owned();
    let key = demo
        .wait_for_line("`API key: ...`", |line| line.starts_with("API key: "))
        .await
        .trim_start_matches("API key: ")
        .trim()
        .to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp/demo"),
        "the demo's agent URL: {url}"
    );

    for mode in ["auto", "legacy"] {
        let answer = python_client(&url, &key, mode).await;
        assert!(
            answer.tools.iter().any(|t| t == "echo"),
            "echo is listed ({mode}): {:?}",
            answer.tools
        );
        assert_eq!(answer.call, "hi", "the demo echoes unchanged ({mode})");
    }

    demo.stop().await;
}
