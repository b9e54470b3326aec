//! The gate every agent request passes, whatever its transport: origin and host checks,
//! authentication, body limits, classification, authorization; and opening a tunnel stream to
//! the source.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::value::RawValue;

use super::RelayState;
use super::channel::{Channel, ChannelLimits};
use super::events::Budget;
use super::oauth::{self, Resource};
use super::reply::{AgentError, Challenge, json_response};
use crate::govern::Identity;
use crate::govern::assertion::Refresher;
use crate::govern::condition::Call;
use crate::govern::jwt::{JwtError, looks_like_jwt};
use crate::govern::policy::{Decision, Kind};
use crate::mcp::classify;
use crate::mcp::era::{METHOD_HEADER, NAME_HEADER};
use crate::mcp::jsonrpc::{Classified, ClassifyError, codes, error_body};
use crate::wire::{Era, OpenHeader};

/// A header's value as text, if present and text.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Refuses browser origins that are neither allowed nor same-origin, and `Host` values a
/// loopback relay does not answer to (DNS rebinding: a page on evil.example resolving its name
/// to 127.0.0.1 must not reach local sources).
pub fn check_origin_and_host(state: &RelayState, headers: &HeaderMap) -> Result<(), AgentError> {
    let host = header_str(headers, header::HOST.as_str()).unwrap_or_default();
    if !state.host_allowed(host) {
        return Err(AgentError::ForbiddenHost);
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| AgentError::ForbiddenOrigin)?;
    if state
        .allowed_origins
        .iter()
        .any(|allowed| allowed == origin)
    {
        return Ok(());
    }
    // Same-origin browser calls: the Origin's authority equals the Host we were reached at.
    let authority = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if !host.is_empty() && authority.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(AgentError::ForbiddenOrigin)
}

/// The bearer credential of a request if it has the shape of a JWT and JWTs are accepted.
pub fn bearer_jwt(headers: &HeaderMap) -> Option<&str> {
    let value = header_str(headers, header::AUTHORIZATION.as_str())?;
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && looks_like_jwt(credential)).then_some(credential)
}

/// The caller behind the request's bearer credential: an API key first, then a JWT of a
/// configured identity provider. A refusal names `resource`'s protected resource metadata
/// (RFC 9728) when the relay has a public URL.
pub fn authenticate(
    state: &RelayState,
    headers: &HeaderMap,
    resource: Resource<'_>,
) -> Result<Identity, AgentError> {
    let governance = state.governance();
    let jwt = governance.keyring.jwt();
    let challenge = |scope: Option<String>| Challenge {
        resource_metadata: jwt
            .public_url()
            .map(|url| oauth::metadata_url(url, &resource.path())),
        scope,
    };
    let required = || {
        let scopes = jwt.scopes();
        (!scopes.is_empty()).then(|| scopes.join(" "))
    };
    let unauthorized = |reason: Option<String>| AgentError::Unauthorized {
        challenge: challenge(required()),
        reason,
    };
    let value =
        header_str(headers, header::AUTHORIZATION.as_str()).ok_or_else(|| unauthorized(None))?;
    let (scheme, credential) = value.split_once(' ').ok_or_else(|| unauthorized(None))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized(None));
    }
    let credential = credential.trim();
    if let Some(identity) = governance.keyring.agent(credential) {
        return Ok(identity.clone());
    }
    if !jwt.is_enabled() || !looks_like_jwt(credential) {
        return Err(unauthorized(None));
    }
    jwt.verify(credential).map_err(|e| {
        tracing::info!(error = %e, resource = %resource.path(), "agent token refused");
        match e {
            JwtError::MissingScope { required } => AgentError::InsufficientScope {
                challenge: challenge(Some(required.join(" "))),
            },
            other => unauthorized(Some(other.to_string())),
        }
    })
}

/// Checks origin, host, credentials and the caller's and source's rate limits: the start of
/// every agent request for `resource`.
pub fn gate(
    state: &RelayState,
    headers: &HeaderMap,
    resource: Resource<'_>,
) -> Result<Identity, AgentError> {
    check_origin_and_host(state, headers)?;
    let who = authenticate(state, headers, resource)?;
    let source = match resource {
        Resource::Mcp(source) | Resource::Sse(source) => source,
    };
    state
        .governance()
        .limiter
        .request(&who.tenant, &who.subject, source, std::time::Instant::now())
        .map_err(|limited| {
            tracing::info!(tenant = %who.tenant, subject = %who.subject, source, ?limited, "rate limited");
            metrics::counter!(crate::metrics::REQUESTS, "outcome" => "rate_limited").increment(1);
            AgentError::RateLimited(limited)
        })?;
    Ok(who)
}

/// Reads a body of at most `limit` bytes (413 beyond), and classifies it (400 if not JSON-RPC).
pub async fn read_message(body: Body, limit: usize) -> Result<(Bytes, Classified), AgentError> {
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(AgentError::TooLarge { limit });
        }
        Err(e) => {
            return Err(AgentError::BadRequest(format!(
                "could not read the request body: {e}"
            )));
        }
    };
    let classified = classify(&body).map_err(|e| match e {
        ClassifyError::Parse(m) => AgentError::Parse(m),
        ClassifyError::Invalid(m) => AgentError::BadRequest(m),
    })?;
    Ok((body, classified))
}

/// Policy's word on one agent message: on each message of the body (parallel to
/// `Classified::messages`, `None` where policy does not govern the method), and the refusal to
/// answer with when any was denied.
#[derive(Debug, Default)]
pub struct Authorization {
    /// One entry per message of the body.
    pub decisions: Vec<Option<Decision>>,
    /// The JSON-RPC error for the first denied message, if any: the whole body is refused.
    pub refusal: Option<Bytes>,
}

/// Checks every `tools/call`, `resources/read` (and subscription) and `prompts/get` in the
/// body against the caller's roles and their conditions. A denied call never reaches the
/// tunnel: the refusal is the JSON-RPC error to answer it with, the one an unknown tool,
/// resource or prompt gets. `body` is the raw message (or batch) `classified` describes: its
/// `params` are parsed only when a role's condition applies to the call.
pub fn authorize(
    state: &RelayState,
    who: &Identity,
    source: &str,
    body: &Bytes,
    classified: &Classified,
) -> Authorization {
    let governance = state.governance();
    let mut authorization = Authorization::default();
    for (index, message) in classified.messages().iter().enumerate() {
        let kind = match message.method.as_deref() {
            Some("tools/call") => Kind::Tool,
            Some("resources/read" | "resources/subscribe" | "resources/unsubscribe") => {
                Kind::Resource
            }
            Some("prompts/get") => Kind::Prompt,
            _ => {
                authorization.decisions.push(None);
                continue;
            }
        };
        let name = message.target.as_deref().unwrap_or_default();
        let call = Call {
            who,
            kind,
            source,
            name,
            body,
            batch_index: matches!(classified, Classified::Batch(_)).then_some(index),
        };
        let decision = governance.policy.check_call(&call);
        if !decision.is_allowed() && authorization.refusal.is_none() {
            tracing::info!(tenant = %who.tenant, subject = %who.subject, source, name, ?kind, ?decision, "call denied");
            metrics::counter!(crate::metrics::REQUESTS, "outcome" => "denied").increment(1);
            let what = match kind {
                Kind::Tool => "tool",
                Kind::Resource => "resource",
                Kind::Prompt => "prompt",
            };
            authorization.refusal = Some(error_body(
                message.id.as_deref(),
                codes::INVALID_PARAMS,
                &format!("Unknown {what}: {name}"),
            ));
        }
        authorization.decisions.push(Some(decision));
    }
    authorization
}

/// The open header of a new exchange stream. In the stateless era the agent's MCP routing
/// headers travel along, verbatim.
pub fn open_header(
    who: &Identity,
    source: &str,
    era: Era,
    context: String,
    protocol_version: Option<String>,
    headers: &HeaderMap,
) -> OpenHeader {
    let mcp_headers = if era == Era::Stateless {
        headers
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                name == METHOD_HEADER || name == NAME_HEADER || name.starts_with("mcp-param-")
            })
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect()
    } else {
        Vec::new()
    };
    OpenHeader {
        tenant: who.tenant.to_string(),
        source: source.to_owned(),
        subject: who.subject.to_string(),
        era,
        protocol_version,
        context,
        mcp_headers,
        traceparent: header_str(headers, "traceparent").map(str::to_owned),
        assertion: None,
    }
}

/// Opens a tunnel stream to the source named in `header`, for the caller's tenant only; a
/// source that is unknown, offline or another tenant's is the same 404. When the tenant enables
/// identity assertions for the source, the stream's header carries one, signed here, and the
/// channel renews it while the stream lives (see [`crate::govern::assertion`]).
pub async fn open_channel(
    state: &RelayState,
    who: &Identity,
    header: &OpenHeader,
) -> Result<Arc<Channel>, Response> {
    let tunnel = state
        .registry
        .route(&who.tenant, &header.source)
        .ok_or_else(|| AgentError::NotFound.into_response())?;
    let governance = state.governance();
    let signed = match governance.keyring.assertions() {
        Some(signer) => Refresher::start(signer, who, &header.source).map_err(|e| {
            tracing::error!(error = %e, source = %header.source, "identity assertion not signed");
            source_error(
                None,
                &header.source,
                "the identity assertion could not be signed",
            )
        })?,
        None => None,
    };
    let (header, refresher) = match signed {
        Some((assertion, refresher)) => (
            std::borrow::Cow::Owned(OpenHeader {
                assertion: Some(assertion),
                ..header.clone()
            }),
            Some(refresher),
        ),
        None => (std::borrow::Cow::Borrowed(header), None),
    };
    let limits = ChannelLimits {
        open_timeout: governance.limits.open_stream_timeout(),
        // A budget below one message would drop every message: it holds at least one.
        budget: Budget::new(match governance.limits.session_event_bytes {
            0 => 0,
            bytes => bytes.max(state.limits.max_message_bytes),
        }),
    };
    Channel::open_with_identity(
        &tunnel,
        &header,
        state.limits.max_message_bytes,
        refresher,
        limits,
    )
    .await
    .map_err(|e| source_error(None, &header.source, &e.to_string()))
}

/// A JSON-RPC error (on HTTP 200) saying the source could not answer.
pub fn source_error(id: Option<&RawValue>, source: &str, why: &str) -> Response {
    json_response(StatusCode::OK, source_error_body(id, source, why))
}

/// The body of [`source_error`].
pub fn source_error_body(id: Option<&RawValue>, source: &str, why: &str) -> Bytes {
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "tunnel_error").increment(1);
    error_body(
        id,
        codes::SOURCE_UNAVAILABLE,
        &format!("source {source} is unavailable: {why}"),
    )
}
