//! Resuming on any relay of the fleet: the GET that carries a sealed `Last-Event-ID`, for an
//! answer or for the agent's GET stream itself (see [`listen`]).
//!
//! In a fleet, a session's answers are SSE streams whose event ids are sealed
//! ([`EventClaims`]): they name the session, the stream and exchange that carried the request,
//! and how many of the answer's messages the agent has. When the relay that carried it still
//! keeps the answer, its log serves the rest. Otherwise (the relay died, or the agent's GET
//! landed on another relay) this relay asks the session's `connect`, which keeps every answer
//! of a held session (see `client::sources::replay`), to replay it on this relay's stream: the
//! messages the agent missed, then the rest as the upstream sends it. The upstream sees the
//! request once.
//!
//! A replayed answer is released like any other: `connect` sends the agent's message back
//! with it, the relay admits it again (policy, the audit trail) and records its calls before
//! the answer goes out, so the trail holds every answer an agent got, from whichever relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::Response;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::admission::{TaskIdsAre, admit_read};
use super::answer::{SSE_RETRY, sse_response};
use super::reply::AgentError;
use super::resume::{self, Lost};
use crate::govern::Identity;
use crate::mcp::{classify, sse};
use crate::relay::session::{
    AnswerIds, Awaiting, Ending, EventClaims, EventIds, LogReader, Session, Start, produce,
};
use crate::relay::state::RelayState;
use crate::relay::tunnel::{Event, Exchange, Reattach};
use crate::wire::{Era, Replay, UNSOLICITED};

/// Why an answer cannot be resumed, as the agent's GET is told (`400`).
fn cannot(why: &str) -> AgentError {
    AgentError::BadRequest(format!(
        "Bad Request: the answer this Last-Event-ID names cannot be resumed: {why}"
    ))
}

/// The agent's resumed stream: `reader`'s events, ended with its log (whatever the drain: a
/// resumed answer is a call in flight).
fn resumed(state: &RelayState, reader: LogReader, ids: EventIds) -> Response {
    sse_response(state, reader, ids, None, None, CancellationToken::new())
}

/// The answer to a GET resuming the answer `claims` names, in `session` (the caller's).
pub(super) async fn resume_answer(
    state: &Arc<RelayState>,
    who: &Identity,
    session: &Arc<Session>,
    claims: EventClaims,
) -> Result<Response, AgentError> {
    if claims.handle != session.id {
        return Err(cannot("it belongs to another session"));
    }
    let ids = session.event_ids();
    if let Some(log) = session.answer_log_of(claims.stream, claims.exchange)
        && let Some(reader) = log.attach_after_message(claims.message)
    {
        // Carried here, and still kept: the log serves the rest.
        return Ok(resumed(state, reader, ids));
    }
    let (mut exchange, request) = ask_connect(state, session, &claims).await?;
    if request.as_ref() == crate::wire::NOTHING_OPEN {
        // The agent has every response: its stream ends with nothing more.
        let log = session.answer_log(Some(AnswerIds::new(state.fleet.clone(), claims)));
        let reader = log.attach(Start::Undelivered);
        log.finish();
        return Ok(resumed(state, reader, ids));
    }
    let classified =
        classify(&request).map_err(|_| cannot("the tunnel client sent no request for it"))?;
    metrics::counter!(crate::metrics::ANSWERS_REPLAYED).increment(1);
    tracing::info!(tenant = %who.tenant, source = %session.source, session = %session.id, after = claims.message, "answer replayed");
    exchange.reattach_with(reattach_answer(state, session, claims.clone()));
    let log = session.answer_log(Some(AnswerIds::new(state.fleet.clone(), claims)));
    let reader = log.attach(Start::Undelivered);
    let mut admitted = admit_read(
        state,
        who,
        &session.source,
        (request, classified),
        TaskIdsAre::Unbound,
    )
    .await;
    if let Some((_, denied)) = admitted.refused().await {
        log.push(denied).await;
        log.finish();
        return Ok(resumed(state, reader, ids));
    }
    let filter = admitted.continue_in(state, session, who);
    let (_, classified, calls) = admitted.into_parts();
    let awaiting = Awaiting::new(
        state.request_timeout(),
        &session.source,
        &classified.requests(),
        Era::Session,
        calls,
    )
    .filtered_by(filter)
    .binding_tasks(session.tasks().clone())
    .tracked_by(Some(session))
    .cancellable(Some(session));
    tokio::spawn(produce(
        log,
        exchange,
        None,
        awaiting,
        state.stop.clone(),
        session.channel.clone(),
        Ending {
            finish: true,
            with_reader: false,
        },
    ));
    Ok(resumed(state, reader, ids))
}

/// The agent's GET stream on this relay: the session's server-initiated messages. When
/// `connect` numbers them ([`Session::numbers_events`]), their event ids are sealed, so the
/// stream resumes on any relay of the fleet: `after` is the number of the last message the
/// agent has (from its `Last-Event-ID`), and `connect` sends again those it keeps after it,
/// on this relay's stream, before any new one. Without `after`, a fresh stream starts at the
/// messages no reader has taken yet, primed with the number before them.
pub(super) async fn listen(state: &RelayState, session: &Session, after: Option<u64>) -> Response {
    let log = session.standalone();
    let until = state.shutdown.clone();
    let ids = match session.answer_ids(&state.fleet, UNSOLICITED) {
        Some(ids) if session.channel.numbers_events() => ids,
        _ => {
            session.channel.listen().await;
            let reader = log.attach(Start::Undelivered);
            return sse_response(state, reader, session.event_ids(), None, None, until);
        }
    };
    log.name(ids);
    let (reader, prelude) = match after {
        Some(after) => {
            let reader = log.attach_after_number(after);
            session.channel.listen_after(after).await;
            (reader, None)
        }
        None => {
            let primed_at = log.undelivered_after();
            let reader = log.attach(Start::Undelivered);
            session.channel.listen().await;
            let prime = sse::priming_event(&log.event_id(0, primed_at), SSE_RETRY);
            (reader, Some(prime))
        }
    };
    sse_response(state, reader, EventIds::Resumable, prelude, None, until)
}

/// The answer to a GET resuming the session's GET stream from the event `claims` names
/// (see [`listen`]). When the `connect` that numbered it is gone (restarted), the messages
/// it kept are too: the agent gets the stream from now on.
pub(super) async fn resume_listening(
    state: &Arc<RelayState>,
    session: &Arc<Session>,
    claims: EventClaims,
) -> Result<Response, AgentError> {
    if claims.handle != session.id {
        return Err(cannot("it belongs to another session"));
    }
    if claims.connect.as_deref() != session.channel.connect_instance() {
        tracing::info!(source = %session.source, session = %session.id, after = claims.message, "GET stream resumed without the messages after its last event: the tunnel client that kept them is gone");
        return Ok(listen(state, session, None).await);
    }
    Ok(listen(state, session, Some(claims.message)).await)
}

/// How long a relay waits for a `connect` whose tunnel dropped with an answer in flight to
/// attach again: it reconnects within a second or two (see `client::backoff`). A new instance
/// of it (it restarted, and lost the answer) ends the wait at once.
const REATTACH_WINDOW: Duration = Duration::from_secs(10);

/// How often the relay looks for that `connect` meanwhile.
const REATTACH_POLL: Duration = Duration::from_millis(100);

/// What picks `session`'s answer to `exchange` (on this copy's stream) up again when its
/// tunnel stream ends while this relay lives: once the session's `connect` is attached again
/// (within [`REATTACH_WINDOW`]), the session resumes on a stream to it, and `connect` replays
/// the rest of the answer there. The upstream sees the request once, the agent's stream goes
/// on. `None` when the `connect` does not keep the session's answers.
pub(super) fn reattach(
    state: &Arc<RelayState>,
    session: &Session,
    exchange: u64,
) -> Option<Reattach> {
    let answer = EventClaims {
        handle: session.id.clone(),
        connect: session.channel.connect_instance().map(str::to_owned),
        stream: session.stream_base(),
        exchange,
        message: 0,
    };
    reattach_answer(state, session, answer)
}

/// [`reattach`] for the answer `answer` names, read here from its message `answer.message`
/// on (a replay: it was carried by another stream first).
fn reattach_answer(
    state: &Arc<RelayState>,
    session: &Session,
    answer: EventClaims,
) -> Option<Reattach> {
    if !session.keeps_answers() {
        return None;
    }
    let claims = session.claims(0);
    let (state, who) = (state.clone(), session.identity());
    Some(Arc::new(move |taken| {
        let (state, who, claims) = (state.clone(), who.clone(), claims.clone());
        let answer = EventClaims {
            message: answer.message + taken,
            ..answer.clone()
        };
        Box::pin(async move {
            let deadline = Instant::now() + REATTACH_WINDOW;
            let source = claims.source.clone();
            loop {
                match resume::resume(&state, &who, &source, claims.clone(), true).await {
                    Ok(session) => {
                        let (exchange, _) = ask_connect(&state, &session, &answer).await.ok()?;
                        return Some(exchange.keeping(session.channel.clone()));
                    }
                    Err(Lost::Unreachable(_) | Lost::Starting) if Instant::now() < deadline => {
                        tokio::time::sleep(REATTACH_POLL).await;
                    }
                    Err(_) => return None,
                }
            }
        })
    }))
}

/// Asks the session's `connect` to replay the answer `claims` names on this relay's stream;
/// returns the exchange it arrives on and the agent's message it answers.
async fn ask_connect(
    state: &RelayState,
    session: &Session,
    claims: &EventClaims,
) -> Result<(Exchange, Bytes), AgentError> {
    if !session.keeps_answers() || claims.connect.as_deref() != session.channel.connect_instance() {
        return Err(cannot(
            "the tunnel client that kept it is gone (restarted, or not the one carrying the \
             session now)",
        ));
    }
    let replay = Replay {
        stream: claims.stream,
        exchange: claims.exchange,
        after: claims.message,
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        AgentError::Unavailable(format!(
            "source {} could not replay the answer: {e}",
            session.source
        ))
    };
    let mut exchange = session
        .channel
        .replay(&replay)
        .await
        .map_err(|e| unreachable(&e))?;
    let wait = state.governance().limits.open_stream_timeout();
    match tokio::time::timeout(wait, exchange.next()).await {
        Ok(Ok(Event::Replaying(request))) => Ok((exchange, request)),
        Ok(Ok(_)) => Err(cannot("the tunnel client no longer keeps it")),
        Ok(Err(e)) => Err(unreachable(&e)),
        Err(_) => Err(unreachable(&"the tunnel client did not answer in time")),
    }
}
