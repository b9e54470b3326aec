//! The 2024-11-05 HTTP+SSE transport at `/sse/{source}`: a GET opens the session's one event
//! stream, whose first `endpoint` event names the URL to POST messages to; every answer rides
//! that stream.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::admission::{admit, gate, open_channel, open_header};
use super::answer::{forward_to_stream, sse_response};
use super::oauth::Resource;
use super::reply::AgentError;
use crate::govern::Identity;
use crate::govern::audit::{Direction, Outcome};
use crate::mcp::jsonrpc::{MessageInfo, MessageKind, codes};
use crate::mcp::sse;
use crate::relay::calls::{Call, Context};
use crate::relay::session::{EventIds, Session, Start, Transport, new_session_id, new_stream_base};
use crate::relay::state::RelayState;
use crate::wire::Era;

/// Routes of the HTTP+SSE transport.
pub(super) fn routes() -> Router<Arc<RelayState>> {
    Router::new()
        .route("/sse/{source}", get(open_stream))
        .route("/sse/{source}/messages", post(handle_message))
}

/// GET: opens a session and its event stream; the session lasts as long as the stream.
async fn open_stream(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Response {
    let who = match gate(&state, &headers, Resource::Sse(&source)) {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let session_id = new_session_id();
    // The stream opens a tunnel stream (and, for a stdio source, a process) before any
    // `initialize`: it is recorded like a call, and counted against the session caps.
    let mut opened = open_call(&state, &who, &source, &session_id);
    let refused = |cap| AgentError::TooManySessions { id: None, cap };
    if let Err(cap) = state.sessions.admit(&who, &source, state.session_caps()) {
        let _ = finish_open(opened, Outcome::Error(codes::INVALID_REQUEST)).await;
        return refused(cap).into_response();
    }
    let header = open_header(
        &who,
        &source,
        Era::Session,
        session_id.clone(),
        None,
        &HeaderMap::new(),
    );
    let channel = match open_channel(&state, &who, &header).await {
        Ok(channel) => channel,
        Err(response) => {
            let _ = finish_open(opened, Outcome::TunnelError).await;
            return response;
        }
    };
    opened.set_context(&Context {
        transport: Some(channel.transport()),
        ..Context::default()
    });
    let session = Arc::new(Session::new(
        session_id,
        &who,
        &source,
        (channel, new_stream_base()),
        Transport::LegacySse,
        &state.calls,
        state.task_binding(&who, &source),
    ));
    if let Err(cap) = state
        .sessions
        .try_insert(session.clone(), state.session_caps())
    {
        let _ = finish_open(opened, Outcome::Error(codes::INVALID_REQUEST)).await;
        session.channel.close("too many open sessions").await;
        return refused(cap).into_response();
    }
    if finish_open(opened, Outcome::Ok).await.is_err() {
        state.sessions.remove(&session.id);
        session
            .channel
            .close("the stream's opening could not be audited")
            .await;
        return AgentError::Unaudited.into_response();
    }
    tracing::info!(tenant = %who.tenant, subject = %who.subject, source, session = %session.id, "HTTP+SSE session opened");
    let endpoint = sse::named_event(
        "endpoint",
        &format!("/sse/{source}/messages?sessionId={}", session.id),
    );
    let reader = session.standalone().attach(Start::Undelivered);
    let on_end = {
        let state = state.clone();
        let session = session.clone();
        Box::new(move || {
            // The stream is the session: when the agent goes, so does the session.
            state.sessions.remove(&session.id);
            tokio::spawn(async move {
                session
                    .channel
                    .close("the agent closed its event stream")
                    .await
            });
        })
    };
    sse_response(
        &state,
        reader,
        EventIds::None,
        Some(endpoint),
        Some(on_end),
        state.stop.clone(),
    )
}

/// The method an HTTP+SSE stream's opening is recorded with in the audit trail.
pub(super) const OPEN_METHOD: &str = "sse/open";

/// A call recording the opening of an HTTP+SSE stream by `who`.
fn open_call(state: &RelayState, who: &Identity, source: &str, session: &str) -> Call {
    let info = MessageInfo {
        kind: MessageKind::Request,
        id: None,
        method: Some(OPEN_METHOD.to_owned()),
        null_id: false,
        target: None,
        is_tool_error: false,
        is_input_required: false,
        error_code: None,
        payload: None,
        size: 0,
    };
    let mut call = Call::start(
        &state.calls,
        who,
        source,
        Direction::AgentToServer,
        &[],
        &info,
        None,
    );
    call.set_context(&Context {
        session: Some(session.to_owned()),
        ..Context::default()
    });
    call
}

/// Finishes the record of a stream's opening; an error when it could not be written.
async fn finish_open(call: Call, outcome: Outcome) -> Result<(), ()> {
    call.finish(outcome, 0, None).await.map_err(|e| {
        tracing::error!(error = %e, "HTTP+SSE stream refused: its opening could not be audited");
    })
}

/// POST to the endpoint: the message goes down the session's stream; answers arrive on the
/// event stream, so this only says 202.
async fn handle_message(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let who = gate(&state, &headers, Resource::Sse(&source))?;
        let session_id = query.get("sessionId").ok_or_else(|| {
            AgentError::BadRequest("sessionId query parameter is required".into())
        })?;
        let session = state
            .sessions
            .get(session_id, &who, &source, Transport::LegacySse)
            .ok_or(AgentError::SessionNotFound)?;
        let mut admitted = admit(&state, &who, &source, body).await?;
        // A refused message's records name its session too.
        admitted.calls.set_context(&session.call_context());
        if let Some((_, denied)) = admitted.refused().await {
            session.standalone().push(denied).await;
            return Ok::<_, AgentError>(StatusCode::ACCEPTED.into_response());
        }
        let filter = admitted.continue_in(&state, &session, &who);
        let (body, classified, calls) = admitted.into_parts();
        Ok(forward_to_stream(&state, &session, body, &classified, filter, calls).await)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
