//! Tunnel trust (issue 13, items 11 to 14): which tunnel token may serve which source, what a
//! relay may make `connect` send upstream, the identity assertion's audience and renewal, and
//! the identity providers' reach. Driven from outside: a relay from a config file, `connect`
//! clients, agents over HTTP, upstreams that record what reaches them.

mod common;

use std::time::Duration;

use common::{
    Agent, FileRelay, ISSUER, LISTENERS, PUBLIC_URL, WAIT, cert_dir, quic_settings,
    start_recording_upstream, write_config,
};
use mcp_tunnel::client::{self, ClientError};
use mcp_tunnel::govern::SecretHash;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::relay::RelayState;
use tokio_util::sync::CancellationToken;

/// The `tools/call` requests an upstream saw.
fn tool_calls(seen: &common::Seen) -> usize {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|(method, ..)| method == "tools/call")
        .count()
}

/// A `connect` with `token` serving `db` from `upstream`, once the relay lists `rows` tunnel
/// rows for `db`.
async fn serve_db(
    relay: &FileRelay,
    (token, ca_pem): (&str, &str),
    upstream: &str,
    rows: usize,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ClientError>> {
    let task = tokio::spawn(client::run(
        quic_settings(relay.tunnel, token, ca_pem, &[("db", upstream)]),
        shutdown.child_token(),
    ));
    wait_rows(&relay.state, "db", rows).await;
    task
}

/// Waits (bounded) until the relay lists `count` tunnel rows for `source`.
async fn wait_rows(state: &RelayState, source: &str, count: usize) {
    tokio::time::timeout(WAIT, async {
        loop {
            let rows = state.registry.rows();
            if rows.iter().filter(|r| r.source == source).count() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} tunnels for {source} in time"));
}

/// `sessions` agent sessions to `url`, each `initialize` and one `tools/call`.
async fn sessions(url: &str, key: &str, sessions: usize) {
    for i in 0..sessions {
        let mut agent = Agent::new(url, key);
        let answer = agent.initialize().await;
        assert_eq!(answer.status, 200, "session {i}: {answer:?}");
        let answer = agent
            .call_tool(1, "anything", serde_json::json!({"secret": "team-1 data"}))
            .await;
        assert_eq!(answer.status, 200, "session {i}: {answer:?}");
    }
}

/// The `[[tenants]]` head of tenant acme with one agent key, then `tokens` (TOML lines).
fn acme(api_key: &str, tokens: &str) -> String {
    format!(
        r#"
[[tenants]]
name = "acme"
{tokens}

[[tenants.keys]]
subject = "agent@acme.example"
key = "{}"
"#,
        SecretHash::of(api_key)
    )
}

/// The `tunnel_tokens` line of a tenant: `tokens`, hashed, each serving any source.
fn unbound(tokens: &[&str]) -> String {
    let hashes: Vec<String> = tokens
        .iter()
        .map(|t| SecretHash::of(t).to_string())
        .collect();
    format!("tunnel_tokens = {hashes:?}")
}

fn bound(token: &str, sources: &[&str]) -> String {
    format!(
        "\n[[tenants.tunnels]]\ntoken = \"{}\"\nsources = {sources:?}\n",
        SecretHash::of(token)
    )
}

/// Serves a relay with tenant acme (agent key `key`, then `tokens`: see [`acme`]) until
/// `shutdown`, and starts two recording upstreams; returns the relay, its directory (with dev
/// certificates), their CA and the upstreams.
async fn relay_with_two_upstreams(
    key: &str,
    tokens: &str,
    shutdown: &CancellationToken,
) -> (
    FileRelay,
    tempfile::TempDir,
    String,
    [(String, common::Seen); 2],
) {
    let (dir, certs) = cert_dir();
    let path = write_config(dir.path(), &format!("{LISTENERS}{}", acme(key, tokens)));
    let (relay, _) = FileRelay::serve(&path, shutdown).await;
    let upstreams = [
        start_recording_upstream(shutdown).await,
        start_recording_upstream(shutdown).await,
    ];
    (relay, dir, certs.ca_pem, upstreams)
}

/// Item 11: with two unbound tokens of one tenant, a second `connect` announcing a source the
/// first serves took every new session (the newest tunnel won). Now the serving token keeps
/// them; the second tunnel is a standby, flagged in the tunnel rows.
#[tokio::test]
async fn a_second_token_announcing_a_served_source_takes_none_of_its_sessions() {
    let shutdown = CancellationToken::new();
    let (team1, team2, key) = (
        new_secret("mcpt_tok_"),
        new_secret("mcpt_tok_"),
        new_secret("mcpt_key_"),
    );
    let tokens = unbound(&[&team1, &team2]);
    let (relay, _dir, ca, [(upstream1, seen1), (upstream2, seen2)]) =
        relay_with_two_upstreams(&key, &tokens, &shutdown).await;

    let first = serve_db(&relay, (&team1, &ca), &upstream1, 1, &shutdown).await;
    let second = serve_db(&relay, (&team2, &ca), &upstream2, 2, &shutdown).await;

    sessions(&format!("http://{}/mcp/db", relay.agents), &key, 4).await;
    assert_eq!(tool_calls(&seen1), 4, "the first token keeps serving db");
    assert_eq!(tool_calls(&seen2), 0, "the second token's tunnel gets none");
    let rows = relay.state.registry.rows();
    let serving: Vec<(String, bool)> = rows.iter().map(|r| (r.token.clone(), r.serving)).collect();
    assert_eq!(
        serving,
        vec![
            (SecretHash::of(&team1).short(), true),
            (SecretHash::of(&team2).short(), false)
        ]
    );

    // The standby serves once every tunnel of the serving token is gone.
    first.abort();
    let _ = first.await;
    tokio::time::timeout(WAIT, async {
        while relay.state.registry.rows().len() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first tunnel goes");
    sessions(&format!("http://{}/mcp/db", relay.agents), &key, 1).await;
    assert_eq!(tool_calls(&seen2), 1, "the standby took over");
    shutdown.cancel();
    let _ = second.await;
}

/// Item 11: a token bound to sources is refused at the handshake when it announces another
/// source, with a reason naming both; a bound token takes a source from an unbound one.
#[tokio::test]
async fn a_token_bound_to_sources_serves_only_those() {
    let shutdown = CancellationToken::new();
    let (db, files, legacy, key) = (
        new_secret("mcpt_tok_"),
        new_secret("mcpt_tok_"),
        new_secret("mcpt_tok_"),
        new_secret("mcpt_key_"),
    );
    let tokens = format!(
        "{}\n{}{}",
        unbound(&[&legacy]),
        bound(&db, &["db"]),
        bound(&files, &["files", "docs"])
    );
    let (relay, _dir, ca, [(upstream1, seen1), (upstream2, seen2)]) =
        relay_with_two_upstreams(&key, &tokens, &shutdown).await;

    let refused = tokio::time::timeout(
        WAIT,
        client::run(
            quic_settings(
                relay.tunnel,
                &files,
                &ca,
                &[("files", &upstream2), ("db", &upstream2)],
            ),
            shutdown.child_token(),
        ),
    )
    .await
    .expect("refused in time");
    let Err(ClientError::Refused(reason)) = refused else {
        panic!("a token bound to files and docs announcing db is refused: {refused:?}");
    };
    assert!(
        reason.contains("bound to sources [files, docs]") && reason.contains("may not serve [db]"),
        "{reason}"
    );
    assert!(relay.state.registry.rows().is_empty(), "nothing registered");

    // An unbound token serves db first; the token bound to db takes it over.
    let _unbound = serve_db(&relay, (&legacy, &ca), &upstream2, 1, &shutdown).await;
    let _bound = serve_db(&relay, (&db, &ca), &upstream1, 2, &shutdown).await;
    sessions(&format!("http://{}/mcp/db", relay.agents), &key, 2).await;
    assert_eq!(tool_calls(&seen1), 2, "the token bound to db serves it");
    assert_eq!(
        tool_calls(&seen2),
        0,
        "the unbound token's tunnel is a standby"
    );
    shutdown.cancel();
}

/// Item 11: `token new` prints the bound form by default, and it loads.
#[tokio::test]
async fn token_new_prints_a_stanza_bound_to_its_sources() {
    let output = common::run_cli(&[
        "token", "new", "--tenant", "acme", "--source", "db", "--source", "files",
    ])
    .await;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(text.contains("[[tenants.tunnels]]"), "{text}");
    assert!(text.contains("sources = [\"db\", \"files\"]"), "{text}");
    let stanza: String = text
        .lines()
        .skip_while(|l| !l.starts_with("[[tenants.tunnels]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (dir, _certs) = cert_dir();
    let path = write_config(
        dir.path(),
        &format!("{LISTENERS}\n[[tenants]]\nname = \"acme\"\n{stanza}"),
    );
    let config = mcp_tunnel::relay::load_config(&path).expect("the stanza loads");
    assert!(
        mcp_tunnel::relay::trust_warnings(&config).is_empty(),
        "bound: no warning"
    );

    let output = common::run_cli(&["token", "new", "--tenant", "acme", "--any-source"]).await;
    let text = String::from_utf8(output.stdout).expect("utf-8");
    assert!(text.contains("tunnel_tokens = [\"sha256:"), "{text}");
}

/// A relay with tenant acme (one unbound token `token`, agent key `key`) from a config file.
async fn acme_relay(
    shutdown: &CancellationToken,
    token: &str,
    key: &str,
) -> (tempfile::TempDir, mcp_tunnel::certs::DevCerts, FileRelay) {
    let (dir, certs) = cert_dir();
    let tokens = unbound(&[token]);
    let path = write_config(dir.path(), &format!("{LISTENERS}{}", acme(key, &tokens)));
    let (relay, _) = FileRelay::serve(&path, shutdown).await;
    (dir, certs, relay)
}

/// Item 12: an upstream that redirects with 307 to another origin got the agent's request,
/// body and all, at that origin. Now `connect` refuses it (the agent gets an error naming the
/// redirect) unless the source sets `follow_cross_origin_redirects`.
#[tokio::test]
async fn cross_origin_redirects_are_refused_unless_the_source_allows_them() {
    let shutdown = CancellationToken::new();
    let (token, key) = (new_secret("mcpt_tok_"), new_secret("mcpt_key_"));
    let (_dir, certs, relay) = acme_relay(&shutdown, &token, &key).await;
    let (elsewhere, seen) = start_recording_upstream(&shutdown).await;
    let redirect = axum::Router::new().route(
        "/mcp",
        axum::routing::any(move || {
            let to = elsewhere.clone();
            async move {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [("location", to)],
                )
            }
        }),
    );
    let redirecting = format!(
        "http://{}/mcp",
        common::serve_axum(redirect, &shutdown).await
    );

    let mut settings = quic_settings(
        relay.tunnel,
        &token,
        &certs.ca_pem,
        &[("strict", &redirecting), ("lenient", &redirecting)],
    );
    settings.sources[1].follow_cross_origin_redirects = true;
    let client = tokio::spawn(client::run(settings, shutdown.child_token()));
    wait_rows(&relay.state, "lenient", 1).await;

    let mut agent = Agent::new(&format!("http://{}/mcp/strict", relay.agents), &key);
    let answer = agent.initialize().await;
    let error = answer.error_message();
    assert!(
        error.contains("another origin") && error.contains("follow_cross_origin_redirects"),
        "{answer:?}"
    );
    assert!(
        seen.lock().expect("lock").is_empty(),
        "nothing reached the other origin"
    );

    let mut agent = Agent::new(&format!("http://{}/mcp/lenient", relay.agents), &key);
    let answer = agent.initialize().await;
    assert!(answer.response()["result"].is_object(), "{answer:?}");
    assert_eq!(seen.lock().expect("lock").len(), 1, "followed when allowed");
    shutdown.cancel();
    let _ = client.await;
}

/// A relay config with tenants acme and globex (no tunnels) trusting `ISSUER`, whose JWKS (one
/// Ed25519 key) it writes beside; `provider_extra` goes into the provider's table. Returns the
/// directory, the config path and the key signing the provider's tokens.
fn provider_config(
    provider_extra: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    jsonwebtoken::EncodingKey,
) {
    use base64::Engine as _;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    let jwk = serde_json::json!({"kty":"OKP","crv":"Ed25519","kid":"ed","alg":"EdDSA","use":"sig",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw())});
    let (dir, _certs) = cert_dir();
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::json!({"keys": [jwk]}).to_string(),
    )
    .expect("write JWKS");
    let config = common::provider_config(
        PUBLIC_URL,
        "[[tenants]]\nname = \"acme\"\n[[tenants]]\nname = \"globex\"",
        r#"jwks_file = "jwks.json""#,
        provider_extra,
    );
    let path = write_config(dir.path(), &config);
    (
        dir,
        path,
        jsonwebtoken::EncodingKey::from_ed_der(&pair.serialize_der()),
    )
}

fn token_for(key: &jsonwebtoken::EncodingKey, tenant: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("ed".into());
    let claims = serde_json::json!({"iss": ISSUER, "aud": PUBLIC_URL, "sub": "mallory",
        "tenant": tenant, "iat": now, "exp": now + 600});
    jsonwebtoken::encode(&header, &claims, key).expect("token signs")
}

/// Item 14: an identity provider with `tenant_claim` minted identities for every tenant of the
/// relay. With `tenants = [...]` its tokens naming another tenant are refused (401).
#[tokio::test]
async fn an_identity_provider_speaks_only_for_its_listed_tenants() {
    let shutdown = CancellationToken::new();
    let (_dir, path, key) = provider_config("tenants = [\"acme\"]");
    let (relay, _) = FileRelay::serve(&path, &shutdown).await;
    let url = format!("http://{}/mcp/db", relay.agents);
    // Authenticated: 404 (no such source is connected); refused: 401.
    let acme = Agent::new(&url, &token_for(&key, "acme"))
        .initialize()
        .await;
    assert_eq!(acme.status, 404, "{acme:?}");
    let globex = Agent::new(&url, &token_for(&key, "globex"))
        .initialize()
        .await;
    assert_eq!(globex.status, 401, "{globex:?}");
    shutdown.cancel();
}

/// Item 14: a percent-encoded newline in an unauthenticated request's path forged a line of
/// the relay's log (the source was logged with Display). Now it is quoted on its own line.
#[tokio::test]
async fn a_newline_in_an_unauthenticated_path_forges_no_log_line() {
    let (_dir, path, _key) = provider_config("");
    let mut relay = common::RelayProcess::start(&path).await;
    let url = format!(
        "http://{}/mcp/x%0A2026-12-04T00:00:00.000000Z%20INFO%20forged%3A%20admin%20logged%20in",
        relay.agents
    );
    let answer = Agent::new(&url, "not.a.jwt").initialize().await;
    assert_eq!(answer.status, 401, "{answer:?}");
    let line = relay.wait_for("agent token refused").await;
    assert!(line.contains("\\n"), "the newline is escaped: {line}");
    let output = relay.peer.output();
    assert!(
        !output.lines().any(|l| l.starts_with("2026-12-04T00:00:00")),
        "no forged line: {output}"
    );
    relay.peer.stop().await;
}
