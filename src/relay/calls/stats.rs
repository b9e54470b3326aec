//! Per (tenant, source, tool) counts and a window of recent latencies, bounded in keys and in
//! samples.

use std::collections::{BTreeSet, HashMap};

use super::activity::{LATENCY_WINDOW, MAX_STATS_KEYS};
use crate::govern::audit::{Outcome, Record, Verdict};

/// Counts and recent latencies of one (tenant, source, tool).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct ToolStats {
    /// Calls seen.
    pub calls: u64,
    /// Calls policy denied.
    pub denied: u64,
    /// Allowed calls that did not end well: a JSON-RPC error, an `isError` result, a tunnel
    /// error, a timeout, or an agent gone before the answer.
    pub errors: u64,
    /// Latencies of the latest allowed calls (denied ones never reach a server and would only
    /// pull the percentiles down), microseconds, as a ring.
    window: Vec<u32>,
    next: usize,
}

impl ToolStats {
    fn add(&mut self, record: &Record) {
        self.calls += 1;
        match record.decision {
            Verdict::Deny => self.denied += 1,
            Verdict::Allow => {
                if record.outcome != Outcome::Ok {
                    self.errors += 1;
                }
                // Saturates at 71 minutes: longer calls all count as the longest.
                let us = u32::try_from(record.latency_us).unwrap_or(u32::MAX);
                if self.window.len() < LATENCY_WINDOW {
                    self.window.push(us);
                } else {
                    self.window[self.next] = us;
                    self.next = (self.next + 1) % LATENCY_WINDOW;
                }
            }
        }
    }

    /// The latency window, in no particular order.
    pub(super) fn latencies(&self) -> &[u32] {
        &self.window
    }
}

/// A copy of one key's state, taken under the lock and turned into a row outside it.
#[derive(Debug, Clone)]
pub(super) struct RawRow {
    pub tenant: String,
    pub source: String,
    pub tool: String,
    /// Whether this is the row of calls past [`MAX_STATS_KEYS`].
    pub overflow: bool,
    pub stats: ToolStats,
}

type ByTool = HashMap<Box<str>, ToolStats>;
type BySource = HashMap<Box<str>, ByTool>;

/// The counts of every key, and one overflow row once [`MAX_STATS_KEYS`] are in use.
#[derive(Default)]
pub(super) struct StatsTable {
    by_tenant: HashMap<Box<str>, BySource>,
    keys: usize,
    overflow: ToolStats,
}

impl StatsTable {
    /// Counts `record` under its tenant, source and tool or prompt name, or its method for
    /// anything else (`resources/read` of many URIs is one row: URIs are too many to count
    /// apart). Allocates only for a key not seen before.
    pub(super) fn add(&mut self, record: &Record) {
        let name = record
            .tool
            .as_deref()
            .or(record.prompt.as_deref())
            .unwrap_or(&record.method);
        self.slot(&record.tenant, &record.source, name).add(record);
    }

    fn slot(&mut self, tenant: &str, source: &str, name: &str) -> &mut ToolStats {
        let known = self
            .by_tenant
            .get(tenant)
            .and_then(|s| s.get(source))
            .is_some_and(|t| t.contains_key(name));
        if !known {
            if self.keys >= MAX_STATS_KEYS {
                return &mut self.overflow;
            }
            self.keys += 1;
            self.by_tenant
                .entry(tenant.into())
                .or_default()
                .entry(source.into())
                .or_default()
                .insert(name.into(), ToolStats::default());
        }
        self.by_tenant
            .get_mut(tenant)
            .and_then(|s| s.get_mut(source))
            .and_then(|t| t.get_mut(name))
            .expect("the key was found or inserted just above")
    }

    /// Every tenant with counts.
    pub(super) fn tenants(&self) -> BTreeSet<String> {
        self.by_tenant.keys().map(|t| t.to_string()).collect()
    }

    /// A copy of every key's state, and of the overflow row when it counted anything.
    pub(super) fn raw_rows(&self) -> Vec<RawRow> {
        let mut rows = Vec::with_capacity(self.keys + 1);
        for (tenant, sources) in &self.by_tenant {
            for (source, tools) in sources {
                for (tool, stats) in tools {
                    rows.push(RawRow {
                        tenant: tenant.to_string(),
                        source: source.to_string(),
                        tool: tool.to_string(),
                        overflow: false,
                        stats: stats.clone(),
                    });
                }
            }
        }
        if self.overflow.calls > 0 {
            rows.push(RawRow {
                tenant: String::new(),
                source: String::new(),
                tool: String::new(),
                overflow: true,
                stats: self.overflow.clone(),
            });
        }
        rows
    }
}

/// The nearest-rank percentile `p` (0 to 100) of `samples`, which it reorders; `None` for no
/// samples.
pub(super) fn percentile(samples: &mut [u32], p: u32) -> Option<u32> {
    if samples.is_empty() {
        return None;
    }
    let n = samples.len();
    // Nearest rank: the smallest value with at least p% of the samples at or below it.
    let rank = (n * p as usize).div_ceil(100).clamp(1, n);
    let (_, value, _) = samples.select_nth_unstable(rank - 1);
    Some(*value)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::govern::audit::{Direction, digest};

    pub(crate) fn record(tenant: &str, tool: &str, decision: Verdict, outcome: Outcome) -> Record {
        Record {
            time_ms: 1_764_000_000_000,
            tenant: tenant.into(),
            subject: "alice".into(),
            roles: Vec::new(),
            source: "db".into(),
            session: None,
            transport: Some("quic".into()),
            protocol_version: None,
            direction: Direction::AgentToServer,
            method: "tools/call".into(),
            request_id: Some("1".into()),
            tool: Some(tool.into()),
            resource: None,
            prompt: None,
            decision,
            rule: String::new(),
            outcome,
            latency_us: 1_000,
            bytes_in: 10,
            bytes_out: 10,
            args_sha256: digest(b"{}"),
            args: None,
            result: None,
            call: None,
        }
    }

    #[test]
    fn counts_calls_denials_and_errors() {
        let mut table = StatsTable::default();
        table.add(&record("acme", "q", Verdict::Allow, Outcome::Ok));
        table.add(&record("acme", "q", Verdict::Allow, Outcome::ToolError));
        table.add(&record("acme", "q", Verdict::Allow, Outcome::Error(-32603)));
        table.add(&record("acme", "q", Verdict::Deny, Outcome::Error(-32602)));
        table.add(&record("other", "q", Verdict::Allow, Outcome::Ok));
        let rows = table.raw_rows();
        let acme = rows.iter().find(|r| r.tenant == "acme").expect("acme row");
        assert_eq!(
            (acme.stats.calls, acme.stats.denied, acme.stats.errors),
            (4, 1, 2)
        );
        // Denied calls never reached a server: no latency sample.
        assert_eq!(acme.stats.latencies().len(), 3);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            table.tenants().into_iter().collect::<Vec<_>>(),
            ["acme", "other"]
        );
    }

    #[test]
    fn keys_and_windows_are_bounded() {
        let mut table = StatsTable::default();
        for i in 0..MAX_STATS_KEYS + 10 {
            table.add(&record(
                "acme",
                &format!("tool{i}"),
                Verdict::Allow,
                Outcome::Ok,
            ));
        }
        let rows = table.raw_rows();
        assert_eq!(rows.len(), MAX_STATS_KEYS + 1);
        let overflow = rows.iter().find(|r| r.overflow).expect("overflow row");
        assert_eq!(overflow.stats.calls, 10);
        for _ in 0..LATENCY_WINDOW * 2 + 3 {
            table.add(&record("acme", "tool0", Verdict::Allow, Outcome::Ok));
        }
        let rows = table.raw_rows();
        let tool0 = rows.iter().find(|r| r.tool == "tool0").expect("tool0 row");
        assert_eq!(tool0.stats.latencies().len(), LATENCY_WINDOW);
        assert_eq!(tool0.stats.calls, LATENCY_WINDOW as u64 * 2 + 4);
    }

    #[test]
    fn the_window_keeps_the_latest_latencies() {
        let mut stats = ToolStats::default();
        for us in 0..(LATENCY_WINDOW as u64 + 5) {
            let mut r = record("acme", "q", Verdict::Allow, Outcome::Ok);
            r.latency_us = us;
            stats.add(&r);
        }
        let mut window = stats.latencies().to_vec();
        window.sort_unstable();
        assert_eq!(window.first(), Some(&5));
        assert_eq!(window.last(), Some(&(LATENCY_WINDOW as u32 + 4)));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut samples, 50), Some(50));
        assert_eq!(percentile(&mut samples, 90), Some(90));
        assert_eq!(percentile(&mut samples, 99), Some(99));
        assert_eq!(percentile(&mut samples, 100), Some(100));
        assert_eq!(percentile(&mut [7], 99), Some(7));
        assert_eq!(percentile(&mut [], 50), None);
        let mut ten: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&mut ten, 99), Some(10));
        assert_eq!(percentile(&mut ten, 50), Some(5));
    }
}
