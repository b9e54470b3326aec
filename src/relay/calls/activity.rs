//! The live activity view: what the relay is doing now, for the admin `/activity` page.
//!
//! [`Activity`] keeps bounded state in memory: the latest calls (a ring of [`LATEST_CALLS`]),
//! per tenant, source and tool counts (calls, denied, errors) with a window of recent
//! latencies for percentiles, and a broadcast to live viewers. The relay hands it one
//! [`Record`] per finished call through [`Activity::push`], which is cheap enough for every
//! call: one short lock, no await, and the broadcast never waits for a slow viewer (a viewer
//! that falls behind is sent a fresh snapshot instead). This is a view, not the audit trail:
//! nothing here survives a restart.
//!
//! The admin listener serves it (`admin::activity`), with the relay's tunnels and sessions
//! beside it (`admin::view`).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::broadcast;

use super::rows::{CallRow, ToolRow};
use super::stats::StatsTable;
use crate::govern::audit::Record;

/// How many of the latest calls are kept: a screenful many times over, and at a few hundred
/// bytes a record, well under a megabyte.
pub(crate) const LATEST_CALLS: usize = 500;

/// How many recent latencies per (tenant, source, tool) the percentiles are computed over:
/// enough for a stable p99 (ten samples above it), 4 KB a key.
pub const LATENCY_WINDOW: usize = 1_000;

/// How many (tenant, source, tool) keys get their own counts. Tool names come from agents, so
/// the table must be bounded; calls under further keys are counted in one overflow row.
pub const MAX_STATS_KEYS: usize = 2_000;

/// Calls buffered per live viewer. A viewer further behind than this gets a fresh snapshot
/// instead of the calls it missed; the relay never waits for it.
pub(crate) const BROADCAST_CAPACITY: usize = 1_024;

/// Live viewers (event streams) at once: each costs a refresh a second.
pub(crate) const MAX_VIEWERS: usize = 32;

/// The longest name kept (tenant, subject, source, tool, rule, ...), bytes: names come from the
/// network, and the ring, the counts table and the viewers' buffers must stay bounded.
pub(crate) const MAX_NAME: usize = 256;

/// Roles kept per call (the page does not show them; the audit trail keeps them all).
const MAX_ROLES: usize = 16;

/// How long computed per-tool rows are reused, so that many viewers refreshing at once sort
/// the latency windows once.
const TOOL_ROWS_MAX_AGE: Duration = Duration::from_millis(250);

/// The relay's live activity: latest calls, per-tool counts and latencies, live viewers.
pub struct Activity {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<Record>>,
    viewers: AtomicUsize,
    tool_rows: Mutex<Option<(Instant, Arc<[ToolRow]>)>>,
}

struct Inner {
    latest: VecDeque<Arc<Record>>,
    stats: StatsTable,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                latest: VecDeque::with_capacity(LATEST_CALLS),
                stats: StatsTable::default(),
            }),
            live: broadcast::channel(BROADCAST_CAPACITY).0,
            viewers: AtomicUsize::new(0),
            tool_rows: Mutex::new(None),
        }
    }
}

impl Activity {
    /// Takes in one finished call: it joins the latest calls and the counts, and goes out to
    /// the live viewers. Called by the relay on every call: one short lock, no await.
    pub fn push(&self, record: Arc<Record>) {
        let record = slim(record);
        {
            let mut inner = self.lock();
            if inner.latest.len() == LATEST_CALLS {
                inner.latest.pop_front();
            }
            inner.latest.push_back(record.clone());
            inner.stats.add(&record);
        }
        // No viewer is not an error; a slow viewer lags and resynchronises.
        let _ = self.live.send(record);
    }

    /// [`Activity::push`] of a copy of `record`, made without its arguments and results (the
    /// feed would drop them anyway): for a caller that keeps its record.
    pub fn push_record(&self, record: &Record) {
        let copy = if fits(record) {
            record.clone()
        } else {
            slimmed(record)
        };
        self.push(Arc::new(copy));
    }

    /// A receiver of every call pushed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.live.subscribe()
    }

    /// Counts one more live viewer; `false` when [`MAX_VIEWERS`] are watching already. Each
    /// `true` must be matched by one [`Activity::remove_viewer`].
    pub(crate) fn add_viewer(&self) -> bool {
        self.viewers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_VIEWERS).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts one viewer fewer.
    pub(crate) fn remove_viewer(&self) {
        self.viewers.fetch_sub(1, Ordering::AcqRel);
    }

    /// Live viewers now.
    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::Acquire)
    }

    /// The latest calls of `tenant` (all tenants when `None`), newest first.
    pub fn latest(&self, tenant: Option<&str>) -> Vec<CallRow> {
        let records: Vec<Arc<Record>> = {
            let inner = self.lock();
            inner
                .latest
                .iter()
                .rev()
                .filter(|r| tenant.is_none_or(|t| *r.tenant == *t))
                .cloned()
                .collect()
        };
        records.iter().map(|r| CallRow::from(r.as_ref())).collect()
    }

    /// Per (tenant, source, tool) counts and latency percentiles of `tenant` (all tenants, and
    /// the overflow row, when `None`), sorted by tenant, source and tool.
    pub fn tools(&self, tenant: Option<&str>) -> Vec<ToolRow> {
        let rows = self.all_tool_rows();
        rows.iter()
            .filter(|row| match tenant {
                None => true,
                Some(t) => row.tenant == t && !row.overflow,
            })
            .cloned()
            .collect()
    }

    /// Every tenant seen in a call so far (bounded with the counts table).
    pub fn tenants(&self) -> BTreeSet<String> {
        self.lock().stats.tenants()
    }

    fn all_tool_rows(&self) -> Arc<[ToolRow]> {
        let mut cache = self.tool_rows.lock();
        if let Some((at, rows)) = cache.as_ref()
            && at.elapsed() < TOOL_ROWS_MAX_AGE
        {
            return rows.clone();
        }
        // Copy the windows under the lock; sort them outside it, so `push` never waits on it.
        let raw = self.lock().stats.raw_rows();
        let mut rows: Vec<ToolRow> = raw.into_iter().map(ToolRow::from).collect();
        rows.sort_by(|a, b| {
            (a.overflow, &a.tenant, &a.source, &a.tool)
                .cmp(&(b.overflow, &b.tenant, &b.source, &b.tool))
        });
        let rows: Arc<[ToolRow]> = rows.into();
        *cache = Some((Instant::now(), rows.clone()));
        rows
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }
}

/// `record` as the feed keeps it: without arguments and results (kept only by the audit trail)
/// and with every name at most [`MAX_NAME`] bytes. Allocates only when something must go.
fn slim(record: Arc<Record>) -> Arc<Record> {
    if fits(&record) {
        record
    } else {
        Arc::new(slimmed(&record))
    }
}

/// Whether the feed can keep `r` as it is.
fn fits(r: &Record) -> bool {
    let long = |s: &str| s.len() > MAX_NAME;
    let long_opt = |s: &Option<String>| s.as_deref().is_some_and(long);
    r.args.is_none()
        && r.result.is_none()
        && r.roles.len() <= MAX_ROLES
        && !r.roles.iter().any(|role| long(role))
        && ![
            &r.tenant,
            &r.subject,
            &r.source,
            &r.method,
            &r.rule,
            &r.args_sha256,
        ]
        .into_iter()
        .any(|s| long(s))
        && ![
            &r.session,
            &r.transport,
            &r.protocol_version,
            &r.request_id,
            &r.tool,
            &r.resource,
            &r.prompt,
        ]
        .into_iter()
        .any(long_opt)
}

/// A copy of `r` without arguments and results, its names clipped to [`MAX_NAME`] bytes.
fn slimmed(r: &Record) -> Record {
    let clip_opt = |s: &Option<String>| s.as_deref().map(clip);
    Record {
        time_ms: r.time_ms,
        tenant: clip(&r.tenant),
        subject: clip(&r.subject),
        roles: r
            .roles
            .iter()
            .take(MAX_ROLES)
            .map(|role| clip(role))
            .collect(),
        source: clip(&r.source),
        session: clip_opt(&r.session),
        transport: clip_opt(&r.transport),
        protocol_version: clip_opt(&r.protocol_version),
        direction: r.direction,
        method: clip(&r.method),
        request_id: clip_opt(&r.request_id),
        tool: clip_opt(&r.tool),
        resource: clip_opt(&r.resource),
        prompt: clip_opt(&r.prompt),
        decision: r.decision,
        rule: clip(&r.rule),
        outcome: r.outcome,
        latency_us: r.latency_us,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        args_sha256: clip(&r.args_sha256),
        args: None,
        result: None,
        call: r.call.clone(),
    }
}

/// `s` cut to at most [`MAX_NAME`] bytes at a character boundary, marked with `…` when cut.
fn clip(s: &str) -> String {
    if s.len() <= MAX_NAME {
        return s.to_owned();
    }
    let marker = "…";
    let mut end = MAX_NAME - marker.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::govern::audit::{Outcome, Verdict};

    fn record(tenant: &str, n: u64) -> Arc<Record> {
        let mut r =
            crate::relay::calls::stats::tests::record(tenant, "echo", Verdict::Allow, Outcome::Ok);
        r.request_id = Some(n.to_string());
        Arc::new(r)
    }

    #[test]
    fn keeps_the_latest_calls_newest_first_and_bounded() {
        let activity = Activity::default();
        for n in 0..(LATEST_CALLS as u64 + 20) {
            activity.push(record(if n % 2 == 0 { "acme" } else { "other" }, n));
        }
        let all = activity.latest(None);
        assert_eq!(all.len(), LATEST_CALLS);
        let acme = activity.latest(Some("acme"));
        assert_eq!(acme.len(), LATEST_CALLS / 2);
        assert!(acme.iter().all(|c| c.tenant == "acme"));
        let tools = activity.tools(None);
        assert_eq!(
            tools.iter().map(|t| t.calls).sum::<u64>(),
            LATEST_CALLS as u64 + 20
        );
        assert_eq!(activity.tools(Some("other")).len(), 1);
        assert_eq!(
            activity.tenants().into_iter().collect::<Vec<_>>(),
            ["acme", "other"]
        );
    }

    #[test]
    fn newest_call_comes_first() {
        let activity = Activity::default();
        let mut first =
            crate::relay::calls::stats::tests::record("acme", "first", Verdict::Allow, Outcome::Ok);
        first.time_ms = 1;
        let mut second = first.clone();
        second.tool = Some("second".into());
        activity.push(Arc::new(first));
        activity.push(Arc::new(second));
        let latest = activity.latest(None);
        assert_eq!(latest[0].target.as_deref(), Some("second"));
        assert_eq!(latest[1].target.as_deref(), Some("first"));
    }

    #[tokio::test]
    async fn a_slow_viewer_lags_instead_of_blocking_push() {
        let activity = Activity::default();
        let mut viewer = activity.subscribe();
        for n in 0..(BROADCAST_CAPACITY as u64 * 2) {
            activity.push(record("acme", n));
        }
        assert!(matches!(
            viewer.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }

    #[test]
    fn payloads_go_and_long_names_are_clipped() {
        let activity = Activity::default();
        let mut r = crate::relay::calls::stats::tests::record(
            "acme",
            &"é".repeat(MAX_NAME),
            Verdict::Allow,
            Outcome::Ok,
        );
        r.args = Some("x".repeat(1 << 20));
        r.result = Some("y".repeat(1 << 20));
        r.roles = vec!["r".into(); 100];
        activity.push(Arc::new(r));
        let mut viewer = activity.subscribe();
        let plain = record("acme", 1);
        activity.push(plain.clone());
        let kept = viewer.try_recv().expect("the plain call");
        assert!(
            Arc::ptr_eq(&kept, &plain),
            "a record that fits is not copied"
        );
        let tool = activity.latest(None)[1].target.clone().expect("a tool");
        assert!(tool.len() <= MAX_NAME && tool.ends_with('…'), "{tool}");
        assert!(tool.trim_end_matches('…').chars().all(|c| c == 'é'));
        let inner = activity.lock();
        let first = inner.latest.front().expect("a call");
        assert!(first.args.is_none() && first.result.is_none());
        assert_eq!(first.roles.len(), MAX_ROLES);
    }

    #[test]
    fn viewers_are_bounded() {
        let activity = Activity::default();
        for _ in 0..MAX_VIEWERS {
            assert!(activity.add_viewer());
        }
        assert!(!activity.add_viewer());
        activity.remove_viewer();
        assert!(activity.add_viewer());
    }
}
