//! The admin listener refuses what a web page could send it: a rebound DNS name in `Host`, or
//! another site's `Origin`; the relay's own operators (loopback names, IP addresses) get through.

mod common;

use common::{Harness, Options};

#[tokio::test]
async fn admin_refuses_rebound_hosts_and_foreign_origins() {
    common::init_tracing();
    let harness = Harness::start(Options::default()).await;
    let http = reqwest::Client::new();
    for path in ["/api/activity", "/api/tunnels", "/metrics", "/activity"] {
        let url = harness.admin_url(path);
        let plain = http.get(&url).send().await.expect("admin answers");
        assert_eq!(plain.status(), 200, "{path} by its IP address");
        let localhost = http
            .get(&url)
            .header("host", "localhost")
            .send()
            .await
            .expect("admin answers");
        assert_eq!(localhost.status(), 200, "{path} as localhost");
        let rebound = http
            .get(&url)
            .header("host", "evil.example")
            .send()
            .await
            .expect("admin answers");
        assert_eq!(rebound.status(), 403, "{path} with a rebound Host");
        let cross_site = http
            .get(&url)
            .header("origin", "http://evil.example")
            .send()
            .await
            .expect("admin answers");
        assert_eq!(cross_site.status(), 403, "{path} from another origin");
        let authority = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("a URL has an authority")
            .to_owned();
        let same_origin = http
            .get(&url)
            .header("origin", format!("http://{authority}"))
            .send()
            .await
            .expect("admin answers");
        assert_eq!(same_origin.status(), 200, "{path} from its own page");
    }
    harness.stop().await;
}
