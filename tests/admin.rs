//! The admin listener refuses what a web page could send it: a rebound DNS name in `Host`, or
//! another site's `Origin`; the relay's own operators (loopback names, IP addresses) get through.
//! Its tunnels, activity and metrics name the relay instance (`[fleet] id`). A relay of a fleet
//! reports itself unready (`/healthz` 503) while it starts, as while it drains.

mod common;

use std::time::Duration;

use common::{Agent, Answer, Harness, Options, WAIT};

/// The status of `GET url` with `header` added, if any.
async fn status(http: &reqwest::Client, url: &str, header: Option<(&str, String)>) -> u16 {
    let mut request = http.get(url);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    request
        .send()
        .await
        .expect("admin answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn admin_refuses_rebound_hosts_and_foreign_origins() {
    common::init_tracing();
    let harness = Harness::start(Options::default()).await;
    let http = reqwest::Client::new();
    for path in ["/api/activity", "/api/tunnels", "/metrics", "/activity"] {
        let url = harness.admin_url(path);
        let plain = status(&http, &url, None).await;
        assert_eq!(plain, 200, "{path} by its IP address");
        let localhost = status(&http, &url, Some(("host", "localhost".into()))).await;
        assert_eq!(localhost, 200, "{path} as localhost");
        let rebound = status(&http, &url, Some(("host", "evil.example".into()))).await;
        assert_eq!(rebound, 403, "{path} with a rebound Host");
        let cross_site = status(&http, &url, Some(("origin", "http://evil.example".into()))).await;
        assert_eq!(cross_site, 403, "{path} from another origin");
        let authority = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("a URL has an authority")
            .to_owned();
        let same_origin =
            status(&http, &url, Some(("origin", format!("http://{authority}")))).await;
        assert_eq!(same_origin, 200, "{path} from its own page");
    }
    harness.stop().await;
}

/// Harness options for a relay of a fleet with instance id `id`.
fn fleet_relay(id: &str) -> Options {
    Options {
        fleet: mcp_tunnel::relay::FleetSettings {
            id: Some(id.into()),
            drain_delay: std::time::Duration::ZERO,
            ..Default::default()
        },
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_activity_and_metrics_name_the_relay_instance() {
    common::init_tracing();
    let (harness, _client, _upstream) = common::harness_with_demo(fleet_relay("relay-a")).await;
    // Another relay in the same process (one metrics recorder for both) under its own name.
    let peer = Harness::start(fleet_relay("relay-b")).await;

    let rows: Vec<serde_json::Value> = common::get(&harness.admin_url("/api/tunnels"))
        .await
        .json()
        .await
        .expect("/api/tunnels is JSON");
    assert!(!rows.is_empty(), "the demo tunnel is listed");
    for row in &rows {
        assert_eq!(row["relay"], "relay-a", "{row}");
        assert_eq!(row["source"], "demo", "the tunnel's own fields stay: {row}");
    }

    let metrics = harness.metrics().await;
    assert!(
        metrics.contains("mcp_tunnel_relay_info{relay=\"relay-a\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("relay-b"), "only its own name: {metrics}");
    let peer_metrics = peer.metrics().await;
    assert!(
        peer_metrics.contains("mcp_tunnel_relay_info{relay=\"relay-b\"} 1"),
        "{peer_metrics}"
    );

    let page = common::get(&harness.admin_url("/activity"))
        .await
        .text()
        .await
        .expect("/activity body");
    let header = page
        .split_once("<header")
        .and_then(|(_, rest)| rest.split_once("</header>"))
        .map(|(header, _)| header)
        .expect("the page has a header");
    assert!(header.contains("relay-a"), "{header}");
    let activity: serde_json::Value = common::get(&harness.admin_url("/api/activity"))
        .await
        .json()
        .await
        .expect("/api/activity is JSON");
    assert_eq!(activity["relay"], "relay-a");

    peer.stop().await;
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_ok_while_the_relay_serves() {
    common::init_tracing();
    let harness = Harness::start(Options::default()).await;
    let response = common::get(&harness.admin_url("/healthz")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("/healthz body"), "ok\n");
    harness.stop().await;
}

/// The status and body of `harness`'s `/healthz`.
async fn healthz(harness: &Harness) -> (u16, String) {
    let response = common::get(&harness.admin_url("/healthz")).await;
    let status = response.status().as_u16();
    (status, response.text().await.expect("/healthz body"))
}

/// `answer` is the starting relay's refusal: `503`, `Retry-After: 1`, a JSON-RPC error saying
/// the relay is starting.
fn assert_starting(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 503, "{what}: {answer:?}");
    assert_eq!(
        answer
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "{what}: {answer:?}"
    );
    assert!(
        answer.error_message().contains("relay is starting"),
        "{what}: {answer:?}"
    );
}

/// A restarted relay of a fleet takes no agent before a tunnel is back: `/healthz` answers
/// `503 starting`, and a request for a source it does not route yet is `503` with
/// `Retry-After` (whether the source exists for the caller, for nobody, or for another
/// tenant; or a session another relay opened), not the `404` of an unknown source; once a
/// tunnel registers, it is ready and an unknown source is `404` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_relay_is_unready_until_a_tunnel_registers() {
    common::init_tracing();
    let fleet = common::Fleet::new();
    let upstreams = tokio_util::sync::CancellationToken::new();
    let _upstreams = upstreams.clone().drop_guard();
    let upstream = common::demo_upstream(&upstreams).await;
    // Relay A serves `demo` (no startup window: ready at once); a session opens there.
    let a = Harness::start(fleet.options()).await;
    let _connect_a = a.connect(&a.acme.clone(), &[("demo", &upstream)]).await;
    let mut on_a = Agent::new(&a.url("demo"), &a.acme.api_key);
    on_a.initialize_result().await;
    common::assert_echo(&on_a, 1, "on a").await;

    // Relay B of the same fleet has just started, no `connect` attached. (Its window is longer
    // than a fleet relay's, so that a slow machine cannot end it during the test.)
    let mut options = fleet.options();
    options.creds = Some((a.acme.clone(), a.other.clone()));
    options.fleet.startup_window = Duration::from_secs(600);
    let b = Harness::start(options).await;
    assert_eq!(healthz(&b).await, (503, "starting\n".into()));
    let unrouted = [
        ("acme's source", &b.acme.api_key, "demo"),
        ("a source of nobody", &b.acme.api_key, "nosuch"),
        ("another tenant's source", &b.other.api_key, "demo"),
    ];
    for (what, key, source) in unrouted {
        let mut agent = Agent::new(&b.url(source), key);
        assert_starting(&agent.initialize().await, &format!("initialize of {what}"));
        agent.version = Some("2026-07-28".into());
        let discover = common::read_answer(agent.discover().send().await.expect("sent")).await;
        assert_starting(&discover, &format!("stateless request of {what}"));
    }
    let mut resumed = on_a.clone();
    resumed.url = b.url("demo");
    assert_starting(
        &resumed
            .call_tool(2, "echo", serde_json::json!({"message": "on b"}))
            .await,
        "a call of a session relay A opened",
    );

    // A tunnel registers: ready.
    let _connect_b = b.connect(&b.acme.clone(), &[("demo", &upstream)]).await;
    tokio::time::timeout(WAIT, async {
        while healthz(&b).await != (200, "ok\n".into()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("/healthz answers 200 once a tunnel registered");
    for (what, key, source) in unrouted.iter().skip(1) {
        let mut agent = Agent::new(&b.url(source), key);
        let init = agent.initialize().await;
        assert_eq!(init.status, 404, "{what} once ready: {init:?}");
    }
    common::assert_echo(&resumed, 3, "on b").await;
    b.stop().await;
    a.stop().await;
}
