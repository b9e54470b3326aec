//! Stateless (2026-07-28) agents of an upstream that speaks only the session era.
//!
//! The first stateless stream of a source asks the upstream `server/discover` (at
//! [`STATELESS_SINCE`]); an upstream that answers with a 2026-07-28 version gets stateless
//! requests as they are, and one that refuses gets them *bridged*: each request goes upstream
//! inside a session-era session `connect` opened with its own `initialize`, and what comes back
//! is completed for the agent (`resultType`, cache hints; see [`crate::mcp::bridge`]). An
//! agent's `server/discover` is answered from the upstream's `initialize` result. What the
//! probe learned holds for [`ERA_TTL`], so an upstream that is upgraded is noticed.
//!
//! Bridged sessions are pooled per source and per caller: a session carries one request at a
//! time (the agents' own ids then never meet in one upstream session, and a server request in
//! mid-call belongs to exactly one call), and is kept after it for the caller's next request.
//! When an identity assertion goes upstream, a session only ever serves the caller it was
//! opened for; without one, all callers share the pool. A session the upstream expired (`404`)
//! is opened again and the request sent once more. The pool is bounded ([`MAX_SESSIONS`] per
//! source, [`MAX_BUSY_PER_CALLER`] per caller; the bookkeeping is [`super::pool`]'s);
//! sessions idle past the source's `session_idle_secs` are ended (`DELETE`). A request the
//! upstream sends its client in mid-call makes the call wait for its agent's input (see
//! [`super::waiting`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::HeaderValue;
use http::{Method, StatusCode};
use parking_lot::Mutex;

use serde_json::value::RawValue;

use super::HttpSource;
use super::client::{Response, body_stream, error_chain};
use super::context::StreamContext;
use super::error::UpstreamError;
use super::pool::{Pool, Take};
use super::session::{HttpSession, UpstreamState};
use super::waiting::ParkedCalls;
use crate::mcp::MessageKind;
use crate::mcp::bridge::{self, Discovered, Initialized};
use crate::mcp::era::{
    LATEST_SESSION_VERSION, METHOD_HEADER, SESSION_HEADER, STATELESS_SINCE, VERSION_HEADER,
};
use crate::mcp::sse_reader::{SseItem, SseReader};
use crate::wire::OpenHeader;

/// `{}`: the result of a ping.
pub(super) fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".into()).expect("{} is a JSON object")
}

/// Bridged upstream sessions one source keeps at most, busy or idle. Each is one session on
/// the upstream (a few KiB there, a few hundred bytes here); at the cap the one idle longest
/// is ended to make room, and when all are busy a request waits up to [`CHECKOUT_WAIT`].
pub(super) const MAX_SESSIONS: usize = 256;

/// Bridged sessions one caller keeps busy at once: requests in flight through the bridge. A
/// caller past it waits like everyone else when the pool is full, so one caller cannot take
/// every session of a source.
pub(super) const MAX_BUSY_PER_CALLER: usize = 64;

/// How long what the `server/discover` probe learned of an upstream's era holds.
const ERA_TTL: Duration = Duration::from_secs(300);

/// Time the probe, or our own `initialize` and `notifications/initialized`, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a request waits for a bridged session when the pool is full.
const CHECKOUT_WAIT: Duration = Duration::from_secs(10);

/// The largest answer to our own `server/discover` or `initialize` read.
const HANDSHAKE_ANSWER_LIMIT: usize = 1 << 20;

/// The id of the requests `connect` sends of its own in a bridged session (its `initialize`,
/// before any agent's request) and in the probe.
const OWN_REQUEST_ID: u64 = 1;

/// What a source knows of stateless agents: the upstream's era, the pooled sessions, and the
/// calls waiting for their agents' input.
pub(super) struct Bridge {
    /// What the `server/discover` probe learned, and when.
    era: Mutex<Option<(Probed, Instant)>>,
    pool: Mutex<Pool<HttpSession>>,
    freed: tokio::sync::Notify,
    pub(super) parked: Mutex<ParkedCalls>,
}

impl Default for Bridge {
    fn default() -> Self {
        Self {
            era: Mutex::new(None),
            pool: Mutex::new(Pool::new(MAX_SESSIONS, MAX_BUSY_PER_CALLER)),
            freed: tokio::sync::Notify::new(),
            parked: Mutex::new(ParkedCalls::default()),
        }
    }
}

/// What the `server/discover` probe learned of an upstream.
#[derive(Clone)]
pub(super) struct Probed {
    /// Whether it speaks 2026-07-28.
    pub(super) stateless: bool,
    /// Its discover result, when it does.
    pub(super) discovered: Option<Arc<Discovered>>,
}

impl Bridge {
    /// The idle sessions unused for `idle`: taken out of the pool, for the caller to end.
    pub(super) fn expired(&self, now: Instant, idle: Duration) -> Vec<Arc<HttpSession>> {
        self.pool.lock().expired(now, idle)
    }
}

/// A bridged session checked out of its source's pool for one stream. Given back when the
/// stream is done with it cleanly; ended (`DELETE`) otherwise.
pub(super) struct Checkout {
    source: Arc<HttpSource>,
    /// Whose it is, for the per-caller cap.
    caller: String,
    /// Which idle sessions it may be given back among (see [`Pool`]).
    key: String,
    session: Option<Arc<HttpSession>>,
    /// Whether its call waits for its agent's input (see [`Parked`]): not busy meanwhile.
    parked: bool,
}

impl Checkout {
    /// The session.
    pub(super) fn session(&self) -> Arc<HttpSession> {
        self.session
            .clone()
            .expect("a checkout holds its session until it is dropped")
    }

    /// Gives the session back to the pool for the caller's next request, unless the upstream
    /// forgot it or a request of the stream was abandoned in flight (the upstream may still be
    /// working on it under an id the next caller may use).
    pub(super) fn release(mut self, clean: bool) {
        let Some(session) = self.session.take() else {
            return;
        };
        if clean && !session.is_gone() {
            let bridge = &self.source.bridge;
            bridge
                .pool
                .lock()
                .give_back(&self.caller, &self.key, session, Instant::now());
            bridge.freed.notify_waiters();
        } else {
            self.discard(session);
        }
    }

    /// Its call waits for its agent's input: the session stops counting as its caller's busy
    /// one (the waiting calls have caps of their own).
    pub(super) fn park(&mut self) {
        if !self.parked {
            self.parked = true;
            self.source.bridge.pool.lock().unbusy(&self.caller);
            self.source.bridge.freed.notify_waiters();
        }
    }

    /// Its call goes on: busy again.
    pub(super) fn unpark(&mut self) {
        if self.parked {
            self.parked = false;
            self.source.bridge.pool.lock().busy(&self.caller);
        }
    }

    fn discard(&self, session: Arc<HttpSession>) {
        let mut pool = self.source.bridge.pool.lock();
        match self.parked {
            true => pool.forget(),
            false => pool.discard(&self.caller),
        }
        drop(pool);
        self.source.bridge.freed.notify_waiters();
        tokio::spawn(async move { session.end(None).await });
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.discard(session);
        }
    }
}

impl HttpSource {
    /// Whether stateless requests of a stream opened with `header` are bridged: the upstream
    /// does not speak 2026-07-28 (see [`HttpSource::probed`]); an upstream that cannot be
    /// reached is not judged (its requests go as they are, and fail as they would).
    pub(super) async fn bridges(&self, header: &OpenHeader) -> bool {
        self.probed(header).await.is_some_and(|p| !p.stateless)
    }

    /// What the `server/discover` probe learned of the upstream: asked when not known (or
    /// known for longer than [`ERA_TTL`]); `None` when it could not be asked.
    pub(super) async fn probed(&self, header: &OpenHeader) -> Option<Probed> {
        let now = Instant::now();
        if let Some((probed, at)) = &*self.bridge.era.lock()
            && now.duration_since(*at) < ERA_TTL
        {
            return Some(probed.clone());
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.probe(header)).await {
            Ok(Ok(probed)) => {
                if !probed.stateless {
                    tracing::info!(source = %self.name, "upstream does not speak 2026-07-28: stateless agents are bridged to the session era");
                }
                *self.bridge.era.lock() = Some((probed.clone(), now));
                Some(probed)
            }
            Ok(Err(e)) => {
                tracing::debug!(source = %self.name, error = %e, "server/discover probe failed");
                None
            }
            Err(_) => {
                tracing::debug!(source = %self.name, "server/discover probe timed out");
                None
            }
        }
    }

    /// Asks the upstream `server/discover` at [`STATELESS_SINCE`] (with the caller's identity
    /// assertion, which an upstream may require of every request).
    async fn probe(&self, header: &OpenHeader) -> Result<Probed, UpstreamError> {
        let mut headers = super::context::base_headers();
        headers.insert(VERSION_HEADER, HeaderValue::from_static(STATELESS_SINCE));
        headers.insert(METHOD_HEADER, HeaderValue::from_static("server/discover"));
        super::context::insert_assertion(&mut headers, header.assertion.as_ref());
        let response = self
            .client
            .send(
                Method::POST,
                &self.target,
                headers,
                bridge::discover_request(OWN_REQUEST_ID),
            )
            .await
            .map_err(|e| UpstreamError::Unreachable {
                source_name: self.name.clone(),
                reason: error_chain(&e),
            })?;
        let answer = read_answer(&self.name, response).await?;
        let stateless = bridge::speaks_stateless(&answer);
        let discovered = stateless
            .then(|| Discovered::parse(&answer))
            .flatten()
            .map(Arc::new);
        Ok(Probed {
            stateless,
            discovered,
        })
    }

    /// Checks out a bridged session for a stream opened with `header`, whose agent declares
    /// `capabilities` (see [`bridge::declared_capabilities`]): one of its caller's idle ones
    /// opened with the same capabilities (the upstream may offer tools by them), else a new
    /// one (not yet initialized: see [`StreamContext::handshake`]). Waits up to
    /// [`CHECKOUT_WAIT`] when the pool is full.
    pub(super) async fn check_out(
        self: &Arc<Self>,
        header: &OpenHeader,
        capabilities: String,
    ) -> Result<(Checkout, bool), UpstreamError> {
        let caller = if header.assertion.is_some() {
            header.subject.clone()
        } else {
            String::new()
        };
        let key = format!("{caller}\n{capabilities}");
        let deadline = tokio::time::Instant::now() + CHECKOUT_WAIT;
        loop {
            let freed = self.bridge.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let taken = self.bridge.pool.lock().take(&caller, &key);
            let (session, fresh) = match taken {
                Take::Reuse(session) => (session, false),
                Take::Open { evicted } => {
                    if let Some(evicted) = evicted {
                        tokio::spawn(async move { evicted.end(None).await });
                    }
                    let session = HttpSession::new(
                        None,
                        UpstreamState::default(),
                        None,
                        self.replay_bytes.clone(),
                    );
                    *session.capabilities.lock() = capabilities.clone();
                    (Arc::new(session), true)
                }
                Take::Full => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(UpstreamError::Broken {
                            source_name: self.name.clone(),
                            reason: format!(
                                "every upstream session for stateless agents is busy ({MAX_SESSIONS} per source, {MAX_BUSY_PER_CALLER} per caller)"
                            ),
                        });
                    }
                    continue;
                }
            };
            // This stream's assertion is the one its requests carry.
            *session.assertion.lock() = header.assertion.clone();
            session.take_asks();
            if self.sweeping.set(()).is_ok() {
                tokio::spawn(super::sweep(Arc::downgrade(self)));
            }
            let checkout = Checkout {
                source: self.clone(),
                caller,
                key,
                session: Some(session),
                parked: false,
            };
            return Ok((checkout, fresh));
        }
    }
}

impl StreamContext {
    /// Opens the bridged session upstream: our own `initialize` at the newest session-era
    /// version, then `notifications/initialized`. Forgets whatever session it had before (the
    /// upstream expired it). Bounded by [`HANDSHAKE_TIMEOUT`].
    pub(super) async fn handshake(&self) -> Result<(), UpstreamError> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.try_handshake()).await {
            Ok(Ok(())) => {
                // The upstream's GET stream, open before the call goes: what the upstream asks
                // on it belongs to the call (see `HttpSession::push_ask`).
                self.session.set_tasks(|| Arc::new(self.for_session()));
                if let Some(answered) = self.session.start_get_stream() {
                    let _ =
                        tokio::time::timeout(super::context::GET_STREAM_OPENING, answered).await;
                }
                Ok(())
            }
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Broken {
                source_name: self.name().to_owned(),
                reason: format!(
                    "no answer to initialize within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            }),
        }
    }

    async fn try_handshake(&self) -> Result<(), UpstreamError> {
        *self.session.upstream.lock() = UpstreamState::default();
        self.session.revive();
        let capabilities = self.session.capabilities.lock().clone();
        let initialize =
            bridge::initialize_request(OWN_REQUEST_ID, LATEST_SESSION_VERSION, &capabilities);
        let response = self.post_own(initialize, true).await?;
        if let Some(id) = response.headers().get(SESSION_HEADER) {
            self.session.upstream.lock().keep_id(id);
        }
        let status = response.status();
        let answer = read_answer(self.name(), response).await?;
        let refused = |reason: String| UpstreamError::Broken {
            source_name: self.name().to_owned(),
            reason,
        };
        let initialized = Initialized::parse(&answer).map_err(|e| match status.is_success() {
            true => refused(e.to_string()),
            false => refused(format!("HTTP {status}: {e}")),
        })?;
        self.session.upstream.lock().version = HeaderValue::from_str(&initialized.version).ok();
        *self.session.initialized.lock() = Some(Arc::new(initialized));
        let response = self
            .post_own(Bytes::from_static(bridge::INITIALIZED_NOTIFICATION), false)
            .await?;
        if !response.status().is_success() {
            return Err(refused(format!(
                "HTTP {} to notifications/initialized",
                response.status()
            )));
        }
        tracing::debug!(source = %self.name(), "bridged upstream session opened for stateless agents");
        Ok(())
    }

    async fn post_own(&self, body: Bytes, is_initialize: bool) -> Result<Response, UpstreamError> {
        self.source
            .client
            .send(
                Method::POST,
                &self.source.target,
                self.headers(is_initialize),
                body,
            )
            .await
            .map_err(|e| UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })
    }

    /// Gives the stream's session back to the pool when `clean` (see [`Checkout::release`]),
    /// unless a call waiting for input took it.
    pub(super) fn release_checkout(&self, clean: bool) {
        if let Some(checkout) = self.checkout.lock().take() {
            checkout.release(clean);
        }
    }

    /// The answer to an agent's `server/discover` in a bridged stream, from the upstream's
    /// `initialize` result.
    pub(super) fn discover_answer(&self, id: &serde_json::value::RawValue) -> Option<Bytes> {
        let initialized = self.session.initialized.lock().clone()?;
        Some(initialized.discover_answer(id))
    }
}

/// Reads the JSON-RPC answer to one of our own requests: a JSON body, or the first response
/// in an event stream, within [`HANDSHAKE_ANSWER_LIMIT`].
pub(super) async fn read_answer(source: &str, response: Response) -> Result<Bytes, UpstreamError> {
    let broken = |reason: String| UpstreamError::Broken {
        source_name: source.to_owned(),
        reason,
    };
    let sse = super::context::is_event_stream(&response);
    let status = response.status();
    let mut body = body_stream(response);
    let mut reader = SseReader::new();
    let mut items = Vec::new();
    let mut message = bytes::BytesMut::new();
    let mut read = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| broken(error_chain(&e)))?;
        read += chunk.len();
        if read > HANDSHAKE_ANSWER_LIMIT {
            return Err(UpstreamError::TooLarge {
                source_name: source.to_owned(),
                limit: HANDSHAKE_ANSWER_LIMIT,
            });
        }
        if !sse {
            message.extend_from_slice(&chunk);
            continue;
        }
        items.clear();
        reader
            .feed(&chunk, &mut items)
            .map_err(|e| broken(format!("bad event stream: {e}")))?;
        for item in items.drain(..) {
            match item {
                SseItem::Data(bytes) => message.extend_from_slice(&bytes),
                SseItem::End { .. } => {
                    let event = std::mem::take(&mut message).freeze();
                    let is_response = crate::mcp::classify(&event).is_ok_and(|c| {
                        c.messages().iter().any(|m| m.kind == MessageKind::Response)
                    });
                    if is_response {
                        return Ok(event);
                    }
                }
            }
        }
    }
    if sse || (message.is_empty() && status == StatusCode::ACCEPTED) {
        return Err(broken(format!("no answer (HTTP {status})")));
    }
    Ok(message.freeze())
}
