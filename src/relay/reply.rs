//! Every relay-made answer to an agent, in one place: HTTP status plus a JSON-RPC error body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::mcp::jsonrpc::{codes, error_body};

/// Content type of JSON-RPC bodies.
pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A failure the relay reports to an agent before or instead of reaching the upstream.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No credential, or not a valid one.
    #[error("missing or invalid credentials")]
    Unauthorized,
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
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, code, id) = match self {
            AgentError::Unauthorized => (StatusCode::UNAUTHORIZED, codes::INVALID_REQUEST, None),
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
        };
        let mut response = json_response(status, error_body(id.as_deref(), code, &message));
        match status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON body with `status`.
pub fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}
