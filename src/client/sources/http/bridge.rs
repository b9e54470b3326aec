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
//! source, [`MAX_BUSY_PER_CALLER`] per caller); sessions idle past the source's
//! `session_idle_secs` are ended (`DELETE`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::HeaderValue;
use http::{Method, StatusCode};
use parking_lot::Mutex;

use serde_json::value::RawValue;

use super::HttpSource;
use super::answer::{EventBody, SseEnd};
use super::client::{Response, body_stream, error_chain};
use super::context::StreamContext;
use super::error::UpstreamError;
use super::session::{HttpSession, UpstreamState};
use crate::mcp::MessageKind;
use crate::mcp::bridge::{self, Discovered, Initialized, ServerRequest, input_capability};
use crate::mcp::era::{
    LATEST_SESSION_VERSION, METHOD_HEADER, SESSION_HEADER, STATELESS_SINCE, VERSION_HEADER,
};
use crate::mcp::jsonrpc::{codes, error_body};
use crate::mcp::sse_reader::{SseItem, SseReader};
use crate::wire::{Frame, OpenHeader};

/// The id of the single request in `payload`, when it is one a server may answer
/// `input_required` (see [`crate::mcp::era::names_target`]).
pub(super) fn interactive_request(payload: &[u8]) -> Option<Box<RawValue>> {
    match crate::mcp::classify(payload).ok()? {
        crate::mcp::Classified::Single(m)
            if m.kind == MessageKind::Request
                && m.method
                    .as_deref()
                    .is_some_and(crate::mcp::era::names_target) =>
        {
            m.id
        }
        _ => None,
    }
}

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

/// Calls one source keeps waiting for their agents' input at once (see [`Parked`]): each
/// holds a bridged session (a quarter of [`MAX_SESSIONS`] at most, so waiting calls never
/// take the pool) and the upstream's open answer. A waiting session is not busy: it counts
/// here, not against [`MAX_BUSY_PER_CALLER`].
pub(super) const MAX_PARKED: usize = MAX_SESSIONS / 4;

/// Calls one caller keeps waiting at once: an agent that never answers cannot hold more.
pub(super) const MAX_PARKED_PER_CALLER: usize = 8;

/// Random bytes in the handle of a waiting call (128 bits: never guessed).
const PARK_HANDLE_BYTES: usize = 16;

/// What a source knows of stateless agents: the upstream's era, the pooled sessions, and the
/// calls waiting for their agents' input.
pub(super) struct Bridge {
    /// What the `server/discover` probe learned, and when.
    era: Mutex<Option<(Probed, Instant)>>,
    pool: Mutex<Pool<HttpSession>>,
    freed: tokio::sync::Notify,
    parked: Mutex<ParkedCalls>,
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

/// A bridged call whose upstream asked its client something (elicitation, sampling, roots):
/// the agent got an `input_required` answer, and its retry carries the answers. Meanwhile the
/// call keeps its session and the upstream's open answer, for at most [`bridge::INPUT_WAIT`];
/// then the session is ended (`DELETE`), which ends the upstream's request with it.
pub(super) struct Parked {
    /// The caller whose call it is: only its retry goes on with it.
    subject: String,
    checkout: Checkout,
    waiting: Waiting,
}

/// What a parked call goes on from.
pub(super) struct Waiting {
    /// The rest of the upstream's answer.
    body: Box<EventBody>,
    /// The id the upstream answers (the first attempt's), as a key.
    pending: HashSet<String>,
    /// What the upstream asked: each request's key in the `input_required` answer, and its id.
    asked: Vec<(String, Box<RawValue>)>,
}

impl Parked {
    /// The session the call holds, and where the call stands.
    pub(super) fn split(self) -> (Checkout, Waiting) {
        (self.checkout, self.waiting)
    }
}

/// The calls of a source waiting for input, by handle (the `requestState` `connect` gives).
#[derive(Default)]
struct ParkedCalls {
    calls: HashMap<String, Box<Parked>>,
    per_caller: HashMap<String, usize>,
}

impl ParkedCalls {
    fn insert(&mut self, handle: String, parked: Box<Parked>) -> Result<(), Box<Parked>> {
        let mine = self.per_caller.get(&parked.subject).copied().unwrap_or(0);
        if self.calls.len() >= MAX_PARKED || mine >= MAX_PARKED_PER_CALLER {
            return Err(parked);
        }
        *self.per_caller.entry(parked.subject.clone()).or_default() += 1;
        self.calls.insert(handle, parked);
        Ok(())
    }

    fn take(&mut self, handle: &str, subject: Option<&str>) -> Option<Box<Parked>> {
        if subject.is_some_and(|s| self.calls.get(handle).is_some_and(|p| p.subject != s)) {
            return None;
        }
        let parked = self.calls.remove(handle)?;
        if let Some(count) = self.per_caller.get_mut(&parked.subject) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_caller.remove(&parked.subject);
            }
        }
        Some(parked)
    }
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
    fn park(&mut self) {
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
    /// Takes the call waiting under `handle` for `subject`'s retry (see [`Parked`]); `None`
    /// when there is none (it expired, was answered, or is another caller's).
    pub(super) fn unpark(&self, handle: &str, subject: &str) -> Option<Box<Parked>> {
        self.bridge.parked.lock().take(handle, Some(subject))
    }

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
            self.session.upstream.lock().id = Some(id.clone());
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

    /// The upstream asked its client something in mid-call (`message`, a whole request; the
    /// rest of the answer in `body`): a ping is answered here; an elicitation, sampling or
    /// roots request the agent's request declares it can answer parks the call (see
    /// [`Parked`]) and answers the agent `input_required`; anything else gets an error. The
    /// answer then goes on, until the call is answered or parked.
    pub(super) async fn asked(
        &self,
        exchange: u64,
        payload: &Bytes,
        (mut message, mut body): (Bytes, Box<EventBody>),
        pending: &mut HashSet<String>,
    ) -> Result<(), UpstreamError> {
        // Only a call that may be answered `input_required` waits (the relay seals the state of
        // those answers, and checks their retries).
        let waits = interactive_request(payload).is_some();
        loop {
            let Some(request) = ServerRequest::parse(&message) else {
                return Err(self.broken("it sent a request that is not JSON-RPC".into()));
            };
            let reply = match (request.method.as_str(), input_capability(&request.method)) {
                ("ping", _) => bridge::response(&request.id, &empty_object()),
                (_, Some(capability))
                    if waits && bridge::declares_capability(payload, capability) =>
                {
                    match self.park(exchange, payload, request, body, pending).await {
                        Ok(()) => return Ok(()),
                        Err((id, rest, why)) => {
                            body = rest;
                            error_body(Some(&id), codes::INTERNAL_ERROR, &why)
                        }
                    }
                }
                (method, _) => error_body(
                    Some(&request.id),
                    codes::METHOD_NOT_FOUND,
                    &format!("the client does not support {method}"),
                ),
            };
            self.reply_upstream(reply).await?;
            match self.follow_sse(exchange, body, pending).await? {
                SseEnd::Answered => return Ok(()),
                SseEnd::Asked(next, rest) => (message, body) = (next, rest),
            }
        }
    }

    /// Parks the call (see [`Parked`]) and answers the agent `input_required` with `request`.
    /// On failure (no room, or no session to keep), the request's id, the rest of the answer
    /// and why.
    async fn park(
        &self,
        exchange: u64,
        payload: &Bytes,
        request: ServerRequest,
        body: Box<EventBody>,
        pending: &mut HashSet<String>,
    ) -> Result<(), (Box<RawValue>, Box<EventBody>, String)> {
        let agent_id = interactive_request(payload);
        let (Some(agent_id), Some(mut checkout)) = (agent_id, self.checkout.lock().take()) else {
            return Err((
                request.id,
                body,
                "the call cannot wait for its agent".into(),
            ));
        };
        let key = request.id.get().trim().trim_matches('"').to_owned();
        checkout.park();
        let parked = Box::new(Parked {
            subject: self.header.subject.clone(),
            checkout,
            waiting: Waiting {
                body,
                pending: std::mem::take(pending),
                asked: vec![(key.clone(), request.id.clone())],
            },
        });
        let mut bytes = [0u8; PARK_HANDLE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let handle = hex::encode(bytes);
        if let Err(parked) = self
            .source
            .bridge
            .parked
            .lock()
            .insert(handle.clone(), parked)
        {
            let (mut checkout, waiting) = (*parked).split();
            checkout.unpark();
            *self.checkout.lock() = Some(checkout);
            *pending = waiting.pending;
            let why = format!(
                "too many calls wait for their agents' input ({MAX_PARKED} per source, \
                 {MAX_PARKED_PER_CALLER} per caller)"
            );
            return Err((request.id, waiting.body, why));
        }
        let source = Arc::downgrade(&self.source);
        let expiring = handle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(bridge::INPUT_WAIT).await;
            let expired = source
                .upgrade()
                .and_then(|s| s.bridge.parked.lock().take(&expiring, None));
            if expired.is_some() {
                tracing::info!(
                    "a call waited {} s for its agent's input: ended",
                    bridge::INPUT_WAIT.as_secs()
                );
            }
        });
        tracing::debug!(source = %self.name(), method = %request.method, "upstream asked its client in mid-call: input_required");
        let answer = bridge::input_required(&agent_id, &[(key, &request)], &handle);
        self.send(Frame::message(exchange, answer)).await;
        Ok(())
    }

    /// Goes on with a parked call on the stream of its agent's retry (`payload`, whose answers
    /// are `retry`'s): each answer goes upstream as the response to what it answers (an
    /// error where the retry has none), then the rest of the upstream's answer follows, under
    /// the retry's id (see [`StreamContext::answering_as`]).
    pub(super) async fn resume_call(
        &self,
        exchange: u64,
        payload: Bytes,
        retry: bridge::Retry,
        waiting: Waiting,
    ) {
        let Waiting {
            body,
            mut pending,
            asked,
        } = waiting;
        let result = async {
            for (key, id) in &asked {
                let reply = match retry.responses.get(key) {
                    Some(result) => bridge::response(id, result),
                    None => error_body(
                        Some(id),
                        codes::INVALID_PARAMS,
                        "the client's retry carried no answer to this request",
                    ),
                };
                self.reply_upstream(reply).await?;
            }
            match self.follow_sse(exchange, body, &mut pending).await? {
                SseEnd::Answered => Ok(()),
                SseEnd::Asked(next, rest) => {
                    self.asked(exchange, &payload, (next, rest), &mut pending)
                        .await
                }
            }
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(source = %self.name(), error = %error, "retried call failed");
            if !pending.is_empty() && !matches!(error, UpstreamError::BrokeOff { .. }) {
                let id = self.reanswer.as_deref();
                let body = error_body(id, error.code(), &error.to_string());
                self.send(Frame::message(exchange, body)).await;
            }
        }
        self.send(Frame::end(exchange)).await;
    }

    /// POSTs our client's answer to a request of the upstream (its session's headers, no
    /// routing headers: a response has no method).
    async fn reply_upstream(&self, reply: Bytes) -> Result<(), UpstreamError> {
        let mut headers = self.headers(false);
        let routing: Vec<_> = headers
            .keys()
            .filter(|name| {
                let name = name.as_str();
                name.starts_with("mcp-") && name != SESSION_HEADER && name != VERSION_HEADER
            })
            .cloned()
            .collect();
        for name in routing {
            headers.remove(name);
        }
        let response = self
            .source
            .client
            .send(Method::POST, &self.source.target, headers, reply)
            .await
            .map_err(|e| UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })?;
        let status = response.status();
        // Read the (empty) body through, so the connection is reused.
        let _ = read_answer(self.name(), response).await;
        if !status.is_success() {
            return Err(self.broken(format!("HTTP {status} to our answer to its request")));
        }
        Ok(())
    }

    fn broken(&self, reason: String) -> UpstreamError {
        UpstreamError::Broken {
            source_name: self.name().to_owned(),
            reason,
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

/// What [`Pool::take`] found for a caller.
#[derive(Debug)]
pub(super) enum Take<S> {
    /// One of its idle sessions.
    Reuse(Arc<S>),
    /// Room for a new one, made by taking `evicted` (idle longest) out, when it says so.
    Open { evicted: Option<Arc<S>> },
    /// None: the pool is full of busy sessions, or the caller is at its own cap.
    Full,
}

/// The bookkeeping of bridged sessions: idle ones by key (a caller and the capabilities its
/// sessions declared), busy ones counted by caller. Plain data: the caller passes `now`.
pub(super) struct Pool<S> {
    idle: HashMap<String, Vec<(Arc<S>, Instant)>>,
    busy: HashMap<String, usize>,
    /// Sessions in the pool, idle and busy.
    live: usize,
    max: usize,
    max_busy: usize,
}

impl<S> Pool<S> {
    pub(super) fn new(max: usize, max_busy: usize) -> Self {
        Self {
            idle: HashMap::new(),
            busy: HashMap::new(),
            live: 0,
            max,
            max_busy,
        }
    }

    /// A session of `caller` for `key`: its idle one used last, else room for a new one.
    pub(super) fn take(&mut self, caller: &str, key: &str) -> Take<S> {
        let busy = self.busy.get(caller).copied().unwrap_or(0);
        if busy >= self.max_busy {
            return Take::Full;
        }
        if let Some(idle) = self.idle.get_mut(key)
            && let Some((session, _)) = idle.pop()
        {
            if idle.is_empty() {
                self.idle.remove(key);
            }
            *self.busy.entry(caller.to_owned()).or_default() += 1;
            return Take::Reuse(session);
        }
        let evicted = if self.live >= self.max {
            let Some(evicted) = self.evict_oldest() else {
                return Take::Full;
            };
            Some(evicted)
        } else {
            None
        };
        if evicted.is_none() {
            self.live += 1;
        }
        *self.busy.entry(caller.to_owned()).or_default() += 1;
        Take::Open { evicted }
    }

    fn evict_oldest(&mut self) -> Option<Arc<S>> {
        let key = self
            .idle
            .iter()
            .filter_map(|(key, sessions)| Some((key, sessions.first()?.1)))
            .min_by_key(|(_, since)| *since)
            .map(|(key, _)| key.clone())?;
        let sessions = self.idle.get_mut(&key)?;
        let (session, _) = sessions.remove(0);
        if sessions.is_empty() {
            self.idle.remove(&key);
        }
        Some(session)
    }

    /// A busy session of `caller` is idle again, under `key`.
    pub(super) fn give_back(&mut self, caller: &str, key: &str, session: Arc<S>, now: Instant) {
        self.unbusy(caller);
        self.idle
            .entry(key.to_owned())
            .or_default()
            .push((session, now));
    }

    /// A busy session of `caller` ended.
    pub(super) fn discard(&mut self, caller: &str) {
        self.unbusy(caller);
        self.live = self.live.saturating_sub(1);
    }

    /// A session of `caller` is busy again (its call goes on after waiting).
    pub(super) fn busy(&mut self, caller: &str) {
        *self.busy.entry(caller.to_owned()).or_default() += 1;
    }

    /// A session that counted as nobody's busy one (a waiting call's) ended.
    pub(super) fn forget(&mut self) {
        self.live = self.live.saturating_sub(1);
    }

    pub(super) fn unbusy(&mut self, caller: &str) {
        if let Some(busy) = self.busy.get_mut(caller) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.busy.remove(caller);
            }
        }
    }

    /// Takes out the idle sessions unused for `idle` (none when zero).
    pub(super) fn expired(&mut self, now: Instant, idle: Duration) -> Vec<Arc<S>> {
        if idle.is_zero() {
            return Vec::new();
        }
        let mut expired = Vec::new();
        self.idle.retain(|_, sessions| {
            sessions.retain(|(session, since)| {
                let keep = now.duration_since(*since) < idle;
                if !keep {
                    expired.push(session.clone());
                }
                keep
            });
            !sessions.is_empty()
        });
        self.live = self.live.saturating_sub(expired.len());
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(take: Take<u32>) -> Option<Arc<u32>> {
        match take {
            Take::Open { evicted } => evicted,
            other => panic!("expected room for a new session, got {other:?}"),
        }
    }

    #[test]
    fn a_caller_gets_its_own_idle_session_back_and_never_another_callers() {
        let mut pool = Pool::new(4, 4);
        let now = Instant::now();
        assert!(opened(pool.take("ada", "ada")).is_none());
        pool.give_back("ada", "ada", Arc::new(1), now);
        match pool.take("bob", "bob") {
            Take::Open { evicted: None } => {}
            other => panic!("bob gets a session of his own: {other:?}"),
        }
        match pool.take("ada", "ada") {
            Take::Reuse(session) => assert_eq!(*session, 1),
            other => panic!("ada reuses hers: {other:?}"),
        }
        assert_eq!(pool.live, 2);
    }

    #[test]
    fn a_full_pool_evicts_the_session_idle_longest_and_refuses_when_all_are_busy() {
        let mut pool = Pool::new(2, 2);
        let start = Instant::now();
        opened(pool.take("a", "a"));
        opened(pool.take("b", "b"));
        pool.give_back("a", "a", Arc::new(10), start);
        pool.give_back("b", "b", Arc::new(20), start + Duration::from_secs(1));
        assert_eq!(
            opened(pool.take("c", "c")).as_deref(),
            Some(&10),
            "a's is older"
        );
        assert_eq!(pool.live, 2);
        opened(pool.take("d", "d"));
        assert!(
            matches!(pool.take("e", "e"), Take::Full),
            "every session busy"
        );
        pool.discard("c");
        assert!(
            opened(pool.take("e", "e")).is_none(),
            "room again after an end"
        );
    }

    #[test]
    fn one_caller_cannot_take_every_session() {
        let mut pool = Pool::new(8, 2);
        opened(pool.take("greedy", "greedy"));
        opened(pool.take("greedy", "greedy"));
        assert!(matches!(pool.take("greedy", "greedy"), Take::Full));
        opened(pool.take("other", "other"));
        pool.give_back("greedy", "greedy", Arc::new(1), Instant::now());
        assert!(matches!(pool.take("greedy", "greedy"), Take::Reuse(_)));
    }

    #[test]
    fn idle_sessions_expire() {
        let mut pool = Pool::new(4, 4);
        let start = Instant::now();
        opened(pool.take("a", "a"));
        opened(pool.take("a", "a"));
        pool.give_back("a", "a", Arc::new(1), start);
        pool.give_back("a", "a", Arc::new(2), start + Duration::from_secs(60));
        let idle = Duration::from_secs(90);
        assert!(
            pool.expired(start + Duration::from_secs(30), idle)
                .is_empty()
        );
        let gone = pool.expired(start + Duration::from_secs(100), idle);
        assert_eq!(gone.iter().map(|s| **s).collect::<Vec<_>>(), [1]);
        assert_eq!(pool.live, 1);
        assert!(
            pool.expired(start, Duration::ZERO).is_empty(),
            "zero: never"
        );
    }

    #[test]
    fn a_waiting_session_is_not_busy_but_still_live() {
        let mut pool = Pool::<u32>::new(4, 1);
        opened(pool.take("a", "a"));
        assert!(matches!(pool.take("a", "a"), Take::Full), "a is at its cap");
        pool.unbusy("a");
        opened(pool.take("a", "a"));
        assert_eq!(
            pool.live, 2,
            "the waiting session still counts toward the pool"
        );
        pool.forget();
        pool.discard("a");
        assert_eq!((pool.live, pool.busy.len()), (0, 0));
        pool.busy("a");
        assert!(
            matches!(pool.take("a", "a"), Take::Full),
            "busy again once its call goes on"
        );
    }
}
