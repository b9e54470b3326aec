//! One tunnel stream served against a Streamable HTTP upstream: its MCP client session
//! upstream (session id, negotiated version, the caller's identity assertion), each message
//! POSTed with the headers that session needs, the standalone GET stream, and the DELETE that
//! ends the session.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use parking_lot::Mutex;
use serde_json::value::RawValue;

use super::HttpSource;
use super::answer::{EventBody, SseEnd, answered, id_key};
use super::bridge::Checkout;
use super::client::{Response, body_stream, content_length, error_chain};
use super::error::UpstreamError;
use super::session::HttpSession;
use crate::client::sources::Out;
use crate::client::sources::stream::Inbound;
use crate::client::sources::streams::StreamNo;
use crate::govern::assertion::Assertion;
use crate::mcp::era::{SESSION_HEADER, VERSION_HEADER};
use crate::mcp::jsonrpc::{MessageKind, error_body};
use crate::mcp::{Classified, classify};
use crate::wire::{Era, Frame, FrameKind, OpenHeader, UNSOLICITED};

/// Time a DELETE of an upstream session may take when a stream ends.
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the requests after `notifications/initialized` wait for the upstream to answer the
/// GET stream: a loopback or LAN upstream answers in milliseconds; one that does not answer
/// within this costs the session's first request no more.
pub(super) const GET_STREAM_OPENING: Duration = Duration::from_secs(2);

/// The least time requests in flight on a stream that ended run on, for their answers to be
/// replayed (see [`StreamContext::run`]).
const DETACHED_ANSWERS: Duration = Duration::from_secs(300);

/// Whether `response` is an event stream (by its content type).
pub(super) fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"))
}

/// Whether `body` is a JSON-RPC error response.
fn is_error(body: &[u8]) -> bool {
    let mut scanner = crate::mcp::ResponseScanner::new();
    scanner.feed(body);
    scanner.facts().is_some_and(|facts| facts.is_error)
}

/// Text of an upstream error body quoted in a synthesized error.
const QUOTE_LIMIT: usize = 200;

/// The headers of every POST upstream: a JSON body, and JSON or an event stream accepted back.
pub(super) fn base_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    headers
}

/// The relay-signed identity of the caller, when the tenant enables it for this source: only
/// in the `x-` header namespace, so it can never replace `Host` or credentials.
pub(super) fn insert_assertion(headers: &mut HeaderMap, assertion: Option<&Assertion>) {
    if let Some(assertion) = assertion
        && crate::govern::assertion::header_name_allowed(&assertion.header)
        && let (Ok(name), Ok(mut value)) = (
            HeaderName::try_from(assertion.header.as_str()),
            HeaderValue::from_str(&assertion.token),
        )
    {
        // Sensitive: never logged, and dropped on a redirect to another origin.
        value.set_sensitive(true);
        headers.insert(name, value);
    }
}

/// Shared by the tasks serving one stream.
pub(super) struct StreamContext {
    pub(super) source: Arc<HttpSource>,
    pub(super) header: OpenHeader,
    /// The upstream session the stream carries (shared with the other streams carrying it).
    pub(super) session: Arc<HttpSession>,
    /// The stream's frames toward the relay, and its number among the session's streams;
    /// `None` in the context of the session's own tasks (its GET stream, its final DELETE),
    /// which send only server-initiated messages.
    out: Option<(Out, StreamNo)>,
    /// The largest message the tunnel carries toward the relay.
    pub(super) max_frame: usize,
    /// The largest answer relayed in pieces (never below `max_frame`).
    pub(super) max_answer: usize,
    /// The relay's number for this stream, when the session is held and the relay replays
    /// answers (wire version 3): each answer is kept under it and its exchange (see
    /// [`crate::client::sources::replay`]).
    relay_stream: Option<u64>,
    /// A stateless agent's stream carried by a session-era upstream session (see
    /// [`super::bridge`]): requests go with the session's headers, `server/discover` is
    /// answered here, and results are completed for the agent's era.
    bridged: bool,
    /// A bridged stream's session, checked out of its source's pool (see
    /// [`super::bridge::Checkout`]): given back when the stream is done, or moved into the
    /// call that waits for its agent's input.
    pub(super) checkout: Mutex<Option<Checkout>>,
    /// The id a retried call's answer goes out under (the retry's: the upstream answers the
    /// first attempt's), when this stream carries a retry (see [`super::bridge`]).
    pub(super) reanswer: Option<Box<RawValue>>,
    /// The `input_required` answers of a 2026-07-28 upstream to a session-era agent, held back
    /// from the agent, by exchange (see [`super::stateless_upstream`]).
    pub(super) input_required: Mutex<std::collections::HashMap<u64, Bytes>>,
}

impl StreamContext {
    /// The context of one stream of `source`, opened with `header`, carrying `session`,
    /// writing to `out` (server-initiated messages `numbered` or not: see
    /// [`StreamSet::attach`](crate::client::sources::streams::StreamSet::attach)).
    pub(super) fn new(
        source: Arc<HttpSource>,
        header: OpenHeader,
        session: Arc<HttpSession>,
        (out, numbered): (Out, bool),
        max_frame: usize,
        max_answer: usize,
    ) -> Self {
        let number = session.outlet.streams.attach(&out, numbered);
        let relay_stream = header
            .session
            .as_ref()
            .and_then(|named| named.stream)
            .filter(|_| session.handle.is_some());
        let context = Self {
            source,
            header,
            session,
            out: Some((out, number)),
            max_frame,
            max_answer,
            relay_stream,
            bridged: false,
            checkout: Mutex::new(None),
            reanswer: None,
            input_required: Mutex::default(),
        };
        tracing::debug!(source = %context.source.name, context = %context.header.context, subject = %context.header.subject, era = ?context.header.era, "stream opened");
        context
    }

    /// The context the session's own tasks run in: this stream's, without the stream.
    pub(super) fn for_session(&self) -> Self {
        Self {
            source: self.source.clone(),
            header: self.header.clone(),
            session: self.session.clone(),
            out: None,
            max_frame: self.max_frame,
            max_answer: self.max_answer,
            relay_stream: None,
            bridged: self.bridged,
            checkout: Mutex::new(None),
            reanswer: None,
            input_required: Mutex::default(),
        }
    }

    /// Makes this the context of a bridged stream over `checkout`'s session (see
    /// [`super::bridge`]).
    pub(super) fn bridged(mut self, checkout: Checkout) -> Self {
        self.bridged = true;
        self.checkout = Mutex::new(Some(checkout));
        self
    }

    /// Makes this the stream of a retried call, whose answer goes out under `id`.
    pub(super) fn answering_as(mut self, id: Box<RawValue>) -> Self {
        self.reanswer = Some(id);
        self
    }

    /// Whether the stream is bridged (see [`super::bridge`]).
    pub(super) fn is_bridged(&self) -> bool {
        self.bridged
    }

    /// Whether answers are rewritten whole (a retried call's, under the retry's id): they
    /// never go in pieces.
    pub(super) fn rewrites_answers(&self) -> bool {
        self.reanswer.is_some()
    }

    /// The era the upstream is spoken to in: the agent's, unless the stream is bridged.
    fn upstream_era(&self) -> Era {
        if self.bridged {
            Era::Session
        } else {
            self.header.era
        }
    }

    /// Serves the stream's messages until it ends. `initialize` and messages without requests
    /// go upstream in order; requests go at once, each answered while the next is read.
    /// Requests still in flight when the stream ends are abandoned, unless their answers are
    /// kept for a replay: then they run on, for at most [`DETACHED_ANSWERS`] (or the session's
    /// idle time, if longer). Returns whether requests were still in flight when it ended.
    /// `first` is a message already read from `inbound`, served before any other.
    pub(super) async fn run(
        self: Arc<Self>,
        mut first: Option<Frame>,
        inbound: &mut Inbound,
    ) -> bool {
        if self.relay_stream.is_some() {
            inbound.replays_answers();
        }
        // Requests in flight run inside this task, polled beside the next frame's read: a call
        // costs no task of its own, and its answer no hand-off between tasks (or threads).
        // Boxed: the set keeps a stub the size of its future type for as long as the stream
        // lives, a few KiB per idle session unboxed.
        let mut requests: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        loop {
            let frame = match first.take() {
                Some(frame) => Some(frame),
                None => tokio::select! {
                    frame = inbound.next_message_with(|frame| self.signal(frame)) => frame,
                    Some(()) = requests.next(), if !requests.is_empty() => continue,
                },
            };
            let Some(frame) = frame else {
                break;
            };
            let classified = classify(&frame.payload).ok();
            let is_initialize = matches!(&classified, Some(Classified::Single(m)) if m.method.as_deref() == Some("initialize"));
            let has_requests = classified.as_ref().is_none_or(Classified::has_requests);
            let is_initialized = matches!(&classified, Some(Classified::Single(m)) if m.method.as_deref() == Some("notifications/initialized"));
            if is_initialize || !has_requests {
                // In order: the session id must exist before the next message, and
                // notifications must reach the upstream before requests sent after them.
                // Requests already in flight keep going meanwhile.
                // Boxed, so this rare path does not size the stream's future, which every
                // idle session keeps for as long as it lives.
                let mut ordered: BoxFuture<'_, ()> = Box::pin(async {
                    self.exchange(frame.exchange, frame.payload, classified)
                        .await;
                    // The upstream's GET stream opens before the next request goes: a server
                    // may send what it has for the agent on it at once (a request in mid-call
                    // made without naming the call), and drop it while no GET stream is open.
                    if is_initialized
                        && self.header.era == Era::Session
                        && let Some(answered) = self.session.start_get_stream()
                    {
                        let _ = tokio::time::timeout(GET_STREAM_OPENING, answered).await;
                    }
                });
                loop {
                    tokio::select! {
                        () = &mut ordered => break,
                        Some(()) = requests.next(), if !requests.is_empty() => {}
                    }
                }
            } else {
                let context = self.clone();
                requests.push(Box::pin(async move {
                    context
                        .exchange(frame.exchange, frame.payload, classified)
                        .await
                }));
            }
        }
        let abandoned = !requests.is_empty();
        if self.relay_stream.is_some() && !inbound.closed_by_relay() && abandoned {
            // The stream is gone, not the session: the answers still come, kept for the
            // relay the agent resumes on.
            let grace = self.source.held.idle().max(DETACHED_ANSWERS);
            tokio::spawn(async move {
                let drained = async { while requests.next().await.is_some() {} };
                if tokio::time::timeout(grace, drained).await.is_err() {
                    tracing::debug!("answers of a gone stream not finished in time: abandoned");
                }
            });
        }
        abandoned
    }

    /// Takes a relay's signal between messages: an identity frame renews the assertion for
    /// every upstream request sent from now on, in frame order; a listen frame says the agent
    /// reads server-initiated messages on this stream.
    fn signal(&self, frame: &Frame) {
        match frame.kind {
            FrameKind::Listen | FrameKind::Replay => {
                if let Some((out, number)) = &self.out {
                    self.session.outlet.signal(*number, out, frame);
                }
            }
            _ => match frame.parse_json::<Assertion>(FrameKind::Identity) {
                Ok(assertion) => *self.session.assertion.lock() = Some(assertion),
                Err(e) => tracing::warn!(error = %e, "bad identity frame ignored"),
            },
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.source.name
    }

    pub(super) fn session_id(&self) -> Option<HeaderValue> {
        self.session.id()
    }

    /// Sends a frame toward the relay: an exchange's on this stream, a server-initiated
    /// message on the stream the session's agent listens on.
    pub(super) async fn send(&self, frame: Frame) {
        if self.bridged && frame.exchange == UNSOLICITED && frame.kind == FrameKind::Message {
            // A bridged session's GET stream: a request belongs to the call that has the
            // session; anything else has no agent to go to (a stateless agent has no stream
            // of its own to the upstream).
            let is_request = matches!(classify(&frame.payload), Ok(Classified::Single(m)) if m.kind == MessageKind::Request);
            if !(is_request && self.session.push_ask(frame.payload)) {
                metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
                tracing::debug!(source = %self.name(), request = is_request, "a message on a bridged session's GET stream dropped: no call takes it");
            }
            return;
        }
        if frame.exchange == UNSOLICITED && frame.kind == FrameKind::Message {
            if self.session.declared().is_some() {
                // A `subscriptions/listen` stream carries the upstream's acknowledgement and, at
                // its end, the answer to our own request: neither is the agent's (its era has
                // no such notification, and the id is ours).
                let notification = matches!(classify(&frame.payload), Ok(Classified::Single(m)) if m.kind == MessageKind::Notification);
                let acknowledged = memchr::memmem::find(
                    &frame.payload,
                    b"notifications/subscriptions/acknowledged",
                )
                .is_some();
                if !notification || acknowledged {
                    return;
                }
            }
            return self.session.send_unsolicited(frame).await;
        }
        if frame.kind == FrameKind::Message
            && memchr::memmem::find(&frame.payload, b"input_required").is_some()
            && self.session.declared().is_some()
            && crate::mcp::bridge::InputRequired::parse(&frame.payload).is_some()
        {
            // Asked of the agent the way its era asks, by the exchange (see
            // `stateless_upstream`).
            self.input_required
                .lock()
                .insert(frame.exchange, frame.payload);
            return;
        }
        let frame = if self.bridged && frame.kind == FrameKind::Message {
            let method = self.header_value(crate::mcp::era::METHOD_HEADER);
            let mut payload = crate::mcp::bridge::complete(frame.payload, method);
            if let Some(id) = &self.reanswer
                && matches!(classify(&payload), Ok(Classified::Single(m)) if m.kind == MessageKind::Response)
                && let Some(rewritten) = crate::mcp::bridge::reidentify(&payload, id)
            {
                payload = rewritten;
            }
            Frame::message(frame.exchange, payload)
        } else {
            frame
        };
        let frame = match self.relay_stream {
            Some(stream) if frame.exchange != UNSOLICITED => {
                match self
                    .session
                    .outlet
                    .replays
                    .send((stream, frame.exchange), frame)
                    .await
                {
                    Ok(()) => return,
                    Err(frame) => frame,
                }
            }
            _ => frame,
        };
        if let Some((out, _)) = &self.out {
            // A closed stream means nobody is waiting for this frame.
            let _ = out.send(frame).await;
        }
    }

    /// A routing header the agent sent (see [`OpenHeader::mcp_headers`]), by lower-case name.
    fn header_value(&self, name: &str) -> Option<&str> {
        self.header
            .mcp_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn headers(&self, is_initialize: bool) -> HeaderMap {
        let mut headers = base_headers();
        match self.upstream_era() {
            Era::Session => {
                let session = self.session.upstream.lock();
                if let Some(id) = &session.id {
                    headers.insert(SESSION_HEADER, id.clone());
                }
                if let (Some(version), false) = (&session.version, is_initialize) {
                    headers.insert(VERSION_HEADER, version.clone());
                }
                drop(session);
                if self.bridged && !is_initialize {
                    self.insert_mcp_headers(&mut headers);
                }
            }
            Era::Stateless => {
                if let Some(version) = self
                    .header
                    .protocol_version
                    .as_deref()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    headers.insert(VERSION_HEADER, version);
                }
                self.insert_mcp_headers(&mut headers);
            }
        }
        let assertion = self.session.assertion.lock().clone();
        insert_assertion(&mut headers, assertion.as_ref());
        headers
    }

    /// The agent's MCP routing headers, untouched. Only those, whatever the relay sends:
    /// nothing it says can set `Host`, credentials, cookies or the session upstream.
    fn insert_mcp_headers(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.header.mcp_headers {
            if !crate::mcp::era::relayed_header_allowed(name) {
                tracing::warn!(source = %self.source.name, header = ?name, "header from the relay not sent upstream: only Mcp-Method, Mcp-Name and Mcp-Param-* are");
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
    }

    /// The headers of a GET for an event stream (the standalone stream, or a resumed answer).
    pub(super) fn event_stream_headers(&self) -> HeaderMap {
        let mut headers = self.headers(false);
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        headers.remove(CONTENT_TYPE);
        headers
    }

    /// A GET of the source's URL.
    pub(super) async fn get(
        &self,
        headers: HeaderMap,
    ) -> Result<Response, super::client::RequestError> {
        self.source
            .client
            .send(Method::GET, &self.source.target, headers, Bytes::new())
            .await
    }

    /// POSTs one message and relays what the upstream answers, tagged with `exchange`, then
    /// `End`. Every request in the message gets an answer: the upstream's, or an error that
    /// says why there is none.
    async fn exchange(&self, exchange: u64, payload: Bytes, classified: Option<Classified>) {
        let is_initialize = matches!(&classified, Some(Classified::Single(m)) if m.method.as_deref() == Some("initialize"));
        let requests: Vec<&crate::mcp::MessageInfo> = classified
            .iter()
            .flat_map(|c| c.messages())
            .filter(|m| m.kind == MessageKind::Request)
            .collect();
        let mut pending: HashSet<String> = requests
            .iter()
            .filter_map(|m| m.id.as_deref())
            .map(id_key)
            .collect();
        if let (Some(stream), Some((out, _)), false) =
            (self.relay_stream, &self.out, requests.is_empty())
        {
            let ids = requests.iter().filter_map(|m| m.id.clone()).collect();
            let key = (stream, exchange);
            self.session
                .outlet
                .replays
                .begin(key, payload.clone(), ids, out, exchange);
        }
        if let Some(declared) = self.session.declared() {
            return self
                .exchange_stateless(exchange, payload, classified.as_ref(), &declared)
                .await;
        }
        let discover = requests
            .first()
            .filter(|m| self.bridged && m.method.as_deref() == Some("server/discover"))
            .and_then(|m| m.id.as_deref());
        if let Some(answer) = discover.and_then(|id| self.discover_answer(id)) {
            self.send(Frame::message(exchange, answer)).await;
            return self.send(Frame::end(exchange)).await;
        }
        let mut result = self
            .post(exchange, payload.clone(), is_initialize, &mut pending)
            .await;
        if let Err(UpstreamError::Expired { .. }) = result {
            // A bridged session the upstream forgot: open it again, and send the request once
            // more (nothing of its answer went to the agent).
            tracing::debug!(source = %self.name(), "bridged upstream session expired; opened again");
            result = match self.handshake().await {
                Ok(()) => {
                    self.post(exchange, payload.clone(), is_initialize, &mut pending)
                        .await
                }
                Err(e) => Err(e),
            };
        }
        let result = match result {
            Ok(Some(asked)) => self.asked(exchange, &payload, asked, &mut pending).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.fail_pending(exchange, &requests, &pending, result)
            .await;
        self.send(Frame::end(exchange)).await;
        if self.session.is_gone() {
            self.send(Frame::close(format!(
                "source {} ended the session",
                self.name()
            )))
            .await;
        }
    }

    /// Answers the requests still `pending` after `result` failed with the error that says
    /// why (none when the upstream broke off inside an answer already partly relayed).
    pub(super) async fn fail_pending(
        &self,
        exchange: u64,
        requests: &[&crate::mcp::MessageInfo],
        pending: &HashSet<String>,
        result: Result<(), UpstreamError>,
    ) {
        if let Err(error) = result {
            tracing::warn!(source = %self.name(), error = %error, "upstream exchange failed");
            let abandoned = matches!(error, UpstreamError::BrokeOff { .. });
            for request in requests.iter().filter(|m| {
                !abandoned
                    && m.id
                        .as_deref()
                        .is_some_and(|id| pending.contains(&id_key(id)))
            }) {
                self.send(Frame::message(
                    exchange,
                    error_body(request.id.as_deref(), error.code(), &error.to_string()),
                ))
                .await;
            }
        }
    }

    /// POSTs `payload` and relays the answer; in a bridged stream, what the upstream asked its
    /// client in mid-answer, with the rest of the answer (see [`SseEnd::Asked`]).
    async fn post(
        &self,
        exchange: u64,
        payload: Bytes,
        is_initialize: bool,
        pending: &mut HashSet<String>,
    ) -> Result<Option<(Bytes, Box<EventBody>)>, UpstreamError> {
        let sent = payload.clone();
        let response = self
            .source
            .client
            .send(
                Method::POST,
                &self.source.target,
                self.headers(is_initialize),
                payload,
            )
            .await
            .map_err(|e| UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })?;
        self.relay_answer(exchange, response, (is_initialize, &sent), pending)
            .await
    }

    /// Relays the upstream's answer to a POST of `sent` (see [`StreamContext::post`]).
    pub(super) async fn relay_answer(
        &self,
        exchange: u64,
        response: Response,
        (is_initialize, sent): (bool, &Bytes),
        pending: &mut HashSet<String>,
    ) -> Result<Option<(Bytes, Box<EventBody>)>, UpstreamError> {
        let status = response.status();
        if is_initialize && let Some(id) = response.headers().get(SESSION_HEADER) {
            self.session.upstream.lock().keep_id(id);
        }
        if status == StatusCode::ACCEPTED {
            return Ok(None);
        }
        if status == StatusCode::NOT_FOUND
            && self.upstream_era() == Era::Session
            && !is_initialize
            && self.session_id().is_some()
        {
            if self.bridged && !self.session.is_gone() {
                self.session.mark_gone();
                return Err(UpstreamError::Expired {
                    source_name: self.name().to_owned(),
                });
            }
            // The upstream forgot the session: ours ends once this answer (with the upstream's
            // 404, which tells the agent to initialize again) is through (see `exchange`).
            self.session.mark_gone();
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") && status.is_success() {
            if is_initialize {
                self.send_resumable().await;
            }
            return match self.relay_sse(exchange, response, pending).await? {
                SseEnd::Answered => Ok(None),
                SseEnd::Asked(request, rest) => Ok(Some((request, rest))),
            };
        }
        // `initialize` answers are read whole: the session's version is learned from them.
        if status.is_success() && !is_initialize {
            return self
                .relay_json(exchange, response, pending)
                .await
                .map(|()| None);
        }
        let body = self.read_limited(response).await?;
        if is_initialize
            && (!status.is_success() || is_error(&body))
            && let Some(answer) = self.bridge_to_stateless(sent).await
        {
            // The upstream speaks only 2026-07-28: this session is bridged to it.
            self.send_resumable().await;
            answered(&answer, pending);
            self.send(Frame::message(exchange, answer)).await;
            return Ok(None);
        }
        if !status.is_success() {
            if content_type.starts_with("application/json") && classify(&body).is_ok() {
                // A JSON-RPC error from the upstream passes through unchanged, status included.
                self.send(Frame::rejected(exchange, status.as_u16())).await;
                answered(&body, pending);
                self.send(Frame::message(exchange, body)).await;
                return Ok(None);
            }
            self.send(Frame::rejected(exchange, status.as_u16())).await;
            let text = String::from_utf8_lossy(&body[..body.len().min(QUOTE_LIMIT)])
                .trim()
                .to_owned();
            return Err(UpstreamError::Status {
                source_name: self.name().to_owned(),
                status,
                body: text,
            });
        }
        if is_initialize {
            self.send_resumable().await;
            self.remember_version(&body);
        }
        if body.is_empty() {
            return Ok(None);
        }
        answered(&body, pending);
        self.send(Frame::message(exchange, body)).await;
        Ok(None)
    }

    /// Tells the relay what resumes a held session, before any of its `initialize` answer:
    /// the relay seals it into the agent's session id.
    async fn send_resumable(&self) {
        if self.session.handle.is_some() {
            self.send(Frame::json(FrameKind::Resumable, &self.session.resumable()))
                .await;
        }
    }

    pub(super) fn remember_version(&self, body: &[u8]) {
        #[derive(serde::Deserialize)]
        struct InitResult {
            result: Option<Negotiated>,
        }
        #[derive(serde::Deserialize)]
        struct Negotiated {
            #[serde(rename = "protocolVersion")]
            protocol_version: String,
        }
        if let Ok(InitResult {
            result: Some(negotiated),
        }) = serde_json::from_slice::<InitResult>(body)
            && let Ok(value) = HeaderValue::from_str(&negotiated.protocol_version)
        {
            self.session.upstream.lock().version = Some(value);
        }
    }

    async fn read_limited(&self, response: Response) -> Result<Bytes, UpstreamError> {
        let limit = self.max_frame;
        if content_length(&response).is_some_and(|len| len > limit as u64) {
            return Err(UpstreamError::TooLarge {
                source_name: self.name().to_owned(),
                limit,
            });
        }
        let mut body = bytes::BytesMut::new();
        let mut chunks = body_stream(response);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| UpstreamError::Broken {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })?;
            if body.len() + chunk.len() > limit {
                return Err(UpstreamError::TooLarge {
                    source_name: self.name().to_owned(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// DELETEs the upstream session, if there is one.
    pub(super) async fn delete_upstream_session(&self) {
        let Some(id) = self.session_id() else { return };
        let mut headers = self.headers(false);
        headers.insert(SESSION_HEADER, id);
        let request =
            self.source
                .client
                .send(Method::DELETE, &self.source.target, headers, Bytes::new());
        match tokio::time::timeout(DELETE_TIMEOUT, request).await {
            Ok(Ok(response)) => {
                tracing::debug!(source = %self.name(), status = %response.status(), "upstream session deleted")
            }
            Ok(Err(e)) => {
                tracing::debug!(source = %self.name(), error = %error_chain(&e), "upstream session delete failed")
            }
            Err(_) => {
                tracing::debug!(source = %self.name(), timeout = ?DELETE_TIMEOUT, "upstream session delete timed out")
            }
        }
    }
}
