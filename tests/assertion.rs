//! Identity to the upstream: with `[identity_assertion]` and a tenant's `assert_identity`, the
//! upstream of an enabled source gets a relay-signed JWT naming the caller, verifies it with the
//! relay's public key, and never sees the agent's credential; a source without it gets no such
//! header; enabling a source by hot reload applies to new streams; a session that outlives its
//! assertion's lifetime keeps reaching the upstream with an unexpired one (the relay renews
//! it). The relay is built from a configuration file, as in production.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Agent, FileRelay, LISTENERS, cert_dir, tenant_block, tool_text, write_config};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mcp_tunnel::certs::DevCerts;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::relay::reload::{LoadedConfig, Reloader};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PUBLIC_URL: &str = "https://relay.example.test";
const HEADER: &str = "x-mcp-tunnel-identity";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A temporary directory with dev certificates and a fresh Ed25519 assertion signing key
/// (`assertion.key`); returns it, the certificates and the public key that verifies
/// assertions.
fn relay_dir() -> (tempfile::TempDir, DevCerts, DecodingKey) {
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    let public = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(signing.public_key_raw()))
        .expect("public key");
    let (dir, certs) = cert_dir();
    std::fs::write(dir.path().join("assertion.key"), signing.serialize_pem()).expect("write key");
    (dir, certs, public)
}

fn config(token: &str, key: &str, asserted: &str) -> String {
    config_with_ttl(token, key, asserted, 120)
}

fn config_with_ttl(token: &str, key: &str, asserted: &str, ttl_secs: u64) -> String {
    let tenant = tenant_block(
        token,
        &format!("assert_identity = [{asserted}]\n"),
        &[("bob@acme.example", key, &["analyst"])],
        &[("analyst", &["*"])],
    );
    format!(
        r#"{LISTENERS}public_url = "{PUBLIC_URL}/"
[identity_assertion]
key = "assertion.key"
ttl_secs = {ttl_secs}
{tenant}"#
    )
}

/// Initializes a session with `source` as bob and calls a tool through the tunnel.
async fn call(agents: std::net::SocketAddr, source: &str, api_key: &str) {
    let mut agent = Agent::new(&format!("http://{agents}/mcp/{source}"), api_key);
    assert_eq!(agent.initialize().await.status, 200, "{source} initializes");
    let called = agent.call_tool(1, "anything", json!({})).await;
    assert_eq!(tool_text(called.response()), "recorded", "{source}");
}

/// Checks every request `seen` got: the assertion verifies (when `asserted`) and names bob,
/// and the agent's key appears nowhere.
fn check(seen: &common::Seen, source: &str, asserted: bool, public: &DecodingKey, api_key: &str) {
    let seen = seen.lock().expect("lock");
    assert!(
        seen.iter().any(|(method, _, _)| method == "tools/call"),
        "{source}: the call reached the upstream"
    );
    for (method, headers, _) in seen.iter() {
        common::assert_no_credentials(headers, &[api_key], &format!("{source} {method}"));
        let Some(token) = headers.get(HEADER) else {
            assert!(!asserted, "{source} {method}: no assertion");
            continue;
        };
        assert!(
            asserted,
            "{source} {method}: an assertion it did not ask for"
        );
        let token = token.to_str().expect("ascii");
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[PUBLIC_URL]);
        validation.set_audience(&[format!("acme/{source}")]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(token, public, &validation)
            .unwrap_or_else(|e| panic!("{source} {method}: the assertion verifies: {e}"))
            .claims;
        assert_eq!(claims["sub"], "bob@acme.example");
        assert_eq!(claims["tenant"], "acme");
        assert_eq!(claims["source"], source);
        assert_eq!(claims["roles"], json!(["analyst"]));
        let exp = claims["exp"].as_u64().expect("exp");
        assert!(exp > now() && exp <= now() + 120, "short-lived: {exp}");
        assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_verifies_the_relays_assertion_and_never_sees_the_agents_key() {
    let (shutdown, _stop) = common::stop_on_drop();
    let (db_url, db_seen) = common::start_recording_upstream(&shutdown).await;
    let (crm_url, crm_seen) = common::start_recording_upstream(&shutdown).await;

    let (dir, certs, public) = relay_dir();
    let (token, api_key) = (new_secret("mcpt_tok_"), new_secret("mcpt_key_"));
    let path = write_config(dir.path(), &config(&token, &api_key, r#""db""#));
    let (relay, loaded) = FileRelay::serve(&path, &shutdown).await;
    let sources = [("db", db_url.as_str()), ("crm", crm_url.as_str())];
    relay
        .connect(&token, &certs.ca_pem, &sources, shutdown.clone())
        .await;
    let (agents, state) = (relay.agents, relay.state);
    let mut reloader = Reloader::new(&path, state.clone(), loaded);

    // `db` asks for assertions, `crm` does not.
    call(agents, "db", &api_key).await;
    call(agents, "crm", &api_key).await;
    check(&db_seen, "db", true, &public, &api_key);
    check(&crm_seen, "crm", false, &public, &api_key);

    // Enabled for `crm` by hot reload: new sessions get assertions, no restart.
    std::fs::write(&path, config(&token, &api_key, r#""db", "crm""#)).expect("rewrite config");
    reloader.reload().await.expect("the file reloads");
    crm_seen.lock().expect("lock").clear();
    call(agents, "crm", &api_key).await;
    check(&crm_seen, "crm", true, &public, &api_key);
}

/// A relay asserting bob's identity to `db` with a lifetime of `ttl_secs` (config `text`, at
/// `path` in `dir`; `public` verifies its assertions), and a `connect` serving a recording
/// upstream (`seen`) as `db`; bob's `agent` has a session open on `db`.
struct DbRelay {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    text: String,
    relay: FileRelay,
    loaded: LoadedConfig,
    public: DecodingKey,
    seen: common::Seen,
    agent: Agent,
}

/// Starts a [`DbRelay`] served until `shutdown`.
async fn db_relay(ttl_secs: u64, shutdown: &CancellationToken) -> DbRelay {
    let (db_url, seen) = common::start_recording_upstream(shutdown).await;
    let (dir, certs, public) = relay_dir();
    let (token, api_key) = (new_secret("mcpt_tok_"), new_secret("mcpt_key_"));
    let text = config_with_ttl(&token, &api_key, r#""db""#, ttl_secs);
    let path = write_config(dir.path(), &text);
    let (relay, loaded) = FileRelay::serve(&path, shutdown).await;
    relay
        .connect(&token, &certs.ca_pem, &[("db", &db_url)], shutdown.clone())
        .await;
    let mut agent = Agent::new(&format!("http://{}/mcp/db", relay.agents), &api_key);
    assert_eq!(agent.initialize().await.status, 200);
    DbRelay {
        dir,
        path,
        text,
        relay,
        loaded,
        public,
        seen,
        agent,
    }
}

/// The `exp` and `jti` of the assertion on the last request `seen` got.
fn last_assertion(seen: &common::Seen) -> (u64, String) {
    let seen = seen.lock().expect("lock");
    let (_, headers, _) = seen.last().expect("a request reached the upstream");
    let token = headers
        .get(HEADER)
        .expect("an assertion")
        .to_str()
        .expect("ascii");
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token).expect("JWT claims");
    (
        claims["exp"].as_u64().expect("exp"),
        claims["jti"].as_str().expect("jti").to_owned(),
    )
}

/// Waits until the wall clock reaches `exp` (seconds since the epoch), at most `exp`'s distance
/// plus a second. This test is about expiry, so it must let an assertion expire: the wait is
/// bounded by the short lifetime configured, and nothing is decided by how fast the machine is.
async fn wait_until(exp: u64) {
    let target = UNIX_EPOCH + Duration::from_secs(exp);
    let wait = target.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(wait <= Duration::from_secs(10), "exp {exp} is near");
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    assert!(SystemTime::now() >= target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outliving_its_assertion_reaches_the_upstream_with_a_fresh_one_every_time() {
    let (shutdown, _stop) = common::stop_on_drop();
    // Three seconds: an assertion is valid for 2 to 3 s from signing (exp is in whole
    // seconds), so a renewed one has at least a second left when forwarded.
    let DbRelay {
        dir: _dir,
        relay,
        public,
        seen,
        agent,
        ..
    } = db_relay(3, &shutdown).await;
    let state = relay.state;
    let session = agent.session.clone();
    let mut jtis = Vec::new();
    for id in 1..=3 {
        let called = agent.call_tool(id, "anything", json!({})).await;
        assert_eq!(tool_text(called.response()), "recorded", "call {id}");
        let (exp, jti) = last_assertion(&seen);
        jtis.push(jti);
        // Outlive the assertion the upstream just got before the next call.
        wait_until(exp).await;
    }
    assert_eq!(agent.session, session, "one session throughout");
    assert_eq!(state.sessions.len(), 1);
    jtis.dedup();
    assert_eq!(
        jtis.len(),
        3,
        "each call after an expiry carried a renewed assertion"
    );

    // Every request the upstream got carried an assertion that verifies and had not expired
    // when it arrived.
    let seen = seen.lock().expect("lock");
    assert!(seen.len() >= 5, "initialize, initialized and three calls");
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[PUBLIC_URL]);
    validation.set_audience(&["acme/db"]);
    validation.validate_exp = false;
    for (method, headers, received) in seen.iter() {
        let token = headers
            .get(HEADER)
            .unwrap_or_else(|| panic!("{method}: an assertion"))
            .to_str()
            .expect("ascii");
        let claims = jsonwebtoken::decode::<Value>(token, &public, &validation)
            .unwrap_or_else(|e| panic!("{method}: the assertion verifies: {e}"))
            .claims;
        let exp = UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64().expect("exp"));
        assert!(
            *received < exp,
            "{method}: the assertion had expired when the upstream got it ({:?} late)",
            received.duration_since(exp).unwrap_or_default()
        );
        assert_eq!(claims["sub"], "bob@acme.example");
    }
}

/// Item 13: a reload that rotates the signing key and changes the caller's roles reaches a live
/// session at its next request: the assertion it carries is signed with the new key, names the
/// new roles, and its audience is `TENANT/SOURCE` (unambiguous across tenants).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotating_the_key_and_roles_applies_to_the_next_request_of_a_live_session() {
    let (shutdown, _stop) = common::stop_on_drop();
    // A long lifetime: nothing here renews by age.
    let DbRelay {
        dir,
        path,
        text,
        relay,
        loaded,
        public: old_public,
        seen,
        agent,
    } = db_relay(3600, &shutdown).await;
    let mut reloader = Reloader::new(&path, relay.state.clone(), loaded);
    let called = agent.call_tool(1, "anything", json!({})).await;
    assert_eq!(tool_text(called.response()), "recorded");
    let claims_of = |public: &DecodingKey| {
        let seen = seen.lock().expect("lock");
        let (_, headers, _) = seen.last().expect("a request");
        let token = headers[HEADER].to_str().expect("ascii").to_owned();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[PUBLIC_URL]);
        validation.set_audience(&["acme/db"]);
        jsonwebtoken::decode::<Value>(&token, public, &validation).map(|d| d.claims)
    };
    let before = claims_of(&old_public).expect("signed with the first key");
    assert_eq!(before["aud"], "acme/db");
    assert_eq!(before["roles"], json!(["analyst"]));

    // Rotate the key and give bob another role; the session stays open.
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    let new_public =
        DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(signing.public_key_raw()))
            .expect("public key");
    std::fs::write(dir.path().join("assertion.key"), signing.serialize_pem()).expect("write key");
    let text = text.replace("roles = [\"analyst\"]", "roles = [\"analyst\", \"oncall\"]")
        + "[[tenants.roles]]\nname = \"oncall\"\nallow = [\"*\"]\n";
    std::fs::write(&path, text).expect("rewrite the config");
    reloader.reload().await.expect("the file reloads");

    let called = agent.call_tool(2, "anything", json!({})).await;
    assert_eq!(tool_text(called.response()), "recorded");
    let after = claims_of(&new_public).expect("the next request: signed with the rotated key");
    assert!(claims_of(&old_public).is_err(), "not with the old key");
    assert_eq!(after["roles"], json!(["analyst", "oncall"]));
    assert_eq!(after["aud"], "acme/db");
    assert_eq!(relay.state.sessions.len(), 1, "the same session");
}

/// A configured assertion header with a multi-byte character across byte 2 is a configuration
/// error; the header check sliced the name there and the relay panicked while loading its
/// configuration (found by the fuzz/ `handshake` target, through connect's use of that check).
#[test]
fn a_non_ascii_assertion_header_is_a_configuration_error() {
    let (dir, _certs, _public) = relay_dir();
    let text = config("t", "k", r#""db""#).replace(
        "ttl_secs = 120",
        "ttl_secs = 120\nheader = \"x\u{e9}-identity\"",
    );
    let path = write_config(dir.path(), &text);
    let err = mcp_tunnel::relay::load_config(&path).expect_err("a bad header");
    assert!(err.to_string().contains("header"), "{err}");
}
