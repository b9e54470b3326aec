//! The agent endpoint `/mcp/{source}`: Streamable HTTP, session era and 2026-07-28.
//!
//! The relay owns everything HTTP here: its own session ids, JSON or SSE answers, event ids and
//! resumption, keep-alive comments. What reaches the tunnel is messages only.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::admission::{
    admit, gate, header_str, open_channel, open_channel_to, open_header, unbind_name_header,
};
use super::answer::{JsonAnswer, Target, forward, sse_response};
use super::oauth::Resource;
use super::replay;
use super::reply::{AgentError, json_response, source_error};
use super::resume::{self, Lost};
use crate::govern::Identity;
use crate::govern::audit::Outcome;
use crate::mcp::bridge::{self, Retry};
use crate::mcp::era::{
    METHOD_HEADER, NAME_HEADER, SESSION_HEADER, VERSION_HEADER, decode_header_value, names_target,
};
use crate::mcp::jsonrpc::{Classified, MessageInfo, codes, error_body};
use crate::relay::calls::filter::ListFilter;
use crate::relay::calls::{Context, InFlight};
use crate::relay::session::input::{InputSeal, StateRefused, open_retry};
use crate::relay::session::sealed::InputClaims;
use crate::relay::session::{
    CapReached, EventClaims, EventIds, Session, SessionClaims, Start, Transport,
    is_standalone_stream, new_handle, new_session_id, new_stream_base, parse_event_id,
};
use crate::relay::state::RelayState;
use crate::wire::{Era, SessionHandle, UNSOLICITED};

/// The header a reconnecting agent names its last seen event with.
const LAST_EVENT_ID: &str = "last-event-id";

/// Routes of the agent endpoint.
pub(super) fn routes() -> Router<Arc<RelayState>> {
    Router::new().route(
        "/mcp/{source}",
        post(handle_post).get(handle_get).delete(handle_delete),
    )
}

async fn handle_post(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    post_inner(state, source, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn post_inner(
    state: Arc<RelayState>,
    source: String,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AgentError> {
    let who = gate(&state, &headers, Resource::Mcp(&source))?;
    let mut admitted = admit(&state, &who, &source, body).await?;
    let version = header_str(&headers, VERSION_HEADER);
    admitted.calls.set_context(&Context {
        // The session's handle, when the id is one this fleet sealed: never the agent's text.
        session: header_str(&headers, SESSION_HEADER)
            .and_then(|id| SessionClaims::open(&state.fleet, id))
            .map(|claims| claims.handle),
        protocol_version: version.map(str::to_owned),
        transport: None,
    });
    if let Some((status, denied)) = admitted.refused().await {
        let mut response = json_response(status, denied);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static("1"),
            );
        }
        return Ok(response);
    }
    if let Some(session_id) = header_str(&headers, SESSION_HEADER) {
        let session = match resume::find(&state, session_id, &who, &source).await {
            Ok(session) => session,
            Err(lost) => {
                let (_, classified, calls) = admitted.into_parts();
                return lost_session(lost, &source, &classified, calls).await;
            }
        };
        let filter = admitted.continue_in(&state, &session, &who);
        let (body, classified, calls) = admitted.into_parts();
        let target = Target {
            source: &source,
            session: Some(&session),
            era: Era::Session,
            filter,
            calls,
            listen: None,
            seal: None,
            tasks: session.tasks().clone(),
        };
        return Ok(forward(&state, &session.channel, body, &classified, target).await);
    }
    let (body, classified, calls) = admitted.into_parts();
    if version.is_some_and(|v| crate::mcp::era_of(v) == Era::Stateless) {
        return stateless(&state, &who, &source, &headers, body, &classified, calls).await;
    }
    match &classified {
        Classified::Single(info) if info.method.as_deref() == Some("initialize") => {
            Ok(initialize(&state, &who, &source, body, &classified, calls).await)
        }
        _ => Err(AgentError::BadRequest(
            "Bad Request: Mcp-Session-Id header is required (send initialize first)".into(),
        )),
    }
}

/// The answer when the session an id names cannot be continued here: `404` when it is gone
/// (the agent initializes again), else an error for each request, recorded first, that says
/// why (the session id stays good).
async fn lost_session(
    lost: Lost,
    source: &str,
    classified: &Classified,
    calls: InFlight,
) -> Result<Response, AgentError> {
    match lost {
        Lost::NotFound => Err(AgentError::SessionNotFound),
        Lost::Starting => Ok(unreached(calls, AgentError::Starting.into_response()).await),
        Lost::Cap(cap) => {
            let id = classified.messages().first().and_then(|m| m.id.clone());
            Ok(too_many_sessions(calls, id, cap).await)
        }
        Lost::Unreachable(why) => {
            let id = match classified {
                Classified::Single(info) => info.id.as_deref(),
                Classified::Batch(_) => None,
            };
            Ok(unreached(calls, source_error(id, source, &why)).await)
        }
    }
}

/// Opens a session: a new tunnel stream carrying `initialize`. The session exists only if the
/// upstream accepts it; its id, sealed, names what any relay of the fleet needs to continue it.
async fn initialize(
    state: &Arc<RelayState>,
    who: &Identity,
    source: &str,
    body: Bytes,
    classified: &Classified,
    mut calls: InFlight,
) -> Response {
    // The handle is minted before the stream opens, so both sides log the same name (the
    // agent's id, sealed, is made once the upstream has answered).
    let handle = new_handle();
    calls.set_context(&Context {
        session: Some(handle.clone()),
        ..Context::default()
    });
    let id = classified.messages().first().and_then(|m| m.id.clone());
    if let Err(cap) = state.sessions.admit(who, source, state.session_caps()) {
        return too_many_sessions(calls, id, cap).await;
    }
    let mut header = open_header(
        who,
        source,
        Era::Session,
        handle.clone(),
        None,
        &HeaderMap::new(),
    );
    let base = new_stream_base();
    header.session = Some(SessionHandle {
        handle: handle.clone(),
        resume: false,
        upstream: None,
        stream: Some(base),
    });
    let channel = match open_channel(state, who, &header).await {
        Ok(channel) => channel,
        Err(response) => return unreached(calls, response).await,
    };
    let session = Arc::new(Session::new(
        handle.clone(),
        who,
        source,
        (channel.clone(), base),
        Transport::Streamable,
        &state.calls,
        state.task_binding(who, source),
    ));
    let target = Target {
        source,
        session: Some(&session),
        era: Era::Session,
        filter: None,
        calls,
        listen: None,
        seal: None,
        tasks: session.tasks().clone(),
    };
    let mut response = forward(state, &channel, body, classified, target).await;
    let answer = response.extensions().get::<JsonAnswer>();
    if let Some(answer) = answer {
        session.learn_version(&answer.message);
    }
    if response.status() == StatusCode::OK && !answer.is_some_and(|a| a.is_error) {
        if let Err(cap) = state
            .sessions
            .try_insert(session.clone(), state.session_caps())
        {
            // Others opened meanwhile: the initialize was recorded, the session is not kept.
            session.channel.close("too many open sessions").await;
            return AgentError::TooManySessions { id, cap }.into_response();
        }
        tracing::info!(tenant = %who.tenant, subject = %who.subject, source, session = %session.id, "session opened");
        let claims = session.claims(crate::relay::tunnel::registry::unix_now());
        let value =
            HeaderValue::from_str(&claims.seal(&state.fleet)).expect("sealed ids are base64url");
        response.headers_mut().insert(SESSION_HEADER, value);
    } else {
        // No session: `connect` need not keep the upstream one for a resume.
        session.channel.close("initialize failed").await;
    }
    response
}

async fn stateless(
    state: &Arc<RelayState>,
    who: &Identity,
    source: &str,
    headers: &HeaderMap,
    body: Bytes,
    classified: &Classified,
    calls: InFlight,
) -> Result<Response, AgentError> {
    let Classified::Single(info) = classified else {
        return Err(AgentError::BadRequest(
            "batches are not allowed in protocol version 2026-07-28".into(),
        ));
    };
    check_stateless_headers(headers, info)?;
    // A listen stream lasts as long as the agent wants it: it counts like a session.
    let listen = if info.method.as_deref() == Some("subscriptions/listen") {
        match state
            .sessions
            .open_listen(who, source, state.session_caps())
        {
            Ok(guard) => Some(guard),
            Err(cap) => return Ok(too_many_sessions(calls, info.id.clone(), cap).await),
        }
    } else {
        None
    };
    // A retry of an `input_required` answer: its sealed state is checked and replaced by the
    // upstream's own before anything goes on, and names the `connect` holding the call.
    let interactive = info.method.as_deref().is_some_and(names_target);
    let mut calls = calls;
    let (body, holder, call) = match interactive.then(|| Retry::parse(&body)).flatten() {
        Some(Retry {
            state: Some(sealed),
            ..
        }) => match retried(state, who, source, &body, &sealed) {
            Ok((body, claims)) => {
                calls.link(&claims.call);
                (body, claims.connect, Some(claims.call))
            }
            Err(refused) => return Ok(refused_retry(calls, info.id.as_deref(), refused).await),
        },
        _ => (body, None, None),
    };
    let version = header_str(headers, VERSION_HEADER).map(str::to_owned);
    let context = format!("req-{}", &new_session_id()[..16]);
    let mut header = open_header(who, source, Era::Stateless, context, version, headers);
    if info
        .method
        .as_deref()
        .is_some_and(crate::mcp::tasks::addresses_a_task)
    {
        let task = info.payload(&body).and_then(crate::mcp::tasks::task_id_of);
        unbind_name_header(
            &mut header,
            &state.task_binding(who, source),
            task.as_deref(),
        )
        .map_err(|message| AgentError::HeaderMismatch {
            id: info.id.clone(),
            message,
        })?;
    }
    let opened = match holder {
        Some(connect) => open_channel_to(state, who, &header, &connect).await,
        None => open_channel(state, who, &header).await,
    };
    let channel = match opened {
        Ok(channel) => channel,
        Err(response) => return Ok(unreached(calls, response).await),
    };
    let seal = interactive.then(|| {
        let connect = channel.connect_instance().map(str::to_owned);
        InputSeal::new(
            state.fleet.clone(),
            who,
            source,
            body.clone(),
            (connect, call),
        )
    });
    let target = Target {
        source,
        session: None,
        era: Era::Stateless,
        filter: ListFilter::for_request(&state.governance(), &state.calls, who, source, classified),
        calls,
        listen,
        seal,
        tasks: state.task_binding(who, source),
    };
    Ok(forward(state, &channel, body, classified, target).await)
}

/// Opens the sealed state of a retry and spends it: the request to send on (with the
/// upstream's own state in place of the sealed one), and the state's claims (the `connect`
/// that holds the call, the call's id).
fn retried(
    state: &RelayState,
    who: &Identity,
    source: &str,
    body: &Bytes,
    sealed: &str,
) -> Result<(Bytes, InputClaims), StateRefused> {
    let claims = open_retry(&state.fleet, &state.spent_states, who, source, body, sealed)?;
    let body =
        bridge::with_request_state(body, claims.inner.as_deref()).ok_or(StateRefused::Unknown)?;
    Ok((body, claims))
}

/// The answer to a retry whose state is refused: an invalid-params error, its call recorded.
async fn refused_retry(
    mut calls: InFlight,
    id: Option<&serde_json::value::RawValue>,
    refused: StateRefused,
) -> Response {
    tracing::info!(reason = %refused, "retry with a refused requestState");
    let body = error_body(id, codes::INVALID_PARAMS, &refused.to_string());
    let body = calls
        .fail(Outcome::Error(codes::INVALID_PARAMS), body)
        .await;
    json_response(StatusCode::OK, body)
}

/// The answer when a session cap refuses a new session or listen stream: `429` with a
/// JSON-RPC error naming the cap, its call recorded first.
async fn too_many_sessions(
    mut calls: InFlight,
    id: Option<Box<serde_json::value::RawValue>>,
    cap: CapReached,
) -> Response {
    let body = error_body(id.as_deref(), codes::INVALID_REQUEST, &cap.to_string());
    let body = calls
        .fail(Outcome::Error(codes::INVALID_REQUEST), body)
        .await;
    json_response(StatusCode::TOO_MANY_REQUESTS, body)
}

/// The answer when no tunnel stream could be opened to the source (offline, unknown, or the
/// stream refused): its calls end as tunnel errors, recorded before it is released.
async fn unreached(mut calls: InFlight, response: Response) -> Response {
    match calls.finish_all(Outcome::TunnelError, 0).await {
        Ok(()) => response,
        Err(refusal) => json_response(StatusCode::OK, refusal),
    }
}

/// 2026-07-28: `Mcp-Method` must repeat the body's method, and `Mcp-Name` its tool, prompt or
/// resource name (plain, or in the `=?base64?...?=` form for values that are not plain ASCII).
fn check_stateless_headers(headers: &HeaderMap, info: &MessageInfo) -> Result<(), AgentError> {
    let mismatch = |message: String| AgentError::HeaderMismatch {
        id: info.id.clone(),
        message,
    };
    let Some(method) = info.method.as_deref() else {
        return Err(AgentError::BadRequest(
            "2026-07-28 accepts only requests and notifications".into(),
        ));
    };
    // A repeated routing header is ambiguous: which copy would the server check?
    for name in [VERSION_HEADER, METHOD_HEADER, NAME_HEADER] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(mismatch(format!("{name} header appears more than once")));
        }
    }
    match header_str(headers, METHOD_HEADER) {
        Some(value) if value == method => {}
        Some(_) => {
            return Err(mismatch(format!(
                "Mcp-Method header does not match the request body's method {method:?}"
            )));
        }
        None => return Err(mismatch("Mcp-Method header is required".into())),
    }
    if let Some(target) = info.target.as_deref().filter(|_| names_target(method)) {
        let value = header_str(headers, NAME_HEADER)
            .ok_or_else(|| mismatch("Mcp-Name header is required".into()))?;
        if decode_header_value(value).as_deref() != Some(target) {
            return Err(mismatch(format!(
                "Mcp-Name header does not match the request body's name {target:?}"
            )));
        }
    }
    Ok(())
}

/// GET: the session's standalone stream, or, with `Last-Event-ID`, the rest of the stream that
/// event belongs to. A new GET takes over from an older one.
async fn handle_get(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let who = gate(&state, &headers, Resource::Mcp(&source))?;
        let Some(session_id) = header_str(&headers, SESSION_HEADER) else {
            return Err(AgentError::MethodNotAllowed);
        };
        let session = resume::find(&state, session_id, &who, &source)
            .await
            .map_err(Lost::into_error)?;
        let last = header_str(&headers, LAST_EVENT_ID);
        if let Some(claims) = last.and_then(|id| EventClaims::open(&state.fleet, id)) {
            if claims.exchange == UNSOLICITED {
                return replay::resume_listening(&state, &session, claims).await;
            }
            return replay::resume_answer(&state, &who, &session, claims).await;
        }
        let named = last.and_then(parse_event_id);
        let resume = named.and_then(|(stream, seq)| Some((session.log(stream)?, seq)));
        if let (Some((stream, _)), None) = (named, &resume)
            && !is_standalone_stream(stream)
        {
            // An answer this relay never carried (another relay of the fleet did, or this one
            // before a restart), or one forgotten: there is nothing to replay here, and an
            // agent waiting on a fresh stream for it would wait forever.
            return Err(AgentError::BadRequest(
                "Bad Request: the answer stream this Last-Event-ID names cannot be resumed \
                 here (it was carried by another relay, or is no longer kept)"
                    .into(),
            ));
        }
        // A resumed answer is a call in flight: it may finish while the relay drains. The
        // standalone stream ends when draining starts. Only a fresh stream is primed.
        let (reader, ids, until) = match resume {
            Some((log, seq)) => {
                // A resumed answer ends with its log (see `answer::stream_answer`).
                let until = if is_standalone_stream(log.stream) {
                    state.shutdown.clone()
                } else {
                    CancellationToken::new()
                };
                (log.attach(Start::After(seq)), EventIds::Resumable, until)
            }
            None => return Ok(replay::listen(&state, &session, None).await),
        };
        Ok(sse_response(&state, reader, ids, None, None, until))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn handle_delete(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let who = gate(&state, &headers, Resource::Mcp(&source))?;
        let Some(session_id) = header_str(&headers, SESSION_HEADER) else {
            return Err(AgentError::MethodNotAllowed);
        };
        let session = resume::find(&state, session_id, &who, &source)
            .await
            .map_err(Lost::into_error)?;
        state.sessions.remove(&session.id);
        session.channel.close("session deleted by the agent").await;
        tracing::info!(tenant = %session.tenant, subject = %session.subject, source, session = %session.id, "session deleted");
        Ok(StatusCode::OK.into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
