//! Agents authenticated by JWTs of a configured identity provider, with a JWKS made here:
//! valid tokens (ES256 and EdDSA; RS256 against a JWKS URL) work end to end; expired, wrong audience, wrong issuer and bad
//! signature are 401 naming the protected resource metadata; a missing scope is 403
//! `insufficient_scope`; both well-known metadata documents are served; and the upstream never
//! sees the agent's token. The relay is built from a configuration file, as in production.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{
    Agent, FileRelay, ISSUER, PUBLIC_URL, cert_dir, provider_config, tenant_block, tool_text,
    write_config,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mcp_tunnel::govern::identity::new_secret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "mcp:tools";

/// A signing key and its public JWK.
struct SigningKey {
    alg: Algorithm,
    kid: &'static str,
    key: EncodingKey,
    jwk: Value,
}

fn es256(kid: &'static str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let point = pair.public_key_raw();
    assert_eq!(point.len(), 65, "an uncompressed P-256 point");
    SigningKey {
        alg: Algorithm::ES256,
        kid,
        key: EncodingKey::from_ec_der(&pair.serialize_der()),
        jwk: json!({"kty":"EC","crv":"P-256","kid":kid,"alg":"ES256","use":"sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}),
    }
}

fn eddsa(kid: &'static str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    SigningKey {
        alg: Algorithm::EdDSA,
        kid,
        key: EncodingKey::from_ed_der(&pair.serialize_der()),
        jwk: json!({"kty":"OKP","crv":"Ed25519","kid":kid,"alg":"EdDSA","use":"sig",
            "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw())}),
    }
}

/// An RSA key (2048 bits, made here with aws-lc-rs) for RS256.
fn rs256(kid: &'static str) -> SigningKey {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let pair =
        aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA key");
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).expect("PKCS#8");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    );
    let public = pair.public_key();
    SigningKey {
        alg: Algorithm::RS256,
        kid,
        key: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("PEM of the RSA key"),
        jwk: json!({"kty":"RSA","kid":kid,"alg":"RS256","use":"sig",
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero())}),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Claims of a good token; the cases spoil one field at a time.
fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": PUBLIC_URL,
        "sub": "carol@acme.example",
        "tenant": "acme",
        "roles": ["analyst"],
        "scope": format!("openid {SCOPE}"),
        "iat": now(),
        "exp": now() + 600,
    })
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key.key).expect("token signs")
}

fn www_authenticate(answer: &common::Answer) -> &str {
    answer
        .headers
        .get("www-authenticate")
        .unwrap_or_else(|| panic!("a WWW-Authenticate header: {answer:?}"))
        .to_str()
        .expect("ascii header")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_agents_are_verified_and_refusals_name_the_metadata() {
    let (shutdown, _stop) = common::stop_on_drop();
    let demo = common::demo_upstream(&shutdown).await;
    let (recording, seen) = common::start_recording_upstream(&shutdown).await;

    // The identity provider's keys; `stranger` is not in its JWKS.
    let (ec, ed, stranger) = (es256("ec-1"), eddsa("ed-1"), es256("ec-1"));
    let (dir, certs) = cert_dir();
    std::fs::write(
        dir.path().join("jwks.json"),
        json!({"keys": [ec.jwk, ed.jwk]}).to_string(),
    )
    .expect("write JWKS");
    let (token, api_key) = (new_secret("mcpt_tok_"), new_secret("mcpt_key_"));
    let config = jwt_config(&token, &api_key);
    let path = write_config(dir.path(), &config);
    let (relay, _) = FileRelay::serve(&path, &shutdown).await;
    let sources = [("demo", demo.as_str()), ("recording", recording.as_str())];
    relay
        .connect(&token, &certs.ca_pem, &sources, shutdown.clone())
        .await;
    let agents = relay.agents;
    let url = format!("http://{agents}/mcp/demo");
    let metadata = format!("{PUBLIC_URL}/.well-known/oauth-protected-resource/mcp/demo");

    valid_tokens_and_api_keys_work(&url, &[&ec, &ed], &api_key).await;
    bad_tokens_are_refused_naming_the_metadata(&url, &metadata, (&ec, &ed, &stranger)).await;
    metadata_is_served(agents).await;
    the_upstream_never_sees_the_token(agents, &ec, &seen).await;
}

/// The relay config of these tests: acme with an API key of bob and role `analyst`, and an
/// identity provider with the JWKS in `jwks.json`.
fn jwt_config(token: &str, api_key: &str) -> String {
    let tenant = tenant_block(
        token,
        "",
        &[("bob", api_key, &["analyst"])],
        &[("analyst", &["demo/echo", "recording/*"])],
    );
    provider_config(
        &format!("{PUBLIC_URL}/"),
        &tenant,
        r#"jwks_file = "jwks.json""#,
        &format!(
            "algorithms = [\"ES256\", \"EdDSA\"]\nroles_claim = \"roles\"\n\
             required_scopes = [\"{SCOPE}\"]"
        ),
    )
}

/// Valid tokens signed by each of `keys`: initialize, then the echo tool through the tunnel;
/// the roles claim holds; API keys still work, and are tried first.
async fn valid_tokens_and_api_keys_work(url: &str, keys: &[&SigningKey], api_key: &str) {
    for key in keys {
        let mut agent = Agent::new(url, &sign(key, &claims()));
        let init = agent.initialize().await;
        assert_eq!(
            init.status, 200,
            "{:?} token initializes: {init:?}",
            key.alg
        );
        let echoed = agent.call_tool(1, "echo", json!({"message": "hi"})).await;
        assert_eq!(tool_text(echoed.response()), "hi", "{:?}", key.alg);
        // The roles claim is the caller's roles: the analyst may not call `add`.
        let denied = agent.call_tool(2, "add", json!({"a": 1, "b": 2})).await;
        assert_eq!(denied.response()["error"]["message"], "Unknown tool: add");
    }
    // API keys still work, and are tried first.
    let mut bob = Agent::new(url, api_key);
    assert_eq!(bob.initialize().await.status, 200, "an API key still works");
}

/// No credential, each bad token and a missing scope: refusals naming the metadata.
async fn bad_tokens_are_refused_naming_the_metadata(
    url: &str,
    metadata: &str,
    (ec, ed, stranger): (&SigningKey, &SigningKey, &SigningKey),
) {
    // No credential: 401 naming the metadata and the scope, no error code (RFC 6750 3.1).
    let mut anonymous = Agent::new(url, "");
    anonymous.key = None;
    let refused = anonymous.initialize().await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        www_authenticate(&refused),
        format!(r#"Bearer scope="{SCOPE}", resource_metadata="{metadata}""#)
    );

    // Each bad token: 401, `invalid_token`, the metadata URL.
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    expired["iat"] = json!(now() - 7200);
    let mut wrong_audience = claims();
    wrong_audience["aud"] = json!("https://someone-else.example");
    let mut wrong_issuer = claims();
    wrong_issuer["iss"] = json!("https://evil.example");
    let cases = [
        ("expired", sign(ec, &expired), "token expired"),
        (
            "wrong audience",
            sign(ed, &wrong_audience),
            "wrong audience",
        ),
        ("wrong issuer", sign(ec, &wrong_issuer), "wrong issuer"),
        ("bad signature", sign(stranger, &claims()), "bad signature"),
        ("not a token", "a.b.c".to_owned(), "malformed token"),
    ];
    for (case, token, reason) in cases {
        let answer = Agent::new(url, &token).initialize().await;
        assert_eq!(answer.status, 401, "{case}: {answer:?}");
        assert_eq!(
            www_authenticate(&answer),
            format!(
                r#"Bearer error="invalid_token", scope="{SCOPE}", resource_metadata="{metadata}""#
            ),
            "{case}"
        );
        let message = answer.response()["error"]["message"]
            .as_str()
            .expect("an error message");
        assert!(message.ends_with(reason), "{case}: {message}");
    }

    // A valid token without the required scope: 403 `insufficient_scope`.
    let mut unscoped = claims();
    unscoped["scope"] = json!("openid");
    let answer = Agent::new(url, &sign(ec, &unscoped)).initialize().await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(
        www_authenticate(&answer),
        format!(
            r#"Bearer error="insufficient_scope", scope="{SCOPE}", resource_metadata="{metadata}""#
        )
    );
}

/// The HTTP+SSE endpoint names its own resource; both well-known documents (RFC 9728) are
/// served without credentials.
async fn metadata_is_served(agents: std::net::SocketAddr) {
    let sse = common::get(&format!("http://{agents}/sse/demo")).await;
    assert_eq!(sse.status(), 401);
    assert_eq!(
        sse.headers()["www-authenticate"],
        format!(
            r#"Bearer scope="{SCOPE}", resource_metadata="{PUBLIC_URL}/.well-known/oauth-protected-resource/sse/demo""#
        )
        .as_str()
    );

    // Both well-known documents (RFC 9728), served without credentials.
    for (path, resource) in [
        (
            "/.well-known/oauth-protected-resource/mcp/demo",
            format!("{PUBLIC_URL}/mcp/demo"),
        ),
        (
            "/.well-known/oauth-protected-resource",
            PUBLIC_URL.to_owned(),
        ),
    ] {
        let response = common::get(&format!("http://{agents}{path}")).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let document: Value = response.json().await.expect("JSON metadata");
        assert_eq!(
            document,
            json!({
                "resource": resource,
                "authorization_servers": [ISSUER],
                "scopes_supported": [SCOPE],
                "bearer_methods_supported": ["header"],
            }),
            "{path}"
        );
    }
}

/// The upstream sees the calls, never the agent's token.
async fn the_upstream_never_sees_the_token(
    agents: std::net::SocketAddr,
    ec: &SigningKey,
    seen: &common::Seen,
) {
    let jwt = sign(ec, &claims());
    let mut agent = Agent::new(&format!("http://{agents}/mcp/recording"), &jwt);
    assert_eq!(agent.initialize().await.status, 200);
    let called = agent.call_tool(3, "anything", json!({})).await;
    assert_eq!(tool_text(called.response()), "recorded");
    let seen = seen.lock().expect("lock");
    assert!(seen.len() >= 3, "initialize, initialized, tools/call");
    let signature = jwt.split('.').nth(2).expect("3 parts");
    for (method, headers, _) in seen.iter() {
        common::assert_no_credentials(headers, &[&jwt, signature], method);
    }
}

/// An identity provider's JWKS endpoint: serves `document`, or 503 while it is `None`, and
/// counts the requests.
#[derive(Default)]
struct JwksEndpoint {
    document: Mutex<Option<Value>>,
    fetches: std::sync::atomic::AtomicUsize,
}

impl JwksEndpoint {
    fn serve(&self, keys: &[&SigningKey]) {
        let keys: Vec<&Value> = keys.iter().map(|k| &k.jwk).collect();
        *self.document.lock().expect("lock") = Some(json!({ "keys": keys }));
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn start_jwks_endpoint(shutdown: &CancellationToken) -> (String, Arc<JwksEndpoint>) {
    let endpoint = Arc::new(JwksEndpoint::default());
    let state = endpoint.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                state
                    .fetches
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match state.document.lock().expect("lock").clone() {
                    Some(document) => {
                        ([("content-type", "application/json")], document.to_string())
                            .into_response()
                    }
                    None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }
        }),
    );
    let addr = common::serve_axum(app, shutdown).await;
    (format!("http://{addr}/jwks"), endpoint)
}

/// A relay (no tunnel) trusting `ISSUER` with its JWKS at `jwks_url`; returns the agent URL of
/// source `demo` and the directory holding the files. An authenticated caller gets 404 there
/// (no such source is connected), a refused one 401.
async fn relay_with_jwks_url(
    jwks_url: &str,
    shutdown: &CancellationToken,
) -> (String, tempfile::TempDir) {
    let (dir, _certs) = cert_dir();
    let config = provider_config(
        PUBLIC_URL,
        "[[tenants]]\nname = \"acme\"",
        &format!("jwks_url = \"{jwks_url}\""),
        "jwks_refresh_secs = 3600",
    );
    let path = write_config(dir.path(), &config);
    // The relay starts whatever the JWKS URL answers.
    let (relay, _) = FileRelay::serve(&path, shutdown).await;
    let agents = relay.agents;
    (format!("http://{agents}/mcp/demo"), dir)
}

/// The status of an `initialize` with `token`, and the error message if any.
async fn try_token(url: &str, token: &str) -> (u16, String) {
    let answer = Agent::new(url, token).initialize().await;
    let message = answer
        .messages
        .last()
        .and_then(|m| m["error"]["message"].as_str())
        .unwrap_or_default()
        .to_owned();
    (answer.status, message)
}

/// Asserts `token` is refused at `url` with a 401 whose message ends in `why`.
async fn assert_refused(url: &str, token: &str, why: &str) {
    let (status, message) = try_token(url, token).await;
    assert_eq!(status, 401, "{message}");
    assert!(message.ends_with(why), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_cached_refreshed_on_a_new_key_id_and_never_hammered() {
    let (shutdown, _stop) = common::stop_on_drop();
    let (jwks_url, endpoint) = start_jwks_endpoint(&shutdown).await;
    let (old, new) = (es256("old"), eddsa("new"));

    // The identity provider is down: the relay starts, and refuses tokens saying why.
    let (url, _dir) = relay_with_jwks_url(&jwks_url, &shutdown).await;
    let (status, message) = try_token(&url, &sign(&old, &claims())).await;
    assert_eq!(status, 401, "{message}");
    assert!(message.contains("keys unavailable"), "{message}");
    assert!(endpoint.fetches() >= 1, "the relay tried to fetch");

    // It comes up: the next token with a key id the relay lacks fetches the JWKS again.
    endpoint.serve(&[&old]);
    assert_eq!(try_token(&url, &sign(&old, &claims())).await.0, 404);
    // Cached: more tokens of a known key fetch nothing.
    let fetched = endpoint.fetches();
    for _ in 0..5 {
        assert_eq!(try_token(&url, &sign(&old, &claims())).await.0, 404);
    }
    assert_eq!(
        endpoint.fetches(),
        fetched,
        "known keys come from the cache"
    );

    // Rotation: the provider publishes a new key and drops the old one.
    endpoint.serve(&[&new]);
    assert_eq!(
        try_token(&url, &sign(&new, &claims())).await.0,
        404,
        "a token of the new key is accepted"
    );
    // The dropped key is refused.
    assert_refused(&url, &sign(&old, &claims()), "unknown key id").await;

    // Tokens naming made-up key ids: the on-demand refreshes are rate limited (a burst of 3,
    // spent above, then 2 a minute), so ten of them fetch at most a couple of times.
    let before = endpoint.fetches();
    for n in 0..10 {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(format!("made-up-{n}"));
        let token = jsonwebtoken::encode(&header, &claims(), &old.key).expect("token signs");
        assert_eq!(try_token(&url, &token).await.0, 401);
    }
    let extra = endpoint.fetches() - before;
    assert!(extra <= 2, "{extra} fetches for 10 unknown key ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_verify_with_the_jwks_and_a_bad_signature_is_refused() {
    let (shutdown, _stop) = common::stop_on_drop();
    let (jwks_url, endpoint) = start_jwks_endpoint(&shutdown).await;
    // `impostor` claims the published key id but holds another key.
    let (rsa, impostor) = (rs256("rsa-1"), rs256("rsa-1"));
    endpoint.serve(&[&rsa]);
    let (url, _dir) = relay_with_jwks_url(&jwks_url, &shutdown).await;

    let (status, message) = try_token(&url, &sign(&rsa, &claims())).await;
    assert_eq!(status, 404, "a valid RS256 token authenticates: {message}");
    assert_refused(&url, &sign(&impostor, &claims()), "bad signature").await;
    // The valid token with one signature byte changed.
    let token = sign(&rsa, &claims());
    let (head, signature) = token.rsplit_once('.').expect("three parts");
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
    bytes[0] ^= 1;
    let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode(bytes));
    assert_refused(&url, &tampered, "bad signature").await;
}
