//! The admin endpoints over the relay's own state: `/healthz`, `/metrics`, `/api/tunnels`, and
//! the live activity page (`/activity`, its assets and event stream, `/api/activity`).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::RelayState;
use super::activity::http as activity;
use super::registry::TunnelRow;

/// The Prometheus text exposition format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Routes of the admin listener.
pub fn routes() -> Router<Arc<RelayState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/tunnels", get(tunnels))
        .route("/activity", get(activity::page))
        .route("/activity/page.css", get(activity::stylesheet))
        .route("/activity/page.js", get(activity::script))
        .route("/activity/events", get(activity::events))
        .route("/api/activity", get(activity::api))
}

async fn tunnels(State(state): State<Arc<RelayState>>) -> Json<Vec<TunnelRow>> {
    Json(state.registry.rows())
}

/// Everything the `metrics` facade recorded in this process, then the live tunnels' round-trip
/// times (computed now, so a tunnel that is gone leaves no stale series).
async fn metrics(State(state): State<Arc<RelayState>>) -> Response {
    let mut text = crate::metrics::prometheus()
        .map(|handle| handle.render())
        .unwrap_or_default();
    let rows = state.registry.rows();
    if !rows.is_empty() {
        let name = crate::metrics::TUNNEL_RTT;
        let _ = writeln!(
            text,
            "# HELP {name} Round-trip time estimate of each live tunnel, seconds."
        );
        let _ = writeln!(text, "# TYPE {name} gauge");
        let mut seen = std::collections::HashSet::new();
        // One row per (tunnel, source): one series per tunnel.
        for row in rows.iter().filter(|row| seen.insert(row.id)) {
            let _ = writeln!(
                text,
                "{name}{{tenant=\"{}\",tunnel=\"{}\",transport=\"{}\"}} {}",
                escape_label(&row.tenant),
                row.id,
                row.transport,
                row.rtt_ms / 1000.0
            );
        }
    }
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_TEXT),
    );
    response
}

/// A label value as the exposition format wants it: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
