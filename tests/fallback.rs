//! The HTTPS fallback and connection lifecycle: UDP swallowed, UDP back, a CONNECT proxy, a
//! dropped connection, several connections.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, Harness, Options, WAIT, tool_text};
use mcp_tunnel::config::TransportChoice;
use mcp_tunnel::relay::TunnelRow;
use serde_json::json;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A stand-in for the relay's address: TCP is forwarded to the relay; UDP datagrams are
/// swallowed while the gate is closed and forwarded while it is open.
struct Front {
    addr: SocketAddr,
    udp_open: Arc<AtomicBool>,
    _stop: tokio_util::sync::DropGuard,
}

impl Front {
    async fn start(relay: SocketAddr) -> Self {
        // The same port number for UDP and TCP, like the relay itself.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().expect("addr")).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let udp_open = Arc::new(AtomicBool::new(false));
        tokio::spawn(forward_tcp(tcp, relay, stop.clone()));
        tokio::spawn(forward_udp(
            Arc::new(udp),
            relay,
            udp_open.clone(),
            stop.clone(),
        ));
        Self {
            addr,
            udp_open,
            _stop: stop.drop_guard(),
        }
    }
}

async fn forward_tcp(listener: TcpListener, relay: SocketAddr, stop: CancellationToken) {
    loop {
        let (mut inbound, _) = tokio::select! {
            accepted = listener.accept() => accepted.expect("accept"),
            _ = stop.cancelled() => return,
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut outbound = tokio::net::TcpStream::connect(relay)
                .await
                .expect("relay TCP");
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn forward_udp(
    front: Arc<UdpSocket>,
    relay: SocketAddr,
    open: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP"));
    back.connect(relay).await.expect("connect UDP");
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    let returning = {
        let (front, back, client, open, stop) = (
            front.clone(),
            back.clone(),
            client.clone(),
            open.clone(),
            stop.clone(),
        );
        async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let n = tokio::select! {
                    n = back.recv(&mut buf) => match n { Ok(n) => n, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let to = *client.lock().expect("lock");
                if let (true, Some(to)) = (open.load(Ordering::Relaxed), to) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        }
    };
    tokio::spawn(returning);
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = tokio::select! {
            received = front.recv_from(&mut buf) => match received { Ok(r) => r, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        // Swallowed while closed: read and dropped, exactly what a UDP-blocking firewall does.
        if open.load(Ordering::Relaxed) {
            *client.lock().expect("lock") = Some(from);
            let _ = back.send(&buf[..n]).await;
        }
    }
}

async fn demo_harness() -> (Harness, String, CancellationToken) {
    let upstreams = CancellationToken::new();
    let url = common::demo_upstream(&upstreams).await;
    (Harness::start(Options::default()).await, url, upstreams)
}

fn transports(harness: &Harness) -> Vec<String> {
    harness
        .state
        .registry
        .rows()
        .into_iter()
        .map(|r| r.transport)
        .collect()
}

async fn echo_once(harness: &Harness, message: &str) {
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    assert_eq!(agent.echo(1, message).await, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_transport_carries_sessions_and_large_results() {
    let (harness, url, _upstreams) = demo_harness().await;
    let mut settings = harness.client_settings(&harness.acme, &[("demo", &url)]);
    settings.transport = TransportChoice::Https;
    let _client = harness.connect_with(&harness.acme.clone(), settings).await;
    assert_eq!(transports(&harness), vec!["https"]);
    let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    agent.initialize().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let agent = agent.clone();
        calls.spawn(async move {
            let answer = agent
                .call_tool(i, "echo", json!({"message": format!("m{i}")}))
                .await;
            assert_eq!(tool_text(answer.response()), format!("m{i}"));
        });
    }
    while let Some(call) = calls.join_next().await {
        call.expect("call");
    }
    let size = 10 * 1024 * 1024;
    let blob = agent.call_tool(99, "blob", json!({"size": size})).await;
    assert!(
        tool_text(blob.response()) == mcp_tunnel::demo::tools::blob_text(size),
        "10 MiB intact over HTTPS"
    );
    let mut stateless = Agent::new(&harness.url("demo"), &harness.acme.api_key);
    stateless.version = Some("2026-07-28".into());
    let discover = stateless.discover().send().await.expect("discover");
    assert_eq!(discover.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_serves_over_https_within_3s_when_udp_is_swallowed_and_returns_to_quic() {
    let (harness, url, _upstreams) = demo_harness().await;
    let front = Front::start(harness.tunnel).await;
    let mut settings = harness.client_settings(&harness.acme, &[("demo", &url)]);
    settings.relay = front.addr.to_string();
    settings.transport = TransportChoice::Auto;
    settings.probe_interval = Duration::from_millis(500);
    let started = Instant::now();
    let _client = harness.connect_with(&harness.acme.clone(), settings).await;
    echo_once(&harness, "over the fallback").await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "served within 3 s of start, took {elapsed:?}"
    );
    assert_eq!(transports(&harness), vec!["https"]);

    // UDP works again: the next probe succeeds, QUIC takes over, the HTTPS connection drains.
    front.udp_open.store(true, Ordering::Relaxed);
    tokio::time::timeout(WAIT, async {
        while transports(&harness) != ["quic"] {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("back on QUIC within the probe interval");
    echo_once(&harness, "over QUIC again").await;
    let rows = harness.state.registry.rows();
    assert!(
        rows[0].streams_opened >= 1,
        "the new session rode QUIC: {rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_a_real_connect_proxy() {
    let (harness, url, _upstreams) = demo_harness().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tinyproxy.conf");
    std::fs::write(&config, format!("Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\nLogLevel Info\nConnectPort {}\nMaxClients 20\n", harness.tunnel.port())).expect("config");
    let tinyproxy = which("tinyproxy")
        .expect("tinyproxy is installed (Debian package tinyproxy; .ci/run installs it)");
    let mut proxy = common::spawn(
        tokio::process::Command::new(tinyproxy)
            .arg("-d")
            .arg("-c")
            .arg(&config),
    );
    // Ready when it accepts TCP.
    tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("tinyproxy listens");
    let mut settings = harness.client_settings(&harness.acme, &[("demo", &url)]);
    settings.transport = TransportChoice::Https;
    settings.proxy = Some(format!("http://127.0.0.1:{port}"));
    let _client = harness.connect_with(&harness.acme.clone(), settings).await;
    echo_once(&harness, "through the proxy").await;
    let row = &harness.state.registry.rows()[0];
    assert_eq!(row.transport, "https");
    assert_eq!(row.remote.split(':').next(), Some("127.0.0.1"));
    let _ = proxy.0.start_kill();
    let _ = proxy.0.wait().await;
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connections_calls_are_answered_through_the_other_and_it_reconnects() {
    let (harness, url, _upstreams) = demo_harness().await;
    let mut settings = harness.client_settings(&harness.acme, &[("demo", &url)]);
    settings.connections = 2;
    let _client = harness.connect_with(&harness.acme.clone(), settings).await;
    tokio::time::timeout(WAIT, async {
        while harness.state.registry.rows().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("two connections");
    // Sessions spread over both connections (the relay picks the least busy).
    let mut agents = Vec::new();
    for _ in 0..4 {
        let mut agent = Agent::new(&harness.url("demo"), &harness.acme.api_key);
        agent.initialize().await;
        agents.push(agent);
    }
    let rows = harness.state.registry.rows();
    assert!(
        rows.iter().all(|r| r.streams_active == 2),
        "sessions spread: {rows:?}"
    );
    let mut calls = tokio::task::JoinSet::new();
    for agent in &agents {
        let agent = agent.clone();
        calls.spawn(async move { agent.call_tool(1, "sleep", json!({"ms": 3000})).await });
    }
    // Let the calls reach the upstream, then drop one connection from the relay's side. The
    // upstream sessions live in connect, which keeps the answers of the dropped streams: the
    // relay resumes those sessions on the other connection and picks the answers up there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    harness.drop_acme_tunnel("demo", "test drops this connection");
    while let Some(call) = calls.join_next().await {
        let answer = call.expect("call task");
        assert_eq!(
            tool_text(answer.response()),
            "slept 3000 ms",
            "every call is answered: {}",
            answer.response()
        );
    }
    let metrics = harness.metrics().await;
    assert!(
        common::counter(&metrics, "mcp_tunnel_answers_reattached_total") >= 2,
        "the dropped connection's two answers were picked up elsewhere: {metrics}"
    );
    echo_once(&harness, "still served").await;
    tokio::time::timeout(WAIT, async {
        while harness.state.registry.rows().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connect reconnects the dropped connection");
}

/// Waits until the relay's tunnel rows satisfy `ready`.
async fn until_rows(harness: &Harness, what: &str, ready: impl Fn(&[TunnelRow]) -> bool) {
    tokio::time::timeout(WAIT, async {
        while !ready(&harness.state.registry.rows()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: {:?}", harness.state.registry.rows()));
}

/// A `connect` killed without a word (`kill -9`, power loss) leaves a QUIC connection that looks
/// open to the relay until its idle timeout (10 s). Once its peer is silent, new sessions go to
/// the replacement, here on the HTTPS fallback, although QUIC is otherwise preferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_quic_tunnel_gets_no_new_sessions_while_its_https_replacement_is_heard() {
    let (harness, url, _upstreams) = demo_harness().await;
    let front = Front::start(harness.tunnel).await;
    front.udp_open.store(true, Ordering::Relaxed);
    let mut settings = harness.client_settings(&harness.acme, &[("demo", &url)]);
    settings.relay = front.addr.to_string();
    settings.transport = TransportChoice::Quic;
    let _vanishing = harness.connect_with(&harness.acme.clone(), settings).await;
    echo_once(&harness, "over QUIC").await;
    let opened_on_quic = harness.state.registry.rows()[0].streams_opened;

    // Every datagram either way is lost from now on: to the relay, the peer went quiet.
    front.udp_open.store(false, Ordering::Relaxed);
    let mut settings = harness.client_settings(&harness.acme, &[("demo", &url)]);
    settings.transport = TransportChoice::Https;
    let _replacement = harness.connect_with(&harness.acme.clone(), settings).await;
    until_rows(
        &harness,
        "the QUIC tunnel turns silent, the HTTPS one is heard",
        |rows| {
            rows.len() == 2
                && rows
                    .iter()
                    .all(|r| r.silent == (r.transport == "quic") && !r.draining)
        },
    )
    .await;
    tokio::time::timeout(WAIT, echo_once(&harness, "over the replacement"))
        .await
        .expect("a new session is served by the tunnel that is heard from");
    let rows = harness.state.registry.rows();
    let https = rows
        .iter()
        .find(|r| r.transport == "https")
        .expect("the replacement");
    assert!(https.streams_opened >= 1, "{rows:?}");
    let quic = rows.iter().find(|r| r.transport == "quic");
    assert!(
        quic.is_none_or(|r| r.streams_opened == opened_on_quic),
        "nothing new went to the silent tunnel: {rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_several_relays() {
    let (first, url, _upstreams) = demo_harness().await;
    let second = Harness::start(Options {
        creds: Some((first.acme.clone(), first.other.clone())),
        ..Options::default()
    })
    .await;
    let mut settings = first.client_settings(&first.acme, &[("demo", &url)]);
    settings.relay = format!("{},{}", first.tunnel, second.tunnel);
    settings.connections = 2;
    settings.ca_pem = Some(format!("{}{}", first.ca_pem, second.ca_pem));
    let _client = first.connect_with(&first.acme.clone(), settings).await;
    tokio::time::timeout(WAIT, second.state.registry.wait_for("acme", "demo"))
        .await
        .expect("the second relay gets a connection too");
    for harness in [&first, &second] {
        assert_eq!(
            harness.state.registry.rows().len(),
            1,
            "one connection per relay"
        );
        echo_once(harness, "either relay").await;
    }
}
