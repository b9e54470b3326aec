//! Graceful shutdown of real processes: the relay binary on SIGTERM during a load of calls (no
//! call hangs; each succeeds or gets an error that names the shutdown), and the `connect`
//! binary on SIGTERM (the relay forgets its tunnel at once, and it exits 0).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    AcmeRelay, Agent, Harness, Options, Peer, RelayProcess, WAIT, quic_settings, sse_data,
};
use mcp_tunnel::client;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// From SIGTERM: every call has ended and the relay has exited. The relay's grace period is
/// 10 s, then 2 s for the last answers and up to 2 s for QUIC closes.
const BOUND: Duration = Duration::from_secs(25);
/// The relay's grace period for calls in flight (`DRAIN_TIMEOUT` in src/relay/mod.rs).
const GRACE: Duration = Duration::from_secs(10);
/// Sessions issuing short calls in a loop.
const SHORT_SESSIONS: usize = 8;
const SHORT_MS: u64 = 200;
/// Calls that outlive the grace period, each in its own session.
const LONG_CALLS: usize = 2;
const LONG_MS: u64 = 30_000;

// ---------------------------------------------------------------------------------------------
// Logs of the in-process parts (connect), kept so a test can assert on them.

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Writes each log line to the captured test output and to [`LOG`].
struct Tee;

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().expect("log lock").extend_from_slice(buf);
        print!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mcp_tunnel=debug,warn".into()),
        )
        .with_ansi(false)
        .with_writer(|| Tee)
        .try_init();
}

fn logged() -> String {
    String::from_utf8_lossy(&LOG.lock().expect("log lock")).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Agent calls that report how they ended instead of panicking.

#[derive(Debug, Clone)]
enum Outcome {
    /// The tool's text.
    Ok(String),
    /// A JSON-RPC error's message.
    RpcError(String),
    /// No JSON-RPC answer at all: a transport error, or a body without the response.
    Failed(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok(text) => write!(f, "succeeded: {text:?}"),
            Outcome::RpcError(message) => write!(f, "JSON-RPC error: {message:?}"),
            Outcome::Failed(why) => write!(f, "no JSON-RPC answer: {why}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    session: usize,
    ms: u64,
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

/// Calls `sleep` with `ms` and classifies what came back.
async fn sleep_call(agent: &Agent, id: u64, ms: u64) -> Outcome {
    let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"sleep","arguments":{"ms":ms}}});
    let response = match agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => return Outcome::Failed(format!("request failed: {}", chain(&e))),
    };
    let status = response.status();
    let is_sse = common::is_event_stream(response.headers());
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => {
            return Outcome::Failed(format!("HTTP {status}, body failed: {}", chain(&e)));
        }
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let messages: Vec<Value> = if is_sse {
        sse_data(&bytes)
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    } else {
        serde_json::from_slice(&bytes).into_iter().collect()
    };
    let answer = messages.iter().find(|m| {
        m.get("id") == Some(&json!(id)) && (m.get("result").is_some() || m.get("error").is_some())
    });
    match answer {
        Some(m) if m.get("error").is_some() => Outcome::RpcError(
            m["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        Some(m) if m["result"]["isError"] == json!(true) => {
            Outcome::Failed(format!("tool error: {m}"))
        }
        Some(m) => Outcome::Ok(
            m["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        None => Outcome::Failed(format!(
            "HTTP {status}, no response to id {id} in: {text:?}"
        )),
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Calls in flight, by (session, id): a call still here at the deadline hung.
type InFlight = Arc<Mutex<HashMap<(usize, u64), (u64, Instant)>>>;

async fn tracked_call(
    agent: &Agent,
    session: usize,
    id: u64,
    ms: u64,
    in_flight: &InFlight,
    records: &Arc<Mutex<Vec<Record>>>,
) -> Outcome {
    let started = Instant::now();
    in_flight
        .lock()
        .expect("lock")
        .insert((session, id), (ms, started));
    let outcome = sleep_call(agent, id, ms).await;
    records.lock().expect("lock").push(Record {
        session,
        ms,
        started,
        ended: Instant::now(),
        outcome: outcome.clone(),
    });
    in_flight.lock().expect("lock").remove(&(session, id));
    outcome
}

// ---------------------------------------------------------------------------------------------

/// The `[admin]` section of the relays of these tests (every listener on 127.0.0.1:0).
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_sigterm_during_load_no_call_hangs_and_errors_name_the_shutdown() {
    sigterm_during_load(mcp_tunnel::config::TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_sigterm_during_load_over_auto_no_call_hangs_and_errors_name_the_shutdown() {
    sigterm_during_load(mcp_tunnel::config::TransportChoice::Auto).await;
}

/// SIGTERM to the relay binary during a load of calls through a `connect` on `transport`.
async fn sigterm_during_load(transport: mcp_tunnel::config::TransportChoice) {
    init_tracing();
    let AcmeRelay {
        dir: _dir,
        certs,
        tunnel_token,
        api_key,
        relay:
            RelayProcess {
                peer: mut relay,
                tunnel,
                agents,
            },
        ..
    } = AcmeRelay::start(ADMIN).await;

    let (upstream, _upstream_guard) = common::guarded_demo_upstream().await;
    let mut settings = quic_settings(tunnel, &tunnel_token, &certs.ca_pem, &[("demo", &upstream)]);
    settings.transport = transport;
    let connect_stop = CancellationToken::new();
    let _connect_guard = connect_stop.clone().drop_guard();
    let connect = tokio::spawn(client::run(settings, connect_stop.clone()));
    relay
        .wait_for_line("\"tunnel connected\"", |l| l.contains("tunnel connected"))
        .await;

    let sessions = open_sessions(&format!("http://{agents}/mcp/demo"), &api_key).await;
    let mut load = Load::start(sessions).await;

    // No new calls from now on; the ones just issued reach the relay before SIGTERM does.
    load.stop_issuing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sigterm_at = Instant::now();
    let deadline = tokio::time::Instant::from_std(sigterm_at + BOUND);
    relay.signal(libc::SIGTERM);
    load.wait_until_every_call_ended(&relay, sigterm_at, deadline)
        .await;
    let status = relay.exit_status(deadline).await;
    let exited_after = sigterm_at.elapsed();

    let records = load.records.lock().expect("lock").clone();
    let report = || {
        let mut lines: Vec<String> = records
            .iter()
            .filter(|r| r.ended >= sigterm_at)
            .map(|r| {
                format!(
                    "session {} sleep {} ms: ended {:?} after SIGTERM: {}",
                    r.session,
                    r.ms,
                    r.ended - sigterm_at,
                    r.outcome
                )
            })
            .collect();
        lines.sort();
        format!(
            "calls ending after SIGTERM:\n{}\nrelay exited {exited_after:?} after SIGTERM: {status}\nrelay output:\n{}",
            lines.join("\n"),
            relay.output()
        )
    };
    let short_in_flight = assert_every_call_served_or_told(&records, sigterm_at, &report);
    assert!(
        status.success(),
        "relay exited with {status} ({exited_after:?} after SIGTERM)\n{}",
        report()
    );
    let output = relay.output();
    assert!(
        output.contains("draining"),
        "the relay logs its drain:\n{output}"
    );
    assert_connect_saw_the_drain(connect_stop, connect).await;
    eprintln!(
        "relay exited {exited_after:?} after SIGTERM; {short_in_flight} short calls in flight at SIGTERM all served"
    );
}

/// Ten sessions on `url`: eight for short calls in a loop, two for one long call each.
async fn open_sessions(url: &str, api_key: &str) -> Vec<Agent> {
    let mut sessions = Vec::new();
    for _ in 0..SHORT_SESSIONS + LONG_CALLS {
        let mut agent = Agent::new(url, api_key);
        let answer = agent.initialize().await;
        assert!(
            answer.status == 200 && agent.session.is_some(),
            "session opens: {answer:?}"
        );
        sessions.push(agent);
    }
    sessions
}

/// Calls of every session, tracked: short ones in a loop until `stop_issuing`, one long one in
/// each of the last `LONG_CALLS` sessions.
struct Load {
    calls: tokio::task::JoinSet<()>,
    in_flight: InFlight,
    records: Arc<Mutex<Vec<Record>>>,
    stop_issuing: Arc<AtomicBool>,
}

impl Load {
    /// Starts the calls and returns once load is flowing.
    async fn start(sessions: Vec<Agent>) -> Self {
        let in_flight: InFlight = Arc::default();
        let records: Arc<Mutex<Vec<Record>>> = Arc::default();
        let stop_issuing = Arc::new(AtomicBool::new(false));
        let short_done = Arc::new(AtomicU64::new(0));
        let mut calls = tokio::task::JoinSet::new();
        for (session, agent) in sessions.into_iter().enumerate() {
            let (in_flight, records, stop_issuing, short_done) = (
                in_flight.clone(),
                records.clone(),
                stop_issuing.clone(),
                short_done.clone(),
            );
            calls.spawn(async move {
                if session >= SHORT_SESSIONS {
                    tracked_call(&agent, session, 1, LONG_MS, &in_flight, &records).await;
                    return;
                }
                let mut id = 1;
                while !stop_issuing.load(Ordering::SeqCst) {
                    tracked_call(&agent, session, id, SHORT_MS, &in_flight, &records).await;
                    short_done.fetch_add(1, Ordering::SeqCst);
                    id += 1;
                }
            });
        }
        // Load is flowing: every short session has finished a few calls.
        tokio::time::timeout(WAIT, async {
            while short_done.load(Ordering::SeqCst) < 3 * SHORT_SESSIONS as u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "load did not flow; records: {:?}",
                records.lock().expect("lock")
            )
        });
        Self {
            calls,
            in_flight,
            records,
            stop_issuing,
        }
    }

    /// Waits until every call ended (by `deadline`); a call still open then hung, and fails the
    /// test naming it.
    async fn wait_until_every_call_ended(
        &mut self,
        relay: &Peer,
        sigterm_at: Instant,
        deadline: tokio::time::Instant,
    ) {
        let calls = &mut self.calls;
        let in_flight = &self.in_flight;
        let all_ended = tokio::time::timeout_at(deadline, async {
            while calls.join_next().await.is_some() {}
        })
        .await;
        if all_ended.is_err() {
            calls.abort_all();
            let hung: Vec<String> = in_flight
                .lock()
                .expect("lock")
                .iter()
                .map(|((session, id), (ms, started))| {
                    format!(
                        "session {session} call {id} (sleep {ms} ms, started {:?} before SIGTERM)",
                        sigterm_at.saturating_duration_since(*started)
                    )
                })
                .collect();
            panic!(
                "calls still open {BOUND:?} after SIGTERM: {hung:?}\nrelay output:\n{}",
                relay.output()
            );
        }
    }
}

/// Before SIGTERM every call succeeded; after it each succeeded or got a JSON-RPC error naming
/// the shutdown: the short calls in flight at SIGTERM within the grace period, the long ones
/// after it. Returns how many short calls were in flight at SIGTERM.
fn assert_every_call_served_or_told(
    records: &[Record],
    sigterm_at: Instant,
    report: &dyn Fn() -> String,
) -> usize {
    // Before SIGTERM everything succeeded.
    for record in records.iter().filter(|r| r.ended < sigterm_at) {
        assert!(
            matches!(&record.outcome, Outcome::Ok(text) if *text == format!("slept {} ms", record.ms)),
            "a call before SIGTERM failed: {record:?}\n{}",
            report()
        );
    }
    // Each call either succeeded or got a JSON-RPC error that names the shutdown.
    for record in records {
        let named = matches!(&record.outcome, Outcome::RpcError(message) if message.contains("shutting down"));
        let served = matches!(&record.outcome, Outcome::Ok(text) if *text == format!("slept {} ms", record.ms));
        assert!(
            served || named,
            "a call neither succeeded nor got an error naming the shutdown: {record:?}\n{}",
            report()
        );
    }
    // The short calls in flight at SIGTERM finished within the grace period.
    let short_in_flight: Vec<&Record> = records
        .iter()
        .filter(|r| r.ms == SHORT_MS && r.started < sigterm_at && r.ended >= sigterm_at)
        .collect();
    assert!(
        !short_in_flight.is_empty(),
        "no short call was in flight at SIGTERM: the test proved nothing\n{}",
        report()
    );
    for record in &short_in_flight {
        assert!(
            matches!(record.outcome, Outcome::Ok(_)),
            "a 200 ms call in flight at SIGTERM did not finish within the grace period: {record:?}\n{}",
            report()
        );
    }
    // The long calls outlived the grace period: they got the error, after it and not before.
    let long: Vec<&Record> = records.iter().filter(|r| r.ms == LONG_MS).collect();
    assert_eq!(long.len(), LONG_CALLS, "{}", report());
    for record in long {
        assert!(
            matches!(&record.outcome, Outcome::RpcError(message) if message.contains("shutting down")),
            "a call outliving the grace period got no error naming the shutdown: {record:?}\n{}",
            report()
        );
        let after = record.ended - sigterm_at;
        assert!(
            after >= GRACE - Duration::from_secs(1),
            "a long call was cut after {after:?}, before the {GRACE:?} grace period\n{}",
            report()
        );
    }
    short_in_flight.len()
}

/// connect saw the drain notice (and then tries to reconnect, to a relay that is gone), and
/// stops cleanly once told to.
async fn assert_connect_saw_the_drain(
    connect_stop: CancellationToken,
    connect: tokio::task::JoinHandle<Result<(), mcp_tunnel::client::ClientError>>,
) {
    let log = logged();
    assert!(
        log.contains("the relay is draining this connection"),
        "connect logs the relay's drain notice; its log:\n{log}"
    );
    connect_stop.cancel();
    let ended = tokio::time::timeout(WAIT, connect)
        .await
        .expect("connect stops when its token is cancelled")
        .expect("connect does not panic");
    assert!(ended.is_ok(), "connect ends cleanly: {ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_sigterm_unregisters_its_tunnel_at_once_and_exits_zero() {
    init_tracing();
    let upstream_stop = CancellationToken::new();
    let _upstream_guard = upstream_stop.clone().drop_guard();
    let upstream = common::demo_upstream(&upstream_stop).await;
    let harness = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &harness.ca_pem).expect("write ca.pem");

    let mut connect = Peer::start(
        "connect",
        common::serving_one(
            &mut common::connect_command(harness.tunnel, &ca, &harness.acme.tunnel_token),
            ["--transport", "quic"],
            ("demo", &upstream),
            "info",
        ),
    );
    let registry = &harness.state.registry;
    let up = tokio::time::timeout(WAIT, async {
        // Every connection of the default count is up before the signal.
        while registry.rows().len() < mcp_tunnel::client::DEFAULT_CONNECTIONS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        up.is_ok(),
        "connect registers {} connections; rows {:?}; output:\n{}",
        mcp_tunnel::client::DEFAULT_CONNECTIONS,
        registry.rows(),
        connect.output()
    );
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(
        agent.initialize().await.status,
        200,
        "served through connect"
    );
    let _ = agent.request(reqwest::Method::DELETE).send().await;

    let signalled = Instant::now();
    connect.signal(libc::SIGTERM);
    let gone = tokio::time::timeout(Duration::from_secs(3), async {
        while !registry.rows().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let took = signalled.elapsed();
    assert!(
        gone.is_ok(),
        "the relay still lists connect's tunnels {took:?} after SIGTERM: {:?}\nconnect output:\n{}",
        registry.rows(),
        connect.output()
    );
    assert!(registry.route("acme", "demo").is_none(), "no route left");
    let status = connect
        .exit_status(tokio::time::Instant::now() + WAIT)
        .await;
    assert!(
        status.success(),
        "connect exits 0 on SIGTERM, got {status}; output:\n{}",
        connect.output()
    );
    eprintln!(
        "tunnels gone {took:?} after SIGTERM; connect exited after {:?}",
        signalled.elapsed()
    );
    harness.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A call with progress notifications in flight when the relay drains, for every transport
// choice of `connect` (issue 13, item 15): the draining connection keeps its streams until they
// finish, whatever `connect` does about a replacement.

/// SIGTERM to the relay while `trigger-long-running-operation` (2 s, 2 progress steps) runs
/// through a `connect` on `transport`: the call finishes with its result, after its full
/// duration, and the relay exits only after that.
async fn drain_keeps_a_call_with_progress(transport: &str) {
    use futures_util::StreamExt;
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let (everything, upstream) = common::peers::start_server_everything(node).await;
    let (relay, connect) = relay_with_connect(transport, &upstream).await;
    let AcmeRelay {
        relay:
            RelayProcess {
                peer: mut relay,
                agents,
                ..
            },
        api_key,
        dir: _dir,
        ..
    } = relay;
    let (response, started) = start_progress_call(agents, &api_key).await;
    // The answer's headers came back: the upstream answers with an event stream, so the call
    // is in flight at the upstream, with its whole 2 s ahead.
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    let sigterm_at = Instant::now();
    relay.signal(libc::SIGTERM);
    let rest = tokio::time::timeout(BOUND, async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => seen.extend_from_slice(&chunk),
                Err(e) => return Err(chain(&e)),
            }
        }
        Ok(())
    })
    .await;
    let ended_after = sigterm_at.elapsed();
    let took = started.elapsed();
    let status = relay
        .exit_status(tokio::time::Instant::from_std(sigterm_at + BOUND))
        .await;
    let exited_after = sigterm_at.elapsed();
    let text = String::from_utf8_lossy(&seen).into_owned();
    let report = || {
        format!(
            "transport {transport}: call ended {ended_after:?} after SIGTERM ({took:?} in all), \
             relay exited {exited_after:?} after SIGTERM ({status})\nanswer: {text}\n\
             relay output:\n{}\nconnect output:\n{}",
            relay.output(),
            connect.output()
        )
    };
    assert!(
        matches!(rest, Ok(Ok(()))),
        "the answer streams to its end: {rest:?}\n{}",
        report()
    );
    assert_the_call_ran_to_its_result(&seen, took, &report);
    assert!(status.success(), "the relay exits 0\n{}", report());
    // The draining relay refused the replacement connections (QUIC answered): nothing made
    // `connect` conclude that UDP is blocked and move to the fallback.
    let output = connect.output();
    assert!(
        !output.contains("UDP looks blocked"),
        "a draining relay made connect think UDP is blocked\n{}",
        report()
    );
    eprintln!(
        "transport {transport}: call served {ended_after:?} after SIGTERM; relay exited {exited_after:?} after SIGTERM"
    );
    connect.stop().await;
    everything.stop().await;
}

/// The relay binary, and the `connect` binary on `transport` serving `everything` from
/// `upstream` through it, every connection of the default count up.
async fn relay_with_connect(transport: &str, upstream: &str) -> (AcmeRelay, Peer) {
    let mut relay = AcmeRelay::start(ADMIN).await;
    let connect = Peer::start(
        "connect",
        common::serving_one(
            &mut relay.connect_command(),
            ["--transport", transport],
            ("everything", upstream),
            "mcp_tunnel=debug,warn",
        ),
    );
    // Every connection of the default count is up before the signal.
    for _ in 0..client::DEFAULT_CONNECTIONS {
        relay
            .relay
            .peer
            .wait_for_line("\"tunnel connected\"", |l| l.contains("tunnel connected"))
            .await;
    }
    (relay, connect)
}

/// Opens a session on `everything` and POSTs `trigger-long-running-operation` (2 s, 2 progress
/// steps); returns the accepted response (body unread) and when the call started.
async fn start_progress_call(
    agents: std::net::SocketAddr,
    api_key: &str,
) -> (reqwest::Response, Instant) {
    let mut agent = Agent::new(&format!("http://{agents}/mcp/everything"), api_key);
    let answer = agent.initialize().await;
    assert!(
        answer.status == 200 && agent.session.is_some(),
        "session opens: {answer:?}"
    );
    let call = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{
        "name":"trigger-long-running-operation","arguments":{"duration":2,"steps":2},
        "_meta":{"progressToken":"p7"}}});
    let started = Instant::now();
    let response = agent.send(&call).await;
    assert_eq!(response.status(), 200, "the call is accepted");
    (response, started)
}

/// The event stream `seen` holds the call's result, not an error, after its full 2 s (`took`).
fn assert_the_call_ran_to_its_result(seen: &[u8], took: Duration, report: &dyn Fn() -> String) {
    let result = sse_data(seen)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|m| m.get("id") == Some(&json!(7)));
    let result = result.unwrap_or_else(|| panic!("no answer to the call\n{}", report()));
    assert!(
        result.get("result").is_some() && result["result"]["isError"] != json!(true),
        "the call finished with its result, not an error: {result}\n{}",
        report()
    );
    assert!(
        took >= Duration::from_secs(2),
        "the call ran its full 2 s\n{}",
        report()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_drain_keeps_a_call_with_progress_over_auto() {
    drain_keeps_a_call_with_progress("auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_drain_keeps_a_call_with_progress_over_quic() {
    drain_keeps_a_call_with_progress("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_drain_keeps_a_call_with_progress_over_https() {
    drain_keeps_a_call_with_progress("https").await;
}

// ---------------------------------------------------------------------------------------------
// A relay of a fleet told to stop (issue 15): unready at once, still serving for its drain
// delay, then the drain as before.

/// The drain delay of the fleet relay below: long enough for a loopback request to get in.
const DRAIN_DELAY: Duration = Duration::from_secs(3);

/// The status and body of the relay's `/healthz`.
async fn healthz(harness: &Harness) -> (u16, String) {
    let response = common::get(&harness.admin_url("/healthz")).await;
    let status = response.status().as_u16();
    (status, response.text().await.expect("/healthz body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_relay_told_to_stop_reports_unready_and_serves_through_its_drain_delay() {
    init_tracing();
    let upstream_stop = CancellationToken::new();
    let _upstream_guard = upstream_stop.clone().drop_guard();
    let (upstream, gate, _) = common::start_gated_upstream(&upstream_stop).await;
    let harness = Harness::start(Options {
        fleet: mcp_tunnel::relay::FleetSettings {
            id: Some("relay-drain".into()),
            drain_delay: DRAIN_DELAY,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let (_client, mut agent) = harness.acme_serving("gated", &upstream).await;
    agent.initialize_result().await;
    assert_eq!(healthz(&harness).await, (200, "ok\n".into()));

    // A call held at the upstream is in flight when the relay is told to stop.
    let held = tokio::spawn({
        let agent = agent.clone();
        async move { agent.call_tool(1, "hold", json!({})).await }
    });
    gate.held().await;
    let told = Instant::now();
    harness.stop_relay();

    // Unready at once: /healthz answers 503 (waiting only for the relay's task to see it).
    let health = tokio::time::timeout(WAIT, async {
        loop {
            let health = healthz(&harness).await;
            if health.0 != 200 {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("/healthz turns unready");
    assert_eq!(health, (503, "draining\n".into()));

    // A new agent, on a new connection, is still served during the delay, told to close.
    let mut fresh = Agent::new(&harness.url("gated"), &harness.acme.api_key);
    let init = fresh.initialize().await;
    let served_after = told.elapsed();
    assert_eq!(init.status, 200, "served during the drain delay: {init:?}");
    assert!(
        served_after < DRAIN_DELAY,
        "the new request was answered {served_after:?} after the stop, past the {DRAIN_DELAY:?} \
         delay: the test proved nothing"
    );
    assert_eq!(
        init.headers.get("connection").and_then(|v| v.to_str().ok()),
        Some("close"),
        "an answer during the drain delay carries Connection: close: {init:?}"
    );
    let call = fresh.call_tool(2, "echo", json!({})).await;
    assert_eq!(common::tool_text(call.response()), "served");
    assert_eq!(healthz(&harness).await.0, 503, "still unready");

    // Released, the held call completes with its answer, and the relay stops after the delay.
    gate.release();
    let answer = tokio::time::timeout(WAIT, held)
        .await
        .expect("the held call ends")
        .expect("the call task does not panic");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(common::tool_text(answer.response()), "released");
    harness.stopped().await;
    let stopped_after = told.elapsed();
    assert!(
        stopped_after >= DRAIN_DELAY,
        "the relay stopped {stopped_after:?} after being told, before its {DRAIN_DELAY:?} delay"
    );
}
