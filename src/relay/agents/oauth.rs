//! OAuth 2.0 Protected Resource Metadata (RFC 9728) for the agent endpoints.
//!
//! Each `/mcp/{source}` and `/sse/{source}` is a protected resource; its metadata is served at
//! the path-inserted well-known URL (`/.well-known/oauth-protected-resource/mcp/{source}`), and
//! the relay's own at the root one (`/.well-known/oauth-protected-resource`). A `401` names the
//! document of the resource asked for (see [`super::admission::authenticate`]). Without
//! `[agents] public_url` there is no resource identifier to give, and these URLs are 404.
//!
//! The documents are public and the same for every source name, existing or not, so they tell
//! nobody which sources exist.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::reply::{AgentError, json_response};
use crate::config::validate_source_name;
use crate::relay::state::RelayState;

/// The well-known path prefix of RFC 9728.
pub(super) const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// An agent-facing resource: the path a request was made to, without the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resource<'a> {
    /// `/mcp/{source}`: Streamable HTTP.
    Mcp(&'a str),
    /// `/sse/{source}` (and its `messages` endpoint): HTTP+SSE.
    Sse(&'a str),
}

impl Resource<'_> {
    /// The resource's path, e.g. `/mcp/demo`.
    pub(super) fn path(&self) -> String {
        match self {
            Resource::Mcp(source) => format!("/mcp/{source}"),
            Resource::Sse(source) => format!("/sse/{source}"),
        }
    }
}

impl Resource<'_> {
    /// The path whose protected resource metadata a refusal names: the resource's own for a
    /// source name agents can type, the relay's (`""`) for anything else, so that text from
    /// an unauthenticated request's path never reaches a response header unchecked.
    pub(super) fn metadata_path(&self) -> String {
        let source = match self {
            Resource::Mcp(source) | Resource::Sse(source) => source,
        };
        if crate::config::validate_source_name(source).is_ok() {
            self.path()
        } else {
            String::new()
        }
    }
}

/// The URL of the metadata of the resource at `path` (`""` for the relay itself), with the
/// well-known segment inserted between host and path as RFC 9728 section 3.1 says.
pub(super) fn metadata_url(public_url: &str, path: &str) -> String {
    format!("{}{WELL_KNOWN}{path}", public_url.trim_end_matches('/'))
}

/// Routes serving the metadata documents.
pub(super) fn routes() -> Router<Arc<RelayState>> {
    Router::new()
        .route(WELL_KNOWN, get(root))
        .route(&format!("{WELL_KNOWN}/mcp/{{source}}"), get(mcp))
        .route(&format!("{WELL_KNOWN}/sse/{{source}}"), get(sse))
}

async fn root(State(state): State<Arc<RelayState>>) -> Response {
    document(&state, "")
}

async fn mcp(State(state): State<Arc<RelayState>>, Path(source): Path<String>) -> Response {
    if validate_source_name(&source).is_err() {
        return AgentError::NotFound.into_response();
    }
    document(&state, &Resource::Mcp(&source).path())
}

async fn sse(State(state): State<Arc<RelayState>>, Path(source): Path<String>) -> Response {
    if validate_source_name(&source).is_err() {
        return AgentError::NotFound.into_response();
    }
    document(&state, &Resource::Sse(&source).path())
}

/// The metadata of the resource at `path` under the public URL.
fn document(state: &RelayState, path: &str) -> Response {
    let governance = state.governance();
    let jwt = governance.keyring.jwt();
    let Some(public_url) = jwt.public_url() else {
        return AgentError::NotFound.into_response();
    };
    let body = json!({
        "resource": format!("{public_url}{path}"),
        "authorization_servers": jwt.issuers(),
        "scopes_supported": jwt.scopes(),
        "bearer_methods_supported": ["header"],
    });
    let mut response = json_response(StatusCode::OK, body.to_string().into());
    // Public metadata: browser-based clients read it cross-origin.
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}
