//! The admin endpoints over the relay's own state: `/healthz`, `/metrics`, `/api/tunnels`, and
//! the live activity page (`/activity`, its assets and event stream, `/api/activity`).
//!
//! They show who calls what, so a web page must not read them: every request must name the
//! admin listener by a loopback name, an IP address or one of `[agents] allowed_hosts` (a page
//! whose DNS name was rebound to the admin address sends its own name), and a browser `Origin`
//! must be the admin's own.

mod activity;
mod view;

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::Request;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::relay::state::RelayState;
use crate::relay::tunnel::TunnelRow;

/// The Prometheus text exposition format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Routes of the admin listener.
pub(super) fn routes(state: Arc<RelayState>) -> Router<Arc<RelayState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/tunnels", get(tunnels))
        .route("/activity", get(activity::page))
        .route("/activity/page.css", get(activity::stylesheet))
        .route("/activity/page.js", get(activity::script))
        .route("/activity/events", get(activity::events))
        .route("/api/activity", get(activity::api))
        .route_layer(middleware::from_fn_with_state(state, same_host_only))
        // Health checks come from load balancers under any name, and say nothing.
        .route("/healthz", get(healthz))
}

/// `GET /healthz`: `200 ok` while the relay serves; `503 draining` from the moment it is told
/// to stop, so a load balancer moves new requests to other relays while this one still
/// serves them; and `503 starting` while a relay of a fleet has just started and no tunnel has
/// registered yet (see [`crate::relay::STARTUP_WINDOW`]), so a load balancer sends it nothing
/// it could not route.
async fn healthz(State(state): State<Arc<RelayState>>) -> Response {
    if state.unready.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if state.starting.is_starting() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

/// Refuses requests whose `Host` is a DNS name the relay was not told about, or whose `Origin`
/// is another site (403): DNS rebinding and cross-site reads of the admin data.
async fn same_host_only(
    State(state): State<Arc<RelayState>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_ok = match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
    };
    if !origin_ok || !admin_host_allowed(&state.allowed_hosts, host) {
        return (StatusCode::FORBIDDEN, "forbidden host or origin\n").into_response();
    }
    next.run(request).await
}

/// Whether `host` (a `Host` header) may address the admin listener: a loopback name, an IP
/// literal, or a configured agent host name.
fn admin_host_allowed(allowed_hosts: &[String], host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let literal = name.trim_start_matches('[').trim_end_matches(']');
    host.is_empty()
        || name.eq_ignore_ascii_case("localhost")
        || literal.parse::<std::net::IpAddr>().is_ok()
        || host.parse::<std::net::IpAddr>().is_ok()
        || allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host) || allowed.eq_ignore_ascii_case(name))
}

/// A `/api/tunnels` row: the tunnel's fields and the relay instance that holds it (behind a
/// load balancer, each relay of a fleet lists only its own tunnels).
#[derive(serde::Serialize)]
struct InstanceRow<'a> {
    relay: &'a str,
    #[serde(flatten)]
    tunnel: TunnelRow,
}

async fn tunnels(State(state): State<Arc<RelayState>>) -> Response {
    let rows: Vec<InstanceRow<'_>> = state
        .registry
        .rows()
        .into_iter()
        .map(|tunnel| InstanceRow {
            relay: &state.instance,
            tunnel,
        })
        .collect();
    Json(rows).into_response()
}

/// Everything the `metrics` facade recorded in this process, then this relay's instance id
/// (`mcp_tunnel_relay_info`; the recorder is the process's, shared by every relay in it, so
/// the id is written here rather than as a global label), the live tunnels' round-trip times
/// (computed now, so a tunnel that is gone leaves no stale series) and the runtime's live task
/// count.
async fn metrics(State(state): State<Arc<RelayState>>) -> Response {
    let mut text = crate::metrics::prometheus()
        .map(|handle| handle.render())
        .unwrap_or_default();
    let name = crate::metrics::RELAY_INFO;
    let _ = writeln!(
        text,
        "# HELP {name} This relay instance (`[fleet] id`, else host name and tunnel port); always 1.\n\
         # TYPE {name} gauge\n{name}{{relay=\"{}\"}} 1",
        escape_label(&state.instance)
    );
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
    let name = crate::metrics::RUNTIME_TASKS;
    let _ = writeln!(
        text,
        "# HELP {name} Tasks alive in the relay's async runtime.\n# TYPE {name} gauge\n{name} {}",
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    );
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

#[cfg(test)]
mod tests {
    use super::admin_host_allowed;

    #[test]
    fn only_loopback_names_ip_literals_and_configured_hosts_reach_admin() {
        let configured = ["admin.internal".to_owned()];
        for host in [
            "",
            "localhost",
            "localhost:9090",
            "127.0.0.1:9090",
            "10.1.2.3",
            "[::1]:9090",
            "::1",
            "admin.internal:9090",
        ] {
            assert!(admin_host_allowed(&configured, host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9090",
            "127.0.0.1.evil.example",
        ] {
            assert!(!admin_host_allowed(&configured, host), "{host}");
        }
    }
}
