//! The admin endpoints over the relay's own state: `/healthz`, `/api/tunnels`, and the live
//! activity page (`/activity`, its assets and event stream, `/api/activity`).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::RelayState;
use super::activity::http as activity;
use super::registry::TunnelRow;

/// Routes of the admin listener.
pub fn routes() -> Router<Arc<RelayState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
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
