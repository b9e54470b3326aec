//! `connect` attaches to every address a relay name resolves to: two relays on one port number,
//! one on 127.0.0.1 and one on ::1, and `connect --relay localhost:PORT`.
//!
//! The name's addresses come from a [`Resolver`] the test controls: this host's resolver may
//! give `localhost` only 127.0.0.1 (many container images list only that in /etc/hosts), and
//! the re-resolution test needs addresses that come and go. The TLS server name is `localhost`
//! either way, verified against the relays' CAs.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Agent, Client, Harness, Options, WAIT, assert_echo, quic_settings};
use mcp_tunnel::client::Resolver;
use mcp_tunnel::config::TransportChoice;
use serde_json::Value;

const SOURCE: &str = "everything";

/// Two relays sharing acme's credentials, their tunnels on the same port number: the first on
/// 127.0.0.1 (port chosen by the OS), the second on ::1.
async fn relays_on_one_port() -> (Harness, Harness) {
    let mut last_error = String::new();
    for _ in 0..10 {
        let v4 = Harness::start(Options::default()).await;
        let v6 = Harness::try_start(Options {
            creds: Some((v4.acme.clone(), v4.other.clone())),
            tunnel_listen: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, v4.tunnel.port()))),
            ..Options::default()
        })
        .await;
        match v6 {
            Ok(v6) => return (v4, v6),
            // The port is taken on ::1 by something else: try another one.
            Err(e) => last_error = e.to_string(),
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1 in 10 tries: {last_error}");
}

/// The addresses `localhost:PORT` resolves to, as the test sets them.
type Addresses = Arc<Mutex<Vec<SocketAddr>>>;

/// A resolver answering `localhost:PORT` with `addresses` (anything else does not resolve).
fn resolver(port: u16, addresses: Addresses) -> Resolver {
    Resolver::new(move |relay| {
        let found = if relay == format!("localhost:{port}") {
            Ok(addresses.lock().expect("not poisoned").clone())
        } else {
            Err(std::io::Error::other(format!(
                "unexpected lookup of {relay}"
            )))
        };
        Box::pin(async move { found })
    })
}

/// Runs `connect --relay localhost:PORT` for acme serving [`SOURCE`], the name resolving to
/// `addresses`; waits until `v4` routes it.
async fn connect_localhost(
    (v4, v6): (&Harness, &Harness),
    upstream: &str,
    addresses: &Addresses,
    transport: TransportChoice,
) -> Client {
    let port = v4.tunnel.port();
    let mut settings = quic_settings(
        format!("localhost:{port}"),
        &v4.acme.tunnel_token,
        &format!("{}{}", v4.ca_pem, v6.ca_pem),
        &[(SOURCE, upstream)],
    );
    settings.transport = transport;
    settings.resolver = resolver(port, addresses.clone());
    settings.resolve_interval = Duration::from_millis(50);
    v4.connect_with(&v4.acme, settings).await
}

/// The `/api/tunnels` rows of acme's [`SOURCE`] on `relay`.
async fn tunnel_rows(relay: &Harness) -> Vec<Value> {
    let rows: Vec<Value> = reqwest::get(relay.admin_url("/api/tunnels"))
        .await
        .expect("GET /api/tunnels")
        .json()
        .await
        .expect("JSON rows");
    rows.into_iter()
        .filter(|r| r["tenant"] == "acme" && r["source"] == SOURCE)
        .collect()
}

/// An agent session through `relay` calls echo; the session stays open.
async fn echo_through(relay: &Harness, message: &str) -> Agent {
    let mut agent = Agent::new(&relay.url(SOURCE), &relay.acme.api_key);
    agent.initialize_result().await;
    assert_echo(&agent, 1, message).await;
    agent
}

/// Ends `sessions` (so that `connect` stops without waiting out its drain grace).
async fn end(sessions: Vec<Agent>) {
    for session in sessions {
        assert_eq!(session.delete().await, 200, "session deleted");
    }
}

async fn both_relays_get_a_tunnel_from_one_name(transport: TransportChoice) {
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let (v4, v6) = relays_on_one_port().await;
    let port = v4.tunnel.port();
    let addresses: Addresses = Arc::new(Mutex::new(vec![
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]));
    let client = connect_localhost((&v4, &v6), &upstream, &addresses, transport).await;
    tokio::time::timeout(WAIT, v6.state.registry.wait_for("acme", SOURCE))
        .await
        .expect("the relay on ::1 gets a tunnel too");

    let expected = match transport {
        TransportChoice::Https => "https",
        _ => "quic",
    };
    let mut sessions = Vec::new();
    for (relay, from) in [(&v4, "127.0.0.1:"), (&v6, "[::1]:")] {
        let rows = tunnel_rows(relay).await;
        assert_eq!(rows.len(), 1, "one tunnel on each relay: {rows:?}");
        assert_eq!(rows[0]["transport"], expected, "{rows:?}");
        let remote = rows[0]["remote"].as_str().expect("remote");
        assert!(remote.starts_with(from), "dialed from {from}: {remote}");
        sessions.push(echo_through(relay, &format!("via {from}")).await);
    }
    end(sessions).await;
    client.stop().await.expect("connect stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_a_name_gets_a_tunnel_over_quic() {
    both_relays_get_a_tunnel_from_one_name(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_a_name_gets_a_tunnel_over_https() {
    both_relays_get_a_tunnel_from_one_name(TransportChoice::Https).await;
}

/// Names are looked up again: an address that appears gets a connection, one that disappears
/// has its connection drained (a session on it goes on; the relay routes nothing new there),
/// and one that comes back is attached again. The other relay is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_that_come_and_go_are_attached_and_retired() {
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let (v4, v6) = relays_on_one_port().await;
    let port = v4.tunnel.port();
    let (v4_addr, v6_addr) = (
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    );
    let addresses: Addresses = Arc::new(Mutex::new(vec![v4_addr]));
    let client = connect_localhost((&v4, &v6), &upstream, &addresses, TransportChoice::Quic).await;
    assert!(
        v6.state.registry.route("acme", SOURCE).is_none(),
        "no slot for an address the name does not resolve to"
    );

    // ::1 appears.
    *addresses.lock().expect("not poisoned") = vec![v4_addr, v6_addr];
    tokio::time::timeout(WAIT, v6.state.registry.wait_for("acme", SOURCE))
        .await
        .expect("a new address gets a connection");
    let session = echo_through(&v6, "before").await;

    // ::1 disappears: its connection drains, the session on it goes on.
    *addresses.lock().expect("not poisoned") = vec![v4_addr];
    tokio::time::timeout(
        WAIT,
        v6.state
            .registry
            .wait_until(|registry| registry.route("acme", SOURCE).is_none()),
    )
    .await
    .expect("the retired connection drains");
    assert_echo(&session, 2, "in flight").await;
    end(vec![session]).await;
    tokio::time::timeout(
        WAIT,
        v6.state
            .registry
            .wait_until(|registry| registry.rows().iter().all(|r| r.tenant != "acme")),
    )
    .await
    .expect("the drained connection closes once its streams are done");
    assert!(
        v4.state.registry.route("acme", SOURCE).is_some(),
        "the other relay keeps its tunnel"
    );
    let on_v4 = echo_through(&v4, "still served").await;

    // ::1 comes back.
    *addresses.lock().expect("not poisoned") = vec![v4_addr, v6_addr];
    tokio::time::timeout(WAIT, v6.state.registry.wait_for("acme", SOURCE))
        .await
        .expect("an address that comes back is attached again");
    let again = echo_through(&v6, "again").await;
    end(vec![on_v4, again]).await;
    client.stop().await.expect("connect stops cleanly");
}

/// An address of the name that answers neither QUIC nor TLS (here a TCP listener on ::1 that
/// closes every connection, and no UDP) is retried on its own, and in `auto` does not make
/// `connect` conclude that UDP is blocked: the working relay's next connection is QUIC still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_does_not_answer_does_not_move_the_others_to_https() {
    let (stop, _guard) = common::stop_on_drop();
    let upstream = common::demo_upstream(&stop).await;
    let (v4, v6) = relays_on_one_port().await;
    let dead = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .await
        .expect("bind ::1");
    let addresses: Addresses = Arc::new(Mutex::new(vec![
        SocketAddr::from((Ipv4Addr::LOCALHOST, v4.tunnel.port())),
        dead.local_addr().expect("local address"),
    ]));
    let _client = connect_localhost((&v4, &v6), &upstream, &addresses, TransportChoice::Auto).await;
    // The dead address's slot tries QUIC (no answer within 1.5 s), then TLS (closed at once);
    // its second attempt starts only once the first ended, whatever it concluded.
    for attempt in 1..=2 {
        let (socket, _) = tokio::time::timeout(WAIT, dead.accept())
            .await
            .unwrap_or_else(|_| panic!("attempt {attempt} on the dead address"))
            .expect("accept");
        drop(socket);
    }
    let first = v4.drop_acme_tunnel(SOURCE, "test drops the connection");
    tokio::time::timeout(
        WAIT,
        v4.state.registry.wait_until(|registry| {
            registry
                .route("acme", SOURCE)
                .is_some_and(|tunnel| tunnel.id != first)
        }),
    )
    .await
    .expect("connect reconnects to the working relay");
    let rows = tunnel_rows(&v4).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        rows[0]["transport"], "quic",
        "UDP was not judged blocked: {rows:?}"
    );
    let session = echo_through(&v4, "quic still").await;
    end(vec![session]).await;
}
