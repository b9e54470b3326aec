//! Answering agents: forward a message down its tunnel stream and turn what comes back into
//! plain JSON, or into an SSE stream backed by an [`EventLog`] (resumable in the session era).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::replay;
use super::reply::{JSON, json_response, source_error};
use crate::mcp::jsonrpc::Classified;
use crate::mcp::sse;
use crate::relay::calls::filter::ListFilter;
use crate::relay::calls::{Context, InFlight};
use crate::relay::session::input::InputSeal;
use crate::relay::session::tasks::TaskBinding;
use crate::relay::session::{
    Arrived, Awaiting, Ending, EventIds, EventLog, ListenGuard, LogReader, Opening, Piece, Session,
    Start, Transport, pipe, produce,
};
use crate::relay::state::RelayState;
use crate::relay::tunnel::{Channel, Exchange};
use crate::wire::Era;

/// The reconnection delay suggested to agents in priming events.
pub(super) const SSE_RETRY: Duration = Duration::from_secs(1);

/// How long a primed answer waits for its priming event to be written before it sends the
/// request all the same: an agent that does not read must not hold its call back for ever.
const PRIMING_WRITE: Duration = Duration::from_secs(2);

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
pub(super) struct JsonAnswer {
    /// The upstream's response.
    pub message: Bytes,
    /// Whether it is a JSON-RPC error.
    pub is_error: bool,
}

/// Where an agent message goes and how its answer is delivered.
pub(super) struct Target<'a> {
    /// The source, for error messages.
    pub source: &'a str,
    /// The session (session era), whose logs make SSE answers resumable.
    pub session: Option<&'a Arc<Session>>,
    /// The protocol era of the request.
    pub era: Era,
    /// Policy's filter for a list answer, if the caller's tenant has roles.
    pub filter: Option<ListFilter>,
    /// The calls of the message, finished as their answers are released.
    pub calls: InFlight,
    /// A stateless listen stream's place under the session caps, held while it is open.
    pub listen: Option<ListenGuard>,
    /// Seals the state of an `input_required` answer (a stateless call).
    pub seal: Option<InputSeal>,
    /// The caller's task ids at the source.
    pub tasks: TaskBinding,
}

/// Sends the body down `channel` and answers the agent: 202 for notifications and responses,
/// else the upstream's answer as JSON or SSE.
pub(super) async fn forward(
    state: &Arc<RelayState>,
    channel: &Arc<Channel>,
    body: Bytes,
    classified: &Classified,
    target: Target<'_>,
) -> Response {
    let requests = classified.requests();
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
    let mut awaiting = Awaiting::new(
        state.request_timeout(),
        target.source,
        &requests,
        target.era,
        calls,
    )
    .filtered_by(target.filter)
    .binding_tasks(target.tasks)
    .sealed_by(target.seal)
    .holding(target.listen)
    .cancellable(target.session);
    if let Some(session) = target.session.filter(|s| primes_at_once(state, s)) {
        return primed_answer(state, channel, body, awaiting, session).await;
    }
    match channel.request(body).await {
        Ok(mut exchange) => {
            let reattach = target
                .session
                .and_then(|s| replay::reattach(state, s, exchange.id));
            exchange.reattach_with(reattach);
            answer(state, channel.clone(), exchange, awaiting, target.session).await
        }
        Err(e) => json_response(StatusCode::OK, awaiting.source_failed(&e.to_string()).await),
    }
}

/// The HTTP+SSE transport: every answer rides the session's one stream; the POST gets 202.
pub(super) async fn forward_to_stream(
    state: &Arc<RelayState>,
    session: &Arc<Session>,
    body: Bytes,
    classified: &Classified,
    filter: Option<ListFilter>,
    calls: InFlight,
) -> Response {
    let requests = classified.requests();
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
    let mut awaiting = Awaiting::new(
        state.request_timeout(),
        &session.source,
        &requests,
        Era::Session,
        calls,
    )
    .filtered_by(filter)
    .binding_tasks(session.tasks().clone())
    .tracked_by(Some(session))
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

/// Answers with what arrives on `exchange`: plain JSON when the first message holds every
/// response, else an SSE stream that ends once every response has been sent.
async fn answer(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    mut exchange: Exchange,
    mut awaiting: Awaiting,
    session: Option<&Arc<Session>>,
) -> Response {
    let status = |code: Option<u16>| {
        code.map_or(StatusCode::OK, |code| {
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
        })
    };
    match awaiting.open(&mut exchange, &channel, &state.stop).await {
        Opening::Json {
            status: code,
            message,
            is_error,
        } => {
            let mut response = json_response(status(code), message.clone());
            response
                .extensions_mut()
                .insert(JsonAnswer { message, is_error });
            response
        }
        Opening::Pipe {
            status: code,
            first,
        } => pipe_answer(state, channel, exchange, awaiting, status(code), first),
        Opening::Stream(first) => stream_answer(state, channel, exchange, first, awaiting, session),
        Opening::Failed(body) => json_response(StatusCode::OK, body),
        // No answer is owed, so the stream the agent gets ends empty.
        Opening::Cancelled => cancelled_response(),
    }
}

/// Whether a session's answers are streams primed at once rather than plain JSON when they
/// can be: in a fleet whose `connect` keeps answers for a replay, to an agent that resumes
/// primed streams (2025-11-25 and later), so every answer carries an event id before its first
/// message, and an agent whose relay dies mid-call resumes it on another.
fn primes_at_once(state: &RelayState, session: &Session) -> bool {
    session.transport == Transport::Streamable
        && session.event_ids() == EventIds::Primed
        && session.replays_answers(&state.fleet)
}

/// Answers a request of a session whose answers are primed at once ([`primes_at_once`]): the
/// agent's event stream, with the priming event that names the answer, goes out first, and the
/// request goes to `connect` only once that event is written. So every call the upstream
/// received left its agent an event id to resume the answer from, on any relay, should this
/// one die before it answers (see `relay::agents::replay`).
async fn primed_answer(
    state: &Arc<RelayState>,
    channel: &Arc<Channel>,
    body: Bytes,
    mut awaiting: Awaiting,
    session: &Arc<Session>,
) -> Response {
    let mut exchange = match channel.reserve() {
        Ok(exchange) => exchange,
        Err(e) => {
            return json_response(StatusCode::OK, awaiting.source_failed(&e.to_string()).await);
        }
    };
    exchange.reattach_with(replay::reattach(state, session, exchange.id));
    let log = session.answer_log(session.answer_ids(&state.fleet, exchange.id));
    let reader = log.attach(Start::Undelivered);
    let (written, on_written) = oneshot::channel();
    let (channel, stop) = (channel.clone(), state.stop.clone());
    let mut awaiting = awaiting.tracked_by(Some(session));
    tokio::spawn(async move {
        // Written, or the agent left before it was (its call goes on all the same, as any
        // call whose agent left), or the agent reads nothing: then not held back for ever.
        let _ = tokio::time::timeout(PRIMING_WRITE, on_written).await;
        if let Err(e) = channel.send_request(&exchange, body).await {
            let failure = awaiting.source_failed(&e.to_string()).await;
            log.push(failure).await;
            log.finish();
            return;
        }
        let ending = Ending {
            finish: true,
            with_reader: false,
        };
        produce(log, exchange, None, awaiting, stop, channel, ending).await;
    });
    let response = sse_response(
        state,
        reader,
        EventIds::Primed,
        None,
        None,
        CancellationToken::new(),
    );
    response.map(|body| {
        Body::from_stream(FirstWritten {
            inner: body.into_data_stream(),
            first_out: false,
            written: Some(written),
        })
    })
}

/// A response body that says when the HTTP server comes back for more after the first chunk:
/// the server then holds that chunk in its write buffer, and writes it out before it waits for
/// the next (hyper polls the body, then flushes, in one turn of its loop).
struct FirstWritten<S> {
    inner: S,
    first_out: bool,
    written: Option<oneshot::Sender<()>>,
}

impl<S: Stream + Unpin> Stream for FirstWritten<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<S::Item>> {
        if self.first_out
            && let Some(written) = self.written.take()
        {
            let _ = written.send(());
        }
        let item = ready!(Pin::new(&mut self.inner).poll_next(cx));
        self.first_out = true;
        Poll::Ready(item)
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
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
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
            let sealed = session.answer_ids(&state.fleet, exchange.id);
            (session.answer_log(sealed), session.event_ids())
        }
        _ => (Arc::new(EventLog::new(0)), EventIds::None),
    };
    let reader = log.attach(Start::Undelivered);
    tokio::spawn(produce(
        log,
        exchange,
        first,
        awaiting.tracked_by(session),
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

/// An SSE response that streams `reader`, with keep-alive comments, optionally after a
/// `prelude` event, until the stream ends, the agent goes away or `until` fires; then `on_end`
/// runs.
pub(super) fn sse_response(
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
        let log = reader.log().clone();
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + keep_alive_every,
            keep_alive_every,
        );
        let prime =
            (ids == EventIds::Primed).then(|| sse::priming_event(&log.priming_id(), SSE_RETRY));
        let mut open = true;
        for event in [prelude, prime].into_iter().flatten() {
            open = open && tx.send(Ok(event)).await.is_ok();
        }
        // Inside an event whose data comes in pieces: no keep-alive comment may cut into it.
        let mut in_event = false;
        while open {
            open = tokio::select! {
                event = reader.next_entry() => match event {
                    Some((seq, piece, message, number)) => {
                        let id = (ids != EventIds::None && matches!(piece, Piece::Whole | Piece::Last))
                            .then(|| log.event_id(seq, number));
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

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn the_first_chunk_counts_as_written_once_the_server_asks_for_more() {
        let (written, mut on_written) = oneshot::channel();
        let mut body = FirstWritten {
            inner: futures_util::stream::iter([1, 2]),
            first_out: false,
            written: Some(written),
        };
        assert_eq!(body.next().await, Some(1));
        assert!(
            on_written.try_recv().is_err(),
            "not before the server asks again"
        );
        assert_eq!(body.next().await, Some(2));
        assert_eq!(on_written.try_recv(), Ok(()));
    }
}
