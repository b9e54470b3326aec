//! The admin endpoints over the relay's own state: `/healthz`, `/api/tunnels`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::RelayState;
use super::registry::TunnelRow;

/// Routes of the admin listener.
pub fn routes() -> Router<Arc<RelayState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/tunnels", get(tunnels))
}

async fn tunnels(State(state): State<Arc<RelayState>>) -> Json<Vec<TunnelRow>> {
    Json(state.registry.rows())
}
