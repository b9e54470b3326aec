//! The live activity page: `/api/activity` and the event stream reflect the calls the relay
//! records, and the page itself, rendered by headless Chromium (Debian's `chromium`, installed
//! by scripts/install-peers.sh), shows the tunnels and the latest calls. The screenshot is kept
//! at `target/activity/activity.png` for a person to look at.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Agent, Harness, Options, TenantCreds, WAIT, demo_upstream};
use mcp_tunnel::govern::audit::{Direction, Outcome, Record, Verdict, digest};
use serde_json::Value;

/// Where Debian puts Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium's bound on a page that never loads, milliseconds.
const LOAD_BOUND: &str = "--timeout=20000";

/// A subject a hostile identity provider could hand out: the page must show it as text.
const HOSTILE_SUBJECT: &str = "<img src=x onerror=alert(1)>@evil";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One call as the relay records it.
struct Call {
    tenant: &'static str,
    subject: &'static str,
    source: &'static str,
    tool: &'static str,
    decision: Verdict,
    outcome: Outcome,
    latency_us: u64,
}

impl Call {
    fn record(&self) -> Record {
        Record {
            time_ms: now_ms(),
            tenant: self.tenant.into(),
            subject: self.subject.into(),
            roles: vec!["analyst".into()],
            source: self.source.into(),
            session: Some("s-1".into()),
            transport: (self.decision == Verdict::Allow).then(|| "quic".into()),
            protocol_version: Some("2025-11-25".into()),
            direction: Direction::AgentToServer,
            method: "tools/call".into(),
            request_id: Some("1".into()),
            tool: Some(self.tool.into()),
            resource: None,
            prompt: None,
            decision: self.decision,
            rule: match self.decision {
                Verdict::Allow => format!("role analyst allows {}/{}", self.source, self.tool),
                Verdict::Deny => format!("no role allows {}/{}", self.source, self.tool),
            },
            outcome: self.outcome,
            latency_us: self.latency_us,
            bytes_in: 100,
            bytes_out: 200,
            args_sha256: digest(b"{}"),
            args: None,
            result: None,
        }
    }
}

/// The load every test here feeds: two tenants, allowed, denied and failing calls.
/// acme: 40 `echo` ok (alice), 5 `add` tool errors (bob), 7 `blob` denied (mallory);
/// other: 20 `echo` ok (carol), 3 `sleep` timeouts (carol), 1 `echo` by a hostile subject.
fn load() -> Vec<Call> {
    let mut calls = Vec::new();
    for i in 0..40 {
        calls.push(Call {
            tenant: "acme",
            subject: "alice@acme.example",
            source: "demo",
            tool: "echo",
            decision: Verdict::Allow,
            outcome: Outcome::Ok,
            latency_us: 1_000 + i * 10,
        });
    }
    for _ in 0..5 {
        calls.push(Call {
            tenant: "acme",
            subject: "bob@acme.example",
            source: "demo",
            tool: "add",
            decision: Verdict::Allow,
            outcome: Outcome::ToolError,
            latency_us: 2_500,
        });
    }
    for _ in 0..7 {
        calls.push(Call {
            tenant: "acme",
            subject: "mallory@acme.example",
            source: "demo",
            tool: "blob",
            decision: Verdict::Deny,
            outcome: Outcome::Error(-32602),
            latency_us: 40,
        });
    }
    for _ in 0..20 {
        calls.push(Call {
            tenant: "other",
            subject: "carol@other.example",
            source: "files",
            tool: "echo",
            decision: Verdict::Allow,
            outcome: Outcome::Ok,
            latency_us: 3_000,
        });
    }
    for _ in 0..3 {
        calls.push(Call {
            tenant: "other",
            subject: "carol@other.example",
            source: "files",
            tool: "sleep",
            decision: Verdict::Allow,
            outcome: Outcome::Timeout,
            latency_us: 30_000_000,
        });
    }
    calls.push(Call {
        tenant: "other",
        subject: HOSTILE_SUBJECT,
        source: "files",
        tool: "echo",
        decision: Verdict::Allow,
        outcome: Outcome::Ok,
        latency_us: 900,
    });
    calls
}

/// A relay with a tunnel for each tenant (acme serves `demo`, other serves `files`) and one
/// agent session each.
struct Scene {
    harness: Harness,
    _clients: Vec<common::Client>,
    _agents: Vec<Agent>,
}

async fn scene() -> Scene {
    let harness = Harness::start(Options::default()).await;
    let upstream = demo_upstream(&harness.shutdown).await;
    let mut clients = Vec::new();
    let mut agents = Vec::new();
    for (tenant, source) in [(&harness.acme, "demo"), (&harness.other, "files")] {
        clients.push(harness.connect(tenant, &[(source, &upstream)]).await);
        agents.push(session(&harness, tenant, source).await);
    }
    Scene {
        harness,
        _clients: clients,
        _agents: agents,
    }
}

async fn session(harness: &Harness, tenant: &TenantCreds, source: &str) -> Agent {
    let mut agent = Agent::new(&harness.url(source), &tenant.api_key);
    let answer = agent.initialize().await;
    assert_eq!(answer.status, 200, "initialize: {answer:?}");
    assert!(agent.session.is_some(), "a session id: {answer:?}");
    agent
}

/// Feeds the load through the relay state, as the relay does for every finished call.
fn feed(harness: &Harness, calls: &[Call]) {
    for call in calls {
        harness.state.activity.push(Arc::new(call.record()));
    }
}

async fn get_json(url: &str) -> Value {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(WAIT)
        .send()
        .await
        .expect("admin request is sent");
    assert_eq!(response.status(), 200, "GET {url}");
    response.json().await.expect("JSON body")
}

fn tool_row<'a>(snapshot: &'a Value, tenant: &str, tool: &str) -> &'a Value {
    snapshot["tools"]
        .as_array()
        .expect("tools is an array")
        .iter()
        .find(|row| row["tenant"] == tenant && row["tool"] == tool)
        .unwrap_or_else(|| panic!("no {tenant}/{tool} row in {snapshot:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_reflects_the_calls_of_each_tenant() {
    let scene = scene().await;
    let harness = &scene.harness;
    let calls = load();
    feed(harness, &calls);
    let all = get_json(&format!("http://{}/api/activity", harness.admin)).await;

    assert_eq!(all["tenant"], Value::Null);
    assert_eq!(all["tenants"], serde_json::json!(["acme", "other"]));
    assert_eq!(all["sessions"], 2, "one session per tenant: {all:#}");
    let tunnels = all["tunnels"].as_array().expect("tunnels");
    let mut served: Vec<(String, String)> = tunnels
        .iter()
        .map(|t| {
            assert_eq!(t["transport"], "quic");
            (
                t["tenant"].as_str().expect("tenant").into(),
                t["source"].as_str().expect("source").into(),
            )
        })
        .collect();
    served.sort();
    assert_eq!(
        served,
        [
            ("acme".into(), "demo".into()),
            ("other".into(), "files".into())
        ]
    );
    assert_eq!(all["offline"], serde_json::json!([]));
    assert_eq!(
        all["totals"],
        serde_json::json!({"calls": calls.len(), "denied": 7, "errors": 8})
    );

    let echo = tool_row(&all, "acme", "echo");
    assert_eq!(
        (&echo["calls"], &echo["denied"], &echo["errors"]),
        (&40.into(), &0.into(), &0.into())
    );
    // Latencies 1.000, 1.010, ... 1.390 ms: nearest-rank percentiles.
    assert_eq!(echo["p50_ms"], 1.19);
    assert_eq!(echo["p90_ms"], 1.35);
    assert_eq!(echo["p99_ms"], 1.39);
    assert_eq!(echo["window"], 40);
    let add = tool_row(&all, "acme", "add");
    assert_eq!((&add["calls"], &add["errors"]), (&5.into(), &5.into()));
    let blob = tool_row(&all, "acme", "blob");
    assert_eq!(
        (&blob["calls"], &blob["denied"], &blob["errors"]),
        (&7.into(), &7.into(), &0.into())
    );
    assert_eq!(blob["p50_ms"], Value::Null, "denied calls have no latency");
    let sleep = tool_row(&all, "other", "sleep");
    assert_eq!(
        (&sleep["errors"], &sleep["p99_ms"]),
        (&3.into(), &30_000.0.into())
    );

    let latest = all["calls"].as_array().expect("calls");
    assert_eq!(latest.len(), calls.len());
    assert_eq!(latest[0]["subject"], HOSTILE_SUBJECT, "newest first");
    assert_eq!(
        latest.last().expect("a call")["subject"],
        "alice@acme.example"
    );
    let denied = latest
        .iter()
        .find(|c| c["decision"] == "deny")
        .expect("a denied call");
    assert_eq!(
        (&denied["target"], &denied["outcome"], &denied["code"]),
        (&"blob".into(), &"error".into(), &(-32602).into())
    );

    let acme = get_json(&format!(
        "http://{}/api/activity?tenant=acme",
        harness.admin
    ))
    .await;
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(
        acme["tenants"], all["tenants"],
        "the filter lists every tenant"
    );
    assert_eq!(acme["sessions"], 1);
    assert!(
        acme["tunnels"]
            .as_array()
            .expect("tunnels")
            .iter()
            .all(|t| t["tenant"] == "acme"),
        "{acme:#}"
    );
    assert_eq!(
        acme["totals"],
        serde_json::json!({"calls": 52, "denied": 7, "errors": 5})
    );
    let acme_calls = acme["calls"].as_array().expect("calls");
    assert_eq!(acme_calls.len(), 52);
    assert!(acme_calls.iter().all(|c| c["tenant"] == "acme"));
    assert!(
        acme["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .all(|t| t["tenant"] == "acme")
    );
}

/// The server-sent events of one response, read as they arrive.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(url: &str) -> Self {
        let response = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .expect("event stream request is sent");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "an SSE response"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (name, data), skipping comments; `None` when the stream ends.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in raw.lines() {
                    if let Some(n) = line.strip_prefix("event:") {
                        name = n.trim().into();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((
                    name,
                    serde_json::from_str(&data).expect("event data is JSON"),
                ));
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("an event within the wait")
                .expect("the stream reads");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk?));
        }
    }

    /// The next event named `name`, skipping others.
    async fn next_named(&mut self, name: &str) -> Value {
        loop {
            match self.next().await {
                Some((n, data)) if n == name => return data,
                Some(_) => {}
                None => panic!("the stream ended before a {name} event"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_push_a_snapshot_then_new_calls_and_end_at_shutdown() {
    let scene = scene().await;
    let Scene {
        harness,
        _clients,
        _agents,
    } = scene;
    let calls = load();
    feed(&harness, &calls[..10]);
    let mut events = Events::open(&format!(
        "http://{}/activity/events?tenant=other",
        harness.admin
    ))
    .await;
    let (name, snapshot) = events.next().await.expect("a first event");
    assert_eq!(name, "snapshot");
    assert_eq!(snapshot["tenant"], "other");
    assert_eq!(
        snapshot["calls"],
        serde_json::json!([]),
        "no call of other yet"
    );
    assert_eq!(snapshot["tunnels"][0]["source"], "files");

    // An acme call, then other's: the viewer of other sees only its own.
    feed(&harness, &calls[10..11]);
    feed(&harness, &calls[52..54]);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = events.next_named("calls").await;
        seen.extend(batch.as_array().expect("a calls array").iter().cloned());
    }
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|c| c["tenant"] == "other" && c["target"] == "echo"),
        "{seen:#?}"
    );

    let refresh = events.next_named("refresh").await;
    assert!(refresh.get("calls").is_none(), "a refresh carries no calls");
    assert_eq!(refresh["totals"]["calls"], 2);
    assert_eq!(refresh["sessions"], 1);

    // Shutdown ends the stream (and the relay waits for no viewer).
    tokio::time::timeout(WAIT, harness.stop())
        .await
        .expect("the relay stops with a viewer attached");
    loop {
        match events.next().await {
            None => break,
            Some((name, _)) => assert_ne!(name, "calls", "no call after shutdown"),
        }
    }
}

/// Where the screenshot is kept: `target/activity/activity.png`.
fn screenshot_path() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the tmp dir is inside the target dir")
        .to_path_buf();
    target.join("activity").join("activity.png")
}

/// Runs headless Chromium on `url` with `extra` arguments in a fresh profile and returns what it
/// printed. It runs in its own process group, killed by that group's id if it outlives the wait.
async fn chromium(url: &str, extra: &[String]) -> String {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/install-peers.sh (apt-get install chromium)"
    );
    let profile = tempfile::tempdir().expect("a profile dir");
    let mut command = tokio::process::Command::new(CHROMIUM);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1440,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().expect("chromium starts");
    let group = child.id().expect("a running child has a pid") as i32;
    match tokio::time::timeout(WAIT, child.wait_with_output()).await {
        Ok(output) => {
            let output = output.expect("chromium's output reads");
            // Its helper processes share the group: end any left behind.
            // SAFETY: kill(2) with a negative pid signals the group of the child we started.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(
                output.status.success(),
                "chromium failed ({}): {}\n{stdout}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            stdout
        }
        Err(_) => {
            // SAFETY: as above; the child is killed and reaped on drop too.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            panic!("chromium did not finish within {WAIT:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_tunnels_and_the_latest_calls() {
    let scene = scene().await;
    let harness = &scene.harness;
    feed(harness, &load());
    let url = format!("http://{}/activity", harness.admin);

    // The page carries its first snapshot, so it is complete at its load event, when Chromium
    // dumps it; `--timeout` only bounds a page that never loads. (`--virtual-time-budget`
    // would wait for the event stream to end: virtual time stands still while a fetch is open.)
    let dom = chromium(&url, &[LOAD_BOUND.into(), "--dump-dom".into()]).await;
    let tunnels = section(&dom, "id=\"tunnels\"");
    for want in ["acme", "demo", "other", "files", "quic", "online"] {
        assert!(
            tunnels.contains(want),
            "tunnels table lacks {want}:\n{tunnels}"
        );
    }
    let latest = section(&dom, "id=\"calls\"");
    for want in [
        "alice@acme.example",
        "bob@acme.example",
        "mallory@acme.example",
        "carol@other.example",
        ">echo<",
        ">add<",
        ">blob<",
        ">sleep<",
        "tool error",
        "timeout",
        "error -32602",
    ] {
        assert!(latest.contains(want), "latest calls lack {want}:\n{latest}");
    }
    assert!(
        latest.contains("<tr class=\"deny"),
        "a denied row is marked:\n{latest}"
    );
    assert!(
        latest.contains("<tr class=\"error"),
        "a failed row is marked:\n{latest}"
    );
    // The hostile subject is text, not markup.
    assert!(
        latest.contains("&lt;img src=x onerror=alert(1)&gt;@evil"),
        "{latest}"
    );
    assert!(!dom.contains("<img"), "no element came from a name:\n{dom}");
    let tools = section(&dom, "id=\"tools\"");
    assert!(tools.contains(">1.19<"), "acme echo p50 shown:\n{tools}");
    assert!(
        dom.contains("id=\"fig-calls\">76<"),
        "the calls figure:\n{dom}"
    );

    let png = screenshot_path();
    std::fs::create_dir_all(png.parent().expect("a parent")).expect("target/activity");
    let _ = std::fs::remove_file(&png);
    chromium(
        &url,
        &[LOAD_BOUND.into(), format!("--screenshot={}", png.display())],
    )
    .await;
    let bytes = std::fs::read(&png).expect("the screenshot is written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    eprintln!("activity screenshot: {}", png.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_calls_pushed_while_it_watches() {
    let Scene {
        harness,
        _clients,
        _agents,
    } = scene().await;
    let calls = load();
    feed(&harness, &calls[..52]);
    let url = format!("http://{}/activity", harness.admin);
    // Virtual time stands still while the event stream is open and runs on once the relay
    // has stopped, so the page has handled every event sent before the stop when it is dumped.
    let browser = tokio::spawn(async move {
        chromium(
            &url,
            &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while harness.state.activity.viewers() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page opened no event stream within {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // other's calls exist only after the page loaded: only the event stream can show them.
    feed(&harness, &calls[52..]);
    tokio::time::timeout(WAIT, harness.stop())
        .await
        .expect("the relay stops with a viewer attached");
    let dom = tokio::time::timeout(WAIT, browser)
        .await
        .expect("chromium finishes after the stream ends")
        .expect("the chromium task does not panic");
    let latest = section(&dom, "id=\"calls\"");
    for want in ["carol@other.example", ">sleep<", "alice@acme.example"] {
        assert!(latest.contains(want), "latest calls lack {want}:\n{latest}");
    }
    assert!(
        latest.contains("class=\"fresh"),
        "pushed rows are marked new:\n{latest}"
    );
}

/// The part of `dom` from the element with `marker` to its table's end.
fn section<'a>(dom: &'a str, marker: &str) -> &'a str {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let end = dom[start..]
        .find("</table>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}
