//! Rate limits: token buckets per identity, per source and per tenant (`429` with
//! `Retry-After`), failed authentication limited per remote address, all from `[rate_limits]`
//! and applied by hot reload; and `[limits]` changed by hot reload. The rates are one token a
//! minute, so a burst is never refilled while a test runs.

mod common;

use common::{Agent, Answer, LISTENERS, ReloadableRelay, tenant_block, tool_text};
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::relay::reload::LoadedConfig;
use serde_json::json;

/// Tenant `acme`'s credentials: its tunnel token, and the keys of alice and bob.
struct Creds {
    token: String,
    alice: String,
    bob: String,
}

impl Creds {
    /// A relay on `config(extra)` with these credentials.
    async fn relay(&self, extra: &str) -> ReloadableRelay {
        ReloadableRelay::start(&self.token, &self.config(extra), &["demo", "other"]).await
    }

    fn new() -> Self {
        Self {
            token: new_secret("mcpt_tok_"),
            alice: new_secret("mcpt_key_"),
            bob: new_secret("mcpt_key_"),
        }
    }

    /// A relay config on loopback ports, then `rate_limits` verbatim.
    fn config(&self, rate_limits: &str) -> String {
        let tenant = tenant_block(
            &self.token,
            "",
            &[("alice", &self.alice, &[]), ("bob", &self.bob, &[])],
            &[],
        );
        format!("{LISTENERS}\n{tenant}\n{rate_limits}\n")
    }
}

/// Asserts `answer` is a `429` with a `Retry-After` of 1 to 60 seconds and a JSON-RPC error.
fn assert_limited(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 429, "{what}: {answer:?}");
    let retry: u64 = answer
        .headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: a Retry-After header: {answer:?}"))
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("whole seconds");
    assert!((1..=60).contains(&retry), "{what}: Retry-After {retry}");
    assert!(
        answer.response()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("retry after")),
        "{what}: a JSON-RPC error naming the wait: {answer:?}"
    );
}

async fn echo(agent: &Agent, id: u64) -> Answer {
    agent.call_tool(id, "echo", json!({"message": "hi"})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_limit_set_by_hot_reload_refuses_exactly_the_request_beyond_the_burst() {
    let creds = Creds::new();
    let mut relay = creds.relay("").await;
    let url = relay.url("demo");
    let mut alice = Agent::new(&url, &creds.alice);
    assert_eq!(alice.initialize().await.status, 200);
    for id in 1..=10 {
        assert_eq!(
            echo(&alice, id).await.status,
            200,
            "no limit configured yet"
        );
    }

    relay
        .reload_cleanly(&creds.config("[rate_limits]\nidentity = { per_minute = 1, burst = 4 }\n"))
        .await;
    let session = alice.session.clone();
    let answers = [
        echo(&alice, 11).await,
        echo(&alice, 12).await,
        echo(&alice, 13).await,
        echo(&alice, 14).await,
        echo(&alice, 15).await,
    ];
    let limited: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i].status == 429)
        .collect();
    assert_eq!(
        limited,
        [4],
        "exactly the fifth request is refused: {answers:?}"
    );
    for answer in &answers[..4] {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(tool_text(answer.response()), "hi");
    }
    assert_limited(&answers[4], "alice beyond her burst");
    assert_eq!(alice.session, session, "the session is kept");
    assert_eq!(relay.state.sessions.len(), 1, "the session is still open");

    // Bob has a bucket of his own.
    let mut bob = Agent::new(&url, &creds.bob);
    assert_eq!(bob.initialize().await.status, 200);
    assert_eq!(echo(&bob, 1).await.status, 200);

    // A reload without the limit lifts it, for the same open session.
    relay.reload_cleanly(&creds.config("")).await;
    assert_eq!(echo(&alice, 16).await.status, 200, "the limit is gone");
}

/// A rate limit on `scope` (`source` or `tenant`) with a burst of 5, spent by alice on `demo`
/// and bob on `bob_source`: the sixth request, bob's, is refused, and so is alice's next one;
/// returns alice's refusal.
async fn shared_burst_is_spent(scope: &str, bob_source: &str) -> Answer {
    let creds = Creds::new();
    let relay = creds
        .relay(&format!(
            "[rate_limits]\n{scope} = {{ per_minute = 1, burst = 5 }}\n"
        ))
        .await;
    let mut alice = Agent::new(&relay.url("demo"), &creds.alice);
    let mut bob = Agent::new(&relay.url(bob_source), &creds.bob);
    // Each initialize is two requests: the handshake and its `initialized` notification.
    assert_eq!(alice.initialize().await.status, 200);
    assert_eq!(bob.initialize().await.status, 200, "bob on {bob_source}");
    assert_eq!(echo(&alice, 1).await.status, 200);
    assert_limited(
        &echo(&bob, 1).await,
        &format!("the {scope}'s sixth request"),
    );
    let refused = echo(&alice, 2).await;
    assert_limited(&refused, &format!("alice too: the {scope} is spent"));
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_limit_counts_every_caller_of_the_tenant() {
    shared_burst_is_spent("source", "demo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_limit_counts_every_caller_and_every_source_of_the_tenant() {
    let refused = shared_burst_is_spent("tenant", "other").await;
    assert!(
        refused.response()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tenant")),
        "the refusal names the tenant's limit: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_request_timeout_for_new_requests_and_keeps_the_session() {
    let creds = Creds::new();
    let mut relay = creds.relay("").await;
    let mut alice = Agent::new(&relay.url("demo"), &creds.alice);
    assert_eq!(alice.initialize().await.status, 200);
    let session = alice.session.clone();
    let sleep = |id: u64, ms: u64| {
        let alice = &alice;
        async move { alice.call_tool(id, "sleep", json!({"ms": ms})).await }
    };
    // Under the default five minutes, a 1.5 s tool answers.
    assert_eq!(tool_text(sleep(1, 1500).await.response()), "slept 1500 ms");

    // One second from now on: a 30 s tool is cut off after one second (the margin between
    // the two is what the test relies on, not the machine's speed).
    relay
        .reload_cleanly(&creds.config("[limits]\nrequest_timeout_secs = 1\n"))
        .await;
    let cut = sleep(2, 30_000).await;
    assert_eq!(cut.status, 200, "{cut:?}");
    assert_eq!(cut.response()["error"]["code"], -32001, "{cut:?}");
    assert!(
        cut.response()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("within 1 s")),
        "{cut:?}"
    );
    assert_eq!(alice.session, session, "the session is kept");
    assert_eq!(echo(&alice, 3).await.status, 200, "and still works");

    // Back to a long timeout: the 1.5 s tool answers again, in the same session.
    relay
        .reload_cleanly(&creds.config("[limits]\nrequest_timeout_secs = 60\n"))
        .await;
    assert_eq!(tool_text(sleep(4, 1500).await.response()), "slept 1500 ms");
    assert_eq!(relay.state.sessions.len(), 1, "one session throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_beyond_the_limit_from_one_address_gets_429() {
    let creds = Creds::new();
    let relay = creds
        .relay("[rate_limits]\nauth_failures = { per_minute = 1, burst = 3 }\n")
        .await;
    let url = relay.url("demo");
    let mut alice = Agent::new(&url, &creds.alice);
    assert_eq!(alice.initialize().await.status, 200, "a good key works");
    for attempt in 1..=3 {
        let answer = Agent::new(&url, "mcpt_key_wrong").initialize().await;
        assert_eq!(answer.status, 401, "attempt {attempt}: {answer:?}");
    }
    let answer = Agent::new(&url, "mcpt_key_wrong").initialize().await;
    assert_limited(&answer, "the fourth failure");
    let answer = echo(&alice, 1).await;
    assert_limited(&answer, "the address is out of attempts, whatever the key");
}

#[test]
fn unknown_and_invalid_rate_limit_settings_are_refused_naming_them() {
    let creds = Creds::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("relay.toml");
    for (text, named) in [
        ("[rate_limits]\nper_tenant = 5\n", "per_tenant"),
        (
            "[rate_limits]\nidentity = { per_minute = 1, burst = 1, refill = 2 }\n",
            "refill",
        ),
    ] {
        std::fs::write(&path, creds.config(text)).expect("write");
        let error = LoadedConfig::load(&path)
            .err()
            .unwrap_or_else(|| panic!("{text} is refused"));
        assert!(error.to_string().contains(named), "{named}: {error}");
    }
    std::fs::write(
        &path,
        creds.config("[rate_limits]\nidentity = { per_minute = 0, burst = 1 }\n"),
    )
    .expect("write");
    let loaded = LoadedConfig::load(&path).expect("the file parses");
    let error = mcp_tunnel::relay::Governance::from_config(&loaded.config)
        .err()
        .expect("a zero rate is refused");
    assert!(error.contains("[rate_limits] identity"), "{error}");
}
