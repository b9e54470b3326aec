//! The exchange of one agent message with its upstream, without HTTP: what the relay waits
//! for, how an answer's first event decides its shape (one JSON message, a JSON message in
//! pieces, or a stream of messages), how a streamed answer moves into an [`EventLog`], and how
//! every call is finished (and audited) before its answer is released. The agent-facing side
//! (`agents::answer`) turns an [`Opening`] into an HTTP response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{EventLog, Piece};
use super::input::InputSeal;
use super::sessions::{CancelGuard, Session};
use super::store::ListenGuard;
use super::tasks::TaskBinding;
use crate::govern::audit::Outcome;
use crate::mcp::jsonrpc::{
    Classified, MessageInfo, MessageKind, cancelled_notification, codes, error_body,
};
use crate::mcp::{ResponseScanner, classify, tasks};
use crate::relay::calls::filter::ListFilter;
use crate::relay::calls::{InFlight, source_error_body};
use crate::relay::tunnel::{Channel, ChannelError, Event, Exchange};
use crate::wire::Era;

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

/// What an agent request waits for on its exchange.
pub(crate) struct Awaiting {
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
    /// Seals the state of an `input_required` answer (a stateless call).
    seal: Option<Arc<InputSeal>>,
    /// Binds the task ids of the answer to the caller.
    tasks: Option<Arc<TaskBinding>>,
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
    /// The agent resumed the answer on another relay (`connect` said so): it goes there now.
    Moved,
}

impl Awaiting {
    /// The message as the caller may see it: a list as policy filters it, its task ids bound
    /// to the caller, an `input_required` answer with its state sealed (its call then recorded
    /// as a round of the call the state names).
    fn filtered(&mut self, message: Bytes) -> Bytes {
        let message = match &self.filter {
            Some(filter) => filter.apply(message),
            None => message,
        };
        let message = match &self.tasks {
            Some(tasks) => tasks.apply(message),
            None => message,
        };
        let Some(seal) = &self.seal else {
            return message;
        };
        let (message, sealed) = seal.apply(message);
        if sealed {
            self.calls.link(seal.call());
        }
        message
    }
}

impl Awaiting {
    /// Waiting for the answers to `requests` (those of one agent message, in `era`) from
    /// `source`, within `request_timeout`; `calls` are finished as their answers are released.
    pub(crate) fn new(
        request_timeout: Duration,
        source: &str,
        requests: &[&MessageInfo],
        era: Era,
        calls: InFlight,
    ) -> Self {
        // A listen stream lasts as long as the agent wants it; no request timeout applies.
        let is_listen = era == Era::Stateless
            && requests
                .iter()
                .any(|m| m.method.as_deref() == Some("subscriptions/listen"));
        // Answers to tasks methods are read whole, wherever their task ids sit: all are bound.
        let method = requests.first().and_then(|m| m.method.as_deref());
        let pipelined = requests.len() == 1
            && method.is_some_and(|m| m != "initialize" && !tasks::names_tasks(m));
        Self {
            id: requests.first().and_then(|m| m.id.clone()),
            responses: requests.len(),
            pipelined,
            timeout: (!is_listen).then_some(request_timeout),
            source: source.to_owned(),
            learner: None,
            filter: None,
            seal: None,
            tasks: None,
            calls,
            tracker: None,
            _listen: None,
            cancelled: CancellationToken::new(),
            _cancel: None,
        }
    }

    /// Filters a list answer as policy says.
    pub(crate) fn filtered_by(mut self, filter: Option<ListFilter>) -> Self {
        self.filter = filter.map(Arc::new);
        self
    }

    /// Binds the task ids of the answer to the caller `tasks` names.
    pub(crate) fn binding_tasks(mut self, tasks: TaskBinding) -> Self {
        self.tasks = Some(Arc::new(tasks));
        self
    }

    /// Seals the state of an `input_required` answer with `seal`.
    pub(crate) fn sealed_by(mut self, seal: Option<InputSeal>) -> Self {
        self.seal = seal.map(Arc::new);
        self
    }

    /// Holds a stateless listen stream's place under the session caps until the answer ends.
    pub(crate) fn holding(mut self, listen: Option<ListenGuard>) -> Self {
        self._listen = listen;
        self
    }

    /// Lets `session` learn its protocol version from the answer (while it does not know it)
    /// and track the server requests riding the answer.
    pub(crate) fn tracked_by(mut self, session: Option<&Arc<Session>>) -> Self {
        self.learner = session.filter(|s| !s.knows_version()).cloned();
        self.tracker = session.cloned();
        self
    }

    /// Follows the agent's cancellation of the message's request, when it is the only one
    /// and belongs to `session`.
    pub(crate) fn cancellable(mut self, session: Option<&Arc<Session>>) -> Self {
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
    pub(crate) async fn source_failed(&mut self, why: &str) -> Bytes {
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
            Broken::Moved => {
                let body = source_error_body(
                    self.id.as_deref(),
                    &self.source,
                    "the answer moved to another relay",
                );
                self.fail(Outcome::Moved, body).await
            }
        }
    }

    /// Whether a JSON answer whose first piece is `first` is passed on piece by piece: one
    /// request, no list filter (it needs the whole list), no result the trail keeps, and a
    /// single message (an object; a batch is read whole).
    fn pipelines(&self, first: &[u8]) -> bool {
        let mut scanner = ResponseScanner::new();
        scanner.feed(first);
        // An `input_required` answer is sealed whole (it is small; a large one that names
        // itself in its first piece too).
        let sealing =
            self.seal.is_some() && memchr::memmem::find(first, b"input_required").is_some();
        // Task ids are bound whole too (they sit in small messages: a creation, a status).
        let binding = self.tasks.is_some() && tasks::mentions_tasks(first);
        self.pipelined
            && self.filter.is_none()
            && !sealing
            && !binding
            && !self.calls.keeps_results()
            && scanner.is_object()
    }
}

/// How an exchange's answer begins, for the agent-facing side to answer accordingly.
pub(crate) enum Opening {
    /// One JSON message holding every response, its calls already settled: answer it whole,
    /// with the upstream's HTTP status if it gave one.
    Json {
        /// The upstream's HTTP status, if it named one.
        status: Option<u16>,
        /// The message as the caller may see it.
        message: Bytes,
        /// Whether it is a JSON-RPC error.
        is_error: bool,
    },
    /// One JSON message arriving in pieces that may be passed on as they come ([`pipe`]).
    Pipe {
        /// The upstream's HTTP status, if it named one.
        status: Option<u16>,
        /// The first piece.
        first: Bytes,
    },
    /// A stream of messages ([`produce`]), starting with the message already arrived, if any.
    Stream(Option<Arrived>),
    /// The relay-made error to answer with; the calls are finished accordingly.
    Failed(Bytes),
    /// The agent cancelled before anything was sent: no answer is owed.
    Cancelled,
}

impl Awaiting {
    /// Waits for the first event of `exchange` and says how the answer begins. After a
    /// cancellation, a late answer finds no exchange and is dropped; the call is recorded
    /// abandoned.
    pub(crate) async fn open(
        &mut self,
        exchange: &mut Exchange,
        channel: &Channel,
        stop: &CancellationToken,
    ) -> Opening {
        let mut status = None;
        loop {
            let event = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    return Opening::Failed(self.source_failed("the relay is shutting down").await);
                }
                _ = self.cancelled.cancelled() => return Opening::Cancelled,
                event = next_event(exchange, self.timeout) => event,
            };
            let Some(event) = event else {
                let body = timeout_body(channel, self).await;
                return Opening::Failed(self.fail(Outcome::Timeout, body).await);
            };
            let broken = match event {
                Ok(Event::Rejected(code)) => {
                    status = Some(code);
                    continue;
                }
                Ok(Event::Replaying(_)) => continue,
                Ok(Event::Message(message)) => return self.first_message(message, status).await,
                Ok(Event::Part(first)) if self.pipelines(&first) => {
                    return Opening::Pipe { status, first };
                }
                Ok(Event::Part(first)) => match assemble(exchange, first, self.timeout, stop).await
                {
                    Ok(message) => return self.first_message(message, status).await,
                    Err(broken) => broken,
                },
                Ok(Event::TooLarge(limit)) => Broken::TooLarge(limit),
                Ok(Event::Streaming) => return Opening::Stream(None),
                Ok(Event::End) => Broken::Ended,
                Err(e) => Broken::Closed(e.to_string()),
            };
            return Opening::Failed(self.broken(channel, broken).await);
        }
    }

    /// The first whole message of an answer: a JSON answer when it holds every response
    /// (settled first: the record is committed before the agent sees the answer), else the
    /// start of a stream.
    async fn first_message(&mut self, message: Bytes, status: Option<u16>) -> Opening {
        let arrived = Arrived::new(message);
        let Some(classified) = arrived
            .classified
            .as_ref()
            .filter(|_| arrived.responses >= self.responses)
        else {
            return Opening::Stream(Some(arrived));
        };
        metrics::counter!(crate::metrics::REQUESTS, "outcome" => "ok").increment(1);
        let message = self.filtered(arrived.message.clone());
        match self
            .calls
            .settle(&arrived.message, classified, message.len())
            .await
        {
            Ok(()) => Opening::Json {
                status,
                message,
                is_error: arrived.is_error,
            },
            Err(refusal) => Opening::Failed(refusal),
        }
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

/// What an event means for a message read piece by piece: its next piece and whether that
/// piece ends it, nothing yet (a status or the switch to streaming), or why the answer broke.
fn next_piece(event: Result<Event, Broken>) -> Result<Option<(Bytes, bool)>, Broken> {
    match event? {
        Event::Part(bytes) => Ok(Some((bytes, false))),
        Event::Message(bytes) => Ok(Some((bytes, true))),
        Event::Rejected(_) | Event::Streaming => Ok(None),
        Event::Replaying(_) => Err(Broken::Moved),
        Event::TooLarge(limit) => Err(Broken::TooLarge(limit)),
        Event::End => Err(Broken::Ended),
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
            Event::Replaying(_) => return Err(Broken::Moved),
            Event::Rejected(_) | Event::Streaming => {}
        }
    }
}

/// A message from the upstream, classified once for everything the relay needs of it.
pub(crate) struct Arrived {
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
pub(crate) struct Ending {
    /// Close the log once done (not for the shared stream of an HTTP+SSE session).
    pub finish: bool,
    /// Stop as soon as the log's reader is gone: nobody can resume a stream without event
    /// ids, so a listen stream (no request timeout) would otherwise hold its tunnel stream
    /// (and the upstream's) forever after its agent left.
    pub with_reader: bool,
}

/// Moves an exchange's messages into `log` until every response has arrived. If the exchange
/// ends first (upstream, tunnel, timeout), the agent still gets an answer: an error that says
/// why.
pub(crate) async fn produce(
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
        let event = tokio::select! {
            // At the end of the grace period the tunnel closes too: the shutdown is the reason.
            biased;
            _ = shutdown.cancelled() => Err(Broken::Shutdown),
            // The agent cancelled: no more of this answer, nor an error in its place.
            _ = awaiting.cancelled.cancelled() => return,
            event = next_event(exchange, awaiting.timeout) => match event {
                Some(Ok(event)) => Ok(event),
                Some(Err(e)) => Err(Broken::Closed(e.to_string())),
                None => Err(Broken::Timeout),
            },
        };
        // Read after the event: a reattach (inside it) moves the request to a new channel,
        // where its cancellation goes now.
        let reattached = exchange.reattached_to().cloned();
        let channel = reattached.as_deref().unwrap_or(channel);
        let broken = match event {
            Ok(Event::Message(message)) => {
                let responses = release(log, awaiting, Arrived::new(message)).await;
                remaining = remaining.saturating_sub(responses);
                continue;
            }
            // The answer in pieces is passed on as it arrives when nothing needs it whole.
            // Only into a log of its own (`finish`): on the shared stream of an HTTP+SSE
            // session, pieces of concurrent answers would interleave.
            Ok(Event::Part(first)) if finish && remaining == 1 && awaiting.pipelines(&first) => {
                match stream_pieces(log, exchange, awaiting, first, shutdown).await {
                    Ok(responses) => {
                        remaining = remaining.saturating_sub(responses);
                        continue;
                    }
                    Err(broken) => broken,
                }
            }
            // Else a message in pieces within an event stream is released whole.
            Ok(Event::Part(first)) => {
                match assemble(exchange, first, awaiting.timeout, shutdown).await {
                    Ok(message) => {
                        let responses = release(log, awaiting, Arrived::new(message)).await;
                        remaining = remaining.saturating_sub(responses);
                        continue;
                    }
                    Err(broken) => broken,
                }
            }
            Ok(Event::TooLarge(limit)) => Broken::TooLarge(limit),
            Ok(Event::Rejected(_) | Event::Streaming) => continue,
            Ok(Event::Replaying(_)) => Broken::Moved,
            Ok(Event::End) => Broken::Ended,
            Err(broken) => broken,
        };
        if matches!(broken, Broken::Moved) {
            // The agent resumed the answer on another relay: it goes there, and that relay
            // records how the calls still open end; here they moved.
            log.moved_away();
            awaiting.fail(Outcome::Moved, Bytes::new()).await;
            return;
        }
        let failure = awaiting.broken(channel, broken).await;
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
            let broken =
                match next_piece(next_or_broken(exchange, awaiting.timeout, shutdown).await) {
                    Ok(next) => {
                        piece = next;
                        continue;
                    }
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

/// Moves the pieces of a JSON answer into the agent's body (`tx`). The audit rule holds as for a
/// whole answer: from the piece that closes the JSON text on, pieces are held back until the
/// call's record is committed (an agent cannot use a JSON text without its end); the outcome,
/// error code and `isError` come from an incremental scan of the pieces as they pass. When
/// the answer breaks off (tunnel gone, timeout, over the limit, shutdown) or cannot be
/// recorded, the call is finished accordingly and the body ends with an error, so the agent
/// sees an aborted response, never a truncated one that looks complete.
pub(crate) async fn pipe(
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
            let broken = match next_piece(event) {
                Ok(next) => {
                    piece = next;
                    continue;
                }
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
