//! What a bench run measured: per-worker tallies merged into one [`Report`], printed as a table
//! or as one JSON object.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::client::Failure;

/// Highest latency the histogram tells apart: one hour, in microseconds. Slower calls are
/// recorded as this value (a request timeout ends every call long before it).
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant decimal digits of the histogram: 0.1% precision at every latency.
const SIGNIFICANT_DIGITS: u8 = 3;
/// Bytes in a megabyte, as MB/s is reported (decimal, like network speeds).
const MEGABYTE: f64 = 1_000_000.0;

/// One worker's tally (merged at the end, so workers never contend on it).
#[derive(Debug)]
pub struct Tally {
    /// Latency of successful calls, microseconds.
    latency: Histogram<u64>,
    /// Successful calls.
    ok: u64,
    /// Failed calls and failed session setups, by kind.
    errors: BTreeMap<String, u64>,
    /// Answer body bytes received.
    bytes: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
                .expect("1 <= 1 h in µs and 3 significant digits are valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            bytes: 0,
        }
    }
}

impl Tally {
    /// Records one finished call.
    pub fn call(&mut self, latency: Duration, bytes: u64, result: Result<(), Failure>) {
        self.bytes += bytes;
        match result {
            Ok(()) => {
                self.ok += 1;
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.latency.saturating_record(micros.max(1));
            }
            Err(failure) => self.error(failure.to_string()),
        }
    }

    /// Records one failure of session setup (`initialize`), apart from the calls.
    pub fn setup_error(&mut self, failure: Failure) {
        self.error(format!("initialize: {failure}"));
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    /// Adds `other` into this tally.
    pub fn merge(&mut self, other: Tally) {
        // Same bounds on both sides, so adding cannot fail; saturate rather than lose a run.
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `legacy` or `stateless`.
    pub era: &'static str,
    /// The tool called.
    pub tool: String,
    /// Sessions opened (session era) or 0 (stateless).
    pub sessions: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// `tools/call` requests that finished, successfully or not.
    pub calls: u64,
    /// Of those, successful ones (a result without `isError`).
    pub ok: u64,
    /// Failed calls plus failed session setups.
    pub errors: u64,
    /// The errors by kind: `http STATUS`, `jsonrpc CODE`, `isError`, `transport: ...`,
    /// `initialize: ...` for session setup.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Seconds from the first call to the last answer (session setup excluded).
    pub elapsed_secs: f64,
    /// Calls finished per second.
    pub calls_per_sec: f64,
    /// Latency percentiles and extremes of successful calls, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Answer body bytes received.
    pub response_bytes: u64,
    /// Answer bytes per second, in MB (10^6 bytes).
    pub mb_per_sec: f64,
}

/// The run's shape, for the report's header fields.
#[derive(Debug, Clone)]
pub struct Shape {
    /// `legacy` or `stateless`.
    pub era: &'static str,
    /// The tool called.
    pub tool: String,
    /// Sessions opened.
    pub sessions: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
}

impl Report {
    /// The report of `tally`, for calls that took `elapsed`.
    pub fn new(shape: Shape, tally: &Tally, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let ms = |micros: u64| micros as f64 / 1000.0;
        let failed_calls: u64 = tally
            .errors
            .iter()
            .filter(|(kind, _)| !kind.starts_with("initialize: "))
            .map(|(_, n)| n)
            .sum();
        let errors = tally.errors.values().sum();
        let calls = tally.ok + failed_calls;
        let h = &tally.latency;
        Self {
            era: shape.era,
            tool: shape.tool,
            sessions: shape.sessions,
            concurrency: shape.concurrency,
            calls,
            ok: tally.ok,
            errors,
            errors_by_kind: tally.errors.clone(),
            elapsed_secs: secs,
            calls_per_sec: per_sec(calls as f64),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            response_bytes: tally.bytes,
            mb_per_sec: per_sec(tally.bytes as f64) / MEGABYTE,
        }
    }
}

impl fmt::Display for Report {
    /// The human table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mcp-tunnel bench: {} era, tool {}, {} sessions, concurrency {}",
            self.era, self.tool, self.sessions, self.concurrency
        )?;
        writeln!(
            f,
            "  {:<12}{} ({} ok, {} errors) in {:.2} s",
            "calls", self.calls, self.ok, self.errors, self.elapsed_secs
        )?;
        writeln!(f, "  {:<12}{:.1}", "calls/s", self.calls_per_sec)?;
        writeln!(
            f,
            "  {:<12}p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   max {:.3} ms   mean {:.3} ms",
            "latency", self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.mean_ms
        )?;
        writeln!(
            f,
            "  {:<12}{:.2} MB/s ({} answer bytes)",
            "throughput", self.mb_per_sec, self.response_bytes
        )?;
        if self.errors_by_kind.is_empty() {
            writeln!(f, "  {:<12}none", "errors")?;
        } else {
            writeln!(f, "  errors")?;
            for (kind, n) in &self.errors_by_kind {
                writeln!(f, "    {kind:<36}{n}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_reports() {
        let mut a = Tally::default();
        a.call(Duration::from_millis(1), 100, Ok(()));
        a.call(Duration::from_millis(3), 50, Err(Failure::Http(401)));
        let mut b = Tally::default();
        b.call(Duration::from_millis(2), 100, Ok(()));
        b.setup_error(Failure::Connect);
        a.merge(b);
        let shape = Shape {
            era: "legacy",
            tool: "echo".into(),
            sessions: 2,
            concurrency: 2,
        };
        let report = Report::new(shape, &a, Duration::from_secs(1));
        assert_eq!((report.calls, report.ok, report.errors), (3, 2, 2));
        assert_eq!(report.errors_by_kind["http 401"], 1);
        assert_eq!(report.errors_by_kind["initialize: transport: connect"], 1);
        assert!((report.max_ms - 2.0).abs() < 0.01, "{}", report.max_ms);
        assert!((report.mb_per_sec - 250e-6).abs() < 1e-9);
        assert!(report.to_string().contains("http 401"));
    }
}
