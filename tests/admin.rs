//! The admin listener refuses what a web page could send it: a rebound DNS name in `Host`, or
//! another site's `Origin`; the relay's own operators (loopback names, IP addresses) get through.

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
