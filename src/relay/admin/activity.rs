//! The activity endpoints of the admin listener: the page (HTML, CSS and JS built into the
//! binary), `/api/activity` (a snapshot as JSON) and `/activity/events` (server push: a
//! snapshot, then new calls and a refresh every second).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{Interval, MissedTickBehavior};

use super::view::Snapshot;
use crate::govern::audit::Record;
use crate::relay::calls::CallRow;
use crate::relay::state::RelayState;

/// How often a live view gets fresh tunnels, sessions and per-tool figures.
pub(super) const REFRESH: Duration = Duration::from_secs(1);

/// Keep-alive comment interval on the event stream (proxies drop idle streams).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Calls sent in one event at most: under load the page gets batches, not one event a call.
const MAX_BATCH: usize = 100;

/// Everything the page is allowed to load: itself, nothing from elsewhere, no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_CSS: &str = include_str!("page.css");
const PAGE_JS: &str = include_str!("page.js");

/// `?tenant=T`: one tenant's activity; absent or empty for all.
#[derive(Debug, Default, Deserialize)]
pub(super) struct TenantQuery {
    tenant: Option<String>,
}

impl TenantQuery {
    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref().filter(|t| !t.is_empty())
    }
}

fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut response = Response::new(body.into());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Where the page carries its first snapshot.
const SNAPSHOT_SLOT: &str = "{{SNAPSHOT}}";

/// Where the page names the relay instance (its title and header).
const RELAY_SLOT: &str = "{{RELAY}}";

/// `GET /activity?tenant=T`: the page, carrying the snapshot it first shows (so it shows the
/// state at once, before its event stream opens).
pub(super) async fn page(
    State(state): State<Arc<RelayState>>,
    Query(query): Query<TenantQuery>,
) -> Response {
    let snapshot = Snapshot::of(&state, query.tenant(), true);
    let json = serde_json::to_string(&snapshot).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "activity snapshot not serialisable");
        "null".into()
    });
    // The slots are filled in the template's own text only, never in what fills another.
    let (head, tail) = PAGE_HTML
        .split_once(SNAPSHOT_SLOT)
        .unwrap_or((PAGE_HTML, ""));
    let html = [
        head.replace(RELAY_SLOT, &html_text(&state.instance)),
        script_safe(&json),
        tail.into(),
    ]
    .concat();
    asset("text/html; charset=utf-8", html)
}

/// `text` made safe as HTML element content.
fn html_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JSON made safe inside a `<script>` element: `<`, `>` and `&` only occur inside JSON
/// strings, where their `\u` escapes mean the same, and then no `</script>` or `<!--` in a
/// name can end the element early.
fn script_safe(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// `GET /activity/page.css`.
pub(super) async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

/// `GET /activity/page.js`.
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

/// `GET /api/activity?tenant=T`: the snapshot the event stream starts with, as JSON.
pub(super) async fn api(
    State(state): State<Arc<RelayState>>,
    Query(query): Query<TenantQuery>,
) -> Json<Snapshot> {
    Json(Snapshot::of(&state, query.tenant(), true))
}

/// `GET /activity/events?tenant=T`: a `snapshot` event, then `calls` events (arrays of new
/// calls, newest last) and a `refresh` event every [`REFRESH`]; a viewer that fell behind gets
/// a new `snapshot`. Ends when the relay stops. `503` when too many viewers watch already.
pub(super) async fn events(
    State(state): State<Arc<RelayState>>,
    Query(query): Query<TenantQuery>,
) -> Response {
    if !state.activity.add_viewer() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many activity viewers\n",
        )
            .into_response();
    }
    let feed = Feed::new(state, query.tenant().map(str::to_owned));
    let mut response = Sse::new(feed.into_stream())
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One viewer's event stream.
struct Feed {
    state: Arc<RelayState>,
    tenant: Option<String>,
    live: tokio::sync::broadcast::Receiver<Arc<Record>>,
    refresh: Interval,
    started: bool,
    stopping: bool,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.state.activity.remove_viewer();
    }
}

impl Feed {
    /// A feed for a viewer already counted by `add_viewer` (dropping it uncounts it).
    fn new(state: Arc<RelayState>, tenant: Option<String>) -> Self {
        let live = state.activity.subscribe();
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Self {
            state,
            tenant,
            live,
            refresh,
            started: false,
            stopping: false,
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut feed| async move {
            let event = feed.next_event().await?;
            Some((Ok(event), feed))
        })
    }

    /// The next event; `None` once the relay stops. Every wait ends within [`REFRESH`].
    async fn next_event(&mut self) -> Option<Event> {
        if !self.started {
            self.started = true;
            return Some(self.snapshot("snapshot", true));
        }
        if self.stopping {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                _ = self.state.stop.cancelled() => {
                    // The calls already pushed go out before the stream ends (a last batch).
                    self.stopping = true;
                    return self.drain();
                }
                received = self.live.recv() => match received {
                    Ok(record) => {
                        if let Some(event) = self.batch(record) {
                            return Some(event);
                        }
                    }
                    // Missed calls: start over from a snapshot rather than show a gap.
                    Err(RecvError::Lagged(_)) => return Some(self.resync()),
                    Err(RecvError::Closed) => return None,
                },
                _ = self.refresh.tick() => return Some(self.snapshot("refresh", false)),
            }
        }
    }

    /// `first` and the calls already waiting after it (up to [`MAX_BATCH`]) of this viewer's
    /// tenant, as one `calls` event; `None` if none is of its tenant.
    fn batch(&mut self, first: Arc<Record>) -> Option<Event> {
        let mut calls = Vec::new();
        let mut next = Some(first);
        while let Some(record) = next.take() {
            if self.tenant.as_deref().is_none_or(|t| record.tenant == t) {
                calls.push(CallRow::from(record.as_ref()));
            }
            if calls.len() >= MAX_BATCH {
                break;
            }
            next = match self.live.try_recv() {
                Ok(record) => Some(record),
                Err(TryRecvError::Lagged(_)) => return Some(self.resync()),
                Err(TryRecvError::Empty | TryRecvError::Closed) => None,
            };
        }
        (!calls.is_empty()).then(|| json_event("calls", &calls))
    }

    /// The calls of this viewer's tenant waiting now (up to [`MAX_BATCH`]), as one `calls`
    /// event.
    fn drain(&mut self) -> Option<Event> {
        let mut calls = Vec::new();
        while calls.len() < MAX_BATCH {
            match self.live.try_recv() {
                Ok(record) => {
                    if self.tenant.as_deref().is_none_or(|t| record.tenant == t) {
                        calls.push(CallRow::from(record.as_ref()));
                    }
                }
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        (!calls.is_empty()).then(|| json_event("calls", &calls))
    }

    fn resync(&mut self) -> Event {
        self.live = self.live.resubscribe();
        self.snapshot("snapshot", true)
    }

    fn snapshot(&self, name: &'static str, with_calls: bool) -> Event {
        json_event(
            name,
            &Snapshot::of(&self.state, self.tenant.as_deref(), with_calls),
        )
    }
}

fn json_event(name: &'static str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "activity event not serialisable");
            Event::default().comment("event not serialisable")
        })
}
