//! The metrics of finished calls, with each label set's handles kept.
//!
//! Going through the `metrics` macros for every finished call builds the labels (seven owned
//! strings for [`names::CALLS`], two more for each of the other three series) and hashes them
//! in the recorder's registry, four times: about 7% of the relay's instructions per call in a
//! callgrind profile at concurrency 1. [`CallMetrics`] keeps the four handles of every label
//! set it has seen, so a finished call costs one hash of its labels, borrowed, and four atomic
//! updates. The kept sets are bounded ([`MAX_SERIES`]); past the bound a call's metrics go
//! through the macros as before, so nothing is lost.

use std::hash::Hash;

use hashbrown::{Equivalent, HashMap};
use metrics::{Counter, Histogram};
use parking_lot::Mutex;

use super::metric_names::{self, MetricNames};
use crate::govern::audit::Record;
use crate::metrics as names;

/// Label sets whose handles are kept. Tenants times sources times tools times outcomes: a few
/// hundred on a busy relay; the bound only matters when tool names are made up by agents (a
/// denied call to a tool that does not exist still counts).
pub(super) const MAX_SERIES: usize = 4096;

/// The labels of one finished call, borrowed from its record.
#[derive(Hash)]
struct Labels<'a> {
    tenant: &'a str,
    source: &'a str,
    direction: &'static str,
    method: &'a str,
    tool: &'a str,
    decision: &'static str,
    outcome: &'static str,
}

/// [`Labels`], owned, as a key of the kept handles. Hashes as [`Labels`] does (same fields,
/// same order; `String` hashes as `&str`).
#[derive(Hash, PartialEq, Eq)]
struct OwnedLabels {
    tenant: String,
    source: String,
    direction: &'static str,
    method: String,
    tool: String,
    decision: &'static str,
    outcome: &'static str,
}

impl Equivalent<OwnedLabels> for Labels<'_> {
    fn equivalent(&self, key: &OwnedLabels) -> bool {
        self.tenant == key.tenant
            && self.source == key.source
            && self.direction == key.direction
            && self.method == key.method
            && self.tool == key.tool
            && self.decision == key.decision
            && self.outcome == key.outcome
    }
}

impl<'a> Labels<'a> {
    /// The labels of `record`: its source, method and tool or prompt only as far as `names`
    /// knows them (the rest is [`metric_names::OTHER`]), so agents cannot add series at will.
    fn of(record: &'a Record, names: &MetricNames) -> Self {
        let tool = record
            .tool
            .as_deref()
            .or(record.prompt.as_deref())
            .unwrap_or_default();
        Labels {
            tenant: &record.tenant,
            source: names.source_label(&record.tenant, &record.source),
            direction: record.direction.label(),
            method: metric_names::method_label(&record.method),
            tool: names.name_label(&record.tenant, &record.source, tool),
            decision: record.decision.label(),
            outcome: record.outcome.label(),
        }
    }

    fn to_owned(&self) -> OwnedLabels {
        OwnedLabels {
            tenant: self.tenant.to_owned(),
            source: self.source.to_owned(),
            direction: self.direction,
            method: self.method.to_owned(),
            tool: self.tool.to_owned(),
            decision: self.decision,
            outcome: self.outcome,
        }
    }

    /// The four series' handles, from the recorder.
    fn register(&self) -> Series {
        let calls = metrics::counter!(
            names::CALLS,
            "tenant" => self.tenant.to_owned(),
            "source" => self.source.to_owned(),
            "direction" => self.direction,
            "method" => self.method.to_owned(),
            "tool" => self.tool.to_owned(),
            "decision" => self.decision,
            "outcome" => self.outcome,
        );
        let labels = [
            ("tenant", self.tenant.to_owned()),
            ("source", self.source.to_owned()),
        ];
        Series {
            calls,
            duration: metrics::histogram!(names::CALL_DURATION, &labels),
            bytes_in: metrics::counter!(names::CALL_BYTES_IN, &labels),
            bytes_out: metrics::counter!(names::CALL_BYTES_OUT, &labels),
        }
    }
}

/// The handles one label set updates.
struct Series {
    calls: Counter,
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl Series {
    fn record(&self, record: &Record) {
        self.calls.increment(1);
        self.duration.record(record.latency_us as f64 / 1e6);
        self.bytes_in.increment(record.bytes_in);
        self.bytes_out.increment(record.bytes_out);
    }
}

/// Counts finished calls in [`names::CALLS`], [`names::CALL_DURATION`],
/// [`names::CALL_BYTES_IN`] and [`names::CALL_BYTES_OUT`]; one per relay.
pub(super) struct CallMetrics {
    kept: Mutex<HashMap<OwnedLabels, Series>>,
    limit: usize,
    /// What may be a label value.
    names: MetricNames,
}

impl Default for CallMetrics {
    fn default() -> Self {
        Self::new(MAX_SERIES)
    }
}

impl CallMetrics {
    /// Keeping the handles of at most `limit` label sets.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            kept: Mutex::default(),
            limit,
            names: MetricNames::default(),
        }
    }

    /// The names labels may take.
    pub(super) fn names(&self) -> &MetricNames {
        &self.names
    }

    /// Counts `record`, a finished call.
    pub(super) fn record(&self, record: &Record) {
        let labels = Labels::of(record, &self.names);
        {
            // Updated under the lock: four atomic adds, no handle cloned per call.
            let mut kept = self.kept.lock();
            if let Some(series) = kept.get(&labels) {
                series.record(record);
                return;
            }
            if kept.len() < self.limit {
                let series = labels.register();
                series.record(record);
                kept.insert(labels.to_owned(), series);
                return;
            }
        }
        labels.register().record(record);
    }

    /// How many label sets have their handles kept.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.kept.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::govern::audit::{Outcome, Verdict};

    fn record(tool: &str, outcome: Outcome) -> Record {
        crate::relay::calls::stats::tests::record("acme", tool, Verdict::Allow, outcome)
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn kept_and_unkept_series_count_the_same() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let calls = CallMetrics::new(1);
        calls
            .names()
            .learn_names("acme", "db", ["echo", "add"].into_iter());
        metrics::with_local_recorder(&recorder, || {
            calls.record(&record("echo", Outcome::Ok));
            calls.record(&record("echo", Outcome::Ok));
            // Over the limit of one kept label set: counted through the macros.
            calls.record(&record("add", Outcome::Ok));
            calls.record(&record("add", Outcome::Ok));
            calls.record(&record("echo", Outcome::ToolError));
        });
        assert_eq!(calls.kept(), 1);
        let text = handle.render();
        let count = |tool: &str, outcome: &str| {
            let prefix = format!(
                "mcp_tunnel_calls_total{{tenant=\"acme\",source=\"db\",direction=\"agent_to_server\",method=\"tools/call\",tool=\"{tool}\",decision=\"allow\",outcome=\"{outcome}\"}}"
            );
            line(&text, &prefix).map(|l| l[prefix.len()..].trim().to_owned())
        };
        assert_eq!(count("echo", "ok").as_deref(), Some("2"), "{text}");
        assert_eq!(count("add", "ok").as_deref(), Some("2"), "{text}");
        assert_eq!(count("echo", "tool_error").as_deref(), Some("1"), "{text}");
        let bytes = line(
            &text,
            "mcp_tunnel_call_bytes_out_total{tenant=\"acme\",source=\"db\"}",
        );
        assert!(bytes.is_some_and(|l| l.ends_with(" 50")), "{text}");
        let durations = line(
            &text,
            "mcp_tunnel_call_duration_seconds_count{tenant=\"acme\",source=\"db\"}",
        );
        assert!(durations.is_some_and(|l| l.ends_with(" 5")), "{text}");
    }

    #[test]
    fn borrowed_labels_find_their_owned_key() {
        let names = MetricNames::default();
        names.learn_names("acme", "db", ["echo", "add"].into_iter());
        let r = record("echo", Outcome::Ok);
        let labels = Labels::of(&r, &names);
        let mut map = HashMap::new();
        map.insert(labels.to_owned(), ());
        assert!(map.get(&Labels::of(&r, &names)).is_some());
        assert!(
            map.get(&Labels::of(&record("add", Outcome::Ok), &names))
                .is_none()
        );
    }
}
