//! A fleet of relays behind HAProxy (issue 15): three relay binaries, two `connect` binaries
//! attached to all three, a recording upstream, and the official Python SDK as the agent
//! (`tests/peers/fleet_client.py`). The harness is `tests/common/fleet.rs`; it needs HAProxy
//! and the Python SDK (`scripts/install-peers.sh`).
//!
//! Run with `cargo test --test fleet` (the tests of this binary run one at a time: each starts
//! a whole fleet).

mod common;

use std::time::SystemTime;

use common::fleet::{Fleet, LoadReport};

/// Concurrent clients of the load tests.
const STATELESS_SESSIONS: usize = 6;

/// Every call of `report` that ended has exactly one request at the upstream when it succeeded,
/// at most one when it failed, and the upstream saw no call twice and no call the client did
/// not make.
fn assert_upstream_saw_each_call_once(fleet: &Fleet, report: &LoadReport) {
    let received = fleet.upstream.received();
    assert_eq!(
        received.repeated_calls(),
        Vec::<(String, u32)>::new(),
        "no call reached the upstream twice; {}",
        report.brief()
    );
    for call in &report.calls {
        let times = received.times_echoed(&call.message);
        if call.ok {
            assert_eq!(
                times,
                1,
                "the successful call {} reached the upstream exactly once; {}",
                call.message,
                report.brief()
            );
        } else {
            assert!(
                times <= 1,
                "the failed call {} reached it at most once",
                call.message
            );
        }
    }
    let made: std::collections::HashSet<String> = report
        .calls
        .iter()
        .map(|c| common::recording::call_key("echo", &serde_json::json!({ "message": c.message })))
        .collect();
    let unknown: Vec<&String> = received
        .calls
        .keys()
        .filter(|k| !made.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "the upstream saw no call the client did not report: {unknown:?}; {}",
        report.brief()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_calls_spread_over_every_relay_and_reach_the_upstream_once() {
    let fleet = Fleet::start().await;
    let calls_each = 20;

    let report = fleet
        .load("2026-07-28", STATELESS_SESSIONS, calls_each, 30.0, "spread")
        .finish()
        .await;

    assert_eq!(
        report.calls.len(),
        STATELESS_SESSIONS * calls_each,
        "every session made all its calls; {}",
        report.brief()
    );
    assert!(
        report.failed().is_empty(),
        "every call succeeded; {}",
        report.brief()
    );
    assert!(
        report.calls.iter().all(|c| c.session_id.is_none()),
        "the stateless era carries no session id"
    );
    // Round-robin with no stickiness: every relay served calls, as it says itself and as the
    // load balancer's header says.
    let mut served = Vec::new();
    for index in 0..fleet.relays.len() {
        served.push(fleet.relay_tool_calls(index).await);
    }
    assert!(
        served.iter().all(|n| *n > 0),
        "every relay served calls (its /metrics): {served:?}; {}",
        report.brief()
    );
    assert_eq!(
        served.iter().sum::<u64>(),
        report.calls.len() as u64,
        "each call reached exactly one relay: {served:?}"
    );
    let by_relay = report.calls_by_relay();
    for id in fleet.relay_ids() {
        assert!(
            by_relay.get(&id).copied().unwrap_or(0) > 0,
            "HAProxy sent calls to {id}: {by_relay:?}"
        );
    }
    assert_upstream_saw_each_call_once(&fleet, &report);
    let received = fleet.upstream.received();
    assert_eq!(
        received.repeated_initializes(),
        Vec::<(String, u32)>::new(),
        "no upstream session was initialized twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_relay_under_stateless_load_fails_only_calls_in_flight_on_it() {
    let mut fleet = Fleet::start().await;
    let victim = 1;
    let victim_id = fleet.relays[victim].id.clone();

    let mut load = fleet.load("2026-07-28", STATELESS_SESSIONS, 0, 12.0, "kill");
    // Under load: every session is calling by now.
    load.wait_calls(10 * STATELESS_SESSIONS).await;
    let killed = fleet.kill_relay(victim).await;
    // HAProxy's health checks take the relay out (bounded).
    let survivors = fleet.running_relay_ids();
    let survivors: Vec<&str> = survivors.iter().map(String::as_str).collect();
    fleet.haproxy.wait_servers(&survivors).await;
    let out_at = SystemTime::now();
    let report = load.finish().await;

    let failed = report.failed();
    assert!(
        failed.len() <= STATELESS_SESSIONS,
        "at most one call per client (the one in flight) failed: {} failed; {}",
        failed.len(),
        report.brief()
    );
    // In flight at the kill: begun before the relay was gone, ended after the signal. (HAProxy
    // answers such a request by closing the agent's connection, status -1 and `SD--` in its
    // log: httpx says "Server disconnected without sending a response".)
    for call in &failed {
        assert!(
            !call.started_after(killed.reaped) && !call.ended_before(killed.signalled),
            "only calls in flight at the kill failed: {call:?} ({killed:?}); {}",
            report.brief()
        );
    }
    let later: Vec<_> = report
        .calls
        .iter()
        .filter(|c| c.started_after(killed.reaped))
        .collect();
    assert!(
        later.iter().any(|c| c.started_after(out_at)),
        "the load went on after HAProxy took {victim_id} out; {}",
        report.brief()
    );
    assert!(
        later.iter().all(|c| c.ok),
        "every call begun after the kill succeeded; {}",
        report.brief()
    );
    assert!(
        later
            .iter()
            .filter(|c| c.started_after(out_at))
            .all(|c| c.relay.as_deref() != Some(victim_id.as_str())),
        "no call went to {victim_id} once HAProxy took it out"
    );
    assert_upstream_saw_each_call_once(&fleet, &report);
    let received = fleet.upstream.received();
    eprintln!(
        "HAProxy's unusual requests: {:#?}\nclient sessions that broke: {:?}",
        fleet.haproxy.unusual_requests(),
        report.session_errors
    );
    eprintln!(
        "kill -9 of {victim_id} under load: {} calls, {} failed {:?}; by relay {:?}; upstream saw {} calls, {} initializes",
        report.calls.len(),
        failed.len(),
        failed,
        report.calls_by_relay(),
        received.call_total(),
        received.initialize_total()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_era_sessions_spread_over_the_fleet_and_every_call_succeeds() {
    let fleet = Fleet::start().await;
    let (sessions, calls_each) = (8, 15);

    let report = fleet
        .load("legacy", sessions, calls_each, 30.0, "sessions")
        .finish()
        .await;

    assert!(
        report.opens.iter().all(|open| open["ok"] == true),
        "every session opened: {:?}; {}",
        report.opens,
        report.brief()
    );
    assert!(report.session_errors.is_empty(), "{}", report.brief());
    assert_eq!(
        report.calls.len(),
        sessions * calls_each,
        "every session made all its calls; {}",
        report.brief()
    );
    assert!(
        report.failed().is_empty(),
        "every call succeeded; {}",
        report.brief()
    );
    // Each session kept its one Mcp-Session-Id for all its calls, wherever they went.
    let ids = report.session_ids_by_session();
    assert_eq!(ids.len(), sessions);
    for (session, seen) in &ids {
        assert!(
            seen.len() == 1 && seen[0].is_some(),
            "session {session} used one session id: {seen:?}"
        );
    }
    // No stickiness: a session's calls went to more than one relay, and every relay served.
    let by_relay = report.calls_by_relay();
    for id in fleet.relay_ids() {
        assert!(
            by_relay.get(&id).copied().unwrap_or(0) > 0,
            "HAProxy sent calls to {id}: {by_relay:?}"
        );
    }
    assert_upstream_saw_each_call_once(&fleet, &report);
    let received = fleet.upstream.received();
    assert_eq!(
        received.initialize_total(),
        sessions as u32,
        "one upstream initialize per agent session: {:?}",
        received.initializes
    );
    assert_eq!(received.repeated_initializes(), Vec::<(String, u32)>::new());
    assert!(
        report.closes.iter().all(|close| close["ok"] == true),
        "every session closed (DELETE): {:?}",
        report.closes
    );
}

/// A rolling restart under stateless load: each relay in turn gets SIGTERM (it reports itself
/// unready and serves on for its drain delay, so HAProxy marks it down first; then it drains
/// and exits 0) and is started again on the same ports, where it reports itself unready
/// (`/healthz` 503 `starting`) until a `connect` has attached, so HAProxy sends it nothing it
/// could not route. No call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_stateless_load_fails_no_call() {
    let mut fleet = Fleet::start().await;
    let mut load = fleet.load("2026-07-28", STATELESS_SESSIONS, 0, 50.0, "rolling");
    load.wait_calls(5 * STATELESS_SESSIONS).await;
    let mut outputs = Vec::new();
    // (relay, SIGTERM sent, exited, back in service) in Unix seconds.
    let mut restarts = Vec::new();
    for index in 0..fleet.relays.len() {
        // SIGTERM (the relay must exit 0), start again on the same ports, both connects back
        // on it and HAProxy seeing it up before the next one goes.
        let stopping = SystemTime::now();
        outputs.push(fleet.stop_relay(index).await);
        let stopped = SystemTime::now();
        fleet.start_relay(index).await;
        restarts.push((
            fleet.relays[index].id.clone(),
            common::fleet::unix(stopping),
            common::fleet::unix(stopped),
            common::fleet::unix(SystemTime::now()),
        ));
    }
    let restarted_at = SystemTime::now();
    load.wait_calls_after(restarted_at, 5 * STATELESS_SESSIONS)
        .await;
    let report = load.stop().await;

    eprintln!(
        "rolling restart {restarts:?}: {} calls, {} failed {:#?}; by relay {:?}; HAProxy's unusual requests: {:#?}; client sessions that broke: {:?}",
        report.calls.len(),
        report.failed().len(),
        report
            .failed()
            .iter()
            .map(|c| (c.started, c.ended, c.relay.clone()))
            .collect::<Vec<_>>(),
        report.calls_by_relay(),
        fleet.haproxy.unusual_requests(),
        report.session_errors
    );
    assert!(
        report.failed().is_empty(),
        "no call failed during the rolling restart; {}",
        report.brief()
    );
    assert!(
        report.calls.iter().any(|c| c.started_after(restarted_at)),
        "the load went on after the last restart"
    );
    assert_upstream_saw_each_call_once(&fleet, &report);
}

/// The client's per-call timeout in [`kill_9_of_a_connect_under_stateless_load_then_it_comes_back`]:
/// above the time a relay takes to declare a silent tunnel dead (the transport's idle timeout,
/// 10 s; over the fallback a keep-alive interval more) with room for a loaded machine, and
/// below the 30 s it took before, so that a call left hanging shows as a client timeout.
const KILLED_CONNECT_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);

/// The calls in flight on the killed `connect`, and the calls the relays route to its
/// connections until they mark them silent (5 s unheard), end with a JSON-RPC error once the
/// relay declares the tunnel dead (10 s unheard: the QUIC idle timeout), never in a hang the
/// client has to time out. At most one per client (each waits out its call); once the relays
/// route through the running `connect`s only, every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_connect_under_stateless_load_then_it_comes_back() {
    let mut fleet = Fleet::start().await;
    let mut load = fleet.load_with_call_timeout(
        "2026-07-28",
        STATELESS_SESSIONS,
        0,
        60.0,
        "connect",
        Some(KILLED_CONNECT_CALL_TIMEOUT),
    );
    load.wait_calls(5 * STATELESS_SESSIONS).await;
    let killed = fleet.kill_connect(0).await;
    // Calls go on through the other connect; then the killed one comes back on every relay.
    load.wait_calls_after(killed.reaped, 10 * STATELESS_SESSIONS)
        .await;
    fleet.start_connect(0).await;
    fleet.wait_routes_only_running().await;
    let back_at = SystemTime::now();
    load.wait_calls_after(back_at, 5 * STATELESS_SESSIONS).await;
    let report = load.stop().await;

    let failed = report.failed();
    eprintln!(
        "kill -9 of a connect at {}: {} calls, {} failed {:#?}; by relay {:?}",
        common::fleet::unix(killed.signalled),
        report.calls.len(),
        failed.len(),
        failed
            .iter()
            .map(|c| (c.started, c.ended, c.relay.clone(), c.error.clone()))
            .collect::<Vec<_>>(),
        report.calls_by_relay()
    );
    assert_upstream_saw_each_call_once(&fleet, &report);
    assert!(
        failed.len() <= STATELESS_SESSIONS,
        "at most the calls in flight on the killed connect failed; {}",
        report.brief()
    );
    // Each failed with the relay's answer (a JSON-RPC error saying the tunnel was lost), not
    // a client timeout: no hang.
    for call in &failed {
        let error = call.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("is unavailable") && !error.contains("Timeout"),
            "a call on the killed connect got an error answer, not a hang: {call:?}; {}",
            report.brief()
        );
        assert!(
            !call.ended_before(killed.signalled),
            "only calls in flight at or after the kill failed: {call:?}"
        );
    }
    assert!(
        report
            .calls
            .iter()
            .filter(|c| c.started_after(back_at))
            .all(|c| c.ok),
        "every call after the relays routed through the running connects only succeeded; {}",
        report.brief()
    );
}

/// Bound on one call of [`session_loop`]: a call on a tunnel whose `connect` died unheard
/// waits until the relay gives up on the connection; this cuts it short.
const SESSION_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One call of [`session_loop`]: its message, when it started and ended, and how it ended.
#[derive(Debug, Clone)]
struct SessionCall {
    message: String,
    started: SystemTime,
    ended: SystemTime,
    /// The error, or `None` when the echo came back.
    error: Option<String>,
}

/// Calls `echo` in a loop on the session of `agent` (a raw Streamable HTTP agent, through the
/// load balancer) until `stop`, each call with a unique message; every call bounded.
async fn session_loop(
    agent: common::Agent,
    session: usize,
    stop: tokio_util::sync::CancellationToken,
    succeeded: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<SessionCall> {
    let mut calls = Vec::new();
    for n in 0..10_000u64 {
        if stop.is_cancelled() {
            break;
        }
        let message = format!("kill-s{session}-c{n}");
        let body = serde_json::json!({"jsonrpc": "2.0", "id": n + 10, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": message}}});
        let started = SystemTime::now();
        let sent = agent
            .request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .timeout(SESSION_CALL_TIMEOUT)
            .body(body.to_string())
            .send()
            .await;
        let error = match sent {
            Err(e) => Some(format!("request failed: {e}")),
            Ok(response) if response.status() != 200 => {
                Some(format!("status {}", response.status()))
            }
            Ok(response) => match response.bytes().await {
                Err(e) => Some(format!("body broke: {e}")),
                Ok(body) => {
                    let text = String::from_utf8_lossy(&body);
                    (!text.contains(&format!("\"{message}\"")) || text.contains("\"error\""))
                        .then(|| format!("not the echo: {text}"))
                }
            },
        };
        if error.is_none() {
            succeeded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        calls.push(SessionCall {
            message,
            started,
            ended: SystemTime::now(),
            error,
        });
    }
    calls
}

/// Issue 15, must-show 2: `kill -9` of one relay under session-era load. Every session keeps
/// its `Mcp-Session-Id` and its next calls succeed wherever HAProxy sends them; the only calls
/// that may fail are those in flight on the killed relay at that moment; the upstream saw one
/// `initialize` per agent session and each call at most once (exactly once when it succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_relay_under_session_load_keeps_every_session() {
    const SESSIONS: usize = 8;
    let mut fleet = Fleet::start().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    for session in 0..SESSIONS {
        let mut agent = common::Agent::new(&fleet.url(), &fleet.api_key);
        let answer = agent.initialize().await;
        assert_eq!(answer.status, 200, "session {session} opens: {answer:?}");
        ids.push(agent.session.clone().expect("a session id"));
        tasks.push(tokio::spawn(session_loop(
            agent,
            session,
            stop.clone(),
            std::sync::Arc::default(),
        )));
    }
    // Load on every relay, then the kill.
    let calls_so_far = |fleet: &Fleet| fleet.upstream.received().call_total();
    tokio::time::timeout(common::WAIT, async {
        while calls_so_far(&fleet) < 40 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the load runs");
    let killed = fleet.kill_relay(0).await;
    let before = calls_so_far(&fleet);
    tokio::time::timeout(common::WAIT, async {
        while calls_so_far(&fleet) < before + 10 * SESSIONS as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the load goes on after the kill");
    stop.cancel();
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.expect("session task"));
    }

    let received = fleet.upstream.received();
    for (session, calls) in all.iter().enumerate() {
        let after: Vec<&SessionCall> = calls.iter().filter(|c| c.started > killed.reaped).collect();
        assert!(
            after.len() >= 3 && after.iter().all(|c| c.error.is_none()),
            "session {session} (id kept: the agent never changed it) goes on after the kill: {after:?}"
        );
        for call in calls {
            let times = received.times_echoed(&call.message);
            match &call.error {
                None => assert_eq!(times, 1, "{} reached the upstream once", call.message),
                Some(error) => {
                    assert!(times <= 1, "{} reached the upstream twice", call.message);
                    assert!(
                        call.started <= killed.reaped && call.ended >= killed.signalled,
                        "only calls in flight at the kill may fail: {call:?} ({error})"
                    );
                }
            }
        }
        let failed = calls.iter().filter(|c| c.error.is_some()).count();
        assert!(failed <= 1, "session {session}: {failed} failed calls");
    }
    let failed: Vec<&SessionCall> = all.iter().flatten().filter(|c| c.error.is_some()).collect();
    eprintln!(
        "{} calls, {} failed (in flight on the killed relay): {failed:?}",
        all.iter().map(Vec::len).sum::<usize>(),
        failed.len()
    );
    assert_eq!(ids.len(), SESSIONS);
    assert_eq!(
        received.initialize_total(),
        SESSIONS as u32,
        "one upstream initialize per agent session: {:?}",
        received.initializes
    );
    assert_eq!(received.repeated_calls(), Vec::<(String, u32)>::new());
}

/// Issue 15, must-show 4 (two `connect`s): `kill -9` of one `connect` under session-era load,
/// then it restarts. Sessions whose upstream session it held (an HTTP server) continue through
/// the other `connect` once the relays hear its tunnel has gone silent, with the same
/// `Mcp-Session-Id` and the same upstream session; only calls sent to it before that may fail
/// (never twice at the upstream), and the upstream saw one `initialize` per agent session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_connect_under_session_load_keeps_every_session() {
    const SESSIONS: usize = 8;
    /// The relays route away from a tunnel silent this long (`transport::SILENT_AFTER`, 5 s),
    /// plus a keep-alive interval of slack.
    const SILENT_WINDOW: std::time::Duration = std::time::Duration::from_secs(7);
    let mut fleet = Fleet::start().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let mut succeeded = Vec::new();
    for session in 0..SESSIONS {
        let mut agent = common::Agent::new(&fleet.url(), &fleet.api_key);
        let answer = agent.initialize().await;
        assert_eq!(answer.status, 200, "session {session} opens: {answer:?}");
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        succeeded.push(ok.clone());
        tasks.push(tokio::spawn(session_loop(agent, session, stop.clone(), ok)));
    }
    let each_succeeded = |succeeded: &[std::sync::Arc<std::sync::atomic::AtomicU64>]| {
        succeeded
            .iter()
            .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
            .collect::<Vec<u64>>()
    };
    let calls_so_far = |fleet: &Fleet| fleet.upstream.received().call_total();
    tokio::time::timeout(common::WAIT, async {
        while calls_so_far(&fleet) < 40 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the load runs");
    let killed = fleet.kill_connect(0).await;
    let settled = killed.reaped + SILENT_WINDOW;
    // Every session succeeds again, well past the silent window (a call sent into it may wait
    // out its timeout first), and again once the `connect` is back.
    let progressed = |from: &[u64], by: u64| {
        let now = each_succeeded(&succeeded);
        now.iter().zip(from).all(|(now, from)| *now >= from + by)
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while SystemTime::now() < settled + SESSION_CALL_TIMEOUT {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let from = each_succeeded(&succeeded);
        while !progressed(&from, 3) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every session goes on after the kill");
    fleet.start_connect(0).await;
    let from = each_succeeded(&succeeded);
    tokio::time::timeout(common::WAIT, async {
        while !progressed(&from, 3) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every session goes on after the restart");
    stop.cancel();
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.expect("session task"));
    }
    let received = fleet.upstream.received();
    for (session, calls) in all.iter().enumerate() {
        let after: Vec<&SessionCall> = calls.iter().filter(|c| c.started > settled).collect();
        assert!(
            after.len() >= 3 && after.iter().all(|c| c.error.is_none()),
            "session {session} goes on once the dead tunnel is silent: {after:?}"
        );
        for call in calls {
            let times = received.times_echoed(&call.message);
            match &call.error {
                None => assert_eq!(times, 1, "{} reached the upstream once", call.message),
                Some(error) => {
                    assert!(times <= 1, "{} reached the upstream twice", call.message);
                    assert!(
                        call.started <= settled && call.ended >= killed.signalled,
                        "only calls sent before the relays knew may fail: {call:?} ({error})"
                    );
                }
            }
        }
    }
    let failed: Vec<&SessionCall> = all.iter().flatten().filter(|c| c.error.is_some()).collect();
    eprintln!(
        "{} calls, {} failed: {failed:?}",
        all.iter().map(Vec::len).sum::<usize>(),
        failed.len()
    );
    assert_eq!(
        received.initialize_total(),
        SESSIONS as u32,
        "one upstream initialize per agent session: {:?}",
        received.initializes
    );
    assert_eq!(received.repeated_calls(), Vec::<(String, u32)>::new());
}

/// Issue 15, must-show 3: a rolling restart under session-era load. Eight sessions call in a
/// loop through HAProxy while each relay in turn gets SIGTERM and starts again; no call
/// fails, each session keeps its one `Mcp-Session-Id`, the upstream sees each call once and
/// one `initialize` per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_session_load_fails_no_call() {
    let mut fleet = Fleet::start().await;
    let sessions = 8;
    let mut load = fleet.load("legacy", sessions, 0, 50.0, "rolling-sessions");
    load.wait_calls(3 * sessions).await;
    let mut restarts = Vec::new();
    for index in 0..fleet.relays.len() {
        let stopping = SystemTime::now();
        fleet.stop_relay(index).await;
        let stopped = SystemTime::now();
        fleet.start_relay(index).await;
        restarts.push((
            fleet.relays[index].id.clone(),
            common::fleet::unix(stopping),
            common::fleet::unix(stopped),
            common::fleet::unix(SystemTime::now()),
        ));
    }
    let restarted_at = SystemTime::now();
    load.wait_calls_after(restarted_at, 3 * sessions).await;
    let report = load.stop().await;

    eprintln!(
        "rolling restart (sessions) {restarts:?}: {} calls, {} failed; by relay {:?}; HAProxy's unusual requests: {:#?}",
        report.calls.len(),
        report.failed().len(),
        report.calls_by_relay(),
        fleet.haproxy.unusual_requests(),
    );
    assert!(
        report.opens.iter().all(|open| open["ok"] == true),
        "every session opened: {:?}; {}",
        report.opens,
        report.brief()
    );
    assert!(report.session_errors.is_empty(), "{}", report.brief());
    assert!(
        report.failed().is_empty(),
        "no call failed during the rolling restart; {}",
        report.brief()
    );
    assert!(
        report.calls.iter().any(|c| c.started_after(restarted_at)),
        "the load went on after the last restart"
    );
    let ids = report.session_ids_by_session();
    assert_eq!(ids.len(), sessions, "{}", report.brief());
    for (session, seen) in &ids {
        assert!(
            seen.len() == 1 && seen[0].is_some(),
            "session {session} kept one session id through the restarts: {seen:?}"
        );
    }
    assert_upstream_saw_each_call_once(&fleet, &report);
    let received = fleet.upstream.received();
    assert_eq!(
        received.initialize_total(),
        sessions as u32,
        "one upstream initialize per agent session: {:?}",
        received.initializes
    );
    assert_eq!(received.repeated_initializes(), Vec::<(String, u32)>::new());
    assert!(
        report.closes.iter().all(|close| close["ok"] == true),
        "every session closed (DELETE): {:?}",
        report.closes
    );
}

/// Issue 15, must-show 2 with the official Python SDK: `kill -9` of one relay under
/// session-era load loses no call. In a fleet each answer is an event stream primed at once
/// with a sealed event id; the SDK, whose POST breaks with the relay, resumes the answer with
/// `Last-Event-ID` (a GET HAProxy sends to a live relay), and that relay has the session's
/// `connect` replay the answer it kept. Every session keeps its one `Mcp-Session-Id`, every
/// call succeeds, and the upstream saw one `initialize` per session and each call once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_relay_under_sdk_session_load_loses_no_call() {
    const SESSIONS: usize = 8;
    let mut fleet = Fleet::start().await;
    let victim = 1;
    let mut load = fleet.load("legacy", SESSIONS, 0, 15.0, "resume");
    load.wait_calls(10 * SESSIONS).await;
    let killed = fleet.kill_relay(victim).await;
    load.wait_calls_after(killed.reaped, 5 * SESSIONS).await;
    let report = load.finish().await;

    assert!(report.session_errors.is_empty(), "{}", report.brief());
    assert!(
        report.failed().is_empty(),
        "every call succeeded, those in flight on the killed relay resumed elsewhere; {}",
        report.brief()
    );
    let ids = report.session_ids_by_session();
    assert_eq!(ids.len(), SESSIONS);
    for (session, seen) in &ids {
        assert!(
            seen.len() == 1 && seen[0].is_some(),
            "session {session} kept its one session id: {seen:?}"
        );
    }
    assert_upstream_saw_each_call_once(&fleet, &report);
    let received = fleet.upstream.received();
    assert_eq!(
        received.initialize_total(),
        SESSIONS as u32,
        "one upstream initialize per agent session: {:?}",
        received.initializes
    );
    let replayed = replayed_answers(&fleet).await;
    eprintln!(
        "kill -9 under SDK session load: {} calls, 0 failed; {replayed} answers replayed on the other relays; by relay {:?}",
        report.calls.len(),
        report.calls_by_relay()
    );
}

/// Answers the running relays of `fleet` replayed (their `mcp_tunnel_answers_replayed_total`).
async fn replayed_answers(fleet: &Fleet) -> u64 {
    let mut total = 0;
    for relay in fleet.relays.iter().filter(|r| r.process.is_some()) {
        let text = reqwest::Client::new()
            .get(relay.admin_url("/metrics"))
            .timeout(common::WAIT)
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics body");
        total += text
            .lines()
            .filter_map(|line| line.strip_prefix("mcp_tunnel_answers_replayed_total "))
            .filter_map(|value| value.trim().parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}
