//! The live activity page, over real calls through the relay (allowed, denied and failing, two
//! tenants): `/api/activity` and the event stream reflect them, and the page itself, rendered
//! by headless Chromium (Debian's `chromium`, installed by scripts/install-peers.sh), shows the
//! tunnels and the latest calls, including calls pushed while it watches. The screenshot is
//! kept at `target/activity/activity.png` for a person to look at.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::audit::caller_role;
use common::{Agent, Harness, Options, WAIT, demo_upstream, tool_text};
use serde_json::{Value, json};

/// Where Debian puts Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium's bound on a page that never loads, milliseconds.
const LOAD_BOUND: &str = "--timeout=20000";

/// A tool name an agent made up to attack the page: it must show as text.
const HOSTILE_TOOL: &str = "<img src=x onerror=alert(1)>";

/// acme's load: `echo` calls that succeed, `add` calls that overflow (a tool error), `blob`
/// calls its role does not allow.
const ECHOES: u64 = 12;
const TOOL_ERRORS: u64 = 3;
const DENIED: u64 = 4;
/// other's load (it has no roles: everything allowed): `echo`, `sleep`, and two failures (a
/// made-up tool and a made-up method).
const OTHER_ECHOES: u64 = 6;
const SLEEPS: u64 = 2;

/// A relay whose tenants each have a tunnel (acme serves `demo`, other serves `files`), and an
/// agent session for each.
struct Scene {
    harness: Harness,
    acme: Agent,
    other: Agent,
    _clients: Vec<common::Client>,
}

impl Scene {
    /// The relay, acme's agent, other's agent and the `connect`s.
    fn into_parts(self) -> (Harness, Agent, Agent, Vec<common::Client>) {
        (self.harness, self.acme, self.other, self._clients)
    }
}

async fn scene() -> Scene {
    let harness = Harness::start(Options {
        acme_roles: vec![caller_role()],
        ..Options::default()
    })
    .await;
    let upstream = demo_upstream(&harness.shutdown).await;
    let clients = vec![
        harness.connect(&harness.acme, &[("demo", &upstream)]).await,
        harness
            .connect(&harness.other, &[("files", &upstream)])
            .await,
    ];
    let mut acme = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(acme.initialize().await.status, 200);
    let mut other = Agent::new(&harness.url("files"), &harness.other.api_key);
    assert_eq!(other.initialize().await.status, 200);
    Scene {
        harness,
        acme,
        other,
        _clients: clients,
    }
}

/// acme's calls: `1 + ECHOES + TOOL_ERRORS + DENIED` with its `initialize`.
async fn acme_load(agent: &Agent) {
    common::mixed_calls(agent, "hi", ECHOES, TOOL_ERRORS, DENIED).await;
}

/// other's calls: `1 + OTHER_ECHOES + SLEEPS + 2` with its `initialize`.
async fn other_load(agent: &Agent) {
    let mut id = 0;
    for _ in 0..OTHER_ECHOES {
        id += 1;
        let answer = agent.call_tool(id, "echo", json!({"message": "yo"})).await;
        assert_eq!(tool_text(answer.response()), "yo");
    }
    for _ in 0..SLEEPS {
        id += 1;
        let answer = agent.call_tool(id, "sleep", json!({"ms": 1})).await;
        assert_eq!(tool_text(answer.response()), "slept 1 ms");
    }
    let hostile = agent.call_tool(100, HOSTILE_TOOL, json!({})).await;
    let failed = hostile.response().get("error").is_some()
        || hostile.response()["result"]["isError"] == true;
    assert!(failed, "no such tool: {hostile:?}");
    let unknown = agent
        .post(&json!({"jsonrpc":"2.0","id":101,"method":"no/such/method"}))
        .await;
    assert!(unknown.response()["error"]["code"].is_i64(), "{unknown:?}");
}

async fn get_json(url: &str) -> Value {
    let response = common::get(url).await;
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

fn counts(row: &Value) -> (u64, u64, u64) {
    let n = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{k} in {row}"));
    (n("calls"), n("denied"), n("errors"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_reflects_real_calls_of_each_tenant() {
    let scene = scene().await;
    acme_load(&scene.acme).await;
    other_load(&scene.other).await;
    let harness = &scene.harness;
    // Every answer was released after its call reached the feed: no wait needed.
    let all = get_json(&harness.admin_url("/api/activity")).await;
    assert_overview(&all);
    assert_tool_rows(&all);
    assert_latest_calls(&all);
    let acme = get_json(&harness.admin_url("/api/activity?tenant=acme")).await;
    assert_filtered_to_acme(&acme, &all);
}

/// acme's calls with its `initialize`.
const ACME_CALLS: u64 = 1 + ECHOES + TOOL_ERRORS + DENIED;
/// other's calls with its `initialize`.
const OTHER_CALLS: u64 = 1 + OTHER_ECHOES + SLEEPS + 2;

/// Tenants, sessions, tunnels and totals of the unfiltered snapshot `all`.
fn assert_overview(all: &Value) {
    assert_eq!(all["tenant"], Value::Null);
    assert_eq!(all["tenants"], json!(["acme", "other"]));
    assert_eq!(all["sessions"], 2, "one session per tenant: {all:#}");
    let mut served: Vec<(String, String)> = all["tunnels"]
        .as_array()
        .expect("tunnels")
        .iter()
        .map(|t| {
            assert_eq!(t["transport"], "quic");
            assert!(t["rtt_ms"].as_f64().is_some_and(|rtt| rtt >= 0.0));
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
    assert_eq!(all["offline"], json!([]));
    assert_eq!(
        all["totals"],
        json!({"calls": ACME_CALLS + OTHER_CALLS, "denied": DENIED, "errors": TOOL_ERRORS + 2})
    );
}

/// Each tool's counts and latencies in `all`.
fn assert_tool_rows(all: &Value) {
    assert_eq!(counts(tool_row(all, "acme", "echo")), (ECHOES, 0, 0));
    assert_eq!(
        counts(tool_row(all, "acme", "add")),
        (TOOL_ERRORS, 0, TOOL_ERRORS)
    );
    assert_eq!(counts(tool_row(all, "acme", "blob")), (DENIED, DENIED, 0));
    assert_eq!(counts(tool_row(all, "acme", "initialize")), (1, 0, 0));
    assert_eq!(counts(tool_row(all, "other", "sleep")), (SLEEPS, 0, 0));
    assert_eq!(counts(tool_row(all, "other", HOSTILE_TOOL)), (1, 0, 1));
    assert_eq!(counts(tool_row(all, "other", "no/such/method")), (1, 0, 1));
    let echo = tool_row(all, "acme", "echo");
    assert_eq!(echo["window"], ECHOES);
    let p = |k: &str| echo[k].as_f64().unwrap_or_else(|| panic!("{k} in {echo}"));
    assert!(0.0 < p("p50_ms") && p("p50_ms") <= p("p90_ms") && p("p90_ms") <= p("p99_ms"));
    let blob = tool_row(all, "acme", "blob");
    assert_eq!(blob["p50_ms"], Value::Null, "denied calls have no latency");
}

/// The latest calls in `all`, newest first, with their decisions and outcomes.
fn assert_latest_calls(all: &Value) {
    let latest = all["calls"].as_array().expect("calls");
    assert_eq!(latest.len() as u64, ACME_CALLS + OTHER_CALLS);
    assert_eq!(latest[0]["method"], "no/such/method", "newest first");
    assert_eq!(latest[0]["subject"], "agent@other");
    assert_eq!(latest.last().expect("a call")["method"], "initialize");
    let denied = latest
        .iter()
        .find(|c| c["decision"] == "deny")
        .expect("a denied call");
    assert_eq!(
        (
            &denied["target"],
            &denied["outcome"],
            &denied["code"],
            &denied["subject"]
        ),
        (
            &json!("blob"),
            &json!("error"),
            &json!(-32602),
            &json!("agent@acme")
        )
    );
    let echoed = latest
        .iter()
        .find(|c| c["target"] == "echo" && c["tenant"] == "acme")
        .expect("an echo");
    assert_eq!(
        (&echoed["outcome"], &echoed["transport"]),
        (&json!("ok"), &json!("quic"))
    );
}

/// The snapshot `acme`, filtered to tenant acme, holds acme's rows only (and `all`'s tenants).
fn assert_filtered_to_acme(acme: &Value, all: &Value) {
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(
        acme["tenants"], all["tenants"],
        "the filter lists every tenant"
    );
    assert_eq!(acme["sessions"], 1);
    let only_acme = |key: &str| {
        acme[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {acme}"))
            .iter()
            .all(|row| row["tenant"] == "acme")
    };
    assert!(
        only_acme("tunnels") && only_acme("tools") && only_acme("calls"),
        "{acme:#}"
    );
    assert_eq!(
        acme["totals"],
        json!({"calls": ACME_CALLS, "denied": DENIED, "errors": TOOL_ERRORS})
    );
    assert_eq!(
        acme["calls"].as_array().expect("calls").len() as u64,
        ACME_CALLS
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
    let (harness, acme, other, _clients) = scene().await.into_parts();
    let mut events = Events::open(&harness.admin_url("/activity/events?tenant=other")).await;
    let (name, snapshot) = events.next().await.expect("a first event");
    assert_eq!(name, "snapshot");
    assert_eq!(snapshot["tenant"], "other");
    assert_eq!(snapshot["tunnels"][0]["source"], "files");
    let calls = snapshot["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "other's initialize: {snapshot:#}");
    assert_eq!(calls[0]["method"], "initialize");

    // An acme call, then other's: the viewer of other sees only its own.
    let answer = acme.call_tool(1, "echo", json!({"message": "a"})).await;
    assert_eq!(tool_text(answer.response()), "a");
    let answer = other.call_tool(1, "echo", json!({"message": "o"})).await;
    assert_eq!(tool_text(answer.response()), "o");
    let batch = events.next_named("calls").await;
    let batch = batch.as_array().expect("a calls array");
    assert_eq!(batch.len(), 1, "only other's call: {batch:#?}");
    assert_eq!(
        (
            &batch[0]["tenant"],
            &batch[0]["target"],
            &batch[0]["subject"]
        ),
        (&json!("other"), &json!("echo"), &json!("agent@other"))
    );

    let refresh = events.next_named("refresh").await;
    assert!(refresh.get("calls").is_none(), "a refresh carries no calls");
    assert_eq!(refresh["totals"]["calls"], 2);
    assert_eq!(refresh["sessions"], 1);

    // Shutdown ends the stream (and the relay does not wait for the viewer).
    tokio::time::timeout(WAIT, harness.stop())
        .await
        .expect("the relay stops with a viewer attached");
    while let Some((name, data)) = events.next().await {
        assert_ne!(name, "calls", "no call after the last one: {data}");
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
    acme_load(&scene.acme).await;
    other_load(&scene.other).await;
    let url = scene.harness.admin_url("/activity");

    // The page carries its first snapshot, so it is complete at its load event, when Chromium
    // dumps it; `--timeout` only bounds a page that never loads. (`--virtual-time-budget`
    // would wait for the event stream to end: virtual time stands still while a fetch is open.)
    let dom = chromium(&url, &[LOAD_BOUND.into(), "--dump-dom".into()]).await;
    assert_full_page(&dom);
    assert_acme_page(&url).await;
    screenshot(&url).await;
}

/// The page of every tenant shows both tunnels, the latest calls (a hostile name as text), the
/// tools and the calls figure.
fn assert_full_page(dom: &str) {
    let tunnels = section(dom, "id=\"tunnels\"");
    for want in [
        ">acme<", ">demo<", ">other<", ">files<", ">quic<", ">online<",
    ] {
        assert!(
            tunnels.contains(want),
            "tunnels table lacks {want}:\n{tunnels}"
        );
    }
    let latest = section(dom, "id=\"calls\"");
    for want in [
        ">agent@acme<",
        ">agent@other<",
        ">echo<",
        ">add<",
        ">blob<",
        ">sleep<",
        ">initialize<",
        ">no/such/method<",
        ">tool error<",
        ">error -32602<",
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
    // The hostile tool name is text, not markup.
    assert!(
        latest.contains(">&lt;img src=x onerror=alert(1)&gt;<"),
        "{latest}"
    );
    assert!(!dom.contains("<img"), "no element came from a name:\n{dom}");
    let tools = section(dom, "id=\"tools\"");
    assert!(
        tools.contains(">blob<") && tools.contains(">initialize<"),
        "{tools}"
    );
    let calls = ACME_CALLS + OTHER_CALLS;
    assert!(
        dom.contains(&format!("id=\"fig-calls\">{calls}<")),
        "the calls figure:\n{dom}"
    );
}

/// One tenant's page: its tunnel and calls only, the filter set to it.
async fn assert_acme_page(url: &str) {
    let acme_dom = chromium(
        &format!("{url}?tenant=acme"),
        &[LOAD_BOUND.into(), "--dump-dom".into()],
    )
    .await;
    let acme_latest = section(&acme_dom, "id=\"calls\"");
    assert!(acme_latest.contains(">agent@acme<"), "{acme_latest}");
    assert!(!acme_latest.contains(">agent@other<"), "{acme_latest}");
    let acme_tunnels = section(&acme_dom, "id=\"tunnels\"");
    assert!(
        acme_tunnels.contains(">demo<") && !acme_tunnels.contains(">files<"),
        "{acme_tunnels}"
    );
    assert!(
        acme_dom.contains("<option value=\"acme\" selected=\"\">acme</option>")
            && acme_dom.contains("<option value=\"other\">other</option>"),
        "the filter is set to acme and offers other:\n{acme_dom}"
    );
}

/// Chromium takes a PNG screenshot of the page at `url`.
async fn screenshot(url: &str) {
    let png = screenshot_path();
    std::fs::create_dir_all(png.parent().expect("a parent")).expect("target/activity");
    let _ = std::fs::remove_file(&png);
    chromium(
        url,
        &[LOAD_BOUND.into(), format!("--screenshot={}", png.display())],
    )
    .await;
    let bytes = std::fs::read(&png).expect("the screenshot is written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    eprintln!("activity screenshot: {}", png.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_calls_made_while_it_watches() {
    let (harness, acme, other, _clients) = scene().await.into_parts();
    acme_load(&acme).await;
    let url = harness.admin_url("/activity");
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
    // other's sleeps happen only after the page loaded: only the event stream can show them.
    for id in 1..=SLEEPS {
        let answer = other.call_tool(id, "sleep", json!({"ms": 1})).await;
        assert_eq!(tool_text(answer.response()), "slept 1 ms");
    }
    tokio::time::timeout(WAIT, harness.stop())
        .await
        .expect("the relay stops with a viewer attached");
    let dom = tokio::time::timeout(WAIT, browser)
        .await
        .expect("chromium finishes after the stream ends")
        .expect("the chromium task does not panic");
    let latest = section(&dom, "id=\"calls\"");
    for want in [">sleep<", ">agent@other<", ">agent@acme<"] {
        assert!(latest.contains(want), "latest calls lack {want}:\n{latest}");
    }
    assert!(
        latest.contains("<tr class=\"fresh"),
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
