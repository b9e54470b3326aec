//! Every relay-made answer to an agent, in one place: HTTP status plus a JSON-RPC error body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::govern::limits::{Limited, RateLimited};
use crate::mcp::jsonrpc::{codes, error_body};
use crate::relay::calls::source_error_body;

/// Content type of JSON-RPC bodies.
pub(super) const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// What a `401` or `403` tells the agent about authenticating (RFC 6750, RFC 9728).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Challenge {
    /// The URL of the protected resource metadata of the resource the agent asked for; absent
    /// when the relay has no public URL configured.
    pub resource_metadata: Option<String>,
    /// The scopes a token needs, space-separated; absent when none are required.
    pub scope: Option<String>,
}

impl Challenge {
    /// The `WWW-Authenticate` value: `Bearer` with `error` (if any), `scope` and
    /// `resource_metadata` parameters.
    pub(super) fn header(&self, error: Option<&str>) -> HeaderValue {
        let mut params = Vec::new();
        if let Some(error) = error {
            params.push(format!("error=\"{error}\""));
        }
        if let Some(scope) = &self.scope {
            params.push(format!("scope=\"{}\"", quoted(scope)));
        }
        if let Some(url) = &self.resource_metadata {
            params.push(format!("resource_metadata=\"{}\"", quoted(url)));
        }
        let value = if params.is_empty() {
            "Bearer".to_owned()
        } else {
            format!("Bearer {}", params.join(", "))
        };
        HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }
}

/// A quoted-string's content: no quotes or backslashes (they are not in URLs or scope tokens
/// that pass configuration; dropping them keeps the header well-formed whatever the input).
fn quoted(text: &str) -> String {
    text.chars().filter(|c| *c != '"' && *c != '\\').collect()
}

/// A failure the relay reports to an agent before or instead of reaching the upstream.
#[derive(Debug, thiserror::Error)]
pub(super) enum AgentError {
    /// No credential, or not a valid one.
    #[error("missing or invalid credentials{}", .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Unauthorized {
        /// How to authenticate.
        challenge: Challenge,
        /// Why a presented token was refused (not said for API keys), if one was presented.
        reason: Option<String>,
    },
    /// A valid token that lacks a required scope.
    #[error("insufficient scope: the token needs {}", .challenge.scope.as_deref().unwrap_or_default())]
    InsufficientScope {
        /// The scopes needed, and where the metadata is.
        challenge: Challenge,
    },
    /// The source does not exist, is offline, or belongs to another tenant (all alike).
    #[error("not found")]
    NotFound,
    /// The session id is unknown, ended, or someone else's.
    #[error("session not found")]
    SessionNotFound,
    /// A browser origin that is not allowed (cross-site calls).
    #[error("origin not allowed")]
    ForbiddenOrigin,
    /// A `Host` this relay does not answer to (DNS rebinding).
    #[error("host not allowed")]
    ForbiddenHost,
    /// The body is not JSON.
    #[error("parse error: {0}")]
    Parse(String),
    /// The body is not a request this endpoint accepts.
    #[error("{0}")]
    BadRequest(String),
    /// The body exceeds the limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 2026-07-28 routing headers disagree with the body.
    #[error("{message}")]
    HeaderMismatch {
        /// The request id, echoed.
        id: Option<Box<RawValue>>,
        /// Which header and why.
        message: String,
    },
    /// The method does not apply to this URL.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The trail could not record what the request started, so it is refused.
    #[error("the request could not be audited, so it is refused")]
    Unaudited,
    /// A session cap refused a new session or listen stream: `429`.
    #[error("{cap}")]
    TooManySessions {
        /// The request id, echoed.
        id: Option<Box<RawValue>>,
        /// Which cap.
        cap: crate::relay::session::CapReached,
    },
    /// The session lives on but its source cannot be reached right now (its tunnels are
    /// reconnecting): `503` with `Retry-After`, for a GET or DELETE (a POST's requests get a
    /// JSON-RPC error each instead).
    #[error("{0}")]
    Unavailable(String),
    /// The relay has just started and no tunnel reaches the source here yet (see
    /// [`crate::relay::STARTUP_WINDOW`]): `503` with `Retry-After: 1`, whether or not the
    /// source exists, for any tenant.
    #[error("the relay is starting and cannot reach the source yet; retry shortly")]
    Starting,
    /// A rate limit refused the request: `429` with `Retry-After`.
    #[error("{}", rate_limited_message(.0))]
    RateLimited(RateLimited),
}

/// What a `429` says: which limit, and when to retry (whole seconds, rounded up).
fn rate_limited_message(limited: &RateLimited) -> String {
    let what = match limited.limit {
        Limited::Identity => "too many requests from this caller",
        Limited::Source => "too many requests to this source",
        Limited::Tenant => "too many requests for this tenant",
        Limited::AuthFailures => "too many failed authentication attempts from this address",
    };
    format!("{what}; retry after {} s", retry_after_secs(limited))
}

/// `Retry-After` in whole seconds, rounded up (at least 1).
fn retry_after_secs(limited: &RateLimited) -> u64 {
    limited.retry_after.as_secs_f64().ceil().max(1.0) as u64
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let mut authenticate = None;
        let mut retry_after = None;
        let (status, code, id) = match self {
            AgentError::Unauthorized { challenge, reason } => {
                let error = reason.is_some().then_some("invalid_token");
                authenticate = Some(challenge.header(error));
                (StatusCode::UNAUTHORIZED, codes::INVALID_REQUEST, None)
            }
            AgentError::InsufficientScope { challenge } => {
                authenticate = Some(challenge.header(Some("insufficient_scope")));
                (StatusCode::FORBIDDEN, codes::INVALID_REQUEST, None)
            }
            AgentError::NotFound | AgentError::SessionNotFound => {
                (StatusCode::NOT_FOUND, codes::INVALID_REQUEST, None)
            }
            AgentError::ForbiddenOrigin | AgentError::ForbiddenHost => {
                (StatusCode::FORBIDDEN, codes::INVALID_REQUEST, None)
            }
            AgentError::Parse(_) => (StatusCode::BAD_REQUEST, codes::PARSE_ERROR, None),
            AgentError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, None),
            AgentError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, codes::TOO_LARGE, None),
            AgentError::HeaderMismatch { id, .. } => {
                (StatusCode::BAD_REQUEST, codes::HEADER_MISMATCH, id)
            }
            AgentError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, codes::INVALID_REQUEST, None)
            }
            AgentError::Unaudited => (
                StatusCode::SERVICE_UNAVAILABLE,
                codes::SOURCE_UNAVAILABLE,
                None,
            ),
            AgentError::TooManySessions { id, .. } => {
                (StatusCode::TOO_MANY_REQUESTS, codes::INVALID_REQUEST, id)
            }
            AgentError::Unavailable(_) | AgentError::Starting => {
                retry_after = Some(HeaderValue::from_static("1"));
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::SOURCE_UNAVAILABLE,
                    None,
                )
            }
            AgentError::RateLimited(limited) => {
                retry_after = Some(HeaderValue::from(retry_after_secs(&limited)));
                (StatusCode::TOO_MANY_REQUESTS, codes::INVALID_REQUEST, None)
            }
        };
        let mut response = json_response(status, error_body(id.as_deref(), code, &message));
        if let Some(value) = authenticate {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        if let Some(value) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// A JSON body with `status`.
pub(super) fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

/// A JSON-RPC error (on HTTP 200) saying the source could not answer.
pub(super) fn source_error(id: Option<&RawValue>, source: &str, why: &str) -> Response {
    json_response(StatusCode::OK, source_error_body(id, source, why))
}
