//! The agent-facing HTTP side: MCP's Streamable HTTP endpoint in both eras
//! ([`streamable`]) and the older HTTP+SSE one ([`legacy_sse`]), OAuth protected-resource
//! metadata ([`oauth`]); the admission every request passes ([`admission`]); answers as JSON or
//! SSE ([`answer`]); and every relay-made error in one place ([`reply`]).

mod admission;
mod answer;
mod legacy_sse;
mod oauth;
mod replay;
mod reply;
mod resume;
mod streamable;
mod unread_body;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;

use crate::relay::state::RelayState;
use reply::AgentError;

/// The agent listener's routes, with their middleware: failed authentication limited per
/// address, the rest of an unread body read before the answer goes out, and (outermost)
/// `Connection: close` on every answer while the relay is unready.
pub(super) fn app(state: Arc<RelayState>) -> Router {
    streamable::routes()
        .merge(legacy_sse::routes())
        .merge(oauth::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_auth_failures,
        ))
        // Outermost: whatever answered early, the rest of the body is read before the
        // answer goes out, so clients still sending can read it.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            unread_body::discard_unread_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            close_while_unready,
        ))
        .with_state(state)
}

/// While the relay is unready (told to stop, still serving for its drain delay), every
/// HTTP/1.x answer carries `Connection: close`: the agent's next request opens a new
/// connection, which the load balancer sends to a relay that is staying. (HTTP/2 has no such
/// header; its connections get a GOAWAY when the relay drains.)
async fn close_while_unready(
    axum::extract::State(state): axum::extract::State<Arc<RelayState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let http1 = request.version() < axum::http::Version::HTTP_2;
    let mut response = next.run(request).await;
    if http1 && state.unready.is_cancelled() {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Limits failed authentication per remote address: an address out of attempts gets `429`
/// with `Retry-After` before its request is looked at; every `401` answered counts one failure.
/// Also refreshes a fetched JWKS before a token naming an unknown key is checked.
async fn limit_auth_failures(
    axum::extract::State(state): axum::extract::State<Arc<RelayState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let governance = state.governance();
    if let Err(limited) = governance
        .limiter
        .auth_allowed(peer.ip(), std::time::Instant::now())
    {
        tracing::info!(peer = %peer.ip(), ?limited, "authentication attempts limited");
        metrics::counter!(crate::metrics::REQUESTS, "outcome" => "rate_limited").increment(1);
        return AgentError::RateLimited(limited).into_response();
    }
    // A JWT naming a key its provider's fetched JWKS lacks waits here (the gate itself is
    // synchronous) for the JWKS to be fetched again, as the on-demand rate allows.
    if let Some(token) = admission::bearer_jwt(request.headers()) {
        governance.keyring.jwt().refresh_for(token).await;
    }
    let response = next.run(request).await;
    if response.status() == axum::http::StatusCode::UNAUTHORIZED {
        governance
            .limiter
            .auth_failed(peer.ip(), std::time::Instant::now());
    }
    response
}
