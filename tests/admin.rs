//! The admin listener refuses what a web page could send it: a rebound DNS name in `Host`, or
//! another site's `Origin`; the relay's own operators (loopback names, IP addresses) get through.
//! Its tunnels, activity and metrics name the relay instance (`[fleet] id`).

mod common;

use common::{Harness, Options};

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
