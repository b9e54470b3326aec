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
use super::events::{EventLog, LogReader, Piece, Start};
use super::filter::ListFilter;
use super::reply::json_response;
use super::sessions::{CancelGuard, ListenGuard, Session, Transport};
use crate::govern::audit::Outcome;
use crate::mcp::jsonrpc::{
    Classified, MessageInfo, MessageKind, cancelled_notification, codes, error_body,
};
use crate::mcp::{ProtocolEra, ResponseScanner, classify, sse};

/// The reconnection delay suggested to agents in priming events.
const SSE_RETRY: Duration = Duration::from_secs(1);

/// SSE chunks buffered toward a slow agent before the log reader waits.
const SSE_QUEUE: usize = 16;

/// Pieces of a streamed JSON answer buffered toward a slow agent before the relay stops
/// reading the exchange (and the tunnel's flow control slows the upstream): with `connect`'s
/// 256 KiB pieces about 1 MiB per answer, enough to keep the agent's connection busy while
/// the next piece crosses the tunnel.
const BODY_QUEUE: usize = 4;

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
    /// A stateless listen stream's place under the session caps, held while it is open.
    pub listen: Option<ListenGuard>,
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
    /// Whether a JSON answer arriving in pieces may be passed on as it comes: one request,
    /// not `initialize` (the relay learns the session's version from its whole answer).
    pipelined: bool,
    /// A listen stream's place under the session caps, given back when the answer ends.
    _listen: Option<ListenGuard>,
    /// Cancelled when the agent cancels the request: its answer ends at once, without one.
    cancelled: CancellationToken,
    /// The request's place in its session's cancellation table.
    _cancel: Option<CancelGuard>,
}

/// Why an exchange ended without its answer.
enum Broken {
    /// The relay is shutting down.
    Shutdown,
    /// The request timeout passed with nothing new.
    Timeout,
    /// The answer passed the per-message limit (bytes).
    TooLarge(usize),
    /// The upstream's response ended without (the rest of) the answer.
    Ended,
    /// The tunnel stream ended; the text says why.
    Closed(String),
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
        let pipelined = requests.len() == 1 && requests[0].method.as_deref() != Some("initialize");
        Self {
            id: requests.first().and_then(|m| m.id.clone()),
            responses: requests.len(),
            pipelined,
            timeout: (!is_listen).then(|| state.request_timeout()),
            source: source.to_owned(),
            learner: None,
            filter: None,
            calls: InFlight::default(),
            tracker: None,
            _listen: None,
            cancelled: CancellationToken::new(),
            _cancel: None,
        }
    }

    /// Follows the agent's cancellation of the message's request, when it is the only one
    /// and belongs to `session`.
    fn cancellable(mut self, session: Option<&Arc<Session>>) -> Self {
        if let (Some(session), 1, Some(id)) = (session, self.responses, self.id.as_deref()) {
            let guard = session.track_cancel(id);
            self.cancelled = guard.token().clone();
            self._cancel = Some(guard);
        }
        self
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

    /// Finishes every open call as `broken` says and returns the relay-made error to release
    /// (or the error saying the calls could not be audited).
    async fn broken(&mut self, channel: &Channel, broken: Broken) -> Bytes {
        match broken {
            Broken::Shutdown => self.source_failed("the relay is shutting down").await,
            Broken::Timeout => {
                let body = timeout_body(channel, self).await;
                self.fail(Outcome::Timeout, body).await
            }
            Broken::TooLarge(limit) => {
                metrics::counter!(crate::metrics::REQUESTS, "outcome" => "too_large").increment(1);
                let body = error_body(
                    self.id.as_deref(),
                    codes::TOO_LARGE,
                    &format!(
                        "source {} sent an answer larger than the limit of {limit} bytes",
                        self.source
                    ),
                );
                self.fail(Outcome::Error(codes::TOO_LARGE), body).await
            }
            Broken::Ended => {
                self.source_failed("the upstream ended its response without answering")
                    .await
            }
            Broken::Closed(reason) => self.source_failed(&reason).await,
        }
    }

    /// Whether a JSON answer whose first piece is `first` is passed on piece by piece: one
    /// request, no list filter (it needs the whole list), no result the trail keeps, and a
    /// single message (an object; a batch is read whole).
    fn pipelines(&self, first: &[u8]) -> bool {
        let mut scanner = ResponseScanner::new();
        scanner.feed(first);
        self.pipelined
            && self.filter.is_none()
            && !self.calls.keeps_results()
            && scanner.is_object()
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
        return match channel.send(body.clone()).await {
            Ok(()) => {
                if let Some(session) = target.session {
                    session.cancel_requests(&body, classified);
                }
                StatusCode::ACCEPTED.into_response()
            }
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
        _listen: target.listen,
        ..awaiting
    }
    .cancellable(target.session);
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
        return match session.channel.send(body.clone()).await {
            Ok(()) => {
                session.cancel_requests(&body, classified);
                StatusCode::ACCEPTED.into_response()
            }
            Err(e) => source_error(None, &session.source, &e.to_string()),
        };
    }
    let awaiting = Awaiting::new(state, &session.source, &requests, ProtocolEra::Session);
    let mut awaiting = Awaiting {
        filter: filter.map(Arc::new),
        calls,
        tracker: Some(session.clone()),
        learner: (!session.knows_version()).then(|| session.clone()),
        ..awaiting
    }
    .cancellable(Some(session));
    match session.channel.request(body).await {
        Ok(exchange) => {
            tokio::spawn(produce(
                session.standalone().clone(),
                exchange,
                None,
                awaiting,
                state.stop.clone(),
                session.channel.clone(),
                Ending {
                    finish: false,
                    with_reader: false,
                },
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

/// The next event of an exchange, or why none will come: shutdown, timeout, tunnel gone.
async fn next_or_broken(
    exchange: &mut Exchange,
    timeout: Option<Duration>,
    shutdown: &CancellationToken,
) -> Result<Event, Broken> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Broken::Shutdown),
        event = next_event(exchange, timeout) => match event {
            None => Err(Broken::Timeout),
            Some(Err(e)) => Err(Broken::Closed(e.to_string())),
            Some(Ok(event)) => Ok(event),
        },
    }
}

/// Reads the rest of a message that began with the piece `first`, whole: for answers that
/// policy or the session needs entire. The channel's reader bounds it by the per-message
/// limit.
async fn assemble(
    exchange: &mut Exchange,
    first: Bytes,
    timeout: Option<Duration>,
    shutdown: &CancellationToken,
) -> Result<Bytes, Broken> {
    let mut whole = bytes::BytesMut::from(first);
    loop {
        match next_or_broken(exchange, timeout, shutdown).await? {
            Event::Part(piece) => whole.extend_from_slice(&piece),
            Event::Message(last) => {
                whole.extend_from_slice(&last);
                return Ok(whole.freeze());
            }
            Event::TooLarge(limit) => return Err(Broken::TooLarge(limit)),
            Event::End => return Err(Broken::Ended),
            Event::Rejected(_) | Event::Streaming => {}
        }
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
            // The agent cancelled: no answer is owed, so the stream it gets ends empty (a
            // late answer finds no exchange and is dropped). Its call is recorded abandoned.
            _ = awaiting.cancelled.cancelled() => return cancelled_response(),
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
                return answer_message(
                    state, channel, exchange, awaiting, session, status, message,
                )
                .await;
            }
            Ok(Event::Part(first)) => {
                if awaiting.pipelines(&first) {
                    return pipe_answer(state, channel, exchange, awaiting, status, first);
                }
                return match assemble(&mut exchange, first, awaiting.timeout, &state.stop).await {
                    Ok(message) => {
                        answer_message(state, channel, exchange, awaiting, session, status, message)
                            .await
                    }
                    Err(broken) => {
                        json_response(StatusCode::OK, awaiting.broken(&channel, broken).await)
                    }
                };
            }
            Ok(Event::TooLarge(limit)) => {
                let body = awaiting.broken(&channel, Broken::TooLarge(limit)).await;
                return json_response(StatusCode::OK, body);
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

/// The answer to a request the agent cancelled before anything of its answer was sent: an
/// event stream with no event (the protocol owes no response to a cancelled request).
fn cancelled_response() -> Response {
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "cancelled").increment(1);
    let mut response = Response::new(Body::empty());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Answers with the first whole message of an exchange: plain JSON when it holds every
/// response, else an SSE stream of it and what follows.
async fn answer_message(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    exchange: Exchange,
    mut awaiting: Awaiting,
    session: Option<&Arc<Session>>,
    status: StatusCode,
    message: Bytes,
) -> Response {
    let arrived = Arrived::new(message);
    if arrived.responses >= awaiting.responses
        && let Some(classified) = &arrived.classified
    {
        metrics::counter!(crate::metrics::REQUESTS, "outcome" => "ok").increment(1);
        let message = awaiting.filtered(arrived.message.clone());
        // Write before release: the record is committed before the agent sees the answer.
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
    stream_answer(state, channel, exchange, Some(arrived), awaiting, session)
}

/// Answers with a JSON answer arriving in pieces, passing each on as it comes (a pipeline:
/// neither the relay nor `connect` holds it whole). The agent's response starts at once with
/// `status`; its body is fed from a bounded queue.
fn pipe_answer(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    exchange: Exchange,
    awaiting: Awaiting,
    status: StatusCode,
    first: Bytes,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(BODY_QUEUE);
    tokio::spawn(pipe(
        channel,
        exchange,
        awaiting,
        first,
        tx,
        state.stop.clone(),
    ));
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, super::reply::JSON);
    response
}

/// Moves the pieces of a JSON answer into the agent's body. The audit rule holds as for a
/// whole answer: from the piece that closes the JSON text on, pieces are held back until the
/// call's record is committed (an agent cannot use a JSON text without its end); the outcome,
/// error code and `isError` come from an incremental scan of the pieces as they pass. When
/// the answer breaks off (tunnel gone, timeout, over the limit, shutdown) or cannot be
/// recorded, the call is finished accordingly and the body ends with an error, so the agent
/// sees an aborted response, never a truncated one that looks complete.
async fn pipe(
    channel: Arc<Channel>,
    mut exchange: Exchange,
    mut awaiting: Awaiting,
    first: Bytes,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    shutdown: CancellationToken,
) {
    let mut scanner = ResponseScanner::new();
    let mut held: Vec<Bytes> = Vec::new();
    let mut piece = Some((first, false));
    let abort = |why: String| std::io::Error::other(why);
    while let Some((bytes, last)) = piece.take() {
        scanner.feed(&bytes);
        if scanner.is_complete() || last {
            held.push(bytes);
        } else if tx.send(Ok(bytes)).await.is_err() {
            // The agent went away: its call is recorded as abandoned when dropped.
            return;
        }
        if last {
            break;
        }
        while piece.is_none() {
            let event = tokio::select! {
                event = next_or_broken(&mut exchange, awaiting.timeout, &shutdown) => event,
                // The agent went away while the upstream was slow: stop waiting for it.
                _ = tx.closed() => return,
                // The agent cancelled: its body ends (aborted), and the rest is dropped.
                _ = awaiting.cancelled.cancelled() => {
                    let _ = tx.send(Err(abort("the request was cancelled".into()))).await;
                    return;
                }
            };
            let broken = match event {
                Ok(Event::Part(bytes)) => {
                    piece = Some((bytes, false));
                    continue;
                }
                Ok(Event::Message(bytes)) => {
                    piece = Some((bytes, true));
                    continue;
                }
                Ok(Event::Rejected(_) | Event::Streaming) => continue,
                Ok(Event::TooLarge(limit)) => Broken::TooLarge(limit),
                Ok(Event::End) => Broken::Ended,
                Err(broken) => broken,
            };
            // The relay-made error cannot follow a body already begun: the record says what
            // happened, and the agent's body ends with an error.
            let _ = awaiting.broken(&channel, broken).await;
            let _ = tx
                .send(Err(abort(format!(
                    "the answer of source {} broke off",
                    awaiting.source
                ))))
                .await;
            return;
        }
    }
    let Some(facts) = scanner.facts() else {
        let _ = awaiting
            .source_failed("the upstream's answer is not a JSON-RPC response")
            .await;
        let _ = tx
            .send(Err(abort("the answer is not a JSON-RPC response".into())))
            .await;
        return;
    };
    let classified = Classified::Single(facts.message_info());
    let size = usize::try_from(scanner.size()).unwrap_or(usize::MAX);
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "ok").increment(1);
    // Write before release: the record is committed before the agent has the answer's end.
    if awaiting.calls.settle(&[], &classified, size).await.is_err() {
        let _ = tx
            .send(Err(abort(
                "the call could not be audited, so its answer is withheld".into(),
            )))
            .await;
        return;
    }
    for bytes in held {
        if tx.send(Ok(bytes)).await.is_err() {
            return;
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
        Ending {
            finish: true,
            with_reader: ids == EventIds::None,
        },
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

/// How [`produce`] ends.
#[derive(Debug, Clone, Copy)]
struct Ending {
    /// Close the log once done (not for the shared stream of an HTTP+SSE session).
    finish: bool,
    /// Stop as soon as the log's reader is gone: nobody can resume a stream without event
    /// ids, so a listen stream (no request timeout) would otherwise hold its tunnel stream
    /// (and the upstream's) forever after its agent left.
    with_reader: bool,
}

/// Moves an exchange's messages into `log` until every response has arrived. If the exchange
/// ends first (upstream, tunnel, timeout), the agent still gets an answer: an error that says
/// why.
async fn produce(
    log: Arc<EventLog>,
    mut exchange: Exchange,
    first: Option<Arrived>,
    mut awaiting: Awaiting,
    shutdown: CancellationToken,
    channel: Arc<Channel>,
    ending: Ending,
) {
    let gone = {
        let log = log.clone();
        async move {
            if ending.with_reader {
                log.abandoned().await;
            } else {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = produce_all(&log, &mut exchange, first, &mut awaiting, &shutdown, &channel, ending.finish) => {}
        // The calls still open are recorded as abandoned when `awaiting` drops.
        () = gone => tracing::debug!(source = %awaiting.source, "agent left a stream that cannot be resumed: its exchange ends"),
    }
    if ending.finish {
        log.finish();
    }
}

async fn produce_all(
    log: &EventLog,
    exchange: &mut Exchange,
    first: Option<Arrived>,
    awaiting: &mut Awaiting,
    shutdown: &CancellationToken,
    channel: &Channel,
    finish: bool,
) {
    let mut remaining = awaiting.responses;
    if let Some(arrived) = first {
        remaining = remaining.saturating_sub(release(log, awaiting, arrived).await);
    }
    while remaining > 0 {
        let failure = tokio::select! {
            // At the end of the grace period the tunnel closes too: the shutdown is the reason.
            biased;
            _ = shutdown.cancelled() => awaiting.source_failed("the relay is shutting down").await,
            // The agent cancelled: no more of this answer, nor an error in its place.
            _ = awaiting.cancelled.cancelled() => return,
            event = next_event(exchange, awaiting.timeout) => match event {
                Some(Ok(Event::Message(message))) => {
                    let responses = release(log, awaiting, Arrived::new(message)).await;
                    remaining = remaining.saturating_sub(responses);
                    continue;
                }
                // The answer in pieces is passed on as it arrives when nothing needs it whole.
                // Only into a log of its own (`finish`): on the shared stream of an HTTP+SSE
                // session, pieces of concurrent answers would interleave.
                Some(Ok(Event::Part(first))) if finish && remaining == 1 && awaiting.pipelines(&first) => {
                    match stream_pieces(log, exchange, awaiting, first, shutdown).await {
                        Ok(responses) => {
                            remaining = remaining.saturating_sub(responses);
                            continue;
                        }
                        Err(broken) => awaiting.broken(channel, broken).await,
                    }
                }
                // Else a message in pieces within an event stream is released whole.
                Some(Ok(Event::Part(first))) => {
                    match assemble(exchange, first, awaiting.timeout, shutdown).await {
                        Ok(message) => {
                            let responses = release(log, awaiting, Arrived::new(message)).await;
                            remaining = remaining.saturating_sub(responses);
                            continue;
                        }
                        Err(broken) => awaiting.broken(channel, broken).await,
                    }
                }
                Some(Ok(Event::TooLarge(limit))) => awaiting.broken(channel, Broken::TooLarge(limit)).await,
                Some(Ok(Event::Rejected(_) | Event::Streaming)) => continue,
                Some(Ok(Event::End)) => awaiting.source_failed("the upstream ended its response without answering").await,
                Some(Err(e)) => awaiting.source_failed(&e.to_string()).await,
                None => {
                    let body = timeout_body(channel, awaiting).await;
                    awaiting.fail(Outcome::Timeout, body).await
                }
            },
        };
        log.push(failure).await;
        break;
    }
}

/// Passes a message arriving in pieces on into `log` as it arrives (a pipeline, as [`pipe`]
/// does for a JSON answer): neither `connect` nor the relay holds it whole. The audit rule
/// holds: from the piece that closes the JSON text on, pieces are held back until the call's
/// record is committed. Returns how many responses it carried (1, or 0 for a message that
/// turned out not to be a response: passed on all the same). When the answer breaks off after
/// its event began, [`Piece::Abort`] ends the agent's body with an error, and the caller
/// releases the error answer into the log (for an agent that resumes).
async fn stream_pieces(
    log: &EventLog,
    exchange: &mut Exchange,
    awaiting: &mut Awaiting,
    first: Bytes,
    shutdown: &CancellationToken,
) -> Result<usize, Broken> {
    let mut scanner = ResponseScanner::new();
    let mut held: Vec<Bytes> = Vec::new();
    let mut begun = false;
    let mut piece = Some((first, false));
    while let Some((bytes, last)) = piece.take() {
        scanner.feed(&bytes);
        if scanner.is_complete() || last {
            held.push(bytes);
        } else {
            let kind = if begun { Piece::More } else { Piece::Begin };
            log.push_piece(kind, bytes).await;
            begun = true;
        }
        if last {
            break;
        }
        while piece.is_none() {
            let broken = match next_or_broken(exchange, awaiting.timeout, shutdown).await {
                Ok(Event::Part(bytes)) => {
                    piece = Some((bytes, false));
                    continue;
                }
                Ok(Event::Message(bytes)) => {
                    piece = Some((bytes, true));
                    continue;
                }
                Ok(Event::Rejected(_) | Event::Streaming) => continue,
                Ok(Event::TooLarge(limit)) => Broken::TooLarge(limit),
                Ok(Event::End) => Broken::Ended,
                Err(broken) => broken,
            };
            if begun {
                log.push_piece(Piece::Abort, Bytes::new()).await;
            }
            return Err(broken);
        }
    }
    let responses = match scanner.facts() {
        Some(facts) => {
            let classified = Classified::Single(facts.message_info());
            let size = usize::try_from(scanner.size()).unwrap_or(usize::MAX);
            // Write before release: the record is committed before the agent has the end.
            if let Err(refusal) = awaiting.calls.settle(&[], &classified, size).await {
                if begun {
                    log.push_piece(Piece::Abort, Bytes::new()).await;
                }
                log.push(refusal).await;
                return Ok(1);
            }
            1
        }
        None => {
            awaiting
                .calls
                .streamed(usize::try_from(scanner.size()).unwrap_or(usize::MAX));
            0
        }
    };
    let count = held.len();
    for (n, bytes) in held.into_iter().enumerate() {
        let kind = match (begun, n + 1 == count) {
            (false, true) => Piece::Whole,
            (false, false) => Piece::Begin,
            (true, false) => Piece::More,
            (true, true) => Piece::Last,
        };
        log.push_piece(kind, bytes).await;
        begun = true;
    }
    Ok(responses)
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
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(SSE_QUEUE);
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
        // Inside an event whose data comes in pieces: no keep-alive comment may cut into it.
        let mut in_event = false;
        while open {
            open = tokio::select! {
                event = reader.next_entry() => match event {
                    Some((seq, piece, message)) => {
                        let id = (ids != EventIds::None).then(|| format!("{stream}-{seq}"));
                        let (first, second) = match piece {
                            Piece::Whole => (sse::message_event(id.as_deref(), &message), None),
                            Piece::Begin => (sse::begin_event(), Some(sse::data_piece(&message))),
                            Piece::More => (sse::data_piece(&message), None),
                            Piece::Last => (sse::data_piece(&message), Some(sse::end_event(id.as_deref()))),
                            // An event begun cannot be taken back: the body ends with an error, so
                            // the agent sees an aborted response, never a truncated message. The
                            // error the producer logs next is there for an agent that resumes.
                            Piece::Abort => {
                                let _ = tx
                                    .send(Err(std::io::Error::other("the answer broke off")))
                                    .await;
                                break;
                            }
                        };
                        in_event = matches!(piece, Piece::Begin | Piece::More);
                        let mut sent = tx.send(Ok(first)).await.is_ok();
                        if let Some(second) = second {
                            sent = sent && tx.send(Ok(second)).await.is_ok();
                        }
                        sent
                    }
                    None => false,
                },
                _ = keep_alive.tick(), if !in_event => tx.send(Ok(sse::KEEP_ALIVE)).await.is_ok(),
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
