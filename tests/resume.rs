//! Sessions that outlive the relay and the tunnel that carried them (issue 15), in-process:
//! relays of one fleet sharing a secret, a `connect` attached to all of them, and a recording
//! upstream that shows what it received. The real-process fleet behind HAProxy is in
//! `tests/fleet.rs`.

mod common;

use common::{Agent, Fleet, Harness, Options, WAIT, quic_settings, start_recording_upstream};
use serde_json::json;

/// Two relays of `fleet`, sharing tenants and credentials.
async fn two_relays(fleet: &Fleet) -> (Harness, Harness) {
    let a = Harness::start(fleet.options()).await;
    let b = Harness::start(Options {
        creds: Some((a.acme.clone(), a.other.clone())),
        ..fleet.options()
    })
    .await;
    (a, b)
}

/// Runs acme's `connect` serving `db` from `upstream`, attached to every relay of `relays`,
/// and waits until each routes it. It stops with the last relay's harness (the others may be
/// stopped before it).
async fn connect_all(relays: &[&Harness], upstream: &str) -> common::Client {
    connect_all_to(relays, &format!("db={upstream}")).await
}

/// [`connect_all`] with the source given as `--source` would: `NAME=URL` or `NAME=stdio:CMD`.
async fn connect_all_to(relays: &[&Harness], source: &str) -> common::Client {
    let list: Vec<String> = relays.iter().map(|r| r.tunnel.to_string()).collect();
    let mut settings = quic_settings(
        list.join(","),
        &relays[0].acme.tunnel_token,
        &relays[0].ca_pem,
        &[],
    );
    settings.sources =
        vec![mcp_tunnel::config::SourceConfig::parse_flag(source).expect("a valid source")];
    settings.connections = relays.len();
    let last = relays[relays.len() - 1];
    let client = last.connect_with(&last.acme, settings).await;
    for relay in relays {
        tokio::time::timeout(WAIT, relay.state.registry.wait_for("acme", "db"))
            .await
            .expect("every relay of the fleet gets a tunnel");
    }
    client
}

/// How many requests of `method` the upstream saw.
fn seen(seen: &common::Seen, method: &str) -> usize {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|(m, _, _)| m == method)
        .count()
}

/// The same agent session, through another relay.
fn via(relay: &Harness, agent: &Agent) -> Agent {
    let mut moved = Agent::new(&relay.url("db"), &relay.acme.api_key);
    moved.session = agent.session.clone();
    moved.version = agent.version.clone();
    moved
}

/// Two relays of one fleet, a recording upstream, acme's `connect` attached to both, and an
/// agent whose session opened on the first relay.
struct TwoRelays {
    a: Harness,
    b: Harness,
    upstream: String,
    recorded: common::Seen,
    client: common::Client,
    agent: Agent,
    /// Stops the upstream when dropped: bind it for the test's whole run.
    _stop: tokio_util::sync::DropGuard,
}

impl TwoRelays {
    async fn start() -> Self {
        let (stop, guard) = common::stop_on_drop();
        let fleet = Fleet::new();
        let (a, b) = two_relays(&fleet).await;
        let (upstream, recorded) = start_recording_upstream(&stop).await;
        let client = connect_all(&[&a, &b], &upstream).await;
        let mut agent = Agent::new(&a.url("db"), &a.acme.api_key);
        agent.initialize().await;
        Self {
            a,
            b,
            upstream,
            recorded,
            client,
            agent,
            _stop: guard,
        }
    }
}

#[tokio::test]
async fn a_session_opened_on_one_relay_continues_on_another_and_after_its_relay_stops() {
    let TwoRelays {
        a,
        b,
        recorded,
        client: _client,
        agent: on_a,
        _stop: _guard,
        ..
    } = TwoRelays::start().await;
    let id = on_a.session.clone().expect("a session id");
    assert!(
        id.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "visible ASCII: {id}"
    );
    let answer = on_a.call_tool(2, "anything", json!({})).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let on_b = via(&b, &on_a);
    let answer = on_b.call_tool(3, "anything", json!({})).await;
    assert_eq!(
        answer.status, 200,
        "the other relay continues it: {answer:?}"
    );
    assert_eq!(common::tool_text(answer.response()), "recorded");

    a.stop_relay();
    a.stopped().await;
    let answer = on_b.call_tool(4, "anything", json!({})).await;
    assert_eq!(
        answer.status, 200,
        "after the first relay stopped: {answer:?}"
    );

    assert_eq!(seen(&recorded, "initialize"), 1, "one initialize upstream");
    assert_eq!(seen(&recorded, "tools/call"), 3, "each call once");
    let sessions: Vec<String> = recorded
        .lock()
        .expect("lock")
        .iter()
        .filter(|(m, _, _)| m == "tools/call")
        .map(|(_, headers, _)| {
            headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        sessions,
        vec!["upstream-1"; 3],
        "every call in the one upstream session"
    );
}

#[tokio::test]
async fn a_forged_foreign_or_other_callers_session_id_is_a_404_alike() {
    let TwoRelays {
        a,
        b,
        upstream,
        client: _client,
        agent,
        _stop: _guard,
        ..
    } = TwoRelays::start().await;
    let id = agent.session.clone().expect("a session id");

    // Another fleet (its own secret), with the same tenants and a tunnel for the source.
    let foreign = Harness::start(Options {
        creds: Some((a.acme.clone(), a.other.clone())),
        ..Options::default()
    })
    .await;
    let _foreign_client = foreign.connect(&foreign.acme, &[("db", &upstream)]).await;

    let mut altered = id.clone().into_bytes();
    let middle = altered.len() / 2;
    altered[middle] = if altered[middle] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("ASCII");

    let mut other_caller = Agent::new(&b.url("db"), &b.other.api_key);
    other_caller.session = Some(id.clone());
    let mut other_source = Agent::new(&b.url("files"), &b.acme.api_key);
    other_source.session = Some(id.clone());
    let mut cases = vec![
        ("another fleet", via(&foreign, &agent)),
        ("another caller", other_caller),
        ("another source", other_source),
    ];
    let mut one_byte = via(&b, &agent);
    one_byte.session = Some(altered);
    cases.push(("one byte altered", one_byte));
    let mut garbage = via(&b, &agent);
    garbage.session = Some("not-a-session".into());
    cases.push(("garbage", garbage));

    let mut bodies = Vec::new();
    for (what, agent) in cases {
        let answer = agent.call_tool(9, "anything", json!({})).await;
        assert_eq!(answer.status, 404, "{what}: {answer:?}");
        bodies.push((what, answer.messages));
    }
    let first = bodies[0].1.clone();
    for (what, body) in &bodies {
        assert_eq!(body, &first, "{what} answers exactly as the others");
    }
    // The real id still works on the other relay of the fleet.
    assert_eq!(
        via(&b, &agent)
            .call_tool(10, "anything", json!({}))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_session_continues_after_its_connect_restarts_and_calls_meanwhile_get_an_error() {
    let TwoRelays {
        a,
        b,
        upstream,
        recorded,
        client,
        agent,
        _stop: _guard,
        ..
    } = TwoRelays::start().await;
    assert_eq!(agent.call_tool(2, "anything", json!({})).await.status, 200);

    client.stop().await.expect("connect stops cleanly");
    for relay in [&a, &b] {
        tokio::time::timeout(WAIT, async {
            while relay.state.registry.route("acme", "db").is_some() {
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the tunnel goes");
    }
    // No tunnel reaches the source: a clear JSON-RPC error, not a hang, and not a 404.
    let on_b = via(&b, &agent);
    let answer = on_b.call_tool(3, "anything", json!({})).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.error_message().contains("not connected"),
        "{answer:?}"
    );

    // A new `connect` (it holds nothing) continues the upstream's session from the sealed id.
    let _client = connect_all(&[&a, &b], &upstream).await;
    let answer = on_b.call_tool(4, "anything", json!({})).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(common::tool_text(answer.response()), "recorded");
    assert_eq!(seen(&recorded, "initialize"), 1);
    assert_eq!(
        seen(&recorded, "tools/call"),
        2,
        "the failed call never reached it"
    );
}

#[tokio::test]
async fn a_last_event_id_from_another_relay_opens_a_fresh_get_stream_or_says_its_answer_is_not_here()
 {
    let TwoRelays {
        b,
        client: _client,
        agent,
        _stop: _guard,
        ..
    } = TwoRelays::start().await;
    let on_b = via(&b, &agent);
    // Stream numbers of one relay's copy of a session start at a random multiple of 2^20: an
    // even one names a GET stream, an odd one an answer (neither is B's).
    let standalone = on_b
        .get(Some("1048576-3"), "GET with a foreign stream's id")
        .await;
    assert_eq!(standalone.status(), 200, "a fresh GET stream on this relay");
    assert!(common::is_event_stream(standalone.headers()));
    drop(standalone);
    let answer = on_b
        .get(Some("1048577-3"), "GET with a foreign answer's id")
        .await;
    assert_eq!(
        answer.status(),
        400,
        "nothing to replay here, and no wait forever"
    );
    let body = answer.text().await.expect("the error body");
    assert!(body.contains("cannot be resumed here"), "{body}");
}

/// The stdio source flag of a server on the Python standard library whose `echo` answers with
/// the message and its process id (which process served a call), its script written in `dir`.
fn pid_server(dir: &std::path::Path) -> String {
    let script = dir.join("pid_server.py");
    std::fs::write(
        &script,
        r#"
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    method, id = msg.get("method"), msg.get("id")
    if method is None or id is None:
        continue
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}}, "serverInfo": {"name": "pid", "version": "1"}}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": msg["params"]["arguments"]["message"] + "@" + str(os.getpid())}]}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": id, "result": result}), flush=True)
"#,
    )
    .expect("script written");
    format!(
        "db=stdio:{}/tests/peers/.venv/bin/python -u {}",
        env!("CARGO_MANIFEST_DIR"),
        script.display()
    )
}

#[tokio::test]
async fn a_stdio_session_keeps_its_process_on_another_relay_and_ends_with_its_connect() {
    let (_stop, _guard) = common::stop_on_drop();
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = Fleet::new();
    let (a, b) = two_relays(&fleet).await;
    let client = connect_all_to(&[&a, &b], &pid_server(dir.path())).await;
    let mut on_a = Agent::new(&a.url("db"), &a.acme.api_key);
    on_a.initialize().await;
    let first = on_a.echo(2, "one").await;
    let (_, pid) = first.split_once('@').expect("message@pid");

    let on_b = via(&b, &on_a);
    assert_eq!(
        on_b.echo(3, "two").await,
        format!("two@{pid}"),
        "the same process"
    );
    a.stop_relay();
    a.stopped().await;
    assert_eq!(
        on_b.echo(4, "three").await,
        format!("three@{pid}"),
        "after the relay that opened it stopped"
    );

    // The process lived in that `connect`: with it gone, so is the session.
    client.stop().await.expect("connect stops");
    let _again = connect_all_to(&[&b], &pid_server(dir.path())).await;
    let answer = on_b.call_tool(5, "echo", json!({"message": "four"})).await;
    assert_eq!(answer.status, 404, "{answer:?}");
}

/// Reads `response`'s event stream until `enough` holds for what was read (bounded by
/// [`WAIT`]); returns the text.
async fn read_events_until(
    response: &mut reqwest::Response,
    mut enough: impl FnMut(&str) -> bool,
) -> String {
    let mut text = String::new();
    let read = async {
        while !enough(&text) {
            match response.chunk().await {
                Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
                _ => break,
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the events arrive in time");
    text
}

/// The last event id in an event stream's text.
fn last_event_id(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .next_back()
}

/// Posts a `hold` call (`id` 7) as `agent`: in a fleet its answer is a stream primed at once.
/// Returns the stream and the priming event's id.
async fn post_hold(agent: &Agent) -> (reqwest::Response, String) {
    let call = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"hold","arguments":{}}});
    let mut post = agent.send(&call).await;
    assert_eq!(post.status(), 200);
    assert!(common::is_event_stream(post.headers()));
    let primed = read_events_until(&mut post, |text| text.contains("id:")).await;
    let id = last_event_id(&primed).expect("a priming event id");
    (post, id)
}

/// The JSON-RPC messages of an event stream's whole body (read within [`WAIT`]).
async fn messages_of(response: reqwest::Response) -> Vec<serde_json::Value> {
    let body = tokio::time::timeout(WAIT, response.bytes())
        .await
        .expect("the answer in time")
        .expect("the body");
    common::sse_data(&body)
        .iter()
        .filter_map(|data| serde_json::from_str(data).ok())
        .collect()
}

#[tokio::test]
async fn an_answer_in_flight_is_resumed_on_another_relay_and_the_upstream_sees_the_call_once() {
    let (stop, _guard) = common::stop_on_drop();
    let fleet = Fleet::new();
    let trails = tempfile::tempdir().expect("temp dir");
    let (a_db, b_db) = (trails.path().join("a.db"), trails.path().join("b.db"));
    let a = Harness::start(Options {
        audit: Some(common::audit::audit_at(&a_db)),
        ..fleet.options()
    })
    .await;
    let b = Harness::start(Options {
        creds: Some((a.acme.clone(), a.other.clone())),
        audit: Some(common::audit::audit_at(&b_db)),
        ..fleet.options()
    })
    .await;
    let (upstream, gate, recorded) = common::start_gated_upstream(&stop).await;
    let _client = connect_all(&[&a, &b], &upstream).await;
    let mut on_a = Agent::new(&a.url("db"), &a.acme.api_key);
    on_a.initialize_result().await;

    // In a fleet a 2025-11-25 session's answer is a stream primed at once: it has an event id
    // before the upstream has answered.
    let (post, id) = post_hold(&on_a).await;
    gate.held().await;

    // The agent's connection breaks with the call in flight; it resumes on the other relay,
    // which has never seen the answer: `connect` replays it there.
    drop(post);
    let on_b = via(&b, &on_a);
    let resumed = on_b.get(Some(&id), "resume the answer on B").await;
    assert_eq!(resumed.status(), 200, "{:?}", resumed.text().await);
    assert!(common::is_event_stream(resumed.headers()));
    gate.release();
    let answers = messages_of(resumed).await;
    assert_eq!(answers.len(), 1, "the answer, once: {answers:?}");
    assert_eq!(answers[0]["id"], 7);
    assert_eq!(common::tool_text(&answers[0]), "released");

    // Resumed again from the start, on the first relay: the same answer (kept by `connect`),
    // and still one call upstream.
    let again = on_a.get(Some(&id), "resume the answer on A").await;
    assert_eq!(again.status(), 200);
    let body = tokio::time::timeout(WAIT, again.bytes())
        .await
        .expect("the answer in time")
        .expect("the body");
    assert!(
        common::sse_data(&body)
            .iter()
            .any(|data| data.contains("released")),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        seen(&recorded, "tools/call"),
        1,
        "the upstream saw the call once"
    );
    // Both relays of this test count into the process's one metrics recorder (with the other
    // tests of this file): B's replay, then A's (the answer had moved away from A's own log).
    let replayed = b.metrics().await;
    assert!(
        common::counter(&replayed, "mcp_tunnel_answers_replayed_total") >= 2,
        "{replayed}"
    );

    // Each relay's trail says what happened there: on A the call moved (to B), then A
    // delivered it on the second resume; B delivered it once.
    let calls = |rows: Vec<serde_json::Value>| -> Vec<String> {
        let mut outcomes: Vec<String> = rows
            .iter()
            .filter(|row| row["mcp.method.name"] == "tools/call")
            .map(common::audit::outcome)
            .collect();
        outcomes.sort();
        outcomes
    };
    let on_a = tokio::time::timeout(WAIT, async {
        loop {
            let outcomes = calls(common::audit::export(&a_db).await);
            if outcomes.len() >= 2 {
                return outcomes;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("A's rows in time");
    assert_eq!(on_a, ["moved", "ok"], "A's trail");
    assert_eq!(
        calls(common::audit::export(&b_db).await),
        ["ok"],
        "B's trail"
    );
}

/// The `data` of each `notifications/message` in an event stream's text.
fn notes(text: &str) -> Vec<String> {
    common::sse_data(text.as_bytes())
        .iter()
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter(|message| message["method"] == "notifications/message")
        .filter_map(|message| message["params"]["data"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn an_agents_get_stream_resumes_on_another_relay_with_exactly_the_messages_it_missed() {
    let (stop, _guard) = common::stop_on_drop();
    let fleet = Fleet::new();
    let (a, b) = two_relays(&fleet).await;
    let (upstream, gate, _) = common::start_gated_upstream(&stop).await;
    let _client = connect_all(&[&a, &b], &upstream).await;
    let mut on_a = Agent::new(&a.url("db"), &a.acme.api_key);
    on_a.initialize_result().await;

    // The agent listens on A; the upstream's first message reaches it there, with a sealed id.
    let mut listening = on_a.get(None, "GET stream on A").await;
    assert_eq!(listening.status(), 200);
    read_events_until(&mut listening, |text| text.contains("id:")).await;
    gate.notify("one").await;
    let seen = read_events_until(&mut listening, |text| notes(text).len() == 1).await;
    assert_eq!(notes(&seen), ["one"]);
    let id = last_event_id(&seen).expect("the message's event id");

    // The agent's connection breaks; the upstream goes on sending while it is away.
    drop(listening);
    gate.notify("two").await;
    gate.notify("three").await;

    // It resumes on B, which never carried those messages: `connect` sends them again there,
    // then the new ones follow; nothing twice.
    let on_b = via(&b, &on_a);
    let mut resumed = on_b.get(Some(&id), "resume the GET stream on B").await;
    assert_eq!(resumed.status(), 200, "{:?}", resumed.text().await);
    assert!(common::is_event_stream(resumed.headers()));
    let missed = read_events_until(&mut resumed, |text| notes(text).len() >= 2).await;
    gate.notify("four").await;
    let rest = read_events_until(&mut resumed, |text| !notes(text).is_empty()).await;
    let got: Vec<String> = notes(&missed).into_iter().chain(notes(&rest)).collect();
    assert_eq!(got, ["two", "three", "four"], "{missed}{rest}");
}

/// A TCP forwarder on a loopback port to `target` whose connections the test cuts at once
/// (a tunnel drop while both ends live); new connections go through as before, unless the
/// test holds them off (the network is down a while).
struct Cuttable {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    held_off: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Cuttable {
    async fn start(
        target: std::net::SocketAddr,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let held_off = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = stop.clone();
        let holding = held_off.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stop.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    return;
                };
                if holding.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            cut,
            held_off,
        }
    }

    /// Closes new connections at once (`true`) or lets them through again.
    fn hold_off(&self, held_off: bool) {
        self.held_off
            .store(held_off, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// A tunnel drop while the relay lives: the answer in flight is not lost. The relay waits for
/// the session's `connect` to attach again, resumes the session on the new tunnel and has
/// `connect` replay the answer, which reaches the agent on its first request: no error, and
/// the upstream saw the call once. Both ways an answer goes out: plain JSON from a standalone
/// relay, and a stream primed at once from a relay of a fleet; an HTTP upstream and a stdio one.
#[tokio::test]
async fn an_answer_in_flight_survives_a_tunnel_drop_while_the_relay_lives() {
    for (in_fleet, stdio) in [(false, false), (true, false), (true, true)] {
        let (stop, _guard) = common::stop_on_drop();
        let fleet = Fleet::new();
        let relay = Harness::start(if in_fleet {
            fleet.options()
        } else {
            Options::default()
        })
        .await;
        let (upstream, gate, recorded) = common::start_gated_upstream(&stop).await;
        let stdio_gate = StdioGate::new();
        let proxy = Cuttable::start(relay.tunnel, &stop).await;
        let mut settings = relay.client_settings(&relay.acme, &[("db", &upstream)]);
        if stdio {
            settings.sources = vec![
                mcp_tunnel::config::SourceConfig::parse_flag(&stdio_gate.source())
                    .expect("a valid source"),
            ];
        }
        settings.relay = proxy.addr.to_string();
        settings.transport = mcp_tunnel::config::TransportChoice::Https;
        let _client = relay.connect_with(&relay.acme, settings).await;
        let mut agent = Agent::new(&relay.url("db"), &relay.acme.api_key);
        agent.initialize_result().await;

        let held = {
            let agent = via(&relay, &agent);
            tokio::spawn(async move { agent.call_tool(7, "hold", json!({})).await })
        };
        let case = format!("in a fleet: {in_fleet}, stdio: {stdio}");
        if stdio {
            stdio_gate.held().await;
        } else {
            gate.held().await;
        }
        proxy.cut();
        gate.release();
        stdio_gate.release();
        let answer = tokio::time::timeout(WAIT, held)
            .await
            .expect("the answer in time")
            .expect("the call task");
        assert_eq!(answer.status, 200, "{case}: {answer:?}");
        assert_eq!(
            common::tool_text(answer.response()),
            "released",
            "{case}: {answer:?}"
        );
        let calls = if stdio {
            stdio_gate.calls().len()
        } else {
            seen(&recorded, "tools/call")
        };
        assert_eq!(calls, 1, "{case}: the upstream saw the call once");
        // The session goes on.
        let next = agent.call_tool(8, "echo", json!({})).await;
        assert_eq!(next.status, 200, "{case}: {next:?}");
    }
}

/// A stdio server on the Python standard library that holds a call until the test releases it
/// and sends server-initiated messages when the test asks, driven through files in a folder:
/// the test's gate on a stdio upstream.
struct StdioGate {
    dir: tempfile::TempDir,
    notes: std::sync::atomic::AtomicUsize,
}

impl StdioGate {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("gated_server.py"),
            r#"
import json, os, sys, threading, time
DIR = sys.argv[1]
lock = threading.Lock()
def send(msg):
    with lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()
def wait_for(name):
    path = os.path.join(DIR, name)
    while not os.path.exists(path):
        time.sleep(0.02)
    return path
def hold(id):
    wait_for("release")
    send({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "released"}]}})
def notes():
    n = 1
    while True:
        with open(wait_for("note-%d" % n)) as f:
            data = f.read()
        send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": data}})
        n += 1
threading.Thread(target=notes, daemon=True).start()
for line in sys.stdin:
    msg = json.loads(line)
    method, id = msg.get("method"), msg.get("id")
    if method is None or id is None:
        continue
    if method == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}, "logging": {}}, "serverInfo": {"name": "gated", "version": "1"}}
    elif method == "tools/call":
        with open(os.path.join(DIR, "calls"), "a") as f:
            f.write(msg["params"]["name"] + "\n")
        if msg["params"]["name"] == "hold":
            open(os.path.join(DIR, "held"), "w").close()
            threading.Thread(target=hold, args=(id,), daemon=True).start()
            continue
        result = {"content": [{"type": "text", "text": "echoed"}]}
    else:
        result = {}
    send({"jsonrpc": "2.0", "id": id, "result": result})
"#,
        )
        .expect("script written");
        Self {
            dir,
            notes: Default::default(),
        }
    }

    /// The `--source` flag that runs it as `db`.
    fn source(&self) -> String {
        format!(
            "db=stdio:{}/tests/peers/.venv/bin/python -u {}/gated_server.py {}",
            env!("CARGO_MANIFEST_DIR"),
            self.dir.path().display(),
            self.dir.path().display()
        )
    }

    /// Waits (bounded) until the server holds a call.
    async fn held(&self) {
        let held = self.dir.path().join("held");
        tokio::time::timeout(WAIT, async {
            while !held.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the server holds the call");
    }

    /// Lets the held call answer.
    fn release(&self) {
        std::fs::write(self.dir.path().join("release"), "").expect("release written");
    }

    /// Has the server send a `notifications/message` with `text` outside any call.
    fn notify(&self, text: &str) {
        let n = self.notes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let ready = self.dir.path().join(format!("note-{n}"));
        let writing = self.dir.path().join(format!("writing-{n}"));
        std::fs::write(&writing, text).expect("note written");
        std::fs::rename(writing, ready).expect("note ready");
    }

    /// The names of the tools the server was called with, in order.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A stdio session's process lives in its `connect`, and so do its answers and messages: an
/// answer in flight when the agent's connection broke is resumed on another relay, and the
/// agent's GET stream resumes there with exactly the messages it missed.
#[tokio::test]
async fn a_stdio_sessions_answer_in_flight_and_its_get_stream_resume_on_another_relay() {
    let (_stop, _guard) = common::stop_on_drop();
    let gate = StdioGate::new();
    let fleet = Fleet::new();
    let (a, b) = two_relays(&fleet).await;
    let _client = connect_all_to(&[&a, &b], &gate.source()).await;
    let mut on_a = Agent::new(&a.url("db"), &a.acme.api_key);
    on_a.initialize_result().await;

    let (post, id) = post_hold(&on_a).await;
    gate.held().await;
    drop(post);
    let on_b = via(&b, &on_a);
    let resumed = on_b.get(Some(&id), "resume the answer on B").await;
    assert_eq!(resumed.status(), 200, "{:?}", resumed.text().await);
    gate.release();
    let answers = messages_of(resumed).await;
    assert_eq!(answers.len(), 1, "the answer, once: {answers:?}");
    assert_eq!(answers[0]["id"], 7);
    assert_eq!(common::tool_text(&answers[0]), "released");
    assert_eq!(gate.calls(), ["hold"], "the process got the call once");

    let mut listening = on_a.get(None, "GET stream on A").await;
    assert_eq!(listening.status(), 200);
    read_events_until(&mut listening, |text| text.contains("id:")).await;
    gate.notify("one");
    let seen = read_events_until(&mut listening, |text| notes(text).len() == 1).await;
    assert_eq!(notes(&seen), ["one"]);
    let id = last_event_id(&seen).expect("the message's event id");
    drop(listening);
    gate.notify("two");
    gate.notify("three");
    let mut resumed = on_b.get(Some(&id), "resume the GET stream on B").await;
    assert_eq!(resumed.status(), 200, "{:?}", resumed.text().await);
    let missed = read_events_until(&mut resumed, |text| notes(text).len() >= 2).await;
    gate.notify("four");
    let rest = read_events_until(&mut resumed, |text| !notes(text).is_empty()).await;
    let got: Vec<String> = notes(&missed).into_iter().chain(notes(&rest)).collect();
    assert_eq!(got, ["two", "three", "four"], "{missed}{rest}");
}

/// A tunnel that is down a while (its `connect` lives): a stdio session, which only that
/// `connect` can serve, is reconnecting, not gone. A call meanwhile gets an error that says so
/// (not the `404` that would end the agent's session), and once the tunnel is back the session
/// goes on in the same process.
#[tokio::test]
async fn a_stdio_session_outlives_a_tunnel_that_is_down_a_while() {
    let (stop, _guard) = common::stop_on_drop();
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = Harness::start(Options::default()).await;
    let proxy = Cuttable::start(relay.tunnel, &stop).await;
    let mut settings = relay.client_settings(&relay.acme, &[]);
    settings.sources = vec![
        mcp_tunnel::config::SourceConfig::parse_flag(&pid_server(dir.path()))
            .expect("a valid source"),
    ];
    settings.relay = proxy.addr.to_string();
    settings.transport = mcp_tunnel::config::TransportChoice::Https;
    let _client = relay.connect_with(&relay.acme, settings).await;
    tokio::time::timeout(WAIT, relay.state.registry.wait_for("acme", "db"))
        .await
        .expect("the tunnel is up");
    let mut agent = Agent::new(&relay.url("db"), &relay.acme.api_key);
    agent.initialize().await;
    let first = agent.echo(2, "one").await;
    let (_, pid) = first.split_once('@').expect("message@pid");

    proxy.hold_off(true);
    proxy.cut();
    tokio::time::timeout(WAIT, async {
        while relay.state.registry.route("acme", "db").is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the tunnel goes down");
    let meanwhile = agent.call_tool(3, "echo", json!({"message": "two"})).await;
    assert_ne!(
        meanwhile.status, 404,
        "the session is not gone: {meanwhile:?}"
    );
    let error = meanwhile.response()["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON-RPC error: {meanwhile:?}"))
        .to_owned();
    assert!(error.contains("reconnecting"), "{error}");

    proxy.hold_off(false);
    tokio::time::timeout(WAIT, relay.state.registry.wait_for("acme", "db"))
        .await
        .expect("the tunnel is back");
    assert_eq!(
        agent.echo(4, "three").await,
        format!("three@{pid}"),
        "the same process"
    );
}

/// An answer the agent resumed on another relay survives that relay's tunnel dropping too: the
/// replaying relay picks it up again from `connect` once its tunnel is back, after the
/// messages it already had.
#[tokio::test]
async fn a_replayed_answer_survives_a_tunnel_drop_of_the_replaying_relay() {
    let (stop, _guard) = common::stop_on_drop();
    let fleet = Fleet::new();
    let (a, b) = two_relays(&fleet).await;
    let (upstream, gate, recorded) = common::start_gated_upstream(&stop).await;
    let proxy = Cuttable::start(b.tunnel, &stop).await;
    let mut settings = a.client_settings(&a.acme, &[("db", &upstream)]);
    settings.relay = format!("{},{}", a.tunnel, proxy.addr);
    settings.transport = mcp_tunnel::config::TransportChoice::Https;
    settings.connections = 2;
    let _client = b.connect_with(&b.acme, settings).await;
    for relay in [&a, &b] {
        tokio::time::timeout(WAIT, relay.state.registry.wait_for("acme", "db"))
            .await
            .expect("every relay of the fleet gets a tunnel");
    }
    let mut on_a = Agent::new(&a.url("db"), &a.acme.api_key);
    on_a.initialize_result().await;
    let (post, id) = post_hold(&on_a).await;
    gate.held().await;
    drop(post);

    let on_b = via(&b, &on_a);
    let resumed = on_b.get(Some(&id), "resume the answer on B").await;
    assert_eq!(resumed.status(), 200, "{:?}", resumed.text().await);
    proxy.cut();
    gate.release();
    let answers = messages_of(resumed).await;
    assert_eq!(answers.len(), 1, "the answer, once: {answers:?}");
    assert_eq!(common::tool_text(&answers[0]), "released");
    assert_eq!(
        seen(&recorded, "tools/call"),
        1,
        "the upstream saw the call once"
    );
}
