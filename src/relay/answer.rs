//! Answering agents: forward a message down its tunnel stream and turn what comes back into
//! plain JSON, or into an SSE stream backed by an [`EventLog`] (resumable in the session era).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::RelayState;
use super::agent::{source_error, source_error_body};
use super::calls::{Context, InFlight};
use super::channel::{Channel, ChannelError, Event, Exchange};
use super::events::{EventLog, LogReader, Start};
use super::filter::ListFilter;
use super::reply::json_response;
use super::sessions::{Session, Transport};
use crate::govern::audit::Outcome;
use crate::mcp::jsonrpc::{
    Classified, MessageInfo, MessageKind, cancelled_notification, codes, error_body,
};
use crate::mcp::{ProtocolEra, classify, sse};

/// The reconnection delay suggested to agents in priming events.
const SSE_RETRY: Duration = Duration::from_secs(1);

/// SSE chunks buffered toward a slow agent before the log reader waits.
const SSE_QUEUE: usize = 16;

/// Attached to a plain JSON answer: the message, and whether it is a JSON-RPC error (so
/// `initialize` creates no session on an error, and learns the negotiated version otherwise).
#[derive(Clone)]
pub struct JsonAnswer {
    /// The upstream's response.
    pub message: Bytes,
    /// Whether it is a JSON-RPC error.
    pub is_error: bool,
}

/// How an SSE answer names its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventIds {
    /// No ids: the stream cannot be resumed (2026-07-28, HTTP+SSE).
    None,
    /// `<stream>-<seq>` ids, for `Last-Event-ID` resumption.
    Resumable,
    /// Resumable, and opened by a priming event (an id with empty data, and a `retry:` hint),
    /// as 2025-11-25 servers do, so a client can resume even before the first message.
    Primed,
}

/// Where an agent message goes and how its answer is delivered.
pub struct Target<'a> {
    /// The source, for error messages.
    pub source: &'a str,
    /// The session (session era), whose logs make SSE answers resumable.
    pub session: Option<&'a Arc<Session>>,
    /// The protocol era of the request.
    pub era: ProtocolEra,
    /// Policy's filter for a list answer, if the caller's tenant has roles.
    pub filter: Option<ListFilter>,
    /// The calls of the message, finished as their answers are released.
    pub calls: InFlight,
}

/// What an agent request waits for on its exchange.
struct Awaiting {
    /// The first request id (for relay-made errors).
    id: Option<Box<RawValue>>,
    /// Responses that complete the answer: one per request in the body.
    responses: usize,
    /// The request timeout, or none (a `subscriptions/listen` stream).
    timeout: Option<Duration>,
    /// The source's name.
    source: String,
    /// A session still to learn its protocol version from the answer (an `initialize`
    /// answered as a stream).
    learner: Option<Arc<Session>>,
    /// Policy's filter for a list answer.
    filter: Option<Arc<ListFilter>>,
    /// The calls awaiting their answers.
    calls: InFlight,
    /// The session whose server requests ride this answer stream, to be tracked.
    tracker: Option<Arc<Session>>,
}

impl Awaiting {
    /// The message as the caller may see it.
    fn filtered(&self, message: Bytes) -> Bytes {
        match &self.filter {
            Some(filter) => filter.apply(message),
            None => message,
        }
    }
}

impl Awaiting {
    fn new(state: &RelayState, source: &str, requests: &[&MessageInfo], era: ProtocolEra) -> Self {
        // A listen stream lasts as long as the agent wants it; no request timeout applies.
        let is_listen = era == ProtocolEra::Stateless
            && requests
                .iter()
                .any(|m| m.method.as_deref() == Some("subscriptions/listen"));
        Self {
            id: requests.first().and_then(|m| m.id.clone()),
            responses: requests.len(),
            timeout: (!is_listen).then(|| state.limits.request_timeout()),
            source: source.to_owned(),
            learner: None,
            filter: None,
            calls: InFlight::default(),
            tracker: None,
        }
    }

    /// Finishes every open call with `outcome` and returns the relay-made error `answer` to
    /// release (or the error saying the calls could not be audited).
    async fn fail(&mut self, outcome: Outcome, answer: Bytes) -> Bytes {
        self.calls.fail(outcome, answer).await
    }

    /// A relay-made error saying the source could not answer, its calls finished as tunnel
    /// errors.
    async fn source_failed(&mut self, why: &str) -> Bytes {
        let body = source_error_body(self.id.as_deref(), &self.source, why);
        self.fail(Outcome::TunnelError, body).await
    }
}

fn requests(classified: &Classified) -> Vec<&MessageInfo> {
    classified
        .messages()
        .iter()
        .filter(|m| m.kind == MessageKind::Request)
        .collect()
}

/// Sends the body down `channel` and answers the agent: 202 for notifications and responses,
/// else the upstream's answer as JSON or SSE.
pub async fn forward(
    state: &Arc<RelayState>,
    channel: &Arc<Channel>,
    body: Bytes,
    classified: &Classified,
    target: Target<'_>,
) -> Response {
    let requests = requests(classified);
    if requests.is_empty() {
        if let Some(session) = target.session
            && let Err(refusal) = session.answer_server_requests(&body, classified).await
        {
            return json_response(StatusCode::OK, refusal);
        }
        return match channel.send(body).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(e) => source_error(None, target.source, &e.to_string()),
        };
    }
    let mut calls = target.calls;
    calls.set_context(&Context {
        transport: Some(channel.transport()),
        ..Context::default()
    });
    let awaiting = Awaiting::new(state, target.source, &requests, target.era);
    let mut awaiting = Awaiting {
        filter: target.filter.map(Arc::new),
        calls,
        ..awaiting
    };
    match channel.request(body).await {
        Ok(exchange) => answer(state, channel.clone(), exchange, awaiting, target.session).await,
        Err(e) => json_response(StatusCode::OK, awaiting.source_failed(&e.to_string()).await),
    }
}

/// The HTTP+SSE transport: every answer rides the session's one stream; the POST gets 202.
pub async fn forward_to_stream(
    state: &Arc<RelayState>,
    session: &Arc<Session>,
    body: Bytes,
    classified: &Classified,
    filter: Option<ListFilter>,
    calls: InFlight,
) -> Response {
    let requests = requests(classified);
    if requests.is_empty() {
        if let Err(refusal) = session.answer_server_requests(&body, classified).await {
            session.standalone().push(refusal).await;
            return StatusCode::ACCEPTED.into_response();
        }
        return match session.channel.send(body).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(e) => source_error(None, &session.source, &e.to_string()),
        };
    }
    let awaiting = Awaiting::new(state, &session.source, &requests, ProtocolEra::Session);
    let mut awaiting = Awaiting {
        filter: filter.map(Arc::new),
        calls,
        tracker: Some(session.clone()),
        ..awaiting
    };
    match session.channel.request(body).await {
        Ok(exchange) => {
            tokio::spawn(produce(
                session.standalone().clone(),
                exchange,
                None,
                awaiting,
                state.stop.clone(),
                session.channel.clone(),
                false,
            ));
            StatusCode::ACCEPTED.into_response()
        }
        Err(e) => json_response(StatusCode::OK, awaiting.source_failed(&e.to_string()).await),
    }
}

/// Waits for the next event, within the request timeout if one applies.
async fn next_event(
    exchange: &mut Exchange,
    timeout: Option<Duration>,
) -> Option<Result<Event, ChannelError>> {
    match timeout {
        Some(limit) => tokio::time::timeout(limit, exchange.next()).await.ok(),
        None => Some(exchange.next().await),
    }
}

/// A message from the upstream, classified once for everything the relay needs of it.
struct Arrived {
    message: Bytes,
    classified: Option<Classified>,
    /// How many responses it carries (a batch may carry several).
    responses: usize,
    /// Whether any of them is an error.
    is_error: bool,
}

impl Arrived {
    fn new(message: Bytes) -> Self {
        let classified = classify(&message).ok();
        let (responses, is_error) = classified
            .iter()
            .flat_map(Classified::messages)
            .filter(|m| m.kind == MessageKind::Response)
            .fold((0, false), |(n, e), m| (n + 1, e || m.error_code.is_some()));
        Self {
            message,
            classified,
            responses,
            is_error,
        }
    }
}

/// Releases an upstream message of a streamed answer into `log`: the session learns its
/// version and tracks server requests from it, and the calls it answers are finished (and
/// audited) before it is pushed. Returns how many responses it carried.
async fn release(log: &EventLog, awaiting: &mut Awaiting, arrived: Arrived) -> usize {
    if let Some(session) = &awaiting.learner {
        session.learn_version(&arrived.message);
    }
    if let (Some(session), Some(classified)) = (&awaiting.tracker, &arrived.classified) {
        session.track_server_requests(&arrived.message, classified);
    }
    let released = awaiting.filtered(arrived.message.clone());
    let released = match (&arrived.classified, arrived.responses) {
        (Some(classified), 1..) => match awaiting
            .calls
            .settle(&arrived.message, classified, released.len())
            .await
        {
            Ok(()) => released,
            Err(refusal) => refusal,
        },
        _ => {
            awaiting.calls.streamed(released.len());
            released
        }
    };
    log.push(released).await;
    arrived.responses
}

/// Answers with what arrives on `exchange`: plain JSON when the first message holds every
/// response, else an SSE stream that ends once every response has been sent.
async fn answer(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    mut exchange: Exchange,
    mut awaiting: Awaiting,
    session: Option<&Arc<Session>>,
) -> Response {
    let mut status = StatusCode::OK;
    loop {
        let event = tokio::select! {
            biased;
            _ = state.stop.cancelled() => {
                return json_response(StatusCode::OK, awaiting.source_failed("the relay is shutting down").await);
            }
            event = next_event(&mut exchange, awaiting.timeout) => event,
        };
        let Some(event) = event else {
            let body = timeout_body(&channel, &awaiting).await;
            return json_response(StatusCode::OK, awaiting.fail(Outcome::Timeout, body).await);
        };
        match event {
            Ok(Event::Rejected(code)) => {
                status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            Ok(Event::Message(message)) => {
                let arrived = Arrived::new(message);
                if arrived.responses >= awaiting.responses
                    && let Some(classified) = &arrived.classified
                {
                    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "ok").increment(1);
                    let message = awaiting.filtered(arrived.message.clone());
                    // Write before release: the record is committed before the agent sees
                    // the answer.
                    if let Err(refusal) = awaiting
                        .calls
                        .settle(&arrived.message, classified, message.len())
                        .await
                    {
                        return json_response(StatusCode::OK, refusal);
                    }
                    let mut response = json_response(status, message.clone());
                    response.extensions_mut().insert(JsonAnswer {
                        message,
                        is_error: arrived.is_error,
                    });
                    return response;
                }
                return stream_answer(state, channel, exchange, Some(arrived), awaiting, session);
            }
            Ok(Event::Streaming) => {
                return stream_answer(state, channel, exchange, None, awaiting, session);
            }
            Ok(Event::End) => {
                let body = awaiting
                    .source_failed("the upstream ended its response without answering")
                    .await;
                return json_response(StatusCode::OK, body);
            }
            Err(e) => {
                return json_response(StatusCode::OK, awaiting.source_failed(&e.to_string()).await);
            }
        }
    }
}

/// Answers as a stream: resumable (with event ids) when it belongs to a session.
fn stream_answer(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    exchange: Exchange,
    first: Option<Arrived>,
    awaiting: Awaiting,
    session: Option<&Arc<Session>>,
) -> Response {
    let (log, ids) = match session {
        Some(session) if session.transport == Transport::Streamable => {
            (session.answer_log(), session.event_ids())
        }
        _ => (Arc::new(EventLog::new(0)), EventIds::None),
    };
    let reader = log.attach(Start::Undelivered);
    let awaiting = Awaiting {
        learner: session.filter(|s| !s.knows_version()).cloned(),
        tracker: session.cloned(),
        ..awaiting
    };
    tokio::spawn(produce(
        log,
        exchange,
        first,
        awaiting,
        state.stop.clone(),
        channel,
        true,
    ));
    // An answer in flight may finish while the relay drains; at the end of the grace period
    // `produce` writes the error that names the shutdown and closes the log, which ends the
    // stream, so nothing but the log's end may end it.
    sse_response(state, reader, ids, None, None, CancellationToken::new())
}

async fn timeout_body(channel: &Channel, awaiting: &Awaiting) -> Bytes {
    if let Some(id) = &awaiting.id {
        // Tell the upstream to stop working on it.
        let _ = channel
            .send(cancelled_notification(
                id,
                "the relay's request timeout expired",
            ))
            .await;
    }
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "timeout").increment(1);
    let limit = awaiting.timeout.unwrap_or_default().as_secs();
    error_body(
        awaiting.id.as_deref(),
        codes::TIMEOUT,
        &format!("source {} did not answer within {limit} s", awaiting.source),
    )
}

/// Moves an exchange's messages into `log` until every response has arrived. If the exchange
/// ends first (upstream, tunnel, timeout), the agent still gets an answer: an error that says
/// why. `finish` closes the log (not for the shared stream of an HTTP+SSE session).
async fn produce(
    log: Arc<EventLog>,
    mut exchange: Exchange,
    first: Option<Arrived>,
    mut awaiting: Awaiting,
    shutdown: CancellationToken,
    channel: Arc<Channel>,
    finish: bool,
) {
    let mut remaining = awaiting.responses;
    if let Some(arrived) = first {
        remaining = remaining.saturating_sub(release(&log, &mut awaiting, arrived).await);
    }
    while remaining > 0 {
        let failure = tokio::select! {
            // At the end of the grace period the tunnel closes too: the shutdown is the reason.
            biased;
            _ = shutdown.cancelled() => awaiting.source_failed("the relay is shutting down").await,
            event = next_event(&mut exchange, awaiting.timeout) => match event {
                Some(Ok(Event::Message(message))) => {
                    let responses = release(&log, &mut awaiting, Arrived::new(message)).await;
                    remaining = remaining.saturating_sub(responses);
                    continue;
                }
                Some(Ok(Event::Rejected(_) | Event::Streaming)) => continue,
                Some(Ok(Event::End)) => awaiting.source_failed("the upstream ended its response without answering").await,
                Some(Err(e)) => awaiting.source_failed(&e.to_string()).await,
                None => {
                    let body = timeout_body(&channel, &awaiting).await;
                    awaiting.fail(Outcome::Timeout, body).await
                }
            },
        };
        log.push(failure).await;
        break;
    }
    if finish {
        log.finish();
    }
}

/// An SSE response that streams `reader`, with keep-alive comments, optionally after a
/// `prelude` event, until the stream ends, the agent goes away or `until` fires; then `on_end`
/// runs.
pub fn sse_response(
    state: &RelayState,
    mut reader: LogReader,
    ids: EventIds,
    prelude: Option<Bytes>,
    on_end: Option<Box<dyn FnOnce() + Send>>,
    until: CancellationToken,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(SSE_QUEUE);
    let shutdown = until;
    let keep_alive_every = state.sse_keep_alive;
    tokio::spawn(async move {
        let stream = reader.stream();
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + keep_alive_every,
            keep_alive_every,
        );
        let prime = (ids == EventIds::Primed)
            .then(|| sse::priming_event(&format!("{stream}-0"), SSE_RETRY));
        let mut open = true;
        for event in [prelude, prime].into_iter().flatten() {
            open = open && tx.send(Ok(event)).await.is_ok();
        }
        while open {
            open = tokio::select! {
                event = reader.next() => match event {
                    Some((seq, message)) => {
                        let id = (ids != EventIds::None).then(|| format!("{stream}-{seq}"));
                        tx.send(Ok(sse::message_event(id.as_deref(), &message))).await.is_ok()
                    }
                    None => false,
                },
                _ = keep_alive.tick() => tx.send(Ok(sse::KEEP_ALIVE)).await.is_ok(),
                _ = tx.closed() => false,
                _ = shutdown.cancelled() => false,
            };
        }
        drop(reader);
        if let Some(on_end) = on_end {
            on_end();
        }
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
