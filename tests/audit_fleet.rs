//! The fleet's audit trail in PostgreSQL, end to end (issue 16): relays with `[audit] url`
//! answer from their local spool and ship every row into one real database the test starts
//! itself; nothing is lost or written twice when a relay is killed or the database is away.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::audit::{
    ANSWERS_BEFORE_KILL, assert_every_answer_has_a_row, caller_role, load_until_answered,
};
use common::postgres::{Postgres, assert_chains_whole, rows, spool_rows};
use common::{Agent, Fleet, Harness, Options, TenantCreds, WAIT, percentile, tool_text};
use mcp_tunnel::govern::audit::postgres::OnDatabaseDown;
use mcp_tunnel::govern::audit::{AuditSettings, DatabaseSettings, digest};
use serde_json::{Value, json};

/// The tests of this file run one at a time: `/metrics` is one per process, and two of them
/// read its audit gauges.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The audit settings of relay `id` of a fleet: its spool in `dir`, shipping to `url`.
fn shipping(dir: &Path, id: &str, url: &str, on_down: OnDatabaseDown) -> AuditSettings {
    let mut audit = AuditSettings::new(dir.join(format!("{id}-spool.db")));
    audit.relay_id = Some(id.into());
    audit.database = Some(DatabaseSettings {
        url: url.into(),
        password_file: None,
        on_down,
    });
    audit
}

/// A relay of `fleet` (acme holding the `caller` role) with `audit`; with the tenants' `creds`
/// of another relay of the fleet, or fresh ones.
async fn relay(
    fleet: &Fleet,
    creds: Option<(TenantCreds, TenantCreds)>,
    audit: AuditSettings,
) -> Harness {
    Harness::start(Options {
        creds,
        acme_roles: vec![caller_role()],
        audit: Some(audit),
        ..fleet.options()
    })
    .await
}

/// The digest a row keeps of a call's params.
fn params_digest(params: &Value) -> String {
    digest(params.to_string().as_bytes())
}

/// A stateless-era (2026-07-28) `tools/call` of `tool` with `arguments`; returns the answer.
async fn stateless_call(agent: &Agent, id: u64, tool: &str, arguments: Value) -> Value {
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments,"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}});
    let response = agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(body.to_string())
        .send()
        .await
        .expect("stateless call is sent");
    common::read_answer(response).await.response().clone()
}

/// On relay `harness` (named `tag`): a session-era agent's echoes, a tool error, a denied call
/// and an upstream error, then stateless-era echoes and a denied call. Every call's params
/// are unique to it; returns their digests (each must have exactly one row).
async fn mixed_load(harness: &Harness, tag: &str) -> Vec<String> {
    let mut digests = Vec::new();
    let mut session = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(session.initialize().await.status, 200);
    for n in 1..=3u64 {
        let message = format!("{tag}-session-{n}");
        assert_eq!(session.echo(n, &message).await, message);
        digests.push(params_digest(
            &json!({"name":"echo","arguments":{"message":message}}),
        ));
    }
    // Unique per relay: the tag's last byte (its number).
    let overflow = json!({"a": i64::MAX, "b": tag.bytes().last()});
    let answer = session.call_tool(4, "add", overflow.clone()).await;
    assert_eq!(answer.response()["result"]["isError"], true, "{answer:?}");
    digests.push(params_digest(&json!({"name":"add","arguments":overflow})));
    let denied = json!({"ms": 1, "tag": tag});
    let answer = session.call_tool(5, "sleep", denied.clone()).await;
    assert_eq!(answer.response()["error"]["code"], -32602, "{answer:?}");
    digests.push(params_digest(&json!({"name":"sleep","arguments":denied})));
    let unknown = session
        .post(&json!({"jsonrpc":"2.0","id":6,"method":"no/such/method","params":{"tag":tag}}))
        .await;
    assert!(unknown.response()["error"]["code"].is_i64(), "{unknown:?}");
    digests.push(params_digest(&json!({"tag": tag})));

    let stateless = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    for n in 1..=3u64 {
        let message = format!("{tag}-stateless-{n}");
        let arguments = json!({"message": message});
        let answer = stateless_call(&stateless, 10 + n, "echo", arguments.clone()).await;
        assert_eq!(tool_text(&answer), message, "{answer}");
        digests.push(params_digest(&json!({"name":"echo","arguments":arguments,"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}})));
    }
    let denied = json!({"ms": 2, "tag": tag});
    let answer = stateless_call(&stateless, 20, "sleep", denied.clone()).await;
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    digests.push(params_digest(&json!({"name":"sleep","arguments":denied,"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}})));
    digests
}

/// How many of `rows` keep each of `digests`: exactly one each.
fn assert_one_row_each(rows: &[common::postgres::PgRow], digests: &[String]) {
    for digest in digests {
        let found = rows
            .iter()
            .filter(|r| r.record["args_sha256"] == digest.as_str())
            .count();
        assert_eq!(
            found,
            1,
            "rows of the call with params digest {digest}: {:#?}",
            rows.iter()
                .filter(|r| r.record["args_sha256"] == digest.as_str())
                .collect::<Vec<_>>()
        );
    }
}

/// `mcp-tunnel audit verify --db URL` passes; returns its output.
async fn assert_verifies(url: &str) -> String {
    let output = common::run_cli(&["audit", "verify", "--db", url]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "audit verify fails:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_write_one_database_one_row_per_answered_call_of_a_mixed_load() {
    let _serial = SERIAL.lock().await;
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = Fleet::new();
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let mut relays: Vec<(Harness, PathBuf)> = Vec::new();
    for id in ["relay-1", "relay-2"] {
        let audit = shipping(dir.path(), id, &pg.url(), OnDatabaseDown::Spool);
        let creds = relays
            .first()
            .map(|(h, _)| (h.acme.clone(), h.other.clone()));
        let spool = audit.path.clone();
        relays.push((relay(&fleet, creds, audit).await, spool));
    }
    let mut connects = Vec::new();
    for (harness, _) in &relays {
        connects.push(harness.connect(&harness.acme, &[("demo", &upstream)]).await);
    }
    // Both relays under load at once.
    let (first, second) = tokio::join!(
        mixed_load(&relays[0].0, "relay-1"),
        mixed_load(&relays[1].0, "relay-2")
    );
    let digests: Vec<String> = first.into_iter().chain(second).collect();

    // Each relay ships the rest at its close.
    let mut spooled = 0;
    for (harness, spool) in relays {
        harness.stop().await;
        spooled += spool_rows(&spool);
    }
    let rows = rows(&pg.url()).await;
    assert_eq!(
        rows.len() as i64,
        spooled,
        "the database holds every spooled row once"
    );
    assert_one_row_each(&rows, &digests);
    for id in ["relay-1", "relay-2"] {
        assert!(rows.iter().any(|r| r.relay == id), "rows of {id}");
    }
    assert_chains_whole(&rows);
    let report = assert_verifies(&pg.url()).await;
    assert!(report.contains("of 2 relays"), "{report}");
}

/// The rows of the trail in the database at `url` reach `count` (bounded wait).
async fn wait_database_rows(url: &str, count: i64) {
    let client = common::postgres::client(url).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let n: i64 = client
                .query_one("SELECT count(*) FROM records", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if n >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the database reaches {count} rows"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_relay_under_load_every_answered_call_has_its_row_in_the_database() {
    let _serial = SERIAL.lock().await;
    use mcp_tunnel::govern::identity::new_secret;

    common::init_tracing();
    let pg = Postgres::start();
    let (dir, certs) = common::cert_dir();
    let spool = dir.path().join("audit-spool.db");
    let tunnel_token = new_secret("mcpt_tok_");
    let api_key = new_secret("mcpt_key_");
    // `url` without `path`: the spool defaults to audit-spool.db beside the config.
    let config = common::write_config(
        dir.path(),
        &format!(
            "{}\n[audit]\nurl = \"{}\"\n{}",
            common::LISTENERS,
            pg.url(),
            common::acme_tenant(&tunnel_token, &api_key),
        ),
    );
    let mut relay = common::RelayProcess::start(&config).await;
    let (stop, _stop) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let settings = common::quic_settings(
        relay.tunnel,
        &tunnel_token,
        &certs.ca_pem,
        &[("demo", &upstream)],
    );
    tokio::spawn(mcp_tunnel::client::run(settings, stop.child_token()));
    relay.wait_for("tunnel connected").await;

    let url = format!("http://{}/mcp/demo", relay.agents);
    let (answered, mut loaders) = load_until_answered(&url, &api_key).await;
    relay.peer.signal(libc::SIGKILL);
    let _ = tokio::time::timeout(WAIT, relay.peer.child.0.wait()).await;
    tokio::time::timeout(WAIT, async { while loaders.join_next().await.is_some() {} })
        .await
        .expect("every loader stops once the relay is gone");
    let answered = answered.lock().expect("lock").clone();
    assert!(answered.len() >= ANSWERS_BEFORE_KILL);

    // Restarted, the relay ships what the crash left in its spool.
    let restarted = common::RelayProcess::start(&config).await;
    wait_database_rows(&pg.url(), spool_rows(&spool)).await;
    let rows = rows(&pg.url()).await;
    let records: Vec<Value> = rows.iter().map(|r| r.record.clone()).collect();
    assert_every_answer_has_a_row(&records, &answered);
    assert_chains_whole(&rows);
    restarted.peer.signal(libc::SIGTERM);
    drop(restarted);
    assert_verifies(&pg.url()).await;
}

/// The value of gauge or counter `name` on `harness`'s `/metrics` (0 when absent).
async fn metric(harness: &Harness, name: &str) -> f64 {
    harness
        .metrics()
        .await
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `harness`'s metric `name` until `done` holds for it (bounded).
async fn wait_metric(harness: &Harness, name: &str, what: &str, done: impl Fn(f64) -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done(metric(harness, name).await) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: {name} never did"));
}

/// Agents calling echo with unique messages until `stop`: what they got answered, and the
/// calls that failed.
struct EchoLoad {
    answered: Arc<parking_lot::Mutex<Vec<String>>>,
    failed: Arc<parking_lot::Mutex<Vec<String>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl EchoLoad {
    fn start(url: &str, key: &str, agents: usize) -> Self {
        let load = Self {
            answered: Arc::default(),
            failed: Arc::default(),
            count: Arc::default(),
            stop: Arc::default(),
            tasks: tokio::task::JoinSet::new(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..agents {
            let mut agent = Agent::new(url, key);
            let (answered, failed, count, stop) = (
                load.answered.clone(),
                load.failed.clone(),
                load.count.clone(),
                load.stop.clone(),
            );
            tasks.spawn(async move {
                assert_eq!(agent.initialize().await.status, 200);
                // Bounded: the test stops it long before.
                for id in 1..=1_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let message = format!("agent{n}-call{id}");
                    let answer = agent
                        .call_tool(id, "echo", json!({"message": message}))
                        .await;
                    if answer.status == 200 && tool_text(answer.response()) == message {
                        answered.lock().push(message);
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.lock().push(format!("{message}: {answer:?}"));
                    }
                    // Paced, so a 20 s outage spools hundreds of rows, not the machine's limit.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        Self { tasks, ..load }
    }

    /// Waits (bounded) until `more` further calls were answered.
    async fn wait_more(&self, more: u64) {
        let target = self.count.load(Ordering::Relaxed) + more;
        tokio::time::timeout(Duration::from_secs(60), async {
            while self.count.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("calls go on being answered");
    }

    async fn stop(mut self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(WAIT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .expect("the agents stop");
        let answered = self.answered.lock().clone();
        let failed = self.failed.lock().clone();
        (answered, failed)
    }
}

/// How long the database is away in [`the_database_away_20_s_under_load_calls_go_on_and_the_spool_drains`].
const OUTAGE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_away_20_s_under_load_calls_go_on_and_the_spool_drains() {
    let _serial = SERIAL.lock().await;
    let mut pg = Postgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = Fleet::new();
    let audit = shipping(dir.path(), "relay-1", &pg.url(), OnDatabaseDown::Spool);
    let spool: PathBuf = audit.path.clone();
    let harness = relay(&fleet, None, audit).await;
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let _connect = harness.connect(&harness.acme, &[("demo", &upstream)]).await;
    let load = EchoLoad::start(&harness.url("demo"), &harness.acme.api_key, 4);
    load.wait_more(40).await;
    wait_metric(&harness, "mcp_tunnel_audit_database_up", "shipping", |v| {
        v == 1.0
    })
    .await;

    pg.pause();
    let before = load.count.load(Ordering::Relaxed);
    tokio::time::sleep(OUTAGE).await;
    let during = load.count.load(Ordering::Relaxed) - before;
    assert!(
        during >= 40,
        "calls go on while the database is away: {during}"
    );
    assert_eq!(metric(&harness, "mcp_tunnel_audit_database_up").await, 0.0);
    // The shipper reads the spool's depth at each attempt to reach the database, up to
    // MAX_BACKOFF (5 s) apart: the gauge shows at least the first three quarters of the outage.
    let depth = metric(&harness, "mcp_tunnel_audit_spool_rows").await;
    assert!(
        depth >= during as f64 / 2.0,
        "the spool holds the outage's rows: {depth} of {during}"
    );
    let age = metric(&harness, "mcp_tunnel_audit_spool_age_seconds").await;
    assert!(age >= 10.0, "the spool's age shows the outage: {age}");

    pg.resume();
    wait_metric(
        &harness,
        "mcp_tunnel_audit_spool_rows",
        "the spool drains",
        |v| v == 0.0,
    )
    .await;
    load.wait_more(20).await;
    let (answered, failed) = load.stop().await;
    assert!(failed.is_empty(), "no call failed: {failed:?}");
    harness.stop().await;

    let rows = rows(&pg.url()).await;
    assert_eq!(
        rows.len() as i64,
        spool_rows(&spool),
        "no row lost or doubled"
    );
    let records: Vec<Value> = rows.iter().map(|r| r.record.clone()).collect();
    assert_every_answer_has_a_row(&records, &answered);
    assert_chains_whole(&rows);
    assert_verifies(&pg.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_database_down_refuse_fails_closed_while_the_database_is_away() {
    let _serial = SERIAL.lock().await;
    let mut pg = Postgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = Fleet::new();
    let audit = shipping(dir.path(), "relay-1", &pg.url(), OnDatabaseDown::Refuse);
    let harness = relay(&fleet, None, audit).await;
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let _connect = harness.connect(&harness.acme, &[("demo", &upstream)]).await;
    wait_metric(&harness, "mcp_tunnel_audit_database_up", "shipping", |v| {
        v == 1.0
    })
    .await;
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    assert_eq!(agent.echo(1, "before").await, "before");

    pg.pause();
    // Refused once the shipper finds the database gone (at once: its connection closed).
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        for id in 2.. {
            let answer = agent
                .call_tool(id, "echo", json!({"message": "during"}))
                .await;
            if answer.response()["error"]["code"] == -32003 {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!("the loop ends by returning")
    })
    .await
    .expect("calls are refused while the database is away");
    // Unavailable, saying when to come back: a load balancer or client may go elsewhere.
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(
        refused.error_message().contains("does not answer")
            || refused.error_message().contains("has not taken rows"),
        "{refused:?}"
    );

    pg.resume();
    wait_metric(&harness, "mcp_tunnel_audit_database_up", "back", |v| {
        v == 1.0
    })
    .await;
    assert_eq!(agent.echo(1000, "after").await, "after");
    harness.stop().await;
    // The refused calls are in the trail, denied for the audit's sake, never sent upstream.
    let rows = rows(&pg.url()).await;
    let refused: Vec<&Value> = rows
        .iter()
        .map(|r| &r.record)
        .filter(|r| r["outcome"]["code"] == -32003)
        .collect();
    assert!(!refused.is_empty());
    for row in refused {
        assert_eq!(row["decision"], "deny", "{row}");
        assert!(
            row["rule"]
                .as_str()
                .is_some_and(|r| r.starts_with("audit: ")),
            "{row}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark (issue 16): what the PostgreSQL trail costs a call against the SQLite trail and
// against no trail, in one run.

/// Sequential echo calls per path per round, and rounds (paths alternate each round, so drift
/// in the machine's load hits all three alike).
const BENCH_CALLS: usize = 500;
const BENCH_ROUNDS: usize = 4;
/// Concurrent agents, and calls each, in the throughput phase.
const BENCH_AGENTS: usize = 64;
const BENCH_AGENT_CALLS: usize = 50;

/// One path of the benchmark: a relay with its trail (or none), and a session on it.
struct BenchPath {
    name: &'static str,
    harness: Harness,
    agent: Agent,
    latencies_ms: Vec<f64>,
}

/// `calls` sequential echoes on `agent`; their round trips in ms.
async fn echo_round(agent: &Agent, calls: usize, from: u64) -> Vec<f64> {
    let mut out = Vec::with_capacity(calls);
    for n in 0..calls as u64 {
        let started = std::time::Instant::now();
        let message = format!("bench-{}", from + n);
        assert_eq!(agent.echo(from + n, &message).await, message);
        out.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    out
}

/// `BENCH_AGENTS` sessions calling echo `BENCH_AGENT_CALLS` times each at once on `url`;
/// returns the calls per second.
async fn echo_storm(url: &str, key: &str) -> f64 {
    let mut agents = Vec::new();
    for _ in 0..BENCH_AGENTS {
        let mut agent = Agent::new(url, key);
        assert_eq!(agent.initialize().await.status, 200);
        agents.push(agent);
    }
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (a, agent) in agents.into_iter().enumerate() {
        tasks.spawn(async move {
            for n in 0..BENCH_AGENT_CALLS as u64 {
                let message = format!("storm-{a}-{n}");
                assert_eq!(agent.echo(n + 1, &message).await, message);
            }
            // Ended, so storm after storm stays under the sessions-per-key cap.
            agent.delete().await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("an agent of the storm");
    }
    (BENCH_AGENTS * BENCH_AGENT_CALLS) as f64 / started.elapsed().as_secs_f64()
}

/// The sum and count of histogram `name` in Prometheus text.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{suffix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (value("_sum"), value("_count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo test --release --test audit_fleet audit_database_benchmark -- --ignored --nocapture"]
async fn audit_database_benchmark() {
    let _serial = SERIAL.lock().await;
    let mut pg = Postgres::start_durable();
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = Fleet::new();
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let mut sqlite = AuditSettings::new(dir.path().join("sqlite.db"));
    sqlite.relay_id = Some("sqlite".into());
    let trails = [
        ("none", None),
        ("sqlite", Some(sqlite)),
        (
            "postgres",
            Some(shipping(
                dir.path(),
                "postgres",
                &pg.url(),
                OnDatabaseDown::Spool,
            )),
        ),
    ];
    let mut paths = Vec::new();
    let mut connects = Vec::new();
    for (name, audit) in trails {
        let harness = Harness::start(Options {
            audit,
            ..fleet.options()
        })
        .await;
        connects.push(harness.connect(&harness.acme, &[("demo", &upstream)]).await);
        let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
        assert_eq!(agent.initialize().await.status, 200);
        // Warm up: connections, caches, the trail's first pages.
        echo_round(&agent, 50, 1_000_000).await;
        paths.push(BenchPath {
            name,
            harness,
            agent,
            latencies_ms: Vec::new(),
        });
    }
    for round in 0..BENCH_ROUNDS {
        for path in &mut paths {
            let from = (round * BENCH_CALLS) as u64 + 1;
            let round = echo_round(&path.agent, BENCH_CALLS, from).await;
            path.latencies_ms.extend(round);
        }
    }
    let base_p50 = percentile(&paths[0].latencies_ms, 50.0);
    let base_p99 = percentile(&paths[0].latencies_ms, 99.0);
    println!(
        "\naudit trail benchmark: {} sequential echo calls per path ({BENCH_ROUNDS} alternating rounds)",
        BENCH_CALLS * BENCH_ROUNDS
    );
    println!("path       p50 ms  p99 ms  added p50  added p99");
    for path in &paths {
        let (p50, p99) = (
            percentile(&path.latencies_ms, 50.0),
            percentile(&path.latencies_ms, 99.0),
        );
        println!(
            "{:<9} {p50:>7.3} {p99:>7.3} {:>+10.3} {:>+10.3}",
            path.name,
            p50 - base_p50,
            p99 - base_p99
        );
    }

    println!(
        "\n{BENCH_AGENTS} concurrent sessions x {BENCH_AGENT_CALLS} echo calls ({} calls per path)",
        BENCH_AGENTS * BENCH_AGENT_CALLS
    );
    println!("path       calls/s  ratio to none");
    let mut base_rate = 0.0;
    for path in &paths {
        let rate = echo_storm(&path.harness.url("demo"), &path.harness.acme.api_key).await;
        if path.name == "none" {
            base_rate = rate;
        }
        println!("{:<9} {rate:>8.0} {:>8.2}x", path.name, rate / base_rate);
    }

    // The database's side: how fast the spool drains into it, rows per transaction.
    let pg_path = &paths[2];
    let shipped_before = metric(&pg_path.harness, "mcp_tunnel_audit_shipped_total").await;
    let before = pg_path.harness.metrics().await;
    let cpu_before = (
        common::thread_cpu_micros("audit-shipper"),
        pg.cpu_micros(),
        common::thread_cpu_micros("audit-writer"),
    );
    let started = std::time::Instant::now();
    let rate = echo_storm(&pg_path.harness.url("demo"), &pg_path.harness.acme.api_key).await;
    wait_metric(
        &pg_path.harness,
        "mcp_tunnel_audit_spool_rows",
        "the spool drains",
        |v| v == 0.0,
    )
    .await;
    let drained = started.elapsed().as_secs_f64();
    let shipped = metric(&pg_path.harness, "mcp_tunnel_audit_shipped_total").await - shipped_before;
    let after = pg_path.harness.metrics().await;
    let cpu_per_row = |now: u64, before: u64| now.saturating_sub(before) as f64 / shipped.max(1.0);
    let (shipper_us, server_us, writer_us) = (
        cpu_per_row(common::thread_cpu_micros("audit-shipper"), cpu_before.0),
        cpu_per_row(pg.cpu_micros(), cpu_before.1),
        cpu_per_row(common::thread_cpu_micros("audit-writer"), cpu_before.2),
    );
    // Rows per transaction during this storm alone: the histograms' growth.
    let per_commit = |name: &str| {
        let ((s0, c0), (s1, c1)) = (histogram(&before, name), histogram(&after, name));
        (s1 - s0) / (c1 - c0).max(1.0)
    };
    println!(
        "\npostgres, one more storm: {shipped:.0} rows shipped in {drained:.2} s from its start to an \
         empty spool ({:.0} rows/s; the storm {rate:.0} calls/s); {:.1} rows per database \
         transaction, {:.1} rows per SQLite commit of the spool",
        shipped / drained,
        per_commit("mcp_tunnel_audit_ship_batch_rows"),
        per_commit("mcp_tunnel_audit_batch_rows"),
    );
    println!(
        "CPU per row in that storm: shipper thread {shipper_us:.1} µs, database server \
         {server_us:.1} µs, the SQLite writer thread {writer_us:.1} µs (rows it committed \
         inline on the callers' threads are not in that figure); 10 ms clock ticks"
    );

    // The shipper alone: a backlog made while the database is away, drained once it is back.
    pg.pause();
    for _ in 0..2 {
        echo_storm(&pg_path.harness.url("demo"), &pg_path.harness.acme.api_key).await;
    }
    let shipped_before = metric(&pg_path.harness, "mcp_tunnel_audit_shipped_total").await;
    pg.resume();
    // From the first rows seen shipped (their batch not counted) to an empty spool.
    let (first, at_first, last) = tokio::time::timeout(Duration::from_secs(60), async {
        let mut first = None;
        loop {
            let shipped = metric(&pg_path.harness, "mcp_tunnel_audit_shipped_total").await;
            if shipped > shipped_before && first.is_none() {
                first = Some((std::time::Instant::now(), shipped));
            }
            if let Some((at, at_first)) = first
                && metric(&pg_path.harness, "mcp_tunnel_audit_spool_rows").await == 0.0
            {
                return (at, at_first, std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the backlog drains");
    let total = metric(&pg_path.harness, "mcp_tunnel_audit_shipped_total").await;
    let seconds = (last - first).as_secs_f64().max(0.001);
    println!(
        "postgres, a backlog of {:.0} rows made while the database was away: {:.0} of them \
         shipped in {seconds:.3} s after the first batch ({:.0} rows/s, the shipper alone)",
        total - shipped_before,
        total - at_first,
        (total - at_first) / seconds
    );
    for path in paths {
        path.harness.stop().await;
    }
    let rows = rows(&pg.url()).await;
    assert_chains_whole(&rows);
}

// ---------------------------------------------------------------------------------------------
// TLS to the database: verified against the CA named by `sslrootcert`, never skipped.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified_against_sslrootcert() {
    use mcp_tunnel::govern::audit::postgres::{Target, migrate};

    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = mcp_tunnel::certs::generate(&[]).expect("dev certificates");
    let pg = Postgres::start_tls(&certs.relay_pem, &certs.relay_key);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca_pem).expect("write the CA");
    let base = pg.url();

    // verify-full against the server's CA: connects over TLS.
    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
    let target = Target::new(&url, None).expect("a valid URL");
    let client = target.connect().await.expect("TLS to the database");
    migrate(&client, target.name()).await.expect("migrates");
    let tls: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(tls, "the session is encrypted");

    // Another CA: refused, whatever the mode asks (require verifies too).
    let other = mcp_tunnel::certs::generate(&[]).expect("other certificates");
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, &other.ca_pem).expect("write the other CA");
    for mode in ["require", "verify-ca", "verify-full", "prefer"] {
        let url = format!("{base}?sslmode={mode}&sslrootcert={}", other_ca.display());
        let err = Target::new(&url, None)
            .expect("a valid URL")
            .connect()
            .await
            .expect_err("a certificate of another CA is refused");
        let text = err.to_string();
        assert!(!text.contains("password"), "{text}");
        assert!(
            text.to_lowercase().contains("certificate") || text.contains("tls"),
            "sslmode={mode}: {text}"
        );
    }
}
