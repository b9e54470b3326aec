//! The rows the activity feed is read as: one per call (who, what, how it ended) and one per
//! (tenant, source, tool) with its counts and latency percentiles.

use serde::Serialize;

use super::stats::{RawRow, percentile};
use crate::govern::audit::{Outcome, Record, Verdict};

/// One call as the page shows it: who, what, how it ended. Arguments and results stay out:
/// this page is for watching traffic, the audit trail is for reading it.
#[derive(Debug, Clone, Serialize)]
pub struct CallRow {
    /// When the relay received it, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Tenant.
    pub tenant: String,
    /// Caller.
    pub subject: String,
    /// Source addressed.
    pub source: String,
    /// JSON-RPC method.
    pub method: String,
    /// Tool, resource or prompt, if any.
    pub target: Option<String>,
    /// `agent_to_server` or `server_to_agent`.
    pub direction: &'static str,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The rule that decided.
    pub rule: String,
    /// `ok`, `error`, `tool_error`, `tunnel_error`, `timeout`, `abandoned` or `moved`.
    pub outcome: &'static str,
    /// The JSON-RPC error code, for `error`.
    pub code: Option<i64>,
    /// Latency, microseconds.
    pub latency_us: u64,
    /// Tunnel transport, when it reached one.
    pub transport: Option<String>,
}

impl From<&Record> for CallRow {
    fn from(r: &Record) -> Self {
        Self {
            time_ms: r.time_ms,
            tenant: r.tenant.clone(),
            subject: r.subject.clone(),
            source: r.source.clone(),
            method: r.method.clone(),
            target: r.target().map(str::to_owned),
            direction: match r.direction {
                crate::govern::audit::Direction::AgentToServer => "agent_to_server",
                crate::govern::audit::Direction::ServerToAgent => "server_to_agent",
            },
            decision: match r.decision {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            },
            rule: r.rule.clone(),
            outcome: r.outcome.label(),
            code: match r.outcome {
                Outcome::Error(code) => Some(code),
                _ => None,
            },
            latency_us: r.latency_us,
            transport: r.transport.clone(),
        }
    }
}

/// Counts and latency percentiles of one (tenant, source, tool).
#[derive(Debug, Clone, Serialize)]
pub struct ToolRow {
    /// Tenant (empty for the overflow row).
    pub tenant: String,
    /// Source (empty for the overflow row).
    pub source: String,
    /// Tool or prompt name, or the method of other requests (empty for the overflow row).
    pub tool: String,
    /// Whether this row counts the calls past the table's bound, of any key.
    pub overflow: bool,
    /// Calls.
    pub calls: u64,
    /// Denied calls.
    pub denied: u64,
    /// Allowed calls that ended in an error of any kind.
    pub errors: u64,
    /// Latency percentiles over the recent allowed calls, milliseconds.
    pub p50_ms: Option<f64>,
    /// See `p50_ms`.
    pub p90_ms: Option<f64>,
    /// See `p50_ms`.
    pub p99_ms: Option<f64>,
    /// How many recent latencies the percentiles are over.
    pub window: usize,
}

impl From<RawRow> for ToolRow {
    fn from(raw: RawRow) -> Self {
        let mut window = raw.stats.latencies().to_vec();
        let mut ms = |p| percentile(&mut window, p).map(|us| f64::from(us) / 1000.0);
        let (p50_ms, p90_ms, p99_ms) = (ms(50), ms(90), ms(99));
        Self {
            tenant: raw.tenant,
            source: raw.source,
            tool: raw.tool,
            overflow: raw.overflow,
            calls: raw.stats.calls,
            denied: raw.stats.denied,
            errors: raw.stats.errors,
            p50_ms,
            p90_ms,
            p99_ms,
            window: window.len(),
        }
    }
}
