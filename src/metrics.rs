//! Metric names, in one place, over the `metrics` facade.

/// Gauge: live tunnel connections, labelled by `transport`.
pub const TUNNELS: &str = "mcp_tunnel_connections";
/// Gauge: open exchange streams (sessions plus in-flight stateless requests).
pub const STREAMS_ACTIVE: &str = "mcp_tunnel_streams_active";
/// Gauge: live agent sessions.
pub const SESSIONS_ACTIVE: &str = "mcp_tunnel_sessions_active";
/// Counter: agent requests, labelled by `outcome`.
pub const REQUESTS: &str = "mcp_tunnel_requests_total";
/// Counter: server-to-agent messages dropped because no agent stream could take them.
pub const DROPPED_MESSAGES: &str = "mcp_tunnel_dropped_messages_total";
/// Histogram: seconds from an audit append to its row committed (queue wait included).
pub const AUDIT_WRITE_SECONDS: &str = "mcp_tunnel_audit_write_seconds";
/// Gauge: audit records queued for the writer.
pub const AUDIT_QUEUE_DEPTH: &str = "mcp_tunnel_audit_queue_depth";
/// Histogram: audit rows per commit (group commit batch size).
pub const AUDIT_BATCH_ROWS: &str = "mcp_tunnel_audit_batch_rows";
