//! The relay's audit trail and metrics, end to end: one row per call whatever its fate, rows
//! that survive `kill -9` of the relay for every answer an agent saw, and `/metrics` counts
//! that match a known load.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::audit::{
    Trail, assert_every_answer_has_a_row, assert_fails_naming, audit_at, caller_role, export,
    load_until_answered, now_ms, outcome, rewrite_rows,
};
use common::{Agent, Harness, Options, WAIT, free_port, tool_text};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Runs the `mcp-tunnel` binary with `args`; returns (success, stdout, stderr).
async fn mcp_tunnel(args: &[&str]) -> (bool, String, String) {
    let output = common::run_cli(args).await;
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `audit verify` passes on the trail at `db`.
async fn assert_verifies(db: &Path) {
    let db = db.display().to_string();
    let (ok, stdout, stderr) = mcp_tunnel(&["audit", "verify", "--db", &db]).await;
    assert!(ok, "audit verify fails:\n{stdout}\n{stderr}");
}

/// What each request should leave: (tenant, method, tool, decision, outcome).
type Expected = Vec<(
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    String,
)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_calls_across_two_tenants_give_one_row_each() {
    let (harness, trail) = Trail::with_roles(vec![caller_role()]).await;
    let (db, upstream) = (trail.db.clone(), trail.upstream.clone());
    let dead = format!("http://127.0.0.1:{}/mcp", free_port());
    let _acme = harness
        .connect(&harness.acme, &[("demo", &upstream), ("dead", &dead)])
        .await;
    let _other = harness
        .connect(&harness.other, &[("demo", &upstream)])
        .await;

    let mut expected = Expected::new();
    let alice = acme_mixed_requests(&harness, &mut expected).await;
    acme_unreachable_sources(&harness, &mut expected).await;
    other_requests(&harness, &mut expected).await;

    // The trail names a session by its handle (what logs call it), not the sealed agent id.
    let handle = alice
        .session
        .as_deref()
        .and_then(|id| harness.state.session_handle(id));
    assert!(handle.is_some(), "alice's session id opens on its relay");
    // Answers were released only after their rows were committed; the relay closes the trail
    // on shutdown.
    harness.stop().await;
    let rows = export(&db).await;
    assert_rows_are(&rows, &expected);
    assert_row_fields(&rows, handle.as_deref());
    assert_verifies(&db).await;
}

/// Acme's session on `demo`: echoes, a tool error, a denial and an upstream JSON-RPC error;
/// returns the agent.
async fn acme_mixed_requests(harness: &Harness, expected: &mut Expected) -> Agent {
    let mut alice = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(alice.initialize().await.status, 200);
    expected.push(("acme", "initialize", None, "allow", "ok".into()));
    for id in 1..=3 {
        assert_eq!(alice.echo(id, &id.to_string()).await, id.to_string());
        expected.push(("acme", "tools/call", Some("echo"), "allow", "ok".into()));
    }
    // The tool runs and fails: a result with isError.
    let overflow = alice
        .call_tool(4, "add", json!({"a": i64::MAX, "b": 1}))
        .await;
    assert_eq!(overflow.response()["result"]["isError"], true);
    expected.push((
        "acme",
        "tools/call",
        Some("add"),
        "allow",
        "tool_error".into(),
    ));
    // Policy refuses it before the tunnel.
    let denied = alice.call_tool(5, "sleep", json!({"ms": 1})).await;
    assert_eq!(denied.response()["error"]["code"], -32602);
    expected.push((
        "acme",
        "tools/call",
        Some("sleep"),
        "deny",
        "error:-32602".into(),
    ));
    // The upstream answers with a JSON-RPC error.
    let unknown = alice
        .post(&json!({"jsonrpc":"2.0","id":6,"method":"no/such/method"}))
        .await;
    let code = unknown.response()["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("a JSON-RPC error: {unknown:?}"));
    expected.push((
        "acme",
        "no/such/method",
        None,
        "allow",
        format!("error:{code}"),
    ));
    alice
}

/// Acme's `initialize` on a source whose server is down and on one with no tunnel at all.
async fn acme_unreachable_sources(harness: &Harness, expected: &mut Expected) {
    // A source whose tunnel is up but whose server is down.
    let mut to_dead = Agent::new(&harness.url("dead"), &harness.acme.api_key);
    let failed = to_dead.initialize().await;
    assert!(
        to_dead.session.is_none(),
        "no session with a dead source: {failed:?}"
    );
    let dead_code = failed.response()["error"]["code"].as_i64();
    let dead_outcome = match dead_code {
        Some(code) => format!("error:{code}"),
        None => "tunnel_error".into(),
    };
    expected.push(("acme", "initialize", None, "allow", dead_outcome));
    // A source with no tunnel at all: 404, recorded as a tunnel error.
    let mut nowhere = Agent::new(&harness.url("nowhere"), &harness.acme.api_key);
    assert_eq!(nowhere.initialize().await.status, 404);
    expected.push(("acme", "initialize", None, "allow", "tunnel_error".into()));
}

/// The other tenant has no roles: everything is allowed.
async fn other_requests(harness: &Harness, expected: &mut Expected) {
    let mut bob = Agent::new(&harness.url("demo"), &harness.other.api_key);
    assert_eq!(bob.initialize().await.status, 200);
    expected.push(("other", "initialize", None, "allow", "ok".into()));
    let slept = bob.call_tool(1, "sleep", json!({"ms": 1})).await;
    assert_eq!(tool_text(slept.response()), "slept 1 ms");
    expected.push(("other", "tools/call", Some("sleep"), "allow", "ok".into()));
    let listed = bob
        .post(&json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}))
        .await;
    assert!(listed.response()["result"]["tools"].is_array());
    expected.push(("other", "tools/list", None, "allow", "ok".into()));
}

/// One row per request, and the rows are the expected ones (in any order).
fn assert_rows_are(rows: &[Value], expected: &Expected) {
    assert_eq!(rows.len(), expected.len(), "one row per request: {rows:#?}");
    let key = |tenant: &str, method: &str, tool: Option<&str>, decision: &str, outcome: &str| {
        format!(
            "{tenant} {method} {} {decision} {outcome}",
            tool.unwrap_or("-")
        )
    };
    let mut want: Vec<String> = expected
        .iter()
        .map(|(t, m, tool, d, o)| key(t, m, *tool, d, o))
        .collect();
    let mut got: Vec<String> = rows
        .iter()
        .map(|row| {
            key(
                row["tenant"].as_str().unwrap_or("?"),
                row["mcp.method.name"].as_str().unwrap_or("?"),
                row["gen_ai.tool.name"].as_str(),
                row["decision"].as_str().unwrap_or("?"),
                &outcome(row),
            )
        })
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "rows: {rows:#?}");
}

/// Every row's subject, direction, digest, size and transport; the session id and digest of
/// the first echo (in `session`); the rule of a denial.
fn assert_row_fields(rows: &[Value], session: Option<&str>) {
    for row in rows {
        let tenant = row["tenant"].as_str().unwrap_or_default();
        assert_eq!(row["subject"], format!("agent@{tenant}"));
        assert_eq!(row["direction"], "agent_to_server");
        assert_eq!(
            row["args_sha256"].as_str().map(str::len),
            Some(64),
            "every row has the arguments' digest: {row}"
        );
        assert!(row["bytes_in"].as_u64() > Some(0), "{row}");
        let reached = row["network.transport"].as_str();
        match (row["decision"].as_str(), outcome(row).as_str()) {
            (Some("deny"), _) | (_, "tunnel_error") => {}
            _ => assert_eq!(reached, Some("quic"), "{row}"),
        }
    }
    // Calls in a session carry its id; the echo digests are of their params as sent.
    let echo_one = rows
        .iter()
        .find(|r| r["gen_ai.tool.name"] == "echo" && r["jsonrpc.request.id"] == "1")
        .expect("the first echo's row");
    assert_eq!(echo_one["mcp.session.id"].as_str(), session, "{echo_one}");
    assert_eq!(
        echo_one["args_sha256"],
        mcp_tunnel::govern::audit::digest(
            json!({"name":"echo","arguments":{"message":"1"}})
                .to_string()
                .as_bytes()
        ),
        "the digest is of the params text exactly as the agent sent it"
    );
    assert_eq!(
        rows.iter()
            .find(|r| r["decision"] == "deny")
            .map(|r| r["rule"].as_str().unwrap_or_default().is_empty()),
        Some(false),
        "a denial names its rule"
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// The value of every sample of `name` in a Prometheus text exposition, by its labels.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, labels)) => (metric, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once("=\"")?;
                    Some((key.to_owned(), value.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include every pair of `filter`.
fn total(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(labels, _)| {
            filter
                .iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, value)| value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_load_exactly() {
    // The recorder is per process: this test's calls go to a source name no other test uses.
    const SOURCE: &str = "metered";
    let harness = Harness::start(Options {
        acme_roles: vec![caller_role()],
        ..Options::default()
    })
    .await;
    let (upstream, _stop) = common::guarded_demo_upstream().await;
    let _acme = harness.connect(&harness.acme, &[(SOURCE, &upstream)]).await;
    let before = harness.metrics().await;

    const ECHOES: u64 = 7;
    const TOOL_ERRORS: u64 = 3;
    const DENIED: u64 = 4;
    let mut agent = Agent::new(&harness.url(SOURCE), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    common::mixed_calls(&agent, "m", ECHOES, TOOL_ERRORS, DENIED).await;
    let after = harness.metrics().await;

    let delta = |filter: &[(&str, &str)]| {
        let mut filter = filter.to_vec();
        filter.push(("source", SOURCE));
        total(&after, "mcp_tunnel_calls_total", &filter)
            - total(&before, "mcp_tunnel_calls_total", &filter)
    };
    let calls = 1 + ECHOES + TOOL_ERRORS + DENIED;
    assert_eq!(
        delta(&[]),
        calls as f64,
        "every call counted once:\n{after}"
    );
    assert_eq!(delta(&[("outcome", "ok")]), (1 + ECHOES) as f64);
    assert_eq!(delta(&[("outcome", "tool_error")]), TOOL_ERRORS as f64);
    assert_eq!(delta(&[("outcome", "error")]), DENIED as f64);
    assert_eq!(delta(&[("decision", "deny")]), DENIED as f64);
    assert_eq!(
        delta(&[("decision", "allow")]),
        (1 + ECHOES + TOOL_ERRORS) as f64
    );
    assert_eq!(
        delta(&[("tool", "echo"), ("tenant", "acme")]),
        ECHOES as f64
    );
    let latency_count = |text: &str| {
        total(
            text,
            "mcp_tunnel_call_duration_seconds_count",
            &[("source", SOURCE)],
        )
    };
    assert_eq!(
        latency_count(&after) - latency_count(&before),
        calls as f64,
        "one latency sample per call"
    );
    assert_live_gauges(&after, SOURCE);
}

/// Bytes out of `source` are counted, and the live tunnel's connections, RTT and the
/// runtime's tasks are exposed.
fn assert_live_gauges(after: &str, source: &str) {
    assert!(
        total(
            after,
            "mcp_tunnel_call_bytes_out_total",
            &[("source", source)]
        ) > 0.0,
        "bytes out counted"
    );
    assert!(
        total(after, "mcp_tunnel_connections", &[("transport", "quic")]) >= 1.0,
        "tunnel connections by transport:\n{after}"
    );
    assert!(
        !samples(after, "mcp_tunnel_rtt_seconds").is_empty(),
        "the live tunnel's RTT:\n{after}"
    );
    assert!(
        samples(after, "mcp_tunnel_runtime_tasks")
            .iter()
            .any(|(_, value)| *value >= 1.0),
        "the runtime's live tasks:\n{after}"
    );
}

// ---------------------------------------------------------------------------------------------
// kill -9 of the relay binary under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answer_an_agent_saw_has_its_row_after_kill_9() {
    use mcp_tunnel::govern::identity::new_secret;

    common::init_tracing();
    let (dir, certs) = common::cert_dir();
    let db = dir.path().join("audit.db");
    let tunnel_token = new_secret("mcpt_tok_");
    let api_key = new_secret("mcpt_key_");
    let config = common::write_config(
        dir.path(),
        &format!(
            "{}\n[audit]\npath = \"audit.db\"\n{}",
            common::LISTENERS,
            common::acme_tenant(&tunnel_token, &api_key),
        ),
    );

    let common::RelayProcess {
        peer: mut relay,
        tunnel,
        agents,
    } = common::RelayProcess::start(&config).await;

    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let upstream = common::demo_upstream(&stop).await;
    let settings =
        common::quic_settings(tunnel, &tunnel_token, &certs.ca_pem, &[("demo", &upstream)]);
    tokio::spawn(mcp_tunnel::client::run(settings, stop.child_token()));
    relay
        .wait_for_line("\"tunnel connected\"", |l| l.contains("tunnel connected"))
        .await;

    let url = format!("http://{agents}/mcp/demo");
    let (answered, mut loaders) = load_until_answered(&url, &api_key).await;

    // SIGKILL by PID, mid-load.
    relay.signal(libc::SIGKILL);
    let _ = tokio::time::timeout(WAIT, relay.child.0.wait()).await;
    tokio::time::timeout(WAIT, async { while loaders.join_next().await.is_some() {} })
        .await
        .expect("every loader stops once the relay is gone");

    // Read the trail as the crash left it (WAL and all).
    let answered = answered.lock().expect("lock").clone();
    assert_every_answer_has_a_row(&export(&db).await, &answered);
    assert_verifies(&db).await;
}

// ---------------------------------------------------------------------------------------------
// A relay restarted on a trail (issue 13, item 5): a crash tail is signed and the relay goes
// on; a forged trail is refused unless the operator begins a new epoch, which the trail keeps.

/// A call record of `tenant` at `time_ms`.
fn call(tenant: &str, n: u64, time_ms: u64) -> mcp_tunnel::govern::audit::Record {
    mcp_tunnel::govern::audit::Record {
        time_ms,
        subject: format!("agent@{tenant}.example"),
        roles: vec!["caller".into()],
        source: "demo".into(),
        tool: Some("echo".into()),
        rule: "role caller".into(),
        bytes_in: 10,
        bytes_out: 20,
        ..mcp_tunnel::govern::audit::Record::example(tenant, n)
    }
}

/// A relay config in `dir` for fleet id `relay-a` with its trail in `audit.db`.
fn relay_a_config(dir: &Path) -> std::path::PathBuf {
    use mcp_tunnel::govern::identity::new_secret;
    common::write_config(
        dir,
        &format!(
            "{}\n[fleet]\nid = \"relay-a\"\n\n[audit]\npath = \"audit.db\"\n{}",
            common::LISTENERS,
            common::acme_tenant(&new_secret("mcpt_tok_"), &new_secret("mcpt_key_")),
        ),
    )
}

/// Appends `times.len()` acme rows at those times as relay `relay-a` (the relay binary's
/// chain for `relay_a_config`), then closes the trail.
async fn write_as_relay_a(db: &Path, times: &[u64]) {
    let mut config = audit_at(db);
    config.relay_id = Some("relay-a".into());
    config.checkpoint_rows = 4;
    let auditor = mcp_tunnel::govern::audit::Auditor::open(&config).expect("open the trail");
    for (n, time) in times.iter().enumerate() {
        auditor
            .append(call("acme", n as u64, *time))
            .await
            .expect("append");
    }
    auditor.close().await;
}

/// A directory with dev certificates and `relay_a_config`, and its trail (`audit.db`) holding
/// acme rows at `times` as relay-a wrote them; returns the directory, the config and the trail.
async fn relay_a_trail(
    times: &[u64],
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let (dir, _certs) = common::cert_dir();
    let config = relay_a_config(dir.path());
    let db = dir.path().join("audit.db");
    write_as_relay_a(&db, times).await;
    (dir, config, db)
}

/// `audit verify --db DB --public-key DIR/audit.key.pub`: success and stdout + stderr.
async fn verify_with_key(db: &Path) -> (bool, String) {
    let key = db.with_file_name("audit.key.pub");
    let (ok, stdout, stderr) = mcp_tunnel(&[
        "audit",
        "verify",
        "--db",
        &db.display().to_string(),
        "--public-key",
        &key.display().to_string(),
    ])
    .await;
    (ok, format!("{stdout}{stderr}"))
}

/// Starts the relay binary on `config` with `extra` arguments, waits until it listens, stops
/// it with SIGTERM (a graceful close that signs the trail) and waits for it to exit.
async fn run_relay_once(config: &Path, extra: &[&str]) -> String {
    let mut relay = common::Peer::start(
        "relay",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
            .arg("relay")
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
    );
    relay
        .wait_for_line("\"relay listening\"", |l| l.contains("relay listening"))
        .await;
    relay.signal(libc::SIGTERM);
    let status = relay.exit_status(tokio::time::Instant::now() + WAIT).await;
    assert!(status.success(), "{status:?}\n{}", relay.output());
    relay.output()
}

/// The relay binary on `config` must refuse to start; returns what it printed.
async fn relay_refuses(config: &Path) -> String {
    let output = common::run_cli(&["relay", "--config", &config.display().to_string()]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "the relay must refuse\n{text}");
    text
}

#[tokio::test]
async fn a_relay_restarted_after_a_crash_signs_the_crash_tail_and_goes_on() {
    let now = now_ms();
    let (_dir, config, db) =
        relay_a_trail(&[now, now + 1, now + 2, now + 3, now + 4, now + 5]).await;
    // What a crash leaves: the rows after the last checkpoint of the run, unsigned.
    let conn = rusqlite::Connection::open(&db).expect("open");
    conn.execute_batch("DELETE FROM checkpoints WHERE kind = 'close';")
        .expect("drop the close checkpoint");
    drop(conn);
    let (ok, out) = verify_with_key(&db).await;
    assert!(ok, "a crash tail is not tampering\n{out}");
    assert!(
        out.contains("warning: ") && out.contains("a crash tail"),
        "{out}"
    );

    run_relay_once(&config, &[]).await;
    let (ok, out) = verify_with_key(&db).await;
    assert!(ok, "{out}");
    assert!(
        !out.contains("warning"),
        "the start checkpoint signed the tail\n{out}"
    );
    assert!(out.contains("ended without a close checkpoint"), "{out}");
}

#[tokio::test]
async fn a_new_epoch_does_not_launder_rewritten_rows() {
    let now = now_ms();
    let (_dir, config, db) =
        relay_a_trail(&[now, now + 1, now + 2, now + 3, now + 4, now + 5]).await;
    // The checkpoints kept, every row rewritten: they sign other heads.
    rewrite_rows(&db, |record| record.tool = Some("drop_tables".into()));
    let refused = relay_refuses(&config).await;
    assert!(
        refused.contains("refusing to sign over it") && refused.contains("rewritten"),
        "{refused}"
    );
    run_relay_once(&config, &["--new-audit-epoch"]).await;
    let (ok, out) = verify_with_key(&db).await;
    println!("{out}");
    assert_fails_naming(ok, &out, &["began epoch 2", "checkpoint mismatch"]);
}

#[tokio::test]
async fn a_relay_refuses_a_forged_trail_unless_told_to_begin_a_new_epoch() {
    // An hour of calls, a minute apart, signed every 4 rows.
    let now = now_ms();
    let times: Vec<u64> = (0..60).map(|i| now + i * 60_000).collect();
    let (_dir, config, db) = relay_a_trail(&times).await;

    // Rows rewritten with fresh hashes (a whole chain again), the checkpoints deleted.
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute_batch("DELETE FROM checkpoints;")
        .expect("delete the checkpoints");
    rewrite_rows(&db, |record| record.tool = Some("drop_tables".into()));
    let (ok, out) = verify_with_key(&db).await;
    assert!(!ok && out.contains("no checkpoint"), "{out}");

    // The relay will not sign over it...
    let refused = relay_refuses(&config).await;
    assert!(
        refused.contains("refusing to sign over it")
            && refused.contains("--new-audit-epoch")
            && refused.contains("checkpoints were deleted"),
        "{refused}"
    );
    let (ok, out) = verify_with_key(&db).await;
    assert!(
        !ok && out.contains("no checkpoint"),
        "nothing was signed\n{out}"
    );

    // ...unless told to begin a new epoch, which the trail then shows, with why; and what came
    // before it still fails.
    run_relay_once(&config, &["--new-audit-epoch"]).await;
    let (ok, out) = verify_with_key(&db).await;
    println!("{out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains("warning: relay \"relay-a\" began epoch 2 at checkpoint 1")
            && out.contains("checkpoints were deleted"),
        "{out}"
    );
    assert!(
        out.contains("unsigned rows past the checkpoint interval")
            && out.contains("epoch checkpoint 1"),
        "{out}"
    );
}
