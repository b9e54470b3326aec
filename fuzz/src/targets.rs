//! The fuzz targets. Each is `fn(&[u8])`; a panic is a finding.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use mcp_tunnel::config::{ClientFile, RelayConfig, SourceConfig, validate_source_name};
use mcp_tunnel::govern::Identity;
use mcp_tunnel::govern::assertion::{Assertion, header_name_allowed};
use mcp_tunnel::govern::condition::{Call, Condition};
use mcp_tunnel::govern::jwt::{
    ClaimMapping, JwtVerifier, Provider, ProviderKeys, TenantSource, key_set, looks_like_jwt,
};
use mcp_tunnel::govern::policy::{Kind, glob_match};
use mcp_tunnel::mcp::jsonrpc::{Classified, MessageKind, classify};
use mcp_tunnel::mcp::scan::MAX_CAPTURE;
use mcp_tunnel::mcp::{ResponseScanner, sse};
use mcp_tunnel::relay::parse_event_id;
use mcp_tunnel::wire::{
    Frame, FrameDecoder, FrameKind, Greeting, Hello, HelloReply, Notice, OpenHeader,
};
use serde_json::Value;
use tokio_util::codec::Decoder;

use crate::{pieces, split_line};

/// A small payload limit, so the decoder's size check is reachable with small inputs.
const FRAME_LIMIT: usize = 4096;

/// Decodes every frame in `chunks` as a `FramedRead` would: all that is buffered after each
/// chunk, then the end of input.
fn decode_all<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Frame>, Option<String>) {
    let mut decoder = FrameDecoder::new(FRAME_LIMIT);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    loop {
        match decoder.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e.to_string())),
        }
    }
}

/// Frame decoder (whole and in pieces must agree; decoded frames re-encode to the bytes they
/// came from) and the open header of every `Open` frame.
pub fn frame(data: &[u8]) {
    let (whole, whole_err) = decode_all([data]);
    let (pieced, pieced_err) = decode_all(pieces(data));
    assert_eq!(whole, pieced, "frames differ when fed in pieces");
    assert_eq!(whole_err, pieced_err, "errors differ when fed in pieces");
    let mut encoded = BytesMut::new();
    for frame in &whole {
        frame.encode(&mut encoded);
    }
    assert_eq!(
        &encoded[..],
        &data[..encoded.len()],
        "frames do not re-encode to their bytes"
    );
    for frame in &whole {
        if let Ok(header) = frame.parse_json::<OpenHeader>(FrameKind::Open) {
            open_header(&header);
        }
        let _ = frame.status();
        let _ = frame.reason();
    }
}

/// What `connect` does with an open header, and its round trip.
fn open_header(header: &OpenHeader) {
    let again: OpenHeader = Frame::json(FrameKind::Open, header)
        .parse_json(FrameKind::Open)
        .expect("an open header re-parses");
    assert_eq!(&again, header);
    for (name, value) in &header.mcp_headers {
        let _ = http::HeaderName::try_from(name.as_str());
        let _ = http::HeaderValue::from_str(value);
    }
    if let Some(assertion) = &header.assertion {
        identity_assertion(assertion);
    }
}

/// What `connect` does with an identity assertion before it puts it on an upstream request.
fn identity_assertion(assertion: &Assertion) {
    if header_name_allowed(&assertion.header) {
        assert!(http::HeaderName::try_from(assertion.header.as_str()).is_ok());
    }
    let _ = http::HeaderValue::from_str(&assertion.token);
}

/// One control-stream (or identity) payload read as each message of the handshake, as the
/// relay and `connect` read them; what parses is checked as they check it and round-tripped.
pub fn handshake(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    let as_kind = |kind| Frame {
        kind,
        exchange: 0,
        payload: payload.clone(),
    };
    let control = as_kind(FrameKind::Control);
    if let Ok(hello) = control.parse_json::<Hello>(FrameKind::Control) {
        for source in &hello.sources {
            let _ = validate_source_name(&source.name);
        }
        let _ = usize::try_from(hello.max_frame)
            .unwrap_or(usize::MAX)
            .min(FRAME_LIMIT);
        let _ = format!("{hello:?}");
        let again: Hello = Frame::json(FrameKind::Control, &hello)
            .parse_json(FrameKind::Control)
            .expect("a hello re-parses");
        assert_eq!(
            serde_json::to_value(&again).ok(),
            serde_json::to_value(&hello).ok()
        );
    }
    if let Ok(reply) = control.parse_json::<HelloReply>(FrameKind::Control) {
        let again: HelloReply = Frame::json(FrameKind::Control, &reply)
            .parse_json(FrameKind::Control)
            .expect("a hello reply re-parses");
        assert_eq!(again, reply);
    }
    if let Ok(greeting) = control.parse_json::<Greeting>(FrameKind::Control) {
        let _ = greeting.version;
    }
    if let Ok(notice) = control.parse_json::<Notice>(FrameKind::Control) {
        let again: Notice = Frame::json(FrameKind::Control, &notice)
            .parse_json(FrameKind::Control)
            .expect("a notice re-parses");
        assert_eq!(again, notice);
    }
    let identity = as_kind(FrameKind::Identity);
    if let Ok(assertion) = identity.parse_json::<Assertion>(FrameKind::Identity) {
        identity_assertion(&assertion);
    }
    let open = as_kind(FrameKind::Open);
    if let Ok(header) = open.parse_json::<OpenHeader>(FrameKind::Open) {
        open_header(&header);
    }
}

/// Classification of one body, and the response scanner fed the same body whole and in pieces:
/// the pieces must not change what the scanner finds, and where the classifier reads a single
/// response, the scanner must find the same facts (within its documented limits).
pub fn mcp_classify(data: &[u8]) {
    let classified = classify(data);
    if let Ok(classified) = &classified {
        for message in classified.messages() {
            if let Some(payload) = message.payload(data) {
                assert!(serde_json::from_slice::<&serde_json::value::RawValue>(payload).is_ok());
            }
            assert!(message.size <= data.len());
        }
        let _ = (classified.has_requests(), classified.is_all_responses());
    }
    let mut whole = ResponseScanner::new();
    whole.feed(data);
    let mut pieced = ResponseScanner::new();
    for piece in pieces(data) {
        pieced.feed(piece);
        let _ = (pieced.is_complete(), pieced.is_object(), pieced.is_blank());
    }
    assert_eq!(
        whole.facts(),
        pieced.facts(),
        "scanner facts differ in pieces"
    );
    assert_eq!(whole.is_complete(), pieced.is_complete());
    assert_eq!(whole.size(), data.len() as u64);
    // The scanner does not see keys written with escapes, by design.
    let plain_keys = !data.contains(&b'\\');
    if let Ok(Classified::Single(message)) = &classified
        && message.kind == MessageKind::Response
        && plain_keys
    {
        let facts = whole
            .facts()
            .unwrap_or_else(|| panic!("the scanner misses a response the classifier reads"));
        let info = facts.message_info();
        let id = message.id.as_ref().map(|id| id.get());
        if id.is_some_and(|id| id.len() <= MAX_CAPTURE) {
            assert_eq!(info.id.as_ref().map(|id| id.get()), id, "ids differ");
        }
        assert_eq!(info.error_code, message.error_code, "error codes differ");
        assert_eq!(info.is_tool_error, message.is_tool_error, "isError differs");
    }
}

/// A message as [`reference_message`] reads it: kind, id, method, tool name or resource URI.
pub type Reference = (MessageKind, Option<Value>, Option<String>, Option<String>);

/// What a plain `serde_json` reading of a JSON-RPC message makes of it: kind, id (as JSON),
/// method, and tool name or resource URI; `Err` when it is not a valid message.
pub fn reference_message(value: &Value) -> Result<Reference, String> {
    let object = value.as_object().ok_or("not an object")?;
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err("jsonrpc".into());
    }
    let id = object.get("id").filter(|id| !id.is_null()).cloned();
    // A request id is a string or an integer (`Value` keeps integers beyond 64 bits as f64).
    if object.contains_key("method")
        && id
            .as_ref()
            .is_some_and(|id| !(id.is_string() || id.is_number()))
    {
        return Err("request id".into());
    }
    let method = match object.get("method") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err("method is not a string".into()),
    };
    let result = object.get("result").filter(|r| !r.is_null());
    let error = object.get("error").filter(|e| !e.is_null());
    if let Some(error) = error {
        let code = error.get("code").ok_or("error without code")?;
        if code.as_i64().is_none() {
            return Err("error code is not an i64".into());
        }
        if !error.is_object() {
            return Err("error is not an object".into());
        }
    }
    // `"id": null` is still a request (MCP forbids null ids; the relay refuses such a request
    // and audits it rather than forwarding it as a notification).
    let null_id = object.get("id").is_some_and(Value::is_null);
    let kind = match (&method, result.is_some() || error.is_some()) {
        (Some(_), false) if id.is_some() || null_id => MessageKind::Request,
        (Some(_), false) => MessageKind::Notification,
        (None, true) => MessageKind::Response,
        _ => return Err("method and result/error".into()),
    };
    let params = object.get("params").filter(|p| !p.is_null());
    let target = match (method.as_deref(), params) {
        (
            Some(
                "tools/call"
                | "prompts/get"
                | "resources/read"
                | "resources/subscribe"
                | "resources/unsubscribe",
            ),
            Some(params),
        ) => {
            let params = params.as_object().ok_or("params is not an object")?;
            let text = |key: &str| match params.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{key} is not a string")),
            };
            let (name, uri) = (text("name")?, text("uri")?);
            name.or(uri)
        }
        _ => None,
    };
    Ok((kind, id, method, target))
}

/// The relay's classification against [`reference_message`]: where both accept a message they
/// must agree on kind, id, method and target; the relay may refuse what the reference accepts
/// only for the documented stricter cases (duplicate keys, escaped `jsonrpc`, see README).
pub fn mcp_differential(data: &[u8]) {
    let relay = classify(data);
    let value = match serde_json::from_slice::<Value>(data) {
        Ok(value) => value,
        // The relay keeps numbers as their text (ids are echoed byte for byte), so a number
        // beyond f64 (`1e400`) is JSON to it and out of range to `Value`.
        Err(e) if e.to_string().contains("number out of range") => return,
        // Nor does it check the text of members it skips (unknown keys) for UTF-8, nor string
        // escapes anywhere for lone surrogates (`"\ud800"`, which Python's json accepts): it
        // forwards those bytes untouched, and every field it reads is checked.
        Err(e)
            if ["unicode code point", "surrogate", "hex escape"]
                .iter()
                .any(|m| e.to_string().contains(m)) =>
        {
            return;
        }
        Err(_) => {
            assert!(
                relay.is_err(),
                "the relay accepts what serde_json cannot parse"
            );
            return;
        }
    };
    let items: Vec<&Value> = match &value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let reference: Result<Vec<_>, String> = if items.is_empty() {
        Err("empty batch".into())
    } else {
        items.iter().map(|v| reference_message(v)).collect()
    };
    match (relay, reference) {
        (Ok(relay), Ok(reference)) => {
            assert_eq!(
                relay.messages().len(),
                reference.len(),
                "message counts differ"
            );
            assert_eq!(matches!(relay, Classified::Batch(_)), value.is_array());
            for (got, (kind, id, method, target)) in relay.messages().iter().zip(reference) {
                assert_eq!(got.kind, kind, "kinds differ");
                let got_id = got
                    .id
                    .as_ref()
                    .map(|id| serde_json::from_str::<Value>(id.get()).expect("a raw id is JSON"));
                assert_eq!(got_id, id, "ids differ");
                assert_eq!(got.method, method, "methods differ");
                assert_eq!(got.target, target, "targets differ");
            }
        }
        (Ok(_), Err(why)) => panic!("the relay accepts a message serde_json refuses: {why}"),
        (Err(e), Ok(reference)) => {
            let text = e.to_string();
            // Numbers the relay refuses as request ids are f64 to `Value` (1.5, 1e3).
            let float_id = reference
                .iter()
                .any(|(_, id, _, _)| id.as_ref().is_some_and(Value::is_f64));
            // A governed request whose target field is missing, not a string, or doubled by
            // the other target field is refused on purpose (policy must judge exactly the field
            // the upstream reads); `Value` has no such rule.
            let governed_target = GOVERNED_METHODS
                .iter()
                .any(|method| text.starts_with(&format!("invalid request: {method}: ")));
            assert!(
                has_duplicate_keys(data)
                    || text.contains("borrowed string")
                    || (text.contains("request id") && float_id)
                    || governed_target,
                "the relay refuses a message serde_json accepts: {text}"
            );
        }
        (Err(_), Err(_)) => {}
    }
}

/// The methods whose target (`name` or `uri`) policy judges; the relay refuses them when the
/// target is missing or ambiguous.
const GOVERNED_METHODS: &[&str] = &[
    "tools/call",
    "prompts/get",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
];

/// Whether any object in the JSON text `data` repeats a key (the relay refuses such messages,
/// `Value` keeps the last value).
fn has_duplicate_keys(data: &[u8]) -> bool {
    use serde::de::{Deserializer, Error, MapAccess, SeqAccess, Visitor};

    struct Unique;
    impl<'de> serde::Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(UniqueVisitor)
        }
    }
    struct UniqueVisitor;
    impl<'de> Visitor<'de> for UniqueVisitor {
        type Value = Unique;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key) {
                    return Err(A::Error::custom("duplicate key"));
                }
                map.next_value::<Unique>()?;
            }
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
            while seq.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
    }
    serde_json::from_slice::<Unique>(data).is_err_and(|e| e.to_string().contains("duplicate key"))
}

/// Parses an SSE stream delivered in `chunks` as `connect` does (sse-stream over a body).
fn sse_events<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<Result<sse_stream::Sse, String>> {
    let chunks: Vec<Result<Bytes, Infallible>> = chunks
        .into_iter()
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut stream = sse_stream::SseByteStream::new(futures_util::stream::iter(chunks));
    let mut out = Vec::new();
    // Each poll consumes input or ends; the bound only guards against a parser that stalls.
    for _ in 0..100_000 {
        match stream.next().now_or_never() {
            Some(Some(Ok(event))) => out.push(Ok(event)),
            Some(Some(Err(e))) => out.push(Err(e.to_string())),
            Some(None) => return out,
            None => panic!("an SSE stream over ready input is pending"),
        }
    }
    panic!("an SSE stream never ends");
}

/// An upstream's SSE stream, whole and in pieces (they must agree), and what `connect` does with
/// each event: classify its data, resolve an `endpoint` against the source URL and keep it only
/// on the same origin.
pub fn sse_upstream(data: &[u8]) {
    let whole = sse_events([data]);
    let pieced = sse_events(pieces(data));
    assert_eq!(
        format!("{whole:?}"),
        format!("{pieced:?}"),
        "SSE events differ when fed in pieces"
    );
    let base = url::Url::parse("http://127.0.0.1:8931/sse").expect("a fixed valid URL");
    for event in whole.into_iter().flatten() {
        if let Some(data) = event.data.as_deref().filter(|d| !d.is_empty()) {
            let _ = classify(data.as_bytes());
            if event.event.as_deref() == Some("endpoint")
                && let Ok(post) = base.join(data.trim())
                && post.origin() == base.origin()
            {
                let _ = mcp_tunnel::client::UpstreamTarget::new(&post);
            }
        }
        if let Some(retry) = event.retry {
            let _ = std::time::Duration::from_millis(retry);
        }
        if let Some(id) = &event.id {
            let _ = http::HeaderValue::from_str(id);
        }
    }
}

/// Agent-facing SSE: a `Last-Event-ID` value read as the relay reads it, and the events the relay
/// writes (a message carrying this data, a priming event) read back by an SSE parser: an agent
/// must get exactly the message the relay sent, line ends aside.
pub fn sse_agent(data: &[u8]) {
    if let Ok(value) = http::HeaderValue::from_bytes(data)
        && let Ok(text) = value.to_str()
        && let Some((stream, seq)) = parse_event_id(text)
    {
        assert_eq!(
            parse_event_id(&format!("{stream}-{seq}")),
            Some((stream, seq))
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let event = sse::message_event(Some("3-17"), data);
    let events = sse_events([&event[..]]);
    let expected = text.replace("\r\n", "\n").replace('\r', "\n");
    match events.as_slice() {
        [Ok(got)] => {
            assert_eq!(got.id.as_deref(), Some("3-17"));
            assert_eq!(got.event.as_deref(), Some("message"));
            assert_eq!(
                got.data.as_deref().unwrap_or(""),
                expected,
                "the agent reads other data than the relay sent"
            );
        }
        other => panic!("one message event reads as {other:?}"),
    }
    let priming = sse::priming_event("3-0", std::time::Duration::from_millis(1000));
    assert_eq!(sse_events([&priming[..]]).len(), 1);
}

/// A relay configuration (parse, audit section check, governance build) and a connect
/// configuration (parse, sources) from the same text. Sections that read files or fetch URLs
/// (identity providers, the assertion key) are dropped before the build.
pub fn relay_config(data: &[u8]) {
    let data = data.to_vec();
    on_small_stack(move || relay_config_on_this_thread(&data));
}

fn relay_config_on_this_thread(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut config) = toml::from_str::<RelayConfig>(text) {
        config.identity_providers.clear();
        config.identity_assertion = None;
        if let Some(audit) = &config.audit {
            let _ = audit.validate();
        }
        let _ = config.limits.request_timeout();
        let _ = config.limits.session_idle();
        let _ = mcp_tunnel::relay::build_governance(&config);
    }
    if let Ok(client) = toml::from_str::<ClientFile>(text) {
        let _ = client.sources();
    }
    for line in text.lines().take(16) {
        let _ = SourceConfig::parse_flag(line);
    }
}

/// The P-256 key the jwt target signs fuzzed claims with (PKCS#8 DER, base64): a test key made
/// for the fuzzer, never used anywhere else.
const FUZZ_KEY_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgS2MT/m5kTLLGrKAclAe+g35kivzEkMUDz7FbL/HsLaChRANCAAQCmh8jHtjWAuuEtt20HpPZ5jHew4AM/S3dgPBFnNyqbXMrCUdIOQlsk1ke/jvTPwehM3wyIG658MO58fLdubLl";

/// The public half of [`FUZZ_KEY_PKCS8`] as a JWKS.
const FUZZ_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"fuzz","alg":"ES256","use":"sig","x":"ApofIx7Y1gLrhLbdtB6T2eYx3sOADP0t3YDwRZzcqm0","y":"cysJR0g5CWyTWR7-O9M_B6EzfDIgbrnww7nx8t25suU"}]}"#;

/// The issuer of the fuzz provider.
pub const FUZZ_ISSUER: &str = "https://issuer.fuzz";

fn verifier(keys: ProviderKeys, tenant: TenantSource) -> Option<JwtVerifier> {
    let provider = Provider::new(
        FUZZ_ISSUER.into(),
        vec!["mcp-tunnel".into()],
        Vec::new(),
        keys,
        ClaimMapping {
            subject: "sub".into(),
            tenant,
            roles: Some("roles".into()),
            scope: "scope".into(),
        },
        vec!["mcp".into()],
    )
    .ok()?;
    let tenants = mcp_tunnel::govern::jwt::tenant_set(["acme", "beta"]);
    Some(JwtVerifier::new(None, vec![provider], tenants))
}

/// JWT handling: line 1 a JWKS document (parsed into keys, and a verifier over them), line 2 a
/// bearer token (verified as given), the rest a claims object the target signs with its own key,
/// so the claim checks and the identity mapping behind the signature are reached too.
pub fn jwt(data: &[u8]) {
    let (jwks, rest) = split_line(data);
    let (token, claims) = split_line(rest);
    let token = String::from_utf8_lossy(token);
    let _ = looks_like_jwt(&token);
    if let Ok(jwks) = std::str::from_utf8(jwks)
        && let Ok(keys) = key_set(jwks)
        && let Some(v) = verifier(
            ProviderKeys::Fixed(Arc::new(keys)),
            TenantSource::Claim("tenant".into()),
        )
    {
        let _ = v.verify(&token);
    }
    let fixed = ProviderKeys::from_document(FUZZ_JWKS).expect("the fuzz JWKS parses");
    if let Some(v) = verifier(fixed.clone(), TenantSource::Claim("tenant".into())) {
        let _ = v.verify(&token);
    }
    let Ok(claims) = serde_json::from_slice::<serde_json::Map<String, Value>>(claims) else {
        return;
    };
    if let Some(Ok(identity)) = signed_identity(&claims, TenantSource::Claim("tenant".into())) {
        assert!(!identity.subject.is_empty());
        assert!(["acme", "beta"].contains(&&*identity.tenant));
    }
    let _ = signed_identity(&claims, TenantSource::Fixed("acme".into()));
}

/// `claims` signed with the fuzz key and verified by a provider trusting it: `None` when they
/// cannot be signed (not serializable).
pub fn signed_identity(
    claims: &serde_json::Map<String, Value>,
    tenant: TenantSource,
) -> Option<Result<Identity, mcp_tunnel::govern::jwt::JwtError>> {
    let der = base64_decode(FUZZ_KEY_PKCS8).expect("the fuzz key is valid base64");
    let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("fuzz".into());
    let signed = jsonwebtoken::encode(&header, claims, &key).ok()?;
    let keys = ProviderKeys::from_document(FUZZ_JWKS).expect("the fuzz JWKS parses");
    Some(verifier(keys, tenant)?.verify(&signed))
}

fn base64_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text)
}

/// Expressions operators write (README, examples), evaluated over every fuzzed call.
const FIXED_CONDITIONS: &[&str] = &[
    r#"args.table != "salaries" || "hr" in roles"#,
    r#"!args.message.contains("salaries") || "hr" in roles"#,
    r#"args.startsWith("file:///public/")"#,
    r#"size(args) < 5 && args.all(k, k != "x")"#,
    r#"has(args.limit) && args.limit <= 100"#,
    r#"args.exists(k, args[k] == 1) || tenant == "acme""#,
];

/// CEL: line 1 an expression (compiled, then evaluated), line 2 a rule glob (matched against the
/// call's `SOURCE/NAME`), the rest a JSON-RPC body whose arguments the expression and the
/// operators' usual conditions are evaluated over, as a tool, resource and prompt call.
pub fn cel(data: &[u8]) {
    let data = data.to_vec();
    on_small_stack(move || cel_on_this_thread(&data));
}

/// Runs `f` on a thread with a 2 MiB stack, as the relay's tokio workers and blocking threads
/// (where a hot reload compiles conditions) have, so a recursion too deep for them is a finding;
/// a panic in `f` is re-raised here.
fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    let thread = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("the fuzz target can spawn a thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn cel_on_this_thread(data: &[u8]) {
    let (expression, rest) = split_line(data);
    let (glob, body) = split_line(rest);
    let expression = String::from_utf8_lossy(expression);
    let glob = String::from_utf8_lossy(glob);
    let mut conditions: Vec<Condition> = FIXED_CONDITIONS
        .iter()
        .map(|e| Condition::compile(Kind::Tool, "*".into(), e).expect("fixed conditions compile"))
        .collect();
    if let Ok(condition) = Condition::compile(Kind::Tool, glob.to_string(), &expression) {
        conditions.push(condition);
    }
    let who = Identity {
        tenant: "acme".into(),
        subject: "alice@example.com".into(),
        roles: vec!["dev".to_owned(), "hr".to_owned()].into(),
    };
    // The first message of the body, as the relay classifies it: its target names the call, and
    // its `params` (located by classification, as the relay hands them to conditions) are what
    // the conditions read.
    let classified = classify(body).ok();
    let first = classified.as_ref().and_then(|c| c.messages().first());
    let name = first
        .and_then(|m| m.target.clone())
        .unwrap_or_else(|| "echo".into());
    let params = first.and_then(|m| m.payload(body));
    let _ = glob_match(&glob, &format!("demo/{name}"));
    for kind in [Kind::Tool, Kind::Resource, Kind::Prompt] {
        let call = Call {
            who: &who,
            kind,
            source: "demo",
            name: &name,
            params,
        };
        let Ok(args) = call.args() else {
            continue;
        };
        for condition in &conditions {
            let _ = condition.applies(kind, &format!("demo/{name}"));
            let _ = condition.evaluate(&call, &args);
        }
    }
}

/// The protocol-era bridge (`src/mcp/bridge.rs`) over one message, read as each side's message
/// it may be: a retry, an `input_required` answer (to reseal, and to ask of a session agent),
/// an agent's answers, an upstream's request, an `initialize` or `server/discover`. Every
/// rewrite of a JSON object must give JSON with the field it set.
pub fn bridge(data: &[u8]) {
    use mcp_tunnel::mcp::bridge::{
        self, Declared, Discovered, InputRequired, Resealed, Retry, ServerRequest,
    };
    let json = |bytes: &[u8], what: &str| -> Value {
        serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{what} is not JSON ({e})"))
    };
    let _ = Retry::parse(data);
    let _ = bridge::agent_answers(data);
    let _ = bridge::declares_capability(data, "sampling");
    let capabilities = bridge::declared_capabilities(data);
    json(capabilities.as_bytes(), "declared capabilities");
    if let Some(digest) = bridge::call_digest(data) {
        assert_eq!(
            Some(digest),
            bridge::call_digest(data),
            "a digest is stable"
        );
    }
    match bridge::reseal_input_required(data, |state| {
        Some(format!("sealed:{}", state.unwrap_or("")))
    }) {
        Resealed::Sealed(sealed) => {
            let value = json(&sealed, "a resealed answer");
            assert!(
                value["result"]["requestState"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("sealed:")),
                "the state is the sealer's"
            );
        }
        Resealed::Unchanged | Resealed::Refused => {}
    }
    if let Some(asked) = InputRequired::parse(data) {
        for (key, method, params) in &asked.requests {
            json(
                &bridge::server_request(key, method, params.as_deref()),
                "a server request",
            );
        }
    }
    let id = serde_json::value::RawValue::from_string("7".into()).expect("7 is JSON");
    if let Some(request) = ServerRequest::parse(data) {
        let result = serde_json::value::RawValue::from_string("{}".into()).expect("{} is JSON");
        json(&bridge::response(&request.id, &result), "a response");
    }
    if let Some(rewritten) = bridge::reidentify(data, &id) {
        assert_eq!(json(&rewritten, "a reidentified message")["id"], 7);
    }
    if let Some(stateful) = bridge::with_request_state(data, Some("s")) {
        assert_eq!(
            json(&stateful, "a request with a state")["params"]["requestState"],
            "s"
        );
    }
    if let Some(declared) = Declared::parse(data) {
        if let Some(stateless) = declared.stateless_request(data) {
            let value = json(&stateless, "a stateless request");
            assert!(value["params"]["_meta"].is_object());
        }
        json(&declared.listen_request(1), "a listen request");
    }
    if let Some(discovered) = Discovered::parse(data) {
        json(
            &discovered.initialize_answer(&id, "2025-11-25"),
            "an initialize answer",
        );
    }
    let completed = bridge::complete(Bytes::copy_from_slice(data), Some("tools/list"));
    if completed.as_ref() != data {
        json(&completed, "a completed result");
    }
}

/// Task ids (`src/mcp/tasks.rs`) over one message: bound as an upstream's (with a binder that
/// marks ids, so every id it bound can be told), and unbound as an agent's request.
pub fn tasks(data: &[u8]) {
    use mcp_tunnel::mcp::tasks::{self, TaskIds};
    struct Marked;
    impl TaskIds for Marked {
        fn bind(&self, raw: &str) -> String {
            format!("mine:{raw}")
        }
        fn unbind(&self, bound: &str) -> Option<String> {
            bound.strip_prefix("mine:").map(str::to_owned)
        }
        fn created(&self, _raw: &str) {}
        fn listed(&self, raw: &str) -> bool {
            raw.len().is_multiple_of(2)
        }
    }
    // Binding replaces string tokens with string tokens (and a list with its kept entries):
    // JSON stays JSON.
    if let Some(bound) = tasks::bind_answer(data, &Marked)
        && serde_json::from_slice::<Value>(data).is_ok()
    {
        serde_json::from_slice::<Value>(&bound).expect("a bound message is JSON");
    }
    // The data as an agent's request, and as the params of each method that names tasks:
    // whatever is unbound stays JSON, and the caller's own id comes back unmarked.
    if let Ok(classified) = mcp_tunnel::mcp::classify(data) {
        for info in classified.messages() {
            let Some(range) = info.payload.clone() else {
                continue;
            };
            if let Ok(splices) = tasks::unbind_payload(
                info.kind,
                info.method.as_deref(),
                &data[range.clone()],
                &Marked,
            ) && serde_json::from_slice::<Value>(&data[range.clone()]).is_ok()
            {
                let params = tasks::apply_splices(&data[range], &splices);
                serde_json::from_slice::<Value>(&params).expect("unbound params are JSON");
            }
        }
    }
    for method in ["tasks/get", "subscriptions/listen", "tools/call"] {
        let _ = tasks::unbind_payload(
            mcp_tunnel::mcp::MessageKind::Request,
            Some(method),
            data,
            &Marked,
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let params =
            serde_json::to_vec(&serde_json::json!({"taskId": text})).expect("a Value encodes");
        match tasks::unbind_payload(
            mcp_tunnel::mcp::MessageKind::Request,
            Some("tasks/get"),
            &params,
            &Marked,
        ) {
            Ok(splices) => {
                let unbound = tasks::apply_splices(&params, &splices);
                let value: Value = serde_json::from_slice(&unbound).expect("JSON");
                assert_eq!(
                    Some(value["taskId"].as_str().unwrap_or("?")),
                    text.strip_prefix("mine:")
                );
            }
            Err(_) => assert!(!text.starts_with("mine:"), "the caller's own id refused"),
        }
    }
}
