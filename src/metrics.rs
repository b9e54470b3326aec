//! Metric names, in one place, over the `metrics` facade.

/// Gauge: live tunnel connections, labelled by `transport`.
pub const TUNNELS: &str = "mcp_tunnel_connections";
/// Gauge: open exchange streams (sessions plus in-flight stateless requests).
pub const STREAMS_ACTIVE: &str = "mcp_tunnel_streams_active";
/// Gauge: live agent sessions.
pub const SESSIONS_ACTIVE: &str = "mcp_tunnel_sessions_active";
/// Counter: agent sessions this relay resumed from their sealed ids (opened on another relay
/// of the fleet, or before a restart).
pub const SESSIONS_RESUMED: &str = "mcp_tunnel_sessions_resumed_total";
/// Counter: answers this relay resumed for an agent by a replay from `connect` (the relay
/// that carried them died, or the agent resumed on another relay).
pub const ANSWERS_REPLAYED: &str = "mcp_tunnel_answers_replayed_total";
/// Counter: answers in flight whose tunnel stream ended while this relay lived, picked up on
/// a new stream to the same `connect`, which replayed the rest.
pub const ANSWERS_REATTACHED: &str = "mcp_tunnel_answers_reattached_total";
/// Counter: agent requests, labelled by `outcome`.
pub const REQUESTS: &str = "mcp_tunnel_requests_total";
/// Counter: server-to-agent messages dropped because no agent stream could take them.
pub const DROPPED_MESSAGES: &str = "mcp_tunnel_dropped_messages_total";

// Calls through the relay (src/relay/calls/call.rs), one count per JSON-RPC request in either
// direction. Resource URIs are never a label (unbounded); tools and prompts are, as servers
// offer a bounded set of them.

/// Counter: finished calls, labelled by `tenant`, `source`, `direction`, `method`, `tool` (the
/// tool or prompt name, empty otherwise), `decision` (`allow`, `deny`) and `outcome` (see
/// [`crate::govern::audit::Outcome::label`]).
pub const CALLS: &str = "mcp_tunnel_calls_total";
/// Histogram: call latency in seconds, from request received to answer released, labelled by
/// `tenant` and `source`.
pub const CALL_DURATION: &str = "mcp_tunnel_call_duration_seconds";
/// Counter: bytes of agent requests, labelled by `tenant` and `source`.
pub const CALL_BYTES_IN: &str = "mcp_tunnel_call_bytes_in_total";
/// Counter: bytes of answers released to agents, labelled by `tenant` and `source`.
pub const CALL_BYTES_OUT: &str = "mcp_tunnel_call_bytes_out_total";
/// Gauge, computed at scrape time from the live tunnels: each tunnel's round-trip estimate in
/// seconds, labelled by `tenant`, `tunnel` (its id) and `transport`.
pub const TUNNEL_RTT: &str = "mcp_tunnel_rtt_seconds";
/// Gauge, read at scrape time: tasks alive in the relay's async runtime. Steady growth under a
/// steady load is a leak (the soak run, `benches/soak.sh`, watches it).
pub const RUNTIME_TASKS: &str = "mcp_tunnel_runtime_tasks";

/// Gauge, written at scrape time: always 1, its `relay` label the instance id (`[fleet] id`,
/// else host name and tunnel port), so scrapes of a fleet's relays can be told apart and
/// joined with the other series by instance.
pub const RELAY_INFO: &str = "mcp_tunnel_relay_info";

/// Upper bounds of the call latency buckets, seconds: from a loopback echo (~0.3 ms) to a slow
/// tool near the default request timeout.
pub const CALL_DURATION_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];

/// How often the exporter folds recorded histogram samples into their buckets, so memory stays
/// bounded even when nobody scrapes.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The process's Prometheus recorder, installed once: the `metrics` facade has one global
/// recorder per process, so every relay in a process (tests run several) renders from the same
/// handle. `None` when another recorder was installed first.
pub fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(CALL_DURATION.into()),
                    CALL_DURATION_BUCKETS,
                );
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "Prometheus recorder not installed; /metrics stays empty");
                    None
                }
            }
        })
        .as_ref()
}
/// Histogram: seconds from an audit append to its row committed (queue wait included).
pub const AUDIT_WRITE_SECONDS: &str = "mcp_tunnel_audit_write_seconds";
/// Gauge: audit records queued for the writer.
pub const AUDIT_QUEUE_DEPTH: &str = "mcp_tunnel_audit_queue_depth";
/// Histogram: audit rows per commit (group commit batch size).
pub const AUDIT_BATCH_ROWS: &str = "mcp_tunnel_audit_batch_rows";
/// Gauge: audit rows in the local spool not yet shipped to the `[audit] url` database.
pub const AUDIT_SPOOL_ROWS: &str = "mcp_tunnel_audit_spool_rows";
/// Gauge: seconds since the oldest unshipped spool row's call arrived (0 when all are shipped).
pub const AUDIT_SPOOL_AGE_SECONDS: &str = "mcp_tunnel_audit_spool_age_seconds";
/// Counter: audit rows shipped to the database (new there; a re-shipped row is not counted).
pub const AUDIT_SHIPPED: &str = "mcp_tunnel_audit_shipped_total";
/// Histogram: audit rows per database transaction (the database's group commit).
pub const AUDIT_SHIP_BATCH_ROWS: &str = "mcp_tunnel_audit_ship_batch_rows";
/// Gauge: 1 while the audit database answers the shipper, 0 while it does not.
pub const AUDIT_DATABASE_UP: &str = "mcp_tunnel_audit_database_up";
/// Counter: signed audit checkpoints that could not be appended to `[audit] checkpoint_file`
/// (the off-box copy); the trail itself has them.
pub const AUDIT_CHECKPOINT_FILE_ERRORS: &str = "mcp_tunnel_audit_checkpoint_file_errors_total";

/// Counter: tunnels that announced a source already announced under another tunnel token of
/// the same tenant (each logged as a warning naming both tokens and the one serving).
pub const SOURCE_CONFLICTS: &str = "mcp_tunnel_source_token_conflicts_total";

// Listener and tunnel admission bounds (`[limits]`, src/relay/http_server.rs and
// src/relay/tunnel/accept.rs).

/// Counter: tunnel connections refused because `max_tunnel_handshakes` were in progress.
pub const TUNNEL_HANDSHAKES_REFUSED: &str = "mcp_tunnel_handshakes_refused_total";
/// Gauge: open HTTP connections, labelled by `listener` (`agents`, `admin`).
pub const HTTP_CONNECTIONS: &str = "mcp_tunnel_http_connections";
/// Counter: HTTP connections closed by the relay for a timeout, labelled by `listener` and
/// `reason` (`idle`, `header`).
pub const HTTP_CONNECTIONS_TIMED_OUT: &str = "mcp_tunnel_http_connections_timed_out_total";
